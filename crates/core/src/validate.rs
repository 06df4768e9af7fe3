//! Checks every message from a peer against this node's state before
//! `RawNode::step`, so that nothing a peer sends can reach a `fatal!` or a
//! panic inside raft-rs.
//!
//! raft-rs trusts its peers: it assumes every message was produced by a
//! correct raft-rs node. A message that breaks that assumption (forged,
//! corrupted by a bug, or from an older incarnation of a peer) can stop the
//! node. Each rule below closes one such path; the raft-rs 0.7 code it closes
//! is named beside it. A message that breaks a rule is dropped, counted in
//! [`crate::Status::messages_rejected`] and logged with its sender; the node
//! carries on. No rule ever drops a message a correct peer can send in a state
//! where raft-rs would act on it.
//!
//! | rule | message | raft-rs path it closes |
//! |------|---------|------------------------|
//! | R1 | any: `to` is this node, `from` is not 0, and not this node except on `MsgReadIndex` | a message "from" this node is stepped as its own; a `MsgReadIndex` keeps its requester as `from` when a follower forwards it, so a node's own read can come back to it through a peer (raft-rs then serves it as a local read, which is what it is) |
//! | R2 | any: only types peers send (no `MsgPropose`, `MsgTransferLeader`, local types) | `MsgPropose` with a conf-change entry would make the leader propose it; local types are refused by `RawNode::step` anyway |
//! | R3 | any: term, index, commit, log term and hints below 2^62 | `term + 1` and `index + 1` overflow (a panic in debug builds, a wrap in release) |
//! | R3b | any: term 0 exactly on `MsgReadIndex` (raft-rs sends it without a term, everything else with one) | a term-0 message is stepped as local, and the answer raft-rs builds is fatal in `Raft::send` ("term should be set"); a `MsgReadIndex` with a term is fatal when a follower forwards it |
//! | R4 | any: `request_snapshot` is 0 | raftwork never asks for a snapshot; a forged request reaches `prepare_send_snapshot`, which is fatal on a store error |
//! | R5 | `MsgHeartbeat`: commit ≤ last index | `RaftLog::commit_to` is fatal past the last index (`handle_heartbeat`) |
//! | R6 | `MsgAppend`: entry *i* has index `index + 1 + i`, terms do not decrease, lie within `[log_term, term]`, and are not 0 | `maybe_append` slices `ents[conflict - (idx + 1)..]` and commits `idx + len`; `Unstable::truncate_and_append` is fatal on a gap |
//! | R7 | `MsgAppend`: log term 0 only at index 0 | `RaftLog::term` answers 0 past the last index, so such an append "matches" and appends after a gap |
//! | R8 | `MsgAppend` at or above the commit index: log term ≥ the term of the committed entry | a rejection walks `find_conflict_by_term` below the first index and is fatal on `hint_term == None` |
//! | R9 | `MsgAppend`: every conf-change entry decodes | the core panics on a committed conf change that does not decode |
//! | R10 | `MsgSnapshot`: index and term ≥ 1, term ≤ message term, and a conf state raft can restore | `Raft::restore` is fatal when `confchange::restore` fails or the restored conf state differs |
//! | R10b | `MsgSnapshot` at the commit index: its term is the committed entry's | raft-rs installs a snapshot at the commit index whose term differs (rewriting committed history); the core asserts a restore is ahead of what it applied |
//! | R11 | `MsgReadIndex`: exactly one entry | the leader reads `m.entries[0]` |
//! | R12 | `MsgAppendResponse`: index ≤ last index | progress past the leader's log |
//! | R13 | `MsgReadIndexResp`, `MsgTimeoutNow`: from the known leader of the current term | a forged read index answers a read with a stale index; a forged `MsgTimeoutNow` starts a campaign |
//!
//! The shell adds one rule the core cannot check: a `MsgSnapshot` reaches
//! the core only once its data is in the node's snapshot store under the same
//! metadata (raftwork's runtime, `check_incoming_snapshot`).

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, EntryType, Message,
    MessageType,
};
use raft::{Changer, ProgressTracker, Raft, Storage};

use crate::NodeId;

/// Largest term, index or commit a peer may send. Far above anything a real
/// cluster reaches (2^62 entries at a million a second is 146,000 years), and
/// far enough below `u64::MAX` that raft-rs's `+ 1`s cannot overflow.
pub const WIRE_VALUE_MAX: u64 = 1 << 62;

/// Most ids a snapshot's conf state may list in all. raft-rs rebuilds the
/// configuration one id at a time, so this bounds the work of a check.
pub const CONF_STATE_IDS_MAX: usize = 1024;

/// Why a message from a peer was dropped before raft saw it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejected {
    /// R1: the message is for another node.
    #[error("message for node {to}, not this node")]
    WrongRecipient {
        /// The node it names.
        to: NodeId,
    },
    /// R1: the sender is 0 or this node.
    #[error("message claims to come from node {from}")]
    BadSender {
        /// The sender it names.
        from: NodeId,
    },
    /// R2: a type peers never send to each other.
    #[error("{msg_type:?} is never sent between peers")]
    NotFromPeers {
        /// The message type.
        msg_type: MessageType,
    },
    /// R3: a number no real cluster reaches.
    #[error("{field} {value} is out of range")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// R3b: a term where raft-rs sends none, or none where it sends one.
    #[error("{msg_type:?} with term {term}")]
    BadTerm {
        /// The message type.
        msg_type: MessageType,
        /// Its term.
        term: u64,
    },
    /// R4: a snapshot request (raftwork never asks for one).
    #[error("unsolicited snapshot request")]
    SnapshotRequest,
    /// R5: a heartbeat whose commit index is beyond this node's log.
    #[error("heartbeat commit {commit} is beyond the last index {last_index}")]
    CommitBeyondLog {
        /// The commit index it carries.
        commit: u64,
        /// This node's last log index.
        last_index: u64,
    },
    /// R12: an append acknowledged beyond this leader's log (a stale answer
    /// after this node's log was cut, or a forgery).
    #[error("acknowledged index {index} is beyond the last index {last_index}")]
    AckBeyondLog {
        /// The index acknowledged.
        index: u64,
        /// This node's last log index.
        last_index: u64,
    },
    /// R6, R7: entries that do not form a valid log suffix.
    #[error("append after index {index}: {reason}")]
    BadAppend {
        /// The index the entries follow.
        index: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// R8: the append's log term is older than this node's committed entry.
    #[error("append after index {index} with log term {log_term}, below committed term {committed_term}")]
    LogTermBelowCommitted {
        /// The index the entries follow.
        index: u64,
        /// Its claimed term.
        log_term: u64,
        /// Term of this node's committed entry.
        committed_term: u64,
    },
    /// R9: a conf-change entry that does not decode.
    #[error("conf-change entry {index} does not decode")]
    BadConfChange {
        /// The entry's index.
        index: u64,
    },
    /// R10: a snapshot whose metadata raft cannot install.
    #[error("snapshot at index {index}: {reason}")]
    BadSnapshot {
        /// The snapshot's index.
        index: u64,
        /// What is wrong.
        reason: String,
    },
    /// R11: a read-index request that is not exactly one context.
    #[error("read-index request with {count} entries (want 1)")]
    BadReadIndex {
        /// Entries it carries.
        count: usize,
    },
    /// Shell rule: a snapshot whose data the node does not hold under the
    /// same metadata (streamed, or carried in the message).
    #[error("snapshot at index {index} term {term} without its data")]
    SnapshotDataMissing {
        /// The snapshot's index.
        index: u64,
        /// The snapshot's term.
        term: u64,
    },
    /// R13: a message only the current leader sends, from someone else.
    #[error("{msg_type:?} from node {from} at term {term}, but the leader is {leader} at term {current_term}")]
    NotFromLeader {
        /// The message type.
        msg_type: MessageType,
        /// Its sender.
        from: NodeId,
        /// Its term.
        term: u64,
        /// The leader this node knows (0: none).
        leader: NodeId,
        /// This node's term.
        current_term: u64,
    },
}

/// Checks `m`, from a peer, against the state of `raft` (see the rules in the
/// module docs).
pub(crate) fn check<S: Storage>(raft: &Raft<S>, m: &Message) -> Result<(), Rejected> {
    use MessageType::*;
    let me = raft.id;
    if m.to != me {
        return Err(Rejected::WrongRecipient { to: m.to });
    }
    let msg_type = m.get_msg_type();
    if m.from == 0 || (m.from == me && msg_type != MessageType::MsgReadIndex) {
        return Err(Rejected::BadSender { from: m.from });
    }
    match msg_type {
        MsgAppend
        | MsgAppendResponse
        | MsgRequestVote
        | MsgRequestVoteResponse
        | MsgRequestPreVote
        | MsgRequestPreVoteResponse
        | MsgSnapshot
        | MsgHeartbeat
        | MsgHeartbeatResponse
        | MsgTimeoutNow
        | MsgReadIndex
        | MsgReadIndexResp => {}
        MsgHup | MsgBeat | MsgPropose | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum
        | MsgTransferLeader => return Err(Rejected::NotFromPeers { msg_type }),
    }
    check_range(m)?;
    if (m.term == 0) != (msg_type == MsgReadIndex) {
        return Err(Rejected::BadTerm {
            msg_type,
            term: m.term,
        });
    }
    if m.request_snapshot != 0 {
        return Err(Rejected::SnapshotRequest);
    }
    let last_index = raft.raft_log.last_index();
    match msg_type {
        MsgHeartbeat if m.commit > last_index => Err(Rejected::CommitBeyondLog {
            commit: m.commit,
            last_index,
        }),
        MsgAppend => check_append(raft, m),
        MsgAppendResponse if m.index > last_index => Err(Rejected::AckBeyondLog {
            index: m.index,
            last_index,
        }),
        MsgSnapshot => check_snapshot(raft, m),
        MsgReadIndex if m.entries.len() != 1 => Err(Rejected::BadReadIndex {
            count: m.entries.len(),
        }),
        MsgReadIndexResp | MsgTimeoutNow if m.from != raft.leader_id || m.term != raft.term => {
            Err(Rejected::NotFromLeader {
                msg_type,
                from: m.from,
                term: m.term,
                leader: raft.leader_id,
                current_term: raft.term,
            })
        }
        _ => Ok(()),
    }
}

fn check_range(m: &Message) -> Result<(), Rejected> {
    let snap = m.get_snapshot().get_metadata();
    let fields = [
        ("term", m.term),
        ("index", m.index),
        ("log term", m.log_term),
        ("commit", m.commit),
        ("reject hint", m.reject_hint),
        ("snapshot index", snap.index),
        ("snapshot term", snap.term),
    ];
    for (field, value) in fields {
        if value >= WIRE_VALUE_MAX {
            return Err(Rejected::OutOfRange { field, value });
        }
    }
    Ok(())
}

fn check_append<S: Storage>(raft: &Raft<S>, m: &Message) -> Result<(), Rejected> {
    let bad = |reason| {
        Err(Rejected::BadAppend {
            index: m.index,
            reason,
        })
    };
    if m.log_term == 0 && m.index != 0 {
        return bad("log term 0 after a non-zero index");
    }
    if m.log_term > m.term {
        return bad("log term above the message term");
    }
    let mut prev_term = m.log_term;
    for (i, e) in m.entries.iter().enumerate() {
        if e.index != m.index + 1 + i as u64 {
            return bad("entries do not follow the index one by one");
        }
        if e.term == 0 || e.term < prev_term || e.term > m.term {
            return bad("entry terms must not decrease and lie within [log term, term]");
        }
        prev_term = e.term;
        let decodes = match e.get_entry_type() {
            EntryType::EntryNormal => true,
            EntryType::EntryConfChange => ConfChange::parse_from_bytes(&e.data).is_ok(),
            EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(&e.data).is_ok(),
        };
        if !decodes {
            return Err(Rejected::BadConfChange { index: e.index });
        }
    }
    let committed = raft.raft_log.committed;
    // The committed entry's term is at most this node's term: an append at
    // a log term that high needs no lookup (the common case, a leader
    // appending after an entry of its own term).
    // An append of an older term never reaches raft-rs's log handling (it
    // answers with its own term), and a correct old leader sends such
    // appends after a newer one committed over its tail: only check
    // appends raft-rs will act on.
    if m.index >= committed && m.term >= raft.term && m.log_term < raft.term {
        // Log matching: the committed entry is in every later leader's log,
        // and terms never decrease along a log.
        let committed_term = raft.raft_log.term(committed).unwrap_or(0);
        if m.log_term < committed_term {
            return Err(Rejected::LogTermBelowCommitted {
                index: m.index,
                log_term: m.log_term,
                committed_term,
            });
        }
    }
    Ok(())
}

fn check_snapshot<S: Storage>(raft: &Raft<S>, m: &Message) -> Result<(), Rejected> {
    let meta = m.get_snapshot().get_metadata();
    let bad = |reason: String| {
        Err(Rejected::BadSnapshot {
            index: meta.index,
            reason,
        })
    };
    if meta.index == 0 || meta.term == 0 {
        return bad("index and term must be at least 1".into());
    }
    if meta.term > m.term {
        return bad(format!(
            "term {} above the message term {}",
            meta.term, m.term
        ));
    }
    let committed = raft.raft_log.committed;
    // Below the commit index raft ignores a snapshot; at it, raft would
    // install one whose term differs from the committed entry.
    if meta.index == committed && raft.raft_log.term(committed).ok() != Some(meta.term) {
        return bad(format!(
            "term {} differs from the committed entry's at commit {committed}",
            meta.term
        ));
    }
    if let Err(reason) = check_conf_state(meta.get_conf_state(), meta.index) {
        return bad(reason);
    }
    Ok(())
}

/// Whether raft-rs can restore `cs` exactly: runs the same steps as its
/// private `confchange::restore` on a scratch tracker and compares, as
/// `Raft::restore` does.
fn check_conf_state(cs: &ConfState, index: u64) -> Result<(), String> {
    let ids =
        cs.voters.len() + cs.learners.len() + cs.voters_outgoing.len() + cs.learners_next.len();
    if ids > CONF_STATE_IDS_MAX {
        return Err(format!(
            "conf state lists {ids} ids (most: {CONF_STATE_IDS_MAX})"
        ));
    }
    if cs.voters.is_empty() {
        return Err("conf state without voters".into());
    }
    let all = || {
        cs.voters
            .iter()
            .chain(&cs.learners)
            .chain(&cs.voters_outgoing)
            .chain(&cs.learners_next)
    };
    if all().any(|&id| id == 0) {
        return Err("conf state names node 0".into());
    }
    let single = raft_proto::new_conf_change_single;
    let mut outgoing: Vec<_> = cs
        .voters_outgoing
        .iter()
        .map(|&id| single(id, ConfChangeType::AddNode))
        .collect();
    let mut incoming: Vec<_> = cs
        .voters_outgoing
        .iter()
        .map(|&id| single(id, ConfChangeType::RemoveNode))
        .collect();
    incoming.extend(
        cs.voters
            .iter()
            .map(|&id| single(id, ConfChangeType::AddNode)),
    );
    incoming.extend(
        cs.learners
            .iter()
            .chain(&cs.learners_next)
            .map(|&id| single(id, ConfChangeType::AddLearnerNode)),
    );
    let mut tracker = ProgressTracker::new(1);
    let apply_simple = |tracker: &mut ProgressTracker, cc: ConfChangeSingle| {
        let (conf, changes) = Changer::new(tracker)
            .simple(&[cc])
            .map_err(|e| e.to_string())?;
        tracker.apply_conf(conf, changes, index);
        Ok::<_, String>(())
    };
    if cs.voters_outgoing.is_empty() {
        for cc in incoming.drain(..) {
            apply_simple(&mut tracker, cc)?;
        }
    } else {
        for cc in outgoing.drain(..) {
            apply_simple(&mut tracker, cc)?;
        }
        let (conf, changes) = Changer::new(&tracker)
            .enter_joint(cs.auto_leave, &incoming)
            .map_err(|e| e.to_string())?;
        tracker.apply_conf(conf, changes, index);
    }
    let restored = tracker.conf().to_conf_state();
    if !raft_proto::conf_state_eq(cs, &restored) {
        return Err(format!("conf state {cs:?} does not restore as itself"));
    }
    Ok(())
}
