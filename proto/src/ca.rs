//! The cluster certificate authority: created once with the cluster, it signs one certificate per
//! process (MDM, SDS, SDC, admin hosts running scli). Files live in a directory:
//! `ca.pem` (+ `ca.key` only where certificates are issued), `node.pem`, `node.key`.
//!
//! Every certificate carries the DNS name [`CLUSTER_SERVER_NAME`], which clients use as the TLS
//! server name, so addresses can change without reissuing certificates. The common name says who
//! the holder is (`mdm`, `sds:sds1`, `sdc:host1`, `admin`).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::fs;
use std::path::{Path, PathBuf};

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
