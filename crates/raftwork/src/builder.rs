//! [`Builder`]: a node in a few lines, durable by default.
//!
//! Storage choice: by default the node keeps its Raft log in the native WAL
//! under `<data dir>/wal` and its snapshots under `<data dir>/snapshots`
//! (data dir default `./raftwork-data`). In-memory storage is an explicit
//! [`Builder::in_memory`] call, never a silent default.
//!
//! Start-up on an existing data dir: bootstrap is skipped, the state machine
//! is restored from the newest snapshot the log or the snapshot store knows,
//! and raft replays the log after it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftwork_core::{adopt_snapshot, bootstrap, ConfigError, Core, CoreConfig, FatalError, NodeId};
use raftwork_net::{GrpcTransport, HttpMode, HttpTransport, NetConfig, NetError, TcpTransport};
use raftwork_storage::{
    FileSnapshotStore, LogStore, MemLogStore, MemSnapshotStore, SnapshotCompression, SnapshotStore,
    StorageError, Wal, WalOptions,
};
use raftwork_transport::{Inbox, MemNetwork, Transport};
use tokio::sync::mpsc;

use crate::logging::raft_logger;
use crate::node::{Node, Shared};
use crate::runtime::{apply_task, spawn_sync_worker, Applier, ReadyLoop, SyncMode};
use crate::state_machine::StateMachine;
use raftwork_core::session::{SessionConfig, SessionTable};

/// Configuration of a node: the core's settings plus the shell's timing.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings of the sans-IO core (ids, ticks, limits, read options).
    pub core: CoreConfig,
    /// Length of one tick. Default: 100 ms (so elections after 1–2 s,
    /// heartbeats every 100 ms with the core's defaults).
    pub tick_interval: Duration,
    /// How long a membership change may take. Default: 10 s.
    pub membership_timeout: Duration,
    /// Capacity of the request queue from handles to the ready loop; a full
    /// queue makes callers wait (backpressure). Default: 65,536.
    pub request_queue_capacity: usize,
    /// Snapshots kept by the default snapshot stores. Default: 2.
    pub snapshot_keep_count: usize,
    /// Compression of the file snapshot store. Default: zstd level 1.
    pub snapshot_compression: SnapshotCompression,
    /// Limits of the replicated session table: TTL of a session in log time
    /// (default 30 min) and the most sessions kept (default 100,000). The
    /// limits in force are replicated: each register entry carries those of
    /// the leader that proposed it, and every replica takes them on when it
    /// applies the entry, so members with different settings still agree.
    pub sessions: SessionConfig,
    /// Labels added to every metric the node itself records (not the WAL's
    /// or the transport's, which a host's groups share): a `Host` sets
    /// `group` to the group id. Default: none.
    pub metric_labels: Vec<(String, String)>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            core: CoreConfig::default(),
            tick_interval: Duration::from_millis(100),
            membership_timeout: Duration::from_secs(10),
            request_queue_capacity: 65_536,
            snapshot_keep_count: 2,
            snapshot_compression: SnapshotCompression::default(),
            sessions: SessionConfig::default(),
            metric_labels: Vec::new(),
        }
    }
}

impl Config {
    /// Rejects contradictions.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.core.validate()?;
        if self.tick_interval.is_zero() {
            return Err(ConfigError("tick_interval must not be zero".into()));
        }
        if self.request_queue_capacity == 0 {
            return Err(ConfigError(
                "request_queue_capacity must be at least 1".into(),
            ));
        }
        if self.snapshot_keep_count == 0 {
            return Err(ConfigError("snapshot_keep_count must be at least 1".into()));
        }
        if self.sessions.ttl_ms == 0 || self.sessions.max_sessions == 0 {
            return Err(ConfigError(
                "sessions.ttl_ms and sessions.max_sessions must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The configuration contradicts itself.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The initial voters are invalid (empty, id 0 or duplicates).
    #[error("invalid initial voters: {0}")]
    InitialVoters(String),
    /// The log store failed while bootstrapping.
    #[error("log store failed: {0}")]
    Storage(#[from] StorageError),
    /// raft-rs refused to start.
    #[error(transparent)]
    Fatal(#[from] FatalError),
    /// The network transport could not start (address in use, bad TLS
    /// settings, a malformed peer address).
    #[error("network: {0}")]
    Network(String),
    /// The data dir belongs to another node or group. Fix: point this node
    /// at its own data dir.
    #[error("data dir belongs to {found}, not {expected} (see {path})")]
    WrongDataDir {
        /// The identity file.
        path: PathBuf,
        /// What the data dir says.
        found: String,
        /// What this node is.
        expected: String,
    },
    /// The state machine could not be restored from the snapshot the node
    /// must start from (for example, a corrupt snapshot file).
    #[error("restoring the state machine from snapshot {index} failed: {source}")]
    Restore {
        /// Index of the snapshot.
        index: u64,
        /// Why it failed; corruption names the file and offset.
        #[source]
        source: std::io::Error,
    },
    /// A tool that makes a data dir (`seed_data_dir`) found one that is
    /// not empty; nothing was written.
    #[error("data dir {} is not empty; refusing to write into it", .0.display())]
    DataDirNotEmpty(PathBuf),
    /// An on-disk state machine's store could not be opened.
    #[error("opening the on-disk state machine failed: {0}")]
    StateMachineOpen(#[source] std::io::Error),
    /// An on-disk state machine's store holds applies past the end of the
    /// log: the store and the data dir do not belong together (a store
    /// kept while the data dir was wiped, or the other way round). Nothing
    /// was changed.
    #[error(
        "the on-disk state machine is durable at index {durable_index}, past the log's last \
         index {log_last_index}: its store and this data dir do not belong together"
    )]
    StateMachineAhead {
        /// What the store says it holds.
        durable_index: u64,
        /// The last index of the log.
        log_last_index: u64,
    },
}

/// Checks (or, in a new data dir, writes) the `NODE` file naming the node
/// and group the data dir belongs to.
pub(crate) fn check_identity(
    dir: &std::path::Path,
    id: NodeId,
    group_id: u64,
) -> Result<(), BuildError> {
    let path = dir.join("NODE");
    let want = format!("node={id} group={group_id}\n");
    let io = |source| StorageError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(found) if found == want => Ok(()),
        Ok(found) => Err(BuildError::WrongDataDir {
            path: path.clone(),
            found: found.trim().to_string(),
            expected: want.trim().to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            let tmp = dir.join("NODE.tmp");
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, want.as_bytes())?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(dir)?.sync_all()
            };
            write().map_err(io)?;
            Ok(())
        }
        Err(e) => Err(io(e).into()),
    }
}

/// The network transport a builder starts when given a listen address.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub enum TransportKind {
    /// [`TcpTransport`]: one connection per peer and direction, checksummed
    /// frames, snapshots streamed on their own connection. The default.
    #[default]
    Tcp,
    /// [`HttpTransport`]: the same frames over HTTP/1.1, in one long
    /// streaming request per peer or one short request per batch.
    Http(HttpMode),
    /// [`GrpcTransport`]: the same frames in gRPC streams (HTTP/2).
    Grpc,
}

/// Marker: the default storage, the WAL and file snapshots in the data dir.
pub struct DataDir;

/// Builds a [`Node`].
///
/// ```
/// # use raftwork::{Builder, StateMachine, Command};
/// # #[derive(Default)] struct Counter(u64);
/// # impl StateMachine for Counter {
/// #     type Response = u64;
/// #     fn apply(&mut self, c: &[Command<'_>]) -> Vec<u64> { c.iter().map(|_| { self.0 += 1; self.0 }).collect() }
/// #     fn snapshot(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> { w.write_all(&self.0.to_le_bytes()) }
/// #     fn restore(&mut self, r: &mut dyn std::io::Read) -> std::io::Result<()> { let mut b = [0; 8]; r.read_exact(&mut b)?; self.0 = u64::from_le_bytes(b); Ok(()) }
/// # }
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let node = Builder::new(1, Counter::default()).in_memory().build()?;
/// // Durable instead: Builder::new(1, Counter::default()).data_dir("./data").build()?
/// node.wait_for_leader(std::time::Duration::from_secs(10)).await?;
/// let (index, count) = node.propose(b"+1".to_vec()).await?;
/// assert_eq!(count, 1);
/// # let _ = index; node.shutdown().await; Ok(()) }
/// ```
pub struct Builder<SM, S = DataDir> {
    config: Config,
    state_machine: SM,
    store: S,
    snapshots: Option<Arc<dyn SnapshotStore>>,
    transport: Option<(Box<dyn Transport>, Inbox)>,
    network: Network,
    initial_voters: Option<Vec<NodeId>>,
    data_dir: PathBuf,
    wal_options: WalOptions,
    /// A host group: driven by one of the host's shards (its transport,
    /// sync thread, ticker and apply shard) instead of tasks of its own.
    shard: Option<crate::shard::ShardWiring>,
}

/// The network the builder starts itself, when no transport is given.
#[derive(Default)]
struct Network {
    listen: Option<std::net::SocketAddr>,
    peers: Vec<(NodeId, String)>,
    kind: TransportKind,
    config: NetConfig,
}

impl<SM: StateMachine> Builder<SM, DataDir> {
    /// A builder for node `id` running `state_machine`. By default the node
    /// keeps its log and snapshots in `./raftwork-data` and, on an empty log,
    /// bootstraps a single-voter cluster of itself.
    pub fn new(id: NodeId, state_machine: SM) -> Self {
        let mut config = Config::default();
        config.core.id = id;
        Self {
            config,
            state_machine,
            store: DataDir,
            snapshots: None,
            transport: None,
            network: Network::default(),
            initial_voters: Some(vec![id]),
            data_dir: PathBuf::from("./raftwork-data"),
            wal_options: WalOptions::default(),
            shard: None,
        }
    }

    /// Where the WAL and the snapshots live. Default: `./raftwork-data`.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = dir.into();
        self
    }

    /// Settings of the WAL (segment size, cache size).
    pub fn wal_options(mut self, options: WalOptions) -> Self {
        self.wal_options = options;
        self
    }

    /// Opens the WAL and the snapshot store in the data dir and starts the
    /// node on the current tokio runtime.
    ///
    /// The data dir remembers which node and group it belongs to (a `NODE`
    /// file): starting another node id or group on it is refused before
    /// anything is written.
    pub fn build(self) -> Result<Node<SM>, BuildError> {
        check_identity(
            &self.data_dir,
            self.config.core.id,
            self.config.core.group_id,
        )?;
        let mut options = self.wal_options.clone();
        options.group_id = self.config.core.group_id;
        let wal = Wal::open(self.data_dir.join("wal"), options)?;
        self.log_store(wal).build()
    }
}

impl<SM: StateMachine, S> Builder<SM, S> {
    /// Keeps the log and snapshots in memory: nothing survives the process.
    /// An explicit choice, never a silent default.
    pub fn in_memory(mut self) -> Builder<SM, MemLogStore> {
        if self.snapshots.is_none() {
            let keep = self.config.snapshot_keep_count.max(1);
            self.snapshots = Some(Arc::new(MemSnapshotStore::new(keep)));
        }
        self.log_store(MemLogStore::new())
    }

    /// Uses `store` for the Raft log. Unless a snapshot store is chosen, a
    /// volatile log gets an in-memory snapshot store and a durable one a file
    /// store under `<data dir>/snapshots`.
    pub fn log_store<S2: LogStore>(self, store: S2) -> Builder<SM, S2> {
        Builder {
            config: self.config,
            state_machine: self.state_machine,
            store,
            snapshots: self.snapshots,
            transport: self.transport,
            network: self.network,
            initial_voters: self.initial_voters,
            data_dir: self.data_dir,
            wal_options: self.wal_options,
            shard: self.shard,
        }
    }

    /// Runs the node as a group of a host, on `shard` (see `shard.rs`).
    #[cfg_attr(not(feature = "host"), allow(dead_code))]
    pub(crate) fn on_shard(mut self, shard: crate::shard::ShardWiring) -> Self {
        self.shard = Some(shard);
        self
    }

    /// Uses `store` for snapshots.
    pub fn snapshot_store(mut self, store: impl SnapshotStore) -> Self {
        self.snapshots = Some(Arc::new(store));
        self
    }

    /// Uses `transport` to reach peers, and `inbox` for what it receives.
    /// Overrides [`Builder::listen`].
    pub fn transport(mut self, transport: impl Transport, inbox: Inbox) -> Self {
        self.transport = Some((Box::new(transport), inbox));
        self
    }

    /// Listens for peers on `addr` with the selected transport
    /// ([`TransportKind::Tcp`] unless [`Builder::transport_kind`] says
    /// otherwise). Without `listen` or `transport`, the node has no network:
    /// enough for a single node.
    pub fn listen(mut self, addr: std::net::SocketAddr) -> Self {
        self.network.listen = Some(addr);
        self
    }

    /// Where peer `id` listens (`host:port`). More can be added at run time
    /// with [`Node::set_peer_address`].
    pub fn peer(mut self, id: NodeId, address: impl Into<String>) -> Self {
        self.network.peers.push((id, address.into()));
        self
    }

    /// The transport [`Builder::listen`] starts. Default: TCP.
    pub fn transport_kind(mut self, kind: TransportKind) -> Self {
        self.network.kind = kind;
        self
    }

    /// Settings of the network transport (frame limit, queues, backoff, TLS,
    /// snapshot rate).
    pub fn net_config(mut self, config: NetConfig) -> Self {
        self.network.config = config;
        self
    }

    /// On an empty log, bootstraps a new cluster with these voters (all
    /// founding members must be given the same list).
    pub fn initial_voters(mut self, voters: impl IntoIterator<Item = NodeId>) -> Self {
        self.initial_voters = Some(voters.into_iter().collect());
        self
    }

    /// Starts with an empty membership, waiting to be added to an existing
    /// cluster by its leader (no bootstrap).
    pub fn join_existing(mut self) -> Self {
        self.initial_voters = None;
        self
    }

    /// Replaces the whole configuration (the id is kept).
    pub fn config(mut self, config: Config) -> Self {
        let id = self.config.core.id;
        self.config = config;
        self.config.core.id = id;
        self
    }

    /// Changes the configuration in place.
    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Self {
        let id = self.config.core.id;
        f(&mut self.config);
        self.config.core.id = id;
        self
    }
}

impl<SM: StateMachine, S: LogStore> Builder<SM, S> {
    /// Starts the node on the current tokio runtime.
    pub fn build(self) -> Result<Node<SM>, BuildError> {
        let Builder {
            mut config,
            mut state_machine,
            store,
            snapshots,
            transport,
            network,
            initial_voters,
            data_dir,
            wal_options: _,
            shard,
        } = self;
        config.validate()?;
        // Only a host can let a core sleep: it knows whether a follower's
        // leader's host is alive.
        if config.core.hibernate_after_ticks > 0 && shard.is_none() {
            return Err(BuildError::Config(ConfigError(
                "hibernate_after_ticks needs a Host (a node of its own always ticks)".into(),
            )));
        }
        let id = config.core.id;
        let snapshots: Arc<dyn SnapshotStore> = match snapshots {
            Some(s) => s,
            None if store.is_volatile() => {
                Arc::new(MemSnapshotStore::new(config.snapshot_keep_count))
            }
            None => Arc::new(FileSnapshotStore::open(
                data_dir.join("snapshots"),
                config.snapshot_keep_count,
                config.snapshot_compression,
            )?),
        };
        let mut bootstrapped = None;
        if let Some(voters) = &initial_voters {
            let mut sorted = voters.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if voters.is_empty() || sorted.len() != voters.len() || sorted[0] == 0 {
                return Err(BuildError::InitialVoters(format!("{voters:?}")));
            }
            bootstrapped = bootstrap(&store, config.core.group_id, voters)?;
        }
        // An on-disk state machine says how far its own store is durable.
        let disk_durable = match state_machine.disk() {
            Some(disk) => Some(disk.open().map_err(BuildError::StateMachineOpen)?),
            None => None,
        };
        if let Some(durable_index) = disk_durable {
            let log_last_index = raft::Storage::last_index(&store)
                .map_err(|e| BuildError::Fatal(FatalError::Raft(e)))?;
            // The store is past the log only after restoring a received
            // snapshot whose install a crash kept out of the log (raft
            // hands a received snapshot out before its install is
            // durable). Its data is in the snapshot store, saved before
            // raft saw it; every command up to it is committed, so the
            // node goes on from its log and skips them as the leader sends
            // them again. Without that snapshot, the store and the data dir
            // do not belong together.
            if durable_index > 0 && bootstrapped.is_some() {
                // A new log, and a store that holds applies: they do not
                // belong together, whatever else the data dir holds.
                return Err(BuildError::StateMachineAhead {
                    durable_index,
                    log_last_index: 0,
                });
            }
            if durable_index > log_last_index {
                if snapshots.open(durable_index).is_err() {
                    return Err(BuildError::StateMachineAhead {
                        durable_index,
                        log_last_index,
                    });
                }
                tracing::warn!(
                    durable_index,
                    log_last_index,
                    "the on-disk state machine restored a received snapshot the log had not \
                     recorded before a crash; going on from the log, skipping what it holds"
                );
            }
        }
        let (applied_index, applied_term, sessions) = match bootstrapped {
            // The bootstrap entries are at term 1.
            Some(applied) => (applied, 1, SessionTable::new(config.sessions)),
            None => {
                let (index, term, sessions) = restore_from_snapshot(
                    &store,
                    config.core.group_id,
                    snapshots.as_ref(),
                    &mut state_machine,
                    config.sessions,
                    disk_durable,
                )?;
                (index, term, sessions)
            }
        };
        config.core.applied_index = applied_index;
        // Differs between two starts of the node (`CoreConfig::incarnation`).
        config.core.incarnation = crate::node::random_u64();
        let (transport, inbox) = match (&shard, transport, network.listen) {
            (Some(w), _, _) => (w.transport(), None),
            (None, Some((t, inbox)), _) => (t, Some(inbox)),
            (None, None, Some(listen)) => {
                let net_err = |e: NetError| BuildError::Network(e.to_string());
                let (t, inbox): (Box<dyn Transport>, Inbox) = match network.kind {
                    TransportKind::Tcp => {
                        let (t, i) =
                            TcpTransport::bind_now(id, listen, network.config).map_err(net_err)?;
                        (Box::new(t), i)
                    }
                    TransportKind::Http(mode) => {
                        let (t, i) = HttpTransport::bind_now(id, listen, network.config, mode)
                            .map_err(net_err)?;
                        (Box::new(t), i)
                    }
                    TransportKind::Grpc => {
                        let (t, i) =
                            GrpcTransport::bind_now(id, listen, network.config).map_err(net_err)?;
                        (Box::new(t), i)
                    }
                };
                for (peer, address) in &network.peers {
                    t.set_peer(*peer, address)
                        .map_err(|e| BuildError::Network(e.to_string()))?;
                }
                (t, Some(inbox))
            }
            (None, None, None) if !network.peers.is_empty() => {
                return Err(BuildError::Network(
                    "peer addresses given but no listen address".into(),
                ))
            }
            (None, None, None) => {
                let (t, inbox) = MemNetwork::new().join(id);
                (Box::new(t) as Box<dyn Transport>, Some(inbox))
            }
        };
        transport.attach_snapshots(config.core.group_id, snapshots.clone());
        let (sync, persisted, sync_thread) = match &shard {
            Some(_) => (SyncMode::Deferred { pending: None }, None, None),
            None if store.is_volatile() => (SyncMode::Inline, None, None),
            None => {
                let (mode, done, handle) = spawn_sync_worker(store.clone());
                (mode, Some(done), Some(handle))
            }
        };
        let core = match Core::new(config.core.clone(), store, &raft_logger()) {
            Ok(core) => core,
            Err(e) => {
                // A shared transport must not keep a store for a group
                // that never started.
                transport.detach_snapshots(config.core.group_id);
                return Err(e.into());
            }
        };
        // A node of its own gets its channels; a host group uses its
        // shard's (none of its own).
        let (own, apply_tx, applied_tx, requests_tx, clock) = match &shard {
            Some(w) => (
                None,
                w.apply_sink::<SM>(),
                w.apply_events(),
                w.requests::<SM>(),
                crate::clock::Clock::Host(w.clock()),
            ),
            None => {
                let (requests_tx, requests_rx) = mpsc::channel(config.request_queue_capacity);
                let (apply_tx, apply_rx) = mpsc::unbounded_channel();
                let (applied_tx, applied_rx) = mpsc::unbounded_channel();
                let inputs = crate::runtime::Inputs {
                    inbox: inbox.expect("a node of its own has an inbox"),
                    requests: requests_rx,
                    applied: applied_rx,
                    persisted,
                };
                let apply_sink: crate::runtime::ApplySink<SM> = Box::new(move |m| {
                    let _ = apply_tx.send(m);
                });
                let events: crate::runtime::ApplyEvents = Arc::new(move |e| {
                    let _ = applied_tx.send(e);
                });
                (
                    Some((inputs, apply_rx)),
                    apply_sink,
                    events,
                    crate::node::RequestTx::Own(requests_tx),
                    crate::clock::Clock::Own,
                )
            }
        };
        let applier = Applier {
            sm: state_machine,
            sessions,
            session_config: config.sessions,
            snapshots: snapshots.clone(),
            applied_index,
            applied_term,
            events: applied_tx,
            metrics: crate::metrics::ApplyMetrics::new(&config.metric_labels),
            skip_through: disk_durable.unwrap_or(0),
            view_writer: None,
            failed: false,
        };
        // Made at the first subscription: a group no one listens to
        // keeps no event ring (1,024 slots) in memory.
        let events: crate::node::Events = Arc::default();
        let (leader, _) = tokio::sync::watch::channel(None);
        let term = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stopped = Arc::new(AtomicBool::new(false));
        let (stop, _) = tokio::sync::watch::channel(None);
        let ready_loop = ReadyLoop {
            core,
            transport,
            apply_tx,
            events: events.clone(),
            leader: leader.clone(),
            term: term.clone(),
            snapshots,
            tick_interval: config.tick_interval,
            clock,
            last_tick_at: std::time::Instant::now(),
            stopped: stopped.clone(),
            stop: stop.clone(),
            sync,
            next_request_id: 1,
            proposals: HashMap::new(),
            proposal_spans: HashMap::new(),
            session_waiters: HashMap::new(),
            session_ids: HashMap::new(),
            register_nonces: 0,
            session_config: config.sessions,
            reads: HashMap::new(),
            metrics: crate::metrics::LoopMetrics::new(&config.metric_labels),
            conf_changes: HashMap::new(),
            transfers: HashMap::new(),
            snapshot_replies: HashMap::new(),
        };
        let mut tasks = Vec::new();
        match (own, shard) {
            (Some((inputs, apply_rx)), _) => {
                tasks.push(tokio::spawn(ready_loop.run(inputs)));
                tasks.push(tokio::spawn(apply_task(applier, apply_rx)));
            }
            (None, Some(w)) => w.start(ready_loop, applier),
            (None, None) => unreachable!("a node is either of its own or a host's group"),
        }
        if let Some(handle) = sync_thread {
            tasks.push(tokio::task::spawn_blocking(move || {
                let _ = handle.join();
            }));
        }
        let read_ticks = config.core.read_timeout_ticks as u32;
        Ok(Node {
            shared: Arc::new(Shared {
                id,
                requests: requests_tx,
                events,
                leader,
                term,
                tasks: Mutex::new(tasks),
                stopped,
                stop,
                // The core times reads out in ticks; this is only a hang guard.
                read_timeout: config.tick_interval * read_ticks * 2,
                membership_timeout: config.membership_timeout,
                sessions_supported: disk_durable.is_none(),
            }),
        })
    }
}

/// On an existing log, restores `sm` from the newest snapshot that either the
/// log or the snapshot store knows, and returns the index and term the node
/// starts applied at ([`adopt_snapshot`] settles a snapshot file newer than
/// the log's record).
fn restore_from_snapshot<S: LogStore, SM: StateMachine>(
    store: &S,
    group_id: u64,
    snapshots: &dyn SnapshotStore,
    sm: &mut SM,
    session_config: SessionConfig,
    disk_durable: Option<u64>,
) -> Result<(u64, u64, SessionTable), BuildError> {
    let stored = snapshots.latest()?.map(|s| s.metadata);
    let meta = adopt_snapshot(store, group_id, stored)?;
    if meta.index == 0 {
        return Ok((0, 0, SessionTable::new(session_config)));
    }
    let (_, mut reader) = snapshots.open(meta.index)?;
    let restore_error = |source| BuildError::Restore {
        index: meta.index,
        source,
    };
    if let Some(durable) = disk_durable.filter(|d| *d >= meta.index) {
        // The store holds the snapshot's state and more: only the session
        // table is read (the rest of the snapshot is left unread).
        let sessions = crate::session::read_section(session_config, &mut reader, |_| Ok(()))
            .map_err(restore_error)?;
        tracing::info!(
            snapshot_index = meta.index,
            durable_index = durable,
            "on-disk state machine is durable at or past the snapshot; not restoring it"
        );
        return Ok((meta.index, meta.term, sessions));
    }
    let sessions = crate::session::restore(sm, meta.index, session_config, &mut reader)
        .map_err(restore_error)?;
    tracing::info!(
        index = meta.index,
        term = meta.term,
        "restored the state machine from a snapshot"
    );
    Ok((meta.index, meta.term, sessions))
}
