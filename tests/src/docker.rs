//! Docker for the volume-plugin tests: a private `dockerd` (its own data root, exec root,
//! pidfile and API socket under the test's scratch directory; no bridge, no iptables, so
//! containers get no network and touch no addresses), a tiny image imported from Debian's
//! `busybox-static` (nothing can be pulled here), and an SDC serving the plugin on a socket in
//! `/run/docker/plugins` under a unique name.
//!
//! [`Setup`] puts them together: a cluster (1 MDM, 3 SDS, `vol1` made with scli and mapped to
//! this host), its SDC serving the plugin, and a dockerd with the image.
//!
//! Everything is undone on drop, pass or fail: containers, the daemon and its containerd
//! shims, mounts under the scratch directory, the plugin socket, and the SDC's attach state
//! (loop devices, FUSE mount, keeper).

use crate::{bin, cluster_map, netns, require, wait_for, Cluster, DataCluster, Proc};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Debian's docker.io installs the matching CLI here (another `docker` may be earlier on PATH).
pub fn docker_cli() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// The outcome of one command.
#[derive(Debug)]
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn sh(program: &str, args: &[&str]) -> Out {
    match Command::new(program).args(args).output() {
        Ok(o) => Out {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        },
        Err(e) => Out {
            ok: false,
            stdout: String::new(),
            stderr: format!("cannot run {program}: {e}"),
        },
    }
}

/// Mount points under `dir` in this process's namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Is something mounted exactly at `dir`?
pub fn is_mounted(dir: &Path) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| Path::new(p) == dir)
}

/// Pids of processes whose command line mentions `needle` (a unique scratch path).
fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// A private Docker daemon.
pub struct Dockerd {
    pub dir: PathBuf,
    pub host: String,
    pub proc: Option<Proc>,
    netns: Option<String>,
    extra: Vec<String>,
}

impl Dockerd {
    /// Starts dockerd under `dir` (created), optionally in a network namespace given as an
    /// `nsenter --net=` path, with `extra` flags.
    pub fn start(dir: &Path, netns: Option<&str>, extra: &[&str]) -> Dockerd {
        std::fs::create_dir_all(dir).expect("dockerd dir");
        let mut d = Dockerd {
            dir: dir.to_path_buf(),
            host: format!("unix://{}", dir.join("docker.sock").display()),
            proc: None,
            netns: netns.map(str::to_string),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.launch();
        d
    }

    fn launch(&mut self) {
        let dir = self.dir.clone();
        let mut cmd: Vec<String> = Vec::new();
        if let Some(ns) = &self.netns {
            cmd.extend(["nsenter".into(), format!("--net={ns}"), "--".into()]);
        }
        cmd.extend(
            [
                "dockerd".to_string(),
                format!("--data-root={}", dir.join("root").display()),
                format!("--exec-root={}", dir.join("x").display()),
                format!("--pidfile={}", dir.join("docker.pid").display()),
                format!("--host={}", self.host),
                "--bridge=none".into(),
                "--iptables=false".into(),
                "--ip6tables=false".into(),
                "--storage-driver=vfs".into(),
                "--live-restore".into(),
            ]
            .into_iter()
            .chain(self.extra.iter().cloned()),
        );
        self.proc = Some(Proc::spawn(
            "dockerd",
            Path::new(&cmd[0]),
            &cmd[1..],
            dir.join("dockerd.log"),
        ));
        self.wait_up();
    }

    fn wait_up(&mut self) {
        let host = self.host.clone();
        let log = self.dir.join("dockerd.log");
        wait_for("dockerd to answer", Duration::from_secs(60), || {
            let o = sh(docker_cli(), &["-H", &host, "version"]);
            if !o.ok && !self.proc.as_mut().is_some_and(|p| p.alive()) {
                panic!(
                    "dockerd exited: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            o.ok.then_some(())
        });
    }

    /// Runs the docker CLI against this daemon.
    pub fn cli(&self, args: &[&str]) -> Out {
        let mut full = vec!["-H", &self.host];
        full.extend_from_slice(args);
        sh(docker_cli(), &full)
    }

    /// Runs the docker CLI and panics unless it succeeds; returns stdout.
    pub fn must(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(o.ok, "docker {args:?} failed: {}{}", o.stdout, o.stderr);
        o.stdout
    }

    /// Stops the daemon (SIGTERM, then SIGKILL) without touching its containers' state: with
    /// --live-restore, running containers keep running.
    pub fn stop(&mut self) {
        let Some(mut p) = self.proc.take() else {
            return;
        };
        p.signal(libc::SIGTERM);
        let exited = (0..300).any(|_| {
            if !p.alive() {
                return true;
            }
            std::thread::park_timeout(Duration::from_millis(100));
            false
        });
        if !exited {
            p.kill();
        }
        p.kill();
        let _ = std::fs::remove_file(self.dir.join("docker.pid"));
    }

    /// Starts the daemon again with the same directories (running containers carry on:
    /// --live-restore).
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Imports a busybox image (a rootfs with /bin/busybox and its links); returns its name.
    pub fn import_busybox(&self) -> String {
        let rootfs = self.dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .expect("copy /bin/busybox (./test installs busybox-static)");
        for l in [
            "sh", "cat", "echo", "sync", "sleep", "ls", "dd", "test", "stat", "df", "wc",
        ] {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(l));
        }
        let tar = self.dir.join("rootfs.tar");
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
        self.must(&["import", &tar.display().to_string(), name]);
        name.to_string()
    }
}

impl Dockerd {
    /// The ids of the managed plugins installed in this daemon (its data root's plugin dirs).
    pub fn plugin_ids(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("root/plugins"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The directory of managed plugin `id` in the data root.
    pub fn plugin_dir(&self, id: &str) -> PathBuf {
        self.dir.join("root/plugins").join(id)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let alive = self.proc.as_mut().is_some_and(|p| p.alive());
        if alive {
            let ids = self.cli(&["ps", "-aq"]).stdout;
            for id in ids.split_whitespace() {
                let _ = self.cli(&["rm", "-f", id]);
            }
            // Managed plugins stop cleanly (their SDC detaches what is unused).
            for p in self.cli(&["plugin", "ls", "-q"]).stdout.split_whitespace() {
                let _ = self.cli(&["plugin", "disable", "-f", p]);
            }
        }
        // Whatever of a plugin still runs (dockerd died, or a test killed it): its processes,
        // and the loop devices over its FUSE files.
        let rootfs: Vec<PathBuf> = self
            .plugin_ids()
            .iter()
            .map(|id| self.plugin_dir(id).join("rootfs"))
            .collect();
        let mut fuse = Vec::new();
        let mut rooted = Vec::new();
        for r in &rootfs {
            fuse.extend(fuse_devs_of(&pids_rooted_at(r)));
            rooted.extend(pids_rooted_at(r));
        }
        self.stop();
        // containerd and its shims run under our exec root; end them by pid.
        let needle = self.dir.display().to_string();
        for pid in pids_mentioning(&needle).into_iter().chain(rooted) {
            // SAFETY: kill(2) on processes started under this test's unique directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        for m in mounts_under(&self.dir) {
            let _ = sh("umount", &["-l", &m.display().to_string()]);
        }
        for dev in loops_backed_by(&fuse) {
            for m in mounts_of(&dev) {
                let _ = sh("umount", &["-l", &m]);
            }
            let _ = sh("losetup", &["-d", &dev]);
        }
        for id in self.plugin_ids() {
            let _ = std::fs::remove_dir_all(Path::new("/run/docker/plugins").join(id));
        }
    }
}

/// Processes whose root is `rootfs` (a managed plugin's: their namespace's `/` is a bind of it).
pub fn pids_rooted_at(rootfs: &Path) -> Vec<i32> {
    let want = rootfs.display().to_string();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
                .ok()
                .and_then(|t| {
                    t.lines().find_map(|l| {
                        let f: Vec<&str> = l.split(' ').collect();
                        (f.get(4) == Some(&"/")).then(|| f.get(3).map(|r| *r == want))?
                    })
                })
                .unwrap_or(false)
        })
        .collect()
}

/// `major:minor` of the Meshblock FUSE mounts the namespaces of `pids` hold.
pub fn fuse_devs_of(pids: &[i32]) -> Vec<String> {
    let mut devs: Vec<String> = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok())
        .flat_map(|t| {
            t.lines()
                .filter(|l| l.contains(" - fuse.meshblock "))
                .filter_map(|l| l.split(' ').nth(2).map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect();
    devs.sort();
    devs.dedup();
    devs
}

/// Loop devices whose backing file lives on one of `devs` (`major:minor`).
pub fn loops_backed_by(devs: &[String]) -> Vec<String> {
    if devs.is_empty() {
        return Vec::new();
    }
    sh(
        "losetup",
        &["--list", "--noheadings", "--raw", "-O", "NAME,BACK-MAJ:MIN"],
    )
    .stdout
    .lines()
    .filter_map(|l| l.split_once(' '))
    .filter(|(_, d)| devs.iter().any(|x| x == d.trim()))
    .map(|(n, _)| n.to_string())
    .collect()
}

/// The MDM user the plugins log in as: role Configure, as the README tells operators to make.
pub const PLUGIN_USER: &str = "docker";

/// Makes the plugins' MDM user (once per cluster; its password only in a file, never on a
/// command line) and returns the password file.
pub fn plugin_user(c: &Cluster) -> PathBuf {
    let pw = c.dir.join("docker-password");
    if pw.exists() {
        return pw;
    }
    let tmp = c.dir.join("docker-password.new");
    std::fs::write(&tmp, format!("Plug-{}\n", rand::random::<u64>())).expect("password file");
    c.must_scli(&[
        "--add_user",
        "--username",
        PLUGIN_USER,
        "--user_role",
        "Configure",
        "--password_file",
        &tmp.display().to_string(),
    ]);
    std::fs::rename(&tmp, &pw).expect("password file");
    pw
}

/// An SDC serving the Docker plugin, replacing a [`DataCluster`]'s plain SDC process.
pub struct PluginSdc {
    /// The driver name: the plugin socket's file name without `.sock` (legacy), the plugin's
    /// `NAME:latest` (managed).
    pub driver: String,
    pub socket: PathBuf,
    /// The SDC's state directory as the host sees it.
    pub state_dir: PathBuf,
    /// Where volumes are mounted, as the host sees it.
    pub mount_root: PathBuf,
    /// The managed plugin this SDC runs as; `None` for the legacy SDC daemon.
    pub managed: Option<Managed>,
}

/// Which form of the Meshblock plugin a Docker test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The SDC daemon on the host, serving a socket in /run/docker/plugins.
    Legacy,
    /// The SDC as Docker's managed plugin (`docker plugin create`, `set`, `enable`).
    Managed,
}

/// A managed plugin created in one dockerd from `packaging/build-docker-plugin`'s output.
#[derive(Clone, Debug)]
pub struct Managed {
    pub name: String,
    pub id: String,
    /// `<data-root>/plugins/<id>`.
    pub dir: PathBuf,
}

impl Managed {
    /// Assembles the plugin from the SDC under test (under `work`) and creates it, disabled,
    /// in `docker` as `name`.
    pub fn create(docker: &Dockerd, name: &str, work: &Path) -> Managed {
        let out = work.join(format!("plugin-{name}"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/build-docker-plugin");
        let bin_dir = bin("sdc");
        let bin_dir = bin_dir.parent().expect("the binaries' directory");
        let o = sh(
            &script.display().to_string(),
            &[
                "--bin-dir",
                &bin_dir.display().to_string(),
                "--out",
                &out.display().to_string(),
            ],
        );
        assert!(o.ok, "build-docker-plugin: {}{}", o.stdout, o.stderr);
        docker.must(&["plugin", "create", name, &out.display().to_string()]);
        let _ = std::fs::remove_dir_all(&out);
        let id = docker
            .must(&["plugin", "inspect", "-f", "{{.Id}}", name])
            .trim()
            .to_string();
        Managed {
            name: name.to_string(),
            dir: docker.plugin_dir(&id),
            id,
        }
    }

    /// The settings that make this plugin SDC `sdc_name` of cluster `c`.
    pub fn settings_for(c: &Cluster, sdc_name: &str) -> Vec<String> {
        vec![
            format!("MDM={}", c.mdm_ips()),
            format!("SDC_NAME={sdc_name}"),
            format!("certs.source={}", crate::sdc_cert(c, sdc_name).display()),
            format!("password.source={}", plugin_user(c).display()),
            format!("METRICS_LISTEN=127.0.0.1:{}", crate::free_port()),
        ]
    }

    /// `docker plugin set NAME settings...`.
    pub fn set(&self, docker: &Dockerd, settings: &[String]) -> Out {
        let mut args = vec!["plugin", "set", self.name.as_str()];
        args.extend(settings.iter().map(String::as_str));
        docker.cli(&args)
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// The SDC's state directory inside the plugin, as the host sees it.
    pub fn state_dir(&self) -> PathBuf {
        self.rootfs().join("var/lib/meshblock/sdc")
    }

    /// The plugin's socket on the host (dockerd 20.10 puts it here whatever its exec root).
    pub fn socket(&self) -> PathBuf {
        Path::new("/run/docker/plugins")
            .join(&self.id)
            .join("meshblock.sock")
    }

    /// The PropagatedMount on the host: volumes mount under it.
    pub fn mount_root(&self) -> PathBuf {
        self.dir.join("propagated-mount")
    }

    /// The plugin's processes (the SDC and its FUSE keeper).
    pub fn pids(&self) -> Vec<i32> {
        pids_rooted_at(&self.rootfs())
    }

    /// What the plugin logged (dockerd's log lines tagged with its id).
    pub fn log(&self, docker: &Dockerd) -> String {
        std::fs::read_to_string(docker.dir.join("dockerd.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&self.id))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl PluginSdc {
    /// Restarts `d`'s SDC with the plugin on a unique socket in /run/docker/plugins.
    pub fn enable(d: &mut DataCluster) -> PluginSdc {
        let driver = format!("mbt{}x{}", std::process::id(), rand::random::<u16>());
        let plugins = Path::new("/run/docker/plugins");
        std::fs::create_dir_all(plugins).expect("create /run/docker/plugins");
        let socket = plugins.join(format!("{driver}.sock"));
        let state_dir = d.c.dir.join("sdc");
        let mount_root = d.c.dir.join("mounts");
        let pw = plugin_user(&d.c);
        let mut cmd = d.sdc.cmd();
        cmd.extend([
            "--docker".into(),
            "--docker-socket".into(),
            socket.display().to_string(),
            "--docker-mount-root".into(),
            mount_root.display().to_string(),
            "--docker-username".into(),
            PLUGIN_USER.into(),
            "--docker-password-file".into(),
            pw.display().to_string(),
        ]);
        d.sdc.kill();
        d.sdc.set_cmd(cmd);
        d.sdc.start();
        let p = PluginSdc {
            driver,
            socket,
            state_dir,
            mount_root,
            managed: None,
        };
        p.wait_ready(d);
        p
    }

    /// Starts another SDC host named `name` serving the plugin (state under `<dir>/<name>`),
    /// in `node`'s network namespace when given. The namespace is entered with `nsenter
    /// --net` only, so the SDC's mounts are in the host's mount namespace where dockerd sees
    /// them (`ip netns exec` would give it a mount namespace of its own).
    pub fn spawn_host(c: &Cluster, name: &str, node: Option<&netns::Node>) -> (Proc, PluginSdc) {
        let driver = format!("mbt{}x{}", std::process::id(), rand::random::<u16>());
        let plugins = Path::new("/run/docker/plugins");
        std::fs::create_dir_all(plugins).expect("create /run/docker/plugins");
        let socket = plugins.join(format!("{driver}.sock"));
        let state_dir = c.dir.join(name);
        let mount_root = c.dir.join(&format!("{name}-mounts"));
        let pw = plugin_user(c);
        let mut cmd: Vec<String> = Vec::new();
        if let Some(n) = node {
            cmd.extend([
                "nsenter".into(),
                format!("--net=/run/netns/{}", n.ns),
                "--".into(),
            ]);
        }
        cmd.push(bin("sdc").display().to_string());
        cmd.extend(crate::sdc_run_args(c, name, &state_dir));
        cmd.extend([
            "--docker".into(),
            "--docker-socket".into(),
            socket.display().to_string(),
            "--docker-mount-root".into(),
            mount_root.display().to_string(),
            "--docker-username".into(),
            PLUGIN_USER.into(),
            "--docker-password-file".into(),
            pw.display().to_string(),
        ]);
        let proc = Proc::spawn(
            name,
            Path::new(&cmd[0]),
            &cmd[1..],
            c.dir.join(&format!("{name}.log")),
        );
        let p = PluginSdc {
            driver,
            socket,
            state_dir,
            mount_root,
            managed: None,
        };
        p.wait_up();
        (proc, p)
    }

    /// Waits until the plugin answers and the SDC can attach (admin socket up).
    pub fn wait_ready(&self, d: &DataCluster) {
        let _ = d;
        self.wait_up();
    }

    /// Waits until the plugin answers and the SDC's admin socket serves.
    pub fn wait_up(&self) {
        let sock = self.socket.display().to_string();
        wait_for("the plugin socket", Duration::from_secs(20), || {
            sh(
                "curl",
                &[
                    "-sf",
                    "--unix-socket",
                    &sock,
                    "-X",
                    "POST",
                    "http://plugin/Plugin.Activate",
                ],
            )
            .ok
            .then_some(())
        });
        let sdc = bin("sdc").display().to_string();
        let state = self.state_dir.display().to_string();
        wait_for("the SDC's attach layer", Duration::from_secs(30), || {
            sh(&sdc, &["list", "--state-dir", &state]).ok.then_some(())
        });
    }

    /// `curl` a plugin endpoint with a JSON body: (HTTP status, body).
    pub fn call(&self, endpoint: &str, body: &str) -> (u16, String) {
        let o = sh(
            "curl",
            &[
                "-s",
                "--unix-socket",
                &self.socket.display().to_string(),
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
                "-w",
                "\n%{http_code}",
                &format!("http://plugin/{endpoint}"),
            ],
        );
        let (body, code) = o.stdout.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The loop devices this SDC attached.
    pub fn loops(&self) -> Vec<String> {
        match &self.managed {
            None => loops_under(&self.state_dir),
            Some(m) => loops_backed_by(&fuse_devs_of(&m.pids())),
        }
    }

    /// The plugin's mount references on disk: volume -> IDs.
    pub fn refs(&self) -> serde_json::Value {
        std::fs::read_to_string(self.state_dir.join("docker-mounts.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| v["volumes"].clone())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Stops the SDC with SIGTERM (it detaches what is unused) and waits for it.
    pub fn stop_sdc(d: &mut DataCluster) {
        PluginSdc::stop_proc(&mut d.sdc);
    }

    /// Stops an SDC process with SIGTERM, then SIGKILL if it lingers.
    pub fn stop_proc(p: &mut Proc) {
        p.signal(libc::SIGTERM);
        let gone = (0..200).any(|_| {
            if !p.alive() {
                return true;
            }
            std::thread::park_timeout(Duration::from_millis(100));
            false
        });
        if !gone {
            p.kill();
        }
        p.kill();
    }
}

impl Drop for PluginSdc {
    fn drop(&mut self) {
        if self.managed.is_some() {
            // The link to its state; its dockerd disables it and removes what is left (see
            // `Dockerd`'s drop).
            let _ = std::fs::remove_file(&self.state_dir);
            return;
        }
        let _ = std::fs::remove_file(&self.socket);
        for m in mounts_under(&self.mount_root) {
            let _ = sh("umount", &["-l", &m.display().to_string()]);
        }
        cleanup_attach_state(&self.state_dir);
    }
}

/// Undo whatever an SDC's attach layer left under `state_dir`: loop devices over its FUSE
/// files, the FUSE mount, and the keeper.
pub fn cleanup_attach_state(state_dir: &Path) {
    let fuse = state_dir.join("fuse");
    let list = sh(
        "losetup",
        &["--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"],
    );
    for line in list.stdout.lines() {
        if let Some((dev, file)) = line.split_once(' ') {
            if Path::new(file.trim()).starts_with(&fuse) {
                for m in mounts_of(dev) {
                    let _ = sh("umount", &["-l", &m]);
                }
                let _ = sh("losetup", &["-d", dev]);
            }
        }
    }
    if is_mounted(&fuse) {
        let _ = sh("umount", &["-l", &fuse.display().to_string()]);
    }
    if let Ok(pid) = std::fs::read_to_string(state_dir.join("fuse-keeper.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: kill(2) on the keeper this test's SDC started (its pid file).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Mount points of a device (by its source name).
fn mounts_of(dev: &str) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let src = right.split(' ').nth(1)?;
            (src == dev).then(|| left.split(' ').nth(4).map(str::to_string))?
        })
        .collect()
}

pub fn require_all() {
    for p in [
        "dockerd",
        "curl",
        "losetup",
        "mkfs.ext4",
        "mkfs.xfs",
        "blkid",
        "nsenter",
    ] {
        require(p).expect("tool installed");
    }
    assert!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing; ./test installs busybox-static"
    );
}

/// A cluster (1 MDM, 3 SDS), an SDC serving the plugin, and a private dockerd.
pub struct Setup {
    pub docker: Option<Dockerd>,
    pub plugin: Option<PluginSdc>,
    pub image: String,
    pub kind: Kind,
    pub d: DataCluster,
}

impl Setup {
    /// With the legacy plugin (the SDC daemon on the host).
    pub fn start(name: &str) -> Setup {
        Setup::start_kind(name, Kind::Legacy)
    }

    /// With the plugin of `kind`. The managed plugin takes over the cluster's SDC `sdc1`
    /// (its GUID and certificate), so what the cluster mapped to this host is the plugin's,
    /// and the cluster's NBD URIs ([`DataCluster::uri`]) reach the plugin's NBD socket.
    pub fn start_kind(name: &str, kind: Kind) -> Setup {
        require_all();
        let mut d = DataCluster::start(name, 3, 1);
        if kind == Kind::Legacy {
            let plugin = PluginSdc::enable(&mut d);
            let docker = Dockerd::start(&d.c.dir.join("docker"), None, &[]);
            let image = docker.import_busybox();
            return Setup {
                docker: Some(docker),
                plugin: Some(plugin),
                image,
                kind,
                d,
            };
        }
        let docker = Dockerd::start(&d.c.dir.join("docker"), None, &[]);
        let image = docker.import_busybox();
        let name = format!("mbt{}x{}", std::process::id(), rand::random::<u16>());
        let m = Managed::create(&docker, &name, &d.c.dir.path);
        PluginSdc::stop_sdc(&mut d);
        std::fs::create_dir_all(m.state_dir()).expect("the plugin's state dir");
        std::fs::copy(d.c.dir.join("sdc/guid"), m.state_dir().join("guid"))
            .expect("give the plugin sdc1's GUID");
        let o = m.set(&docker, &Managed::settings_for(&d.c, "sdc1"));
        assert!(o.ok, "docker plugin set: {}", o.stderr);
        docker.must(&["plugin", "enable", &name]);
        // Unix socket paths are at most 107 bytes: reach the plugin's state (admin and NBD
        // sockets) through a short link.
        let state = std::env::temp_dir().join(format!("{name}-sdc"));
        let _ = std::fs::remove_file(&state);
        std::os::unix::fs::symlink(m.state_dir(), &state).expect("link the plugin's state dir");
        d.socket = state.join("nbd.sock");
        let plugin = PluginSdc {
            driver: format!("{name}:latest"),
            socket: m.socket(),
            state_dir: state,
            mount_root: m.mount_root(),
            managed: Some(m),
        };
        plugin.wait_up();
        Setup {
            docker: Some(docker),
            plugin: Some(plugin),
            image,
            kind,
            d,
        }
    }

    pub fn docker(&self) -> &Dockerd {
        self.docker.as_ref().expect("dockerd")
    }

    pub fn plugin(&self) -> &PluginSdc {
        self.plugin.as_ref().expect("plugin")
    }

    pub fn drv(&self) -> String {
        self.plugin().driver.clone()
    }

    /// `docker run --rm` with the volume at /data; returns stdout.
    pub fn run(&self, vol: &str, script: &str) -> String {
        let v = format!("{vol}:/data");
        self.docker().must(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &v,
            &self.image,
            "sh",
            "-c",
            script,
        ])
    }

    /// Starts, in running container `c` (its volume at /data), a loop writing an increasing
    /// counter to /data/counter with an fsync each time, noting failed writes in /data/errors,
    /// until /data/stop exists; returns once it has written a few.
    pub fn start_fsync_writer(&self, c: &str) {
        self.docker().must(&[
            "exec",
            "-d",
            c,
            "sh",
            "-c",
            "i=0; while [ ! -e /data/stop ]; do i=$((i+1)); \
             echo $i | dd of=/data/counter conv=fsync 2>/dev/null || echo $i >> /data/errors; done",
        ]);
        wait_for("the writer to start", Duration::from_secs(20), || {
            (self.fsync_counter(c) > 10).then_some(())
        });
    }

    /// The fsync writer's last count in container `c` (0 before its first).
    pub fn fsync_counter(&self, c: &str) -> u64 {
        let o = self.docker().cli(&["exec", c, "cat", "/data/counter"]);
        o.stdout.trim().parse().unwrap_or(0)
    }

    /// Waits until the fsync writer in `c` has carried on, stops it and panics if any of its
    /// writes failed; returns the count it had reached when asked.
    pub fn check_fsync_writer(&self, c: &str) -> u64 {
        let after = self.fsync_counter(c);
        wait_for("the writer to carry on", Duration::from_secs(30), || {
            (self.fsync_counter(c) > after + 10).then_some(())
        });
        self.docker()
            .must(&["exec", c, "sh", "-c", "touch /data/stop"]);
        let errors = self.docker().cli(&["exec", c, "cat", "/data/errors"]);
        assert!(!errors.ok, "writes failed: {}", errors.stdout);
        after
    }

    /// What the plugin's SDC logged.
    pub fn sdc_log(&self) -> String {
        match &self.plugin().managed {
            Some(m) => m.log(self.docker()),
            None => self.d.sdc.log_text(),
        }
    }

    pub fn mountpoint(&self, vol: &str) -> PathBuf {
        self.plugin().mount_root.join(vol)
    }

    pub fn volume_mappings(&self, vol: &str) -> usize {
        let map = cluster_map(&self.d.c);
        let v = map.volume_by_name(vol).expect("volume");
        map.mappings_of(v.id).count()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Containers first (Docker unmounts through the plugin), then the SDC (SIGTERM: it
        // detaches what is unused), then whatever is left.
        drop(self.docker.take());
        if self.kind == Kind::Legacy {
            PluginSdc::stop_sdc(&mut self.d);
        }
        drop(self.plugin.take());
    }
}

pub fn loops_under(state_dir: &Path) -> Vec<String> {
    let fuse = state_dir.join("fuse");
    sh(
        "losetup",
        &["--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"],
    )
    .stdout
    .lines()
    .filter(|l| {
        l.split_once(' ')
            .is_some_and(|(_, f)| Path::new(f.trim()).starts_with(&fuse))
    })
    .map(str::to_string)
    .collect()
}

/// `qemu-io` on `uri`; panics unless it ran and every pattern read back verified.
pub fn must_qemu_io(uri: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let o = sh("qemu-io", &args);
    let all = format!("{}{}", o.stdout, o.stderr);
    assert!(o.ok && !all.contains("failed"), "qemu-io {cmds:?}: {all}");
}
