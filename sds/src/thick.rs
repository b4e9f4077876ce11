//! Thick provisioning on the SDS: every chunk of a thick volume whose PG this SDS holds (as
//! primary, secondary or rebuild target) is allocated ahead of any write, so writes to thick
//! volumes never meet a full device, and a thick chunk stays allocated when trimmed.
//!
//! The MDM reserves a thick volume's capacity when it is created; this task turns that
//! reservation into allocated slots (journaled allocation records: they survive restarts).
//! It wakes on every map change and every [`RESCAN`], allocates in batches with a pause
//! between them so user I/O keeps its share, and exposes its progress as metrics.

use crate::device::BlockDevice;
use crate::service::Service;
use crate::storage::Storage;
use proto::model::ClusterState;
use proto::{ChunkId, ChunkIndex, SdsId, CHUNK_SIZE};
use std::sync::Arc;
use std::time::Duration;

/// How often the task looks again even without a map change (chunks trimmed away by a
/// rebuild, devices added).
const RESCAN: Duration = Duration::from_secs(30);
/// Chunks allocated between pauses.
const BATCH: usize = 256;
/// The pause between batches.
const PAUSE: Duration = Duration::from_millis(5);

/// The chunks of thick volumes that `me` holds according to `map` (its PG roles), in order.
pub fn thick_chunks(map: &ClusterState, me: SdsId) -> Vec<ChunkId> {
    let mut out = Vec::new();
    for v in map.volumes.values().filter(|v| !v.thin) {
        let Some(pool) = map.pools.get(&v.pool) else {
            continue;
        };
        if pool.pg_count == 0 {
            continue;
        }
        for index in 0..v.size_bytes.div_ceil(CHUNK_SIZE) {
            let chunk = ChunkId {
                vtree: v.vtree,
                index: ChunkIndex(index),
            };
            let holds = pool
                .pg(chunk.pg(pool.pg_count))
                .is_some_and(|m| m.primary == Some(me) || m.secondary == Some(me));
            if holds {
                out.push(chunk);
            }
        }
    }
    out
}

/// Allocate every chunk of `wanted` that `storage` lacks. Returns (allocated now, missing
/// because the devices are full).
pub async fn preallocate<D: BlockDevice>(
    storage: &Storage<D>,
    wanted: &[ChunkId],
    mut progress: impl FnMut(u64),
) -> (u64, u64) {
    let (mut allocated, mut no_space) = (0u64, 0u64);
    for (i, chunk) in wanted.iter().enumerate() {
        match storage.preallocate(*chunk).await {
            Ok(true) => allocated += 1,
            Ok(false) => {}
            Err(crate::chunk_store::StoreError::NoSpace) => no_space += 1,
            Err(e) => {
                tracing::warn!(%chunk, "thick pre-allocation failed: {e}");
                no_space += 1;
            }
        }
        if (i + 1) % BATCH == 0 {
            progress((wanted.len() - i - 1) as u64);
            tokio::time::sleep(PAUSE).await;
        }
    }
    progress(0);
    (allocated, no_space)
}

/// Run the pre-allocator for the life of the process.
pub async fn run<D: BlockDevice>(service: Arc<Service<D>>) {
    let map = service.map().clone();
    let mut seen = u64::MAX;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_scan = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let state = map.state();
        if state.version == seen && last_scan.elapsed() < RESCAN {
            continue;
        }
        let Some(me) = map.me() else { continue };
        seen = state.version;
        last_scan = tokio::time::Instant::now();
        let wanted: Vec<ChunkId> = thick_chunks(&state, me)
            .into_iter()
            .filter(|c| !service.storage().contains(*c))
            .collect();
        if wanted.is_empty() {
            service.metrics().thick_chunks_pending.set(0);
            continue;
        }
        let metrics = service.metrics().clone();
        metrics.thick_chunks_pending.set(wanted.len() as i64);
        let (allocated, no_space) = preallocate(service.storage(), &wanted, |left| {
            metrics.thick_chunks_pending.set(left as i64);
        })
        .await;
        metrics.thick_chunks_allocated.inc_by(allocated);
        metrics.thick_chunks_pending.set(no_space as i64);
        if no_space > 0 {
            tracing::error!(
                no_space,
                "cannot pre-allocate every chunk of the thick volumes this SDS holds: its devices are full; add a device or move PGs away"
            );
        } else {
            tracing::info!(allocated, "pre-allocated the chunks of thick volumes");
        }
    }
}
