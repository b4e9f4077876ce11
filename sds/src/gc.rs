//! The garbage collector: frees the chunks of PGs this SDS no longer holds (a rebalance moved
//! the copy off, the PG was rebuilt elsewhere while this SDS was away, the volume was removed)
//! and of V-tree layers the map no longer has (removed snapshots, a restored volume's old
//! layer), so the capacity the MDM sees as free is free on disk too.
//!
//! Safety: a chunk is freed only when two passes, `interval` apart, both find it unneeded, the
//! SDS holds a lease (its map is current), and a last check against the current map passes
//! while every change of the chunk waits ([`Storage::free_if`]): a copy written under a map
//! naming this SDS is never freed under that map. A copy the MDM keeps for a backward rebuild
//! (the PG's `dropped` mark names this SDS) is kept: that rebuild copies only what changed.

use crate::device::BlockDevice;
use crate::service::Service;
use proto::model::ClusterState;
use proto::{ChunkId, SdsId};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Whether SDS `me` must keep `chunk` under `map`: the chunk's volume and layer exist and its
/// PG names `me` as primary, secondary (in sync or being filled), the copy a move replaces, or
/// the copy dropped for a backward rebuild. A pool or PG the map does not show is kept
/// (conservative).
pub fn keeps(map: &ClusterState, me: SdsId, chunk: ChunkId) -> bool {
    let Some(v) = map.volume_by_vtree(chunk.vtree) else {
        return false;
    };
    keeps_in(map, me, chunk, v.pool)
}

fn keeps_in(map: &ClusterState, me: SdsId, chunk: ChunkId, pool: proto::PoolId) -> bool {
    if !map.has_layer(chunk.vtree, chunk.layer) {
        return false;
    }
    let Some(p) = map.pools.get(&pool) else {
        return true;
    };
    let Some(m) = p.pg(chunk.pg(p.pg_count)) else {
        return true;
    };
    m.primary == Some(me)
        || m.secondary == Some(me)
        || m.leaving == Some(me)
        || m.dropped.is_some_and(|(s, _)| s == me)
}

/// Collect garbage every `interval`, forever (never when `interval` is zero).
pub async fn run<D: BlockDevice>(service: Arc<Service<D>>, interval: Duration) {
    if interval.is_zero() {
        tracing::info!("garbage collector disabled (gc_interval_ms = 0)");
        return;
    }
    let maps = service.map().clone();
    let storage = service.storage().clone();
    let mut suspects: HashSet<ChunkId> = HashSet::new();
    loop {
        tokio::time::sleep(interval).await;
        let Some(me) = maps.me().filter(|_| maps.leased()) else {
            suspects.clear();
            continue;
        };
        let map = maps.state();
        let pools: HashMap<proto::VtreeId, proto::PoolId> =
            map.volumes.values().map(|v| (v.vtree, v.pool)).collect();
        let unneeded: HashSet<ChunkId> = storage
            .all_chunks()
            .into_iter()
            .filter(|c| match pools.get(&c.vtree) {
                Some(pool) => !keeps_in(&map, me, *c, *pool),
                None => true,
            })
            .collect();
        let mut freed = 0u64;
        for chunk in unneeded.intersection(&suspects) {
            let r = storage
                .free_if(*chunk, || {
                    !maps.leased() || maps.me() != Some(me) || keeps(&maps.state(), me, *chunk)
                })
                .await;
            match r {
                Ok(true) => freed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(%chunk, "garbage collector: could not free a chunk: {e}"),
            }
        }
        if freed > 0 {
            service.metrics().gc_freed_chunks.inc_by(freed);
            tracing::info!(
                freed,
                "garbage collector freed chunks of PGs this SDS no longer holds"
            );
        }
        suspects = unneeded;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::model::{PgMapping, StoragePool, Volume};
    use proto::{ChunkIndex, Epoch, PgId, PoolId, VolumeId, VtreeId};

    fn map(m: PgMapping) -> ClusterState {
        let mut s = ClusterState::default();
        let pool = PoolId(1);
        s.pools.insert(
            pool,
            StoragePool {
                id: pool,
                name: "sp1".into(),
                pd: proto::PdId(1),
                media_type: "HDD".into(),
                pg_count: 1,
                epoch: Epoch(3),
                pgs: vec![m],
                rebuild_policy: Default::default(),
            },
        );
        s.volumes.insert(
            VolumeId(5),
            Volume {
                id: VolumeId(5),
                name: "v".into(),
                pool,
                size_bytes: 1 << 30,
                thin: true,
                vtree: VtreeId(7),
                created_unix: 0,
                labels: Default::default(),
                preempt: false,
                layer: Default::default(),
                snapshot: None,
            },
        );
        s
    }

    #[test]
    fn keeps_every_copy_the_map_names_and_only_those() {
        let (a, b, c) = (SdsId(1), SdsId(2), SdsId(3));
        let chunk = ChunkId::new(VtreeId(7), ChunkIndex(4));
        assert_eq!(chunk.pg(1), PgId(0));
        let plain = PgMapping {
            primary: Some(a),
            secondary: Some(b),
            ..Default::default()
        };
        let s = map(plain);
        assert!(keeps(&s, a, chunk) && keeps(&s, b, chunk));
        assert!(!keeps(&s, c, chunk), "not a copy of c");
        let other_volume = ChunkId {
            vtree: VtreeId(8),
            ..chunk
        };
        assert!(!keeps(&s, a, other_volume), "a removed volume's chunk");
        let layer = |l| chunk.in_layer(proto::LayerId(l));
        assert!(!keeps(&s, a, layer(1)), "a layer the map does not have");
        let mut layered = s.clone();
        layered.vtrees.insert(
            VtreeId(7),
            proto::model::Vtree {
                layers: [
                    (proto::LayerId(0), None),
                    (proto::LayerId(2), Some(proto::LayerId(0))),
                ]
                .into(),
                next_layer: 3,
            },
        );
        assert!(keeps(&layered, a, layer(0)) && keeps(&layered, a, layer(2)));
        assert!(!keeps(&layered, a, layer(1)), "a removed snapshot's layer");
        let moving = PgMapping {
            secondary: Some(c),
            rebuild: Some(Epoch(3)),
            leaving: Some(b),
            ..plain
        };
        let s = map(moving);
        assert!(
            keeps(&s, b, chunk) && keeps(&s, c, chunk),
            "both sides of a move"
        );
        let dropped = PgMapping {
            primary: Some(a),
            secondary: None,
            dropped: Some((b, Epoch(2))),
            ..Default::default()
        };
        assert!(
            keeps(&map(dropped), b, chunk),
            "kept for a backward rebuild"
        );
        assert!(!keeps(&map(dropped), c, chunk));
    }
}
