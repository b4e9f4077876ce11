//! `./lab up` serves the Docker volume plugin (issue 20): a driver name of its own, a
//! Configure-role MDM user whose generated password is only in a 0600 file (never on a command
//! line), and `./lab down` removes the plugin socket. Runs the real `lab` script against the
//! release binaries, on ports and a driver name of its own, with a private dockerd.

use meshblock_tests::docker::*;
use meshblock_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The lab script, with this test's directory, ports and driver name.
struct Lab {
    script: PathBuf,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

impl Lab {
    fn run(&self, args: &[&str]) -> Out {
        let mut cmd = Command::new(&self.script);
        cmd.args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        match cmd.output() {
            Ok(o) => Out {
                ok: o.status.success(),
                stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            },
            Err(e) => Out {
                ok: false,
                stdout: String::new(),
                stderr: format!("cannot run the lab script: {e}"),
            },
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = self.run(&["down"]);
        }
    }
}

/// Command lines of every process that contain `needle`.
fn cmdlines_with(needle: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[test]
fn lab_serves_the_docker_plugin_and_down_removes_it() {
    require_all();
    let t = TestDir::new("docker-lab");
    // Named like the other tests' plugins, so ./test's cleanup finds a socket left behind.
    let driver = format!("mbt{}x{}", std::process::id(), rand::random::<u16>());
    let socket = Path::new("/run/docker/plugins").join(format!("{driver}.sock"));
    // Ports base+1 to base+2203: below the default lab's (7611 up) and the tests' allocator.
    let base = 1100 + rand::random::<u16>() % 4300;
    let bin_dir = bin("sdc")
        .parent()
        .expect("binary directory")
        .display()
        .to_string();
    let lab = Lab {
        script: Path::new(env!("CARGO_MANIFEST_DIR")).join("../lab"),
        env: vec![
            ("MESHBLOCK_LAB".into(), t.join("lab").display().to_string()),
            ("MESHBLOCK_BIN_DIR".into(), bin_dir),
            ("MESHBLOCK_LAB_PORT_BASE".into(), base.to_string()),
            ("MESHBLOCK_LAB_DOCKER_DRIVER".into(), driver.clone()),
            ("MESHBLOCK_LAB_DEVICE_GB".into(), "2".into()),
        ],
        dir: t.join("lab"),
    };
    let up = lab.run(&["up"]);
    assert!(up.ok, "./lab up failed: {}{}", up.stdout, up.stderr);
    assert!(
        up.stdout
            .contains(&format!("docker volume create --driver {driver}")),
        "{}",
        up.stdout
    );
    assert!(socket.exists(), "no plugin socket {}", socket.display());

    // The plugin's user: role Configure, its password generated into a 0600 file only.
    let pw_file = t.join("lab").join("docker-password");
    let mode = std::fs::metadata(&pw_file)
        .expect("the password file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{:o}", mode);
    let password = std::fs::read_to_string(&pw_file).expect("password");
    let password = password.trim();
    assert!(
        password.len() >= 16,
        "a weak password: {} characters",
        password.len()
    );
    assert!(
        cmdlines_with(password).is_empty(),
        "the password is on a command line"
    );
    let users = lab.run(&["scli", "--query_all", "--json"]);
    assert!(users.ok, "{}", users.stderr);
    let j: serde_json::Value = serde_json::from_str(&users.stdout).expect("query_all json");
    assert_eq!(
        j["state"]["users"]["docker"]["role"], "Configure",
        "{}",
        users.stdout
    );

    // Docker uses it at once.
    let docker = Dockerd::start(&t.join("docker"), None, &[]);
    let image = docker.import_busybox();
    docker.must(&[
        "volume",
        "create",
        "--driver",
        &driver,
        "--opt",
        "size=256MiB",
        "demo",
    ]);
    let out = docker.must(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        "demo:/data",
        &image,
        "sh",
        "-c",
        "echo hello > /data/f && sync && cat /data/f",
    ]);
    assert_eq!(out.trim(), "hello");
    docker.must(&["volume", "rm", "demo"]);
    drop(docker);

    let down = lab.run(&["down"]);
    assert!(down.ok, "./lab down failed: {}{}", down.stdout, down.stderr);
    assert!(!socket.exists(), "./lab down left {}", socket.display());
    assert!(!t.join("lab").exists());
}
