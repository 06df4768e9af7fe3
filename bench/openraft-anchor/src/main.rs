//! openraft anchor for raftwork's propose benchmark: the same harness as
//! `crates/raftwork/benches/propose.rs`, driving openraft instead of
//! raftwork, so the two can be compared in one run on one machine
//! (`bench/compare-openraft.sh` runs both alternately).
//!
//! # What it measures
//!
//! Proposal throughput and latency of three openraft nodes in one process:
//! closed-loop clients call `Raft::client_write` on the leader's handle and
//! wait for the applied response. Per point: writes/s over the measurement
//! window, p50/p99 latency in µs, and CPU time (user + system, the whole
//! process, from `getrusage(RUSAGE_SELF)` at the start and the end of the
//! window) per write.
//!
//! # How it mirrors propose.rs
//!
//! - Three members in one process; every point on a fresh cluster (initialize
//!   the 3-member cluster, wait for the leader), shut down (`Raft::shutdown`)
//!   after the point.
//! - In-memory log store and state machine (written here, storage v2:
//!   `RaftLogStorage` + `RaftStateMachine`); the state machine counts commands
//!   and bytes, responses are `()`: the cheapest honest state machine.
//! - An in-process network that delivers each RPC by calling the target's
//!   `Raft` handle (`append_entries` / `vote` / `install_snapshot`): no
//!   sockets, no serialization, like openraft's own benchmarks.
//! - One tokio multi-thread runtime with `BENCH_WORKERS` workers for nodes and
//!   clients alike. Each client task loops: t0; stop if t0 >= end; write; t1;
//!   record t1 - t0 in µs if t0 >= measure_from and t1 <= end. Warm-up 0.5 s,
//!   window `BENCH_SECS`. Latencies go into an HdrHistogram (1..60,000,000,
//!   3 significant digits) after the run.
//! - Commands are `BENCH_SIZES` bytes (default 0: empty commands), a fresh
//!   `vec![0xab; size]` per write as in propose.rs.
//!
//! # openraft version and configuration
//!
//! openraft **0.9.25** (pinned): the newest stable release on crates.io; the
//! newer 0.10 line is only published as alphas. Features: `storage-v2` (the
//! separate log and state-machine traits, so log IO and apply run in
//! parallel; required to implement them at all in 0.9); no `serde` (nothing is
//! serialized). `Config` as openraft's own benchmark sets it
//! (`benchmarks/minimal`; its 0.9-era predecessor `cluster_benchmark` set the
//! same but `max_payload_entries`), everything else default:
//! - `election_timeout_min: 200`, `election_timeout_max: 2000` (ms): no
//!   spurious elections on a loaded machine; heartbeat stays at the default
//!   50 ms.
//! - `max_payload_entries: 1024` (default 300): up to 1,024 entries per
//!   AppendEntries, so replication keeps up with many clients.
//! - `purge_batch_size: 1024` (default 1): purge applied logs in batches.
//! - Snapshot policy default (`since_last:5000`), as in openraft's benchmark:
//!   every 5,000 logs the state machine snapshots (16 bytes here) and the log
//!   is purged, so the in-memory log stays short. (propose.rs notes that
//!   raftwork's in-memory store keeps every entry: an advantage for
//!   openraft, not a handicap.)
//! - Build: thin LTO and one codegen unit, as openraft's benchmarks build
//!   (`[profile.release]` in Cargo.toml). raftwork's bench uses the default
//!   profile (no cross-crate LTO, 16 codegen units).
//! - Tracing: openraft's benchmarks install no subscriber and set no
//!   `tracing` max-level features; neither does this anchor (nor propose.rs),
//!   so each disabled tracing call site costs a cached level check.
//! - Log store: a `VecDeque` indexed by log index under a `std::sync::Mutex`
//!   (never held across an await); `append` reports the IO done at once;
//!   payloads are `Bytes`, so cloning entries for replication is a refcount
//!   bump.
//! - Differences from openraft's benchmark that the comparison requires: one
//!   runtime for nodes and clients with `BENCH_WORKERS` workers (openraft's
//!   uses a separate client runtime), closed-loop timed windows instead of a
//!   fixed operation count, and `Bytes` payloads instead of an empty struct.
//!
//! # Run
//!
//! ```sh
//! cd bench/openraft-anchor && cargo run --release
//! BENCH_SECS=3 BENCH_CLIENTS=1,64 cargo run --release
//! ```
//!
//! Settings (environment): `BENCH_SECS` per point (default 5),
//! `BENCH_CLIENTS` (default `1,64,256,1024`), `BENCH_SIZES` in bytes
//! (default `0`), `BENCH_WORKERS` tokio worker threads (default 1, as
//! propose.rs).
//!
//! Output: a header line, then a whitespace-separated table, one row per
//! point: `clients size_B writes/s p50_us p99_us cpu_us_per_op`. On stderr,
//! one check line per point: writes acknowledged, commands applied on each
//! node, and where the leader's snapshot and log purge stand. The harness
//! asserts that the leader applied exactly the acknowledged writes (and
//! their bytes); a failed `client_write` panics: either is a harness bug.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    Config, Entry, EntryPayload, LogId, LogState, OptionalSend, Raft, RaftLogReader, RaftNetwork,
    RaftNetworkFactory, RaftSnapshotBuilder, ServerState, Snapshot, SnapshotMeta, StorageError,
    StoredMembership, Vote,
};

/// The openraft release this anchor is pinned to (`=0.9.25` in Cargo.toml).
const OPENRAFT_VERSION: &str = "0.9.25";

/// A command: opaque bytes, as raftwork's `propose` takes.
#[derive(Debug, Clone)]
pub struct Request(Bytes);

openraft::declare_raft_types!(
    /// Types of the anchor cluster: u64 node ids, no node address (the
    /// network is a table of handles), `()` responses.
    pub TypeConfig:
        D = Request,
        R = (),
        NodeId = u64,
        Node = (),
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

type NodeId = u64;
type BenchRaft = Raft<TypeConfig>;

// ---------------------------------------------------------------------------
// Log store
// ---------------------------------------------------------------------------

#[derive(Default)]
struct LogInner {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    /// Log index of `entries[0]` (meaningful while `entries` is not empty).
    first: u64,
    entries: VecDeque<Entry<TypeConfig>>,
    last_purged: Option<LogId<NodeId>>,
}

impl LogInner {
    /// The positions in `entries` of the log indexes in `range`, clamped to
    /// what the log holds.
    fn positions(&self, range: &impl RangeBounds<u64>) -> std::ops::Range<usize> {
        let first = self.first;
        let end_index = first + self.entries.len() as u64;
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => first,
        }
        .clamp(first, end_index);
        let end = match range.end_bound() {
            Bound::Included(&i) => i + 1,
            Bound::Excluded(&i) => i,
            Bound::Unbounded => end_index,
        }
        .clamp(start, end_index);
        (start - first) as usize..(end - first) as usize
    }
}

/// In-memory log: a deque indexed by log index, shared by the store and its
/// readers (the replication streams).
#[derive(Clone, Default)]
struct LogStore {
    inner: Arc<Mutex<LogInner>>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.inner.lock().unwrap();
        let positions = inner.positions(&range);
        Ok(inner.entries.range(positions).cloned().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.inner.lock().unwrap();
        let last = inner.entries.back().map(|e| e.log_id).or(inner.last_purged);
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.inner.lock().unwrap().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().unwrap().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.inner.lock().unwrap().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().unwrap().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut inner = self.inner.lock().unwrap();
            for entry in entries {
                if inner.entries.is_empty() {
                    inner.first = entry.log_id.index;
                }
                let next = inner.first + inner.entries.len() as u64;
                assert_eq!(
                    entry.log_id.index, next,
                    "openraft appended a non-contiguous entry"
                );
                inner.entries.push_back(entry);
            }
        }
        // In memory: durable as soon as it is in the deque.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.inner.lock().unwrap();
        let keep = log_id.index.saturating_sub(inner.first) as usize;
        inner.entries.truncate(keep);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut inner = self.inner.lock().unwrap();
        let drop = (log_id.index + 1)
            .saturating_sub(inner.first)
            .min(inner.entries.len() as u64);
        inner.entries.drain(..drop as usize);
        inner.first += drop;
        if inner.entries.is_empty() {
            inner.first = log_id.index + 1;
        }
        inner.last_purged = Some(log_id);
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// State machine
// ---------------------------------------------------------------------------

#[derive(Default)]
struct SmInner {
    last_applied: Option<LogId<NodeId>>,
    last_membership: StoredMembership<NodeId, ()>,
    /// Commands applied and their bytes: all the state there is.
    commands: u64,
    bytes: u64,
    snapshot: Option<(SnapshotMeta<NodeId, ()>, Vec<u8>)>,
    snapshots_built: u64,
}

impl SmInner {
    fn encode(&self) -> Vec<u8> {
        let mut data = Vec::with_capacity(16);
        data.extend_from_slice(&self.commands.to_le_bytes());
        data.extend_from_slice(&self.bytes.to_le_bytes());
        data
    }
}

/// Counts commands and bytes: the cheapest honest state machine.
#[derive(Clone, Default)]
struct StateMachineStore {
    inner: Arc<Mutex<SmInner>>,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let mut inner = self.inner.lock().unwrap();
        inner.snapshots_built += 1;
        let snapshot_id = match inner.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.snapshots_built),
            None => format!("--{}", inner.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.last_membership.clone(),
            snapshot_id,
        };
        let data = inner.encode();
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, ()>), StorageError<NodeId>> {
        let inner = self.inner.lock().unwrap();
        Ok((inner.last_applied, inner.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock().unwrap();
        let mut applied = 0;
        for entry in entries {
            applied += 1;
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(Request(data)) => {
                    inner.commands += 1;
                    inner.bytes += data.len() as u64;
                }
                EntryPayload::Membership(m) => {
                    inner.last_membership = StoredMembership::new(Some(entry.log_id), m);
                }
            }
        }
        // One (zero-sized) response per entry: no allocation.
        Ok(vec![(); applied])
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, ()>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let field = |at: usize| {
            data.get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        };
        let Some((commands, bytes)) = field(0).zip(field(8)) else {
            return Err(StorageError::from_io_error(
                openraft::ErrorSubject::Snapshot(Some(meta.signature())),
                openraft::ErrorVerb::Read,
                std::io::Error::other("snapshot shorter than 16 bytes"),
            ));
        };
        let mut inner = self.inner.lock().unwrap();
        inner.commands = commands;
        inner.bytes = bytes;
        inner.last_applied = meta.last_log_id;
        inner.last_membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.inner.lock().unwrap();
        Ok(inner.snapshot.as_ref().map(|(meta, data)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(data.clone())),
        }))
    }
}

// ---------------------------------------------------------------------------
// Network: function calls on the target's Raft handle
// ---------------------------------------------------------------------------

/// The table of the cluster's `Raft` handles. Emptied after the point's
/// shutdown, which breaks the cycle node -> router -> node.
#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<HashMap<NodeId, BenchRaft>>>,
}

impl RaftNetworkFactory<TypeConfig> for Router {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &()) -> Connection {
        Connection {
            target,
            raft: self.nodes.lock().unwrap().get(&target).cloned(),
        }
    }
}

struct Connection {
    target: NodeId,
    raft: Option<BenchRaft>,
}

impl Connection {
    /// The error for a target that is not in the table.
    fn unreachable<E: std::error::Error>(&self) -> RPCError<NodeId, (), E> {
        let e = std::io::Error::other(format!("node {} is not in the table", self.target));
        RPCError::Unreachable(Unreachable::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, (), RaftError<NodeId>>> {
        let raft = self.raft.as_ref().ok_or_else(|| self.unreachable())?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, (), RaftError<NodeId, InstallSnapshotError>>,
    > {
        let raft = self.raft.as_ref().ok_or_else(|| self.unreachable())?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, (), RaftError<NodeId>>> {
        let raft = self.raft.as_ref().ok_or_else(|| self.unreachable())?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

// ---------------------------------------------------------------------------
// Harness (mirrors crates/raftwork/benches/propose.rs)
// ---------------------------------------------------------------------------

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().parse().expect("a list of numbers"))
        .collect()
}

/// openraft's benchmark configuration (see the module header).
fn config() -> Arc<Config> {
    let config = Config {
        cluster_name: "openraft-anchor".to_string(),
        election_timeout_min: 200,
        election_timeout_max: 2000,
        max_payload_entries: 1024,
        purge_batch_size: 1024,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid openraft config"))
}

/// User plus system CPU time of the whole process so far.
fn process_cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given; all-zero bytes
    // are a valid `rusage`.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(
            libc::getrusage(libc::RUSAGE_SELF, &mut usage),
            0,
            "getrusage"
        );
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

struct Point {
    clients: u64,
    size_bytes: u64,
    ops: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    cpu: Duration,
}

struct Cluster {
    router: Router,
    nodes: Vec<BenchRaft>,
    leader: BenchRaft,
    /// The nodes' state machines, in the order of `nodes`.
    state_machines: Vec<StateMachineStore>,
    /// The leader's position in `nodes`.
    leader_at: usize,
}

async fn start_cluster() -> Cluster {
    let config = config();
    let router = Router::default();
    let ids = [1u64, 2, 3];
    let mut nodes = Vec::new();
    let mut state_machines = Vec::new();
    for id in ids {
        let sm = StateMachineStore::default();
        state_machines.push(sm.clone());
        let raft = Raft::new(id, config.clone(), router.clone(), LogStore::default(), sm)
            .await
            .expect("openraft node starts");
        router.nodes.lock().unwrap().insert(id, raft.clone());
        nodes.push(raft);
    }
    let members: BTreeSet<NodeId> = ids.into_iter().collect();
    nodes[0]
        .initialize(members)
        .await
        .expect("cluster initialized");
    let timeout = Some(Duration::from_secs(30));
    let metrics = nodes[0]
        .wait(timeout)
        .metrics(|m| m.current_leader.is_some(), "a leader is known")
        .await
        .expect("a leader within 30 s");
    let leader_id = metrics.current_leader.unwrap();
    let leader_at = ids.iter().position(|&i| i == leader_id).unwrap();
    let leader = nodes[leader_at].clone();
    // The leader has committed its term's first (blank) entry: it takes
    // writes now.
    leader
        .wait(timeout)
        .metrics(
            |m| {
                m.state == ServerState::Leader
                    && m.last_applied
                        .is_some_and(|l| l.leader_id.term == m.current_term)
            },
            "leader applied its blank entry",
        )
        .await
        .expect("the leader commits in its term within 30 s");
    Cluster {
        router,
        nodes,
        leader,
        state_machines,
        leader_at,
    }
}

/// One point on a fresh cluster.
async fn run_point(clients: u64, size_bytes: u64, secs: f64) -> Point {
    let cluster = start_cluster().await;
    let warmup = Duration::from_millis(500);
    let measure = Duration::from_secs_f64(secs);
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + measure;
    // CPU time of the whole process over the window, sampled at its
    // instants by a thread outside the runtime's workers.
    let cpu = tokio::task::spawn_blocking(move || {
        sleep_until(measure_from);
        let from = process_cpu_time();
        sleep_until(end);
        process_cpu_time().saturating_sub(from)
    });
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let raft = cluster.leader.clone();
        tasks.push(tokio::spawn(async move {
            // Latencies in µs, turned into a histogram after the run so the
            // load generator spends little CPU while it measures.
            let mut latencies_us: Vec<u32> = Vec::new();
            let mut writes = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let data = vec![0xabu8; size_bytes as usize];
                if let Err(e) = raft.client_write(Request(Bytes::from(data))).await {
                    panic!("client_write failed (a harness bug): {e}");
                }
                let t1 = Instant::now();
                writes += 1;
                if t0 >= measure_from && t1 <= end {
                    latencies_us.push(t1.duration_since(t0).as_micros() as u32);
                }
            }
            (latencies_us, writes)
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut ops = 0;
    let mut writes = 0;
    for t in tasks {
        let (latencies_us, n) = t.await.expect("client task");
        writes += n;
        ops += latencies_us.len() as u64;
        for l in latencies_us {
            total.saturating_record(l as u64);
        }
    }
    let cpu = cpu.await.expect("CPU sampler");
    {
        // Every acknowledged write was applied on the leader, once.
        let sm = cluster.state_machines[cluster.leader_at]
            .inner
            .lock()
            .unwrap();
        assert_eq!(sm.commands, writes, "commands applied on the leader");
        assert_eq!(sm.bytes, writes * size_bytes, "bytes applied on the leader");
    }
    {
        // On stderr, off the table: followers apply too, and the snapshot
        // policy is at work.
        let m = cluster.leader.metrics().borrow().clone();
        let index =
            |l: Option<LogId<NodeId>>| l.map_or("none".to_string(), |l| l.index.to_string());
        let applied: Vec<u64> = cluster
            .state_machines
            .iter()
            .map(|sm| sm.inner.lock().unwrap().commands)
            .collect();
        eprintln!(
            "openraft-anchor: {clients} clients, {size_bytes} B: {writes} writes acknowledged; commands applied per node {applied:?}; leader's last applied {}, snapshot at {}, log purged to {}",
            index(m.last_applied),
            index(m.snapshot),
            index(m.purged),
        );
    }
    for n in &cluster.nodes {
        n.shutdown().await.expect("openraft node shuts down");
    }
    cluster.router.nodes.lock().unwrap().clear();
    Point {
        clients,
        size_bytes,
        ops,
        secs,
        p50_us: total.value_at_quantile(0.50),
        p99_us: total.value_at_quantile(0.99),
        cpu,
    }
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let clients = env_list("BENCH_CLIENTS", "1,64,256,1024");
    let sizes = env_list("BENCH_SIZES", "0");
    let workers: usize = std::env::var("BENCH_WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "openraft {OPENRAFT_VERSION} anchor: 3 nodes in one process, in-memory log and state machine, function-call network, {workers} tokio workers, {secs}s per point"
        );
        println!(
            "{:>8} {:>10} {:>12} {:>10} {:>10} {:>14}",
            "clients", "size_B", "writes/s", "p50_us", "p99_us", "cpu_us_per_op"
        );
        for &size in &sizes {
            for &c in &clients {
                let p = run_point(c, size, secs).await;
                let cpu_us_per_op = match p.ops {
                    0 => 0.0,
                    ops => p.cpu.as_secs_f64() * 1e6 / ops as f64,
                };
                println!(
                    "{:>8} {:>10} {:>12.0} {:>10} {:>10} {:>14.2}",
                    p.clients,
                    p.size_bytes,
                    p.ops as f64 / p.secs,
                    p.p50_us,
                    p.p99_us,
                    cpu_us_per_op
                );
            }
        }
    });
}
