//! The chunk store: 1 MiB chunks keyed by [`ChunkId`] on one device, allocated on first write
//! (thin), with a CRC32 for every 4 KiB block, verified on every read.
//!
//! PERFORMANCE-CRITICAL: every data request passes here; no logging above DEBUG per I/O.
//!
//! # On-disk layout, format version 1 ([`FORMAT_VERSION`])
//!
//! ```text
//! [0, 4 KiB)                     superblock
//! [meta_offset + i * 4 KiB)      meta page of slot i          (meta_offset = 4 KiB)
//! [data_offset + i * 1 MiB)      data of slot i               (data_offset 1 MiB-aligned)
//! ```
//! All integers little-endian. Superblock: magic `"MBLKSDS\0"` (8), format version u32, block
//! size u32 (4096), chunk size u32 (1 MiB), reserved u32, device uuid u128, slot count u64, meta
//! offset u64, data offset u64, capacity at format u64, created (unix seconds) u64, zeros, and
//! the CRC32 of bytes `[0, 4092)` in the last 4 bytes.
//!
//! Meta page of a slot in use: magic `"MBCK"` u32, format version u32, device uuid u128, slot
//! index u32, reserved u32, vtree u64, chunk index u64, generation u64, reserved u64, "written"
//! bitmap (256 bits = 4 x u64: blocks written since allocation; the others read as zeros), 256
//! block CRC32s (1 KiB), zeros up to the page CRC32 in the last 4 bytes. A page that is zero, or
//! carries another device uuid (an earlier format of the same disk, or random bytes), is a free
//! slot: formatting writes the superblock only. Every metadata update is one aligned 4 KiB page
//! write. The generation is a device-wide counter, so of two pages claiming one chunk (a free
//! whose page write was lost in a crash) the later one wins at load and the other is freed.
//!
//! Opening a device: all zeros at the superblock = blank, formatted; a superblock of another
//! magic, version or a bad checksum = refused, never overwritten.
//!
//! # Concurrency
//!
//! Requests lock the 4 KiB blocks they touch ([`RangeLocks`]); trims lock the whole chunk. A
//! write updates the in-memory CRCs, then writes its data and the chunk's meta page in
//! parallel; meta page writes of one chunk are serialised and coalesced (a writer whose change
//! an in-flight page write missed issues the next one). Partial-block writes read, verify and
//! merge the old block first. Acknowledged writes are on the device (in its volatile cache);
//! [`flush`](ChunkStore::flush) makes them durable.
//!
//! # Not yet crash-consistent
//!
//! Data and meta page are two writes: a power loss between them can leave a block whose CRC
//! does not match, including one that had been flushed before being overwritten, and a torn
//! meta page loses its chunk. The issue "Data safety" adds a journal (or redirect-on-write into
//! a second slot, which the generation counter and the reserved page space are kept for).
//!
//! In memory: about 1.1 KiB per allocated chunk (its meta page minus padding), so 1 TiB of
//! written data costs about 1.1 GiB of RAM; opening reads every meta page (0.4% of the device).

mod layout;

#[cfg(test)]
mod tests;

pub use layout::{
    ChunkMeta, MetaPage, SlotIndex, Superblock, SuperblockError, BLOCK, FORMAT_VERSION, PAGE,
};

use crate::device::{AlignedBuf, BlockDevice, DeviceError};
use crate::range_lock::{BlockMask, RangeLocks, BLOCKS};
use bytes::{Bytes, BytesMut};
use proto::{ChunkId, ChunkIndex, VtreeId, CHUNK_SIZE};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// Meta pages read per device request while loading.
const LOAD_BATCH_PAGES: u64 = 256;

/// Zeros for holes, served without allocating.
static ZEROS: [u8; CHUNK_SIZE as usize] = [0; CHUNK_SIZE as usize];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("checksum mismatch in chunk {chunk} at offset {offset}")]
    ChecksumMismatch { chunk: ChunkId, offset: u32 },
    #[error("no free chunk slot on the device")]
    NoSpace,
    #[error("range {offset}+{len} is outside a chunk")]
    Range { offset: u32, len: u64 },
    #[error("refusing the device: {0}")]
    Superblock(#[from] SuperblockError),
    #[error("refusing the device: the meta page of slot {slot} has format version {found}")]
    MetaVersion { slot: u32, found: u32 },
    #[error("the device of {capacity} bytes is too small for one chunk")]
    TooSmall { capacity: u64 },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One allocated chunk.
struct Entry {
    slot: SlotIndex,
    meta: Mutex<ChunkMeta>,
    /// Generation of the page on the device; held while a page write is in flight.
    persisted: tokio::sync::Mutex<u64>,
}

/// Slot allocation bitmap with a next-fit cursor.
struct Slots {
    used: Vec<u64>,
    count: u64,
    free: u64,
    cursor: u64,
}

impl Slots {
    fn new(count: u64) -> Slots {
        Slots {
            used: vec![0; count.div_ceil(64) as usize],
            count,
            free: count,
            cursor: 0,
        }
    }

    fn mark(&mut self, s: u64) {
        if let Some(w) = self.used.get_mut((s / 64) as usize) {
            if *w & (1 << (s % 64)) == 0 {
                *w |= 1 << (s % 64);
                self.free -= 1;
            }
        }
    }

    fn release(&mut self, s: u64) {
        if let Some(w) = self.used.get_mut((s / 64) as usize) {
            if *w & (1 << (s % 64)) != 0 {
                *w &= !(1 << (s % 64));
                self.free += 1;
            }
        }
    }

    fn take(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let words = self.used.len() as u64;
        let start = self.cursor / 64;
        for i in 0..=words {
            let wi = (start + i) % words;
            let w = self.used[wi as usize];
            if w == u64::MAX {
                continue;
            }
            let s = wi * 64 + u64::from((!w).trailing_zeros());
            if s < self.count {
                self.mark(s);
                self.cursor = s + 1;
                return Some(s);
            }
        }
        None
    }
}

/// What to put in the blocks a write covers.
#[derive(Clone, Copy)]
enum Fill<'a> {
    Data(&'a [u8]),
    Zeros(usize),
}

impl Fill<'_> {
    fn len(&self) -> usize {
        match self {
            Fill::Data(d) => d.len(),
            Fill::Zeros(n) => *n,
        }
    }
}

/// The chunk store of one device.
pub struct ChunkStore<D> {
    dev: D,
    sb: Superblock,
    index: RwLock<BTreeMap<ChunkId, Arc<Entry>>>,
    slots: Mutex<Slots>,
    locks: RangeLocks,
    next_generation: AtomicU64,
    formatted: bool,
    corrupt_pages: u64,
}

fn check_range(offset: u32, len: u64) -> Result<(), StoreError> {
    if u64::from(offset) + len > CHUNK_SIZE {
        return Err(StoreError::Range { offset, len });
    }
    Ok(())
}

/// `len` zero bytes, without allocating, after checking the range.
pub fn zeros(offset: u32, len: u32) -> Result<Bytes, StoreError> {
    check_range(offset, u64::from(len))?;
    Ok(Bytes::from_static(&ZEROS[..len as usize]))
}

/// Blocks `[first, end)` touched by a byte range of non-zero length.
fn blocks(offset: u32, len: usize) -> (usize, usize) {
    let first = offset as usize / BLOCK;
    let end = (offset as usize + len).div_ceil(BLOCK);
    (first, end.max(first + 1))
}

impl<D: BlockDevice> ChunkStore<D> {
    /// Open the store on `dev`: format a blank device (all zeros at the superblock), refuse a
    /// foreign or unsupported one, and load the allocation map.
    pub async fn open(dev: D) -> Result<ChunkStore<D>, StoreError> {
        let capacity = dev.capacity();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let plan = Superblock::plan(capacity, rand::random::<u128>() | 1, now)
            .ok_or(StoreError::TooSmall { capacity })?;
        let page = dev.read(0, AlignedBuf::zeroed(PAGE)).await?;
        let blank = page.as_slice().iter().all(|b| *b == 0);
        let sb = if blank {
            let mut page = page;
            plan.encode(page.as_mut_slice());
            dev.write(0, page).await?;
            dev.flush().await?;
            plan
        } else {
            Superblock::decode(page.as_slice(), capacity)?
        };
        let mut store = ChunkStore {
            dev,
            sb,
            index: RwLock::new(BTreeMap::new()),
            slots: Mutex::new(Slots::new(sb.slot_count)),
            locks: RangeLocks::new(),
            next_generation: AtomicU64::new(1),
            formatted: blank,
            corrupt_pages: 0,
        };
        if !blank {
            store.load().await?;
        }
        Ok(store)
    }

    /// Read every meta page and rebuild the index, the slot bitmap and the generation counter.
    async fn load(&mut self) -> Result<(), StoreError> {
        let mut index: BTreeMap<ChunkId, (SlotIndex, ChunkMeta)> = BTreeMap::new();
        let mut slots = Slots::new(self.sb.slot_count);
        let mut stale = Vec::new();
        let mut max_generation = 0;
        let mut buf = AlignedBuf::zeroed((LOAD_BATCH_PAGES as usize) * PAGE);
        let mut first = 0u64;
        while first < self.sb.slot_count {
            let n = (self.sb.slot_count - first).min(LOAD_BATCH_PAGES);
            buf.set_window(0, n as usize * PAGE);
            buf = self
                .dev
                .read(self.sb.meta_offset + first * PAGE as u64, buf)
                .await?;
            for (i, page) in buf.as_slice().chunks_exact(PAGE).enumerate() {
                let slot = SlotIndex((first + i as u64) as u32);
                match ChunkMeta::decode(page, self.sb.device_uuid, slot) {
                    MetaPage::Free => {}
                    MetaPage::Corrupt => self.corrupt_pages += 1,
                    MetaPage::Version(found) => {
                        return Err(StoreError::MetaVersion {
                            slot: slot.0,
                            found,
                        })
                    }
                    MetaPage::InUse(m) => {
                        max_generation = max_generation.max(m.generation);
                        let chunk = m.chunk;
                        let older = match index.get(&chunk) {
                            Some((_, om)) if om.generation >= m.generation => Some(slot),
                            Some((other, _)) => Some(*other),
                            None => None,
                        };
                        if older != Some(slot) {
                            slots.mark(u64::from(slot.0));
                            index.insert(chunk, (slot, *m));
                        }
                        stale.extend(older);
                    }
                }
            }
            first += n;
        }
        for slot in &stale {
            // The older claim of a chunk: free it on the device so it never wins later.
            slots.release(u64::from(slot.0));
            let page = AlignedBuf::zeroed(PAGE);
            self.dev.write(self.meta_offset(*slot), page).await?;
        }
        if !stale.is_empty() {
            self.dev.flush().await?;
            tracing::warn!(
                count = stale.len(),
                "freed stale duplicate chunk claims at load"
            );
        }
        if self.corrupt_pages > 0 {
            tracing::warn!(
                count = self.corrupt_pages,
                "meta pages failed their checksum at load; their chunks are lost on this copy"
            );
        }
        let index = index
            .into_iter()
            .map(|(chunk, (slot, m))| {
                let generation = m.generation;
                let e = Entry {
                    slot,
                    meta: Mutex::new(m),
                    persisted: tokio::sync::Mutex::new(generation),
                };
                (chunk, Arc::new(e))
            })
            .collect();
        self.index = RwLock::new(index);
        self.slots = Mutex::new(slots);
        self.next_generation = AtomicU64::new(max_generation + 1);
        Ok(())
    }

    /// The device's geometry and identity.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// True if `open` formatted a blank device.
    pub fn was_formatted(&self) -> bool {
        self.formatted
    }

    /// Meta pages found corrupt when the store was opened.
    pub fn corrupt_pages_at_open(&self) -> u64 {
        self.corrupt_pages
    }

    /// Bytes of chunk space (slots x 1 MiB).
    pub fn capacity_bytes(&self) -> u64 {
        self.sb.slot_count * CHUNK_SIZE
    }

    /// Unallocated slots.
    pub fn free_slots(&self) -> u64 {
        lock(&self.slots).free
    }

    /// Allocated chunks.
    pub fn chunk_count(&self) -> usize {
        self.index.read().map(|i| i.len()).unwrap_or(0)
    }

    pub fn contains(&self, chunk: ChunkId) -> bool {
        self.entry(chunk).is_some()
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    fn entry(&self, chunk: ChunkId) -> Option<Arc<Entry>> {
        self.index.read().ok()?.get(&chunk).cloned()
    }

    fn meta_offset(&self, slot: SlotIndex) -> u64 {
        self.sb.meta_offset + u64::from(slot.0) * PAGE as u64
    }

    fn data_offset(&self, slot: SlotIndex, block: usize) -> u64 {
        self.sb.data_offset + u64::from(slot.0) * CHUNK_SIZE + (block * BLOCK) as u64
    }

    /// Allocate a slot for `chunk` unless it has one (in memory; the first write persists it).
    pub fn reserve(&self, chunk: ChunkId) -> Result<(), StoreError> {
        self.entry_or_allocate(chunk).map(|_| ())
    }

    fn entry_or_allocate(&self, chunk: ChunkId) -> Result<Arc<Entry>, StoreError> {
        if let Some(e) = self.entry(chunk) {
            return Ok(e);
        }
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = index.get(&chunk) {
            return Ok(e.clone());
        }
        let slot = lock(&self.slots).take().ok_or(StoreError::NoSpace)?;
        let e = Arc::new(Entry {
            slot: SlotIndex(slot as u32),
            meta: Mutex::new(ChunkMeta::new(chunk)),
            persisted: tokio::sync::Mutex::new(0),
        });
        index.insert(chunk, e.clone());
        Ok(e)
    }

    /// Read `len` bytes at `offset` of `chunk`. Unwritten blocks and unallocated chunks read as
    /// zeros; every written block is checked against its CRC.
    pub async fn read(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<Bytes, StoreError> {
        check_range(offset, u64::from(len))?;
        let n = len as usize;
        if n == 0 {
            return Ok(Bytes::new());
        }
        if !self.contains(chunk) {
            return Ok(Bytes::from_static(&ZEROS[..n]));
        }
        let (b0, b1) = blocks(offset, n);
        let _range = self.locks.lock(chunk, BlockMask::range(b0, b1)).await;
        let Some(entry) = self.entry(chunk) else {
            return Ok(Bytes::from_static(&ZEROS[..n]));
        };
        let (written, crcs) = {
            let m = lock(&entry.meta);
            (m.written, m.crcs)
        };
        let is_written = |b: usize| written[b / 64] & (1 << (b % 64)) != 0;
        if !(b0..b1).any(is_written) {
            return Ok(Bytes::from_static(&ZEROS[..n]));
        }
        let buf = self.dev.buffers().get((b1 - b0) * BLOCK).await;
        let buf = self.dev.read(self.data_offset(entry.slot, b0), buf).await?;
        let data = buf.as_slice();
        for b in (b0..b1).filter(|b| is_written(*b)) {
            let block = &data[(b - b0) * BLOCK..(b - b0 + 1) * BLOCK];
            if crc32fast::hash(block) != crcs[b] {
                return Err(StoreError::ChecksumMismatch {
                    chunk,
                    offset: (b * BLOCK) as u32,
                });
            }
        }
        let head = offset as usize - b0 * BLOCK;
        let mut out = BytesMut::with_capacity(n);
        out.extend_from_slice(&data[head..head + n]);
        for b in (b0..b1).filter(|b| !is_written(*b)) {
            let start = (b * BLOCK).max(offset as usize) - offset as usize;
            let end = ((b + 1) * BLOCK).min(offset as usize + n) - offset as usize;
            out[start..end].fill(0);
        }
        Ok(out.freeze())
    }

    /// Write `data` at `offset` of `chunk`, allocating the chunk on first write.
    pub async fn write(&self, chunk: ChunkId, offset: u32, data: &[u8]) -> Result<(), StoreError> {
        check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let (b0, b1) = blocks(offset, data.len());
        let _range = self.locks.lock(chunk, BlockMask::range(b0, b1)).await;
        let entry = self.entry_or_allocate(chunk)?;
        self.write_blocks(chunk, &entry, offset, Fill::Data(data), true)
            .await
    }

    /// Fill the blocks under `[offset, offset + fill.len())`: merge partial edge blocks with
    /// their old contents, update the CRCs in memory, then write the data (and, with
    /// `persist`, the meta page) in parallel. The caller holds the range lock.
    async fn write_blocks(
        &self,
        chunk: ChunkId,
        entry: &Entry,
        offset: u32,
        fill: Fill<'_>,
        persist: bool,
    ) -> Result<(), StoreError> {
        let len = fill.len();
        let (b0, b1) = blocks(offset, len);
        let n = b1 - b0;
        let head = offset as usize - b0 * BLOCK;
        let end = head + len;
        let mut buf = self.dev.buffers().get(n * BLOCK).await;
        if !head.is_multiple_of(BLOCK) {
            buf = self.load_block(chunk, entry, b0, buf, 0).await?;
        }
        if !end.is_multiple_of(BLOCK) && (n > 1 || head == 0) {
            buf = self.load_block(chunk, entry, b1 - 1, buf, n - 1).await?;
        }
        buf.set_window(0, n * BLOCK);
        {
            let dst = &mut buf.as_mut_slice()[head..end];
            match fill {
                Fill::Data(d) => dst.copy_from_slice(d),
                Fill::Zeros(_) => dst.fill(0),
            }
        }
        {
            let data = buf.as_slice();
            let mut m = lock(&entry.meta);
            for b in b0..b1 {
                let crc = crc32fast::hash(&data[(b - b0) * BLOCK..(b - b0 + 1) * BLOCK]);
                m.set_written(b, crc);
            }
            m.generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        }
        let write = self.dev.write(self.data_offset(entry.slot, b0), buf);
        if persist {
            let (w, p) = tokio::join!(write, self.persist(entry));
            w?;
            p
        } else {
            write.await?;
            Ok(())
        }
    }

    /// Put the old contents of `block` (verified) or zeros into block `at` of `buf`.
    async fn load_block(
        &self,
        chunk: ChunkId,
        entry: &Entry,
        block: usize,
        mut buf: AlignedBuf,
        at: usize,
    ) -> Result<AlignedBuf, StoreError> {
        buf.set_window(at * BLOCK, BLOCK);
        let crc = {
            let m = lock(&entry.meta);
            m.is_written(block).then(|| m.crcs[block])
        };
        let Some(crc) = crc else {
            buf.as_mut_slice().fill(0);
            return Ok(buf);
        };
        let buf = self
            .dev
            .read(self.data_offset(entry.slot, block), buf)
            .await?;
        if crc32fast::hash(buf.as_slice()) != crc {
            return Err(StoreError::ChecksumMismatch {
                chunk,
                offset: (block * BLOCK) as u32,
            });
        }
        Ok(buf)
    }

    /// Write the chunk's meta page unless a write that covers the current generation has
    /// completed; concurrent callers share one page write.
    async fn persist(&self, entry: &Entry) -> Result<(), StoreError> {
        let target = lock(&entry.meta).generation;
        let mut on_disk = entry.persisted.lock().await;
        if *on_disk >= target {
            return Ok(());
        }
        let mut page = self.dev.buffers().page().await;
        let generation = {
            let m = lock(&entry.meta);
            m.encode(page.as_mut_slice(), self.sb.device_uuid, entry.slot);
            m.generation
        };
        crate::failpoints::fail_point(crate::failpoints::CHUNK_STORE_BEFORE_META_WRITE);
        self.dev.write(self.meta_offset(entry.slot), page).await?;
        *on_disk = generation;
        Ok(())
    }

    /// Deallocate `[offset, offset + len)`: afterwards it reads as zeros. A chunk left without
    /// written blocks (a whole-chunk trim in particular) is freed.
    pub async fn trim(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<(), StoreError> {
        self.zero_range(chunk, offset, len).await
    }

    /// Make `[offset, offset + len)` read as zeros; the same operation as [`trim`](Self::trim)
    /// since unwritten blocks read as zeros.
    pub async fn write_zeroes(
        &self,
        chunk: ChunkId,
        offset: u32,
        len: u32,
    ) -> Result<(), StoreError> {
        self.zero_range(chunk, offset, len).await
    }

    async fn zero_range(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<(), StoreError> {
        check_range(offset, u64::from(len))?;
        if len == 0 || !self.contains(chunk) {
            return Ok(());
        }
        let _whole = self.locks.lock(chunk, BlockMask::all()).await;
        let Some(entry) = self.entry(chunk) else {
            return Ok(());
        };
        let (start, end) = (offset as usize, offset as usize + len as usize);
        let first_full = start.div_ceil(BLOCK);
        let end_full = end / BLOCK;
        // Partial edge blocks that hold data are rewritten with zeros in the range.
        let mut edges = Vec::with_capacity(2);
        if !start.is_multiple_of(BLOCK) {
            let b = start / BLOCK;
            edges.push((b, start, end.min((b + 1) * BLOCK)));
        }
        if !end.is_multiple_of(BLOCK)
            && (end / BLOCK != start / BLOCK || start.is_multiple_of(BLOCK))
        {
            let b = end / BLOCK;
            edges.push((b, (b * BLOCK).max(start), end));
        }
        for (b, s, e) in edges {
            if lock(&entry.meta).is_written(b) {
                self.write_blocks(chunk, &entry, s as u32, Fill::Zeros(e - s), false)
                    .await?;
            }
        }
        let empty = {
            let mut m = lock(&entry.meta);
            for b in first_full..end_full {
                m.clear_written(b);
            }
            m.generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            !m.any_written()
        };
        if empty {
            self.free(chunk, &entry).await
        } else {
            self.persist(&entry).await
        }
    }

    /// Free the chunk's slot: zero its meta page, discard its data, forget it. The caller holds
    /// the whole-chunk lock.
    async fn free(&self, chunk: ChunkId, entry: &Entry) -> Result<(), StoreError> {
        {
            let _on_disk = entry.persisted.lock().await;
            let mut page = self.dev.buffers().page().await;
            page.as_mut_slice().fill(0);
            self.dev.write(self.meta_offset(entry.slot), page).await?;
        }
        if let Err(e) = self
            .dev
            .discard(self.data_offset(entry.slot, 0), CHUNK_SIZE)
            .await
        {
            tracing::debug!(%chunk, "discard of a freed chunk failed: {e}");
        }
        if let Ok(mut index) = self.index.write() {
            index.remove(&chunk);
        }
        lock(&self.slots).release(u64::from(entry.slot.0));
        Ok(())
    }

    /// Make every completed write durable: data and meta pages are on the device already, so
    /// this is the device's fdatasync.
    pub async fn flush(&self) -> Result<(), StoreError> {
        Ok(self.dev.flush().await?)
    }

    /// One byte per chunk `first .. first + count` of `vtree`: 1 if allocated here.
    pub fn allocated(&self, vtree: VtreeId, first: u64, count: u32) -> Vec<u8> {
        let mut out = vec![0u8; count as usize];
        let Ok(index) = self.index.read() else {
            return out;
        };
        let lo = ChunkId {
            vtree,
            index: ChunkIndex(first),
        };
        let hi = ChunkId {
            vtree,
            index: ChunkIndex(first.saturating_add(u64::from(count))),
        };
        for c in index.range(lo..hi).map(|(c, _)| c) {
            if let Some(b) = out.get_mut((c.index.0 - first) as usize) {
                *b = 1;
            }
        }
        out
    }

    /// Every allocated chunk of `vtree`, ascending.
    pub fn chunks_of(&self, vtree: VtreeId) -> Vec<ChunkIndex> {
        let Ok(index) = self.index.read() else {
            return Vec::new();
        };
        let lo = ChunkId {
            vtree,
            index: ChunkIndex(0),
        };
        let hi = ChunkId {
            vtree,
            index: ChunkIndex(u64::MAX),
        };
        index.range(lo..=hi).map(|(c, _)| c.index).collect()
    }

    /// The written-block map and CRCs of a chunk (for tests and the scrubber).
    pub fn meta_of(&self, chunk: ChunkId) -> Option<ChunkMeta> {
        self.entry(chunk).map(|e| lock(&e.meta).clone())
    }

    /// Device offset of a chunk's block (for tests that corrupt it on purpose).
    pub fn block_offset(&self, chunk: ChunkId, block: usize) -> Option<u64> {
        let e = self.entry(chunk)?;
        (block < BLOCKS).then(|| self.data_offset(e.slot, block))
    }
}
