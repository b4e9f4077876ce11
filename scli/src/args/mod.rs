//! The command line: one command flag plus its options, as ScaleIO spells them, and the
//! dispatch from a command to an MDM request.
//!
//! `mod.rs` the flags (clap) and which command was given; `secrets` passwords (never from the
//! command line); `values` option values (names, numbers, sizes, selectors, devices, labels);
//! `command` the [`Command`] each changing flag sends; `query` the [`Query`] each query flag
//! sends; `run` the session commands and the request to the MDM.

use clap::Parser;

mod command;
mod query;
mod run;
mod secrets;
mod values;

pub use run::run;

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
    /// line (chunks and PG copies left, copy rate, ETA).
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
}

#[cfg(test)]
mod tests;
