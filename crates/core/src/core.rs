//! [`Core`]: the event-driven state machine around `raft::RawNode`.
//!
//! Methods come in three groups, as in quinn-proto: getters (`status`,
//! `role`), `handle_*` (events in) and [`Core::poll`] (actions out).
//!
//! Invariants (asserted):
//! * pending proposals are kept in log-index order; each is resolved exactly
//!   once: applied, failed on loss of leadership, or failed on shutdown;
//! * entries are handed out for applying in index order with no gap
//!   (`dispatched_index` only grows by one entry at a time);
//! * a read is answered only after every entry up to its read index has been
//!   handed out for applying, so the shell's apply queue serves it after them.

use std::collections::VecDeque;

use bytes::Bytes;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState,
    Entry, EntryType, Message, MessageType, Snapshot, SnapshotMetadata,
};
use raft::{GetEntriesContext, RawNode, StateRole, CAMPAIGN_TRANSFER};
use raftwork_storage::{LogStore, WriteBatch};

use crate::config::CoreConfig;
use crate::error::{ConfChangeError, FatalError, ProposeError, ReadError, TransferError};
use crate::lease::{lease_context, parse_lease_context, Lease};
use crate::validate::{self, Rejected};
use crate::NodeId;

/// Id the shell gives each request (proposal, read, conf change, transfer) so
/// that it can match the core's replies. Unique per node run.
pub type RequestId = u64;

/// The role of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Leads the group.
    Leader,
    /// Follows a leader (or waits for one).
    Follower,
    /// Campaigning.
    Candidate,
    /// Checking with pre-vote whether a campaign could win.
    PreCandidate,
    /// A non-voting member.
    Learner,
}

/// A point-in-time view of this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// This node's id.
    pub id: NodeId,
    /// Current role.
    pub role: Role,
    /// Current term.
    pub term: u64,
    /// Known leader, if any.
    pub leader: Option<NodeId>,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index the state machine has applied.
    pub applied_index: u64,
    /// Last index in the log.
    pub last_index: u64,
    /// Index of the newest snapshot point (0 if none).
    pub snapshot_index: u64,
    /// Voting members (in a joint configuration: the incoming voters).
    pub voters: Vec<NodeId>,
    /// Non-voting members.
    pub learners: Vec<NodeId>,
    /// Messages from peers dropped by validation since this node started.
    pub messages_rejected: u64,
    /// This node applied its own removal and has not been added back.
    pub removed: bool,
    /// On a leader: how far each other member's log is known to match
    /// its own, `(id, match index)` sorted by id; empty elsewhere.
    pub followers_matched: Vec<(NodeId, u64)>,
    /// The shell stopped ticking this member until something happens
    /// ([`Core::try_hibernate`]).
    pub hibernating: bool,
}

/// A membership change request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a voting member.
    AddVoter(NodeId),
    /// Add a non-voting member.
    AddLearner(NodeId),
    /// Make a learner a voter. Refused until it has caught up.
    PromoteLearner(NodeId),
    /// Remove a member (the leader itself included).
    Remove(NodeId),
}

impl MembershipChange {
    /// The node the change is about.
    pub fn node_id(&self) -> NodeId {
        match *self {
            Self::AddVoter(id)
            | Self::AddLearner(id)
            | Self::PromoteLearner(id)
            | Self::Remove(id) => id,
        }
    }
}

/// Something observers may want to know about.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeEvent {
    /// The known leader changed (`None`: no leader known).
    LeaderChanged {
        /// The new leader.
        leader: Option<NodeId>,
        /// The term it leads.
        term: u64,
    },
    /// A membership change was applied.
    MembershipChanged {
        /// Membership after the change.
        conf_state: ConfState,
        /// Raw changes of this step (empty when leaving a joint state).
        changes: Vec<ConfChangeSingle>,
        /// The opaque context proposed with the change.
        context: Bytes,
    },
    /// This node applied its own removal. A node removed and added back
    /// under its id replays that removal, then the re-add (a
    /// `MembershipChanged` naming it again), after which it is a member.
    Removed,
    /// A note from peer `from` (raftwork's shell, `Node::send_note`): a small
    /// application message carried over the peer transport, so it is as
    /// authenticated as the transport is (with mutual TLS bound to node
    /// names, `from` is proven).
    Note {
        /// The peer that sent it.
        from: NodeId,
        /// What it sent.
        data: Bytes,
    },
}

/// Committed entries to apply, in order.
#[derive(Debug, Default)]
pub struct ApplyBatch {
    /// The entries. Only `EntryNormal` entries with data are commands for the
    /// state machine; the rest only move the applied index.
    pub entries: Vec<Entry>,
    /// `(index, request)` of the local proposals among them, in index order.
    pub proposals: Vec<(u64, RequestId)>,
    /// Raft's conf state after the batch, if a conf change in it changed it.
    /// A snapshot taken after the batch records this conf state.
    pub conf_state: Option<ConfState>,
}

/// What the shell must do. The set is closed: every variant must be handled.
#[derive(Debug)]
#[must_use]
pub enum Action {
    /// Send these messages (any order between peers; in order per peer).
    Send(Vec<Message>),
    /// The store holds ready `number` staged: make it durable (sync only if
    /// `must_sync`), then call [`Core::handle_persisted`] with `number`.
    /// Persists must complete in `number` order.
    Persist {
        /// Ready number to report back.
        number: u64,
        /// Whether raft needs an fsync (false when only the commit index moved).
        must_sync: bool,
    },
    /// Restore the state machine from this snapshot before applying anything
    /// after it.
    RestoreSnapshot(Snapshot),
    /// Write a snapshot of the state machine into the snapshot store, taken
    /// once everything before this action in the apply order is applied
    /// (the state machine is then exactly at `metadata.index`), then report
    /// it with [`Core::handle_snapshot_taken`]. The core records it in the
    /// log and compacts behind it through the ordinary persist path: the
    /// shell never writes the log itself.
    TakeSnapshot {
        /// The snapshot point: the applied index, its term, the conf state.
        metadata: SnapshotMetadata,
        /// The manual request it answers ([`Core::handle_snapshot_request`]),
        /// if any.
        id: Option<RequestId>,
    },
    /// Apply committed entries, then report the last index with
    /// [`Core::handle_applied`].
    Apply(ApplyBatch),
    /// A proposal failed.
    ProposalFailed {
        /// The request.
        id: RequestId,
        /// Why.
        error: ProposeError,
    },
    /// These reads may be served once everything before this action in the
    /// apply order has been applied (their read index is covered).
    ReadReady {
        /// The reads.
        ids: Vec<RequestId>,
        /// Their read index.
        read_index: u64,
    },
    /// These reads failed.
    ReadFailed {
        /// The reads.
        ids: Vec<RequestId>,
        /// Why.
        error: ReadError,
    },
    /// A membership change was applied.
    ConfChangeDone {
        /// The request.
        id: RequestId,
        /// Membership after the change.
        conf_state: ConfState,
    },
    /// A membership change failed.
    ConfChangeFailed {
        /// The request.
        id: RequestId,
        /// Why.
        error: ConfChangeError,
    },
    /// A leadership transfer completed.
    TransferDone {
        /// The request.
        id: RequestId,
    },
    /// A leadership transfer failed.
    TransferFailed {
        /// The request.
        id: RequestId,
        /// Why.
        error: TransferError,
    },
    /// Tell observers.
    Event(NodeEvent),
}

struct Pending {
    index: u64,
    term: u64,
    id: RequestId,
    /// Tick at which the request entered the log.
    tick: u64,
}

struct ReadBatch {
    ids: Vec<RequestId>,
    /// Contexts of every read-index request sent for this batch; any answer works.
    contexts: Vec<u64>,
    /// Tick at which the batch's oldest read arrived.
    started_tick: u64,
    /// Tick of the last request sent.
    sent_tick: u64,
}

struct Transfer {
    id: RequestId,
    to: NodeId,
    deadline_tick: u64,
}

/// Context of an entry that carries a user command, format version 1 (no
/// log time; written by earlier versions, still read).
///
/// Entry format: an `EntryNormal` whose `context` is [`COMMAND_CONTEXT`]
/// or a stamped context holds one user command in `data` (possibly empty).
/// Every other `EntryNormal` (the empty entry a new leader appends) is
/// raft's own and never reaches the state machine.
pub const COMMAND_CONTEXT: &[u8] = &[0x01];

/// First byte of a stamped command context (format version 2):
///
/// ```text
/// +------+-----------------+
/// | 0x02 | log_time_ms u64 |   the leader's wall clock when it proposed,
/// +------+-----------------+   never earlier than any stamp before it in
///                              its log (little-endian)
/// ```
pub const STAMPED_COMMAND_TAG: u8 = 0x02;

fn stamped_context(log_time_ms: u64) -> Bytes {
    let c = crate::session::entry_context(crate::session::EntryKind::Command, log_time_ms);
    debug_assert_eq!(c[0], STAMPED_COMMAND_TAG);
    c.into()
}

/// True if `entry` carries a plain user command for the state machine
/// (session entries are for the session table's apply step first).
pub fn is_command(entry: &Entry) -> bool {
    entry.get_entry_type() == EntryType::EntryNormal
        && (entry.context.as_ref() == COMMAND_CONTEXT
            || matches!(
                crate::session::classify(&entry.context),
                Some((crate::session::EntryKind::Command, _))
            ))
}

/// The log time a leader stamped on an entry (`None` for entries without
/// one; the formats are in `session.rs`). Every replica reads the same
/// stamps in the same order, so state derived from them (session expiry)
/// agrees everywhere; apply it as a running maximum, since a log may hold
/// older unstamped entries.
pub fn entry_log_time_ms(entry: &Entry) -> Option<u64> {
    if entry.get_entry_type() != EntryType::EntryNormal {
        return None;
    }
    crate::session::classify(&entry.context).map(|(_, t)| t)
}

/// A ReadIndex context: who asks, in which run, and which request.
///
/// ```text
/// +-----------+-----------------+-------------+
/// | node u64  | incarnation u64 | counter u64 |   big-endian, 24 bytes
/// +-----------+-----------------+-------------+
/// ```
///
/// raft-rs keys a leader's pending reads by context, so two followers must
/// never send the same one (the second would be dropped as a duplicate),
/// and an answer to an earlier run's request must not match this run's.
fn read_context(id: NodeId, incarnation: u64, counter: u64) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[..8].copy_from_slice(&id.to_be_bytes());
    ctx[8..16].copy_from_slice(&incarnation.to_be_bytes());
    ctx[16..].copy_from_slice(&counter.to_be_bytes());
    ctx
}

/// The counter of a context [`read_context`] made for this node and run.
fn parse_read_context(id: NodeId, incarnation: u64, ctx: &[u8]) -> Option<u64> {
    let ctx: &[u8; 24] = ctx.try_into().ok()?;
    let prefix = read_context(id, incarnation, 0);
    (ctx[..16] == prefix[..16]).then(|| u64::from_be_bytes(ctx[16..].try_into().unwrap()))
}

/// Most read-index requests re-sent for one batch; past it the batch waits
/// for an answer or its timeout without sending more.
const READ_CONTEXTS_PER_BATCH_MAX: usize = 64;

/// The sans-IO core of one Raft group member.
pub struct Core<S: LogStore> {
    raw: RawNode<S>,
    logger: slog::Logger,
    config: CoreConfig,
    tick_count: u64,
    /// When this node last stopped leading.
    stepped_down_tick: u64,

    /// Proposals validated but not yet stepped into raft (flushed as one
    /// `MsgPropose` per poll, so a burst becomes one append).
    proposal_queue: Vec<(RequestId, Vec<u8>, crate::session::EntryKind)>,
    proposals: VecDeque<Pending>,
    conf_changes: VecDeque<Pending>,
    /// Conf changes committed and applied to raft, answered once the shell
    /// reports their index applied: `(index, request, membership)`.
    conf_changes_applying: VecDeque<(u64, RequestId, ConfState)>,

    reads_waiting: Vec<RequestId>,
    reads_waiting_since_tick: u64,
    read_inflight: Option<ReadBatch>,
    /// Batches confirmed by a quorum, waiting for their index to be dispatched.
    /// `(read index, reads, tick the oldest arrived)`.
    reads_confirmed: VecDeque<(u64, Vec<RequestId>, u64)>,
    next_read_context: u64,

    transfer: Option<Transfer>,

    leader_id: NodeId,
    raft_state: StateRole,
    term: u64,
    /// Whether this leader has committed an entry of its own term (raft-rs
    /// drops read-index requests until then).
    leader_committed_in_term: bool,

    /// Last index handed out in an `Apply` (or restored by a snapshot).
    dispatched_index: u64,
    /// Last index the shell reported applied.
    applied_index: u64,
    /// Messages that may go out only once their ready is durable.
    persisted_messages: VecDeque<(u64, Vec<Message>)>,
    /// Whether this node has been a member (a joining node replays the
    /// membership history from before it was added).
    was_member: bool,
    removed: bool,
    /// This node is the only voter and should campaign as soon as raft has
    /// applied everything committed.
    sole_voter_campaign: bool,
    /// Peer messages dropped by validation.
    messages_rejected: u64,
    /// Entries handed out for applying since the last snapshot was asked for.
    entries_since_snapshot: u64,
    /// An automatic snapshot is being taken (one at a time).
    snapshot_taking: bool,
    /// Number of the last ready (persists of the core's own log writes,
    /// such as snapshot records, reuse it).
    last_ready_number: u64,
    /// The shell's wall clock, in ms since the Unix epoch
    /// ([`Core::set_wall_clock_ms`]); the only time the core stamps.
    wall_clock_ms: u64,
    /// The latest stamp this node has seen in its log (or made).
    log_time_ms: u64,
    /// A leader's lease in lease-read mode (see `lease.rs`).
    lease: Option<Lease>,
    /// Lease-mode answers held until the lease or a later heartbeat round
    /// confirms them, oldest first.
    held_reads: VecDeque<HeldRead>,
    actions: Vec<Action>,
    /// Consecutive ticks at which [`Core::quiescent`] held with no activity
    /// in between (see "hibernation" below).
    quiet_ticks: u64,
    /// The shell stopped ticking this member ([`Core::try_hibernate`]).
    hibernating: bool,
    /// The leader this member last heard an append, heartbeat or snapshot
    /// from in the current term (0: none since it last learned that the
    /// leader's host changed). A follower sleeps only under a leader it
    /// has heard.
    leader_heard: NodeId,
}

/// A read answer raft-rs gave in lease mode, held until confirmed.
struct HeldRead {
    /// Lease round when raft answered: rounds after it confirm the read.
    capture: u64,
    /// Tick it was held at (held answers expire like reads do).
    held_tick: u64,
    what: Held,
}

enum Held {
    /// This leader's own reads, at this read index.
    Local {
        index: u64,
        ids: Vec<RequestId>,
        started_tick: u64,
    },
    /// A `MsgReadIndexResp` to a follower.
    Forwarded(Message),
}

impl<S: LogStore> Core<S> {
    /// Starts the core on `store` (which holds the durable state of an earlier
    /// run, or a bootstrapped or empty log).
    pub fn new(config: CoreConfig, store: S, logger: &slog::Logger) -> Result<Self, FatalError> {
        config
            .validate()
            .map_err(|e| FatalError::Raft(raft::Error::ConfigInvalid(e.0)))?;
        let raw = RawNode::new(&config.to_raft(), store, logger)?;
        let applied = config.applied_index;
        let term = raw.raft.term;
        let me = config.id;
        let cs = raw.raft.prs().conf().to_conf_state();
        let was_member = cs.voters.contains(&me) || cs.learners.contains(&me);
        // The only voter: no one else can win, so skip the election timeout.
        // raft-rs refuses to campaign while committed conf changes are
        // unapplied (a restart replaying its log), and checks by reading every
        // unapplied entry; so campaign once the replay is done (`poll`).
        let sole_voter_campaign = cs.voters == [me] && cs.voters_outgoing.is_empty();
        Ok(Self {
            raw,
            logger: logger.clone(),
            config,
            tick_count: 0,
            stepped_down_tick: 0,
            proposal_queue: Vec::new(),
            proposals: VecDeque::new(),
            conf_changes: VecDeque::new(),
            conf_changes_applying: VecDeque::new(),
            reads_waiting: Vec::new(),
            reads_waiting_since_tick: 0,
            read_inflight: None,
            reads_confirmed: VecDeque::new(),
            next_read_context: 1,
            transfer: None,
            leader_id: 0,
            raft_state: StateRole::Follower,
            term,
            leader_committed_in_term: false,
            dispatched_index: applied,
            applied_index: applied,
            persisted_messages: VecDeque::new(),
            was_member,
            removed: false,
            sole_voter_campaign,
            messages_rejected: 0,
            entries_since_snapshot: 0,
            snapshot_taking: false,
            last_ready_number: 0,
            wall_clock_ms: 0,
            log_time_ms: 0,
            lease: None,
            held_reads: VecDeque::new(),
            actions: Vec::new(),
            quiet_ticks: 0,
            hibernating: false,
            leader_heard: 0,
        })
    }

    // ----- getters -----

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The group id carried on envelopes.
    pub fn group_id(&self) -> u64 {
        self.config.group_id
    }

    /// The configuration in force.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// Current role.
    pub fn role(&self) -> Role {
        let conf = self.raw.raft.prs().conf();
        if conf.learners().contains(&self.config.id) && self.raft_state == StateRole::Follower {
            return Role::Learner;
        }
        match self.raw.raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
        }
    }

    /// Known leader.
    pub fn leader(&self) -> Option<NodeId> {
        (self.raw.raft.leader_id != 0).then_some(self.raw.raft.leader_id)
    }

    /// Whether this node applied its own removal, and no re-add since.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// The log store (shared handle).
    pub fn store(&self) -> &S {
        self.raw.store()
    }

    /// Current membership.
    pub fn conf_state(&self) -> ConfState {
        self.raw.raft.prs().conf().to_conf_state()
    }

    /// A point-in-time view.
    pub fn status(&self) -> Status {
        let raft = &self.raw.raft;
        let cs = self.conf_state();
        let snapshot_index = raft.raft_log.first_index().saturating_sub(1);
        Status {
            id: self.config.id,
            role: self.role(),
            term: raft.term,
            leader: self.leader(),
            commit_index: raft.raft_log.committed,
            applied_index: self.applied_index,
            last_index: raft.raft_log.last_index(),
            snapshot_index,
            voters: cs.voters,
            learners: cs.learners,
            messages_rejected: self.messages_rejected,
            removed: self.removed,
            followers_matched: if raft.state == StateRole::Leader {
                let mut m: Vec<(NodeId, u64)> = raft
                    .prs()
                    .iter()
                    .filter(|(&id, _)| id != self.config.id)
                    .map(|(&id, p)| (id, p.matched))
                    .collect();
                m.sort_unstable();
                m
            } else {
                Vec::new()
            },
            hibernating: self.hibernating,
        }
    }

    /// Last index in raft's log (staged entries included).
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// Ticks elapsed since start (the core's only notion of time).
    pub fn tick_count(&self) -> u64 {
        self.tick_count
    }

    // ----- hibernation -----
    //
    // A member with nothing to do may stop being ticked, so that thousands
    // of idle groups on a host cost no CPU (TiKV's hibernate regions). The
    // core decides; the shell carries it out (stops ticking, and watches
    // the leader's host for a follower).
    //
    // * Quiet: `quiescent()` held at `hibernate_after_ticks` ticks in a
    //   row with no activity between them. Activity is anything but a tick
    //   or a heartbeat answer: a proposal, read, membership change,
    //   transfer or snapshot request, any other peer message, an
    //   unreachable report. Activity wakes a hibernating member.
    // * A leader is quiescent when every member's log matches its last
    //   index, every member has said (in its last answer) that it knows
    //   all of it committed, and everything is committed, persisted and
    //   applied here, with nothing waiting. So a follower never waits for
    //   a commit its sleeping leader would only tell with a heartbeat.
    // * A follower is quiescent when it heard its leader in this term and
    //   has applied everything it knows committed, with nothing waiting.
    //   Its leader's heartbeats are activity, so it falls asleep only
    //   `hibernate_after_ticks` (< election_ticks - 1) ticks after the
    //   leader's last one: before its election timer could fire. It sleeps
    //   only while its leader's host is alive (the shell knows that); when
    //   that host dies or restarts, the shell calls
    //   `handle_leader_host_changed`, and the follower does not sleep again
    //   before it hears a leader, so an election follows if none speaks.
    // * Safety never depends on ticks. The lease does: a sleeping leader's
    //   tick count stops while real time goes on, so hibernating expires
    //   the lease and reads after waking wait for a fresh heartbeat round.

    /// Nothing is in flight and nothing waits (see the section above).
    fn quiescent(&self) -> bool {
        let raft = &self.raw.raft;
        let log = &raft.raft_log;
        let last = log.last_index();
        let settled = self.proposal_queue.is_empty()
            && self.proposals.is_empty()
            && self.conf_changes.is_empty()
            && self.conf_changes_applying.is_empty()
            && self.reads_waiting.is_empty()
            && self.read_inflight.is_none()
            && self.reads_confirmed.is_empty()
            && self.held_reads.is_empty()
            && self.transfer.is_none()
            && self.persisted_messages.is_empty()
            && !self.snapshot_taking
            && !self.sole_voter_campaign
            && !self.removed
            && log.persisted == last
            && log.committed == last
            && self.dispatched_index == last
            && self.applied_index == last
            && !raft.has_pending_conf()
            && raft.pending_read_count() == 0
            && raft.ready_read_count() == 0;
        settled
            && match raft.state {
                StateRole::Leader => {
                    self.leader_committed_in_term
                        && raft.lead_transferee.is_none()
                        // Every member has the log and knows it is
                        // committed (with lazy commit broadcast, a
                        // follower learns that from a heartbeat; its
                        // answers say so): none waits on a commit.
                        && raft
                            .prs()
                            .iter()
                            .all(|(_, p)| p.matched == last && p.committed_index == last)
                }
                StateRole::Follower => raft.leader_id != 0 && self.leader_heard == raft.leader_id,
                _ => false,
            }
    }

    /// Puts this member to sleep if it has been quiet long enough: returns
    /// true if it hibernates (or already did), and the shell stops ticking
    /// it until an event wakes it ([`Core::is_hibernating`] turns false).
    /// `leader_host_alive`: a follower's leader's host answers the shell's
    /// liveness checks (a follower sleeps only then).
    pub fn try_hibernate(&mut self, leader_host_alive: bool) -> bool {
        if self.hibernating {
            return true;
        }
        let after = self.config.hibernate_after_ticks;
        if after == 0 || self.quiet_ticks < after || !self.quiescent() {
            return false;
        }
        if self.raw.raft.state != StateRole::Leader && !leader_host_alive {
            return false;
        }
        self.hibernating = true;
        self.quiet_ticks = 0;
        // Frozen ticks vouch for nothing.
        self.expire_lease();
        true
    }

    /// Consecutive quiet ticks so far (the shell asks a sleeping follower's
    /// leader's host only once these reach `hibernate_after_ticks`).
    pub fn quiet_ticks(&self) -> u64 {
        self.quiet_ticks
    }

    /// Whether this member is asleep (the shell does not tick it).
    pub fn is_hibernating(&self) -> bool {
        self.hibernating
    }

    /// Activity: wakes a sleeping member and restarts the quiet count.
    fn wake(&mut self) {
        self.hibernating = false;
        self.quiet_ticks = 0;
    }

    /// The shell saw this member's leader's host die or restart (or stop
    /// leading some group): wake up, and sleep again only after hearing a
    /// leader, so that a leader that is gone is replaced by an election.
    pub fn handle_leader_host_changed(&mut self) {
        self.wake();
        self.leader_heard = 0;
    }

    // ----- events in -----

    /// One tick of logical time.
    pub fn handle_tick(&mut self) {
        // Only an awake member is ticked.
        self.hibernating = false;
        self.tick_count += 1;
        self.raw.tick();
        self.check_read_timers();
        self.check_transfer_timer();
        self.check_proposal_timers();
        if self.config.hibernate_after_ticks > 0 {
            self.quiet_ticks = if self.quiescent() {
                self.quiet_ticks + 1
            } else {
                0
            };
        }
    }

    /// Proposals are in index order, so the oldest are at the front: this is
    /// O(expired), not O(pending).
    fn check_proposal_timers(&mut self) {
        // Proposals left from when this node led are settled by the next
        // leader's first append (committed or overwritten) within a
        // heartbeat or two; if none comes (this node is cut off, or was
        // removed), their outcome stays unknown: say so after two election
        // timeouts rather than at the proposal timeout.
        if self.raft_state != StateRole::Leader
            && !self.proposals.is_empty()
            && self.tick_count >= self.stepped_down_tick + 2 * self.config.election_ticks as u64
        {
            let leader_hint = (self.leader_id != 0).then_some(self.leader_id);
            for p in std::mem::take(&mut self.proposals) {
                self.actions.push(Action::ProposalFailed {
                    id: p.id,
                    error: ProposeError::NotLeader {
                        leader_hint,
                        in_flight: true,
                    },
                });
            }
        }
        let timeout = self.config.propose_timeout_ticks;
        while let Some(p) = self.proposals.front() {
            if self.tick_count < p.tick + timeout {
                break;
            }
            let p = self.proposals.pop_front().unwrap();
            self.actions.push(Action::ProposalFailed {
                id: p.id,
                error: ProposeError::Timeout,
            });
        }
    }

    /// A message from a peer. It is checked against this node's state first
    /// ([`Core::check_message`]): a message raft-rs could not survive is
    /// dropped and returned as the error. The node carries on either way.
    pub fn handle_message(&mut self, msg: Message) -> Result<(), Rejected> {
        self.check_message(&msg)?;
        if self.checked_leases() {
            match msg.get_msg_type() {
                MessageType::MsgHeartbeatResponse => {
                    if let (Some(lease), Some(round)) =
                        (&mut self.lease, parse_lease_context(&msg.context))
                    {
                        lease.ack(msg.from, msg.term, round);
                    }
                }
                // A restarted node forgot whose lease it was honouring: it
                // grants no vote for an election timeout after starting, as
                // if it had just heard from a leader (forced votes of a
                // transfer excepted: the leader that sent it holds no lease).
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                    if self.tick_count < self.config.election_ticks as u64
                        && msg.context.as_ref() != CAMPAIGN_TRANSFER =>
                {
                    return Ok(());
                }
                _ => {}
            }
        }
        let from = msg.from;
        let kind = msg.get_msg_type();
        // A leader's heartbeat answers are not news (it sends heartbeats
        // only while awake); anything else is activity.
        if kind != MessageType::MsgHeartbeatResponse {
            self.wake();
        }
        if let Err(e) = self.raw.step(msg) {
            slog::debug!(self.logger, "step refused a message"; "error" => %e);
        }
        if matches!(
            kind,
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        ) && from == self.raw.raft.leader_id
        {
            self.leader_heard = from;
        }
        Ok(())
    }

    /// Checks a message from a peer against this node's state (the rules in
    /// [`Rejected`]'s module) without stepping it. A rejection is counted in
    /// [`Status::messages_rejected`] and logged with the sender. A shell calls
    /// this before acting on a message itself (saving a snapshot's data).
    pub fn check_message(&mut self, msg: &Message) -> Result<(), Rejected> {
        validate::check(&self.raw.raft, msg).map_err(|r| self.reject(msg, r))
    }

    /// Counts and logs a message the shell refused for a reason of its own
    /// (for example a snapshot whose data it does not hold), and returns the
    /// reason.
    pub fn reject(&mut self, msg: &Message, reason: Rejected) -> Rejected {
        self.messages_rejected += 1;
        slog::warn!(self.logger, "rejected a message from a peer";
            "from" => msg.from, "type" => ?msg.get_msg_type(), "term" => msg.term,
            "reason" => %reason, "rejected_total" => self.messages_rejected);
        reason
    }

    /// A peer could not be reached.
    pub fn handle_unreachable(&mut self, to: NodeId) {
        self.wake();
        self.raw.report_unreachable(to);
    }

    /// The outcome of sending a snapshot to `to`.
    pub fn handle_snapshot_status(&mut self, to: NodeId, ok: bool) {
        self.wake();
        let status = if ok {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    /// Proposes a command. An `Err` means it was refused at once and was not
    /// applied; `Ok` means a reply will come as `Apply` (with this id) or
    /// `ProposalFailed`.
    pub fn handle_propose(&mut self, id: RequestId, command: Vec<u8>) -> Result<(), ProposeError> {
        self.handle_propose_kind(id, crate::session::EntryKind::Command, command)
    }

    /// [`Core::handle_propose`] for any stamped entry kind: a command in a
    /// session, a session register or unregister, a time entry (formats in
    /// `session.rs`). The shell's apply step runs the session table on
    /// them before its state machine.
    pub fn handle_propose_kind(
        &mut self,
        id: RequestId,
        kind: crate::session::EntryKind,
        command: Vec<u8>,
    ) -> Result<(), ProposeError> {
        self.wake();
        if self.removed {
            return Err(ProposeError::Removed);
        }
        let size_bytes = command.len() as u64;
        if size_bytes > self.config.max_command_size_bytes {
            return Err(ProposeError::TooLarge {
                size_bytes,
                limit_bytes: self.config.max_command_size_bytes,
            });
        }
        if self.raw.raft.state != StateRole::Leader {
            return Err(ProposeError::NotLeader {
                leader_hint: self.leader(),
                in_flight: false,
            });
        }
        if self.raw.raft.lead_transferee.is_some() {
            return Err(ProposeError::Dropped);
        }
        self.proposal_queue.push((id, command, kind));
        Ok(())
    }

    /// Asks for a linearizable read. The reply is `ReadReady` or `ReadFailed`.
    pub fn handle_read(&mut self, id: RequestId) {
        self.wake();
        if self.removed {
            self.actions.push(Action::ReadFailed {
                ids: vec![id],
                error: ReadError::Removed,
            });
            return;
        }
        if self.reads_waiting.is_empty() {
            self.reads_waiting_since_tick = self.tick_count;
        }
        self.reads_waiting.push(id);
    }

    /// Proposes a membership change. `context` is replicated with it and
    /// handed to every member in [`NodeEvent::MembershipChanged`] (for example
    /// the new node's addresses).
    pub fn handle_conf_change(
        &mut self,
        id: RequestId,
        change: MembershipChange,
        context: Vec<u8>,
    ) -> Result<(), ConfChangeError> {
        self.wake();
        if self.removed {
            return Err(ConfChangeError::Removed);
        }
        if self.raw.raft.state != StateRole::Leader {
            return Err(ConfChangeError::NotLeader {
                leader_hint: self.leader(),
            });
        }
        let target = change.node_id();
        if target == 0 {
            return Err(ConfChangeError::InvalidNodeId);
        }
        let conf = self.conf_state();
        let is_voter = conf.voters.contains(&target);
        let is_learner = conf.learners.contains(&target);
        if self.raw.raft.has_pending_conf() || !conf.voters_outgoing.is_empty() {
            return Err(ConfChangeError::InProgress);
        }
        let (change_type, node_id) = match change {
            MembershipChange::AddVoter(id) => {
                if is_voter {
                    return Err(ConfChangeError::AlreadyMember(id));
                }
                if is_learner {
                    return Err(ConfChangeError::AlreadyMember(id));
                }
                (ConfChangeType::AddNode, id)
            }
            MembershipChange::AddLearner(id) => {
                if is_voter || is_learner {
                    return Err(ConfChangeError::AlreadyMember(id));
                }
                (ConfChangeType::AddLearnerNode, id)
            }
            MembershipChange::PromoteLearner(id) => {
                if !is_learner {
                    return Err(if is_voter {
                        ConfChangeError::NotLearner(id)
                    } else {
                        ConfChangeError::UnknownNode(id)
                    });
                }
                let matched_index = self.raw.raft.prs().get(id).map_or(0, |p| p.matched);
                let last_index = self.raw.raft.raft_log.last_index();
                if matched_index + self.config.promote_lag_entries_max < last_index {
                    return Err(ConfChangeError::LearnerNotCaughtUp {
                        id,
                        matched_index,
                        last_index,
                    });
                }
                (ConfChangeType::AddNode, id)
            }
            MembershipChange::Remove(id) => {
                if !is_voter && !is_learner {
                    return Err(ConfChangeError::UnknownNode(id));
                }
                if is_voter && conf.voters.len() == 1 {
                    return Err(ConfChangeError::NoVoterLeft);
                }
                (ConfChangeType::RemoveNode, id)
            }
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = node_id;
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        cc.changes = vec![single].into();
        cc.context = context.into();
        let before = self.raw.raft.raft_log.last_index();
        if self.raw.propose_conf_change(Vec::new(), cc).is_err() {
            return Err(ConfChangeError::Dropped { in_flight: false });
        }
        let index = self.raw.raft.raft_log.last_index();
        assert_eq!(index, before + 1, "a conf change appends exactly one entry");
        self.conf_changes.push_back(Pending {
            index,
            term: self.raw.raft.term,
            id,
            tick: self.tick_count,
        });
        Ok(())
    }

    /// Transfers leadership to `to`. The reply is `TransferDone` or
    /// `TransferFailed`; an `Err` is an immediate refusal.
    pub fn handle_transfer_leader(
        &mut self,
        id: RequestId,
        to: NodeId,
    ) -> Result<(), TransferError> {
        self.wake();
        if self.raw.raft.state != StateRole::Leader {
            return Err(TransferError::NotLeader {
                leader_hint: self.leader(),
            });
        }
        if !self.raw.raft.prs().conf().voters().contains(to) {
            return Err(TransferError::NotVoter(to));
        }
        if self.transfer.is_some() {
            return Err(TransferError::InProgress);
        }
        if to == self.config.id {
            self.actions.push(Action::TransferDone { id });
            return Ok(());
        }
        self.raw.transfer_leader(to);
        self.transfer = Some(Transfer {
            id,
            to,
            deadline_tick: self.tick_count + self.config.transfer_timeout_ticks,
        });
        Ok(())
    }

    /// Moves raft's applied index up to what was handed out, but never past
    /// what is persisted: raft-rs refuses that, and a received snapshot is
    /// handed out before it is persisted.
    fn advance_raft_applied(&mut self) {
        let log = &self.raw.raft.raft_log;
        let target = self.dispatched_index.min(log.persisted);
        if target > log.applied {
            self.raw.advance_apply_to(target);
        }
    }

    /// Ready `number` (and every earlier one) is durable.
    pub fn handle_persisted(&mut self, number: u64) {
        self.raw.on_persist_ready(number);
        self.advance_raft_applied();
        while let Some((n, _)) = self.persisted_messages.front() {
            if *n > number {
                break;
            }
            let (_, msgs) = self.persisted_messages.pop_front().unwrap();
            self.push_send(msgs);
        }
    }

    /// Emits `msgs` to send. In checked lease mode a leader's heartbeats
    /// are stamped with a lease round, `MsgTimeoutNow` revokes its lease, and
    /// `MsgReadIndexResp` is held until confirmed (dropped if not leading:
    /// the follower asks again).
    fn push_send(&mut self, mut msgs: Vec<Message>) {
        if self.checked_leases() {
            let mut round = None;
            let tick = self.tick_count;
            let election = self.config.election_ticks as u64;
            let mut held = Vec::new();
            msgs.retain_mut(|m| match m.get_msg_type() {
                MessageType::MsgHeartbeat => {
                    if let Some(lease) = &mut self.lease {
                        let r = *round.get_or_insert_with(|| lease.next_round(tick, election));
                        m.context = lease_context(r).to_vec().into();
                    }
                    true
                }
                MessageType::MsgTimeoutNow => {
                    if let Some(lease) = &mut self.lease {
                        lease.revoke();
                    }
                    true
                }
                MessageType::MsgReadIndexResp => {
                    if let Some(lease) = &self.lease {
                        held.push(HeldRead {
                            capture: lease.capture(),
                            held_tick: tick,
                            what: Held::Forwarded(m.clone()),
                        });
                    }
                    false
                }
                _ => true,
            });
            self.held_reads.extend(held);
        }
        if !msgs.is_empty() {
            self.actions.push(Action::Send(msgs));
        }
    }

    /// A new leader will append after its whole log: its stamps must not
    /// be earlier than those in the entries it has not handed out yet
    /// (committed or not; earlier ones were seen in `on_committed`).
    fn note_log_times_in_tail(&mut self) {
        let log = &self.raw.raft.raft_log;
        let (low, high) = (self.dispatched_index + 1, log.last_index() + 1);
        if low >= high {
            return;
        }
        match log.entries(low, None, GetEntriesContext::empty(false)) {
            Ok(entries) => {
                for e in entries.iter().take((high - low) as usize) {
                    if let Some(t) = entry_log_time_ms(e) {
                        self.log_time_ms = self.log_time_ms.max(t);
                    }
                }
            }
            Err(e) => {
                slog::warn!(self.logger, "cannot read the log tail for its log times"; "error" => %e)
            }
        }
    }

    /// Lease reads with the expiry checks of `lease.rs`.
    fn checked_leases(&self) -> bool {
        self.config.lease_read && !self.config.unchecked_lease_reads
    }

    /// The shell's wall clock now, in ms since the Unix epoch. A leader
    /// stamps the commands it proposes with it (see [`entry_log_time_ms`]),
    /// raised to the latest stamp in its log so stamps never go back along
    /// the log; the core reads no clock itself.
    pub fn set_wall_clock_ms(&mut self, now_ms: u64) {
        self.wall_clock_ms = now_ms;
    }

    /// The latest log time this node has seen in its log or stamped.
    pub fn log_time_ms(&self) -> u64 {
        self.log_time_ms
    }

    /// The shell saw its clock run ahead of its ticks (the loop stalled):
    /// a leader's tick count then lags real time, so the heartbeat rounds
    /// sent so far hold no lease; reads wait for the next round.
    pub fn expire_lease(&mut self) {
        if let Some(lease) = &mut self.lease {
            lease.expire();
        }
    }

    /// Releases held lease-mode answers, oldest first, while a quorum
    /// vouches for them. Returns true if it broadcast a heartbeat round to
    /// confirm the rest (raft then has a ready).
    fn confirm_held_reads(&mut self) -> bool {
        let Some(lease) = &self.lease else {
            return false;
        };
        if self.raw.raft.state != StateRole::Leader {
            return false;
        }
        let now = self.tick_count;
        let election = self.config.election_ticks as u64;
        let drift = self.config.lease_drift_ticks;
        while let Some(front) = self.held_reads.front() {
            // raft-rs's own hasher type, inferred from `has_quorum`.
            let mut vouching = std::collections::HashSet::default();
            vouching.extend(lease.vouching(front.capture, now, election, drift));
            vouching.insert(self.config.id);
            if !self.raw.raft.prs().has_quorum(&vouching) {
                // Ask now rather than at the next heartbeat tick.
                if lease.capture() <= front.capture {
                    self.raw.raft.bcast_heartbeat();
                    return true;
                }
                return false;
            }
            match self.held_reads.pop_front().unwrap().what {
                Held::Local {
                    index,
                    ids,
                    started_tick,
                } => self.reads_confirmed.push_back((index, ids, started_tick)),
                Held::Forwarded(m) => self.actions.push(Action::Send(vec![m])),
            }
        }
        false
    }

    /// Held answers die with the leadership: a follower asks again, and this
    /// node's own reads go back to waiting (they go to the next leader).
    fn drop_held_reads(&mut self) {
        for h in std::mem::take(&mut self.held_reads) {
            if let Held::Local { ids, .. } = h.what {
                self.requeue_reads(ids);
            }
        }
    }

    fn requeue_reads(&mut self, ids: Vec<RequestId>) {
        if self.reads_waiting.is_empty() {
            self.reads_waiting_since_tick = self.tick_count;
        }
        self.reads_waiting.extend(ids);
    }

    /// The state machine applied everything up to `index`.
    pub fn handle_applied(&mut self, index: u64) {
        assert!(
            index <= self.dispatched_index,
            "applied {} beyond dispatched {}",
            index,
            self.dispatched_index
        );
        if index > self.applied_index {
            self.applied_index = index;
        }
        while let Some((i, _, _)) = self.conf_changes_applying.front() {
            if *i > self.applied_index {
                break;
            }
            let (_, id, conf_state) = self.conf_changes_applying.pop_front().unwrap();
            self.actions.push(Action::ConfChangeDone { id, conf_state });
        }
    }

    /// Fails every pending request with a shutdown error. Call once, when the
    /// shell stops.
    pub fn shutdown(&mut self) -> Vec<Action> {
        for (id, _, _) in std::mem::take(&mut self.proposal_queue) {
            self.actions.push(Action::ProposalFailed {
                id,
                error: ProposeError::Shutdown,
            });
        }
        for p in std::mem::take(&mut self.proposals) {
            self.actions.push(Action::ProposalFailed {
                id: p.id,
                error: ProposeError::Shutdown,
            });
        }
        for p in std::mem::take(&mut self.conf_changes) {
            self.actions.push(Action::ConfChangeFailed {
                id: p.id,
                error: ConfChangeError::Shutdown,
            });
        }
        for (_, id, _) in std::mem::take(&mut self.conf_changes_applying) {
            self.actions.push(Action::ConfChangeFailed {
                id,
                error: ConfChangeError::Shutdown,
            });
        }
        let mut ids = std::mem::take(&mut self.reads_waiting);
        if let Some(b) = self.read_inflight.take() {
            ids.extend(b.ids);
        }
        for (_, b, _) in std::mem::take(&mut self.reads_confirmed) {
            ids.extend(b);
        }
        if !ids.is_empty() {
            self.actions.push(Action::ReadFailed {
                ids,
                error: ReadError::Shutdown,
            });
        }
        if let Some(t) = self.transfer.take() {
            self.actions.push(Action::TransferFailed {
                id: t.id,
                error: TransferError::Shutdown,
            });
        }
        std::mem::take(&mut self.actions)
    }

    // ----- actions out -----

    /// Processes everything raft has ready and returns what the shell must do,
    /// in order. Call after every batch of `handle_*` calls. An `Err` is fatal.
    pub fn poll(&mut self) -> Result<Vec<Action>, FatalError> {
        self.flush_proposals();
        self.maybe_send_read_index();
        self.maybe_campaign_alone()?;
        loop {
            while self.raw.has_ready() {
                self.handle_ready()?;
                self.maybe_campaign_alone()?;
            }
            if !self.confirm_held_reads() {
                break;
            }
        }
        if self.raft_state != StateRole::Leader && !self.proposals.is_empty() {
            self.drop_overwritten_proposals();
        }
        self.maybe_leave_joint();
        self.release_confirmed_reads();
        Ok(std::mem::take(&mut self.actions))
    }

    fn maybe_campaign_alone(&mut self) -> Result<(), FatalError> {
        if !self.sole_voter_campaign {
            return Ok(());
        }
        let log = &self.raw.raft.raft_log;
        if log.applied < log.committed {
            return Ok(());
        }
        self.sole_voter_campaign = false;
        if self.raw.raft.state != StateRole::Leader {
            self.raw.campaign()?;
        }
        Ok(())
    }

    fn flush_proposals(&mut self) {
        if self.proposal_queue.is_empty() {
            return;
        }
        let queue = std::mem::take(&mut self.proposal_queue);
        if self.raw.raft.state != StateRole::Leader || self.raw.raft.lead_transferee.is_some() {
            let error = if self.raw.raft.state != StateRole::Leader {
                ProposeError::NotLeader {
                    leader_hint: self.leader(),
                    in_flight: false,
                }
            } else {
                ProposeError::Dropped
            };
            for (id, _, _) in queue {
                self.actions.push(Action::ProposalFailed {
                    id,
                    error: error.clone(),
                });
            }
            return;
        }
        // One MsgPropose with every queued command: raft appends them together
        // and broadcasts once, instead of one append message per command.
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgPropose);
        msg.from = self.config.id;
        // One stamp for the batch: the wall clock, never earlier than any
        // stamp before it in this leader's log.
        let stamp = self.wall_clock_ms.max(self.log_time_ms);
        self.log_time_ms = stamp;
        let context = stamped_context(stamp);
        let mut entries = Vec::with_capacity(queue.len());
        let mut ids = Vec::with_capacity(queue.len());
        for (id, data, kind) in queue {
            let context = match kind {
                crate::session::EntryKind::Command => context.clone(),
                other => crate::session::entry_context(other, stamp).into(),
            };
            let e = Entry {
                data: data.into(),
                context,
                ..Default::default()
            };
            entries.push(e);
            ids.push(id);
        }
        msg.entries = entries.into();
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.raft.step(msg) {
            Ok(()) => {
                let last = self.raw.raft.raft_log.last_index();
                assert_eq!(
                    last - before,
                    ids.len() as u64,
                    "raft appended a different count"
                );
                let term = self.raw.raft.term;
                for (k, id) in ids.into_iter().enumerate() {
                    let index = before + 1 + k as u64;
                    if let Some(prev) = self.proposals.back() {
                        assert!(prev.index < index, "proposals out of index order");
                    }
                    self.proposals.push_back(Pending {
                        index,
                        term,
                        id,
                        tick: self.tick_count,
                    });
                }
            }
            Err(_) => {
                for id in ids {
                    self.actions.push(Action::ProposalFailed {
                        id,
                        error: ProposeError::Dropped,
                    });
                }
            }
        }
    }

    fn handle_ready(&mut self) -> Result<(), FatalError> {
        let mut rd = self.raw.ready();
        let number = rd.number();
        self.last_ready_number = number;

        if let Some(ss) = rd.ss() {
            let (leader_id, raft_state) = (ss.leader_id, ss.raft_state);
            self.on_soft_state(leader_id, raft_state);
        }
        if !rd.read_states().is_empty() {
            for rs in rd.take_read_states() {
                self.on_read_state(rs.index, &rs.request_ctx);
            }
        }
        // 1. A leader's messages go out before its own write.
        self.push_send(rd.take_messages());
        // 2. Snapshot and committed entries, in log order.
        let mut batch = WriteBatch {
            group_id: self.config.group_id,
            ..Default::default()
        };
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            let index = snap.get_metadata().index;
            assert!(
                index > self.dispatched_index,
                "snapshot {} not ahead of dispatched {}",
                index,
                self.dispatched_index
            );
            batch.snapshot = Some(snap.get_metadata().clone());
            // Proposals left from when this node led (see
            // `fail_pending_on_step_down`) whose index the snapshot covers:
            // whether they are in it cannot be told.
            while self.proposals.front().is_some_and(|p| p.index <= index) {
                let p = self.proposals.pop_front().expect("checked");
                self.actions.push(Action::ProposalFailed {
                    id: p.id,
                    error: ProposeError::NotLeader {
                        leader_hint: (self.leader_id != 0).then_some(self.leader_id),
                        in_flight: true,
                    },
                });
            }
            self.dispatched_index = index;
            self.entries_since_snapshot = 0;
            self.actions.push(Action::RestoreSnapshot(snap));
        }
        let committed = rd.take_committed_entries();
        if !committed.is_empty() {
            self.on_committed(committed);
        }
        // 3. Stage new entries and hard state; the shell makes them durable.
        batch.entries = rd.take_entries();
        if let Some(hs) = rd.hs() {
            if hs.term != self.term {
                self.term = hs.term;
                self.leader_committed_in_term = false;
            }
            batch.hard_state = Some(hs.clone());
        }
        let must_sync = rd.must_sync();
        if !batch.is_empty() {
            self.raw.store().stage(batch)?;
        }
        let persisted = rd.take_persisted_messages();
        self.persisted_messages.push_back((number, persisted));
        self.actions.push(Action::Persist { number, must_sync });
        // 4. Let raft go on while the sync runs.
        self.raw.advance_append_async(rd);
        // Raft's own notion of "applied" only gates conf changes, campaigns
        // and leaving a joint state; those need the entries handed out (the
        // core applied the conf changes itself), not the state machine done.
        // This is what RawNode::advance does in the synchronous flow.
        self.advance_raft_applied();
        self.note_leader_commit();
        Ok(())
    }

    fn on_soft_state(&mut self, leader_id: NodeId, raft_state: StateRole) {
        let was_leader = self.raft_state == StateRole::Leader;
        let leader_changed = leader_id != self.leader_id;
        self.leader_id = leader_id;
        self.raft_state = raft_state;
        if was_leader && raft_state != StateRole::Leader {
            self.fail_pending_on_step_down();
        }
        if raft_state == StateRole::Leader && !was_leader {
            self.note_log_times_in_tail();
            self.drop_overwritten_proposals();
        }
        if raft_state == StateRole::Leader && self.checked_leases() {
            let term = self.raw.raft.term;
            if self.lease.as_ref().is_none_or(|l| l.term != term) {
                self.lease = Some(Lease::new(term));
            }
        } else if self.lease.take().is_some() {
            self.drop_held_reads();
        }
        if leader_changed {
            self.actions.push(Action::Event(NodeEvent::LeaderChanged {
                leader: (leader_id != 0).then_some(leader_id),
                term: self.raw.raft.term,
            }));
            if let Some(t) = &self.transfer {
                if t.to == leader_id {
                    let id = t.id;
                    self.transfer = None;
                    self.actions.push(Action::TransferDone { id });
                } else if leader_id != 0 && leader_id != self.config.id {
                    let id = t.id;
                    self.transfer = None;
                    self.actions.push(Action::TransferFailed {
                        id,
                        error: TransferError::NotLeader {
                            leader_hint: Some(leader_id),
                        },
                    });
                }
            }
            // A new leader will not answer requests sent to the old one.
            if let Some(b) = &mut self.read_inflight {
                b.sent_tick = 0;
            }
        }
        if raft_state == StateRole::Leader {
            self.leader_committed_in_term = false;
        }
    }

    /// Proposals left from when this node led (see
    /// `fail_pending_on_step_down`) whose entry is no longer in the log
    /// were overwritten by a leader that lacks them, so they cannot have
    /// committed: they fail as Dropped (not applied). Called as a follower
    /// after each round of readies, and on becoming leader again: those
    /// left are then in the log, below every index proposed from now on, so
    /// the queue stays in index order.
    fn drop_overwritten_proposals(&mut self) {
        let log = &self.raw.raft.raft_log;
        let in_log =
            |p: &Pending| p.index <= log.last_index() && log.term(p.index).ok() == Some(p.term);
        if self.proposals.iter().all(in_log) {
            return;
        }
        let (kept, gone): (VecDeque<Pending>, VecDeque<Pending>) =
            std::mem::take(&mut self.proposals)
                .into_iter()
                .partition(in_log);
        for p in gone {
            self.actions.push(Action::ProposalFailed {
                id: p.id,
                error: ProposeError::Dropped,
            });
        }
        self.proposals = kept;
    }

    fn fail_pending_on_step_down(&mut self) {
        self.stepped_down_tick = self.tick_count;
        let leader_hint = (self.leader_id != 0).then_some(self.leader_id);
        for (id, _, _) in std::mem::take(&mut self.proposal_queue) {
            self.actions.push(Action::ProposalFailed {
                id,
                error: ProposeError::NotLeader {
                    leader_hint,
                    in_flight: false,
                },
            });
        }
        // Proposals already in the log stay pending: the new leader commits
        // them as they are (this node then applies them and they succeed) or
        // overwrites their index (Dropped, certainly not applied). Failing
        // them here would report an unknown outcome for what, in a graceful
        // leadership transfer, always commits. Those not settled within two
        // election timeouts fail as unknown (`check_proposal_timers`).
        for p in std::mem::take(&mut self.conf_changes) {
            self.actions.push(Action::ConfChangeFailed {
                id: p.id,
                error: ConfChangeError::Dropped { in_flight: true },
            });
        }
        // A pending transfer stays pending: stepping down is how it starts
        // to succeed. The next known leader settles it (see on_soft_state).
    }

    fn on_committed(&mut self, entries: Vec<Entry>) {
        let mut proposals = Vec::new();
        let mut conf_state = None;
        let before = self.conf_state();
        for e in &entries {
            assert_eq!(
                e.index,
                self.dispatched_index + 1,
                "committed entries must follow the last dispatched index"
            );
            if let Some(t) = entry_log_time_ms(e) {
                self.log_time_ms = self.log_time_ms.max(t);
            }
            self.dispatched_index = e.index;
            // Proposals at lower indexes can no longer commit: their slot went
            // to another entry.
            while let Some(p) = self.proposals.front() {
                if p.index > e.index {
                    break;
                }
                let p = self.proposals.pop_front().unwrap();
                if p.index == e.index && p.term == e.term {
                    proposals.push((p.index, p.id));
                } else {
                    self.actions.push(Action::ProposalFailed {
                        id: p.id,
                        error: ProposeError::Dropped,
                    });
                }
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    // Raft's configuration changes now; the state machine sees the
                    // batch later, so membership events may precede its apply.
                    conf_state = Some(self.apply_conf_change_entry(e));
                }
            }
        }
        // Conf-change entries that did not come back as one (raft turned
        // them into empty entries) have failed.
        let last = self.dispatched_index;
        while let Some(p) = self.conf_changes.front() {
            if p.index > last {
                break;
            }
            let p = self.conf_changes.pop_front().unwrap();
            self.actions.push(Action::ConfChangeFailed {
                id: p.id,
                error: ConfChangeError::InProgress,
            });
        }
        // The snapshot policy. A member added since the last snapshot cannot
        // restore it (raft-rs refuses a snapshot that leaves it out) and the
        // log it needs may be compacted: snapshot right after the change.
        self.entries_since_snapshot += entries.len() as u64;
        let last_term = entries.last().map_or(0, |e| e.term);
        let member_added = conf_state.as_ref().is_some_and(|cs| {
            cs.voters
                .iter()
                .chain(&cs.learners)
                .any(|id| !before.voters.contains(id) && !before.learners.contains(id))
        });
        self.actions.push(Action::Apply(ApplyBatch {
            entries,
            proposals,
            conf_state,
        }));
        let interval = self.config.snapshot_interval_entries;
        let due = member_added || (interval > 0 && self.entries_since_snapshot >= interval);
        if due && !self.snapshot_taking {
            self.snapshot_taking = true;
            self.entries_since_snapshot = 0;
            self.push_take_snapshot(last_term, None);
        }
    }

    /// Asks the shell for a snapshot at the last dispatched index.
    fn push_take_snapshot(&mut self, term: u64, id: Option<RequestId>) {
        let metadata = SnapshotMetadata {
            index: self.dispatched_index,
            term,
            conf_state: Some(self.conf_state()).into(),
            ..Default::default()
        };
        self.actions.push(Action::TakeSnapshot { metadata, id });
    }

    /// A manual snapshot request: a snapshot at the last index handed out
    /// for applying, answered with [`Action::TakeSnapshot`] carrying `id`.
    /// Fails (returns false) when nothing was applied yet.
    pub fn handle_snapshot_request(&mut self, id: RequestId) -> bool {
        self.wake();
        if self.dispatched_index == 0 {
            return false;
        }
        let term = match self.raw.raft.raft_log.term(self.dispatched_index) {
            Ok(t) => t,
            // Compacted away: the last snapshot is at least this recent.
            Err(_) => {
                raft::Storage::snapshot(self.raw.store(), 0, 0).map_or(0, |s| s.get_metadata().term)
            }
        };
        self.push_take_snapshot(term, Some(id));
        true
    }

    /// The shell took the snapshot an [`Action::TakeSnapshot`] asked for
    /// (`Ok` with its point) or could not (`Err`: an automatic one is tried
    /// again after another interval). The core records it in the log and
    /// compacts behind it (keeping `snapshot_keep_entries`), staged through
    /// the store and made durable by an [`Action::Persist`].
    pub fn handle_snapshot_taken(
        &mut self,
        id: Option<RequestId>,
        result: Result<SnapshotMetadata, String>,
    ) -> Result<(), FatalError> {
        if id.is_none() {
            self.snapshot_taking = false;
        }
        let meta = match result {
            Ok(meta) => meta,
            Err(e) => {
                slog::warn!(self.logger, "snapshot failed"; "error" => %e);
                return Ok(());
            }
        };
        let first = self.raw.raft.raft_log.first_index();
        let compact_to = (meta.index + 1).saturating_sub(self.config.snapshot_keep_entries);
        // Never past what raft has persisted, nor past the snapshot.
        let compact_to = compact_to.min(self.raw.raft.raft_log.persisted + 1);
        let batch = WriteBatch {
            group_id: self.config.group_id,
            record_snapshot: Some(meta),
            compact_to: (compact_to > first).then_some(compact_to),
            ..Default::default()
        };
        self.raw.store().stage(batch)?;
        self.actions.push(Action::Persist {
            number: self.last_ready_number,
            must_sync: true,
        });
        Ok(())
    }

    /// Applies a committed conf change to raft and returns the new conf state.
    /// Not recorded in the log store: a restart re-applies it from the log.
    fn apply_conf_change_entry(&mut self, e: &Entry) -> ConfState {
        let (changes, context, result) = if e.get_entry_type() == EntryType::EntryConfChange {
            let mut cc = ConfChange::default();
            if let Err(err) = cc.merge_from_bytes(&e.data) {
                panic!(
                    "committed conf change at {} does not decode: {}",
                    e.index, err
                );
            }
            let v2 = raft_proto::ConfChangeI::as_v2(&cc).into_owned();
            let ctx = cc.context.clone();
            (v2.changes.to_vec(), ctx, self.raw.apply_conf_change(&cc))
        } else {
            let mut cc = ConfChangeV2::default();
            if let Err(err) = cc.merge_from_bytes(&e.data) {
                panic!(
                    "committed conf change at {} does not decode: {}",
                    e.index, err
                );
            }
            let ctx = cc.context.clone();
            (cc.changes.to_vec(), ctx, self.raw.apply_conf_change(&cc))
        };
        let applied = match result {
            Ok(cs) => Some(cs),
            Err(err) => {
                // This core validates its own changes before proposing them,
                // so only a forged entry (a plaintext peer claiming to lead)
                // gets here. raft-rs changed nothing, and every replica that
                // commits the same entry refuses it the same way: a no-op
                // keeps them in agreement where a panic would stop them.
                slog::error!(self.logger, "a committed conf change does not apply; ignoring it";
                    "index" => e.index, "term" => e.term, "error" => %err);
                None
            }
        };
        let conf_state = applied.clone().unwrap_or_else(|| self.conf_state());
        if let Some(p) = self.conf_changes.front() {
            if p.index == e.index {
                let p = self.conf_changes.pop_front().unwrap();
                if applied.is_none() {
                    self.actions.push(Action::ConfChangeFailed {
                        id: p.id,
                        error: ConfChangeError::Dropped { in_flight: false },
                    });
                } else if p.term == e.term {
                    // Answered once applied: raft accepts the next change only then.
                    self.conf_changes_applying
                        .push_back((e.index, p.id, conf_state.clone()));
                } else {
                    self.actions.push(Action::ConfChangeFailed {
                        id: p.id,
                        error: ConfChangeError::Dropped { in_flight: true },
                    });
                }
            }
        }
        if applied.is_none() {
            return conf_state;
        }
        let me = self.config.id;
        let still_member = conf_state.voters.contains(&me)
            || conf_state.learners.contains(&me)
            || conf_state.voters_outgoing.contains(&me);
        self.actions
            .push(Action::Event(NodeEvent::MembershipChanged {
                conf_state: conf_state.clone(),
                changes,
                context,
            }));
        if still_member {
            // A member removed and added back (an operator re-adds one under
            // its old name, hence id) replays its own removal before the
            // re-add: from the re-add on it is a member again.
            self.was_member = true;
            self.removed = false;
        } else if self.was_member && !self.removed {
            self.on_removed();
        }
        conf_state
    }

    fn on_removed(&mut self) {
        self.removed = true;
        self.actions.push(Action::Event(NodeEvent::Removed));
        self.hand_off_leadership();
    }

    /// A removed leader must stop leading at once: raft-rs would keep it
    /// leading (and heartbeating, so no one else campaigns), and panics when
    /// such a leader persists entries, its own progress being gone. Tell the
    /// most caught-up voter to campaign now (`MsgTimeoutNow`, as a transfer
    /// does), then step down; if that voter is behind, the others elect a
    /// leader after an election timeout.
    fn hand_off_leadership(&mut self) {
        if self.raw.raft.state != StateRole::Leader {
            return;
        }
        if let Some(lease) = &mut self.lease {
            lease.revoke();
        }
        let term = self.raw.raft.term;
        let best = self
            .conf_state()
            .voters
            .iter()
            .copied()
            .filter(|&id| id != self.config.id)
            .max_by_key(|id| self.raw.raft.prs().get(*id).map_or(0, |p| p.matched));
        if let Some(to) = best {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgTimeoutNow);
            m.from = self.config.id;
            m.to = to;
            m.term = term;
            self.actions.push(Action::Send(vec![m]));
        }
        self.raw.raft.become_follower(term, raft::INVALID_ID);
    }

    fn note_leader_commit(&mut self) {
        if self.raw.raft.state == StateRole::Leader && !self.leader_committed_in_term {
            let committed = self.raw.raft.raft_log.committed;
            let term = self.raw.raft.raft_log.term(committed).unwrap_or(0);
            if term == self.raw.raft.term {
                self.leader_committed_in_term = true;
                // raft-rs dropped read-index requests until now: ask again.
                if let Some(b) = &mut self.read_inflight {
                    b.sent_tick = 0;
                }
                self.maybe_send_read_index();
            }
        }
    }

    fn maybe_leave_joint(&mut self) {
        // raft-rs leaves an auto joint state when the leader applies the entry
        // that entered it; a leader elected in between would never leave.
        if self.raw.raft.state != StateRole::Leader || !self.leader_committed_in_term {
            return;
        }
        if self.conf_state().voters_outgoing.is_empty() || self.raw.raft.has_pending_conf() {
            return;
        }
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        let _ = self.raw.propose_conf_change(Vec::new(), cc);
    }

    // ----- reads -----

    fn maybe_send_read_index(&mut self) {
        if self.read_inflight.is_none() && !self.reads_waiting.is_empty() {
            self.read_inflight = Some(ReadBatch {
                ids: std::mem::take(&mut self.reads_waiting),
                contexts: Vec::new(),
                started_tick: self.reads_waiting_since_tick,
                sent_tick: 0,
            });
        }
        let tick = self.tick_count;
        let retry = self.config.read_retry_ticks;
        let Some(batch) = &mut self.read_inflight else {
            return;
        };
        let due =
            batch.contexts.is_empty() || batch.sent_tick == 0 || tick >= batch.sent_tick + retry;
        if !due || batch.contexts.len() >= READ_CONTEXTS_PER_BATCH_MAX {
            return;
        }
        let ctx = self.next_read_context;
        self.next_read_context += 1;
        batch.contexts.push(ctx);
        batch.sent_tick = tick.max(1);
        let context = read_context(self.config.id, self.config.incarnation, ctx);
        self.raw.read_index(context.to_vec());
    }

    fn on_read_state(&mut self, index: u64, ctx: &[u8]) {
        // Another node's, or an earlier run's: not ours to answer.
        let Some(ctx) = parse_read_context(self.config.id, self.config.incarnation, ctx) else {
            return;
        };
        let matches = self
            .read_inflight
            .as_ref()
            .is_some_and(|b| b.contexts.contains(&ctx));
        if !matches {
            return; // An answer to a batch already answered or failed.
        }
        let batch = self.read_inflight.take().unwrap();
        if self.checked_leases() {
            // raft-rs answered from its lease: hold until confirmed.
            match &self.lease {
                Some(lease) if self.raw.raft.state == StateRole::Leader => {
                    self.held_reads.push_back(HeldRead {
                        capture: lease.capture(),
                        held_tick: self.tick_count,
                        what: Held::Local {
                            index,
                            ids: batch.ids,
                            started_tick: batch.started_tick,
                        },
                    })
                }
                // A follower's read answered by the leader (which held it
                // until confirmed), or a leader that just stepped down.
                _ if self.raw.raft.state != StateRole::Leader
                    && self.leader_id != self.config.id =>
                {
                    self.reads_confirmed
                        .push_back((index, batch.ids, batch.started_tick))
                }
                _ => self.requeue_reads(batch.ids),
            }
        } else {
            self.reads_confirmed
                .push_back((index, batch.ids, batch.started_tick));
        }
        // The next batch goes out right away.
        self.maybe_send_read_index();
    }

    fn release_confirmed_reads(&mut self) {
        while let Some((index, _, _)) = self.reads_confirmed.front() {
            if *index > self.dispatched_index {
                break;
            }
            let (read_index, ids, _) = self.reads_confirmed.pop_front().unwrap();
            self.actions.push(Action::ReadReady { ids, read_index });
        }
    }

    fn check_read_timers(&mut self) {
        let tick = self.tick_count;
        let timeout = self.config.read_timeout_ticks;
        if self
            .read_inflight
            .as_ref()
            .is_some_and(|b| tick >= b.started_tick + timeout)
        {
            let b = self.read_inflight.take().unwrap();
            self.actions.push(Action::ReadFailed {
                ids: b.ids,
                error: ReadError::Timeout,
            });
        }
        if !self.reads_waiting.is_empty() && tick >= self.reads_waiting_since_tick + timeout {
            let ids = std::mem::take(&mut self.reads_waiting);
            self.actions.push(Action::ReadFailed {
                ids,
                error: ReadError::Timeout,
            });
        }
        // A read confirmed at an index this node never reaches (it was cut
        // off, or removed without learning it) must not wait forever.
        let mut expired = Vec::new();
        self.reads_confirmed.retain_mut(|(_, ids, started)| {
            let keep = tick < *started + timeout;
            if !keep {
                expired.append(ids);
            }
            keep
        });
        // Answers held for a lease confirmation that never came: a
        // follower's expire on its side, this node's own fail here.
        self.held_reads.retain_mut(|h| {
            let keep = tick < h.held_tick + timeout;
            if let (false, Held::Local { ids, .. }) = (keep, &mut h.what) {
                expired.append(ids);
            }
            keep
        });
        if !expired.is_empty() {
            self.actions.push(Action::ReadFailed {
                ids: expired,
                error: ReadError::Timeout,
            });
        }
        self.maybe_send_read_index();
    }

    fn check_transfer_timer(&mut self) {
        let leading = self.raw.raft.state == StateRole::Leader;
        // raft-rs drops a transfer whose target could not campaign yet (for
        // example it still had a conf change to apply) and aborts it after an
        // election timeout; ask again while the request is alive.
        if leading && self.raw.raft.lead_transferee.is_none() {
            if let Some(t) = &self.transfer {
                self.raw.transfer_leader(t.to);
            } else if self.removed {
                self.hand_off_leadership();
            }
        }
        if self
            .transfer
            .as_ref()
            .is_some_and(|t| self.tick_count >= t.deadline_tick)
        {
            let t = self.transfer.take().unwrap();
            self.actions.push(Action::TransferFailed {
                id: t.id,
                error: TransferError::Timeout,
            });
        }
    }
}
