//! The `mdm` binary: runs an MDM, or manages the cluster CA.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use mdm::config::MdmConfig;
use mdm::raft::node::{self, NodeConfig};
use mdm::service::{self, Service};
use mdm::store::{MetaStore, SledStore};
use proto::transport::{Endpoint, Identity};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mdm",
    version,
    about = "Meshblock metadata manager (MDM)",
    after_help = "Configuration: /etc/meshblock/mdm.toml unless --config names another file \
                  (built-in defaults when that file does not exist); flags override it."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an MDM. A brand-new cluster starts from one MDM made with `mdm bootstrap`; more
    /// MDMs are started on empty data directories and joined with `scli --add_standby_mdm` and
    /// `--switch_cluster_mode`.
    Run(RunArgs),
    /// Make this MDM's data directory the first member of a new cluster, with the `admin`
    /// user, and exit; then run it with `mdm run` (or systemctl start meshblock-mdm). A data
    /// directory that already belongs to a cluster is left as it is ("already bootstrapped").
    Bootstrap(BootstrapArgs),
    /// Manage the cluster certificate authority (the same as `meshblock-ca init|issue`).
    #[command(subcommand)]
    Ca(CaCmd),
    /// Print the default configuration as commented TOML (what /etc/meshblock/mdm.toml holds
    /// when installed).
    PrintDefaultConfig,
    /// Validate a configuration file (default /etc/meshblock/mdm.toml) and exit.
    CheckConfig {
        /// The file to check.
        config: Option<PathBuf>,
    },
}

/// Where the configuration comes from: the file, then these flags.
#[derive(Args)]
struct ConfigArgs {
    /// Configuration file (TOML); flags override it. Default: /etc/meshblock/mdm.toml, or the
    /// built-in defaults when that file does not exist. A file given here must exist.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Name shown by `scli --query_cluster`.
    #[arg(long)]
    name: Option<String>,
    /// QUIC listen address.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Address other processes dial to reach this MDM.
    #[arg(long)]
    advertise: Option<std::net::SocketAddr>,
    /// Raft data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Certificate directory (node.pem, node.key, ca.pem).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Prometheus metrics HTTP address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Applied entries between log compactions.
    #[arg(long)]
    snapshot_interval_entries: Option<u64>,
    /// HTTPS address of the REST API and dashboard, or "off".
    #[arg(long)]
    api_listen: Option<String>,
    /// Seconds between the leader's samples of I/O rates for the dashboard.
    #[arg(long)]
    history_sample_secs: Option<u64>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Refused: a cluster is now created with `mdm bootstrap` (once, before the first run).
    #[arg(long, hide = true)]
    bootstrap: bool,
    /// Refused: a password on the command line shows in `ps`.
    #[arg(long = "admin-password", hide = true, value_name = "REFUSED")]
    refused_admin_password: Option<String>,
}

#[derive(Args)]
struct BootstrapArgs {
    #[command(flatten)]
    cfg: ConfigArgs,
    /// File holding the password of the `admin` user (its first line, at least 6 characters;
    /// keep it mode 0600). Without it the password is asked for on the terminal.
    #[arg(long, value_name = "FILE")]
    admin_password_file: Option<PathBuf>,
    /// Refused: a password on the command line shows in `ps`.
    #[arg(long = "admin-password", hide = true, value_name = "REFUSED")]
    refused_admin_password: Option<String>,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create the cluster CA (ca.pem, ca.key) in a directory.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "meshblock")]
        cluster_name: String,
    },
    /// Issue a certificate signed by the cluster CA for one process or admin host, its key
    /// made beside the CA (labs; hosts of a real cluster use `meshblock-ca csr` and `sign`).
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Who the certificate is for: mdm, sds:NAME, sdc:NAME, admin.
        #[arg(long)]
        name: String,
        /// Directory to write node.pem, node.key and ca.pem into.
        #[arg(long)]
        out: PathBuf,
    },
}

/// The refusal of a password given on the command line.
const PASSWORD_FLAG_GONE: &str = "--admin-password is no longer accepted: a password on the \
     command line shows in `ps`. Write it to a file only root can read (chmod 600) and pass \
     --admin-password-file FILE, or leave both out to be asked on the terminal";

fn main() -> std::process::ExitCode {
    proto::daemon::install_panic_hook("mdm");
    proto::daemon::exit_with(cli_main())
}

fn cli_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Ca(CaCmd::Init { dir, cluster_name }) => {
            proto::ca::init_ca(&dir, &cluster_name).context("create the cluster CA")?;
            println!("Created the cluster CA in {}", dir.display());
            Ok(())
        }
        Cmd::Ca(CaCmd::Issue { ca_dir, name, out }) => {
            proto::ca::check_common_name(&name)?;
            proto::ca::issue(&ca_dir, &name, &out).context("issue a certificate")?;
            println!("Issued a certificate for {name} in {}", out.display());
            Ok(())
        }
        Cmd::PrintDefaultConfig => {
            print!("{}", MdmConfig::default_toml());
            Ok(())
        }
        Cmd::CheckConfig { config } => {
            let (cfg, path) = load_config(config.as_deref())?;
            cfg.validate().map_err(anyhow::Error::msg)?;
            match path {
                Some(p) => println!("{}: OK", p.display()),
                None => println!("no configuration file; the built-in defaults are OK"),
            }
            Ok(())
        }
        Cmd::Run(args) => run(args),
        Cmd::Bootstrap(args) => bootstrap(args),
    }
}

/// The configuration file (the one named, else the default one when it exists), and its path.
fn load_config(explicit: Option<&Path>) -> anyhow::Result<(MdmConfig, Option<PathBuf>)> {
    let default = proto::config_file::default_path("mdm");
    let Some((path, text)) = proto::config_file::read("mdm", explicit, &default)? else {
        return Ok((MdmConfig::default(), None));
    };
    let (cfg, unknown) =
        MdmConfig::parse(&text).with_context(|| format!("parse {}", path.display()))?;
    for k in unknown {
        tracing::warn!("unknown config key {k} in {} ignored", path.display());
    }
    Ok((cfg, Some(path)))
}

/// The configuration: file, then flags, then validation.
fn configure(args: ConfigArgs) -> anyhow::Result<MdmConfig> {
    let (mut cfg, _) = load_config(args.config.as_deref())?;
    if let Some(v) = args.name {
        cfg.name = v;
    }
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = args.advertise {
        cfg.advertise = Some(v);
    }
    if let Some(v) = args.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = args.cert_dir {
        cfg.cert_dir = v;
    }
    if let Some(v) = args.api_listen {
        cfg.api_listen = v;
    }
    if let Some(v) = args.history_sample_secs {
        cfg.history_sample_secs = v;
    }
    if let Some(v) = args.metrics_listen {
        cfg.metrics_listen = v;
    }
    if let Some(v) = args.snapshot_interval_entries {
        cfg.snapshot_interval_entries = v;
    }
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("validate the configuration")?;
    Ok(cfg)
}

fn node_config(cfg: &MdmConfig) -> NodeConfig {
    NodeConfig {
        tick: Duration::from_millis(cfg.tick_ms),
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        snapshot_interval_entries: cfg.snapshot_interval_entries,
    }
}

fn open_store(cfg: &MdmConfig) -> anyhow::Result<Arc<dyn MetaStore>> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create {}", cfg.data_dir.display()))?;
    let db = cfg.data_dir.join("db");
    let store = SledStore::open(&db).with_context(|| {
        format!(
            "open the metadata store {} (an MDM running on it holds it: stop that first)",
            db.display()
        )
    })?;
    Ok(Arc::new(store))
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    proto::daemon::init_logging();
    if args.refused_admin_password.is_some() {
        bail!(PASSWORD_FLAG_GONE);
    }
    if args.bootstrap {
        bail!(
            "mdm run --bootstrap is no longer accepted: create the cluster once with \
             `mdm bootstrap --config FILE --admin-password-file FILE`, then start `mdm run`"
        );
    }
    let cfg = configure(args.cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(cfg))
}

/// The admin password: from its file, or asked for on the terminal.
fn admin_password(file: Option<&Path>) -> anyhow::Result<String> {
    let password = match file {
        Some(f) => proto::secret::read_file(f)?,
        None if proto::secret::can_prompt() => {
            proto::secret::prompt("Password for the new cluster's admin user: ", true)?
        }
        None => bail!(
            "give the admin user's password with --admin-password-file FILE (its first line; \
             chmod 600), or run mdm bootstrap on a terminal to be asked for it"
        ),
    };
    if password.chars().count() < BOOTSTRAP_MIN_PASSWORD {
        bail!("the admin password must have at least {BOOTSTRAP_MIN_PASSWORD} characters");
    }
    Ok(password)
}

const BOOTSTRAP_MIN_PASSWORD: usize = mdm::bootstrap::MIN_PASSWORD_LEN;

fn bootstrap(args: BootstrapArgs) -> anyhow::Result<()> {
    proto::daemon::init_logging();
    if args.refused_admin_password.is_some() {
        bail!(PASSWORD_FLAG_GONE);
    }
    let cfg = configure(args.cfg)?;
    let store = open_store(&cfg)?;
    // Nothing is asked for (nor any password file read) when there is nothing to do.
    if let Some(done) = mdm::bootstrap::already(&store)? {
        println!("{}", outcome_line(&cfg, &done));
        return Ok(());
    }
    let password = admin_password(args.admin_password_file.as_deref())?;
    let addr = cfg.advertise_addr();
    if addr.ip().is_loopback() && !cfg.listen.ip().is_loopback() {
        tracing::warn!(
            "this MDM is recorded in the cluster map at {addr}, which other hosts cannot reach: \
             set advertise in the configuration for a cluster of several hosts"
        );
    }
    let birth = mdm::bootstrap::Birth {
        name: cfg.name.clone(),
        addr: addr.to_string(),
        cluster_name: cfg.cluster_name.clone(),
        admin_password: password,
    };
    let outcome = mdm::bootstrap::bootstrap(store, birth, node_config(&cfg))
        .context("bootstrap the cluster")?;
    println!("{}", outcome_line(&cfg, &outcome));
    Ok(())
}

fn outcome_line(cfg: &MdmConfig, outcome: &mdm::bootstrap::Outcome) -> String {
    use mdm::bootstrap::Outcome;
    let dir = cfg.data_dir.display();
    match outcome {
        Outcome::Created { cluster_id } => format!(
            "Created cluster {} ({cluster_id:016x}) in {dir} with this MDM ({}) as its only \
             member. Start it (mdm run, or systemctl start meshblock-mdm) and log in with \
             scli --login --username admin.",
            cfg.cluster_name, cfg.name
        ),
        Outcome::AlreadyBootstrapped { cluster_id } => {
            format!("{dir} is already bootstrapped (cluster {cluster_id:016x}); nothing changed.")
        }
        Outcome::AlreadyMember { voters, learners } => format!(
            "{dir} is already bootstrapped: it belongs to a cluster ({voters} voting MDM(s), \
             {learners} standby); nothing changed."
        ),
    }
}

async fn serve(cfg: MdmConfig) -> anyhow::Result<()> {
    let store = open_store(&cfg)?;
    let id = mdm::bootstrap::node_id(&*store)?;
    let identity = Identity::load(&cfg.cert_dir).context("load this MDM's certificate")?;
    let endpoint =
        Endpoint::server(cfg.listen, &identity, &format!("mdm:{}", cfg.name)).context("listen")?;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(node::INBOX_LEN);
    let (raft, _thread) =
        node::start(store, id, node_config(&cfg), false, out_tx).context("start raft")?;
    let metrics = mdm::metrics::MdmMetrics::new();
    let advertise = cfg.advertise_addr().to_string();
    let svc = Service::new(
        raft.clone(),
        endpoint.clone(),
        advertise.clone(),
        cfg.session_ttl_secs,
        metrics.clone(),
        service::Timeouts {
            sds_down: Duration::from_millis(cfg.sds_down_timeout_ms),
            sdc_session: Duration::from_millis(cfg.sdc_session_timeout_ms),
            backward_window: Duration::from_millis(cfg.backward_rebuild_window_ms),
            history_sample: Duration::from_secs(cfg.history_sample_secs),
        },
    );
    if let (Some(addr), Some(url)) = (cfg.api_addr().map_err(anyhow::Error::msg)?, cfg.api_url()) {
        let dir = cfg
            .api_cert_dir
            .clone()
            .unwrap_or_else(|| cfg.cert_dir.clone());
        let tls = Identity::load(&dir)
            .and_then(|i| i.https_server_config())
            .with_context(|| format!("load the HTTPS certificate from {}", dir.display()))?;
        let _ = svc.api_url.set(url);
        let s = svc.clone();
        tokio::spawn(async move {
            if let Err(e) = mdm::rest::serve(s, addr, tls).await {
                tracing::warn!("REST API and dashboard on {addr} stopped: {e}");
            }
        });
    }
    tokio::spawn(svc.clone().sample_history());
    tokio::spawn(mdm::raft_net::raft_network(svc.clone(), out_rx));
    tokio::spawn(svc.clone().watch_sds());
    tokio::spawn(svc.clone().rebalance());
    tokio::spawn(svc.clone().run_snapshot_policies());
    tokio::spawn(svc.clone().record_leadership());
    let m = metrics.clone();
    let metrics_addr = cfg.metrics_listen;
    tokio::spawn(async move {
        if let Err(e) = mdm::metrics::serve(metrics_addr, m).await {
            tracing::warn!("metrics endpoint on {metrics_addr} stopped: {e}");
        }
    });
    let r2 = raft.clone();
    let s2 = svc.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let st = r2.shared.status();
            metrics.is_leader.set(i64::from(st.is_leader));
            metrics.term.set(st.term as i64);
            metrics.commit_index.set(st.commit as i64);
            metrics.applied_index.set(st.applied as i64);
            if st.is_leader {
                let state = r2.shared.read_state();
                let status = s2.cluster_status(&state);
                metrics.set_pools(&state, &status.sds_stats);
                metrics.set_cluster(&state, &status);
            } else {
                metrics.clear_pools();
            }
        }
    });
    tracing::info!(id = %id, listen = %cfg.listen, "MDM {} serving", cfg.name);
    tokio::spawn(notify_ready(raft.clone(), &cfg));
    let ep = endpoint.clone();
    tokio::select! {
        _ = ep.serve(svc) => {}
        _ = proto::daemon::shutdown_signal() => {
            tracing::info!("shutting down");
            proto::daemon::notify(proto::daemon::NOTIFY_STOPPING);
        }
    }
    endpoint.close();
    Ok(())
}

/// Tell systemd (Type=notify) that this MDM serves: its listener is bound and Raft runs. A
/// member of a cluster first waits, for a few election timeouts at most, until it knows a
/// leader, so a unit ordered after it finds the cluster answering; an MDM no group has added
/// yet (a standby before `--add_standby_mdm`), or one whose peers are down, is ready after
/// that wait all the same: it serves what it can and answers the rest with "no leader".
fn notify_ready(
    raft: mdm::raft::RaftHandle,
    cfg: &MdmConfig,
) -> impl std::future::Future<Output = ()> {
    let wait = Duration::from_millis(cfg.tick_ms * cfg.election_ticks as u64 * 4);
    let listen = cfg.listen;
    async move {
        let deadline = tokio::time::Instant::now() + wait;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let leader = loop {
            tick.tick().await;
            let st = raft.shared.status();
            if st.leader_id != 0 {
                break Some(st.leader_id);
            }
            if tokio::time::Instant::now() >= deadline {
                break None;
            }
        };
        let status = match leader {
            Some(l) => format!("serving on {listen}; Raft leader {l:016x}"),
            None => format!("serving on {listen}; no Raft leader known yet"),
        };
        proto::daemon::notify(&format!("{}\nSTATUS={status}", proto::daemon::NOTIFY_READY));
    }
}
