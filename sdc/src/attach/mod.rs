//! Attaching mapped volumes as local block devices: each attached volume is a file in a FUSE
//! directory served by this SDC (`<state_dir>/fuse/<volume>`, I/O through the volume's
//! [`VolumeIo`]), with a loop device over it (`/dev/loopN`). The kernel here has no NBD
//! module; where it has one, `nbd-client` against the NBD socket gives `/dev/nbdN` instead.
//!
//! Owns the attachment table (persisted in `<state_dir>/attached.json`), the FUSE mount and its
//! [`keeper`]. It does not map volumes (the caller does, through the MDM) and never mounts a
//! filesystem on a device (the Docker driver does).
//!
//! **Restarts**: the FUSE connection is held by the keeper process, so a restarted SDC takes the
//! same connection over, re-registers the attached volumes' files under the same inodes and has
//! the kernel resend unanswered requests: loop devices, and filesystems mounted on them, carry
//! on. On SIGTERM, attachments whose device is not mounted are detached; if none is left the FUSE
//! directory is unmounted and the keeper exits, otherwise both stay for the next SDC. If the
//! keeper died too (host reboot, or it was killed), the old connection is gone: unmounted
//! stale loop devices are cleaned up and re-attached, mounted ones are reported (their I/O
//! fails until they are unmounted).

pub mod fuse;
pub mod keeper;
pub mod system;

use crate::io_path::{IoPath, VolumeIo};
use fuse::FuseFs;
use proto::{SdcId, VolumeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use system::SystemError;

/// One attached volume, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub volume: VolumeId,
    pub device: PathBuf,
}

/// Why an attach or detach was refused or failed. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("volume {0} does not exist")]
    NoSuchVolume(String),
    #[error("volume {0} is not mapped to this SDC; map it first (scli --map_volume_to_sdc)")]
    NotMapped(String),
    #[error("volume {0} is not attached on this host")]
    NotAttached(String),
    #[error("volume {volume} is mounted at {mounts}; unmount it first, or detach with --force")]
    InUse { volume: String, mounts: String },
    #[error("volume name {0:?} cannot be a file name")]
    BadName(String),
    #[error(transparent)]
    System(#[from] SystemError),
    #[error(transparent)]
    State(#[from] crate::persist::PersistError),
}

/// The attach layer of one SDC.
pub struct Attacher {
    fs: Arc<FuseFs<VolumeIo>>,
    dir: PathBuf,
    keeper_socket: PathBuf,
    state_file: PathBuf,
    io: Arc<IoPath>,
    sdc_exe: PathBuf,
    /// The FUSE directory is mounted and served by this process.
    serving: std::sync::atomic::AtomicBool,
    attached: tokio::sync::Mutex<BTreeMap<String, Attached>>,
    /// The table's size, readable without its lock (metrics).
    count: std::sync::atomic::AtomicUsize,
}

/// Paths of the attach layer under a state directory.
pub fn fuse_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("fuse")
}

pub fn keeper_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("fuse-keeper.sock")
}

fn is_fuse_mount(dir: &Path) -> bool {
    system::mount_at(dir).is_some_and(|m| m.fstype == "fuse.meshblock")
}

impl Attacher {
    /// This SDC's id (it changes if the SDC registers again after being removed).
    pub fn me(&self) -> Option<SdcId> {
        self.io.me()
    }

    /// Takes the live FUSE connection over from the keeper if there is one, then restores the
    /// attachments of the previous run. The FUSE directory is mounted only when something is
    /// attached: an SDC that attaches nothing mounts nothing. `io` must already hold a map.
    pub async fn start(
        state_dir: &Path,
        io: Arc<IoPath>,
        sdc_exe: &Path,
    ) -> anyhow::Result<Arc<Attacher>> {
        let dir = fuse_dir(state_dir);
        let sock = keeper_socket(state_dir);
        let state_file = state_dir.join("attached.json");
        let saved: BTreeMap<String, Attached> = crate::persist::load(&state_file)?;
        let a = Arc::new(Attacher {
            fs: Arc::new(FuseFs::default()),
            dir,
            keeper_socket: sock,
            state_file,
            io,
            sdc_exe: sdc_exe.to_path_buf(),
            serving: std::sync::atomic::AtomicBool::new(false),
            attached: tokio::sync::Mutex::new(BTreeMap::new()),
            count: Default::default(),
        });
        // Files first, so requests resent by the kernel find them.
        for (name, att) in &saved {
            a.fs.add(
                att.volume.0,
                name,
                Arc::new(VolumeIo::new(a.io.clone(), att.volume)),
            );
        }
        let taken = if is_fuse_mount(&a.dir) {
            keeper::fetch(&a.keeper_socket)
        } else {
            None
        };
        let resume = taken.is_some();
        match taken {
            Some(fd) => {
                tracing::info!(
                    "took the live FUSE connection over from the keeper: attached devices carry on"
                );
                a.serve(fd, true)?;
            }
            None if !saved.is_empty() || system::mount_at(&a.dir).is_some() => a.mount_fresh()?,
            None => {}
        }
        a.restore(saved, resume).await?;
        Ok(a)
    }

    /// Mounts the FUSE directory afresh (cleaning up a dead one) and starts its keeper and
    /// server.
    fn mount_fresh(&self) -> Result<(), AttachError> {
        keeper::stop(&self.keeper_socket);
        if system::mount_at(&self.dir).is_some() {
            tracing::warn!(
                "the FUSE directory {} is left from an SDC whose keeper is gone; unmounting it",
                self.dir.display()
            );
            let _ = system::unmount(&self.dir, true);
        }
        Self::clean_stale_loops(&self.dir);
        let fd = system::mount_fuse(&self.dir)?;
        if let Err(e) = keeper::spawn(
            &self.sdc_exe,
            &self.keeper_socket,
            std::os::fd::AsRawFd::as_raw_fd(&fd),
        ) {
            let _ = system::unmount(&self.dir, true);
            return Err(AttachError::System(SystemError::Os {
                what: "start the FUSE keeper".into(),
                source: e,
            }));
        }
        self.serve(fd, false)
    }

    fn serve(&self, fd: std::os::fd::OwnedFd, resume: bool) -> Result<(), AttachError> {
        let dev = Arc::new(File::from(fd));
        let fs = self.fs.clone();
        let rt = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("fuse".into())
            .spawn(move || match fs.serve(dev, rt, resume) {
                Ok(()) => tracing::info!("the FUSE directory was unmounted"),
                Err(e) => tracing::error!("the FUSE server stopped: {e}"),
            })
            .map_err(|e| {
                AttachError::System(SystemError::Os {
                    what: "start the FUSE thread".into(),
                    source: e,
                })
            })?;
        self.serving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Loop devices over files of a dead FUSE mount: detach those not mounted; report others.
    fn clean_stale_loops(dir: &Path) {
        for l in system::loop_devices() {
            if !l.backing.starts_with(dir) {
                continue;
            }
            let mounts = system::mounts_of_device(&l.device);
            if mounts.is_empty() {
                let _ = system::loop_detach(&l.device);
            } else {
                tracing::error!(
                    device = %l.device.display(),
                    "this loop device lost its backing connection (the SDC and its FUSE keeper \
                     both died) but is mounted at {mounts:?}; its I/O fails: stop what uses it, \
                     unmount it and `sdc detach --force` the volume"
                );
            }
        }
    }

    async fn restore(&self, saved: BTreeMap<String, Attached>, resume: bool) -> anyhow::Result<()> {
        let live = system::loop_devices();
        let mut table = self.attached.lock().await;
        for (name, att) in saved {
            let file = self.dir.join(&name);
            let still = live
                .iter()
                .any(|l| l.device == att.device && l.backing == file);
            if resume && still {
                table.insert(name, att);
                continue;
            }
            if still && !system::mounts_of_device(&att.device).is_empty() {
                // Dead backing, mounted: keep the record so it can be force-detached.
                table.insert(name, att);
                continue;
            }
            match off_runtime("losetup", move || system::loop_attach(&file)).await {
                Ok(device) => {
                    tracing::info!(volume = %name, device = %device.display(), "re-attached");
                    table.insert(
                        name,
                        Attached {
                            volume: att.volume,
                            device,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(volume = %name, "failed to re-attach: {e}");
                    self.fs.remove(att.volume.0);
                }
            }
        }
        self.persist(&table)?;
        Ok(())
    }

    fn persist(&self, table: &BTreeMap<String, Attached>) -> Result<(), AttachError> {
        self.count
            .store(table.len(), std::sync::atomic::Ordering::Relaxed);
        crate::persist::save(&self.state_file, table)?;
        Ok(())
    }

    /// Number of attached volumes.
    pub fn attached_count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Grows the device of every attached volume that grew in the map (an online resize):
    /// waits until the FUSE file shows the volume's size (its attributes are cached for a
    /// second), then has the loop device re-read it. Returns (volume, device, new size) of each
    /// device that grew. Shrinking never happens (the MDM refuses it).
    pub async fn grow_devices(&self) -> Vec<(String, PathBuf, u64)> {
        let table = self.attached.lock().await.clone();
        let map = self.io.map();
        let mut grown = Vec::new();
        for (name, a) in table {
            let Some(size) = map.volumes.get(&a.volume).map(|v| v.size_bytes) else {
                continue;
            };
            let dev = a.device.clone();
            if system::device_size(&dev).is_none_or(|now| now >= size) {
                continue;
            }
            let file = self.dir.join(&name);
            let r = off_runtime("losetup --set-capacity", move || {
                // The kernel refreshes the file's size once its cached attributes expire.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) < size
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                system::loop_set_capacity(&dev)
            })
            .await;
            match r {
                Ok(()) if system::device_size(&a.device) == Some(size) => {
                    tracing::info!(volume = %name, device = %a.device.display(), size, "device grown with its volume");
                    grown.push((name, a.device, size));
                }
                Ok(()) => {
                    tracing::warn!(volume = %name, "the device did not grow yet; trying again")
                }
                Err(e) => tracing::warn!(volume = %name, "growing the device failed: {e}"),
            }
        }
        grown
    }

    /// The device of an attached volume.
    pub async fn device(&self, name: &str) -> Option<PathBuf> {
        self.attached
            .lock()
            .await
            .get(name)
            .map(|a| a.device.clone())
    }

    /// Attaches `name` (mapped to this SDC) and returns its device; attaching an attached
    /// volume returns its device again.
    pub async fn attach(&self, name: &str) -> Result<PathBuf, AttachError> {
        if name.is_empty() || name == "." || name == ".." || name.contains('/') {
            return Err(AttachError::BadName(name.into()));
        }
        let mut table = self.attached.lock().await;
        if let Some(a) = table.get(name) {
            return Ok(a.device.clone());
        }
        let find = |map: &proto::model::ClusterState| {
            map.volume_by_name(name).map(|v| {
                let mapped = map
                    .mappings
                    .iter()
                    .any(|m| m.volume == v.id && Some(m.sdc) == self.me());
                (v.id, mapped)
            })
        };
        let mut found = find(&self.io.map());
        if found.is_none_or(|(_, mapped)| !mapped) {
            self.io.refresh_map().await;
            found = find(&self.io.map());
        }
        let volume = match found {
            None => return Err(AttachError::NoSuchVolume(name.into())),
            Some((_, false)) => return Err(AttachError::NotMapped(name.into())),
            Some((id, true)) => id,
        };
        if !self.serving.load(std::sync::atomic::Ordering::SeqCst) {
            self.mount_fresh()?;
        }
        self.fs.add(
            volume.0,
            name,
            Arc::new(VolumeIo::new(self.io.clone(), volume)),
        );
        let file = self.dir.join(name);
        let device = match off_runtime("losetup", move || system::loop_attach(&file)).await {
            Ok(d) => d,
            Err(e) => {
                self.fs.remove(volume.0);
                return Err(e.into());
            }
        };
        tracing::info!(volume = %name, device = %device.display(), "attached");
        table.insert(
            name.into(),
            Attached {
                volume,
                device: device.clone(),
            },
        );
        self.persist(&table)?;
        Ok(device)
    }

    /// Detaches `name`. Refused while its device is mounted, unless `force` (which lazily
    /// unmounts it first: whatever still uses it gets I/O errors).
    pub async fn detach(&self, name: &str, force: bool) -> Result<(), AttachError> {
        let mut table = self.attached.lock().await;
        let Some(a) = table.get(name).cloned() else {
            return Err(AttachError::NotAttached(name.into()));
        };
        let mounts = system::mounts_of_device(&a.device);
        if !mounts.is_empty() {
            if !force {
                return Err(AttachError::InUse {
                    volume: name.into(),
                    mounts: mounts
                        .iter()
                        .map(|m| m.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            for m in mounts {
                off_runtime("umount", move || system::unmount(&m, true)).await?;
            }
        }
        let file = self.dir.join(name);
        let still = system::loop_devices()
            .into_iter()
            .any(|l| l.device == a.device && l.backing == file);
        if still {
            let dev = a.device.clone();
            off_runtime("losetup", move || system::loop_detach(&dev)).await?;
        }
        self.fs.remove(a.volume.0);
        table.remove(name);
        self.persist(&table)?;
        tracing::info!(volume = %name, "detached");
        Ok(())
    }

    /// Attached volumes and their devices.
    pub async fn list(&self) -> Vec<(String, PathBuf)> {
        self.attached
            .lock()
            .await
            .iter()
            .map(|(n, a)| (n.clone(), a.device.clone()))
            .collect()
    }

    /// On SIGTERM: detach what is not mounted; unmount the FUSE directory and stop the keeper
    /// when nothing is left, else leave both for the next SDC (see the module docs).
    pub async fn shutdown(&self) {
        let names: Vec<String> = self.attached.lock().await.keys().cloned().collect();
        for name in names {
            if let Err(e) = self.detach(&name, false).await {
                tracing::info!(volume = %name, "left attached: {e}");
            }
        }
        let left = self.attached.lock().await.len();
        if !self.serving.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if left > 0 {
            tracing::info!(
                "{left} attached volume(s) still in use: the FUSE keeper keeps their devices \
                 alive until the next SDC takes over"
            );
            return;
        }
        let dir = self.dir.clone();
        if let Err(e) = off_runtime("umount", move || system::unmount(&dir, false)).await {
            tracing::warn!("failed to unmount the FUSE directory, detaching it lazily: {e}");
            let _ = system::unmount(&self.dir, true);
        }
        keeper::stop(&self.keeper_socket);
    }
}

/// Run a host call that may wait for this SDC's own FUSE server (attaching a loop device opens
/// the volume's file; detaching one, or unmounting, flushes through it) on a blocking thread.
/// The FUSE server's requests run on the runtime: on a one-thread runtime, the call would
/// otherwise block the very thread that must answer them.
async fn off_runtime<T: Send + 'static>(
    what: &str,
    call: impl FnOnce() -> Result<T, SystemError> + Send + 'static,
) -> Result<T, SystemError> {
    tokio::task::spawn_blocking(call).await.unwrap_or_else(|e| {
        Err(SystemError::Command {
            command: what.into(),
            stderr: e.to_string(),
        })
    })
}
