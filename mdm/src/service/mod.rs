//! The MDM's network face: control requests from scli, SDS and SDC, and Raft messages between
//! MDMs, all over the QUIC transport. Every request first passes [`crate::authz`] (may the
//! sender's certificate role send it?); Raft frames then go to [`crate::raft_net`].
//!
//! Everything but `Identify` is answered by the leader only; a follower answers
//! `ErrorCode::NotLeader` with the leader's address so the client can go there. Reads are
//! served by a leader that has applied an entry of its own term, so they see every
//! acknowledged change.

use crate::auth;
use crate::authz;
use crate::metrics::MdmMetrics;
use crate::raft::RaftHandle;
use crate::raft_net;
use crate::state_machine::{self, Op, Outcome};
use proto::codec::{kind, Frame};
use proto::model::{ClusterMode, ClusterState, MdmMember, MdmRole, Role, SdsState, Severity, User};
use proto::msg::*;
use proto::transport::{check_status, Endpoint, Handler, Peer, Response, RpcClient};
use proto::{ErrorCode, MdmId, WireError};
use raft::eraftpb::ConfChangeType;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod commands;
mod queries;
mod rebalance;

/// The ticks of a leader-only loop: every `period`, a late tick not made up for.
fn leader_interval(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// How long a membership step may take.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(20);
/// PG moves (rebalance) in flight per pool at once.
pub const REBALANCE_MOVES_MAX: usize = 8;
/// How often the leader's rebalance driver looks at the map.
const REBALANCE_PERIOD: Duration = Duration::from_millis(500);

pub struct Service {
    pub raft: RaftHandle,
    pub endpoint: Endpoint,
    pub advertise: String,
    pub session_ttl_secs: u64,
    pub metrics: Arc<MdmMetrics>,
    /// Addresses of MDMs the cluster map does not list (yet): given by `--add_standby_mdm`, or
    /// introduced by a peer MDM from its map ([`crate::raft_net`]).
    pub(crate) peers: Mutex<HashMap<u64, String>>,
    /// When the leader last heard each SDS (leader-only, reset at every new term).
    liveness: Mutex<Liveness>,
    sds_down_timeout: Duration,
    /// What each SDS reported in its last hello to this MDM (soft state, not replicated), by
    /// the name its certificate carries (see `sds_stats()` for them by display name).
    sds_stats: Mutex<std::collections::BTreeMap<String, SdsStats>>,
    /// Per SDS: bytes copied at the start of the rate window, its start, the last rate.
    rebuild_rates: Mutex<HashMap<String, (u64, Instant, u64)>>,
    /// When each SDC last polled the map here (its session heartbeat; soft state).
    sdc_seen: Mutex<SdcSessions>,
    /// An SDC silent this long has lost its session: its volumes may be taken over.
    sdc_session_timeout: Duration,
    /// Per pool: since when it has not been Normal, with the worst state seen (leader's view,
    /// to log each finished rebuild or rebalance with its duration).
    pool_since: Mutex<HashMap<proto::PoolId, (Instant, String)>>,
    /// When this leader declared each SDS down (soft state: after a leader change a returning
    /// SDS gets a full copy, never a wrong backward one).
    down_since: Mutex<HashMap<proto::SdsId, Instant>>,
    backward_window: Duration,
    /// Held from a thick create's or growth's capacity check until it is applied.
    thick_admission: tokio::sync::Mutex<()>,
    /// The last hour of I/O rates, from hellos and map polls (leader-only soft state).
    pub history: Mutex<crate::history::History>,
    history_period: Duration,
    /// Where this MDM serves its REST API and dashboard (told to peers in `Identity`).
    pub api_url: std::sync::OnceLock<String>,
    /// Orders the rebalance driver's removal of an emptied SDS against `--abort_remove_sds`:
    /// each re-reads the map under it, so an aborted removal is never completed.
    sds_removal: tokio::sync::Mutex<()>,
}

/// The SDC session clock (leader-only soft state). A new term forgets what an earlier
/// leadership saw (the SDCs may have polled another leader meanwhile) and starts every SDC's
/// clock at the term's start.
#[derive(Default)]
struct SdcSessions {
    term: u64,
    since: Option<Instant>,
    seen: HashMap<proto::SdcId, Instant>,
    /// The QoS wait each SDC reported with its last poll, per volume (milliseconds).
    throttled: HashMap<proto::SdcId, Vec<(proto::VolumeId, u64)>>,
}

impl SdcSessions {
    fn roll(&mut self, term: u64) {
        if self.term != term || self.since.is_none() {
            self.term = term;
            self.since = Some(Instant::now());
            self.seen.clear();
            self.throttled.clear();
        }
    }

    /// How long this leader has gone without hearing from `sdc` (at most its time as leader).
    fn silence(&mut self, term: u64, sdc: proto::SdcId) -> Duration {
        self.roll(term);
        let since = self.since.unwrap_or_else(Instant::now);
        let last = self.seen.get(&sdc).copied().map_or(since, |t| t.max(since));
        last.elapsed()
    }
}

/// The leader's heartbeat clock per SDS.
#[derive(Default)]
struct Liveness {
    /// The term these timestamps belong to: a new leader starts every SDS's clock afresh.
    term: u64,
    last: HashMap<proto::SdsId, Instant>,
}

fn json<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => Response::ok(b, bytes::Bytes::new()),
        Err(e) => Response::error(&WireError::new(ErrorCode::Internal, e.to_string())),
    }
}

fn fail<T>(code: ErrorCode, msg: impl Into<String>) -> Result<T, WireError> {
    Err(WireError::new(code, msg))
}

/// The failure-handling clocks of the leader (from the MDM config).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// An SDS silent this long is declared down.
    pub sds_down: Duration,
    /// An SDC silent this long has lost its session.
    pub sdc_session: Duration,
    /// A down SDS back within this long is refilled by backward rebuild.
    pub backward_window: Duration,
    /// How often the leader samples I/O rates for the dashboard.
    pub history_sample: Duration,
}

impl Service {
    pub fn new(
        raft: RaftHandle,
        endpoint: Endpoint,
        advertise: String,
        session_ttl_secs: u64,
        metrics: Arc<MdmMetrics>,
        timeouts: Timeouts,
    ) -> Arc<Service> {
        let Timeouts {
            sds_down: sds_down_timeout,
            sdc_session: sdc_session_timeout,
            backward_window,
            history_sample,
        } = timeouts;
        Arc::new(Service {
            raft,
            endpoint,
            advertise,
            session_ttl_secs,
            metrics,
            peers: Mutex::new(HashMap::new()),
            liveness: Mutex::new(Liveness::default()),
            sds_down_timeout,
            sds_stats: Mutex::new(Default::default()),
            rebuild_rates: Mutex::new(HashMap::new()),
            sdc_seen: Mutex::new(SdcSessions::default()),
            sdc_session_timeout,
            pool_since: Mutex::new(HashMap::new()),
            down_since: Mutex::new(HashMap::new()),
            backward_window,
            thick_admission: tokio::sync::Mutex::new(()),
            history: Mutex::new(crate::history::History::new(history_sample)),
            history_period: history_sample,
            api_url: std::sync::OnceLock::new(),
            sds_removal: tokio::sync::Mutex::new(()),
        })
    }

    /// Record a hello from `sds` (leader only).
    fn heard(&self, sds: proto::SdsId) {
        let term = self.raft.shared.status().term;
        if let Ok(mut l) = self.liveness.lock() {
            if l.term != term {
                l.term = term;
                l.last.clear();
            }
            l.last.insert(sds, Instant::now());
        }
    }

    /// SDS the leader has not heard from within the down timeout (a new leader first waits a
    /// full timeout for everyone).
    fn silent_sds(&self, state: &ClusterState, term: u64) -> Vec<proto::SdsId> {
        let now = Instant::now();
        let Ok(mut l) = self.liveness.lock() else {
            return Vec::new();
        };
        if l.term != term {
            l.term = term;
            l.last.clear();
        }
        let mut out = Vec::new();
        for sds in state.sds.values() {
            if sds.state != SdsState::Normal {
                continue;
            }
            let last = *l.last.entry(sds.id).or_insert(now);
            if now.duration_since(last) > self.sds_down_timeout {
                out.push(sds.id);
            }
        }
        out
    }

    /// Wait for the next tick of a leader-only loop at which this MDM leads and has caught up
    /// with its term; its Raft status then.
    async fn leader_tick(&self, tick: &mut tokio::time::Interval) -> crate::raft::RaftStatus {
        loop {
            tick.tick().await;
            let st = self.raft.shared.status();
            if st.is_leader && st.leader_ready {
                return st;
            }
        }
    }

    /// The leader's I/O sampler: every history period, turn the counters SDS and SDCs last
    /// reported into a point per pool, SDS and volume ([`crate::history`]). Idle on followers.
    pub async fn sample_history(self: Arc<Self>) {
        let mut tick = leader_interval(self.history_period);
        let start = Instant::now();
        loop {
            let st = self.leader_tick(&mut tick).await;
            let objects = crate::history::Objects::of(&self.raft.shared.read_state());
            if let Ok(mut h) = self.history.lock() {
                h.sample(
                    st.term,
                    &objects,
                    proto::clock::now_unix(),
                    start.elapsed().as_secs_f64(),
                );
            }
        }
    }

    /// The leader's failure detector: declare SDS down through Raft once they have been silent
    /// past the timeout. Runs for the life of the process; idle on followers.
    pub async fn watch_sds(self: Arc<Self>) {
        let period = (self.sds_down_timeout / 5).max(Duration::from_millis(50));
        let mut tick = leader_interval(period);
        loop {
            let st = self.leader_tick(&mut tick).await;
            let state = self.raft.shared.read_state();
            for sds in self.silent_sds(&state, st.term) {
                let name = state
                    .sds
                    .get(&sds)
                    .map(|x| x.name.clone())
                    .unwrap_or_default();
                tracing::warn!(
                    %name,
                    timeout_ms = self.sds_down_timeout.as_millis() as u64,
                    "SDS silent past the down timeout: declaring it down"
                );
                match self.propose(Op::SdsDown { sds }).await {
                    Ok(out) => {
                        self.metrics.sds_declared_down.inc();
                        if let Ok(mut d) = self.down_since.lock() {
                            d.insert(sds, Instant::now());
                        }
                        tracing::warn!(%name, "{}", out.message)
                    }
                    Err(e) => tracing::warn!(%name, "could not declare the SDS down: {e}"),
                }
            }
        }
    }

    /// Refuse unless this MDM leads and has caught up with its term.
    fn require_leader(&self) -> Result<(), WireError> {
        let st = self.raft.shared.status();
        if st.is_leader && st.leader_ready {
            return Ok(());
        }
        if st.is_leader {
            return fail(
                ErrorCode::Unavailable,
                "the MDM leader is still catching up; retry",
            );
        }
        let hint = if st.leader_id != 0 {
            self.peer_addr(st.leader_id).unwrap_or_default()
        } else {
            String::new()
        };
        fail(ErrorCode::NotLeader, hint)
    }

    pub(crate) fn authorize(&self, token: &str, need: Role) -> Result<String, WireError> {
        let secret = self
            .raft
            .shared
            .state
            .read()
            .map(|s| s.secret.clone())
            .unwrap_or_default();
        let (user, role) = auth::verify_token(&secret, token, proto::clock::now_unix())?;
        // A removed user's sessions end with it (`--remove_user`).
        let exists = self
            .raft
            .shared
            .state
            .read()
            .is_ok_and(|s| s.users.contains_key(&user));
        if !exists {
            return fail(
                ErrorCode::PermissionDenied,
                format!("User {user} no longer exists; log in as another user"),
            );
        }
        if role < need {
            return fail(
                ErrorCode::PermissionDenied,
                format!("User {user} has role {role}; this command needs {need}"),
            );
        }
        Ok(user)
    }

    async fn control(&self, peer: &Peer, req: MdmRequest) -> Result<MdmResponse, WireError> {
        if let MdmRequest::Identify = req {
            let cluster_id = self
                .raft
                .shared
                .state
                .read()
                .map(|s| s.cluster_id)
                .unwrap_or(0);
            return Ok(MdmResponse::Identity {
                id: self.raft.id,
                cluster_id,
                api_url: self.api_url.get().cloned(),
            });
        }
        if let MdmRequest::Introduce { members } = req {
            return Ok(raft_net::introduce(self, members));
        }
        self.require_leader()?;
        match req {
            MdmRequest::Identify | MdmRequest::Introduce { .. } => {
                unreachable!("answered above")
            }
            MdmRequest::Login { username, password } => {
                self.login_from(peer.addr.ip(), &username, &password, None)
            }
            MdmRequest::Command {
                token,
                command,
                expect,
            } => self.command_as(peer.addr, &token, command, expect).await,
            MdmRequest::Query { token, query } => self.query_as(&token, &query),
            MdmRequest::SdsHello {
                name,
                devices,
                stats,
                boot,
            } => {
                authz::require_own_sds(peer, &name)?;
                let mut stats = stats;
                if let Ok(mut w) = self.rebuild_rates.lock() {
                    // The rebuild copy rate, measured over windows of at least 2 s.
                    let now = Instant::now();
                    let e = w
                        .entry(name.clone())
                        .or_insert((stats.rebuild_bytes_copied, now, 0));
                    let secs = now.duration_since(e.1).as_secs_f64();
                    if secs >= 2.0 {
                        let copied = stats.rebuild_bytes_copied.saturating_sub(e.0);
                        *e = (
                            stats.rebuild_bytes_copied,
                            now,
                            (copied as f64 / secs) as u64,
                        );
                    }
                    stats.rebuild_bytes_per_sec = e.2;
                }
                if let Ok(mut m) = self.sds_stats.lock() {
                    m.insert(name.clone(), stats);
                }
                self.sds_hello(&name, devices, boot).await
            }
            MdmRequest::PgRebuilt {
                name,
                pool,
                pg,
                target,
                rebuild,
            } => {
                authz::require_own_sds(peer, &name)?;
                let state = self.raft.shared.read_state();
                let me = state.sds_by_cert_name(&name).map(|x| x.id);
                let primary = state
                    .pools
                    .get(&pool)
                    .and_then(|p| p.pg(pg))
                    .and_then(|m| m.primary);
                if me.is_none() || me != primary {
                    return fail(
                        ErrorCode::Conflict,
                        format!("SDS {name} is not the primary of PG {pg}"),
                    );
                }
                let out = self
                    .propose(Op::PgRebuilt {
                        pool,
                        pg,
                        target,
                        rebuild,
                    })
                    .await?;
                tracing::info!(sds = %name, %pg, %target, "{}", out.message);
                Ok(MdmResponse::Done {
                    message: out.message,
                    object_id: None,
                })
            }
            MdmRequest::SdcRegister { guid, name, ip } => {
                authz::require_own_sdc(peer, &name)?;
                let state = self.raft.shared.read_state();
                if let Some(c) = state.sdcs.values().find(|c| c.guid == guid) {
                    if c.cert_name() == name || name.is_empty() {
                        return Ok(MdmResponse::SdcRegistered { id: c.id });
                    }
                }
                let ip = if ip.is_empty() {
                    peer.addr.ip().to_string()
                } else {
                    ip
                };
                let out = self.propose(Op::SdcRegister { guid, name, ip }).await?;
                Ok(MdmResponse::SdcRegistered {
                    id: proto::SdcId(out.object_id.unwrap_or(0)),
                })
            }
            MdmRequest::GetMap {
                known_version,
                sdc,
                throttled_ms,
                io,
            } => {
                if let Some(id) = sdc {
                    authz::require_own_sdc_id(peer, &self.raft.shared.read_state(), id)?;
                    let term = self.raft.shared.status().term;
                    if let Ok(mut h) = self.history.lock() {
                        let state = self.raft.shared.read_state();
                        h.report_sdc(term, id, &io, |v| state.volumes.contains_key(&v));
                    }
                    if let Ok(mut m) = self.sdc_seen.lock() {
                        m.roll(term);
                        m.seen.insert(id, Instant::now());
                        // Bounded: one entry per volume the SDC says it has mapped, at most
                        // as many as the map has.
                        let mut t = throttled_ms;
                        t.truncate(self.raft.shared.read_state().volumes.len());
                        m.throttled.insert(id, t);
                    }
                }
                let state = self.raft.shared.read_state();
                if state.version > known_version {
                    Ok(MdmResponse::Map {
                        state: Some(Box::new(state.redacted())),
                    })
                } else {
                    Ok(MdmResponse::Map { state: None })
                }
            }
        }
    }

    /// A login from `from` (scli over QUIC, or the REST API), recorded as an event.
    pub fn login_from(
        &self,
        from: std::net::IpAddr,
        username: &str,
        password: &str,
        ttl_secs: Option<u64>,
    ) -> Result<MdmResponse, WireError> {
        self.require_leader()?;
        let r = self.login(username, password, ttl_secs);
        let (severity, kind, message) = match &r {
            Ok(_) => (
                Severity::Info,
                "login",
                format!("User {username} logged in from {from}"),
            ),
            Err(_) => (
                Severity::Warning,
                "login_failed",
                format!("Failed login as {username} from {from}"),
            ),
        };
        self.record_event(severity, kind, username, message);
        r
    }

    /// The role a user needs for `command`: Administrator for users, MDMs and the cluster
    /// mode, Configure for the rest.
    pub fn role_needed(command: &Command) -> Role {
        match command {
            Command::AddUser { .. }
            | Command::RemoveUser { .. }
            | Command::AddStandbyMdm { .. }
            | Command::RemoveStandbyMdm { .. }
            | Command::SwitchClusterMode { .. } => Role::Administrator,
            _ => Role::Configure,
        }
    }

    /// Run `command` for the user whose session `token` is (from `from`), if their role allows
    /// it; recorded as an event.
    pub async fn command_as(
        &self,
        from: std::net::SocketAddr,
        token: &str,
        command: Command,
        expect: Vec<Binding>,
    ) -> Result<MdmResponse, WireError> {
        self.require_leader()?;
        let user = self.authorize(token, Self::role_needed(&command))?;
        authz::refuse_self_removal(&command, &user)?;
        let name = authz::command_name(&command);
        tracing::info!(%user, peer = %from, "command {name}");
        let out = self.command(command, expect).await?;
        self.record_event(
            Severity::Info,
            "command",
            &user,
            format!("{name}: {}", out.message),
        );
        Ok(MdmResponse::Done {
            message: out.message,
            object_id: out.object_id.map(|i| format!("{i:016x}")),
        })
    }

    /// Answer `query` for any logged-in user (Monitor and up).
    pub fn query_as(&self, token: &str, query: &Query) -> Result<MdmResponse, WireError> {
        self.require_leader()?;
        self.authorize(token, Role::Monitor)?;
        self.query(query)
    }

    fn login(
        &self,
        username: &str,
        password: &str,
        ttl_secs: Option<u64>,
    ) -> Result<MdmResponse, WireError> {
        let state = self.raft.shared.read_state();
        let denied = || {
            WireError::new(
                ErrorCode::Unauthenticated,
                "Login failed: wrong username or password",
            )
        };
        let user = state.users.get(username).ok_or_else(denied)?;
        if auth::hash_password(&user.salt, password) != user.password_sha256 {
            return Err(denied());
        }
        // A client may ask for a shorter session than the configured one, never a longer.
        let ttl = ttl_secs.map_or(self.session_ttl_secs, |t| t.clamp(1, self.session_ttl_secs));
        let expires_unix = proto::clock::now_unix() + ttl;
        let token = auth::make_token(&state.secret, username, user.role, expires_unix);
        Ok(MdmResponse::Session {
            token,
            role: user.role,
            expires_unix,
        })
    }

    /// Record an event through Raft without waiting for it (a lost leadership loses it; what
    /// it reports already happened).
    /// Client-given text in it (a user name) is cut to a bounded length.
    fn record_event(&self, severity: Severity, kind: &str, actor: &str, message: String) {
        let cut = |s: &str, max: usize| -> String { s.chars().take(max).collect() };
        let op = Op::RecordEvent {
            severity,
            kind: kind.into(),
            actor: cut(actor, 64),
            message: cut(&message, 512),
        };
        let raft = self.raft.clone();
        tokio::spawn(async move {
            if let Err(e) = raft.propose(op).await {
                tracing::debug!("event not recorded: {e}");
            }
        });
    }

    /// Record each new term this MDM leads as a `leader` event. Runs for the life of the
    /// process; idle on followers.
    pub async fn record_leadership(self: Arc<Self>) {
        let mut tick = leader_interval(Duration::from_millis(500));
        let mut recorded = 0;
        loop {
            let st = self.leader_tick(&mut tick).await;
            if st.term == recorded {
                continue;
            }
            let state = self.raft.shared.read_state();
            let name = state
                .mdms
                .get(&self.raft.id)
                .map_or_else(|| self.raft.id.to_string(), |m| m.name.clone());
            let op = Op::RecordEvent {
                severity: Severity::Info,
                kind: "leader".into(),
                actor: name.clone(),
                message: format!("MDM {name} became the leader (term {})", st.term),
            };
            if self.propose(op).await.is_ok() {
                recorded = st.term;
            }
        }
    }

    async fn propose(&self, op: Op) -> Result<Outcome, WireError> {
        self.metrics.proposals.inc();
        self.raft.propose(op).await.map_err(|e| self.redirect(e))
    }

    /// Proposes `command` stamped with this leader's clock (what apply records as the time of
    /// a new volume, the same on every MDM), to be applied only if the names in `expect` still
    /// hold then.
    async fn propose_command(
        &self,
        command: Command,
        expect: Vec<Binding>,
    ) -> Result<Outcome, WireError> {
        self.propose(Op::Command {
            command,
            proposed_unix: proto::clock::now_unix(),
            expect,
        })
        .await
    }

    /// A `NotLeader` from the Raft thread gets the leader's address filled in.
    fn redirect(&self, e: WireError) -> WireError {
        if e.code == ErrorCode::NotLeader && e.message.is_empty() {
            let st = self.raft.shared.status();
            return WireError::new(
                ErrorCode::NotLeader,
                self.peer_addr(st.leader_id).unwrap_or_default(),
            );
        }
        e
    }

    async fn sds_hello(
        &self,
        name: &str,
        devices: Vec<DeviceReport>,
        boot: String,
    ) -> Result<MdmResponse, WireError> {
        let received = Instant::now();
        let state = self.raft.shared.read_state();
        let Some(mut sds) = state.sds_by_cert_name(name).cloned() else {
            return fail(
                ErrorCode::NotFound,
                format!("No SDS named {name} was added; add it with scli --add_sds"),
            );
        };
        // A new boot of its host: its devices may have lost writes acknowledged but not yet
        // flushed, so none of its copies can be trusted as in sync. It is declared down (its
        // PGs fail over to their other copy, flushed by the SDC) before it may serve, and comes
        // back holding nothing: no backward rebuild, which would trust what it kept.
        let rebooted = !boot.is_empty() && !sds.boot.is_empty() && sds.boot != boot;
        if rebooted && sds.state != proto::model::SdsState::Down {
            tracing::warn!(%name, "the SDS's host restarted (new boot id): declaring it down, its copies are rebuilt");
            let out = self.propose(Op::SdsDown { sds: sds.id }).await?;
            tracing::info!(%name, "{}", out.message);
            let Some(again) = self
                .raft
                .shared
                .read_state()
                .sds_by_cert_name(name)
                .cloned()
            else {
                return fail(ErrorCode::NotFound, format!("SDS {name} was removed"));
            };
            sds = again;
        }
        let changed = sds.state != proto::model::SdsState::Normal
            || (!boot.is_empty() && sds.boot != boot)
            || devices.iter().any(|r| {
                sds.devices.iter().any(|d| {
                    d.path == r.path
                        && (d.capacity_bytes != r.capacity_bytes
                            || (d.state == proto::model::DeviceState::Failed) != r.failed
                            || d.state == proto::model::DeviceState::Initializing
                            || (d.state == proto::model::DeviceState::Removing
                                && r.draining
                                && r.chunks == 0))
                })
            });
        let id = sds.id;
        self.heard(id);
        if let Ok(mut h) = self.history.lock() {
            h.report_sds(self.raft.shared.status().term, id, &devices);
        }
        if changed {
            if sds.state == proto::model::SdsState::Down {
                tracing::info!(%name, "a down SDS reports again; it holds no copy until rebuilt");
            }
            let within_window = self
                .down_since
                .lock()
                .ok()
                .and_then(|mut d| d.remove(&id))
                .is_some_and(|t| t.elapsed() < self.backward_window);
            let backward = sds.state == proto::model::SdsState::Down && !rebooted && within_window;
            if backward {
                tracing::info!(%name, "a down SDS returns within the backward-rebuild window: it gets only what changed");
            }
            let out = self
                .propose(Op::SdsReport {
                    sds: id,
                    devices,
                    backward,
                    boot,
                })
                .await?;
            if out.message.contains("emptied") {
                tracing::info!(sds = %name, "{}", out.message);
            }
        }
        // A lease only from a leader that a quorum still follows (see crate::lease).
        let lease =
            crate::lease::grant(&self.raft, &self.metrics, received, self.sds_down_timeout).await?;
        // The SDS may serve only once it has a map at least as new as this: the one that
        // records it as Normal (and, after an outage, without the PGs it lost).
        let map_version = self.raft.shared.read_state().version;
        Ok(MdmResponse::SdsWelcome {
            id,
            map_version,
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
        })
    }
}

/// Send one control request and decode the answer.
pub async fn call_control(client: &RpcClient, req: &MdmRequest) -> Result<MdmResponse, WireError> {
    let body =
        serde_json::to_vec(req).map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
    let f = client
        .call_timeout(
            Frame::request(kind::CONTROL, body, bytes::Bytes::new()),
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| WireError::new(ErrorCode::Unavailable, e.to_string()))?;
    let f = check_status(f)?;
    serde_json::from_slice(&f.meta)
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("bad answer: {e}")))
}

impl Handler for Service {
    async fn handle(&self, peer: Arc<Peer>, req: Frame) -> Response {
        let r = match req.kind {
            kind::CONTROL => {
                self.metrics.requests.inc();
                match serde_json::from_slice::<MdmRequest>(&req.meta) {
                    Ok(m) => match authz::check(&peer, authz::Request::Control(&m)) {
                        Ok(()) => self.control(&peer, m).await.map(|r| json(&r)),
                        Err(e) => {
                            tracing::warn!(peer = %peer.addr, "{}", e.message);
                            Err(e)
                        }
                    },
                    Err(e) => fail(
                        ErrorCode::BadRequest,
                        format!("malformed control request: {e}"),
                    ),
                }
            }
            kind::RAFT => authz::check(&peer, authz::Request::Raft)
                .and_then(|()| raft_net::step(self, &req))
                .map(|()| Response::ok(bytes::Bytes::new(), bytes::Bytes::new())),
            other => fail(
                ErrorCode::BadRequest,
                format!("frame kind {other} is not served by an MDM"),
            ),
        };
        match r {
            Ok(r) => r,
            Err(e) => {
                if req.kind == kind::CONTROL {
                    self.metrics.request_errors.inc();
                }
                Response::error(&e)
            }
        }
    }
}
