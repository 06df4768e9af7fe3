//! The gRPC transport on loopback: delivery in order (also across a redial),
//! unreachable reports and resumption across a peer's restart, broken
//! streams, malformed input inside gRPC calls (from a client written here
//! against `proto/raftwork.proto`, independently of the transport's own
//! code), mutual TLS and its refusals, and a snapshot streamed whole.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::*;
use hyper::http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use raft::prelude::{MessageType, SnapshotMetadata};
use raftwork_net::{
    Envelope, GrpcTransport, Inbound, Inbox, NetConfig, TlsConfig, Transport, GRPC_CHUNK_BYTES_MAX,
    GRPC_SEND_PATH, GRPC_SNAPSHOT_PATH,
};
use raftwork_storage::{FileSnapshotStore, SnapshotCompression, SnapshotStore};
use tokio::net::TcpStream;
use tonic::codec::ProstCodec;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status};

async fn bind(id: u64, config: NetConfig) -> (GrpcTransport, Inbox) {
    GrpcTransport::bind(id, "127.0.0.1:0", config)
        .await
        .unwrap()
}

/// Nodes 1 and 2, each knowing the other.
async fn pair(
    tls: Option<(TlsConfig, TlsConfig)>,
) -> ((GrpcTransport, Inbox), (GrpcTransport, Inbox)) {
    let (ta, tb) = match tls {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    let a = bind(1, with_tls(ta)).await;
    let b = bind(2, with_tls(tb)).await;
    a.0.set_peer(2, &b.0.local_addr().to_string()).unwrap();
    b.0.set_peer(1, &a.0.local_addr().to_string()).unwrap();
    (a, b)
}

/// Sends a heartbeat from 1 to 2 every 20 ms until node 1 hears that 2 is
/// unreachable; false if it never does (hang guard).
async fn sends_until_unreachable(a: &GrpcTransport, ia: &mut Inbox) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut term = 1_000;
    while tokio::time::Instant::now() < deadline {
        a.send(envelope(1, 2, term));
        term += 1;
        if tokio::time::timeout(Duration::from_millis(20), next_unreachable(ia, 2))
            .await
            .unwrap_or(false)
        {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn envelopes_arrive_in_order() {
    init_logging();
    let ((a, _ia), (_b, mut ib)) = pair(None).await;
    for term in 1..=500 {
        a.send(envelope(1, 2, term));
    }
    expect_terms(&mut ib, 1, 500).await;
}

#[tokio::test]
async fn both_directions_deliver() {
    init_logging();
    let ((a, mut ia), (b, mut ib)) = pair(None).await;
    for term in 1..=50 {
        a.send(envelope(1, 2, term));
        b.send(envelope(2, 1, term));
    }
    expect_terms(&mut ib, 1, 50).await;
    expect_terms(&mut ia, 1, 50).await;
}

#[tokio::test]
async fn a_redial_to_a_new_address_keeps_the_order() {
    init_logging();
    let ((a, _ia), (b, mut ib)) = pair(None).await;
    a.send(envelope(1, 2, 1));
    expect_terms(&mut ib, 1, 1).await;
    for term in 2..=250 {
        a.send(envelope(1, 2, term));
    }
    // Another name for the same node: the peer task drops its sink and
    // dials again while the old call may still hold frames.
    a.set_peer(2, &format!("localhost:{}", b.local_addr().port()))
        .unwrap();
    for term in 251..=500 {
        a.send(envelope(1, 2, term));
    }
    expect_terms(&mut ib, 2, 500).await;
}

#[tokio::test]
async fn a_restarted_peer_is_reported_unreachable_then_reached_again() {
    init_logging();
    let ((a, mut ia), (b, mut ib)) = pair(None).await;
    let b_addr = b.local_addr();
    a.send(envelope(1, 2, 1));
    assert!(next_messages(&mut ib, WAIT).await.is_some());
    b.shutdown();
    drop(ib);
    // Sends fail while the peer is gone, and raft hears about it.
    assert!(
        sends_until_unreachable(&a, &mut ia).await,
        "the dead peer was reported unreachable"
    );
    // The peer comes back on the same address; messages resume.
    let (_b2, mut ib2) = loop {
        match GrpcTransport::bind(2, b_addr, NetConfig::default()).await {
            Ok(x) => break x,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        a.send(envelope(1, 2, 2_000));
        if let Some(env) = next_messages(&mut ib2, Duration::from_millis(50)).await {
            assert_eq!(env.from, 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
    }
}

#[tokio::test]
async fn a_receiver_shutting_down_mid_stream_is_reported_unreachable() {
    init_logging();
    let ((a, mut ia), (b, mut ib)) = pair(None).await;
    for term in 1..=10 {
        a.send(envelope(1, 2, term));
    }
    expect_terms(&mut ib, 1, 10).await;
    // The receiver stops serving but its node (the inbox) lives on.
    b.shutdown();
    assert!(
        sends_until_unreachable(&a, &mut ia).await,
        "the broken stream was reported"
    );
}

#[tokio::test]
async fn a_stream_the_peer_refuses_or_cuts_is_reported_unreachable() {
    init_logging();
    // A node that is not node 2 answers the Send call at once with an error
    // (the hello is for someone else).
    let (c, _ic) = bind(3, NetConfig::default()).await;
    // A listener that takes connections and closes them.
    let cutter = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cutter_addr = cutter.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = cutter.accept().await {
            drop(s);
        }
    });
    for (what, addr) in [("refused", c.local_addr()), ("cut", cutter_addr)] {
        let (a, mut ia) = bind(1, NetConfig::default()).await;
        a.set_peer(2, &addr.to_string()).unwrap();
        assert!(
            sends_until_unreachable(&a, &mut ia).await,
            "{what}: the broken stream was reported"
        );
        a.shutdown();
    }
}

// ------------------------------------------------ a client of our own

/// `message Chunk { bytes data = 1; }` of `proto/raftwork.proto`, written
/// again here, so these tests speak the wire format, not the crate's code.
#[derive(Clone, PartialEq, prost::Message)]
struct Chunk {
    #[prost(bytes = "vec", tag = "1")]
    data: Vec<u8>,
}

/// `message Ack {}`.
#[derive(Clone, PartialEq, prost::Message)]
struct Ack {}

/// Dials one address with TLS under a given client configuration.
#[derive(Clone)]
struct TlsDialer {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
}

impl tower_service::Service<Uri> for TlsDialer {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, config) = (self.addr, self.config.clone());
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// A gRPC client of the node at `addr`: plaintext, or TLS with `tls`.
async fn client(
    addr: SocketAddr,
    tls: Option<rustls::ClientConfig>,
) -> Result<tonic::client::Grpc<Channel>, Status> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    let channel = match tls {
        None => endpoint.connect().await,
        Some(config) => {
            endpoint
                .connect_with_connector(TlsDialer {
                    addr,
                    config: Arc::new(config),
                })
                .await
        }
    }
    .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    Ok(grpc)
}

/// One `Send` call carrying `chunks`; the request stream then ends.
async fn send_call(
    grpc: &mut tonic::client::Grpc<Channel>,
    chunks: Vec<Vec<u8>>,
) -> Result<(), Status> {
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let call = grpc.client_streaming(
        Request::new(tokio_stream::iter(
            chunks.into_iter().map(|data| Chunk { data }),
        )),
        PathAndQuery::from_static(GRPC_SEND_PATH),
        ProstCodec::<Chunk, Ack>::default(),
    );
    tokio::time::timeout(WAIT, call)
        .await
        .expect("the call ends")
        .map(|_| ())
}

/// Connects to `addr` (plaintext or TLS with `tls`) and makes one `Send`
/// call of `chunks`; `Ok` only if the server acknowledged it.
async fn connect_and_send(
    addr: SocketAddr,
    tls: Option<rustls::ClientConfig>,
    chunks: Vec<Vec<u8>>,
) -> Result<(), Status> {
    let mut grpc = tokio::time::timeout(WAIT, client(addr, tls))
        .await
        .expect("connect ends")?;
    send_call(&mut grpc, chunks).await
}

#[tokio::test]
async fn malformed_bytes_end_their_stream_and_the_node_keeps_serving() {
    init_logging();
    let ((a, _ia), (b, mut ib)) = pair(None).await;
    let addr = b.local_addr();
    let mut grpc = client(addr, None).await.unwrap();

    // Control: chunk boundaries mean nothing, even one byte per chunk.
    let bytes = cat(&[&hello(2), &batch(1, 5)]);
    send_call(&mut grpc, bytes.iter().map(|b| vec![*b]).collect())
        .await
        .expect("acknowledged");
    let env = next_messages(&mut ib, WAIT).await.unwrap();
    assert_eq!(env.messages[0].term, 5);

    let good = batch(1, 6);
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    let mut huge = good.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let refused: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("bad checksum", vec![hello(2), bad_crc]),
        ("huge length", vec![hello(2), huge]),
        ("envelope from another node", vec![hello(2), batch(3, 6)]),
        (
            "garbage instead of a hello",
            vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()],
        ),
        ("hello for another node", vec![hello(9), good.clone()]),
        (
            "truncated frame",
            vec![hello(2), good[..good.len() - 2].to_vec()],
        ),
        ("nothing at all", vec![]),
        (
            "a chunk over the message limit",
            vec![hello(2), vec![0u8; GRPC_CHUNK_BYTES_MAX + 1024]],
        ),
    ];
    for (what, chunks) in refused {
        let status = send_call(&mut grpc, chunks).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    }

    // The bad frame sits in a stream that is never ended: the server ends
    // the call itself.
    {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(Chunk { data: hello(2) }).await.unwrap();
        let mut bad = good.clone();
        bad[10] ^= 1;
        tx.send(Chunk { data: bad }).await.unwrap();
        grpc.ready().await.unwrap();
        let call = grpc.client_streaming(
            Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            PathAndQuery::from_static(GRPC_SEND_PATH),
            ProstCodec::<Chunk, Ack>::default(),
        );
        let status = tokio::time::timeout(WAIT, call)
            .await
            .expect("the server ends the call")
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        drop(tx);
    }

    // An unknown method.
    grpc.ready().await.unwrap();
    let status = grpc
        .client_streaming(
            Request::new(tokio_stream::iter(vec![Chunk { data: hello(2) }])),
            PathAndQuery::from_static("/raftwork.Raft/Nope"),
            ProstCodec::<Chunk, Ack>::default(),
        )
        .await
        .expect_err("no such method");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // Garbage on a Snapshot call: the server ends its side with no data.
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(Chunk {
        data: b"not a frame at all, not even close".to_vec(),
    })
    .await
    .unwrap();
    let mut answer = grpc
        .streaming(
            Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            PathAndQuery::from_static(GRPC_SNAPSHOT_PATH),
            ProstCodec::<Chunk, Chunk>::default(),
        )
        .await
        .expect("the call is taken")
        .into_inner();
    let end = tokio::time::timeout(WAIT, answer.message())
        .await
        .expect("the server ends the call");
    assert!(
        matches!(end, Ok(None) | Err(_)),
        "no data for garbage: {end:?}"
    );
    drop(tx);

    // Bytes that are not HTTP/2 at all.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("closed")
            .ok();
    }

    // Nothing bad was delivered, and real traffic still flows, on the same
    // client connection and through the transport.
    send_call(&mut grpc, vec![hello(2), batch(1, 76)])
        .await
        .expect("acknowledged");
    let env = next_messages(&mut ib, WAIT).await.expect("still serving");
    assert_eq!(env.messages[0].term, 76);
    a.send(envelope(1, 2, 77));
    let env = next_messages(&mut ib, WAIT).await.expect("still serving");
    assert_eq!(env.messages[0].term, 77);
}

#[tokio::test]
async fn a_silent_connection_is_closed() {
    use tokio::io::AsyncReadExt;
    init_logging();
    let (b, _ib) = bind(
        2,
        NetConfig {
            handshake_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await;
    // Connected, then not a byte: not even the HTTP/2 preface.
    let mut s = TcpStream::connect(b.local_addr()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("the server closed the connection")
        .ok();
}

// ------------------------------------------------------------------- TLS

#[tokio::test]
async fn mutual_tls_delivers() {
    init_logging();
    let ca = Ca::new("raftwork test CA");
    let ((a, mut ia), (b, mut ib)) = pair(Some((ca.node_tls(false), ca.node_tls(false)))).await;
    for term in 1..=20 {
        a.send(envelope(1, 2, term));
        b.send(envelope(2, 1, term));
    }
    expect_terms(&mut ib, 1, 20).await;
    expect_terms(&mut ia, 1, 20).await;
}

#[tokio::test]
async fn foreign_certificates_and_plaintext_are_refused_by_a_tls_port() {
    init_logging();
    let ca = Ca::new("raftwork test CA");
    let other_ca = Ca::new("some other CA");
    let (b, mut ib) = bind(2, with_tls(Some(ca.node_tls(false)))).await;
    let addr = b.local_addr();
    let ca_pem = ca.cert.pem().into_bytes();
    let call = || vec![hello(2), batch(1, 5)];

    // Control: a gRPC client with a certificate from the right CA.
    let good = ca.node_tls(false);
    connect_and_send(
        addr,
        Some(client_config(
            &ca_pem,
            Some((&good.cert_pem, &good.key_pem)),
        )),
        call(),
    )
    .await
    .expect("the control call is acknowledged");
    let env = next_messages(&mut ib, WAIT)
        .await
        .expect("control delivers");
    assert_eq!(env.messages[0].term, 5);

    // A client certificate from another CA, an expired one, none, a server
    // certificate the client does not trust, and plaintext.
    let wrong = other_ca.node_tls(false);
    let expired = ca.node_tls(true);
    let other_ca_pem = other_ca.cert.pem().into_bytes();
    let refused: [(&str, Option<rustls::ClientConfig>); 5] = [
        (
            "client certificate from another CA",
            Some(client_config(
                &ca_pem,
                Some((&wrong.cert_pem, &wrong.key_pem)),
            )),
        ),
        (
            "expired client certificate",
            Some(client_config(
                &ca_pem,
                Some((&expired.cert_pem, &expired.key_pem)),
            )),
        ),
        ("no client certificate", Some(client_config(&ca_pem, None))),
        (
            "server certificate from an untrusted CA",
            Some(client_config(
                &other_ca_pem,
                Some((&good.cert_pem, &good.key_pem)),
            )),
        ),
        ("plaintext", None),
    ];
    for (what, tls) in refused {
        let outcome = connect_and_send(addr, tls, call()).await;
        assert!(outcome.is_err(), "{what}: the call went through");
    }

    // Through the transport: a plaintext node and a node with a certificate
    // from another CA are told the peer is unreachable.
    for tls in [None, Some(other_ca.node_tls(false))] {
        let (a, mut ia) = bind(1, with_tls(tls)).await;
        a.set_peer(2, &addr.to_string()).unwrap();
        assert!(
            sends_until_unreachable(&a, &mut ia).await,
            "reported unreachable"
        );
        a.shutdown();
    }
    assert!(
        next_messages(&mut ib, Duration::from_millis(300))
            .await
            .is_none(),
        "nothing from the refused clients was delivered"
    );
}

// ------------------------------------------------------------- snapshots

/// Pseudo-random (incompressible) bytes.
fn fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_streams_whole_and_raft_hears_of_it_once_stored() {
    init_logging();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store_a = FileSnapshotStore::open(dirs.0.path(), 2, SnapshotCompression::None).unwrap();
    let store_b = FileSnapshotStore::open(dirs.1.path(), 2, SnapshotCompression::None).unwrap();

    // The sender's snapshot: 6 MiB, mostly incompressible, one compressible
    // stretch, and a tail that ends mid-chunk.
    let mut meta = SnapshotMetadata {
        index: 100,
        term: 3,
        ..Default::default()
    };
    meta.mut_conf_state().voters = vec![1, 2];
    let mut w = store_a.create(meta).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut piece = vec![0u8; 1 << 20];
    for k in 0..6 {
        if k == 2 {
            piece.fill(7);
        } else {
            fill(&mut piece, &mut seed);
        }
        w.write_all(&piece).unwrap();
    }
    w.write_all(&piece[..12_345]).unwrap();
    w.commit().unwrap();
    let want = stored_crc(&store_a, 100);

    // Chunks that do not line up with the pipes' buffers or gRPC messages.
    let net = NetConfig {
        snapshot_chunk_bytes: 700 << 10,
        ..Default::default()
    };
    let (a, mut inbox_a) = bind(1, net.clone()).await;
    let (b, mut inbox_b) = bind(2, net).await;
    a.attach_snapshots(1, Arc::new(store_a));
    b.attach_snapshots(1, Arc::new(store_b.clone()));
    assert!(a.streams_snapshots() && b.streams_snapshots());
    a.set_peer(2, &b.local_addr().to_string()).unwrap();
    assert!(store_b.latest().unwrap().is_none());

    a.send(Envelope {
        group_id: 1,
        from: 1,
        to: 2,
        messages: vec![snapshot_message(100, 3)],
    });

    // The receiver's raft hears of the snapshot only once the store holds it
    // whole: checked the moment the message arrives.
    let delivered = tokio::time::timeout(WAIT * 2, async {
        loop {
            if let Some(Inbound::Messages(env)) = inbox_b.recv().await {
                return env;
            }
        }
    })
    .await
    .expect("the snapshot message is delivered");
    assert_eq!(stored_crc(&store_b, 100), want, "stored whole, same bytes");
    let m = &delivered.messages[0];
    assert_eq!(m.get_msg_type(), MessageType::MsgSnapshot);
    assert_eq!(m.get_snapshot().get_metadata().index, 100);
    assert!(m.get_snapshot().data.is_empty(), "data went by stream");
    assert_eq!((delivered.from, delivered.to), (1, 2));

    // And the sender is told it succeeded.
    let ok = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Inbound::SnapshotStatus { ok, to, .. }) = inbox_a.recv().await {
                assert_eq!(to, 2);
                return ok;
            }
        }
    })
    .await
    .expect("a snapshot outcome is reported");
    assert!(ok, "the transfer is reported done");
}

#[tokio::test]
async fn a_certificate_speaks_only_for_the_node_it_names() {
    init_logging();
    let ca = Ca::new("raftwork test CA");
    certificates_speak_only_for_their_node(&ca, |id, config| async move {
        let (t, inbox) = bind(id, config).await;
        let addr = t.local_addr();
        (t, inbox, addr)
    })
    .await;
}
