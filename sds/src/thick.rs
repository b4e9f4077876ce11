//! Thick provisioning on the SDS: every chunk of a thick volume whose PG this SDS holds (as
//! primary, secondary or rebuild target) is allocated ahead of any write, so writes to thick
//! volumes never meet a full device, and a thick chunk stays allocated when trimmed.
//!
//! The MDM reserves a thick volume's capacity when it is created; this task turns that
//! reservation into allocated slots (journaled allocation records: they survive restarts).
//! It wakes on every map change and every [`RESCAN`], allocates in batches with a pause
//! between them so user I/O keeps its share, and exposes its progress as metrics.
//!
//! Until a chunk is allocated its slot is promised ([`Storage::set_thick_reservation`]): thin
//! writes get `NoSpace` rather than take it. Chunks that still find no slot (the MDM's
//! reservation is a conservative estimate of how PGs spread chunks, so this should not happen)
//! are counted in `meshblock_sds_thick_chunks_no_space` and reported in the hello, so scli
//! shows them on the SDS and its pool.

use crate::device::BlockDevice;
use crate::service::Service;
use crate::storage::Storage;
use proto::model::ClusterState;
use proto::{ChunkId, ChunkIndex, SdsId, VtreeId, CHUNK_SIZE};
use std::collections::HashSet;
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
            let chunk = ChunkId::new(v.vtree, ChunkIndex(index));
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

/// The vtrees of every thick volume in `map`.
pub fn thick_vtrees(map: &ClusterState) -> HashSet<VtreeId> {
    map.volumes
        .values()
        .filter(|v| !v.thin)
        .map(|v| v.vtree)
        .collect()
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
    let mut last_no_space = 0;
    loop {
        tick.tick().await;
        let state = map.state();
        if state.version == seen && last_scan.elapsed() < RESCAN {
            continue;
        }
        let Some(me) = map.me() else { continue };
        seen = state.version;
        last_scan = tokio::time::Instant::now();
        let held = thick_chunks(&state, me);
        let wanted: Vec<ChunkId> = held
            .iter()
            .copied()
            .filter(|c| !service.storage().contains(*c))
            .collect();
        let storage = service.storage();
        storage.set_thick_reservation(
            thick_vtrees(&state),
            wanted.len() as u64,
            (held.len() - wanted.len()) as u64,
        );
        let metrics = service.metrics().clone();
        if wanted.is_empty() {
            metrics.thick_chunks_pending.set(0);
            metrics.thick_chunks_no_space.set(0);
            last_no_space = 0;
            continue;
        }
        metrics.thick_chunks_pending.set(wanted.len() as i64);
        let (allocated, no_space) = preallocate(storage, &wanted, |left| {
            metrics.thick_chunks_pending.set(left as i64);
        })
        .await;
        metrics.thick_chunks_allocated.inc_by(allocated);
        metrics.thick_chunks_pending.set(no_space as i64);
        metrics.thick_chunks_no_space.set(no_space as i64);
        if no_space > 0 && no_space != last_no_space {
            tracing::error!(
                no_space,
                "cannot pre-allocate every chunk of the thick volumes this SDS holds: its devices are full; writes to those chunks can fail with ENOSPC. Add a device or move PGs away"
            );
        } else if no_space == 0 {
            tracing::info!(allocated, "pre-allocated the chunks of thick volumes");
        }
        last_no_space = no_space;
    }
}
