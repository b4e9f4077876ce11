//! `MdmClient`: sends control requests to the MDM leader. It keeps one connection, follows
//! `NotLeader` redirects, tries every known MDM address in turn, and retries while the cluster
//! has no leader, up to a deadline.

use crate::codec::{kind, Frame};
use crate::msg::{MdmRequest, MdmResponse};
use crate::transport::{check_status, Endpoint, RpcClient};
use crate::{ErrorCode, WireError};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::Mutex;

/// Time one request may take on one MDM.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between rounds over all MDMs while none leads.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

pub struct MdmClient {
    endpoint: Endpoint,
    addrs: Mutex<Vec<SocketAddr>>,
    conn: Mutex<Option<RpcClient>>,
}

impl MdmClient {
    pub fn new(endpoint: Endpoint, addrs: Vec<SocketAddr>) -> MdmClient {
        MdmClient {
            endpoint,
            addrs: Mutex::new(addrs),
            conn: Mutex::new(None),
        }
    }

    /// Send `req` to the leader, retrying for up to `deadline`.
    pub async fn request(
        &self,
        req: &MdmRequest,
        deadline: Duration,
    ) -> Result<MdmResponse, WireError> {
        let body = serde_json::to_vec(req)
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
        let until = tokio::time::Instant::now() + deadline;
        let mut last;
        loop {
            match self.try_once(&body).await {
                Ok(r) => return Ok(r),
                Err(e) if matches!(e.code, ErrorCode::NotLeader | ErrorCode::Unavailable) => {
                    last = e
                }
                Err(e) => return Err(e),
            }
            if tokio::time::Instant::now() >= until {
                if last.code == ErrorCode::NotLeader {
                    last = WireError::new(
                        ErrorCode::Unavailable,
                        "the MDM cluster has no leader (no quorum?)",
                    );
                }
                return Err(last);
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// One pass: the current connection, then each address (following a redirect first).
    async fn try_once(&self, body: &[u8]) -> Result<MdmResponse, WireError> {
        let addrs = self.addrs.lock().await.clone();
        let mut candidates: Vec<Option<SocketAddr>> = vec![None];
        candidates.extend(addrs.iter().copied().map(Some));
        let mut last = WireError::new(ErrorCode::Unavailable, "no MDM could be reached");
        let mut i = 0;
        while i < candidates.len() && i < 16 {
            let target = candidates[i];
            i += 1;
            let client = match self.client_for(target).await {
                Some(c) => c,
                None => continue,
            };
            let frame = Frame::request(kind::CONTROL, body.to_vec(), bytes::Bytes::new());
            let resp = match client.call_timeout(frame, CALL_TIMEOUT).await {
                Ok(f) => f,
                Err(e) => {
                    *self.conn.lock().await = None;
                    last = WireError::new(
                        ErrorCode::Unavailable,
                        format!("MDM {} did not answer: {e}", client.remote_address()),
                    );
                    continue;
                }
            };
            match check_status(resp) {
                Ok(f) => {
                    *self.conn.lock().await = Some(client);
                    return serde_json::from_slice(&f.meta).map_err(|e| {
                        WireError::new(ErrorCode::Internal, format!("undecodable MDM answer: {e}"))
                    });
                }
                Err(e) if e.code == ErrorCode::NotLeader => {
                    *self.conn.lock().await = None;
                    if let Ok(leader) = e.message.parse::<SocketAddr>() {
                        let mut a = self.addrs.lock().await;
                        if !a.contains(&leader) {
                            a.push(leader);
                        }
                        candidates.insert(i, Some(leader));
                    }
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    async fn client_for(&self, target: Option<SocketAddr>) -> Option<RpcClient> {
        match target {
            None => {
                let c = self.conn.lock().await.clone()?;
                (!c.is_closed()).then_some(c)
            }
            Some(addr) => self.endpoint.connect(addr).await.ok(),
        }
    }
}

/// Parse a comma-separated list of MDM addresses (`ip` or `ip:port`; `default_port` when absent).
pub fn parse_addrs(list: &str, default_port: u16) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr = match part.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match part.parse::<std::net::IpAddr>() {
                Ok(ip) => SocketAddr::new(ip, default_port),
                Err(_) => return Err(format!("invalid MDM address '{part}': use IP or IP:PORT")),
            },
        };
        out.push(addr);
    }
    if out.is_empty() {
        return Err("no MDM address given".into());
    }
    Ok(out)
}
