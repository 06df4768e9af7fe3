//! Configuration of the core: one struct, `Default`, and `validate()` that
//! rejects contradictions instead of clamping them.

use crate::NodeId;

/// Configuration of one Raft group member's core.
///
/// Times are in ticks: the shell decides how long a tick is.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreConfig {
    /// This node's id. Default: 1. Minimum: 1.
    pub id: NodeId,
    /// Raft group id carried on every envelope. Default: 1.
    pub group_id: u64,
    /// Ticks without a leader before a follower campaigns. Default: 10.
    /// Minimum: `heartbeat_ticks + 1`.
    pub election_ticks: usize,
    /// Ticks between leader heartbeats. Default: 1. Minimum: 1.
    pub heartbeat_ticks: usize,
    /// Largest append message raft builds, in bytes. Default: 1 MiB (raft-rs's
    /// own default, 0, sends one entry per message).
    pub max_size_per_msg_bytes: u64,
    /// Appends in flight per follower. Default: 256. Minimum: 1.
    pub max_inflight_msgs: usize,
    /// Uncommitted log size above which proposals are dropped. Default: 1 GiB.
    pub max_uncommitted_size_bytes: u64,
    /// Most bytes of committed entries handed out for applying in one ready.
    /// Bounds memory when a restarted node replays a long log or a follower
    /// catches up. Default: 16 MiB.
    pub max_committed_size_per_ready_bytes: u64,
    /// Largest command accepted by `propose`. Default: 1 MiB. Minimum: 1.
    pub max_command_size_bytes: u64,
    /// When a write commits, the leader tells its followers with the next
    /// append or heartbeat instead of an append of its own (raft-rs's
    /// `skip_bcast_commit`; not while a membership change is pending).
    /// Halves the messages and follower persists of a lone write, and
    /// delays followers' applies (so their stale reads, and their
    /// linearizable reads' wait to apply) by up to one heartbeat.
    /// Default: false; a multi-group host sets it, as TiKV does for its
    /// regions.
    pub lazy_commit_broadcast: bool,
    /// Leader steps down when it cannot reach a quorum for an election
    /// timeout. Default: true. Required by `lease_read`.
    pub check_quorum: bool,
    /// Pre-vote before campaigning, so a partitioned node does not disrupt
    /// the cluster on return. Default: true.
    pub pre_vote: bool,
    /// Serve linearizable reads from the leader's lease instead of a quorum
    /// round per read. Safe while the tick rates of any two members differ
    /// by less than `lease_drift_ticks` allows (see `lease.rs`); a leader
    /// without a lease (new, after `MsgTimeoutNow`, after a clock stall)
    /// confirms reads with its next heartbeat round instead. Default: false.
    pub lease_read: bool,
    /// Bound on clock drift for lease reads, in ticks: `election_ticks - 1`
    /// ticks of any member last at least `election_ticks - 1 -
    /// lease_drift_ticks` ticks of the leader. A lease then lasts
    /// `election_ticks - 2 - lease_drift_ticks` ticks after the heartbeat
    /// round that renewed it was sent. Default: 2 (with 10-tick elections,
    /// members may tick up to 28% faster than the leader). Must be below
    /// `election_ticks - 2`.
    pub lease_drift_ticks: u64,
    /// Negative control for tests, never for production: answer lease reads
    /// the way raft-rs does, with no expiry check (stale reads happen).
    /// Default: false.
    #[doc(hidden)]
    pub unchecked_lease_reads: bool,
    /// Ticks after which an unanswered read-index request is sent again.
    /// Default: 5. Minimum: 1.
    pub read_retry_ticks: u64,
    /// Ticks after which a waiting linearizable read fails. Default: 30.
    /// Minimum: `read_retry_ticks`.
    pub read_timeout_ticks: u64,
    /// Ticks a proposal may wait for its commit before it fails with
    /// `Timeout` (outcome unknown). Default: 100. Minimum: 1.
    pub propose_timeout_ticks: u64,
    /// Ticks a leadership transfer may take before it fails. Default: 20.
    pub transfer_timeout_ticks: u64,
    /// A learner may be promoted only when its matched index is within this
    /// many entries of the leader's last index. Default: 1000.
    pub promote_lag_entries_max: u64,
    /// Take a snapshot once this many entries were handed out for applying
    /// since the last one (and right after a member is added, who could not
    /// restore an older one). 0 turns automatic snapshots off; a manual
    /// request still works. Default: 10,000.
    pub snapshot_interval_entries: u64,
    /// Log entries kept behind a snapshot when the log is compacted, so a
    /// follower that is only a little behind catches up from the log
    /// instead of receiving the whole snapshot. Default: 5,000.
    pub snapshot_keep_entries: u64,
    /// Index the state machine has already applied (on restart). Default: 0.
    pub applied_index: u64,
    /// Fixed election timeout in ticks instead of raft-rs's random one in
    /// `[election_ticks, 2 * election_ticks)`. Set by the deterministic
    /// simulator, which draws it from its seed. Default: None.
    pub fixed_election_ticks: Option<usize>,
    /// A number that differs between any two starts of this node. It goes
    /// into every ReadIndex context (with the node id and a counter), so a
    /// late answer to a read from an earlier run never matches a read of this
    /// one. The tokio shell draws it from OS randomness at every start; the
    /// simulator from its seed. Default: 0.
    pub incarnation: u64,
    /// Ticks of quiet after which this member may hibernate (stop being
    /// ticked; see [`crate::Core::try_hibernate`]). 0 never hibernates.
    /// Default: 0 (a node of its own ticks for ever, and its builder
    /// refuses any other value); a multi-group host sets it. Otherwise at least `2 * heartbeat_ticks` (the commit
    /// reaches the followers first) and below `election_ticks - 1` (a
    /// follower falls asleep before its election timer can fire).
    pub hibernate_after_ticks: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            id: 1,
            group_id: 1,
            election_ticks: 10,
            heartbeat_ticks: 1,
            max_size_per_msg_bytes: 1024 * 1024,
            max_inflight_msgs: 256,
            max_uncommitted_size_bytes: 1024 * 1024 * 1024,
            max_committed_size_per_ready_bytes: 16 * 1024 * 1024,
            lazy_commit_broadcast: false,
            max_command_size_bytes: 1024 * 1024,
            check_quorum: true,
            pre_vote: true,
            lease_read: false,
            lease_drift_ticks: 2,
            unchecked_lease_reads: false,
            read_retry_ticks: 5,
            read_timeout_ticks: 30,
            propose_timeout_ticks: 100,
            transfer_timeout_ticks: 20,
            promote_lag_entries_max: 1000,
            snapshot_interval_entries: 10_000,
            snapshot_keep_entries: 5_000,
            applied_index: 0,
            fixed_election_ticks: None,
            incarnation: 0,
            hibernate_after_ticks: 0,
        }
    }
}

/// A configuration that contradicts itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl CoreConfig {
    /// Rejects contradictions.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: &str| Err(ConfigError(m.to_string()));
        if self.id == 0 {
            return fail("id must not be 0");
        }
        if self.heartbeat_ticks == 0 {
            return fail("heartbeat_ticks must be at least 1");
        }
        if self.election_ticks <= self.heartbeat_ticks {
            return fail("election_ticks must be greater than heartbeat_ticks");
        }
        if self.max_inflight_msgs == 0 {
            return fail("max_inflight_msgs must be at least 1");
        }
        if self.max_command_size_bytes == 0 {
            return fail("max_command_size_bytes must be at least 1");
        }
        if self.propose_timeout_ticks == 0 {
            return fail("propose_timeout_ticks must be at least 1");
        }
        if self.lease_read && !self.check_quorum {
            return fail("lease_read requires check_quorum");
        }
        if self.lease_read && self.lease_drift_ticks + 2 >= self.election_ticks as u64 {
            return fail("lease_drift_ticks must be below election_ticks - 2");
        }
        if self.read_retry_ticks == 0 || self.read_timeout_ticks < self.read_retry_ticks {
            return fail("need 1 <= read_retry_ticks <= read_timeout_ticks");
        }
        if self.hibernate_after_ticks > 0
            && (self.hibernate_after_ticks < 2 * self.heartbeat_ticks as u64
                || self.hibernate_after_ticks + 1 >= self.election_ticks as u64)
        {
            return fail(
                "hibernate_after_ticks must be 0, or in [2 * heartbeat_ticks, election_ticks - 1)",
            );
        }
        if let Some(t) = self.fixed_election_ticks {
            if t < self.election_ticks {
                return fail("fixed_election_ticks must be at least election_ticks");
            }
        }
        Ok(())
    }

    pub(crate) fn to_raft(&self) -> raft::Config {
        let (min, max) = match self.fixed_election_ticks {
            // raft-rs draws from [min, max); a range of one value is fixed.
            Some(t) => (t, t + 1),
            None => (self.election_ticks, 2 * self.election_ticks),
        };
        raft::Config {
            id: self.id,
            election_tick: self.election_ticks,
            heartbeat_tick: self.heartbeat_ticks,
            applied: self.applied_index,
            max_size_per_msg: self.max_size_per_msg_bytes,
            max_inflight_msgs: self.max_inflight_msgs,
            check_quorum: self.check_quorum,
            pre_vote: self.pre_vote,
            min_election_tick: min,
            max_election_tick: max,
            read_only_option: if self.lease_read {
                raft::ReadOnlyOption::LeaseBased
            } else {
                raft::ReadOnlyOption::Safe
            },
            max_uncommitted_size: self.max_uncommitted_size_bytes,
            max_committed_size_per_ready: self.max_committed_size_per_ready_bytes,
            skip_bcast_commit: self.lazy_commit_broadcast,
            // raft-rs 0.7's batch_append merges new entries into an append
            // already queued for the follower without checking they follow
            // its index; after a late rejection that yields an append whose
            // entries do not start at index + 1, a follower acked past its
            // log, and a panic ("to_commit out of range"). The simulator
            // finds it within a few hundred seeds. Off.
            batch_append: false,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::{Entry, Message, MessageType};
    use raft::storage::MemStorage;

    /// The append raft builds for a follower after a late rejection, with
    /// our raft configuration: its entries must start right after its index.
    #[test]
    fn appends_after_a_late_rejection_are_well_formed() {
        let storage = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
        let cfg = CoreConfig::default().to_raft();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut r = raft::Raft::new(&cfg, storage, &logger).unwrap();
        r.become_candidate();
        r.become_leader();
        for _ in 0..3 {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgPropose);
            m.from = 1;
            m.mut_entries().push(Entry {
                data: b"x".to_vec().into(),
                ..Default::default()
            });
            r.step(m).unwrap();
        }
        let last = r.raft_log.last_index();
        let term = r.term;
        let response = |index: u64, reject: bool, hint: u64| {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgAppendResponse);
            m.from = 2;
            m.to = 1;
            m.term = term;
            m.index = index;
            m.reject = reject;
            m.reject_hint = hint;
            m.log_term = term;
            m
        };
        r.step(response(last - 2, false, 0)).unwrap();
        r.msgs.clear();
        // An empty append waits in the outbox when a stale rejection lands.
        r.send_append(2);
        r.step(response(last, true, last - 2)).unwrap();
        for m in r
            .msgs
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgAppend)
        {
            if let Some(first) = m.entries.first() {
                assert_eq!(
                    first.index,
                    m.index + 1,
                    "append at {} carries entries from {}",
                    m.index,
                    first.index
                );
            }
        }
    }
}
