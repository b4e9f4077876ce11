//! Per-chunk block-range locks: requests on overlapping 4 KiB blocks of one chunk run one after
//! the other, in arrival order; requests on disjoint blocks run in parallel.
//!
//! PERFORMANCE-CRITICAL: taken twice per data request (service ordering, chunk store). A lock is
//! one short critical section on a sharded map; nothing is allocated for an uncontended chunk
//! beyond its map entry, which disappears when the chunk is idle.
//!
//! Fairness: a request that overlaps an earlier waiter queues behind it, so overlapping requests
//! are granted strictly in arrival order. Waiting is cancel-safe: dropping a waiting future
//! removes it from the queue (or releases the range if it was granted meanwhile).

use proto::ChunkId;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::sync::oneshot;

/// 4 KiB blocks in a chunk.
pub const BLOCKS: usize = (proto::CHUNK_SIZE / proto::BLOCK_SIZE) as usize;
const WORDS: usize = BLOCKS / 64;
const SHARDS: usize = 64;

/// A set of blocks of one chunk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockMask([u64; WORDS]);

impl BlockMask {
    /// Blocks `[first, end)`, clamped to the chunk.
    pub fn range(first: usize, end: usize) -> BlockMask {
        let mut m = BlockMask::default();
        for b in first.min(BLOCKS)..end.min(BLOCKS) {
            m.0[b / 64] |= 1 << (b % 64);
        }
        m
    }

    /// Every block of the chunk.
    pub fn all() -> BlockMask {
        BlockMask([u64::MAX; WORDS])
    }

    /// The blocks a byte range touches (at least one).
    pub fn bytes(offset: u32, len: u32) -> BlockMask {
        let bs = proto::BLOCK_SIZE as usize;
        let first = offset as usize / bs;
        let end = (offset as usize + len as usize).div_ceil(bs).max(first + 1);
        BlockMask::range(first, end)
    }

    pub fn overlaps(&self, o: &BlockMask) -> bool {
        self.0.iter().zip(o.0.iter()).any(|(a, b)| a & b != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    fn add(&mut self, o: &BlockMask) {
        self.0.iter_mut().zip(o.0.iter()).for_each(|(a, b)| *a |= b);
    }

    fn remove(&mut self, o: &BlockMask) {
        self.0
            .iter_mut()
            .zip(o.0.iter())
            .for_each(|(a, b)| *a &= !b);
    }
}

struct Waiter {
    id: u64,
    mask: BlockMask,
    grant: oneshot::Sender<()>,
}

#[derive(Default)]
struct Entry {
    held: BlockMask,
    waiters: VecDeque<Waiter>,
}

impl Entry {
    /// Grant every waiter that overlaps neither a held range nor an earlier waiter.
    fn grant(&mut self) {
        let mut ahead = BlockMask::default();
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &self.waiters[i];
            if w.mask.overlaps(&self.held) || w.mask.overlaps(&ahead) {
                ahead.add(&w.mask);
                i += 1;
                continue;
            }
            if let Some(w) = self.waiters.remove(i) {
                self.held.add(&w.mask);
                // A dropped receiver belongs to a waiter being cancelled: its drop handler
                // finds itself no longer queued and releases the range.
                let _ = w.grant.send(());
            }
        }
    }

    fn idle(&self) -> bool {
        self.held.is_empty() && self.waiters.is_empty()
    }
}

/// Block-range locks for all chunks.
pub struct RangeLocks {
    shards: Box<[Mutex<HashMap<ChunkId, Entry>>]>,
    next_id: AtomicU64,
}

impl Default for RangeLocks {
    fn default() -> Self {
        RangeLocks::new()
    }
}

impl RangeLocks {
    pub fn new() -> RangeLocks {
        RangeLocks {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
        }
    }

    fn shard(&self, chunk: &ChunkId) -> &Mutex<HashMap<ChunkId, Entry>> {
        let h = chunk.vtree.0 ^ chunk.index.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(h >> 32) as usize % SHARDS]
    }

    /// Lock `mask` of `chunk`, waiting behind every earlier overlapping holder or waiter.
    pub async fn lock(&self, chunk: ChunkId, mask: BlockMask) -> RangeGuard<'_> {
        loop {
            let (id, rx) = {
                let mut shard = self.shard(&chunk).lock().unwrap_or_else(|p| p.into_inner());
                let e = shard.entry(chunk).or_default();
                let blocked =
                    e.held.overlaps(&mask) || e.waiters.iter().any(|w| w.mask.overlaps(&mask));
                if !blocked {
                    e.held.add(&mask);
                    return RangeGuard {
                        locks: self,
                        chunk,
                        mask,
                    };
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                e.waiters.push_back(Waiter {
                    id,
                    mask,
                    grant: tx,
                });
                (id, rx)
            };
            let mut wait = Waiting {
                locks: self,
                chunk,
                id,
                mask,
                armed: true,
            };
            let granted = rx.await.is_ok();
            wait.armed = false;
            if granted {
                return RangeGuard {
                    locks: self,
                    chunk,
                    mask,
                };
            }
        }
    }

    fn release(&self, chunk: &ChunkId, mask: &BlockMask) {
        let mut shard = self.shard(chunk).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = shard.get_mut(chunk) {
            e.held.remove(mask);
            e.grant();
            if e.idle() {
                shard.remove(chunk);
            }
        }
    }

    fn cancel(&self, chunk: &ChunkId, id: u64, mask: &BlockMask) {
        let mut shard = self.shard(chunk).lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = shard.get_mut(chunk) else {
            return;
        };
        match e.waiters.iter().position(|w| w.id == id) {
            Some(i) => {
                e.waiters.remove(i);
            }
            // Granted while being cancelled: give the range back.
            None => e.held.remove(mask),
        }
        e.grant();
        if e.idle() {
            shard.remove(chunk);
        }
    }

    /// Chunks with a held or awaited range (for tests).
    pub fn busy_chunks(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }
}

/// Releases its range when dropped.
#[must_use = "the range is unlocked when the guard drops"]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    chunk: ChunkId,
    mask: BlockMask,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        if !self.mask.is_empty() {
            self.locks.release(&self.chunk, &self.mask);
        }
    }
}

/// A queued request; cancels itself if dropped before it is granted.
struct Waiting<'a> {
    locks: &'a RangeLocks,
    chunk: ChunkId,
    id: u64,
    mask: BlockMask,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.locks.cancel(&self.chunk, self.id, &self.mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{ChunkIndex, VtreeId};
    use std::sync::Arc;
    use std::time::Duration;

    fn c(i: u64) -> ChunkId {
        ChunkId::new(VtreeId(1), ChunkIndex(i))
    }

    fn waiters(locks: &RangeLocks, chunk: ChunkId) -> usize {
        locks
            .shard(&chunk)
            .lock()
            .map(|s| s.get(&chunk).map(|e| e.waiters.len()).unwrap_or(0))
            .unwrap_or(0)
    }

    #[test]
    fn masks() {
        assert_eq!(BlockMask::bytes(0, 4096), BlockMask::range(0, 1));
        assert_eq!(BlockMask::bytes(4095, 2), BlockMask::range(0, 2));
        assert_eq!(BlockMask::bytes(0, 0), BlockMask::range(0, 1));
        assert_eq!(BlockMask::bytes(0, 1 << 20), BlockMask::all());
        assert!(!BlockMask::range(0, 64).overlaps(&BlockMask::range(64, 65)));
        assert!(BlockMask::range(0, 65).overlaps(&BlockMask::range(64, 65)));
    }

    #[tokio::test]
    async fn overlapping_requests_run_in_arrival_order_disjoint_ones_in_parallel() {
        let locks = Arc::new(RangeLocks::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = locks.lock(c(0), BlockMask::range(0, 4)).await;
        // Disjoint: granted at once.
        let other = locks.lock(c(0), BlockMask::range(4, 8)).await;
        let mut tasks = Vec::new();
        for i in 0..5u32 {
            let (l, o) = (locks.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _g = l.lock(c(0), BlockMask::range(0, 1)).await;
                o.lock().expect("order").push(i);
            }));
            // Let each queue before the next arrives.
            while waiters(&locks, c(0)) != i as usize + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(first);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("granted")
                .expect("join");
        }
        assert_eq!(*order.lock().expect("order"), vec![0, 1, 2, 3, 4]);
        drop(other);
        assert_eq!(locks.busy_chunks(), 0, "idle chunks leave the map");
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_no_trace() {
        let locks = RangeLocks::new();
        let held = locks.lock(c(1), BlockMask::all()).await;
        let r = tokio::time::timeout(
            Duration::from_millis(10),
            locks.lock(c(1), BlockMask::range(3, 4)),
        )
        .await;
        assert!(r.is_err(), "blocked behind the holder");
        assert_eq!(
            waiters(&locks, c(1)),
            0,
            "the cancelled waiter left the queue"
        );
        drop(held);
        assert_eq!(locks.busy_chunks(), 0);
        let _again = locks.lock(c(1), BlockMask::all()).await;
    }
}
