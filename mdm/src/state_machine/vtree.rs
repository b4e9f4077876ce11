//! Snapshots and V-trees (see `proto::model::Vtree`): taking snapshots (one volume or a
//! consistency group), removing volumes with their snapshots, restoring a volume from a
//! snapshot, and pruning the layers nobody reads any more.
//!
//! Every change of which layer a volume writes to bumps its pool's epoch: an SDS then refuses
//! requests routed before it (and a request for a frozen layer in any case), so no write lands
//! in a layer after a snapshot froze it.

use super::{done, err, new_id, not_found, validate_name, volume_id, Outcome};
use proto::model::*;
use proto::msg::RemoveMode;
use proto::*;
use std::collections::{BTreeMap, BTreeSet};

/// Most members of one V-tree (ScaleIO allows 126 snapshots of a volume and its descendants).
pub const VTREE_MEMBERS_MAX: usize = 127;
/// Most volumes in one consistency group.
pub const GROUP_MAX: usize = 64;

/// The name a snapshot gets when the command names none: `<volume>.s<n>`, shortened to fit.
fn snapshot_name(s: &ClusterState, volume: &str, id: VolumeId) -> String {
    let suffix = format!(".s{}", id.0);
    let keep = super::NAME_LEN_MAX.saturating_sub(suffix.len());
    let base: String = volume.chars().take(keep).collect();
    let name = format!("{base}{suffix}");
    if s.volume_by_name(&name).is_none() {
        name
    } else {
        format!("snap{}", id.0)
    }
}

/// Hand out a new layer of `vtree` on top of `parent`.
fn new_layer(s: &mut ClusterState, vtree: VtreeId, parent: LayerId) -> LayerId {
    let t = s.vtrees.entry(vtree).or_insert_with(|| Vtree {
        layers: [(LayerId(0), None)].into(),
        next_layer: 1,
    });
    let l = LayerId(t.next_layer);
    t.next_layer += 1;
    t.layers.insert(l, Some(parent));
    l
}

fn bump_epochs(s: &mut ClusterState, pools: &BTreeSet<PoolId>) {
    for p in pools {
        if let Some(p) = s.pools.get_mut(p) {
            p.epoch = p.epoch.next();
        }
    }
}

/// `SnapshotVolumes`: every volume's current layer is frozen and gets two new layers on top,
/// one the volume writes to from now on and one for its snapshot; no data moves.
pub(super) fn snapshot(
    s: &mut ClusterState,
    volumes: &[String],
    names: &[String],
    labels: &BTreeMap<String, String>,
    unix: u64,
) -> Result<Outcome, WireError> {
    if volumes.is_empty() {
        return err(
            ErrorCode::BadRequest,
            "Name at least one volume to snapshot",
        );
    }
    if volumes.len() > GROUP_MAX {
        return err(
            ErrorCode::BadRequest,
            format!("At most {GROUP_MAX} volumes may be snapshotted together"),
        );
    }
    if !names.is_empty() && names.len() != volumes.len() {
        return err(
            ErrorCode::BadRequest,
            format!(
                "{} snapshot names for {} volumes: give one name per volume, in the same order, or none",
                names.len(),
                volumes.len()
            ),
        );
    }
    let mut ids = Vec::new();
    for name in volumes {
        let id = volume_id(s, name)?;
        if ids.contains(&id) {
            return err(
                ErrorCode::BadRequest,
                format!("Volume {name} is named twice"),
            );
        }
        ids.push(id);
    }
    take(s, &ids, names, labels, unix, None)
}

/// Snapshot volumes `ids` together (see [`snapshot`]); `policy` marks a policy's run.
pub(super) fn take(
    s: &mut ClusterState,
    ids: &[VolumeId],
    names: &[String],
    labels: &BTreeMap<String, String>,
    unix: u64,
    policy: Option<(String, u64)>,
) -> Result<Outcome, WireError> {
    let members: Vec<Volume> = ids
        .iter()
        .filter_map(|i| s.volumes.get(i).cloned())
        .collect();
    if let Some(v) = members.iter().find(|v| !v.thin) {
        return err(
            ErrorCode::BadRequest,
            format!(
                "Volume {} is thick: snapshots of thick volumes are not supported (their space is reserved per chunk, a snapshot's layers are not)",
                v.name
            ),
        );
    }
    let pds: BTreeSet<PdId> = members
        .iter()
        .filter_map(|v| s.pools.get(&v.pool).map(|p| p.pd))
        .collect();
    if pds.len() > 1 {
        return err(
            ErrorCode::BadRequest,
            "A consistency group's volumes must be in one protection domain (as in ScaleIO); snapshot each domain's volumes with a command of their own",
        );
    }
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    for n in names {
        validate_name("snapshot", n)?;
        if s.volume_by_name(n).is_some() || !taken.insert(n.as_str()) {
            return err(
                ErrorCode::AlreadyExists,
                format!("A volume named {n} already exists"),
            );
        }
    }
    let mut per_tree: BTreeMap<VtreeId, usize> = BTreeMap::new();
    for v in &members {
        *per_tree.entry(v.vtree).or_default() += 1;
    }
    for (t, adding) in &per_tree {
        if s.vtree_members(*t).count() + adding > VTREE_MEMBERS_MAX {
            return err(
                ErrorCode::Conflict,
                format!("A V-tree holds at most {VTREE_MEMBERS_MAX} volumes and snapshots; remove some snapshots first"),
            );
        }
    }
    let group = new_id(s);
    let mut made = Vec::new();
    for (i, v) in members.iter().enumerate() {
        let frozen = s.volumes.get(&v.id).map(|x| x.layer).unwrap_or_default();
        let own = new_layer(s, v.vtree, frozen);
        let snap_layer = new_layer(s, v.vtree, frozen);
        if let Some(x) = s.volumes.get_mut(&v.id) {
            x.layer = own;
        }
        let id = VolumeId(new_id(s));
        let name = match names.get(i) {
            Some(n) => n.clone(),
            None => snapshot_name(s, &v.name, id),
        };
        s.volumes.insert(
            id,
            Volume {
                id,
                name: name.clone(),
                pool: v.pool,
                size_bytes: v.size_bytes,
                thin: true,
                vtree: v.vtree,
                created_unix: unix,
                labels: labels.clone(),
                preempt: false,
                layer: snap_layer,
                snapshot: Some(SnapshotOf {
                    volume: v.id,
                    unix,
                    group,
                    policy: policy.clone(),
                }),
            },
        );
        made.push(name);
    }
    bump_epochs(s, &members.iter().map(|v| v.pool).collect());
    let what = if made.len() == 1 {
        format!("Snapshot {} created", made[0])
    } else {
        format!(
            "Snapshots {} created as consistency group {group}",
            made.join(", ")
        )
    };
    done(what, Some(group))
}

/// Every volume descended from `id` by snapshots (snapshots of it, of those, ...).
fn descendants(s: &ClusterState, id: VolumeId) -> BTreeSet<VolumeId> {
    let mut out = BTreeSet::new();
    let mut todo = vec![id];
    while let Some(at) = todo.pop() {
        for v in s.volumes.values() {
            if v.snapshot.as_ref().is_some_and(|x| x.volume == at) && out.insert(v.id) {
                todo.push(v.id);
            }
        }
    }
    out
}

/// Remove `ids` (refused, changing nothing, while any is mapped), then prune their trees.
pub(super) fn remove_all(s: &mut ClusterState, ids: &BTreeSet<VolumeId>) -> Result<(), WireError> {
    let mapped: Vec<String> = ids
        .iter()
        .filter(|i| s.mappings_of(**i).next().is_some())
        .filter_map(|i| s.volumes.get(i).map(|v| v.name.clone()))
        .collect();
    if !mapped.is_empty() {
        return err(
            ErrorCode::Conflict,
            format!(
                "{} {} mapped to an SDC; unmap first",
                mapped.join(", "),
                if mapped.len() == 1 { "is" } else { "are" }
            ),
        );
    }
    let trees: BTreeSet<VtreeId> = ids
        .iter()
        .filter_map(|i| s.volumes.get(i).map(|v| v.vtree))
        .collect();
    for i in ids {
        s.volumes.remove(i);
    }
    for p in s.snapshot_policies.values_mut() {
        p.volumes.retain(|v| !ids.contains(v));
    }
    for t in trees {
        prune(s, t);
    }
    Ok(())
}

/// Drop the layers of `vtree` no member reads any more (neither a member's layer nor below
/// one); the SDS collectors free their chunks. A tree left without members goes entirely.
pub(super) fn prune(s: &mut ClusterState, vtree: VtreeId) {
    let used: BTreeSet<LayerId> = s.vtree_members(vtree).map(|v| v.layer).collect();
    if used.is_empty() {
        s.vtrees.remove(&vtree);
        return;
    }
    let Some(t) = s.vtrees.get_mut(&vtree) else {
        return;
    };
    let mut keep = BTreeSet::new();
    for l in used {
        let mut at = Some(l);
        while let Some(x) = at {
            if !keep.insert(x) {
                break;
            }
            at = t.layers.get(&x).copied().flatten();
        }
    }
    t.layers.retain(|l, _| keep.contains(l));
}

/// `RemoveVolume`: the volume, its descendants, both, or its whole V-tree.
pub(super) fn remove_volume(
    s: &mut ClusterState,
    name: &str,
    mode: RemoveMode,
) -> Result<Outcome, WireError> {
    let id = volume_id(s, name)?;
    let Some(v) = s.volumes.get(&id).cloned() else {
        return not_found("volume", name);
    };
    let mut ids: BTreeSet<VolumeId> = match mode {
        RemoveMode::OnlyMe => [id].into(),
        RemoveMode::IncludingDescendants => {
            let mut d = descendants(s, id);
            d.insert(id);
            d
        }
        RemoveMode::DescendantsOnly => descendants(s, id),
        RemoveMode::WholeVtree => s.vtree_members(v.vtree).map(|m| m.id).collect(),
    };
    ids.retain(|i| s.volumes.contains_key(i));
    if ids.is_empty() {
        return err(
            ErrorCode::NotFound,
            format!("Volume {name} has no snapshots to remove"),
        );
    }
    remove_all(s, &ids)?;
    let msg = if ids.len() == 1 {
        "Successfully removed volume.".to_string()
    } else {
        format!("Successfully removed {} volumes and snapshots.", ids.len())
    };
    done(msg, Some(id.0))
}

/// `RemoveConsistencyGroupSnapshots`.
pub(super) fn remove_group(s: &mut ClusterState, group: u64) -> Result<Outcome, WireError> {
    let ids: BTreeSet<VolumeId> = s
        .volumes
        .values()
        .filter(|v| v.snapshot.as_ref().is_some_and(|x| x.group == group))
        .map(|v| v.id)
        .collect();
    if ids.is_empty() {
        return err(
            ErrorCode::NotFound,
            format!("No snapshots of consistency group {group} (see --query_vtree for groups)"),
        );
    }
    remove_all(s, &ids)?;
    done(
        format!(
            "Successfully removed the {} snapshots of consistency group {group}.",
            ids.len()
        ),
        Some(group),
    )
}

/// `OverwriteVolumeContent`: `volume` reads what `source` reads now. The source's layer is
/// frozen under two new ones (the source's and the volume's); the volume's old layers go unless
/// another member reads them.
pub(super) fn overwrite(
    s: &mut ClusterState,
    volume: &str,
    source: &str,
    force: bool,
) -> Result<Outcome, WireError> {
    let vid = volume_id(s, volume)?;
    let sid = volume_id(s, source)?;
    let (Some(v), Some(src)) = (s.volumes.get(&vid).cloned(), s.volumes.get(&sid).cloned()) else {
        return not_found("volume", volume);
    };
    if vid == sid {
        return err(
            ErrorCode::BadRequest,
            "A volume cannot be overwritten with itself",
        );
    }
    if v.vtree != src.vtree {
        return err(
            ErrorCode::BadRequest,
            format!("{source} is not in the V-tree of {volume}: the source must be a snapshot of the volume or another member of its tree (see --query_vtree)"),
        );
    }
    if src.size_bytes > v.size_bytes {
        return err(
            ErrorCode::BadRequest,
            format!(
                "{source} ({} MiB) is larger than {volume} ({} MiB); grow {volume} first",
                src.size_bytes >> 20,
                v.size_bytes >> 20
            ),
        );
    }
    if !force && s.mappings_of(vid).next().is_some() {
        return err(
            ErrorCode::Conflict,
            format!("Volume {volume} is mapped: its hosts would see its content change under them. Unmap it first, or add --allow_overwrite_mapped"),
        );
    }
    let frozen = src.layer;
    let src_layer = new_layer(s, v.vtree, frozen);
    let own = new_layer(s, v.vtree, frozen);
    if let Some(x) = s.volumes.get_mut(&sid) {
        x.layer = src_layer;
    }
    if let Some(x) = s.volumes.get_mut(&vid) {
        x.layer = own;
    }
    prune(s, v.vtree);
    bump_epochs(s, &[v.pool].into());
    done(
        format!("Successfully overwrote the content of {volume} with {source}."),
        Some(vid.0),
    )
}
