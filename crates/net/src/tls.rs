//! TLS and mutual TLS for the network transports, on rustls with the ring
//! provider.
//!
//! Every node has one certificate, used both to serve and (with mTLS) to
//! dial. Peers are verified against `ca_pem`. With `require_client_auth`,
//! a dialer without a certificate signed by that CA is refused during the
//! handshake.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// TLS settings of a node. All PEM.
#[derive(Clone)]
pub struct TlsConfig {
    /// CA certificates that sign every member's certificate.
    pub ca_pem: Vec<u8>,
    /// This node's certificate chain (leaf first).
    pub cert_pem: Vec<u8>,
    /// This node's private key.
    pub key_pem: Vec<u8>,
    /// Refuse peers that do not present a certificate signed by the CA
    /// (mutual TLS). Default in [`TlsConfig::new`]: true.
    pub require_client_auth: bool,
    /// Name to verify in peers' certificates instead of the host part of
    /// their address (for addresses that are IPs while certificates name
    /// hosts). Default: none.
    pub server_name: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("require_client_auth", &self.require_client_auth)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Mutual TLS with these PEM blobs.
    pub fn new(
        ca_pem: impl Into<Vec<u8>>,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            ca_pem: ca_pem.into(),
            cert_pem: cert_pem.into(),
            key_pem: key_pem.into(),
            require_client_auth: true,
            server_name: None,
        }
    }
}

/// Why a TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("TLS configuration: {0}")]
pub struct TlsConfigError(pub String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsConfigError(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(TlsConfigError(format!("{what}: no certificate in the PEM")));
    }
    Ok(certs)
}

fn roots(pem: &[u8]) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for c in certs(pem, "CA")? {
        roots
            .add(c)
            .map_err(|e| TlsConfigError(format!("CA: {e}")))?;
    }
    Ok(roots)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsConfigError(format!("private key: {e}")))
}

/// The rustls configurations built from a [`TlsConfig`].
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
    pub(crate) server_name: Option<String>,
}

impl Tls {
    pub(crate) fn new(c: &TlsConfig) -> Result<Self, TlsConfigError> {
        let roots = Arc::new(roots(&c.ca_pem)?);
        let chain = certs(&c.cert_pem, "certificate")?;
        let verifier = if c.require_client_auth {
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| TlsConfigError(format!("client verifier: {e}")))?
        } else {
            WebPkiClientVerifier::no_client_auth()
        };
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key(&c.key_pem)?)
            .map_err(|e| TlsConfigError(format!("certificate and key: {e}")))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key(&c.key_pem)?)
            .map_err(|e| TlsConfigError(format!("certificate and key: {e}")))?;
        Ok(Self {
            server: Arc::new(server),
            client: Arc::new(client),
            server_name: c.server_name.clone(),
        })
    }

    /// The name to verify for a peer at `addr` (`host:port`).
    pub(crate) fn name_for(&self, addr: &str) -> std::io::Result<ServerName<'static>> {
        let host = match &self.server_name {
            Some(n) => n.clone(),
            None => addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .unwrap_or_else(|| addr.to_string()),
        };
        ServerName::try_from(host)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    }
}
