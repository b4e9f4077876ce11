//! Control messages: what scli, SDS, SDC and MDMs ask an MDM, as JSON in the metadata part of a
//! [`kind::CONTROL`](crate::codec::kind::CONTROL) frame. A successful response carries an
//! [`MdmResponse`]; a failed one carries the frame status ([`ErrorCode`](crate::ErrorCode)) and
//! a human message. For [`ErrorCode::NotLeader`](crate::ErrorCode::NotLeader) the message is the
//! leader's address, or empty while none is known.

use crate::ids::*;
use crate::model::{ClusterMode, ClusterState, MdmMember, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MdmRequest {
    /// Exchange a username and password for a session token.
    Login { username: String, password: String },
    /// Change the object model (goes through Raft).
    Command {
        token: String,
        command: Command,
        /// The objects the client named by id (scli's `--volume_id` and the like), with the
        /// names it sent for them: the command is refused, changing nothing, unless each name
        /// still belongs to that id when the command is applied.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        expect: Vec<Binding>,
    },
    /// Read the object model.
    Query { token: String, query: Query },
    /// An SDS announces itself (by the name scli gave it) and reports its devices.
    SdsHello {
        name: String,
        devices: Vec<DeviceReport>,
        /// Data-integrity counters and scrubber progress (kept by the leader in memory).
        #[serde(default)]
        stats: SdsStats,
        /// The boot of the SDS's host ([`crate::daemon::boot_id`]); empty if unknown.
        #[serde(default)]
        boot: String,
    },
    /// An SDC registers its stable GUID.
    SdcRegister {
        guid: String,
        name: String,
        ip: String,
    },
    /// The primary of a PG finished copying it onto its rebuilding secondary.
    PgRebuilt {
        /// The reporting SDS (must be the PG's primary; checked against its certificate).
        name: String,
        pool: PoolId,
        pg: PgId,
        target: SdsId,
        rebuild: Epoch,
    },
    /// The redacted cluster map, if newer than `known_version`.
    GetMap {
        known_version: u64,
        /// Set by an SDC: the poll doubles as its session heartbeat.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sdc: Option<SdcId>,
        /// Set by an SDC: what each volume mapped to it spent waiting for its QoS limits
        /// (total since the SDC started), as `(volume, milliseconds)`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        throttled_ms: Vec<(VolumeId, u64)>,
        /// Set by an SDC: each mapped volume's I/O since the SDC started (the leader samples it
        /// for the dashboard's plots).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        io: Vec<(VolumeId, IoCounters)>,
    },
    /// Who is this MDM (used before adding it as a standby).
    Identify,
    /// An MDM tells a peer the MDMs of its cluster map (sent on every new Raft connection), so
    /// an MDM that has no map yet (a standby being added) knows where to answer Raft messages.
    /// The receiver fills in only MDMs its own map lacks.
    Introduce { members: Vec<MdmMember> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceReport {
    pub path: String,
    pub capacity_bytes: u64,
    pub failed: bool,
    /// Chunks allocated on the device.
    #[serde(default)]
    pub chunks: u64,
    /// The SDS takes no new chunks on it and is moving its chunks to its other devices (it
    /// saw the device marked removing, or not listed at all, in the map).
    #[serde(default)]
    pub draining: bool,
    /// Why the device failed (the first error that failed it); empty while it works.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// The device's I/O since the SDS started (client, copy and rebuild I/O alike): the
    /// leader samples it for the dashboard's plots.
    #[serde(default, skip_serializing_if = "IoCounters::is_zero")]
    pub io: IoCounters,
}

/// Cumulative I/O counters a process reports (since it started): operations, bytes and the
/// summed latency of each direction. Rates and mean latencies come from two samples' difference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCounters {
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Summed latency of the reads, in microseconds.
    pub read_micros: u64,
    /// Summed latency of the writes, in microseconds.
    pub write_micros: u64,
}

impl IoCounters {
    pub fn is_zero(&self) -> bool {
        *self == IoCounters::default()
    }

    /// The field-wise sum (saturating).
    pub fn add(&mut self, o: &IoCounters) {
        self.read_ops = self.read_ops.saturating_add(o.read_ops);
        self.write_ops = self.write_ops.saturating_add(o.write_ops);
        self.read_bytes = self.read_bytes.saturating_add(o.read_bytes);
        self.write_bytes = self.write_bytes.saturating_add(o.write_bytes);
        self.read_micros = self.read_micros.saturating_add(o.read_micros);
        self.write_micros = self.write_micros.saturating_add(o.write_micros);
    }
}

/// A name a client took for the object with an id: scli looks ids up in the map and sends
/// commands by name, and this lets the MDM check that nothing renamed or replaced the object
/// in between ([`ClusterState::check_binding`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Binding {
    ProtectionDomain {
        id: PdId,
        name: String,
    },
    FaultSet {
        id: FaultSetId,
        pd: String,
        name: String,
    },
    StoragePool {
        id: PoolId,
        name: String,
    },
    Sds {
        id: SdsId,
        name: String,
    },
    Volume {
        id: VolumeId,
        name: String,
    },
    Mdm {
        id: MdmId,
        name: String,
    },
}

/// Picks an SDC the ScaleIO way: by name, IP, GUID or id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SdcSelector {
    Name(String),
    Ip(String),
    Guid(String),
    Id(SdcId),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewDevice {
    pub path: String,
    pub pool: String,
    /// Capacity to assume until the SDS reports the real one.
    pub capacity_bytes: Option<u64>,
}

/// What `RemoveVolume` removes besides (or instead of) the volume (ScaleIO's remove modes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoveMode {
    /// The volume alone; its snapshots stay.
    #[default]
    OnlyMe,
    /// The volume and every snapshot descended from it.
    IncludingDescendants,
    /// Every snapshot descended from the volume; the volume stays.
    DescendantsOnly,
    /// Every member of the volume's V-tree.
    WholeVtree,
}

impl RemoveMode {
    fn only_me(&self) -> bool {
        *self == RemoveMode::OnlyMe
    }
}

impl std::str::FromStr for RemoveMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "only_me" | "ONLY_ME" => RemoveMode::OnlyMe,
            "including_descendants" | "INCLUDING_DESCENDANTS" => RemoveMode::IncludingDescendants,
            "descendants_only" | "DESCENDANTS_ONLY" => RemoveMode::DescendantsOnly,
            "whole_vtree" | "WHOLE_VTREE" => RemoveMode::WholeVtree,
            _ => {
                return Err(format!(
                    "unknown remove mode {s:?}: one of only_me, including_descendants, descendants_only, whole_vtree"
                ))
            }
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    AddProtectionDomain {
        name: String,
    },
    AddFaultSet {
        pd: String,
        name: String,
    },
    AddStoragePool {
        pd: String,
        name: String,
        media_type: String,
        pg_count: Option<u32>,
    },
    AddSds {
        name: String,
        addr: String,
        pd: String,
        fault_set: Option<String>,
        devices: Vec<NewDevice>,
    },
    /// Remove an SDS: at once when it holds no data, else mark it removing (rebalance moves
    /// its copies off, then removes it).
    RemoveSds {
        name: String,
    },
    /// Set a pool's rebuild/rebalance throttle; `None` leaves a field as it is.
    SetRebuildPolicy {
        pool: String,
        concurrency: Option<u32>,
        bandwidth_mib_s: Option<u32>,
        adaptive: Option<bool>,
    },
    AddSdsDevice {
        sds: String,
        device: NewDevice,
    },
    /// Remove a device from an SDS: its chunks move to the SDS's other devices first (and PGs
    /// off the SDS when those lack room). Refused when it is the SDS's last device or when the
    /// rest of the protection domain cannot hold the data.
    RemoveSdsDevice {
        sds: String,
        path: String,
    },
    /// Clear a failed device's error (ScaleIO's `--clear_sds_device_error`): its SDS formats it
    /// anew and it comes back as new capacity (nothing on it is kept). Refused unless Failed.
    ClearSdsDeviceError {
        sds: String,
        path: String,
    },
    AddVolume {
        pool: String,
        name: String,
        size_bytes: u64,
        thin: bool,
        /// Free-form key/value labels kept with the volume (the Docker driver keeps its create
        /// options here so every host sees them).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        labels: BTreeMap<String, String>,
        /// Another host may take the volume over even while the host it is mapped to is alive.
        #[serde(default)]
        preempt: bool,
    },
    RemoveVolume {
        name: String,
        /// What else goes with it when it has snapshots (ScaleIO's `--remove_mode`). Left out
        /// of the entry when only the volume goes, so the entry reads as older versions wrote it.
        #[serde(default, skip_serializing_if = "RemoveMode::only_me")]
        mode: RemoveMode,
    },
    /// Snapshot `volumes` at one instant (ScaleIO's `--snapshot_volume`): each gets a writable,
    /// thin snapshot named by `names` (same order; empty for generated names). With several
    /// volumes the snapshots form a consistency group.
    SnapshotVolumes {
        volumes: Vec<String>,
        #[serde(default)]
        names: Vec<String>,
        /// Labels every new snapshot carries (the Docker driver's, for `snapshot_of`).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        labels: BTreeMap<String, String>,
    },
    /// Remove every snapshot a `SnapshotVolumes` command made (by its group id).
    RemoveConsistencyGroupSnapshots {
        group: u64,
    },
    /// A snapshot policy (see `model::SnapshotPolicy`), without source volumes yet.
    AddSnapshotPolicy {
        name: String,
        cadence_secs: u64,
        retain: Vec<u32>,
    },
    /// Remove a policy that has no source volumes left; the snapshots it took stay.
    RemoveSnapshotPolicy {
        name: String,
    },
    AddSourceVolumeToSnapshotPolicy {
        policy: String,
        volume: String,
    },
    RemoveSourceVolumeFromSnapshotPolicy {
        policy: String,
        volume: String,
    },
    /// Pause (`true`) or resume a policy's runs.
    PauseSnapshotPolicy {
        name: String,
        paused: bool,
    },
    /// Make `volume` read what `source` (a member of its V-tree) reads now; refused while
    /// `volume` is mapped unless `force`.
    OverwriteVolumeContent {
        volume: String,
        source: String,
        #[serde(default)]
        force: bool,
    },
    ModifyVolumeCapacity {
        name: String,
        size_bytes: u64,
    },
    RenameVolume {
        name: String,
        new_name: String,
    },
    MapVolumeToSdc {
        volume: String,
        sdc: SdcSelector,
        allow_multi_map: bool,
        /// If the volume is mapped to other SDCs whose sessions expired (or the volume allows
        /// preemption), fence and remove those mappings first. Refused with `Busy` while one of
        /// them is alive and the volume does not allow preemption.
        #[serde(default)]
        takeover: bool,
    },
    UnmapVolumeFromSdc {
        volume: String,
        sdc: Option<SdcSelector>,
    },
    SetSdcVolumeLimits {
        volume: String,
        sdc: SdcSelector,
        iops_limit: Option<u64>,
        bandwidth_limit_kbps: Option<u64>,
    },
    AddUser {
        name: String,
        role: Role,
        password: String,
    },
    AddStandbyMdm {
        addr: String,
        name: Option<String>,
    },
    SwitchClusterMode {
        mode: ClusterMode,
    },
    /// Remove a protection domain; refused while it has storage pools, fault sets or SDS.
    RemoveProtectionDomain {
        name: String,
    },
    /// Remove a storage pool; refused while it has volumes or devices.
    RemoveStoragePool {
        name: String,
    },
    /// Remove fault set `name` of protection domain `pd`; refused while it has SDS.
    RemoveFaultSet {
        pd: String,
        name: String,
    },
    /// Forget an SDC; refused while volumes are mapped to it or (checked by the leader) while
    /// its session is alive. An SDC that registers again later comes back as a new one.
    RemoveSdc {
        sdc: SdcSelector,
    },
    /// Remove a user; refused for the last Administrator and for the user sending it.
    RemoveUser {
        name: String,
    },
    /// Remove a standby MDM (a Raft learner, never a voter: switch the cluster mode down
    /// first to turn a manager into a standby).
    RemoveStandbyMdm {
        name: String,
    },
    /// Give an SDS another display name; it keeps saying hello by its certificate's name.
    RenameSds {
        name: String,
        new_name: String,
    },
    /// Give an SDC another display name; it keeps registering by its certificate's name.
    RenameSdc {
        sdc: SdcSelector,
        new_name: String,
    },
    /// Stop removing an SDS: it takes copies again (moves already under way finish, then
    /// rebalance evens the pool out). Refused unless the SDS is being removed.
    AbortRemoveSds {
        name: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Query {
    /// Everything: cluster, PDs, pools, SDS, volumes, SDCs.
    All,
    Cluster,
    ProtectionDomain {
        name: String,
    },
    StoragePool {
        name: String,
    },
    AllSds,
    Sds {
        name: String,
    },
    /// One SDC, or all of them when `None`.
    Sdc {
        sdc: Option<SdcSelector>,
    },
    Volume {
        name: String,
    },
    AllVolumes,
    /// What losing each SDS, fault set or device would do (`resilience::Resilience`, in the
    /// answer's status).
    Resilience,
    /// The events the MDMs recorded (`model::Event`), those at or after `since_unix` (Unix
    /// seconds) when given, oldest first.
    Events {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since_unix: Option<u64>,
    },
    /// A volume's V-tree: every member with its place in the tree and the space it alone holds.
    Vtree {
        name: String,
    },
    /// One snapshot policy, or all of them.
    SnapshotPolicy {
        name: Option<String>,
    },
}

/// An SDC heard from (its map poll, the session heartbeat) within this many milliseconds is
/// connected.
pub const SDC_SESSION_MS: u64 = 5000;

/// The cluster's Raft view, as `--query_cluster` prints it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Milliseconds since each SDC last polled this leader (its session heartbeat); an SDC
    /// absent here has not been heard by this leader.
    #[serde(default)]
    pub sdc_last_seen_ms: std::collections::BTreeMap<SdcId, u64>,
    /// What each SDS last reported about checksums and scrubbing, by SDS name.
    #[serde(default)]
    pub sds_stats: std::collections::BTreeMap<String, SdsStats>,
    /// The QoS wait each SDC last reported per mapped volume: `(sdc, volume, milliseconds)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sdc_throttled_ms: Vec<(SdcId, VolumeId, u64)>,
    pub mode: ClusterMode,
    /// `Normal` when every manager is reachable, `Degraded` otherwise.
    pub state: String,
    pub active: usize,
    pub total: usize,
    pub leader: Option<MdmStatus>,
    pub followers: Vec<MdmStatus>,
    pub standbys: Vec<MdmStatus>,
    pub term: u64,
    pub commit_index: u64,
    /// Per pool: the PG moves the rebalance still plans beyond those in flight (pools with
    /// none left out).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rebalance_moves_planned: std::collections::BTreeMap<String, u64>,
    /// The leader's analysis of single losses, for `Query::Resilience` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resilience: Option<crate::resilience::Resilience>,
}

/// An SDS's data-integrity counters since it started, and its scrubber's progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdsStats {
    /// Blocks found failing their CRC32 (by reads or the scrubber).
    pub checksum_errors: u64,
    /// Of those, blocks rewritten from the other copy.
    pub repaired_blocks: u64,
    /// Blocks with no good copy left: reads of them fail with an I/O error.
    pub unrecoverable_blocks: u64,
    /// Full scrub passes completed.
    pub scrub_passes: u64,
    /// Chunks verified in the current pass, of `scrub_chunks_total`.
    pub scrub_chunks_done: u64,
    pub scrub_chunks_total: u64,
    /// The scrubber's rate limit, bytes per second.
    pub scrub_rate_bytes: u64,
    /// PGs this SDS is copying to a new secondary right now (as their primary).
    #[serde(default)]
    pub rebuild_pgs_active: u64,
    /// Chunks this SDS holds (every copy it has) in each layer of the V-trees that have
    /// snapshots, as `(vtree, layer, chunks)`: what `--query_vtree` adds up.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_chunks: Vec<(VtreeId, LayerId, u64)>,
    /// Chunks this SDS holds (every copy) of each V-tree, recounted every few seconds: the
    /// space volumes use, as `--query_volume` shows it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vtree_chunks: Vec<(VtreeId, u64)>,
    /// Chunks those copies still have to visit (each at most 1 MiB).
    #[serde(default)]
    pub rebuild_chunks_left: u64,
    /// Bytes copied onto rebuild targets since start.
    #[serde(default)]
    pub rebuild_bytes_copied: u64,
    /// Rebuild copy rate over the last hellos, bytes per second (filled in by the MDM).
    #[serde(default)]
    pub rebuild_bytes_per_sec: u64,
    /// Chunks (1 MiB each) stored on this SDS: what a removal must move off.
    #[serde(default)]
    pub chunks_stored: u64,
    /// Chunks still on devices being removed (moved to this SDS's other devices).
    #[serde(default)]
    pub chunks_draining: u64,
    /// Chunks the current backward rebuilds (copies of only what changed) still skip.
    #[serde(default)]
    pub rebuild_chunks_skipped: u64,
    /// Of `chunks_stored`, chunks of thick volumes (the rest is thin data, which the MDM
    /// counts against the space thick volumes need).
    #[serde(default)]
    pub thick_chunks_stored: u64,
    /// Chunks of thick volumes this SDS holds but could not allocate: its devices are full.
    /// Writes to them can fail with ENOSPC; should be 0.
    #[serde(default)]
    pub thick_chunks_no_space: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MdmStatus {
    pub id: MdmId,
    pub name: String,
    pub addr: String,
    /// Leader's view: does it hear from this member.
    pub active: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MdmResponse {
    /// A command succeeded.
    Done {
        message: String,
        object_id: Option<String>,
    },
    Session {
        token: String,
        role: Role,
        expires_unix: u64,
    },
    /// A query's answer: the cluster status and the (redacted) state.
    View {
        status: Box<ClusterStatus>,
        state: Box<ClusterState>,
    },
    /// The answer to `SdsHello`.
    SdsWelcome {
        id: SdsId,
        /// The SDS serves only once its map is at least this new.
        #[serde(default)]
        map_version: u64,
        /// The lease this answer grants, in milliseconds from when the SDS sent its hello
        /// (derived from the leader's `sds_down_timeout_ms`, so the two cannot disagree). 0
        /// from an MDM older than this field: the SDS falls back to its own bound.
        #[serde(default)]
        lease_ms: u64,
    },
    SdcRegistered {
        id: SdcId,
    },
    Map {
        state: Option<Box<ClusterState>>,
    },
    Identity {
        id: MdmId,
        cluster_id: u64,
        /// Where this MDM serves its REST API and dashboard (`https://host:port`), when it
        /// does: a follower redirects browsers and API clients to the leader's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_url: Option<String>,
    },
}
