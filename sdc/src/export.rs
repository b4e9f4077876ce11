//! Serving mapped volumes over NBD: the `Backend` for a volume's I/O path, and the listeners
//! (unix socket, optional TCP) with the export registry the daemon keeps in step with the map.

use crate::config::SdcConfig;
use crate::daemon::Exports;
use crate::io_path::{IoError, VolumeIo};
use crate::nbd::{self, Backend, NbdErrno, Registry};
use bytes::Bytes;
use std::sync::Arc;

fn errno(e: IoError) -> NbdErrno {
    tracing::debug!("I/O failed: {e}");
    match e {
        IoError::Invalid(_) => NbdErrno::Inval,
        IoError::NoSpace(_) => NbdErrno::NoSpc,
        IoError::VolumeGone => NbdErrno::Shutdown,
        IoError::Unavailable(_) | IoError::Storage(_) | IoError::Fenced(_) => NbdErrno::Io,
    }
}

impl Backend for VolumeIo {
    fn size(&self) -> u64 {
        VolumeIo::size(self)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, NbdErrno> {
        VolumeIo::read(self, offset, len).await.map_err(errno)
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), NbdErrno> {
        VolumeIo::write(self, offset, data, fua)
            .await
            .map_err(errno)
    }
    async fn flush(&self) -> Result<(), NbdErrno> {
        VolumeIo::flush(self).await.map_err(errno)
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), NbdErrno> {
        VolumeIo::trim(self, offset, len).await.map_err(errno)
    }
    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), NbdErrno> {
        VolumeIo::write_zeroes(self, offset, len, may_trim)
            .await
            .map_err(errno)
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>, NbdErrno> {
        VolumeIo::allocation(self, offset, len).await.map_err(errno)
    }
    fn fast_zero(&self, offset: u64, len: u64) -> bool {
        // Only whole chunks are zeroed without moving data (they are freed).
        let c = proto::CHUNK_SIZE;
        offset.is_multiple_of(c) && len.is_multiple_of(c)
    }
    fn can_multi_conn(&self) -> bool {
        // Flush tracking is per volume, shared by all connections (see io_path).
        true
    }
    fn description(&self) -> String {
        format!("Meshblock volume {}", self.volume)
    }
}

/// The registry plus its listeners.
pub struct NbdExports {
    registry: Arc<Registry<VolumeIo>>,
}

impl NbdExports {
    pub async fn start(cfg: &SdcConfig) -> std::io::Result<Arc<NbdExports>> {
        let registry: Arc<Registry<VolumeIo>> = Arc::new(Registry::default());
        if let Some(dir) = cfg.nbd_socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&cfg.nbd_socket);
        let unix = tokio::net::UnixListener::bind(&cfg.nbd_socket)?;
        let reg = registry.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = unix.accept().await {
                let reg = reg.clone();
                tokio::spawn(async move {
                    if let Err(e) = nbd::serve_conn(sock, reg).await {
                        tracing::debug!("NBD client: {e}");
                    }
                });
            }
        });
        if let Some(addr) = cfg.nbd_tcp {
            let tcp = tokio::net::TcpListener::bind(addr).await?;
            let reg = registry.clone();
            tokio::spawn(async move {
                while let Ok((sock, _)) = tcp.accept().await {
                    let _ = sock.set_nodelay(true);
                    let reg = reg.clone();
                    tokio::spawn(async move {
                        if let Err(e) = nbd::serve_conn(sock, reg).await {
                            tracing::debug!("NBD client: {e}");
                        }
                    });
                }
            });
        }
        Ok(Arc::new(NbdExports { registry }))
    }
}

impl Exports for NbdExports {
    fn add(&self, name: &str, vol: Arc<VolumeIo>) {
        self.registry.add(name, vol);
    }
    fn remove(&self, name: &str) {
        self.registry.remove(name);
    }
    fn connections(&self, name: &str) -> usize {
        self.registry.connections(name)
    }
}
