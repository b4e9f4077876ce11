//! The JSON views of cluster objects that operators' tools read: `scli --json` prints them and
//! the MDM's REST API answers them, so the two cannot disagree. Each is built from the
//! (redacted) cluster state and the leader's status; maps are ordered, so output diffs cleanly.

use crate::capacity::{pool_capacity, pool_rebuild};
use crate::model::{ClusterState, ProtectionDomain, Sdc, StoragePool, Volume};
use crate::msg::{ClusterStatus, SDC_SESSION_MS};
use serde_json::{json, Value};

pub fn pool(s: &ClusterState, c: &ClusterStatus, p: &StoragePool) -> Value {
    let raw = s.pool_raw_capacity(p.id);
    let reserved = s.pool_thick_reserved(p.id);
    let placed = p
        .pgs
        .iter()
        .filter(|m| m.primary.is_some() && m.secondary.is_some())
        .count();
    let h = s.pool_health(p);
    let rebuild = pool_rebuild(s, &c.sds_stats, p.id);
    let removing: Vec<String> = s
        .sds
        .values()
        .filter(|x| x.pd == p.pd && x.removing)
        .map(|x| x.name.clone())
        .collect();
    json!({
        "rebuild": rebuild,
        "rebuild_rebalance_policy": p.rebuild_policy, "sds_removing": removing,
        "state": h.state, "normal_pgs": h.normal_pgs, "rebalancing_pgs": h.rebalancing_pgs,
        "rebuilding_pgs": h.rebuilding_pgs,
        "degraded_pgs": h.degraded_pgs, "unavailable_pgs": h.unavailable_pgs,
        "id": p.id, "name": p.name, "protection_domain": s.pds.get(&p.pd).map(|d| d.name.clone()),
        "media_type": p.media_type, "pg_count": p.pg_count, "map_epoch": p.epoch, "pgs_fully_placed": placed,
        "raw_capacity_bytes": raw, "usable_capacity_bytes": raw / 2, "thick_reserved_bytes": reserved / 2,
        "capacity": pool_capacity(s, &c.sds_stats, p.id),
        "volumes": s.volumes.values().filter(|v| v.pool == p.id).map(|v| v.name.clone()).collect::<Vec<_>>(),
    })
}

/// The QoS wait the SDC `sdc` last reported for volume `v`, milliseconds (None: not reported).
pub fn throttled_ms(c: &ClusterStatus, sdc: crate::SdcId, v: crate::VolumeId) -> Option<u64> {
    c.sdc_throttled_ms
        .iter()
        .find(|(s, vol, _)| *s == sdc && *vol == v)
        .map(|(_, _, ms)| *ms)
}

pub fn volume(s: &ClusterState, c: &ClusterStatus, v: &Volume) -> Value {
    let maps: Vec<Value> = s.mappings_of(v.id).map(|m| {
        let sdc = s.sdcs.get(&m.sdc);
        json!({"sdc_id": m.sdc, "sdc_name": sdc.map(|c| c.name.clone()), "sdc_ip": sdc.map(|c| c.ip.clone()),
               "iops_limit": m.iops_limit, "bandwidth_limit_kbps": m.bandwidth_limit_kbps, "generation": m.generation,
               "throttled_ms": throttled_ms(c, m.sdc, v.id)})
    }).collect();
    json!({
        "id": v.id, "name": v.name, "size_bytes": v.size_bytes, "provisioning": if v.thin { "thin" } else { "thick" },
        "storage_pool": s.pools.get(&v.pool).map(|p| p.name.clone()), "vtree": v.vtree, "mapped_sdcs": maps,
        "preempt": v.preempt, "labels": v.labels,
        "docker_name": crate::docker::stored_name(&v.labels),
        "created": (v.created_unix > 0).then(|| crate::clock::rfc3339(v.created_unix)),
        "snapshot_of": v.snapshot.as_ref().map(|x| x.volume),
        "consistency_group": v.snapshot.as_ref().map(|x| x.group),
        "capacity": volume_capacity(s, c, v),
    })
}

pub fn sds(s: &ClusterState, c: &ClusterStatus, x: &crate::model::Sds) -> Value {
    let mut v = serde_json::to_value(x).unwrap_or(Value::Null);
    v["integrity"] = serde_json::to_value(c.sds_stats.get(&x.name).cloned().unwrap_or_default())
        .unwrap_or(Value::Null);
    v["protection_domain"] = json!(s.pds.get(&x.pd).map(|d| d.name.clone()));
    v["fault_set_name"] = json!(x
        .fault_set
        .and_then(|f| s.fault_sets.get(&f))
        .map(|f| f.name.clone()));
    let pgs: usize = s
        .pools
        .values()
        .map(|p| {
            p.pgs
                .iter()
                .filter(|m| {
                    m.primary == Some(x.id) || m.secondary == Some(x.id) || m.leaving == Some(x.id)
                })
                .count()
        })
        .sum();
    v["pg_copies"] = json!(pgs);
    let space = crate::capacity::sds_capacity_bytes(x);
    if let Some(st) = c.sds_stats.get(&x.name) {
        let stored = st.chunks_stored << 20;
        v["capacity"] = json!({
            "chunk_space_bytes": space, "stored_bytes": stored,
            "free_bytes": space.saturating_sub(stored),
            "used_percent": crate::capacity::percent(stored, space),
        });
    }
    v
}

/// A volume's space: what its V-tree has allocated (1 MiB chunks written to, one copy) against
/// its size; for a volume alone in its V-tree (no snapshots) that is the volume's own use, else
/// `--query_vtree` splits it among the members.
pub fn volume_capacity(s: &ClusterState, c: &ClusterStatus, v: &Volume) -> Value {
    let alone = s.vtree_members(v.vtree).count() == 1;
    match crate::capacity::vtree_allocated(&c.sds_stats, v.vtree) {
        None => Value::Null,
        Some(b) if alone => json!({
            "allocated_bytes": b,
            "free_bytes": v.size_bytes.saturating_sub(b),
            "allocated_percent": crate::capacity::percent(b, v.size_bytes),
        }),
        Some(b) => json!({"vtree_allocated_bytes": b}),
    }
}

/// A protection domain with its pools (as [`pool`]), fault sets and SDS by name.
pub fn protection_domain(s: &ClusterState, c: &ClusterStatus, pd: &ProtectionDomain) -> Value {
    let pools: Vec<Value> = s
        .pools
        .values()
        .filter(|p| p.pd == pd.id)
        .map(|p| pool(s, c, p))
        .collect();
    let sds: Vec<&str> = s
        .sds
        .values()
        .filter(|x| x.pd == pd.id)
        .map(|x| x.name.as_str())
        .collect();
    let fault_sets: Vec<&str> = s
        .fault_sets
        .values()
        .filter(|f| f.pd == pd.id)
        .map(|f| f.name.as_str())
        .collect();
    json!({"id": pd.id, "name": pd.name, "storage_pools": pools, "fault_sets": fault_sets, "sds": sds})
}

/// An SDC with its session (connected when heard within [`SDC_SESSION_MS`] by the leader).
pub fn sdc(c: &ClusterStatus, x: &Sdc) -> Value {
    let mut v = serde_json::to_value(x).unwrap_or(Value::Null);
    let seen = c.sdc_last_seen_ms.get(&x.id).copied();
    v["session_connected"] = json!(seen.is_some_and(|ms| ms <= SDC_SESSION_MS));
    v["last_heard_ms"] = json!(seen);
    v
}
