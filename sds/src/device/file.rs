//! `FileDevice`: pread/pwrite (O_DIRECT when the file system allows) on tokio's blocking
//! threads. The fallback for hosts where io_uring is unavailable; same contract as the ring.

use super::{check_range, discard_sync, open_file, AlignedBuf, BlockDevice, BufferPool};
use super::{DeviceError, DeviceOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

pub struct FileDevice {
    file: Arc<std::fs::File>,
    capacity: u64,
    is_block: bool,
    pool: BufferPool,
}

impl FileDevice {
    pub fn open(path: &Path, opts: &DeviceOptions) -> Result<FileDevice, DeviceError> {
        let f = open_file(path, opts)?;
        Ok(FileDevice {
            file: Arc::new(f.file),
            capacity: f.capacity,
            is_block: f.is_block,
            pool: BufferPool::new(&opts.pool),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&std::fs::File) -> Result<T, DeviceError> + Send + 'static,
    ) -> Result<T, DeviceError> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || op(&f))
            .await
            .map_err(|_| DeviceError::Stopped)?
    }
}

impl BlockDevice for FileDevice {
    fn unlock(&self) {
        super::unlock_file(&self.file);
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn buffers(&self) -> &BufferPool {
        &self.pool
    }

    async fn read(&self, offset: u64, mut buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        check_range(offset, buf.len() as u64, self.capacity)?;
        self.blocking(move |f| {
            f.read_exact_at(buf.as_mut_slice(), offset)
                .map_err(DeviceError::Io)?;
            Ok(buf)
        })
        .await
    }

    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        check_range(offset, buf.len() as u64, self.capacity)?;
        self.blocking(move |f| {
            f.write_all_at(buf.as_slice(), offset)
                .map_err(DeviceError::Io)?;
            Ok(buf)
        })
        .await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.blocking(|f| {
            // SAFETY: fdatasync on a descriptor we own.
            if unsafe { libc::fdatasync(f.as_raw_fd()) } == 0 {
                Ok(())
            } else {
                Err(DeviceError::Io(std::io::Error::last_os_error()))
            }
        })
        .await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        check_range(offset, len, self.capacity)?;
        let is_block = self.is_block;
        self.blocking(move |f| discard_sync(f, is_block, offset, len))
            .await
    }
}
