//! `MdmConfig`: the MDM daemon's configuration file (TOML). Every field has a default; unknown
//! keys are reported as warnings, not errors, so a config written for a newer version still
//! starts an older one (rollbacks).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Default QUIC port of an MDM.
pub const DEFAULT_PORT: u16 = 7611;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct MdmConfig {
    /// Name of this MDM as `scli --query_cluster` shows it. Default: "mdm".
    pub name: String,
    /// QUIC address to listen on for scli, SDS, SDC and the other MDMs. Default: 0.0.0.0:7611.
    pub listen: SocketAddr,
    /// Address the other processes reach this MDM at. Default: `listen`, or 127.0.0.1 with its
    /// port when `listen` is a wildcard.
    pub advertise: Option<SocketAddr>,
    /// Directory of the Raft log, hard state and snapshots (sled). Default: /var/lib/meshblock/mdm.
    pub data_dir: PathBuf,
    /// Directory with node.pem, node.key and ca.pem signed by the cluster CA.
    /// Default: /etc/meshblock/certs.
    pub cert_dir: PathBuf,
    /// HTTP address serving Prometheus metrics at /metrics. Default: 127.0.0.1:9611.
    pub metrics_listen: SocketAddr,
    /// Raft tick, in milliseconds. Default: 100.
    pub tick_ms: u64,
    /// Ticks without a leader before a follower campaigns (randomised up to twice this). Default: 10.
    pub election_ticks: usize,
    /// Ticks between leader heartbeats. Default: 2.
    pub heartbeat_ticks: usize,
    /// Applied entries between log compactions into a snapshot. Default: 1000.
    pub snapshot_interval_entries: u64,
    /// Lifetime of an scli session token, in seconds. Default: 28800 (8 hours).
    pub session_ttl_secs: u64,
    /// Name of the cluster, set when it is created. Default: "meshblock".
    pub cluster_name: String,
    /// An SDS the leader has not heard from (hello) for this long is declared down and its PGs
    /// fail over to their other copy. The leader grants SDS leases of 4/5 of this (sent with
    /// each answer to a hello), so an SDS that may be declared down has stopped serving before.
    /// Default: 1500.
    pub sds_down_timeout_ms: u64,
    /// An SDC that has not polled the leader for this long has lost its session: a volume
    /// mapped to it may be taken over by another host (`map_volume_to_sdc` with takeover, the
    /// Docker driver's Mount). SDCs poll every 500 ms. Default: 4000.
    pub sdc_session_timeout_ms: u64,
    /// An SDS declared down that returns within this long, in milliseconds, is refilled by
    /// backward rebuild (only the chunks written while it was away) in the PGs it was dropped
    /// from; later it is treated as new capacity. Default: 300000 (5 minutes).
    pub backward_rebuild_window_ms: u64,
    /// TCP address of the HTTPS REST API and web dashboard, or "off". Default: 0.0.0.0:8443.
    pub api_listen: String,
    /// The URL other MDMs send browsers and API clients to when this MDM leads. Default:
    /// `https://` with the advertise address's IP and `api_listen`'s port.
    pub api_url: Option<String>,
    /// Directory with node.pem and node.key for HTTPS. Default: `cert_dir` (the MDM's
    /// certificate from the cluster CA, named "meshblock").
    pub api_cert_dir: Option<PathBuf>,
    /// Seconds between the leader's samples of I/O rates for the dashboard (an hour of them is
    /// kept). Default: 10.
    pub history_sample_secs: u64,
}

impl Default for MdmConfig {
    fn default() -> Self {
        MdmConfig {
            name: "mdm".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            advertise: None,
            data_dir: PathBuf::from("/var/lib/meshblock/mdm"),
            cert_dir: PathBuf::from("/etc/meshblock/certs"),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9611)),
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval_entries: 1000,
            session_ttl_secs: 8 * 3600,
            cluster_name: "meshblock".into(),
            sds_down_timeout_ms: 1500,
            sdc_session_timeout_ms: 4000,
            backward_rebuild_window_ms: 300_000,
            api_listen: "0.0.0.0:8443".into(),
            api_url: None,
            api_cert_dir: None,
            history_sample_secs: 10,
        }
    }
}

impl MdmConfig {
    /// The address other processes dial.
    pub fn advertise_addr(&self) -> SocketAddr {
        match self.advertise {
            Some(a) => a,
            None if self.listen.ip().is_unspecified() => {
                SocketAddr::from(([127, 0, 0, 1], self.listen.port()))
            }
            None => self.listen,
        }
    }

    /// The REST API's address; `None` when it is "off".
    pub fn api_addr(&self) -> Result<Option<SocketAddr>, String> {
        if self.api_listen == "off" {
            return Ok(None);
        }
        self.api_listen.parse().map(Some).map_err(|_| {
            format!(
                "api_listen must be an address such as 0.0.0.0:8443, or \"off\"; got {:?}",
                self.api_listen
            )
        })
    }

    /// The URL of this MDM's REST API and dashboard, when it serves them.
    pub fn api_url(&self) -> Option<String> {
        let addr = self.api_addr().ok()??;
        Some(self.api_url.clone().unwrap_or_else(|| {
            let ip = if addr.ip().is_unspecified() {
                self.advertise_addr().ip()
            } else {
                addr.ip()
            };
            format!("https://{}", SocketAddr::new(ip, addr.port()))
        }))
    }

    /// Every problem at once.
    pub fn validate(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.tick_ms == 0 {
            problems.push("tick_ms must be > 0".to_string());
        }
        if self.election_ticks <= self.heartbeat_ticks {
            problems.push("election_ticks must be larger than heartbeat_ticks".to_string());
        }
        if self.snapshot_interval_entries == 0 {
            problems.push("snapshot_interval_entries must be > 0".to_string());
        }
        if self.session_ttl_secs == 0 {
            problems.push("session_ttl_secs must be > 0".to_string());
        }
        if self.sds_down_timeout_ms < 200 {
            problems.push("sds_down_timeout_ms must be at least 200".to_string());
        }
        if self.sdc_session_timeout_ms < 1000 {
            problems.push(
                "sdc_session_timeout_ms must be at least 1000 (SDCs poll every 500 ms)".to_string(),
            );
        }
        if let Err(e) = self.api_addr() {
            problems.push(e);
        }
        if self.history_sample_secs == 0 || self.history_sample_secs > 600 {
            problems.push("history_sample_secs must be between 1 and 600".to_string());
        }
        if let Some(u) = &self.api_url {
            if !u.starts_with("https://") {
                problems.push(format!("api_url must start with https://; got {u:?}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Parse a TOML file; unknown keys are returned for the caller to warn about.
    pub fn parse(text: &str) -> Result<(MdmConfig, Vec<String>), toml::de::Error> {
        let cfg: MdmConfig = toml::from_str(text)?;
        let raw: toml::Table = toml::from_str(text)?;
        Ok((cfg, proto::config_file::unknown_keys(&raw, FIELD_DOCS)))
    }

    /// The defaults as commented TOML (what `mdm print-default-config` prints, and the file
    /// the package installs as /etc/meshblock/mdm.toml).
    pub fn default_toml() -> String {
        let table = toml::Table::try_from(MdmConfig::default()).unwrap_or_default();
        proto::config_file::render(TITLE, &table, FIELD_DOCS, UNSET_EXAMPLES)
    }
}

/// The first line of the rendered configuration.
const TITLE: &str =
    "Meshblock MDM configuration: /etc/meshblock/mdm.toml, or the file given with mdm --config.";

/// Every key with its documentation, in file order.
const FIELD_DOCS: &[(&str, &str)] = &[
    (
        "name",
        "Name of this MDM, as `scli --query_cluster` shows it and as given to `scli \
         --add_standby_mdm --mdm_name`.",
    ),
    (
        "listen",
        "QUIC (UDP) address to listen on for scli, SDS, SDC and the other MDMs.",
    ),
    (
        "advertise",
        "Address the other processes reach this MDM at. Unset: `listen`, or 127.0.0.1 with its \
         port when `listen` is a wildcard (0.0.0.0), which only suits a one-host lab: set it on \
         every MDM of a real cluster.",
    ),
    (
        "data_dir",
        "Directory of the Raft log, hard state and snapshots (sled), made by `mdm bootstrap` on \
         the first MDM and by the first start on the others.",
    ),
    (
        "cert_dir",
        "Directory with node.pem, node.key and ca.pem signed by the cluster CA (certificate \
         name mdm or mdm:NAME).",
    ),
    (
        "metrics_listen",
        "HTTP address serving Prometheus metrics at GET /metrics.",
    ),
    ("tick_ms", "Raft tick, in milliseconds."),
    (
        "election_ticks",
        "Ticks without a leader before a follower campaigns (randomised up to twice this).",
    ),
    ("heartbeat_ticks", "Ticks between leader heartbeats."),
    (
        "snapshot_interval_entries",
        "Applied entries between log compactions into a snapshot.",
    ),
    (
        "session_ttl_secs",
        "Lifetime of an scli session token, in seconds (28800: 8 hours).",
    ),
    (
        "cluster_name",
        "Name of the cluster, set when it is created (mdm bootstrap).",
    ),
    (
        "sds_down_timeout_ms",
        "An SDS the leader has not heard from (hello) for this long, in milliseconds, is \
         declared down and its PGs fail over to their other copy. The leader grants SDS leases \
         of 4/5 of this, so an SDS that may be declared down has stopped serving before.",
    ),
    (
        "sdc_session_timeout_ms",
        "An SDC that has not polled the leader for this long, in milliseconds, has lost its \
         session: a volume mapped to it may be taken over by another host (map_volume_to_sdc \
         with takeover, the Docker driver's Mount). SDCs poll every 500 ms.",
    ),
    (
        "backward_rebuild_window_ms",
        "An SDS declared down that returns within this long, in milliseconds, is refilled by \
         backward rebuild (only the chunks written while it was away) in the PGs it was \
         dropped from; later it is treated as new capacity (300000: 5 minutes).",
    ),
    (
        "api_listen",
        "TCP address of the HTTPS REST API and web dashboard (log in with scli's users), or \
         \"off\". Any MDM redirects to the leader's.",
    ),
    (
        "api_url",
        "The URL other MDMs redirect browsers and API clients to when this MDM leads. Unset: \
         https:// with the advertise address's IP and api_listen's port.",
    ),
    (
        "api_cert_dir",
        "Directory with node.pem and node.key served over HTTPS. Unset: cert_dir, whose \
         certificate (from the cluster CA) carries the name \"meshblock\": clients trust ca.pem \
         and connect to that name (curl --cacert ca.pem --connect-to meshblock:8443:HOST:8443), \
         or give here a certificate issued for the hosts' names.",
    ),
    (
        "history_sample_secs",
        "Seconds between the leader's samples of I/O rates per pool, SDS and volume for the \
         dashboard's plots; an hour of samples is kept.",
    ),
];

/// Examples shown (commented out) for the keys unset by default.
const UNSET_EXAMPLES: &[(&str, &str)] = &[
    ("advertise", "\"10.0.0.1:7611\""),
    ("api_url", "\"https://mdm1.example.com:8443\""),
    ("api_cert_dir", "\"/etc/meshblock/api-certs\""),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_match_the_checked_in_file() {
        let table = toml::Table::try_from(MdmConfig::default()).expect("serialize");
        proto::config_file::check_documented(&table, FIELD_DOCS, UNSET_EXAMPLES)
            .expect("every key documented");
        let text = MdmConfig::default_toml();
        let (back, unknown) = MdmConfig::parse(&text).expect("parse");
        assert_eq!(back, MdmConfig::default());
        assert!(unknown.is_empty());
        let checked_in = include_str!("../../docs/config/mdm.default.toml");
        assert_eq!(
            checked_in, text,
            "docs/config/mdm.default.toml is out of date: regenerate it with \
             `mdm print-default-config`"
        );
        let (file, unknown) =
            MdmConfig::parse(checked_in).expect("parse docs/config/mdm.default.toml");
        assert!(unknown.is_empty(), "unknown keys {unknown:?}");
        assert_eq!(
            file,
            MdmConfig::default(),
            "docs/config/mdm.default.toml is out of date"
        );
    }

    #[test]
    fn unknown_keys_are_reported() {
        let (_, unknown) = MdmConfig::parse("name = \"x\"\nfuture_knob = 3\n").expect("parse");
        assert_eq!(unknown, vec!["future_knob".to_string()]);
    }
}
