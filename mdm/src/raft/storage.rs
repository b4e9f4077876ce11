//! `raft::Storage` on the [`MetaStore`](crate::store::MetaStore): the log, the hard state, the
//! conf state and the last snapshot, all durable once [`RaftStorage::persist`] returns.
//!
//! Layout: tree `raft_log` maps a big-endian index to a protobuf `Entry`; tree `raft_meta` holds
//! `hard_state`, `conf_state` and `snapshot` (metadata and data of the last compaction point).

use crate::store::{Batch, MetaStore, StoreError};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::sync::Arc;

const LOG: &str = "raft_log";
const META: &str = "raft_meta";
const KEY_HS: &[u8] = b"hard_state";
const KEY_CS: &[u8] = b"conf_state";
const KEY_SNAP: &[u8] = b"snapshot";

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn store_err(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

fn decode_err(e: protobuf::ProtobufError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

pub struct RaftStorage {
    store: Arc<dyn MetaStore>,
    hs: HardState,
    cs: ConfState,
    snap_index: u64,
    snap_term: u64,
    last_index: u64,
    /// Produces a snapshot of the applied state on demand: (index, term, conf state, data).
    snapshot_source: Option<Box<dyn Fn() -> Option<Snapshot> + Send>>,
}

impl RaftStorage {
    pub fn open(store: Arc<dyn MetaStore>) -> Result<RaftStorage, raft::Error> {
        let hs = match store.get(META, KEY_HS).map_err(store_err)? {
            Some(b) => HardState::parse_from_bytes(&b).map_err(decode_err)?,
            None => HardState::default(),
        };
        let cs = match store.get(META, KEY_CS).map_err(store_err)? {
            Some(b) => ConfState::parse_from_bytes(&b).map_err(decode_err)?,
            None => ConfState::default(),
        };
        let (snap_index, snap_term) = match Self::load_snapshot(&*store)? {
            Some(s) => (s.get_metadata().index, s.get_metadata().term),
            None => (0, 0),
        };
        let last_index = match store.last_key(LOG).map_err(store_err)? {
            Some(k) if k.len() == 8 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(&k);
                u64::from_be_bytes(a).max(snap_index)
            }
            _ => snap_index,
        };
        Ok(RaftStorage {
            store,
            hs,
            cs,
            snap_index,
            snap_term,
            last_index,
            snapshot_source: None,
        })
    }

    fn load_snapshot(store: &dyn MetaStore) -> Result<Option<Snapshot>, raft::Error> {
        match store.get(META, KEY_SNAP).map_err(store_err)? {
            Some(b) => Ok(Some(Snapshot::parse_from_bytes(&b).map_err(decode_err)?)),
            None => Ok(None),
        }
    }

    /// The snapshot the state machine restarts from, if the log was ever compacted.
    pub fn stored_snapshot(&self) -> Result<Option<Snapshot>, raft::Error> {
        Self::load_snapshot(&*self.store)
    }

    pub fn set_snapshot_source(&mut self, f: Box<dyn Fn() -> Option<Snapshot> + Send>) {
        self.snapshot_source = Some(f);
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hs
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.cs
    }

    /// Bootstrap a brand-new single-voter cluster: an initial snapshot at index 1 carries the
    /// conf state, so members added later learn the first voter from it (through the snapshot
    /// the leader sends them) rather than never hearing of it.
    pub fn initialize(&mut self, voter: u64) -> Result<(), raft::Error> {
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = vec![voter];
        self.apply_snapshot(&snap)
    }

    /// Append entries (truncating any conflicting suffix) and store the hard state, then make it
    /// durable. Messages that depend on these writes may leave only after this returns.
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
    ) -> Result<(), raft::Error> {
        let mut batch = Batch::default();
        if let Some(first) = entries.first() {
            // Entries after the new suffix's start are replaced.
            if first.index <= self.last_index {
                self.store
                    .remove_range(LOG, &key(first.index), &key(u64::MAX))
                    .map_err(store_err)?;
            }
            for e in entries {
                batch.put(
                    key(e.index).to_vec(),
                    e.write_to_bytes().map_err(decode_err)?,
                );
            }
            self.last_index = entries.last().map(|e| e.index).unwrap_or(self.last_index);
        }
        self.store.apply(LOG, batch).map_err(store_err)?;
        if let Some(hs) = hs {
            self.hs = hs.clone();
            self.store
                .put(META, KEY_HS, &hs.write_to_bytes().map_err(decode_err)?)
                .map_err(store_err)?;
        }
        self.store.flush().map_err(store_err)
    }

    pub fn set_commit(&mut self, commit: u64) -> Result<(), raft::Error> {
        let mut hs = self.hs.clone();
        hs.commit = commit;
        self.persist(&[], Some(&hs))
    }

    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), raft::Error> {
        self.store
            .put(META, KEY_CS, &cs.write_to_bytes().map_err(decode_err)?)
            .map_err(store_err)?;
        self.cs = cs;
        Ok(())
    }

    /// Install a snapshot received from the leader: the log before it is discarded.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), raft::Error> {
        let meta = snap.get_metadata();
        self.store
            .put(META, KEY_SNAP, &snap.write_to_bytes().map_err(decode_err)?)
            .map_err(store_err)?;
        self.store
            .remove_range(LOG, &key(0), &key(u64::MAX))
            .map_err(store_err)?;
        self.snap_index = meta.index;
        self.snap_term = meta.term;
        self.last_index = meta.index;
        self.set_conf_state(meta.get_conf_state().clone())?;
        let mut hs = self.hs.clone();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.persist(&[], Some(&hs))
    }

    /// Record `snap` (state at its index, already applied) and drop the log up to its index.
    pub fn compact(&mut self, snap: &Snapshot) -> Result<(), raft::Error> {
        let idx = snap.get_metadata().index;
        if idx <= self.snap_index {
            return Ok(());
        }
        self.store
            .put(META, KEY_SNAP, &snap.write_to_bytes().map_err(decode_err)?)
            .map_err(store_err)?;
        self.store
            .remove_range(LOG, &key(0), &key(idx + 1))
            .map_err(store_err)?;
        self.snap_index = idx;
        self.snap_term = snap.get_metadata().term;
        self.last_index = self.last_index.max(idx);
        self.store.flush().map_err(store_err)
    }

    fn entry(&self, index: u64) -> Result<Entry, raft::Error> {
        match self.store.get(LOG, &key(index)).map_err(store_err)? {
            Some(b) => Entry::parse_from_bytes(&b).map_err(decode_err),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hs.clone(), self.cs.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut size = 0u64;
        for (_, v) in self
            .store
            .range(LOG, &key(low), &key(high))
            .map_err(store_err)?
        {
            let e = Entry::parse_from_bytes(&v).map_err(decode_err)?;
            size += u64::from(e.compute_size());
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap_index {
            return Ok(self.snap_term);
        }
        if idx < self.snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.snap_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let fresh = self.snapshot_source.as_ref().and_then(|f| f());
        match fresh {
            Some(s) if s.get_metadata().index >= request_index => Ok(s),
            _ => Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            )),
        }
    }
}
