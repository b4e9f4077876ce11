//! `MetaStore`: the MDM's durable key-value store, behind a small trait so sled can be replaced
//! (the seam Garage used to drop sled). Keys are bytes in named trees; `flush` makes every
//! preceding write durable.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata store: {0}")]
    Sled(#[from] sled::Error),
}

/// A batch of writes applied atomically to one tree.
#[derive(Default)]
pub struct Batch {
    puts: Vec<(Vec<u8>, Vec<u8>)>,
    removes: Vec<Vec<u8>>,
}

impl Batch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.puts.push((key.into(), value.into()));
    }
    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.removes.push(key.into());
    }
}

/// Key-value pairs, in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

pub trait MetaStore: Send + Sync + 'static {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn apply(&self, tree: &str, batch: Batch) -> Result<(), StoreError>;
    /// Entries with keys in `[low, high)`, in key order.
    fn range(&self, tree: &str, low: &[u8], high: &[u8]) -> Result<Pairs, StoreError>;
    /// The largest key of a tree.
    fn last_key(&self, tree: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Remove keys in `[low, high)`.
    fn remove_range(&self, tree: &str, low: &[u8], high: &[u8]) -> Result<(), StoreError>;
    fn flush(&self) -> Result<(), StoreError>;
}

/// The sled implementation.
pub struct SledStore {
    db: sled::Db,
}

impl SledStore {
    pub fn open(path: &Path) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(SledStore { db })
    }
}

impl MetaStore for SledStore {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.open_tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }
    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.db.open_tree(tree)?.insert(key, value)?;
        Ok(())
    }
    fn apply(&self, tree: &str, batch: Batch) -> Result<(), StoreError> {
        let mut b = sled::Batch::default();
        for k in batch.removes {
            b.remove(k);
        }
        for (k, v) in batch.puts {
            b.insert(k, v);
        }
        self.db.open_tree(tree)?.apply_batch(b)?;
        Ok(())
    }
    fn range(&self, tree: &str, low: &[u8], high: &[u8]) -> Result<Pairs, StoreError> {
        let t = self.db.open_tree(tree)?;
        let mut out = Vec::new();
        for kv in t.range(low..high) {
            let (k, v) = kv?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
    fn last_key(&self, tree: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.open_tree(tree)?.last()?.map(|(k, _)| k.to_vec()))
    }
    fn remove_range(&self, tree: &str, low: &[u8], high: &[u8]) -> Result<(), StoreError> {
        let t = self.db.open_tree(tree)?;
        let mut b = sled::Batch::default();
        for kv in t.range(low..high) {
            let (k, _) = kv?;
            b.remove(k);
        }
        t.apply_batch(b)?;
        Ok(())
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The conformance suite every `MetaStore` must pass.
    pub fn conformance(s: &dyn MetaStore) {
        assert_eq!(s.get("t", b"a").expect("get"), None);
        s.put("t", b"a", b"1").expect("put");
        let mut b = Batch::default();
        b.put(b"b".to_vec(), b"2".to_vec());
        b.put(b"c".to_vec(), b"3".to_vec());
        s.apply("t", b).expect("batch");
        assert_eq!(s.get("t", b"b").expect("get"), Some(b"2".to_vec()));
        assert_eq!(s.range("t", b"a", b"c").expect("range").len(), 2);
        assert_eq!(s.last_key("t").expect("last"), Some(b"c".to_vec()));
        s.remove_range("t", b"a", b"c").expect("remove");
        assert_eq!(
            s.range("t", b"a", b"z").expect("range"),
            vec![(b"c".to_vec(), b"3".to_vec())]
        );
        assert_eq!(s.get("other", b"c").expect("get"), None);
        s.flush().expect("flush");
    }

    #[test]
    fn sled_conforms() {
        let dir = std::env::temp_dir().join(format!("mb-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        conformance(&SledStore::open(&dir).expect("open"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
