//! Sharded scheduling: a host's groups driven by a fixed set of worker
//! shards, with no task, channel or timer per group (issue 17).
//!
//! ```text
//!  Node handles ──ShardRequest(group)──▶ ┌─────────────────┐ ──envelopes──▶ shared Transport
//!  router ──Inbound (group % shards)───▶ │ ready shard i   │ ──ApplyShardMsg(group)──▶ apply shard i ──▶ each group's StateMachine
//!  ticker ──Tick───────────────────────▶ │ groups' ReadyLoops│ ◀──Applied(group)─────────┘
//!  sync thread ──Persisted(batch)──────▶ └─────────────────┘ ──one SyncBatch per round──▶ host sync thread (one fdatasync)
//! ```
//!
//! A ready shard is one tokio task that owns its groups' ready loops as
//! plain values. Each round it takes every message queued (up to a bound),
//! hands each to its group, then drives every group that got one, and
//! sends the persists of all of them as one batch to the host's sync
//! thread. An apply shard is one tokio task that owns the same groups'
//! state machines and applies in order, as a node's own apply task does.
//! Group `g` lives on shard `g % shards`, ready side and apply side.
//!
//! Invariants:
//! * a group's ready loop is touched only by its shard's task, and its
//!   state machine only by its apply shard's task;
//! * a group's apply messages reach its apply shard in the order its loop
//!   sent them (one channel, FIFO), so a read released after an apply
//!   still runs after it;
//! * a group is ticked only while awake; a sleeping follower is checked
//!   when the host's view of its peers moves (`Liveness::generation`);
//! * a group that stops (error, panic, shutdown) leaves its shard alone:
//!   its own stop reason is published and the other groups go on;
//! * a group's stop is published only once its apply shard let its state
//!   machine go, after every apply message the group sent before it: a
//!   `Node::shutdown` or `Host::remove_group` that returned leaves nothing
//!   of the group running;
//! * every group instance has a token of its own: a request, apply report
//!   or persist answer of an earlier instance of the same group id (a
//!   handle kept after `remove_group`, a report still on its way) carries
//!   the old token and is dropped, never given to the new instance;
//! * ticks never burst: however many queued, a round ticks its awake
//!   groups once.

#![cfg_attr(not(feature = "host"), allow(dead_code))]

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use raftwork_core::NodeId;
use raftwork_storage::LogStore;
use raftwork_transport::{Envelope, Inbound, Transport, TransportError};
use tokio::sync::mpsc;

use crate::clock::{HostClock, Liveness};
use crate::node::{Request, RequestTx, Stopped};
use crate::runtime::{Applier, ApplyEvent, ApplyEvents, ApplyMsg, ApplySink, ReadyLoop, StopGuard};
use crate::state_machine::StateMachine;

/// Capacity of a shard's request queue, in requests, shared by its groups
/// (a node of its own has `Config::request_queue_capacity`, which a host
/// group does not use). A full queue holds the proposer back.
pub(crate) const SHARD_REQUEST_QUEUE: usize = 65_536;

/// Capacity of a shard's inbox, in envelopes from peers, shared by its
/// groups. A full one drops (raft sends again), as a full transport queue
/// does, so a flood of messages cannot grow a host's memory.
pub const SHARD_INBOX_ENVELOPES: usize = 16_384;

/// Most messages a shard takes per queue before it drives its groups:
/// bounds a round's latency while batching bursts.
const SHARD_DRAIN_MAX: usize = 8192;

/// Unknown group ids a shard logs by name; past this many, only counted.
const UNKNOWN_GROUPS_LOGGED: usize = 1024;

/// A request of a group's `Node`, for its shard.
pub(crate) struct ShardRequest {
    pub(crate) group: u64,
    /// The group instance's token (see the module header).
    pub(crate) token: u64,
    /// A `Request<SM>` of the group's state machine type.
    pub(crate) request: Box<dyn Any + Send>,
}

/// What a ready shard is told, besides requests and peers' messages.
pub(crate) enum ShardMsg {
    /// A group's apply shard reports.
    Applied {
        group: u64,
        token: u64,
        event: ApplyEvent,
    },
    /// The host's sync thread made this batch durable (or could not).
    Persisted {
        items: Vec<SyncItem>,
        result: Result<(), String>,
    },
    /// A transport's report on one of its groups (a peer unreachable, a
    /// snapshot sent or not): never dropped, unlike peers' messages.
    Report(Inbound),
    /// The host's ticker.
    Tick,
    /// A new group to drive.
    Add {
        group: u64,
        token: u64,
        driven: Box<dyn Driven>,
    },
    /// Stop every group and end.
    Stop,
}

/// A round's persists for the host's sync thread: each group's highest
/// ready number, and where to answer.
pub(crate) struct SyncBatch {
    pub(crate) items: Vec<SyncItem>,
    pub(crate) must_sync: bool,
    pub(crate) reply: mpsc::UnboundedSender<ShardMsg>,
}

/// One group's persist in a [`SyncBatch`]: group, token, ready number.
pub(crate) type SyncItem = (u64, u64, u64);

/// What an apply shard is told.
pub(crate) enum ApplyShardMsg {
    /// A new group's state machine.
    Add {
        group: u64,
        token: u64,
        applier: Box<dyn AnyApplier>,
    },
    /// An `ApplyMsg<SM>` for a group.
    Apply {
        group: u64,
        token: u64,
        msg: Box<dyn Any + Send>,
    },
    /// The group stopped: its ready loop sends nothing more. Once its state
    /// machine is let go, the guard publishes why it stopped.
    Remove {
        group: u64,
        token: u64,
        guard: StopGuard,
        reason: Stopped,
    },
    /// The ready shard ended: nothing more comes.
    Stop,
}

/// A group's ready loop as its shard sees it, whatever its state machine
/// and log store types.
pub(crate) trait Driven: Send {
    fn request(&mut self, request: Box<dyn Any + Send>) -> Result<(), Stopped>;
    fn inbound(&mut self, inbound: Inbound) -> Result<(), Stopped>;
    fn applied(&mut self, event: ApplyEvent) -> Result<(), Stopped>;
    fn persisted(&mut self, result: Result<u64, String>) -> Result<(), Stopped>;
    fn tick(&mut self, requests_queued: usize);
    fn check_leader_host(&mut self);
    fn drive(&mut self) -> Result<(), Stopped>;
    fn take_persist(&mut self) -> Option<(u64, bool)>;
    fn is_hibernating(&self) -> bool;
    fn stop_guard(&self) -> StopGuard;
    fn finish(&mut self, reason: &Stopped, panicked: bool);
}

impl<SM: StateMachine, S: LogStore> Driven for ReadyLoop<SM, S> {
    fn request(&mut self, request: Box<dyn Any + Send>) -> Result<(), Stopped> {
        let request = request
            .downcast::<Request<SM>>()
            .expect("a group's requests are of its state machine's type");
        self.handle_request(*request)
    }
    fn inbound(&mut self, inbound: Inbound) -> Result<(), Stopped> {
        self.handle_inbound(inbound)
    }
    fn applied(&mut self, event: ApplyEvent) -> Result<(), Stopped> {
        self.handle_apply_event(event)
    }
    fn persisted(&mut self, result: Result<u64, String>) -> Result<(), Stopped> {
        self.handle_persisted(result)
    }
    fn tick(&mut self, requests_queued: usize) {
        self.handle_tick(requests_queued)
    }
    fn check_leader_host(&mut self) {
        ReadyLoop::check_leader_host(self)
    }
    fn drive(&mut self) -> Result<(), Stopped> {
        ReadyLoop::drive(self)
    }
    fn take_persist(&mut self) -> Option<(u64, bool)> {
        ReadyLoop::take_persist(self)
    }
    fn is_hibernating(&self) -> bool {
        ReadyLoop::is_hibernating(self)
    }
    fn stop_guard(&self) -> StopGuard {
        ReadyLoop::stop_guard(self)
    }
    fn finish(&mut self, reason: &Stopped, panicked: bool) {
        ReadyLoop::finish(self, reason, panicked)
    }
}

/// A group's applier as its apply shard sees it.
pub(crate) trait AnyApplier: Send {
    /// False if the applier stopped on a fatal error (already reported).
    fn handle(&mut self, msg: Box<dyn Any + Send>) -> bool;
}

impl<SM: StateMachine> AnyApplier for Applier<SM> {
    fn handle(&mut self, msg: Box<dyn Any + Send>) -> bool {
        let msg = msg
            .downcast::<ApplyMsg<SM>>()
            .expect("a group's apply messages are of its state machine's type");
        self.handle_or_report(*msg)
    }
}

/// One shard's queues, as the host holds them.
#[derive(Clone)]
pub(crate) struct ShardQueues {
    pub(crate) control: mpsc::UnboundedSender<ShardMsg>,
    /// Peers' messages (bounded: see [`SHARD_INBOX_ENVELOPES`]).
    pub(crate) inbound: mpsc::Sender<Inbound>,
    pub(crate) requests: mpsc::Sender<ShardRequest>,
    pub(crate) apply: mpsc::UnboundedSender<ApplyShardMsg>,
}

/// How a group being built joins its shard (`Builder::on_shard`).
pub(crate) struct ShardWiring {
    pub(crate) group: u64,
    /// This instance of the group (unique on the host).
    pub(crate) token: u64,
    pub(crate) queues: ShardQueues,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) liveness: Arc<Liveness>,
}

impl ShardWiring {
    pub(crate) fn apply_sink<SM: StateMachine>(&self) -> ApplySink<SM> {
        let (group, token, tx) = (self.group, self.token, self.queues.apply.clone());
        Box::new(move |msg| {
            let _ = tx.send(ApplyShardMsg::Apply {
                group,
                token,
                msg: Box::new(msg),
            });
        })
    }

    pub(crate) fn apply_events(&self) -> ApplyEvents {
        let (group, token, tx) = (self.group, self.token, self.queues.control.clone());
        std::sync::Arc::new(move |event| {
            let _ = tx.send(ShardMsg::Applied {
                group,
                token,
                event,
            });
        })
    }

    pub(crate) fn requests<SM: StateMachine>(&self) -> RequestTx<SM> {
        RequestTx::Shard {
            group: self.group,
            token: self.token,
            tx: self.queues.requests.clone(),
        }
    }

    pub(crate) fn transport(&self) -> Box<dyn Transport> {
        Box::new(GroupTransport {
            inner: self.transport.clone(),
            group: self.group,
        })
    }

    pub(crate) fn clock(&self) -> HostClock {
        HostClock::new(self.liveness.clone())
    }

    /// Hands the group to its shards: the state machine first, so it is
    /// there before the loop's first apply message.
    pub(crate) fn start<SM: StateMachine, S: LogStore>(
        self,
        ready: ReadyLoop<SM, S>,
        applier: Applier<SM>,
    ) {
        let _ = self.queues.apply.send(ApplyShardMsg::Add {
            group: self.group,
            token: self.token,
            applier: Box::new(applier),
        });
        let _ = self.queues.control.send(ShardMsg::Add {
            group: self.group,
            token: self.token,
            driven: Box::new(ready),
        });
    }
}

/// The shared transport as one group sees it: sends go through; a group's
/// shutdown only takes its snapshot store away (shutting the transport
/// down is the host's business, not a group's).
struct GroupTransport {
    inner: Arc<dyn Transport>,
    group: u64,
}

impl Transport for GroupTransport {
    fn send(&self, envelope: Envelope) {
        self.inner.send(envelope)
    }

    fn set_peer(&self, id: NodeId, address: &str) -> Result<(), TransportError> {
        self.inner.set_peer(id, address)
    }

    fn streams_snapshots(&self) -> bool {
        self.inner.streams_snapshots()
    }

    fn attach_snapshots(&self, group_id: u64, store: Arc<dyn raftwork_storage::SnapshotStore>) {
        self.inner.attach_snapshots(group_id, store)
    }

    fn shutdown(&self) {
        self.inner.detach_snapshots(self.group)
    }

    fn detach_snapshots(&self, group_id: u64) {
        self.inner.detach_snapshots(group_id)
    }
}

/// Starts shard `index`'s ready and apply tasks; returns its queues and
/// the two tasks.
pub(crate) fn spawn_shard(
    host: NodeId,
    index: usize,
    liveness: Arc<Liveness>,
    sync: mpsc::UnboundedSender<SyncBatch>,
) -> (ShardQueues, [tokio::task::JoinHandle<()>; 2]) {
    let (control, control_rx) = mpsc::unbounded_channel();
    let (inbound, inbound_rx) = mpsc::channel(SHARD_INBOX_ENVELOPES);
    let (requests, requests_rx) = mpsc::channel(SHARD_REQUEST_QUEUE);
    let (apply, apply_rx) = mpsc::unbounded_channel();
    let shard = Shard {
        host,
        index,
        groups: HashMap::new(),
        dirty: Vec::new(),
        awake: HashSet::new(),
        generation: liveness.generation(),
        liveness,
        sync,
        me: control.clone(),
        apply: apply.clone(),
        unknown: metrics::counter!(crate::metrics::HOST_UNKNOWN_GROUP_MESSAGES.name),
        gauges: ShardGauges::new(index),
        inbox_queued: 0,
        logged: HashSet::new(),
        tick_due: false,
        requests_queued: 0,
    };
    let ready = tokio::spawn(shard.run(control_rx, inbound_rx, requests_rx));
    let applies = tokio::spawn(apply_shard(apply_rx));
    (
        ShardQueues {
            control,
            inbound,
            requests,
            apply,
        },
        [ready, applies],
    )
}

/// A group on its shard.
struct Slot {
    /// This instance of the group.
    token: u64,
    driven: Box<dyn Driven>,
    /// Publishes the group's stop (a panic that ends the shard's task
    /// included: the guard then says the loop panicked).
    guard: StopGuard,
    /// Queued in `Shard::dirty` for this round's drive.
    dirty: bool,
}

struct Shard {
    host: NodeId,
    index: usize,
    groups: HashMap<u64, Slot>,
    /// Groups to drive at the end of this round.
    dirty: Vec<u64>,
    /// Groups not hibernating: the ones a tick reaches.
    awake: HashSet<u64>,
    liveness: Arc<Liveness>,
    /// `Liveness::generation` when the sleeping followers were last checked.
    generation: u64,
    sync: mpsc::UnboundedSender<SyncBatch>,
    /// This shard's control queue, for the sync thread's answers.
    me: mpsc::UnboundedSender<ShardMsg>,
    apply: mpsc::UnboundedSender<ApplyShardMsg>,
    unknown: metrics::Counter,
    logged: HashSet<u64>,
    /// A tick came this round (several merge into one).
    tick_due: bool,
    /// Requests queued at the shard when this round began (the groups'
    /// `requests_queued` metric: the queue is the shard's).
    requests_queued: usize,
    /// Peers' envelopes queued when this round began.
    inbox_queued: usize,
    gauges: ShardGauges,
}

/// A shard's gauges (`metrics::HOST`), sampled each tick.
struct ShardGauges {
    awake: metrics::Gauge,
    asleep: metrics::Gauge,
    inbox: metrics::Gauge,
    requests: metrics::Gauge,
}

impl ShardGauges {
    fn new(index: usize) -> Self {
        use crate::metrics::{HOST_SHARD_GROUPS, HOST_SHARD_INBOX, HOST_SHARD_REQUESTS};
        let shard = index.to_string();
        Self {
            awake: metrics::gauge!(HOST_SHARD_GROUPS.name, "shard" => shard.clone(), "state" => "awake"),
            asleep: metrics::gauge!(HOST_SHARD_GROUPS.name, "shard" => shard.clone(), "state" => "asleep"),
            inbox: metrics::gauge!(HOST_SHARD_INBOX.name, "shard" => shard.clone()),
            requests: metrics::gauge!(HOST_SHARD_REQUESTS.name, "shard" => shard),
        }
    }
}

impl Shard {
    async fn run(
        mut self,
        mut control: mpsc::UnboundedReceiver<ShardMsg>,
        mut inbound: mpsc::Receiver<Inbound>,
        mut requests: mpsc::Receiver<ShardRequest>,
    ) {
        loop {
            let stop = tokio::select! {
                biased;
                m = control.recv() => match m {
                    Some(m) => self.control(m),
                    None => true,
                },
                Some(i) = inbound.recv() => {
                    self.inbound(i);
                    false
                }
                Some(r) = requests.recv() => self.request(r, &mut control),
            };
            if stop {
                break;
            }
            // Everything else already queued joins this round. The host's
            // own messages all (a group's `Add` comes before any request
            // for it), peers' and requests up to a bound.
            let mut stop = false;
            while let Ok(m) = control.try_recv() {
                if self.control(m) {
                    stop = true;
                    break;
                }
            }
            if stop {
                break;
            }
            for _ in 0..SHARD_DRAIN_MAX {
                match inbound.try_recv() {
                    Ok(i) => self.inbound(i),
                    Err(_) => break,
                }
            }
            for _ in 0..SHARD_DRAIN_MAX {
                match requests.try_recv() {
                    Ok(r) => {
                        if self.request(r, &mut control) {
                            stop = true;
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            if stop {
                break;
            }
            self.requests_queued = requests.len();
            self.inbox_queued = inbound.len();
            if std::mem::take(&mut self.tick_due) {
                self.tick();
            }
            self.drive_round();
        }
        // Requests still queued fail as their replies drop.
        requests.close();
        while requests.try_recv().is_ok() {}
        let groups: Vec<u64> = self.groups.keys().copied().collect();
        for group in groups {
            self.stop_group(group, Stopped::Shutdown, false);
        }
        let _ = self.apply.send(ApplyShardMsg::Stop);
    }

    /// Handles one control message; true if the shard must stop.
    fn control(&mut self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Applied {
                group,
                token,
                event,
            } => self.step(group, Some(token), |d| d.applied(event)),
            ShardMsg::Persisted { items, result } => {
                for (group, token, number) in items {
                    let r = result.clone().map(|()| number);
                    self.step(group, Some(token), |d| d.persisted(r));
                }
            }
            ShardMsg::Report(report) => self.inbound(report),
            ShardMsg::Tick => self.tick_due = true,
            ShardMsg::Add {
                group,
                token,
                driven,
            } => {
                assert!(
                    !self.groups.contains_key(&group),
                    "group {group} added twice to shard {}",
                    self.index
                );
                let guard = driven.stop_guard();
                self.groups.insert(
                    group,
                    Slot {
                        token,
                        driven,
                        guard,
                        dirty: false,
                    },
                );
                self.awake.insert(group);
                self.mark(group);
            }
            ShardMsg::Stop => return true,
        }
        false
    }

    /// A peer's message (or a transport report) for one of its groups.
    fn inbound(&mut self, inbound: Inbound) {
        let group = match &inbound {
            Inbound::Messages(env) => env.group_id,
            Inbound::Unreachable { group_id, .. } | Inbound::SnapshotStatus { group_id, .. } => {
                *group_id
            }
        };
        if !self.groups.contains_key(&group) {
            self.unknown_group(group, &inbound);
            return;
        }
        self.step(group, None, |d| d.inbound(inbound));
    }

    /// A group's request; true if the shard must stop. For a group
    /// removed since, the request drops, and with it its reply: its caller
    /// gets a shutdown error. For a group not known yet, the host's queue
    /// is read first: its `Add` went there before the group's handle
    /// existed, but may have arrived after this round read that queue.
    fn request(
        &mut self,
        r: ShardRequest,
        control: &mut mpsc::UnboundedReceiver<ShardMsg>,
    ) -> bool {
        if !self.groups.contains_key(&r.group) {
            while let Ok(m) = control.try_recv() {
                if self.control(m) {
                    return true;
                }
            }
        }
        let ShardRequest {
            group,
            token,
            request,
        } = r;
        self.step(group, Some(token), |d| d.request(request));
        false
    }

    /// Hands an event to `group` (if it runs here, as the instance `token`
    /// names when given) and queues it for this round's drive; stops it if
    /// the event says so.
    fn step(
        &mut self,
        group: u64,
        token: Option<u64>,
        f: impl FnOnce(&mut dyn Driven) -> Result<(), Stopped>,
    ) {
        let Some(slot) = self.groups.get_mut(&group) else {
            return;
        };
        if token.is_some_and(|t| t != slot.token) {
            return;
        }
        match crate::runtime::catch_stop(|| f(slot.driven.as_mut())) {
            Ok(()) => self.mark(group),
            Err((reason, panicked)) => self.stop_group(group, reason, panicked),
        }
    }

    fn mark(&mut self, group: u64) {
        if let Some(slot) = self.groups.get_mut(&group) {
            if !std::mem::replace(&mut slot.dirty, true) {
                self.dirty.push(group);
            }
        }
    }

    /// One tick for every awake group; the sleeping followers checked if
    /// any peer host's view moved.
    fn tick(&mut self) {
        let generation = self.liveness.generation();
        if generation != self.generation {
            self.generation = generation;
            let asleep: Vec<u64> = self
                .groups
                .keys()
                .filter(|g| !self.awake.contains(g))
                .copied()
                .collect();
            for group in asleep {
                self.step(group, None, |d| {
                    d.check_leader_host();
                    Ok(())
                });
            }
        }
        let mut awake: Vec<u64> = self.awake.iter().copied().collect();
        awake.sort_unstable();
        let queued = self.requests_queued;
        let g = &self.gauges;
        g.awake.set(self.awake.len() as f64);
        g.asleep.set((self.groups.len() - self.awake.len()) as f64);
        g.inbox.set(self.inbox_queued as f64);
        g.requests.set(queued as f64);
        for group in awake {
            self.step(group, None, |d| {
                d.tick(queued);
                Ok(())
            });
            if self
                .groups
                .get(&group)
                .is_some_and(|s| s.driven.is_hibernating())
            {
                self.awake.remove(&group);
            }
        }
    }

    /// Drives every group that got an event this round, then sends their
    /// persists to the sync thread as one batch.
    fn drive_round(&mut self) {
        let mut items = Vec::new();
        let mut must_sync = false;
        for group in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.groups.get_mut(&group) else {
                continue;
            };
            slot.dirty = false;
            let token = slot.token;
            let driven = &mut slot.driven;
            if let Err((reason, panicked)) = crate::runtime::catch_stop(|| driven.drive()) {
                self.stop_group(group, reason, panicked);
                continue;
            }
            let driven = &mut self.groups.get_mut(&group).expect("driven above").driven;
            if let Some((number, sync)) = driven.take_persist() {
                items.push((group, token, number));
                must_sync |= sync;
            }
            if driven.is_hibernating() {
                self.awake.remove(&group);
            } else {
                self.awake.insert(group);
            }
        }
        if !items.is_empty() {
            let _ = self.sync.send(SyncBatch {
                items,
                must_sync,
                reply: self.me.clone(),
            });
        }
    }

    /// Ends `group` here: its loop finishes (failing what waits), its
    /// state machine is let go once its last apply message ran, and its
    /// stop reason is published.
    fn stop_group(&mut self, group: u64, reason: Stopped, panicked: bool) {
        let Some(mut slot) = self.groups.remove(&group) else {
            return;
        };
        self.awake.remove(&group);
        let finished = crate::runtime::catch_stop(|| {
            slot.driven.finish(&reason, panicked);
            Ok(())
        });
        if let Err((e, _)) = finished {
            tracing::error!(group, error = ?e, "a group panicked while stopping");
        }
        // The apply shard publishes the stop once the state machine is
        // gone; if the apply shard is gone, it is published here.
        let removal = ApplyShardMsg::Remove {
            group,
            token: slot.token,
            guard: slot.guard,
            reason,
        };
        if let Err(mpsc::error::SendError(ApplyShardMsg::Remove { guard, reason, .. })) =
            self.apply.send(removal)
        {
            guard.finish(reason);
        }
    }

    fn unknown_group(&mut self, group: u64, inbound: &Inbound) {
        if let Inbound::Messages(env) = inbound {
            self.unknown.increment(env.messages.len() as u64);
            if self.logged.len() < UNKNOWN_GROUPS_LOGGED && self.logged.insert(group) {
                tracing::warn!(
                    host = self.host,
                    group,
                    from = env.from,
                    "dropping messages for a group this host does not run"
                );
            }
        }
    }
}

/// What an apply shard does after a message.
enum Next {
    Continue,
    /// The applier of this instance stopped on a fatal error it reported.
    Drop(u64, u64),
    Stop,
}

/// An apply shard: each group's apply messages, in order, on its state
/// machine. A panic here (a state machine's `Drop`, a broken invariant)
/// is caught per message and logged; the shard goes on. (A panic in
/// `apply`, `snapshot` or a read is caught by the applier itself and stops
/// its group with a reason.)
async fn apply_shard(mut rx: mpsc::UnboundedReceiver<ApplyShardMsg>) {
    let mut appliers: HashMap<u64, (u64, Box<dyn AnyApplier>)> = HashMap::new();
    while let Some(msg) = rx.recv().await {
        let next = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match msg {
            ApplyShardMsg::Add {
                group,
                token,
                applier,
            } => {
                appliers.insert(group, (token, applier));
                Next::Continue
            }
            ApplyShardMsg::Apply { group, token, msg } => match appliers.get_mut(&group) {
                Some((t, applier)) if *t == token => {
                    if applier.handle(msg) {
                        Next::Continue
                    } else {
                        Next::Drop(group, token)
                    }
                }
                _ => Next::Continue,
            },
            ApplyShardMsg::Remove {
                group,
                token,
                guard,
                reason,
            } => {
                if appliers.get(&group).is_some_and(|(t, _)| *t == token) {
                    appliers.remove(&group);
                }
                guard.finish(reason);
                Next::Continue
            }
            ApplyShardMsg::Stop => Next::Stop,
        }));
        match next {
            Ok(Next::Continue) => {}
            Ok(Next::Stop) => return,
            Ok(Next::Drop(group, token)) => {
                // Nothing more reaches a state machine that failed.
                if appliers.get(&group).is_some_and(|(t, _)| *t == token) {
                    let gone = appliers.remove(&group);
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(gone)))
                        .is_err()
                    {
                        tracing::error!(group, "a state machine panicked while dropped");
                    }
                }
            }
            Err(payload) => {
                let message = crate::node::panic_message(payload.as_ref());
                tracing::error!(%message, "the apply shard caught a panic and goes on");
            }
        }
    }
}
