//! The chunk store: 1 MiB chunks keyed by `ChunkId` on one device, allocated on first write,
//! with a CRC32 for every 4 KiB block.
//!
//! On-disk layout (format version [`FORMAT_VERSION`]):
//! ```text
//! [0, 4K)                 superblock: magic "MESHBLK1", version u32, slot_count u64,
//!                         meta_offset u64, data_offset u64, crc32 u32
//! [meta_offset + i*4K)    meta page of slot i: magic u32 (0 = free), version u32, vtree u64,
//!                         chunk index u64, generation u64, 256 x block crc32, 256-bit
//!                         "written" bitmap, page crc32 in the last 4 bytes
//! [data_offset + i*1M)    data of slot i
//! ```
//! Every metadata update is one aligned 4 KiB write, submitted together with the data write. Callers serialise writes to one chunk (the service holds a per-chunk
//! lock across local write and forward); reads may run concurrently.
//!
//! Not yet crash-consistent across the two writes (a crash that lands one but not the other can
//! leave a block whose CRC does not match): the issue "Data safety" adds a journal. Unwritten blocks read as zeros.

use crate::device::{AlignedBuf, BlockDevice, DeviceError, ALIGN};
use proto::{ChunkId, ChunkIndex, VtreeId, CHUNK_SIZE};
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

pub const FORMAT_VERSION: u32 = 1;
const SB_MAGIC: &[u8; 8] = b"MESHBLK1";
const META_MAGIC: u32 = 0x4D42_4348;
const BLOCK: usize = 4096;
const BLOCKS_PER_CHUNK: usize = (CHUNK_SIZE as usize) / BLOCK;
const META_PAGE: u64 = 4096;
/// Meta pages read per device request when loading.
const LOAD_BATCH_PAGES: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("checksum mismatch in chunk {chunk} at offset {offset}")]
    ChecksumMismatch { chunk: ChunkId, offset: u32 },
    #[error("the device is full: no free chunk slot")]
    NoSpace,
    #[error("the device holds another format (magic or version {0}); refusing to use it")]
    Format(String),
    #[error("the device is too small for one chunk")]
    TooSmall,
}

#[derive(Clone)]
struct SlotMeta {
    chunk: ChunkId,
    generation: u64,
    crcs: [u32; BLOCKS_PER_CHUNK],
    written: [u64; BLOCKS_PER_CHUNK / 64],
}

impl SlotMeta {
    fn is_written(&self, b: usize) -> bool {
        self.written[b / 64] & (1 << (b % 64)) != 0
    }
    fn encode(&self) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(META_PAGE as usize);
        let p = buf.as_mut_slice();
        p[0..4].copy_from_slice(&META_MAGIC.to_le_bytes());
        p[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        p[8..16].copy_from_slice(&self.chunk.vtree.0.to_le_bytes());
        p[16..24].copy_from_slice(&self.chunk.index.0.to_le_bytes());
        p[24..32].copy_from_slice(&self.generation.to_le_bytes());
        for (i, c) in self.crcs.iter().enumerate() {
            p[32 + i * 4..36 + i * 4].copy_from_slice(&c.to_le_bytes());
        }
        for (i, w) in self.written.iter().enumerate() {
            p[1056 + i * 8..1064 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        let crc = crc32fast::hash(&p[..4092]);
        p[4092..4096].copy_from_slice(&crc.to_le_bytes());
        buf
    }
    fn decode(p: &[u8]) -> Option<SlotMeta> {
        let u32_at = |i: usize| u32::from_le_bytes(p[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().unwrap_or([0; 8]));
        if p.len() < META_PAGE as usize || u32_at(0) != META_MAGIC || u32_at(4) != FORMAT_VERSION {
            return None;
        }
        if crc32fast::hash(&p[..4092]) != u32_at(4092) {
            return None;
        }
        let mut m = SlotMeta {
            chunk: ChunkId {
                vtree: VtreeId(u64_at(8)),
                index: ChunkIndex(u64_at(16)),
            },
            generation: u64_at(24),
            crcs: [0; BLOCKS_PER_CHUNK],
            written: [0; BLOCKS_PER_CHUNK / 64],
        };
        for i in 0..BLOCKS_PER_CHUNK {
            m.crcs[i] = u32_at(32 + i * 4);
        }
        for i in 0..BLOCKS_PER_CHUNK / 64 {
            m.written[i] = u64_at(1056 + i * 8);
        }
        Some(m)
    }
}

pub struct ChunkStore<D> {
    dev: D,
    meta_offset: u64,
    data_offset: u64,
    slot_count: u64,
    index: RwLock<HashMap<ChunkId, usize>>,
    slots: Vec<Mutex<Option<SlotMeta>>>,
    free: Mutex<Vec<usize>>,
}

impl<D: BlockDevice> ChunkStore<D> {
    /// Open the store on `dev`, formatting it when it is blank (all zeros at the superblock).
    pub async fn open(dev: D) -> Result<ChunkStore<D>, StoreError> {
        let cap = dev.capacity();
        let per_slot = CHUNK_SIZE + META_PAGE;
        if cap < 4096 + per_slot {
            return Err(StoreError::TooSmall);
        }
        let sb = dev.read(0, AlignedBuf::zeroed(4096)).await?;
        let s = sb.as_slice();
        let (slot_count, meta_offset, data_offset, fresh) = if s.iter().all(|b| *b == 0) {
            let slot_count = (cap - 4096) / per_slot;
            let meta_offset = 4096u64;
            let data_offset =
                (meta_offset + slot_count * META_PAGE).div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
            let slot_count = slot_count.min((cap - data_offset) / CHUNK_SIZE);
            (slot_count, meta_offset, data_offset, true)
        } else {
            if &s[0..8] != SB_MAGIC {
                return Err(StoreError::Format(format!("magic {:?}", &s[0..8])));
            }
            let version = u32::from_le_bytes(s[8..12].try_into().unwrap_or([0; 4]));
            let crc = u32::from_le_bytes(s[36..40].try_into().unwrap_or([0; 4]));
            if version != FORMAT_VERSION || crc != crc32fast::hash(&s[0..36]) {
                return Err(StoreError::Format(format!("version {version}")));
            }
            let u = |i: usize| u64::from_le_bytes(s[i..i + 8].try_into().unwrap_or([0; 8]));
            (u(12), u(20), u(28), false)
        };
        let store = ChunkStore {
            dev,
            meta_offset,
            data_offset,
            slot_count,
            index: RwLock::new(HashMap::new()),
            slots: (0..slot_count).map(|_| Mutex::new(None)).collect(),
            free: Mutex::new(Vec::new()),
        };
        if fresh {
            store.format().await?;
        } else {
            store.load().await?;
        }
        Ok(store)
    }

    async fn format(&self) -> Result<(), StoreError> {
        // Zero the meta region (a block device may hold old bytes), then the superblock last.
        let total = self.data_offset - self.meta_offset;
        let mut off = 0;
        while off < total {
            let n = (total - off).min(CHUNK_SIZE) as usize;
            self.dev
                .write(self.meta_offset + off, AlignedBuf::zeroed(n))
                .await?;
            off += n as u64;
        }
        let mut sb = AlignedBuf::zeroed(4096);
        let p = sb.as_mut_slice();
        p[0..8].copy_from_slice(SB_MAGIC);
        p[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        p[12..20].copy_from_slice(&self.slot_count.to_le_bytes());
        p[20..28].copy_from_slice(&self.meta_offset.to_le_bytes());
        p[28..36].copy_from_slice(&self.data_offset.to_le_bytes());
        let crc = crc32fast::hash(&p[0..36]);
        p[36..40].copy_from_slice(&crc.to_le_bytes());
        self.dev.write(0, sb).await?;
        self.dev.flush().await?;
        if let Ok(mut f) = self.free.lock() {
            *f = (0..self.slot_count as usize).rev().collect();
        }
        Ok(())
    }

    async fn load(&self) -> Result<(), StoreError> {
        let mut index = HashMap::new();
        let mut free = Vec::new();
        let mut first = 0u64;
        while first < self.slot_count {
            let n = (self.slot_count - first).min(LOAD_BATCH_PAGES);
            let buf = self
                .dev
                .read(
                    self.meta_offset + first * META_PAGE,
                    AlignedBuf::zeroed((n * META_PAGE) as usize),
                )
                .await?;
            for i in 0..n {
                let slot = (first + i) as usize;
                let page =
                    &buf.as_slice()[(i * META_PAGE) as usize..((i + 1) * META_PAGE) as usize];
                match SlotMeta::decode(page) {
                    Some(m) if !index.contains_key(&m.chunk) => {
                        index.insert(m.chunk, slot);
                        if let Some(s) = self.slots.get(slot) {
                            if let Ok(mut s) = s.lock() {
                                *s = Some(m);
                            }
                        }
                    }
                    _ => free.push(slot),
                }
            }
            first += n;
        }
        free.reverse();
        if let Ok(mut i) = self.index.write() {
            *i = index;
        }
        if let Ok(mut f) = self.free.lock() {
            *f = free;
        }
        Ok(())
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.slot_count * CHUNK_SIZE
    }

    pub fn used_chunks(&self) -> usize {
        self.index.read().map(|i| i.len()).unwrap_or(0)
    }

    fn slot_of(&self, chunk: ChunkId) -> Option<usize> {
        self.index.read().ok()?.get(&chunk).copied()
    }

    fn meta(&self, slot: usize) -> Option<SlotMeta> {
        self.slots.get(slot)?.lock().ok()?.clone()
    }

    fn allocate(&self, chunk: ChunkId) -> Result<usize, StoreError> {
        let mut index = self.index.write().map_err(|_| StoreError::NoSpace)?;
        if let Some(s) = index.get(&chunk) {
            return Ok(*s);
        }
        let slot = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .ok_or(StoreError::NoSpace)?;
        if let Some(Ok(mut s)) = self.slots.get(slot).map(|s| s.lock()) {
            *s = Some(SlotMeta {
                chunk,
                generation: 1,
                crcs: [0; BLOCKS_PER_CHUNK],
                written: [0; BLOCKS_PER_CHUNK / 64],
            });
        }
        index.insert(chunk, slot);
        Ok(slot)
    }

    /// Read `len` bytes at `offset` of `chunk`; unwritten blocks are zeros; every written block
    /// is checked against its CRC.
    pub async fn read(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<Vec<u8>, StoreError> {
        let (b0, b1) = block_range(offset, len);
        let Some(slot) = self.slot_of(chunk) else {
            return Ok(vec![0u8; len as usize]);
        };
        let Some(meta) = self.meta(slot) else {
            return Ok(vec![0u8; len as usize]);
        };
        let any_written = (b0..b1).any(|b| meta.is_written(b));
        let mut out = vec![0u8; (b1 - b0) * BLOCK];
        if any_written {
            let buf = self
                .dev
                .read(
                    self.data_at(slot, b0),
                    AlignedBuf::zeroed((b1 - b0) * BLOCK),
                )
                .await?;
            for b in b0..b1 {
                if !meta.is_written(b) {
                    continue;
                }
                let blk = &buf.as_slice()[(b - b0) * BLOCK..(b - b0 + 1) * BLOCK];
                if crc32fast::hash(blk) != meta.crcs[b] {
                    return Err(StoreError::ChecksumMismatch {
                        chunk,
                        offset: (b * BLOCK) as u32,
                    });
                }
                out[(b - b0) * BLOCK..(b - b0 + 1) * BLOCK].copy_from_slice(blk);
            }
        }
        let start = offset as usize - b0 * BLOCK;
        out.drain(..start);
        out.truncate(len as usize);
        Ok(out)
    }

    fn data_at(&self, slot: usize, block: usize) -> u64 {
        self.data_offset + slot as u64 * CHUNK_SIZE + (block * BLOCK) as u64
    }

    /// Write `data` at `offset` of `chunk`. The caller serialises writes to one chunk.
    pub async fn write(&self, chunk: ChunkId, offset: u32, data: &[u8]) -> Result<(), StoreError> {
        let (b0, b1) = block_range(offset, data.len() as u32);
        let slot = self.allocate(chunk)?;
        let mut meta = self.meta(slot).ok_or(StoreError::NoSpace)?;
        let mut buf = AlignedBuf::zeroed((b1 - b0) * BLOCK);
        let head = offset as usize - b0 * BLOCK;
        let tail_end = head + data.len();
        // Partial first or last block: start from what is stored.
        if head != 0 || !tail_end.is_multiple_of(BLOCK) {
            let old = self
                .read(chunk, (b0 * BLOCK) as u32, ((b1 - b0) * BLOCK) as u32)
                .await?;
            buf.as_mut_slice().copy_from_slice(&old);
        }
        buf.as_mut_slice()[head..tail_end].copy_from_slice(data);
        for b in b0..b1 {
            meta.crcs[b] = crc32fast::hash(&buf.as_slice()[(b - b0) * BLOCK..(b - b0 + 1) * BLOCK]);
            meta.written[b / 64] |= 1 << (b % 64);
        }
        meta.generation += 1;
        // Data and its meta page go to the device together (one round of device latency).
        let (d, m) = tokio::join!(
            self.dev.write(self.data_at(slot, b0), buf),
            self.dev
                .write(self.meta_offset + slot as u64 * META_PAGE, meta.encode())
        );
        d?;
        m?;
        if let Some(Ok(mut s)) = self.slots.get(slot).map(|s| s.lock()) {
            *s = Some(meta);
        }
        Ok(())
    }

    /// Deallocate: a whole chunk is freed, a partial range is zeroed.
    pub async fn trim(&self, chunk: ChunkId, offset: u32, len: u32) -> Result<(), StoreError> {
        let Some(slot) = self.slot_of(chunk) else {
            return Ok(());
        };
        if offset == 0 && u64::from(len) == CHUNK_SIZE {
            self.dev
                .write(
                    self.meta_offset + slot as u64 * META_PAGE,
                    AlignedBuf::zeroed(META_PAGE as usize),
                )
                .await?;
            if let Ok(mut i) = self.index.write() {
                i.remove(&chunk);
            }
            if let Some(Ok(mut s)) = self.slots.get(slot).map(|s| s.lock()) {
                *s = None;
            }
            if let Ok(mut f) = self.free.lock() {
                f.push(slot);
            }
            return Ok(());
        }
        self.write(chunk, offset, &vec![0u8; len as usize]).await
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        Ok(self.dev.flush().await?)
    }

    /// One byte per chunk from `first`: 1 when this store holds it.
    pub fn allocated(&self, vtree: VtreeId, first: u64, count: u32) -> Vec<u8> {
        let Ok(index) = self.index.read() else {
            return vec![1; count as usize];
        };
        (0..u64::from(count))
            .map(|i| {
                u8::from(index.contains_key(&ChunkId {
                    vtree,
                    index: ChunkIndex(first + i),
                }))
            })
            .collect()
    }

    pub fn device(&self) -> &D {
        &self.dev
    }
}

fn block_range(offset: u32, len: u32) -> (usize, usize) {
    let b0 = offset as usize / BLOCK;
    let b1 = (offset as usize + len as usize).div_ceil(BLOCK).max(b0);
    (b0, b1)
}

const _: () = assert!(ALIGN == BLOCK);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{FaultyDevice, FileDevice, UringDevice};

    fn tmpfile(name: &str, size: u64) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("mb-cs-{name}-{}", std::process::id()));
        let f = std::fs::File::create(&p).expect("create");
        f.set_len(size).expect("size");
        p
    }

    fn cid(i: u64) -> ChunkId {
        ChunkId {
            vtree: VtreeId(7),
            index: ChunkIndex(i),
        }
    }

    #[tokio::test]
    async fn round_trip_partial_writes_holes_and_reopen() {
        let p = tmpfile("rt", 16 << 20);
        {
            let s = ChunkStore::open(UringDevice::open(&p).expect("dev"))
                .await
                .expect("open");
            assert_eq!(
                s.read(cid(0), 0, 4096).await.expect("hole"),
                vec![0u8; 4096]
            );
            s.write(cid(0), 100, b"hello").await.expect("write");
            s.write(cid(0), 4090, &[7u8; 20])
                .await
                .expect("straddling write");
            s.write(cid(3), 0, &vec![9u8; CHUNK_SIZE as usize])
                .await
                .expect("whole chunk");
            let r = s.read(cid(0), 96, 12).await.expect("read");
            assert_eq!(&r, b"\0\0\0\0hello\0\0\0");
            assert_eq!(s.read(cid(0), 4090, 20).await.expect("read"), vec![7u8; 20]);
            s.flush().await.expect("flush");
            assert_eq!(s.allocated(VtreeId(7), 0, 4), vec![1, 0, 0, 1]);
        }
        let s = ChunkStore::open(UringDevice::open(&p).expect("dev"))
            .await
            .expect("reopen");
        assert_eq!(&s.read(cid(0), 100, 5).await.expect("read"), b"hello");
        assert_eq!(
            s.read(cid(3), 0, CHUNK_SIZE as u32).await.expect("read"),
            vec![9u8; CHUNK_SIZE as usize]
        );
        s.trim(cid(3), 0, CHUNK_SIZE as u32).await.expect("trim");
        assert_eq!(s.allocated(VtreeId(7), 0, 4), vec![1, 0, 0, 0]);
        assert_eq!(
            s.read(cid(3), 0, 4096).await.expect("read"),
            vec![0u8; 4096]
        );
        let _ = std::fs::remove_file(p);
    }

    #[tokio::test]
    async fn corruption_is_detected_and_device_errors_surface() {
        let p = tmpfile("crc", 16 << 20);
        let s = ChunkStore::open(FaultyDevice::new(FileDevice::open(&p).expect("dev")))
            .await
            .expect("open");
        s.write(cid(1), 0, &[5u8; 8192]).await.expect("write");
        let slot = s.slot_of(cid(1)).expect("slot");
        let at = s.data_at(slot, 1);
        s.device().flip_range(at, at + 1);
        assert!(matches!(
            s.read(cid(1), 4096, 4096).await,
            Err(StoreError::ChecksumMismatch { offset: 4096, .. })
        ));
        assert!(
            s.read(cid(1), 0, 4096).await.is_ok(),
            "the other block is intact"
        );
        s.device().flip_range(0, 0);
        s.device().fail_range(at, at + 4096);
        assert!(matches!(
            s.write(cid(1), 4096, &[1u8; 4096]).await,
            Err(StoreError::Device(_))
        ));
        let _ = std::fs::remove_file(p);
    }

    #[tokio::test]
    async fn foreign_format_is_refused() {
        let p = tmpfile("fmt", 16 << 20);
        std::fs::write(&p, b"not a meshblock device").expect("write");
        std::fs::File::options()
            .write(true)
            .open(&p)
            .expect("open")
            .set_len(16 << 20)
            .expect("len");
        assert!(matches!(
            ChunkStore::open(FileDevice::open(&p).expect("dev")).await,
            Err(StoreError::Format(_))
        ));
        let _ = std::fs::remove_file(p);
    }
}
