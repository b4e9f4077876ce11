//! The cluster certificate authority: created once with the cluster, it signs one certificate per
//! process (MDM, SDS, SDC, admin hosts running scli). Files live in a directory:
//! `ca.pem` (+ `ca.key` only where certificates are issued), `node.pem`, `node.key`.
//!
//! Every certificate carries the DNS name [`CLUSTER_SERVER_NAME`], which clients use as the TLS
//! server name, so addresses can change without reissuing certificates. The common name says who
//! the holder is (`mdm`, `sds:sds1`, `sdc:host1`, `admin`): [`CertRole::of`] reads it, and every
//! daemon decides from that role which requests a peer may send (see ARCHITECTURE.md, "Who may
//! send what").

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::fs;
use std::path::{Path, PathBuf};

/// What a certificate's holder is, by its common name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CertRole {
    /// `mdm` (or `mdm:NAME`): a metadata manager.
    Mdm,
    /// `sds:NAME`: the data server scli added as NAME.
    Sds,
    /// `sdc:NAME`: the client host that registers as NAME.
    Sdc,
    /// `admin` (or `admin:NAME`): a host running scli.
    Admin,
}

impl CertRole {
    /// Every role, for tables and tests.
    pub const ALL: [CertRole; 4] = [CertRole::Mdm, CertRole::Sds, CertRole::Sdc, CertRole::Admin];

    /// The role and the name part (after the colon; empty for a bare `mdm` or `admin`) of a
    /// certificate common name, or `None` for a name that gives no role (an SDS or SDC
    /// certificate must name its holder).
    pub fn of(common_name: &str) -> Option<(CertRole, &str)> {
        let (prefix, name) = match common_name.split_once(':') {
            Some((p, n)) => (p, n),
            None => (common_name, ""),
        };
        let role = match prefix {
            "mdm" => CertRole::Mdm,
            "admin" => CertRole::Admin,
            "sds" if !name.is_empty() => CertRole::Sds,
            "sdc" if !name.is_empty() => CertRole::Sdc,
            _ => return None,
        };
        Some((role, name))
    }
}

impl std::fmt::Display for CertRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertRole::Mdm => "MDM",
            CertRole::Sds => "SDS",
            CertRole::Sdc => "SDC",
            CertRole::Admin => "admin",
        })
    }
}

/// The refusal of a request whose sender's certificate role may not send it: names the
/// certificate, its role, the request and who may send it.
pub fn forbidden(common_name: &str, request: &str, allowed: &[CertRole]) -> crate::WireError {
    let role = CertRole::of(common_name).map_or("no role".to_string(), |(r, _)| r.to_string());
    let who: Vec<String> = allowed.iter().map(|r| r.to_string()).collect();
    let who = if who.is_empty() {
        "nobody".to_string()
    } else {
        who.join(", ")
    };
    crate::WireError::new(
        crate::ErrorCode::PermissionDenied,
        format!(
            "certificate '{common_name}' ({role}) may not send {request}; only {who} certificates may"
        ),
    )
}

/// The TLS server name every Meshblock certificate is valid for.
pub const CLUSTER_SERVER_NAME: &str = "meshblock";

/// File names inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
pub const NODE_CERT_FILE: &str = "node.pem";
pub const NODE_KEY_FILE: &str = "node.key";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a cluster CA exists already in {0}; refusing to overwrite it")]
    Exists(PathBuf),
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|source| CaError::File {
        path: path.to_owned(),
        source,
    })?;
    f.write_all(contents.as_bytes())
        .map_err(|source| CaError::File {
            path: path.to_owned(),
            source,
        })
}

fn read_file(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::File {
        path: path.to_owned(),
        source,
    })
}

/// Create a new cluster CA in `dir` (`ca.pem`, `ca.key`). Refuses to overwrite an existing one.
pub fn init_ca(dir: &Path, cluster_name: &str) -> Result<(), CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    if cert_path.exists() {
        return Err(CaError::Exists(dir.to_owned()));
    }
    fs::create_dir_all(dir).map_err(|source| CaError::File {
        path: dir.to_owned(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let params = ca_params(cluster_name)?;
    let cert = params.self_signed(&key)?;
    write_file(&dir.join(CA_KEY_FILE), &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(())
}

fn ca_params(cluster_name: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("Meshblock CA {cluster_name}"));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Issue a certificate for `common_name`, signed by the CA in `ca_dir`, into `out_dir`
/// (`node.pem`, `node.key`, and a copy of `ca.pem`).
pub fn issue(ca_dir: &Path, common_name: &str, out_dir: &Path) -> Result<(), CaError> {
    let ca_pem = read_file(&ca_dir.join(CA_CERT_FILE))?;
    let ca_key = KeyPair::from_pem(&read_file(&ca_dir.join(CA_KEY_FILE))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer)?;
    fs::create_dir_all(out_dir).map_err(|source| CaError::File {
        path: out_dir.to_owned(),
        source,
    })?;
    write_file(&out_dir.join(NODE_KEY_FILE), &key.serialize_pem(), true)?;
    write_file(&out_dir.join(NODE_CERT_FILE), &cert.pem(), false)?;
    write_file(&out_dir.join(CA_CERT_FILE), &ca_pem, false)?;
    Ok(())
}

/// A self-signed CA and a certificate from it, in `dir`: for tests that need a peer the cluster
/// CA did not sign.
pub fn make_rogue_identity(dir: &Path, common_name: &str) -> Result<(), CaError> {
    let rogue_ca = dir.join("rogue-ca");
    init_ca(&rogue_ca, "rogue")?;
    issue(&rogue_ca, common_name, dir)
}

#[cfg(test)]
mod tests {
    use super::CertRole;

    #[test]
    fn common_names_give_roles() {
        let cases = [
            ("mdm", Some((CertRole::Mdm, ""))),
            ("mdm:mdm2", Some((CertRole::Mdm, "mdm2"))),
            ("admin", Some((CertRole::Admin, ""))),
            ("sds:sds1", Some((CertRole::Sds, "sds1"))),
            ("sdc:host1", Some((CertRole::Sdc, "host1"))),
            ("sds", None),
            ("sdc:", None),
            ("sdc", None),
            ("", None),
            ("server", None),
            ("SDS:x", None),
        ];
        for (cn, want) in cases {
            assert_eq!(CertRole::of(cn), want, "{cn}");
        }
    }

    #[test]
    fn a_refusal_names_the_certificate_role_and_request() {
        let e = super::forbidden("sdc:h1", "ReadLocal", &[CertRole::Sds]);
        assert_eq!(e.code, crate::ErrorCode::PermissionDenied);
        assert_eq!(
            e.message,
            "certificate 'sdc:h1' (SDC) may not send ReadLocal; only SDS certificates may"
        );
    }
}
