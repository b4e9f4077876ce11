//! QoS per mapping, enforced by the SDC: `scli --set_sdc_volume_limits` reaches running I/O,
//! fio at QD32 (its nbd engine, a client nobody here wrote) reads about the limit, a raised
//! limit shows within about a second, and the SDC's metrics show the limits and the time
//! requests waited. Bounds are loose (no timed pass/fail on a busy machine beyond "near the
//! limit, never far above it"); `benches/qos.sh` reports the figures.

use meshblock_tests::nbd::check_model;
use meshblock_tests::*;
use std::time::{Duration, Instant};

/// The value of `name{volume="vol1"}` in the SDC's metrics.
fn vol1_metric(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    volume_metric(addr, name, "vol1")
}

fn set_limits(d: &DataCluster, iops: u64, kbps: u64) {
    d.c.must_scli(&[
        "--set_sdc_volume_limits",
        "--volume_name",
        "vol1",
        "--sdc_name",
        "sdc1",
        "--limit_iops",
        &iops.to_string(),
        "--limit_bandwidth_kbps",
        &kbps.to_string(),
    ]);
}

/// Waits until the SDC applies the limits (its metrics show them).
fn wait_applied(addr: std::net::SocketAddr, iops: u64, bytes: u64) {
    wait_for(
        "the SDC to apply the limits",
        Duration::from_secs(10),
        || {
            (vol1_metric(addr, "meshblock_sdc_volume_iops_limit") == Some(iops as f64)
                && vol1_metric(
                    addr,
                    "meshblock_sdc_volume_bandwidth_limit_bytes_per_second",
                ) == Some(bytes as f64))
            .then_some(())
        },
    );
}

/// fio's nbd engine, random reads at QD32 for `secs`: (IOPS, bytes per second).
fn fio(uri: &str, bs: &str, secs: u32) -> (f64, f64) {
    let o = std::process::Command::new("fio")
        .args([
            "--name=qos",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            &format!("--bs={bs}"),
            "--iodepth=32",
            "--size=1g",
            "--time_based=1",
            &format!("--runtime={secs}"),
            "--output-format=json",
        ])
        .output()
        .expect("run fio");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "fio: {text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // fio may print notes before its JSON.
    let json = text.get(text.find('{').unwrap_or(0)..).unwrap_or_default();
    let j: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio json: {e}: {text}"));
    let r = &j["jobs"][0]["read"];
    (
        r["iops"].as_f64().expect("iops"),
        r["bw_bytes"].as_f64().expect("bw_bytes"),
    )
}

#[test]
fn volume_limits_are_enforced_and_changes_reach_running_io() {
    require("fio").expect("fio");
    let mut d = DataCluster::start("qos", 3, 2);
    let uri = d.uri("vol1");
    let metrics = sdc_metrics(&mut d);

    // Below the minimum: refused, nothing changes.
    for (flag, v, needle) in [
        ("--limit_iops", "5", "at least 11"),
        ("--limit_bandwidth_kbps", "100", "at least 1024"),
    ] {
        let r = d.c.scli_raw(&[
            "--set_sdc_volume_limits",
            "--volume_name",
            "vol1",
            "--sdc_name",
            "sdc1",
            flag,
            v,
        ]);
        assert!(!r.ok, "{flag} {v} accepted");
        assert!(r.stderr.contains(needle), "{flag} {v}: {}", r.stderr);
    }
    let q =
        d.c.must_scli(&["--query_volume", "--volume_name", "vol1"])
            .stdout;
    assert!(q.contains("IOPS limit: unlimited"), "{q}");

    // 500 IOPS.
    set_limits(&d, 500, 0);
    wait_applied(metrics, 500, 0);
    let q =
        d.c.must_scli(&["--query_volume", "--volume_name", "vol1"])
            .stdout;
    assert!(q.contains("IOPS limit: 500"), "{q}");
    let (iops, _) = fio(&uri, "4k", 5);
    println!("limit 500 IOPS: fio read {iops:.0} IOPS at QD32");
    assert!(
        iops <= 500.0 * 1.15,
        "{iops:.0} IOPS above a 500 IOPS limit"
    );
    assert!(
        iops >= 500.0 * 0.5,
        "{iops:.0} IOPS far below a 500 IOPS limit"
    );
    let throttled = vol1_metric(metrics, "meshblock_sdc_volume_throttled_seconds_total")
        .expect("throttled time");
    assert!(throttled > 0.0, "no throttled time counted");
    // scli --query_volume shows it too (the SDC reports it with its map polls).
    wait_for(
        "scli --query_volume to show the throttled time",
        Duration::from_secs(30),
        || {
            let v =
                d.c.must_scli(&["--query_volume", "--volume_name", "vol1", "--json"])
                    .json();
            (v["mapped_sdcs"][0]["throttled_ms"].as_u64().unwrap_or(0) > 0).then_some(())
        },
    );
    let text =
        d.c.must_scli(&["--query_volume", "--volume_name", "vol1"])
            .stdout;
    assert!(text.contains("throttled: "), "{text}");

    // 20 MiB/s, no IOPS limit.
    set_limits(&d, 0, 20 * 1024);
    wait_applied(metrics, 0, 20 << 20);
    let (_, bw) = fio(&uri, "128k", 5);
    let mib = bw / f64::from(1 << 20);
    println!("limit 20 MiB/s: fio read {mib:.1} MiB/s at QD32 in 128 KiB reads");
    assert!(mib <= 20.0 * 1.15, "{mib:.1} MiB/s above a 20 MiB/s limit");
    assert!(
        mib >= 20.0 * 0.5,
        "{mib:.1} MiB/s far below a 20 MiB/s limit"
    );

    // Raised while fio runs: the next seconds show it.
    set_limits(&d, 200, 0);
    wait_applied(metrics, 200, 0);
    let dir = d.c.dir.join("fio-log");
    std::fs::create_dir_all(&dir).expect("log dir");
    let prefix = dir.join("qos").display().to_string();
    let mut child = std::process::Command::new("fio")
        .args([
            "--name=qos",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randread",
            "--bs=4k",
            "--iodepth=32",
            "--size=1g",
            "--time_based=1",
            "--runtime=8",
            &format!("--write_iops_log={prefix}"),
            "--log_avg_msec=1000",
            "--output-format=terse",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run fio");
    let t0 = Instant::now();
    // Raise once fio has run about two seconds at the old limit: its 32 requests then wait
    // about 32 s per second between them (the SDC's own count of throttled time).
    let throttled = |addr| vol1_metric(addr, "meshblock_sdc_volume_throttled_seconds_total");
    let base = throttled(metrics).unwrap_or(0.0);
    wait_for(
        "fio to run at the old limit",
        Duration::from_secs(30),
        || (throttled(metrics).unwrap_or(0.0) >= base + 64.0).then_some(()),
    );
    let raised_at = t0.elapsed();
    set_limits(&d, 2000, 0);
    let status = child.wait().expect("fio");
    assert!(status.success(), "fio failed");
    let log = std::fs::read_dir(&dir)
        .expect("fio log dir")
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().contains("iops"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .expect("fio's IOPS log");
    // Lines: time (ms), IOPS in that second, ...
    let per_second: Vec<(u64, f64)> = log
        .lines()
        .filter_map(|l| {
            let mut f = l.split(',').map(str::trim);
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    println!(
        "limit 200 raised to 2000 IOPS at {:.1}s: fio's IOPS per second {per_second:?}",
        raised_at.as_secs_f64()
    );
    let before: Vec<f64> = per_second
        .iter()
        .filter(|(t, _)| *t >= 1000 && (*t as u128) < raised_at.as_millis())
        .map(|(_, v)| *v)
        .collect();
    assert!(
        before.iter().all(|v| *v <= 200.0 * 1.3),
        "above 200 IOPS before the change: {before:?}"
    );
    // Within about a second (a map poll and the throttle's recheck), well above the old limit.
    let after_change = (raised_at + Duration::from_millis(2000)).as_millis() as u64;
    let late: Vec<f64> = per_second
        .iter()
        .filter(|(t, _)| *t > after_change)
        .map(|(_, v)| *v)
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|v| *v > 200.0 * 1.5),
        "the raised limit did not show: {per_second:?}"
    );

    // 0 means no limit.
    set_limits(&d, 0, 0);
    wait_applied(metrics, 0, 0);
    let (iops, _) = fio(&uri, "4k", 3);
    println!("no limit: fio read {iops:.0} IOPS at QD32");
}

/// QoS on the write path: with the volume's mapping limited (IOPS and bandwidth), requests
/// wait in the SDC before they are sent; an SDS SIGKILLed under that load loses no
/// acknowledged write, and the limit holds the writer near it throughout.
#[test]
fn kill_an_sds_under_qos_limits() {
    let mut dc = DataCluster::start("faults_qos", 3, 4);
    dc.c.must_scli(&[
        "--set_sdc_volume_limits",
        "--volume_name",
        "vol1",
        "--sdc_name",
        "sdc1",
        "--limit_iops",
        "1500",
        "--limit_bandwidth_kbps",
        "32768",
    ]);
    // The writer starts once the SDC applies the limits.
    wait_applied(sdc_metrics(&mut dc), 1500, 32 << 20);
    let started = std::time::Instant::now();
    let w = Writer::start(&dc, 128 << 20, 11);
    w.wait_more(1500, "writes before the kill");
    dc.sds[1].kill();
    wait_sds_state(&dc, "sds2", "Down");
    w.wait_more(1000, "writes after the SDS was declared down");
    dc.sds[1].start();
    wait_sds_state(&dc, "sds2", "Normal");
    w.wait_more(500, "writes after the SDS returned");
    let (report, model, uncertain) = w.finish();
    let rate = report.acked as f64 / started.elapsed().as_secs_f64();
    assert_eq!(report.failed, 0, "writes failed: {report:?}");
    assert!(
        rate < 1500.0 * 1.2,
        "{rate:.0} writes/s above a 1500 IOPS limit"
    );
    let (checked, wrong, first) =
        check_model(&dc.socket, "vol1", &model, &uncertain).expect("read back");
    assert_eq!(
        wrong, 0,
        "{wrong} of {checked} acknowledged 4 KiB blocks read back wrong (first at byte {first:?})"
    );
    summary(&format!(
        "fault scenario QoS (SIGKILL an SDS at QD32 under 1500 IOPS / 32 MiB/s limits): acknowledged writes {}, {rate:.0} writes/s, blocks checked {checked}, lost 0",
        report.acked
    ));
}
