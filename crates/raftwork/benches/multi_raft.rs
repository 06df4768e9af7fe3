//! Many Raft groups on three hosts in one process (`Host`, feature
//! `host`), over the in-process network and each host's real log engine
//! (raft-engine on disk, one fdatasync per batch across groups).
//!
//! Prints one line per case:
//! * `groups=G hosts=3 hibernate=on|off startup_ms=… idle_cpu_pct_per_host=…
//!   rss_bytes_per_group=…`: G groups on each host are created and elect
//!   leaders (startup: until every group has one), settle (asleep, with
//!   hibernation), then the process's CPU time over an idle window is
//!   divided by the hosts. Memory per group member (G × 3 of them): the
//!   process's resident growth from before the hosts opened
//!   (`rss_bytes_per_group`, which also holds what the allocator keeps of
//!   the start-up's freed memory), and the live heap growth counted by
//!   this benchmark's allocator (`heap_bytes_per_group`, exact).
//! * `groups=G active=G clients=C puts_per_s=… p50_us=… p99_us=…`:
//!   closed-loop clients spread 256-byte writes over G groups, each write to
//!   its group's leader. `groups=1` is the single-group figure to compare
//!   with, from the same run.
//!
//! Run: `cargo bench -p raftwork --features host --bench multi_raft`
//! Settings (environment): `BENCH_IDLE_GROUPS` (default `10000`),
//! `BENCH_IDLE_SECS` (default 10), `BENCH_IDLE_OFF_GROUPS` (default
//! `1000`: the same idle case without hibernation, for contrast; `0`
//! skips it), `BENCH_WRITE_GROUPS` (default `1,1000`), `BENCH_CLIENTS`
//! (default 256), `BENCH_SECS` per write case (default 5), `BENCH_SHARDS`
//! worker shards per host (default: the machine's cores).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use raftwork::{Command, Host, HostConfig, MemNetwork, Node, StateMachine};

/// Counts commands: the cheapest honest state machine.
#[derive(Default)]
struct Counter(u64);

impl StateMachine for Counter {
    type Response = ();

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<()> {
        self.0 += commands.len() as u64;
        vec![(); commands.len()]
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(&self.0.to_le_bytes())
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        self.0 = u64::from_le_bytes(b);
        Ok(())
    }
}

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is to the system allocator.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is to the system allocator.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const HOSTS: u64 = 3;
const GUARD: Duration = Duration::from_secs(600);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// This process's user + system CPU time (Linux `/proc/self/stat`).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / CLOCK_TICKS_PER_SEC as f64)
}

/// `sysconf(_SC_CLK_TCK)`: 100 on every Linux this runs on.
const CLOCK_TICKS_PER_SEC: u64 = 100;

/// Resident memory of this process, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line[6..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

struct Cluster {
    hosts: Vec<Host>,
    /// `nodes[h][g]`: group g's handle on host h.
    nodes: Vec<Vec<Node<Counter>>>,
    _dir: tempfile::TempDir,
}

async fn start(groups: u64, hibernate: bool) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let config = HostConfig {
        hibernate_after_ticks: if hibernate {
            HostConfig::default().hibernate_after_ticks
        } else {
            0
        },
        shards: env_u64("BENCH_SHARDS", HostConfig::default().shards as u64) as usize,
        ..HostConfig::default()
    };
    let mut hosts = Vec::new();
    for id in 1..=HOSTS {
        let (t, inbox) = net.join(id);
        let path = dir.path().join(format!("host-{id}"));
        hosts.push(Host::open_with(id, path, t, inbox, config.clone()).unwrap());
    }
    let voters: Vec<u64> = (1..=HOSTS).collect();
    let nodes = hosts
        .iter()
        .map(|h| {
            (1..=groups)
                .map(|g| {
                    h.create_group(g, &voters, Counter::default(), |_| {})
                        .unwrap()
                })
                .collect()
        })
        .collect();
    Cluster {
        hosts,
        nodes,
        _dir: dir,
    }
}

impl Cluster {
    async fn wait_for_leaders(&self) {
        for n in &self.nodes[0] {
            n.wait_for_leader(GUARD).await.unwrap();
        }
    }

    /// Group g's handle on the host that leads it.
    fn leader(&self, g: usize) -> Option<&Node<Counter>> {
        let l = self.nodes[0][g].leader()?;
        Some(&self.nodes[l as usize - 1][g])
    }

    async fn shutdown(self) {
        drop(self.nodes);
        for h in self.hosts {
            h.shutdown().await;
        }
    }
}

async fn idle_case(groups: u64, hibernate: bool, idle: Duration) {
    let rss_before = rss_bytes();
    let heap_before = LIVE_BYTES.load(Ordering::Relaxed);
    let started = Instant::now();
    let cluster = start(groups, hibernate).await;
    cluster.wait_for_leaders().await;
    let startup = started.elapsed();
    // One write per group, so each group's log has an entry of its own.
    for g in 0..groups as usize {
        loop {
            if let Some(leader) = cluster.leader(g) {
                if leader.propose(vec![1; 8]).await.is_ok() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if hibernate {
        let deadline = Instant::now() + GUARD;
        while cluster
            .hosts
            .iter()
            .any(|h| h.hibernating_groups() != groups as usize)
        {
            assert!(Instant::now() < deadline, "groups did not fall asleep");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    } else {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let rss = rss_bytes().saturating_sub(rss_before);
    let heap = LIVE_BYTES
        .load(Ordering::Relaxed)
        .saturating_sub(heap_before) as u64;
    let cpu_before = cpu_time();
    let window = Instant::now();
    tokio::time::sleep(idle).await;
    let cpu = cpu_time() - cpu_before;
    let wall = window.elapsed();
    let asleep: usize = cluster.hosts.iter().map(|h| h.hibernating_groups()).sum();
    println!(
        "groups={groups} hosts={HOSTS} hibernate={} startup_ms={} idle_cpu_pct_per_host={:.2} \
         rss_bytes_per_group={} heap_bytes_per_group={} asleep_at_end={asleep}",
        if hibernate { "on" } else { "off" },
        startup.as_millis(),
        cpu.as_secs_f64() / wall.as_secs_f64() / HOSTS as f64 * 100.0,
        rss / (groups * HOSTS),
        heap / (groups * HOSTS),
    );
    cluster.shutdown().await;
}

async fn write_case(groups: u64, clients: u64, window: Duration) {
    let cluster = Arc::new(start(groups, true).await);
    cluster.wait_for_leaders().await;
    let stop = Arc::new(AtomicBool::new(false));
    let measuring = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let cluster = cluster.clone();
        let stop = stop.clone();
        let measuring = measuring.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).unwrap();
            let mut k = c;
            while !stop.load(Ordering::Relaxed) {
                let g = (k % groups) as usize;
                k = k.wrapping_add(clients).wrapping_add(1);
                let Some(leader) = cluster.leader(g) else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let t = Instant::now();
                if leader.propose(vec![7; 256]).await.is_ok() && measuring.load(Ordering::Relaxed) {
                    hist.record(t.elapsed().as_micros() as u64).unwrap();
                }
            }
            hist
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let t = Instant::now();
    tokio::time::sleep(window).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new(3).unwrap();
    for task in tasks {
        all.add(task.await.unwrap()).unwrap();
    }
    println!(
        "groups={groups} active={groups} clients={clients} puts_per_s={:.0} p50_us={} p99_us={}",
        all.len() as f64 / elapsed.as_secs_f64(),
        all.value_at_quantile(0.5),
        all.value_at_quantile(0.99),
    );
    match Arc::try_unwrap(cluster) {
        Ok(c) => c.shutdown().await,
        Err(_) => panic!("clients still hold the cluster"),
    }
}

fn main() {
    let idle_groups = env_u64("BENCH_IDLE_GROUPS", 10_000);
    let idle_off_groups = env_u64("BENCH_IDLE_OFF_GROUPS", 1_000);
    let idle = Duration::from_secs(env_u64("BENCH_IDLE_SECS", 10));
    let write_groups = env_list("BENCH_WRITE_GROUPS", "1,1000");
    let clients = env_u64("BENCH_CLIENTS", 256);
    let window = Duration::from_secs(env_u64("BENCH_SECS", 5));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if idle_groups > 0 {
            idle_case(idle_groups, true, idle).await;
        }
        if idle_off_groups > 0 {
            idle_case(idle_off_groups, false, idle).await;
        }
        for g in write_groups {
            write_case(g, clients, window).await;
        }
    });
}
