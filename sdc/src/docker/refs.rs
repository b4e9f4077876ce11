//! Mount references of Docker volumes on this host: which container mount IDs use which volume,
//! where it is mounted and on which device. Kept on disk (`<state_dir>/docker-mounts.json`)
//! because Docker does not replay Mount after a daemon or plugin restart; reconciled with
//! `/proc/self/mountinfo` at start. Pure bookkeeping: no I/O besides load and save.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRefs {
    /// Docker mount IDs holding the volume (a set: Mount may repeat an ID).
    pub ids: BTreeSet<String>,
    pub mountpoint: PathBuf,
    pub device: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refs {
    pub volumes: BTreeMap<String, VolumeRefs>,
}

impl Refs {
    /// Adds `id` to a mounted volume; returns the number of references now.
    pub fn add(&mut self, name: &str, id: &str, mountpoint: PathBuf, device: PathBuf) -> usize {
        let v = self.volumes.entry(name.to_string()).or_default();
        v.mountpoint = mountpoint;
        v.device = device;
        v.ids.insert(id.to_string());
        v.ids.len()
    }

    /// Drops `id`; returns the references left, or `None` if the volume had no entry.
    pub fn remove(&mut self, name: &str, id: &str) -> Option<usize> {
        let v = self.volumes.get_mut(name)?;
        v.ids.remove(id);
        Some(v.ids.len())
    }

    pub fn count(&self, name: &str) -> usize {
        self.volumes.get(name).map_or(0, |v| v.ids.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_id_and_repeats_are_idempotent() {
        let mut r = Refs::default();
        let (mp, dev) = (PathBuf::from("/m/v"), PathBuf::from("/dev/loop0"));
        assert_eq!(r.add("v", "a", mp.clone(), dev.clone()), 1);
        assert_eq!(r.add("v", "a", mp.clone(), dev.clone()), 1);
        assert_eq!(r.add("v", "b", mp, dev), 2);
        assert_eq!(r.remove("v", "a"), Some(1));
        assert_eq!(r.remove("v", "a"), Some(1));
        assert_eq!(r.remove("v", "b"), Some(0));
        assert_eq!(r.remove("w", "a"), None);
        assert_eq!(r.count("v"), 0);
    }
}
