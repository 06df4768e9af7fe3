//! The API's listener: plain TCP, or TLS with optional client-certificate
//! auth (`--cert-file`, `--key-file`, `--trusted-ca-file`,
//! `--client-cert-auth`). Every connection gets `TCP_NODELAY` (a response
//! written in several segments must not wait for a delayed ACK), and its
//! handlers see who is calling as `ConnectInfo<ApiPeer>`: the address and,
//! over TLS, the client's certificate.
//!
//! hyper answers a request whose URI or head is over its limits (a URI of
//! 64 KiB, a head of about 400 KiB) itself, with an empty 414 or 431,
//! before any handler runs. [`ExplainTooLong`] wraps every connection and
//! replaces such a bodiless answer (hyper closes the connection after it,
//! so nothing follows it) with the same status and a JSON error body that
//! says what to send instead, like every other error of the API.
//!
//! TLS handshakes run in tasks of their own, each within
//! [`HANDSHAKE_TIMEOUT`] and at most [`HANDSHAKES_MAX`] at once (a
//! connection past that is closed at once), so clients that stall their
//! handshakes hold up nobody and cannot pile up; a failed handshake is
//! logged with its reason.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Time a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes in progress at once.
pub const HANDSHAKES_MAX: usize = 256;

/// Handshaken connections waiting for the server to take them.
const READY_CONNECTIONS_MAX: usize = 64;

/// A connection's byte stream, plain or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Who is on the other end of an API connection.
#[derive(Debug, Clone)]
pub struct ApiPeer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The client's certificate (TLS with a client certificate only).
    pub cert: Option<Arc<CertificateDer<'static>>>,
}

impl ApiPeer {
    /// Whether the client's certificate is valid for the DNS name `name`
    /// (false without a certificate).
    pub fn is(&self, name: &str) -> bool {
        let Some(cert) = &self.cert else {
            return false;
        };
        let (Ok(subject), Ok(parsed)) = (
            ServerName::try_from(name.to_string()),
            webpki::EndEntityCert::try_from(cert.as_ref()),
        ) else {
            return false;
        };
        parsed.verify_is_valid_for_subject_name(&subject).is_ok()
    }
}

/// The API listener (see the module docs).
pub struct ApiListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(Pin<Box<dyn Io>>, ApiPeer)>,
}

impl ApiListener {
    /// Serves `listener`, over TLS when `tls` is given.
    pub fn new(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_CONNECTIONS_MAX);
        tokio::spawn(accept_loop(listener, tls, tx));
        Ok(Self { local, ready })
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    ready: mpsc::Sender<(Pin<Box<dyn Io>>, ApiPeer)>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "API accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY on an API connection");
        }
        let Some(tls) = tls.clone() else {
            let peer = ApiPeer { addr, cert: None };
            if ready
                .send((Box::pin(ExplainTooLong::new(tcp)), peer))
                .await
                .is_err()
            {
                return;
            }
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(remote = %addr, limit = HANDSHAKES_MAX, "refusing API connection: too many TLS handshakes in progress");
            continue;
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|c| Arc::new(c.clone().into_owned()));
                    let stream = ExplainTooLong::new(stream);
                    let _ = ready.send((Box::pin(stream), ApiPeer { addr, cert })).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(remote = %addr, reason = %e, "refusing API connection: TLS handshake failed")
                }
                Err(_) => {
                    tracing::warn!(remote = %addr, "refusing API connection: TLS handshake timed out")
                }
            }
        });
    }
}

/// The JSON error of a request hyper refused as too long (`status` 414 or
/// 431), as a whole HTTP/1.1 response.
pub fn too_long_response(status: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "error": format!(
            "{status}: the request's URI or head is over the server's limit (64 KiB of URI); \
             send a compare-and-set's expected value in the body (header \
             raftwork-prev-value-length) instead of ?prev_value="
        ),
        "leader": null,
    })
    .to_string();
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A connection whose bodiless 414/431 answers from hyper get a JSON body
/// (see the module docs). Anything else passes through unchanged.
pub struct ExplainTooLong<T> {
    inner: T,
    /// The replacement answer being written, and how much of it is.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> ExplainTooLong<T> {
    /// Wraps a connection.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            pending: None,
        }
    }
}

/// The status line's code and reason if `buf` is hyper's bodiless answer
/// to an over-long request.
fn refused_too_long(buf: &[u8]) -> Option<&'static str> {
    let head_only = |b: &[u8]| {
        b.ends_with(b"\r\n\r\n")
            && b.windows(17)
                .any(|w| w.eq_ignore_ascii_case(b"content-length: 0"))
    };
    if buf.starts_with(b"HTTP/1.1 414 ") && head_only(buf) {
        Some("414 URI Too Long")
    } else if buf.starts_with(b"HTTP/1.1 431 ") && head_only(buf) {
        Some("431 Request Header Fields Too Large")
    } else {
        None
    }
}

impl<T: AsyncWrite + Unpin> ExplainTooLong<T> {
    /// Writes what is left of the replacement answer.
    fn drain(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        while let Some((bytes, done)) = &mut self.pending {
            if *done == bytes.len() {
                self.pending = None;
                break;
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]) {
                std::task::Poll::Ready(Ok(0)) => {
                    return std::task::Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                }
                std::task::Poll::Ready(Ok(n)) => *done += n,
                std::task::Poll::Ready(Err(e)) => return std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => return std::task::Poll::Pending,
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ExplainTooLong<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ExplainTooLong<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return std::task::Poll::Pending;
        }
        if let Some(status) = refused_too_long(buf) {
            this.pending = Some((too_long_response(status), 0));
            // The rest goes out on the next write, flush or shutdown.
            let _ = this.drain(cx)?;
            return std::task::Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        // As the connection: hyper then writes heads and bodies without
        // copying them into one buffer.
        self.inner.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return std::task::Poll::Pending;
        }
        // hyper's refusal is a head alone: one non-empty slice.
        let mut filled = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next()) {
            if let Some(status) = refused_too_long(only) {
                this.pending = Some((too_long_response(status), 0));
                let _ = this.drain(cx)?;
                return std::task::Poll::Ready(Ok(only.len()));
            }
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return std::task::Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return std::task::Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = Pin<Box<dyn Io>>;
    type Addr = ApiPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop only ends with the runtime.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<ApiPeer> {
        Ok(ApiPeer {
            addr: self.local,
            cert: None,
        })
    }
}

impl Connected<IncomingStream<'_, ApiListener>> for ApiPeer {
    fn connect_info(stream: IncomingStream<'_, ApiListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// The API's rustls configuration: `cert_pem`/`key_pem` serve; with
/// `client_ca_pem`, clients must present a certificate signed by it.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("certificate: no certificate in the PEM".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(c.map_err(|e| format!("CA: {e}"))?)
                    .map_err(|e| format!("CA: {e}"))?;
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| format!("client verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    // HTTP/2 for the etcd API's gRPC (grpc-go clients refuse a TLS server
    // that does not offer h2), HTTP/1.1 for REST.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
