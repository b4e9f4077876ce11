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
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
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
pub const NODE_CSR_FILE: &str = "node.csr";

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
    #[error(
        "'{name}' is not a certificate name: {why}; use mdm, admin, sds:NAME or sdc:NAME \
         (also mdm:NAME, admin:NAME)"
    )]
    BadName { name: String, why: String },
    #[error("{path} is not a private key in PEM ({source}); move it away to make a new one")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("not a valid certificate signing request ({0}); make one with meshblock-ca csr")]
    BadCsr(#[source] rcgen::Error),
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

/// The parameters of every node certificate: the common name given, the cluster's server name,
/// signature and TLS client and server use. Nothing a CSR asks for beyond its common name and
/// key is taken over.
fn leaf_params(common_name: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// The CA in `ca_dir` as an issuer, and its certificate's PEM.
fn load_issuer(ca_dir: &Path) -> Result<(Issuer<'static, KeyPair>, String), CaError> {
    let ca_pem = read_file(&ca_dir.join(CA_CERT_FILE))?;
    let ca_key = KeyPair::from_pem(&read_file(&ca_dir.join(CA_KEY_FILE))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    Ok((issuer, ca_pem))
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::File {
        path: dir.to_owned(),
        source,
    })
}

/// Write `node.pem` and the CA's `ca.pem` into `out_dir`.
fn write_certificate(out_dir: &Path, cert_pem: &str, ca_pem: &str) -> Result<(), CaError> {
    create_dir(out_dir)?;
    write_file(&out_dir.join(NODE_CERT_FILE), cert_pem, false)?;
    write_file(&out_dir.join(CA_CERT_FILE), ca_pem, false)
}

/// Issue a certificate for `common_name`, signed by the CA in `ca_dir`, into `out_dir`
/// (`node.pem`, `node.key`, and a copy of `ca.pem`). The key is made here, beside the CA: for
/// labs and tests; hosts of a real cluster make their own key ([`make_csr`], [`sign_csr`]).
/// The name is not checked here (tests issue names that give no role on purpose): command
/// lines check it with [`check_common_name`] first.
pub fn issue(ca_dir: &Path, common_name: &str, out_dir: &Path) -> Result<(), CaError> {
    let (issuer, ca_pem) = load_issuer(ca_dir)?;
    let key = KeyPair::generate()?;
    let cert = leaf_params(common_name)?.signed_by(&key, &issuer)?;
    create_dir(out_dir)?;
    write_file(&out_dir.join(NODE_KEY_FILE), &key.serialize_pem(), true)?;
    write_certificate(out_dir, &cert.pem(), &ca_pem)
}

/// Characters allowed in the name part of a common name (`sds:NAME`): what scli accepts in
/// object names, and nothing a shell, a path or a TLS name could misread.
fn name_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Longest name part of a common name (X.509 limits a common name to 64 characters).
pub const MAX_NAME_LEN: usize = 59;

/// Check that `common_name` gives a role ([`CertRole::of`]) and a sane name: `mdm`, `admin`,
/// `mdm:NAME`, `admin:NAME`, `sds:NAME` or `sdc:NAME`, NAME of letters, digits, `-`, `_`, `.`.
pub fn check_common_name(common_name: &str) -> Result<CertRole, CaError> {
    let bad = |why: &str| CaError::BadName {
        name: common_name.to_string(),
        why: why.to_string(),
    };
    let Some((role, name)) = CertRole::of(common_name) else {
        return Err(bad("it gives no role"));
    };
    if common_name.contains(':') && name.is_empty() {
        return Err(bad("the name after ':' is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(&format!(
            "the name is longer than {MAX_NAME_LEN} characters"
        )));
    }
    if !name.chars().all(name_char_ok) {
        return Err(bad(
            "the name may hold only letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(role)
}

/// What [`make_csr`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsrOutcome {
    /// A new key and a request for it.
    NewKey,
    /// The key in the directory was kept; a request for it was written.
    KeptKey,
    /// The key and a request for it with this common name were there already: nothing changed.
    Unchanged,
}

/// Make this host's key (`node.key`, mode 0600) and a signing request for `common_name`
/// (`node.csr`) in `dir`. An existing key is never replaced: the request is made for it, and
/// a request already there for that key and name is left as it is.
pub fn make_csr(common_name: &str, dir: &Path) -> Result<CsrOutcome, CaError> {
    check_common_name(common_name)?;
    let key_path = dir.join(NODE_KEY_FILE);
    let csr_path = dir.join(NODE_CSR_FILE);
    let (key, outcome) = match fs::read_to_string(&key_path) {
        Ok(pem) => {
            let key = KeyPair::from_pem(&pem).map_err(|source| CaError::BadKey {
                path: key_path.clone(),
                source,
            })?;
            (key, CsrOutcome::KeptKey)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            (KeyPair::generate()?, CsrOutcome::NewKey)
        }
        Err(source) => {
            return Err(CaError::File {
                path: key_path,
                source,
            })
        }
    };
    if outcome == CsrOutcome::KeptKey {
        if let Ok(old) = fs::read_to_string(&csr_path) {
            if let Ok(req) = read_csr(&old) {
                if req.common_name == common_name
                    && req.params.public_key.der_bytes() == key.der_bytes()
                {
                    return Ok(CsrOutcome::Unchanged);
                }
            }
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params.serialize_request(&key)?;
    create_dir(dir)?;
    if outcome == CsrOutcome::NewKey {
        write_file(&key_path, &key.serialize_pem(), true)?;
    }
    write_file(&csr_path, &csr.pem()?, false)?;
    Ok(outcome)
}

/// A signing request whose signature checked out, and its common name.
struct Csr {
    params: CertificateSigningRequestParams,
    common_name: String,
}

fn read_csr(pem: &str) -> Result<Csr, CaError> {
    let params = CertificateSigningRequestParams::from_pem(pem).map_err(CaError::BadCsr)?;
    let common_name = match params.params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(s)) => s.clone(),
        Some(DnValue::PrintableString(s)) => s.as_str().to_string(),
        Some(DnValue::Ia5String(s)) => s.as_str().to_string(),
        _ => {
            return Err(CaError::BadName {
                name: String::new(),
                why: "the request has no common name (make it with meshblock-ca csr)".into(),
            })
        }
    };
    Ok(Csr {
        params,
        common_name,
    })
}

/// Sign the request in `csr_path` with the CA in `ca_dir`: `node.pem` and `ca.pem` go to
/// `out_dir`. Refuses a request whose signature does not check out or whose common name gives
/// no role ([`check_common_name`]); of the request only the common name and the public key are
/// used. Returns the common name signed.
pub fn sign_csr(ca_dir: &Path, csr_path: &Path, out_dir: &Path) -> Result<String, CaError> {
    let csr = read_csr(&read_file(csr_path)?)?;
    check_common_name(&csr.common_name)?;
    let (issuer, ca_pem) = load_issuer(ca_dir)?;
    let cert = leaf_params(&csr.common_name)?.signed_by(&csr.params.public_key, &issuer)?;
    write_certificate(out_dir, &cert.pem(), &ca_pem)?;
    Ok(csr.common_name)
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
    use super::*;

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!(
                "mb-ca-{name}-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            fs::create_dir_all(&p).expect("scratch dir");
            Scratch(p)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn a_host_key_never_leaves_and_the_ca_signs_only_role_names() {
        let d = Scratch::new("csr");
        let (ca, host, out) = (d.0.join("ca"), d.0.join("host"), d.0.join("out"));
        init_ca(&ca, "t").expect("init");
        assert_eq!(mode(&ca.join(CA_KEY_FILE)), 0o600);
        assert_eq!(
            make_csr("sds:sds1", &host).expect("csr"),
            CsrOutcome::NewKey
        );
        assert_eq!(mode(&host.join(NODE_KEY_FILE)), 0o600);
        let key = fs::read_to_string(host.join(NODE_KEY_FILE)).expect("key");
        // Again: nothing changes; another name keeps the key.
        assert_eq!(
            make_csr("sds:sds1", &host).expect("csr"),
            CsrOutcome::Unchanged
        );
        assert_eq!(
            make_csr("sds:other", &host).expect("csr"),
            CsrOutcome::KeptKey
        );
        assert_eq!(
            fs::read_to_string(host.join(NODE_KEY_FILE)).expect("key"),
            key
        );
        let cn = sign_csr(&ca, &host.join(NODE_CSR_FILE), &out).expect("sign");
        assert_eq!(cn, "sds:other");
        assert!(
            !out.join(NODE_KEY_FILE).exists(),
            "the signer never sees a key"
        );
        assert_eq!(
            fs::read_to_string(out.join(CA_CERT_FILE)).expect("ca"),
            fs::read_to_string(ca.join(CA_CERT_FILE)).expect("ca")
        );
        // The certificate is for the host's key: the pair loads as an identity.
        fs::copy(out.join(NODE_CERT_FILE), host.join(NODE_CERT_FILE)).expect("copy");
        fs::copy(out.join(CA_CERT_FILE), host.join(CA_CERT_FILE)).expect("copy");
        crate::transport::Identity::load(&host).expect("the signed pair loads");

        // A request whose name gives no role is refused; so is a tampered one.
        let params = |cn: &str| {
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name.push(DnType::CommonName, cn);
            p
        };
        let k = KeyPair::generate().expect("key");
        let bad = d.0.join("bad.csr");
        for cn in ["sds", "sdc:", "server", "sds:a/b", "sdc:x y"] {
            let csr = params(cn).serialize_request(&k).expect("csr");
            fs::write(&bad, csr.pem().expect("pem")).expect("write");
            let e = sign_csr(&ca, &bad, &d.0.join("no")).expect_err(cn);
            assert!(matches!(e, CaError::BadName { .. }), "{cn}: {e}");
        }
        let csr = params("sdc:h1").serialize_request(&k).expect("csr");
        // Change one base64 character in the signature (the body's second-last line).
        let text = csr.pem().expect("pem");
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let i = lines.len() - 3;
        let c = lines[i].remove(5);
        lines[i].insert(5, if c == 'A' { 'B' } else { 'A' });
        fs::write(&bad, lines.join("\n")).expect("write");
        let e = sign_csr(&ca, &bad, &d.0.join("no")).expect_err("tampered");
        assert!(matches!(e, CaError::BadCsr(_)), "{e}");
        assert!(!d.0.join("no").exists(), "a refusal writes nothing");
        // A key file that is not a key is not replaced.
        fs::write(host.join(NODE_KEY_FILE), "junk").expect("write");
        assert!(matches!(
            make_csr("sds:sds1", &host),
            Err(CaError::BadKey { .. })
        ));
        assert_eq!(
            fs::read_to_string(host.join(NODE_KEY_FILE)).expect("key"),
            "junk"
        );
    }

    #[test]
    fn names_are_checked() {
        for ok in [
            "mdm",
            "admin",
            "mdm:m1",
            "admin:ops",
            "sds:sds-1",
            "sdc:host_1.a",
        ] {
            assert!(check_common_name(ok).is_ok(), "{ok}");
        }
        let long = format!("sds:{}", "a".repeat(MAX_NAME_LEN + 1));
        for bad in [
            "",
            "sds",
            "sdc",
            "mdm:",
            "root",
            "sds:a:b",
            "sds:é",
            long.as_str(),
        ] {
            assert!(check_common_name(bad).is_err(), "{bad}");
        }
    }

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
