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

/// The address of a chunk: the volume's tree and the chunk index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ChunkId {
    pub vtree: VtreeId,
    pub index: ChunkIndex,
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.vtree, self.index)
    }
}

impl ChunkId {
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
            let c = ChunkId {
                vtree: VtreeId(7),
                index: ChunkIndex(i),
            };
            counts[c.pg(256).0 as usize] += 1;
        }
        let max = counts.iter().copied().max().unwrap_or(0);
        let min = counts.iter().copied().min().unwrap_or(0);
        assert!(max < 160 && min > 50, "uneven spread: min {min} max {max}");
    }
}
