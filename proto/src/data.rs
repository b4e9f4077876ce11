//! The data-plane request header: a fixed 64-byte binary layout (never serde), carried as the
//! metadata part of a [`kind::DATA`](crate::codec::kind::DATA) frame; block data follows as the
//! frame's raw data part.
//!
//! ```text
//! op u8 | flags u8 | reserved u16 | pg u32 | pool u64 | epoch u64 | vtree u64 | chunk u64 |
//! offset u32 | len u32 | fence u64 | layer u32 | reserved u32
//! ```
//! `layer` is the chunk's layer in its V-tree (0 for a volume never snapshotted): a client's
//! request names the layer its volume writes to, and the primary resolves reads through the
//! layers below it (see `sds::service::layers`).
//! `offset`/`len` are bytes inside the chunk (for [`DataOp::AllocStatus`], `chunk` is the first
//! chunk and `len` a chunk count). `fence` is the volume mapping generation the SDC was given
//! (0 when the request does not come from a mapped volume).
//!
//! A successful [`DataOp::Flush`] answers with 8 bytes of data: the [`boot_tag`] of the SDS's
//! host, so the SDC can tell a flush that reached the devices that took its writes from one
//! that reached them after a host restart lost what they had not flushed.

use crate::ids::*;

pub const DATA_HEADER_LEN: usize = 64;

/// Set on a write that must be durable when acknowledged (NBD FUA).
pub const FLAG_FUA: u8 = 1;
/// Set on a rebuild or rebalance copy (a whole chunk written or trimmed by its PG's primary
/// onto a new copy): the target counts it as copy bytes received. SDS that do not know the
/// flag ignore it.
pub const FLAG_COPY: u8 = 2;

/// A 64-bit tag of a host boot id (FNV-1a), as a flush answer carries it; `boot_tag("")` is 0.
pub fn boot_tag(boot: &str) -> u64 {
    if boot.is_empty() {
        return 0;
    }
    boot.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DataOp {
    /// Read `len` bytes; the response's data holds them.
    Read = 1,
    /// Write the frame's data (SDC → primary).
    Write = 2,
    /// Write forwarded by a primary to its secondary.
    ReplicaWrite = 3,
    /// Make every acknowledged write on this SDS durable.
    Flush = 4,
    /// Deallocate a range (reads return zeros afterwards).
    Trim = 5,
    /// Write zeros over a range.
    WriteZeroes = 6,
    /// Which of `len` chunks from `chunk` this SDS holds: the response is one byte per chunk.
    AllocStatus = 7,
    /// Trim forwarded by a primary to its secondary.
    ReplicaTrim = 8,
    /// Read this SDS's own copy, whatever its role (admin comparison of copies).
    ReadLocal = 9,
    /// Secondary → primary: my copy of this block range failed its checksum; send me yours
    /// (as a ReplicaWrite, under the primary's write ordering).
    Repair = 10,
}

impl DataOp {
    pub fn from_u8(v: u8) -> Option<DataOp> {
        use DataOp::*;
        Some(match v {
            1 => Read,
            2 => Write,
            3 => ReplicaWrite,
            4 => Flush,
            5 => Trim,
            6 => WriteZeroes,
            7 => AllocStatus,
            8 => ReplicaTrim,
            9 => ReadLocal,
            10 => Repair,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    pub op: DataOp,
    pub flags: u8,
    pub pool: PoolId,
    pub pg: PgId,
    pub epoch: Epoch,
    pub chunk: ChunkId,
    pub offset: u32,
    pub len: u32,
    pub fence: u64,
}

impl DataHeader {
    /// A Flush: it names no pool, PG or chunk (an SDS flushes every device it serves).
    pub fn flush() -> DataHeader {
        DataHeader::at(
            DataOp::Flush,
            PoolId(0),
            PgId(0),
            Epoch(0),
            ChunkId::new(VtreeId(0), ChunkIndex(0)),
            0,
            0,
        )
    }

    /// A header without flags or fence (what SDS-to-SDS requests use).
    pub fn at(
        op: DataOp,
        pool: PoolId,
        pg: PgId,
        epoch: Epoch,
        chunk: ChunkId,
        offset: u32,
        len: u32,
    ) -> DataHeader {
        DataHeader {
            op,
            flags: 0,
            pool,
            pg,
            epoch,
            chunk,
            offset,
            len,
            fence: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DataHeaderError {
    #[error("data header of {0} bytes, expected {DATA_HEADER_LEN}")]
    Length(usize),
    #[error("unknown data op {0}")]
    Op(u8),
    #[error("range {offset}+{len} exceeds the chunk")]
    Range { offset: u32, len: u32 },
    #[error(
        "chunk {0} is out of range (layers up to {MAX_LAYER}, indexes below {MAX_CHUNK_INDEX})"
    )]
    Chunk(ChunkId),
}

impl DataHeader {
    pub fn encode(&self) -> [u8; DATA_HEADER_LEN] {
        let mut b = [0u8; DATA_HEADER_LEN];
        b[0] = self.op as u8;
        b[1] = self.flags;
        b[4..8].copy_from_slice(&self.pg.0.to_le_bytes());
        b[8..16].copy_from_slice(&self.pool.0.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.chunk.vtree.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.chunk.index.0.to_le_bytes());
        b[40..44].copy_from_slice(&self.offset.to_le_bytes());
        b[44..48].copy_from_slice(&self.len.to_le_bytes());
        b[48..56].copy_from_slice(&self.fence.to_le_bytes());
        b[56..60].copy_from_slice(&self.chunk.layer.0.to_le_bytes());
        b
    }

    /// Decode and validate: the op is known and, for byte ranges, the range lies in one chunk.
    pub fn decode(b: &[u8]) -> Result<DataHeader, DataHeaderError> {
        let b: &[u8; DATA_HEADER_LEN] =
            b.try_into().map_err(|_| DataHeaderError::Length(b.len()))?;
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let op = DataOp::from_u8(b[0]).ok_or(DataHeaderError::Op(b[0]))?;
        let h = DataHeader {
            op,
            flags: b[1],
            pg: PgId(u32_at(4)),
            pool: PoolId(u64_at(8)),
            epoch: Epoch(u64_at(16)),
            chunk: ChunkId {
                vtree: VtreeId(u64_at(24)),
                layer: LayerId(u32_at(56)),
                index: ChunkIndex(u64_at(32)),
            },
            offset: u32_at(40),
            len: u32_at(44),
            fence: u64_at(48),
        };
        if h.chunk.layer.0 > MAX_LAYER || h.chunk.index.0 >= MAX_CHUNK_INDEX {
            return Err(DataHeaderError::Chunk(h.chunk));
        }
        let ranged = !matches!(op, DataOp::Flush | DataOp::AllocStatus);
        if ranged && u64::from(h.offset) + u64::from(h.len) > crate::CHUNK_SIZE {
            return Err(DataHeaderError::Range {
                offset: h.offset,
                len: h.len,
            });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips_and_rejects_truncation(op in 1u8..=9, flags: u8, pg: u32, pool: u64, epoch: u64,
            vtree: u64, layer in 0u32..=MAX_LAYER, idx in 0u64..MAX_CHUNK_INDEX, offset in 0u32..(1 << 20), fence: u64) {
            let len = ((1u32 << 20) - offset).min(65536);
            let h = DataHeader { op: DataOp::from_u8(op).expect("op"), flags, pool: PoolId(pool), pg: PgId(pg),
                epoch: Epoch(epoch), chunk: ChunkId::new(VtreeId(vtree), ChunkIndex(idx)).in_layer(LayerId(layer)),
                offset, len, fence };
            let b = h.encode();
            prop_assert_eq!(DataHeader::decode(&b), Ok(h));
            for n in 0..DATA_HEADER_LEN {
                prop_assert!(DataHeader::decode(&b[..n]).is_err());
            }
        }
    }

    #[test]
    fn range_past_chunk_is_refused() {
        let h = DataHeader {
            op: DataOp::Write,
            flags: 0,
            pool: PoolId(1),
            pg: PgId(0),
            epoch: Epoch(1),
            chunk: ChunkId::new(VtreeId(1), ChunkIndex(0)),
            offset: 1 << 20,
            len: 1,
            fence: 0,
        };
        assert!(matches!(
            DataHeader::decode(&h.encode()),
            Err(DataHeaderError::Range { .. })
        ));
    }
}
