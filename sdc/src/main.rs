//! The `sdc` binary: the storage data client daemon (`sdc run`).

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use proto::client::{parse_addrs, MdmClient};
use proto::transport::{Endpoint, Identity};
use sdc::admin::AdminRequest;
use sdc::attach::Attacher;
use sdc::config::SdcConfig;
use sdc::daemon;
use sdc::docker::cluster::Cluster;
use sdc::docker::driver::{Core, Driver};
use sdc::io_path::IoPath;
use sdc::metrics::SdcMetrics;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "sdc",
    version,
    about = "Meshblock storage data client (SDC): serves mapped volumes over NBD",
    after_help = "Configuration: /etc/meshblock/sdc.toml unless --config names another file \
                  (built-in defaults when that file does not exist); flags override it."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the SDC daemon.
    Run(RunArgs),
    /// Print the default configuration as commented TOML (what /etc/meshblock/sdc.toml holds
    /// when installed).
    PrintDefaultConfig,
    /// Validate a configuration file (default /etc/meshblock/sdc.toml) and exit.
    CheckConfig {
        /// The file to check.
        config: Option<PathBuf>,
    },
    /// Attach a volume mapped to this host as a local block device; prints the device.
    Attach {
        volume: String,
        #[command(flatten)]
        at: LocalArgs,
    },
    /// Detach an attached volume (refused while its device is mounted, unless --force).
    Detach {
        volume: String,
        /// Lazily unmount the device first (whatever still uses it gets I/O errors).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        at: LocalArgs,
    },
    /// List the attached volumes and their devices.
    List {
        #[command(flatten)]
        at: LocalArgs,
    },
    /// Run as Docker's managed volume plugin (the entrypoint of the plugin that
    /// packaging/build-docker-plugin assembles): settings come from the environment Docker
    /// passes (`docker plugin set`), paths are fixed inside the plugin. When a setting or the
    /// certificate is wrong, the plugin still starts and every Docker command fails with what
    /// to fix. As PID 1 (in the plugin) it supervises the SDC: a crashed SDC is started again
    /// and takes the attached devices over from the FUSE keeper.
    Plugin {
        /// Run the SDC itself, not the supervisor (what the supervisor starts).
        #[arg(long, hide = true)]
        child: bool,
    },
    /// Internal: hold the FUSE descriptor across SDC restarts (started by `sdc run`).
    #[command(hide = true)]
    FuseKeeper {
        #[arg(long)]
        socket: PathBuf,
    },
}

/// Which running SDC a local command talks to.
#[derive(Args)]
struct LocalArgs {
    /// The SDC's state directory (default: the configuration's).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Configuration file to take the state directory from (default /etc/meshblock/sdc.toml
    /// when it exists; a file given here must exist).
    #[arg(long)]
    config: Option<PathBuf>,
}

impl LocalArgs {
    fn state_dir(&self) -> anyhow::Result<PathBuf> {
        if let Some(d) = &self.state_dir {
            return Ok(d.clone());
        }
        Ok(load_config(self.config.as_deref())?.0.state_dir)
    }
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML); flags override it. Default: /etc/meshblock/sdc.toml, or the
    /// built-in defaults when that file does not exist. A file given here must exist.
    #[arg(long, value_name = "FILE")]
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
    /// Serve the Docker volume plugin.
    #[arg(long)]
    docker: bool,
    /// The Docker plugin's socket (the driver is named after the file).
    #[arg(long)]
    docker_socket: Option<PathBuf>,
    /// Where Docker volumes are mounted.
    #[arg(long)]
    docker_mount_root: Option<PathBuf>,
    /// MDM user of the Docker plugin.
    #[arg(long)]
    docker_username: Option<String>,
    /// File with that user's password.
    #[arg(long)]
    docker_password_file: Option<PathBuf>,
    /// Transport to the SDS: tcp or quic.
    #[arg(long, value_name = "tcp|quic")]
    data_transport: Option<proto::transport::DataTransport>,
    /// Threads for NBD and request work (0: one per 4 CPUs, at least one; 1 runs everything
    /// on one thread).
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
}

fn main() -> std::process::ExitCode {
    proto::daemon::install_panic_hook("sdc");
    proto::daemon::tune_allocator();
    proto::daemon::exit_with(cli_main())
}

fn cli_main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::PrintDefaultConfig => {
            print!("{}", SdcConfig::default_toml());
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
        Cmd::Attach { volume, at } => {
            let r = sdc::admin::call(&at.state_dir()?, &AdminRequest::Attach { volume })?;
            if let Some(e) = r.error {
                anyhow::bail!(e);
            }
            println!("{}", r.device.unwrap_or_default().display());
            Ok(())
        }
        Cmd::Detach { volume, force, at } => {
            let r = sdc::admin::call(&at.state_dir()?, &AdminRequest::Detach { volume, force })?;
            if let Some(e) = r.error {
                anyhow::bail!(e);
            }
            Ok(())
        }
        Cmd::List { at } => {
            let r = sdc::admin::call(&at.state_dir()?, &AdminRequest::List)?;
            if let Some(e) = r.error {
                anyhow::bail!(e);
            }
            for (name, dev) in r.attached {
                println!("{name} {}", dev.display());
            }
            Ok(())
        }
        Cmd::FuseKeeper { socket } => {
            sdc::attach::keeper::run(&socket).context("run the FUSE keeper")
        }
        Cmd::Plugin { child } => {
            if !child && std::process::id() == 1 {
                let exe = std::env::current_exe().context("find the sdc binary")?;
                let code = sdc::supervisor::run(&exe, &["plugin", "--child"])
                    .context("supervise the SDC")?;
                std::process::exit(code);
            }
            proto::daemon::init_logging();
            let env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
            match sdc::docker::managed::config(&env) {
                Ok(cfg) => {
                    let rt = proto::daemon::runtime(cfg.worker_threads, "sdc-worker")?;
                    rt.block_on(async move {
                        match run(cfg).await {
                            Ok(()) => Ok(()),
                            Err(e) => {
                                let line = proto::daemon::error_line(e.as_ref());
                                serve_failed(format!(
                                    "{line} (in the plugin, {} is its `certs` mount: docker \
                                     plugin set PLUGIN certs.source=DIR; {} its `password` \
                                     mount: password.source=FILE)",
                                    sdc::docker::managed::CERT_DIR,
                                    sdc::docker::managed::PASSWORD_FILE
                                ))
                                .await
                            }
                        }
                    })
                }
                Err(problem) => {
                    let rt = proto::daemon::runtime(1, "sdc-worker")?;
                    rt.block_on(serve_failed(problem))
                }
            }
        }
        Cmd::Run(a) => {
            proto::daemon::init_logging();
            let (mut cfg, _) = load_config(a.config.as_deref())?;
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
            if a.docker {
                cfg.docker.enabled = true;
            }
            if let Some(v) = a.docker_socket {
                cfg.docker.socket = v;
            }
            if let Some(v) = a.docker_mount_root {
                cfg.docker.mount_root = v;
            }
            if let Some(v) = a.docker_username {
                cfg.docker.username = v;
            }
            if let Some(v) = a.docker_password_file {
                cfg.docker.password_file = v;
            }
            if let Some(v) = a.data_transport {
                cfg.data_transport = v;
            }
            if let Some(v) = a.worker_threads {
                cfg.worker_threads = v;
            }
            cfg.validate()
                .map_err(anyhow::Error::msg)
                .context("validate the configuration")?;
            // Held until the process exits.
            let _wake_latency = proto::daemon::apply_cpu_wake_latency(cfg.cpu_wake_latency_us);
            let rt = proto::daemon::runtime(cfg.worker_threads, "sdc-worker")?;
            rt.block_on(run(cfg))
        }
    }
}

/// A managed plugin that cannot work: says why in its log and in the answer to every Docker
/// call, until Docker stops it.
async fn serve_failed(problem: String) -> anyhow::Result<()> {
    tracing::error!("the plugin cannot work: {problem}");
    let socket = Path::new(sdc::docker::managed::SOCKET);
    let server = sdc::docker::server::bind_failed(socket, problem)
        .with_context(|| format!("listen on {}", socket.display()))?;
    tokio::select! {
        r = server => r.context("serve the plugin socket")?,
        _ = proto::daemon::shutdown_signal() => {}
    }
    let _ = std::fs::remove_file(socket);
    Ok(())
}

/// The configuration file (the one named, else the default one when it exists), and its path.
fn load_config(explicit: Option<&Path>) -> anyhow::Result<(SdcConfig, Option<PathBuf>)> {
    let default = proto::config_file::default_path("sdc");
    let Some((path, text)) = proto::config_file::read("sdc", explicit, &default)? else {
        return Ok((SdcConfig::default(), None));
    };
    let (cfg, unknown) =
        SdcConfig::parse(&text).with_context(|| format!("parse {}", path.display()))?;
    for k in unknown {
        tracing::warn!("unknown config key {k} in {} ignored", path.display());
    }
    Ok((cfg, Some(path)))
}

async fn run(cfg: SdcConfig) -> anyhow::Result<()> {
    let name = cfg.effective_name();
    let guid = daemon::load_or_create_guid(&cfg.state_dir)?;
    let identity = Identity::load(&cfg.cert_dir).context("load this SDC's certificate")?;
    let endpoint = Endpoint::client(&identity, &format!("sdc:{name}"))
        .context("create the QUIC endpoint")?
        .with_data_transport(cfg.data_transport);
    let addrs = parse_addrs(&cfg.mdm.join(","), 7611).map_err(anyhow::Error::msg)?;
    let mdm = Arc::new(MdmClient::new(endpoint.clone(), addrs));
    let metrics = Arc::new(SdcMetrics::default());
    let io = IoPath::new(
        mdm.clone(),
        endpoint,
        Duration::from_millis(cfg.io_timeout_ms),
        metrics.clone(),
    );
    tokio::spawn(io.clone().fast_poll());

    // The Docker plugin listens first (Docker gives plugins ~10 s); calls needing the
    // cluster wait for `core`.
    let (core_tx, core_rx) = tokio::sync::watch::channel(None);
    let registration = Arc::new(daemon::RegistrationStatus::new(&cfg.mdm));
    let driver = if cfg.docker.enabled {
        let cluster = Cluster::new(
            mdm.clone(),
            io.clone(),
            cfg.docker.username.clone(),
            cfg.docker.password_file.clone(),
        );
        let driver = Arc::new(Driver::new(
            cfg.docker.clone(),
            cluster,
            &cfg.state_dir,
            core_rx,
            registration.clone(),
        )?);
        let server = sdc::docker::server::bind(&cfg.docker.socket, driver.clone(), metrics.clone())
            .with_context(|| format!("listen on {}", cfg.docker.socket.display()))?;
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!("the Docker plugin server stopped: {e}");
            }
        });
        tracing::info!(socket = %cfg.docker.socket.display(), "Docker volume plugin listening");
        Some(driver)
    } else {
        None
    };

    let exports: Arc<dyn daemon::Exports> = sdc::export::NbdExports::start(&cfg)
        .await
        .context("start the NBD server")?;
    tracing::info!(%guid, "SDC {name} starting; NBD on {}", cfg.nbd_socket.display());
    // The NBD socket (and the Docker plugin's, when enabled) listens: tell systemd, so
    // docker.service, ordered after this unit, finds the plugin.
    proto::daemon::notify(&format!(
        "{}\nSTATUS=NBD on {}{}",
        proto::daemon::NOTIFY_READY,
        cfg.nbd_socket.display(),
        if cfg.docker.enabled {
            format!("; Docker plugin on {}", cfg.docker.socket.display())
        } else {
            String::new()
        }
    ));

    let attacher_slot: Arc<std::sync::OnceLock<Arc<Attacher>>> = Default::default();
    {
        let metrics = metrics.clone();
        let driver = driver.clone();
        let slot = attacher_slot.clone();
        let addr = cfg.metrics_listen;
        let io = io.clone();
        let render = Arc::new(move || {
            let map = io.map();
            for (volume, t) in io.throttles() {
                if let Some(v) = map.volumes.get(&volume) {
                    metrics.volume_qos(&v.name, t.limits(), t.throttled());
                }
            }
            if let Some(a) = slot.get() {
                metrics.attached_volumes.set(a.attached_count() as i64);
            }
            if let Some(d) = &driver {
                metrics
                    .docker_mount_refs
                    .set(d.reference_count_now() as i64);
            }
            metrics.render()
        });
        tokio::spawn(async move {
            if let Err(e) = web::serve_metrics(addr, render).await {
                tracing::warn!("the metrics endpoint stopped: {e}");
            }
        });
    }

    let work = async {
        let me = daemon::register(&mdm, &guid, &name, &registration).await;
        io.set_me(me);
        tracing::info!(sdc_id = %me, "registered with the MDM");
        while !io.refresh_map().await && io.map().version == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let exe = std::env::current_exe().context("find the sdc binary")?;
        let attacher = Attacher::start(&cfg.state_dir, io.clone(), &exe)
            .await
            .context("start the attach layer")?;
        let _ = attacher_slot.set(attacher.clone());
        let admin_dir = cfg.state_dir.clone();
        let admin_attacher = attacher.clone();
        tokio::spawn(async move {
            if let Err(e) = sdc::admin::serve(&admin_dir, admin_attacher).await {
                tracing::error!("the admin socket stopped: {e}");
            }
        });
        {
            // Online resize: attached devices, then Docker's filesystems on them, follow a
            // volume that grew.
            let attacher = attacher.clone();
            let driver = driver.clone();
            let every = Duration::from_millis(cfg.map_poll_ms);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let grown = attacher.grow_devices().await;
                    if let (Some(d), false) = (&driver, grown.is_empty()) {
                        d.grow_filesystems(&grown).await;
                    }
                }
            });
        }
        core_tx.send_replace(Some(Core {
            attacher: attacher.clone(),
            guid: guid.clone(),
            exports: exports.clone(),
        }));
        if let Some(d) = &driver {
            d.reconcile().await;
        }
        let again = daemon::Registration {
            mdm: &mdm,
            guid: &guid,
            name: &name,
            status: &registration,
        };
        daemon::follow_map(io.clone(), exports, &cfg, again).await;
        anyhow::Ok(())
    };
    let result = tokio::select! {
        r = work => r,
        _ = proto::daemon::shutdown_signal() => {
            tracing::info!("shutting down");
            proto::daemon::notify(proto::daemon::NOTIFY_STOPPING);
            Ok(())
        }
    };
    if cfg.docker.enabled {
        let _ = std::fs::remove_file(&cfg.docker.socket);
    }
    if let Some(a) = attacher_slot.get() {
        a.shutdown().await;
    }
    let _ = std::fs::remove_file(sdc::admin::socket_path(&cfg.state_dir));
    let _ = std::fs::remove_file(&cfg.nbd_socket);
    result
}
