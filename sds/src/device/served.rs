//! The device type the daemon serves: [`ServedDevice`]. In normal builds it is [`AnyDevice`]
//! itself. In builds with the `failpoints` feature (fault tests only) every device goes through
//! a [`TestDevice`], so tests of the real binary can reach the [`FaultyDevice`] seam:
//!
//! - `--test-volatile-cache`: writes stay in a cache held in the process's memory until the next
//!   device flush, so a SIGKILL loses them as a power cut loses a disk's write cache (the page
//!   cache of a device file survives a kill, which hides a missing flush);
//! - the fail point `sds::device::eio` armed with `return(SUFFIX)`: every read, write and flush
//!   of the devices whose path ends with SUFFIX fails with EIO (a disk that died).
//!
//! A normal build refuses both: they exist only for tests.

use super::AnyDevice;
#[cfg(feature = "failpoints")]
use super::{AlignedBuf, BlockDevice, BufferPool, DeviceError};

/// The fail point that fails a device's I/O (see the module docs).
pub const DEVICE_EIO: &str = "sds::device::eio";

#[cfg(not(feature = "failpoints"))]
pub type ServedDevice = AnyDevice;

#[cfg(feature = "failpoints")]
pub type ServedDevice = TestDevice;

/// Wrap an opened device for serving. `volatile_cache` is refused without the `failpoints`
/// feature.
#[cfg(not(feature = "failpoints"))]
pub fn serve(dev: AnyDevice, _path: &str, volatile_cache: bool) -> Result<ServedDevice, String> {
    if volatile_cache {
        return Err(
            "the volatile device cache is a fault-test option: this sds was built without the \
             `failpoints` feature"
                .into(),
        );
    }
    Ok(dev)
}

/// Wrap an opened device for serving (fault-test build: through a [`TestDevice`]).
#[cfg(feature = "failpoints")]
pub fn serve(dev: AnyDevice, path: &str, volatile_cache: bool) -> Result<ServedDevice, String> {
    let inner = super::FaultyDevice::new(dev, 0);
    inner.set_volatile_cache(volatile_cache);
    Ok(TestDevice {
        path: path.to_owned(),
        inner,
    })
}

/// A served device in the fault-test build (see the module docs).
#[cfg(feature = "failpoints")]
pub struct TestDevice {
    path: String,
    inner: super::FaultyDevice<AnyDevice>,
}

#[cfg(feature = "failpoints")]
impl TestDevice {
    pub fn engine(&self) -> &'static str {
        self.inner.inner().engine()
    }

    fn check(&self) -> Result<(), DeviceError> {
        let hit = fail::eval(DEVICE_EIO, |arg| {
            arg.is_some_and(|suffix| self.path.ends_with(suffix.trim()))
        });
        if hit == Some(true) {
            return Err(DeviceError::eio());
        }
        Ok(())
    }
}

#[cfg(feature = "failpoints")]
impl BlockDevice for TestDevice {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    fn buffers(&self) -> &BufferPool {
        self.inner.buffers()
    }

    async fn read(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        self.check()?;
        self.inner.read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf, DeviceError> {
        self.check()?;
        self.inner.write(offset, buf).await
    }

    async fn flush(&self) -> Result<(), DeviceError> {
        self.check()?;
        self.inner.flush().await
    }

    fn unlock(&self) {
        self.inner.inner().unlock();
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check()?;
        self.inner.discard(offset, len).await
    }
}
