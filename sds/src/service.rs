//! The SDS data service: serves `kind::DATA` frames (the fixed `DataHeader` plus raw bytes),
//! fences stale epochs and PGs this SDS does not hold, mirrors writes to the secondary.
//!
//! PERFORMANCE-CRITICAL: runs per 4 KiB request; no logging above DEBUG on the I/O path.
//!
//! Rules, per request: the pool's epoch in the request must not be older than the newest this
//! SDS has seen for the pool (a newer one first refreshes the map from the MDM); a primary op
//! needs this SDS to be the PG's primary, a replica op its secondary; the chunk must map to the
//! PG. The primary holds the chunk's lock across its local write and the forward to the
//! secondary, so overlapping writes reach both copies in the same order, and acknowledges only
//! when both are written.

use crate::chunk_store::{ChunkStore, StoreError};
use crate::device::BlockDevice;
use crate::metrics::SdsMetrics;
use bytes::Bytes;
use proto::client::MdmClient;
use proto::codec::{kind, Frame};
use proto::data::{DataHeader, DataOp, FLAG_FUA};
use proto::model::ClusterState;
use proto::msg::{MdmRequest, MdmResponse};
use proto::transport::{Endpoint, Handler, Peer, Response, RpcClient};
use proto::{Epoch, ErrorCode, PoolId, SdsId, WireError};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Chunk lock shards.
const LOCK_SHARDS: usize = 1024;
/// Time a forward to the secondary may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Sds<D> {
    pub name: String,
    pub store: Arc<ChunkStore<D>>,
    map: RwLock<Arc<ClusterState>>,
    me: RwLock<Option<SdsId>>,
    seen: Mutex<HashMap<PoolId, Epoch>>,
    locks: Vec<tokio::sync::Mutex<()>>,
    peers: Mutex<HashMap<SdsId, RpcClient>>,
    endpoint: Endpoint,
    mdm: Arc<MdmClient>,
    refreshing: tokio::sync::Mutex<()>,
    pub device_failed: AtomicBool,
    pub metrics: Arc<SdsMetrics>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> WireError {
    WireError::new(code, msg)
}

impl<D: BlockDevice> Sds<D> {
    pub fn new(
        name: String,
        store: Arc<ChunkStore<D>>,
        endpoint: Endpoint,
        mdm: Arc<MdmClient>,
        metrics: Arc<SdsMetrics>,
    ) -> Arc<Sds<D>> {
        Arc::new(Sds {
            name,
            store,
            map: RwLock::new(Arc::new(ClusterState::default())),
            me: RwLock::new(None),
            seen: Mutex::new(HashMap::new()),
            locks: (0..LOCK_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            peers: Mutex::new(HashMap::new()),
            endpoint,
            mdm,
            refreshing: tokio::sync::Mutex::new(()),
            device_failed: AtomicBool::new(false),
            metrics,
        })
    }

    pub fn set_id(&self, id: SdsId) {
        if let Ok(mut m) = self.me.write() {
            *m = Some(id);
        }
    }

    pub fn id(&self) -> Option<SdsId> {
        self.me.read().ok().and_then(|m| *m)
    }

    pub fn map(&self) -> Arc<ClusterState> {
        self.map.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Install a newer map and remember its epochs as seen.
    pub fn set_map(&self, m: ClusterState) {
        if let Ok(mut seen) = self.seen.lock() {
            for p in m.pools.values() {
                let e = seen.entry(p.id).or_default();
                *e = (*e).max(p.epoch);
            }
        }
        if let Ok(mut cur) = self.map.write() {
            if m.version > cur.version {
                *cur = Arc::new(m);
            }
        }
    }

    pub async fn refresh_map(&self) {
        let known = self.map().version;
        let _g = self.refreshing.lock().await;
        if self.map().version > known {
            return;
        }
        if let Ok(MdmResponse::Map { state: Some(s) }) = self
            .mdm
            .request(
                &MdmRequest::GetMap {
                    known_version: known,
                },
                Duration::from_secs(3),
            )
            .await
        {
            self.set_map(*s);
        }
    }

    fn lock_for(&self, h: &DataHeader) -> &tokio::sync::Mutex<()> {
        let mut s = std::collections::hash_map::DefaultHasher::new();
        h.chunk.hash(&mut s);
        &self.locks[(s.finish() as usize) % LOCK_SHARDS]
    }

    /// The fence: epoch and role checks.
    async fn check(
        &self,
        h: &DataHeader,
        want_primary: bool,
    ) -> Result<(Arc<ClusterState>, Option<SdsId>), WireError> {
        let me = self.id().ok_or_else(|| {
            err(
                ErrorCode::Unavailable,
                "this SDS has not joined the cluster yet",
            )
        })?;
        let mut map = self.map();
        let known = map.pools.get(&h.pool).map(|p| p.epoch).unwrap_or_default();
        if h.epoch > known {
            self.refresh_map().await;
            map = self.map();
        }
        let pool = map
            .pools
            .get(&h.pool)
            .ok_or_else(|| err(ErrorCode::WrongPg, format!("unknown pool {}", h.pool)))?;
        {
            let mut seen = self
                .seen
                .lock()
                .map_err(|_| err(ErrorCode::Internal, "lock"))?;
            let e = seen.entry(h.pool).or_default();
            if h.epoch < *e {
                return Err(err(
                    ErrorCode::StaleEpoch,
                    format!("request epoch {} is older than {}", h.epoch, *e),
                ));
            }
            if h.epoch > pool.epoch {
                return Err(err(
                    ErrorCode::Unavailable,
                    format!("epoch {} is not known here yet", h.epoch),
                ));
            }
            *e = h.epoch;
        }
        if h.chunk.pg(pool.pg_count) != h.pg {
            return Err(err(
                ErrorCode::BadRequest,
                format!("chunk {} is not in PG {}", h.chunk, h.pg),
            ));
        }
        let pg = pool
            .pg(h.pg)
            .ok_or_else(|| err(ErrorCode::WrongPg, format!("no PG {}", h.pg)))?;
        let ok = if want_primary {
            pg.primary == Some(me)
        } else {
            pg.secondary == Some(me)
        };
        if !ok {
            let role = if want_primary { "primary" } else { "secondary" };
            return Err(err(
                ErrorCode::WrongPg,
                format!("this SDS is not the {role} of PG {}", h.pg),
            ));
        }
        let secondary = if want_primary { pg.secondary } else { None };
        Ok((map, secondary))
    }

    fn store_err(&self, e: StoreError) -> WireError {
        match e {
            StoreError::ChecksumMismatch { .. } => {
                self.metrics.checksum_errors.inc();
                err(ErrorCode::Checksum, e.to_string())
            }
            StoreError::NoSpace => err(ErrorCode::NoSpace, e.to_string()),
            StoreError::Device(_) => {
                self.metrics.device_errors.inc();
                if !self.device_failed.swap(true, Ordering::SeqCst) {
                    tracing::error!("device failed: {e}; reporting it to the MDM");
                }
                err(ErrorCode::Io, e.to_string())
            }
            other => err(ErrorCode::Io, other.to_string()),
        }
    }

    async fn peer(&self, id: SdsId, map: &ClusterState) -> Result<RpcClient, WireError> {
        if let Some(c) = self.peers.lock().ok().and_then(|p| p.get(&id).cloned()) {
            if !c.is_closed() {
                return Ok(c);
            }
        }
        let addr = map
            .sds
            .get(&id)
            .and_then(|s| s.addr.parse().ok())
            .ok_or_else(|| err(ErrorCode::Unavailable, format!("no address for SDS {id}")))?;
        let c = self.endpoint.connect(addr).await.map_err(|e| {
            err(
                ErrorCode::Unavailable,
                format!("secondary SDS {id} unreachable: {e}"),
            )
        })?;
        if let Ok(mut p) = self.peers.lock() {
            p.insert(id, c.clone());
        }
        Ok(c)
    }

    async fn forward(
        &self,
        to: SdsId,
        map: &ClusterState,
        mut h: DataHeader,
        data: Bytes,
    ) -> Result<(), WireError> {
        h.op = match h.op {
            DataOp::Trim => DataOp::ReplicaTrim,
            _ => DataOp::ReplicaWrite,
        };
        let c = self.peer(to, map).await?;
        let f = Frame::request(kind::DATA, Bytes::copy_from_slice(&h.encode()), data);
        match c.call_timeout(f, FORWARD_TIMEOUT).await {
            Ok(r) => proto::transport::check_status(r).map(|_| ()),
            Err(e) => {
                if let Ok(mut p) = self.peers.lock() {
                    p.remove(&to);
                }
                Err(err(
                    ErrorCode::Unavailable,
                    format!("forward to secondary {to}: {e}"),
                ))
            }
        }
    }

    async fn local_write(&self, h: &DataHeader, data: &[u8]) -> Result<(), WireError> {
        let r = match h.op {
            DataOp::Trim | DataOp::ReplicaTrim => self.store.trim(h.chunk, h.offset, h.len).await,
            _ => self.store.write(h.chunk, h.offset, data).await,
        };
        r.map_err(|e| self.store_err(e))?;
        if h.flags & FLAG_FUA != 0 {
            self.store.flush().await.map_err(|e| self.store_err(e))?;
        }
        Ok(())
    }

    async fn serve(&self, h: DataHeader, data: Bytes) -> Result<Bytes, WireError> {
        let ranged = matches!(h.op, DataOp::Write | DataOp::ReplicaWrite);
        if ranged && data.len() != h.len as usize {
            return Err(err(
                ErrorCode::BadRequest,
                format!("header says {} bytes, frame carries {}", h.len, data.len()),
            ));
        }
        match h.op {
            DataOp::Read => {
                self.check(&h, true).await?;
                self.metrics.reads.inc();
                self.store
                    .read(h.chunk, h.offset, h.len)
                    .await
                    .map(Bytes::from)
                    .map_err(|e| self.store_err(e))
            }
            DataOp::ReadLocal => self
                .store
                .read(h.chunk, h.offset, h.len)
                .await
                .map(Bytes::from)
                .map_err(|e| self.store_err(e)),
            DataOp::Write | DataOp::Trim | DataOp::WriteZeroes => {
                let (map, secondary) = self.check(&h, true).await?;
                let (h, data) = if h.op == DataOp::WriteZeroes {
                    (
                        DataHeader {
                            op: DataOp::Write,
                            ..h
                        },
                        Bytes::from(vec![0u8; h.len as usize]),
                    )
                } else {
                    (h, data)
                };
                self.metrics.writes.inc();
                let _order = self.lock_for(&h).lock().await;
                match secondary {
                    Some(s) => {
                        let (a, b) = tokio::join!(
                            self.local_write(&h, &data),
                            self.forward(s, &map, h, data.clone())
                        );
                        a?;
                        b?;
                    }
                    None => self.local_write(&h, &data).await?,
                }
                Ok(Bytes::new())
            }
            DataOp::ReplicaWrite | DataOp::ReplicaTrim => {
                self.check(&h, false).await?;
                self.metrics.writes.inc();
                self.local_write(&h, &data).await?;
                Ok(Bytes::new())
            }
            DataOp::Flush => {
                self.store.flush().await.map_err(|e| self.store_err(e))?;
                Ok(Bytes::new())
            }
            DataOp::AllocStatus => Ok(Bytes::from(self.store.allocated(
                h.chunk.vtree,
                h.chunk.index.0,
                h.len.min(1 << 16),
            ))),
        }
    }
}

impl<D: BlockDevice> Handler for Sds<D> {
    async fn handle(&self, _peer: Arc<Peer>, req: Frame) -> Response {
        if req.kind != kind::DATA {
            return Response::error(&err(
                ErrorCode::BadRequest,
                format!("frame kind {} is not served by an SDS", req.kind),
            ));
        }
        let h = match DataHeader::decode(&req.meta) {
            Ok(h) => h,
            Err(e) => return Response::error(&err(ErrorCode::BadRequest, e.to_string())),
        };
        match self.serve(h, req.data).await {
            Ok(data) => Response::ok(Bytes::new(), data),
            Err(e) => {
                self.metrics.errors.inc();
                Response::error(&e)
            }
        }
    }
}
