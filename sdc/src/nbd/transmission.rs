//! The transmission phase of one connection: the request reader, the per-request tasks and
//! the single reply writer.
//!
//! The reader decodes and validates each request, reserves its share of the connection's
//! bounds ([`INFLIGHT_PER_CONN`] requests and [`INFLIGHT_BYTES_PER_CONN`] payload bytes), reads
//! a WRITE payload, and spawns the request. Requests run concurrently and their replies go, as
//! they complete and so out of order, through a bounded channel to the one writer task that
//! owns the socket's write half. The reservations travel with the reply and are released once
//! it is written, so a client that stops reading replies stops being read from.
//!
//! PERFORMANCE-CRITICAL PATH: nothing here logs above DEBUG per request.

use super::negotiate::{skip, Session, BASE_ALLOCATION_ID};
use super::request::{classify, descriptors, Command, Limits, Rejection};
use super::wire;
use super::{Backend, BackendError, NbdError, INFLIGHT_PER_CONN, MAX_PAYLOAD};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Payload bytes (WRITE data read, READ data to send) in flight per connection.
pub const INFLIGHT_BYTES_PER_CONN: u32 = 4 * MAX_PAYLOAD;
/// Largest WRITE payload the reader skips to stay in sync after refusing it; beyond this the
/// connection is closed instead (the specification allows that for denial-of-service sizes).
const SKIP_PAYLOAD_LEN_MAX: u32 = 2 * MAX_PAYLOAD;
/// How long a closing connection waits for its in-flight requests before abandoning them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes the writer gathers before writing to the socket.
const WRITE_BUFFER_LEN: usize = 256 << 10;
/// Bytes read from the client at a time: a request header and a small write's payload (or
/// many, at queue depth) come in one read instead of a read each. Larger payloads bypass it.
const READ_BUFFER_LEN: usize = 64 << 10;

/// Why transmission ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed its side.
    ClientGone,
    /// The export was removed or replaced.
    ExportRemoved,
}

/// A connection's reservation for one request, released when its reply has been written.
struct Reservation {
    _request: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// One reply, encoded, with the reservation it releases once written.
struct Outgoing {
    head: Bytes,
    data: Option<Bytes>,
    _reservation: Reservation,
}

/// What a request produced.
enum Outcome {
    Done,
    Data { offset: u64, data: Bytes },
    Extents(Vec<(u32, u32)>),
}

struct Conn<B> {
    backend: Arc<B>,
    limits: Limits,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    replies: mpsc::Sender<Outgoing>,
    tasks: JoinSet<()>,
}

/// Serves requests until the client disconnects, the export goes away or the client breaks
/// the protocol; answers everything in flight before returning.
pub(crate) async fn transmit<R, W, B>(rd: R, wr: W, session: Session<B>) -> Result<End, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    // Created after the handshake, which reads exactly what it needs: nothing is buffered yet.
    let mut rd = BufReader::with_capacity(READ_BUFFER_LEN, rd);
    let (replies, queue) = mpsc::channel(INFLIGHT_PER_CONN);
    let writer = tokio::spawn(write_replies(wr, queue));
    let backend = session.export.backend;
    let mut conn = Conn {
        limits: Limits {
            size: backend.size(),
            read_only: backend.read_only(),
            structured: session.structured,
            block_status: session.block_status,
        },
        backend,
        requests: Arc::new(Semaphore::new(INFLIGHT_PER_CONN)),
        bytes: Arc::new(Semaphore::new(INFLIGHT_BYTES_PER_CONN as usize)),
        replies,
        tasks: JoinSet::new(),
    };
    let mut closed = session.export.closed;
    let end = read_requests(&mut rd, &mut conn, &mut closed).await;
    let Conn {
        mut tasks, replies, ..
    } = conn;
    drop(replies);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(done) = tasks.join_next().await {
            log_panic(done);
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("abandoning NBD requests still running after {DRAIN_TIMEOUT:?}");
        tasks.abort_all();
    }
    drop(tasks);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("NBD reply writer stopped: {e}"),
        Err(e) => tracing::warn!("NBD reply writer failed: {e}"),
    }
    end
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!("NBD request task panicked: {e}");
        }
    }
}

/// Resolves once the export is removed or replaced (or its registry entry is gone).
async fn export_closed(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|c| *c).await;
}

async fn read_requests<R, B>(
    rd: &mut R,
    conn: &mut Conn<B>,
    closed: &mut watch::Receiver<bool>,
) -> Result<End, NbdError>
where
    R: AsyncRead + Unpin,
    B: Backend,
{
    loop {
        while let Some(done) = conn.tasks.try_join_next() {
            log_panic(done);
        }
        let mut buf = [0u8; wire::REQUEST_LEN];
        // `read_exact` is not cancellation-safe, but losing a partly read header is harmless
        // here: when the export closes, nothing more is read from this connection.
        let read = tokio::select! {
            biased;
            () = export_closed(closed) => return Ok(End::ExportRemoved),
            r = rd.read_exact(&mut buf) => r,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(End::ClientGone),
            Err(e) => return Err(e.into()),
        }
        let header = wire::decode_request(&buf).map_err(NbdError::RequestMagic)?;
        let verdict = classify(&header, &conn.limits);
        let payload_bytes = match verdict {
            Ok(Command::Disconnect) => return Ok(End::Disconnect),
            Ok(Command::Read { len, .. } | Command::Write { len, .. }) => len,
            _ => 0,
        };
        let reservation = conn.reserve(payload_bytes).await;
        let payload = match verdict {
            Ok(Command::Write { len, .. }) => read_payload(rd, len).await?,
            Err(_) if header.command == wire::CMD_WRITE => {
                if header.len > SKIP_PAYLOAD_LEN_MAX {
                    return Err(NbdError::PayloadTooLarge(header.len));
                }
                skip(rd, u64::from(header.len)).await?;
                Bytes::new()
            }
            _ => Bytes::new(),
        };
        match verdict {
            Ok(command) => conn.spawn(header.cookie, command, payload, reservation),
            Err(rejection) => {
                tracing::debug!(
                    cookie = header.cookie,
                    command = header.command,
                    why = rejection.why,
                    "NBD request refused"
                );
                let (head, data) = encode(header.cookie, Err(rejection), conn.limits.structured);
                conn.send(Outgoing {
                    head,
                    data,
                    _reservation: reservation,
                })
                .await;
            }
        }
    }
}

/// Reads a WRITE payload without zero-filling the buffer first.
async fn read_payload<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> std::io::Result<Bytes> {
    let len = usize::try_from(len).expect("payloads are at most MAX_PAYLOAD");
    let mut buf = BytesMut::with_capacity(len);
    let mut limited = rd.take(len as u64);
    while buf.len() < len {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

impl<B: Backend> Conn<B> {
    async fn reserve(&self, payload_bytes: u32) -> Reservation {
        let request = self
            .requests
            .clone()
            .acquire_owned()
            .await
            .expect("the request semaphore is never closed");
        let bytes = self
            .bytes
            .clone()
            .acquire_many_owned(payload_bytes)
            .await
            .expect("the byte semaphore is never closed");
        Reservation {
            _request: request,
            _bytes: bytes,
        }
    }

    async fn send(&self, reply: Outgoing) {
        // Fails only when the writer is gone (the client vanished): nobody to answer then.
        let _ = self.replies.send(reply).await;
    }

    fn spawn(&mut self, cookie: u64, command: Command, payload: Bytes, reservation: Reservation) {
        let backend = self.backend.clone();
        let replies = self.replies.clone();
        let structured = self.limits.structured;
        self.tasks.spawn(async move {
            let outcome = execute(&*backend, command, payload).await;
            if let Err(r) = &outcome {
                tracing::debug!(cookie, ?command, why = r.why, "NBD request failed");
            }
            let (head, data) = encode(cookie, outcome, structured);
            let _ = replies
                .send(Outgoing {
                    head,
                    data,
                    _reservation: reservation,
                })
                .await;
        });
    }
}

fn backend_error(error: BackendError) -> Rejection {
    Rejection {
        error,
        why: "the export's storage failed the request",
    }
}

async fn execute<B: Backend>(
    b: &B,
    command: Command,
    payload: Bytes,
) -> Result<Outcome, Rejection> {
    match command {
        Command::Read { offset, len } => {
            if len == 0 {
                return Ok(Outcome::Data {
                    offset,
                    data: Bytes::new(),
                });
            }
            let data = b.read(offset, len).await.map_err(backend_error)?;
            if u32::try_from(data.len()) != Ok(len) {
                // A backend bug; sending the wrong amount would desynchronise the client.
                tracing::warn!(
                    offset,
                    len,
                    got = data.len(),
                    "NBD backend returned a short read"
                );
                return Err(Rejection {
                    error: BackendError::Io,
                    why: "the export's storage returned the wrong amount of data",
                });
            }
            Ok(Outcome::Data { offset, data })
        }
        Command::Write { offset, len, fua } => {
            if len > 0 {
                b.write(offset, payload, fua).await.map_err(backend_error)?;
            }
            Ok(Outcome::Done)
        }
        Command::Flush => {
            b.flush().await.map_err(backend_error)?;
            Ok(Outcome::Done)
        }
        Command::Trim { offset, len, fua } => {
            if len > 0 {
                b.trim(offset, u64::from(len))
                    .await
                    .map_err(backend_error)?;
                if fua {
                    b.flush().await.map_err(backend_error)?;
                }
            }
            Ok(Outcome::Done)
        }
        Command::Cache { offset, len } => {
            b.cache(offset, u64::from(len))
                .await
                .map_err(backend_error)?;
            Ok(Outcome::Done)
        }
        Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
            fast,
        } => {
            if fast && !b.fast_zero(offset, u64::from(len)) {
                return Err(Rejection {
                    error: BackendError::NotSup,
                    why: "zeroing this range is not faster than writing it",
                });
            }
            if len > 0 {
                b.write_zeroes(offset, u64::from(len), may_trim)
                    .await
                    .map_err(backend_error)?;
                if fua {
                    b.flush().await.map_err(backend_error)?;
                }
            }
            Ok(Outcome::Done)
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let extents = b
                .block_status(offset, u64::from(len))
                .await
                .map_err(backend_error)?;
            Ok(Outcome::Extents(descriptors(&extents, len, req_one)))
        }
        Command::Disconnect => Ok(Outcome::Done),
    }
}

/// Encodes a reply as a header plus optional data (kept apart to avoid copying READ data).
fn encode(
    cookie: u64,
    outcome: Result<Outcome, Rejection>,
    structured: bool,
) -> (Bytes, Option<Bytes>) {
    match (outcome, structured) {
        (Ok(Outcome::Done), _) => (wire::encode_simple_reply(cookie, 0), None),
        (Ok(Outcome::Data { data, .. }), false) => {
            (wire::encode_simple_reply(cookie, 0), Some(data))
        }
        (Ok(Outcome::Data { data, .. }), true) if data.is_empty() => {
            (wire::encode_none_chunk(cookie), None)
        }
        (Ok(Outcome::Data { offset, data }), true) => {
            let len = u32::try_from(data.len()).expect("reads are at most MAX_PAYLOAD");
            (
                wire::encode_offset_data_header(cookie, offset, len),
                Some(data),
            )
        }
        (Ok(Outcome::Extents(extents)), _) => (
            wire::encode_block_status_chunk(cookie, BASE_ALLOCATION_ID, &extents),
            None,
        ),
        (Err(r), true) => (
            wire::encode_error_chunk(cookie, r.error.wire_code(), r.why),
            None,
        ),
        (Err(r), false) => (wire::encode_simple_reply(cookie, r.error.wire_code()), None),
    }
}

/// The one task that writes replies, flushing whenever the queue runs dry; shuts the write
/// side down once every sender is gone.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut queue: mpsc::Receiver<Outgoing>,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER_LEN, wr);
    while let Some(reply) = queue.recv().await {
        out.write_all(&reply.head).await?;
        if let Some(data) = &reply.data {
            out.write_all(data).await?;
        }
        drop(reply);
        if queue.is_empty() {
            // Let the requests that are ready finish first: their replies join this write
            // (one syscall for many). Returns at once when nothing else is runnable.
            tokio::task::yield_now().await;
        }
        if queue.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await?;
    out.shutdown().await
}
