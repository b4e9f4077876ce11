//! MDM metrics (Prometheus text format): Raft and request counters on every MDM; on the leader
//! only (followers export none, so a sum over MDMs counts each once), the cluster as operators
//! alert on it: MDMs in the cluster and active, SDS and SDC by state, volumes and snapshots, and
//! per pool its capacity, PGs by state and rebuild progress (`meshblock_mdm_pool_*{pool}`), from
//! the map and the SDS's hellos.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::capacity::{pool_capacity, pool_rebuild};
use proto::model::{ClusterState, SdsState};
use proto::msg::{ClusterStatus, SdsStats, SDC_SESSION_MS};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Label set with one `(name, value)` pair.
pub type Labels = Vec<(String, String)>;

#[derive(Default)]
pub struct MdmMetrics {
    registry: Registry,
    pub is_leader: Gauge,
    pub term: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub requests: Counter,
    pub request_errors: Counter,
    pub proposals: Counter,
    pub sds_declared_down: Counter,
    /// Snapshot policy runs this MDM committed as leader, and those refused.
    pub snapshot_policy_runs: Counter,
    pub snapshot_policy_failures: Counter,
    /// SDS leases granted (hellos answered after a quorum confirmed this leader).
    pub leases_granted: Counter,
    /// Hellos refused because no quorum confirmed this leader in time.
    pub leases_refused: Counter,
    /// Per pool (label `pool`), from [`proto::capacity::PoolCapacity`].
    pub pool_raw_bytes: Family<Labels, Gauge>,
    /// The pools the per-pool families were last set for.
    exported_pools: std::sync::Mutex<std::collections::BTreeSet<String>>,
    pub pool_thin_used_bytes: Family<Labels, Gauge>,
    pub pool_thick_reserved_bytes: Family<Labels, Gauge>,
    pub pool_free_bytes: Family<Labels, Gauge>,
    pub pool_used_percent: Family<Labels, Gauge>,
    pub pool_capacity_state: Family<Labels, Gauge>,
    pub pool_thick_chunks_no_space: Family<Labels, Gauge>,
    /// Per pool and `state` (Normal, Rebalancing, Rebuilding, Degraded, Unavailable).
    pub pool_pgs: Family<Labels, Gauge>,
    pub pool_rebuild_bytes_left: Family<Labels, Gauge>,
    pub pool_rebuild_bytes_per_second: Family<Labels, Gauge>,
    /// The cluster's MDMs (voters) and those the leader hears (itself included), labelled with
    /// the leader's name; absent on followers.
    pub mdms: Family<Labels, Gauge>,
    pub mdms_active: Family<Labels, Gauge>,
    /// 1 for the cluster's mode (label `mode`: 1_node, 3_node, 5_node).
    pub cluster_mode: Family<Labels, Gauge>,
    /// SDS by `state` (Initializing, Normal, Down, Removing).
    pub sds: Family<Labels, Gauge>,
    /// SDC by `state` (Connected, Disconnected).
    pub sdc: Family<Labels, Gauge>,
    /// Volumes by `kind` (volume, snapshot).
    pub volumes: Family<Labels, Gauge>,
}

impl MdmMetrics {
    pub fn new() -> Arc<MdmMetrics> {
        let mut m = MdmMetrics::default();
        let r = &mut m.registry;
        r.register(
            "meshblock_mdm_sds_declared_down",
            "SDS this MDM declared down after missing heartbeats",
            m.sds_declared_down.clone(),
        );
        r.register(
            "meshblock_mdm_snapshot_policy_runs",
            "Snapshot policy runs this MDM committed as leader",
            m.snapshot_policy_runs.clone(),
        );
        r.register(
            "meshblock_mdm_snapshot_policy_failures",
            "Snapshot policy runs this MDM proposed as leader that failed (the log says why)",
            m.snapshot_policy_failures.clone(),
        );
        r.register(
            "meshblock_mdm_sds_leases_granted",
            "SDS leases granted (a quorum of MDMs confirmed this leader since the hello arrived)",
            m.leases_granted.clone(),
        );
        r.register(
            "meshblock_mdm_sds_leases_refused",
            "SDS hellos refused because no quorum of MDMs confirmed this leader in time",
            m.leases_refused.clone(),
        );
        r.register(
            "meshblock_mdm_is_leader",
            "1 when this MDM leads the cluster",
            m.is_leader.clone(),
        );
        r.register(
            "meshblock_mdm_raft_term",
            "Current Raft term",
            m.term.clone(),
        );
        r.register(
            "meshblock_mdm_raft_commit_index",
            "Raft commit index",
            m.commit_index.clone(),
        );
        r.register(
            "meshblock_mdm_raft_applied_index",
            "Raft applied index",
            m.applied_index.clone(),
        );
        r.register(
            "meshblock_mdm_requests",
            "Control requests served",
            m.requests.clone(),
        );
        r.register(
            "meshblock_mdm_request_errors",
            "Control requests answered with an error",
            m.request_errors.clone(),
        );
        r.register(
            "meshblock_mdm_proposals",
            "Changes proposed to Raft",
            m.proposals.clone(),
        );
        let pools = [
            (
                "meshblock_mdm_pool_raw_bytes",
                "Raw capacity of the pool's usable devices (both copies)",
                &m.pool_raw_bytes,
            ),
            (
                "meshblock_mdm_pool_thin_used_bytes",
                "Raw bytes of thin data the pool's SDS store",
                &m.pool_thin_used_bytes,
            ),
            (
                "meshblock_mdm_pool_thick_reserved_bytes",
                "Raw bytes reserved by thick volumes (two copies each)",
                &m.pool_thick_reserved_bytes,
            ),
            (
                "meshblock_mdm_pool_free_bytes",
                "Raw bytes neither used by thin data nor reserved by thick volumes",
                &m.pool_free_bytes,
            ),
            (
                "meshblock_mdm_pool_used_percent",
                "Used share of the pool (thin data and thick reservations), percent",
                &m.pool_used_percent,
            ),
            (
                "meshblock_mdm_pool_capacity_state",
                "0 Normal, 1 Warning (80% used, pool or fullest SDS), 2 Critical (90%), 3 Full",
                &m.pool_capacity_state,
            ),
            (
                "meshblock_mdm_pool_thick_chunks_no_space",
                "Chunks of thick volumes an SDS could not allocate (devices full); should be 0",
                &m.pool_thick_chunks_no_space,
            ),
        ];
        for (name, help, family) in pools {
            r.register(name, help, family.clone());
        }
        let cluster = [
            (
                "meshblock_mdm_pool_pgs",
                "The pool's PGs by state (Normal, Rebalancing, Rebuilding, Degraded, Unavailable)",
                &m.pool_pgs,
            ),
            (
                "meshblock_mdm_pool_rebuild_bytes_left",
                "Bytes the pool's rebuild and rebalance sources still have to visit (at most)",
                &m.pool_rebuild_bytes_left,
            ),
            (
                "meshblock_mdm_pool_rebuild_bytes_per_second",
                "The pool's rebuild and rebalance copy rate over the SDS's last hello interval",
                &m.pool_rebuild_bytes_per_second,
            ),
            (
                "meshblock_mdm_cluster_mode",
                "1 for the cluster's mode (1_node, 3_node or 5_node)",
                &m.cluster_mode,
            ),
            (
                "meshblock_mdm_sds",
                "SDS by state (Initializing, Normal, Down, Removing)",
                &m.sds,
            ),
            (
                "meshblock_mdm_sdc",
                "SDC by state (Connected: heard within 5 s; Disconnected)",
                &m.sdc,
            ),
            (
                "meshblock_mdm_volumes",
                "Volumes by kind (volume, snapshot)",
                &m.volumes,
            ),
        ];
        for (name, help, family) in cluster {
            r.register(name, help, family.clone());
        }
        r.register(
            "meshblock_mdm_cluster_mdms",
            "MDMs voting in the cluster (exported by the leader only, label leader)",
            m.mdms.clone(),
        );
        r.register(
            "meshblock_mdm_cluster_mdms_active",
            "MDMs voting in the cluster that the leader hears, itself included",
            m.mdms_active.clone(),
        );
        Arc::new(m)
    }

    /// Set every pool's capacity gauges from the map and the SDS's last hellos (leader).
    /// (Pools are never removed, so no stale series remain.)
    pub fn set_pools(&self, s: &ClusterState, stats: &BTreeMap<String, SdsStats>) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.forget_removed_pools(s);
        for p in s.pools.values() {
            let c = pool_capacity(s, stats, p.id);
            let l: Labels = vec![("pool".into(), p.name.clone())];
            self.pool_raw_bytes.get_or_create(&l).set(g(c.raw_bytes));
            self.pool_thin_used_bytes
                .get_or_create(&l)
                .set(g(c.thin_used_bytes));
            self.pool_thick_reserved_bytes
                .get_or_create(&l)
                .set(g(c.thick_reserved_bytes));
            self.pool_free_bytes.get_or_create(&l).set(g(c.free_bytes));
            self.pool_used_percent
                .get_or_create(&l)
                .set(g(c.used_percent));
            self.pool_capacity_state
                .get_or_create(&l)
                .set(c.state.level());
            self.pool_thick_chunks_no_space
                .get_or_create(&l)
                .set(g(c.thick_chunks_no_space));
        }
    }

    /// Stop exporting the pools `s` no longer has (`--remove_storage_pool`).
    fn forget_removed_pools(&self, s: &ClusterState) {
        let now: std::collections::BTreeSet<String> =
            s.pools.values().map(|p| p.name.clone()).collect();
        let gone: Vec<String> = match self.exported_pools.lock() {
            Ok(mut before) => {
                let gone = before.difference(&now).cloned().collect();
                *before = now;
                gone
            }
            Err(_) => return,
        };
        for name in gone {
            let l: Labels = vec![("pool".into(), name.clone())];
            for f in self.per_pool() {
                f.remove(&l);
            }
            for state in [
                "Normal",
                "Rebalancing",
                "Rebuilding",
                "Degraded",
                "Unavailable",
            ] {
                self.pool_pgs.remove(&vec![
                    ("pool".into(), name.clone()),
                    ("state".into(), state.into()),
                ]);
            }
        }
    }

    /// Set the cluster's gauges from the map and the leader's status (leader).
    pub fn set_cluster(&self, s: &ClusterState, c: &ClusterStatus) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let one = |k: &str, v: &str| -> Labels { vec![(k.into(), v.into())] };
        for p in s.pools.values() {
            let h = s.pool_health(p);
            let pool = |state: &str| -> Labels {
                vec![
                    ("pool".into(), p.name.clone()),
                    ("state".into(), state.into()),
                ]
            };
            for (state, n) in [
                ("Normal", h.normal_pgs),
                ("Rebalancing", h.rebalancing_pgs),
                ("Rebuilding", h.rebuilding_pgs),
                ("Degraded", h.degraded_pgs),
                ("Unavailable", h.unavailable_pgs),
            ] {
                self.pool_pgs.get_or_create(&pool(state)).set(i64::from(n));
            }
            let r = pool_rebuild(s, &c.sds_stats, p.id);
            let l = one("pool", &p.name);
            self.pool_rebuild_bytes_left
                .get_or_create(&l)
                .set(g(r.bytes_left_at_most));
            self.pool_rebuild_bytes_per_second
                .get_or_create(&l)
                .set(g(r.bytes_per_sec));
        }
        let leader = one("leader", c.leader.as_ref().map_or("", |l| l.name.as_str()));
        self.mdms.clear();
        self.mdms_active.clear();
        self.mdms.get_or_create(&leader).set(g(c.total as u64));
        self.mdms_active
            .get_or_create(&leader)
            .set(g(c.active as u64));
        let mode = serde_json::to_value(s.mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        self.cluster_mode.clear();
        self.cluster_mode.get_or_create(&one("mode", &mode)).set(1);
        let mut sds: BTreeMap<&str, i64> = ["Initializing", "Normal", "Down", "Removing"]
            .into_iter()
            .map(|k| (k, 0))
            .collect();
        for x in s.sds.values() {
            let state = match x.state {
                _ if x.removing => "Removing",
                SdsState::Initializing => "Initializing",
                SdsState::Normal => "Normal",
                SdsState::Down => "Down",
            };
            *sds.entry(state).or_default() += 1;
        }
        for (state, n) in sds {
            self.sds.get_or_create(&one("state", state)).set(n);
        }
        let connected = s
            .sdcs
            .keys()
            .filter(|id| {
                c.sdc_last_seen_ms
                    .get(id)
                    .is_some_and(|ms| *ms <= SDC_SESSION_MS)
            })
            .count();
        self.sdc
            .get_or_create(&one("state", "Connected"))
            .set(g(connected as u64));
        self.sdc
            .get_or_create(&one("state", "Disconnected"))
            .set(g((s.sdcs.len() - connected) as u64));
        let snapshots = s.volumes.values().filter(|v| v.snapshot.is_some()).count();
        self.volumes
            .get_or_create(&one("kind", "snapshot"))
            .set(g(snapshots as u64));
        self.volumes
            .get_or_create(&one("kind", "volume"))
            .set(g((s.volumes.len() - snapshots) as u64));
    }

    /// Drop the leader's gauges (a follower knows no SDS usage).
    pub fn clear_pools(&self) {
        let cluster = [
            &self.mdms,
            &self.mdms_active,
            &self.pool_pgs,
            &self.cluster_mode,
            &self.sds,
            &self.sdc,
            &self.volumes,
        ];
        for f in self.per_pool().into_iter().chain(cluster) {
            f.clear();
        }
    }

    /// The gauge families labelled by `pool` alone.
    fn per_pool(&self) -> [&Family<Labels, Gauge>; 9] {
        [
            &self.pool_raw_bytes,
            &self.pool_thin_used_bytes,
            &self.pool_thick_reserved_bytes,
            &self.pool_free_bytes,
            &self.pool_used_percent,
            &self.pool_capacity_state,
            &self.pool_thick_chunks_no_space,
            &self.pool_rebuild_bytes_left,
            &self.pool_rebuild_bytes_per_second,
        ]
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }
}

/// Serve `GET /metrics` on `addr` until the process ends.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: std::sync::Arc<MdmMetrics>,
) -> std::io::Result<()> {
    web::serve_metrics(addr, std::sync::Arc::new(move || metrics.render())).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::model::StoragePool;

    #[test]
    fn a_removed_pool_is_no_longer_exported() {
        let m = MdmMetrics::new();
        let mut s = ClusterState::default();
        for (id, name) in [(1, "sp1"), (2, "sp2")] {
            s.pools.insert(
                proto::PoolId(id),
                StoragePool {
                    id: proto::PoolId(id),
                    name: name.into(),
                    pd: proto::PdId(9),
                    media_type: "HDD".into(),
                    pg_count: 0,
                    epoch: proto::Epoch(1),
                    pgs: Vec::new(),
                    rebuild_policy: Default::default(),
                },
            );
        }
        m.set_pools(&s, &BTreeMap::new());
        let text = m.render();
        assert!(
            text.contains("pool=\"sp1\"") && text.contains("pool=\"sp2\""),
            "{text}"
        );
        s.pools.remove(&proto::PoolId(1));
        m.set_pools(&s, &BTreeMap::new());
        let text = m.render();
        assert!(
            !text.contains("pool=\"sp1\"") && text.contains("pool=\"sp2\""),
            "{text}"
        );
    }
}
