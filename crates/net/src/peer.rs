//! What every network transport shares: the per-peer outbound queue and
//! task, reconnect with backoff, unreachable reports, and the inbound side
//! that reads frames, validates them and hands them to the node.
//!
//! ```text
//!  send(env) ──try_send──▶ [peer queue, bounded] ──▶ peer task ──frames──▶ Link (TCP, HTTP, …) ──▶ peer:
//!     │ full / no peer                                 │ open, send, backoff                 serve_frames:
//!     ▼                                                ▼ failure                             hello, frames,
//!  Inbound::Unreachable ◀──────────── own inbox ◀──────┘                                     validate ──▶ inbox
//! ```
//!
//! Invariants: one task per peer, fed by one FIFO queue, so envelopes to a
//! peer go out in order or not at all; nothing on the send path blocks; a
//! connection carries traffic one way (the dialer writes, the acceptor
//! reads), as etcd's streams do.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftwork_transport::{Envelope, Inbound, InboxSender, NodeId, TransportError};
use tokio::io::AsyncRead;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::frame::{self, FrameError};
use crate::snapshot;
use crate::tcp::BoxStream;
use crate::tls::{check_peer_identity, PeerCert, TlsConfig, TlsConfigError};
use raft::prelude::MessageType;
use raftwork_storage::SnapshotStore;

/// Settings shared by the network transports.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Largest frame accepted or sent, in bytes. A bigger incoming frame
    /// closes its connection; a bigger outgoing envelope is dropped and its
    /// peer reported unreachable. Default: 64 MiB. (Transports that stream
    /// snapshots send them in chunks of `snapshot_chunk_bytes`; over a
    /// transport that does not, a snapshot travels inline in one message and
    /// this caps its size.)
    pub max_frame_bytes: usize,
    /// Envelopes queued per peer before sends to it are dropped. Default: 1,024.
    pub peer_queue_envelopes: usize,
    /// Time allowed to open a connection (TCP and TLS). Default: 2 s.
    pub connect_timeout: Duration,
    /// Time an accepted connection has to finish TLS and say hello. Default: 5 s.
    pub handshake_timeout: Duration,
    /// First wait before redialing a peer that failed. Default: 50 ms.
    pub backoff_min: Duration,
    /// Cap of the doubling redial wait. Default: 5 s.
    pub backoff_max: Duration,
    /// TLS or mutual TLS on every connection; `None` is plaintext. Default: none.
    pub tls: Option<TlsConfig>,
    /// Pace of a snapshot transfer, in bytes per second on the wire
    /// (compressed); 0 is unlimited. Default: 0.
    pub snapshot_rate_bytes_per_sec: u64,
    /// Snapshot data per chunk, before compression. Default: 1 MiB. At most
    /// `max_frame_bytes - 64`.
    pub snapshot_chunk_bytes: usize,
    /// Connections accepted at once from one IP address; more are closed at
    /// once. Default: 32. Minimum: 1.
    pub connections_per_address_max: usize,
    /// Snapshots being received or kept for a resume at once; an offer past
    /// it is refused (after dropping kept ones that expired, then the oldest
    /// kept one). With `snapshot_receive_bytes_max` this bounds the disk that
    /// incoming snapshots can take. Default: 4. Minimum: 1.
    pub snapshot_receives_max: usize,
    /// Largest snapshot accepted, in bytes of data (uncompressed); a transfer
    /// that goes past it is refused and its partial data deleted.
    /// Default: 64 GiB.
    pub snapshot_receive_bytes_max: u64,
    /// Time a snapshot transfer may go without a frame; past it the
    /// connection is closed and what arrived is kept for a resume.
    /// Default: 30 s.
    pub snapshot_idle_timeout: Duration,
    /// Time a broken transfer's data is kept for a resume. Default: 5 min.
    pub snapshot_resume_window: Duration,
    /// The cluster epoch this node is at, carried in every hello (see
    /// [`Fencing`]); `None` is epoch 0 for ever. Default: none.
    pub fencing: Option<Arc<dyn Fencing>>,
}

/// Fencing by cluster epoch: a number all members of a cluster share,
/// raised when a cluster is rebuilt from a survivor (disaster recovery), so
/// that the members it left behind cannot come back.
///
/// Every hello carries the dialer's epoch. An acceptor admits only its
/// own: an older one is refused and told so (the dialer is fenced out); a
/// newer one means the acceptor itself was left behind. On two-way streams
/// (TCP, and every snapshot stream) the acceptor answers the hello with a
/// HelloAck carrying its verdict and epoch, and the TCP dialer waits for
/// it, so both sides learn; the HTTP and gRPC message streams are one-way,
/// so there only the acceptor's check applies.
///
/// Whoever meets a newer epoch asks [`Fencing::newer_seen`]: a node that
/// has not joined any cluster yet adopts it (returns true); any other is
/// fenced (false) and must stop, and the transport refuses the connection.
pub trait Fencing: Send + Sync + std::fmt::Debug + 'static {
    /// This node's epoch now.
    fn epoch(&self) -> u64;
    /// Peer `peer` is at `epoch`, newer than ours: adopt it (true), or be
    /// fenced out (false).
    fn newer_seen(&self, epoch: u64, peer: NodeId) -> bool;
    /// What this node tells a peer that asks, after an accepted hello (see
    /// [`crate::probe_hello`]): opaque to the transport, at most
    /// [`crate::frame::DESCRIPTION_BYTES_MAX`]. A node about to join checks
    /// its settings against it. Default: nothing.
    fn describe(&self) -> Vec<u8> {
        Vec::new()
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 << 20,
            peer_queue_envelopes: 1024,
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            tls: None,
            snapshot_rate_bytes_per_sec: 0,
            snapshot_chunk_bytes: 1 << 20,
            connections_per_address_max: 32,
            snapshot_receives_max: 4,
            snapshot_receive_bytes_max: 64 << 30,
            snapshot_idle_timeout: Duration::from_secs(30),
            snapshot_resume_window: Duration::from_secs(300),
            fencing: None,
        }
    }
}

impl NetConfig {
    pub(crate) fn validate(&self, id: NodeId) -> Result<(), NetError> {
        if id == 0 {
            return Err(NetError::Config("node id 0".into()));
        }
        if self.max_frame_bytes < 1024 {
            return Err(NetError::Config(
                "max_frame_bytes must be at least 1024".into(),
            ));
        }
        if self.peer_queue_envelopes == 0 {
            return Err(NetError::Config(
                "peer_queue_envelopes must be at least 1".into(),
            ));
        }
        if self.snapshot_chunk_bytes == 0 || self.snapshot_chunk_bytes + 64 > self.max_frame_bytes {
            return Err(NetError::Config(
                "snapshot_chunk_bytes must be between 1 and max_frame_bytes - 64".into(),
            ));
        }
        if self.connections_per_address_max == 0 || self.snapshot_receives_max == 0 {
            return Err(NetError::Config(
                "connections_per_address_max and snapshot_receives_max must be at least 1".into(),
            ));
        }
        if self.snapshot_idle_timeout.is_zero() {
            return Err(NetError::Config(
                "snapshot_idle_timeout must be above zero".into(),
            ));
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(NetError::Config(
                "need 0 < backoff_min <= backoff_max".into(),
            ));
        }
        Ok(())
    }
}

/// Why a transport could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// The settings contradict themselves.
    #[error("invalid network settings: {0}")]
    Config(String),
}

/// Implements [`raftwork_transport::Transport`] for a transport handle with
/// a `shared: Arc<Shared>` field: every network transport behaves the same
/// above its link, and streams snapshots.
macro_rules! delegate_transport {
    ($t:ty) => {
        impl raftwork_transport::Transport for $t {
            fn send(&self, envelope: raftwork_transport::Envelope) {
                self.shared.send(envelope)
            }

            fn set_peer(
                &self,
                id: raftwork_transport::NodeId,
                address: &str,
            ) -> Result<(), raftwork_transport::TransportError> {
                self.shared.set_peer(id, address)
            }

            fn remove_peer(&self, id: raftwork_transport::NodeId) {
                self.shared.remove_peer(id)
            }

            fn shutdown(&self) {
                self.shared.shutdown()
            }

            fn streams_snapshots(&self) -> bool {
                true
            }

            fn attach_snapshots(
                &self,
                group_id: u64,
                store: std::sync::Arc<dyn raftwork_storage::SnapshotStore>,
            ) {
                self.shared.attach_snapshots(group_id, store)
            }

            fn detach_snapshots(&self, group_id: u64) {
                self.shared.detach_snapshots(group_id)
            }
        }
    };
}
pub(crate) use delegate_transport;

/// A boxed future, for the object-safe link traits.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How one transport carries frames to a peer. `open` connects and says
/// hello; the returned sink writes frames in order until it fails.
pub(crate) trait Link: Send + Sync + 'static {
    /// `epoch` goes in the hello (see [`Fencing`]). A link that reads the
    /// acceptor's HelloAck fails a refused hello with a [`HelloRefused`]
    /// inside the `io::Error`.
    fn open<'a>(
        &'a self,
        from: NodeId,
        to: NodeId,
        addr: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, std::io::Result<Box<dyn FrameSink>>>;

    /// Opens a two-way byte stream to peer `to` at `addr`, for a snapshot
    /// transfer. Links that cannot say no: the transport then does not
    /// stream snapshots (they travel inline in the message).
    fn open_duplex<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
    ) -> BoxFuture<'a, std::io::Result<BoxStream>> {
        let _ = (to, addr);
        Box::pin(async {
            Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this link cannot stream snapshots",
            ))
        })
    }
}

/// An open outbound path to one peer.
pub(crate) trait FrameSink: Send {
    /// Delivers `frames` (one or more encoded frames) after everything sent
    /// before, or fails. After a failure the sink is dropped.
    fn send<'a>(&'a mut self, frames: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>>;

    /// Ends a healthy sink that is being replaced (the peer's address
    /// changed): returns once the peer has read everything sent, or after
    /// `wait`, so frames on the next connection cannot overtake them.
    fn finish(self: Box<Self>, wait: Duration) -> BoxFuture<'static, ()> {
        let _ = wait;
        Box::pin(async {})
    }
}

struct PeerHandle {
    tx: mpsc::Sender<Envelope>,
    /// Address and a generation bumped on every change (forces a redial).
    addr: Arc<Mutex<(String, u64)>>,
}

/// State shared by a transport's handle, its peer tasks and its listeners.
pub(crate) struct Shared {
    pub(crate) id: NodeId,
    pub(crate) config: NetConfig,
    pub(crate) own_inbox: InboxSender,
    /// Each group's snapshot store, once attached: that group's snapshots
    /// are then streamed from and into it.
    snapshots: Mutex<HashMap<u64, Arc<dyn SnapshotStore>>>,
    /// Snapshots being received or kept for resuming (see `snapshot.rs`).
    pub(crate) partials: Mutex<snapshot::Partials>,
    /// Connections open per remote IP address (see [`Shared::admit`]).
    connections: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peers: Mutex<HashMap<NodeId, PeerHandle>>,
    pub(crate) shutdown: watch::Sender<bool>,
    runtime: tokio::runtime::Handle,
    link: Arc<dyn Link>,
    pub(crate) snapshot_metrics: crate::metrics::SnapshotSends,
}

impl Shared {
    /// Must be called inside a tokio runtime.
    pub(crate) fn new(
        id: NodeId,
        config: NetConfig,
        own_inbox: InboxSender,
        link: Arc<dyn Link>,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            config,
            own_inbox,
            snapshots: Mutex::default(),
            partials: Mutex::default(),
            connections: Arc::default(),
            peers: Mutex::new(HashMap::new()),
            shutdown: watch::channel(false).0,
            runtime: tokio::runtime::Handle::current(),
            link,
            snapshot_metrics: crate::metrics::SnapshotSends::new(),
        })
    }

    fn report_unreachable(&self, group_id: u64, to: NodeId) {
        let _ = self
            .own_inbox
            .try_send(Inbound::Unreachable { group_id, to });
    }

    /// [`raftwork_transport::Transport::attach_snapshots`].
    pub(crate) fn attach_snapshots(&self, group: u64, store: Arc<dyn SnapshotStore>) {
        self.snapshots.lock().unwrap().insert(group, store);
    }

    /// [`raftwork_transport::Transport::detach_snapshots`].
    pub(crate) fn detach_snapshots(&self, group: u64) {
        self.snapshots.lock().unwrap().remove(&group);
    }

    /// Group `group`'s snapshot store, if one is attached.
    pub(crate) fn snapshot_store(&self, group: u64) -> Option<Arc<dyn SnapshotStore>> {
        self.snapshots.lock().unwrap().get(&group).cloned()
    }

    /// Whether any group's snapshots are streamed.
    fn streams_any(&self) -> bool {
        !self.snapshots.lock().unwrap().is_empty()
    }

    /// Admits a connection from `remote` if fewer than
    /// `connections_per_address_max` from its IP address are open; the
    /// connection counts until the returned guard drops.
    pub(crate) fn admit(&self, remote: SocketAddr) -> Option<Admitted> {
        let ip = remote.ip();
        let mut open = self.connections.lock().unwrap();
        let count = open.entry(ip).or_insert(0);
        if *count >= self.config.connections_per_address_max {
            drop(open);
            tracing::warn!(
                node = self.id,
                %remote,
                limit = self.config.connections_per_address_max,
                "refusing connection: too many from this address"
            );
            return None;
        }
        *count += 1;
        Some(Admitted {
            connections: self.connections.clone(),
            ip,
        })
    }

    /// Serves an accepted two-way stream. It must open with a hello within
    /// `handshake_timeout` (nothing else is read from a connection that has
    /// not said who it is); the next frame says what it is: a snapshot
    /// transfer (an offer) or a message stream (batches).
    pub(crate) async fn serve_stream(&self, stream: BoxStream, remote: &str, cert: &PeerCert) {
        let mut reader = tokio::io::BufReader::with_capacity(256 << 10, stream);
        // A two-way stream: the dialer learns the verdict (see `Fencing`).
        let (from, verdict) = match self.read_hello_verdict(&mut reader, remote, cert).await {
            Ok(from) => (Some(from), frame::HelloVerdict::Accepted),
            Err((_, Some(verdict))) => (None, verdict),
            Err((_, None)) => return, // logged inside
        };
        let mut ack = Vec::new();
        frame::encode_hello_ack(&mut ack, verdict, self.epoch());
        let acked = async {
            tokio::io::AsyncWriteExt::write_all(&mut reader, &ack).await?;
            tokio::io::AsyncWriteExt::flush(&mut reader).await
        };
        if tokio::time::timeout(self.config.handshake_timeout, acked)
            .await
            .map_or(true, |r| r.is_err())
        {
            return;
        }
        let Some(from) = from else {
            return;
        };
        let mut shutdown = self.shutdown.subscribe();
        let first = tokio::select! {
            f = frame::read_frame(&mut reader, self.config.max_frame_bytes) => f,
            _ = shutdown.changed() => return,
        };
        let (kind, body) = match first {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(node = self.id, remote, from, reason = %e, "closing connection");
                return;
            }
        };
        if kind == frame::KIND_DESCRIBE {
            let mut description = self
                .config
                .fencing
                .as_ref()
                .map(|f| f.describe())
                .unwrap_or_default();
            description.truncate(frame::DESCRIPTION_BYTES_MAX);
            let mut answer = Vec::new();
            frame::encode_raw(&mut answer, frame::KIND_DESCRIPTION, &description);
            let sent = async {
                tokio::io::AsyncWriteExt::write_all(&mut reader, &answer).await?;
                tokio::io::AsyncWriteExt::flush(&mut reader).await
            };
            let _ = tokio::time::timeout(self.config.handshake_timeout, sent).await;
            return;
        }
        if kind != frame::KIND_SNAP_OFFER {
            let _ = self
                .batch_loop(reader, remote, from, Some((kind, body)))
                .await;
            return;
        }
        let outcome = tokio::select! {
            r = snapshot::receive(self, &mut reader, from, &body) => r,
            _ = shutdown.changed() => Err("transport shut down".to_string()),
        };
        if let Err(reason) = outcome {
            tracing::warn!(node = self.id, remote, from, %reason, "snapshot transfer failed");
        }
    }

    /// Reads the hello that opens every connection, within
    /// `handshake_timeout`, and returns the node it names as the sender, once
    /// `cert` proves it is that node (when certificates are bound to nodes).
    async fn read_hello<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        remote: &str,
        cert: &PeerCert,
    ) -> Result<NodeId, String> {
        self.read_hello_verdict(reader, remote, cert)
            .await
            .map_err(|(reason, _)| reason)
    }

    /// This node's cluster epoch (see [`Fencing`]).
    pub(crate) fn epoch(&self) -> u64 {
        self.config.fencing.as_ref().map_or(0, |f| f.epoch())
    }

    /// [`Shared::read_hello`], with the verdict to send back when the hello
    /// was refused for its epoch (`None`: refused for another reason).
    async fn read_hello_verdict<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        remote: &str,
        cert: &PeerCert,
    ) -> Result<NodeId, (String, Option<frame::HelloVerdict>)> {
        let node = self.id;
        let hello = async {
            let (kind, body) = frame::read_frame(reader, 64)
                .await
                .map_err(|e| format!("bad hello: {e}"))?
                .ok_or("closed before hello")?;
            let (from, to, epoch) =
                frame::decode_hello_at(kind, &body).map_err(|e| e.to_string())?;
            check_peer_identity(self.config.tls.as_ref(), from, cert)?;
            Ok::<_, String>((from, to, epoch))
        };
        let (from, theirs) = match tokio::time::timeout(self.config.handshake_timeout, hello).await
        {
            Ok(Ok((from, to, _))) if to != node => {
                let reason = format!("hello from node {from} is for node {to}");
                tracing::warn!(node, remote, %reason, "refusing connection");
                return Err((reason, Some(frame::HelloVerdict::NotForMe)));
            }
            Ok(Ok((from, _, epoch))) => (from, epoch),
            Ok(Err(reason)) => {
                tracing::warn!(node, remote, %reason, "refusing connection");
                return Err((reason, None));
            }
            Err(_) => {
                tracing::warn!(node, remote, "refusing connection: no hello in time");
                return Err(("no hello in time".into(), None));
            }
        };
        let ours = self.epoch();
        if theirs == ours {
            return Ok(from);
        }
        if theirs < ours {
            let reason = format!(
                "node {from} is at cluster epoch {theirs}, older than ours ({ours}): it was left \
                 out when the cluster was recovered"
            );
            tracing::warn!(node, remote, from, %reason, "refusing connection");
            return Err((reason, Some(frame::HelloVerdict::DialerOlder)));
        }
        if self
            .config
            .fencing
            .as_ref()
            .is_some_and(|f| f.newer_seen(theirs, from))
        {
            tracing::info!(
                node,
                from,
                epoch = theirs,
                "adopted the cluster epoch of a peer"
            );
            return Ok(from);
        }
        let reason = format!(
            "node {from} is at cluster epoch {theirs}, newer than ours ({ours}): this node was \
             left out when the cluster was recovered"
        );
        tracing::error!(node, remote, from, %reason, "refusing connection");
        Err((reason, Some(frame::HelloVerdict::DialerNewer)))
    }

    /// [`raftwork_transport::Transport::send`].
    pub(crate) fn send(&self, envelope: Envelope) {
        let (group_id, to) = (envelope.group_id, envelope.to);
        let peers = self.peers.lock().unwrap();
        let queued = match peers.get(&to) {
            Some(p) => p.tx.try_send(envelope).is_ok(),
            None => {
                tracing::debug!(node = self.id, to, "no address for peer");
                false
            }
        };
        drop(peers);
        if !queued {
            crate::metrics::send_failed(to);
            self.report_unreachable(group_id, to);
        }
    }

    /// [`raftwork_transport::Transport::set_peer`].
    pub(crate) fn set_peer(
        self: &Arc<Self>,
        id: NodeId,
        address: &str,
    ) -> Result<(), TransportError> {
        let invalid = |reason: &str| TransportError::InvalidAddress {
            id,
            address: address.to_string(),
            reason: reason.to_string(),
        };
        if id == 0 {
            return Err(invalid("node id 0"));
        }
        match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => return Err(invalid("expected host:port")),
        }
        let mut peers = self.peers.lock().unwrap();
        if let Some(p) = peers.get(&id) {
            let mut a = p.addr.lock().unwrap();
            if a.0 != address {
                *a = (address.to_string(), a.1 + 1);
            }
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(self.config.peer_queue_envelopes);
        let addr = Arc::new(Mutex::new((address.to_string(), 0)));
        self.runtime
            .spawn(peer_task(self.clone(), id, rx, addr.clone()));
        peers.insert(id, PeerHandle { tx, addr });
        Ok(())
    }

    /// [`raftwork_transport::Transport::remove_peer`].
    pub(crate) fn remove_peer(&self, id: NodeId) {
        self.peers.lock().unwrap().remove(&id);
    }

    /// [`raftwork_transport::Transport::shutdown`].
    pub(crate) fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        self.peers.lock().unwrap().clear();
    }

    /// Reads a hello and then batches from `reader` until it ends, fails or
    /// breaks a rule, delivering each batch to the inbox. `remote` names the
    /// other end in logs. `Ok` when the stream ended cleanly between frames
    /// (or the transport shut down); `Err` with the logged reason otherwise.
    pub(crate) async fn serve_frames<R: AsyncRead + Unpin>(
        &self,
        mut reader: R,
        remote: &str,
        cert: &PeerCert,
    ) -> Result<(), String> {
        let from = self.read_hello(&mut reader, remote, cert).await?;
        self.batch_loop(reader, remote, from, None).await
    }

    /// Delivers batch frames from `from` (starting with `first`, if the
    /// caller read it already) until the stream ends or breaks a rule.
    async fn batch_loop<R: AsyncRead + Unpin>(
        &self,
        mut reader: R,
        remote: &str,
        from: NodeId,
        mut first: Option<(u8, bytes::Bytes)>,
    ) -> Result<(), String> {
        let node = self.id;
        let cfg = &self.config;
        let mut shutdown = self.shutdown.subscribe();
        let metrics = crate::metrics::PeerIn::new(from);
        loop {
            let next = match first.take() {
                Some(f) => Ok(Some(f)),
                None => tokio::select! {
                    f = frame::read_frame(&mut reader, cfg.max_frame_bytes) => f,
                    _ = shutdown.changed() => return Ok(()),
                },
            };
            let env = match next {
                Ok(Some((kind, body))) => {
                    metrics.bytes.increment(body.len() as u64);
                    frame::decode_batch(kind, &body)
                }
                Ok(None) => return Ok(()),
                Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Err(FrameError::Malformed("connection closed mid-frame".into()))
                }
                Err(e) => Err(e),
            };
            let env = match env.and_then(|env| check_envelope(env, from, node)) {
                Ok(env) => env,
                Err(e) => {
                    tracing::warn!(node, remote, from, reason = %e, "closing connection");
                    return Err(e.to_string());
                }
            };
            metrics.messages.increment(env.messages.len() as u64);
            if self.own_inbox.send(Inbound::Messages(env)).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// A connection counted by [`Shared::admit`]; dropping it uncounts it.
pub(crate) struct Admitted {
    connections: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.connections.lock().unwrap();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// An acceptor refused our hello for its epoch (see [`Fencing`]); carried
/// inside the `io::Error` a link's `open` fails with.
#[derive(Debug)]
pub(crate) struct HelloRefused {
    pub(crate) verdict: frame::HelloVerdict,
    /// The acceptor's epoch.
    pub(crate) epoch: u64,
}

impl std::fmt::Display for HelloRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.verdict {
            frame::HelloVerdict::DialerOlder => write!(
                f,
                "refused: the peer is at cluster epoch {}, newer than ours",
                self.epoch
            ),
            frame::HelloVerdict::NotForMe => {
                write!(f, "refused: the peer is not the node our hello is for")
            }
            _ => write!(
                f,
                "refused: the peer is at cluster epoch {}, older than ours",
                self.epoch
            ),
        }
    }
}

impl std::error::Error for HelloRefused {}

impl Shared {
    /// Our hello to `peer` was refused for its epoch: adopt a newer one or
    /// be fenced (see [`Fencing`]), or note a stale peer.
    fn hello_refused(&self, peer: NodeId, refused: &HelloRefused) {
        let ours = self.epoch();
        match refused.verdict {
            frame::HelloVerdict::DialerOlder if refused.epoch > ours => {
                let adopted = self
                    .config
                    .fencing
                    .as_ref()
                    .is_some_and(|f| f.newer_seen(refused.epoch, peer));
                if adopted {
                    tracing::info!(
                        node = self.id,
                        peer,
                        epoch = refused.epoch,
                        "adopted the cluster epoch of a peer"
                    );
                } else {
                    tracing::error!(
                        node = self.id,
                        peer,
                        ours,
                        theirs = refused.epoch,
                        "fenced: the cluster was recovered at a newer epoch without this node"
                    );
                }
            }
            frame::HelloVerdict::NotForMe => tracing::warn!(
                node = self.id,
                peer,
                "peer refused our hello: it is not that node (another cluster, or another \
                 token)"
            ),
            _ => tracing::warn!(
                node = self.id,
                peer,
                ours,
                theirs = refused.epoch,
                "peer refused our hello: it is at an older cluster epoch"
            ),
        }
    }
}

/// Most envelopes taken from a peer queue for one write.
const BATCH_ENVELOPES_MAX: usize = 256;

async fn peer_task(
    shared: Arc<Shared>,
    peer: NodeId,
    mut rx: mpsc::Receiver<Envelope>,
    addr: Arc<Mutex<(String, u64)>>,
) {
    let cfg = &shared.config;
    let mut shutdown = shared.shutdown.subscribe();
    let mut sink: Option<(Box<dyn FrameSink>, u64)> = None;
    let mut backoff = cfg.backoff_min;
    let mut retry_at: Option<Instant> = None;
    let mut buf = Vec::new();
    let metrics = crate::metrics::PeerOut::new(peer);
    loop {
        let first = tokio::select! {
            e = rx.recv() => match e {
                Some(e) => e,
                None => return,
            },
            _ = shutdown.changed() => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_ENVELOPES_MAX {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        metrics.queue.set(rx.len() as f64);
        let report_all = |batch: &[Envelope]| {
            metrics.failures.increment(1);
            let mut groups: Vec<u64> = batch.iter().map(|e| e.group_id).collect();
            groups.sort_unstable();
            groups.dedup();
            for g in groups {
                shared.report_unreachable(g, peer);
            }
        };
        let (target, generation) = addr.lock().unwrap().clone();
        if shared.streams_any() {
            start_snapshot_transfers(&shared, peer, &target, &mut batch);
            batch.retain(|e| !e.messages.is_empty());
            if batch.is_empty() {
                continue;
            }
        }
        if sink.as_ref().is_some_and(|(_, g)| *g != generation) {
            let (old, _) = sink.take().unwrap();
            old.finish(cfg.connect_timeout / 2).await;
        }
        if sink.is_none() {
            if retry_at.is_some_and(|t| Instant::now() < t) {
                report_all(&batch);
                continue;
            }
            match tokio::time::timeout(
                cfg.connect_timeout,
                shared.link.open(shared.id, peer, &target, shared.epoch()),
            )
            .await
            {
                Ok(Ok(s)) => {
                    tracing::debug!(node = shared.id, peer, addr = %target, "connected");
                    sink = Some((s, generation));
                    backoff = cfg.backoff_min;
                    retry_at = None;
                }
                outcome => {
                    let reason = match outcome {
                        Ok(Err(e)) => {
                            if let Some(refused) =
                                e.get_ref().and_then(|i| i.downcast_ref::<HelloRefused>())
                            {
                                shared.hello_refused(peer, refused);
                            }
                            e.to_string()
                        }
                        _ => "timed out".to_string(),
                    };
                    tracing::debug!(node = shared.id, peer, addr = %target, %reason, retry_ms = backoff.as_millis() as u64, "cannot reach peer");
                    report_all(&batch);
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(cfg.backoff_max);
                    continue;
                }
            }
        }
        // Consecutive envelopes of one group become one frame.
        buf.clear();
        let mut k = 0;
        while k < batch.len() {
            let group = batch[k].group_id;
            let mut end = k + 1;
            while end < batch.len() && batch[end].group_id == group {
                end += 1;
            }
            // The common case, one envelope of the group, encodes in place;
            // several are joined (cloning their messages) into one frame.
            let joined: Vec<_>;
            let messages = if end == k + 1 {
                &batch[k].messages
            } else {
                joined = batch[k..end]
                    .iter()
                    .flat_map(|e| e.messages.iter().cloned())
                    .collect();
                &joined
            };
            let start = buf.len();
            let len = frame::encode_batch(&mut buf, group, shared.id, peer, messages);
            if len > cfg.max_frame_bytes {
                tracing::error!(
                    node = shared.id,
                    peer,
                    bytes = len,
                    max = cfg.max_frame_bytes,
                    "dropping messages larger than max_frame_bytes"
                );
                buf.truncate(start);
                shared.report_unreachable(group, peer);
            }
            k = end;
        }
        let (s, _) = sink.as_mut().unwrap();
        match s.send(&buf).await {
            Ok(()) => {
                metrics.bytes.increment(buf.len() as u64);
                let sent: usize = batch.iter().map(|e| e.messages.len()).sum();
                metrics.messages.increment(sent as u64);
            }
            Err(e) => {
                tracing::debug!(node = shared.id, peer, error = %e, "connection to peer broke");
                sink = None;
                report_all(&batch);
            }
        }
    }
}

/// Takes every data-less `MsgSnapshot` out of `batch` and streams each on a
/// connection of its own; the outcome is reported to raft as
/// [`Inbound::SnapshotStatus`].
fn start_snapshot_transfers(
    shared: &Arc<Shared>,
    peer: NodeId,
    addr: &str,
    batch: &mut [Envelope],
) {
    for env in batch.iter_mut() {
        let group = env.group_id;
        // A group without a store here sends its snapshots inline.
        let Some(store) = shared.snapshot_store(group) else {
            continue;
        };
        let (snaps, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut env.messages)
            .into_iter()
            .partition(|m| {
                m.get_msg_type() == MessageType::MsgSnapshot && m.get_snapshot().data.is_empty()
            });
        env.messages = rest;
        for msg in snaps {
            let shared = shared.clone();
            let store = store.clone();
            let addr = addr.to_string();
            tokio::spawn(async move {
                let index = msg.get_snapshot().get_metadata().index;
                let started = std::time::Instant::now();
                let outcome = async {
                    let dial = shared.link.open_duplex(peer, &addr);
                    let mut stream = tokio::time::timeout(shared.config.connect_timeout, dial)
                        .await
                        .map_err(|_| "timed out opening the snapshot connection".to_string())?
                        .map_err(|e| e.to_string())?;
                    snapshot::send(&shared, store, &mut stream, group, peer, &msg).await
                }
                .await;
                shared.snapshot_metrics.record(&outcome, started.elapsed());
                match &outcome {
                    Ok(size_bytes) => {
                        tracing::info!(node = shared.id, peer, index, size_bytes, "snapshot sent")
                    }
                    Err(reason) => {
                        tracing::warn!(node = shared.id, peer, index, %reason, "snapshot transfer failed")
                    }
                }
                let _ = shared.own_inbox.try_send(Inbound::SnapshotStatus {
                    group_id: group,
                    to: peer,
                    ok: outcome.is_ok(),
                });
            });
        }
    }
}

/// An envelope must come from the node that said hello and be for us, and
/// so must each message in it (raft-rs trusts these fields), except that a
/// `MsgReadIndex` keeps the node that asked as `from` when a follower
/// forwards it to the leader (the core checks it like any other message).
fn check_envelope(env: Envelope, from: NodeId, node: NodeId) -> Result<Envelope, FrameError> {
    if env.from != from || env.to != node {
        return Err(FrameError::Malformed(format!(
            "envelope {}→{} on the connection from {from} to {node}",
            env.from, env.to
        )));
    }
    let forwarded_read = |m: &raft::prelude::Message| m.get_msg_type() == MessageType::MsgReadIndex;
    if let Some(m) = env
        .messages
        .iter()
        .find(|m| (m.from != from && !forwarded_read(m)) || m.to != node)
    {
        return Err(FrameError::Malformed(format!(
            "message {}→{} in an envelope {from}→{node}",
            m.from, m.to
        )));
    }
    Ok(env)
}
