//! Issue 20 (plugin defects) against a real Docker engine: names Docker makes that the MDM's
//! 31-character limit used to refuse (anonymous volumes, Compose's `<project>_<volume>`),
//! collisions of derived cluster names, `CreatedAt`, `docker volume prune -a` beside a volume
//! made with scli and mapped to this host, and Remove of a volume already gone (twice, and from
//! a second host). Real mdm, sds, sdc and dockerd processes (see `meshblock_tests::docker`).

use meshblock_tests::docker::*;
use meshblock_tests::*;
use proto::docker::cluster_name;
use std::time::Duration;

/// The plugin's answer to Get: (Err, Volume).
fn get(p: &PluginSdc, name: &str) -> (String, serde_json::Value) {
    let (_, body) = p.call("VolumeDriver.Get", &format!(r#"{{"Name":"{name}"}}"#));
    let j: serde_json::Value = serde_json::from_str(&body).expect("Get answers JSON");
    (
        j["Err"].as_str().unwrap_or("").to_string(),
        j["Volume"].clone(),
    )
}

/// The plugin's answer to `endpoint` for `name` with no options: its Err.
fn call_err(p: &PluginSdc, endpoint: &str, name: &str) -> String {
    let (_, body) = p.call(endpoint, &format!(r#"{{"Name":"{name}"}}"#));
    let j: serde_json::Value = serde_json::from_str(&body).expect("JSON answer");
    j["Err"].as_str().unwrap_or("?").to_string()
}

/// The Docker name recorded on cluster volume `cname`, if it exists.
fn docker_name_of(c: &Cluster, cname: &str) -> Option<String> {
    let map = cluster_map(c);
    let v = map.volume_by_name(cname)?;
    Some(proto::docker::held_name(v))
}

/// Anonymous volumes (64 hex characters), Compose-style and 300-character names work end to
/// end; Get and List answer with the Docker name and a `CreatedAt`; scli shows the link; a
/// derived cluster name taken by another volume is refused with a clear error, changing
/// nothing; `docker volume prune -a` leaves an scli volume mapped to this host alone.
#[test]
fn long_and_anonymous_names_created_at_and_prune() {
    names_created_at_and_prune(Kind::Legacy);
}

#[test]
fn managed_plugin_long_names_created_at_and_prune() {
    names_created_at_and_prune(Kind::Managed);
}

fn names_created_at_and_prune(kind: Kind) {
    let s = Setup::start_kind("docker-names", kind);
    require("qemu-io").expect("qemu-io");
    let drv = s.drv();
    let p = s.plugin();
    let c = &s.d.c;
    let uri = s.d.uri("vol1");
    let verify = ["read -P 0xc3 0 2M", "read -P 0x3c 64M 1M"];
    must_qemu_io(
        &uri,
        &["write -P 0xc3 0 2M", "write -P 0x3c 64M 1M", "flush"],
    );

    // Compose: <project>_<volume>, longer than 31 characters.
    let compose = "meshblock-compose-project_postgres-data";
    let cname = cluster_name(compose);
    assert_ne!(cname, compose);
    let before = proto::clock::now_unix();
    s.docker().must(&[
        "volume",
        "create",
        "--driver",
        &drv,
        "--opt",
        "size=256MiB",
        compose,
    ]);
    let after = proto::clock::now_unix();
    assert_eq!(docker_name_of(c, &cname).as_deref(), Some(compose));
    s.run(compose, "echo compose > /data/f && sync");
    assert!(!is_mounted(&s.mountpoint(&cname)));
    assert_eq!(s.run(compose, "cat /data/f").trim(), "compose");
    let ls = s
        .docker()
        .must(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(ls.lines().any(|l| l == format!("{drv} {compose}")), "{ls}");

    // CreatedAt: the MDM leader's time of the create, RFC 3339, in Get and List and so in
    // `docker volume inspect`.
    let (err, vol) = get(p, compose);
    assert_eq!(err, "");
    let created = vol["CreatedAt"].as_str().unwrap_or("").to_string();
    assert!(
        created.as_str() >= proto::clock::rfc3339(before).as_str()
            && created.as_str() <= proto::clock::rfc3339(after).as_str(),
        "CreatedAt {created:?} outside [{before}, {after}]"
    );
    assert_eq!(vol["Status"]["cluster_volume"], cname.as_str(), "{vol}");
    let (_, list) = p.call("VolumeDriver.List", "{}");
    let list: serde_json::Value = serde_json::from_str(&list).expect("List JSON");
    let listed = list["Volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["Name"] == compose).cloned())
        .expect("List has the Docker name");
    assert_eq!(listed["CreatedAt"], created.as_str(), "{listed}");
    let inspect = s.docker().must(&["volume", "inspect", compose]);
    let j: serde_json::Value = serde_json::from_str(&inspect).expect("inspect json");
    assert_eq!(j[0]["CreatedAt"], created.as_str(), "{inspect}");

    // scli shows the link both ways, and finds the volume by its Docker name too.
    let q = c.must_scli(&["--query_volume", "--volume_name", &cname]);
    assert!(
        q.stdout.contains(&format!("Docker volume: {compose}")) && q.stdout.contains("Created: "),
        "{}",
        q.stdout
    );
    let q = c.must_scli(&["--query_volume", "--volume_name", compose, "--json"]);
    assert_eq!(q.json()["name"], cname.as_str(), "{}", q.stdout);
    assert_eq!(q.json()["docker_name"], compose, "{}", q.stdout);
    let q = c.must_scli(&["--query_all_volumes"]);
    assert!(
        q.stdout.contains(&format!("Docker volume: {compose}")),
        "{}",
        q.stdout
    );

    // An anonymous volume: Docker names it with 64 hex characters.
    s.docker().must(&[
        "run",
        "--name",
        "anon",
        "--network",
        "none",
        "--volume-driver",
        &drv,
        "-v",
        "/data",
        &s.image,
        "sh",
        "-c",
        "echo anon > /data/f && sync",
    ]);
    let anon = s
        .docker()
        .must(&["inspect", "-f", "{{range .Mounts}}{{.Name}}{{end}}", "anon"])
        .trim()
        .to_string();
    assert!(
        anon.len() == 64 && anon.chars().all(|c| c.is_ascii_hexdigit()),
        "{anon:?}"
    );
    assert_eq!(
        docker_name_of(c, &cluster_name(&anon)).as_deref(),
        Some(anon.as_str())
    );
    assert_eq!(s.run(&anon, "cat /data/f").trim(), "anon");

    // A name of 300 characters (Docker sets no limit; the driver takes up to 1024).
    let long = format!("l{}", "o".repeat(298) + "g");
    s.docker().must(&[
        "volume",
        "create",
        "--driver",
        &drv,
        "--opt",
        "size=64MiB",
        &long,
    ]);
    assert_eq!(docker_name_of(c, &cluster_name(&long)), Some(long.clone()));
    let (err, vol) = get(p, &long);
    assert_eq!(
        (err.as_str(), vol["Name"].as_str()),
        ("", Some(long.as_str()))
    );
    s.docker().must(&["volume", "rm", &long]);
    assert_eq!(docker_name_of(c, &cluster_name(&long)), None);
    // Longer than the driver takes: refused, nothing made.
    let volumes = cluster_map(c).volumes.len();
    let e = call_err(p, "VolumeDriver.Create", &"x".repeat(1025));
    assert!(e.contains("too long"), "{e}");
    assert_eq!(cluster_map(c).volumes.len(), volumes);

    // Collisions: a cluster volume with the derived name that holds another Docker name.
    let wanted = "collision-check-project_some-volume";
    let taken = cluster_name(wanted);
    c.must_scli(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--volume_name",
        &taken,
        "--size_gb",
        "1",
    ]);
    let o = s
        .docker()
        .cli(&["volume", "create", "--driver", &drv, wanted]);
    assert!(!o.ok, "created over an scli volume");
    assert!(
        o.stderr.contains("not created by Docker") && o.stderr.contains("choose another name"),
        "{}",
        o.stderr
    );
    c.must_scli(&["--remove_volume", "--i_am_sure", "--volume_name", &taken]);
    // The derived name used as a Docker name of its own (31 characters: its own cluster name).
    assert_eq!(cluster_name(&taken), taken);
    assert_eq!(call_err(p, "VolumeDriver.Create", &taken), "");
    for ep in [
        "VolumeDriver.Create",
        "VolumeDriver.Get",
        "VolumeDriver.Remove",
        "VolumeDriver.Mount",
    ] {
        let e = call_err(p, ep, wanted);
        assert!(e.contains("already holds the Docker volume"), "{ep}: {e}");
    }
    assert_eq!(docker_name_of(c, &taken).as_deref(), Some(taken.as_str()));
    assert_eq!(call_err(p, "VolumeDriver.Remove", &taken), "");

    // Prune beside vol1, made with scli and mapped to this host. Docker learns of vol1 when
    // asked for it by this driver (it adopts what the driver's Get finds).
    let adopt = s
        .docker()
        .cli(&["volume", "create", "--driver", &drv, "vol1"]);
    let mut o = s.docker().cli(&["volume", "prune", "-a", "-f"]);
    if o.stderr.contains("unknown shorthand flag: 'a'") {
        // Docker before 23 has no -a: its prune takes every unused volume, named ones too.
        o = s.docker().cli(&["volume", "prune", "-f"]);
    }
    assert!(o.ok, "{}{}", o.stdout, o.stderr);
    let map = cluster_map(c);
    assert!(
        map.volume_by_name("vol1").is_some(),
        "prune removed vol1 (docker volume create vol1: {adopt:?})"
    );
    assert_eq!(s.volume_mappings("vol1"), 1, "vol1 lost its scli mapping");
    assert!(p.loops().is_empty());
    must_qemu_io(&uri, &verify);
    // Whatever Docker's version prunes, the plugin itself never removes it.
    let e = call_err(p, "VolumeDriver.Remove", "vol1");
    assert!(e.contains("not created by Docker"), "{e}");
    must_qemu_io(&uri, &verify);

    // Docker's own volumes go as Docker asks (those prune left).
    s.docker().must(&["rm", "-v", "anon"]);
    for name in [compose, anon.as_str()] {
        let _ = s.docker().cli(&["volume", "rm", name]);
        wait_for(
            "the Docker volume to leave the cluster",
            Duration::from_secs(20),
            || {
                docker_name_of(c, &cluster_name(name))
                    .is_none()
                    .then_some(())
            },
        );
    }
}

/// Remove succeeds for a volume already gone: twice on one host, and from a second host's
/// Docker after the first removed it (global scope: every host's dockerd may send it).
#[test]
fn remove_of_a_volume_already_gone_succeeds() {
    let s = Setup::start("docker-rm-gone");
    let c = &s.d.c;
    let (mut sdc2, host2) = PluginSdc::spawn_host(c, "host2", None);
    let docker2 = Dockerd::start(&c.dir.join("docker2"), None, &[]);
    let name = "two-hosts-share-this-volume_data";
    let cname = cluster_name(name);

    s.docker().must(&[
        "volume",
        "create",
        "--driver",
        &s.drv(),
        "--opt",
        "size=128MiB",
        name,
    ]);
    // Host 2's Docker takes the volume up through its own plugin (Get finds it).
    docker2.must(&[
        "volume",
        "create",
        "--driver",
        &host2.driver,
        "--opt",
        "size=128MiB",
        name,
    ]);
    let inspect = docker2.must(&["volume", "inspect", name]);
    assert!(inspect.contains(&host2.driver), "{inspect}");
    assert_eq!(docker_name_of(c, &cname).as_deref(), Some(name));

    s.docker().must(&["volume", "rm", name]);
    assert_eq!(docker_name_of(c, &cname), None);
    // Host 2's Docker still lists it in its own records; its rm reaches the plugin, which
    // finds it gone: removed, not an error.
    let o = docker2.cli(&["volume", "rm", name]);
    assert!(o.ok, "host 2's rm of a volume already gone: {}", o.stderr);
    let ls = docker2.must(&["volume", "ls", "--format", "{{.Driver}} {{.Name}}"]);
    assert!(
        !ls.lines().any(|l| l == format!("{} {name}", host2.driver)),
        "{ls}"
    );
    // Twice more through the API, and a name that never existed.
    for n in [name, name, "never-made"] {
        assert_eq!(call_err(s.plugin(), "VolumeDriver.Remove", n), "", "{n}");
        assert_eq!(call_err(&host2, "VolumeDriver.Remove", n), "", "{n}");
    }
    // Get says it is gone (once the map host 2 follows shows it).
    wait_for(
        "host 2's Get to find the volume gone",
        Duration::from_secs(10),
        || get(&host2, name).0.contains("does not exist").then_some(()),
    );

    drop(docker2);
    PluginSdc::stop_proc(&mut sdc2);
    drop(host2);
}
