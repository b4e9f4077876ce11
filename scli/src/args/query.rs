//! The [`Query`] each query flag sends.

use super::values::need;
use super::Args;
use proto::msg::Query;

impl Args {
    pub fn query(&self, name: &str) -> anyhow::Result<Option<Query>> {
        Ok(Some(match name {
            "--query_all" => Query::All,
            "--query_cluster" => Query::Cluster,
            "--query_protection_domain" => Query::ProtectionDomain {
                name: need(&self.protection_domain_name, "--protection_domain_name")?.into(),
            },
            "--query_storage_pool" => Query::StoragePool {
                name: need(&self.storage_pool_name, "--storage_pool_name")?.into(),
            },
            "--query_all_sds" => Query::AllSds,
            "--query_sds" => Query::Sds {
                name: need(&self.sds_name, "--sds_name")?.into(),
            },
            "--query_sdc" => Query::Sdc { sdc: self.sdc() },
            "--query_volume" => Query::Volume {
                name: need(&self.volume_name, "--volume_name")?.into(),
            },
            "--query_all_volumes" => Query::AllVolumes,
            "--query_vtree" => Query::Vtree {
                name: need(&self.volume_name, "--volume_name")?.into(),
            },
            "--query_snapshot_policy" => Query::SnapshotPolicy {
                name: self.snapshot_policy_name.clone(),
            },
            "--query_resilience" => Query::Resilience,
            "--query_events" => Query::Events {
                since_unix: self
                    .since
                    .as_deref()
                    .map(|w| crate::events::parse_since(w, proto::clock::now_unix()))
                    .transpose()?,
            },
            _ => return Ok(None),
        }))
    }
}
