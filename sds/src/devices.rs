//! The SDS's device set at run time, kept in step with the cluster map.
//!
//! - A device `scli --add_sds_device` gave this SDS is opened (and formatted when blank) before
//!   the map naming it is installed, so no request routed by that map finds it missing; after a
//!   restart the same happens for devices the configuration does not list.
//! - A device the map marks removing (`scli --remove_sds_device`), or does not list for this SDS
//!   at all, is drained: it takes no new chunks and [`DeviceSet::run`] moves its chunks to the
//!   other devices one at a time ([`Storage::move_chunk`]), each through the SDS's copy
//!   throttle under the device's pool policy (as rebuild copies), repairing a block that fails its
//!   checksum from the PG's other copy first. When the other devices are full it waits: the MDM
//!   no longer counts the device's capacity, so rebalance moves PGs off this SDS. The MDM drops
//!   the device's record once this SDS reports it drained and empty.
//! - A device that cannot be opened is reported failed (never retried until restart). At start
//!   (the first sync) a device another process holds locked is waited for first, up to
//!   `device_lock_wait_ms`: a SIGKILLed SDS lets go of its devices only once its I/O finished.

use crate::chunk_store::{ChunkStore, StoreError};
use crate::device::BlockDevice;
use crate::service::Service;
use proto::model::{ClusterState, DeviceState, RebuildPolicy};
use proto::msg::DeviceReport;
use proto::CHUNK_SIZE;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Opens (formatting when blank) the chunk store on a device path, waiting up to the given
/// time for a device another process holds locked.
pub type OpenDevice<D> = Arc<
    dyn Fn(PathBuf, Duration) -> Pin<Box<dyn Future<Output = Result<ChunkStore<D>, String>> + Send>>
        + Send
        + Sync,
>;

/// How often the drain task looks for work when nothing woke it.
const DRAIN_IDLE: Duration = Duration::from_secs(1);
/// Pause after the other devices had no room (rebalance must move PGs off first).
const NO_ROOM_PAUSE: Duration = Duration::from_secs(2);

pub struct DeviceSet<D> {
    name: String,
    service: Arc<Service<D>>,
    open: OpenDevice<D>,
    /// Paths that failed to open: reported failed, not retried until restart.
    broken: Mutex<BTreeMap<String, String>>,
    wake: Notify,
    /// How long the first sync (at start, before this SDS serves) waits for a locked device;
    /// later ones do not wait, so a map is never held up.
    start_lock_wait: Duration,
    synced: AtomicBool,
}

impl<D: BlockDevice> DeviceSet<D> {
    /// The device set of SDS `name` (its name in the map); at start, a device another process
    /// holds locked is waited for up to `start_lock_wait` (a killed SDS lets go of its devices
    /// a little after its process ends).
    pub fn new(
        name: String,
        service: Arc<Service<D>>,
        open: OpenDevice<D>,
        start_lock_wait: Duration,
    ) -> Arc<DeviceSet<D>> {
        Arc::new(DeviceSet {
            name,
            service,
            open,
            broken: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
            start_lock_wait,
            synced: AtomicBool::new(false),
        })
    }

    /// What the MDM hears in every hello: the open devices, and those that failed to open.
    pub fn reports(&self) -> Vec<DeviceReport> {
        let mut out = self.service.storage().reports();
        if let Ok(broken) = self.broken.lock() {
            out.extend(broken.iter().map(|(p, e)| DeviceReport {
                path: p.clone(),
                capacity_bytes: 0,
                failed: true,
                chunks: 0,
                draining: false,
                error: format!("cannot open: {e}"),
                io: Default::default(),
            }));
        }
        out
    }

    /// The devices `map` gives this SDS, as `(path, state)`; `None` when the map does not
    /// know this SDS (yet).
    pub fn listed(&self, map: &ClusterState) -> Option<Vec<(String, DeviceState)>> {
        let sd = map.sds_by_cert_name(&self.name)?;
        Some(
            sd.devices
                .iter()
                .map(|d| (d.path.clone(), d.state))
                .collect(),
        )
    }

    /// Bring the open devices in line with `listed` (from [`DeviceSet::listed`]): open the new
    /// ones, drain the removed ones. Run before the map is installed.
    pub async fn sync(&self, listed: Vec<(String, DeviceState)>) {
        let storage = self.service.storage();
        let mut opened = false;
        let lock_wait = if self.synced.swap(true, Ordering::SeqCst) {
            Duration::ZERO
        } else {
            self.start_lock_wait
        };
        // Open the new devices first: a drain woken below needs somewhere to move chunks to.
        for (path, state) in &listed {
            if *state == DeviceState::Removing {
                continue;
            }
            let broken = self
                .broken
                .lock()
                .map(|b| b.contains_key(path))
                .unwrap_or(true);
            if storage.has_device(path) || broken {
                continue;
            }
            match (self.open)(PathBuf::from(path), lock_wait).await {
                Ok(store) => {
                    tracing::info!(device = %path, capacity_bytes = store.capacity_bytes(),
                        chunks = store.chunk_count(), formatted = store.was_formatted(),
                        "opened a device the cluster map gives this SDS");
                    storage.add_device(path.clone(), store);
                    opened = true;
                }
                Err(e) => {
                    tracing::error!(device = %path, "cannot open the device the cluster map gives this SDS: {e}; reporting it failed (fix it, then restart the SDS)");
                    if let Ok(mut b) = self.broken.lock() {
                        b.insert(path.clone(), e.clone());
                    }
                }
            }
        }
        if opened {
            match storage.resolve_duplicates().await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(
                    resolved = n,
                    "freed incomplete copies of chunks an interrupted move left on two devices"
                ),
                Err(e) => tracing::error!("could not resolve chunks left on two devices: {e}"),
            }
        }
        for (path, state) in &listed {
            if *state == DeviceState::Initializing && storage.is_failed(path) {
                // An operator cleared its error (--clear_sds_device_error): format it anew.
                self.reopen_cleared(path, lock_wait).await;
                continue;
            }
            if *state == DeviceState::Failed {
                let n = storage.forget_failed(path);
                if n > 0 {
                    tracing::warn!(device = %path, chunks = n, "the MDM recorded the failed device and dropped this SDS's copies on it: forgot its chunks");
                }
            }
            if *state == DeviceState::Removing && storage.drain(path) {
                tracing::info!(device = %path, "device is being removed: it takes no new chunks and its chunks are moved to the other devices");
                self.wake.notify_one();
            }
        }
        for d in storage.devices().iter() {
            if !listed.iter().any(|(p, _)| *p == d.path) && storage.drain(&d.path) {
                tracing::warn!(device = %d.path, "device is not one of this SDS's devices in the cluster map (removed, or never added with scli --add_sds_device): it takes no new chunks and its chunks are moved to the other devices");
                self.wake.notify_one();
            }
        }
    }

    /// Format the failed device at `path` anew after an operator cleared its error, and serve
    /// it in place of the failed one (as new capacity). A failure is logged and reported as the
    /// device's new error in the next hello.
    async fn reopen_cleared(&self, path: &str, lock_wait: Duration) {
        let storage = self.service.storage();
        if let Err(e) = storage.wipe_failed(path).await {
            tracing::error!(device = %path, "cannot clear the failed device: writing its superblock failed: {e}");
            storage.set_failure(path, format!("clearing the error failed: {e}"));
            return;
        }
        match (self.open)(PathBuf::from(path), lock_wait).await {
            Ok(store) => {
                let capacity = store.capacity_bytes();
                if storage.replace_failed(path, store) {
                    tracing::warn!(device = %path, capacity_bytes = capacity, "device error cleared: formatted anew, serving it as new capacity");
                }
            }
            Err(e) => {
                tracing::error!(device = %path, "cannot reopen the cleared device: {e}");
                storage.set_failure(path, format!("reopening after the clear failed: {e}"));
            }
        }
    }

    /// The rebuild/rebalance policy of the pool the device at `path` belongs to (the default
    /// once the map no longer lists it).
    fn policy_of(&self, path: &str) -> RebuildPolicy {
        let map = self.service.map().state();
        map.sds_by_cert_name(&self.name)
            .and_then(|s| s.devices.iter().find(|d| d.path == path))
            .and_then(|d| map.pools.get(&d.pool))
            .map(|p| p.rebuild_policy)
            .unwrap_or_default()
    }

    /// Move chunks off draining devices, forever.
    pub async fn run(self: Arc<Self>) {
        let storage = self.service.storage().clone();
        let metrics = self.service.metrics().clone();
        loop {
            metrics
                .draining_chunks
                .set(storage.draining_chunks() as i64);
            let _ = tokio::time::timeout(DRAIN_IDLE, self.wake.notified()).await;
            let devs = storage.devices();
            for (i, d) in devs.iter().enumerate() {
                if !d.draining() || d.failed() || d.store.chunk_count() == 0 {
                    continue;
                }
                let chunks = d.store.chunks();
                tracing::info!(device = %d.path, chunks = chunks.len(), "moving chunks off a device being removed");
                let mut moved = 0u64;
                for chunk in chunks {
                    let _permit = self
                        .service
                        .copy_throttle()
                        .acquire(
                            || self.policy_of(&d.path),
                            || metrics.user_requests.get(),
                            CHUNK_SIZE,
                        )
                        .await;
                    match storage.move_chunk(chunk, i).await {
                        Ok(true) => {
                            moved += 1;
                            metrics.drained_chunks.inc();
                            metrics
                                .draining_chunks
                                .set(storage.draining_chunks() as i64);
                        }
                        Ok(false) => {}
                        Err(StoreError::ChecksumMismatch { chunk, offset }) => {
                            metrics.checksum_errors.inc();
                            match self.service.repair_block(chunk, offset).await {
                                Ok(_) => {
                                    tracing::info!(%chunk, offset, "repaired a block before moving its chunk; the move is retried")
                                }
                                Err(e) => {
                                    tracing::warn!(%chunk, offset, "a block of a chunk to move fails its checksum and cannot be repaired yet: {e}")
                                }
                            }
                        }
                        Err(StoreError::NoSpace) => {
                            tracing::warn!(device = %d.path, left = d.store.chunk_count(),
                                "no room on this SDS's other devices: waiting for rebalance to move PGs off this SDS");
                            tokio::time::sleep(NO_ROOM_PAUSE).await;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(%chunk, device = %d.path, "could not move a chunk off a device being removed: {e}; retrying later");
                            break;
                        }
                    }
                }
                if d.store.chunk_count() == 0 {
                    tracing::info!(device = %d.path, moved, "device drained: every chunk moved to the other devices; the MDM removes it at the next hello");
                } else {
                    tracing::info!(device = %d.path, moved, left = d.store.chunk_count(), "device drain paused");
                }
            }
        }
    }
}
