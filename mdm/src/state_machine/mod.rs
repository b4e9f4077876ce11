//! The state machine: applies committed Raft entries ([`Op`]) to the [`ClusterState`].
//!
//! `apply` is deterministic (no clock, no RNG, no I/O): every input it needs (time, salts, new
//! cluster secret) was fixed by the proposing leader and is inside the entry. It validates each
//! command against the state it is applied to, so a command that lost a race is refused here
//! and changes nothing. Placement is recomputed here too, and every change to a pool's PG map
//! bumps the pool's epoch.
//!
//! This file: [`Op`], `apply` and the commands; [`sds`]: SDS, devices and PG copies (adding and
//! removing SDS and devices, reports, failures, rebuild and moves, placement); `admin`: removing
//! PDs, pools, fault sets, SDCs and users, renaming SDS and SDC, aborting an SDS's removal;
//! `tests`, `admin_tests`.

use crate::placement::{self, Candidate};
use proto::model::*;
use proto::msg::{Binding, Command, DeviceReport, NewDevice, SdcSelector};
use proto::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

mod admin;
#[cfg(test)]
mod admin_tests;
mod events;
pub mod policy;
mod sds;
#[cfg(test)]
mod tests;
mod vtree;

use sds::{
    add_sds, clear_device_error, move_pg, new_device, pg_rebuilt, remove_sds, remove_sds_device,
    sds_down, sds_report, set_rebuild_policy,
};
pub use sds::{copies_on, replace_placement};

/// Largest volume accepted: 1 PiB.
pub const VOLUME_SIZE_MAX: u64 = 1 << 50;
/// Longest object name (ScaleIO's limit).
pub const NAME_LEN_MAX: usize = 31;

/// A committed change.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Op {
    Bootstrap {
        cluster_id: u64,
        cluster_name: String,
        secret: String,
        admin: User,
        mdm: MdmMember,
    },
    Command {
        command: Command,
        /// The proposing leader's clock (Unix seconds) when it proposed the command: a new
        /// volume's creation time. 0 in entries of older versions.
        #[serde(default, skip_serializing_if = "is_zero")]
        proposed_unix: u64,
        /// Names the client took for ids ([`Binding`]): the command is refused, changing
        /// nothing, unless each still holds when the entry is applied.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        expect: Vec<Binding>,
    },
    AddUser {
        user: User,
    },
    SetMode {
        mode: ClusterMode,
    },
    SdsReport {
        sds: SdsId,
        devices: Vec<DeviceReport>,
        /// A down SDS returning within the backward-rebuild window (decided by the leader):
        /// the PGs it was dropped from take it back as a backward-rebuild target.
        #[serde(default)]
        backward: bool,
        /// The boot of the SDS's host, recorded when not empty.
        #[serde(default)]
        boot: String,
    },
    SdcRegister {
        guid: String,
        name: String,
        ip: String,
    },
    /// The leader stopped hearing from an SDS: its PGs fail over to their other copy.
    SdsDown {
        sds: SdsId,
    },
    /// Map `volume` to `sdc`, first removing (fencing) its mappings to `evict`: SDCs whose
    /// session the leader saw expire, or any SDC when the volume allows preemption. The
    /// leader decides who may be evicted; apply only checks they are still mapped.
    TakeOverVolume {
        volume: VolumeId,
        sdc: SdcId,
        evict: Vec<SdcId>,
    },
    /// The leader's run `run` of a snapshot policy whose cadence came round, at its clock
    /// `unix` (see `policy::run`).
    RunSnapshotPolicy {
        name: String,
        run: u64,
        unix: u64,
    },
    /// The primary finished copying a PG to its rebuilding secondary.
    PgRebuilt {
        pool: PoolId,
        pg: PgId,
        target: SdsId,
        /// The `rebuild` epoch of the assignment the copy was made for.
        rebuild: Epoch,
    },
    /// Rebalance: move the copy of a Normal PG on `from` to `to`. `to` becomes the rebuilding
    /// secondary and `from` keeps receiving writes (`leaving`) until the copy is done; a
    /// primary on `from` first hands its role to the in-sync secondary.
    MovePg {
        pool: PoolId,
        pg: PgId,
        from: SdsId,
        to: SdsId,
    },
    /// Record an event that changes nothing else (a login, a new leader, a command's result):
    /// the map's version stays, so no SDS or SDC fetches the map for it.
    RecordEvent {
        severity: Severity,
        kind: String,
        actor: String,
        message: String,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A log entry's payload: who proposed it (to answer the waiting client) and the op.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Proposal {
    pub proposer: u64,
    pub seq: u64,
    pub op: Op,
    /// The proposing leader's clock (Unix seconds): the time of the events the op records.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unix: u64,
}

/// What a successful op reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub message: String,
    pub object_id: Option<u64>,
}

fn done(message: impl Into<String>, id: Option<u64>) -> Result<Outcome, WireError> {
    Ok(Outcome {
        message: message.into(),
        object_id: id,
    })
}

fn err<T>(code: ErrorCode, msg: impl Into<String>) -> Result<T, WireError> {
    Err(WireError::new(code, msg))
}

fn not_found<T>(what: &str, name: &str) -> Result<T, WireError> {
    err(
        ErrorCode::NotFound,
        format!("Could not find the {what} {name}"),
    )
}

pub fn validate_name(what: &str, name: &str) -> Result<(), WireError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if name.is_empty() || name.len() > NAME_LEN_MAX || !ok_chars {
        return err(
            ErrorCode::BadRequest,
            format!("Invalid {what} name '{name}': use 1-{NAME_LEN_MAX} letters, digits, '_', '-' or '.'"),
        );
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g.fract() == 0.0 {
        format!("{g:.0}")
    } else {
        format!("{g:.2}")
    }
}

/// Fence and remove `volume`'s mappings to `evict`, then map it to `sdc` (the takeover keeps
/// the QoS limits of the mapping it replaces). Any other mapping left refuses the takeover.
fn take_over(
    s: &mut ClusterState,
    volume: VolumeId,
    sdc: SdcId,
    evict: &[SdcId],
) -> Result<Outcome, WireError> {
    let Some(name) = s.volumes.get(&volume).map(|v| v.name.clone()) else {
        return err(ErrorCode::NotFound, "The volume no longer exists");
    };
    if !s.sdcs.contains_key(&sdc) {
        return err(ErrorCode::NotFound, "The SDC no longer exists");
    }
    if s.mappings_of(volume).any(|m| m.sdc == sdc) {
        return err(
            ErrorCode::AlreadyExists,
            "The volume is already mapped to this SDC",
        );
    }
    if let Some(m) = s
        .mappings_of(volume)
        .find(|m| m.sdc != sdc && !evict.contains(&m.sdc))
    {
        return err(
            ErrorCode::Busy,
            format!(
                "Volume {name} is also mapped to SDC {}, which may not be evicted",
                m.sdc
            ),
        );
    }
    let (iops_limit, bandwidth_limit_kbps) = s
        .mappings_of(volume)
        .next()
        .map(|m| (m.iops_limit, m.bandwidth_limit_kbps))
        .unwrap_or((0, 0));
    let evicted = s.mappings_of(volume).count();
    s.mappings.retain(|m| m.volume != volume);
    let generation = new_generation(s);
    s.mappings.push(Mapping {
        volume,
        sdc,
        generation,
        iops_limit,
        bandwidth_limit_kbps,
    });
    done(
        format!("Successfully took volume {name} over ({evicted} old mapping(s) fenced)."),
        Some(volume.0),
    )
}

/// Labels: at most 32, keys 1-64 characters of `[A-Za-z0-9._/-]`, values at most 256.
fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), WireError> {
    if labels.len() > 32 {
        return err(ErrorCode::BadRequest, "A volume has at most 32 labels");
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 64
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'));
        if !key_ok {
            return err(
                ErrorCode::BadRequest,
                format!("Label key '{k}' must be 1-64 characters of letters, digits, '.', '_', '/', '-'"),
            );
        }
        if v.len() > 256 {
            return err(
                ErrorCode::BadRequest,
                format!("The value of label '{k}' is longer than 256 characters"),
            );
        }
    }
    Ok(())
}

/// A new mapping generation: the next value of the id counter, without the cluster bits, so
/// that a generation above `next_id` is known to be newer than a map (see
/// [`ClusterState::check_fence`]).
fn new_generation(s: &mut ClusterState) -> u64 {
    s.next_id += 1;
    s.next_id
}

fn new_id(s: &mut ClusterState) -> u64 {
    s.next_id += 1;
    // Ids carry the cluster id's high bits so ids of two clusters are unlikely to collide.
    (s.cluster_id & 0xFFFF_FFFF_0000_0000) | s.next_id
}

/// Apply one committed op at log `index` (no clock: events get time 0).
pub fn apply(s: &mut ClusterState, op: &Op, index: u64) -> Result<Outcome, WireError> {
    apply_at(s, op, index, 0)
}

/// Apply one committed op at log `index`, proposed at the leader's `unix` time, and record the
/// events it makes (see [`events`]).
pub fn apply_at(
    s: &mut ClusterState,
    op: &Op,
    index: u64,
    unix: u64,
) -> Result<Outcome, WireError> {
    if let Op::RecordEvent {
        severity,
        kind,
        actor,
        message,
    } = op
    {
        s.push_event(Event {
            seq: index,
            unix,
            severity: *severity,
            kind: kind.clone(),
            actor: actor.clone(),
            message: message.clone(),
        });
        return done("Event recorded", None);
    }
    let before = s.clone();
    let r = apply_inner(s, op);
    match &r {
        Ok(_) => {
            s.version = index;
            events::derive(&before, s, op, index, unix);
        }
        // A refused command changes nothing.
        Err(_) => *s = before,
    }
    r
}

fn apply_inner(s: &mut ClusterState, op: &Op) -> Result<Outcome, WireError> {
    match op {
        Op::Bootstrap {
            cluster_id,
            cluster_name,
            secret,
            admin,
            mdm,
        } => {
            if s.cluster_id != 0 {
                return err(ErrorCode::Conflict, "The cluster is already initialized");
            }
            s.cluster_id = *cluster_id;
            s.cluster_name = cluster_name.clone();
            s.secret = secret.clone();
            s.mode = ClusterMode::OneNode;
            s.users.insert(admin.name.clone(), admin.clone());
            s.mdms.insert(mdm.id, mdm.clone());
            done("Cluster initialized", Some(*cluster_id))
        }
        Op::AddUser { user } => {
            validate_name("user", &user.name)?;
            if s.users.contains_key(&user.name) {
                return err(
                    ErrorCode::AlreadyExists,
                    format!("A user named {} already exists", user.name),
                );
            }
            s.users.insert(user.name.clone(), user.clone());
            done(
                format!(
                    "Successfully created user {} with role {}",
                    user.name, user.role
                ),
                None,
            )
        }
        Op::SetMode { mode } => {
            s.mode = *mode;
            done(
                format!("Successfully switched the cluster mode to {mode}"),
                None,
            )
        }
        Op::SdsReport {
            sds,
            devices,
            backward,
            boot,
        } => sds_report(s, *sds, devices, *backward, boot),
        Op::TakeOverVolume { volume, sdc, evict } => take_over(s, *volume, *sdc, evict),
        Op::RunSnapshotPolicy { name, run, unix } => policy::run(s, name, *run, *unix),
        // Recorded by `apply_at` without touching anything else.
        Op::RecordEvent { .. } => done("Event recorded", None),
        Op::SdcRegister { guid, name, ip } => {
            if let Some(sdc) = s.sdcs.values_mut().find(|c| &c.guid == guid) {
                // The same certificate keeps the display name an operator may have given it
                // (`--rename_sdc`); a host registering under a new certificate name takes it.
                if sdc.cert_name() != name.as_str() {
                    sdc.name = name.clone();
                    sdc.cert_name = None;
                }
                sdc.ip = ip.clone();
                let id = sdc.id.0;
                return done("SDC re-registered", Some(id));
            }
            if guid.is_empty() || guid.len() > 64 {
                return err(ErrorCode::BadRequest, "SDC GUID must be 1-64 characters");
            }
            let id = SdcId(new_id(s));
            let name = if name.is_empty() {
                format!("sdc-{}", &guid[..guid.len().min(8)])
            } else {
                name.clone()
            };
            s.sdcs.insert(
                id,
                Sdc {
                    id,
                    guid: guid.clone(),
                    name,
                    ip: ip.clone(),
                    cert_name: None,
                },
            );
            done("SDC registered", Some(id.0))
        }
        Op::Command {
            command,
            proposed_unix,
            expect,
        } => {
            check_bindings(s, expect)?;
            apply_command(s, command, *proposed_unix)
        }
        Op::SdsDown { sds } => sds_down(s, *sds),
        Op::PgRebuilt {
            pool,
            pg,
            target,
            rebuild,
        } => pg_rebuilt(s, *pool, *pg, *target, *rebuild),
        Op::MovePg { pool, pg, from, to } => move_pg(s, *pool, *pg, *from, *to),
    }
}

/// Refuse (with [`ErrorCode::Conflict`]) unless every binding still holds in `s`.
pub fn check_bindings(s: &ClusterState, expect: &[Binding]) -> Result<(), WireError> {
    for b in expect {
        s.check_binding(b).map_err(|m| {
            WireError::new(
                ErrorCode::Conflict,
                format!("{m}: nothing was done; give the object again"),
            )
        })?;
    }
    Ok(())
}

fn pd_id(s: &ClusterState, name: &str) -> Result<PdId, WireError> {
    s.pd_by_name(name)
        .map(|p| p.id)
        .map_or_else(|| not_found("protection domain", name), Ok)
}

fn pool_id(s: &ClusterState, name: &str) -> Result<PoolId, WireError> {
    s.pool_by_name(name)
        .map(|p| p.id)
        .map_or_else(|| not_found("storage pool", name), Ok)
}

fn volume_id(s: &ClusterState, name: &str) -> Result<VolumeId, WireError> {
    s.volume_by_name(name)
        .map(|v| v.id)
        .map_or_else(|| not_found("volume", name), Ok)
}

/// Resolve an SDC selector.
pub fn sdc_id(s: &ClusterState, sel: &SdcSelector) -> Result<SdcId, WireError> {
    let found = s.sdcs.values().find(|c| match sel {
        SdcSelector::Name(n) => &c.name == n,
        SdcSelector::Ip(ip) => &c.ip == ip,
        SdcSelector::Guid(g) => c.guid.eq_ignore_ascii_case(g),
        SdcSelector::Id(id) => c.id == *id,
    });
    match found {
        Some(c) => Ok(c.id),
        None => err(ErrorCode::NotFound, "Could not find the SDC"),
    }
}

fn apply_command(
    s: &mut ClusterState,
    c: &Command,
    proposed_unix: u64,
) -> Result<Outcome, WireError> {
    match c {
        Command::AddProtectionDomain { name } => {
            validate_name("protection domain", name)?;
            if s.pd_by_name(name).is_some() {
                return err(
                    ErrorCode::AlreadyExists,
                    format!("A protection domain named {name} already exists"),
                );
            }
            let id = PdId(new_id(s));
            s.pds.insert(
                id,
                ProtectionDomain {
                    id,
                    name: name.clone(),
                },
            );
            done("Successfully created protection domain.", Some(id.0))
        }
        Command::AddFaultSet { pd, name } => {
            validate_name("fault set", name)?;
            let pd = pd_id(s, pd)?;
            if s.fault_set_by_name(pd, name).is_some() {
                return err(
                    ErrorCode::AlreadyExists,
                    format!("A fault set named {name} already exists in this protection domain"),
                );
            }
            let id = FaultSetId(new_id(s));
            s.fault_sets.insert(
                id,
                FaultSet {
                    id,
                    name: name.clone(),
                    pd,
                },
            );
            done("Successfully created fault set.", Some(id.0))
        }
        Command::AddStoragePool {
            pd,
            name,
            media_type,
            pg_count,
        } => {
            validate_name("storage pool", name)?;
            let pd = pd_id(s, pd)?;
            if s.pool_by_name(name).is_some() {
                return err(
                    ErrorCode::AlreadyExists,
                    format!("A storage pool named {name} already exists"),
                );
            }
            let media = match media_type.to_ascii_uppercase().as_str() {
                "" | "HDD" => "HDD",
                "SSD" => "SSD",
                "TRANSITIONAL" => "Transitional",
                other => {
                    return err(
                        ErrorCode::BadRequest,
                        format!("Invalid media type {other}: use HDD, SSD or Transitional"),
                    )
                }
            };
            let pg_count = pg_count.unwrap_or(DEFAULT_PG_COUNT);
            if pg_count == 0 || pg_count > PG_COUNT_MAX {
                return err(
                    ErrorCode::BadRequest,
                    format!("PG count must be 1-{PG_COUNT_MAX}"),
                );
            }
            let id = PoolId(new_id(s));
            s.pools.insert(
                id,
                StoragePool {
                    id,
                    name: name.clone(),
                    pd,
                    media_type: media.to_string(),
                    pg_count,
                    epoch: Epoch(1),
                    pgs: vec![PgMapping::default(); pg_count as usize],
                    rebuild_policy: Default::default(),
                },
            );
            replace_placement(s, id);
            done("Successfully created storage pool.", Some(id.0))
        }
        Command::AddSds {
            name,
            addr,
            pd,
            fault_set,
            devices,
        } => add_sds(s, name, addr, pd, fault_set.as_deref(), devices),
        Command::RemoveSds { name } => remove_sds(s, name),
        Command::SetRebuildPolicy {
            pool,
            concurrency,
            bandwidth_mib_s,
            adaptive,
        } => set_rebuild_policy(s, pool, *concurrency, *bandwidth_mib_s, *adaptive),
        Command::AddSdsDevice { sds, device } => {
            let Some(sd) = s.sds_by_name(sds).cloned() else {
                return not_found("SDS", sds);
            };
            let dev = new_device(s, sd.pd, device)?;
            if sd.devices.iter().any(|d| d.path == dev.path) {
                return err(
                    ErrorCode::AlreadyExists,
                    format!("SDS {sds} already has device {}", dev.path),
                );
            }
            let (pool, id) = (dev.pool, dev.id);
            if let Some(x) = s.sds.get_mut(&sd.id) {
                x.devices.push(dev);
            }
            replace_placement(s, pool);
            done("Successfully added a device to SDS.", Some(id.0))
        }
        Command::RemoveSdsDevice { sds, path } => remove_sds_device(s, sds, path),
        Command::ClearSdsDeviceError { sds, path } => clear_device_error(s, sds, path),
        Command::AddVolume {
            pool,
            name,
            size_bytes,
            thin,
            labels,
            preempt,
        } => {
            validate_name("volume", name)?;
            validate_labels(labels)?;
            let pool = pool_id(s, pool)?;
            if s.volume_by_name(name).is_some() {
                return err(
                    ErrorCode::AlreadyExists,
                    format!("A volume named {name} already exists"),
                );
            }
            let size = round_size(*size_bytes)?;
            if !thin {
                // The leader checked each SDS and the thin data before proposing.
                crate::capacity::pool_fits(s, pool, None, size)?;
            }
            let id = VolumeId(new_id(s));
            let vtree = VtreeId(new_id(s));
            s.volumes.insert(
                id,
                Volume {
                    id,
                    name: name.clone(),
                    pool,
                    size_bytes: size,
                    thin: *thin,
                    vtree,
                    created_unix: proposed_unix,
                    labels: labels.clone(),
                    preempt: *preempt,
                    layer: LayerId(0),
                    snapshot: None,
                },
            );
            done(
                format!("Successfully created volume of size {} GB.", gib(size)),
                Some(id.0),
            )
        }
        Command::RemoveVolume { name, mode } => vtree::remove_volume(s, name, *mode),
        Command::SnapshotVolumes {
            volumes,
            names,
            labels,
        } => {
            validate_labels(labels)?;
            vtree::snapshot(s, volumes, names, labels, proposed_unix)
        }
        Command::RemoveConsistencyGroupSnapshots { group } => vtree::remove_group(s, *group),
        Command::AddSnapshotPolicy {
            name,
            cadence_secs,
            retain,
        } => policy::add(s, name, *cadence_secs, retain),
        Command::RemoveSnapshotPolicy { name } => policy::remove(s, name),
        Command::AddSourceVolumeToSnapshotPolicy { policy, volume } => {
            policy::add_source(s, policy, volume)
        }
        Command::RemoveSourceVolumeFromSnapshotPolicy { policy, volume } => {
            policy::remove_source(s, policy, volume)
        }
        Command::PauseSnapshotPolicy { name, paused } => policy::pause(s, name, *paused),
        Command::OverwriteVolumeContent {
            volume,
            source,
            force,
        } => vtree::overwrite(s, volume, source, *force),
        Command::ModifyVolumeCapacity { name, size_bytes } => {
            let id = volume_id(s, name)?;
            let size = round_size(*size_bytes)?;
            let Some(v) = s.volumes.get(&id).cloned() else {
                return not_found("volume", name);
            };
            if size <= v.size_bytes {
                return err(ErrorCode::BadRequest, format!(
                    "The new size ({} GB) must be larger than the current size ({} GB): volumes only grow",
                    gib(size), gib(v.size_bytes)));
            }
            if !v.thin {
                crate::capacity::pool_fits(s, v.pool, Some(id), size)?;
            }
            if let Some(v) = s.volumes.get_mut(&id) {
                v.size_bytes = size;
            }
            done(
                format!("Successfully modified volume size to {} GB.", gib(size)),
                Some(id.0),
            )
        }
        Command::RenameVolume { name, new_name } => {
            let id = volume_id(s, name)?;
            validate_name("volume", new_name)?;
            if s.volume_by_name(new_name).is_some() {
                return err(
                    ErrorCode::AlreadyExists,
                    format!("A volume named {new_name} already exists"),
                );
            }
            if let Some(v) = s.volumes.get_mut(&id) {
                v.name = new_name.clone();
            }
            done("Successfully renamed volume.", Some(id.0))
        }
        Command::MapVolumeToSdc {
            volume,
            sdc,
            allow_multi_map,
            takeover: _,
        } => {
            // A takeover reaches the log as `Op::TakeOverVolume` (the leader decides whom it
            // may evict); here the flag changes nothing.
            let vid = volume_id(s, volume)?;
            let sid = sdc_id(s, sdc)?;
            if s.mappings.iter().any(|m| m.volume == vid && m.sdc == sid) {
                return err(
                    ErrorCode::AlreadyExists,
                    "The volume is already mapped to this SDC",
                );
            }
            if !allow_multi_map && s.mappings_of(vid).next().is_some() {
                return err(ErrorCode::Conflict, "The volume is already mapped to another SDC; add --allow_multi_map to map it to more than one");
            }
            let generation = new_generation(s);
            s.mappings.push(Mapping {
                volume: vid,
                sdc: sid,
                generation,
                iops_limit: 0,
                bandwidth_limit_kbps: 0,
            });
            done("Successfully mapped volume to SDC.", Some(vid.0))
        }
        Command::UnmapVolumeFromSdc { volume, sdc } => {
            let vid = volume_id(s, volume)?;
            let before = s.mappings.len();
            match sdc {
                Some(sel) => {
                    let sid = sdc_id(s, sel)?;
                    s.mappings.retain(|m| !(m.volume == vid && m.sdc == sid));
                }
                None => s.mappings.retain(|m| m.volume != vid),
            }
            if s.mappings.len() == before {
                return err(ErrorCode::NotFound, "The volume is not mapped to this SDC");
            }
            done("Successfully unmapped volume from SDC.", Some(vid.0))
        }
        Command::SetSdcVolumeLimits {
            volume,
            sdc,
            iops_limit,
            bandwidth_limit_kbps,
        } => {
            let vid = volume_id(s, volume)?;
            let sid = sdc_id(s, sdc)?;
            if iops_limit.is_none() && bandwidth_limit_kbps.is_none() {
                return err(
                    ErrorCode::BadRequest,
                    "Give --limit_iops and/or --limit_bandwidth_kbps",
                );
            }
            if let Some(i) = iops_limit {
                if *i != 0 && *i < 11 {
                    return err(
                        ErrorCode::BadRequest,
                        "The IOPS limit must be 0 (unlimited) or at least 11",
                    );
                }
            }
            if let Some(b) = bandwidth_limit_kbps {
                if *b != 0 && *b < 1024 {
                    return err(
                        ErrorCode::BadRequest,
                        "The bandwidth limit must be 0 (unlimited) or at least 1024 KB/s",
                    );
                }
            }
            let Some(m) = s
                .mappings
                .iter_mut()
                .find(|m| m.volume == vid && m.sdc == sid)
            else {
                return err(ErrorCode::NotFound, "The volume is not mapped to this SDC");
            };
            if let Some(i) = iops_limit {
                m.iops_limit = *i;
            }
            if let Some(b) = bandwidth_limit_kbps {
                m.bandwidth_limit_kbps = *b;
            }
            done("Successfully set the SDC's volume limits.", Some(vid.0))
        }
        Command::RemoveProtectionDomain { name } => admin::remove_pd(s, name),
        Command::RemoveStoragePool { name } => admin::remove_pool(s, name),
        Command::RemoveFaultSet { pd, name } => admin::remove_fault_set(s, pd, name),
        Command::RemoveSdc { sdc } => admin::remove_sdc(s, sdc),
        Command::RemoveUser { name } => admin::remove_user(s, name),
        Command::RenameSds { name, new_name } => admin::rename_sds(s, name, new_name),
        Command::RenameSdc { sdc, new_name } => admin::rename_sdc(s, sdc, new_name),
        Command::AbortRemoveSds { name } => admin::abort_remove_sds(s, name),
        Command::AddUser { .. }
        | Command::AddStandbyMdm { .. }
        | Command::RemoveStandbyMdm { .. }
        | Command::SwitchClusterMode { .. } => {
            err(ErrorCode::Internal, "this command is not applied directly")
        }
    }
}

fn round_size(size: u64) -> Result<u64, WireError> {
    if size == 0 || size > VOLUME_SIZE_MAX {
        return err(
            ErrorCode::BadRequest,
            format!(
                "Volume size must be more than 0 and at most {} GB",
                VOLUME_SIZE_MAX >> 30
            ),
        );
    }
    Ok(size.div_ceil(CHUNK_SIZE) * CHUNK_SIZE)
}
