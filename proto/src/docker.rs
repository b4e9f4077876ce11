//! Docker volume names and the cluster volumes that hold them: pure and deterministic, so every
//! host's Docker driver finds the same volume for a name, and scli shows the link.
//!
//! Docker names (`[A-Za-z0-9][A-Za-z0-9_.-]*`) may be long: anonymous volumes are 64 hex
//! characters, Compose makes `<project>_<volume>`. Cluster names stay within the MDM's
//! [`CLUSTER_NAME_LEN_MAX`] (ScaleIO's 31). A Docker name that fits is its own cluster name; a
//! longer one becomes its first [`PREFIX_LEN`] characters, `-` and 16 hex digits of its
//! SHA-256 ([`cluster_name`]). Either way the volume carries the Docker name in labels
//! ([`name_labels`]: [`LABEL_DOCKER_NAME`], split in pieces of at most
//! [`LABEL_VALUE_LEN_MAX`] characters), so Get and List answer with the Docker name, and a
//! cluster volume whose stored Docker name differs from the one asked is a collision
//! ([`held_name`] tells which name a volume holds), never silently shared.

use crate::model::{ClusterState, Volume};
use std::collections::BTreeMap;

/// The MDM's longest volume name.
pub const CLUSTER_NAME_LEN_MAX: usize = 31;
/// The longest Docker name the driver takes: four label pieces.
pub const DOCKER_NAME_LEN_MAX: usize = 4 * LABEL_VALUE_LEN_MAX;
/// The longest label value the MDM accepts.
pub const LABEL_VALUE_LEN_MAX: usize = 256;
/// Characters of a long Docker name kept at the start of its cluster name (readable in scli).
pub const PREFIX_LEN: usize = CLUSTER_NAME_LEN_MAX - 1 - HASH_HEX_LEN;
/// Hex digits of the name's SHA-256 in a derived cluster name (64 bits).
const HASH_HEX_LEN: usize = 16;
/// The label holding a Docker-made volume's Docker name (its first piece; the others are
/// `docker-name.2` to `docker-name.4`). Reserved for the Docker driver, as `created-by` is.
pub const LABEL_DOCKER_NAME: &str = "docker-name";

/// Is `name` one the driver takes? Docker's own rule (a letter or digit, then letters, digits,
/// `_`, `.`, `-`), at most [`DOCKER_NAME_LEN_MAX`] characters.
pub fn validate(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !first_ok || !rest_ok {
        return Err(format!(
            "invalid volume name {name:?}: start with a letter or digit, then use letters, \
             digits, '_', '.' or '-'"
        ));
    }
    if name.len() > DOCKER_NAME_LEN_MAX {
        return Err(format!(
            "volume name of {} characters is too long: the meshblock driver takes at most {}",
            name.len(),
            DOCKER_NAME_LEN_MAX
        ));
    }
    Ok(())
}

/// The cluster name of the volume holding Docker volume `name` (a valid name, see
/// [`validate`]): the name itself when it fits, else a prefix and a hash of it.
pub fn cluster_name(name: &str) -> String {
    if name.len() <= CLUSTER_NAME_LEN_MAX {
        return name.to_string();
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let hex: String = digest
        .as_ref()
        .iter()
        .take(HASH_HEX_LEN / 2)
        .map(|b| format!("{b:02x}"))
        .collect();
    let prefix: String = name.chars().take(PREFIX_LEN).collect();
    format!("{prefix}-{hex}")
}

/// The label key of piece `i` (0-based) of the Docker name.
fn piece_key(i: usize) -> String {
    if i == 0 {
        LABEL_DOCKER_NAME.to_string()
    } else {
        format!("{LABEL_DOCKER_NAME}.{}", i + 1)
    }
}

/// Is `key` one of the labels that hold a Docker name?
pub fn is_name_label(key: &str) -> bool {
    key == LABEL_DOCKER_NAME
        || key
            .strip_prefix(LABEL_DOCKER_NAME)
            .and_then(|r| r.strip_prefix('.'))
            .is_some()
}

/// The labels that record Docker name `name` (a valid name) on its volume.
pub fn name_labels(name: &str) -> BTreeMap<String, String> {
    let chars: Vec<char> = name.chars().collect();
    chars
        .chunks(LABEL_VALUE_LEN_MAX)
        .enumerate()
        .map(|(i, piece)| (piece_key(i), piece.iter().collect()))
        .collect()
}

/// The Docker name recorded in `labels`, if any.
pub fn stored_name(labels: &BTreeMap<String, String>) -> Option<String> {
    let mut name = String::new();
    for i in 0.. {
        match labels.get(&piece_key(i)) {
            Some(piece) => name.push_str(piece),
            None => break,
        }
    }
    (!name.is_empty()).then_some(name)
}

/// The volume named `name` in the cluster, or else the one holding Docker volume `name` (what
/// scli's `--query_volume --volume_name` accepts).
pub fn volume_by_either_name<'s>(s: &'s ClusterState, name: &str) -> Option<&'s Volume> {
    s.volume_by_name(name).or_else(|| {
        s.volumes
            .values()
            .find(|v| stored_name(&v.labels).as_deref() == Some(name))
    })
}

/// The Docker name volume `v` holds: the one recorded in its labels, else (volumes made before
/// names were recorded, or with scli) its cluster name.
pub fn held_name(v: &Volume) -> String {
    stored_name(&v.labels).unwrap_or_else(|| v.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_their_own_cluster_names() {
        for n in ["v1", "db", "a", "x.y_z-1", "a".repeat(31).as_str()] {
            assert_eq!(cluster_name(n), n);
            assert!(validate(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn long_names_get_a_stable_short_cluster_name() {
        let anon = "0123456789abcdef".repeat(4);
        let compose = "my-long-project-name_postgres-data-volume";
        for n in [
            anon.as_str(),
            compose,
            "z".repeat(DOCKER_NAME_LEN_MAX).as_str(),
        ] {
            assert!(validate(n).is_ok(), "{n}");
            let c = cluster_name(n);
            assert_eq!(c.len(), CLUSTER_NAME_LEN_MAX, "{c}");
            assert_eq!(c, cluster_name(n), "deterministic");
            assert!(c.starts_with(&n[..PREFIX_LEN]), "{c}");
            assert!(c
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_.-".contains(ch)));
        }
        // Same prefix, different names: different cluster names.
        let a = format!("{compose}1");
        let b = format!("{compose}2");
        assert_ne!(cluster_name(&a), cluster_name(&b));
        // A known value, so a change of the scheme (which would orphan volumes) is noticed.
        assert_eq!(cluster_name(compose), "my-long-projec-779c2ef747f3b279");
    }

    #[test]
    fn bad_names_are_refused() {
        for n in ["", "-x", ".x", "_x", "a b", "a/b", "ä", "a:b"] {
            assert!(validate(n).is_err(), "{n:?} accepted");
        }
        let e = validate(&"a".repeat(DOCKER_NAME_LEN_MAX + 1)).expect_err("too long");
        assert!(e.contains("too long"), "{e}");
    }

    #[test]
    fn names_round_trip_through_labels() {
        for n in [
            "v",
            "q".repeat(300).as_str(),
            "0123456789".repeat(102).as_str(),
        ] {
            let l = name_labels(n);
            assert!(l.values().all(|v| v.len() <= LABEL_VALUE_LEN_MAX));
            assert!(l.keys().all(|k| is_name_label(k)), "{l:?}");
            assert!(l.len() <= 4);
            assert_eq!(stored_name(&l).as_deref(), Some(n));
        }
        assert_eq!(stored_name(&BTreeMap::new()), None);
        assert!(!is_name_label("docker-names"));
        assert!(!is_name_label("fstype"));
    }
}
