//! Memory of the log: how much resident memory 100,000 appended entries cost
//! in the native WAL ([`Wal`]) and in raft-rs's `MemStorage` (the anchor).
//!
//! For each payload size the bench appends `BENCH_ENTRIES` entries in
//! batches of `BENCH_BATCH`, each batch with a hard state, as the ready loop
//! would (the WAL is also synced after every batch). It measures the growth
//! of the resident set (`/proc/self/statm` resident pages × page size) from
//! just before the first append to just after the last one. Each case runs
//! in a fresh process (the bench re-executes itself with `WAL_MEMORY_CASE`
//! set), so memory freed by one case cannot hide the growth of the next.
//!
//! Cases, one printed line each:
//! * `store=wal ... cache_budget=33554432`: a WAL with default options in a
//!   temporary directory; `index_bytes` is [`Wal::index_bytes`] (the entry
//!   index), `cache_bytes` is [`Wal::cache_bytes`] (payload held by the cache
//!   of the newest entries).
//! * `store=wal ... cache_budget=0`: the same with the cache off, so the
//!   resident growth is the index alone (plus the write buffer).
//! * `store=raft-rs-MemStorage`: raft-rs's in-memory storage, which keeps
//!   every entry (payload included) in one `Vec<Entry>`. Its `index_bytes`
//!   is its per-entry metadata: the capacity of that `Vec` ×
//!   `size_of::<Entry>()`. The field is private, so the capacity is obtained
//!   by replaying the same `extend_from_slice` calls on a shadow `Vec` of
//!   another small element type (`Vec` growth does not depend on the element
//!   size below 1 KiB), after the resident set was measured.
//!
//! The goal to compare against: an index of at most 1 MB per 100,000
//! entries (Babuza's is 5.35 MB).
//!
//! Run: `cargo bench -p raftwork-storage --bench wal_memory`
//! Settings (environment): `BENCH_PAYLOADS` payload sizes in bytes (default
//! `100,1000,10000`), `BENCH_ENTRIES` (default 100000), `BENCH_BATCH`
//! entries per batch (default 100), `BENCH_DIR` parent of the WAL's
//! temporary directory (default the system temp dir).

use std::process::Command;

use bytes::Bytes;
use raft::prelude::{Entry, EntryType, HardState};
use raft::storage::MemStorage;
use raftwork_storage::{LogStore, Wal, WalOptions, WriteBatch};

const CASE_VAR: &str = "WAL_MEMORY_CASE";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|s| s.trim().parse().expect("a number"))
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().parse().expect("a list of numbers"))
        .collect()
}

fn page_size() -> u64 {
    // The kernel's page size as /proc reports it for this process's mappings.
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    smaps
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix("KernelPageSize:")?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(4096)
}

fn rss_bytes(page: u64) -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let resident: u64 = statm
        .split_whitespace()
        .nth(1)
        .expect("statm has a resident field")
        .parse()
        .expect("resident pages");
    resident * page
}

/// Batch `b` (0-based) of `batch` entries, each with its own payload
/// allocation, as proposals arrive.
fn make_batch(b: u64, batch: u64, entries: u64, payload: usize) -> Vec<Entry> {
    let first = b * batch + 1;
    let last = (first + batch - 1).min(entries);
    (first..=last)
        .map(|index| {
            let mut data = vec![0u8; payload];
            data[..8.min(payload)].copy_from_slice(&index.to_le_bytes()[..8.min(payload)]);
            Entry {
                entry_type: EntryType::EntryNormal,
                term: 1,
                index,
                data: Bytes::from(data),
                context: Bytes::from_static(&[0x01]),
                ..Default::default()
            }
        })
        .collect()
}

fn hard_state(commit: u64) -> HardState {
    HardState {
        term: 1,
        vote: 1,
        commit,
        ..Default::default()
    }
}

/// Runs one case in this process and prints its line.
fn run_case(case: &str) {
    let parts: Vec<&str> = case.split(':').collect();
    let [store, payload, entries, batch] = parts[..] else {
        panic!("bad {CASE_VAR}: {case}");
    };
    let payload: usize = payload.parse().unwrap();
    let entries: u64 = entries.parse().unwrap();
    let batch: u64 = batch.parse().unwrap();
    let batches = entries.div_ceil(batch);
    let page = page_size();
    match store {
        "wal" | "wal-nocache" => {
            let parent = std::env::var_os("BENCH_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            let dir = tempfile::tempdir_in(parent).unwrap();
            let options = WalOptions {
                cache_bytes: if store == "wal" {
                    WalOptions::default().cache_bytes
                } else {
                    0
                },
                ..Default::default()
            };
            let budget = options.cache_bytes;
            let wal = Wal::open(dir.path(), options).unwrap();
            let before = rss_bytes(page);
            for b in 0..batches {
                let ents = make_batch(b, batch, entries, payload);
                let commit = ents.last().unwrap().index;
                wal.stage(WriteBatch {
                    group_id: 1,
                    entries: ents,
                    hard_state: Some(hard_state(commit)),
                    ..Default::default()
                })
                .unwrap();
                wal.sync().unwrap();
            }
            let after = rss_bytes(page);
            assert_eq!(raft::Storage::last_index(&wal).unwrap(), entries);
            println!(
                "store=wal entries={entries} payload={payload} index_bytes={} rss_growth_bytes={} cache_bytes={} cache_budget={budget}",
                wal.index_bytes(),
                after.saturating_sub(before),
                wal.cache_bytes(),
            );
        }
        "memstorage" => {
            let storage = MemStorage::new();
            let before = rss_bytes(page);
            for b in 0..batches {
                let ents = make_batch(b, batch, entries, payload);
                let commit = ents.last().unwrap().index;
                let mut core = storage.wl();
                core.append(&ents).unwrap();
                core.set_hardstate(hard_state(commit));
            }
            let after = rss_bytes(page);
            assert_eq!(raft::Storage::last_index(&storage).unwrap(), entries);
            // Replay the same appends on a shadow Vec to learn the capacity
            // of MemStorage's private `Vec<Entry>`.
            let mut shadow: Vec<u64> = Vec::new();
            for b in 0..batches {
                let n = batch.min(entries - b * batch) as usize;
                shadow.extend_from_slice(&vec![0u64; n]);
            }
            let index_bytes = shadow.capacity() * std::mem::size_of::<Entry>();
            println!(
                "store=raft-rs-MemStorage entries={entries} payload={payload} index_bytes={index_bytes} rss_growth_bytes={}",
                after.saturating_sub(before),
            );
            drop(storage);
        }
        other => panic!("unknown store {other}"),
    }
}

fn main() {
    if let Ok(case) = std::env::var(CASE_VAR) {
        run_case(&case);
        return;
    }
    let entries = env_u64("BENCH_ENTRIES", 100_000);
    let batch = env_u64("BENCH_BATCH", 100).max(1);
    let payloads = env_list("BENCH_PAYLOADS", "100,1000,10000");
    let exe = std::env::current_exe().expect("own executable");
    println!(
        "raftwork WAL memory benchmark: {entries} entries in batches of {batch}, resident-set growth per case, each case in a fresh process; size_of::<Entry>() = {} bytes",
        std::mem::size_of::<Entry>()
    );
    for &payload in &payloads {
        for store in ["wal", "wal-nocache", "memstorage"] {
            let out = Command::new(&exe)
                .env(CASE_VAR, format!("{store}:{payload}:{entries}:{batch}"))
                .output()
                .expect("re-executing the bench");
            if !out.status.success() {
                eprint!("{}", String::from_utf8_lossy(&out.stderr));
                panic!("case {store} payload={payload} failed: {}", out.status);
            }
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
    }
}
