//! TLS and mutual TLS for the network transports, on rustls with the ring
//! provider.
//!
//! Every node has one certificate, used both to serve and (with mTLS) to
//! dial. Peers are verified against `ca_pem`. With `require_client_auth`,
//! a dialer without a certificate signed by that CA is refused during the
//! handshake.
//!
//! With [`TlsConfig::node_names`], a certificate is also bound to a node:
//! node `id`'s certificate must be valid for the DNS name `node_names(id)`.
//! An accepted connection whose hello claims node `id` is refused unless its
//! client certificate is for that name (so one member's certificate cannot
//! speak for another), and a dialer checks that the peer it reached holds
//! the certificate of the node it meant to reach.

use std::sync::Arc;

use raftwork_transport::NodeId;

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
    /// hosts). Ignored when `node_names` is set. Default: none.
    pub server_name: Option<String>,
    /// The DNS name node `id`'s certificate is issued for (`None`: not a
    /// node this one knows, refused). When set, every peer's certificate must
    /// name the node it claims to be, both ways (see the module docs); needs
    /// `require_client_auth`. Default: none (any certificate the CA signed
    /// may claim any node id).
    pub node_names: Option<NodeNames>,
}

/// Maps a node id to the DNS name its certificate is issued for.
pub type NodeNames = Arc<dyn Fn(NodeId) -> Option<String> + Send + Sync>;

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("require_client_auth", &self.require_client_auth)
            .field("server_name", &self.server_name)
            .field("node_names", &self.node_names.is_some())
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
            node_names: None,
        }
    }

    /// Checks that the PEM blobs parse and fit together (the certificate
    /// chains, the key matches it, the settings agree), as a transport will
    /// when it starts: for checking settings before anything else starts.
    pub fn check(&self) -> Result<(), TlsConfigError> {
        Tls::new(self).map(|_| ())
    }

    /// Binds certificates to nodes: node `id`'s certificate must be valid for
    /// the DNS name `names(id)` (see [`TlsConfig::node_names`]).
    pub fn with_node_names(
        mut self,
        names: impl Fn(NodeId) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.node_names = Some(Arc::new(names));
        self
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
    pub(crate) node_names: Option<NodeNames>,
}

impl Tls {
    pub(crate) fn new(c: &TlsConfig) -> Result<Self, TlsConfigError> {
        if c.node_names.is_some() && !c.require_client_auth {
            return Err(TlsConfigError(
                "node_names binds client certificates to nodes: it needs require_client_auth"
                    .into(),
            ));
        }
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
            node_names: c.node_names.clone(),
        })
    }

    /// The name to verify in the certificate of peer `to` at `addr`
    /// (`host:port`): its node name when certificates are bound to nodes,
    /// else `server_name` or the host part of the address.
    pub(crate) fn name_for(&self, to: NodeId, addr: &str) -> std::io::Result<ServerName<'static>> {
        let host = match (&self.node_names, &self.server_name) {
            (Some(names), _) => names(to).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("no certificate name known for node {to}"),
                )
            })?,
            (None, Some(n)) => n.clone(),
            (None, None) => addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .unwrap_or_else(|| addr.to_string()),
        };
        ServerName::try_from(host)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    }
}

/// What the TLS handshake of an accepted connection proved: the client's
/// end-entity certificate (none without TLS, or without client auth).
#[derive(Clone, Default)]
pub(crate) struct PeerCert(pub(crate) Option<Arc<CertificateDer<'static>>>);

/// Checks that `cert` is node `from`'s certificate when `tls` binds
/// certificates to nodes (always `Ok` otherwise).
pub(crate) fn check_peer_identity(
    tls: Option<&TlsConfig>,
    from: NodeId,
    cert: &PeerCert,
) -> Result<(), String> {
    let Some(names) = tls.and_then(|t| t.node_names.as_ref()) else {
        return Ok(());
    };
    let name = names(from).ok_or_else(|| format!("node {from} has no known certificate name"))?;
    let Some(cert) = &cert.0 else {
        return Err(format!("no client certificate for node {from}"));
    };
    let subject = ServerName::try_from(name.clone())
        .map_err(|e| format!("certificate name {name:?} of node {from}: {e}"))?;
    let parsed = webpki::EndEntityCert::try_from(cert.as_ref())
        .map_err(|e| format!("client certificate does not parse: {e}"))?;
    parsed
        .verify_is_valid_for_subject_name(&subject)
        .map_err(|_| {
            format!("the client certificate is not node {from}'s (not valid for {name:?})")
        })
}
