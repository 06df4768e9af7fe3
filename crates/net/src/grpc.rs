//! The gRPC transport: the frames of the TCP transport, carried in gRPC
//! streams (tonic, HTTP/2), for networks and tooling built around gRPC
//! (service meshes, gRPC-aware load balancers and proxies). Like
//! [`crate::tcp`] it is a [`Link`] on top of the shared machinery of
//! [`crate::peer`] (per-peer queue and task, backoff, unreachable reports,
//! `Shared::serve_frames`, `Shared::serve_stream`, snapshot streaming); TCP
//! and TLS come from [`crate::tcp::connect`] and [`crate::tcp::accept`],
//! and tonic runs HTTP/2 (prior knowledge, no ALPN) over those streams.
//!
//! The service is `raftwork.Raft`, defined in `crates/net/proto/raftwork.proto`.
//! No code is generated from it: the two messages are written here with
//! prost's derive, the server is a hand-written router over
//! `tonic::server::Grpc` and the client calls `tonic::client::Grpc`
//! directly, so the build needs no protoc. A unit test checks that the
//! method paths, streaming flags, messages and fields here match the .proto.
//!
//! ```text
//! rpc Send(stream Chunk) returns (Ack): one call per peer and connection
//!
//!   dialer (peer task)                                        listener
//!   Chunk{hello frame} ───────────── pushed at open ─────────▶ serve_frames:
//!   Chunk{batch frames…} ─────────── FrameSink::send ────────▶ check, inbox
//!   (the sink was dropped: the request stream ends)
//!                 ◀── Ack (ended cleanly between frames) | INVALID_ARGUMENT
//!                     + reason (a frame broke a rule) | UNAVAILABLE (the
//!                     listener shuts down)
//!   The server answers only once the stream is over for it.
//!
//! rpc Snapshot(stream Chunk) returns (stream Chunk): one call per transfer
//!
//!   snapshot::send ⇄ pipe ⇄ request / response Chunks ⇄ pipe ⇄ serve_stream
//!   (Link::open_duplex)                                        (snapshot::receive)
//! ```
//!
//! Bytes to messages: a Chunk is a piece of a byte stream; chunk boundaries
//! mean nothing. The data of the Chunks of one call, concatenated in order,
//! is exactly what a TCP connection of [`crate::TcpTransport`] carries in the
//! same direction. A Chunk holds at most [`GRPC_CHUNK_BYTES_MAX`] bytes
//! (bigger frames are split); bigger messages are refused by tonic. Each side
//! of a Snapshot call is turned back into a two-way byte stream by an
//! in-process pipe (`tokio::io::duplex`) and two pumps, so `snapshot.rs`
//! runs over it unchanged.
//!
//! Invariants:
//! * **Order.** Per peer, messages never reorder. One peer task writes to
//!   one sink at a time (see `peer.rs`); a sink pushes its chunks in order
//!   into one request stream, which HTTP/2 delivers in order. When a sink is
//!   replaced (redial after a failure, or a new address), the old sink is
//!   dropped first, which ends its request stream; `open` then waits for the
//!   old call to finish (the server has answered, so everything it will ever
//!   deliver from that call is delivered, or the connection died) before it
//!   dials again. If the old call does not finish within half of
//!   `connect_timeout`, it is cancelled: only then could a few of its last
//!   frames, already read by a slow receiver, reach the inbox after the first
//!   frames of the new call.
//! * **Breaks are reported.** A sink is broken as soon as its call finishes
//!   (any answer, or a failed connection) or its request stream closes; from
//!   then on every `send` fails, so the peer task reports the peer
//!   unreachable and redials. As with TCP, where a write that reached the
//!   kernel is lost with its connection, the frames of the sends that
//!   succeeded just before a break may be lost (they sat in the request
//!   channel, tonic's or h2's buffers or the kernel's); raft retransmits.
//! * **Bounds.** Every frame is bounded by `max_frame_bytes` and checked by
//!   `serve_frames`; every message by [`GRPC_CHUNK_BYTES_MAX`]; the TLS
//!   handshake, the first bytes after it and the hello each by
//!   `handshake_timeout`; no input panics. HTTP/2 pings (every 30 s, 20 s to
//!   answer) close connections to peers that went silent with calls open. One connection per call: message
//!   traffic and each snapshot transfer have a connection of their own, as
//!   with TCP, so a snapshot never holds up heartbeats.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::http;
use hyper_util::rt::TokioIo;
use raftwork_transport::{Inbox, NodeId};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::io::{ReaderStream, StreamReader};
use tonic::codec::{ProstCodec, Streaming};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};

use crate::frame;
use crate::peer::{BoxFuture, FrameSink, Link, NetConfig, NetError, Shared};
use crate::tcp::{self, BoxStream};
use crate::tls::{PeerCert, Tls};

/// Path of `rpc Send(stream Chunk) returns (Ack)`: a hello frame and batch
/// frames from one node to one peer.
pub const GRPC_SEND_PATH: &str = "/raftwork.Raft/Send";
/// Path of `rpc Snapshot(stream Chunk) returns (stream Chunk)`: one snapshot
/// transfer as a two-way byte stream.
pub const GRPC_SNAPSHOT_PATH: &str = "/raftwork.Raft/Snapshot";
/// Most data bytes in one `Chunk` message; a longer message is refused
/// (tonic's decoder fails it) and ends its call.
pub const GRPC_CHUNK_BYTES_MAX: usize = 1 << 20;

/// Largest encoded message accepted: a full chunk plus its protobuf field
/// header (tag and length varint).
const MESSAGE_BYTES_MAX: usize = GRPC_CHUNK_BYTES_MAX + 16;
/// Chunks a Send sink may have queued before tonic takes them (the sink's
/// send waits beyond that, like a full socket).
const SEND_CHUNKS_QUEUED: usize = 4;
/// Buffer of the in-process pipe behind a Snapshot call. A read from the
/// pipe returns at most this much, so it also bounds its chunks.
const PIPE_BYTES: usize = 256 << 10;
const _: () = assert!(PIPE_BYTES <= GRPC_CHUNK_BYTES_MAX);
/// Accepted connections (TLS done) waiting for the HTTP/2 server.
const ACCEPTED_QUEUED: usize = 64;
/// HTTP/2 pings on connections with calls open, both ways: a peer that
/// stops answering them (a dead host, a half-open connection) fails its
/// calls within interval + timeout, where TCP alone could wait minutes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// `message Chunk { bytes data = 1; }`: a piece of a byte stream.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Chunk {
    #[prost(bytes = "bytes", tag = "1")]
    pub(crate) data: Bytes,
}

/// `message Ack {}`: a Send stream ended cleanly and was delivered.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Ack {}

/// Raft messages over gRPC (HTTP/2 via tonic, optionally over TLS): the
/// frames of [`TcpTransport`](crate::TcpTransport) in the Chunks of one
/// client-streaming call per peer, and each snapshot transfer in a
/// bidirectional call of its own.
///
/// Cheap to clone: clones share the transport. Keep a clone to add peers
/// ([`Transport::set_peer`]) as membership changes.
#[derive(Clone)]
pub struct GrpcTransport {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

impl GrpcTransport {
    /// Listens on `listen` (use port 0 for an ephemeral port) for node `id`
    /// and returns the transport and the node's inbox. The listener serves
    /// gRPC over HTTP/2, inside TLS when `config.tls` is set. Must be called
    /// inside a tokio runtime.
    pub async fn bind(
        id: NodeId,
        listen: impl ToSocketAddrs + std::fmt::Debug,
        config: NetConfig,
    ) -> Result<(Self, Inbox), NetError> {
        Self::serve_on(id, tcp::listen(listen).await?, config)
    }

    /// Like [`GrpcTransport::bind`], without awaiting (for synchronous
    /// builders). Must be called inside a tokio runtime.
    pub fn bind_now(
        id: NodeId,
        listen: SocketAddr,
        config: NetConfig,
    ) -> Result<(Self, Inbox), NetError> {
        Self::serve_on(id, tcp::listen_now(listen)?, config)
    }

    fn serve_on(
        id: NodeId,
        listener: TcpListener,
        config: NetConfig,
    ) -> Result<(Self, Inbox), NetError> {
        let p = tcp::prepare(id, &config, &listener)?;
        let link = GrpcLink(Arc::new(LinkInner {
            tls: p.tls.clone(),
            connect_timeout: config.connect_timeout,
            settle_grace: config.connect_timeout / 2,
            last: Mutex::new(HashMap::new()),
        }));
        let shared = Shared::new(id, config, p.inbox_tx, Arc::new(link));
        let (accepted_tx, accepted) = mpsc::channel(ACCEPTED_QUEUED);
        tokio::spawn(accept_loop(shared.clone(), listener, p.tls, accepted_tx));
        tokio::spawn(serve(shared.clone(), accepted));
        Ok((
            Self {
                shared,
                local_addr: p.local_addr,
            },
            p.inbox,
        ))
    }

    /// The address the transport listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

crate::peer::delegate_transport!(GrpcTransport);

/// Resolves once the transport shuts down (at once if it already has).
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|down| *down).await;
}

/// An error's message followed by its sources' (tonic's and hyper's top
/// level messages alone say little).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Some errors already print their source.
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

fn status_text(status: &Status) -> String {
    let code = status.code();
    let message = status.message();
    match std::error::Error::source(status).map(chain) {
        // A status made from an error carries that error's text.
        Some(more) if more.starts_with(message) => format!("{code:?}: {more}"),
        Some(more) => format!("{code:?}: {message}: {more}"),
        None => format!("{code:?}: {message}"),
    }
}

/// The data of a stream of Chunks, as an [`AsyncRead`]; a failed call is an
/// I/O error.
fn chunk_reader(
    messages: Streaming<Chunk>,
) -> StreamReader<impl Stream<Item = io::Result<Bytes>> + Unpin, Bytes> {
    StreamReader::new(messages.map(|m| {
        m.map(|c| c.data)
            .map_err(|status| io::Error::other(status_text(&status)))
    }))
}

/// Writes the data of `messages` into `pipe`, in order, then closes the
/// pipe's write side: at the end of the call, when it fails, or once nobody
/// reads the pipe.
async fn pump_in<W: AsyncWrite + Unpin>(mut messages: Streaming<Chunk>, mut pipe: W) {
    while let Ok(Some(chunk)) = messages.message().await {
        if pipe.write_all(&chunk.data).await.is_err() {
            break;
        }
    }
    let _ = pipe.shutdown().await;
}

// ---------------------------------------------------------------- server

/// An accepted connection, TLS done, with the address it came from. Until
/// its first bytes arrive, reading it fails once `first_bytes_by` passes:
/// hyper waits for the HTTP/2 preface without a deadline of its own.
struct Accepted {
    stream: BoxStream,
    remote: SocketAddr,
    /// The client's certificate, for the identity check after the hello.
    cert: PeerCert,
    first_bytes_by: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counts the connection against its address until tonic drops it.
    _admitted: crate::peer::Admitted,
}

/// The peer address and certificate of the connection a request came on (a
/// request extension, set by tonic from [`Connected`]).
#[derive(Clone)]
struct RemoteAddr(SocketAddr, PeerCert);

impl Connected for Accepted {
    type ConnectInfo = RemoteAddr;

    fn connect_info(&self) -> RemoteAddr {
        RemoteAddr(self.remote, self.cert.clone())
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if self.first_bytes_by.is_some() {
            if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
                self.first_bytes_by = None;
            } else if read.is_pending()
                && self
                    .first_bytes_by
                    .as_mut()
                    .unwrap()
                    .as_mut()
                    .poll(cx)
                    .is_ready()
            {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "nothing received in time",
                )));
            }
        }
        read
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts TCP connections, finishes TLS on each (in a task of its own, so
/// a slow handshake holds up no one) and hands them to the HTTP/2 server.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<Tls>,
    accepted: mpsc::Sender<Accepted>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let next = tokio::select! {
            a = listener.accept() => a,
            _ = wait_shutdown(&mut shutdown) => return,
        };
        match next {
            Ok((tcp, remote)) => {
                // Counted until the connection ends; over the cap it is
                // closed at once.
                let Some(admitted) = shared.admit(remote) else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let shared = shared.clone();
                let tls = tls.clone();
                let accepted = accepted.clone();
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(
                        shared.config.handshake_timeout,
                        tcp::accept(tls.as_ref(), tcp),
                    );
                    match handshake.await {
                        Ok(Ok((stream, cert))) => {
                            let first_bytes_by = Some(Box::pin(tokio::time::sleep(
                                shared.config.handshake_timeout,
                            )));
                            let conn = Accepted {
                                stream,
                                remote,
                                cert,
                                first_bytes_by,
                                _admitted: admitted,
                            };
                            let _ = accepted.send(conn).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(node = shared.id, %remote, reason = %e, "refusing connection: TLS handshake failed")
                        }
                        Err(_) => tracing::warn!(
                            node = shared.id,
                            %remote,
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

/// Runs tonic's HTTP/2 server over the accepted connections until the
/// transport shuts down.
async fn serve(shared: Arc<Shared>, accepted: mpsc::Receiver<Accepted>) {
    let mut shutdown = shared.shutdown.subscribe();
    let incoming = ReceiverStream::new(accepted).map(Ok::<_, io::Error>);
    let service = RaftService {
        shared: shared.clone(),
    };
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .serve_with_incoming_shutdown(service, incoming, async move {
            wait_shutdown(&mut shutdown).await
        })
        .await;
    if let Err(e) = served {
        tracing::warn!(node = shared.id, error = %chain(&e), "gRPC server stopped");
    }
}

/// Routes the methods of `raftwork.Raft` by path.
#[derive(Clone)]
struct RaftService {
    shared: Arc<Shared>,
}

type HttpRequest = http::Request<tonic::body::Body>;
type HttpResponse = http::Response<tonic::body::Body>;

impl tower_service::Service<HttpRequest> for RaftService {
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<HttpResponse, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: HttpRequest) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move {
            Ok(match req.uri().path() {
                GRPC_SEND_PATH => {
                    tonic::server::Grpc::new(ProstCodec::<Ack, Chunk>::default())
                        .max_decoding_message_size(MESSAGE_BYTES_MAX)
                        .client_streaming(SendMethod(shared), req)
                        .await
                }
                GRPC_SNAPSHOT_PATH => {
                    tonic::server::Grpc::new(ProstCodec::<Chunk, Chunk>::default())
                        .max_decoding_message_size(MESSAGE_BYTES_MAX)
                        .streaming(SnapshotMethod(shared), req)
                        .await
                }
                path => {
                    tracing::debug!(node = shared.id, path, "no such gRPC method");
                    Status::unimplemented(format!("no method {path}")).into_http()
                }
            })
        })
    }
}

/// The peer address (for logs) and certificate of a request's connection.
fn remote_of<T>(req: &Request<T>) -> (String, PeerCert) {
    match req.extensions().get::<RemoteAddr>() {
        Some(r) => (r.0.to_string(), r.1.clone()),
        None => ("unknown".to_string(), PeerCert::default()),
    }
}

/// `Send`: the request's bytes go to `Shared::serve_frames`.
struct SendMethod(Arc<Shared>);

impl tonic::server::ClientStreamingService<Chunk> for SendMethod {
    type Response = Ack;
    type Future = BoxFuture<'static, Result<Response<Ack>, Status>>;

    fn call(&mut self, req: Request<Streaming<Chunk>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let shutting_down = || *shared.shutdown.borrow() || shared.own_inbox.is_closed();
            if shutting_down() {
                return Err(Status::unavailable("shutting down"));
            }
            let (remote, cert) = remote_of(&req);
            match shared
                .serve_frames(chunk_reader(req.into_inner()), &remote, &cert)
                .await
            {
                // serve_frames also stops (with Ok) when the transport shuts
                // down or the node dropped its inbox: then the stream may not
                // have been delivered whole.
                Ok(()) if shutting_down() => Err(Status::unavailable("shutting down")),
                Ok(()) => Ok(Response::new(Ack {})),
                Err(reason) => Err(Status::invalid_argument(reason)),
            }
        })
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;

/// `Snapshot`: the call becomes a two-way byte stream (a pipe and a pump)
/// served by `Shared::serve_stream`.
struct SnapshotMethod(Arc<Shared>);

impl tonic::server::StreamingService<Chunk> for SnapshotMethod {
    type Response = Chunk;
    type ResponseStream = ChunkStream;
    type Future = std::future::Ready<Result<Response<ChunkStream>, Status>>;

    #[allow(clippy::result_large_err)] // tonic's Status, in the response stream
    fn call(&mut self, req: Request<Streaming<Chunk>>) -> Self::Future {
        let shared = self.0.clone();
        let (remote, cert) = remote_of(&req);
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let (their_read, their_write) = tokio::io::split(theirs);
        tokio::spawn(pump_in(req.into_inner(), their_write));
        tokio::spawn(async move {
            let mut shutdown = shared.shutdown.subscribe();
            // Refusals and failures are logged inside. Dropping the pipe
            // ends the response stream, which ends the call.
            tokio::select! {
                () = shared.serve_stream(Box::new(ours), &remote, &cert) => {}
                () = wait_shutdown(&mut shutdown) => {}
            }
        });
        let out = ReaderStream::with_capacity(their_read, PIPE_BYTES).map(|r| {
            r.map(|data| Chunk { data })
                .map_err(|e| Status::internal(e.to_string()))
        });
        std::future::ready(Ok(Response::new(Box::pin(out) as ChunkStream)))
    }
}

// ---------------------------------------------------------------- client

struct GrpcLink(Arc<LinkInner>);

struct LinkInner {
    tls: Option<Tls>,
    connect_timeout: Duration,
    /// How long `open` waits for the previous Send call to a peer to finish.
    settle_grace: Duration,
    /// The task driving the newest Send call to each peer.
    last: Mutex<HashMap<NodeId, JoinHandle<()>>>,
}

/// Dials the one address of a channel (TCP, then TLS when configured),
/// whatever URI tonic asks for.
#[derive(Clone)]
struct Dialer {
    tls: Option<Tls>,
    to: NodeId,
    addr: String,
}

impl tower_service::Service<Uri> for Dialer {
    type Response = TokioIo<BoxStream>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<TokioIo<BoxStream>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (tls, to, addr) = (self.tls.clone(), self.to, self.addr.clone());
        Box::pin(async move { Ok(TokioIo::new(tcp::connect(tls.as_ref(), to, &addr).await?)) })
    }
}

fn broken_reason(rx: &watch::Receiver<Option<String>>) -> Option<String> {
    if let Some(reason) = rx.borrow().clone() {
        return Some(reason);
    }
    // The call's task is gone without a word: it was cancelled.
    rx.has_changed()
        .is_err()
        .then(|| "stream cancelled".to_string())
}

/// Resolves once the call is over (or its task is gone).
async fn wait_broken(rx: &mut watch::Receiver<Option<String>>) {
    let _ = rx.wait_for(Option::is_some).await;
}

fn broken_error(reason: String) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, reason)
}

impl LinkInner {
    /// Waits for the previous Send call to `to` to finish; cancels it after
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
                    "previous gRPC stream to the peer did not finish in time; cancelling it"
                );
                task.abort();
            }
        }
    }

    /// A channel over one new connection to peer `to` at `addr`, HTTP/2
    /// handshake done.
    async fn dial(&self, to: NodeId, addr: &str) -> io::Result<tonic::client::Grpc<Channel>> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, chain(&e)))?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        let channel = endpoint
            .connect_with_connector(Dialer {
                tls: self.tls.clone(),
                to,
                addr: addr.to_string(),
            })
            .await
            .map_err(|e| io::Error::other(chain(&e)))?;
        let mut grpc =
            tonic::client::Grpc::new(channel).max_decoding_message_size(MESSAGE_BYTES_MAX);
        grpc.ready()
            .await
            .map_err(|e| io::Error::other(chain(&e)))?;
        Ok(grpc)
    }

    /// Opens a Send call to `to` and pushes the hello into it.
    async fn open_send(
        &self,
        from: NodeId,
        to: NodeId,
        addr: &str,
        epoch: u64,
    ) -> io::Result<SendSink> {
        self.settle_previous(to).await;
        let mut grpc = self.dial(to, addr).await?;
        let (chunks, rx) = mpsc::channel(SEND_CHUNKS_QUEUED);
        let mut hello = Vec::new();
        frame::encode_hello_at(&mut hello, from, to, epoch);
        chunks
            .try_send(Chunk { data: hello.into() })
            .map_err(|_| io::Error::other("request stream refused the hello"))?;
        let (broken_tx, broken) = watch::channel(None);
        let task = tokio::spawn(async move {
            let answer = grpc
                .client_streaming(
                    Request::new(ReceiverStream::new(rx)),
                    http::uri::PathAndQuery::from_static(GRPC_SEND_PATH),
                    ProstCodec::<Chunk, Ack>::default(),
                )
                .await;
            let reason = match answer {
                Ok(_) => "peer ended the stream".to_string(),
                Err(status) => format!("stream ended: {}", status_text(&status)),
            };
            let _ = broken_tx.send(Some(reason));
        });
        self.last.lock().unwrap().insert(to, task);
        Ok(SendSink { chunks, broken })
    }

    /// Opens a Snapshot call to `addr` and returns its two-way byte stream.
    async fn open_snapshot(&self, to: NodeId, addr: &str) -> io::Result<BoxStream> {
        let mut grpc = self.dial(to, addr).await?;
        let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
        let (their_read, their_write) = tokio::io::split(theirs);
        // A read from the pipe fails only if it is gone: the stream then ends.
        let outgoing = ReaderStream::with_capacity(their_read, PIPE_BYTES)
            .map_while(Result::ok)
            .map(|data| Chunk { data });
        let response = grpc
            .streaming(
                Request::new(outgoing),
                http::uri::PathAndQuery::from_static(GRPC_SNAPSHOT_PATH),
                ProstCodec::<Chunk, Chunk>::default(),
            )
            .await
            .map_err(|status| io::Error::other(status_text(&status)))?;
        tokio::spawn(async move {
            pump_in(response.into_inner(), their_write).await;
            // The channel (and so the connection) lives as long as the call.
            drop(grpc);
        });
        Ok(Box::new(ours))
    }
}

impl Link for GrpcLink {
    fn open<'a>(
        &'a self,
        from: NodeId,
        to: NodeId,
        addr: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, io::Result<Box<dyn FrameSink>>> {
        Box::pin(async move {
            Ok(Box::new(self.0.open_send(from, to, addr, epoch).await?) as Box<dyn FrameSink>)
        })
    }

    fn open_duplex<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
    ) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            // The caller sets no deadline of its own.
            tokio::time::timeout(self.0.connect_timeout, self.0.open_snapshot(to, addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "snapshot call timed out"))?
        })
    }
}

/// Pushes frames into the request stream of an open Send call.
struct SendSink {
    chunks: mpsc::Sender<Chunk>,
    broken: watch::Receiver<Option<String>>,
}

impl FrameSink for SendSink {
    fn send<'a>(&'a mut self, frames: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            for piece in frames.chunks(GRPC_CHUNK_BYTES_MAX) {
                if let Some(reason) = broken_reason(&self.broken) {
                    return Err(broken_error(reason));
                }
                let chunk = Chunk {
                    data: Bytes::copy_from_slice(piece),
                };
                let pushed = tokio::select! {
                    r = self.chunks.send(chunk) => r.is_ok(),
                    () = wait_broken(&mut self.broken) => false,
                };
                if !pushed {
                    return Err(broken_error(
                        broken_reason(&self.broken)
                            .unwrap_or_else(|| "request stream closed".into()),
                    ));
                }
            }
            // A call that ended meanwhile fails this send, not the next one.
            match broken_reason(&self.broken) {
                Some(reason) => Err(broken_error(reason)),
                None => Ok(()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    const PROTO: &str = include_str!("../proto/raftwork.proto");

    /// The .proto's tokens, comments dropped, punctuation split off.
    fn tokens(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for line in text.lines() {
            let line = line.split("//").next().unwrap();
            let mut spaced = String::new();
            for c in line.chars() {
                if "(){};=".contains(c) {
                    spaced.push(' ');
                    spaced.push(c);
                    spaced.push(' ');
                } else {
                    spaced.push(c);
                }
            }
            out.extend(spaced.split_whitespace().map(str::to_string));
        }
        out
    }

    /// (method path, request streams, request type, response streams,
    /// response type) for every rpc, and (message, fields as "type name =
    /// tag") for every message.
    #[allow(clippy::type_complexity)]
    fn parse(
        text: &str,
    ) -> (
        Vec<(String, bool, String, bool, String)>,
        Vec<(String, Vec<String>)>,
    ) {
        let t = tokens(text);
        let at = |i: usize| t.get(i).map(String::as_str).unwrap_or("");
        let (mut package, mut service) = (String::new(), String::new());
        let (mut rpcs, mut messages) = (Vec::new(), Vec::new());
        let mut i = 0;
        while i < t.len() {
            match at(i) {
                "package" => {
                    package = at(i + 1).to_string();
                    i += 2;
                }
                "service" => {
                    service = at(i + 1).to_string();
                    i += 2;
                }
                "rpc" => {
                    let name = at(i + 1).to_string();
                    let mut j = i + 3; // past "rpc Name ("
                    let req_stream = at(j) == "stream";
                    j += req_stream as usize;
                    let req = at(j).to_string();
                    assert_eq!((at(j + 1), at(j + 2), at(j + 3)), (")", "returns", "("));
                    j += 4;
                    let resp_stream = at(j) == "stream";
                    j += resp_stream as usize;
                    let resp = at(j).to_string();
                    assert_eq!((at(j + 1), at(j + 2)), (")", ";"));
                    rpcs.push((
                        format!("/{package}.{service}/{name}"),
                        req_stream,
                        req,
                        resp_stream,
                        resp,
                    ));
                    i = j + 3;
                }
                "message" => {
                    let name = at(i + 1).to_string();
                    assert_eq!(at(i + 2), "{");
                    let mut j = i + 3;
                    let mut fields = Vec::new();
                    while at(j) != "}" {
                        assert_eq!((at(j + 2), at(j + 4)), ("=", ";"), "field of {name}");
                        fields.push(format!("{} {} = {}", at(j), at(j + 1), at(j + 3)));
                        j += 5;
                    }
                    messages.push((name, fields));
                    i = j + 1;
                }
                _ => i += 1,
            }
        }
        (rpcs, messages)
    }

    #[test]
    fn the_proto_matches_the_code() {
        let (rpcs, messages) = parse(PROTO);
        let chunk = "Chunk".to_string();
        assert_eq!(
            rpcs,
            vec![
                (
                    GRPC_SEND_PATH.to_string(),
                    true,
                    chunk.clone(),
                    false,
                    "Ack".to_string()
                ),
                (
                    GRPC_SNAPSHOT_PATH.to_string(),
                    true,
                    chunk.clone(),
                    true,
                    chunk.clone()
                ),
            ],
            "rpcs of raftwork.proto against the paths and codecs in grpc.rs"
        );
        assert_eq!(
            messages,
            vec![
                (chunk, vec!["bytes data = 1".to_string()]),
                ("Ack".to_string(), vec![]),
            ],
            "messages of raftwork.proto against the prost structs in grpc.rs"
        );
        // And the structs encode as those fields do: field 1, length-delimited.
        let encoded = Chunk {
            data: Bytes::from_static(b"xy"),
        }
        .encode_to_vec();
        assert_eq!(encoded, [0x0a, 2, b'x', b'y']);
        assert!(Ack {}.encode_to_vec().is_empty());
    }

    #[test]
    fn the_parser_sees_a_changed_proto() {
        let changed = PROTO.replace("rpc Send(stream Chunk)", "rpc Push(stream Chunk)");
        assert_ne!(parse(&changed).0, parse(PROTO).0);
        let changed = PROTO.replace("bytes data = 1;", "bytes data = 2;");
        assert_ne!(parse(&changed).1, parse(PROTO).1);
    }
}
