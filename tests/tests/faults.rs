//! Fault tests: real mdm, sds and sdc processes, a writer that records every acknowledged
//! write (and flushes at the end), failures injected while it runs, and a checker that reads the
//! whole written region back through the SDC. Each scenario appends a one-line summary to
//! `$MESHBLOCK_FAULT_SUMMARY` (printed by `./test` at the end).

use meshblock_tests::nbd::{check_model, Nbd};
use meshblock_tests::*;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Bytes of the volume the writers touch.
const REGION: u64 = 128 << 20;

fn check(dc: &DataCluster, model: &[u8], uncertain: &HashSet<u64>) -> (u64, u64) {
    let (checked, wrong, first) =
        check_model(&dc.socket, "vol1", model, uncertain).expect("read back");
    assert_eq!(
        wrong, 0,
        "{wrong} of {checked} acknowledged 4 KiB blocks read back wrong (first at byte {first:?})"
    );
    (checked, wrong)
}

/// Issue "Data plane" two-copy check and issue "Data safety" scenario 1: SIGKILL each SDS in
/// turn during writes at QD32; I/O continues on the other copy, the PGs are rebuilt onto the
/// survivors, the SDS returns; afterwards every acknowledged write reads back and the two copies
/// of every chunk are byte-identical.
#[test]
fn kill_each_sds_during_writes() {
    let mut dc = DataCluster::start("faults_kill_each", 3, 4);
    let w = Writer::start(&dc, REGION, 1);
    w.wait_more(2000, "writes before the first kill");
    let mut stalls = Vec::new();
    for i in 0..3 {
        let name = format!("sds{}", i + 1);
        dc.sds[i].kill();
        wait_sds_state(&dc, &name, "Down");
        w.wait_more(1000, "writes after the SDS was declared down");
        let healed = wait_pool(&dc, "Normal");
        assert_eq!(healed["normal_pgs"], 64, "{healed}");
        dc.sds[i].start();
        wait_sds_state(&dc, &name, "Normal");
        w.wait_more(500, "writes after the SDS returned");
    }
    let (report, model, uncertain) = w.finish();
    stalls.push(report.max_stall);
    assert_eq!(report.failed, 0, "writes failed: {report:?}");
    let (checked, _) = check(&dc, &model, &uncertain);
    wait_pool(&dc, "Normal");
    let (compared, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
    summary(&format!(
        "fault scenario 1 (SIGKILL each SDS at QD32): runs 3, acknowledged writes {}, blocks checked {checked}, lost 0, chunks with identical copies {compared}, max I/O stall {:.2} s, stalls over 0.3 s: {:?}",
        report.acked,
        report.max_stall.as_secs_f64(),
        report.stalls.iter().map(|(at, d)| format!("{at:.1}s+{:.2}s", d.as_secs_f64())).collect::<Vec<_>>()
    ));
}

/// Scenario 2: SIGSTOP an SDS past the down timeout, then SIGCONT: it is fenced (its lease
/// expired, its PGs moved), no client request reaches it afterwards (it only takes replica
/// writes as a backward-rebuild target), and the data is intact.
#[test]
fn frozen_sds_is_fenced() {
    let dc = DataCluster::start("faults_freeze", 3, 4);
    let w = Writer::start(&dc, REGION, 2);
    w.wait_more(2000, "writes before the freeze");
    dc.sds[1].signal(libc::SIGSTOP);
    wait_sds_state(&dc, "sds2", "Down");
    wait_pool(&dc, "Normal");
    w.wait_more(1000, "writes while sds2 is frozen");
    dc.sds[1].signal(libc::SIGCONT);
    wait_sds_state(&dc, "sds2", "Normal");
    // Back within the backward-rebuild window, it is made a rebuild target again: it takes
    // replica writes, but never serves a client (it is primary of nothing) until rebuilt.
    let before = (
        dc.sds_metric(1, "meshblock_sds_user_requests_total"),
        dc.sds_metric(1, "meshblock_sds_reads_total"),
    );
    w.wait_more(2000, "writes after the thaw");
    let after = (
        dc.sds_metric(1, "meshblock_sds_user_requests_total"),
        dc.sds_metric(1, "meshblock_sds_reads_total"),
    );
    let (report, model, uncertain) = w.finish();
    let (checked, _) = check(&dc, &model, &uncertain);
    assert_eq!(
        before, after,
        "the thawed SDS served I/O after it was declared down (client requests, reads before/after)"
    );
    let map = cluster_map(&dc.c);
    let sds2 = map.sds_by_name("sds2").expect("sds2").id;
    let leads = map
        .pools
        .values()
        .flat_map(|p| p.pgs.iter())
        .filter(|m| m.primary == Some(sds2))
        .count();
    assert_eq!(leads, 0, "the thawed SDS leads PGs again");
    wait_pool(&dc, "Normal");
    let (compared, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(
        diffs.is_empty(),
        "copies differ after the backward rebuild: {diffs:#?}"
    );
    assert_eq!(compared, REGION >> 20);
    // The SDC's map polls are its session heartbeat: a frozen SDC shows as disconnected.
    let session = |want: bool| {
        wait_for(
            &format!("sdc1 session connected = {want}"),
            Duration::from_secs(30),
            || {
                let v =
                    dc.c.scli_raw(&["--query_sdc", "--sdc_name", "sdc1", "--json"]);
                (v.ok && v.json()[0]["session_connected"] == want).then_some(())
            },
        )
    };
    session(true);
    dc.sdc.signal(libc::SIGSTOP);
    session(false);
    dc.sdc.signal(libc::SIGCONT);
    session(true);
    summary(&format!(
        "fault scenario 2 (SIGSTOP past the timeout, SIGCONT): runs 1, acknowledged writes {}, blocks checked {checked}, lost 0, I/O reaching the thawed SDS 0, max I/O stall {:.2} s",
        report.acked,
        report.max_stall.as_secs_f64()
    ));
}

/// Scenario 3, split brain as Vitastor tests it: copies on A and B; kill A, write and flush;
/// kill B; restart A: A's data is stale, so the PG must not serve; B returns: the flushed
/// writes are all there, and A is rebuilt from B.
#[test]
fn split_brain_stale_copy_never_serves() {
    let mut dc = DataCluster::start("faults_split_brain", 2, 1);
    let old = vec![0xA1u8; 1 << 20];
    let new = vec![0xB2u8; 1 << 20];
    let mut c = Nbd::connect(&dc.socket, "vol1").expect("connect");
    for off in (0..16u64 << 20).step_by(1 << 20) {
        c.write_at(off, &old).expect("write old");
    }
    c.flush().expect("flush");
    c.disconnect();
    dc.sds[0].kill();
    wait_sds_state(&dc, "sds1", "Down");
    wait_pool(&dc, "Degraded");
    let mut c = Nbd::connect(&dc.socket, "vol1").expect("connect");
    for off in (0..16u64 << 20).step_by(1 << 20) {
        c.write_at(off, &new).expect("write new while degraded");
    }
    c.flush().expect("flush");
    c.disconnect();
    dc.sds[1].kill();
    wait_sds_state(&dc, "sds2", "Down");
    wait_pool(&dc, "Unavailable");
    dc.sds[0].start();
    wait_sds_state(&dc, "sds1", "Normal");
    let st = pool_state(&dc.c, "sp1");
    assert_eq!(
        st["state"], "Unavailable",
        "A's return must not make the PGs available: {st}"
    );
    // A read now must not return A's stale data: it waits (no answer) or fails.
    let c = Nbd::connect(&dc.socket, "vol1").expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut c = c;
    match c.read_at(0, 1 << 20) {
        Ok(d) => assert!(d != old, "the stale copy on A was served"),
        Err(e) => eprintln!("read while only the stale copy is up: {e} (expected)"),
    }
    drop(c);
    dc.sds[1].start();
    wait_sds_state(&dc, "sds2", "Normal");
    wait_pool(&dc, "Normal");
    let mut c = Nbd::connect(&dc.socket, "vol1").expect("connect");
    for off in (0..16u64 << 20).step_by(1 << 20) {
        let d = c.read_at(off, 1 << 20).expect("read after B returned");
        assert!(d == new, "flushed write at {off} lost after split brain");
    }
    c.disconnect();
    let (compared, diffs) = compare_copies(&dc.c, "vol1", 16);
    assert!(diffs.is_empty(), "copies differ after rebuild: {diffs:#?}");
    summary(&format!(
        "fault scenario 3 (split brain: kill A, write+flush, kill B, restart A, restart B): runs 1, acknowledged writes 16, lost 0, stale reads 0, chunks with identical copies {compared}"
    ));
}

/// Offsets in a device image file where `needle` starts (only the file's data extents are read).
fn find_in_image(path: &std::path::Path, needle: &[u8]) -> Vec<u64> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::io::AsRawFd;
    let mut f = std::fs::File::open(path).expect("open image");
    let len = f.metadata().expect("stat").len();
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < len {
        // SAFETY: lseek on our own open file descriptor.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut at = data;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            f.seek(SeekFrom::Start(at as u64)).expect("seek");
            f.read_exact(&mut buf[..n]).expect("read image");
            for i in 0..n.saturating_sub(needle.len()) {
                if &buf[i..i + needle.len()] == needle {
                    out.push(at as u64 + i as u64);
                }
            }
            at += n as i64;
        }
        pos = end;
    }
    out
}

/// Flip one byte 100 bytes after every place `marker` occurs in the image.
fn corrupt(path: &std::path::Path, marker: &[u8]) -> usize {
    use std::os::unix::fs::FileExt;
    let hits = find_in_image(path, marker);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .expect("open image");
    for at in &hits {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at + 100).expect("read byte");
        b[0] ^= 0x5A;
        f.write_all_at(&b, at + 100).expect("write byte");
    }
    f.sync_all().expect("sync image");
    hits.len()
}

fn marked_block(i: u32) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (j, x) in b.iter_mut().enumerate() {
        *x = (j as u32).wrapping_mul(2654435761).wrapping_add(i) as u8;
    }
    let m = format!("MESHBLOCK-CORRUPTION-MARKER-{i:04}");
    b[..m.len()].copy_from_slice(m.as_bytes());
    b
}

/// Scenario 6: bytes flipped in one copy's device file while the SDS runs are caught by the
/// checksums and repaired from the other copy (reads on the primary, the scrubber on the
/// secondary), counted and shown by scli; a block corrupt in both copies fails the read with an
/// I/O error, never wrong data.
#[test]
fn corruption_is_detected_and_repaired() {
    let dc = DataCluster::start_with("faults_corruption", 3, 1, &["--scrub-rate-mib-s", "256"]);
    let mut c = Nbd::connect(&dc.socket, "vol1").expect("connect");
    let chunk: Vec<u8> = (0..256).flat_map(marked_block).collect();
    c.write_at(0, &chunk).expect("write");
    c.flush().expect("flush");
    let map = cluster_map(&dc.c);
    let vol = map.volume_by_name("vol1").expect("vol1").clone();
    let pool = &map.pools[&vol.pool];
    let pg = proto::ChunkId::new(vol.vtree, proto::ChunkIndex(0)).pg(pool.pg_count);
    let m = pool.pgs[pg.0 as usize];
    let idx = |id: Option<proto::SdsId>| {
        let name = &map.sds[&id.expect("copy")].name;
        name.trim_start_matches("sds")
            .parse::<usize>()
            .expect("sds index")
            - 1
    };
    let (a, b) = (idx(m.primary), idx(m.secondary));
    let image = |i: usize| dc.c.dir.join(&format!("sds{}.img", i + 1));
    // Journaled writes are applied in place in the background: wait until both copies have
    // nothing left in memory, so the corruption below hits the data where reads find it.
    for i in [a, b] {
        wait_for(
            "the journal applied in place",
            Duration::from_secs(20),
            || (dc.sds_metric(i, "meshblock_sds_journal_overlay_blocks") == 0.0).then_some(()),
        );
    }
    let marker = |i: u32| format!("MESHBLOCK-CORRUPTION-MARKER-{i:04}").into_bytes();

    // 1. The primary's copy of block 3: the read repairs it from the secondary.
    assert!(
        corrupt(&image(a), &marker(3)) >= 1,
        "block 3 not found on the primary's device"
    );
    let got = c.read_at(3 * 4096, 4096).expect("read the corrupted block");
    assert!(got == marked_block(3), "a corrupted block was served");
    assert!(dc.sds_metric(a, "meshblock_sds_repaired_blocks_total") >= 1.0);

    // 2. The secondary's copy of block 5: the scrubber finds it and the primary rewrites it.
    assert!(
        corrupt(&image(b), &marker(5)) >= 1,
        "block 5 not found on the secondary's device"
    );
    wait_for(
        "the scrubber to repair the secondary",
        Duration::from_secs(60),
        || (dc.sds_metric(b, "meshblock_sds_repaired_blocks_total") >= 1.0).then_some(()),
    );
    let (_, diffs) = compare_copies(&dc.c, "vol1", 1);
    assert!(
        diffs.is_empty(),
        "copies differ after the scrubber's repair: {diffs:?}"
    );

    // 3. Both copies of block 7: the read fails, and scli reports the unrecoverable block.
    // Both SDS are paused (for milliseconds, far below their lease) while both copies are
    // corrupted, or a scrubber could repair the first copy from the second in between.
    dc.sds[a].signal(libc::SIGSTOP);
    dc.sds[b].signal(libc::SIGSTOP);
    let hits = (
        corrupt(&image(a), &marker(7)),
        corrupt(&image(b), &marker(7)),
    );
    dc.sds[a].signal(libc::SIGCONT);
    dc.sds[b].signal(libc::SIGCONT);
    assert!(hits.0 >= 1 && hits.1 >= 1, "block 7 not found: {hits:?}");
    let r = c.read_at(7 * 4096, 4096);
    assert!(
        r.is_err(),
        "a block corrupt in both copies was served: {:?}",
        r.map(|d| d[..40].to_vec())
    );
    // The rest of the chunk still reads right.
    let got = c.read_at(8 * 4096, 4096).expect("read a good block");
    assert!(got == marked_block(8));
    c.disconnect();
    let a_name = format!("sds{}", a + 1);
    let shown = wait_for(
        "scli to show the unrecoverable block",
        Duration::from_secs(20),
        || {
            let v =
                dc.c.scli_raw(&["--query_sds", "--sds_name", &a_name, "--json"]);
            (v.ok && v.json()["integrity"]["unrecoverable_blocks"].as_u64() >= Some(1))
                .then(|| v.json())
        },
    );
    let text =
        dc.c.must_scli(&["--query_sds", "--sds_name", &a_name])
            .stdout;
    assert!(text.contains("unrecoverable"), "{text}");
    summary(&format!(
        "fault scenario 6 (corruption): runs 1, blocks corrupted 4 (primary 1, secondary 1, both 1), repaired 2, wrong data served 0, unrecoverable reported {}",
        shown["integrity"]["unrecoverable_blocks"]
    ));
}

/// No PG may have two copies on one SDS, a copy on a down SDS while it is not the last one,
/// or no primary.
fn assert_pgs_sane(dc: &DataCluster) {
    let map = cluster_map(&dc.c);
    for p in map.pools.values() {
        for (i, m) in p.pgs.iter().enumerate() {
            let primary = m
                .primary
                .unwrap_or_else(|| panic!("PG {i} has no primary: {m:?}"));
            assert_ne!(
                Some(primary),
                m.secondary,
                "PG {i} has one SDS twice: {m:?}"
            );
            for s in [Some(primary), m.secondary].into_iter().flatten() {
                assert_eq!(
                    map.sds[&s].state,
                    proto::model::SdsState::Normal,
                    "PG {i} names a down SDS after healing: {m:?}"
                );
            }
        }
    }
}

/// Scenario 7: the MDM leader is SIGKILLed while it handles an SDS failure: once before it
/// declared the SDS down (the new leader must detect it itself), once right after (the new
/// leader must finish the rebuild). No PG ends with two primaries or none; data intact.
#[test]
fn mdm_leader_killed_during_sds_failover() {
    let mut dc = DataCluster::start_full("faults_mdm_kill", 3, 3, 4, &[]);
    let w = Writer::start(&dc, REGION, 7);
    w.wait_more(1500, "writes before the failures");

    // Before detection: kill sds1, then the leader at once.
    let leader = dc.c.wait_leader(Duration::from_secs(10));
    dc.sds[0].kill();
    dc.c.mdms[leader].proc.kill();
    wait_sds_state(&dc, "sds1", "Down");
    wait_pool(&dc, "Normal");
    assert_pgs_sane(&dc);
    w.wait_more(1000, "writes after the first failover");
    dc.c.restart(leader);
    dc.sds[0].start();
    wait_sds_state(&dc, "sds1", "Normal");

    // After detection, during the rebuild: kill sds2, and the leader once it declared it down.
    let leader = dc.c.wait_leader(Duration::from_secs(10));
    let declared = dc.c.mdms[leader]
        .metric("meshblock_mdm_sds_declared_down_total")
        .unwrap_or(0.0);
    dc.sds[1].kill();
    wait_for(
        "the leader to declare sds2 down",
        Duration::from_secs(30),
        || {
            (dc.c.mdms[leader]
                .metric("meshblock_mdm_sds_declared_down_total")
                .unwrap_or(0.0)
                > declared)
                .then_some(())
        },
    );
    dc.c.mdms[leader].proc.kill();
    wait_pool(&dc, "Normal");
    assert_pgs_sane(&dc);
    w.wait_more(1000, "writes after the second failover");
    let (report, model, uncertain) = w.finish();
    assert_eq!(report.failed, 0, "{report:?}");
    let (checked, _) = check(&dc, &model, &uncertain);
    let (compared, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
    summary(&format!(
        "fault scenario 7 (MDM leader SIGKILL during SDS failover, twice): runs 2, acknowledged writes {}, blocks checked {checked}, lost 0, PGs with two primaries or none 0, chunks with identical copies {compared}, max I/O stall {:.2} s",
        report.acked,
        report.max_stall.as_secs_f64()
    ));
}

/// Wait until the writer has made no progress for `quiet` (its I/O is stuck behind the cut).
fn wait_stalled(w: &Writer, quiet: Duration) {
    let mut last = (w.acked.load(Ordering::Relaxed), std::time::Instant::now());
    wait_for(
        "the writer to stall behind the cut",
        Duration::from_secs(30),
        || {
            let now = w.acked.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, std::time::Instant::now());
            }
            (last.1.elapsed() >= quiet).then_some(())
        },
    );
}

/// Scenario 4: network partitions with namespaces. Every daemon has a namespace and address of
/// its own. (a) One SDS cut off from every MDM but not from the SDC and the other SDS: its lease
/// lapses, it is declared down, I/O continues on the other copies. (b) One SDS cut off from the
/// SDC but not from the MDM: I/O to its PGs waits (never errors or goes stale) and resumes when
/// the link heals. (c) The MDM leader cut off from everything: a new leader takes over and I/O
/// continues. Every acknowledged write reads back; the copies agree.
#[test]
fn network_partitions() {
    let net = match netns::Net::new() {
        Ok(n) => std::sync::Arc::new(n),
        Err(e) => panic!("network namespaces are needed for this test: {e}"),
    };
    let dc = DataCluster::start_net("faults_partitions", 3, 3, 4, &[], Some(net.clone()));
    let node = |n: &Option<netns::Node>| n.clone().expect("a namespace");
    let w = Writer::start(&dc, REGION, 4);
    w.wait_more(1500, "writes before the partitions");

    // (a) sds1 | every MDM.
    let s1 = node(&dc.sds_nodes[0]);
    let mdms: Vec<netns::Node> = dc.c.mdms.iter().map(|m| node(&m.node)).collect();
    for m in &mdms {
        net.cut(&s1, m);
    }
    wait_sds_state(&dc, "sds1", "Down");
    wait_pool(&dc, "Normal");
    w.wait_more(1000, "writes with sds1 cut off from the MDMs");
    for m in &mdms {
        net.heal(&s1, m);
    }
    wait_sds_state(&dc, "sds1", "Normal");

    // (b) sds2 | the SDC, for as long as the writer is visibly stuck.
    let s2 = node(&dc.sds_nodes[1]);
    let sdc = node(&dc.sdc_node);
    let map = cluster_map(&dc.c);
    let sds2 = map.sds_by_name("sds2").expect("sds2").id;
    let primaries = map
        .pools
        .values()
        .flat_map(|p| p.pgs.iter())
        .filter(|m| m.primary == Some(sds2))
        .count();
    assert!(
        primaries > 0,
        "sds2 leads no PG; the cut would test nothing"
    );
    net.cut(&s2, &sdc);
    wait_stalled(&w, Duration::from_millis(1500));
    assert_eq!(sds_state(&dc, "sds2"), "Normal", "the MDM still hears sds2");
    net.heal(&s2, &sdc);
    w.wait_more(1000, "writes after the SDC reaches sds2 again");

    // (c) the MDM leader | everything.
    let leader = dc.c.wait_leader(Duration::from_secs(10));
    let lnode = node(&dc.c.mdms[leader].node);
    let others: Vec<netns::Node> = dc
        .sds_nodes
        .iter()
        .map(node)
        .chain(std::iter::once(sdc.clone()))
        .chain(mdms.iter().filter(|m| m.ns != lnode.ns).cloned())
        .collect();
    for o in &others {
        net.cut(&lnode, o);
    }
    wait_for("a new MDM leader", Duration::from_secs(30), || {
        dc.c.mdms
            .iter()
            .enumerate()
            .find(|(i, m)| *i != leader && m.is_leader())
            .map(|_| ())
    });
    w.wait_more(1000, "writes under the new leader");
    for o in &others {
        net.heal(&lnode, o);
    }
    let (report, model, uncertain) = w.finish();
    assert_eq!(report.failed, 0, "{report:?}");
    let (checked, _) = check(&dc, &model, &uncertain);
    wait_pool(&dc, "Normal");
    assert_pgs_sane(&dc);
    let (compared, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
    summary(&format!(
        "fault scenario 4 (partitions: SDS|MDMs, SDS|SDC, MDM leader|all): runs 3, acknowledged writes {}, blocks checked {checked}, lost 0, chunks with identical copies {compared}, max I/O stall {:.2} s",
        report.acked,
        report.max_stall.as_secs_f64()
    ));
}

/// A forward held up past the primary's timeout never lands after the writes that followed
/// it. The first forwarded write each SDS gets waits 4 s before it is applied (a fail point, as
/// a stalled connection would); the primary times it out after 1.5 s, gives up on that
/// connection and fails the write, the SDC retries it on a new one, and the client then
/// overwrites the block. When the held-up forward wakes, the secondary refuses it (it came on
/// the connection the primary replaced): both copies hold the last write, and it reads back.
#[test]
fn a_forward_held_up_past_its_timeout_never_lands_after_later_writes() {
    let scratch = TestDir::new("late_forward_cfg");
    let cfg = scratch.join("sds.toml");
    std::fs::write(&cfg, "forward_timeout_ms = 1500\n").expect("write the SDS config");
    let dc = DataCluster::start_opts(
        "faults_late_forward",
        &DataOpts {
            n_sds: 2,
            vol_gb: 1,
            sds_bin: Some(failpoint_sds()),
            sds_extra: vec![
                "--config".into(),
                cfg.display().to_string(),
                "--failpoints".into(),
                "sds::service::before_replica_apply=1*return(4000)".into(),
            ],
            ..DataOpts::default()
        },
    );
    let (first, last) = (vec![0xA1u8; 8192], vec![0xB2u8; 8192]);
    let mut nbd = Nbd::connect(&dc.socket, "vol1").expect("connect");
    nbd.write_at(0, &first)
        .expect("first write (retried by the SDC)");
    nbd.write_at(0, &last).expect("the overwrite");
    nbd.flush().expect("flush");
    let refused = |dc: &DataCluster| {
        (0..2)
            .map(|i| dc.sds_metric(i, "meshblock_sds_stale_forwards_refused_total"))
            .sum::<f64>()
    };
    // Until the held-up forward wakes: refused (the metric), or applied over the overwrite
    // (the copies differ).
    let landed = wait_for(
        "the held-up forward to wake (refused, or applied over the overwrite)",
        Duration::from_secs(30),
        || {
            if refused(&dc) >= 1.0 {
                return Some(Vec::new());
            }
            let (_, diffs) = compare_copies(&dc.c, "vol1", 1);
            (!diffs.is_empty()).then_some(diffs)
        },
    );
    assert!(
        landed.is_empty(),
        "the held-up forward landed after the overwrite: {landed:#?}"
    );
    let (compared, diffs) = compare_copies(&dc.c, "vol1", 1);
    assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
    assert_eq!(compared, 1);
    assert_eq!(nbd.read_at(0, 8192).expect("read back"), last);
    nbd.disconnect();
    summary(&format!(
        "fault scenario late forward (a forward held up past the primary's timeout): runs 1, stale forwards refused {}, chunks with identical copies {compared}, lost 0",
        refused(&dc)
    ));
}

/// Fail points on the write path: an SDS crashes (panic → abort) after its local write before
/// the forward, after the forward before the acknowledgement, in the middle of a map update,
/// and with a whole chunk durable in a new slot before the record that moves it there, each
/// while the writer runs at QD32 (one write in eight a whole chunk). Every acknowledged write reads back; the copies agree.
#[test]
fn crashes_at_fail_points_on_the_write_path() {
    let fp_sds = failpoint_sds();
    let mut dc = DataCluster::start_opts(
        "faults_failpoints",
        &DataOpts {
            vol_gb: 4,
            sds_bin: Some(fp_sds),
            sds_extra: vec!["--failpoints-file".into(), "{dir}/{name}.failpoints".into()],
            ..DataOpts::default()
        },
    );
    let w = Writer::start(&dc, REGION, 11);
    w.wait_more(1000, "writes before the first fail point");
    let points = [
        "sds::service::after_forward_before_ack",
        "sds::service::before_forward",
        "sds::routing::during_map_update",
        "sds::chunk_store::before_relocate_record",
    ];
    for (k, point) in points.iter().enumerate() {
        // Arm the SDS that is now the primary of the most mirrored PGs: it forwards, and it
        // holds copies, whatever happened to the others in earlier rounds. It is armed while
        // it runs, so no restart can cost it its roles before the point is reached.
        let i = busiest_primary(&dc);
        let name = format!("sds{}", i + 1);
        let file = dc.c.dir.join(&format!("{name}.failpoints"));
        std::fs::write(&file, format!("{point}=1*panic")).expect("arm the fail point");
        let mut bumps = 0;
        wait_for(
            &format!("{name} to crash at {point}"),
            Duration::from_secs(120),
            || {
                if !dc.sds[i].alive() {
                    return Some(());
                }
                if *point == "sds::routing::during_map_update" {
                    // A new map version for the armed SDS to install.
                    bumps += 1;
                    dc.c.must_scli(&[
                        "--add_volume",
                        "--storage_pool_name",
                        "sp1",
                        "--size_gb",
                        "1",
                        "--volume_name",
                        &format!("bump{k}x{bumps}"),
                        "--thin_provisioned",
                    ]);
                }
                None
            },
        );
        assert!(
            dc.sds[i]
                .log_text()
                .contains(&format!("failpoint {point} panic")),
            "{name} died elsewhere than at {point}:\n{}",
            log_tail(&dc.sds[i].log_text(), 40)
        );
        std::fs::write(&file, "").expect("disarm the fail point");
        dc.sds[i].kill();
        wait_sds_state(&dc, &name, "Down");
        wait_pool(&dc, "Normal");
        w.wait_more(500, "writes after the crash");
        dc.sds[i].start();
        wait_sds_state(&dc, &name, "Normal");
    }
    let (report, model, uncertain) = w.finish();
    assert_eq!(report.failed, 0, "{report:?}");
    let (checked, _) = check(&dc, &model, &uncertain);
    wait_pool(&dc, "Normal");
    let (compared, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
    summary(&format!(
        "fault scenario fail points (crash after local write / after forward / mid map update / before a relocation record): runs 4, acknowledged writes {}, blocks checked {checked}, lost 0, chunks with identical copies {compared}, max I/O stall {:.2} s",
        report.acked,
        report.max_stall.as_secs_f64()
    ));
}

/// The index of the running SDS that is the primary of the most PGs with a secondary (waits
/// until there is one).
fn busiest_primary(dc: &DataCluster) -> usize {
    wait_for(
        "an SDS that is the primary of a mirrored PG",
        Duration::from_secs(120),
        || {
            let map = cluster_map(&dc.c);
            let pool = map.pools.values().find(|p| p.name == "sp1")?;
            let mut best: Option<(usize, usize)> = None;
            for s in map.sds.values() {
                let Some(i) = s
                    .name
                    .strip_prefix("sds")
                    .and_then(|n| n.parse::<usize>().ok())
                    .and_then(|n| n.checked_sub(1))
                else {
                    continue;
                };
                if s.state != proto::model::SdsState::Normal {
                    continue;
                }
                let n = pool
                    .pgs
                    .iter()
                    .filter(|m| m.primary == Some(s.id) && m.secondary.is_some())
                    .count();
                if n > 0 && best.is_none_or(|(_, b)| n > b) {
                    best = Some((i, n));
                }
            }
            best.map(|(i, _)| i)
        },
    )
}

/// Issue 18 item 4: a write held at its range lock (a fail point) past the lease of its
/// primary, which is cut off from the MDM meanwhile, is refused, not applied: the primary's own
/// copy keeps the old data once the hold is over, the write is acknowledged by the copy that
/// took over, and a writer running throughout loses nothing; the copies agree after the
/// primary returns.
#[test]
fn a_write_held_past_the_lease_is_refused_not_applied() {
    let net = match netns::Net::new() {
        Ok(n) => std::sync::Arc::new(n),
        Err(e) => panic!("network namespaces are needed for this test: {e}"),
    };
    let dc = DataCluster::start_opts(
        "faults_held_write",
        &DataOpts {
            n_sds: 2,
            vol_gb: 1,
            sds_bin: Some(failpoint_sds()),
            sds_extra: vec!["--failpoints-file".into(), "{dir}/{name}.failpoints".into()],
            net: Some(net.clone()),
            ..DataOpts::default()
        },
    );
    // The probe: the first blocks of the chunk after the writer's region.
    const PROBE: u64 = REGION;
    let (old, new) = (vec![0xA1u8; 64 << 10], vec![0xB2u8; 64 << 10]);
    let mut nbd = Nbd::connect(&dc.socket, "vol1").expect("connect");
    nbd.write_at(PROBE, &old).expect("write the old data");
    nbd.flush().expect("flush");
    let (i, pool, pg, epoch, chunk) = dc.primary_of_chunk("vol1", PROBE >> 20);
    let name = dc.sds[i].name.clone();
    let read_local = |dc: &DataCluster| {
        let h = proto::data::DataHeader::at(
            proto::data::DataOp::ReadLocal,
            pool,
            pg,
            epoch,
            chunk,
            0,
            new.len() as u32,
        );
        // ReadLocal comes only from another holder of the PG: the other SDS.
        let other = dc.c.dir.join(&format!("certs/{}", dc.sds[1 - i].name));
        data_call_as(&other, dc.sds_addrs[i], &h, bytes::Bytes::new()).expect("ReadLocal")
    };
    assert_eq!(read_local(&dc), old, "the primary holds the old data");

    // Hold the next write that takes a range lock on the primary for 6 s (once).
    let point = "sds::service::after_range_lock";
    dc.set_failpoints(i, &format!("{point}=1*return(6000)"));
    let requests = |dc: &DataCluster| dc.sds_metric(i, "meshblock_sds_user_requests_total");
    let before = requests(&dc);
    let socket = dc.socket.clone();
    let probe = {
        let new = new.clone();
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut c = Nbd::connect(&socket, "vol1")?;
            c.write_at(PROBE, &new)?;
            c.flush()?;
            c.disconnect();
            Ok(())
        })
    };
    wait_for(
        "the probe write to reach its primary (and be held)",
        Duration::from_secs(20),
        || (requests(&dc) > before).then_some(()),
    );
    let w = Writer::start(&dc, REGION, 31);

    // Cut the primary off from the MDM: no more lease renewals, no newer map.
    let (sds_node, mdm_node) = (
        dc.sds_nodes[i].clone().expect("a namespace"),
        dc.c.mdms[0].node.clone().expect("a namespace"),
    );
    net.cut(&sds_node, &mdm_node);
    let resumed = format!("fail point {point} held a request");
    wait_for(
        &format!("{name}'s lease to lapse"),
        Duration::from_secs(20),
        || (dc.sds_metric(i, "meshblock_sds_leased") == 0.0).then_some(()),
    );
    // Writes applied locally from here on: none may be (the held one included).
    let applied = |dc: &DataCluster| dc.sds_metric(i, "meshblock_sds_writes_total");
    let applied_at_lapse = applied(&dc);
    assert!(
        !dc.sds[i].log_text().contains(&resumed),
        "the held write went on before the lease lapsed: the test proves nothing (hold longer)"
    );
    wait_for("the held write to go on", Duration::from_secs(30), || {
        dc.sds[i].log_text().contains(&resumed).then_some(())
    });
    let refused = wait_for(
        "the held write to be refused",
        Duration::from_secs(10),
        || {
            let n = dc.sds_metric(i, "meshblock_sds_lease_expired_writes_total");
            (n >= 1.0).then_some(n)
        },
    );
    // Its own copy cannot be read from outside now (ReadLocal needs the lease): its count of
    // applied writes shows the held write was not applied.
    assert_eq!(
        applied(&dc),
        applied_at_lapse,
        "a write (the held one) was applied on the cut-off primary after its lease lapsed"
    );
    probe
        .join()
        .expect("probe thread")
        .expect("the probe write is acknowledged by the copy that took over");
    wait_sds_state(&dc, &name, "Down");
    w.wait_more(500, "writes while the old primary is cut off");
    net.heal(&sds_node, &mdm_node);
    wait_sds_state(&dc, &name, "Normal");
    w.wait_more(500, "writes after the old primary returned");
    let (report, model, uncertain) = w.finish();
    assert_eq!(report.failed, 0, "{report:?}");
    let (checked, _) = check(&dc, &model, &uncertain);
    assert_eq!(nbd.read_at(PROBE, new.len() as u32).expect("read"), new);
    nbd.disconnect();
    wait_pool(&dc, "Normal");
    let (compared, diffs) = compare_copies(&dc.c, "vol1", (REGION >> 20) + 1);
    assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
    summary(&format!(
        "fault scenario held write (a write held at the range lock past the lease, primary cut off from the MDM): runs 1, refused after the lease {refused}, applied 0, acknowledged writes {}, blocks checked {checked}, lost 0, chunks with identical copies {compared}",
        report.acked
    ));
}

/// Issue 18 item 4: the MDM leader is cut off from the other MDMs while the SDS still reach it,
/// and sds1 reaches only it. The isolated leader grants no more leases (it cannot get a quorum
/// to confirm it leads), so sds1's lease lapses before the new leader declares it (or anything)
/// down: every sample that sees a declaration reads sds1 unleased afterwards. Every
/// acknowledged write reads back; the copies agree.
#[test]
fn an_isolated_mdm_leader_stops_granting_leases_before_the_new_one_declares_sds_down() {
    let net = match netns::Net::new() {
        Ok(n) => std::sync::Arc::new(n),
        Err(e) => panic!("network namespaces are needed for this test: {e}"),
    };
    let dc = DataCluster::start_net("faults_isolated_leader", 3, 3, 4, &[], Some(net.clone()));
    let node = |n: &Option<netns::Node>| n.clone().expect("a namespace");
    let w = Writer::start(&dc, REGION, 41);
    w.wait_more(1000, "writes before the partition");
    let leader = dc.c.wait_leader(Duration::from_secs(10));
    let lnode = node(&dc.c.mdms[leader].node);
    let others: Vec<usize> = (0..dc.c.mdms.len()).filter(|j| *j != leader).collect();
    let s1 = node(&dc.sds_nodes[0]);
    // sds1 keeps only the leader.
    for j in &others {
        net.cut(&s1, &node(&dc.c.mdms[*j].node));
    }
    w.wait_more(300, "writes with sds1 reaching only the leader");
    assert_eq!(dc.sds_metric(0, "meshblock_sds_leased"), 1.0);
    let declared = |dc: &DataCluster| -> f64 {
        others
            .iter()
            .filter_map(|j| dc.c.mdms[*j].metric("meshblock_mdm_sds_declared_down_total"))
            .sum()
    };
    let declared_before = declared(&dc);
    // The leader | the other MDMs.
    for j in &others {
        net.cut(&lnode, &node(&dc.c.mdms[*j].node));
    }
    let cut_at = std::time::Instant::now();
    let mut lapsed = None;
    wait_for(
        "the new leader to declare sds1 down",
        Duration::from_secs(60),
        || {
            // The declaration first, then the lease: a lease still held after a declaration
            // was seen outlived it.
            let now_declared = declared(&dc) > declared_before;
            let leased = dc.sds_metric(0, "meshblock_sds_leased");
            if leased == 0.0 && lapsed.is_none() {
                lapsed = Some(cut_at.elapsed());
            }
            if now_declared {
                assert_eq!(
                    leased,
                    0.0,
                    "sds1 still held a lease (from the isolated leader) after the new leader declared an SDS down"
                );
                return Some(());
            }
            None
        },
    );
    let down_after = cut_at.elapsed();
    let lapsed = lapsed.expect("sds1's lease lapsed");
    wait_sds_state(&dc, "sds1", "Down");
    // A metrics read can come back empty on a busy machine: read until one answers.
    let refused = wait_for(
        "the isolated leader to have refused a hello (did sds1 reach it?)",
        Duration::from_secs(30),
        || {
            dc.c.mdms[leader]
                .metric("meshblock_mdm_sds_leases_refused_total")
                .filter(|v| *v >= 1.0)
        },
    );
    w.wait_more(500, "writes under the new leader");
    for j in &others {
        net.heal(&lnode, &node(&dc.c.mdms[*j].node));
        net.heal(&s1, &node(&dc.c.mdms[*j].node));
    }
    wait_sds_state(&dc, "sds1", "Normal");
    w.wait_more(500, "writes after healing");
    let (report, model, uncertain) = w.finish();
    assert_eq!(report.failed, 0, "{report:?}");
    let (checked, _) = check(&dc, &model, &uncertain);
    wait_pool(&dc, "Normal");
    assert_pgs_sane(&dc);
    let (compared, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
    summary(&format!(
        "fault scenario isolated MDM leader (cut from the other MDMs, sds1 reaching only it): runs 1, sds1's lease lapsed {:.2} s and sds1 declared down {:.2} s after the cut, leases refused by the isolated leader {refused}, acknowledged writes {}, blocks checked {checked}, lost 0, chunks with identical copies {compared}",
        lapsed.as_secs_f64(),
        down_after.as_secs_f64(),
        report.acked
    ));
}
