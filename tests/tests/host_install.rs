//! What an installed host does, with the real binaries and no systemd: certificates made with
//! `meshblock-ca csr` on the host and `sign` on the CA (the key never leaves its directory),
//! `mdm bootstrap` once (and again: "already bootstrapped", nothing changed), daemons that read
//! the configuration file they are given (a missing one is an error), passwords refused on
//! command lines, and each daemon's `READY=1` / `STOPPING=1` on a `$NOTIFY_SOCKET` as systemd
//! would receive them.

use meshblock_tests::{bin, free_port, wait_for, TestDir};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

fn must(program: &Path, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(
        o.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn must_fail(program: &Path, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(
        !o.status.success(),
        "{} {args:?} should fail",
        program.display()
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A daemon started with `$NOTIFY_SOCKET`, SIGKILLed on drop.
struct Daemon(Child);

impl Daemon {
    fn start(program: &Path, args: &[&str], notify: &Path, log: &Path) -> Daemon {
        let log = std::fs::File::create(log).expect("log");
        let err = log.try_clone().expect("log");
        let child = Command::new(program)
            .args(args)
            .env("NOTIFY_SOCKET", notify)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start the daemon");
        Daemon(child)
    }

    fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next datagram on `sock` (what systemd would receive), waiting up to `timeout`.
fn next_state(sock: &UnixDatagram, timeout: Duration, log: &Path) -> String {
    sock.set_read_timeout(Some(timeout)).expect("timeout");
    let mut buf = [0u8; 1024];
    match sock.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "no state on the notify socket within {timeout:?} ({e}); log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// Make `dir`'s key and request with `meshblock-ca csr`, sign it on the CA, and install the
/// certificate beside the key, as an installer does across two hosts.
fn certify(ca: &Path, name: &str, dir: &Path, transfer: &Path) {
    let ca_tool = bin("meshblock-ca");
    let d = dir.display().to_string();
    let out = must(&ca_tool, &["csr", "--name", name, "--dir", &d]);
    assert!(out.contains("Created a key"), "{out}");
    let out = must(&ca_tool, &["csr", "--name", name, "--dir", &d]);
    assert!(out.contains("Unchanged"), "{out}");
    let key = std::fs::read(dir.join("node.key")).expect("key");
    must(
        &ca_tool,
        &[
            "sign",
            "--ca-dir",
            &ca.display().to_string(),
            "--csr",
            &dir.join("node.csr").display().to_string(),
            "--out",
            &transfer.display().to_string(),
        ],
    );
    assert!(!transfer.join("node.key").exists(), "the CA saw no key");
    for f in ["node.pem", "ca.pem"] {
        std::fs::copy(transfer.join(f), dir.join(f)).expect("install the certificate");
    }
    assert_eq!(std::fs::read(dir.join("node.key")).expect("key"), key);
}

#[test]
fn an_installed_host_bootstraps_once_and_its_daemons_tell_systemd_when_they_serve() {
    let dir = TestDir::new("install");
    let (mdm, sds, sdc, scli, ca_tool) = (
        bin("mdm"),
        bin("sds"),
        bin("sdc"),
        bin("scli"),
        bin("meshblock-ca"),
    );
    let ca = dir.join("ca");
    must(&ca_tool, &["init", "--dir", &ca.display().to_string()]);
    // A CA signs only names that give a role.
    let e = must_fail(
        &ca_tool,
        &[
            "csr",
            "--name",
            "sds",
            "--dir",
            &dir.join("x").display().to_string(),
        ],
    );
    assert!(e.contains("sds:NAME"), "{e}");
    assert!(!dir.join("x").exists(), "a refused request wrote files");
    certify(&ca, "mdm", &dir.join("certs/mdm"), &dir.join("signed/mdm"));
    certify(
        &ca,
        "admin",
        &dir.join("certs/admin"),
        &dir.join("signed/admin"),
    );
    certify(
        &ca,
        "sds:sds1",
        &dir.join("certs/sds1"),
        &dir.join("signed/sds1"),
    );
    certify(&ca, "sdc:h1", &dir.join("certs/h1"), &dir.join("signed/h1"));

    let port = free_port();
    let config = dir.join("mdm.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"mdm1\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
             cert_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n",
            dir.join("mdm-data").display(),
            dir.join("certs/mdm").display(),
            free_port()
        ),
    )
    .expect("write mdm.toml");
    let cfg = config.display().to_string();
    let pw = dir.join("admin-password");
    std::fs::write(&pw, "Install1\n").expect("password file");
    let pw = pw.display().to_string();

    // Passwords on the command line are refused before anything is made.
    let e = must_fail(
        &mdm,
        &[
            "bootstrap",
            "--config",
            &cfg,
            "--admin-password",
            "Install1",
        ],
    );
    assert!(e.contains("--admin-password-file"), "{e}");
    assert!(
        !e.contains("Install1"),
        "the refusal echoes the password: {e}"
    );
    assert!(!dir.join("mdm-data").exists());
    // Without a terminal and a file, bootstrap says what to give.
    let e = must_fail(&mdm, &["bootstrap", "--config", &cfg]);
    assert!(e.contains("--admin-password-file"), "{e}");
    let e = must_fail(
        &mdm,
        &[
            "bootstrap",
            "--config",
            &dir.join("nope.toml").display().to_string(),
        ],
    );
    assert!(e.contains("does not exist"), "{e}");

    let out = must(
        &mdm,
        &["bootstrap", "--config", &cfg, "--admin-password-file", &pw],
    );
    assert!(out.contains("Created cluster"), "{out}");
    let out = must(
        &mdm,
        &["bootstrap", "--config", &cfg, "--admin-password-file", &pw],
    );
    assert!(out.contains("already bootstrapped"), "{out}");
    // Nothing is read when there is nothing to do: not even a missing password file.
    let out = must(
        &mdm,
        &[
            "bootstrap",
            "--config",
            &cfg,
            "--admin-password-file",
            "/nonexistent",
        ],
    );
    assert!(out.contains("already bootstrapped"), "{out}");

    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");

    // The MDM: ready once it serves and knows its leader (itself).
    let mdm_log = dir.join("mdm.log");
    let m = Daemon::start(&mdm, &["run", "--config", &cfg], &notify_path, &mdm_log);
    let state = next_state(&notify, Duration::from_secs(30), &mdm_log);
    assert!(state.starts_with("READY=1\n"), "{state}");
    assert!(state.contains("Raft leader"), "{state}");
    let session = dir.join("session.json");
    let login = Command::new(&scli)
        .args(["--login", "--username", "admin", "--password_file", &pw])
        .args(["--mdm_ip", &format!("127.0.0.1:{port}")])
        .env("MESHBLOCK_CERT_DIR", dir.join("certs/admin"))
        .env("MESHBLOCK_SCLI_SESSION", &session)
        .stdin(Stdio::null())
        .output()
        .expect("scli");
    assert!(
        login.status.success(),
        "login right after READY: {}",
        String::from_utf8_lossy(&login.stderr)
    );

    // The SDS: ready once its device is open and its data port listens.
    let dev = dir.join("sds1.img");
    std::fs::File::create(&dev)
        .and_then(|f| f.set_len(256 << 20))
        .expect("device file");
    let sds_config = dir.join("sds.toml");
    std::fs::write(&sds_config, "# flags give everything\n").expect("write sds.toml");
    let sds_log = dir.join("sds.log");
    let s = Daemon::start(
        &sds,
        &[
            "--config",
            &sds_config.display().to_string(),
            "--name",
            "sds1",
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--mdm",
            &format!("127.0.0.1:{port}"),
            "--cert-dir",
            &dir.join("certs/sds1").display().to_string(),
            "--device",
            &dev.display().to_string(),
            "--metrics-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--no-io-uring",
        ],
        &notify_path,
        &sds_log,
    );
    let state = next_state(&notify, Duration::from_secs(60), &sds_log);
    assert!(state.starts_with("READY=1\n"), "{state}");

    // The SDC: ready once its NBD socket listens.
    let sdc_config = dir.join("sdc.toml");
    std::fs::write(
        &sdc_config,
        format!(
            "name = \"h1\"\nmdm = [\"127.0.0.1:{port}\"]\ncert_dir = \"{}\"\n\
             state_dir = \"{}\"\nnbd_socket = \"{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n",
            dir.join("certs/h1").display(),
            dir.join("sdc-state").display(),
            dir.join("sdc-state/nbd.sock").display(),
            free_port()
        ),
    )
    .expect("write sdc.toml");
    let sdc_log = dir.join("sdc.log");
    let c = Daemon::start(
        &sdc,
        &["run", "--config", &sdc_config.display().to_string()],
        &notify_path,
        &sdc_log,
    );
    let state = next_state(&notify, Duration::from_secs(30), &sdc_log);
    assert!(state.starts_with("READY=1\n"), "{state}");
    assert!(
        dir.join("sdc-state/nbd.sock").exists(),
        "READY before the NBD socket"
    );

    // Its attach layer (a FUSE mount and its keeper) comes up once it registered: let it, so
    // the SIGTERM below takes it down in order and nothing is left mounted.
    let admin_sock = dir.join("sdc-state/admin.sock");
    wait_for("the SDC's attach layer", Duration::from_secs(30), || {
        admin_sock.exists().then_some(())
    });

    // SIGTERM: each says it is stopping, and exits.
    for (mut d, log) in [(c, &sdc_log), (s, &sds_log), (m, &mdm_log)] {
        d.terminate();
        let state = next_state(&notify, Duration::from_secs(30), log);
        assert_eq!(state, "STOPPING=1");
        let status = d.0.wait().expect("wait");
        assert!(
            status.success(),
            "{status}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let here = dir.path.display().to_string();
    assert!(
        !mounts.lines().any(|l| l.contains(&here)),
        "the SDC left a mount behind: {mounts}"
    );
}
