//! The on-disk encoding of the chunk store: superblock and meta pages. Pure functions, no I/O.
//! See the parent module for the layout; every field is little-endian.

use crate::range_lock::BLOCKS;
use proto::{ChunkId, VtreeId, CHUNK_SIZE};

/// Version of the device format, in the superblock. Bump on any change; the store refuses
/// versions it does not know. Version 3 added the journal's `Relocate` record (a whole chunk
/// written out of place); everything else is as in version 2, whose devices are still read and
/// written (without that record, so an SDS of version 2 can still open them).
pub const FORMAT_VERSION: u32 = 3;
/// Oldest superblock version this SDS opens.
pub const OLDEST_FORMAT_VERSION: u32 = 2;
/// Version stamped into meta pages, journal records and checkpoint pages: their encoding is
/// unchanged since format version 2.
pub const PAGE_FORMAT: u32 = 2;
/// First 8 bytes of the superblock.
pub const SUPERBLOCK_MAGIC: [u8; 8] = *b"MBLKSDS\0";
/// First 4 bytes of a meta page in use ("MBCK").
pub const META_MAGIC: u32 = 0x4B43_424D;
/// Size of the superblock and of one meta page.
pub const PAGE: usize = 4096;
/// Bytes of a 4 KiB block.
pub const BLOCK: usize = proto::BLOCK_SIZE as usize;
/// Words of the per-chunk written bitmap.
pub const WRITTEN_WORDS: usize = BLOCKS / 64;

const CRC_AT: usize = PAGE - 4;

/// Smallest and largest journal region (checkpoint pages included).
pub const JOURNAL_MIN: u64 = 1 << 20;
pub const JOURNAL_MAX: u64 = 64 << 20;

/// Geometry and identity of a formatted device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Format version ([`FORMAT_VERSION`] for a device formatted now).
    pub version: u32,
    /// Random at format; every meta page carries it, so pages from an earlier format of the
    /// same device (or random bytes) are never taken for live ones.
    pub device_uuid: u128,
    pub slot_count: u64,
    /// The journal region: two checkpoint pages, then the circular record area.
    pub journal_offset: u64,
    pub journal_len: u64,
    pub meta_offset: u64,
    pub data_offset: u64,
    /// Device capacity when formatted.
    pub capacity: u64,
    pub created_unix: u64,
}

/// Why a superblock was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SuperblockError {
    #[error("no Meshblock superblock (magic {0:02x?}); the device holds other data")]
    ForeignMagic([u8; 8]),
    #[error(
        "format version {found} is not supported (this SDS reads versions \
         {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}); use an SDS release that supports it"
    )]
    Version { found: u32 },
    #[error("the superblock is corrupt (checksum mismatch)")]
    Checksum,
    #[error("the superblock describes an impossible geometry: {0}")]
    Geometry(String),
    #[error("neither journal checkpoint page is valid")]
    NoCheckpoint,
}

fn u32_at(p: &[u8], i: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = p.get(i..i + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn u64_at(p: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = p.get(i..i + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn u128_at(p: &[u8], i: usize) -> u128 {
    let mut a = [0u8; 16];
    if let Some(s) = p.get(i..i + 16) {
        a.copy_from_slice(s);
    }
    u128::from_le_bytes(a)
}

fn page_crc(p: &[u8]) -> u32 {
    crc32fast::hash(p.get(..CRC_AT).unwrap_or(&[]))
}

impl Superblock {
    /// The geometry for a device of `capacity` bytes: a journal of 1/16 of the device (1 to 64
    /// MiB), then as many slots as fit, each a 4 KiB meta page plus 1 MiB of data, with the
    /// data region 1 MiB-aligned. `None` if not one fits.
    pub fn plan(capacity: u64, device_uuid: u128, created_unix: u64) -> Option<Superblock> {
        let journal_offset = PAGE as u64;
        let journal_len =
            (capacity / 16 / PAGE as u64 * PAGE as u64).clamp(JOURNAL_MIN, JOURNAL_MAX);
        let meta_offset = journal_offset + journal_len;
        let per_slot = CHUNK_SIZE + PAGE as u64;
        let mut slots = capacity.checked_sub(meta_offset)? / per_slot;
        loop {
            let data_offset = (meta_offset + slots * PAGE as u64).div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
            if data_offset + slots * CHUNK_SIZE <= capacity {
                return (slots > 0).then_some(Superblock {
                    version: FORMAT_VERSION,
                    device_uuid,
                    slot_count: slots,
                    journal_offset,
                    journal_len,
                    meta_offset,
                    data_offset,
                    capacity,
                    created_unix,
                });
            }
            slots = slots.checked_sub(1)?;
        }
    }

    pub fn encode(&self, p: &mut [u8]) {
        p.fill(0);
        p[0..8].copy_from_slice(&SUPERBLOCK_MAGIC);
        p[8..12].copy_from_slice(&self.version.to_le_bytes());
        p[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        p[16..20].copy_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
        p[24..40].copy_from_slice(&self.device_uuid.to_le_bytes());
        p[40..48].copy_from_slice(&self.slot_count.to_le_bytes());
        p[48..56].copy_from_slice(&self.meta_offset.to_le_bytes());
        p[56..64].copy_from_slice(&self.data_offset.to_le_bytes());
        p[64..72].copy_from_slice(&self.capacity.to_le_bytes());
        p[72..80].copy_from_slice(&self.created_unix.to_le_bytes());
        p[80..88].copy_from_slice(&self.journal_offset.to_le_bytes());
        p[88..96].copy_from_slice(&self.journal_len.to_le_bytes());
        let crc = page_crc(p);
        p[CRC_AT..PAGE].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode and validate against a device of `capacity` bytes.
    pub fn decode(p: &[u8], capacity: u64) -> Result<Superblock, SuperblockError> {
        if p.len() < PAGE {
            return Err(SuperblockError::Geometry("short superblock".into()));
        }
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&p[0..8]);
        if magic != SUPERBLOCK_MAGIC {
            return Err(SuperblockError::ForeignMagic(magic));
        }
        let version = u32_at(p, 8);
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(SuperblockError::Version { found: version });
        }
        if page_crc(p) != u32_at(p, CRC_AT) {
            return Err(SuperblockError::Checksum);
        }
        let sb = Superblock {
            version,
            device_uuid: u128_at(p, 24),
            slot_count: u64_at(p, 40),
            journal_offset: u64_at(p, 80),
            journal_len: u64_at(p, 88),
            meta_offset: u64_at(p, 48),
            data_offset: u64_at(p, 56),
            capacity: u64_at(p, 64),
            created_unix: u64_at(p, 72),
        };
        let bad = |m: &str| Err(SuperblockError::Geometry(m.to_string()));
        if u32_at(p, 12) != BLOCK as u32 || u64::from(u32_at(p, 16)) != CHUNK_SIZE {
            return bad("block or chunk size differs");
        }
        let meta_end = sb
            .slot_count
            .checked_mul(PAGE as u64)
            .and_then(|m| m.checked_add(sb.meta_offset));
        let data_end = sb
            .slot_count
            .checked_mul(CHUNK_SIZE)
            .and_then(|d| d.checked_add(sb.data_offset));
        match (meta_end, data_end) {
            (Some(m), Some(d))
                if sb.journal_offset == PAGE as u64
                    && sb.journal_len >= JOURNAL_MIN
                    && sb.journal_len.is_multiple_of(PAGE as u64)
                    && sb.journal_offset.checked_add(sb.journal_len) <= Some(sb.meta_offset)
                    && m <= sb.data_offset
                    && sb.meta_offset.is_multiple_of(PAGE as u64)
                    && sb.data_offset.is_multiple_of(PAGE as u64)
                    && d <= capacity => {}
            (_, Some(d)) if d > capacity => {
                return bad(&format!("it needs {d} bytes, the device has {capacity}"))
            }
            _ => return bad("regions overlap or overflow"),
        }
        if sb.slot_count > u64::from(u32::MAX) {
            return bad("too many slots");
        }
        Ok(sb)
    }
}

/// Index of a slot: a meta page and a 1 MiB data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotIndex(pub u32);

/// The metadata of one allocated chunk, as its meta page holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkMeta {
    pub chunk: ChunkId,
    /// Device-wide counter value of the last change; of two pages claiming one chunk the
    /// higher wins. A later journal or copy-on-write scheme orders versions by it.
    pub generation: u64,
    /// Blocks written since allocation (others read as zeros).
    pub written: [u64; WRITTEN_WORDS],
    /// CRC32 of each written block.
    pub crcs: [u32; BLOCKS],
}

/// What a meta page says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaPage {
    /// Zeros, or a page of another format (device uuid differs): the slot is free.
    Free,
    InUse(Box<ChunkMeta>),
    /// Our magic and device, but the checksum fails: a torn or corrupted page.
    Corrupt,
    /// Our magic and device, another version.
    Version(u32),
}

impl ChunkMeta {
    pub fn new(chunk: ChunkId) -> ChunkMeta {
        ChunkMeta {
            chunk,
            generation: 0,
            written: [0; WRITTEN_WORDS],
            crcs: [0; BLOCKS],
        }
    }

    pub fn is_written(&self, block: usize) -> bool {
        self.written
            .get(block / 64)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    pub fn set_written(&mut self, block: usize, crc: u32) {
        if let (Some(w), Some(c)) = (self.written.get_mut(block / 64), self.crcs.get_mut(block)) {
            *w |= 1 << (block % 64);
            *c = crc;
        }
    }

    pub fn clear_written(&mut self, block: usize) {
        if let (Some(w), Some(c)) = (self.written.get_mut(block / 64), self.crcs.get_mut(block)) {
            *w &= !(1 << (block % 64));
            *c = 0;
        }
    }

    pub fn any_written(&self) -> bool {
        self.written.iter().any(|w| *w != 0)
    }

    /// Encode into a 4 KiB page for `slot` of the device `device_uuid`.
    pub fn encode(&self, p: &mut [u8], device_uuid: u128, slot: SlotIndex) {
        p.fill(0);
        p[0..4].copy_from_slice(&META_MAGIC.to_le_bytes());
        p[4..8].copy_from_slice(&PAGE_FORMAT.to_le_bytes());
        p[8..24].copy_from_slice(&device_uuid.to_le_bytes());
        p[24..28].copy_from_slice(&slot.0.to_le_bytes());
        p[32..40].copy_from_slice(&self.chunk.vtree.0.to_le_bytes());
        p[40..48].copy_from_slice(&self.chunk.disk_index().to_le_bytes());
        p[48..56].copy_from_slice(&self.generation.to_le_bytes());
        for (i, w) in self.written.iter().enumerate() {
            p[64 + i * 8..72 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        for (i, c) in self.crcs.iter().enumerate() {
            p[96 + i * 4..100 + i * 4].copy_from_slice(&c.to_le_bytes());
        }
        let crc = page_crc(p);
        p[CRC_AT..PAGE].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode the page found at `slot` of the device `device_uuid`.
    pub fn decode(p: &[u8], device_uuid: u128, slot: SlotIndex) -> MetaPage {
        if p.len() < PAGE || u32_at(p, 0) != META_MAGIC || u128_at(p, 8) != device_uuid {
            return MetaPage::Free;
        }
        let version = u32_at(p, 4);
        if version != PAGE_FORMAT {
            return MetaPage::Version(version);
        }
        if page_crc(p) != u32_at(p, CRC_AT) || u32_at(p, 24) != slot.0 {
            return MetaPage::Corrupt;
        }
        MetaPage::InUse(Box::new(Self::fields(p)))
    }

    /// Decode a page that failed its checksum (torn by a crash during a journal apply) when its
    /// header sector still names this device, version and slot: the journal replay then
    /// rewrites every block and CRC the interrupted apply was changing, and the others are the
    /// same in the old and the new page. `None` if even the header does not match.
    pub fn decode_lenient(p: &[u8], device_uuid: u128, slot: SlotIndex) -> Option<ChunkMeta> {
        (p.len() >= PAGE
            && u32_at(p, 0) == META_MAGIC
            && u128_at(p, 8) == device_uuid
            && u32_at(p, 4) == PAGE_FORMAT
            && u32_at(p, 24) == slot.0)
            .then(|| Self::fields(p))
    }

    fn fields(p: &[u8]) -> ChunkMeta {
        let mut m = ChunkMeta::new(ChunkId::from_disk(VtreeId(u64_at(p, 32)), u64_at(p, 40)));
        m.generation = u64_at(p, 48);
        for (i, w) in m.written.iter_mut().enumerate() {
            *w = u64_at(p, 64 + i * 8);
        }
        for (i, c) in m.crcs.iter_mut().enumerate() {
            *c = u32_at(p, 96 + i * 4);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proto::{ChunkIndex, LayerId, MAX_CHUNK_INDEX, MAX_LAYER};

    #[test]
    fn plan_fits_the_device() {
        assert_eq!(Superblock::plan(1 << 20, 1, 0), None, "1 MiB holds no slot");
        for cap in [3u64 << 20, 16 << 20, 1 << 30, (1 << 40) + 12345 * 4096] {
            let sb = Superblock::plan(cap, 1, 0).expect("plan");
            assert!(sb.data_offset + sb.slot_count * CHUNK_SIZE <= cap);
            assert!(sb.meta_offset + sb.slot_count * PAGE as u64 <= sb.data_offset);
            assert!(sb.journal_offset + sb.journal_len <= sb.meta_offset);
            assert_eq!(sb.data_offset % CHUNK_SIZE, 0);
            // No room left for one more slot.
            let more = sb.slot_count + 1;
            let data_offset =
                (sb.meta_offset + more * PAGE as u64).div_ceil(CHUNK_SIZE) * CHUNK_SIZE;
            assert!(data_offset + more * CHUNK_SIZE > cap, "cap {cap}");
        }
    }

    #[test]
    fn superblock_round_trips_and_refuses_damage() {
        let sb = Superblock::plan(64 << 20, 0xABCD, 99).expect("plan");
        let mut p = vec![0u8; PAGE];
        sb.encode(&mut p);
        assert_eq!(Superblock::decode(&p, 64 << 20), Ok(sb));
        assert!(matches!(
            Superblock::decode(&p, 32 << 20),
            Err(SuperblockError::Geometry(_))
        ));
        let mut q = p.clone();
        q[45] ^= 1;
        assert_eq!(
            Superblock::decode(&q, 64 << 20),
            Err(SuperblockError::Checksum)
        );
        let mut q = p.clone();
        q[8] = 9;
        assert_eq!(
            Superblock::decode(&q, 64 << 20),
            Err(SuperblockError::Version { found: 9 })
        );
        let mut q = p.clone();
        q[0] = b'X';
        assert!(matches!(
            Superblock::decode(&q, 64 << 20),
            Err(SuperblockError::ForeignMagic(_))
        ));
        assert!(Superblock::decode(&p[..100], 64 << 20).is_err());
    }

    proptest! {
        #[test]
        fn meta_page_round_trips_and_rejects_any_flip(vtree: u64, index in 0..MAX_CHUNK_INDEX,
            layer in 0..=MAX_LAYER, gen: u64,
            blocks in proptest::collection::vec((0usize..BLOCKS, any::<u32>()), 0..40),
            flip in 0usize..PAGE * 8) {
            let chunk = ChunkId::new(VtreeId(vtree), ChunkIndex(index)).in_layer(LayerId(layer));
            let mut m = ChunkMeta::new(chunk);
            m.generation = gen;
            for (b, crc) in blocks {
                m.set_written(b, crc);
            }
            let mut p = vec![0u8; PAGE];
            m.encode(&mut p, 77, SlotIndex(5));
            prop_assert_eq!(ChunkMeta::decode(&p, 77, SlotIndex(5)), MetaPage::InUse(Box::new(m.clone())));
            prop_assert_eq!(ChunkMeta::decode(&p, 78, SlotIndex(5)), MetaPage::Free);
            prop_assert_eq!(ChunkMeta::decode(&p, 77, SlotIndex(6)), MetaPage::Corrupt);
            prop_assert_eq!(ChunkMeta::decode(&p[..100], 77, SlotIndex(5)), MetaPage::Free);
            p[flip / 8] ^= 1 << (flip % 8);
            prop_assert_ne!(ChunkMeta::decode(&p, 77, SlotIndex(5)), MetaPage::InUse(Box::new(m)));
        }
    }

    #[test]
    fn zero_pages_are_free() {
        assert_eq!(
            ChunkMeta::decode(&[0u8; PAGE], 1, SlotIndex(0)),
            MetaPage::Free
        );
    }
}
