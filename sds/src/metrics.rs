//! The SDS's Prometheus metrics (`meshblock_sds_*`), served at `GET /metrics` by the `web` crate.
//!
//! Counters are atomics bumped on the I/O path; gauges (device state, chunk counts, map version)
//! are set by whoever owns the state, just before rendering.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use proto::msg::IoCounters;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Label set with one `(name, value)` pair.
pub type Labels = Vec<(String, String)>;

/// What a device did, as the `op` label spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceOp {
    Read,
    Write,
    /// Trim and write-zeroes.
    Trim,
}

impl DeviceOp {
    const ALL: [DeviceOp; 3] = [DeviceOp::Read, DeviceOp::Write, DeviceOp::Trim];

    fn label(self) -> &'static str {
        match self {
            DeviceOp::Read => "read",
            DeviceOp::Write => "write",
            DeviceOp::Trim => "trim",
        }
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(25e-6, 2.0, 16))
}

/// Per-device I/O metric families (label `device`: the configured path). The storage keeps
/// them and gives each device its [`DeviceIo`] handles; [`SdsMetrics::register_device_io`]
/// exports them.
#[derive(Clone)]
pub struct DeviceIoFamilies {
    requests: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    seconds: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for DeviceIoFamilies {
    fn default() -> Self {
        DeviceIoFamilies {
            requests: Family::default(),
            bytes: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl DeviceIoFamilies {
    /// The handles of the device at `path`.
    pub fn device(&self, path: &str) -> DeviceIo {
        let labels = |op: DeviceOp| -> Labels {
            vec![
                ("device".into(), path.into()),
                ("op".into(), op.label().into()),
            ]
        };
        DeviceIo {
            micros: Arc::new(DeviceOp::ALL.map(|_| AtomicU64::new(0))),
            requests: DeviceOp::ALL.map(|op| self.requests.get_or_create(&labels(op)).clone()),
            bytes: DeviceOp::ALL.map(|op| self.bytes.get_or_create(&labels(op)).clone()),
            seconds: DeviceOp::ALL.map(|op| self.seconds.get_or_create(&labels(op)).clone()),
        }
    }
}

/// One device's I/O counters and latency.
#[derive(Clone)]
pub struct DeviceIo {
    /// Summed latency per op, in microseconds (for the hello's [`IoCounters`]).
    micros: Arc<[AtomicU64; 3]>,
    requests: [Counter; 3],
    bytes: [Counter; 3],
    seconds: [Histogram; 3],
}

impl DeviceIo {
    /// Count one successful `op` of `bytes` started at `started`.
    pub fn done(&self, op: DeviceOp, bytes: u64, started: std::time::Instant) {
        let i = op as usize;
        self.requests[i].inc();
        self.bytes[i].inc_by(bytes);
        let took = started.elapsed();
        self.seconds[i].observe(took.as_secs_f64());
        self.micros[i].fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// The device's reads and writes so far, as the hello reports them.
    pub fn counters(&self) -> IoCounters {
        let (r, w) = (DeviceOp::Read as usize, DeviceOp::Write as usize);
        IoCounters {
            read_ops: self.requests[r].get(),
            write_ops: self.requests[w].get(),
            read_bytes: self.bytes[r].get(),
            write_bytes: self.bytes[w].get(),
            read_micros: self.micros[r].load(Ordering::Relaxed),
            write_micros: self.micros[w].load(Ordering::Relaxed),
        }
    }
}

pub struct SdsMetrics {
    registry: Registry,
    /// Read requests served (primary reads and ReadLocal).
    pub reads: Counter,
    /// Write requests applied locally (Write and ReplicaWrite).
    pub writes: Counter,
    /// Writes forwarded to a secondary.
    pub forwards: Counter,
    /// Trim and write-zeroes requests applied locally.
    pub trims: Counter,
    pub flushes: Counter,
    pub read_bytes: Counter,
    pub written_bytes: Counter,
    /// Requests answered with an error, by wire error code.
    pub request_errors: Family<Labels, Counter>,
    /// Blocks whose CRC32 did not match their data.
    pub checksum_errors: Counter,
    /// Device operations that failed.
    pub device_errors: Counter,
    /// Primary reads served from the secondary because this SDS's copy is on a failed device.
    pub reads_from_other_copy: Counter,
    /// 1 per device that has failed.
    pub device_failed: Family<Labels, Gauge>,
    /// Bytes of each device's journal taken by records not yet applied, and its size.
    pub device_journal_used: Family<Labels, Gauge>,
    pub device_journal_size: Family<Labels, Gauge>,
    pub chunks_allocated: Gauge,
    /// Blocks journaled but not yet applied in place (held in memory).
    pub journal_overlay_blocks: Gauge,
    /// Journal records written merged with others into one device write (group commit).
    pub journal_records_merged: DeviceTotal,
    /// Whole-chunk writes that went out of place instead of through the journal.
    pub out_of_place_writes: DeviceTotal,
    pub map_version: Gauge,
    /// 1 while the last hello to the MDM succeeded.
    pub mdm_connected: Gauge,
    /// Service time of primary reads, seconds.
    pub read_seconds: Histogram,
    /// Service time of primary writes including the forward, seconds.
    pub write_seconds: Histogram,
    /// Chunks copied (or trimmed) onto rebuild targets as a primary.
    pub rebuild_chunks: Counter,
    /// Bytes copied onto rebuild targets.
    pub rebuild_bytes: Counter,
    /// Bytes received as a rebuild or rebalance target (copies of whole chunks).
    pub rebuild_bytes_in: Counter,
    /// PGs this SDS finished rebuilding (as their primary).
    pub rebuilt_pgs: Counter,
    /// PGs this SDS is copying right now.
    pub rebuilding_pgs: Gauge,
    /// Client requests that passed the fence as a primary (Read, Write, Trim, WriteZeroes): what adaptive
    /// rebuild throttling watches.
    pub user_requests: Counter,
    /// Chunks backward rebuilds did not copy (unchanged while the target was away).
    pub rebuild_chunks_skipped: Counter,
    /// Chunks the running rebuild copies still have to visit.
    pub rebuild_chunks_left: Gauge,
    /// Chunks of thick volumes allocated ahead of writes.
    pub thick_chunks_allocated: Counter,
    /// Chunks of thick volumes this SDS holds but has not allocated yet (or cannot: full).
    pub thick_chunks_pending: Gauge,
    /// Chunks of thick volumes the last pre-allocation pass found no slot for (devices full).
    pub thick_chunks_no_space: Gauge,
    /// Chunks still on devices being removed.
    pub draining_chunks: Gauge,
    /// Chunks moved off devices being removed.
    pub drained_chunks: Counter,
    /// Forwarded writes and trims refused because they arrived on a connection the primary
    /// had since given up on (it timed the forward out and sent later writes on a new one).
    pub stale_forwards_refused: Counter,
    /// Writes sent to the secondary a second time, under its newer map, after it refused them
    /// for their epoch while the local copy had taken them.
    pub resent_forwards: Counter,
    /// Writes and trims (client or forwarded) refused, not applied or not acknowledged,
    /// because the lease ran out while they waited (for the range lock, or for the device).
    pub lease_expired_writes: Counter,
    /// Chunks of PGs this SDS no longer holds, freed by the garbage collector.
    pub gc_freed_chunks: Counter,
    /// 1 while this SDS holds a lease from the MDM and may serve.
    pub leased: Gauge,
    /// Blocks rewritten from the other copy after failing their checksum.
    pub repaired_blocks: Counter,
    /// Blocks failing their checksum with no good copy to repair from.
    pub unrecoverable_blocks: Counter,
    /// Chunks the scrubber verified.
    pub scrubbed_chunks: Counter,
    /// Full scrub passes completed.
    pub scrub_passes: Counter,
}

impl Default for SdsMetrics {
    fn default() -> Self {
        SdsMetrics::new()
    }
}

fn r_rebuild(m: &mut SdsMetrics) {
    let r = &mut m.registry;
    r.register(
        "meshblock_sds_rebuild_chunks",
        "Chunks copied or trimmed onto rebuild targets (as primary)",
        m.rebuild_chunks.clone(),
    );
    r.register(
        "meshblock_sds_rebuild_bytes",
        "Bytes copied onto rebuild targets (as primary)",
        m.rebuild_bytes.clone(),
    );
    r.register(
        "meshblock_sds_rebuild_bytes_in",
        "Bytes received as a rebuild or rebalance target",
        m.rebuild_bytes_in.clone(),
    );
    r.register(
        "meshblock_sds_rebuilt_pgs",
        "PGs this SDS finished copying to a new secondary",
        m.rebuilt_pgs.clone(),
    );
    r.register(
        "meshblock_sds_rebuild_chunks_left",
        "Chunks the running rebuild copies of this SDS still have to visit",
        m.rebuild_chunks_left.clone(),
    );
    r.register(
        "meshblock_sds_user_requests",
        "Client requests served as a primary",
        m.user_requests.clone(),
    );
    r.register(
        "meshblock_sds_rebuild_chunks_skipped",
        "Chunks backward rebuilds did not copy (unchanged while the target was away)",
        m.rebuild_chunks_skipped.clone(),
    );
    r.register(
        "meshblock_sds_rebuilding_pgs",
        "PGs being copied by this SDS now",
        m.rebuilding_pgs.clone(),
    );
    r.register(
        "meshblock_sds_repaired_blocks",
        "Blocks rewritten from the other copy after failing their checksum",
        m.repaired_blocks.clone(),
    );
    r.register(
        "meshblock_sds_unrecoverable_blocks",
        "Blocks failing their checksum with no good copy to repair from",
        m.unrecoverable_blocks.clone(),
    );
    r.register(
        "meshblock_sds_scrubbed_chunks",
        "Chunks verified by the scrubber",
        m.scrubbed_chunks.clone(),
    );
    r.register(
        "meshblock_sds_scrub_passes",
        "Full scrub passes completed",
        m.scrub_passes.clone(),
    );
    r.register(
        "meshblock_sds_journal_overlay_blocks",
        "Blocks journaled but not yet written in place (served from memory)",
        m.journal_overlay_blocks.clone(),
    );
    r.register(
        "meshblock_sds_journal_records_merged",
        "Journal records written merged with adjacent ones into one device write (group commit)",
        m.journal_records_merged.counter.clone(),
    );
    r.register(
        "meshblock_sds_out_of_place_writes",
        "Whole-chunk writes written to a free slot and remapped, instead of through the journal",
        m.out_of_place_writes.counter.clone(),
    );
    r.register(
        "meshblock_sds_leased",
        "1 while this SDS holds a lease from the MDM and may serve I/O",
        m.leased.clone(),
    );
}

/// A counter fed from the devices' running totals (kept by each device since it was opened):
/// only growth is counted, so a removed device's share is not taken back.
#[derive(Default)]
pub struct DeviceTotal {
    counter: Counter,
    /// The devices' total at the last update.
    seen: std::sync::atomic::AtomicU64,
}

impl DeviceTotal {
    /// Account the devices' current total.
    pub fn set(&self, total: u64) {
        use std::sync::atomic::Ordering;
        let seen = self.seen.swap(total, Ordering::Relaxed);
        if total > seen {
            self.counter.inc_by(total - seen);
        }
    }
}

impl SdsMetrics {
    /// Export the storage's per-device I/O metrics.
    pub fn register_device_io(&mut self, f: &DeviceIoFamilies) {
        let r = &mut self.registry;
        r.register(
            "meshblock_sds_device_requests",
            "Requests a device completed, by device and op (read, write, trim); journaled writes count once",
            f.requests.clone(),
        );
        r.register(
            "meshblock_sds_device_bytes",
            "Bytes a device's completed requests carried, by device and op",
            f.bytes.clone(),
        );
        r.register(
            "meshblock_sds_device_request_seconds",
            "Latency of a device's completed requests (chunk store and journal included), by device and op",
            f.seconds.clone(),
        );
    }

    pub fn new() -> SdsMetrics {
        let buckets = || Histogram::new(exponential_buckets(25e-6, 2.0, 16));
        let mut m = SdsMetrics {
            registry: Registry::default(),
            reads: Counter::default(),
            writes: Counter::default(),
            forwards: Counter::default(),
            trims: Counter::default(),
            flushes: Counter::default(),
            read_bytes: Counter::default(),
            written_bytes: Counter::default(),
            request_errors: Family::default(),
            checksum_errors: Counter::default(),
            device_errors: Counter::default(),
            reads_from_other_copy: Counter::default(),
            device_failed: Family::default(),
            device_journal_used: Family::default(),
            device_journal_size: Family::default(),
            chunks_allocated: Gauge::default(),
            journal_overlay_blocks: Gauge::default(),
            journal_records_merged: DeviceTotal::default(),
            out_of_place_writes: DeviceTotal::default(),
            map_version: Gauge::default(),
            mdm_connected: Gauge::default(),
            read_seconds: buckets(),
            write_seconds: buckets(),
            rebuild_chunks: Counter::default(),
            rebuild_bytes: Counter::default(),
            rebuild_bytes_in: Counter::default(),
            rebuilt_pgs: Counter::default(),
            rebuilding_pgs: Gauge::default(),
            user_requests: Counter::default(),
            rebuild_chunks_skipped: Counter::default(),
            rebuild_chunks_left: Gauge::default(),
            thick_chunks_allocated: Counter::default(),
            thick_chunks_pending: Gauge::default(),
            thick_chunks_no_space: Gauge::default(),
            draining_chunks: Gauge::default(),
            drained_chunks: Counter::default(),
            stale_forwards_refused: Counter::default(),
            resent_forwards: Counter::default(),
            lease_expired_writes: Counter::default(),
            gc_freed_chunks: Counter::default(),
            leased: Gauge::default(),
            repaired_blocks: Counter::default(),
            unrecoverable_blocks: Counter::default(),
            scrubbed_chunks: Counter::default(),
            scrub_passes: Counter::default(),
        };
        r_rebuild(&mut m);
        let r = &mut m.registry;
        r.register(
            "meshblock_sds_reads",
            "Read requests served",
            m.reads.clone(),
        );
        r.register(
            "meshblock_sds_writes",
            "Write requests applied locally (primary and replica)",
            m.writes.clone(),
        );
        r.register(
            "meshblock_sds_forwards",
            "Writes forwarded to a secondary",
            m.forwards.clone(),
        );
        r.register(
            "meshblock_sds_trims",
            "Trim and write-zeroes requests applied locally",
            m.trims.clone(),
        );
        r.register(
            "meshblock_sds_flushes",
            "Flush requests served",
            m.flushes.clone(),
        );
        r.register(
            "meshblock_sds_read_bytes",
            "Bytes read for clients",
            m.read_bytes.clone(),
        );
        r.register(
            "meshblock_sds_written_bytes",
            "Bytes written locally",
            m.written_bytes.clone(),
        );
        r.register(
            "meshblock_sds_request_errors",
            "Data requests answered with an error, by code",
            m.request_errors.clone(),
        );
        r.register(
            "meshblock_sds_checksum_errors",
            "Blocks whose CRC32 did not match",
            m.checksum_errors.clone(),
        );
        r.register(
            "meshblock_sds_device_errors",
            "Device operations that failed",
            m.device_errors.clone(),
        );
        r.register(
            "meshblock_sds_reads_from_other_copy",
            "Primary reads served from the secondary because the local copy is on a failed device",
            m.reads_from_other_copy.clone(),
        );
        r.register(
            "meshblock_sds_device_journal_used_bytes",
            "Bytes of the device's write-ahead journal taken by records not yet applied in place \
             (writes wait when it is full)",
            m.device_journal_used.clone(),
        );
        r.register(
            "meshblock_sds_device_journal_size_bytes",
            "Size of the device's write-ahead journal ring",
            m.device_journal_size.clone(),
        );
        r.register(
            "meshblock_sds_device_failed",
            "1 when the device has failed",
            m.device_failed.clone(),
        );
        r.register(
            "meshblock_sds_thick_chunks_allocated",
            "Chunks of thick volumes allocated ahead of writes",
            m.thick_chunks_allocated.clone(),
        );
        r.register(
            "meshblock_sds_thick_chunks_pending",
            "Chunks of thick volumes held here and not allocated yet",
            m.thick_chunks_pending.clone(),
        );
        r.register(
            "meshblock_sds_thick_chunks_no_space",
            "Chunks of thick volumes held here that found no free slot (devices full); should be 0",
            m.thick_chunks_no_space.clone(),
        );
        r.register(
            "meshblock_sds_draining_chunks",
            "Chunks still on devices being removed (moved to the other devices)",
            m.draining_chunks.clone(),
        );
        r.register(
            "meshblock_sds_drained_chunks",
            "Chunks moved off devices being removed",
            m.drained_chunks.clone(),
        );
        r.register(
            "meshblock_sds_stale_forwards_refused",
            "Forwarded writes not applied: they came on a connection the primary had replaced",
            m.stale_forwards_refused.clone(),
        );
        r.register(
            "meshblock_sds_resent_forwards",
            "Writes the secondary refused for its newer map after the local copy took them, sent again under that map",
            m.resent_forwards.clone(),
        );
        r.register(
            "meshblock_sds_lease_expired_writes",
            "Writes refused (not applied, or not acknowledged) because the lease ran out while they waited",
            m.lease_expired_writes.clone(),
        );
        r.register(
            "meshblock_sds_gc_freed_chunks",
            "Chunks of PGs this SDS no longer holds, freed by the garbage collector",
            m.gc_freed_chunks.clone(),
        );
        r.register(
            "meshblock_sds_chunks_allocated",
            "Chunks allocated on this SDS",
            m.chunks_allocated.clone(),
        );
        r.register(
            "meshblock_sds_map_version",
            "Version of the cached cluster map",
            m.map_version.clone(),
        );
        r.register(
            "meshblock_sds_mdm_connected",
            "1 while the MDM answers this SDS's hellos",
            m.mdm_connected.clone(),
        );
        r.register(
            "meshblock_sds_read_seconds",
            "Service time of primary reads",
            m.read_seconds.clone(),
        );
        r.register(
            "meshblock_sds_write_seconds",
            "Service time of primary writes including the forward",
            m.write_seconds.clone(),
        );
        m
    }

    /// Count an error answer with wire code `code`.
    pub fn request_error(&self, code: proto::ErrorCode) {
        self.request_errors
            .get_or_create(&vec![("code".to_string(), format!("{code:?}"))])
            .inc();
    }

    /// Set a device's failed gauge.
    /// Record a device's journal fill.
    pub fn set_device_journal(&self, path: &str, used: u64, size: u64) {
        let l: Labels = vec![("device".into(), path.into())];
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.device_journal_used.get_or_create(&l).set(g(used));
        self.device_journal_size.get_or_create(&l).set(g(size));
    }

    pub fn set_device_failed(&self, path: &str, failed: bool) {
        self.device_failed
            .get_or_create(&vec![("device".to_string(), path.to_string())])
            .set(i64::from(failed));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_in_the_prometheus_text_format() {
        let m = SdsMetrics::new();
        m.reads.inc();
        m.request_error(proto::ErrorCode::StaleEpoch);
        m.set_device_failed("/dev/x", true);
        // The merged-record total of the devices: only growth is counted.
        for total in [5, 7, 3, 4] {
            m.journal_records_merged.set(total);
        }
        let body = m.render();
        assert!(body.contains("meshblock_sds_reads_total 1"), "{body}");
        assert!(
            body.contains("meshblock_sds_request_errors_total{code=\"StaleEpoch\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("meshblock_sds_device_failed{device=\"/dev/x\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("meshblock_sds_journal_records_merged_total 8"),
            "{body}"
        );
        assert!(
            body.contains("meshblock_sds_write_seconds_bucket"),
            "{body}"
        );
    }
}
