//! Restart of a node on `DiskKv` after a crash: the time and memory grow
//! with the log tail the store had not made durable, not with the state.
//!
//! For each (keys, tail) point, a child process loads `keys` puts of
//! 1,000-byte values (16-byte keys) through a durable single node, takes a
//! snapshot (which syncs the store and compacts the log), writes `tail`
//! more puts, and aborts (no stop, no sync: a crash). A second child
//! restarts the node on that data dir and reports how long until it has
//! applied everything, how many commands it applied again, and its
//! resident memory. The figures go to BENCHMARKS.md.
//!
//! Run: `cargo run --release -p raftwork-diskkv --example restart_bench`
//! Settings (environment): POINTS ("100000:10000 100000:100000
//! 1000000:10000 1000000:100000", keys:tail), CLIENTS (256 writers while
//! loading), BENCH_DIR (a directory on the disk to measure; default a temp
//! dir).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftwork::{Builder, Node, OnDisk};
use raftwork_diskkv::{DiskKv, KvOp};

const VALUE_BYTES: usize = 1000;
const WAIT: Duration = Duration::from_secs(600);

fn start(dir: &Path) -> Node<OnDisk<DiskKv>> {
    Builder::new(1, OnDisk::new(DiskKv::new(dir.join("kv"))))
        .data_dir(dir.join("node"))
        .initial_voters([1])
        .configure(|c| {
            // Only the load's explicit snapshot: the tail stays in the log.
            c.core.snapshot_interval_entries = 0;
            c.core.snapshot_keep_entries = 0;
        })
        .build()
        .expect("node starts")
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Puts keys `from..to` with `clients` concurrent writers; the last index.
async fn put_range(node: &Node<OnDisk<DiskKv>>, from: u64, to: u64, clients: u64) -> u64 {
    let next = Arc::new(AtomicU64::new(from));
    let last = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (node, next, last) = (node.clone(), next.clone(), last.clone());
        tasks.push(tokio::spawn(async move {
            let mut value = vec![0u8; VALUE_BYTES];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    return;
                }
                // Pseudo-random bytes: no store compresses them away.
                let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                for chunk in value.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
                }
                let op = KvOp::Put {
                    key: format!("key-{i:012}").into_bytes(),
                    value: value.clone(),
                };
                let (index, _) = node.propose(op.encode()).await.expect("put");
                last.fetch_max(index, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    last.load(Ordering::Relaxed)
}

async fn load(dir: &Path, keys: u64, tail: u64, clients: u64) {
    let node = start(dir);
    node.wait_for_leader(WAIT).await.unwrap();
    let started = Instant::now();
    put_range(&node, 0, keys, clients).await;
    let loaded_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let snap = node.snapshot().await.expect("snapshot");
    let snapshot_s = started.elapsed().as_secs_f64();
    let last = put_range(&node, keys, keys + tail, clients).await;
    println!(
        "LOAD keys={keys} tail={tail} load_s={loaded_s:.1} puts_per_s={:.0} snapshot_index={} snapshot_bytes={} snapshot_s={snapshot_s:.1} last={last}",
        keys as f64 / loaded_s,
        snap.metadata.index,
        snap.size_bytes
    );
    std::process::abort();
}

async fn restart(dir: &Path, last: u64) {
    let started = Instant::now();
    let node = start(dir);
    let built_ms = started.elapsed().as_secs_f64() * 1e3;
    node.wait_for_leader(WAIT).await.unwrap();
    while node.status().await.unwrap().applied_index < last {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let caught_up_ms = started.elapsed().as_secs_f64() * 1e3;
    let (again, keys) = node
        .read_stale(|kv: &OnDisk<DiskKv>| (kv.applied_since_open(), kv.applied_index().unwrap()))
        .await
        .unwrap();
    println!(
        "RESTART build_ms={built_ms:.0} caught_up_ms={caught_up_ms:.0} applied_again={again} store_index={keys} rss_mib={:.0}",
        rss_mib()
    );
    std::process::abort();
}

fn run_child(args: &[&str]) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(args)
        .output()
        .expect("child runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !stdout.contains("LOAD") && !stdout.contains("RESTART") {
        panic!(
            "child {args:?} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout.trim().to_string()
}

fn field(line: &str, name: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} missing in {line}"))
        .to_string()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("load") => {
            let n = |i: usize| args[i].parse().unwrap();
            return load(Path::new(&args[2]), n(3), n(4), n(5)).await;
        }
        Some("restart") => return restart(Path::new(&args[2]), args[3].parse().unwrap()).await,
        _ => {}
    }
    let points = std::env::var("POINTS")
        .unwrap_or_else(|_| "100000:10000 100000:100000 1000000:10000 1000000:100000".to_string());
    let clients = std::env::var("CLIENTS").unwrap_or_else(|_| "256".into());
    let base = std::env::var("BENCH_DIR").map(PathBuf::from).ok();
    for point in points.split_whitespace() {
        let (keys, tail) = point.split_once(':').expect("keys:tail");
        let work = match &base {
            Some(b) => tempfile::tempdir_in(b).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        let dir = work.path().to_str().unwrap();
        let loaded = run_child(&["load", dir, keys, tail, &clients]);
        let last = field(&loaded, "last");
        let restarted = run_child(&["restart", dir, &last]);
        println!("{loaded}\n{restarted}");
    }
}
