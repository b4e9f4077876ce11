//! What operators alert on, from the real daemons: every daemon's `/metrics` passes
//! `promtool check metrics` and answers only its exact path; the SDC counts each volume's
//! requests, bytes and latency; the SDS each device's; the MDM leader's gauges follow the cluster
//! through an SDS failure and its rebuild (SDS by state, PGs by state, rebuild bytes left).
//! `docs/monitoring/`'s alert rules pass `promtool check rules` and their unit tests, and every
//! metric its rules and Grafana dashboard name is one the daemons export.

use meshblock_tests::nbd::Nbd;
use meshblock_tests::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `promtool check metrics` on `body` (a daemon's exposition): its lint findings fail the test.
fn promtool_check(what: &str, body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (./test installs Debian's prometheus package)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics on {what} ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the series `name` whose labels include every `(key, value)` of `labels`.
fn value(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        if n != name {
            return None;
        }
        let have: Vec<(&str, &str)> = rest
            .trim_end_matches('}')
            .split("\",")
            .filter_map(|kv| kv.split_once("=\""))
            .map(|(k, v)| (k, v.trim_end_matches('"')))
            .collect();
        labels
            .iter()
            .all(|want| have.contains(want))
            .then(|| v.parse().ok())
            .flatten()
    })
}

/// The status line of `GET path` (e.g. "HTTP/1.1 404 Not Found").
fn status_of(addr: SocketAddr, path: &str) -> String {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

fn metrics(addr: SocketAddr) -> String {
    http_get(addr, "/metrics").unwrap_or_default()
}

fn monitoring_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring")
}

/// Run promtool with `args` in docs/monitoring; its failure fails the test.
fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring_dir())
        .output()
        .expect("run promtool (./test installs Debian's prometheus package)");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The metric family names declared (`# TYPE`) in an exposition.
fn families(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

/// Every `meshblock_*` name in `text` (a rules file, a dashboard) must be an exported family
/// (a histogram's `_bucket`, `_sum` and `_count` series count as theirs).
fn names_exist(what: &str, text: &str, exported: &BTreeSet<String>) {
    let mut missing = Vec::new();
    for (i, _) in text.match_indices("meshblock_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        if !exported.contains(&name) && !exported.contains(base) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "{what} names metrics no daemon exports: {missing:?}"
    );
}

/// For each SDS not down: the PGs whose every complete, reachable copy (primary and in-sync
/// secondary) is on it.
fn unavailable_if_lost(
    map: &proto::model::ClusterState,
) -> std::collections::BTreeMap<String, u64> {
    use proto::model::SdsState;
    let up = |id: &proto::SdsId| map.sds.get(id).is_some_and(|x| x.state != SdsState::Down);
    let mut out = std::collections::BTreeMap::new();
    for x in map.sds.values().filter(|x| x.state != SdsState::Down) {
        let n = map
            .pools
            .values()
            .flat_map(|p| p.pgs.iter())
            .filter(|m| {
                let copies: Vec<_> = [m.primary, m.in_sync_secondary()]
                    .into_iter()
                    .flatten()
                    .filter(up)
                    .collect();
                !copies.is_empty() && copies.iter().all(|c| *c == x.id)
            })
            .count() as u64;
        out.insert(x.name.clone(), n);
    }
    out
}

#[test]
fn every_daemon_exports_what_operators_alert_on_and_promtool_accepts_it() {
    let mut dc = DataCluster::start("monitoring", 3, 1);
    let sdc = sdc_metrics(&mut dc);
    let mdm = dc.c.mdms[0].metrics;

    // Some I/O on vol1: 1 MiB written, flushed, read back.
    let mut nbd = Nbd::connect(&dc.socket, "vol1").expect("connect");
    let data = vec![0x5Au8; 1 << 20];
    nbd.write_at(0, &data).expect("write");
    nbd.flush().expect("flush");
    assert_eq!(nbd.read_at(0, 1 << 20).expect("read"), data);
    nbd.disconnect();

    let vol = |op: &'static str| [("volume", "vol1"), ("op", op)];
    let body = metrics(sdc);
    let mut exported = families(&body);
    for op in ["read", "write", "flush"] {
        let n = value(&body, "meshblock_sdc_volume_requests_total", &vol(op)).unwrap_or(0.0);
        assert!(n >= 1.0, "no {op} counted for vol1 by the SDC:\n{body}");
        let c = value(
            &body,
            "meshblock_sdc_volume_request_seconds_count",
            &vol(op),
        )
        .unwrap_or(0.0);
        assert!(c >= 1.0, "no {op} latency observed for vol1:\n{body}");
    }
    let written = value(&body, "meshblock_sdc_volume_bytes_total", &vol("write")).unwrap_or(0.0);
    assert!(
        written >= (1 << 20) as f64,
        "vol1's written bytes: {written}"
    );
    promtool_check("the SDC", &body);

    // Each SDS counts its devices' requests; the writes landed on two copies.
    let mut device_writes = 0.0;
    for (i, addr) in dc.sds_metrics.iter().enumerate() {
        let body = metrics(*addr);
        promtool_check(&format!("SDS {i}"), &body);
        exported.extend(families(&body));
        device_writes += body
            .lines()
            .filter(|l| {
                l.starts_with("meshblock_sds_device_bytes_total{") && l.contains("op=\"write\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        // Its journal's fill: the ring's size, and what unapplied records take of it.
        let size = value(&body, "meshblock_sds_device_journal_size_bytes", &[]).unwrap_or(0.0);
        let used = value(&body, "meshblock_sds_device_journal_used_bytes", &[]).unwrap_or(-1.0);
        assert!(
            size >= (1 << 20) as f64 && (0.0..=size).contains(&used),
            "SDS {i}: journal {used} of {size} bytes"
        );
    }
    assert!(
        device_writes >= (2 << 20) as f64,
        "the devices wrote {device_writes} bytes for 1 MiB written with two copies"
    );

    // The leader's view of the cluster (set every 500 ms).
    let healthy = wait_for(
        "the leader's cluster gauges",
        Duration::from_secs(60),
        || {
            let b = metrics(mdm);
            let ok = value(&b, "meshblock_mdm_sds", &[("state", "Normal")]) == Some(3.0)
                && value(
                    &b,
                    "meshblock_mdm_pool_pgs",
                    &[("pool", "sp1"), ("state", "Normal")],
                ) == Some(64.0)
                && value(&b, "meshblock_mdm_sdc", &[("state", "Connected")]) == Some(1.0)
                && value(&b, "meshblock_mdm_volumes", &[("kind", "volume")]) == Some(1.0)
                && value(&b, "meshblock_mdm_cluster_mdms_active", &[]) == Some(1.0)
                && value(&b, "meshblock_mdm_cluster_mode", &[("mode", "1_node")]) == Some(1.0);
            ok.then_some(b)
        },
    );
    promtool_check("the MDM leader", &healthy);
    exported.extend(families(&healthy));

    // The documented rules and dashboard: valid, unit-tested, and naming only real metrics.
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts.test.yml"]);
    promtool(&["check", "config", "prometheus.yml"]);
    for file in ["alerts.yml", "alerts.test.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(monitoring_dir().join(file)).expect("read");
        names_exist(file, &text, &exported);
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring_dir().join("grafana-dashboard.json")).expect("read"),
    )
    .expect("the dashboard is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| p.len() >= 10),
        "the dashboard has its panels"
    );

    // Every daemon answers only its exact path.
    for (what, addr) in [("MDM", mdm), ("SDS", dc.sds_metrics[0]), ("SDC", sdc)] {
        assert!(
            status_of(addr, "/metrics").starts_with("HTTP/1.1 200"),
            "{what}"
        );
        for path in ["/metricsX", "/", "/metrics/extra"] {
            let st = status_of(addr, path);
            assert!(st.starts_with("HTTP/1.1 404"), "{what} {path}: {st}");
        }
    }

    // An SDS dies: the leader counts it down and its PGs rebuilding (throttled to 1 MiB/s over
    // 64 MiB, so the state lasts), then, with the throttle lifted, rebuilt.
    let mut nbd = Nbd::connect(&dc.socket, "vol1").expect("connect");
    let fill = vec![0xC3u8; 1 << 20];
    for mib in 0..64u64 {
        nbd.write_at(mib << 20, &fill).expect("write");
    }
    nbd.flush().expect("flush");
    nbd.disconnect();
    dc.set_rebuild_policy(&["--concurrency", "1", "--bandwidth_mib_s", "1"]);
    dc.sds[2].kill();
    let degraded = wait_for(
        "the leader to count the SDS down and PGs rebuilding",
        Duration::from_secs(300),
        || {
            let b = metrics(mdm);
            let down = value(&b, "meshblock_mdm_sds", &[("state", "Down")]) == Some(1.0);
            let normal = value(
                &b,
                "meshblock_mdm_pool_pgs",
                &[("pool", "sp1"), ("state", "Normal")],
            )
            .unwrap_or(64.0);
            let left = value(
                &b,
                "meshblock_mdm_pool_rebuild_bytes_left",
                &[("pool", "sp1")],
            )
            .unwrap_or(0.0);
            (down && normal < 64.0 && left > 0.0).then_some(b)
        },
    );
    promtool_check("the MDM leader with an SDS down", &degraded);

    // Mid-rebuild, the resilience view names the single losses that would leave PGs without a
    // reachable copy, with the numbers a count from the map gives (asked under a map that did
    // not change meanwhile).
    let (answer, expected) = wait_for(
        "a resilience answer under a stable map",
        Duration::from_secs(120),
        || {
            let before = cluster_map(&dc.c);
            let out = dc.c.scli_raw(&["--query_resilience", "--json"]);
            let after = cluster_map(&dc.c);
            if !out.ok || before.version != after.version {
                return None;
            }
            let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
            Some((v, unavailable_if_lost(&after)))
        },
    );
    assert!(
        expected.values().any(|n| *n > 0),
        "mid-rebuild, some single loss should leave PGs without a copy: {expected:?}"
    );
    for (name, n) in &expected {
        let loss = answer["losses"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["kind"] == "sds" && l["name"] == *name))
            .unwrap_or_else(|| panic!("no loss of SDS {name} in {answer:#}"));
        assert_eq!(loss["pgs_unavailable"].as_u64(), Some(*n), "{name}: {loss}");
        let named = answer["cannot_survive"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| *x == format!("sds {name}")));
        assert_eq!(named, *n > 0, "{name} in cannot_survive: {answer:#}");
    }
    summary(&format!(
        "resilience mid-rebuild: {} PGs on one copy; losses that would leave PGs without a copy: {}",
        answer["pgs_single_copy_now"], answer["cannot_survive"]
    ));
    let text = dc.c.must_scli(&["--query_resilience"]).stdout;
    assert!(text.contains("Cannot survive now"), "{text}");

    // `--query_storage_pool --watch` redraws the pool (plain, dated blocks: no terminal).
    let mut watch = Spawned(
        dc.c.scli_command(&[
            "--query_storage_pool",
            "--storage_pool_name",
            "sp1",
            "--watch",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run scli"),
    );
    let stdout = watch.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    wait_for(
        "two redraws of the watched pool",
        Duration::from_secs(120),
        || {
            seen.extend(rx.try_iter());
            (seen.iter().filter(|l| l.starts_with("--- ")).count() >= 2).then_some(())
        },
    );
    assert!(seen.iter().any(|l| l.contains("sp1")), "{seen:#?}");
    drop(watch);
    for (args, why) in [
        (
            vec!["--query_all_sds", "--watch"],
            "cannot be used with '--watch'",
        ),
        (
            vec![
                "--add_protection_domain",
                "--protection_domain_name",
                "pdx",
                "--wait",
            ],
            "cannot be used with '--wait'",
        ),
    ] {
        // clap refuses them (exit code 2) before anything is sent.
        let out = dc.c.scli_raw(&args);
        assert!(
            out.code == 2 && out.stderr.contains(why),
            "{args:?}: {}",
            out.stderr
        );
    }
    let pgs = |state: &str| {
        value(&degraded, "meshblock_mdm_pool_pgs", &[("state", state)]).unwrap_or(-1.0)
    };
    summary(&format!(
        "metrics with an SDS down: {} PGs Normal, {} Rebuilding, {} Degraded; {} bytes left to copy at {} bytes/s",
        pgs("Normal"),
        pgs("Rebuilding"),
        pgs("Degraded"),
        value(&degraded, "meshblock_mdm_pool_rebuild_bytes_left", &[]).unwrap_or(-1.0),
        value(&degraded, "meshblock_mdm_pool_rebuild_bytes_per_second", &[]).unwrap_or(-1.0),
    ));
    dc.set_rebuild_policy(&["--concurrency", "4", "--bandwidth_mib_s", "0"]);
    wait_for(
        "the rebuild to end in the metrics",
        Duration::from_secs(600),
        || {
            let b = metrics(mdm);
            let normal = value(
                &b,
                "meshblock_mdm_pool_pgs",
                &[("pool", "sp1"), ("state", "Normal")],
            );
            let left = value(
                &b,
                "meshblock_mdm_pool_rebuild_bytes_left",
                &[("pool", "sp1")],
            );
            (normal == Some(64.0) && left == Some(0.0)).then_some(())
        },
    );

    // The survivors copied to each other: what one sent, the other received.
    let (mut out, mut received) = (0.0, 0.0);
    for i in 0..2 {
        out += dc.sds_metric(i, "meshblock_sds_rebuild_bytes_total");
        received += dc.sds_metric(i, "meshblock_sds_rebuild_bytes_in_total");
    }
    assert!(
        out > 0.0 && received >= out,
        "rebuild bytes out {out}, in {received}"
    );

    // The events: the failure, and the rebuild with how long it took.
    let events = wait_for(
        "the rebuild's end in the events",
        Duration::from_secs(60),
        || {
            let out =
                dc.c.scli_raw(&["--query_events", "--since", "1h", "--json"]);
            let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).ok()?;
            list.iter()
                .any(|e| e["kind"] == "rebuild_finished")
                .then_some(list)
        },
    );
    let find = |kind: &str| {
        events
            .iter()
            .find(|e| e["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} event in {events:#?}"))
    };
    let down = find("sds_down");
    assert!(down["message"]
        .as_str()
        .is_some_and(|m| m.contains(&dc.sds[2].name)));
    assert_eq!(down["severity"], "Warning");
    let started = find("rebuild_started");
    let finished = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "rebuild_finished")
        .expect("finished");
    assert!(
        finished["message"]
            .as_str()
            .is_some_and(|m| m.contains(" s;")),
        "the rebuild's duration: {finished}"
    );
    assert!(started["unix"].as_u64() <= finished["unix"].as_u64());
    assert!(started["seq"].as_u64() < finished["seq"].as_u64());
    find("leader");
    assert_eq!(find("login")["actor"], "admin");
    let policy = events
        .iter()
        .find(|e| {
            e["kind"] == "command" && e["message"].as_str().is_some_and(|m| m.contains("rebuild"))
        })
        .unwrap_or_else(|| panic!("no command event for the rebuild policy in {events:#?}"));
    assert_eq!(policy["actor"], "admin");
    summary(&format!(
        "events: {} recorded; {}; {}",
        events.len(),
        down["message"].as_str().unwrap_or_default(),
        finished["message"].as_str().unwrap_or_default()
    ));
    let text = dc.c.must_scli(&["--query_events"]).stdout;
    assert!(text.contains("rebuild_finished"), "{text}");
    // Nothing from the future; a bad --since, or --since elsewhere, is refused.
    let later =
        dc.c.scli_raw(&["--query_events", "--since", "2999-01-01T00:00:00Z"]);
    assert!(
        later.ok && later.stdout.contains("No events"),
        "{}",
        later.stdout
    );
    for bad in [
        vec!["--query_events", "--since", "yesterday"],
        vec!["--query_all_sds", "--since", "1h"],
    ] {
        let out = dc.c.scli_raw(&bad);
        assert!(
            !out.ok && out.stderr.contains("--since"),
            "{bad:?}: {}",
            out.stderr
        );
    }
}
