//! The Docker volume driver against a real Docker engine (a private dockerd per test), and the
//! SDC's attach layer (`sdc attach|detach|list`: FUSE file + loop device). Real mdm, sds and
//! sdc processes; real mkfs, mount, losetup, docker.

use meshblock_tests::docker::*;
use meshblock_tests::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[test]
fn docker_volume_lifecycle() {
    volume_lifecycle(Kind::Legacy);
}

#[test]
fn managed_plugin_volume_lifecycle() {
    volume_lifecycle(Kind::Managed);
}

fn volume_lifecycle(kind: Kind) {
    let s = Setup::start_kind("docker-life", kind);
    let drv = s.drv();
    s.docker().must(&[
        "volume",
        "create",
        "--driver",
        &drv,
        "--opt",
        "size=1GiB",
        "--opt",
        "fstype=ext4",
        "v1",
    ]);
    let q =
        s.d.c
            .must_scli(&["--query_volume", "--volume_name", "v1", "--json"]);
    assert!(q.stdout.contains("v1"), "{}", q.stdout);

    s.run("v1", "echo hello > /data/f && sync");
    // Released after the container: unmounted, detached, unmapped.
    assert!(!is_mounted(&s.mountpoint("v1")));
    assert_eq!(s.volume_mappings("v1"), 0);
    assert!(s.plugin().loops().is_empty());
    let out = s.run("v1", "cat /data/f");
    assert_eq!(out.trim(), "hello");

    let ls = s
        .docker()
        .must(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(ls.lines().any(|l| l == format!("{drv} v1")), "{ls}");
    let inspect = s.docker().must(&["volume", "inspect", "v1"]);
    let j: serde_json::Value = serde_json::from_str(&inspect).expect("inspect json");
    assert_eq!(j[0]["Driver"], drv.as_str());
    assert_eq!(j[0]["Status"]["size_bytes"], 1u64 << 30, "{inspect}");
    assert_eq!(j[0]["Status"]["fstype"], "ext4", "{inspect}");
    assert_eq!(j[0]["Scope"], "global", "{inspect}");

    s.docker().must(&["volume", "rm", "v1"]);
    let q = s.d.c.scli_raw(&["--query_volume", "--volume_name", "v1"]);
    assert!(!q.ok, "v1 still exists in the cluster: {}", q.stdout);

    // xfs too, and a volume created by Docker on first use.
    s.docker().must(&[
        "volume",
        "create",
        "--driver",
        &drv,
        "--opt",
        "size=500MiB",
        "--opt",
        "fstype=xfs",
        "vx",
    ]);
    s.run("vx", "echo x > /data/x && sync");
    let mp = s.mountpoint("vx");
    assert!(!is_mounted(&mp));
    let out = s.run("vx", "cat /data/x");
    assert_eq!(out.trim(), "x");
    s.docker().must(&["volume", "rm", "vx"]);
}

#[test]
fn docker_create_refuses_bad_options() {
    create_refuses_bad_options(Kind::Legacy);
}

#[test]
fn managed_plugin_refuses_bad_options() {
    create_refuses_bad_options(Kind::Managed);
}

fn create_refuses_bad_options(kind: Kind) {
    let s = Setup::start_kind("docker-bad", kind);
    let drv = s.drv();
    let create = |name: &str, opts: &[&str]| {
        let mut args = vec!["volume", "create", "--driver", drv.as_str()];
        for o in opts {
            args.extend(["--opt", o]);
        }
        args.push(name);
        s.docker().cli(&args)
    };
    for (opts, needle) in [
        (&["colour=blue"][..], "unknown option"),
        (&["size=big"], "size"),
        (&["size=1GiB", "fstype=ntfs"], "fstype"),
        (&["thin", "thick"], "contradict"),
        (&["iops_limit=3"], "iops_limit"),
        (&["size=1TiB", "thick"], "capacity"),
        (&["pool=nope"], "storage pool nope does not exist"),
    ] {
        let o = create("bad", opts);
        assert!(!o.ok, "{opts:?} accepted");
        assert!(o.stderr.contains(needle), "{opts:?}: {}", o.stderr);
        let q = s.d.c.scli_raw(&["--query_volume", "--volume_name", "bad"]);
        assert!(!q.ok, "{opts:?} created a volume");
        let ls = s.docker().must(&["volume", "ls", "-q"]);
        assert!(!ls.lines().any(|l| l == "bad"), "{opts:?}: {ls}");
    }
    // Same options again: fine (idempotent).
    assert!(create("v2", &["size=1GiB", "fstype=xfs"]).ok);
    assert!(create("v2", &["size=1GiB", "fstype=xfs"]).ok);
    // An existing name with other options: the driver refuses. Docker itself never sends
    // that Create: it asks the driver's Get first and adopts an existing volume whatever the
    // options (moby volume/service/store.go: `vd.Get(name)` before `vd.Create`), so this is
    // checked through the plugin API, as another host's Docker (or an older one) would call it.
    let create_api = |opts: &str| {
        s.plugin()
            .call(
                "VolumeDriver.Create",
                &format!(r#"{{"Name":"v3","Opts":{{{opts}}}}}"#),
            )
            .1
    };
    assert_eq!(
        create_api(r#""size":"1GiB","fstype":"xfs""#),
        r#"{"Err":""}"#
    );
    assert_eq!(
        create_api(r#""size":"1GiB","fstype":"xfs""#),
        r#"{"Err":""}"#
    );
    assert_eq!(create_api(""), r#"{"Err":""}"#, "no options fit anything");
    let e = create_api(r#""size":"2GiB""#);
    assert!(e.contains("already exists with different options"), "{e}");
    let e = create_api(r#""fstype":"ext4","thick":"""#);
    assert!(e.contains("fstype") && e.contains("thin"), "{e}");
    let map = cluster_map(&s.d.c);
    assert_eq!(map.volume_by_name("v3").expect("v3").size_bytes, 1 << 30);
    assert_eq!(
        map.volume_by_name("v3").expect("v3").labels["fstype"],
        "xfs"
    );
    s.docker().must(&["volume", "rm", "v3"]);
    s.docker().must(&["volume", "rm", "v2"]);
}

/// An NBD client holding a volume's export open (qemu-io sleeping after one read); killed on
/// drop, pass or fail.
struct NbdClient(std::process::Child);

impl NbdClient {
    /// Connects to `uri` and returns once the connection serves requests.
    fn hold(uri: &str, out: &Path) -> NbdClient {
        let log = std::fs::File::create(out).expect("qemu-io output file");
        let err = log.try_clone().expect("qemu-io output file");
        // Line-buffered, so the read's report shows while qemu-io still sleeps.
        let child = std::process::Command::new("stdbuf")
            .args(["-oL", "qemu-io", "-f", "raw", uri])
            .args(["-c", "read 0 512", "-c", "sleep 600000"])
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start qemu-io");
        let c = NbdClient(child);
        wait_for(
            "qemu-io connected and read",
            Duration::from_secs(20),
            || {
                let text = std::fs::read_to_string(out).unwrap_or_default();
                assert!(!text.contains("failed"), "qemu-io: {text}");
                text.contains("read 512/512").then_some(())
            },
        );
        c
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 18 item 7: Docker destroys nothing it did not create. `vol1` is made with scli and
/// mapped to this very host (as `DataCluster` does) and written over NBD: Docker does not list
/// it, and `docker volume rm`, `docker volume prune -a -f` and a container's mount leave it,
/// its mapping and its data alone, saying why. A Docker volume that something outside Docker
/// uses on this host (a mapping made with scli, an NBD client) is refused until that ends.
#[test]
fn docker_leaves_volumes_it_did_not_create_alone() {
    leaves_volumes_it_did_not_create_alone(Kind::Legacy);
}

#[test]
fn managed_plugin_leaves_volumes_it_did_not_create_alone() {
    leaves_volumes_it_did_not_create_alone(Kind::Managed);
}

fn leaves_volumes_it_did_not_create_alone(kind: Kind) {
    let s = Setup::start_kind("docker-foreign", kind);
    require("qemu-io").expect("qemu-io");
    require("stdbuf").expect("stdbuf");
    let drv = s.drv();
    let uri = s.d.uri("vol1");
    let verify = ["read -P 0xa5 0 4M", "read -P 0x5a 100M 1M"];
    must_qemu_io(
        &uri,
        &["write -P 0xa5 0 4M", "write -P 0x5a 100M 1M", "flush"],
    );
    must_qemu_io(&uri, &verify);
    // Docker's own unused volume beside it.
    s.docker().must(&[
        "volume",
        "create",
        "--driver",
        &drv,
        "--opt",
        "size=256MiB",
        "mine",
    ]);

    let ls = s
        .docker()
        .must(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(ls.lines().any(|l| l == format!("{drv} mine")), "{ls}");
    assert!(
        !ls.lines().any(|l| l == format!("{drv} vol1")),
        "Docker lists an scli volume: {ls}"
    );
    // Docker resolves a name without a driver by asking every plugin it finds, and legacy
    // plugins' sockets in /run/docker/plugins are every dockerd's: other tests' plugins (whose
    // clusters have a vol1 too) could answer first. Let Docker learn of vol1 from this driver,
    // as a user's `docker volume create --driver` of an existing name does (Docker adopts what
    // the driver's Get finds).
    let adopt = s
        .docker()
        .cli(&["volume", "create", "--driver", &drv, "vol1"]);
    let o = s.docker().cli(&["volume", "rm", "vol1"]);
    assert!(!o.ok, "docker volume rm vol1 succeeded (create: {adopt:?})");
    assert!(o.stderr.contains("not created by Docker"), "{}", o.stderr);
    // No container gets it either: a first mount makes a filesystem on a blank-looking device.
    let o = s.docker().cli(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--mount",
        &format!("type=volume,src=vol1,dst=/data,volume-driver={drv}"),
        &s.image,
        "true",
    ]);
    assert!(!o.ok, "a container mounted vol1: {}", o.stdout);
    assert!(o.stderr.contains("not created by Docker"), "{}", o.stderr);
    // Docker prunes only its `local` driver's volumes (moby's VolumesService.Prune filters
    // by the default driver), so prune never reaches a plugin, this one or another test's.
    let mut o = s.docker().cli(&["volume", "prune", "-a", "-f"]);
    if o.stderr.contains("unknown shorthand flag: 'a'") {
        // Docker before 23 has no -a: its prune removes every unused volume, named ones too.
        o = s.docker().cli(&["volume", "prune", "-f"]);
    }
    assert!(o.ok, "{}{}", o.stdout, o.stderr);

    let map = cluster_map(&s.d.c);
    assert!(
        map.volume_by_name("mine").is_some(),
        "prune reached the plugin"
    );
    assert!(map.volume_by_name("vol1").is_some(), "vol1 was removed");
    assert_eq!(s.volume_mappings("vol1"), 1, "vol1 lost its scli mapping");
    assert!(s.plugin().loops().is_empty());
    must_qemu_io(&uri, &verify);
    s.docker().must(&["volume", "rm", "mine"]);

    // A Docker volume mapped to this host with scli: not Docker's mapping to undo.
    s.docker().must(&[
        "volume",
        "create",
        "--driver",
        &drv,
        "--opt",
        "size=256MiB",
        "dm",
    ]);
    let map_args = ["--volume_name", "dm", "--sdc_name", "sdc1"];
    s.d.c
        .must_scli(&[&["--map_volume_to_sdc"][..], &map_args].concat());
    let o = s.docker().cli(&["volume", "rm", "dm"]);
    assert!(!o.ok, "docker volume rm dm succeeded");
    assert!(
        o.stderr.contains("mapped to this host outside Docker"),
        "{}",
        o.stderr
    );
    assert_eq!(s.volume_mappings("dm"), 1);
    s.d.c
        .must_scli(&[&["--unmap_volume_from_sdc"][..], &map_args].concat());
    s.docker().must(&["volume", "rm", "dm"]);

    // Docker's own mapping with an NBD client on it: the last Unmount detaches Docker's
    // device but keeps the mapping, and rm waits for the client to go.
    s.docker().must(&[
        "volume",
        "create",
        "--driver",
        &drv,
        "--opt",
        "size=256MiB",
        "dn",
    ]);
    let cid = s
        .docker()
        .must(&[
            "run",
            "-d",
            "--network",
            "none",
            "-v",
            "dn:/data",
            &s.image,
            "sleep",
            "600",
        ])
        .trim()
        .to_string();
    wait_export(&s.d.uri("dn"));
    let client = NbdClient::hold(&s.d.uri("dn"), &s.d.c.dir.join("qemu-io-dn.txt"));
    s.docker().must(&["rm", "-f", &cid]);
    assert!(!is_mounted(&s.mountpoint("dn")));
    assert!(s.plugin().loops().is_empty());
    assert_eq!(s.volume_mappings("dn"), 1, "unmapped under an NBD client");
    let o = s.docker().cli(&["volume", "rm", "dn"]);
    assert!(!o.ok, "docker volume rm dn succeeded under an NBD client");
    assert!(o.stderr.contains("NBD client"), "{}", o.stderr);
    drop(client);
    wait_for(
        "docker volume rm dn once its NBD client left",
        Duration::from_secs(20),
        || s.docker().cli(&["volume", "rm", "dn"]).ok.then_some(()),
    );
    assert!(cluster_map(&s.d.c).volume_by_name("dn").is_none());
    must_qemu_io(&uri, &verify);
}

#[test]
fn plugin_http_api_directly() {
    let mut s = Setup::start("docker-http");
    let p = s.plugin.take().expect("plugin");
    let (code, body) = p.call("Plugin.Activate", "");
    assert_eq!((code, body.contains("VolumeDriver")), (200, true), "{body}");
    let (_, body) = p.call("VolumeDriver.Capabilities", "{}");
    assert!(body.contains("\"global\""), "{body}");

    // Malformed JSON, wrong shapes, unknown endpoints: clear errors, never a crash.
    for (ep, bad) in [
        ("VolumeDriver.Create", "{\"Name\":"),
        ("VolumeDriver.Mount", "[1,2,3]"),
        ("VolumeDriver.Get", "{\"Nom\":\"x\"}"),
        ("VolumeDriver.Remove", "\u{1}\u{2}garbage"),
    ] {
        let (code, body) = p.call(ep, bad);
        assert_eq!(code, 400, "{ep} {bad:?}: {body}");
        let j: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
        assert!(j["Err"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
    }
    let (code, body) = p.call("VolumeDriver.Explode", "{}");
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("unknown endpoint"), "{body}");

    let (code, body) = p.call(
        "VolumeDriver.Create",
        r#"{"Name":"h1","Opts":{"size":"256MiB"}}"#,
    );
    assert_eq!((code, body.as_str()), (200, r#"{"Err":""}"#));
    let (_, body) = p.call("VolumeDriver.Get", r#"{"Name":"h1"}"#);
    assert!(
        body.contains("\"Name\":\"h1\"") && body.contains("\"Err\":\"\""),
        "{body}"
    );
    let (_, body) = p.call("VolumeDriver.Get", r#"{"Name":"nope"}"#);
    assert!(body.contains("does not exist"), "{body}");
    let (_, body) = p.call("VolumeDriver.List", "{}");
    assert!(body.contains("\"h1\""), "{body}");

    // Mount counted per ID, repeatable with the same ID.
    let mount = |id: &str| {
        let (_, b) = p.call(
            "VolumeDriver.Mount",
            &format!(r#"{{"Name":"h1","ID":"{id}"}}"#),
        );
        let j: serde_json::Value = serde_json::from_str(&b).expect("mount json");
        assert_eq!(j["Err"], "", "{b}");
        PathBuf::from(j["Mountpoint"].as_str().expect("mountpoint"))
    };
    let unmount = |id: &str| {
        let (_, b) = p.call(
            "VolumeDriver.Unmount",
            &format!(r#"{{"Name":"h1","ID":"{id}"}}"#),
        );
        assert_eq!(b, r#"{"Err":""}"#);
    };
    let mp = mount("a");
    assert_eq!(mount("b"), mp);
    assert_eq!(mount("a"), mp);
    assert!(is_mounted(&mp));
    assert_eq!(p.refs()["h1"]["ids"].as_array().map(Vec::len), Some(2));
    let (_, body) = p.call("VolumeDriver.Path", r#"{"Name":"h1"}"#);
    assert!(body.contains(&mp.display().to_string()), "{body}");
    let (_, body) = p.call("VolumeDriver.Remove", r#"{"Name":"h1"}"#);
    assert!(body.contains("in use"), "{body}");
    std::fs::write(mp.join("f"), b"data").expect("write into the mounted volume");
    unmount("a");
    assert!(is_mounted(&mp), "unmounted under the remaining user");
    unmount("b");
    assert!(!is_mounted(&mp));
    unmount("b");
    assert_eq!(s.volume_mappings("h1"), 0);
    let (_, body) = p.call("VolumeDriver.Path", r#"{"Name":"h1"}"#);
    assert!(body.contains("\"Mountpoint\":\"\""), "{body}");
    let (_, body) = p.call("VolumeDriver.Remove", r#"{"Name":"h1"}"#);
    assert_eq!(body, r#"{"Err":""}"#);

    // Still alive and counting.
    assert!(s.d.sdc.alive(), "{}", s.d.sdc.log_text());
    let cmd = s.d.sdc.cmd();
    let at = cmd
        .iter()
        .position(|a| a == "--metrics-listen")
        .expect("metrics flag");
    let metrics = sh("curl", &["-s", &format!("http://{}/metrics", cmd[at + 1])]).stdout;
    assert!(
        metrics.contains("meshblock_sdc_docker_requests_total{endpoint=\"Mount\",result=\"ok\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("result=\"malformed\""), "{metrics}");

    // Get never fails for an existing volume while the MDM is unreachable: from the map the
    // SDC holds, and after an SDC restart from its disk cache.
    let (_, body) = p.call(
        "VolumeDriver.Create",
        r#"{"Name":"h2","Opts":{"size":"64MiB"}}"#,
    );
    assert_eq!(body, r#"{"Err":""}"#);
    let (_, body) = p.call("VolumeDriver.Get", r#"{"Name":"h2"}"#);
    assert!(body.contains("\"Err\":\"\""), "{body}");
    s.d.c.mdms[0].proc.kill();
    let (_, body) = p.call("VolumeDriver.Get", r#"{"Name":"h2"}"#);
    assert!(
        body.contains("\"Name\":\"h2\"") && body.contains("\"Err\":\"\""),
        "{body}"
    );
    s.d.sdc.kill();
    s.d.sdc.start();
    let (_, body) = wait_for("the restarted plugin", Duration::from_secs(20), || {
        let r = p.call("VolumeDriver.Get", r#"{"Name":"h2"}"#);
        (r.0 == 200).then_some(r)
    });
    assert!(
        body.contains("\"Name\":\"h2\"") && body.contains("\"Err\":\"\""),
        "{body}"
    );
    let (_, body) = p.call("VolumeDriver.List", "{}");
    assert!(body.contains("\"h2\""), "{body}");
    let (_, body) = p.call("VolumeDriver.Create", r#"{"Name":"h3"}"#);
    assert!(body.contains("cannot be reached"), "{body}");
    s.d.c.restart(0);
    s.d.c.wait_leader(Duration::from_secs(20));
    p.wait_up();
    let (_, body) = p.call("VolumeDriver.Remove", r#"{"Name":"h2"}"#);
    assert_eq!(body, r#"{"Err":""}"#);
    s.plugin = Some(p);
}

#[test]
fn shared_volume_survives_dockerd_and_sdc_restarts() {
    let mut s = Setup::start("docker-restart");
    let drv = s.drv();
    s.docker().must(&[
        "volume",
        "create",
        "--driver",
        &drv,
        "--opt",
        "size=1GiB",
        "shared",
    ]);
    let img = s.image.clone();
    for c in ["c1", "c2"] {
        s.docker().must(&[
            "run",
            "-d",
            "--name",
            c,
            "--network",
            "none",
            "-v",
            "shared:/data",
            &img,
            "sleep",
            "100000",
        ]);
    }
    let mp = s.mountpoint("shared");
    assert!(is_mounted(&mp));
    assert_eq!(
        s.plugin().refs()["shared"]["ids"].as_array().map(Vec::len),
        Some(2)
    );
    s.docker().must(&["stop", "-t", "0", "c1"]);
    s.docker().must(&["rm", "c1"]);
    assert!(
        is_mounted(&mp),
        "stopping one container unmounted the other's volume"
    );
    assert_eq!(
        s.plugin().refs()["shared"]["ids"].as_array().map(Vec::len),
        Some(1)
    );
    s.docker()
        .must(&["exec", "c2", "sh", "-c", "echo one > /data/one && sync"]);

    // dockerd restart (live-restore): c2 keeps running, nothing is unmounted.
    s.docker.as_mut().expect("dockerd").restart();
    assert!(is_mounted(&mp));
    s.docker()
        .must(&["exec", "c2", "sh", "-c", "echo two > /data/two && sync"]);

    // SDC restart with c2 running: the FUSE keeper holds the connection, the new SDC takes it
    // over; the loop device and the mount carry on, the references are kept.
    PluginSdc::stop_sdc(&mut s.d);
    assert!(
        is_mounted(&mp),
        "the SDC's SIGTERM unmounted a volume in use"
    );
    s.d.sdc.start();
    s.plugin().wait_ready(&s.d);
    s.docker()
        .must(&["exec", "c2", "sh", "-c", "echo three > /data/three && sync"]);
    let out = s
        .docker()
        .must(&["exec", "c2", "cat", "/data/one", "/data/two", "/data/three"]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    assert_eq!(
        s.plugin().refs()["shared"]["ids"].as_array().map(Vec::len),
        Some(1)
    );

    // A crash (SIGKILL) in the middle of a stream of fsynced writes: the kernel resends what
    // the dead SDC had read, the writer sees no error and carries on.
    s.start_fsync_writer("c2");
    s.d.sdc.kill();
    s.d.sdc.start();
    s.plugin().wait_ready(&s.d);
    s.check_fsync_writer("c2");
    s.docker()
        .must(&["exec", "c2", "sh", "-c", "echo four > /data/four && sync"]);

    s.docker().must(&["stop", "-t", "0", "c2"]);
    s.docker().must(&["rm", "c2"]);
    assert!(!is_mounted(&mp));
    assert_eq!(s.volume_mappings("shared"), 0);
    let out = s.run("shared", "cat /data/one /data/four");
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["one", "four"]);
    s.docker().must(&["volume", "rm", "shared"]);
}

#[test]
fn attach_detach_list_cli() {
    require_all();
    let d = DataCluster::start("attach-cli", 3, 1);
    let state = d.c.dir.join("sdc");
    let _cleanup = AttachCleanup(state.clone());
    let sdc = |args: &[&str]| {
        let mut full: Vec<&str> = args.to_vec();
        let st = state.display().to_string();
        full.extend(["--state-dir", &st]);
        sh(&bin("sdc").display().to_string(), &full)
    };
    let admin = state.join("admin.sock");
    wait_for("the SDC's attach layer", Duration::from_secs(30), || {
        admin.exists().then_some(())
    });
    let o = sdc(&["attach", "vol1"]);
    assert!(o.ok, "{}", o.stderr);
    let dev = o.stdout.trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert_eq!(
        sdc(&["attach", "vol1"]).stdout.trim(),
        dev,
        "attach is idempotent"
    );
    let o = sdc(&["list"]);
    assert_eq!(o.stdout.trim(), format!("vol1 {dev}"));
    let size = sh("blockdev", &["--getsize64", &dev]).stdout;
    assert_eq!(size.trim(), (1u64 << 30).to_string());

    // Data written through the device reads back through NBD, and the other way round (no
    // cache in between: the FUSE file is direct I/O).
    let src = d.c.dir.join("pattern");
    std::fs::write(&src, vec![0xabu8; 4 << 20]).expect("pattern");
    let o = sh(
        "dd",
        &[
            &format!("if={}", src.display()),
            &format!("of={dev}"),
            "bs=1M",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ],
    );
    assert!(o.ok, "{}", o.stderr);
    let uri = d.uri("vol1");
    let o = sh("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0xab 0 4M"]);
    assert!(
        o.ok && !o.stdout.contains("failed"),
        "{}{}",
        o.stdout,
        o.stderr
    );
    let o = sh(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xcd 8M 1M",
            "-c",
            "flush",
        ],
    );
    assert!(o.ok, "{}{}", o.stdout, o.stderr);
    let back = d.c.dir.join("back");
    let o = sh(
        "dd",
        &[
            &format!("if={dev}"),
            &format!("of={}", back.display()),
            "bs=1M",
            "skip=8",
            "count=1",
            "iflag=direct",
            "status=none",
        ],
    );
    assert!(o.ok, "{}", o.stderr);
    assert!(
        std::fs::read(&back).expect("back") == vec![0xcdu8; 1 << 20],
        "the loop device reads what NBD wrote"
    );

    // A mounted device is not detached without --force.
    let o = sh("mkfs.ext4", &["-q", "-F", &dev]);
    assert!(o.ok, "{}", o.stderr);
    let mnt = d.c.dir.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mnt");
    let o = sh("mount", &[&dev, &mnt.display().to_string()]);
    assert!(o.ok, "{}", o.stderr);
    std::fs::write(mnt.join("hello"), b"hello").expect("write");
    let o = sdc(&["detach", "vol1"]);
    assert!(!o.ok && o.stderr.contains("mounted"), "{}", o.stderr);
    let o = sh("umount", &[&mnt.display().to_string()]);
    assert!(o.ok, "{}", o.stderr);
    let o = sdc(&["detach", "vol1"]);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(sdc(&["list"]).stdout.trim(), "");
    assert!(loops_under(&state).is_empty());
    let o = sdc(&["detach", "vol1"]);
    assert!(!o.ok && o.stderr.contains("not attached"), "{}", o.stderr);
    let o = sdc(&["attach", "nope"]);
    assert!(!o.ok && o.stderr.contains("does not exist"), "{}", o.stderr);

    // Force: lazily unmounted, detached.
    let o = sdc(&["attach", "vol1"]);
    assert!(o.ok, "{}", o.stderr);
    let dev = o.stdout.trim().to_string();
    let o = sh("mount", &[&dev, &mnt.display().to_string()]);
    assert!(o.ok, "{}", o.stderr);
    assert_eq!(std::fs::read(mnt.join("hello")).expect("read"), b"hello");
    let o = sdc(&["detach", "vol1", "--force"]);
    assert!(o.ok, "{}", o.stderr);
    assert!(!is_mounted(&mnt));

    // Throughput through the loop device, for the record (not asserted).
    let o = sdc(&["attach", "vol1"]);
    assert!(o.ok, "{}", o.stderr);
    let dev = o.stdout.trim().to_string();
    for (what, args) in [
        (
            "write",
            vec![
                "if=/dev/zero".to_string(),
                format!("of={dev}"),
                "oflag=direct".into(),
            ],
        ),
        (
            "read",
            vec![
                format!("if={dev}"),
                "of=/dev/null".into(),
                "iflag=direct".into(),
            ],
        ),
    ] {
        let t = std::time::Instant::now();
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.extend(["bs=1M", "count=256", "status=none"]);
        let o = sh("dd", &a);
        assert!(o.ok, "{}", o.stderr);
        println!(
            "loop device {what}: 256 MiB at {:.0} MiB/s",
            256.0 / t.elapsed().as_secs_f64()
        );
    }
    let o = sdc(&["detach", "vol1"]);
    assert!(o.ok, "{}", o.stderr);
}

/// Undoes an SDC's attach state even if the test fails.
struct AttachCleanup(PathBuf);

impl Drop for AttachCleanup {
    fn drop(&mut self) {
        cleanup_attach_state(&self.0);
    }
}

/// The non-loopback interfaces of a namespace.
fn links_of(ns: &str) -> Vec<String> {
    sh("ip", &["-n", ns, "-o", "link", "show"])
        .stdout
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n != "lo")
        .collect()
}

fn set_links(ns: &str, state: &str) {
    for l in links_of(ns) {
        let o = sh("ip", &["-n", ns, "link", "set", &l, state]);
        assert!(o.ok, "{}", o.stderr);
    }
}

/// Flocker's demo: a container on host A writes; host A dies; on host B the volume is taken
/// over and the data is there; host A comes back with the device still open and can change
/// nothing.
#[test]
fn volume_follows_its_container_to_another_host() {
    require_all();
    let net = match netns::Net::new() {
        Ok(n) => std::sync::Arc::new(n),
        Err(e) => panic!("network namespaces are needed (run as root): {e}"),
    };
    let mut d = DataCluster::start_net("docker-failover", 1, 3, 1, &[], Some(net.clone()));
    // The cluster's own SDC is not a Docker host here.
    d.sdc.kill();
    let node_a = net.node("hosta");
    let node_b = net.node("hostb");
    let (mut sdc_a, host_a) = PluginSdc::spawn_host(&d.c, "hosta", Some(&node_a));
    let (mut sdc_b, host_b) = PluginSdc::spawn_host(&d.c, "hostb", Some(&node_b));
    let mut docker_a = Some(Dockerd::start(
        &d.c.dir.join("docker-a"),
        Some(&format!("/run/netns/{}", node_a.ns)),
        &[],
    ));
    let docker_b = Dockerd::start(
        &d.c.dir.join("docker-b"),
        Some(&format!("/run/netns/{}", node_b.ns)),
        &[],
    );
    let guard = FailoverGuard {
        sdcs: vec![host_a.state_dir.clone(), host_b.state_dir.clone()],
    };
    let img_a = docker_a.as_ref().expect("a").import_busybox();
    let img_b = docker_b.import_busybox();
    let a = || docker_a.as_ref().expect("dockerd A");

    // Host A: create, and a long-running container that writes and syncs.
    a().must(&[
        "volume",
        "create",
        "--driver",
        &host_a.driver,
        "--opt",
        "size=1GiB",
        "v1",
    ]);
    a().must(&[
        "run",
        "-d",
        "--name",
        "ca",
        "--network",
        "none",
        "-v",
        "v1:/data",
        &img_a,
        "sh",
        "-c",
        "echo hello > /data/f && sync && sleep 100000",
    ]);
    wait_for("A's write", Duration::from_secs(30), || {
        let o = a().cli(&["exec", "ca", "cat", "/data/f"]);
        (o.ok && o.stdout.trim() == "hello").then_some(())
    });
    a().must(&["exec", "ca", "sync"]);
    let dev_a = sh(
        &bin("sdc").display().to_string(),
        &[
            "list",
            "--state-dir",
            &host_a.state_dir.display().to_string(),
        ],
    )
    .stdout
    .split_whitespace()
    .nth(1)
    .expect("A's device")
    .to_string();

    // A preemptible volume is taken from a live host at once; the host that lost it can no
    // longer write to it.
    a().must(&[
        "volume",
        "create",
        "--driver",
        &host_a.driver,
        "--opt",
        "size=256MiB",
        "--opt",
        "preempt=true",
        "pv",
    ]);
    a().must(&[
        "run",
        "-d",
        "--name",
        "pa",
        "--network",
        "none",
        "-v",
        "pv:/data",
        &img_a,
        "sh",
        "-c",
        "echo mine > /data/a && sync && sleep 100000",
    ]);
    wait_for("A's write to pv", Duration::from_secs(30), || {
        let o = a().cli(&["exec", "pa", "cat", "/data/a"]);
        (o.ok && o.stdout.trim() == "mine").then_some(())
    });
    let o = docker_b.cli(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--volume-driver",
        &host_b.driver,
        "-v",
        "pv:/data",
        &img_b,
        "cat",
        "/data/a",
    ]);
    assert!(o.ok, "B could not preempt pv: {}", o.stderr);
    assert_eq!(o.stdout.trim(), "mine");
    let o = a().cli(&[
        "exec",
        "pa",
        "dd",
        "if=/dev/zero",
        "of=/data/x",
        "bs=4096",
        "count=1",
        "conv=fsync",
    ]);
    assert!(!o.ok, "host A still wrote to a preempted volume");
    let _ = a().cli(&["rm", "-f", "pa"]);

    // v1 is not preemptible: B gets it only once A is dead.
    let vb = |args: &[&str]| {
        let mut full = vec![
            "run",
            "--rm",
            "--network",
            "none",
            "--volume-driver",
            &host_b.driver,
            "-v",
            "v1:/data",
            &img_b,
        ];
        full.extend_from_slice(args);
        docker_b.cli(&full)
    };
    let ls = docker_b.must(&["volume", "ls", "-q"]);
    assert!(
        ls.lines().any(|l| l == "v1"),
        "B's docker lists the cluster's volumes: {ls}"
    );

    // Host A dies: its SDC is killed and its link goes down.
    sdc_a.kill();
    set_links(&node_a.ns, "down");

    // B takes over once A's session expired, and reads A's data.
    let o = vb(&["cat", "/data/f"]);
    assert!(o.ok, "B could not take v1 over: {}", o.stderr);
    assert_eq!(o.stdout.trim(), "hello");
    // fsync, not sync(2): both "hosts" share this kernel, and a global sync would wait for
    // host A's dirty pages, which cannot be written while A is down.
    let o = vb(&["sh", "-c", "echo from-b | dd of=/data/b conv=fsync"]);
    assert!(o.ok, "{}", o.stderr);

    // A comes back with the device still open under its container: every write is refused.
    set_links(&node_a.ns, "up");
    sdc_a.start();
    host_a.wait_up();
    let o = sh(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={dev_a}"),
            "bs=4096",
            "count=1",
            "oflag=direct",
        ],
    );
    assert!(!o.ok, "host A wrote to a volume taken from it");
    let o = a().cli(&[
        "exec",
        "ca",
        "dd",
        "if=/dev/zero",
        "of=/data/evil",
        "bs=4096",
        "count=16",
        "conv=fsync",
    ]);
    assert!(
        !o.ok,
        "host A's container wrote to a taken volume: {}",
        o.stdout
    );
    let o = vb(&["sh", "-c", "cat /data/f /data/b; ls /data"]);
    assert!(o.ok, "{}", o.stderr);
    let words: Vec<&str> = o.stdout.split_whitespace().collect();
    assert_eq!(&words[..2], ["hello", "from-b"], "{}", o.stdout);
    assert!(!words.contains(&"evil"), "{}", o.stdout);

    // Clean up A's container (its Unmount releases what is left on A).
    let _ = a().cli(&["rm", "-f", "ca"]);
    drop(docker_a.take());
    drop(docker_b);
    PluginSdc::stop_proc(&mut sdc_a);
    PluginSdc::stop_proc(&mut sdc_b);
    drop(host_a);
    drop(host_b);
    drop(guard);
}

/// Undoes both hosts' attach state even if the failover test fails.
struct FailoverGuard {
    sdcs: Vec<PathBuf>,
}

impl Drop for FailoverGuard {
    fn drop(&mut self) {
        for s in &self.sdcs {
            cleanup_attach_state(s);
        }
    }
}
