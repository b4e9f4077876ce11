//! Snapshots in V-trees against the real daemons, read back through NBD: a snapshot taken under
//! a QD32 writer holds exactly the writes acknowledged before the command (and none sent after
//! it returned), also with an SDS killed as it is taken and for a consistency group of three
//! volumes; the source keeps changing meanwhile and loses nothing; a restore makes the volume
//! equal to the snapshot (and `qemu-img compare` agrees); the space a snapshot costs; bad input.

use meshblock_tests::nbd::{self, Nbd, Probe, SLOT};
use meshblock_tests::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bytes of each volume the writers write (and the checks read).
const REGION: u64 = 256 << 20;
/// The writers' IOPS while a snapshot is taken (a QoS limit): the command takes a lease period
/// (1.5 s) and a free-running QD32 writer would touch every slot meanwhile, leaving nothing to
/// check.
const SLOW_IOPS: u64 = 100;

/// Set `volume`'s IOPS limit on the lab's SDC (0: none) and wait until the SDC applies it.
fn limit(dc: &mut DataCluster, volume: &str, iops: u64) {
    dc.c.must_scli(&[
        "--set_sdc_volume_limits",
        "--volume_name",
        volume,
        "--sdc_name",
        "sdc1",
        "--limit_iops",
        &iops.to_string(),
    ]);
    let addr = sdc_metrics(dc);
    wait_for(
        "the SDC to apply the limit",
        Duration::from_secs(60),
        || {
            (volume_metric(addr, "meshblock_sdc_volume_iops_limit", volume) == Some(iops as f64))
                .then_some(())
        },
    );
}

/// A QD32 recording writer on one export, with a probe for snapshot instants.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    probe: Arc<Probe>,
    thread: Option<std::thread::JoinHandle<WriterResult>>,
}

impl Load {
    fn start(dc: &DataCluster, export: &str, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let probe = Arc::new(Probe::default());
        let (s, a, p, socket, export) = (
            stop.clone(),
            acked.clone(),
            probe.clone(),
            dc.socket.clone(),
            export.to_string(),
        );
        let thread = std::thread::spawn(move || {
            nbd::write_load_probed(&socket, &export, REGION, 32, seed, s, a, &p)
        });
        Load {
            stop,
            acked,
            probe,
            thread: Some(thread),
        }
    }

    fn wait_more(&self, n: u64) {
        let base = self.acked.load(Ordering::Relaxed);
        wait_for("the writer's progress", Duration::from_secs(300), || {
            (self.acked.load(Ordering::Relaxed) >= base + n).then_some(())
        });
    }

    fn finish(mut self) -> (Vec<u8>, HashSet<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("writer thread");
        let (report, model, uncertain) = t.join().expect("writer panicked").expect("writer failed");
        assert!(report.acked > 0, "the writer wrote nothing");
        (model, uncertain)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Map `volume` to the lab's SDC and wait for its NBD export.
fn export(dc: &DataCluster, volume: &str) {
    dc.c.must_scli(&[
        "--map_volume_to_sdc",
        "--volume_name",
        volume,
        "--sdc_name",
        "sdc1",
    ]);
    wait_export(&dc.uri(volume));
}

/// Read `export`'s first `model.len()` bytes through NBD and count the 4 KiB blocks outside
/// `skip` (slots) that differ from `model`: (checked, wrong, first wrong offset).
fn differences(
    dc: &DataCluster,
    export: &str,
    model: &[u8],
    skip: &HashSet<u64>,
) -> (u64, u64, Option<u64>) {
    nbd::check_model(&dc.socket, export, model, skip).expect("read the export")
}

/// Take a snapshot of `volumes` (names `names`) while their writers run; returns each
/// writer's model at the instant and the slots its writes may have changed meanwhile.
fn snapshot(
    dc: &mut DataCluster,
    loads: &[&Load],
    volumes: &str,
    names: &str,
) -> Vec<(Vec<u8>, HashSet<u64>)> {
    for v in volumes.split(',') {
        limit(dc, v, SLOW_IOPS);
    }
    for l in loads {
        l.probe.begin();
    }
    let out = dc.c.scli_raw(&[
        "--snapshot_volume",
        "--volume_name",
        volumes,
        "--snapshot_name",
        names,
    ]);
    let views: Vec<_> = loads.iter().map(|l| l.probe.end()).collect();
    assert!(out.ok, "snapshot failed: {}{}", out.stdout, out.stderr);
    for v in volumes.split(',') {
        limit(dc, v, 0);
    }
    views
}

fn check_snapshot(dc: &DataCluster, name: &str, view: &(Vec<u8>, HashSet<u64>)) {
    export(dc, name);
    let (model, touched) = view;
    let (checked, wrong, first) = differences(dc, name, model, touched);
    let total = REGION / 4096;
    summary(&format!(
        "snapshot {name}: {checked} of {total} blocks checked ({} slots had writes in flight or sent during the command), {wrong} wrong",
        touched.len()
    ));
    assert!(
        checked > total / 2,
        "too few blocks checked: the writer touched {} of {} slots during the snapshot",
        touched.len(),
        REGION / SLOT
    );
    assert_eq!(
        wrong, 0,
        "snapshot {name} differs from the writes acknowledged before it (first at {first:?})"
    );
}

#[test]
fn a_snapshot_under_load_holds_exactly_the_writes_acknowledged_before_it() {
    let mut dc = DataCluster::start("snap-load", 3, 1);
    let load = Load::start(&dc, "vol1", 11);
    load.wait_more(1000);
    let first = snapshot(&mut dc, &[&load], "vol1", "snap1");
    load.wait_more(1000);
    check_snapshot(&dc, "snap1", &first[0]);

    // An SDS killed just before the next snapshot: the MDM takes it with the SDS still in the
    // map, then fails its PGs over; the snapshot is still exact.
    dc.sds[1].kill();
    let second = snapshot(&mut dc, &[&load], "vol1", "snap2");
    load.wait_more(1000);
    check_snapshot(&dc, "snap2", &second[0]);
    // The first snapshot did not change while the source was written and an SDS died.
    let (checked, wrong, _) = differences(&dc, "snap1", &first[0].0, &first[0].1);
    assert!(checked > 0 && wrong == 0, "snap1 changed: {wrong} blocks");

    // The source lost nothing acknowledged and flushed.
    let (model, uncertain) = load.finish();
    // The copies of every layer agree, the frozen ones included: a write in flight as a
    // snapshot froze its layer, applied by the primary and refused by a secondary that already
    // held the new map, was sent to the secondary again under that map.
    let (compared, diffs) = compare_copies(&dc.c, "vol1", REGION >> 20);
    assert!(compared > 0, "no chunk compared");
    assert!(diffs.is_empty(), "the copies differ: {diffs:?}");
    let (checked, wrong, at) = differences(&dc, "vol1", &model, &uncertain);
    assert!(checked > 0);
    assert_eq!(wrong, 0, "vol1 lost acknowledged writes (first at {at:?})");

    // Writing to a snapshot changes neither the source nor its sibling.
    let mut c = Nbd::connect(&dc.socket, "snap2").expect("connect snap2");
    c.write_at(4096 + 512, &[0xab; 1000]).expect("write snap2");
    c.flush().expect("flush snap2");
    let got = c.read_at(4096, 4096).expect("read snap2");
    let mut want = second[0].0[4096..8192].to_vec();
    want[512..1512].fill(0xab);
    if !second[0].1.contains(&0) {
        assert_eq!(
            got, want,
            "a partial write to a snapshot keeps the rest of its block"
        );
    }
    c.disconnect();
    let (_, wrong, _) = differences(&dc, "vol1", &model, &uncertain);
    assert_eq!(wrong, 0, "writing the snapshot changed its source");

    // Restore: vol1 reads what snap1 reads, checked block by block and by qemu-img compare.
    dc.c.must_scli(&[
        "--overwrite_volume_content",
        "--i_am_sure",
        "--source_volume_name",
        "snap1",
        "--destination_volume_name",
        "vol1",
        "--allow_overwrite_mapped",
    ]);
    let mut snap1 = vec![0u8; REGION as usize];
    let mut r = Nbd::connect(&dc.socket, "snap1").expect("connect snap1");
    for off in (0..REGION).step_by(1 << 20) {
        let d = r.read_at(off, 1 << 20).expect("read snap1");
        snap1[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    r.disconnect();
    let (_, wrong, at) = differences(&dc, "vol1", &snap1, &HashSet::new());
    assert_eq!(
        wrong, 0,
        "the restored volume differs from the snapshot at {at:?}"
    );
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &dc.uri("snap1"),
            &dc.uri("vol1"),
        ],
    )
    .expect("qemu-img compare");
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The V-tree view: three members; what the snapshots alone hold comes from the SDS reports.
    let tree =
        dc.c.must_scli(&["--query_vtree", "--volume_name", "vol1", "--json"])
            .json();
    let members = tree["members"].as_array().cloned().unwrap_or_default();
    assert_eq!(members.len(), 3, "{tree}");
    summary(&format!(
        "V-tree after two snapshots and a restore: stored {} MiB, shared {} MiB",
        tree["stored_bytes"].as_u64().unwrap_or(0) >> 20,
        tree["shared_bytes"].as_u64().unwrap_or(0) >> 20
    ));
}

/// A write in flight as a snapshot freezes its layer, applied by its primary and refused by a
/// secondary that already holds the new map, is sent to the secondary again under that map: the
/// frozen layer's two copies stay equal, the write lands in the volume's new layer on retry,
/// and the snapshot holds either the old or the new data in each block (the write was not
/// acknowledged when the command started). A fail point holds the forward at the secondary
/// until the snapshot is taken.
#[test]
fn a_write_refused_by_a_secondary_holding_the_new_map_leaves_the_copies_equal() {
    // The held forward must outlast the snapshot command, and the primary must wait for it
    // (a forward that times out is a different path): 9 s, below the SDC's 10 s call timeout.
    let conf = TestDir::new("snap-refused-conf");
    let config = conf.path.join("sds.toml");
    std::fs::write(&config, "forward_timeout_ms = 9000\n").expect("write the SDS config");
    let dc = DataCluster::start_opts(
        "snap-refused",
        &DataOpts {
            n_sds: 2,
            vol_gb: 1,
            sds_bin: Some(failpoint_sds()),
            sds_extra: vec![
                "--config".into(),
                config.display().to_string(),
                "--failpoints-file".into(),
                "{dir}/{name}.failpoints".into(),
            ],
            ..DataOpts::default()
        },
    );
    let (old, new) = (vec![0xA1u8; 64 << 10], vec![0xB2u8; 64 << 10]);
    let resent = |i: usize| dc.sds_metric(i, "meshblock_sds_resent_forwards_total");
    // Each attempt writes its own chunk and takes its own snapshot; one whose command outlasted
    // the hold (a very busy machine) did not race the write, and the next holds it longer.
    let mut exercised = None;
    for attempt in 0..4u64 {
        let probe = (attempt * 4 + 1) << 20;
        let mut nbd = Nbd::connect(&dc.socket, "vol1").expect("connect");
        nbd.write_at(probe, &old).expect("write the old data");
        nbd.flush().expect("flush");
        let (i, ..) = dc.primary_of_chunk("vol1", probe >> 20);
        let (before, forwards) = (resent(i), dc.sds_metric(i, "meshblock_sds_forwards_total"));
        let hold = 4000 + 1500 * attempt;
        dc.set_failpoints(
            1 - i,
            &format!("sds::service::before_replica_apply=1*return({hold})"),
        );
        let writer = {
            let (socket, new) = (dc.socket.clone(), new.clone());
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut c = Nbd::connect(&socket, "vol1")?;
                c.write_at(probe, &new)?;
                c.flush()?;
                c.disconnect();
                Ok(())
            })
        };
        wait_for(
            "the write's forward to reach the secondary (and be held)",
            Duration::from_secs(60),
            || (dc.sds_metric(i, "meshblock_sds_forwards_total") > forwards).then_some(()),
        );
        let snap = format!("held{attempt}");
        dc.c.must_scli(&[
            "--snapshot_volume",
            "--volume_name",
            "vol1",
            "--snapshot_name",
            &snap,
        ]);
        writer
            .join()
            .expect("writer panicked")
            .expect("the held write is acknowledged after its retry");
        dc.set_failpoints(1 - i, "");
        let back = nbd
            .read_at(probe, new.len() as u32)
            .expect("read the volume");
        assert!(back == new, "the volume lost its acknowledged write");
        nbd.disconnect();
        if resent(i) > before {
            exercised = Some((probe, snap));
            break;
        }
        summary(&format!(
            "refused-forward attempt {attempt}: the snapshot outlasted a {hold} ms hold; trying again"
        ));
    }
    let (probe, snap) = exercised.expect("no attempt had the secondary refuse the held write");
    // The snapshot holds the old or the new data in each block, never a mix within one.
    export(&dc, &snap);
    let mut c = Nbd::connect(&dc.socket, &snap).expect("connect to the snapshot");
    let got = c
        .read_at(probe, new.len() as u32)
        .expect("read the snapshot");
    c.disconnect();
    for (b, block) in got.chunks(4096).enumerate() {
        assert!(
            block == &old[..4096] || block == &new[..4096],
            "snapshot block {b} is neither the old nor the new data"
        );
    }
    let (compared, diffs) = compare_copies(&dc.c, "vol1", (probe >> 20) + 1);
    summary(&format!(
        "refused forward resent: {compared} chunks compared over every layer, {} differ",
        diffs.len()
    ));
    assert!(compared > 0, "no chunk compared");
    assert!(diffs.is_empty(), "the copies differ: {diffs:?}");
}

#[test]
fn a_consistency_group_is_taken_at_one_instant_across_three_volumes() {
    let mut dc = DataCluster::start("snap-group", 3, 1);
    for v in ["vol2", "vol3"] {
        dc.c.must_scli(&[
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--volume_name",
            v,
            "--size_gb",
            "1",
        ]);
        export(&dc, v);
    }
    let loads: Vec<Load> = ["vol1", "vol2", "vol3"]
        .iter()
        .enumerate()
        .map(|(i, v)| Load::start(&dc, v, 20 + i as u64))
        .collect();
    for l in &loads {
        l.wait_more(300);
    }
    let refs: Vec<&Load> = loads.iter().collect();
    let views = snapshot(&mut dc, &refs, "vol1,vol2,vol3", "g1,g2,g3");
    for l in &loads {
        l.wait_more(300);
    }
    for (name, view) in ["g1", "g2", "g3"].iter().zip(&views) {
        check_snapshot(&dc, name, view);
    }
    // Again with an SDS killed as the group is taken.
    dc.sds[2].kill();
    let views = snapshot(&mut dc, &refs, "vol1,vol2,vol3", "k1,k2,k3");
    for l in &loads {
        l.wait_more(300);
    }
    for (name, view) in ["k1", "k2", "k3"].iter().zip(&views) {
        check_snapshot(&dc, name, view);
    }
    let tree =
        dc.c.must_scli(&["--query_vtree", "--volume_name", "vol2", "--json"])
            .json();
    let group = tree["members"]
        .as_array()
        .and_then(|m| m.iter().find_map(|x| x["consistency_group"].as_u64()))
        .expect("the snapshot's consistency group");
    for l in loads {
        let (model, uncertain) = l.finish();
        assert!(!model.is_empty() && uncertain.len() < (REGION / SLOT) as usize);
    }
    // The group goes at once; refused while one of its snapshots is mapped.
    let mapped = dc.c.scli_raw(&[
        "--remove_consistency_group_snapshots",
        "--i_am_sure",
        "--consistency_group_id",
        &group.to_string(),
    ]);
    assert!(!mapped.ok && mapped.stderr.contains("unmap"), "{mapped:?}");
    for g in ["g1", "g2", "g3", "k1", "k2", "k3"] {
        dc.c.must_scli(&[
            "--unmap_volume_from_sdc",
            "--volume_name",
            g,
            "--sdc_name",
            "sdc1",
        ]);
    }
    dc.c.must_scli(&[
        "--remove_consistency_group_snapshots",
        "--i_am_sure",
        "--consistency_group_id",
        &group.to_string(),
    ]);
    let all = dc.c.query_all();
    let names: Vec<&str> = all["state"]["volumes"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names.len(),
        6,
        "the three volumes and the second group are left: {names:?}"
    );
}

#[test]
fn bad_snapshot_requests_are_refused_and_change_nothing() {
    let dc = DataCluster::start("snap-bad", 2, 1);
    let before = dc.c.query_all()["state"]["volumes"].clone();
    let refused = |args: &[&str], says: &str| {
        let r = dc.c.scli_raw(args);
        assert!(!r.ok, "{args:?} was accepted: {}", r.stdout);
        assert!(
            r.stderr.contains(says),
            "{args:?}: expected '{says}' in: {}",
            r.stderr
        );
    };
    refused(
        &["--snapshot_volume", "--volume_name", "nope"],
        "Could not find the volume",
    );
    refused(
        &[
            "--snapshot_volume",
            "--volume_name",
            "vol1",
            "--snapshot_name",
            "vol1",
        ],
        "already exists",
    );
    refused(
        &["--snapshot_volume", "--volume_name", "vol1,vol1"],
        "named twice",
    );
    refused(
        &[
            "--snapshot_volume",
            "--volume_name",
            "vol1",
            "--snapshot_name",
            "a,b",
        ],
        "one name per --volume_name",
    );
    dc.c.must_scli(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--volume_name",
        "thick1",
        "--size_gb",
        "1",
        "--thick_provisioned",
    ]);
    refused(&["--snapshot_volume", "--volume_name", "thick1"], "thick");
    refused(
        &[
            "--remove_volume",
            "--i_am_sure",
            "--volume_name",
            "vol1",
            "--remove_mode",
            "everything",
        ],
        "unknown remove mode",
    );
    refused(
        &[
            "--overwrite_volume_content",
            "--i_am_sure",
            "--source_volume_name",
            "thick1",
            "--destination_volume_name",
            "vol1",
        ],
        "not in the V-tree",
    );
    refused(
        &[
            "--remove_consistency_group_snapshots",
            "--i_am_sure",
            "--consistency_group_id",
            "424242",
        ],
        "No snapshots of consistency group",
    );
    dc.c.must_scli(&[
        "--snapshot_volume",
        "--volume_name",
        "vol1",
        "--snapshot_name",
        "s1",
    ]);
    refused(
        &[
            "--overwrite_volume_content",
            "--i_am_sure",
            "--source_volume_name",
            "s1",
            "--destination_volume_name",
            "vol1",
        ],
        "is mapped",
    );
    refused(
        &[
            "--remove_volume",
            "--i_am_sure",
            "--volume_name",
            "vol1",
            "--remove_mode",
            "whole_vtree",
        ],
        "unmap first",
    );
    let mut after = dc.c.query_all()["state"]["volumes"].clone();
    if let Some(m) = after.as_object_mut() {
        m.retain(|_, v| v["name"] != "s1" && v["name"] != "thick1");
    }
    let mut expected = before.clone();
    if let (Some(b), Some(a)) = (expected.as_object_mut(), after.as_object()) {
        // vol1 now writes to a new layer (the snapshot froze its old one): nothing else changed.
        for (k, v) in b.iter_mut() {
            if let Some(l) = a.get(k).and_then(|x| x.get("layer")) {
                v["layer"] = l.clone();
            }
        }
    }
    assert_eq!(after, expected, "a refused request changed the volumes");
    // Removing the volume alone leaves its snapshot readable.
    dc.c.must_scli(&[
        "--unmap_volume_from_sdc",
        "--volume_name",
        "vol1",
        "--all_sdcs",
    ]);
    dc.c.must_scli(&[
        "--remove_volume",
        "--i_am_sure",
        "--volume_name",
        "vol1",
        "--remove_mode",
        "only_me",
    ]);
    export(&dc, "s1");
    let r = Nbd::connect(&dc.socket, "s1").and_then(|mut c| c.read_at(0, 4096));
    assert!(r.is_ok(), "the snapshot outlives its volume: {r:?}");
}

/// `--query_vtree --json` of `volume`.
fn vtree(dc: &DataCluster, volume: &str) -> serde_json::Value {
    dc.c.must_scli(&["--query_vtree", "--volume_name", volume, "--json"])
        .json()
}

/// What `name` alone holds in `tree`, bytes.
fn alone(tree: &serde_json::Value, name: &str) -> u64 {
    tree["members"]
        .as_array()
        .and_then(|m| m.iter().find(|x| x["name"] == name))
        .and_then(|x| x["alone_bytes"].as_u64())
        .unwrap_or(u64::MAX)
}

#[test]
fn a_snapshot_costs_space_only_as_its_volume_is_written_after_it() {
    let dc = DataCluster::start("snap-space", 2, 1);
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    // Fill the whole volume.
    let mut c = Nbd::connect(&dc.socket, "vol1").expect("connect");
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
    for off in (0..GIB).step_by(MIB as usize) {
        c.write_at(off, &chunk).expect("fill");
    }
    c.flush().expect("flush");
    dc.c.must_scli(&[
        "--snapshot_volume",
        "--volume_name",
        "vol1",
        "--snapshot_name",
        "s1",
    ]);
    let t = wait_for(
        "the SDS to report the tree's chunks",
        Duration::from_secs(60),
        || {
            let t = vtree(&dc, "vol1");
            (t["stored_bytes"].as_u64() == Some(GIB)).then_some(t)
        },
    );
    assert_eq!((alone(&t, "vol1"), alone(&t, "s1")), (0, 0), "{t}");
    assert_eq!(t["shared_bytes"].as_u64(), Some(GIB));
    let snap_cost = t["stored_bytes"].as_u64().unwrap_or(0) - GIB;

    // Write a tenth of the volume (102 chunks, spread out).
    let tenth = 102u64;
    for i in 0..tenth {
        c.write_at(i * 10 * MIB, &vec![0xee; MIB as usize])
            .expect("write");
    }
    c.flush().expect("flush");
    c.disconnect();
    let t = wait_for(
        "the SDS to report the new chunks",
        Duration::from_secs(60),
        || {
            let t = vtree(&dc, "vol1");
            (alone(&t, "vol1") == tenth * MIB).then_some(t)
        },
    );
    let stored = t["stored_bytes"].as_u64().unwrap_or(0);
    summary(&format!(
        "snapshot space: a snapshot of a full 1 GiB volume cost {} MiB ({:.2}%); after writing {} MiB of the volume the tree stores {} MiB ({:.1}% more than the volume alone)",
        snap_cost / MIB,
        snap_cost as f64 * 100.0 / GIB as f64,
        tenth,
        stored / MIB,
        (stored - GIB) as f64 * 100.0 / GIB as f64
    ));
    assert_eq!(stored, GIB + tenth * MIB, "{t}");
    assert_eq!(alone(&t, "s1"), 0);

    // Removing the volume alone leaves the snapshot holding the frozen data; what the volume
    // wrote after the snapshot goes back through the collector.
    dc.c.must_scli(&[
        "--unmap_volume_from_sdc",
        "--volume_name",
        "vol1",
        "--all_sdcs",
    ]);
    dc.c.must_scli(&["--remove_volume", "--i_am_sure", "--volume_name", "vol1"]);
    let t = wait_for(
        "the collectors to free the removed volume's layer",
        Duration::from_secs(120),
        || {
            let t = vtree(&dc, "s1");
            (t["stored_bytes"].as_u64() == Some(GIB)).then_some(t)
        },
    );
    assert_eq!(alone(&t, "s1"), GIB, "{t}");
}

/// The policy `name`'s runs and the runs its snapshots in the map carry, from one map.
fn policy_state(dc: &DataCluster, name: &str) -> (u64, Vec<u64>) {
    let map = cluster_map(&dc.c);
    let runs = map.snapshot_policies.get(name).map_or(0, |p| p.runs);
    let mut held: Vec<u64> = map
        .volumes
        .values()
        .filter_map(|v| v.snapshot.as_ref()?.policy.clone())
        .filter(|(n, _)| n == name)
        .map(|(_, r)| r)
        .collect();
    held.sort_unstable();
    (runs, held)
}

/// The runs a policy keeping `retain` per level holds after runs `1..=runs`, counted
/// independently of the MDM: run r is at level k when every level below's product divides it.
fn expected_runs(runs: u64, retain: &[u64]) -> Vec<u64> {
    let mut keep = std::collections::BTreeSet::new();
    for (k, n) in retain.iter().enumerate() {
        let period: u64 = retain[..k].iter().product();
        keep.extend(
            (1..=runs)
                .rev()
                .filter(|r| r % period == 0)
                .take(*n as usize),
        );
    }
    keep.into_iter().collect()
}

#[test]
fn a_snapshot_policy_keeps_its_levels_and_carries_on_after_a_leader_failover() {
    let mut dc = DataCluster::start_full("snap-policy", 3, 2, 1, &[]);
    let refused = |args: &[&str], says: &str| {
        let r = dc.c.scli_raw(args);
        assert!(
            !r.ok && r.stderr.contains(says),
            "{args:?}: {}{}",
            r.stdout,
            r.stderr
        );
    };
    let add = [
        "--add_snapshot_policy",
        "--snapshot_policy_name",
        "p1",
        "--auto_snapshot_creation_cadence_in_sec",
        "2",
        "--num_of_retained_snapshots_per_level",
    ];
    refused(&[&add[..], &["0"]].concat(), "at least one snapshot");
    refused(&[&add[..], &["30,31"]].concat(), "at most 60");
    refused(
        &[
            "--add_snapshot_policy",
            "--snapshot_policy_name",
            "p0",
            "--auto_snapshot_creation_cadence_in_sec",
            "0",
            "--num_of_retained_snapshots_per_level",
            "2",
        ],
        "at least one second",
    );
    dc.c.must_scli(&[&add[..], &["2,2"]].concat());
    dc.c.must_scli(&[
        "--add_source_volume_to_snapshot_policy",
        "--snapshot_policy_name",
        "p1",
        "--volume_name",
        "vol1",
    ]);
    refused(
        &["--remove_snapshot_policy", "--snapshot_policy_name", "p1"],
        "still has source volumes",
    );
    let retain = [2u64, 2];
    let (runs, held) = wait_for("five policy runs", Duration::from_secs(300), || {
        let (runs, held) = policy_state(&dc, "p1");
        (runs >= 5).then_some((runs, held))
    });
    assert_eq!(held, expected_runs(runs, &retain), "after {runs} runs");

    // The leader dies; the next one carries on from the map.
    let old = dc.c.wait_leader(Duration::from_secs(60));
    dc.c.mdms[old].proc.kill();
    let (runs2, held2) = wait_for(
        "policy runs under the new leader",
        Duration::from_secs(300),
        || {
            let (r, h) = policy_state(&dc, "p1");
            (r >= runs + 3).then_some((r, h))
        },
    );
    assert_eq!(held2, expected_runs(runs2, &retain), "after {runs2} runs");
    summary(&format!(
        "snapshot policy every 2 s keeping 2,2: {runs} runs before the leader died, {runs2} after; held runs {held2:?}"
    ));
    let text =
        dc.c.must_scli(&["--query_snapshot_policy", "--snapshot_policy_name", "p1"])
            .stdout;
    assert!(text.contains("Active") && text.contains("vol1"), "{text}");

    // Paused, removed from the policy, the policy removed: its snapshots stay.
    dc.c.must_scli(&["--pause_snapshot_policy", "--snapshot_policy_name", "p1"]);
    dc.c.must_scli(&[
        "--remove_source_volume_from_snapshot_policy",
        "--snapshot_policy_name",
        "p1",
        "--volume_name",
        "vol1",
    ]);
    let (_, held3) = policy_state(&dc, "p1");
    dc.c.must_scli(&["--remove_snapshot_policy", "--snapshot_policy_name", "p1"]);
    let map = cluster_map(&dc.c);
    assert!(map.snapshot_policies.is_empty());
    let left = map
        .volumes
        .values()
        .filter(|v| v.snapshot.as_ref().is_some_and(|x| x.policy.is_some()))
        .count();
    assert_eq!(left, held3.len(), "the policy's snapshots stay");
}

/// A seeded mix of writes (partial blocks among them), trims and write-zeroes on the members
/// of one V-tree, snapshots of volumes and of snapshots, and restores: every member then reads
/// exactly its model, through chains of up to a dozen layers.
#[test]
fn snapshots_of_snapshots_read_their_own_history_through_every_layer() {
    use rand::{Rng, SeedableRng};
    const SPAN: usize = 3 << 20;
    let dc = DataCluster::start("snap-chain", 2, 1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut models: Vec<(String, Vec<u8>)> = vec![("vol1".into(), vec![0u8; SPAN])];
    let mut conns = vec![Nbd::connect(&dc.socket, "vol1").expect("connect vol1")];
    let (mut snaps, mut restores) = (0, 0);
    for step in 0..120 {
        let m = rng.gen_range(0..models.len());
        match rng.gen_range(0..10) {
            0..=4 => {
                let len = rng.gen_range(1..=200 << 10);
                let off = rng.gen_range(0..SPAN - len);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                conns[m].write_at(off as u64, &data).expect("write");
                models[m].1[off..off + len].copy_from_slice(&data);
            }
            5 | 6 => {
                let len = rng.gen_range(1..=300 << 10);
                let off = rng.gen_range(0..SPAN - len);
                conns[m]
                    .zero_at(off as u64, len as u32, rng.gen())
                    .expect("trim");
                models[m].1[off..off + len].fill(0);
            }
            7 | 8 if models.len() < 8 => {
                let name = format!("c{step}");
                conns[m].flush().expect("flush");
                dc.c.must_scli(&[
                    "--snapshot_volume",
                    "--volume_name",
                    &models[m].0,
                    "--snapshot_name",
                    &name,
                ]);
                export(&dc, &name);
                conns.push(Nbd::connect(&dc.socket, &name).expect("connect snapshot"));
                let copy = models[m].1.clone();
                models.push((name, copy));
                snaps += 1;
            }
            _ => {
                let src = rng.gen_range(0..models.len());
                if src == m {
                    continue;
                }
                dc.c.must_scli(&[
                    "--overwrite_volume_content",
                    "--i_am_sure",
                    "--source_volume_name",
                    &models[src].0,
                    "--destination_volume_name",
                    &models[m].0,
                    "--allow_overwrite_mapped",
                ]);
                models[m].1 = models[src].1.clone();
                restores += 1;
            }
        }
    }
    for c in &mut conns {
        c.flush().expect("flush");
    }
    let map = cluster_map(&dc.c);
    let deepest = models
        .iter()
        .filter_map(|(n, _)| map.volume_by_name(n))
        .map(|v| map.chain(v.vtree, v.layer).len())
        .max()
        .unwrap_or(0);
    for (name, model) in &models {
        let (checked, wrong, first) = differences(&dc, name, model, &HashSet::new());
        assert_eq!(
            wrong, 0,
            "{name}: {wrong} of {checked} blocks differ (first at {first:?})"
        );
    }
    summary(&format!(
        "V-tree of {} members after {snaps} snapshots and {restores} restores: every member reads its model; longest chain {deepest} layers",
        models.len()
    ));
    assert!(
        snaps >= 3 && deepest >= 4,
        "too shallow a tree: {snaps} snapshots, {deepest} layers"
    );
}
