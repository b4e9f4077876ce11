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
/// How long dialling one MDM may take (they sit on a LAN).
const DIAL_TIMEOUT: Duration = Duration::from_millis(1500);
/// Pause between rounds over all MDMs while none leads.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

pub struct MdmClient {
    endpoint: Endpoint,
    addrs: Mutex<Vec<SocketAddr>>,
    conn: Mutex<Option<RpcClient>>,
    /// Addresses whose last dial failed.
    dead: Mutex<std::collections::HashSet<SocketAddr>>,
}

impl MdmClient {
    pub fn new(endpoint: Endpoint, addrs: Vec<SocketAddr>) -> MdmClient {
        MdmClient {
            endpoint,
            addrs: Mutex::new(addrs),
            conn: Mutex::new(None),
            dead: Mutex::new(Default::default()),
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
            let once = match tokio::time::timeout_at(until, self.try_once(&body, until)).await {
                Ok(r) => r,
                Err(_) => {
                    // The current connection did not answer in time: it may lead to a dead
                    // MDM whose QUIC connection has not timed out yet. Dial afresh next time.
                    *self.conn.lock().await = None;
                    Err(WireError::new(
                        ErrorCode::Unavailable,
                        format!("no MDM answered within {deadline:?}"),
                    ))
                }
            };
            match once {
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

    /// One pass: the current connection, else every address dialled at once (a dead MDM must
    /// not cost a handshake timeout) and asked as soon as its connection is up; a redirect to
    /// the leader is followed at once.
    async fn try_once(
        &self,
        body: &[u8],
        until: tokio::time::Instant,
    ) -> Result<MdmResponse, WireError> {
        let mut last = WireError::new(ErrorCode::Unavailable, "no MDM could be reached");
        let current = self.conn.lock().await.clone().filter(|c| !c.is_closed());
        if let Some(c) = current {
            match self.ask(&c, body, until).await {
                Ok(r) => return Ok(r),
                Err((e, _)) if !matches!(e.code, ErrorCode::NotLeader | ErrorCode::Unavailable) => {
                    return Err(e)
                }
                Err((e, leader)) => {
                    last = e;
                    if let Some(r) = self.follow(leader, body, &mut last, until).await {
                        return r;
                    }
                }
            }
        }
        let addrs = self.addrs.lock().await.clone();
        let dead = self.dead.lock().await.clone();
        let mut set = tokio::task::JoinSet::new();
        // Addresses that failed last time are dialled too, but not waited for once every
        // other address has been tried.
        let mut pending_live = addrs.iter().filter(|a| !dead.contains(a)).count();
        // When every address failed last time (a lone MDM restarting), wait for them all, or
        // a client would never dial again.
        let wait_all = dead.is_empty() || pending_live == 0;
        for a in addrs {
            let ep = self.endpoint.clone();
            set.spawn(async move { (a, tokio::time::timeout(DIAL_TIMEOUT, ep.connect(a)).await) });
        }
        while pending_live > 0 || wait_all {
            let Some(joined) = set.join_next().await else {
                break;
            };
            let Ok((addr, dialled)) = joined else {
                continue;
            };
            if !dead.contains(&addr) {
                pending_live = pending_live.saturating_sub(1);
            }
            let c = match dialled {
                Ok(Ok(c)) => {
                    self.dead.lock().await.remove(&addr);
                    c
                }
                _ => {
                    self.dead.lock().await.insert(addr);
                    continue;
                }
            };
            match self.ask(&c, body, until).await {
                Ok(r) => return Ok(r),
                Err((e, _)) if !matches!(e.code, ErrorCode::NotLeader | ErrorCode::Unavailable) => {
                    return Err(e)
                }
                Err((e, leader)) => {
                    last = e;
                    if let Some(r) = self.follow(leader, body, &mut last, until).await {
                        return r;
                    }
                }
            }
        }
        Err(last)
    }

    /// Dial the leader a redirect named; `None` when there was none or it did not answer.
    async fn follow(
        &self,
        leader: Option<SocketAddr>,
        body: &[u8],
        last: &mut WireError,
        until: tokio::time::Instant,
    ) -> Option<Result<MdmResponse, WireError>> {
        let leader = leader?;
        {
            let mut a = self.addrs.lock().await;
            if !a.contains(&leader) {
                a.push(leader);
            }
        }
        if self.dead.lock().await.contains(&leader) {
            return None;
        }
        let c = match tokio::time::timeout(DIAL_TIMEOUT, self.endpoint.connect(leader)).await {
            Ok(Ok(c)) => c,
            _ => {
                // A follower may still name a leader that just died.
                self.dead.lock().await.insert(leader);
                return None;
            }
        };
        match self.ask(&c, body, until).await {
            Ok(r) => Some(Ok(r)),
            Err((e, _)) if !matches!(e.code, ErrorCode::NotLeader | ErrorCode::Unavailable) => {
                Some(Err(e))
            }
            Err((e, _)) => {
                *last = e;
                None
            }
        }
    }

    /// Ask one MDM. On `NotLeader`, the error comes with the leader's address when known.
    async fn ask(
        &self,
        client: &RpcClient,
        body: &[u8],
        until: tokio::time::Instant,
    ) -> Result<MdmResponse, (WireError, Option<SocketAddr>)> {
        let frame = Frame::request(kind::CONTROL, body.to_vec(), bytes::Bytes::new());
        let left = until
            .saturating_duration_since(tokio::time::Instant::now())
            .min(CALL_TIMEOUT);
        let resp = match client.call_timeout(frame, left).await {
            Ok(f) => f,
            Err(e) => {
                *self.conn.lock().await = None;
                let msg = format!("MDM {} did not answer: {e}", client.remote_address());
                return Err((WireError::new(ErrorCode::Unavailable, msg), None));
            }
        };
        match check_status(resp) {
            Ok(f) => {
                *self.conn.lock().await = Some(client.clone());
                serde_json::from_slice(&f.meta).map_err(|e| {
                    (
                        WireError::new(ErrorCode::Internal, format!("undecodable MDM answer: {e}")),
                        None,
                    )
                })
            }
            Err(e) if e.code == ErrorCode::NotLeader => {
                *self.conn.lock().await = None;
                let leader = e.message.parse::<SocketAddr>().ok();
                Err((e, leader))
            }
            Err(e) => Err((e, None)),
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
