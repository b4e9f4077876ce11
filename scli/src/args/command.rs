//! The [`Command`] each changing flag sends, built and checked before anything is sent.

use super::values::{need, parse_gb, parse_u64};
use super::Args;
use anyhow::{anyhow, bail};
use proto::model::{ClusterMode, Role};
use proto::msg::Command;

impl Args {
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
}
