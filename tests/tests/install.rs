//! Installing a cluster the way operators do: Debian packages built by `packaging/build-debs`,
//! a real `ansible-playbook site.yml` (docker connection) against three systemd hosts that are
//! containers of a private dockerd, then scli from the controller, data through an SDC, a
//! re-run that changes nothing, a rolling `upgrade.yml` under a writer, and a host lost.
//! Broken inventories fail before any host changes.
//!
//! Needs root, ansible, debootstrap and dockerd (`./test` installs them).

use meshblock_tests::docker::{sh, Out};
use meshblock_tests::hosts::Hosts;
use meshblock_tests::{bin, fill, summary, wait_for, wait_for_explained, TestDir};
use serde_json::{json, Value};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The hosts: each runs an MDM, an SDS and an SDC.
const HOSTS: [&str; 3] = ["n1", "n2", "n3"];
/// Size of each SDS device (sparse).
const DEVICE_BYTES: u64 = 8 << 30;
/// What the writer rewrites during the upgrade (records of [`RECORD`] bytes).
const WRITER_REGION: u64 = 64 << 20;
const RECORD: usize = 64 << 10;
/// Records between two fdatasyncs of the writer.
const RECORDS_PER_SYNC: u64 = 8;
/// How long a playbook may take here (two shared cores); a guard against a hang, not a target.
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(1800);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn must_have(program: &str) {
    assert!(
        sh("sh", &["-c", &format!("command -v {program}")]).ok,
        "{program} is not installed; ./test installs it"
    );
}

/// `mdm --version` prints `mdm X.Y.Z`: the version of the binaries.
fn binaries_version() -> String {
    let o = sh(&bin("mdm").display().to_string(), &["--version"]);
    assert!(o.ok, "mdm --version: {}", o.stderr);
    o.stdout
        .split_whitespace()
        .nth(1)
        .expect("a version")
        .to_string()
}

/// Builds the four packages of `version` into `out`.
fn build_debs(version: &str, out: &Path) {
    let bin_dir = bin("mdm").parent().expect("bin dir").display().to_string();
    let script = repo().join("packaging/build-debs");
    let o = sh(
        &script.display().to_string(),
        &[
            "--version",
            version,
            "--bin-dir",
            &bin_dir,
            "--out",
            &out.display().to_string(),
        ],
    );
    assert!(o.ok, "build-debs {version}: {}{}", o.stdout, o.stderr);
    for p in [
        "meshblock-mdm",
        "meshblock-sds",
        "meshblock-sdc",
        "meshblock-scli",
    ] {
        let f = out.join(format!("{p}_{version}_amd64.deb"));
        assert!(f.exists(), "build-debs wrote no {}", f.display());
    }
}

/// One playbook run: its output, exit and wall time, and the recap per host.
struct Run {
    ok: bool,
    output: String,
    secs: f64,
}

impl Run {
    /// `changed=` of each host in the PLAY RECAP.
    fn changed(&self) -> Vec<(String, u64)> {
        let recap = self.output.rsplit("PLAY RECAP").next().unwrap_or("");
        recap
            .lines()
            .filter_map(|l| {
                let (host, rest) = l.split_once(" : ")?;
                let changed = rest
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("changed="))?
                    .parse()
                    .ok()?;
                Some((host.trim().to_string(), changed))
            })
            .collect()
    }

    fn tail(&self) -> String {
        meshblock_tests::log_tail(&self.output, 60)
    }
}

/// The test's controller side: scratch directory, inventory, secrets, scli identity.
struct Controller {
    dir: PathBuf,
    debs_v1: PathBuf,
    version: String,
}

impl Controller {
    fn playbook(&self, name: &str, inventory: &Path, playbook: &str, extra: &[&str]) -> Run {
        let ansible = repo().join("ansible");
        let log = self.dir.join(format!("ansible-{name}.log"));
        let started = Instant::now();
        let mut cmd = Command::new("timeout");
        cmd.arg(PLAYBOOK_TIMEOUT.as_secs().to_string())
            .arg("ansible-playbook")
            .arg("-i")
            .arg(inventory)
            .arg(playbook)
            .args(extra)
            .current_dir(&ansible)
            .env("ANSIBLE_CONFIG", ansible.join("ansible.cfg"))
            .env("ANSIBLE_HOME", self.dir.join("ansible-home"))
            .env("ANSIBLE_LOCAL_TEMP", self.dir.join("ansible-tmp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0");
        let out = cmd.output().expect("run ansible-playbook");
        let secs = started.elapsed().as_secs_f64();
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::write(&log, &output);
        eprintln!(
            "ansible-playbook {playbook} ({name}): {secs:.1} s, exit {:?}, log {}",
            out.status.code(),
            log.display()
        );
        Run {
            ok: out.status.success(),
            output,
            secs,
        }
    }

    fn scli(&self, args: &[&str]) -> Out {
        let out = Command::new(bin("scli"))
            .args(args)
            .env("MESHBLOCK_CERT_DIR", self.dir.join("admin"))
            .env("MESHBLOCK_SCLI_SESSION", self.dir.join("scli-session.json"))
            .output()
            .expect("run scli");
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn must_scli(&self, args: &[&str]) -> String {
        let o = self.scli(args);
        assert!(o.ok, "scli {args:?}: {}{}", o.stdout, o.stderr);
        o.stdout
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let o = self.scli(args);
        o.ok.then(|| serde_json::from_str(&o.stdout).ok()).flatten()
    }

    fn pool_state(&self) -> String {
        self.json(&[
            "--query_storage_pool",
            "--storage_pool_name",
            "sp1",
            "--json",
        ])
        .and_then(|v| v["state"].as_str().map(str::to_string))
        .unwrap_or_default()
    }
}

/// A change that breaks the test's inventory.
type Mutation = Box<dyn FnOnce(&mut Value)>;

/// The inventory of the test: every host in every group, devices as sparse files, fault sets
/// fs1..fs3 round robin. `mutate` breaks it for the bad-input cases.
fn inventory(
    c: &Controller,
    h: &Hosts,
    name: &str,
    debs: &Path,
    mutate: impl FnOnce(&mut Value),
) -> PathBuf {
    let secrets = c.dir.join("secrets");
    let mut all_hosts = serde_json::Map::new();
    let mut sds = serde_json::Map::new();
    let mut names = serde_json::Map::new();
    for (i, host) in h.hosts.iter().enumerate() {
        all_hosts.insert(
            host.name.clone(),
            json!({"ansible_host": host.container, "meshblock_ip": host.ip}),
        );
        names.insert(host.name.clone(), json!({}));
        let devices: Vec<Value> = device_names(i)
            .iter()
            .map(|d| json!({"path": format!("/srv/disks/{d}"), "pool": "sp1"}))
            .collect();
        sds.insert(
            host.name.clone(),
            json!({"meshblock_sds_fault_set": format!("fs{}", i % 3 + 1), "meshblock_sds_devices": devices}),
        );
    }
    let mut inv = json!({
        "all": {
            "hosts": all_hosts,
            "vars": {
                "ansible_connection": "community.docker.docker",
                "ansible_docker_extra_args": format!("-H {}", h.d.host),
                "ansible_python_interpreter": "/usr/bin/python3",
                "meshblock_version": c.version,
                "meshblock_deb_dir": debs.display().to_string(),
                "meshblock_cluster_name": "installtest",
                "meshblock_cluster_mode": "3_node",
                "meshblock_admin_password": format!("{{{{ lookup('ansible.builtin.file', '{}') }}}}", secrets.join("admin-password").display()),
                "meshblock_docker_password": format!("{{{{ lookup('ansible.builtin.file', '{}') }}}}", secrets.join("docker-password").display()),
                "meshblock_protection_domains": [
                    {"name": "pd1", "fault_sets": ["fs1", "fs2", "fs3"], "storage_pools": [{"name": "sp1"}]}
                ],
            },
            "children": {
                "mdm": {"hosts": names.clone()},
                "sds": {"hosts": sds},
                "sdc": {"hosts": names},
            }
        }
    });
    mutate(&mut inv);
    let path = c.dir.join(format!("inventory-{name}.yml"));
    // JSON is YAML: ansible's yaml inventory plugin reads it.
    std::fs::write(&path, serde_json::to_string_pretty(&inv).expect("json")).expect("inventory");
    path
}

/// The SDS devices of host `i`: two on the first host, one on the others.
fn device_names(i: usize) -> Vec<&'static str> {
    if i == 0 {
        vec!["d0", "d1"]
    } else {
        vec!["d0"]
    }
}

/// Asks the SDC's Docker plugin on a host (its socket reached through `/proc/PID/root`).
fn plugin_call(h: &Hosts, i: usize, endpoint: &str, body: &Value) -> Value {
    let sock = h.path_in(i, "/run/docker/plugins/meshblock.sock");
    let o = sh(
        "curl",
        &[
            "-s",
            "--max-time",
            "120",
            "--unix-socket",
            &sock.display().to_string(),
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
            &format!("http://plugin/{endpoint}"),
        ],
    );
    assert!(o.ok, "plugin {endpoint}: {}", o.stderr);
    serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("plugin {endpoint} answered {} ({e})", o.stdout))
}

/// A page-aligned buffer for O_DIRECT.
struct Aligned {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + 4096];
        let off = (4096 - (raw.as_ptr() as usize % 4096)) % 4096;
        Aligned { raw, off, len }
    }
    fn buf(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

/// Record `n`'s content: its number, then a pattern of it.
fn record(n: u64) -> Vec<u8> {
    let mut v = n.to_le_bytes().to_vec();
    v.extend_from_slice(&fill::pattern(n * RECORD as u64, RECORD - 8, 0x01A5_7A11));
    v
}

/// What the writer did: records written and flushed, flushes, the longest flush.
struct WriterReport {
    records: u64,
    flushes: u64,
    longest_flush: Duration,
}

/// Rewrites records over [`WRITER_REGION`] of a file (O_DIRECT), fdatasync after every
/// [`RECORDS_PER_SYNC`], until stopped; ends with a flush. Any error ends it with that error.
fn write_records(path: &Path, stop: &AtomicBool) -> io::Result<WriterReport> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let slots = WRITER_REGION / RECORD as u64;
    let mut buf = Aligned::new(RECORD);
    let mut report = WriterReport {
        records: 0,
        flushes: 0,
        longest_flush: Duration::ZERO,
    };
    // Fill every slot once before stopping, so the check knows each one's last record.
    while !stop.load(Ordering::Relaxed) || report.records < slots {
        let n = report.records;
        buf.buf().copy_from_slice(&record(n));
        f.write_all_at(buf.buf(), (n % slots) * RECORD as u64)?;
        report.records += 1;
        if report.records.is_multiple_of(RECORDS_PER_SYNC) {
            let t = Instant::now();
            f.sync_data()?;
            report.flushes += 1;
            report.longest_flush = report.longest_flush.max(t.elapsed());
        }
    }
    f.sync_data()?;
    report.flushes += 1;
    Ok(report)
}

/// Reads the writer's file back (O_DIRECT) and returns the slots whose content is not their
/// last record.
fn check_records(path: &Path, records: u64) -> io::Result<Vec<u64>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let slots = WRITER_REGION / RECORD as u64;
    let mut buf = Aligned::new(RECORD);
    let mut wrong = Vec::new();
    for s in 0..slots.min(records) {
        let last = s + (records - 1 - s) / slots * slots;
        f.read_exact_at(buf.buf(), s * RECORD as u64)?;
        if buf.buf() != record(last).as_slice() {
            wrong.push(s);
        }
    }
    Ok(wrong)
}

/// Each host's installed Meshblock versions and whether each daemon runs the installed binary.
fn host_versions(h: &Hosts, i: usize) -> (Vec<String>, Vec<String>) {
    let versions = h.must_exec(
        i,
        &[
            "dpkg-query",
            "-W",
            "-f=${Package} ${Version}\n",
            "meshblock-scli",
            "meshblock-mdm",
            "meshblock-sds",
            "meshblock-sdc",
        ],
    );
    let mut stale = Vec::new();
    for d in ["mdm", "sds", "sdc"] {
        let exe = h.must_exec(
            i,
            &[
                "sh",
                "-c",
                &format!("readlink /proc/$(systemctl show -p MainPID --value meshblock-{d})/exe"),
            ],
        );
        if exe.trim() != format!("/usr/bin/{d}") {
            stale.push(format!("{d}: {}", exe.trim()));
        }
    }
    (versions.lines().map(str::to_string).collect(), stale)
}

#[test]
fn ansible_installs_upgrades_and_survives_a_host_loss() {
    if !is_root() {
        eprintln!("skipped: the install test needs root (containers, networks, iptables)");
        return;
    }
    for p in [
        "ansible-playbook",
        "debootstrap",
        "dockerd",
        "curl",
        "losetup",
    ] {
        must_have(p);
    }
    let t = TestDir::new("install");
    let version = binaries_version();
    let bumped = format!("{version}.1");
    let c = Controller {
        dir: t.path.clone(),
        debs_v1: t.join("debs-v1"),
        version: version.clone(),
    };
    build_debs(&version, &c.debs_v1);
    build_debs(&bumped, &t.join("debs-v2"));
    std::fs::create_dir_all(t.join("secrets")).expect("secrets");
    std::fs::write(t.join("secrets/admin-password"), "Admin-Secret-1\n").expect("secret");
    std::fs::write(t.join("secrets/docker-password"), "Docker-Secret-1\n").expect("secret");

    let mut h = Hosts::start(&t.path);
    for name in HOSTS {
        let i = h.add(name);
        for d in device_names(i) {
            let f = std::fs::File::create(h.hosts[i].disks.join(d)).expect("device");
            f.set_len(DEVICE_BYTES).expect("sparse device");
        }
    }

    // Broken inventories: the play fails on the controller with what to fix, hosts untouched.
    let pristine: Vec<Vec<String>> = (0..h.hosts.len()).map(|i| h.fs_changes(i)).collect();
    let bad: [(&str, Mutation, &str); 3] = [
        (
            "sds-without-device",
            Box::new(|v| {
                v["all"]["children"]["sds"]["hosts"]["n2"]["meshblock_sds_devices"] = json!([])
            }),
            "SDS host n2 has no device",
        ),
        (
            "two-mdms-for-5_node",
            Box::new(|v| {
                v["all"]["vars"]["meshblock_cluster_mode"] = json!("5_node");
                v["all"]["children"]["mdm"]["hosts"] = json!({"n1": {}, "n2": {}});
            }),
            "meshblock_cluster_mode 5_node needs exactly 5 hosts in group mdm, the inventory has 2",
        ),
        (
            "undefined-pool",
            Box::new(|v| {
                v["all"]["children"]["sds"]["hosts"]["n3"]["meshblock_sds_devices"][0]["pool"] =
                    json!("sp9")
            }),
            "uses storage pool 'sp9', which meshblock_protection_domains does not define",
        ),
    ];
    for (name, mutate, message) in bad {
        let inv = inventory(&c, &h, name, &c.debs_v1, mutate);
        let r = c.playbook(name, &inv, "site.yml", &[]);
        assert!(!r.ok, "{name}: the play succeeded:\n{}", r.tail());
        assert!(
            r.output.contains(message),
            "{name}: the failure does not say {message:?}:\n{}",
            r.tail()
        );
        assert!(
            !r.output.contains("PLAY [Check the hosts"),
            "{name}: the play went on to the hosts:\n{}",
            r.tail()
        );
    }
    for (i, before) in pristine.iter().enumerate() {
        assert_eq!(
            &h.fs_changes(i),
            before,
            "a broken inventory changed {}",
            h.hosts[i].name
        );
    }

    // The real install.
    let inv = inventory(&c, &h, "good", &c.debs_v1, |_| {});
    let first = c.playbook("first", &inv, "site.yml", &[]);
    assert!(first.ok, "site.yml failed:\n{}", first.tail());
    assert!(
        first
            .changed()
            .iter()
            .filter(|(host, _)| host != "localhost")
            .all(|(_, n)| *n > 0),
        "the first run changed nothing on some host: {:?}",
        first.changed()
    );
    check_configs(&h);

    // scli from the controller: an admin certificate whose key is made here, signed on n1.
    issue_controller_cert(&c, &h);
    let ips: Vec<String> = h.hosts.iter().map(|x| format!("{}:7611", x.ip)).collect();
    c.must_scli(&[
        "--login",
        "--username",
        "admin",
        "--password_file",
        &t.join("secrets/admin-password").display().to_string(),
        "--mdm_ip",
        &ips.join(","),
    ]);
    check_cluster(&c, &h);

    // A volume mapped to n2's SDC: data through its NBD socket.
    c.must_scli(&[
        "--add_volume",
        "--storage_pool_name",
        "sp1",
        "--size_gb",
        "2",
        "--volume_name",
        "vol1",
        "--thin_provisioned",
    ]);
    c.must_scli(&[
        "--map_volume_to_sdc",
        "--volume_name",
        "vol1",
        "--sdc_name",
        "n2",
    ]);
    let nbd = h.path_in(1, "/run/meshblock/nbd.sock");
    wait_for(
        "vol1 exported by n2's SDC",
        Duration::from_secs(120),
        || {
            meshblock_tests::nbd::Nbd::connect(&nbd, "vol1")
                .ok()
                .map(|n| n.disconnect())
        },
    );
    const VOL1_BYTES: u64 = 128 << 20;
    fill::fill_pattern(&nbd, "vol1", 0, VOL1_BYTES, 19).expect("write vol1 through n2");
    let wrong = fill::check_pattern(&nbd, "vol1", 0, VOL1_BYTES, 19).expect("read vol1");
    assert!(wrong.is_empty(), "vol1 reads back wrong at {wrong:?}");

    // The Docker plugin on n1 (user `docker`, role Configure): create and mount a volume.
    let created = plugin_call(
        &h,
        0,
        "VolumeDriver.Create",
        &json!({"Name": "dvol", "Opts": {"size": "1GiB"}}),
    );
    assert_eq!(created["Err"], "", "plugin Create: {created}");
    let vol: Value =
        serde_json::from_str(&c.must_scli(&["--query_volume", "--volume_name", "dvol", "--json"]))
            .expect("query_volume JSON");
    assert_eq!(
        vol["labels"]["created-by"], "docker",
        "dvol is not marked as Docker's: {vol}"
    );
    let mounted = plugin_call(
        &h,
        0,
        "VolumeDriver.Mount",
        &json!({"Name": "dvol", "ID": "install-test"}),
    );
    assert_eq!(mounted["Err"], "", "plugin Mount: {mounted}");
    let mountpoint = mounted["Mountpoint"]
        .as_str()
        .expect("Mountpoint")
        .to_string();
    let data = h.path_in(0, &format!("{mountpoint}/records"));

    // A second run changes nothing.
    let rerun = c.playbook("rerun", &inv, "site.yml", &[]);
    assert!(rerun.ok, "the re-run failed:\n{}", rerun.tail());
    let changed = rerun.changed();
    assert_eq!(changed.len(), HOSTS.len() + 1, "recap: {changed:?}");
    assert!(
        changed.iter().all(|(_, n)| *n == 0),
        "the re-run changed something: {changed:?}\n{}",
        rerun.tail()
    );

    // Rolling upgrade while a writer keeps writing and flushing on n1's Docker volume.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, data) = (stop.clone(), data.clone());
        std::thread::spawn(move || write_records(&data, &stop))
    };
    let inv2 = inventory(&c, &h, "bumped", &t.join("debs-v2"), |v| {
        v["all"]["vars"]["meshblock_version"] = json!(bumped)
    });
    let upgrade = c.playbook("upgrade", &inv2, "upgrade.yml", &[]);
    stop.store(true, Ordering::Relaxed);
    let report = writer
        .join()
        .expect("writer thread")
        .unwrap_or_else(|e| panic!("the writer got an I/O error during the upgrade: {e}"));
    assert!(upgrade.ok, "upgrade.yml failed:\n{}", upgrade.tail());
    let wrong = check_records(&data, report.records).expect("read the records back");
    assert!(
        wrong.is_empty(),
        "{} of the flushed records read back wrong after the upgrade (slots {:?})",
        wrong.len(),
        &wrong[..wrong.len().min(20)]
    );
    for i in 0..h.hosts.len() {
        let (versions, stale) = host_versions(&h, i);
        assert!(
            versions.iter().all(|l| l.ends_with(&format!(" {bumped}"))),
            "{} is not on {bumped}: {versions:?}",
            h.hosts[i].name
        );
        assert!(
            stale.is_empty(),
            "{} runs old binaries: {stale:?}",
            h.hosts[i].name
        );
    }
    check_cluster(&c, &h);

    // A fourth host (SDS and SDC) added to the inventory: a re-run installs it and adds it, the
    // other hosts change nothing, and rebalance moves PGs onto its SDS by itself.
    let n4 = h.add("n4");
    std::fs::File::create(h.hosts[n4].disks.join("d0"))
        .and_then(|f| f.set_len(DEVICE_BYTES))
        .expect("n4's device");
    let inv4 = inventory(&c, &h, "four", &t.join("debs-v2"), |v| {
        v["all"]["vars"]["meshblock_version"] = json!(bumped);
        v["all"]["children"]["mdm"]["hosts"]
            .as_object_mut()
            .expect("mdm hosts")
            .remove("n4");
    });
    let grown = c.playbook("add-host", &inv4, "site.yml", &[]);
    assert!(grown.ok, "site.yml with n4 failed:\n{}", grown.tail());
    for (host, n) in grown.changed() {
        match host.as_str() {
            "n4" => assert!(n > 0, "n4 was not installed:\n{}", grown.tail()),
            _ => assert_eq!(n, 0, "adding n4 changed {host}:\n{}", grown.tail()),
        }
    }
    let n4_id = wait_for("SDS n4 Normal", Duration::from_secs(300), || {
        let v = c.json(&["--query_sds", "--sds_name", "n4", "--json"])?;
        (v["state"] == "Normal").then(|| v["id"].clone())
    });
    let moved = wait_for("PGs moved onto n4", Duration::from_secs(600), || {
        let n = pgs_on(&c, &n4_id);
        (n > 0).then_some(n)
    });
    wait_for(
        "pool sp1 Normal after the rebalance",
        Duration::from_secs(900),
        || (c.pool_state() == "Normal").then_some(()),
    );

    // n3 dies: its SDS goes down, the pool rebuilds onto n1 and n2, the data reads back.
    h.kill(2);
    let killed = Instant::now();
    let degraded = wait_for("pool sp1 to leave Normal", Duration::from_secs(120), || {
        let s = c.pool_state();
        (s != "Normal" && !s.is_empty()).then_some(s)
    });
    let n3_id = wait_for("SDS n3 down", Duration::from_secs(120), || {
        let v = c.json(&["--query_sds", "--sds_name", "n3", "--json"])?;
        (v["state"] == "Down").then(|| v["id"].clone())
    });
    let last = std::cell::RefCell::new(String::new());
    wait_for_explained(
        "pool sp1 rebuilt (Normal, no copy on n3)",
        Duration::from_secs(600),
        || {
            let on_n3 = pgs_on(&c, &n3_id);
            let state = c.pool_state();
            *last.borrow_mut() = format!("state {state}, {on_n3} PGs still on n3");
            (state == "Normal" && on_n3 == 0).then_some(())
        },
        || format!("; last seen: {}", last.borrow()),
    );
    let rebuilt_secs = killed.elapsed().as_secs_f64();
    let wrong = fill::check_pattern(&nbd, "vol1", 0, VOL1_BYTES, 19).expect("read vol1");
    assert!(
        wrong.is_empty(),
        "vol1 reads back wrong after the rebuild: {wrong:?}"
    );
    let wrong = check_records(&data, report.records).expect("read the records back");
    assert!(
        wrong.is_empty(),
        "records wrong after the rebuild: {wrong:?}"
    );

    let unmounted = plugin_call(
        &h,
        0,
        "VolumeDriver.Unmount",
        &json!({"Name": "dvol", "ID": "install-test"}),
    );
    assert_eq!(unmounted["Err"], "", "plugin Unmount: {unmounted}");

    summary(&format!(
        "install: 3 systemd hosts by ansible: site.yml {:.0} s first run, {:.0} s re-run \
         (changed=0); upgrade.yml {:.0} s to {bumped} under a writer ({} records, {} flushes, \
         longest flush {:.1} s, no I/O error, all read back); n4 added by site.yml in {:.0} s \
         (others changed=0, rebalance moved {moved}+ PG copies onto it); host n3 killed: pool \
         {degraded}, rebuilt in {rebuilt_secs:.0} s, data intact",
        first.secs,
        rerun.secs,
        upgrade.secs,
        report.records,
        report.flushes,
        report.longest_flush.as_secs_f64(),
        grown.secs,
    ));
}

/// How many PG copies of all pools the SDS with id `sds` holds (0 when the query fails).
fn pgs_on(c: &Controller, sds: &Value) -> usize {
    let Some(all) = c.json(&["--query_all", "--json"]) else {
        return 0;
    };
    all["state"]["pools"]
        .as_object()
        .map(|pools| {
            pools
                .values()
                .flat_map(|p| p["pgs"].as_array().cloned().unwrap_or_default())
                .filter(|m| m["primary"] == *sds || m["secondary"] == *sds)
                .count()
        })
        .unwrap_or(0)
}

/// Every key of the configuration files the roles wrote is a key of the documented defaults
/// (`docs/config/*.default.toml`): the templates use no key the daemons do not know.
fn check_configs(h: &Hosts) {
    for d in ["mdm", "sds", "sdc"] {
        let defaults: toml::Table =
            std::fs::read_to_string(repo().join(format!("docs/config/{d}.default.toml")))
                .expect("defaults")
                .parse()
                .expect("defaults parse");
        for i in 0..h.hosts.len() {
            let text = h.must_exec(i, &["cat", &format!("/etc/meshblock/{d}.toml")]);
            let file: toml::Table = text
                .parse()
                .unwrap_or_else(|e| panic!("{d}.toml on {} does not parse: {e}", h.hosts[i].name));
            for (k, v) in &file {
                let known = defaults.get(k);
                assert!(
                    known.is_some(),
                    "{d}.toml on {} has unknown key {k}",
                    h.hosts[i].name
                );
                if let (Some(sub), Some(toml::Value::Table(dsub))) = (v.as_table(), known) {
                    for k2 in sub.keys() {
                        assert!(dsub.contains_key(k2), "{d}.toml: unknown key {k}.{k2}");
                    }
                }
            }
        }
    }
}

/// An admin certificate for the controller: the key is made here, only the request goes to
/// the CA on n1 and only the certificate comes back.
fn issue_controller_cert(c: &Controller, h: &Hosts) {
    let admin = c.dir.join("admin");
    let ca = bin("meshblock-ca").display().to_string();
    let o = sh(
        &ca,
        &[
            "csr",
            "--name",
            "admin",
            "--dir",
            &admin.display().to_string(),
        ],
    );
    assert!(o.ok, "meshblock-ca csr: {}{}", o.stdout, o.stderr);
    let n1 = &h.hosts[0].container;
    h.d.must(&[
        "cp",
        &admin.join("node.csr").display().to_string(),
        &format!("{n1}:/root/controller.csr"),
    ]);
    h.must_exec(
        0,
        &[
            "meshblock-ca",
            "sign",
            "--ca-dir",
            "/etc/meshblock/ca",
            "--csr",
            "/root/controller.csr",
            "--out",
            "/root/controller-cert",
        ],
    );
    for f in ["node.pem", "ca.pem"] {
        h.d.must(&[
            "cp",
            &format!("{n1}:/root/controller-cert/{f}"),
            &admin.join(f).display().to_string(),
        ]);
    }
    h.must_exec(
        0,
        &["rm", "-rf", "/root/controller.csr", "/root/controller-cert"],
    );
}

/// The cluster as the playbook should leave it: 3_node Normal with every MDM active, three SDS
/// with their devices in their fault sets, pool sp1 Normal.
fn check_cluster(c: &Controller, h: &Hosts) {
    let last = std::cell::RefCell::new(String::new());
    wait_for_explained(
        "the MDM cluster 3_node, Normal, 3 of 3 active",
        Duration::from_secs(300),
        || {
            let v = c.json(&["--query_cluster", "--json"])?;
            *last.borrow_mut() = v.to_string();
            (v["mode"] == "3_node" && v["state"] == "Normal" && v["active"] == 3 && v["total"] == 3)
                .then_some(())
        },
        || format!("; last: {}", last.borrow()),
    );
    let sds = c
        .json(&["--query_all_sds", "--json"])
        .expect("query_all_sds");
    let sds = sds.as_array().expect("an array of SDS");
    assert_eq!(sds.len(), HOSTS.len(), "SDS: {sds:?}");
    for (i, host) in h.hosts.iter().enumerate() {
        let s = sds
            .iter()
            .find(|s| s["name"] == host.name.as_str())
            .unwrap_or_else(|| panic!("no SDS {}", host.name));
        assert_eq!(s["fault_set_name"], format!("fs{}", i + 1), "SDS {s}");
        let mut paths: Vec<String> = s["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| d["path"].as_str().unwrap_or("").to_string())
            .collect();
        paths.sort();
        let want: Vec<String> = device_names(i)
            .iter()
            .map(|d| format!("/srv/disks/{d}"))
            .collect();
        assert_eq!(paths, want, "devices of SDS {}", host.name);
    }
    wait_for_explained(
        "every SDS Normal with its devices' capacity, pool sp1 Normal",
        Duration::from_secs(300),
        || {
            let all = c.json(&["--query_all_sds", "--json"])?;
            let ready = all.as_array()?.iter().all(|s| {
                s["state"] == "Normal"
                    && s["devices"]
                        .as_array()
                        .is_some_and(|d| d.iter().all(|d| d["capacity_bytes"].as_u64() > Some(0)))
            });
            let pool = c.pool_state();
            *last.borrow_mut() = format!("pool {pool}");
            (ready && pool == "Normal").then_some(())
        },
        || format!("; last: {}", last.borrow()),
    );
}

/// The roles pass ansible-lint (the profile in ansible/.ansible-lint).
#[test]
fn ansible_lint_is_clean() {
    must_have("ansible-lint");
    let t = TestDir::new("ansible-lint");
    let out = Command::new("ansible-lint")
        .args(["--offline", "--nocolor", "-q"])
        .current_dir(repo().join("ansible"))
        .env("HOME", &t.path)
        .env("ANSIBLE_HOME", t.join("ansible-home"))
        .env("ANSIBLE_LOCAL_TEMP", t.join("ansible-tmp"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run ansible-lint");
    assert!(
        out.status.success(),
        "ansible-lint found problems:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
