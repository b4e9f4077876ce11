//! Durability fault tests on devices that behave like disks with a volatile write cache: the
//! SDS (fail-point build, `--test-volatile-cache`) keeps every device write not followed by a
//! device flush in its own memory, so a SIGKILL loses it as a power cut loses a disk's cache.
//! Writers on several NBD connections flush concurrently; SDS are killed at random moments;
//! every write acknowledged before a completed FLUSH must read back. Each scenario appends a
//! summary line to `$MESHBLOCK_FAULT_SUMMARY`.

use meshblock_tests::flushes::{Checked, FlushWriters, Model};
use meshblock_tests::*;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Bytes of the volume the writers touch.
const REGION: u64 = 64 << 20;
/// Kill rounds per seed.
const ROUNDS: usize = 4;

fn volatile_cluster(name: &str) -> DataCluster {
    DataCluster::start_opts(
        name,
        &DataOpts {
            vol_gb: 1,
            sds_bin: Some(failpoint_sds()),
            sds_extra: vec!["--test-volatile-cache".into()],
            ..DataOpts::default()
        },
    )
}

/// The write rule, under kills of one of the three SDS at a time at random moments (its cache
/// is lost; the flush must have reached the other copy, or it after its restart must not
/// count), over several seeds.
#[test]
fn flushed_writes_survive_kills_with_volatile_device_caches() {
    volatile_kills("durability_volatile", false);
}

/// The same with two or all three SDS killed at once in some rounds (both copies of some PGs
/// lose their caches): only what was flushed to their devices is left, and writes no flush
/// reached on any copy are lost, which the SDC must say by failing a FLUSH, every FLUSH that
/// covered them (also those already under way on other connections).
#[test]
fn flushed_writes_survive_killing_every_sds_at_once() {
    volatile_kills("durability_volatile_all", true);
}

fn volatile_kills(name: &str, several: bool) {
    let mut dc = volatile_cluster(name);
    let model = Model::new(REGION);
    let mut kills = 0;
    let (mut checked_total, mut excused_total) = (0, 0);
    for seed in [1u64, 2, 3] {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for round in 0..ROUNDS {
            let writers = FlushWriters::start(
                &dc.socket,
                "vol1",
                &model,
                4,
                8,
                12,
                seed * 100 + round as u64,
            );
            let before = model.report().writes_acked;
            let n = rng.gen_range(200..1500);
            wait_for("writes before the kill", Duration::from_secs(120), || {
                (model.report().writes_acked >= before + n).then_some(())
            });
            let victims: Vec<usize> = match rng.gen_range(0..3) {
                _ if !several => vec![rng.gen_range(0..3)],
                0 => vec![0, 1, 2],
                1 => {
                    let a = rng.gen_range(0..3);
                    vec![a, (a + 1) % 3]
                }
                _ => vec![rng.gen_range(0..3)],
            };
            for i in &victims {
                dc.sds[*i].kill();
                kills += 1;
            }
            // Sometimes back at once (before the MDM notices), sometimes only once the MDM
            // declared them down: a condition, not a pause.
            if rng.gen_bool(0.5) {
                for i in &victims {
                    wait_sds_state(&dc, &format!("sds{}", i + 1), "Down");
                }
            }
            for i in &victims {
                dc.sds[*i].start();
            }
            for i in &victims {
                wait_sds_state(&dc, &format!("sds{}", i + 1), "Normal");
            }
            wait_pool(&dc, "Normal");
            writers.finish().expect("writers");
            let Checked {
                checked,
                lost,
                excused,
                first,
            } = model.check(&dc.socket, "vol1").expect("read back");
            assert_eq!(
                lost,
                0,
                "seed {seed} round {round} (killed {victims:?}): {lost} of {checked} blocks lost a \
                 flushed write; first: {}",
                first.unwrap_or_default()
            );
            checked_total += checked;
            excused_total += excused;
        }
    }
    let r = model.report();
    assert!(r.flushes_ok > 0, "{r:?}");
    wait_pool(&dc, "Normal");
    let (compared, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
    summary(&format!(
        "fault scenario volatile device caches (4 NBD connections flushing concurrently, {} SDS killed at random moments, seeds 1-3): kills {kills}, acknowledged writes {}, flushes {} ok / {} failed, blocks checked {checked_total}, lost 0, blocks not checked because a failed flush reported their write lost {excused_total}, chunks with identical copies {compared}",
        if several { "1-3" } else { "1" },
        r.writes_acked,
        r.flushes_ok,
        r.flushes_failed
    ));
}

/// A device that dies under load: one of sds1's two devices starts failing every I/O (the
/// fault-test fail point `sds::device::eio`) under 4 connections of writes with concurrent
/// flushes. The SDS takes it out of its I/O at once and keeps serving from its other device;
/// primary reads of copies on it come from the other copy; the MDM drops sds1's copies in the
/// pool and rebuilds them elsewhere, and the pool is Normal again by itself; no write and no
/// flush fails; every acknowledged write reads back; scli shows the device Failed with why.
#[test]
fn a_failing_device_is_taken_out_and_its_copies_rebuilt() {
    let dc = DataCluster::start_opts(
        "durability_failed_device",
        &DataOpts {
            vol_gb: 1,
            sds_bin: Some(failpoint_sds()),
            sds_extra: vec!["--failpoints-file".into(), "{dir}/{name}.failpoints".into()],
            ..DataOpts::default()
        },
    );
    let (_, second) = add_second_device(&dc);
    let model = Model::new(REGION);
    let writers = FlushWriters::start(&dc.socket, "vol1", &model, 4, 8, 12, 7);
    let wait_writes = |n: u64, what: &str| {
        let base = model.report().writes_acked;
        wait_for(what, Duration::from_secs(120), || {
            (model.report().writes_acked >= base + n).then_some(())
        });
    };
    wait_writes(1500, "writes over both devices");
    let on_second = dc.sds_metric(0, "meshblock_sds_chunks_allocated");
    dc.set_failpoints(0, "sds::device::eio=return(sds1-b.img)");
    wait_for(
        "the MDM to show the failing device Failed",
        Duration::from_secs(60),
        || {
            sds_devices(&dc, "sds1")
                .iter()
                .any(|(p, st, _)| *p == second && st == "Failed")
                .then_some(())
        },
    );
    wait_writes(1500, "writes after the device failed");
    let pool = wait_pool(&dc, "Normal");
    writers.finish().expect("writers");
    let r = model.report();
    assert_eq!(r.writes_failed, 0, "{r:?}");
    assert_eq!(r.flushes_failed, 0, "{r:?}");
    let Checked {
        checked,
        lost,
        first,
        ..
    } = model.check(&dc.socket, "vol1").expect("read back");
    assert_eq!(
        lost,
        0,
        "{lost} of {checked} blocks lost a flushed write; first: {}",
        first.unwrap_or_default()
    );
    let (compared, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(diffs.is_empty(), "copies differ: {diffs:#?}");
    let q =
        dc.c.must_scli(&["--query_sds", "--sds_name", "sds1", "--json"]);
    let dev = q.json()["devices"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["path"] == second.as_str()).cloned())
        .expect("the failed device in --query_sds");
    let error = dev["error"].as_str().unwrap_or_default().to_string();
    assert!(!error.is_empty(), "--query_sds shows no error: {dev}");
    let text =
        dc.c.must_scli(&["--query_sds", "--sds_name", "sds1"])
            .stdout;
    assert!(text.contains("Failed"), "{text}");

    // The operator replaces the disk at the same path and clears the error: the SDS formats it
    // and serves it as new capacity, under writes that keep flushing.
    dc.set_failpoints(0, "");
    let cleared = dc.c.must_scli(&[
        "--clear_sds_device_error",
        "--sds_name",
        "sds1",
        "--device_path",
        &second,
    ]);
    assert!(cleared.stdout.contains("Cleared"), "{}", cleared.stdout);
    let refused = dc.c.scli_raw(&[
        "--clear_sds_device_error",
        "--sds_name",
        "sds1",
        "--device_path",
        &second,
    ]);
    assert!(
        !refused.ok && refused.stderr.contains("not Failed"),
        "a second clear is refused: {}",
        refused.stderr
    );
    let writers = FlushWriters::start(&dc.socket, "vol1", &model, 4, 8, 12, 8);
    wait_for_explained(
        "the cleared device to serve again as new capacity",
        Duration::from_secs(180),
        || {
            sds_devices(&dc, "sds1")
                .iter()
                .any(|(p, st, cap)| *p == second && st == "Normal" && *cap > 0)
                .then_some(())
        },
        || {
            let log = dc.sds[0].log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            format!(
                "\nscli --query_sds: {}\nsds1 log, newest first:\n{}",
                dc.c.scli_raw(&["--query_sds", "--sds_name", "sds1", "--json"])
                    .stdout,
                tail.join("\n")
            )
        },
    );
    let base = model.report().writes_acked;
    wait_for("writes after the clear", Duration::from_secs(120), || {
        (model.report().writes_acked >= base + 1000).then_some(())
    });
    wait_pool(&dc, "Normal");
    writers.finish().expect("writers after the clear");
    let r2 = model.report();
    assert_eq!((r2.writes_failed, r2.flushes_failed), (0, 0), "{r2:?}");
    let Checked {
        checked: checked2,
        lost: lost2,
        first: first2,
        ..
    } = model.check(&dc.socket, "vol1").expect("read back");
    assert_eq!(lost2, 0, "after the clear: {}", first2.unwrap_or_default());
    let (_, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(
        diffs.is_empty(),
        "copies differ after the clear: {diffs:#?}"
    );
    summary(&format!(
        "fault scenario failed device (one of sds1's two devices fails every I/O under 4 NBD connections flushing concurrently): chunks on sds1 before {on_second}, acknowledged writes {}, flushes {} ok / 0 failed, blocks checked {checked}, lost 0, pool {} again by itself, chunks with identical copies {compared}, device error shown: {error}; cleared with --clear_sds_device_error and served again as new capacity, blocks checked after {checked2}, lost 0",
        r.writes_acked, r.flushes_ok, pool["state"]
    ));
}
