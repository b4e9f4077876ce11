//! The on-disk encoding of the journal: record headers and checkpoint pages. Pure functions,
//! no I/O. See the parent module for how they are used; every field is little-endian.

use super::layout::{SlotIndex, PAGE, PAGE_FORMAT};
use proto::{ChunkId, VtreeId};

/// First 4 bytes of a record header ("MBJR").
pub const RECORD_MAGIC: u32 = 0x524A_424D;
/// First 4 bytes of a checkpoint page ("MBJC").
pub const CHECKPOINT_MAGIC: u32 = 0x434A_424D;
/// Most payload blocks in one record: a whole chunk. A store whose journal is small takes
/// fewer per record ([`record_blocks`]); longer writes are split.
pub const MAX_RECORD_BLOCKS: usize = crate::range_lock::BLOCKS;

/// Payload blocks per record on a journal of `journal_len` bytes: a record takes at most 1/8
/// of the journal (so several fit before the half-full apply), and never more than a chunk.
pub fn record_blocks(journal_len: u64) -> usize {
    let eighth = (journal_len / 8 / PAGE as u64) as usize;
    eighth.saturating_sub(1).clamp(1, MAX_RECORD_BLOCKS)
}

const CRC_AT: usize = PAGE - 4;

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

/// What a record does to its chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Blocks `[first, first + count)` get the payload (full blocks) and become written. With
    /// `count` 0 the record only allocates the chunk (thick pre-allocation).
    Write = 1,
    /// Blocks `[first, first + count)` become unwritten (read as zeros). No payload.
    Trim = 2,
    /// The chunk's slot is freed. No payload.
    Free = 3,
    /// The whole chunk was written out of place: `slot` holds all its blocks, written and made
    /// durable by a device flush before this record was written; the chunk's previous slot
    /// `from` (equal to `slot` when the chunk had no data to keep there) is freed. Replay reads
    /// the blocks' CRCs from `slot`. `first` 0, `count` a chunk, no payload. Only on devices
    /// of format version 3 and later.
    Relocate = 4,
}

impl RecordKind {
    fn from_u32(v: u32) -> Option<RecordKind> {
        match v {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Trim),
            3 => Some(RecordKind::Free),
            4 => Some(RecordKind::Relocate),
            _ => None,
        }
    }
}

/// The header block of a journal record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub epoch: u64,
    pub seq: u64,
    pub kind: RecordKind,
    pub chunk: ChunkId,
    pub slot: SlotIndex,
    /// For a `Relocate`, the slot the chunk leaves; `slot` for the other kinds.
    pub from: SlotIndex,
    pub first: u32,
    pub count: u32,
    pub generation: u64,
    /// CRC32 of the payload blocks (of nothing for trims and frees).
    pub payload_crc: u32,
}

impl RecordHeader {
    /// Payload bytes that follow the header on the device.
    pub fn payload_len(&self) -> usize {
        match self.kind {
            RecordKind::Write => self.count as usize * PAGE,
            RecordKind::Trim | RecordKind::Free | RecordKind::Relocate => 0,
        }
    }

    /// Encode into a 4 KiB block: magic u32, format version u32, device uuid u128, epoch u64,
    /// seq u64, kind u32, slot u32, vtree u64, chunk index u64 (with its layer), first block u32, block count
    /// u32, generation u64, payload CRC32 u32, the `Relocate` source slot u32 (zero in records
    /// of format version 2), zeros, header CRC32 in the last 4 bytes.
    pub fn encode(&self, p: &mut [u8], device_uuid: u128) {
        p.fill(0);
        p[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        p[4..8].copy_from_slice(&PAGE_FORMAT.to_le_bytes());
        p[8..24].copy_from_slice(&device_uuid.to_le_bytes());
        p[24..32].copy_from_slice(&self.epoch.to_le_bytes());
        p[32..40].copy_from_slice(&self.seq.to_le_bytes());
        p[40..44].copy_from_slice(&(self.kind as u32).to_le_bytes());
        p[44..48].copy_from_slice(&self.slot.0.to_le_bytes());
        p[48..56].copy_from_slice(&self.chunk.vtree.0.to_le_bytes());
        p[56..64].copy_from_slice(&self.chunk.disk_index().to_le_bytes());
        p[64..68].copy_from_slice(&self.first.to_le_bytes());
        p[68..72].copy_from_slice(&self.count.to_le_bytes());
        p[72..80].copy_from_slice(&self.generation.to_le_bytes());
        p[80..84].copy_from_slice(&self.payload_crc.to_le_bytes());
        if self.kind == RecordKind::Relocate {
            p[84..88].copy_from_slice(&self.from.0.to_le_bytes());
        }
        let crc = page_crc(p);
        p[CRC_AT..PAGE].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decode a header block; `None` unless it is intact and of this device and format.
    pub fn decode(p: &[u8], device_uuid: u128) -> Option<RecordHeader> {
        if p.len() < PAGE
            || u32_at(p, 0) != RECORD_MAGIC
            || u32_at(p, 4) != PAGE_FORMAT
            || u128_at(p, 8) != device_uuid
            || page_crc(p) != u32_at(p, CRC_AT)
        {
            return None;
        }
        let kind = RecordKind::from_u32(u32_at(p, 40))?;
        let slot = SlotIndex(u32_at(p, 44));
        let h = RecordHeader {
            epoch: u64_at(p, 24),
            seq: u64_at(p, 32),
            kind,
            slot,
            from: if kind == RecordKind::Relocate {
                SlotIndex(u32_at(p, 84))
            } else {
                slot
            },
            chunk: ChunkId::from_disk(VtreeId(u64_at(p, 48)), u64_at(p, 56)),
            first: u32_at(p, 64),
            count: u32_at(p, 68),
            generation: u64_at(p, 72),
            payload_crc: u32_at(p, 80),
        };
        let end = u64::from(h.first) + u64::from(h.count);
        let blocks = crate::range_lock::BLOCKS as u64;
        (end <= blocks
            && (h.kind != RecordKind::Write || h.count as usize <= MAX_RECORD_BLOCKS)
            && (h.kind != RecordKind::Relocate || (h.first == 0 && u64::from(h.count) == blocks)))
            .then_some(h)
    }
}

/// A checkpoint page: where replay starts. Two pages are written alternately (`count` even to
/// the first, odd to the second), each only after the previous one is durable, so one of them
/// is always intact; the valid one with the higher count wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub count: u64,
    /// Records of this epoch only are replayed: each open starts a new random one, so records
    /// of an earlier run left in the circular area are never taken for later ones.
    pub epoch: u64,
    /// Sequence number of the first record replay needs, and its device offset (or where the
    /// next record goes when there is none).
    pub tail_seq: u64,
    pub tail_pos: u64,
}

impl Checkpoint {
    /// magic u32, format version u32, device uuid u128, count u64, epoch u64, tail seq u64,
    /// tail offset u64, zeros, CRC32 in the last 4 bytes.
    pub fn encode(&self, p: &mut [u8], device_uuid: u128) {
        p.fill(0);
        p[0..4].copy_from_slice(&CHECKPOINT_MAGIC.to_le_bytes());
        p[4..8].copy_from_slice(&PAGE_FORMAT.to_le_bytes());
        p[8..24].copy_from_slice(&device_uuid.to_le_bytes());
        p[24..32].copy_from_slice(&self.count.to_le_bytes());
        p[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        p[40..48].copy_from_slice(&self.tail_seq.to_le_bytes());
        p[48..56].copy_from_slice(&self.tail_pos.to_le_bytes());
        let crc = page_crc(p);
        p[CRC_AT..PAGE].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn decode(p: &[u8], device_uuid: u128) -> Option<Checkpoint> {
        (p.len() >= PAGE
            && u32_at(p, 0) == CHECKPOINT_MAGIC
            && u32_at(p, 4) == PAGE_FORMAT
            && u128_at(p, 8) == device_uuid
            && page_crc(p) == u32_at(p, CRC_AT))
        .then(|| Checkpoint {
            count: u64_at(p, 24),
            epoch: u64_at(p, 32),
            tail_seq: u64_at(p, 40),
            tail_pos: u64_at(p, 48),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{ChunkIndex, LayerId};

    #[test]
    fn records_take_at_most_an_eighth_of_the_journal_and_a_chunk() {
        assert_eq!(record_blocks(1 << 20), 31);
        assert_eq!(record_blocks(2 << 20), 63);
        assert_eq!(record_blocks(16 << 20), MAX_RECORD_BLOCKS);
        assert_eq!(record_blocks(64 << 20), MAX_RECORD_BLOCKS);
        assert_eq!(record_blocks(0), 1);
    }

    #[test]
    fn records_and_checkpoints_round_trip_and_reject_damage() {
        let h = RecordHeader {
            epoch: 9,
            seq: 77,
            kind: RecordKind::Write,
            chunk: ChunkId::new(VtreeId(3), ChunkIndex(4)).in_layer(LayerId(6)),
            slot: SlotIndex(5),
            from: SlotIndex(5),
            first: 10,
            count: 3,
            generation: 12,
            payload_crc: 0xdead_beef,
        };
        let mut p = vec![0u8; PAGE];
        h.encode(&mut p, 42);
        assert_eq!(RecordHeader::decode(&p, 42), Some(h));
        assert_eq!(RecordHeader::decode(&p, 43), None);
        assert_eq!(h.payload_len(), 3 * PAGE);
        for at in [0, 33, 600, PAGE - 1] {
            let mut q = p.clone();
            q[at] ^= 1;
            assert_eq!(RecordHeader::decode(&q, 42), None, "flip at {at}");
        }
        let c = Checkpoint {
            count: 3,
            epoch: 4,
            tail_seq: 5,
            tail_pos: 6 << 12,
        };
        c.encode(&mut p, 42);
        assert_eq!(Checkpoint::decode(&p, 42), Some(c));
        assert_eq!(RecordHeader::decode(&p, 42), None);
        // A whole-chunk record decodes; a longer one is refused.
        for (count, ok) in [(MAX_RECORD_BLOCKS as u32, true), (257, false)] {
            let big = RecordHeader {
                first: 0,
                count,
                ..h
            };
            let mut q = vec![0u8; PAGE];
            big.encode(&mut q, 42);
            assert_eq!(RecordHeader::decode(&q, 42).is_some(), ok, "{count} blocks");
        }
        // A relocation carries its source slot and always covers the whole chunk.
        let moved = RecordHeader {
            kind: RecordKind::Relocate,
            from: SlotIndex(9),
            first: 0,
            count: MAX_RECORD_BLOCKS as u32,
            ..h
        };
        let mut q = vec![0u8; PAGE];
        moved.encode(&mut q, 42);
        assert_eq!(RecordHeader::decode(&q, 42), Some(moved));
        assert_eq!(moved.payload_len(), 0);
        RecordHeader { count: 3, ..moved }.encode(&mut q, 42);
        assert_eq!(RecordHeader::decode(&q, 42), None);
        p[1000] ^= 4;
        assert_eq!(Checkpoint::decode(&p, 42), None);
    }
}
