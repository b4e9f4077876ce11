//! Small JSON state files in the SDC's state directory (attachments, Docker mount references):
//! written atomically (temporary file, fsync, rename, fsync of the directory) so a crash leaves
//! the old or the new content, never a torn one.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// Why a state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid state ({source}); move it away to start afresh")]
    Corrupt {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Reads `path`, or the default value when it does not exist.
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T, PersistError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|source| PersistError::Corrupt {
            path: path.display().to_string(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(PersistError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Replaces `path` with `value` atomically and durably.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), PersistError> {
    let err = |source| PersistError::Write {
        path: path.display().to_string(),
        source,
    };
    let body = serde_json::to_vec_pretty(value).map_err(|e| err(std::io::Error::other(e)))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&body).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}
