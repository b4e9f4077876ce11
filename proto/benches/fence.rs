//! The mapping fence every SDS data request passes: [`ClusterState::check_fence_with`] (the
//! SDS's per-map index) against the scan it replaced (`check_fence`, the baseline, run alongside),
//! on maps of 10 to 10,000 volumes, each mapped to one of 50 SDCs. Prints nanoseconds of CPU
//! per check, and what building the index costs once per map.
//!
//!     cargo bench -p proto --bench fence

use proto::fence::FenceIndex;
use proto::ids::*;
use proto::model::{ClusterState, Mapping, Sdc, Volume};
use std::hint::black_box;
use std::time::Instant;

const SDCS: u64 = 50;
const CHECKS: usize = 200_000;

fn map(volumes: u64) -> ClusterState {
    let mut s = ClusterState::default();
    for i in 0..SDCS {
        let id = SdcId(1 + i);
        s.sdcs.insert(
            id,
            Sdc {
                id,
                guid: format!("guid-{i}"),
                name: format!("host{i}"),
                ip: String::new(),
                cert_name: None,
            },
        );
    }
    for i in 0..volumes {
        let id = VolumeId(1000 + i);
        s.volumes.insert(
            id,
            Volume {
                id,
                name: format!("vol{i}"),
                pool: PoolId(1),
                size_bytes: 8 << 30,
                thin: true,
                vtree: VtreeId(1_000_000 + i),
                created_unix: 0,
                labels: Default::default(),
                preempt: false,
                layer: LayerId(0),
                snapshot: None,
            },
        );
        s.mappings.push(Mapping {
            volume: id,
            sdc: SdcId(1 + i % SDCS),
            generation: 2_000_000 + i,
            iops_limit: 0,
            bandwidth_limit_kbps: 0,
        });
    }
    s.next_id = 3_000_000;
    s
}

/// Nanoseconds per call of `f` over `queries`.
fn per_check(queries: &[(ChunkId, u64, String)], f: impl Fn(ChunkId, u64, &str)) -> f64 {
    let t = Instant::now();
    for (chunk, fence, sdc) in queries {
        f(*chunk, *fence, sdc);
    }
    t.elapsed().as_nanos() as f64 / queries.len() as f64
}

fn main() {
    println!("volumes  scan ns/check  index ns/check  index build us");
    for volumes in [10u64, 100, 1_000, 10_000] {
        let s = map(volumes);
        let t = Instant::now();
        let index = FenceIndex::new(&s);
        let build = t.elapsed().as_secs_f64() * 1e6;
        // Requests of random mapped volumes from their own hosts (a cheap LCG: no seed to pick).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let queries: Vec<(ChunkId, u64, String)> = (0..CHECKS)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let m = &s.mappings[(x >> 33) as usize % s.mappings.len()];
                let v = &s.volumes[&m.volume];
                let chunk = ChunkId::new(v.vtree, ChunkIndex(x % 1024));
                (chunk, m.generation, format!("host{}", m.sdc.0 - 1))
            })
            .collect();
        for (chunk, fence, sdc) in queries.iter().take(1000) {
            assert_eq!(
                s.check_fence_with(&index, *chunk, *fence, sdc),
                s.check_fence(*chunk, *fence, sdc)
            );
        }
        let scan = per_check(&queries, |c, f, sdc| {
            black_box(black_box(&s).check_fence(c, f, sdc));
        });
        let indexed = per_check(&queries, |c, f, sdc| {
            black_box(black_box(&s).check_fence_with(&index, c, f, sdc));
        });
        println!("{volumes:>7}  {scan:>13.0}  {indexed:>14.0}  {build:>14.0}");
    }
}
