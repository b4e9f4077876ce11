//! The SDC's Prometheus metrics (`meshblock_sdc_*`), served at `GET /metrics` on
//! `metrics_listen`: Docker plugin requests by endpoint and outcome, their time, and the
//! attached volumes and Docker mount references, and each volume's QoS limits and the time its
//! requests waited for them (set just before rendering).

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
    /// Each volume's IOPS limit on this host (0: none), by `volume`.
    pub volume_iops_limit: Family<Labels, Gauge>,
    /// Each volume's bandwidth limit on this host, bytes per second (0: none), by `volume`.
    pub volume_bandwidth_limit: Family<Labels, Gauge>,
    /// Time requests waited for their volume's limits, seconds, by `volume`.
    pub volume_throttled_seconds: Family<Labels, Counter<f64, AtomicU64>>,
}

impl Default for SdcMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meshblock_sdc");
        let plugin_requests = Family::<Labels, Counter>::default();
        let plugin_seconds = Family::<Labels, Counter<f64, AtomicU64>>::default();
        let attached_volumes = Gauge::default();
        let docker_mount_refs = Gauge::default();
        let volume_iops_limit = Family::<Labels, Gauge>::default();
        let volume_bandwidth_limit = Family::<Labels, Gauge>::default();
        let volume_throttled_seconds = Family::<Labels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "volume_iops_limit",
            "IOPS limit of a volume mapped to this host (0: none)",
            volume_iops_limit.clone(),
        );
        registry.register(
            "volume_bandwidth_limit_bytes_per_second",
            "Bandwidth limit of a volume mapped to this host (0: none)",
            volume_bandwidth_limit.clone(),
        );
        registry.register(
            "volume_throttled_seconds",
            "Time requests waited for their volume's QoS limits",
            volume_throttled_seconds.clone(),
        );
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
            volume_iops_limit,
            volume_bandwidth_limit,
            volume_throttled_seconds,
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

    /// Records volume `name`'s limits (IOPS, bytes per second) and its total throttled time.
    pub fn volume_qos(&self, name: &str, limits: (u64, u64), throttled: std::time::Duration) {
        let l: Labels = vec![("volume".into(), name.into())];
        self.volume_iops_limit
            .get_or_create(&l)
            .set(i64::try_from(limits.0).unwrap_or(i64::MAX));
        self.volume_bandwidth_limit
            .get_or_create(&l)
            .set(i64::try_from(limits.1).unwrap_or(i64::MAX));
        let c = self.volume_throttled_seconds.get_or_create(&l);
        let delta = throttled.as_secs_f64() - c.get();
        if delta > 0.0 {
            c.inc_by(delta);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
