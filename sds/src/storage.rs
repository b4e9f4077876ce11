//! The SDS's devices as one chunk space: which device holds a chunk, where a new chunk goes,
//! which devices have failed, and moving chunks off a device being removed.
//!
//! PERFORMANCE-CRITICAL: every data request passes here; no logging above DEBUG per I/O.
//!
//! A chunk lives on exactly one device; a new one goes to the usable device with the most free
//! slots (placement is decided under one mutex, so two first writes of a chunk cannot pick two
//! devices). A device error that means the device failed (EIO, short transfer, a dead ring
//! thread) marks the device failed: it is reported to the MDM, takes no new chunks, and keeps
//! serving what it still can. Devices can be added while running; a device being removed is
//! *draining*: it takes no new chunks and [`Storage::move_chunk`] copies its chunks, one at a
//! time, to the other devices. A move holds the chunk's whole-chunk lock in `moves` (every
//! change of a chunk holds the lock of the blocks it changes) and frees the old copy only after
//! the new one is flushed; reads prefer the draining copy until it is gone, so a half-made copy
//! is never read. After a crash mid-move, [`Storage::resolve_duplicates`] keeps the complete
//! copy. Each device counts its completed requests, bytes and latency ([`Device::io`]).
//!
//! **Thick reservation**: slots promised to thick volumes are not given to other chunks. The
//! `thick` task tells [`Storage::set_thick_reservation`] which vtrees are thick and how many of
//! their chunks this SDS still has to allocate; a new chunk of any other vtree is placed only
//! while more slots stay free than that (else `NoSpace`, which the client sees as ENOSPC), so
//! thin writes run out first. Moves off draining devices are not held back (they free a slot
//! for each they take). This module must not know about epochs or the wire protocol.

use crate::chunk_store::{ChunkStore, StoreError, BLOCK};
use crate::device::{BlockDevice, DeviceError};
use crate::metrics::{DeviceIo, DeviceIoFamilies, DeviceOp};
use crate::range_lock::{BlockMask, RangeLocks, BLOCKS};
use bytes::Bytes;
use proto::msg::DeviceReport;
use proto::{ChunkId, VtreeId};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// One device and its chunk store.
pub struct Device<D> {
    /// The path as configured (the MDM matches it with the path given to scli).
    pub path: String,
    pub store: Arc<ChunkStore<D>>,
    failed: AtomicBool,
    /// The error that failed it.
    failure: Mutex<String>,
    draining: AtomicBool,
    /// Its I/O counters and latency (metrics).
    pub io: DeviceIo,
}

impl<D> Device<D> {
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Takes no new chunks; its chunks are being moved to the other devices.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    fn usable(&self) -> bool {
        !self.failed() && !self.draining()
    }
}

/// The devices, in the order they were added (never reordered or shrunk while running, so an
/// index into one snapshot names the same device in every later one).
type Devices<D> = Arc<[Arc<Device<D>>]>;

/// Space promised to thick volumes (see the module docs).
#[derive(Debug, Default)]
struct ThickReservation {
    /// Vtrees of the map's thick volumes.
    vtrees: HashSet<VtreeId>,
    /// Chunks of thick volumes this SDS holds and has not allocated yet.
    pending: u64,
    /// Chunks of thick volumes allocated here.
    stored: u64,
}

pub struct Storage<D> {
    devices: RwLock<Devices<D>>,
    /// Held while a new chunk is placed; guards the thick reservation.
    placement: Mutex<ThickReservation>,
    moves: RangeLocks,
    /// Signalled when a device's writes call for an apply round ([`Storage::apply_wanted`]).
    apply_wanted: Arc<tokio::sync::Notify>,
    /// Every device's I/O metric families.
    io: DeviceIoFamilies,
}

impl<D: BlockDevice> Storage<D> {
    /// `(path, store)` per device, in configuration order.
    pub fn new(devices: Vec<(String, ChunkStore<D>)>) -> Storage<D> {
        let apply_wanted = Arc::new(tokio::sync::Notify::new());
        let io = DeviceIoFamilies::default();
        Storage {
            devices: RwLock::new(
                devices
                    .into_iter()
                    .map(|(p, s)| new_device(p, s, &apply_wanted, &io))
                    .collect(),
            ),
            placement: Mutex::new(ThickReservation::default()),
            moves: RangeLocks::new(),
            apply_wanted,
            io,
        }
    }

    /// The devices' I/O metric families (for [`crate::metrics::SdsMetrics::register_device_io`]).
    pub fn device_io(&self) -> &DeviceIoFamilies {
        &self.io
    }

    /// Returns when some device's writes have called for an apply round (its journal is half
    /// full, or many slots wait for one): the background applier then runs
    /// [`apply_journals`](Self::apply_journals), so that no write waits for a round.
    pub async fn apply_wanted(&self) {
        self.apply_wanted.notified().await;
    }

    /// A snapshot of the devices.
    pub fn devices(&self) -> Devices<D> {
        self.devices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Add a device while running (a device `scli --add_sds_device` gave this SDS).
    pub fn add_device(&self, path: String, store: ChunkStore<D>) {
        let _one_at_a_time = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        let mut devs = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let mut next: Vec<Arc<Device<D>>> = devs.iter().cloned().collect();
        next.push(new_device(path, store, &self.apply_wanted, &self.io));
        *devs = next.into();
    }

    /// Replace the error the failed device at `path` reports.
    pub fn set_failure(&self, path: &str, why: String) {
        if let Some(d) = self.devices().iter().find(|d| d.path == path) {
            if let Ok(mut f) = d.failure.lock() {
                *f = why;
            }
        }
    }

    /// Whether the device at `path` is open and has failed.
    pub fn is_failed(&self, path: &str) -> bool {
        self.devices().iter().any(|d| d.path == path && d.failed())
    }

    /// Prepare the failed device at `path` for a fresh start (its error was cleared): zero its
    /// superblock page through the old handle, so the next open formats it, and let go of the
    /// file lock so it can be opened again. Its chunks were forgotten already.
    pub async fn wipe_failed(&self, path: &str) -> Result<(), StoreError> {
        let devs = self.devices();
        let Some(d) = devs.iter().find(|d| d.path == path && d.failed()) else {
            return Ok(());
        };
        d.store.forget_all();
        let dev = d.store.device();
        let page = crate::device::AlignedBuf::zeroed(crate::device::ALIGN);
        dev.write(0, page).await.map_err(StoreError::Device)?;
        dev.flush().await.map_err(StoreError::Device)?;
        dev.unlock();
        Ok(())
    }

    /// Put `store` (the device at `path` opened anew) in place of the failed device of that
    /// path, at the same position (indices stay valid); the old handle closes once nothing
    /// uses it. Returns false when no failed device has that path.
    pub fn replace_failed(&self, path: &str, store: ChunkStore<D>) -> bool {
        let _one_at_a_time = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        let mut devs = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let Some(i) = devs.iter().position(|d| d.path == path && d.failed()) else {
            return false;
        };
        let mut next: Vec<Arc<Device<D>>> = devs.iter().cloned().collect();
        next[i] = new_device(path.to_owned(), store, &self.apply_wanted, &self.io);
        *devs = next.into();
        true
    }

    /// Whether a device with this path is open.
    pub fn has_device(&self, path: &str) -> bool {
        self.devices().iter().any(|d| d.path == path)
    }

    /// Stop placing new chunks on the device at `path` (it is being removed); returns whether
    /// it was newly marked. Taken under the placement mutex, so no placement decided before
    /// the mark lands there afterwards.
    pub fn drain(&self, path: &str) -> bool {
        let _one_at_a_time = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        self.devices()
            .iter()
            .filter(|d| d.path == path)
            .any(|d| !d.draining.swap(true, Ordering::SeqCst))
    }

    /// What the MDM hears in every hello.
    pub fn reports(&self) -> Vec<DeviceReport> {
        self.devices()
            .iter()
            .map(|d| DeviceReport {
                path: d.path.clone(),
                capacity_bytes: d.store.capacity_bytes(),
                failed: d.failed(),
                chunks: d.store.chunk_count() as u64,
                draining: d.draining(),
                error: d.failure.lock().map(|e| e.clone()).unwrap_or_default(),
                io: d.io.counters(),
            })
            .collect()
    }

    /// Allocated chunks on all devices.
    pub fn chunk_count(&self) -> usize {
        self.devices().iter().map(|d| d.store.chunk_count()).sum()
    }

    /// Chunks still to move off draining devices.
    pub fn draining_chunks(&self) -> usize {
        self.devices()
            .iter()
            .filter(|d| d.draining())
            .map(|d| d.store.chunk_count())
            .sum()
    }

    /// Mark device `i` failed (logged once: a human must replace it).
    pub fn mark_failed(&self, i: usize, why: &DeviceError) {
        if let Some(d) = self.devices().get(i) {
            if !d.failed.swap(true, Ordering::SeqCst) {
                if let Ok(mut f) = d.failure.lock() {
                    *f = why.to_string();
                }
                tracing::error!(device = %d.path, "device failed: {why}; it takes no more I/O, its copies are rebuilt from the other SDS (reporting it to the MDM)");
            }
        }
    }

    fn note<T>(&self, i: usize, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Device(e)) = &r {
            if e.is_device_failure() {
                self.mark_failed(i, e);
            }
        }
        r
    }

    /// The device holding `chunk`: while a move has it on two devices, the draining one (the
    /// complete copy).
    fn locate(devs: &[Arc<Device<D>>], chunk: ChunkId) -> Option<usize> {
        if let [only] = devs {
            return only.store.contains(chunk).then_some(0);
        }
        let mut found = None;
        for (i, d) in devs.iter().enumerate() {
            if d.store.contains(chunk) {
                if d.draining() {
                    return Some(i);
                }
                found.get_or_insert(i);
            }
        }
        found
    }

    /// The device holding `chunk`, or the one a new chunk goes to (reserved there).
    fn place(&self, devs: &[Arc<Device<D>>], chunk: ChunkId) -> Result<usize, StoreError> {
        if let Some(i) = Self::locate(devs, chunk) {
            return Ok(i);
        }
        let mut thick = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = Self::locate(devs, chunk) {
            return Ok(i);
        }
        if thick.vtrees.contains(&chunk.vtree) {
            let i = Self::place_new(devs, chunk)?;
            thick.pending = thick.pending.saturating_sub(1);
            thick.stored += 1;
            return Ok(i);
        }
        if thick.pending > 0 {
            let free: u64 = devs
                .iter()
                .filter(|d| d.usable())
                .map(|d| d.store.free_slots())
                .sum();
            if free <= thick.pending {
                return Err(StoreError::NoSpace);
            }
        }
        Self::place_new(devs, chunk)
    }

    /// Promise space to thick volumes: `vtrees` are the map's thick volumes, of whose chunks
    /// this SDS holds `pending` not yet allocated and `stored` allocated.
    pub fn set_thick_reservation(&self, vtrees: HashSet<VtreeId>, pending: u64, stored: u64) {
        let mut thick = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        *thick = ThickReservation {
            vtrees,
            pending,
            stored,
        };
    }

    /// Chunks of thick volumes allocated here (as last counted, plus those placed since).
    pub fn thick_stored(&self) -> u64 {
        self.placement
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stored
    }

    /// Reserve `chunk` on the usable device with the most free slots (placement mutex held).
    fn place_new(devs: &[Arc<Device<D>>], chunk: ChunkId) -> Result<usize, StoreError> {
        let best = devs
            .iter()
            .enumerate()
            .filter(|(_, d)| d.usable() && !d.store.contains(chunk))
            .map(|(i, d)| (d.store.free_slots(), i))
            .filter(|(free, _)| *free > 0)
            .max();
        match best {
            Some((_, i)) => {
                devs[i].store.reserve(chunk)?;
                Ok(i)
            }
            None if devs.iter().all(|d| d.failed()) => Err(StoreError::Device(DeviceError::eio())),
            None => Err(StoreError::NoSpace),
        }
    }

    pub async fn read(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<Bytes, StoreError> {
        let devs = self.devices();
        let Some(i) = Self::locate(&devs, chunk) else {
            return crate::chunk_store::zeros(offset, len);
        };
        Self::working(&devs, i)?;
        let started = Instant::now();
        let r = self.note(i, devs[i].store.read(chunk, offset, len).await);
        if r.is_ok() {
            devs[i].io.done(DeviceOp::Read, u64::from(len), started);
        }
        // A move may have freed this copy between the lookup and the read (which then saw
        // zeros): read the new copy. (With one device there is nowhere to move to.)
        if devs.len() > 1 && !devs[i].store.contains(chunk) {
            if let Some(j) = Self::locate(&devs, chunk) {
                Self::working(&devs, j)?;
                return self.note(j, devs[j].store.read(chunk, offset, len).await);
            }
        }
        r
    }

    /// The blocks of `chunk` written here (as reads see them), or `None` if it is not held.
    pub fn written(&self, chunk: ChunkId) -> Option<[u64; 4]> {
        let devs = self.devices();
        let i = Self::locate(&devs, chunk)?;
        devs[i].store.meta_of(chunk).map(|m| m.written)
    }

    pub async fn write(&self, chunk: ChunkId, offset: u32, data: &[u8]) -> Result<(), StoreError> {
        if data.is_empty() {
            return Ok(());
        }
        let _moving = self
            .moves
            .lock(chunk, BlockMask::bytes(offset, data.len() as u32))
            .await;
        let devs = self.devices();
        let i = self.place(&devs, chunk)?;
        Self::working(&devs, i)?;
        let started = Instant::now();
        let r = self.note(i, devs[i].store.write(chunk, offset, data).await);
        if r.is_ok() {
            devs[i].io.done(DeviceOp::Write, data.len() as u64, started);
        }
        r
    }

    /// The device at `path` has failed and the cluster map says so (the MDM dropped this SDS's
    /// copies in its pool when it recorded the failure): forget its chunks, so later writes of
    /// them (as a fresh rebuild target) go to a working device. Returns how many.
    pub fn forget_failed(&self, path: &str) -> usize {
        self.devices()
            .iter()
            .find(|d| d.path == path && d.failed())
            .map_or(0, |d| d.store.forget_all())
    }

    /// Refuse I/O to a chunk on a failed device: its copy here is lost (the MDM rebuilds it
    /// from the other SDS), and a failing disk may answer with data older than what it lost.
    fn working(devs: &[Arc<Device<D>>], i: usize) -> Result<(), StoreError> {
        match devs.get(i) {
            Some(d) if d.failed() => Err(StoreError::Device(DeviceError::Failed(d.path.clone()))),
            _ => Ok(()),
        }
    }

    /// Trim and write-zeroes: the range reads as zeros afterwards; emptied chunks are freed.
    pub async fn zero(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<(), StoreError> {
        let _moving = self.moves.lock(chunk, BlockMask::bytes(offset, len)).await;
        let devs = self.devices();
        match Self::locate(&devs, chunk) {
            Some(i) => {
                Self::working(&devs, i)?;
                let started = Instant::now();
                let r = self.note(i, devs[i].store.trim(chunk, offset, len).await);
                if r.is_ok() {
                    devs[i].io.done(DeviceOp::Trim, u64::from(len), started);
                }
                r
            }
            None => crate::chunk_store::zeros(offset, len).map(|_| ()),
        }
    }

    /// Trim and write-zeroes on a thick volume: the range reads as zeros, the chunk stays.
    pub async fn zero_keeping(
        &self,
        chunk: ChunkId,
        offset: u32,
        len: u32,
    ) -> Result<(), StoreError> {
        let _moving = self.moves.lock(chunk, BlockMask::bytes(offset, len)).await;
        let devs = self.devices();
        match Self::locate(&devs, chunk) {
            Some(i) => {
                Self::working(&devs, i)?;
                let started = Instant::now();
                let r = self.note(i, devs[i].store.zero_keeping(chunk, offset, len).await);
                if r.is_ok() {
                    devs[i].io.done(DeviceOp::Trim, u64::from(len), started);
                }
                r
            }
            None => crate::chunk_store::zeros(offset, len).map(|_| ()),
        }
    }

    /// Allocate `chunk` without data unless some device holds it (thick volumes). Returns
    /// whether it allocated.
    pub async fn preallocate(&self, chunk: ChunkId) -> Result<bool, StoreError> {
        let _moving = self.moves.lock(chunk, BlockMask::all()).await;
        let devs = self.devices();
        if Self::locate(&devs, chunk).is_some() {
            return Ok(false);
        }
        let i = self.place(&devs, chunk)?;
        self.note(i, devs[i].store.preallocate(chunk).await)
    }

    /// Move `chunk` off device `from` (draining) to a usable device: copy its written blocks
    /// (verified against their checksums on the way), flush the copy, then free the old one.
    /// Returns false when `from` no longer holds it. On error nothing changed: the old copy
    /// stays and any partial new one is freed.
    pub async fn move_chunk(&self, chunk: ChunkId, from: usize) -> Result<bool, StoreError> {
        let _moving = self.moves.lock(chunk, BlockMask::all()).await;
        let devs = self.devices();
        let Some(src) = devs.get(from) else {
            return Ok(false);
        };
        let Some(meta) = src.store.meta_of(chunk) else {
            return Ok(false);
        };
        let to = {
            let _one_at_a_time = self.placement.lock().unwrap_or_else(|p| p.into_inner());
            Self::place_new(&devs, chunk)?
        };
        let dst = &devs[to];
        let copied = async {
            let mut b = 0;
            let mut any = false;
            while b < BLOCKS {
                if !meta.is_written(b) {
                    b += 1;
                    continue;
                }
                let start = b;
                while b < BLOCKS && meta.is_written(b) {
                    b += 1;
                }
                let (off, len) = ((start * BLOCK) as u32, ((b - start) * BLOCK) as u32);
                let data = self.note(from, src.store.read(chunk, off, len).await)?;
                self.note(to, dst.store.write(chunk, off, &data).await)?;
                any = true;
            }
            if !any {
                self.note(to, dst.store.preallocate(chunk).await)?;
            }
            self.note(to, dst.store.flush().await)
        }
        .await;
        if let Err(e) = copied {
            if let Err(undo) = dst.store.trim(chunk, 0, proto::CHUNK_SIZE as u32).await {
                tracing::warn!(%chunk, device = %dst.path, "could not free a partial copy: {undo}");
            }
            return Err(e);
        }
        self.note(
            from,
            src.store.trim(chunk, 0, proto::CHUNK_SIZE as u32).await,
        )?;
        Ok(true)
    }

    /// After a crash in the middle of a move a chunk can be on two devices: keep the copy that
    /// holds every block the other does with the same checksums (the complete one) and free
    /// the other. Call after opening devices, before serving what they hold. Returns how many
    /// duplicates were resolved.
    pub async fn resolve_duplicates(&self) -> Result<usize, StoreError> {
        let devs = self.devices();
        if devs.len() < 2 {
            return Ok(0);
        }
        let mut seen: std::collections::HashMap<ChunkId, usize> = Default::default();
        let mut resolved = 0;
        for (j, d) in devs.iter().enumerate() {
            for chunk in d.store.chunks() {
                let Some(&i) = seen.get(&chunk) else {
                    seen.insert(chunk, j);
                    continue;
                };
                let _moving = self.moves.lock(chunk, BlockMask::all()).await;
                let (Some(a), Some(b)) = (devs[i].store.meta_of(chunk), d.store.meta_of(chunk))
                else {
                    continue;
                };
                let covers = |x: &crate::chunk_store::ChunkMeta,
                              y: &crate::chunk_store::ChunkMeta| {
                    (0..BLOCKS)
                        .all(|k| !y.is_written(k) || (x.is_written(k) && x.crcs[k] == y.crcs[k]))
                };
                // Keep `i` when it covers `j`, else `j` (the copy that got further).
                let drop = if covers(&a, &b) { j } else { i };
                if drop == i {
                    seen.insert(chunk, j);
                }
                tracing::warn!(%chunk, kept = %devs[if drop == i { j } else { i }].path,
                    freed = %devs[drop].path, "a chunk was on two devices (a move was cut short): freed the incomplete copy");
                self.note(
                    drop,
                    devs[drop]
                        .store
                        .trim(chunk, 0, proto::CHUNK_SIZE as u32)
                        .await,
                )?;
                resolved += 1;
            }
        }
        Ok(resolved)
    }

    /// Flush every working device (in parallel when there are several). A device that fails
    /// now is taken out like one that failed earlier, and does not fail the flush: what it held
    /// is lost here either way, its chunks refuse I/O from now on and the MDM rebuilds its
    /// copies from the other SDS (which the client flushes too). Fails only when no device
    /// works, or on an error that is not a device failure.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let devs = self.devices();
        let mut set = tokio::task::JoinSet::new();
        for (i, d) in devs.iter().enumerate() {
            if d.failed() {
                continue;
            }
            let store = d.store.clone();
            set.spawn(async move { (i, store.flush().await) });
        }
        let mut first_err = None;
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.map_err(|_| StoreError::Device(DeviceError::Stopped))?;
            match self.note(i, r) {
                Ok(()) => {}
                Err(StoreError::Device(e)) if e.is_device_failure() => {}
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if !devs.is_empty() && devs.iter().all(|d| d.failed()) {
            return Err(StoreError::Device(DeviceError::eio()));
        }
        Ok(())
    }

    /// Apply every device's journaled writes in place (when it holds any): the background
    /// apply that keeps the in-memory overlay small between client flushes.
    pub async fn apply_journals(&self) -> Result<(), StoreError> {
        for (i, d) in self.devices().iter().enumerate() {
            if d.store.unapplied() && !d.failed() {
                self.note(i, d.store.apply_journal().await)?;
            }
        }
        Ok(())
    }

    /// Whether `chunk` is allocated on any device.
    pub fn contains(&self, chunk: ChunkId) -> bool {
        Self::locate(&self.devices(), chunk).is_some()
    }

    /// Every allocated chunk on any device, ascending.
    pub fn all_chunks(&self) -> Vec<ChunkId> {
        let mut out: Vec<ChunkId> = self
            .devices()
            .iter()
            .flat_map(|d| d.store.chunks())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Free `chunk` on every device unless `keep()` (asked while every change of the chunk
    /// waits) says otherwise; returns whether it freed it.
    pub async fn free_if(
        &self,
        chunk: ChunkId,
        keep: impl FnOnce() -> bool,
    ) -> Result<bool, StoreError> {
        let _moving = self.moves.lock(chunk, BlockMask::all()).await;
        if keep() {
            return Ok(false);
        }
        let devs = self.devices();
        let mut freed = false;
        for (i, d) in devs.iter().enumerate() {
            // A failed device takes no I/O; its chunks are forgotten once the map says so.
            if d.store.contains(chunk) && !d.failed() {
                self.note(i, d.store.trim(chunk, 0, proto::CHUNK_SIZE as u32).await)?;
                freed = true;
            }
        }
        Ok(freed)
    }

    /// Every allocated chunk of `vtree` (every layer) on any device, ascending.
    pub fn chunks_of(&self, vtree: VtreeId) -> Vec<ChunkId> {
        let mut out: Vec<ChunkId> = self
            .devices()
            .iter()
            .flat_map(|d| d.store.chunks_of(vtree))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// One byte per chunk `first .. first + count` (of `first`'s tree and layer): 1 if
    /// allocated on any device.
    pub fn allocated(&self, first: ChunkId, count: u32) -> Vec<u8> {
        let mut out = vec![0u8; count as usize];
        for d in self.devices().iter() {
            for (o, a) in out.iter_mut().zip(d.store.allocated(first, count)) {
                *o |= a;
            }
        }
        out
    }
}

fn new_device<D: BlockDevice>(
    path: String,
    store: ChunkStore<D>,
    apply_wanted: &Arc<tokio::sync::Notify>,
    io: &DeviceIoFamilies,
) -> Arc<Device<D>> {
    Arc::new(Device {
        io: io.device(&path),
        path,
        store: Arc::new(store.apply_in_background(apply_wanted.clone())),
        failed: AtomicBool::new(false),
        failure: Mutex::new(String::new()),
        draining: AtomicBool::new(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceOptions, EioRule, FaultOp, FaultyDevice, FileDevice};
    use crate::test_util::Scratch;
    use proto::ChunkIndex;

    fn c(i: u64) -> ChunkId {
        ChunkId::new(VtreeId(3), ChunkIndex(i))
    }

    async fn store(f: &Scratch) -> ChunkStore<FaultyDevice<FileDevice>> {
        let d = FileDevice::open(&f.0, &DeviceOptions::small()).expect("open");
        ChunkStore::open(FaultyDevice::new(d, 5))
            .await
            .expect("store")
    }

    #[tokio::test]
    async fn chunks_spread_over_devices_and_eio_marks_a_device_failed() {
        let (fa, fb) = (Scratch::new("st-a", 8 << 20), Scratch::new("st-b", 8 << 20));
        let s = Storage::new(vec![
            ("a".into(), store(&fa).await),
            ("b".into(), store(&fb).await),
        ]);
        for i in 0..6 {
            s.write(c(i), 0, &[i as u8; 4096]).await.expect("write");
        }
        let per: Vec<usize> = s.devices().iter().map(|d| d.store.chunk_count()).collect();
        assert_eq!(per, vec![3, 3], "new chunks go to the emptier device");
        assert_eq!(
            s.allocated(ChunkId::new(VtreeId(3), proto::ChunkIndex(0)), 8),
            vec![1, 1, 1, 1, 1, 1, 0, 0]
        );
        for i in 0..6 {
            assert_eq!(s.read(c(i), 0, 1).await.expect("read"), vec![i as u8]);
        }
        assert_eq!(s.read(c(9), 10, 3).await.expect("hole"), vec![0u8; 3]);
        // Applied in place, so reads reach the devices.
        for d in s.devices().iter() {
            d.store.apply_journal().await.expect("apply");
        }

        let on_b = (0..6)
            .find(|i| s.devices()[1].store.contains(c(*i)))
            .expect("a chunk on b");
        s.devices()[1]
            .store
            .device()
            .add_eio(EioRule::always(FaultOp::Any, None));
        let e = s.read(c(on_b), 0, 4096).await.expect_err("EIO");
        assert!(matches!(e, StoreError::Device(_)));
        let reports = s.reports();
        assert_eq!((reports[0].failed, reports[1].failed), (false, true));
        assert_eq!(reports[0].path, "a");
        // New chunks avoid the failed device.
        s.write(c(7), 0, b"x").await.expect("write");
        assert!(s.devices()[0].store.contains(c(7)));
        // The failed device is out of the flush set: flushes of the others go on.
        s.flush().await.expect("flush without the failed device");
        // It takes no more I/O, even once it answers again.
        s.devices()[1].store.device().clear_faults();
        let e = s.read(c(on_b), 0, 4096).await.expect_err("failed");
        assert!(
            matches!(e, StoreError::Device(DeviceError::Failed(_))),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_full_storage_says_no_space() {
        let f = Scratch::new("st-full", 4 << 20);
        let s = Storage::new(vec![("a".into(), store(&f).await)]);
        let slots = s.devices()[0].store.superblock().slot_count;
        for i in 0..slots {
            s.write(c(i), 0, b"x").await.expect("write");
        }
        assert!(matches!(
            s.write(c(slots), 0, b"x").await,
            Err(StoreError::NoSpace)
        ));
        s.zero(c(0), 0, proto::CHUNK_SIZE as u32)
            .await
            .expect("trim");
        s.write(c(slots), 0, b"x")
            .await
            .expect("the freed slot is reused");
    }

    fn block(tag: u8, n: usize) -> Vec<u8> {
        (0..n * 4096).map(|k| tag ^ (k % 251) as u8).collect()
    }

    #[tokio::test]
    async fn a_draining_device_moves_its_chunks_without_losing_writes() {
        let (fa, fb) = (
            Scratch::new("mv-a", 16 << 20),
            Scratch::new("mv-b", 16 << 20),
        );
        let s = Arc::new(Storage::new(vec![
            ("a".into(), store(&fa).await),
            ("b".into(), store(&fb).await),
        ]));
        // Chunks with holes (blocks 0-1 and 10 written), spread over both devices.
        for i in 0..4 {
            s.write(c(i), 0, &block(i as u8, 2)).await.expect("write");
            s.write(c(i), 10 * 4096, &block(0x80 | i as u8, 1))
                .await
                .expect("write");
        }
        let on_a: Vec<u64> = (0..4)
            .filter(|i| s.devices()[0].store.contains(c(*i)))
            .collect();
        assert!(!on_a.is_empty(), "some chunks on a");
        assert!(s.drain("a"));
        assert!(!s.drain("a"), "marked once");
        // Moves race with writes to the same chunks: every write lands in the copy that stays.
        let mut tasks = tokio::task::JoinSet::new();
        for &i in &on_a {
            let (s1, s2) = (s.clone(), s.clone());
            tasks.spawn(async move { s1.move_chunk(c(i), 0).await.map(|_| ()) });
            tasks.spawn(async move {
                for k in 0..8u8 {
                    s2.write(c(i), 20 * 4096, &block(k, 1)).await?;
                }
                Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("task").expect("move or write");
        }
        assert_eq!(s.devices()[0].store.chunk_count(), 0, "a drained");
        assert_eq!(s.draining_chunks(), 0);
        for i in 0..4u64 {
            let got = s.read(c(i), 0, 21 * 4096).await.expect("read");
            assert_eq!(&got[..2 * 4096], &block(i as u8, 2)[..], "chunk {i}");
            assert_eq!(
                &got[2 * 4096..10 * 4096],
                &vec![0u8; 8 * 4096][..],
                "hole of {i}"
            );
            assert_eq!(&got[10 * 4096..11 * 4096], &block(0x80 | i as u8, 1)[..]);
            if on_a.contains(&i) {
                assert_eq!(&got[20 * 4096..], &block(7, 1)[..], "last write of {i}");
            }
            // The hole stays a hole: only written blocks were copied.
            let meta = s.devices()[1].store.meta_of(c(i)).expect("on b");
            assert!(meta.is_written(10) && !meta.is_written(5));
        }
        // New chunks avoid the draining device.
        s.write(c(9), 0, b"new").await.expect("write");
        assert!(s.devices()[1].store.contains(c(9)));
        assert!(!s.devices()[0].store.contains(c(9)));
    }

    #[tokio::test]
    async fn a_move_cut_short_keeps_the_complete_copy() {
        let (fa, fb) = (
            Scratch::new("dup-a", 8 << 20),
            Scratch::new("dup-b", 8 << 20),
        );
        let (sa, sb) = (store(&fa).await, store(&fb).await);
        // Chunk 1: complete on a, half-copied to b (a move cut short before its flush).
        sa.write(c(1), 0, &block(1, 4)).await.expect("write");
        sb.write(c(1), 0, &block(1, 2)).await.expect("write");
        // Chunk 2: fully copied to b, not yet freed on a.
        sa.write(c(2), 0, &block(2, 3)).await.expect("write");
        sb.write(c(2), 0, &block(2, 3)).await.expect("write");
        // Chunk 3: only on b, ahead of a's stale partial copy of it.
        sb.write(c(3), 0, &block(3, 3)).await.expect("write");
        sa.write(c(3), 0, &block(3, 1)).await.expect("write");
        let s = Storage::new(vec![("a".into(), sa), ("b".into(), sb)]);
        assert_eq!(s.resolve_duplicates().await.expect("resolve"), 3);
        let on = |i: u64| {
            let d = s.devices();
            (d[0].store.contains(c(i)), d[1].store.contains(c(i)))
        };
        assert_eq!(on(1), (true, false), "the complete copy on a stays");
        assert_eq!(on(2), (true, false), "identical copies: one stays");
        assert_eq!(on(3), (false, true), "the copy that got further stays");
        assert_eq!(s.read(c(1), 0, 4 * 4096).await.expect("read"), block(1, 4));
        assert_eq!(s.read(c(3), 0, 3 * 4096).await.expect("read"), block(3, 3));
        assert_eq!(s.resolve_duplicates().await.expect("again"), 0);
    }

    #[tokio::test]
    async fn thin_chunks_leave_the_slots_promised_to_thick_volumes() {
        let f = Scratch::new("st-thick", 8 << 20);
        let s = Storage::new(vec![("a".into(), store(&f).await)]);
        let free = s.devices()[0].store.free_slots();
        assert!(free >= 3, "a device of a few slots: {free}");
        let thick = |i| ChunkId::new(VtreeId(9), ChunkIndex(i));
        // Promise all but one free slot to thick vtree 9.
        s.set_thick_reservation([VtreeId(9)].into_iter().collect(), free - 1, 0);
        s.write(c(0), 0, &[1; 4096])
            .await
            .expect("one thin chunk fits");
        let e = s
            .write(c(1), 0, &[2; 4096])
            .await
            .expect_err("the rest is promised");
        assert!(matches!(e, StoreError::NoSpace), "{e:?}");
        // The thin chunk already allocated keeps taking writes.
        s.write(c(0), 4096, &[3; 4096]).await.expect("rewrite");
        // Thick chunks take the promised slots, by write or pre-allocation.
        s.write(thick(0), 0, &[4; 4096]).await.expect("thick write");
        for i in 1..free - 1 {
            assert!(s.preallocate(thick(i)).await.expect("preallocate"));
        }
        assert_eq!(s.thick_stored(), free - 1);
        assert_eq!(s.devices()[0].store.free_slots(), 0);
        // Nothing promised any more: a freed slot goes to thin data again.
        s.zero(c(0), 0, proto::CHUNK_SIZE as u32)
            .await
            .expect("free");
        s.write(c(1), 0, &[5; 4096]).await.expect("thin again");
    }
}
