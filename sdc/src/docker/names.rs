//! Which cluster volume holds a Docker volume: the name scheme of [`proto::docker`] (cluster
//! names derived from long Docker names, the Docker name kept in labels) applied to a map, with
//! collisions refused, and the `CreatedAt` Docker shows. Pure: no I/O.

pub use proto::docker::{
    cluster_name, held_name, is_name_label, name_labels, validate, PREFIX_LEN,
};
use proto::model::{ClusterState, Volume};

/// When the volume was created, RFC 3339 (empty for volumes made before the MDM recorded it).
pub fn created_at(v: &Volume) -> String {
    if v.created_unix == 0 {
        return String::new();
    }
    proto::clock::rfc3339(v.created_unix)
}

/// The cluster volume holding Docker volume `name`, if there is one. A volume with `name`'s
/// cluster name that holds another Docker name (or, made with scli, is named so) is a
/// collision: refused with the reason, so two Docker names never share a volume.
pub fn find<'m>(map: &'m ClusterState, name: &str) -> Result<Option<&'m Volume>, String> {
    let cname = cluster_name(name);
    let Some(v) = map.volume_by_name(&cname) else {
        return Ok(None);
    };
    let held = held_name(v);
    if held == name {
        return Ok(Some(v));
    }
    Err(if v.created_by_docker() {
        format!(
            "Docker volume {name} would be kept in the cluster volume {cname}, which already \
             holds the Docker volume {held} (long names share a volume name when their first \
             {PREFIX_LEN} characters and name hash agree): choose another name"
        )
    } else {
        format!(
            "Docker volume {name} would be kept in the cluster volume {cname}, which exists and \
             was not created by Docker (made with scli?): choose another name"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::model::{CREATED_BY_DOCKER, LABEL_CREATED_BY};
    use proto::{PoolId, VolumeId, VtreeId};
    use std::collections::BTreeMap;

    fn volume(id: u64, name: &str, docker: Option<&str>) -> Volume {
        let mut labels = BTreeMap::new();
        if let Some(d) = docker {
            labels.insert(LABEL_CREATED_BY.to_string(), CREATED_BY_DOCKER.to_string());
            labels.extend(name_labels(d));
        }
        Volume {
            id: VolumeId(id),
            name: name.into(),
            pool: PoolId(1),
            size_bytes: 1 << 30,
            thin: true,
            vtree: VtreeId(id),
            created_unix: 0,
            labels,
            preempt: false,
            layer: Default::default(),
            snapshot: None,
        }
    }

    fn map(vols: Vec<Volume>) -> ClusterState {
        let mut s = ClusterState::default();
        for v in vols {
            s.volumes.insert(v.id, v);
        }
        s
    }

    #[test]
    fn finds_the_volume_that_holds_the_name() {
        let long = "compose-project-name_database-volume";
        let s = map(vec![
            volume(1, "short", Some("short")),
            volume(2, &cluster_name(long), Some(long)),
            // Made by Docker before names were recorded, and with scli: their own names.
            volume(3, "old", None),
        ]);
        assert_eq!(find(&s, "short").ok().flatten().map(|v| v.id.0), Some(1));
        assert_eq!(find(&s, long).ok().flatten().map(|v| v.id.0), Some(2));
        assert_eq!(find(&s, "old").ok().flatten().map(|v| v.id.0), Some(3));
        assert_eq!(find(&s, "absent").ok().flatten(), None);
        assert_eq!(find(&s, &format!("{long}-2")).ok().flatten(), None);
    }

    #[test]
    fn a_derived_name_held_by_another_volume_is_refused() {
        let long = "compose-project-name_database-volume";
        let taken = cluster_name(long);
        // Another Docker name holds the cluster name (its own, or a hash collision).
        let s = map(vec![volume(1, &taken, Some(&taken))]);
        let e = find(&s, long).expect_err("collision");
        assert!(e.contains("already holds the Docker volume"), "{e}");
        // A volume made with scli under that name.
        let s = map(vec![volume(1, &taken, None)]);
        let e = find(&s, long).expect_err("collision");
        assert!(e.contains("not created by Docker"), "{e}");
    }

    #[test]
    fn created_at_is_rfc3339_or_empty() {
        let mut v = volume(1, "v", Some("v"));
        assert_eq!(created_at(&v), "");
        v.created_unix = 1_800_000_000;
        assert_eq!(created_at(&v), "2027-01-15T08:00:00Z");
    }
}
