//! What the server's in-memory key space costs per command, and how long a
//! snapshot holds up the apply path.
//!
//! Loads `KEYS` keys (`VALUE_BYTES` each), then measures on one thread:
//! * `put_ns`: overwriting random existing keys through
//!   `KvStore::apply_one` (the apply path's whole work per put: decode,
//!   MVCC write, history compaction);
//! * `get_ns`: reads of random keys;
//! * `snapshot_ms`: serialising the whole store into a sink, which is what
//!   the apply path waits for when a snapshot is written on it;
//! * `view_us`: taking a snapshot view instead (what the apply path waits
//!   for now), and `put_ns_view`: overwrites while that view is alive
//!   (each first write to a node of the map copies it).
//!
//! Run: `cargo bench -p raftwork-server --bench kv_apply`
//! Settings (environment): KEYS (1000000), VALUE_BYTES (256), OPS (1000000).

use std::hint::black_box;
use std::time::Instant;

use raftwork::StateMachine;
use raftwork_server::kv::{KvCommand, KvStore};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A deterministic key sequence (xorshift), so runs compare.
struct Keys(u64);
impl Keys {
    fn next(&mut self, keys: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % keys
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:012}").into_bytes()
}

fn put(i: u64, value: &[u8]) -> Vec<u8> {
    KvCommand::Put {
        key: key(i),
        value: value.to_vec(),
    }
    .encode()
}

fn main() {
    let keys = env("KEYS", 1_000_000);
    let value = vec![0x5a; env("VALUE_BYTES", 256) as usize];
    let ops = env("OPS", 1_000_000);

    let mut store = KvStore::new();
    for i in 0..keys {
        store.apply_one(&put(i, &value), 0);
    }
    // Commands encoded up front: the figure is the store's work.
    let mut rng = Keys(0x9E37_79B9_7F4A_7C15);
    let commands: Vec<Vec<u8>> = (0..ops).map(|_| put(rng.next(keys), &value)).collect();

    let t = Instant::now();
    for c in &commands {
        black_box(store.apply_one(c, 0));
    }
    let put_ns = t.elapsed().as_nanos() as f64 / ops as f64;

    let lookups: Vec<Vec<u8>> = (0..ops).map(|_| key(rng.next(keys))).collect();
    let t = Instant::now();
    for k in &lookups {
        black_box(store.get(k));
    }
    let get_ns = t.elapsed().as_nanos() as f64 / ops as f64;

    let t = Instant::now();
    store.snapshot(&mut std::io::sink()).unwrap();
    let snapshot_ms = t.elapsed().as_secs_f64() * 1e3;

    let t = Instant::now();
    let view = store.snapshot_view();
    let view_us = t.elapsed().as_secs_f64() * 1e6;
    let t = Instant::now();
    for c in &commands {
        black_box(store.apply_one(c, 0));
    }
    let put_ns_view = t.elapsed().as_nanos() as f64 / ops as f64;
    drop(view);

    println!(
        "keys={keys} value_bytes={} ops={ops} put_ns={put_ns:.0} get_ns={get_ns:.0} \
         snapshot_ms={snapshot_ms:.0} view_us={view_us:.1} put_ns_view={put_ns_view:.0}",
        value.len()
    );
}
