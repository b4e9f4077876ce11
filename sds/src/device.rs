//! Block devices: the `BlockDevice` trait and its implementations. The only module that touches
//! io_uring.
//!
//! `UringDevice` opens the device (block device or plain file) with O_DIRECT and runs one ring
//! thread that tokio tasks talk to over a bounded channel; the thread submits what is queued,
//! waits for completions and answers each request. `FileDevice` does the same with
//! pread/pwrite (for machines without io_uring). `FaultyDevice` wraps any device and injects
//! faults from a seeded plan (EIO on ranges, bit flips on read, latency).
//!
//! All offsets and lengths are multiples of [`ALIGN`]; buffers are [`AlignedBuf`].

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::oneshot;

/// Alignment of every device offset, length and buffer (O_DIRECT).
pub const ALIGN: usize = 4096;
/// Requests queued to one ring thread before callers wait.
pub const RING_QUEUE: usize = 512;
/// Submission queue entries of one ring.
pub const RING_ENTRIES: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device I/O failed: {0}")]
    Io(#[source] std::io::Error),
    #[error("unaligned request at {offset}+{len}")]
    Unaligned { offset: u64, len: usize },
    #[error("request at {offset}+{len} is beyond the device's {capacity} bytes")]
    OutOfRange {
        offset: u64,
        len: usize,
        capacity: u64,
    },
    #[error("the device thread stopped")]
    Stopped,
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is uniquely owned; moving it between threads is fine.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` is rounded up to [`ALIGN`]).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let len = len.max(ALIGN).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(len, ALIGN).expect("valid layout");
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory allocating {len} bytes");
        AlignedBuf { ptr, len }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, ALIGN).expect("valid layout");
        // SAFETY: allocated with this layout in `zeroed`.
        unsafe { dealloc(self.ptr, layout) }
    }
}

/// A device of fixed capacity with aligned reads and writes.
pub trait BlockDevice: Send + Sync + 'static {
    fn capacity(&self) -> u64;
    /// Read `buf.len()` bytes at `offset` into `buf`.
    fn read(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> impl std::future::Future<Output = Result<AlignedBuf, DeviceError>> + Send;
    /// Write all of `buf` at `offset`; the buffer is handed back.
    fn write(
        &self,
        offset: u64,
        buf: AlignedBuf,
    ) -> impl std::future::Future<Output = Result<AlignedBuf, DeviceError>> + Send;
    /// Make every completed write durable.
    fn flush(&self) -> impl std::future::Future<Output = Result<(), DeviceError>> + Send;
}

fn check(offset: u64, len: usize, capacity: u64) -> Result<(), DeviceError> {
    if !offset.is_multiple_of(ALIGN as u64) || !len.is_multiple_of(ALIGN) {
        return Err(DeviceError::Unaligned { offset, len });
    }
    if offset.checked_add(len as u64).is_none_or(|e| e > capacity) {
        return Err(DeviceError::OutOfRange {
            offset,
            len,
            capacity,
        });
    }
    Ok(())
}

fn open_direct(path: &Path) -> Result<(std::fs::File, u64), DeviceError> {
    let open_err = |source| DeviceError::Open {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(open_err)?;
    let meta = f.metadata().map_err(open_err)?;
    let capacity = if meta.file_type().is_file() {
        meta.len()
    } else {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), 0x8008_1272, &mut size as *mut u64) };
        if r != 0 {
            return Err(open_err(std::io::Error::last_os_error()));
        }
        size
    };
    Ok((f, capacity / ALIGN as u64 * ALIGN as u64))
}

enum Op {
    Read(u64, AlignedBuf),
    Write(u64, AlignedBuf),
    Flush,
}

struct Req {
    op: Op,
    reply: oneshot::Sender<Result<Option<AlignedBuf>, DeviceError>>,
}

/// io_uring with O_DIRECT, one ring thread.
pub struct UringDevice {
    tx: std::sync::mpsc::SyncSender<Req>,
    capacity: u64,
}

impl UringDevice {
    pub fn open(path: &Path) -> Result<UringDevice, DeviceError> {
        let (file, capacity) = open_direct(path)?;
        let ring = io_uring::IoUring::new(RING_ENTRIES).map_err(DeviceError::Io)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(RING_QUEUE);
        std::thread::Builder::new()
            .name("sds-ring".into())
            .spawn(move || ring_thread(ring, file, rx))
            .map_err(DeviceError::Io)?;
        Ok(UringDevice { tx, capacity })
    }

    async fn submit(&self, op: Op) -> Result<Option<AlignedBuf>, DeviceError> {
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.clone();
        let req = Req { op, reply };
        // The channel is bounded; a full queue parks this task on a blocking thread briefly.
        match tx.try_send(req) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(req)) => {
                tokio::task::spawn_blocking(move || tx.send(req))
                    .await
                    .map_err(|_| DeviceError::Stopped)?
                    .map_err(|_| DeviceError::Stopped)?
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                return Err(DeviceError::Stopped)
            }
        }
        rx.await.map_err(|_| DeviceError::Stopped)?
    }
}

fn ring_thread(
    mut ring: io_uring::IoUring,
    file: std::fs::File,
    rx: std::sync::mpsc::Receiver<Req>,
) {
    use io_uring::{opcode, types};
    let fd = types::Fd(file.as_raw_fd());
    let mut slots: Vec<Option<Req>> = (0..RING_ENTRIES).map(|_| None).collect();
    let mut free: Vec<usize> = (0..RING_ENTRIES as usize).rev().collect();
    let mut inflight = 0usize;
    loop {
        // Take new requests: block only when nothing is in flight.
        loop {
            if free.is_empty() {
                break;
            }
            let req = if inflight == 0 {
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => break,
                }
            };
            let Some(slot) = free.pop() else { break };
            let sqe = match &req.op {
                Op::Read(off, buf) => opcode::Read::new(fd, buf.ptr, buf.len as u32)
                    .offset(*off)
                    .build(),
                Op::Write(off, buf) => opcode::Write::new(fd, buf.ptr, buf.len as u32)
                    .offset(*off)
                    .build(),
                Op::Flush => opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            }
            .user_data(slot as u64);
            slots[slot] = Some(req);
            // SAFETY: the buffer lives in `slots` until its completion is reaped.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                if let Some(r) = slots[slot].take() {
                    let _ = r.reply.send(Err(DeviceError::Io(std::io::Error::other(
                        "submission queue full",
                    ))));
                }
                free.push(slot);
                break;
            }
            inflight += 1;
        }
        if inflight == 0 {
            continue;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::error!("io_uring submit failed: {e}");
        }
        for cqe in ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(req) = slots.get_mut(slot).and_then(|s| s.take()) else {
                continue;
            };
            free.push(slot);
            inflight -= 1;
            let res = cqe.result();
            let out = match req.op {
                _ if res < 0 => Err(DeviceError::Io(std::io::Error::from_raw_os_error(-res))),
                Op::Read(_, buf) | Op::Write(_, buf) if (res as usize) < buf.len => {
                    Err(DeviceError::Io(std::io::Error::other(format!(
                        "short transfer of {res} bytes"
                    ))))
                }
                Op::Read(_, buf) | Op::Write(_, buf) => Ok(Some(buf)),
                Op::Flush => Ok(None),
            };
            let _ = req.reply.send(out);
        }
    }
}

impl BlockDevice for UringDevice {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    async fn read(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        check(offset, buf.len, self.capacity)?;
        self.submit(Op::Read(offset, buf))
            .await?
            .ok_or(DeviceError::Stopped)
    }
    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        check(offset, buf.len, self.capacity)?;
        self.submit(Op::Write(offset, buf))
            .await?
            .ok_or(DeviceError::Stopped)
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.submit(Op::Flush).await.map(|_| ())
    }
}

/// pread/pwrite with O_DIRECT on blocking threads: for machines where io_uring is disabled.
pub struct FileDevice {
    file: Arc<std::fs::File>,
    capacity: u64,
}

impl FileDevice {
    pub fn open(path: &Path) -> Result<FileDevice, DeviceError> {
        let (file, capacity) = open_direct(path)?;
        Ok(FileDevice {
            file: Arc::new(file),
            capacity,
        })
    }
}

fn fd_of(f: &std::fs::File) -> RawFd {
    f.as_raw_fd()
}

impl BlockDevice for FileDevice {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    async fn read(&self, offset: u64, mut buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        check(offset, buf.len, self.capacity)?;
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(buf.as_mut_slice(), offset)
                .map(|_| buf)
                .map_err(DeviceError::Io)
        })
        .await
        .map_err(|_| DeviceError::Stopped)?
    }
    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        check(offset, buf.len, self.capacity)?;
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            f.write_all_at(buf.as_slice(), offset)
                .map(|_| buf)
                .map_err(DeviceError::Io)
        })
        .await
        .map_err(|_| DeviceError::Stopped)?
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || {
            // SAFETY: fdatasync on an open descriptor.
            if unsafe { libc::fdatasync(fd_of(&f)) } == 0 {
                Ok(())
            } else {
                Err(DeviceError::Io(std::io::Error::last_os_error()))
            }
        })
        .await
        .map_err(|_| DeviceError::Stopped)?
    }
}

/// Wraps a device and injects faults: EIO on a byte range, bit flips on reads of a range.
pub struct FaultyDevice<D> {
    inner: D,
    /// `[start, end)` of device bytes whose reads and writes fail with EIO (end 0 = none).
    eio: (AtomicU64, AtomicU64),
    /// Flip one bit in every read that touches `[start, end)`.
    flip: (AtomicU64, AtomicU64),
    pub injected: AtomicU64,
    fail_flush: AtomicBool,
}

impl<D: BlockDevice> FaultyDevice<D> {
    pub fn new(inner: D) -> FaultyDevice<D> {
        FaultyDevice {
            inner,
            eio: (AtomicU64::new(0), AtomicU64::new(0)),
            flip: (AtomicU64::new(0), AtomicU64::new(0)),
            injected: AtomicU64::new(0),
            fail_flush: AtomicBool::new(false),
        }
    }
    pub fn fail_range(&self, start: u64, end: u64) {
        self.eio.0.store(start, Ordering::SeqCst);
        self.eio.1.store(end, Ordering::SeqCst);
    }
    pub fn flip_range(&self, start: u64, end: u64) {
        self.flip.0.store(start, Ordering::SeqCst);
        self.flip.1.store(end, Ordering::SeqCst);
    }
    pub fn fail_flushes(&self, on: bool) {
        self.fail_flush.store(on, Ordering::SeqCst);
    }
    fn hits(r: &(AtomicU64, AtomicU64), offset: u64, len: usize) -> bool {
        let (s, e) = (r.0.load(Ordering::SeqCst), r.1.load(Ordering::SeqCst));
        e > s && offset < e && offset + len as u64 > s
    }
    fn eio(&self) -> DeviceError {
        self.injected.fetch_add(1, Ordering::SeqCst);
        DeviceError::Io(std::io::Error::from_raw_os_error(libc::EIO))
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    async fn read(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        if Self::hits(&self.eio, offset, buf.len) {
            return Err(self.eio());
        }
        let mut b = self.inner.read(offset, buf).await?;
        if Self::hits(&self.flip, offset, b.len) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            let s = self.flip.0.load(Ordering::SeqCst).saturating_sub(offset) as usize;
            let i = s.min(b.len - 1);
            b.as_mut_slice()[i] ^= 1;
        }
        Ok(b)
    }
    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        if Self::hits(&self.eio, offset, buf.len) {
            return Err(self.eio());
        }
        self.inner.write(offset, buf).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        if self.fail_flush.load(Ordering::SeqCst) {
            return Err(self.eio());
        }
        self.inner.flush().await
    }
}

/// The device a daemon runs on: io_uring, or the pread/pwrite fallback.
pub enum AnyDevice {
    Uring(UringDevice),
    File(FileDevice),
}

impl AnyDevice {
    pub fn open(path: &Path, io_uring: bool) -> Result<AnyDevice, DeviceError> {
        if io_uring {
            match UringDevice::open(path) {
                Ok(d) => return Ok(AnyDevice::Uring(d)),
                Err(DeviceError::Io(e)) => {
                    tracing::warn!("io_uring is unavailable ({e}); using pread/pwrite")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(AnyDevice::File(FileDevice::open(path)?))
    }
}

impl BlockDevice for AnyDevice {
    fn capacity(&self) -> u64 {
        match self {
            AnyDevice::Uring(d) => d.capacity(),
            AnyDevice::File(d) => d.capacity(),
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
    async fn flush(&self) -> Result<(), DeviceError> {
        match self {
            AnyDevice::Uring(d) => d.flush().await,
            AnyDevice::File(d) => d.flush().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpfile(name: &str, size: u64) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("mb-dev-{name}-{}", std::process::id()));
        let f = std::fs::File::create(&p).expect("create");
        f.set_len(size).expect("size");
        p
    }

    /// The conformance suite every device passes.
    async fn conformance<D: BlockDevice>(d: &D) {
        assert!(d.capacity() >= 1 << 20);
        let mut b = AlignedBuf::zeroed(8192);
        b.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (i % 251) as u8);
        d.write(4096, b).await.expect("write");
        d.flush().await.expect("flush");
        let r = d.read(4096, AlignedBuf::zeroed(8192)).await.expect("read");
        assert!(r
            .as_slice()
            .iter()
            .enumerate()
            .all(|(i, x)| *x == (i % 251) as u8));
        assert!(matches!(
            d.read(100, AlignedBuf::zeroed(4096)).await,
            Err(DeviceError::Unaligned { .. })
        ));
        assert!(matches!(
            d.read(d.capacity(), AlignedBuf::zeroed(4096)).await,
            Err(DeviceError::OutOfRange { .. })
        ));
        // Many at once.
        let mut futs = Vec::new();
        for i in 0..64u64 {
            let mut b = AlignedBuf::zeroed(4096);
            b.as_mut_slice().fill(i as u8);
            futs.push(d.write(i * 4096, b));
        }
        for f in futs {
            f.await.expect("parallel write");
        }
        for i in 0..64u64 {
            let r = d
                .read(i * 4096, AlignedBuf::zeroed(4096))
                .await
                .expect("read");
            assert!(r.as_slice().iter().all(|x| *x == i as u8));
        }
    }

    #[tokio::test]
    async fn uring_conforms() {
        let p = tmpfile("uring", 4 << 20);
        conformance(&UringDevice::open(&p).expect("open")).await;
        let _ = std::fs::remove_file(p);
    }

    #[tokio::test]
    async fn file_conforms() {
        let p = tmpfile("file", 4 << 20);
        conformance(&FileDevice::open(&p).expect("open")).await;
        let _ = std::fs::remove_file(p);
    }

    #[tokio::test]
    async fn faulty_conforms_and_injects() {
        let p = tmpfile("faulty", 4 << 20);
        let d = FaultyDevice::new(FileDevice::open(&p).expect("open"));
        conformance(&d).await;
        d.fail_range(0, 4096);
        assert!(matches!(
            d.read(0, AlignedBuf::zeroed(4096)).await,
            Err(DeviceError::Io(_))
        ));
        assert!(d.read(8192, AlignedBuf::zeroed(4096)).await.is_ok());
        let _ = std::fs::remove_file(p);
    }
}
