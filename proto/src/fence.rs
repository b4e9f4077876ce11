//! The mapping fence an SDS checks on every data request ([`ClusterState::check_fence`]), and
//! [`FenceIndex`], the lookup tables that make that check cost the same at ten mappings as at
//! ten thousand. An SDS builds the index once per map it installs and asks
//! [`ClusterState::check_fence_with`]; the plain `check_fence` scans the map (a map checked a
//! few times: the MDM's tests and tools), and is what the index is tested and benched against.

use crate::ids::{ChunkId, VtreeId};
use crate::model::{ClusterState, FenceCheck, Mapping};
use std::collections::{HashMap, HashSet};

/// A map's mappings by generation (positions in `ClusterState::mappings`) and the V-trees its
/// volumes write to. Valid for the map it was built from only: build a new one with each map.
#[derive(Clone, Debug, Default)]
pub struct FenceIndex {
    /// Generations are unique in maps the MDM makes; hand-made maps may repeat one (0, say).
    by_generation: HashMap<u64, Vec<usize>>,
    vtrees: HashSet<VtreeId>,
}

impl FenceIndex {
    pub fn new(s: &ClusterState) -> FenceIndex {
        let mut by_generation: HashMap<u64, Vec<usize>> = HashMap::with_capacity(s.mappings.len());
        for (i, m) in s.mappings.iter().enumerate() {
            by_generation.entry(m.generation).or_default().push(i);
        }
        FenceIndex {
            by_generation,
            vtrees: s.volumes.values().map(|v| v.vtree).collect(),
        }
    }
}

impl ClusterState {
    /// May the SDC named `sdc` (its certificate's name), stamping its requests with mapping
    /// generation `fence`, touch `chunk`? Only under a current mapping of a volume of the
    /// chunk's tree to that very SDC (a generation of another host's mapping is
    /// [`FenceCheck::OtherHost`]), and only in the layer that volume writes to now (a request
    /// routed before a snapshot froze its layer is [`FenceCheck::OldLayer`]).
    ///
    /// A vtree that belongs to no volume in this map, asked with fence 0, is allowed (tools
    /// and tests that install hand-made maps); a removed volume's I/O carries a non-zero fence
    /// and is refused.
    pub fn check_fence(&self, chunk: ChunkId, fence: u64, sdc: &str) -> FenceCheck {
        let mapping = self
            .mappings
            .iter()
            .find(|m| m.generation == fence && self.maps_tree(m, chunk));
        let tree_in_use = self.volumes.values().any(|v| v.vtree == chunk.vtree);
        self.fence_answer(mapping, tree_in_use, chunk, fence, sdc)
    }

    /// [`Self::check_fence`] with the index built for this map: no scan of its volumes or
    /// mappings.
    pub fn check_fence_with(
        &self,
        index: &FenceIndex,
        chunk: ChunkId,
        fence: u64,
        sdc: &str,
    ) -> FenceCheck {
        let mapping = index
            .by_generation
            .get(&fence)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.mappings.get(i))
            .find(|m| self.maps_tree(m, chunk));
        self.fence_answer(
            mapping,
            index.vtrees.contains(&chunk.vtree),
            chunk,
            fence,
            sdc,
        )
    }

    /// Whether `m` is a mapping of a volume of `chunk`'s tree.
    fn maps_tree(&self, m: &Mapping, chunk: ChunkId) -> bool {
        self.volumes
            .get(&m.volume)
            .is_some_and(|v| v.vtree == chunk.vtree)
    }

    /// The answer, given the mapping of `chunk`'s tree under generation `fence` (if any) and
    /// whether any volume writes to that tree.
    fn fence_answer(
        &self,
        mapping: Option<&Mapping>,
        tree_in_use: bool,
        chunk: ChunkId,
        fence: u64,
        sdc: &str,
    ) -> FenceCheck {
        match mapping {
            None if fence == 0 && !tree_in_use => FenceCheck::Allowed,
            Some(m) => {
                if self.sdcs.get(&m.sdc).is_none_or(|c| c.cert_name() != sdc) {
                    FenceCheck::OtherHost
                } else if self
                    .volumes
                    .get(&m.volume)
                    .is_some_and(|v| v.layer != chunk.layer)
                {
                    FenceCheck::OldLayer
                } else {
                    FenceCheck::Allowed
                }
            }
            // Generations are values of the `next_id` counter: one above it is newer than this map.
            None if fence > self.next_id => FenceCheck::NewerThanMap,
            None => FenceCheck::Fenced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::*;
    use crate::model::{Sdc, Volume};
    use proptest::prelude::*;

    /// A small random map: volumes over a few V-trees and layers, mappings with generations
    /// from a small range (so some repeat, as in hand-made maps), two SDCs.
    fn map(
        volumes: Vec<(u64, u32)>,
        mappings: Vec<(usize, u64, u64)>,
        next_id: u64,
    ) -> ClusterState {
        let mut s = ClusterState {
            next_id,
            ..Default::default()
        };
        for (i, name) in ["a", "b"].iter().enumerate() {
            let id = SdcId(i as u64 + 1);
            s.sdcs.insert(
                id,
                Sdc {
                    id,
                    guid: format!("g{i}"),
                    name: name.to_string(),
                    ip: String::new(),
                    cert_name: None,
                },
            );
        }
        for (i, (vtree, layer)) in volumes.iter().enumerate() {
            let id = VolumeId(100 + i as u64);
            s.volumes.insert(
                id,
                Volume {
                    id,
                    name: format!("v{i}"),
                    pool: PoolId(1),
                    size_bytes: 1 << 30,
                    thin: true,
                    vtree: VtreeId(*vtree),
                    created_unix: 0,
                    labels: Default::default(),
                    preempt: false,
                    layer: LayerId(*layer),
                    snapshot: None,
                },
            );
        }
        for (volume, sdc, generation) in mappings {
            s.mappings.push(Mapping {
                volume: VolumeId(100 + volume as u64),
                sdc: SdcId(sdc),
                generation,
                iops_limit: 0,
                bandwidth_limit_kbps: 0,
            });
        }
        s
    }

    proptest! {
        #[test]
        fn the_index_answers_as_the_scan_does(
            volumes in prop::collection::vec((0u64..4, 0u32..2), 0..6),
            mappings in prop::collection::vec((0usize..7, 1u64..4, 0u64..6), 0..8),
            next_id in 0u64..8,
            asks in prop::collection::vec((0u64..5, 0u32..2, 0u64..9, prop::bool::ANY), 1..20),
        ) {
            let s = map(volumes, mappings, next_id);
            let index = FenceIndex::new(&s);
            for (vtree, layer, fence, a) in asks {
                let chunk = ChunkId::new(VtreeId(vtree), ChunkIndex(0)).in_layer(LayerId(layer));
                let sdc = if a { "a" } else { "b" };
                prop_assert_eq!(
                    s.check_fence_with(&index, chunk, fence, sdc),
                    s.check_fence(chunk, fence, sdc)
                );
            }
        }
    }
}
