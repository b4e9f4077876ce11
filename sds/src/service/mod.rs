//! The SDS data service: the [`Handler`] for `kind::DATA` frames (the fixed 64-byte
//! [`DataHeader`] as metadata, raw block bytes as data). It fences every request against the
//! cached map ([`crate::routing`]), applies it to local [`Storage`], and mirrors primary writes
//! to the PG's secondary ([`crate::replication`]).
//!
//! PERFORMANCE-CRITICAL: runs per request; no logging above DEBUG on the I/O path.
//!
//! Rules:
//! - Every request first passes [`crate::authz`]: may the sender's certificate role send this
//!   op? Then: an SDC's Read, Write, Trim, WriteZeroes and AllocStatus carry the generation of
//!   a current mapping of the volume to that SDC (the fence); an SDS's ReplicaWrite and
//!   ReplicaTrim come from the PG's primary, Repair from its secondary, ReadLocal from another
//!   holder of the PG.
//! - Read, Write, Trim and WriteZeroes need this SDS to be the PG's primary; ReplicaWrite and
//!   ReplicaTrim its secondary; ReadLocal any copy. The chunk must map to the PG.
//!   A request whose epoch is older than the newest this SDS saw for the pool is refused with
//!   `StaleEpoch`; a newer one makes the SDS fetch the map first.
//! - The primary writes locally and forwards to the secondary in parallel, and acknowledges
//!   only when both copies are written. It holds the chunk's block-range lock across both, so
//!   overlapping writes reach the two copies in the same order. A PG without a secondary
//!   (degraded) is written locally only. A forward the secondary refused for its newer map,
//!   after the local copy took the write, is sent again under that map before the lock is
//!   released (`resend_refused`), so the copies agree even where the client's retry goes
//!   elsewhere (a layer a snapshot froze meanwhile).
//! - FUA: write, then flush, on both copies (the flag is forwarded). Flush flushes every local
//!   device; the SDC sends it to every SDS it wrote to, so the primary forwards nothing. Its
//!   answer is this host's boot tag (see [`proto::data`]).
//! - WriteZeroes is forwarded as ReplicaTrim: both make the range read as zeros here.
//! - ReadLocal reads this SDS's copy whatever its role; AllocStatus answers one byte per chunk
//!   (under the lease and the pool's current epoch).
//! - Errors: device failure → `Unavailable` (the device is taken out of I/O and reported
//!   failed; the MDM moves its PGs to their other copy, where the SDC retries; a primary read
//!   is served from the secondary at once), checksum mismatch →
//!   `Checksum`, malformed header or data length → `BadRequest`, fence → `StaleEpoch`/`WrongPg`,
//!   secondary unreachable → `Unavailable` (the SDC retries until the MDM re-maps the PG).
//! - A forward that timed out is not applied later: the primary drops the connection it used,
//!   and the secondary refuses forwards from a connection older than the newest one the same
//!   primary sent a forward on (checked under the blocks' order lock, see `replica_apply`).
//! - **Lease**: no write or trim, client or forwarded, is applied or acknowledged after this
//!   SDS's lease ran out. The fence checks it on arrival; it is checked again once the range
//!   lock is held (the wait may be long), right before the local apply, and before the
//!   acknowledgement (`Unavailable`: the SDC retries, by then on the copy that took over).
//!
//! Submodules: `layers` (I/O through the layers of a V-tree with snapshots), `repair` (blocks
//! that failed their checksum, reads from the other copy) and `rebuild` (copying chunks onto a
//! rebuilding copy).

use crate::authz::{self, PgCopy};
use crate::chunk_store::StoreError;
use crate::device::BlockDevice;
use crate::metrics::SdsMetrics;
use crate::range_lock::{BlockMask, RangeLocks};
use crate::replication::{ForwardError, Replicator};
use crate::routing::{MapCache, Refusal, Role, Route};
use crate::storage::Storage;
use bytes::Bytes;
use proto::ca::CertRole;
use proto::codec::{kind, Frame};
use proto::data::{DataHeader, DataOp, FLAG_FUA};
use proto::model::PgMapping;
use proto::transport::{Endpoint, Handler, Peer, Response};
use proto::{ErrorCode, WireError};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod layers;
mod rebuild;
mod repair;

/// Most chunks one AllocStatus request may ask about (the answer is one byte each).
pub const ALLOC_STATUS_MAX_CHUNKS: u32 = 1 << 16;
/// Checksum (and repair) granularity.
const BLOCK_BYTES: u32 = 4096;

/// Timeouts of the data service.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// How long a forward to the secondary may take (below the SDC's 10 s call timeout, so
    /// the SDC hears `Unavailable` and retries rather than timing out).
    pub forward_timeout: Duration,
    /// How long dialling a secondary may take.
    pub dial_timeout: Duration,
    /// How long a request from a newer epoch waits for the newer map.
    pub refresh_timeout: Duration,
    /// The [`proto::data::boot_tag`] of this host's boot, the answer to every flush.
    pub boot_tag: u64,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            forward_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(2),
            refresh_timeout: Duration::from_secs(2),
            boot_tag: 0,
        }
    }
}

/// The data service of one SDS.
pub struct Service<D> {
    storage: Arc<Storage<D>>,
    map: Arc<MapCache>,
    replicas: Replicator,
    order: RangeLocks,
    metrics: Arc<SdsMetrics>,
    opts: ServiceOptions,
    /// Chunks written while a PG lacked an in-sync secondary (backward rebuild).
    dirty: crate::rebuild::DirtyLog,
    /// Per peer SDS, the newest connection a forwarded write came on ([`Peer::conn`]).
    replica_conns: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// This SDS's budget for background chunk copies: rebuild and rebalance sources, and
    /// moves off a device being removed.
    copy_throttle: crate::rebuild::Throttle,
}

fn bad_request(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorCode::BadRequest, msg)
}

impl<D: BlockDevice> Service<D> {
    /// A service over `storage`, fenced by `map` (which [`crate::mdm_client`] keeps current),
    /// forwarding through `endpoint`. Serve it with `endpoint.serve(service)`.
    pub fn new(
        storage: Arc<Storage<D>>,
        map: Arc<MapCache>,
        endpoint: Endpoint,
        metrics: Arc<SdsMetrics>,
        opts: ServiceOptions,
    ) -> Arc<Service<D>> {
        Arc::new(Service {
            storage,
            map,
            replicas: Replicator::new(endpoint, opts.dial_timeout, opts.forward_timeout),
            order: RangeLocks::new(),
            metrics,
            opts,
            dirty: Default::default(),
            replica_conns: Default::default(),
            copy_throttle: Default::default(),
        })
    }

    pub fn dirty(&self) -> &crate::rebuild::DirtyLog {
        &self.dirty
    }

    /// The throttle every background chunk copy of this SDS passes (pool policy per copy).
    pub fn copy_throttle(&self) -> &crate::rebuild::Throttle {
        &self.copy_throttle
    }

    pub fn storage(&self) -> &Arc<Storage<D>> {
        &self.storage
    }

    pub fn map(&self) -> &Arc<MapCache> {
        &self.map
    }

    pub fn metrics(&self) -> &Arc<SdsMetrics> {
        &self.metrics
    }

    /// Set the gauges from the current state (call before rendering metrics).
    pub fn update_gauges(&self) {
        self.metrics
            .chunks_allocated
            .set(self.storage.chunk_count() as i64);
        self.metrics.map_version.set(self.map.version() as i64);
        self.metrics.leased.set(i64::from(self.map.leased()));
        self.metrics.journal_overlay_blocks.set(
            self.storage
                .devices()
                .iter()
                .map(|d| d.store.overlay_blocks() as i64)
                .sum(),
        );
        for d in self.storage.devices().iter() {
            self.metrics.set_device_failed(&d.path, d.failed());
            let (used, size) = d.store.journal_fill();
            self.metrics.set_device_journal(&d.path, used, size);
        }
        let devices = self.storage.devices();
        self.metrics.journal_records_merged.set(
            devices
                .iter()
                .map(|d| d.store.device().log_writes_merged())
                .sum(),
        );
        self.metrics
            .out_of_place_writes
            .set(devices.iter().map(|d| d.store.out_of_place_writes()).sum());
    }

    async fn route(&self, h: &DataHeader, role: Role) -> Result<Route, WireError> {
        let r = match self.map.check(h, role) {
            Err(Refusal::NewerEpoch { .. }) => {
                self.map.refresh(self.opts.refresh_timeout).await;
                self.map.check(h, role)
            }
            r => r,
        };
        r.map_err(refusal)
    }

    /// The fence of a request about a whole pool (AllocStatus): lease and epoch.
    async fn route_pool(&self, h: &DataHeader) -> Result<(), WireError> {
        let r = match self.map.check_pool(h) {
            Err(Refusal::NewerEpoch { .. }) => {
                self.map.refresh(self.opts.refresh_timeout).await;
                self.map.check_pool(h)
            }
            r => r,
        };
        r.map_err(refusal)
    }

    /// The mapping fence: the I/O of the SDC named `sdc` on a volume must carry the generation
    /// of one of the volume's current mappings to that SDC (the SDC stamps it). A generation
    /// newer than this SDS's map makes it fetch the map first; a removed one (the volume was
    /// unmapped or taken over by another host) is refused with `Fenced`, whatever the
    /// request's epoch; another host's is refused with `PermissionDenied`. A request for a
    /// layer the volume no longer writes to (a snapshot froze it) is `StaleEpoch` once this
    /// SDS's map is current: the SDC refreshes its map and sends it to the new layer.
    async fn check_fence(&self, sdc: &str, h: &DataHeader) -> Result<(), WireError> {
        use proto::model::FenceCheck;
        let mut check = self.map.check_fence(h.chunk, h.fence, sdc);
        if matches!(check, FenceCheck::NewerThanMap | FenceCheck::OldLayer) {
            self.map.refresh(self.opts.refresh_timeout).await;
            check = self.map.check_fence(h.chunk, h.fence, sdc);
        }
        match check {
            FenceCheck::Allowed => Ok(()),
            FenceCheck::NewerThanMap => Err(WireError::new(
                ErrorCode::Unavailable,
                format!(
                    "mapping generation {} is newer than this SDS's map; retry",
                    h.fence
                ),
            )),
            FenceCheck::Fenced => Err(fenced(h)),
            FenceCheck::OldLayer => Err(old_layer(h)),
            FenceCheck::OtherHost => Err(WireError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "mapping generation {} of volume tree {} is not a mapping to SDC {sdc}; {:?} refused",
                    h.fence, h.chunk.vtree, h.op
                ),
            )),
        }
    }

    fn store_error(&self, e: StoreError) -> WireError {
        let code = match &e {
            StoreError::Device(d) => {
                self.metrics.device_errors.inc();
                if d.is_device_failure() {
                    // The device is out of this SDS's I/O now and the MDM moves the PGs it held
                    // copies of to their other copy: the client retries there.
                    return WireError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "{e}; this SDS's copy is being replaced by the PG's other copy: retry"
                        ),
                    );
                } else {
                    ErrorCode::Internal
                }
            }
            StoreError::ChecksumMismatch { chunk, offset } => {
                self.metrics.checksum_errors.inc();
                tracing::warn!(%chunk, offset, "stored block failed its checksum");
                ErrorCode::Checksum
            }
            StoreError::NoSpace => ErrorCode::NoSpace,
            StoreError::Range { .. } => ErrorCode::BadRequest,
            StoreError::Superblock(_)
            | StoreError::MetaVersion { .. }
            | StoreError::TooSmall { .. } => ErrorCode::Internal,
        };
        WireError::new(code, e.to_string())
    }

    fn forward_error(&self, e: ForwardError) -> WireError {
        let code = match &e {
            ForwardError::Refused { error, .. } => match error.code {
                // The secondary knows a newer map: so must we, and so must the SDC.
                ErrorCode::StaleEpoch | ErrorCode::WrongPg => {
                    self.map.request_refresh();
                    error.code
                }
                ErrorCode::NoSpace => ErrorCode::NoSpace,
                _ => ErrorCode::Unavailable,
            },
            ForwardError::Unreachable { .. } | ForwardError::Lost { .. } => ErrorCode::Unavailable,
        };
        tracing::debug!("forward failed: {e}");
        WireError::new(code, e.to_string())
    }

    /// Refuse unless the lease still holds: a write that waited (for the range lock, for the
    /// device) must not land or be acknowledged after the MDM may have moved its PG away.
    fn lease_held(&self, h: &DataHeader) -> Result<(), WireError> {
        if self.map.leased() {
            return Ok(());
        }
        self.metrics.lease_expired_writes.inc();
        tracing::debug!(chunk = %h.chunk, offset = h.offset, len = h.len, op = ?h.op,
            "refused a write: the lease ran out while it waited");
        Err(refusal(Refusal::NoLease))
    }

    /// Apply a write, trim or write-zeroes to the local copy (only under the lease); FUA
    /// flushes afterwards.
    async fn apply(&self, h: &DataHeader, data: &[u8]) -> Result<(), WireError> {
        self.lease_held(h)?;
        let r = match h.op {
            DataOp::Write | DataOp::ReplicaWrite => {
                self.metrics.writes.inc();
                self.metrics.written_bytes.inc_by(data.len() as u64);
                self.storage.write(h.chunk, h.offset, data).await
            }
            _ => {
                self.metrics.trims.inc();
                let thick = self
                    .map
                    .state()
                    .volume_by_vtree(h.chunk.vtree)
                    .is_some_and(|v| !v.thin);
                if thick {
                    self.storage.zero_keeping(h.chunk, h.offset, h.len).await
                } else {
                    self.storage.zero(h.chunk, h.offset, h.len).await
                }
            }
        };
        r.map_err(|e| self.store_error(e))?;
        if h.flags & proto::data::FLAG_COPY != 0 && h.op == DataOp::ReplicaWrite {
            self.metrics.rebuild_bytes_in.inc_by(data.len() as u64);
        }
        if h.flags & FLAG_FUA != 0 {
            self.storage
                .flush()
                .await
                .map_err(|e| self.store_error(e))?;
        }
        Ok(())
    }

    /// The secondary's side of a forward: apply it unless it came on a connection older than
    /// one the same primary has sent forwards on since. A primary gives up on a connection
    /// when a forward times out and sends later writes on a new one; a write held up on the
    /// old one must not land after them. The check and the apply hold the blocks' order lock,
    /// so a forward from the new connection cannot overtake one that passed the check.
    async fn replica_apply(
        &self,
        peer: &Peer,
        h: &DataHeader,
        data: &[u8],
    ) -> Result<(), WireError> {
        let _order = self
            .order
            .lock(h.chunk, BlockMask::bytes(h.offset, h.len))
            .await;
        crate::failpoints::delay_point(crate::failpoints::SERVICE_AFTER_RANGE_LOCK).await;
        self.lease_held(h)?;
        if !self.newest_replica_conn(peer) {
            self.metrics.stale_forwards_refused.inc();
            tracing::warn!(peer = %peer.name, chunk = %h.chunk, offset = h.offset, len = h.len,
                "refused a forward that came on a connection its primary has replaced (the primary timed it out and went on without it)");
            return Err(WireError::new(
                ErrorCode::Unavailable,
                "this forward came on a connection the primary has since replaced; not applied",
            ));
        }
        self.apply(h, data).await?;
        self.lease_held(h)
    }

    /// Whether `peer`'s connection is the newest one that SDS has sent forwards on (and note
    /// it as such).
    fn newest_replica_conn(&self, peer: &Peer) -> bool {
        let mut conns = self.replica_conns.lock().unwrap_or_else(|p| p.into_inner());
        match conns.get_mut(&peer.name) {
            Some(newest) if peer.conn < *newest => false,
            Some(newest) => {
                *newest = peer.conn;
                true
            }
            None => {
                conns.insert(peer.name.clone(), peer.conn);
                true
            }
        }
    }

    /// The primary's write (from the SDC named `sdc`): local and forward in parallel, under the
    /// chunk range lock. It re-checks the mapping fence if the map moved while it waited.
    async fn primary_write(
        &self,
        h: DataHeader,
        route: Route,
        data: Bytes,
        sdc: &str,
    ) -> Result<(), WireError> {
        let _order = self
            .order
            .lock(h.chunk, BlockMask::bytes(h.offset, h.len))
            .await;
        crate::failpoints::delay_point(crate::failpoints::SERVICE_AFTER_RANGE_LOCK).await;
        self.lease_held(&h)?;
        // The map may have changed while this write waited for the lock (a rebuild copy of
        // this chunk, for one, holds it): route again so the write reaches the current copies.
        let snapshot = self.map.snapshot();
        let map = &snapshot.state;
        let route = if map.version == route.version {
            route
        } else {
            // The volume may have been taken over while this write waited.
            use proto::model::FenceCheck;
            match snapshot.check_fence(h.chunk, h.fence, sdc) {
                FenceCheck::Fenced | FenceCheck::OtherHost => {
                    return Err(WireError::new(
                        ErrorCode::Fenced,
                        format!("mapping generation {} was fenced while the write waited; this host may not do I/O on the volume", h.fence),
                    ));
                }
                // A snapshot froze the layer while the write waited: it must not land there.
                FenceCheck::OldLayer => return Err(old_layer(&h)),
                FenceCheck::Allowed | FenceCheck::NewerThanMap => {}
            }
            self.map.check(&h, Role::Primary).map_err(refusal)?
        };
        // A member of a V-tree with snapshots below it: partial blocks it has not written take
        // their rest from the layers below, and trims of blocks those hold become zeros.
        let (h, data) = self.resolve_layers(h, data).await?;
        let in_sync = route.secondary.is_some()
            && map
                .pools
                .get(&h.pool)
                .and_then(|p| p.pg(h.pg))
                .is_some_and(|m| m.rebuild.is_none());
        let _tracked = self.dirty.write_started(
            h.pool,
            h.pg,
            h.epoch,
            h.chunk,
            route.version,
            in_sync && map.version == route.version,
        );
        let Some((sds, addr)) = route.secondary else {
            self.apply(&h, &data).await?;
            return self.lease_held(&h);
        };
        let replica = DataHeader {
            op: if h.op == DataOp::Write {
                DataOp::ReplicaWrite
            } else {
                DataOp::ReplicaTrim
            },
            ..h
        };
        crate::failpoints::fail_point(crate::failpoints::SERVICE_BEFORE_FORWARD);
        self.metrics.forwards.inc();
        // The forward goes first: its first poll queues the frame for the network, which is
        // the longer leg, before the local write takes its turn.
        let forward = async {
            tokio::select! {
                r = self.replicas.forward(sds, addr, &replica, data.clone()) => {
                    r.map_err(|e| self.forward_error(e))
                }
                _ = self.map.secondary_replaced(h.pool, h.pg, sds) => Err(WireError::new(
                    ErrorCode::StaleEpoch,
                    format!("the secondary SDS {sds} of PG {} was replaced; retry with the new map", h.pg),
                )),
            }
        };
        // A copy being moved off (rebalance) takes every write too, until the move is done.
        let leaving = async {
            let Some((l, laddr)) = route.leaving else {
                return Ok(());
            };
            tokio::select! {
                r = self.replicas.forward(l, laddr, &replica, data.clone()) => {
                    r.map_err(|e| self.forward_error(e))
                }
                _ = self.map.copy_dropped(h.pool, h.pg, l) => Ok(()),
            }
        };
        let (remote, moving, local) = tokio::join!(forward, leaving, self.apply(&h, &data));
        if local.is_err() || remote.is_err() {
            self.dirty.note_failed(h.pool, h.pg, h.chunk, route.version);
        }
        if local.is_ok()
            && remote
                .as_ref()
                .is_err_and(|e| e.code == ErrorCode::StaleEpoch)
        {
            self.resend_refused(&replica, &data).await;
        }
        local?;
        remote?;
        moving?;
        crate::failpoints::fail_point(crate::failpoints::SERVICE_AFTER_FORWARD_BEFORE_ACK);
        self.lease_held(&h)
    }

    /// The local copy took a write whose forward the secondary refused because it already held
    /// a newer map: a snapshot froze the layer, or the PG's epoch moved, between the two. The
    /// client retries (in the volume's new layer, after a snapshot), but the blocks here now
    /// differ from the secondary's, and a frozen layer is never written again by a client, so
    /// send the same blocks again under the new map. The caller still holds their order lock,
    /// so nothing can land between the local write and this one. If this SDS is no longer the
    /// PG's primary, the dirty log (`note_failed`) leaves it to the rebuild.
    async fn resend_refused(&self, replica: &DataHeader, data: &Bytes) {
        self.map.refresh(self.opts.refresh_timeout).await;
        let Some(epoch) = self.map.state().pools.get(&replica.pool).map(|p| p.epoch) else {
            return;
        };
        let h = DataHeader { epoch, ..*replica };
        let Ok(Route {
            secondary: Some((sds, addr)),
            ..
        }) = self.map.check(&h, Role::Primary)
        else {
            return;
        };
        match self.replicas.forward(sds, addr, &h, data.clone()).await {
            Ok(_) => {
                self.metrics.resent_forwards.inc();
                tracing::debug!(chunk = %h.chunk, offset = h.offset, len = h.len,
                    "sent a write the secondary refused for its newer map again under that map");
            }
            Err(e) => {
                tracing::warn!(chunk = %h.chunk, offset = h.offset, len = h.len,
                    "could not send a refused write again; the copies of these blocks differ until the next rebuild or scrub: {e}");
            }
        }
    }

    async fn read(&self, h: &DataHeader) -> Result<Bytes, WireError> {
        self.metrics.reads.inc();
        self.metrics.read_bytes.inc_by(u64::from(h.len));
        self.storage
            .read(h.chunk, h.offset, h.len)
            .await
            .map_err(|e| self.store_error(e))
    }

    /// Serve one decoded request.
    pub async fn serve(&self, peer: &Peer, h: DataHeader, data: Bytes) -> Result<Bytes, WireError> {
        let carries_data = matches!(h.op, DataOp::Write | DataOp::ReplicaWrite);
        if carries_data && data.len() != h.len as usize {
            return Err(bad_request(format!(
                "the header says {} bytes, the frame carries {}",
                h.len,
                data.len()
            )));
        }
        if !carries_data && !data.is_empty() {
            return Err(bad_request(format!("{:?} carries no data", h.op)));
        }
        let (role, name) = authz::check(peer, h.op)?;
        match h.op {
            DataOp::Read => {
                let started = Instant::now();
                self.route(&h, Role::Primary).await?;
                self.check_fence(name, &h).await?;
                self.metrics.user_requests.inc();
                let out = self.read_through_layers(&h).await?;
                self.metrics
                    .read_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(out)
            }
            DataOp::ReadLocal => {
                self.route(&h, Role::Holder).await?;
                authz::require_pg_peer(&self.map.state(), name, &h, PgCopy::Any)?;
                self.read(&h).await
            }
            DataOp::Write | DataOp::Trim | DataOp::WriteZeroes => {
                let started = Instant::now();
                let route = self.route(&h, Role::Primary).await?;
                self.check_fence(name, &h).await?;
                self.metrics.user_requests.inc();
                self.primary_write(h, route, data, name).await?;
                self.metrics
                    .write_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(Bytes::new())
            }
            DataOp::ReplicaWrite | DataOp::ReplicaTrim => {
                crate::failpoints::delay_point(crate::failpoints::SERVICE_BEFORE_REPLICA_APPLY)
                    .await;
                self.route(&h, Role::Secondary).await?;
                authz::require_pg_peer(&self.map.state(), name, &h, PgCopy::Primary)?;
                self.replica_apply(peer, &h, &data).await?;
                Ok(Bytes::new())
            }
            DataOp::Repair => {
                self.route(&h, Role::Primary).await?;
                authz::require_pg_peer(&self.map.state(), name, &h, PgCopy::Secondary)?;
                self.serve_repair(&h).await?;
                Ok(Bytes::new())
            }
            DataOp::Flush => {
                self.metrics.flushes.inc();
                self.storage
                    .flush()
                    .await
                    .map_err(|e| self.store_error(e))?;
                Ok(Bytes::copy_from_slice(&self.opts.boot_tag.to_le_bytes()))
            }
            DataOp::AllocStatus => {
                if h.len > ALLOC_STATUS_MAX_CHUNKS {
                    return Err(bad_request(format!(
                        "AllocStatus of {} chunks; at most {ALLOC_STATUS_MAX_CHUNKS}",
                        h.len
                    )));
                }
                self.route_pool(&h).await?;
                if role == CertRole::Sdc {
                    self.check_fence(name, &h).await?;
                    // A client sees its volume: every layer its reads look through.
                    return Ok(Bytes::from(self.allocated_through_layers(&h)));
                }
                Ok(Bytes::from(self.storage.allocated(h.chunk, h.len)))
            }
        }
    }
}

/// The refusal of I/O for a layer a snapshot has frozen since the SDC routed it.
fn old_layer(h: &DataHeader) -> WireError {
    WireError::new(
        ErrorCode::StaleEpoch,
        format!(
            "chunk {} is in a layer a snapshot has frozen; retry with the new map",
            h.chunk
        ),
    )
}

/// The refusal of I/O under a mapping generation that is no longer current.
fn fenced(h: &DataHeader) -> WireError {
    WireError::new(
        ErrorCode::Fenced,
        format!(
            "mapping generation {} of volume tree {} is no longer current (the volume was unmapped from this host or taken over by another); this host may not do I/O on it",
            h.fence, h.chunk.vtree
        ),
    )
}

/// The wire code of a fence refusal.
fn refusal(r: Refusal) -> WireError {
    let code = match r {
        Refusal::StaleEpoch { .. } => ErrorCode::StaleEpoch,
        Refusal::NotJoined
        | Refusal::NoLease
        | Refusal::NewerEpoch { .. }
        | Refusal::NoPeerAddress(_) => ErrorCode::Unavailable,
        Refusal::UnknownPool(_)
        | Refusal::NoSuchPg { .. }
        | Refusal::ChunkNotInPg { .. }
        | Refusal::WrongRole { .. } => ErrorCode::WrongPg,
    };
    WireError::new(code, r.to_string())
}

impl<D: BlockDevice> Handler for Service<D> {
    async fn handle(&self, peer: Arc<Peer>, req: Frame) -> Response {
        let r = if req.kind != kind::DATA {
            Err(bad_request(format!(
                "frame kind {} is not served by an SDS",
                req.kind
            )))
        } else {
            match DataHeader::decode(&req.meta) {
                Ok(h) => self.serve(&peer, h, req.data).await,
                Err(e) => Err(bad_request(format!("malformed data header: {e}"))),
            }
        };
        match r {
            Ok(data) => Response::ok(Bytes::new(), data),
            Err(e) => {
                self.metrics.request_error(e.code);
                tracing::debug!(peer = %peer.addr, code = ?e.code, "refused a data request: {e}");
                Response::error(&e)
            }
        }
    }
}
