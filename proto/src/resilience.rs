//! "What would losing X do?": for every SDS, fault set and device, how many PGs it would leave
//! with one complete copy or none, how much data would need rebuilding and how long that
//! takes at the current copy rate; and which single losses the cluster cannot survive right
//! now (PGs left with no reachable copy). The MDM computes it for `--query_resilience`.
//!
//! Pure: from the map and the SDS's hellos, no I/O. A PG's complete copies are its primary
//! and its in-sync secondary (`PgMapping::in_sync_secondary`: during a rebalance, the copy
//! being replaced), each while its SDS is not down; a rebuilding secondary is not complete yet.
//! A failed device costs its SDS's copies in that device's pool (the MDM drops them all), so a
//! device counts as its SDS within one pool. Data to rebuild is what the lost SDS report
//! storing, shared out by capacity when an SDS serves several pools (an estimate).

use crate::capacity::sds_capacity_bytes;
use crate::model::{ClusterState, SdsState, StoragePool};
use crate::msg::SdsStats;
use crate::{PoolId, SdsId, CHUNK_SIZE};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What one loss would do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loss {
    /// `sds`, `fault_set` or `device`.
    pub kind: String,
    /// The SDS or fault set name; for a device, `SDS:PATH`.
    pub name: String,
    /// PGs that would have a single complete copy after the loss (those with one already, and
    /// untouched by it, included).
    pub pgs_single_copy: u64,
    /// PGs reachable now that would have no reachable copy after the loss: I/O to them would
    /// fail.
    pub pgs_unavailable: u64,
    /// Bytes the rebuild would have to copy (an estimate, see the module doc).
    pub rebuild_bytes: u64,
    /// `rebuild_bytes` at the copy rate, when one is known.
    pub rebuild_seconds: Option<u64>,
}

/// The whole answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resilience {
    /// Every SDS, fault set and device, worst first (unavailable PGs, then single-copy PGs).
    pub losses: Vec<Loss>,
    /// The losses that would leave PGs with no reachable copy: what the cluster cannot survive
    /// right now.
    pub cannot_survive: Vec<String>,
    /// PGs with a single complete copy, and with none, right now.
    pub pgs_single_copy_now: u64,
    pub pgs_unavailable_now: u64,
    /// The copy rate used for the times, bytes per second: the rebuild's measured rate while
    /// one runs, else the pools' rebuild policy over the SDS left (0: unknown).
    pub copy_bytes_per_sec: u64,
    /// `measured`, `policy` or `unknown` (a policy without a bandwidth limit).
    pub copy_rate_source: String,
}

/// The SDS whose copies of each PG of `pool` are complete and reachable.
fn complete_copies(s: &ClusterState, pool: &StoragePool) -> Vec<BTreeSet<SdsId>> {
    let up = |id: &SdsId| s.sds.get(id).is_some_and(|x| x.state != SdsState::Down);
    pool.pgs
        .iter()
        .map(|m| {
            [m.primary, m.in_sync_secondary()]
                .into_iter()
                .flatten()
                .filter(up)
                .collect()
        })
        .collect()
}

/// Single-copy and unavailable PGs of `pool` once the SDS in `lost` are gone.
fn count(copies: &[BTreeSet<SdsId>], lost: &BTreeSet<SdsId>) -> (u64, u64) {
    let (mut single, mut none) = (0, 0);
    for c in copies.iter().filter(|c| !c.is_empty()) {
        let left = c.iter().filter(|x| !lost.contains(x)).count();
        if left == 0 {
            none += 1;
        } else if left == 1 {
            single += 1;
        }
    }
    (single, none)
}

/// Analyze every single loss in `s` (`stats`: the SDS's last hellos, by name).
pub fn analyze(s: &ClusterState, stats: &BTreeMap<String, SdsStats>) -> Resilience {
    let copies: BTreeMap<PoolId, Vec<BTreeSet<SdsId>>> = s
        .pools
        .values()
        .map(|p| (p.id, complete_copies(s, p)))
        .collect();
    let mut r = Resilience::default();
    let none = BTreeSet::new();
    for c in copies.values() {
        r.pgs_single_copy_now += count(c, &none).0;
        r.pgs_unavailable_now += c.iter().filter(|c| c.is_empty()).count() as u64;
    }
    let measured: u64 = stats.values().map(|st| st.rebuild_bytes_per_sec).sum();
    // Bytes an SDS stores in `pool` (its share by capacity when it serves several pools).
    let stored_in = |id: SdsId, pool: Option<PoolId>| -> u64 {
        let Some(x) = s.sds.get(&id) else { return 0 };
        let bytes = stats
            .get(&x.name)
            .map_or(0, |st| st.chunks_stored.saturating_mul(CHUNK_SIZE));
        match pool {
            None => bytes,
            Some(p) => {
                let total = sds_capacity_bytes(x);
                let here = x.capacity_in(p);
                if total == 0 {
                    0
                } else {
                    (u128::from(bytes) * u128::from(here) / u128::from(total)) as u64
                }
            }
        }
    };
    // The rate a rebuild after losing `lost` would copy at.
    let policy_rate = |lost: &BTreeSet<SdsId>| -> Option<u64> {
        let mut rate = 0u64;
        for p in s.pools.values() {
            if p.rebuild_policy.bandwidth_mib_s == 0 {
                return None;
            }
            let sources = s
                .sds
                .values()
                .filter(|x| x.pd == p.pd && x.state != SdsState::Down && !lost.contains(&x.id))
                .count() as u64;
            rate = rate.max(u64::from(p.rebuild_policy.bandwidth_mib_s) * (1 << 20) * sources);
        }
        Some(rate)
    };
    let rate_of = |lost: &BTreeSet<SdsId>| {
        if measured > 0 {
            Some(measured)
        } else {
            policy_rate(lost)
        }
    };
    let source = match (measured > 0, policy_rate(&none).is_some()) {
        (true, _) => "measured",
        (false, true) => "policy",
        (false, false) => "unknown",
    };
    r.copy_bytes_per_sec = rate_of(&none).unwrap_or(0);
    r.copy_rate_source = source.into();

    let mut loss = |kind: &str, name: String, lost: BTreeSet<SdsId>, pool: Option<PoolId>| {
        let (mut single, mut gone) = (0, 0);
        for (p, c) in &copies {
            if pool.is_none_or(|only| only == *p) {
                let (a, b) = count(c, &lost);
                single += a;
                gone += b;
            }
        }
        let bytes: u64 = lost.iter().map(|id| stored_in(*id, pool)).sum();
        let seconds = rate_of(&lost)
            .filter(|r| *r > 0)
            .map(|rate| bytes.div_ceil(rate));
        r.losses.push(Loss {
            kind: kind.into(),
            name,
            pgs_single_copy: single,
            pgs_unavailable: gone,
            rebuild_bytes: bytes,
            rebuild_seconds: seconds,
        });
    };
    for x in s.sds.values().filter(|x| x.state != SdsState::Down) {
        loss("sds", x.name.clone(), BTreeSet::from([x.id]), None);
        for d in &x.devices {
            loss(
                "device",
                format!("{}:{}", x.name, d.path),
                BTreeSet::from([x.id]),
                Some(d.pool),
            );
        }
    }
    for f in s.fault_sets.values() {
        let members: BTreeSet<SdsId> = s
            .sds
            .values()
            .filter(|x| x.fault_set == Some(f.id) && x.state != SdsState::Down)
            .map(|x| x.id)
            .collect();
        loss("fault_set", f.name.clone(), members, None);
    }
    r.losses.sort_by(|a, b| {
        (b.pgs_unavailable, b.pgs_single_copy, &a.kind, &a.name).cmp(&(
            a.pgs_unavailable,
            a.pgs_single_copy,
            &b.kind,
            &b.name,
        ))
    });
    r.cannot_survive = r
        .losses
        .iter()
        .filter(|l| l.pgs_unavailable > 0)
        .map(|l| format!("{} {}", l.kind, l.name))
        .collect();
    r
}
