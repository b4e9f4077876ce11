//! The `mdm` binary: runs an MDM, or manages the cluster CA.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use mdm::config::MdmConfig;
use mdm::raft::node::{self, NodeConfig};
use mdm::service::{self, Service};
use mdm::state_machine::Op;
use mdm::store::{MetaStore, SledStore};
use proto::model::{MdmMember, MdmRole, Role, User};
use proto::transport::{Endpoint, Identity};
use proto::MdmId;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "mdm", version, about = "Meshblock metadata manager (MDM)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run an MDM. A brand-new cluster starts from one MDM run with --bootstrap; more MDMs are
    /// started without it and joined with `scli --add_standby_mdm` and `--switch_cluster_mode`.
    Run(RunArgs),
    /// Manage the cluster certificate authority.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Print the default configuration as TOML.
    PrintDefaultConfig,
    /// Validate a configuration file and exit.
    CheckConfig {
        /// The file to check.
        config: PathBuf,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML); flags override it.
    #[arg(long)]
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
    /// Create a new cluster with this MDM as its only member (ignored once initialized).
    #[arg(long)]
    bootstrap: bool,
    /// Password of the `admin` user created with the cluster (or env MESHBLOCK_ADMIN_PASSWORD).
    #[arg(long, env = "MESHBLOCK_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
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
    /// Issue a certificate signed by the cluster CA for one process or admin host.
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
            proto::ca::issue(&ca_dir, &name, &out).context("issue a certificate")?;
            println!("Issued a certificate for {name} in {}", out.display());
            Ok(())
        }
        Cmd::PrintDefaultConfig => {
            print!("{}", toml::to_string(&MdmConfig::default())?);
            Ok(())
        }
        Cmd::CheckConfig { config } => {
            let cfg = load_config(&config)?;
            cfg.validate().map_err(anyhow::Error::msg)?;
            println!("{}: OK", config.display());
            Ok(())
        }
        Cmd::Run(args) => run(args),
    }
}

fn load_config(path: &Path) -> anyhow::Result<MdmConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let (cfg, unknown) =
        MdmConfig::parse(&text).with_context(|| format!("parse {}", path.display()))?;
    for k in unknown {
        tracing::warn!("unknown config key {k} in {} ignored", path.display());
    }
    Ok(cfg)
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    proto::daemon::init_logging();
    let mut cfg = match &args.config {
        Some(p) => load_config(p)?,
        None => MdmConfig::default(),
    };
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
    if let Some(v) = args.metrics_listen {
        cfg.metrics_listen = v;
    }
    if let Some(v) = args.snapshot_interval_entries {
        cfg.snapshot_interval_entries = v;
    }
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("validate the configuration")?;
    if args.bootstrap && args.admin_password.as_deref().is_none_or(|p| p.len() < 6) {
        bail!("--bootstrap needs --admin-password (at least 6 characters) for the admin user");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(
        cfg,
        args.bootstrap,
        args.admin_password.unwrap_or_default(),
    ))
}

fn node_id(store: &dyn MetaStore) -> anyhow::Result<MdmId> {
    if let Some(v) = store.get("node", b"id")? {
        let a: [u8; 8] = v
            .as_slice()
            .try_into()
            .context("read this MDM's id: corrupt value")?;
        return Ok(MdmId(u64::from_be_bytes(a)));
    }
    let id = loop {
        let v: u64 = rand::random::<u64>() >> 1;
        if v != 0 {
            break v;
        }
    };
    store.put("node", b"id", &id.to_be_bytes())?;
    store.flush()?;
    Ok(MdmId(id))
}

async fn serve(cfg: MdmConfig, bootstrap: bool, admin_password: String) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("create {}", cfg.data_dir.display()))?;
    let store: Arc<dyn MetaStore> =
        Arc::new(SledStore::open(&cfg.data_dir.join("db")).context("open the metadata store")?);
    let id = node_id(&*store)?;
    let identity = Identity::load(&cfg.cert_dir).context("load this MDM's certificate")?;
    let endpoint =
        Endpoint::server(cfg.listen, &identity, &format!("mdm:{}", cfg.name)).context("listen")?;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(node::INBOX_LEN);
    let node_cfg = NodeConfig {
        tick: Duration::from_millis(cfg.tick_ms),
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        snapshot_interval_entries: cfg.snapshot_interval_entries,
    };
    let (raft, _thread) =
        node::start(store, id, node_cfg, bootstrap, out_tx).context("start raft")?;
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
        },
    );
    tokio::spawn(mdm::raft_net::raft_network(svc.clone(), out_rx));
    tokio::spawn(svc.clone().watch_sds());
    tokio::spawn(svc.clone().rebalance());
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
                metrics.set_pools(&r2.shared.read_state(), &s2.sds_stats());
            } else {
                metrics.clear_pools();
            }
        }
    });
    if bootstrap {
        let name = cfg.name.clone();
        let cluster_name = cfg.cluster_name.clone();
        let raft = raft.clone();
        tokio::spawn(async move {
            bootstrap_cluster(raft, name, advertise, cluster_name, admin_password).await
        });
    }
    tracing::info!(id = %id, listen = %cfg.listen, "MDM {} serving", cfg.name);
    let ep = endpoint.clone();
    tokio::select! {
        _ = ep.serve(svc) => {}
        _ = proto::daemon::shutdown_signal() => tracing::info!("shutting down"),
    }
    endpoint.close();
    Ok(())
}

/// Once this MDM leads its fresh single-node group, commit the cluster's birth: its id, token
/// secret, the admin user and this MDM as the first manager.
async fn bootstrap_cluster(
    raft: mdm::raft::RaftHandle,
    name: String,
    addr: String,
    cluster_name: String,
    password: String,
) {
    loop {
        let st = raft.shared.status();
        if st.is_leader && st.leader_ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if raft.shared.read_state().cluster_id != 0 {
        return;
    }
    let salt = mdm::auth::random_hex(16);
    let admin = User {
        name: "admin".into(),
        role: Role::Administrator,
        password_sha256: mdm::auth::hash_password(&salt, &password),
        salt,
    };
    let op = Op::Bootstrap {
        cluster_id: rand::random::<u64>() | 1 << 63,
        cluster_name,
        secret: mdm::auth::random_hex(32),
        admin,
        mdm: MdmMember {
            id: raft.id,
            name,
            addr,
            role: MdmRole::Manager,
        },
    };
    match raft.propose(op).await {
        Ok(_) => tracing::info!("created a new cluster; log in with scli --login --username admin"),
        Err(e) => tracing::error!("failed to create the cluster: {e}"),
    }
}
