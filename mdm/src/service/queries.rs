//! Queries: the map and the leader's view of the cluster, as scli reads them.

use super::*;

impl Service {
    pub(super) fn query(&self, q: &Query) -> Result<MdmResponse, WireError> {
        let state = self.raft.shared.read_state();
        let missing = |what: &str, name: &str| {
            WireError::new(
                ErrorCode::NotFound,
                format!("Could not find the {what} {name}"),
            )
        };
        match q {
            Query::ProtectionDomain { name } if state.pd_by_name(name).is_none() => {
                return Err(missing("protection domain", name))
            }
            Query::StoragePool { name } if state.pool_by_name(name).is_none() => {
                return Err(missing("storage pool", name))
            }
            Query::Sds { name } if state.sds_by_name(name).is_none() => {
                return Err(missing("SDS", name))
            }
            Query::Volume { name } | Query::Vtree { name }
                if proto::docker::volume_by_either_name(&state, name).is_none() =>
            {
                return Err(missing("volume", name))
            }
            Query::SnapshotPolicy { name: Some(name) }
                if !state.snapshot_policies.contains_key(name) =>
            {
                return Err(missing("snapshot policy", name))
            }
            Query::Sdc { sdc: Some(sel) } => {
                state_machine::sdc_id(&state, sel)?;
            }
            _ => {}
        }
        let mut view = state.redacted();
        if let Query::Events { since_unix } = q {
            view.events = state
                .events
                .iter()
                .filter(|e| since_unix.is_none_or(|t| e.unix >= t))
                .cloned()
                .collect();
        }
        let mut status = self.cluster_status(&state);
        if matches!(q, Query::Resilience) {
            status.resilience = Some(proto::resilience::analyze(&state, &status.sds_stats));
        }
        Ok(MdmResponse::View {
            status: Box::new(status),
            state: Box::new(view),
        })
    }

    /// The cluster's status as this MDM sees it (`--query_cluster`, metrics).
    pub fn cluster_status(&self, state: &ClusterState) -> ClusterStatus {
        let st = self.raft.shared.status();
        let describe = |id: u64| {
            let m = state.mdms.get(&MdmId(id));
            MdmStatus {
                id: MdmId(id),
                name: m.map(|m| m.name.clone()).unwrap_or_default(),
                addr: m.map(|m| m.addr.clone()).unwrap_or_default(),
                active: st.active.get(&id).copied().unwrap_or(false),
            }
        };
        let leader = (st.leader_id != 0).then(|| describe(st.leader_id));
        let followers: Vec<MdmStatus> = st
            .voters
            .iter()
            .filter(|v| **v != st.leader_id)
            .map(|v| describe(*v))
            .collect();
        let standbys: Vec<MdmStatus> = st.learners.iter().map(|v| describe(*v)).collect();
        let active = leader
            .iter()
            .chain(followers.iter())
            .filter(|m| m.active)
            .count();
        let total = st.voters.len();
        ClusterStatus {
            sdc_last_seen_ms: self
                .sdc_seen
                .lock()
                .map(|m| {
                    m.seen
                        .iter()
                        .map(|(id, t)| (*id, t.elapsed().as_millis() as u64))
                        .collect()
                })
                .unwrap_or_default(),
            sds_stats: self.sds_stats(state),
            sdc_throttled_ms: self
                .sdc_seen
                .lock()
                .map(|m| {
                    m.throttled
                        .iter()
                        .flat_map(|(sdc, v)| v.iter().map(move |(vol, ms)| (*sdc, *vol, *ms)))
                        .collect()
                })
                .unwrap_or_default(),
            mode: state.mode,
            state: if active == total {
                "Normal".into()
            } else {
                "Degraded".into()
            },
            active,
            total,
            leader,
            followers,
            standbys,
            term: st.term,
            commit_index: st.commit,
            rebalance_moves_planned: state
                .pools
                .values()
                .map(|p| {
                    let n = rebalance::planned_moves(state, p, usize::MAX).len() as u64;
                    (p.name.clone(), n)
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
            resilience: None,
        }
    }
}
