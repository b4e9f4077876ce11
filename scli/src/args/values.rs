//! Option values: clap's value parsers (sizes, ids, roles, modes, on/off), required names, the
//! SDC selector, devices and labels.

use super::Args;
use anyhow::{anyhow, bail};
use proto::model::{ClusterMode, Role};
use proto::msg::{NewDevice, SdcSelector};

pub(super) fn need<'a>(v: &'a Option<String>, flag: &str) -> anyhow::Result<&'a str> {
    match v.as_deref() {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => bail!("missing {flag}"),
    }
}

/// clap's parser of a size in GB (GiB, decimal allowed): bytes, rounded up; must be positive.
pub(super) fn parse_gb_arg(v: &str) -> Result<u64, String> {
    let g: f64 = v
        .trim()
        .parse()
        .map_err(|_| format!("must be a number of GB, got '{v}'"))?;
    if !g.is_finite() || g <= 0.0 || g > (1u64 << 20) as f64 {
        return Err(format!(
            "must be more than 0 and at most 1048576 GB, got '{v}'"
        ));
    }
    Ok((g * (1u64 << 30) as f64).ceil() as u64)
}

/// clap's parser of an object id as scli prints it: hexadecimal, `0x` optional.
pub(super) fn parse_id(v: &str) -> Result<u64, String> {
    let hex = v.trim();
    let hex = hex
        .strip_prefix("0x")
        .or_else(|| hex.strip_prefix("0X"))
        .unwrap_or(hex);
    if hex.is_empty() || hex.len() > 16 {
        return Err(format!(
            "'{v}' is not an id: ids are up to 16 hex digits, as scli prints them"
        ));
    }
    u64::from_str_radix(hex, 16)
        .map_err(|_| format!("'{v}' is not an id: ids are hex digits, as scli prints them"))
}

/// clap's parser of a daemon's address: `IP:PORT`.
pub(super) fn parse_addr(v: &str) -> Result<String, String> {
    v.parse::<std::net::SocketAddr>()
        .map(|_| v.to_string())
        .map_err(|_| format!("'{v}' is not IP:PORT"))
}

pub(super) fn parse_role(v: &str) -> Result<Role, String> {
    Role::parse(v).ok_or_else(|| format!("'{v}': use Monitor, Configure or Administrator"))
}

pub(super) fn parse_cluster_mode(v: &str) -> Result<ClusterMode, String> {
    ClusterMode::parse(v).ok_or_else(|| format!("'{v}': use 1_node, 3_node or 5_node"))
}

pub(super) fn parse_adaptive(v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("'{v}': use on or off")),
    }
}

impl Args {
    /// The SDC given, if any (clap lets at most one selector through).
    pub(super) fn sdc(&self) -> Option<SdcSelector> {
        [
            self.sdc_name.clone().map(SdcSelector::Name),
            self.sdc_ip.clone().map(SdcSelector::Ip),
            self.sdc_guid.clone().map(SdcSelector::Guid),
            self.sdc_id.map(|i| SdcSelector::Id(proto::SdcId(i))),
        ]
        .into_iter()
        .flatten()
        .next()
    }

    pub(super) fn need_sdc(&self) -> anyhow::Result<SdcSelector> {
        self.sdc()
            .ok_or_else(|| anyhow!("missing --sdc_name, --sdc_ip, --sdc_guid or --sdc_id"))
    }

    pub(super) fn parse_labels(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let mut out = std::collections::BTreeMap::new();
        for l in &self.labels {
            let Some((k, v)) = l.split_once('=') else {
                bail!("--label {l}: give KEY=VALUE");
            };
            if k == proto::model::LABEL_CREATED_BY || proto::docker::is_name_label(k) {
                bail!(
                    "--label {k}: this label is reserved for the Docker driver, which marks the \
                     volumes its Create makes with it (Docker removes only those); create the \
                     volume with `docker volume create` to hand it to Docker"
                );
            }
            if out.insert(k.to_string(), v.to_string()).is_some() {
                bail!("--label {k} given twice");
            }
        }
        Ok(out)
    }

    pub(super) fn devices(&self, pool: &str) -> anyhow::Result<Vec<NewDevice>> {
        let paths: Vec<&str> = need(&self.device_path, "--device_path")?
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let caps: Vec<Option<u64>> = if self.device_capacity_gb.is_empty() {
            vec![None; paths.len()]
        } else {
            if self.device_capacity_gb.len() != paths.len() {
                bail!(
                    "--device_capacity_gb needs one value per --device_path ({} paths, {} capacities)",
                    paths.len(),
                    self.device_capacity_gb.len()
                );
            }
            self.device_capacity_gb.iter().copied().map(Some).collect()
        };
        Ok(paths
            .iter()
            .zip(caps)
            .map(|(p, c)| NewDevice {
                path: p.to_string(),
                pool: pool.to_string(),
                capacity_bytes: c,
            })
            .collect())
    }
}
