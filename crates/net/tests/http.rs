//! The HTTP transport on loopback, in both modes: delivery in order (also
//! across a redial), unreachable reports and resumption across a peer's
//! restart, broken streams, idle kept-alive connections, malformed requests,
//! TLS, and snapshots streamed on upgraded connections.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use raft::prelude::{MessageType, SnapshotMetadata};
use raftwork_net::{
    Envelope, HttpMode, HttpTransport, Inbound, Inbox, NetConfig, TlsConfig, Transport,
    HTTP_BATCH_PATH, HTTP_SNAPSHOT_PATH, HTTP_STREAM_PATH,
};
use raftwork_storage::{FileSnapshotStore, SnapshotCompression, SnapshotStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MODES: [HttpMode; 2] = [HttpMode::Stream, HttpMode::Short];

async fn bind(id: u64, mode: HttpMode, config: NetConfig) -> (HttpTransport, Inbox) {
    HttpTransport::bind(id, "127.0.0.1:0", config, mode)
        .await
        .unwrap()
}

/// Nodes 1 and 2, each knowing the other.
async fn pair(
    mode: HttpMode,
    tls: Option<(TlsConfig, TlsConfig)>,
) -> ((HttpTransport, Inbox), (HttpTransport, Inbox)) {
    let (ta, tb) = match tls {
        Some((a, b)) => (Some(a), Some(b)),
        None => (None, None),
    };
    let a = bind(1, mode, with_tls(ta)).await;
    let b = bind(2, mode, with_tls(tb)).await;
    a.0.set_peer(2, &b.0.local_addr().to_string()).unwrap();
    b.0.set_peer(1, &a.0.local_addr().to_string()).unwrap();
    (a, b)
}

/// Sends a heartbeat from 1 to 2 every 20 ms until node 1 hears that 2 is
/// unreachable; false if it never does (hang guard).
async fn sends_until_unreachable(a: &HttpTransport, ia: &mut Inbox) -> bool {
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

async fn in_order(mode: HttpMode) {
    init_logging();
    let ((a, _ia), (_b, mut ib)) = pair(mode, None).await;
    for term in 1..=500 {
        a.send(envelope(1, 2, term));
    }
    expect_terms(&mut ib, 1, 500).await;
}

#[tokio::test]
async fn envelopes_arrive_in_order_over_a_stream() {
    in_order(HttpMode::Stream).await;
}

#[tokio::test]
async fn envelopes_arrive_in_order_in_short_requests() {
    in_order(HttpMode::Short).await;
}

#[tokio::test]
async fn the_modes_interoperate() {
    init_logging();
    let (a, mut ia) = bind(1, HttpMode::Stream, NetConfig::default()).await;
    let (b, mut ib) = bind(2, HttpMode::Short, NetConfig::default()).await;
    a.set_peer(2, &b.local_addr().to_string()).unwrap();
    b.set_peer(1, &a.local_addr().to_string()).unwrap();
    for term in 1..=50 {
        a.send(envelope(1, 2, term));
        b.send(envelope(2, 1, term));
    }
    expect_terms(&mut ib, 1, 50).await;
    expect_terms(&mut ia, 1, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redial_to_a_new_address_keeps_the_order() {
    init_logging();
    for mode in MODES {
        let config = NetConfig {
            // Room for the old stream to drain before the new one opens.
            connect_timeout: Duration::from_secs(20),
            ..Default::default()
        };
        let (a, _ia) = bind(1, mode, config.clone()).await;
        let (b, mut ib) = bind(2, mode, config).await;
        a.set_peer(2, &b.local_addr().to_string()).unwrap();
        a.send(envelope(1, 2, 1));
        expect_terms(&mut ib, 1, 1).await;
        // 20 MiB in 20 frames (alternating groups are not merged into one
        // frame); once the first arrives, the rest is on its way.
        for term in 2..=21 {
            let mut env = envelope(1, 2, term);
            env.group_id = term % 2 + 1;
            env.messages[0].context = vec![7u8; 1 << 20].into();
            a.send(env);
        }
        expect_terms(&mut ib, 2, 2).await;
        // Another name for the same node: the peer task drops its sink and
        // dials again while the old stream still carries frames.
        a.set_peer(2, &format!("localhost:{}", b.local_addr().port()))
            .unwrap();
        for term in 22..=500 {
            a.send(envelope(1, 2, term));
        }
        expect_terms(&mut ib, 3, 500).await;
    }
}

async fn restart(mode: HttpMode) {
    init_logging();
    let ((a, mut ia), (b, mut ib)) = pair(mode, None).await;
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
        match HttpTransport::bind(2, b_addr, NetConfig::default(), mode).await {
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
async fn a_restarted_peer_is_reported_unreachable_then_reached_again_over_a_stream() {
    restart(HttpMode::Stream).await;
}

#[tokio::test]
async fn a_restarted_peer_is_reported_unreachable_then_reached_again_in_short_requests() {
    restart(HttpMode::Short).await;
}

#[tokio::test]
async fn a_receiver_shutting_down_mid_stream_is_reported_unreachable() {
    init_logging();
    let ((a, mut ia), (b, mut ib)) = pair(HttpMode::Stream, None).await;
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

/// What a fake peer does with a stream request once it has read its head.
#[derive(Clone, Copy, Debug)]
enum Fake {
    /// Answers at once and keeps the connection open without reading more.
    AnswersEarly,
    /// Closes the connection.
    Cuts,
}

/// A listener that treats every connection as `behaviour` says; it keeps
/// the connections it leaves open until the test ends.
async fn fake_peer(behaviour: Fake) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut byte).await {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            match behaviour {
                Fake::AnswersEarly => {
                    let _ = s
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 4\r\n\r\nnope")
                        .await;
                    kept.push(s);
                }
                Fake::Cuts => drop(s),
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_stream_the_peer_answers_or_cuts_is_reported_unreachable() {
    init_logging();
    for behaviour in [Fake::AnswersEarly, Fake::Cuts] {
        let addr = fake_peer(behaviour).await;
        let (a, mut ia) = bind(1, HttpMode::Stream, NetConfig::default()).await;
        a.set_peer(2, &addr.to_string()).unwrap();
        assert!(
            sends_until_unreachable(&a, &mut ia).await,
            "{behaviour:?}: the broken stream was reported"
        );
        a.shutdown();
    }
}

#[tokio::test]
async fn short_mode_redials_an_idle_connection_without_a_report() {
    init_logging();
    // The receiver closes a kept-alive connection idle for 300 ms.
    let config = NetConfig {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (a, mut ia) = bind(1, HttpMode::Short, config.clone()).await;
    let (b, mut ib) = bind(2, HttpMode::Short, config).await;
    a.set_peer(2, &b.local_addr().to_string()).unwrap();
    a.send(envelope(1, 2, 1));
    expect_terms(&mut ib, 1, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.send(envelope(1, 2, 2));
    expect_terms(&mut ib, 2, 2).await;
    assert!(ia.try_recv().is_err(), "no unreachable report");
}

#[tokio::test]
async fn a_silent_connection_is_closed() {
    init_logging();
    let config = NetConfig {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let (b, _ib) = bind(2, HttpMode::Stream, config).await;
    // Connects and says nothing: the server hangs up (no request head in
    // time); the hang guard fails the test otherwise.
    assert!(raw(b.local_addr(), b"").await.is_some(), "closed");
    // A head that never ends is cut too.
    assert!(
        raw(
            b.local_addr(),
            b"POST /raft/v1/batch HTTP/1.1\r\nhost: t\r\n"
        )
        .await
        .is_some(),
        "closed"
    );
}

// ------------------------------------------------------- malformed input

/// Writes `request` on a fresh connection and reads until the server closes
/// it; `None` if it never does (hang guard).
async fn raw(addr: SocketAddr, request: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may close before reading all: a failed write is fine.
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await {
        Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
        Err(_) => None,
    }
}

/// Status code of the first response in `reply`.
fn status(reply: &str) -> Option<u16> {
    reply
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)
        .and_then(|s| s.parse().ok())
}

/// A one-shot request with a content length.
fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[tokio::test]
async fn malformed_requests_are_refused_and_the_node_keeps_serving() {
    init_logging();
    let ((a, _ia), (b, mut ib)) = pair(HttpMode::Stream, None).await;
    let addr = b.local_addr();

    // Control: a well-formed short request is answered 200 and delivered.
    let reply = raw(
        addr,
        &post(HTTP_BATCH_PATH, &cat(&[&hello(2), &batch(1, 5)])),
    )
    .await
    .unwrap();
    assert_eq!(status(&reply), Some(200), "{reply}");
    let env = next_messages(&mut ib, WAIT).await.unwrap();
    assert_eq!(env.messages[0].term, 5);

    let good = batch(1, 6);
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0xff;
    let mut huge = good.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let refused: [(&str, Vec<u8>); 7] = [
        ("bad checksum", cat(&[&hello(2), &bad_crc])),
        ("huge length", cat(&[&hello(2), &huge])),
        (
            "envelope from another node",
            cat(&[&hello(2), &batch(3, 6)]),
        ),
        (
            "garbage instead of a hello",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ),
        ("hello for another node", cat(&[&hello(9), &good])),
        (
            "truncated frame",
            cat(&[&hello(2), &good[..good.len() - 2]]),
        ),
        ("empty body", Vec::new()),
    ];
    for (what, body) in &refused {
        let reply = raw(addr, &post(HTTP_BATCH_PATH, body)).await;
        let reply = reply.unwrap_or_else(|| panic!("{what}: connection left open"));
        assert_eq!(status(&reply), Some(400), "{what}: {reply}");
    }

    // The stream route: a chunked body with a bad frame, never ended. The
    // server refuses it and closes the stream. (Not the last two: on an open
    // stream, the rest of a truncated frame, or the hello, may still come.)
    for (what, body) in &refused[..5] {
        let mut req = format!(
            "POST {HTTP_STREAM_PATH} HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        req.extend_from_slice(b"\r\n");
        let reply = raw(addr, &req).await;
        let reply = reply.unwrap_or_else(|| panic!("stream, {what}: stream left open"));
        assert_ne!(status(&reply), Some(200), "stream, {what}: {reply}");
    }

    // A body shorter than announced, then the client stops writing.
    {
        let mut req = post(HTTP_BATCH_PATH, &cat(&[&hello(2), &good]));
        req.truncate(req.len() - 3);
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&req).await.unwrap();
        s.shutdown().await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("closed")
            .ok();
        assert_ne!(
            status(&String::from_utf8_lossy(&buf)),
            Some(200),
            "short body"
        );
    }

    // Other routes and methods, and bytes that are not HTTP.
    let reply = raw(addr, &post("/raft/v1/nope", b"")).await.unwrap();
    assert_eq!(status(&reply), Some(404), "{reply}");
    let reply = raw(
        addr,
        format!("GET {HTTP_STREAM_PATH} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(status(&reply), Some(404), "{reply}");
    // The snapshot route wants an upgrade; upgraded, it still checks frames.
    let reply = raw(addr, &post(HTTP_SNAPSHOT_PATH, b"")).await.unwrap();
    assert_eq!(status(&reply), Some(400), "{reply}");
    let reply = raw(
        addr,
        format!(
            "POST {HTTP_SNAPSHOT_PATH} HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\n\
             upgrade: raftwork-snapshot/1\r\n\r\n\x07garbage after the upgrade"
        )
        .as_bytes(),
    )
    .await
    .expect("upgraded stream closed");
    assert_eq!(status(&reply), Some(101), "{reply}");
    let reply = raw(addr, b"\x00\x01\x02 not http at all\r\n\r\n")
        .await
        .expect("closed");
    assert_ne!(status(&reply), Some(200), "{reply}");

    // Nothing bad was delivered, and real traffic still flows.
    a.send(envelope(1, 2, 77));
    let env = next_messages(&mut ib, WAIT).await.expect("still serving");
    assert_eq!(env.messages[0].term, 77);
}

// ------------------------------------------------------------------- TLS

#[tokio::test]
async fn mutual_tls_delivers_in_both_modes() {
    init_logging();
    let ca = Ca::new("raftwork test CA");
    for mode in MODES {
        let ((a, _ia), (_b, mut ib)) =
            pair(mode, Some((ca.node_tls(false), ca.node_tls(false)))).await;
        for term in 1..=20 {
            a.send(envelope(1, 2, term));
        }
        expect_terms(&mut ib, 1, 20).await;
    }
}

#[tokio::test]
async fn plaintext_and_foreign_certificates_are_refused_by_a_tls_port() {
    init_logging();
    let ca = Ca::new("raftwork test CA");
    let other_ca = Ca::new("some other CA");
    let (b, mut ib) = bind(2, HttpMode::Stream, with_tls(Some(ca.node_tls(false)))).await;
    let addr = b.local_addr();

    // A plaintext request, well-formed otherwise, gets no HTTP answer.
    let reply = raw(
        addr,
        &post(HTTP_BATCH_PATH, &cat(&[&hello(2), &batch(1, 5)])),
    )
    .await
    .expect("closed");
    assert_eq!(status(&reply), None, "{reply}");

    // Through the transport, in both modes: a plaintext node and a node with
    // a certificate from another CA are told the peer is unreachable.
    for mode in MODES {
        for tls in [None, Some(other_ca.node_tls(false))] {
            let (a, mut ia) = bind(1, mode, with_tls(tls)).await;
            a.set_peer(2, &addr.to_string()).unwrap();
            assert!(
                sends_until_unreachable(&a, &mut ia).await,
                "{mode:?}: reported unreachable"
            );
            a.shutdown();
        }
    }
    assert!(
        next_messages(&mut ib, Duration::from_millis(300))
            .await
            .is_none(),
        "nothing from the refused nodes was delivered"
    );
}

// ------------------------------------------------------------- snapshots

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_stream_on_an_upgraded_connection_in_both_modes() {
    init_logging();
    for (k, mode) in MODES.into_iter().enumerate() {
        let index = 100 + k as u64;
        let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let store_a = FileSnapshotStore::open(dirs.0.path(), 2, SnapshotCompression::None).unwrap();
        let store_b = FileSnapshotStore::open(dirs.1.path(), 2, SnapshotCompression::None).unwrap();
        // 3 MiB of pseudo-random bytes and a tail that ends mid-chunk.
        let mut meta = SnapshotMetadata {
            index,
            term: 3,
            ..Default::default()
        };
        meta.mut_conf_state().voters = vec![1, 2];
        let mut w = store_a.create(meta).unwrap();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut data = vec![0u8; (3 << 20) + 12_345];
        for chunk in data.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            chunk.copy_from_slice(&seed.to_le_bytes()[..chunk.len()]);
        }
        w.write_all(&data).unwrap();
        w.commit().unwrap();
        let want = stored_crc(&store_a, index);

        let net = NetConfig {
            snapshot_chunk_bytes: 700 << 10,
            ..Default::default()
        };
        let (a, mut inbox_a) = bind(1, mode, net.clone()).await;
        let (b, mut inbox_b) = bind(2, mode, net).await;
        a.attach_snapshots(1, Arc::new(store_a));
        b.attach_snapshots(1, Arc::new(store_b.clone()));
        assert!(a.streams_snapshots() && b.streams_snapshots());
        a.set_peer(2, &b.local_addr().to_string()).unwrap();
        a.send(Envelope {
            group_id: 1,
            from: 1,
            to: 2,
            messages: vec![snapshot_message(index, 3)],
        });

        // Raft hears of the snapshot only once the store holds it whole.
        let delivered = next_messages(&mut inbox_b, WAIT * 2)
            .await
            .expect("the snapshot message is delivered");
        assert_eq!(stored_crc(&store_b, index), want, "{mode:?}: same bytes");
        let m = &delivered.messages[0];
        assert_eq!(m.get_msg_type(), MessageType::MsgSnapshot);
        assert_eq!(m.get_snapshot().get_metadata().index, index);
        assert!(m.get_snapshot().data.is_empty(), "data went by stream");

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
        assert!(ok, "{mode:?}: the transfer is reported done");
    }
}

#[tokio::test]
async fn a_certificate_speaks_only_for_the_node_it_names() {
    init_logging();
    let ca = Ca::new("raftwork test CA");
    for mode in MODES {
        certificates_speak_only_for_their_node(&ca, |id, config| async move {
            let (t, inbox) = bind(id, mode, config).await;
            let addr = t.local_addr();
            (t, inbox, addr)
        })
        .await;
    }
}
