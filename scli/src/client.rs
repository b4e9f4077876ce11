//! Talking to the MDM leader: the certificate, the address list, and error messages in
//! ScaleIO's words.

use anyhow::{anyhow, Context};
use proto::client::{parse_addrs, MdmClient};
use proto::msg::{MdmRequest, MdmResponse};
use proto::transport::{Endpoint, Identity};
use proto::ErrorCode;
use std::path::PathBuf;
use std::time::Duration;

/// How long scli keeps trying while the cluster has no leader.
const DEADLINE: Duration = Duration::from_secs(12);
pub const DEFAULT_MDM_PORT: u16 = 7611;

fn cert_dir(flag: Option<&str>) -> PathBuf {
    if let Some(f) = flag {
        return PathBuf::from(f);
    }
    if let Some(d) = std::env::var_os("MESHBLOCK_CERT_DIR") {
        return PathBuf::from(d);
    }
    crate::session::home().join(".meshblock/certs")
}

pub async fn connect(mdm_ips: &str, cert_flag: Option<&str>) -> anyhow::Result<MdmClient> {
    let dir = cert_dir(cert_flag);
    let identity = Identity::load(&dir).map_err(|e| {
        anyhow!("{e}. scli needs a certificate of the cluster CA in {}: create one with `meshblock-ca csr --name admin --dir {}` and have the CA sign it (meshblock-ca sign), or set MESHBLOCK_CERT_DIR / --cert_dir", dir.display(), dir.display())
    })?;
    let addrs = parse_addrs(mdm_ips, DEFAULT_MDM_PORT).map_err(|e| anyhow!("{e}"))?;
    let ep = Endpoint::client(&identity, "scli").context("create the QUIC endpoint")?;
    Ok(MdmClient::new(ep, addrs))
}

/// Send a request; MDM refusals become `MDM failed command` errors.
pub async fn request(c: &MdmClient, req: &MdmRequest) -> anyhow::Result<MdmResponse> {
    match c.request(req, DEADLINE).await {
        Ok(r) => Ok(r),
        Err(e) if e.code == ErrorCode::Unauthenticated && e.message.contains("expired") => {
            Err(anyhow!("session expired, log in again with scli --login"))
        }
        Err(e) if e.code == ErrorCode::Unavailable => {
            Err(anyhow!("could not reach the MDM cluster: {}", e.message))
        }
        Err(e) => Err(anyhow!("MDM failed command.  Status: {}", e.message)),
    }
}
