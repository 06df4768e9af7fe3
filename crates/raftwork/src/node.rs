//! [`Node`]: the handle applications hold. Cheap to clone, `Send + Sync`;
//! every method is a message to the node's ready loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::prelude::ConfState;
use raftwork_core::session::EntryKind;
use raftwork_core::{
    ConfChangeError, MembershipChange, NodeEvent, NodeId, ProposeError, ReadError, Status,
    TransferError,
};
use raftwork_storage::SnapshotMeta;
use raftwork_transport::TransportError;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::session::{Session, SessionProposal, SessionReply, SessionToken};
use crate::state_machine::StateMachine;

/// A read to run against the state machine at the point it has applied, or
/// the reason it cannot run.
pub(crate) type ReadFn<SM> = Box<dyn FnOnce(Result<(&SM, AppliedAt), ReadError>) + Send>;

/// The last log entry a state machine has applied: where a read ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppliedAt {
    /// Its index.
    pub index: u64,
    /// Its term.
    pub term: u64,
}
/// Where a proposal's outcome goes.
pub(crate) type ProposeReply<SM> =
    oneshot::Sender<Result<(u64, <SM as StateMachine>::Response), ProposeError>>;

/// Why a snapshot was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The state machine or the snapshot store failed; the node goes on and
    /// a later snapshot may succeed. Cause and fix are in the message.
    #[error("snapshot failed: {0}")]
    Storage(String),
    /// The log store failed while recording the snapshot; the node stopped.
    #[error("log store failed, node stopped: {0}")]
    Fatal(String),
    /// The node stopped.
    #[error("node is shutting down")]
    Shutdown,
}

/// Why a node stopped. Read it with [`Node::stop_reason`] or wait for it
/// with [`Node::stopped`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// [`Node::shutdown`] was called, or every handle was dropped.
    Shutdown,
    /// The node hit an error it cannot go on from. Every request fails with
    /// a shutdown error from then on; an application should end its process
    /// (non-zero) so that its supervisor restarts it, after an operator fixed
    /// the cause if the reason says so.
    Fatal(FatalReason),
}

/// Why a node stopped on its own. Each variant says what failed; `detail`
/// and `message` carry the underlying error for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FatalReason {
    /// The log store failed to write, sync, record a snapshot or compact:
    /// durability can no longer be promised. Fix the disk, then restart.
    #[error("log store failed: {detail}")]
    LogStore {
        /// The storage error.
        detail: String,
    },
    /// raft-rs returned an error the node cannot continue from.
    #[error("raft failed: {detail}")]
    Raft {
        /// The raft error.
        detail: String,
    },
    /// A snapshot raft installed could not be read back or restored into the
    /// state machine; the state machine would diverge if the node went on.
    #[error("cannot restore snapshot {index}: {detail}")]
    SnapshotRestore {
        /// The snapshot's index.
        index: u64,
        /// Why.
        detail: String,
    },
    /// The state machine panicked (in `apply`, `snapshot`, `restore`, or a
    /// read closure run on it), or broke its contract (for example one
    /// response per command). Its state is unknown from then on.
    #[error("the state machine panicked: {message}")]
    StateMachinePanicked {
        /// The panic message.
        message: String,
    },
    /// An on-disk state machine could not make its state durable (its
    /// `sync` failed): what it holds durably is unknown. Fix the disk,
    /// then restart; the log still holds everything it may have lost.
    #[error("the state machine's storage failed: {detail}")]
    StateMachineStorage {
        /// The storage error.
        detail: String,
    },
    /// The ready loop panicked: a broken invariant in raftwork or raft-rs (a
    /// bug; the log has the details).
    #[error("the ready loop panicked: {message}")]
    LoopPanicked {
        /// The panic message.
        message: String,
    },
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_string()
    }
}

/// Largest note [`Node::send_note`] carries, in bytes.
pub const NOTE_BYTES_MAX: usize = 64 * 1024;

/// Why a note was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NoteError {
    /// The note is over [`NOTE_BYTES_MAX`].
    #[error("note of {size_bytes} bytes over the limit of {limit_bytes}")]
    TooLarge {
        /// Its size.
        size_bytes: usize,
        /// The limit.
        limit_bytes: usize,
    },
    /// The node stopped.
    #[error("node is shutting down")]
    Shutdown,
}

/// Why a wait ended without its condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The condition did not hold in time.
    #[error("timed out")]
    Timeout,
    /// The node stopped.
    #[error("node is shutting down")]
    Shutdown,
}

pub(crate) enum Request<SM: StateMachine> {
    Propose {
        command: Vec<u8>,
        reply: ProposeReply<SM>,
        /// The proposal's span (disabled unless `raftwork::propose` is
        /// traced at debug level).
        span: tracing::Span,
    },
    ProposeSession(SessionProposal<SM>),
    Read {
        read: ReadFn<SM>,
    },
    StaleRead {
        read: ReadFn<SM>,
    },
    ConfChange {
        change: MembershipChange,
        context: Vec<u8>,
        reply: oneshot::Sender<Result<ConfState, ConfChangeError>>,
    },
    Transfer {
        to: NodeId,
        reply: oneshot::Sender<Result<(), TransferError>>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Snapshot {
        reply: oneshot::Sender<Result<SnapshotMeta, SnapshotError>>,
    },
    SetPeer {
        id: NodeId,
        address: String,
        reply: oneshot::Sender<Result<(), TransportError>>,
    },
    Note {
        to: NodeId,
        data: Vec<u8>,
    },
    Shutdown,
}

/// The node's event channel, made at the first [`Node::subscribe`] (a
/// broadcast channel allocates its whole ring up front; events before the
/// first subscription reach no one either way).
pub(crate) type Events = Arc<std::sync::OnceLock<broadcast::Sender<NodeEvent>>>;

/// Events a subscriber may fall behind by before it sees `Lagged`.
const EVENTS_BUFFERED: usize = 1024;

/// Where a node's requests go: its own ready loop, or its host shard
/// (tagged with the group, type-erased: a shard drives groups of any
/// state machine type).
pub(crate) enum RequestTx<SM: StateMachine> {
    Own(mpsc::Sender<Request<SM>>),
    #[cfg_attr(not(feature = "host"), allow(dead_code))]
    Shard {
        group: u64,
        /// The group instance this handle belongs to.
        token: u64,
        tx: mpsc::Sender<crate::shard::ShardRequest>,
    },
}

impl<SM: StateMachine> RequestTx<SM> {
    /// False if the loop (or its shard) is gone.
    async fn send(&self, request: Request<SM>) -> bool {
        match self {
            RequestTx::Own(tx) => tx.send(request).await.is_ok(),
            RequestTx::Shard { group, token, tx } => tx
                .send(crate::shard::ShardRequest {
                    group: *group,
                    token: *token,
                    request: Box::new(request),
                })
                .await
                .is_ok(),
        }
    }
}

pub(crate) struct Shared<SM: StateMachine> {
    pub(crate) id: NodeId,
    pub(crate) requests: RequestTx<SM>,
    pub(crate) events: Events,
    /// The leader the ready loop last learned; `None` once it stopped.
    pub(crate) leader: watch::Sender<Option<NodeId>>,
    /// The term of the newest leader change this node saw.
    pub(crate) term: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) stopped: Arc<AtomicBool>,
    /// Why the ready loop stopped; `None` while it runs.
    pub(crate) stop: watch::Sender<Option<Stopped>>,
    pub(crate) read_timeout: Duration,
    pub(crate) membership_timeout: Duration,
    /// False for an on-disk state machine (see
    /// [`crate::DiskStateMachine`]).
    pub(crate) sessions_supported: bool,
}

/// A running Raft node. Clone it freely: all clones drive the same node.
pub struct Node<SM: StateMachine> {
    pub(crate) shared: Arc<Shared<SM>>,
}

impl<SM: StateMachine> Clone for Node<SM> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<SM: StateMachine> Node<SM> {
    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    async fn request(&self, request: Request<SM>) -> bool {
        self.shared.requests.send(request).await
    }

    /// Proposes `command`. Resolves once it is applied on this node, with its
    /// log index and the state machine's response.
    ///
    /// Fails fast with [`ProposeError::NotLeader`] on a follower. Never hangs:
    /// after `propose_timeout_ticks` it fails with [`ProposeError::Timeout`].
    pub async fn propose(
        &self,
        command: impl Into<Vec<u8>>,
    ) -> Result<(u64, SM::Response), ProposeError> {
        let (reply, rx) = oneshot::channel();
        let command = command.into();
        // A child of the caller's span (an API request's, in the server);
        // the ready loop records the log index in it and marks each step.
        let span = tracing::debug_span!(
            target: "raftwork::propose",
            "propose",
            bytes = command.len(),
            index = tracing::field::Empty
        );
        let request = Request::Propose {
            command,
            reply,
            span: span.clone(),
        };
        if !self.request(request).await {
            return Err(ProposeError::Shutdown);
        }
        // The core times proposals out in ticks (`propose_timeout_ticks`), so
        // no timer per proposal here.
        let outcome = rx.await.unwrap_or(Err(ProposeError::Shutdown));
        if !span.is_disabled() {
            match &outcome {
                Ok((index, _)) => {
                    tracing::debug!(target: "raftwork::propose", parent: &span, index, "applied; replying")
                }
                Err(e) => {
                    tracing::debug!(target: "raftwork::propose", parent: &span, error = %e, "failed; replying")
                }
            }
        }
        outcome
    }

    /// Registers a client session and returns a handle that proposes
    /// commands exactly once (see [`Session`]). Works on any member (a
    /// follower forwards to the leader); tries again for up to
    /// [`crate::SESSION_RETRY_TIMEOUT`] while there is no leader.
    pub async fn session(&self) -> Result<Session<SM>, ProposeError> {
        Session::register(self.clone()).await
    }

    /// Sends one session request and waits for the entry that answers it.
    async fn session_request<T>(
        &self,
        kind: EntryKind,
        data: Vec<u8>,
        reply: SessionReply<SM>,
        rx: oneshot::Receiver<Result<T, ProposeError>>,
    ) -> Result<T, ProposeError> {
        if !self.shared.sessions_supported {
            return Err(ProposeError::SessionsUnsupported);
        }
        let proposal = SessionProposal { kind, data, reply };
        if !self.request(Request::ProposeSession(proposal)).await {
            return Err(ProposeError::Shutdown);
        }
        // No timer per request: the core times out what this node proposed
        // as leader (`propose_timeout_ticks`), and the loop what it forwarded
        // (two election timeouts) or what waits when the leader changes.
        rx.await.unwrap_or(Err(ProposeError::Shutdown))
    }

    /// One attempt to register a session: its token (its id, the index of
    /// the register entry, and a secret drawn here that every command of the
    /// session carries). Prefer [`Node::session`], which tries again.
    pub async fn register_session(&self) -> Result<SessionToken, ProposeError> {
        let (reply, rx) = oneshot::channel();
        let secret = random_u64();
        // The leader that proposes it puts its own limits in.
        let kind = EntryKind::Register {
            config: raftwork_core::session::SessionConfig::default(),
            secret,
        };
        let id = self
            .session_request(kind, Vec::new(), SessionReply::Register(reply), rx)
            .await?;
        Ok(SessionToken { id, secret })
    }

    /// One attempt to propose `command` in the session `token` names, with
    /// sequence `seq`; `low_water` is the lowest sequence whose answer the
    /// caller has not seen. A copy of an earlier sequence that was applied
    /// is answered with its first response. For clients that keep their own
    /// sequence numbers (the server's API does); [`Session::propose`] keeps
    /// them for you and tries again.
    ///
    /// Returns the index of the entry that answered and the response.
    /// Errors as [`Node::propose`], and [`ProposeError::SessionExpired`]
    /// (also for a token whose secret is wrong),
    /// [`ProposeError::SessionSequenceStale`]. Works on followers, which
    /// forward to the leader.
    pub async fn propose_in_session(
        &self,
        token: SessionToken,
        seq: u64,
        low_water: u64,
        command: impl Into<Vec<u8>>,
    ) -> Result<(u64, SM::Response), ProposeError> {
        let (reply, rx) = oneshot::channel();
        let kind = EntryKind::SessionCommand {
            session: token.id,
            secret: token.secret,
            seq,
            low_water,
        };
        self.session_request(kind, command.into(), SessionReply::Command(reply), rx)
            .await
    }

    /// One attempt to end the session `token` names (its cached answers are
    /// freed). [`ProposeError::SessionExpired`] if it was not live.
    pub async fn unregister_session(&self, token: SessionToken) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        let kind = EntryKind::Unregister {
            session: token.id,
            secret: token.secret,
        };
        self.session_request(kind, Vec::new(), SessionReply::Unregister(reply), rx)
            .await
    }

    /// Runs `f` on the state machine once it reflects every write that
    /// completed before this call (ReadIndex). Works on followers; concurrent
    /// reads share one ReadIndex round.
    pub async fn read<R, F>(&self, f: F) -> Result<R, ReadError>
    where
        F: FnOnce(&SM) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.run_read(move |sm, _| f(sm), false).await
    }

    /// Runs `f` on the local state machine as it is now: no ReadIndex round,
    /// so the result may miss recent writes. Explicitly stale.
    pub async fn read_stale<R, F>(&self, f: F) -> Result<R, ReadError>
    where
        F: FnOnce(&SM) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.run_read(move |sm, _| f(sm), true).await
    }

    /// [`Node::read`] that also tells `f` the point the state machine is
    /// at (the last entry it applied): for a consistent copy of the state
    /// with its place in the log, such as a backup.
    pub async fn read_at<R, F>(&self, f: F) -> Result<R, ReadError>
    where
        F: FnOnce(&SM, AppliedAt) -> R + Send + 'static,
        R: Send + 'static,
    {
        self.run_read(f, false).await
    }

    async fn run_read<R, F>(&self, f: F, stale: bool) -> Result<R, ReadError>
    where
        F: FnOnce(&SM, AppliedAt) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let read: ReadFn<SM> = Box::new(move |sm| {
            let _ = tx.send(sm.map(|(sm, at)| f(sm, at)));
        });
        let request = if stale {
            Request::StaleRead { read }
        } else {
            Request::Read { read }
        };
        if !self.request(request).await {
            return Err(ReadError::Shutdown);
        }
        // The core times reads out in ticks; this is only a hang guard.
        match tokio::time::timeout(self.shared.read_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ReadError::Shutdown),
            Err(_) => Err(ReadError::Timeout),
        }
    }

    async fn change(
        &self,
        change: MembershipChange,
        context: Vec<u8>,
    ) -> Result<ConfState, ConfChangeError> {
        let (reply, rx) = oneshot::channel();
        if !self
            .request(Request::ConfChange {
                change,
                context,
                reply,
            })
            .await
        {
            return Err(ConfChangeError::Shutdown);
        }
        match tokio::time::timeout(self.shared.membership_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ConfChangeError::Shutdown),
            Err(_) => Err(ConfChangeError::Dropped { in_flight: true }),
        }
    }

    /// Adds a voter. `context` is replicated with the change and delivered to
    /// every member in [`NodeEvent::MembershipChanged`] (addresses, names).
    pub async fn add_voter(
        &self,
        id: NodeId,
        context: impl Into<Vec<u8>>,
    ) -> Result<ConfState, ConfChangeError> {
        self.change(MembershipChange::AddVoter(id), context.into())
            .await
    }

    /// Adds a learner (non-voting member).
    pub async fn add_learner(
        &self,
        id: NodeId,
        context: impl Into<Vec<u8>>,
    ) -> Result<ConfState, ConfChangeError> {
        self.change(MembershipChange::AddLearner(id), context.into())
            .await
    }

    /// Promotes a learner to voter. Refused with
    /// [`ConfChangeError::LearnerNotCaughtUp`] until it has caught up.
    pub async fn promote_learner(&self, id: NodeId) -> Result<ConfState, ConfChangeError> {
        self.change(MembershipChange::PromoteLearner(id), Vec::new())
            .await
    }

    /// Removes a member, the leader itself included. Refused if it would
    /// leave no voter.
    pub async fn remove_node(&self, id: NodeId) -> Result<ConfState, ConfChangeError> {
        self.change(MembershipChange::Remove(id), Vec::new()).await
    }

    /// Transfers leadership to `to`. Resolves once `to` leads.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), TransferError> {
        let (reply, rx) = oneshot::channel();
        if !self.request(Request::Transfer { to, reply }).await {
            return Err(TransferError::Shutdown);
        }
        rx.await.unwrap_or(Err(TransferError::Shutdown))
    }

    /// A point-in-time view of this node. `None` once it has stopped.
    pub async fn status(&self) -> Option<Status> {
        let (reply, rx) = oneshot::channel();
        if !self.request(Request::Status { reply }).await {
            return None;
        }
        rx.await.ok()
    }

    /// Takes a snapshot of the state machine at its applied index now, records
    /// it, and compacts the log behind it (as the automatic snapshots every
    /// `snapshot_interval_entries` do). Returns the existing snapshot if
    /// nothing was applied since.
    pub async fn snapshot(&self) -> Result<SnapshotMeta, SnapshotError> {
        let (reply, rx) = oneshot::channel();
        if !self.request(Request::Snapshot { reply }).await {
            return Err(SnapshotError::Shutdown);
        }
        rx.await.unwrap_or(Err(SnapshotError::Shutdown))
    }

    /// Tells the transport where peer `id` listens (`host:port`), for
    /// members added at run time. The in-process network ignores it.
    pub async fn set_peer_address(
        &self,
        id: NodeId,
        address: impl Into<String>,
    ) -> Result<(), TransportError> {
        let (reply, rx) = oneshot::channel();
        let address = address.into();
        if !self
            .request(Request::SetPeer {
                id,
                address: address.clone(),
                reply,
            })
            .await
        {
            return Err(TransportError::InvalidAddress {
                id,
                address,
                reason: "node is shutting down".into(),
            });
        }
        rx.await.unwrap_or(Ok(()))
    }

    /// The leader this node knows now (itself when it leads), without a
    /// round trip to the ready loop: the value of the newest
    /// [`NodeEvent::LeaderChanged`]. `None` while no leader is known and once
    /// the node stopped. As any leader hint, it may be stale by the time it
    /// is used; proposals on a node that lost leadership still fail with
    /// [`ProposeError::NotLeader`].
    pub fn leader(&self) -> Option<NodeId> {
        *self.shared.leader.borrow()
    }

    /// The term of the newest leader change this node saw (0 before any),
    /// without a round trip to the ready loop; [`Node::status`] has the
    /// current one.
    pub fn term(&self) -> u64 {
        self.shared.term.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until this node knows a leader, and returns it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, WaitError> {
        let mut leader = self.shared.leader.subscribe();
        let wait = async {
            loop {
                if let Some(l) = *leader.borrow_and_update() {
                    return Ok(l);
                }
                if self.is_stopped() {
                    return Err(WaitError::Shutdown);
                }
                // The sender lives as long as the node's handles: a closed
                // channel cannot happen while `self` exists; treat it as a stop.
                if leader.changed().await.is_err() {
                    return Err(WaitError::Shutdown);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(WaitError::Timeout))
    }

    /// Sends `data` to peer `to` over the peer transport, where it arrives
    /// as [`NodeEvent::Note`] with this node as `from`. Fire and forget: a
    /// note may be lost (send again until you see its effect); it is as
    /// authenticated as the transport (with mutual TLS bound to node names,
    /// the receiver knows who sent it). Not ordered with Raft's messages'
    /// effects, and never seen by Raft.
    pub async fn send_note(&self, to: NodeId, data: impl Into<Vec<u8>>) -> Result<(), NoteError> {
        let data = data.into();
        if data.len() > NOTE_BYTES_MAX {
            return Err(NoteError::TooLarge {
                size_bytes: data.len(),
                limit_bytes: NOTE_BYTES_MAX,
            });
        }
        if self.request(Request::Note { to, data }).await {
            Ok(())
        } else {
            Err(NoteError::Shutdown)
        }
    }

    /// Subscribes to leader and membership changes, and notes from peers.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared
            .events
            .get_or_init(|| broadcast::channel(EVENTS_BUFFERED).0)
            .subscribe()
    }

    /// True once the node's ready loop has stopped (shutdown or fatal error).
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Why the node stopped, once it has; `None` while it runs.
    pub fn stop_reason(&self) -> Option<Stopped> {
        self.shared.stop.borrow().clone()
    }

    /// Resolves when the node stops, with why. An application that runs
    /// a node for the life of its process waits on this beside its other
    /// work and exits non-zero on [`Stopped::Fatal`].
    pub async fn stopped(&self) -> Stopped {
        let mut stop = self.shared.stop.subscribe();
        let reason = match stop.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().expect("waited for Some"),
            // The sender lives in `self.shared`: it cannot close while
            // `self` exists.
            Err(_) => Stopped::Shutdown,
        };
        reason
    }

    /// Stops the node and resolves when every task it started has ended.
    /// Pending requests fail with a shutdown error. Idempotent.
    pub async fn shutdown(&self) {
        let _ = self.shared.requests.send(Request::Shutdown).await;
        let tasks = std::mem::take(&mut *self.shared.tasks.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
        // A host group has no tasks of its own: its shards say when it
        // stopped (after its state machine was let go).
        if matches!(self.shared.requests, RequestTx::Shard { .. }) {
            self.stopped().await;
        }
    }
}

/// A number nobody can guess and that differs on every call: SipHash,
/// keyed from the OS's randomness (std's `RandomState`), of a counter, the
/// clock and the process id. Session secrets and node incarnations.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(now.as_nanos());
    }
    h.write_u32(std::process::id());
    h.finish()
}
