//! MDM metrics (Prometheus text format).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

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
    /// SDS leases granted (hellos answered after a quorum confirmed this leader).
    pub leases_granted: Counter,
    /// Hellos refused because no quorum confirmed this leader in time.
    pub leases_refused: Counter,
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
        Arc::new(m)
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
