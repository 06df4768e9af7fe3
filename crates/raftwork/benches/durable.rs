//! The durable path on a real disk: a single node on the native WAL and the
//! file snapshot store.
//!
//! Three parts, printed as plain lines:
//! * **a. raw fdatasync rate** of the disk under the data dir: a loop of
//!   (`pwrite` of 256 bytes appended to a file, `fdatasync`) for
//!   `BENCH_SECS`. For reference a second loop overwrites a preallocated file
//!   instead (as the WAL does: its segments are preallocated, so a sync has
//!   no file size to journal).
//! * **b. write path**: for each writer count, a fresh durable single node
//!   (default configuration, so automatic snapshots every 10,000 entries) in
//!   a fresh directory; closed-loop writers propose 256-byte commands for
//!   `BENCH_SECS` after a 0.5 s warm-up. Prints records/s, payload MB/s,
//!   p50/p99 latency and records/s ÷ raw (append) syncs/s: above 1 means
//!   group commit folds many records into one fdatasync.
//! * **c. restart**: a node is filled with `BENCH_RESTART_ENTRIES` commands
//!   of 256 bytes by many concurrent proposers with automatic snapshots off
//!   (`snapshot_interval_entries = 0`) and shut down. Then (i) `Wal::open` of
//!   its `<data dir>/wal` alone is timed, and (ii) a full restart:
//!   `Builder::build()` until `wait_for_leader` returns and the state machine
//!   has re-applied up to the last index written. (iii) The same full restart
//!   for a second node filled with default snapshot settings, which restores
//!   from its newest snapshot and replays only the log after it. The page
//!   cache is warm (the files were just written).
//!
//! The state machine counts commands and keeps a running hash of their data;
//! a restart checks that count and hash came back.
//!
//! Run: `cargo bench -p raftwork --bench durable`
//! Settings (environment): `BENCH_DIR` where the data dirs are made (default
//! the system temp dir), `BENCH_SECS` per measurement (default 3),
//! `BENCH_WRITERS` list of writer counts (default `1,16,256`),
//! `BENCH_RESTART_ENTRIES` (default 1000000; 0 skips part c),
//! `BENCH_FILL_WRITERS` concurrent proposers filling the restart nodes
//! (default 1024), `RUST_LOG` to see raft-rs's and raftwork's logs on
//! stderr. The tokio runtime has 2 worker threads.

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use raftwork::{Builder, Command, Node, StateMachine, Wal, WalOptions};

const PAYLOAD_BYTES: usize = 256;
/// Hang guard for waits; far above any expected time.
const WAIT: Duration = Duration::from_secs(120);

/// Counts commands and hashes their data (8 bytes at a time, so applying
/// stays cheap next to the log work being measured).
#[derive(Default)]
struct Counter {
    count: u64,
    hash: u64,
}

impl Counter {
    fn mix(&mut self, data: &[u8]) {
        let mut h = self.hash ^ 0xcbf2_9ce4_8422_2325;
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            h = (h ^ u64::from_le_bytes(c.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3);
        }
        for &b in chunks.remainder() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.hash = h;
    }
}

impl StateMachine for Counter {
    type Response = u64;

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<u64> {
        commands
            .iter()
            .map(|c| {
                self.count += 1;
                self.mix(c.data);
                self.count
            })
            .collect()
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(&self.count.to_le_bytes())?;
        w.write_all(&self.hash.to_le_bytes())
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        self.count = u64::from_le_bytes(b);
        r.read_exact(&mut b)?;
        self.hash = u64::from_le_bytes(b);
        Ok(())
    }
}

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .map(|s| s.trim().parse().expect("a number"))
        .unwrap_or(default)
}

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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A command with distinct contents, so the running hash means something.
fn command(n: u64) -> Vec<u8> {
    let mut data = vec![0xabu8; PAYLOAD_BYTES];
    data[..8].copy_from_slice(&n.to_le_bytes());
    data
}

fn machine_description() -> String {
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("date={date} nproc={nproc} cpu=\"{cpu}\" kernel={kernel}")
}

/// File system type of the mount holding `path` (longest matching mount
/// point in /proc/mounts).
fn fs_type(path: &Path) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mnt).then(|| (mnt.len(), ty.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, ty)| ty)
        .unwrap_or_else(|| "unknown".into())
}

fn fresh_dir(base: &Path, name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("raftwork-bench-{name}-"))
        .tempdir_in(base)
        .expect("a temporary directory under BENCH_DIR")
}

/// Part a: syncs per second of (pwrite 256 B, fdatasync). `append` grows the
/// file; otherwise a preallocated (written and synced) file is overwritten.
fn raw_sync_rate(dir: &Path, secs: f64, append: bool) -> f64 {
    let path = dir.join(if append {
        "raw-append"
    } else {
        "raw-overwrite"
    });
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let region: u64 = 16 << 20;
    if !append {
        let zeros = vec![0u8; 1 << 20];
        for k in 0..(region >> 20) {
            file.write_all_at(&zeros, k << 20).unwrap();
        }
        file.sync_all().unwrap();
    }
    let buf = [0x5au8; PAYLOAD_BYTES];
    let mut offset = 0u64;
    let mut syncs = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        file.write_all_at(&buf, offset).unwrap();
        file.sync_data().unwrap();
        syncs += 1;
        offset += PAYLOAD_BYTES as u64;
        if !append && offset + PAYLOAD_BYTES as u64 > region {
            offset = 0;
        }
    }
    let rate = syncs as f64 / start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).unwrap();
    rate
}

fn start_node(dir: &Path, snapshots: bool) -> Node<Counter> {
    Builder::new(1, Counter::default())
        .data_dir(dir)
        .configure(|c| {
            if !snapshots {
                c.core.snapshot_interval_entries = 0;
            }
        })
        .build()
        .expect("node starts")
}

struct WritePoint {
    records: u64,
    errors: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
}

/// Part b: one writer count on a fresh node in a fresh directory.
async fn write_point(base: &Path, writers: u64, secs: f64) -> WritePoint {
    let dir = fresh_dir(base, "write");
    let node = start_node(dir.path(), true);
    node.wait_for_leader(WAIT).await.expect("a leader");
    let start = Instant::now();
    let measure_from = start + Duration::from_millis(500);
    let end = measure_from + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            // Latencies in µs, turned into a histogram after the run so the
            // load generator spends little CPU while it measures.
            let mut latencies_us: Vec<u32> = Vec::new();
            let mut errors = 0u64;
            let mut n = w << 32;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                n += 1;
                let ok = node.propose(command(n)).await.is_ok();
                let t1 = Instant::now();
                if t0 >= measure_from && t1 <= end {
                    if ok {
                        latencies_us.push(t1.duration_since(t0).as_micros() as u32);
                    } else {
                        errors += 1;
                    }
                }
            }
            (latencies_us, errors)
        }));
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let (mut records, mut errors) = (0, 0);
    for t in tasks {
        let (latencies_us, e) = t.await.unwrap();
        records += latencies_us.len() as u64;
        errors += e;
        for l in latencies_us {
            hist.saturating_record(l as u64);
        }
    }
    node.shutdown().await;
    WritePoint {
        records,
        errors,
        secs,
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
    }
}

/// Writes `entries` commands with `writers` concurrent proposers; returns the
/// highest index written and the (count, hash) of the state machine.
async fn fill(node: &Node<Counter>, entries: u64, writers: u64) -> (u64, (u64, u64)) {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..writers.max(1) {
        let node = node.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= entries {
                    return last;
                }
                let (index, _) = node.propose(command(n)).await.expect("proposal applied");
                last = last.max(index);
            }
        }));
    }
    let mut last = 0;
    for t in tasks {
        last = last.max(t.await.unwrap());
    }
    let fingerprint = node
        .read(|sm: &Counter| (sm.count, sm.hash))
        .await
        .expect("read");
    (last, fingerprint)
}

fn wal_files(dir: &Path) -> (usize, u64) {
    let mut count = 0;
    let mut bytes = 0;
    for item in std::fs::read_dir(dir).unwrap() {
        let item = item.unwrap();
        if item.path().extension().is_some_and(|x| x == "wal") {
            count += 1;
            bytes += item.metadata().unwrap().len();
        }
    }
    (count, bytes)
}

struct Restart {
    build: Duration,
    leader: Duration,
    applied: Duration,
    snapshot_index: u64,
}

/// Part c (ii)/(iii): a full restart, until `wait_for_leader` has returned
/// and the state machine has re-applied up to `last`; checks the state came
/// back. The two conditions are watched concurrently, so each gets its own
/// time.
async fn timed_restart(dir: &Path, snapshots: bool, last: u64, expect: (u64, u64)) -> Restart {
    let t0 = Instant::now();
    let node = start_node(dir, snapshots);
    let build = t0.elapsed();
    let leader = async {
        node.wait_for_leader(WAIT).await.expect("a leader");
        t0.elapsed()
    };
    let applied = async {
        loop {
            let st = node.status().await.expect("running");
            if st.applied_index >= last {
                return (t0.elapsed(), st.snapshot_index);
            }
            assert!(t0.elapsed() < WAIT, "restart stuck at {}", st.applied_index);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let (leader, (applied, snapshot_index)) = tokio::join!(leader, applied);
    let got = node
        .read_stale(|sm: &Counter| (sm.count, sm.hash))
        .await
        .expect("read");
    assert_eq!(got, expect, "state machine after restart (count, hash)");
    node.shutdown().await;
    Restart {
        build,
        leader,
        applied,
        snapshot_index,
    }
}

async fn restart_part(base: &Path, entries: u64, fill_writers: u64) {
    for (label, snapshots) in [("snapshots=off", false), ("snapshots=default", true)] {
        let dir = fresh_dir(base, "restart");
        let node = start_node(dir.path(), snapshots);
        node.wait_for_leader(WAIT).await.expect("a leader");
        let t = Instant::now();
        let (last, fingerprint) = fill(&node, entries, fill_writers).await;
        let fill_secs = t.elapsed().as_secs_f64();
        node.shutdown().await;
        let wal_dir = dir.path().join("wal");
        let (segments, wal_bytes) = wal_files(&wal_dir);
        println!(
            "restart fill {label}: entries={entries} last_index={last} fill_writers={fill_writers} fill_secs={fill_secs:.1} fill_records_per_s={:.0} wal_segments={segments} wal_bytes={wal_bytes}",
            entries as f64 / fill_secs
        );
        if !snapshots {
            let t = Instant::now();
            let wal = Wal::open(&wal_dir, WalOptions::default()).expect("WAL opens");
            let open = t.elapsed();
            let (first, last_in_wal) = (
                raft::Storage::first_index(&wal).unwrap(),
                raft::Storage::last_index(&wal).unwrap(),
            );
            let index_bytes = wal.index_bytes();
            drop(wal);
            println!(
                "restart (i) Wal::open alone {label}: open_ms={:.0} wal_entries={} index_bytes={index_bytes}",
                ms(open),
                last_in_wal + 1 - first
            );
        }
        let r = timed_restart(dir.path(), snapshots, last, fingerprint).await;
        println!(
            "restart ({}) full node {label}: total_ms={:.0} build_ms={:.0} leader_ms={:.0} applied_ms={:.0} last_index={last} snapshot_index={}",
            if snapshots { "iii" } else { "ii" },
            ms(r.applied.max(r.leader)),
            ms(r.build),
            ms(r.leader),
            ms(r.applied),
            r.snapshot_index
        );
    }
}

fn main() {
    let base: PathBuf = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("BENCH_DIR is usable");
    let secs = env_f64("BENCH_SECS", 3.0);
    let writers = env_list("BENCH_WRITERS", "1,16,256");
    let restart_entries = env_u64("BENCH_RESTART_ENTRIES", 1_000_000);
    let fill_writers = env_u64("BENCH_FILL_WRITERS", 1024);
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    println!(
        "raftwork durable benchmark: single node, native WAL + file snapshots, 2 tokio workers"
    );
    println!("{}", machine_description());
    println!("data dir: {} ({})", base.display(), fs_type(&base));

    // a. Raw fdatasync rate.
    let raw_dir = fresh_dir(&base, "raw");
    let raw_append = raw_sync_rate(raw_dir.path(), secs, true);
    let raw_overwrite = raw_sync_rate(raw_dir.path(), secs, false);
    drop(raw_dir);
    println!("a. raw pwrite(256 B append)+fdatasync: syncs_per_s={raw_append:.0}");
    println!(
        "a. raw pwrite(256 B overwrite of a preallocated file)+fdatasync: syncs_per_s={raw_overwrite:.0}"
    );

    rt.block_on(async {
        // b. Write path.
        println!(
            "b. write path: closed-loop writers, {PAYLOAD_BYTES} B commands, {secs}s per point after 0.5 s warm-up, default snapshots"
        );
        println!(
            "{:>8} {:>12} {:>8} {:>10} {:>10} {:>16} {:>7}",
            "writers", "records/s", "MB/s", "p50_us", "p99_us", "rec/raw_sync", "errors"
        );
        for &w in &writers {
            let p = write_point(&base, w, secs).await;
            let rate = p.records as f64 / p.secs;
            println!(
                "{:>8} {:>12.0} {:>8.2} {:>10} {:>10} {:>16.2} {:>7}",
                w,
                rate,
                rate * PAYLOAD_BYTES as f64 / 1e6,
                p.p50_us,
                p.p99_us,
                rate / raw_append,
                p.errors
            );
        }

        // c. Restart.
        if restart_entries > 0 {
            restart_part(&base, restart_entries, fill_writers).await;
        }
    });
}
