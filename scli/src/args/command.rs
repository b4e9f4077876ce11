//! The [`Command`] each changing flag sends, built and checked before anything is sent. clap
//! already checked that the options each command needs are there and well formed; objects
//! given by id were turned into names (`ids`) before this runs.

use super::values::need;
use super::Args;
use anyhow::bail;
use proto::msg::Command;

impl Args {
    /// Build the command, or `None` for queries and session commands.
    pub fn command(&self, name: &str) -> anyhow::Result<Option<Command>> {
        let pd =
            || need(&self.protection_domain_name, "--protection_domain_name").map(String::from);
        let pool = || need(&self.storage_pool_name, "--storage_pool_name").map(String::from);
        let vol = || need(&self.volume_name, "--volume_name").map(String::from);
        let sds = || need(&self.sds_name, "--sds_name").map(String::from);
        let size = || match self.size_gb {
            Some(b) => Ok(b),
            None => bail!("missing --size_gb"),
        };
        let policy =
            || need(&self.snapshot_policy_name, "--snapshot_policy_name").map(String::from);
        let new_name = || need(&self.new_name, "--new_name").map(String::from);
        let c = match name {
            "--add_protection_domain" => Command::AddProtectionDomain { name: pd()? },
            "--remove_protection_domain" => Command::RemoveProtectionDomain { name: pd()? },
            "--add_fault_set" => Command::AddFaultSet {
                pd: pd()?,
                name: need(&self.fault_set_name, "--fault_set_name")?.into(),
            },
            "--remove_fault_set" => Command::RemoveFaultSet {
                pd: pd()?,
                name: need(&self.fault_set_name, "--fault_set_name")?.into(),
            },
            "--add_storage_pool" => Command::AddStoragePool {
                pd: pd()?,
                name: pool()?,
                media_type: self.media_type.clone().unwrap_or_default(),
                pg_count: self.pg_count,
            },
            "--remove_storage_pool" => Command::RemoveStoragePool { name: pool()? },
            "--add_sds" => Command::AddSds {
                name: sds()?,
                addr: need(&self.sds_ip, "--sds_ip")?.into(),
                pd: pd()?,
                fault_set: self.fault_set_name.clone(),
                devices: self.devices(&pool()?)?,
            },
            "--remove_sds" => Command::RemoveSds { name: sds()? },
            "--abort_remove_sds" => Command::AbortRemoveSds { name: sds()? },
            "--rename_sds" => Command::RenameSds {
                name: sds()?,
                new_name: new_name()?,
            },
            "--add_sds_device" => {
                let mut d = self.devices(&pool()?)?;
                if d.len() != 1 {
                    bail!("--add_sds_device takes one --device_path");
                }
                Command::AddSdsDevice {
                    sds: sds()?,
                    device: d.remove(0),
                }
            }
            "--clear_sds_device_error" => Command::ClearSdsDeviceError {
                sds: sds()?,
                path: need(&self.device_path, "--device_path")?.into(),
            },
            "--remove_sds_device" => {
                let path = need(&self.device_path, "--device_path")?;
                if path.contains(',') {
                    bail!("--remove_sds_device takes one --device_path");
                }
                Command::RemoveSdsDevice {
                    sds: sds()?,
                    path: path.into(),
                }
            }
            "--add_volume" => Command::AddVolume {
                pool: pool()?,
                name: vol()?,
                size_bytes: size()?,
                thin: !self.thick_provisioned,
                labels: self.parse_labels()?,
                preempt: self.preempt,
            },
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
            "--remove_consistency_group_snapshots" => {
                let Some(group) = self.consistency_group_id else {
                    bail!("missing --consistency_group_id");
                };
                Command::RemoveConsistencyGroupSnapshots { group }
            }
            "--add_snapshot_policy" => Command::AddSnapshotPolicy {
                name: policy()?,
                cadence_secs: match (
                    self.auto_snapshot_creation_cadence_in_min,
                    self.auto_snapshot_creation_cadence_in_sec,
                ) {
                    (Some(m), _) => m.saturating_mul(60),
                    (None, Some(s)) => s,
                    (None, None) => {
                        bail!("missing --auto_snapshot_creation_cadence_in_min (or _in_sec)")
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
                size_bytes: size()?,
            },
            "--rename_volume" => Command::RenameVolume {
                name: vol()?,
                new_name: new_name()?,
            },
            "--map_volume_to_sdc" => Command::MapVolumeToSdc {
                volume: vol()?,
                sdc: self.need_sdc()?,
                allow_multi_map: self.allow_multi_map,
                takeover: self.takeover,
            },
            "--unmap_volume_from_sdc" => {
                let sdc = self.sdc();
                if sdc.is_none() && !self.all_sdcs {
                    bail!("missing --sdc_name, --sdc_ip, --sdc_guid, --sdc_id or --all_sdcs");
                }
                Command::UnmapVolumeFromSdc {
                    volume: vol()?,
                    sdc,
                }
            }
            "--set_rebuild_rebalance_policy" => {
                if self.concurrency.is_none()
                    && self.bandwidth_mib_s.is_none()
                    && self.adaptive.is_none()
                {
                    bail!("missing --concurrency, --bandwidth_mib_s and/or --adaptive");
                }
                Command::SetRebuildPolicy {
                    pool: pool()?,
                    concurrency: self.concurrency,
                    bandwidth_mib_s: self.bandwidth_mib_s,
                    adaptive: self.adaptive,
                }
            }
            "--set_sdc_volume_limits" => {
                if self.limit_iops.is_none() && self.limit_bandwidth_kbps.is_none() {
                    bail!("missing --limit_iops and/or --limit_bandwidth_kbps");
                }
                Command::SetSdcVolumeLimits {
                    volume: vol()?,
                    sdc: self.need_sdc()?,
                    iops_limit: self.limit_iops,
                    bandwidth_limit_kbps: self.limit_bandwidth_kbps,
                }
            }
            "--remove_sdc" => Command::RemoveSdc {
                sdc: self.need_sdc()?,
            },
            "--rename_sdc" => Command::RenameSdc {
                sdc: self.need_sdc()?,
                new_name: new_name()?,
            },
            "--add_user" => {
                let Some(role) = self.user_role else {
                    bail!("missing --user_role");
                };
                let name = need(&self.username, "--username")?;
                Command::AddUser {
                    name: name.into(),
                    role,
                    password: self.new_user_password(name)?,
                }
            }
            "--remove_user" => Command::RemoveUser {
                name: need(&self.username, "--username")?.into(),
            },
            "--add_standby_mdm" => Command::AddStandbyMdm {
                addr: need(&self.new_mdm_ip, "--new_mdm_ip")?.into(),
                name: self.mdm_name.clone(),
            },
            "--remove_standby_mdm" => Command::RemoveStandbyMdm {
                name: need(&self.mdm_name, "--mdm_name")?.into(),
            },
            "--switch_cluster_mode" => {
                let Some(mode) = self.cluster_mode else {
                    bail!("missing --cluster_mode");
                };
                Command::SwitchClusterMode { mode }
            }
            _ => return Ok(None),
        };
        Ok(Some(c))
    }
}
