//! An NBD server (fixed newstyle handshake, NetworkBlockDevice/nbd doc/proto.md) over any
//! byte stream, serving the exports of a [`Registry`].
//!
//! Handshake: OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO (INFO_EXPORT, INFO_NAME,
//! INFO_DESCRIPTION, INFO_BLOCK_SIZE), OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT and
//! OPT_SET_META_CONTEXT (`base:allocation`); anything else gets ERR_UNSUP without losing sync.
//! Transmission: READ, WRITE (FUA), DISC, FLUSH, TRIM, WRITE_ZEROES (NO_HOLE, FAST_ZERO),
//! BLOCK_STATUS (REQ_ONE), CACHE. Requests run concurrently (bounded per connection) and are
//! answered as they complete, out of order; one writer task serialises replies.
//! Removing an export closes its connections after their in-flight requests are answered.

use bytes::{BufMut, Bytes, BytesMut};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 2;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_SEND_WRITE_ZEROES: u16 = 64;
const TF_SEND_DF: u16 = 128;
const TF_CAN_MULTI_CONN: u16 = 256;
const TF_SEND_CACHE: u16 = 1024;
const TF_SEND_FAST_ZERO: u16 = 2048;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 2;
const CMD_FLAG_REQ_ONE: u16 = 8;
const CMD_FLAG_FAST_ZERO: u16 = 16;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// The one metadata context: allocation (HOLE = 1, ZERO = 2).
pub const BASE_ALLOCATION: &str = "base:allocation";
const BASE_ALLOCATION_ID: u32 = 1;
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// Largest READ/WRITE payload (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload accepted during the handshake.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Requests in flight per connection.
pub const INFLIGHT_PER_CONN: usize = 128;

/// NBD error numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NbdErrno {
    Perm = 1,
    Io = 5,
    Inval = 22,
    NoSpc = 28,
    NotSup = 95,
    Shutdown = 108,
}

/// What an export offers the server.
pub trait Backend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = Result<Bytes, NbdErrno>> + Send;
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), NbdErrno>> + Send;
    fn flush(&self) -> impl Future<Output = Result<(), NbdErrno>> + Send;
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), NbdErrno>> + Send;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> impl Future<Output = Result<(), NbdErrno>> + Send;
    /// `(length, allocated)` runs covering a prefix of `[offset, offset + len)`.
    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<(u64, bool)>, NbdErrno>> + Send;
    /// Zeroing a range costs no data transfer (so FAST_ZERO may be honoured).
    fn fast_zero(&self, offset: u64, len: u64) -> bool;
    fn read_only(&self) -> bool {
        false
    }
    /// FLUSH on one connection covers writes acknowledged on every connection.
    fn can_multi_conn(&self) -> bool;
    fn description(&self) -> String {
        String::new()
    }
}

struct Export<B> {
    backend: Arc<B>,
    closed: watch::Sender<bool>,
}

/// The exports by name; add and remove at runtime.
pub struct Registry<B> {
    exports: Mutex<BTreeMap<String, Export<B>>>,
}

impl<B: Backend> Default for Registry<B> {
    fn default() -> Self {
        Registry {
            exports: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<B: Backend> Registry<B> {
    pub fn add(&self, name: &str, backend: Arc<B>) {
        let (closed, _) = watch::channel(false);
        if let Ok(mut e) = self.exports.lock() {
            if let Some(old) = e.insert(name.to_string(), Export { backend, closed }) {
                let _ = old.closed.send(true);
            }
        }
    }

    /// Remove an export; its connections finish their in-flight requests and close.
    pub fn remove(&self, name: &str) {
        if let Ok(mut e) = self.exports.lock() {
            if let Some(old) = e.remove(name) {
                let _ = old.closed.send(true);
            }
        }
    }

    fn get(&self, name: &str) -> Option<(Arc<B>, watch::Receiver<bool>)> {
        let e = self.exports.lock().ok()?;
        let x = e.get(name).or_else(|| {
            if name.is_empty() && e.len() == 1 {
                e.values().next()
            } else {
                None
            }
        })?;
        Some((x.backend.clone(), x.closed.subscribe()))
    }

    fn names(&self) -> Vec<String> {
        self.exports
            .lock()
            .map(|e| e.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Serve one client connection to completion.
pub async fn serve_conn<S, B>(stream: S, registry: Arc<Registry<B>>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: Backend,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let Some(session) = handshake(&mut rd, &mut wr, &registry).await? else {
        return Ok(());
    };
    transmission(rd, wr, session).await
}

struct Session<B> {
    backend: Arc<B>,
    closed: watch::Receiver<bool>,
    structured: bool,
    meta_context: bool,
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    typ: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(REPLY_MAGIC);
    b.put_u32(opt);
    b.put_u32(typ);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    w.write_all(&b).await?;
    Ok(())
}

fn tflags<B: Backend>(b: &B) -> u16 {
    let mut f = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_FAST_ZERO
        | TF_SEND_DF
        | TF_SEND_CACHE;
    if b.read_only() {
        f |= TF_READ_ONLY;
    }
    if b.can_multi_conn() {
        f |= TF_CAN_MULTI_CONN;
    }
    f
}

/// A cursor over option data that never panics.
struct Cur<'a>(&'a [u8]);
impl Cur<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }
    fn u16(&mut self) -> Option<u16> {
        let (h, t) = self.0.split_at_checked(2)?;
        self.0 = t;
        Some(u16::from_be_bytes(h.try_into().ok()?))
    }
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        Some(String::from_utf8_lossy(self.bytes(n)?).into_owned())
    }
}

async fn handshake<R, W, B>(
    rd: &mut R,
    wr: &mut W,
    reg: &Registry<B>,
) -> Result<Option<Session<B>>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    B: Backend,
{
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    wr.write_all(&hello).await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(NbdError::Protocol(
            "client does not speak fixed newstyle".into(),
        ));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    let mut structured = false;
    let mut meta_context = false;
    loop {
        if rd.read_u64().await? != IHAVEOPT {
            return Err(NbdError::Protocol("bad option magic".into()));
        }
        let opt = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION_LEN {
            // Skip it to stay in sync, then refuse.
            tokio::io::copy(&mut rd.take(u64::from(len)), &mut tokio::io::sink()).await?;
            opt_reply(wr, opt, REP_ERR_TOO_BIG, b"option too long").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        let mut c = Cur(&data);
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some((backend, closed)) = reg.get(&name) else {
                    return Err(NbdError::Protocol(format!("unknown export '{name}'")));
                };
                let mut b = BytesMut::new();
                b.put_u64(backend.size());
                b.put_u16(tflags(&*backend));
                if !no_zeroes {
                    b.put_slice(&[0u8; 124]);
                }
                wr.write_all(&b).await?;
                return Ok(Some(Session {
                    backend,
                    closed,
                    structured,
                    meta_context,
                }));
            }
            OPT_ABORT => {
                let _ = opt_reply(wr, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(wr, opt, REP_ERR_INVALID, b"OPT_LIST takes no data").await?;
                    continue;
                }
                for n in reg.names() {
                    let mut d = BytesMut::new();
                    d.put_u32(n.len() as u32);
                    d.put_slice(n.as_bytes());
                    opt_reply(wr, opt, REP_SERVER, &d).await?;
                }
                opt_reply(wr, opt, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    opt_reply(wr, opt, REP_ERR_INVALID, b"no data expected").await?;
                    continue;
                }
                structured = true;
                opt_reply(wr, opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let parsed = (|| {
                    let export = c.string()?;
                    let n = c.u32()?;
                    let mut qs = Vec::new();
                    for _ in 0..n.min(64) {
                        qs.push(c.string()?);
                    }
                    Some((export, n, qs))
                })();
                let Some((export, n, queries)) = parsed else {
                    opt_reply(wr, opt, REP_ERR_INVALID, b"malformed meta context request").await?;
                    continue;
                };
                if opt == OPT_SET_META_CONTEXT && !structured {
                    opt_reply(
                        wr,
                        opt,
                        REP_ERR_INVALID,
                        b"negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                if reg.get(&export).is_none() {
                    opt_reply(wr, opt, REP_ERR_UNKNOWN, b"unknown export").await?;
                    continue;
                }
                let matched = (opt == OPT_LIST_META_CONTEXT && n == 0)
                    || queries.iter().any(|q| {
                        q == BASE_ALLOCATION || (opt == OPT_LIST_META_CONTEXT && q == "base:")
                    });
                if opt == OPT_SET_META_CONTEXT {
                    meta_context = matched;
                }
                if matched {
                    let mut d = BytesMut::new();
                    d.put_u32(BASE_ALLOCATION_ID);
                    d.put_slice(BASE_ALLOCATION.as_bytes());
                    opt_reply(wr, opt, REP_META_CONTEXT, &d).await?;
                }
                opt_reply(wr, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = (|| {
                    let name = c.string()?;
                    let n = c.u16()?;
                    let mut req = Vec::new();
                    for _ in 0..n {
                        req.push(c.u16()?);
                    }
                    Some((name, req))
                })();
                let Some((name, requested)) = parsed else {
                    opt_reply(wr, opt, REP_ERR_INVALID, b"malformed info request").await?;
                    continue;
                };
                let Some((backend, closed)) = reg.get(&name) else {
                    opt_reply(
                        wr,
                        opt,
                        REP_ERR_UNKNOWN,
                        format!("no export named '{name}'").as_bytes(),
                    )
                    .await?;
                    continue;
                };
                let mut d = BytesMut::new();
                d.put_u16(INFO_EXPORT);
                d.put_u64(backend.size());
                d.put_u16(tflags(&*backend));
                opt_reply(wr, opt, REP_INFO, &d).await?;
                let mut d = BytesMut::new();
                d.put_u16(INFO_BLOCK_SIZE);
                d.put_u32(1);
                d.put_u32(4096);
                d.put_u32(MAX_PAYLOAD);
                opt_reply(wr, opt, REP_INFO, &d).await?;
                if requested.contains(&INFO_NAME) {
                    let mut d = BytesMut::new();
                    d.put_u16(INFO_NAME);
                    d.put_slice(name.as_bytes());
                    opt_reply(wr, opt, REP_INFO, &d).await?;
                }
                if requested.contains(&INFO_DESCRIPTION) {
                    let mut d = BytesMut::new();
                    d.put_u16(INFO_DESCRIPTION);
                    d.put_slice(backend.description().as_bytes());
                    opt_reply(wr, opt, REP_INFO, &d).await?;
                }
                opt_reply(wr, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(Session {
                        backend,
                        closed,
                        structured,
                        meta_context,
                    }));
                }
            }
            _ => opt_reply(wr, opt, REP_ERR_UNSUP, b"option not supported").await?,
        }
    }
}

/// One reply, encoded.
fn simple_reply(handle: u64, err: u32, data: Option<Bytes>) -> Vec<Bytes> {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(err);
    b.put_u64(handle);
    let mut v = vec![b.freeze()];
    if let Some(d) = data {
        v.push(d);
    }
    v
}

fn structured_chunk(
    handle: u64,
    flags: u16,
    typ: u16,
    payload_head: &[u8],
    payload: Option<Bytes>,
) -> Vec<Bytes> {
    let len = payload_head.len() + payload.as_ref().map_or(0, |p| p.len());
    let mut b = BytesMut::with_capacity(20 + payload_head.len());
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(typ);
    b.put_u64(handle);
    b.put_u32(len as u32);
    b.put_slice(payload_head);
    let mut v = vec![b.freeze()];
    if let Some(p) = payload {
        v.push(p);
    }
    v
}

fn error_reply(structured: bool, handle: u64, e: NbdErrno) -> Vec<Bytes> {
    if structured {
        let mut p = BytesMut::new();
        p.put_u32(e as u32);
        p.put_u16(0);
        structured_chunk(handle, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &p, None)
    } else {
        simple_reply(handle, e as u32, None)
    }
}

async fn transmission<R, W, B>(mut rd: R, mut wr: W, s: Session<B>) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(INFLIGHT_PER_CONN * 2);
    let writer = tokio::spawn(async move {
        while let Some(parts) = rx.recv().await {
            for p in parts {
                if wr.write_all(&p).await.is_err() {
                    return;
                }
            }
            // Batch: flush only when nothing else is queued.
            if rx.is_empty() && wr.flush().await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let inflight = Arc::new(Semaphore::new(INFLIGHT_PER_CONN));
    let mut closed = s.closed.clone();
    let backend = s.backend.clone();
    let structured = s.structured;
    let result = loop {
        let mut hdr = [0u8; 28];
        tokio::select! {
            r = rd.read_exact(&mut hdr) => {
                if let Err(e) = r {
                    break if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e.into()) };
                }
            }
            _ = closed.wait_for(|c| *c) => break Ok(()),
        }
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        if magic != REQUEST_MAGIC {
            break Err(NbdError::Protocol(format!("bad request magic {magic:#x}")));
        }
        let flags = u16::from_be_bytes([hdr[4], hdr[5]]);
        let cmd = u16::from_be_bytes([hdr[6], hdr[7]]);
        let handle = u64::from_be_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
        let offset = u64::from_be_bytes(hdr[16..24].try_into().unwrap_or([0; 8]));
        let len = u32::from_be_bytes([hdr[24], hdr[25], hdr[26], hdr[27]]);
        if cmd == CMD_DISC {
            break Ok(());
        }
        let mut payload = Bytes::new();
        if cmd == CMD_WRITE {
            if len > MAX_PAYLOAD {
                // Cannot take it; skip it to stay in sync when that is cheap, else give up.
                if len > 2 * MAX_PAYLOAD {
                    break Err(NbdError::Protocol(format!("write of {len} bytes")));
                }
                if tokio::io::copy(&mut (&mut rd).take(u64::from(len)), &mut tokio::io::sink())
                    .await
                    .is_err()
                {
                    break Ok(());
                }
                let _ = tx
                    .send(error_reply(structured, handle, NbdErrno::Inval))
                    .await;
                continue;
            }
            let mut b = BytesMut::zeroed(len as usize);
            if rd.read_exact(&mut b).await.is_err() {
                break Ok(());
            }
            payload = b.freeze();
        }
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break Ok(());
        };
        let (tx, backend) = (tx.clone(), backend.clone());
        let meta_context = s.meta_context;
        tokio::spawn(async move {
            let reply = run_cmd(
                &*backend,
                structured,
                meta_context,
                cmd,
                flags,
                handle,
                offset,
                len,
                payload,
            )
            .await;
            let _ = tx.send(reply).await;
            drop(permit);
        });
    };
    // Let in-flight requests answer, then close.
    let _ = inflight.acquire_many(INFLIGHT_PER_CONN as u32).await;
    drop(tx);
    let _ = writer.await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_cmd<B: Backend>(
    b: &B,
    structured: bool,
    meta_context: bool,
    cmd: u16,
    flags: u16,
    handle: u64,
    offset: u64,
    len: u32,
    payload: Bytes,
) -> Vec<Bytes> {
    let size = b.size();
    let in_range = offset
        .checked_add(u64::from(len))
        .is_some_and(|e| e <= size);
    let writes = matches!(cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let err = |e| error_reply(structured, handle, e);
    if writes && b.read_only() {
        return err(NbdErrno::Perm);
    }
    if matches!(
        cmd,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE | CMD_BLOCK_STATUS
    ) && !in_range
    {
        return err(if cmd == CMD_WRITE || cmd == CMD_WRITE_ZEROES {
            NbdErrno::NoSpc
        } else {
            NbdErrno::Inval
        });
    }
    let done = |r: Result<(), NbdErrno>| match r {
        Ok(()) if structured => structured_chunk(handle, REPLY_FLAG_DONE, 0, &[], None),
        Ok(()) => simple_reply(handle, 0, None),
        Err(e) => err(e),
    };
    match cmd {
        CMD_READ => {
            if len > MAX_PAYLOAD {
                return err(NbdErrno::Inval);
            }
            match b.read(offset, len).await {
                Ok(d) if structured => {
                    if d.is_empty() {
                        return structured_chunk(handle, REPLY_FLAG_DONE, 0, &[], None);
                    }
                    structured_chunk(
                        handle,
                        REPLY_FLAG_DONE,
                        REPLY_TYPE_OFFSET_DATA,
                        &offset.to_be_bytes(),
                        Some(d),
                    )
                }
                Ok(d) => simple_reply(handle, 0, Some(d)),
                Err(e) => err(e),
            }
        }
        CMD_WRITE => done(b.write(offset, payload, flags & CMD_FLAG_FUA != 0).await),
        CMD_FLUSH => done(b.flush().await),
        CMD_TRIM => {
            let r = b.trim(offset, u64::from(len)).await;
            let r = match r {
                Ok(()) if flags & CMD_FLAG_FUA != 0 => b.flush().await,
                r => r,
            };
            done(r)
        }
        CMD_WRITE_ZEROES => {
            if flags & CMD_FLAG_FAST_ZERO != 0 && !b.fast_zero(offset, u64::from(len)) {
                return err(NbdErrno::NotSup);
            }
            let r = b
                .write_zeroes(offset, u64::from(len), flags & CMD_FLAG_NO_HOLE == 0)
                .await;
            let r = match r {
                Ok(()) if flags & CMD_FLAG_FUA != 0 => b.flush().await,
                r => r,
            };
            done(r)
        }
        CMD_CACHE => done(Ok(())),
        CMD_BLOCK_STATUS => {
            if !structured || !meta_context {
                return err(NbdErrno::Inval);
            }
            match b.allocation(offset, u64::from(len.max(1))).await {
                Ok(runs) => {
                    let mut p = BytesMut::new();
                    p.put_u32(BASE_ALLOCATION_ID);
                    for (l, allocated) in runs.iter().take(if flags & CMD_FLAG_REQ_ONE != 0 {
                        1
                    } else {
                        usize::MAX
                    }) {
                        p.put_u32((*l).min(u64::from(u32::MAX) & !4095) as u32);
                        p.put_u32(if *allocated {
                            0
                        } else {
                            STATE_HOLE | STATE_ZERO
                        });
                    }
                    structured_chunk(handle, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, &p, None)
                }
                Err(e) => err(e),
            }
        }
        _ => err(NbdErrno::Inval),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_never_panics_on_short_input() {
        let mut c = Cur(&[0, 0, 0, 9, 1]);
        assert_eq!(c.string(), None);
        let mut c = Cur(&[]);
        assert_eq!(c.u16(), None);
    }
}
