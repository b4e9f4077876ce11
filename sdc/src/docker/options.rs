//! `docker volume create --opt KEY=VALUE` options: parsed and validated all at once (pure), so
//! a bad option is refused before anything is created. Also the labels the options become on
//! the volume, so every host can read them back and Create can check compatibility.

use std::collections::{BTreeMap, HashMap};

/// Filesystems the driver can make.
pub const FSTYPES: [&str; 2] = ["ext4", "xfs"];
/// Label keys on a Meshblock volume made by the driver ([`LABEL_CREATED_BY`] marks it as
/// Docker's; reserved, see `proto::model`).
pub use proto::model::{CREATED_BY_DOCKER, LABEL_CREATED_BY};
pub const LABEL_FSTYPE: &str = "fstype";
pub const LABEL_IOPS: &str = "iops_limit";
pub const LABEL_BANDWIDTH: &str = "bandwidth_limit_kbps";
/// Smallest IOPS limit accepted (as ScaleIO: lower makes a volume unusable).
pub const IOPS_LIMIT_MIN: u64 = 10;
/// Smallest bandwidth limit accepted, KiB/s.
pub const BANDWIDTH_LIMIT_MIN_KBPS: u64 = 1024;

/// What the options ask for; `None` means "not given" (defaults apply at creation, and an
/// existing volume is compatible whatever it has there).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreateSpec {
    pub size_bytes: Option<u64>,
    pub pool: Option<String>,
    pub protection_domain: Option<String>,
    pub thin: Option<bool>,
    pub fstype: Option<String>,
    pub iops_limit: Option<u64>,
    pub bandwidth_limit_kbps: Option<u64>,
    pub preempt: Option<bool>,
    /// The Docker volume to snapshot (`snapshot_of`, or REX-Ray's `snapshotName` /
    /// `volumeName`): the new volume starts as its content at this instant, with its size,
    /// pool and filesystem.
    pub snapshot_of: Option<String>,
}

/// Parses a size: a number of bytes or a number with a unit (`500MiB`, `8GiB`, `1TiB`; `KB`,
/// `MB`, `GB`, `TB` and the one-letter forms `M`, `G` are binary too, as with ScaleIO).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "unknown size unit in {s:?}: use bytes or KiB, MiB, GiB, TiB (e.g. 8GiB)"
            ))
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: write it like 8GiB or 500MiB"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "" | "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(format!("option {key}={v:?}: use true or false")),
    }
}

fn parse_count(key: &str, v: &str, min: u64) -> Result<u64, String> {
    let n: u64 = v
        .trim()
        .parse()
        .map_err(|_| format!("option {key}={v:?}: give a whole number"))?;
    if n != 0 && n < min {
        return Err(format!(
            "option {key}={n} is too low: the minimum is {min} (0 means unlimited)"
        ));
    }
    Ok(n)
}

/// Parses every option; the first problem is refused with a message naming the option.
pub fn parse(opts: &HashMap<String, String>) -> Result<CreateSpec, String> {
    let mut spec = CreateSpec::default();
    let mut keys: Vec<&String> = opts.keys().collect();
    keys.sort();
    for key in keys {
        let v = &opts[key];
        match key.to_ascii_lowercase().as_str() {
            "size" => {
                spec.size_bytes = Some(parse_size(v).map_err(|e| format!("option size: {e}"))?)
            }
            "pool" | "storage_pool" => spec.pool = Some(nonempty(key, v)?),
            "protection_domain" | "pd" => spec.protection_domain = Some(nonempty(key, v)?),
            "thin" => set_thin(&mut spec, parse_bool(key, v)?)?,
            "thick" => set_thin(&mut spec, !parse_bool(key, v)?)?,
            "type" | "provisioning" => match v.trim().to_ascii_lowercase().as_str() {
                "thin" => set_thin(&mut spec, true)?,
                "thick" => set_thin(&mut spec, false)?,
                _ => return Err(format!("option {key}={v:?}: use thin or thick")),
            },
            "fstype" => {
                let f = v.trim().to_ascii_lowercase();
                if !FSTYPES.contains(&f.as_str()) {
                    return Err(format!(
                        "option fstype={v:?}: supported filesystems are {}",
                        FSTYPES.join(", ")
                    ));
                }
                spec.fstype = Some(f);
            }
            "iops_limit" | "iops" => spec.iops_limit = Some(parse_count(key, v, IOPS_LIMIT_MIN)?),
            "bandwidth_limit" => {
                // A rate per second: a size (`100MiB`) or a plain number of KiB.
                let t = v.trim();
                let kib = if t.chars().all(|c| c.is_ascii_digit()) && !t.is_empty() {
                    parse_count(key, t, BANDWIDTH_LIMIT_MIN_KBPS)?
                } else {
                    let b = parse_size(t.trim_end_matches("/s"))
                        .map_err(|e| format!("option bandwidth_limit: {e}"))?;
                    let k = b / 1024;
                    if k < BANDWIDTH_LIMIT_MIN_KBPS {
                        return Err(format!(
                            "option bandwidth_limit={v:?} is too low: the minimum is 1MiB (per second)"
                        ));
                    }
                    k
                };
                spec.bandwidth_limit_kbps = Some(kib);
            }
            "preempt" => spec.preempt = Some(parse_bool(key, v)?),
            "snapshot_of" | "snapshotname" | "volumename" => {
                let src = nonempty(key, v)?;
                if spec.snapshot_of.as_ref().is_some_and(|s| *s != src) {
                    return Err("options snapshot_of, snapshotName and volumeName name different volumes: give one".to_string());
                }
                spec.snapshot_of = Some(src);
            }
            _ => {
                return Err(format!(
                    "unknown option {key:?}: the meshblock driver accepts size, pool, \
                     protection_domain, thin, thick, fstype, iops_limit, bandwidth_limit, \
                     preempt, snapshot_of"
                ))
            }
        }
    }
    if spec.snapshot_of.is_some() {
        let inherited = [
            ("size", spec.size_bytes.is_some()),
            ("pool", spec.pool.is_some()),
            ("protection_domain", spec.protection_domain.is_some()),
            ("thin/thick", spec.thin.is_some()),
            ("fstype", spec.fstype.is_some()),
            ("preempt", spec.preempt.is_some()),
        ];
        if let Some((k, _)) = inherited.iter().find(|(_, given)| *given) {
            return Err(format!(
                "option {k} cannot go with snapshot_of: a snapshot has its source's size, pool, \
                 provisioning and filesystem (grow it afterwards if needed)"
            ));
        }
    }
    Ok(spec)
}

fn nonempty(key: &str, v: &str) -> Result<String, String> {
    let t = v.trim();
    if t.is_empty() {
        return Err(format!("option {key} needs a value"));
    }
    Ok(t.to_string())
}

fn set_thin(spec: &mut CreateSpec, thin: bool) -> Result<(), String> {
    if spec.thin.is_some_and(|t| t != thin) {
        return Err("options thin and thick contradict each other: give one".into());
    }
    spec.thin = Some(thin);
    Ok(())
}

/// The labels a volume created from `spec` carries (fstype resolved to its default).
pub fn labels(spec: &CreateSpec, default_fstype: &str) -> BTreeMap<String, String> {
    let mut l = BTreeMap::new();
    l.insert(LABEL_CREATED_BY.into(), CREATED_BY_DOCKER.into());
    l.insert(
        LABEL_FSTYPE.into(),
        spec.fstype.clone().unwrap_or_else(|| default_fstype.into()),
    );
    if let Some(i) = spec.iops_limit.filter(|i| *i > 0) {
        l.insert(LABEL_IOPS.into(), i.to_string());
    }
    if let Some(b) = spec.bandwidth_limit_kbps.filter(|b| *b > 0) {
        l.insert(LABEL_BANDWIDTH.into(), b.to_string());
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "GiB", "8 parsecs", "-1GiB", "0", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn options_parse_and_refuse() {
        let s = parse(&opts(&[
            ("size", "1GiB"),
            ("fstype", "XFS"),
            ("thick", ""),
            ("iops_limit", "500"),
            ("bandwidth_limit", "100MiB"),
            ("pool", "sp1"),
            ("preempt", "true"),
        ]))
        .expect("valid");
        assert_eq!(s.size_bytes, Some(1 << 30));
        assert_eq!(s.fstype.as_deref(), Some("xfs"));
        assert_eq!(s.thin, Some(false));
        assert_eq!(s.iops_limit, Some(500));
        assert_eq!(s.bandwidth_limit_kbps, Some(100 * 1024));
        assert_eq!(s.preempt, Some(true));
        assert_eq!(parse(&opts(&[])), Ok(CreateSpec::default()));
        for bad in [
            &[("colour", "blue")][..],
            &[("size", "big")],
            &[("fstype", "ntfs")],
            &[("thin", "maybe")],
            &[("thin", "true"), ("thick", "true")],
            &[("iops_limit", "5")],
            &[("iops_limit", "-3")],
            &[("bandwidth_limit", "10KiB")],
            &[("pool", " ")],
        ] {
            let e = parse(&opts(bad)).expect_err("must be refused");
            assert!(!e.is_empty());
        }
        let e = parse(&opts(&[("colour", "blue")])).expect_err("unknown");
        assert!(e.contains("colour") && e.contains("size"), "{e}");
    }

    #[test]
    fn labels_record_the_filesystem() {
        let l = labels(&CreateSpec::default(), "ext4");
        assert_eq!(l.get(LABEL_FSTYPE).map(String::as_str), Some("ext4"));
        assert_eq!(l.get(LABEL_CREATED_BY).map(String::as_str), Some("docker"));
        assert!(!l.contains_key(LABEL_IOPS));
    }

    #[test]
    fn a_snapshot_takes_its_source_and_inherits_the_rest() {
        for key in ["snapshot_of", "snapshotName", "volumeName"] {
            let s = parse(&opts(&[(key, "db"), ("iops_limit", "100")])).expect("snapshot_of");
            assert_eq!(s.snapshot_of.as_deref(), Some("db"));
            assert_eq!(s.iops_limit, Some(100));
        }
        let e = parse(&opts(&[("snapshot_of", "a"), ("volumeName", "b")])).expect_err("two");
        assert!(e.contains("different"), "{e}");
        for inherited in ["size", "pool", "fstype", "thin", "preempt"] {
            let v = match inherited {
                "size" => "1GiB",
                "fstype" => "xfs",
                "thin" | "preempt" => "true",
                _ => "sp1",
            };
            let e = parse(&opts(&[("snapshot_of", "db"), (inherited, v)])).expect_err(inherited);
            assert!(e.contains("cannot go with snapshot_of"), "{e}");
        }
        assert!(parse(&opts(&[("snapshot_of", " ")])).is_err());
    }
}
