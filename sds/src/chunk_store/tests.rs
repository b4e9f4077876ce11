//! Chunk store tests: round trips, holes, persistence, trim, checksums, device faults, power
//! loss and load-time recovery of duplicate or torn meta pages.

use super::*;
use crate::device::{
    CrashMode, DeviceOptions, EioRule, FaultOp, FaultyDevice, FileDevice, UringDevice,
};
use crate::test_util::Scratch;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicU64, Ordering};

const DEV: u64 = 16 << 20;

fn c(i: u64) -> ChunkId {
    ChunkId::new(VtreeId(7), ChunkIndex(i))
}

/// Open the scratch device with io_uring. A store dropped just before may still be releasing
/// the device's lock (seen once under load), so `Busy` is retried under a deadline.
fn uring(f: &Scratch) -> UringDevice {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match UringDevice::open(&f.0, &DeviceOptions::small()) {
            Err(crate::device::DeviceError::Busy(_)) if std::time::Instant::now() < deadline => {
                std::thread::yield_now()
            }
            r => return r.expect("open device"),
        }
    }
}

fn faulty(f: &Scratch, seed: u64) -> Arc<FaultyDevice<FileDevice>> {
    let d = FileDevice::open(&f.0, &DeviceOptions::small()).expect("open device");
    Arc::new(FaultyDevice::new(d, seed))
}

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[tokio::test]
async fn round_trip_partial_writes_and_holes() {
    let f = Scratch::new("cs-rt", DEV);
    let s = ChunkStore::open(uring(&f)).await.expect("open");
    assert!(s.was_formatted());
    assert_eq!(
        &s.read(c(0), 0, 4096).await.expect("hole")[..],
        &[0u8; 4096][..]
    );

    s.write(c(0), 100, b"hello").await.expect("write");
    s.write(c(0), 4090, &[7u8; 20])
        .await
        .expect("straddling write");
    s.write(c(0), 3 * 4096, &bytes(1, 8192))
        .await
        .expect("aligned write");
    s.write(c(3), 0, &bytes(2, CHUNK_SIZE as usize))
        .await
        .expect("whole chunk");

    assert_eq!(
        &s.read(c(0), 96, 12).await.expect("read")[..],
        b"\0\0\0\0hello\0\0\0"
    );
    assert_eq!(
        &s.read(c(0), 4090, 20).await.expect("read")[..],
        &[7u8; 20][..]
    );
    assert_eq!(
        &s.read(c(0), 3 * 4096, 8192).await.expect("read")[..],
        &bytes(1, 8192)[..]
    );
    // A read across written and never-written blocks.
    let r = s.read(c(0), 4096, 3 * 4096).await.expect("read");
    assert_eq!(&r[..14], &[7u8; 14][..]);
    assert!(r[14..2 * 4096].iter().all(|b| *b == 0));
    assert_eq!(&r[2 * 4096..], &bytes(1, 8192)[..4096]);
    assert_eq!(
        s.read(c(3), 0, CHUNK_SIZE as u32).await.expect("read"),
        bytes(2, CHUNK_SIZE as usize)
    );
    // Overwrite inside a block keeps its neighbours.
    s.write(c(3), 5000, b"xyz").await.expect("overwrite");
    let mut want = bytes(2, 8192);
    want[5000..5003].copy_from_slice(b"xyz");
    assert_eq!(s.read(c(3), 0, 8192).await.expect("read"), want);

    let first = ChunkId::new(VtreeId(7), ChunkIndex(0));
    assert_eq!(s.allocated(first, 5), vec![1, 0, 0, 1, 0]);
    assert_eq!(
        s.chunks_of(VtreeId(7)),
        vec![first, ChunkId::new(VtreeId(7), ChunkIndex(3))]
    );
    assert!(s.chunks_of(VtreeId(8)).is_empty());
    assert!(matches!(
        s.read(c(0), (1 << 20) - 1, 2).await,
        Err(StoreError::Range { .. })
    ));
    assert!(matches!(
        s.write(c(0), 1 << 20, b"x").await,
        Err(StoreError::Range { .. })
    ));
    assert_eq!(s.read(c(0), 0, 0).await.expect("empty read").len(), 0);
}

#[tokio::test]
async fn data_and_allocation_survive_reopen() {
    let f = Scratch::new("cs-reopen", DEV);
    let free;
    {
        let s = ChunkStore::open(uring(&f)).await.expect("open");
        s.write(c(0), 100, b"hello").await.expect("write");
        s.write(c(5), 8192, &bytes(3, 12288)).await.expect("write");
        s.write(c(6), 0, b"gone").await.expect("write");
        s.trim(c(6), 0, CHUNK_SIZE as u32).await.expect("trim");
        s.flush().await.expect("flush");
        free = s.free_slots();
    }
    let s = ChunkStore::open(uring(&f)).await.expect("reopen");
    assert!(!s.was_formatted());
    assert_eq!(s.corrupt_pages_at_open(), 0);
    assert_eq!(s.free_slots(), free);
    assert_eq!(&s.read(c(0), 100, 5).await.expect("read")[..], b"hello");
    assert_eq!(
        s.read(c(5), 8192, 12288).await.expect("read"),
        bytes(3, 12288)
    );
    assert_eq!(
        s.allocated(ChunkId::new(VtreeId(7), ChunkIndex(0)), 7),
        vec![1, 0, 0, 0, 0, 1, 0]
    );
    // New writes after a reopen get later generations than the loaded pages.
    let before = s.meta_of(c(0)).expect("meta").generation;
    s.write(c(0), 0, b"!").await.expect("write");
    assert!(s.meta_of(c(0)).expect("meta").generation > before);
}

#[tokio::test]
async fn whole_chunk_writes_go_out_of_place_and_survive_reopen() {
    const CHUNK: usize = CHUNK_SIZE as usize;
    let f = Scratch::new("cs-whole", DEV);
    let free;
    {
        let s = ChunkStore::open(uring(&f)).await.expect("open");
        assert_eq!(s.superblock().version, FORMAT_VERSION);
        // A new chunk written whole goes to its own slot; nothing waits in the overlay.
        s.write(c(1), 0, &bytes(1, CHUNK)).await.expect("whole");
        assert_eq!(s.out_of_place_writes(), 1);
        assert_eq!(s.overlay_blocks(), 0);
        assert_eq!(
            s.read(c(1), 0, CHUNK as u32).await.expect("read"),
            bytes(1, CHUNK)
        );
        // A chunk holding data moves to another slot; later partial writes are journaled
        // there.
        s.write(c(2), 4096, &bytes(2, 8192)).await.expect("partial");
        let before = s.block_offset(c(2), 0);
        s.write(c(2), 0, &bytes(3, CHUNK))
            .await
            .expect("whole over data");
        assert_eq!(s.out_of_place_writes(), 2);
        assert_ne!(s.block_offset(c(2), 0), before);
        s.write(c(2), 8192, b"tail").await.expect("after");
        // Written whole again before anything was applied.
        s.write(c(1), 0, &bytes(4, CHUNK))
            .await
            .expect("whole again");
        assert_eq!(s.out_of_place_writes(), 3);
        s.flush().await.expect("flush");
        s.flush().await.expect("flush applies");
        assert_eq!(s.chunk_count(), 2);
        free = s.free_slots();
    }
    let s = ChunkStore::open(uring(&f)).await.expect("reopen");
    assert_eq!(s.free_slots(), free);
    assert_eq!(s.corrupt_pages_at_open(), 0);
    assert_eq!(
        s.read(c(1), 0, CHUNK as u32).await.expect("read"),
        bytes(4, CHUNK)
    );
    let mut want = bytes(3, CHUNK);
    want[8192..8196].copy_from_slice(b"tail");
    assert_eq!(s.read(c(2), 0, CHUNK as u32).await.expect("read"), want);
    for chunk in [1, 2] {
        assert!(s.scrub_chunk(c(chunk)).await.expect("scrub").is_empty());
    }
}

#[tokio::test]
async fn version_2_devices_are_opened_and_keep_journaling_whole_chunks() {
    const CHUNK: usize = CHUNK_SIZE as usize;
    let f = Scratch::new("cs-v2", DEV);
    drop(ChunkStore::open(uring(&f)).await.expect("format"));
    // Make it a device as an SDS of format version 2 left it.
    {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f.0)
            .expect("open");
        let mut page = vec![0u8; PAGE];
        file.read_exact(&mut page).expect("read");
        let mut sb = Superblock::decode(&page, DEV).expect("superblock");
        sb.version = 2;
        sb.encode(&mut page);
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.write_all(&page).expect("write");
    }
    {
        let s = ChunkStore::open(uring(&f)).await.expect("open version 2");
        assert_eq!(s.superblock().version, 2);
        s.write(c(0), 0, &bytes(5, CHUNK)).await.expect("whole");
        // Journaled: an SDS of version 2 could not replay a relocation.
        assert_eq!(s.out_of_place_writes(), 0);
        s.flush().await.expect("flush");
    }
    let s = ChunkStore::open(uring(&f)).await.expect("reopen");
    assert_eq!(s.superblock().version, 2);
    assert_eq!(
        s.read(c(0), 0, CHUNK as u32).await.expect("read"),
        bytes(5, CHUNK)
    );
}

#[tokio::test]
async fn trim_and_write_zeroes() {
    let f = Scratch::new("cs-trim", DEV);
    let s = ChunkStore::open(uring(&f)).await.expect("open");
    let all = s.free_slots();
    s.write(c(1), 0, &bytes(4, 16384)).await.expect("write");
    assert_eq!(s.free_slots(), all - 1);

    // A partial trim: whole blocks are dropped, edges are zeroed, the rest stays.
    s.trim(c(1), 1000, 9000).await.expect("trim");
    let mut want = bytes(4, 16384);
    want[1000..10000].fill(0);
    assert_eq!(s.read(c(1), 0, 16384).await.expect("read"), want);
    assert!(
        !s.meta_of(c(1)).expect("meta").is_written(1),
        "a whole block was dropped"
    );
    // Write-zeroes inside one block.
    s.write_zeroes(c(1), 12000, 10).await.expect("write zeroes");
    want[12000..12010].fill(0);
    assert_eq!(s.read(c(1), 0, 16384).await.expect("read"), want);
    // Trimming what was never written, or a chunk that does not exist, is a no-op.
    s.trim(c(1), 100_000, 4096).await.expect("trim hole");
    s.trim(c(2), 0, 4096).await.expect("trim absent chunk");
    assert!(!s.contains(c(2)));

    // Zeroing the rest empties the chunk: its slot is freed.
    s.trim(c(1), 0, 16384).await.expect("trim");
    assert!(!s.contains(c(1)));
    assert_eq!(s.free_slots(), all);
    s.write(c(1), 0, b"again").await.expect("write");
    s.trim(c(1), 0, CHUNK_SIZE as u32)
        .await
        .expect("whole-chunk trim");
    assert_eq!(s.free_slots(), all);
    assert_eq!(&s.read(c(1), 0, 8).await.expect("read")[..], &[0u8; 8][..]);
}

/// Flip one byte of the device file behind the store's back.
fn corrupt_file(f: &Scratch, at: u64) {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.0)
        .expect("open file");
    let mut b = [0u8; 1];
    file.seek(SeekFrom::Start(at)).expect("seek");
    file.read_exact(&mut b).expect("read");
    b[0] ^= 0x40;
    file.seek(SeekFrom::Start(at)).expect("seek");
    file.write_all(&b).expect("write");
    file.sync_all().expect("sync");
}

#[tokio::test]
async fn a_flipped_byte_is_a_checksum_mismatch() {
    let f = Scratch::new("cs-crc", DEV);
    let at;
    {
        let s = ChunkStore::open(uring(&f)).await.expect("open");
        s.write(c(1), 0, &bytes(5, 3 * 4096)).await.expect("write");
        s.apply_journal().await.expect("apply");
        at = s.block_offset(c(1), 1).expect("offset") + 17;
    }
    corrupt_file(&f, at);
    let s = ChunkStore::open(uring(&f)).await.expect("reopen");
    assert_eq!(s.scrub_chunk(c(1)).await.expect("scrub"), vec![4096]);
    match s.read(c(1), 4096, 10).await {
        Err(StoreError::ChecksumMismatch { chunk, offset }) => {
            assert_eq!((chunk, offset), (c(1), 4096));
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    assert!(
        s.read(c(1), 0, 4096).await.is_ok(),
        "the blocks around it are intact"
    );
    assert!(s.read(c(1), 8192, 4096).await.is_ok());
    // A partial write must not merge with corrupt data.
    assert!(matches!(
        s.write(c(1), 4096 + 5, b"x").await,
        Err(StoreError::ChecksumMismatch { .. })
    ));
    // A whole-block write replaces it (a repair from the other copy).
    s.write(c(1), 4096, &[1u8; 4096]).await.expect("rewrite");
    assert_eq!(
        &s.read(c(1), 4096, 4096).await.expect("read")[..],
        &[1u8; 4096][..]
    );
    s.apply_journal().await.expect("apply");
    assert_eq!(s.scrub_chunk(c(1)).await.expect("scrub"), Vec::<u32>::new());
    assert_eq!(
        &s.read(c(1), 4096, 4096).await.expect("read")[..],
        &[1u8; 4096][..]
    );
}

#[tokio::test]
async fn device_errors_surface_as_errors() {
    let f = Scratch::new("cs-eio", DEV);
    let d = faulty(&f, 1);
    let s = ChunkStore::open(d.clone()).await.expect("open");
    s.write(c(1), 0, &[5u8; 8192]).await.expect("write");
    // Applied in place: reads go to the device, not the journal overlay.
    s.apply_journal().await.expect("apply");
    let at = s.block_offset(c(1), 1).expect("offset");
    d.add_eio(EioRule::always(FaultOp::Read, Some(at..at + 4096)));
    match s.read(c(1), 0, 8192).await {
        Err(StoreError::Device(e)) => assert!(e.is_device_failure()),
        other => panic!("expected EIO, got {other:?}"),
    }
    assert!(s.read(c(1), 0, 4096).await.is_ok(), "the other block reads");
    d.clear_faults();
    d.add_eio(EioRule::always(FaultOp::Write, None));
    assert!(matches!(
        s.write(c(2), 0, b"x").await,
        Err(StoreError::Device(_))
    ));
    d.clear_faults();
    d.add_bit_flips(at..at + 1, 1.0);
    assert!(matches!(
        s.read(c(1), 4096, 4096).await,
        Err(StoreError::ChecksumMismatch { offset: 4096, .. })
    ));
}

#[tokio::test]
async fn foreign_or_newer_devices_are_refused() {
    // Not blank at the superblock, no magic: other data, never formatted over.
    let f = Scratch::new("cs-foreign", DEV);
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&f.0)
            .expect("open");
        file.write_all(b"an ext4 superblock, say").expect("write");
    }
    let e = ChunkStore::open(uring(&f)).await.err().expect("refused");
    assert!(
        matches!(e, StoreError::Superblock(SuperblockError::ForeignMagic(_))),
        "{e}"
    );

    // Our magic, a future version.
    let f = Scratch::new("cs-version", DEV);
    drop(ChunkStore::open(uring(&f)).await.expect("format"));
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&f.0)
            .expect("open");
        file.seek(SeekFrom::Start(8)).expect("seek");
        file.write_all(&4u32.to_le_bytes()).expect("write");
    }
    let e = ChunkStore::open(uring(&f)).await.err().expect("refused");
    assert!(
        matches!(
            e,
            StoreError::Superblock(SuperblockError::Version { found: 4 })
        ),
        "{e}"
    );

    let f = Scratch::new("cs-small", 1 << 20);
    assert!(matches!(
        ChunkStore::open(uring(&f)).await,
        Err(StoreError::TooSmall { .. })
    ));
}

#[tokio::test]
async fn parallel_writes_to_one_chunk_all_reach_the_meta_page() {
    let f = Scratch::new("cs-par", DEV);
    {
        let s = Arc::new(ChunkStore::open(uring(&f)).await.expect("open"));
        let mut tasks = Vec::new();
        for b in 0..64u32 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.write(c(0), b * 4096, &bytes(b as u8, 4096)).await
            }));
        }
        // Overlapping writers of one block are serialised: the block ends up whole.
        for k in 0..8u8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.write(c(0), 100 * 4096 + 10, &[k; 4000]).await
            }));
        }
        for t in tasks {
            t.await.expect("join").expect("write");
        }
        s.flush().await.expect("flush");
    }
    let s = ChunkStore::open(uring(&f)).await.expect("reopen");
    for b in 0..64u32 {
        let got = s
            .read(c(0), b * 4096, 4096)
            .await
            .expect("read after reopen");
        assert_eq!(got, bytes(b as u8, 4096), "block {b}");
    }
    let r = s.read(c(0), 100 * 4096 + 10, 4000).await.expect("read");
    assert!(r.iter().all(|x| *x == r[0]), "one writer's data, not a mix");
}

#[tokio::test]
async fn flushed_data_survives_a_power_loss() {
    let f = Scratch::new("cs-crash", DEV);
    let d = faulty(&f, 11);
    d.set_volatile_cache(true);
    {
        let s = ChunkStore::open(d.clone()).await.expect("open");
        s.write(c(0), 0, &bytes(1, 8192)).await.expect("write");
        s.write(c(1), 0, &bytes(2, 4096)).await.expect("write");
        s.flush().await.expect("flush");
        // Not flushed: other blocks of the same chunk, and a new chunk.
        s.write(c(0), 4 * 4096, &bytes(3, 4096))
            .await
            .expect("write");
        s.write(c(2), 0, &bytes(4, 4096)).await.expect("write");
        assert!(d.unflushed() > 0);
    }
    d.crash(CrashMode::DropUnflushed).await.expect("crash");
    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert_eq!(s.read(c(0), 0, 8192).await.expect("read"), bytes(1, 8192));
    assert_eq!(s.read(c(1), 0, 4096).await.expect("read"), bytes(2, 4096));
    assert_eq!(
        &s.read(c(0), 4 * 4096, 8)
            .await
            .expect("lost write reads zeros")[..],
        &[0u8; 8]
    );
    assert!(!s.contains(c(2)));

    // Some unflushed writes land whole, others not at all: flushed blocks stay readable.
    s.write(c(0), 8 * 4096, &bytes(5, 4096))
        .await
        .expect("write");
    s.write(c(3), 0, &bytes(6, 4096)).await.expect("write");
    s.write(c(1), 4096, &bytes(7, 4096)).await.expect("write");
    drop(s);
    d.crash(CrashMode::Partial { tear: false })
        .await
        .expect("crash");
    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert_eq!(s.read(c(0), 0, 8192).await.expect("read"), bytes(1, 8192));
    assert_eq!(s.read(c(1), 0, 4096).await.expect("read"), bytes(2, 4096));
}

#[tokio::test]
async fn load_keeps_the_later_of_two_claims_and_skips_corrupt_pages() {
    let f = Scratch::new("cs-claims", DEV);
    let d = faulty(&f, 2);
    let sb = {
        let s = ChunkStore::open(d.clone()).await.expect("open");
        s.write(c(0), 0, b"old").await.expect("write");
        s.write(c(1), 0, b"one").await.expect("write");
        s.apply_journal().await.expect("apply the journal");
        *s.superblock()
    };
    // A later claim of chunk 0 in slot 9 (as if a free of slot 0 had been lost in a crash).
    let mut m = ChunkMeta::new(c(0));
    m.generation = 1000;
    let mut data = AlignedBuf::zeroed(4096);
    data.as_mut_slice()[..3].copy_from_slice(b"new");
    m.set_written(0, crc32fast::hash(data.as_slice()));
    let mut page = AlignedBuf::zeroed(PAGE);
    m.encode(page.as_mut_slice(), sb.device_uuid, SlotIndex(9));
    d.write(sb.meta_offset + 9 * PAGE as u64, page)
        .await
        .expect("write page");
    d.write(sb.data_offset + 9 * CHUNK_SIZE, data)
        .await
        .expect("write data");
    // Tear chunk 1's page (slot 1).
    let mut torn = d
        .read(sb.meta_offset + PAGE as u64, AlignedBuf::zeroed(PAGE))
        .await
        .expect("read");
    torn.as_mut_slice()[2000] ^= 1;
    d.write(sb.meta_offset + PAGE as u64, torn)
        .await
        .expect("write");

    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert_eq!(&s.read(c(0), 0, 3).await.expect("read")[..], b"new");
    assert_eq!(s.corrupt_pages_at_open(), 1);
    assert!(
        !s.contains(c(1)),
        "a corrupt page loses its chunk on this copy"
    );
    drop(s);
    // The older claim was freed on the device: it never comes back.
    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert_eq!(&s.read(c(0), 0, 3).await.expect("read")[..], b"new");
    assert_eq!(s.chunk_count(), 1);
}

/// A device that loses power after a budget of writes, flushes and discards: from then on
/// writes are silently dropped and flushes fail, so nothing issued after the cut counts as
/// durable, and the [`FaultyDevice`] underneath holds exactly what was cached at the cut.
/// With `jitter`, each write and flush first yields to the scheduler a seeded random number of
/// times, so concurrent requests complete out of order (deterministically, without timers).
struct CutDevice {
    inner: Arc<FaultyDevice<FileDevice>>,
    budget: AtomicU64,
    jitter: Option<Mutex<rand::rngs::StdRng>>,
}

impl CutDevice {
    fn new(inner: Arc<FaultyDevice<FileDevice>>, budget: u64) -> CutDevice {
        CutDevice {
            inner,
            budget: AtomicU64::new(budget),
            jitter: None,
        }
    }

    fn with_jitter(mut self, seed: u64) -> CutDevice {
        use rand::SeedableRng;
        self.jitter = Some(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)));
        self
    }

    async fn delay(&self) {
        use rand::Rng;
        let n = self.jitter.as_ref().map_or(0, |r| lock(r).gen_range(0..24));
        for _ in 0..n {
            tokio::task::yield_now().await;
        }
    }

    /// Spend one operation; false once the power is off.
    fn spend(&self) -> bool {
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok()
    }

    fn tripped(&self) -> bool {
        self.budget.load(Ordering::SeqCst) == 0
    }
}

impl BlockDevice for CutDevice {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn buffers(&self) -> &crate::device::BufferPool {
        self.inner.buffers()
    }
    async fn read(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        self.delay().await;
        if self.spend() {
            self.inner.write(offset, buf).await
        } else {
            Ok(buf)
        }
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.delay().await;
        if self.spend() {
            self.inner.flush().await
        } else {
            Err(DeviceError::eio())
        }
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.spend() {
            self.inner.discard(offset, len).await
        } else {
            Ok(())
        }
    }
}

/// Blocks of each chunk the power-loss workload touches.
const PL_BLOCKS: usize = 64;
const PL_CHUNKS: u64 = 3;

/// What a block may read after a crash: the content at the last completed flush, and every
/// content it had since.
#[derive(Clone)]
struct Allowed {
    durable: Vec<u8>,
    since: Vec<Vec<u8>>,
}

/// The model: the current content of every block and what each may read after a crash.
struct Model {
    current: Vec<Vec<u8>>,
    allowed: Vec<Allowed>,
}

impl Model {
    fn new() -> Model {
        let n = PL_CHUNKS as usize * PL_BLOCKS;
        Model {
            current: vec![vec![0u8; BLOCK]; n],
            allowed: vec![
                Allowed {
                    durable: vec![0u8; BLOCK],
                    since: Vec::new(),
                };
                n
            ],
        }
    }

    /// Apply `f` to the bytes `[offset, offset + len)` of `chunk`, noting the new contents
    /// as possible (before the operation ran: it may complete or not).
    fn change(&mut self, chunk: u64, offset: usize, len: usize, f: impl Fn(usize) -> u8) {
        let (b0, b1) = blocks(offset as u32, len);
        for b in b0..b1 {
            let i = chunk as usize * PL_BLOCKS + b;
            for at in (b * BLOCK).max(offset)..((b + 1) * BLOCK).min(offset + len) {
                self.current[i][at - b * BLOCK] = f(at - offset);
            }
            let content = self.current[i].clone();
            self.allowed[i].since.push(content);
        }
    }

    /// Every change so far is durable.
    fn flushed(&mut self) {
        for (a, c) in self.allowed.iter_mut().zip(&self.current) {
            a.durable = c.clone();
            a.since.clear();
        }
    }
}

/// The power-loss workload's chunk `i`: even ones in layer 0, odd ones the same index in a V-tree
/// layer near the top of the range, so records and meta pages of two layers of one chunk index
/// (the layer packed into the stored index) go through every cut, replay and apply.
fn pl(i: u64) -> ChunkId {
    let layer = if i % 2 == 1 { proto::MAX_LAYER - 1 } else { 0 };
    ChunkId::new(VtreeId(7), ChunkIndex(i / 2)).in_layer(LayerId(layer))
}

/// One seeded run: a random workload over a store whose device loses power after a random
/// number of operations (tearing what its cache held), then checks after a reopen that every
/// block reads without a checksum error, reads an allowed content, and reads exactly its
/// flushed content when no write followed the last completed flush. Two crash cycles per
/// seed, so the second replays over a journal that holds records of an earlier epoch. One seed
/// in three uses a larger device, whose journal takes whole-chunk records (a 1 MiB journal
/// splits writes into records of 31 blocks). Odd seeds run the applies the writes call for in
/// a background task, as the SDS does.
async fn power_loss_run(seed: u64) -> Result<(u64, u64, u64, u64), String> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let size = if seed % 3 == 2 { 256 << 20 } else { 8 << 20 };
    let f = Scratch::new("cs-pl", size);
    let d = faulty(&f, seed);
    drop(
        ChunkStore::open(d.clone())
            .await
            .map_err(|e| format!("format: {e}"))?,
    );
    d.set_volatile_cache(true);
    let mut model = Model::new();
    let mut replayed = 0;
    let mut cuts = 0;
    let mut whole = 0;
    let bg_rounds = Arc::new(AtomicU64::new(0));
    for cycle in 0..2 {
        let cut = Arc::new(CutDevice::new(d.clone(), rng.gen_range(1..600)));
        // Odd seeds apply as the SDS does: rounds the writes call for run in a task of their
        // own, concurrently with the writes that follow; even seeds in the writer.
        let wanted = Arc::new(tokio::sync::Notify::new());
        let s = match ChunkStore::open(cut.clone()).await {
            Ok(s) if seed % 2 == 1 => Some(Arc::new(s.apply_in_background(wanted.clone()))),
            Ok(s) => Some(Arc::new(s)),
            // Power lost during the recovery itself.
            Err(_) if cut.tripped() => None,
            Err(e) => return Err(format!("cycle {cycle}: open: {e}")),
        };
        let applier = s.clone().filter(|_| seed % 2 == 1).map(|s| {
            let rounds = bg_rounds.clone();
            tokio::spawn(async move {
                loop {
                    wanted.notified().await;
                    let _ = s.apply_journal().await;
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            })
        });
        for _ in 0..rng.gen_range(10..120) {
            let Some(s) = &s else { break };
            if cut.tripped() {
                break;
            }
            let chunk = rng.gen_range(0..PL_CHUNKS);
            let roll = rng.gen_range(0..100);
            let max = PL_BLOCKS * BLOCK;
            if roll < 12 {
                // A whole chunk: written out of place when a clean slot is free.
                let salt: u8 = rng.gen();
                let data: Vec<u8> = (0..CHUNK_SIZE as usize)
                    .map(|i| (i as u8).wrapping_mul(29) ^ salt ^ (i / BLOCK) as u8)
                    .collect();
                model.change(chunk, 0, max, |i| data[i]);
                let _ = s.write(pl(chunk), 0, &data).await;
            } else if roll < 60 {
                let len = match rng.gen_range(0..4) {
                    0 => rng.gen_range(1..=BLOCK),
                    1 => BLOCK * rng.gen_range(1..=4),
                    2 => rng.gen_range(1..=3 * BLOCK),
                    _ => BLOCK * rng.gen_range(8..=40),
                };
                let aligned = rng.gen_bool(0.5);
                let mut offset = rng.gen_range(0..max - len.min(max - 1));
                if aligned {
                    offset -= offset % BLOCK;
                }
                let len = len.min(max - offset);
                let salt: u8 = rng.gen();
                let data: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31) ^ salt)
                    .collect();
                model.change(chunk, offset, len, |i| data[i]);
                if rng.gen_bool(0.1) {
                    // A completed FUA write is durable, and so is everything before it.
                    if s.write_fua(pl(chunk), offset as u32, &data).await.is_ok() {
                        model.flushed();
                    }
                } else {
                    let _ = s.write(pl(chunk), offset as u32, &data).await;
                }
            } else if roll < 80 {
                let (offset, len) = if rng.gen_bool(0.2) {
                    (0, CHUNK_SIZE as usize)
                } else {
                    let offset = rng.gen_range(0..max - 1);
                    (offset, rng.gen_range(1..=(max - offset).min(8 * BLOCK)))
                };
                let len_in = len.min(max - offset);
                model.change(chunk, offset, len_in, |_| 0);
                let _ = s.trim(pl(chunk), offset as u32, len as u32).await;
            } else if s.flush().await.is_ok() {
                model.flushed();
            }
        }
        if let Some(a) = applier {
            a.abort();
            let _ = a.await;
        }
        whole += s.as_ref().map_or(0, |s| s.out_of_place_writes());
        drop(s);
        let report = d
            .crash(CrashMode::Partial { tear: true })
            .await
            .map_err(|e| format!("crash: {e}"))?;
        cuts += u64::from(cut.tripped());
        let _ = report;
        let s = ChunkStore::open(d.clone())
            .await
            .map_err(|e| format!("cycle {cycle}: reopen: {e}"))?;
        replayed += s.replayed_at_open();
        for chunk in 0..PL_CHUNKS {
            let all = s
                .read(pl(chunk), 0, (PL_BLOCKS * BLOCK) as u32)
                .await
                .map_err(|e| format!("cycle {cycle}: chunk {chunk}: {e}"))?;
            for b in 0..PL_BLOCKS {
                let i = chunk as usize * PL_BLOCKS + b;
                let got = &all[b * BLOCK..(b + 1) * BLOCK];
                let a = &model.allowed[i];
                let ok = got[..] == a.durable[..] || a.since.iter().any(|s| got[..] == s[..]);
                if !ok {
                    return Err(format!(
                        "cycle {cycle}: chunk {chunk} block {b} reads content never written \
                         (or older than its last flush); {} later versions allowed",
                        a.since.len()
                    ));
                }
                model.current[i] = got.to_vec();
            }
            let bad = s.scrub_chunk(pl(chunk)).await.map_err(|e| e.to_string())?;
            if !bad.is_empty() {
                return Err(format!(
                    "cycle {cycle}: scrub of chunk {chunk} found {bad:?}"
                ));
            }
        }
        model.flushed();
    }
    Ok((replayed, cuts, whole, bg_rounds.load(Ordering::Relaxed)))
}

/// Seeds `0..default`, or the range in `var` (`"first..end"`) for a longer soak.
fn seeds(var: &str, default: u64) -> std::ops::Range<u64> {
    std::env::var(var)
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once("..")?;
            Some(a.parse().ok()?..b.parse().ok()?)
        })
        .unwrap_or(0..default)
}

#[tokio::test]
async fn power_loss_at_any_point_reads_old_or_new_never_a_checksum_error() {
    let mut failures = Vec::new();
    let (mut replayed, mut cuts, mut whole, mut background) = (0, 0, 0, 0);
    let runs = seeds("SDS_POWER_LOSS_SEEDS", 120).count();
    for seed in seeds("SDS_POWER_LOSS_SEEDS", 120) {
        match power_loss_run(seed).await {
            Ok((r, c, w, b)) => {
                replayed += r;
                cuts += c;
                whole += u64::from(w > 0);
                background += b;
            }
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
    }
    let lost = failures.len();
    crate::test_util::fault_summary(&format!(
        "fault scenario 5 (power loss on the fault-injecting device, seeded): runs {runs}, power cuts mid-workload {cuts}, journal records replayed {replayed}, runs with a lost flushed write or checksum error {lost}"
    ));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "power loss: {cuts} cuts mid-workload, {replayed} records replayed, \
         {whole} runs with out-of-place whole-chunk writes, {background} background apply rounds"
    );
    // The runs did cut power mid-workload, did replay records and did write chunks whole out
    // of place.
    assert!(cuts > 50, "only {cuts} cuts");
    assert!(replayed > 100, "only {replayed} records replayed");
    assert!(whole > 30, "only {whole} runs wrote a chunk out of place");
    assert!(background > 30, "only {background} background apply rounds");
}

#[tokio::test]
async fn the_overlay_serves_reads_until_the_flush_applies_in_place() {
    let f = Scratch::new("cs-overlay", DEV);
    let d = faulty(&f, 3);
    let s = ChunkStore::open(d.clone()).await.expect("open");
    s.write(c(0), 4096, &bytes(9, 8192)).await.expect("write");
    s.write(c(0), 4100, b"abc")
        .await
        .expect("partial write over the overlay");
    let mut want = bytes(9, 8192);
    want[4..7].copy_from_slice(b"abc");
    assert_eq!(s.overlay_blocks(), 2);
    assert_eq!(s.read(c(0), 4096, 8192).await.expect("read"), want);
    let at = s.block_offset(c(0), 1).expect("offset");
    let raw = d.read(at, AlignedBuf::zeroed(8192)).await.expect("raw");
    assert!(
        raw.as_slice().iter().all(|b| *b == 0),
        "not applied before a flush"
    );
    assert!(s.meta_of(c(0)).expect("meta").is_written(2));

    // The flush makes the records durable; the next one applies them in place.
    s.flush().await.expect("flush");
    assert_eq!(s.overlay_blocks(), 2);
    let raw = d.read(at, AlignedBuf::zeroed(8192)).await.expect("raw");
    assert!(raw.as_slice().iter().all(|b| *b == 0));
    s.flush().await.expect("flush");
    assert_eq!(s.overlay_blocks(), 0);
    let raw = d.read(at, AlignedBuf::zeroed(8192)).await.expect("raw");
    assert_eq!(raw.as_slice(), &want[..], "applied in place");
    assert_eq!(s.read(c(0), 4096, 8192).await.expect("read"), want);
    assert_eq!(s.scrub_chunk(c(0)).await.expect("scrub"), Vec::<u32>::new());
}

#[tokio::test]
async fn replay_applies_durable_records_after_a_crash() {
    let f = Scratch::new("cs-replay", DEV);
    let d = faulty(&f, 4);
    d.set_volatile_cache(true);
    {
        let s = ChunkStore::open(d.clone()).await.expect("open");
        s.write(c(0), 0, &bytes(1, 8192)).await.expect("write");
        s.apply_journal().await.expect("apply");
        s.write(c(0), 4096, &bytes(2, 4096)).await.expect("write");
        s.write(c(1), 100, b"new chunk").await.expect("write");
        s.trim(c(0), 0, 4096).await.expect("trim");
        // The records are durable, nothing is applied in place.
        d.flush().await.expect("device flush");
        assert!(s.overlay_blocks() > 0);
        s.write(c(2), 0, b"lost").await.expect("unflushed write");
    }
    d.crash(CrashMode::DropUnflushed).await.expect("crash");
    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert_eq!(s.replayed_at_open(), 3);
    assert_eq!(s.read(c(0), 0, 4096).await.expect("read"), vec![0u8; 4096]);
    assert_eq!(
        s.read(c(0), 4096, 4096).await.expect("read"),
        bytes(2, 4096)
    );
    assert_eq!(&s.read(c(1), 100, 9).await.expect("read")[..], b"new chunk");
    assert!(!s.contains(c(2)));
    assert!(!s.meta_of(c(0)).expect("meta").is_written(0));
    // Replayed in place: a second open has nothing to replay and reads the same.
    drop(s);
    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert_eq!(s.replayed_at_open(), 0);
    assert_eq!(
        s.read(c(0), 4096, 4096).await.expect("read"),
        bytes(2, 4096)
    );
    assert_eq!(&s.read(c(1), 100, 9).await.expect("read")[..], b"new chunk");
}

#[tokio::test]
async fn a_torn_meta_page_is_rebuilt_by_replay() {
    let f = Scratch::new("cs-torn", DEV);
    let d = faulty(&f, 5);
    let s = ChunkStore::open(d.clone()).await.expect("open");
    s.write(c(0), 0, &bytes(1, 3 * 4096)).await.expect("write");
    s.apply_journal().await.expect("apply");
    s.write(c(0), 4096, &bytes(2, 4096)).await.expect("write");
    d.flush().await.expect("records durable");
    let sb = *s.superblock();
    drop(s);
    // An apply interrupted: the page's CRC region torn, the data block half written.
    let page_at = sb.meta_offset;
    let mut page = d
        .read(page_at, AlignedBuf::zeroed(PAGE))
        .await
        .expect("read page");
    page.as_mut_slice()[600] ^= 0xff;
    d.write(page_at, page).await.expect("tear page");
    let data_at = sb.data_offset + 4096;
    let mut half = AlignedBuf::zeroed(4096);
    half.as_mut_slice()[..2048].copy_from_slice(&bytes(2, 2048));
    d.write(data_at, half).await.expect("tear data");

    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert_eq!(s.corrupt_pages_at_open(), 0);
    assert_eq!(s.read(c(0), 0, 4096).await.expect("read"), bytes(1, 4096));
    assert_eq!(
        s.read(c(0), 4096, 4096).await.expect("read"),
        bytes(2, 4096)
    );
    assert_eq!(
        s.read(c(0), 8192, 4096).await.expect("read"),
        bytes(1, 3 * 4096)[8192..].to_vec()
    );
}

/// Block content of write `id` for block `b`: the id, the block, then a pattern.
fn tagged(id: u32, b: usize) -> Vec<u8> {
    let mut v: Vec<u8> = (0..BLOCK).map(|i| (i as u8) ^ (id as u8)).collect();
    v[0..4].copy_from_slice(&id.to_le_bytes());
    v[4..8].copy_from_slice(&(b as u32).to_le_bytes());
    v
}

/// One seeded run with concurrent writers and flushers (aligned writes of 1 to 8 blocks):
/// after the power cut and reopen, each block holds its last write that completed before the
/// start of a completed flush, or a write that completed after it, in the block's order
/// (writes of one block are serialised by the range locks).
async fn concurrent_power_loss_run(seed: u64) -> Result<(bool, bool), String> {
    use rand::{Rng, SeedableRng};
    const CHUNKS: u64 = 2;
    const NB: usize = 32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let f = Scratch::new("cs-cpl", 8 << 20);
    let d = faulty(&f, seed);
    drop(
        ChunkStore::open(d.clone())
            .await
            .map_err(|e| format!("format: {e}"))?,
    );
    d.set_volatile_cache(true);
    let cut = Arc::new(CutDevice::new(d.clone(), rng.gen_range(20..500)).with_jitter(seed));
    let s = Arc::new(
        ChunkStore::open(cut.clone())
            .await
            .map_err(|e| format!("open: {e}"))?,
    );
    // Per block: (write id, ok, completion clock) in completion order.
    type Log = Vec<Vec<(u32, bool, u64)>>;
    let log: Arc<Mutex<Log>> = Arc::new(Mutex::new(vec![Vec::new(); CHUNKS as usize * NB]));
    let clock = Arc::new(AtomicU64::new(1));
    let flushed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let (s, log, clock) = (s.clone(), log.clone(), clock.clone());
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 16 + u64::from(t));
        tasks.push(tokio::spawn(async move {
            for k in 0..40u32 {
                let id = t * 1000 + k + 1;
                let chunk = rng.gen_range(0..CHUNKS);
                // One write in eight covers the whole chunk (out of place when it can).
                let (b0, n, all) = if rng.gen_range(0..8) == 0 {
                    (0, NB, BLOCKS)
                } else {
                    let n = rng.gen_range(1..=8);
                    (rng.gen_range(0..=NB - n), n, n)
                };
                let data: Vec<u8> = (b0..b0 + all).flat_map(|b| tagged(id, b)).collect();
                let ok = s.write(c(chunk), (b0 * BLOCK) as u32, &data).await.is_ok();
                let now = clock.fetch_add(1, Ordering::SeqCst);
                {
                    let mut log = lock(&log);
                    for b in b0..b0 + n {
                        log[chunk as usize * NB + b].push((id, ok, now));
                    }
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    {
        let (s, clock, flushed) = (s.clone(), clock.clone(), flushed.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..60 {
                let start = clock.fetch_add(1, Ordering::SeqCst);
                if s.flush().await.is_ok() {
                    flushed.fetch_max(start, Ordering::SeqCst);
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| format!("task: {e}"))?;
    }
    drop(s);
    d.crash(CrashMode::Partial { tear: true })
        .await
        .map_err(|e| format!("crash: {e}"))?;
    let s = ChunkStore::open(d.clone())
        .await
        .map_err(|e| format!("reopen: {e}"))?;
    let flushed = flushed.load(Ordering::SeqCst);
    let stats = (flushed > 0, cut.tripped());
    let log = std::mem::take(&mut *lock(&log));
    for chunk in 0..CHUNKS {
        let all = s
            .read(c(chunk), 0, (NB * BLOCK) as u32)
            .await
            .map_err(|e| format!("chunk {chunk}: {e}"))?;
        for b in 0..NB {
            let got = &all[b * BLOCK..(b + 1) * BLOCK];
            let writes = &log[chunk as usize * NB + b];
            // The last write that completed before a completed flush started must be there,
            // or a later one.
            let durable = writes
                .iter()
                .rposition(|(_, ok, end)| *ok && *end < flushed);
            let zero_ok = durable.is_none() && got.iter().all(|x| *x == 0);
            let ok = zero_ok
                || writes[durable.unwrap_or(0)..]
                    .iter()
                    .any(|(id, _, _)| got == &tagged(*id, b)[..]);
            if !ok {
                return Err(format!(
                    "chunk {chunk} block {b}: reads {:?}, writes {:?}, flushed at {flushed}",
                    &got[..8],
                    writes
                ));
            }
        }
    }
    Ok(stats)
}

#[tokio::test]
async fn power_loss_with_concurrent_writers_and_flushes() {
    let mut failures = Vec::new();
    let (mut flushed, mut cut) = (0, 0);
    for seed in seeds("SDS_POWER_LOSS_SEEDS", 30) {
        match concurrent_power_loss_run(seed).await {
            Ok((f, c)) => {
                flushed += u32::from(f);
                cut += u32::from(c);
            }
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("concurrent power loss: {flushed} runs with a completed flush, {cut} cut");
    assert!(
        flushed > 15 && cut > 15,
        "{flushed} runs flushed, {cut} cut"
    );
}

/// Holds the next write into `range` until a permit is added to `gate`.
struct HoldDevice {
    inner: Arc<FaultyDevice<FileDevice>>,
    range: std::ops::Range<u64>,
    hold_next: std::sync::atomic::AtomicBool,
    holding: std::sync::atomic::AtomicBool,
    gate: tokio::sync::Semaphore,
}

impl BlockDevice for HoldDevice {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn buffers(&self) -> &crate::device::BufferPool {
        self.inner.buffers()
    }
    async fn read(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        self.inner.read(offset, buf).await
    }
    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        if self.range.contains(&offset) && self.hold_next.swap(false, Ordering::SeqCst) {
            self.holding.store(true, Ordering::SeqCst);
            let _permit = self.gate.acquire().await;
            self.holding.store(false, Ordering::SeqCst);
        }
        self.inner.write(offset, buf).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.discard(offset, len).await
    }
}

#[tokio::test]
async fn a_flush_waits_for_earlier_records_still_in_flight() {
    let f = Scratch::new("cs-inflight", DEV);
    let d = faulty(&f, 7);
    drop(ChunkStore::open(d.clone()).await.expect("format"));
    d.set_volatile_cache(true);
    let sb = *ChunkStore::open(d.clone())
        .await
        .expect("open")
        .superblock();
    let h = Arc::new(HoldDevice {
        inner: d.clone(),
        range: sb.journal_offset..sb.journal_offset + sb.journal_len,
        hold_next: std::sync::atomic::AtomicBool::new(false),
        holding: std::sync::atomic::AtomicBool::new(false),
        gate: tokio::sync::Semaphore::new(0),
    });
    let s = Arc::new(ChunkStore::open(h.clone()).await.expect("open"));
    h.hold_next.store(true, Ordering::SeqCst);
    let a = {
        let s = s.clone();
        tokio::spawn(async move { s.write(c(0), 0, &bytes(1, 4096)).await })
    };
    while !h.holding.load(Ordering::SeqCst) {
        tokio::task::yield_now().await;
    }
    // A later record completes while the earlier one is still in flight.
    s.write(c(1), 0, &bytes(2, 4096)).await.expect("write");
    let flush = {
        let s = s.clone();
        tokio::spawn(async move { s.flush().await })
    };
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !flush.is_finished(),
        "a flush returned while an earlier record was in flight"
    );
    h.gate.add_permits(1);
    a.await.expect("join").expect("write");
    flush.await.expect("join").expect("flush");
    drop(s);
    d.crash(CrashMode::DropUnflushed).await.expect("crash");
    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert_eq!(s.read(c(0), 0, 4096).await.expect("read"), bytes(1, 4096));
    assert_eq!(s.read(c(1), 0, 4096).await.expect("read"), bytes(2, 4096));
}

#[tokio::test]
async fn preallocated_chunks_read_zeros_survive_reopen_and_crashes_and_stay_when_zeroed() {
    let f = Scratch::new("cs-thick", DEV);
    let d = faulty(&f, 21);
    d.set_volatile_cache(true);
    let all;
    {
        let s = ChunkStore::open(d.clone()).await.expect("open");
        all = s.free_slots();
        assert!(s.preallocate(c(0)).await.expect("prealloc"));
        assert!(s.preallocate(c(1)).await.expect("prealloc"));
        assert!(!s.preallocate(c(1)).await.expect("again"), "held already");
        assert_eq!(s.free_slots(), all - 2);
        assert_eq!(s.read(c(0), 0, 8192).await.expect("read"), vec![0u8; 8192]);
        // A write into a pre-allocated chunk; then zero all of it: the chunk stays.
        s.write(c(1), 4096, &bytes(9, 4096)).await.expect("write");
        s.zero_keeping(c(1), 0, CHUNK_SIZE as u32)
            .await
            .expect("zero");
        assert!(s.contains(c(1)));
        s.flush().await.expect("flush");
        // Applied in place by the next flush.
        s.flush().await.expect("flush");
        // Not flushed: lost in the crash, which is fine (the pre-allocator runs again).
        s.preallocate(c(2)).await.expect("prealloc");
    }
    d.crash(CrashMode::DropUnflushed).await.expect("crash");
    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert_eq!(s.corrupt_pages_at_open(), 0);
    assert!(s.contains(c(0)) && s.contains(c(1)));
    assert!(!s.contains(c(2)));
    assert_eq!(s.free_slots(), all - 2);
    assert_eq!(s.read(c(1), 0, 8192).await.expect("read"), vec![0u8; 8192]);
    // A plain trim still frees a pre-allocated chunk (thin semantics are the caller's choice).
    s.trim(c(0), 0, CHUNK_SIZE as u32).await.expect("trim");
    assert!(!s.contains(c(0)));
    // Pre-allocations replayed from the journal without an apply survive too.
    s.preallocate(c(3)).await.expect("prealloc");
    s.flush()
        .await
        .expect("flush: the record is durable, not yet applied");
    drop(s);
    d.crash(CrashMode::DropUnflushed).await.expect("crash");
    let s = ChunkStore::open(d.clone()).await.expect("reopen");
    assert!(s.contains(c(3)), "a durable allocation record is replayed");
    assert_eq!(s.read(c(3), 0, 4096).await.expect("read"), vec![0u8; 4096]);
}
