//! The TCP transport: one long-lived connection per peer and direction,
//! carrying [`frame`](crate::frame)s, optionally inside TLS. The queueing,
//! reconnecting and validating are the shared machinery of [`crate::peer`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use raftwork_transport::{Inbox, NodeId, INBOX_CAPACITY_ENVELOPES};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::mpsc;

use crate::frame;
use crate::peer::{BoxFuture, FrameSink, HelloRefused, Link, NetConfig, NetError, Shared};
use crate::tls::{PeerCert, Tls};

pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}
pub(crate) type BoxStream = Box<dyn Stream>;

/// Opens a TCP connection to peer `to` at `addr`, with TLS when configured
/// (then the peer's certificate must be valid for its name, see
/// [`Tls::name_for`]).
pub(crate) async fn connect(
    tls: Option<&Tls>,
    to: NodeId,
    addr: &str,
) -> std::io::Result<BoxStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(match tls {
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
            Box::new(connector.connect(tls.name_for(to, addr)?, tcp).await?)
        }
        None => Box::new(tcp),
    })
}

/// What [`probe_hello`] learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// The acceptor's verdict on the hello.
    pub verdict: frame::HelloVerdict,
    /// The acceptor's epoch.
    pub epoch: u64,
    /// Its description ([`crate::Fencing::describe`]), if asked for and
    /// the hello was accepted.
    pub description: Option<Vec<u8>>,
}

/// Says hello to node `to` at `addr` as node `from` at `epoch` (TLS as
/// `config` says), reads the acceptor's verdict and its epoch, and, with
/// `describe` and an accepted hello, asks for its description; then
/// closes: no raft message is sent. For a node about to start, so that a
/// member left out of a recovery learns it before it campaigns, and a
/// joining member can check its settings (see [`crate::Fencing`]). Fails if
/// the peer cannot be reached or refused the hello for another reason,
/// within `timeout`.
pub async fn probe_hello(
    config: &NetConfig,
    from: NodeId,
    to: NodeId,
    addr: &str,
    epoch: u64,
    describe: bool,
    timeout: Duration,
) -> std::io::Result<Probe> {
    let tls = config
        .tls
        .as_ref()
        .map(Tls::new)
        .transpose()
        .map_err(std::io::Error::other)?;
    let probe = async {
        let mut stream = connect(tls.as_ref(), to, addr).await?;
        let mut hello = Vec::new();
        frame::encode_hello_at(&mut hello, from, to, epoch);
        stream.write_all(&hello).await?;
        stream.flush().await?;
        let (kind, body) = frame::read_frame(&mut stream, 64)
            .await
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other("closed after the hello"))?;
        let (verdict, theirs) =
            frame::decode_hello_ack(kind, &body).map_err(std::io::Error::other)?;
        let mut description = None;
        if describe && verdict == frame::HelloVerdict::Accepted {
            let mut ask = Vec::new();
            frame::encode_raw(&mut ask, frame::KIND_DESCRIBE, &[]);
            stream.write_all(&ask).await?;
            stream.flush().await?;
            match frame::read_frame(&mut stream, frame::DESCRIPTION_BYTES_MAX + 64)
                .await
                .map_err(std::io::Error::other)?
            {
                Some((frame::KIND_DESCRIPTION, body)) => description = Some(body.to_vec()),
                Some((k, _)) => {
                    return Err(std::io::Error::other(format!(
                        "expected a description, got frame kind {k}"
                    )))
                }
                None => return Err(std::io::Error::other("closed before the description")),
            }
        }
        let _ = stream.shutdown().await;
        Ok(Probe {
            verdict,
            epoch: theirs,
            description,
        })
    };
    tokio::time::timeout(timeout, probe)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time"))?
}

/// Finishes the server side of TLS on an accepted connection, if configured,
/// and returns the client's certificate if it presented one.
pub(crate) async fn accept(
    tls: Option<&Tls>,
    tcp: TcpStream,
) -> std::io::Result<(BoxStream, PeerCert)> {
    Ok(match tls {
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
            let stream = acceptor.accept(tcp).await?;
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c| Arc::new(c.clone().into_owned()));
            (Box::new(stream), PeerCert(cert))
        }
        None => (Box::new(tcp), PeerCert::default()),
    })
}

/// Binds the listener of a transport.
pub(crate) async fn listen(
    addr: impl ToSocketAddrs + std::fmt::Debug,
) -> Result<TcpListener, NetError> {
    let addr_text = format!("{addr:?}");
    TcpListener::bind(addr)
        .await
        .map_err(|source| NetError::Bind {
            addr: addr_text,
            source,
        })
}

/// Binds the listener of a transport without awaiting (for synchronous
/// builders). Must be called inside a tokio runtime.
pub(crate) fn listen_now(addr: SocketAddr) -> Result<TcpListener, NetError> {
    let bind_err = |source| NetError::Bind {
        addr: addr.to_string(),
        source,
    };
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    TcpListener::from_std(std_listener).map_err(bind_err)
}

/// What every transport derives from its settings and listener before it
/// starts: the checked settings' TLS, the bound address, and the inbox.
pub(crate) struct Prepared {
    pub(crate) tls: Option<Tls>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) inbox_tx: raftwork_transport::InboxSender,
    pub(crate) inbox: Inbox,
}

pub(crate) fn prepare(
    id: NodeId,
    config: &NetConfig,
    listener: &TcpListener,
) -> Result<Prepared, NetError> {
    config.validate(id)?;
    let tls = config.tls.as_ref().map(Tls::new).transpose()?;
    let local_addr = listener.local_addr().map_err(|source| NetError::Bind {
        addr: "listener".into(),
        source,
    })?;
    let (inbox_tx, inbox) = mpsc::channel(INBOX_CAPACITY_ENVELOPES);
    Ok(Prepared {
        tls,
        local_addr,
        inbox_tx,
        inbox,
    })
}

struct TcpLink {
    tls: Option<Tls>,
    handshake_timeout: Duration,
}

struct TcpSink(BoxStream);

impl FrameSink for TcpSink {
    fn send<'a>(&'a mut self, frames: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            self.0.write_all(frames).await?;
            self.0.flush().await
        })
    }

    /// Half-closes and waits for the acceptor to close its side, which it
    /// does once it has read (and delivered) every frame before the close.
    fn finish(self: Box<Self>, wait: Duration) -> BoxFuture<'static, ()> {
        let mut stream = self.0;
        Box::pin(async move {
            let drain = async {
                stream.shutdown().await?;
                let mut scratch = [0u8; 64];
                while tokio::io::AsyncReadExt::read(&mut stream, &mut scratch).await? > 0 {}
                Ok::<_, std::io::Error>(())
            };
            let _ = tokio::time::timeout(wait, drain).await;
        })
    }
}

impl Link for TcpLink {
    fn open<'a>(
        &'a self,
        from: NodeId,
        to: NodeId,
        addr: &'a str,
        epoch: u64,
    ) -> BoxFuture<'a, std::io::Result<Box<dyn FrameSink>>> {
        Box::pin(async move {
            let mut stream = connect(self.tls.as_ref(), to, addr).await?;
            let mut hello = Vec::new();
            frame::encode_hello_at(&mut hello, from, to, epoch);
            stream.write_all(&hello).await?;
            stream.flush().await?;
            // The acceptor's verdict (see `Fencing`) before any frame.
            let ack =
                tokio::time::timeout(self.handshake_timeout, frame::read_frame(&mut stream, 64))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello ack in time")
                    })?
                    .map_err(std::io::Error::other)?
                    .ok_or_else(|| {
                        std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the peer closed the connection after our hello (refused it)",
                        )
                    })?;
            match frame::decode_hello_ack(ack.0, &ack.1).map_err(std::io::Error::other)? {
                (frame::HelloVerdict::Accepted, _) => {
                    Ok(Box::new(TcpSink(stream)) as Box<dyn FrameSink>)
                }
                (verdict, epoch) => Err(std::io::Error::other(HelloRefused { verdict, epoch })),
            }
        })
    }

    fn open_duplex<'a>(
        &'a self,
        to: NodeId,
        addr: &'a str,
    ) -> BoxFuture<'a, std::io::Result<BoxStream>> {
        Box::pin(connect(self.tls.as_ref(), to, addr))
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
    local_addr: SocketAddr,
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
        Self::serve(id, self::listen(listen).await?, config)
    }

    /// Like [`TcpTransport::bind`], without awaiting (for synchronous
    /// builders). Must be called inside a tokio runtime.
    pub fn bind_now(
        id: NodeId,
        listen: SocketAddr,
        config: NetConfig,
    ) -> Result<(Self, Inbox), NetError> {
        Self::serve(id, listen_now(listen)?, config)
    }

    fn serve(
        id: NodeId,
        listener: TcpListener,
        config: NetConfig,
    ) -> Result<(Self, Inbox), NetError> {
        let p = prepare(id, &config, &listener)?;
        let link = Arc::new(TcpLink {
            tls: p.tls.clone(),
            handshake_timeout: config.handshake_timeout,
        });
        let shared = Shared::new(id, config, p.inbox_tx, link);
        tokio::spawn(accept_loop(shared.clone(), listener, p.tls));
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

crate::peer::delegate_transport!(TcpTransport);

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, tls: Option<Tls>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
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
                        accept(tls.as_ref(), tcp),
                    );
                    match handshake.await {
                        // Refusals are logged inside.
                        Ok(Ok((stream, cert))) => shared.serve_stream(stream, &remote, &cert).await,
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
