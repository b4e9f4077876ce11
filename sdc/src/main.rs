//! The `sdc` binary: the storage data client daemon (`sdc run`).

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use proto::client::{parse_addrs, MdmClient};
use proto::transport::{Endpoint, Identity};
use sdc::config::SdcConfig;
use sdc::daemon;
use sdc::io_path::IoPath;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sdc",
    version,
    about = "Meshblock storage data client (SDC): serves mapped volumes over NBD"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the SDC daemon.
    Run(RunArgs),
    /// Print the default configuration as TOML.
    PrintDefaultConfig,
    /// Validate a configuration file and exit.
    CheckConfig { config: PathBuf },
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Name of this host in the cluster.
    #[arg(long)]
    name: Option<String>,
    /// MDM addresses, comma-separated IP:PORT.
    #[arg(long)]
    mdm: Option<String>,
    /// Certificate directory (node.pem, node.key, ca.pem).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// State directory (the SDC's GUID).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Unix socket for NBD.
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Also serve NBD on this TCP address.
    #[arg(long)]
    nbd_tcp: Option<std::net::SocketAddr>,
    /// Prometheus metrics HTTP address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    proto::daemon::install_panic_hook("sdc");
    match Cli::parse().cmd {
        Cmd::PrintDefaultConfig => {
            print!("{}", toml::to_string(&SdcConfig::default())?);
            Ok(())
        }
        Cmd::CheckConfig { config } => {
            load_config(&config)?
                .validate()
                .map_err(anyhow::Error::msg)?;
            println!("{}: OK", config.display());
            Ok(())
        }
        Cmd::Run(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            let mut cfg = match &a.config {
                Some(p) => load_config(p)?,
                None => SdcConfig::default(),
            };
            if let Some(v) = a.name {
                cfg.name = v;
            }
            if let Some(v) = a.mdm {
                cfg.mdm = v.split(',').map(|s| s.trim().to_string()).collect();
            }
            if let Some(v) = a.cert_dir {
                cfg.cert_dir = v;
            }
            if let Some(v) = a.state_dir {
                cfg.state_dir = v;
            }
            if let Some(v) = a.nbd_socket {
                cfg.nbd_socket = v;
            }
            if let Some(v) = a.nbd_tcp {
                cfg.nbd_tcp = Some(v);
            }
            if let Some(v) = a.metrics_listen {
                cfg.metrics_listen = v;
            }
            cfg.validate()
                .map_err(anyhow::Error::msg)
                .context("validate the configuration")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(run(cfg))
        }
    }
}

fn load_config(path: &Path) -> anyhow::Result<SdcConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let (cfg, unknown) =
        SdcConfig::parse(&text).with_context(|| format!("parse {}", path.display()))?;
    for k in unknown {
        tracing::warn!("unknown config key {k} in {} ignored", path.display());
    }
    Ok(cfg)
}

async fn run(cfg: SdcConfig) -> anyhow::Result<()> {
    let name = cfg.effective_name();
    let guid = daemon::load_or_create_guid(&cfg.state_dir)?;
    let identity = Identity::load(&cfg.cert_dir).context("load this SDC's certificate")?;
    let endpoint =
        Endpoint::client(&identity, &format!("sdc:{name}")).context("create the QUIC endpoint")?;
    let addrs = parse_addrs(&cfg.mdm.join(","), 7611).map_err(anyhow::Error::msg)?;
    let mdm = Arc::new(MdmClient::new(endpoint.clone(), addrs));
    let io = IoPath::new(
        mdm.clone(),
        endpoint,
        Duration::from_millis(cfg.io_timeout_ms),
    );
    tokio::spawn(io.clone().fast_poll());
    let exports: Arc<dyn daemon::Exports> = sdc::export::NbdExports::start(&cfg)
        .await
        .context("start the NBD server")?;
    tracing::info!(%guid, "SDC {name} starting; NBD on {}", cfg.nbd_socket.display());
    let me = daemon::register(&mdm, &guid, &name).await;
    io.set_me(me);
    tracing::info!(sdc_id = %me, "registered with the MDM");
    tokio::select! {
        _ = daemon::follow_map(io, me, exports, &cfg) => {}
        _ = proto::daemon::shutdown_signal() => tracing::info!("shutting down"),
    }
    let _ = std::fs::remove_file(&cfg.nbd_socket);
    Ok(())
}
