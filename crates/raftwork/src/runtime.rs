//! The tokio shell: the ready-loop task that feeds events to the core and
//! carries out its actions, the apply task that owns the state machine, and
//! the sync worker that makes the log durable off the loop.
//!
//! ```text
//!  Node handles ──requests──▶ ┌────────────┐ ──Send──▶ Transport
//!  Transport ─────inbox─────▶ │ ready loop │ ──Apply/Read──▶ apply task ──▶ StateMachine
//!  tick timer ──────────────▶ │  (Core)    │ ◀──applied index──┘
//!                             └────────────┘ ──Persist──▶ sync worker (fsync) ─┐
//!                                   ▲────────────── persisted number ───────────┘
//! ```
//!
//! Invariants:
//! * the loop is the only owner of the core; nothing else touches raft;
//! * the apply queue is FIFO, so a read released after an `Apply` runs after
//!   it: that is what makes a ReadIndex read see every earlier write;
//! * persists complete in ready order (one worker, in order);
//! * a sync error is fatal: the loop stops and every pending request fails.
//!
//! A node of its own runs [`ReadyLoop::run`] on the channels drawn above
//! (`Inputs`). A `Host`'s group runs the same loop body without them: its
//! worker shard hands it events and collects its persists (`shard.rs`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use raft::prelude::{ConfState, Message, MessageType, SnapshotMetadata};
use raftwork_core::{
    Action, ApplyBatch, ConfChangeError, Core, NodeEvent, NodeId, ProposeError, RequestId,
    TransferError,
};
use raftwork_storage::{LogStore, SnapshotMeta, SnapshotStore, StorageError};
use raftwork_transport::{Envelope, Inbound, Inbox, Transport};
use tokio::sync::{mpsc, oneshot};

use crate::node::{
    panic_message, AppliedAt, FatalReason, ProposeReply, ReadFn, Request, SnapshotError, Stopped,
};
use crate::session::{SessionKey, SessionProposal, SessionReply, FORWARD_CONTEXT};
use crate::state_machine::{Command, ResponseBytes, SnapshotView, StateMachine};
use raftwork_core::session::{classify, Applied, EntryKind, SessionConfig, SessionTable};

/// Marks a note (`Node::send_note`): a `MsgPropose` with this context and
/// one entry. The loop takes notes out before the core sees anything (the
/// core refuses every `MsgPropose` from a peer), so no note reaches Raft.
const NOTE_CONTEXT: &[u8] = b"raftwork-note";

fn is_note(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgPropose && m.context.as_ref() == NOTE_CONTEXT
}

fn is_forward(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgPropose && m.context.as_ref() == FORWARD_CONTEXT
}

/// Ticks between sweeps of the session waiters (closed ones dropped,
/// forwards unanswered for too long failed).
const SESSION_SWEEP_TICKS: u64 = 5;

/// Most events drained per channel before the core is polled; bounds the
/// loop's latency while still batching bursts.
const DRAIN_EVENTS_MAX: usize = 4096;

/// Where a ready loop's apply messages go: its node's apply task, or its
/// host's apply shard.
pub(crate) type ApplySink<SM> = Box<dyn Fn(ApplyMsg<SM>) + Send>;

/// Where an applier's events go: its node's ready loop, or its host shard.
/// Shared with the thread that writes a snapshot view.
pub(crate) type ApplyEvents = Arc<dyn Fn(ApplyEvent) + Send + Sync>;

/// What the ready loop asks of the apply task. Large payloads are boxed: a
/// channel allocates its first block of 32 slots at creation, so the
/// enum's size is paid by every group, idle or not.
pub(crate) enum ApplyMsg<SM: StateMachine> {
    Apply(Box<ApplyWork<SM>>),
    /// Restore from the snapshot at this point; its data is already in the
    /// snapshot store.
    Restore(Box<SnapshotMetadata>),
    Reads(Vec<ReadFn<SM>>),
    /// Write a snapshot at `metadata` (the core's `TakeSnapshot`): the
    /// state machine is exactly there when this arrives (FIFO).
    TakeSnapshot {
        metadata: Box<SnapshotMetadata>,
        id: Option<RequestId>,
    },
}

/// Committed entries to apply, with the replies waiting for them.
pub(crate) struct ApplyWork<SM: StateMachine> {
    batch: ApplyBatch,
    /// Plain proposals of this node, by index, in index order.
    replies: Vec<(u64, ProposeReply<SM>)>,
    /// Session requests waiting at this node, by the index of the entry
    /// that answers them.
    session_replies: HashMap<u64, SessionReply<SM>>,
}

/// What the apply task tells the ready loop.
pub(crate) enum ApplyEvent {
    /// Everything up to this index is applied.
    Applied(u64),
    /// The snapshot a `TakeSnapshot` asked for is in the snapshot store (or
    /// could not be written).
    SnapshotTaken {
        id: Option<RequestId>,
        result: Box<Result<SnapshotMeta, String>>,
    },
    /// The node must stop: a snapshot could not be restored, or the state
    /// machine panicked.
    Fatal(FatalReason),
}

/// The state-machine side: applies in order and writes the snapshots the
/// core asks for. It never touches the log: the core records snapshots and
/// compacts.
pub(crate) struct Applier<SM: StateMachine> {
    pub(crate) sm: SM,
    /// The replicated session table: part of the state, in every snapshot.
    pub(crate) sessions: SessionTable,
    /// The limits of a table restored from a snapshot without one.
    pub(crate) session_config: SessionConfig,
    pub(crate) snapshots: Arc<dyn SnapshotStore>,
    pub(crate) applied_index: u64,
    /// The term of the entry at `applied_index`.
    pub(crate) applied_term: u64,
    /// Where its events go: the node's ready loop, or its host shard.
    pub(crate) events: ApplyEvents,
    pub(crate) metrics: crate::metrics::ApplyMetrics,
    /// Commands at or below this index are already in an on-disk state
    /// machine's store (its durable index at start, when that was at or
    /// past the snapshot the node started from): the replay from the
    /// snapshot passes them through the session table only.
    pub(crate) skip_through: u64,
    /// The snapshot view being written on a thread of its own, if any.
    pub(crate) view_writer: Option<std::thread::JoinHandle<()>>,
    /// The applier hit a fatal error: the state machine's state is
    /// unknown, so nothing of it is made durable on drop.
    pub(crate) failed: bool,
}

impl<SM: StateMachine> Drop for Applier<SM> {
    /// Waits for a snapshot view being written (a stopped group leaves
    /// nothing running), then makes an on-disk state machine durable at
    /// the applied index, so a restart replays less.
    fn drop(&mut self) {
        self.join_view_writer();
        if self.failed {
            return;
        }
        let applied = self.applied_index;
        let synced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.sm.disk().map(|disk| disk.sync(applied))
        }));
        match synced {
            Ok(Some(Err(e))) => {
                tracing::error!(error = %e, applied, "on-disk state machine: sync at stop failed")
            }
            Err(_) => tracing::error!(applied, "on-disk state machine: sync at stop panicked"),
            Ok(_) => {}
        }
    }
}

/// Runs the applier until the ready loop hangs up.
pub(crate) async fn apply_task<SM: StateMachine>(
    mut applier: Applier<SM>,
    mut rx: mpsc::UnboundedReceiver<ApplyMsg<SM>>,
) {
    while let Some(msg) = rx.recv().await {
        applier.metrics.queue.set(rx.len() as f64);
        if !applier.handle_or_report(msg) {
            return;
        }
    }
}

impl<SM: StateMachine> Applier<SM> {
    /// Handles `msg`; false (after reporting it to the ready loop) if the
    /// applier hit a fatal error and must get nothing more. A panicking
    /// state machine stops the node with a reason, instead of leaving a
    /// loop whose applies go nowhere.
    pub(crate) fn handle_or_report(&mut self, msg: ApplyMsg<SM>) -> bool {
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handle(msg)));
        let fatal = match handled {
            Ok(Ok(())) => return true,
            Ok(Err(fatal)) => fatal,
            Err(payload) => match payload.downcast::<crate::state_machine::StorageFailure>() {
                Ok(failure) => FatalReason::StateMachineStorage { detail: failure.0 },
                Err(payload) => FatalReason::StateMachinePanicked {
                    message: panic_message(payload.as_ref()),
                },
            },
        };
        tracing::error!(error = %fatal, "applier stopping on a fatal error");
        self.failed = true;
        (self.events)(ApplyEvent::Fatal(fatal));
        false
    }

    fn handle(&mut self, msg: ApplyMsg<SM>) -> Result<(), FatalReason> {
        match msg {
            ApplyMsg::Apply(work) => {
                let ApplyWork {
                    batch,
                    replies,
                    session_replies,
                } = *work;
                let Some(last) = batch.entries.last() else {
                    return Ok(());
                };
                let (index, term) = (last.index, last.term);
                let started = std::time::Instant::now();
                self.metrics
                    .batch_entries
                    .record(batch.entries.len() as f64);
                let _span = tracing::debug_span!(
                    target: "raftwork::apply",
                    "apply_batch",
                    first_index = batch.entries[0].index,
                    last_index = index,
                    entries = batch.entries.len()
                )
                .entered();
                apply_batch(
                    &mut self.sm,
                    &mut self.sessions,
                    self.skip_through,
                    batch,
                    replies,
                    session_replies,
                );
                self.metrics.batch_duration.record(started.elapsed());
                self.applied_index = index;
                self.applied_term = term;
                (self.events)(ApplyEvent::Applied(index));
            }
            ApplyMsg::Restore(meta) => {
                let restore_failed = |detail: String| FatalReason::SnapshotRestore {
                    index: meta.index,
                    detail,
                };
                let started = std::time::Instant::now();
                let (info, mut reader) = self
                    .snapshots
                    .open(meta.index)
                    .map_err(|e| restore_failed(format!("opening it: {e}")))?;
                // A snapshot that cannot be restored leaves the state machine
                // undefined; continuing would diverge.
                // A view still being written reads the state it was taken
                // from, not this one; wait for it all the same, so that
                // snapshots are reported in order.
                self.join_view_writer();
                self.sessions = crate::session::restore(
                    &mut self.sm,
                    meta.index,
                    self.session_config,
                    &mut reader,
                )
                .map_err(|e| restore_failed(e.to_string()))?;
                self.metrics.restore.record(started.elapsed());
                self.metrics.restore_size.record(info.size_bytes as f64);
                self.applied_index = meta.index;
                self.applied_term = meta.term;
                (self.events)(ApplyEvent::Applied(meta.index));
            }
            ApplyMsg::Reads(reads) => {
                let at = AppliedAt {
                    index: self.applied_index,
                    term: self.applied_term,
                };
                for read in reads {
                    read(Ok((&self.sm, at)));
                }
            }
            ApplyMsg::TakeSnapshot { metadata, id } => {
                assert_eq!(
                    metadata.index, self.applied_index,
                    "a snapshot is taken exactly at the applied index"
                );
                // One view written at a time.
                self.join_view_writer();
                // An on-disk store first holds durably everything the
                // snapshot covers: the log is compacted behind it.
                let applied = self.applied_index;
                if let Some(disk) = self.sm.disk() {
                    disk.sync(applied)
                        .map_err(|e| FatalReason::StateMachineStorage {
                            detail: format!("sync at {applied} for a snapshot: {e}"),
                        })?;
                }
                match self.sm.snapshot_view() {
                    Some(view) => self.write_view(*metadata, id, view),
                    None => {
                        let result = Box::new(self.write_snapshot(*metadata));
                        (self.events)(ApplyEvent::SnapshotTaken { id, result });
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits for the snapshot view being written, if any (it reports
    /// itself).
    fn join_view_writer(&mut self) {
        if let Some(writer) = self.view_writer.take() {
            // The thread catches the view's panics itself.
            let _ = writer.join();
        }
    }

    /// Writes `view` (the state at `metadata`) into the snapshot store on a
    /// thread of its own; applies go on meanwhile. The session table is
    /// encoded here, at the same point as the view.
    fn write_view(
        &mut self,
        metadata: SnapshotMetadata,
        id: Option<RequestId>,
        view: Box<dyn SnapshotView>,
    ) {
        match self.snapshots.latest() {
            Ok(Some(latest))
                if (latest.metadata.index, latest.metadata.term)
                    == (metadata.index, metadata.term) =>
            {
                let result = Box::new(Ok(latest));
                (self.events)(ApplyEvent::SnapshotTaken { id, result });
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let result = Box::new(Err(e.to_string()));
                (self.events)(ApplyEvent::SnapshotTaken { id, result });
                return;
            }
        }
        let table = self.sessions.encode();
        let snapshots = self.snapshots.clone();
        let events = self.events.clone();
        let (save, save_size) = (self.metrics.save.clone(), self.metrics.save_size.clone());
        let write = move || -> Result<SnapshotMeta, String> {
            let started = std::time::Instant::now();
            let mut writer = snapshots.create(metadata).map_err(|e| e.to_string())?;
            crate::session::write_section(&table, &mut writer).map_err(|e| e.to_string())?;
            view.write_to(&mut writer).map_err(|e| e.to_string())?;
            let meta = writer.commit().map_err(|e| e.to_string())?;
            save.record(started.elapsed());
            save_size.record(meta.size_bytes as f64);
            tracing::info!(
                index = meta.metadata.index,
                size_bytes = meta.size_bytes,
                "snapshot taken (written off the apply path)"
            );
            Ok(meta)
        };
        let spawned = std::thread::Builder::new()
            .name("raftwork-snapshot".into())
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(write))
                    .unwrap_or_else(|payload| {
                        Err(format!(
                            "the snapshot view panicked: {}",
                            panic_message(payload.as_ref())
                        ))
                    });
                events(ApplyEvent::SnapshotTaken {
                    id,
                    result: Box::new(result),
                });
            });
        match spawned {
            Ok(handle) => self.view_writer = Some(handle),
            Err(e) => {
                let result = Box::new(Err(format!("cannot start a snapshot thread: {e}")));
                (self.events)(ApplyEvent::SnapshotTaken { id, result });
            }
        }
    }

    /// Streams the state machine into the snapshot store at `metadata`, the
    /// point it is at now (or finds that snapshot already there).
    fn write_snapshot(&mut self, metadata: SnapshotMetadata) -> Result<SnapshotMeta, String> {
        if let Some(latest) = self.snapshots.latest().map_err(|e| e.to_string())? {
            if (latest.metadata.index, latest.metadata.term) == (metadata.index, metadata.term) {
                return Ok(latest);
            }
        }
        let started = std::time::Instant::now();
        let mut writer = self.snapshots.create(metadata).map_err(|e| e.to_string())?;
        crate::session::write_snapshot(&self.sm, &self.sessions, &mut writer)
            .map_err(|e| e.to_string())?;
        let meta = writer.commit().map_err(|e| e.to_string())?;
        self.metrics.save.record(started.elapsed());
        self.metrics.save_size.record(meta.size_bytes as f64);
        tracing::info!(
            index = meta.metadata.index,
            size_bytes = meta.size_bytes,
            "snapshot taken"
        );
        Ok(meta)
    }
}

/// A command of a run: its position in the batch, its session key (session,
/// sequence) if in a session, and its log time.
type RunItem = (usize, Option<(u64, u64)>, u64);

/// Applies a batch: the session table's step for every entry, then the
/// user's state machine for the commands it lets through, in runs (one
/// `apply` call per run). A run is cut before a command whose earlier copy
/// is still in it, so the copy is checked against the first one's recorded
/// answer; `SessionTable::record` makes the table the same however the
/// runs fall (see it).
fn apply_batch<SM: StateMachine>(
    sm: &mut SM,
    table: &mut SessionTable,
    skip_through: u64,
    batch: ApplyBatch,
    replies: Vec<(u64, ProposeReply<SM>)>,
    mut session_replies: HashMap<u64, SessionReply<SM>>,
) {
    let entries = &batch.entries;
    let mut replies = replies.into_iter().peekable();
    // Positions in `entries` of the commands to apply, with their session
    // key if in a session, and their log time.
    let mut run: Vec<RunItem> = Vec::new();
    let mut run_keys: HashSet<(u64, u64)> = HashSet::new();
    let mut flush = |run: &mut Vec<RunItem>,
                     run_keys: &mut HashSet<(u64, u64)>,
                     table: &mut SessionTable,
                     session_replies: &mut HashMap<u64, SessionReply<SM>>| {
        if run.is_empty() {
            return;
        }
        let commands: Vec<Command<'_>> = run
            .iter()
            .map(|&(pos, _, log_time_ms)| Command {
                index: entries[pos].index,
                term: entries[pos].term,
                data: &entries[pos].data,
                log_time_ms,
            })
            .collect();
        let responses = sm.apply(&commands);
        assert_eq!(
            responses.len(),
            commands.len(),
            "StateMachine::apply must return one response per command"
        );
        for (&(pos, key, _), response) in run.iter().zip(responses) {
            let index = entries[pos].index;
            if let Some((session, seq)) = key {
                table.record(session, seq, response.to_bytes().into());
                if let Some(SessionReply::Command(reply)) = session_replies.remove(&index) {
                    let _ = reply.send(Ok((index, response)));
                }
                continue;
            }
            if replies.peek().is_some_and(|(i, _)| *i == index) {
                let (_, reply) = replies.next().unwrap();
                let _ = reply.send(Ok((index, response)));
            }
        }
        run.clear();
        run_keys.clear();
    };
    for (pos, e) in entries.iter().enumerate() {
        if e.get_entry_type() != raft::prelude::EntryType::EntryNormal {
            continue;
        }
        let key = match classify(&e.context) {
            Some((EntryKind::SessionCommand { session, seq, .. }, _)) => Some((session, seq)),
            _ => None,
        };
        if key.is_some_and(|k| run_keys.contains(&k)) {
            flush(&mut run, &mut run_keys, table, &mut session_replies);
        }
        match table.apply_entry(e.index, &e.context) {
            // Already in an on-disk state machine's store.
            Applied::Apply if e.index <= skip_through => {}
            Applied::Apply => {
                if let Some(k) = key {
                    run_keys.insert(k);
                }
                run.push((pos, key, table.log_time_ms()));
            }
            Applied::Answer(bytes) => {
                if let Some(SessionReply::Command(reply)) = session_replies.remove(&e.index) {
                    let response = SM::Response::from_bytes(&bytes).unwrap_or_else(|| {
                        panic!(
                            "ResponseBytes::from_bytes cannot read the cached response \
                             answering entry {} (the state machine broke its contract)",
                            e.index
                        )
                    });
                    let _ = reply.send(Ok((e.index, response)));
                }
            }
            Applied::Refuse(error) => {
                if let Some(reply) = session_replies.remove(&e.index) {
                    reply.fail(error.into());
                }
            }
            Applied::Registered(id) => {
                if let Some(SessionReply::Register(reply)) = session_replies.remove(&e.index) {
                    let _ = reply.send(Ok(id));
                }
            }
            Applied::Skip => {
                if let Some(SessionReply::Unregister(reply)) = session_replies.remove(&e.index) {
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }
    flush(&mut run, &mut run_keys, table, &mut session_replies);
    assert!(
        replies.next().is_none(),
        "a local proposal was not among the applied commands"
    );
}

/// A session request waiting at this node for its entry to be applied.
pub(crate) struct SessionWaiter<SM: StateMachine> {
    pub(crate) reply: SessionReply<SM>,
    /// The tick it was forwarded to the leader at; `None` if this node
    /// proposed it as leader (the core then times it out).
    pub(crate) forwarded_at: Option<u64>,
}

/// Everything the loop owns.
pub(crate) struct ReadyLoop<SM: StateMachine, S: LogStore> {
    pub(crate) core: Core<S>,
    pub(crate) transport: Box<dyn Transport>,
    pub(crate) apply_tx: ApplySink<SM>,
    pub(crate) snapshots: Arc<dyn SnapshotStore>,
    pub(crate) events: crate::node::Events,
    /// The leader this node knows, for `Node::leader` (no round trip).
    pub(crate) leader: tokio::sync::watch::Sender<Option<NodeId>>,
    /// The term of the newest leader change, for `Node::term`.
    pub(crate) term: Arc<std::sync::atomic::AtomicU64>,
    pub(crate) tick_interval: std::time::Duration,
    /// A host group's place among hosts (whether it sleeps, and whose
    /// host it watches then); a node of its own has none and never sleeps.
    pub(crate) clock: crate::clock::Clock,
    /// When the last tick was handed to the core: a leader whose loop
    /// stalled must not trust its tick count for a lease (see `drive`).
    pub(crate) last_tick_at: std::time::Instant,
    pub(crate) stopped: Arc<std::sync::atomic::AtomicBool>,
    /// Why the loop stopped, for `Node::stop_reason`.
    pub(crate) stop: tokio::sync::watch::Sender<Option<Stopped>>,
    pub(crate) sync: SyncMode,
    pub(crate) next_request_id: RequestId,
    pub(crate) proposals: HashMap<RequestId, ProposeReply<SM>>,
    /// Spans of the proposals being traced (none unless `raftwork::propose`
    /// is enabled at debug level).
    pub(crate) proposal_spans: HashMap<RequestId, tracing::Span>,
    /// Session requests by the key their entry is recognised by.
    pub(crate) session_waiters: HashMap<SessionKey, SessionWaiter<SM>>,
    /// Session requests this node proposed as leader, for the core's
    /// failure replies.
    pub(crate) session_ids: HashMap<RequestId, SessionKey>,
    /// Counter in the nonces of this node's register entries.
    pub(crate) register_nonces: u64,
    /// The session limits this node's register entries carry.
    pub(crate) session_config: SessionConfig,
    /// Linearizable reads waiting for their read index, with their arrival.
    pub(crate) reads: HashMap<RequestId, (std::time::Instant, ReadFn<SM>)>,
    pub(crate) metrics: crate::metrics::LoopMetrics,
    pub(crate) conf_changes:
        HashMap<RequestId, oneshot::Sender<Result<ConfState, ConfChangeError>>>,
    pub(crate) transfers: HashMap<RequestId, oneshot::Sender<Result<(), TransferError>>>,
    /// Manual snapshot requests waiting for the apply task.
    pub(crate) snapshot_replies:
        HashMap<RequestId, oneshot::Sender<Result<SnapshotMeta, SnapshotError>>>,
}

/// How persists are made durable.
pub(crate) enum SyncMode {
    /// The store keeps nothing across a crash: acknowledge at once.
    Inline,
    /// The node's own sync thread: `jobs(number, must_sync)` queues a
    /// ready's persist; the thread answers on the loop's `Inputs::persisted`
    /// with the highest number made durable (or why not).
    ///
    /// A persist with nothing to make durable (`must_sync` false: only the
    /// commit index moved) is acknowledged on the loop at once when every
    /// earlier one is acknowledged (`answered >= sent`): persists complete
    /// in order, and a trip to the thread and back would cost two thread
    /// wake-ups for nothing. Its change stays staged; the next write or
    /// sync takes it.
    Worker {
        jobs: Box<dyn Fn(u64, bool) + Send>,
        /// Highest number queued to the thread.
        sent: u64,
        /// Highest number the thread answered.
        answered: u64,
    },
    /// A host group: the persist waits here until its shard collects it
    /// (`ReadyLoop::take_persist`), so one job to the host's sync thread
    /// covers every group the shard drove in a round.
    #[cfg_attr(not(feature = "host"), allow(dead_code))]
    Deferred { pending: Option<(u64, bool)> },
}

/// The channels a node of its own reads (a host group's shard reads its
/// own instead).
pub(crate) struct Inputs<SM: StateMachine> {
    pub(crate) inbox: Inbox,
    pub(crate) requests: mpsc::Receiver<Request<SM>>,
    pub(crate) applied: mpsc::UnboundedReceiver<ApplyEvent>,
    /// The sync thread's answers (`SyncMode::Worker`).
    pub(crate) persisted: Option<mpsc::UnboundedReceiver<Result<u64, String>>>,
}

/// Starts the sync worker thread for `store`; returns how to queue jobs,
/// where the answers come, and the thread.
pub(crate) fn spawn_sync_worker<S: LogStore>(
    store: S,
) -> (
    SyncMode,
    mpsc::UnboundedReceiver<Result<u64, String>>,
    std::thread::JoinHandle<()>,
) {
    let (jobs_tx, mut jobs_rx) = mpsc::unbounded_channel::<(u64, bool)>();
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let handle = std::thread::Builder::new()
        .name("raftwork-sync".into())
        .spawn(move || {
            while let Some((mut number, mut must_sync)) = jobs_rx.blocking_recv() {
                // Group commit: one sync covers every ready queued by now.
                while let Ok((n, m)) = jobs_rx.try_recv() {
                    number = n;
                    must_sync |= m;
                }
                if must_sync {
                    let _span = tracing::debug_span!(
                        target: "raftwork::persist",
                        "wal_sync",
                        up_to_ready = number
                    )
                    .entered();
                    if let Err(e) = store.sync() {
                        let _ = done_tx.send(Err(e.to_string()));
                        return;
                    }
                }
                if done_tx.send(Ok(number)).is_err() {
                    return;
                }
            }
        })
        .expect("spawning the sync worker thread");
    (
        SyncMode::Worker {
            jobs: Box::new(move |number, must_sync| {
                let _ = jobs_tx.send((number, must_sync));
            }),
            sent: 0,
            answered: 0,
        },
        done_rx,
        handle,
    )
}

/// Runs `f` on a loop; an error or a panic (a broken invariant here or in
/// raft-rs) becomes why the loop stops, and whether it panicked.
pub(crate) fn catch_stop(f: impl FnOnce() -> Result<(), Stopped>) -> Result<(), (Stopped, bool)> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(reason)) => Err((reason, false)),
        Err(payload) => Err((
            Stopped::Fatal(FatalReason::LoopPanicked {
                message: panic_message(payload.as_ref()),
            }),
            true,
        )),
    }
}

enum Step<SM: StateMachine> {
    Request(Request<SM>),
    Inbound(Inbound),
    Applied(ApplyEvent),
    /// The apply task ended (it only does on a fatal error it reported, or
    /// a panic it could not catch).
    ApplyTaskGone,
    Persisted(Result<u64, String>),
    Tick,
    Closed,
}

/// Marks the node stopped, clears its known leader and publishes why it
/// stopped: made when a loop starts, finished when it ends. Dropped
/// unfinished (unwinding from a panic outside the loop's own catch), it
/// publishes that the loop panicked.
pub(crate) struct StopGuard {
    stopped: Arc<std::sync::atomic::AtomicBool>,
    leader: tokio::sync::watch::Sender<Option<NodeId>>,
    stop: tokio::sync::watch::Sender<Option<Stopped>>,
    reason: Option<Stopped>,
}

impl StopGuard {
    pub(crate) fn finish(mut self, reason: Stopped) {
        self.reason = Some(reason);
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        // Stopped before the leader is cleared: a waiter woken by the
        // change must see the stop (Node::wait_for_leader).
        self.stopped.store(true, Ordering::Release);
        self.leader.send_replace(None);
        let reason = self.reason.take().unwrap_or_else(|| {
            Stopped::Fatal(FatalReason::LoopPanicked {
                message: "the ready loop ended by a panic (see the log)".into(),
            })
        });
        self.stop.send_replace(Some(reason));
    }
}

impl<SM: StateMachine, S: LogStore> ReadyLoop<SM, S> {
    /// The guard that publishes this loop's stop (see [`StopGuard`]).
    pub(crate) fn stop_guard(&self) -> StopGuard {
        StopGuard {
            stopped: self.stopped.clone(),
            leader: self.leader.clone(),
            stop: self.stop.clone(),
            reason: None,
        }
    }

    /// A node of its own: runs the loop on its channels until it stops.
    pub(crate) async fn run(mut self, mut inputs: Inputs<SM>) {
        // Marks the node stopped however the loop ends, a panic included
        // (raft-rs panics on a broken invariant), so `Node::leader` and
        // `wait_for_leader` never report a leader of a dead loop.
        let stop_guard = self.stop_guard();
        let mut interval = tokio::time::interval_at(
            tokio::time::Instant::now() + self.tick_interval,
            self.tick_interval,
        );
        // Missed ticks are delayed, never burst (see `drive`).
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (reason, panicked) = loop {
            let step = tokio::select! {
                biased;
                r = Self::next_persisted(&mut inputs.persisted) => Step::Persisted(r),
                i = inputs.applied.recv() => i.map_or(Step::ApplyTaskGone, Step::Applied),
                Some(m) = inputs.inbox.recv() => Step::Inbound(m),
                r = inputs.requests.recv() => r.map_or(Step::Closed, Step::Request),
                _ = interval.tick() => Step::Tick,
            };
            let queued = inputs.requests.len();
            let stepped = catch_stop(|| {
                self.handle_step(step, queued)?;
                self.drain(&mut inputs)?;
                self.drive()
            });
            if let Err(stop) = stepped {
                break stop;
            }
        };
        self.finish(&reason, panicked);
        stop_guard.finish(reason);
        // Requests still queued get their shutdown error as their replies drop.
        inputs.requests.close();
        while let Ok(r) = inputs.requests.try_recv() {
            drop(r);
        }
        // Dropping apply_tx ends the apply task after its queue drains;
        // dropping the sync jobs sender ends the sync worker.
    }

    /// Ends the loop: fails what waits and shuts the transport (the
    /// caller then publishes why, through the loop's `StopGuard`).
    pub(crate) fn finish(&mut self, reason: &Stopped, panicked: bool) {
        let node = self.core.id();
        let group = self.core.group_id();
        match reason {
            Stopped::Fatal(e) => {
                tracing::error!(node, group, error = %e, "node stopped on a fatal error")
            }
            _ => tracing::info!(node, group, "node stopped"),
        }
        // A group that stops while leading goes silent: its followers
        // elsewhere hear of it through this host's epoch. (A leader that
        // steps down while running does so by messages its followers see.)
        if panicked || self.core.role() == raftwork_core::Role::Leader {
            self.clock.stopped_leading();
        }
        self.clock.wake();
        // After a panic the core's state is unknown: fail everything by
        // dropping it instead of asking it for its last actions.
        if !panicked {
            let actions = self.core.shutdown();
            self.execute(actions);
        }
        self.transport.shutdown();
    }

    async fn next_persisted(
        persisted: &mut Option<mpsc::UnboundedReceiver<Result<u64, String>>>,
    ) -> Result<u64, String> {
        match persisted {
            None => std::future::pending().await,
            Some(done) => match done.recv().await {
                Some(r) => r,
                None => Err("sync worker stopped".into()),
            },
        }
    }

    fn handle_step(&mut self, step: Step<SM>, requests_queued: usize) -> Result<(), Stopped> {
        match step {
            Step::Request(r) => self.handle_request(r),
            Step::Inbound(m) => self.handle_inbound(m),
            Step::Applied(event) => self.handle_apply_event(event),
            Step::ApplyTaskGone => Err(Stopped::Fatal(FatalReason::StateMachinePanicked {
                message: "the apply task ended".into(),
            })),
            Step::Persisted(r) => self.handle_persisted(r),
            Step::Tick => {
                self.handle_tick(requests_queued);
                Ok(())
            }
            Step::Closed => Err(Stopped::Shutdown),
        }
    }

    /// The sync thread's answer: durable up to ready `r`, or why not.
    pub(crate) fn handle_persisted(&mut self, r: Result<u64, String>) -> Result<(), Stopped> {
        match r {
            Ok(n) => {
                tracing::debug!(target: "raftwork::persist", ready = n, "persisted");
                if let SyncMode::Worker { answered, sent, .. } = &mut self.sync {
                    assert!(
                        n <= *sent && n >= *answered,
                        "the sync thread answered {n}: only {sent} was sent, {answered} answered"
                    );
                    *answered = n;
                }
                self.core.handle_persisted(n);
                Ok(())
            }
            Err(detail) => Err(Stopped::Fatal(FatalReason::LogStore {
                detail: format!("sync failed: {detail}"),
            })),
        }
    }

    /// One tick of the core's clock (never called while it hibernates).
    pub(crate) fn handle_tick(&mut self, requests_queued: usize) {
        self.core.handle_tick();
        self.last_tick_at = std::time::Instant::now();
        if self.core.tick_count().is_multiple_of(SESSION_SWEEP_TICKS) {
            self.sweep_session_waiters();
        }
        let pending = self.proposals.len() + self.session_waiters.len();
        self.metrics
            .sample(&self.core.status(), pending, requests_queued);
        self.maybe_hibernate();
    }

    /// A sleeping follower's leader's host changed (dead, restarted, or a
    /// group there stopped while leading): wake, and elect if the leader
    /// is gone. A repeat of the view it fell asleep under changes nothing.
    #[cfg_attr(not(feature = "host"), allow(dead_code))]
    pub(crate) fn check_leader_host(&mut self) {
        if self.clock.leader_host_changed() {
            self.core.handle_leader_host_changed();
        }
    }

    /// A host group's persist waiting for its shard (`SyncMode::Deferred`).
    #[cfg_attr(not(feature = "host"), allow(dead_code))]
    pub(crate) fn take_persist(&mut self) -> Option<(u64, bool)> {
        match &mut self.sync {
            SyncMode::Deferred { pending } => pending.take(),
            _ => None,
        }
    }

    /// Lets the core fall asleep if it has been quiet long enough and the
    /// shell has nothing waiting on ticks either (see `clock.rs`).
    fn maybe_hibernate(&mut self) {
        let after = self.core.config().hibernate_after_ticks;
        if after == 0 || self.core.quiet_ticks() < after {
            return;
        }
        // The shell's own waiters time out by ticks.
        let shell_idle = self.proposals.is_empty()
            && self.session_waiters.is_empty()
            && self.reads.is_empty()
            && self.conf_changes.is_empty()
            && self.transfers.is_empty()
            && self.snapshot_replies.is_empty();
        if !shell_idle {
            return;
        }
        let me = self.core.id();
        let members = self.core.conf_state();
        self.clock.add_peers(
            members
                .voters
                .iter()
                .chain(&members.learners)
                .copied()
                .filter(|&id| id != me),
        );
        let watching = self
            .core
            .leader()
            .filter(|&l| l != me)
            .and_then(|l| self.clock.leader_host_view(l).map(|view| (l, view)));
        let alive = watching.as_ref().is_some_and(|(_, view)| view.alive);
        if self.core.try_hibernate(alive) {
            tracing::debug!(node = me, group = self.core.group_id(), "hibernating");
            self.clock.fell_asleep(watching);
        }
    }

    /// Whether the core sleeps (a host's shard skips its ticks).
    #[cfg_attr(not(feature = "host"), allow(dead_code))]
    pub(crate) fn is_hibernating(&self) -> bool {
        self.core.is_hibernating()
    }

    /// Takes whatever else is already queued, so one poll covers a burst.
    fn drain(&mut self, inputs: &mut Inputs<SM>) -> Result<(), Stopped> {
        for _ in 0..DRAIN_EVENTS_MAX {
            match inputs.inbox.try_recv() {
                Ok(m) => self.handle_inbound(m)?,
                Err(_) => break,
            }
        }
        for _ in 0..DRAIN_EVENTS_MAX {
            match inputs.requests.try_recv() {
                Ok(r) => self.handle_request(r)?,
                Err(_) => break,
            }
        }
        while let Ok(event) = inputs.applied.try_recv() {
            self.handle_apply_event(event)?;
        }
        Ok(())
    }
    pub(crate) fn handle_apply_event(&mut self, event: ApplyEvent) -> Result<(), Stopped> {
        match event {
            ApplyEvent::Applied(i) => self.core.handle_applied(i),
            ApplyEvent::SnapshotTaken { id, result } => {
                let result = *result;
                let point = result
                    .as_ref()
                    .map(|m| m.metadata.clone())
                    .map_err(Clone::clone);
                self.core.handle_snapshot_taken(id, point).map_err(|e| {
                    Stopped::Fatal(FatalReason::LogStore {
                        detail: format!("recording a snapshot: {e}"),
                    })
                })?;
                if let Some(reply) = id.and_then(|id| self.snapshot_replies.remove(&id)) {
                    let _ = reply.send(result.map_err(SnapshotError::Storage));
                }
            }
            ApplyEvent::Fatal(e) => return Err(Stopped::Fatal(e)),
        }
        Ok(())
    }

    /// Polls the core until it has nothing more to do.
    pub(crate) fn drive(&mut self) -> Result<(), Stopped> {
        // Ticks are the core's clock, and the interval delays (never
        // bursts) missed ticks, which keeps a follower's election timer from
        // running ahead of real time. A leader's lease counts the same
        // ticks, so if the loop stalled (ticks late by half an interval) its
        // tick count lags real time: its lease must be renewed first.
        if self.core.config().lease_read && self.last_tick_at.elapsed() > self.tick_interval * 3 / 2
        {
            self.core.expire_lease();
        }
        // The wall clock a leader stamps its proposals with (log time).
        if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            self.core.set_wall_clock_ms(now.as_millis() as u64);
        }
        loop {
            let actions = self.core.poll().map_err(|e| {
                Stopped::Fatal(match e {
                    raftwork_core::FatalError::Raft(e) => FatalReason::Raft {
                        detail: e.to_string(),
                    },
                    e => FatalReason::LogStore {
                        detail: e.to_string(),
                    },
                })
            })?;
            if actions.is_empty() {
                if !self.core.is_hibernating() {
                    self.clock.wake();
                }
                return Ok(());
            }
            if let Some(number) = self.execute(actions) {
                self.core.handle_persisted(number);
            }
        }
    }

    pub(crate) fn handle_inbound(&mut self, inbound: Inbound) -> Result<(), Stopped> {
        match inbound {
            Inbound::Messages(env) => {
                if env.group_id != self.core.group_id() {
                    tracing::warn!(
                        group = env.group_id,
                        "dropping envelope for an unknown group"
                    );
                    return Ok(());
                }
                for mut m in env.messages {
                    if is_note(&m) {
                        self.receive_note(env.from, m);
                        continue;
                    }
                    if is_forward(&m) {
                        self.receive_forward(env.from, m);
                        continue;
                    }
                    if m.get_msg_type() == MessageType::MsgSnapshot
                        && !self.check_incoming_snapshot(&mut m)
                    {
                        continue;
                    }
                    if m.get_msg_type() == MessageType::MsgHeartbeatResponse {
                        self.metrics.heartbeat_answered(env.from);
                    }
                    // A rejected message is counted and logged by the core.
                    let _ = self.core.handle_message(m);
                }
            }
            Inbound::Unreachable { group_id, to } => {
                if group_id == self.core.group_id() {
                    self.core.handle_unreachable(to);
                }
            }
            Inbound::SnapshotStatus { group_id, to, ok } => {
                if group_id == self.core.group_id() {
                    self.core.handle_snapshot_status(to, ok);
                }
            }
        }
        Ok(())
    }

    /// Hands a note to the subscribers, if it is well formed and really from
    /// the envelope's sender (whom the transport authenticated).
    fn receive_note(&mut self, sender: NodeId, mut m: Message) {
        let ok = m.from == sender
            && m.to == self.core.id()
            && m.entries.len() == 1
            && m.entries[0].data.len() <= crate::node::NOTE_BYTES_MAX;
        if !ok {
            tracing::warn!(from = sender, "dropping a malformed note");
            return;
        }
        let data = std::mem::take(&mut m.entries[0].data);
        self.publish(NodeEvent::Note { from: sender, data });
    }

    /// Lets a `MsgSnapshot` on to the core only if the core accepts its
    /// metadata and the node holds its data under that same metadata. Data
    /// carried in the message (the in-process network) is written to the
    /// snapshot store first, *before* raft sees the message, so the log can
    /// never record an installed snapshot whose data is missing; the message
    /// goes on with its data emptied and the apply task reads it back from
    /// the store. A message without data (the streaming network transports
    /// received it into the store already) must name a snapshot the store
    /// holds: a forged one would otherwise reset the log to a point with no
    /// data, and the node could not start again.
    ///
    /// Writing the data holds the loop; the streaming transports write
    /// snapshots off the loop.
    fn check_incoming_snapshot(&mut self, m: &mut Message) -> bool {
        if self.core.check_message(m).is_err() {
            return false;
        }
        let meta = m.get_snapshot().get_metadata().clone();
        let data = std::mem::take(&mut m.mut_snapshot().data);
        if !data.is_empty() {
            let saved = self.snapshots.create(meta.clone()).and_then(|mut w| {
                std::io::Write::write_all(&mut w, &data)
                    .map_err(|e| StorageError::Invalid(e.to_string()))?;
                w.commit()
            });
            if let Err(e) = saved {
                // Nothing was promised yet: raft sends the snapshot again.
                tracing::error!(index = meta.index, from = m.from, error = %e,
                    "cannot save a received snapshot; dropping it");
                return false;
            }
        }
        let held = self
            .snapshots
            .open(meta.index)
            .map(|(info, _)| info.metadata);
        if held.as_ref().ok() != Some(&meta) {
            let reason = raftwork_core::Rejected::SnapshotDataMissing {
                index: meta.index,
                term: meta.term,
            };
            let _ = self.core.reject(m, reason);
            return false;
        }
        true
    }

    pub(crate) fn handle_request(&mut self, request: Request<SM>) -> Result<(), Stopped> {
        let id = self.next_request_id;
        self.next_request_id += 1;
        match request {
            Request::ProposeSession(proposal) => self.propose_session(id, proposal),
            Request::Propose {
                command,
                reply,
                span,
            } => match self.core.handle_propose(id, command) {
                Ok(()) => {
                    self.proposals.insert(id, reply);
                    if !span.is_disabled() {
                        tracing::debug!(target: "raftwork::propose", parent: &span, "proposed to raft");
                        self.proposal_spans.insert(id, span);
                    }
                }
                Err(e) => {
                    self.metrics.failed.increment(1);
                    let _ = reply.send(Err(e));
                }
            },
            Request::Read { read } => {
                self.reads.insert(id, (std::time::Instant::now(), read));
                self.core.handle_read(id);
            }
            Request::StaleRead { read } => {
                (self.apply_tx)(ApplyMsg::Reads(vec![read]));
            }
            Request::ConfChange {
                change,
                context,
                reply,
            } => match self.core.handle_conf_change(id, change, context) {
                Ok(()) => {
                    self.conf_changes.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Transfer { to, reply } => match self.core.handle_transfer_leader(id, to) {
                Ok(()) => {
                    self.transfers.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::SetPeer { id, address, reply } => {
                let _ = reply.send(self.transport.set_peer(id, &address));
            }
            Request::Note { to, data } => {
                let mut m = Message::default();
                m.set_msg_type(MessageType::MsgPropose);
                m.from = self.core.id();
                m.to = to;
                m.context = NOTE_CONTEXT.to_vec().into();
                m.entries.push(raft::prelude::Entry {
                    data: data.into(),
                    ..Default::default()
                });
                self.transport.send(Envelope {
                    group_id: self.core.group_id(),
                    from: self.core.id(),
                    to,
                    messages: vec![m],
                });
            }
            Request::Snapshot { reply } => {
                let id = self.next_request_id;
                self.next_request_id += 1;
                if self.core.handle_snapshot_request(id) {
                    self.snapshot_replies.insert(id, reply);
                } else {
                    let _ = reply.send(Err(SnapshotError::Storage("nothing applied yet".into())));
                }
            }
            Request::Status { reply } => {
                let status = self.core.status();
                // A message handled earlier in this iteration may have
                // changed the leader before the event goes out in `drive`:
                // never let a status answer run ahead of `Node::leader`.
                self.publish_leader(status.leader);
                let _ = reply.send(status);
            }
            Request::Shutdown => return Err(Stopped::Shutdown),
        }
        Ok(())
    }

    /// Makes `leader` what `Node::leader` answers; waiters wake only on a
    /// change.
    /// Hands an event to the subscribers of `Node::subscribe` (before the
    /// first one there is no channel, and no one to tell).
    fn publish(&self, event: NodeEvent) {
        if let Some(events) = self.events.get() {
            let _ = events.send(event);
        }
    }

    fn publish_leader(&self, leader: Option<NodeId>) {
        self.leader.send_if_modified(|l| {
            let changed = *l != leader;
            *l = leader;
            changed
        });
    }

    /// Carries out actions in order. Returns the highest ready number that
    /// was persisted inline, if any.
    fn execute(&mut self, actions: Vec<Action>) -> Option<u64> {
        let mut persisted_inline = None;
        for action in actions {
            match action {
                Action::Send(msgs) => self.send(msgs),
                Action::Persist { number, must_sync } => {
                    tracing::debug!(target: "raftwork::persist", ready = number, must_sync,
                        up_to_index = self.core.last_index(), "log changes staged; persisting");
                    match &mut self.sync {
                        SyncMode::Inline => persisted_inline = Some(number),
                        SyncMode::Worker { answered, sent, .. }
                            if !must_sync && *answered >= *sent =>
                        {
                            persisted_inline = Some(number)
                        }
                        SyncMode::Worker { jobs, sent, .. } => {
                            *sent = number;
                            self.metrics.persist_handed_off();
                            jobs(number, must_sync)
                        }
                        SyncMode::Deferred { pending } => {
                            let earlier = pending.is_some_and(|(_, m)| m);
                            *pending = Some((number, must_sync || earlier));
                        }
                    }
                }
                Action::RestoreSnapshot(snap) => {
                    let meta = snap.get_metadata().clone();
                    (self.apply_tx)(ApplyMsg::Restore(Box::new(meta)));
                }
                Action::TakeSnapshot { metadata, id } => {
                    (self.apply_tx)(ApplyMsg::TakeSnapshot {
                        metadata: Box::new(metadata),
                        id,
                    });
                }
                Action::Apply(batch) => {
                    if !self.proposal_spans.is_empty() {
                        for (index, id) in &batch.proposals {
                            if let Some(span) = self.proposal_spans.remove(id) {
                                span.record("index", index);
                                tracing::debug!(target: "raftwork::propose", parent: &span, index,
                                    "committed; handed to the apply task");
                            }
                        }
                    }
                    let replies = batch
                        .proposals
                        .iter()
                        .filter_map(|(index, id)| self.proposals.remove(id).map(|r| (*index, r)))
                        .collect();
                    let session_replies = self.take_session_waiters(&batch);
                    (self.apply_tx)(ApplyMsg::Apply(Box::new(ApplyWork {
                        batch,
                        replies,
                        session_replies,
                    })));
                }
                Action::ProposalFailed { id, error } => {
                    self.metrics.failed.increment(1);
                    self.proposal_spans.remove(&id);
                    if let Some(reply) = self.proposals.remove(&id) {
                        let _ = reply.send(Err(error));
                    } else if let Some(key) = self.session_ids.remove(&id) {
                        if let Some(w) = self.session_waiters.remove(&key) {
                            w.reply.fail(error);
                        }
                    }
                }
                Action::ReadReady { ids, .. } => {
                    let reads: Vec<_> = ids
                        .iter()
                        .filter_map(|id| self.reads.remove(id))
                        .map(|(arrived, read)| {
                            self.metrics.read_index.record(arrived.elapsed());
                            read
                        })
                        .collect();
                    (self.apply_tx)(ApplyMsg::Reads(reads));
                }
                Action::ReadFailed { ids, error } => {
                    for id in ids {
                        if let Some((_, read)) = self.reads.remove(&id) {
                            read(Err(error.clone()));
                        }
                    }
                }
                Action::ConfChangeDone { id, conf_state } => {
                    if let Some(reply) = self.conf_changes.remove(&id) {
                        let _ = reply.send(Ok(conf_state));
                    }
                }
                Action::ConfChangeFailed { id, error } => {
                    if let Some(reply) = self.conf_changes.remove(&id) {
                        let _ = reply.send(Err(error));
                    }
                }
                Action::TransferDone { id } => {
                    if let Some(reply) = self.transfers.remove(&id) {
                        let _ = reply.send(Ok(()));
                    }
                }
                Action::TransferFailed { id, error } => {
                    if let Some(reply) = self.transfers.remove(&id) {
                        let _ = reply.send(Err(error));
                    }
                }
                Action::Event(event) => {
                    if let NodeEvent::LeaderChanged { leader, term } = &event {
                        tracing::info!(node = self.core.id(), leader = ?leader, term, "leader changed");
                        self.metrics.leader(self.core.id(), *leader);
                        self.publish_leader(*leader);
                        self.term
                            .fetch_max(*term, std::sync::atomic::Ordering::Relaxed);
                        self.fail_forwarded(*leader);
                    }
                    self.publish(event);
                }
            }
        }
        persisted_inline
    }

    fn send(&mut self, msgs: Vec<Message>) {
        let from = self.core.id();
        let group_id = self.core.group_id();
        // One envelope per peer, messages in raft's order.
        let mut per_peer: Vec<Envelope> = Vec::new();
        let streams = self.transport.streams_snapshots();
        for mut m in msgs {
            if m.get_msg_type() == MessageType::MsgHeartbeat {
                self.metrics.heartbeat_sent(m.to);
            }
            if m.get_msg_type() == MessageType::MsgSnapshot
                && !streams
                && !self.fill_snapshot(&mut m)
            {
                continue;
            }
            match per_peer.iter_mut().find(|e| e.to == m.to) {
                Some(env) => env.messages.push(m),
                None => per_peer.push(Envelope {
                    group_id,
                    from,
                    to: m.to,
                    messages: vec![m],
                }),
            }
        }
        if tracing::enabled!(target: "raftwork::replicate", tracing::Level::DEBUG) {
            for env in &per_peer {
                for m in &env.messages {
                    if let (Some(first), Some(last)) = (m.entries.first(), m.entries.last()) {
                        tracing::debug!(target: "raftwork::replicate", to = env.to,
                            first_index = first.index, last_index = last.index,
                            commit = m.commit, "append sent");
                    }
                }
            }
        }
        for env in per_peer {
            let to = env.to;
            let has_snapshot = env
                .messages
                .iter()
                .any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
            self.transport.send(env);
            if has_snapshot && !streams {
                // The snapshot travels inline and in order with the peer's
                // other messages, so report it done now: if it was lost, the
                // peer rejects the next append and raft sends a new one.
                // Without a report raft would wait in snapshot state forever
                // for a snapshot that never arrived.
                self.core.handle_snapshot_status(to, true);
            }
        }
    }
}

/// Session requests: proposed here as leader, or forwarded to the leader;
/// either way answered when this node applies the entry (matched by key).
impl<SM: StateMachine, S: LogStore> ReadyLoop<SM, S> {
    fn propose_session(&mut self, id: RequestId, proposal: SessionProposal<SM>) {
        let SessionProposal {
            kind,
            mut data,
            reply,
        } = proposal;
        let key = match kind {
            EntryKind::Register { .. } => {
                // Unique across nodes (id), starts (incarnation) and
                // registers (counter): the entry's data names its requester.
                self.register_nonces += 1;
                let mut nonce = [0u8; 24];
                nonce[..8].copy_from_slice(&self.core.id().to_le_bytes());
                nonce[8..16].copy_from_slice(&self.core.config().incarnation.to_le_bytes());
                nonce[16..].copy_from_slice(&self.register_nonces.to_le_bytes());
                data = nonce.to_vec();
                SessionKey::Register(nonce)
            }
            EntryKind::SessionCommand {
                session,
                secret,
                seq,
                ..
            } => SessionKey::Command {
                session,
                secret,
                seq,
            },
            EntryKind::Unregister { session, secret } => SessionKey::Unregister { session, secret },
            EntryKind::Command | EntryKind::Time => {
                unreachable!("Node only sends session kinds as session proposals")
            }
        };
        let forwarded_at = if self.core.role() == raftwork_core::Role::Leader {
            if let Err(e) = self.propose_kind(id, kind, data) {
                reply.fail(e);
                return;
            }
            self.session_ids.insert(id, key);
            None
        } else {
            let limit_bytes = self.core.config().max_command_size_bytes;
            let error = if self.core.is_removed() {
                Some(ProposeError::Removed)
            } else if data.len() as u64 > limit_bytes {
                Some(ProposeError::TooLarge {
                    size_bytes: data.len() as u64,
                    limit_bytes,
                })
            } else {
                None
            };
            let leader = self.core.leader().filter(|&l| l != self.core.id());
            let Some(leader) = leader.filter(|_| error.is_none()) else {
                reply.fail(error.unwrap_or(ProposeError::NotLeader {
                    leader_hint: None,
                    in_flight: false,
                }));
                return;
            };
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgPropose);
            m.from = self.core.id();
            m.to = leader;
            m.context = FORWARD_CONTEXT.to_vec().into();
            m.entries.push(raft::prelude::Entry {
                context: raftwork_core::session::entry_context(kind, 0).into(),
                data: data.into(),
                ..Default::default()
            });
            self.transport.send(Envelope {
                group_id: self.core.group_id(),
                from: self.core.id(),
                to: leader,
                messages: vec![m],
            });
            Some(self.core.tick_count())
        };
        let waiter = SessionWaiter {
            reply,
            forwarded_at,
        };
        if let Some(old) = self.session_waiters.insert(key, waiter) {
            // The same request sent again before the first got an answer:
            // the newer one waits; the older one may stop.
            old.reply.fail(ProposeError::Timeout);
        }
    }

    /// Proposes a session entry as leader. A register carries the leader's
    /// limits (`Config::sessions`), whoever asked for it: the table takes on
    /// what the log says.
    fn propose_kind(
        &mut self,
        id: RequestId,
        kind: EntryKind,
        data: Vec<u8>,
    ) -> Result<(), ProposeError> {
        let kind = match kind {
            EntryKind::Register { secret, .. } => EntryKind::Register {
                config: self.session_config,
                secret,
            },
            other => other,
        };
        self.core.handle_propose_kind(id, kind, data)
    }

    /// A follower's session request: proposed if this node leads and it is
    /// well formed. Nothing is answered: the follower learns the outcome by
    /// applying the entry, and sends again if it does not come.
    fn receive_forward(&mut self, sender: NodeId, mut m: Message) {
        let kind = (m.from == sender && m.to == self.core.id() && m.entries.len() == 1)
            .then(|| classify(&m.entries[0].context))
            .flatten()
            .map(|(kind, _)| kind)
            .filter(|k| {
                matches!(
                    k,
                    EntryKind::Register { .. }
                        | EntryKind::SessionCommand { .. }
                        | EntryKind::Unregister { .. }
                )
            });
        let Some(kind) = kind else {
            tracing::warn!(from = sender, "dropping a malformed forwarded proposal");
            return;
        };
        if self.core.role() != raftwork_core::Role::Leader {
            return;
        }
        let id = self.next_request_id;
        self.next_request_id += 1;
        let data = std::mem::take(&mut m.entries[0].data).to_vec();
        if let Err(e) = self.propose_kind(id, kind, data) {
            tracing::debug!(from = sender, error = %e, "a forwarded proposal was refused");
        }
    }

    /// Moves the waiters whose entries are in `batch` to the apply task.
    fn take_session_waiters(&mut self, batch: &ApplyBatch) -> HashMap<u64, SessionReply<SM>> {
        let mut found = HashMap::new();
        if self.session_waiters.is_empty() {
            return found;
        }
        for (_, id) in &batch.proposals {
            self.session_ids.remove(id);
        }
        for e in &batch.entries {
            if e.get_entry_type() != raft::prelude::EntryType::EntryNormal {
                continue;
            }
            let key = match classify(&e.context) {
                Some((
                    EntryKind::SessionCommand {
                        session,
                        secret,
                        seq,
                        ..
                    },
                    _,
                )) => SessionKey::Command {
                    session,
                    secret,
                    seq,
                },
                Some((EntryKind::Unregister { session, secret }, _)) => {
                    SessionKey::Unregister { session, secret }
                }
                Some((EntryKind::Register { .. }, _)) => {
                    match <[u8; 24]>::try_from(e.data.as_ref()) {
                        Ok(nonce) => SessionKey::Register(nonce),
                        Err(_) => continue,
                    }
                }
                _ => continue,
            };
            if let Some(w) = self.session_waiters.remove(&key) {
                found.insert(e.index, w.reply);
            }
        }
        found
    }

    /// A new leader (or none): forwards sent to the old one may be lost,
    /// so their requesters send again now instead of at their timeout.
    fn fail_forwarded(&mut self, leader: Option<NodeId>) {
        let lost: Vec<SessionKey> = self
            .session_waiters
            .iter()
            .filter(|(_, w)| w.forwarded_at.is_some())
            .map(|(k, _)| *k)
            .collect();
        for key in lost {
            let w = self.session_waiters.remove(&key).expect("listed above");
            w.reply.fail(ProposeError::NotLeader {
                leader_hint: leader,
                in_flight: true,
            });
        }
    }

    /// Drops waiters nobody waits for, and fails forwards unanswered for
    /// two election timeouts (lost on the way, or refused by the leader).
    fn sweep_session_waiters(&mut self) {
        let now = self.core.tick_count();
        let limit = 2 * self.core.config().election_ticks as u64;
        let done: Vec<SessionKey> = self
            .session_waiters
            .iter()
            .filter(|(_, w)| {
                w.reply.is_closed()
                    || w.forwarded_at
                        .is_some_and(|at| now.saturating_sub(at) > limit)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in done {
            let w = self.session_waiters.remove(&key).expect("listed above");
            if !w.reply.is_closed() {
                w.reply.fail(ProposeError::Timeout);
            }
        }
        self.session_ids
            .retain(|_, key| self.session_waiters.contains_key(key));
    }
}

impl<SM: StateMachine, S: LogStore> ReadyLoop<SM, S> {
    /// Loads the snapshot data a MsgSnapshot carries. On failure the message
    /// is dropped and raft told the snapshot failed (it retries later).
    ///
    /// The in-process transport carries the data inline; the streaming
    /// network transports read it from the store in chunks instead.
    fn fill_snapshot(&mut self, m: &mut Message) -> bool {
        let index = m.get_snapshot().get_metadata().index;
        let result = self.snapshots.open(index).and_then(|(_, mut reader)| {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut data)
                .map(|_| data)
                .map_err(|e| StorageError::Invalid(e.to_string()))
        });
        match result {
            Ok(data) => {
                m.mut_snapshot().data = data.into();
                true
            }
            Err(e) => {
                tracing::error!(index, to = m.to, error = %e, "cannot load a snapshot to send");
                self.core.handle_snapshot_status(m.to, false);
                false
            }
        }
    }
}
