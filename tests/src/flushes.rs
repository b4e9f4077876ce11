//! The flush writer of the volatile-cache fault tests: several NBD connections write at once
//! and each sends FLUSHes of its own while writes are in flight on all of them; a model keeps,
//! per 4 KiB block, every version written since the newest one a completed FLUSH made durable,
//! so a checker can tell a write lost although flushed from one merely not flushed yet.
//!
//! The rule checked: a write whose reply arrived before a FLUSH was sent (on any connection)
//! must read back, or a later write of the same block, once that FLUSH completed, whatever
//! process died since. Except after a FLUSH that failed (the SDC's way of saying that writes
//! whose every copy's host restarted before a flush reached it are lost): a write not yet
//! covered by a completed FLUSH when the failure arrived, and sent before it, may be gone, on
//! whatever connection it was (the SDC saw it complete before the failed FLUSH took its ticket,
//! which the client cannot order across connections). Each block's content names the write that made it (its first 16 bytes
//! are the write id and the block number; the rest is derived from them), so the check needs no
//! copy of the data.

use crate::nbd::Nbd;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

const BLOCK: u64 = 4096;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
/// Most blocks of one write (64 KiB), except the whole-chunk writes.
const WRITE_BLOCKS_MAX: u64 = 16;
const CHUNK_BLOCKS: u64 = (1 << 20) / BLOCK;

/// The content of block `block` as written by write `wid` (write 0: the zeros before any).
pub fn block_content(wid: u64, block: u64) -> Vec<u8> {
    let mut out = vec![0u8; BLOCK as usize];
    if wid == 0 {
        return out;
    }
    out[..8].copy_from_slice(&wid.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    let mut x = wid.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ block;
    for word in out[16..].chunks_exact_mut(8) {
        // splitmix64
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        word.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// What the writers did, and what each block may hold.
pub struct Model {
    /// Logical time: every write reply and every FLUSH sent takes the next tick.
    clock: AtomicU64,
    next_wid: AtomicU64,
    inner: Mutex<Inner>,
    changed: Condvar,
}

#[derive(Default)]
struct Inner {
    /// Per block, every version since the newest one a completed FLUSH covered, oldest first.
    versions: Vec<Vec<Version>>,
    /// Blocks with a write in flight (writes never overlap).
    busy: HashSet<u64>,
    /// Blocks a failed write touched: they may hold anything written there.
    uncertain: HashSet<u64>,
    /// Per FLUSH that failed, `(tick its failure arrived, durable tick when it was sent)`: a
    /// write sent before the failure arrived and acknowledged at or after that durable tick
    /// may be lost. (Not the durable tick at the failure: a concurrent FLUSH may have
    /// completed in between only because this one had already reported the loss.)
    failures: Vec<(u64, u64)>,
    /// The send tick of the newest completed FLUSH: replies before it are durable.
    durable: u64,
    /// Wall-clock times (UTC time of day) of each write's sending and reply, and of the
    /// newest completed FLUSH's sending and completion: a loss names them, to find in the
    /// daemons' logs.
    times: HashMap<u64, (SystemTime, Option<SystemTime>)>,
    durable_times: Option<(SystemTime, SystemTime)>,
    report: FlushReport,
}

/// One write of a block.
#[derive(Clone, Copy, Debug)]
struct Version {
    /// Write id (0: the zeros before any write).
    wid: u64,
    /// Tick of its reply.
    acked: u64,
    /// Tick taken before it was sent.
    sent: u64,
}

impl Version {
    const ZEROS: Version = Version {
        wid: 0,
        acked: 0,
        sent: 0,
    };
}

/// The time of day of `t` (UTC, as the daemons log it).
fn time_of_day(t: SystemTime) -> String {
    let now = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let s = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_micros()
    )
}

/// What a read-back found.
#[derive(Clone, Debug, Default)]
pub struct Checked {
    /// Blocks compared with what they may hold.
    pub checked: u64,
    /// Blocks that lost a flushed write.
    pub lost: u64,
    /// Blocks not compared because a failed FLUSH may have reported their write lost.
    pub excused: u64,
    /// The first loss, described.
    pub first: Option<String>,
}

/// Counts of what happened.
#[derive(Clone, Debug, Default)]
pub struct FlushReport {
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub flushes_ok: u64,
    pub flushes_failed: u64,
}

impl Model {
    /// A model of `region` bytes of a volume that reads as zeros.
    pub fn new(region: u64) -> Arc<Model> {
        let blocks = (region / BLOCK) as usize;
        Arc::new(Model {
            clock: AtomicU64::new(1),
            next_wid: AtomicU64::new(1),
            inner: Mutex::new(Inner {
                versions: vec![vec![Version::ZEROS]; blocks],
                ..Inner::default()
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn blocks(&self) -> u64 {
        self.lock().versions.len() as u64
    }

    fn durable(&self) -> u64 {
        self.lock().durable
    }

    pub fn report(&self) -> FlushReport {
        self.lock().report.clone()
    }

    fn write_done(&self, first: u64, n: u64, wid: u64, sent: u64, ok: bool) {
        let tick = self.clock.fetch_add(1, Ordering::SeqCst);
        let mut m = self.lock();
        if let Some(t) = m.times.get_mut(&wid) {
            t.1 = Some(SystemTime::now());
        }
        for b in first..first + n {
            m.busy.remove(&b);
            if ok {
                m.versions[b as usize].push(Version {
                    wid,
                    acked: tick,
                    sent,
                });
            } else {
                m.uncertain.insert(b);
            }
        }
        if ok {
            m.report.writes_acked += 1;
        } else {
            m.report.writes_failed += 1;
        }
        drop(m);
        self.changed.notify_all();
    }

    fn flush_done(&self, sent: u64, sent_at: SystemTime, durable_at_send: u64, ok: bool) {
        let mut m = self.lock();
        if !ok {
            m.report.flushes_failed += 1;
            let arrived = self.clock.fetch_add(1, Ordering::SeqCst);
            m.failures.push((arrived, durable_at_send));
            return;
        }
        m.report.flushes_ok += 1;
        if sent > m.durable {
            m.durable = sent;
            m.durable_times = Some((sent_at, SystemTime::now()));
            // Versions older than the newest durable one can no longer show.
            for v in m.versions.iter_mut() {
                if let Some(keep) = v.iter().rposition(|x| x.acked < sent) {
                    v.drain(..keep);
                }
            }
        }
    }

    /// Pick a free range and mark it busy (waits while everything drawn is busy): returns the
    /// first block, the block count, the write id and the send tick.
    fn take_range(&self, rng: &mut impl Rng) -> (u64, u64, u64, u64) {
        let blocks = self.blocks();
        let mut m = self.lock();
        loop {
            let n = if blocks >= CHUNK_BLOCKS && rng.gen_range(0..8) == 0 {
                CHUNK_BLOCKS
            } else {
                rng.gen_range(1..=WRITE_BLOCKS_MAX)
            };
            let first = if n == CHUNK_BLOCKS {
                rng.gen_range(0..blocks / CHUNK_BLOCKS) * CHUNK_BLOCKS
            } else {
                rng.gen_range(0..=blocks - n)
            };
            if !(first..first + n).any(|b| m.busy.contains(&b)) {
                m.busy.extend(first..first + n);
                let wid = self.next_wid.fetch_add(1, Ordering::SeqCst);
                m.times.insert(wid, (SystemTime::now(), None));
                let sent = self.clock.fetch_add(1, Ordering::SeqCst);
                return (first, n, wid, sent);
            }
            m = self
                .changed
                .wait_timeout(m, Duration::from_millis(20))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Read the region back through `export` and check every block against the model.
    pub fn check(&self, socket: &Path, export: &str) -> io::Result<Checked> {
        let mut c = Nbd::connect(socket, export)?;
        let m = self.lock();
        let (mut checked, mut lost, mut excused, mut first) = (0u64, 0u64, 0u64, None);
        let blocks = m.versions.len() as u64;
        let per_read = 256u64;
        let mut b0 = 0;
        while b0 < blocks {
            let n = per_read.min(blocks - b0);
            let got = c.read_at(b0 * BLOCK, (n * BLOCK) as u32)?;
            for i in 0..n {
                let b = b0 + i;
                if m.uncertain.contains(&b) {
                    continue;
                }
                let versions = &m.versions[b as usize];
                let allowed = versions
                    .iter()
                    .rposition(|x| x.acked < m.durable)
                    .unwrap_or(0);
                let v = versions[allowed];
                if v.wid != 0
                    && m.failures
                        .iter()
                        .any(|(arrived, durable)| v.sent < *arrived && v.acked >= *durable)
                {
                    // A failed FLUSH may have reported it lost.
                    excused += 1;
                    continue;
                }
                checked += 1;
                let data = &got[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
                let ok = versions[allowed..]
                    .iter()
                    .any(|x| block_content(x.wid, b) == data);
                if !ok {
                    lost += 1;
                    first.get_or_insert_with(|| {
                        let mut id = [0u8; 8];
                        id.copy_from_slice(&data[..8]);
                        format!(
                            "block {b} holds write {} (zeros: {}); it may hold writes {:?} \
                             (sent, acknowledged: {:?}); the FLUSH that made the first durable \
                             was sent at {} and completed at {} (UTC)",
                            u64::from_le_bytes(id),
                            data.iter().all(|x| *x == 0),
                            versions[allowed..]
                                .iter()
                                .map(|x| x.wid)
                                .collect::<Vec<_>>(),
                            versions[allowed..]
                                .iter()
                                .map(|x| {
                                    m.times.get(&x.wid).map(|(s, a)| {
                                        (time_of_day(*s), a.map(time_of_day).unwrap_or_default())
                                    })
                                })
                                .collect::<Vec<_>>(),
                            m.durable_times
                                .map(|t| time_of_day(t.0))
                                .unwrap_or_default(),
                            m.durable_times
                                .map(|t| time_of_day(t.1))
                                .unwrap_or_default(),
                        )
                    });
                }
            }
            b0 += n;
        }
        drop(m);
        c.disconnect();
        Ok(Checked {
            checked,
            lost,
            excused,
            first,
        })
    }
}

/// Writers on several connections of one export, each flushing while writes are in flight.
pub struct FlushWriters {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<io::Result<()>>>,
}

impl FlushWriters {
    /// `conns` connections to `export`, each with up to `depth` requests in flight, one request
    /// in `flush_every` a FLUSH.
    pub fn start(
        socket: &Path,
        export: &str,
        model: &Arc<Model>,
        conns: usize,
        depth: usize,
        flush_every: u32,
        seed: u64,
    ) -> FlushWriters {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..conns)
            .map(|i| {
                let (socket, export) = (PathBuf::from(socket), export.to_owned());
                let (model, stop) = (model.clone(), stop.clone());
                std::thread::spawn(move || {
                    let seed = seed.wrapping_mul(31).wrapping_add(i as u64);
                    connection(&socket, &export, &model, depth, flush_every, seed, &stop)
                })
            })
            .collect();
        FlushWriters { stop, threads }
    }

    /// Stop, wait for every request in flight, and return the first connection error.
    pub fn finish(mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let mut first = Ok(());
        for t in self.threads.drain(..) {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for FlushWriters {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a request in flight on one connection was.
enum Sent {
    Write {
        first: u64,
        n: u64,
        wid: u64,
        sent: u64,
    },
    Flush {
        tick: u64,
        at: SystemTime,
        durable: u64,
    },
}

fn connection(
    socket: &Path,
    export: &str,
    model: &Arc<Model>,
    depth: usize,
    flush_every: u32,
    seed: u64,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut tx = Nbd::connect(socket, export)?;
    let mut rx = tx.try_clone()?;
    let pending: Arc<(Mutex<HashMap<u64, Sent>>, Condvar)> = Arc::default();
    let reader = {
        let (pending, model) = (pending.clone(), model.clone());
        // Returns the error code of the last FLUSH (handle u64::MAX), which ends it.
        std::thread::spawn(move || -> io::Result<u32> {
            loop {
                let r = rx.recv(|_| 0)?;
                if r.handle == u64::MAX {
                    return Ok(r.error);
                }
                let (m, cv) = &*pending;
                let sent = m
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&r.handle);
                match sent {
                    Some(Sent::Write {
                        first,
                        n,
                        wid,
                        sent,
                    }) => model.write_done(first, n, wid, sent, r.error == 0),
                    Some(Sent::Flush { tick, at, durable }) => {
                        model.flush_done(tick, at, durable, r.error == 0)
                    }
                    None => {
                        return Err(io::Error::other(format!(
                            "reply to unknown handle {}",
                            r.handle
                        )))
                    }
                }
                cv.notify_all();
            }
        })
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut handle = 0u64;
    let (m, cv) = &*pending;
    let result = (|| -> io::Result<()> {
        while !stop.load(Ordering::SeqCst) {
            {
                let mut p = m.lock().unwrap_or_else(|p| p.into_inner());
                while p.len() >= depth && !stop.load(Ordering::SeqCst) {
                    p = cv
                        .wait_timeout(p, Duration::from_millis(50))
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    if reader.is_finished() {
                        return Err(io::Error::other("the reply reader stopped"));
                    }
                }
            }
            if stop.load(Ordering::SeqCst) {
                break;
            }
            handle += 1;
            if rng.gen_range(0..flush_every) == 0 {
                // The tick is taken before the FLUSH leaves: every reply seen so far precedes it.
                let durable = model.durable();
                let tick = model.clock.fetch_add(1, Ordering::SeqCst);
                m.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    handle,
                    Sent::Flush {
                        tick,
                        at: SystemTime::now(),
                        durable,
                    },
                );
                tx.send(CMD_FLUSH, handle, 0, 0, &[])?;
                continue;
            }
            let (first, n, wid, sent) = model.take_range(&mut rng);
            let mut data = Vec::with_capacity((n * BLOCK) as usize);
            for b in first..first + n {
                data.extend_from_slice(&block_content(wid, b));
            }
            m.lock().unwrap_or_else(|p| p.into_inner()).insert(
                handle,
                Sent::Write {
                    first,
                    n,
                    wid,
                    sent,
                },
            );
            tx.send(CMD_WRITE, handle, first * BLOCK, data.len() as u32, &data)?;
        }
        // Drain what is in flight.
        let mut p = m.lock().unwrap_or_else(|p| p.into_inner());
        while !p.is_empty() && !reader.is_finished() {
            p = cv
                .wait_timeout(p, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    })();
    // A last FLUSH that ends the reader.
    let durable = model.durable();
    let tick = model.clock.fetch_add(1, Ordering::SeqCst);
    let at = SystemTime::now();
    let sent = tx.send(CMD_FLUSH, u64::MAX, 0, 0, &[]);
    let read = reader
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("reader panicked")));
    if let (Ok(()), Ok(error)) = (&sent, &read) {
        model.flush_done(tick, at, durable, *error == 0);
    }
    tx.disconnect();
    result.and(sent).and(read.map(|_| ()))
}
