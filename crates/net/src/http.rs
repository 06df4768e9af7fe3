//! The HTTP transport: the frames of the TCP transport, carried in HTTP/1.1
//! request bodies (hyper), for networks where only HTTP gets through (proxies,
//! load balancers, service meshes). Like [`crate::tcp`], it is a [`Link`] on
//! top of the shared machinery of [`crate::peer`] (per-peer queue and task,
//! backoff, unreachable reports, `Shared::serve_frames`); TCP and TLS come
//! from [`crate::tcp::connect`] and [`crate::tcp::accept`].
//!
//! Two modes ([`HttpMode`]), picked by the dialer; one listener serves both:
//!
//! ```text
//! Stream (default): one long-lived request per connection and peer; its
//! chunked body is exactly the TCP byte stream.
//!
//!   dialer                                                      listener
//!   POST /raft/v1/stream HTTP/1.1
//!   transfer-encoding: chunked
//!   [hello] ─────────────────────── first chunk (sent at open) ──▶ serve_frames:
//!   [batch][batch]… ─────────────── one chunk per FrameSink::send ─▶ check, inbox
//!   0\r\n\r\n (the sink was dropped: the body ends cleanly)
//!                  ◀── 200 (body ended cleanly) | 400 + reason (a frame broke a
//!                      rule) | 503 (the listener shuts down)
//!   Any answer means the stream is over: the server answers only when the
//!   body has ended, or to refuse it.
//!
//! Short: one request per FrameSink::send, on a kept-alive connection.
//!
//!   POST /raft/v1/batch HTTP/1.1
//!   content-length: n
//!   [hello][batch][batch]…  ─────────────────────────────────────▶ serve_frames
//!                  ◀── 200 once every batch is in the inbox | 400 + reason | 503
//!
//! Snapshots (both modes; when the node attached its snapshot store): each
//! transfer on a connection of its own, upgraded to a raw two-way stream that
//! carries the snapshot frames of `snapshot.rs`, as on TCP.
//!
//!   POST /raft/v1/snapshot HTTP/1.1
//!   connection: upgrade
//!   upgrade: raftwork-snapshot/1
//!                  ◀── 101 Switching Protocols (then: offer ▶ ◀ resume,
//!                      chunks ▶, end ▶ ◀ result; Shared::serve_stream)
//!
//! Anything else ◀── 404.
//! ```
//!
//! Invariants:
//! * **Order.** Per peer, messages never reorder. One peer task writes to one
//!   sink at a time (see `peer.rs`); a stream sink writes its chunks in order
//!   into one request body, and a short sink waits for each answer before the
//!   next request. When a sink is replaced (redial after a failure, or a new
//!   address), the old sink is dropped first, which ends its body; `open`
//!   then waits for the old connection to finish (the server has answered,
//!   so everything it will ever deliver from that stream is delivered, or the
//!   connection died) before it dials again. If the old connection does not
//!   finish within half of `connect_timeout`, it is aborted: only then could a
//!   few of its last frames, already read by a slow receiver, still reach the
//!   inbox after the first frames of the new stream.
//! * **Breaks are reported.** A stream sink is broken as soon as its
//!   connection task ends, its request gets an answer, or its body channel
//!   closes; from then on every `send` fails, so the peer task reports the
//!   peer unreachable and redials. Guaranteed: nothing is delivered twice by
//!   the transport, nothing out of order, and after a break the next send
//!   fails. Not guaranteed (as with TCP, where a write that reached the kernel
//!   is lost with its connection): the frames of the sends that succeeded
//!   just before the break, which may sit in the body channel (at most
//!   [`STREAM_BODY_CHUNKS`] sends), in hyper's buffer or in the kernel's;
//!   they are lost, and raft retransmits. A short sink's send succeeds only
//!   on a 200, so in short mode every lost batch is reported.
//! * **Bounds.** Every frame of a request body is bounded by
//!   `max_frame_bytes` and checked by `serve_frames`; request heads by
//!   hyper's buffer limits and `handshake_timeout`; no input panics.
//! * **Snapshots** go on a connection of their own (an upgraded request), so
//!   a big snapshot never holds up the messages to its peer; after the
//!   upgrade, `Shared::serve_stream` checks every frame as on TCP.
//! * **Idle connections.** The server closes a connection that sends no
//!   request head within `handshake_timeout`, including an idle kept-alive
//!   one. A short sink therefore redials before sending on a connection that
//!   is closed or idle for half of its own `handshake_timeout`, and resends a
//!   request hyper did not write; nothing was in flight, so order holds.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use raftwork_transport::{Inbox, NodeId};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::frame;
use crate::peer::{BoxFuture, FrameSink, Link, NetConfig, NetError, Shared};
use crate::tcp::{self, BoxStream};
use crate::tls::{PeerCert, Tls};

/// Route of the stream mode: one long request whose body is a hello frame
/// followed by batch frames.
pub const HTTP_STREAM_PATH: &str = "/raft/v1/stream";
/// Route of the short mode: one request per batch of frames (hello first).
pub const HTTP_BATCH_PATH: &str = "/raft/v1/batch";

/// Route of a snapshot transfer: a request upgraded to a two-way stream.
pub const HTTP_SNAPSHOT_PATH: &str = "/raft/v1/snapshot";
/// The `upgrade` protocol token of a snapshot transfer.
const SNAPSHOT_PROTOCOL: &str = "raftwork-snapshot/1";

/// Sends a stream sink may have accepted into its request body before hyper
/// takes them (the sink's send waits beyond that, like a full socket).
pub const STREAM_BODY_CHUNKS: usize = 4;

/// Longest answer text read back from a peer.
const ANSWER_BYTES_MAX: usize = 4096;

/// How an [`HttpTransport`] sends to its peers. Either way its listener
/// serves both, so nodes in different modes talk to each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HttpMode {
    /// One long-lived `POST /raft/v1/stream` per peer whose chunked body
    /// carries the frames as they are sent. Lowest overhead; needs
    /// intermediaries that forward request bodies as they stream. Default.
    #[default]
    Stream,
    /// One `POST /raft/v1/batch` per write, on a kept-alive connection,
    /// answered 200 once delivered. Works through any HTTP/1.1 proxy; costs
    /// a round trip per write (writes to one peer do not overlap).
    Short,
}

/// Raft messages over HTTP/1.1 (optionally over TLS): the frames of
/// [`TcpTransport`](crate::TcpTransport) in request bodies, in one of two
/// [`HttpMode`]s.
///
/// Cheap to clone: clones share the transport. Keep a clone to add peers
/// ([`Transport::set_peer`]) as membership changes.
#[derive(Clone)]
pub struct HttpTransport {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    mode: HttpMode,
}

impl HttpTransport {
    /// Listens on `listen` (use port 0 for an ephemeral port) for node `id`,
    /// sends to peers in `mode`, and returns the transport and the node's
    /// inbox. The listener serves both modes, over TLS when `config.tls` is
    /// set. Must be called inside a tokio runtime.
    pub async fn bind(
        id: NodeId,
        listen: impl ToSocketAddrs + std::fmt::Debug,
        config: NetConfig,
        mode: HttpMode,
    ) -> Result<(Self, Inbox), NetError> {
        Self::serve(id, tcp::listen(listen).await?, config, mode)
    }

    /// Like [`HttpTransport::bind`], without awaiting (for synchronous
    /// builders). Must be called inside a tokio runtime.
    pub fn bind_now(
        id: NodeId,
        listen: SocketAddr,
        config: NetConfig,
        mode: HttpMode,
    ) -> Result<(Self, Inbox), NetError> {
        Self::serve(id, tcp::listen_now(listen)?, config, mode)
    }

    fn serve(
        id: NodeId,
        listener: TcpListener,
        config: NetConfig,
        mode: HttpMode,
    ) -> Result<(Self, Inbox), NetError> {
        let p = tcp::prepare(id, &config, &listener)?;
        let link = HttpLink(Arc::new(LinkInner {
            tls: p.tls.clone(),
            mode,
            connect_timeout: config.connect_timeout,
            settle_grace: config.connect_timeout / 2,
            idle_redial: config.handshake_timeout / 2,
            last: Mutex::new(HashMap::new()),
        }));
        let shared = Shared::new(id, config, p.inbox_tx, Arc::new(link));
        tokio::spawn(accept_loop(shared.clone(), listener, p.tls));
        Ok((
            Self {
                shared,
                local_addr: p.local_addr,
                mode,
            },
            p.inbox,
        ))
    }

    /// The address the transport listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How this transport sends to its peers.
    pub fn mode(&self) -> HttpMode {
        self.mode
    }
}

crate::peer::delegate_transport!(HttpTransport);

// ---------------------------------------------------------------- server

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, tls: Option<Tls>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = wait_shutdown(&mut shutdown) => return,
        };
        match accepted {
            Ok((tcp, remote)) => {
                // Counted until the connection ends; over the cap it is
                // closed at once.
                let Some(admitted) = shared.admit(remote) else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let shared = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _admitted = admitted;
                    let remote = remote.to_string();
                    let handshake = tokio::time::timeout(
                        shared.config.handshake_timeout,
                        tcp::accept(tls.as_ref(), tcp),
                    );
                    match handshake.await {
                        Ok(Ok((stream, cert))) => {
                            serve_connection(shared, stream, remote, cert).await
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(node = shared.id, remote, reason = %e, "refusing connection: TLS handshake failed")
                        }
                        Err(_) => tracing::warn!(
                            node = shared.id,
                            remote,
                            "refusing connection: TLS handshake timed out"
                        ),
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(node = shared.id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Resolves once the transport shuts down (at once if it already has).
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|down| *down).await;
}

/// Serves HTTP/1.1 requests on one accepted connection until it closes or the
/// transport shuts down.
async fn serve_connection(shared: Arc<Shared>, stream: BoxStream, remote: String, cert: PeerCert) {
    let service = {
        let shared = shared.clone();
        let remote = remote.clone();
        hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            let remote = remote.clone();
            let cert = cert.clone();
            async move { Ok::<_, Infallible>(answer(&shared, req, &remote, &cert).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.config.handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut shutdown = shared.shutdown.subscribe();
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(node = shared.id, remote, error = %e, "HTTP connection ended");
            }
        }
        _ = wait_shutdown(&mut shutdown) => {
            // Requests in flight end at once (serve_frames stops on shutdown)
            // and are answered 503; then the connection closes.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(shared.config.handshake_timeout, conn).await;
        }
    }
}

/// Answers one request.
async fn answer(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    remote: &str,
    cert: &PeerCert,
) -> Response<Full<Bytes>> {
    let route_ok = req.method() == Method::POST
        && matches!(
            req.uri().path(),
            HTTP_STREAM_PATH | HTTP_BATCH_PATH | HTTP_SNAPSHOT_PATH
        );
    if !route_ok {
        tracing::debug!(node = shared.id, remote, method = %req.method(), path = req.uri().path(), "no such route");
        return respond(StatusCode::NOT_FOUND, "not found");
    }
    let shutting_down = || *shared.shutdown.borrow();
    if shutting_down() {
        return respond(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if req.uri().path() == HTTP_SNAPSHOT_PATH {
        return upgrade_for_snapshot(shared, req, remote, cert);
    }
    // Both routes carry the same bytes: a hello, then batches. The stream
    // route's body just ends much later.
    match shared
        .serve_frames(BodyReader::new(req.into_body()), remote, cert)
        .await
    {
        // serve_frames also stops (with Ok) when the transport shuts down or
        // the node dropped its inbox: then the body may not have been
        // delivered whole.
        Ok(()) if shutting_down() || shared.own_inbox.is_closed() => {
            respond(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
        }
        Ok(()) => respond(StatusCode::OK, ""),
        Err(reason) => respond(StatusCode::BAD_REQUEST, reason),
    }
}

/// Answers 101 to a snapshot request and, once the connection is upgraded,
/// serves it as a raw two-way stream (`Shared::serve_stream`, which expects
/// a snapshot offer or a hello, and validates everything).
fn upgrade_for_snapshot(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    remote: &str,
    cert: &PeerCert,
) -> Response<Full<Bytes>> {
    let asks_upgrade = req.headers().get(UPGRADE).is_some_and(|v| {
        v.as_bytes()
            .eq_ignore_ascii_case(SNAPSHOT_PROTOCOL.as_bytes())
    });
    if !asks_upgrade {
        return respond(
            StatusCode::BAD_REQUEST,
            format!("expected upgrade: {SNAPSHOT_PROTOCOL}"),
        );
    }
    let upgrade = hyper::upgrade::on(&mut req);
    let shared = shared.clone();
    let remote = remote.to_string();
    let cert = cert.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                shared
                    .serve_stream(Box::new(TokioIo::new(upgraded)), &remote, &cert)
                    .await
            }
            Err(e) => {
                tracing::warn!(node = shared.id, remote, error = %e, "snapshot upgrade failed")
            }
        }
    });
    let mut r = respond(StatusCode::SWITCHING_PROTOCOLS, "");
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut()
        .insert(UPGRADE, HeaderValue::from_static(SNAPSHOT_PROTOCOL));
    r
}

fn respond(status: StatusCode, text: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(text.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A request body as an [`AsyncRead`] (trailers are skipped; a body error is
/// an I/O error).
struct BodyReader {
    body: Incoming,
    chunk: Bytes,
}

impl BodyReader {
    fn new(body: Incoming) -> Self {
        Self {
            body,
            chunk: Bytes::new(),
        }
    }
}

impl AsyncRead for BodyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        while this.chunk.is_empty() {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.chunk = data;
                    }
                }
            }
        }
        let n = this.chunk.len().min(buf.remaining());
        buf.put_slice(&this.chunk.split_to(n));
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------- client

struct HttpLink(Arc<LinkInner>);

struct LinkInner {
    tls: Option<Tls>,
    mode: HttpMode,
    connect_timeout: Duration,
    /// How long `open` waits for the previous connection to a peer to finish.
    settle_grace: Duration,
    /// A short sink redials rather than reuse a connection idle this long.
    idle_redial: Duration,
    /// The task driving the newest connection to each peer.
    last: Mutex<HashMap<NodeId, JoinHandle<()>>>,
}

/// Why a connection is no longer usable: set once, by whichever of its
/// tasks sees it first.
type Broken = Arc<watch::Sender<Option<String>>>;

fn mark(broken: &Broken, reason: String) {
    broken.send_if_modified(|r| {
        if r.is_none() {
            *r = Some(reason);
            true
        } else {
            false
        }
    });
}

fn broken_reason(rx: &watch::Receiver<Option<String>>) -> Option<String> {
    rx.borrow().clone()
}

fn broken_error(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, reason)
}

/// A dialed connection: the handle to send requests, and its state.
struct Dialed<B> {
    sender: SendRequest<B>,
    broken_tx: Broken,
    broken: watch::Receiver<Option<String>>,
}

impl LinkInner {
    /// Waits for the previous connection to `to` to finish; aborts it after
    /// `settle_grace`. See the module doc (order across redials).
    async fn settle_previous(&self, to: NodeId) {
        let previous = {
            let mut last = self.last.lock().unwrap();
            last.retain(|_, task| !task.is_finished());
            last.remove(&to)
        };
        if let Some(mut task) = previous {
            if tokio::time::timeout(self.settle_grace, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(
                    peer = to,
                    "previous connection to the peer did not finish in time; aborting it"
                );
                task.abort();
            }
        }
    }

    /// Connects (TCP, TLS when configured), runs the HTTP/1.1 handshake and
    /// spawns the connection task.
    async fn dial<B>(&self, to: NodeId, addr: &str) -> io::Result<Dialed<B>>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.settle_previous(to).await;
        let stream = tcp::connect(self.tls.as_ref(), to, addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let broken_tx: Broken = Arc::new(watch::channel(None).0);
        let broken = broken_tx.subscribe();
        let on_end = broken_tx.clone();
        let task = tokio::spawn(async move {
            let reason = match conn.await {
                Ok(()) => "connection closed".to_string(),
                Err(e) => format!("connection failed: {e}"),
            };
            mark(&on_end, reason);
        });
        self.last.lock().unwrap().insert(to, task);
        Ok(Dialed {
            sender,
            broken_tx,
            broken,
        })
    }

    async fn open_stream(
        &self,
        from: NodeId,
        to: NodeId,
        addr: &str,
        epoch: u64,
    ) -> io::Result<StreamSink> {
        let mut dialed = self.dial::<ChannelBody>(to, addr).await?;
        let (body, rx) = mpsc::channel(STREAM_BODY_CHUNKS);
        let mut hello = Vec::new();
        frame::encode_hello_at(&mut hello, from, to, epoch);
        body.try_send(Bytes::from(hello))
            .map_err(|_| io::Error::other("stream body refused the hello"))?;
        let req = request(addr, HTTP_STREAM_PATH, ChannelBody(rx))?;
        dialed.sender.ready().await.map_err(io::Error::other)?;
        let response = dialed.sender.send_request(req);
        let sender = dialed.sender;
        let on_answer = dialed.broken_tx;
        tokio::spawn(async move {
            let reason = match response.await {
                Ok(resp) => {
                    let (status, text) = answer_text(resp).await;
                    format!("peer ended the stream: {status} {text}")
                }
                Err(e) => format!("stream request failed: {e}"),
            };
            // Dropping the sender lets the connection close once idle.
            drop(sender);
            mark(&on_answer, reason);
        });
        Ok(StreamSink {
            body,
            broken: dialed.broken,
        })
    }
}

impl LinkInner {
    /// Opens a snapshot transfer: a new connection whose request is upgraded
    /// to a raw two-way stream.
    async fn open_snapshot(&self, to: NodeId, addr: &str) -> io::Result<BoxStream> {
        let stream = tcp::connect(self.tls.as_ref(), to, addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let req = Request::builder()
            .method(Method::POST)
            .uri(HTTP_SNAPSHOT_PATH)
            .header(HOST, addr)
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, SNAPSHOT_PROTOCOL)
            .body(Empty::new())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let resp = sender.send_request(req).await.map_err(io::Error::other)?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (status, text) = answer_text(resp).await;
            return Err(io::Error::other(format!(
                "peer refused the snapshot upgrade: {status} {text}"
            )));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(io::Error::other)?;
        Ok(Box::new(TokioIo::new(upgraded)))
    }
}

impl Link for HttpLink {
    fn open<'a>(
        &'a self,
        from: NodeId,
        to: NodeId,
        addr: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, io::Result<Box<dyn FrameSink>>> {
        Box::pin(async move {
            Ok(match self.0.mode {
                HttpMode::Stream => {
                    Box::new(self.0.open_stream(from, to, addr, epoch).await?) as Box<dyn FrameSink>
                }
                HttpMode::Short => {
                    Box::new(ShortSink::open(self.0.clone(), from, to, addr, epoch).await?)
                }
            })
        })
    }

    fn open_duplex<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
    ) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            tokio::time::timeout(self.0.connect_timeout, self.0.open_snapshot(to, addr))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "snapshot upgrade timed out")
                })?
        })
    }
}

fn request<B>(addr: &str, path: &str, body: B) -> io::Result<Request<B>> {
    Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, addr)
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Status and (bounded) text of an answer; reads the body to its end, so a
/// kept-alive connection can carry the next request.
async fn answer_text(resp: Response<Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let text = match Limited::new(resp.into_body(), ANSWER_BYTES_MAX)
        .collect()
        .await
    {
        Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        Err(e) => format!("(unreadable answer: {e})"),
    };
    (status, text)
}

/// A streaming request body fed by a bounded channel; it ends cleanly when
/// the sending half is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }
}

/// Stream mode: pushes frames into the open request's body.
struct StreamSink {
    body: mpsc::Sender<Bytes>,
    broken: watch::Receiver<Option<String>>,
}

/// Resolves once the connection is broken (or every task that could say so
/// is gone).
async fn wait_broken(rx: &mut watch::Receiver<Option<String>>) {
    let _ = rx.wait_for(Option::is_some).await;
}

impl FrameSink for StreamSink {
    fn send<'a>(&'a mut self, frames: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            if let Some(reason) = broken_reason(&self.broken) {
                return Err(broken_error(reason));
            }
            if frames.is_empty() {
                return Ok(());
            }
            let chunk = Bytes::copy_from_slice(frames);
            let pushed = tokio::select! {
                r = self.body.send(chunk) => r.is_ok(),
                () = wait_broken(&mut self.broken) => false,
            };
            if pushed {
                Ok(())
            } else {
                Err(broken_error(
                    broken_reason(&self.broken).unwrap_or_else(|| "stream body closed".into()),
                ))
            }
        })
    }
}

/// Short mode: one request per send on a kept-alive connection.
struct ShortSink {
    link: Arc<LinkInner>,
    to: NodeId,
    addr: String,
    hello: Vec<u8>,
    conn: Option<Dialed<Full<Bytes>>>,
    last_used: Instant,
}

impl ShortSink {
    async fn open(
        link: Arc<LinkInner>,
        from: NodeId,
        to: NodeId,
        addr: &str,
        epoch: u64,
    ) -> io::Result<Self> {
        let conn = link.dial(to, addr).await?;
        let mut hello = Vec::new();
        frame::encode_hello_at(&mut hello, from, to, epoch);
        Ok(Self {
            link,
            to,
            addr: addr.to_string(),
            hello,
            conn: Some(conn),
            last_used: Instant::now(),
        })
    }

    /// The connection to use, redialed if it is closed or has been idle long
    /// enough for the server to be closing it.
    async fn connection(&mut self) -> io::Result<&mut Dialed<Full<Bytes>>> {
        let usable = self.conn.as_ref().is_some_and(|c| {
            broken_reason(&c.broken).is_none()
                && !c.sender.is_closed()
                && self.last_used.elapsed() < self.link.idle_redial
        });
        if !usable {
            // Dropping the old sender closes that (idle) connection.
            self.conn = None;
            let dialed = tokio::time::timeout(
                self.link.connect_timeout,
                self.link.dial(self.to, &self.addr),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "redial timed out"))??;
            self.conn = Some(dialed);
            self.last_used = Instant::now();
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    async fn post(&mut self, frames: &[u8]) -> io::Result<()> {
        let mut body = BytesMut::with_capacity(self.hello.len() + frames.len());
        body.extend_from_slice(&self.hello);
        body.extend_from_slice(frames);
        let body = body.freeze();
        // A request hyper never wrote may be resent once, on a new connection.
        for attempt in 0..2 {
            let addr = self.addr.clone();
            let conn = self.connection().await?;
            if conn.sender.ready().await.is_err() {
                // Closed before anything was written.
                self.conn = None;
                continue;
            }
            let req = request(&addr, HTTP_BATCH_PATH, Full::new(body.clone()))?;
            match conn.sender.try_send_request(req).await {
                Ok(resp) => {
                    let (status, text) = answer_text(resp).await;
                    self.last_used = Instant::now();
                    if status == StatusCode::OK {
                        return Ok(());
                    }
                    self.conn = None;
                    return Err(io::Error::other(format!("peer answered {status}: {text}")));
                }
                Err(e) if attempt == 0 && e.message().is_some() => {
                    self.conn = None;
                }
                Err(e) => {
                    self.conn = None;
                    return Err(io::Error::other(e.into_error()));
                }
            }
        }
        Err(broken_error("connection closed before the request".into()))
    }
}

impl FrameSink for ShortSink {
    fn send<'a>(&'a mut self, frames: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            if frames.is_empty() {
                return Ok(());
            }
            self.post(frames).await
        })
    }
}
