//! Rebuild as a source: this SDS, primary of a PG the MDM gave a new (rebuilding) secondary,
//! copies the PG's chunks to it and then reports the copy done, which makes the secondary a
//! full copy (`Op::PgRebuilt` at the MDM).
//!
//! How a PG is copied, while user writes keep flowing to both copies (the primary forwards
//! every write to a rebuilding secondary too):
//! 1. the chunks to visit: every chunk of the pool's volumes that maps to the PG and that this
//!    SDS holds, plus those the target holds (asked with AllocStatus: a returning SDS may have
//!    stale chunks, which must be trimmed);
//! 2. each chunk under its whole-chunk order lock ([`Service::copy_chunk`]): the whole 1 MiB is
//!    read here and written there, or trimmed there when this SDS has no such chunk; no user
//!    write of that chunk can interleave, and writes after it are forwarded as usual;
//! 3. report to the MDM with the assignment's `rebuild` epoch; a changed assignment is refused.
//!
//! A failed copy is retried after a pause for as long as the map still asks for it; a PG whose
//! assignment disappears (target declared down, PG moved) is abandoned. At most
//! `concurrency` PGs (config `rebuild_concurrency`) are copied at once, and every chunk copy
//! passes the [`Throttle`]: the pool's [`RebuildPolicy`] (chunk copies in flight and MiB/s for
//! this SDS, set with `scli --set_rebuild_rebalance_policy`), backed off to 1 copy at 10 MiB/s
//! in adaptive mode while this SDS served client I/O within the last second. Rebalance moves
//! are copied the same way (the map names them as rebuilding secondaries). The throttle is the
//! SDS's one budget for background copies: moves off a device being removed pass it too.

use crate::device::BlockDevice;
use crate::mdm_client::MdmLink;
use crate::routing::MapCache;
use crate::service::{Service, ALLOC_STATUS_MAX_CHUNKS};
use proto::model::{
    ClusterState, RebuildPolicy, ADAPTIVE_BUSY_BANDWIDTH_MIB_S, ADAPTIVE_BUSY_CONCURRENCY,
};
use proto::{ChunkId, ChunkIndex, Epoch, PgId, PoolId, SdsId, CHUNK_SIZE};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Pause before retrying a PG whose copy failed.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How recent client I/O must be for adaptive mode to back off.
const ADAPTIVE_WINDOW: Duration = Duration::from_secs(1);
/// How often a copy waiting for a slot looks again.
const THROTTLE_POLL: Duration = Duration::from_millis(5);

/// The copy throttle of this SDS: chunk copies in flight and a byte rate, paced on a virtual
/// clock (each copy reserves `bytes / rate` of it).
pub struct Throttle {
    state: Mutex<ThrottleState>,
}

struct ThrottleState {
    in_flight: u32,
    next_free: Instant,
    last_user_requests: u64,
    user_seen: Option<Instant>,
}

/// A copy slot; released on drop.
pub struct CopyPermit<'a> {
    throttle: &'a Throttle,
}

impl Drop for CopyPermit<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.throttle.state.lock() {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new()
    }
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle {
            state: Mutex::new(ThrottleState {
                in_flight: 0,
                next_free: Instant::now(),
                last_user_requests: 0,
                user_seen: None,
            }),
        }
    }

    /// The limits in force: the policy's, or adaptive mode's while client I/O is recent.
    /// `user_requests` is the SDS's count of client requests so far.
    fn limits(s: &mut ThrottleState, policy: &RebuildPolicy, user_requests: u64) -> (u32, u32) {
        let now = Instant::now();
        if user_requests != s.last_user_requests {
            s.last_user_requests = user_requests;
            s.user_seen = Some(now);
        }
        let busy = s
            .user_seen
            .is_some_and(|t| now.duration_since(t) < ADAPTIVE_WINDOW);
        if policy.adaptive && busy {
            (
                ADAPTIVE_BUSY_CONCURRENCY.min(policy.concurrency.max(1)),
                ADAPTIVE_BUSY_BANDWIDTH_MIB_S,
            )
        } else {
            (policy.concurrency.max(1), policy.bandwidth_mib_s)
        }
    }

    /// Wait for a slot to copy `bytes` under `policy`.
    pub async fn acquire(
        &self,
        policy: impl Fn() -> RebuildPolicy,
        user_requests: impl Fn() -> u64,
        bytes: u64,
    ) -> CopyPermit<'_> {
        loop {
            let wait = {
                let Ok(mut s) = self.state.lock() else {
                    return CopyPermit { throttle: self };
                };
                let (concurrency, mib_s) = Throttle::limits(&mut s, &policy(), user_requests());
                if s.in_flight < concurrency {
                    s.in_flight += 1;
                    let now = Instant::now();
                    let wait = if mib_s > 0 {
                        let start = s.next_free.max(now);
                        let cost = bytes as f64 / (f64::from(mib_s) * (1u64 << 20) as f64);
                        s.next_free = start + Duration::from_secs_f64(cost);
                        start - now
                    } else {
                        s.next_free = now;
                        Duration::ZERO
                    };
                    Some(wait)
                } else {
                    None
                }
            };
            match wait {
                Some(w) => {
                    if !w.is_zero() {
                        tokio::time::sleep(w).await;
                    }
                    return CopyPermit { throttle: self };
                }
                None => tokio::time::sleep(THROTTLE_POLL).await,
            }
        }
    }
}

/// Longest a backward copy waits for writes routed with an older map to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Backward rebuild's bookkeeping, as a PG's primary: every chunk written while the PG had no
/// in-sync secondary (degraded or rebuilding), or whose forward failed, recorded before the
/// write is applied; and the writes in flight by the map version they were routed with.
///
/// A returning secondary dropped at epoch E needs only the chunks recorded since, provided this
/// process recorded every write since before E ([`DirtyLog::covers`]: it saw the pool at an
/// epoch older than E). Records of a PG are forgotten once the map shows it with two in-sync
/// copies.
#[derive(Default)]
pub struct DirtyLog {
    inner: Mutex<DirtyInner>,
}

#[derive(Default)]
struct DirtyInner {
    /// Per PG: chunk -> map version of the last write recorded.
    chunks: HashMap<(PoolId, PgId), HashMap<ChunkId, u64>>,
    /// Primary writes in flight per routed map version.
    in_flight: BTreeMap<u64, u32>,
    /// The oldest epoch this process saw per pool.
    first_epoch: HashMap<PoolId, Epoch>,
}

/// A primary write in flight; see [`DirtyLog::write_started`].
pub struct WriteGuard<'a> {
    log: &'a DirtyLog,
    version: u64,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut d) = self.log.inner.lock() {
            if let Some(n) = d.in_flight.get_mut(&self.version) {
                *n -= 1;
                if *n == 0 {
                    d.in_flight.remove(&self.version);
                }
            }
        }
    }
}

impl DirtyLog {
    /// A primary write of `chunk` routed with map `version`, whose PG has an in-sync secondary
    /// (`in_sync`) or not. Call under the chunk's order lock, before applying it.
    pub fn write_started(
        &self,
        pool: PoolId,
        pg: PgId,
        epoch: Epoch,
        chunk: ChunkId,
        version: u64,
        in_sync: bool,
    ) -> WriteGuard<'_> {
        if let Ok(mut d) = self.inner.lock() {
            *d.in_flight.entry(version).or_default() += 1;
            let e = d.first_epoch.entry(pool).or_insert(epoch);
            *e = (*e).min(epoch);
            if !in_sync {
                d.chunks
                    .entry((pool, pg))
                    .or_default()
                    .insert(chunk, version);
            }
        }
        WriteGuard { log: self, version }
    }

    /// A write whose forward (or local write) failed: the copies may differ in `chunk`.
    pub fn note_failed(&self, pool: PoolId, pg: PgId, chunk: ChunkId, version: u64) {
        if let Ok(mut d) = self.inner.lock() {
            d.chunks
                .entry((pool, pg))
                .or_default()
                .insert(chunk, version);
        }
    }

    /// Record that this process saw `pool` at `epoch`.
    fn saw(&self, pool: PoolId, epoch: Epoch) {
        if let Ok(mut d) = self.inner.lock() {
            let e = d.first_epoch.entry(pool).or_insert(epoch);
            *e = (*e).min(epoch);
        }
    }

    /// Whether every write since epoch `since` of `pool` was recorded here.
    fn covers(&self, pool: PoolId, since: Epoch) -> bool {
        self.inner
            .lock()
            .ok()
            .and_then(|d| d.first_epoch.get(&pool).copied())
            .is_some_and(|first| first < since)
    }

    /// Forget the records of `pg` made with maps older than `version` (the map at `version`
    /// shows it with two in-sync copies, or this SDS no longer leads it).
    fn forget(&self, pool: PoolId, pg: PgId, version: u64) {
        if let Ok(mut d) = self.inner.lock() {
            if let Some(c) = d.chunks.get_mut(&(pool, pg)) {
                c.retain(|_, v| *v >= version);
                if c.is_empty() {
                    d.chunks.remove(&(pool, pg));
                }
            }
        }
    }

    /// Wait (bounded) until no write routed with a map older than `version` is in flight;
    /// false on timeout.
    async fn drained(&self, version: u64) -> bool {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let oldest = self
                .inner
                .lock()
                .ok()
                .and_then(|d| d.in_flight.keys().next().copied());
            if oldest.is_none_or(|v| v >= version) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(THROTTLE_POLL).await;
        }
    }

    /// The chunks recorded for `pg`, with the map version of their last record.
    fn snapshot(&self, pool: PoolId, pg: PgId) -> Vec<(ChunkId, u64)> {
        let mut v: Vec<(ChunkId, u64)> = self
            .inner
            .lock()
            .ok()
            .and_then(|d| {
                d.chunks
                    .get(&(pool, pg))
                    .map(|c| c.iter().map(|(k, v)| (*k, *v)).collect())
            })
            .unwrap_or_default();
        v.sort_by_key(|(c, _)| (c.vtree, c.index.0));
        v
    }
}

/// One copy the map asks this SDS to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Assignment {
    pub pool: PoolId,
    pub pg: PgId,
    pub target: SdsId,
    pub rebuild: Epoch,
    /// Backward rebuild: the target holds the PG as of this epoch.
    pub since: Option<Epoch>,
}

/// The copies `me` must make according to `map`.
pub fn assignments(map: &ClusterState, me: SdsId) -> Vec<Assignment> {
    let mut out = Vec::new();
    for p in map.pools.values() {
        for (i, m) in p.pgs.iter().enumerate() {
            if let (Some(pr), Some(target), Some(rebuild)) = (m.primary, m.secondary, m.rebuild) {
                if pr == me {
                    out.push(Assignment {
                        pool: p.id,
                        pg: PgId(i as u32),
                        target,
                        rebuild,
                        since: m.rebuild_since,
                    });
                }
            }
        }
    }
    out
}

pub struct Rebuilder<D> {
    service: Arc<Service<D>>,
    link: Arc<MdmLink>,
    map: Arc<MapCache>,
    running: Mutex<HashSet<Assignment>>,
    slots: Semaphore,
}

impl<D: BlockDevice> Rebuilder<D> {
    pub fn new(
        service: Arc<Service<D>>,
        link: Arc<MdmLink>,
        concurrency: u32,
    ) -> Arc<Rebuilder<D>> {
        Arc::new(Rebuilder {
            map: service.map().clone(),
            service,
            link,
            running: Mutex::new(HashSet::new()),
            slots: Semaphore::new(concurrency.max(1) as usize),
        })
    }

    fn still_assigned(&self, a: &Assignment) -> bool {
        let Some(me) = self.map.me() else {
            return false;
        };
        assignments(&self.map.state(), me).contains(a)
    }

    /// Watch the map and start a copy for every new assignment; runs for the life of the
    /// process.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_version = 0;
        loop {
            tick.tick().await;
            let map = self.map.state();
            if map.version == seen_version {
                continue;
            }
            seen_version = map.version;
            let Some(me) = self.map.me() else { continue };
            self.forget_synced(&map, me);
            for a in assignments(&map, me) {
                let fresh = self
                    .running
                    .lock()
                    .map(|mut r| r.insert(a))
                    .unwrap_or(false);
                if fresh {
                    let this = self.clone();
                    tokio::spawn(async move {
                        this.rebuild(a).await;
                        if let Ok(mut r) = this.running.lock() {
                            r.remove(&a);
                        }
                    });
                }
            }
        }
    }

    /// Backward-rebuild records of PGs that have two in-sync copies again, or that this SDS no
    /// longer leads, are no longer needed.
    fn forget_synced(&self, map: &ClusterState, me: SdsId) {
        let dirty = self.service.dirty();
        for p in map.pools.values() {
            dirty.saw(p.id, p.epoch);
            for (i, m) in p.pgs.iter().enumerate() {
                let synced = m.secondary.is_some() && m.rebuild.is_none() && m.leaving.is_none();
                if synced || m.primary != Some(me) {
                    dirty.forget(p.id, PgId(i as u32), map.version);
                }
            }
        }
    }

    /// Chunks of the PG held here (what a queued copy will visit at least).
    fn local_chunks(&self, a: &Assignment) -> i64 {
        let map = self.map.state();
        let Some(pool) = map.pools.get(&a.pool) else {
            return 0;
        };
        let storage = self.service.storage();
        trees_of(&map, a.pool)
            .into_keys()
            .map(|vtree| {
                storage
                    .chunks_of(vtree)
                    .into_iter()
                    .filter(|c| map.has_layer(vtree, c.layer) && c.pg(pool.pg_count) == a.pg)
                    .count() as i64
            })
            .sum()
    }

    async fn rebuild(&self, a: Assignment) {
        // Count a queued copy's chunks in the progress until it starts (then it counts the
        // exact list, the target's stale chunks included).
        let queued = self.local_chunks(&a);
        let left = self.service.metrics().rebuild_chunks_left.clone();
        left.inc_by(queued);
        let slot = self.slots.acquire().await;
        left.dec_by(queued);
        let Ok(_slot) = slot else {
            return;
        };
        self.service.metrics().rebuilding_pgs.inc();
        let started = Instant::now();
        loop {
            if !self.still_assigned(&a) {
                tracing::info!(pool = %a.pool, pg = %a.pg, target = %a.target,
                    "rebuild no longer assigned; abandoned");
                break;
            }
            // The copy counts as a full one only once it is durable on the target: a target
            // whose disks lose unflushed writes must not become the PG's only good copy.
            let copied = match self.copy_pg(&a).await {
                Ok(bytes) => self.service.flush_peer(a.target).await.map(|()| bytes),
                Err(e) => Err(e),
            };
            match copied {
                Ok(bytes) => match self
                    .link
                    .report_rebuilt(a.pool, a.pg, a.target, a.rebuild)
                    .await
                {
                    Ok(true) => {
                        self.service.metrics().rebuilt_pgs.inc();
                        tracing::info!(pool = %a.pool, pg = %a.pg, target = %a.target, bytes,
                            seconds = started.elapsed().as_secs_f64(), "PG rebuilt");
                        break;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(pg = %a.pg, "could not report a finished rebuild: {e}; retrying")
                    }
                },
                Err(e) => {
                    tracing::warn!(pool = %a.pool, pg = %a.pg, target = %a.target,
                        "rebuild copy failed: {e}; retrying")
                }
            }
            let mut rx = std::pin::pin!(tokio::time::sleep(RETRY_PAUSE));
            (&mut rx).await;
        }
        self.service.metrics().rebuilding_pgs.dec();
    }

    /// Backward rebuild: copy only the chunks written since the target left, when this SDS
    /// recorded them all; `None` when it did not (the caller copies everything).
    async fn copy_changed(&self, a: &Assignment) -> Option<Result<u64, proto::WireError>> {
        let since = a.since?;
        let dirty = self.service.dirty();
        if !dirty.covers(a.pool, since) {
            tracing::info!(pool = %a.pool, pg = %a.pg, %since,
                "backward rebuild: this primary did not track every write since; full copy");
            return None;
        }
        // Writes routed before this assignment did not reach the target: let them finish
        // (and record their chunks) first. A second pass picks up a write that read the old
        // map just before this one looked.
        let version = self.map.version();
        let held = self.local_chunks(a);
        let mut copied: HashSet<ChunkId> = HashSet::new();
        let mut bytes = 0;
        for _pass in 0..2 {
            if !dirty.drained(version).await {
                return None;
            }
            let chunks: Vec<ChunkId> = dirty
                .snapshot(a.pool, a.pg)
                .into_iter()
                .filter(|(c, v)| !copied.contains(c) && (copied.is_empty() || *v < version))
                .map(|(c, _)| c)
                .collect();
            match self.copy_list(a, &chunks).await {
                Ok(n) => bytes += n,
                Err(e) => return Some(Err(e)),
            }
            copied.extend(chunks);
        }
        let chunks = copied;
        let skipped = (held - chunks.len() as i64).max(0) as u64;
        self.service
            .metrics()
            .rebuild_chunks_skipped
            .inc_by(skipped);
        tracing::info!(pool = %a.pool, pg = %a.pg, %since, copied = chunks.len(), skipped,
            "backward rebuild: copied only the chunks changed since the target left");
        Some(Ok(bytes))
    }

    /// Copy `chunks` (trimming on the target those this SDS lacks); returns the bytes copied.
    async fn copy_list(&self, a: &Assignment, chunks: &[ChunkId]) -> Result<u64, proto::WireError> {
        let left = self.service.metrics().rebuild_chunks_left.clone();
        left.inc_by(chunks.len() as i64);
        let mut todo = chunks.len() as i64;
        let mut bytes = 0;
        for chunk in chunks {
            let _permit = self
                .service
                .copy_throttle()
                .acquire(|| self.policy(a.pool), || self.user_requests(), CHUNK_SIZE)
                .await;
            let r = self
                .service
                .copy_chunk(a.pool, a.pg, *chunk, a.target, true)
                .await;
            left.dec();
            todo -= 1;
            match r {
                Ok(n) => bytes += n,
                Err(e) => {
                    left.dec_by(todo);
                    return Err(e);
                }
            }
        }
        Ok(bytes)
    }

    fn policy(&self, pool: PoolId) -> RebuildPolicy {
        self.map
            .state()
            .pools
            .get(&pool)
            .map(|p| p.rebuild_policy)
            .unwrap_or_default()
    }

    fn user_requests(&self) -> u64 {
        self.service.metrics().user_requests.get()
    }

    /// Copy every chunk of the PG that either side holds (or, for a backward rebuild, only
    /// what changed); returns the bytes copied.
    async fn copy_pg(&self, a: &Assignment) -> Result<u64, proto::WireError> {
        if let Some(r) = self.copy_changed(a).await {
            return r;
        }
        let map = self.map.state();
        let Some(pool) = map.pools.get(&a.pool) else {
            return Ok(0);
        };
        let pg_count = pool.pg_count;
        let storage = self.service.storage();
        let mut bytes = 0;
        for (vtree, chunks) in trees_of(&map, a.pool) {
            let held = storage.chunks_of(vtree);
            for layer in map.layers_of(vtree) {
                bytes += self
                    .copy_layer(a, pg_count, vtree, layer, chunks, &held)
                    .await?;
            }
        }
        Ok(bytes)
    }

    /// Copy one layer of a V-tree's chunks in the PG (see [`Rebuilder::copy_pg`]).
    async fn copy_layer(
        &self,
        a: &Assignment,
        pg_count: u32,
        vtree: proto::VtreeId,
        layer: proto::LayerId,
        chunks: u64,
        held: &[ChunkId],
    ) -> Result<u64, proto::WireError> {
        let mut bytes = 0;
        {
            let in_pg = |index: u64| ChunkId::new(vtree, ChunkIndex(index)).pg(pg_count) == a.pg;
            let mut local: BTreeSet<u64> = held
                .iter()
                .filter(|c| c.layer == layer)
                .map(|c| c.index.0)
                .filter(|i| in_pg(*i))
                .collect();
            let mut remote = BTreeSet::new();
            let mut first = 0;
            while first < chunks {
                let count = (chunks - first).min(u64::from(ALLOC_STATUS_MAX_CHUNKS)) as u32;
                let have = self
                    .service
                    .remote_allocation(
                        a.target,
                        a.pool,
                        ChunkId::new(vtree, ChunkIndex(first)).in_layer(layer),
                        count,
                    )
                    .await?;
                for (i, b) in have.iter().enumerate() {
                    let index = first + i as u64;
                    if *b != 0 && in_pg(index) {
                        remote.insert(index);
                    }
                }
                first += u64::from(count);
            }
            local.extend(remote.iter().copied());
            let left = self.service.metrics().rebuild_chunks_left.clone();
            left.inc_by(local.len() as i64);
            let mut todo = local.len() as i64;
            for index in local {
                let chunk = ChunkId::new(vtree, ChunkIndex(index)).in_layer(layer);
                let _permit = self
                    .service
                    .copy_throttle()
                    .acquire(|| self.policy(a.pool), || self.user_requests(), CHUNK_SIZE)
                    .await;
                let r = self
                    .service
                    .copy_chunk(a.pool, a.pg, chunk, a.target, remote.contains(&index))
                    .await;
                left.dec();
                todo -= 1;
                match r {
                    Ok(n) => bytes += n,
                    Err(e) => {
                        left.dec_by(todo);
                        return Err(e);
                    }
                }
            }
        }
        Ok(bytes)
    }
}

/// Each V-tree with a member in `pool`, with the most chunks any member spans (a layer's chunks
/// lie below its members' sizes, which only grow).
fn trees_of(
    map: &proto::model::ClusterState,
    pool: PoolId,
) -> std::collections::BTreeMap<proto::VtreeId, u64> {
    let mut out = std::collections::BTreeMap::new();
    for v in map.volumes.values().filter(|v| v.pool == pool) {
        let chunks = v.size_bytes.div_ceil(CHUNK_SIZE);
        let e = out.entry(v.vtree).or_insert(0);
        *e = chunks.max(*e);
    }
    out
}
