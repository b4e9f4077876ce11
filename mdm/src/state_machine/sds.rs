//! SDS, their devices and the PG copies they hold: adding and removing SDS and devices, SDS
//! reports, failures and returns, rebuild and move progress, placement. Applied by
//! [`super::apply`]; deterministic like the rest of the state machine.

use super::*;

pub(super) fn new_device(
    s: &mut ClusterState,
    pd: PdId,
    d: &NewDevice,
) -> Result<Device, WireError> {
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

pub(super) fn add_sds(
    s: &mut ClusterState,
    name: &str,
    addr: &str,
    pd: &str,
    fault_set: Option<&str>,
    devices: &[NewDevice],
) -> Result<Outcome, WireError> {
    validate_name("SDS", name)?;
    if s.sds_by_name(name).is_some() || s.sds_by_cert_name(name).is_some() {
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
            cert_name: None,
        },
    );
    for p in pools {
        replace_placement(s, p);
    }
    done("Successfully created SDS.", Some(id.0))
}

/// Most chunk copies in flight per SDS a policy may ask for.
pub const REBUILD_CONCURRENCY_MAX: u32 = 64;

pub(super) fn set_rebuild_policy(
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
pub(super) fn clear_device_error(
    s: &mut ClusterState,
    sds: &str,
    path: &str,
) -> Result<Outcome, WireError> {
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

pub(super) fn remove_sds_device(
    s: &mut ClusterState,
    sds: &str,
    path: &str,
) -> Result<Outcome, WireError> {
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

pub(super) fn remove_sds(s: &mut ClusterState, name: &str) -> Result<Outcome, WireError> {
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
pub(super) fn move_pg(
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

pub(super) fn sds_report(
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
pub(super) fn sds_down(s: &mut ClusterState, id: SdsId) -> Result<Outcome, WireError> {
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
pub(super) fn pg_rebuilt(
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
