//! The `sds` binary: one storage data server.

use anyhow::Context;
use clap::Parser;
use proto::client::{parse_addrs, MdmClient};
use proto::msg::{DeviceReport, MdmRequest, MdmResponse};
use proto::transport::{Endpoint, Identity};
use sds::chunk_store::ChunkStore;
use sds::config::SdsConfig;
use sds::device::AnyDevice;
use sds::service::Sds;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "sds", version, about = "Meshblock storage data server (SDS)")]
struct Args {
    /// Configuration file (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The name given to `scli --add_sds --sds_name`.
    #[arg(long)]
    name: Option<String>,
    /// QUIC data address.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// MDM addresses, comma-separated IP:PORT.
    #[arg(long)]
    mdm: Option<String>,
    /// Certificate directory (node.pem, node.key, ca.pem).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// A device (block device or file) to serve.
    #[arg(long)]
    device: Vec<PathBuf>,
    /// Prometheus metrics HTTP address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Use pread/pwrite instead of io_uring.
    #[arg(long)]
    no_io_uring: bool,
    /// Print the default configuration as TOML and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    proto::daemon::install_panic_hook("sds");
    let a = Args::parse();
    if a.print_default_config {
        print!("{}", toml::to_string(&SdsConfig::default())?);
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
            let (cfg, unknown) =
                SdsConfig::parse(&text).with_context(|| format!("parse {}", p.display()))?;
            for k in unknown {
                tracing::warn!("unknown config key {k} ignored");
            }
            cfg
        }
        None => SdsConfig::default(),
    };
    if let Some(v) = a.name {
        cfg.name = v;
    }
    if let Some(v) = a.listen {
        cfg.listen = v;
    }
    if let Some(v) = a.mdm {
        cfg.mdm = v.split(',').map(|s| s.trim().to_string()).collect();
    }
    if let Some(v) = a.cert_dir {
        cfg.cert_dir = v;
    }
    if !a.device.is_empty() {
        cfg.devices = a.device;
    }
    if let Some(v) = a.metrics_listen {
        cfg.metrics_listen = v;
    }
    if a.no_io_uring {
        cfg.io_uring = false;
    }
    if cfg.name.is_empty() {
        cfg.name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
    }
    cfg.validate()
        .map_err(anyhow::Error::msg)
        .context("validate the configuration")?;
    if a.check_config {
        println!("configuration OK");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(cfg))
}

async fn run(cfg: SdsConfig) -> anyhow::Result<()> {
    let path = cfg.devices[0].clone();
    let dev = AnyDevice::open(&path, cfg.io_uring)
        .with_context(|| format!("open device {}", path.display()))?;
    let store = Arc::new(
        ChunkStore::open(dev)
            .await
            .with_context(|| format!("open the chunk store on {}", path.display()))?,
    );
    tracing::info!(device = %path.display(), capacity = store.capacity_bytes(), chunks = store.used_chunks(), "chunk store open");
    let identity = Identity::load(&cfg.cert_dir).context("load this SDS's certificate")?;
    let endpoint =
        Endpoint::server(cfg.listen, &identity, &format!("sds:{}", cfg.name)).context("listen")?;
    let addrs = parse_addrs(&cfg.mdm.join(","), 7611).map_err(anyhow::Error::msg)?;
    let mdm = Arc::new(MdmClient::new(endpoint.clone(), addrs));
    let metrics = sds::metrics::SdsMetrics::new();
    let sds = Sds::new(
        cfg.name.clone(),
        store.clone(),
        endpoint.clone(),
        mdm.clone(),
        metrics.clone(),
    );
    let m = metrics.clone();
    let maddr = cfg.metrics_listen;
    tokio::spawn(async move {
        if let Err(e) = sds::metrics::serve(maddr, m).await {
            tracing::warn!("metrics endpoint on {maddr} stopped: {e}");
        }
    });
    let s2 = sds.clone();
    let device_path = path.display().to_string();
    let poll = Duration::from_millis(cfg.map_poll_ms);
    tokio::spawn(async move { report_loop(s2, mdm, device_path, poll).await });
    tracing::info!(listen = %cfg.listen, "SDS {} serving", cfg.name);
    let ep = endpoint.clone();
    tokio::select! {
        _ = ep.serve(sds) => {}
        _ = proto::daemon::shutdown_signal() => tracing::info!("shutting down"),
    }
    store.flush().await.ok();
    endpoint.close();
    Ok(())
}

/// Say hello to the MDM (name, device capacity and health) and follow the map.
async fn report_loop(
    sds: Arc<Sds<AnyDevice>>,
    mdm: Arc<MdmClient>,
    device: String,
    poll: Duration,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        let failed = sds.device_failed.load(Ordering::SeqCst);
        sds.metrics.device_failed.set(i64::from(failed));
        sds.metrics.chunks_used.set(sds.store.used_chunks() as i64);
        if sds.id().is_none() || n.is_multiple_of(4) || failed {
            let report = DeviceReport {
                path: device.clone(),
                capacity_bytes: sds.store.capacity_bytes(),
                failed,
            };
            match mdm
                .request(
                    &MdmRequest::SdsHello {
                        name: sds.name.clone(),
                        devices: vec![report],
                    },
                    Duration::from_secs(5),
                )
                .await
            {
                Ok(MdmResponse::SdsWelcome { id }) => {
                    if sds.id().is_none() {
                        tracing::info!(sds_id = %id, "joined the cluster");
                    }
                    sds.set_id(id);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("failed to report to the MDM: {e}"),
            }
        }
        sds.refresh_map().await;
    }
}
