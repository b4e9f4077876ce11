//! The SDC daemon's control loop: keep a stable GUID, register with the MDM, follow the cluster
//! map, and keep one NBD export per volume mapped to this SDC (added on map, closed on unmap).

use crate::config::SdcConfig;
use crate::io_path::{IoPath, VolumeIo};
use anyhow::Context;
use proto::client::MdmClient;
use proto::model::ClusterState;
use proto::msg::{MdmRequest, MdmResponse};
use proto::{SdcId, VolumeId};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Read the SDC's GUID from the state dir, creating it on first start.
pub fn load_or_create_guid(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join("guid");
    if let Ok(g) = std::fs::read_to_string(&path) {
        let g = g.trim().to_string();
        if !g.is_empty() && g.len() <= 64 {
            return Ok(g);
        }
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("create {}", state_dir.display()))?;
    let b: [u8; 16] = rand::random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let guid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    let tmp = state_dir.join("guid.tmp");
    std::fs::write(&tmp, &guid).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
    Ok(guid)
}

/// Register until the MDM answers; returns this SDC's id.
pub async fn register(
    mdm: &MdmClient,
    guid: &str,
    name: &str,
    status: &RegistrationStatus,
) -> SdcId {
    let req = MdmRequest::SdcRegister {
        guid: guid.into(),
        name: name.into(),
        ip: String::new(),
    };
    loop {
        match mdm.request(&req, Duration::from_secs(10)).await {
            Ok(MdmResponse::SdcRegistered { id }) => {
                status.succeeded();
                return id;
            }
            Ok(other) => {
                tracing::warn!("unexpected answer to SDC registration: {other:?}");
                status.failed(format!("unexpected answer to registration: {other:?}"));
            }
            Err(e) => {
                tracing::warn!("failed to register with the MDM, retrying: {e}");
                status.failed(e.to_string());
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether registration with the MDM is failing, since when and why: lets callers waiting for
/// the SDC (the Docker plugin) give up with the reason instead of waiting out their limit.
pub struct RegistrationStatus {
    /// The MDM addresses, for messages.
    mdm: String,
    failing: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl RegistrationStatus {
    pub fn new(mdm: &[String]) -> RegistrationStatus {
        RegistrationStatus {
            mdm: mdm.join(","),
            failing: Default::default(),
        }
    }

    /// The MDM addresses registration goes to.
    pub fn mdm(&self) -> &str {
        &self.mdm
    }

    fn failed(&self, why: String) {
        let mut f = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let since = f.as_ref().map_or_else(std::time::Instant::now, |(t, _)| *t);
        *f = Some((since, why));
    }

    fn succeeded(&self) {
        *self.failing.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// How long registration has been failing, and its last error; `None` while it has not
    /// failed (yet) or once it succeeded.
    pub fn failing(&self) -> Option<(Duration, String)> {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(t, why)| (t.elapsed(), why.clone()))
    }
}

/// The volumes mapped to `me` in `map` (none while not registered).
pub fn mapped_volumes(map: &ClusterState, me: Option<SdcId>) -> Vec<(VolumeId, String)> {
    map.mappings
        .iter()
        .filter(|m| Some(m.sdc) == me)
        .filter_map(|m| map.volumes.get(&m.volume).map(|v| (v.id, v.name.clone())))
        .collect()
}

/// What the export side must offer the daemon.
pub trait Exports: Send + Sync + 'static {
    fn add(&self, name: &str, vol: Arc<VolumeIo>);
    fn remove(&self, name: &str);
    /// Client connections on the export of `name` now (0 if not exported).
    fn connections(&self, name: &str) -> usize;
}

/// How this SDC registers (again): see [`follow_map`].
pub struct Registration<'a> {
    pub mdm: &'a MdmClient,
    pub guid: &'a str,
    pub name: &'a str,
    pub status: &'a RegistrationStatus,
}

/// Follow the map forever: poll the MDM and reconcile exports with the mappings. If the MDM
/// says this SDC is not registered (an operator removed it while it was cut off, so its
/// session had lapsed), register again, as a restart would: the SDC gets a new id and serves
/// whatever is then mapped to it.
pub async fn follow_map(
    io: Arc<IoPath>,
    exports: Arc<dyn Exports>,
    cfg: &SdcConfig,
    again: Registration<'_>,
) {
    let mut current: HashMap<VolumeId, String> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.map_poll_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        io.refresh_map().await;
        if io.unregistered() {
            let old = io.me().map_or_else(String::new, |id| id.to_string());
            tracing::warn!(old_id = %old, "this SDC was removed from the cluster; registering again");
            let id = register(again.mdm, again.guid, again.name, again.status).await;
            io.set_me(id);
            tracing::info!(sdc_id = %id, "registered with the MDM again");
            io.refresh_map().await;
        }
        let map = io.map();
        let want: HashMap<VolumeId, String> = mapped_volumes(&map, io.me()).into_iter().collect();
        for (id, name) in current.iter() {
            if want.get(id) != Some(name) {
                tracing::info!(volume = %name, "volume unmapped or renamed: closing its export");
                exports.remove(name);
            }
        }
        for (id, name) in want.iter() {
            if current.get(id) != Some(name) {
                tracing::info!(volume = %name, "volume mapped: exporting it over NBD");
                exports.add(name, Arc::new(VolumeIo::new(io.clone(), *id)));
            }
        }
        current = want;
    }
}
