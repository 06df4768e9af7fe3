//! raft-engine against the native WAL, same machine, same run.
//!
//! Write path: batches that each append one 256-byte entry to each of
//! `GROUPS_PER_BATCH` groups, out of `GROUPS` groups in all, and end in an
//! fdatasync: what a host's sync thread does once per round of readies.
//! raft-engine writes them as one `LogBatch` with `sync = true`. The
//! native WAL holds one group today, so it writes the same entries, bytes
//! and syncs as one group's entries: the ceiling an extended WAL could
//! reach, before the cost of a per-group index.
//!
//! Recovery: `RECOVER_GROUPS` groups of `RECOVER_ENTRIES` entries each,
//! written then reopened (raft-engine), and the same entry count in one
//! group (the native WAL).
//!
//! Settings (environment): `SECS` per write point (5), `BENCH_GROUPS` (1,100,1000),
//! `GROUPS_PER_BATCH` (1,16,64), `RECOVER_GROUPS` (1000),
//! `RECOVER_ENTRIES` (1000), `DIR` (a temp dir under /tmp).

use std::time::{Duration, Instant};

use raft::prelude::Entry;
use raftwork_storage::{LogStore, Wal, WalOptions, WriteBatch};

#[derive(Clone)]
struct M;

impl raft_engine::MessageExt for M {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().parse().expect("numbers"))
        .collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: vec![7u8; 256].into(),
        ..Default::default()
    }
}

fn tempdir() -> tempfile::TempDir {
    match std::env::var("DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    }
}

fn raft_engine(dir: &std::path::Path) -> raft_engine::Engine {
    let cfg = raft_engine::Config {
        dir: dir.display().to_string(),
        ..Default::default()
    };
    raft_engine::Engine::open(cfg).unwrap()
}

/// Batches per second and entries per second of raft-engine.
fn engine_writes(groups: u64, per_batch: u64, secs: f64) -> (f64, f64) {
    let dir = tempdir();
    let engine = raft_engine(dir.path());
    let mut next_index = vec![1u64; groups as usize];
    let mut cursor = 0u64;
    let (mut batches, mut entries) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let mut batch = raft_engine::LogBatch::default();
        for _ in 0..per_batch {
            let g = cursor % groups;
            cursor += 1;
            let i = next_index[g as usize];
            next_index[g as usize] += 1;
            batch.add_entries::<M>(g + 1, &[entry(i, 1)]).unwrap();
        }
        engine.write(&mut batch, true).unwrap();
        batches += 1;
        entries += per_batch;
    }
    let s = start.elapsed().as_secs_f64();
    (batches as f64 / s, entries as f64 / s)
}

/// The same for the native WAL, every entry in one group.
fn wal_writes(per_batch: u64, secs: f64) -> (f64, f64) {
    let dir = tempdir();
    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let mut next = 1u64;
    let (mut batches, mut entries) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let batch = WriteBatch {
            group_id: 1,
            entries: (0..per_batch).map(|k| entry(next + k, 1)).collect(),
            ..Default::default()
        };
        next += per_batch;
        wal.stage(batch).unwrap();
        wal.sync().unwrap();
        batches += 1;
        entries += per_batch;
    }
    let s = start.elapsed().as_secs_f64();
    (batches as f64 / s, entries as f64 / s)
}

/// Write `groups` × `per_group` entries with raft-engine (1,000 entries
/// per synced batch), then reopen: the reopen time and the entries found.
fn engine_recovery(groups: u64, per_group: u64) -> (Duration, u64) {
    let dir = tempdir();
    {
        let engine = raft_engine(dir.path());
        for g in 1..=groups {
            let mut written = 0;
            while written < per_group {
                let n = (per_group - written).min(1000);
                let es: Vec<Entry> = (0..n).map(|k| entry(written + k + 1, 1)).collect();
                let mut batch = raft_engine::LogBatch::default();
                batch.add_entries::<M>(g, &es).unwrap();
                engine.write(&mut batch, true).unwrap();
                written += n;
            }
        }
    }
    let start = Instant::now();
    let engine = raft_engine(dir.path());
    let took = start.elapsed();
    let found = (1..=groups)
        .map(|g| engine.last_index(g).unwrap_or(0) + 1 - engine.first_index(g).unwrap_or(1))
        .sum();
    (took, found)
}

/// The same entry count in one group of the native WAL.
fn wal_recovery(total: u64) -> (Duration, u64) {
    let dir = tempdir();
    {
        let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let mut written = 0;
        while written < total {
            let n = (total - written).min(1000);
            wal.stage(WriteBatch {
                group_id: 1,
                entries: (0..n).map(|k| entry(written + k + 1, 1)).collect(),
                ..Default::default()
            })
            .unwrap();
            wal.sync().unwrap();
            written += n;
        }
    }
    let start = Instant::now();
    let wal = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let took = start.elapsed();
    let found = raft::Storage::last_index(&wal).unwrap() + 1
        - raft::Storage::first_index(&wal).unwrap();
    (took, found)
}

fn main() {
    let secs = env_u64("SECS", 5) as f64;
    println!("write path: one 256 B entry per group per batch, fdatasync per batch, {secs} s per point");
    println!(
        "{:>7} {:>9} | {:>14} {:>15} | {:>14} {:>15} | {:>13}",
        "groups", "per batch", "engine batch/s", "engine entry/s", "wal batch/s", "wal entry/s", "engine / wal"
    );
    for &per_batch in &env_list("GROUPS_PER_BATCH", "1,16,64") {
        let (wb, we) = wal_writes(per_batch, secs);
        for &groups in &env_list("BENCH_GROUPS", "1,100,1000") {
            if per_batch > groups {
                continue;
            }
            let (eb, ee) = engine_writes(groups, per_batch, secs);
            println!(
                "{groups:>7} {per_batch:>9} | {eb:>14.0} {ee:>15.0} | {wb:>14.0} {we:>15.0} | {:>13.2}",
                ee / we
            );
        }
    }
    let groups = env_u64("RECOVER_GROUPS", 1000);
    let per_group = env_u64("RECOVER_ENTRIES", 1000);
    let (et, ef) = engine_recovery(groups, per_group);
    let (wt, wf) = wal_recovery(groups * per_group);
    println!(
        "recovery: raft-engine {groups} groups x {per_group} entries: {:.0} ms ({ef} entries); \
         native WAL, the same {wf} entries in one group: {:.0} ms",
        et.as_secs_f64() * 1e3,
        wt.as_secs_f64() * 1e3
    );
}
