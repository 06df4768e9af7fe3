//! The HTTP client the server uses to forward requests to the leader's API
//! and to register this member there ([`HttpClient::forwarding`], requests
//! marked as forwarded); the CLI client and `local-cluster` use it too
//! ([`HttpClient::new`], ordinary requests).
//!
//! hyper-util's pooled client over TCP with `TCP_NODELAY`, and rustls for
//! `https://` URLs (hyper-rustls): a follower that forwards many requests
//! keeps a few keep-alive connections to the leader instead of opening one
//! per request (which costs a handshake each and leaves a TIME_WAIT socket
//! behind each). Only `http://host:port` and `https://host:port` URLs (the
//! API URLs the members publish). HTTPS trusts only the CA it is given
//! ([`ClientTls`]), never the system's roots, and presents a client
//! certificate when it has one. Clone it freely: clones share
//! the pool. A client's pooled connections run on the tokio runtime that
//! opened them, so make one per runtime (the server makes one at start).
//!
//! Retries: the pool re-sends a request only when its connection turned
//! out closed before any byte of the request was written (hyper's
//! "canceled" requests), so a forwarded write is never sent twice.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::CONTENT_TYPE;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// Header a forwarded request carries: the receiver never forwards it
/// again (no loops while leadership moves).
pub const FORWARDED_HEADER: &str = "x-raftwork-forwarded";

/// Largest answer accepted (a listing of 10000 maximal entries is far
/// smaller in practice; values are at most 1 MiB).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// How long an unused pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Idle connections kept per host (the leader, in practice). Enough for
/// the forwarded requests a loaded follower has in flight at once; more
/// are opened on demand and closed after use.
const POOL_MAX_IDLE_PER_HOST: usize = 64;

/// An HTTP answer.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
    /// The answer's `raftwork-*` headers (names lowercase), e.g. a
    /// listing's `raftwork-list-more`: a forwarded answer passes them on.
    pub raftwork_headers: Vec<(String, String)>,
}

impl HttpResponse {
    /// The JSON `error` message of a raftwork answer, else the body as text.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned())
    }
}

/// Why no answer came.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened: the request was certainly not sent.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The base URL.
        url: String,
        /// Cause.
        reason: String,
    },
    /// The request may have been sent, but no whole answer came (broken
    /// connection, timeout, malformed or oversized answer).
    #[error("no answer from {url}: {reason}")]
    NoAnswer {
        /// The base URL.
        url: String,
        /// Cause.
        reason: String,
    },
    /// The URL is not `http://host:port`; nothing was sent.
    #[error("unsupported URL {0:?} (http://host:port only)")]
    BadUrl(String),
}

/// A request for [`HttpClient::send`].
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    /// `GET`, `PUT`, ...
    pub method: &'a str,
    /// Path and query, starting with `/`.
    pub path_and_query: &'a str,
    /// The body's content type, if any.
    pub content_type: Option<&'a str>,
    /// More request headers.
    pub headers: &'a [(&'a str, String)],
    /// The body.
    pub body: &'a [u8],
}

/// A pooled HTTP/1.1 client. Cheap to clone (clones share the pool).
///
/// A forwarding client ([`HttpClient::forwarding`], the server's) marks
/// every request with [`FORWARDED_HEADER`] so the receiver never forwards
/// it again; a plain one ([`HttpClient::new`], the CLI's) sends ordinary
/// client requests, which a follower may forward.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    mark_forwarded: bool,
    max_response_bytes: usize,
}

/// What an [`HttpClient`] uses for `https://` URLs (all PEM).
#[derive(Clone, Default)]
pub struct ClientTls {
    /// CA certificates the server's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// A client certificate (chain, leaf first) and its key, for servers
    /// that ask for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// The rustls configuration; errors name what does not parse.
    pub fn config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let c = c.map_err(|e| format!("CA: {e}"))?;
            roots.add(c).map_err(|e| format!("CA: {e}"))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("client certificate: {e}"))?;
                let key =
                    PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("client key: {e}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate and key: {e}"))
            }
        }
    }
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("mark_forwarded", &self.mark_forwarded)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client whose connection attempts give up after `connect_timeout`
    /// (keep it shorter than the calls' timeouts, so that a connection
    /// that cannot be opened reads as [`SendError::Connect`]).
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_tls(connect_timeout, &ClientTls::default()).expect("no TLS settings to fail")
    }

    /// Like [`HttpClient::new`], with `tls` for `https://` URLs.
    pub fn with_tls(connect_timeout: Duration, tls: &ClientTls) -> Result<Self, String> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.config()?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let inner = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Ok(Self {
            inner,
            mark_forwarded: false,
            max_response_bytes: MAX_RESPONSE_BYTES,
        })
    }

    /// Like [`HttpClient::new`], but every request is marked as forwarded.
    pub fn forwarding(connect_timeout: Duration) -> Self {
        Self::new(connect_timeout).marking_forwarded()
    }

    /// This client, marking every request as forwarded.
    pub fn marking_forwarded(self) -> Self {
        Self {
            mark_forwarded: true,
            ..self
        }
    }

    /// The same client, reading answers of up to `bytes` (default 64 MiB)
    /// instead: for a backup, which holds the whole key space.
    pub fn reading_up_to(self, bytes: usize) -> Self {
        Self {
            max_response_bytes: bytes,
            ..self
        }
    }

    /// Sends `method path_and_query` with `body` to `base_url`
    /// (`http://host:port`) and reads the answer, all within `timeout`.
    pub async fn request(
        &self,
        base_url: &str,
        method: &str,
        path_and_query: &str,
        content_type: Option<&str>,
        body: &[u8],
        timeout: Duration,
    ) -> Result<HttpResponse, SendError> {
        let out = Outgoing {
            method,
            path_and_query,
            content_type,
            headers: &[],
            body,
        };
        self.send(base_url, &out, timeout).await
    }

    /// Sends `out` to `base_url` (`http://host:port`) and reads the answer,
    /// all within `timeout`.
    pub async fn send(
        &self,
        base_url: &str,
        out: &Outgoing<'_>,
        timeout: Duration,
    ) -> Result<HttpResponse, SendError> {
        let Outgoing {
            method,
            path_and_query,
            content_type,
            headers,
            body,
        } = *out;
        let base = base_url.trim_end_matches('/');
        base.strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| SendError::BadUrl(base_url.to_string()))?;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{base}{path_and_query}"));
        if self.mark_forwarded {
            req = req.header(FORWARDED_HEADER, "1");
        }
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        for (name, value) in headers {
            req = req.header(*name, value.as_str());
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| SendError::BadUrl(format!("{base}{path_and_query}: {e}")))?;
        let no_answer = |reason: String| SendError::NoAnswer {
            url: base.to_string(),
            reason,
        };
        let exchange = async {
            let response = self.inner.request(req).await.map_err(|e| {
                if e.is_connect() {
                    SendError::Connect {
                        url: base.to_string(),
                        reason: error_chain(&e),
                    }
                } else {
                    no_answer(error_chain(&e))
                }
            })?;
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let raftwork_headers = response
                .headers()
                .iter()
                .filter(|(name, _)| name.as_str().starts_with("raftwork-"))
                .filter_map(|(name, value)| {
                    Some((name.as_str().to_string(), value.to_str().ok()?.to_string()))
                })
                .collect();
            let body = Limited::new(response.into_body(), self.max_response_bytes)
                .collect()
                .await
                .map_err(|e| no_answer(format!("reading the answer: {e}")))?
                .to_bytes()
                .to_vec();
            Ok(HttpResponse {
                status,
                content_type,
                body,
                raftwork_headers,
            })
        };
        // A connection attempt that times out (connect_timeout, shorter)
        // is a Connect error from the connector; this one may have sent.
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(no_answer(format!("timed out after {timeout:?}"))))
    }
}

/// An error and its causes, `: `-separated (hyper's own message alone is
/// often just "client error (Connect)").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_errors_and_bad_urls_are_told_apart() {
        let client = HttpClient::new(Duration::from_secs(1));
        // A port nobody listens on: bind one, note it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let e = client
            .request(&url, "GET", "/healthz", None, b"", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::Connect { .. }), "{e}");
        for bad in ["ftp://h:1", "h:1", "http://", "https://", "http://h:1/x"] {
            let e = client
                .request(bad, "GET", "/", None, b"", Duration::from_secs(1))
                .await
                .unwrap_err();
            assert!(matches!(e, SendError::BadUrl(_)), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_broken_answer_is_no_answer() {
        // A server that reads the request and closes without answering.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
            }
        });
        let client = HttpClient::forwarding(Duration::from_secs(1));
        let e = client
            .request(&url, "PUT", "/v1/kv/a", None, b"x", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, SendError::NoAnswer { .. }), "{e}");
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let listener = axum::serve::ListenerExt::tap_io(listener, move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        let app = axum::Router::new().route(
            "/echo",
            axum::routing::put(|headers: axum::http::HeaderMap, body: Bytes| async move {
                let marked = headers.contains_key(FORWARDED_HEADER);
                (
                    [(CONTENT_TYPE, "text/plain")],
                    format!("{marked}:{}", body.len()),
                )
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = HttpClient::forwarding(Duration::from_secs(1));
        for i in 0..20 {
            let body = vec![b'x'; i];
            let r = client
                .request(&url, "PUT", "/echo", None, &body, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.content_type.as_deref(), Some("text/plain"));
            assert_eq!(r.body, format!("true:{i}").into_bytes());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one pooled connection");
        // A plain client's requests are not marked.
        let r = HttpClient::new(Duration::from_secs(1))
            .request(&url, "PUT", "/echo", None, b"", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.body, b"false:0");
    }
}
