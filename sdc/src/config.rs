//! `SdcConfig`: the SDC daemon's configuration (TOML). Unknown keys are warned about, not
//! refused, so a newer config still starts an older SDC.

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
        if p.is_empty() {
            Ok(())
        } else {
            Err(p.join("; "))
        }
    }

    pub fn parse(text: &str) -> Result<(SdcConfig, Vec<String>), toml::de::Error> {
        let cfg: SdcConfig = toml::from_str(text)?;
        let raw: toml::Table = toml::from_str(text)?;
        let known = [
            "name",
            "mdm",
            "cert_dir",
            "state_dir",
            "nbd_socket",
            "nbd_tcp",
            "metrics_listen",
            "map_poll_ms",
            "io_timeout_ms",
        ];
        Ok((
            cfg,
            raw.keys()
                .filter(|k| !known.contains(&k.as_str()))
                .cloned()
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_match_the_checked_in_file() {
        let text = toml::to_string(&SdcConfig::default()).expect("serialize");
        let (back, unknown) = SdcConfig::parse(&text).expect("parse");
        assert_eq!(back, SdcConfig::default());
        assert!(unknown.is_empty(), "{unknown:?}");
        let (file, unknown) = SdcConfig::parse(include_str!("../../docs/config/sdc.default.toml"))
            .expect("parse the checked-in defaults");
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(
            file,
            SdcConfig::default(),
            "docs/config/sdc.default.toml is out of date"
        );
    }
}
