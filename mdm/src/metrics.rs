//! MDM metrics (Prometheus text format): Raft and request counters, and each pool's capacity
//! (`meshblock_mdm_pool_*{pool}`, set by the leader from the SDS's hellos; followers export none).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::capacity::pool_capacity;
use proto::model::ClusterState;
use proto::msg::SdsStats;
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
    pub pool_thin_used_bytes: Family<Labels, Gauge>,
    pub pool_thick_reserved_bytes: Family<Labels, Gauge>,
    pub pool_free_bytes: Family<Labels, Gauge>,
    pub pool_used_percent: Family<Labels, Gauge>,
    pub pool_capacity_state: Family<Labels, Gauge>,
    pub pool_thick_chunks_no_space: Family<Labels, Gauge>,
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
        Arc::new(m)
    }

    /// Set every pool's capacity gauges from the map and the SDS's last hellos (leader).
    /// (Pools are never removed, so no stale series remain.)
    pub fn set_pools(&self, s: &ClusterState, stats: &BTreeMap<String, SdsStats>) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
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

    /// Drop the pool gauges (a follower knows no SDS usage).
    pub fn clear_pools(&self) {
        for f in [
            &self.pool_raw_bytes,
            &self.pool_thin_used_bytes,
            &self.pool_thick_reserved_bytes,
            &self.pool_free_bytes,
            &self.pool_used_percent,
            &self.pool_capacity_state,
            &self.pool_thick_chunks_no_space,
        ] {
            f.clear();
        }
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
    proto::http::serve_metrics(addr, std::sync::Arc::new(move || metrics.render())).await
}
