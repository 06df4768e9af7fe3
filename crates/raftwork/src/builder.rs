//! [`Builder`]: a node in a few lines, with defaults that work for one node.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftwork_core::{bootstrap, ConfigError, Core, CoreConfig, FatalError, NodeId};
use raftwork_storage::{LogStore, MemLogStore, StorageError};
use raftwork_transport::{Inbox, MemNetwork, Transport};
use tokio::sync::{broadcast, mpsc};

use crate::logging::raft_logger;
use crate::node::{Node, Shared};
use crate::runtime::{apply_task, spawn_sync_worker, ReadyLoop, SyncMode};
use crate::state_machine::StateMachine;

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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            core: CoreConfig::default(),
            tick_interval: Duration::from_millis(100),
            membership_timeout: Duration::from_secs(10),
            request_queue_capacity: 65_536,
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
}

/// Marker: no log store chosen yet. `build()` exists only once one is, so
/// forgetting to choose is a compile error, not a silent in-memory default.
pub struct NoStore;

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
/// node.wait_for_leader(std::time::Duration::from_secs(10)).await?;
/// let (index, count) = node.propose(b"+1".to_vec()).await?;
/// assert_eq!(count, 1);
/// # let _ = index; node.shutdown().await; Ok(()) }
/// ```
pub struct Builder<SM, S = NoStore> {
    config: Config,
    state_machine: SM,
    store: S,
    transport: Option<(Box<dyn Transport>, Inbox)>,
    initial_voters: Option<Vec<NodeId>>,
}

impl<SM: StateMachine> Builder<SM, NoStore> {
    /// A builder for node `id` running `state_machine`. By default the node
    /// bootstraps a single-voter cluster of itself on an empty log.
    pub fn new(id: NodeId, state_machine: SM) -> Self {
        let mut config = Config::default();
        config.core.id = id;
        Self {
            config,
            state_machine,
            store: NoStore,
            transport: None,
            initial_voters: Some(vec![id]),
        }
    }
}

impl<SM: StateMachine, S> Builder<SM, S> {
    /// Keeps the log in memory: nothing survives the process. An explicit
    /// choice, never a silent default.
    pub fn in_memory(self) -> Builder<SM, MemLogStore> {
        self.log_store(MemLogStore::new())
    }

    /// Uses `store` for the Raft log.
    pub fn log_store<S2: LogStore>(self, store: S2) -> Builder<SM, S2> {
        Builder {
            config: self.config,
            state_machine: self.state_machine,
            store,
            transport: self.transport,
            initial_voters: self.initial_voters,
        }
    }

    /// Uses `transport` to reach peers, and `inbox` for what it receives.
    /// Default: a private in-process network (enough for a single node).
    pub fn transport(mut self, transport: impl Transport, inbox: Inbox) -> Self {
        self.transport = Some((Box::new(transport), inbox));
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
            state_machine,
            store,
            transport,
            initial_voters,
        } = self;
        config.validate()?;
        let id = config.core.id;
        if let Some(voters) = &initial_voters {
            let mut sorted = voters.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if voters.is_empty() || sorted.len() != voters.len() || sorted[0] == 0 {
                return Err(BuildError::InitialVoters(format!("{voters:?}")));
            }
            if let Some(applied) = bootstrap(&store, voters)? {
                config.core.applied_index = applied;
            }
        }
        let (transport, inbox) = match transport {
            Some(t) => t,
            None => {
                let (t, inbox) = MemNetwork::new().join(id);
                (Box::new(t) as Box<dyn Transport>, inbox)
            }
        };
        let (sync, sync_thread) = if store.is_volatile() {
            (SyncMode::Inline, None)
        } else {
            let (mode, handle) = spawn_sync_worker(store.clone());
            (mode, Some(handle))
        };
        let core = Core::new(config.core.clone(), store, &raft_logger(id))?;
        let (requests_tx, requests_rx) = mpsc::channel(config.request_queue_capacity);
        let (apply_tx, apply_rx) = mpsc::unbounded_channel();
        let (applied_tx, applied_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(1024);
        let stopped = Arc::new(AtomicBool::new(false));
        let ready_loop = ReadyLoop {
            core,
            transport,
            inbox,
            requests: requests_rx,
            apply_tx,
            applied_rx,
            events: events.clone(),
            tick_interval: config.tick_interval,
            stopped: stopped.clone(),
            sync,
            next_request_id: 1,
            proposals: HashMap::new(),
            reads: HashMap::new(),
            conf_changes: HashMap::new(),
            transfers: HashMap::new(),
        };
        let mut tasks = vec![
            tokio::spawn(ready_loop.run()),
            tokio::spawn(apply_task(state_machine, apply_rx, applied_tx)),
        ];
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
                tasks: Mutex::new(tasks),
                stopped,
                // The core times reads out in ticks; this is only a hang guard.
                read_timeout: config.tick_interval * read_ticks * 2,
                membership_timeout: config.membership_timeout,
            }),
        })
    }
}
