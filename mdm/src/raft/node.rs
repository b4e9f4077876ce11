//! The Raft ready loop: one thread owns the `RawNode`; everything reaches it through one bounded
//! channel carrying [`RaftMsg`], and `recv_timeout` doubles as the tick clock.
//!
//! `on_ready` follows raft-rs's order: send the leader's messages, install a snapshot, apply
//! committed entries, persist new entries and the hard state (durable: sled flush), only then
//! send the persisted messages, advance, handle the light ready, advance_apply. A message that
//! depends on a write never leaves before the write is durable.

use super::storage::RaftStorage;
use crate::state_machine::{self, Op, Outcome, Proposal};
use crate::store::MetaStore;
use proto::model::{ClusterState, MdmMember, MdmRole};
use proto::{ErrorCode, MdmId, WireError};
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole};
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Messages queued to the Raft thread before senders see "busy".
pub const INBOX_LEN: usize = 4096;

pub type Reply = oneshot::Sender<Result<Outcome, WireError>>;

pub enum RaftMsg {
    Propose {
        op: Op,
        reply: Reply,
    },
    ConfChange {
        change_type: ConfChangeType,
        member: MdmMember,
        reply: Reply,
    },
    Step(Box<Message>),
    /// Somebody needs a quorum to confirm this leader in a round issued at or after `since`
    /// (see [`crate::lease`]); the answer is published in [`Shared::confirmed`].
    ConfirmLeader {
        since: Instant,
    },
}

/// What the rest of the MDM may read about Raft.
#[derive(Clone, Debug, Default)]
pub struct RaftStatus {
    pub id: u64,
    pub is_leader: bool,
    pub leader_id: u64,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    /// The leader applied an entry of its own term: its state is complete, it may answer reads.
    pub leader_ready: bool,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Leader's view of each peer: recently active.
    pub active: BTreeMap<u64, bool>,
}

/// State shared between the Raft thread (only writer) and the service.
pub struct Shared {
    pub state: RwLock<ClusterState>,
    pub status: RwLock<RaftStatus>,
    applied: Mutex<(u64, u64, ConfState)>,
    /// When the newest leadership round a quorum confirmed was issued (only grows).
    pub confirmed: tokio::sync::watch::Sender<Option<Instant>>,
}

impl Shared {
    pub fn read_state(&self) -> ClusterState {
        self.state.read().map(|s| s.clone()).unwrap_or_default()
    }
    pub fn status(&self) -> RaftStatus {
        self.status.read().map(|s| s.clone()).unwrap_or_default()
    }
}

#[derive(Clone)]
pub struct RaftHandle {
    pub tx: SyncSender<RaftMsg>,
    pub shared: Arc<Shared>,
    pub id: MdmId,
}

impl RaftHandle {
    /// Propose an op and wait until it is applied here.
    pub async fn propose(&self, op: Op) -> Result<Outcome, WireError> {
        let (reply, rx) = oneshot::channel();
        self.send(RaftMsg::Propose { op, reply })?;
        rx.await.unwrap_or_else(|_| Err(lost()))
    }

    pub async fn conf_change(
        &self,
        change_type: ConfChangeType,
        member: MdmMember,
    ) -> Result<Outcome, WireError> {
        let (reply, rx) = oneshot::channel();
        self.send(RaftMsg::ConfChange {
            change_type,
            member,
            reply,
        })?;
        rx.await.unwrap_or_else(|_| Err(lost()))
    }

    pub fn send(&self, m: RaftMsg) -> Result<(), WireError> {
        self.tx
            .try_send(m)
            .map_err(|_| WireError::new(ErrorCode::Unavailable, "the MDM is busy; retry"))
    }
}

fn lost() -> WireError {
    WireError::new(
        ErrorCode::Unavailable,
        "leadership changed before the command was committed; check and retry",
    )
}

pub struct NodeConfig {
    pub tick: Duration,
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    pub snapshot_interval_entries: u64,
}

/// Outgoing Raft messages: handed to the network task; dropped when it is full (Raft retries).
pub type Outbox = tokio::sync::mpsc::Sender<Message>;

struct Node {
    raw: RawNode<RaftStorage>,
    shared: Arc<Shared>,
    outbox: Outbox,
    pending: HashMap<u64, Reply>,
    next_seq: u64,
    cfg: NodeConfig,
    id: u64,
    /// Term of the last entry this node applied as leader of that term.
    ready_term: u64,
    /// Leadership confirmation rounds (ReadIndex) for SDS leases.
    rounds: crate::lease::Rounds,
}

/// Open storage, rebuild the state machine from the last snapshot, and start the Raft thread.
/// `bootstrap` makes a brand-new store the single voter of a new cluster.
pub fn start(
    store: Arc<dyn MetaStore>,
    id: MdmId,
    cfg: NodeConfig,
    bootstrap: bool,
    outbox: Outbox,
) -> anyhow::Result<(RaftHandle, std::thread::JoinHandle<()>)> {
    let mut storage = RaftStorage::open(store)?;
    let initialized =
        !storage.conf_state().voters.is_empty() || !storage.conf_state().learners.is_empty();
    if bootstrap && !initialized {
        storage.initialize(id.0)?;
    }
    let mut state = ClusterState::default();
    let mut applied = (0u64, 0u64, storage.conf_state().clone());
    if let Some(snap) = storage.stored_snapshot()? {
        let m = snap.get_metadata();
        if !snap.data.is_empty() {
            state = serde_json::from_slice(&snap.data)?;
        }
        applied = (m.index, m.term, m.get_conf_state().clone());
    }
    let shared = Arc::new(Shared {
        state: RwLock::new(state),
        status: RwLock::new(RaftStatus {
            id: id.0,
            ..Default::default()
        }),
        applied: Mutex::new(applied.clone()),
        confirmed: tokio::sync::watch::channel(None).0,
    });
    let src = shared.clone();
    storage.set_snapshot_source(Box::new(move || snapshot_of(&src)));
    let raft_cfg = raft::Config {
        id: id.0,
        election_tick: cfg.election_tick,
        heartbeat_tick: cfg.heartbeat_tick,
        applied: applied.0,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: 256,
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut raw = RawNode::new(&raft_cfg, storage, &logger)?;
    if bootstrap && !initialized {
        raw.campaign()?;
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(INBOX_LEN);
    let handle = RaftHandle {
        tx,
        shared: shared.clone(),
        id,
    };
    let node = Node {
        raw,
        shared,
        outbox,
        pending: HashMap::new(),
        next_seq: 1,
        cfg,
        id: id.0,
        ready_term: 0,
        rounds: Default::default(),
    };
    let thread = std::thread::Builder::new()
        .name("raft".into())
        .spawn(move || node.run(rx))?;
    Ok((handle, thread))
}

fn snapshot_of(shared: &Shared) -> Option<Snapshot> {
    let (index, term, cs) = shared.applied.lock().ok()?.clone();
    let state = shared.state.read().ok()?;
    let mut snap = Snapshot {
        data: serde_json::to_vec(&*state).ok()?.into(),
        ..Default::default()
    };
    let meta = snap.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(cs);
    Some(snap)
}

impl Node {
    fn run(mut self, rx: Receiver<RaftMsg>) {
        let mut last_tick = Instant::now();
        loop {
            let wait = self.cfg.tick.saturating_sub(last_tick.elapsed());
            match rx.recv_timeout(wait) {
                Ok(m) => self.handle(m),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            // Drain what else is queued before doing the (fsyncing) ready work once.
            while let Ok(m) = rx.try_recv() {
                self.handle(m);
            }
            if last_tick.elapsed() >= self.cfg.tick {
                self.raw.tick();
                self.retry_rounds();
                last_tick = Instant::now();
            }
            // A second pass sends at once what handling the first one's read states made (the
            // next leadership round) instead of a tick later.
            for _ in 0..2 {
                if let Err(e) = self.on_ready() {
                    // Storage failed: Raft cannot go on safely. Crash and let systemd restart us.
                    tracing::error!("raft storage failed, aborting: {e}");
                    std::process::abort();
                }
                if !self.raw.has_ready() {
                    break;
                }
            }
        }
    }

    /// Re-issue a leadership round that went unanswered for two heartbeats.
    fn retry_rounds(&mut self) {
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        let retry = self.cfg.tick * (2 * self.cfg.heartbeat_tick).max(1) as u32;
        let term = self.raw.raft.term;
        if let Some(ctx) = self.rounds.tick(term, Instant::now(), retry) {
            self.raw.read_index(ctx);
        }
    }

    /// Publish the issue times that ReadIndex answers confirmed; issue the next round.
    fn confirm_rounds(&mut self, states: Vec<raft::ReadState>) {
        let term = self.raw.raft.term;
        for rs in states {
            if self.raw.raft.state != StateRole::Leader {
                break;
            }
            let (confirmed, next) = self.rounds.answered(term, &rs.request_ctx, Instant::now());
            if let Some(at) = confirmed {
                self.shared.confirmed.send_if_modified(|c| {
                    let newer = c.is_none_or(|c| c < at);
                    if newer {
                        *c = Some(at);
                    }
                    newer
                });
            }
            if let Some(ctx) = next {
                self.raw.read_index(ctx);
            }
        }
    }

    fn handle(&mut self, m: RaftMsg) {
        match m {
            RaftMsg::ConfirmLeader { since } => {
                if self.raw.raft.state != StateRole::Leader {
                    return;
                }
                let term = self.raw.raft.term;
                if let Some(ctx) = self.rounds.want(term, since, Instant::now()) {
                    self.raw.read_index(ctx);
                }
            }
            RaftMsg::Step(msg) => {
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!("raft step: {e}");
                }
            }
            RaftMsg::Propose { op, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(WireError::new(ErrorCode::NotLeader, "")));
                    return;
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let data = match serde_json::to_vec(&Proposal {
                    proposer: self.id,
                    seq,
                    op,
                    unix: proto::clock::now_unix(),
                }) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = reply.send(Err(WireError::new(ErrorCode::Internal, e.to_string())));
                        return;
                    }
                };
                match self.raw.propose(vec![], data) {
                    Ok(()) => {
                        self.pending.insert(seq, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(WireError::new(
                            ErrorCode::Unavailable,
                            format!("proposal dropped: {e}"),
                        )));
                    }
                }
            }
            RaftMsg::ConfChange {
                change_type,
                member,
                reply,
            } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(WireError::new(ErrorCode::NotLeader, "")));
                    return;
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let mut cc = ConfChange::default();
                cc.set_change_type(change_type);
                cc.node_id = member.id.0;
                let ctx = serde_json::to_vec(&(self.id, seq, member)).unwrap_or_default();
                match self.raw.propose_conf_change(ctx, cc) {
                    Ok(()) => {
                        self.pending.insert(seq, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(WireError::new(
                            ErrorCode::Conflict,
                            format!("membership change refused: {e}"),
                        )));
                    }
                }
            }
        }
    }

    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            if self.outbox.try_send(m).is_err() {
                tracing::debug!("raft outbox full, dropping a message");
            }
        }
    }

    fn on_ready(&mut self) -> anyhow::Result<()> {
        if !self.raw.has_ready() {
            self.publish_status();
            return Ok(());
        }
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());
        self.confirm_rounds(rd.take_read_states());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
        }
        self.apply_entries(rd.take_committed_entries())?;
        let hs = rd.hs().cloned();
        self.raw.mut_store().persist(rd.entries(), hs.as_ref())?;
        self.send(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        self.send(light.take_messages());
        self.apply_entries(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.maybe_compact()?;
        if self.raw.raft.state != StateRole::Leader {
            self.rounds.reset();
        }
        if self.raw.raft.state != StateRole::Leader && !self.pending.is_empty() {
            for (_, r) in self.pending.drain() {
                let _ = r.send(Err(lost()));
            }
        }
        self.publish_status();
        Ok(())
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> anyhow::Result<()> {
        let m = snap.get_metadata().clone();
        let state: ClusterState = if snap.data.is_empty() {
            ClusterState::default()
        } else {
            serde_json::from_slice(&snap.data)?
        };
        self.raw.mut_store().apply_snapshot(&snap)?;
        if let Ok(mut s) = self.shared.state.write() {
            *s = state;
        }
        if let Ok(mut a) = self.shared.applied.lock() {
            *a = (m.index, m.term, m.get_conf_state().clone());
        }
        tracing::info!(index = m.index, "installed a snapshot from the leader");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        for e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {}
                EntryType::EntryNormal => self.apply_normal(&e),
                EntryType::EntryConfChange => self.apply_conf_change(&e)?,
                EntryType::EntryConfChangeV2 => {}
            }
            let cs = self.raw.store().conf_state().clone();
            if let Ok(mut a) = self.shared.applied.lock() {
                *a = (e.index, e.term, cs);
            }
            if self.raw.raft.state == StateRole::Leader && e.term == self.raw.raft.term {
                self.ready_term = e.term;
            }
        }
        Ok(())
    }

    fn apply_normal(&mut self, e: &Entry) {
        let proposal: Proposal = match serde_json::from_slice(&e.data) {
            Ok(p) => p,
            Err(err) => {
                tracing::error!(index = e.index, "undecodable log entry skipped: {err}");
                return;
            }
        };
        let result = match self.shared.state.write() {
            Ok(mut s) => state_machine::apply_at(&mut s, &proposal.op, e.index, proposal.unix),
            Err(_) => Err(WireError::new(ErrorCode::Internal, "state lock poisoned")),
        };
        if proposal.proposer == self.id {
            if let Some(r) = self.pending.remove(&proposal.seq) {
                let _ = r.send(result);
            }
        }
    }

    fn apply_conf_change(&mut self, e: &Entry) -> anyhow::Result<()> {
        let cc = ConfChange::parse_from_bytes(&e.data)?;
        let (proposer, seq, member): (u64, u64, MdmMember) = serde_json::from_slice(&e.context)?;
        let result = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                self.raw.mut_store().set_conf_state(cs)?;
                if let Ok(mut s) = self.shared.state.write() {
                    match cc.get_change_type() {
                        ConfChangeType::AddNode => {
                            s.mdms.insert(
                                member.id,
                                MdmMember {
                                    role: MdmRole::Manager,
                                    ..member.clone()
                                },
                            );
                        }
                        ConfChangeType::AddLearnerNode => {
                            s.mdms.insert(
                                member.id,
                                MdmMember {
                                    role: MdmRole::Standby,
                                    ..member.clone()
                                },
                            );
                        }
                        ConfChangeType::RemoveNode => {
                            s.mdms.remove(&member.id);
                        }
                    }
                    s.version = e.index;
                }
                Ok(Outcome {
                    message: "Membership changed".into(),
                    object_id: Some(member.id.0),
                })
            }
            Err(err) => Err(WireError::new(
                ErrorCode::Conflict,
                format!("membership change refused: {err}"),
            )),
        };
        if proposer == self.id {
            if let Some(r) = self.pending.remove(&seq) {
                let _ = r.send(result);
            }
        }
        Ok(())
    }

    fn maybe_compact(&mut self) -> anyhow::Result<()> {
        let first = raft::Storage::first_index(self.raw.store())?;
        let applied = self.raw.raft.raft_log.applied;
        if applied < first || applied - first < self.cfg.snapshot_interval_entries {
            return Ok(());
        }
        if let Some(snap) = snapshot_of(&self.shared) {
            if snap.get_metadata().index == applied {
                self.raw.mut_store().compact(&snap)?;
                tracing::info!(index = applied, "compacted the raft log into a snapshot");
            }
        }
        Ok(())
    }

    fn publish_status(&self) {
        let r = &self.raw.raft;
        let cs = self.raw.store().conf_state();
        let mut active = BTreeMap::new();
        if r.state == StateRole::Leader {
            for (id, pr) in r.prs().iter() {
                active.insert(*id, *id == self.id || pr.recent_active);
            }
        }
        if let Ok(mut st) = self.shared.status.write() {
            let is_leader = r.state == StateRole::Leader;
            *st = RaftStatus {
                id: self.id,
                is_leader,
                leader_id: r.leader_id,
                term: r.term,
                commit: r.raft_log.committed,
                applied: r.raft_log.applied,
                leader_ready: is_leader && self.ready_term == r.term,
                voters: cs.voters.clone(),
                learners: cs.learners.clone(),
                active,
            };
        }
    }
}
