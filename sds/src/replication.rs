//! Forwarding from a primary to its PG's secondary: one cached QUIC connection per peer SDS,
//! dialled on first use and again after a failure, one dial at a time per peer.
//!
//! PERFORMANCE-CRITICAL: runs per mirrored write; no logging above DEBUG per I/O.
//!
//! Ordering of overlapping writes is the caller's job (the service holds the chunk range lock
//! across the local write and the forward). A forward that times out is reported as a failure
//! and its connection dropped: the secondary refuses anything that still arrives on it once a
//! newer connection brought a forward (see the service docs).

use bytes::Bytes;
use proto::codec::{kind, Frame};
use proto::data::DataHeader;
use proto::transport::{check_status, Endpoint, RpcClient};
use proto::{SdsId, WireError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a forward failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("secondary SDS {sds} at {addr} is unreachable: {reason}")]
    Unreachable {
        sds: SdsId,
        addr: SocketAddr,
        reason: String,
    },
    #[error("secondary SDS {sds} did not answer: {reason}")]
    Lost { sds: SdsId, reason: String },
    #[error("secondary SDS {sds} refused: {error}")]
    Refused { sds: SdsId, error: WireError },
}

struct Peer {
    client: Mutex<Option<RpcClient>>,
    dialing: tokio::sync::Mutex<()>,
}

impl Peer {
    fn current(&self, addr: SocketAddr) -> Option<RpcClient> {
        let c = self.client.lock().ok()?.clone()?;
        (!c.is_closed() && c.remote_address() == addr).then_some(c)
    }

    /// Close `used` and drop it from the cache unless a newer connection replaced it.
    fn forget(&self, used: &RpcClient) {
        used.close();
        if let Ok(mut c) = self.client.lock() {
            if c.as_ref().is_some_and(RpcClient::is_closed) {
                *c = None;
            }
        }
    }
}

pub struct Replicator {
    endpoint: Endpoint,
    peers: Mutex<HashMap<SdsId, Arc<Peer>>>,
    dial_timeout: Duration,
    call_timeout: Duration,
}

impl Replicator {
    pub fn new(endpoint: Endpoint, dial_timeout: Duration, call_timeout: Duration) -> Replicator {
        Replicator {
            endpoint,
            peers: Mutex::new(HashMap::new()),
            dial_timeout,
            call_timeout,
        }
    }

    fn peer(&self, sds: SdsId) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .entry(sds)
            .or_insert_with(|| {
                Arc::new(Peer {
                    client: Mutex::new(None),
                    dialing: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    async fn client(
        &self,
        sds: SdsId,
        addr: SocketAddr,
    ) -> Result<(Arc<Peer>, RpcClient), ForwardError> {
        let peer = self.peer(sds);
        if let Some(c) = peer.current(addr) {
            return Ok((peer, c));
        }
        let dialing = peer.clone();
        let _one_dial = dialing.dialing.lock().await;
        if let Some(c) = peer.current(addr) {
            return Ok((peer, c));
        }
        let unreachable = |reason: String| ForwardError::Unreachable { sds, addr, reason };
        let c =
            match tokio::time::timeout(self.dial_timeout, self.endpoint.connect_data(addr)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(unreachable(e.to_string())),
                Err(_) => {
                    return Err(unreachable(format!(
                        "no answer within {:?}",
                        self.dial_timeout
                    )))
                }
            };
        tracing::debug!(%sds, %addr, "connected to the secondary");
        if let Ok(mut slot) = peer.client.lock() {
            *slot = Some(c.clone());
        }
        Ok((peer, c))
    }

    /// Send `h` (already turned into a replica op) with `data` to `sds` at `addr` and wait for
    /// its answer.
    pub async fn forward(
        &self,
        sds: SdsId,
        addr: SocketAddr,
        h: &DataHeader,
        data: Bytes,
    ) -> Result<(), ForwardError> {
        self.send(sds, addr, h, data).await.map(|_| ())
    }

    /// Send a request that carries no data (e.g. AllocStatus) and return the answer's data.
    pub async fn call(
        &self,
        sds: SdsId,
        addr: SocketAddr,
        h: &DataHeader,
    ) -> Result<Bytes, ForwardError> {
        self.send(sds, addr, h, Bytes::new()).await
    }

    async fn send(
        &self,
        sds: SdsId,
        addr: SocketAddr,
        h: &DataHeader,
        data: Bytes,
    ) -> Result<Bytes, ForwardError> {
        let (peer, client) = self.client(sds, addr).await?;
        let frame = Frame::request(kind::DATA, Bytes::copy_from_slice(&h.encode()), data);
        match client.call_timeout(frame, self.call_timeout).await {
            Ok(resp) => check_status(resp)
                .map(|f| f.data)
                .map_err(|error| ForwardError::Refused { sds, error }),
            Err(e) => {
                // The connection is suspect (or dead): the next forward dials again.
                peer.forget(&client);
                Err(ForwardError::Lost {
                    sds,
                    reason: e.to_string(),
                })
            }
        }
    }
}
