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

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use raft::prelude::{ConfState, Message, MessageType, SnapshotMetadata};
use raftwork_core::{
    is_command, Action, ApplyBatch, ConfChangeError, Core, NodeEvent, NodeId, RequestId,
    TransferError,
};
use raftwork_storage::{LogStore, SnapshotMeta, SnapshotStore, StorageError};
use raftwork_transport::{Envelope, Inbound, Inbox, Transport};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::node::{
    panic_message, FatalReason, ProposeReply, ReadFn, Request, SnapshotError, Stopped,
};
use crate::state_machine::{Command, StateMachine};

/// Marks a note (`Node::send_note`): a `MsgPropose` with this context and
/// one entry. The loop takes notes out before the core sees anything (the
/// core refuses every `MsgPropose` from a peer), so no note reaches Raft.
const NOTE_CONTEXT: &[u8] = b"raftwork-note";

fn is_note(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgPropose && m.context.as_ref() == NOTE_CONTEXT
}

/// Most events drained per channel before the core is polled; bounds the
/// loop's latency while still batching bursts.
const DRAIN_EVENTS_MAX: usize = 4096;

pub(crate) enum ApplyMsg<SM: StateMachine> {
    Apply {
        batch: ApplyBatch,
        replies: Vec<(u64, ProposeReply<SM>)>,
    },
    /// Restore from the snapshot at this point; its data is already in the
    /// snapshot store.
    Restore(SnapshotMetadata),
    Reads(Vec<ReadFn<SM>>),
    /// Write a snapshot at `metadata` (the core's `TakeSnapshot`): the
    /// state machine is exactly there when this arrives (FIFO).
    TakeSnapshot {
        metadata: SnapshotMetadata,
        id: Option<RequestId>,
    },
}

/// What the apply task tells the ready loop.
pub(crate) enum ApplyEvent {
    /// Everything up to this index is applied.
    Applied(u64),
    /// The snapshot a `TakeSnapshot` asked for is in the snapshot store (or
    /// could not be written).
    SnapshotTaken {
        id: Option<RequestId>,
        result: Result<SnapshotMeta, String>,
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
    pub(crate) snapshots: Arc<dyn SnapshotStore>,
    pub(crate) applied_index: u64,
    pub(crate) events: mpsc::UnboundedSender<ApplyEvent>,
}

/// Runs the applier until the ready loop hangs up.
pub(crate) async fn apply_task<SM: StateMachine>(
    mut applier: Applier<SM>,
    mut rx: mpsc::UnboundedReceiver<ApplyMsg<SM>>,
) {
    while let Some(msg) = rx.recv().await {
        // A panicking state machine stops the node with a reason, instead of
        // leaving a loop whose applies go nowhere.
        let handled =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| applier.handle(msg)));
        let fatal = match handled {
            Ok(Ok(())) => continue,
            Ok(Err(fatal)) => fatal,
            Err(payload) => FatalReason::StateMachinePanicked {
                message: panic_message(payload.as_ref()),
            },
        };
        tracing::error!(error = %fatal, "apply task stopping on a fatal error");
        let _ = applier.events.send(ApplyEvent::Fatal(fatal));
        return;
    }
}

impl<SM: StateMachine> Applier<SM> {
    fn handle(&mut self, msg: ApplyMsg<SM>) -> Result<(), FatalReason> {
        match msg {
            ApplyMsg::Apply { batch, replies } => {
                let Some(last) = batch.entries.last() else {
                    return Ok(());
                };
                let index = last.index;
                apply_batch(&mut self.sm, batch, replies);
                self.applied_index = index;
                let _ = self.events.send(ApplyEvent::Applied(index));
            }
            ApplyMsg::Restore(meta) => {
                let restore_failed = |detail: String| FatalReason::SnapshotRestore {
                    index: meta.index,
                    detail,
                };
                let (_, mut reader) = self
                    .snapshots
                    .open(meta.index)
                    .map_err(|e| restore_failed(format!("opening it: {e}")))?;
                // A snapshot that cannot be restored leaves the state machine
                // undefined; continuing would diverge.
                self.sm
                    .restore(&mut reader)
                    .map_err(|e| restore_failed(e.to_string()))?;
                self.applied_index = meta.index;
                let _ = self.events.send(ApplyEvent::Applied(meta.index));
            }
            ApplyMsg::Reads(reads) => {
                for read in reads {
                    read(Ok(&self.sm));
                }
            }
            ApplyMsg::TakeSnapshot { metadata, id } => {
                let result = self.write_snapshot(metadata);
                let _ = self.events.send(ApplyEvent::SnapshotTaken { id, result });
            }
        }
        Ok(())
    }

    /// Streams the state machine into the snapshot store at `metadata`, the
    /// point it is at now (or finds that snapshot already there).
    fn write_snapshot(&mut self, metadata: SnapshotMetadata) -> Result<SnapshotMeta, String> {
        assert_eq!(
            metadata.index, self.applied_index,
            "a snapshot is taken exactly at the applied index"
        );
        if let Some(latest) = self.snapshots.latest().map_err(|e| e.to_string())? {
            if (latest.metadata.index, latest.metadata.term) == (metadata.index, metadata.term) {
                return Ok(latest);
            }
        }
        let mut writer = self.snapshots.create(metadata).map_err(|e| e.to_string())?;
        self.sm.snapshot(&mut writer).map_err(|e| e.to_string())?;
        let meta = writer.commit().map_err(|e| e.to_string())?;
        tracing::info!(
            index = meta.metadata.index,
            size_bytes = meta.size_bytes,
            "snapshot taken"
        );
        Ok(meta)
    }
}

fn apply_batch<SM: StateMachine>(
    sm: &mut SM,
    batch: ApplyBatch,
    replies: Vec<(u64, ProposeReply<SM>)>,
) {
    let commands: Vec<Command<'_>> = batch
        .entries
        .iter()
        .filter(|e| is_command(e))
        .map(|e| Command {
            index: e.index,
            term: e.term,
            data: &e.data,
        })
        .collect();
    if commands.is_empty() {
        return;
    }
    let responses = sm.apply(&commands);
    assert_eq!(
        responses.len(),
        commands.len(),
        "StateMachine::apply must return one response per command"
    );
    if replies.is_empty() {
        return;
    }
    // Both are in index order: walk them together.
    let mut replies = replies.into_iter().peekable();
    for (cmd, resp) in commands.iter().zip(responses) {
        match replies.peek() {
            Some((index, _)) if *index == cmd.index => {
                let (index, reply) = replies.next().unwrap();
                let _ = reply.send(Ok((index, resp)));
            }
            _ => {}
        }
    }
    assert!(
        replies.next().is_none(),
        "a local proposal was not among the applied commands"
    );
}

/// Everything the loop owns.
pub(crate) struct ReadyLoop<SM: StateMachine, S: LogStore> {
    pub(crate) core: Core<S>,
    pub(crate) transport: Box<dyn Transport>,
    pub(crate) inbox: Inbox,
    pub(crate) requests: mpsc::Receiver<Request<SM>>,
    pub(crate) apply_tx: mpsc::UnboundedSender<ApplyMsg<SM>>,
    pub(crate) applied_rx: mpsc::UnboundedReceiver<ApplyEvent>,
    pub(crate) snapshots: Arc<dyn SnapshotStore>,
    pub(crate) events: broadcast::Sender<NodeEvent>,
    /// The leader this node knows, for `Node::leader` (no round trip).
    pub(crate) leader: tokio::sync::watch::Sender<Option<NodeId>>,
    pub(crate) tick_interval: std::time::Duration,
    /// When the last tick was handed to the core: a leader whose loop
    /// stalled must not trust its tick count for a lease (see `drive`).
    pub(crate) last_tick_at: std::time::Instant,
    pub(crate) stopped: Arc<std::sync::atomic::AtomicBool>,
    /// Why the loop stopped, for `Node::stop_reason`.
    pub(crate) stop: tokio::sync::watch::Sender<Option<Stopped>>,
    pub(crate) sync: SyncMode,
    pub(crate) next_request_id: RequestId,
    pub(crate) proposals: HashMap<RequestId, ProposeReply<SM>>,
    pub(crate) reads: HashMap<RequestId, ReadFn<SM>>,
    pub(crate) conf_changes:
        HashMap<RequestId, oneshot::Sender<Result<ConfState, ConfChangeError>>>,
    pub(crate) transfers: HashMap<RequestId, oneshot::Sender<Result<(), TransferError>>>,
    /// Manual snapshot requests waiting for the apply task.
    pub(crate) snapshot_replies:
        HashMap<RequestId, oneshot::Sender<Result<SnapshotMeta, SnapshotError>>>,
}

/// Marks the node stopped, clears its known leader and publishes why it
/// stopped when dropped.
struct StopGuard {
    stopped: Arc<std::sync::atomic::AtomicBool>,
    leader: tokio::sync::watch::Sender<Option<NodeId>>,
    stop: tokio::sync::watch::Sender<Option<Stopped>>,
    /// Set by the loop as it ends; a guard dropped without one is unwinding
    /// from a panic outside the loop's own catch.
    reason: Option<Stopped>,
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

/// How persists are made durable.
pub(crate) enum SyncMode {
    /// The store keeps nothing across a crash: acknowledge at once.
    Inline,
    /// A worker thread syncs and reports back.
    Worker {
        jobs: mpsc::UnboundedSender<(u64, bool)>,
        done: mpsc::UnboundedReceiver<Result<u64, String>>,
    },
}

/// Starts the sync worker thread for `store`.
pub(crate) fn spawn_sync_worker<S: LogStore>(store: S) -> (SyncMode, std::thread::JoinHandle<()>) {
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
            jobs: jobs_tx,
            done: done_rx,
        },
        handle,
    )
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

impl<SM: StateMachine, S: LogStore> ReadyLoop<SM, S> {
    pub(crate) async fn run(mut self) {
        // Marks the node stopped however the loop ends, a panic included
        // (raft-rs panics on a broken invariant), so `Node::leader` and
        // `wait_for_leader` never report a leader of a dead loop.
        let mut stop_guard = StopGuard {
            stopped: self.stopped.clone(),
            leader: self.leader.clone(),
            stop: self.stop.clone(),
            reason: None,
        };
        let mut ticker = tokio::time::interval(self.tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        let mut panicked = false;
        let reason = loop {
            let step = tokio::select! {
                biased;
                r = Self::next_persisted(&mut self.sync) => Step::Persisted(r),
                i = self.applied_rx.recv() => i.map_or(Step::ApplyTaskGone, Step::Applied),
                Some(m) = self.inbox.recv() => Step::Inbound(m),
                r = self.requests.recv() => r.map_or(Step::Closed, Step::Request),
                _ = ticker.tick() => Step::Tick,
            };
            // A panic (a broken invariant here or in raft-rs) stops the node
            // with a reason instead of leaving handles to a dead loop.
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.handle_step(step)?;
                self.drain()?;
                self.drive()
            }));
            match stepped {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => break reason,
                Err(payload) => {
                    panicked = true;
                    break Stopped::Fatal(FatalReason::LoopPanicked {
                        message: panic_message(payload.as_ref()),
                    });
                }
            }
        };
        let node = self.core.id();
        match &reason {
            Stopped::Fatal(e) => tracing::error!(node, error = %e, "node stopped on a fatal error"),
            _ => tracing::info!(node, "node stopped"),
        }
        // After a panic the core's state is unknown: fail everything by
        // dropping it instead of asking it for its last actions.
        if !panicked {
            let actions = self.core.shutdown();
            self.execute(actions);
        }
        // Requests still queued get their shutdown error as their replies drop.
        self.requests.close();
        while let Ok(r) = self.requests.try_recv() {
            drop(r);
        }
        self.transport.shutdown();
        stop_guard.reason = Some(reason);
        drop(stop_guard);
        // Dropping apply_tx ends the apply task after its queue drains;
        // dropping the sync jobs sender ends the sync worker.
    }

    async fn next_persisted(sync: &mut SyncMode) -> Result<u64, String> {
        match sync {
            SyncMode::Inline => std::future::pending().await,
            SyncMode::Worker { done, .. } => match done.recv().await {
                Some(r) => r,
                None => Err("sync worker stopped".into()),
            },
        }
    }

    fn handle_step(&mut self, step: Step<SM>) -> Result<(), Stopped> {
        match step {
            Step::Request(r) => self.handle_request(r),
            Step::Inbound(m) => self.handle_inbound(m),
            Step::Applied(event) => self.handle_apply_event(event),
            Step::ApplyTaskGone => Err(Stopped::Fatal(FatalReason::StateMachinePanicked {
                message: "the apply task ended".into(),
            })),
            Step::Persisted(Ok(n)) => {
                self.core.handle_persisted(n);
                Ok(())
            }
            Step::Persisted(Err(detail)) => Err(Stopped::Fatal(FatalReason::LogStore {
                detail: format!("sync failed: {detail}"),
            })),
            Step::Tick => {
                self.core.handle_tick();
                self.last_tick_at = std::time::Instant::now();
                Ok(())
            }
            Step::Closed => Err(Stopped::Shutdown),
        }
    }

    /// Takes whatever else is already queued, so one poll covers a burst.
    fn drain(&mut self) -> Result<(), Stopped> {
        for _ in 0..DRAIN_EVENTS_MAX {
            match self.inbox.try_recv() {
                Ok(m) => self.handle_inbound(m)?,
                Err(_) => break,
            }
        }
        for _ in 0..DRAIN_EVENTS_MAX {
            match self.requests.try_recv() {
                Ok(r) => self.handle_request(r)?,
                Err(_) => break,
            }
        }
        while let Ok(event) = self.applied_rx.try_recv() {
            self.handle_apply_event(event)?;
        }
        Ok(())
    }

    fn handle_apply_event(&mut self, event: ApplyEvent) -> Result<(), Stopped> {
        match event {
            ApplyEvent::Applied(i) => self.core.handle_applied(i),
            ApplyEvent::SnapshotTaken { id, result } => {
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
    fn drive(&mut self) -> Result<(), Stopped> {
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
                return Ok(());
            }
            if let Some(number) = self.execute(actions) {
                self.core.handle_persisted(number);
            }
        }
    }

    fn handle_inbound(&mut self, inbound: Inbound) -> Result<(), Stopped> {
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
                    if m.get_msg_type() == MessageType::MsgSnapshot
                        && !self.check_incoming_snapshot(&mut m)
                    {
                        continue;
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
        let _ = self.events.send(NodeEvent::Note { from: sender, data });
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

    fn handle_request(&mut self, request: Request<SM>) -> Result<(), Stopped> {
        let id = self.next_request_id;
        self.next_request_id += 1;
        match request {
            Request::Propose { command, reply } => match self.core.handle_propose(id, command) {
                Ok(()) => {
                    self.proposals.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::Read { read } => {
                self.reads.insert(id, read);
                self.core.handle_read(id);
            }
            Request::StaleRead { read } => {
                let _ = self.apply_tx.send(ApplyMsg::Reads(vec![read]));
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
                Action::Persist { number, must_sync } => match &self.sync {
                    SyncMode::Inline => persisted_inline = Some(number),
                    SyncMode::Worker { jobs, .. } => {
                        let _ = jobs.send((number, must_sync));
                    }
                },
                Action::RestoreSnapshot(snap) => {
                    let meta = snap.get_metadata().clone();
                    let _ = self.apply_tx.send(ApplyMsg::Restore(meta));
                }
                Action::TakeSnapshot { metadata, id } => {
                    let _ = self.apply_tx.send(ApplyMsg::TakeSnapshot { metadata, id });
                }
                Action::Apply(batch) => {
                    let replies = batch
                        .proposals
                        .iter()
                        .filter_map(|(index, id)| self.proposals.remove(id).map(|r| (*index, r)))
                        .collect();
                    let _ = self.apply_tx.send(ApplyMsg::Apply { batch, replies });
                }
                Action::ProposalFailed { id, error } => {
                    if let Some(reply) = self.proposals.remove(&id) {
                        let _ = reply.send(Err(error));
                    }
                }
                Action::ReadReady { ids, .. } => {
                    let reads: Vec<_> = ids.iter().filter_map(|id| self.reads.remove(id)).collect();
                    let _ = self.apply_tx.send(ApplyMsg::Reads(reads));
                }
                Action::ReadFailed { ids, error } => {
                    for id in ids {
                        if let Some(read) = self.reads.remove(&id) {
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
                        self.publish_leader(*leader);
                    }
                    let _ = self.events.send(event);
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
