//! The NBD server: serves the exports of an [`ExportRegistry`] to NBD clients (the kernel's
//! `nbd` driver via `nbd-client`, qemu, libnbd tools, fio) over any byte stream, following
//! NetworkBlockDevice/nbd `doc/proto.md`.
//!
//! Owns the protocol only: the fixed newstyle handshake (`negotiate`), request validation
//! (`request`), the wire format (`wire`, pure) and the transmission phase (`transmission`:
//! concurrent requests, out-of-order replies, one writer). It must not know what stores the
//! bytes: that is a [`Backend`], implemented elsewhere (`crate::export` for volumes). No TLS,
//! no oldstyle handshake, no extended headers.
//!
//! Plugging in a backend:
//!
//! ```no_run
//! # async fn demo<B: sdc::nbd::Backend>(disk: B) -> std::io::Result<()> {
//! use sdc::nbd::{serve_unix, ExportRegistry};
//! use std::sync::Arc;
//! let registry = Arc::new(ExportRegistry::new());
//! registry.add("vol1", Arc::new(disk));
//! tokio::spawn(serve_unix("/run/meshblock/nbd.sock", registry.clone()));
//! // Later: closes vol1's connections once their in-flight requests are answered.
//! registry.remove("vol1");
//! # Ok(()) }
//! ```

mod backend;
mod negotiate;
mod registry;
mod request;
mod transmission;
mod wire;

pub use backend::{Backend, BackendError, Extent, NbdErrno};
pub use negotiate::BASE_ALLOCATION;
pub use registry::{ExportRegistry, Registry};
pub use transmission::INFLIGHT_BYTES_PER_CONN;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Largest READ or WRITE payload, advertised as the maximum payload size.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Advertised minimum block size: any byte offset and length is accepted.
pub const BLOCK_SIZE_MIN: u32 = 1;
/// Advertised preferred block size.
pub const BLOCK_SIZE_PREFERRED: u32 = 4096;
/// Requests in flight per connection.
pub const INFLIGHT_PER_CONN: usize = 128;
/// Connections one listener serves at once; further clients wait to be accepted.
pub const CONNECTIONS_PER_LISTENER_MAX: usize = 1024;
/// Time a client has to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (for instance out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why a connection ended abnormally. None of these affect other connections.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("client sent unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("client sent an option with bad magic {0:#018x}")]
    OptionMagic(u64),
    #[error("client sent option {option} with {len} bytes of data, more than accepted")]
    OptionTooLarge { option: u32, len: u32 },
    #[error("client sent more than {0} options")]
    TooManyOptions(u32),
    #[error("client did not finish the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("client sent a request with bad magic {0:#010x}")]
    RequestMagic(u32),
    #[error("client sent a {0}-byte write, too large to skip")]
    PayloadTooLarge(u32),
}

/// Serves one client connection: handshake, then transmission until the client disconnects,
/// the export is removed or the client breaks the protocol. Dropping the future drops the
/// connection (requests already spawned still finish).
pub async fn serve_conn<S, B>(stream: S, registry: Arc<ExportRegistry<B>>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    B: Backend,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let handshake = negotiate::negotiate(&mut rd, &mut wr, &registry);
    let session = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(session) => session?,
        Err(_) => return Err(NbdError::HandshakeTimeout(HANDSHAKE_TIMEOUT)),
    };
    let Some(session) = session else {
        return Ok(());
    };
    let span = tracing::debug_span!("nbd", export = %session.export.name);
    let end = transmission::transmit(rd, wr, session)
        .instrument(span)
        .await?;
    tracing::debug!(?end, "NBD connection closed");
    Ok(())
}

/// Binds a unix socket at `path` and serves it forever; returns only if binding fails.
pub async fn serve_unix<B: Backend>(
    path: impl AsRef<Path>,
    registry: Arc<ExportRegistry<B>>,
) -> std::io::Result<()> {
    let listener = UnixListener::bind(path)?;
    serve_unix_listener(listener, registry).await;
    Ok(())
}

/// Serves connections from a bound unix listener forever.
pub async fn serve_unix_listener<B: Backend>(
    listener: UnixListener,
    registry: Arc<ExportRegistry<B>>,
) {
    accept_loop(registry, || async {
        listener.accept().await.map(|(stream, _)| stream)
    })
    .await;
}

/// Binds a TCP listener at `addr` and serves it forever; returns only if binding fails.
pub async fn serve_tcp<B: Backend>(
    addr: SocketAddr,
    registry: Arc<ExportRegistry<B>>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    serve_tcp_listener(listener, registry).await;
    Ok(())
}

/// Serves connections from a bound TCP listener forever.
pub async fn serve_tcp_listener<B: Backend>(
    listener: TcpListener,
    registry: Arc<ExportRegistry<B>>,
) {
    accept_loop(registry, || async {
        let (stream, _) = listener.accept().await?;
        // Replies are small and latency-bound; the writer batches them itself.
        stream.set_nodelay(true)?;
        Ok(stream)
    })
    .await;
}

async fn accept_loop<B, S, F, Fut>(registry: Arc<ExportRegistry<B>>, mut accept: F)
where
    B: Backend,
    S: AsyncRead + AsyncWrite + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
{
    let slots = Arc::new(Semaphore::new(CONNECTIONS_PER_LISTENER_MAX));
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let stream = match accept().await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("failed to accept an NBD connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(stream, registry).await {
                tracing::debug!("NBD connection ended: {e}");
            }
            drop(slot);
        });
    }
}
