//! `FaultyDevice`: wraps any device and injects faults from a seeded plan, for tests and the
//! simulation. The only place faults enter the storage stack.
//!
//! - EIO on chosen operations and byte ranges, always, with a probability, or a number of times;
//! - one flipped bit in reads of chosen ranges (silent corruption);
//! - added latency, uniform in a range;
//! - power loss: with the volatile cache on, writes stay in a write-back cache until a flush
//!   completes; [`crash`](FaultyDevice::crash) drops them, or lets a random subset reach the
//!   inner device, some of them torn at 512-byte sector boundaries, as a real disk may.
//!
//! Every random choice comes from one RNG seeded at construction, so a failing run replays.

use super::{AlignedBuf, BlockDevice, BufferPool, DeviceError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Sector size a torn write is cut at.
pub const SECTOR: usize = 512;

/// Which operations a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    Read,
    Write,
    Flush,
    Any,
}

impl FaultOp {
    fn covers(self, op: FaultOp) -> bool {
        self == FaultOp::Any || self == op
    }
}

/// Fail matching operations with EIO.
#[derive(Clone, Debug)]
pub struct EioRule {
    pub op: FaultOp,
    /// Device bytes the operation must touch; `None` matches every offset (and flushes).
    pub range: Option<Range<u64>>,
    /// Chance that a matching operation fails, 0.0 to 1.0.
    pub probability: f64,
    /// How many failures to inject before the rule retires; `None` = unlimited.
    pub times: Option<u64>,
}

impl EioRule {
    /// Every matching operation fails.
    pub fn always(op: FaultOp, range: Option<Range<u64>>) -> EioRule {
        EioRule {
            op,
            range,
            probability: 1.0,
            times: None,
        }
    }
}

/// What a simulated power loss does with writes not covered by a completed flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// None of them reached the media.
    DropUnflushed,
    /// Each reached the media with probability 1/2; with `tear`, each that did may have lost
    /// a random subset of its 512-byte sectors.
    Partial { tear: bool },
}

/// What [`FaultyDevice::crash`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashReport {
    pub dropped: usize,
    pub applied: usize,
    pub torn: usize,
}

struct Pending {
    offset: u64,
    data: Vec<u8>,
}

struct State {
    rng: StdRng,
    eio: Vec<EioRule>,
    flips: Vec<(Range<u64>, f64)>,
    latency: Option<(Duration, Duration)>,
    volatile: bool,
    pending: Vec<Pending>,
}

pub struct FaultyDevice<D> {
    inner: D,
    state: Mutex<State>,
    /// Reads and writes share it; flush and crash take it alone, so nobody sees the cache
    /// half moved to the inner device.
    gate: tokio::sync::RwLock<()>,
    injected: AtomicU64,
}

fn overlaps(r: &Range<u64>, offset: u64, len: u64) -> bool {
    offset < r.end && offset.saturating_add(len) > r.start
}

impl<D: BlockDevice> FaultyDevice<D> {
    /// Wrap `inner` with no faults yet; `seed` drives every random choice.
    pub fn new(inner: D, seed: u64) -> FaultyDevice<D> {
        FaultyDevice {
            inner,
            state: Mutex::new(State {
                rng: StdRng::seed_from_u64(seed),
                eio: Vec::new(),
                flips: Vec::new(),
                latency: None,
                volatile: false,
                pending: Vec::new(),
            }),
            gate: tokio::sync::RwLock::new(()),
            injected: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Option<T> {
        self.state.lock().ok().map(|mut s| f(&mut s))
    }

    pub fn add_eio(&self, rule: EioRule) {
        self.with(|s| s.eio.push(rule));
    }

    /// Flip one random bit of every read touching `range`, with `probability`.
    pub fn add_bit_flips(&self, range: Range<u64>, probability: f64) {
        self.with(|s| s.flips.push((range, probability)));
    }

    /// Delay every operation by a uniform random time in `[min, max]`; `None` removes it.
    pub fn set_latency(&self, latency: Option<(Duration, Duration)>) {
        self.with(|s| s.latency = latency);
    }

    /// Remove every EIO rule, bit flip and latency (the volatile cache stays as it is).
    pub fn clear_faults(&self) {
        self.with(|s| {
            s.eio.clear();
            s.flips.clear();
            s.latency = None;
        });
    }

    /// Keep writes in a volatile cache until the next flush (see [`crash`](Self::crash)).
    pub fn set_volatile_cache(&self, on: bool) {
        self.with(|s| s.volatile = on);
    }

    /// Faults injected so far (EIO answers and bit flips).
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Writes waiting in the volatile cache.
    pub fn unflushed(&self) -> usize {
        self.with(|s| s.pending.len()).unwrap_or(0)
    }

    /// Simulate a power loss: the volatile cache is lost as `mode` says. The device stays
    /// usable afterwards, as after a reboot.
    pub async fn crash(&self, mode: CrashMode) -> Result<CrashReport, DeviceError> {
        let _alone = self.gate.write().await;
        let mut report = CrashReport::default();
        let pending = self
            .with(|s| std::mem::take(&mut s.pending))
            .unwrap_or_default();
        for p in pending {
            let (apply, tear_mask) = match mode {
                CrashMode::DropUnflushed => (false, None),
                CrashMode::Partial { tear } => self
                    .with(|s| {
                        let apply = s.rng.gen_bool(0.5);
                        let torn = apply && tear && s.rng.gen_bool(0.5);
                        let mask = torn.then(|| {
                            (0..p.data.len() / SECTOR)
                                .map(|_| s.rng.gen_bool(0.5))
                                .collect::<Vec<bool>>()
                        });
                        (apply, mask)
                    })
                    .unwrap_or((false, None)),
            };
            if !apply {
                report.dropped += 1;
                continue;
            }
            let mut buf = AlignedBuf::zeroed(p.data.len());
            match &tear_mask {
                None => buf.as_mut_slice().copy_from_slice(&p.data),
                Some(mask) => {
                    report.torn += 1;
                    buf = self.inner.read(p.offset, buf).await?;
                    for (i, keep) in mask.iter().enumerate() {
                        if *keep {
                            let r = i * SECTOR..(i + 1) * SECTOR;
                            buf.as_mut_slice()[r.clone()].copy_from_slice(&p.data[r]);
                        }
                    }
                }
            }
            self.inner.write(p.offset, buf).await?;
            report.applied += 1;
        }
        self.inner.flush().await?;
        Ok(report)
    }

    /// Latency to add and whether the operation fails, decided under one lock.
    fn decide(&self, op: FaultOp, offset: u64, len: u64) -> (Option<Duration>, bool) {
        self.with(|s| {
            let delay = s.latency.map(|(lo, hi)| {
                if hi > lo {
                    s.rng.gen_range(lo..=hi)
                } else {
                    lo
                }
            });
            let mut fail = false;
            for i in 0..s.eio.len() {
                let r = &s.eio[i];
                let hit = r.op.covers(op)
                    && match &r.range {
                        None => true,
                        Some(range) => op != FaultOp::Flush && overlaps(range, offset, len),
                    };
                if !hit || r.times == Some(0) {
                    continue;
                }
                let p = r.probability.clamp(0.0, 1.0);
                if s.rng.gen_bool(p) {
                    if let Some(t) = s.eio[i].times.as_mut() {
                        *t -= 1;
                    }
                    fail = true;
                    break;
                }
            }
            (delay, fail)
        })
        .unwrap_or((None, false))
    }

    async fn before(&self, op: FaultOp, offset: u64, len: u64) -> Result<(), DeviceError> {
        let (delay, fail) = self.decide(op, offset, len);
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if fail {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(DeviceError::eio());
        }
        Ok(())
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn unlock(&self) {
        self.inner.unlock();
    }

    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn buffers(&self) -> &BufferPool {
        self.inner.buffers()
    }

    async fn read(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        let len = buf.len() as u64;
        self.before(FaultOp::Read, offset, len).await?;
        let _shared = self.gate.read().await;
        let mut buf = self.inner.read(offset, buf).await?;
        let flipped = self.with(|s| {
            let out = buf.as_mut_slice();
            for p in &s.pending {
                let start = p.offset.max(offset);
                let end = (p.offset + p.data.len() as u64).min(offset + len);
                if start < end {
                    let (src, dst) = ((start - p.offset) as usize, (start - offset) as usize);
                    let n = (end - start) as usize;
                    out[dst..dst + n].copy_from_slice(&p.data[src..src + n]);
                }
            }
            let mut flipped = 0;
            for (range, p) in &s.flips {
                if !overlaps(range, offset, len) || !s.rng.gen_bool(p.clamp(0.0, 1.0)) {
                    continue;
                }
                let lo = range.start.max(offset) - offset;
                let hi = range.end.min(offset + len) - offset;
                let at = s.rng.gen_range(lo..hi) as usize;
                out[at] ^= 1 << s.rng.gen_range(0..8);
                flipped += 1;
            }
            flipped
        });
        if let Some(n) = flipped.filter(|n| *n > 0) {
            self.injected.fetch_add(n, Ordering::SeqCst);
        }
        Ok(buf)
    }

    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        super::check_range(offset, buf.len() as u64, self.capacity())?;
        self.before(FaultOp::Write, offset, buf.len() as u64)
            .await?;
        let _shared = self.gate.read().await;
        let cached = self
            .with(|s| {
                if s.volatile {
                    s.pending.push(Pending {
                        offset,
                        data: buf.as_slice().to_vec(),
                    });
                }
                s.volatile
            })
            .unwrap_or(false);
        if cached {
            return Ok(buf);
        }
        self.inner.write(offset, buf).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.before(FaultOp::Flush, 0, 0).await?;
        let _alone = self.gate.write().await;
        let pending = self
            .with(|s| std::mem::take(&mut s.pending))
            .unwrap_or_default();
        let mut rest = pending.into_iter();
        while let Some(p) = rest.next() {
            let mut buf = AlignedBuf::zeroed(p.data.len());
            buf.as_mut_slice().copy_from_slice(&p.data);
            if let Err(e) = self.inner.write(p.offset, buf).await {
                // Whatever did not reach the inner device stays cached, in order.
                self.with(|s| {
                    let mut keep: Vec<Pending> = std::iter::once(p).chain(rest).collect();
                    keep.append(&mut s.pending);
                    s.pending = keep;
                });
                return Err(e);
            }
        }
        self.inner.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        super::check_range(offset, len, self.capacity())?;
        self.before(FaultOp::Write, offset, len).await?;
        let _shared = self.gate.read().await;
        // In volatile mode a discard is cached as zeros, so a crash can lose it too.
        let cached = self
            .with(|s| {
                if s.volatile {
                    s.pending.push(Pending {
                        offset,
                        data: vec![0; len as usize],
                    });
                }
                s.volatile
            })
            .unwrap_or(false);
        if cached {
            return Ok(());
        }
        self.inner.discard(offset, len).await
    }
}
