//! Volume takeover and mapping fences, with real processes: a second SDC host takes a volume
//! over from one whose session expired (or at once, for a preemptible volume); every SDS then
//! refuses the old host's I/O, so nothing it does changes what the new host sees.

use bytes::Bytes;
use meshblock_tests::nbd::Nbd;
use meshblock_tests::*;
use proto::data::{DataHeader, DataOp};
use proto::ErrorCode;
use std::time::{Duration, Instant};

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 4096) as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

/// The generation of `volume`'s mapping to `sdc`, if mapped.
fn generation(c: &Cluster, volume: &str, sdc: &str) -> Option<u64> {
    let map = cluster_map(c);
    let v = map.volume_by_name(volume)?;
    let id = map.sdcs.values().find(|x| x.name == sdc)?.id;
    let g = map
        .mappings_of(v.id)
        .find(|m| m.sdc == id)
        .map(|m| m.generation);
    g
}

/// A request for chunk 0 of `volume`, sent by SDC host `sdc` to that chunk's primary, stamped
/// with `fence`.
fn raw_chunk0(
    c: &Cluster,
    sdc: &str,
    volume: &str,
    op: DataOp,
    fence: u64,
    data: Bytes,
) -> Result<Bytes, (ErrorCode, String)> {
    let map = cluster_map(c);
    let v = map.volume_by_name(volume).expect("volume");
    let pool = &map.pools[&v.pool];
    let chunk = proto::ChunkId::new(v.vtree, proto::ChunkIndex(0));
    let pg = chunk.pg(pool.pg_count);
    let primary = pool.pgs[pg.0 as usize].primary.expect("primary");
    let addr = map.sds[&primary].addr.parse().expect("addr");
    let h = DataHeader {
        fence,
        ..DataHeader::at(op, pool.id, pg, pool.epoch, chunk, 0, 4096)
    };
    data_call(c, sdc, addr, &h, data)
}

fn map_takeover(c: &Cluster, volume: &str, sdc: &str) -> Scli {
    c.scli_raw(&[
        "--map_volume_to_sdc",
        "--volume_name",
        volume,
        "--sdc_name",
        sdc,
        "--takeover",
    ])
}

#[test]
fn a_dead_hosts_volume_is_taken_over_and_the_old_host_is_fenced() {
    let d = DataCluster::start("takeover", 3, 1);
    let c = &d.c;
    let (mut sdc2, sock2) = d.start_sdc("sdc2");

    // Host A (sdc1) writes 4 MiB and flushes.
    let a_data = pattern(1, 4 << 20);
    let mut a = Nbd::connect(&d.socket, "vol1").expect("connect to sdc1");
    a.write_at(0, &a_data).expect("write on A");
    a.flush().expect("flush on A");
    let old = generation(c, "vol1", "sdc1").expect("mapped to sdc1");

    // While A's session is alive, B may not take the volume: Busy, nothing changes.
    let r = map_takeover(c, "vol1", "sdc2");
    assert!(!r.ok, "takeover of a live host's volume must be refused");
    assert!(
        r.stderr.contains("session is alive"),
        "the refusal says why: {}",
        r.stderr
    );
    assert_eq!(generation(c, "vol1", "sdc1"), Some(old));
    assert_eq!(generation(c, "vol1", "sdc2"), None);

    // Host A freezes with its device open (SIGSTOP). Once its session expires, B takes over.
    d.sdc.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    wait_for("B to take the volume over", Duration::from_secs(30), || {
        map_takeover(c, "vol1", "sdc2").ok.then_some(())
    });
    let took = frozen.elapsed();
    assert_eq!(generation(c, "vol1", "sdc1"), None, "A's mapping is gone");
    let new = generation(c, "vol1", "sdc2").expect("mapped to sdc2");
    assert!(new > old);

    // Every SDS refuses the old generation, for reads and writes alike; the new one passes.
    for op in [DataOp::Write, DataOp::Read] {
        let data = if op == DataOp::Write {
            Bytes::from(vec![0xEE; 4096])
        } else {
            Bytes::new()
        };
        let e = raw_chunk0(c, "sdc1", "vol1", op, old, data.clone())
            .expect_err("old generation fenced");
        assert_eq!(e.0, ErrorCode::Fenced, "{op:?}: {}", e.1);
        let e = raw_chunk0(c, "sdc1", "vol1", op, 0, data.clone()).expect_err("no generation");
        assert_eq!(e.0, ErrorCode::Fenced, "{op:?}: {}", e.1);
        // B's generation is B's alone: A may not use it.
        let e = raw_chunk0(c, "sdc1", "vol1", op, new, data).expect_err("another host's");
        assert_eq!(e.0, ErrorCode::PermissionDenied, "{op:?}: {}", e.1);
    }
    let got =
        raw_chunk0(c, "sdc2", "vol1", DataOp::Read, new, Bytes::new()).expect("B's generation");
    assert_eq!(&got[..], &a_data[..4096]);

    // Host B sees A's flushed data and writes its own.
    let uri2 = format!("nbd+unix:///vol1?socket={}", sock2.display());
    wait_export(&uri2);
    let mut b = Nbd::connect(&sock2, "vol1").expect("connect to sdc2");
    assert!(
        b.read_at(0, 4 << 20).expect("read on B") == a_data,
        "B reads A's flushed data"
    );
    let b_data = pattern(2, 1 << 20);
    b.write_at(0, &b_data).expect("write on B");
    b.flush().expect("flush on B");

    // Host A thaws with its NBD connection still open: every write it tries fails.
    d.sdc.signal(libc::SIGCONT);
    a.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut refused = 0;
    for i in 0..8u64 {
        match a.write_at(i << 20, &pattern(9, 1 << 20)) {
            Ok(()) => panic!("host A wrote to a volume taken from it (write {i})"),
            Err(_) => refused += 1,
        }
        if a.flush().is_ok() {
            // A flush carries no data; it may succeed, but nothing may have changed.
        }
    }
    assert_eq!(refused, 8);

    // B's view is unchanged: its own write, and A's data elsewhere.
    let now = b.read_at(0, 4 << 20).expect("read on B");
    assert!(now[..1 << 20] == b_data[..], "B's write intact");
    assert!(
        now[1 << 20..] == a_data[1 << 20..],
        "A's earlier data intact"
    );
    let (n, diffs) = compare_copies(c, "vol1", 4);
    assert_eq!(n, 4);
    assert!(diffs.is_empty(), "{diffs:?}");
    eprintln!(
        "takeover: B took vol1 {:.2} s after A froze; A's 8 writes after thawing all refused",
        took.as_secs_f64()
    );
    b.disconnect();
    sdc2.kill();
}

#[test]
fn a_preemptible_volume_is_taken_from_a_live_host() {
    let d = DataCluster::start("preempt", 2, 1);
    let c = &d.c;
    let (mut sdc2, sock2) = d.start_sdc("sdc2");
    c.must_scli(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--size_gb",
        "1",
        "--volume_name",
        "pv",
        "--preempt",
        "--label",
        "fstype=ext4",
    ]);
    c.must_scli(&[
        "--map_volume_to_sdc",
        "--volume_name",
        "pv",
        "--sdc_name",
        "sdc1",
    ]);
    let q = c.must_scli(&["--query_volume", "--volume_name", "pv", "--json"]);
    assert_eq!(q.json()["preempt"], true);
    assert_eq!(q.json()["labels"]["fstype"], "ext4");
    let uri1 = d.uri("pv");
    wait_export(&uri1);
    let mut a = Nbd::connect(&d.socket, "pv").expect("connect to sdc1");
    let a_data = pattern(3, 1 << 20);
    a.write_at(0, &a_data).expect("write on A");
    a.flush().expect("flush on A");
    let old = generation(c, "pv", "sdc1").expect("mapped");

    // A is alive, but the volume is preemptible: B takes it at once.
    let started = Instant::now();
    c.must_scli(&[
        "--map_volume_to_sdc",
        "--volume_name",
        "pv",
        "--sdc_name",
        "sdc2",
        "--takeover",
    ]);
    eprintln!(
        "preempt: takeover answered in {:.2} s (it waits until the fence is in force)",
        started.elapsed().as_secs_f64()
    );
    let e = raw_chunk0(
        c,
        "sdc1",
        "pv",
        DataOp::Write,
        old,
        Bytes::from(vec![1; 4096]),
    )
    .expect_err("fenced");
    assert_eq!(e.0, ErrorCode::Fenced);
    // A's open connection can no longer write (fenced, or its export closed).
    assert!(a.write_at(0, &pattern(7, 4096)).is_err());
    let uri2 = format!("nbd+unix:///pv?socket={}", sock2.display());
    wait_export(&uri2);
    let mut b = Nbd::connect(&sock2, "pv").expect("connect to sdc2");
    assert!(b.read_at(0, 1 << 20).expect("read on B") == a_data);
    sdc2.kill();
}
