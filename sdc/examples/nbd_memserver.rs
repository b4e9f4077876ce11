//! Serves in-memory sparse disks over NBD with `sdc::nbd`, for trying clients by hand:
//!
//! ```text
//! cargo run -p sdc --example nbd_memserver -- --socket /tmp/nbd.sock --export disk --size-mib 256
//! nbdinfo --map 'nbd+unix:///disk?socket=/tmp/nbd.sock'
//! ```

// The test backend, shared rather than copied; the example uses only part of it.
#[allow(dead_code)]
#[path = "../tests/nbd_support/mem.rs"]
mod mem;

use clap::Parser;
use mem::MemBackend;
use sdc::nbd::{serve_tcp, serve_unix, ExportRegistry};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(about = "Serve in-memory disks over NBD")]
struct Args {
    /// Unix socket to listen on (replaced if it exists).
    #[arg(long)]
    socket: PathBuf,
    /// Also listen on this TCP address.
    #[arg(long)]
    tcp: Option<SocketAddr>,
    /// Export names; each gets its own disk.
    #[arg(long = "export", default_value = "disk")]
    exports: Vec<String>,
    /// Size of each disk in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Serve the disks read-only.
    #[arg(long)]
    read_only: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let registry = Arc::new(ExportRegistry::new());
    for name in &args.exports {
        let disk = MemBackend::new(args.size_mib << 20);
        let disk = if args.read_only {
            disk.read_only()
        } else {
            disk
        };
        registry.add(name.as_str(), Arc::new(disk));
    }
    // A stale socket from an earlier run would make binding fail.
    let _ = std::fs::remove_file(&args.socket);
    if let Some(addr) = args.tcp {
        tokio::spawn(serve_tcp(addr, registry.clone()));
    }
    println!(
        "serving {:?} on nbd+unix:///NAME?socket={}",
        args.exports,
        args.socket.display()
    );
    serve_unix(&args.socket, registry).await?;
    Ok(())
}
