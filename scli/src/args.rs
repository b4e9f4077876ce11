//! The command line: one command flag plus its options, as ScaleIO spells them, and the
//! dispatch from a command to an MDM request.

use crate::{client, output, session};
use anyhow::{anyhow, bail, Context};
use clap::Parser;
use proto::model::{ClusterMode, Role};
use proto::msg::{Command, MdmRequest, MdmResponse, NewDevice, Query, SdcSelector};

#[derive(Parser, Debug, Default)]
#[command(
    name = "scli",
    version,
    rename_all = "snake_case",
    about = "Meshblock admin CLI (ScaleIO grammar): one command flag plus its options"
)]
pub struct Args {
    // ---- commands ----
    /// Log in: --username [--password_file FILE] [--mdm_ip]; the password also from
    /// MESHBLOCK_PASSWORD, or asked for on the terminal.
    #[arg(long)]
    pub login: bool,
    /// Forget the saved session.
    #[arg(long)]
    pub logout: bool,
    /// --protection_domain_name.
    #[arg(long)]
    pub add_protection_domain: bool,
    /// --protection_domain_name --fault_set_name.
    #[arg(long)]
    pub add_fault_set: bool,
    /// --protection_domain_name --storage_pool_name [--media_type HDD|SSD] [--pg_count N].
    #[arg(long)]
    pub add_storage_pool: bool,
    /// --sds_ip IP:PORT --sds_name --protection_domain_name --storage_pool_name --device_path P[,P] [--device_capacity_gb G[,G]] [--fault_set_name].
    #[arg(long)]
    pub add_sds: bool,
    /// --sds_name. An SDS holding data is marked removing and the command returns at once:
    /// rebalance moves its copies off, then removes it (watch --query_sds). Refused, changing
    /// nothing, when the other SDS cannot hold its data.
    #[arg(long)]
    pub remove_sds: bool,
    /// --storage_pool_name [--concurrency N] [--bandwidth_mib_s N] [--adaptive on|off]: per-SDS
    /// limits of rebuild and rebalance copies (chunk copies in flight, MiB/s, 0 = unlimited;
    /// adaptive backs off to 1 copy at 10 MiB/s while the SDS serves client I/O).
    #[arg(long)]
    pub set_rebuild_rebalance_policy: bool,
    /// --sds_name --device_path --storage_pool_name [--device_capacity_gb].
    #[arg(long)]
    pub add_sds_device: bool,
    /// --sds_name --device_path: its chunks move to the SDS's other devices first (PGs move
    /// off the SDS when those lack room), then it is removed; refused for an SDS's last device
    /// or when the rest cannot hold the data.
    #[arg(long)]
    pub remove_sds_device: bool,
    /// --sds_name --device_path: a Failed device (fixed or replaced at the same path) is
    /// formatted anew by its SDS and returns as new capacity; its old data is not kept.
    #[arg(long)]
    pub clear_sds_device_error: bool,
    /// --storage_pool_name --size_gb --volume_name [--thin_provisioned|--thick_provisioned]
    /// [--preempt] [--label KEY=VALUE]...
    #[arg(long)]
    pub add_volume: bool,
    /// --volume_name [--remove_mode only_me|including_descendants|descendants_only|whole_vtree].
    #[arg(long)]
    pub remove_volume: bool,
    /// --volume_name --size_gb (volumes only grow).
    #[arg(long)]
    pub modify_volume_capacity: bool,
    /// --volume_name V[,V2...] [--snapshot_name S[,S2...]]: a writable, thin snapshot of each
    /// volume, all at one instant (a consistency group when several). A snapshot is a volume:
    /// map it, snapshot it, give it to Docker.
    #[arg(long)]
    pub snapshot_volume: bool,
    /// --consistency_group_id N (printed by --snapshot_volume and --query_vtree).
    #[arg(long)]
    pub remove_consistency_group_snapshots: bool,
    /// --snapshot_policy_name P (--auto_snapshot_creation_cadence_in_min N |
    /// --auto_snapshot_creation_cadence_in_sec N) --num_of_retained_snapshots_per_level
    /// L0[,L1...]: the MDM leader snapshots the policy's volumes together at that cadence and
    /// keeps the newest L0 runs, the newest L1 of every L0-th run, and so on.
    #[arg(long)]
    pub add_snapshot_policy: bool,
    /// --snapshot_policy_name P (it must have no source volumes; its snapshots stay).
    #[arg(long)]
    pub remove_snapshot_policy: bool,
    /// --snapshot_policy_name P --volume_name V.
    #[arg(long)]
    pub add_source_volume_to_snapshot_policy: bool,
    /// --snapshot_policy_name P --volume_name V.
    #[arg(long)]
    pub remove_source_volume_from_snapshot_policy: bool,
    /// --snapshot_policy_name P.
    #[arg(long)]
    pub pause_snapshot_policy: bool,
    /// --snapshot_policy_name P.
    #[arg(long)]
    pub resume_snapshot_policy: bool,
    /// --source_volume_name S --destination_volume_name V [--allow_overwrite_mapped]: V reads
    /// what S (a member of its V-tree) reads now.
    #[arg(long)]
    pub overwrite_volume_content: bool,
    /// --volume_name --new_name.
    #[arg(long)]
    pub rename_volume: bool,
    /// --volume_name (--sdc_name|--sdc_ip|--sdc_guid) [--allow_multi_map] [--takeover].
    #[arg(long)]
    pub map_volume_to_sdc: bool,
    /// --volume_name (--sdc_name|--sdc_ip|--sdc_guid|--all_sdcs).
    #[arg(long)]
    pub unmap_volume_from_sdc: bool,
    /// --volume_name (--sdc_name|--sdc_ip|--sdc_guid) [--limit_iops N] [--limit_bandwidth_kbps N]; 0 = unlimited.
    #[arg(long)]
    pub set_sdc_volume_limits: bool,
    /// --username --user_role Monitor|Configure|Administrator [--password_file FILE]; without
    /// it the new user's password is asked for (twice) on the terminal.
    #[arg(long)]
    pub add_user: bool,
    /// --new_mdm_ip IP:PORT [--mdm_name].
    #[arg(long)]
    pub add_standby_mdm: bool,
    /// --cluster_mode 1_node|3_node|5_node.
    #[arg(long)]
    pub switch_cluster_mode: bool,
    #[arg(long)]
    pub query_all: bool,
    #[arg(long)]
    pub query_cluster: bool,
    /// --protection_domain_name.
    #[arg(long)]
    pub query_protection_domain: bool,
    /// --storage_pool_name.
    #[arg(long)]
    pub query_storage_pool: bool,
    #[arg(long)]
    pub query_all_sds: bool,
    /// --sds_name.
    #[arg(long)]
    pub query_sds: bool,
    /// [--sdc_name|--sdc_ip|--sdc_guid]: one SDC, or all.
    #[arg(long)]
    pub query_sdc: bool,
    /// --volume_name.
    #[arg(long)]
    pub query_volume: bool,
    #[arg(long)]
    pub query_all_volumes: bool,
    /// --volume_name: the volume's V-tree, each member's size and the space it alone holds.
    #[arg(long)]
    pub query_vtree: bool,
    /// [--snapshot_policy_name P]: one snapshot policy, or all.
    #[arg(long)]
    pub query_snapshot_policy: bool,
    /// [--since WHEN]: what happened (SDS down and up, failed devices, rebuilds, takeovers,
    /// leader changes, logins, commands), oldest first.
    #[arg(long)]
    pub query_events: bool,
    /// What losing each SDS, fault set or device would do now: PGs left with one copy or none,
    /// data to rebuild and how long; and which single losses the cluster cannot survive.
    #[arg(long)]
    pub query_resilience: bool,

    // ---- options ----
    /// MDM addresses, comma-separated IP or IP:PORT (default port 7611).
    #[arg(long)]
    pub mdm_ip: Option<String>,
    /// Certificate directory (default $MESHBLOCK_CERT_DIR or ~/.meshblock/certs).
    #[arg(long)]
    pub cert_dir: Option<String>,
    /// Print queries as JSON.
    #[arg(long)]
    pub json: bool,
    /// With --remove_sds or --remove_sds_device: follow the removal until done, with a progress
    /// line (chunks and PG copies left, copy rate, ETA); with --add_sds: until the SDS serves
    /// and the rebalance onto it is over (PG moves left, copy rate).
    #[arg(long)]
    pub wait: bool,
    /// With --query_storage_pool: redraw the pool every 2 s until interrupted (Ctrl-C).
    #[arg(long)]
    pub watch: bool,
    /// --query_events from WHEN: a UTC time (2026-12-06T15:00:00Z), Unix seconds, or a span
    /// back from now (90s, 30m, 2h, 7d).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    #[arg(long)]
    pub username: Option<String>,
    /// File holding the password, on its first line (--login, --add_user). --login also takes
    /// it from MESHBLOCK_PASSWORD; without either, scli asks on the terminal.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<std::path::PathBuf>,
    /// Refused: a password on the command line shows in `ps` (use --password_file).
    #[arg(long = "password", hide = true, value_name = "REFUSED")]
    pub refused_password: Option<String>,
    /// Whether a password may be asked for on the terminal (set by `main`: stdin is one).
    #[arg(skip)]
    pub can_prompt: bool,
    #[arg(long)]
    pub user_role: Option<String>,
    #[arg(long)]
    pub protection_domain_name: Option<String>,
    #[arg(long)]
    pub fault_set_name: Option<String>,
    #[arg(long)]
    pub storage_pool_name: Option<String>,
    #[arg(long)]
    pub media_type: Option<String>,
    #[arg(long)]
    pub pg_count: Option<String>,
    #[arg(long)]
    pub sds_ip: Option<String>,
    #[arg(long)]
    pub sds_name: Option<String>,
    #[arg(long)]
    pub device_path: Option<String>,
    #[arg(long)]
    pub device_capacity_gb: Option<String>,
    #[arg(long)]
    pub volume_name: Option<String>,
    #[arg(long)]
    pub new_name: Option<String>,
    /// With --snapshot_volume: the snapshots' names, comma-separated, one per volume.
    #[arg(long)]
    pub snapshot_name: Option<String>,
    /// With --remove_volume: what goes besides the volume (default only_me).
    #[arg(long, value_parser = clap::value_parser!(proto::msg::RemoveMode))]
    pub remove_mode: Option<proto::msg::RemoveMode>,
    #[arg(long)]
    pub consistency_group_id: Option<String>,
    #[arg(long)]
    pub snapshot_policy_name: Option<String>,
    #[arg(long)]
    pub auto_snapshot_creation_cadence_in_min: Option<u64>,
    #[arg(long)]
    pub auto_snapshot_creation_cadence_in_sec: Option<u64>,
    /// Snapshots kept per level, comma-separated (e.g. 4,6,2).
    #[arg(long, value_delimiter = ',')]
    pub num_of_retained_snapshots_per_level: Vec<u32>,
    #[arg(long)]
    pub source_volume_name: Option<String>,
    #[arg(long)]
    pub destination_volume_name: Option<String>,
    /// With --overwrite_volume_content: even while the destination is mapped (its hosts see
    /// its content change under them).
    #[arg(long)]
    pub allow_overwrite_mapped: bool,
    #[arg(long)]
    pub size_gb: Option<String>,
    #[arg(long)]
    pub thin_provisioned: bool,
    #[arg(long)]
    pub thick_provisioned: bool,
    #[arg(long)]
    pub sdc_name: Option<String>,
    #[arg(long)]
    pub sdc_ip: Option<String>,
    #[arg(long)]
    pub sdc_guid: Option<String>,
    #[arg(long)]
    pub all_sdcs: bool,
    #[arg(long)]
    pub allow_multi_map: bool,
    /// With --map_volume_to_sdc: fence and remove the volume's mappings to SDCs that lost their
    /// session (or to any SDC, for a volume created with --preempt).
    #[arg(long)]
    pub takeover: bool,
    /// With --add_volume: another host may take the volume over while its host is alive.
    #[arg(long)]
    pub preempt: bool,
    /// With --add_volume: a KEY=VALUE label kept with the volume (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    #[arg(long)]
    pub limit_iops: Option<String>,
    #[arg(long)]
    pub limit_bandwidth_kbps: Option<String>,
    #[arg(long)]
    pub new_mdm_ip: Option<String>,
    #[arg(long)]
    pub mdm_name: Option<String>,
    #[arg(long)]
    pub cluster_mode: Option<String>,
    #[arg(long)]
    pub concurrency: Option<String>,
    #[arg(long)]
    pub bandwidth_mib_s: Option<String>,
    #[arg(long)]
    pub adaptive: Option<String>,
}

/// The refusal of a password given on the command line.
const PASSWORD_FLAG_GONE: &str = "--password is no longer accepted: a password on the command \
     line shows in `ps`. Put it in a file only you can read (chmod 600) and pass --password_file \
     FILE; --login also reads MESHBLOCK_PASSWORD; on a terminal scli asks for it";

impl Args {
    /// Refuse what must not be on a command line, before anything else happens.
    pub fn refuse_secrets(&self) -> anyhow::Result<()> {
        if self.refused_password.is_some() {
            bail!(PASSWORD_FLAG_GONE);
        }
        Ok(())
    }

    /// The login password: --password_file, else MESHBLOCK_PASSWORD, else the terminal.
    fn login_password(&self, user: &str) -> anyhow::Result<String> {
        if let Some(f) = &self.password_file {
            return Ok(proto::secret::read_file(f)?);
        }
        // The environment only ever supplies the login password, so it cannot leak into
        // another command such as --add_user.
        if let Ok(p) = std::env::var("MESHBLOCK_PASSWORD") {
            if !p.is_empty() {
                return Ok(p);
            }
        }
        if self.can_prompt {
            return Ok(proto::secret::prompt(
                &format!("Password for {user}: "),
                false,
            )?);
        }
        bail!(
            "missing the password: give --password_file FILE, set MESHBLOCK_PASSWORD, or run \
             scli on a terminal to be asked for it"
        )
    }

    /// A new user's password: --password_file, else asked twice on the terminal.
    fn new_user_password(&self, user: &str) -> anyhow::Result<String> {
        if let Some(f) = &self.password_file {
            return Ok(proto::secret::read_file(f)?);
        }
        if self.can_prompt {
            return Ok(proto::secret::prompt(
                &format!("Password for the new user {user}: "),
                true,
            )?);
        }
        bail!(
            "missing the new user's password: give --password_file FILE, or run scli on a \
             terminal to be asked for it"
        )
    }
}

fn need<'a>(v: &'a Option<String>, flag: &str) -> anyhow::Result<&'a str> {
    match v.as_deref() {
        Some(s) if !s.trim().is_empty() => Ok(s),
        _ => bail!("missing {flag}"),
    }
}

fn parse_u64(v: &str, flag: &str) -> anyhow::Result<u64> {
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
    fn commands(&self) -> Vec<&'static str> {
        let all = [
            (self.login, "--login"),
            (self.logout, "--logout"),
            (self.add_protection_domain, "--add_protection_domain"),
            (self.add_fault_set, "--add_fault_set"),
            (self.add_storage_pool, "--add_storage_pool"),
            (self.add_sds, "--add_sds"),
            (self.remove_sds, "--remove_sds"),
            (
                self.set_rebuild_rebalance_policy,
                "--set_rebuild_rebalance_policy",
            ),
            (self.add_sds_device, "--add_sds_device"),
            (self.remove_sds_device, "--remove_sds_device"),
            (self.clear_sds_device_error, "--clear_sds_device_error"),
            (self.add_volume, "--add_volume"),
            (self.remove_volume, "--remove_volume"),
            (self.modify_volume_capacity, "--modify_volume_capacity"),
            (self.snapshot_volume, "--snapshot_volume"),
            (
                self.remove_consistency_group_snapshots,
                "--remove_consistency_group_snapshots",
            ),
            (self.overwrite_volume_content, "--overwrite_volume_content"),
            (self.add_snapshot_policy, "--add_snapshot_policy"),
            (self.remove_snapshot_policy, "--remove_snapshot_policy"),
            (
                self.add_source_volume_to_snapshot_policy,
                "--add_source_volume_to_snapshot_policy",
            ),
            (
                self.remove_source_volume_from_snapshot_policy,
                "--remove_source_volume_from_snapshot_policy",
            ),
            (self.pause_snapshot_policy, "--pause_snapshot_policy"),
            (self.resume_snapshot_policy, "--resume_snapshot_policy"),
            (self.rename_volume, "--rename_volume"),
            (self.map_volume_to_sdc, "--map_volume_to_sdc"),
            (self.unmap_volume_from_sdc, "--unmap_volume_from_sdc"),
            (self.set_sdc_volume_limits, "--set_sdc_volume_limits"),
            (self.add_user, "--add_user"),
            (self.add_standby_mdm, "--add_standby_mdm"),
            (self.switch_cluster_mode, "--switch_cluster_mode"),
            (self.query_all, "--query_all"),
            (self.query_cluster, "--query_cluster"),
            (self.query_protection_domain, "--query_protection_domain"),
            (self.query_storage_pool, "--query_storage_pool"),
            (self.query_all_sds, "--query_all_sds"),
            (self.query_sds, "--query_sds"),
            (self.query_sdc, "--query_sdc"),
            (self.query_volume, "--query_volume"),
            (self.query_all_volumes, "--query_all_volumes"),
            (self.query_vtree, "--query_vtree"),
            (self.query_snapshot_policy, "--query_snapshot_policy"),
            (self.query_events, "--query_events"),
            (self.query_resilience, "--query_resilience"),
        ];
        all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect()
    }

    fn sdc(&self) -> anyhow::Result<Option<SdcSelector>> {
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

    fn parse_labels(&self) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
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

    fn need_sdc(&self) -> anyhow::Result<SdcSelector> {
        self.sdc()?
            .ok_or_else(|| anyhow!("missing --sdc_name, --sdc_ip or --sdc_guid"))
    }

    fn devices(&self, pool: &str) -> anyhow::Result<Vec<NewDevice>> {
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

    /// Build the command, or `None` for queries and session commands.
    pub fn command(&self, name: &str) -> anyhow::Result<Option<Command>> {
        let pd =
            || need(&self.protection_domain_name, "--protection_domain_name").map(String::from);
        let pool = || need(&self.storage_pool_name, "--storage_pool_name").map(String::from);
        let vol = || need(&self.volume_name, "--volume_name").map(String::from);
        let policy =
            || need(&self.snapshot_policy_name, "--snapshot_policy_name").map(String::from);
        let c = match name {
            "--add_protection_domain" => Command::AddProtectionDomain { name: pd()? },
            "--add_fault_set" => Command::AddFaultSet {
                pd: pd()?,
                name: need(&self.fault_set_name, "--fault_set_name")?.into(),
            },
            "--add_storage_pool" => Command::AddStoragePool {
                pd: pd()?,
                name: pool()?,
                media_type: self.media_type.clone().unwrap_or_default(),
                pg_count: self
                    .pg_count
                    .as_deref()
                    .map(|v| {
                        parse_u64(v, "--pg_count").and_then(|n| {
                            u32::try_from(n).map_err(|_| anyhow!("--pg_count is too large"))
                        })
                    })
                    .transpose()?,
            },
            "--add_sds" => Command::AddSds {
                name: need(&self.sds_name, "--sds_name")?.into(),
                addr: need(&self.sds_ip, "--sds_ip")?.into(),
                pd: pd()?,
                fault_set: self.fault_set_name.clone(),
                devices: self.devices(&pool()?)?,
            },
            "--remove_sds" => Command::RemoveSds {
                name: need(&self.sds_name, "--sds_name")?.into(),
            },
            "--add_sds_device" => {
                let mut d = self.devices(&pool()?)?;
                if d.len() != 1 {
                    bail!("--add_sds_device takes one --device_path");
                }
                Command::AddSdsDevice {
                    sds: need(&self.sds_name, "--sds_name")?.into(),
                    device: d.remove(0),
                }
            }
            "--clear_sds_device_error" => Command::ClearSdsDeviceError {
                sds: need(&self.sds_name, "--sds_name")?.into(),
                path: need(&self.device_path, "--device_path")?.into(),
            },
            "--remove_sds_device" => {
                let path = need(&self.device_path, "--device_path")?;
                if path.contains(',') {
                    bail!("--remove_sds_device takes one --device_path");
                }
                Command::RemoveSdsDevice {
                    sds: need(&self.sds_name, "--sds_name")?.into(),
                    path: path.into(),
                }
            }
            "--add_volume" => {
                if self.thin_provisioned && self.thick_provisioned {
                    bail!("give --thin_provisioned or --thick_provisioned, not both");
                }
                Command::AddVolume {
                    pool: pool()?,
                    name: vol()?,
                    size_bytes: parse_gb(need(&self.size_gb, "--size_gb")?, "--size_gb")?,
                    thin: !self.thick_provisioned,
                    labels: self.parse_labels()?,
                    preempt: self.preempt,
                }
            }
            "--remove_volume" => Command::RemoveVolume {
                name: vol()?,
                mode: self.remove_mode.unwrap_or_default(),
            },
            "--snapshot_volume" => {
                let list = |v: &str| -> Vec<String> {
                    v.split(',').map(|x| x.trim().to_string()).collect()
                };
                let volumes = list(&vol()?);
                let names = self.snapshot_name.as_deref().map(list).unwrap_or_default();
                if volumes.iter().chain(&names).any(String::is_empty) {
                    bail!("--volume_name and --snapshot_name take comma-separated names without empty ones");
                }
                if !names.is_empty() && names.len() != volumes.len() {
                    bail!(
                        "--snapshot_name needs one name per --volume_name ({} volumes, {} names)",
                        volumes.len(),
                        names.len()
                    );
                }
                Command::SnapshotVolumes {
                    volumes,
                    names,
                    labels: Default::default(),
                }
            }
            "--remove_consistency_group_snapshots" => Command::RemoveConsistencyGroupSnapshots {
                group: parse_u64(
                    need(&self.consistency_group_id, "--consistency_group_id")?,
                    "--consistency_group_id",
                )?,
            },
            "--add_snapshot_policy" => Command::AddSnapshotPolicy {
                name: policy()?,
                cadence_secs: match (
                    self.auto_snapshot_creation_cadence_in_min,
                    self.auto_snapshot_creation_cadence_in_sec,
                ) {
                    (Some(m), None) => m.saturating_mul(60),
                    (None, Some(s)) => s,
                    (None, None) => {
                        bail!("missing --auto_snapshot_creation_cadence_in_min (or _in_sec)")
                    }
                    (Some(_), Some(_)) => {
                        bail!("give the cadence in minutes or in seconds, not both")
                    }
                },
                retain: {
                    if self.num_of_retained_snapshots_per_level.is_empty() {
                        bail!("missing --num_of_retained_snapshots_per_level (e.g. 4,6,2)");
                    }
                    self.num_of_retained_snapshots_per_level.clone()
                },
            },
            "--remove_snapshot_policy" => Command::RemoveSnapshotPolicy { name: policy()? },
            "--add_source_volume_to_snapshot_policy" => Command::AddSourceVolumeToSnapshotPolicy {
                policy: policy()?,
                volume: vol()?,
            },
            "--remove_source_volume_from_snapshot_policy" => {
                Command::RemoveSourceVolumeFromSnapshotPolicy {
                    policy: policy()?,
                    volume: vol()?,
                }
            }
            "--pause_snapshot_policy" => Command::PauseSnapshotPolicy {
                name: policy()?,
                paused: true,
            },
            "--resume_snapshot_policy" => Command::PauseSnapshotPolicy {
                name: policy()?,
                paused: false,
            },
            "--overwrite_volume_content" => Command::OverwriteVolumeContent {
                volume: need(&self.destination_volume_name, "--destination_volume_name")?.into(),
                source: need(&self.source_volume_name, "--source_volume_name")?.into(),
                force: self.allow_overwrite_mapped,
            },
            "--modify_volume_capacity" => Command::ModifyVolumeCapacity {
                name: vol()?,
                size_bytes: parse_gb(need(&self.size_gb, "--size_gb")?, "--size_gb")?,
            },
            "--rename_volume" => Command::RenameVolume {
                name: vol()?,
                new_name: need(&self.new_name, "--new_name")?.into(),
            },
            "--map_volume_to_sdc" => Command::MapVolumeToSdc {
                volume: vol()?,
                sdc: self.need_sdc()?,
                allow_multi_map: self.allow_multi_map,
                takeover: self.takeover,
            },
            "--unmap_volume_from_sdc" => {
                let sdc = self.sdc()?;
                if sdc.is_none() && !self.all_sdcs {
                    bail!("missing --sdc_name, --sdc_ip, --sdc_guid or --all_sdcs");
                }
                Command::UnmapVolumeFromSdc {
                    volume: vol()?,
                    sdc,
                }
            }
            "--set_rebuild_rebalance_policy" => {
                let num = |v: &Option<String>, flag: &str| -> anyhow::Result<Option<u32>> {
                    v.as_deref()
                        .map(|x| {
                            parse_u64(x, flag).and_then(|n| {
                                u32::try_from(n).map_err(|_| anyhow!("{flag} is too large"))
                            })
                        })
                        .transpose()
                };
                let adaptive = match self.adaptive.as_deref() {
                    None => None,
                    Some("on") | Some("true") | Some("yes") => Some(true),
                    Some("off") | Some("false") | Some("no") => Some(false),
                    Some(x) => bail!("--adaptive takes on or off, got '{x}'"),
                };
                let concurrency = num(&self.concurrency, "--concurrency")?;
                let bandwidth_mib_s = num(&self.bandwidth_mib_s, "--bandwidth_mib_s")?;
                if concurrency.is_none() && bandwidth_mib_s.is_none() && adaptive.is_none() {
                    bail!("missing --concurrency, --bandwidth_mib_s and/or --adaptive");
                }
                Command::SetRebuildPolicy {
                    pool: need(&self.storage_pool_name, "--storage_pool_name")?.to_string(),
                    concurrency,
                    bandwidth_mib_s,
                    adaptive,
                }
            }
            "--set_sdc_volume_limits" => {
                let iops = self
                    .limit_iops
                    .as_deref()
                    .map(|v| parse_u64(v, "--limit_iops"))
                    .transpose()?;
                let bw = self
                    .limit_bandwidth_kbps
                    .as_deref()
                    .map(|v| parse_u64(v, "--limit_bandwidth_kbps"))
                    .transpose()?;
                if iops.is_none() && bw.is_none() {
                    bail!("missing --limit_iops and/or --limit_bandwidth_kbps");
                }
                Command::SetSdcVolumeLimits {
                    volume: vol()?,
                    sdc: self.need_sdc()?,
                    iops_limit: iops,
                    bandwidth_limit_kbps: bw,
                }
            }
            "--add_user" => {
                let role = need(&self.user_role, "--user_role")?;
                let role = Role::parse(role).ok_or_else(|| {
                    anyhow!("invalid --user_role '{role}': use Monitor, Configure or Administrator")
                })?;
                let name = need(&self.username, "--username")?;
                Command::AddUser {
                    name: name.into(),
                    role,
                    password: self.new_user_password(name)?,
                }
            }
            "--add_standby_mdm" => Command::AddStandbyMdm {
                addr: need(&self.new_mdm_ip, "--new_mdm_ip")?.into(),
                name: self.mdm_name.clone(),
            },
            "--switch_cluster_mode" => {
                let m = need(&self.cluster_mode, "--cluster_mode")?;
                Command::SwitchClusterMode {
                    mode: ClusterMode::parse(m).ok_or_else(|| {
                        anyhow!("invalid --cluster_mode '{m}': use 1_node, 3_node or 5_node")
                    })?,
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(c))
    }

    pub fn query(&self, name: &str) -> anyhow::Result<Option<Query>> {
        Ok(Some(match name {
            "--query_all" => Query::All,
            "--query_cluster" => Query::Cluster,
            "--query_protection_domain" => Query::ProtectionDomain {
                name: need(&self.protection_domain_name, "--protection_domain_name")?.into(),
            },
            "--query_storage_pool" => Query::StoragePool {
                name: need(&self.storage_pool_name, "--storage_pool_name")?.into(),
            },
            "--query_all_sds" => Query::AllSds,
            "--query_sds" => Query::Sds {
                name: need(&self.sds_name, "--sds_name")?.into(),
            },
            "--query_sdc" => Query::Sdc { sdc: self.sdc()? },
            "--query_volume" => Query::Volume {
                name: need(&self.volume_name, "--volume_name")?.into(),
            },
            "--query_all_volumes" => Query::AllVolumes,
            "--query_vtree" => Query::Vtree {
                name: need(&self.volume_name, "--volume_name")?.into(),
            },
            "--query_snapshot_policy" => Query::SnapshotPolicy {
                name: self.snapshot_policy_name.clone(),
            },
            "--query_resilience" => Query::Resilience,
            "--query_events" => Query::Events {
                since_unix: self
                    .since
                    .as_deref()
                    .map(|w| crate::events::parse_since(w, proto::clock::now_unix()))
                    .transpose()?,
            },
            _ => return Ok(None),
        }))
    }
}

/// Run the command line; the returned text goes to stdout.
pub async fn run(a: Args) -> anyhow::Result<String> {
    a.refuse_secrets()?;
    let cmds = a.commands();
    let name = match cmds.as_slice() {
        [one] => *one,
        [] => bail!("no command given; see scli --help"),
        many => bail!("give exactly one command, got {}", many.join(" ")),
    };
    if a.since.is_some() && name != "--query_events" {
        bail!("--since goes with --query_events only");
    }
    if a.wait && !matches!(name, "--remove_sds" | "--remove_sds_device" | "--add_sds") {
        bail!("--wait goes with --add_sds, --remove_sds and --remove_sds_device only");
    }
    if a.watch && name != "--query_storage_pool" {
        bail!("--watch goes with --query_storage_pool only");
    }
    if name == "--logout" {
        session::remove()?;
        return Ok("Logged out.".into());
    }
    if name == "--login" {
        let user = need(&a.username, "--username")?.to_string();
        let password = a.login_password(&user)?;
        let ips = match &a.mdm_ip {
            Some(ips) => ips.clone(),
            None => session::load()
                .map(|s| s.mdm_ips)
                .map_err(|_| anyhow!("missing --mdm_ip"))?,
        };
        let c = client::connect(&ips, a.cert_dir.as_deref()).await?;
        let r = client::request(
            &c,
            &MdmRequest::Login {
                username: user.clone(),
                password,
            },
        )
        .await?;
        let MdmResponse::Session {
            token,
            role,
            expires_unix,
        } = r
        else {
            bail!("unexpected answer from the MDM")
        };
        // Remember every MDM of the cluster, not only the ones given, so a later failover of
        // the one we logged in through does not strand this session.
        let mut all: Vec<String> = ips
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if let Ok(MdmResponse::View { state, .. }) = client::request(
            &c,
            &MdmRequest::Query {
                token: token.clone(),
                query: Query::Cluster,
            },
        )
        .await
        {
            for m in state.mdms.values() {
                if !all.contains(&m.addr) {
                    all.push(m.addr.clone());
                }
            }
        }
        let ips = all.join(",");
        session::save(&session::Session {
            username: user.clone(),
            role: role.to_string(),
            token,
            expires_unix,
            mdm_ips: ips,
        })?;
        return Ok(format!("Logged in. User role is {role}. System ID is not shown; session valid until {} (unix time).", expires_unix));
    }
    // Validate the arguments before anything else, so a wrong command never reaches the MDM.
    let command = a.command(name)?;
    let query = if command.is_none() {
        a.query(name)?
    } else {
        None
    };
    let s = session::load()?;
    let ips = a.mdm_ip.clone().unwrap_or_else(|| s.mdm_ips.clone());
    let c = client::connect(&ips, a.cert_dir.as_deref())
        .await
        .context("connect to the MDM")?;
    if let Some(command) = command {
        let waited = match (&command, a.wait) {
            (Command::RemoveSds { name }, true) => Some(crate::progress::Waited::Sds(name.clone())),
            (Command::AddSds { name, .. }, true) => {
                Some(crate::progress::Waited::Added(name.clone()))
            }
            (Command::RemoveSdsDevice { sds, path }, true) => {
                Some(crate::progress::Waited::Device {
                    sds: sds.clone(),
                    path: path.clone(),
                })
            }
            _ => None,
        };
        let r = client::request(
            &c,
            &MdmRequest::Command {
                token: s.token.clone(),
                command,
            },
        )
        .await?;
        let done = match r {
            MdmResponse::Done { message, object_id } => match object_id {
                Some(id) => format!("{message} Object ID {id}"),
                None => message,
            },
            _ => bail!("unexpected answer from the MDM"),
        };
        return match waited {
            Some(w) => {
                println!("{done}");
                crate::progress::wait(&c, &s.token, w).await
            }
            None => Ok(done),
        };
    }
    let Some(query) = query else {
        bail!("unknown command {name}")
    };
    if a.watch {
        return crate::progress::watch(&c, &s.token, |status, state| {
            output::render(&query, &a, status, state)
        })
        .await;
    }
    let r = client::request(
        &c,
        &MdmRequest::Query {
            token: s.token,
            query: query.clone(),
        },
    )
    .await?;
    let MdmResponse::View { status, state } = r else {
        bail!("unexpected answer from the MDM")
    };
    remember_mdms(&state);
    output::render(&query, &a, &status, &state)
}

/// Add MDMs the cluster knows to the session, so later failovers find them.
fn remember_mdms(state: &proto::model::ClusterState) {
    let Ok(mut s) = session::load() else { return };
    let mut ips: Vec<String> = s
        .mdm_ips
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
    let before = ips.len();
    for m in state.mdms.values() {
        if !ips.contains(&m.addr) {
            ips.push(m.addr.clone());
        }
    }
    if ips.len() != before {
        s.mdm_ips = ips.join(",");
        let _ = session::save(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("scli").chain(v.iter().copied())).expect("parse")
    }

    #[test]
    fn commands_need_their_options() {
        let a = parse(&[
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--volume_name",
            "v",
        ]);
        assert!(a
            .command("--add_volume")
            .expect_err("size missing")
            .to_string()
            .contains("--size_gb"));
        let a = parse(&[
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--volume_name",
            "v",
            "--size_gb",
            "0.5",
        ]);
        match a.command("--add_volume").expect("ok") {
            Some(Command::AddVolume {
                size_bytes, thin, ..
            }) => assert_eq!((size_bytes, thin), (512 << 20, true)),
            other => panic!("{other:?}"),
        }
        assert!(parse(&["--map_volume_to_sdc", "--volume_name", "v"])
            .command("--map_volume_to_sdc")
            .is_err());
        assert!(
            parse(&["--add_user", "--username", "u", "--user_role", "King"])
                .command("--add_user")
                .is_err()
        );
    }

    #[test]
    fn the_docker_label_is_reserved() {
        let add = |label: &str| {
            parse(&[
                "--add_volume",
                "--storage_pool_name",
                "sp1",
                "--volume_name",
                "v",
                "--size_gb",
                "1",
                "--label",
                label,
            ])
            .command("--add_volume")
        };
        for reserved in ["created-by=docker", "docker-name=x", "docker-name.2=y"] {
            let e = add(reserved).expect_err("reserved");
            assert!(
                e.to_string().contains("reserved for the Docker driver"),
                "{e}"
            );
        }
        assert!(add("owner=ops").is_ok());
    }

    #[test]
    fn sizes_are_validated() {
        assert!(parse_gb("abc", "--size_gb").is_err());
        assert!(parse_gb("-1", "--size_gb").is_err());
        assert!(parse_gb("0", "--size_gb").is_err());
        assert_eq!(parse_gb("8", "--size_gb").expect("8"), 8 << 30);
    }

    #[test]
    fn add_user_never_takes_the_password_from_the_environment() {
        std::env::set_var("MESHBLOCK_PASSWORD", "AdminSecret1");
        let a = parse(&["--add_user", "--username", "u", "--user_role", "Monitor"]);
        let e = a.command("--add_user").expect_err("password missing");
        assert!(e.to_string().contains("--password_file"), "{e}");
        std::env::remove_var("MESHBLOCK_PASSWORD");
    }

    #[test]
    fn passwords_come_from_files_never_from_the_command_line() {
        let f = std::env::temp_dir().join(format!("scli-pw-{}", std::process::id()));
        std::fs::write(&f, "NewUser1\n").expect("write");
        let file = f.display().to_string();
        let a = parse(&[
            "--add_user",
            "--username",
            "u",
            "--user_role",
            "Monitor",
            "--password_file",
            &file,
        ]);
        match a.command("--add_user").expect("ok") {
            Some(Command::AddUser { password, .. }) => assert_eq!(password, "NewUser1"),
            other => panic!("{other:?}"),
        }
        std::fs::remove_file(&f).expect("remove");
        let a = parse(&["--login", "--username", "admin", "--password", "x"]);
        let e = a.refuse_secrets().expect_err("refused");
        assert!(e.to_string().contains("--password_file"), "{e}");
        assert!(
            !e.to_string().contains(" x"),
            "the refusal does not echo the password"
        );
    }

    #[test]
    fn exactly_one_command() {
        let a = parse(&["--query_all", "--query_cluster"]);
        assert_eq!(a.commands().len(), 2);
        assert!(parse(&[]).commands().is_empty());
    }
}
