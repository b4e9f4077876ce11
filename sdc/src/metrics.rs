//! The SDC's Prometheus metrics (`meshblock_sdc_*`), served at `GET /metrics` on
//! `metrics_listen`: Docker plugin requests by endpoint and outcome, their time, and the
//! attached volumes and Docker mount references (set just before rendering).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Label set: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

pub struct SdcMetrics {
    registry: Registry,
    /// Docker plugin requests by `endpoint` and `result` (ok, or the error kind).
    pub plugin_requests: Family<Labels, Counter>,
    /// Time spent answering Docker plugin requests, by `endpoint`, seconds.
    pub plugin_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    /// Volumes attached as local block devices.
    pub attached_volumes: Gauge,
    /// (volume, container mount ID) references the Docker driver holds.
    pub docker_mount_refs: Gauge,
}

impl Default for SdcMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meshblock_sdc");
        let plugin_requests = Family::<Labels, Counter>::default();
        let plugin_seconds = Family::<Labels, Counter<f64, AtomicU64>>::default();
        let attached_volumes = Gauge::default();
        let docker_mount_refs = Gauge::default();
        registry.register(
            "docker_requests",
            "Docker volume plugin requests by endpoint and result",
            plugin_requests.clone(),
        );
        registry.register(
            "docker_request_seconds",
            "Time spent answering Docker volume plugin requests",
            plugin_seconds.clone(),
        );
        registry.register(
            "attached_volumes",
            "Volumes attached as local block devices",
            attached_volumes.clone(),
        );
        registry.register(
            "docker_mount_refs",
            "Container mount references held by the Docker driver",
            docker_mount_refs.clone(),
        );
        SdcMetrics {
            registry,
            plugin_requests,
            plugin_seconds,
            attached_volumes,
            docker_mount_refs,
        }
    }
}

impl SdcMetrics {
    /// Count one plugin request.
    pub fn plugin_request(&self, endpoint: &str, result: &str, seconds: f64) {
        self.plugin_requests
            .get_or_create(&vec![
                ("endpoint".into(), endpoint.into()),
                ("result".into(), result.into()),
            ])
            .inc();
        self.plugin_seconds
            .get_or_create(&vec![("endpoint".into(), endpoint.into())])
            .inc_by(seconds);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
