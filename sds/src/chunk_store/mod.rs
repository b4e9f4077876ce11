//! The chunk store: 1 MiB chunks keyed by [`ChunkId`] on one device, allocated on first write
//! (thin), with a CRC32 for every 4 KiB block, verified on every read; crash-consistent through
//! a write-ahead journal.
//!
//! PERFORMANCE-CRITICAL: every data request passes here; no logging above DEBUG per I/O.
//!
//! # On-disk layout, format version 3 ([`FORMAT_VERSION`])
//!
//! ```text
//! [0, 4 KiB)                     superblock
//! [4 KiB, 12 KiB)                journal checkpoint pages A and B
//! [12 KiB, meta_offset)          journal records (circular)   (journal: 1/16 of the device,
//!                                                              1 MiB to 64 MiB)
//! [meta_offset + i * 4 KiB)      meta page of slot i
//! [data_offset + i * 1 MiB)      data of slot i               (data_offset 1 MiB-aligned)
//! ```
//! All integers little-endian. Superblock: magic `"MBLKSDS\0"` (8), format version u32, block
//! size u32 (4096), chunk size u32 (1 MiB), reserved u32, device uuid u128, slot count u64, meta
//! offset u64, data offset u64, capacity at format u64, created (unix seconds) u64, journal
//! offset u64, journal length u64, zeros, and the CRC32 of bytes `[0, 4092)` in the last 4
//! bytes. Version 1 devices are refused. Version 2 devices (the same layout without `Relocate`
//! records) are opened and written as version 2: their whole-chunk writes are journaled, so an
//! SDS of version 2 can still open them. Meta pages, records and checkpoints carry
//! [`PAGE_FORMAT`] (2: unchanged since version 2).
//!
//! Meta page of a slot in use: magic `"MBCK"` u32, format version u32, device uuid u128, slot
//! index u32, reserved u32, vtree u64, chunk index u64 (its V-tree layer in the top 24 bits, 0 before
//! snapshots existed: `ChunkId::disk_index`), generation u64, reserved u64, "written"
//! bitmap (256 bits = 4 x u64: blocks written since allocation; the others read as zeros), 256
//! block CRC32s (1 KiB), zeros up to the page CRC32 in the last 4 bytes. A page that is zero, or
//! carries another device uuid (an earlier format of the same disk, or random bytes), is a free
//! slot. Of two pages claiming one chunk the higher generation wins at load.
//!
//! Journal record ([`RecordHeader`], [`journal`]): a 4 KiB header (magic `"MBJR"`, version,
//! device uuid, epoch, sequence number, kind Write/Trim/Free/Relocate, slot, chunk, first block,
//! block count, generation, payload CRC32, source slot of a Relocate, header CRC32) followed,
//! for a Write, by up to
//! [`MAX_RECORD_BLOCKS`] (a chunk; fewer on a small journal: [`journal::record_blocks`]) full
//! 4 KiB blocks (partial edges already merged with the verified old contents, so replay needs
//! nothing but the record), written as one device write at the head of the ring (or at its
//! start when it does not fit before the end; the device may merge records that arrive
//! together and continue each other, [`BlockDevice::write_log`]). Checkpoint page: count,
//! epoch, tail sequence and tail offset (the first record replay needs), CRC32; written
//! alternately to A and B, each only once the previous one is durable, so one is always intact
//! (the higher valid count wins).
//!
//! Opening a device: all zeros at the superblock = blank, formatted (checkpoint, flush, then
//! superblock); a superblock of another magic, version or a bad checksum = refused.
//!
//! # Writes, the overlay and the apply
//!
//! Every mutation (write, zeroing or trim of whole blocks, chunk free) appends a record and is
//! acknowledged once that write completed: it is durable after the next
//! [`flush`](ChunkStore::flush), as before. The record's blocks then sit in an in-memory overlay
//! (`pending`, per chunk, newest record wins per block) that reads and partial-block merges
//! prefer over the device. Nothing is written in place before the record is durable, because a
//! power loss drops or tears any write not covered by a completed flush, independently.
//!
//! [`flush`](ChunkStore::flush) waits for every record issued before the call (a record after
//! a lost one is never replayed), then runs an apply round under one device flush: the overlay
//! blocks of records an earlier flush made durable are written in place with the chunk's meta
//! page (new CRCs and written bits; a zero page and a discard for a free), together with the
//! checkpoint the previous round computed; then the device flush, which is the
//! acknowledgement point (it covers the new records, the in-place writes and that
//! checkpoint). The applied overlay entries are then dropped, and the next checkpoint is
//! computed: its tail is the oldest record still needed (an overlay block replaced by a newer,
//! not yet applied record keeps its older record needed). Journal space before the tail of a
//! durable checkpoint is reused. So a record is applied by the flush after the one that made
//! it durable: one device flush per client flush, as in version 1. A round also runs (with a
//! flush first) when the journal is more than half full (in a background task when the store
//! has one, [`ChunkStore::apply_in_background`], else in the write that crossed the mark),
//! when a record does not fit (then it also flushes its checkpoint at once, to reclaim space),
//! and when a slot is needed that a journaled free still holds (a freed slot is reused only
//! after its free is applied). [`apply_journal`](ChunkStore::apply_journal) applies everything
//! now. The overlay is bounded by the journal size; the store has no timer (the SDS's
//! background applier has one).
//!
//! # Whole-chunk writes go out of place
//!
//! A write of a whole chunk (offset 0, 1 MiB; sequential and large writes arrive so) on a
//! version 3 device skips the journal: its blocks go to a free slot, a device flush makes them
//! durable (concurrent ones share flushes), then a `Relocate` record (header only) says the
//! chunk now lives there with every block written and frees its old slot (not discarded: the
//! next relocation reuses it). The chunk's entry is replaced in memory when the record
//! completed; the new meta page and the old slot's free are written by the next applies, like
//! an allocation and a free. That is one device write of the data instead of two (journal and
//! apply), no copy of the chunk in the overlay, and 4 KiB of journal instead of 1 MiB. A chunk
//! with no data yet is written in its own slot.
//!
//! Replay of a `Relocate` reads the slot's blocks and takes their CRCs (later records of the
//! chunk, replayed after it, redo whatever changed since): correct only if no record replayed
//! before it writes into that slot. So the target slot must not be one whose previous chunk
//! was freed or moved away by a record a replay could still start before: a freed slot is
//! "recent" until a durable checkpoint's tail passes that record. Journaled writes may take a
//! recent slot (their records replay after the old ones), an out-of-place write may not; with
//! no clean slot free, the write is journaled.
//!
//! # Recovery
//!
//! `open` reads the best checkpoint and scans from its tail: each record must have a valid
//! header CRC, the checkpoint's epoch, the next sequence number and a valid payload CRC; the
//! first one that does not ends the scan (durability is in sequence order: a flush waits for
//! every earlier record, so nothing acknowledged-and-flushed lies beyond a torn or missing one).
//! The records are re-applied in order, which is idempotent: data blocks written in place, CRCs
//! recomputed, written bits set or cleared, a Write for a slot holding no page (or another
//! chunk's) allocates the chunk there, a Free drops the page, a Relocate drops the old slot's
//! page and gives the new slot a page with every block written and the CRCs of its content. A meta page that fails its CRC
//! but whose slot appears in a replayed record was torn by an interrupted apply: it is decoded
//! leniently, since the blocks that apply was changing are rewritten by replay and every other
//! CRC and bit is identical in the old and the new page. The touched pages are rewritten,
//! the device flushed, and a checkpoint starts a new random epoch at the ring's start (records
//! of earlier epochs are never taken for later ones). So after `open` every block reads its
//! newest durable content, or a later one, and never fails its checksum unless the media
//! corrupted it. A failed record write stops the store accepting writes and flushes (replay
//! would stop there), until it is reopened.
//!
//! # Concurrency
//!
//! Requests lock the 4 KiB blocks they touch ([`RangeLocks`]); trims lock the whole chunk. One
//! apply round runs at a time; it takes no range locks: reads of a block being applied are
//! served from the overlay until the in-place write completed. FUA:
//! [`write_fua`](ChunkStore::write_fua) is a write followed by a flush.
//!
//! In memory: about 1.1 KiB per allocated chunk (its meta page minus padding), so 1 TiB of
//! written data costs about 1.1 GiB of RAM, plus the overlay (at most the journal size);
//! opening reads every meta page (0.4% of the device) and the journal from its tail.

mod apply;
pub mod journal;
mod layout;
mod recovery;
mod write;

#[cfg(test)]
mod tests;

pub use journal::{Checkpoint, RecordHeader, RecordKind, MAX_RECORD_BLOCKS};
pub use layout::{
    ChunkMeta, MetaPage, SlotIndex, Superblock, SuperblockError, BLOCK, FORMAT_VERSION, PAGE,
};

use crate::device::{AlignedBuf, BlockDevice, BufferPool, DeviceError, PoolConfig};
use crate::range_lock::{BlockMask, RangeLocks, BLOCKS};
use bytes::{Bytes, BytesMut};
use proto::{ChunkId, ChunkIndex, LayerId, VtreeId, CHUNK_SIZE};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::Poll;

/// Meta pages read per device request while loading.
const LOAD_BATCH_PAGES: u64 = 256;

/// Slots held by frees not applied yet (chunks moved by whole-chunk writes, or freed) after
/// which a whole-chunk write runs an apply round with its checkpoint: those slots become
/// reusable (and clean) without waiting for the journal, which relocations barely fill.
const HELD_BEFORE_APPLY: u64 = 32;

/// Device writes an apply round keeps in flight at once.
const APPLY_PARALLEL: usize = 64;

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

/// A journaled change of one block not yet applied in place.
struct Pend {
    /// Record holding the newest content.
    seq: u64,
    /// Oldest record of this block not applied in place (replay must start at or before it).
    oldest: u64,
    /// The block's content, or `None` when trimmed.
    data: Option<Bytes>,
    crc: u32,
}

/// What a journal record does to its chunk's state besides its blocks.
enum Mark {
    Blocks,
    Free,
    Alloc,
    /// A `Relocate`: the record's entry (new, its blocks already durable in its slot) replaces
    /// `replaces` in the index; with `retire`, `replaces` keeps its own slot, which this record
    /// frees.
    Whole {
        replaces: Arc<Entry>,
        retire: bool,
    },
}

/// The state of one allocated chunk.
struct ChunkState {
    /// What the device holds (data and meta page) once in-flight applies completed.
    disk: ChunkMeta,
    /// Journaled blocks not yet applied: reads prefer them.
    pending: BTreeMap<usize, Pend>,
    /// Generation of the last change.
    generation: u64,
    /// Sequence number of the record that freed the chunk, until applied.
    free_seq: Option<u64>,
    /// Sequence number of the record that allocated the chunk without data (thick
    /// pre-allocation) or wrote it whole out of place, until its meta page is written in place.
    alloc_seq: Option<u64>,
    /// Freed because the chunk moved to another slot: the slot is not discarded (an
    /// out-of-place write reuses it soon, and the chunk's space is still in use).
    moved: bool,
}

impl ChunkState {
    fn is_written(&self, b: usize) -> bool {
        match self.pending.get(&b) {
            Some(p) => p.data.is_some(),
            None => self.disk.is_written(b),
        }
    }

    fn logical(&self) -> ChunkMeta {
        let mut m = self.disk.clone();
        for (b, p) in &self.pending {
            match p.data {
                Some(_) => m.set_written(*b, p.crc),
                None => m.clear_written(*b),
            }
        }
        m.generation = self.generation;
        m
    }
}

/// One allocated chunk.
struct Entry {
    slot: SlotIndex,
    state: Mutex<ChunkState>,
}

/// A record whose journal space is not reclaimed yet.
struct Rec {
    seq: u64,
    pos: u64,
    len: u64,
}

/// The journal's in-memory state.
struct JState {
    epoch: u64,
    next_seq: u64,
    /// Device offset where the next record goes (unless it has to wrap).
    head: u64,
    records: VecDeque<Rec>,
    used: u64,
    /// Completed records above `contiguous`.
    done: BTreeSet<u64>,
    /// Every record up to this one completed (and its blocks are in the overlay).
    contiguous: u64,
    /// Every record up to this one is durable (a device flush completed after it).
    durable: u64,
    ckpt_count: u64,
    ckpt_tail: u64,
    /// Tail of the newest durable checkpoint: replay after a crash starts at or after it.
    ckpt_durable: u64,
    /// Tail of a checkpoint written but not yet covered by a flush.
    ckpt_unflushed: Option<u64>,
    /// A checkpoint computed after an apply, written by the next round in parallel with its
    /// in-place writes (off the flush's critical path).
    ckpt_ready: Option<Checkpoint>,
    /// The first record whose write failed: replay would stop there, so nothing after it may
    /// be acknowledged or applied.
    failed: Option<u64>,
}

impl JState {
    /// Where a record of `len` bytes fits in `[start, end)`, if it does.
    fn place(&self, len: u64, start: u64, end: u64) -> Option<u64> {
        match self.records.front() {
            None if self.head + len <= end => Some(self.head),
            None => (start + len <= end).then_some(start),
            Some(t) if self.head >= t.pos => {
                if self.head + len <= end {
                    Some(self.head)
                } else {
                    (start + len < t.pos).then_some(start)
                }
            }
            Some(t) => (self.head + len < t.pos).then_some(self.head),
        }
    }

    fn reclaim(&mut self, tail: u64) {
        while self.records.front().is_some_and(|r| r.seq < tail) {
            if let Some(r) = self.records.pop_front() {
                self.used -= r.len;
            }
        }
    }
}

/// Run futures concurrently and wait for all of them (no `futures` crate in this crate).
async fn join_all<T>(futs: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut futs = futs;
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => all = false,
                }
            }
        }
        if all {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// The failure [`ChunkStore`] reports once a journal write failed.
fn failed() -> StoreError {
    StoreError::Device(DeviceError::Stopped)
}

/// Slot allocation bitmap, first fit: the lowest free slots are reused first, so a device's
/// written footprint stays close to what it stores even though whole-chunk writes move
/// chunks between slots (what matters on thin-provisioned devices and sparse files).
struct Slots {
    used: Vec<u64>,
    count: u64,
    free: u64,
    /// Slots of freed chunks whose free is not applied yet: counted as free, not reusable.
    held: u64,
    /// Free slots whose last chunk was freed or moved away by the record of this sequence
    /// number. Until a durable checkpoint's tail passes it, a replay may still write that
    /// chunk's older records into the slot: a journaled write may take the slot (its records
    /// replay after those), an out-of-place write may not (nothing would rewrite its blocks).
    recent: HashMap<u64, u64>,
}

impl Slots {
    fn new(count: u64) -> Slots {
        Slots {
            used: vec![0; count.div_ceil(64) as usize],
            count,
            free: count,
            held: 0,
            recent: HashMap::new(),
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

    fn hold(&mut self) {
        self.held += 1;
    }

    /// The free of slot `s` by the record `seq` is applied: the slot is free again.
    fn unhold(&mut self, s: u64, seq: u64) {
        self.held = self.held.saturating_sub(1);
        self.release(s);
        let last = self.recent.entry(s).or_insert(seq);
        *last = (*last).max(seq);
    }

    /// Whether no record replayed from a checkpoint of tail `tail` touches slot `s` for an
    /// earlier chunk.
    fn clean(&self, s: u64, tail: u64) -> bool {
        self.recent.get(&s).is_none_or(|seq| *seq < tail)
    }

    /// Take the lowest free slot that no replay from `tail` touches for an earlier chunk, else
    /// (unless `clean_only`) the lowest free one.
    fn take(&mut self, tail: u64, clean_only: bool) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        self.recent.retain(|_, seq| *seq >= tail);
        let mut fallback = None;
        for wi in 0..self.used.len() as u64 {
            let mut free = !self.used[wi as usize];
            while free != 0 {
                let s = wi * 64 + u64::from(free.trailing_zeros());
                free &= free - 1;
                if s >= self.count {
                    break;
                }
                if self.clean(s, tail) {
                    self.mark(s);
                    return Some(s);
                }
                fallback.get_or_insert(s);
            }
        }
        let s = fallback.filter(|_| !clean_only)?;
        self.mark(s);
        Some(s)
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
    replayed: u64,
    journal: Mutex<JState>,
    /// Signalled when records complete or journal space is reclaimed.
    progress: tokio::sync::Notify,
    /// Chunks with journaled changes not applied in place, by slot.
    dirty: Mutex<HashMap<SlotIndex, Arc<Entry>>>,
    /// One apply round at a time.
    apply_lock: tokio::sync::Mutex<()>,
    /// Buffers for in-place writes. Applying must never wait on the device's pool: writers
    /// waiting for journal space hold those buffers until an apply reclaims the space.
    apply_bufs: BufferPool,
    /// Device flushes of out-of-place writes, one at a time ([`Self::barrier`]): started and
    /// completed counts.
    barrier_lock: tokio::sync::Mutex<()>,
    barriers_started: AtomicU64,
    barriers_done: AtomicU64,
    /// Whole-chunk writes that went out of place.
    whole_writes: AtomicU64,
    /// Where an apply the writes call for (journal half full, many slots held) is asked of a
    /// background task ([`ChunkStore::apply_in_background`]); without one, the write that
    /// notices runs it before it returns.
    applier: Option<Arc<tokio::sync::Notify>>,
}

/// The apply pool: about 12 MiB per device.
fn apply_pool_config() -> PoolConfig {
    PoolConfig {
        data_classes: vec![(4 << 10, 64), (64 << 10, 32), (256 << 10, 8), (1 << 20, 8)],
        pages: 0,
    }
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

/// Where a block's content comes from for a read.
enum Src {
    Zero,
    Mem(Bytes),
    Dev(u32),
}

/// One chunk's share of an apply round.
struct Plan {
    entry: Arc<Entry>,
    /// Blocks applied and the record each came from.
    blocks: Vec<(usize, u64)>,
    /// The meta page after the round; `None` frees the slot.
    page: Option<ChunkMeta>,
    /// Discard a freed slot's data (not when its chunk moved to another slot).
    discard: bool,
    /// Runs of consecutive blocks with data: first block and bytes.
    runs: Vec<(usize, Vec<Bytes>)>,
}

impl<D: BlockDevice> ChunkStore<D> {
    /// The journal's fill: bytes its records not yet applied and reclaimed take, of the bytes
    /// the ring holds. Writes wait for room once it is full; the apply frees it.
    pub fn journal_fill(&self) -> (u64, u64) {
        let (start, end) = self.ring();
        (lock(&self.journal).used, end.saturating_sub(start))
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

    /// Journal records replayed when the store was opened.
    pub fn replayed_at_open(&self) -> u64 {
        self.replayed
    }

    /// Whether some journaled change (blocks, a free, an allocation) is not applied in place.
    pub fn unapplied(&self) -> bool {
        !lock(&self.dirty).is_empty()
    }

    /// Blocks journaled but not yet applied in place (served from memory).
    pub fn overlay_blocks(&self) -> usize {
        lock(&self.dirty)
            .values()
            .map(|e| lock(&e.state).pending.len())
            .sum()
    }

    /// Bytes of chunk space (slots x 1 MiB).
    pub fn capacity_bytes(&self) -> u64 {
        self.sb.slot_count * CHUNK_SIZE
    }

    /// Unallocated slots (including those of freed chunks whose free is not applied yet).
    pub fn free_slots(&self) -> u64 {
        let s = lock(&self.slots);
        s.free + s.held
    }

    /// Allocated chunks.
    pub fn chunk_count(&self) -> usize {
        self.index.read().map(|i| i.len()).unwrap_or(0)
    }

    pub fn contains(&self, chunk: ChunkId) -> bool {
        self.entry(chunk).is_some()
    }

    /// Whether `chunk` is held by a journal record or a meta page, not only by a slot reserved
    /// in memory for its first write ([`reserve`](Self::reserve), generation 0): such a slot is
    /// lost at a restart, so a pre-allocation must still record it.
    fn recorded(&self, chunk: ChunkId) -> bool {
        self.entry(chunk).is_some_and(|e| {
            let st = lock(&e.state);
            st.generation != 0 || !st.pending.is_empty() || st.disk.any_written()
        })
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
    /// When the only free slots are held by journaled frees, the first write allocates (after
    /// applying them).
    pub fn reserve(&self, chunk: ChunkId) -> Result<(), StoreError> {
        match self.entry_or_allocate(chunk) {
            Err(StoreError::NoSpace) if lock(&self.slots).held > 0 => Ok(()),
            r => r.map(|_| ()),
        }
    }

    fn entry_or_allocate(&self, chunk: ChunkId) -> Result<Arc<Entry>, StoreError> {
        if let Some(e) = self.entry(chunk) {
            return Ok(e);
        }
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = index.get(&chunk) {
            return Ok(e.clone());
        }
        let tail = lock(&self.journal).ckpt_durable;
        let slot = lock(&self.slots)
            .take(tail, false)
            .ok_or(StoreError::NoSpace)?;
        let e = Arc::new(Entry {
            slot: SlotIndex(slot as u32),
            state: Mutex::new(ChunkState {
                disk: ChunkMeta::new(chunk),
                pending: BTreeMap::new(),
                generation: 0,
                free_seq: None,
                alloc_seq: None,
                moved: false,
            }),
        });
        index.insert(chunk, e.clone());
        Ok(e)
    }

    /// [`entry_or_allocate`](Self::entry_or_allocate), applying pending frees when the only
    /// free slots are theirs.
    async fn entry_or_allocate_applying(&self, chunk: ChunkId) -> Result<Arc<Entry>, StoreError> {
        match self.entry_or_allocate(chunk) {
            Err(StoreError::NoSpace) if lock(&self.slots).held > 0 => {
                self.apply_round(true, true).await?;
                self.entry_or_allocate(chunk)
            }
            r => r,
        }
    }

    /// Read `len` bytes at `offset` of `chunk`. Unwritten blocks and unallocated chunks read as
    /// zeros; journaled blocks not applied yet come from memory; every block read from the
    /// device is checked against its CRC.
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
        let srcs: Vec<Src> = {
            let st = lock(&entry.state);
            (b0..b1)
                .map(|b| match st.pending.get(&b) {
                    Some(Pend { data: Some(d), .. }) => Src::Mem(d.clone()),
                    Some(Pend { data: None, .. }) => Src::Zero,
                    None if st.disk.is_written(b) => Src::Dev(st.disk.crcs[b]),
                    None => Src::Zero,
                })
                .collect()
        };
        if srcs.iter().all(|s| matches!(s, Src::Zero)) {
            return Ok(Bytes::from_static(&ZEROS[..n]));
        }
        let data = if srcs.iter().any(|s| matches!(s, Src::Dev(_))) {
            let buf = self.dev.buffers().get((b1 - b0) * BLOCK).await;
            Some(self.dev.read(self.data_offset(entry.slot, b0), buf).await?)
        } else {
            None
        };
        let mut out = BytesMut::with_capacity(n);
        out.resize(n, 0);
        let (lo, hi) = (offset as usize, offset as usize + n);
        for (i, src) in srcs.iter().enumerate() {
            let b = b0 + i;
            let block: &[u8] = match src {
                Src::Zero => continue,
                Src::Mem(d) => d,
                Src::Dev(crc) => {
                    let Some(block) = data
                        .as_ref()
                        .and_then(|d| d.as_slice().get(i * BLOCK..(i + 1) * BLOCK))
                    else {
                        continue;
                    };
                    if crc32fast::hash(block) != *crc {
                        return Err(StoreError::ChecksumMismatch {
                            chunk,
                            offset: (b * BLOCK) as u32,
                        });
                    }
                    block
                }
            };
            let (s, e) = ((b * BLOCK).max(lo), ((b + 1) * BLOCK).min(hi));
            out[s - lo..e - lo].copy_from_slice(&block[s - b * BLOCK..e - b * BLOCK]);
        }
        Ok(out.freeze())
    }

    /// Deallocate `[offset, offset + len)`: afterwards it reads as zeros. A chunk left without
    /// written blocks (a whole-chunk trim in particular) is freed.
    pub async fn trim(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<(), StoreError> {
        self.zero_range(chunk, offset, len, false).await
    }

    /// Make `[offset, offset + len)` read as zeros but keep the chunk allocated even if no
    /// written block is left (thick volumes keep their chunks).
    pub async fn zero_keeping(
        &self,
        chunk: ChunkId,
        offset: u32,
        len: u32,
    ) -> Result<(), StoreError> {
        self.zero_range(chunk, offset, len, true).await
    }

    /// Make `[offset, offset + len)` read as zeros; the same operation as [`trim`](Self::trim)
    /// since unwritten blocks read as zeros.
    pub async fn write_zeroes(
        &self,
        chunk: ChunkId,
        offset: u32,
        len: u32,
    ) -> Result<(), StoreError> {
        self.zero_range(chunk, offset, len, false).await
    }

    async fn zero_range(
        &self,
        chunk: ChunkId,
        offset: u32,
        len: u32,
        keep: bool,
    ) -> Result<(), StoreError> {
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
        let end_full = (end / BLOCK).max(first_full);
        let (remaining, full_written) = {
            let st = lock(&entry.state);
            let remaining = (0..BLOCKS)
                .filter(|b| *b < first_full || *b >= end_full)
                .any(|b| st.is_written(b));
            let full: Vec<usize> = (first_full..end_full)
                .filter(|b| st.is_written(*b))
                .collect();
            (remaining, full)
        };
        if !remaining && !keep {
            return self.free(chunk, &entry).await;
        }
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
            if lock(&entry.state).is_written(b) {
                self.write_blocks(chunk, &entry, s as u32, Fill::Zeros(e - s))
                    .await?;
            }
        }
        if full_written.is_empty() {
            return Ok(());
        }
        let (header, page) = self
            .empty_record(
                RecordKind::Trim,
                chunk,
                entry.slot,
                first_full as u32,
                (end_full - first_full) as u32,
            )
            .await;
        let changes = full_written.into_iter().map(|b| (b, None)).collect();
        self.append(header, page, &entry, changes, Mark::Blocks)
            .await
    }

    /// A record without payload (allocation, trim, free) and its header page.
    async fn empty_record(
        &self,
        kind: RecordKind,
        chunk: ChunkId,
        slot: SlotIndex,
        first: u32,
        count: u32,
    ) -> (RecordHeader, AlignedBuf) {
        let header = RecordHeader {
            epoch: 0,
            seq: 0,
            kind,
            chunk,
            slot,
            from: slot,
            first,
            count,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            payload_crc: crc32fast::hash(&[]),
        };
        (header, self.dev.buffers().page().await)
    }

    /// Forget every chunk in memory, writing nothing: for a store on a failed device whose
    /// copies the MDM has dropped (none of them may be read again; the device takes no I/O).
    /// Returns how many were forgotten.
    pub fn forget_all(&self) -> usize {
        let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
        let n = index.len();
        index.clear();
        n
    }

    /// Free the chunk's slot: journal the free and forget the chunk; the slot is reused once
    /// the free is applied. The caller holds the whole-chunk lock.
    async fn free(&self, chunk: ChunkId, entry: &Arc<Entry>) -> Result<(), StoreError> {
        lock(&self.slots).hold();
        if let Ok(mut index) = self.index.write() {
            index.remove(&chunk);
        }
        let (header, page) = self
            .empty_record(RecordKind::Free, chunk, entry.slot, 0, 0)
            .await;
        self.append(header, page, entry, Vec::new(), Mark::Free)
            .await?;
        if lock(&self.slots).free == 0 {
            // Every other slot is in use: make this one reusable now.
            self.apply_round(true, true).await?;
        }
        Ok(())
    }

    /// Byte offsets of the written blocks of `chunk` on the device whose data fails its CRC
    /// (blocks in the journal overlay are in memory and not checked). Reads the chunk under its
    /// whole-chunk lock.
    pub async fn scrub_chunk(&self, chunk: ChunkId) -> Result<Vec<u32>, StoreError> {
        if !self.contains(chunk) {
            return Ok(Vec::new());
        }
        let _whole = self.locks.lock(chunk, BlockMask::all()).await;
        let Some(entry) = self.entry(chunk) else {
            return Ok(Vec::new());
        };
        let check: Vec<(usize, u32)> = {
            let st = lock(&entry.state);
            (0..BLOCKS)
                .filter(|b| !st.pending.contains_key(b) && st.disk.is_written(*b))
                .map(|b| (b, st.disk.crcs[b]))
                .collect()
        };
        if check.is_empty() {
            return Ok(Vec::new());
        }
        let buf = AlignedBuf::zeroed(CHUNK_SIZE as usize);
        let buf = self.dev.read(self.data_offset(entry.slot, 0), buf).await?;
        let data = buf.as_slice();
        Ok(check
            .into_iter()
            .filter(|(b, crc)| {
                data.get(b * BLOCK..(b + 1) * BLOCK)
                    .is_none_or(|block| crc32fast::hash(block) != *crc)
            })
            .map(|(b, _)| (b * BLOCK) as u32)
            .collect())
    }

    /// One byte per chunk `first .. first + count` (of `first`'s tree and layer): 1 if
    /// allocated here.
    pub fn allocated(&self, first: ChunkId, count: u32) -> Vec<u8> {
        let mut out = vec![0u8; count as usize];
        let Ok(index) = self.index.read() else {
            return out;
        };
        let hi = ChunkId {
            index: ChunkIndex(first.index.0.saturating_add(u64::from(count))),
            ..first
        };
        for c in index.range(first..hi).map(|(c, _)| c) {
            if let Some(b) = out.get_mut((c.index.0 - first.index.0) as usize) {
                *b = 1;
            }
        }
        out
    }

    /// Every allocated chunk, ascending.
    pub fn chunks(&self) -> Vec<ChunkId> {
        self.index
            .read()
            .map(|i| i.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Every allocated chunk of `vtree`, every layer, ascending.
    pub fn chunks_of(&self, vtree: VtreeId) -> Vec<ChunkId> {
        let Ok(index) = self.index.read() else {
            return Vec::new();
        };
        let lo = ChunkId::new(vtree, ChunkIndex(0)).in_layer(LayerId(0));
        let hi = ChunkId::new(vtree, ChunkIndex(u64::MAX)).in_layer(LayerId(u32::MAX));
        index.range(lo..=hi).map(|(c, _)| *c).collect()
    }

    /// The written-block map and CRCs of a chunk as reads see them (for tests and the
    /// scrubber).
    pub fn meta_of(&self, chunk: ChunkId) -> Option<ChunkMeta> {
        self.entry(chunk).map(|e| lock(&e.state).logical())
    }

    /// Device offset of a chunk's block (for tests that corrupt it on purpose).
    pub fn block_offset(&self, chunk: ChunkId, block: usize) -> Option<u64> {
        let e = self.entry(chunk)?;
        (block < BLOCKS).then(|| self.data_offset(e.slot, block))
    }
}
