//! A new member catches up through a snapshot of a large on-disk state
//! while writers go on: the writers' latency during the transfer beside
//! their latency without one.
//!
//! Three nodes on `DiskKv` over TCP on loopback (each with its own data
//! dir) are loaded with `KEYS` puts of 1,000-byte values; a snapshot
//! compacts the log. Then `WRITERS` closed-loop writers put 256-byte
//! values to the leader: a quiet window of `QUIET_SECS`, then a fourth
//! node joins as a learner, empty, and catches up by the snapshot
//! (streamed from the leader's fjall view in chunks while the writers
//! go on); the window lasts until it has applied the index the leader had
//! when it was added. Prints both windows' puts/s, p50/p99/max, and the
//! transfer's time and size.
//!
//! Run: `cargo run --release -p raftwork-diskkv --example snapshot_load`
//! Settings (environment): KEYS (500000), WRITERS (64), QUIET_SECS (5),
//! BENCH_DIR (a directory on the disk to measure; default a temp dir).

use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftwork::{Builder, Node, NodeId, OnDisk};
use raftwork_diskkv::{DiskKv, KvOp};

type KvNode = Node<OnDisk<DiskKv>>;

/// Puts slower than this are printed with the time they started (since
/// the start of the run, as in the log lines with `RUST_LOG` set).
const SLOW: Duration = Duration::from_millis(250);

const WAIT: Duration = Duration::from_secs(900);

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn start(id: NodeId, dir: &Path, addrs: &[String], voters: Option<&[NodeId]>) -> KvNode {
    let mut b = Builder::new(id, OnDisk::new(DiskKv::new(dir.join("kv"))))
        .data_dir(dir.join("node"))
        .listen(addrs[id as usize - 1].parse().unwrap())
        .configure(|c| {
            c.core.snapshot_interval_entries = 100_000;
            c.core.snapshot_keep_entries = 1_000;
        });
    for (i, a) in addrs.iter().enumerate() {
        let peer = i as u64 + 1;
        if peer != id {
            b = b.peer(peer, a.clone());
        }
    }
    b = match voters {
        Some(v) => b.initial_voters(v.iter().copied()),
        None => b.join_existing(),
    };
    b.build().expect("node starts")
}

fn value(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = vec![0u8; len];
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    v
}

async fn load(node: &KvNode, keys: u64) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..256 {
        let (node, next) = (node.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return;
                }
                let op = KvOp::Put {
                    key: format!("key-{i:012}").into_bytes(),
                    value: value(i, 1000),
                };
                node.propose(op.encode()).await.expect("load put");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Latencies (µs) recorded since the last take.
#[derive(Default)]
struct Window(Vec<u64>);
fn summary(name: &str, w: &mut [u64], secs: f64) -> String {
    w.sort_unstable();
    let q = |p: f64| w.get(((w.len() as f64 * p) as usize).min(w.len().saturating_sub(1)));
    format!(
        "{name}: secs={secs:.1} puts_per_s={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.1}",
        w.len() as f64 / secs,
        *q(0.5).unwrap_or(&0) as f64 / 1e3,
        *q(0.99).unwrap_or(&0) as f64 / 1e3,
        *w.last().unwrap_or(&0) as f64 / 1e3
    )
}

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .init();
    }
    let epoch = Instant::now();
    let keys = env("KEYS", 500_000);
    let writers = env("WRITERS", 64);
    let quiet_secs = env("QUIET_SECS", 5);
    let base = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let addrs: Vec<String> = (0..4).map(|_| free_addr()).collect();
    let dirs: Vec<_> = (1..=4).map(|i| base.path().join(format!("n{i}"))).collect();
    let voters = [1u64, 2, 3];
    let nodes: Vec<KvNode> = (1..=3)
        .map(|id| start(id, &dirs[id as usize - 1], &addrs, Some(&voters)))
        .collect();
    let leader_id = nodes[0].wait_for_leader(WAIT).await.unwrap();
    let leader = nodes[leader_id as usize - 1].clone();
    let t = Instant::now();
    load(&leader, keys).await;
    let snap = leader.snapshot().await.expect("snapshot");
    println!(
        "loaded keys={keys} in {:.1}s; snapshot at {} of {} bytes",
        t.elapsed().as_secs_f64(),
        snap.metadata.index,
        snap.size_bytes
    );

    let window = Arc::new(Mutex::new(Window::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (node, window, stop, counter) = (
            leader.clone(),
            window.clone(),
            stop.clone(),
            counter.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let i = counter.fetch_add(1, Ordering::Relaxed) % keys;
                let op = KvOp::Put {
                    key: format!("key-{i:012}").into_bytes(),
                    value: value(i + 7, 256),
                };
                let t = Instant::now();
                node.propose(op.encode()).await.expect("put");
                let took = t.elapsed();
                if took > SLOW {
                    println!(
                        "slow put: {:.0} ms, started at {:.2} s",
                        took.as_secs_f64() * 1e3,
                        (t - epoch).as_secs_f64()
                    );
                }
                window.lock().unwrap().0.push(took.as_micros() as u64);
            }
        }));
    }
    let take = || std::mem::take(&mut window.lock().unwrap().0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    take();
    tokio::time::sleep(Duration::from_secs(quiet_secs)).await;
    let mut quiet = take();

    let t = Instant::now();
    println!("the new member joins at {:.2} s", (t - epoch).as_secs_f64());
    let joiner = start(4, &dirs[3], &addrs, None);
    leader
        .add_learner(4, Vec::new())
        .await
        .expect("add learner");
    let target = leader.status().await.unwrap().commit_index;
    while joiner.status().await.map_or(0, |s| s.applied_index) < target {
        assert!(t.elapsed() < WAIT, "the new member never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let transfer_secs = t.elapsed().as_secs_f64();
    let mut during = take();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let received = joiner
        .read_stale(|kv: &OnDisk<DiskKv>| kv.approximate_len().unwrap())
        .await
        .unwrap();
    println!("{}", summary("quiet", &mut quiet, quiet_secs as f64));
    println!(
        "{}; new member caught up to {target} in {transfer_secs:.1}s holding ~{received} keys",
        summary("during the transfer", &mut during, transfer_secs)
    );
    joiner.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}
