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

pub mod journal;
mod layout;

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
    /// Open the store on `dev`: format a blank device (all zeros at the superblock), refuse a
    /// foreign or unsupported one, replay the journal and load the allocation map.
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
            replayed: 0,
            journal: Mutex::new(JState {
                epoch: 0,
                next_seq: 1,
                head: sb.journal_offset + 2 * PAGE as u64,
                records: VecDeque::new(),
                used: 0,
                done: BTreeSet::new(),
                contiguous: 0,
                durable: 0,
                ckpt_count: 0,
                ckpt_tail: 1,
                ckpt_durable: 1,
                ckpt_unflushed: None,
                ckpt_ready: None,
                failed: None,
            }),
            progress: tokio::sync::Notify::new(),
            dirty: Mutex::new(HashMap::new()),
            apply_bufs: BufferPool::new(&apply_pool_config()),
            apply_lock: tokio::sync::Mutex::new(()),
            barrier_lock: tokio::sync::Mutex::new(()),
            barriers_started: AtomicU64::new(0),
            barriers_done: AtomicU64::new(0),
            whole_writes: AtomicU64::new(0),
            applier: None,
        };
        if blank {
            // The checkpoint is durable before the superblock that points at it.
            let ck = Checkpoint {
                count: 0,
                epoch: rand::random::<u64>(),
                tail_seq: 1,
                tail_pos: store.ring().0,
            };
            store.write_checkpoint(ck).await?;
            store.dev.flush().await?;
            store.start_epoch(ck);
            let mut page = page;
            sb.encode(page.as_mut_slice());
            store.dev.write(0, page).await?;
            store.dev.flush().await?;
        } else {
            store.load().await?;
        }
        Ok(store)
    }

    /// The record area of the journal: `[start, end)` device offsets.
    fn ring(&self) -> (u64, u64) {
        (
            self.sb.journal_offset + 2 * PAGE as u64,
            self.sb.journal_offset + self.sb.journal_len,
        )
    }

    async fn write_checkpoint(&self, ck: Checkpoint) -> Result<(), StoreError> {
        let mut page = AlignedBuf::zeroed(PAGE);
        ck.encode(page.as_mut_slice(), self.sb.device_uuid);
        let at = self.sb.journal_offset + (ck.count % 2) * PAGE as u64;
        self.dev.write(at, page).await?;
        Ok(())
    }

    /// Reset the in-memory journal to an empty one starting at `ck` (durable).
    fn start_epoch(&self, ck: Checkpoint) {
        let mut j = lock(&self.journal);
        j.epoch = ck.epoch;
        j.next_seq = ck.tail_seq;
        j.head = ck.tail_pos;
        j.records.clear();
        j.used = 0;
        j.done.clear();
        j.contiguous = ck.tail_seq - 1;
        j.durable = ck.tail_seq - 1;
        j.ckpt_count = ck.count;
        j.ckpt_tail = ck.tail_seq;
        j.ckpt_durable = ck.tail_seq;
        j.ckpt_unflushed = None;
        j.ckpt_ready = None;
        j.failed = None;
    }

    /// The valid checkpoint with the higher count.
    async fn read_checkpoint(&self) -> Result<Checkpoint, StoreError> {
        let buf = AlignedBuf::zeroed(2 * PAGE);
        let buf = self.dev.read(self.sb.journal_offset, buf).await?;
        buf.as_slice()
            .chunks_exact(PAGE)
            .filter_map(|p| Checkpoint::decode(p, self.sb.device_uuid))
            .filter(|c| c.tail_seq > 0)
            .max_by_key(|c| c.count)
            .ok_or(StoreError::Superblock(SuperblockError::NoCheckpoint))
    }

    /// The records replay needs: from the checkpoint's tail, each intact (header and payload
    /// CRC), of the checkpoint's epoch and the next sequence number, until one is not.
    async fn scan(&self, ck: Checkpoint) -> Result<Vec<(RecordHeader, Bytes)>, StoreError> {
        let (start, end) = self.ring();
        let mut out = Vec::new();
        let (mut pos, mut seq, mut scanned) = (ck.tail_pos, ck.tail_seq, 0u64);
        while scanned <= end - start {
            let mut found = None;
            for (i, at) in [pos, start].into_iter().enumerate() {
                if (i == 1 && pos == start) || at < start || at + PAGE as u64 > end {
                    continue;
                }
                let head = self.dev.read(at, AlignedBuf::zeroed(PAGE)).await?;
                match RecordHeader::decode(head.as_slice(), self.sb.device_uuid) {
                    Some(h)
                        if h.epoch == ck.epoch
                            && u64::from(h.slot.0) < self.sb.slot_count
                            && u64::from(h.from.0) < self.sb.slot_count
                            && h.seq == seq
                            && at + (PAGE + h.payload_len()) as u64 <= end =>
                    {
                        found = Some((at, h));
                        break;
                    }
                    _ => {}
                }
            }
            let Some((at, h)) = found else { break };
            let n = h.payload_len();
            let payload = if n > 0 {
                let buf = self
                    .dev
                    .read(at + PAGE as u64, AlignedBuf::zeroed(n))
                    .await?;
                if crc32fast::hash(buf.as_slice()) != h.payload_crc {
                    break;
                }
                Bytes::copy_from_slice(buf.as_slice())
            } else {
                Bytes::new()
            };
            out.push((h, payload));
            pos = at + (PAGE + n) as u64;
            seq += 1;
            scanned += (PAGE + n) as u64;
        }
        Ok(out)
    }

    /// Replay the journal, read every meta page and rebuild the index, the slot bitmap and the
    /// generation counter.
    async fn load(&mut self) -> Result<(), StoreError> {
        let ck = self.read_checkpoint().await?;
        let records = self.scan(ck).await?;
        let touched: BTreeSet<SlotIndex> =
            records.iter().flat_map(|(h, _)| [h.slot, h.from]).collect();
        let mut pages: BTreeMap<SlotIndex, ChunkMeta> = BTreeMap::new();
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
                    MetaPage::Corrupt if touched.contains(&slot) => {
                        // Torn by a crash during an apply that the replay below redoes.
                        if let Some(m) = ChunkMeta::decode_lenient(page, self.sb.device_uuid, slot)
                        {
                            pages.insert(slot, m);
                        }
                    }
                    MetaPage::Corrupt => self.corrupt_pages += 1,
                    MetaPage::Version(found) => {
                        return Err(StoreError::MetaVersion {
                            slot: slot.0,
                            found,
                        })
                    }
                    MetaPage::InUse(m) => {
                        max_generation = max_generation.max(m.generation);
                        pages.insert(slot, *m);
                    }
                }
            }
            first += n;
        }

        // Replay in sequence order: idempotent, so records already applied are harmless.
        let mut last = ck.tail_seq.saturating_sub(1);
        for (h, payload) in &records {
            last = h.seq;
            max_generation = max_generation.max(h.generation);
            let slot = h.slot;
            match h.kind {
                RecordKind::Write => {
                    let m = pages.entry(slot).or_insert_with(|| ChunkMeta::new(h.chunk));
                    if m.chunk != h.chunk {
                        *m = ChunkMeta::new(h.chunk);
                    }
                    for (i, block) in payload.chunks_exact(BLOCK).enumerate() {
                        m.set_written(h.first as usize + i, crc32fast::hash(block));
                    }
                    m.generation = m.generation.max(h.generation);
                    if !payload.is_empty() {
                        let mut buf = AlignedBuf::zeroed(payload.len());
                        buf.as_mut_slice().copy_from_slice(payload);
                        self.dev
                            .write(self.data_offset(slot, h.first as usize), buf)
                            .await?;
                    }
                }
                RecordKind::Trim => {
                    if let Some(m) = pages.get_mut(&slot).filter(|m| m.chunk == h.chunk) {
                        for b in h.first..h.first + h.count {
                            m.clear_written(b as usize);
                        }
                        m.generation = m.generation.max(h.generation);
                    }
                }
                RecordKind::Free => {
                    if pages.get(&slot).is_some_and(|m| m.chunk == h.chunk) {
                        pages.remove(&slot);
                    }
                }
                RecordKind::Relocate => {
                    if h.from != slot && pages.get(&h.from).is_some_and(|m| m.chunk == h.chunk) {
                        pages.remove(&h.from);
                    }
                    // The blocks were durable before the record was written; later records
                    // of the chunk in this replay rewrite whatever they changed since.
                    let data = self
                        .dev
                        .read(
                            self.data_offset(slot, 0),
                            AlignedBuf::zeroed(CHUNK_SIZE as usize),
                        )
                        .await?;
                    let mut m = ChunkMeta::new(h.chunk);
                    for (b, block) in data.as_slice().chunks_exact(BLOCK).enumerate() {
                        m.set_written(b, crc32fast::hash(block));
                    }
                    m.generation = h.generation;
                    pages.insert(slot, m);
                }
            }
        }
        for slot in &touched {
            let mut page = AlignedBuf::zeroed(PAGE);
            if let Some(m) = pages.get(slot) {
                m.encode(page.as_mut_slice(), self.sb.device_uuid, *slot);
            }
            self.dev.write(self.meta_offset(*slot), page).await?;
        }
        if !records.is_empty() {
            tracing::info!(
                records = records.len(),
                chunks = touched.len(),
                "replayed the journal"
            );
        }
        self.replayed = records.len() as u64;

        // Claims of one chunk by two slots: the later generation wins.
        let mut index: BTreeMap<ChunkId, (SlotIndex, ChunkMeta)> = BTreeMap::new();
        let mut slots = Slots::new(self.sb.slot_count);
        let mut stale = Vec::new();
        for (slot, m) in pages {
            let chunk = m.chunk;
            let older = match index.get(&chunk) {
                Some((_, om)) if om.generation >= m.generation => Some(slot),
                Some((other, _)) => Some(*other),
                None => None,
            };
            if older != Some(slot) {
                slots.mark(u64::from(slot.0));
                index.insert(chunk, (slot, m));
            }
            stale.extend(older);
        }
        for slot in &stale {
            // The older claim of a chunk: free it on the device so it never wins later.
            slots.release(u64::from(slot.0));
            let page = AlignedBuf::zeroed(PAGE);
            self.dev.write(self.meta_offset(*slot), page).await?;
        }
        if !stale.is_empty() {
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
        // Everything replayed is in place and durable before the checkpoint moves past it; a
        // new epoch starts an empty journal.
        self.dev.flush().await?;
        let next = Checkpoint {
            count: ck.count + 1,
            epoch: rand::random::<u64>(),
            tail_seq: last + 1,
            tail_pos: self.ring().0,
        };
        self.write_checkpoint(next).await?;
        self.dev.flush().await?;
        self.start_epoch(next);

        let index = index
            .into_iter()
            .map(|(chunk, (slot, m))| {
                let e = Entry {
                    slot,
                    state: Mutex::new(ChunkState {
                        generation: m.generation,
                        disk: m,
                        pending: BTreeMap::new(),
                        free_seq: None,
                        alloc_seq: None,
                        moved: false,
                    }),
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

    /// Write `data` at `offset` of `chunk`, allocating the chunk on first write. Returns when
    /// the journal record is on the device (durable after the next [`flush`](Self::flush)).
    pub async fn write(&self, chunk: ChunkId, offset: u32, data: &[u8]) -> Result<(), StoreError> {
        check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let (b0, b1) = blocks(offset, data.len());
        let _range = self.locks.lock(chunk, BlockMask::range(b0, b1)).await;
        if offset == 0
            && data.len() as u64 == CHUNK_SIZE
            && self.sb.version >= 3
            && self.write_whole(chunk, data).await?
        {
            return Ok(());
        }
        let entry = self.entry_or_allocate_applying(chunk).await?;
        let (start, end) = (offset as usize, offset as usize + data.len());
        let per_record = journal::record_blocks(self.sb.journal_len);
        let mut at = start;
        while at < end {
            let piece_end = end.min((at / BLOCK + per_record) * BLOCK);
            let piece = Fill::Data(&data[at - start..piece_end - start]);
            self.write_blocks(chunk, &entry, at as u32, piece).await?;
            at = piece_end;
        }
        Ok(())
    }

    /// Write a whole chunk out of place (the caller holds the whole-chunk lock): the blocks go
    /// to a slot no replayable record touches for an earlier chunk (the chunk's own slot if it
    /// holds no data yet), a device flush makes them durable, then a `Relocate` record moves
    /// the chunk there and frees its old slot. Half the device bytes of a journaled write (no
    /// copy in the journal, no apply) and no copy in memory. False, having changed nothing,
    /// when no such slot is free: the caller journals the write instead.
    async fn write_whole(&self, chunk: ChunkId, data: &[u8]) -> Result<bool, StoreError> {
        if lock(&self.journal).failed.is_some() {
            return Err(failed());
        }
        let old = self.entry_or_allocate_applying(chunk).await?;
        let tail = lock(&self.journal).ckpt_durable;
        let empty = {
            let st = lock(&old.state);
            st.pending.is_empty() && st.free_seq.is_none() && !st.disk.any_written()
        };
        let taken = {
            let mut slots = lock(&self.slots);
            if empty && slots.clean(u64::from(old.slot.0), tail) {
                None
            } else {
                match slots.take(tail, true) {
                    Some(s) => Some(SlotIndex(s as u32)),
                    None => return Ok(false),
                }
            }
        };
        let slot = taken.unwrap_or(old.slot);
        let r = self.write_whole_to(chunk, &old, slot, data).await;
        if r.is_err() {
            if let Some(s) = taken {
                lock(&self.slots).release(u64::from(s.0));
            }
        }
        r.map(|()| true)
    }

    async fn write_whole_to(
        &self,
        chunk: ChunkId,
        old: &Arc<Entry>,
        slot: SlotIndex,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let mut meta = ChunkMeta::new(chunk);
        for (b, block) in data.chunks_exact(BLOCK).enumerate() {
            meta.set_written(b, crc32fast::hash(block));
        }
        let mut buf = self.dev.buffers().get(data.len()).await;
        buf.as_mut_slice().copy_from_slice(data);
        self.dev.write(self.data_offset(slot, 0), buf).await?;
        self.barrier().await?;
        crate::failpoints::fail_point(crate::failpoints::CHUNK_STORE_BEFORE_RELOCATE_RECORD);
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        meta.generation = generation;
        let header = RecordHeader {
            epoch: 0,
            seq: 0,
            kind: RecordKind::Relocate,
            chunk,
            slot,
            from: old.slot,
            first: 0,
            count: BLOCKS as u32,
            generation,
            payload_crc: crc32fast::hash(&[]),
        };
        let entry = Arc::new(Entry {
            slot,
            state: Mutex::new(ChunkState {
                disk: meta,
                pending: BTreeMap::new(),
                generation,
                free_seq: None,
                alloc_seq: None,
                moved: false,
            }),
        });
        let page = self.dev.buffers().page().await;
        let mark = Mark::Whole {
            replaces: old.clone(),
            retire: slot != old.slot,
        };
        self.append(header, page, &entry, Vec::new(), mark).await?;
        self.whole_writes.fetch_add(1, Ordering::Relaxed);
        if lock(&self.slots).held >= HELD_BEFORE_APPLY {
            self.want_apply(true).await;
        }
        Ok(())
    }

    /// Make every device write completed before the call durable: one device flush at a
    /// time, and a caller is covered by any flush that started after it called, so
    /// concurrent out-of-place writes share flushes.
    async fn barrier(&self) -> Result<(), StoreError> {
        let ticket = self.barriers_started.load(Ordering::SeqCst);
        let _one = self.barrier_lock.lock().await;
        if self.barriers_done.load(Ordering::SeqCst) > ticket {
            return Ok(());
        }
        let n = self.barriers_started.fetch_add(1, Ordering::SeqCst) + 1;
        self.dev.flush().await?;
        self.barriers_done.store(n, Ordering::SeqCst);
        Ok(())
    }

    /// Whole-chunk writes written out of place since the store was opened.
    pub fn out_of_place_writes(&self) -> u64 {
        self.whole_writes.load(Ordering::Relaxed)
    }

    /// A write with forced unit access: durable when it returns.
    pub async fn write_fua(
        &self,
        chunk: ChunkId,
        offset: u32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.write(chunk, offset, data).await?;
        self.flush().await
    }

    /// Allocate `chunk` without writing data (thick volumes): it then holds a slot, survives
    /// restarts, and reads as zeros. A chunk already held is left alone. Returns whether it
    /// allocated. Journaled as a `Write` record of no blocks; its meta page is written in
    /// place by the next apply.
    pub async fn preallocate(&self, chunk: ChunkId) -> Result<bool, StoreError> {
        if self.recorded(chunk) {
            return Ok(false);
        }
        let _whole = self.locks.lock(chunk, BlockMask::all()).await;
        if self.recorded(chunk) {
            return Ok(false);
        }
        let entry = self.entry_or_allocate_applying(chunk).await?;
        let (header, page) = self
            .empty_record(RecordKind::Write, chunk, entry.slot, 0, 0)
            .await;
        self.append(header, page, &entry, Vec::new(), Mark::Alloc)
            .await?;
        Ok(true)
    }

    /// Journal the blocks under `[offset, offset + fill.len())` (at most
    /// [`journal::record_blocks`]): merge partial edge blocks with their old contents, write one
    /// record (header and full blocks), then put the blocks in the overlay. The caller holds
    /// the range lock.
    async fn write_blocks(
        &self,
        chunk: ChunkId,
        entry: &Arc<Entry>,
        offset: u32,
        fill: Fill<'_>,
    ) -> Result<(), StoreError> {
        let len = fill.len();
        let (b0, b1) = blocks(offset, len);
        let n = b1 - b0;
        let head = offset as usize - b0 * BLOCK;
        let end = head + len;
        let mut buf = self.dev.buffers().get((n + 1) * BLOCK).await;
        if !head.is_multiple_of(BLOCK) {
            buf = self.load_block(chunk, entry, b0, buf, 1).await?;
        }
        if !end.is_multiple_of(BLOCK) && (n > 1 || head == 0) {
            buf = self.load_block(chunk, entry, b1 - 1, buf, n).await?;
        }
        buf.set_window(0, (n + 1) * BLOCK);
        {
            let dst = &mut buf.as_mut_slice()[BLOCK + head..BLOCK + end];
            match fill {
                Fill::Data(d) => dst.copy_from_slice(d),
                Fill::Zeros(_) => dst.fill(0),
            }
        }
        let payload = Bytes::copy_from_slice(&buf.as_slice()[BLOCK..]);
        let changes = (0..n)
            .map(|i| {
                let block = payload.slice(i * BLOCK..(i + 1) * BLOCK);
                let crc = crc32fast::hash(&block);
                (b0 + i, Some((block, crc)))
            })
            .collect();
        let header = RecordHeader {
            epoch: 0,
            seq: 0,
            kind: RecordKind::Write,
            chunk,
            slot: entry.slot,
            from: entry.slot,
            first: b0 as u32,
            count: n as u32,
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            payload_crc: crc32fast::hash(&payload),
        };
        self.append(header, buf, entry, changes, Mark::Blocks).await
    }

    /// Put the old contents of `block` (from the overlay, or from the device verified) or
    /// zeros into block `at` of `buf`.
    async fn load_block(
        &self,
        chunk: ChunkId,
        entry: &Entry,
        block: usize,
        mut buf: AlignedBuf,
        at: usize,
    ) -> Result<AlignedBuf, StoreError> {
        buf.set_window(at * BLOCK, BLOCK);
        let src = {
            let st = lock(&entry.state);
            match st.pending.get(&block) {
                Some(Pend { data: Some(d), .. }) => Src::Mem(d.clone()),
                Some(Pend { data: None, .. }) => Src::Zero,
                None if st.disk.is_written(block) => Src::Dev(st.disk.crcs[block]),
                None => Src::Zero,
            }
        };
        match src {
            Src::Zero => {
                buf.as_mut_slice().fill(0);
                Ok(buf)
            }
            Src::Mem(d) => {
                buf.as_mut_slice().copy_from_slice(&d);
                Ok(buf)
            }
            Src::Dev(crc) => {
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
        }
    }

    /// Take journal space for a record of `len` bytes, applying (and so reclaiming) when the
    /// journal is full. Returns the sequence number, device offset and epoch.
    async fn reserve_journal(&self, len: u64) -> Result<(u64, u64, u64), StoreError> {
        let (start, end) = self.ring();
        loop {
            {
                let mut j = lock(&self.journal);
                if j.failed.is_some() {
                    return Err(failed());
                }
                if let Some(pos) = j.place(len, start, end) {
                    let seq = j.next_seq;
                    j.next_seq += 1;
                    j.head = pos + len;
                    j.used += len;
                    j.records.push_back(Rec { seq, pos, len });
                    return Ok((seq, pos, j.epoch));
                }
            }
            tracing::debug!("journal full; applying");
            self.apply_round(true, true).await?;
            tokio::task::yield_now().await;
        }
    }

    /// Write a record (`buf`: the header block then the payload) and, once it is on the
    /// device, put `changes` in the chunk's overlay (`free`: the record frees the chunk).
    async fn append(
        &self,
        mut header: RecordHeader,
        mut buf: AlignedBuf,
        entry: &Arc<Entry>,
        changes: Vec<(usize, Option<(Bytes, u32)>)>,
        mark: Mark,
    ) -> Result<(), StoreError> {
        let (seq, pos, epoch) = self.reserve_journal(buf.len() as u64).await?;
        header.seq = seq;
        header.epoch = epoch;
        header.encode(&mut buf.as_mut_slice()[..PAGE], self.sb.device_uuid);
        if let Err(e) = self.dev.write_log(pos, buf).await {
            tracing::error!(
                seq,
                "journal write failed; the store accepts no more writes: {e}"
            );
            {
                let mut j = lock(&self.journal);
                j.failed = Some(j.failed.map_or(seq, |f| f.min(seq)));
            }
            self.mark_done(seq);
            return Err(e.into());
        }
        {
            let mut st = lock(&entry.state);
            for (b, change) in changes {
                let (data, crc) = match change {
                    Some((d, crc)) => (Some(d), crc),
                    None => (None, 0),
                };
                match st.pending.get_mut(&b) {
                    Some(p) => {
                        p.seq = seq;
                        p.data = data;
                        p.crc = crc;
                    }
                    None => {
                        st.pending.insert(
                            b,
                            Pend {
                                seq,
                                oldest: seq,
                                data,
                                crc,
                            },
                        );
                    }
                }
            }
            match &mark {
                Mark::Blocks => {}
                Mark::Free => st.free_seq = Some(seq),
                Mark::Alloc | Mark::Whole { .. } => st.alloc_seq = Some(seq),
            }
            st.generation = header.generation;
        }
        if let Mark::Whole { replaces, retire } = mark {
            if retire {
                {
                    let mut old = lock(&replaces.state);
                    old.free_seq = Some(seq);
                    old.moved = true;
                }
                lock(&self.slots).hold();
                lock(&self.dirty).insert(replaces.slot, replaces.clone());
            }
            // The chunk's lookups all happen under its range locks, which the caller holds
            // whole; an entry of the same slot also replaces the old one among the dirty.
            self.index
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(header.chunk, entry.clone());
        }
        lock(&self.dirty).insert(entry.slot, entry.clone());
        if self.mark_done(seq) {
            self.want_apply(false).await;
        }
        Ok(())
    }

    /// Record `seq` as complete; true if the journal is more than half full.
    fn mark_done(&self, seq: u64) -> bool {
        let (start, end) = self.ring();
        let half = {
            let mut j = lock(&self.journal);
            j.done.insert(seq);
            loop {
                let next = j.contiguous + 1;
                if !j.done.remove(&next) {
                    break;
                }
                j.contiguous = next;
            }
            j.used * 2 > end - start
        };
        self.progress.notify_waiters();
        half
    }

    /// Wait until every record up to `target` completed.
    async fn wait_done(&self, target: u64) {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.journal).contiguous >= target {
                return;
            }
            notified.await;
        }
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

    /// Make every completed write durable: wait for the journal records issued before the
    /// call, write in place the records an earlier flush made durable, and flush the device
    /// (one device flush: it covers both). The records this flush made durable are applied by
    /// the next one (or when the journal is half full).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let target = {
            let j = lock(&self.journal);
            if j.failed.is_some() {
                return Err(failed());
            }
            j.next_seq - 1
        };
        self.wait_done(target).await;
        if lock(&self.journal).failed.is_some_and(|f| f <= target) {
            return Err(failed());
        }
        self.apply_round(false, false).await
    }

    /// Flush, apply every journaled change in place and make that and the checkpoint durable:
    /// afterwards the overlay is empty and the journal space free (for tests, and before a
    /// planned shutdown).
    pub async fn apply_journal(&self) -> Result<(), StoreError> {
        self.apply_round(true, true).await
    }

    /// The device's flush; a checkpoint written before it becomes durable, so the journal
    /// space before its tail is reclaimed.
    async fn dev_flush(&self) -> Result<(), StoreError> {
        let (ck, contiguous) = {
            let j = lock(&self.journal);
            (j.ckpt_unflushed, j.contiguous)
        };
        self.dev.flush().await?;
        {
            let mut j = lock(&self.journal);
            j.durable = j.durable.max(contiguous);
            if let Some(tail) = ck {
                j.reclaim(tail);
                j.ckpt_durable = j.ckpt_durable.max(tail);
                if j.ckpt_unflushed == Some(tail) {
                    j.ckpt_unflushed = None;
                }
            }
        }
        self.progress.notify_waiters();
        Ok(())
    }

    /// Apply every durable journaled change in place, flush the device, then move the
    /// checkpoint past them. With `fresh`, flush first so that every completed record is
    /// durable and applied; with `final_flush`, flush the checkpoint too, so the journal space
    /// is reclaimed now.
    async fn apply_round(&self, fresh: bool, final_flush: bool) -> Result<(), StoreError> {
        let _one = self.apply_lock.lock().await;
        self.apply_locked(fresh, final_flush).await
    }

    /// A fresh apply round (with `final_flush`, its checkpoint made durable too) unless one is
    /// running already, which then covers the caller's records or leaves them to the next
    /// round. A failure is logged: the caller's own write already succeeded.
    async fn try_apply_round(&self, final_flush: bool) {
        if let Ok(_one) = self.apply_lock.try_lock() {
            if let Err(e) = self.apply_locked(true, final_flush).await {
                tracing::warn!("applying the journal failed: {e}");
            }
        }
    }

    /// An apply round is due: signal the background applier, or (without one) run it here.
    async fn want_apply(&self, final_flush: bool) {
        match &self.applier {
            Some(n) => n.notify_one(),
            None => self.try_apply_round(final_flush).await,
        }
    }

    /// Hand the applies that writes call for to a background task: `wanted` is signalled
    /// and the task is expected to call [`apply_journal`](Self::apply_journal). A write then
    /// never waits for a round it did not need (one write in thousands used to wait for a
    /// whole round: 25-200 ms at 4 KiB QD32). The journal-full and no-free-slot cases still
    /// apply in the writer: it cannot go on without the space.
    pub fn apply_in_background(mut self, wanted: Arc<tokio::sync::Notify>) -> Self {
        self.applier = Some(wanted);
        self
    }

    /// The body of [`apply_round`](Self::apply_round); the caller holds `apply_lock`.
    async fn apply_locked(&self, fresh: bool, final_flush: bool) -> Result<(), StoreError> {
        let stale = {
            let j = lock(&self.journal);
            j.durable < j.contiguous
        };
        if fresh && stale {
            self.dev_flush().await?;
        }
        // Only durable records are applied in place: a power loss drops or tears any write
        // not covered by a completed flush, and replay must be able to redo what was started.
        let c = {
            let j = lock(&self.journal);
            // Replay stops at a failed record: nothing after it may be applied in place.
            j.failed.map_or(j.durable, |f| j.durable.min(f - 1))
        };

        let entries: Vec<Arc<Entry>> = lock(&self.dirty).values().cloned().collect();
        let mut plans = Vec::new();
        for entry in entries {
            let st = lock(&entry.state);
            let blocks: Vec<(usize, u64)> = st
                .pending
                .iter()
                .filter(|(_, p)| p.seq <= c)
                .map(|(b, p)| (*b, p.seq))
                .collect();
            if st.free_seq.is_some_and(|s| s <= c) {
                let discard = !st.moved;
                drop(st);
                plans.push(Plan {
                    entry,
                    blocks,
                    page: None,
                    discard,
                    runs: Vec::new(),
                });
                continue;
            }
            let allocated = st.alloc_seq.is_some_and(|s| s <= c);
            if blocks.is_empty() && !allocated {
                continue;
            }
            let mut page = st.disk.clone();
            let mut runs: Vec<(usize, Vec<Bytes>)> = Vec::new();
            for (b, _) in &blocks {
                let Some(p) = st.pending.get(b) else { continue };
                match &p.data {
                    Some(d) => {
                        page.set_written(*b, p.crc);
                        match runs.last_mut() {
                            Some((f, v)) if *f + v.len() == *b => v.push(d.clone()),
                            _ => runs.push((*b, vec![d.clone()])),
                        }
                    }
                    None => page.clear_written(*b),
                }
            }
            page.generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
            drop(st);
            plans.push(Plan {
                entry,
                blocks,
                page: Some(page),
                discard: false,
                runs,
            });
        }

        type Io<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;
        let mut ios: Vec<Io<'_>> = Vec::new();
        for plan in &plans {
            let slot = plan.entry.slot;
            for (first, run) in &plan.runs {
                let at = self.data_offset(slot, *first);
                ios.push(Box::pin(async move {
                    // At most the apply pool's worth of runs are in flight; the others wait
                    // for a buffer (only this round's writes hold them).
                    let mut buf = self.apply_bufs.get(run.len() * BLOCK).await;
                    for (i, d) in run.iter().enumerate() {
                        buf.as_mut_slice()[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(d);
                    }
                    self.dev.write(at, buf).await?;
                    Ok(())
                }));
            }
        }
        crate::failpoints::fail_point(crate::failpoints::CHUNK_STORE_BEFORE_META_WRITE);
        for plan in &plans {
            let slot = plan.entry.slot;
            let mut page = AlignedBuf::zeroed(PAGE);
            if let Some(m) = &plan.page {
                m.encode(page.as_mut_slice(), self.sb.device_uuid, slot);
            }
            let at = self.meta_offset(slot);
            let discard = plan.discard;
            ios.push(Box::pin(async move {
                self.dev.write(at, page).await?;
                if discard {
                    let data = self.data_offset(slot, 0);
                    if let Err(e) = self.dev.discard(data, CHUNK_SIZE).await {
                        tracing::debug!(slot = slot.0, "discard of a freed chunk failed: {e}");
                    }
                }
                Ok(())
            }));
        }
        // The previous round's checkpoint: its in-place writes were durable when it was
        // computed, and the checkpoint before it is durable too (the previous round's flush).
        let ready = lock(&self.journal).ckpt_ready.take();
        if let Some(ck) = ready {
            ios.push(Box::pin(self.write_checkpoint(ck)));
        }
        let applied = plans.len();
        let mut first_err = None;
        while !ios.is_empty() {
            let rest = ios.split_off(ios.len().min(APPLY_PARALLEL));
            let batch = std::mem::replace(&mut ios, rest);
            for r in join_all(batch).await {
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
            if first_err.is_some() {
                break;
            }
        }
        if let Some(e) = first_err {
            // The overlay stays; the checkpoint is written by a later round.
            if let Some(ck) = ready {
                lock(&self.journal).ckpt_ready.get_or_insert(ck);
            }
            return Err(e);
        }
        if let Some(ck) = ready {
            let mut j = lock(&self.journal);
            j.ckpt_count = ck.count;
            j.ckpt_unflushed = Some(ck.tail_seq);
        }
        // Makes the in-place writes durable, the last checkpoint (before the next one
        // overwrites its twin), and every record completed so far (a client's flush).
        self.dev_flush().await?;

        for plan in &plans {
            let mut st = lock(&plan.entry.state);
            for (b, seq) in &plan.blocks {
                match st.pending.get(b).map(|p| p.seq == *seq) {
                    Some(true) => {
                        st.pending.remove(b);
                    }
                    Some(false) => {
                        if let Some(p) = st.pending.get_mut(b) {
                            p.oldest = seq + 1;
                        }
                    }
                    None => {}
                }
            }
            match &plan.page {
                Some(m) => {
                    st.disk = m.clone();
                    if st.alloc_seq.is_some_and(|s| s <= c) {
                        st.alloc_seq = None;
                    }
                }
                None => {
                    let seq = st.free_seq.take().unwrap_or(c);
                    // An allocation not applied yet is void too: the slot stays free.
                    st.alloc_seq = None;
                    st.pending.clear();
                    drop(st);
                    lock(&self.slots).unhold(u64::from(plan.entry.slot.0), seq);
                }
            }
        }
        let tail = {
            let mut dirty = lock(&self.dirty);
            dirty.retain(|_, e| {
                let st = lock(&e.state);
                !st.pending.is_empty() || st.free_seq.is_some() || st.alloc_seq.is_some()
            });
            let mut tail = c + 1;
            for e in dirty.values() {
                let st = lock(&e.state);
                for p in st.pending.values() {
                    tail = tail.min(p.oldest);
                }
                if let Some(f) = st.free_seq {
                    tail = tail.min(f);
                }
                if let Some(a) = st.alloc_seq {
                    tail = tail.min(a);
                }
            }
            tail
        };
        let ck = {
            let j = lock(&self.journal);
            let tail = tail.max(j.ckpt_tail);
            let pos = if tail >= j.next_seq {
                Some(j.head)
            } else {
                j.records.iter().find(|r| r.seq == tail).map(|r| r.pos)
            };
            match pos {
                Some(pos) if tail > j.ckpt_tail => Some(Checkpoint {
                    count: j.ckpt_count + 1,
                    epoch: j.epoch,
                    tail_seq: tail,
                    tail_pos: pos,
                }),
                Some(_) => None,
                None => {
                    tracing::error!(tail, "journal tail record not found; checkpoint kept");
                    None
                }
            }
        };
        match ck {
            Some(ck) if final_flush => {
                self.write_checkpoint(ck).await?;
                {
                    let mut j = lock(&self.journal);
                    j.ckpt_count = ck.count;
                    j.ckpt_tail = ck.tail_seq;
                    j.ckpt_unflushed = Some(ck.tail_seq);
                }
                self.dev_flush().await?;
            }
            Some(ck) => {
                let mut j = lock(&self.journal);
                j.ckpt_tail = ck.tail_seq;
                j.ckpt_ready = Some(ck);
            }
            None => {}
        }
        if applied > 0 {
            tracing::debug!(chunks = applied, upto = c, "applied the journal");
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
