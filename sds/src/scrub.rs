//! The scrubber: walks every chunk this SDS holds at a bounded rate, verifying each 4 KiB block
//! against its CRC32, and repairs what fails from the other copy of the PG: as the primary it
//! fetches the secondary's block itself ([`Service::repair_local`]); as the secondary it asks
//! the primary to rewrite it ([`Service::request_repair`]), so every repair write is ordered
//! with user writes by the primary's lock. Chunks of PGs this SDS no longer holds are skipped.
//!
//! Progress and findings go to the metrics and, through the hello, to `scli --query_sds`.

use crate::device::BlockDevice;
use crate::routing::MapCache;
use crate::service::Service;
use proto::msg::SdsStats;
use proto::{ChunkId, ErrorCode, CHUNK_SIZE};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a count of chunks per V-tree (a scan of the chunk index) is reused by hellos.
const VTREE_COUNT_PERIOD: Duration = Duration::from_secs(5);

/// Chunks held per V-tree.
type VtreeCounts = Vec<(proto::VtreeId, u64)>;

/// Pause between passes over an empty SDS, and before the first pass.
const IDLE: Duration = Duration::from_secs(5);

/// Progress of the current pass (read by the hello).
#[derive(Default)]
pub struct ScrubProgress {
    pub passes: AtomicU64,
    pub done: AtomicU64,
    pub total: AtomicU64,
}

pub struct Scrubber<D> {
    service: Arc<Service<D>>,
    map: Arc<MapCache>,
    /// Bytes per second; 0 disables the scrubber.
    rate: u64,
    pub progress: Arc<ScrubProgress>,
    /// The last count of chunks per V-tree, and when it was made.
    vtree_counts: Mutex<Option<(Instant, VtreeCounts)>>,
}

impl<D: BlockDevice> Scrubber<D> {
    pub fn new(service: Arc<Service<D>>, rate_bytes_per_sec: u64) -> Arc<Scrubber<D>> {
        Arc::new(Scrubber {
            map: service.map().clone(),
            service,
            rate: rate_bytes_per_sec,
            progress: Arc::new(ScrubProgress::default()),
            vtree_counts: Mutex::new(None),
        })
    }

    /// The counters the hello reports.
    pub fn stats(&self) -> SdsStats {
        let m = self.service.metrics();
        SdsStats {
            checksum_errors: m.checksum_errors.get(),
            repaired_blocks: m.repaired_blocks.get(),
            unrecoverable_blocks: m.unrecoverable_blocks.get(),
            scrub_passes: self.progress.passes.load(Ordering::Relaxed),
            scrub_chunks_done: self.progress.done.load(Ordering::Relaxed),
            scrub_chunks_total: self.progress.total.load(Ordering::Relaxed),
            scrub_rate_bytes: self.rate,
            rebuild_pgs_active: m.rebuilding_pgs.get().max(0) as u64,
            rebuild_chunks_left: m.rebuild_chunks_left.get().max(0) as u64,
            rebuild_bytes_copied: m.rebuild_bytes.get(),
            rebuild_bytes_per_sec: 0,
            chunks_stored: self.service.storage().chunk_count() as u64,
            chunks_draining: self.service.storage().draining_chunks() as u64,
            rebuild_chunks_skipped: m.rebuild_chunks_skipped.get(),
            thick_chunks_stored: self.service.storage().thick_stored(),
            thick_chunks_no_space: m.thick_chunks_no_space.get().max(0) as u64,
            layer_chunks: self.layer_chunks(),
            vtree_chunks: self.vtree_chunks(),
        }
    }

    /// Chunks held per V-tree of the map's volumes (see `SdsStats::vtree_chunks`), recounted
    /// at most every [`VTREE_COUNT_PERIOD`].
    fn vtree_chunks(&self) -> Vec<(proto::VtreeId, u64)> {
        let Ok(mut cache) = self.vtree_counts.lock() else {
            return Vec::new();
        };
        if let Some((at, counts)) = cache.as_ref() {
            if at.elapsed() < VTREE_COUNT_PERIOD {
                return counts.clone();
            }
        }
        let map = self.map.state();
        let vtrees: std::collections::BTreeSet<proto::VtreeId> =
            map.volumes.values().map(|v| v.vtree).collect();
        let counts: Vec<(proto::VtreeId, u64)> = vtrees
            .into_iter()
            .map(|t| (t, self.service.storage().chunks_of(t).len() as u64))
            .filter(|(_, n)| *n > 0)
            .collect();
        *cache = Some((Instant::now(), counts.clone()));
        counts
    }

    /// Chunks held per layer of each V-tree with snapshots (see `SdsStats::layer_chunks`).
    fn layer_chunks(&self) -> Vec<(proto::VtreeId, proto::LayerId, u64)> {
        let map = self.map.state();
        let mut out = Vec::new();
        for vtree in map.vtrees.keys() {
            let mut counts: std::collections::BTreeMap<proto::LayerId, u64> = Default::default();
            for c in self.service.storage().chunks_of(*vtree) {
                *counts.entry(c.layer).or_default() += 1;
            }
            out.extend(counts.into_iter().map(|(l, n)| (*vtree, l, n)));
        }
        out
    }

    /// Scrub forever.
    pub async fn run(self: Arc<Self>) {
        if self.rate == 0 {
            tracing::info!("scrubber disabled (scrub_rate_mib_s = 0)");
            return;
        }
        let per_chunk = Duration::from_secs_f64(CHUNK_SIZE as f64 / self.rate as f64);
        loop {
            tokio::time::sleep(IDLE).await;
            let chunks = self.chunks();
            self.progress
                .total
                .store(chunks.len() as u64, Ordering::Relaxed);
            self.progress.done.store(0, Ordering::Relaxed);
            if chunks.is_empty() {
                continue;
            }
            let mut tick = tokio::time::interval(per_chunk);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for (chunk, _pool) in chunks {
                tick.tick().await;
                self.scrub_chunk(chunk).await;
                self.progress.done.fetch_add(1, Ordering::Relaxed);
                self.service.metrics().scrubbed_chunks.inc();
            }
            self.progress.passes.fetch_add(1, Ordering::Relaxed);
            self.service.metrics().scrub_passes.inc();
            tracing::debug!("scrub pass finished");
        }
    }

    /// Every chunk held here of a volume in the map, with its pool.
    fn chunks(&self) -> Vec<(ChunkId, proto::PoolId)> {
        let map = self.map.state();
        let pools: HashMap<proto::VtreeId, proto::PoolId> =
            map.volumes.values().map(|v| (v.vtree, v.pool)).collect();
        let mut out = Vec::new();
        for (vtree, pool) in pools {
            for chunk in self.service.storage().chunks_of(vtree) {
                out.push((chunk, pool));
            }
        }
        out
    }

    /// Verify one chunk; repair each failing block (one per read, a chunk has at most 256).
    async fn scrub_chunk(&self, chunk: ChunkId) {
        for _ in 0..=crate::range_lock::BLOCKS {
            let r = self
                .service
                .storage()
                .read(chunk, 0, CHUNK_SIZE as u32)
                .await;
            let offset = match r {
                Err(crate::chunk_store::StoreError::ChecksumMismatch { offset, .. }) => offset,
                _ => return,
            };
            self.service.metrics().checksum_errors.inc();
            tracing::warn!(%chunk, offset, "scrubber: block failed its checksum");
            let r = match self.service.repair_block(chunk, offset).await {
                // Not a copy of ours any more: nobody reads it.
                Ok(false) => return,
                r => r,
            };
            if let Err(e) = r {
                if e.code != ErrorCode::Checksum {
                    tracing::warn!(%chunk, offset, "scrubber: repair failed: {e}");
                }
                return;
            }
        }
    }
}
