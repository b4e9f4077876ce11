//! Docker Swarm across several dockerd "hosts", for the failover demo: each dockerd runs in a
//! network namespace of its own on the test's bridge (where the cluster's MDM and SDS are too,
//! see [`crate::DataCluster::start_net`]) and a UTS namespace of its own (hostname `nodeN`),
//! with its own data root, exec root and containerd, all under the test's scratch directory.
//! [`Swarm::start`] joins them into one Swarm (node1 the only manager, the others workers, a
//! 1 s dispatcher heartbeat) and imports a busybox image on each; [`Swarm::install_plugin`]
//! installs Meshblock's managed volume plugin on each under one name, each node's SDC named
//! after its node.
//!
//! [`Swarm::kill`] makes a host die: its link goes down, then every process in its network
//! namespace is SIGKILLed (dockerd, containerd, the shims, the task containers, which run with
//! `--network host`, and the plugin's SDC and FUSE keeper); none survives a dockerd kill on its
//! own. [`Swarm::revive`] brings the host back on the same directories: its dockerd restarts,
//! and with it the plugin, with the state they had on disk.
//!
//! Undone on drop, pass or fail: every process of every node, the mounts under the scratch
//! directory, the loop devices over the plugins' FUSE files of the test's volumes, the plugin
//! directories `/run/docker/plugins/<id>` of the test's plugins, shim sockets the test's
//! containerds left in `/run/containerd/s`, and the firewall rule for the bridge. The namespaces
//! and the bridge go with the [`netns::Net`].

use crate::docker::{docker_cli, mounts_under, sh, Out};
use crate::{netns, sdc_cert, wait_for, wait_for_explained, Cluster, Proc};
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Shim sockets of every containerd on the machine (dockerd 20.10's shims hard-code it).
const SHIM_SOCKETS: &str = "/run/containerd/s";

/// Where a managed plugin's socket is on the host, by plugin id (hard-coded by dockerd 20.10,
/// whatever the exec root).
const PLUGIN_SOCKETS: &str = "/run/docker/plugins";

/// Address pools inside the nodes' namespaces (docker_gwbridge, Swarm's overlay networks):
/// never routed anywhere, so any private range does.
const DAEMON_JSON: &str = r#"{"default-address-pools":[{"base":"10.78.16.0/20","size":24}]}"#;
const SWARM_POOL: &str = "10.78.64.0/20";

/// One dockerd "host".
pub struct SwarmNode {
    /// Its hostname and Swarm node name, `nodeN`; also its SDC's name in the cluster.
    pub name: String,
    pub node: netns::Node,
    pub dir: PathBuf,
    /// The API socket, `unix://<dir>/docker.sock`.
    pub host: String,
    proc: Option<Proc>,
}

impl SwarmNode {
    fn start(name: &str, node: netns::Node, dir: PathBuf) -> SwarmNode {
        std::fs::create_dir_all(&dir).expect("node dir");
        std::fs::write(dir.join("daemon.json"), DAEMON_JSON).expect("daemon.json");
        let mut n = SwarmNode {
            name: name.to_string(),
            host: format!("unix://{}", dir.join("docker.sock").display()),
            node,
            dir,
            proc: None,
        };
        n.launch();
        n
    }

    /// Starts dockerd in the node's namespaces (no --live-restore: Swarm mode refuses it).
    fn launch(&mut self) {
        // Pid files of a killed run: dockerd would take a reused pid for its containerd.
        let _ = std::fs::remove_file(self.dir.join("docker.pid"));
        let _ = std::fs::remove_file(self.dir.join("x/containerd/containerd.pid"));
        let d = |p: &str| self.dir.join(p).display().to_string();
        let script = format!(
            "hostname '{}' && exec env DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 dockerd \
             --config-file '{}' --data-root '{}' --exec-root '{}' --pidfile '{}' --host '{}' \
             --bridge=none --iptables=false --ip6tables=false --storage-driver=vfs",
            self.name,
            d("daemon.json"),
            d("root"),
            d("x"),
            d("docker.pid"),
            self.host,
        );
        let args: Vec<String> = vec![
            format!("--net=/run/netns/{}", self.node.ns),
            "--".into(),
            "unshare".into(),
            "--uts".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            script,
        ];
        self.proc = Some(Proc::spawn(
            &format!("dockerd-{}", self.name),
            Path::new("nsenter"),
            &args,
            self.dir.join("dockerd.log"),
        ));
        let log = self.dir.join("dockerd.log");
        wait_for(
            &format!("dockerd of {} to answer", self.name),
            Duration::from_secs(60),
            || {
                let o = self.cli(&["version"]);
                if !o.ok && !self.proc.as_mut().is_some_and(|p| p.alive()) {
                    panic!(
                        "dockerd of {} exited: {}",
                        self.name,
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                o.ok.then_some(())
            },
        );
    }

    /// Runs the docker CLI against this node's dockerd.
    pub fn cli(&self, args: &[&str]) -> Out {
        let mut full = vec!["-H", &self.host];
        full.extend_from_slice(args);
        sh(docker_cli(), &full)
    }

    /// Runs the docker CLI and panics unless it succeeds; returns stdout.
    pub fn must(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.ok,
            "docker {args:?} on {} failed: {}{}",
            self.name, o.stdout, o.stderr
        );
        o.stdout
    }

    /// Pids of every process in this node's network namespace.
    pub fn pids(&self) -> Vec<i32> {
        let Ok(ns) = std::fs::metadata(format!("/run/netns/{}", self.node.ns)) else {
            return Vec::new();
        };
        let me = std::process::id() as i32;
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                // A zombie has no namespace left: nothing to kill.
                std::fs::metadata(format!("/proc/{pid}/ns/net"))
                    .is_ok_and(|m| m.ino() == ns.ino() && m.dev() == ns.dev())
            })
            .collect()
    }

    /// Pids of the node's processes whose command line is exactly `argv` (e.g. the plugin's
    /// supervisor `/bin/sdc plugin`, its SDC `/bin/sdc plugin --child`).
    pub fn pids_running(&self, argv: &[&str]) -> Vec<i32> {
        let want: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"])
            .flatten()
            .copied()
            .collect();
        self.pids()
            .into_iter()
            .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
            .collect()
    }

    /// SIGKILLs the node's dockerd alone: its containerd goes with it, the shims, containers
    /// and plugins live on.
    pub fn kill_dockerd(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the node's dockerd again after [`kill_dockerd`](Self::kill_dockerd).
    pub fn restart_dockerd(&mut self) {
        self.launch();
    }

    /// SIGKILLs every process of the node until none is left; returns how many there were.
    fn kill_all(&mut self) -> usize {
        let mut killed = BTreeSet::new();
        wait_for(
            &format!("every process of {} to die", self.name),
            Duration::from_secs(30),
            || {
                let pids = self.pids();
                if pids.is_empty() {
                    return Some(());
                }
                for pid in pids {
                    // SAFETY: kill(2) on a process in this test's own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    killed.insert(pid);
                }
                None
            },
        );
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        killed.len()
    }

    fn set_link(&self, state: &str) {
        let o = sh("ip", &["-n", &self.node.ns, "link", "set", "eth0", state]);
        assert!(
            o.ok,
            "ip link set eth0 {state} in {}: {}",
            self.node.ns, o.stderr
        );
    }

    /// The Swarm node id of this host (from its own dockerd).
    pub fn swarm_id(&self) -> String {
        self.must(&["info", "--format", "{{.Swarm.NodeID}}"])
            .trim()
            .to_string()
    }

    /// The id of the container of `service`'s task running on this node, if any.
    pub fn task_container(&self, service: &str) -> Option<String> {
        let label = format!("label=com.docker.swarm.service.name={service}");
        let o = self.cli(&["ps", "-q", "--filter", &label, "--filter", "status=running"]);
        o.stdout.split_whitespace().next().map(str::to_string)
    }

    /// The log lines of container `id`, each with Docker's RFC 3339 timestamp.
    pub fn logs(&self, id: &str) -> Vec<(String, String)> {
        let o = self.cli(&["logs", "--timestamps", id]);
        o.stdout
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(t, l)| (t.to_string(), l.to_string()))
            .collect()
    }
}

/// A Swarm of dockerd hosts; see the module docs.
pub struct Swarm {
    pub nodes: Vec<SwarmNode>,
    /// The busybox image imported on every node.
    pub image: String,
    /// The managed plugin's name, once installed.
    pub plugin: Option<String>,
    plugin_ids: Vec<String>,
    /// Volumes the test uses: loop devices over their FUSE files are the test's.
    volumes: Vec<String>,
    shim_sockets_before: BTreeSet<PathBuf>,
    bridge: String,
}

impl Swarm {
    /// Starts `n` dockerd hosts `node1..nodeN` in namespaces of `net` with their directories
    /// under `dir`, node1 the manager and the others workers.
    pub fn start(net: &netns::Net, dir: &Path, n: usize) -> Swarm {
        assert!(n >= 2, "a Swarm that can lose a host needs at least two");
        let shim_sockets_before = list_dir(Path::new(SHIM_SOCKETS));
        let bridge = net.bridge().to_string();
        // Bridged traffic goes through FORWARD here (br_netfilter): accept the bridge's own,
        // whatever the policy; nothing leaves it (the namespaces have no default route).
        let o = sh(
            "iptables",
            &[
                "-I", "FORWARD", "1", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
            ],
        );
        assert!(o.ok, "iptables: {}", o.stderr);
        let mut s = Swarm {
            nodes: Vec::new(),
            image: String::new(),
            plugin: None,
            plugin_ids: Vec::new(),
            volumes: Vec::new(),
            shim_sockets_before,
            bridge,
        };
        for i in 1..=n {
            let name = format!("node{i}");
            let node = net.node(&name);
            s.nodes.push(SwarmNode::start(&name, node, dir.join(&name)));
        }
        s.image = import_busybox(&s.nodes, dir);
        s.form();
        s
    }

    /// The manager.
    pub fn manager(&self) -> &SwarmNode {
        &self.nodes[0]
    }

    fn form(&self) {
        let m = self.manager();
        let ip = m.node.ip.to_string();
        m.must(&[
            "swarm",
            "init",
            "--advertise-addr",
            &ip,
            "--listen-addr",
            &format!("{ip}:2377"),
            "--default-addr-pool",
            SWARM_POOL,
            "--default-addr-pool-mask-length",
            "24",
        ]);
        // The default 5 s heartbeat takes ~20 s to call a worker down; 1 s takes ~4 s.
        m.must(&["swarm", "update", "--dispatcher-heartbeat", "1s"]);
        let token = m.must(&["swarm", "join-token", "-q", "worker"]);
        for w in &self.nodes[1..] {
            let wip = w.node.ip.to_string();
            w.must(&[
                "swarm",
                "join",
                "--token",
                token.trim(),
                "--advertise-addr",
                &wip,
                "--listen-addr",
                &format!("{wip}:2377"),
                &format!("{ip}:2377"),
            ]);
        }
        for n in &self.nodes {
            self.wait_node_state(&n.name, "ready");
        }
    }

    /// The Swarm's view of node `name`: (state, the time its status last changed, RFC 3339).
    pub fn node_state(&self, name: &str) -> Option<(String, String)> {
        let o = self.manager().cli(&[
            "node",
            "inspect",
            name,
            "--format",
            "{{.Status.State}} {{json .UpdatedAt}}",
        ]);
        let (state, at) = o.stdout.trim().split_once(' ')?;
        Some((state.to_string(), at.trim_matches('"').to_string()))
    }

    /// Waits until the manager sees node `name` in `state` (`ready`, `down`).
    pub fn wait_node_state(&self, name: &str, state: &str) {
        wait_for_explained(
            &format!("Swarm node {name} {state}"),
            Duration::from_secs(60),
            || (self.node_state(name)?.0 == state).then_some(()),
            || format!("; nodes:\n{}", self.manager().cli(&["node", "ls"]).stdout),
        );
    }

    /// Installs the managed plugin from `plugin_dir` (config.json and rootfs/) on every node
    /// as `name`, each node's SDC named after the node with its own `sdc:NAME` certificate,
    /// logging in to `c`'s MDMs as the plugin user with the password in `password`; `settings`
    /// are more `KEY=VALUE` settings. Waits until every node advertises it to the Swarm.
    pub fn install_plugin(
        &mut self,
        name: &str,
        plugin_dir: &Path,
        c: &Cluster,
        password: &Path,
        settings: &[&str],
    ) {
        for n in &self.nodes {
            n.must(&["plugin", "create", name, &plugin_dir.display().to_string()]);
            let id = n.must(&["plugin", "inspect", "--format", "{{.Id}}", name]);
            self.plugin_ids.push(id.trim().to_string());
            let mut set = vec![
                "plugin".to_string(),
                "set".into(),
                name.into(),
                format!("MDM={}", c.mdm_ips()),
                format!("SDC_NAME={}", n.name),
                format!("certs.source={}", sdc_cert(c, &n.name).display()),
                format!("password.source={}", password.display()),
            ];
            set.extend(settings.iter().map(|s| s.to_string()));
            n.must(&set.iter().map(String::as_str).collect::<Vec<_>>());
            n.must(&["plugin", "enable", name]);
        }
        self.plugin = Some(name.to_string());
        for n in &self.nodes {
            self.wait_plugin_advertised(&n.name, name);
        }
    }

    /// Waits until the manager sees the volume plugin `plugin` on node `node` (the scheduler
    /// places a task needing it only there).
    pub fn wait_plugin_advertised(&self, node: &str, plugin: &str) {
        wait_for(
            &format!("node {node} to advertise the volume plugin {plugin}"),
            Duration::from_secs(60),
            || {
                let o = self.manager().cli(&[
                    "node",
                    "inspect",
                    node,
                    "--format",
                    "{{range .Description.Engine.Plugins}}{{.Type}}={{.Name}} {{end}}",
                ]);
                o.stdout
                    .split_whitespace()
                    .any(|p| {
                        p == format!("Volume={plugin}") || p == format!("Volume={plugin}:latest")
                    })
                    .then_some(())
            },
        );
    }

    /// Remembers a volume the test uses, so drop detaches loop devices left over its file.
    pub fn track_volume(&mut self, volume: &str) {
        self.volumes.push(volume.to_string());
    }

    /// The index of the node named `name`.
    pub fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Node `i` dies: its link goes down, then every process in its namespace is SIGKILLed.
    /// Returns how many processes were killed.
    pub fn kill(&mut self, i: usize) -> usize {
        self.nodes[i].set_link("down");
        self.nodes[i].kill_all()
    }

    /// Cuts node `i` off the network, everything on it left running.
    pub fn cut(&mut self, i: usize) {
        self.nodes[i].set_link("down");
    }

    /// Undoes [`cut`](Self::cut).
    pub fn heal(&mut self, i: usize) {
        self.nodes[i].set_link("up");
    }

    /// Brings node `i` back after [`kill`](Self::kill): link up, dockerd (and with it the
    /// plugin) started again on the same directories; waits until the Swarm sees it ready.
    pub fn revive(&mut self, i: usize) {
        self.nodes[i].set_link("up");
        self.nodes[i].launch();
        let name = self.nodes[i].name.clone();
        self.wait_node_state(&name, "ready");
    }

    /// `docker service ps` of `service` on the manager: (task id, node, desired state, current
    /// state), newest first.
    pub fn tasks(&self, service: &str) -> Vec<(String, String, String, String)> {
        let o = self.manager().cli(&[
            "service",
            "ps",
            service,
            "--no-trunc",
            "--format",
            "{{.ID}}|{{.Node}}|{{.DesiredState}}|{{.CurrentState}}",
        ]);
        o.stdout
            .lines()
            .filter_map(|l| {
                let mut f = l.split('|');
                Some((
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                    f.next()?.to_string(),
                ))
            })
            .collect()
    }

    /// A task's (state, status timestamp RFC 3339, created RFC 3339), from the manager.
    pub fn task_times(&self, task: &str) -> Option<(String, String, String)> {
        let o = self.manager().cli(&[
            "inspect",
            "--type",
            "task",
            task,
            "--format",
            "{{.Status.State}} {{json .Status.Timestamp}} {{json .CreatedAt}}",
        ]);
        let mut f = o.stdout.split_whitespace();
        Some((
            f.next()?.to_string(),
            f.next()?.trim_matches('"').to_string(),
            f.next()?.trim_matches('"').to_string(),
        ))
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        for n in self.nodes.iter_mut() {
            n.kill_all();
        }
        for n in &self.nodes {
            for m in mounts_under(&n.dir) {
                let _ = sh("umount", &["-l", &m.display().to_string()]);
            }
        }
        detach_loops_of(&self.volumes);
        for id in &self.plugin_ids {
            if !id.is_empty() {
                let _ = std::fs::remove_dir_all(Path::new(PLUGIN_SOCKETS).join(id));
            }
        }
        // Sockets of the killed shims: new since the start and nobody listening.
        for s in list_dir(Path::new(SHIM_SOCKETS)).difference(&self.shim_sockets_before) {
            if std::os::unix::net::UnixStream::connect(s).is_err() {
                let _ = std::fs::remove_file(s);
            }
        }
        let _ = sh(
            "iptables",
            &[
                "-D",
                "FORWARD",
                "-i",
                &self.bridge,
                "-o",
                &self.bridge,
                "-j",
                "ACCEPT",
            ],
        );
    }
}

fn list_dir(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default()
}

/// Loop devices over a plugin's FUSE file of `volume` (a test's unique volume name). Seen from
/// here, a file of a FUSE mount left in a dead plugin's namespace is just `/<volume>`.
pub fn loops_of(volume: &str) -> Vec<String> {
    let list = sh(
        "losetup",
        &["--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"],
    );
    list.stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, f)| {
            f.trim()
                .trim_end_matches(" (deleted)")
                .ends_with(&format!("/{volume}"))
        })
        .map(|(d, _)| d.to_string())
        .collect()
}

/// Loop devices whose backing file is a plugin's FUSE file of one of `volumes` (named after
/// the volume; the test's volume names are unique): their mounts are unmounted, then they are
/// detached.
fn detach_loops_of(volumes: &[String]) {
    if volumes.is_empty() {
        return;
    }
    for dev in volumes.iter().flat_map(|v| loops_of(v)) {
        for m in mounts_of_source(&dev) {
            let _ = sh("umount", &["-l", &m]);
        }
        let _ = sh("losetup", &["-d", &dev]);
    }
}

/// Mount points (in this process's namespace) of the device `dev`.
pub fn mounts_of_source(dev: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let src = right.split(' ').nth(1)?;
            (src == dev).then(|| left.split(' ').nth(4).map(str::to_string))?
        })
        .collect()
}

/// Imports one busybox image (with the applets the tests use) on every node.
fn import_busybox(nodes: &[SwarmNode], dir: &Path) -> String {
    let rootfs = dir.join("busybox-rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .expect("copy /bin/busybox (./test installs busybox-static)");
    for l in [
        "sh",
        "cat",
        "echo",
        "sync",
        "sleep",
        "ls",
        "dd",
        "test",
        "stat",
        "seq",
        "sed",
        "sha256sum",
        "hostname",
        "rm",
        "cut",
        "date",
        "mv",
    ] {
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l));
    }
    let tar = dir.join("busybox.tar");
    let o = sh(
        "tar",
        &[
            "-C",
            &rootfs.display().to_string(),
            "-cf",
            &tar.display().to_string(),
            ".",
        ],
    );
    assert!(o.ok, "tar: {}", o.stderr);
    let name = "meshblock-test-busybox:1";
    for n in nodes {
        n.must(&["import", &tar.display().to_string(), name]);
    }
    name.to_string()
}

/// Seconds since the Unix epoch of an RFC 3339 time as Docker prints it
/// (`2026-12-06T08:30:01.123456789Z`, or with a `+hh:mm` offset).
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.trim().trim_matches('"').split_once('T')?;
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: i64 = d.next()?.parse().ok()?;
    let day: i64 = d.next()?.parse().ok()?;
    let (clock, offset_secs) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0i64)
    } else {
        let at = time.rfind(['+', '-'])?;
        let (c, z) = time.split_at(at);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let (hh, mm) = z[1..].split_once(':')?;
        let off = hh.parse::<i64>().ok()? * 3600 + mm.parse::<i64>().ok()? * 60;
        (c, sign * off)
    };
    let mut t = clock.split(':');
    let hh: i64 = t.next()?.parse().ok()?;
    let mm: i64 = t.next()?.parse().ok()?;
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60 - offset_secs) as f64 + ss)
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;

    #[test]
    fn rfc3339_times_parse() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:01Z"), Some(951_868_801.0));
        let t = parse_rfc3339("\"2026-12-06T08:30:01.5Z\"").expect("parses");
        assert_eq!(t, 1_796_545_801.5);
        assert_eq!(
            parse_rfc3339("2026-12-06T09:30:01.5+01:00"),
            Some(1_796_545_801.5)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
