//! The seam between the NBD server and whatever stores the bytes: the [`Backend`] trait an
//! export implements, the errors it may return ([`BackendError`], one per NBD error number) and
//! the allocation [`Extent`]s it reports for the `base:allocation` metadata context.
//!
//! This module owns no I/O and knows nothing of the wire format; it never names an
//! implementation (the volume backend lives in `crate::export`, test backends in tests).

use bytes::Bytes;
use std::future::Future;

/// Why a backend operation failed. Each case is one NBD error number (see
/// [`BackendError::wire_code`]), so the server can answer the client precisely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum BackendError {
    /// `EPERM`: the operation is not allowed (a write to a read-only export).
    #[error("operation not permitted (EPERM)")]
    Perm,
    /// `EIO`: the data could not be read or written.
    #[error("input/output error (EIO)")]
    Io,
    /// `EINVAL`: the request is malformed or out of range.
    #[error("invalid argument (EINVAL)")]
    Inval,
    /// `ENOSPC`: no space to write (also for `EDQUOT` and `EFBIG`).
    #[error("no space left on device (ENOSPC)")]
    NoSpc,
    /// `ENOTSUP`: only for a `FAST_ZERO` write-zeroes that would not be fast.
    #[error("operation not supported (ENOTSUP)")]
    NotSup,
    /// `ESHUTDOWN`: the export is going away; the client should disconnect.
    #[error("export is shutting down (ESHUTDOWN)")]
    Shutdown,
}

/// The name this type had before it grew its `Error` implementation; kept for callers.
pub type NbdErrno = BackendError;

impl BackendError {
    /// The NBD error number sent to the client: the one place errors become wire codes.
    pub const fn wire_code(self) -> u32 {
        match self {
            BackendError::Perm => 1,
            BackendError::Io => 5,
            BackendError::Inval => 22,
            BackendError::NoSpc => 28,
            BackendError::NotSup => 95,
            BackendError::Shutdown => 108,
        }
    }

    /// Classifies an OS error the way the NBD specification asks (`EDQUOT`/`EFBIG` are
    /// `ENOSPC`); anything unrecognised is `EIO`.
    pub fn from_io(e: &std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => BackendError::Perm,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => BackendError::NoSpc,
            Some(libc::EINVAL) => BackendError::Inval,
            Some(libc::EOPNOTSUPP) => BackendError::NotSup,
            Some(libc::ESHUTDOWN) => BackendError::Shutdown,
            _ => BackendError::Io,
        }
    }
}

impl From<std::io::Error> for BackendError {
    fn from(e: std::io::Error) -> Self {
        BackendError::from_io(&e)
    }
}

/// A run of bytes with one allocation state, as reported for `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes; zero-length extents are ignored.
    pub len: u64,
    /// Not allocated in the backing store (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Known to read as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// Allocated data of unknown content.
    pub const fn data(len: u64) -> Self {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    /// Unallocated, reads as zeroes.
    pub const fn hole(len: u64) -> Self {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }

    /// Allocated, reads as zeroes.
    pub const fn zero(len: u64) -> Self {
        Extent {
            len,
            hole: false,
            zero: true,
        }
    }
}

/// What an export offers the NBD server.
///
/// The server validates every request before calling in: offsets and lengths are within
/// [`Backend::size`], READ and WRITE lengths are at most [`MAX_PAYLOAD`](super::MAX_PAYLOAD),
/// writes never reach a [`read_only`](Backend::read_only) backend, and zero-length
/// READ/WRITE/TRIM/WRITE_ZEROES are answered without calling in. Calls for one connection run
/// concurrently (up to [`INFLIGHT_PER_CONN`](super::INFLIGHT_PER_CONN)), so implementations
/// must be safe under concurrent and overlapping requests. Futures may be dropped only when
/// the whole runtime shuts down.
///
/// Only [`size`](Backend::size), the data methods and [`can_multi_conn`](Backend::can_multi_conn)
/// are required; everything else has a conservative default.
pub trait Backend: Send + Sync + 'static {
    /// Size of the export in bytes.
    fn size(&self) -> u64;

    /// Reads exactly `len` bytes at `offset`; a reply of any other length becomes `EIO`.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, BackendError>> + Send;

    /// Writes `data` at `offset`; with `fua`, returns only once the data is durable.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Makes every write that has already completed durable.
    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Discards `[offset, offset + len)` (a hint: contents are undefined afterwards).
    fn trim(&self, offset: u64, len: u64) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Zeroes `[offset, offset + len)`; with `may_trim` the range may become a hole.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Allocation of `[offset, offset + len)`: consecutive extents starting at `offset`.
    /// They may cover only a prefix of the range (the client asks again for the rest); the
    /// server clips anything past `len`.
    ///
    /// The default derives extents from [`allocation`](Backend::allocation): allocated runs are
    /// data, the others holes that read as zeroes.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, BackendError>> + Send {
        async move {
            let runs = self.allocation(offset, len).await?;
            Ok(runs
                .into_iter()
                .map(|(len, allocated)| {
                    if allocated {
                        Extent::data(len)
                    } else {
                        Extent::hole(len)
                    }
                })
                .collect())
        }
    }

    /// `(length, allocated)` runs covering a prefix of `[offset, offset + len)`; a simpler
    /// alternative to overriding [`block_status`](Backend::block_status). The default reports
    /// everything as allocated, which is always a correct answer.
    fn allocation(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Vec<(u64, bool)>, BackendError>> + Send {
        let _ = offset;
        std::future::ready(Ok(vec![(len, true)]))
    }

    /// A hint that `[offset, offset + len)` will be read soon. The default does nothing.
    fn cache(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let _ = (offset, len);
        std::future::ready(Ok(()))
    }

    /// Whether zeroing `[offset, offset + len)` is faster than writing zeroes, so a
    /// `FAST_ZERO` request may proceed; when false such requests fail at once with `ENOTSUP`.
    fn fast_zero(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }

    /// The export refuses writes (advertised as `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool {
        false
    }

    /// FLUSH and FUA on one connection cover writes completed on every connection, so clients
    /// may spread I/O over several connections (`NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool;

    /// A description for humans (`NBD_INFO_DESCRIPTION`); empty means none.
    fn description(&self) -> String {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_map_to_nbd_errors() {
        let os = |n| std::io::Error::from_raw_os_error(n);
        assert_eq!(BackendError::from(os(libc::EDQUOT)), BackendError::NoSpc);
        assert_eq!(BackendError::from(os(libc::EROFS)), BackendError::Perm);
        assert_eq!(BackendError::from(os(libc::EBADF)), BackendError::Io);
        let other = std::io::Error::other("no errno");
        assert_eq!(BackendError::from_io(&other), BackendError::Io);
    }

    #[test]
    fn wire_codes_match_the_specification() {
        let codes: Vec<u32> = [
            BackendError::Perm,
            BackendError::Io,
            BackendError::Inval,
            BackendError::NoSpc,
            BackendError::NotSup,
            BackendError::Shutdown,
        ]
        .iter()
        .map(|e| e.wire_code())
        .collect();
        assert_eq!(codes, [1, 5, 22, 28, 95, 108]);
    }
}
