//! Many Raft groups on one host (cargo feature `host`; issue 17, first
//! step): one transport and one log engine shared by the groups, groups
//! created and removed at run time.
//!
//! ```text
//!  peers ──▶ Transport ──▶ host inbox ──▶ router task ──by group id──▶ group inbox ──▶ group's ready loop
//!                                             │ unknown group: dropped, counted, logged
//!  group's ready loop ──send──▶ GroupTransport ──▶ the shared Transport (envelopes carry the group id)
//!  group's ready loop ──stage/sync──▶ EngineLog ──▶ the host's EngineHost (one raft-engine, one fdatasync per write for all groups)
//! ```
//!
//! Invariants:
//! * a host has one node id, which is its node id in every group it runs
//!   (so a peer's transport address is its host's);
//! * a message for a group this host does not run never creates state: it
//!   is dropped, counted (`raftwork_host_unknown_group_messages_total`) and
//!   logged (once per group id, for the first 1,024 ids);
//! * a group's shutdown never shuts the shared transport down; the host's
//!   does, after its groups.
//!
//! One sync thread serves every group: it takes all the persists queued,
//! makes them durable with one engine write and one fdatasync, and answers
//! each group with its highest ready number.
//!
//! One ticker serves every group (no timer per group): each tick it bumps
//! the tick number every awake group waits on, sends one coalesced
//! heartbeat to each peer host (group 0, whatever the number of groups),
//! and marks dead the peers not heard for `HostConfig::host_timeout_ticks`.
//! A quiet group hibernates (`Core::try_hibernate`): it is not ticked, and
//! as a follower it waits on its leader's host's view instead. That view
//! changes when the host stops answering, restarts (a new incarnation), or
//! one of its groups stops while leading (its epoch): the followers then wake,
//! and elect a new leader if theirs is gone (`clock.rs`).
//!
//! What this step does not do yet (the issue's later items): each group
//! runs as tokio tasks of its own (a ready loop and an apply task) on the
//! runtime's workers; snapshots travel inline in envelopes (the streaming
//! transports' snapshot store is one per transport).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use raftwork_storage::{EngineHost, FileSnapshotStore};
use raftwork_transport::{Envelope, Inbound, InboxSender, NodeId, Transport, TransportError};

use tokio::sync::mpsc;

use crate::clock::{HostClock, Liveness};
use crate::runtime::SyncMode;
use crate::{BuildError, Builder, Config, Inbox, Node, StateMachine};

/// Unknown group ids logged by name; past this many, only counted.
const UNKNOWN_GROUPS_LOGGED: usize = 1024;

/// Capacity of each group's inbox, in envelopes (a full one drops; raft
/// sends again).
pub const GROUP_INBOX_ENVELOPES: usize = 1024;

/// The group id of host-level messages (the coalesced heartbeats): no
/// group may use it.
const HOST_GROUP: u64 = 0;

/// Settings shared by every group of a host.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Length of one tick, for every group (a group's own
    /// `Config::tick_interval` is replaced by it). Default: 100 ms.
    pub tick_interval: std::time::Duration,
    /// Quiet ticks after which a group hibernates (`CoreConfig::
    /// hibernate_after_ticks`; 0: groups never do). Default: 5 (with the
    /// default 10-tick elections).
    pub hibernate_after_ticks: u64,
    /// A peer host not heard for this many ticks is dead: the groups it
    /// led wake up and elect new leaders. Default: 10 (one election
    /// timeout).
    pub host_timeout_ticks: u32,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            tick_interval: std::time::Duration::from_millis(100),
            hibernate_after_ticks: 5,
            host_timeout_ticks: 10,
        }
    }
}

/// A host group's default `CoreConfig::max_inflight_msgs` (a node of its
/// own: 256). raft-rs allocates this many slots per member up front in
/// every replica of a group (8 bytes each), so 256 would cost an idle
/// group 6 KiB; one of many groups rarely has 32 appends unanswered.
/// `configure` in [`Host::create_group`] may set another.
pub const GROUP_INFLIGHT_MSGS: usize = 32;

/// The groups' inboxes, by group id.
type Routes = Arc<RwLock<HashMap<u64, InboxSender>>>;

/// A group's `Node<SM>`, typed again by [`Host::group`].
type AnyNode = Box<dyn std::any::Any + Send + Sync>;

/// Stops a running group and waits until it has.
type Stopper =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

/// A host: the transport and log engine its groups share.
pub struct Host {
    id: NodeId,
    dir: PathBuf,
    engine: Arc<EngineHost>,
    transport: Arc<dyn Transport>,
    routes: Routes,
    /// The one sync thread's queue (taken at shutdown, so the thread ends
    /// once the groups' clones are gone too).
    sync_jobs: Mutex<Option<mpsc::UnboundedSender<SyncJob>>>,
    sync_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Each running group: how to stop it, and its handle.
    groups: Mutex<HashMap<u64, (Stopper, AnyNode)>>,
    router: tokio::task::JoinHandle<()>,
    config: HostConfig,
    liveness: Arc<Liveness>,
    /// The tick number every awake group waits on.
    ticks: tokio::sync::watch::Receiver<u64>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.router.abort();
        self.ticker.abort();
    }
}

impl Host {
    /// A host with node id `id`, its log engine and snapshots under `dir`,
    /// on `transport` (whose inbox is `inbox`). Must be called inside a
    /// tokio runtime.
    pub fn open(
        id: NodeId,
        dir: impl AsRef<Path>,
        transport: impl Transport,
        inbox: Inbox,
    ) -> Result<Self, BuildError> {
        Self::open_with(id, dir, transport, inbox, HostConfig::default())
    }

    /// [`Host::open`] with settings of its own.
    pub fn open_with(
        id: NodeId,
        dir: impl AsRef<Path>,
        transport: impl Transport,
        inbox: Inbox,
        config: HostConfig,
    ) -> Result<Self, BuildError> {
        if config.tick_interval.is_zero() || config.host_timeout_ticks == 0 {
            return Err(BuildError::Config(crate::ConfigError(
                "tick_interval and host_timeout_ticks must not be 0".into(),
            )));
        }
        let dir = dir.as_ref().to_path_buf();
        let engine = EngineHost::open(dir.join("log"))?;
        let routes: Routes = Arc::default();
        // A random incarnation: peers tell this start from the last one.
        let incarnation = crate::node::random_u64() >> 2;
        let liveness = Arc::new(Liveness::new(
            incarnation,
            config.tick_interval * config.host_timeout_ticks,
        ));
        let transport: Arc<dyn Transport> = Arc::new(transport);
        let router = tokio::spawn(route(id, inbox, routes.clone(), liveness.clone()));
        let (ticks_tx, ticks) = tokio::sync::watch::channel(0u64);
        let ticker = tokio::spawn(tick(
            id,
            config.tick_interval,
            ticks_tx,
            liveness.clone(),
            transport.clone(),
        ));
        let (jobs, thread) = spawn_sync_thread(engine.clone(), &dir)?;
        Ok(Self {
            id,
            dir,
            engine,
            transport,
            routes,
            sync_jobs: Mutex::new(Some(jobs)),
            sync_thread: Mutex::new(Some(thread)),
            groups: Mutex::default(),
            router,
            config,
            liveness,
            ticks,
            ticker,
        })
    }

    /// Groups asleep right now (hibernating: not ticked).
    pub fn hibernating_groups(&self) -> usize {
        self.liveness.asleep()
    }

    /// This host's node id (its id in every group).
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Groups whose logs this host's engine holds (running or not).
    pub fn stored_groups(&self) -> Vec<u64> {
        self.engine.groups()
    }

    /// Starts group `group_id` on this host with `state_machine`. With
    /// `voters`, a new group bootstraps with them (ignored if the group's
    /// log already holds it: a restart); with none, the group joins an
    /// existing one (another member adds this host). `configure` adjusts
    /// the node's settings; the group id is set here.
    pub fn create_group<SM: StateMachine>(
        &self,
        group_id: u64,
        voters: &[NodeId],
        state_machine: SM,
        configure: impl FnOnce(&mut Config),
    ) -> Result<Node<SM>, BuildError> {
        if group_id == HOST_GROUP {
            return Err(BuildError::Config(crate::ConfigError(
                "group id 0 is reserved".into(),
            )));
        }
        let mut groups = self.groups.lock().unwrap();
        if groups.contains_key(&group_id) {
            return Err(BuildError::Config(crate::ConfigError(format!(
                "group {group_id} already runs on this host"
            ))));
        }
        let (tx, inbox) = tokio::sync::mpsc::channel(GROUP_INBOX_ENVELOPES);
        let mut config = Config::default();
        config.tick_interval = self.config.tick_interval;
        config.core.hibernate_after_ticks = self.config.hibernate_after_ticks;
        config.core.max_inflight_msgs = GROUP_INFLIGHT_MSGS;
        configure(&mut config);
        if config.tick_interval != self.config.tick_interval {
            return Err(BuildError::Config(crate::ConfigError(
                "a group ticks with its host: set HostConfig::tick_interval instead".into(),
            )));
        }
        config.core.id = self.id;
        config.core.group_id = group_id;
        self.liveness
            .add_peers(voters.iter().copied().filter(|&v| v != self.id));
        config
            .metric_labels
            .push(("group".into(), group_id.to_string()));
        let snapshots = FileSnapshotStore::open(
            self.dir.join("snapshots").join(group_id.to_string()),
            config.snapshot_keep_count,
            config.snapshot_compression,
        )?;
        let jobs = self.sync_jobs.lock().unwrap().clone().ok_or_else(|| {
            BuildError::Config(crate::ConfigError("the host is shutting down".into()))
        })?;
        let (done_tx, done) = mpsc::unbounded_channel();
        let sync = SyncMode::Worker {
            jobs: Box::new(move |number, must_sync| {
                let _ = jobs.send(SyncJob {
                    group: group_id,
                    number,
                    must_sync,
                    done: done_tx.clone(),
                });
            }),
            done,
        };
        let mut builder = Builder::new(self.id, state_machine)
            .log_store(self.engine.group(group_id)?)
            .shared_sync(sync)
            .snapshot_store(snapshots)
            .host_clock(HostClock::new(self.ticks.clone(), self.liveness.clone()))
            .transport(
                GroupTransport {
                    inner: self.transport.clone(),
                },
                inbox,
            )
            .config(config);
        builder = if voters.is_empty() {
            builder.join_existing()
        } else {
            builder.initial_voters(voters.iter().copied())
        };
        let node = builder.build()?;
        self.routes.write().unwrap().insert(group_id, tx);
        let stopper = node.clone();
        let stop: Stopper = Box::new(move || Box::pin(async move { stopper.shutdown().await }));
        groups.insert(group_id, (stop, Box::new(node.clone())));
        Ok(node)
    }

    /// The handle of group `group_id`, if it runs on this host with state
    /// machine type `SM` (`None` otherwise).
    pub fn group<SM: StateMachine>(&self, group_id: u64) -> Option<Node<SM>> {
        self.groups
            .lock()
            .unwrap()
            .get(&group_id)
            .and_then(|(_, node)| node.downcast_ref::<Node<SM>>())
            .cloned()
    }

    /// Stops group `group_id` on this host and waits until it has (its log
    /// stays in the engine, so creating it again restarts it); from then
    /// on its messages are dropped as a group this host does not run.
    /// False if it was not running.
    pub async fn remove_group(&self, group_id: u64) -> bool {
        self.routes.write().unwrap().remove(&group_id);
        let stop = self.groups.lock().unwrap().remove(&group_id);
        match stop {
            Some((stop, _)) => {
                stop().await;
                true
            }
            None => false,
        }
    }

    /// The groups running on this host.
    pub fn running_groups(&self) -> Vec<u64> {
        let mut g: Vec<u64> = self.groups.lock().unwrap().keys().copied().collect();
        g.sort_unstable();
        g
    }

    /// Records peer host `id`'s transport address (for every group).
    pub fn set_peer(&self, id: NodeId, address: &str) -> Result<(), TransportError> {
        self.transport.set_peer(id, address)?;
        self.liveness.add_peers([id]);
        Ok(())
    }

    /// Stops every group, then the transport; the engine closes when the
    /// host and its groups' handles are dropped.
    pub async fn shutdown(self) {
        // Every group stops at once (one by one, 10,000 groups would take
        // 10,000 round trips through the runtime).
        self.routes.write().unwrap().clear();
        let stops: Vec<Stopper> = self
            .groups
            .lock()
            .unwrap()
            .drain()
            .map(|(_, (stop, _))| stop)
            .collect();
        let stopping: Vec<_> = stops.into_iter().map(|stop| tokio::spawn(stop())).collect();
        for s in stopping {
            let _ = s.await;
        }
        self.ticker.abort();
        self.transport.shutdown();
        self.router.abort();
        drop(self.sync_jobs.lock().unwrap().take());
        let thread = self.sync_thread.lock().unwrap().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// A group's persist, for the host's sync thread.
struct SyncJob {
    group: u64,
    number: u64,
    must_sync: bool,
    done: mpsc::UnboundedSender<Result<u64, String>>,
}

/// The host's one sync thread: takes every persist queued, makes them all
/// durable with one engine write (one fdatasync) if any needs it, and
/// answers each group with its highest ready number. After a failed write
/// every answer is an error (the engine refuses all later writes), so each
/// group's node stops.
fn spawn_sync_thread(
    engine: Arc<EngineHost>,
    dir: &Path,
) -> Result<(mpsc::UnboundedSender<SyncJob>, std::thread::JoinHandle<()>), BuildError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<SyncJob>();
    let thread = std::thread::Builder::new()
        .name("raftwork-host-sync".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut jobs = vec![first];
                while let Ok(j) = rx.try_recv() {
                    jobs.push(j);
                }
                let outcome = if jobs.iter().any(|j| j.must_sync) {
                    engine.sync().map_err(|e| e.to_string())
                } else {
                    Ok(())
                };
                // Jobs of one group come in ready order: its last is its highest.
                let mut last: HashMap<u64, usize> = HashMap::new();
                for (k, j) in jobs.iter().enumerate() {
                    last.insert(j.group, k);
                }
                for (_, k) in last {
                    let j = &jobs[k];
                    let _ = j.done.send(outcome.clone().map(|()| j.number));
                }
            }
        })
        .map_err(|source| {
            BuildError::Storage(raftwork_storage::StorageError::Io {
                path: dir.to_path_buf(),
                source,
            })
        })?;
    Ok((tx, thread))
}

/// The shared transport as one group sees it: sends go through; shutting
/// it down is the host's business, not a group's.
struct GroupTransport {
    inner: Arc<dyn Transport>,
}

impl Transport for GroupTransport {
    fn send(&self, envelope: Envelope) {
        self.inner.send(envelope)
    }

    fn set_peer(&self, id: NodeId, address: &str) -> Result<(), TransportError> {
        self.inner.set_peer(id, address)
    }
}

/// The host's ticker: one tick for every awake group, one heartbeat to
/// each peer host, and the peers' liveness.
async fn tick(
    host: NodeId,
    interval: std::time::Duration,
    ticks: tokio::sync::watch::Sender<u64>,
    liveness: Arc<Liveness>,
    transport: Arc<dyn Transport>,
) {
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        ticks.send_modify(|t| *t += 1);
        liveness.check(std::time::Instant::now());
        let (incarnation, epoch) = liveness.own();
        for peer in liveness.peers() {
            transport.send(Envelope {
                group_id: HOST_GROUP,
                from: host,
                to: peer,
                messages: vec![host_heartbeat(host, peer, incarnation, epoch)],
            });
        }
    }
}

/// A host heartbeat: a `MsgHeartbeat` in group 0 whose `index` is the
/// sender's incarnation and `commit` its epoch.
fn host_heartbeat(
    from: NodeId,
    to: NodeId,
    incarnation: u64,
    epoch: u64,
) -> raft::prelude::Message {
    let mut m = raft::prelude::Message::default();
    m.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.index = incarnation;
    m.commit = epoch;
    m
}

/// The router: every inbound item to its group's inbox; host heartbeats
/// to the host's liveness view.
async fn route(host: NodeId, mut inbox: Inbox, routes: Routes, liveness: Arc<Liveness>) {
    let unknown = metrics::counter!("raftwork_host_unknown_group_messages_total");
    let mut logged: HashSet<u64> = HashSet::new();
    while let Some(item) = inbox.recv().await {
        let group = match &item {
            Inbound::Messages(env) if env.group_id == HOST_GROUP => {
                let now = std::time::Instant::now();
                for m in &env.messages {
                    if m.get_msg_type() == raft::prelude::MessageType::MsgHeartbeat {
                        liveness.heard(env.from, m.index, m.commit, now);
                    }
                }
                continue;
            }
            // Host heartbeats that did not go through: the ticker goes on.
            Inbound::Unreachable { group_id, .. } if *group_id == HOST_GROUP => continue,
            Inbound::Messages(env) => env.group_id,
            Inbound::Unreachable { group_id, .. } | Inbound::SnapshotStatus { group_id, .. } => {
                *group_id
            }
        };
        let tx = routes.read().unwrap().get(&group).cloned();
        match tx {
            // A full group inbox drops, as a full transport queue does.
            Some(tx) => {
                let _ = tx.try_send(item);
            }
            None => {
                if let Inbound::Messages(env) = &item {
                    unknown.increment(env.messages.len() as u64);
                    if logged.len() < UNKNOWN_GROUPS_LOGGED && logged.insert(group) {
                        tracing::warn!(
                            host,
                            group,
                            from = env.from,
                            "dropping messages for a group this host does not run"
                        );
                    }
                }
            }
        }
    }
}
