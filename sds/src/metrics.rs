//! SDS metrics (Prometheus text) and the HTTP endpoint serving them.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Default)]
pub struct SdsMetrics {
    registry: Registry,
    pub reads: Counter,
    pub writes: Counter,
    pub errors: Counter,
    pub checksum_errors: Counter,
    pub device_errors: Counter,
    pub chunks_used: Gauge,
    pub device_failed: Gauge,
}

impl SdsMetrics {
    pub fn new() -> Arc<SdsMetrics> {
        let mut m = SdsMetrics::default();
        let r = &mut m.registry;
        r.register("meshblock_sds_reads", "Chunk reads served", m.reads.clone());
        r.register(
            "meshblock_sds_writes",
            "Chunk writes applied (primary and replica)",
            m.writes.clone(),
        );
        r.register(
            "meshblock_sds_request_errors",
            "Data requests answered with an error",
            m.errors.clone(),
        );
        r.register(
            "meshblock_sds_checksum_errors",
            "Blocks whose CRC32 did not match",
            m.checksum_errors.clone(),
        );
        r.register(
            "meshblock_sds_device_errors",
            "Device I/O errors",
            m.device_errors.clone(),
        );
        r.register(
            "meshblock_sds_chunks_used",
            "Chunks allocated on this SDS",
            m.chunks_used.clone(),
        );
        r.register(
            "meshblock_sds_device_failed",
            "1 when a device has failed",
            m.device_failed.clone(),
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
    metrics: std::sync::Arc<SdsMetrics>,
) -> std::io::Result<()> {
    proto::http::serve_metrics(addr, std::sync::Arc::new(move || metrics.render())).await
}
