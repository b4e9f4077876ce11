//! The volume driver's behaviour behind each plugin call: Create (validated, idempotent; marks
//! the volume `created-by=docker` and records its Docker name, the cluster name derived from
//! it by [`proto::docker`]), Remove (only Docker's volumes, refused while anything uses them:
//! see [`super::guard`]; a volume already gone is removed), Mount/Unmount (map, attach, mkfs only on a blank device, mount;
//! counted per mount ID on disk; releases only what Mount acquired), Path, Get (any volume, so
//! a refusal can say why; never a transient failure for an existing volume: answered from the
//! map the SDC follows, or a disk cache before the first map), List (Docker's volumes only) and
//! the start-up reconciliation with `/proc/self/mountinfo`.
//!
//! Owns the reference table and the per-volume locks. Volumes of one name are handled one
//! call at a time; different volumes in parallel. Docker names are used toward Docker (Get,
//! List, messages about the name); everything on this host (locks, mount references, mount
//! points, devices, exports) is keyed by the cluster name, which is bounded and unique.
//!
//! Create lives in `create`, Mount and Unmount in `mount`; Remove, Get, List and the start-up
//! reconciliation here.

use super::api::VolumeInfo;
use super::cluster::Cluster;
use super::fs;
use super::guard::{self, Facts, Refusal};
use super::names;
use super::options::{self, CreateSpec};
use super::refs::{Held, Refs};
use crate::attach::{system, Attacher};
use crate::config::DockerConfig;
use proto::model::{ClusterState, Volume};
use proto::msg::{Command, SdcSelector};
use proto::{ErrorCode, WireError};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod create;
mod mount;

/// How long a call waits for the SDC to finish starting (registration, first map).
const READY_WAIT: Duration = Duration::from_secs(60);
/// How long Mount waits for the map to show a new mapping.
/// How long a call waits for an SDC whose registration keeps failing before it fails with the
/// registration's error (Docker commands must not hang on an unreachable MDM).
const FAILING_REGISTRATION: Duration = Duration::from_secs(5);
const MAPPING_WAIT: Duration = Duration::from_secs(15);

/// Why a plugin call failed; the message is what Docker shows the user.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The request itself is wrong (options, name).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// The volume is in use here or on another host.
    #[error("{0}")]
    InUse(String),
    /// The MDM refused or could not be reached.
    #[error("{0}")]
    Cluster(String),
    /// Something on this host failed (attach, mkfs, mount, state files).
    #[error("{0}")]
    Host(String),
    /// Docker may not touch the volume: not Docker's, or used outside Docker.
    #[error(transparent)]
    Refused(#[from] Refusal),
}

impl DriverError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DriverError::Invalid(_) => "invalid",
            DriverError::NotFound(_) => "not_found",
            DriverError::InUse(_) => "in_use",
            DriverError::Cluster(_) => "cluster",
            DriverError::Host(_) => "host",
            DriverError::Refused(Refusal::NotDockers { .. }) => "not_docker",
            DriverError::Refused(_) => "in_use",
        }
    }
}

fn cluster_err(what: &str, e: WireError) -> DriverError {
    match e.code {
        ErrorCode::Unavailable | ErrorCode::NotLeader => DriverError::Cluster(format!(
            "{what}: the Meshblock MDM cannot be reached ({}); check the MDM cluster and retry",
            e.message
        )),
        ErrorCode::NoSpace => DriverError::Invalid(format!(
            "{what}: {} (choose a smaller size, thin provisioning, or another pool)",
            e.message
        )),
        _ => DriverError::Cluster(format!("{what}: {}", e.message)),
    }
}

/// What the driver needs once the SDC is registered and has a map.
#[derive(Clone)]
pub struct Core {
    pub attacher: Arc<Attacher>,
    pub guid: String,
    /// The NBD exports, to see clients outside Docker.
    pub exports: Arc<dyn crate::daemon::Exports>,
}

pub struct Driver {
    cfg: DockerConfig,
    cluster: Cluster,
    core: tokio::sync::watch::Receiver<Option<Core>>,
    refs: tokio::sync::Mutex<Refs>,
    refs_file: PathBuf,
    cache: Mutex<BTreeMap<String, VolumeInfo>>,
    cache_file: PathBuf,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// References held, readable without the table's lock (metrics).
    ref_count: std::sync::atomic::AtomicUsize,
    /// Whether the SDC's registration with the MDM is failing (calls then fail fast).
    registration: Arc<crate::daemon::RegistrationStatus>,
}

/// The labels of a volume (the Docker options it was created with).
fn labels(v: &Volume) -> BTreeMap<String, String> {
    v.labels.clone()
}

/// The cluster volume holding Docker volume `name` (see [`names::find`]).
fn find<'m>(map: &'m ClusterState, name: &str) -> Result<Option<&'m Volume>, DriverError> {
    names::find(map, name).map_err(DriverError::Invalid)
}

impl Driver {
    pub fn new(
        cfg: DockerConfig,
        cluster: Cluster,
        state_dir: &std::path::Path,
        core: tokio::sync::watch::Receiver<Option<Core>>,
        registration: Arc<crate::daemon::RegistrationStatus>,
    ) -> Result<Driver, crate::persist::PersistError> {
        let refs_file = state_dir.join("docker-mounts.json");
        let cache_file = state_dir.join("docker-volumes.json");
        let refs = crate::persist::load::<Refs>(&refs_file)?.upgraded();
        // A damaged cache only costs answers while the MDM is unreachable: start empty.
        let cache: BTreeMap<String, VolumeInfo> =
            crate::persist::load(&cache_file).unwrap_or_default();
        Ok(Driver {
            cfg,
            cluster,
            core,
            refs: tokio::sync::Mutex::new(refs),
            refs_file,
            cache: Mutex::new(cache),
            cache_file,
            locks: Mutex::new(HashMap::new()),
            ref_count: Default::default(),
            registration,
        })
    }

    async fn core(&self) -> Result<Core, DriverError> {
        let mut rx = self.core.clone();
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        loop {
            if let Some(c) = rx.borrow_and_update().clone() {
                return Ok(c);
            }
            if let Some((for_how_long, why)) = self.registration.failing() {
                if for_how_long >= FAILING_REGISTRATION {
                    return Err(DriverError::Cluster(format!(
                        "this SDC cannot register with the MDM ({}) for {}s: {why}; check the \
                         MDM addresses, this host's certificate and that an MDM is up",
                        self.registration.mdm(),
                        for_how_long.as_secs()
                    )));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DriverError::Cluster(
                    "the SDC has not registered with the MDM yet; check that the MDM is reachable"
                        .into(),
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
        }
    }

    /// The error of a call that needs the cluster map while the MDM cannot be reached: which
    /// MDM, and why when registration has been failing.
    fn unreachable(&self, what: &str) -> DriverError {
        let why = self
            .registration
            .failing()
            .map(|(_, why)| format!(" ({why})"))
            .unwrap_or_default();
        DriverError::Cluster(format!(
            "{what}: the Meshblock MDM at {} cannot be reached{why}; check that it is up and \
             that this host's certificate and MDM addresses are right, then retry",
            self.registration.mdm()
        ))
    }

    fn lock_of(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        l.entry(name.to_string()).or_default().clone()
    }

    /// Where volume `cname` (a cluster name) is mounted for containers.
    fn mountpoint(&self, cname: &str) -> PathBuf {
        self.cfg.mount_root.join(cname)
    }

    async fn save_refs(&self, refs: &Refs) -> Result<(), DriverError> {
        let n = refs.volumes.values().map(|v| v.ids.len()).sum();
        self.ref_count
            .store(n, std::sync::atomic::Ordering::Relaxed);
        crate::persist::save(&self.refs_file, refs).map_err(|e| DriverError::Host(e.to_string()))
    }

    /// Checks a Docker name and returns its cluster name (see [`proto::docker`]).
    fn check_name(name: &str) -> Result<String, DriverError> {
        names::validate(name).map_err(DriverError::Invalid)?;
        Ok(names::cluster_name(name))
    }

    // ---- Remove ----

    /// What this host knows about `v` (see [`guard::Facts`]).
    async fn facts(&self, core: &Core, map: &ClusterState, v: &Volume, refs: &Refs) -> Facts {
        let mapped_elsewhere = map
            .mappings_of(v.id)
            .filter(|m| Some(m.sdc) != core.attacher.me())
            .map(|m| {
                map.sdcs
                    .get(&m.sdc)
                    .map_or(m.sdc.to_string(), |s| s.name.clone())
            })
            .collect();
        Facts {
            volume: v.name.clone(),
            created_by_docker: v.created_by_docker(),
            container_mounts: refs.count(&v.name),
            mapped_elsewhere,
            mapped_here: map
                .mappings_of(v.id)
                .any(|m| Some(m.sdc) == core.attacher.me()),
            attached_device: core
                .attacher
                .device(&v.name)
                .await
                .map(|d| d.display().to_string()),
            nbd_clients: core.exports.connections(&v.name),
            held: refs.held(&v.name, v.id),
        }
    }

    /// Removes Docker volume `name` from the cluster. A volume already gone is removed: with
    /// the global scope every host's Docker sends Remove, and only the first finds it.
    pub async fn remove(&self, name: &str) -> Result<(), DriverError> {
        let cname = Self::check_name(name)?;
        let _g = self.lock_of(&cname);
        let _g = _g.lock().await;
        let map = self.cluster.fresh_map().await;
        let v = match find(&map, name)? {
            Some(v) => v.clone(),
            None if map.version == 0 => {
                return Err(self.unreachable(&format!("cannot remove volume {name}")))
            }
            None => {
                self.forget(name);
                tracing::info!(volume = %name, "already removed from the cluster");
                return Ok(());
            }
        };
        if !v.created_by_docker() {
            // Before waiting for the SDC: this refusal needs nothing of this host.
            return Err(Refusal::NotDockers { volume: v.name }.into());
        }
        let core = self.core().await?;
        let mut refs = self.refs.lock().await;
        let facts = self.facts(&core, &map, &v, &refs).await;
        let plan = guard::removal(&facts)?;
        self.undo(&core, &v, plan, &mut refs).await?;
        match self
            .cluster
            .command(Command::RemoveVolume {
                name: cname.clone(),
                // Its snapshots (made with `snapshot_of`) are volumes of their own and stay.
                mode: proto::msg::RemoveMode::OnlyMe,
            })
            .await
        {
            Ok(_) => {}
            // Removed meanwhile (another host's Docker): gone is what was asked.
            Err(e) if e.code == ErrorCode::NotFound => {
                tracing::info!(volume = %name, "removed meanwhile by another host");
            }
            Err(e) => return Err(cluster_err(&format!("cannot remove volume {name}"), e)),
        }
        refs.set_held(&cname, v.id, Held::default());
        self.save_refs(&refs).await?;
        drop(refs);
        self.forget(name);
        tracing::info!(volume = %name, cluster_volume = %cname, "removed for Docker");
        Ok(())
    }

    /// Drops Docker volume `name` from the answers cache.
    fn forget(&self, name: &str) {
        let Ok(mut c) = self.cache.lock() else { return };
        if c.remove(name).is_some() {
            if let Err(e) = crate::persist::save(&self.cache_file, &*c) {
                tracing::warn!("failed to save the volume cache: {e}");
            }
        }
    }

    /// Releases what Docker's Mount acquired here (its device, its mapping), unless something
    /// outside Docker uses the volume here (then the mapping stays, recorded as Docker's).
    async fn release(&self, core: &Core, name: &str) -> Result<(), DriverError> {
        let mut refs = self.refs.lock().await;
        if !refs.held.contains_key(name) {
            return Ok(());
        }
        let map = self.cluster.fresh_map().await;
        let Some(v) = map.volume_by_name(name).cloned() else {
            // Removed (with scli): nothing of it is left to release.
            refs.held.remove(name);
            return self.save_refs(&refs).await;
        };
        let mut facts = self.facts(core, &map, &v, &refs).await;
        // What is gone meanwhile (a takeover unmapped it, a detach by hand) is held no more.
        facts.held.mapped &= facts.mapped_here;
        facts.held.attached &= facts.attached_device.is_some();
        refs.set_held(name, v.id, facts.held);
        let (plan, kept) = guard::release(&facts);
        if let Some(why) = kept {
            tracing::warn!(volume = %name, "left mapped to this host: {why}");
        }
        self.undo(core, &v, plan, &mut refs).await
    }

    /// Detaches and unmaps as `plan` says, and records that Docker holds that no more.
    async fn undo(
        &self,
        core: &Core,
        v: &Volume,
        plan: guard::Release,
        refs: &mut Refs,
    ) -> Result<(), DriverError> {
        let name = v.name.as_str();
        let mut held = refs.held(name, v.id);
        if plan.detach {
            core.attacher
                .detach(name, false)
                .await
                .map_err(|e| DriverError::Host(format!("cannot detach volume {name}: {e}")))?;
            held.attached = false;
            refs.set_held(name, v.id, held);
            self.save_refs(refs).await?;
        }
        if plan.unmap {
            let cmd = Command::UnmapVolumeFromSdc {
                volume: name.into(),
                sdc: Some(SdcSelector::Guid(core.guid.clone())),
            };
            match self.cluster.command(cmd).await {
                Ok(_) => {}
                Err(e) if e.code == ErrorCode::NotFound => {}
                Err(e) => return Err(cluster_err(&format!("cannot unmap volume {name}"), e)),
            }
            held.mapped = false;
        }
        refs.set_held(name, v.id, held);
        self.save_refs(refs).await
    }

    // ---- Get / List ----

    fn info(&self, map: &ClusterState, v: &Volume, mountpoint: Option<PathBuf>) -> VolumeInfo {
        let mut status = serde_json::Map::new();
        status.insert("size_bytes".into(), v.size_bytes.into());
        status.insert("thin".into(), v.thin.into());
        if let Some(p) = map.pools.get(&v.pool) {
            status.insert("pool".into(), p.name.clone().into());
        }
        let hosts: Vec<serde_json::Value> = map
            .mappings_of(v.id)
            .filter_map(|m| map.sdcs.get(&m.sdc).map(|s| s.name.clone().into()))
            .collect();
        status.insert("mapped_to".into(), hosts.into());
        for (k, val) in labels(v) {
            if !names::is_name_label(&k) {
                status.insert(k, val.into());
            }
        }
        status.insert("preempt".into(), v.preempt.into());
        status.insert("cluster_volume".into(), v.name.clone().into());
        VolumeInfo {
            Name: names::held_name(v),
            Mountpoint: mountpoint
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            CreatedAt: names::created_at(v),
            Status: status,
        }
    }

    fn remember(&self, infos: &[VolumeInfo], whole: bool) {
        let Ok(mut c) = self.cache.lock() else { return };
        let before = c.clone();
        if whole {
            c.clear();
        }
        for i in infos {
            let mut i = i.clone();
            i.Mountpoint.clear();
            c.insert(i.Name.clone(), i);
        }
        if *c != before {
            if let Err(e) = crate::persist::save(&self.cache_file, &*c) {
                tracing::warn!("failed to save the volume cache: {e}");
            }
        }
    }

    pub async fn get(&self, name: &str) -> Result<VolumeInfo, DriverError> {
        Self::check_name(name)?;
        let mut map = self.cluster.map();
        if !matches!(find(&map, name), Ok(Some(_))) {
            map = self.cluster.fresh_map().await;
        }
        let mountpoint = self.path(name).await;
        if map.version > 0 {
            if let Some(v) = find(&map, name)? {
                let info = self.info(&map, v, mountpoint);
                self.remember(std::slice::from_ref(&info), false);
                return Ok(info);
            }
        }
        // No map yet, or the volume is not in it: an existing volume must not vanish because
        // the MDM is briefly unreachable, so the cache answers for what it knows.
        let cached = self.cache.lock().ok().and_then(|c| c.get(name).cloned());
        match cached {
            Some(mut info) if map.version == 0 => {
                info.Mountpoint = mountpoint
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                Ok(info)
            }
            _ if map.version == 0 => {
                Err(self.unreachable(&format!("volume {name} is unknown here")))
            }
            _ => Err(DriverError::NotFound(format!(
                "volume {name} does not exist"
            ))),
        }
    }

    pub async fn list(&self) -> Result<Vec<VolumeInfo>, DriverError> {
        let map = self.cluster.map();
        let refs = self.refs.lock().await.clone();
        // By cluster name.
        let mounted = |cname: &str| {
            refs.volumes
                .get(cname)
                .filter(|v| system::mount_at(&v.mountpoint).is_some())
                .map(|v| v.mountpoint.clone())
        };
        if map.version == 0 {
            let c = self.cache.lock().map(|c| c.clone()).unwrap_or_default();
            return Ok(c
                .into_values()
                .filter(|i| {
                    i.Status.get(options::LABEL_CREATED_BY)
                        == Some(&serde_json::Value::from(options::CREATED_BY_DOCKER))
                })
                .map(|mut i| {
                    i.Mountpoint = mounted(&names::cluster_name(&i.Name))
                        .map(|p| p.display().to_string())
                        .unwrap_or_default();
                    i
                })
                .collect());
        }
        // Only Docker's volumes: what scli made is not Docker's to show, prune or remove.
        let infos: Vec<VolumeInfo> = map
            .volumes
            .values()
            .filter(|v| v.created_by_docker())
            .map(|v| self.info(&map, v, mounted(&v.name)))
            .collect();
        self.remember(&infos, true);
        Ok(infos)
    }

    // ---- Start-up ----

    /// Reconciles the reference table with what is mounted: a volume whose mount is gone (host
    /// reboot, someone unmounted it) has no user left and is released; a mounted one keeps its
    /// references (Docker will not send Mount again for running containers).
    pub async fn reconcile(&self) {
        let Ok(core) = self.core().await else { return };
        let mut refs = self.refs.lock().await;
        let names: Vec<String> = refs.volumes.keys().cloned().collect();
        for name in names {
            let mp = self.mountpoint(&name);
            if system::mount_at(&mp).is_some() {
                let Some(now) = self.taken_over(&core, &name) else {
                    tracing::info!(volume = %name, refs = refs.count(&name), "still mounted: references kept");
                    continue;
                };
                // This host died or was cut off, and another one took the volume over: the
                // containers that used it here are gone (or can write nothing); release it
                // all, so no operator has to.
                tracing::warn!(
                    volume = %name,
                    refs = refs.count(&name),
                    "{now} while this host was away: unmounting its stale mount and releasing it"
                );
                self.drop_stale_mount(&name).await;
                refs.volumes.remove(&name);
                continue;
            }
            tracing::warn!(volume = %name, "its mount is gone: dropping its references and releasing it");
            refs.volumes.remove(&name);
        }
        if let Err(e) = self.save_refs(&refs).await {
            tracing::warn!("failed to save the mount references: {e}");
        }
        // Whatever Docker still holds without a mount: a release cut short before.
        let unused: Vec<String> = refs
            .held
            .keys()
            .filter(|n| !refs.volumes.contains_key(*n))
            .cloned()
            .collect();
        drop(refs);
        for name in unused {
            let _g = self.lock_of(&name);
            let _g = _g.lock().await;
            if let Err(e) = self.release(&core, &name).await {
                tracing::warn!(volume = %name, "failed to release: {e}");
            }
        }
    }

    /// Number of (volume, mount ID) references, for metrics.
    pub fn reference_count_now(&self) -> usize {
        self.ref_count.load(std::sync::atomic::Ordering::Relaxed)
    }
}
