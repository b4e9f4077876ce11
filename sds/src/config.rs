//! `SdsConfig`: the SDS daemon's configuration (TOML). Unknown keys are warned about, not
//! refused; on-disk formats, in contrast, carry a version and are never guessed.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SdsConfig {
    /// The SDS's name, as given to `scli --add_sds --sds_name`. Default: "" = the hostname.
    pub name: String,
    /// QUIC address for data requests (from SDCs and other SDS). Default: 0.0.0.0:7072.
    pub listen: SocketAddr,
    /// MDM addresses, `ip:port`. Default: ["127.0.0.1:7611"].
    pub mdm: Vec<String>,
    /// Directory with node.pem, node.key and ca.pem signed by the cluster CA.
    /// Default: /etc/meshblock/certs.
    pub cert_dir: PathBuf,
    /// Devices (block devices or plain files) this SDS serves; the paths given to scli.
    /// Default: none.
    pub devices: Vec<PathBuf>,
    /// Use io_uring (true) or pread/pwrite threads (false). Default: true.
    pub io_uring: bool,
    /// HTTP address serving Prometheus metrics at /metrics. Default: 127.0.0.1:9072.
    pub metrics_listen: SocketAddr,
    /// How often the SDS reports to the MDM and asks for a newer map, in ms. Default: 500.
    pub map_poll_ms: u64,
}

impl Default for SdsConfig {
    fn default() -> Self {
        SdsConfig {
            name: String::new(),
            listen: SocketAddr::from(([0, 0, 0, 0], 7072)),
            mdm: vec!["127.0.0.1:7611".into()],
            cert_dir: PathBuf::from("/etc/meshblock/certs"),
            devices: Vec::new(),
            io_uring: true,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9072)),
            map_poll_ms: 500,
        }
    }
}

impl SdsConfig {
    pub fn validate(&self) -> Result<(), String> {
        let mut p = Vec::new();
        if self.devices.is_empty() {
            p.push("devices: give at least one device (--device PATH)".to_string());
        }
        if self.devices.len() > 1 {
            p.push("devices: this version serves one device per SDS process".to_string());
        }
        if self.mdm.iter().any(|a| a.parse::<SocketAddr>().is_err()) || self.mdm.is_empty() {
            p.push("mdm: give MDM addresses as IP:PORT".to_string());
        }
        if self.map_poll_ms == 0 {
            p.push("map_poll_ms must be > 0".to_string());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p.join("; "))
        }
    }

    pub fn parse(text: &str) -> Result<(SdsConfig, Vec<String>), toml::de::Error> {
        let cfg: SdsConfig = toml::from_str(text)?;
        let raw: toml::Table = toml::from_str(text)?;
        let known = [
            "name",
            "listen",
            "mdm",
            "cert_dir",
            "devices",
            "io_uring",
            "metrics_listen",
            "map_poll_ms",
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
        let text = toml::to_string(&SdsConfig::default()).expect("serialize");
        let (back, unknown) = SdsConfig::parse(&text).expect("parse");
        assert_eq!(back, SdsConfig::default());
        assert!(unknown.is_empty(), "{unknown:?}");
        let (file, unknown) = SdsConfig::parse(include_str!("../../docs/config/sds.default.toml"))
            .expect("parse the checked-in defaults");
        assert!(unknown.is_empty(), "{unknown:?}");
        assert_eq!(
            file,
            SdsConfig::default(),
            "docs/config/sds.default.toml is out of date"
        );
    }
}
