//! The SDC's local admin socket (`<state_dir>/admin.sock`, root only): `sdc attach`, `sdc detach`
//! and `sdc list` talk to the running daemon through it, one JSON request and one JSON answer
//! per line. Owns that protocol, its server and its client; the work is the [`Attacher`]'s.

use crate::attach::Attacher;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Longest request line accepted.
const LINE_MAX: u64 = 4096;
/// How long the client waits for the daemon (attaching may wait for the map).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    Attach { volume: String },
    Detach { volume: String, force: bool },
    List,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct AdminResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached: Vec<(String, PathBuf)>,
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.sock")
}

/// Serve the admin socket until the process ends.
pub async fn serve(state_dir: &Path, attacher: Arc<Attacher>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (sock, _) = listener.accept().await?;
        let attacher = attacher.clone();
        tokio::spawn(async move {
            let (r, mut w) = sock.into_split();
            let mut line = String::new();
            let mut r = BufReader::new(tokio::io::AsyncReadExt::take(r, LINE_MAX));
            if r.read_line(&mut line).await.is_err() {
                return;
            }
            let resp = match serde_json::from_str::<AdminRequest>(&line) {
                Ok(req) => handle(&attacher, req).await,
                Err(e) => AdminResponse {
                    error: Some(format!("malformed admin request: {e}")),
                    ..Default::default()
                },
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_default();
            out.push(b'\n');
            let _ = w.write_all(&out).await;
        });
    }
}

async fn handle(a: &Attacher, req: AdminRequest) -> AdminResponse {
    let mut resp = AdminResponse::default();
    match req {
        AdminRequest::Attach { volume } => match a.attach(&volume).await {
            Ok(d) => resp.device = Some(d),
            Err(e) => resp.error = Some(e.to_string()),
        },
        AdminRequest::Detach { volume, force } => {
            if let Err(e) = a.detach(&volume, force).await {
                resp.error = Some(e.to_string());
            }
        }
        AdminRequest::List => resp.attached = a.list().await,
    }
    resp
}

/// Send one request to the daemon whose state directory is `state_dir`.
pub fn call(state_dir: &Path, req: &AdminRequest) -> anyhow::Result<AdminResponse> {
    use anyhow::Context;
    use std::io::{BufRead, Write};
    let path = socket_path(state_dir);
    let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "connect to the SDC at {} (is `sdc run` running with this state directory?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line).context("send the request")?;
    let mut answer = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut answer)
        .context("read the SDC's answer")?;
    serde_json::from_str(&answer).context("decode the SDC's answer")
}
