//! Flocker's and REX-Ray's Swarm demo, for real: three dockerd "hosts" (each in a network
//! namespace of its own) in one Swarm, Meshblock's managed volume plugin installed on each under
//! one name, the cluster's MDM and SDS on the same test network. A service's task writes and
//! syncs a known pattern on a plugin volume; the host running it dies (dockerd, shims, the task
//! and the plugin's SDC together); Swarm reschedules the task on another host, whose plugin
//! takes the volume over through the MDM's fencing, and the task reads the pattern back. The
//! dead host, brought back with its dockerd and plugin state, can change nothing on the volume.
//!
//! The other tests fail the host running the task in the other ways README "When a Docker host
//! dies" describes: its network is cut (alive, partitioned), its dockerd dies (the SDC lives),
//! its plugin's SDC or the whole plugin dies (dockerd lives).
//!
//! The kill and the cut print how long each phase took (node down → task rescheduled → volume
//! taken over → container started → data read); no test fails on a duration.

use bytes::Bytes;
use meshblock_tests::docker::{plugin_user, require_all, sh};
use meshblock_tests::swarm::{loops_of, parse_rfc3339, unix_now, Swarm, SwarmNode};
use meshblock_tests::*;
use proto::data::{DataHeader, DataOp};
use proto::ErrorCode;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The plugin's name on every node (each node's dockerd is private: no clash).
const PLUGIN: &str = "meshblock";
/// The service and its volume.
const SERVICE: &str = "db";
/// Lines of the pattern the first task writes (about 600 KiB).
const LINES: u32 = 20_000;

fn pattern() -> String {
    (1..=LINES)
        .map(|i| format!("meshblock swarm demo line {i}\n"))
        .collect()
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The task: the first one writes the pattern (to a temporary file, synced, then renamed and
/// the filesystem synced); any later one finds it and reads it. Each prints what it did, its
/// host and the file's SHA-256, then sleeps.
fn task_script() -> String {
    format!(
        "set -e; if [ -f /data/pattern ]; then \
           echo \"read $(hostname) $(sha256sum /data/pattern | cut -d' ' -f1)\"; \
         else \
           seq 1 {LINES} | sed 's/^/meshblock swarm demo line /' \
             | dd of=/data/pattern.tmp conv=fsync 2>/dev/null; \
           mv /data/pattern.tmp /data/pattern; sync -f /data; \
           echo \"wrote $(hostname) $(sha256sum /data/pattern | cut -d' ' -f1)\"; \
         fi; exec sleep 1000000"
    )
}

/// Assembles the managed plugin (config.json and rootfs/) from the release binaries, or takes
/// the one already assembled in `$MESHBLOCK_DOCKER_PLUGIN_DIR`.
fn build_plugin(out: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("MESHBLOCK_DOCKER_PLUGIN_DIR") {
        return PathBuf::from(dir);
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root");
    let script = repo.join("packaging/build-docker-plugin");
    assert!(
        script.exists() && repo.join("packaging/docker-plugin/config.json").exists(),
        "the managed Docker plugin is not in this tree ({} and packaging/docker-plugin/)",
        script.display()
    );
    let sdc = bin("sdc");
    let bin_dir = sdc.parent().expect("bin dir").display().to_string();
    let o = sh(
        &script.display().to_string(),
        &["--bin-dir", &bin_dir, "--out", &out.display().to_string()],
    );
    assert!(o.ok, "build-docker-plugin: {}{}", o.stdout, o.stderr);
    out.to_path_buf()
}

/// The generation of `volume`'s mapping to SDC `sdc`, if mapped.
fn generation(c: &Cluster, volume: &str, sdc: &str) -> Option<u64> {
    let map = cluster_map(c);
    let v = map.volume_by_name(volume)?;
    let id = map.sdcs.values().find(|x| x.name == sdc)?.id;
    let g = map
        .mappings_of(v.id)
        .find(|m| m.sdc == id)
        .map(|m| m.generation);
    g
}

/// The names of the SDCs `volume` is mapped to.
fn mapped_to(c: &Cluster, volume: &str) -> Vec<String> {
    let map = cluster_map(c);
    let Some(v) = map.volume_by_name(volume) else {
        return Vec::new();
    };
    map.mappings_of(v.id)
        .filter_map(|m| map.sdcs.get(&m.sdc).map(|s| s.name.clone()))
        .collect()
}

/// A 4 KiB write to chunk 0 of `volume`, sent by SDC host `sdc` to its primary, stamped with
/// `fence`.
fn raw_write(
    c: &Cluster,
    sdc: &str,
    volume: &str,
    fence: u64,
) -> Result<Bytes, (ErrorCode, String)> {
    let map = cluster_map(c);
    let v = map.volume_by_name(volume).expect("volume");
    let pool = &map.pools[&v.pool];
    let chunk = proto::ChunkId::new(v.vtree, proto::ChunkIndex(0));
    let pg = chunk.pg(pool.pg_count);
    let primary = pool.pgs[pg.0 as usize].primary.expect("primary");
    let addr = map.sds[&primary].addr.parse().expect("addr");
    let h = DataHeader {
        fence,
        ..DataHeader::at(DataOp::Write, pool.id, pg, pool.epoch, chunk, 0, 4096)
    };
    data_call(c, sdc, addr, &h, Bytes::from(vec![0xee; 4096]))
}

/// What the failover looked like, in seconds after the kill (wall clock; Docker's own
/// timestamps where it has them, else when the test first saw it).
#[derive(Debug, Default)]
struct Phases {
    node_down: f64,
    task_created: f64,
    taken_over: f64,
    container_started: f64,
    data_read: f64,
}

/// The demo's world. Fields drop in order: the Swarm's hosts before the cluster, the network
/// last.
struct Demo {
    swarm: Swarm,
    d: DataCluster,
    _net: std::sync::Arc<netns::Net>,
    /// The service's volume.
    volume: String,
    /// The SHA-256 of the pattern.
    want: String,
}

impl Demo {
    /// A cluster (1 MDM, 3 SDS) and a Swarm of three hosts (node1 the manager) with the
    /// plugin, all on one test network; the service created, its first task's write waited
    /// for. Returns the demo and the node that runs the task (a worker).
    fn start(name: &str) -> (Demo, usize) {
        require_all();
        let net = match netns::Net::new() {
            Ok(n) => std::sync::Arc::new(n),
            Err(e) => panic!("network namespaces are needed (run as root): {e}"),
        };
        let mut d = DataCluster::start_net(name, 1, 3, 1, &[], Some(net.clone()));
        // The cluster's own SDC is not a Docker host here.
        d.sdc.kill();
        let c = &d.c;
        let password = plugin_user(c);
        let plugin_dir = build_plugin(&c.dir.join("plugin"));
        let volume = format!("{name}{}", std::process::id());
        let mut swarm = Swarm::start(&net, &c.dir.join("swarm"), 3);
        swarm.track_volume(&volume);
        swarm.install_plugin(PLUGIN, &plugin_dir, c, &password, &[]);
        let demo = Demo {
            swarm,
            d,
            _net: net,
            volume,
            want: sha256_hex(pattern().as_bytes()),
        };
        demo.create_service();
        let a = demo.wait_first_write();
        (demo, a)
    }

    /// The service: one task on a worker (killing the manager, the Raft leader, would add an
    /// election), restarted anywhere at once.
    fn create_service(&self) {
        let mount = format!(
            "type=volume,source={},target=/data,volume-driver={PLUGIN},volume-opt=size=256MiB",
            self.volume
        );
        let script = task_script();
        self.swarm.manager().must(&[
            "service",
            "create",
            "--detach",
            "--name",
            SERVICE,
            "--no-resolve-image",
            "--network",
            "host",
            "--restart-condition",
            "any",
            "--restart-delay",
            "0s",
            "--stop-grace-period",
            "1s",
            "--constraint",
            "node.role==worker",
            "--mount",
            &mount,
            &self.swarm.image,
            "sh",
            "-c",
            &script,
        ]);
    }

    /// Waits until the first task wrote and synced the pattern; returns its node.
    fn wait_first_write(&self) -> usize {
        let swarm = &self.swarm;
        let (a_name, wrote) = wait_for_explained(
            "the first task to write the pattern",
            Duration::from_secs(120),
            || {
                swarm.nodes.iter().find_map(|n| {
                    let id = n.task_container(SERVICE)?;
                    let line = n
                        .logs(&id)
                        .into_iter()
                        .find(|(_, l)| l.starts_with("wrote "))?;
                    Some((n.name.clone(), line.1))
                })
            },
            || format!("; tasks: {:?}", swarm.tasks(SERVICE)),
        );
        assert_eq!(
            wrote,
            format!("wrote {a_name} {}", self.want),
            "the first task wrote something else"
        );
        swarm.index(&a_name)
    }
}

/// The worker other than `a`.
fn other_worker(swarm: &Swarm, a: usize) -> usize {
    (1..swarm.nodes.len())
        .find(|i| *i != a)
        .expect("another worker")
}

#[test]
fn swarm_service_follows_a_lost_host() {
    let (mut demo, a) = Demo::start("swarmdb");
    let Demo {
        swarm,
        d,
        volume,
        want,
        ..
    } = &mut demo;
    let (c, volume, want) = (&d.c, volume.as_str(), want.as_str());
    let a_name = swarm.nodes[a].name.clone();
    assert_ne!(a, 0, "the task runs on a worker");
    let b = other_worker(swarm, a);
    let b_name = swarm.nodes[b].name.clone();
    let old_generation = generation(c, volume, &a_name).expect("the volume is mapped to A");
    eprintln!("the task runs on {a_name} (mapping generation {old_generation}); {b_name} is the other worker");

    // Host A dies.
    let phases = time_failover(swarm, c, volume, a, b, |swarm| {
        let killed = swarm.kill(a);
        eprintln!(
            "killed {a_name}: {killed} processes (dockerd, containerd, shims, the task, the \
             plugin's SDC)"
        );
    });
    report("worker killed", &phases);
    assert_eq!(mapped_to(c, volume), std::slice::from_ref(&b_name));
    let new_generation = generation(c, volume, &b_name).expect("mapped to B");
    assert_ne!(new_generation, old_generation);

    // Dead A's kernel still has the volume's filesystem mounted and its device open (the
    // plugin's propagated mount): nothing written through it reaches the volume.
    let leftovers = volume_mounts_under(&swarm.nodes[a].dir);
    for m in &leftovers {
        must_not_write(m);
    }
    eprintln!(
        "{a_name}, dead, still has {} mount(s) of the volume; writes through them failed",
        leftovers.len()
    );

    // Host A comes back: its dockerd restarts on the same directories, and with it the plugin,
    // which finds the volume taken over and releases what was left of it: no operator needed.
    let revived = Instant::now();
    swarm.revive(a);
    swarm.wait_plugin_advertised(&a_name, PLUGIN);
    eprintln!("{a_name} is back in {:?}", revived.elapsed());
    wait_for_explained(
        "the revived host's plugin to release its stale mount and device",
        Duration::from_secs(60),
        || {
            (volume_mounts_under(&swarm.nodes[a].dir).is_empty() && loops_of(volume).len() == 1)
                .then_some(())
        },
        || {
            format!(
                "; mounts {:?}, loop devices {:?}\nthe plugin's lines in {a_name}'s dockerd log:\n{}",
                volume_mounts_under(&swarm.nodes[a].dir),
                loops_of(volume),
                plugin_log(&swarm.nodes[a].dir.join("dockerd.log"), 30)
            )
        },
    );
    must_be_fenced(swarm, c, a, b, volume, old_generation, want);

    // The end: the task goes, B's plugin releases the volume.
    swarm.manager().must(&["service", "rm", SERVICE]);
    wait_for(
        "the service's containers to go",
        Duration::from_secs(60),
        || {
            swarm
                .nodes
                .iter()
                .all(|n| n.task_container(SERVICE).is_none())
                .then_some(())
        },
    );
    wait_for(
        "the volume to be released by B",
        Duration::from_secs(60),
        || (!mapped_to(c, volume).contains(&b_name)).then_some(()),
    );
}

/// Does `fail` to node `a` (the host running the task) and times the failover until the task
/// rescheduled on node `b` read the pattern. A thread watches the MDM's map for the takeover
/// meanwhile.
fn time_failover(
    swarm: &mut Swarm,
    c: &Cluster,
    volume: &str,
    a: usize,
    b: usize,
    fail: impl FnOnce(&mut Swarm),
) -> Phases {
    let a_name = swarm.nodes[a].name.clone();
    let b_name = swarm.nodes[b].name.clone();
    let want = sha256_hex(pattern().as_bytes());
    let stop = AtomicBool::new(false);
    let taken_over: Mutex<Option<f64>> = Mutex::new(None);
    let failed_at = unix_now();
    let mut phases = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if mapped_to(c, volume) == std::slice::from_ref(&b_name) {
                    *taken_over.lock().unwrap_or_else(|p| p.into_inner()) = Some(unix_now());
                    return;
                }
                std::thread::park_timeout(Duration::from_millis(50));
            }
        });
        fail(swarm);
        let phases = follow_failover(swarm, &a_name, b, &want, failed_at);
        stop.store(true, Ordering::Relaxed);
        phases
    });
    phases.taken_over = taken_over
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map_or(f64::NAN, |t| t - failed_at);
    phases
}

/// Follows the failover until the rescheduled task on node `b` read the pattern.
fn follow_failover(swarm: &Swarm, a_name: &str, b: usize, want: &str, killed_at: f64) -> Phases {
    let node_b = &swarm.nodes[b];
    let mut p = Phases {
        taken_over: f64::NAN,
        ..Phases::default()
    };
    // Swarm's node-down detection: the node object's update time when it turned down.
    wait_for(
        "the Swarm to see the dead host down",
        Duration::from_secs(60),
        || {
            let (state, at) = swarm.node_state(a_name)?;
            (state == "down")
                .then(|| p.node_down = parse_rfc3339(&at).unwrap_or(f64::NAN) - killed_at)
        },
    );
    let task = wait_for_explained(
        "a task on the other host",
        Duration::from_secs(60),
        || {
            swarm
                .tasks(SERVICE)
                .into_iter()
                .find(|t| t.1 == node_b.name && t.2 == "Running")
                .map(|t| t.0)
        },
        || format!("; tasks: {:?}", swarm.tasks(SERVICE)),
    );
    if let Some((_, _, created)) = swarm.task_times(&task) {
        p.task_created = parse_rfc3339(&created).unwrap_or(f64::NAN) - killed_at;
    }
    let line = wait_for_explained(
        "the rescheduled task to read the pattern",
        Duration::from_secs(120),
        || {
            let id = node_b.task_container(SERVICE)?;
            let (at, line) = node_b
                .logs(&id)
                .into_iter()
                .find(|(_, l)| l.starts_with("read "))?;
            let started = node_b.must(&["inspect", "--format", "{{.State.StartedAt}}", &id]);
            p.container_started = parse_rfc3339(&started).unwrap_or(f64::NAN) - killed_at;
            p.data_read = parse_rfc3339(&at).unwrap_or(f64::NAN) - killed_at;
            Some(line)
        },
        || {
            format!(
                "; tasks: {:?}\nthe plugin's lines in {}'s dockerd log:\n{}",
                swarm.tasks(SERVICE),
                node_b.name,
                plugin_log(node_b.dir.join("dockerd.log").as_path(), 40)
            )
        },
    );
    assert_eq!(
        line,
        format!("read {} {want}", node_b.name),
        "the rescheduled task read something else"
    );
    eprintln!(
        "the plugin's lines in {}'s dockerd log:\n{}",
        node_b.name,
        plugin_log(node_b.dir.join("dockerd.log").as_path(), 20)
    );
    p
}

/// The last `n` lines a plugin wrote to a dockerd log.
fn plugin_log(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("plugin=")).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn report(what: &str, p: &Phases) {
    summary(&format!(
        "swarm failover ({what}; dispatcher heartbeat 1 s, MDM sdc_session_timeout 4 s, plugin \
         takeover_wait 15 s): node down after {:.1} s, task rescheduled at {:.1} s, volume \
         taken over at {:.1} s, container started at {:.1} s, data read at {:.1} s",
        p.node_down, p.task_created, p.taken_over, p.container_started, p.data_read
    ));
}

/// Host `a`, back with its dockerd and plugin state, can change nothing on the volume that
/// node `b`'s task now holds.
fn must_be_fenced(
    swarm: &Swarm,
    c: &Cluster,
    a: usize,
    b: usize,
    volume: &str,
    old_generation: u64,
    want: &str,
) {
    let node_a = &swarm.nodes[a];
    let node_b = &swarm.nodes[b];
    // Every SDS refuses A's old mapping generation.
    let e = raw_write(c, &node_a.name, volume, old_generation)
        .expect_err("a write under A's old mapping generation was accepted");
    assert_eq!(e.0, ErrorCode::Fenced, "{}", e.1);

    // A's plugin cannot take the volume back while B's task holds it.
    let mount = format!("type=volume,source={volume},target=/data,volume-driver={PLUGIN}");
    let o = node_a.cli(&[
        "run",
        "--rm",
        "--network",
        "host",
        "--mount",
        &mount,
        &swarm.image,
        "sh",
        "-c",
        "echo started; echo evil > /data/evil && sync -f /data",
    ]);
    // Refused by the plugin's Mount: the container never starts.
    assert!(
        !o.ok && !o.stdout.contains("started") && o.stderr.contains("error while mounting volume"),
        "{} mounted the volume B holds: {}{}",
        node_a.name,
        o.stdout,
        o.stderr
    );
    eprintln!(
        "{} asked for the volume and was refused: {}",
        node_a.name,
        o.stderr.trim()
    );

    // B's task still reads the pattern, and sees nothing of A's.
    let id = node_b.task_container(SERVICE).expect("B's task");
    let sum = node_b.must(&["exec", &id, "sha256sum", "/data/pattern"]);
    assert_eq!(sum.split_whitespace().next(), Some(want), "{sum}");
    let ls = node_b.must(&["exec", &id, "ls", "/data"]);
    assert!(!ls.split_whitespace().any(|f| f == "evil"), "{ls}");
}

/// A write (with fsync) through `mount`, a dead host's leftover mount of the volume, fails.
fn must_not_write(mount: &Path) {
    let o = sh(
        "timeout",
        &[
            "60",
            "dd",
            "if=/dev/zero",
            &format!("of={}/evil", mount.display()),
            "bs=4096",
            "count=16",
            "conv=fsync",
        ],
    );
    assert!(
        !o.ok,
        "a write through the dead host's mount {} succeeded",
        mount.display()
    );
}

/// ext4 and xfs mounts under `dir` (a node's leftover volume filesystems).
fn volume_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let src = r.next()?;
            let at = PathBuf::from(left.split(' ').nth(4)?);
            let ours = at.starts_with(dir)
                && matches!(fstype, "ext4" | "xfs")
                && src.starts_with("/dev/loop");
            ours.then_some(at)
        })
        .collect()
}

#[test]
fn swarm_service_follows_a_partitioned_host() {
    let (mut demo, a) = Demo::start("swarmpt");
    let Demo {
        swarm,
        d,
        volume,
        want,
        ..
    } = &mut demo;
    let (c, volume, want) = (&d.c, volume.as_str(), want.as_str());
    let b = other_worker(swarm, a);
    let a_name = swarm.nodes[a].name.clone();
    let old_task = swarm.nodes[a].task_container(SERVICE).expect("A's task");

    // Host A is cut off, alive: seen from the others, it is dead.
    let phases = time_failover(swarm, c, volume, a, b, |swarm| swarm.cut(a));
    report("worker cut off", &phases);

    // A's task still runs there, but nothing it writes reaches the volume (its SDC can reach
    // no SDS until its I/O times out; once the network is back, its mapping is fenced).
    let o = swarm.nodes[a].cli(&[
        "exec",
        &old_task,
        "sh",
        "-c",
        "echo cut-off | dd of=/data/from-a conv=fsync",
    ]);
    assert!(!o.ok, "the cut-off host wrote to the volume: {}", o.stdout);

    // The network heals: Swarm stops A's old task, whose Unmount releases what was left there.
    swarm.heal(a);
    wait_for_explained(
        "the healed host to stop its old task and leave nothing of the volume",
        Duration::from_secs(120),
        || {
            (swarm.nodes[a].task_container(SERVICE).is_none()
                && volume_mounts_under(&swarm.nodes[a].dir).is_empty()
                && loops_of(volume).len() == 1)
                .then_some(())
        },
        || {
            format!(
                "; tasks {:?}; mounts {:?}; loop devices {:?}\nthe plugin's lines in \
                 {a_name}'s dockerd log:\n{}",
                swarm.tasks(SERVICE),
                volume_mounts_under(&swarm.nodes[a].dir),
                loops_of(volume),
                plugin_log(&swarm.nodes[a].dir.join("dockerd.log"), 20)
            )
        },
    );
    must_hold_the_pattern(swarm, b, want);
}

#[test]
fn swarm_service_outlives_a_plugin_crash() {
    let (mut demo, a) = Demo::start("swarmsc");
    let Demo {
        swarm,
        volume,
        want,
        ..
    } = &mut demo;
    let (volume, want) = (volume.as_str(), want.as_str());
    let task = swarm.nodes[a].task_container(SERVICE).expect("A's task");

    // The plugin's SDC dies on A: the plugin's PID 1 starts it again, and it takes the devices
    // over from the FUSE keeper. The task notices nothing.
    let child = ["/bin/sdc", "plugin", "--child"];
    must_kill_and_see_restarted(&swarm.nodes[a], &child, "the plugin to restart its SDC");
    swarm.nodes[a].must(&[
        "exec",
        &task,
        "sh",
        "-c",
        "echo after-sdc-crash | dd of=/data/after-sdc-crash conv=fsync",
    ]);

    // The whole plugin dies (its PID 1, and the FUSE keeper with it): dockerd starts it again,
    // but the devices it served are gone, and the task's filesystem with them.
    let plugin = ["/bin/sdc", "plugin"];
    must_kill_and_see_restarted(&swarm.nodes[a], &plugin, "dockerd to restart the plugin");

    // What the README tells the operator: restart the service's tasks. The old task's
    // Unmount frees the dead device; the new task, wherever Swarm puts it, reads the pattern.
    let old_task = swarm.tasks(SERVICE)[0].0.clone();
    swarm
        .manager()
        .must(&["service", "update", "--detach", "--force", SERVICE]);
    let n = wait_new_reader(swarm, &old_task);
    wait_for_explained(
        "one device of the volume left",
        Duration::from_secs(60),
        || (loops_of(volume).len() == 1).then_some(()),
        || format!("; loop devices {:?}", loops_of(volume)),
    );
    must_hold(
        swarm,
        n,
        want,
        &["after-sdc-crash", "lost+found", "pattern"],
    );
}

/// SIGKILLs the node's processes running `argv` and waits until others run it.
fn must_kill_and_see_restarted(node: &SwarmNode, argv: &[&str], what: &str) {
    let old = node.pids_running(argv);
    assert!(!old.is_empty(), "nothing runs {argv:?} on {}", node.name);
    for pid in &old {
        // SAFETY: kill(2) on a process of this test's own namespace.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    wait_for(what, Duration::from_secs(60), || {
        let now = node.pids_running(argv);
        (!now.is_empty() && now.iter().all(|p| !old.contains(p))).then_some(())
    });
}

#[test]
fn swarm_service_waits_for_a_host_whose_dockerd_died() {
    let (mut demo, a) = Demo::start("swarmdd");
    let Demo {
        swarm,
        d,
        volume,
        want,
        ..
    } = &mut demo;
    let (c, volume, want) = (&d.c, volume.as_str(), want.as_str());
    let b = other_worker(swarm, a);
    let (a_name, b_name) = (swarm.nodes[a].name.clone(), swarm.nodes[b].name.clone());
    let old_task = swarm.tasks(SERVICE)[0].0.clone();
    // The task's process: `sleep`, its last command, in A's namespace.
    let task_pid = *swarm.nodes[a]
        .pids_running(&["sleep", "1000000"])
        .first()
        .expect("A's task process");

    // dockerd dies on A; its containers, their shims and the plugin's SDC live on.
    swarm.nodes[a].kill_dockerd();
    swarm.wait_node_state(&a_name, "down");

    // Swarm places the task elsewhere, but its Mount is refused: A's SDC is alive.
    let log = swarm.nodes[b].dir.join("dockerd.log");
    let refusal = format!("refused: volume {volume} is in use on another host");
    wait_for_explained(
        &format!("{b_name}'s Mount to be refused"),
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|t| t.contains(&refusal))
                .then_some(())
        },
        || {
            format!(
                "; tasks {:?}\n{}",
                swarm.tasks(SERVICE),
                plugin_log(&log, 20)
            )
        },
    );
    assert_eq!(mapped_to(c, volume), std::slice::from_ref(&a_name));

    // Meanwhile A's task keeps the volume and writes to it.
    let o = sh(
        "nsenter",
        &[
            "-t",
            &task_pid.to_string(),
            "-m",
            "-r",
            "/bin/sh",
            "-c",
            "echo while-dockerd-was-dead | dd of=/data/from-a conv=fsync && sync -f /data",
        ],
    );
    assert!(o.ok, "A's task could not write: {}{}", o.stdout, o.stderr);

    // dockerd comes back: it stops the old containers (Swarm mode has no --live-restore), their
    // Unmount releases the volume, and the next try takes it over, wherever Swarm puts it. It
    // finds what A's task wrote.
    swarm.nodes[a].restart_dockerd();
    let n = wait_new_reader(swarm, &old_task);
    must_hold(swarm, n, want, &["from-a", "lost+found", "pattern"]);
    let id = swarm.nodes[n].task_container(SERVICE).expect("the task");
    let text = swarm.nodes[n].must(&["exec", &id, "cat", "/data/from-a"]);
    assert_eq!(text.trim(), "while-dockerd-was-dead");
}

/// Node `n`'s task reads the pattern, and sees no file but the pattern's (and ext4's).
fn must_hold_the_pattern(swarm: &Swarm, n: usize, want: &str) {
    must_hold(swarm, n, want, &["lost+found", "pattern"]);
}

/// Node `n`'s task reads the pattern, and `/data` holds exactly `files`.
fn must_hold(swarm: &Swarm, n: usize, want: &str, files: &[&str]) {
    let node = &swarm.nodes[n];
    let id = node.task_container(SERVICE).expect("a task");
    let sum = node.must(&["exec", &id, "sha256sum", "/data/pattern"]);
    assert_eq!(sum.split_whitespace().next(), Some(want), "{sum}");
    let ls = node.must(&["exec", &id, "ls", "/data"]);
    let have: Vec<&str> = ls.split_whitespace().collect();
    assert_eq!(have, files, "{ls}");
}

/// Waits until a task other than `old_task` runs and read the pattern; returns its node.
fn wait_new_reader(swarm: &Swarm, old_task: &str) -> usize {
    let (n, line) = wait_for_explained(
        "a new task to read the pattern",
        Duration::from_secs(120),
        || {
            let t = swarm
                .tasks(SERVICE)
                .into_iter()
                .find(|t| t.0 != old_task && t.2 == "Running" && t.3.starts_with("Running"))?;
            let n = swarm.index(&t.1);
            let id = swarm.nodes[n].task_container(SERVICE)?;
            let line = swarm.nodes[n]
                .logs(&id)
                .into_iter()
                .find(|(_, l)| l.starts_with("read "))?;
            Some((n, line.1))
        },
        || format!("; tasks {:?}", swarm.tasks(SERVICE)),
    );
    let want = sha256_hex(pattern().as_bytes());
    assert_eq!(line, format!("read {} {want}", swarm.nodes[n].name));
    n
}
