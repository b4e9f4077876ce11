//! The events an applied op makes (`ClusterState::events`), derived from the state before and
//! after it, so every MDM records the same ones at the same log index, with the proposing
//! leader's clock. What is recorded here: SDS down and back up, devices failing, a pool losing
//! full protection (a rebuild starts) and getting it back (with how long that took), PGs left
//! without a reachable copy, volume takeovers and snapshot policy runs. Logins, leader changes
//! and users' commands are recorded by the leader with `Op::RecordEvent`.

use super::Op;
use proto::model::{ClusterState, DeviceState, Event, SdsState, Severity, StoragePool};

/// Record the events `op` made, going from `before` to `after`.
pub(super) fn derive(
    before: &ClusterState,
    after: &mut ClusterState,
    op: &Op,
    seq: u64,
    unix: u64,
) {
    let mut out: Vec<(Severity, &str, String, String)> = Vec::new();
    let sds_name = |s: &ClusterState, id| {
        s.sds
            .get(&id)
            .map_or_else(|| id.to_string(), |x| x.name.clone())
    };
    match op {
        Op::SdsDown { sds } => out.push((
            Severity::Warning,
            "sds_down",
            "cluster".into(),
            format!(
                "SDS {} is down: its PGs failed over to their other copy",
                sds_name(after, *sds)
            ),
        )),
        Op::TakeOverVolume { volume, sdc, evict } if !evict.is_empty() => {
            let sdc_name = |id| {
                after
                    .sdcs
                    .get(&id)
                    .map_or_else(|| id.to_string(), |c| c.name.clone())
            };
            let from: Vec<String> = evict.iter().map(|e| sdc_name(*e)).collect();
            let volume = after
                .volumes
                .get(volume)
                .map_or_else(|| volume.to_string(), |v| v.name.clone());
            out.push((
                Severity::Warning,
                "takeover",
                sdc_name(*sdc),
                format!(
                    "Volume {volume} taken over by SDC {} from {} (fenced)",
                    sdc_name(*sdc),
                    from.join(", ")
                ),
            ));
        }
        Op::RunSnapshotPolicy { name, run, .. } => out.push((
            Severity::Info,
            "snapshot_policy",
            "cluster".into(),
            format!("Snapshot policy {name} took its run {run}"),
        )),
        _ => {}
    }
    // SDS coming back, devices failing.
    for (id, x) in &after.sds {
        let was = before.sds.get(id);
        if x.state == SdsState::Normal {
            match was.map(|w| w.state) {
                Some(SdsState::Down) => out.push((
                    Severity::Info,
                    "sds_up",
                    "cluster".into(),
                    format!("SDS {} is up again", x.name),
                )),
                Some(SdsState::Initializing) => out.push((
                    Severity::Info,
                    "sds_up",
                    "cluster".into(),
                    format!("SDS {} joined with {} devices", x.name, x.devices.len()),
                )),
                _ => {}
            }
        }
        for d in x.devices.iter().filter(|d| d.state == DeviceState::Failed) {
            let failed_before = was.is_some_and(|w| {
                w.devices
                    .iter()
                    .any(|b| b.path == d.path && b.state == DeviceState::Failed)
            });
            if !failed_before {
                out.push((
                    Severity::Error,
                    "device_failed",
                    "cluster".into(),
                    format!(
                        "Device {} of SDS {} failed: its copies are rebuilt elsewhere",
                        d.path, x.name
                    ),
                ));
            }
        }
    }
    // Pools losing and regaining full protection.
    for (id, p) in &after.pools {
        let (was_left, was_gone) = before.pools.get(id).map_or((0, 0), |b| exposure(before, b));
        let (left, gone) = exposure(after, p);
        if gone > 0 && was_gone == 0 {
            out.push((
                Severity::Error,
                "pg_unavailable",
                "cluster".into(),
                format!(
                    "Pool {}: {gone} PGs have no reachable copy; I/O to them fails",
                    p.name
                ),
            ));
        }
        if left > 0 && was_left == 0 {
            out.push((
                Severity::Warning,
                "rebuild_started",
                "cluster".into(),
                format!(
                    "Pool {}: {left} PGs without two complete copies; rebuild started",
                    p.name
                ),
            ));
        }
        if left == 0 && was_left > 0 {
            let prefix = format!("Pool {}:", p.name);
            let took = after
                .events
                .iter()
                .rev()
                .find(|e| e.kind == "rebuild_started" && e.message.starts_with(&prefix))
                .filter(|e| e.unix > 0 && unix >= e.unix)
                .map_or_else(String::new, |e| format!(" in {} s", unix - e.unix));
            out.push((
                Severity::Info,
                "rebuild_finished",
                "cluster".into(),
                format!(
                    "Pool {}: rebuild finished{took}; every PG has two copies",
                    p.name
                ),
            ));
        }
    }
    for (severity, kind, actor, message) in out {
        after.push_event(Event {
            seq,
            unix,
            severity,
            kind: kind.into(),
            actor,
            message,
        });
    }
}

/// A pool's PGs without two complete copies (degraded, rebuilding or unavailable), and those
/// with no reachable copy.
fn exposure(s: &ClusterState, p: &StoragePool) -> (u32, u32) {
    let h = s.pool_health(p);
    if h.state == "NoCapacity" {
        return (0, 0); // a pool without SDS yet: nothing was lost
    }
    (
        h.degraded_pgs + h.rebuilding_pgs + h.unavailable_pgs,
        h.unavailable_pgs,
    )
}
