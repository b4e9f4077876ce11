//! A storage pool's capacity as operators see it, shared by the MDM (metrics, thick admission)
//! and scli (`--query_storage_pool`): raw capacity, thin data stored, space reserved by thick
//! volumes, what is free, and a warning state raised before the pool is full; and its rebuild
//! progress ([`pool_rebuild`]): what is left to copy, at what rate, and when it should end.
//!
//! Pure: computed from the cluster map and the usage the SDS report in their hellos
//! ([`SdsStats`]); no I/O, no clock. An SDS keeps all its devices as one chunk space, so its
//! thin data counts against every pool it has devices in (exact for the usual one pool per SDS,
//! conservative otherwise).

use crate::model::{ClusterState, DeviceState, Sds};
use crate::msg::SdsStats;
use crate::{PoolId, CHUNK_SIZE};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Used share of a pool (or of its fullest SDS) from which the pool is in `Warning`.
pub const WARNING_PERCENT: u64 = 80;
/// Used share from which the pool is `Critical`.
pub const CRITICAL_PERCENT: u64 = 90;

/// How close a pool is to running out of space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CapacityState {
    #[default]
    Normal,
    /// At least [`WARNING_PERCENT`] used.
    Warning,
    /// At least [`CRITICAL_PERCENT`] used.
    Critical,
    /// Nothing left: thin writes that need a new chunk get ENOSPC.
    Full,
}

impl CapacityState {
    /// The state of `used` out of `total` bytes (`Normal` when there is no capacity at all:
    /// the PG state says `NoCapacity` then).
    pub fn of(used: u64, total: u64) -> CapacityState {
        match percent(used, total) {
            _ if total == 0 => CapacityState::Normal,
            _ if used >= total => CapacityState::Full,
            p if p >= CRITICAL_PERCENT => CapacityState::Critical,
            p if p >= WARNING_PERCENT => CapacityState::Warning,
            _ => CapacityState::Normal,
        }
    }

    /// 0 (Normal) to 3 (Full), for a metric.
    pub fn level(self) -> i64 {
        self as i64
    }
}

impl fmt::Display for CapacityState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// `used` as a whole percentage of `total` (0 when `total` is 0), rounded down.
pub fn percent(used: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    (u128::from(used) * 100 / u128::from(total)).min(u128::from(u64::MAX)) as u64
}

/// A pool's capacity. Every byte count is raw (both copies of the data).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCapacity {
    /// Devices of the pool that are neither failed nor being removed.
    pub raw_bytes: u64,
    /// Chunks of thin volumes (and anything not yet known as thick) the pool's SDS store.
    pub thin_used_bytes: u64,
    /// Two copies of every thick volume of the pool, allocated or not.
    pub thick_reserved_bytes: u64,
    /// `raw - thin - thick`, at least 0.
    pub free_bytes: u64,
    /// `(thin + thick) / raw` in percent.
    pub used_percent: u64,
    /// The fullest SDS of the pool: chunks stored out of its chunk space, in percent.
    pub fullest_sds_percent: u64,
    /// From the larger of `used_percent` and `fullest_sds_percent`.
    pub state: CapacityState,
    /// Chunks of thick volumes the pool's SDS hold but could not allocate (devices full): such
    /// a volume's writes can fail with ENOSPC. Should be 0.
    pub thick_chunks_no_space: u64,
    /// SDS of the pool whose usage the MDM has not heard (counted as storing nothing).
    pub sds_unreported: u32,
    /// What the pool has promised: the sizes of its volumes and snapshots added up (one copy).
    #[serde(default)]
    pub provisioned_bytes: u64,
    /// What it has: half the raw capacity (every chunk is stored twice).
    #[serde(default)]
    pub usable_bytes: u64,
    /// `provisioned / usable` in percent (above 100: thin provisioning promised more than the
    /// pool holds).
    #[serde(default)]
    pub provisioned_percent: u64,
}

/// Bytes an SDS reports storing for thin volumes (every chunk that is not a thick volume's).
pub fn thin_used_bytes(st: &SdsStats) -> u64 {
    st.chunks_stored
        .saturating_sub(st.thick_chunks_stored)
        .saturating_mul(CHUNK_SIZE)
}

/// An SDS's chunk space over all its usable devices (any pool): what its thin data and thick
/// reservations share.
pub fn sds_capacity_bytes(x: &Sds) -> u64 {
    x.devices
        .iter()
        .filter(|d| d.state != DeviceState::Failed && d.state != DeviceState::Removing)
        .map(|d| d.capacity_bytes)
        .sum()
}

/// The capacity of `pool` in `s`, with the usage the SDS reported (`stats` by SDS name).
pub fn pool_capacity(
    s: &ClusterState,
    stats: &BTreeMap<String, SdsStats>,
    pool: PoolId,
) -> PoolCapacity {
    let raw = s.pool_raw_capacity(pool);
    let thick = s.pool_thick_reserved(pool);
    let mut c = PoolCapacity {
        raw_bytes: raw,
        thick_reserved_bytes: thick,
        ..PoolCapacity::default()
    };
    for x in s
        .sds
        .values()
        .filter(|x| x.devices.iter().any(|d| d.pool == pool))
    {
        let Some(st) = stats.get(&x.name) else {
            c.sds_unreported += 1;
            continue;
        };
        c.thin_used_bytes = c.thin_used_bytes.saturating_add(thin_used_bytes(st));
        c.thick_chunks_no_space += st.thick_chunks_no_space;
        let stored = st.chunks_stored.saturating_mul(CHUNK_SIZE);
        let cap = sds_capacity_bytes(x);
        if cap > 0 {
            c.fullest_sds_percent = c.fullest_sds_percent.max(percent(stored, cap));
        }
    }
    c.provisioned_bytes = s
        .volumes
        .values()
        .filter(|v| v.pool == pool)
        .fold(0u64, |a, v| a.saturating_add(v.size_bytes));
    c.usable_bytes = raw / 2;
    c.provisioned_percent = percent(c.provisioned_bytes, c.usable_bytes);
    let used = c.thin_used_bytes.saturating_add(thick);
    c.free_bytes = raw.saturating_sub(used);
    c.used_percent = percent(used, raw);
    let worst = c.used_percent.max(c.fullest_sds_percent);
    c.state = CapacityState::of(worst, 100);
    if raw == 0 {
        c.state = CapacityState::Normal;
    }
    c
}

/// A pool's rebuild and rebalance progress, from its SDS's hellos.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildProgress {
    /// PGs being copied right now.
    pub pgs_copying: u64,
    /// PGs not fully protected yet: rebuilding, degraded or rebalancing.
    pub pgs_left: u64,
    /// Bytes the copy sources still have to visit (an upper bound: chunks both copies lack
    /// are skipped).
    pub bytes_left_at_most: u64,
    /// Copy rate over the SDS's last hello interval, bytes per second.
    pub bytes_per_sec: u64,
    /// `bytes_left_at_most / bytes_per_sec`, while something is copied.
    pub eta_seconds: Option<u64>,
}

/// Rebuild progress of pool `pool`, as the SDS of its protection domain report it (an SDS
/// serving several pools counts in each).
pub fn pool_rebuild(
    s: &ClusterState,
    stats: &BTreeMap<String, SdsStats>,
    pool: PoolId,
) -> RebuildProgress {
    let Some(p) = s.pools.get(&pool) else {
        return RebuildProgress::default();
    };
    let mut r = RebuildProgress::default();
    for x in s.sds.values().filter(|x| x.pd == p.pd) {
        if let Some(st) = stats.get(&x.name) {
            r.pgs_copying += st.rebuild_pgs_active;
            r.bytes_left_at_most += st.rebuild_chunks_left * CHUNK_SIZE;
            r.bytes_per_sec += st.rebuild_bytes_per_sec;
        }
    }
    let h = s.pool_health(p);
    r.pgs_left = u64::from(h.rebuilding_pgs + h.degraded_pgs + h.rebalancing_pgs);
    r.eta_seconds = (r.bytes_per_sec > 0).then(|| r.bytes_left_at_most / r.bytes_per_sec);
    r
}

/// Bytes allocated to V-tree `vtree` (one copy: each chunk is stored twice), from what the SDS
/// last reported; `None` before any SDS reported.
pub fn vtree_allocated(stats: &BTreeMap<String, SdsStats>, vtree: crate::VtreeId) -> Option<u64> {
    if stats.is_empty() {
        return None;
    }
    let copies: u64 = stats
        .values()
        .flat_map(|s| s.vtree_chunks.iter())
        .filter(|(t, _)| *t == vtree)
        .map(|(_, n)| n)
        .sum();
    Some(copies.div_ceil(2) * CHUNK_SIZE)
}

/// A size for messages: MiB below 10 GiB, else GB with two decimals.
pub fn human(bytes: u64) -> String {
    if bytes < 10 << 30 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{:.2} GB", bytes as f64 / (1u64 << 30) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_by_share_used() {
        for (used, total, want) in [
            (0, 0, CapacityState::Normal),
            (79, 100, CapacityState::Normal),
            (80, 100, CapacityState::Warning),
            (89, 100, CapacityState::Warning),
            (90, 100, CapacityState::Critical),
            (99, 100, CapacityState::Critical),
            (100, 100, CapacityState::Full),
            (120, 100, CapacityState::Full),
            (u64::MAX, u64::MAX, CapacityState::Full),
        ] {
            assert_eq!(CapacityState::of(used, total), want, "{used} of {total}");
        }
    }

    #[test]
    fn pool_capacity_from_the_map_and_the_hellos() {
        use crate::model::*;
        use crate::*;
        const MIB: u64 = 1 << 20;
        let mut s = ClusterState::default();
        for i in 1..=2 {
            s.sds.insert(
                SdsId(i),
                Sds {
                    id: SdsId(i),
                    name: format!("sds{i}"),
                    addr: String::new(),
                    pd: PdId(1),
                    fault_set: None,
                    devices: vec![Device {
                        id: DeviceId(10 + i),
                        path: "/dev/x".into(),
                        pool: PoolId(1),
                        capacity_bytes: 100 * MIB,
                        state: DeviceState::Normal,
                        error: String::new(),
                        cleared_error: String::new(),
                    }],
                    state: SdsState::Normal,
                    removing: false,
                    boot: String::new(),
                    cert_name: None,
                },
            );
        }
        s.volumes.insert(
            VolumeId(5),
            Volume {
                id: VolumeId(5),
                name: "t".into(),
                pool: PoolId(1),
                size_bytes: 20 * MIB,
                thin: false,
                vtree: VtreeId(5),
                created_unix: 0,
                labels: Default::default(),
                preempt: false,
                layer: Default::default(),
                snapshot: None,
            },
        );
        let report = |stored: u64, thick: u64| SdsStats {
            chunks_stored: stored,
            thick_chunks_stored: thick,
            ..SdsStats::default()
        };
        let mut stats = BTreeMap::new();
        stats.insert("sds1".to_string(), report(30, 20));
        let c = pool_capacity(&s, &stats, PoolId(1));
        assert_eq!(c.raw_bytes, 200 * MIB);
        assert_eq!(c.thick_reserved_bytes, 40 * MIB);
        assert_eq!(c.thin_used_bytes, 10 * MIB);
        assert_eq!(c.free_bytes, 150 * MIB);
        assert_eq!((c.used_percent, c.state), (25, CapacityState::Normal));
        assert_eq!(c.sds_unreported, 1);
        // The pool is 57% used but sds2 is 85% full: a warning.
        stats.insert("sds2".to_string(), report(85, 20));
        let c = pool_capacity(&s, &stats, PoolId(1));
        assert_eq!((c.used_percent, c.fullest_sds_percent), (57, 85));
        assert_eq!(c.state, CapacityState::Warning);
        stats.insert("sds2".to_string(), report(100, 20));
        assert_eq!(
            pool_capacity(&s, &stats, PoolId(1)).state,
            CapacityState::Full
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 MiB");
        assert_eq!(human(48 << 20), "48 MiB");
        assert_eq!(human(10 << 30), "10.00 GB");
    }
}
