//! Block devices: the [`BlockDevice`] trait and its implementations. The only module that touches
//! io_uring (in [`uring`]), and the owner of the I/O buffers ([`buf`]) io_uring registers.
//!
//! - [`UringDevice`]: O_DIRECT, one ring thread per device that tokio tasks talk to over a
//!   bounded channel. The daemon's default.
//! - [`FileDevice`]: O_DIRECT pread/pwrite on tokio's blocking threads, for hosts where io_uring
//!   is unavailable (Docker's default seccomp profile blocks it).
//! - [`FaultyDevice`]: wraps any device and injects faults from a seeded plan (EIO, bit flips,
//!   latency, power loss with torn writes). Tests only reach faults through this seam; the
//!   daemon's [`ServedDevice`] puts it under every device in fault-test builds ([`served`]).
//!
//! Contract, checked by one conformance suite for every implementation: offsets and lengths are
//! multiples of [`ALIGN`]; buffers are [`AlignedBuf`] and I/O covers their window; a range past
//! the capacity is refused; a completed [`flush`](BlockDevice::flush) makes every write completed
//! before it durable. A device is a block device or a regular (possibly sparse) file used whole;
//! its capacity is the file size or `BLKGETSIZE64`, rounded down to [`ALIGN`].
//!
//! This module must not know about chunks, checksums or the wire protocol.

pub mod buf;
mod faulty;
mod file;
mod served;
mod uring;

#[cfg(test)]
mod conformance;

pub use buf::{AlignedBuf, BufferPool, PoolConfig, ALIGN};
pub use faulty::{CrashMode, CrashReport, EioRule, FaultOp, FaultyDevice, SECTOR};
pub use file::FileDevice;
#[cfg(feature = "failpoints")]
pub use served::TestDevice;
pub use served::{serve, ServedDevice, DEVICE_EIO};
pub use uring::UringDevice;

use std::future::Future;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Requests queued to one ring thread before submitters wait.
pub const DEFAULT_QUEUE_DEPTH: usize = 1024;
/// Submission queue entries of one ring (also the most requests in flight in the kernel).
pub const DEFAULT_RING_ENTRIES: u32 = 256;

/// How often [`AnyDevice::open_when_free`] tries a locked device again.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} is in use by another process (locked): another SDS serves it, or a program has \
         it open; stop that process, or take the device out of this SDS's devices"
    )]
    Busy(PathBuf),
    #[error("device I/O failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("unaligned request at {offset}+{len}")]
    Unaligned { offset: u64, len: u64 },
    #[error("request at {offset}+{len} is beyond the device's {capacity} bytes")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    #[error("short transfer at {offset}: {done} of {len} bytes")]
    Short {
        offset: u64,
        len: usize,
        done: usize,
    },
    #[error("the device's I/O thread has stopped")]
    Stopped,
    /// Marked failed earlier: no I/O reaches it any more (a failing disk may still answer
    /// some reads, with data older than writes it lost).
    #[error("device {0} has failed; it takes no more I/O")]
    Failed(String),
}

impl DeviceError {
    /// True when the error says the device (not the caller) failed: the device should be
    /// reported as failed.
    pub fn is_device_failure(&self) -> bool {
        matches!(
            self,
            DeviceError::Io(_)
                | DeviceError::Short { .. }
                | DeviceError::Stopped
                | DeviceError::Failed(_)
        )
    }

    pub(crate) fn eio() -> DeviceError {
        DeviceError::Io(std::io::Error::from_raw_os_error(libc::EIO))
    }
}

/// A device of fixed capacity with aligned reads and writes of owned buffers.
pub trait BlockDevice: Send + Sync + 'static {
    /// Usable bytes, a multiple of [`ALIGN`].
    fn capacity(&self) -> u64;
    /// The pool this device's I/O buffers should come from (registered with io_uring).
    fn buffers(&self) -> &BufferPool;
    /// Fill `buf`'s window from `offset`; the buffer comes back on success.
    fn read(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> impl Future<Output = Result<AlignedBuf, DeviceError>> + Send;
    /// Write `buf`'s window at `offset`; the buffer comes back on success.
    fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> impl Future<Output = Result<AlignedBuf, DeviceError>> + Send;
    /// Write `buf`'s window at `offset` as the next piece of a sequential log (the journal):
    /// same contract and result as [`write`](Self::write), but the device may merge it with
    /// log writes queued with it that continue it on the device into one device write (group
    /// commit). Devices without that simply write.
    fn write_log(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> impl Future<Output = Result<AlignedBuf, DeviceError>> + Send {
        self.write(offset, buf)
    }
    /// Log writes so far that reached the device merged with others (group commit).
    fn log_writes_merged(&self) -> u64 {
        0
    }
    /// Make every write completed before this call durable (fdatasync).
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send;
    /// Let go of the exclusive lock on the device file, so it can be opened again while this
    /// handle lives on (a failed device an operator cleared is reopened and formatted).
    fn unlock(&self) {}
    /// Hint that `[offset, offset + len)` is unused (hole punch or discard); its contents are
    /// unspecified afterwards. Devices that cannot discard succeed without doing anything.
    fn discard(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send;
}

impl<D: BlockDevice> BlockDevice for Arc<D> {
    fn capacity(&self) -> u64 {
        (**self).capacity()
    }
    fn unlock(&self) {
        (**self).unlock()
    }
    fn buffers(&self) -> &BufferPool {
        (**self).buffers()
    }
    fn read(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> impl Future<Output = Result<AlignedBuf, DeviceError>> + Send {
        (**self).read(offset, buf)
    }
    fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> impl Future<Output = Result<AlignedBuf, DeviceError>> + Send {
        (**self).write(offset, buf)
    }
    fn write_log(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> impl Future<Output = Result<AlignedBuf, DeviceError>> + Send {
        (**self).write_log(offset, buf)
    }
    fn log_writes_merged(&self) -> u64 {
        (**self).log_writes_merged()
    }
    fn flush(&self) -> impl Future<Output = Result<(), DeviceError>> + Send {
        (**self).flush()
    }
    fn discard(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), DeviceError>> + Send {
        (**self).discard(offset, len)
    }
}

/// Check a request against the contract.
pub(crate) fn check_range(offset: u64, len: u64, capacity: u64) -> Result<(), DeviceError> {
    if !offset.is_multiple_of(ALIGN as u64) || !len.is_multiple_of(ALIGN as u64) {
        return Err(DeviceError::Unaligned { offset, len });
    }
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(DeviceError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}

/// How to open a device.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// The buffer pool to allocate.
    pub pool: PoolConfig,
    /// Refuse a file system without O_DIRECT (true), or fall back to buffered I/O with a
    /// warning (false; durability still comes from fdatasync).
    pub require_direct: bool,
    /// Ring size ([`UringDevice`] only).
    pub ring_entries: u32,
    /// Requests queued to the ring thread before submitters wait ([`UringDevice`] only).
    pub queue_depth: usize,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            pool: PoolConfig::default(),
            require_direct: false,
            ring_entries: DEFAULT_RING_ENTRIES,
            queue_depth: DEFAULT_QUEUE_DEPTH,
        }
    }
}

impl DeviceOptions {
    /// Small pool and ring, for tests.
    pub fn small() -> DeviceOptions {
        DeviceOptions {
            pool: PoolConfig::small(),
            require_direct: false,
            ring_entries: 64,
            queue_depth: 128,
        }
    }
}

/// Drop this process's `flock` on `file` (taken by [`open_file`]).
pub(crate) fn unlock_file(file: &std::fs::File) {
    // SAFETY: flock on a descriptor we own; failure only leaves the lock held.
    let _ = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
}

/// An opened device file: the descriptor, locked against other processes, and its geometry.
pub(crate) struct OpenedFile {
    pub file: std::fs::File,
    pub capacity: u64,
    pub is_block: bool,
}

/// Open `path` read-write with O_DIRECT (see [`DeviceOptions::require_direct`]), take an
/// exclusive `flock` so a second SDS cannot open it, and find its capacity.
pub(crate) fn open_file(path: &Path, opts: &DeviceOptions) -> Result<OpenedFile, DeviceError> {
    let open_err = |source| DeviceError::Open {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(open_err)?;
    let is_block = meta.file_type().is_block_device();
    if !is_block && !meta.file_type().is_file() {
        return Err(open_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        )));
    }
    let open = |flags: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags | libc::O_CLOEXEC | if is_block { libc::O_EXCL } else { 0 })
            .open(path)
    };
    let file = match open(libc::O_DIRECT) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !opts.require_direct => {
            tracing::warn!(
                path = %path.display(),
                "the file system does not support O_DIRECT; using buffered I/O with fdatasync"
            );
            open(0).map_err(open_err)?
        }
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(DeviceError::Busy(path.to_owned()))
        }
        Err(e) => return Err(open_err(e)),
    };
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DeviceError::Busy(path.to_owned()));
        }
        return Err(open_err(e));
    }
    let bytes = if is_block {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if r != 0 {
            return Err(open_err(std::io::Error::last_os_error()));
        }
        size
    } else {
        file.metadata().map_err(open_err)?.len()
    };
    Ok(OpenedFile {
        file,
        capacity: bytes / ALIGN as u64 * ALIGN as u64,
        is_block,
    })
}

/// Discard a range synchronously: punch a hole in a file, BLKDISCARD on a block device. Errors
/// meaning "not supported" count as success.
pub(crate) fn discard_sync(
    file: &std::fs::File,
    is_block: bool,
    offset: u64,
    len: u64,
) -> Result<(), DeviceError> {
    if len == 0 {
        return Ok(());
    }
    let fd = file.as_raw_fd();
    let r = if is_block {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD reads two u64 through the pointer.
        unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) }
    } else {
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Ok(());
        };
        // SAFETY: fallocate on a descriptor we own.
        unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                n,
            )
        }
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) => Ok(()),
        _ => Err(DeviceError::Io(e)),
    }
}

/// The device a daemon runs on: io_uring, or the pread/pwrite fallback.
pub enum AnyDevice {
    Uring(UringDevice),
    File(FileDevice),
}

impl AnyDevice {
    /// Open `path` with io_uring when `io_uring` is set and the kernel allows it, else with
    /// pread/pwrite.
    pub fn open(
        path: &Path,
        io_uring: bool,
        opts: &DeviceOptions,
    ) -> Result<AnyDevice, DeviceError> {
        if io_uring {
            match UringDevice::open(path, opts) {
                Ok(d) => return Ok(AnyDevice::Uring(d)),
                Err(DeviceError::Io(e)) => tracing::warn!(
                    path = %path.display(),
                    "io_uring is unavailable ({e}); using pread/pwrite threads"
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(AnyDevice::File(FileDevice::open(path, opts)?))
    }

    /// [`AnyDevice::open`], waiting up to `wait` while another process holds the device's
    /// lock. An SDS that was just killed holds it a little longer than its process lives: the
    /// kernel drops the lock only once it has torn down that process's io_uring and finished
    /// the device I/O it had in flight, so a restart right after a crash can find it locked.
    pub async fn open_when_free(
        path: &Path,
        io_uring: bool,
        opts: &DeviceOptions,
        wait: std::time::Duration,
    ) -> Result<AnyDevice, DeviceError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut told = false;
        loop {
            match AnyDevice::open(path, io_uring, opts) {
                Err(DeviceError::Busy(_)) if tokio::time::Instant::now() < deadline => {
                    if !told {
                        tracing::warn!(path = %path.display(), wait_ms = wait.as_millis() as u64,
                            "the device is locked by another process; waiting for it to be released (an SDS that has just exited releases it once the kernel has finished its I/O)");
                        told = true;
                    }
                    tokio::time::sleep(LOCK_RETRY).await;
                }
                r => return r,
            }
        }
    }

    /// `"io_uring"` or `"pread/pwrite"`.
    pub fn engine(&self) -> &'static str {
        match self {
            AnyDevice::Uring(_) => "io_uring",
            AnyDevice::File(_) => "pread/pwrite",
        }
    }
}

impl BlockDevice for AnyDevice {
    fn capacity(&self) -> u64 {
        match self {
            AnyDevice::Uring(d) => d.capacity(),
            AnyDevice::File(d) => d.capacity(),
        }
    }
    fn buffers(&self) -> &BufferPool {
        match self {
            AnyDevice::Uring(d) => d.buffers(),
            AnyDevice::File(d) => d.buffers(),
        }
    }
    fn unlock(&self) {
        match self {
            AnyDevice::Uring(d) => d.unlock(),
            AnyDevice::File(d) => d.unlock(),
        }
    }

    async fn read(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        match self {
            AnyDevice::Uring(d) => d.read(offset, buf).await,
            AnyDevice::File(d) => d.read(offset, buf).await,
        }
    }
    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        match self {
            AnyDevice::Uring(d) => d.write(offset, buf).await,
            AnyDevice::File(d) => d.write(offset, buf).await,
        }
    }
    async fn write_log(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        match self {
            AnyDevice::Uring(d) => d.write_log(offset, buf).await,
            AnyDevice::File(d) => d.write_log(offset, buf).await,
        }
    }
    fn log_writes_merged(&self) -> u64 {
        match self {
            AnyDevice::Uring(d) => d.log_writes_merged(),
            AnyDevice::File(d) => d.log_writes_merged(),
        }
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        match self {
            AnyDevice::Uring(d) => d.flush().await,
            AnyDevice::File(d) => d.flush().await,
        }
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self {
            AnyDevice::Uring(d) => d.discard(offset, len).await,
            AnyDevice::File(d) => d.discard(offset, len).await,
        }
    }
}
