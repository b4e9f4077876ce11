//! The Raft transport between MDMs: outgoing messages go through one queue and one connection
//! per peer ([`raft_network`]); incoming `kind::RAFT` frames are stepped into the ready loop
//! ([`step`]). Only MDM certificates may send them ([`crate::authz`], checked by the service
//! before [`step`]).
//!
//! **Invariant**: a peer's address comes from the cluster map, or, for an MDM the map does not
//! list yet, from `--add_standby_mdm` (on the leader) or from the map of a peer MDM that
//! [`introduce`]d itself (on a new standby, before it has a map of its own); never from a Raft
//! message. Each MDM introduces itself on every Raft connection it opens.

use crate::raft::RaftMsg;
use crate::service::{call_control, Service};
use proto::codec::{kind, Frame};
use proto::model::MdmMember;
use proto::msg::{MdmRequest, MdmResponse};
use proto::transport::RpcClient;
use proto::{ErrorCode, WireError};
use protobuf::Message as _;
use raft::eraftpb::Message;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Raft messages queued per peer before new ones are dropped.
const PEER_QUEUE_LEN: usize = 1024;
/// How long to wait before dialling an unreachable peer again.
const REDIAL_PAUSE: Duration = Duration::from_millis(300);

/// Metadata of a RAFT frame.
#[derive(Serialize, Deserialize)]
struct RaftMeta {
    from: u64,
    /// The sender's address: still sent for MDMs of earlier versions, which learnt peers from
    /// it; ignored on receipt (see the module's invariant).
    #[serde(default)]
    from_addr: String,
}

/// Step an incoming Raft message (its sender's certificate role was checked already).
pub fn step(svc: &Service, req: &Frame) -> Result<(), WireError> {
    let bad = |e: &dyn std::fmt::Display| {
        WireError::new(ErrorCode::BadRequest, format!("bad raft message: {e}"))
    };
    let meta: RaftMeta = serde_json::from_slice(&req.meta).map_err(|e| bad(&e))?;
    let msg = Message::parse_from_bytes(&req.data).map_err(|e| bad(&e))?;
    if msg.from != meta.from || msg.to != svc.raft.id.0 {
        return Err(bad(&"sender or recipient does not match"));
    }
    svc.raft.send(RaftMsg::Step(Box::new(msg)))
}

/// A peer MDM's cluster map lists `members`: note the addresses of those this MDM's own map
/// does not list (its map wins for the others).
pub fn introduce(svc: &Service, members: Vec<MdmMember>) -> MdmResponse {
    let state = svc.raft.shared.read_state();
    let mut learnt = 0;
    if let Ok(mut p) = svc.peers.lock() {
        for m in members {
            if m.id == svc.raft.id || state.mdms.contains_key(&m.id) {
                continue;
            }
            p.insert(m.id.0, m.addr);
            learnt += 1;
        }
    }
    MdmResponse::Done {
        message: format!("noted {learnt} MDM addresses this MDM's map lacks"),
        object_id: None,
    }
}

/// Deliver outgoing Raft messages: one queue and one connection per peer.
pub async fn raft_network(svc: Arc<Service>, mut outbox: mpsc::Receiver<Message>) {
    let mut queues: HashMap<u64, mpsc::Sender<Message>> = HashMap::new();
    while let Some(m) = outbox.recv().await {
        let to = m.to;
        let q = queues.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_LEN);
            tokio::spawn(peer_sender(svc.clone(), to, rx));
            tx
        });
        let _ = q.try_send(m);
    }
}

/// Dial peer `to` and introduce this MDM's map to it.
async fn dial(svc: &Service, to: u64) -> Option<RpcClient> {
    let addr = svc.peer_addr(to).and_then(|a| a.parse().ok())?;
    let client = match svc.endpoint.connect(addr).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(peer = to, "raft peer unreachable: {e}");
            return None;
        }
    };
    let members = svc.raft.shared.read_state().mdms.into_values().collect();
    if let Err(e) = call_control(&client, &MdmRequest::Introduce { members }).await {
        // An MDM of an earlier version does not know the request; it learns addresses itself.
        tracing::debug!(peer = to, "raft peer did not take the introduction: {e}");
    }
    Some(client)
}

async fn peer_sender(svc: Arc<Service>, to: u64, mut rx: mpsc::Receiver<Message>) {
    let mut client: Option<RpcClient> = None;
    let mut retry_at = tokio::time::Instant::now();
    let meta = serde_json::to_vec(&RaftMeta {
        from: svc.raft.id.0,
        from_addr: svc.advertise.clone(),
    })
    .unwrap_or_default();
    while let Some(m) = rx.recv().await {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = None;
            if tokio::time::Instant::now() < retry_at {
                continue;
            }
            match dial(&svc, to).await {
                Some(c) => client = Some(c),
                None => {
                    retry_at = tokio::time::Instant::now() + REDIAL_PAUSE;
                    continue;
                }
            }
        }
        let Ok(data) = m.write_to_bytes() else {
            continue;
        };
        if let Some(c) = &client {
            if c.notify(Frame::request(kind::RAFT, meta.clone(), data.into()))
                .is_err()
            {
                client = None;
            }
        }
    }
}
