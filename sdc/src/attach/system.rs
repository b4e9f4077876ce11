//! The host's side of attaching: mounting the FUSE directory, loop devices (`losetup`), and
//! reading `/proc/self/mountinfo` to tell whether a device or directory is mounted.
//!
//! Owns every mount(2)/umount(2) call and every `losetup` run of the attach layer; decides
//! nothing (that is `attach`'s job).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted device.
    pub dev: (u32, u32),
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (maj, min) = l.get(2)?.split_once(':')?;
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                mount_point: PathBuf::from(unescape(l.get(4)?)),
                fstype: r.first()?.to_string(),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

/// This process's mounts.
pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// The mount at exactly `dir`, if any (the last one wins when mounts are stacked).
pub fn mount_at(dir: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mount_point == dir)
}

/// `major:minor` of a block device node.
pub fn dev_numbers(dev: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(dev).ok()?.rdev();
    Some((libc::major(rdev), libc::minor(rdev)))
}

/// Where `dev` (or one of its partitions) is mounted.
pub fn mounts_of_device(dev: &Path) -> Vec<PathBuf> {
    let numbers = dev_numbers(dev);
    let name = dev.display().to_string();
    mounts()
        .into_iter()
        .filter(|m| {
            Some(m.dev) == numbers
                || m.source == name
                || m.source
                    .strip_prefix(&name)
                    .is_some_and(|rest| rest.starts_with('p'))
        })
        .map(|m| m.mount_point)
        .collect()
}

/// Why a system operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("{what} failed: {source}")]
    Os {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SystemError {
    let what = what.into();
    move |source| SystemError::Os { what, source }
}

/// Runs a command, returning its stdout or its stderr as the error.
pub fn run(program: &str, args: &[&str]) -> Result<String, SystemError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(os(command.clone()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(SystemError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Opens `/dev/fuse` and mounts a FUSE filesystem on `dir` served through it.
pub fn mount_fuse(dir: &Path) -> Result<OwnedFd, SystemError> {
    std::fs::create_dir_all(dir).map_err(os(format!("create {}", dir.display())))?;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(os("open /dev/fuse"))?;
    let fd = OwnedFd::from(dev);
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,max_read={}",
        fd.as_raw_fd(),
        super::fuse::MAX_WRITE
    );
    let c = |s: &str| std::ffi::CString::new(s).map_err(|e| os("mount")(std::io::Error::other(e)));
    let target = c(&dir.display().to_string())?;
    let (source, fstype, data) = (c("meshblock")?, c("fuse.meshblock")?, c(&data)?);
    // SAFETY: valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(os(format!("mount FUSE on {}", dir.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}

/// Unmounts `dir`; `lazy` detaches it even while busy.
pub fn unmount(dir: &Path, lazy: bool) -> Result<(), SystemError> {
    let target = std::ffi::CString::new(dir.display().to_string())
        .map_err(|e| os("umount")(std::io::Error::other(e)))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), flags) } != 0 {
        return Err(os(format!("unmount {}", dir.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// A loop device and the file behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopDevice {
    pub device: PathBuf,
    pub backing: PathBuf,
}

/// Every loop device in use (`losetup --list`).
pub fn loop_devices() -> Vec<LoopDevice> {
    let Ok(out) = run(
        "losetup",
        &["--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"],
    ) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|l| {
            let (dev, file) = l.split_once(' ')?;
            Some(LoopDevice {
                device: PathBuf::from(dev),
                backing: PathBuf::from(unescape(file.trim().trim_end_matches(" (deleted)"))),
            })
        })
        .collect()
}

/// Sets up a loop device over `file`; returns its path.
pub fn loop_attach(file: &Path) -> Result<PathBuf, SystemError> {
    let f = file.display().to_string();
    let out = run("losetup", &["--find", "--show", "--direct-io=on", &f])
        .or_else(|_| run("losetup", &["--find", "--show", &f]))?;
    Ok(PathBuf::from(out.trim()))
}

/// Makes a loop device re-read its backing file's size (`losetup --set-capacity`).
pub fn loop_set_capacity(dev: &Path) -> Result<(), SystemError> {
    run("losetup", &["--set-capacity", &dev.display().to_string()]).map(|_| ())
}

/// A block device's size in bytes, from sysfs (`None` when it cannot be read).
pub fn device_size(dev: &Path) -> Option<u64> {
    let name = dev.file_name()?.to_str()?;
    let sectors = std::fs::read_to_string(format!("/sys/block/{name}/size")).ok()?;
    sectors.trim().parse::<u64>().ok().map(|s| s * 512)
}

/// Detaches a loop device (the kernel frees it once its last user closes it).
pub fn loop_detach(dev: &Path) -> Result<(), SystemError> {
    run("losetup", &["--detach", &dev.display().to_string()]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext4 /dev/loop3 rw\n\
                    37 35 0:52 / /var/lib/x rw shared:5 - fuse.meshblock meshblock rw,user_id=0\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(
            (m[0].fstype.as_str(), m[0].source.as_str()),
            ("ext4", "/dev/loop3")
        );
        assert_eq!(m[1].fstype, "fuse.meshblock");
    }
}
