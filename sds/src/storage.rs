//! The SDS's devices as one chunk space: which device holds a chunk, where a new chunk goes,
//! and which devices have failed.
//!
//! PERFORMANCE-CRITICAL: every data request passes here; no logging above DEBUG per I/O.
//!
//! A chunk lives on exactly one device; a new one goes to the healthy device with the most free
//! slots (placement is decided under one mutex, so two first writes of a chunk cannot pick two
//! devices). A device error that means the device failed (EIO, short transfer, a dead ring
//! thread) marks the device failed: it is reported to the MDM, takes no new chunks, and keeps
//! serving what it still can. This module must not know about epochs or the wire protocol.

use crate::chunk_store::{ChunkStore, StoreError};
use crate::device::{BlockDevice, DeviceError};
use bytes::Bytes;
use proto::msg::DeviceReport;
use proto::{ChunkId, VtreeId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One device and its chunk store.
pub struct Device<D> {
    /// The path as configured (the MDM matches it with the path given to scli).
    pub path: String,
    pub store: Arc<ChunkStore<D>>,
    failed: AtomicBool,
}

impl<D> Device<D> {
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

pub struct Storage<D> {
    devices: Vec<Device<D>>,
    placement: Mutex<()>,
}

impl<D: BlockDevice> Storage<D> {
    /// `(path, store)` per device, in configuration order.
    pub fn new(devices: Vec<(String, ChunkStore<D>)>) -> Storage<D> {
        Storage {
            devices: devices
                .into_iter()
                .map(|(path, store)| Device {
                    path,
                    store: Arc::new(store),
                    failed: AtomicBool::new(false),
                })
                .collect(),
            placement: Mutex::new(()),
        }
    }

    pub fn devices(&self) -> &[Device<D>] {
        &self.devices
    }

    /// What the MDM hears in every hello.
    pub fn reports(&self) -> Vec<DeviceReport> {
        self.devices
            .iter()
            .map(|d| DeviceReport {
                path: d.path.clone(),
                capacity_bytes: d.store.capacity_bytes(),
                failed: d.failed(),
            })
            .collect()
    }

    /// Allocated chunks on all devices.
    pub fn chunk_count(&self) -> usize {
        self.devices.iter().map(|d| d.store.chunk_count()).sum()
    }

    /// Mark device `i` failed (logged once: a human must replace it).
    pub fn mark_failed(&self, i: usize, why: &DeviceError) {
        if let Some(d) = self.devices.get(i) {
            if !d.failed.swap(true, Ordering::SeqCst) {
                tracing::error!(device = %d.path, "device failed: {why}; reporting it to the MDM");
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

    fn locate(&self, chunk: ChunkId) -> Option<usize> {
        if let [only] = self.devices.as_slice() {
            return only.store.contains(chunk).then_some(0);
        }
        self.devices.iter().position(|d| d.store.contains(chunk))
    }

    /// The device holding `chunk`, or the one a new chunk goes to (reserved there).
    fn place(&self, chunk: ChunkId) -> Result<usize, StoreError> {
        if let Some(i) = self.locate(chunk) {
            return Ok(i);
        }
        let _one_at_a_time = self.placement.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = self.locate(chunk) {
            return Ok(i);
        }
        let best = self
            .devices
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.failed())
            .map(|(i, d)| (d.store.free_slots(), i))
            .filter(|(free, _)| *free > 0)
            .max();
        match best {
            Some((_, i)) => {
                self.devices[i].store.reserve(chunk)?;
                Ok(i)
            }
            None if self.devices.iter().all(|d| d.failed()) => {
                Err(StoreError::Device(DeviceError::eio()))
            }
            None => Err(StoreError::NoSpace),
        }
    }

    pub async fn read(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<Bytes, StoreError> {
        match self.locate(chunk) {
            Some(i) => self.note(i, self.devices[i].store.read(chunk, offset, len).await),
            None => crate::chunk_store::zeros(offset, len),
        }
    }

    pub async fn write(&self, chunk: ChunkId, offset: u32, data: &[u8]) -> Result<(), StoreError> {
        if data.is_empty() {
            return Ok(());
        }
        let i = self.place(chunk)?;
        self.note(i, self.devices[i].store.write(chunk, offset, data).await)
    }

    /// Trim and write-zeroes: the range reads as zeros afterwards; emptied chunks are freed.
    pub async fn zero(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<(), StoreError> {
        match self.locate(chunk) {
            Some(i) => self.note(i, self.devices[i].store.trim(chunk, offset, len).await),
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
        match self.locate(chunk) {
            Some(i) => self.note(
                i,
                self.devices[i].store.zero_keeping(chunk, offset, len).await,
            ),
            None => crate::chunk_store::zeros(offset, len).map(|_| ()),
        }
    }

    /// Allocate `chunk` without data unless some device holds it (thick volumes). Returns
    /// whether it allocated.
    pub async fn preallocate(&self, chunk: ChunkId) -> Result<bool, StoreError> {
        if self.contains(chunk) {
            return Ok(false);
        }
        let i = self.place(chunk)?;
        self.note(i, self.devices[i].store.preallocate(chunk).await)
    }

    /// Flush every device (in parallel when there are several).
    pub async fn flush(&self) -> Result<(), StoreError> {
        if let [d] = self.devices.as_slice() {
            return self.note(0, d.store.flush().await);
        }
        let mut set = tokio::task::JoinSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            let store = d.store.clone();
            set.spawn(async move { (i, store.flush().await) });
        }
        let mut first_err = None;
        while let Some(joined) = set.join_next().await {
            let (i, r) = joined.map_err(|_| StoreError::Device(DeviceError::Stopped))?;
            if let Err(e) = self.note(i, r) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Apply every device's journaled writes in place (when it holds any): the background
    /// apply that keeps the in-memory overlay small between client flushes.
    pub async fn apply_journals(&self) -> Result<(), StoreError> {
        for (i, d) in self.devices.iter().enumerate() {
            if d.store.unapplied() && !d.failed() {
                self.note(i, d.store.apply_journal().await)?;
            }
        }
        Ok(())
    }

    /// Whether `chunk` is allocated on any device.
    pub fn contains(&self, chunk: ChunkId) -> bool {
        self.locate(chunk).is_some()
    }

    /// Every allocated chunk of `vtree` on any device, ascending.
    pub fn chunks_of(&self, vtree: VtreeId) -> Vec<proto::ChunkIndex> {
        let mut out: Vec<proto::ChunkIndex> = self
            .devices
            .iter()
            .flat_map(|d| d.store.chunks_of(vtree))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// One byte per chunk `first .. first + count` of `vtree`: 1 if allocated on any device.
    pub fn allocated(&self, vtree: VtreeId, first: u64, count: u32) -> Vec<u8> {
        let mut out = vec![0u8; count as usize];
        for d in &self.devices {
            for (o, a) in out.iter_mut().zip(d.store.allocated(vtree, first, count)) {
                *o |= a;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceOptions, EioRule, FaultOp, FaultyDevice, FileDevice};
    use crate::test_util::Scratch;
    use proto::ChunkIndex;

    fn c(i: u64) -> ChunkId {
        ChunkId {
            vtree: VtreeId(3),
            index: ChunkIndex(i),
        }
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
        assert_eq!(s.allocated(VtreeId(3), 0, 8), vec![1, 1, 1, 1, 1, 1, 0, 0]);
        for i in 0..6 {
            assert_eq!(s.read(c(i), 0, 1).await.expect("read"), vec![i as u8]);
        }
        assert_eq!(s.read(c(9), 10, 3).await.expect("hole"), vec![0u8; 3]);
        // Applied in place, so reads reach the devices.
        for d in s.devices() {
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
        assert!(
            s.flush().await.is_err(),
            "the failed device fails the flush"
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
}
