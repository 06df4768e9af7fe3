//! Snapshot streaming between two TCP transports, through a proxy that cuts
//! the first transfer halfway: the retry resumes where the receiver stopped,
//! the rate limit holds, memory stays flat, and the receiver's store ends up
//! with the exact snapshot before raft hears of it.
//!
//! Default: a 32 MiB snapshot at 64 MiB/s. `RAFTWORK_BIG_SNAPSHOT=1` runs the
//! 256 MiB case.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::{init_logging, WAIT};
use raft::prelude::{Message, MessageType, SnapshotMetadata};
use raftwork_net::{Envelope, Inbound, Inbox, NetConfig, TcpTransport, Transport};
use raftwork_storage::{FileSnapshotStore, SnapshotCompression, SnapshotStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards connections to `target`; the first connection that carries more
/// than `cut_after` bytes towards the target is cut there. Records the bytes
/// each connection carried.
async fn cutting_proxy(
    target: std::net::SocketAddr,
    cut_after: u64,
) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u64>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let carried = Arc::new(std::sync::Mutex::new(Vec::new()));
    let cuts = Arc::new(AtomicUsize::new(0));
    let log = carried.clone();
    tokio::spawn(async move {
        loop {
            let (mut down, _) = listener.accept().await.unwrap();
            let mut up = TcpStream::connect(target).await.unwrap();
            let log = log.clone();
            let cuts = cuts.clone();
            tokio::spawn(async move {
                let (mut dr, mut dw) = down.split();
                let (mut ur, mut uw) = up.split();
                let forwarded = AtomicU64::new(0);
                let to_target = async {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match dr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let total = forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if total > cut_after && cuts.fetch_add(1, Ordering::SeqCst) == 0 {
                            return; // cut: drop both directions
                        }
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = uw.shutdown().await;
                };
                let to_client = async {
                    let _ = tokio::io::copy(&mut ur, &mut dw).await;
                };
                tokio::select! {
                    _ = to_target => {}
                    _ = to_client => {}
                }
                log.lock().unwrap().push(forwarded.load(Ordering::SeqCst));
            });
        }
    });
    (addr, carried)
}

fn snapshot_message(index: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = 1;
    m.to = 2;
    m.term = term;
    let meta = m.mut_snapshot().mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.mut_conf_state().voters = vec![1, 2];
    m
}

/// Pseudo-random (incompressible) bytes, so wire bytes ≈ data bytes.
fn fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let b = seed.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

async fn next_status(inbox: &mut Inbox) -> bool {
    tokio::time::timeout(WAIT * 4, async {
        loop {
            if let Some(Inbound::SnapshotStatus { ok, .. }) = inbox.recv().await {
                return ok;
            }
        }
    })
    .await
    .expect("a snapshot outcome is reported")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_transfer_resumes_under_the_rate_limit_and_installs_whole() {
    init_logging();
    let big = std::env::var_os("RAFTWORK_BIG_SNAPSHOT").is_some();
    let size_bytes: u64 = if big { 256 << 20 } else { 32 << 20 };
    let rate: u64 = 64 << 20;
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let store_a = FileSnapshotStore::open(dirs.0.path(), 2, SnapshotCompression::None).unwrap();
    let store_b = FileSnapshotStore::open(dirs.1.path(), 2, SnapshotCompression::None).unwrap();

    // The sender's snapshot, written in 1 MiB pieces.
    let mut meta = SnapshotMetadata {
        index: 100,
        term: 3,
        ..Default::default()
    };
    meta.mut_conf_state().voters = vec![1, 2];
    let mut w = store_a.create(meta).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut want_crc = 0u32;
    let mut piece = vec![0u8; 1 << 20];
    for _ in 0..size_bytes >> 20 {
        fill(&mut piece, &mut seed);
        want_crc = crc32c::crc32c_append(want_crc, &piece);
        w.write_all(&piece).unwrap();
    }
    w.commit().unwrap();

    let net = NetConfig {
        snapshot_rate_bytes_per_sec: rate,
        ..Default::default()
    };
    let (a, mut inbox_a) = TcpTransport::bind(1, "127.0.0.1:0", net.clone())
        .await
        .unwrap();
    let (b, mut inbox_b) = TcpTransport::bind(2, "127.0.0.1:0", net).await.unwrap();
    a.attach_snapshots(1, Arc::new(store_a));
    b.attach_snapshots(1, Arc::new(store_b.clone()));
    assert!(a.streams_snapshots());
    let (proxy, carried) = cutting_proxy(b.local_addr(), size_bytes / 2).await;
    a.set_peer(2, &proxy.to_string()).unwrap();

    let rss_before = rss_bytes();
    let send = || {
        a.send(Envelope {
            group_id: 1,
            from: 1,
            to: 2,
            messages: vec![snapshot_message(100, 3)],
        })
    };
    // First attempt: cut halfway, reported failed, nothing delivered.
    send();
    assert!(!next_status(&mut inbox_a).await, "the cut transfer fails");
    assert!(
        store_b.latest().unwrap().is_none(),
        "nothing installed from half a snapshot"
    );

    // Second attempt resumes.
    let started = Instant::now();
    send();
    assert!(
        next_status(&mut inbox_a).await,
        "the resumed transfer succeeds"
    );
    let elapsed = started.elapsed();
    let rss_growth = rss_bytes().saturating_sub(rss_before);

    // Raft hears of it only now, with the metadata.
    let delivered = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Inbound::Messages(env)) = inbox_b.recv().await {
                return env;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        delivered.messages[0].get_msg_type(),
        MessageType::MsgSnapshot
    );
    assert_eq!(
        delivered.messages[0].get_snapshot().get_metadata().index,
        100
    );

    // The receiver holds exactly the sender's data.
    let (info, mut reader) = store_b.open(100).unwrap();
    assert_eq!(info.size_bytes, size_bytes);
    let mut got_crc = 0u32;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got_crc = crc32c::crc32c_append(got_crc, &buf[..n]);
    }
    assert_eq!(got_crc, want_crc, "same bytes");

    let carried = carried.lock().unwrap().clone();
    let resumed_bytes = *carried.iter().max().unwrap();
    println!(
        "snapshot {size_bytes} B: connections carried {carried:?}; resumed transfer {resumed_bytes} B in {:.2} s at a limit of {rate} B/s; RSS growth {rss_growth} B",
        elapsed.as_secs_f64()
    );
    assert!(
        resumed_bytes < size_bytes * 3 / 4,
        "the second transfer resumed instead of restarting ({resumed_bytes} of {size_bytes} bytes)"
    );
    // A lower bound only: the limiter must have held the pace.
    let min_secs = resumed_bytes as f64 / rate as f64 * 0.9;
    assert!(
        elapsed.as_secs_f64() >= min_secs,
        "{resumed_bytes} bytes in {:?} beats the {rate} B/s limit",
        elapsed
    );
    assert!(
        rss_growth < size_bytes / 2,
        "memory grew by {rss_growth} bytes for a {size_bytes}-byte snapshot"
    );
}
