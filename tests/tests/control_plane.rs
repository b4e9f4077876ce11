//! Control plane against real `mdm` processes driven by the real `scli`: the object tree, leader
//! failover under a stream of writes, rejoin and catch-up (also by snapshot), bad input, and
//! refusal of peers without a CA-signed certificate.

use meshblock_tests::*;
use proto::msg::{MdmRequest, MdmResponse};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn register_sdc(c: &Cluster, guid: &str, name: &str, ip: &str) {
    let r = control_request(
        &sdc_cert(c, name),
        &c.mdm_ips(),
        &MdmRequest::SdcRegister {
            guid: guid.into(),
            name: name.into(),
            ip: ip.into(),
        },
    );
    assert!(
        matches!(r, Ok(MdmResponse::SdcRegistered { .. })),
        "register SDC: {r:?}"
    );
}

/// pd1 with two fault sets, pool sp1, four SDS with declared capacity, thin and thick volumes,
/// an SDC, a mapping with limits, a Monitor user.
fn build_tree(c: &Cluster) {
    c.must_scli(&["--add_protection_domain", "--protection_domain_name", "pd1"]);
    c.must_scli(&[
        "--add_fault_set",
        "--protection_domain_name",
        "pd1",
        "--fault_set_name",
        "fs1",
    ]);
    c.must_scli(&[
        "--add_fault_set",
        "--protection_domain_name",
        "pd1",
        "--fault_set_name",
        "fs2",
    ]);
    c.must_scli(&[
        "--add_storage_pool",
        "--protection_domain_name",
        "pd1",
        "--storage_pool_name",
        "sp1",
        "--media_type",
        "SSD",
    ]);
    for i in 1..=4 {
        let fs = if i % 2 == 0 { "fs2" } else { "fs1" };
        c.must_scli(&[
            "--add_sds",
            "--sds_ip",
            &format!("127.0.0.1:{}", 30000 + i),
            "--sds_name",
            &format!("sds{i}"),
            "--protection_domain_name",
            "pd1",
            "--storage_pool_name",
            "sp1",
            "--fault_set_name",
            fs,
            "--device_path",
            &format!("/dev/fake{i}"),
            "--device_capacity_gb",
            "100",
        ]);
    }
    c.must_scli(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--size_gb",
        "8",
        "--volume_name",
        "thin1",
        "--thin_provisioned",
    ]);
    c.must_scli(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--size_gb",
        "16",
        "--volume_name",
        "thick1",
        "--thick_provisioned",
    ]);
    register_sdc(
        c,
        "6a1b2c3d-0000-4000-8000-000000000001",
        "host1",
        "127.0.0.1",
    );
    c.must_scli(&[
        "--map_volume_to_sdc",
        "--volume_name",
        "thin1",
        "--sdc_name",
        "host1",
    ]);
    c.must_scli(&[
        "--set_sdc_volume_limits",
        "--volume_name",
        "thin1",
        "--sdc_name",
        "host1",
        "--limit_iops",
        "1000",
        "--limit_bandwidth_kbps",
        "20480",
    ]);
    let pw = c.password_file("Watcher1").display().to_string();
    c.must_scli(&[
        "--add_user",
        "--username",
        "watcher",
        "--user_role",
        "Monitor",
        "--password_file",
        &pw,
    ]);
}

fn volume_names(c: &Cluster) -> BTreeSet<String> {
    let v = c.query_all();
    v["state"]["volumes"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|v| v["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn object_tree_placement_and_queries() {
    let c = Cluster::start("tree", 3, &[]);
    build_tree(&c);
    let v = c.query_all();
    let pools = v["state"]["pools"].as_object().expect("pools");
    let pool = pools.values().next().expect("a pool");
    let sds = v["state"]["sds"].as_object().expect("sds");
    let fs_of =
        |id: &serde_json::Value| sds[&format!("{}", id.as_u64().expect("id"))]["fault_set"].clone();
    for pg in pool["pgs"].as_array().expect("pgs") {
        assert_ne!(pg["primary"], serde_json::Value::Null, "every PG is placed");
        assert_ne!(pg["primary"], pg["secondary"]);
        assert_ne!(
            fs_of(&pg["primary"]),
            fs_of(&pg["secondary"]),
            "copies in two fault sets"
        );
    }
    let q = c.must_scli(&["--query_cluster"]);
    assert!(q.stdout.contains("Mode: 3_node"), "{}", q.stdout);
    assert!(q.stdout.contains("Active: 3/3"), "{}", q.stdout);
    let vol = c.must_scli(&["--query_volume", "--volume_name", "thin1"]);
    assert!(vol.stdout.contains("thin1"), "{}", vol.stdout);
    c.must_scli(&[
        "--rename_volume",
        "--volume_name",
        "thin1",
        "--new_name",
        "thin2",
    ]);
    c.must_scli(&[
        "--modify_volume_capacity",
        "--volume_name",
        "thin2",
        "--size_gb",
        "24",
    ]);
    c.must_scli(&[
        "--unmap_volume_from_sdc",
        "--volume_name",
        "thin2",
        "--sdc_name",
        "host1",
    ]);
    c.must_scli(&["--remove_volume", "--i_am_sure", "--volume_name", "thin2"]);
    assert!(!volume_names(&c).contains("thin2"));
    for q in [
        vec![
            "--query_protection_domain",
            "--protection_domain_name",
            "pd1",
        ],
        vec!["--query_storage_pool", "--storage_pool_name", "sp1"],
        vec!["--query_all_sds"],
        vec!["--query_sds", "--sds_name", "sds1"],
        vec!["--query_sdc"],
        vec!["--query_all_volumes"],
    ] {
        c.must_scli(&q);
        let mut j = q.clone();
        j.push("--json");
        c.must_scli(&j).json();
    }
}

#[test]
fn leader_kill_during_writes_loses_no_acknowledged_command() {
    let c = Cluster::start("failover", 3, &["--snapshot-interval-entries", "25"]);
    c.must_scli(&["--add_protection_domain", "--protection_domain_name", "pd1"]);
    c.must_scli(&[
        "--add_storage_pool",
        "--protection_domain_name",
        "pd1",
        "--storage_pool_name",
        "sp1",
    ]);
    let c = Arc::new(Mutex::new(c));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let name = format!("v{i}");
                i += 1;
                // Run scli without holding the lock while it runs.
                let (bin_args, dir, session) = {
                    let g = c.lock().expect("lock");
                    (g.mdm_ips(), g.dir.path.clone(), g.session_file())
                };
                let out = std::process::Command::new(bin("scli"))
                    .args([
                        "--add_volume",
                        "--storage_pool_name",
                        "sp1",
                        "--size_gb",
                        "1",
                        "--volume_name",
                        &name,
                        "--mdm_ip",
                        &bin_args,
                    ])
                    .env("MESHBLOCK_CERT_DIR", dir.join("certs/admin"))
                    .env("MESHBLOCK_SCLI_SESSION", session)
                    .output()
                    .expect("scli");
                if out.status.success() {
                    acked.lock().expect("lock").push(name);
                }
            }
        })
    };
    wait_for("some acknowledged writes", Duration::from_secs(30), || {
        (acked.lock().expect("lock").len() >= 10).then_some(())
    });
    let (old, killed_at) = {
        let mut g = c.lock().expect("lock");
        let old = g.wait_leader(Duration::from_secs(5));
        g.mdms[old].proc.kill();
        (old, Instant::now())
    };
    let new_leader_after = {
        let g = c.lock().expect("lock");
        wait_for("a new leader answering", Duration::from_secs(10), || {
            let r = g.scli_raw(&["--query_cluster"]);
            r.ok.then(|| killed_at.elapsed())
        })
    };
    println!(
        "new leader answered {:?} after the leader was killed",
        new_leader_after
    );
    assert!(
        new_leader_after < Duration::from_secs(5),
        "new leader took {new_leader_after:?}"
    );
    let before = acked.lock().expect("lock").len();
    wait_for("writes after failover", Duration::from_secs(30), || {
        (acked.lock().expect("lock").len() >= before + 30).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");

    let mut g = c.lock().expect("lock");
    let names = volume_names(&g);
    for a in acked.lock().expect("lock").iter() {
        assert!(
            names.contains(a),
            "acknowledged volume {a} is missing after failover"
        );
    }
    // The old leader rejoins as a follower and catches up; its log was compacted away on the
    // others (snapshot every 25 entries), so it needs a snapshot.
    g.restart(old);
    wait_for(
        "the old leader to catch up",
        Duration::from_secs(20),
        || {
            let leader = g.mdms.iter().find(|m| m.is_leader())?;
            let commit = leader.metric("meshblock_mdm_raft_commit_index")?;
            let applied = g.mdms[old].metric("meshblock_mdm_raft_applied_index")?;
            (applied >= commit).then_some(())
        },
    );
    let leader = g.wait_leader(Duration::from_secs(5));
    assert!(!g.mdms[old].is_leader() || leader == old);
    wait_for("Active: 3/3", Duration::from_secs(10), || {
        g.scli_raw(&["--query_cluster"])
            .stdout
            .contains("Active: 3/3")
            .then_some(())
    });
    assert!(
        g.mdms[old].proc.log_text().contains("installed a snapshot"),
        "the old leader should have caught up through a snapshot"
    );
    // Now make the rejoined node necessary for quorum: kill another one.
    let other = (0..3)
        .find(|i| *i != old && *i != leader)
        .expect("a third MDM");
    g.mdms[other].proc.kill();
    let names_after = volume_names(&g);
    assert_eq!(
        names, names_after,
        "the state survives with the rejoined MDM in the quorum"
    );
}

#[test]
fn five_node_cluster_fails_over() {
    let c = Cluster::start("five", 5, &[]);
    let q = c.must_scli(&["--query_cluster"]);
    assert!(
        q.stdout.contains("Mode: 5_node") && q.stdout.contains("Active: 5/5"),
        "{}",
        q.stdout
    );
    c.must_scli(&["--add_protection_domain", "--protection_domain_name", "pd1"]);
    let mut c = c;
    let old = c.wait_leader(Duration::from_secs(5));
    c.mdms[old].proc.kill();
    let t = Instant::now();
    wait_for("a new leader", Duration::from_secs(10), || {
        c.scli_raw(&["--add_protection_domain", "--protection_domain_name", "pd2"])
            .ok
            .then_some(())
    });
    println!(
        "5_node: new leader accepted a command {:?} after the kill",
        t.elapsed()
    );
    let v = c.query_all();
    let pds: Vec<&str> = v["state"]["pds"]
        .as_object()
        .expect("pds")
        .values()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(pds.contains(&"pd1") && pds.contains(&"pd2"), "{pds:?}");
    wait_for("Active: 4/5", Duration::from_secs(10), || {
        c.scli_raw(&["--query_cluster"])
            .stdout
            .contains("Active: 4/5")
            .then_some(())
    });
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let c = Cluster::start("badinput", 1, &[]);
    build_tree(&c);
    let before = c.query_all();
    let watcher_pw = c.password_file("Watcher1").display().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["--no_such_command"],
        vec!["--add_protection_domain"],
        vec!["--add_protection_domain", "--protection_domain_name", "pd1"],
        vec![
            "--add_protection_domain",
            "--protection_domain_name",
            "bad name",
        ],
        vec![
            "--add_storage_pool",
            "--protection_domain_name",
            "nope",
            "--storage_pool_name",
            "spx",
        ],
        vec![
            "--add_storage_pool",
            "--protection_domain_name",
            "pd1",
            "--storage_pool_name",
            "sp1",
        ],
        vec![
            "--add_storage_pool",
            "--protection_domain_name",
            "pd1",
            "--storage_pool_name",
            "spx",
            "--pg_count",
            "0",
        ],
        vec![
            "--add_fault_set",
            "--protection_domain_name",
            "pd1",
            "--fault_set_name",
            "fs1",
        ],
        vec![
            "--add_sds",
            "--sds_ip",
            "127.0.0.1:30001",
            "--sds_name",
            "sdsx",
            "--protection_domain_name",
            "pd1",
            "--storage_pool_name",
            "sp1",
            "--device_path",
            "/d",
        ],
        vec![
            "--add_sds",
            "--sds_ip",
            "not-an-ip",
            "--sds_name",
            "sdsx",
            "--protection_domain_name",
            "pd1",
            "--storage_pool_name",
            "sp1",
            "--device_path",
            "/d",
        ],
        vec![
            "--add_sds",
            "--sds_ip",
            "127.0.0.1:39999",
            "--sds_name",
            "sds1",
            "--protection_domain_name",
            "pd1",
            "--storage_pool_name",
            "sp1",
            "--device_path",
            "/d",
        ],
        vec![
            "--add_sds",
            "--sds_ip",
            "127.0.0.1:39999",
            "--sds_name",
            "sdsx",
            "--protection_domain_name",
            "pd1",
            "--storage_pool_name",
            "sp1",
            "--device_path",
            "/d",
            "--fault_set_name",
            "nofs",
        ],
        vec![
            "--add_sds_device",
            "--sds_name",
            "nosds",
            "--device_path",
            "/d2",
            "--storage_pool_name",
            "sp1",
        ],
        vec!["--remove_sds", "--i_am_sure", "--sds_name", "nosds"],
        vec![
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--volume_name",
            "v",
        ],
        vec![
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--size_gb",
            "abc",
            "--volume_name",
            "v",
        ],
        vec![
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--size_gb",
            "0",
            "--volume_name",
            "v",
        ],
        vec![
            "--add_volume",
            "--storage_pool_name",
            "nopool",
            "--size_gb",
            "8",
            "--volume_name",
            "v",
        ],
        vec![
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--size_gb",
            "8",
            "--volume_name",
            "thin1",
        ],
        vec![
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--size_gb",
            "1000",
            "--volume_name",
            "huge",
            "--thick_provisioned",
        ],
        vec!["--remove_volume", "--i_am_sure", "--volume_name", "nope"],
        vec!["--remove_volume", "--i_am_sure", "--volume_name", "thin1"],
        vec![
            "--modify_volume_capacity",
            "--volume_name",
            "thin1",
            "--size_gb",
            "1",
        ],
        vec![
            "--modify_volume_capacity",
            "--volume_name",
            "thick1",
            "--size_gb",
            "1000",
        ],
        vec![
            "--rename_volume",
            "--volume_name",
            "thin1",
            "--new_name",
            "thick1",
        ],
        vec![
            "--map_volume_to_sdc",
            "--volume_name",
            "thin1",
            "--sdc_name",
            "nohost",
        ],
        vec![
            "--map_volume_to_sdc",
            "--volume_name",
            "thin1",
            "--sdc_name",
            "host1",
        ],
        vec![
            "--map_volume_to_sdc",
            "--volume_name",
            "nope",
            "--sdc_name",
            "host1",
        ],
        vec![
            "--unmap_volume_from_sdc",
            "--volume_name",
            "thick1",
            "--sdc_name",
            "host1",
        ],
        vec![
            "--set_sdc_volume_limits",
            "--volume_name",
            "thick1",
            "--sdc_name",
            "host1",
            "--limit_iops",
            "100",
        ],
        vec![
            "--add_user",
            "--username",
            "watcher",
            "--user_role",
            "Monitor",
            "--password_file",
            &watcher_pw,
        ],
        vec![
            "--add_user",
            "--username",
            "u2",
            "--user_role",
            "Emperor",
            "--password_file",
            &watcher_pw,
        ],
        // A password on the command line is refused, whatever the command.
        vec![
            "--add_user",
            "--username",
            "u3",
            "--user_role",
            "Monitor",
            "--password",
            "Watcher1",
        ],
        vec!["--add_user", "--username", "u4", "--user_role", "Monitor"],
        vec!["--switch_cluster_mode", "--cluster_mode", "3_node"],
        vec!["--switch_cluster_mode", "--cluster_mode", "7_node"],
        vec!["--add_standby_mdm", "--new_mdm_ip", "127.0.0.1:1"],
        vec!["--query_volume", "--volume_name", "nope"],
        vec!["--query_sds", "--sds_name", "nope"],
        vec!["--query_storage_pool", "--storage_pool_name", "nope"],
    ];
    for args in &cases {
        let r = c.scli_raw(args);
        assert!(!r.ok, "scli {args:?} should fail but printed {}", r.stdout);
        assert!(
            !r.stderr.trim().is_empty(),
            "scli {args:?} failed without a message"
        );
        assert!(
            !r.stderr.contains("panicked"),
            "scli {args:?} panicked: {}",
            r.stderr
        );
    }
    // An unauthorised role.
    let monitor = c.dir.join("monitor-session.json");
    let login = c.scli_as(
        &monitor,
        &[
            "--login",
            "--username",
            "watcher",
            "--password_file",
            &watcher_pw,
            "--mdm_ip",
            &c.mdm_ips(),
        ],
    );
    assert!(login.ok, "{}{}", login.stdout, login.stderr);
    let r = c.scli_as(
        &monitor,
        &["--add_protection_domain", "--protection_domain_name", "pd9"],
    );
    assert!(!r.ok && r.stderr.to_lowercase().contains("role"), "{r:?}");
    assert!(
        c.scli_as(&monitor, &["--query_all"]).ok,
        "Monitor may query"
    );
    let wrong = c.scli_as(
        &c.dir.join("x.json"),
        &[
            "--login",
            "--username",
            "admin",
            "--password_file",
            &c.password_file("wrong").display().to_string(),
            "--mdm_ip",
            &c.mdm_ips(),
        ],
    );
    assert!(!wrong.ok);
    let after = c.query_all();
    if before["state"] != after["state"] {
        let (b, a) = (before["state"].to_string(), after["state"].to_string());
        let at = b
            .chars()
            .zip(a.chars())
            .position(|(x, y)| x != y)
            .unwrap_or(0);
        panic!(
            "failed commands changed the cluster state near: {}",
            &a[at.saturating_sub(200)..(at + 200).min(a.len())]
        );
    }
}

#[test]
fn expired_session_is_reported() {
    let dir = TestDir::new("expiry-cfg");
    let cfg = dir.join("mdm.toml");
    std::fs::write(&cfg, "session_ttl_secs = 2\n").expect("write config");
    let c = Cluster::start("expiry", 1, &["--config", &cfg.display().to_string()]);
    let t = Instant::now();
    c.must_scli(&["--query_all"]);
    wait_for("the session to expire", Duration::from_secs(10), || {
        let r = c.scli_raw(&["--query_all"]);
        (!r.ok).then_some(r)
    });
    let r = c.scli_raw(&["--add_protection_domain", "--protection_domain_name", "pdx"]);
    assert!(
        !r.ok && r.stderr.contains("session expired, log in again"),
        "{r:?}"
    );
    assert!(t.elapsed() >= Duration::from_secs(1));
}

#[test]
fn peers_without_a_ca_signed_certificate_are_refused_and_garbage_is_survived() {
    let c = Cluster::start("tls", 1, &[]);
    // A rogue CA's certificate: the handshake (hello) fails.
    proto::ca::make_rogue_identity(&c.dir.join("rogue"), "admin").expect("rogue");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let addr = c.mdms[0].addr;
    rt.block_on(async {
        let rogue = proto::transport::Identity::load(&c.dir.join("rogue")).expect("load");
        let ep = proto::transport::Endpoint::client(&rogue, "rogue").expect("ep");
        assert!(
            ep.connect(addr).await.is_err(),
            "the MDM accepted a certificate its CA did not sign"
        );
        // scli with the rogue certificate fails too.
        let out = std::process::Command::new(bin("scli"))
            .args([
                "--login",
                "--username",
                "admin",
                "--password_file",
                &c.password_file(ADMIN_PASSWORD).display().to_string(),
                "--mdm_ip",
                &addr.to_string(),
            ])
            .env("MESHBLOCK_CERT_DIR", c.dir.join("rogue"))
            .env("MESHBLOCK_SCLI_SESSION", c.dir.join("rogue.json"))
            .output()
            .expect("scli");
        assert!(!out.status.success());

        // Malformed frames from a legitimate peer: an error or a closed stream, never a crash.
        let good = proto::transport::Identity::load(&c.dir.join("certs/admin")).expect("load");
        let ep = proto::transport::Endpoint::client(&good, "fuzzer").expect("ep");
        let garbage: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            vec![0u8; 24],
            {
                let mut h = vec![0x42, 0x4d, 1, 2, 0, 0, 0, 0];
                h.extend(1u64.to_le_bytes());
                h.extend(u32::MAX.to_le_bytes());
                h.extend(0u32.to_le_bytes());
                h
            },
            {
                let mut h = vec![0x42, 0x4d, 1, 2, 0, 0, 0, 0];
                h.extend(1u64.to_le_bytes());
                h.extend(5u32.to_le_bytes());
                h.extend(0u32.to_le_bytes());
                h.extend(b"{{{{{");
                h
            },
            {
                let mut h = vec![0x42, 0x4d, 1, 3, 0, 0, 0, 0];
                h.extend(1u64.to_le_bytes());
                h.extend(2u32.to_le_bytes());
                h.extend(3u32.to_le_bytes());
                h.extend(b"{}abc");
                h
            },
            {
                let mut h = vec![0x42, 0x4d, 1, 99, 0, 0, 0, 0];
                h.extend(1u64.to_le_bytes());
                h.extend(0u32.to_le_bytes());
                h.extend(0u32.to_le_bytes());
                h
            },
            vec![0x42, 0x4d, 1],
        ];
        for g in garbage {
            let (mut send, mut recv) = ep.connect_raw(addr).await.expect("raw stream");
            let _ = send.write_all(&g).await;
            let _ = send.finish();
            let reply =
                tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20)).await;
            assert!(
                reply.is_ok(),
                "the MDM neither answered nor closed the stream for {g:?}"
            );
        }
    });
    assert!(c.mdms[0].proc.child.is_some());
    let mut c = c;
    assert!(c.mdms[0].proc.alive(), "the MDM died on malformed input");
    c.must_scli(&["--query_cluster"]);
}
