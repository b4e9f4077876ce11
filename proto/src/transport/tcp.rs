//! The TCP side of the transport: TLS 1.3 with mutual authentication against the cluster CA
//! (the same certificates and checks as QUIC) over one TCP connection per peer, carrying the
//! same frames. Used for data-plane traffic, where the kernel's TCP (segmentation offload,
//! in-kernel acknowledgements) costs several times less CPU per byte than QUIC in user space.
//!
//! Dead peers are found as QUIC finds them: keep-alive probes after a second of silence and a
//! user timeout abort a connection whose peer stopped answering for [`DEAD_AFTER`]; a
//! restarted peer answers with a reset at once.

use super::{
    common_name, read_exact_or_end, set_int_opt, ConnHandle, Frame, FrameRead, FrameWrite, Handler,
    Identity, Peer, RpcClient, TransportError, CLUSTER_SERVER_NAME, CONNECT_TIMEOUT,
};
use crate::codec::{Header, HEADER_LEN};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

/// A peer silent this long (unacknowledged data, or unanswered keep-alives) is dead.
const DEAD_AFTER: Duration = Duration::from_secs(10);
/// Buffered bytes on each side of a connection: many small frames leave in one write.
const IO_BUFFER: usize = 256 << 10;
/// Frames the writer gathers before it flushes.
const MAX_BATCH: usize = 64;

type Tls<S> = tokio_rustls::TlsStream<S>;

/// What an endpoint has of TCP: the TLS configurations and, on servers, the listener.
#[derive(Clone)]
pub(super) struct TcpSide {
    connector: tokio_rustls::TlsConnector,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    listener: Option<Arc<TcpListener>>,
    closing: Arc<Closing>,
}

#[derive(Default)]
struct Closing {
    closed: AtomicBool,
    notify: Notify,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
}

impl TcpSide {
    /// Listen on `addr` (the port QUIC got).
    pub(super) fn listen(addr: SocketAddr, identity: &Identity) -> Result<TcpSide, TransportError> {
        let std = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| TransportError::Bind { addr, source })?;
        let listener =
            TcpListener::from_std(std).map_err(|source| TransportError::Bind { addr, source })?;
        let mut side = TcpSide::dial_only(identity)?;
        side.acceptor = Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            identity.rustls_server()?,
        )));
        side.listener = Some(Arc::new(listener));
        Ok(side)
    }

    /// A side that only dials.
    pub(super) fn dial_only(identity: &Identity) -> Result<TcpSide, TransportError> {
        Ok(TcpSide {
            connector: tokio_rustls::TlsConnector::from(Arc::new(identity.rustls_client()?)),
            acceptor: None,
            listener: None,
            closing: Arc::new(Closing::default()),
        })
    }

    /// Dial `addr`, shake hands and start the client's reader and writer.
    pub(super) async fn dial(&self, addr: SocketAddr) -> Result<RpcClient, TransportError> {
        let fail = |reason: String| TransportError::Connect { addr, reason };
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| fail(e.to_string()))?;
        tune(&tcp);
        let name = rustls::pki_types::ServerName::try_from(CLUSTER_SERVER_NAME)
            .map_err(|e| fail(e.to_string()))?;
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS: {e}")))?;
        let (r, w) = tokio::io::split(Tls::from(tls));
        Ok(RpcClient::open(
            TcpReader::new(r),
            TcpWriter::new(w),
            ConnHandle::Tcp {
                remote: addr,
                tasks: Mutex::new(Vec::new()),
            },
        ))
    }

    /// Accept connections until [`close`](Self::close); nothing on a dial-only side.
    pub(super) async fn serve<H: Handler>(&self, handler: Arc<H>, name: Arc<str>) {
        let (Some(listener), Some(acceptor)) = (&self.listener, &self.acceptor) else {
            return;
        };
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = self.closing.notify.notified() => return,
            };
            if self.closing.closed.load(Ordering::SeqCst) {
                return;
            }
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or similar: do not spin.
                    tracing::warn!("TCP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tune(&tcp);
            let (acceptor, handler, name) = (acceptor.clone(), handler.clone(), name.clone());
            let id = self.closing.next.fetch_add(1, Ordering::Relaxed);
            let task = tokio::spawn(async move {
                let tls = match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                        return;
                    }
                };
                let peer_name = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(common_name)
                    .unwrap_or_default();
                let peer = Arc::new(Peer {
                    name: peer_name,
                    addr,
                    conn: super::next_conn(),
                });
                let (r, w) = tokio::io::split(Tls::from(tls));
                super::serve_stream(TcpWriter::new(w), TcpReader::new(r), peer, handler, name)
                    .await;
            });
            if let Ok(mut conns) = self.closing.conns.lock() {
                conns.retain(|_, t| !t.is_finished());
                conns.insert(id, task.abort_handle());
            }
        }
    }

    /// Stop accepting and drop every accepted connection.
    pub(super) fn close(&self) {
        self.closing.closed.store(true, Ordering::SeqCst);
        self.closing.notify.notify_waiters();
        if let Ok(mut conns) = self.closing.conns.lock() {
            for (_, t) in conns.drain() {
                t.abort();
            }
        }
    }
}

/// No Nagle delay; keep-alives and a user timeout so that a dead peer is found in
/// [`DEAD_AFTER`] even when no request is outstanding.
fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let fd = tcp.as_raw_fd();
    let set = |level, opt, v| set_int_opt(fd, level, opt, v);
    let dead_ms = DEAD_AFTER.as_millis() as libc::c_int;
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1);
    set(
        libc::IPPROTO_TCP,
        libc::TCP_KEEPCNT,
        DEAD_AFTER.as_secs() as libc::c_int,
    );
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, dead_ms);
}

struct TcpReader {
    r: BufReader<ReadHalf<Tls<TcpStream>>>,
}

impl TcpReader {
    fn new(r: ReadHalf<Tls<TcpStream>>) -> TcpReader {
        TcpReader {
            r: BufReader::with_capacity(IO_BUFFER, r),
        }
    }

    async fn part(&mut self, len: u32) -> Result<Bytes, TransportError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        // Read into spare capacity: a 1 MiB block is not zeroed first.
        let len = len as usize;
        let mut b = BytesMut::with_capacity(len);
        while b.len() < len {
            let want = len - b.len();
            let mut part = (&mut b).limit(want);
            let n = self
                .r
                .read_buf(&mut part)
                .await
                .map_err(|e| TransportError::Closed(e.to_string()))?;
            if n == 0 {
                return Err(TransportError::Closed("stream ended inside a frame".into()));
            }
        }
        Ok(b.freeze())
    }
}

impl FrameRead for TcpReader {
    async fn next_frame(&mut self) -> Result<Option<Frame>, TransportError> {
        let mut hdr = [0u8; HEADER_LEN];
        if !read_exact_or_end(&mut self.r, &mut hdr).await? {
            return Ok(None);
        }
        let h = Header::decode(&hdr)?;
        let meta = self.part(h.meta_len).await?;
        let data = self.part(h.data_len).await?;
        Ok(Some(Frame::from_parts(&h, meta, data)))
    }
}

struct TcpWriter {
    w: BufWriter<WriteHalf<Tls<TcpStream>>>,
}

impl TcpWriter {
    fn new(w: WriteHalf<Tls<TcpStream>>) -> TcpWriter {
        TcpWriter {
            w: BufWriter::with_capacity(IO_BUFFER, w),
        }
    }

    async fn put(&mut self, f: Frame) -> std::io::Result<()> {
        self.w.write_all(&f.header().encode()).await?;
        self.w.write_all(&f.meta).await?;
        self.w.write_all(&f.data).await
    }
}

impl FrameWrite for TcpWriter {
    async fn send_frames(
        &mut self,
        first: Frame,
        more: &mut mpsc::Receiver<Frame>,
    ) -> Result<(), TransportError> {
        let closed = |e: std::io::Error| TransportError::Closed(e.to_string());
        self.put(first).await.map_err(closed)?;
        for _ in 1..MAX_BATCH {
            match more.try_recv() {
                Ok(f) => self.put(f).await.map_err(closed)?,
                Err(_) => break,
            }
        }
        self.w.flush().await.map_err(closed)
    }

    async fn finish(&mut self) {
        let _ = self.w.shutdown().await;
    }
}
