//! Deterministic simulation of a raftwork cluster.
//!
//! N [`raftwork_core::Core`]s run on one thread in virtual time, driven by one
//! seed: a simulated network that drops, duplicates, delays (and so
//! reorders) whole messages and cuts links one way or both; a simulated disk
//! ([`SimStore`]) where a crash loses what was not synced, possibly tearing
//! the last write; crashes and restarts. The simulator plays the shell's part
//! (persist, apply, snapshots and compaction, serving reads) and runs clients
//! whose reads, writes and compare-and-sets are recorded and checked for
//! linearizability with [`raftwork_check`].
//!
//! Checked at every step: at most one leader per term; the same entry at the
//! same index on every node; committed entries never change or disappear
//! (also across restarts); term and vote never go back across a restart.
//!
//! Bits of the seed also pick how the simulated shell persists, so both
//! ways run: whether the WAL writes on stage, ahead of a sync
//! (`WalWrites::OnStage`), or only in it (`wal_options`), and whether a
//! persist that needs no sync is acknowledged at once when none is in
//! flight, as a node's own shell does, or after a sync latency, as a
//! host's shard does (`Sim::inline_acks`).
//!
//! The same seed gives the same run, byte for byte: nothing here reads a
//! clock or an unseeded random source, and iteration orders are fixed. A
//! failure names its seed; [`SimConfig::seed`] replays it.
//!
//! Negative controls ([`Bug`]) break safety on purpose in the simulated shell
//! to prove the checks can see it.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod hostile;
pub mod multi;
pub use multi::{run_multi, MultiBug, MultiConfig, MultiReport};

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use raft::prelude::{ConfState, Entry, EntryType, Message, MessageType, SnapshotMetadata};
use raftwork_check::{Input, Operation, Output};
use raftwork_core::session::{classify, Applied, EntryKind, SessionConfig, SessionTable};
use raftwork_core::{
    is_command, Action, Core, CoreConfig, NodeEvent, ProposeError, Rejected, RequestId,
};
use raftwork_storage::fs::{FileSystem, SimFs, SimFsFault};
use raftwork_storage::{
    FileSnapshotStore, LogStore, SnapshotCompression, SnapshotStore, StorageError, Wal, WalOptions,
    WalWrites,
};

/// Where each node keeps its WAL and snapshots on its simulated disk.
const WAL_DIR: &str = "/wal";
const SNAPSHOT_DIR: &str = "/snapshots";

/// Small segments and cache, so runs rotate, purge and read from "disk".
/// Who writes ahead of a sync alternates with the seed: `stage` itself
/// (the default) or the sync. Either way writes happen on the simulator's
/// one thread, so a seed replays the same bytes on the same disk.
fn wal_options(seed: u64) -> WalOptions {
    WalOptions {
        segment_size_bytes: 8 << 10,
        cache_bytes: 4 << 10,
        group_id: 1,
        // The second bit: the first picks lease reads in the default run.
        writes: match (seed >> 1) % 2 {
            0 => WalWrites::OnStage,
            _ => WalWrites::AtSync,
        },
    }
}

/// Opens (recovers) a node's WAL and snapshot store on its disk.
fn open_disk(fs: &SimFs, seed: u64) -> Result<(Wal, FileSnapshotStore), StorageError> {
    let shared: std::sync::Arc<dyn FileSystem> = std::sync::Arc::new(fs.clone());
    let wal = Wal::open_on(shared.clone(), WAL_DIR, wal_options(seed))?;
    let snapshots = FileSnapshotStore::open_on(shared, SNAPSHOT_DIR, 2, SnapshotCompression::None)?;
    Ok((wal, snapshots))
}

/// Reads a whole snapshot's data.
fn read_snapshot(store: &FileSnapshotStore, index: u64) -> Result<Vec<u8>, StorageError> {
    let (_, mut reader) = store.open(index)?;
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut data).map_err(|e| StorageError::Io {
        path: SNAPSHOT_DIR.into(),
        source: e,
    })?;
    Ok(data)
}

/// Writes a whole snapshot.
fn write_snapshot(
    store: &FileSnapshotStore,
    meta: &SnapshotMetadata,
    data: &[u8],
) -> Result<(), StorageError> {
    let mut w = store.create(meta.clone())?;
    std::io::Write::write_all(&mut w, data).map_err(|e| StorageError::Io {
        path: SNAPSHOT_DIR.into(),
        source: e,
    })?;
    w.commit()?;
    Ok(())
}

/// What a node had acknowledged as durable when it last reported a sync:
/// its hard state and the terms of its log. A restart must find all of it.
/// An entry may only have been replaced by one of a newer term, or by one
/// the node itself staged after the acknowledgement: a newer leader's
/// entry can carry an older term (it overwrites an uncommitted one), and
/// its write may reach the disk before a sync that never completed.
#[derive(Debug, Clone)]
struct Acked {
    hard_state: raft::prelude::HardState,
    first: u64,
    terms: Vec<u64>,
    /// Entries `(index, term)` staged since, over acknowledged ones.
    replaced_since: std::collections::HashSet<(u64, u64)>,
}

impl Acked {
    fn of(store: &Wal) -> Self {
        let first = raft::Storage::first_index(store).unwrap();
        let last = raft::Storage::last_index(store).unwrap();
        Acked {
            hard_state: raft::Storage::initial_state(store).unwrap().hard_state,
            first,
            terms: (first..=last)
                .map(|i| raft::Storage::term(store, i).unwrap())
                .collect(),
            replaced_since: Default::default(),
        }
    }

    /// Notes what `store` now stages over acknowledged entries (only
    /// uncommitted ones can be replaced).
    fn note_staged(&mut self, store: &Wal) {
        let last = raft::Storage::last_index(store).unwrap();
        let acked_last = self.first + self.terms.len() as u64;
        let from = self.first.max(self.hard_state.commit + 1);
        for i in from..acked_last.min(last + 1) {
            if let Ok(term) = raft::Storage::term(store, i) {
                if term != self.terms[(i - self.first) as usize] {
                    self.replaced_since.insert((i, term));
                }
            }
        }
    }

    /// Why `recovered` lost something acknowledged, if it did.
    fn lost_in(&self, recovered: &Wal) -> Option<String> {
        let hs = raft::Storage::initial_state(recovered).unwrap().hard_state;
        let was = &self.hard_state;
        if hs.term < was.term || (hs.term == was.term && was.vote != 0 && hs.vote != was.vote) {
            return Some(format!("hard state went back: {was:?} → {hs:?}"));
        }
        if hs.commit < was.commit {
            return Some(format!("commit went back: {} → {}", was.commit, hs.commit));
        }
        let first = raft::Storage::first_index(recovered).unwrap();
        let last = raft::Storage::last_index(recovered).unwrap();
        for (k, &term) in self.terms.iter().enumerate() {
            let i = self.first + k as u64;
            if i < first {
                continue; // compacted behind a recorded snapshot
            }
            if i > last {
                return Some(format!(
                    "entry {i} (term {term}) acknowledged as persisted is gone (log ends at {last})"
                ));
            }
            let now = raft::Storage::term(recovered, i).unwrap();
            if now > term || (now < term && self.replaced_since.contains(&(i, now))) {
                break; // replaced by a newer leader's entries: legitimate
            }
            if now < term {
                return Some(format!("entry {i} went back from term {term} to {now}"));
            }
        }
        None
    }
}

/// A small deterministic random generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// A deliberate safety bug in the simulated shell (negative controls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// Acknowledge a write as soon as the leader accepts the proposal,
    /// before it commits.
    AckBeforeCommit,
    /// Serve linearizable reads from the local state machine at once,
    /// without a ReadIndex round.
    LocalRead,
    /// Lease reads as raft-rs serves them, with no expiry check
    /// (`CoreConfig::unchecked_lease_reads`); needs `lease_read`.
    UncheckedLease,
    /// Report a ready persisted without syncing the WAL ("acknowledge
    /// before fsync"): a power cut then loses acknowledged entries.
    AckBeforeSync,
    /// Apply a session command the session table knows as a duplicate
    /// again (no deduplication).
    NoDedupe,
    /// Move session time by each replica's own clock at apply time (as
    /// Babuza does) instead of by the log's stamps.
    LocalClockExpiry,
    /// With `disk_state_machine`: a restart hands the state machine every
    /// command the log replays, also those its store already holds (no
    /// skip past the store's index).
    DiskReplayAll,
    /// With `disk_state_machine`: each apply batch's record carries the
    /// batch's index but the state from before it, as a store that makes
    /// its index durable ahead of the data it covers.
    DiskIndexBeforeData,
    /// Acknowledge a persist that needs no sync at once even while an
    /// earlier one is still syncing (the shell's inline acknowledgement
    /// without its order check): the earlier ready counts as durable
    /// before its sync.
    InlineAckOutOfOrder,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The seed; the whole run follows from it.
    pub seed: u64,
    /// Founding voters.
    pub nodes: u64,
    /// Extra nodes that start outside the cluster with empty storage; faults
    /// add them as learners, promote them, and remove members.
    pub spare_nodes: u64,
    /// Virtual time to run, in milliseconds.
    pub duration_ms: u64,
    /// Virtual length of a tick.
    pub tick_ms: u64,
    /// Concurrent clients.
    pub clients: u64,
    /// Keys the clients use (few keys, more conflicts).
    pub keys: u64,
    /// Inject crashes, partitions, one-way cuts, drops and duplicates.
    pub faults: bool,
    /// A crash may keep part of the last unsynced write.
    pub torn_writes: bool,
    /// Snapshot every this many applied entries (0: never); the core's
    /// policy (`CoreConfig::snapshot_interval_entries`).
    pub snapshot_interval_entries: u64,
    /// Entries kept behind a snapshot when compacting.
    pub snapshot_keep_entries: u64,
    /// Serve linearizable reads from the leader's lease
    /// (`CoreConfig::lease_read`, with its default drift bound of 2 ticks).
    pub lease_read: bool,
    /// Each node's tick lasts `tick_ms` minus up to this many thousandths
    /// of it (drawn per node from the seed), so nodes' clocks drift apart.
    /// Within the lease's drift bound (10-tick elections, 2 ticks of drift:
    /// members may tick up to 28% faster) lease reads must stay
    /// linearizable; beyond it the simulation must catch stale reads.
    pub tick_skew_per_mille: u64,
    /// Writes and compare-and-sets go through client sessions and are sent
    /// again after every uncertain outcome until answered: each must apply
    /// exactly once. Default: true.
    pub sessions: bool,
    /// The liveness phase after `duration_ms` (with faults on): every cut
    /// healed, no more drops, crashed nodes restarted, disk faults
    /// disarmed, no new client requests. By its end there must be one
    /// leader that every voter follows, and no request still waiting.
    /// Default: 2,000 ms.
    pub liveness_ms: u64,
    /// Election timeouts are drawn per node incarnation from
    /// `[10, 10 + election_jitter_ticks)` ticks. Default: 10.
    pub election_jitter_ticks: u64,
    /// Each node's state machine keeps its state on its simulated disk, as
    /// an on-disk state machine does (`raftwork::DiskStateMachine`): every
    /// apply batch appends a record (state and the index it covers) to
    /// `/sm/log` without a sync, the durability point is an fsync before
    /// each snapshot and after a restore, and a restart opens the last
    /// whole record and replays only the commands after it. Needs
    /// `sessions` off (an on-disk state machine refuses them).
    pub disk_state_machine: bool,
    /// A deliberate bug, for negative controls.
    pub bug: Option<Bug>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            nodes: 3,
            spare_nodes: 2,
            duration_ms: 3_000,
            tick_ms: 10,
            clients: 3,
            keys: 3,
            faults: true,
            torn_writes: true,
            snapshot_interval_entries: 25,
            snapshot_keep_entries: 5,
            lease_read: false,
            tick_skew_per_mille: 0,
            election_jitter_ticks: 10,
            liveness_ms: 2_000,
            sessions: true,
            disk_state_machine: false,
            bug: None,
        }
    }
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Hash of every event in order: equal for equal runs.
    pub trace_hash: u64,
    /// Events processed.
    pub events: u64,
    /// Operations in the checked history.
    pub operations: usize,
    /// Writes and compare-and-sets acknowledged.
    pub acknowledged_writes: usize,
    /// Crashes injected.
    pub crashes: u64,
    /// Entries applied, summed over nodes.
    pub applied_entries: u64,
    /// Snapshots installed from a leader, summed over nodes.
    pub snapshots_installed: u64,
    /// Leadership transfers requested.
    pub transfers: u64,
    /// Membership changes proposed (add learner, promote, remove).
    pub membership_changes: u64,
    /// Linearizable reads answered from a leader's lease (or its
    /// confirmation round), all in the checked history.
    pub lease_reads: u64,
    /// Crashes that were power cuts (the rest kept the page cache).
    pub power_cuts: u64,
    /// Unsynced pages power cuts lost.
    pub pages_lost: u64,
    /// Pages power cuts tore.
    pub torn_writes: u64,
    /// EIO and ENOSPC errors injected (each stopped its node).
    pub io_faults: u64,
    /// WAL and snapshot store recoveries after a crash, all successful.
    pub recoveries: u64,
    /// Session commands sent again after an uncertain outcome.
    pub session_retries: u64,
    /// Session commands that committed more than once, answered from the
    /// session table's cache instead of applied again (counted per replica).
    pub duplicates_answered: u64,
}

/// Why a run failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The seed that reproduces it.
    pub seed: u64,
    /// Virtual time of the failure, in ms.
    pub at_ms: u64,
    /// What broke.
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "simulation seed {} failed at {} ms: {}\nreplay: RAFTWORK_SIM_SEED={} cargo test -p raftwork-sim --test sim replay -- --nocapture",
            self.seed, self.at_ms, self.reason, self.seed
        )
    }
}

/// The key-value state machine each node runs.
type Kv = BTreeMap<u64, u64>;

fn encode_kv(kv: &Kv) -> Vec<u8> {
    let mut out = Vec::with_capacity(kv.len() * 16);
    for (k, v) in kv {
        out.extend_from_slice(&k.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// A node's state machine as snapshot bytes: `kv len u32 | kv | session
/// commands applied u64 | commands applied u64 | session table`.
fn encode_state(node: &Node) -> Vec<u8> {
    let kv = encode_kv(&node.kv);
    let mut out = Vec::with_capacity(kv.len() + 64);
    out.extend_from_slice(&(kv.len() as u32).to_le_bytes());
    out.extend_from_slice(&kv);
    out.extend_from_slice(&node.session_commands_applied.to_le_bytes());
    out.extend_from_slice(&node.commands_applied.to_le_bytes());
    out.extend_from_slice(&node.sessions.encode());
    out
}

/// Restores what [`encode_state`] wrote into `node`.
fn restore_state(node: &mut Node, data: &[u8]) {
    let kv_len = u32::from_le_bytes(data[..4].try_into().unwrap()) as usize;
    node.kv = decode_kv(&data[4..4 + kv_len]);
    let at = 4 + kv_len;
    node.session_commands_applied = u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    node.commands_applied = u64::from_le_bytes(data[at + 8..at + 16].try_into().unwrap());
    node.sessions =
        SessionTable::decode(&data[at + 16..]).expect("a snapshot's session table decodes");
}

/// The on-disk state machine's file (`SimConfig::disk_state_machine`): a
/// sequence of records, each the whole state and the index it covers.
/// ```text
/// | len u32 | fnv u64 of payload | payload: index u64 | commands applied u64 | kv |
/// ```
/// Appended without a sync after every apply batch; a record's index
/// commits with its data (one record). Recovery takes the last record
/// whose length and checksum hold: a power cut loses or tears only
/// records written after the last sync.
const SM_DIR: &str = "/sm";
const SM_LOG: &str = "/sm/log";

fn sm_record(index: u64, commands_applied: u64, kv: &Kv) -> Vec<u8> {
    let mut payload = Vec::with_capacity(16 + kv.len() * 16);
    payload.extend_from_slice(&index.to_le_bytes());
    payload.extend_from_slice(&commands_applied.to_le_bytes());
    payload.extend_from_slice(&encode_kv(kv));
    let mut out = Vec::with_capacity(12 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&fnv_bytes(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The last whole record of the state machine's file, and where the next
/// one goes.
#[allow(clippy::type_complexity)]
fn sm_recover(fs: &SimFs) -> std::io::Result<(u64, Option<(u64, u64, Kv)>)> {
    let path = std::path::Path::new(SM_LOG);
    if !fs.exists(path)? {
        return Ok((0, None));
    }
    let file = fs.open(path, raftwork_storage::fs::OpenMode::Read)?;
    let len = file.len()?;
    let mut data = vec![0u8; len as usize];
    file.read_exact_at(&mut data, 0)?;
    let (mut at, mut last) = (0usize, None);
    while at + 12 <= data.len() {
        let n = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let want = u64::from_le_bytes(data[at + 4..at + 12].try_into().unwrap());
        if n < 16 || at + 12 + n > data.len() {
            break;
        }
        let payload = &data[at + 12..at + 12 + n];
        if fnv_bytes(payload) != want {
            break;
        }
        last = Some((
            u64::from_le_bytes(payload[..8].try_into().unwrap()),
            u64::from_le_bytes(payload[8..16].try_into().unwrap()),
            decode_kv(&payload[16..]),
        ));
        at += 12 + n;
    }
    Ok((at as u64, last))
}

fn decode_kv(data: &[u8]) -> Kv {
    data.chunks_exact(16)
        .map(|c| {
            (
                u64::from_le_bytes(c[..8].try_into().unwrap()),
                u64::from_le_bytes(c[8..].try_into().unwrap()),
            )
        })
        .collect()
}

/// Client `c`'s session secret: fixed per client, so a run replays.
fn client_secret(c: u64) -> u64 {
    (c + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5e55_1011
}

/// Command: `[kind][key][a][b]`, kind 1 = write a, 2 = cas (expected a, or
/// none if a == u64::MAX) to b.
fn encode_command(input: Input, key: u64) -> Vec<u8> {
    let (kind, a, b) = match input {
        Input::Write(v) => (1u8, v, 0),
        Input::Cas { expected, new } => (2u8, expected.unwrap_or(u64::MAX), new),
        Input::Read => unreachable!("reads are not proposed"),
    };
    let mut out = vec![kind];
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    out
}

/// Applies a command; returns the CAS outcome (true for writes).
fn apply_command(kv: &mut Kv, data: &[u8]) -> bool {
    let key = u64::from_le_bytes(data[1..9].try_into().unwrap());
    let a = u64::from_le_bytes(data[9..17].try_into().unwrap());
    let b = u64::from_le_bytes(data[17..25].try_into().unwrap());
    match data[0] {
        1 => {
            kv.insert(key, a);
            true
        }
        2 => {
            let expected = (a != u64::MAX).then_some(a);
            if kv.get(&key).copied() == expected {
                kv.insert(key, b);
                true
            } else {
                false
            }
        }
        k => panic!("unknown command kind {k}"),
    }
}

/// FNV-1a of `bytes` (one step per byte, as `fnv` is fed elsewhere).
fn fnv_bytes(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        fnv(&mut h, *b as u64);
    }
    h
}

fn fnv(h: &mut u64, x: u64) {
    for b in x.to_le_bytes() {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100000001b3);
    }
}

#[derive(Debug)]
enum Event {
    Tick(u64),
    Deliver {
        to: u64,
        msg: Message,
    },
    SyncDone {
        node: u64,
        incarnation: u64,
        number: u64,
        must_sync: bool,
    },
    ClientStart(u64),
    Fault,
    Restart(u64),
    /// The cuts one fault made are healed.
    Heal(Vec<(u64, u64)>),
}

/// An event due at virtual time `at`; `seq` orders events due at the same
/// time by when they were scheduled (both simulators' queues).
struct Queued<E> {
    at: u64,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Queued<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<E> Eq for Queued<E> {}
impl<E> PartialOrd for Queued<E> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Queued<E> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// A client operation waiting for its outcome.
struct Waiting {
    client: u64,
    op: usize,
    /// For reads: the highest index known committed when the read was
    /// issued. A read index below it is stale (ReadIndex promises at least
    /// every index committed before the request), whether or not the
    /// history shows it.
    committed_at_call: u64,
    kind: WaitKind,
}

/// What a waiting request is.
#[derive(Clone)]
enum WaitKind {
    /// A read, or a write outside a session.
    Plain,
    /// A write in the client's session: retried until its outcome is known.
    Session(Retry),
    /// The client's session register.
    Register,
}

/// A session command, as sent again after an uncertain outcome.
#[derive(Clone)]
struct Retry {
    op: usize,
    seq: u64,
    input: Input,
    key: u64,
}

struct Node {
    id: u64,
    /// Length of this node's tick in virtual ms (its clock's rate).
    tick_ms: u64,
    incarnation: u64,
    core: Option<Core<Wal>>,
    /// The node's disk.
    fs: SimFs,
    /// Its WAL on that disk (recovered right after each crash).
    store: Wal,
    /// What it last acknowledged as durable.
    acked: Option<Acked>,
    /// Injected faults the node already stopped for.
    faults_seen: u64,
    kv: Kv,
    applied: u64,
    applied_term: u64,
    conf_state: ConfState,
    /// The node's snapshot store, on its disk.
    snapshots: FileSnapshotStore,
    waiting: BTreeMap<RequestId, Waiting>,
    next_request: RequestId,
    last_sync_at: u64,
    /// Highest persist number handed to the (simulated) sync, and the
    /// highest it answered, in this incarnation: as the shell, a persist
    /// that needs no sync is acknowledged at once when none is in flight
    /// (seeds with `inline_acks`).
    sync_sent: u64,
    sync_answered: u64,
    /// Such a persist, acknowledged after its actions run.
    persisted_inline: Option<u64>,
    /// The replicated session table (part of the state machine and its
    /// snapshots).
    sessions: SessionTable,
    /// Session commands this replica applied (state machine state): must
    /// equal the distinct session commands committed up to its applied
    /// index, or something applied twice or not at all.
    session_commands_applied: u64,
    /// Commands this replica's state machine applied (state machine
    /// state): must equal the commands committed up to its applied index.
    commands_applied: u64,
    /// With an on-disk state machine: commands at or below this index are
    /// in its store already (its index at the last start).
    skip_through: u64,
    /// Where the next record of the state machine's file goes.
    sm_end: u64,
}

struct Client {
    leader_hint: Option<u64>,
    /// The client's session, once registered.
    session: Option<u64>,
    registering: bool,
    next_seq: u64,
    /// A session command whose outcome is not known yet: sent again.
    retry: Option<Retry>,
}

/// The simulation.
struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued<Event>>>,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    history: Vec<Operation>,
    /// Directed links that drop everything, with how many faults cut each.
    cut: BTreeMap<(u64, u64), u32>,
    drop_per_mille: u64,
    dup_per_mille: u64,
    next_value: u64,
    /// Index → (term, hash of data) of every entry any node applied.
    committed: BTreeMap<u64, (u64, u64)>,
    /// Term → the leader some node reported for it.
    leaders: BTreeMap<u64, u64>,
    /// Applied index → (node, fingerprint of its session table there).
    session_tables: BTreeMap<u64, (u64, u64)>,
    /// Every replica's state fingerprint at an applied index, as first
    /// reported: `(node, fingerprint)`.
    states: BTreeMap<u64, (u64, u64)>,
    /// Indexes of the plain (sessionless) commands committed.
    commands: BTreeSet<u64>,
    /// Index → (session, sequence) of every committed session command.
    session_commands: BTreeMap<u64, (u64, u64)>,
    trace: u64,
    events: u64,
    crashes: u64,
    applied_entries: u64,
    snapshots_installed: u64,
    transfers: u64,
    membership_changes: u64,
    lease_reads: u64,
    recoveries: u64,
    session_retries: u64,
    duplicates_answered: u64,
    /// In the liveness phase: no faults, no new requests.
    healed: bool,
    logger: slog::Logger,
}

impl Sim {
    fn schedule(&mut self, after_ms: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at: self.now + after_ms,
            seq: self.seq,
            event,
        }));
    }

    fn fail(&self, reason: impl Into<String>) -> Failure {
        Failure {
            seed: self.cfg.seed,
            at_ms: self.now,
            reason: reason.into(),
        }
    }

    fn core_config(&mut self, id: u64, applied: u64) -> CoreConfig {
        CoreConfig {
            id,
            applied_index: applied,
            // The election timeout is drawn from the seed, per incarnation.
            fixed_election_ticks: Some(
                10 + self.rng.below(self.cfg.election_jitter_ticks.max(1)) as usize,
            ),
            incarnation: self.rng.next_u64(),
            propose_timeout_ticks: 60,
            read_timeout_ticks: 30,
            lease_read: self.cfg.lease_read,
            unchecked_lease_reads: self.cfg.bug == Some(Bug::UncheckedLease),
            snapshot_interval_entries: self.cfg.snapshot_interval_entries,
            snapshot_keep_entries: self.cfg.snapshot_keep_entries,
            ..CoreConfig::default()
        }
    }

    fn start_node(&mut self, k: usize) -> Result<(), Failure> {
        let id = self.nodes[k].id;
        // As the builder does: restore from the newest snapshot the log or
        // the snapshot store knows.
        let store = self.nodes[k].store.clone();
        let stored = self.nodes[k]
            .snapshots
            .latest()
            .map_err(|e| self.fail(format!("node {id}: snapshot store: {e}")))?
            .map(|m| m.metadata);
        let base = raftwork_core::adopt_snapshot(&store, 1, stored)
            .map_err(|e| self.fail(e.to_string()))?;
        let data = if base.index > 0 {
            match read_snapshot(&self.nodes[k].snapshots, base.index) {
                Ok(d) => Some(d),
                Err(e) => {
                    return Err(self.fail(format!(
                        "node {id}: the log records snapshot {} but its data is gone: {e}",
                        base.index
                    )))
                }
            }
        } else {
            None
        };
        let node = &mut self.nodes[k];
        match data.as_deref() {
            Some(d) => restore_state(node, d),
            None => {
                node.kv = Kv::new();
                node.session_commands_applied = 0;
                node.commands_applied = 0;
                node.sessions = SessionTable::new(SessionConfig::default());
            }
        }
        node.skip_through = 0;
        if self.cfg.disk_state_machine && !self.open_disk_state_machine(k, base.index)? {
            // Its disk failed on purpose: it stopped, and comes back later.
            return Ok(());
        }
        let node = &mut self.nodes[k];
        node.applied = base.index;
        node.applied_term = base.term;
        node.conf_state = raft::Storage::initial_state(&store).unwrap().conf_state;
        let cfg = self.core_config(id, base.index);
        let core = Core::new(cfg, store, &self.logger)
            .map_err(|e| self.fail(format!("node {id} cannot start: {e}")))?;
        let node = &mut self.nodes[k];
        node.core = Some(core);
        node.incarnation += 1;
        node.sync_sent = 0;
        node.sync_answered = 0;
        node.persisted_inline = None;
        Ok(())
    }

    /// Opens node `k`'s on-disk state machine, as the builder does: its
    /// store's state if that is at or past the snapshot the node starts
    /// from (`base`: its state is already in `node`), else the snapshot's
    /// state made durable in the store at its index. False if the disk
    /// failed on purpose and the node stopped.
    fn open_disk_state_machine(&mut self, k: usize, base: u64) -> Result<bool, Failure> {
        let id = self.nodes[k].id;
        let (end, record) = sm_recover(&self.nodes[k].fs).map_err(|e| {
            self.fail(format!(
                "node {id}: the state machine's file does not open after a crash: {e}"
            ))
        })?;
        self.nodes[k].sm_end = end;
        let last = raft::Storage::last_index(&self.nodes[k].store).unwrap();
        match record {
            Some((durable, commands, kv)) if durable >= base => {
                // Past the log only after restoring a received snapshot
                // whose install the crash kept out of the log; its data is
                // in the snapshot store (saved before raft saw it).
                if durable > last && read_snapshot(&self.nodes[k].snapshots, durable).is_err() {
                    return Err(self.fail(format!(
                        "node {id}: the state machine holds index {durable}, past the log's last {last}, and no snapshot there"
                    )));
                }
                let node = &mut self.nodes[k];
                node.kv = kv;
                node.commands_applied = commands;
                if self.cfg.bug != Some(Bug::DiskReplayAll) {
                    node.skip_through = durable;
                }
                Ok(true)
            }
            // Restore the snapshot's state into the store, durably.
            _ if base > 0 => Ok(self.sm_append(k, base)? && self.sm_sync(k)?),
            _ => Ok(true),
        }
    }

    /// Appends the state machine's state at `index` to its file (no sync).
    /// False if the disk failed on purpose and the node stopped.
    fn sm_append(&mut self, k: usize, index: u64) -> Result<bool, Failure> {
        let node = &self.nodes[k];
        let record = sm_record(index, node.commands_applied, &node.kv);
        let at = node.sm_end;
        let fs = node.fs.clone();
        let written = (|| {
            let path = std::path::Path::new(SM_LOG);
            if !fs.exists(path)? {
                fs.create_dir_all(std::path::Path::new(SM_DIR))?;
                let f = fs.open(path, raftwork_storage::fs::OpenMode::CreateNew)?;
                f.sync_all()?;
                fs.sync_dir(std::path::Path::new(SM_DIR))?;
                fs.sync_dir(std::path::Path::new("/"))?;
            }
            let f = fs.open(path, raftwork_storage::fs::OpenMode::ReadWrite)?;
            f.write_all_at(&record, at)
        })();
        match written {
            Ok(()) => {
                self.nodes[k].sm_end = at + record.len() as u64;
                Ok(true)
            }
            Err(e) => self
                .io_failed(k, format!("state machine write: {e}"))
                .map(|()| false),
        }
    }

    /// The on-disk state machine's durability point: an fsync of its file.
    /// False if the disk failed on purpose and the node stopped.
    fn sm_sync(&mut self, k: usize) -> Result<bool, Failure> {
        let fs = self.nodes[k].fs.clone();
        let synced = fs
            .open(
                std::path::Path::new(SM_LOG),
                raftwork_storage::fs::OpenMode::ReadWrite,
            )
            .and_then(|f| f.sync_data());
        match synced {
            Ok(()) => Ok(true),
            Err(e) => self
                .io_failed(k, format!("state machine sync: {e}"))
                .map(|()| false),
        }
    }

    fn run(mut self) -> Result<Report, Failure> {
        if self.cfg.tick_skew_per_mille > 0 {
            for k in 0..self.nodes.len() {
                let skew = self.cfg.tick_ms * self.cfg.tick_skew_per_mille.min(999) / 1000;
                self.nodes[k].tick_ms = self.cfg.tick_ms - self.rng.below(skew + 1);
            }
        }
        for k in 0..self.nodes.len() {
            self.start_node(k)?;
            let phase = self.rng.below(self.cfg.tick_ms);
            self.schedule(phase + 1, Event::Tick(self.nodes[k].id));
        }
        for c in 0..self.cfg.clients {
            let start = self.rng.below(50);
            self.schedule(start + 1, Event::ClientStart(c));
        }
        if self.cfg.faults {
            let at = 100 + self.rng.below(300);
            self.schedule(at, Event::Fault);
        }
        let liveness = if self.cfg.faults {
            self.cfg.liveness_ms
        } else {
            0
        };
        while let Some(Reverse(q)) = self.queue.pop() {
            if q.at > self.cfg.duration_ms + liveness {
                break;
            }
            if q.at > self.cfg.duration_ms && !self.healed && liveness > 0 {
                self.heal_all();
            }
            self.now = q.at;
            self.events += 1;
            self.handle(q.event)?;
        }
        if self.healed {
            self.check_liveness()?;
        }
        self.finish()
    }

    /// Starts the liveness phase: the faults stop and everything heals.
    fn heal_all(&mut self) {
        self.healed = true;
        self.cut.clear();
        self.drop_per_mille = 0;
        self.dup_per_mille = 0;
        for k in 0..self.nodes.len() {
            self.nodes[k].fs.disarm();
            if self.nodes[k].core.is_none() {
                let id = self.nodes[k].id;
                self.schedule(1, Event::Restart(id));
            }
        }
    }

    /// After the liveness phase: one leader that every voter follows, and
    /// every request answered.
    fn check_liveness(&mut self) -> Result<(), Failure> {
        let voters = self.membership().voters;
        let mut seen = BTreeSet::new();
        for &v in &voters {
            let Some(core) = self.nodes[self.node_index(v)].core.as_ref() else {
                return Err(self.fail(format!("liveness: voter {v} is not running")));
            };
            seen.insert((core.leader(), core.status().term));
        }
        let agreed = match seen.iter().next() {
            Some(&(Some(l), _)) if seen.len() == 1 => Some(l),
            _ => None,
        };
        let leading = agreed.is_some_and(|l| {
            self.nodes[self.node_index(l)]
                .core
                .as_ref()
                .is_some_and(|c| c.role() == raftwork_core::Role::Leader)
        });
        if !leading {
            return Err(self.fail(format!(
                "liveness: {} ms after healing, voters {voters:?} do not follow one leader: (leader, term) seen {seen:?}",
                self.cfg.liveness_ms
            )));
        }
        for node in &self.nodes {
            if let Some((req, w)) = node.waiting.iter().next() {
                let op = &self.history[w.op];
                return Err(self.fail(format!(
                    "liveness: {} ms after healing, node {} still has request {req} waiting ({:?} on key {} by client {}, called at {} ms)",
                    self.cfg.liveness_ms, node.id, op.input, op.key, op.client, op.call_time
                )));
            }
        }
        Ok(())
    }

    fn node_index(&self, id: u64) -> usize {
        (id - 1) as usize
    }

    fn handle(&mut self, event: Event) -> Result<(), Failure> {
        fnv(&mut self.trace, self.now);
        match event {
            Event::Tick(id) => {
                fnv(&mut self.trace, 1 + id * 16);
                let k = self.node_index(id);
                if let Some(core) = self.nodes[k].core.as_mut() {
                    core.handle_tick();
                    self.drive(k)?;
                }
                self.schedule(self.nodes[k].tick_ms, Event::Tick(id));
            }
            Event::Deliver { to, msg } => {
                let k = self.node_index(to);
                self.deliver(k, msg)?;
                // Everything else arriving for this node at this instant is
                // taken before the core is polled, as the runtime drains its
                // inbox: raft then sees bursts, not one message per poll.
                while let Some(Reverse(q)) = self.queue.peek() {
                    if q.at != self.now
                        || !matches!(q.event, Event::Deliver { to: t, .. } if t == to)
                    {
                        break;
                    }
                    let Reverse(q) = self.queue.pop().unwrap();
                    self.events += 1;
                    if let Event::Deliver { msg, .. } = q.event {
                        self.deliver(k, msg)?;
                    }
                }
                self.drive(k)?;
            }
            Event::SyncDone {
                node,
                incarnation,
                number,
                must_sync,
            } => {
                fnv(&mut self.trace, 3 + node * 16 + number * 256);
                let k = self.node_index(node);
                if self.nodes[k].incarnation != incarnation || self.nodes[k].core.is_none() {
                    return Ok(());
                }
                if must_sync {
                    if self.cfg.bug != Some(Bug::AckBeforeSync) {
                        if let Err(e) = self.nodes[k].store.sync() {
                            return self.io_failed(k, e.to_string());
                        }
                    }
                    // Everything staged so far is durable (one fdatasync of
                    // the active segment; older ones were synced when closed).
                    self.nodes[k].acked = Some(Acked::of(&self.nodes[k].store));
                }
                self.nodes[k].sync_answered = number;
                self.nodes[k]
                    .core
                    .as_mut()
                    .unwrap()
                    .handle_persisted(number);
                self.drive(k)?;
            }
            Event::ClientStart(c) => {
                fnv(&mut self.trace, 4 + c * 16);
                if !self.healed {
                    self.client_start(c)?;
                }
            }
            Event::Fault => {
                fnv(&mut self.trace, 5);
                if self.healed {
                    return Ok(());
                }
                self.inject_fault()?;
                let next = 100 + self.rng.below(400);
                self.schedule(next, Event::Fault);
            }
            Event::Restart(id) => {
                fnv(&mut self.trace, 6 + id * 16);
                self.restart(id)?;
            }
            Event::Heal(links) => {
                fnv(&mut self.trace, 7);
                for link in links {
                    if let Some(count) = self.cut.get_mut(&link) {
                        *count -= 1;
                        if *count == 0 {
                            self.cut.remove(&link);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Hands one message to node `k`'s core (no poll). Fails the run if the
    /// core rejects a message no correct peer could have sent: every message
    /// here comes from a correct core, so only the rules that a stale
    /// (delayed, duplicated) message can break may fire.
    fn deliver(&mut self, k: usize, mut msg: Message) -> Result<(), Failure> {
        fnv(
            &mut self.trace,
            2 + self.nodes[k].id * 16 + msg.get_msg_type() as u64 * 256,
        );
        fnv(&mut self.trace, msg.term * 31 + msg.index);
        if self.nodes[k].core.is_none() {
            return Ok(());
        }
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            // Saved before raft sees it, as the runtime does.
            let snap = msg.mut_snapshot();
            let meta = snap.get_metadata().clone();
            if let Err(e) = write_snapshot(&self.nodes[k].snapshots, &meta, &snap.data) {
                // As the runtime does: a snapshot it cannot save is dropped.
                if !self.injected(k) {
                    return Err(self.fail(format!(
                        "node {}: cannot save a received snapshot: {e}",
                        self.nodes[k].id
                    )));
                }
                return Ok(());
            }
        }
        let (from, msg_type) = (msg.from, msg.get_msg_type());
        match self.nodes[k].core.as_mut().unwrap().handle_message(msg) {
            Ok(()) | Err(Rejected::NotFromLeader { .. }) | Err(Rejected::AckBeyondLog { .. }) => {
                Ok(())
            }
            Err(rejected) => Err(self.fail(format!(
                "node {} rejected {msg_type:?} from correct node {from}: {rejected}",
                self.nodes[k].id
            ))),
        }
    }

    /// The membership as the most advanced running node knows it.
    fn membership(&self) -> ConfState {
        self.nodes
            .iter()
            .filter(|x| x.core.is_some())
            .max_by_key(|x| x.applied)
            .map(|x| x.conf_state.clone())
            .unwrap_or_default()
    }

    fn inject_fault(&mut self) -> Result<(), Failure> {
        let n = self.nodes.len() as u64;
        match self.rng.below(10) {
            7 => {
                // A membership change through the leader: add a non-member
                // as a learner, promote a learner, or remove a member while
                // keeping at least as many voters as the cluster started with.
                let leader = (0..self.nodes.len()).find(|&k| {
                    self.nodes[k]
                        .core
                        .as_ref()
                        .is_some_and(|c| c.role() == raftwork_core::Role::Leader)
                });
                if let Some(k) = leader {
                    let cs = self.nodes[k].core.as_ref().unwrap().conf_state();
                    let id = 1 + self.rng.below(n);
                    let change = if cs.learners.contains(&id) {
                        if self.rng.below(2) == 0 {
                            raftwork_core::MembershipChange::PromoteLearner(id)
                        } else {
                            raftwork_core::MembershipChange::Remove(id)
                        }
                    } else if cs.voters.contains(&id) {
                        if cs.voters.len() as u64 > self.cfg.nodes {
                            raftwork_core::MembershipChange::Remove(id)
                        } else {
                            return Ok(());
                        }
                    } else {
                        raftwork_core::MembershipChange::AddLearner(id)
                    };
                    let node = &mut self.nodes[k];
                    let req = node.next_request;
                    node.next_request += 1;
                    if node
                        .core
                        .as_mut()
                        .unwrap()
                        .handle_conf_change(req, change, Vec::new())
                        .is_ok()
                    {
                        self.membership_changes += 1;
                    }
                    self.drive(k)?;
                }
            }
            6 => {
                // Ask the leader to hand leadership to another voter.
                let leader = (0..self.nodes.len()).find(|&k| {
                    self.nodes[k]
                        .core
                        .as_ref()
                        .is_some_and(|c| c.role() == raftwork_core::Role::Leader)
                });
                if let Some(k) = leader {
                    let to = 1 + self.rng.below(n);
                    if to != self.nodes[k].id {
                        let node = &mut self.nodes[k];
                        let req = node.next_request;
                        node.next_request += 1;
                        self.transfers += 1;
                        let _ = node.core.as_mut().unwrap().handle_transfer_leader(req, to);
                        self.drive(k)?;
                    }
                }
            }
            0 | 1 => {
                // Crash a running node, keeping a majority of the voters up.
                let voters = self.membership().voters;
                let id = 1 + self.rng.below(n);
                let voters_down = voters
                    .iter()
                    .filter(|v| self.nodes[self.node_index(**v)].core.is_none())
                    .count()
                    + usize::from(voters.contains(&id));
                if voters_down <= (voters.len().max(1) - 1) / 2
                    && self.nodes[self.node_index(id)].core.is_some()
                {
                    self.crash(id)?;
                    let after = 50 + self.rng.below(500);
                    self.schedule(after, Event::Restart(id));
                }
            }
            2 => {
                // Split the cluster in two, both ways.
                let mut side = BTreeSet::new();
                for id in 1..=n {
                    if self.rng.below(2) == 0 {
                        side.insert(id);
                    }
                }
                let mut links = Vec::new();
                for a in 1..=n {
                    for b in 1..=n {
                        if a != b && side.contains(&a) != side.contains(&b) {
                            links.push((a, b));
                        }
                    }
                }
                self.cut_for_a_while(links);
            }
            3 => {
                // Cut one link one way.
                let a = 1 + self.rng.below(n);
                let b = 1 + self.rng.below(n);
                if a != b {
                    self.cut_for_a_while(vec![(a, b)]);
                }
            }
            4 => {
                self.drop_per_mille = self.rng.below(100);
                self.dup_per_mille = self.rng.below(50);
            }
            5 => {
                // Cut the leader off from everyone, both ways.
                let leader = (0..self.nodes.len()).find(|&k| {
                    self.nodes[k]
                        .core
                        .as_ref()
                        .is_some_and(|c| c.role() == raftwork_core::Role::Leader)
                });
                if let Some(k) = leader {
                    let l = self.nodes[k].id;
                    let links = (1..=n)
                        .filter(|&o| o != l)
                        .flat_map(|o| [(l, o), (o, l)])
                        .collect();
                    self.cut_for_a_while(links);
                }
            }
            9 => {
                // A disk fault: one of the node's next storage calls
                // (writes, syncs, renames, ...) fails with EIO or ENOSPC,
                // which stops it; it restarts later, as under systemd.
                let k = self.rng.below(n) as usize;
                let calls = self.rng.below(40);
                let fault = if self.rng.below(2) == 0 {
                    SimFsFault::Eio
                } else {
                    SimFsFault::Enospc
                };
                if self.nodes[k].core.is_some() {
                    self.nodes[k].fs.fail_after(calls, fault);
                }
            }
            _ => self.cut.clear(),
        }
        Ok(())
    }

    /// Cuts `links` (directed) until a heal 100 to 800 ms from now; cuts
    /// of overlapping faults heal separately.
    fn cut_for_a_while(&mut self, links: Vec<(u64, u64)>) {
        for &link in &links {
            *self.cut.entry(link).or_insert(0) += 1;
        }
        let after = 100 + self.rng.below(700);
        self.schedule(after, Event::Heal(links));
    }

    /// Crashes node `id`: a power cut (unsynced data lost in part or
    /// whole, see `SimFs`) or, with `torn_writes` off or by the draw, a
    /// process kill (the page cache survives). Then recovers its WAL and
    /// snapshot store at once, which must succeed and must hold everything
    /// the node acknowledged as durable.
    fn crash(&mut self, id: u64) -> Result<(), Failure> {
        let power = self.cfg.torn_writes && self.rng.below(2) == 0;
        self.crash_as(id, power)
    }

    fn crash_as(&mut self, id: u64, power: bool) -> Result<(), Failure> {
        let k = self.node_index(id);
        self.crashes += 1;
        let node = &mut self.nodes[k];
        node.core = None;
        // Its clients' operations end without an answer.
        let waiting = std::mem::take(&mut node.waiting);
        for (_, w) in waiting {
            self.abandon(w);
        }
        let fs = self.nodes[k].fs.clone();
        if power {
            let rng = &mut self.rng;
            fs.power_cut(&mut |n| rng.below(n));
        } else {
            fs.kill();
        }
        self.nodes[k].faults_seen = fs.stats().faults_injected;
        let (store, snapshots) = open_disk(&fs, self.cfg.seed).map_err(|e| {
            self.fail(format!(
                "node {id}: recovery refused after a crash that lost only unsynced data: {e}"
            ))
        })?;
        self.recoveries += 1;
        if let Some(acked) = &self.nodes[k].acked {
            if let Some(lost) = acked.lost_in(&store) {
                return Err(self.fail(format!(
                    "node {id}: {} crash lost what it acknowledged: {lost}",
                    if power { "a power cut" } else { "a process" }
                )));
            }
        }
        let node = &mut self.nodes[k];
        node.store = store;
        node.snapshots = snapshots;
        Ok(())
    }

    /// Whether node `k`'s disk failed a call on purpose since it last
    /// stopped for one.
    fn injected(&self, k: usize) -> bool {
        self.nodes[k].fs.stats().faults_injected > self.nodes[k].faults_seen
    }

    /// A storage call of node `k` failed. An injected fault stops the node
    /// as the runtime does (any write or sync error is fatal), and it comes
    /// back later; the disk state after a failed call is uncertain, so it
    /// stops with a power cut. Any other failure fails the run.
    fn io_failed(&mut self, k: usize, error: String) -> Result<(), Failure> {
        let id = self.nodes[k].id;
        if !self.injected(k) {
            return Err(self.fail(format!("node {id}: storage failed: {error}")));
        }
        self.crash_as(id, true)?;
        let after = 50 + self.rng.below(500);
        self.schedule(after, Event::Restart(id));
        Ok(())
    }

    fn restart(&mut self, id: u64) -> Result<(), Failure> {
        let k = self.node_index(id);
        if self.nodes[k].core.is_some() {
            return Ok(());
        }
        self.start_node(k)?;
        // Committed entries it still holds are the committed ones.
        let store = self.nodes[k].store.clone();
        let first = raft::Storage::first_index(&store).unwrap();
        let last = raft::Storage::last_index(&store).unwrap();
        let commit = raft::Storage::initial_state(&store)
            .unwrap()
            .hard_state
            .commit;
        for i in first..=last.min(commit) {
            let term = raft::Storage::term(&store, i).unwrap();
            if let Some(&(t, _)) = self.committed.get(&i) {
                if t != term {
                    return Err(self.fail(format!("node {id}: committed entry {i} of term {t} became term {term} after restart")));
                }
            }
        }
        self.drive(k)
    }

    fn finish_op(&mut self, w: Waiting, output: Output) {
        let op = &mut self.history[w.op];
        op.output = output;
        op.return_time = if output == Output::Unknown {
            u64::MAX
        } else {
            self.now
        };
        let next = self.rng.below(20);
        self.schedule(next, Event::ClientStart(w.client));
        let _ = w.client;
    }

    fn client_start(&mut self, c: u64) -> Result<(), Failure> {
        let n = self.nodes.len() as u64;
        let target = match self.clients[c as usize].leader_hint {
            Some(l) if self.rng.chance(800) => l,
            _ => 1 + self.rng.below(n),
        };
        let k = self.node_index(target);
        if self.nodes[k].core.is_none() {
            self.clients[c as usize].leader_hint = None;
            self.schedule(10, Event::ClientStart(c));
            return Ok(());
        }
        // The node a client talks to tells it whom it takes for the leader
        // (as a redirect would): clients of a cut-off leader keep using it
        // until it fails them, as real ones do.
        if let Some(l) = self.nodes[k].core.as_ref().unwrap().leader() {
            self.clients[c as usize].leader_hint = Some(l);
        }
        if self.cfg.sessions {
            if self.clients[c as usize].session.is_none() {
                return self.register_session(c, k);
            }
            if let Some(r) = self.clients[c as usize].retry.take() {
                return self.propose_session(c, k, r);
            }
        }
        let key = self.rng.below(self.cfg.keys);
        self.next_value += 1;
        let value = self.next_value;
        let input = match self.rng.below(10) {
            0..=3 => Input::Read,
            4..=7 => Input::Write(value),
            _ => {
                // Expect the value some recent write put there, or none.
                let expected = self
                    .history
                    .iter()
                    .rev()
                    .filter(|o| o.key == key)
                    .find_map(|o| match o.input {
                        Input::Write(v) => Some(v),
                        _ => None,
                    });
                Input::Cas {
                    expected,
                    new: value,
                }
            }
        };
        let op = self.history.len();
        self.history.push(Operation {
            client: c,
            key,
            input,
            output: Output::Unknown,
            call_time: self.now,
            return_time: u64::MAX,
        });
        let committed_at_call = self.committed.last_key_value().map_or(0, |(&i, _)| i);
        let node = &mut self.nodes[k];
        let id = node.next_request;
        node.next_request += 1;
        let core = node.core.as_mut().unwrap();
        match input {
            Input::Read => {
                if self.cfg.bug == Some(Bug::LocalRead) {
                    let v = node.kv.get(&key).copied();
                    self.finish_op(
                        Waiting {
                            client: c,
                            op,
                            committed_at_call,
                            kind: WaitKind::Plain,
                        },
                        Output::Read(v),
                    );
                    return Ok(());
                }
                core.handle_read(id);
                node.waiting.insert(
                    id,
                    Waiting {
                        client: c,
                        op,
                        committed_at_call,
                        kind: WaitKind::Plain,
                    },
                );
            }
            _ if self.cfg.sessions => {
                let client = &mut self.clients[c as usize];
                let seq = client.next_seq;
                client.next_seq += 1;
                return self.propose_session(
                    c,
                    k,
                    Retry {
                        op,
                        seq,
                        input,
                        key,
                    },
                );
            }
            _ => match core.handle_propose(id, encode_command(input, key)) {
                Ok(()) => {
                    if self.cfg.bug == Some(Bug::AckBeforeCommit)
                        && core.role() == raftwork_core::Role::Leader
                    {
                        let out = match input {
                            Input::Cas { .. } => Output::Cas(true),
                            _ => Output::Written,
                        };
                        self.finish_op(
                            Waiting {
                                client: c,
                                op,
                                committed_at_call,
                                kind: WaitKind::Plain,
                            },
                            out,
                        );
                    } else {
                        node.waiting.insert(
                            id,
                            Waiting {
                                client: c,
                                op,
                                committed_at_call,
                                kind: WaitKind::Plain,
                            },
                        );
                    }
                }
                Err(e) => {
                    if let ProposeError::NotLeader { leader_hint, .. } = e {
                        self.clients[c as usize].leader_hint = leader_hint;
                    }
                    self.end_failed(c, op, &e);
                }
            },
        }
        self.drive(k)
    }

    /// Registers client `c`'s session through node `k`, with the client's
    /// secret ([`client_secret`]).
    fn register_session(&mut self, c: u64, k: usize) -> Result<(), Failure> {
        if self.clients[c as usize].registering {
            return Ok(());
        }
        let node = &mut self.nodes[k];
        let id = node.next_request;
        node.next_request += 1;
        let core = node.core.as_mut().unwrap();
        let register = EntryKind::Register {
            config: SessionConfig::default(),
            secret: client_secret(c),
        };
        match core.handle_propose_kind(id, register, Vec::new()) {
            Ok(()) => {
                node.waiting.insert(
                    id,
                    Waiting {
                        client: c,
                        op: usize::MAX,
                        committed_at_call: 0,
                        kind: WaitKind::Register,
                    },
                );
                self.clients[c as usize].registering = true;
            }
            Err(e) => {
                if let ProposeError::NotLeader { leader_hint, .. } = e {
                    self.clients[c as usize].leader_hint = leader_hint;
                }
                let next = self.rng.below(20);
                self.schedule(next + 5, Event::ClientStart(c));
            }
        }
        self.drive(k)
    }

    /// Sends session command `r` of client `c` through node `k` (again, if
    /// an earlier try's outcome is unknown: same sequence number).
    fn propose_session(&mut self, c: u64, k: usize, r: Retry) -> Result<(), Failure> {
        let session = self.clients[c as usize].session.expect("registered");
        let node = &mut self.nodes[k];
        let id = node.next_request;
        node.next_request += 1;
        let core = node.core.as_mut().unwrap();
        let kind = EntryKind::SessionCommand {
            session,
            secret: client_secret(c),
            seq: r.seq,
            // One command at a time: every answer below this one was seen.
            low_water: r.seq,
        };
        match core.handle_propose_kind(id, kind, encode_command(r.input, r.key)) {
            Ok(()) => {
                node.waiting.insert(
                    id,
                    Waiting {
                        client: c,
                        op: r.op,
                        committed_at_call: 0,
                        kind: WaitKind::Session(r),
                    },
                );
            }
            Err(e) => {
                if let ProposeError::NotLeader { leader_hint, .. } = e {
                    self.clients[c as usize].leader_hint = leader_hint;
                }
                self.clients[c as usize].retry = Some(r);
                let next = self.rng.below(20);
                self.schedule(next + 5, Event::ClientStart(c));
            }
        }
        self.drive(k)
    }

    /// A request that will get no answer (its node crashed or gave up on
    /// it): a plain write ends unknown; a session command is sent again; a
    /// register is tried again.
    fn abandon(&mut self, w: Waiting) {
        match w.kind {
            WaitKind::Plain => self.finish_op(w, Output::Unknown),
            WaitKind::Session(r) => {
                self.session_retries += 1;
                self.clients[w.client as usize].retry = Some(r);
                let next = self.rng.below(20);
                self.schedule(next + 5, Event::ClientStart(w.client));
            }
            WaitKind::Register => {
                self.clients[w.client as usize].registering = false;
                let next = self.rng.below(20);
                self.schedule(next + 5, Event::ClientStart(w.client));
            }
        }
    }

    /// A proposal that failed: certainly not applied (drop it from the
    /// history) or unknown.
    fn end_failed(&mut self, client: u64, op: usize, e: &ProposeError) {
        let definite = matches!(
            e,
            ProposeError::NotLeader {
                in_flight: false,
                ..
            } | ProposeError::Dropped
                | ProposeError::TooLarge { .. }
                | ProposeError::Removed
        );
        if definite {
            self.history[op].output = Output::Read(None); // marker, removed at the end
            self.history[op].input = Input::Read;
            self.history[op].return_time = 0;
            self.history[op].call_time = u64::MAX; // excluded below
            let next = self.rng.below(20);
            self.schedule(next + 5, Event::ClientStart(client));
        } else {
            self.finish_op(
                Waiting {
                    client,
                    op,
                    committed_at_call: 0,
                    kind: WaitKind::Plain,
                },
                Output::Unknown,
            );
        }
    }

    /// Node `k`'s wall clock: virtual time plus an offset of up to 2 s
    /// fixed per node from the seed (no draw from the run's generator), so
    /// leaders stamp log times that disagree.
    fn wall_clock_ms(&self, k: usize) -> u64 {
        let mut r = Rng::new(self.cfg.seed ^ (self.nodes[k].id << 32));
        1_000_000 + self.now + r.below(2_000)
    }

    /// Whether this run acknowledges a persist that needs no sync at once
    /// when no sync is in flight, as the shell does (`SyncMode::Worker`),
    /// or after a simulated sync latency, as a host's shard does: the
    /// seed's third bit picks.
    fn inline_acks(&self) -> bool {
        (self.cfg.seed >> 2).is_multiple_of(2)
    }

    /// Polls node `k`'s core until it is idle and carries out its actions.
    fn drive(&mut self, k: usize) -> Result<(), Failure> {
        let clock = self.wall_clock_ms(k);
        if let Some(core) = self.nodes[k].core.as_mut() {
            core.set_wall_clock_ms(clock);
        }
        loop {
            let Some(core) = self.nodes[k].core.as_mut() else {
                return Ok(());
            };
            let actions = match core.poll() {
                Ok(actions) => actions,
                Err(e) => return self.io_failed(k, format!("fatal: {e}")),
            };
            if actions.is_empty() {
                return Ok(());
            }
            for a in actions {
                // An injected disk fault may have stopped the node.
                if self.nodes[k].core.is_none() {
                    return Ok(());
                }
                self.execute(k, a)?;
            }
            let node = &mut self.nodes[k];
            if let (Some(n), Some(core)) = (node.persisted_inline.take(), node.core.as_mut()) {
                core.handle_persisted(n);
            }
        }
    }

    fn execute(&mut self, k: usize, action: Action) -> Result<(), Failure> {
        let id = self.nodes[k].id;
        match action {
            Action::Send(msgs) => {
                for mut m in msgs {
                    if m.get_msg_type() == MessageType::MsgSnapshot {
                        let index = m.get_snapshot().get_metadata().index;
                        match read_snapshot(&self.nodes[k].snapshots, index) {
                            Ok(data) => m.mut_snapshot().data = data.into(),
                            Err(_) => {
                                let to = m.to;
                                self.nodes[k]
                                    .core
                                    .as_mut()
                                    .unwrap()
                                    .handle_snapshot_status(to, false);
                                continue;
                            }
                        }
                        let to = m.to;
                        self.nodes[k]
                            .core
                            .as_mut()
                            .unwrap()
                            .handle_snapshot_status(to, true);
                    }
                    self.send(id, m);
                }
            }
            Action::Persist { number, must_sync } => {
                let inline_acks = self.inline_acks();
                let node = &mut self.nodes[k];
                if let Some(acked) = node.acked.as_mut() {
                    acked.note_staged(&node.store);
                }
                let in_order = node.sync_answered >= node.sync_sent
                    || self.cfg.bug == Some(Bug::InlineAckOutOfOrder);
                if inline_acks && !must_sync && in_order {
                    node.persisted_inline = Some(number);
                    return Ok(());
                }
                node.sync_sent = number;
                let latency = 1 + self.rng.below(5);
                let at = (self.now + latency).max(self.nodes[k].last_sync_at);
                self.nodes[k].last_sync_at = at;
                let incarnation = self.nodes[k].incarnation;
                self.schedule(
                    at - self.now,
                    Event::SyncDone {
                        node: id,
                        incarnation,
                        number,
                        must_sync,
                    },
                );
            }
            Action::RestoreSnapshot(snap) => {
                self.snapshots_installed += 1;
                let node = &mut self.nodes[k];
                let meta = snap.get_metadata();
                restore_state(node, &snap.data);
                node.applied = meta.index;
                node.applied_term = meta.term;
                node.conf_state = meta.get_conf_state().clone();
                let index = meta.index;
                // Restored durably at its index, before it counts as
                // applied.
                if self.cfg.disk_state_machine && !(self.sm_append(k, index)? && self.sm_sync(k)?) {
                    return Ok(());
                }
                let node = &mut self.nodes[k];
                node.core.as_mut().unwrap().handle_applied(index);
            }
            Action::Apply(batch) => self.apply(k, batch)?,
            Action::TakeSnapshot { metadata, id } => self.take_snapshot(k, metadata, id)?,
            Action::ProposalFailed { id: req, error } => {
                if let Some(w) = self.nodes[k].waiting.remove(&req) {
                    if let ProposeError::NotLeader { leader_hint, .. } = error {
                        self.clients[w.client as usize].leader_hint = leader_hint;
                    }
                    match w.kind {
                        WaitKind::Plain => self.end_failed(w.client, w.op, &error),
                        _ => self.abandon(w),
                    }
                }
            }
            Action::ReadReady { ids, read_index } => {
                if self.cfg.lease_read {
                    self.lease_reads += ids.len() as u64;
                }
                for req in ids {
                    if let Some(w) = self.nodes[k].waiting.remove(&req) {
                        if read_index < w.committed_at_call {
                            return Err(self.fail(format!(
                                "stale read on node {id}: read index {read_index} is below index {} committed before the read was issued",
                                w.committed_at_call
                            )));
                        }
                        let key = self.history[w.op].key;
                        let v = self.nodes[k].kv.get(&key).copied();
                        self.finish_op(w, Output::Read(v));
                    }
                }
            }
            Action::ReadFailed { ids, .. } => {
                for req in ids {
                    if let Some(w) = self.nodes[k].waiting.remove(&req) {
                        // A failed read has no effect: leave it out.
                        let op = &mut self.history[w.op];
                        op.call_time = u64::MAX;
                        let next = self.rng.below(20);
                        self.schedule(next + 5, Event::ClientStart(w.client));
                    }
                }
            }
            Action::ConfChangeDone { .. }
            | Action::ConfChangeFailed { .. }
            | Action::TransferDone { .. }
            | Action::TransferFailed { .. } => {}
            Action::Event(NodeEvent::LeaderChanged {
                leader: Some(leader),
                term,
            }) => match self.leaders.get(&term) {
                Some(&l) if l != leader => {
                    return Err(self.fail(format!(
                        "two leaders in term {term}: {l} and {leader} (reported by node {id})"
                    )));
                }
                _ => {
                    self.leaders.insert(term, leader);
                }
            },
            Action::Event(_) => {}
        }
        Ok(())
    }

    fn send(&mut self, from: u64, m: Message) {
        let to = m.to;
        if self.cut.contains_key(&(from, to)) || self.rng.chance(self.drop_per_mille) {
            return;
        }
        let copies = if self.rng.chance(self.dup_per_mille) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut delay = 1 + self.rng.below(20);
            if self.rng.below(2) == 0 {
                // Arrive on a 5 ms boundary: several messages land together.
                delay += (5 - (self.now + delay) % 5) % 5;
            }
            self.schedule(delay, Event::Deliver { to, msg: m.clone() });
        }
    }

    fn apply(&mut self, k: usize, batch: raftwork_core::ApplyBatch) -> Result<(), Failure> {
        let id = self.nodes[k].id;
        let Some(last) = batch.entries.last() else {
            return Ok(());
        };
        let (last_index, last_term) = (last.index, last.term);
        let proposals: BTreeMap<u64, RequestId> = batch.proposals.iter().copied().collect();
        if self.cfg.bug == Some(Bug::LocalClockExpiry) {
            let clock = self.wall_clock_ms(k);
            self.nodes[k].sessions.advance_time(clock);
        }
        let before = (self.cfg.bug == Some(Bug::DiskIndexBeforeData))
            .then(|| (self.nodes[k].commands_applied, self.nodes[k].kv.clone()));
        for e in &batch.entries {
            self.check_committed(id, e)?;
            self.applied_entries += 1;
            if e.get_entry_type() != EntryType::EntryNormal {
                continue;
            }
            let node = &mut self.nodes[k];
            // The session table's step first, as every shell runs it.
            let session_cmd = matches!(
                classify(&e.context),
                Some((EntryKind::SessionCommand { .. }, _))
            );
            let step = node.sessions.apply_entry(e.index, &e.context);
            let ok = match step {
                // Already in the on-disk state machine's store; the client
                // that proposed it is long gone (a restart came between).
                Applied::Apply
                    if (session_cmd || is_command(e)) && e.index <= node.skip_through =>
                {
                    None
                }
                Applied::Apply if session_cmd || is_command(e) => {
                    if !session_cmd {
                        node.commands_applied += 1;
                    }
                    let ok = apply_command(&mut node.kv, &e.data);
                    if let Some((EntryKind::SessionCommand { session, seq, .. }, _)) =
                        classify(&e.context)
                    {
                        node.sessions
                            .record(session, seq, vec![u8::from(ok)].into());
                        node.session_commands_applied += 1;
                    }
                    Some(ok)
                }
                Applied::Answer(answer) if self.cfg.bug == Some(Bug::NoDedupe) => {
                    let _ = answer;
                    node.session_commands_applied += 1;
                    Some(apply_command(&mut node.kv, &e.data))
                }
                Applied::Answer(answer) => {
                    self.duplicates_answered += 1;
                    Some(answer.as_ref() == [1])
                }
                Applied::Refuse(err) => {
                    return Err(self.fail(format!(
                        "node {id}: entry {} refused by the session table: {err}",
                        e.index
                    )))
                }
                Applied::Registered(session) => {
                    if let Some(w) = proposals.get(&e.index).and_then(|r| node.waiting.remove(r)) {
                        let client = &mut self.clients[w.client as usize];
                        client.session = Some(session);
                        client.registering = false;
                        let next = self.rng.below(20);
                        self.schedule(next, Event::ClientStart(w.client));
                    }
                    None
                }
                Applied::Apply | Applied::Skip => None,
            };
            let Some(ok) = ok else { continue };
            let node = &mut self.nodes[k];
            if let Some(w) = proposals.get(&e.index).and_then(|r| node.waiting.remove(r)) {
                let out = match self.history[w.op].input {
                    Input::Cas { .. } => Output::Cas(ok),
                    _ => Output::Written,
                };
                self.finish_op(w, out);
            }
        }
        let node = &mut self.nodes[k];
        if let Some(cs) = batch.conf_state {
            node.conf_state = cs;
        }
        node.applied = last_index;
        node.applied_term = last_term;
        if self.cfg.disk_state_machine && last_index > self.nodes[k].skip_through {
            let written = match before {
                Some((commands, kv)) => {
                    let node = &mut self.nodes[k];
                    let now = (
                        std::mem::replace(&mut node.commands_applied, commands),
                        std::mem::replace(&mut node.kv, kv),
                    );
                    let written = self.sm_append(k, last_index)?;
                    let node = &mut self.nodes[k];
                    (node.commands_applied, node.kv) = now;
                    written
                }
                None => self.sm_append(k, last_index)?,
            };
            if !written {
                return Ok(());
            }
        }
        let node = &mut self.nodes[k];
        node.core.as_mut().unwrap().handle_applied(last_index);
        // Every replica holds the same state at the same applied index,
        // having applied each committed command once (on its way back from
        // a restart, an on-disk state machine already holds a later state).
        if last_index >= node.skip_through {
            let commands = self.commands.range(..=last_index).count() as u64;
            let applied = node.commands_applied;
            if applied != commands {
                return Err(self.fail(format!(
                    "node {id} applied {applied} commands up to index {last_index}, but {commands} committed there"
                )));
            }
            let node = &self.nodes[k];
            let mut fp = 0xcbf2_9ce4_8422_2325u64;
            for (key, value) in &node.kv {
                fnv(&mut fp, *key);
                fnv(&mut fp, *value);
            }
            match self.states.get(&last_index) {
                Some(&(other, f)) if f != fp => {
                    return Err(self.fail(format!(
                        "states differ at index {last_index}: node {id} and node {other}"
                    )))
                }
                Some(_) => {}
                None => {
                    self.states.insert(last_index, (id, fp));
                }
            }
        }
        let node = &mut self.nodes[k];
        // Replicas agree on the session table at the same applied index.
        let fp = node.sessions.fingerprint();
        match self.session_tables.get(&last_index) {
            Some(&(other, f)) if f != fp => {
                return Err(self.fail(format!(
                    "session tables differ at index {last_index}: node {id} and node {other}"
                )))
            }
            Some(_) => {}
            None => {
                self.session_tables.insert(last_index, (id, fp));
            }
        }
        Ok(())
    }

    /// The core asked for a snapshot at `metadata` (the applied point, since
    /// actions run in order): write it and report back. The core records it
    /// and compacts through its own persist path.
    fn take_snapshot(
        &mut self,
        k: usize,
        metadata: SnapshotMetadata,
        id: Option<RequestId>,
    ) -> Result<(), Failure> {
        assert_eq!(
            metadata.index, self.nodes[k].applied,
            "snapshot at the applied index"
        );
        if self.cfg.disk_state_machine {
            // The durability point: the store holds the snapshot's index
            // before the log is compacted behind it.
            let index = metadata.index;
            if !(self.sm_append(k, index)? && self.sm_sync(k)?) {
                return Ok(());
            }
        }
        let node = &self.nodes[k];
        let result = write_snapshot(&node.snapshots, &metadata, &encode_state(node))
            .map(|()| metadata)
            .map_err(|e| e.to_string());
        if let Err(e) = &result {
            // As the runtime does: a failed snapshot is retried after the
            // next interval; only a log store failure is fatal.
            if !self.injected(k) {
                return Err(self.fail(format!("node {}: snapshot failed: {e}", node.id)));
            }
        }
        let core = self.nodes[k].core.as_mut().unwrap();
        if let Err(e) = core.handle_snapshot_taken(id, result) {
            return self.io_failed(k, e.to_string());
        }
        Ok(())
    }

    fn check_committed(&mut self, node: u64, e: &Entry) -> Result<(), Failure> {
        if is_command(e) {
            self.commands.insert(e.index);
        }
        if let Some((EntryKind::SessionCommand { session, seq, .. }, _)) = classify(&e.context) {
            self.session_commands.insert(e.index, (session, seq));
        }
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in e.data.iter().chain(e.context.iter()) {
            fnv(&mut h, *b as u64);
        }
        match self.committed.get(&e.index) {
            Some(&(t, hash)) if (t, hash) != (e.term, h) => Err(self.fail(format!(
                "node {node} applied entry {} of term {} but another node applied term {t} there",
                e.index, e.term
            ))),
            Some(_) => Ok(()),
            None => {
                self.committed.insert(e.index, (e.term, h));
                Ok(())
            }
        }
    }

    fn finish(mut self) -> Result<Report, Failure> {
        let mut fs_stats = raftwork_storage::fs::SimFsStats::default();
        for n in &self.nodes {
            let s = n.fs.stats();
            fs_stats.power_cuts += s.power_cuts;
            fs_stats.pages_lost += s.pages_lost;
            fs_stats.torn_writes += s.torn_writes;
            fs_stats.faults_injected += s.faults_injected;
        }
        // Operations still waiting end unknown.
        for k in 0..self.nodes.len() {
            let waiting = std::mem::take(&mut self.nodes[k].waiting);
            for (_, w) in waiting {
                if matches!(w.kind, WaitKind::Register) {
                    continue;
                }
                let op = &mut self.history[w.op];
                op.output = Output::Unknown;
                op.return_time = u64::MAX;
            }
        }
        // Exactly once: every replica applied each committed session command
        // once (its count equals the distinct commands up to its index).
        for node in &self.nodes {
            if node.core.is_none() {
                continue;
            }
            let distinct: BTreeSet<(u64, u64)> = self
                .session_commands
                .range(..=node.applied)
                .map(|(_, &c)| c)
                .collect();
            if distinct.len() as u64 != node.session_commands_applied {
                return Err(Failure {
                    seed: self.cfg.seed,
                    at_ms: self.now,
                    reason: format!(
                        "node {} applied {} session commands up to index {}, but {} distinct ones committed there",
                        node.id,
                        node.session_commands_applied,
                        node.applied,
                        distinct.len()
                    ),
                });
            }
        }
        let history: Vec<Operation> = self
            .history
            .into_iter()
            .filter(|o| o.call_time != u64::MAX)
            // Reads without an answer tell nothing.
            .filter(|o| !(o.input == Input::Read && o.output == Output::Unknown))
            .collect();
        let acknowledged_writes = history
            .iter()
            .filter(|o| matches!(o.output, Output::Written | Output::Cas(_)))
            .count();
        if let Err(v) = raftwork_check::check(&history) {
            let mut of_key: Vec<&Operation> = history.iter().filter(|o| o.key == v.key).collect();
            of_key.sort_by_key(|o| o.call_time);
            let listing: String = of_key
                .iter()
                .take(80)
                .map(|o| {
                    format!(
                        "  client {} {:?} -> {:?} [{}, {}]\n",
                        o.client, o.input, o.output, o.call_time, o.return_time
                    )
                })
                .collect();
            return Err(Failure {
                seed: self.cfg.seed,
                at_ms: self.now,
                reason: format!(
                    "history of {} operations is not linearizable:\n{v}\noperations on key {} by call time:\n{listing}",
                    history.len(),
                    v.key
                ),
            });
        }
        Ok(Report {
            seed: self.cfg.seed,
            trace_hash: self.trace,
            events: self.events,
            operations: history.len(),
            acknowledged_writes,
            crashes: self.crashes,
            applied_entries: self.applied_entries,
            snapshots_installed: self.snapshots_installed,
            transfers: self.transfers,
            membership_changes: self.membership_changes,
            lease_reads: self.lease_reads,
            power_cuts: fs_stats.power_cuts,
            pages_lost: fs_stats.pages_lost,
            torn_writes: fs_stats.torn_writes,
            io_faults: fs_stats.faults_injected,
            recoveries: self.recoveries,
            session_retries: self.session_retries,
            duplicates_answered: self.duplicates_answered,
        })
    }
}

/// Runs `run` for seeds `first..first + count` on two threads; returns
/// the reports and the failures (in no particular order). For many-seed
/// runs of either simulator.
pub fn run_seeds<R: Send>(
    first: u64,
    count: u64,
    run: impl Fn(u64) -> Result<R, Failure> + Sync,
) -> (Vec<R>, Vec<Failure>) {
    let threads = 2;
    let results: Vec<Vec<Result<R, Failure>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let run = &run;
                s.spawn(move || {
                    (first..first + count)
                        .filter(|seed| seed % threads == t)
                        .map(run)
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (mut reports, mut failures) = (Vec::new(), Vec::new());
    for r in results.into_iter().flatten() {
        match r {
            Ok(r) => reports.push(r),
            Err(f) => failures.push(f),
        }
    }
    (reports, failures)
}

/// Runs one simulation.
pub fn run(cfg: &SimConfig) -> Result<Report, Failure> {
    assert!(cfg.nodes >= 1 && cfg.tick_ms >= 1 && cfg.keys >= 1);
    let mut rng = Rng::new(cfg.seed);
    let voters: Vec<u64> = (1..=cfg.nodes).collect();
    let mut nodes = Vec::new();
    for id in 1..=cfg.nodes + cfg.spare_nodes {
        let fs = SimFs::new();
        let (store, snapshots) = open_disk(&fs, cfg.seed).expect("a new simulated disk opens");
        if id <= cfg.nodes {
            raftwork_core::bootstrap(&store, 1, &voters).expect("bootstrap on a simulated disk");
            store.sync().expect("bootstrap syncs");
        }
        nodes.push(Node {
            id,
            tick_ms: cfg.tick_ms,
            incarnation: 0,
            core: None,
            fs,
            store,
            acked: None,
            faults_seen: 0,
            kv: Kv::new(),
            applied: 0,
            applied_term: 0,
            conf_state: ConfState::default(),
            snapshots,
            waiting: BTreeMap::new(),
            next_request: 1,
            last_sync_at: 0,
            sync_sent: 0,
            sync_answered: 0,
            persisted_inline: None,
            sessions: SessionTable::new(SessionConfig::default()),
            session_commands_applied: 0,
            commands_applied: 0,
            skip_through: 0,
            sm_end: 0,
        });
    }
    let clients = (0..cfg.clients)
        .map(|_| Client {
            leader_hint: None,
            session: None,
            registering: false,
            next_seq: 1,
            retry: None,
        })
        .collect();
    let trace = rng.next_u64();
    let seed = cfg.seed;
    let sim = Sim {
        cfg: cfg.clone(),
        rng,
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        nodes,
        clients,
        history: Vec::new(),
        cut: BTreeMap::new(),
        drop_per_mille: if cfg.faults { 20 } else { 0 },
        dup_per_mille: if cfg.faults { 20 } else { 0 },
        next_value: 0,
        committed: BTreeMap::new(),
        leaders: BTreeMap::new(),
        session_tables: BTreeMap::new(),
        states: BTreeMap::new(),
        commands: BTreeSet::new(),
        session_commands: BTreeMap::new(),
        trace,
        events: 0,
        crashes: 0,
        applied_entries: 0,
        snapshots_installed: 0,
        transfers: 0,
        membership_changes: 0,
        lease_reads: 0,
        recoveries: 0,
        session_retries: 0,
        duplicates_answered: 0,
        healed: false,
        logger: slog::Logger::root(slog::Discard, slog::o!()),
    };
    // A panic inside raft-rs or the core is a failure of this seed, not of
    // the whole run.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run())) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into());
            Err(Failure {
                seed,
                at_ms: 0,
                reason: format!("panic: {message}"),
            })
        }
    }
}
