//! scli's administration grammar through the real binary on a real cluster: objects by id as
//! well as by name, `--i_am_sure`, clap's refusals (exit code 2), removals refused while the
//! object is in use (and changing nothing), renames of a serving SDS and SDC, aborting an
//! SDS's removal, removing an SDC, a user and a standby MDM.

use meshblock_tests::nbd::check_model;
use meshblock_tests::*;
use std::time::{Duration, Instant};

/// The objects of the map that scli commands add and remove, by id and name: what a refused
/// command must leave as it was (SDS states and capacities move on their own, so they are
/// left out).
fn objects(c: &Cluster) -> Vec<String> {
    let m = cluster_map(c);
    let mut out = Vec::new();
    out.extend(m.pds.values().map(|x| format!("pd {} {}", x.id, x.name)));
    out.extend(
        m.fault_sets
            .values()
            .map(|x| format!("fs {} {} in {}", x.id, x.name, x.pd)),
    );
    out.extend(
        m.pools
            .values()
            .map(|x| format!("pool {} {}", x.id, x.name)),
    );
    out.extend(m.sds.values().map(|x| {
        format!(
            "sds {} {} cert {} removing {} devices {}",
            x.id,
            x.name,
            x.cert_name(),
            x.removing,
            x.devices.len()
        )
    }));
    out.extend(
        m.volumes
            .values()
            .map(|x| format!("volume {} {}", x.id, x.name)),
    );
    out.extend(m.sdcs.values().map(|x| format!("sdc {} {}", x.id, x.name)));
    out.extend(
        m.mappings
            .iter()
            .map(|x| format!("mapping {} {}", x.volume, x.sdc)),
    );
    out.extend(m.mdms.values().map(|x| format!("mdm {} {}", x.id, x.name)));
    out
}

/// `args` is refused by the MDM or by scli (exit code 1) with a message containing `says`,
/// and the map's objects are as before.
fn must_refuse(c: &Cluster, args: &[&str], says: &str) {
    let before = objects(c);
    let r = c.scli_raw(args);
    assert!(!r.ok, "{args:?} was accepted: {}", r.stdout);
    assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
    assert!(
        r.stderr.contains(says),
        "{args:?}: unclear error: {}",
        r.stderr
    );
    assert_eq!(objects(c), before, "{args:?} changed the map");
}

/// `args` is refused by clap itself: exit code 2, its message naming `says`, nothing sent.
fn must_refuse_by_clap(c: &Cluster, args: &[&str], says: &str) {
    let before = objects(c);
    let r = c.scli_raw(args);
    assert_eq!(r.code, 2, "{args:?}: {}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    assert_eq!(objects(c), before, "{args:?} changed the map");
}

/// An id the way scli prints it (16 hex digits).
fn hex(id: u64) -> String {
    format!("{id:016x}")
}

#[test]
fn scli_admin_grammar() {
    let mut dc = DataCluster::start("scli_admin", 3, 1);
    let map = cluster_map(&dc.c);
    let pd1 = map.pd_by_name("pd1").expect("pd1").id.0;
    let sp1 = map.pool_by_name("sp1").expect("sp1").id.0;
    let vol1 = map.volume_by_name("vol1").expect("vol1").id.0;
    let sds1 = map.sds_by_name("sds1").expect("sds1").id.0;
    let sdc1 = map
        .sdcs
        .values()
        .find(|x| x.name == "sdc1")
        .expect("sdc1")
        .id
        .0;

    // clap refuses malformed command lines with exit code 2; nothing is sent.
    must_refuse_by_clap(
        &dc.c,
        &["--query_all", "--query_cluster"],
        "cannot be used with",
    );
    must_refuse_by_clap(
        &dc.c,
        &["--query_volume", "--volume_id", "nothex"],
        "not an id",
    );
    must_refuse_by_clap(
        &dc.c,
        &[
            "--query_volume",
            "--volume_name",
            "vol1",
            "--volume_id",
            &hex(vol1),
        ],
        "cannot be used with",
    );
    must_refuse_by_clap(
        &dc.c,
        &[
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--volume_name",
            "v9",
        ],
        "--size_gb",
    );
    must_refuse_by_clap(&dc.c, &["--rename_sds", "--sds_name", "sds1"], "--new_name");

    // Destructive commands need --i_am_sure; without it nothing is sent.
    must_refuse(
        &dc.c,
        &["--remove_volume", "--volume_name", "vol1"],
        "add --i_am_sure",
    );
    must_refuse(
        &dc.c,
        &[
            "--remove_protection_domain",
            "--protection_domain_name",
            "pd1",
        ],
        "add --i_am_sure",
    );

    // Every object by id as well as by name.
    for (args, shows) in [
        (
            vec!["--query_volume", "--volume_id", &hex(vol1)],
            "Name: vol1",
        ),
        (vec!["--query_sds", "--sds_id", &hex(sds1)], "Name: sds1"),
        (
            vec![
                "--query_protection_domain",
                "--protection_domain_id",
                &hex(pd1),
            ],
            "pd1",
        ),
        (
            vec!["--query_storage_pool", "--storage_pool_id", &hex(sp1)],
            "sp1",
        ),
        (vec!["--query_sdc", "--sdc_id", &hex(sdc1)], "Name: sdc1"),
    ] {
        let r = dc.c.must_scli(&args);
        assert!(r.stdout.contains(shows), "{args:?}: {}", r.stdout);
    }
    let with_0x = format!("0x{}", hex(vol1));
    dc.c.must_scli(&["--query_volume", "--volume_id", &with_0x]);
    must_refuse(
        &dc.c,
        &["--query_volume", "--volume_id", "dead"],
        "no volume has id 000000000000dead",
    );
    must_refuse(
        &dc.c,
        &["--remove_sds", "--sds_id", "beef", "--i_am_sure"],
        "no SDS has id",
    );

    // Removals are refused while the object is in use.
    must_refuse(
        &dc.c,
        &[
            "--remove_protection_domain",
            "--protection_domain_id",
            &hex(pd1),
            "--i_am_sure",
        ],
        "storage pools (sp1)",
    );
    must_refuse(
        &dc.c,
        &[
            "--remove_storage_pool",
            "--storage_pool_id",
            &hex(sp1),
            "--i_am_sure",
        ],
        "volume(s) (vol1)",
    );
    must_refuse(
        &dc.c,
        &["--remove_sdc", "--sdc_name", "sdc1", "--i_am_sure"],
        "it is connected",
    );
    // A second protection domain, emptied and removed object by object (by id and by name).
    dc.c.must_scli(&["--add_protection_domain", "--protection_domain_name", "pd2"]);
    dc.c.must_scli(&[
        "--add_fault_set",
        "--protection_domain_name",
        "pd2",
        "--fault_set_name",
        "fs2",
    ]);
    dc.c.must_scli(&[
        "--add_storage_pool",
        "--protection_domain_name",
        "pd2",
        "--storage_pool_name",
        "sp2",
    ]);
    // An SDS that never starts: it holds no data.
    dc.c.must_scli(&[
        "--add_sds",
        "--sds_ip",
        "127.0.0.1:9",
        "--sds_name",
        "ghost",
        "--protection_domain_name",
        "pd2",
        "--storage_pool_name",
        "sp2",
        "--device_path",
        "/dev/ghost",
        "--device_capacity_gb",
        "10",
        "--fault_set_name",
        "fs2",
    ]);
    let map = cluster_map(&dc.c);
    let pd2 = map.pd_by_name("pd2").expect("pd2").id;
    let fs2 = map.fault_set_by_name(pd2, "fs2").expect("fs2").id.0;
    let sp2 = map.pool_by_name("sp2").expect("sp2").id.0;
    let ghost = map.sds_by_name("ghost").expect("ghost").id.0;
    must_refuse(
        &dc.c,
        &[
            "--remove_fault_set",
            "--fault_set_id",
            &hex(fs2),
            "--i_am_sure",
        ],
        "SDS (ghost)",
    );
    must_refuse(
        &dc.c,
        &[
            "--remove_storage_pool",
            "--storage_pool_name",
            "sp2",
            "--i_am_sure",
        ],
        "ghost:/dev/ghost",
    );
    must_refuse(
        &dc.c,
        &[
            "--remove_protection_domain",
            "--protection_domain_name",
            "pd2",
            "--i_am_sure",
        ],
        "storage pools (sp2)",
    );
    dc.c.must_scli(&["--remove_sds", "--sds_id", &hex(ghost), "--i_am_sure"]);
    dc.c.must_scli(&[
        "--remove_storage_pool",
        "--storage_pool_id",
        &hex(sp2),
        "--i_am_sure",
    ]);
    must_refuse(
        &dc.c,
        &[
            "--remove_protection_domain",
            "--protection_domain_id",
            &hex(pd2.0),
            "--i_am_sure",
        ],
        "fault sets (fs2)",
    );
    dc.c.must_scli(&[
        "--remove_fault_set",
        "--protection_domain_name",
        "pd2",
        "--fault_set_name",
        "fs2",
        "--i_am_sure",
    ]);
    dc.c.must_scli(&[
        "--remove_protection_domain",
        "--protection_domain_name",
        "pd2",
        "--i_am_sure",
    ]);
    let map = cluster_map(&dc.c);
    assert!(map.pd_by_name("pd2").is_none() && map.pool_by_name("sp2").is_none());
    assert!(map.fault_sets.is_empty() && map.sds_by_name("ghost").is_none());

    // Users: never the one sending the command; a removed user's session ends.
    let pw = dc.c.password_file("OpsSecret1").display().to_string();
    dc.c.must_scli(&[
        "--add_user",
        "--username",
        "ops",
        "--user_role",
        "Administrator",
        "--password_file",
        &pw,
    ]);
    let ops_session = dc.c.dir.join("ops-session.json");
    let login = dc.c.scli_as(
        &ops_session,
        &[
            "--login",
            "--username",
            "ops",
            "--password_file",
            &pw,
            "--mdm_ip",
            &dc.c.mdm_ips(),
        ],
    );
    assert!(login.ok, "ops login: {}", login.stderr);
    must_refuse(
        &dc.c,
        &["--remove_user", "--username", "admin", "--i_am_sure"],
        "the user sending the command",
    );
    dc.c.must_scli(&["--remove_user", "--username", "ops", "--i_am_sure"]);
    let r = dc.c.scli_as(&ops_session, &["--query_all"]);
    assert!(
        !r.ok && r.stderr.contains("no longer exists"),
        "a removed user's session still works: {}{}",
        r.stdout,
        r.stderr
    );

    // Renames: the SDS and the SDC keep identifying themselves by their certificates, so they
    // go on serving, heartbeating and renewing their sessions.
    let w = Writer::start(&dc, 64 << 20, 71);
    w.wait_more(300, "writes before the renames");
    dc.c.must_scli(&[
        "--rename_sds",
        "--sds_id",
        &hex(sds1),
        "--new_name",
        "rack1-a",
    ]);
    let renamed = Instant::now();
    dc.c.must_scli(&[
        "--rename_sdc",
        "--sdc_id",
        &hex(sdc1),
        "--new_name",
        "app-host",
    ]);
    let r = dc.c.must_scli(&["--query_sds", "--sds_name", "rack1-a"]);
    assert!(r.stdout.contains("(certificate sds:sds1)"), "{}", r.stdout);
    assert!(!dc.c.scli_raw(&["--query_sds", "--sds_name", "sds1"]).ok);
    // The SDC's map polls (its session) are accepted after the rename.
    wait_for(
        "app-host heard after its rename",
        Duration::from_secs(30),
        || {
            let r =
                dc.c.must_scli(&["--query_sdc", "--sdc_name", "app-host", "--json"]);
            let heard = r.json()[0]["last_heard_ms"].as_u64()?;
            ((heard as u128) < renamed.elapsed().as_millis()).then_some(())
        },
    );
    // The SDS stays Normal and writes go on for two SDS-down timeouts (1.5 s each) and more:
    // a refused hello would have had it declared down by then.
    let acked = |w: &Writer| w.acked.load(std::sync::atomic::Ordering::Relaxed);
    let at_rename = acked(&w);
    wait_for(
        "writes through two SDS-down timeouts after the rename",
        Duration::from_secs(60),
        || {
            assert_eq!(
                sds_state(&dc, "rack1-a"),
                "Normal",
                "the renamed SDS left Normal"
            );
            (renamed.elapsed() > Duration::from_millis(3500) && acked(&w) > at_rename + 100)
                .then_some(())
        },
    );
    assert_eq!(dc.sds_metric(0, "meshblock_sds_mdm_connected"), 1.0);
    let v =
        dc.c.must_scli(&["--query_sds", "--sds_name", "rack1-a", "--json"])
            .json();
    assert_eq!(v["cert_name"], "sds1", "{v}");
    assert!(v["pg_copies"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(
        v.get("capacity").is_some(),
        "the renamed SDS's hello stats are missing: {v}"
    );

    // Abort a removal: the SDS keeps its copies and takes part again.
    dc.set_rebuild_policy(&["--concurrency", "1", "--bandwidth_mib_s", "1"]);
    must_refuse(
        &dc.c,
        &["--abort_remove_sds", "--sds_name", "sds2"],
        "not being removed",
    );
    let r =
        dc.c.must_scli(&["--remove_sds", "--sds_name", "sds2", "--i_am_sure"]);
    assert!(r.stdout.contains("being removed"), "{}", r.stdout);
    let sds2 = cluster_map(&dc.c).sds_by_name("sds2").expect("sds2").id.0;
    let r =
        dc.c.must_scli(&["--abort_remove_sds", "--sds_id", &hex(sds2)]);
    assert!(r.stdout.contains("aborted"), "{}", r.stdout);
    assert!(
        !cluster_map(&dc.c)
            .sds_by_name("sds2")
            .expect("sds2")
            .removing
    );
    dc.set_rebuild_policy(&["--concurrency", "4", "--bandwidth_mib_s", "0"]);
    wait_for(
        "pool sp1 Normal after the abort",
        Duration::from_secs(120),
        || (pool_state(&dc.c, "sp1")["state"] == "Normal").then_some(()),
    );
    let v =
        dc.c.must_scli(&["--query_sds", "--sds_name", "sds2", "--json"])
            .json();
    assert_eq!(v["state"], "Normal", "{v}");
    assert!(v["pg_copies"].as_u64().unwrap_or(0) > 20, "{v}");

    let (report, model, uncertain) = w.finish();
    assert_eq!(report.failed, 0, "writes failed: {report:?}");
    let (checked, wrong, first) =
        check_model(&dc.socket, "vol1", &model, &uncertain).expect("read back");
    assert_eq!(
        wrong, 0,
        "{wrong} of {checked} blocks read back wrong (first at {first:?})"
    );

    // An SDC goes once it is silent and nothing is mapped to it; it comes back when it
    // registers again.
    dc.sdc.kill();
    must_refuse(
        &dc.c,
        &["--remove_sdc", "--sdc_name", "app-host", "--i_am_sure"],
        "app-host",
    );
    dc.c.must_scli(&[
        "--unmap_volume_from_sdc",
        "--volume_name",
        "vol1",
        "--sdc_id",
        &hex(sdc1),
    ]);
    wait_for(
        "app-host removed once silent",
        Duration::from_secs(30),
        || {
            let r =
                dc.c.scli_raw(&["--remove_sdc", "--sdc_name", "app-host", "--i_am_sure"]);
            assert!(r.ok || r.stderr.contains("it is connected"), "{}", r.stderr);
            r.ok.then_some(())
        },
    );
    assert!(cluster_map(&dc.c).sdcs.is_empty());
    dc.sdc.start();
    wait_for("the SDC registered again", Duration::from_secs(30), || {
        let m = cluster_map(&dc.c);
        m.sdcs
            .values()
            .find(|x| x.name == "sdc1")
            .map(|x| assert_ne!(x.id.0, sdc1, "a removed SDC comes back as a new one"))
    });
    removed_while_cut_off_it_registers_again(&mut dc);

    // Standby MDMs go; managers (voters) do not.
    dc.c.spawn_mdm(2, false);
    let addr = dc.c.mdms[1].addr.to_string();
    dc.c.must_scli(&[
        "--add_standby_mdm",
        "--new_mdm_ip",
        &addr,
        "--mdm_name",
        "mdm2",
    ]);
    let mdm2 = cluster_map(&dc.c)
        .mdms
        .values()
        .find(|m| m.name == "mdm2")
        .expect("mdm2 added")
        .id
        .0;
    must_refuse(
        &dc.c,
        &["--remove_standby_mdm", "--mdm_name", "mdm1", "--i_am_sure"],
        "it is a manager",
    );
    dc.c.must_scli(&[
        "--remove_standby_mdm",
        "--mdm_id",
        &hex(mdm2),
        "--i_am_sure",
    ]);
    assert!(cluster_map(&dc.c).mdms.values().all(|m| m.name != "mdm2"));
    let r = dc.c.must_scli(&["--query_cluster"]);
    assert!(!r.stdout.contains("mdm2"), "{}", r.stdout);
    names_that_moved_on_refuse_commands_by_id(&dc.c);
    summary("scli admin: ids, --i_am_sure, clap refusals, removals, renames, abort: ok");
}

/// An SDC removed while cut off (frozen here, so its session lapses but its process lives)
/// hears that it is no longer registered at its next map poll, registers again without a
/// restart, and serves what is then mapped to it.
fn removed_while_cut_off_it_registers_again(dc: &mut DataCluster) {
    let sdc1 = |m: &proto::model::ClusterState| {
        m.sdcs
            .values()
            .find(|x| x.name == "sdc1")
            .map(|x| (x.id, x.guid.clone()))
    };
    let (before, guid) = sdc1(&cluster_map(&dc.c)).expect("sdc1 registered");
    dc.sdc.signal(libc::SIGSTOP);
    wait_for(
        "sdc1 removed once its session lapsed",
        Duration::from_secs(30),
        || {
            let r =
                dc.c.scli_raw(&["--remove_sdc", "--sdc_name", "sdc1", "--i_am_sure"]);
            assert!(r.ok || r.stderr.contains("it is connected"), "{}", r.stderr);
            r.ok.then_some(())
        },
    );
    assert!(sdc1(&cluster_map(&dc.c)).is_none());
    dc.sdc.signal(libc::SIGCONT);
    let (after, again) = wait_for(
        "the cut-off SDC registered again by itself",
        Duration::from_secs(30),
        || sdc1(&cluster_map(&dc.c)),
    );
    assert_ne!(after, before, "a new registration");
    assert_eq!(again, guid, "the same host");
    assert!(dc.sdc.alive(), "no restart: the same process");
    assert!(
        dc.sdc.log_text().contains("registering again"),
        "the SDC says why"
    );
    dc.c.must_scli(&[
        "--map_volume_to_sdc",
        "--volume_name",
        "vol1",
        "--sdc_name",
        "sdc1",
    ]);
    let uri = dc.uri("vol1");
    wait_export(&uri);
    let o = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x6b 1M 64k",
            "-c",
            "read -P 0x6b 1M 64k",
            &uri,
        ],
    )
    .expect("qemu-io");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success()
            && !out.contains("verification failed")
            && out.contains("read 65536/65536"),
        "I/O through the SDC registered again: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    dc.c.must_scli(&[
        "--unmap_volume_from_sdc",
        "--volume_name",
        "vol1",
        "--sdc_name",
        "sdc1",
    ]);
}

/// scli sends a command given by id with the name it looked the id up as; the MDM refuses it,
/// changing nothing, if that name went to another object in between. The race is made here by
/// hand: the lookup is taken, then the volume is renamed and a new one takes its old name.
fn names_that_moved_on_refuse_commands_by_id(c: &Cluster) {
    use proto::msg::{Binding, Command, MdmRequest, MdmResponse};
    let add_race1 = || {
        c.must_scli(&[
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--volume_name",
            "race1",
            "--size_gb",
            "8",
            "--thin_provisioned",
        ])
    };
    add_race1();
    let id = cluster_map(c).volume_by_name("race1").expect("race1").id;
    let lookup = Binding::Volume {
        id,
        name: "race1".into(),
    };
    let admin = c.dir.join("certs/admin");
    let token = match control_request(
        &admin,
        &c.mdm_ips(),
        &MdmRequest::Login {
            username: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        },
    ) {
        Ok(MdmResponse::Session { token, .. }) => token,
        other => panic!("login: {other:?}"),
    };
    let resize = |expect: Vec<Binding>| {
        control_request(
            &admin,
            &c.mdm_ips(),
            &MdmRequest::Command {
                token: token.clone(),
                command: Command::ModifyVolumeCapacity {
                    name: "race1".into(),
                    size_bytes: 16 << 30,
                },
                expect,
            },
        )
    };
    c.must_scli(&[
        "--rename_volume",
        "--volume_id",
        &hex(id.0),
        "--new_name",
        "race2",
    ]);
    add_race1();
    let before = cluster_map(c);
    let e = resize(vec![lookup]).expect_err("the name moved on");
    assert_eq!(e.code, proto::ErrorCode::Conflict, "{e:?}");
    assert!(
        e.message.contains("was race1 but is now race2") && e.message.contains("nothing was done"),
        "{}",
        e.message
    );
    let after = cluster_map(c);
    assert_eq!(after.volumes, before.volumes, "nothing changed");
    let new = after.volume_by_name("race1").expect("the new race1");
    assert_eq!(new.size_bytes, 8 << 30);
    // Without the lookup, the same command resizes whatever race1 now is: what the binding
    // guards against.
    resize(Vec::new()).expect("by name");
    assert_eq!(
        cluster_map(c)
            .volume_by_name("race1")
            .expect("race1")
            .size_bytes,
        16 << 30
    );
    // scli's own --volume_id commands carry the lookup and work while nothing moves.
    c.must_scli(&[
        "--modify_volume_capacity",
        "--volume_id",
        &hex(id.0),
        "--size_gb",
        "24",
    ]);
    assert_eq!(cluster_map(c).volumes[&id].size_bytes, 24 << 30);
    for v in ["race1", "race2"] {
        c.must_scli(&["--remove_volume", "--volume_name", v, "--i_am_sure"]);
    }
}
