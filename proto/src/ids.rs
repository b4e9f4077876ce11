//! Newtypes for every id and epoch that crosses a process boundary, with one `Display` format.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $inner:ty, $fmt:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

id_type!(
    /// A protection domain.
    PdId, u64, "{:016x}");
id_type!(
    /// A fault set inside a protection domain.
    FaultSetId, u64, "{:016x}");
id_type!(
    /// A storage pool.
    PoolId, u64, "{:016x}");
id_type!(
    /// A storage data server.
    SdsId, u64, "{:016x}");
id_type!(
    /// A device of an SDS.
    DeviceId, u64, "{:016x}");
id_type!(
    /// A volume (its name may change, its id never does).
    VolumeId, u64, "{:016x}");
id_type!(
    /// A volume's snapshot tree: the key of its chunks on the SDS.
    VtreeId, u64, "{:016x}");
id_type!(
    /// A registered client host (SDC).
    SdcId, u64, "{:016x}");
id_type!(
    /// A Raft member (MDM).
    MdmId, u64, "{:016x}");
id_type!(
    /// A placement group inside a pool.
    PgId, u32, "{}");
id_type!(
    /// Index of a 1 MiB chunk inside a volume.
    ChunkIndex, u64, "{}");
id_type!(
    /// A layer of a V-tree (see [`crate::model::Vtree`]): the chunks one member of the tree
    /// wrote since it was last frozen. Layer 0 is a tree's first; a volume that was never
    /// snapshotted writes there.
    LayerId, u32, "{}");

/// The largest layer id: an SDS keeps a chunk's layer in the top 24 bits of the 64-bit chunk
/// index it stores ([`ChunkId::disk_index`]).
pub const MAX_LAYER: u32 = (1 << 24) - 1;
/// Chunk indexes stay below this (2^40 chunks of 1 MiB: 1 EiB per volume).
pub const MAX_CHUNK_INDEX: u64 = 1 << 40;

/// A pool's map epoch. Every change to a pool's PG map bumps it; every data request carries the
/// epoch it was routed with and an SDS refuses requests older than the newest it has seen for the
/// pool. This is the fence against split brain (see ARCHITECTURE.md, "Epochs and fencing").
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

/// The address of a stored chunk: the volume's tree, the layer of the tree, and the chunk index.
///
/// Every layer of a tree keeps its copy of chunk `index` in the same PG ([`ChunkId::pg`] ignores
/// the layer), so the SDS that holds a chunk holds it in every layer and resolves a snapshot's
/// reads locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkId {
    pub vtree: VtreeId,
    #[serde(default)]
    pub layer: LayerId,
    pub index: ChunkIndex,
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.layer.0 == 0 {
            write!(f, "{}:{}", self.vtree, self.index)
        } else {
            write!(f, "{}/{}:{}", self.vtree, self.layer, self.index)
        }
    }
}

impl ChunkId {
    /// Chunk `index` of `vtree`'s first layer.
    pub fn new(vtree: VtreeId, index: ChunkIndex) -> ChunkId {
        ChunkId {
            vtree,
            layer: LayerId(0),
            index,
        }
    }

    /// The same chunk in another layer of its tree.
    pub fn in_layer(self, layer: LayerId) -> ChunkId {
        ChunkId { layer, ..self }
    }

    /// The 64-bit index an SDS stores on disk: the layer in the top 24 bits, the chunk index in
    /// the low 40. Layer 0 stores the plain index, as devices written before layers existed do.
    pub fn disk_index(&self) -> u64 {
        (u64::from(self.layer.0 & MAX_LAYER) << 40) | (self.index.0 & (MAX_CHUNK_INDEX - 1))
    }

    /// The chunk a stored `(vtree, disk_index)` pair names (see [`ChunkId::disk_index`]).
    pub fn from_disk(vtree: VtreeId, disk_index: u64) -> ChunkId {
        ChunkId {
            vtree,
            layer: LayerId((disk_index >> 40) as u32),
            index: ChunkIndex(disk_index & (MAX_CHUNK_INDEX - 1)),
        }
    }

    /// The placement group of this chunk in a pool of `pg_count` PGs.
    ///
    /// A fixed 64-bit mix (splitmix64 finaliser) of tree and index, so every process computes the
    /// same PG without sharing anything but the pool's PG count.
    pub fn pg(&self, pg_count: u32) -> PgId {
        assert!(pg_count > 0, "a pool has at least one PG");
        let mut z = self.vtree.0 ^ self.index.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        PgId((z % u64::from(pg_count)) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_spreads_chunks_evenly() {
        let mut counts = vec![0u32; 256];
        for i in 0..256 * 100 {
            let c = ChunkId::new(VtreeId(7), ChunkIndex(i));
            counts[c.pg(256).0 as usize] += 1;
        }
        let max = counts.iter().copied().max().unwrap_or(0);
        let min = counts.iter().copied().min().unwrap_or(0);
        assert!(max < 160 && min > 50, "uneven spread: min {min} max {max}");
    }

    #[test]
    fn every_layer_of_a_chunk_shares_its_pg_and_the_disk_index_round_trips() {
        for i in [0u64, 1, 77, MAX_CHUNK_INDEX - 1] {
            let c = ChunkId::new(VtreeId(9), ChunkIndex(i));
            for l in [0u32, 1, 4242, MAX_LAYER] {
                let d = c.in_layer(LayerId(l));
                assert_eq!(d.pg(256), c.pg(256));
                assert_eq!(ChunkId::from_disk(d.vtree, d.disk_index()), d);
            }
            assert_eq!(c.disk_index(), i, "layer 0 stores the plain index");
        }
    }
}
