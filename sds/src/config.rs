//! `SdsConfig`: the SDS daemon's configuration (TOML), its defaults and its validation.
//!
//! Unknown keys produce a warning, not a failure, so a config written for a newer version still
//! starts an older one during a rollback. That leniency never applies to on-disk formats, which
//! carry explicit versions (see [`crate::chunk_store`]).

use proto::transport::DataTransport;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Port of an MDM address given without one.
pub const MDM_DEFAULT_PORT: u16 = 7611;
pub const DEFAULT_LISTEN: ([u8; 4], u16) = ([0, 0, 0, 0], 7072);
pub const DEFAULT_METRICS_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 9072);
pub const DEFAULT_CERT_DIR: &str = "/etc/meshblock/certs";
pub const DEFAULT_MAP_POLL_INTERVAL_MS: u64 = 500;
pub const DEFAULT_HELLO_INTERVAL_MS: u64 = 200;
/// `lease_ms` unset: the lease is as long as the MDM grants.
pub const DEFAULT_LEASE_MS: u64 = 0;
pub const DEFAULT_REBUILD_CONCURRENCY: u32 = 16;
pub const DEFAULT_SCRUB_RATE_MIB_S: u64 = 4;
pub const DEFAULT_FORWARD_TIMEOUT_MS: u64 = 5000;

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.into()
}
fn default_mdm() -> Vec<String> {
    vec![format!("127.0.0.1:{MDM_DEFAULT_PORT}")]
}
fn default_cert_dir() -> PathBuf {
    PathBuf::from(DEFAULT_CERT_DIR)
}
fn default_io_uring() -> bool {
    true
}
fn default_metrics_listen() -> SocketAddr {
    DEFAULT_METRICS_LISTEN.into()
}
fn default_map_poll_interval_ms() -> u64 {
    DEFAULT_MAP_POLL_INTERVAL_MS
}
fn default_hello_interval_ms() -> u64 {
    DEFAULT_HELLO_INTERVAL_MS
}
fn default_forward_timeout_ms() -> u64 {
    DEFAULT_FORWARD_TIMEOUT_MS
}
fn default_lease_ms() -> u64 {
    DEFAULT_LEASE_MS
}
fn default_rebuild_concurrency() -> u32 {
    DEFAULT_REBUILD_CONCURRENCY
}
fn default_scrub_rate_mib_s() -> u64 {
    DEFAULT_SCRUB_RATE_MIB_S
}
fn default_gc_interval_ms() -> u64 {
    10_000
}

fn default_device_lock_wait_ms() -> u64 {
    30_000
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SdsConfig {
    /// This SDS's name, as given to `scli --add_sds --sds_name`; its certificate's common name
    /// is `sds:NAME`. Default: "" (the host name).
    #[serde(default)]
    pub name: String,
    /// UDP address of the QUIC data port (SDCs and peer SDS connect here). Default:
    /// 0.0.0.0:7072.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// MDM addresses, `ip` or `ip:port` (port 7611 when absent); any member will do, the
    /// leader is found from there. Default: ["127.0.0.1:7611"].
    #[serde(default = "default_mdm")]
    pub mdm: Vec<String>,
    /// Directory holding node.pem, node.key and ca.pem (signed by the cluster CA). Default:
    /// /etc/meshblock/certs.
    #[serde(default = "default_cert_dir")]
    pub cert_dir: PathBuf,
    /// Devices to serve: block devices or regular (sparse) files, used whole, paths exactly as
    /// given to scli. A blank device is formatted on first use. Default: none (required).
    /// Devices added later with `scli --add_sds_device` are opened from the cluster map.
    #[serde(default)]
    pub devices: Vec<PathBuf>,
    /// Use io_uring (true) or pread/pwrite threads (false, e.g. under Docker's default seccomp
    /// profile). Default: true.
    #[serde(default = "default_io_uring")]
    pub io_uring: bool,
    /// TCP address serving Prometheus metrics at GET /metrics. Default: 127.0.0.1:9072.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Interval between asks for a newer cluster map, in milliseconds. Default: 500.
    #[serde(default = "default_map_poll_interval_ms")]
    pub map_poll_interval_ms: u64,
    /// Interval between hellos (registration, device reports, heartbeat) to the MDM, in
    /// milliseconds. Default: 200.
    #[serde(default = "default_hello_interval_ms")]
    pub hello_interval_ms: u64,
    /// How long a primary waits for its secondary to apply a forwarded write, in
    /// milliseconds; keep it below the SDC's 10 s call timeout. Default: 5000.
    #[serde(default = "default_forward_timeout_ms")]
    pub forward_timeout_ms: u64,
    /// An upper bound, in milliseconds, on the lease: how long after sending its last answered
    /// hello this SDS keeps serving I/O without hearing from the MDM. The MDM leader sends the
    /// lease's length with each answer (4/5 of its `sds_down_timeout_ms`), so it always ends
    /// before that MDM may declare this SDS down; this key can only shorten it. 0: no bound
    /// of its own (an MDM too old to send a length then grants 1200). Default: 0.
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// PGs this SDS copies at once as a rebuild or rebalance source (one chunk at a time each);
    /// the pool's rebuild/rebalance policy further limits chunk copies and bandwidth.
    /// Default: 16.
    #[serde(default = "default_rebuild_concurrency")]
    pub rebuild_concurrency: u32,
    /// How fast the scrubber re-reads and verifies this SDS's data, MiB per second (0 turns it
    /// off). Default: 4.
    #[serde(default = "default_scrub_rate_mib_s")]
    pub scrub_rate_mib_s: u64,
    /// Interval between passes of the garbage collector, which frees chunks of PGs this SDS
    /// no longer holds (moved off by rebalance, rebuilt elsewhere, deleted volumes), in
    /// milliseconds; a chunk is freed after two passes agree (0 turns it off). Default: 10000.
    #[serde(default = "default_gc_interval_ms")]
    pub gc_interval_ms: u64,
    /// Transport for connections this SDS dials to its peers (forwarded writes, rebuild):
    /// "tcp" (TLS over TCP) or "quic". The SDS accepts both on its port either way.
    /// Default: "tcp".
    #[serde(default)]
    pub data_transport: DataTransport,
    /// Threads running the SDS's async work: network, requests, journal bookkeeping (device
    /// I/O has its own ring thread per device). 1 runs all of it on one thread, which costs
    /// the fewest thread wake-ups per request and was fastest on small hosts; 0 chooses one
    /// per 4 CPUs, at least one. Raise it when one SDS's CPU limits a large host. Default: 0.
    #[serde(default)]
    pub worker_threads: usize,
    /// While the SDS runs, idle CPUs of this machine use only idle states they wake from
    /// within this many microseconds (PM QoS, `/dev/cpu_dma_latency`, needs root); 0 keeps
    /// them polling; -1 leaves the machine's idle policy alone. Default: 0.
    #[serde(default)]
    pub cpu_wake_latency_us: i64,
    /// How long to wait at start for a device another process holds locked, in milliseconds:
    /// an SDS killed a moment ago releases its devices only once the kernel has finished its
    /// in-flight I/O. 0 fails at once. Default: 30000.
    #[serde(default = "default_device_lock_wait_ms")]
    pub device_lock_wait_ms: u64,
}

/// Every key with its documentation, in file order (printed by `--print-default-config`).
const FIELD_DOCS: &[(&str, &str)] = &[
    (
        "name",
        "This SDS's name, as given to `scli --add_sds --sds_name`; its certificate's common \
         name is `sds:NAME`. Empty means the host name.",
    ),
    (
        "listen",
        "Address of the data port: QUIC on this UDP port and TLS over TCP on the same TCP port \
         (SDCs and peer SDS connect here).",
    ),
    (
        "mdm",
        "MDM addresses, `ip` or `ip:port` (port 7611 when absent); any member will do, the \
         leader is found from there.",
    ),
    (
        "cert_dir",
        "Directory holding node.pem, node.key and ca.pem (signed by the cluster CA).",
    ),
    (
        "devices",
        "Devices to serve: block devices or regular (sparse) files, used whole, paths exactly \
         as given to scli. A blank device is formatted on first use. Required. Devices added \
         later with scli --add_sds_device need not be listed: the SDS opens them from the \
         cluster map (also after a restart).",
    ),
    (
        "io_uring",
        "Use io_uring (true) or pread/pwrite threads (false, e.g. under Docker's default \
         seccomp profile).",
    ),
    (
        "metrics_listen",
        "TCP address serving Prometheus metrics at GET /metrics.",
    ),
    (
        "map_poll_interval_ms",
        "Interval between asks for a newer cluster map, in milliseconds.",
    ),
    (
        "hello_interval_ms",
        "Interval between hellos (registration, device reports, heartbeat) to the MDM, in \
         milliseconds.",
    ),
    (
        "forward_timeout_ms",
        "How long a primary waits for its secondary to apply a forwarded write, in \
         milliseconds; keep it below the SDC's 10 s call timeout.",
    ),
    (
        "lease_ms",
        "An upper bound, in milliseconds, on the lease: how long after sending its last \
         answered hello this SDS keeps serving I/O without hearing from the MDM. The MDM \
         leader sends the lease's length with each answer (4/5 of its sds_down_timeout_ms), so \
         it always ends before that MDM may declare this SDS down; this key can only shorten \
         it. 0: no bound of its own (an MDM too old to send a length then grants 1200).",
    ),
    (
        "rebuild_concurrency",
        "PGs this SDS copies at once as a rebuild or rebalance source (one chunk at a time \
         each). The pool's rebuild/rebalance policy (scli --set_rebuild_rebalance_policy) \
         further limits the chunk copies in flight and their bandwidth.",
    ),
    (
        "scrub_rate_mib_s",
        "How fast the scrubber re-reads and verifies this SDS's data, MiB per second (0 turns \
         it off). Blocks failing their checksum are repaired from the other copy.",
    ),
    (
        "gc_interval_ms",
        "Interval between passes of the garbage collector, which frees chunks of PGs this SDS \
         no longer holds (moved off by rebalance, rebuilt elsewhere, deleted volumes); a chunk \
         is freed only after two passes agree, never one the MDM keeps for a backward rebuild \
         (0 turns it off).",
    ),
    (
        "data_transport",
        "Transport for connections this SDS dials to its peers (forwarded writes, rebuild): \
         \"tcp\" (TLS 1.3 over TCP, on the listen port's number) or \"quic\". The SDS accepts \
         both either way; TCP costs several times less CPU per byte.",
    ),
    (
        "worker_threads",
        "Threads running the SDS's network and request work: 1 runs it all on one thread \
         (fewest thread wake-ups per request; fastest on small hosts), 0 chooses one per 4 \
         CPUs, at least one. Each device also has its own io_uring thread.",
    ),
    (
        "cpu_wake_latency_us",
        "While the SDS runs, idle CPUs of this machine use only idle states they wake from \
         within this many microseconds (PM QoS through /dev/cpu_dma_latency; needs root, \
         otherwise a warning). 0 keeps idle CPUs polling: a 4 KiB write waits for about nine \
         thread wakes across SDC and SDS, and waking a halted CPU (on a VM above all) costs \
         tens of microseconds each; the 2-core lab VM measured QD1 writes at 0.30-0.37 ms \
         instead of about 0.5 ms. The price is idle CPUs that spin (power; host CPU on a \
         VM). -1 leaves the machine's idle policy alone, e.g. on hyperconverged nodes that \
         value power more.",
    ),
    (
        "device_lock_wait_ms",
        "How long the SDS waits at start for a device another process holds locked (the \
         configured devices and those the cluster map gives it), in milliseconds. An SDS \
         killed a moment ago (a crash, then a restart by systemd) releases its devices only \
         once the kernel has finished the device I/O it had in flight. After this a \
         configured device stops the SDS with an error naming it; a device from the map is \
         reported failed. Devices added with scli --add_sds_device while the SDS runs are \
         not waited for. 0 fails at once.",
    ),
];

impl Default for SdsConfig {
    fn default() -> Self {
        SdsConfig {
            name: String::new(),
            listen: default_listen(),
            mdm: default_mdm(),
            cert_dir: default_cert_dir(),
            devices: Vec::new(),
            io_uring: default_io_uring(),
            metrics_listen: default_metrics_listen(),
            map_poll_interval_ms: default_map_poll_interval_ms(),
            hello_interval_ms: default_hello_interval_ms(),
            forward_timeout_ms: default_forward_timeout_ms(),
            lease_ms: default_lease_ms(),
            rebuild_concurrency: default_rebuild_concurrency(),
            scrub_rate_mib_s: default_scrub_rate_mib_s(),
            gc_interval_ms: default_gc_interval_ms(),
            data_transport: DataTransport::default(),
            worker_threads: 0,
            cpu_wake_latency_us: 0,
            device_lock_wait_ms: default_device_lock_wait_ms(),
        }
    }
}

/// A configuration that cannot run: every problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigProblems(pub Vec<String>);

impl SdsConfig {
    /// Parse TOML; also returns the keys this version does not know.
    pub fn parse(text: &str) -> Result<(SdsConfig, Vec<String>), toml::de::Error> {
        let cfg: SdsConfig = toml::from_str(text)?;
        let raw: toml::Table = toml::from_str(text)?;
        Ok((cfg, proto::config_file::unknown_keys(&raw, FIELD_DOCS)))
    }

    /// The MDM addresses, parsed.
    pub fn mdm_addrs(&self) -> Result<Vec<SocketAddr>, String> {
        proto::client::parse_addrs(&self.mdm.join(","), MDM_DEFAULT_PORT)
    }

    pub fn map_poll_interval(&self) -> Duration {
        Duration::from_millis(self.map_poll_interval_ms)
    }

    pub fn hello_interval(&self) -> Duration {
        Duration::from_millis(self.hello_interval_ms)
    }

    pub fn forward_timeout(&self) -> Duration {
        Duration::from_millis(self.forward_timeout_ms)
    }

    /// The bound on the lease the MDM grants (`Duration::MAX`: none of its own).
    pub fn lease_cap(&self) -> Duration {
        match self.lease_ms {
            0 => Duration::MAX,
            ms => Duration::from_millis(ms),
        }
    }

    pub fn device_lock_wait(&self) -> Duration {
        Duration::from_millis(self.device_lock_wait_ms)
    }

    /// Check everything at once.
    pub fn validate(&self) -> Result<(), ConfigProblems> {
        let mut p = Vec::new();
        if self.name.is_empty() {
            p.push("name: empty (and no host name to default to)".to_string());
        }
        if self.devices.is_empty() {
            p.push("devices: give at least one device (--device PATH)".to_string());
        }
        for (i, d) in self.devices.iter().enumerate() {
            if self.devices[..i].contains(d) {
                p.push(format!("devices: {} is listed twice", d.display()));
            }
        }
        if let Err(e) = self.mdm_addrs() {
            p.push(format!("mdm: {e}"));
        }
        if self.cert_dir.as_os_str().is_empty() {
            p.push("cert_dir: empty".to_string());
        }
        for (key, v) in [
            ("map_poll_interval_ms", self.map_poll_interval_ms),
            ("hello_interval_ms", self.hello_interval_ms),
            ("forward_timeout_ms", self.forward_timeout_ms),
            ("rebuild_concurrency", u64::from(self.rebuild_concurrency)),
        ] {
            if v == 0 {
                p.push(format!("{key}: must be more than 0"));
            }
        }
        if let Err(e) = proto::daemon::check_cpu_wake_latency(self.cpu_wake_latency_us) {
            p.push(e);
        }
        if let Err(e) = proto::daemon::check_worker_threads(self.worker_threads) {
            p.push(e);
        }
        if self.lease_ms != 0 && self.hello_interval_ms >= self.lease_ms {
            p.push(
                "hello_interval_ms: must be below lease_ms, or the lease lapses between hellos"
                    .to_string(),
            );
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigProblems(p))
        }
    }

    /// The defaults as commented TOML (what `--print-default-config` prints, and the file
    /// the package installs as /etc/meshblock/sds.toml).
    pub fn default_toml() -> String {
        let table = toml::Table::try_from(SdsConfig::default()).unwrap_or_default();
        proto::config_file::render(TITLE, &table, FIELD_DOCS, &[])
    }
}

/// The first line of the rendered configuration.
const TITLE: &str =
    "Meshblock SDS configuration: /etc/meshblock/sds.toml, or the file given with sds --config.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml_with_every_key_documented() {
        let text = SdsConfig::default_toml();
        let (cfg, unknown) = SdsConfig::parse(&text).expect("parse the defaults");
        assert_eq!(cfg, SdsConfig::default());
        assert!(unknown.is_empty());
        let table = toml::Table::try_from(SdsConfig::default()).expect("serialize");
        for key in table.keys() {
            assert!(
                FIELD_DOCS.iter().any(|(k, _)| k == key),
                "key {key} has no doc"
            );
        }
        assert_eq!(
            table.len(),
            FIELD_DOCS.len(),
            "a documented key no longer exists"
        );
    }

    #[test]
    fn defaults_match_the_checked_in_file() {
        let checked_in = include_str!("../../docs/config/sds.default.toml");
        assert_eq!(
            checked_in,
            SdsConfig::default_toml(),
            "docs/config/sds.default.toml is out of date: regenerate it with \
             `sds --print-default-config`"
        );
        let (file, unknown) = SdsConfig::parse(checked_in).expect("parse the checked-in file");
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(file, SdsConfig::default());
    }

    #[test]
    fn missing_keys_take_defaults_and_unknown_keys_are_reported() {
        let (cfg, unknown) =
            SdsConfig::parse("name = \"sds1\"\ndevices = [\"/dev/x\"]\nfuture_key = 3\n")
                .expect("parse");
        assert_eq!(cfg.name, "sds1");
        assert_eq!(cfg.listen, default_listen());
        assert_eq!(unknown, vec!["future_key".to_string()]);
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn validate_reports_every_problem() {
        let cfg = SdsConfig {
            mdm: vec!["not-an-ip".into()],
            map_poll_interval_ms: 0,
            ..Default::default()
        };
        let ConfigProblems(p) = cfg.validate().expect_err("invalid");
        assert_eq!(p.len(), 4, "{p:?}");
        let dup = SdsConfig {
            name: "a".into(),
            devices: vec!["/d".into(), "/d".into()],
            ..Default::default()
        };
        assert_eq!(dup.validate().expect_err("dup").0.len(), 1);
    }
}
