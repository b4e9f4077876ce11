//! The I/O path: turns a volume's block requests into chunk requests to the primary SDS of each
//! piece's placement group, over cached QUIC connections, with map refresh and retry when an
//! SDS refuses a stale epoch or a PG it no longer holds, or cannot be reached.
//!
//! PERFORMANCE-CRITICAL: runs per 4 KiB request. No logging above DEBUG here, no allocation
//! beyond the response buffers.
//!
//! FLUSH semantics: each volume's [`FlushDebt`] (one per volume in this process, shared by all
//! its exports and attaches) records which SDS (primary, secondary and a copy being moved off,
//! of every PG written) took writes no flush has covered yet; a FLUSH is sent to all of them
//! (and to every holder of the pool when the debt says so: a new process, an SDS gone) and
//! acknowledged only when every one is durable. That is what makes CAN_MULTI_CONN truthful.

use crate::flush::{FlushDebt, Member, Outcome, Ticket};
use crate::metrics::{Op, SdcMetrics, VolumeIoMetrics};
use crate::qos::Throttle;
use crate::volume::{self, Piece};
use bytes::{Bytes, BytesMut};
use proto::client::MdmClient;
use proto::codec::{kind, Frame};
use proto::data::{DataHeader, DataOp, FLAG_FUA};
use proto::model::ClusterState;
use proto::msg::{MdmRequest, MdmResponse};
use proto::transport::{Endpoint, RpcClient};
use proto::{ChunkId, ChunkIndex, ErrorCode, SdsId, VolumeId, CHUNK_SIZE};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Chunks asked about in one block-status request.
pub const BLOCK_STATUS_CHUNKS_MAX: u64 = 4096;
/// Pause before retrying a request that found no usable copy.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How long a map refresh may take.
const MAP_REFRESH_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one chunk request may take on one SDS before it is retried elsewhere.
const SDS_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A request waiting this long makes the SDC poll the MDM fast ([`IoPath::fast_poll`]), so a
/// failover is seen within a poll period.
const STUCK_AFTER: Duration = Duration::from_millis(200);
/// The fast poll period while requests are stuck.
const FAST_POLL: Duration = Duration::from_millis(150);

static ZEROS: [u8; CHUNK_SIZE as usize] = [0u8; CHUNK_SIZE as usize];

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum IoError {
    #[error("the volume is no longer mapped or no longer exists")]
    VolumeGone,
    #[error("no copy of the data is reachable: {0}")]
    Unavailable(String),
    #[error("the storage failed the request: {0}")]
    Storage(String),
    #[error("the pool is out of space: {0}")]
    NoSpace(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("this host's mapping of the volume was fenced (the volume was taken over by another host): {0}")]
    Fenced(String),
}

/// Shared by every volume of this SDC: the map, the MDM client and the SDS connections.
pub struct IoPath {
    map: RwLock<Arc<ClusterState>>,
    mdm: Arc<MdmClient>,
    endpoint: Endpoint,
    conns: Mutex<HashMap<SdsId, RpcClient>>,
    refreshing: tokio::sync::Mutex<()>,
    io_timeout: Duration,
    /// Bumped on every installed map.
    changed: tokio::sync::watch::Sender<u64>,
    /// Requests waiting longer than [`STUCK_AFTER`] right now.
    stuck: std::sync::atomic::AtomicUsize,
    /// This SDC's id once registered (0 before): map polls carry it as the session heartbeat.
    /// It changes if the SDC registers again after the cluster removed it.
    me: std::sync::atomic::AtomicU64,
    /// The MDM answered a map poll that this SDC is not registered (it was removed while cut
    /// off): [`crate::daemon::follow_map`] registers it again.
    unregistered: std::sync::atomic::AtomicBool,
    /// Per volume, the flushes it owes: one for every export and attach of the volume, kept
    /// for the life of the process (a rename or a re-export keeps its debt).
    debts: Mutex<HashMap<VolumeId, Arc<FlushDebt>>>,
    /// Per volume, its QoS limits on this host (from its mapping to this SDC), shared by every
    /// export and attach of the volume.
    throttles: Mutex<HashMap<VolumeId, Arc<Throttle>>>,
    metrics: Arc<SdcMetrics>,
    /// Per volume, its I/O metric handles, shared by every export and attach of the volume.
    volume_metrics: Mutex<HashMap<VolumeId, VolumeIoMetrics>>,
}

/// Counts a request as stuck while alive.
struct Stuck<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Stuck<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl IoPath {
    pub fn new(
        mdm: Arc<MdmClient>,
        endpoint: Endpoint,
        io_timeout: Duration,
        metrics: Arc<SdcMetrics>,
    ) -> Arc<IoPath> {
        Arc::new(IoPath {
            map: RwLock::new(Arc::new(ClusterState::default())),
            mdm,
            endpoint,
            conns: Mutex::new(HashMap::new()),
            refreshing: tokio::sync::Mutex::new(()),
            io_timeout,
            changed: tokio::sync::watch::channel(0).0,
            stuck: std::sync::atomic::AtomicUsize::new(0),
            me: std::sync::atomic::AtomicU64::new(0),
            unregistered: std::sync::atomic::AtomicBool::new(false),
            debts: Mutex::new(HashMap::new()),
            throttles: Mutex::new(HashMap::new()),
            metrics,
            volume_metrics: Mutex::new(HashMap::new()),
        })
    }

    /// Every volume's I/O on this host so far (those it has served), for the map poll.
    fn io_counters(&self) -> Vec<(VolumeId, proto::msg::IoCounters)> {
        let all = self
            .volume_metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        all.iter().map(|(v, m)| (*v, m.counters())).collect()
    }

    /// The I/O metric handles of `volume` (labelled with its name in the current map when this
    /// process first serves it).
    pub fn metrics_of(&self, volume: VolumeId) -> VolumeIoMetrics {
        let mut all = self
            .volume_metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        all.entry(volume)
            .or_insert_with(|| {
                let map = self.map();
                let name = map
                    .volumes
                    .get(&volume)
                    .map_or_else(|| volume.to_string(), |v| v.name.clone());
                self.metrics.volume_io(volume, &name)
            })
            .clone()
    }

    /// The flush debt of `volume`, shared by every export and attach of it. A volume this
    /// process has not served before starts owing a flush to every SDS holding its pool.
    pub fn debt_of(&self, volume: VolumeId) -> Arc<FlushDebt> {
        let mut debts = match self.debts.lock() {
            Ok(d) => d,
            Err(p) => p.into_inner(),
        };
        debts
            .entry(volume)
            .or_insert_with(|| Arc::new(FlushDebt::new_process()))
            .clone()
    }

    /// The QoS throttle of `volume`, shared by every export and attach of it, with the limits
    /// of the volume's mapping to this SDC in the current map.
    pub fn throttle_of(&self, volume: VolumeId) -> Arc<Throttle> {
        let t = {
            let mut all = self.throttles.lock().unwrap_or_else(|p| p.into_inner());
            all.entry(volume).or_default().clone()
        };
        self.apply_limits(&self.map(), volume, &t);
        t
    }

    /// Every volume's throttle, for metrics.
    pub fn throttles(&self) -> Vec<(VolumeId, Arc<Throttle>)> {
        let all = self.throttles.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().map(|(v, t)| (*v, t.clone())).collect()
    }

    /// Sets `t` to the limits of `volume`'s mapping to this SDC in `map` (none while this SDC
    /// is not registered or the volume is not mapped here).
    fn apply_limits(&self, map: &ClusterState, volume: VolumeId, t: &Throttle) {
        let me = self.me();
        let (iops, kbps) = map
            .mappings
            .iter()
            .find(|m| m.volume == volume && Some(m.sdc) == me)
            .map_or((0, 0), |m| (m.iops_limit, m.bandwidth_limit_kbps));
        t.set_limits(iops, kbps);
    }

    /// Record this SDC's id (after registration, and again after registering anew) for the
    /// session heartbeat, the fences and the QoS limits of its mappings.
    pub fn set_me(&self, id: proto::SdcId) {
        self.me.store(id.0, std::sync::atomic::Ordering::Relaxed);
        self.unregistered
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let map = self.map();
        for (volume, t) in self.throttles() {
            self.apply_limits(&map, volume, &t);
        }
    }

    /// Poll the MDM every [`FAST_POLL`] while some request is stuck (its SDS may be dead and
    /// the MDM about to move its PGs). Runs for the life of the process.
    pub async fn fast_poll(self: Arc<Self>) {
        let mut tick = tokio::time::interval(FAST_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.stuck.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                self.refresh_map().await;
            }
        }
    }

    /// Resolves once the map names another primary for `pg` of `pool` than `primary`; after
    /// [`STUCK_AFTER`] it also counts as stuck, which speeds up map polling.
    async fn primary_moved(&self, pool: proto::PoolId, pg: proto::PgId, primary: SdsId) {
        let mut rx = self.changed.subscribe();
        let moved = |m: &ClusterState| {
            m.pools
                .get(&pool)
                .and_then(|p| p.pg(pg))
                .is_none_or(|x| x.primary != Some(primary))
        };
        let wait = async {
            loop {
                if moved(&self.map()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        let mut wait = std::pin::pin!(wait);
        if tokio::time::timeout(STUCK_AFTER, &mut wait).await.is_ok() {
            return;
        }
        self.stuck
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _stuck = Stuck(&self.stuck);
        wait.await
    }

    pub fn map(&self) -> Arc<ClusterState> {
        self.map.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Install a newer map (older or equal versions are ignored).
    pub fn set_map(&self, m: ClusterState) -> bool {
        if let Ok(mut cur) = self.map.write() {
            if m.version > cur.version {
                let v = m.version;
                let m = Arc::new(m);
                *cur = m.clone();
                drop(cur);
                for (volume, t) in self.throttles() {
                    self.apply_limits(&m, volume, &t);
                }
                self.changed.send_replace(v);
                return true;
            }
        }
        false
    }

    /// Ask the MDM for a newer map; concurrent callers share one request.
    pub async fn refresh_map(&self) -> bool {
        let known = self.map().version;
        let _g = self.refreshing.lock().await;
        if self.map().version > known {
            return true;
        }
        match self
            .mdm
            .request(
                &MdmRequest::GetMap {
                    known_version: known,
                    sdc: self.me(),
                    throttled_ms: self
                        .throttles()
                        .into_iter()
                        .map(|(v, t)| (v, t.throttled().as_millis() as u64))
                        .collect(),
                    io: self.io_counters(),
                },
                MAP_REFRESH_TIMEOUT,
            )
            .await
        {
            Ok(MdmResponse::Map { state: Some(s) }) => self.set_map(*s),
            Err(e) if e.code == ErrorCode::NotFound && self.me().is_some() => {
                tracing::warn!("the MDM no longer knows this SDC: {}", e.message);
                self.unregistered
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                false
            }
            _ => false,
        }
    }

    /// This SDC's id, once registered.
    pub fn me(&self) -> Option<proto::SdcId> {
        match self.me.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            id => Some(proto::SdcId(id)),
        }
    }

    /// Whether the MDM said this SDC is not registered (since the last [`Self::set_me`]).
    pub fn unregistered(&self) -> bool {
        self.unregistered.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn conn(&self, sds: SdsId, map: &ClusterState) -> Result<RpcClient, IoError> {
        if let Some(c) = self.conns.lock().ok().and_then(|c| c.get(&sds).cloned()) {
            if !c.is_closed() {
                return Ok(c);
            }
        }
        let addr = map
            .sds
            .get(&sds)
            .and_then(|s| s.addr.parse().ok())
            .ok_or_else(|| IoError::Unavailable(format!("SDS {sds} has no address in the map")))?;
        let c = self
            .endpoint
            .connect_data(addr)
            .await
            .map_err(|e| IoError::Unavailable(format!("SDS {sds}: {e}")))?;
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(sds, c.clone());
        }
        Ok(c)
    }

    fn drop_conn(&self, sds: SdsId) {
        if let Ok(mut c) = self.conns.lock() {
            c.remove(&sds);
        }
    }

    /// Send one request to one SDS (no routing, no retry).
    async fn send(
        &self,
        sds: SdsId,
        map: &ClusterState,
        h: DataHeader,
        data: Bytes,
    ) -> Result<Frame, (ErrorCode, String)> {
        let c = self
            .conn(sds, map)
            .await
            .map_err(|e| (ErrorCode::Unavailable, e.to_string()))?;
        let f = Frame::request(kind::DATA, Bytes::copy_from_slice(&h.encode()), data);
        match c.call_timeout(f, SDS_CALL_TIMEOUT).await {
            Ok(f) if f.status == 0 => Ok(f),
            Ok(f) => Err((
                ErrorCode::from_u16(f.status).unwrap_or(ErrorCode::Internal),
                String::from_utf8_lossy(&f.meta).into_owned(),
            )),
            Err(e) => {
                self.drop_conn(sds);
                Err((ErrorCode::Unavailable, e.to_string()))
            }
        }
    }
}

/// The I/O face of one mapped volume.
pub struct VolumeIo {
    io: Arc<IoPath>,
    pub volume: VolumeId,
    debt: Arc<FlushDebt>,
    qos: Arc<Throttle>,
    metrics: VolumeIoMetrics,
}

impl VolumeIo {
    pub fn new(io: Arc<IoPath>, volume: VolumeId) -> VolumeIo {
        let debt = io.debt_of(volume);
        let qos = io.throttle_of(volume);
        let metrics = io.metrics_of(volume);
        VolumeIo {
            io,
            volume,
            debt,
            qos,
            metrics,
        }
    }

    /// Count a finished request of `op` (`bytes` long, started at `started`) by its outcome.
    fn account<T>(
        &self,
        op: Op,
        bytes: u64,
        started: std::time::Instant,
        r: Result<T, IoError>,
    ) -> Result<T, IoError> {
        match &r {
            Ok(_) => {
                let seconds = started.elapsed().as_secs_f64();
                self.metrics.done(op, bytes, seconds);
            }
            Err(IoError::Unavailable(_)) => {
                self.metrics.timeouts.inc();
            }
            Err(IoError::Fenced(_)) => {
                self.metrics.fenced.inc();
            }
            Err(e) => self.metrics.error(match e {
                IoError::VolumeGone => "volume_gone",
                IoError::Storage(_) => "storage",
                IoError::NoSpace(_) => "no_space",
                _ => "invalid",
            }),
        }
        r
    }

    pub fn size(&self) -> u64 {
        self.io
            .map()
            .volumes
            .get(&self.volume)
            .map(|v| v.size_bytes)
            .unwrap_or(0)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let size = self.size();
        if size == 0 {
            return Err(IoError::VolumeGone);
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(IoError::Invalid(format!(
                "range {offset}+{len} is beyond the volume's {size} bytes"
            ))),
        }
    }

    /// The generation of this SDC's mapping of the volume, stamped on every request as the
    /// fence. `None` once the mapping is gone (unmapped, or taken over by another host).
    fn generation(&self, map: &ClusterState) -> Option<u64> {
        let Some(me) = self.io.me() else {
            // Not registered (tools that drive an IoPath by hand): no mapping to show.
            return Some(0);
        };
        map.mappings
            .iter()
            .find(|m| m.volume == self.volume && m.sdc == me)
            .map(|m| m.generation)
    }

    /// Run `op` on one piece at the current primary, retrying through map changes until the
    /// I/O timeout.
    async fn piece_op(
        &self,
        op: DataOp,
        flags: u8,
        p: Piece,
        data: Bytes,
    ) -> Result<Bytes, IoError> {
        let deadline = tokio::time::Instant::now() + self.io.io_timeout;
        let mut last;
        let mut tried: Option<Option<SdsId>> = None;
        loop {
            let map = self.io.map();
            let (vol, pool) = volume::lookup(&map, self.volume).ok_or(IoError::VolumeGone)?;
            let fence = self.generation(&map).ok_or(IoError::VolumeGone)?;
            // The layer the volume writes to in this map (a snapshot since gives it a new one).
            let chunk = p.chunk.in_layer(vol.layer);
            let route = volume::route(pool, chunk)
                .ok_or_else(|| IoError::Unavailable("the pool has no placement".into()))?;
            if let Some(before) = tried.replace(route.mapping.primary) {
                self.metrics.retries.inc();
                if before != route.mapping.primary {
                    self.metrics.reroutes.inc();
                }
            }
            if let Some(primary) = route.mapping.primary {
                let h = DataHeader {
                    op,
                    flags,
                    pool: pool.id,
                    pg: route.pg,
                    epoch: route.epoch,
                    chunk,
                    offset: p.offset,
                    len: p.len,
                    fence,
                };
                let sent = tokio::select! {
                    r = self.io.send(primary, &map, h, data.clone()) => r,
                    _ = self.io.primary_moved(pool.id, route.pg, primary) => Err((
                        ErrorCode::StaleEpoch,
                        format!("PG {} moved away from SDS {primary}", route.pg),
                    )),
                };
                match sent {
                    Ok(f) => {
                        if op != DataOp::Read {
                            // A copy being moved off (rebalance) also took the write.
                            let copies: Vec<Member> = [
                                Some(primary),
                                route.mapping.secondary,
                                route.mapping.leaving,
                            ]
                            .into_iter()
                            .flatten()
                            .map(|s| {
                                let boot = map.sds.get(&s).map_or("", |x| x.boot.as_str());
                                Member {
                                    copy: (s, proto::data::boot_tag(boot)),
                                    pg: (pool.id, route.pg),
                                }
                            })
                            .collect();
                            self.debt.record(&copies);
                        }
                        return Ok(f.data);
                    }
                    Err((
                        ErrorCode::StaleEpoch | ErrorCode::WrongPg | ErrorCode::Unavailable,
                        m,
                    )) => last = m,
                    Err((ErrorCode::NoSpace, m)) => return Err(IoError::NoSpace(m)),
                    Err((ErrorCode::BadRequest, m)) => return Err(IoError::Invalid(m)),
                    Err((ErrorCode::Fenced, m)) => {
                        // Learn the new map soon (it unmaps the volume here); never retry.
                        self.io.refresh_map().await;
                        return Err(IoError::Fenced(m));
                    }
                    Err((_, m)) => return Err(IoError::Storage(m)),
                }
            } else {
                last = format!("PG {} of pool {} has no copy assigned", route.pg, pool.name);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(IoError::Unavailable(last));
            }
            if !self.io.refresh_map().await {
                // Nothing newer yet: wait for a map change (the fast poll is running while
                // requests are stuck), at most a short pause.
                let mut rx = self.io.changed.subscribe();
                let _ = tokio::time::timeout(RETRY_PAUSE, rx.changed()).await;
            }
        }
    }

    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<Piece>, IoError> {
        self.check_range(offset, len)?;
        let map = self.io.map();
        let (vol, _) = volume::lookup(&map, self.volume).ok_or(IoError::VolumeGone)?;
        Ok(volume::split(vol, offset, len))
    }

    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let started = std::time::Instant::now();
        let r = self.read_pieces(offset, len).await;
        self.account(Op::Read, u64::from(len), started, r)
    }

    async fn read_pieces(&self, offset: u64, len: u32) -> Result<Bytes, IoError> {
        let pieces = self.pieces(offset, u64::from(len))?;
        self.qos.admit(u64::from(len)).await;
        if let [p] = pieces.as_slice() {
            return self.piece_op(DataOp::Read, 0, *p, Bytes::new()).await;
        }
        let parts = futures_join(
            pieces
                .iter()
                .map(|p| self.piece_op(DataOp::Read, 0, *p, Bytes::new())),
        )
        .await;
        let mut out = BytesMut::with_capacity(len as usize);
        for (p, r) in pieces.iter().zip(parts) {
            let b = r?;
            if b.len() != p.len as usize {
                return Err(IoError::Storage(format!(
                    "short read from chunk {}",
                    p.chunk
                )));
            }
            out.extend_from_slice(&b);
        }
        Ok(out.freeze())
    }

    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let (started, len) = (std::time::Instant::now(), data.len() as u64);
        let r = self.write_pieces(offset, data, fua).await;
        self.account(Op::Write, len, started, r)
    }

    async fn write_pieces(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        let pieces = self.pieces(offset, data.len() as u64)?;
        self.qos.admit(data.len() as u64).await;
        let flags = if fua { FLAG_FUA } else { 0 };
        let rs = futures_join(pieces.iter().map(|p| {
            let d = data.slice(p.buf_offset..p.buf_offset + p.len as usize);
            self.piece_op(DataOp::Write, flags, *p, d)
        }))
        .await;
        rs.into_iter().try_for_each(|r| r.map(|_| ()))
    }

    /// Deallocate: whole chunks are freed on the SDS, partial ones are zeroed.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.zero_or_trim(offset, len, true).await
    }

    pub async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), IoError> {
        self.zero_or_trim(offset, len, may_trim).await
    }

    async fn zero_or_trim(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), IoError> {
        let started = std::time::Instant::now();
        let r = self.zero_or_trim_pieces(offset, len, may_trim).await;
        self.account(Op::Trim, len, started, r)
    }

    async fn zero_or_trim_pieces(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<(), IoError> {
        let pieces = self.pieces(offset, len)?;
        // One I/O; no data crosses the network.
        self.qos.admit(0).await;
        for batch in pieces.chunks(64) {
            let rs = futures_join(batch.iter().map(|p| {
                let whole = p.offset == 0 && u64::from(p.len) == CHUNK_SIZE;
                if whole && may_trim {
                    self.piece_op(DataOp::Trim, 0, *p, Bytes::new())
                } else {
                    self.piece_op(
                        DataOp::Write,
                        0,
                        *p,
                        Bytes::from_static(&ZEROS[..p.len as usize]),
                    )
                }
            }))
            .await;
            rs.into_iter().try_for_each(|r| r.map(|_| ()))?;
        }
        Ok(())
    }

    /// Make every write acknowledged before this call (through any export or attach of the
    /// volume) durable on every copy. Owed SDS that turn out to be gone hand their debt to every
    /// holder of the pool, flushed in a further round (at most one per SDS of the map).
    pub async fn flush(&self) -> Result<(), IoError> {
        let started = std::time::Instant::now();
        let r = self.flush_rounds().await;
        self.account(Op::Flush, 0, started, r)
    }

    async fn flush_rounds(&self) -> Result<(), IoError> {
        let rounds = self.io.map().sds.len() + 1;
        for _ in 0..rounds {
            let ticket = self.debt.ticket();
            if ticket.is_empty() {
                return Ok(());
            }
            if !self.flush_round(&ticket).await? {
                return Ok(());
            }
        }
        Err(IoError::Unavailable(
            "flush: the SDS holding the volume kept going down while it was flushed; retry".into(),
        ))
    }

    /// Flush what `ticket` owes; true when an owed SDS was gone and every holder must be
    /// flushed in another round.
    async fn flush_round(&self, ticket: &Ticket) -> Result<bool, IoError> {
        let mut targets = ticket.sds();
        let holders = if ticket.all_holders {
            self.holders()?
        } else {
            Vec::new()
        };
        for h in &holders {
            if !targets.contains(h) {
                targets.push(*h);
            }
        }
        let rs = futures_join(targets.iter().map(|sds| self.flush_one(*sds))).await;
        let mut outcomes = HashMap::new();
        let mut failed = Vec::new();
        for (sds, r) in targets.iter().zip(rs) {
            match r {
                Ok(o) => {
                    outcomes.insert(*sds, o);
                }
                Err(m) => {
                    outcomes.insert(*sds, Outcome::Failed);
                    failed.push((*sds, m));
                }
            }
        }
        let holders_flushed = holders
            .iter()
            .all(|h| !matches!(outcomes.get(h), Some(Outcome::Failed) | None));
        let map = self.io.map();
        let settled = self
            .debt
            .settle(ticket, &outcomes, holders_flushed, |sds, pool, pg| {
                map.pools
                    .get(&pool)
                    .and_then(|p| p.pg(pg))
                    .is_some_and(|m| m.primary == Some(sds) || m.in_sync_secondary() == Some(sds))
            });
        if let Some(group) = settled.lost.first() {
            let name = |id: SdsId| {
                self.io
                    .map()
                    .sds
                    .get(&id)
                    .map_or(id.to_string(), |x| x.name.clone())
            };
            let names: Vec<String> = group.iter().map(|c| name(c.0)).collect();
            tracing::error!(
                volume = %self.volume,
                sets = settled.lost.len(),
                "acknowledged writes were lost: every copy's host restarted before a flush reached it"
            );
            return Err(IoError::Storage(format!(
                "acknowledged writes not yet flushed were lost: every copy of them (SDS {}) \
                 restarted its host before a flush reached it",
                names.join(", ")
            )));
        }
        if let Some((sds, m)) = failed.first() {
            // What failed stays owed: a later flush must try again.
            return Err(IoError::Storage(format!(
                "flush failed on {} SDS (SDS {sds}: {m})",
                failed.len()
            )));
        }
        Ok(settled.need_holders)
    }

    /// Every SDS holding a copy of a PG of the volume's pool.
    fn holders(&self) -> Result<Vec<SdsId>, IoError> {
        let map = self.io.map();
        let (_, pool) = volume::lookup(&map, self.volume).ok_or(IoError::VolumeGone)?;
        let set: HashSet<SdsId> = pool
            .pgs
            .iter()
            .flat_map(|m| [m.primary, m.secondary, m.leaving])
            .flatten()
            .collect();
        let mut v: Vec<SdsId> = set.into_iter().collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Flush one SDS, retrying through reconnects until the I/O timeout; the answer names the
    /// boot of the host that made the writes durable. An SDS the MDM declared down that no PG
    /// waits for any more is [`Outcome::Gone`]: every write it acknowledged is also on a copy
    /// that took over, which the caller flushes instead.
    async fn flush_one(&self, sds: SdsId) -> Result<Outcome, String> {
        let deadline = tokio::time::Instant::now() + self.io.io_timeout;
        let h = DataHeader::flush();
        loop {
            let map = self.io.map();
            let down = map
                .sds
                .get(&sds)
                .is_none_or(|x| x.state == proto::model::SdsState::Down);
            let waited_for = map
                .pools
                .values()
                .any(|p| p.pgs.iter().any(|m| m.primary == Some(sds)));
            if down && !waited_for {
                return Ok(Outcome::Gone);
            }
            let last = match self.io.send(sds, &map, h, Bytes::new()).await {
                Ok(f) => {
                    // An SDS that does not say (older) is taken to be the one written to.
                    let tag = f
                        .data
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_le_bytes);
                    return Ok(Outcome::Durable(tag));
                }
                Err((ErrorCode::Unavailable, m)) => m,
                Err((_, m)) => return Err(m),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(last);
            }
            if !self.io.refresh_map().await {
                let mut rx = self.io.changed.subscribe();
                let _ = tokio::time::timeout(RETRY_PAUSE, rx.changed()).await;
            }
        }
    }

    /// Allocation of `[offset, offset+len)` by whole chunks: `(length, allocated)` runs.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, IoError> {
        self.check_range(offset, len)?;
        let map = self.io.map();
        let (vol, pool) = volume::lookup(&map, self.volume).ok_or(IoError::VolumeGone)?;
        // Fenced like reads: an SDS answers only under this host's current mapping.
        let fence = self.generation(&map).ok_or(IoError::VolumeGone)?;
        let first = offset / CHUNK_SIZE;
        let last = (offset + len)
            .div_ceil(CHUNK_SIZE)
            .min(first + BLOCK_STATUS_CHUNKS_MAX);
        let count = last - first;
        let holders: HashSet<SdsId> = pool
            .pgs
            .iter()
            .flat_map(|m| [m.primary, m.secondary])
            .flatten()
            .collect();
        let mut allocated = vec![false; count as usize];
        let rs = futures_join(holders.iter().map(|sds| {
            let h = DataHeader {
                op: DataOp::AllocStatus,
                flags: 0,
                pool: pool.id,
                pg: proto::PgId(0),
                epoch: pool.epoch,
                chunk: ChunkId::new(vol.vtree, ChunkIndex(first)).in_layer(vol.layer),
                offset: 0,
                len: count as u32,
                fence,
            };
            self.io.send(*sds, &map, h, Bytes::new())
        }))
        .await;
        for r in rs {
            match r {
                Ok(f) => {
                    for (a, b) in allocated.iter_mut().zip(f.data.iter()) {
                        *a |= *b != 0;
                    }
                }
                // Unknown is reported as allocated: never claim a hole we are not sure of.
                Err(_) => allocated.iter_mut().for_each(|a| *a = true),
            }
        }
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut pos = offset;
        let end = (offset + len).min(last * CHUNK_SIZE);
        for (i, a) in allocated.iter().enumerate() {
            let chunk_end = ((first + i as u64 + 1) * CHUNK_SIZE).min(end);
            if chunk_end <= pos {
                continue;
            }
            let n = chunk_end - pos;
            match runs.last_mut() {
                Some((l, prev)) if *prev == *a => *l += n,
                _ => runs.push((n, *a)),
            }
            pos = chunk_end;
        }
        Ok(runs)
    }
}

/// Run futures concurrently on this task and collect their results in order.
pub async fn futures_join<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    let mut futs: Vec<Option<_>> = futs.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, slot) in futs.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        out[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
