//! The Debian packages: `packaging/build-debs` run for real on the release binaries, then each
//! package's metadata, contents, configuration file and unit checked with `dpkg-deb`, the units
//! with `systemd-analyze verify` (when installed), and the whole set installed into and purged
//! from a scratch root with `dpkg --root` (nothing started, configuration files registered).
//! Bad arguments fail with a message and write nothing.

use meshblock_tests::{bin, TestDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const VERSION: &str = "0.0.1~test1";
const DAEMONS: [&str; 3] = ["mdm", "sds", "sdc"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn must(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(
        o.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn build_debs(bin_dir: &Path, version: &str, out: &Path) -> Output {
    let script = repo().join("packaging/build-debs");
    Command::new(&script)
        .args(["--version", version, "--bin-dir"])
        .arg(bin_dir)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run packaging/build-debs")
}

fn arch() -> String {
    must("dpkg", &["--print-architecture"]).trim().to_string()
}

fn deb(out: &Path, pkg: &str) -> String {
    out.join(format!("{pkg}_{VERSION}_{}.deb", arch()))
        .display()
        .to_string()
}

fn field(deb: &str, name: &str) -> String {
    must("dpkg-deb", &["--field", deb, name]).trim().to_string()
}

/// `dpkg-deb --contents` as (mode string, path without the leading `.`).
fn contents(deb: &str) -> Vec<(String, String)> {
    must("dpkg-deb", &["--contents", deb])
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let path = cols.last()?.trim_start_matches('.').to_string();
            Some((cols.first()?.to_string(), path))
        })
        .collect()
}

fn mode_of<'a>(list: &'a [(String, String)], path: &str) -> &'a str {
    list.iter()
        .find(|(_, p)| p == path)
        .map(|(m, _)| m.as_str())
        .unwrap_or_else(|| panic!("{path} is not in the package: {list:?}"))
}

#[test]
fn packages_hold_binaries_units_and_configs_and_start_nothing() {
    meshblock_tests::require("dpkg-deb").expect("dpkg-deb");
    let dir = TestDir::new("packaging");
    let bin_dir = bin("mdm").parent().expect("bin dir").to_path_buf();
    let out = dir.join("debs");
    let o = build_debs(&bin_dir, VERSION, &out);
    assert!(
        o.status.success(),
        "build-debs failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let scli = deb(&out, "meshblock-scli");
    assert_eq!(field(&scli, "Version"), VERSION);
    assert_eq!(field(&scli, "Architecture"), arch());
    let list = contents(&scli);
    assert_eq!(mode_of(&list, "/usr/bin/scli"), "-rwxr-xr-x");
    assert_eq!(mode_of(&list, "/usr/bin/meshblock-ca"), "-rwxr-xr-x");
    assert!(
        !list.iter().any(|(_, p)| p.starts_with("/etc/")),
        "{list:?}"
    );

    let extracted = dir.join("root");
    for d in DAEMONS {
        let pkg = format!("meshblock-{d}");
        let f = deb(&out, &pkg);
        assert_eq!(field(&f, "Package"), pkg);
        assert_eq!(field(&f, "Version"), VERSION);
        let depends = field(&f, "Depends");
        assert!(
            depends.contains(&format!("meshblock-scli (>= {VERSION})")),
            "{pkg} Depends: {depends}"
        );
        let list = contents(&f);
        assert_eq!(mode_of(&list, &format!("/usr/bin/{d}")), "-rwxr-xr-x");
        assert_eq!(
            mode_of(&list, &format!("/lib/systemd/system/{pkg}.service")),
            "-rw-r--r--"
        );
        assert_eq!(
            mode_of(&list, &format!("/etc/meshblock/{d}.toml")),
            "-rw-r--r--"
        );
        assert_eq!(mode_of(&list, "/etc/meshblock/certs/"), "drwx------");
        assert_eq!(
            mode_of(&list, &format!("/var/lib/meshblock/{d}/")),
            "drwx------"
        );

        // The control part: the configuration is a conffile; no script starts or enables.
        let control = dir.join(&format!("control-{d}"));
        must(
            "dpkg-deb",
            &["--control", &f, &control.display().to_string()],
        );
        let conffiles = std::fs::read_to_string(control.join("conffiles")).expect("conffiles");
        assert_eq!(conffiles.trim(), format!("/etc/meshblock/{d}.toml"));
        for script in ["postinst", "prerm", "postrm"] {
            let text = std::fs::read_to_string(control.join(script)).expect("script");
            for word in [
                "systemctl start",
                "systemctl enable",
                "systemctl restart",
                "invoke",
            ] {
                assert!(
                    !text.contains(word),
                    "{pkg} {script} runs '{word}':\n{text}"
                );
            }
        }

        must(
            "dpkg-deb",
            &["--extract", &f, &extracted.display().to_string()],
        );
        // The configuration file is the documented defaults, as the binary prints them.
        let config = std::fs::read_to_string(extracted.join(format!("etc/meshblock/{d}.toml")))
            .expect("config");
        let docs = std::fs::read_to_string(repo().join(format!("docs/config/{d}.default.toml")))
            .expect("docs/config");
        assert_eq!(config, docs, "{pkg}'s /etc/meshblock/{d}.toml");
        let printed = if d == "sds" {
            must(&bin(d).display().to_string(), &["--print-default-config"])
        } else {
            must(&bin(d).display().to_string(), &["print-default-config"])
        };
        assert_eq!(config, printed, "{pkg}'s config is not what {d} prints");

        let unit =
            std::fs::read_to_string(extracted.join(format!("lib/systemd/system/{pkg}.service")))
                .expect("unit");
        let exec = unit
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .expect("ExecStart");
        assert!(
            exec.starts_with(&format!("ExecStart=/usr/bin/{d} "))
                && exec.ends_with(&format!("--config /etc/meshblock/{d}.toml")),
            "{exec}"
        );
        for line in [
            "Type=notify",
            "Restart=on-failure",
            "After=network-online.target",
        ] {
            assert!(unit.lines().any(|l| l == line), "{pkg} lacks {line}");
        }
    }
    let sdc_unit =
        std::fs::read_to_string(extracted.join("lib/systemd/system/meshblock-sdc.service"))
            .expect("unit");
    assert!(sdc_unit.lines().any(|l| l == "Before=docker.service"));
    assert!(sdc_unit.lines().any(|l| l == "KillMode=process"));
    // Nothing in the SDC's unit hides its mounts from dockerd (a private mount namespace).
    for ns in [
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "PrivateMounts=",
        "ReadWritePaths=",
        "ReadOnlyPaths=",
        "InaccessiblePaths=",
        "TemporaryFileSystem=",
        "BindPaths=",
        "ProtectKernelTunables=",
        "ProtectKernelModules=",
        "ProtectKernelLogs=",
        "ProtectControlGroups=",
        "ProtectClock=",
        "DeviceAllow=",
    ] {
        assert!(
            !sdc_unit.lines().any(|l| l.starts_with(ns)),
            "the SDC unit sets {ns}"
        );
    }

    verify_units(&dir, &extracted);
    install_into_a_scratch_root(&dir, &out);
}

/// `systemd-analyze verify` in a root holding the host's units and the packages' files: any
/// complaint (an unknown key, a bad value) fails.
fn verify_units(dir: &TestDir, extracted: &Path) {
    if meshblock_tests::require("systemd-analyze").is_err() {
        eprintln!("skipped systemd-analyze verify: not installed");
        return;
    }
    let root = dir.join("verify-root");
    std::fs::create_dir_all(root.join("lib/systemd")).expect("mkdir");
    must(
        "cp",
        &[
            "-r",
            "/lib/systemd/system",
            &root.join("lib/systemd/system").display().to_string(),
        ],
    );
    must(
        "cp",
        &[
            "-r",
            &format!("{}/.", extracted.display()),
            &root.display().to_string(),
        ],
    );
    for d in DAEMONS {
        let o = run(
            "systemd-analyze",
            &[
                "verify",
                &format!("--root={}", root.display()),
                &format!("meshblock-{d}.service"),
            ],
        );
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            o.status.success() && said.trim().is_empty(),
            "systemd-analyze verify meshblock-{d}.service: {said}"
        );
    }
}

/// Install the four packages into a scratch root (dependencies on the host's libraries
/// forced: the root has none), check dpkg's view, then purge them again.
fn install_into_a_scratch_root(dir: &TestDir, out: &Path) {
    let root = dir.join("dpkg-root");
    std::fs::create_dir_all(root.join("var/lib/dpkg/info")).expect("mkdir");
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).expect("mkdir");
    for f in ["status", "available"] {
        std::fs::write(root.join(format!("var/lib/dpkg/{f}")), "").expect("dpkg db");
    }
    let r = format!("--root={}", root.display());
    let mut args = vec![
        r.as_str(),
        "--force-script-chrootless",
        "--force-depends",
        "--log=/dev/null",
        "-i",
    ];
    let debs: Vec<String> = ["scli", "mdm", "sds", "sdc"]
        .iter()
        .map(|p| deb(out, &format!("meshblock-{p}")))
        .collect();
    args.extend(debs.iter().map(String::as_str));
    must("dpkg", &args);
    let status = must(
        "dpkg-query",
        &[
            &r,
            "-W",
            "-f",
            "${Package} ${Status} ${Version}\n",
            "meshblock-*",
        ],
    );
    for p in ["scli", "mdm", "sds", "sdc"] {
        assert!(
            status.contains(&format!("meshblock-{p} install ok installed {VERSION}")),
            "{status}"
        );
    }
    let conffiles = must(
        "dpkg-query",
        &[&r, "-W", "-f", "${Conffiles}\n", "meshblock-mdm"],
    );
    assert!(conffiles.contains("/etc/meshblock/mdm.toml"), "{conffiles}");
    assert!(root.join("usr/bin/meshblock-ca").exists());
    assert!(root.join("var/lib/meshblock/sds").is_dir());
    must(
        "dpkg",
        &[
            &r,
            "--force-script-chrootless",
            "--force-depends",
            "--log=/dev/null",
            "--purge",
            "meshblock-mdm",
            "meshblock-sds",
            "meshblock-sdc",
            "meshblock-scli",
        ],
    );
    assert!(
        !root.join("etc/meshblock/mdm.toml").exists(),
        "purge keeps the config"
    );
    assert!(!root.join("usr/bin/mdm").exists());
}

#[test]
fn bad_arguments_fail_clearly_and_write_nothing() {
    let dir = TestDir::new("packaging-bad");
    let bin_dir = bin("mdm").parent().expect("bin dir").to_path_buf();
    let out = dir.join("out");
    let o = build_debs(&bin_dir, "not a version", &out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not a Debian version"), "{err}");
    let o = build_debs(&dir.join("nowhere"), VERSION, &out);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("build the release binaries first"), "{err}");
    let o = Command::new(repo().join("packaging/build-debs"))
        .args(["--version", VERSION])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--bin-dir DIR"));
    assert!(!out.exists(), "a refused build wrote {}", out.display());
}
