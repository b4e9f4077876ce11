//! Mount and Unmount: map the volume to this SDC (taking it over from a silent host when
//! allowed), attach it, make a filesystem only on a blank device, mount it, and count each
//! mount ID on disk; Unmount releases only what Mount acquired. Also the online growth of
//! mounted filesystems and the clean-up of mounts a takeover left dead.

use super::*;

impl Driver {
    pub async fn mount(&self, name: &str, id: &str) -> Result<PathBuf, DriverError> {
        let cname = Self::check_name(name)?;
        let _g = self.lock_of(&cname);
        let _g = _g.lock().await;
        let mp = self.mountpoint(&cname);
        {
            let mut refs = self.refs.lock().await;
            if let Some(v) = refs.volumes.get(&cname).cloned() {
                if system::mount_at(&mp).is_some() {
                    // The map the SDC holds is enough: a host that cannot hear the MDM is
                    // fenced by the SDS either way; one that hears it must not hand a stale
                    // mount to a new container.
                    let core = self.core.borrow().clone();
                    if let Some(now) = core.and_then(|c| self.taken_over(&c, &cname)) {
                        return Err(DriverError::InUse(format!(
                            "volume {name} is {now} while this host was away: its mount here is \
                             stale and every write to it is refused; it is released when the \
                             containers using it here stop (or when the plugin restarts)"
                        )));
                    }
                    let n = refs.add(&cname, id, mp.clone(), v.device);
                    self.save_refs(&refs).await?;
                    tracing::info!(volume = %name, id, refs = n, "mounted again");
                    return Ok(mp);
                }
            }
        }
        let core = self.core().await?;
        let map = self.cluster.fresh_map().await;
        let Some(v) = find(&map, name)?.cloned() else {
            return Err(DriverError::NotFound(format!(
                "volume {name} does not exist"
            )));
        };
        {
            let refs = self.refs.lock().await;
            guard::mounting(&self.facts(&core, &map, &v, &refs).await)?;
        }
        if let Err(e) = self.map_here(&core, &v).await {
            // A mapping this Mount made before failing is Docker's to release.
            if let Err(e2) = self.release(&core, &cname).await {
                tracing::warn!(volume = %name, "failed to release after a failed mount: {e2}");
            }
            return Err(e);
        }
        match self.attach_and_mount(&core, &v, &mp).await {
            Ok(device) => {
                let mut refs = self.refs.lock().await;
                let n = refs.add(&cname, id, mp.clone(), device.clone());
                self.save_refs(&refs).await?;
                tracing::info!(volume = %name, id, refs = n, device = %device.display(), "mounted");
                Ok(mp)
            }
            Err(e) => {
                if let Err(e2) = self.release(&core, &cname).await {
                    tracing::warn!(volume = %name, "failed to release after a failed mount: {e2}");
                }
                Err(e)
            }
        }
    }

    /// Maps the volume to this SDC (taking it over from a dead host, or a preemptible
    /// volume from any host) and waits until the SDC's map shows it. A mapping the MDM made
    /// for this call is recorded as Docker's; one that existed already (scli) is not.
    async fn map_here(&self, core: &Core, v: &Volume) -> Result<(), DriverError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.cfg.takeover_wait_ms);
        loop {
            let cmd = Command::MapVolumeToSdc {
                volume: v.name.clone(),
                sdc: SdcSelector::Guid(core.guid.clone()),
                allow_multi_map: false,
                takeover: true,
            };
            match self.cluster.command(cmd).await {
                Ok(_) => {
                    self.hold(v, |h| h.mapped = true).await?;
                    break;
                }
                Err(e) if e.code == ErrorCode::AlreadyExists => break,
                Err(e)
                    if matches!(e.code, ErrorCode::Busy | ErrorCode::Conflict)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::info!(volume = %v.name, "waiting to take the volume over: {}", e.message);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) if matches!(e.code, ErrorCode::Busy | ErrorCode::Conflict) => {
                    return Err(DriverError::InUse(format!(
                        "volume {} is in use on another host ({}); it is taken over only when \
                         that host's SDC is dead or the volume was created with preempt=true",
                        v.name, e.message
                    )))
                }
                Err(e) => return Err(cluster_err(&format!("cannot map volume {}", v.name), e)),
            }
        }
        let l = labels(v);
        let iops = l.get(options::LABEL_IOPS).and_then(|s| s.parse().ok());
        let bw = l.get(options::LABEL_BANDWIDTH).and_then(|s| s.parse().ok());
        if iops.is_some() || bw.is_some() {
            let cmd = Command::SetSdcVolumeLimits {
                volume: v.name.clone(),
                sdc: SdcSelector::Guid(core.guid.clone()),
                iops_limit: iops,
                bandwidth_limit_kbps: bw,
            };
            if let Err(e) = self.cluster.command(cmd).await {
                tracing::warn!(volume = %v.name, "failed to set the volume's limits: {e}");
            }
        }
        let until = tokio::time::Instant::now() + MAPPING_WAIT;
        loop {
            let map = self.cluster.fresh_map().await;
            if map
                .mappings_of(v.id)
                .any(|m| Some(m.sdc) == core.attacher.me())
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > until {
                return Err(DriverError::Cluster(format!(
                    "volume {} was mapped but this SDC's map does not show it yet; retry",
                    v.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Grows the filesystem of each Docker volume whose device just grew (an online resize
    /// with `scli --modify_volume_capacity`): containers see the new size without a restart.
    pub async fn grow_filesystems(&self, grown: &[(String, PathBuf, u64)]) {
        for (cname, device, size) in grown {
            let mp = self.mountpoint(cname);
            let Some(m) = system::mount_at(&mp) else {
                continue;
            };
            if Path::new(&m.source) != device.as_path() {
                continue;
            }
            match fs::grow(device, &mp, &m.fstype).await {
                Ok(()) => {
                    tracing::info!(volume = %cname, size, fstype = %m.fstype, "filesystem grown online")
                }
                Err(e) => tracing::warn!(volume = %cname, "growing the filesystem failed: {e}"),
            }
        }
    }

    /// How volume `cname` (a cluster name) left this host, if it did, as the SDC's map shows:
    /// "taken over by HOST" (another host's Mount, the MDM having fenced this one) or "unmapped
    /// from this host". `None` while it is mapped here (or gone from the map: nothing to fence).
    pub(super) fn taken_over(&self, core: &Core, cname: &str) -> Option<String> {
        let map = self.cluster.map();
        let v = map.volume_by_name(cname)?;
        if map
            .mappings_of(v.id)
            .any(|m| Some(m.sdc) == core.attacher.me())
        {
            return None;
        }
        let hosts: Vec<String> = map
            .mappings_of(v.id)
            .map(|m| {
                map.sdcs
                    .get(&m.sdc)
                    .map_or(m.sdc.to_string(), |s| s.name.clone())
            })
            .collect();
        Some(match hosts.is_empty() {
            true => "unmapped from this host".to_string(),
            false => format!("taken over by {}", hosts.join(", ")),
        })
    }

    /// Unmounts the stale mount of volume `cname` (taken over while this host was away; its
    /// filesystem can write nothing) and frees its device, so nothing of it is left behind:
    /// lazily, since containers that died with the host may still pin it, and the loop device
    /// under it is detached once the filesystem lets go of it.
    pub(super) async fn drop_stale_mount(&self, cname: &str) {
        let mp = self.mountpoint(cname);
        let Some(m) = system::mount_at(&mp) else {
            return;
        };
        if let Err(e) = system::unmount(&mp, true) {
            tracing::warn!(volume = %cname, "failed to unmount the stale mount: {e}");
            return;
        }
        // Off the runtime thread (see `unmount`).
        let _ = tokio::fs::remove_dir(&mp).await;
        self.free_dead_device(cname, &m.source).await;
    }

    /// Detaches `source`, the loop device a filesystem of volume `cname` was mounted from,
    /// unless the attach layer serves it: one left from an SDC that died with its FUSE keeper
    /// (a managed plugin's keeper dies with it), whose backing connection is gone and which
    /// nothing else would ever free.
    async fn free_dead_device(&self, cname: &str, source: &str) {
        if !source.starts_with("/dev/loop") {
            return;
        }
        let dev = PathBuf::from(source);
        if let Ok(core) = self.core().await {
            if core.attacher.device(cname).await.as_ref() == Some(&dev) {
                return;
            }
        }
        if !system::loop_devices().iter().any(|l| l.device == dev) {
            return;
        }
        match system::loop_detach(&dev) {
            Ok(()) => {
                tracing::info!(volume = %cname, device = %source, "freed the device left by a dead SDC")
            }
            Err(e) => {
                tracing::warn!(volume = %cname, device = %source, "failed to free the device left by a dead SDC: {e}")
            }
        }
    }

    /// Records something Docker's Mount acquired.
    async fn hold(&self, v: &Volume, f: impl FnOnce(&mut Held)) -> Result<(), DriverError> {
        let mut refs = self.refs.lock().await;
        let mut h = refs.held(&v.name, v.id);
        f(&mut h);
        refs.set_held(&v.name, v.id, h);
        self.save_refs(&refs).await
    }

    async fn attach_and_mount(
        &self,
        core: &Core,
        v: &Volume,
        mp: &std::path::Path,
    ) -> Result<PathBuf, DriverError> {
        // `mounting` refused a device attached outside Docker; one here now is Docker's own.
        let device = core
            .attacher
            .attach(&v.name)
            .await
            .map_err(|e| DriverError::Host(format!("cannot attach volume {}: {e}", v.name)))?;
        self.hold(v, |h| h.attached = true).await?;
        let fstype = labels(v)
            .get(options::LABEL_FSTYPE)
            .cloned()
            .unwrap_or_else(|| self.cfg.default_fstype.clone());
        let host = |e: String| DriverError::Host(format!("volume {}: {e}", v.name));
        match fs::probe(&device).await.map_err(host)? {
            Some(found) if found != fstype => {
                tracing::info!(volume = %v.name, "keeps its {found} filesystem (label says {fstype})");
                fs::mount(&device, mp, &found).await.map_err(host)?;
            }
            Some(_) => fs::mount(&device, mp, &fstype).await.map_err(host)?,
            None => {
                tracing::info!(volume = %v.name, "no filesystem found: making {fstype}");
                fs::mkfs(&device, &fstype).await.map_err(host)?;
                fs::mount(&device, mp, &fstype).await.map_err(host)?;
            }
        }
        Ok(device)
    }

    pub async fn unmount(&self, name: &str, id: &str) -> Result<(), DriverError> {
        let cname = names::cluster_name(name);
        let _g = self.lock_of(&cname);
        let _g = _g.lock().await;
        let mut refs = self.refs.lock().await;
        let Some(left) = refs.remove(&cname, id) else {
            return Ok(());
        };
        if left > 0 {
            self.save_refs(&refs).await?;
            tracing::info!(volume = %name, id, refs = left, "unmounted by one container, still in use");
            return Ok(());
        }
        let mp = self.mountpoint(&cname);
        let mounted = system::mount_at(&mp);
        if mounted.is_some() {
            if let Err(e) = fs::unmount(&mp).await {
                self.save_refs(&refs).await?;
                return Err(DriverError::Host(format!(
                    "cannot unmount volume {name}: {e}; something on this host still uses {}",
                    mp.display()
                )));
            }
        }
        if let Some(m) = mounted {
            self.free_dead_device(&cname, &m.source).await;
        }
        // Off the runtime thread: removing a mount point detaches copies of the mount that
        // propagated into other namespaces (Docker's), and the last one's shutdown flushes the
        // filesystem through this SDC's own FUSE server, which the runtime thread serves.
        let _ = tokio::fs::remove_dir(&mp).await;
        refs.volumes.remove(&cname);
        self.save_refs(&refs).await?;
        drop(refs);
        let core = self.core().await?;
        self.release(&core, &cname).await?;
        tracing::info!(volume = %name, id, "unmounted and released");
        Ok(())
    }

    /// Where Docker volume `name` is mounted on this host, if it is.
    pub async fn path(&self, name: &str) -> Option<PathBuf> {
        let refs = self.refs.lock().await;
        let v = refs.volumes.get(&names::cluster_name(name))?;
        system::mount_at(&v.mountpoint).map(|_| v.mountpoint.clone())
    }
}
