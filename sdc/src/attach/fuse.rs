//! A minimal FUSE server: one flat directory whose regular files are block [`Backend`]s (the
//! same trait the NBD server serves), so a loop device over such a file is a local block device
//! backed by a Meshblock volume.
//!
//! Owns the FUSE wire protocol (the subset a loop device, `ls` and `stat` use) on an already
//! mounted `/dev/fuse` descriptor. It is deliberately **stateless**: inode numbers are derived
//! from the files' stable keys and file handles are ignored, so a new SDC process can take over
//! a live kernel connection (handed over by the fd keeper) without the INIT handshake and ask
//! the kernel to resend the requests the dead process had read (`FUSE_NOTIFY_RESEND`, Linux
//! 6.9+). That is why this is not built on `fuser`, whose sessions always start with INIT.
//!
//! Files are opened with `FOPEN_DIRECT_IO`: no page cache between the loop device and the
//! volume, so another host that takes the volume over reads what this one wrote. FSYNC is a real
//! Backend flush. It must not do anything else: no mounting (see `attach::mount`), no policy.
//!
//! PERFORMANCE-CRITICAL: READ and WRITE run per block request; no logging above DEBUG there.

use crate::nbd::{Backend, BackendError};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

/// The root directory's inode (fixed by the protocol).
pub const ROOT_INODE: u64 = 1;
/// Largest WRITE payload we accept (and READ we are asked for): 1 MiB, one chunk.
pub const MAX_WRITE: u32 = 1 << 20;
/// Requests handled at once; the reader stops reading past this.
pub const INFLIGHT_MAX: usize = 128;
/// Buffer for one request: the largest write plus headers.
const READ_BUF: usize = MAX_WRITE as usize + 8192;
/// How long the kernel may cache names and attributes, seconds. Files never change size while
/// attached, and a removed file is only removed after its loop device is gone.
const ATTR_TTL_SECS: u64 = 1;

mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
}

const FUSE_KERNEL_VERSION: u32 = 7;
/// The protocol minor version we speak (attribute and init layouts of 7.31).
const FUSE_KERNEL_MINOR: u32 = 31;
const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_MAX_PAGES: u32 = 1 << 22;
const FOPEN_DIRECT_IO: u32 = 1 << 0;
const FUSE_NOTIFY_RESEND: i32 = 7;
const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
const FALLOC_FL_ZERO_RANGE: u32 = 0x10;
const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;

/// Why the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("reading /dev/fuse failed: {0}")]
    Read(#[source] std::io::Error),
    #[error("the kernel sent a malformed request: {0}")]
    Malformed(&'static str),
}

struct Entry<B> {
    name: String,
    backend: Arc<B>,
}

/// The directory's files by inode. Inodes are the caller's stable keys (a volume id) offset
/// past the root, so they survive a restart of the server.
pub struct FuseFs<B> {
    files: Mutex<BTreeMap<u64, Entry<B>>>,
}

impl<B> Default for FuseFs<B> {
    fn default() -> Self {
        FuseFs {
            files: Mutex::new(BTreeMap::new()),
        }
    }
}

/// A request's fixed header.
#[derive(Clone, Copy, Debug)]
struct InHeader {
    opcode: u32,
    unique: u64,
    nodeid: u64,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
}

/// The inode a file with stable key `key` gets.
pub fn inode_of(key: u64) -> u64 {
    key.saturating_add(ROOT_INODE + 1)
}

impl<B: Backend> FuseFs<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry<B>>> {
        // Each map operation leaves the map consistent, so a poisoned lock is still usable.
        self.files.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds (or replaces) the file `name` with stable key `key`.
    pub fn add(&self, key: u64, name: &str, backend: Arc<B>) {
        self.lock().insert(
            inode_of(key),
            Entry {
                name: name.to_string(),
                backend,
            },
        );
    }

    /// Removes the file with stable key `key`; later requests on it fail with ENOENT.
    pub fn remove(&self, key: u64) {
        self.lock().remove(&inode_of(key));
    }

    fn file(&self, inode: u64) -> Option<Arc<B>> {
        self.lock().get(&inode).map(|e| e.backend.clone())
    }

    fn lookup_name(&self, name: &[u8]) -> Option<(u64, Arc<B>)> {
        self.lock()
            .iter()
            .find(|(_, e)| e.name.as_bytes() == name)
            .map(|(i, e)| (*i, e.backend.clone()))
    }

    /// Serve requests from `dev` until the filesystem is unmounted. Blocking: run it on a
    /// thread of its own; requests are handled concurrently on `rt`. With `resume`, the
    /// connection is already initialised (taken over from a previous process): no INIT is
    /// expected, and the kernel is asked to resend what that process left unanswered.
    pub fn serve(
        self: Arc<Self>,
        dev: Arc<File>,
        rt: tokio::runtime::Handle,
        resume: bool,
    ) -> Result<(), FuseError> {
        let slots = Arc::new(tokio::sync::Semaphore::new(INFLIGHT_MAX));
        if resume {
            let mut notify = Vec::with_capacity(OUT_HEADER);
            notify.extend_from_slice(&(OUT_HEADER as u32).to_le_bytes());
            notify.extend_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
            notify.extend_from_slice(&0u64.to_le_bytes());
            if let Err(e) = (&*dev).write(&notify) {
                tracing::warn!(
                    "the kernel refused FUSE_NOTIFY_RESEND ({e}); requests the previous SDC \
                     process had read are lost (needs Linux 6.9 or later)"
                );
            }
        }
        loop {
            let permit = rt
                .block_on(slots.clone().acquire_owned())
                .map_err(|_| FuseError::Malformed("request slots closed"))?;
            let mut buf = vec![0u8; READ_BUF];
            let n = match (&*dev).read(&mut buf) {
                Ok(n) => n,
                Err(e) => match e.raw_os_error() {
                    // Interrupted, or a request the kernel withdrew before we read it.
                    Some(libc::EINTR | libc::EAGAIN | libc::ENOENT) => continue,
                    // Unmounted or aborted: the normal end.
                    Some(libc::ENODEV) => return Ok(()),
                    _ => return Err(FuseError::Read(e)),
                },
            };
            buf.truncate(n);
            let Some(h) = parse_header(&buf) else {
                return Err(FuseError::Malformed("short request header"));
            };
            match h.opcode {
                op::FORGET | op::BATCH_FORGET | op::INTERRUPT => continue,
                op::DESTROY => {
                    reply(&dev, h.unique, 0, &[]);
                    return Ok(());
                }
                op::READ | op::WRITE | op::FSYNC | op::FALLOCATE => {
                    let fs = self.clone();
                    let dev = dev.clone();
                    rt.spawn(async move {
                        let _permit = permit;
                        let (err, body) = fs.data_op(h, &buf[IN_HEADER..]).await;
                        reply(&dev, h.unique, err, &body);
                    });
                }
                _ => {
                    let (err, body) = self.meta_op(h, &buf[IN_HEADER..]);
                    reply(&dev, h.unique, err, &body);
                }
            }
        }
    }

    /// Everything but block I/O, answered at once.
    fn meta_op(&self, h: InHeader, arg: &[u8]) -> (i32, Vec<u8>) {
        match h.opcode {
            op::INIT => {
                let major = u32_at(arg, 0).unwrap_or(0);
                let minor = u32_at(arg, 4).unwrap_or(0);
                let readahead = u32_at(arg, 8).unwrap_or(0);
                let flags = u32_at(arg, 12).unwrap_or(0);
                if major < FUSE_KERNEL_VERSION {
                    return (-libc::EPROTO, Vec::new());
                }
                let mut out = Vec::with_capacity(64);
                out.extend_from_slice(&FUSE_KERNEL_VERSION.to_le_bytes());
                out.extend_from_slice(&minor.min(FUSE_KERNEL_MINOR).to_le_bytes());
                out.extend_from_slice(&readahead.to_le_bytes());
                let want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES;
                out.extend_from_slice(&(flags & want).to_le_bytes());
                out.extend_from_slice(&64u16.to_le_bytes()); // max_background
                out.extend_from_slice(&48u16.to_le_bytes()); // congestion_threshold
                out.extend_from_slice(&MAX_WRITE.to_le_bytes());
                out.extend_from_slice(&1u32.to_le_bytes()); // time_gran
                out.extend_from_slice(&((MAX_WRITE / 4096) as u16).to_le_bytes()); // max_pages
                out.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
                out.resize(64, 0);
                (0, out)
            }
            op::LOOKUP => {
                let name = arg.split(|b| *b == 0).next().unwrap_or(&[]);
                if h.nodeid != ROOT_INODE {
                    return (-libc::ENOTDIR, Vec::new());
                }
                match self.lookup_name(name) {
                    Some((ino, b)) => {
                        let mut out = Vec::with_capacity(128);
                        out.extend_from_slice(&ino.to_le_bytes());
                        out.extend_from_slice(&0u64.to_le_bytes()); // generation
                        out.extend_from_slice(&ATTR_TTL_SECS.to_le_bytes()); // entry_valid
                        out.extend_from_slice(&ATTR_TTL_SECS.to_le_bytes()); // attr_valid
                        out.extend_from_slice(&[0u8; 8]); // nsecs
                        out.extend_from_slice(&file_attr(ino, b.size()));
                        (0, out)
                    }
                    None => (-libc::ENOENT, Vec::new()),
                }
            }
            op::GETATTR | op::SETATTR => {
                let attr = if h.nodeid == ROOT_INODE {
                    dir_attr()
                } else {
                    match self.file(h.nodeid) {
                        Some(b) => file_attr(h.nodeid, b.size()),
                        None => return (-libc::ENOENT, Vec::new()),
                    }
                };
                let mut out = Vec::with_capacity(104);
                out.extend_from_slice(&ATTR_TTL_SECS.to_le_bytes());
                out.extend_from_slice(&[0u8; 8]); // nsec + dummy
                out.extend_from_slice(&attr);
                (0, out)
            }
            op::OPEN => {
                if self.file(h.nodeid).is_none() {
                    return (-libc::ENOENT, Vec::new());
                }
                let mut out = Vec::with_capacity(16);
                out.extend_from_slice(&0u64.to_le_bytes());
                out.extend_from_slice(&FOPEN_DIRECT_IO.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
                (0, out)
            }
            op::OPENDIR => {
                if h.nodeid != ROOT_INODE {
                    return (-libc::ENOTDIR, Vec::new());
                }
                (0, vec![0u8; 16])
            }
            op::READDIR => {
                let offset = u64_at(arg, 8).unwrap_or(0);
                let size = u32_at(arg, 16).unwrap_or(0) as usize;
                (0, self.readdir(offset, size))
            }
            op::RELEASE | op::RELEASEDIR | op::FLUSH | op::FSYNCDIR | op::ACCESS => (0, Vec::new()),
            op::STATFS => {
                let mut out = vec![0u8; 80];
                out[48..52].copy_from_slice(&4096u32.to_le_bytes()); // bsize
                out[52..56].copy_from_slice(&255u32.to_le_bytes()); // namelen
                out[56..60].copy_from_slice(&4096u32.to_le_bytes()); // frsize
                (0, out)
            }
            op::GETXATTR | op::LISTXATTR => (-libc::ENOSYS, Vec::new()),
            _ => (-libc::ENOSYS, Vec::new()),
        }
    }

    fn readdir(&self, offset: u64, size: usize) -> Vec<u8> {
        let mut entries: Vec<(u64, u32, Vec<u8>)> = vec![
            (ROOT_INODE, libc::DT_DIR as u32, b".".to_vec()),
            (ROOT_INODE, libc::DT_DIR as u32, b"..".to_vec()),
        ];
        for (ino, e) in self.lock().iter() {
            entries.push((*ino, libc::DT_REG as u32, e.name.as_bytes().to_vec()));
        }
        let mut out = Vec::new();
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            let len = 24 + name.len();
            let padded = len.div_ceil(8) * 8;
            if out.len() + padded > size {
                break;
            }
            out.extend_from_slice(&ino.to_le_bytes());
            out.extend_from_slice(&(i as u64 + 1).to_le_bytes()); // offset of the next entry
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(&kind.to_le_bytes());
            out.extend_from_slice(&name);
            out.resize(out.len() + padded - len, 0);
        }
        out
    }

    /// Block I/O on a file: READ, WRITE, FSYNC (a real flush) and FALLOCATE (discard, zero).
    async fn data_op(&self, h: InHeader, arg: &[u8]) -> (i32, Vec<u8>) {
        let Some(b) = self.file(h.nodeid) else {
            return (-libc::ENOENT, Vec::new());
        };
        let size = b.size();
        match h.opcode {
            op::READ => {
                let (Some(offset), Some(len)) = (u64_at(arg, 8), u32_at(arg, 16)) else {
                    return (-libc::EINVAL, Vec::new());
                };
                // Reads past the end are short, like a regular file's.
                let len = u64::from(len.min(MAX_WRITE)).min(size.saturating_sub(offset)) as u32;
                if len == 0 {
                    return (0, Vec::new());
                }
                match b.read(offset, len).await {
                    Ok(data) if data.len() == len as usize => (0, data.to_vec()),
                    Ok(_) => (-libc::EIO, Vec::new()),
                    Err(e) => (errno(e), Vec::new()),
                }
            }
            op::WRITE => {
                let (Some(offset), Some(len)) = (u64_at(arg, 8), u32_at(arg, 16)) else {
                    return (-libc::EINVAL, Vec::new());
                };
                let Some(data) = arg.get(40..40 + len as usize) else {
                    return (-libc::EINVAL, Vec::new());
                };
                if offset
                    .checked_add(u64::from(len))
                    .is_none_or(|end| end > size)
                {
                    return (-libc::ENOSPC, Vec::new());
                }
                if len == 0 {
                    return (0, 0u64.to_le_bytes().to_vec());
                }
                match b.write(offset, Bytes::copy_from_slice(data), false).await {
                    Ok(()) => {
                        let mut out = len.to_le_bytes().to_vec();
                        out.extend_from_slice(&0u32.to_le_bytes());
                        (0, out)
                    }
                    Err(e) => (errno(e), Vec::new()),
                }
            }
            op::FSYNC => match b.flush().await {
                Ok(()) => (0, Vec::new()),
                Err(e) => (errno(e), Vec::new()),
            },
            op::FALLOCATE => {
                let (Some(offset), Some(len), Some(mode)) =
                    (u64_at(arg, 8), u64_at(arg, 16), u32_at(arg, 24))
                else {
                    return (-libc::EINVAL, Vec::new());
                };
                let end = offset.saturating_add(len).min(size);
                let len = end.saturating_sub(offset);
                let r = if mode & FALLOC_FL_PUNCH_HOLE != 0 {
                    if mode & FALLOC_FL_KEEP_SIZE == 0 {
                        return (-libc::EOPNOTSUPP, Vec::new());
                    }
                    b.write_zeroes(offset, len, true).await
                } else if mode & FALLOC_FL_ZERO_RANGE != 0 {
                    b.write_zeroes(offset, len, false).await
                } else if mode & !FALLOC_FL_KEEP_SIZE == 0 {
                    // Plain preallocation: a volume's whole range is always addressable.
                    Ok(())
                } else {
                    return (-libc::EOPNOTSUPP, Vec::new());
                };
                match r {
                    Ok(()) => (0, Vec::new()),
                    Err(e) => (errno(e), Vec::new()),
                }
            }
            _ => (-libc::ENOSYS, Vec::new()),
        }
    }
}

fn errno(e: BackendError) -> i32 {
    -(e.wire_code() as i32)
}

fn parse_header(b: &[u8]) -> Option<InHeader> {
    let len = u32_at(b, 0)? as usize;
    if len != b.len() || len < IN_HEADER {
        return None;
    }
    Some(InHeader {
        opcode: u32_at(b, 4)?,
        unique: u64_at(b, 8)?,
        nodeid: u64_at(b, 16)?,
    })
}

/// `struct fuse_attr` (88 bytes).
fn attr(ino: u64, size: u64, mode: u32, nlink: u32) -> Vec<u8> {
    let mut a = Vec::with_capacity(88);
    a.extend_from_slice(&ino.to_le_bytes());
    a.extend_from_slice(&size.to_le_bytes());
    a.extend_from_slice(&size.div_ceil(512).to_le_bytes()); // blocks
    a.extend_from_slice(&[0u8; 24]); // atime, mtime, ctime
    a.extend_from_slice(&[0u8; 12]); // their nsecs
    a.extend_from_slice(&mode.to_le_bytes());
    a.extend_from_slice(&nlink.to_le_bytes());
    a.extend_from_slice(&0u32.to_le_bytes()); // uid
    a.extend_from_slice(&0u32.to_le_bytes()); // gid
    a.extend_from_slice(&0u32.to_le_bytes()); // rdev
    a.extend_from_slice(&4096u32.to_le_bytes()); // blksize
    a.extend_from_slice(&0u32.to_le_bytes()); // flags
    a
}

fn file_attr(ino: u64, size: u64) -> Vec<u8> {
    attr(ino, size, libc::S_IFREG | 0o600, 1)
}

fn dir_attr() -> Vec<u8> {
    attr(ROOT_INODE, 0, libc::S_IFDIR | 0o755, 2)
}

/// One reply: header and body in a single write, as the protocol requires. A failed write
/// means the request was interrupted or the connection is gone; nothing is left to do.
fn reply(dev: &File, unique: u64, error: i32, body: &[u8]) {
    let body = if error == 0 { body } else { &[] };
    let mut out = Vec::with_capacity(OUT_HEADER + body.len());
    out.extend_from_slice(&((OUT_HEADER + body.len()) as u32).to_le_bytes());
    out.extend_from_slice(&error.to_le_bytes());
    out.extend_from_slice(&unique.to_le_bytes());
    out.extend_from_slice(body);
    if let Err(e) = (&*dev).write(&out) {
        tracing::debug!("FUSE reply to request {unique} not delivered: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_and_header_layouts() {
        assert_eq!(file_attr(5, 4096).len(), 88);
        let mut req = vec![0u8; IN_HEADER];
        req[0..4].copy_from_slice(&(IN_HEADER as u32).to_le_bytes());
        req[4..8].copy_from_slice(&op::GETATTR.to_le_bytes());
        req[8..16].copy_from_slice(&7u64.to_le_bytes());
        req[16..24].copy_from_slice(&1u64.to_le_bytes());
        let h = parse_header(&req).expect("header");
        assert_eq!((h.opcode, h.unique, h.nodeid), (op::GETATTR, 7, 1));
        assert!(parse_header(&req[..20]).is_none(), "truncated header");
        req[0..4].copy_from_slice(&100u32.to_le_bytes());
        assert!(
            parse_header(&req).is_none(),
            "length disagrees with the read"
        );
    }

    #[test]
    fn inodes_never_collide_with_the_root() {
        assert_eq!(inode_of(0), 2);
        assert_eq!(inode_of(u64::MAX), u64::MAX);
    }
}
