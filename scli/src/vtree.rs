//! `--query_vtree`: a volume's V-tree (the volume, its snapshots, theirs), each member's size
//! and the space it alone holds, from the map's layers and the chunk counts the SDS report.
//! Pure: computed from the query's answer.

use proto::model::{ClusterState, Volume};
use proto::msg::ClusterStatus;
use proto::{LayerId, VolumeId, VtreeId, CHUNK_SIZE};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// Bytes stored in each layer of `vtree` (one copy: the SDS report every copy they hold, and
/// each chunk has two).
pub fn layer_bytes(c: &ClusterStatus, vtree: VtreeId) -> BTreeMap<LayerId, u64> {
    let mut chunks: BTreeMap<LayerId, u64> = BTreeMap::new();
    for stats in c.sds_stats.values() {
        for (t, l, n) in &stats.layer_chunks {
            if *t == vtree {
                *chunks.entry(*l).or_default() += n;
            }
        }
    }
    chunks
        .into_iter()
        .map(|(l, n)| (l, n.div_ceil(2) * CHUNK_SIZE))
        .collect()
}

/// Each member's space alone (layers only it reads) and the space its members share.
pub fn space(
    s: &ClusterState,
    vtree: VtreeId,
    bytes: &BTreeMap<LayerId, u64>,
) -> (BTreeMap<VolumeId, u64>, u64) {
    let mut readers: BTreeMap<LayerId, BTreeSet<VolumeId>> = BTreeMap::new();
    for m in s.vtree_members(vtree) {
        for l in s.chain(vtree, m.layer) {
            readers.entry(l).or_default().insert(m.id);
        }
    }
    let mut alone: BTreeMap<VolumeId, u64> = s.vtree_members(vtree).map(|m| (m.id, 0)).collect();
    let mut shared = 0;
    for (l, b) in bytes {
        match readers.get(l) {
            Some(r) if r.len() == 1 => {
                if let Some(a) = r.iter().next().and_then(|id| alone.get_mut(id)) {
                    *a += b;
                }
            }
            Some(_) => shared += b,
            None => {} // a removed layer the collectors have not freed yet
        }
    }
    (alone, shared)
}

fn mib(b: u64) -> String {
    format!("{} MiB", b >> 20)
}

/// The text and JSON of `--query_vtree` for the tree of `v`.
pub fn render(s: &ClusterState, c: &ClusterStatus, v: &Volume) -> (String, Value) {
    let bytes = layer_bytes(c, v.vtree);
    let (alone, shared) = space(s, v.vtree, &bytes);
    let members: Vec<&Volume> = s.vtree_members(v.vtree).collect();
    let ids: BTreeSet<VolumeId> = members.iter().map(|m| m.id).collect();
    let parent = |m: &Volume| {
        m.snapshot
            .as_ref()
            .map(|x| x.volume)
            .filter(|p| ids.contains(p))
    };
    let mut t = format!(
        "V-tree {} of volume {}: {} member(s), {} stored (one copy), {} shared by several members",
        v.vtree,
        v.name,
        members.len(),
        mib(bytes.values().sum()),
        mib(shared)
    );
    fn walk(
        t: &mut String,
        members: &[&Volume],
        parent: &dyn Fn(&Volume) -> Option<VolumeId>,
        alone: &BTreeMap<VolumeId, u64>,
        at: Option<VolumeId>,
        depth: usize,
    ) {
        for m in members.iter().filter(|m| parent(m) == at) {
            let what = match &m.snapshot {
                Some(x) => format!(
                    "snapshot taken {} (consistency group {})",
                    proto::clock::rfc3339(x.unix),
                    x.group
                ),
                None => "volume".to_string(),
            };
            let _ = write!(
                t,
                "\n{}{} (Id: {}) {what}  Size: {}  Alone holds: {}",
                "    ".repeat(depth + 1),
                m.name,
                m.id,
                mib(m.size_bytes),
                mib(alone.get(&m.id).copied().unwrap_or(0))
            );
            walk(t, members, parent, alone, Some(m.id), depth + 1);
        }
    }
    walk(&mut t, &members, &parent, &alone, None, 0);
    let json_members: Vec<Value> = members
        .iter()
        .map(|m| {
            json!({
                "id": m.id, "name": m.name, "size_bytes": m.size_bytes,
                "snapshot_of": parent(m),
                "snapshot_unix": m.snapshot.as_ref().map(|x| x.unix),
                "consistency_group": m.snapshot.as_ref().map(|x| x.group),
                "alone_bytes": alone.get(&m.id).copied().unwrap_or(0),
            })
        })
        .collect();
    (
        t,
        json!({
            "vtree": v.vtree, "volume": v.name, "members": json_members,
            "stored_bytes": bytes.values().sum::<u64>(), "shared_bytes": shared,
        }),
    )
}

/// The text and JSON of `--query_snapshot_policy`: one policy (`name`) or all.
pub fn policies(s: &ClusterState, name: Option<&str>) -> (String, Value) {
    let list: Vec<&proto::model::SnapshotPolicy> = s
        .snapshot_policies
        .values()
        .filter(|p| name.is_none_or(|n| p.name == n))
        .collect();
    let mut t = String::new();
    for p in &list {
        let vols: Vec<String> = p
            .volumes
            .iter()
            .map(|v| s.volumes.get(v).map_or(v.to_string(), |x| x.name.clone()))
            .collect();
        let kept = s
            .volumes
            .values()
            .filter(|v| {
                v.snapshot
                    .as_ref()
                    .and_then(|x| x.policy.as_ref())
                    .is_some_and(|(n, _)| *n == p.name)
            })
            .count();
        let _ = writeln!(
            t,
            "Snapshot policy {}: {}, every {} s, keeps {} per level\n    Source volumes: {}\n    Runs: {} (last {}), snapshots held: {kept}",
            p.name,
            if p.paused { "Paused" } else { "Active" },
            p.cadence_secs,
            p.retain
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            if vols.is_empty() {
                "(none)".to_string()
            } else {
                vols.join(", ")
            },
            p.runs,
            if p.last_run_unix == 0 {
                "never".to_string()
            } else {
                proto::clock::rfc3339(p.last_run_unix)
            },
        );
    }
    if t.is_empty() {
        t = "No snapshot policies defined".into();
    }
    (
        t.trim_end().to_string(),
        serde_json::to_value(&list).unwrap_or(Value::Null),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::model::{SnapshotOf, Vtree};

    fn vol(id: u64, layer: u32, of: Option<u64>) -> Volume {
        Volume {
            id: VolumeId(id),
            name: format!("v{id}"),
            pool: proto::PoolId(1),
            size_bytes: 1 << 30,
            thin: true,
            vtree: VtreeId(9),
            created_unix: 0,
            labels: Default::default(),
            preempt: false,
            layer: LayerId(layer),
            snapshot: of.map(|o| SnapshotOf {
                volume: VolumeId(o),
                unix: 0,
                group: 1,
                policy: None,
            }),
        }
    }

    #[test]
    fn a_member_alone_holds_the_layers_only_it_reads() {
        // v1 was snapshotted (s2): layer 0 frozen, v1 writes 1, s2 writes 2.
        let mut s = ClusterState::default();
        for v in [vol(1, 1, None), vol(2, 2, Some(1))] {
            s.volumes.insert(v.id, v);
        }
        s.vtrees.insert(
            VtreeId(9),
            Vtree {
                layers: [
                    (LayerId(0), None),
                    (LayerId(1), Some(LayerId(0))),
                    (LayerId(2), Some(LayerId(0))),
                ]
                .into(),
                next_layer: 3,
            },
        );
        let mib = |n: u64| n << 20;
        let bytes: BTreeMap<LayerId, u64> = [
            (LayerId(0), mib(1024)),
            (LayerId(1), mib(100)),
            (LayerId(7), mib(5)),
        ]
        .into();
        let (alone, shared) = space(&s, VtreeId(9), &bytes);
        assert_eq!(alone[&VolumeId(1)], mib(100));
        assert_eq!(alone[&VolumeId(2)], 0);
        assert_eq!(shared, mib(1024), "layer 7 is gone from the map: nobody's");
        // Once v1 is removed, the frozen layer is s2's alone.
        s.volumes.remove(&VolumeId(1));
        let (alone, shared) = space(&s, VtreeId(9), &bytes);
        assert_eq!((alone[&VolumeId(2)], shared), (mib(1024), 0));
    }
}
