//! Mount references of Docker volumes on this host: which container mount IDs use which volume,
//! where it is mounted and on which device; and what Docker's Mount acquired here (the mapping,
//! the attachment) and has not released yet, so Docker releases only that. Kept on disk
//! (`<state_dir>/docker-mounts.json`) because Docker does not replay Mount after a daemon or
//! plugin restart; reconciled with `/proc/self/mountinfo` at start. Pure bookkeeping: no I/O
//! besides load and save.

use proto::VolumeId;
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

/// What Docker's own Mount acquired on this host for one volume (and so may release).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The volume this is about (a volume of the same name made later is another one); `None`
    /// only for entries upgraded from format 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeId>,
    /// Docker's Mount mapped the volume to this host (the MDM said it was not mapped here).
    pub mapped: bool,
    /// Docker's Mount attached it (it was not attached here before).
    pub attached: bool,
}

/// The format of [`Refs`] on disk: 0 had no [`Refs::held`].
pub const REFS_FORMAT: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refs {
    #[serde(default)]
    pub format: u32,
    pub volumes: BTreeMap<String, VolumeRefs>,
    /// Volumes whose mapping or attachment here Docker made; an entry outlives the mount
    /// references when a release was partial (kept for a later Unmount or Remove).
    #[serde(default)]
    pub held: BTreeMap<String, Held>,
}

impl Refs {
    /// Upgrades a table read from disk: format 0 released every mounted volume completely, so
    /// what it had mounted counts as mapped and attached by Docker.
    pub fn upgraded(mut self) -> Refs {
        if self.format == 0 {
            for name in self.volumes.keys() {
                self.held.insert(
                    name.clone(),
                    Held {
                        volume: None,
                        mapped: true,
                        attached: true,
                    },
                );
            }
        }
        self.format = REFS_FORMAT;
        self
    }

    /// What Docker holds here of volume `id`, named `name`.
    pub fn held(&self, name: &str, id: VolumeId) -> Held {
        match self.held.get(name) {
            Some(h) if h.volume.is_none_or(|v| v == id) => *h,
            _ => Held::default(),
        }
    }

    /// Records what Docker holds of volume `id`, named `name`; nothing held drops the entry.
    pub fn set_held(&mut self, name: &str, id: VolumeId, held: Held) {
        if !held.mapped && !held.attached {
            self.held.remove(name);
        } else {
            let volume = Some(id);
            self.held.insert(name.to_string(), Held { volume, ..held });
        }
    }

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

    #[test]
    fn held_entries_and_the_format_0_upgrade() {
        let old = r#"{"volumes":{"v":{"ids":["a"],"mountpoint":"/m/v","device":"/dev/loop0"}}}"#;
        let (v1, v2) = (VolumeId(1), VolumeId(2));
        let r: Refs = serde_json::from_str(old).expect("format 0 parses");
        assert_eq!(r.held("v", v1), Held::default());
        let mut r = r.upgraded();
        assert_eq!(r.format, REFS_FORMAT);
        // Format 0 knew no ids: whatever volume has the name.
        let all = Held {
            volume: None,
            mapped: true,
            attached: true,
        };
        assert_eq!(r.held("v", v1), all);
        r.set_held("v", v1, Held::default());
        assert!(r.held.is_empty());
        let mapped = Held {
            volume: None,
            mapped: true,
            attached: false,
        };
        r.set_held("w", v1, mapped);
        assert_eq!(r.held("w", v1).volume, Some(v1));
        assert!(r.held("w", v1).mapped);
        // Another volume of the same name holds nothing of the first one's.
        assert_eq!(r.held("w", v2), Held::default());
        // Upgrading again (format 1 on disk) keeps what was recorded.
        let back: Refs =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("parses");
        assert_eq!(back.clone().upgraded(), r);
        assert_eq!(back.held("w", v1), r.held("w", v1));
    }
}
