//! Helpers shared by the integration tests: scratch directories, a port allocator, real
//! processes with logs in files (killed when dropped), an MDM cluster builder, scli runs, and
//! waiting on conditions with a deadline (never fixed sleeps).
//!
//! Every daemon is started with `--config` naming a file in the test's scratch directory
//! ([`Cluster::config_file`]), so a `/etc/meshblock/<daemon>.toml` on the machine running the
//! tests is never read; passwords go through files ([`Cluster::password_file`]).

use anyhow::{bail, Context};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Where the release binaries are (`./test` builds them first).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("MESHBLOCK_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    // target/<profile>/deps/this-test -> target/<profile>/NAME
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    profile_dir.join(name)
}

/// A scratch directory removed on drop (kept when MESHBLOCK_KEEP_TEST_DIRS is set).
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let base = std::env::var("MESHBLOCK_TEST_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(|_| std::env::temp_dir());
        let path = base.join(format!(
            "mb-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).expect("create test dir");
        TestDir { path }
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("MESHBLOCK_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// Test ports come from `[PORTS_LOW, PORTS_HIGH)`, below Linux's ephemeral range (32768 and
/// up by default): a process the tests restart gets its port back, where a port in the
/// ephemeral range may meanwhile be taken by any outgoing connection or client socket.
const PORTS_LOW: u16 = 10000;
const PORTS_HIGH: u16 = 32000;

/// A loopback port free for both UDP (QUIC) and TCP (metrics, NBD).
pub fn free_port() -> u16 {
    if NEXT_PORT.load(Ordering::SeqCst) == 0 {
        // Spread test binaries apart: 100-port blocks by pid.
        let blocks = u32::from((PORTS_HIGH - PORTS_LOW) / 100);
        let base = PORTS_LOW + (std::process::id() % blocks) as u16 * 100;
        let _ = NEXT_PORT.compare_exchange(0, base, Ordering::SeqCst, Ordering::SeqCst);
    }
    loop {
        let p = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        if p >= PORTS_HIGH {
            NEXT_PORT.store(PORTS_LOW, Ordering::SeqCst);
            continue;
        }
        if UdpSocket::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p)).is_ok()
        {
            return p;
        }
    }
}

/// The least time any wait gives its condition. A wait's own `timeout` says how long the step
/// takes on an idle machine at most; on a fresh, busy one (a cold build, the install test's
/// hosts beside it) a restart, a placement or a failover may take many times that. The limit only
/// ends a test that hangs; it never decides that a slow step failed.
pub const WAIT_FLOOR: Duration = Duration::from_secs(300);

/// Poll `f` until it returns `Some`, or fail after `timeout` (at least [`WAIT_FLOOR`]) with
/// `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    wait_for_explained(what, timeout, f, String::new)
}

/// [`wait_for`], whose failure adds what `explain` says (what was last seen, logs).
pub fn wait_for_explained<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
    explain: impl FnOnce() -> String,
) -> T {
    let timeout = timeout.max(WAIT_FLOOR);
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}{}",
                explain()
            );
        }
        std::thread::park_timeout(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A child process a test spawned (a long-running client); SIGKILLed and reaped on drop, so a
/// failing test leaves nothing running.
pub struct Spawned(pub std::process::Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running process; SIGKILLed and reaped on drop.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
    cmd: Vec<String>,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> Proc {
        let mut p = Proc {
            name: name.into(),
            child: None,
            log,
            cmd: Vec::new(),
        };
        p.cmd = std::iter::once(program.display().to_string())
            .chain(args.iter().cloned())
            .collect();
        p.start();
        p
    }

    /// [`spawn`](Self::spawn) inside `node`'s network namespace (when given).
    pub fn spawn_in(
        node: Option<&netns::Node>,
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Proc {
        match node {
            None => Proc::spawn(name, program, args, log),
            Some(n) => {
                let mut full = netns::Net::exec_prefix(n);
                full.push(program.display().to_string());
                full.extend(args.iter().cloned());
                Proc::spawn(name, Path::new("ip"), &full, log)
            }
        }
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let err = log.try_clone().expect("clone log");
        let mut cmd = Command::new(&self.cmd[0]);
        // SAFETY: prctl in the forked child before exec; async-signal-safe.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                // Die with the test thread that started us, even if the test panics.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.cmd[0]));
        self.child = Some(child);
    }

    /// The program and arguments `start` runs.
    pub fn cmd(&self) -> Vec<String> {
        self.cmd.clone()
    }

    /// Run another program or other arguments at the next `start`.
    pub fn set_cmd(&mut self, cmd: Vec<String>) {
        self.cmd = cmd;
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(pid, sig) };
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // Resume a frozen process so it can die.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
        }
        self.kill();
    }
}

/// The outcome of one scli run.
#[derive(Debug)]
pub struct Scli {
    pub ok: bool,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Scli {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("scli output is not JSON ({e}): {}", self.stdout))
    }
}

/// One MDM of a test cluster.
pub struct Mdm {
    pub name: String,
    /// Its network namespace, in partition tests.
    pub node: Option<netns::Node>,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    /// Its HTTPS REST API and dashboard.
    pub api: SocketAddr,
    pub proc: Proc,
}

impl Mdm {
    /// A metric's value from its Prometheus endpoint.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(self.metrics, "/metrics").ok()?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }
    pub fn is_leader(&self) -> bool {
        self.metric("meshblock_mdm_is_leader") == Some(1.0)
    }
}

/// A minimal HTTP GET over TCP.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

pub const ADMIN_PASSWORD: &str = "Password1";

/// A cluster of MDMs on loopback, with a CA, an admin certificate and an scli session.
pub struct Cluster {
    pub mdms: Vec<Mdm>,
    pub extra_mdm_args: Vec<String>,
    /// Set in partition tests: every daemon runs in a namespace of its own.
    pub net: Option<std::sync::Arc<netns::Net>>,
    /// Last, so the scratch directory goes after the processes and namespaces.
    pub dir: TestDir,
}

impl Cluster {
    /// Start `n` MDMs (1, 3 or 5): the first bootstraps, the others join as standbys, then the
    /// cluster switches to `n`_node mode.
    pub fn start(name: &str, n: usize, extra_mdm_args: &[&str]) -> Cluster {
        Cluster::start_in(name, n, extra_mdm_args, None)
    }

    /// [`start`](Self::start), each MDM in a namespace of `net` when given.
    pub fn start_in(
        name: &str,
        n: usize,
        extra_mdm_args: &[&str],
        net: Option<std::sync::Arc<netns::Net>>,
    ) -> Cluster {
        let dir = TestDir::new(name);
        let ca = dir.join("ca").display().to_string();
        run_ok(&bin("meshblock-ca"), &["init", "--dir", &ca]);
        for who in ["mdm", "admin"] {
            run_ok(
                &bin("meshblock-ca"),
                &[
                    "issue",
                    "--ca-dir",
                    &ca,
                    "--name",
                    who,
                    "--out",
                    &dir.join(&format!("certs/{who}")).display().to_string(),
                ],
            );
        }
        let mut c = Cluster {
            dir,
            mdms: Vec::new(),
            extra_mdm_args: extra_mdm_args.iter().map(|s| s.to_string()).collect(),
            net,
        };
        for i in 1..=n {
            c.spawn_mdm(i, i == 1);
        }
        c.wait_leader(Duration::from_secs(10));
        wait_for("admin login", Duration::from_secs(10), || {
            let pw = c.password_file(ADMIN_PASSWORD).display().to_string();
            let r = c.scli_raw(&[
                "--login",
                "--username",
                "admin",
                "--password_file",
                &pw,
                "--mdm_ip",
                &c.mdm_ips(),
            ]);
            r.ok.then_some(())
        });
        for i in 2..=n {
            let addr = c.mdms[i - 1].addr.to_string();
            let name = c.mdms[i - 1].name.clone();
            c.must_scli(&[
                "--add_standby_mdm",
                "--new_mdm_ip",
                &addr,
                "--mdm_name",
                &name,
            ]);
        }
        if n > 1 {
            c.must_scli(&[
                "--switch_cluster_mode",
                "--cluster_mode",
                &format!("{n}_node"),
            ]);
        }
        c
    }

    /// Start MDM `mdmI` (bootstrapping a new cluster when `bootstrap`); a later MDM joins with
    /// `--add_standby_mdm`.
    pub fn spawn_mdm(&mut self, i: usize, bootstrap: bool) {
        let port = free_port();
        let mport = free_port();
        let name = format!("mdm{i}");
        let node = self.net.as_ref().map(|n| n.node(&name));
        let ip = node.as_ref().map_or([127, 0, 0, 1], |n| n.ip.octets());
        let addr: SocketAddr = (ip, port).into();
        let metrics: SocketAddr = (ip, mport).into();
        let api: SocketAddr = (ip, free_port()).into();
        // A test's own --config (in `extra_mdm_args`) replaces the harness's empty one.
        let mut args: Vec<String> = Vec::new();
        if !self.extra_mdm_args.iter().any(|a| a == "--config") {
            args.extend([
                "--config".into(),
                self.config_file("mdm").display().to_string(),
            ]);
        }
        args.extend([
            "--name".into(),
            name.clone(),
            "--listen".into(),
            addr.to_string(),
            "--data-dir".into(),
            self.dir.join(&name).display().to_string(),
            "--cert-dir".into(),
            self.dir.join("certs/mdm").display().to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
            "--api-listen".into(),
            api.to_string(),
        ]);
        args.extend(self.extra_mdm_args.iter().cloned());
        if bootstrap {
            let pw = self.password_file(ADMIN_PASSWORD).display().to_string();
            let once: Vec<&str> = std::iter::once("bootstrap")
                .chain(args.iter().map(String::as_str))
                .chain(["--admin-password-file", &pw])
                .collect();
            run_ok(&bin("mdm"), &once);
        }
        args.insert(0, "run".into());
        let proc = Proc::spawn_in(
            node.as_ref(),
            &name,
            &bin("mdm"),
            &args,
            self.dir.join(&format!("{name}.log")),
        );
        self.mdms.push(Mdm {
            name,
            node,
            addr,
            metrics,
            api,
            proc,
        });
    }

    pub fn mdm_ips(&self) -> String {
        self.mdms
            .iter()
            .map(|m| m.addr.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the MDM that leads, waiting for one.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        wait_for("an MDM leader", timeout, || {
            self.mdms
                .iter()
                .position(|m| m.proc.child.is_some() && m.is_leader())
        })
    }

    /// The configuration file every daemon of this cluster is started with (`--config`): empty,
    /// so the daemons run on built-in defaults and flags and never read a stray
    /// /etc/meshblock/<daemon>.toml of the machine running the tests.
    pub fn config_file(&self, daemon: &str) -> PathBuf {
        let p = self.dir.join(&format!("{daemon}.toml"));
        if !p.exists() {
            std::fs::write(
                &p,
                "# Written by the test harness: built-in defaults, flags override.\n",
            )
            .expect("write the daemon's configuration file");
        }
        p
    }

    /// A file holding `password` (mode 0600), for scli's --password_file and mdm's
    /// --admin-password-file.
    pub fn password_file(&self, password: &str) -> PathBuf {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.dir.join(&format!("password-{password}"));
        if !p.exists() {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&p)
                .expect("create the password file");
            std::io::Write::write_all(&mut f, format!("{password}\n").as_bytes())
                .expect("write the password file");
        }
        p
    }

    pub fn session_file(&self) -> PathBuf {
        self.dir.join("scli-session.json")
    }

    /// Run scli with this cluster's admin certificate and session.
    pub fn scli_raw(&self, args: &[&str]) -> Scli {
        self.scli_as(&self.session_file(), args)
    }

    /// scli with `args` under this cluster's admin session, to spawn (see [`Spawned`]).
    pub fn scli_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("scli"));
        c.args(args)
            .env("MESHBLOCK_CERT_DIR", self.dir.join("certs/admin"))
            .env("MESHBLOCK_SCLI_SESSION", self.session_file());
        c
    }

    pub fn scli_as(&self, session: &Path, args: &[&str]) -> Scli {
        let out: Output = Command::new(bin("scli"))
            .args(args)
            .env("MESHBLOCK_CERT_DIR", self.dir.join("certs/admin"))
            .env("MESHBLOCK_SCLI_SESSION", session)
            .output()
            .expect("run scli");
        Scli {
            ok: out.status.success(),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run scli and panic unless it succeeds.
    pub fn must_scli(&self, args: &[&str]) -> Scli {
        let r = self.scli_raw(args);
        assert!(
            r.ok,
            "scli {args:?} failed ({}): {}{}",
            r.code, r.stdout, r.stderr
        );
        r
    }

    pub fn query_all(&self) -> serde_json::Value {
        self.must_scli(&["--query_all", "--json"]).json()
    }

    /// Restart a stopped MDM with its old data and port.
    pub fn restart(&mut self, i: usize) {
        self.mdms[i].proc.start();
    }
}

/// Run a command and fail unless it succeeds.
pub fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    if !out.status.success() {
        panic!(
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command, returning its output whatever the status.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))
}

/// Fail unless a program is installed.
pub fn require(program: &str) -> anyhow::Result<()> {
    match Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("{program} is not installed; ./test installs it"),
    }
}

/// Send one control request to the leader (following redirects) with the given certificate.
pub fn control_request(
    cert_dir: &Path,
    mdm_ips: &str,
    req: &proto::msg::MdmRequest,
) -> Result<proto::msg::MdmResponse, proto::WireError> {
    use proto::codec::{kind, Frame};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let id = proto::transport::Identity::load(cert_dir).expect("load identity");
        let ep = proto::transport::Endpoint::client(&id, "test").expect("endpoint");
        let mut addrs: Vec<String> = mdm_ips.split(',').map(String::from).collect();
        let mut last = proto::WireError::new(proto::ErrorCode::Unavailable, "no MDM answered");
        for _ in 0..10 {
            let Some(a) = addrs.first().cloned() else {
                break;
            };
            addrs.rotate_left(1);
            let Ok(sock) = a.parse() else { continue };
            let Ok(c) = ep.connect(sock).await else {
                continue;
            };
            let body = serde_json::to_vec(req).expect("encode");
            let f = match c
                .call_timeout(
                    Frame::request(kind::CONTROL, body, bytes::Bytes::new()),
                    Duration::from_secs(10),
                )
                .await
            {
                Ok(f) => f,
                Err(_) => continue,
            };
            match proto::transport::check_status(f) {
                Ok(f) => return Ok(serde_json::from_slice(&f.meta).expect("decode response")),
                Err(e) if e.code == proto::ErrorCode::NotLeader && !e.message.is_empty() => {
                    addrs.insert(0, e.message.clone());
                    last = e;
                }
                Err(e) => {
                    last = e;
                    if last.code != proto::ErrorCode::NotLeader
                        && last.code != proto::ErrorCode::Unavailable
                    {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    })
}

/// A whole cluster with data plane: 1 MDM, `n_sds` SDS with sparse-file devices, one SDC
/// serving volume `vol1` (thin) on a unix socket.
pub struct DataCluster {
    pub sds: Vec<Proc>,
    pub sds_addrs: Vec<SocketAddr>,
    /// Each SDS's Prometheus endpoint.
    pub sds_metrics: Vec<SocketAddr>,
    /// Each SDS's namespace, in partition tests.
    pub sds_nodes: Vec<Option<netns::Node>>,
    pub sdc: Proc,
    pub sdc_node: Option<netns::Node>,
    pub socket: PathBuf,
    /// Last: the MDMs, namespaces and scratch directory go after the other processes.
    pub c: Cluster,
}

impl DataCluster {
    pub fn start(name: &str, n_sds: usize, vol_gb: u32) -> DataCluster {
        DataCluster::start_with(name, n_sds, vol_gb, &[])
    }

    /// [`start`](Self::start) with extra flags for every SDS.
    pub fn start_with(name: &str, n_sds: usize, vol_gb: u32, sds_extra: &[&str]) -> DataCluster {
        DataCluster::start_full(name, 1, n_sds, vol_gb, sds_extra)
    }

    /// [`start_with`](Self::start_with) on `n_mdm` MDMs.
    pub fn start_full(
        name: &str,
        n_mdm: usize,
        n_sds: usize,
        vol_gb: u32,
        sds_extra: &[&str],
    ) -> DataCluster {
        DataCluster::start_net(name, n_mdm, n_sds, vol_gb, sds_extra, None)
    }

    /// [`start_full`](Self::start_full) with every daemon in a namespace of `net`.
    pub fn start_net(
        name: &str,
        n_mdm: usize,
        n_sds: usize,
        vol_gb: u32,
        sds_extra: &[&str],
        net: Option<std::sync::Arc<netns::Net>>,
    ) -> DataCluster {
        DataCluster::start_opts(
            name,
            &DataOpts {
                n_mdm,
                n_sds,
                vol_gb,
                sds_extra: sds_extra.iter().map(|s| s.to_string()).collect(),
                net,
                ..DataOpts::default()
            },
        )
    }

    /// The most general start: see [`DataOpts`].
    pub fn start_opts(name: &str, o: &DataOpts) -> DataCluster {
        let mdm_extra: Vec<&str> = o.mdm_extra.iter().map(String::as_str).collect();
        let c = Cluster::start_in(name, o.n_mdm, &mdm_extra, o.net.clone());
        let mut sds_nodes = Vec::new();
        c.must_scli(&["--add_protection_domain", "--protection_domain_name", "pd1"]);
        c.must_scli(&[
            "--add_storage_pool",
            "--protection_domain_name",
            "pd1",
            "--storage_pool_name",
            "sp1",
            "--pg_count",
            "64",
        ]);
        if !o.adaptive_rebuild {
            c.must_scli(&[
                "--set_rebuild_rebalance_policy",
                "--storage_pool_name",
                "sp1",
                "--adaptive",
                "off",
            ]);
        }
        for f in 0..o.fault_sets {
            c.must_scli(&[
                "--add_fault_set",
                "--protection_domain_name",
                "pd1",
                "--fault_set_name",
                &format!("fs{}", f + 1),
            ]);
        }
        let mut sds = Vec::new();
        let mut sds_addrs = Vec::new();
        let mut sds_metrics = Vec::new();
        for i in 1..=o.n_sds {
            let (p, addr, metrics, node) = spawn_sds(&c, o, i);
            sds.push(p);
            sds_nodes.push(node);
            sds_addrs.push(addr);
            sds_metrics.push(metrics);
        }
        // Every SDS must have reported its capacity and hold copies before the volume exists:
        // an SDS whose capacity arrives later is filled by rebalance, moving data under the
        // test.
        wait_for(
            "every PG placed, over every SDS with reported capacity",
            Duration::from_secs(20),
            || {
                // An SDS that exited (a bad flag, a device it cannot open) never reports.
                for p in sds.iter_mut() {
                    if !p.alive() {
                        panic!("{} exited at start:\n{}", p.name, p.log_text());
                    }
                }
                let map = cluster_map(&c);
                let pool = map.pools.values().find(|p| p.name == "sp1")?;
                let placed = pool
                    .pgs
                    .iter()
                    .all(|m| m.primary.is_some() && m.secondary.is_some());
                let used = map
                    .sds
                    .values()
                    .filter(|x| {
                        x.capacity_in(pool.id) > 0
                            && pool
                                .pgs
                                .iter()
                                .any(|m| m.primary == Some(x.id) || m.secondary == Some(x.id))
                    })
                    .count();
                (placed && used == o.n_sds).then_some(())
            },
        );
        let sdc_node = o.net.as_ref().map(|x| x.node("sdc1"));
        let (sdc, socket) = spawn_sdc(&c, "sdc1", sdc_node.as_ref(), &o.sdc_extra);
        c.must_scli(&[
            "--add_volume",
            "--storage_pool_name",
            "sp1",
            "--size_gb",
            &o.vol_gb.to_string(),
            "--volume_name",
            "vol1",
            "--thin_provisioned",
        ]);
        c.must_scli(&[
            "--map_volume_to_sdc",
            "--volume_name",
            "vol1",
            "--sdc_name",
            "sdc1",
        ]);
        let d = DataCluster {
            c,
            sds,
            sds_addrs,
            sds_metrics,
            sds_nodes,
            sdc,
            sdc_node,
            socket,
        };
        wait_export(&d.uri("vol1"));
        d
    }

    pub fn uri(&self, vol: &str) -> String {
        format!("nbd+unix:///{vol}?socket={}", self.socket.display())
    }

    /// `scli --set_rebuild_rebalance_policy` on pool sp1 with `args` (e.g. `--concurrency 1`).
    pub fn set_rebuild_policy(&self, args: &[&str]) {
        let mut a = vec![
            "--set_rebuild_rebalance_policy",
            "--storage_pool_name",
            "sp1",
        ];
        a.extend_from_slice(args);
        self.c.must_scli(&a);
    }

    /// The index in `sds` of the primary of `volume`'s chunk `index` (its own layer), with the
    /// chunk's pool, PG and epoch.
    pub fn primary_of_chunk(
        &self,
        volume: &str,
        index: u64,
    ) -> (
        usize,
        proto::PoolId,
        proto::PgId,
        proto::Epoch,
        proto::ChunkId,
    ) {
        let map = cluster_map(&self.c);
        let vol = map.volume_by_name(volume).expect("the volume in the map");
        let pool = map.pools.get(&vol.pool).expect("its pool");
        let chunk = proto::ChunkId::new(vol.vtree, proto::ChunkIndex(index)).in_layer(vol.layer);
        let pg = chunk.pg(pool.pg_count);
        let primary = pool.pg(pg).and_then(|m| m.primary).expect("a primary");
        let name = &map.sds.get(&primary).expect("primary in the map").name;
        let i = self
            .sds
            .iter()
            .position(|p| &p.name == name)
            .expect("a started SDS");
        (i, pool.id, pg, pool.epoch, chunk)
    }

    /// The value of the Prometheus metric `name` on SDS `i` (NaN when absent or unreachable).
    pub fn sds_metric(&self, i: usize, name: &str) -> f64 {
        let text = http_get(self.sds_metrics[i], "/metrics").unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    }

    /// Set the fail points of SDS `i` (started with `--failpoints-file {dir}/{name}.failpoints`)
    /// to `spec` and wait until its watcher applied them, as its log says: the watcher polls
    /// the file, so a step that must run armed or disarmed cannot follow the write blindly.
    pub fn set_failpoints(&self, i: usize, spec: &str) {
        let name = format!("sds{}", i + 1);
        let file = format!("{name}.failpoints");
        let applied = |log: &str| {
            log.lines().rev().find_map(|l| {
                l.split_once(&format!("{file}:"))
                    .map(|(_, s)| s.trim().to_string())
            })
        };
        if applied(&self.sds[i].log_text()).unwrap_or_default() == spec.trim() {
            return;
        }
        std::fs::write(self.c.dir.join(&file), spec).expect("write the fail points file");
        wait_for(
            &format!("{name} to apply the fail points {spec:?}"),
            Duration::from_secs(60),
            || (applied(&self.sds[i].log_text()).as_deref() == Some(spec.trim())).then_some(()),
        );
    }

    /// Start another SDC host named `name` (state under `<dir>/<name>`) and wait until it
    /// registered; returns the process and its NBD socket.
    pub fn start_sdc(&self, name: &str) -> (Proc, PathBuf) {
        spawn_sdc(&self.c, name, None, &[])
    }
    /// Add and start SDS number `i` (named `sdsI`, in fault set `fs((i-1) % fault_sets + 1)`
    /// when `o` has fault sets) to the running cluster.
    pub fn add_sds(&mut self, o: &DataOpts, i: usize) {
        let (p, addr, metrics, node) = spawn_sds(&self.c, o, i);
        self.sds.push(p);
        self.sds_nodes.push(node);
        self.sds_addrs.push(addr);
        self.sds_metrics.push(metrics);
    }
}

/// Wait until the NBD export at `uri` answers (`nbdinfo --size`).
pub fn wait_export(uri: &str) {
    wait_for(
        &format!("{uri} exported over NBD"),
        Duration::from_secs(20),
        || {
            run("nbdinfo", &["--size", uri])
                .ok()
                .filter(|o| o.status.success())
                .map(|_| ())
        },
    );
}

/// The certificate directory for `common_name` (`sdc:host1`, `sds:sds1`...), issued by the
/// cluster CA on first use into `certs/<common_name>`.
pub fn cert_dir(c: &Cluster, common_name: &str) -> PathBuf {
    let dir = c
        .dir
        .join(&format!("certs/{}", common_name.replace(':', "-")));
    if !dir.join("node.pem").exists() {
        // In process: tests also issue names that give no role (a bare `sdc`), which
        // meshblock-ca refuses.
        proto::ca::issue(&c.dir.join("ca"), common_name, &dir).expect("issue a certificate");
    }
    dir
}

/// The certificate directory of SDC host `name` (`sdc:NAME`): an SDC speaks only for itself.
pub fn sdc_cert(c: &Cluster, name: &str) -> PathBuf {
    cert_dir(c, &format!("sdc:{name}"))
}

/// The arguments of `sdc` for a host named `name` of cluster `c` with state in `state` (NBD
/// socket `state/nbd.sock`, metrics on a free loopback port).
pub fn sdc_run_args(c: &Cluster, name: &str, state: &Path) -> Vec<String> {
    vec![
        "run".into(),
        "--config".into(),
        c.config_file("sdc").display().to_string(),
        "--name".into(),
        name.into(),
        "--mdm".into(),
        c.mdm_ips(),
        "--cert-dir".into(),
        sdc_cert(c, name).display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "--nbd-socket".into(),
        state.join("nbd.sock").display().to_string(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{}", free_port()),
    ]
}

/// Start an SDC named `name` with its state dir and NBD socket under `<dir>/<name>` (the
/// first one, `sdc1`, keeps the historical `<dir>/sdc`) and `extra` flags, and wait until it
/// registered.
fn spawn_sdc(
    c: &Cluster,
    name: &str,
    node: Option<&netns::Node>,
    extra: &[String],
) -> (Proc, PathBuf) {
    let state = if name == "sdc1" {
        c.dir.join("sdc")
    } else {
        c.dir.join(name)
    };
    let socket = state.join("nbd.sock");
    let mut args = sdc_run_args(c, name, &state);
    args.extend(extra.iter().cloned());
    let sdc = Proc::spawn_in(
        node,
        name,
        &bin("sdc"),
        &args,
        c.dir.join(&format!("{name}.log")),
    );
    wait_for("the SDC to register", Duration::from_secs(20), || {
        c.scli_raw(&["--query_sdc", "--sdc_name", name])
            .ok
            .then_some(())
    });
    (sdc, socket)
}

/// One raw data-plane request to the SDS at `addr`, with the certificate of SDC host `sdc`:
/// the response data, or the refusal's code and message.
pub fn data_call(
    c: &Cluster,
    sdc: &str,
    addr: SocketAddr,
    h: &proto::data::DataHeader,
    data: bytes::Bytes,
) -> Result<bytes::Bytes, (proto::ErrorCode, String)> {
    data_call_as(&sdc_cert(c, sdc), addr, h, data)
}

/// [`data_call`] with the certificate in `cert` (e.g. `certs/sds2`, an SDS's).
pub fn data_call_as(
    cert: &Path,
    addr: SocketAddr,
    h: &proto::data::DataHeader,
    data: bytes::Bytes,
) -> Result<bytes::Bytes, (proto::ErrorCode, String)> {
    use proto::codec::{kind, Frame};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cert = cert.to_path_buf();
    rt.block_on(async {
        let id = proto::transport::Identity::load(&cert).expect("identity");
        let ep = proto::transport::Endpoint::client(&id, "test").expect("endpoint");
        let conn = ep.connect(addr).await.expect("connect to SDS");
        let f = conn
            .call_timeout(
                Frame::request(kind::DATA, bytes::Bytes::copy_from_slice(&h.encode()), data),
                Duration::from_secs(10),
            )
            .await
            .expect("data call");
        if f.status == 0 {
            Ok(f.data)
        } else {
            Err((
                proto::ErrorCode::from_u16(f.status).unwrap_or(proto::ErrorCode::Internal),
                String::from_utf8_lossy(&f.meta).into_owned(),
            ))
        }
    })
}

pub mod docker;

/// A recording writer ([`nbd::write_load`], QD32) on `vol1` of a [`DataCluster`], in a thread.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Writes acknowledged so far.
    pub acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<WriterResult>>,
}

/// What the writer thread returns: its report, the model of the region, uncertain blocks.
pub type WriterResult =
    std::io::Result<(nbd::WriteReport, Vec<u8>, std::collections::HashSet<u64>)>;

impl Writer {
    /// Write random blocks over the first `region` bytes of `vol1` until stopped.
    pub fn start(dc: &DataCluster, region: u64, seed: u64) -> Writer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, a, socket) = (stop.clone(), acked.clone(), dc.socket.clone());
        let thread =
            std::thread::spawn(move || nbd::write_load(&socket, "vol1", region, 32, seed, s, a));
        Writer {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    /// Wait until `n` more writes were acknowledged.
    pub fn wait_more(&self, n: u64, what: &str) {
        use std::sync::atomic::Ordering;
        let base = self.acked.load(Ordering::Relaxed);
        wait_for(what, Duration::from_secs(120), || {
            (self.acked.load(Ordering::Relaxed) >= base + n).then_some(())
        });
    }

    /// Stop and return what the writer did (it flushed before returning).
    pub fn finish(mut self) -> (nbd::WriteReport, Vec<u8>, std::collections::HashSet<u64>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let t = self.thread.take().expect("writer thread");
        t.join().expect("writer panicked").expect("writer failed")
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The SDC's metrics address (its `--metrics-listen`).
pub fn sdc_metrics(d: &mut DataCluster) -> SocketAddr {
    let cmd = d.sdc.cmd();
    let at = cmd
        .iter()
        .position(|a| a == "--metrics-listen")
        .expect("metrics flag");
    cmd[at + 1].parse().expect("metrics address")
}

/// The value of `name{volume="VOLUME"}` in the metrics at `addr`.
pub fn volume_metric(addr: SocketAddr, name: &str, volume: &str) -> Option<f64> {
    let body = http_get(addr, "/metrics").ok()?;
    let key = format!("{name}{{volume=\"{volume}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
}

/// The state `scli --query_sds` reports for SDS `name` (empty if the query fails).
pub fn sds_state(dc: &DataCluster, name: &str) -> String {
    state_of(&query_sds(dc, name))
}

fn query_sds(dc: &DataCluster, name: &str) -> Scli {
    dc.c.scli_raw(&["--query_sds", "--sds_name", name, "--json"])
}

/// The `state` of a `--json` query's answer (empty if the query failed).
fn state_of(v: &Scli) -> String {
    match v.ok {
        true => v.json()["state"].as_str().unwrap_or_default().to_string(),
        false => String::new(),
    }
}

/// On a timeout, the panic shows what scli last answered and the ends of the SDS's and the
/// MDMs' logs (why the SDS did not start or report, when it did not).
pub fn wait_sds_state(dc: &DataCluster, name: &str, want: &str) {
    let last = std::cell::RefCell::new(None);
    wait_for_explained(
        &format!("SDS {name} {want}"),
        Duration::from_secs(60),
        || {
            let v = query_sds(dc, name);
            let reached = state_of(&v) == want;
            *last.borrow_mut() = Some(v);
            reached.then_some(())
        },
        || {
            let answer = match &*last.borrow() {
                Some(v) => format!("({}): {}{}", v.code, v.stdout, v.stderr),
                None => "nothing".to_string(),
            };
            let sds = dc.sds.iter().filter(|p| p.name == name);
            let logs: Vec<String> = sds
                .map(|p| (&p.name, log_tail(&p.log_text(), 40)))
                .chain(
                    dc.c.mdms
                        .iter()
                        .map(|m| (&m.name, log_tail(&m.proc.log_text(), 15))),
                )
                .map(|(who, tail)| format!("--- {who}:\n{tail}"))
                .collect();
            format!(
                "; scli last answered {answer}\nthe ends of the logs:\n{}",
                logs.join("\n")
            )
        },
    );
}

/// The last `n` lines of `text`.
pub fn log_tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How [`DataCluster::start_opts`] builds a cluster.
#[derive(Clone)]
pub struct DataOpts {
    pub n_mdm: usize,
    pub n_sds: usize,
    pub vol_gb: u32,
    /// Extra flags for every SDS; `{name}` in one is replaced by the SDS's name, `{dir}` by the
    /// cluster's scratch directory.
    pub sds_extra: Vec<String>,
    pub net: Option<std::sync::Arc<netns::Net>>,
    /// Fault sets `fs1..fsN` (0: none); SDS i goes to `fs((i-1) % N + 1)`.
    pub fault_sets: usize,
    /// Size of each SDS's sparse device file.
    pub dev_bytes: u64,
    /// Keep the pool's default adaptive rebuild throttle (it slows rebuilds to 10 MiB/s per
    /// SDS while clients write); otherwise tests turn it off so their rebuilds under writers
    /// run at full speed.
    pub adaptive_rebuild: bool,
    /// The sds binary to run (default: [`bin`]`("sds")`), e.g. one built with fail points.
    pub sds_bin: Option<PathBuf>,
    /// Extra flags for the SDC `sdc1`.
    pub sdc_extra: Vec<String>,
    /// Extra flags for every MDM.
    pub mdm_extra: Vec<String>,
    /// Add SDS with `scli --add_sds --wait`, checking that it returns once the rebalance onto
    /// the new SDS is over.
    pub add_sds_wait: bool,
}

impl Default for DataOpts {
    fn default() -> Self {
        DataOpts {
            n_mdm: 1,
            n_sds: 3,
            vol_gb: 4,
            sds_extra: Vec::new(),
            net: None,
            fault_sets: 0,
            dev_bytes: 4 << 30,
            adaptive_rebuild: false,
            sds_bin: None,
            sdc_extra: Vec::new(),
            mdm_extra: Vec::new(),
            add_sds_wait: false,
        }
    }
}

/// Create SDS number `i` (device, certificate, `--add_sds`) and start it.
fn spawn_sds(
    c: &Cluster,
    o: &DataOpts,
    i: usize,
) -> (Proc, SocketAddr, SocketAddr, Option<netns::Node>) {
    let n = format!("sds{i}");
    let dev = c.dir.join(&format!("{n}.img"));
    std::fs::File::create(&dev)
        .and_then(|f| f.set_len(o.dev_bytes))
        .expect("device file");
    run_ok(
        &bin("meshblock-ca"),
        &[
            "issue",
            "--ca-dir",
            &c.dir.join("ca").display().to_string(),
            "--name",
            &format!("sds:{n}"),
            "--out",
            &c.dir.join(&format!("certs/{n}")).display().to_string(),
        ],
    );
    let node = o.net.as_ref().map(|x| x.node(&n));
    let ip = node.as_ref().map_or([127, 0, 0, 1], |x| x.ip.octets());
    let addr: SocketAddr = (ip, free_port()).into();
    let metrics: SocketAddr = (ip, free_port()).into();
    let fs = (o.fault_sets > 0).then(|| format!("fs{}", (i - 1) % o.fault_sets + 1));
    let mut add = vec![
        "--add_sds".to_string(),
        "--sds_ip".into(),
        addr.to_string(),
        "--sds_name".into(),
        n.clone(),
        "--protection_domain_name".into(),
        "pd1".into(),
        "--storage_pool_name".into(),
        "sp1".into(),
        "--device_path".into(),
        dev.display().to_string(),
    ];
    if let Some(fs) = fs {
        add.extend(["--fault_set_name".to_string(), fs]);
    }
    // With `add_sds_wait`, scli follows the SDS until its rebalance ends: it runs while the SDS
    // starts, and is waited for after.
    let waiter = if o.add_sds_wait {
        add.push("--wait".into());
        let child = c
            .scli_command(&add.iter().map(String::as_str).collect::<Vec<_>>())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run scli --add_sds --wait");
        Some(child)
    } else {
        c.must_scli(&add.iter().map(String::as_str).collect::<Vec<_>>());
        None
    };
    // A test's own --config (in `sds_extra`) replaces the harness's empty one.
    let config: Vec<String> = if o.sds_extra.iter().any(|a| a == "--config") {
        Vec::new()
    } else {
        vec![
            "--config".into(),
            c.config_file("sds").display().to_string(),
        ]
    };
    let args: Vec<String> = config
        .into_iter()
        .chain([
            "--name".into(),
            n.clone(),
            "--listen".into(),
            addr.to_string(),
            "--mdm".into(),
            c.mdm_ips(),
            "--cert-dir".into(),
            c.dir.join(&format!("certs/{n}")).display().to_string(),
            "--device".into(),
            dev.display().to_string(),
            "--metrics-listen".into(),
            metrics.to_string(),
            // A fast garbage collector, so every test runs with it freeing what it may.
            "--gc-interval-ms".into(),
            "1000".into(),
        ])
        .chain(o.sds_extra.iter().map(|a| {
            a.replace("{name}", &n)
                .replace("{dir}", &c.dir.path.display().to_string())
        }))
        .collect();
    let p = Proc::spawn_in(
        node.as_ref(),
        &n,
        &o.sds_bin.clone().unwrap_or_else(|| bin("sds")),
        &args,
        c.dir.join(&format!("{n}.log")),
    );
    if let Some(child) = waiter {
        let out = child.wait_with_output().expect("scli --add_sds --wait");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scli --add_sds --wait: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = text.lines().last().unwrap_or_default();
        assert!(
            last.contains("the rebalance onto it ended"),
            "scli --add_sds --wait ends when the rebalance does: {text}"
        );
        summary(&format!(
            "scli --add_sds {n} --wait: {} progress lines, then \"{last}\"",
            text.lines()
                .filter(|l| l.contains("PG moves in flight"))
                .count()
        ));
    }
    (p, addr, metrics, node)
}

/// The sds built with the `failpoints` feature (fail points, the volatile device cache and the
/// device-EIO fail point of fault tests); `./test` builds it.
pub fn failpoint_sds() -> std::path::PathBuf {
    let p = std::env::var_os("MESHBLOCK_FAILPOINTS_SDS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("target/failpoints/release/sds"));
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p sds --features failpoints \
         --target-dir target/failpoints` (./test does)",
        p.display()
    );
    p
}

/// Print a fault scenario's one-line summary and append it to `$MESHBLOCK_FAULT_SUMMARY`
/// (printed by `./test` at the end).
pub fn summary(line: &str) {
    use std::io::Write as _;
    eprintln!("{line}");
    if let Ok(p) = std::env::var("MESHBLOCK_FAULT_SUMMARY") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Wait until pool sp1 of `dc` is in state `want`; returns its `--query_storage_pool` answer.
pub fn wait_pool(dc: &DataCluster, want: &str) -> serde_json::Value {
    wait_for(
        &format!("pool sp1 {want}"),
        Duration::from_secs(120),
        || {
            let v = pool_state(&dc.c, "sp1");
            (v["state"] == want).then_some(v)
        },
    )
}

/// The devices `--query_sds` shows for `sds`, as (path, state, capacity).
pub fn sds_devices(dc: &DataCluster, sds: &str) -> Vec<(String, String, u64)> {
    let v =
        dc.c.must_scli(&["--query_sds", "--sds_name", sds, "--json"]);
    v.json()["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|d| {
                    (
                        d["path"].as_str().unwrap_or("").to_string(),
                        d["state"].as_str().unwrap_or("").to_string(),
                        d["capacity_bytes"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Give the running sds1 a second device (a 4 GiB sparse file) with `--add_sds_device` and
/// wait until it serves it; returns the paths of its first device and the new one.
pub fn add_second_device(dc: &DataCluster) -> (String, String) {
    let old = dc.c.dir.join("sds1.img").display().to_string();
    let new = dc.c.dir.join("sds1-b.img");
    std::fs::File::create(&new)
        .and_then(|f| f.set_len(4 << 30))
        .expect("device file");
    let new = new.display().to_string();
    dc.c.must_scli(&[
        "--add_sds_device",
        "--sds_name",
        "sds1",
        "--device_path",
        &new,
        "--storage_pool_name",
        "sp1",
    ]);
    wait_for(
        "the running SDS to open the added device",
        Duration::from_secs(30),
        || {
            sds_devices(dc, "sds1")
                .iter()
                .any(|(p, st, cap)| *p == new && st == "Normal" && *cap > 0)
                .then_some(())
        },
    );
    (old, new)
}

pub mod fill;
pub mod flushes;
pub mod hosts;
pub mod nbd;
pub mod netns;
pub mod swarm;

/// The cluster map, as an SDS or SDC gets it (with the certificate of an SDC host `probe`
/// that registers nowhere: GetMap without a session to renew).
pub fn cluster_map(c: &Cluster) -> proto::model::ClusterState {
    match control_request(
        &sdc_cert(c, "probe"),
        &c.mdm_ips(),
        &proto::msg::MdmRequest::GetMap {
            known_version: 0,
            sdc: None,
            throttled_ms: Vec::new(),
            io: Vec::new(),
        },
    ) {
        Ok(proto::msg::MdmResponse::Map { state: Some(s) }) => *s,
        other => panic!("GetMap: {other:?}"),
    }
}

/// Compare, chunk by chunk, the two copies of every chunk of `volume` in
/// `[0, chunks)`: each PG's primary and secondary are read with `ReadLocal` (the SDS's own
/// copy, whatever its role). Returns (chunks compared, descriptions of the differences).
///
/// The comparison is made against a settled placement (a minute at most, then it fails): it
/// waits until no PG of the pool is being filled or moved, and starts again when the pool's
/// epoch changed while it read. A rebalance that starts meanwhile moves copies and the collector
/// frees the old ones, which would read as differences that are not there.
pub fn compare_copies(c: &Cluster, volume: &str, chunks: u64) -> (u64, Vec<String>) {
    wait_for(
        &format!("a settled placement to compare the copies of {volume}"),
        Duration::from_secs(60),
        || {
            let map = cluster_map(c);
            let Some(vol) = map.volume_by_name(volume) else {
                panic!("volume {volume} is not in the map");
            };
            let pool = map.pools.get(&vol.pool)?;
            if pool
                .pgs
                .iter()
                .any(|m| m.rebuild.is_some() || m.leaving.is_some())
            {
                return None;
            }
            // A copy refusing the read for a newer epoch (the placement moved) or for want of a
            // lease (just restarted): start again.
            let result = compare_copies_under(c, &map, volume, chunks)?;
            let after = cluster_map(c);
            (after.pools.get(&vol.pool).map(|p| p.epoch) == Some(pool.epoch)).then_some(result)
        },
    )
}

fn compare_copies_under(
    c: &Cluster,
    map: &proto::model::ClusterState,
    volume: &str,
    chunks: u64,
) -> Option<(u64, Vec<String>)> {
    use proto::codec::{kind, Frame};
    use proto::data::{DataHeader, DataOp};
    let vol = map
        .volume_by_name(volume)
        .expect("volume in the map")
        .clone();
    let pool = map.pools.get(&vol.pool).expect("pool").clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // ReadLocal comes only from an SDS holding the PG: each copy is read with the certificate
    // of the SDS holding the other.
    let mut endpoints = std::collections::HashMap::new();
    for sds in map.sds.values() {
        // spawn_sds issued `sds:NAME` into certs/NAME.
        endpoints.insert(sds.id, c.dir.join(&format!("certs/{}", sds.name)));
    }
    rt.block_on(async {
        let endpoints: std::collections::HashMap<_, _> = endpoints
            .into_iter()
            .map(|(id, dir)| {
                let identity = proto::transport::Identity::load(&dir).expect("identity");
                let ep = proto::transport::Endpoint::client(&identity, "test").expect("endpoint");
                (id, ep)
            })
            .collect();
        let mut conns = std::collections::HashMap::new();
        let mut compared = 0;
        let mut diffs = Vec::new();
        // Every layer of the volume's V-tree (one, for a tree without snapshots).
        let layers = map.layers_of(vol.vtree);
        let each = (0..chunks).flat_map(|i| layers.iter().map(move |l| (i, *l)));
        for (index, layer) in each {
            let chunk = proto::ChunkId::new(vol.vtree, proto::ChunkIndex(index)).in_layer(layer);
            let pg = chunk.pg(pool.pg_count);
            let m = pool.pgs[pg.0 as usize];
            let (Some(a), Some(b)) = (m.primary, m.secondary) else {
                diffs.push(format!(
                    "chunk {index}: PG {pg} has fewer than two copies: {m:?}"
                ));
                continue;
            };
            let mut copies = Vec::new();
            for (sds, reader) in [(a, b), (b, a)] {
                let addr: SocketAddr = map.sds[&sds].addr.parse().expect("sds addr");
                if let std::collections::hash_map::Entry::Vacant(e) = conns.entry((sds, reader)) {
                    e.insert(
                        endpoints[&reader]
                            .connect(addr)
                            .await
                            .expect("connect to SDS"),
                    );
                }
                let h = DataHeader {
                    op: DataOp::ReadLocal,
                    flags: 0,
                    pool: pool.id,
                    pg,
                    epoch: pool.epoch,
                    chunk,
                    offset: 0,
                    len: proto::CHUNK_SIZE as u32,
                    fence: 0,
                };
                let f = conns[&(sds, reader)]
                    .call_timeout(
                        Frame::request(
                            kind::DATA,
                            bytes::Bytes::copy_from_slice(&h.encode()),
                            bytes::Bytes::new(),
                        ),
                        Duration::from_secs(10),
                    )
                    .await
                    .expect("ReadLocal");
                let f = match proto::transport::check_status(f) {
                    Ok(f) => f,
                    Err(e)
                        if matches!(
                            e.code,
                            proto::ErrorCode::StaleEpoch
                                | proto::ErrorCode::WrongPg
                                | proto::ErrorCode::Unavailable
                        ) =>
                    {
                        return None;
                    }
                    Err(e) => panic!("ReadLocal status: {e:?}"),
                };
                copies.push(f.data);
            }
            compared += 1;
            if copies[0] != copies[1] {
                let at = copies[0]
                    .iter()
                    .zip(copies[1].iter())
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                let blocks: Vec<String> = copies[0]
                    .chunks(4096)
                    .zip(copies[1].chunks(4096))
                    .enumerate()
                    .filter(|(_, (x, y))| x != y)
                    .map(|(i, (x, y))| {
                        let zero = |b: &[u8]| if b.iter().all(|v| *v == 0) { "0" } else { "d" };
                        format!("{i}:{}{}", zero(x), zero(y))
                    })
                    .collect();
                diffs.push(format!(
                    "chunk {chunk} (PG {pg}): copies on SDS {a} and {b} differ from byte {at}; \
                     {} blocks differ (block:primary/secondary, 0 = zeros, d = data) {:?}; \
                     mapping {m:?}; map version {}",
                    blocks.len(),
                    &blocks[..blocks.len().min(12)],
                    map.version
                ));
            }
        }
        Some((compared, diffs))
    })
}

/// The pool's health fields from `--query_storage_pool --json`.
pub fn pool_state(c: &Cluster, pool: &str) -> serde_json::Value {
    let v = c.scli_raw(&[
        "--query_storage_pool",
        "--storage_pool_name",
        pool,
        "--json",
    ]);
    if v.ok {
        v.json()
    } else {
        serde_json::Value::Null
    }
}
