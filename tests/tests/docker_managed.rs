//! The SDC as Docker's managed plugin (`packaging/build-docker-plugin`, `docker plugin
//! create/set/enable`) against a real dockerd: what only a managed plugin goes through
//! (dockerd restarts with --live-restore, `docker plugin disable/enable`, settings given with
//! `docker plugin set`, and wrong ones). The tests every form of the plugin must pass run
//! against it in `docker.rs` and `docker_names.rs`.

use meshblock_tests::docker::*;
use meshblock_tests::*;
use std::time::{Duration, Instant};

/// Running containers do not notice a dockerd restart (live-restore keeps the plugin's SDC
/// process and its mounts), Docker refuses to disable the plugin while a container uses one of
/// its volumes, and after `disable` and `enable` the volume's data is there.
#[test]
fn managed_plugin_survives_dockerd_restarts_and_disable_enable() {
    let mut s = Setup::start_kind("managed-restart", Kind::Managed);
    let drv = s.drv();
    let m = s.plugin().managed.clone().expect("managed");
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
    s.docker().must(&[
        "run",
        "-d",
        "--name",
        "c2",
        "--network",
        "none",
        "-v",
        "shared:/data",
        &img,
        "sleep",
        "100000",
    ]);
    let mp = s.mountpoint("shared");
    assert!(is_mounted(&mp));
    s.docker()
        .must(&["exec", "c2", "sh", "-c", "echo one > /data/one && sync"]);
    let before = m.pids();
    assert!(!before.is_empty(), "no plugin process");

    // dockerd restart: the plugin's processes and the mount carry on.
    s.docker.as_mut().expect("dockerd").restart();
    assert_eq!(m.pids(), before, "the plugin was restarted with dockerd");
    assert!(is_mounted(&mp));
    s.docker()
        .must(&["exec", "c2", "sh", "-c", "echo two > /data/two && sync"]);

    // Disable while a container uses a volume: Docker's own check refuses it, changing nothing.
    let o = s.docker().cli(&["plugin", "disable", &m.name]);
    assert!(!o.ok, "disable succeeded under a running container");
    assert!(o.stderr.contains("in use"), "{}", o.stderr);
    println!(
        "docker plugin disable with a volume in use: {}",
        o.stderr.trim()
    );
    assert_eq!(m.pids(), before);
    s.docker()
        .must(&["exec", "c2", "sh", "-c", "echo three > /data/three && sync"]);

    // The SDC crashes (SIGKILL) in the middle of a stream of fsynced writes: the plugin's
    // supervisor starts it again, it takes the devices over from the FUSE keeper, and the
    // writer sees no error.
    s.start_fsync_writer("c2");
    let sdc_pid = |m: &Managed| {
        m.pids().into_iter().find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("--child"))
                .unwrap_or(false)
        })
    };
    let crashed = sdc_pid(&m).expect("the plugin's SDC process");
    // SAFETY: kill(2) on the SDC process of this test's plugin.
    unsafe { libc::kill(crashed, libc::SIGKILL) };
    wait_for("the SDC started again", Duration::from_secs(30), || {
        sdc_pid(&m).filter(|p| *p != crashed).map(|_| ())
    });
    let after = s.check_fsync_writer("c2");
    println!("SDC killed in the plugin at write {after}: the writer carried on without an error");

    // Once the container is gone: disable (Docker still counts the volume as a reference to
    // its driver, so an operator passes -f) stops the SDC, which detached what it had.
    s.docker().must(&["rm", "-f", "c2"]);
    assert!(!is_mounted(&mp));
    assert_eq!(s.volume_mappings("shared"), 0);
    let o = s.docker().cli(&["plugin", "disable", &m.name]);
    println!(
        "docker plugin disable with an unused volume: ok={} {}",
        o.ok,
        o.stderr.trim()
    );
    if !o.ok {
        assert!(o.stderr.contains("in use"), "{}", o.stderr);
        s.docker().must(&["plugin", "disable", "-f", &m.name]);
    }
    wait_for(
        "the plugin's processes to end",
        Duration::from_secs(30),
        || m.pids().is_empty().then_some(()),
    );
    let o = s
        .docker()
        .cli(&["volume", "create", "--driver", &drv, "other"]);
    assert!(!o.ok, "a disabled plugin created a volume");

    // Enabled again: same SDC (its GUID kept in the plugin's rootfs), same data.
    s.docker().must(&["plugin", "enable", &m.name]);
    s.plugin().wait_up();
    let out = s.run("shared", "cat /data/one /data/two /data/three");
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["one", "two", "three"]
    );
    let sdcs: Vec<String> = cluster_map(&s.d.c)
        .sdcs
        .values()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(sdcs, ["sdc1"], "the plugin registered as a new SDC");
    s.docker().must(&["volume", "rm", "shared"]);
}

/// Wrong settings: Docker refuses keys the plugin does not have; a plugin whose MDM is unset or
/// unreachable, whose password is wrong or whose certificate is missing still starts, and every
/// Docker command fails at once with what is wrong (also in the plugin's log) instead of
/// hanging. Then, set right, it works.
#[test]
fn managed_plugin_says_what_is_wrong() {
    require_all();
    let mut d = DataCluster::start("managed-bad", 3, 1);
    PluginSdc::stop_sdc(&mut d);
    let docker = Dockerd::start(&d.c.dir.join("docker"), None, &[]);
    let name = format!("mbt{}x{}", std::process::id(), rand::random::<u16>());
    let m = Managed::create(&docker, &name, &d.c.dir.path);
    let mut good = Managed::settings_for(&d.c, "sdc1");
    // Each case below changes one setting of these.
    good.push("FSTYPE=ext4".into());
    let drv = format!("{name}:latest");

    // Keys the plugin does not have: Docker's own check.
    let o = m.set(&docker, &["COLOUR=blue".to_string()]);
    assert!(!o.ok, "an unknown key was accepted");
    println!("unknown key: {}", o.stderr.trim());
    let o = m.set(&docker, &["cert.source=/tmp".to_string()]);
    assert!(!o.ok, "an unknown mount was accepted");

    // A password file that does not exist: Docker cannot make the bind mount, enable fails.
    let missing = d.c.dir.join("no-such-password");
    let mut settings = good.clone();
    settings.push(format!("password.source={}", missing.display()));
    assert!(m.set(&docker, &settings).ok);
    let o = docker.cli(&["plugin", "enable", &name]);
    assert!(!o.ok, "enabled with a missing password file");
    println!("missing password file: {}", o.stderr.trim());

    let empty = d.c.dir.join("empty-certs");
    std::fs::create_dir_all(&empty).expect("empty dir");
    let wrong_pw = d.c.dir.join("wrong-password");
    std::fs::write(&wrong_pw, "not-the-password\n").expect("password file");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("MDM unset", vec!["MDM=".into()], "MDM is not set"),
        ("MDM garbage", vec!["MDM=mdm.example".into()], "not IP:PORT"),
        ("fstype", vec!["FSTYPE=ntfs".into()], "ntfs"),
        (
            "MDM unreachable",
            vec![format!("MDM=127.0.0.1:{}", free_port())],
            "cannot be reached",
        ),
        (
            "no certificate",
            vec![format!("certs.source={}", empty.display())],
            "certificate",
        ),
        (
            "wrong password",
            vec![format!("password.source={}", wrong_pw.display())],
            "wrong username or password",
        ),
    ];
    for (what, change, needle) in cases {
        let mut settings = good.clone();
        settings.extend(change);
        let o = m.set(&docker, &settings);
        assert!(o.ok, "{what}: set: {}", o.stderr);
        docker.must(&["plugin", "enable", &name]);
        let t = Instant::now();
        let o = docker.cli(&["volume", "create", "--driver", &drv, "bad"]);
        let took = t.elapsed();
        assert!(!o.ok, "{what}: a volume was created");
        assert!(o.stderr.contains(needle), "{what}: {}", o.stderr);
        println!(
            "{what}: docker volume create failed in {:.1}s: {}",
            took.as_secs_f64(),
            o.stderr.trim()
        );
        assert!(
            cluster_map(&d.c).volume_by_name("bad").is_none(),
            "{what}: a volume reached the cluster"
        );
        if what != "wrong password" {
            assert!(
                m.log(&docker).contains(needle),
                "{what}: the log does not say it"
            );
        }
        docker.must(&["plugin", "disable", "-f", &name]);
        wait_for("the plugin to stop", Duration::from_secs(30), || {
            m.pids().is_empty().then_some(())
        });
    }

    // Set right: it works.
    assert!(m.set(&docker, &good).ok);
    docker.must(&["plugin", "enable", &name]);
    docker.must(&[
        "volume",
        "create",
        "--driver",
        &drv,
        "--opt",
        "size=64MiB",
        "good",
    ]);
    assert!(cluster_map(&d.c).volume_by_name("good").is_some());
    docker.must(&["volume", "rm", "good"]);
}
