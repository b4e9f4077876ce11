//! QoS of this host's mappings: each mapped volume's IOPS and bandwidth limits
//! (`scli --set_sdc_volume_limits`, Docker's `iops_limit`/`bandwidth_limit`), enforced before a
//! request is sent. Owns the per-volume [`Throttle`]s; the limits come from the mapping of the
//! volume to this SDC in each new map (so a change reaches running I/O within a map poll), 0
//! meaning none.
//!
//! Each limit is a token bucket kept as a GCRA schedule: a request may start once the
//! schedule, less a burst window of [`BURST`], has reached it, and pushes the schedule on by its
//! cost (one I/O, or its bytes). Requests wait in arrival order; the time they wait is counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How far ahead of its schedule a limit lets an idle volume run: the burst.
pub const BURST: Duration = Duration::from_millis(100);
/// How often a waiting request looks whether the limits changed.
const RECHECK: Duration = Duration::from_millis(100);

/// One rate limit as a GCRA schedule.
#[derive(Debug)]
struct Schedule {
    /// Units per second; 0 is no limit.
    rate: u64,
    /// When the bucket would be empty again if nothing more came (theoretical arrival time).
    tat: Instant,
}

impl Schedule {
    fn new(now: Instant) -> Schedule {
        Schedule { rate: 0, tat: now }
    }

    /// Reserves `cost` units at `now`: the time the request may start.
    fn reserve(&mut self, cost: u64, now: Instant) -> Instant {
        if self.rate == 0 {
            return now;
        }
        let tat = self.tat.max(now);
        let start = tat.checked_sub(BURST).map_or(now, |t| t.max(now));
        self.tat = tat + Duration::from_secs_f64(cost as f64 / self.rate as f64);
        start
    }
}

#[derive(Debug)]
struct State {
    iops: Schedule,
    bytes: Schedule,
    /// Bumped on every change of the limits: waiting requests take their turn again.
    generation: u64,
}

/// The limits of one mapped volume and the requests waiting for them.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
    iops_limit: AtomicU64,
    bytes_limit: AtomicU64,
    throttled_ns: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        let now = Instant::now();
        Throttle {
            state: Mutex::new(State {
                iops: Schedule::new(now),
                bytes: Schedule::new(now),
                generation: 0,
            }),
            iops_limit: AtomicU64::new(0),
            bytes_limit: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
        }
    }
}

impl Throttle {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the limits: I/Os per second and KiB per second, 0 for none. A change restarts the
    /// schedules, so it holds from the next request on (and for those already waiting).
    pub fn set_limits(&self, iops: u64, bandwidth_kbps: u64) {
        let bytes = bandwidth_kbps.saturating_mul(1024);
        if self.iops_limit.load(Ordering::Relaxed) == iops
            && self.bytes_limit.load(Ordering::Relaxed) == bytes
        {
            return;
        }
        let now = Instant::now();
        let mut s = self.lock();
        s.iops = Schedule {
            rate: iops,
            tat: now,
        };
        s.bytes = Schedule {
            rate: bytes,
            tat: now,
        };
        s.generation += 1;
        self.iops_limit.store(iops, Ordering::Relaxed);
        self.bytes_limit.store(bytes, Ordering::Relaxed);
    }

    /// (IOPS, bytes per second); 0 is none.
    pub fn limits(&self) -> (u64, u64) {
        (
            self.iops_limit.load(Ordering::Relaxed),
            self.bytes_limit.load(Ordering::Relaxed),
        )
    }

    /// Time requests of this volume have waited for its limits.
    pub fn throttled(&self) -> Duration {
        Duration::from_nanos(self.throttled_ns.load(Ordering::Relaxed))
    }

    /// Waits until a request of `bytes` may be sent (at once when there are no limits).
    pub async fn admit(&self, bytes: u64) {
        if self.limits() == (0, 0) {
            return;
        }
        let began = Instant::now();
        'again: loop {
            let (start, generation) = {
                let now = Instant::now();
                let mut s = self.lock();
                let a = s.iops.reserve(1, now);
                let b = s.bytes.reserve(bytes, now);
                (a.max(b), s.generation)
            };
            while Instant::now() < start {
                tokio::time::sleep_until(start.min(Instant::now() + RECHECK)).await;
                if self.lock().generation != generation {
                    continue 'again;
                }
            }
            break;
        }
        let waited = began.elapsed();
        if !waited.is_zero() {
            self.throttled_ns
                .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts of `n` back-to-back reservations of `cost` on a schedule of `rate`.
    fn starts(rate: u64, cost: u64, n: usize) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut s = Schedule { rate, tat: t0 };
        (0..n).map(|_| s.reserve(cost, t0) - t0).collect()
    }

    #[test]
    fn no_limit_never_waits() {
        assert!(starts(0, 1, 100).iter().all(|d| d.is_zero()));
    }

    #[test]
    fn a_burst_then_the_rate() {
        // 500 IOPS: 2 ms each; the 100 ms burst lets about 50 go at once.
        let s = starts(500, 1, 1000);
        let at_once = s.iter().filter(|d| d.is_zero()).count();
        assert!((50..=52).contains(&at_once), "{at_once}");
        // After the burst, one every 2 ms: the 1000th starts after ~1.9 s.
        let last = s[999].as_secs_f64();
        assert!((1.85..1.95).contains(&last), "{last}");
        assert!(s.windows(2).all(|w| w[0] <= w[1]), "out of order");
    }

    #[test]
    fn bandwidth_counts_bytes() {
        // 20 MiB/s in 1 MiB requests: 50 ms each, two inside the burst.
        let s = starts(20 << 20, 1 << 20, 22);
        let last = s[21].as_secs_f64();
        assert!((0.9..1.01).contains(&last), "{last}");
    }

    #[tokio::test(start_paused = true)]
    async fn admit_holds_the_rate_and_counts_the_wait() {
        let t = Throttle::default();
        t.set_limits(100, 0);
        let t0 = Instant::now();
        for _ in 0..210 {
            t.admit(4096).await;
        }
        // 10 in the burst, then 200 at 100/s.
        let took = t0.elapsed().as_secs_f64();
        assert!((1.95..2.05).contains(&took), "{took}");
        assert!(t.throttled() > Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_raised_limit_reaches_a_waiting_request() {
        let t = std::sync::Arc::new(Throttle::default());
        t.set_limits(1, 0);
        t.admit(0).await;
        t.admit(0).await; // the schedule is now a second ahead
        let t2 = t.clone();
        let waiting = tokio::spawn(async move {
            let t0 = Instant::now();
            t2.admit(0).await;
            t0.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        t.set_limits(0, 0);
        let waited = waiting.await.expect("join");
        assert!(waited < Duration::from_millis(300), "{waited:?}");
    }
}
