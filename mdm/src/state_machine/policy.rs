//! Snapshot policies (see `proto::model::SnapshotPolicy`): their commands, a run (one
//! consistency group of the source volumes, committed as `Op::RunSnapshotPolicy` by the leader
//! when the cadence comes round), and the retention by level that prunes older runs.

use super::vtree;
use super::{done, err, not_found, validate_name, volume_id, Outcome};
use proto::model::*;
use proto::*;
use std::collections::{BTreeMap, BTreeSet};

/// Most retention levels (ScaleIO's limit).
pub const LEVELS_MAX: usize = 6;
/// Most snapshots a policy keeps per source volume, all levels together (ScaleIO's limit).
pub const RETAINED_MAX: u32 = 60;
/// The label every snapshot a policy takes carries (its value: the policy's name).
pub const LABEL_POLICY: &str = "snapshot-policy";

/// The runs to keep of `runs` (run numbers, any order) under `retain` (see the model's doc):
/// run `n` counts at level `k` when `n` is a multiple of `retain[0]·…·retain[k-1]`, and each
/// level keeps its newest `retain[k]` runs.
pub fn kept(runs: &[u64], retain: &[u32]) -> BTreeSet<u64> {
    let mut sorted: Vec<u64> = runs.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    let mut keep = BTreeSet::new();
    let mut period: u64 = 1;
    for n in retain {
        keep.extend(
            sorted
                .iter()
                .filter(|r| **r % period == 0)
                .take(*n as usize)
                .copied(),
        );
        period = period.saturating_mul(u64::from((*n).max(1)));
    }
    keep
}

fn policy_mut<'s>(
    s: &'s mut ClusterState,
    name: &str,
) -> Result<&'s mut SnapshotPolicy, WireError> {
    match s.snapshot_policies.get_mut(name) {
        Some(p) => Ok(p),
        None => not_found("snapshot policy", name),
    }
}

/// `AddSnapshotPolicy`.
pub(super) fn add(
    s: &mut ClusterState,
    name: &str,
    cadence_secs: u64,
    retain: &[u32],
) -> Result<Outcome, WireError> {
    validate_name("snapshot policy", name)?;
    if s.snapshot_policies.contains_key(name) {
        return err(
            ErrorCode::AlreadyExists,
            format!("A snapshot policy named {name} already exists"),
        );
    }
    if cadence_secs == 0 {
        return err(
            ErrorCode::BadRequest,
            "The snapshot cadence must be at least one second (ScaleIO's is given in minutes)",
        );
    }
    if retain.is_empty() || retain.len() > LEVELS_MAX || retain.contains(&0) {
        return err(
            ErrorCode::BadRequest,
            format!("Give 1 to {LEVELS_MAX} retention levels, each keeping at least one snapshot (e.g. 4,6,2)"),
        );
    }
    if retain.iter().sum::<u32>() > RETAINED_MAX {
        return err(
            ErrorCode::BadRequest,
            format!(
                "A policy keeps at most {RETAINED_MAX} snapshots per volume, all levels together"
            ),
        );
    }
    s.snapshot_policies.insert(
        name.to_string(),
        SnapshotPolicy {
            name: name.to_string(),
            cadence_secs,
            retain: retain.to_vec(),
            volumes: Vec::new(),
            paused: false,
            runs: 0,
            last_run_unix: 0,
        },
    );
    done(format!("Snapshot policy {name} created"), None)
}

/// `RemoveSnapshotPolicy`: refused while it has source volumes.
pub(super) fn remove(s: &mut ClusterState, name: &str) -> Result<Outcome, WireError> {
    let p = policy_mut(s, name)?;
    if !p.volumes.is_empty() {
        return err(
            ErrorCode::Conflict,
            format!("Snapshot policy {name} still has source volumes; remove them from it first"),
        );
    }
    s.snapshot_policies.remove(name);
    done(
        format!("Snapshot policy {name} removed; the snapshots it took stay"),
        None,
    )
}

/// `AddSourceVolumeToSnapshotPolicy`: a thin volume, in the protection domain of the policy's
/// other volumes (a run is one consistency group).
pub(super) fn add_source(
    s: &mut ClusterState,
    policy: &str,
    volume: &str,
) -> Result<Outcome, WireError> {
    let vid = volume_id(s, volume)?;
    let pd_of = |s: &ClusterState, v: VolumeId| {
        s.volumes
            .get(&v)
            .and_then(|v| s.pools.get(&v.pool))
            .map(|p| p.pd)
    };
    let pd = pd_of(s, vid);
    if s.volumes.get(&vid).is_some_and(|v| !v.thin) {
        return err(
            ErrorCode::BadRequest,
            format!("Volume {volume} is thick: snapshots of thick volumes are not supported"),
        );
    }
    let others: Vec<VolumeId> = policy_mut(s, policy)?.volumes.clone();
    if others.contains(&vid) {
        return err(
            ErrorCode::AlreadyExists,
            format!("Volume {volume} is already a source of snapshot policy {policy}"),
        );
    }
    if others.iter().any(|o| pd_of(s, *o) != pd) {
        return err(
            ErrorCode::BadRequest,
            format!("Snapshot policy {policy}'s volumes are in another protection domain: its runs are consistency groups, which stay in one domain"),
        );
    }
    policy_mut(s, policy)?.volumes.push(vid);
    done(
        format!("Volume {volume} added to snapshot policy {policy}"),
        Some(vid.0),
    )
}

/// `RemoveSourceVolumeFromSnapshotPolicy`: the snapshots already taken stay.
pub(super) fn remove_source(
    s: &mut ClusterState,
    policy: &str,
    volume: &str,
) -> Result<Outcome, WireError> {
    let vid = volume_id(s, volume)?;
    let p = policy_mut(s, policy)?;
    if !p.volumes.contains(&vid) {
        return err(
            ErrorCode::NotFound,
            format!("Volume {volume} is not a source of snapshot policy {policy}"),
        );
    }
    p.volumes.retain(|v| *v != vid);
    done(
        format!("Volume {volume} removed from snapshot policy {policy}"),
        Some(vid.0),
    )
}

/// `PauseSnapshotPolicy`.
pub(super) fn pause(s: &mut ClusterState, name: &str, paused: bool) -> Result<Outcome, WireError> {
    policy_mut(s, name)?.paused = paused;
    done(
        format!(
            "Snapshot policy {name} {}",
            if paused { "paused" } else { "resumed" }
        ),
        None,
    )
}

/// `Op::RunSnapshotPolicy`: run number `run` (the next one; anything else was already applied
/// or is stale and changes nothing), at the proposing leader's `unix`. Older runs outside the
/// retention go first (a mapped one stays until a later run finds it unmapped), then the
/// source volumes are snapshotted together.
pub(super) fn run(
    s: &mut ClusterState,
    name: &str,
    run: u64,
    unix: u64,
) -> Result<Outcome, WireError> {
    let p = policy_mut(s, name)?.clone();
    if p.paused || run != p.runs + 1 {
        return err(
            ErrorCode::Conflict,
            format!(
                "Snapshot policy {name}: run {run} is not due (runs so far {}, paused {})",
                p.runs, p.paused
            ),
        );
    }
    let mine: Vec<(VolumeId, u64)> = s
        .volumes
        .values()
        .filter_map(
            |v| match v.snapshot.as_ref().and_then(|x| x.policy.as_ref()) {
                Some((pn, r)) if pn == name => Some((v.id, *r)),
                _ => None,
            },
        )
        .collect();
    let mut runs: Vec<u64> = mine.iter().map(|(_, r)| *r).collect();
    runs.push(run);
    let keep = kept(&runs, &p.retain);
    let gone: BTreeSet<VolumeId> = mine
        .iter()
        .filter(|(id, r)| !keep.contains(r) && s.mappings_of(*id).next().is_none())
        .map(|(id, _)| *id)
        .collect();
    vtree::remove_all(s, &gone)?;
    let sources: Vec<VolumeId> = p
        .volumes
        .iter()
        .copied()
        .filter(|v| s.volumes.contains_key(v))
        .collect();
    let labels: BTreeMap<String, String> = [(LABEL_POLICY.to_string(), name.to_string())].into();
    let out = if sources.is_empty() {
        None
    } else {
        Some(vtree::take(
            s,
            &sources,
            &[],
            &labels,
            unix,
            Some((name.to_string(), run)),
        )?)
    };
    if let Some(p) = s.snapshot_policies.get_mut(name) {
        p.runs = run;
        p.last_run_unix = unix;
    }
    done(
        format!(
            "Snapshot policy {name} run {run}: {}; {} older snapshots pruned",
            out.map(|o| o.message)
                .unwrap_or_else(|| "no source volumes".into()),
            gone.len()
        ),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest_runs_of_each_level() {
        let all: Vec<u64> = (1..=8).collect();
        assert_eq!(kept(&all, &[3]), [6, 7, 8].into());
        // Level 1 counts every 2nd run: 8 and 6; level 0 the newest two.
        assert_eq!(kept(&all, &[2, 2]), [6, 7, 8].into());
        // Level 2 every 4th: 8 and 4.
        assert_eq!(kept(&all, &[2, 2, 2]), [4, 6, 7, 8].into());
        assert_eq!(kept(&[], &[4]), BTreeSet::new());
        assert_eq!(kept(&[5, 5, 3], &[1]), [5].into());
    }
}
