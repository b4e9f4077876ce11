//! Rebuild and rebalance with real processes: a volume filled with a pattern (the recorded
//! image is computed, not stored) and a recording writer at QD32 running while SDS are killed,
//! MDM leaders are killed, SDS are added and removed; afterwards every PG has two copies on two
//! live SDS (in two fault sets when there are fault sets), both copies are byte-identical, and
//! every acknowledged-and-flushed write reads back.

use meshblock_tests::fill::{check_pattern, fill_pattern};
use meshblock_tests::nbd::{check_model, WriteReport};
use meshblock_tests::*;
use std::time::Duration;

/// The writer's region: the first 128 MiB.
const REGION: u64 = 128 << 20;
/// The pattern starts after it.
const FILL_START: u64 = REGION;

/// Stop the writer and check every acknowledged write reads back.
fn must_finish(w: Writer, dc: &DataCluster) -> WriteReport {
    let (report, model, uncertain) = w.finish();
    assert_eq!(report.failed, 0, "writes failed: {report:?}");
    let (checked, wrong, first) =
        check_model(&dc.socket, "vol1", &model, &uncertain).expect("read back");
    assert_eq!(
        wrong, 0,
        "{wrong} of {checked} acknowledged blocks read back wrong (first at {first:?})"
    );
    report
}

fn wait_pool(dc: &DataCluster, want: &str, timeout: Duration) -> serde_json::Value {
    wait_for(&format!("pool sp1 {want}"), timeout, || {
        let v = pool_state(&dc.c, "sp1");
        (v["state"] == want).then_some(v)
    })
}

/// Every PG has two in-sync copies (primary and secondary, or primary and the leaving copy
/// while a rebalance move fills a new secondary) on different live SDS, in different fault sets
/// when the SDS have them; a rebalance target is outside the primary's fault set too.
fn must_have_two_live_copies(dc: &DataCluster) {
    let map = cluster_map(&dc.c);
    for p in map.pools.values() {
        for (i, m) in p.pgs.iter().enumerate() {
            let in_sync = if m.rebuild.is_some() {
                m.leaving
            } else {
                m.secondary
            };
            let (Some(a), Some(b)) = (m.primary, in_sync) else {
                panic!("PG {i} lacks an in-sync copy: {m:?}");
            };
            assert_ne!(a, b, "PG {i} has one SDS twice: {m:?}");
            for s in [a, b] {
                assert_eq!(
                    map.sds[&s].state,
                    proto::model::SdsState::Normal,
                    "PG {i} names a down SDS: {m:?}"
                );
            }
            for other in [m.secondary, m.leaving].into_iter().flatten() {
                let (fa, fb) = (map.sds[&a].fault_set, map.sds[&other].fault_set);
                if fa.is_some() || fb.is_some() {
                    assert_ne!(fa, fb, "PG {i} has two copies in one fault set: {m:?}");
                }
            }
        }
    }
}

fn must_match_pattern(dc: &DataCluster, bytes: u64, seed: u64) {
    let wrong = check_pattern(&dc.socket, "vol1", FILL_START, bytes, seed).expect("read back");
    assert!(
        wrong.is_empty(),
        "{} MiB of the filled data read back wrong, first at {:?}",
        wrong.len(),
        wrong.first()
    );
}

fn must_have_identical_copies(dc: &DataCluster, bytes: u64) {
    // Rebalance may still be moving PGs: compare while every PG has two in-sync copies only,
    // and again if the map changed during the comparison.
    let epoch = |dc: &DataCluster| pool_state(&dc.c, "sp1")["map_epoch"].clone();
    for attempt in 0..5 {
        wait_pool(dc, "Normal", Duration::from_secs(300));
        let before = epoch(dc);
        let (compared, diffs) = compare_copies(&dc.c, "vol1", bytes >> 20);
        let settled = epoch(dc) == before;
        if settled || attempt == 4 {
            assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
            assert_eq!(compared, bytes >> 20);
            return;
        }
    }
}

fn mdm_logs(dc: &DataCluster) -> String {
    dc.c.mdms.iter().map(|m| m.proc.log_text()).collect()
}

/// Forward rebuild, 4 SDS, 2 GiB of data: SIGKILL one SDS while a writer runs at QD32; every
/// surviving SDS copies (many-to-many); the pool returns to Normal with two live copies per
/// PG; then kill a second SDS: the same again. The data, the writer's acknowledged writes and
/// the two copies of every chunk are checked after each.
#[test]
fn rebuild_after_two_sds_kills() {
    const FILL: u64 = 2 << 30;
    let mut dc = DataCluster::start_opts(
        "rebuild_two_kills",
        &DataOpts {
            n_sds: 4,
            vol_gb: 3,
            ..DataOpts::default()
        },
    );
    fill_pattern(&dc.socket, "vol1", FILL_START, FILL, 11).expect("fill");
    let w = Writer::start(&dc, REGION, 12);
    w.wait_more(1000, "writes before the first kill");
    dc.sds[0].kill();
    wait_sds_state(&dc, "sds1", "Down");
    let healed = wait_pool(&dc, "Normal", Duration::from_secs(300));
    assert_eq!(healed["normal_pgs"], 64, "{healed}");
    must_have_two_live_copies(&dc);
    for i in 1..4 {
        let copied = dc.sds_metric(i, "meshblock_sds_rebuild_bytes_total");
        assert!(
            copied > 0.0,
            "sds{} copied nothing: rebuild is not many-to-many",
            i + 1
        );
    }
    w.wait_more(500, "writes after the first rebuild");
    must_match_pattern(&dc, FILL, 11);

    dc.sds[2].kill();
    wait_sds_state(&dc, "sds3", "Down");
    wait_pool(&dc, "Normal", Duration::from_secs(300));
    must_have_two_live_copies(&dc);
    w.wait_more(500, "writes after the second rebuild");
    let report = must_finish(w, &dc);
    must_match_pattern(&dc, FILL, 11);
    must_have_identical_copies(&dc, FILL_START + FILL);
    assert!(
        mdm_logs(&dc).contains("rebuild finished"),
        "the MDM did not log the finished rebuild"
    );
    eprintln!(
        "rebuild_after_two_sds_kills: {} writes acknowledged",
        report.acked
    );
}

/// Forward rebuild with fault sets: 6 SDS in 3 fault sets; kill SDS in two different fault
/// sets one after the other: copies never share a fault set, the data stays intact.
#[test]
fn rebuild_keeps_copies_in_two_fault_sets() {
    const FILL: u64 = 512 << 20;
    let mut dc = DataCluster::start_opts(
        "rebuild_fault_sets",
        &DataOpts {
            n_sds: 6,
            vol_gb: 1,
            fault_sets: 3,
            ..DataOpts::default()
        },
    );
    must_have_two_live_copies(&dc);
    fill_pattern(&dc.socket, "vol1", FILL_START, FILL, 21).expect("fill");
    let w = Writer::start(&dc, REGION, 22);
    w.wait_more(500, "writes before the kills");
    // sds1 is in fs1, sds2 in fs2.
    for (i, name) in [(0, "sds1"), (1, "sds2")] {
        dc.sds[i].kill();
        wait_sds_state(&dc, name, "Down");
        wait_pool(&dc, "Normal", Duration::from_secs(300));
        must_have_two_live_copies(&dc);
        w.wait_more(300, "writes after a rebuild");
    }
    must_finish(w, &dc);
    must_match_pattern(&dc, FILL, 21);
    must_have_identical_copies(&dc, FILL_START + FILL);
}

/// The MDM leader is SIGKILLed in the middle of a (throttled) rebuild: the new leader keeps
/// the PGs already rebuilt (progress is in the Raft log, per PG) and the rebuild finishes.
#[test]
fn mdm_leader_killed_mid_rebuild() {
    const FILL: u64 = 1 << 30;
    let mut dc = DataCluster::start_opts(
        "rebuild_leader_kill",
        &DataOpts {
            n_mdm: 3,
            n_sds: 4,
            vol_gb: 2,
            ..DataOpts::default()
        },
    );
    fill_pattern(&dc.socket, "vol1", FILL_START, FILL, 31).expect("fill");
    // Slow enough that the rebuild is caught half way.
    dc.set_rebuild_policy(&["--concurrency", "1", "--bandwidth_mib_s", "8"]);
    let w = Writer::start(&dc, REGION, 32);
    w.wait_more(500, "writes before the failure");
    dc.sds[3].kill();
    wait_sds_state(&dc, "sds4", "Down");
    let before = wait_for(
        "some PGs rebuilt, others still rebuilding",
        Duration::from_secs(120),
        || {
            let v = pool_state(&dc.c, "sp1");
            let rebuilt = v["normal_pgs"].as_u64()?;
            let left = v["rebuilding_pgs"].as_u64()?;
            let degraded_at_kill = 64 - rebuilt;
            (v["state"] == "Rebuilding" && left > 0 && degraded_at_kill > 0 && rebuilt > 0)
                .then_some(v)
        },
    );
    let rebuilding_before = before["rebuilding_pgs"].as_u64().expect("count");
    let leader = dc.c.wait_leader(Duration::from_secs(10));
    dc.c.mdms[leader].proc.kill();
    let after = wait_for("a new leader's view", Duration::from_secs(30), || {
        let v = pool_state(&dc.c, "sp1");
        v["rebuilding_pgs"].as_u64().map(|_| v)
    });
    assert!(
        after["rebuilding_pgs"].as_u64().expect("count") <= rebuilding_before,
        "the new leader restarted finished PGs: before {before}, after {after}"
    );
    assert_eq!(after["degraded_pgs"], 0, "{after}");
    dc.set_rebuild_policy(&["--concurrency", "4", "--bandwidth_mib_s", "0"]);
    wait_pool(&dc, "Normal", Duration::from_secs(300));
    must_have_two_live_copies(&dc);
    w.wait_more(300, "writes after the rebuild");
    must_finish(w, &dc);
    must_match_pattern(&dc, FILL, 31);
    must_have_identical_copies(&dc, FILL_START + FILL);
}

/// fio with verification at QD32 through the SDC while an SDS is killed and its PGs are
/// rebuilt: every write fio had acknowledged reads back with the right content (fio writes
/// the first 128 MiB, the pattern lies after it).
#[test]
fn fio_verify_during_rebuild() {
    require("fio").expect("fio");
    let mut dc = DataCluster::start_opts(
        "rebuild_fio",
        &DataOpts {
            n_sds: 4,
            vol_gb: 2,
            // The default throttle: it backs off while fio writes.
            adaptive_rebuild: true,
            ..DataOpts::default()
        },
    );
    fill_pattern(&dc.socket, "vol1", FILL_START, 512 << 20, 41).expect("fill");
    let uri = dc.uri("vol1");
    let log = dc.c.dir.join("fio.log");
    let mut fio = Proc::spawn(
        "fio",
        std::path::Path::new("fio"),
        &[
            "--name=verify".to_string(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=32".into(),
            "--size=128m".into(),
            "--verify=crc32c".into(),
            "--verify_fatal=1".into(),
            "--do_verify=1".into(),
            "--randrepeat=0".into(),
        ],
        log.clone(),
    );
    let served = |dc: &DataCluster| -> f64 {
        (0..4)
            .map(|i| dc.sds_metric(i, "meshblock_sds_user_requests_total"))
            .filter(|v| v.is_finite())
            .sum()
    };
    let base = served(&dc);
    wait_for("fio writing", Duration::from_secs(60), || {
        (served(&dc) > base + 5000.0).then_some(())
    });
    dc.sds[1].kill();
    wait_sds_state(&dc, "sds2", "Down");
    let status = wait_for("fio to finish", Duration::from_secs(600), || {
        fio.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    });
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "fio failed ({status}):\n{out}");
    assert!(!out.contains("verify failed"), "{out}");
    wait_pool(&dc, "Normal", Duration::from_secs(300));
    must_have_two_live_copies(&dc);
    must_match_pattern(&dc, 512 << 20, 41);
}

/// Rebalance: adding an SDS to a loaded pool moves PGs onto it until every SDS holds its
/// share (within ~10%); removing one moves its copies off and then removes it. A writer runs
/// throughout; data and copies are checked at the end.
#[test]
fn rebalance_on_add_and_remove() {
    const FILL: u64 = 768 << 20;
    let opts = DataOpts {
        n_sds: 3,
        vol_gb: 1,
        ..DataOpts::default()
    };
    let mut dc = DataCluster::start_opts("rebalance_add_remove", &opts);
    fill_pattern(&dc.socket, "vol1", FILL_START, FILL, 51).expect("fill");
    let w = Writer::start(&dc, REGION, 52);
    w.wait_more(500, "writes before the new SDS");
    // scli follows the new SDS until the rebalance onto it ends (checked in `add_sds`).
    dc.add_sds(
        &DataOpts {
            add_sds_wait: true,
            ..opts.clone()
        },
        4,
    );
    wait_sds_state(&dc, "sds4", "Normal");
    let copies = |dc: &DataCluster, name: &str| -> u64 {
        let v =
            dc.c.must_scli(&["--query_sds", "--sds_name", name, "--json"]);
        v.json()["pg_copies"].as_u64().unwrap_or(0)
    };
    // 64 PGs x 2 copies over 4 equal SDS: 32 each. `--wait` returned only once it was so.
    let at_return = copies(&dc, "sds4");
    assert!(
        (29..=35).contains(&at_return),
        "scli --add_sds --wait returned with {at_return} copies on sds4, its share is 32"
    );
    wait_for("sds4 filled to its share", Duration::from_secs(300), || {
        let v = pool_state(&dc.c, "sp1");
        (v["state"] == "Normal" && copies(&dc, "sds4") >= 29).then_some(())
    });
    for n in ["sds1", "sds2", "sds3", "sds4"] {
        let c = copies(&dc, n);
        assert!(
            (29..=35).contains(&c),
            "{n} holds {c} copies, its share is 32"
        );
    }
    must_have_two_live_copies(&dc);
    // The copies moved off are freed on disk: at most two copies of the chunks written (the
    // writer's region and the fill) remain, where the moved-off copies alone would add ~450.
    let most = 2.0 * ((FILL_START + FILL) >> 20) as f64;
    wait_for(
        "moved-off copies freed by the garbage collector",
        Duration::from_secs(60),
        || {
            let total: f64 = (0..4)
                .map(|i| dc.sds_metric(i, "meshblock_sds_chunks_allocated"))
                .sum();
            (total <= most).then_some(())
        },
    );
    assert!(sds_sum(&dc, "meshblock_sds_gc_freed_chunks_total", &[0, 1, 2]) > 100.0);
    w.wait_more(300, "writes after the rebalance");

    // `--wait` follows the removal to its end with progress lines (plain ones: no terminal).
    let mut remove = Spawned(
        dc.c.scli_command(&[
            "--remove_sds",
            "--i_am_sure",
            "--sds_name",
            "sds2",
            "--wait",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run scli"),
    );
    let status = wait_for(
        "--remove_sds --wait to return",
        Duration::from_secs(300),
        || remove.0.try_wait().ok().flatten(),
    );
    let mut out = String::new();
    if let Some(mut o) = remove.0.stdout.take() {
        std::io::Read::read_to_string(&mut o, &mut out).expect("read scli's output");
    }
    assert!(status.success(), "--remove_sds --wait failed: {out}");
    assert!(out.contains("being removed"), "{out}");
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("Removing SDS sds2:"))
        .collect();
    assert!(!lines.is_empty(), "no progress line: {out}");
    assert!(
        lines[0].contains("chunks") && lines[0].contains("PG copies left"),
        "{out}"
    );
    assert!(out.contains("SDS sds2 removed after"), "{out}");
    summary(&format!(
        "--remove_sds --wait: {} progress lines, first {:?}, last {:?}",
        lines.len(),
        lines[0],
        out.lines().last().unwrap_or_default()
    ));
    // Done means gone.
    assert!(!dc.c.scli_raw(&["--query_sds", "--sds_name", "sds2"]).ok);
    wait_pool(&dc, "Normal", Duration::from_secs(60));
    must_have_two_live_copies(&dc);
    dc.sds[1].kill();
    w.wait_more(300, "writes after the removal");
    must_finish(w, &dc);
    must_match_pattern(&dc, FILL, 51);
    must_have_identical_copies(&dc, FILL_START + FILL);
    assert!(
        mdm_logs(&dc).contains("rebalance finished"),
        "no rebalance log"
    );
}

/// Removing an SDS whose data the others cannot hold is refused with a clear error and
/// changes nothing.
#[test]
fn remove_sds_refused_when_data_cannot_fit() {
    let opts = DataOpts {
        n_sds: 3,
        vol_gb: 1,
        dev_bytes: 512 << 20,
        ..DataOpts::default()
    };
    let dc = DataCluster::start_opts("rebalance_refused", &opts);
    // 600 MiB, two copies, over 3 x 512 MiB: about 400 MiB stored per SDS.
    fill_pattern(&dc.socket, "vol1", 0, 600 << 20, 61).expect("fill");
    // The SDS report what they store in their hellos.
    wait_for("stored chunks reported", Duration::from_secs(30), || {
        let v =
            dc.c.must_scli(&["--query_sds", "--sds_name", "sds1", "--json"]);
        (v.json()["integrity"]["chunks_stored"].as_u64().unwrap_or(0) > 300).then_some(())
    });
    let before = cluster_map(&dc.c);
    let r =
        dc.c.scli_raw(&["--remove_sds", "--i_am_sure", "--sds_name", "sds1"]);
    assert!(!r.ok, "removal accepted: {}", r.stdout);
    assert!(
        r.stderr.contains("Cannot remove SDS sds1") && r.stderr.contains("Nothing was changed"),
        "unclear error: {}",
        r.stderr
    );
    let after = cluster_map(&dc.c);
    assert_eq!(before.pools, after.pools);
    assert!(!after.sds.values().any(|x| x.removing));
    let wrong = check_pattern(&dc.socket, "vol1", 0, 600 << 20, 61).expect("read");
    assert!(wrong.is_empty());
}

/// Sum of a counter over the SDS that are running.
fn sds_sum(dc: &DataCluster, name: &str, which: &[usize]) -> f64 {
    which
        .iter()
        .map(|&i| dc.sds_metric(i, name))
        .filter(|v| v.is_finite())
        .sum()
}

/// Backward rebuild: an SDS killed and restarted during writes (a short outage, within the
/// window) is refilled with only the chunks that changed while it was away, and ends with
/// copies byte-identical to its peers'.
#[test]
fn backward_rebuild_copies_only_changes() {
    const FILL: u64 = 1 << 30;
    let mut dc = DataCluster::start_opts(
        "rebuild_backward",
        &DataOpts {
            n_sds: 3,
            vol_gb: 2,
            ..DataOpts::default()
        },
    );
    fill_pattern(&dc.socket, "vol1", FILL_START, FILL, 71).expect("fill");
    // A slow forward rebuild, so the outage is over before it could finish.
    dc.set_rebuild_policy(&["--concurrency", "1", "--bandwidth_mib_s", "1"]);
    let w = Writer::start(&dc, REGION, 72);
    w.wait_more(500, "writes before the outage");
    let stored = {
        let v =
            dc.c.must_scli(&["--query_sds", "--sds_name", "sds3", "--json"]);
        v.json()["integrity"]["chunks_stored"].as_u64().unwrap_or(0)
    };
    assert!(stored > 400, "sds3 stores only {stored} chunks");
    let copied_before = sds_sum(&dc, "meshblock_sds_rebuild_bytes_total", &[0, 1]);
    dc.sds[2].kill();
    wait_sds_state(&dc, "sds3", "Down");
    w.wait_more(1000, "writes during the outage");
    dc.sds[2].start();
    wait_sds_state(&dc, "sds3", "Normal");
    dc.set_rebuild_policy(&["--concurrency", "4", "--bandwidth_mib_s", "0"]);
    wait_pool(&dc, "Normal", Duration::from_secs(300));
    must_have_two_live_copies(&dc);
    let copied = sds_sum(&dc, "meshblock_sds_rebuild_bytes_total", &[0, 1]) - copied_before;
    let skipped = sds_sum(&dc, "meshblock_sds_rebuild_chunks_skipped_total", &[0, 1]);
    let stored_bytes = (stored << 20) as f64;
    assert!(
        copied < stored_bytes / 4.0,
        "backward rebuild copied {copied} bytes of the {stored_bytes} sds3 held"
    );
    assert!(skipped > 0.0, "no chunk was skipped");
    // sds3 is back in the PGs it held: every PG has two copies again, none moved for good.
    let map = cluster_map(&dc.c);
    let sds3 = map.sds_by_name("sds3").expect("sds3").id;
    let held = map
        .pools
        .values()
        .next()
        .expect("pool")
        .pgs
        .iter()
        .filter(|m| m.primary == Some(sds3) || m.secondary == Some(sds3))
        .count();
    assert!(
        held > 30,
        "sds3 holds only {held} PG copies after its return"
    );
    w.wait_more(300, "writes after the backward rebuild");
    must_finish(w, &dc);
    must_match_pattern(&dc, FILL, 71);
    must_have_identical_copies(&dc, FILL_START + FILL);
    eprintln!(
        "backward rebuild: copied {:.1} MiB for an SDS holding {stored} MiB, skipped {skipped} chunks",
        copied / (1u64 << 20) as f64
    );
}

/// Devices added and removed while the SDS runs, with a writer at QD32: `--add_sds_device`
/// is opened by the running SDS and takes new chunks; `--remove_sds_device` moves the old
/// device's chunks to it (the SDS is SIGKILLed in the middle of that and restarted with only
/// its original device on the command line, whose lock is still held a while, as after a real
/// crash: it waits for the lock, opens the added device from the map, keeps the complete copy
/// of a chunk the kill left on both, and finishes); the record goes once it is empty.
/// Removing the last device or an unknown one is refused and changes nothing. Every
/// acknowledged write and the filled data read back, and the two copies are identical.
#[test]
fn device_added_and_removed_while_running() {
    const FILL: u64 = 768 << 20;
    let opts = DataOpts {
        n_sds: 3,
        vol_gb: 1,
        ..DataOpts::default()
    };
    let mut dc = DataCluster::start_opts("device_add_remove", &opts);
    fill_pattern(&dc.socket, "vol1", FILL_START, FILL, 81).expect("fill");
    let w = Writer::start(&dc, REGION, 82);
    w.wait_more(300, "writes before the new device");

    let (old, new) = add_second_device(&dc);

    // Refusals change nothing.
    let before = cluster_map(&dc.c);
    let r = dc.c.scli_raw(&[
        "--remove_sds_device",
        "--i_am_sure",
        "--sds_name",
        "sds2",
        "--device_path",
        &dc.c.dir.join("sds2.img").display().to_string(),
    ]);
    assert!(!r.ok, "removing sds2's last device was accepted");
    assert!(
        r.stderr.contains("--remove_sds") && r.stderr.contains("Nothing was changed"),
        "unclear error: {}",
        r.stderr
    );
    let r = dc.c.scli_raw(&[
        "--remove_sds_device",
        "--i_am_sure",
        "--sds_name",
        "sds1",
        "--device_path",
        "/no/such/device",
    ]);
    assert!(!r.ok && r.stderr.contains("has no device"), "{}", r.stderr);
    let after = cluster_map(&dc.c);
    assert_eq!(before.sds, after.sds, "a refused removal changed the SDS");

    let held = dc.sds_metric(0, "meshblock_sds_chunks_allocated");
    let r = dc.c.must_scli(&[
        "--remove_sds_device",
        "--i_am_sure",
        "--sds_name",
        "sds1",
        "--device_path",
        &old,
    ]);
    assert!(r.stdout.contains("being removed"), "{}", r.stdout);
    // SIGKILL the SDS in the middle of the moves, restart it (its command line names only the
    // old device).
    wait_for("some chunks moved", Duration::from_secs(60), || {
        (dc.sds_metric(0, "meshblock_sds_drained_chunks_total") >= 20.0).then_some(())
    });
    dc.sds[0].kill();
    // The kernel lets go of a killed SDS's device locks only after the I/O it had in flight
    // finishes: hold the old device's lock across the restart, as that delay can, and see the
    // SDS wait for it instead of exiting.
    let held_lock = std::fs::File::open(&old).expect("open the old device");
    held_lock.lock().expect("lock the old device");
    dc.sds[0].start();
    wait_for(
        "the restarted SDS to wait for the locked device",
        Duration::from_secs(30),
        || {
            dc.sds[0]
                .log_text()
                .contains("the device is locked by another process; waiting")
                .then_some(())
        },
    );
    assert!(dc.sds[0].alive(), "the SDS gave up on a locked device");
    drop(held_lock);
    wait_for(
        "the old device's record to go",
        Duration::from_secs(300),
        || {
            let devs = sds_devices(&dc, "sds1");
            (devs.len() == 1 && devs[0].0 == new).then_some(())
        },
    );
    assert!(held > 100.0, "sds1 held only {held} chunks");
    assert_eq!(dc.sds_metric(0, "meshblock_sds_draining_chunks"), 0.0);
    w.wait_more(300, "writes after the removal");
    must_finish(w, &dc);
    must_match_pattern(&dc, FILL, 81);
    must_have_identical_copies(&dc, FILL_START + FILL);
    must_have_two_live_copies(&dc);
    let log = dc.sds[0].log_text();
    assert!(
        log.contains("opened a device the cluster map gives this SDS"),
        "the restarted SDS did not open the added device from the map"
    );
}

/// Moves off a device being removed pass the SDS's copy throttle, under the pool's
/// rebuild/rebalance policy, like rebuild copies: at 4 MiB/s (adaptive off) the first 12
/// chunks take at least 2.5 s (the throttle lets one copy go at once, then one every 0.25 s);
/// once the limit is lifted the drain finishes and the data reads back.
#[test]
fn device_drain_follows_the_pool_copy_policy() {
    const FILL: u64 = 256 << 20;
    let opts = DataOpts {
        n_sds: 3,
        vol_gb: 1,
        ..DataOpts::default()
    };
    let dc = DataCluster::start_opts("device_drain_throttle", &opts);
    fill_pattern(&dc.socket, "vol1", FILL_START, FILL, 91).expect("fill");
    let (old, new) = add_second_device(&dc);
    let held = dc.sds_metric(0, "meshblock_sds_chunks_allocated");
    assert!(held > 40.0, "sds1 holds only {held} chunks");
    dc.set_rebuild_policy(&["--bandwidth_mib_s", "4", "--adaptive", "off"]);
    let started = std::time::Instant::now();
    dc.c.must_scli(&[
        "--remove_sds_device",
        "--i_am_sure",
        "--sds_name",
        "sds1",
        "--device_path",
        &old,
    ]);
    wait_for("12 chunks moved", Duration::from_secs(60), || {
        (dc.sds_metric(0, "meshblock_sds_drained_chunks_total") >= 12.0).then_some(())
    });
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "12 chunks moved in {took:?} under a 4 MiB/s limit"
    );
    dc.set_rebuild_policy(&["--bandwidth_mib_s", "0"]);
    wait_for(
        "the old device's record to go",
        Duration::from_secs(120),
        || {
            let devs = sds_devices(&dc, "sds1");
            (devs.len() == 1 && devs[0].0 == new).then_some(())
        },
    );
    must_match_pattern(&dc, FILL, 91);
    must_have_identical_copies(&dc, FILL_START + FILL);
}
