//! The state machine: applies committed Raft entries ([`Op`]) to the [`ClusterState`].
//!
//! `apply` is deterministic (no clock, no RNG, no I/O): every input it needs (time, salts, new
//! cluster secret) was fixed by the proposing leader and is inside the entry. It validates each
//! command against the state it is applied to, so a command that lost a race is refused here
//! and changes nothing. Placement is recomputed here too, and every change to a pool's PG map
//! bumps the pool's epoch.

use crate::placement::{self, Candidate};
use proto::model::*;
use proto::msg::{Command, DeviceReport, NewDevice, SdcSelector};
use proto::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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

/// Apply one committed op at log `index`.
pub fn apply(s: &mut ClusterState, op: &Op, index: u64) -> Result<Outcome, WireError> {
    let before = s.clone();
    let r = apply_inner(s, op);
    match &r {
        Ok(_) => s.version = index,
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
        Op::SdcRegister { guid, name, ip } => {
            if let Some(sdc) = s.sdcs.values_mut().find(|c| &c.guid == guid) {
                sdc.name = name.clone();
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
                },
            );
            done("SDC registered", Some(id.0))
        }
        Op::Command {
            command,
            proposed_unix,
        } => apply_command(s, command, *proposed_unix),
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
                },
            );
            done(
                format!("Successfully created volume of size {} GB.", gib(size)),
                Some(id.0),
            )
        }
        Command::RemoveVolume { name } => {
            let id = volume_id(s, name)?;
            if s.mappings_of(id).next().is_some() {
                return err(
                    ErrorCode::Conflict,
                    format!("Volume {name} is mapped to an SDC; unmap it first"),
                );
            }
            s.volumes.remove(&id);
            done("Successfully removed volume.", Some(id.0))
        }
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
        Command::AddUser { .. }
        | Command::AddStandbyMdm { .. }
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

fn new_device(s: &mut ClusterState, pd: PdId, d: &NewDevice) -> Result<Device, WireError> {
    if d.path.is_empty() || d.path.len() > 1024 {
        return err(ErrorCode::BadRequest, "Invalid device path");
    }
    let pool = pool_id(s, &d.pool)?;
    if s.pools.get(&pool).map(|p| p.pd) != Some(pd) {
        return err(
            ErrorCode::BadRequest,
            format!(
                "Storage pool {} is not in the SDS's protection domain",
                d.pool
            ),
        );
    }
    let (capacity_bytes, state) = match d.capacity_bytes {
        Some(c) if c > 0 => (c, DeviceState::Normal),
        _ => (0, DeviceState::Initializing),
    };
    Ok(Device {
        id: DeviceId(new_id(s)),
        path: d.path.clone(),
        pool,
        capacity_bytes,
        state,
        error: String::new(),
        cleared_error: String::new(),
    })
}

fn add_sds(
    s: &mut ClusterState,
    name: &str,
    addr: &str,
    pd: &str,
    fault_set: Option<&str>,
    devices: &[NewDevice],
) -> Result<Outcome, WireError> {
    validate_name("SDS", name)?;
    if s.sds_by_name(name).is_some() {
        return err(
            ErrorCode::AlreadyExists,
            format!("An SDS named {name} already exists"),
        );
    }
    if addr.parse::<std::net::SocketAddr>().is_err() {
        return err(
            ErrorCode::BadRequest,
            format!("Invalid SDS address {addr}: use IP:PORT"),
        );
    }
    if s.sds.values().any(|x| x.addr == addr) {
        return err(
            ErrorCode::AlreadyExists,
            format!("An SDS with address {addr} already exists"),
        );
    }
    let pd = pd_id(s, pd)?;
    let fault_set = match fault_set {
        Some(f) => match s.fault_set_by_name(pd, f) {
            Some(fs) => Some(fs.id),
            None => return not_found("fault set", f),
        },
        None => None,
    };
    if devices.is_empty() {
        return err(
            ErrorCode::BadRequest,
            "An SDS needs at least one device (--device_path)",
        );
    }
    let mut devs: Vec<Device> = Vec::new();
    for d in devices {
        let dev = new_device(s, pd, d)?;
        if devs.iter().any(|x| x.path == dev.path) {
            return err(
                ErrorCode::BadRequest,
                format!("Device {} is given twice", dev.path),
            );
        }
        devs.push(dev);
    }
    let pools: Vec<PoolId> = devs.iter().map(|d| d.pool).collect();
    let id = SdsId(new_id(s));
    s.sds.insert(
        id,
        Sds {
            id,
            name: name.to_string(),
            addr: addr.to_string(),
            pd,
            fault_set,
            devices: devs,
            state: SdsState::Initializing,
            removing: false,
            boot: String::new(),
        },
    );
    for p in pools {
        replace_placement(s, p);
    }
    done("Successfully created SDS.", Some(id.0))
}

/// Most chunk copies in flight per SDS a policy may ask for.
pub const REBUILD_CONCURRENCY_MAX: u32 = 64;

fn set_rebuild_policy(
    s: &mut ClusterState,
    pool: &str,
    concurrency: Option<u32>,
    bandwidth_mib_s: Option<u32>,
    adaptive: Option<bool>,
) -> Result<Outcome, WireError> {
    let id = pool_id(s, pool)?;
    if let Some(c) = concurrency {
        if c == 0 || c > REBUILD_CONCURRENCY_MAX {
            return err(
                ErrorCode::BadRequest,
                format!("The concurrency must be 1-{REBUILD_CONCURRENCY_MAX} chunk copies"),
            );
        }
    }
    if concurrency.is_none() && bandwidth_mib_s.is_none() && adaptive.is_none() {
        return err(
            ErrorCode::BadRequest,
            "Give --concurrency, --bandwidth_mib_s and/or --adaptive",
        );
    }
    let Some(p) = s.pools.get_mut(&id) else {
        return not_found("storage pool", pool);
    };
    let r = &mut p.rebuild_policy;
    r.concurrency = concurrency.unwrap_or(r.concurrency);
    r.bandwidth_mib_s = bandwidth_mib_s.unwrap_or(r.bandwidth_mib_s);
    r.adaptive = adaptive.unwrap_or(r.adaptive);
    done(
        "Successfully set the rebuild/rebalance policy of the storage pool.",
        Some(id.0),
    )
}

/// PG copies `sds` holds in `pool` (primary, secondary or leaving).
pub fn copies_on(p: &StoragePool, sds: SdsId) -> usize {
    p.pgs
        .iter()
        .filter(|m| m.primary == Some(sds) || m.secondary == Some(sds) || m.leaving == Some(sds))
        .count()
}

/// Remove an SDS. One that holds no copy of a pool with volumes goes at once; otherwise it is
/// marked removing and rebalance moves its copies off (the leader removes it when it is empty,
/// with this same command). Refused when the SDS that would remain cannot hold two copies in
/// two fault domains; the leader also checks free capacity before proposing.
/// Mark a device removing (its SDS drains it; the record goes when the SDS reports it empty),
/// or drop the record at once when the device failed or never reported (it holds nothing
/// readable). The capacity check against the data stored is the leader's, before proposing.
fn clear_device_error(s: &mut ClusterState, sds: &str, path: &str) -> Result<Outcome, WireError> {
    let Some(id) = s.sds_by_name(sds).map(|x| x.id) else {
        return not_found("SDS", sds);
    };
    let Some(d) = s
        .sds
        .get_mut(&id)
        .and_then(|x| x.devices.iter_mut().find(|d| d.path == path))
    else {
        return err(
            ErrorCode::NotFound,
            format!("SDS {sds} has no device {path}"),
        );
    };
    if d.state != DeviceState::Failed {
        return err(
            ErrorCode::Conflict,
            format!(
                "Device {path} of SDS {sds} is {:?}, not Failed: there is no error to clear. Nothing was changed",
                d.state
            ),
        );
    }
    // Its SDS formats it anew when it sees this; it reports capacity again as a new device.
    d.state = DeviceState::Initializing;
    d.capacity_bytes = 0;
    d.cleared_error = std::mem::take(&mut d.error);
    let id = d.id.0;
    done(
        format!("Cleared the error of device {path} of SDS {sds}: the SDS formats it and it returns as new capacity (its old data is not kept)"),
        Some(id),
    )
}

fn remove_sds_device(s: &mut ClusterState, sds: &str, path: &str) -> Result<Outcome, WireError> {
    let Some(sd) = s.sds_by_name(sds).cloned() else {
        return not_found("SDS", sds);
    };
    let Some(dev) = sd.devices.iter().find(|d| d.path == path).cloned() else {
        let known: Vec<&str> = sd.devices.iter().map(|d| d.path.as_str()).collect();
        return err(
            ErrorCode::NotFound,
            format!(
                "SDS {sds} has no device {path}; its devices: {}",
                known.join(", ")
            ),
        );
    };
    if dev.state == DeviceState::Removing {
        return done(
            format!("Device {path} of SDS {sds} is already being removed"),
            Some(dev.id.0),
        );
    }
    let others_usable = sd
        .devices
        .iter()
        .any(|d| d.id != dev.id && d.pool == dev.pool && matches!(d.state, DeviceState::Normal));
    let holds_copies = s
        .pools
        .get(&dev.pool)
        .is_some_and(|p| copies_on(p, sd.id) > 0)
        && s.volumes.values().any(|v| v.pool == dev.pool);
    if matches!(dev.state, DeviceState::Failed | DeviceState::Initializing) || !holds_copies {
        if let Some(x) = s.sds.get_mut(&sd.id) {
            x.devices.retain(|d| d.id != dev.id);
        }
        replace_placement(s, dev.pool);
        return done(
            format!("Removed device {path} from SDS {sds}"),
            Some(dev.id.0),
        );
    }
    if !others_usable {
        return err(
            ErrorCode::Conflict,
            format!(
                "Device {path} is the last working device SDS {sds} has in its storage pool; remove the SDS instead (scli --remove_sds --sds_name {sds}) or add a device first. Nothing was changed"
            ),
        );
    }
    if let Some(d) = s
        .sds
        .get_mut(&sd.id)
        .and_then(|x| x.devices.iter_mut().find(|d| d.id == dev.id))
    {
        d.state = DeviceState::Removing;
    }
    replace_placement(s, dev.pool);
    done(
        format!("Device {path} of SDS {sds} is being removed: its chunks are moved to the SDS's other devices first, then it is removed (watch scli --query_sds)"),
        Some(dev.id.0),
    )
}

fn remove_sds(s: &mut ClusterState, name: &str) -> Result<Outcome, WireError> {
    let Some(sd) = s.sds_by_name(name).cloned() else {
        return not_found("SDS", name);
    };
    let pools: Vec<PoolId> = s.pools.keys().copied().collect();
    let mut held = 0;
    for p in &pools {
        let has_volumes = s.volumes.values().any(|v| v.pool == *p);
        if has_volumes {
            held += copies_on(&s.pools[p], sd.id);
        }
    }
    if held > 0 {
        for p in &pools {
            if copies_on(&s.pools[p], sd.id) == 0 {
                continue;
            }
            let pool = &s.pools[p];
            let cands: Vec<Candidate> = s
                .sds
                .values()
                .filter(|x| x.pd == pool.pd && x.id != sd.id && !x.removing)
                .map(|x| Candidate {
                    id: x.id,
                    fault_set: x.fault_set,
                    capacity: x.capacity_in(*p),
                })
                .collect();
            if placement::assign(1, &cands)[0].primary.is_none() {
                return err(ErrorCode::NoSpace, format!(
                    "Cannot remove SDS {name}: the other SDS of storage pool {} cannot hold two copies of its data in two fault domains; add SDS first. Nothing was changed",
                    pool.name));
            }
        }
        if sd.removing {
            return done(
                format!("SDS {name} is already being removed: {held} PG copies left to move off"),
                Some(sd.id.0),
            );
        }
        if let Some(x) = s.sds.get_mut(&sd.id) {
            x.removing = true;
        }
        return done(
            format!("SDS {name} is being removed: its {held} PG copies are moved off first, then it is removed (watch scli --query_sds)"),
            Some(sd.id.0),
        );
    }
    s.sds.remove(&sd.id);
    for p in pools {
        replace_placement(s, p);
    }
    done("Successfully removed SDS.", Some(sd.id.0))
}

/// Start moving PG `pg`'s copy on `from` to `to` (see [`Op::MovePg`]).
fn move_pg(
    s: &mut ClusterState,
    pool: PoolId,
    pg: PgId,
    from: SdsId,
    to: SdsId,
) -> Result<Outcome, WireError> {
    let Some(target) = s.sds.get(&to) else {
        return err(ErrorCode::NotFound, "Could not find the target SDS");
    };
    if target.state != SdsState::Normal || target.removing || target.capacity_in(pool) == 0 {
        return err(
            ErrorCode::Conflict,
            format!("SDS {} cannot take copies now", target.name),
        );
    }
    let use_fault_sets = s.sds.values().any(|x| x.fault_set.is_some());
    let domain = |id: SdsId| {
        let fs = s.sds.get(&id).and_then(|x| x.fault_set);
        match (use_fault_sets, fs) {
            (true, Some(f)) => (0u8, f.0),
            _ => (1u8, id.0),
        }
    };
    let Some(p) = s.pools.get(&pool) else {
        return err(ErrorCode::NotFound, "Could not find the storage pool");
    };
    let Some(m) = p.pg(pg).copied() else {
        return err(ErrorCode::NotFound, format!("Pool has no PG {pg}"));
    };
    let (Some(primary), Some(secondary)) = (m.primary, m.secondary) else {
        return err(ErrorCode::Conflict, format!("PG {pg} is not Normal"));
    };
    if m.rebuild.is_some() || m.leaving.is_some() {
        return err(ErrorCode::Conflict, format!("PG {pg} is not Normal"));
    }
    let stays = if from == secondary {
        primary
    } else if from == primary {
        secondary
    } else {
        return err(
            ErrorCode::Conflict,
            format!("SDS {from} holds no copy of PG {pg}"),
        );
    };
    if to == stays || to == from || domain(to) == domain(stays) {
        return err(
            ErrorCode::Conflict,
            format!("SDS {to} shares a fault domain with the other copy of PG {pg}"),
        );
    }
    let Some(p) = s.pools.get_mut(&pool) else {
        return err(ErrorCode::NotFound, "Could not find the storage pool");
    };
    let epoch = p.epoch.next();
    p.epoch = epoch;
    p.pgs[pg.0 as usize] = PgMapping {
        primary: Some(stays),
        secondary: Some(to),
        rebuild: Some(epoch),
        leaving: Some(from),
        dropped: None,
        rebuild_since: None,
    };
    done(format!("PG {pg} moving from SDS {from} to SDS {to}"), None)
}

fn sds_report(
    s: &mut ClusterState,
    id: SdsId,
    reports: &[DeviceReport],
    backward: bool,
    boot: &str,
) -> Result<Outcome, WireError> {
    let Some(sd) = s.sds.get_mut(&id) else {
        return err(ErrorCode::NotFound, "Could not find the SDS");
    };
    if !boot.is_empty() {
        sd.boot = boot.to_owned();
    }
    let mut pools = Vec::new();
    // Pools in which a device of this SDS failed now: its copies there are gone.
    let mut failed_in = Vec::new();
    let returned = sd.state != SdsState::Normal;
    sd.state = SdsState::Normal;
    let pd = sd.pd;
    for r in reports {
        if let Some(d) = sd.devices.iter_mut().find(|d| d.path == r.path) {
            if d.state == DeviceState::Initializing
                && r.failed
                && !d.cleared_error.is_empty()
                && r.error == d.cleared_error
            {
                // Sent before the SDS saw the clear: it formats the device next.
                continue;
            }
            if !r.failed {
                d.cleared_error.clear();
            }
            let state = if r.failed {
                DeviceState::Failed
            } else if d.state == DeviceState::Removing {
                DeviceState::Removing
            } else {
                DeviceState::Normal
            };
            if state == DeviceState::Failed && d.state != DeviceState::Failed {
                failed_in.push(d.pool);
            }
            if r.failed && d.error != r.error {
                d.error = r.error.clone();
            }
            if d.capacity_bytes != r.capacity_bytes || d.state != state {
                d.capacity_bytes = r.capacity_bytes;
                d.state = state;
                pools.push(d.pool);
            }
        }
    }
    // A removing device its SDS has emptied (it drains it, so nothing new lands there).
    let emptied: Vec<(String, PoolId)> = sd
        .devices
        .iter()
        .filter(|d| {
            d.state == DeviceState::Removing
                && reports
                    .iter()
                    .any(|r| r.path == d.path && r.draining && r.chunks == 0)
        })
        .map(|d| (d.path.clone(), d.pool))
        .collect();
    for (path, pool) in &emptied {
        sd.devices.retain(|d| &d.path != path);
        pools.push(*pool);
    }
    let mut device_note = String::new();
    for pool in &failed_in {
        // Chunks of nearly every PG this SDS holds in the pool were on the device: none of
        // its copies there can be trusted whole. They are rebuilt like a lost SDS's.
        if let Some(p) = s.pools.get_mut(pool) {
            let before = p.epoch;
            let (over, unavailable) = lose_copies(p, id, false);
            let dropped = p.epoch != before;
            device_note = format!(
                "; a device failed: copies in pool {} dropped ({over} PGs failed over, \
                 {unavailable} left on it alone)",
                p.name
            );
            if dropped {
                pools.push(*pool);
            }
        }
    }
    if returned {
        // Its return may make unavailable PGs available and give degraded ones a new copy.
        pools.extend(s.pools.values().filter(|p| p.pd == pd).map(|p| p.id));
        pools.sort();
        pools.dedup();
        for p in &pools {
            take_back(s, *p, id, backward);
        }
    }
    for p in pools {
        replace_placement(s, p);
        heal(s, p, false);
    }
    if emptied.is_empty() {
        done(format!("SDS report recorded{device_note}"), Some(id.0))
    } else {
        let paths: Vec<&str> = emptied.iter().map(|(p, _)| p.as_str()).collect();
        done(
            format!(
                "SDS report recorded; emptied device(s) removed: {}",
                paths.join(", ")
            ),
            Some(id.0),
        )
    }
}

/// A dropped secondary `id` returns: with `backward`, every PG it was dropped from whose
/// primary stayed takes it back as a rebuild target that needs only the chunks changed since
/// the drop (replacing an unfinished forward-rebuild target); without, the drop marks naming it
/// are forgotten (it is new capacity).
fn take_back(s: &mut ClusterState, pool: PoolId, id: SdsId, backward: bool) {
    let Some(p) = s.pools.get_mut(&pool) else {
        return;
    };
    let next = p.epoch.next();
    let mut changed = false;
    for m in p.pgs.iter_mut() {
        let Some((sds, since)) = m.dropped else {
            continue;
        };
        if sds != id {
            continue;
        }
        let forward_target = m.secondary.is_none() || (m.rebuild.is_some() && m.leaving.is_none());
        if !backward || !forward_target || m.primary == Some(id) || m.primary.is_none() {
            m.dropped = None;
            continue;
        }
        m.secondary = Some(id);
        m.rebuild = Some(next);
        m.rebuild_since = Some(since);
        changed = true;
    }
    if changed {
        p.epoch = next;
    }
}

/// Declare an SDS down. In every PG it held: a lost secondary (or rebuild target) is dropped;
/// a lost primary is replaced by its in-sync secondary; a PG whose only in-sync copy was on it
/// keeps naming it as primary and is unavailable until it returns. Then degraded PGs get a new
/// secondary to rebuild onto. Every pool whose map changed gets a new epoch.
fn sds_down(s: &mut ClusterState, id: SdsId) -> Result<Outcome, WireError> {
    let Some(sd) = s.sds.get_mut(&id) else {
        return err(ErrorCode::NotFound, "Could not find the SDS");
    };
    if sd.state == SdsState::Down {
        return done("SDS already down", Some(id.0));
    }
    sd.state = SdsState::Down;
    let name = sd.name.clone();
    let pools: Vec<PoolId> = s.pools.keys().copied().collect();
    let mut failed_over = 0u32;
    let mut lost = 0u32;
    for pool in pools {
        let Some(p) = s.pools.get_mut(&pool) else {
            continue;
        };
        let before = p.epoch;
        let (over, gone) = lose_copies(p, id, true);
        failed_over += over;
        lost += gone;
        let changed = p.epoch != before;
        heal(s, pool, changed);
    }
    done(
        format!("SDS {name} declared down: {failed_over} PGs failed over, {lost} PGs unavailable"),
        Some(id.0),
    )
}

/// Take SDS `id`'s copies out of every PG of pool `p`: a lost secondary (or rebuild target) is
/// dropped; a lost primary is replaced by its in-sync secondary; a PG whose only in-sync copy
/// was on it keeps naming it as primary (unavailable until it returns). With `may_return`
/// (the SDS is down, its devices intact) dropped copies are marked for a backward rebuild.
/// Bumps the pool's epoch when anything changed. Returns (PGs failed over, PGs unavailable).
fn lose_copies(p: &mut StoragePool, id: SdsId, may_return: bool) -> (u32, u32) {
    let mut failed_over = 0u32;
    let mut lost = 0u32;
    let mut changed = false;
    let next = p.epoch.next();
    for m in p.pgs.iter_mut() {
        if m.secondary == Some(id)
            && m.rebuild.is_none()
            && m.leaving.is_none()
            && m.primary.is_some_and(|x| x != id)
        {
            // An in-sync secondary lost while the primary stays: it may come back soon.
            m.dropped = may_return.then_some((id, next));
        }
        if m.leaving == Some(id) {
            // A copy being moved off: the move goes on without it.
            m.leaving = None;
            changed = true;
        }
        if m.secondary == Some(id) {
            // A move's target falls back to the in-sync copy it was to replace.
            m.secondary = m.leaving.take();
            m.rebuild = None;
            m.rebuild_since = None;
            changed = true;
        }
        if m.primary == Some(id) {
            // The chunks changed since an earlier drop were tracked by this primary only.
            m.dropped = None;
            m.rebuild_since = None;
            if m.secondary.is_some() && m.rebuild.is_none() {
                m.primary = m.secondary.take();
                // The promoted copy tracks what is written from now on: the lost primary
                // may come back for a backward rebuild too.
                m.dropped = may_return.then_some((id, next));
                failed_over += 1;
            } else if let Some(l) = m.leaving.take() {
                // Mid-move: the leaving copy is in sync; the target is dropped (heal
                // picks a new one for the new primary to fill).
                m.primary = Some(l);
                m.secondary = None;
                m.rebuild = None;
                failed_over += 1;
            } else {
                // No in-sync copy elsewhere: the PG waits for this SDS.
                m.secondary = None;
                m.rebuild = None;
                lost += 1;
            }
            changed = true;
        }
    }
    if changed {
        p.epoch = next;
    }
    (failed_over, lost)
}

/// Give every degraded PG of `pool` (live primary, no secondary) a new secondary to rebuild
/// onto, chosen by [`placement::pick_secondary`]. Bumps the epoch when it assigns any (and
/// does not bump it again when the caller already did: `bumped`).
fn heal(s: &mut ClusterState, pool: PoolId, bumped: bool) {
    let Some(p) = s.pools.get(&pool) else { return };
    let cands: Vec<Candidate> = s
        .sds
        .values()
        .filter(|x| x.pd == p.pd && x.state == SdsState::Normal && !x.removing)
        .map(|x| Candidate {
            id: x.id,
            fault_set: x.fault_set,
            capacity: x.capacity_in(pool),
        })
        .collect();
    let live = |id: SdsId| cands.iter().any(|c| c.id == id);
    let mut load: std::collections::BTreeMap<SdsId, u32> = Default::default();
    for m in &p.pgs {
        for x in [m.primary, m.secondary].into_iter().flatten() {
            *load.entry(x).or_default() += 1;
        }
    }
    let mut next = p.pgs.clone();
    let rebuild_epoch = if bumped { p.epoch } else { p.epoch.next() };
    let mut assigned = false;
    for m in next.iter_mut() {
        let (Some(primary), None) = (m.primary, m.secondary) else {
            continue;
        };
        if !live(primary) {
            continue;
        }
        if let Some(t) = placement::pick_secondary(primary, &cands, &load) {
            m.secondary = Some(t);
            m.rebuild = Some(rebuild_epoch);
            *load.entry(t).or_default() += 1;
            assigned = true;
        }
    }
    if assigned {
        if let Some(p) = s.pools.get_mut(&pool) {
            p.pgs = next;
            p.epoch = rebuild_epoch;
        }
    }
}

/// The primary reports a finished copy: the secondary becomes a full copy, if the assignment
/// is still the one the copy was made for.
fn pg_rebuilt(
    s: &mut ClusterState,
    pool: PoolId,
    pg: PgId,
    target: SdsId,
    rebuild: Epoch,
) -> Result<Outcome, WireError> {
    let Some(p) = s.pools.get_mut(&pool) else {
        return err(ErrorCode::NotFound, "Could not find the storage pool");
    };
    let Some(m) = p.pgs.get_mut(pg.0 as usize) else {
        return err(ErrorCode::NotFound, format!("Pool has no PG {pg}"));
    };
    if m.secondary != Some(target) || m.rebuild != Some(rebuild) {
        return err(
            ErrorCode::Conflict,
            format!("PG {pg} is no longer rebuilding onto SDS {target} for epoch {rebuild}"),
        );
    }
    // No copy changes role, so the epoch stays: in-flight I/O is not refused for this. A
    // finished move drops its leaving copy, which is a role change.
    m.rebuild = None;
    m.rebuild_since = None;
    m.dropped = None;
    if let Some(old) = m.leaving.take() {
        p.epoch = p.epoch.next();
        return done(
            format!("PG {pg} moved from SDS {old} to SDS {target}"),
            None,
        );
    }
    done(format!("PG {pg} rebuilt onto SDS {target}"), None)
}

/// Recompute a pool's placement. A pool without volumes holds no data, so its whole map may
/// change; once volumes exist, only PGs with no copy at all (which hold no data) are filled in:
/// moving PGs that hold data is rebalance, which copies first.
pub fn replace_placement(s: &mut ClusterState, pool: PoolId) {
    let Some(p) = s.pools.get(&pool) else { return };
    let cands: Vec<Candidate> = s
        .sds
        .values()
        .filter(|x| x.pd == p.pd && x.state != SdsState::Down && !x.removing)
        .map(|x| Candidate {
            id: x.id,
            fault_set: x.fault_set,
            capacity: x.capacity_in(pool),
        })
        .collect();
    let fresh = placement::assign(p.pg_count, &cands);
    let has_volumes = s.volumes.values().any(|v| v.pool == pool);
    let Some(p) = s.pools.get_mut(&pool) else {
        return;
    };
    let next: Vec<PgMapping> = if has_volumes {
        p.pgs
            .iter()
            .zip(&fresh)
            .map(|(old, new)| {
                if old.primary.is_none() && old.secondary.is_none() {
                    *new
                } else {
                    *old
                }
            })
            .collect()
    } else {
        fresh
    };
    if next != p.pgs {
        p.pgs = next;
        p.epoch = p.epoch.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The leader's clock in test proposals.
    const TEST_NOW_UNIX: u64 = 1_800_000_000;

    fn cmd(s: &mut ClusterState, c: Command) -> Result<Outcome, WireError> {
        let v = s.version + 1;
        let op = Op::Command {
            command: c,
            proposed_unix: TEST_NOW_UNIX,
        };
        apply(s, &op, v)
    }

    /// Add volume `name` to pool sp1 (no labels, not preemptible).
    fn volume(name: &str, size_bytes: u64, thin: bool) -> Command {
        Command::AddVolume {
            pool: "sp1".into(),
            name: name.into(),
            size_bytes,
            thin,
            labels: Default::default(),
            preempt: false,
        }
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let admin = User {
            name: "admin".into(),
            role: Role::Administrator,
            salt: "s".into(),
            password_sha256: "h".into(),
        };
        let mdm = MdmMember {
            id: MdmId(1),
            name: "mdm1".into(),
            addr: "127.0.0.1:1".into(),
            role: MdmRole::Manager,
        };
        apply(
            &mut s,
            &Op::Bootstrap {
                cluster_id: 0xabcd_0000_0000_0000,
                cluster_name: "c".into(),
                secret: "x".into(),
                admin,
                mdm,
            },
            1,
        )
        .expect("bootstrap");
        cmd(&mut s, Command::AddProtectionDomain { name: "pd1".into() }).expect("pd");
        cmd(
            &mut s,
            Command::AddStoragePool {
                pd: "pd1".into(),
                name: "sp1".into(),
                media_type: "".into(),
                pg_count: Some(64),
            },
        )
        .expect("pool");
        for i in 1..=3 {
            cmd(
                &mut s,
                Command::AddSds {
                    name: format!("sds{i}"),
                    addr: format!("127.0.0.1:{}", 7000 + i),
                    pd: "pd1".into(),
                    fault_set: None,
                    devices: vec![NewDevice {
                        path: "/d".into(),
                        pool: "sp1".into(),
                        capacity_bytes: Some(100 << 30),
                    }],
                },
            )
            .expect("sds");
        }
        s
    }

    #[test]
    fn placement_follows_sds_and_bumps_epoch() {
        let s = cluster();
        let p = s.pool_by_name("sp1").expect("pool");
        assert!(p
            .pgs
            .iter()
            .all(|m| m.primary.is_some() && m.secondary.is_some()));
        assert!(p.epoch.0 > 1);
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = cluster();
        let before = s.clone();
        for c in [
            Command::AddProtectionDomain { name: "pd1".into() },
            Command::AddProtectionDomain {
                name: "bad name!".into(),
            },
            Command::AddStoragePool {
                pd: "nope".into(),
                name: "sp2".into(),
                media_type: "".into(),
                pg_count: None,
            },
            volume("big", 200 << 30, false),
            Command::RemoveVolume {
                name: "nope".into(),
            },
            Command::RemoveSds {
                name: "nope".into(),
            },
        ] {
            assert!(cmd(&mut s, c).is_err());
            assert_eq!(s, before);
        }
    }

    #[test]
    fn thick_volumes_reserve_capacity() {
        let mut s = cluster();
        // 300 GiB raw, 150 GiB usable.
        cmd(&mut s, volume("a", 100 << 30, false)).expect("fits");
        let e = cmd(&mut s, volume("b", 60 << 30, false));
        assert_eq!(e.expect_err("must not fit").code, ErrorCode::NoSpace);
        cmd(&mut s, volume("c", 60 << 30, true)).expect("thin fits");
    }

    #[test]
    fn takeover_fences_the_old_mapping() {
        let mut s = cluster();
        for (guid, name) in [("g-a", "a"), ("g-b", "b")] {
            let v = s.version + 1;
            apply(
                &mut s,
                &Op::SdcRegister {
                    guid: guid.into(),
                    name: name.into(),
                    ip: "127.0.0.1".into(),
                },
                v,
            )
            .expect("register");
        }
        let sdc = |s: &ClusterState, n: &str| {
            s.sdcs
                .values()
                .find(|c| c.name == n)
                .map(|c| c.id)
                .expect("sdc")
        };
        let (a, b) = (sdc(&s, "a"), sdc(&s, "b"));
        cmd(
            &mut s,
            Command::AddVolume {
                pool: "sp1".into(),
                name: "v".into(),
                size_bytes: 1 << 30,
                thin: true,
                labels: [("fstype".to_string(), "ext4".to_string())].into(),
                preempt: false,
            },
        )
        .expect("vol");
        cmd(
            &mut s,
            Command::MapVolumeToSdc {
                volume: "v".into(),
                sdc: SdcSelector::Name("a".into()),
                allow_multi_map: false,
                takeover: false,
            },
        )
        .expect("map");
        let vol = s.volume_by_name("v").cloned().expect("v");
        assert_eq!(vol.labels.get("fstype").map(String::as_str), Some("ext4"));
        assert_eq!(
            vol.created_unix, TEST_NOW_UNIX,
            "the proposing leader's time"
        );
        let old = s.mappings_of(vol.id).next().expect("m").generation;
        assert_ne!(old, 0);
        assert_eq!(s.check_fence(vol.vtree, old, "a"), FenceCheck::Allowed);
        // Only the SDC the volume is mapped to may use its generation.
        assert_eq!(s.check_fence(vol.vtree, old, "b"), FenceCheck::OtherHost);
        assert_eq!(s.check_fence(vol.vtree, 0, "a"), FenceCheck::Fenced);
        assert_eq!(
            s.check_fence(vol.vtree, s.next_id + 1, "a"),
            FenceCheck::NewerThanMap
        );
        // The leader may evict nobody: a live mapping refuses the takeover, changing nothing.
        let before = s.clone();
        let v = s.version + 1;
        let op = |evict: Vec<SdcId>| Op::TakeOverVolume {
            volume: vol.id,
            sdc: b,
            evict,
        };
        let e = apply(&mut s, &op(vec![]), v).expect_err("busy");
        assert_eq!(e.code, ErrorCode::Busy);
        assert_eq!(s, before);
        apply(&mut s, &op(vec![a]), v).expect("takeover");
        let maps: Vec<_> = s.mappings_of(vol.id).cloned().collect();
        assert_eq!(maps.len(), 1);
        assert_eq!(maps[0].sdc, b);
        assert!(maps[0].generation > old);
        assert_eq!(s.check_fence(vol.vtree, old, "a"), FenceCheck::Fenced);
        assert_eq!(
            s.check_fence(vol.vtree, maps[0].generation, "b"),
            FenceCheck::Allowed
        );
        assert_eq!(
            s.check_fence(vol.vtree, maps[0].generation, "a"),
            FenceCheck::OtherHost
        );
        // An unknown tree with fence 0 (hand-made maps) passes; with a fence it does not.
        assert_eq!(s.check_fence(VtreeId(12345), 0, "a"), FenceCheck::Allowed);
        assert_eq!(s.check_fence(VtreeId(12345), old, "a"), FenceCheck::Fenced);
    }

    #[test]
    fn sds_holding_data_is_marked_removing_not_removed() {
        let mut s = cluster();
        cmd(&mut s, volume("a", 1 << 30, true)).expect("vol");
        let pgs_before = s.pool_by_name("sp1").expect("pool").pgs.clone();
        cmd(
            &mut s,
            Command::RemoveSds {
                name: "sds1".into(),
            },
        )
        .expect("marked");
        assert!(s.sds_by_name("sds1").expect("still there").removing);
        assert_eq!(s.pool_by_name("sp1").expect("pool").pgs, pgs_before);
        // With only two SDS left, removing another cannot keep two copies: refused.
        let before = s.clone();
        let e = cmd(
            &mut s,
            Command::RemoveSds {
                name: "sds2".into(),
            },
        )
        .expect_err("refused");
        assert_eq!(e.code, ErrorCode::NoSpace);
        assert_eq!(s, before);
    }

    #[test]
    fn a_device_is_drained_before_its_record_goes() {
        let mut s = cluster();
        cmd(&mut s, volume("a", 1 << 30, true)).expect("vol");
        let remove = |s: &mut ClusterState, path: &str| {
            cmd(
                s,
                Command::RemoveSdsDevice {
                    sds: "sds1".into(),
                    path: path.into(),
                },
            )
        };
        // The last device of an SDS holding copies: refused, nothing changed.
        let before = s.clone();
        let e = remove(&mut s, "/d").expect_err("last device");
        assert_eq!(e.code, ErrorCode::Conflict);
        assert!(e.message.contains("--remove_sds"), "{}", e.message);
        assert_eq!(s, before);
        let e = remove(&mut s, "/nope").expect_err("unknown");
        assert_eq!(e.code, ErrorCode::NotFound);
        assert_eq!(s, before);

        cmd(
            &mut s,
            Command::AddSdsDevice {
                sds: "sds1".into(),
                device: NewDevice {
                    path: "/e".into(),
                    pool: "sp1".into(),
                    capacity_bytes: Some(100 << 30),
                },
            },
        )
        .expect("second device");
        let pool = s.pool_by_name("sp1").expect("pool").id;
        let cap = |s: &ClusterState| s.sds_by_name("sds1").expect("sds1").capacity_in(pool);
        assert_eq!(cap(&s), 200 << 30);
        remove(&mut s, "/d").expect("marked");
        let state = |s: &ClusterState, path: &str| {
            s.sds_by_name("sds1")
                .expect("sds1")
                .devices
                .iter()
                .find(|d| d.path == path)
                .map(|d| d.state)
        };
        assert_eq!(state(&s, "/d"), Some(DeviceState::Removing));
        assert_eq!(cap(&s), 100 << 30, "a removing device is no capacity");
        let report = |s: &mut ClusterState, chunks: u64, draining: bool| {
            let v = s.version + 1;
            let id = sds_id(s, "sds1");
            apply(
                s,
                &Op::SdsReport {
                    sds: id,
                    devices: vec![DeviceReport {
                        path: "/d".into(),
                        capacity_bytes: 100 << 30,
                        failed: false,
                        chunks,
                        draining,
                        error: String::new(),
                    }],
                    backward: false,
                    boot: String::new(),
                },
                v,
            )
            .expect("report")
        };
        // Still holding chunks, or not yet draining (an old report): the record stays.
        report(&mut s, 12, true);
        assert_eq!(state(&s, "/d"), Some(DeviceState::Removing));
        report(&mut s, 0, false);
        assert_eq!(state(&s, "/d"), Some(DeviceState::Removing));
        let out = report(&mut s, 0, true);
        assert!(out.message.contains("/d"), "{}", out.message);
        assert_eq!(state(&s, "/d"), None, "drained and empty: removed");
        assert_eq!(cap(&s), 100 << 30);
    }

    fn sds_id(s: &ClusterState, n: &str) -> SdsId {
        s.sds_by_name(n).expect("sds").id
    }

    #[test]
    fn a_move_keeps_two_in_sync_copies_through_failures() {
        let mut s = cluster();
        cmd(&mut s, volume("a", 1 << 30, true)).expect("vol");
        let pool = s.pool_by_name("sp1").expect("pool").id;
        let m0 = s.pools[&pool].pgs[0];
        let (p, sec) = (m0.primary.expect("p"), m0.secondary.expect("s"));
        let ids = [sds_id(&s, "sds1"), sds_id(&s, "sds2"), sds_id(&s, "sds3")];
        let other = *ids.iter().find(|x| **x != p && **x != sec).expect("third");
        for n in ["sds1", "sds2", "sds3"] {
            let id = sds_id(&s, n);
            let v = s.version + 1;
            apply(
                &mut s,
                &Op::SdsReport {
                    sds: id,
                    devices: vec![],
                    backward: false,
                    boot: String::new(),
                },
                v,
            )
            .expect("report");
        }
        // Move the primary's copy: the secondary leads, the old primary keeps getting writes.
        let v = s.version + 1;
        apply(
            &mut s,
            &Op::MovePg {
                pool,
                pg: PgId(0),
                from: p,
                to: other,
            },
            v,
        )
        .expect("move");
        let m = s.pools[&pool].pgs[0];
        assert_eq!(
            (m.primary, m.secondary, m.leaving),
            (Some(sec), Some(other), Some(p))
        );
        assert_eq!(m.state(&s), PgState::Rebalancing);
        // The target dies: back to the two in-sync copies.
        let snapshot = s.clone();
        let v = s.version + 1;
        apply(&mut s, &Op::SdsDown { sds: other }, v).expect("down");
        let m = s.pools[&pool].pgs[0];
        assert_eq!(
            (m.primary, m.secondary, m.leaving, m.rebuild),
            (Some(sec), Some(p), None, None)
        );
        // Or the new primary dies: the leaving copy (in sync) leads.
        let mut s = snapshot.clone();
        let v = s.version + 1;
        apply(&mut s, &Op::SdsDown { sds: sec }, v).expect("down");
        let m = s.pools[&pool].pgs[0];
        assert_eq!(m.primary, Some(p));
        assert!(m.leaving.is_none());
        // Or the copy finishes: the leaving copy is dropped with an epoch bump.
        let mut s = snapshot;
        let m = s.pools[&pool].pgs[0];
        let e = s.pools[&pool].epoch;
        let v = s.version + 1;
        apply(
            &mut s,
            &Op::PgRebuilt {
                pool,
                pg: PgId(0),
                target: other,
                rebuild: m.rebuild.expect("r"),
            },
            v,
        )
        .expect("done");
        let m = s.pools[&pool].pgs[0];
        assert_eq!(
            (m.primary, m.secondary, m.leaving, m.rebuild),
            (Some(sec), Some(other), None, None)
        );
        assert!(s.pools[&pool].epoch > e);
    }

    #[test]
    fn entries_of_older_versions_still_apply() {
        // A command entry without the proposer's time (older MDMs): volumes get time 0.
        let old = r#"{"Command":{"command":{"RemoveVolume":{"name":"v"}}}}"#;
        let op: Op = serde_json::from_str(old).expect("an old entry parses");
        assert!(matches!(
            op,
            Op::Command {
                proposed_unix: 0,
                ..
            }
        ));
        // And a new entry without a time serializes as the old ones did.
        let again = serde_json::to_string(&op).expect("json");
        assert_eq!(again, old);
    }
}
