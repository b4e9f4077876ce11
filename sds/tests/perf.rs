//! A throughput and latency smoke run of the data path (client → primary → secondary over
//! QUIC, io_uring on sparse files). Ignored by default; timing never decides pass or fail:
//!
//! `cargo test -p sds --release --test perf -- --ignored --nocapture`

use bytes::Bytes;
use proto::codec::{kind, Frame};
use proto::data::{DataHeader, DataOp};
use proto::model::{ClusterState, PgMapping, Sds, SdsState, StoragePool};
use proto::transport::{Endpoint, Identity, RpcClient};
use proto::{ChunkId, ChunkIndex, Epoch, PdId, PoolId, SdsId, VtreeId};
use sds::chunk_store::ChunkStore;
use sds::device::{AnyDevice, BlockDevice, DeviceOptions};
use sds::metrics::SdsMetrics;
use sds::routing::MapCache;
use sds::service::{Service, ServiceOptions};
use sds::storage::Storage;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PGS: u32 = 64;
const SPAN_CHUNKS: u64 = 256;

fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("mb-sds-perf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("mkdir");
    p
}

/// `SDS_PERF_FILE_DEVICE=1` measures the pread/pwrite fallback instead of io_uring.
fn open_device(img: &Path) -> AnyDevice {
    let io_uring = std::env::var("SDS_PERF_FILE_DEVICE").is_err();
    AnyDevice::open(img, io_uring, &DeviceOptions::default()).expect("device")
}

async fn node(dir: &Path, name: &str, id: SdsId) -> (SocketAddr, Arc<MapCache>) {
    let certs = dir.join(name);
    proto::ca::issue(&dir.join("ca"), &format!("sds:{name}"), &certs).expect("issue");
    let identity = Identity::load(&certs).expect("identity");
    let img = dir.join(format!("{name}.img"));
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 30))
        .expect("img");
    let store = ChunkStore::open(open_device(&img)).await.expect("store");
    let storage = Arc::new(Storage::new(vec![(name.into(), store)]));
    let ep = Endpoint::server(
        "127.0.0.1:0".parse().expect("addr"),
        &identity,
        &format!("sds:{name}"),
    )
    .expect("bind");
    let map = Arc::new(MapCache::new());
    map.set_me(id);
    let svc = Service::new(
        storage,
        map.clone(),
        ep.clone(),
        Arc::new(SdsMetrics::new()),
        ServiceOptions::default(),
    );
    let addr = ep.local_addr().expect("addr");
    tokio::spawn(async move { ep.serve(svc).await });
    (addr, map)
}

fn cluster(a: SocketAddr, b: SocketAddr, mirrored: bool) -> ClusterState {
    let mut s = ClusterState {
        version: 1 + u64::from(mirrored),
        ..Default::default()
    };
    let secondary = mirrored.then_some(SdsId(2));
    s.pools.insert(
        PoolId(1),
        StoragePool {
            id: PoolId(1),
            name: "p".into(),
            pd: PdId(1),
            media_type: "SSD".into(),
            pg_count: PGS,
            epoch: Epoch(1),
            pgs: vec![
                PgMapping {
                    primary: Some(SdsId(1)),
                    secondary,
                    rebuild: None,
                    leaving: None,
                    dropped: None,
                    rebuild_since: None,
                };
                PGS as usize
            ],
            rebuild_policy: Default::default(),
        },
    );
    for (id, addr) in [(SdsId(1), a), (SdsId(2), b)] {
        s.sds.insert(
            id,
            Sds {
                id,
                name: format!("s{}", id.0),
                addr: addr.to_string(),
                pd: PdId(1),
                fault_set: None,
                devices: vec![],
                state: SdsState::Normal,
                removing: false,
                boot: String::new(),
                cert_name: None,
            },
        );
    }
    s
}

fn req(op: DataOp, n: u64) -> (Bytes, Bytes) {
    let x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let chunk = ChunkId::new(VtreeId(1), ChunkIndex(x % SPAN_CHUNKS));
    let h = DataHeader {
        op,
        flags: 0,
        pool: PoolId(1),
        pg: chunk.pg(PGS),
        epoch: Epoch(1),
        chunk,
        offset: ((x >> 20) % 256) as u32 * 4096,
        len: 4096,
        fence: 0,
    };
    let data = if op == DataOp::Write {
        Bytes::from(vec![n as u8; 4096])
    } else {
        Bytes::new()
    };
    (Bytes::copy_from_slice(&h.encode()), data)
}

/// IOPS and mean latency (µs) of `depth` workers issuing `op` for `time`.
async fn qd(c: &RpcClient, op: DataOp, depth: u64, time: Duration) -> (f64, f64) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..depth {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let (mut n, mut lat) = (0u64, Duration::ZERO);
            while start.elapsed() < time {
                let (meta, data) = req(op, w * 1_000_000 + n);
                let t = Instant::now();
                let f = c
                    .call(Frame::request(kind::DATA, meta, data))
                    .await
                    .expect("call");
                assert_eq!(f.status, 0, "{}", String::from_utf8_lossy(&f.meta));
                lat += t.elapsed();
                n += 1;
            }
            (n, lat)
        }));
    }
    let (mut n, mut lat) = (0u64, Duration::ZERO);
    for t in tasks {
        let (a, b) = t.await.expect("join");
        n += a;
        lat += b;
    }
    (
        n as f64 / start.elapsed().as_secs_f64(),
        lat.as_secs_f64() * 1e6 / n as f64,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn perf_smoke() {
    let dir = scratch("svc");
    proto::ca::init_ca(&dir.join("ca"), "perf").expect("ca");
    let (a, map_a) = node(&dir, "a", SdsId(1)).await;
    let (b, map_b) = node(&dir, "b", SdsId(2)).await;
    let certs = dir.join("client");
    proto::ca::issue(&dir.join("ca"), "sdc:perf", &certs).expect("issue");
    let ep = Endpoint::client(&Identity::load(&certs).expect("id"), "sdc:perf").expect("ep");
    let c = ep.connect(a).await.expect("connect");
    for mirrored in [false, true] {
        let m = cluster(a, b, mirrored);
        map_a.install(m.clone());
        map_b.install(m);
        // Allocate part of the span first.
        qd(&c, DataOp::Write, 32, Duration::from_millis(500)).await;
        for (op, depth) in [
            (DataOp::Write, 1),
            (DataOp::Write, 32),
            (DataOp::Read, 1),
            (DataOp::Read, 32),
        ] {
            let (iops, us) = qd(&c, op, depth, Duration::from_secs(2)).await;
            println!("mirrored={mirrored} {op:?} QD{depth}: {iops:.0} IOPS, {us:.0} us mean");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The device alone: 4 KiB random writes and reads on a sparse, then a filled, file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn device_smoke() {
    let dir = scratch("dev");
    let img = dir.join("d.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(256 << 20))
        .expect("img");
    for fill in [false, true] {
        if fill {
            std::fs::write(&img, vec![1u8; 256 << 20]).expect("fill");
        }
        let dev = Arc::new(open_device(&img));
        for (write, depth) in [(true, 1u64), (true, 32), (false, 1), (false, 32)] {
            let start = Instant::now();
            let time = Duration::from_secs(1);
            let mut tasks = Vec::new();
            for w in 0..depth {
                let dev = dev.clone();
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while start.elapsed() < time {
                        let x = (w * 1_000_003 + n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        let off = (x % 65536) * 4096;
                        let b = dev.buffers().get(4096).await;
                        if write {
                            dev.write(off, b).await.expect("write");
                        } else {
                            dev.read(off, b).await.expect("read");
                        }
                        n += 1;
                    }
                    n
                }));
            }
            let mut n = 0;
            for t in tasks {
                n += t.await.expect("join");
            }
            let iops = n as f64 / start.elapsed().as_secs_f64();
            println!("filled={fill} write={write} QD{depth}: {iops:.0} IOPS");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
