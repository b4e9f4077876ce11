//! Removing objects that are no longer used, renaming SDS and SDC, and aborting an SDS's
//! removal. Every removal is refused while something still uses the object, naming what does,
//! and a refusal changes nothing (`apply_at` restores the state on any error anyway).
//!
//! What the state alone cannot tell is checked by the leader before it proposes (see
//! `service::commands`): whether an SDC's session is alive, who sends a `RemoveUser`, and MDM
//! membership (a Raft configuration change, not a command applied here).

use super::*;

/// Names that use `what`, at most a few, for refusals: "sp1, sp2 and 3 more".
fn some_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let all: Vec<&str> = names.collect();
    const SHOWN: usize = 3;
    let mut out = all
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if all.len() > SHOWN {
        out.push_str(&format!(" and {} more", all.len() - SHOWN));
    }
    out
}

fn in_use<T>(msg: String) -> Result<T, WireError> {
    err(ErrorCode::Conflict, format!("{msg}. Nothing was changed"))
}

pub(super) fn remove_pd(s: &mut ClusterState, name: &str) -> Result<Outcome, WireError> {
    let id = pd_id(s, name)?;
    let pools: Vec<&str> = s
        .pools
        .values()
        .filter(|p| p.pd == id)
        .map(|p| p.name.as_str())
        .collect();
    if !pools.is_empty() {
        return in_use(format!(
            "Cannot remove protection domain {name}: it has storage pools ({}); remove them first",
            some_names(pools.into_iter())
        ));
    }
    let sds: Vec<&str> = s
        .sds
        .values()
        .filter(|x| x.pd == id)
        .map(|x| x.name.as_str())
        .collect();
    if !sds.is_empty() {
        return in_use(format!(
            "Cannot remove protection domain {name}: it has SDS ({}); remove them first",
            some_names(sds.into_iter())
        ));
    }
    let fault_sets: Vec<&str> = s
        .fault_sets
        .values()
        .filter(|f| f.pd == id)
        .map(|f| f.name.as_str())
        .collect();
    if !fault_sets.is_empty() {
        return in_use(format!(
            "Cannot remove protection domain {name}: it has fault sets ({}); remove them first",
            some_names(fault_sets.into_iter())
        ));
    }
    s.pds.remove(&id);
    done("Successfully removed protection domain.", Some(id.0))
}

pub(super) fn remove_pool(s: &mut ClusterState, name: &str) -> Result<Outcome, WireError> {
    let id = pool_id(s, name)?;
    let volumes: Vec<&str> = s
        .volumes
        .values()
        .filter(|v| v.pool == id)
        .map(|v| v.name.as_str())
        .collect();
    if !volumes.is_empty() {
        return in_use(format!(
            "Cannot remove storage pool {name}: it has {} volume(s) ({}); remove them first",
            volumes.len(),
            some_names(volumes.into_iter())
        ));
    }
    let devices: Vec<String> = s
        .sds
        .values()
        .flat_map(|x| {
            x.devices
                .iter()
                .filter(|d| d.pool == id)
                .map(move |d| format!("{}:{}", x.name, d.path))
        })
        .collect();
    if !devices.is_empty() {
        return in_use(format!(
            "Cannot remove storage pool {name}: SDS devices belong to it ({}); remove them \
             with --remove_sds_device first",
            some_names(devices.iter().map(String::as_str))
        ));
    }
    s.pools.remove(&id);
    done("Successfully removed storage pool.", Some(id.0))
}

pub(super) fn remove_fault_set(
    s: &mut ClusterState,
    pd: &str,
    name: &str,
) -> Result<Outcome, WireError> {
    let pd = pd_id(s, pd)?;
    let Some(id) = s.fault_set_by_name(pd, name).map(|f| f.id) else {
        return not_found("fault set", name);
    };
    let sds: Vec<&str> = s
        .sds
        .values()
        .filter(|x| x.fault_set == Some(id))
        .map(|x| x.name.as_str())
        .collect();
    if !sds.is_empty() {
        return in_use(format!(
            "Cannot remove fault set {name}: it has SDS ({}); remove them first",
            some_names(sds.into_iter())
        ));
    }
    s.fault_sets.remove(&id);
    done("Successfully removed fault set.", Some(id.0))
}

pub(super) fn remove_sdc(s: &mut ClusterState, sel: &SdcSelector) -> Result<Outcome, WireError> {
    let id = sdc_id(s, sel)?;
    let name = s.sdcs.get(&id).map(|c| c.name.clone()).unwrap_or_default();
    let mapped: Vec<&str> = s
        .mappings
        .iter()
        .filter(|m| m.sdc == id)
        .filter_map(|m| s.volumes.get(&m.volume).map(|v| v.name.as_str()))
        .collect();
    if !mapped.is_empty() {
        return in_use(format!(
            "Cannot remove SDC {name}: volumes are mapped to it ({}); unmap them first",
            some_names(mapped.into_iter())
        ));
    }
    s.sdcs.remove(&id);
    done(
        "Successfully removed SDC (it comes back as a new SDC if it registers again).",
        Some(id.0),
    )
}

pub(super) fn remove_user(s: &mut ClusterState, name: &str) -> Result<Outcome, WireError> {
    let Some(user) = s.users.get(name) else {
        return not_found("user", name);
    };
    let admins = s
        .users
        .values()
        .filter(|u| u.role == Role::Administrator)
        .count();
    if user.role == Role::Administrator && admins <= 1 {
        return in_use(format!(
            "Cannot remove user {name}: it is the last Administrator (add another first)"
        ));
    }
    s.users.remove(name);
    done(format!("Successfully removed user {name}."), None)
}

/// An SDS or SDC name nothing else is called or identified by.
fn free_name<'a>(
    taken: impl Iterator<Item = (&'a str, &'a str)>,
    what: &str,
    new_name: &str,
) -> Result<(), WireError> {
    validate_name(what, new_name)?;
    for (name, cert) in taken {
        if name == new_name || cert == new_name {
            return err(
                ErrorCode::AlreadyExists,
                format!(
                    "An {what} named {new_name} already exists (its name or its certificate's)"
                ),
            );
        }
    }
    Ok(())
}

/// Rename an SDS: its display name changes; the name its certificate carries, by which it
/// says hello and speaks to its peers, is kept in `cert_name`.
pub(super) fn rename_sds(
    s: &mut ClusterState,
    name: &str,
    new_name: &str,
) -> Result<Outcome, WireError> {
    let Some(sd) = s.sds_by_name(name).cloned() else {
        return not_found("SDS", name);
    };
    let others = s
        .sds
        .values()
        .filter(|x| x.id != sd.id)
        .map(|x| (x.name.as_str(), x.cert_name()));
    free_name(others, "SDS", new_name)?;
    let cert = sd.cert_name().to_string();
    if let Some(x) = s.sds.get_mut(&sd.id) {
        x.cert_name = (cert != new_name).then_some(cert);
        x.name = new_name.to_string();
    }
    done(
        format!(
            "Successfully renamed SDS {name} to {new_name} (it still identifies itself by its certificate, sds:{}).",
            sd.cert_name()
        ),
        Some(sd.id.0),
    )
}

/// Rename an SDC: its display name changes; the name its certificate carries, by which it
/// registers and renews its session, is kept in `cert_name`.
pub(super) fn rename_sdc(
    s: &mut ClusterState,
    sel: &SdcSelector,
    new_name: &str,
) -> Result<Outcome, WireError> {
    let id = sdc_id(s, sel)?;
    let others = s
        .sdcs
        .values()
        .filter(|c| c.id != id)
        .map(|c| (c.name.as_str(), c.cert_name()));
    free_name(others, "SDC", new_name)?;
    let Some(c) = s.sdcs.get_mut(&id) else {
        return err(ErrorCode::NotFound, "Could not find the SDC");
    };
    let old = std::mem::replace(&mut c.name, new_name.to_string());
    let cert = c.cert_name.take().unwrap_or(old.clone());
    c.cert_name = (cert != new_name).then_some(cert);
    done(
        format!("Successfully renamed SDC {old} to {new_name}."),
        Some(id.0),
    )
}

/// Stop removing an SDS: it is a candidate for copies again. Moves already under way finish
/// (their targets are being written already); rebalance then evens the pool out, which brings
/// copies back to it.
pub(super) fn abort_remove_sds(s: &mut ClusterState, name: &str) -> Result<Outcome, WireError> {
    let Some(sd) = s.sds_by_name(name).cloned() else {
        return not_found("SDS", name);
    };
    if !sd.removing {
        return err(
            ErrorCode::Conflict,
            format!("SDS {name} is not being removed. Nothing was changed"),
        );
    }
    if let Some(x) = s.sds.get_mut(&sd.id) {
        x.removing = false;
    }
    let pools: Vec<PoolId> = s.pools.keys().copied().collect();
    for p in pools {
        replace_placement(s, p);
    }
    done(
        format!("Removal of SDS {name} aborted: it keeps its copies and takes new ones; moves already under way finish, then rebalance evens the pools out."),
        Some(sd.id.0),
    )
}
