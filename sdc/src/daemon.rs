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
pub async fn register(mdm: &MdmClient, guid: &str, name: &str) -> SdcId {
    let req = MdmRequest::SdcRegister {
        guid: guid.into(),
        name: name.into(),
        ip: String::new(),
    };
    loop {
        match mdm.request(&req, Duration::from_secs(10)).await {
            Ok(MdmResponse::SdcRegistered { id }) => return id,
            Ok(other) => tracing::warn!("unexpected answer to SDC registration: {other:?}"),
            Err(e) => tracing::warn!("failed to register with the MDM, retrying: {e}"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The volumes mapped to `me` in `map`.
pub fn mapped_volumes(map: &ClusterState, me: SdcId) -> Vec<(VolumeId, String)> {
    map.mappings
        .iter()
        .filter(|m| m.sdc == me)
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

/// Follow the map forever: poll the MDM and reconcile exports with the mappings.
pub async fn follow_map(io: Arc<IoPath>, me: SdcId, exports: Arc<dyn Exports>, cfg: &SdcConfig) {
    let mut current: HashMap<VolumeId, String> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.map_poll_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        io.refresh_map().await;
        let map = io.map();
        let want: HashMap<VolumeId, String> = mapped_volumes(&map, me).into_iter().collect();
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
