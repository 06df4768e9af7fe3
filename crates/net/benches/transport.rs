//! Transport benchmark: the cost of a raft message **delivered** (sent by one
//! node's transport and taken out of the other node's inbox), one message per
//! envelope and 64 per envelope, and snapshot throughput.
//!
//! Two transports in one process on loopback. The sender keeps a window of
//! messages in flight (a semaphore the receiver refills as messages arrive),
//! so nothing is dropped for a full queue and the figure is the sustained
//! delivered rate, not an enqueue rate. Each message is a `MsgAppend`
//! carrying one 256-byte entry.
//!
//! Run: `cargo bench -p raftwork-net --bench transport`
//! Settings (environment): `BENCH_SECS` per point (default 2),
//! `BENCH_TRANSPORTS` (default `tcp,tcp-tls,http-stream,http-short,grpc`;
//! any of them with `-tls`), `BENCH_SNAPSHOT_MIB` (default 64; 0 skips the
//! snapshot part).

use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::prelude::{Entry, Message, MessageType, SnapshotMetadata};
use raftwork_net::{
    Envelope, GrpcTransport, HttpMode, HttpTransport, Inbound, Inbox, NetConfig, TcpTransport,
    TlsConfig, Transport,
};
use raftwork_storage::{FileSnapshotStore, SnapshotCompression, SnapshotStore};
use tokio::sync::Semaphore;

fn message(term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppend);
    m.from = 1;
    m.to = 2;
    m.term = term;
    m.entries = vec![Entry {
        index: term,
        term: 1,
        data: vec![7u8; 256].into(),
        ..Default::default()
    }]
    .into();
    m
}

fn tls_pair() -> (TlsConfig, TlsConfig) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let node = || {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        TlsConfig::new(ca.pem(), cert.pem(), key.serialize_pem())
    };
    (node(), node())
}

type Pair = ((Box<dyn Transport>, Inbox), (Box<dyn Transport>, Inbox));

async fn bind(base: &str, id: u64, c: NetConfig) -> (Box<dyn Transport>, Inbox, String) {
    let addr = "127.0.0.1:0";
    match base {
        "tcp" => {
            let (t, i) = TcpTransport::bind(id, addr, c).await.unwrap();
            let a = t.local_addr().to_string();
            (Box::new(t), i, a)
        }
        "http-stream" | "http-short" => {
            let mode = if base == "http-stream" {
                HttpMode::Stream
            } else {
                HttpMode::Short
            };
            let (t, i) = HttpTransport::bind(id, addr, c, mode).await.unwrap();
            let a = t.local_addr().to_string();
            (Box::new(t), i, a)
        }
        "grpc" => {
            let (t, i) = GrpcTransport::bind(id, addr, c).await.unwrap();
            let a = t.local_addr().to_string();
            (Box::new(t), i, a)
        }
        other => panic!(
            "unknown transport {other:?}; known: tcp, http-stream, http-short, grpc, each with an optional -tls"
        ),
    }
}

async fn pair(kind: &str) -> Pair {
    let (base, tls) = kind
        .strip_suffix("-tls")
        .map_or((kind, false), |b| (b, true));
    let (ca, cb) = if tls {
        let (a, b) = tls_pair();
        (
            NetConfig {
                tls: Some(a),
                ..Default::default()
            },
            NetConfig {
                tls: Some(b),
                ..Default::default()
            },
        )
    } else {
        (NetConfig::default(), NetConfig::default())
    };
    let (a, ia, _) = bind(base, 1, ca).await;
    let (b, ib, addr_b) = bind(base, 2, cb).await;
    a.set_peer(2, &addr_b).unwrap();
    ((a, ia), (b, ib))
}

/// Delivered messages per second with `per_envelope` messages per envelope.
async fn delivered_rate(kind: &str, per_envelope: usize, secs: f64) -> (f64, u64) {
    let ((a, _ia), (_b, mut ib)) = pair(kind).await;
    let window = 256 * per_envelope;
    let permits = Arc::new(Semaphore::new(window));
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let receiver = {
        let permits = permits.clone();
        let received = received.clone();
        tokio::spawn(async move {
            while let Some(inbound) = ib.recv().await {
                if let Inbound::Messages(env) = inbound {
                    let n = env.messages.len();
                    received.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    permits.add_permits(n);
                }
            }
        })
    };
    let batch: Vec<Message> = (0..per_envelope as u64).map(message).collect();
    let run = |until: Instant| {
        let permits = permits.clone();
        let batch = batch.clone();
        let a = &a;
        async move {
            while Instant::now() < until {
                permits
                    .acquire_many(per_envelope as u32)
                    .await
                    .unwrap()
                    .forget();
                a.send(Envelope {
                    group_id: 1,
                    from: 1,
                    to: 2,
                    messages: batch.clone(),
                });
            }
        }
    };
    run(Instant::now() + Duration::from_millis(300)).await;
    // Let the warm-up drain, then measure.
    let _ = permits.acquire_many(window as u32).await.unwrap();
    let start_count = received.load(std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    run(start + Duration::from_secs_f64(secs)).await;
    let _ = permits.acquire_many(window as u32).await.unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    let delivered = received.load(std::sync::atomic::Ordering::Relaxed) - start_count;
    receiver.abort();
    a.shutdown();
    (delivered as f64 / elapsed, delivered)
}

async fn snapshot_throughput(kind: &str, mib: u64) -> f64 {
    let ((a, mut ia), (b, _ib)) = pair(kind).await;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sa = FileSnapshotStore::open(dirs.0.path(), 1, SnapshotCompression::None).unwrap();
    let sb = FileSnapshotStore::open(dirs.1.path(), 1, SnapshotCompression::None).unwrap();
    let mut meta = SnapshotMetadata {
        index: 10,
        term: 1,
        ..Default::default()
    };
    meta.mut_conf_state().voters = vec![1, 2];
    let mut w = sa.create(meta.clone()).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut piece = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in piece.chunks_mut(8) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            c.copy_from_slice(&seed.to_le_bytes());
        }
        std::io::Write::write_all(&mut w, &piece).unwrap();
    }
    w.commit().unwrap();
    a.attach_snapshots(1, Arc::new(sa));
    b.attach_snapshots(1, Arc::new(sb));
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = 1;
    m.to = 2;
    m.term = 1;
    m.mut_snapshot().set_metadata(meta);
    let start = Instant::now();
    a.send(Envelope {
        group_id: 1,
        from: 1,
        to: 2,
        messages: vec![m],
    });
    loop {
        if let Some(Inbound::SnapshotStatus { ok, .. }) = ia.recv().await {
            assert!(ok, "snapshot transfer failed");
            break;
        }
    }
    (mib << 20) as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let kinds = std::env::var("BENCH_TRANSPORTS")
        .unwrap_or_else(|_| "tcp,tcp-tls,http-stream,http-short,grpc".into());
    let snapshot_mib: u64 = std::env::var("BENCH_SNAPSHOT_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("raftwork transport benchmark: delivered messages (MsgAppend, one 256 B entry), 2 tokio workers, loopback");
    println!(
        "{:<12} {:>9} {:>14} {:>12}",
        "transport", "per_env", "delivered/s", "us_per_msg"
    );
    for kind in kinds.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        for per_envelope in [1usize, 64] {
            let (rate, _) = rt.block_on(delivered_rate(kind, per_envelope, secs));
            println!(
                "{:<12} {:>9} {:>14.0} {:>12.3}",
                kind,
                per_envelope,
                rate,
                1e6 / rate
            );
        }
        if snapshot_mib > 0 {
            let mbps = rt.block_on(snapshot_throughput(kind, snapshot_mib));
            println!("{kind:<12} snapshot {snapshot_mib} MiB (incompressible, no rate limit): {mbps:.0} MB/s");
        }
    }
}
