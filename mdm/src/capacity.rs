//! Thick-volume admission: can a pool honour a thick reservation, on every SDS? Pure functions
//! of the cluster map and the thin data each SDS stores; no I/O, no clock.
//!
//! A chunk's PG decides which SDS hold it, so an SDS holding `k` of a pool's `g` PGs (as
//! primary, secondary or leaving copy) stores about `n·k/g` of an `n`-chunk volume's chunks.
//! Hashing spreads chunks over PGs binomially, so the reservation is that mean plus four
//! standard deviations, never more than `n` ([`reserved_chunks`]): an SDS almost never has to
//! hold more than the MDM reserved on it (and if it does, it reports the chunks it could not
//! allocate). A thick create or growth is accepted only when
//! - the pool's raw capacity holds two copies of every thick volume plus all thin data, and
//! - every SDS holding PGs of the pool holds its reservations for every thick volume (of any
//!   pool: an SDS's devices are one chunk space) plus the thin data it stores.
//!
//! The leader runs the whole check before proposing, with the thin data the SDS report in their
//! hellos, one thick command at a time (so concurrent creates cannot both take the last room).
//! The state machine checks again only the pool's raw capacity against thick volumes
//! ([`pool_fits`]): thin data is not in the log, and this is the rule older versions applied,
//! so replaying their logs gives the same state. Neither changes anything when refusing.

use proto::capacity::{human, sds_capacity_bytes, thin_used_bytes};
use proto::model::{ClusterState, Sds, SdsState};
use proto::msg::{Command, SdsStats};
use proto::{ErrorCode, PoolId, SdsId, VolumeId, WireError, CHUNK_SIZE};
use std::collections::{BTreeMap, HashMap};

/// Standard deviations above the mean a reservation covers.
const SIGMAS: u128 = 4;

/// Conservative count of an `chunks`-chunk volume's chunks on an SDS that holds `held` of the
/// pool's `pg_count` PGs: the binomial mean plus [`SIGMAS`] standard deviations plus one,
/// capped at `chunks`.
pub fn reserved_chunks(chunks: u64, held: u32, pg_count: u32) -> u64 {
    if held == 0 || pg_count == 0 || chunks == 0 {
        return 0;
    }
    let (n, k, g) = (
        u128::from(chunks),
        u128::from(held.min(pg_count)),
        u128::from(pg_count),
    );
    let mean = (n * k).div_ceil(g);
    // sigma = sqrt(n·p·(1-p)) with p = k/g, so SIGMAS·sigma = sqrt(SIGMAS²·n·k·(g-k)) / g.
    let margin = (SIGMAS * SIGMAS * n * k * (g - k)).isqrt().div_ceil(g) + 1;
    (mean + margin).min(n) as u64
}

/// What one SDS must fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SdsRoom {
    pub name: String,
    /// PGs of the checked pool it holds, of `pg_count`.
    pub held: u32,
    pub pg_count: u32,
    /// Its chunk space over all usable devices, bytes.
    pub capacity_bytes: u64,
    /// Thin data it stores, bytes.
    pub thin_bytes: u64,
    /// Reserved for the other thick volumes (of any pool), bytes.
    pub thick_bytes: u64,
    /// Reserved for the volume being checked, bytes.
    pub need_bytes: u64,
}

/// The pool as a whole (raw bytes: both copies).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRoom {
    pub name: String,
    pub raw_bytes: u64,
    pub thin_bytes: u64,
    /// Two copies of the other thick volumes of the pool.
    pub thick_bytes: u64,
    /// Two copies of the volume being checked (of its growth, for a resize).
    pub need_bytes: u64,
}

/// Why a thick reservation does not fit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Shortfall {
    #[error("Not enough capacity in storage pool {}: the thick volume needs {} of raw capacity (two copies) and {} is free (raw {}, thin data {}, other thick volumes {}). Nothing was changed", .0.name, human(.0.need_bytes), human(free_in_pool(.0)), human(.0.raw_bytes), human(.0.thin_bytes), human(.0.thick_bytes))]
    Pool(PoolRoom),
    #[error("Not enough capacity on SDS {} for the thick volume: it holds {} of the pool's {} PGs, so it must reserve up to {} and has {} free (capacity {}, thin data {}, other thick volumes {}). Nothing was changed", .0.name, .0.held, .0.pg_count, human(.0.need_bytes), human(free_on_sds(.0)), human(.0.capacity_bytes), human(.0.thin_bytes), human(.0.thick_bytes))]
    Sds(SdsRoom),
}

fn free_in_pool(p: &PoolRoom) -> u64 {
    p.raw_bytes
        .saturating_sub(p.thin_bytes)
        .saturating_sub(p.thick_bytes)
}

fn free_on_sds(x: &SdsRoom) -> u64 {
    x.capacity_bytes
        .saturating_sub(x.thin_bytes)
        .saturating_sub(x.thick_bytes)
}

/// The fit rule: the pool, then each SDS, must have what the volume needs free.
pub fn check(pool: &PoolRoom, sds: &[SdsRoom]) -> Result<(), Shortfall> {
    if pool.need_bytes > free_in_pool(pool) {
        return Err(Shortfall::Pool(pool.clone()));
    }
    match sds.iter().find(|x| x.need_bytes > free_on_sds(x)) {
        Some(x) => Err(Shortfall::Sds(x.clone())),
        None => Ok(()),
    }
}

/// PGs each SDS holds in `pool` (primary, secondary or leaving copy).
fn held_pgs(s: &ClusterState, pool: PoolId) -> HashMap<SdsId, u32> {
    let mut held = HashMap::new();
    if let Some(p) = s.pools.get(&pool) {
        for m in &p.pgs {
            for id in [m.primary, m.secondary, m.leaving].into_iter().flatten() {
                *held.entry(id).or_insert(0) += 1;
            }
        }
    }
    held
}

/// The rooms for a thick volume of `size` bytes in `pool` (`resized`: the volume being grown,
/// counted at `size` instead of its current size). `thin` gives the thin bytes an SDS stores.
pub fn rooms(
    s: &ClusterState,
    pool: PoolId,
    resized: Option<VolumeId>,
    size: u64,
    thin: &dyn Fn(&Sds) -> u64,
) -> (PoolRoom, Vec<SdsRoom>) {
    let held: HashMap<PoolId, HashMap<SdsId, u32>> =
        s.pools.keys().map(|p| (*p, held_pgs(s, *p))).collect();
    let pg_count = |p: PoolId| s.pools.get(&p).map_or(0, |x| x.pg_count);
    let others: Vec<_> = s
        .volumes
        .values()
        .filter(|v| !v.thin && Some(v.id) != resized)
        .collect();
    let chunks = size.div_ceil(CHUNK_SIZE);
    let grown = resized
        .and_then(|id| s.volumes.get(&id))
        .map_or(0, |v| v.size_bytes);
    let in_pool = |x: &Sds| x.devices.iter().any(|d| d.pool == pool);
    let pool_room = PoolRoom {
        name: s
            .pools
            .get(&pool)
            .map_or_else(String::new, |p| p.name.clone()),
        raw_bytes: s.pool_raw_capacity(pool),
        thin_bytes: s.sds.values().filter(|x| in_pool(x)).map(thin).sum(),
        thick_bytes: others
            .iter()
            .filter(|v| v.pool == pool)
            .map(|v| v.size_bytes.saturating_mul(2))
            .sum::<u64>()
            .saturating_add(grown.saturating_mul(2)),
        need_bytes: size.saturating_sub(grown).saturating_mul(2),
    };
    let mut out = Vec::new();
    for x in s.sds.values() {
        let k = held
            .get(&pool)
            .and_then(|h| h.get(&x.id))
            .copied()
            .unwrap_or(0);
        if k == 0 {
            continue;
        }
        let thick: u64 = others
            .iter()
            .map(|v| {
                let kv = held
                    .get(&v.pool)
                    .and_then(|h| h.get(&x.id))
                    .copied()
                    .unwrap_or(0);
                reserved_chunks(v.size_bytes.div_ceil(CHUNK_SIZE), kv, pg_count(v.pool))
            })
            .sum();
        out.push(SdsRoom {
            name: x.name.clone(),
            held: k,
            pg_count: pg_count(pool),
            capacity_bytes: sds_capacity_bytes(x),
            thin_bytes: thin(x),
            thick_bytes: thick.saturating_mul(CHUNK_SIZE),
            need_bytes: reserved_chunks(chunks, k, pg_count(pool)).saturating_mul(CHUNK_SIZE),
        });
    }
    (pool_room, out)
}

/// Whether `pool` can hold a thick volume of `size` bytes (`resized`: an existing volume grown
/// to `size`), with `thin` the thin bytes each SDS stores. `NoSpace` with what is needed and
/// free when not.
pub fn thick_fits(
    s: &ClusterState,
    pool: PoolId,
    resized: Option<VolumeId>,
    size: u64,
    thin: &dyn Fn(&Sds) -> u64,
) -> Result<(), WireError> {
    let (p, x) = rooms(s, pool, resized, size, thin);
    check(&p, &x).map_err(|e| WireError::new(ErrorCode::NoSpace, e.to_string()))
}

/// The state machine's check: two copies of every thick volume of `pool` (with `resized` at
/// `size`, or a new one of `size`) within its raw capacity. Deterministic: no thin data.
pub fn pool_fits(
    s: &ClusterState,
    pool: PoolId,
    resized: Option<VolumeId>,
    size: u64,
) -> Result<(), WireError> {
    let (p, _) = rooms(s, pool, resized, size, &|_| 0);
    check(&p, &[]).map_err(|e| WireError::new(ErrorCode::NoSpace, e.to_string()))
}

/// The leader's check of a command before proposing it: a thick create or growth must fit with
/// the thin data the SDS report (`stats` by SDS name). Anything else, and commands the state
/// machine will refuse anyway (unknown names, bad sizes), pass. `Unavailable` while a working
/// SDS of the pool has not reported its usage to this leader yet.
pub fn check_command(
    s: &ClusterState,
    stats: &BTreeMap<String, SdsStats>,
    command: &Command,
) -> Result<(), WireError> {
    let (pool, resized, size) = match command {
        Command::AddVolume {
            pool,
            size_bytes,
            thin: false,
            ..
        } => match s.pool_by_name(pool) {
            Some(p) => (p.id, None, *size_bytes),
            None => return Ok(()),
        },
        Command::ModifyVolumeCapacity { name, size_bytes } => match s.volume_by_name(name) {
            Some(v) if !v.thin && *size_bytes > v.size_bytes => (v.pool, Some(v.id), *size_bytes),
            _ => return Ok(()),
        },
        _ => return Ok(()),
    };
    let size = size.div_ceil(CHUNK_SIZE).saturating_mul(CHUNK_SIZE);
    let silent = s.sds.values().find(|x| {
        x.state == SdsState::Normal
            && x.devices.iter().any(|d| d.pool == pool)
            && !stats.contains_key(&x.name)
    });
    if let Some(x) = silent {
        return Err(WireError::new(
            ErrorCode::Unavailable,
            format!(
                "The MDM leader has not heard SDS {}'s usage yet (it reports with every hello); retry in a moment",
                x.name
            ),
        ));
    }
    thick_fits(s, pool, resized, size, &|x: &Sds| {
        stats.get(&x.name).map_or(0, thin_used_bytes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn reservations_cover_the_spread_of_chunks() {
        // (chunks, PGs held, PG count, reserved)
        for (n, k, g, want) in [
            (0, 10, 64, 0),
            (100, 0, 64, 0),
            (100, 64, 64, 100),           // holds every PG: every chunk
            (16, 43, 64, 16),             // small volumes: all of it
            (48, 43, 64, 47),             // mean 33, four sigmas and one: 14
            (1 << 20, 128, 256, 526_337), // 1 TiB: mean 524288, margin 2049
            (1 << 20, 170, 256, 698_256),
        ] {
            assert_eq!(reserved_chunks(n, k, g), want, "{n} chunks, {k} of {g} PGs");
        }
    }

    #[test]
    fn reservations_hold_the_real_spread() {
        // Count the chunks of a few volumes on an SDS holding the first k PGs: never above
        // the reservation.
        for vtree in 1..=20u64 {
            for (n, k, g) in [(64u64, 43u32, 64u32), (4096, 21, 64), (10_000, 171, 256)] {
                let on = (0..n)
                    .filter(|i| {
                        let c = proto::ChunkId::new(proto::VtreeId(vtree), proto::ChunkIndex(*i));
                        c.pg(g).0 < k
                    })
                    .count() as u64;
                assert!(on <= reserved_chunks(n, k, g), "vtree {vtree}: {on} chunks");
            }
        }
    }

    fn pool(raw: u64, thin: u64, thick: u64, need: u64) -> PoolRoom {
        PoolRoom {
            name: "sp1".into(),
            raw_bytes: raw * MIB,
            thin_bytes: thin * MIB,
            thick_bytes: thick * MIB,
            need_bytes: need * MIB,
        }
    }

    fn sds(name: &str, cap: u64, thin: u64, thick: u64, need: u64) -> SdsRoom {
        SdsRoom {
            name: name.into(),
            held: 43,
            pg_count: 64,
            capacity_bytes: cap * MIB,
            thin_bytes: thin * MIB,
            thick_bytes: thick * MIB,
            need_bytes: need * MIB,
        }
    }

    #[test]
    fn fit_table() {
        // (case, pool, SDS, Ok or the SDS / "pool" refused)
        let cases: Vec<(&str, PoolRoom, Vec<SdsRoom>, Option<&str>)> = vec![
            (
                "empty pool",
                pool(300, 0, 0, 96),
                vec![sds("a", 100, 0, 0, 48), sds("b", 100, 0, 0, 48)],
                None,
            ),
            (
                "exactly full",
                pool(300, 0, 0, 300),
                vec![sds("a", 100, 0, 0, 100)],
                None,
            ),
            (
                "thin data counts",
                pool(300, 250, 0, 96),
                vec![sds("a", 100, 80, 0, 48)],
                Some("pool"),
            ),
            (
                "other thick volumes count",
                pool(300, 0, 250, 96),
                vec![sds("a", 100, 0, 80, 48)],
                Some("pool"),
            ),
            (
                "the pool has room but one SDS is full of thin data",
                pool(300, 100, 0, 96),
                vec![sds("a", 100, 10, 0, 48), sds("b", 100, 60, 0, 48)],
                Some("b"),
            ),
            (
                "one SDS holds others' reservations",
                pool(300, 0, 96, 96),
                vec![sds("a", 100, 0, 48, 48), sds("b", 100, 0, 60, 48)],
                Some("b"),
            ),
            (
                "overcommitted already: nothing free, saturating",
                pool(100, 150, 0, 2),
                vec![sds("a", 50, 80, 0, 1)],
                Some("pool"),
            ),
            (
                "growth by nothing fits anywhere",
                pool(100, 100, 0, 0),
                vec![sds("a", 50, 50, 0, 0)],
                None,
            ),
        ];
        for (case, p, x, want) in cases {
            let got = check(&p, &x);
            match (want, got) {
                (None, Ok(())) => {}
                (Some("pool"), Err(Shortfall::Pool(_))) => {}
                (Some(name), Err(Shortfall::Sds(r))) if r.name == name => {}
                (want, got) => panic!("{case}: want {want:?}, got {got:?}"),
            }
        }
    }

    /// Pool 1 of 4 PGs over SDS 1..=3 (`pgs`: primary, secondary), each with `cap_mib`.
    fn state(pgs: &[(u64, u64)], cap_mib: u64) -> ClusterState {
        use proto::model::*;
        use proto::*;
        let mut s = ClusterState::default();
        s.pools.insert(
            PoolId(1),
            StoragePool {
                id: PoolId(1),
                name: "sp1".into(),
                pd: PdId(1),
                media_type: String::new(),
                pg_count: pgs.len() as u32,
                epoch: Epoch(1),
                pgs: pgs
                    .iter()
                    .map(|(p, q)| PgMapping {
                        primary: Some(SdsId(*p)),
                        secondary: Some(SdsId(*q)),
                        ..PgMapping::default()
                    })
                    .collect(),
                rebuild_policy: RebuildPolicy::default(),
            },
        );
        for i in 1..=3 {
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
                        capacity_bytes: cap_mib * MIB,
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
        s
    }

    fn thick(s: &mut ClusterState, id: u64, mib: u64) {
        use proto::model::Volume;
        s.volumes.insert(
            VolumeId(id),
            Volume {
                id: VolumeId(id),
                name: format!("v{id}"),
                pool: PoolId(1),
                size_bytes: mib * MIB,
                thin: false,
                vtree: proto::VtreeId(id),
                created_unix: 0,
                labels: Default::default(),
                preempt: false,
                layer: Default::default(),
                snapshot: None,
            },
        );
    }

    #[test]
    fn rooms_follow_the_pgs_each_sds_holds() {
        // sds1 holds all 4 PGs, sds2 three, sds3 one.
        let mut s = state(&[(1, 2), (2, 1), (1, 2), (3, 1)], 100);
        thick(&mut s, 7, 10);
        let thin = |x: &Sds| if x.name == "sds2" { 30 * MIB } else { 0 };
        let (p, rooms) = rooms(&s, PoolId(1), None, 20 * MIB, &thin);
        assert_eq!(p.raw_bytes, 300 * MIB);
        assert_eq!(p.thin_bytes, 30 * MIB);
        assert_eq!(p.thick_bytes, 20 * MIB);
        assert_eq!(p.need_bytes, 40 * MIB);
        let held: Vec<(String, u32, u64, u64)> = rooms
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.held,
                    r.thick_bytes / MIB,
                    r.need_bytes / MIB,
                )
            })
            .collect();
        // Small volumes: the mean plus four sigmas covers all of them, but on sds3 (one PG
        // of four) of the new 20 MiB volume.
        assert_eq!(
            held,
            vec![
                ("sds1".to_string(), 4, 10, 20),
                ("sds2".to_string(), 3, 10, 20),
                ("sds3".to_string(), 1, 10, 14),
            ]
        );
        assert_eq!(rooms[1].thin_bytes, 30 * MIB);
        assert!(thick_fits(&s, PoolId(1), None, 20 * MIB, &thin).is_ok());
        // 75 MiB more on sds2 (30 thin + 10 thick + 75 > 100): refused there.
        let e = thick_fits(&s, PoolId(1), None, 75 * MIB, &thin).expect_err("sds2 is short");
        assert_eq!(e.code, ErrorCode::NoSpace);
        assert!(e.message.contains("SDS sds2"), "{}", e.message);
        // The state machine's check sees only the pool: 2 x (10 + 75) <= 300.
        pool_fits(&s, PoolId(1), None, 75 * MIB).expect("the pool has room");
        let e = pool_fits(&s, PoolId(1), None, 141 * MIB).expect_err("2 x 151 > 300");
        assert!(e.message.contains("storage pool sp1"), "{}", e.message);
        // Growing v7 to 60 MiB counts it once, at its new size: 30 + 60 <= 100.
        assert!(thick_fits(&s, PoolId(1), Some(VolumeId(7)), 60 * MIB, &thin).is_ok());
        let e = thick_fits(&s, PoolId(1), Some(VolumeId(7)), 80 * MIB, &thin)
            .expect_err("30 thin + 80 > 100 on sds2");
        assert!(e.message.contains("SDS sds2"), "{}", e.message);
    }

    #[test]
    fn the_leader_counts_reported_thin_data_and_waits_for_reports() {
        let s = state(&[(1, 2), (2, 3), (3, 1), (1, 3)], 100);
        let volume = |mib: u64, thin: bool| Command::AddVolume {
            pool: "sp1".into(),
            name: "t".into(),
            size_bytes: mib * MIB,
            thin,
            labels: Default::default(),
            preempt: false,
        };
        let add = |mib: u64| volume(mib, false);
        let report = |chunks: u64, thick: u64| SdsStats {
            chunks_stored: chunks,
            thick_chunks_stored: thick,
            ..SdsStats::default()
        };
        let mut stats = BTreeMap::new();
        stats.insert("sds1".to_string(), report(0, 0));
        stats.insert("sds2".to_string(), report(0, 0));
        let e = check_command(&s, &stats, &add(10)).expect_err("sds3 unheard");
        assert_eq!(e.code, ErrorCode::Unavailable);
        stats.insert("sds3".to_string(), report(95, 0));
        let e = check_command(&s, &stats, &add(10)).expect_err("sds3 is full of thin data");
        assert!(e.message.contains("SDS sds3"), "{}", e.message);
        // Its chunks are a thick volume's: not thin data.
        stats.insert("sds3".to_string(), report(95, 95));
        check_command(&s, &stats, &add(10)).expect("fits");
        // Thin volumes and unknown pools are the state machine's business.
        check_command(&s, &stats, &volume(10_000, true)).expect("thin");
    }

    #[test]
    fn refusals_say_what_is_needed_and_free() {
        let e = check(
            &pool(300, 100, 0, 96),
            &[sds("a", 100, 10, 0, 48), sds("b", 100, 60, 0, 48)],
        )
        .expect_err("b is short");
        let m = e.to_string();
        assert!(m.contains("SDS b"), "{m}");
        assert!(m.contains("43 of the pool's 64 PGs"), "{m}");
        assert!(m.contains("reserve up to 48 MiB"), "{m}");
        assert!(m.contains("has 40 MiB free"), "{m}");
        assert!(m.contains("thin data 60 MiB"), "{m}");
        assert!(m.contains("Nothing was changed"), "{m}");
        let e = check(&pool(300, 250, 0, 96), &[]).expect_err("pool short");
        let m = e.to_string();
        assert!(m.contains("needs 96 MiB"), "{m}");
        assert!(m.contains("50 MiB is free"), "{m}");
    }
}
