//! The login session: a token from `--login`, kept in `$MESHBLOCK_SCLI_SESSION` or
//! `~/.meshblock/scli-session.json` (mode 0600) with the MDM addresses it came from.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Serialize, Deserialize)]
pub struct Session {
    pub username: String,
    pub role: String,
    pub token: String,
    pub expires_unix: u64,
    pub mdm_ips: String,
}

pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHBLOCK_SCLI_SESSION") {
        return PathBuf::from(p);
    }
    home().join(".meshblock/scli-session.json")
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

pub fn save(s: &Session) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = path();
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // Write a private temporary file and rename it over the old one: atomic, and the session
    // is 0600 even when an older file had looser permissions.
    let tmp = p.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("write {}", tmp.display()))?;
    f.write_all(serde_json::to_string_pretty(s)?.as_bytes())
        .with_context(|| format!("write {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("replace {}", p.display()))
}

/// The saved session, refusing an expired one.
pub fn load() -> anyhow::Result<Session> {
    let p = path();
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(_) => {
            bail!("not logged in: run scli --login --username USER --mdm_ip IP (password from --password_file FILE, MESHBLOCK_PASSWORD or the terminal)")
        }
    };
    let s: Session = serde_json::from_str(&text)
        .with_context(|| format!("read the session in {}; log in again", p.display()))?;
    if s.expires_unix <= proto::clock::now_unix() {
        bail!("session expired, log in again with scli --login");
    }
    Ok(s)
}

pub fn remove() -> anyhow::Result<()> {
    match std::fs::remove_file(path()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).context("remove the session file"),
    }
}
