//! The leader's rebalance driver (PG moves toward each SDS's share, SDS removal), and the
//! room checks of removals.

use super::*;

/// The PG moves the rebalance driver would start next in `pool` (at most `max`; copies already
/// moving count as moved): toward each SDS's share by capacity, and off SDS being removed.
/// Empty when the pool is balanced, or holds no volume (nothing to move).
pub(crate) fn planned_moves(
    state: &ClusterState,
    pool: &proto::model::StoragePool,
    max: usize,
) -> Vec<crate::placement::Move> {
    if !state.volumes.values().any(|v| v.pool == pool.id) {
        return Vec::new();
    }
    let cands: Vec<crate::placement::Candidate> = state
        .sds
        .values()
        .filter(|x| x.pd == pool.pd && x.state == SdsState::Normal && !x.removing)
        .map(|x| crate::placement::Candidate {
            id: x.id,
            fault_set: x.fault_set,
            capacity: x.capacity_in(pool.id),
        })
        .collect();
    let leaving: Vec<proto::SdsId> = state
        .sds
        .values()
        .filter(|x| x.removing)
        .map(|x| x.id)
        .collect();
    let mut pgs = pool.pgs.clone();
    for m in pgs.iter_mut() {
        m.leaving = None;
    }
    crate::placement::plan_moves(&pgs, &cands, &leaving, max)
}

impl Service {
    /// The leader's rebalance driver: moves PG copies (a bounded number per pool at a time,
    /// through Raft) until every SDS holds about its share by capacity, empties SDS being
    /// removed and then removes them, and logs each finished rebuild or rebalance with its
    /// duration. Runs for the life of the process; idle on followers. A pool with PGs that
    /// are degraded, rebuilding or unavailable is left alone until they are Normal.
    pub async fn rebalance(self: Arc<Self>) {
        let mut tick = leader_interval(REBALANCE_PERIOD);
        loop {
            self.leader_tick(&mut tick).await;
            let state = self.raft.shared.read_state();
            for pool in state.pools.values() {
                self.log_pool_progress(&state, pool);
                if let Err(e) = self.rebalance_pool(&state, pool).await {
                    tracing::warn!(pool = %pool.name, "rebalance step failed: {e}");
                }
            }
            for sds in state.sds.values().filter(|x| x.removing) {
                let held: usize = state
                    .pools
                    .values()
                    .map(|p| state_machine::copies_on(p, sds.id))
                    .sum();
                if held == 0 {
                    // Not if `--abort_remove_sds` came in meanwhile.
                    let _in_order = self.sds_removal.lock().await;
                    let still = self
                        .raft
                        .shared
                        .state
                        .read()
                        .is_ok_and(|s| s.sds.get(&sds.id).is_some_and(|x| x.removing));
                    if !still {
                        continue;
                    }
                    let command = Command::RemoveSds {
                        name: sds.name.clone(),
                    };
                    match self.propose_command(command, Vec::new()).await {
                        Ok(out) => {
                            tracing::info!(sds = %sds.name, "emptied by rebalance: {}", out.message)
                        }
                        Err(e) => {
                            tracing::warn!(sds = %sds.name, "could not remove the emptied SDS: {e}")
                        }
                    }
                }
            }
        }
    }

    fn log_pool_progress(&self, state: &ClusterState, pool: &proto::model::StoragePool) {
        let h = state.pool_health(pool);
        let Ok(mut since) = self.pool_since.lock() else {
            return;
        };
        if h.state == "Normal" || h.state == "NoCapacity" {
            if let Some((t, worst)) = since.remove(&pool.id) {
                let what = if worst == "Rebalancing" {
                    "rebalance"
                } else {
                    "rebuild"
                };
                tracing::info!(pool = %pool.name, seconds = t.elapsed().as_secs_f64(), was = %worst,
                    "{what} finished: every PG has two copies again after {:.1} s", t.elapsed().as_secs_f64());
            }
        } else {
            let e = since
                .entry(pool.id)
                .or_insert_with(|| (Instant::now(), h.state.clone()));
            if h.state != "Rebalancing" && e.1 == "Rebalancing" {
                e.1 = h.state.clone();
            }
        }
    }

    async fn rebalance_pool(
        &self,
        state: &ClusterState,
        pool: &proto::model::StoragePool,
    ) -> Result<(), WireError> {
        if !state.volumes.values().any(|v| v.pool == pool.id) {
            return Ok(());
        }
        let h = state.pool_health(pool);
        if h.state != "Normal" && h.state != "Rebalancing" {
            return Ok(());
        }
        let in_flight = h.rebalancing_pgs as usize;
        if in_flight >= REBALANCE_MOVES_MAX {
            return Ok(());
        }
        let moves = planned_moves(state, pool, REBALANCE_MOVES_MAX - in_flight);
        for mv in moves {
            let out = self
                .propose(Op::MovePg {
                    pool: pool.id,
                    pg: mv.pg,
                    from: mv.from,
                    to: mv.to,
                })
                .await?;
            tracing::info!(pool = %pool.name, "rebalance: {}", out.message);
        }
        Ok(())
    }

    /// Before marking an SDS removing: the other SDS must have room for what it stores (as
    /// the SDS report in their hellos). Nothing is changed when they do not.
    pub(super) fn check_removal_fits(&self, name: &str) -> Result<(), WireError> {
        let state = self.raft.shared.read_state();
        let Some(sd) = state.sds_by_name(name) else {
            return Ok(());
        };
        let (stored, capacity) = self.room_without(&state, sd.pd, |x, _| x.id == sd.id);
        let need = stored.get(&sd.id).copied().unwrap_or(0);
        let free = capacity.saturating_sub(stored.values().sum::<u64>() - need);
        if need > free {
            return fail(ErrorCode::NoSpace, format!(
                "Cannot remove SDS {name}: it stores {} MiB and the other SDS of its protection domain have only {} MiB free. Add capacity first (data moved or deleted moments ago still counts until each SDS's garbage collector frees it, two passes of gc_interval_ms, 20 s by default: retry then). Nothing was changed",
                need >> 20, free >> 20));
        }
        Ok(())
    }

    /// Before marking a device removing: the protection domain without it must still hold
    /// what its SDS store (rebalance moves PGs off an SDS left with too little room).
    pub(super) fn check_device_removal_fits(&self, sds: &str, path: &str) -> Result<(), WireError> {
        let state = self.raft.shared.read_state();
        let Some(sd) = state.sds_by_name(sds) else {
            return Ok(());
        };
        let (stored, capacity) =
            self.room_without(&state, sd.pd, |x, d| x.id == sd.id && d.path == path);
        let need: u64 = stored.values().sum();
        if need > capacity {
            return fail(ErrorCode::NoSpace, format!(
                "Cannot remove device {path} of SDS {sds}: the protection domain stores {} MiB and would have only {} MiB of capacity left. Add capacity first (data moved or deleted moments ago still counts until each SDS's garbage collector frees it, two passes of gc_interval_ms, 20 s by default: retry then). Nothing was changed",
                need >> 20, capacity >> 20));
        }
        Ok(())
    }

    /// What each working SDS of `pd` stores (as reported in their hellos), and the capacity of
    /// their usable devices except those `skip` names.
    fn room_without(
        &self,
        state: &ClusterState,
        pd: proto::PdId,
        skip: impl Fn(&proto::model::Sds, &proto::model::Device) -> bool,
    ) -> (HashMap<proto::SdsId, u64>, u64) {
        let stats = self.sds_stats(state);
        let mut stored = HashMap::new();
        let mut capacity = 0u64;
        for x in state
            .sds
            .values()
            .filter(|x| x.pd == pd && x.state == SdsState::Normal)
        {
            let held = stats
                .get(&x.name)
                .map(|s| s.chunks_stored.saturating_mul(proto::CHUNK_SIZE))
                .unwrap_or(0);
            stored.insert(x.id, held);
            if x.removing {
                continue;
            }
            capacity += x
                .devices
                .iter()
                .filter(|d| d.state == proto::model::DeviceState::Normal && !skip(x, d))
                .map(|d| d.capacity_bytes)
                .sum::<u64>();
        }
        (stored, capacity)
    }

    /// Where MDM `id` listens: the cluster map's address, else one noted in `peers`.
    pub(crate) fn peer_addr(&self, id: u64) -> Option<String> {
        if let Ok(s) = self.raft.shared.state.read() {
            if let Some(m) = s.mdms.get(&MdmId(id)) {
                return Some(m.addr.clone());
            }
        }
        self.peers.lock().ok().and_then(|p| p.get(&id).cloned())
    }
}
