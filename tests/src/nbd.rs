//! A small NBD client for the fault tests (fixed newstyle, `NBD_OPT_GO`, simple replies) and
//! the recording writer built on it: many writes in flight, each acknowledged write applied to a
//! model of the volume, so a checker can read the volume back and compare byte for byte.
//!
//! The writer never has two overlapping writes in flight, so the model's final content does
//! not depend on the order the server completed them in.

use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const OPTS_MAGIC: u64 = 0x4948_4156_454F_5054; // "IHAVEOPT"
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One connection in transmission phase.
pub struct Nbd {
    sock: UnixStream,
    pub size: u64,
}

/// One reply: the handle, the error (0 = ok) and, for reads, the data.
pub struct Reply {
    pub handle: u64,
    pub error: u32,
    pub data: Vec<u8>,
}

impl Nbd {
    /// Connect to `export` on a unix socket and negotiate.
    pub fn connect(socket: &Path, export: &str) -> io::Result<Nbd> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" {
            return Err(bad("not an NBD server"));
        }
        s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = Vec::new();
        opt.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = None;
        loop {
            if read_u64(&mut s)? != REPLY_MAGIC {
                return Err(bad("bad option reply magic"));
            }
            let _opt = read_u32(&mut s)?;
            let kind = read_u32(&mut s)?;
            let len = read_u32(&mut s)? as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match kind {
                REP_ACK => break,
                REP_INFO if len >= 12 && data[..2] == [0, 0] => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&data[2..10]);
                    size = Some(u64::from_be_bytes(b));
                }
                REP_INFO => {}
                k if k & 0x8000_0000 != 0 => {
                    return Err(bad(format!(
                        "option refused ({k:#x}): {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
                _ => {}
            }
        }
        let size = size.ok_or_else(|| bad("no export size"))?;
        Ok(Nbd { sock: s, size })
    }

    /// A second handle on the socket, for a reader thread.
    pub fn try_clone(&self) -> io::Result<Nbd> {
        Ok(Nbd {
            sock: self.sock.try_clone()?,
            size: self.size,
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }

    /// Send one request (data only for writes).
    pub fn send(
        &mut self,
        cmd: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<()> {
        let mut h = Vec::with_capacity(28 + data.len());
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        self.sock.write_all(&h)
    }

    /// Read one simple reply; `read_len` says how much data follows a successful reply to
    /// `handle` (the caller knows which handles are reads).
    pub fn recv(&mut self, read_len: impl Fn(u64) -> usize) -> io::Result<Reply> {
        if read_u32(&mut self.sock)? != SIMPLE_REPLY_MAGIC {
            return Err(bad("bad reply magic"));
        }
        let error = read_u32(&mut self.sock)?;
        let handle = read_u64(&mut self.sock)?;
        let mut data = Vec::new();
        if error == 0 {
            data = vec![0u8; read_len(handle)];
            self.sock.read_exact(&mut data)?;
        }
        Ok(Reply {
            handle,
            error,
            data,
        })
    }

    /// One synchronous read.
    pub fn read_at(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.send(CMD_READ, 1, offset, len, &[])?;
        let r = self.recv(|_| len as usize)?;
        if r.error != 0 {
            return Err(io::Error::other(format!("read error {}", r.error)));
        }
        Ok(r.data)
    }

    /// One synchronous write.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.send(CMD_WRITE, 2, offset, data.len() as u32, data)?;
        let r = self.recv(|_| 0)?;
        if r.error != 0 {
            return Err(io::Error::other(format!("write error {}", r.error)));
        }
        Ok(())
    }

    /// One synchronous trim (`zeroes: false`) or write-zeroes.
    pub fn zero_at(&mut self, offset: u64, len: u32, zeroes: bool) -> io::Result<()> {
        let cmd = if zeroes { CMD_WRITE_ZEROES } else { CMD_TRIM };
        self.send(cmd, 5, offset, len, &[])?;
        let r = self.recv(|_| 0)?;
        if r.error != 0 {
            return Err(io::Error::other(format!("trim/zero error {}", r.error)));
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.send(CMD_FLUSH, 3, 0, 0, &[])?;
        let r = self.recv(|_| 0)?;
        if r.error != 0 {
            return Err(io::Error::other(format!("flush error {}", r.error)));
        }
        Ok(())
    }

    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 4, 0, 0, &[]);
    }
}

/// Granularity of the writer's non-overlap bookkeeping.
pub const SLOT: u64 = 64 << 10;
/// A chunk: one write in eight covers a whole one (the SDS writes those out of place).
const WHOLE: u64 = 1 << 20;

/// The bookkeeping slots a write at `off` of `len` bytes covers.
fn slots_of(off: u64, len: usize) -> std::ops::Range<u64> {
    off / SLOT..(off + len as u64).div_ceil(SLOT)
}

/// What the writer did.
#[derive(Debug, Default, Clone)]
pub struct WriteReport {
    /// Writes acknowledged (and covered by the final flush).
    pub acked: u64,
    /// Writes answered with an error: their slots may hold old or new data.
    pub failed: u64,
    /// Longest time without any completion while writes were in flight.
    pub max_stall: Duration,
    /// Stall windows over 300 ms: (seconds since start, length).
    pub stalls: Vec<(f64, Duration)>,
}

/// A view into a running [`write_load`] for snapshot tests: [`Probe::begin`] copies the model
/// (what every write acknowledged so far left) and starts noting every slot a write may still
/// change (in flight, failed, or sent since); [`Probe::end`] stops and returns both. A snapshot
/// taken between the two must equal the copy outside the noted slots.
#[derive(Default)]
pub struct Probe {
    shared: Mutex<Option<SharedState>>,
}

/// A writer's state and the condition its threads wait on.
type SharedState = Arc<(Mutex<Shared>, Condvar)>;

impl Probe {
    fn shared(&self) -> SharedState {
        let s = self.shared.lock().expect("probe");
        s.clone().expect("the writer has not started")
    }

    /// Copy the model and start noting the slots writes may change.
    pub fn begin(&self) {
        let sh = self.shared();
        let mut s = sh.0.lock().expect("writer state");
        let mut touched: HashSet<u64> = s.busy.clone();
        touched.extend(s.uncertain.iter().copied());
        s.probe = Some((s.model.clone(), touched));
    }

    /// Stop noting; the model copied at `begin` and the slots noted since.
    pub fn end(&self) -> (Vec<u8>, HashSet<u64>) {
        let sh = self.shared();
        let mut s = sh.0.lock().expect("writer state");
        s.probe.take().expect("Probe::begin first")
    }
}

struct Shared {
    /// Set by [`Probe::begin`]: the model then, and every slot a write may have changed since.
    probe: Option<(Vec<u8>, HashSet<u64>)>,
    /// The expected content of `[0, region)`.
    model: Vec<u8>,
    /// Slots that had a failed write: excluded from the check.
    uncertain: HashSet<u64>,
    busy: HashSet<u64>,
    pending: HashMap<u64, (u64, Vec<u8>)>,
    last_done: Instant,
    report: WriteReport,
    reader_error: Option<String>,
}

/// Writes random data at up to `depth` requests in flight to `[0, region)` until `stop`, then
/// flushes; one write in eight covers a whole 1 MiB chunk, the others 4 KiB to 64 KiB. Returns the report and the model of what the region must contain.
pub fn write_load(
    socket: &Path,
    export: &str,
    region: u64,
    depth: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<std::sync::atomic::AtomicU64>,
) -> io::Result<(WriteReport, Vec<u8>, HashSet<u64>)> {
    let probe = Probe::default();
    write_load_probed(socket, export, region, depth, seed, stop, progress, &probe)
}

/// [`write_load`], with a [`Probe`] a snapshot test can look through.
#[allow(clippy::too_many_arguments)]
pub fn write_load_probed(
    socket: &Path,
    export: &str,
    region: u64,
    depth: usize,
    seed: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<std::sync::atomic::AtomicU64>,
    probe: &Probe,
) -> io::Result<(WriteReport, Vec<u8>, HashSet<u64>)> {
    let mut tx = Nbd::connect(socket, export)?;
    let mut rx = tx.try_clone()?;
    let region = region.min(tx.size) / SLOT * SLOT;
    let mut initial = vec![0u8; region as usize];
    // The region's content before: read it, so the model starts from the truth.
    for off in (0..region).step_by(1 << 20) {
        let n = (region - off).min(1 << 20) as u32;
        let d = tx.read_at(off, n)?;
        initial[off as usize..off as usize + n as usize].copy_from_slice(&d);
    }
    let started = Instant::now();
    let shared = Arc::new((
        Mutex::new(Shared {
            probe: None,
            model: initial,
            uncertain: HashSet::new(),
            busy: HashSet::new(),
            pending: HashMap::new(),
            last_done: Instant::now(),
            report: WriteReport::default(),
            reader_error: None,
        }),
        Condvar::new(),
    ));
    if let Ok(mut p) = probe.shared.lock() {
        *p = Some(shared.clone());
    }
    let reader = {
        let shared = shared.clone();
        let progress = progress.clone();
        std::thread::spawn(move || loop {
            let r = match rx.recv(|_| 0) {
                Ok(r) => r,
                Err(e) => {
                    let (m, cv) = &*shared;
                    if let Ok(mut s) = m.lock() {
                        s.reader_error = Some(e.to_string());
                    }
                    cv.notify_all();
                    return;
                }
            };
            let (m, cv) = &*shared;
            let Ok(mut s) = m.lock() else { return };
            let now = Instant::now();
            let gap = now.duration_since(s.last_done);
            s.last_done = now;
            if gap > s.report.max_stall {
                s.report.max_stall = gap;
            }
            if gap > Duration::from_millis(300) {
                let at = now.duration_since(started).as_secs_f64() - gap.as_secs_f64();
                s.report.stalls.push((at, gap));
            }
            if r.handle == u64::MAX {
                // The final flush.
                s.pending.remove(&r.handle);
                if r.error != 0 {
                    s.reader_error = Some(format!("final flush failed: {}", r.error));
                }
                cv.notify_all();
                return;
            }
            if let Some((off, data)) = s.pending.remove(&r.handle) {
                if r.error == 0 {
                    s.model[off as usize..off as usize + data.len()].copy_from_slice(&data);
                    s.report.acked += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                } else {
                    s.report.failed += 1;
                    s.uncertain.extend(slots_of(off, data.len()));
                }
                for slot in slots_of(off, data.len()) {
                    s.busy.remove(&slot);
                }
            }
            cv.notify_all();
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let slots = region / SLOT;
    let mut handle = 0u64;
    let (m, cv) = &*shared;
    while !stop.load(Ordering::Relaxed) {
        let (off, data) = {
            let mut s = m.lock().map_err(|_| io::Error::other("poisoned"))?;
            while s.pending.len() >= depth && s.reader_error.is_none() {
                s = cv
                    .wait_timeout(s, Duration::from_millis(100))
                    .map_err(|_| io::Error::other("poisoned"))?
                    .0;
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            if let Some(e) = &s.reader_error {
                return Err(io::Error::other(e.clone()));
            }
            if s.pending.len() >= depth {
                continue;
            }
            // Drawn again with every retry, so a busy region ends in a small write.
            let (off, len) = loop {
                let whole = region >= WHOLE && rng.gen_range(0..8) == 0;
                let (off, len) = if whole {
                    (rng.gen_range(0..region / WHOLE) * WHOLE, WHOLE)
                } else {
                    let blocks = rng.gen_range(1..=(SLOT / 4096));
                    let first = rng.gen_range(0..=(SLOT / 4096 - blocks));
                    (rng.gen_range(0..slots) * SLOT + first * 4096, blocks * 4096)
                };
                if !slots_of(off, len as usize).any(|x| s.busy.contains(&x)) {
                    break (off, len);
                }
            };
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data[..]);
            handle += 1;
            if s.pending.is_empty() {
                s.last_done = Instant::now();
            }
            s.busy.extend(slots_of(off, data.len()));
            if let Some((_, touched)) = &mut s.probe {
                touched.extend(slots_of(off, data.len()));
            }
            s.pending.insert(handle, (off, data.clone()));
            (off, data)
        };
        tx.send(CMD_WRITE, handle, off, data.len() as u32, &data)?;
    }
    // Drain, then flush everything acknowledged.
    {
        let mut s = m.lock().map_err(|_| io::Error::other("poisoned"))?;
        while !s.pending.is_empty() && s.reader_error.is_none() {
            s = cv
                .wait_timeout(s, Duration::from_millis(100))
                .map_err(|_| io::Error::other("poisoned"))?
                .0;
        }
        s.pending.insert(u64::MAX, (0, Vec::new()));
    }
    tx.send(CMD_FLUSH, u64::MAX, 0, 0, &[])?;
    reader
        .join()
        .map_err(|_| io::Error::other("reader panicked"))?;
    tx.disconnect();
    let s = m.lock().map_err(|_| io::Error::other("poisoned"))?;
    if let Some(e) = &s.reader_error {
        return Err(io::Error::other(e.clone()));
    }
    Ok((s.report.clone(), s.model.clone(), s.uncertain.clone()))
}

/// Read `[0, model.len())` back and count the 4 KiB blocks that differ from the model (slots in
/// `uncertain` are skipped). Returns (blocks checked, blocks wrong, first wrong offset).
pub fn check_model(
    socket: &Path,
    export: &str,
    model: &[u8],
    uncertain: &HashSet<u64>,
) -> io::Result<(u64, u64, Option<u64>)> {
    let mut c = Nbd::connect(socket, export)?;
    let (mut checked, mut wrong, mut first) = (0, 0, None);
    for off in (0..model.len() as u64).step_by(1 << 20) {
        let n = (model.len() as u64 - off).min(1 << 20);
        let got = c.read_at(off, n as u32)?;
        for b in (0..n).step_by(4096) {
            let at = off + b;
            if uncertain.contains(&(at / SLOT)) {
                continue;
            }
            checked += 1;
            let want = &model[at as usize..(at + 4096) as usize];
            if &got[b as usize..(b + 4096) as usize] != want {
                wrong += 1;
                first.get_or_insert(at);
            }
        }
    }
    c.disconnect();
    Ok((checked, wrong, first))
}
