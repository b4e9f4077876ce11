//! Objects given by id (`--volume_id`, `--sds_id`, ...: the ids scli prints) are looked up in
//! the map and replaced by their names before the command is built, so the MDM sees the same
//! command either way. An unknown id is refused here and nothing is sent. Each lookup is kept
//! as a [`Binding`] sent with the command: the MDM refuses the command, changing nothing, if a
//! rename or a removal in between gave the name to another object (and a query's answer is
//! checked the same way). SDCs are the exception: `--sdc_id` travels as `SdcSelector::Id` and
//! the MDM resolves it.

use super::Args;
use anyhow::bail;
use proto::model::ClusterState;
use proto::msg::Binding;

impl Args {
    /// Whether an object is given by an id that must be looked up in the map first.
    pub(super) fn has_ids(&self) -> bool {
        [
            self.protection_domain_id,
            self.storage_pool_id,
            self.fault_set_id,
            self.sds_id,
            self.volume_id,
            self.source_volume_id,
            self.destination_volume_id,
            self.mdm_id,
        ]
        .iter()
        .any(Option::is_some)
    }

    /// Replace every id given by the name of its object in `s`.
    pub(super) fn resolve_ids(&mut self, s: &ClusterState) -> anyhow::Result<()> {
        if let Some(id) = self.protection_domain_id.take() {
            let Some(pd) = s.pds.get(&proto::PdId(id)) else {
                bail!("no protection domain has id {}", proto::PdId(id));
            };
            self.protection_domain_name = Some(pd.name.clone());
            self.bindings.push(Binding::ProtectionDomain {
                id: pd.id,
                name: pd.name.clone(),
            });
        }
        if let Some(id) = self.fault_set_id.take() {
            let Some(fs) = s.fault_sets.get(&proto::FaultSetId(id)) else {
                bail!("no fault set has id {}", proto::FaultSetId(id));
            };
            let Some(pd) = s.pds.get(&fs.pd) else {
                bail!("the protection domain of fault set {} is gone", fs.name);
            };
            if self
                .protection_domain_name
                .as_ref()
                .is_some_and(|n| *n != pd.name)
            {
                bail!(
                    "fault set {} (id {}) is in protection domain {}, not in {}",
                    fs.name,
                    fs.id,
                    pd.name,
                    self.protection_domain_name.as_deref().unwrap_or_default()
                );
            }
            self.protection_domain_name = Some(pd.name.clone());
            self.fault_set_name = Some(fs.name.clone());
            self.bindings.push(Binding::FaultSet {
                id: fs.id,
                pd: pd.name.clone(),
                name: fs.name.clone(),
            });
        }
        if let Some(id) = self.storage_pool_id.take() {
            let Some(p) = s.pools.get(&proto::PoolId(id)) else {
                bail!("no storage pool has id {}", proto::PoolId(id));
            };
            self.storage_pool_name = Some(p.name.clone());
            self.bindings.push(Binding::StoragePool {
                id: p.id,
                name: p.name.clone(),
            });
        }
        if let Some(id) = self.sds_id.take() {
            let Some(x) = s.sds.get(&proto::SdsId(id)) else {
                bail!("no SDS has id {}", proto::SdsId(id));
            };
            self.sds_name = Some(x.name.clone());
            self.bindings.push(Binding::Sds {
                id: x.id,
                name: x.name.clone(),
            });
        }
        for (id, name) in [
            (self.volume_id.take(), &mut self.volume_name),
            (self.source_volume_id.take(), &mut self.source_volume_name),
            (
                self.destination_volume_id.take(),
                &mut self.destination_volume_name,
            ),
        ] {
            if let Some(id) = id {
                let Some(v) = s.volumes.get(&proto::VolumeId(id)) else {
                    bail!("no volume has id {}", proto::VolumeId(id));
                };
                *name = Some(v.name.clone());
                self.bindings.push(Binding::Volume {
                    id: v.id,
                    name: v.name.clone(),
                });
            }
        }
        if let Some(id) = self.mdm_id.take() {
            let Some(m) = s.mdms.get(&proto::MdmId(id)) else {
                bail!("no MDM has id 0x{id:016x}");
            };
            self.mdm_name = Some(m.name.clone());
            self.bindings.push(Binding::Mdm {
                id: m.id,
                name: m.name.clone(),
            });
        }
        Ok(())
    }

    /// Refuse an answer read from `s` if an object given by id no longer has the name it was
    /// looked up as (renamed or replaced between the two reads).
    pub(super) fn check_bindings(&self, s: &ClusterState) -> anyhow::Result<()> {
        for b in &self.bindings {
            if let Err(e) = s.check_binding(b) {
                bail!("{e} while scli looked it up: run the query again");
            }
        }
        Ok(())
    }
}
