//! The driver's access to the MDM: a login session (logging in lazily, again when the token
//! expires), commands, and the cluster map the SDC already follows. Owns the session token;
//! knows nothing of Docker.

use crate::io_path::IoPath;
use proto::client::MdmClient;
use proto::model::ClusterState;
use proto::msg::{Command, MdmRequest, MdmResponse};
use proto::{ErrorCode, WireError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long one MDM request may take before the driver gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Cluster {
    mdm: Arc<MdmClient>,
    io: Arc<IoPath>,
    username: String,
    password_file: PathBuf,
    token: tokio::sync::Mutex<Option<String>>,
}

impl Cluster {
    pub fn new(
        mdm: Arc<MdmClient>,
        io: Arc<IoPath>,
        username: String,
        password_file: PathBuf,
    ) -> Cluster {
        Cluster {
            mdm,
            io,
            username,
            password_file,
            token: tokio::sync::Mutex::new(None),
        }
    }

    async fn login(&self) -> Result<String, WireError> {
        let password = std::fs::read_to_string(&self.password_file).map_err(|e| {
            WireError::new(
                ErrorCode::Unauthenticated,
                format!(
                    "cannot read the plugin's MDM password file {}: {e}; set [docker] \
                     password_file in the SDC config",
                    self.password_file.display()
                ),
            )
        })?;
        let req = MdmRequest::Login {
            username: self.username.clone(),
            password: password.trim_end_matches(['\n', '\r']).to_string(),
        };
        match self.mdm.request(&req, REQUEST_TIMEOUT).await? {
            MdmResponse::Session { token, .. } => Ok(token),
            other => Err(WireError::new(
                ErrorCode::Internal,
                format!("unexpected answer to login: {other:?}"),
            )),
        }
    }

    /// Runs `command` as the plugin's user; logs in first, and again once if the token was
    /// refused (expired). Returns the MDM's message.
    pub async fn command(&self, command: Command) -> Result<String, WireError> {
        for attempt in 0..2 {
            let token = {
                let mut t = self.token.lock().await;
                match t.as_ref() {
                    Some(tok) if attempt == 0 => tok.clone(),
                    _ => {
                        let tok = self.login().await?;
                        *t = Some(tok.clone());
                        tok
                    }
                }
            };
            let req = MdmRequest::Command {
                token,
                command: command.clone(),
                expect: Vec::new(),
            };
            match self.mdm.request(&req, REQUEST_TIMEOUT).await {
                Ok(MdmResponse::Done { message, .. }) => {
                    self.io.refresh_map().await;
                    return Ok(message);
                }
                Ok(other) => {
                    return Err(WireError::new(
                        ErrorCode::Internal,
                        format!("unexpected answer: {other:?}"),
                    ))
                }
                Err(e) if e.code == ErrorCode::Unauthenticated && attempt == 0 => continue,
                Err(e) => return Err(e),
            }
        }
        Err(WireError::new(
            ErrorCode::Unauthenticated,
            "the MDM refused the plugin's login",
        ))
    }

    /// The newest map: asks the MDM, falls back to the one the SDC holds.
    pub async fn fresh_map(&self) -> Arc<ClusterState> {
        self.io.refresh_map().await;
        self.io.map()
    }

    /// The map the SDC holds (at most one poll period old), without asking the MDM.
    pub fn map(&self) -> Arc<ClusterState> {
        self.io.map()
    }
}
