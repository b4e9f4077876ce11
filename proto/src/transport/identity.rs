//! A process's TLS identity ([`Identity`]): its certificate and key from a certificate
//! directory, the cluster CA it trusts, and the TLS configurations built from them: mutual TLS
//! 1.3 for QUIC (both sides), and the server side of HTTPS for the MDM's API and dashboard.

use super::{transport_config, TransportError, ALPN};
use crate::ca::{CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// A process's identity: its certificate and key, and the cluster CA it trusts.
#[derive(Clone)]
pub struct Identity {
    certs: Vec<CertificateDer<'static>>,
    pub(super) key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<rustls::RootCertStore>,
}

impl Identity {
    /// Load `node.pem`, `node.key` and `ca.pem` from a certificate directory.
    pub fn load(dir: &Path) -> Result<Identity, TransportError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => TransportError::MissingIdentity { path },
                _ => TransportError::File { path, source },
            })
        };
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read(NODE_CERT_FILE)?)
                .collect::<Result<_, _>>()
                .map_err(|e| TransportError::Tls(format!("parse {NODE_CERT_FILE}: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&read(NODE_KEY_FILE)?)
            .map_err(|e| TransportError::Tls(format!("parse {NODE_KEY_FILE}: {e}")))?;
        if certs.is_empty() {
            return Err(TransportError::NoIdentity(dir.to_owned()));
        }
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&read(CA_CERT_FILE)?) {
            let ca = ca.map_err(|e| TransportError::Tls(format!("parse {CA_CERT_FILE}: {e}")))?;
            roots
                .add(ca)
                .map_err(|e| TransportError::Tls(format!("add CA: {e}")))?;
        }
        Ok(Identity {
            certs,
            key: Arc::new(key),
            roots: Arc::new(roots),
        })
    }

    /// ring's TLS 1.3 suites, AES-128-GCM first: it takes 10 AES rounds where AES-256 takes 14,
    /// and every byte of block data is sealed and opened once per hop (about a tenth of the
    /// daemons' CPU at 1 MiB writes). Both sides prefer it, so it is what they agree on.
    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        use rustls::crypto::ring::cipher_suite;
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        Arc::new(p)
    }

    pub(super) fn server_config(&self) -> Result<quinn::ServerConfig, TransportError> {
        let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
        let cfg = self.rustls_server()?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(cfg).map_err(|e| tls(&e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport_config());
        Ok(server)
    }

    /// The TLS 1.3 server side: our certificate, and client certificates the CA signed.
    pub(super) fn rustls_server(&self) -> Result<rustls::ServerConfig, TransportError> {
        let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            Self::provider(),
        )
        .build()
        .map_err(|e| tls(&e))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(|e| tls(&e))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// The TLS server side of HTTPS (the MDM's REST API and dashboard): this identity's
    /// certificate, no client certificate asked (users log in with a password and carry a
    /// session token), TLS 1.2 and 1.3 for browsers and curl, ALPN `http/1.1`.
    pub fn https_server_config(&self) -> Result<rustls::ServerConfig, TransportError> {
        let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_no_client_auth()
        .with_single_cert(self.certs.clone(), self.key.clone_key())
        .map_err(|e| tls(&e))?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }

    pub(super) fn client_config(&self) -> Result<quinn::ClientConfig, TransportError> {
        let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
        let cfg = self.rustls_client()?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).map_err(|e| tls(&e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(transport_config());
        Ok(client)
    }

    /// The TLS 1.3 client side: our certificate, and servers the CA signed.
    pub(super) fn rustls_client(&self) -> Result<rustls::ClientConfig, TransportError> {
        let tls = |e: &dyn std::fmt::Display| TransportError::Tls(e.to_string());
        let mut cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls(&e))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .map_err(|e| tls(&e))?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}
