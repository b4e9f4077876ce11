//! `SdcConfig`: the SDC daemon's configuration (TOML). Unknown keys are warned about, not
//! refused, so a newer config still starts an older SDC.

use proto::transport::DataTransport;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SdcConfig {
    /// Name of this client host in the cluster (`scli --query_sdc`). Default: "" = the hostname.
    pub name: String,
    /// MDM addresses, `ip:port`. Default: ["127.0.0.1:7611"].
    pub mdm: Vec<String>,
    /// Directory with node.pem, node.key and ca.pem signed by the cluster CA.
    /// Default: /etc/meshblock/certs.
    pub cert_dir: PathBuf,
    /// Local state: the SDC's stable GUID. Default: /var/lib/meshblock/sdc.
    pub state_dir: PathBuf,
    /// Unix socket serving every mapped volume as an NBD export named after the volume.
    /// Default: /run/meshblock/nbd.sock.
    pub nbd_socket: PathBuf,
    /// Optional TCP address for NBD too (loopback or a trusted network only). Default: none.
    pub nbd_tcp: Option<SocketAddr>,
    /// HTTP address serving Prometheus metrics at /metrics. Default: 127.0.0.1:9613.
    pub metrics_listen: SocketAddr,
    /// How often the SDC asks the MDM for a newer cluster map, in milliseconds. Default: 500.
    pub map_poll_ms: u64,
    /// How long one block request may wait for a usable copy (retries included) before it
    /// fails with EIO, in milliseconds. Default: 30000.
    pub io_timeout_ms: u64,
    /// Transport to the SDS: "tcp" (TLS 1.3 over TCP) or "quic". Default: "tcp".
    pub data_transport: DataTransport,
    /// While the SDC runs, idle CPUs of this host use only idle states they wake from within
    /// this many microseconds (PM QoS through /dev/cpu_dma_latency, needs root); 0 keeps them
    /// polling, which cuts QD1 latency on VMs most; -1 leaves the host's idle policy alone
    /// (application hosts keep their power policy unless the operator asks). Default: -1.
    pub cpu_wake_latency_us: i64,
    /// Threads running the SDC's async work (NBD, the Docker plugin, requests to the SDS).
    /// 1 runs all of it on one thread, which costs the fewest thread wake-ups per request and
    /// was fastest on small hosts; 0 chooses one per 4 CPUs, at least one. Raise it when one
    /// SDC's CPU limits a busy client host. Default: 0.
    pub worker_threads: usize,
    /// The Docker volume plugin (`[docker]`).
    pub docker: DockerConfig,
}

/// The Docker volume plugin served by the SDC daemon.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DockerConfig {
    /// Serve the plugin. Default: false.
    pub enabled: bool,
    /// The plugin's unix socket. Docker finds legacy plugins by socket name in
    /// /run/docker/plugins: the driver's name is the file name without `.sock`.
    /// Default: /run/docker/plugins/meshblock.sock.
    pub socket: PathBuf,
    /// Volumes are mounted for containers at `<mount_root>/<volume>`.
    /// Default: /var/lib/meshblock/mounts.
    pub mount_root: PathBuf,
    /// MDM user the plugin logs in as: a user of role Configure made for it (`scli --add_user
    /// --username docker --user_role Configure --password_file FILE`). Default: "docker".
    pub username: String,
    /// File holding that user's password (one line). Default: /etc/meshblock/docker-password.
    pub password_file: PathBuf,
    /// Storage pool for volumes created without `--opt pool`. Default: "" = the only pool
    /// (of the protection domain, when one is given).
    pub default_pool: String,
    /// Protection domain for volumes created without `--opt protection_domain`.
    /// Default: "" = any.
    pub default_protection_domain: String,
    /// Size of volumes created without `--opt size`, bytes. Default: 8589934592 (8 GiB).
    pub default_size_bytes: u64,
    /// Filesystem made on volumes created without `--opt fstype` (ext4 or xfs). Default: ext4.
    pub default_fstype: String,
    /// How long Mount keeps asking to take over a volume still mapped to another host (whose
    /// session may still be expiring), milliseconds. Default: 15000.
    pub takeover_wait_ms: u64,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            enabled: false,
            socket: PathBuf::from("/run/docker/plugins/meshblock.sock"),
            mount_root: PathBuf::from("/var/lib/meshblock/mounts"),
            username: "docker".into(),
            password_file: PathBuf::from("/etc/meshblock/docker-password"),
            default_pool: String::new(),
            default_protection_domain: String::new(),
            default_size_bytes: 8 << 30,
            default_fstype: "ext4".into(),
            takeover_wait_ms: 15_000,
        }
    }
}

impl Default for SdcConfig {
    fn default() -> Self {
        SdcConfig {
            name: String::new(),
            mdm: vec!["127.0.0.1:7611".into()],
            cert_dir: PathBuf::from("/etc/meshblock/certs"),
            state_dir: PathBuf::from("/var/lib/meshblock/sdc"),
            nbd_socket: PathBuf::from("/run/meshblock/nbd.sock"),
            nbd_tcp: None,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9613)),
            map_poll_ms: 500,
            io_timeout_ms: 30_000,
            data_transport: DataTransport::default(),
            cpu_wake_latency_us: proto::daemon::CPU_WAKE_LATENCY_UNCHANGED,
            worker_threads: 0,
            docker: DockerConfig::default(),
        }
    }
}

/// The host's name, for an SDC configured without one.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "sdc".into())
}

impl SdcConfig {
    /// The configured name, or the hostname.
    pub fn effective_name(&self) -> String {
        if self.name.is_empty() {
            hostname()
        } else {
            self.name.clone()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut p = Vec::new();
        if self.mdm.is_empty() {
            p.push("mdm: give at least one MDM address".to_string());
        }
        for a in &self.mdm {
            if a.parse::<SocketAddr>().is_err() {
                p.push(format!("mdm: '{a}' is not IP:PORT"));
            }
        }
        if self.map_poll_ms == 0 {
            p.push("map_poll_ms must be > 0".into());
        }
        if self.io_timeout_ms == 0 {
            p.push("io_timeout_ms must be > 0".into());
        }
        if let Err(e) = proto::daemon::check_cpu_wake_latency(self.cpu_wake_latency_us) {
            p.push(e);
        }
        if let Err(e) = proto::daemon::check_worker_threads(self.worker_threads) {
            p.push(e);
        }
        let d = &self.docker;
        if !crate::docker::options::FSTYPES.contains(&d.default_fstype.as_str()) {
            p.push(format!(
                "docker.default_fstype: '{}' is not one of {}",
                d.default_fstype,
                crate::docker::options::FSTYPES.join(", ")
            ));
        }
        if d.default_size_bytes == 0 {
            p.push("docker.default_size_bytes must be > 0".into());
        }
        if d.enabled && d.socket.file_stem().is_none() {
            p.push(
                "docker.socket: give a socket path such as /run/docker/plugins/meshblock.sock"
                    .into(),
            );
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p.join("; "))
        }
    }

    pub fn parse(text: &str) -> Result<(SdcConfig, Vec<String>), toml::de::Error> {
        let cfg: SdcConfig = toml::from_str(text)?;
        let raw: toml::Table = toml::from_str(text)?;
        Ok((cfg, proto::config_file::unknown_keys(&raw, FIELD_DOCS)))
    }

    /// The defaults as commented TOML (what `sdc print-default-config` prints, and the file
    /// the package installs as /etc/meshblock/sdc.toml).
    pub fn default_toml() -> String {
        let table = toml::Table::try_from(SdcConfig::default()).unwrap_or_default();
        proto::config_file::render(TITLE, &table, FIELD_DOCS, UNSET_EXAMPLES)
    }
}

/// The first line of the rendered configuration.
const TITLE: &str =
    "Meshblock SDC configuration: /etc/meshblock/sdc.toml, or the file given with sdc --config.";

/// Every key with its documentation, in file order (the `[docker]` table last).
const FIELD_DOCS: &[(&str, &str)] = &[
    (
        "name",
        "Name of this client host in the cluster (scli --query_sdc); its certificate's common \
         name is `sdc:NAME`. Empty means the host name.",
    ),
    (
        "mdm",
        "MDM addresses, `ip:port`; any member will do, the leader is found from there.",
    ),
    (
        "cert_dir",
        "Directory with node.pem, node.key and ca.pem signed by the cluster CA.",
    ),
    (
        "state_dir",
        "Local state: the SDC's stable GUID, the attached volumes, the admin socket of sdc \
         attach|detach|list and the Docker plugin's mount references.",
    ),
    (
        "nbd_socket",
        "Unix socket serving every mapped volume as an NBD export named after the volume.",
    ),
    (
        "nbd_tcp",
        "A TCP address to serve NBD on too (loopback or a trusted network only: NBD has no \
         authentication). Unset: none.",
    ),
    (
        "metrics_listen",
        "HTTP address serving Prometheus metrics at GET /metrics.",
    ),
    (
        "map_poll_ms",
        "How often the SDC asks the MDM for a newer cluster map, in milliseconds.",
    ),
    (
        "io_timeout_ms",
        "How long one block request may wait for a usable copy (retries included) before it \
         fails with EIO, in milliseconds.",
    ),
    (
        "data_transport",
        "Transport to the SDS: \"tcp\" (TLS 1.3 over TCP) or \"quic\".",
    ),
    (
        "cpu_wake_latency_us",
        "While the SDC runs, idle CPUs of this host use only idle states they wake from within \
         this many microseconds (PM QoS through /dev/cpu_dma_latency, needs root); 0 keeps them \
         polling, which cuts QD1 latency on VMs most; -1 leaves the host's idle policy alone \
         (application hosts keep their power policy unless the operator asks).",
    ),
    (
        "worker_threads",
        "Threads running the SDC's async work (NBD, the Docker plugin, requests to the SDS). 1 \
         runs all of it on one thread, which costs the fewest thread wake-ups per request and \
         was fastest on small hosts; 0 chooses one per 4 CPUs, at least one. Raise it when one \
         SDC's CPU limits a busy client host.",
    ),
    (
        "docker",
        "The Docker volume plugin served by the SDC daemon.",
    ),
    ("docker.enabled", "Serve the plugin."),
    (
        "docker.socket",
        "The plugin's unix socket. Docker finds legacy plugins by socket name in \
         /run/docker/plugins: the driver's name is the file name without `.sock`.",
    ),
    (
        "docker.mount_root",
        "Volumes are mounted for containers at `<mount_root>/<volume>`.",
    ),
    (
        "docker.username",
        "MDM user the plugin logs in as (role Configure is all it needs).",
    ),
    (
        "docker.password_file",
        "File holding that user's password (its first line; keep it mode 0600).",
    ),
    (
        "docker.default_pool",
        "Storage pool for volumes created without `--opt pool`. Empty: the only pool (of the \
         protection domain, when one is given).",
    ),
    (
        "docker.default_protection_domain",
        "Protection domain for volumes created without `--opt protection_domain`. Empty: any.",
    ),
    (
        "docker.default_size_bytes",
        "Size of volumes created without `--opt size`, in bytes (8589934592: 8 GiB).",
    ),
    (
        "docker.default_fstype",
        "Filesystem made on volumes created without `--opt fstype`: ext4 or xfs.",
    ),
    (
        "docker.takeover_wait_ms",
        "How long Mount keeps asking to take over a volume still mapped to another host (whose \
         session may still be expiring), in milliseconds.",
    ),
];

/// Examples shown (commented out) for the keys unset by default.
const UNSET_EXAMPLES: &[(&str, &str)] = &[("nbd_tcp", "\"127.0.0.1:10809\"")];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_match_the_checked_in_file() {
        let table = toml::Table::try_from(SdcConfig::default()).expect("serialize");
        proto::config_file::check_documented(&table, FIELD_DOCS, UNSET_EXAMPLES)
            .expect("every key documented");
        let text = SdcConfig::default_toml();
        let (back, unknown) = SdcConfig::parse(&text).expect("parse");
        assert_eq!(back, SdcConfig::default());
        assert!(unknown.is_empty(), "{unknown:?}");
        let checked_in = include_str!("../../docs/config/sdc.default.toml");
        assert_eq!(
            checked_in, text,
            "docs/config/sdc.default.toml is out of date: regenerate it with \
             `sdc print-default-config`"
        );
        let (file, unknown) = SdcConfig::parse(checked_in).expect("parse the checked-in defaults");
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(
            file,
            SdcConfig::default(),
            "docs/config/sdc.default.toml is out of date"
        );
        let (_, unknown) =
            SdcConfig::parse("future = 1\n[docker]\nenabled = true\nknob = 2\n").expect("parse");
        assert_eq!(unknown, vec!["docker.knob", "future"]);
    }
}
