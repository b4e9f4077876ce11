//! The cluster map as this SDS caches it, and the fence every data request passes: epoch and
//! placement-group checks.
//!
//! PERFORMANCE-CRITICAL: [`check`] runs per request; it is a pure function of the cached map.
//!
//! **Invariant**: this SDS never acts on a request whose epoch is older than the newest epoch
//! it has seen for the pool. Seen epochs only grow ([`MapCache::install`] keeps a per-pool
//! high-water mark and never installs an older map version), so a primary that lost its role
//! cannot be driven by an SDC or peer that still routes with the old map. A request from a
//! newer epoch than the cached map makes the SDS fetch the map first.
//!
//! The MDM is the only writer of the map; [`crate::mdm_client`] installs what it fetches here,
//! with the map's [`FenceIndex`] ([`MapSnapshot`]), so the mapping fence of each request is a
//! lookup by generation whatever the number of volumes and mappings.

use proto::data::DataHeader;
use proto::fence::FenceIndex;
use proto::model::{ClusterState, FenceCheck};
use proto::{ChunkId, Epoch, PgId, PoolId, SdsId};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// The role a request needs this SDS to hold in the chunk's PG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
    /// Any copy: primary, secondary or a copy being moved off (a peer reading this SDS's own
    /// copy).
    Holder,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::Holder => "holder of a copy",
        })
    }
}

/// Why the fence refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this SDS has not been welcomed by the MDM yet")]
    NotJoined,
    #[error(
        "this SDS has not heard from the MDM within its lease; it serves nothing until it does"
    )]
    NoLease,
    #[error("request epoch {got} of pool {pool} is older than {have}; refresh the map")]
    StaleEpoch {
        pool: PoolId,
        got: Epoch,
        have: Epoch,
    },
    #[error("request epoch {got} of pool {pool} is newer than this SDS's map ({have})")]
    NewerEpoch {
        pool: PoolId,
        got: Epoch,
        have: Epoch,
    },
    #[error("pool {0} is not in this SDS's map")]
    UnknownPool(PoolId),
    #[error("pool {pool} has no PG {pg}")]
    NoSuchPg { pool: PoolId, pg: PgId },
    #[error("chunk {chunk} belongs to PG {actual}, not PG {claimed}")]
    ChunkNotInPg {
        chunk: ChunkId,
        claimed: PgId,
        actual: PgId,
    },
    #[error("this SDS ({me}) is not the {role} of PG {pg} of pool {pool} at epoch {epoch}")]
    WrongRole {
        me: SdsId,
        role: Role,
        pool: PoolId,
        pg: PgId,
        epoch: Epoch,
    },
    #[error("the secondary SDS {0} of this PG has no usable address in the map")]
    NoPeerAddress(SdsId),
}

/// Where a write goes besides this SDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The secondary to forward to (primary requests of a PG that has one).
    pub secondary: Option<(SdsId, SocketAddr)>,
    /// A copy being moved off (rebalance) that still receives every write.
    pub leaving: Option<(SdsId, SocketAddr)>,
    /// Version of the map this route was computed from.
    pub version: u64,
}

/// The fence: may `me`, whose newest seen epoch for the pool is `floor`, act on `h` in `role`
/// according to `map`?
pub fn check(
    map: &ClusterState,
    floor: Epoch,
    me: SdsId,
    h: &DataHeader,
    role: Role,
) -> Result<Route, Refusal> {
    let pool = check_epoch(map, floor, h)?;
    let no_pg = Refusal::NoSuchPg {
        pool: h.pool,
        pg: h.pg,
    };
    if pool.pg_count == 0 {
        return Err(no_pg);
    }
    let actual = h.chunk.pg(pool.pg_count);
    if actual != h.pg {
        return Err(Refusal::ChunkNotInPg {
            chunk: h.chunk,
            claimed: h.pg,
            actual,
        });
    }
    let pg = pool.pg(h.pg).ok_or(no_pg)?;
    let holder = match role {
        Role::Holder => [pg.primary, pg.secondary, pg.leaving]
            .into_iter()
            .flatten()
            .find(|s| *s == me),
        Role::Primary => pg.primary,
        // A leaving copy (rebalance) takes replica writes like the secondary.
        Role::Secondary if pg.leaving == Some(me) => pg.leaving,
        Role::Secondary => pg.secondary,
    };
    if holder != Some(me) {
        return Err(Refusal::WrongRole {
            me,
            role,
            pool: h.pool,
            pg: h.pg,
            epoch: pool.epoch,
        });
    }
    let peer = |copy: Option<SdsId>| match (role, copy) {
        (Role::Primary, Some(s)) if s != me => {
            let addr = map
                .sds
                .get(&s)
                .and_then(|x| x.addr.parse::<SocketAddr>().ok())
                .ok_or(Refusal::NoPeerAddress(s))?;
            Ok(Some((s, addr)))
        }
        _ => Ok(None),
    };
    Ok(Route {
        secondary: peer(pg.secondary)?,
        leaving: peer(pg.leaving)?,
        version: map.version,
    })
}

/// The epoch part of the fence: `h`'s pool must be in `map` at exactly the epoch `h` carries,
/// which must not be older than `floor` (the newest this SDS has seen).
pub fn check_epoch<'m>(
    map: &'m ClusterState,
    floor: Epoch,
    h: &DataHeader,
) -> Result<&'m proto::model::StoragePool, Refusal> {
    let Some(pool) = map.pools.get(&h.pool) else {
        if h.epoch > floor {
            return Err(Refusal::NewerEpoch {
                pool: h.pool,
                got: h.epoch,
                have: floor,
            });
        }
        if h.epoch < floor {
            return Err(Refusal::StaleEpoch {
                pool: h.pool,
                got: h.epoch,
                have: floor,
            });
        }
        return Err(Refusal::UnknownPool(h.pool));
    };
    let have = floor.max(pool.epoch);
    if h.epoch < have {
        return Err(Refusal::StaleEpoch {
            pool: h.pool,
            got: h.epoch,
            have,
        });
    }
    if h.epoch > pool.epoch {
        return Err(Refusal::NewerEpoch {
            pool: h.pool,
            got: h.epoch,
            have: pool.epoch,
        });
    }
    Ok(pool)
}

/// The cached cluster map, this SDS's id, and the per-pool epoch high-water marks.
///
/// **Lease**: once [`require_lease`](MapCache::require_lease) is called (the daemon does, tests
/// that install maps by hand need not), the fence also refuses everything unless the MDM
/// answered a hello sent less than the lease ago and the installed map is at least as new as
/// the one that answer named. The MDM declares an SDS down only after a longer silence, so an
/// SDS that was frozen or cut off has stopped serving before its PGs move elsewhere, and an SDS
/// that comes back serves nothing until it has the map that says what it still holds.
pub struct MapCache {
    state: RwLock<Arc<MapSnapshot>>,
    floors: Mutex<HashMap<PoolId, Epoch>>,
    me: RwLock<Option<SdsId>>,
    version: watch::Sender<u64>,
    refresh_wanted: Notify,
    lease: Mutex<Lease>,
}

/// An installed map with its [`FenceIndex`], built once when the map is installed so that the
/// fence check of every data request is a lookup, not a scan of the mappings.
#[derive(Default)]
pub struct MapSnapshot {
    pub state: Arc<ClusterState>,
    fences: FenceIndex,
}

impl MapSnapshot {
    fn new(state: ClusterState) -> MapSnapshot {
        MapSnapshot {
            fences: FenceIndex::new(&state),
            state: Arc::new(state),
        }
    }

    /// [`ClusterState::check_fence`] against this map.
    pub fn check_fence(&self, chunk: ChunkId, fence: u64, sdc: &str) -> FenceCheck {
        self.state.check_fence_with(&self.fences, chunk, fence, sdc)
    }
}

#[derive(Default)]
struct Lease {
    required: bool,
    until: Option<Instant>,
    min_version: u64,
}

impl Default for MapCache {
    fn default() -> Self {
        MapCache::new()
    }
}

impl MapCache {
    /// An empty cache: no map, not joined.
    pub fn new() -> MapCache {
        MapCache {
            state: RwLock::new(Arc::new(MapSnapshot::default())),
            floors: Mutex::new(HashMap::new()),
            me: RwLock::new(None),
            version: watch::channel(0).0,
            refresh_wanted: Notify::new(),
            lease: Mutex::new(Lease::default()),
        }
    }

    /// Serve only under a lease from now on.
    pub fn require_lease(&self) {
        if let Ok(mut l) = self.lease.lock() {
            l.required = true;
        }
    }

    /// The MDM answered a hello sent at `sent`: serve until `sent + lease`, once the map is at
    /// least `min_version`.
    pub fn grant_lease(&self, sent: Instant, lease: Duration, min_version: u64) {
        if let Ok(mut l) = self.lease.lock() {
            let Some(until) = sent.checked_add(lease) else {
                return;
            };
            if l.until.is_none_or(|u| u < until) {
                l.until = Some(until);
            }
            l.min_version = l.min_version.max(min_version);
        }
    }

    /// Whether the lease (if required) allows serving now.
    pub fn leased(&self) -> bool {
        let Ok(l) = self.lease.lock() else {
            return false;
        };
        !l.required
            || (l.until.is_some_and(|u| Instant::now() < u) && self.version() >= l.min_version)
    }

    /// Resolves when the map no longer names `secondary` as the secondary of `pg` (it was
    /// declared down, or the PG moved): a forward still waiting for it is pointless.
    pub async fn secondary_replaced(&self, pool: PoolId, pg: PgId, secondary: SdsId) {
        let mut rx = self.version.subscribe();
        loop {
            let still = self
                .state()
                .pools
                .get(&pool)
                .and_then(|p| p.pg(pg))
                .is_some_and(|m| m.secondary == Some(secondary));
            if !still {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves when the map names `sds` as neither the secondary nor the leaving copy of `pg`
    /// (a finished move dropped it, or it was declared down): a forward to it is moot.
    pub async fn copy_dropped(&self, pool: PoolId, pg: PgId, sds: SdsId) {
        let mut rx = self.version.subscribe();
        loop {
            let still = self
                .state()
                .pools
                .get(&pool)
                .and_then(|p| p.pg(pg))
                .is_some_and(|m| m.secondary == Some(sds) || m.leaving == Some(sds));
            if !still {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Install `state` if it is newer than the cached map; raise the epoch floors. Returns
    /// whether it was installed.
    pub fn install(&self, state: ClusterState) -> bool {
        // The index is built before the lock: every request's fence check reads under it.
        let next = MapSnapshot::new(state);
        let state = &next.state;
        let mut cur = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.version <= cur.state.version && cur.state.version != 0 {
            return false;
        }
        {
            let mut floors = self.floors.lock().unwrap_or_else(|p| p.into_inner());
            for p in state.pools.values() {
                let f = floors.entry(p.id).or_default();
                *f = (*f).max(p.epoch);
            }
        }
        crate::failpoints::fail_point(crate::failpoints::ROUTING_DURING_MAP_UPDATE);
        let version = state.version;
        *cur = Arc::new(next);
        drop(cur);
        self.version.send_replace(version);
        true
    }

    /// The current map.
    pub fn state(&self) -> Arc<ClusterState> {
        self.state
            .read()
            .map(|s| s.state.clone())
            .unwrap_or_default()
    }

    /// The current map with its fence index.
    pub fn snapshot(&self) -> Arc<MapSnapshot> {
        self.state.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// [`ClusterState::check_fence`] against the current map.
    pub fn check_fence(&self, chunk: ChunkId, fence: u64, sdc: &str) -> FenceCheck {
        self.snapshot().check_fence(chunk, fence, sdc)
    }

    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// The newest epoch seen for `pool`.
    pub fn floor(&self, pool: PoolId) -> Epoch {
        self.floors
            .lock()
            .map(|f| f.get(&pool).copied().unwrap_or_default())
            .unwrap_or_default()
    }

    /// This SDS's id, once the MDM welcomed it.
    pub fn me(&self) -> Option<SdsId> {
        self.me.read().ok().and_then(|m| *m)
    }

    pub fn set_me(&self, id: SdsId) {
        if let Ok(mut m) = self.me.write() {
            *m = Some(id);
        }
    }

    /// Run the fence against the current map.
    pub fn check(&self, h: &DataHeader, role: Role) -> Result<Route, Refusal> {
        let me = self.me().ok_or(Refusal::NotJoined)?;
        if !self.leased() {
            return Err(Refusal::NoLease);
        }
        check(&self.state(), self.floor(h.pool), me, h, role)
    }

    /// The fence of a request about a whole pool rather than one PG (AllocStatus): joined,
    /// leased, and at the pool's current epoch.
    pub fn check_pool(&self, h: &DataHeader) -> Result<(), Refusal> {
        self.me().ok_or(Refusal::NotJoined)?;
        if !self.leased() {
            return Err(Refusal::NoLease);
        }
        check_epoch(&self.state(), self.floor(h.pool), h).map(|_| ())
    }

    /// Ask the map follower for a newer map now (it may be sleeping until its next poll).
    pub fn request_refresh(&self) {
        self.refresh_wanted.notify_one();
    }

    /// Resolves when somebody asked for a refresh (for the map follower).
    pub async fn refresh_requested(&self) {
        self.refresh_wanted.notified().await
    }

    /// Ask for a newer map and wait until one is installed or `timeout` passes. Returns whether
    /// the map changed.
    pub async fn refresh(&self, timeout: Duration) -> bool {
        let mut rx = self.version.subscribe();
        rx.mark_unchanged();
        self.request_refresh();
        matches!(
            tokio::time::timeout(timeout, rx.changed()).await,
            Ok(Ok(()))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::data::DataOp;
    use proto::model::{PgMapping, Sds, SdsState, StoragePool};
    use proto::{ChunkIndex, PdId, VtreeId};

    const A: SdsId = SdsId(1);
    const B: SdsId = SdsId(2);
    const POOL: PoolId = PoolId(10);

    fn map(epoch: u64, version: u64) -> ClusterState {
        let mut m = ClusterState {
            version,
            ..Default::default()
        };
        m.pools.insert(
            POOL,
            StoragePool {
                id: POOL,
                name: "sp1".into(),
                pd: PdId(1),
                media_type: "HDD".into(),
                pg_count: 4,
                epoch: Epoch(epoch),
                pgs: vec![
                    PgMapping {
                        primary: Some(A),
                        secondary: Some(B),
                        rebuild: None,
                        leaving: None,
                        dropped: None,
                        rebuild_since: None,
                    },
                    PgMapping {
                        primary: Some(B),
                        secondary: Some(A),
                        rebuild: None,
                        leaving: None,
                        dropped: None,
                        rebuild_since: None,
                    },
                    PgMapping {
                        primary: Some(A),
                        secondary: None,
                        rebuild: None,
                        leaving: None,
                        dropped: None,
                        rebuild_since: None,
                    },
                    PgMapping {
                        primary: None,
                        secondary: None,
                        rebuild: None,
                        leaving: None,
                        dropped: None,
                        rebuild_since: None,
                    },
                ],
                rebuild_policy: Default::default(),
            },
        );
        for (id, port) in [(A, 7001), (B, 7002)] {
            m.sds.insert(
                id,
                Sds {
                    id,
                    name: format!("sds{}", id.0),
                    addr: format!("127.0.0.1:{port}"),
                    pd: PdId(1),
                    fault_set: None,
                    devices: vec![],
                    state: SdsState::Normal,
                    removing: false,
                    boot: String::new(),
                    cert_name: None,
                },
            );
        }
        m
    }

    /// A header for a chunk of `pg` (found by search) at `epoch`.
    fn header(pg: u32, epoch: u64) -> DataHeader {
        let chunk = (0..)
            .map(|i| ChunkId::new(VtreeId(5), ChunkIndex(i)))
            .find(|c| c.pg(4) == PgId(pg))
            .expect("some chunk maps to every PG");
        DataHeader {
            op: DataOp::Write,
            flags: 0,
            pool: POOL,
            pg: PgId(pg),
            epoch: Epoch(epoch),
            chunk,
            offset: 0,
            len: 4096,
            fence: 0,
        }
    }

    fn refused(r: Result<Route, Refusal>) -> Refusal {
        r.expect_err("refused")
    }

    #[test]
    fn the_fence() {
        let m = map(3, 1);
        let floor = Epoch(3);
        let b_addr: SocketAddr = "127.0.0.1:7002".parse().expect("addr");
        assert_eq!(
            check(&m, floor, A, &header(0, 3), Role::Primary),
            Ok(Route {
                secondary: Some((B, b_addr)),
                leaving: None,
                version: 1,
            })
        );
        assert_eq!(
            check(&m, floor, B, &header(0, 3), Role::Secondary),
            Ok(Route {
                secondary: None,
                leaving: None,
                version: 1,
            })
        );
        assert_eq!(
            check(&m, floor, A, &header(2, 3), Role::Primary),
            Ok(Route {
                secondary: None,
                leaving: None,
                version: 1,
            })
        );
        let stale = refused(check(&m, floor, A, &header(0, 2), Role::Primary));
        assert!(matches!(stale, Refusal::StaleEpoch { .. }));
        let newer = refused(check(&m, floor, A, &header(0, 4), Role::Primary));
        assert!(matches!(newer, Refusal::NewerEpoch { .. }));
        for (me, pg, role) in [
            (B, 0, Role::Primary),
            (A, 0, Role::Secondary),
            (A, 3, Role::Primary),
        ] {
            let r = refused(check(&m, floor, me, &header(pg, 3), role));
            assert!(matches!(r, Refusal::WrongRole { .. }), "{r}");
        }
        let mut h = header(0, 3);
        h.pg = PgId(1);
        let r = refused(check(&m, floor, A, &h, Role::Primary));
        assert!(matches!(r, Refusal::ChunkNotInPg { .. }));
        h.pool = PoolId(99);
        h.epoch = Epoch(4);
        let r = refused(check(&m, floor, A, &h, Role::Primary));
        assert!(matches!(r, Refusal::NewerEpoch { .. }));
        h.epoch = Epoch(0);
        assert_eq!(
            check(&m, Epoch(0), A, &h, Role::Primary),
            Err(Refusal::UnknownPool(PoolId(99)))
        );
        // A floor above the map's epoch (seen before) still fences.
        let r = refused(check(&m, Epoch(5), A, &header(0, 4), Role::Primary));
        assert!(matches!(r, Refusal::StaleEpoch { .. }));
        // A pool without PGs never panics.
        let mut broken = map(3, 1);
        if let Some(p) = broken.pools.get_mut(&POOL) {
            p.pg_count = 0;
        }
        let r = refused(check(&broken, floor, A, &header(0, 3), Role::Primary));
        assert!(matches!(r, Refusal::NoSuchPg { .. }));
    }

    #[tokio::test]
    async fn the_cache_only_moves_forward() {
        let c = MapCache::new();
        assert_eq!(
            c.check(&header(0, 3), Role::Primary),
            Err(Refusal::NotJoined)
        );
        c.set_me(A);
        assert!(c.install(map(3, 5)));
        assert!(!c.install(map(9, 4)), "an older map version is ignored");
        assert_eq!(c.floor(POOL), Epoch(3));
        assert!(c.check(&header(0, 3), Role::Primary).is_ok());
        assert!(c.install(map(4, 6)));
        assert!(matches!(
            c.check(&header(0, 3), Role::Primary),
            Err(Refusal::StaleEpoch { .. })
        ));

        // refresh() wakes the follower and returns once a newer map is installed.
        let c = Arc::new(c);
        let follower = {
            let c = c.clone();
            tokio::spawn(async move {
                c.refresh_requested().await;
                c.install(map(5, 7));
            })
        };
        assert!(c.refresh(Duration::from_secs(5)).await);
        follower.await.expect("join");
        assert_eq!(c.version(), 7);
        assert!(
            !c.refresh(Duration::from_millis(10)).await,
            "nobody answers: times out"
        );
    }
}
