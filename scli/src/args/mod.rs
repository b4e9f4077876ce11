//! The command line: one command flag plus its options, as ScaleIO spells them, and the
//! dispatch from a command to an MDM request.
//!
//! clap checks the shape of a command line before anything else runs: exactly one command
//! flag (group `command`), the options each command needs (`requires`, often a group such as
//! `volume`: `--volume_name` or `--volume_id`, never both), options that exclude each other,
//! options that go with some commands only ([`command_line`] makes them conflict with every
//! other command, so the refusal names both), and numbers, sizes, ids, addresses, roles and
//! modes (`value_parser`s in `values`). A wrong command line gets clap's error and exit code 2,
//! and nothing is sent.
//!
//! `mod.rs` the flags and which command was given; `secrets` passwords (never from the command
//! line); `values` option values (value parsers, selectors, devices, labels); `ids` objects
//! given by id, resolved to their names from the map before the command is built; `command`
//! the [`proto::msg::Command`] each changing flag sends; `query` the [`proto::msg::Query`] each
//! query flag sends; `run` the session commands, `--i_am_sure` and the request to the MDM.

use clap::{ArgGroup, Parser};
use proto::model::{ClusterMode, Role};

mod command;
mod ids;
mod query;
mod run;
mod secrets;
mod values;

pub use run::run;
use values::{parse_adaptive, parse_addr, parse_cluster_mode, parse_gb_arg, parse_id, parse_role};

#[derive(Parser, Debug, Default)]
#[command(
    name = "scli",
    version,
    rename_all = "snake_case",
    about = "Meshblock admin CLI (ScaleIO grammar): one command flag plus its options",
    override_usage = "scli --COMMAND [OPTIONS]  (one command flag, e.g. --query_all; see --help)",

    group(ArgGroup::new("command").required(true).multiple(false)),
    group(ArgGroup::new("pd").args(["protection_domain_name", "protection_domain_id"])),
    group(ArgGroup::new("pool").args(["storage_pool_name", "storage_pool_id"])),
    group(ArgGroup::new("sds").args(["sds_name", "sds_id"])),
    group(ArgGroup::new("volume").args(["volume_name", "volume_id"])),
    group(ArgGroup::new("source_volume").args(["source_volume_name", "source_volume_id"])),
    group(ArgGroup::new("destination_volume")
        .args(["destination_volume_name", "destination_volume_id"])),
    group(ArgGroup::new("fault_set").args(["fault_set_name", "fault_set_id"])),
    group(ArgGroup::new("sdc").args(["sdc_name", "sdc_ip", "sdc_guid", "sdc_id"])),
    group(ArgGroup::new("unmap_from")
        .args(["sdc_name", "sdc_ip", "sdc_guid", "sdc_id", "all_sdcs"])),
    group(ArgGroup::new("mdm").args(["mdm_name", "mdm_id"])),
    group(ArgGroup::new("cadence")
        .args(["auto_snapshot_creation_cadence_in_min", "auto_snapshot_creation_cadence_in_sec"])),
    group(ArgGroup::new("rebuild_policy")
        .args(["concurrency", "bandwidth_mib_s", "adaptive"]).multiple(true)),
    group(ArgGroup::new("limits").args(["limit_iops", "limit_bandwidth_kbps"]).multiple(true)),
)]
pub struct Args {
    // ---- commands ----
    /// Log in: --username [--password_file FILE] [--mdm_ip]; the password also from
    /// MESHBLOCK_PASSWORD, or asked for on the terminal.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "username"
    )]
    pub login: bool,
    /// Forget the saved session.
    #[arg(long, help_heading = "Commands", group = "command")]
    pub logout: bool,
    /// --protection_domain_name.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "protection_domain_name"
    )]
    pub add_protection_domain: bool,
    /// (--protection_domain_name|--protection_domain_id) --i_am_sure: refused while it has
    /// storage pools, fault sets or SDS.
    #[arg(long, help_heading = "Commands", group = "command", requires = "pd")]
    pub remove_protection_domain: bool,
    /// (--protection_domain_name|--protection_domain_id) --fault_set_name.
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["pd", "fault_set_name"])]
    pub add_fault_set: bool,
    /// (--protection_domain_name --fault_set_name|--fault_set_id) --i_am_sure: refused while
    /// it has SDS.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "fault_set"
    )]
    pub remove_fault_set: bool,
    /// (--protection_domain_name|--protection_domain_id) --storage_pool_name
    /// [--media_type HDD|SSD|Transitional] [--pg_count N].
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["pd", "storage_pool_name"])]
    pub add_storage_pool: bool,
    /// (--storage_pool_name|--storage_pool_id) --i_am_sure: refused while it has volumes or
    /// devices.
    #[arg(long, help_heading = "Commands", group = "command", requires = "pool")]
    pub remove_storage_pool: bool,
    /// --sds_ip IP:PORT --sds_name (--protection_domain_name|_id) (--storage_pool_name|_id)
    /// --device_path P[,P] [--device_capacity_gb G[,G]] [--fault_set_name|--fault_set_id]
    /// [--wait: until it serves and the rebalance onto it is over].
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["sds_ip", "sds_name", "pd", "pool", "device_path"])]
    pub add_sds: bool,
    /// (--sds_name|--sds_id) --i_am_sure [--wait]. An SDS holding data is marked removing and
    /// the command returns at once: rebalance moves its copies off, then removes it (watch
    /// --query_sds). Refused, changing nothing, when the other SDS cannot hold its data.
    #[arg(long, help_heading = "Commands", group = "command", requires = "sds")]
    pub remove_sds: bool,
    /// (--sds_name|--sds_id): an SDS being removed keeps its copies and takes new ones again
    /// (moves already under way finish; rebalance then evens the pool out).
    #[arg(long, help_heading = "Commands", group = "command", requires = "sds")]
    pub abort_remove_sds: bool,
    /// (--sds_name|--sds_id) --new_name: the SDS keeps identifying itself by its certificate
    /// (sds:OLD_NAME), so it goes on serving.
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["sds", "new_name"])]
    pub rename_sds: bool,
    /// (--storage_pool_name|--storage_pool_id) [--concurrency N] [--bandwidth_mib_s N]
    /// [--adaptive on|off]: per-SDS limits of rebuild and rebalance copies (chunk copies in
    /// flight, MiB/s, 0 = unlimited; adaptive backs off to 1 copy at 10 MiB/s while the SDS
    /// serves client I/O).
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["pool", "rebuild_policy"])]
    pub set_rebuild_rebalance_policy: bool,
    /// (--sds_name|--sds_id) --device_path (--storage_pool_name|_id) [--device_capacity_gb].
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["sds", "device_path", "pool"])]
    pub add_sds_device: bool,
    /// (--sds_name|--sds_id) --device_path --i_am_sure [--wait]: its chunks move to the SDS's
    /// other devices first (PGs move off the SDS when those lack room), then it is removed;
    /// refused for an SDS's last device or when the rest cannot hold the data.
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["sds", "device_path"])]
    pub remove_sds_device: bool,
    /// (--sds_name|--sds_id) --device_path: a Failed device (fixed or replaced at the same
    /// path) is formatted anew by its SDS and returns as new capacity; its old data is not kept.
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["sds", "device_path"])]
    pub clear_sds_device_error: bool,
    /// (--storage_pool_name|_id) --size_gb --volume_name [--thin_provisioned|--thick_provisioned]
    /// [--preempt] [--label KEY=VALUE]...
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["pool", "size_gb", "volume_name"])]
    pub add_volume: bool,
    /// (--volume_name|--volume_id) --i_am_sure [--remove_mode only_me|including_descendants|
    /// descendants_only|whole_vtree].
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "volume"
    )]
    pub remove_volume: bool,
    /// (--volume_name|--volume_id) --size_gb (volumes only grow).
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["volume", "size_gb"])]
    pub modify_volume_capacity: bool,
    /// (--volume_name V[,V2...]|--volume_id) [--snapshot_name S[,S2...]]: a writable, thin
    /// snapshot of each volume, all at one instant (a consistency group when several). A
    /// snapshot is a volume: map it, snapshot it, give it to Docker.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "volume"
    )]
    pub snapshot_volume: bool,
    /// --consistency_group_id N (printed by --snapshot_volume and --query_vtree) --i_am_sure.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "consistency_group_id"
    )]
    pub remove_consistency_group_snapshots: bool,
    /// --snapshot_policy_name P (--auto_snapshot_creation_cadence_in_min N |
    /// --auto_snapshot_creation_cadence_in_sec N) --num_of_retained_snapshots_per_level
    /// L0[,L1...]: the MDM leader snapshots the policy's volumes together at that cadence and
    /// keeps the newest L0 runs, the newest L1 of every L0-th run, and so on.
    #[arg(long, help_heading = "Commands", group = "command",
        requires_all = ["snapshot_policy_name", "cadence", "num_of_retained_snapshots_per_level"])]
    pub add_snapshot_policy: bool,
    /// --snapshot_policy_name P (it must have no source volumes; its snapshots stay).
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "snapshot_policy_name"
    )]
    pub remove_snapshot_policy: bool,
    /// --snapshot_policy_name P (--volume_name V|--volume_id).
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["snapshot_policy_name", "volume"])]
    pub add_source_volume_to_snapshot_policy: bool,
    /// --snapshot_policy_name P (--volume_name V|--volume_id).
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["snapshot_policy_name", "volume"])]
    pub remove_source_volume_from_snapshot_policy: bool,
    /// --snapshot_policy_name P.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "snapshot_policy_name"
    )]
    pub pause_snapshot_policy: bool,
    /// --snapshot_policy_name P.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "snapshot_policy_name"
    )]
    pub resume_snapshot_policy: bool,
    /// (--source_volume_name S|--source_volume_id) (--destination_volume_name V|
    /// --destination_volume_id) --i_am_sure [--allow_overwrite_mapped]: V reads what S (a
    /// member of its V-tree) reads now.
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["source_volume", "destination_volume"])]
    pub overwrite_volume_content: bool,
    /// (--volume_name|--volume_id) --new_name.
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["volume", "new_name"])]
    pub rename_volume: bool,
    /// (--volume_name|--volume_id) (--sdc_name|--sdc_ip|--sdc_guid|--sdc_id)
    /// [--allow_multi_map] [--takeover].
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["volume", "sdc"])]
    pub map_volume_to_sdc: bool,
    /// (--volume_name|--volume_id) (--sdc_name|--sdc_ip|--sdc_guid|--sdc_id|--all_sdcs).
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["volume", "unmap_from"])]
    pub unmap_volume_from_sdc: bool,
    /// (--volume_name|--volume_id) (--sdc_name|--sdc_ip|--sdc_guid|--sdc_id) [--limit_iops N]
    /// [--limit_bandwidth_kbps N]; 0 = unlimited.
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["volume", "sdc", "limits"])]
    pub set_sdc_volume_limits: bool,
    /// (--sdc_name|--sdc_ip|--sdc_guid|--sdc_id) --i_am_sure: forget an SDC; refused while
    /// volumes are mapped to it or while it is connected. It comes back if it registers again.
    #[arg(long, help_heading = "Commands", group = "command", requires = "sdc")]
    pub remove_sdc: bool,
    /// (--sdc_name|--sdc_ip|--sdc_guid|--sdc_id) --new_name: the SDC keeps registering by its
    /// certificate (sdc:OLD_NAME).
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["sdc", "new_name"])]
    pub rename_sdc: bool,
    /// --username --user_role Monitor|Configure|Administrator [--password_file FILE]; without
    /// it the new user's password is asked for (twice) on the terminal.
    #[arg(long, help_heading = "Commands", group = "command", requires_all = ["username", "user_role"])]
    pub add_user: bool,
    /// --username --i_am_sure: refused for the last Administrator and for yourself.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "username"
    )]
    pub remove_user: bool,
    /// --new_mdm_ip IP:PORT [--mdm_name].
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "new_mdm_ip"
    )]
    pub add_standby_mdm: bool,
    /// (--mdm_name|--mdm_id) --i_am_sure: only a standby (a manager votes: switch the cluster
    /// mode down first).
    #[arg(long, help_heading = "Commands", group = "command", requires = "mdm")]
    pub remove_standby_mdm: bool,
    /// --cluster_mode 1_node|3_node|5_node.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "cluster_mode"
    )]
    pub switch_cluster_mode: bool,
    #[arg(long, help_heading = "Commands", group = "command")]
    pub query_all: bool,
    #[arg(long, help_heading = "Commands", group = "command")]
    pub query_cluster: bool,
    /// --protection_domain_name|--protection_domain_id.
    #[arg(long, help_heading = "Commands", group = "command", requires = "pd")]
    pub query_protection_domain: bool,
    /// --storage_pool_name|--storage_pool_id [--watch].
    #[arg(long, help_heading = "Commands", group = "command", requires = "pool")]
    pub query_storage_pool: bool,
    #[arg(long, help_heading = "Commands", group = "command")]
    pub query_all_sds: bool,
    /// --sds_name|--sds_id.
    #[arg(long, help_heading = "Commands", group = "command", requires = "sds")]
    pub query_sds: bool,
    /// [--sdc_name|--sdc_ip|--sdc_guid|--sdc_id]: one SDC, or all.
    #[arg(long, help_heading = "Commands", group = "command")]
    pub query_sdc: bool,
    /// --volume_name|--volume_id.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "volume"
    )]
    pub query_volume: bool,
    #[arg(long, help_heading = "Commands", group = "command")]
    pub query_all_volumes: bool,
    /// --volume_name|--volume_id: the volume's V-tree, each member's size and the space it
    /// alone holds.
    #[arg(
        long,
        help_heading = "Commands",
        group = "command",
        requires = "volume"
    )]
    pub query_vtree: bool,
    /// [--snapshot_policy_name P]: one snapshot policy, or all.
    #[arg(long, help_heading = "Commands", group = "command")]
    pub query_snapshot_policy: bool,
    /// [--since WHEN]: what happened (SDS down and up, failed devices, rebuilds, takeovers,
    /// leader changes, logins, commands), oldest first.
    #[arg(long, help_heading = "Commands", group = "command")]
    pub query_events: bool,
    /// What losing each SDS, fault set or device would do now: PGs left with one copy or none,
    /// data to rebuild and how long; and which single losses the cluster cannot survive.
    #[arg(long, help_heading = "Commands", group = "command")]
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
    /// Confirm a command that removes something for good (--remove_*, except snapshot policy
    /// and source volume removals, and --overwrite_volume_content).
    #[arg(long)]
    pub i_am_sure: bool,
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
    /// The names the ids given were looked up as ([`Args::resolve_ids`]): sent with the
    /// command, so the MDM refuses it if an object was renamed or replaced in between.
    #[arg(skip)]
    pub bindings: Vec<proto::msg::Binding>,
    /// Monitor, Configure or Administrator.
    #[arg(long, value_parser = parse_role)]
    pub user_role: Option<Role>,
    #[arg(long)]
    pub protection_domain_name: Option<String>,
    /// A protection domain's id, as scli prints it (hex).
    #[arg(long, value_parser = parse_id, value_name = "ID")]
    pub protection_domain_id: Option<u64>,
    /// With --protection_domain_name (fault set names are unique within a protection domain).
    #[arg(long, requires = "pd")]
    pub fault_set_name: Option<String>,
    /// A fault set's id, as scli prints it (hex).
    #[arg(long, value_parser = parse_id, value_name = "ID")]
    pub fault_set_id: Option<u64>,
    #[arg(long)]
    pub storage_pool_name: Option<String>,
    /// A storage pool's id, as scli prints it (hex).
    #[arg(long, value_parser = parse_id, value_name = "ID")]
    pub storage_pool_id: Option<u64>,
    #[arg(long, ignore_case = true, value_parser = ["HDD", "SSD", "Transitional"])]
    pub media_type: Option<String>,
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub pg_count: Option<u32>,
    /// The SDS's data address, IP:PORT.
    #[arg(long, value_parser = parse_addr)]
    pub sds_ip: Option<String>,
    #[arg(long)]
    pub sds_name: Option<String>,
    /// An SDS's id, as scli prints it (hex).
    #[arg(long, value_parser = parse_id, value_name = "ID")]
    pub sds_id: Option<u64>,
    #[arg(long)]
    pub device_path: Option<String>,
    /// GB per --device_path, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_gb_arg)]
    pub device_capacity_gb: Vec<u64>,
    #[arg(long)]
    pub volume_name: Option<String>,
    /// A volume's id, as scli prints it (hex).
    #[arg(long, value_parser = parse_id, value_name = "ID")]
    pub volume_id: Option<u64>,
    #[arg(long)]
    pub new_name: Option<String>,
    /// With --snapshot_volume: the snapshots' names, comma-separated, one per volume.
    #[arg(long)]
    pub snapshot_name: Option<String>,
    /// With --remove_volume: what goes besides the volume (default only_me).
    #[arg(long, value_parser = clap::value_parser!(proto::msg::RemoveMode))]
    pub remove_mode: Option<proto::msg::RemoveMode>,
    #[arg(long)]
    pub consistency_group_id: Option<u64>,
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
    #[arg(long, value_parser = parse_id, value_name = "ID")]
    pub source_volume_id: Option<u64>,
    #[arg(long)]
    pub destination_volume_name: Option<String>,
    #[arg(long, value_parser = parse_id, value_name = "ID")]
    pub destination_volume_id: Option<u64>,
    /// With --overwrite_volume_content: even while the destination is mapped (its hosts see
    /// its content change under them).
    #[arg(long)]
    pub allow_overwrite_mapped: bool,
    /// GB (decimal allowed), more than 0 and at most 1048576.
    #[arg(long, value_parser = parse_gb_arg)]
    pub size_gb: Option<u64>,
    #[arg(long, conflicts_with = "thick_provisioned")]
    pub thin_provisioned: bool,
    #[arg(long)]
    pub thick_provisioned: bool,
    #[arg(long)]
    pub sdc_name: Option<String>,
    #[arg(long)]
    pub sdc_ip: Option<String>,
    #[arg(long)]
    pub sdc_guid: Option<String>,
    /// An SDC's id, as scli prints it (hex).
    #[arg(long, value_parser = parse_id, value_name = "ID")]
    pub sdc_id: Option<u64>,
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
    pub limit_iops: Option<u64>,
    #[arg(long)]
    pub limit_bandwidth_kbps: Option<u64>,
    /// The new MDM's address, IP:PORT.
    #[arg(long, value_parser = parse_addr)]
    pub new_mdm_ip: Option<String>,
    #[arg(long)]
    pub mdm_name: Option<String>,
    /// An MDM's id, as --query_cluster prints it (hex).
    #[arg(long, value_parser = parse_id, value_name = "ID")]
    pub mdm_id: Option<u64>,
    #[arg(long, value_parser = parse_cluster_mode)]
    pub cluster_mode: Option<ClusterMode>,
    #[arg(long)]
    pub concurrency: Option<u32>,
    #[arg(long)]
    pub bandwidth_mib_s: Option<u32>,
    /// on or off.
    #[arg(long, value_parser = parse_adaptive)]
    pub adaptive: Option<bool>,
}

/// Options that go with some commands only (by id): clap refuses them with any other command,
/// naming both.
const ONLY_WITH: &[(&str, &[&str])] = &[
    ("since", &["query_events"]),
    ("watch", &["query_storage_pool"]),
    ("wait", &["add_sds", "remove_sds", "remove_sds_device"]),
    ("remove_mode", &["remove_volume"]),
    ("allow_overwrite_mapped", &["overwrite_volume_content"]),
    ("allow_multi_map", &["map_volume_to_sdc"]),
    ("takeover", &["map_volume_to_sdc"]),
    ("preempt", &["add_volume"]),
    ("labels", &["add_volume"]),
    ("thin_provisioned", &["add_volume"]),
    ("thick_provisioned", &["add_volume"]),
];

/// The command line's grammar: [`Args`] and, for each option of [`ONLY_WITH`], a conflict with
/// every command it does not go with (the commands are the flags under the "Commands" heading).
pub fn command_line() -> clap::Command {
    let mut cmd = <Args as clap::CommandFactory>::command();
    let commands: Vec<clap::Id> = cmd
        .get_arguments()
        .filter(|a| a.get_help_heading() == Some("Commands"))
        .map(|a| a.get_id().clone())
        .collect();
    for (option, with) in ONLY_WITH {
        let others: Vec<clap::Id> = commands
            .iter()
            .filter(|c| !with.contains(&c.as_str()))
            .cloned()
            .collect();
        cmd = cmd.mut_arg(*option, |a| a.conflicts_with_all(others));
    }
    cmd
}

/// Parse `args` (the program name first) with [`command_line`].
pub fn try_parse_from<I, T>(args: I) -> Result<Args, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut m = command_line().try_get_matches_from(args)?;
    <Args as clap::FromArgMatches>::from_arg_matches_mut(&mut m)
}

impl Args {
    /// The command flags given (clap lets exactly one through).
    fn commands(&self) -> Vec<&'static str> {
        let all = [
            (self.login, "--login"),
            (self.logout, "--logout"),
            (self.add_protection_domain, "--add_protection_domain"),
            (self.remove_protection_domain, "--remove_protection_domain"),
            (self.add_fault_set, "--add_fault_set"),
            (self.remove_fault_set, "--remove_fault_set"),
            (self.add_storage_pool, "--add_storage_pool"),
            (self.remove_storage_pool, "--remove_storage_pool"),
            (self.add_sds, "--add_sds"),
            (self.remove_sds, "--remove_sds"),
            (self.abort_remove_sds, "--abort_remove_sds"),
            (self.rename_sds, "--rename_sds"),
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
            (self.remove_sdc, "--remove_sdc"),
            (self.rename_sdc, "--rename_sdc"),
            (self.add_user, "--add_user"),
            (self.remove_user, "--remove_user"),
            (self.add_standby_mdm, "--add_standby_mdm"),
            (self.remove_standby_mdm, "--remove_standby_mdm"),
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

/// Commands that remove something for good: refused without `--i_am_sure`.
pub const DESTRUCTIVE: &[&str] = &[
    "--remove_protection_domain",
    "--remove_fault_set",
    "--remove_storage_pool",
    "--remove_sds",
    "--remove_sds_device",
    "--remove_volume",
    "--remove_consistency_group_snapshots",
    "--overwrite_volume_content",
    "--remove_sdc",
    "--remove_user",
    "--remove_standby_mdm",
];

#[cfg(test)]
mod tests;
