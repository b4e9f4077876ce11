//! Systemd "hosts" for the install test: containers of a private `dockerd` booting systemd from
//! a Debian root filesystem made with debootstrap, on an `--internal` network the test owns, so
//! a real `ansible-playbook` can install packages on them (see `OPS-FEASIBILITY.md`).
//!
//! The root filesystem is built once and cached outside the test's scratch directory
//! (`$MESHBLOCK_CACHE_DIR`, else `~/.cache/meshblock`), keyed by a hash of its recipe; a lock
//! file keeps concurrent tests from building or reading a half-written one.
//!
//! Everything is undone on drop, pass or fail: containers, the loop devices the hosts' SDCs
//! attached, the network, its bridge, the iptables rule, and the daemon.

use crate::docker::{sh, Dockerd, Out};
use crate::wait_for;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Debian suite of the hosts.
const SUITE: &str = "bookworm";
/// Packages baked into the hosts (they reach no repository): systemd as init, python3 for
/// ansible, tools the roles and the SDC's attach layer use.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,python3,iproute2,procps,e2fsprogs";
/// Bump when the steps after debootstrap change (part of the cache key).
const RECIPE_VERSION: u32 = 1;

/// The first Debian mirror of this machine's apt sources (the hosts' packages come from it).
fn debian_mirror() -> String {
    let text = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .or_else(|_| std::fs::read_to_string("/etc/apt/sources.list"))
        .unwrap_or_default();
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("URIs:") {
            if let Some(u) = rest.split_whitespace().find(|u| !u.contains("security")) {
                return u.to_string();
            }
        }
        if let Some(rest) = l.strip_prefix("deb ") {
            if let Some(u) = rest.split_whitespace().find(|u| u.contains("://")) {
                if !u.contains("security") {
                    return u.to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MESHBLOCK_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/meshblock")
}

/// An exclusive `flock` on a file, released on drop.
struct FileLock(std::fs::File);

impl FileLock {
    fn take(path: &Path) -> FileLock {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open lock {}: {e}", path.display()));
        // SAFETY: flock(2) on a descriptor this struct owns.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "lock {}", path.display());
        FileLock(f)
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: flock(2) on the descriptor this struct owns.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The host root filesystem as a tar file, built with debootstrap on first use and cached.
pub fn host_rootfs_tar() -> PathBuf {
    let mirror = debian_mirror();
    let recipe = format!(
        "debootstrap --variant=minbase --include={INCLUDE} {SUITE} ROOTFS {mirror}; \
         empty machine-id, no hostname, no apt caches; recipe {RECIPE_VERSION}"
    );
    let key = hex::encode(&Sha256::digest(recipe.as_bytes())[..8]);
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).expect("create the cache directory");
    let tar = dir.join(format!("host-rootfs-{key}.tar"));
    let _lock = FileLock::take(&dir.join("host-rootfs.lock"));
    if tar.exists() {
        return tar;
    }
    let rootfs = dir.join(format!("host-rootfs-{key}.build"));
    let _ = std::fs::remove_dir_all(&rootfs);
    let root = rootfs.display().to_string();
    eprintln!("building the host root filesystem ({recipe}) into {root}");
    let o = sh(
        "debootstrap",
        &[
            "--variant=minbase",
            &format!("--include={INCLUDE}"),
            SUITE,
            &root,
            &mirror,
        ],
    );
    assert!(o.ok, "debootstrap failed: {}{}", o.stdout, o.stderr);
    std::fs::write(rootfs.join("etc/machine-id"), "").expect("empty machine-id");
    let _ = std::fs::remove_file(rootfs.join("etc/hostname"));
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        if let Ok(rd) = std::fs::read_dir(rootfs.join(d)) {
            for e in rd.flatten() {
                if e.path().is_file() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    let partial = dir.join(format!("host-rootfs-{key}.tar.partial"));
    let o = sh(
        "tar",
        &["-C", &root, "-cf", &partial.display().to_string(), "."],
    );
    assert!(o.ok, "tar the host root filesystem: {}", o.stderr);
    std::fs::rename(&partial, &tar).expect("publish the host root filesystem");
    let _ = std::fs::remove_dir_all(&rootfs);
    tar
}

/// One host: a container booting systemd.
pub struct Host {
    /// The inventory name (and hostname), e.g. `n1`.
    pub name: String,
    /// The container's name in the private dockerd.
    pub container: String,
    pub ip: String,
    /// Host directory mounted at `/srv/disks` (the SDS devices are sparse files there).
    pub disks: PathBuf,
}

/// A private dockerd, an internal network and systemd hosts on it.
pub struct Hosts {
    pub hosts: Vec<Host>,
    /// The first three octets of the network, e.g. `10.77.42`.
    pub prefix: String,
    pub network: String,
    pub bridge: String,
    image: String,
    forward_rule: bool,
    loops_before: BTreeSet<String>,
    pub dir: PathBuf,
    /// Last: stops after everything above is removed.
    pub d: Dockerd,
}

/// Loop devices in use, by name.
fn loop_devices() -> Vec<(String, String)> {
    let o = sh(
        "losetup",
        &["--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"],
    );
    o.stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_string(), b.trim().to_string()))
        .collect()
}

impl Hosts {
    /// Starts a dockerd under `dir`, imports the host image and makes the network.
    pub fn start(dir: &Path) -> Hosts {
        let tar = host_rootfs_tar();
        let d = Dockerd::start(&dir.join("docker"), None, &[]);
        let loops_before = loop_devices().into_iter().map(|(n, _)| n).collect();
        let tag = tar
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("host-rootfs")
            .to_string();
        let image = format!("meshblock-test/{tag}");
        d.must(&[
            "import",
            "-c",
            "CMD [\"/sbin/init\"]",
            "-c",
            "ENV container=docker",
            &tar.display().to_string(),
            &image,
        ]);
        let octet = free_octet();
        let prefix = format!("10.77.{octet}");
        let network = format!("mbt{}net", std::process::id());
        let bridge = format!("mbtbr{}", 1000 + u32::from(octet));
        let mut h = Hosts {
            hosts: Vec::new(),
            prefix: prefix.clone(),
            network: network.clone(),
            bridge: bridge.clone(),
            image,
            forward_rule: false,
            loops_before,
            dir: dir.to_path_buf(),
            d,
        };
        h.d.must(&[
            "network",
            "create",
            "--internal",
            "--subnet",
            &format!("{prefix}.0/24"),
            "--gateway",
            &format!("{prefix}.1"),
            "-o",
            &format!("com.docker.network.bridge.name={bridge}"),
            &network,
        ]);
        let o = sh(
            "iptables",
            &[
                "-I", "FORWARD", "1", "-i", &bridge, "-o", &bridge, "-j", "ACCEPT",
            ],
        );
        assert!(o.ok, "iptables: {}", o.stderr);
        h.forward_rule = true;
        let o = sh(
            "sysctl",
            &["-w", &format!("net.ipv4.conf.{bridge}.forwarding=0")],
        );
        assert!(o.ok, "sysctl: {}", o.stderr);
        h
    }

    /// Starts host `name` at `.{10 + index}`; returns its index.
    pub fn add(&mut self, name: &str) -> usize {
        let i = self.hosts.len();
        let ip = format!("{}.{}", self.prefix, 11 + i);
        let container = format!("mbt{}-{name}", std::process::id());
        let disks = self.dir.join(format!("disks-{name}"));
        std::fs::create_dir_all(&disks).expect("disks dir");
        self.d.must(&[
            "run",
            "-d",
            "--name",
            &container,
            "--hostname",
            name,
            "--stop-signal",
            "SIGRTMIN+3",
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/run/lock",
            "--cap-add",
            "ALL",
            "--cap-drop",
            "SYS_RESOURCE",
            "--security-opt",
            "seccomp=unconfined",
            "--security-opt",
            "systempaths=unconfined",
            "-v",
            "/sys/fs/cgroup/systemd:/sys/fs/cgroup/systemd",
            "-v",
            "/sys/fs/cgroup/unified:/sys/fs/cgroup/unified",
            "-v",
            &format!("{}:/srv/disks", disks.display()),
            "--device",
            "/dev/fuse",
            "--device",
            "/dev/loop-control",
            "--device-cgroup-rule",
            "b 7:* rwm",
            "--network",
            &self.network,
            "--ip",
            &ip,
            "--dns",
            "127.0.0.1",
            &self.image,
        ]);
        self.hosts.push(Host {
            name: name.to_string(),
            container: container.clone(),
            ip,
            disks,
        });
        wait_for(
            &format!("systemd to boot in {name}"),
            Duration::from_secs(120),
            || {
                let o = self.exec(i, &["systemctl", "is-system-running"]);
                matches!(o.stdout.trim(), "running" | "degraded").then_some(())
            },
        );
        // No udev in the containers: loop device nodes for the SDC's attach layer.
        let o = self.exec(
            i,
            &[
                "sh",
                "-c",
                "for i in $(seq 0 255); do [ -e /dev/loop$i ] || mknod -m 660 /dev/loop$i b 7 $i; done",
            ],
        );
        assert!(o.ok, "make loop device nodes: {}", o.stderr);
        i
    }

    /// Runs a command in host `i`.
    pub fn exec(&self, i: usize, cmd: &[&str]) -> Out {
        let mut args = vec!["exec", &self.hosts[i].container];
        args.extend_from_slice(cmd);
        self.d.cli(&args)
    }

    /// Runs a command in host `i` and panics unless it succeeds; returns stdout.
    pub fn must_exec(&self, i: usize, cmd: &[&str]) -> String {
        let o = self.exec(i, cmd);
        assert!(
            o.ok,
            "{} {cmd:?} failed: {}{}",
            self.hosts[i].name, o.stdout, o.stderr
        );
        o.stdout
    }

    /// The host pid of host `i`'s init: `/proc/PID/root` reaches its files and sockets.
    pub fn pid(&self, i: usize) -> u32 {
        let s = self
            .d
            .must(&["inspect", "-f", "{{.State.Pid}}", &self.hosts[i].container]);
        s.trim().parse().expect("container pid")
    }

    /// A path inside host `i`, as this process reaches it.
    pub fn path_in(&self, i: usize, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid(i)))
    }

    /// What changed in host `i`'s filesystem since its image (`docker diff`), leaving out
    /// what the machinery touches on its own (journal, temporary files, ansible's own).
    pub fn fs_changes(&self, i: usize) -> Vec<String> {
        let out = self.d.must(&["diff", &self.hosts[i].container]);
        out.lines()
            .filter(|l| {
                let p = l.get(2..).unwrap_or("");
                ![
                    "/var/log",
                    "/tmp",
                    "/var/tmp",
                    "/root/.ansible",
                    "/dev",
                    "/var/lib/systemd",
                ]
                .iter()
                .any(|x| p == *x || p.starts_with(&format!("{x}/")))
                    && !["/root", "/var", "/var/lib", "/etc"].contains(&p)
            })
            .map(str::to_string)
            .collect::<BTreeSet<String>>()
            .into_iter()
            .collect()
    }

    /// SIGKILLs host `i`'s container (a host that dies).
    pub fn kill(&self, i: usize) {
        self.d.must(&["kill", &self.hosts[i].container]);
    }
}

/// A third octet for `10.77.X.0/24` that no route of this machine uses.
fn free_octet() -> u8 {
    let start = (std::process::id() % 200) as u8;
    (0..200u8)
        .map(|k| 20 + (start + k) % 200)
        .find(|o| {
            let r = sh("ip", &["-4", "route", "show", &format!("10.77.{o}.0/24")]);
            r.ok && r.stdout.trim().is_empty()
        })
        .expect("a free 10.77.X.0/24")
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = self.d.cli(&["rm", "-f", &h.container]);
        }
        // Loop devices the hosts' SDCs attached (over files of their FUSE directories) outlive
        // the containers: detach those that appeared since the start.
        for (dev, file) in loop_devices() {
            if !self.loops_before.contains(&dev) && file.starts_with("/var/lib/meshblock/") {
                let _ = sh("losetup", &["-d", &dev]);
            }
        }
        let _ = self.d.cli(&["network", "rm", &self.network]);
        if sh("ip", &["link", "show", &self.bridge]).ok {
            let _ = sh("ip", &["link", "del", &self.bridge]);
        }
        if self.forward_rule {
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
        let _ = self.d.cli(&["rmi", "-f", &self.image]);
    }
}
