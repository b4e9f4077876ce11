//! Shared harness of the `nbd_*` integration tests: an in-process NBD server on a unix socket
//! in a scratch directory, a runner for the real client binaries, and a raw protocol client
//! for sending exactly the bytes a test wants. Protocol numbers here are written out from the
//! specification rather than taken from the server, so the tests check the server's values.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod mem;

use mem::MemBackend;
use sdc::nbd::{serve_tcp_listener, serve_unix_listener, ExportRegistry};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

/// Name of the server runtime's threads; a panic on one of them fails the test.
const SERVER_THREAD: &str = "nbd-server";
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);
static PANIC_HOOK: Once = Once::new();

fn count_server_panics() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(SERVER_THREAD) {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// An NBD server running in its own runtime, serving `socket` inside a scratch directory that
/// is removed when the server is dropped.
pub struct Server {
    // Dropped first, so nothing serves from the directory once it is removed.
    rt: tokio::runtime::Runtime,
    pub registry: Arc<ExportRegistry<MemBackend>>,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Server {
    pub fn start(test: &str) -> Server {
        count_server_panics();
        let dir = tempfile::Builder::new()
            .prefix(&format!("nbd-{test}-"))
            .tempdir()
            .expect("create scratch dir");
        let socket = dir.path().join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(SERVER_THREAD)
            .enable_all()
            .build()
            .expect("build runtime");
        let registry = Arc::new(ExportRegistry::new());
        // Bound before returning, so clients can connect at once.
        let listener = rt
            .block_on(async { tokio::net::UnixListener::bind(&socket) })
            .expect("bind unix socket");
        rt.spawn(serve_unix_listener(listener, registry.clone()));
        Server {
            rt,
            registry,
            socket,
            dir,
        }
    }

    /// Adds an export and returns its backend for inspection.
    pub fn add(&self, name: &str, backend: MemBackend) -> Arc<MemBackend> {
        let backend = Arc::new(backend);
        self.registry.add(name, backend.clone());
        backend
    }

    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    /// Also serves on a loopback TCP port.
    pub fn listen_tcp(&self) -> SocketAddr {
        let listener = self
            .rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind tcp");
        let addr = listener.local_addr().expect("local addr");
        self.rt
            .spawn(serve_tcp_listener(listener, self.registry.clone()));
        addr
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Fails the test if any server task panicked (in any test of this binary).
    pub fn must_not_have_panicked(&self) {
        assert_eq!(
            SERVER_PANICS.load(Ordering::SeqCst),
            0,
            "the NBD server panicked"
        );
    }
}

/// Whether a client binary is installed; prints why the test is skipped when it is not.
pub fn have(test: &str, bins: &[&str]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for bin in bins {
        if !std::env::split_paths(&path).any(|d| d.join(bin).is_file()) {
            println!("SKIP {test}: {bin} is not installed");
            return false;
        }
    }
    true
}

pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a client with a deadline, killing it if it hangs.
pub fn run(bin: &str, args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {bin}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    // Block on the exit status in a thread; the deadline is a channel timeout, not a poll.
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(timeout) {
        Ok(r) => r.expect("wait for client"),
        Err(_) => {
            // SAFETY: kill(2) on our own child; the waiting thread reaps it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("{bin} {args:?} did not finish within {timeout:?}");
        }
    };
    Output {
        ok: status.success(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Runs a client that must succeed; returns its standard output.
pub fn must(bin: &str, args: &[&str]) -> String {
    let o = run(bin, args, Duration::from_secs(120));
    assert!(
        o.ok,
        "{bin} {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        o.stdout, o.stderr
    );
    o.stdout
}

/// Polls `f` until it returns true or the deadline passes.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Back off between polls of the condition (as tests/src/lib.rs `wait_for` does).
        std::thread::park_timeout(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

pub fn write_file(path: &Path, data: &[u8]) -> String {
    std::fs::write(path, data).expect("write file");
    path.display().to_string()
}

// Protocol numbers, from the specification.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;
pub const FLAG_REQ_ONE: u16 = 8;
pub const FLAG_FAST_ZERO: u16 = 16;
pub const TF_READ_ONLY: u16 = 2;
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ENOTSUP: u32 = 95;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// One structured reply chunk.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    pub fn error(&self) -> u32 {
        assert_eq!(self.kind, REPLY_TYPE_ERROR, "not an error chunk: {self:?}");
        be32(&self.payload)
    }
}

/// A client that speaks the protocol byte by byte, with a read timeout so a test cannot hang.
pub struct Raw {
    pub s: UnixStream,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().expect("2 bytes"))
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl Raw {
    pub fn connect(server: &Server) -> Raw {
        let s = UnixStream::connect(&server.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        Raw { s }
    }

    /// Reads the greeting and answers with client flags.
    pub fn hello(&mut self, client_flags: u32) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(be64(&g[8..]), IHAVEOPT);
        assert_eq!(be16(&g[16..]) & 3, 3, "FIXED_NEWSTYLE and NO_ZEROES");
        self.send(&client_flags.to_be_bytes());
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send");
    }

    /// Sends, ignoring a connection the server has already closed.
    pub fn try_send(&mut self, bytes: &[u8]) {
        let _ = self.s.write_all(bytes);
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut o = IHAVEOPT.to_be_bytes().to_vec();
        o.extend(option.to_be_bytes());
        o.extend((data.len() as u32).to_be_bytes());
        o.extend(data);
        self.send(&o);
    }

    /// `(option, reply type, payload)`.
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(be64(&h), 0x0003_e889_0455_65a9, "option reply magic");
        let mut payload = vec![0u8; be32(&h[16..]) as usize];
        self.s
            .read_exact(&mut payload)
            .expect("option reply payload");
        (be32(&h[8..]), be32(&h[12..]), payload)
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn option_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let r = self.option_reply();
            let last = r.1 == REP_ACK || r.1 >= 1 << 31;
            all.push(r);
            if last {
                return all;
            }
        }
    }

    /// Handshake into transmission on `name`; returns `(size, transmission flags)`.
    pub fn go(&mut self, name: &str, structured: bool, allocation: bool) -> (u64, u16) {
        self.hello(3);
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.option_reply().1, REP_ACK);
        }
        if allocation {
            self.option(
                OPT_SET_META_CONTEXT,
                &meta_query(name, &["base:allocation"]),
            );
            let replies = self.option_replies();
            assert_eq!(replies[0].1, REP_META_CONTEXT, "{replies:?}");
        }
        self.option(OPT_GO, &info_query(name, &[]));
        let mut export = None;
        for (_, kind, payload) in self.option_replies() {
            assert!(kind < 1 << 31, "GO refused: {kind:#x}");
            if kind == REP_INFO && be16(&payload) == 0 {
                export = Some((be64(&payload[2..]), be16(&payload[10..])));
            }
        }
        export.expect("GO sent NBD_INFO_EXPORT")
    }

    pub fn request(&mut self, flags: u16, command: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&request(flags, command, cookie, offset, len));
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        let mut r = request(0, CMD_WRITE, cookie, offset, data.len() as u32);
        r.extend(data);
        self.send(&r);
    }

    /// A simple reply: `(error, cookie)`, then `data_len` bytes of data if the error is zero.
    pub fn simple_reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(be32(&h), 0x6744_6698, "simple reply magic");
        let error = be32(&h[4..]);
        let mut data = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut data).expect("read data");
        (error, be64(&h[8..]), data)
    }

    /// The error of a simple reply that carries no data.
    pub fn simple_error(&mut self, cookie: u64) -> u32 {
        let (error, got, _) = self.simple_reply(0);
        assert_eq!(got, cookie, "reply cookie");
        error
    }

    /// Either reply kind, for commands that may be answered simply under structured replies.
    pub fn any_reply(&mut self) -> Chunk {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).expect("reply magic");
        match be32(&magic) {
            0x6744_6698 => {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h).expect("simple reply");
                let error = be32(&h);
                Chunk {
                    flags: 1,
                    kind: if error == 0 {
                        REPLY_TYPE_NONE
                    } else {
                        REPLY_TYPE_ERROR
                    },
                    cookie: be64(&h[4..]),
                    payload: if error == 0 {
                        vec![]
                    } else {
                        error.to_be_bytes().to_vec()
                    },
                }
            }
            0x668e_33ef => self.chunk_after_magic(),
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    pub fn chunk(&mut self) -> Chunk {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).expect("chunk magic");
        assert_eq!(be32(&magic), 0x668e_33ef, "structured reply magic");
        self.chunk_after_magic()
    }

    fn chunk_after_magic(&mut self) -> Chunk {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("chunk header");
        let mut payload = vec![0u8; be32(&h[12..]) as usize];
        self.s.read_exact(&mut payload).expect("chunk payload");
        Chunk {
            flags: be16(&h),
            kind: be16(&h[2..]),
            cookie: be64(&h[4..]),
            payload,
        }
    }

    /// True when the server closed the connection (EOF or reset before the read timeout).
    pub fn closed_by_server(&mut self) -> bool {
        let mut sink = Vec::new();
        match self.s.read_to_end(&mut sink) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

pub fn request(flags: u16, command: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend(flags.to_be_bytes());
    r.extend(command.to_be_bytes());
    r.extend(cookie.to_be_bytes());
    r.extend(offset.to_be_bytes());
    r.extend(len.to_be_bytes());
    r
}

pub fn info_query(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend((infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend(i.to_be_bytes());
    }
    d
}

pub fn meta_query(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend((queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend((q.len() as u32).to_be_bytes());
        d.extend(q.as_bytes());
    }
    d
}

/// Block status descriptors `(length, flags)` of a BLOCK_STATUS chunk.
pub fn descriptors(chunk: &Chunk) -> Vec<(u32, u32)> {
    assert_eq!(chunk.kind, REPLY_TYPE_BLOCK_STATUS, "{chunk:?}");
    chunk.payload[4..]
        .chunks(8)
        .map(|d| (be32(d), be32(&d[4..])))
        .collect()
}
