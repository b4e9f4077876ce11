//! Online resize all the way to the filesystem: `scli --modify_volume_capacity` on a volume a
//! running container writes to grows its device and its ext4 or xfs filesystem in place, so
//! `df` in the container shows the new size without a restart; a new NBD connection sees the
//! new size (nbdinfo); shrinking is refused and changes nothing. Against the legacy and the
//! managed plugin.

use meshblock_tests::docker::*;
use meshblock_tests::*;
use std::time::Duration;

/// Total size of the filesystem at /data in container `c`, bytes (`df -k`).
fn df_total(s: &Setup, c: &str) -> u64 {
    let o = s.docker().cli(&["exec", c, "df", "-k", "/data"]);
    o.stdout
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

fn grows_online(kind: Kind) {
    require("nbdinfo").expect("nbdinfo");
    let s = Setup::start_kind("docker-resize", kind);
    let drv = s.drv();
    // Growing a mounted ext4 needs CAP_SYS_RESOURCE (xfs: CAP_SYS_ADMIN); some hosts (this
    // test VM) drop it from every process's bounding set.
    let cap_sys_resource = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            let l = t.lines().find(|l| l.starts_with("CapBnd:"))?;
            u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok()
        })
        // CAP_SYS_RESOURCE is capability 24.
        .is_some_and(|bits| bits & (1 << 24) != 0);
    for fstype in ["xfs", "ext4"] {
        // Distinct per kind: the two tests run side by side and see each other's plugins.
        let which = if kind == Kind::Legacy {
            "legacy"
        } else {
            "managed"
        };
        let vol = format!("grow-{fstype}-{which}");
        let c = format!("c-{fstype}");
        s.docker().must(&[
            "volume",
            "create",
            "--driver",
            &drv,
            "--opt",
            "size=512MiB",
            "--opt",
            &format!("fstype={fstype}"),
            &vol,
        ]);
        s.docker().must(&[
            "run",
            "-d",
            "--name",
            &c,
            "--network",
            "none",
            "-v",
            &format!("{vol}:/data"),
            &s.image,
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i >> /data/log; sync; sleep 0.1; done",
        ]);
        wait_for(
            "the container's first writes",
            Duration::from_secs(30),
            || (df_total(&s, &c) > 0).then_some(()),
        );
        let before = df_total(&s, &c);
        assert!(before < 512 << 20, "{fstype}: {before}");

        s.d.c.must_scli(&[
            "--modify_volume_capacity",
            "--volume_name",
            &vol,
            "--size_gb",
            "2",
        ]);
        if fstype == "ext4" && (!cap_sys_resource || kind == Kind::Managed) {
            // The device grows; the filesystem cannot, and the SDC says why.
            wait_for(
                "the SDC to say why ext4 did not grow",
                Duration::from_secs(30),
                || s.sdc_log().contains("needs CAP_SYS_RESOURCE").then_some(()),
            );
            println!(
                "{kind:?} ext4: not grown online here (no CAP_SYS_RESOURCE); the SDC said why"
            );
            s.docker().must(&["rm", "-f", &c]);
            s.docker().must(&["volume", "rm", &vol]);
            continue;
        }
        let after = wait_for(
            "df in the container to show the grown filesystem",
            Duration::from_secs(30),
            || {
                let t = df_total(&s, &c);
                (t > 1900 << 20).then_some(t)
            },
        );
        println!(
            "{kind:?} {fstype}: df in the running container {} MiB -> {} MiB",
            before >> 20,
            after >> 20
        );
        let info = sh("nbdinfo", &["--size", &s.d.uri(&vol)]);
        assert!(info.ok, "nbdinfo: {}", info.stderr);
        assert_eq!(info.stdout.trim(), (2u64 << 30).to_string());

        // Shrinking is refused and changes nothing.
        let r = s.d.c.scli_raw(&[
            "--modify_volume_capacity",
            "--volume_name",
            &vol,
            "--size_gb",
            "1",
        ]);
        assert!(!r.ok, "shrinking accepted");
        assert_eq!(
            cluster_map(&s.d.c)
                .volume_by_name(&vol)
                .expect("volume")
                .size_bytes,
            2 << 30
        );

        // The container never noticed: still running, still writing.
        let n = |s: &Setup| {
            s.docker()
                .cli(&["exec", &c, "sh", "-c", "wc -l < /data/log"])
                .stdout
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
        };
        let lines = n(&s);
        wait_for(
            "the container to keep writing",
            Duration::from_secs(30),
            || (n(&s) > lines + 5).then_some(()),
        );
        s.docker().must(&["rm", "-f", &c]);
        s.docker().must(&["volume", "rm", &vol]);
    }
}

#[test]
fn docker_volume_grows_online() {
    grows_online(Kind::Legacy);
}

#[test]
fn managed_plugin_volume_grows_online() {
    grows_online(Kind::Managed);
}
