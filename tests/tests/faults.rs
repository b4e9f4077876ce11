//! Fault tests: real mdm, sds and sdc processes, a writer that records every acknowledged
//! write (and flushes at the end), failures injected while it runs, and a checker that reads the
//! whole written region back through the SDC. Each scenario appends a one-line summary to
//! `$MESHBLOCK_FAULT_SUMMARY` (printed by `./test` at the end).

use meshblock_tests::nbd::{check_model, write_load, Nbd, WriteReport};
use meshblock_tests::*;
use std::collections::HashSet;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes of the volume the writers touch.
const REGION: u64 = 128 << 20;

fn summary(line: &str) {
    eprintln!("{line}");
    if let Ok(p) = std::env::var("MESHBLOCK_FAULT_SUMMARY") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

type WriterResult = std::io::Result<(WriteReport, Vec<u8>, HashSet<u64>)>;

struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: Option<JoinHandle<WriterResult>>,
}

impl Writer {
    fn start(dc: &DataCluster, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let (s, a, socket) = (stop.clone(), acked.clone(), dc.socket.clone());
        let thread =
            std::thread::spawn(move || write_load(&socket, "vol1", REGION, 32, seed, s, a));
        Writer {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    /// Wait until `n` more writes were acknowledged.
    fn wait_more(&self, n: u64, what: &str) {
        let base = self.acked.load(Ordering::Relaxed);
        wait_for(what, Duration::from_secs(90), || {
            (self.acked.load(Ordering::Relaxed) >= base + n).then_some(())
        });
    }

    fn finish(mut self) -> (WriteReport, Vec<u8>, HashSet<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("writer thread");
        t.join().expect("writer panicked").expect("writer failed")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sds_state(dc: &DataCluster, name: &str) -> String {
    let v =
        dc.c.scli_raw(&["--query_sds", "--sds_name", name, "--json"]);
    if !v.ok {
        return String::new();
    }
    v.json()["state"].as_str().unwrap_or_default().to_string()
}

fn wait_sds_state(dc: &DataCluster, name: &str, want: &str) {
    wait_for(
        &format!("SDS {name} {want}"),
        Duration::from_secs(60),
        || (sds_state(dc, name) == want).then_some(()),
    );
}

fn wait_pool(dc: &DataCluster, want: &str) -> serde_json::Value {
    wait_for(
        &format!("pool sp1 {want}"),
        Duration::from_secs(120),
        || {
            let v = pool_state(&dc.c, "sp1");
            (v["state"] == want).then_some(v)
        },
    )
}

fn sds_metric(dc: &DataCluster, i: usize, name: &str) -> f64 {
    let addr = sds_metrics_addr(dc, i);
    let text = http_get(addr, "/metrics").unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn sds_metrics_addr(dc: &DataCluster, i: usize) -> std::net::SocketAddr {
    dc.sds_metrics[i]
}

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
    let w = Writer::start(&dc, 1);
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
/// expired, its PGs moved), no write or read reaches it afterwards, and the data is intact.
#[test]
fn frozen_sds_is_fenced() {
    let dc = DataCluster::start("faults_freeze", 3, 4);
    let w = Writer::start(&dc, 2);
    w.wait_more(2000, "writes before the freeze");
    dc.sds[1].signal(libc::SIGSTOP);
    wait_sds_state(&dc, "sds2", "Down");
    wait_pool(&dc, "Normal");
    w.wait_more(1000, "writes while sds2 is frozen");
    dc.sds[1].signal(libc::SIGCONT);
    wait_sds_state(&dc, "sds2", "Normal");
    let before = (
        sds_metric(&dc, 1, "meshblock_sds_writes_total"),
        sds_metric(&dc, 1, "meshblock_sds_reads_total"),
    );
    w.wait_more(2000, "writes after the thaw");
    let after = (
        sds_metric(&dc, 1, "meshblock_sds_writes_total"),
        sds_metric(&dc, 1, "meshblock_sds_reads_total"),
    );
    let (report, model, uncertain) = w.finish();
    let (checked, _) = check(&dc, &model, &uncertain);
    assert_eq!(
        before, after,
        "the thawed SDS served I/O after it was declared down (writes, reads before/after)"
    );
    let map = cluster_map(&dc.c);
    let sds2 = map.sds_by_name("sds2").expect("sds2").id;
    let holds = map
        .pools
        .values()
        .flat_map(|p| p.pgs.iter())
        .filter(|m| m.primary == Some(sds2) || m.secondary == Some(sds2))
        .count();
    assert_eq!(holds, 0, "the thawed SDS holds PGs again without a rebuild");
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
