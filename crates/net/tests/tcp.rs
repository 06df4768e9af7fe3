//! The TCP transport on loopback: delivery in order, unreachable reports and
//! resumption across a peer's restart, malformed input, and the TLS
//! rejection matrix.

mod common;

use std::time::Duration;

use common::*;
use raftwork_net::{frame, NetConfig, TcpTransport, TlsConfig, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn pair(
    tls: Option<(TlsConfig, TlsConfig)>,
) -> (
    (TcpTransport, raftwork_net::Inbox),
    (TcpTransport, raftwork_net::Inbox),
) {
    let (ta, tb) = match tls {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    let a = TcpTransport::bind(
        1,
        "127.0.0.1:0",
        NetConfig {
            tls: ta,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let b = TcpTransport::bind(
        2,
        "127.0.0.1:0",
        NetConfig {
            tls: tb,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    a.0.set_peer(2, &b.0.local_addr().to_string()).unwrap();
    b.0.set_peer(1, &a.0.local_addr().to_string()).unwrap();
    (a, b)
}

#[tokio::test]
async fn envelopes_arrive_in_order() {
    init_logging();
    let ((a, _ia), (_b, mut ib)) = pair(None).await;
    for term in 1..=500 {
        a.send(envelope(1, 2, term));
    }
    let mut next = 1;
    while next <= 500 {
        let env = next_messages(&mut ib, WAIT).await.expect("delivered");
        for m in env.messages {
            assert_eq!(m.term, next, "order kept");
            next += 1;
        }
    }
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
    let mut reported = false;
    for term in 2..200 {
        a.send(envelope(1, 2, term));
        if tokio::time::timeout(Duration::from_millis(20), next_unreachable(&mut ia, 2))
            .await
            .unwrap_or(false)
        {
            reported = true;
            break;
        }
    }
    assert!(reported, "the dead peer was reported unreachable");
    // The peer comes back on the same address; messages resume.
    let (_b2, mut ib2) = loop {
        match TcpTransport::bind(2, b_addr, NetConfig::default()).await {
            Ok(x) => break x,
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        a.send(envelope(1, 2, 1_000));
        if let Some(env) = next_messages(&mut ib2, Duration::from_millis(50)).await {
            assert_eq!(env.from, 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
    }
}

/// Connects raw, says hello as node 1, then sends `junk`; returns true if
/// the transport closed the connection.
async fn closes_on(addr: std::net::SocketAddr, hello_to: u64, junk: &[u8]) -> bool {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut hello = Vec::new();
    frame::encode_hello(&mut hello, 1, hello_to);
    s.write_all(&hello).await.unwrap();
    s.write_all(junk).await.unwrap();
    // The server may answer (a TLS alert) before closing: read to the end.
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .is_ok()
}

#[tokio::test]
async fn malformed_frames_close_the_connection_and_the_node_keeps_serving() {
    init_logging();
    let ((a, _ia), (b, mut ib)) = pair(None).await;
    let addr = b.local_addr();
    let mut good = Vec::new();
    frame::encode_batch(&mut good, 1, 1, 2, &[heartbeat(1, 2, 1)]);

    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    assert!(closes_on(addr, 2, &bad_crc).await, "bad checksum");

    let mut huge = good.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(closes_on(addr, 2, &huge).await, "huge length");

    let truncated = &good[..good.len() - 2];
    // Truncated then closed by the sender: the receiver must not deliver it.
    {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut hello = Vec::new();
        frame::encode_hello(&mut hello, 1, 2);
        s.write_all(&hello).await.unwrap();
        s.write_all(truncated).await.unwrap();
        s.shutdown().await.unwrap();
    }

    assert!(
        closes_on(addr, 2, b"GET / HTTP/1.1\r\n\r\n").await,
        "garbage"
    );
    assert!(closes_on(addr, 9, &good).await, "hello for another node");
    let mut spoofed = Vec::new();
    frame::encode_batch(&mut spoofed, 1, 3, 2, &[heartbeat(3, 2, 1)]);
    assert!(
        closes_on(addr, 2, &spoofed).await,
        "envelope from a node other than the hello's"
    );

    // Nothing bad was delivered, and real traffic still flows.
    a.send(envelope(1, 2, 77));
    let env = next_messages(&mut ib, WAIT).await.expect("still serving");
    assert_eq!(env.messages[0].term, 77);
}

#[tokio::test]
async fn mutual_tls_delivers() {
    init_logging();
    let ca = Ca::new("raftwork test CA");
    let ((a, _ia), (_b, mut ib)) = pair(Some((ca.node_tls(false), ca.node_tls(false)))).await;
    a.send(envelope(1, 2, 5));
    let env = next_messages(&mut ib, WAIT)
        .await
        .expect("delivered over mTLS");
    assert_eq!(env.messages[0].term, 5);
}

/// Dials `addr` with TLS as a client configured by `client`, says hello and
/// returns true if the server refused (handshake failure or closed stream).
async fn tls_refused(addr: std::net::SocketAddr, client: rustls::ClientConfig) -> bool {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = match connector.connect(name, tcp).await {
        Ok(s) => s,
        Err(_) => return true,
    };
    let mut hello = Vec::new();
    frame::encode_hello(&mut hello, 1, 2);
    if s.write_all(&hello).await.is_err() || s.flush().await.is_err() {
        return true;
    }
    let mut buf = [0u8; 16];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn tls_rejects_wrong_ca_expired_certificates_missing_client_certificates_and_plaintext() {
    init_logging();
    let ca = Ca::new("raftwork test CA");
    let other_ca = Ca::new("some other CA");
    let server_tls = ca.node_tls(false);
    let (b, mut ib) = TcpTransport::bind(
        2,
        "127.0.0.1:0",
        NetConfig {
            tls: Some(server_tls),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr = b.local_addr();

    // Control: a good client certificate is accepted (the server keeps the
    // connection open and delivers).
    let good = ca.node_tls(false);
    {
        let (a, _ia) = TcpTransport::bind(
            1,
            "127.0.0.1:0",
            NetConfig {
                tls: Some(good.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        a.set_peer(2, &addr.to_string()).unwrap();
        a.send(envelope(1, 2, 1));
        assert!(
            next_messages(&mut ib, WAIT).await.is_some(),
            "control delivers"
        );
    }

    // A client certificate from another CA.
    let wrong = other_ca.node_tls(false);
    assert!(
        tls_refused(
            addr,
            client_config(
                &ca.cert.pem().into_bytes(),
                Some((&wrong.cert_pem, &wrong.key_pem))
            )
        )
        .await,
        "certificate from another CA"
    );
    // An expired client certificate from the right CA.
    let expired = ca.node_tls(true);
    assert!(
        tls_refused(
            addr,
            client_config(
                &ca.cert.pem().into_bytes(),
                Some((&expired.cert_pem, &expired.key_pem))
            )
        )
        .await,
        "expired certificate"
    );
    // No client certificate while mTLS is on.
    assert!(
        tls_refused(addr, client_config(&ca.cert.pem().into_bytes(), None)).await,
        "no client certificate"
    );
    // A client that trusts another CA refuses the server.
    assert!(
        tls_refused(
            addr,
            client_config(
                &other_ca.cert.pem().into_bytes(),
                Some((&good.cert_pem, &good.key_pem))
            )
        )
        .await,
        "server certificate from an untrusted CA"
    );
    // Plaintext to the TLS port.
    assert!(
        closes_on(addr, 2, b"").await,
        "plaintext hello to a TLS port"
    );

    // And through the transport: a node with the wrong CA never delivers and
    // is told its peer is unreachable.
    let (a, mut ia) = TcpTransport::bind(
        1,
        "127.0.0.1:0",
        NetConfig {
            tls: Some(wrong),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    a.set_peer(2, &addr.to_string()).unwrap();
    a.send(envelope(1, 2, 9));
    assert!(next_unreachable(&mut ia, 2).await, "reported unreachable");
    assert!(
        next_messages(&mut ib, Duration::from_millis(300))
            .await
            .is_none(),
        "nothing from the rejected node was delivered"
    );
}

/// Dials `addr` with TLS as `tls`'s certificate, says hello as node `from`
/// to node 2, and returns true if the server closed the connection.
async fn hello_refused(addr: std::net::SocketAddr, tls: &TlsConfig, from: u64) -> bool {
    let client = client_config(&tls.ca_pem, Some((&tls.cert_pem, &tls.key_pem)));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let Ok(mut s) = connector.connect(name, tcp).await else {
        return true;
    };
    let mut hello = Vec::new();
    frame::encode_hello(&mut hello, from, 2);
    if s.write_all(&hello).await.is_err() || s.flush().await.is_err() {
        return true;
    }
    let mut buf = [0u8; 16];
    // An accepted connection stays open: the read times out.
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn a_certificate_speaks_only_for_the_node_it_names() {
    init_logging();
    let ca = Ca::new("raftwork test CA");
    let (b, mut ib) = TcpTransport::bind(
        2,
        "127.0.0.1:0",
        NetConfig {
            tls: Some(ca.named_tls("node-2")),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr = b.local_addr();

    // Node 1 with node 1's certificate: delivered.
    let (a, _ia) = TcpTransport::bind(
        1,
        "127.0.0.1:0",
        NetConfig {
            tls: Some(ca.named_tls("node-1")),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    a.set_peer(2, &addr.to_string()).unwrap();
    a.send(envelope(1, 2, 3));
    let env = next_messages(&mut ib, WAIT).await.expect("delivered");
    assert_eq!(env.messages[0].term, 3);

    // Node 3's certificate (signed by the same CA) claiming to be node 1:
    // refused after the hello. Claiming to be node 3, it is accepted.
    let three = ca.named_tls("node-3");
    assert!(
        hello_refused(addr, &three, 1).await,
        "node 3 speaking as node 1"
    );
    assert!(!hello_refused(addr, &three, 3).await, "node 3 as itself");
    // A certificate that names no node at all.
    let nameless = ca.node_tls(false);
    assert!(
        hello_refused(addr, &nameless, 1).await,
        "a certificate naming no node"
    );

    // The dialer checks too: node 1 sent to an impostor listening as node 2
    // with node 3's certificate reaches nothing.
    let (impostor, mut iimp) = TcpTransport::bind(
        2,
        "127.0.0.1:0",
        NetConfig {
            tls: Some(ca.named_tls("node-3")),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    a.set_peer(2, &impostor.local_addr().to_string()).unwrap();
    for term in 10..20 {
        a.send(envelope(1, 2, term));
    }
    assert!(
        next_messages(&mut iimp, Duration::from_secs(2))
            .await
            .is_none(),
        "the impostor received a message"
    );
}

#[tokio::test]
async fn binding_certificates_to_nodes_needs_mutual_tls() {
    let ca = Ca::new("raftwork test CA");
    let mut tls = ca.named_tls("node-1");
    tls.require_client_auth = false;
    let err = TcpTransport::bind(
        1,
        "127.0.0.1:0",
        NetConfig {
            tls: Some(tls),
            ..Default::default()
        },
    )
    .await
    .err()
    .expect("refused");
    assert!(err.to_string().contains("require_client_auth"), "{err}");
}

#[tokio::test]
async fn a_forwarded_read_index_keeps_its_requester_and_is_delivered() {
    init_logging();
    let ((a, _ia), (_b, mut ib)) = pair(None).await;
    // Node 1 forwards a read index that node 3 asked it for (raft-rs keeps
    // the requester as `from`); the connection stays up and both messages
    // arrive.
    let mut forwarded = raft::prelude::Message::default();
    forwarded.set_msg_type(raft::prelude::MessageType::MsgReadIndex);
    forwarded.from = 3;
    forwarded.to = 2;
    let mut env = envelope(1, 2, 4);
    env.messages.push(forwarded);
    a.send(env);
    let got = next_messages(&mut ib, WAIT).await.expect("delivered");
    assert_eq!(got.messages.len(), 2);
    assert_eq!(got.messages[1].from, 3);
    a.send(envelope(1, 2, 5));
    let got = next_messages(&mut ib, WAIT).await.expect("still connected");
    assert_eq!(got.messages[0].term, 5);
}

/// A node's cluster epoch for the fencing tests: `joining` nodes adopt a
/// newer one, others record that they were fenced.
#[derive(Debug)]
struct TestFencing {
    epoch: std::sync::atomic::AtomicU64,
    joining: bool,
    fenced_by: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl TestFencing {
    fn new(epoch: u64, joining: bool) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            epoch: epoch.into(),
            joining,
            fenced_by: Default::default(),
        })
    }

    fn fenced(&self) -> Vec<(u64, u64)> {
        self.fenced_by.lock().unwrap().clone()
    }
}

impl raftwork_net::Fencing for TestFencing {
    fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn newer_seen(&self, epoch: u64, peer: u64) -> bool {
        if self.joining {
            self.epoch.store(epoch, std::sync::atomic::Ordering::SeqCst);
            return true;
        }
        self.fenced_by.lock().unwrap().push((peer, epoch));
        false
    }
}

async fn fenced_node(
    id: u64,
    fencing: std::sync::Arc<TestFencing>,
) -> (TcpTransport, raftwork_net::Inbox) {
    TcpTransport::bind(
        id,
        "127.0.0.1:0",
        NetConfig {
            fencing: Some(fencing),
            backoff_max: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// A cluster recovered at epoch 1: a member left behind at epoch 0 is
/// refused both ways and learns it was fenced (as dialer from the ack, as
/// acceptor from the hello), and nothing it sends is delivered; a node that
/// has not joined anything adopts the epoch and gets through.
#[tokio::test]
async fn hellos_of_another_epoch_are_refused_and_the_stale_side_is_fenced() {
    init_logging();
    let (fa, fb, fc) = (
        TestFencing::new(1, false),
        TestFencing::new(0, false),
        TestFencing::new(0, true),
    );
    let (a, mut ia) = fenced_node(1, fa.clone()).await;
    let (b, mut ib) = fenced_node(2, fb.clone()).await;
    let (c, _ic) = fenced_node(3, fc.clone()).await;
    b.set_peer(1, &a.local_addr().to_string()).unwrap();
    a.set_peer(2, &b.local_addr().to_string()).unwrap();
    c.set_peer(1, &a.local_addr().to_string()).unwrap();

    // The stale member dials the recovered one.
    let deadline = tokio::time::Instant::now() + WAIT;
    while fb.fenced().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never learned it was fenced"
        );
        b.send(envelope(2, 1, 5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fb.fenced()[0], (1, 1));
    assert!(
        next_messages(&mut ia, Duration::from_millis(300))
            .await
            .is_none(),
        "a stale member's message was delivered"
    );
    // The recovered one dials the stale one: refused, and the acceptor
    // learns it is stale from the hello.
    let before = fb.fenced().len();
    let deadline = tokio::time::Instant::now() + WAIT;
    while fb.fenced().len() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b did not notice a's newer epoch"
        );
        a.send(envelope(1, 2, 5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(next_messages(&mut ib, Duration::from_millis(300))
        .await
        .is_none());
    assert!(fa.fenced().is_empty(), "the newer side is never fenced");

    // A node joining for the first time adopts the epoch and is heard.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        c.send(envelope(3, 1, 9));
        if let Some(env) = next_messages(&mut ia, Duration::from_millis(100)).await {
            assert_eq!(env.from, 3);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the joining node never got through"
        );
    }
    assert_eq!(raftwork_net::Fencing::epoch(&*fc), 1);
    assert!(fc.fenced().is_empty());
}
