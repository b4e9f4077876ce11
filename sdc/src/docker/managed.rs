//! The SDC as Docker's managed (v2) plugin (`sdc plugin`, the entrypoint of
//! `packaging/docker-plugin/config.json`): its configuration comes from the environment Docker
//! passes (`docker plugin set NAME KEY=VALUE`), its paths are fixed inside the plugin's rootfs.
//! Pure: turns the settings into an [`SdcConfig`] or says which setting is wrong and how to set
//! it. Keep [`SETTINGS`] and the `Env` list of config.json the same (a test checks).

use crate::config::{DockerConfig, SdcConfig};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The socket Docker looks for inside the plugin (config.json `Interface.Socket`).
pub const SOCKET: &str = "/run/docker/plugins/meshblock.sock";
/// config.json `PropagatedMount`: volumes are mounted here, and Docker sees them.
pub const MOUNT_ROOT: &str = "/var/lib/meshblock/mounts";
/// The SDC's state in the plugin's rootfs (kept across disable/enable and dockerd restarts).
pub const STATE_DIR: &str = "/var/lib/meshblock/sdc";
/// The `certs` mount's destination.
pub const CERT_DIR: &str = "/etc/meshblock/certs";
/// The `password` mount's destination.
pub const PASSWORD_FILE: &str = "/etc/meshblock/docker-password";

/// Every setting the plugin reads, with its default (config.json's `Env`).
pub const SETTINGS: &[(&str, &str)] = &[
    ("MDM", ""),
    ("SDC_NAME", ""),
    ("USER", "docker"),
    ("DEFAULT_POOL", ""),
    ("DEFAULT_PROTECTION_DOMAIN", ""),
    ("DEFAULT_SIZE", "8GiB"),
    ("FSTYPE", "ext4"),
    ("TAKEOVER_WAIT_MS", "15000"),
    ("IO_TIMEOUT_MS", "30000"),
    ("DATA_TRANSPORT", "tcp"),
    ("METRICS_LISTEN", "127.0.0.1:9613"),
    ("NBD_TCP", ""),
    ("RUST_LOG", "info"),
];

fn fix(key: &str, what: String) -> String {
    format!("{what}; fix it with `docker plugin disable PLUGIN; docker plugin set PLUGIN {key}=...; docker plugin enable PLUGIN`")
}

/// The SDC configuration the settings in `env` give (unset keys take their defaults), or
/// every problem found, each saying how to fix it.
pub fn config(env: &BTreeMap<String, String>) -> Result<SdcConfig, String> {
    let get = |k: &str| -> String {
        env.get(k).cloned().unwrap_or_else(|| {
            SETTINGS
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, d)| d.to_string())
                .unwrap_or_default()
        })
    };
    let mut problems = Vec::new();
    let mut cfg = SdcConfig {
        name: get("SDC_NAME").trim().to_string(),
        cert_dir: PathBuf::from(CERT_DIR),
        state_dir: PathBuf::from(STATE_DIR),
        nbd_socket: PathBuf::from(STATE_DIR).join("nbd.sock"),
        docker: DockerConfig {
            enabled: true,
            socket: PathBuf::from(SOCKET),
            mount_root: PathBuf::from(MOUNT_ROOT),
            username: get("USER").trim().to_string(),
            password_file: PathBuf::from(PASSWORD_FILE),
            default_pool: get("DEFAULT_POOL").trim().to_string(),
            default_protection_domain: get("DEFAULT_PROTECTION_DOMAIN").trim().to_string(),
            default_fstype: get("FSTYPE").trim().to_string(),
            ..DockerConfig::default()
        },
        ..SdcConfig::default()
    };
    let mdm = get("MDM");
    cfg.mdm = mdm
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if cfg.mdm.is_empty() {
        problems.push(fix(
            "MDM",
            "MDM is not set: give the MDM addresses, IP:PORT[,IP:PORT...]".into(),
        ));
    }
    for a in &cfg.mdm {
        if a.parse::<std::net::SocketAddr>().is_err() {
            problems.push(fix("MDM", format!("MDM: '{a}' is not IP:PORT")));
        }
    }
    if !crate::docker::options::FSTYPES.contains(&cfg.docker.default_fstype.as_str()) {
        problems.push(fix(
            "FSTYPE",
            format!(
                "FSTYPE='{}' is not one of {}",
                cfg.docker.default_fstype,
                crate::docker::options::FSTYPES.join(", ")
            ),
        ));
    }
    if cfg.docker.username.is_empty() {
        problems.push(fix(
            "USER",
            "USER is empty: give the MDM user of role Configure made for the plugin".into(),
        ));
    }
    match crate::docker::options::parse_size(get("DEFAULT_SIZE").trim()) {
        Ok(n) => cfg.docker.default_size_bytes = n,
        Err(e) => problems.push(fix("DEFAULT_SIZE", format!("DEFAULT_SIZE: {e}"))),
    }
    let millis = |k: &str, problems: &mut Vec<String>| -> Option<u64> {
        match get(k).trim().parse::<u64>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                problems.push(fix(
                    k,
                    format!("{k}='{}' is not a positive number of milliseconds", get(k)),
                ));
                None
            }
        }
    };
    if let Some(n) = millis("TAKEOVER_WAIT_MS", &mut problems) {
        cfg.docker.takeover_wait_ms = n;
    }
    if let Some(n) = millis("IO_TIMEOUT_MS", &mut problems) {
        cfg.io_timeout_ms = n;
    }
    match get("DATA_TRANSPORT").trim() {
        "tcp" | "" => cfg.data_transport = proto::transport::DataTransport::Tcp,
        "quic" => cfg.data_transport = proto::transport::DataTransport::Quic,
        other => problems.push(fix(
            "DATA_TRANSPORT",
            format!("DATA_TRANSPORT='{other}' is not tcp or quic"),
        )),
    }
    match get("METRICS_LISTEN").trim().parse() {
        Ok(a) => cfg.metrics_listen = a,
        Err(_) => problems.push(fix(
            "METRICS_LISTEN",
            format!("METRICS_LISTEN='{}' is not IP:PORT", get("METRICS_LISTEN")),
        )),
    }
    let nbd = get("NBD_TCP");
    if !nbd.trim().is_empty() {
        match nbd.trim().parse() {
            Ok(a) => cfg.nbd_tcp = Some(a),
            Err(_) => problems.push(fix("NBD_TCP", format!("NBD_TCP='{nbd}' is not IP:PORT"))),
        }
    }
    if problems.is_empty() {
        // Whatever the checks above missed, in the configuration's own terms.
        if let Err(e) = cfg.validate() {
            problems.push(format!(
                "{e}; fix the plugin's settings with `docker plugin set`"
            ));
        }
    }
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn settings_become_the_configuration() {
        let cfg = config(&env(&[
            ("MDM", "10.0.0.1:7611, 10.0.0.2:7611"),
            ("SDC_NAME", "node1"),
            ("DEFAULT_POOL", "pool1"),
            ("DEFAULT_SIZE", "1GiB"),
            ("FSTYPE", "xfs"),
            ("TAKEOVER_WAIT_MS", "2000"),
            ("NBD_TCP", "127.0.0.1:10809"),
        ]))
        .expect("valid");
        assert_eq!(cfg.mdm, vec!["10.0.0.1:7611", "10.0.0.2:7611"]);
        assert_eq!(cfg.name, "node1");
        assert_eq!(cfg.docker.default_pool, "pool1");
        assert_eq!(cfg.docker.default_size_bytes, 1 << 30);
        assert_eq!(cfg.docker.default_fstype, "xfs");
        assert_eq!(cfg.docker.takeover_wait_ms, 2000);
        assert_eq!(cfg.docker.username, "docker");
        assert!(cfg.docker.enabled);
        assert_eq!(cfg.docker.socket, PathBuf::from(SOCKET));
        assert_eq!(cfg.docker.mount_root, PathBuf::from(MOUNT_ROOT));
        assert_eq!(cfg.cert_dir, PathBuf::from(CERT_DIR));
        assert_eq!(cfg.nbd_tcp, Some("127.0.0.1:10809".parse().expect("addr")));
    }

    #[test]
    fn wrong_settings_are_all_named_with_the_fix() {
        let e = config(&env(&[
            ("MDM", ""),
            ("FSTYPE", "ntfs"),
            ("DEFAULT_SIZE", "big"),
            ("TAKEOVER_WAIT_MS", "-1"),
            ("DATA_TRANSPORT", "udp"),
        ]))
        .expect_err("invalid");
        for needle in [
            "MDM is not set",
            "DEFAULT_SIZE",
            "TAKEOVER_WAIT_MS",
            "DATA_TRANSPORT='udp'",
            "docker plugin set PLUGIN MDM=",
        ] {
            assert!(e.contains(needle), "{needle} missing in: {e}");
        }
        let e = config(&env(&[("MDM", "10.0.0.1:7611"), ("FSTYPE", "ntfs")])).expect_err("fstype");
        assert!(
            e.contains("FSTYPE='ntfs'") && e.contains("PLUGIN FSTYPE="),
            "{e}"
        );
        let e = config(&env(&[("MDM", "mdm.example")])).expect_err("not ip:port");
        assert!(e.contains("not IP:PORT"), "{e}");
    }

    #[test]
    fn the_settings_match_config_json() {
        let text = include_str!("../../../packaging/docker-plugin/config.json");
        let j: serde_json::Value = serde_json::from_str(text).expect("config.json is JSON");
        let env: Vec<(String, String)> = j["Env"]
            .as_array()
            .expect("Env")
            .iter()
            .map(|e| {
                (
                    e["Name"].as_str().unwrap_or_default().to_string(),
                    e["Value"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let ours: Vec<(String, String)> = SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(env, ours);
        assert_eq!(j["PropagatedMount"], MOUNT_ROOT);
        assert_eq!(
            format!(
                "/run/docker/plugins/{}",
                j["Interface"]["Socket"].as_str().unwrap_or("")
            ),
            SOCKET
        );
        let dest = |name: &str| {
            j["Mounts"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["Name"] == name))
                .map(|m| m["Destination"].as_str().unwrap_or("").to_string())
        };
        assert_eq!(dest("certs").as_deref(), Some(CERT_DIR));
        assert_eq!(dest("password").as_deref(), Some(PASSWORD_FILE));
    }
}
