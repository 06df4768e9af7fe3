//! Proposal throughput and latency: three nodes in one process over the
//! in-memory log store and network, closed-loop clients proposing to the
//! leader.
//!
//! The anchor is openraft's `benchmarks/minimal` (three members in one
//! process, in-memory store, empty requests), measured on this machine class;
//! see BENCHMARKS.md.
//!
//! Run: `cargo bench -p raftwork --bench propose`
//! Settings (environment): `BENCH_SECS` per point (default 5),
//! `BENCH_CLIENTS` (default `1,64,256,1024`), `BENCH_SIZES` in bytes
//! (default `0,256`), `BENCH_WORKERS` tokio worker threads (default 1: on
//! two vCPUs a second worker makes runs bimodal, see BENCHMARKS.md "The
//! 64-client variance"; `BENCH_WORKERS=2` runs that shape),
//! `BENCH_SESSIONS` (default `0`; `0,1` runs every point also with each
//! client proposing through an exactly-once session of its own),
//! `BENCH_METRICS` (default `0`; `1` installs Prometheus's recorder first,
//! as the server does, so every metric is recorded: compare two runs for
//! the cost of metrics).
//!
//! Besides writes/s and latency, each point reports the process's CPU time
//! (user + system: all three nodes and the clients, which share it) per
//! committed write in the measured window: on two shared cores that is
//! what decides throughput.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use raftwork::{Builder, Command, MemNetwork, Node, StateMachine};

/// Counts commands and bytes: the cheapest honest state machine.
#[derive(Default)]
struct Counter {
    commands: u64,
    bytes: u64,
}

impl StateMachine for Counter {
    type Response = ();

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<()> {
        for c in commands {
            self.commands += 1;
            self.bytes += c.data.len() as u64;
        }
        vec![(); commands.len()]
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(&self.commands.to_le_bytes())?;
        w.write_all(&self.bytes.to_le_bytes())
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        self.commands = u64::from_le_bytes(b);
        r.read_exact(&mut b)?;
        self.bytes = u64::from_le_bytes(b);
        Ok(())
    }
}

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().parse().expect("a list of numbers"))
        .collect()
}

struct Point {
    sessions: bool,
    clients: u64,
    size_bytes: u64,
    ops: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    /// CPU time (user + system) of the whole process (the three nodes and
    /// the clients) in the window, per committed write.
    cpu_us_per_op: f64,
}

/// CPU time (user + system) this process has used so far, in µs, from
/// `/proc/self/stat` (clock ticks of 10 ms: over a window of seconds on two
/// busy cores, well under 1% off).
fn process_cpu_us() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // The command name (field 2) may hold spaces; the fields after it
    // start past its closing parenthesis. utime and stime are fields 14
    // and 15, the 12th and 13th after it.
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 * 1e6 / 100.0
}

async fn start_cluster() -> (Vec<Node<Counter>>, Node<Counter>) {
    let network = MemNetwork::new();
    let ids = [1u64, 2, 3];
    let nodes: Vec<Node<Counter>> = ids
        .iter()
        .map(|&id| {
            let (t, inbox) = network.join(id);
            Builder::new(id, Counter::default())
                .in_memory()
                .transport(t, inbox)
                .initial_voters(ids)
                .build()
                .unwrap()
        })
        .collect();
    let leader = nodes[0]
        .wait_for_leader(Duration::from_secs(30))
        .await
        .unwrap();
    let leader = nodes.iter().find(|n| n.id() == leader).unwrap().clone();
    (nodes, leader)
}

/// One point on a fresh cluster, so the log left by earlier points (the
/// in-memory store keeps every entry: no snapshots yet) does not weigh on it.
async fn run_point(clients: u64, size_bytes: u64, secs: f64, sessions: bool) -> Point {
    let (nodes, leader) = start_cluster().await;
    let warmup = Duration::from_millis(500);
    let measure = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let node = leader.clone();
        tasks.push(tokio::spawn(async move {
            let session = match sessions {
                true => Some(node.session().await.expect("session registered")),
                false => None,
            };
            // Latencies in µs, turned into a histogram after the run so the
            // load generator spends little CPU while it measures.
            let mut latencies_us: Vec<u32> = Vec::new();
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let data = vec![0xabu8; size_bytes as usize];
                match &session {
                    Some(s) => drop(s.propose(data).await.expect("proposal applied")),
                    None => drop(node.propose(data).await.expect("proposal applied")),
                }
                let t1 = Instant::now();
                if t0 >= measure_from && t1 <= end {
                    latencies_us.push(t1.duration_since(t0).as_micros() as u32);
                }
            }
            latencies_us
        }));
    }
    // Sampled at the window's edges from a thread outside the runtime, so
    // a loaded runtime cannot make the samples late.
    let cpu = std::thread::spawn(move || {
        std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
        let from_us = process_cpu_us();
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        process_cpu_us() - from_us
    });
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut ops = 0;
    for t in tasks {
        let latencies_us = t.await.unwrap();
        ops += latencies_us.len() as u64;
        for l in latencies_us {
            total.saturating_record(l as u64);
        }
    }
    let cpu_us = cpu.join().expect("the CPU sampler");
    for n in &nodes {
        n.shutdown().await;
    }
    Point {
        sessions,
        clients,
        size_bytes,
        ops,
        secs,
        p50_us: total.value_at_quantile(0.50),
        p99_us: total.value_at_quantile(0.99),
        cpu_us_per_op: cpu_us / ops.max(1) as f64,
    }
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let clients = env_list("BENCH_CLIENTS", "1,64,256,1024");
    let sizes = env_list("BENCH_SIZES", "0,256");
    let sessions = env_list("BENCH_SESSIONS", "0");
    let workers: usize = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let metrics = std::env::var("BENCH_METRICS").is_ok_and(|v| v == "1");
    if metrics {
        let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new();
        for d in raftwork::metrics::catalogue() {
            if !d.buckets.is_empty() {
                builder = builder
                    .set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full(d.name.into()),
                        d.buckets,
                    )
                    .unwrap();
            }
        }
        let handle = builder.install_recorder().unwrap();
        // Upkeep as the server runs it, so histogram samples are drained.
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(5));
            handle.run_upkeep();
        });
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "raftwork propose benchmark: 3 nodes in one process, in-memory log and network, {} tokio workers, {}s per point, metrics {}",
            workers, secs, if metrics { "recorded (Prometheus recorder)" } else { "off (no recorder)" }
        );
        println!(
            "{:>8} {:>8} {:>10} {:>12} {:>10} {:>10} {:>14}",
            "sessions", "clients", "size_B", "writes/s", "p50_us", "p99_us", "cpu_us_per_op"
        );
        for &size in &sizes {
            for &c in &clients {
                for &with in &sessions {
                    let p = run_point(c, size, secs, with != 0).await;
                    println!(
                        "{:>8} {:>8} {:>10} {:>12.0} {:>10} {:>10} {:>14.2}",
                        p.sessions,
                        p.clients,
                    p.size_bytes,
                    p.ops as f64 / p.secs,
                        p.p50_us,
                        p.p99_us,
                        p.cpu_us_per_op
                    );
                }
            }
        }
    });
}
