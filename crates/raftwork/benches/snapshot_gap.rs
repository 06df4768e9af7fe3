//! Applies during a snapshot of a large in-memory state: written on the
//! apply path (`StateMachine::snapshot`, as before issue 18) against a
//! point-in-time view written off it (`StateMachine::snapshot_view`).
//!
//! A durable single node (WAL and file snapshot store in a temp dir) holds
//! a persistent ordered map (`imbl::OrdMap`, whose clone is O(1)) of
//! `BENCH_KEYS` keys with 256-byte values, given at build. Closed-loop
//! writers put into it; after a warm-up one snapshot is taken. Printed per
//! mode: how long the snapshot took, the longest gap between two apply
//! batches while it was written, and the writers' p50/p99/max latency in
//! the window around it against a window without one.
//!
//! Run: `cargo bench -p raftwork --bench snapshot_gap`
//! Settings (environment): `BENCH_KEYS` (default 2,000,000, about 600 MB
//! of state), `BENCH_WRITERS` (64), `BENCH_DIR` (temp dir).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use raftwork::{Builder, Command, Node, SnapshotView, StateMachine};

const VALUE_BYTES: usize = 256;

/// The state, and the longest gap between two applies since it was reset.
struct PMap {
    map: imbl::OrdMap<u64, Arc<[u8]>>,
    view: bool,
    last_apply: Instant,
    max_gap: Arc<Mutex<Duration>>,
}

impl StateMachine for PMap {
    type Response = ();

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<()> {
        let now = Instant::now();
        let gap = now - self.last_apply;
        self.last_apply = now;
        let mut max = self.max_gap.lock().unwrap();
        *max = (*max).max(gap);
        drop(max);
        for c in commands {
            let key = u64::from_le_bytes(c.data[..8].try_into().unwrap());
            self.map.insert(key, Arc::from(&c.data[8..]));
        }
        vec![(); commands.len()]
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        write_map(&self.map, w)
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)?;
        Ok(())
    }

    fn snapshot_view(&self) -> Option<Box<dyn SnapshotView>> {
        self.view
            .then(|| Box::new(MapView(self.map.clone())) as Box<dyn SnapshotView>)
    }
}

fn write_map(map: &imbl::OrdMap<u64, Arc<[u8]>>, w: &mut dyn Write) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, w);
    for (k, v) in map.iter() {
        w.write_all(&k.to_le_bytes())?;
        w.write_all(v)?;
    }
    w.flush()
}

struct MapView(imbl::OrdMap<u64, Arc<[u8]>>);

impl SnapshotView for MapView {
    fn write_to(self: Box<Self>, w: &mut dyn Write) -> std::io::Result<()> {
        write_map(&self.0, w)
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Window {
    latencies: Histogram<u64>,
}

async fn run(view: bool, keys: u64, writers: u64) {
    let dir = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let value: Arc<[u8]> = Arc::from(vec![7u8; VALUE_BYTES]);
    let map: imbl::OrdMap<u64, Arc<[u8]>> = (0..keys).map(|k| (k, value.clone())).collect();
    let max_gap = Arc::new(Mutex::new(Duration::ZERO));
    let node: Node<PMap> = Builder::new(
        1,
        PMap {
            map,
            view,
            last_apply: Instant::now(),
            max_gap: max_gap.clone(),
        },
    )
    .data_dir(dir.path())
    .initial_voters([1])
    .configure(|c| c.core.snapshot_interval_entries = 0)
    .build()
    .unwrap();
    node.wait_for_leader(Duration::from_secs(30)).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let window = Arc::new(Mutex::new(Window {
        latencies: Histogram::new(3).unwrap(),
    }));
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (node, stop, window, counter) =
            (node.clone(), stop.clone(), window.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut cmd = vec![0u8; 8 + VALUE_BYTES];
            while !stop.load(Ordering::Relaxed) {
                let k = counter.fetch_add(1, Ordering::Relaxed).wrapping_mul(31 + w) % keys;
                cmd[..8].copy_from_slice(&k.to_le_bytes());
                let t = Instant::now();
                node.propose(cmd.clone()).await.unwrap();
                let us = t.elapsed().as_micros() as u64;
                window.lock().unwrap().latencies.record(us.max(1)).unwrap();
            }
        }));
    }
    let take = |window: &Mutex<Window>| {
        std::mem::replace(
            &mut *window.lock().unwrap(),
            Window {
                latencies: Histogram::new(3).unwrap(),
            },
        )
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A window without a snapshot.
    take(&window);
    *max_gap.lock().unwrap() = Duration::ZERO;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let quiet = take(&window);
    let quiet_gap = std::mem::take(&mut *max_gap.lock().unwrap());
    let before = counter.load(Ordering::Relaxed);
    let t = Instant::now();
    let meta = node.snapshot().await.unwrap();
    let snapshot_s = t.elapsed().as_secs_f64();
    let during = take(&window);
    let during_gap = *max_gap.lock().unwrap();
    let puts_during = counter.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    node.shutdown().await;
    let ms = |us: u64| us as f64 / 1e3;
    println!(
        "mode={} keys={keys} writers={writers} snapshot_bytes={} snapshot_s={snapshot_s:.2} puts_during_snapshot={puts_during} \
         max_apply_gap_ms: quiet={:.1} during={:.1} | latency_ms quiet p50={:.2} p99={:.2} max={:.1} | during p50={:.2} p99={:.2} max={:.1}",
        if view { "view" } else { "on-apply-path" },
        meta.size_bytes,
        quiet_gap.as_secs_f64() * 1e3,
        during_gap.as_secs_f64() * 1e3,
        ms(quiet.latencies.value_at_quantile(0.5)),
        ms(quiet.latencies.value_at_quantile(0.99)),
        ms(quiet.latencies.max()),
        ms(during.latencies.value_at_quantile(0.5)),
        ms(during.latencies.value_at_quantile(0.99)),
        ms(during.latencies.max()),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let keys = env("BENCH_KEYS", 2_000_000);
    let writers = env("BENCH_WRITERS", 64);
    for view in [false, true, false, true] {
        run(view, keys, writers).await;
    }
}
