//! The exports a server offers, by name, changeable at runtime.
//!
//! Each export carries a close signal (a `watch` channel). Every connection that entered
//! transmission on the export holds a receiver; removing or replacing the export fires it, and
//! those connections stop reading requests, answer the ones in flight, and close. This module
//! does no I/O of its own.

use super::Backend;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::watch;

struct Entry<B> {
    backend: Arc<B>,
    closed: watch::Sender<bool>,
}

/// Named exports, all served by one backend type `B` (wrap different kinds of backend in an
/// enum that implements [`Backend`] to mix them).
///
/// The empty name selects the only export when there is exactly one (the NBD "default export").
pub struct ExportRegistry<B> {
    exports: Mutex<BTreeMap<String, Entry<B>>>,
}

/// The name this type had first; kept for callers.
pub type Registry<B> = ExportRegistry<B>;

/// An export a connection has opened: its canonical name, backend and close signal.
pub(crate) struct OpenExport<B> {
    pub name: String,
    pub backend: Arc<B>,
    pub closed: watch::Receiver<bool>,
}

impl<B> Default for ExportRegistry<B> {
    fn default() -> Self {
        ExportRegistry {
            exports: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<B: Backend> ExportRegistry<B> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A poisoned lock only means another thread panicked between two map operations, each of
    /// which leaves the map consistent, so the map is still usable.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry<B>>> {
        self.exports.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds an export, or replaces one of the same name (closing the old one's connections).
    pub fn add(&self, name: impl Into<String>, backend: Arc<B>) {
        let name = name.into();
        let (closed, _) = watch::channel(false);
        let old = self.lock().insert(name.clone(), Entry { backend, closed });
        match old {
            Some(old) => {
                old.closed.send_replace(true);
                tracing::info!(export = %name, "NBD export replaced");
            }
            None => tracing::info!(export = %name, "NBD export added"),
        }
    }

    /// Removes an export: new clients no longer see it, and its live connections finish their
    /// in-flight requests and close. Returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let Some(old) = self.lock().remove(name) else {
            return false;
        };
        old.closed.send_replace(true);
        tracing::info!(export = %name, "NBD export removed");
        true
    }

    /// The export names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Connections currently in transmission on the export (0 if there is no such export).
    pub fn connections(&self, name: &str) -> usize {
        self.lock()
            .get(name)
            .map_or(0, |e| e.closed.receiver_count())
    }

    /// Looks an export up by the name a client sent, resolving the default export.
    pub(crate) fn open(&self, name: &str) -> Option<OpenExport<B>> {
        let exports = self.lock();
        let (name, entry) = match exports.get_key_value(name) {
            Some(found) => found,
            None if name.is_empty() && exports.len() == 1 => exports.iter().next()?,
            None => return None,
        };
        Some(OpenExport {
            name: name.clone(),
            backend: entry.backend.clone(),
            closed: entry.closed.subscribe(),
        })
    }
}
