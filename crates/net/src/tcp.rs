//! The TCP transport, and the per-peer machinery every network transport
//! shares: outbound queue and task, reconnect with backoff, unreachable
//! reports, inbound validation.
//!
//! ```text
//!  send(env) ──try_send──▶ [peer queue, bounded] ──▶ peer task ──frames──▶ TCP/TLS ──▶ peer's
//!     │ full / no peer                                 │ dial, write, backoff             accept loop
//!     ▼                                                ▼ failure                           │ hello, frames,
//!  Inbound::Unreachable ◀──────────── own inbox ◀──────┘                                  ▼ validate
//!                                                                                  peer's inbox
//! ```
//!
//! Invariants: one task per peer, fed by one FIFO queue, so envelopes to a
//! peer go out in order or not at all; nothing on the send path blocks; a
//! connection carries traffic one way (the dialer writes, the acceptor
//! reads), as etcd's streams do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftwork_transport::{
    Envelope, Inbound, Inbox, InboxSender, NodeId, Transport, TransportError,
    INBOX_CAPACITY_ENVELOPES,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::frame::{self, FrameError};
use crate::tls::{Tls, TlsConfig, TlsConfigError};

/// Settings shared by the network transports.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Largest frame accepted or sent, in bytes. A bigger incoming frame
    /// closes its connection; a bigger outgoing envelope is dropped and its
    /// peer reported unreachable. Default: 64 MiB (snapshots travel inline in
    /// one message for now, so this also caps the snapshot size).
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
        }
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

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
type BoxStream = Box<dyn Stream>;

struct PeerHandle {
    tx: mpsc::Sender<Envelope>,
    /// Address and a generation bumped on every change (forces a redial).
    addr: Arc<Mutex<(String, u64)>>,
}

struct Shared {
    id: NodeId,
    config: NetConfig,
    tls: Option<Tls>,
    own_inbox: InboxSender,
    peers: Mutex<HashMap<NodeId, PeerHandle>>,
    shutdown: watch::Sender<bool>,
    runtime: tokio::runtime::Handle,
    local_addr: SocketAddr,
}

impl Shared {
    fn report_unreachable(&self, group_id: u64, to: NodeId) {
        let _ = self
            .own_inbox
            .try_send(Inbound::Unreachable { group_id, to });
    }
}

/// Raft messages over TCP (optionally TLS): one long-lived connection per
/// peer and direction, length-prefixed checksummed frames.
///
/// Cheap to clone: clones share the transport. Keep a clone to add peers
/// ([`Transport::set_peer`]) as membership changes.
#[derive(Clone)]
pub struct TcpTransport {
    shared: Arc<Shared>,
}

impl TcpTransport {
    /// Listens on `listen` (use port 0 for an ephemeral port) for node `id`
    /// and returns the transport and the node's inbox. Must be called inside
    /// a tokio runtime.
    pub async fn bind(
        id: NodeId,
        listen: impl ToSocketAddrs + std::fmt::Debug,
        config: NetConfig,
    ) -> Result<(Self, Inbox), NetError> {
        if id == 0 {
            return Err(NetError::Config("node id 0".into()));
        }
        if config.max_frame_bytes < 1024
            || config.peer_queue_envelopes == 0
            || config.backoff_min > config.backoff_max
        {
            return Err(NetError::Config(format!("{config:?}")));
        }
        let tls = config.tls.as_ref().map(Tls::new).transpose()?;
        let addr_text = format!("{listen:?}");
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| NetError::Bind {
                addr: addr_text.clone(),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| NetError::Bind {
            addr: addr_text,
            source,
        })?;
        let (inbox_tx, inbox) = mpsc::channel(INBOX_CAPACITY_ENVELOPES);
        let (shutdown, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            id,
            config,
            tls,
            own_inbox: inbox_tx,
            peers: Mutex::new(HashMap::new()),
            shutdown,
            runtime: tokio::runtime::Handle::current(),
            local_addr,
        });
        tokio::spawn(accept_loop(shared.clone(), listener));
        Ok((Self { shared }, inbox))
    }

    /// The address the transport listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }
}

impl Transport for TcpTransport {
    fn send(&self, envelope: Envelope) {
        let (group_id, to) = (envelope.group_id, envelope.to);
        let peers = self.shared.peers.lock().unwrap();
        let delivered = match peers.get(&to) {
            Some(p) => p.tx.try_send(envelope).is_ok(),
            None => {
                tracing::debug!(node = self.shared.id, to, "no address for peer");
                false
            }
        };
        drop(peers);
        if !delivered {
            self.shared.report_unreachable(group_id, to);
        }
    }

    fn set_peer(&self, id: NodeId, address: &str) -> Result<(), TransportError> {
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
        let mut peers = self.shared.peers.lock().unwrap();
        if let Some(p) = peers.get(&id) {
            let mut a = p.addr.lock().unwrap();
            if a.0 != address {
                *a = (address.to_string(), a.1 + 1);
            }
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(self.shared.config.peer_queue_envelopes);
        let addr = Arc::new(Mutex::new((address.to_string(), 0)));
        self.shared
            .runtime
            .spawn(peer_task(self.shared.clone(), id, rx, addr.clone()));
        peers.insert(id, PeerHandle { tx, addr });
        Ok(())
    }

    fn remove_peer(&self, id: NodeId) {
        self.shared.peers.lock().unwrap().remove(&id);
    }

    fn shutdown(&self) {
        let _ = self.shared.shutdown.send(true);
        self.shared.peers.lock().unwrap().clear();
    }
}

/// Opens a connection to `to` at `addr` and says hello.
async fn dial(shared: &Shared, to: NodeId, addr: &str) -> std::io::Result<BoxStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut stream: BoxStream = match &shared.tls {
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
            Box::new(connector.connect(tls.name_for(addr)?, tcp).await?)
        }
        None => Box::new(tcp),
    };
    let mut hello = Vec::new();
    frame::encode_hello(&mut hello, shared.id, to);
    stream.write_all(&hello).await?;
    stream.flush().await?;
    Ok(stream)
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
    let mut conn: Option<(BoxStream, u64)> = None;
    let mut backoff = cfg.backoff_min;
    let mut retry_at: Option<Instant> = None;
    let mut buf = Vec::new();
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
        let report_all = |batch: &[Envelope]| {
            let mut groups: Vec<u64> = batch.iter().map(|e| e.group_id).collect();
            groups.sort_unstable();
            groups.dedup();
            for g in groups {
                shared.report_unreachable(g, peer);
            }
        };
        let (target, generation) = addr.lock().unwrap().clone();
        if conn.as_ref().is_some_and(|(_, g)| *g != generation) {
            conn = None;
        }
        if conn.is_none() {
            if retry_at.is_some_and(|t| Instant::now() < t) {
                report_all(&batch);
                continue;
            }
            match tokio::time::timeout(cfg.connect_timeout, dial(&shared, peer, &target)).await {
                Ok(Ok(stream)) => {
                    tracing::debug!(node = shared.id, peer, addr = %target, "connected");
                    conn = Some((stream, generation));
                    backoff = cfg.backoff_min;
                    retry_at = None;
                }
                outcome => {
                    let reason = match outcome {
                        Ok(Err(e)) => e.to_string(),
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
        let mut dropped = Vec::new();
        while k < batch.len() {
            let group = batch[k].group_id;
            let mut end = k + 1;
            while end < batch.len() && batch[end].group_id == group {
                end += 1;
            }
            let messages: Vec<_> = batch[k..end]
                .iter()
                .flat_map(|e| e.messages.iter().cloned())
                .collect();
            let start = buf.len();
            let len = frame::encode_batch(&mut buf, group, shared.id, peer, &messages);
            if len > cfg.max_frame_bytes {
                tracing::error!(
                    node = shared.id,
                    peer,
                    bytes = len,
                    max = cfg.max_frame_bytes,
                    "dropping messages larger than max_frame_bytes"
                );
                buf.truncate(start);
                dropped.push(group);
            }
            k = end;
        }
        for g in dropped {
            shared.report_unreachable(g, peer);
        }
        let (stream, _) = conn.as_mut().unwrap();
        let written = async {
            stream.write_all(&buf).await?;
            stream.flush().await
        };
        if let Err(e) = written.await {
            tracing::debug!(node = shared.id, peer, error = %e, "connection to peer broke");
            conn = None;
            report_all(&batch);
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((tcp, remote)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(serve_connection(shared.clone(), tcp, remote));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(node = shared.id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, tcp: TcpStream, remote: SocketAddr) {
    let mut shutdown = shared.shutdown.subscribe();
    let cfg = &shared.config;
    let node = shared.id;
    let handshake = async {
        let stream: BoxStream = match &shared.tls {
            Some(tls) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
                Box::new(
                    acceptor
                        .accept(tcp)
                        .await
                        .map_err(|e| format!("TLS handshake failed: {e}"))?,
                )
            }
            None => Box::new(tcp),
        };
        let mut reader = BufReader::with_capacity(256 << 10, stream);
        let hello = frame::read_frame(&mut reader, 64)
            .await
            .map_err(|e| format!("bad hello: {e}"))?
            .ok_or("closed before hello")?;
        let (from, to) = frame::decode_hello(hello.0, &hello.1).map_err(|e| e.to_string())?;
        if to != node {
            return Err(format!("hello from node {from} is for node {to}"));
        }
        Ok::<_, String>((reader, from))
    };
    let (mut reader, from) = match tokio::time::timeout(cfg.handshake_timeout, handshake).await {
        Ok(Ok(x)) => x,
        Ok(Err(reason)) => {
            tracing::warn!(node, %remote, %reason, "refusing connection");
            return;
        }
        Err(_) => {
            tracing::warn!(node, %remote, "refusing connection: no hello in time");
            return;
        }
    };
    loop {
        let next = tokio::select! {
            f = frame::read_frame(&mut reader, cfg.max_frame_bytes) => f,
            _ = shutdown.changed() => return,
        };
        let env = match next {
            Ok(Some((kind, body))) => frame::decode_batch(kind, &body),
            Ok(None) => return,
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(FrameError::Malformed("connection closed mid-frame".into()))
            }
            Err(e) => Err(e),
        };
        let env = match env.and_then(|env| check_envelope(env, from, node)) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(node, %remote, from, reason = %e, "closing connection");
                return;
            }
        };
        if shared.own_inbox.send(Inbound::Messages(env)).await.is_err() {
            return;
        }
    }
}

/// An envelope must come from the node that said hello and be for us, and
/// so must each message in it (raft-rs trusts these fields).
fn check_envelope(env: Envelope, from: NodeId, node: NodeId) -> Result<Envelope, FrameError> {
    if env.from != from || env.to != node {
        return Err(FrameError::Malformed(format!(
            "envelope {}→{} on the connection from {from} to {node}",
            env.from, env.to
        )));
    }
    if let Some(m) = env.messages.iter().find(|m| m.from != from || m.to != node) {
        return Err(FrameError::Malformed(format!(
            "message {}→{} in an envelope {from}→{node}",
            m.from, m.to
        )));
    }
    Ok(env)
}
