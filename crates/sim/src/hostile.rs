//! Hostile peers against the core: a three-node cluster of [`Core`]s takes
//! ticks, proposals and its own traffic, interleaved with messages built from
//! fuzzer input, claiming any sender, in whatever state the cluster is in.
//!
//! [`run`] turns any byte string into such a run (bytes past the end read as
//! zeros), so a property test and a coverage-guided fuzzer
//! (`fuzz/fuzz_targets/hostile_core.rs`) drive the same code.
//!
//! Checked after every step, on every node:
//! * nothing panics (raft-rs's `fatal!` is a panic);
//! * the commit index never moves backwards and never passes the last index;
//! * a committed entry never changes its term while the log still holds it.
//!
//! Forged messages that pass validation may still disrupt the cluster (a
//! forged higher term makes a leader step down, for example): that is what
//! peer authentication is for. What no message may do is stop a node or
//! rewrite what it has committed.

use std::collections::{BTreeMap, VecDeque};

use protobuf::Message as _;
use raft::prelude::{
    ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
    SnapshotMetadata,
};
use raftwork_core::{bootstrap, Action, Core, CoreConfig, Role};
use raftwork_storage::MemLogStore;

const IDS: [u64; 3] = [1, 2, 3];

/// Reads fuzzer input; past the end every read is 0.
struct Input<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| (acc << 8) | self.u8() as u64)
    }

    /// True for one byte value in `n`.
    fn one_in(&mut self, n: u8) -> bool {
        self.u8().is_multiple_of(n)
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    /// A value near `base` most of the time, anything at all otherwise.
    fn near(&mut self, base: u64) -> u64 {
        match self.u8() % 32 {
            0 => self.u64(),
            1 => u64::MAX - (self.u8() as u64),
            2 => 1 << 40,
            3 => 0,
            _ => base.saturating_add(self.u8() as u64 % 5).saturating_sub(2),
        }
    }
}

/// What one run did, so tests can check the input reached the rules.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Hostile messages delivered.
    pub hostile_messages: u64,
    /// Of those, how many validation rejected.
    pub rejected: u64,
    /// Rejections by reason (the [`raftwork_core::Rejected`] variant).
    pub reasons: BTreeMap<String, u64>,
    /// Commands the cluster committed along the way.
    pub commits: u64,
}

struct Cluster {
    cores: Vec<Core<MemLogStore>>,
    queue: VecDeque<Message>,
    /// Highest commit index each node reported.
    commit: Vec<u64>,
    /// Term of every committed index each node reported.
    committed_terms: Vec<BTreeMap<u64, u64>>,
    next_request: u64,
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Cluster {
    fn new() -> Self {
        let cores = IDS
            .iter()
            .map(|&id| {
                let store = MemLogStore::new();
                let applied = bootstrap(&store, 1, &IDS).unwrap().unwrap();
                let config = CoreConfig {
                    id,
                    applied_index: applied,
                    fixed_election_ticks: Some(10 + id as usize),
                    ..Default::default()
                };
                Core::new(config, store, &logger()).unwrap()
            })
            .collect();
        Self {
            cores,
            queue: VecDeque::new(),
            commit: vec![0; IDS.len()],
            committed_terms: vec![BTreeMap::new(); IDS.len()],
            next_request: 1,
        }
    }

    /// Polls every core and delivers their messages until quiet.
    fn pump(&mut self) {
        for _ in 0..200 {
            let mut progressed = false;
            for k in 0..self.cores.len() {
                let actions = self.cores[k].poll().expect("the core failed");
                progressed |= !actions.is_empty();
                for a in actions {
                    match a {
                        Action::Send(msgs) => self.queue.extend(msgs),
                        Action::Persist { number, .. } => self.cores[k].handle_persisted(number),
                        Action::Apply(batch) => {
                            if let Some(last) = batch.entries.last() {
                                self.cores[k].handle_applied(last.index);
                            }
                        }
                        Action::RestoreSnapshot(snap) => {
                            self.cores[k].handle_applied(snap.get_metadata().index)
                        }
                        _ => {}
                    }
                }
            }
            // Right after the polls, each store holds everything raft
            // has (a message stepped since could have raft ahead of it).
            self.check();
            while let Some(m) = self.queue.pop_front() {
                progressed = true;
                if let Some(c) = self.cores.iter_mut().find(|c| c.id() == m.to) {
                    // Traffic between correct cores; stale answers may be
                    // rejected, which is fine here.
                    let _ = c.handle_message(m);
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn check(&mut self) {
        for k in 0..self.cores.len() {
            let status = self.cores[k].status();
            let id = status.id;
            assert!(
                status.commit_index >= self.commit[k],
                "node {id}: commit went back from {} to {}",
                self.commit[k],
                status.commit_index
            );
            assert!(
                status.commit_index <= status.last_index,
                "node {id}: commit {} past last index {}",
                status.commit_index,
                status.last_index
            );
            let store = self.cores[k].store();
            let first = raft::Storage::first_index(store).unwrap_or(1);
            let last = raft::Storage::last_index(store).unwrap_or(0);
            // Only what the log holds (a snapshot may have moved the commit
            // index far ahead).
            let from = (self.commit[k] + 1).max(first);
            for index in from..=status.commit_index.min(last) {
                if let Ok(term) = raft::Storage::term(store, index) {
                    self.committed_terms[k].insert(index, term);
                }
            }
            self.commit[k] = status.commit_index;
            // Entries still in the log keep the term they committed with.
            for (&index, &term) in self.committed_terms[k].range(first..) {
                if let Ok(now) = raft::Storage::term(store, index) {
                    assert_eq!(
                        now, term,
                        "node {id}: committed entry {index} changed term {term} -> {now}"
                    );
                }
            }
        }
    }

    fn leader(&self) -> Option<usize> {
        (0..self.cores.len()).find(|&k| self.cores[k].role() == Role::Leader)
    }
}

/// Builds one hostile message for `target` from the input, its numbers
/// mostly near the target's own (so they reach the rules past the range
/// checks).
fn hostile_message(input: &mut Input<'_>, target: &Core<MemLogStore>) -> Message {
    use MessageType::*;
    const TYPES: [MessageType; 19] = [
        MsgHup,
        MsgBeat,
        MsgPropose,
        MsgAppend,
        MsgAppendResponse,
        MsgRequestVote,
        MsgRequestVoteResponse,
        MsgSnapshot,
        MsgHeartbeat,
        MsgHeartbeatResponse,
        MsgUnreachable,
        MsgSnapStatus,
        MsgCheckQuorum,
        MsgTransferLeader,
        MsgTimeoutNow,
        MsgReadIndex,
        MsgReadIndexResp,
        MsgRequestPreVote,
        MsgRequestPreVoteResponse,
    ];
    let status = target.status();
    let mut m = Message::default();
    // Mostly the types peers send, so the input reaches the later rules.
    const PEER_TYPES: [MessageType; 12] = [
        MsgAppend,
        MsgAppendResponse,
        MsgRequestVote,
        MsgRequestVoteResponse,
        MsgSnapshot,
        MsgHeartbeat,
        MsgHeartbeatResponse,
        MsgTimeoutNow,
        MsgReadIndex,
        MsgReadIndexResp,
        MsgRequestPreVote,
        MsgRequestPreVoteResponse,
    ];
    let pick = input.u8() as usize;
    m.set_msg_type(match pick % 8 {
        0 => TYPES[(pick / 8) % TYPES.len()],
        _ => PEER_TYPES[(pick / 8) % PEER_TYPES.len()],
    });
    m.to = match input.u8() % 16 {
        0 => input.u64(),
        _ => status.id,
    };
    m.from = match input.u8() % 16 {
        0 => 0,
        1 => 99,
        2 => input.u64(),
        3 => status.id,
        k => IDS[(status.id as usize + k as usize % 2) % 3],
    };
    m.term = input.near(status.term);
    m.log_term = input.near(status.term);
    m.index = input.near(status.commit_index);
    m.commit = input.near(status.last_index);
    m.reject = input.one_in(4);
    m.reject_hint = input.near(status.last_index);
    if input.one_in(16) {
        m.request_snapshot = input.near(status.last_index);
    }
    let entries = input.u8() % 5;
    let first = match input.u8() % 4 {
        0 => input.near(m.index),
        _ => m.index.wrapping_add(1),
    };
    for i in 0..entries as u64 {
        let index = match input.u8() % 8 {
            0 => input.u64(),
            _ => first.wrapping_add(i),
        };
        let mut e = Entry {
            index,
            term: input.near(m.log_term),
            ..Default::default()
        };
        match input.u8() % 6 {
            0 => {
                e.set_entry_type(EntryType::EntryConfChangeV2);
                e.data = match input.u8() % 2 {
                    0 => vec![0xff, input.u8(), input.u8()].into(),
                    _ => conf_change(input).write_to_bytes().unwrap().into(),
                };
            }
            1 => {
                e.set_entry_type(EntryType::EntryConfChange);
                e.data = vec![input.u8(); input.u8() as usize % 8].into();
            }
            _ => e.data = vec![input.u8(); input.u8() as usize % 8].into(),
        }
        m.entries.push(e);
    }
    if m.get_msg_type() == MsgSnapshot || input.one_in(8) {
        let mut snap = Snapshot::default();
        let meta = SnapshotMetadata {
            index: input.near(status.commit_index),
            term: input.near(status.term),
            conf_state: Some(conf_state(input)).into(),
            ..Default::default()
        };
        snap.set_metadata(meta);
        m.set_snapshot(snap);
    }
    if input.one_in(4) {
        m.context = vec![input.u8(); 8].into();
    }
    m
}

fn ids(input: &mut Input<'_>) -> Vec<u64> {
    let n = input.u8() % 4;
    (0..n)
        .map(|_| match input.u8() % 8 {
            0 => 0,
            1 => 99,
            k => IDS[k as usize % 3],
        })
        .collect()
}

fn conf_state(input: &mut Input<'_>) -> ConfState {
    ConfState {
        voters: ids(input),
        learners: ids(input),
        voters_outgoing: if input.one_in(4) {
            ids(input)
        } else {
            Vec::new()
        },
        learners_next: if input.one_in(8) {
            ids(input)
        } else {
            Vec::new()
        },
        auto_leave: input.one_in(2),
        ..Default::default()
    }
}

fn conf_change(input: &mut Input<'_>) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    for id in ids(input) {
        let change_type = match input.u8() % 3 {
            0 => ConfChangeType::AddNode,
            1 => ConfChangeType::RemoveNode,
            _ => ConfChangeType::AddLearnerNode,
        };
        cc.changes
            .push(raft_proto::new_conf_change_single(id, change_type));
    }
    cc
}

/// Runs the cluster on `input` (see the module docs). Panics when a node
/// panics or an invariant breaks.
pub fn run(input: &[u8]) -> Summary {
    let mut input = Input {
        bytes: input,
        at: 0,
    };
    let mut cluster = Cluster::new();
    let mut summary = Summary::default();
    // RAFTWORK_HOSTILE_TRACE=1 prints every hostile message and its verdict
    // (for reading a failing case).
    let trace = std::env::var_os("RAFTWORK_HOSTILE_TRACE").is_some();
    // A leader and some committed entries first, so attacks meet real state.
    for _ in 0..40 {
        for c in &mut cluster.cores {
            c.handle_tick();
        }
        cluster.pump();
    }
    // Each step costs at least one byte, so every run ends.
    for _ in 0..4096 {
        if input.done() {
            break;
        }
        match input.u8() % 8 {
            0 | 1 => {
                for _ in 0..1 + input.u8() % 4 {
                    for c in &mut cluster.cores {
                        c.handle_tick();
                    }
                    cluster.pump();
                }
            }
            2 => {
                if let Some(k) = cluster.leader() {
                    let id = cluster.next_request;
                    cluster.next_request += 1;
                    if cluster.cores[k]
                        .handle_propose(id, vec![input.u8()])
                        .is_ok()
                    {
                        summary.commits += 1;
                    }
                    cluster.pump();
                }
            }
            _ => {
                let k = input.u8() as usize % cluster.cores.len();
                let m = hostile_message(&mut input, &cluster.cores[k]);
                summary.hostile_messages += 1;
                if trace {
                    eprintln!("to node {}: {m:?}", cluster.cores[k].id());
                }
                let verdict = cluster.cores[k].handle_message(m);
                if trace {
                    eprintln!("  -> {verdict:?}; status {:?}", cluster.cores[k].status());
                }
                if let Err(r) = verdict {
                    summary.rejected += 1;
                    let debug = format!("{r:?}");
                    let variant = debug.split([' ', '{', '(']).next().unwrap_or_default();
                    *summary.reasons.entry(variant.to_string()).or_default() += 1;
                }
                cluster.pump();
            }
        }
    }
    summary
}
