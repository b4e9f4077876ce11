//! Filesystems on attached devices: probe (`blkid`), make (`mkfs.ext4`, `mkfs.xfs`, only when
//! no filesystem is found), mount, unmount, and grow online (`resize2fs`, `xfs_growfs`). Runs the host's tools with timeouts; decides
//! nothing.

use std::path::Path;
use std::time::Duration;

/// Time a probe, mount or unmount may take.
const QUICK: Duration = Duration::from_secs(30);
/// Time mkfs may take (large volumes; Docker waits 2 minutes for Mount).
const MKFS: Duration = Duration::from_secs(100);

async fn run(program: &str, args: &[&str], limit: Duration) -> Result<(i32, String), String> {
    let what = format!("{program} {}", args.join(" "));
    let child = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(limit, child).await {
        Err(_) => Err(format!("{what} did not finish within {limit:?}")),
        Ok(Err(e)) => Err(format!("cannot run {what}: {e}")),
        Ok(Ok(out)) => {
            let code = out.status.code().unwrap_or(-1);
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            if code != 0 {
                text = format!(
                    "{what} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok((code, text))
        }
    }
}

/// The filesystem type on `dev`, or `None` when it holds none.
pub async fn probe(dev: &Path) -> Result<Option<String>, String> {
    let d = dev.display().to_string();
    match run("blkid", &["-p", "-o", "value", "-s", "TYPE", &d], QUICK).await? {
        (0, t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        // Exit 2: nothing recognised.
        (0 | 2, _) => Ok(None),
        (_, e) => Err(e),
    }
}

/// Makes a filesystem of `fstype` on `dev` (no discard pass: thin volumes read as zeroes).
pub async fn mkfs(dev: &Path, fstype: &str) -> Result<(), String> {
    let d = dev.display().to_string();
    let (code, text) = match fstype {
        "ext4" => {
            run(
                "mkfs.ext4",
                &["-q", "-F", "-E", "nodiscard,lazy_itable_init=1", &d],
                MKFS,
            )
            .await?
        }
        "xfs" => run("mkfs.xfs", &["-q", "-K", &d], MKFS).await?,
        other => return Err(format!("cannot make a {other} filesystem")),
    };
    if code != 0 {
        return Err(text);
    }
    Ok(())
}

pub async fn mount(dev: &Path, dir: &Path, fstype: &str) -> Result<(), String> {
    // tokio::fs: off the runtime thread, like every call here that may reach a volume's own
    // filesystem (see `attach::off_runtime`).
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    let (d, m) = (dev.display().to_string(), dir.display().to_string());
    // A snapshot's xfs has its source's UUID, which xfs refuses to mount twice on one host.
    let mut args = vec!["-t", fstype];
    if fstype == "xfs" {
        args.extend(["-o", "nouuid"]);
    }
    args.extend([d.as_str(), m.as_str()]);
    match run("mount", &args, QUICK).await? {
        (0, _) => Ok(()),
        (_, e) => Err(e),
    }
}

pub async fn unmount(dir: &Path) -> Result<(), String> {
    let m = dir.display().to_string();
    match run("umount", &[&m], QUICK).await? {
        (0, _) => Ok(()),
        (_, e) => Err(e),
    }
}

/// Grows the mounted filesystem of `fstype` on `dev` (mounted at `dir`) to the device's size.
pub async fn grow(dev: &Path, dir: &Path, fstype: &str) -> Result<(), String> {
    let (d, m) = (dev.display().to_string(), dir.display().to_string());
    let (code, text) = match fstype {
        "ext4" => run("resize2fs", &[&d], MKFS).await?,
        "xfs" => run("xfs_growfs", &[&m], MKFS).await?,
        other => return Err(format!("cannot grow a {other} filesystem")),
    };
    if code != 0 {
        if fstype == "ext4" && text.contains("Permission denied") {
            return Err(format!(
                "{text}: growing a mounted ext4 needs CAP_SYS_RESOURCE, which this SDC lacks \
                 (its host's or container's capability bounding set drops it); the filesystem \
                 keeps its size until it is grown where that capability exists (xfs grows \
                 online with CAP_SYS_ADMIN alone)"
            ));
        }
        return Err(text);
    }
    Ok(())
}
