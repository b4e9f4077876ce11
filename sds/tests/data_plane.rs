//! Data-plane tests: real SDS services in-process on 127.0.0.1, talking QUIC with mutual TLS,
//! with a hand-built cluster map (one pool, primary A and secondary B), and a fake MDM.

use bytes::Bytes;
use proto::ca::CertRole;
use proto::codec::{kind, Frame};
use proto::data::{DataHeader, DataOp, FLAG_FUA};
use proto::model::{ClusterState, PgMapping, Sds, SdsState, StoragePool};
use proto::msg::{MdmRequest, MdmResponse};
use proto::transport::{Endpoint, Handler, Identity, Peer, Response, RpcClient};
use proto::{ChunkId, ChunkIndex, Epoch, ErrorCode, PdId, PgId, PoolId, SdsId, VtreeId, WireError};
use sds::chunk_store::ChunkStore;
use sds::device::{
    BlockDevice, DeviceOptions, EioRule, FaultOp, FaultyDevice, FileDevice, UringDevice,
};
use sds::mdm_client::{LinkOptions, MdmLink};
use sds::metrics::SdsMetrics;
use sds::routing::MapCache;
use sds::service::{Service, ServiceOptions};
use sds::storage::Storage;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const POOL: PoolId = PoolId(1);
const PGS: u32 = 8;
const A: SdsId = SdsId(11);
const B: SdsId = SdsId(12);
const DEADLINE: Duration = Duration::from_secs(5);

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "mb-sds-it-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("mkdir");
        Scratch(p)
    }

    /// A certificate for `cn` from this directory's cluster CA, loaded.
    fn identity(&self, cn: &str) -> Identity {
        let ca = self.0.join("ca");
        if !ca.join("ca.pem").exists() {
            proto::ca::init_ca(&ca, "test").expect("init ca");
        }
        let dir = self.0.join(cn.replace(':', "_"));
        proto::ca::issue(&ca, cn, &dir).expect("issue");
        Identity::load(&dir).expect("load identity")
    }

    fn device_file(&self, name: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(32 << 20))
            .expect("device file");
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Node<D> {
    addr: SocketAddr,
    endpoint: Endpoint,
    service: Arc<Service<D>>,
}

async fn start<D: BlockDevice>(dir: &Scratch, name: &str, id: SdsId, dev: D) -> Node<D> {
    let identity = dir.identity(&format!("sds:{name}"));
    let store = ChunkStore::open(dev).await.expect("open chunk store");
    let storage = Arc::new(Storage::new(vec![(name.to_string(), store)]));
    let endpoint = Endpoint::server(
        "127.0.0.1:0".parse().expect("addr"),
        &identity,
        &format!("sds:{name}"),
    )
    .expect("bind");
    let map = Arc::new(MapCache::new());
    map.set_me(id);
    let service = Service::new(
        storage,
        map,
        endpoint.clone(),
        Arc::new(SdsMetrics::new()),
        ServiceOptions {
            forward_timeout: Duration::from_secs(2),
            dial_timeout: Duration::from_millis(500),
            refresh_timeout: Duration::from_millis(500),
            ..ServiceOptions::default()
        },
    );
    let (ep, svc) = (endpoint.clone(), service.clone());
    tokio::spawn(async move { ep.serve(svc).await });
    Node {
        addr: endpoint.local_addr().expect("local addr"),
        endpoint,
        service,
    }
}

fn uring(path: &Path) -> UringDevice {
    UringDevice::open(path, &DeviceOptions::small()).expect("open device")
}

/// One pool of `PGS` PGs: even PGs primary A / secondary B, PG 1 primary B / secondary A,
/// other odd PGs A alone (degraded).
fn cluster(a: SocketAddr, b: SocketAddr, epoch: u64, version: u64) -> ClusterState {
    let mut s = ClusterState {
        version,
        ..Default::default()
    };
    let pgs = (0..PGS)
        .map(|pg| match pg {
            1 => PgMapping {
                primary: Some(B),
                secondary: Some(A),
                rebuild: None,
                leaving: None,
                dropped: None,
                rebuild_since: None,
            },
            p if p % 2 == 0 => PgMapping {
                primary: Some(A),
                secondary: Some(B),
                rebuild: None,
                leaving: None,
                dropped: None,
                rebuild_since: None,
            },
            _ => PgMapping {
                primary: Some(A),
                secondary: None,
                rebuild: None,
                leaving: None,
                dropped: None,
                rebuild_since: None,
            },
        })
        .collect();
    s.pools.insert(
        POOL,
        StoragePool {
            id: POOL,
            name: "sp1".into(),
            pd: PdId(1),
            media_type: "SSD".into(),
            pg_count: PGS,
            epoch: Epoch(epoch),
            pgs,
            rebuild_policy: Default::default(),
        },
    );
    for (id, addr) in [(A, a), (B, b)] {
        s.sds.insert(
            id,
            Sds {
                id,
                // The names the nodes' certificates carry (`sds:a`, `sds:b`).
                name: if id == A { "a".into() } else { "b".into() },
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

/// The `nth` chunk of volume tree 9 that falls in `pg`.
fn chunk_in(pg: u32, nth: usize) -> ChunkId {
    (0..)
        .map(|i| ChunkId::new(VtreeId(9), ChunkIndex(i)))
        .filter(|c| c.pg(PGS) == PgId(pg))
        .nth(nth)
        .expect("chunks exist in every PG")
}

fn header(op: DataOp, chunk: ChunkId, epoch: u64, offset: u32, len: u32) -> DataHeader {
    DataHeader {
        op,
        flags: 0,
        pool: POOL,
        pg: chunk.pg(PGS),
        epoch: Epoch(epoch),
        chunk,
        offset,
        len,
        fence: 0,
    }
}

async fn call(c: &RpcClient, h: DataHeader, data: Bytes) -> Result<Bytes, WireError> {
    call_raw(c, Bytes::copy_from_slice(&h.encode()), data).await
}

async fn call_raw(c: &RpcClient, meta: Bytes, data: Bytes) -> Result<Bytes, WireError> {
    let f = c
        .call_timeout(Frame::request(kind::DATA, meta, data), DEADLINE)
        .await
        .expect("transport");
    proto::transport::check_status(f).map(|f| f.data)
}

fn code(r: Result<Bytes, WireError>) -> ErrorCode {
    match r {
        Ok(_) => ErrorCode::Ok,
        Err(e) => e.code,
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed)
            .collect::<Vec<u8>>(),
    )
}

struct Pair {
    _dir: Scratch,
    a: Node<UringDevice>,
    b: Node<UringDevice>,
    client: RpcClient,
    client_ep: Endpoint,
    /// A's certificate talking to B, and B's to A: peers that may read each other's copies.
    a_to_b: RpcClient,
    b_to_a: RpcClient,
}

async fn pair(name: &str) -> Pair {
    let dir = Scratch::new(name);
    let a = start(&dir, "a", A, uring(&dir.device_file("a.img"))).await;
    let b = start(&dir, "b", B, uring(&dir.device_file("b.img"))).await;
    let map = cluster(a.addr, b.addr, 2, 10);
    a.service.map().install(map.clone());
    b.service.map().install(map);
    let client_ep = Endpoint::client(&dir.identity("sdc:host1"), "sdc:host1").expect("client");
    let client = client_ep.connect(a.addr).await.expect("connect to A");
    let a_to_b = a.endpoint.connect(b.addr).await.expect("connect A to B");
    let b_to_a = b.endpoint.connect(a.addr).await.expect("connect B to A");
    Pair {
        _dir: dir,
        a,
        b,
        client,
        client_ep,
        a_to_b,
        b_to_a,
    }
}

/// The copy of `chunk` on the SDS `peer` is connected to (a peer SDS holding the PG), at
/// `epoch`.
async fn read_local(peer: &RpcClient, chunk: ChunkId, epoch: u64, len: u32) -> Bytes {
    call(
        peer,
        header(DataOp::ReadLocal, chunk, epoch, 0, len),
        Bytes::new(),
    )
    .await
    .expect("read local")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_mirrored_to_the_secondary() {
    let p = pair("mirror").await;
    let to_b = p.client_ep.connect(p.b.addr).await.expect("connect to B");
    let c = chunk_in(0, 0);

    // A 12 KiB write at an unaligned offset, then reads from the primary and both copies.
    let data = pattern(1, 12288);
    call(
        &p.client,
        header(DataOp::Write, c, 2, 1000, 12288),
        data.clone(),
    )
    .await
    .expect("write");
    let read = call(
        &p.client,
        header(DataOp::Read, c, 2, 1000, 12288),
        Bytes::new(),
    )
    .await;
    assert_eq!(read.expect("read"), data);
    for (who, conn) in [("A", &p.b_to_a), ("B", &p.a_to_b)] {
        let local = read_local(conn, c, 2, 16384).await;
        assert_eq!(&local[1000..1000 + 12288], &data[..], "copy on {who}");
        assert!(local[..1000].iter().all(|b| *b == 0), "copy on {who}");
    }

    // Many overlapping and disjoint writes in flight at once: both copies end up identical.
    let mut calls = Vec::new();
    for i in 0..40u32 {
        let client = p.client.clone();
        let offset = (i % 10) * 2048;
        calls.push(tokio::spawn(async move {
            let h = header(DataOp::Write, c, 2, offset, 4096);
            call(&client, h, pattern(i as u8, 4096)).await
        }));
    }
    for t in calls {
        t.await.expect("join").expect("write");
    }
    assert_eq!(
        read_local(&p.b_to_a, c, 2, 32768).await,
        read_local(&p.a_to_b, c, 2, 32768).await,
        "both copies applied overlapping writes in the same order"
    );

    // FUA, write-zeroes, trim and allocation status reach both copies.
    let mut fua = header(DataOp::Write, c, 2, 0, 4096);
    fua.flags = FLAG_FUA;
    call(&p.client, fua, pattern(7, 4096))
        .await
        .expect("FUA write");
    call(
        &p.client,
        header(DataOp::WriteZeroes, c, 2, 100, 50),
        Bytes::new(),
    )
    .await
    .expect("write zeroes");
    let mut want = pattern(7, 4096).to_vec();
    want[100..150].fill(0);
    for conn in [&p.b_to_a, &p.a_to_b] {
        assert_eq!(&read_local(conn, c, 2, 4096).await[..], &want[..]);
    }
    let status = |conn: &RpcClient| {
        let conn = conn.clone();
        async move {
            let first = ChunkId::new(VtreeId(9), ChunkIndex(0));
            let mut h = header(DataOp::AllocStatus, first, 2, 0, 0);
            h.len = (c.index.0 + 2) as u32;
            let r = call(&conn, h, Bytes::new()).await.expect("alloc status");
            r[c.index.0 as usize]
        }
    };
    assert_eq!((status(&p.client).await, status(&to_b).await), (1, 1));
    call(
        &p.client,
        header(DataOp::Trim, c, 2, 0, 1 << 20),
        Bytes::new(),
    )
    .await
    .expect("trim");
    assert_eq!((status(&p.client).await, status(&to_b).await), (0, 0));
    let flush = header(DataOp::Flush, c, 0, 0, 0);
    call(&p.client, flush, Bytes::new()).await.expect("flush");

    // A degraded PG (no secondary) is written on the primary only.
    let lone = chunk_in(3, 0);
    call(
        &p.client,
        header(DataOp::Write, lone, 2, 0, 4096),
        pattern(3, 4096),
    )
    .await
    .expect("write");
    assert_eq!(p.b.service.storage().chunk_count(), 0);
    assert_eq!(p.a.service.storage().chunk_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epochs_wrong_pgs_and_bad_requests_are_refused() {
    let p = pair("fence").await;
    let to_b = p.client_ep.connect(p.b.addr).await.expect("connect to B");
    let c = chunk_in(0, 1);
    let w = |epoch| header(DataOp::Write, c, epoch, 0, 4096);
    let data = pattern(1, 4096);

    // Older than the pool's epoch (2).
    assert_eq!(
        code(call(&p.client, w(1), data.clone()).await),
        ErrorCode::StaleEpoch
    );
    // B is not the primary of PG 0, nor A the primary of PG 1.
    assert_eq!(
        code(call(&to_b, w(2), data.clone()).await),
        ErrorCode::WrongPg
    );
    let read_c = header(DataOp::Read, c, 2, 0, 10);
    assert_eq!(
        code(call(&to_b, read_c, Bytes::new()).await),
        ErrorCode::WrongPg
    );
    let read_other = header(DataOp::Read, chunk_in(1, 0), 2, 0, 10);
    assert_eq!(
        code(call(&p.client, read_other, Bytes::new()).await),
        ErrorCode::WrongPg
    );
    // The chunk does not belong to the PG the header claims.
    let mut lie = w(2);
    lie.pg = PgId(2);
    assert_eq!(
        code(call(&p.client, lie, data.clone()).await),
        ErrorCode::WrongPg
    );
    // Unknown pool.
    let mut nowhere = w(0);
    nowhere.pool = PoolId(77);
    assert_eq!(
        code(call(&p.client, nowhere, data.clone()).await),
        ErrorCode::WrongPg
    );
    // Replica operations come from SDS certificates only.
    let replica = header(DataOp::ReplicaWrite, c, 2, 0, 4096);
    assert_eq!(
        code(call(&to_b, replica, data.clone()).await),
        ErrorCode::PermissionDenied
    );
    // Malformed: data length, short header, bad op, range past the chunk, data on a read,
    // an absurd AllocStatus.
    assert_eq!(
        code(call(&p.client, w(2), pattern(1, 100)).await),
        ErrorCode::BadRequest
    );
    let short = call_raw(&p.client, Bytes::from_static(b"short"), Bytes::new()).await;
    assert_eq!(code(short), ErrorCode::BadRequest);
    let mut raw = w(2).encode();
    raw[0] = 200;
    let bad_op = call_raw(&p.client, Bytes::copy_from_slice(&raw), Bytes::new()).await;
    assert_eq!(code(bad_op), ErrorCode::BadRequest);
    let past = header(DataOp::Read, c, 2, (1 << 20) - 10, 20);
    assert_eq!(
        code(call(&p.client, past, Bytes::new()).await),
        ErrorCode::BadRequest
    );
    let read_with_data = header(DataOp::Read, c, 2, 0, 1);
    assert_eq!(
        code(call(&p.client, read_with_data, pattern(1, 1)).await),
        ErrorCode::BadRequest
    );
    let mut huge = header(DataOp::AllocStatus, c, 2, 0, 0);
    huge.len = u32::MAX;
    assert_eq!(
        code(call(&p.client, huge, Bytes::new()).await),
        ErrorCode::BadRequest
    );
    // Nothing was written by any refused request.
    assert_eq!(p.a.service.storage().chunk_count(), 0);
    assert_eq!(p.b.service.storage().chunk_count(), 0);

    // The map moves on (epoch 3, A and B swap PG 0): the old epoch is fenced everywhere.
    let mut next = cluster(p.a.addr, p.b.addr, 3, 11);
    if let Some(pool) = next.pools.get_mut(&POOL) {
        pool.pgs[0] = PgMapping {
            primary: Some(B),
            secondary: Some(A),
            rebuild: None,
            leaving: None,
            dropped: None,
            rebuild_since: None,
        };
    }
    p.a.service.map().install(next.clone());
    p.b.service.map().install(next);
    assert_eq!(
        code(call(&p.client, w(2), data.clone()).await),
        ErrorCode::StaleEpoch
    );
    assert_eq!(
        code(call(&p.client, w(3), data.clone()).await),
        ErrorCode::WrongPg
    );
    call(&to_b, w(3), data.clone())
        .await
        .expect("the new primary takes the write");
    assert_eq!(
        read_local(&p.b_to_a, c, 3, 4096).await,
        data,
        "mirrored to the new secondary"
    );
}

/// `cluster` with volume tree 9 a volume mapped to SDC `host1` under generation 5 (SDC `host2`
/// is registered but maps nothing).
fn cluster_with_mapping(a: SocketAddr, b: SocketAddr) -> ClusterState {
    use proto::model::{Mapping, Sdc, Volume};
    use proto::{SdcId, VolumeId};
    // Newer than the pair's first map (version 10), so it installs.
    let mut s = cluster(a, b, 2, 11);
    s.next_id = 10;
    s.volumes.insert(
        VolumeId(3),
        Volume {
            id: VolumeId(3),
            name: "vol".into(),
            pool: POOL,
            size_bytes: 1 << 30,
            thin: true,
            vtree: VtreeId(9),
            created_unix: 0,
            labels: Default::default(),
            preempt: false,
            layer: Default::default(),
            snapshot: None,
        },
    );
    for (id, name) in [(1, "host1"), (2, "host2")] {
        s.sdcs.insert(
            SdcId(id),
            Sdc {
                id: SdcId(id),
                guid: format!("guid{id}"),
                name: name.into(),
                ip: "127.0.0.1".into(),
                cert_name: None,
            },
        );
    }
    s.mappings.push(Mapping {
        volume: VolumeId(3),
        sdc: SdcId(1),
        generation: 5,
        iops_limit: 0,
        bandwidth_limit_kbps: 0,
    });
    s
}

/// Every data op, sent by every certificate role that may not send it (and by a certificate
/// that gives no role), is refused with `PermissionDenied` naming the certificate and the op,
/// and changes nothing; within an allowed role, only the SDC the volume is mapped to (under its
/// generation) and SDS holding the PG are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_data_op_is_served_only_to_the_roles_allowed_to_send_it() {
    let p = pair("roles").await;
    let map = cluster_with_mapping(p.a.addr, p.b.addr);
    p.a.service.map().install(map.clone());
    p.b.service.map().install(map);
    let c = chunk_in(0, 0);
    let fenced = |op, len| DataHeader {
        fence: 5,
        ..header(op, c, 2, 0, len)
    };
    // The mapped host writes a block: both copies hold it.
    let host1 = dir_peer(&p, "sdc:host1", p.a.addr).await;
    let data = pattern(9, 4096);
    call(&host1, fenced(DataOp::Write, 4096), data.clone())
        .await
        .expect("the mapped host writes");
    let copies = || async {
        (
            read_local(&p.b_to_a, c, 2, 4096).await,
            read_local(&p.a_to_b, c, 2, 4096).await,
        )
    };
    assert_eq!(copies().await, (data.clone(), data.clone()));

    let ops = [
        DataOp::Read,
        DataOp::Write,
        DataOp::ReplicaWrite,
        DataOp::Flush,
        DataOp::Trim,
        DataOp::WriteZeroes,
        DataOp::AllocStatus,
        DataOp::ReplicaTrim,
        DataOp::ReadLocal,
        DataOp::Repair,
    ];
    let certs = [
        (Some(CertRole::Mdm), "mdm"),
        (Some(CertRole::Sds), "sds:b"),
        (Some(CertRole::Sdc), "sdc:host1"),
        (Some(CertRole::Admin), "admin"),
        (None, "sdc"),
    ];
    let mut refused = 0;
    for (role, cn) in certs {
        let to_a = dir_peer(&p, cn, p.a.addr).await;
        for op in ops {
            if role.is_some_and(|r| sds::authz::senders(op).contains(&r)) {
                continue;
            }
            let carries = matches!(op, DataOp::Write | DataOp::ReplicaWrite);
            let body = if carries {
                pattern(1, 4096)
            } else {
                Bytes::new()
            };
            let e = call(&to_a, fenced(op, 4096), body)
                .await
                .expect_err("a wrong role is refused");
            assert_eq!(e.code, ErrorCode::PermissionDenied, "{op:?} from {cn}: {e}");
            assert!(
                e.message.contains(&format!("'{cn}'")) && e.message.contains(&format!("{op:?}")),
                "the refusal names the certificate and the op: {}",
                e.message
            );
            refused += 1;
        }
    }
    assert!(refused >= 25, "{refused} refusals");

    // Within the allowed roles: another host's generation, no generation, a foreign SDS.
    let host2 = dir_peer(&p, "sdc:host2", p.a.addr).await;
    for op in [DataOp::Read, DataOp::Write, DataOp::AllocStatus] {
        let body = if op == DataOp::Write {
            pattern(2, 4096)
        } else {
            Bytes::new()
        };
        let e = call(&host2, fenced(op, 4096), body.clone())
            .await
            .expect_err("another host's generation");
        assert_eq!(e.code, ErrorCode::PermissionDenied, "{op:?}: {e}");
        let e = call(&host1, header(op, c, 2, 0, 4096), body)
            .await
            .expect_err("no generation");
        assert_eq!(e.code, ErrorCode::Fenced, "{op:?}: {e}");
    }
    // The mapped host's AllocStatus (from chunk `c`, one chunk) passes.
    let alloc = fenced(DataOp::AllocStatus, 1);
    let held = call(&host1, alloc, Bytes::new()).await.expect("alloc");
    assert_eq!(&held[..], &[1]);
    let stranger = dir_peer(&p, "sds:c", p.b.addr).await;
    let e = call(
        &stranger,
        header(DataOp::ReplicaWrite, c, 2, 0, 4096),
        pattern(3, 4096),
    )
    .await
    .expect_err("only the PG's primary forwards");
    assert_eq!(e.code, ErrorCode::WrongPg, "{e}");
    let e = call(
        &stranger,
        header(DataOp::ReadLocal, c, 2, 0, 4096),
        Bytes::new(),
    )
    .await
    .expect_err("only a holder of the PG reads a copy");
    assert_eq!(e.code, ErrorCode::WrongPg, "{e}");
    let stranger_to_a = dir_peer(&p, "sds:c", p.a.addr).await;
    let e = call(
        &stranger_to_a,
        header(DataOp::Repair, c, 2, 0, 4096),
        Bytes::new(),
    )
    .await
    .expect_err("only the PG's secondary asks for repairs");
    assert_eq!(e.code, ErrorCode::WrongPg, "{e}");

    // Nothing changed.
    assert_eq!(copies().await, (data.clone(), data));
    assert_eq!(p.a.service.storage().chunk_count(), 1);
    assert_eq!(p.b.service.storage().chunk_count(), 1);
}

/// A connection to `to` with a certificate for `cn` from the pair's CA.
async fn dir_peer(p: &Pair, cn: &str, to: SocketAddr) -> RpcClient {
    let ep = Endpoint::client(&p._dir.identity(cn), cn).expect("endpoint");
    ep.connect(to).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_epoch_fetches_the_map_first() {
    let p = pair("refresh").await;
    // A fake map follower for A: installs epoch 3 when asked.
    let map = p.a.service.map().clone();
    let next = cluster(p.a.addr, p.b.addr, 3, 11);
    p.b.service.map().install(next.clone());
    let follower = tokio::spawn(async move {
        map.refresh_requested().await;
        map.install(next);
    });
    let c = chunk_in(0, 2);
    call(
        &p.client,
        header(DataOp::Write, c, 3, 0, 4096),
        pattern(5, 4096),
    )
    .await
    .expect("write");
    tokio::time::timeout(DEADLINE, follower)
        .await
        .expect("refresh asked")
        .expect("join");
    assert_eq!(p.a.service.map().version(), 11);
    // An epoch nobody knows: the SDS cannot confirm it and says so.
    let unknown = call(
        &p.client,
        header(DataOp::Write, c, 9, 0, 4096),
        pattern(5, 4096),
    )
    .await;
    assert_eq!(code(unknown), ErrorCode::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_secondary_fails_the_write_as_unavailable() {
    let dir = Scratch::new("down");
    let a = start(&dir, "a", A, uring(&dir.device_file("a.img"))).await;
    // B's address: a UDP port nobody serves.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    a.service.map().install(cluster(a.addr, dead_addr, 2, 10));
    let client_ep = Endpoint::client(&dir.identity("sdc:h"), "sdc:h").expect("client");
    let client = client_ep.connect(a.addr).await.expect("connect");
    let t = std::time::Instant::now();
    let r = call(
        &client,
        header(DataOp::Write, chunk_in(0, 0), 2, 0, 4096),
        pattern(1, 4096),
    )
    .await;
    assert_eq!(code(r), ErrorCode::Unavailable);
    assert!(t.elapsed() < DEADLINE);
    a.endpoint.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_error_is_io_and_marks_the_device_failed() {
    let dir = Scratch::new("eio");
    let file = dir.device_file("a.img");
    let dev = Arc::new(FaultyDevice::new(
        FileDevice::open(&file, &DeviceOptions::small()).expect("open"),
        3,
    ));
    let a = start(&dir, "a", A, dev.clone()).await;
    a.service.map().install(cluster(a.addr, a.addr, 2, 10));
    let client_ep = Endpoint::client(&dir.identity("sdc:h"), "sdc:h").expect("client");
    let client = client_ep.connect(a.addr).await.expect("connect");
    let lone = chunk_in(3, 0);
    let read = header(DataOp::Read, lone, 2, 0, 4096);
    call(
        &client,
        header(DataOp::Write, lone, 2, 0, 4096),
        pattern(1, 4096),
    )
    .await
    .expect("write");
    assert!(!a.service.storage().reports()[0].failed);
    // Applied in place: reads reach the device, not the journal overlay.
    a.service.storage().devices()[0]
        .store
        .apply_journal()
        .await
        .expect("apply");
    // Silent corruption is a checksum error, not data.
    let at = a.service.storage().devices()[0]
        .store
        .block_offset(lone, 0)
        .expect("offset");
    dev.add_bit_flips(at..at + 4096, 1.0);
    assert_eq!(
        code(call(&client, read, Bytes::new()).await),
        ErrorCode::Checksum
    );
    dev.clear_faults();
    // A device error fails the device; with no other copy to read from, the read says Io.
    dev.add_eio(EioRule::always(FaultOp::Read, None));
    assert_eq!(code(call(&client, read, Bytes::new()).await), ErrorCode::Io);
    assert!(
        a.service.storage().reports()[0].failed,
        "reported failed in the next hello"
    );
    // A failed device takes no more I/O, even once it answers again.
    dev.clear_faults();
    assert_eq!(code(call(&client, read, Bytes::new()).await), ErrorCode::Io);
    a.service.update_gauges();
    let text = a.service.metrics().render();
    assert!(
        text.contains("meshblock_sds_checksum_errors_total 1"),
        "{text}"
    );
    assert!(
        text.contains("meshblock_sds_device_failed{device=\"a\"} 1"),
        "{text}"
    );
}

/// A fake MDM: answers hellos and map requests, or redirects to the leader.
struct FakeMdm {
    leader: Option<SocketAddr>,
    state: ClusterState,
    seen: Mutex<Vec<MdmRequest>>,
}

impl Handler for FakeMdm {
    async fn handle(&self, _peer: Arc<Peer>, req: Frame) -> Response {
        if let Some(l) = self.leader {
            return Response::error(&WireError::new(ErrorCode::NotLeader, l.to_string()));
        }
        let Ok(m) = serde_json::from_slice::<MdmRequest>(&req.meta) else {
            return Response::error(&WireError::new(ErrorCode::BadRequest, "json"));
        };
        let resp = match &m {
            MdmRequest::SdsHello { .. } => MdmResponse::SdsWelcome {
                id: A,
                map_version: 0,
                lease_ms: 1200,
            },
            MdmRequest::GetMap { known_version, .. } => MdmResponse::Map {
                state: (*known_version < self.state.version).then(|| Box::new(self.state.clone())),
            },
            _ => return Response::error(&WireError::new(ErrorCode::BadRequest, "unexpected")),
        };
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(m);
        }
        Response::ok(serde_json::to_vec(&resp).expect("json"), Bytes::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mdm_link_follows_the_leader_registers_and_fetches_the_map() {
    let dir = Scratch::new("link");
    let mdm_id = dir.identity("mdm");
    let serve = |leader: Option<SocketAddr>, state: ClusterState| {
        let ep =
            Endpoint::server("127.0.0.1:0".parse().expect("addr"), &mdm_id, "mdm").expect("bind");
        let fake = Arc::new(FakeMdm {
            leader,
            state,
            seen: Mutex::new(Vec::new()),
        });
        let (e, f) = (ep.clone(), fake.clone());
        tokio::spawn(async move { e.serve(f).await });
        (ep, fake)
    };
    let any: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let (leader_ep, leader) = serve(None, cluster(any, any, 4, 33));
    let (follower_ep, _) = serve(leader_ep.local_addr(), ClusterState::default());

    let ep = Endpoint::client(&dir.identity("sds:a"), "sds:a").expect("client");
    let map = Arc::new(MapCache::new());
    let client = proto::client::MdmClient::new(ep, vec![follower_ep.local_addr().expect("addr")]);
    let reports = Arc::new(|| {
        vec![proto::msg::DeviceReport {
            path: "/dev/x".into(),
            capacity_bytes: 7,
            failed: true,
            chunks: 0,
            draining: false,
            error: String::new(),
            io: Default::default(),
        }]
    });
    let link = Arc::new(MdmLink::new(
        client,
        "a".into(),
        map.clone(),
        reports,
        LinkOptions {
            hello_interval: Duration::from_millis(100),
            map_poll_interval: Duration::from_millis(100),
            lease: None,
            request_timeout: Duration::from_secs(2),
            boot: String::new(),
        },
    ));
    let task = tokio::spawn(link.run());
    // Check the condition on every tick of an interval, under one deadline.
    let registered = tokio::time::timeout(DEADLINE, async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while map.me() != Some(A) || map.version() != 33 {
            tick.tick().await;
        }
    });
    registered.await.expect("the link did not register in time");
    assert_eq!(map.floor(POOL), Epoch(4));
    let seen = leader.seen.lock().expect("seen").clone();
    let reported = seen.iter().find_map(|m| match m {
        MdmRequest::SdsHello { name, devices, .. } => Some((name.clone(), devices[0].failed)),
        _ => None,
    });
    assert_eq!(reported, Some(("a".to_string(), true)));
    task.abort();
}
