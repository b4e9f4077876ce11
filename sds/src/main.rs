//! The `sds` binary: one storage data server. Reads the configuration (file, then flags), opens
//! the devices, joins the cluster through the MDM and serves data requests over QUIC.

use anyhow::Context;
use clap::Parser;
use proto::client::MdmClient;
use proto::transport::{Endpoint, Identity};
use sds::chunk_store::ChunkStore;
use sds::config::SdsConfig;
use sds::device::{AnyDevice, DeviceOptions, ServedDevice};
use sds::devices::DeviceSet;
use sds::mdm_client::{LinkOptions, MdmLink};
use sds::metrics::SdsMetrics;
use sds::rebuild::Rebuilder;
use sds::routing::MapCache;
use sds::scrub::Scrubber;
use sds::service::{Service, ServiceOptions};
use sds::storage::Storage;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Period of the background journal apply, milliseconds.
const JOURNAL_APPLY_MS: u64 = 500;

#[derive(Parser)]
#[command(name = "sds", version, about = "Meshblock storage data server (SDS)")]
struct Args {
    /// Configuration file (TOML); the flags below override it. Without --config the SDS reads
    /// /etc/meshblock/sds.toml, or runs on built-in defaults and flags when that file does not
    /// exist. A file given here must exist.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This SDS's name, as given to `scli --add_sds --sds_name`.
    #[arg(long)]
    name: Option<String>,
    /// QUIC data address (UDP).
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<SocketAddr>,
    /// MDM addresses, comma-separated `ip[:port]`.
    #[arg(long, value_name = "ADDRS")]
    mdm: Option<String>,
    /// Certificate directory (node.pem, node.key, ca.pem).
    #[arg(long, value_name = "DIR")]
    cert_dir: Option<PathBuf>,
    /// A device (block device or file) to serve; repeat for several. Replaces the file's list.
    #[arg(long, value_name = "PATH")]
    device: Vec<PathBuf>,
    /// Prometheus metrics HTTP address.
    #[arg(long, value_name = "IP:PORT")]
    metrics_listen: Option<SocketAddr>,
    /// Use pread/pwrite threads instead of io_uring.
    #[arg(long)]
    no_io_uring: bool,
    /// Fail points to arm, `NAME=ACTION;...` (builds with the `failpoints` feature only; for
    /// fault tests).
    #[arg(long, value_name = "SPEC", hide = true)]
    failpoints: Option<String>,
    /// A file of fail points (`NAME=ACTION;...`) to follow while running: arms and disarms
    /// them as it changes (builds with the `failpoints` feature only; for fault tests).
    #[arg(long, value_name = "PATH", hide = true)]
    failpoints_file: Option<PathBuf>,
    /// Keep every device write not followed by a device flush in a cache in this process's
    /// memory, lost when it is killed (builds with the `failpoints` feature only; for fault
    /// tests of flushes).
    #[arg(long, hide = true)]
    test_volatile_cache: bool,
    /// Scrubber rate in MiB/s (0 turns it off).
    #[arg(long, value_name = "MIB_S")]
    scrub_rate_mib_s: Option<u64>,
    /// Garbage-collector pass interval in milliseconds (0 turns it off).
    #[arg(long, value_name = "MS")]
    gc_interval_ms: Option<u64>,
    /// Transport for connections to peer SDS: tcp or quic.
    #[arg(long, value_name = "tcp|quic")]
    data_transport: Option<proto::transport::DataTransport>,
    /// Threads for network and request work (0: one per 4 CPUs, at least one; 1 runs
    /// everything on one thread).
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
    /// Print the default configuration as commented TOML and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Validate the configuration (file and flags), list unknown keys, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    proto::daemon::install_panic_hook("sds");
    proto::daemon::tune_allocator();
    let args = Args::parse();
    if args.print_default_config {
        print!("{}", SdsConfig::default_toml());
        return ExitCode::SUCCESS;
    }
    proto::daemon::init_logging();
    match start(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("failed to {}", proto::daemon::error_line(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn start(args: &Args) -> anyhow::Result<()> {
    let cfg = configure(args)?;
    if let Some(spec) = &args.failpoints {
        sds::failpoints::configure(spec).map_err(anyhow::Error::msg)?;
        tracing::warn!("fail points armed: {spec}");
    }
    if let Some(path) = &args.failpoints_file {
        sds::failpoints::watch_file(path.clone()).map_err(anyhow::Error::msg)?;
    }
    if args.check_config {
        println!("configuration OK");
        return Ok(());
    }
    // Held until the process exits.
    let _wake_latency = proto::daemon::apply_cpu_wake_latency(cfg.cpu_wake_latency_us);
    proto::daemon::runtime(cfg.worker_threads, "sds-worker")
        .context("start the runtime")?
        .block_on(run(cfg, args.test_volatile_cache))
}

/// The configuration: file, then flags, then validation.
fn configure(args: &Args) -> anyhow::Result<SdsConfig> {
    let default = proto::config_file::default_path("sds");
    let mut cfg = match proto::config_file::read("sds", args.config.as_deref(), &default)? {
        Some((p, text)) => {
            let (cfg, unknown) =
                SdsConfig::parse(&text).with_context(|| format!("parse {}", p.display()))?;
            for k in unknown {
                tracing::warn!(file = %p.display(), "unknown configuration key {k} ignored");
            }
            if cfg.lease_ms != 0 {
                tracing::info!(
                    lease_ms = cfg.lease_ms,
                    "lease_ms bounds the lease the MDM grants (the MDM sends its length); it can only shorten it"
                );
            }
            cfg
        }
        None => SdsConfig::default(),
    };
    if let Some(v) = &args.name {
        cfg.name = v.clone();
    }
    if let Some(v) = args.listen {
        cfg.listen = v;
    }
    if let Some(v) = &args.mdm {
        cfg.mdm = v
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
    }
    if let Some(v) = &args.cert_dir {
        cfg.cert_dir = v.clone();
    }
    if !args.device.is_empty() {
        cfg.devices = args.device.clone();
    }
    if let Some(v) = args.metrics_listen {
        cfg.metrics_listen = v;
    }
    if args.no_io_uring {
        cfg.io_uring = false;
    }
    if let Some(v) = args.scrub_rate_mib_s {
        cfg.scrub_rate_mib_s = v;
    }
    if let Some(v) = args.gc_interval_ms {
        cfg.gc_interval_ms = v;
    }
    if let Some(v) = args.data_transport {
        cfg.data_transport = v;
    }
    if let Some(v) = args.worker_threads {
        cfg.worker_threads = v;
    }
    if cfg.name.is_empty() {
        cfg.name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
    }
    cfg.validate().context("validate the configuration")?;
    Ok(cfg)
}

/// Open the device at `path` and its chunk store (formatting a blank device).
async fn open_device(
    path: &std::path::Path,
    io_uring: bool,
    lock_wait: Duration,
    volatile_cache: bool,
) -> anyhow::Result<ChunkStore<ServedDevice>> {
    let shown = path.display().to_string();
    let dev = AnyDevice::open_when_free(path, io_uring, &DeviceOptions::default(), lock_wait)
        .await
        .with_context(|| format!("open device {shown}"))?;
    let engine = dev.engine();
    let dev = sds::device::serve(dev, &shown, volatile_cache).map_err(anyhow::Error::msg)?;
    let store = ChunkStore::open(dev)
        .await
        .with_context(|| format!("open the chunk store on {shown}"))?;
    tracing::info!(
        device = %shown,
        engine,
        formatted = store.was_formatted(),
        capacity_bytes = store.capacity_bytes(),
        chunks = store.chunk_count(),
        "device ready"
    );
    Ok(store)
}

async fn open_storage(
    cfg: &SdsConfig,
    volatile_cache: bool,
) -> anyhow::Result<Storage<ServedDevice>> {
    let mut stores = Vec::new();
    for path in &cfg.devices {
        let store = open_device(path, cfg.io_uring, cfg.device_lock_wait(), volatile_cache).await?;
        stores.push((path.display().to_string(), store));
    }
    let storage = Storage::new(stores);
    let resolved = storage
        .resolve_duplicates()
        .await
        .context("resolve chunks left on two devices by an interrupted move")?;
    if resolved > 0 {
        tracing::warn!(
            resolved,
            "freed incomplete copies of chunks an interrupted move left on two devices"
        );
    }
    Ok(storage)
}

async fn run(cfg: SdsConfig, volatile_cache: bool) -> anyhow::Result<()> {
    if volatile_cache {
        tracing::warn!(
            "fault test: device writes not followed by a flush are lost when this process dies"
        );
    }
    let storage = Arc::new(open_storage(&cfg, volatile_cache).await?);
    // A volatile test cache is lost with the process, as a disk's with its host's power: every
    // process is a new boot.
    let boot = if volatile_cache {
        format!("test-{:016x}", rand::random::<u64>())
    } else {
        proto::daemon::boot_id()
    };
    let identity = Identity::load(&cfg.cert_dir).context("load this SDS's certificate")?;
    let endpoint = Endpoint::server(cfg.listen, &identity, &format!("sds:{}", cfg.name))
        .context("open the data port (QUIC on UDP, TLS on TCP)")?
        .with_data_transport(cfg.data_transport);
    let mut metrics = SdsMetrics::new();
    metrics.register_device_io(storage.device_io());
    let metrics = Arc::new(metrics);
    let map = Arc::new(MapCache::new());
    let service = Service::new(
        storage.clone(),
        map.clone(),
        endpoint.clone(),
        metrics.clone(),
        ServiceOptions {
            forward_timeout: cfg.forward_timeout(),
            boot_tag: proto::data::boot_tag(&boot),
            ..ServiceOptions::default()
        },
    );

    let scrubber = Scrubber::new(service.clone(), cfg.scrub_rate_mib_s << 20);
    let addrs = cfg.mdm_addrs().map_err(anyhow::Error::msg)?;
    let io_uring = cfg.io_uring;
    let device_set = DeviceSet::new(
        cfg.name.clone(),
        service.clone(),
        Arc::new(move |path: PathBuf, lock_wait: Duration| {
            Box::pin(async move {
                open_device(&path, io_uring, lock_wait, volatile_cache)
                    .await
                    .map_err(|e| proto::daemon::error_line(e.as_ref()))
            })
        }),
        cfg.device_lock_wait(),
    );
    let reports = device_set.clone();
    let syncer = device_set.clone();
    let gauge = metrics.clone();
    let link = Arc::new(
        MdmLink::new(
            MdmClient::new(endpoint.clone(), addrs),
            cfg.name.clone(),
            map.clone(),
            Arc::new(move || reports.reports()),
            LinkOptions {
                hello_interval: cfg.hello_interval(),
                map_poll_interval: cfg.map_poll_interval(),
                lease: Some(cfg.lease_cap()),
                boot: boot.clone(),
                ..LinkOptions::default()
            },
        )
        .before_install(Arc::new(move |map| {
            let syncer = syncer.clone();
            let listed = syncer.listed(map);
            Box::pin(async move {
                if let Some(listed) = listed {
                    syncer.sync(listed).await;
                }
            })
        }))
        .on_hello(Arc::new(move |ok| {
            gauge.mdm_connected.set(i64::from(ok));
        }))
        .with_stats({
            let s = scrubber.clone();
            Arc::new(move || s.stats())
        }),
    );
    tokio::spawn(link.clone().run());
    tokio::spawn(Rebuilder::new(service.clone(), link.clone(), cfg.rebuild_concurrency).run());
    tokio::spawn(scrubber.run());
    tokio::spawn(device_set.run());
    tokio::spawn(sds::gc::run(
        service.clone(),
        std::time::Duration::from_millis(cfg.gc_interval_ms),
    ));
    tokio::spawn(sds::thick::run(service.clone()));
    let applier = storage.clone();
    tokio::spawn(async move {
        // Journaled writes wait in memory for the second flush after them; without client
        // flushes, apply them here so the overlay stays small and the data sits in place.
        // Writes that fill half the journal ask for a round at once.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(JOURNAL_APPLY_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = applier.apply_wanted() => {}
            }
            if let Err(e) = applier.apply_journals().await {
                tracing::warn!("background journal apply failed: {e}");
            }
        }
    });

    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("listen for metrics on {}", cfg.metrics_listen))?;
    let svc = service.clone();
    tokio::spawn(async move {
        let render = Arc::new(move || {
            svc.update_gauges();
            svc.metrics().render()
        });
        web::serve(
            metrics_listener,
            web::metrics_router(render),
            web::Limits::default(),
        )
        .await;
    });

    tracing::info!(name = %cfg.name, listen = %cfg.listen, "SDS serving");
    // Its devices are open and its data port listens: tell systemd (Type=notify).
    proto::daemon::notify(&format!(
        "{}\nSTATUS=serving on {}",
        proto::daemon::NOTIFY_READY,
        cfg.listen
    ));
    tokio::select! {
        _ = endpoint.serve(service.clone()) => {}
        _ = proto::daemon::shutdown_signal() => {
            tracing::info!("shutting down");
            proto::daemon::notify(proto::daemon::NOTIFY_STOPPING);
        }
    }
    endpoint.close();
    storage
        .flush()
        .await
        .context("flush the devices at shutdown")?;
    storage
        .apply_journals()
        .await
        .context("apply the journals at shutdown")?;
    Ok(())
}
