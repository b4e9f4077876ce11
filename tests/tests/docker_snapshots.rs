//! Docker volumes from snapshots: `docker volume create --opt snapshot_of=SRC` while a
//! container writes (and syncs) to SRC gives a volume holding every line synced before the
//! create and none written after it returned; a container mounts it beside the running source
//! (xfs too: same UUID); writing it leaves the source alone; bad options are refused and create
//! nothing. Against the legacy and the managed plugin.

use meshblock_tests::docker::*;
use meshblock_tests::*;
use std::time::Duration;

/// Lines of /data/log in container `c`.
fn lines(s: &Setup, c: &str) -> u64 {
    s.docker()
        .cli(&["exec", c, "sh", "-c", "wc -l < /data/log"])
        .stdout
        .trim()
        .parse()
        .unwrap_or(0)
}

fn snapshots(kind: Kind) {
    let s = Setup::start_kind("docker-snap", kind);
    let drv = s.drv();
    let which = if kind == Kind::Legacy {
        "legacy"
    } else {
        "managed"
    };
    for fstype in ["ext4", "xfs"] {
        let src = format!("src-{fstype}-{which}");
        let snap = format!("snap-{fstype}-{which}");
        let c = format!("writer-{fstype}");
        s.docker().must(&[
            "volume",
            "create",
            "--driver",
            &drv,
            "--opt",
            "size=512MiB",
            "--opt",
            &format!("fstype={fstype}"),
            &src,
        ]);
        s.docker().must(&[
            "run",
            "-d",
            "--name",
            &c,
            "--network",
            "none",
            "-v",
            &format!("{src}:/data"),
            &s.image,
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i >> /data/log; sync; sleep 0.05; done",
        ]);
        wait_for(
            "the container's first lines",
            Duration::from_secs(60),
            || (lines(&s, &c) >= 20).then_some(()),
        );
        let before = lines(&s, &c);
        s.docker().must(&[
            "volume",
            "create",
            "--driver",
            &drv,
            "--opt",
            &format!("snapshot_of={src}"),
            &snap,
        ]);
        let after = lines(&s, &c);
        let got = s.docker().must(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &format!("{snap}:/data"),
            &s.image,
            "sh",
            "-c",
            "wc -l < /data/log",
        ]);
        let in_snap: u64 = got.trim().parse().unwrap_or(0);
        println!(
            "{kind:?} {fstype}: {before} lines before the create, {in_snap} in the snapshot, {after} after"
        );
        assert!(
            before <= in_snap && in_snap <= after,
            "{fstype}: the snapshot has {in_snap} lines; {before} were synced before the create and {after} after it returned"
        );
        // The snapshot is a volume of its own: writing it leaves the source alone.
        s.docker().must(&[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &format!("{snap}:/data"),
            &s.image,
            "sh",
            "-c",
            "echo mine > /data/only-in-snap; sync",
        ]);
        let leak = s
            .docker()
            .cli(&["exec", &c, "sh", "-c", "test -e /data/only-in-snap"]);
        assert!(!leak.ok, "a write to the snapshot reached its source");
        // And the source went on being written through all of it.
        let n = lines(&s, &c);
        wait_for(
            "the source to keep growing",
            Duration::from_secs(60),
            || (lines(&s, &c) > n + 5).then_some(()),
        );

        // Bad options: refused, nothing created.
        for (opts, says) in [
            (
                vec!["snapshot_of=no-such-volume".to_string()],
                "no such volume",
            ),
            (
                vec![format!("snapshot_of={src}"), "size=1GiB".to_string()],
                "cannot go with snapshot_of",
            ),
        ] {
            let mut args = vec!["volume", "create", "--driver", drv.as_str()];
            for o in &opts {
                args.extend(["--opt", o.as_str()]);
            }
            args.push("bad-snap");
            let r = s.docker().cli(&args);
            assert!(
                !r.ok && r.stderr.contains(says),
                "{opts:?}: {}{}",
                r.stdout,
                r.stderr
            );
            assert!(cluster_map(&s.d.c).volume_by_name("bad-snap").is_none());
        }
        s.docker().must(&["rm", "-f", &c]);
        s.docker().must(&["volume", "rm", &snap]);
        s.docker().must(&["volume", "rm", &src]);
    }
}

#[test]
fn docker_volume_created_as_a_snapshot_of_another() {
    snapshots(Kind::Legacy);
}

#[test]
fn managed_plugin_volume_created_as_a_snapshot_of_another() {
    snapshots(Kind::Managed);
}
