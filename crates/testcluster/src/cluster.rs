//! [`TestCluster`]: real raftwork nodes on durable storage over one
//! fault-injecting in-process network.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use raftwork::{
    BuildError, Builder, ConfChangeError, ConfState, Config, MemNetwork, Node, NodeId, Role,
    StateMachine, Status, WalOptions,
};
use raftwork_check::{Operation, Violation};
use raftwork_transport::{Faults, InvalidFaults};

/// Environment variable that fixes the seed of [`Options::default`].
pub const SEED_ENV: &str = "RAFTWORK_TESTCLUSTER_SEED";

/// A fingerprint of a state machine's state: equal states must give equal
/// fingerprints.
pub type Fingerprint<SM> = Arc<dyn Fn(&SM) -> u64 + Send + Sync>;

type Configure = Arc<dyn Fn(&mut Config) + Send + Sync>;

/// The seed [`Options::default`] uses: `RAFTWORK_TESTCLUSTER_SEED` if set,
/// else one drawn from the clock.
///
/// # Panics
/// If the variable is set but is not a u64.
pub fn default_seed() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_ENV}={s:?} is not a u64")),
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            crate::rng::Rng::new(nanos ^ u64::from(std::process::id())).next_u64()
        }
    }
}

/// Settings of a [`TestCluster`], built with chained calls:
/// `Options::default().faults(..).snapshots(100, 20)`.
pub struct Options<SM> {
    pub(crate) tick: Duration,
    pub(crate) seed: u64,
    pub(crate) faults: Faults,
    pub(crate) snapshot_interval_entries: u64,
    pub(crate) snapshot_keep_entries: u64,
    pub(crate) wal_segment_bytes: u64,
    pub(crate) wait_timeout: Duration,
    pub(crate) fingerprint: Option<Fingerprint<SM>>,
    pub(crate) configure: Option<Configure>,
}

impl<SM> Clone for Options<SM> {
    fn clone(&self) -> Self {
        Self {
            tick: self.tick,
            seed: self.seed,
            faults: self.faults,
            snapshot_interval_entries: self.snapshot_interval_entries,
            snapshot_keep_entries: self.snapshot_keep_entries,
            wal_segment_bytes: self.wal_segment_bytes,
            wait_timeout: self.wait_timeout,
            fingerprint: self.fingerprint.clone(),
            configure: self.configure.clone(),
        }
    }
}

impl<SM> Default for Options<SM> {
    /// Tick 50 ms, seed from [`default_seed`], no faults, raftwork's
    /// snapshot defaults (every 10,000 entries keeping 5,000), 1 MiB WAL
    /// segments, 30 s hang guard on every wait, no fingerprint.
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(50),
            seed: default_seed(),
            faults: Faults::NONE,
            snapshot_interval_entries: 10_000,
            snapshot_keep_entries: 5_000,
            wal_segment_bytes: 1 << 20,
            wait_timeout: Duration::from_secs(30),
            fingerprint: None,
            configure: None,
        }
    }
}

impl<SM> Options<SM> {
    /// Length of a node tick (elections take 10–20 ticks, heartbeats 1).
    /// Default: 50 ms.
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// Seed of the network's fault choices and of workloads. Default:
    /// [`default_seed`].
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Faults the network injects from the start. Default: none.
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// Automatic snapshots every `interval_entries` applied entries (0: off),
    /// keeping `keep_entries` of log behind each.
    pub fn snapshots(mut self, interval_entries: u64, keep_entries: u64) -> Self {
        self.snapshot_interval_entries = interval_entries;
        self.snapshot_keep_entries = keep_entries;
        self
    }

    /// Size of WAL segments. Default: 1 MiB.
    pub fn wal_segment_bytes(mut self, bytes: u64) -> Self {
        self.wal_segment_bytes = bytes;
        self
    }

    /// How long a wait may take before it fails: a hang guard, never a
    /// performance assertion. Default: 30 s.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// The state fingerprint [`TestCluster::check_state_hashes`] compares.
    pub fn fingerprint(mut self, f: impl Fn(&SM) -> u64 + Send + Sync + 'static) -> Self {
        self.fingerprint = Some(Arc::new(f));
        self
    }

    /// Adjusts every node's raftwork [`Config`] after the cluster's settings
    /// (tick, snapshots) are applied.
    pub fn configure(mut self, f: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        self.configure = Some(Arc::new(f));
        self
    }

    /// The seed these options carry.
    pub fn get_seed(&self) -> u64 {
        self.seed
    }
}

/// Why a cluster operation failed. Its message names the seed; `Debug`
/// prints the same message, so `unwrap` and `?` in tests show it whole.
#[derive(thiserror::Error)]
#[error("{kind} (seed {seed}; {SEED_ENV}={seed} replays the fault choices)", SEED_ENV = SEED_ENV)]
pub struct ClusterError {
    /// The cluster's seed.
    pub seed: u64,
    /// What went wrong.
    pub kind: ErrorKind,
}

impl std::fmt::Debug for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// What went wrong in a [`ClusterError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A wait did not see its condition before the hang guard.
    #[error("timed out after {timeout:?} waiting for {what}; last seen: {detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The hang guard.
        timeout: Duration,
        /// The last state observed.
        detail: String,
    },
    /// The node is not running (killed, removed, or stopped on an error).
    #[error("node {0} is not running")]
    NotRunning(NodeId),
    /// The node stopped on its own while the cluster thought it running: a
    /// fatal error or a panic, whose message is in the output above.
    #[error("node {0} stopped on its own (a fatal error or a panic: see the output above)")]
    Stopped(NodeId),
    /// The node is running (restart of a running node).
    #[error("node {0} is already running")]
    Running(NodeId),
    /// The node was never started in this cluster, or was removed.
    #[error("node {0} is not a member of this test cluster")]
    UnknownNode(NodeId),
    /// The node id is already in use.
    #[error("node {0} already exists")]
    AlreadyExists(NodeId),
    /// An argument makes no sense (no nodes, an empty set).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A node could not start.
    #[error("starting node {id}: {source}")]
    Build {
        /// The node.
        id: NodeId,
        /// Why.
        #[source]
        source: BuildError,
    },
    /// The membership change was refused.
    #[error("membership change refused: {0}")]
    ConfChange(#[source] ConfChangeError),
    /// [`TestCluster::check_state_hashes`] needs [`Options::fingerprint`].
    #[error("no fingerprint function: set Options::fingerprint")]
    NoFingerprint,
    /// Nodes at the same applied index hold different states.
    #[error("states differ at applied index {index}: (node, fingerprint) {fingerprints:?}")]
    StateMismatch {
        /// The applied index all nodes were at.
        index: u64,
        /// Each node's fingerprint.
        fingerprints: Vec<(NodeId, u64)>,
    },
    /// The recorded client history is not linearizable.
    #[error("{0}")]
    NotLinearizable(Box<Violation>),
    /// The faults contradict themselves.
    #[error(transparent)]
    Faults(#[from] InvalidFaults),
    /// The cluster's temporary directory could not be made.
    #[error("temporary directory: {0}")]
    Io(#[from] std::io::Error),
}

/// What the clients of a cluster share with it.
pub(crate) struct Shared<SM: StateMachine> {
    pub(crate) seed: u64,
    pub(crate) tick: Duration,
    start: Instant,
    /// Running nodes.
    pub(crate) nodes: RwLock<BTreeMap<NodeId, Node<SM>>>,
    pub(crate) history: Mutex<Vec<Operation>>,
    pub(crate) next_client: AtomicU64,
}

impl<SM: StateMachine> Shared<SM> {
    /// Microseconds since the cluster started: the history's clock.
    pub(crate) fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub(crate) fn running(&self) -> Vec<NodeId> {
        self.nodes.read().unwrap().keys().copied().collect()
    }

    pub(crate) fn node(&self, id: NodeId) -> Option<Node<SM>> {
        self.nodes.read().unwrap().get(&id).cloned()
    }
}

/// A member of the cluster, running or not.
struct Member {
    /// Founding members bootstrap with the initial voters; the others join
    /// an existing cluster.
    founder: bool,
}

/// N real raftwork nodes in one process over one fault-injecting
/// [`MemNetwork`], each on the WAL and file snapshots in its own data dir
/// inside a temporary directory the cluster owns (removed when it is
/// dropped). See the crate docs for a tour.
pub struct TestCluster<SM: StateMachine> {
    options: Options<SM>,
    network: MemNetwork,
    dir: tempfile::TempDir,
    make_sm: Arc<dyn Fn(NodeId) -> SM + Send + Sync>,
    founders: Vec<NodeId>,
    members: BTreeMap<NodeId, Member>,
    nodes: BTreeMap<NodeId, Node<SM>>,
    pub(crate) shared: Arc<Shared<SM>>,
}

impl<SM: StateMachine> TestCluster<SM> {
    /// Starts nodes `1..=n` as the founding voters, each with the state
    /// machine `make_sm(id)` and its own data dir. Does not wait for a
    /// leader. Logs to the test output when `RUST_LOG` is set, and prints
    /// the seed on stderr (shown with a failing test's output).
    pub async fn start(
        n: u64,
        make_sm: impl Fn(NodeId) -> SM + Send + Sync + 'static,
        options: Options<SM>,
    ) -> Result<Self, ClusterError> {
        crate::init_logging();
        let seed = options.seed;
        let err = |kind| ClusterError { seed, kind };
        if n == 0 {
            return Err(err(ErrorKind::InvalidArgument(
                "a cluster needs at least one node".into(),
            )));
        }
        let dir = tempfile::Builder::new()
            .prefix("raftwork-testcluster-")
            .tempdir()
            .map_err(|e| err(e.into()))?;
        let network = MemNetwork::with_seed(seed);
        network
            .set_faults(options.faults)
            .map_err(|e| err(e.into()))?;
        eprintln!(
            "raftwork-testcluster: {n} nodes, seed {seed} ({SEED_ENV}={seed} replays the fault choices), data in {}",
            dir.path().display()
        );
        let founders: Vec<NodeId> = (1..=n).collect();
        let mut cluster = Self {
            shared: Arc::new(Shared {
                seed,
                tick: options.tick,
                start: Instant::now(),
                nodes: RwLock::new(BTreeMap::new()),
                history: Mutex::new(Vec::new()),
                next_client: AtomicU64::new(1),
            }),
            options,
            network,
            dir,
            make_sm: Arc::new(make_sm),
            founders: founders.clone(),
            members: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        for id in founders {
            cluster.members.insert(id, Member { founder: true });
            let node = cluster.build_node(id, true)?;
            cluster.insert_running(node);
        }
        Ok(cluster)
    }

    fn err(&self, kind: ErrorKind) -> ClusterError {
        ClusterError {
            seed: self.options.seed,
            kind,
        }
    }

    fn timeout(&self, what: impl Into<String>, detail: impl Into<String>) -> ClusterError {
        self.err(ErrorKind::Timeout {
            what: what.into(),
            timeout: self.options.wait_timeout,
            detail: detail.into(),
        })
    }

    fn build_node(&self, id: NodeId, founder: bool) -> Result<Node<SM>, ClusterError> {
        let (transport, inbox) = self.network.join(id);
        let o = &self.options;
        let (tick, interval, keep) = (o.tick, o.snapshot_interval_entries, o.snapshot_keep_entries);
        let configure = o.configure.clone();
        let builder = Builder::new(id, (self.make_sm)(id))
            .data_dir(self.data_dir(id))
            .wal_options(WalOptions {
                segment_size_bytes: o.wal_segment_bytes,
                ..Default::default()
            })
            .transport(transport, inbox)
            .configure(move |c| {
                c.tick_interval = tick;
                c.core.snapshot_interval_entries = interval;
                c.core.snapshot_keep_entries = keep;
                if let Some(f) = &configure {
                    f(c);
                }
            });
        let builder = if founder {
            builder.initial_voters(self.founders.iter().copied())
        } else {
            builder.join_existing()
        };
        builder
            .build()
            .map_err(|source| self.err(ErrorKind::Build { id, source }))
    }

    fn insert_running(&mut self, node: Node<SM>) {
        let id = node.id();
        self.shared.nodes.write().unwrap().insert(id, node.clone());
        self.nodes.insert(id, node);
    }

    fn remove_running(&mut self, id: NodeId) -> Option<Node<SM>> {
        self.shared.nodes.write().unwrap().remove(&id);
        self.nodes.remove(&id)
    }

    // ----- accessors -----

    /// The seed of this cluster's fault choices and workloads.
    pub fn seed(&self) -> u64 {
        self.options.seed
    }

    /// The network, for faults and cuts beyond this API.
    pub fn network(&self) -> &MemNetwork {
        &self.network
    }

    /// Node `id`'s data dir (its WAL in `wal/`, snapshots in `snapshots/`).
    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// Every member started and not removed, running or not.
    pub fn members(&self) -> Vec<NodeId> {
        self.members.keys().copied().collect()
    }

    /// Running members.
    pub fn running(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// The running node `id`.
    ///
    /// # Panics
    /// If it is not running (see [`TestCluster::try_node`]).
    pub fn node(&self, id: NodeId) -> &Node<SM> {
        self.nodes.get(&id).unwrap_or_else(|| {
            panic!(
                "node {id} is not running (seed {}; running: {:?})",
                self.seed(),
                self.running()
            )
        })
    }

    /// The running node `id`, if it runs.
    pub fn try_node(&self, id: NodeId) -> Option<&Node<SM>> {
        self.nodes.get(&id)
    }

    /// Microseconds since the cluster started, on the clock of the history.
    pub fn now_us(&self) -> u64 {
        self.shared.now_us()
    }

    // ----- the network -----

    /// Changes the injected faults from now on ([`Faults::NONE`] stops them).
    pub fn set_faults(&self, faults: Faults) -> Result<(), ClusterError> {
        self.network
            .set_faults(faults)
            .map_err(|e| self.err(e.into()))
    }

    /// Splits the members into `groups` that reach only their own group;
    /// a member in no group is cut off from everyone. Replaces earlier cuts.
    /// Applies to the members known now (and ids named in `groups`).
    pub fn partition(&self, groups: &[&[NodeId]]) {
        self.network.heal();
        let mut all = self.members();
        all.extend(groups.iter().flat_map(|g| g.iter().copied()));
        all.sort_unstable();
        all.dedup();
        let group_of = |id: NodeId| groups.iter().position(|g| g.contains(&id));
        for &a in &all {
            for &b in &all {
                if a != b && (group_of(a).is_none() || group_of(a) != group_of(b)) {
                    self.network.set_link(a, b, false);
                }
            }
        }
    }

    /// Cuts every link to and from `id` (running or not), keeping other cuts.
    pub fn isolate(&self, id: NodeId) {
        for other in self.members() {
            if other != id {
                self.network.set_link(id, other, false);
                self.network.set_link(other, id, false);
            }
        }
    }

    /// Cuts the one-way link `from → to`.
    pub fn disconnect(&self, from: NodeId, to: NodeId) {
        self.network.set_link(from, to, false);
    }

    /// Restores the one-way link `from → to`.
    pub fn connect(&self, from: NodeId, to: NodeId) {
        self.network.set_link(from, to, true);
    }

    /// Restores every link. Injected faults stay (see
    /// [`TestCluster::set_faults`]).
    pub fn heal(&self) {
        self.network.heal();
    }

    // ----- node life -----

    /// Stops node `id`. The node API has no abrupt kill, so this is
    /// `Node::shutdown`: pending requests fail, tasks end, and the WAL is
    /// closed. No acknowledged write depends on the shutdown, though: raft
    /// only sends what must follow durability once the WAL has fsynced it.
    /// (`raftwork`'s `crash_loop` test kills real processes.)
    pub async fn kill(&mut self, id: NodeId) -> Result<(), ClusterError> {
        let node = self
            .remove_running(id)
            .ok_or_else(|| self.err(ErrorKind::NotRunning(id)))?;
        node.shutdown().await;
        Ok(())
    }

    /// Starts the stopped member `id` again from its data dir.
    pub async fn restart(&mut self, id: NodeId) -> Result<(), ClusterError> {
        let founder = match self.members.get(&id) {
            None => return Err(self.err(ErrorKind::UnknownNode(id))),
            Some(_) if self.nodes.contains_key(&id) => return Err(self.err(ErrorKind::Running(id))),
            Some(m) => m.founder,
        };
        let node = self.build_node(id, founder)?;
        self.insert_running(node);
        Ok(())
    }

    /// Starts a new node `id` on an empty data dir and adds it through the
    /// leader, as a learner or a voter. If the change fails the node keeps
    /// running (kill it if you like).
    pub async fn add_node(&mut self, id: NodeId, learner: bool) -> Result<ConfState, ClusterError> {
        if self.members.contains_key(&id) {
            return Err(self.err(ErrorKind::AlreadyExists(id)));
        }
        // An id removed earlier comes back wiped, as an operator re-adds one.
        let dir = self.data_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| self.err(ErrorKind::Io(e)))?;
        }
        let node = self.build_node(id, false)?;
        self.members.insert(id, Member { founder: false });
        self.insert_running(node);
        let context = format!("node-{id}").into_bytes();
        if learner {
            self.change(
                format!("adding learner {id}"),
                |n| {
                    let c = context.clone();
                    async move { n.add_learner(id, c).await }
                },
                |st| st.learners.contains(&id),
            )
            .await
        } else {
            self.change(
                format!("adding voter {id}"),
                |n| {
                    let c = context.clone();
                    async move { n.add_voter(id, c).await }
                },
                |st| st.voters.contains(&id),
            )
            .await
        }
    }

    /// Promotes learner `id` to voter through the leader, retrying while it
    /// has not caught up.
    pub async fn promote(&self, id: NodeId) -> Result<ConfState, ClusterError> {
        self.change(
            format!("promoting learner {id}"),
            |n| async move { n.promote_learner(id).await },
            |st| st.voters.contains(&id),
        )
        .await
    }

    /// Removes member `id` through the leader, then stops it if it runs and
    /// forgets it (its data dir stays until the cluster is dropped).
    pub async fn remove_node(&mut self, id: NodeId) -> Result<ConfState, ClusterError> {
        if !self.members.contains_key(&id) {
            return Err(self.err(ErrorKind::UnknownNode(id)));
        }
        let cs = self
            .change(
                format!("removing {id}"),
                |n| async move { n.remove_node(id).await },
                |st| !st.voters.contains(&id) && !st.learners.contains(&id),
            )
            .await?;
        if let Some(node) = self.remove_running(id) {
            node.shutdown().await;
        }
        self.members.remove(&id);
        Ok(cs)
    }

    /// Runs a membership change on the current leader, retrying what may
    /// succeed later (no leader, another change in progress, a learner not
    /// caught up, a dropped change). A change that was dropped in flight may
    /// have committed: a later "already done" refusal is then checked
    /// against the leader's membership with `done`.
    async fn change<F, Fut>(
        &self,
        what: String,
        attempt: F,
        done: impl Fn(&Status) -> bool,
    ) -> Result<ConfState, ClusterError>
    where
        F: Fn(Node<SM>) -> Fut,
        Fut: Future<Output = Result<ConfState, ConfChangeError>>,
    {
        let deadline = Instant::now() + self.options.wait_timeout;
        let mut maybe_applied = false;
        let mut last = String::from("no leader");
        loop {
            if let Some(leader) = self.leader().await {
                let node = self.nodes[&leader].clone();
                match attempt(node.clone()).await {
                    Ok(cs) => return Ok(cs),
                    Err(ConfChangeError::Dropped { in_flight }) => {
                        maybe_applied |= in_flight;
                        last = format!("leader {leader}: dropped (in flight: {in_flight})");
                    }
                    Err(
                        e @ (ConfChangeError::NotLeader { .. }
                        | ConfChangeError::InProgress
                        | ConfChangeError::LearnerNotCaughtUp { .. }
                        | ConfChangeError::Removed
                        | ConfChangeError::Shutdown),
                    ) => last = format!("leader {leader}: {e}"),
                    Err(e) => {
                        if maybe_applied {
                            if let Some(st) = node.status().await.filter(|st| done(st)) {
                                return Ok(ConfState {
                                    voters: st.voters,
                                    learners: st.learners,
                                    ..Default::default()
                                });
                            }
                        }
                        return Err(self.err(ErrorKind::ConfChange(e)));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(what, last));
            }
            tokio::time::sleep(self.options.tick).await;
        }
    }

    /// Stops every running node (waits for their tasks). Call it at the end
    /// of a test: dropping a cluster with running nodes removes their data
    /// dirs under them.
    pub async fn shutdown(&mut self) {
        let ids = self.running();
        for id in ids {
            if let Some(node) = self.remove_running(id) {
                node.shutdown().await;
            }
        }
    }

    // ----- observing -----

    /// The status of each node in `among`, in order.
    pub async fn statuses(&self, among: &[NodeId]) -> Result<Vec<Status>, ClusterError> {
        let mut out = Vec::with_capacity(among.len());
        for &id in among {
            let node = self
                .nodes
                .get(&id)
                .ok_or_else(|| self.err(ErrorKind::NotRunning(id)))?;
            let st = node
                .status()
                .await
                .ok_or_else(|| self.err(ErrorKind::Stopped(id)))?;
            out.push(st);
        }
        Ok(out)
    }

    /// The running node that is leader in the highest term, if any.
    pub async fn leader(&self) -> Option<NodeId> {
        let mut best: Option<(u64, NodeId)> = None;
        for (&id, node) in &self.nodes {
            if let Some(st) = node.status().await {
                let higher = match best {
                    Some((term, _)) => st.term > term,
                    None => true,
                };
                if st.role == Role::Leader && higher {
                    best = Some((st.term, id));
                }
            }
        }
        best.map(|(_, id)| id)
    }

    fn check_among(&self, among: &[NodeId]) -> Result<(), ClusterError> {
        if among.is_empty() {
            return Err(self.err(ErrorKind::InvalidArgument("an empty set of nodes".into())));
        }
        Ok(())
    }

    /// Waits until every node in `among` (all running) names the same
    /// leader, that leader is among them and says it leads; returns it.
    pub async fn wait_for_leader(&self, among: &[NodeId]) -> Result<NodeId, ClusterError> {
        self.check_among(among)?;
        let deadline = Instant::now() + self.options.wait_timeout;
        loop {
            let sts = self.statuses(among).await?;
            if let Some(l) = sts[0].leader {
                let agreed = sts.iter().all(|s| s.leader == Some(l));
                let leads = sts.iter().any(|s| s.id == l && s.role == Role::Leader);
                if agreed && leads {
                    return Ok(l);
                }
            }
            if Instant::now() >= deadline {
                return Err(
                    self.timeout(format!("an agreed leader among {among:?}"), describe(&sts))
                );
            }
            tokio::time::sleep(self.options.tick).await;
        }
    }

    /// Waits until no running node in `among` leads or knows a leader
    /// (stopped nodes count as knowing none).
    pub async fn wait_for_no_leader(&self, among: &[NodeId]) -> Result<(), ClusterError> {
        self.check_among(among)?;
        let deadline = Instant::now() + self.options.wait_timeout;
        loop {
            let running: Vec<NodeId> = among
                .iter()
                .copied()
                .filter(|id| self.nodes.contains_key(id))
                .collect();
            let sts = self.statuses(&running).await?;
            if sts
                .iter()
                .all(|s| s.leader.is_none() && s.role != Role::Leader)
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(format!("no leader among {among:?}"), describe(&sts)));
            }
            tokio::time::sleep(self.options.tick).await;
        }
    }

    /// Waits until every node in `among` (all running) applied `index`.
    pub async fn wait_applied(&self, index: u64, among: &[NodeId]) -> Result<(), ClusterError> {
        self.check_among(among)?;
        let deadline = Instant::now() + self.options.wait_timeout;
        loop {
            let sts = self.statuses(among).await?;
            if sts.iter().all(|s| s.applied_index >= index) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(
                    format!("applied index {index} on {among:?}"),
                    describe(&sts),
                ));
            }
            tokio::time::sleep(self.options.tick).await;
        }
    }

    /// Compares the state fingerprints ([`Options::fingerprint`]) of the
    /// nodes in `among` (all running) at one applied index, and returns the
    /// common fingerprint.
    ///
    /// It waits until every node has applied and committed the same index
    /// (the highest any of them applied), reads each fingerprint, and checks
    /// that no commit index moved meanwhile, so all were taken at that
    /// index. Stop writing first: under a steady stream of writes that
    /// moment may never come, and the wait times out.
    pub async fn check_state_hashes(&self, among: &[NodeId]) -> Result<u64, ClusterError> {
        self.check_among(among)?;
        let f = self
            .options
            .fingerprint
            .clone()
            .ok_or_else(|| self.err(ErrorKind::NoFingerprint))?;
        let deadline = Instant::now() + self.options.wait_timeout;
        let settled = |sts: &[Status]| {
            let index = sts[0].applied_index;
            sts.iter()
                .all(|s| s.applied_index == index && s.commit_index == index)
                .then_some(index)
        };
        loop {
            let before = self.statuses(among).await?;
            if let Some(index) = settled(&before) {
                let mut fingerprints = Vec::with_capacity(among.len());
                for &id in among {
                    let node = self
                        .nodes
                        .get(&id)
                        .ok_or_else(|| self.err(ErrorKind::NotRunning(id)))?;
                    let f = f.clone();
                    match node.read_stale(move |sm| f(sm)).await {
                        Ok(fp) => fingerprints.push((id, fp)),
                        Err(_) => return Err(self.err(ErrorKind::Stopped(id))),
                    }
                }
                let after = self.statuses(among).await?;
                if settled(&after) == Some(index) {
                    let first = fingerprints[0].1;
                    if fingerprints.iter().all(|(_, fp)| *fp == first) {
                        return Ok(first);
                    }
                    return Err(self.err(ErrorKind::StateMismatch {
                        index,
                        fingerprints,
                    }));
                }
            }
            if Instant::now() >= deadline {
                return Err(self.timeout(
                    format!("{among:?} to settle at one applied and committed index"),
                    describe(&before),
                ));
            }
            tokio::time::sleep(self.options.tick).await;
        }
    }

    // ----- histories -----

    /// Every operation recorded by this cluster's history clients so far.
    /// Operations still running are not in it yet (stop workloads first).
    pub fn history(&self) -> Vec<Operation> {
        self.shared.history.lock().unwrap().clone()
    }

    /// Checks the recorded history for linearizability
    /// ([`raftwork_check::check`]); returns the number of operations.
    pub fn check_history(&self) -> Result<usize, ClusterError> {
        let history = self.history();
        raftwork_check::check(&history)
            .map(|_| history.len())
            .map_err(|v| self.err(ErrorKind::NotLinearizable(Box::new(v))))
    }
}

/// One line per node for timeout messages.
fn describe(sts: &[Status]) -> String {
    sts.iter()
        .map(|s| {
            format!(
                "[node {} {:?} term {} leader {:?} commit {} applied {} last {}]",
                s.id, s.role, s.term, s.leader, s.commit_index, s.applied_index, s.last_index
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}
