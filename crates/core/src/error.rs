//! Errors the core hands back to callers, one enum per operation.
//!
//! Each variant's doc says what caused it and what the caller can do.

use crate::NodeId;

/// Why a proposal failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProposeError {
    /// This node is not the leader. Retry on `leader_hint` if known.
    ///
    /// `in_flight` is false when the command was refused before entering the
    /// log: it was certainly not applied. It is true when this node lost
    /// leadership while the command was waiting to commit: the new leader may
    /// still commit it. Use client sessions for exactly-once retries.
    #[error("not the leader (leader hint: {leader_hint:?}, in flight: {in_flight})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader_hint: Option<NodeId>,
        /// Whether the command had entered the log before the failure.
        in_flight: bool,
    },
    /// Raft refused the proposal, for example during a leadership transfer or
    /// when the uncommitted log is over its size limit. It was not applied.
    /// Retry after a short wait.
    #[error("proposal dropped by raft (leadership transfer or uncommitted log full)")]
    Dropped,
    /// The command is larger than `max_command_size_bytes`. It was not applied.
    #[error("command of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge {
        /// Size of the command.
        size_bytes: u64,
        /// The configured limit.
        limit_bytes: u64,
    },
    /// No answer within the proposal timeout. The command may or may not be
    /// applied.
    #[error("proposal timed out; it may or may not have been applied")]
    Timeout,
    /// This node was removed from the cluster.
    #[error("this node was removed from the cluster")]
    Removed,
    /// The node is shutting down (or has stopped after a fatal error).
    #[error("node is shutting down")]
    Shutdown,
    /// The command's session expired (no command for its TTL of log time),
    /// was evicted (over the session limit), was unregistered, or never
    /// existed. This copy of the command was not applied. If
    /// `earlier_copy_in_flight`, an earlier copy of it was sent and may
    /// have been applied before the session ended: its outcome is unknown
    /// (never send it in a new session then: it could apply twice). Register
    /// a new session for new commands.
    #[error("session {session} expired or is unknown; this copy was not applied (an earlier copy in flight: {earlier_copy_in_flight})")]
    SessionExpired {
        /// The session.
        session: u64,
        /// Whether an earlier copy of the command may have entered the log
        /// (set by raftwork's `Session` handle, which sends copies; a
        /// single attempt says `false`).
        earlier_copy_in_flight: bool,
    },
    /// The command's sequence number is below the session's low-water mark:
    /// its answer was already seen and freed. Nothing was applied. A client
    /// bug: a sequence number is never reused after its answer was seen.
    #[error("sequence {seq} of session {session} is below its low-water mark {low_water}; nothing was applied")]
    SessionSequenceStale {
        /// The session.
        session: u64,
        /// The command's sequence number.
        seq: u64,
        /// The session's low-water mark.
        low_water: u64,
    },
    /// This node's state machine keeps its state on disk, where
    /// exactly-once sessions are not supported (their table is rebuilt
    /// from snapshots, which an on-disk state machine's restart does not
    /// read). Nothing was proposed. Propose without a session.
    #[error("exactly-once sessions are not supported by an on-disk state machine")]
    SessionsUnsupported,
}

impl From<crate::session::SessionError> for ProposeError {
    fn from(e: crate::session::SessionError) -> Self {
        use crate::session::SessionError;
        match e {
            SessionError::Expired(session) => ProposeError::SessionExpired {
                session,
                earlier_copy_in_flight: false,
            },
            SessionError::SequenceStale {
                session,
                seq,
                low_water,
            } => ProposeError::SessionSequenceStale {
                session,
                seq,
                low_water,
            },
        }
    }
}

/// Why a linearizable read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// No leader confirmed a read index in time (no leader, or no quorum).
    /// Retry later.
    #[error("read index not confirmed in time (no leader or no quorum)")]
    Timeout,
    /// This node was removed from the cluster.
    #[error("this node was removed from the cluster")]
    Removed,
    /// The node is shutting down.
    #[error("node is shutting down")]
    Shutdown,
}

/// Why a membership change failed. Nothing was changed unless the variant
/// says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfChangeError {
    /// This node is not the leader. Retry on the leader.
    #[error("not the leader (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader_hint: Option<NodeId>,
    },
    /// Node id 0 is reserved by raft.
    #[error("node id 0 is not a valid node id")]
    InvalidNodeId,
    /// The node is not a member of the cluster.
    #[error("node {0} is not a member")]
    UnknownNode(NodeId),
    /// The node is already a member in that role.
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    /// Promote was asked for a node that is not a learner.
    #[error("node {0} is not a learner")]
    NotLearner(NodeId),
    /// The change would leave the cluster without a voter.
    #[error("refused: the change would leave no voter")]
    NoVoterLeft,
    /// The learner is too far behind to be promoted safely. Wait and retry.
    #[error("learner {id} has not caught up: matched {matched_index}, leader at {last_index}")]
    LearnerNotCaughtUp {
        /// The learner.
        id: NodeId,
        /// Highest index known replicated on the learner.
        matched_index: u64,
        /// Leader's last index.
        last_index: u64,
    },
    /// Another membership change is in progress. Retry when it completes.
    #[error("another membership change is in progress")]
    InProgress,
    /// Raft dropped the change (for example during a leadership transfer), or
    /// leadership was lost before it committed; it may still commit if
    /// `in_flight` is true.
    #[error("membership change dropped (in flight: {in_flight})")]
    Dropped {
        /// Whether the change had entered the log.
        in_flight: bool,
    },
    /// This node was removed from the cluster.
    #[error("this node was removed from the cluster")]
    Removed,
    /// The node is shutting down.
    #[error("node is shutting down")]
    Shutdown,
}

/// Why a leadership transfer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// This node is not the leader. Retry on the leader.
    #[error("not the leader (leader hint: {leader_hint:?})")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader_hint: Option<NodeId>,
    },
    /// The target is not a voter of the cluster.
    #[error("node {0} is not a voter")]
    NotVoter(NodeId),
    /// Another transfer is in progress.
    #[error("another leadership transfer is in progress")]
    InProgress,
    /// The target did not become leader in time. Leadership may have stayed
    /// here or moved elsewhere; check the status.
    #[error("leadership transfer timed out")]
    Timeout,
    /// The node is shutting down.
    #[error("node is shutting down")]
    Shutdown,
}

/// Errors that stop the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FatalError {
    /// The log store failed; durability can no longer be promised.
    #[error("log store failed: {0}")]
    Storage(#[from] raftwork_storage::StorageError),
    /// raft-rs refused to start on this storage.
    #[error("raft refused to start: {0}")]
    Raft(#[from] raft::Error),
}
