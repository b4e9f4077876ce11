//! The replicated object model: what the MDM state machine holds and every other process caches.
//!
//! Only the MDM changes it (through Raft); SDS and SDC receive copies with secrets removed
//! ([`ClusterState::redacted`]). Maps are `BTreeMap`s so that applying the same log gives the
//! same state, byte for byte, on every MDM.

use crate::ids::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Default number of placement groups in a new pool.
pub const DEFAULT_PG_COUNT: u32 = 256;
/// Largest PG count a pool may have.
pub const PG_COUNT_MAX: u32 = 16384;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ClusterMode {
    #[default]
    #[serde(rename = "1_node")]
    OneNode,
    #[serde(rename = "3_node")]
    ThreeNode,
    #[serde(rename = "5_node")]
    FiveNode,
}

impl ClusterMode {
    pub fn voters(self) -> usize {
        match self {
            ClusterMode::OneNode => 1,
            ClusterMode::ThreeNode => 3,
            ClusterMode::FiveNode => 5,
        }
    }
    pub fn parse(s: &str) -> Option<ClusterMode> {
        match s {
            "1_node" => Some(ClusterMode::OneNode),
            "3_node" => Some(ClusterMode::ThreeNode),
            "5_node" => Some(ClusterMode::FiveNode),
            _ => None,
        }
    }
}

impl fmt::Display for ClusterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClusterMode::OneNode => "1_node",
            ClusterMode::ThreeNode => "3_node",
            ClusterMode::FiveNode => "5_node",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    Monitor,
    Configure,
    Administrator,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s.to_ascii_lowercase().as_str() {
            "monitor" => Some(Role::Monitor),
            "configure" => Some(Role::Configure),
            "administrator" => Some(Role::Administrator),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MdmRole {
    /// A voting member.
    Manager,
    /// A learner that receives the log and can be promoted by switching cluster mode.
    Standby,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdmMember {
    pub id: MdmId,
    pub name: String,
    /// Address of its QUIC port, `ip:port`.
    pub addr: String,
    pub role: MdmRole,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub salt: String,
    pub password_sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectionDomain {
    pub id: PdId,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSet {
    pub id: FaultSetId,
    pub name: String,
    pub pd: PdId,
}

/// The copies of one placement group: `[primary, secondary]`, either may be missing while the
/// pool lacks SDS or after a failure.
///
/// - Normal: both set, `rebuild` is `None`.
/// - Degraded: only `primary` is set; writes go to one copy.
/// - Rebuilding: `secondary` is being filled by the primary (`rebuild` names the epoch the copy
///   was assigned at); it receives every new write but serves no read, and the PG counts as one
///   copy until the primary reports the copy done.
/// - Unavailable: `primary` names an SDS that is down: it held the newest data when the PG lost
///   its last live copy, so the PG serves nothing until that SDS returns (never stale data).
/// - Rebalancing: a rebuilding `secondary` is being filled while `leaving` (the copy it
///   replaces, still in sync) keeps receiving every write; when the copy is done `leaving` is
///   dropped. So a move never leaves the PG with fewer than two in-sync copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PgMapping {
    pub primary: Option<SdsId>,
    pub secondary: Option<SdsId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<Epoch>,
    /// An in-sync copy being moved off (rebalance): written to, never read, dropped once the
    /// rebuilding `secondary` is complete. Only set while `rebuild` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaving: Option<SdsId>,
    /// The in-sync secondary declared down while the primary stayed, with the epoch of the
    /// drop: if it returns within the MDM's backward-rebuild window it becomes the rebuild
    /// target again and gets only what changed since. Cleared when the PG has two in-sync
    /// copies again or its primary changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<(SdsId, Epoch)>,
    /// Set with `rebuild` for a backward rebuild: the target held the PG's data as of this
    /// epoch, so a primary that tracked every chunk written since copies only those (else it
    /// copies everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_since: Option<Epoch>,
}

/// What a PG can do, derived from its mapping and the state of its SDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PgState {
    Normal,
    /// Two in-sync copies while a third is filled to replace one of them (rebalance).
    Rebalancing,
    Rebuilding,
    Degraded,
    Unavailable,
    /// No copy assigned (a pool without SDS).
    Unassigned,
}

impl PgMapping {
    /// The PG's state in `s`.
    pub fn state(&self, s: &ClusterState) -> PgState {
        let up = |id: SdsId| s.sds.get(&id).is_some_and(|x| x.state != SdsState::Down);
        match (self.primary, self.secondary) {
            (None, _) => PgState::Unassigned,
            (Some(p), _) if !up(p) => PgState::Unavailable,
            (Some(_), Some(_)) if self.rebuild.is_some() && self.leaving.is_some() => {
                PgState::Rebalancing
            }
            (Some(_), Some(_)) if self.rebuild.is_some() => PgState::Rebuilding,
            (Some(_), Some(_)) => PgState::Normal,
            (Some(_), None) => PgState::Degraded,
        }
    }

    /// The copy besides the primary that holds all of the PG's data: the secondary, or while
    /// a new secondary is being filled by a move (rebalance), the copy it replaces. `None`
    /// when the PG is degraded or rebuilding (the primary holds the only complete copy).
    pub fn in_sync_secondary(&self) -> Option<SdsId> {
        if self.rebuild.is_none() {
            self.secondary
        } else {
            self.leaving
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoragePool {
    pub id: PoolId,
    pub name: String,
    pub pd: PdId,
    pub media_type: String,
    pub pg_count: u32,
    /// Bumped on every change to `pgs`.
    pub epoch: Epoch,
    /// Indexed by `PgId`.
    pub pgs: Vec<PgMapping>,
    /// Limits on the copies rebuild and rebalance make (each SDS applies them to itself).
    #[serde(default)]
    pub rebuild_policy: RebuildPolicy,
}

/// Default chunk copies in flight per SDS for rebuild and rebalance.
pub const DEFAULT_REBUILD_CONCURRENCY: u32 = 8;
/// Default copy bandwidth per SDS, MiB/s (0 = unlimited).
pub const DEFAULT_REBUILD_BANDWIDTH_MIB_S: u32 = 200;
/// Adaptive mode's limits while the SDS serves user I/O: copies in flight and MiB/s.
pub const ADAPTIVE_BUSY_CONCURRENCY: u32 = 1;
pub const ADAPTIVE_BUSY_BANDWIDTH_MIB_S: u32 = 10;

/// How fast rebuild and rebalance may copy, per SDS (as a copy source). Set with
/// `scli --set_rebuild_rebalance_policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildPolicy {
    /// Chunk copies (1 MiB each) in flight at once. Default: 8.
    pub concurrency: u32,
    /// Copy bandwidth in MiB/s; 0 = unlimited. Default: 200.
    pub bandwidth_mib_s: u32,
    /// Back off to 1 copy at 10 MiB/s while the SDS served user I/O in the last second; full
    /// limits when idle, so foreground I/O keeps most of its speed during a rebuild and an idle
    /// cluster rebuilds at full speed. Default: on.
    pub adaptive: bool,
}

impl Default for RebuildPolicy {
    fn default() -> Self {
        RebuildPolicy {
            concurrency: DEFAULT_REBUILD_CONCURRENCY,
            bandwidth_mib_s: DEFAULT_REBUILD_BANDWIDTH_MIB_S,
            adaptive: true,
        }
    }
}

impl StoragePool {
    pub fn pg(&self, pg: PgId) -> Option<&PgMapping> {
        self.pgs.get(pg.0 as usize)
    }
}

/// A pool's health, as `--query_storage_pool` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolHealth {
    /// The worst PG state: Normal, Rebalancing, Rebuilding, Degraded or Unavailable.
    pub state: String,
    pub normal_pgs: u32,
    #[serde(default)]
    pub rebalancing_pgs: u32,
    pub rebuilding_pgs: u32,
    pub degraded_pgs: u32,
    pub unavailable_pgs: u32,
}

impl ClusterState {
    /// Count the pool's PGs by state.
    pub fn pool_health(&self, pool: &StoragePool) -> PoolHealth {
        let mut h = PoolHealth::default();
        let mut worst = PgState::Normal;
        for m in &pool.pgs {
            let st = m.state(self);
            worst = worst.max(st);
            match st {
                PgState::Normal => h.normal_pgs += 1,
                PgState::Rebalancing => h.rebalancing_pgs += 1,
                PgState::Rebuilding => h.rebuilding_pgs += 1,
                PgState::Degraded => h.degraded_pgs += 1,
                PgState::Unavailable | PgState::Unassigned => h.unavailable_pgs += 1,
            }
        }
        h.state = match worst {
            PgState::Unassigned if pool.pgs.iter().all(|m| m.primary.is_none()) => "NoCapacity",
            PgState::Normal => "Normal",
            PgState::Rebalancing => "Rebalancing",
            PgState::Rebuilding => "Rebuilding",
            PgState::Degraded => "Degraded",
            PgState::Unavailable | PgState::Unassigned => "Unavailable",
        }
        .to_string();
        h
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdsState {
    /// Added, never seen yet.
    Initializing,
    Normal,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// Waiting for the SDS to report its capacity.
    Initializing,
    Normal,
    Failed,
    /// `scli --remove_sds_device` was given: the device takes no new chunks and its SDS moves
    /// its chunks to its other devices (rebalance first moves PGs off the SDS when those lack
    /// room); the record goes once the SDS reports the device empty. Not counted as capacity.
    Removing,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: DeviceId,
    pub path: String,
    pub pool: PoolId,
    pub capacity_bytes: u64,
    pub state: DeviceState,
    /// Why the device failed, as its SDS reported it (empty unless Failed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The error an operator cleared (`--clear_sds_device_error`): while the device is
    /// Initializing, hellos still reporting that error come from before the SDS saw the clear.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cleared_error: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sds {
    pub id: SdsId,
    pub name: String,
    /// Data address, `ip:port`.
    pub addr: String,
    pub pd: PdId,
    pub fault_set: Option<FaultSetId>,
    pub devices: Vec<Device>,
    pub state: SdsState,
    /// `scli --remove_sds` was given while it held data: rebalance moves every copy off it,
    /// then it is removed. It receives no new copies meanwhile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removing: bool,
    /// The boot of the SDS's host it last reported (the kernel's boot id). A new one means the
    /// host restarted and its devices may have lost writes they had not flushed: the SDS is
    /// treated as down and comes back holding nothing (see ARCHITECTURE, "Flushes").
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot: String,
    /// The name its certificate carries (`sds:NAME`), by which it says hello and speaks to its
    /// peers, once `--rename_sds` gave it another display name; `None` while the two are the
    /// same (every SDS until renamed, and every map written before renames existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_name: Option<String>,
}

impl Sds {
    /// The name its certificate carries: how it identifies itself, whatever its display name.
    pub fn cert_name(&self) -> &str {
        self.cert_name.as_deref().unwrap_or(&self.name)
    }

    /// Usable capacity this SDS brings to `pool` (devices not failed).
    pub fn capacity_in(&self, pool: PoolId) -> u64 {
        self.devices
            .iter()
            .filter(|d| {
                d.pool == pool && d.state != DeviceState::Failed && d.state != DeviceState::Removing
            })
            .map(|d| d.capacity_bytes)
            .sum()
    }
}

/// The volume label that marks a volume made by the Docker driver's Create (value
/// [`CREATED_BY_DOCKER`]). Reserved: scli refuses to set it, so every host's Docker driver can
/// tell the volumes Docker made (which it lists, mounts and removes) from all others.
pub const LABEL_CREATED_BY: &str = "created-by";
/// The value of [`LABEL_CREATED_BY`] on a volume made by the Docker driver.
pub const CREATED_BY_DOCKER: &str = "docker";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: VolumeId,
    pub name: String,
    pub pool: PoolId,
    pub size_bytes: u64,
    pub thin: bool,
    pub vtree: VtreeId,
    pub created_unix: u64,
    /// Free-form labels given at creation (the Docker driver's options).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Another host may take the volume over while its current host is alive.
    #[serde(default)]
    pub preempt: bool,
    /// The layer of its V-tree this volume writes to (0 until the tree's first snapshot).
    #[serde(default, skip_serializing_if = "is_layer_zero")]
    pub layer: LayerId,
    /// Set on a snapshot: what it was taken of, when, and in which consistency group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotOf>,
}

fn is_layer_zero(l: &LayerId) -> bool {
    l.0 == 0
}

/// Where a snapshot came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOf {
    /// The volume (or snapshot) it was taken of; it may have been removed since.
    pub volume: VolumeId,
    /// When it was taken (the proposing leader's clock).
    pub unix: u64,
    /// The consistency group: every snapshot taken by the same command (one volume or several)
    /// shares it, and `--remove_consistency_group_snapshots` removes them together.
    pub group: u64,
    /// Set on a snapshot a policy took: the policy's name and the number of the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<(String, u64)>,
}

/// A snapshot policy (ScaleIO's): every `cadence_secs` the MDM leader snapshots the policy's
/// source volumes together (one consistency group per run) and prunes older runs by level:
/// level 0 keeps the newest `retain[0]` runs, level 1 the newest `retain[1]` of every
/// `retain[0]`-th run, level 2 the newest `retain[2]` of every `retain[0]·retain[1]`-th, and so
/// on. Its state is in the map, so a new leader carries on where the old one stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPolicy {
    pub name: String,
    pub cadence_secs: u64,
    pub retain: Vec<u32>,
    /// The source volumes, snapshotted together at each run.
    pub volumes: Vec<VolumeId>,
    #[serde(default)]
    pub paused: bool,
    /// Runs so far (each run's snapshots carry its number).
    pub runs: u64,
    /// When the last run was (the proposing leader's clock); 0 before the first.
    pub last_run_unix: u64,
}

/// A V-tree (ScaleIO's name): a volume and every snapshot descended from it share one tree,
/// whose chunks live in the same PGs. Each member writes to a layer of its own; a snapshot
/// freezes the member's layer and gives it and the new snapshot fresh layers on top, so taking
/// one copies nothing, and reading a member finds each block in the first layer of its chain
/// (its layer, then each parent) that wrote it. A tree absent from the map has the single
/// layer 0 (volumes never snapshotted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Vtree {
    /// Every layer still in use (a member's, or below one), with its parent.
    pub layers: BTreeMap<LayerId, Option<LayerId>>,
    /// The next layer id to hand out (ids are never reused: an SDS may still hold a removed
    /// layer's chunks until its collector frees them).
    pub next_layer: u32,
}
impl Volume {
    /// Made by the Docker driver's Create (see [`LABEL_CREATED_BY`]).
    pub fn created_by_docker(&self) -> bool {
        self.labels.get(LABEL_CREATED_BY).map(String::as_str) == Some(CREATED_BY_DOCKER)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sdc {
    pub id: SdcId,
    pub guid: String,
    pub name: String,
    pub ip: String,
    /// The name its certificate carries (`sdc:NAME`), by which it registers and renews its
    /// session, once `--rename_sdc` gave it another display name; `None` while the two are the
    /// same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_name: Option<String>,
}

impl Sdc {
    /// The name its certificate carries: how it identifies itself, whatever its display name.
    pub fn cert_name(&self) -> &str {
        self.cert_name.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub volume: VolumeId,
    pub sdc: SdcId,
    /// Unique over the cluster's life (a value of the `next_id` counter): the SDC stamps it on every data
    /// request as the header's `fence`, and an SDS serves a volume's I/O only under the
    /// generation of one of its current mappings. Removing a mapping (unmap, takeover) fences
    /// whoever still holds it.
    #[serde(default)]
    pub generation: u64,
    /// 0 = unlimited.
    pub iops_limit: u64,
    /// 0 = unlimited.
    pub bandwidth_limit_kbps: u64,
}

/// The answer of [`ClusterState::check_fence`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceCheck {
    Allowed,
    /// The generation is not in this map but may be in a newer one: refresh and ask again.
    NewerThanMap,
    /// The mapping was removed (unmapped or taken over by another host).
    Fenced,
    /// The generation is a current mapping of the volume, but to another SDC.
    OtherHost,
    /// The volume writes to another layer now (a snapshot froze the one asked for): the
    /// requester's map is older than the snapshot; refresh and retry.
    OldLayer,
}

/// The whole replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    /// Raft index of the last applied change: a version number for caches.
    pub version: u64,
    pub cluster_id: u64,
    pub cluster_name: String,
    /// Key that signs session tokens. Never leaves the MDMs.
    pub secret: String,
    pub mode: ClusterMode,
    pub mdms: BTreeMap<MdmId, MdmMember>,
    pub next_id: u64,
    pub users: BTreeMap<String, User>,
    pub pds: BTreeMap<PdId, ProtectionDomain>,
    pub fault_sets: BTreeMap<FaultSetId, FaultSet>,
    pub pools: BTreeMap<PoolId, StoragePool>,
    pub sds: BTreeMap<SdsId, Sds>,
    pub volumes: BTreeMap<VolumeId, Volume>,
    pub sdcs: BTreeMap<SdcId, Sdc>,
    pub mappings: Vec<Mapping>,
    /// The V-trees that have had snapshots (see [`Vtree`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vtrees: BTreeMap<VtreeId, Vtree>,
    /// Snapshot policies, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshot_policies: BTreeMap<String, SnapshotPolicy>,
    /// What happened, oldest first: the newest [`EVENTS_KEPT`]. Kept by every MDM (it is in
    /// the replicated state) but not sent with maps ([`ClusterState::redacted`]).
    #[serde(default, skip_serializing_if = "std::collections::VecDeque::is_empty")]
    pub events: std::collections::VecDeque<Event>,
}

/// How many events the MDMs keep.
pub const EVENTS_KEPT: usize = 1000;

/// How much an event matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Info => "Info",
            Severity::Warning => "Warning",
            Severity::Error => "Error",
        })
    }
}

/// Something that happened in the cluster, with when and who.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The Raft log index that recorded it: increasing, unique.
    pub seq: u64,
    /// The leader's clock when it proposed the change (Unix seconds; 0 when unknown).
    pub unix: u64,
    pub severity: Severity,
    /// What kind of event: `sds_down`, `sds_up`, `device_failed`, `rebuild_started`,
    /// `rebuild_finished`, `takeover`, `leader`, `login`, `login_failed`, `command`.
    pub kind: String,
    /// Who: a user, an SDC, an MDM, or `cluster` for what the leader decided itself.
    pub actor: String,
    pub message: String,
}

impl ClusterState {
    /// Record `e`, dropping the oldest beyond [`EVENTS_KEPT`].
    pub fn push_event(&mut self, e: Event) {
        self.events.push_back(e);
        while self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
    }
}

impl ClusterState {
    /// A copy safe to hand to SDS, SDC and scli: no token key, no password hashes (and no
    /// events, which `Query::Events` returns on their own).
    pub fn redacted(&self) -> ClusterState {
        let mut s = self.clone();
        s.secret.clear();
        s.events.clear();
        for u in s.users.values_mut() {
            u.salt.clear();
            u.password_sha256.clear();
        }
        s
    }

    /// Whether `b`'s name still belongs to its object; if not, why, in words for the operator.
    /// Names are unique (fault set names within their protection domain), so a name that is
    /// still its object's cannot name another.
    pub fn check_binding(&self, b: &crate::msg::Binding) -> Result<(), String> {
        use crate::msg::Binding as B;
        let (kind, id, name, now) = match b {
            B::ProtectionDomain { id, name } => (
                "protection domain",
                id.to_string(),
                name,
                self.pds.get(id).map(|x| x.name.clone()),
            ),
            B::FaultSet { id, pd, name } => (
                "fault set",
                id.to_string(),
                name,
                self.fault_sets.get(id).map(|f| {
                    let in_pd = self.pds.get(&f.pd).map_or("", |p| p.name.as_str());
                    if in_pd == pd {
                        f.name.clone()
                    } else {
                        format!("{} in protection domain {in_pd}", f.name)
                    }
                }),
            ),
            B::StoragePool { id, name } => (
                "storage pool",
                id.to_string(),
                name,
                self.pools.get(id).map(|x| x.name.clone()),
            ),
            B::Sds { id, name } => (
                "SDS",
                id.to_string(),
                name,
                self.sds.get(id).map(|x| x.name.clone()),
            ),
            B::Volume { id, name } => (
                "volume",
                id.to_string(),
                name,
                self.volumes.get(id).map(|x| x.name.clone()),
            ),
            B::Mdm { id, name } => (
                "MDM",
                format!("0x{:016x}", id.0),
                name,
                self.mdms.get(id).map(|x| x.name.clone()),
            ),
        };
        match now {
            Some(n) if n == *name => Ok(()),
            Some(n) => Err(format!("the {kind} with id {id} was {name} but is now {n}")),
            None => Err(format!("the {kind} with id {id} ({name}) is gone")),
        }
    }

    pub fn pd_by_name(&self, name: &str) -> Option<&ProtectionDomain> {
        self.pds.values().find(|p| p.name == name)
    }
    pub fn pool_by_name(&self, name: &str) -> Option<&StoragePool> {
        self.pools.values().find(|p| p.name == name)
    }
    pub fn sds_by_name(&self, name: &str) -> Option<&Sds> {
        self.sds.values().find(|s| s.name == name)
    }
    /// The SDS whose certificate names it `name` (what it says in its hello and to its peers).
    pub fn sds_by_cert_name(&self, name: &str) -> Option<&Sds> {
        self.sds.values().find(|s| s.cert_name() == name)
    }
    pub fn volume_by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes.values().find(|v| v.name == name)
    }
    pub fn fault_set_by_name(&self, pd: PdId, name: &str) -> Option<&FaultSet> {
        self.fault_sets
            .values()
            .find(|f| f.pd == pd && f.name == name)
    }
    pub fn mappings_of(&self, volume: VolumeId) -> impl Iterator<Item = &Mapping> {
        self.mappings.iter().filter(move |m| m.volume == volume)
    }
    pub fn volume_by_vtree(&self, vtree: VtreeId) -> Option<&Volume> {
        self.volumes.values().find(|v| v.vtree == vtree)
    }
    /// The members of a V-tree (the volume and its snapshots).
    pub fn vtree_members(&self, vtree: VtreeId) -> impl Iterator<Item = &Volume> {
        self.volumes.values().filter(move |v| v.vtree == vtree)
    }
    /// Layer `layer` of `vtree` and then each layer below it, down to the tree's first: the
    /// order in which a read looks for a block. Empty if the layer is not in the map.
    pub fn chain(&self, vtree: VtreeId, layer: LayerId) -> Vec<LayerId> {
        let Some(t) = self.vtrees.get(&vtree) else {
            return if layer.0 == 0 {
                vec![layer]
            } else {
                Vec::new()
            };
        };
        let mut out = Vec::new();
        let mut at = Some(layer);
        while let Some(l) = at {
            let Some(parent) = t.layers.get(&l) else {
                return Vec::new();
            };
            if out.len() > t.layers.len() {
                return Vec::new(); // a cycle: never made by apply, refused rather than looped
            }
            out.push(l);
            at = *parent;
        }
        out
    }
    /// Whether `layer` of `vtree` is in the map (its chunks are to be kept).
    pub fn has_layer(&self, vtree: VtreeId, layer: LayerId) -> bool {
        match self.vtrees.get(&vtree) {
            Some(t) => t.layers.contains_key(&layer),
            None => layer.0 == 0,
        }
    }
    /// Every layer of `vtree` in the map.
    pub fn layers_of(&self, vtree: VtreeId) -> Vec<LayerId> {
        match self.vtrees.get(&vtree) {
            Some(t) => t.layers.keys().copied().collect(),
            None => vec![LayerId(0)],
        }
    }
    /// Raw capacity of a pool: the sum of its devices that are not failed.
    pub fn pool_raw_capacity(&self, pool: PoolId) -> u64 {
        self.sds.values().map(|s| s.capacity_in(pool)).sum()
    }
    /// Bytes of raw capacity reserved by thick volumes (two copies each).
    pub fn pool_thick_reserved(&self, pool: PoolId) -> u64 {
        self.volumes
            .values()
            .filter(|v| v.pool == pool && !v.thin)
            .map(|v| v.size_bytes.saturating_mul(2))
            .sum()
    }
}

#[cfg(test)]
mod binding_tests {
    use super::*;
    use crate::msg::Binding;

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (id, name) in [(1, "pd1"), (2, "pd2")] {
            s.pds.insert(
                PdId(id),
                ProtectionDomain {
                    id: PdId(id),
                    name: name.into(),
                },
            );
        }
        s.fault_sets.insert(
            FaultSetId(3),
            FaultSet {
                id: FaultSetId(3),
                name: "rack1".into(),
                pd: PdId(1),
            },
        );
        s
    }

    #[test]
    fn a_binding_holds_while_the_name_is_its_objects() {
        let s = state();
        let pd = |id, name: &str| Binding::ProtectionDomain {
            id: PdId(id),
            name: name.into(),
        };
        assert_eq!(s.check_binding(&pd(1, "pd1")), Ok(()));
        let renamed = s.check_binding(&pd(1, "pd2")).expect_err("another name");
        assert!(renamed.contains("was pd2 but is now pd1"), "{renamed}");
        let gone = s.check_binding(&pd(9, "pd1")).expect_err("no such id");
        assert!(gone.contains("is gone"), "{gone}");
        let fs = |pd: &str| Binding::FaultSet {
            id: FaultSetId(3),
            pd: pd.into(),
            name: "rack1".into(),
        };
        assert_eq!(s.check_binding(&fs("pd1")), Ok(()));
        let moved = s.check_binding(&fs("pd2")).expect_err("other PD");
        assert!(moved.contains("rack1 in protection domain pd1"), "{moved}");
        let v = Binding::Volume {
            id: VolumeId(5),
            name: "vol".into(),
        };
        assert!(s.check_binding(&v).is_err(), "no volumes at all");
    }
}
