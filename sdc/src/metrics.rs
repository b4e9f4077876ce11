//! The SDC's Prometheus metrics (`meshblock_sdc_*`), served at `GET /metrics` on
//! `metrics_listen`:
//! - per volume (labels `volume`, the name when the host first served it, and `volume_id`):
//!   requests, bytes and latency by `op` (read, write, trim, flush), retries (a piece sent
//!   again after a map change or a refusal), reroutes (sent again to another primary),
//!   timeouts (given up after `io_timeout_ms`), fenced requests and other errors by `kind`;
//!   [`VolumeIoMetrics`] holds one volume's handles, so the I/O path never builds a label;
//! - each volume's QoS limits and the time its requests waited for them (set just before
//!   rendering);
//! - Docker plugin requests by endpoint and outcome and their time; attached volumes and Docker
//!   mount references.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use proto::msg::IoCounters;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A volume's operations, as the `op` label spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Trim and write-zeroes.
    Trim,
    Flush,
}

impl Op {
    const ALL: [Op; 4] = [Op::Read, Op::Write, Op::Trim, Op::Flush];

    fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Trim => "trim",
            Op::Flush => "flush",
        }
    }
}

/// Histogram buckets of request latency, seconds: 50 µs doubling to ~1.6 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

/// One volume's I/O metric handles (shared with the families in [`SdcMetrics`]).
#[derive(Clone)]
pub struct VolumeIoMetrics {
    /// Summed latency per op, in microseconds (reported to the MDM with map polls).
    micros: Arc<[AtomicU64; 4]>,
    ops: [Counter; 4],
    bytes: [Counter; 4],
    seconds: [Histogram; 4],
    pub retries: Counter,
    pub reroutes: Counter,
    pub timeouts: Counter,
    pub fenced: Counter,
    errors: Family<Labels, Counter>,
    labels: Labels,
}

impl VolumeIoMetrics {
    /// Count one finished request of `bytes` that took `seconds`.
    pub fn done(&self, op: Op, bytes: u64, seconds: f64) {
        let i = op as usize;
        self.ops[i].inc();
        self.bytes[i].inc_by(bytes);
        self.seconds[i].observe(seconds);
        self.micros[i].fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// The volume's reads and writes on this host so far, as map polls report them.
    pub fn counters(&self) -> IoCounters {
        let (r, w) = (Op::Read as usize, Op::Write as usize);
        IoCounters {
            read_ops: self.ops[r].get(),
            write_ops: self.ops[w].get(),
            read_bytes: self.bytes[r].get(),
            write_bytes: self.bytes[w].get(),
            read_micros: self.micros[r].load(Ordering::Relaxed),
            write_micros: self.micros[w].load(Ordering::Relaxed),
        }
    }

    /// Count one failed request by `kind` (other than timeouts and fencing, counted apart).
    pub fn error(&self, kind: &str) {
        let mut l = self.labels.clone();
        l.push(("kind".into(), kind.into()));
        self.errors.get_or_create(&l).inc();
    }
}

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
    volume_requests: Family<Labels, Counter>,
    volume_bytes: Family<Labels, Counter>,
    volume_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    volume_retries: Family<Labels, Counter>,
    volume_reroutes: Family<Labels, Counter>,
    volume_timeouts: Family<Labels, Counter>,
    volume_fenced: Family<Labels, Counter>,
    volume_errors: Family<Labels, Counter>,
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
        let volume_requests = Family::<Labels, Counter>::default();
        let volume_bytes = Family::<Labels, Counter>::default();
        let volume_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let volume_retries = Family::<Labels, Counter>::default();
        let volume_reroutes = Family::<Labels, Counter>::default();
        let volume_timeouts = Family::<Labels, Counter>::default();
        let volume_fenced = Family::<Labels, Counter>::default();
        let volume_errors = Family::<Labels, Counter>::default();
        registry.register(
            "volume_requests",
            "Requests on a volume finished by this host, by op (read, write, trim, flush)",
            volume_requests.clone(),
        );
        registry.register(
            "volume_bytes",
            "Bytes a volume's finished requests carried, by op",
            volume_bytes.clone(),
        );
        registry.register(
            "volume_request_seconds",
            "Latency of a volume's finished requests, by op (QoS waits included)",
            volume_seconds.clone(),
        );
        registry.register(
            "volume_retries",
            "Pieces of a volume's requests sent again after a refusal or a map change",
            volume_retries.clone(),
        );
        registry.register(
            "volume_reroutes",
            "Pieces of a volume's requests sent again to another primary than the last try",
            volume_reroutes.clone(),
        );
        registry.register(
            "volume_timeouts",
            "Requests on a volume given up after io_timeout_ms without a usable copy",
            volume_timeouts.clone(),
        );
        registry.register(
            "volume_fenced_requests",
            "Requests on a volume refused because this host's mapping was fenced",
            volume_fenced.clone(),
        );
        registry.register(
            "volume_errors",
            "Requests on a volume that failed otherwise, by kind",
            volume_errors.clone(),
        );
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
            volume_requests,
            volume_bytes,
            volume_seconds,
            volume_retries,
            volume_reroutes,
            volume_timeouts,
            volume_fenced,
            volume_errors,
        }
    }
}

impl SdcMetrics {
    /// The I/O metric handles of volume `id`, labelled with `name`.
    pub fn volume_io(&self, id: proto::VolumeId, name: &str) -> VolumeIoMetrics {
        let labels: Labels = vec![
            ("volume".into(), name.into()),
            ("volume_id".into(), id.to_string()),
        ];
        let with_op = |op: Op| {
            let mut l = labels.clone();
            l.push(("op".into(), op.label().into()));
            l
        };
        let ops = Op::ALL.map(|op| self.volume_requests.get_or_create(&with_op(op)).clone());
        let bytes = Op::ALL.map(|op| self.volume_bytes.get_or_create(&with_op(op)).clone());
        let seconds = Op::ALL.map(|op| self.volume_seconds.get_or_create(&with_op(op)).clone());
        VolumeIoMetrics {
            micros: Arc::new(Op::ALL.map(|_| AtomicU64::new(0))),
            ops,
            bytes,
            seconds,
            retries: self.volume_retries.get_or_create(&labels).clone(),
            reroutes: self.volume_reroutes.get_or_create(&labels).clone(),
            timeouts: self.volume_timeouts.get_or_create(&labels).clone(),
            fenced: self.volume_fenced.get_or_create(&labels).clone(),
            errors: self.volume_errors.clone(),
            labels,
        }
    }

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
