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

    // ---- Create ----

    pub async fn create(
        &self,
        name: &str,
        opts: &HashMap<String, String>,
    ) -> Result<(), DriverError> {
        let cname = Self::check_name(name)?;
        let spec = options::parse(opts).map_err(DriverError::Invalid)?;
        let _g = self.lock_of(&cname);
        let _g = _g.lock().await;
        let map = self.cluster.fresh_map().await;
        if map.version == 0 {
            return Err(self.unreachable("cannot create"));
        }
        if let Some(v) = find(&map, name)? {
            return Self::dockers(v).and_then(|()| self.compatible(&map, v, &spec));
        }
        if let Some(src) = &spec.snapshot_of {
            return self.create_snapshot(&map, name, &cname, src, &spec).await;
        }
        let pool = self.pick_pool(&map, &spec)?;
        let size = spec.size_bytes.unwrap_or(self.cfg.default_size_bytes);
        let mut labels = options::labels(&spec, &self.cfg.default_fstype);
        labels.extend(names::name_labels(name));
        let cmd = Command::AddVolume {
            pool: pool.clone(),
            name: cname.clone(),
            size_bytes: size,
            thin: spec.thin.unwrap_or(true),
            labels,
            preempt: spec.preempt.unwrap_or(false),
        };
        match self.cluster.command(cmd).await {
            Ok(_) => {
                tracing::info!(volume = %name, cluster_volume = %cname, pool = %pool, size, "created a volume for Docker");
                Ok(())
            }
            Err(e) if e.code == ErrorCode::AlreadyExists => {
                // Created concurrently (by another host?): same options is fine.
                let map = self.cluster.fresh_map().await;
                match find(&map, name)? {
                    Some(v) => Self::dockers(v).and_then(|()| self.compatible(&map, v, &spec)),
                    None => Err(cluster_err("cannot create", e)),
                }
            }
            Err(e) => Err(cluster_err(&format!("cannot create volume {name}"), e)),
        }
    }

    /// Create `name` as a snapshot of Docker volume `src` (option `snapshot_of`): its content
    /// at this instant, its size, pool and filesystem; limits as the options say, else the
    /// source's.
    async fn create_snapshot(
        &self,
        map: &ClusterState,
        name: &str,
        cname: &str,
        src: &str,
        spec: &CreateSpec,
    ) -> Result<(), DriverError> {
        let source = find(map, src)?.ok_or_else(|| {
            DriverError::Invalid(format!(
                "option snapshot_of={src}: there is no such volume (docker volume ls lists them)"
            ))
        })?;
        Self::dockers(source)?;
        let mut labels: BTreeMap<String, String> = source
            .labels
            .iter()
            .filter(|(k, _)| !proto::docker::is_name_label(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, limit) in [
            (options::LABEL_IOPS, spec.iops_limit),
            (options::LABEL_BANDWIDTH, spec.bandwidth_limit_kbps),
        ] {
            match limit {
                Some(0) => {
                    labels.remove(key);
                }
                Some(n) => {
                    labels.insert(key.into(), n.to_string());
                }
                None => {}
            }
        }
        labels.extend(names::name_labels(name));
        let cmd = Command::SnapshotVolumes {
            volumes: vec![source.name.clone()],
            names: vec![cname.to_string()],
            labels,
        };
        match self.cluster.command(cmd).await {
            Ok(_) => {
                tracing::info!(volume = %name, cluster_volume = %cname, source = %src, "created a volume for Docker as a snapshot");
                Ok(())
            }
            Err(e) if e.code == ErrorCode::AlreadyExists => {
                let map = self.cluster.fresh_map().await;
                match find(&map, name)? {
                    Some(v) => Self::dockers(v).and_then(|()| self.compatible(&map, v, spec)),
                    None => Err(cluster_err("cannot create", e)),
                }
            }
            Err(e) => Err(cluster_err(
                &format!("cannot snapshot volume {src} as {name}"),
                e,
            )),
        }
    }

    fn pick_pool(&self, map: &ClusterState, spec: &CreateSpec) -> Result<String, DriverError> {
        let pd_name = spec
            .protection_domain
            .clone()
            .or_else(|| Some(self.cfg.default_protection_domain.clone()).filter(|s| !s.is_empty()));
        let pd = match &pd_name {
            Some(n) => Some(map.pd_by_name(n).ok_or_else(|| {
                DriverError::Invalid(format!("protection domain {n} does not exist"))
            })?),
            None => None,
        };
        let wanted = spec
            .pool
            .clone()
            .or_else(|| Some(self.cfg.default_pool.clone()).filter(|s| !s.is_empty()));
        if let Some(p) = wanted {
            let pool = map
                .pool_by_name(&p)
                .ok_or_else(|| DriverError::Invalid(format!("storage pool {p} does not exist")))?;
            if let Some(pd) = pd {
                if pool.pd != pd.id {
                    return Err(DriverError::Invalid(format!(
                        "storage pool {p} is not in protection domain {}",
                        pd.name
                    )));
                }
            }
            return Ok(p);
        }
        let pools: Vec<&str> = map
            .pools
            .values()
            .filter(|p| pd.is_none_or(|pd| p.pd == pd.id))
            .map(|p| p.name.as_str())
            .collect();
        match pools.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(DriverError::Invalid(
                "the cluster has no storage pool to create the volume in".into(),
            )),
            many => Err(DriverError::Invalid(format!(
                "several storage pools exist ({}): choose one with --opt pool=NAME",
                many.join(", ")
            ))),
        }
    }

    /// A Create of an existing volume adopts it only if Docker made it.
    fn dockers(v: &Volume) -> Result<(), DriverError> {
        if v.created_by_docker() {
            return Ok(());
        }
        Err(DriverError::Invalid(format!(
            "volume {} already exists in the Meshblock cluster and was not created by Docker \
             (made with scli?); choose another name: the meshblock Docker driver uses only \
             volumes it created",
            v.name
        )))
    }

    /// An existing volume is fine for a Create whose given options it matches.
    fn compatible(
        &self,
        map: &ClusterState,
        v: &Volume,
        spec: &CreateSpec,
    ) -> Result<(), DriverError> {
        let mut diffs = Vec::new();
        if let Some(src) = &spec.snapshot_of {
            let of = v
                .snapshot
                .as_ref()
                .and_then(|x| map.volumes.get(&x.volume))
                .map(proto::docker::held_name);
            if of.as_deref() != Some(src.as_str()) {
                diffs.push(format!("not a snapshot of {src}"));
            }
        }
        if let Some(size) = spec.size_bytes {
            let rounded = size.div_ceil(proto::CHUNK_SIZE) * proto::CHUNK_SIZE;
            if rounded != v.size_bytes {
                diffs.push(format!(
                    "size {} bytes (asked {} bytes)",
                    v.size_bytes, rounded
                ));
            }
        }
        if let Some(thin) = spec.thin {
            if thin != v.thin {
                diffs.push(if v.thin { "thin" } else { "thick" }.to_string());
            }
        }
        if let Some(p) = &spec.pool {
            let actual = map
                .pools
                .get(&v.pool)
                .map(|p| p.name.as_str())
                .unwrap_or("");
            if actual != p {
                diffs.push(format!("pool {actual}"));
            }
        }
        let l = labels(v);
        let label_diff = |key: &str, want: Option<String>, diffs: &mut Vec<String>| {
            if let Some(w) = want {
                let have = l.get(key).cloned().unwrap_or_default();
                if have != w {
                    diffs.push(format!("{key} {have:?}"));
                }
            }
        };
        label_diff(options::LABEL_FSTYPE, spec.fstype.clone(), &mut diffs);
        label_diff(
            options::LABEL_IOPS,
            spec.iops_limit.filter(|i| *i > 0).map(|i| i.to_string()),
            &mut diffs,
        );
        label_diff(
            options::LABEL_BANDWIDTH,
            spec.bandwidth_limit_kbps
                .filter(|i| *i > 0)
                .map(|i| i.to_string()),
            &mut diffs,
        );
        if let Some(p) = spec.preempt {
            if p != v.preempt {
                diffs.push(format!("preempt {}", v.preempt));
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(DriverError::Invalid(format!(
                "volume {} already exists with different options ({}); remove it first or \
                 create it with the same options",
                names::held_name(v),
                diffs.join(", ")
            )))
        }
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

    // ---- Mount / Unmount ----

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
    fn taken_over(&self, core: &Core, cname: &str) -> Option<String> {
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
    async fn drop_stale_mount(&self, cname: &str) {
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
