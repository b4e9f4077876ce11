//! Capacity with real processes and a real NBD client (qemu-io) on small devices: a thick
//! volume that cannot be honoured is refused and changes nothing; an accepted one is written in
//! full while thin data fills the pool (whose writes get ENOSPC, promptly); the pool's warning
//! state shows in scli and in the MDM's metrics before and when it is full.

use meshblock_tests::*;
use std::time::Duration;

/// Run `qemu-io` on `uri` with `cmds`, bounded in time: a full pool must answer ENOSPC, not
/// hang. Returns stdout and stderr together.
fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut args: Vec<&str> = vec!["120", "qemu-io", "-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    let o = run("timeout", &args).unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(o.status.code(), Some(124), "qemu-io hung on a full pool");
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn pool(c: &Cluster) -> serde_json::Value {
    c.must_scli(&[
        "--query_storage_pool",
        "--storage_pool_name",
        "sp1",
        "--json",
    ])
    .json()
}

fn volume_names(c: &Cluster) -> Vec<String> {
    cluster_map(c)
        .volumes
        .values()
        .map(|v| v.name.clone())
        .collect()
}

/// The value of `name{pool="sp1"}` on the MDM's metrics endpoint.
fn mdm_pool_metric(c: &Cluster, name: &str) -> Option<f64> {
    let body = http_get(c.mdms[0].metrics, "/metrics").ok()?;
    let key = format!("{name}{{pool=\"sp1\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// Issue 18 item 5: thick volumes are really reserved, and a filling pool is visible.
#[test]
fn thick_reservations_hold_while_thin_data_fills_the_pool() {
    require("qemu-io").expect("qemu-io");
    let d = DataCluster::start_opts(
        "capacity",
        &DataOpts {
            n_sds: 3,
            vol_gb: 1,
            dev_bytes: 96 << 20,
            ..DataOpts::default()
        },
    );
    let c = &d.c;
    let raw = wait_for(
        "the pool's capacity reported",
        Duration::from_secs(20),
        || {
            let p = pool(c);
            let cap = &p["capacity"];
            (cap["sds_unreported"] == 0 && cap["raw_bytes"].as_u64()? > 0)
                .then(|| cap["raw_bytes"].as_u64())
                .flatten()
        },
    );
    assert_eq!(pool(c)["capacity"]["state"], "Normal");

    // Two copies of a volume as large as the raw capacity cannot fit: refused, nothing changed.
    let before = volume_names(c);
    let gb = |bytes: u64| format!("{}", bytes as f64 / (1u64 << 30) as f64);
    let r = c.scli_raw(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--size_gb",
        &gb(raw),
        "--volume_name",
        "toobig",
        "--thick_provisioned",
    ]);
    assert!(!r.ok, "a thick volume larger than the pool was accepted");
    for needle in [
        "Not enough capacity",
        "needs",
        "is free",
        "Nothing was changed",
    ] {
        assert!(r.stderr.contains(needle), "{needle}: {}", r.stderr);
    }
    assert_eq!(volume_names(c), before);
    assert_eq!(pool(c)["capacity"]["thick_reserved_bytes"], 0);

    // A 32 MiB thick volume fits: every SDS pre-allocates its share (64 chunks in all).
    c.must_scli(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--size_gb",
        "0.03125",
        "--volume_name",
        "thick1",
        "--thick_provisioned",
    ]);
    wait_for(
        "the thick volume's two copies allocated and reported",
        Duration::from_secs(60),
        || {
            let all = c.must_scli(&["--query_all_sds", "--json"]).json();
            let stored: u64 = all
                .as_array()?
                .iter()
                .filter_map(|x| x["integrity"]["thick_chunks_stored"].as_u64())
                .sum();
            (stored == 64).then_some(())
        },
    );
    let p = pool(c);
    assert_eq!(p["capacity"]["thick_reserved_bytes"], 64u64 << 20);
    // What the pool promised (1 GiB thin and 32 MiB thick, one copy) against what it has.
    let promised = (1u64 << 30) + (32 << 20);
    assert_eq!(p["capacity"]["provisioned_bytes"], promised);
    assert_eq!(p["capacity"]["usable_bytes"], raw / 2);
    assert_eq!(
        p["capacity"]["provisioned_percent"].as_u64(),
        Some(promised * 100 / (raw / 2))
    );
    let text = c
        .must_scli(&["--query_storage_pool", "--storage_pool_name", "sp1"])
        .stdout;
    assert!(
        text.contains("thin provisioning promised more than the pool holds"),
        "{text}"
    );
    // Each volume: what its chunks take against its size (the SDS recount every few seconds).
    let volume = |name: &str| {
        c.must_scli(&["--query_volume", "--volume_name", name, "--json"])
            .json()
    };
    let thick = wait_for(
        "the thick volume's chunks counted as its space",
        Duration::from_secs(60),
        || {
            let v = volume("thick1");
            (v["capacity"]["allocated_bytes"].as_u64() == Some(32 << 20)).then_some(v)
        },
    );
    assert_eq!(thick["capacity"]["free_bytes"], 0, "{thick}");
    assert_eq!(thick["capacity"]["allocated_percent"], 100, "{thick}");
    assert_eq!(volume("vol1")["capacity"]["allocated_bytes"], 0);
    let text = c
        .must_scli(&["--query_volume", "--volume_name", "thick1"])
        .stdout;
    assert!(
        text.contains("Allocated: 32 MiB of 32 MiB (100%), 0 MiB free"),
        "{text}"
    );

    // Each SDS: stored and free add up to its chunk space.
    let all = c.must_scli(&["--query_all_sds", "--json"]).json();
    for x in all.as_array().expect("SDS list") {
        let cap = &x["capacity"];
        let (space, stored, free) = (
            cap["chunk_space_bytes"].as_u64().expect("space"),
            cap["stored_bytes"].as_u64().expect("stored"),
            cap["free_bytes"].as_u64().expect("free"),
        );
        assert!(stored > 0 && stored + free == space, "{x}");
    }

    // Thin data fills the pool: writes past the free space get ENOSPC, promptly.
    let thin = d.uri("vol1");
    let fill = raw / 2 + (32 << 20);
    let cmds: Vec<String> = (0..fill >> 23)
        .map(|i| format!("write -P 0x11 {} 8M", i << 23))
        .collect();
    let out = qemu_io(&thin, &cmds);
    assert!(
        out.contains("No space left on device"),
        "thin writes into a full pool: {out}"
    );

    // The warning state, in scli and in the MDM's metrics.
    wait_for(
        "the pool's capacity warning in scli",
        Duration::from_secs(20),
        || {
            let p = pool(c);
            let state = p["capacity"]["state"].as_str()?.to_string();
            (state == "Full" || state == "Critical").then_some(())
        },
    );
    let text = c
        .must_scli(&["--query_storage_pool", "--storage_pool_name", "sp1"])
        .stdout;
    assert!(
        text.contains("WARNING: the pool is running out of space"),
        "{text}"
    );
    // (A scrape can come back empty: read them again until they all answer.)
    let (state, thick, thin) = wait_for(
        "the pool's capacity state in the MDM's metrics",
        Duration::from_secs(20),
        || {
            let m = |name| mdm_pool_metric(c, name);
            let state = m("meshblock_mdm_pool_capacity_state")?;
            let thick = m("meshblock_mdm_pool_thick_reserved_bytes")?;
            let thin = m("meshblock_mdm_pool_thin_used_bytes")?;
            (state >= 2.0).then_some((state, thick, thin))
        },
    );
    assert!(state <= 3.0, "{state}");
    assert_eq!(thick, (64u64 << 20) as f64);
    assert!(thin > 0.0, "{thin}");

    // The thin data now stored counts: even a small thick volume no longer fits.
    let r = c.scli_raw(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--size_gb",
        "0.0078125",
        "--volume_name",
        "thick2",
        "--thick_provisioned",
    ]);
    assert!(!r.ok, "a thick volume was accepted into a full pool");
    assert!(r.stderr.contains("thin data"), "{}", r.stderr);
    assert!(r.stderr.contains("Nothing was changed"), "{}", r.stderr);
    assert!(cluster_map(c).volume_by_name("thick2").is_none());

    // The thick volume's writes all succeed and read back, whole chunks and partial ones.
    c.must_scli(&[
        "--map_volume_to_sdc",
        "--volume_name",
        "thick1",
        "--sdc_name",
        "sdc1",
    ]);
    let uri = d.uri("thick1");
    wait_export(&uri);
    let out = qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 32M".into(),
            "write -P 0x3c 1052672 65536".into(),
            "flush".into(),
            "read -P 0x5a 0 1052672".into(),
            "read -P 0x3c 1052672 65536".into(),
            "read -P 0x5a 1118208 32436224".into(),
        ],
    );
    assert!(
        !out.contains("failed") && !out.contains("No space"),
        "writes to the thick volume in a full pool: {out}"
    );
    assert_eq!(out.matches("wrote ").count(), 2, "{out}");
    assert_eq!(out.matches("read ").count(), 3, "{out}");
    let sds = c.must_scli(&["--query_all_sds", "--json"]).json();
    for x in sds.as_array().expect("SDS list") {
        assert_eq!(x["integrity"]["thick_chunks_no_space"], 0, "{x}");
    }
}
