//! Create: a new Docker volume (validated options, a pool picked, idempotent for the same
//! options), or a snapshot of one (`snapshot-of`), and the checks that a volume of that name
//! is Docker's and compatible with what was asked.

use super::*;

impl Driver {
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
}
