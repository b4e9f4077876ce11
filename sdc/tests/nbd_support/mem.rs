//! An in-memory sparse NBD backend for tests and the `nbd_memserver` example: a map of 4 KiB
//! blocks where a missing block is a hole that reads as zeroes, so `base:allocation` has real
//! holes to report. It can also hold reads at one offset until released, to make replies
//! complete out of order on demand.

use bytes::{Bytes, BytesMut};
use sdc::nbd::{Backend, BackendError, Extent};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Semaphore;

/// Allocation unit of the memory backend.
pub const BLOCK_LEN: u64 = 4096;

pub struct MemBackend {
    size: u64,
    read_only: bool,
    slow_zero: bool,
    blocks: Mutex<HashMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
    reads_started: AtomicU64,
    /// Reads starting at this offset wait for a permit of the semaphore.
    read_gate: Mutex<Option<(u64, Arc<Semaphore>)>>,
    /// Reads starting at this offset fail with EIO.
    read_fault: Mutex<Option<u64>>,
}

impl MemBackend {
    pub fn new(size: u64) -> Self {
        MemBackend {
            size,
            read_only: false,
            slow_zero: false,
            blocks: Mutex::new(HashMap::new()),
            flushes: AtomicU64::new(0),
            reads_started: AtomicU64::new(0),
            read_gate: Mutex::new(None),
            read_fault: Mutex::new(None),
        }
    }

    /// The same, refusing writes.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// The same, claiming zeroing is no faster than writing (so FAST_ZERO is refused).
    pub fn slow_zero(mut self) -> Self {
        self.slow_zero = true;
        self
    }

    /// Makes reads at `offset` fail with EIO.
    pub fn fail_reads_at(&self, offset: u64) {
        *self
            .read_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(offset);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Box<[u8]>>> {
        self.blocks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes reads at `offset` wait until the returned semaphore gets a permit.
    pub fn gate_reads_at(&self, offset: u64) -> Arc<Semaphore> {
        let gate = Arc::new(Semaphore::new(0));
        *self
            .read_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((offset, gate.clone()));
        gate
    }

    /// Writes directly, bypassing the server.
    pub fn fill(&self, offset: u64, data: &[u8]) {
        let mut blocks = self.lock();
        for_each_block(offset, data.len() as u64, |block, at, pos, n| {
            let b = blocks
                .entry(block)
                .or_insert_with(|| vec![0; BLOCK_LEN as usize].into_boxed_slice());
            b[at..at + n].copy_from_slice(&data[pos..pos + n]);
        });
    }

    /// The whole export as bytes.
    pub fn contents(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        self.copy_out(0, &mut out);
        out
    }

    pub fn allocated_blocks(&self) -> usize {
        self.lock().len()
    }

    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// Reads that reached the backend.
    pub fn reads_started(&self) -> u64 {
        self.reads_started.load(Ordering::SeqCst)
    }

    fn copy_out(&self, offset: u64, out: &mut [u8]) {
        let blocks = self.lock();
        for_each_block(offset, out.len() as u64, |block, at, pos, n| {
            if let Some(b) = blocks.get(&block) {
                out[pos..pos + n].copy_from_slice(&b[at..at + n]);
            }
        });
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BackendError::Inval),
        }
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::Perm);
        }
        self.check(offset, len)
    }
}

/// Calls `f(block, offset in block, offset in range, length)` for each block piece of a range.
fn for_each_block(offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
    let end = offset + len;
    let mut pos = offset;
    while pos < end {
        let at = pos % BLOCK_LEN;
        let n = (BLOCK_LEN - at).min(end - pos);
        f(
            pos / BLOCK_LEN,
            at as usize,
            (pos - offset) as usize,
            n as usize,
        );
        pos += n;
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        self.check(offset, u64::from(len))?;
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        if *self
            .read_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            == Some(offset)
        {
            return Err(BackendError::Io);
        }
        let gate = self
            .read_gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|(at, _)| *at == offset)
            .map(|(_, gate)| gate.clone());
        if let Some(gate) = gate {
            gate.acquire().await.map_err(|_| BackendError::Io)?.forget();
        }
        let mut out = BytesMut::zeroed(len as usize);
        self.copy_out(offset, &mut out);
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BackendError> {
        self.writable(offset, data.len() as u64)?;
        self.fill(offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), BackendError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.writable(offset, len)?;
        let mut blocks = self.lock();
        for_each_block(offset, len, |block, _, _, n| {
            if n as u64 == BLOCK_LEN {
                blocks.remove(&block);
            }
        });
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> Result<(), BackendError> {
        self.writable(offset, len)?;
        let mut blocks = self.lock();
        for_each_block(offset, len, |block, at, _, n| {
            if may_trim && n as u64 == BLOCK_LEN {
                blocks.remove(&block);
            } else if let Some(b) = blocks.get_mut(&block) {
                b[at..at + n].fill(0);
            } else if !may_trim {
                blocks.insert(block, vec![0; BLOCK_LEN as usize].into_boxed_slice());
            }
        });
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.check(offset, len)?;
        let blocks = self.lock();
        let mut extents: Vec<Extent> = Vec::new();
        for_each_block(offset, len, |block, _, _, n| {
            let hole = !blocks.contains_key(&block);
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.len += n as u64,
                _ if hole => extents.push(Extent::hole(n as u64)),
                _ => extents.push(Extent::data(n as u64)),
            }
        });
        Ok(extents)
    }

    fn fast_zero(&self, _offset: u64, _len: u64) -> bool {
        // Zeroing a block drops or clears it in memory: faster than a write unless a test
        // says otherwise.
        !self.slow_zero
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        // One shared map and no cache: every connection sees every completed write.
        true
    }

    fn description(&self) -> String {
        "in-memory sparse test disk".into()
    }
}
