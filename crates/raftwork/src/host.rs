//! Many Raft groups on one host (cargo feature `host`; issue 17): one
//! transport, one log engine, one sync thread, one ticker and a fixed set
//! of worker shards shared by the groups, groups created and removed at
//! run time.
//!
//! ```text
//!  peers ──▶ Transport ──▶ host inbox ──▶ router task ──group % shards──▶ shard i (shard.rs)
//!                                             │ group 0: host heartbeats ──▶ Liveness
//!  shard's groups ──send──▶ the shared Transport (envelopes carry the group id)
//!  shard's groups ──stage──▶ EngineLog ──▶ the host's EngineHost; one SyncBatch per shard round
//!      ──▶ host sync thread (one raft-engine write and fdatasync for every batch queued)
//! ```
//!
//! Invariants:
//! * a host has one node id, which is its node id in every group it runs
//!   (so a peer's transport address is its host's);
//! * a message for a group this host does not run never creates state: its
//!   shard drops it, counts it (`raftwork_host_unknown_group_messages_total`)
//!   and logs it (once per group id, for the first 1,024 ids per shard);
//! * a group's shutdown never shuts the shared transport down; the host's
//!   does, after its groups.
//!
//! A group has no task, channel or timer of its own: its shard drives it
//! (`shard.rs`). The one sync thread takes every shard's batch queued,
//! makes them durable with one engine write and one fdatasync, and answers
//! each shard with its groups' ready numbers.
//!
//! One ticker serves every group: each tick it tells every shard to tick
//! its awake groups, sends one coalesced heartbeat to each peer host
//! (group 0, whatever the number of groups), and marks dead the peers not
//! heard for `HostConfig::host_timeout_ticks`. A quiet group hibernates
//! (`Core::try_hibernate`): it is not ticked, and as a follower it is
//! checked against its leader's host's view instead. That view changes
//! when the host stops answering, restarts (a new incarnation), or one of
//! its groups stops while leading (its epoch): the followers then wake,
//! and elect a new leader if theirs is gone (`clock.rs`).
//!
//! A group's snapshots stream over a network transport as a node's own
//! do: each group attaches its snapshot store to the shared transport
//! under its group id (`Transport::attach_snapshots`) and detaches it when
//! it stops here.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use raftwork_core::liveness::HOST_GROUP;
use raftwork_storage::{EngineHost, FileSnapshotStore};
use raftwork_transport::{Envelope, Inbound, NodeId, Transport, TransportError};

use tokio::sync::mpsc;

use crate::clock::Liveness;
use crate::shard::{ShardMsg, ShardQueues, ShardWiring, SyncBatch};
use crate::{BuildError, Builder, Config, Inbox, Node, StateMachine};

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
    /// Worker shards driving the groups (group `g` on shard `g % shards`),
    /// each a ready task and an apply task. Default: the machine's cores.
    pub shards: usize,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            tick_interval: std::time::Duration::from_millis(100),
            hibernate_after_ticks: 5,
            host_timeout_ticks: 10,
            shards: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// A host group's default `CoreConfig::max_inflight_msgs` (a node of its
/// own: 256). raft-rs allocates this many slots per member up front in
/// every replica of a group (8 bytes each), so 256 would cost an idle
/// group 6 KiB; one of many groups rarely has 32 appends unanswered.
/// `configure` in [`Host::create_group`] may set another.
pub const GROUP_INFLIGHT_MSGS: usize = 32;

/// A group's `Node<SM>`, typed again by [`Host::group`].
type AnyNode = Box<dyn std::any::Any + Send + Sync>;

/// Stops a running group and waits until it has.
type Stopper =
    Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send>;

/// A host's view of its peer hosts' liveness ([`Host::peer_liveness`]);
/// cheap to clone. It stops changing once the host has stopped.
#[derive(Clone)]
pub struct PeerLiveness(Arc<Liveness>);

impl PeerLiveness {
    /// Whether peer host `id` has been heard within
    /// [`HostConfig::host_timeout_ticks`] (false for a peer never heard).
    pub fn is_alive(&self, id: NodeId) -> bool {
        self.0.view(id).alive
    }

    /// Stops this host's own heartbeats for good, for a host about to stop
    /// that has handed its leaderships over: its peers then see it dead
    /// after `host_timeout_ticks` (and decisions like [`Self::is_alive`]
    /// stop counting on it), while its groups still run until it stops.
    /// Followers whose leader is still here wake and elect another.
    pub fn stop_announcing(&self) {
        self.0.fall_silent();
    }
}

/// A host: the transport and log engine its groups share.
pub struct Host {
    id: NodeId,
    dir: PathBuf,
    engine: Arc<EngineHost>,
    transport: Arc<dyn Transport>,
    /// The worker shards' queues (group `g` on `shards[g % len]`).
    shards: Arc<Vec<ShardQueues>>,
    /// The shards' ready and apply tasks.
    shard_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    sync_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Each running group: how to stop it, and its handle.
    groups: Mutex<HashMap<u64, (Stopper, AnyNode)>>,
    /// Groups being removed: not running, not yet free to create again.
    removing: Mutex<HashSet<u64>>,
    /// The next group instance's token (see `shard.rs`).
    next_token: std::sync::atomic::AtomicU64,
    router: tokio::task::JoinHandle<()>,
    config: HostConfig,
    liveness: Arc<Liveness>,
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
        if config.tick_interval.is_zero() || config.host_timeout_ticks == 0 || config.shards == 0 {
            return Err(BuildError::Config(crate::ConfigError(
                "tick_interval, host_timeout_ticks and shards must not be 0".into(),
            )));
        }
        let dir = dir.as_ref().to_path_buf();
        crate::metrics::describe_defs(crate::metrics::HOST);
        let engine = EngineHost::open(dir.join("log"))?;
        // A random incarnation: peers tell this start from the last one.
        let incarnation = crate::node::random_u64() >> 2;
        let liveness = Arc::new(Liveness::new(
            incarnation,
            config.tick_interval * config.host_timeout_ticks,
        ));
        let transport: Arc<dyn Transport> = Arc::new(transport);
        let (jobs, thread) = spawn_sync_thread(engine.clone(), &dir)?;
        let mut shards = Vec::with_capacity(config.shards);
        let mut shard_tasks = Vec::with_capacity(2 * config.shards);
        for index in 0..config.shards {
            let (queues, tasks) =
                crate::shard::spawn_shard(id, index, liveness.clone(), jobs.clone());
            shards.push(queues);
            shard_tasks.extend(tasks);
        }
        // The shards hold the sync thread's only queue: it ends after them.
        drop(jobs);
        let shards = Arc::new(shards);
        let router = tokio::spawn(route(inbox, shards.clone(), liveness.clone()));
        let ticker = tokio::spawn(tick(
            id,
            config.tick_interval,
            shards.clone(),
            liveness.clone(),
            transport.clone(),
        ));
        Ok(Self {
            id,
            dir,
            engine,
            transport,
            shards,
            shard_tasks: Mutex::new(shard_tasks),
            sync_thread: Mutex::new(Some(thread)),
            groups: Mutex::default(),
            removing: Mutex::default(),
            next_token: std::sync::atomic::AtomicU64::new(1),
            router,
            config,
            liveness,
            ticker,
        })
    }

    /// A handle on this host's view of its peer hosts' liveness (the
    /// coalesced heartbeats'), for decisions above Raft such as where to
    /// move a group's leadership.
    pub fn peer_liveness(&self) -> PeerLiveness {
        PeerLiveness(self.liveness.clone())
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
    /// the node's settings; the group id is set here. A host group's
    /// defaults differ from a node of its own's in three settings:
    /// `hibernate_after_ticks` (from [`HostConfig`]), `max_inflight_msgs`
    /// ([`GROUP_INFLIGHT_MSGS`]) and `lazy_commit_broadcast` (on: see
    /// `CoreConfig`).
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
        if groups.contains_key(&group_id) || self.removing.lock().unwrap().contains(&group_id) {
            return Err(BuildError::Config(crate::ConfigError(format!(
                "group {group_id} already runs on this host (or is being removed)"
            ))));
        }
        let mut config = Config::default();
        config.tick_interval = self.config.tick_interval;
        config.core.hibernate_after_ticks = self.config.hibernate_after_ticks;
        config.core.max_inflight_msgs = GROUP_INFLIGHT_MSGS;
        config.core.lazy_commit_broadcast = true;
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
        let queues = &self.shards[(group_id % self.shards.len() as u64) as usize];
        if queues.control.is_closed() {
            return Err(BuildError::Config(crate::ConfigError(
                "the host is shutting down".into(),
            )));
        }
        let mut builder = Builder::new(self.id, state_machine)
            .log_store(self.engine.group(group_id)?)
            .snapshot_store(snapshots)
            .on_shard(ShardWiring {
                group: group_id,
                token: self
                    .next_token
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                queues: queues.clone(),
                transport: self.transport.clone(),
                liveness: self.liveness.clone(),
            })
            .config(config);
        builder = if voters.is_empty() {
            builder.join_existing()
        } else {
            builder.initial_voters(voters.iter().copied())
        };
        let node = builder.build()?;
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
        let stop = {
            let mut groups = self.groups.lock().unwrap();
            let stop = groups.remove(&group_id);
            if stop.is_some() {
                self.removing.lock().unwrap().insert(group_id);
            }
            stop
        };
        match stop {
            Some((stop, _)) => {
                stop().await;
                self.removing.lock().unwrap().remove(&group_id);
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
        // Each shard stops all its groups at once, then ends; its apply
        // task ends once its last group's applies ran.
        self.ticker.abort();
        self.router.abort();
        for shard in self.shards.iter() {
            let _ = shard.control.send(ShardMsg::Stop);
        }
        self.groups.lock().unwrap().clear();
        let tasks = std::mem::take(&mut *self.shard_tasks.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
        self.transport.shutdown();
        let thread = self.sync_thread.lock().unwrap().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// The host's one sync thread: takes every shard's batch queued, makes
/// them all durable with one engine write (one fdatasync) if any needs it,
/// and answers each batch. After a failed write every answer is an error
/// (the engine refuses all later writes), so each group stops.
fn spawn_sync_thread(
    engine: Arc<EngineHost>,
    dir: &Path,
) -> Result<
    (
        mpsc::UnboundedSender<SyncBatch>,
        std::thread::JoinHandle<()>,
    ),
    BuildError,
> {
    let (tx, mut rx) = mpsc::unbounded_channel::<SyncBatch>();
    let thread = std::thread::Builder::new()
        .name("raftwork-host-sync".into())
        .spawn(move || {
            // After a failed write, every answer is that failure: the
            // engine's state is unknown, so nothing more is durable.
            let mut failed: Option<String> = None;
            while let Some(first) = rx.blocking_recv() {
                let mut batches = vec![first];
                while let Ok(b) = rx.try_recv() {
                    batches.push(b);
                }
                let result = if let Some(e) = &failed {
                    Err(e.clone())
                } else if batches.iter().any(|b| b.must_sync) {
                    let _span = tracing::debug_span!(
                        target: "raftwork::persist",
                        "host_sync",
                        batches = batches.len()
                    )
                    .entered();
                    engine.sync().map_err(|e| e.to_string())
                } else {
                    Ok(())
                };
                if let Err(e) = &result {
                    failed = Some(e.clone());
                }
                for b in batches {
                    let _ = b.reply.send(ShardMsg::Persisted {
                        items: b.items,
                        result: result.clone(),
                    });
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

/// The host's ticker: one tick for every awake group, one heartbeat to
/// each peer host, and the peers' liveness.
async fn tick(
    host: NodeId,
    interval: std::time::Duration,
    shards: Arc<Vec<ShardQueues>>,
    liveness: Arc<Liveness>,
    transport: Arc<dyn Transport>,
) {
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        timer.tick().await;
        liveness.check(std::time::Instant::now());
        for shard in shards.iter() {
            let _ = shard.control.send(ShardMsg::Tick);
        }
        for (peer, heartbeat) in liveness.heartbeats(host) {
            transport.send(Envelope {
                group_id: HOST_GROUP,
                from: host,
                to: peer,
                messages: vec![heartbeat],
            });
        }
    }
}

/// The router: every inbound item to its group's shard (which drops it if
/// the group does not run there); host heartbeats to the host's liveness
/// view.
async fn route(mut inbox: Inbox, shards: Arc<Vec<ShardQueues>>, liveness: Arc<Liveness>) {
    while let Some(item) = inbox.recv().await {
        let group = match &item {
            Inbound::Messages(env) if env.group_id == HOST_GROUP => {
                let now = std::time::Instant::now();
                for m in &env.messages {
                    liveness.receive(env.from, m, now);
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
        let shard = &shards[(group % shards.len() as u64) as usize];
        match item {
            // A full shard inbox drops a peer's messages, as a full
            // transport queue does (raft sends again).
            Inbound::Messages(_) => {
                let _ = shard.inbound.try_send(item);
            }
            // The transport's own reports are never dropped: a lost
            // snapshot report would leave its leader waiting for ever.
            report => {
                let _ = shard.control.send(ShardMsg::Report(report));
            }
        }
    }
}
