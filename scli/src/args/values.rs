//! Option values: required names, numbers, sizes, the SDC selector, devices and labels.

use super::Args;
use anyhow::{anyhow, bail};
use proto::msg::{NewDevice, SdcSelector};

pub(super) fn need<'a>(v: &'a Option<String>, flag: &str) -> anyhow::Result<&'a str> {
    match v.as_deref() {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => bail!("missing {flag}"),
    }
}

pub(super) fn parse_u64(v: &str, flag: &str) -> anyhow::Result<u64> {
    v.trim()
        .parse()
        .map_err(|_| anyhow!("{flag} must be a whole number, got '{v}'"))
}

/// GB (GiB) given as a decimal number, in bytes; must be positive.
pub fn parse_gb(v: &str, flag: &str) -> anyhow::Result<u64> {
    let g: f64 = v
        .trim()
        .parse()
        .map_err(|_| anyhow!("{flag} must be a number of GB, got '{v}'"))?;
    if !g.is_finite() || g <= 0.0 || g > (1u64 << 20) as f64 {
        bail!("{flag} must be more than 0 and at most 1048576 GB, got '{v}'");
    }
    Ok((g * (1u64 << 30) as f64).ceil() as u64)
}

impl Args {
    pub(super) fn sdc(&self) -> anyhow::Result<Option<SdcSelector>> {
        let given: Vec<SdcSelector> = [
            self.sdc_name.clone().map(SdcSelector::Name),
            self.sdc_ip.clone().map(SdcSelector::Ip),
            self.sdc_guid.clone().map(SdcSelector::Guid),
        ]
        .into_iter()
        .flatten()
        .collect();
        if given.len() > 1 {
            bail!("give only one of --sdc_name, --sdc_ip, --sdc_guid");
        }
        Ok(given.into_iter().next())
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

    pub(super) fn need_sdc(&self) -> anyhow::Result<SdcSelector> {
        self.sdc()?
            .ok_or_else(|| anyhow!("missing --sdc_name, --sdc_ip or --sdc_guid"))
    }

    pub(super) fn devices(&self, pool: &str) -> anyhow::Result<Vec<NewDevice>> {
        let paths: Vec<&str> = need(&self.device_path, "--device_path")?
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let caps: Vec<Option<u64>> = match &self.device_capacity_gb {
            None => vec![None; paths.len()],
            Some(c) => {
                let v: Vec<Option<u64>> = c
                    .split(',')
                    .map(|g| parse_gb(g, "--device_capacity_gb").map(Some))
                    .collect::<Result<_, _>>()?;
                if v.len() != paths.len() {
                    bail!("--device_capacity_gb needs one value per --device_path ({} paths, {} capacities)", paths.len(), v.len());
                }
                v
            }
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
