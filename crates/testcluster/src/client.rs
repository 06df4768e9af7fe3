//! [`HistoryClient`]: reads, writes and compare-and-sets against a
//! [`KvSm`] cluster, each recorded as a [`raftwork_check::Operation`]; and
//! [`Workload`], a set of them issuing random operations until stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use raftwork::{Node, NodeId, ProposeError, ReadError};
use raftwork_check::{Input, Operation, Output};
use tokio::task::JoinHandle;

use crate::cluster::{Shared, TestCluster};
use crate::kv::{KvCommand, KvResponse, KvSm};
use crate::rng::Rng;

/// Why a client operation has no definite answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The write certainly did not take effect (refused before entering the
    /// log); it is left out of the history.
    #[error("not applied: {0}")]
    NotApplied(ProposeError),
    /// The write may or may not take effect; recorded as
    /// [`Output::Unknown`].
    #[error("outcome unknown: {0}")]
    Unknown(ProposeError),
    /// The read failed; it is left out of the history.
    #[error("read failed: {0}")]
    Read(ReadError),
    /// No node of the cluster is running.
    #[error("no node is running")]
    NoNode,
}

/// A client of a [`KvSm`] cluster that records what it sees.
///
/// Every operation is timed on the cluster's clock (microseconds since it
/// started) from just before the request to just after the answer, and
/// recorded in the cluster's history (see [`TestCluster::check_history`]):
/// * an answered write, compare-and-set or read with its answer;
/// * a write or compare-and-set that failed without certainty
///   (`NotLeader { in_flight: true }`, `Timeout`, `Shutdown`, or a dropped
///   future) as [`Output::Unknown`]: it may take effect at any later time,
///   or never;
/// * a write that certainly did not apply (`NotLeader { in_flight: false }`,
///   `Dropped`, `TooLarge`, `Removed`) and a failed read are not recorded.
///
/// The client talks to one node, its target: writes that meet a follower
/// move to the leader it names; a failure moves it to the next running node.
pub struct HistoryClient {
    id: u64,
    target: NodeId,
    shared: Arc<Shared<KvSm>>,
}

/// An operation in progress; recorded as unknown (writes) or forgotten
/// (reads) if dropped unfinished.
struct Pending {
    shared: Arc<Shared<KvSm>>,
    op: Option<Operation>,
}

impl Pending {
    fn start(shared: &Arc<Shared<KvSm>>, client: u64, key: u64, input: Input) -> Self {
        let call_time = shared.now_us();
        Self {
            shared: shared.clone(),
            op: Some(Operation {
                client,
                key,
                input,
                output: Output::Unknown,
                call_time,
                return_time: call_time,
            }),
        }
    }

    fn finish(mut self, output: Output) {
        if let Some(mut op) = self.op.take() {
            op.output = output;
            op.return_time = self.shared.now_us();
            self.shared.history.lock().unwrap().push(op);
        }
    }

    fn discard(mut self) {
        self.op = None;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            if op.input != Input::Read {
                self.shared.history.lock().unwrap().push(op);
            }
        }
    }
}

impl TestCluster<KvSm> {
    /// A new history client whose first target is node `node`.
    pub fn client(&self, node: NodeId) -> HistoryClient {
        HistoryClient {
            id: self.shared.next_client.fetch_add(1, Ordering::Relaxed),
            target: node,
            shared: self.shared.clone(),
        }
    }

    /// Starts `options.clients` history clients issuing random operations
    /// (drawn from the cluster's seed) until [`Workload::stop`].
    pub fn spawn_workload(&self, options: WorkloadOptions) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let running = self.running();
        let tasks = (0..options.clients)
            .map(|i| {
                let home = running.get(i % running.len().max(1)).copied().unwrap_or(1);
                let client = self.client(home);
                let stop = stop.clone();
                let options = options.clone();
                tokio::spawn(run_client(client, options, stop))
            })
            .collect();
        Workload { stop, tasks }
    }
}

impl HistoryClient {
    /// This client's id in the history.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The node this client talks to now.
    pub fn target(&self) -> NodeId {
        self.target
    }

    /// Makes the client talk to `node`.
    pub fn set_target(&mut self, node: NodeId) {
        self.target = node;
    }

    /// Moves the target to the next running node after it (wrapping).
    fn rotate(&mut self) {
        let running = self.shared.running();
        if let Some(next) = running
            .iter()
            .copied()
            .find(|&id| id > self.target)
            .or_else(|| running.first().copied())
        {
            self.target = next;
        }
    }

    /// The target node, moving the target along if it is not running.
    fn node(&mut self) -> Option<Node<KvSm>> {
        if let Some(n) = self.shared.node(self.target) {
            return Some(n);
        }
        self.rotate();
        self.shared.node(self.target)
    }

    async fn propose(
        &mut self,
        key: u64,
        input: Input,
        command: KvCommand,
    ) -> Result<KvResponse, ClientError> {
        let node = self.node().ok_or(ClientError::NoNode)?;
        let pending = Pending::start(&self.shared, self.id, key, input);
        let result = node.propose(command.encode()).await;
        match result {
            Ok((_, response)) => {
                let output = match response {
                    KvResponse::Written => Output::Written,
                    KvResponse::Cas(ok) => Output::Cas(ok),
                    KvResponse::Invalid => unreachable!("the client only sends valid commands"),
                };
                pending.finish(output);
                Ok(response)
            }
            Err(e) => {
                match &e {
                    ProposeError::NotLeader {
                        leader_hint: Some(l),
                        ..
                    } if self.shared.node(*l).is_some() => self.target = *l,
                    ProposeError::Dropped => {}
                    _ => self.rotate(),
                }
                let certain = matches!(
                    e,
                    ProposeError::NotLeader {
                        in_flight: false,
                        ..
                    } | ProposeError::Dropped
                        | ProposeError::TooLarge { .. }
                        | ProposeError::Removed
                );
                if certain {
                    pending.discard();
                    Err(ClientError::NotApplied(e))
                } else {
                    pending.finish(Output::Unknown);
                    Err(ClientError::Unknown(e))
                }
            }
        }
    }

    /// Sets `key` to `value`.
    pub async fn write(&mut self, key: u64, value: u64) -> Result<(), ClientError> {
        self.propose(key, Input::Write(value), KvCommand::Write { key, value })
            .await
            .map(|_| ())
    }

    /// Sets `key` to `new` if it holds `expected`; `Ok(true)` if it wrote.
    pub async fn cas(
        &mut self,
        key: u64,
        expected: Option<u64>,
        new: u64,
    ) -> Result<bool, ClientError> {
        let input = Input::Cas { expected, new };
        match self
            .propose(key, input, KvCommand::Cas { key, expected, new })
            .await?
        {
            KvResponse::Cas(ok) => Ok(ok),
            other => unreachable!("a compare-and-set answered {other:?}"),
        }
    }

    /// Reads `key` (linearizably) on the target node.
    pub async fn read(&mut self, key: u64) -> Result<Option<u64>, ClientError> {
        let node = self.node().ok_or(ClientError::NoNode)?;
        let result = self.read_from(node, key).await;
        if result.is_err() {
            self.rotate();
        }
        result
    }

    /// Reads `key` (linearizably) on node `node`, leaving the target as is.
    pub async fn read_on(&mut self, node: NodeId, key: u64) -> Result<Option<u64>, ClientError> {
        let node = self.shared.node(node).ok_or(ClientError::NoNode)?;
        self.read_from(node, key).await
    }

    /// Reads `key` from node `node`'s local state with no ReadIndex round
    /// (`Node::read_stale`), and records it like a linearizable read. It is
    /// not one: this is for negative controls that show the checker catches
    /// stale reads.
    pub async fn read_stale_on(
        &mut self,
        node: NodeId,
        key: u64,
    ) -> Result<Option<u64>, ClientError> {
        let node = self.shared.node(node).ok_or(ClientError::NoNode)?;
        let pending = Pending::start(&self.shared, self.id, key, Input::Read);
        match node.read_stale(move |sm: &KvSm| sm.get(key)).await {
            Ok(value) => {
                pending.finish(Output::Read(value));
                Ok(value)
            }
            Err(e) => {
                pending.discard();
                Err(ClientError::Read(e))
            }
        }
    }

    async fn read_from(&mut self, node: Node<KvSm>, key: u64) -> Result<Option<u64>, ClientError> {
        let pending = Pending::start(&self.shared, self.id, key, Input::Read);
        match node.read(move |sm: &KvSm| sm.get(key)).await {
            Ok(value) => {
                pending.finish(Output::Read(value));
                Ok(value)
            }
            Err(e) => {
                pending.discard();
                Err(ClientError::Read(e))
            }
        }
    }
}

/// What a [`Workload`] does.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// Concurrent clients; client `i` starts on the `i`-th running node.
    /// Default: 4.
    pub clients: usize,
    /// Keys `0..keys` are used. Default: 4.
    pub keys: u64,
    /// Share of reads, in thousandths; half of them go to a random running
    /// node instead of the target (follower reads). Default: 400.
    pub read_per_mille: u64,
    /// Share of compare-and-sets (expecting the last value the client saw),
    /// in thousandths; the rest are writes. Default: 200.
    pub cas_per_mille: u64,
    /// Longest pause between a client's operations, in ms (drawn uniformly;
    /// a failure pauses one tick). Keeps histories small enough to check.
    /// Default: 10.
    pub pause_ms_max: u64,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        Self {
            clients: 4,
            keys: 4,
            read_per_mille: 400,
            cas_per_mille: 200,
            pause_ms_max: 10,
        }
    }
}

/// Counts of what a [`Workload`]'s clients saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkloadStats {
    /// Reads answered.
    pub reads: u64,
    /// Reads failed (not recorded).
    pub reads_failed: u64,
    /// Writes acknowledged.
    pub writes: u64,
    /// Compare-and-sets answered (either way).
    pub cas: u64,
    /// Writes and compare-and-sets with unknown outcome.
    pub unknown: u64,
    /// Writes and compare-and-sets certainly not applied (not recorded).
    pub not_applied: u64,
}

impl WorkloadStats {
    fn add(&mut self, o: &WorkloadStats) {
        self.reads += o.reads;
        self.reads_failed += o.reads_failed;
        self.writes += o.writes;
        self.cas += o.cas;
        self.unknown += o.unknown;
        self.not_applied += o.not_applied;
    }

    /// Writes and compare-and-sets acknowledged.
    pub fn acknowledged_writes(&self) -> u64 {
        self.writes + self.cas
    }
}

/// History clients running random operations; see
/// [`TestCluster::spawn_workload`].
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<WorkloadStats>>,
}

impl Workload {
    /// Asks every client to stop, waits until each has finished its current
    /// operation (bounded by the nodes' own timeouts), and returns the
    /// counts. Only then is the history complete.
    pub async fn stop(mut self) -> WorkloadStats {
        self.stop.store(true, Ordering::Release);
        let mut total = WorkloadStats::default();
        for t in std::mem::take(&mut self.tasks) {
            if let Ok(stats) = t.await {
                total.add(&stats);
            }
        }
        total
    }
}

impl Drop for Workload {
    /// A dropped workload's clients stop after their current operation
    /// (without [`Workload::stop`], nobody waits for them).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

async fn run_client(
    mut client: HistoryClient,
    options: WorkloadOptions,
    stop: Arc<AtomicBool>,
) -> WorkloadStats {
    let mut rng = Rng::new(client.shared.seed ^ client.id.wrapping_mul(0xd1b5_4a32_d192_ed03));
    let mut stats = WorkloadStats::default();
    let mut seen: HashMap<u64, Option<u64>> = HashMap::new();
    let mut counter = 0u64;
    let tick = client.shared.tick;
    while !stop.load(Ordering::Acquire) {
        let key = rng.below(options.keys.max(1));
        let roll = rng.below(1000);
        counter += 1;
        let unique = (client.id << 32) | counter;
        let ok = if roll < options.read_per_mille {
            let result = if rng.below(2) == 0 {
                client.read(key).await
            } else {
                let running = client.shared.running();
                match running.get(rng.below(running.len() as u64) as usize) {
                    Some(&pick) => client.read_on(pick, key).await,
                    None => Err(ClientError::NoNode),
                }
            };
            match result {
                Ok(v) => {
                    stats.reads += 1;
                    seen.insert(key, v);
                    true
                }
                Err(_) => {
                    stats.reads_failed += 1;
                    false
                }
            }
        } else {
            let result = if roll < options.read_per_mille + options.cas_per_mille {
                let expected = seen.get(&key).copied().flatten();
                let result = client.cas(key, expected, unique).await;
                stats.cas += u64::from(result.is_ok());
                result
            } else {
                client.write(key, unique).await.map(|()| {
                    stats.writes += 1;
                    true
                })
            };
            match result {
                Ok(true) => {
                    seen.insert(key, Some(unique));
                    true
                }
                Ok(false) => true,
                Err(ClientError::Unknown(_)) => {
                    stats.unknown += 1;
                    seen.remove(&key);
                    false
                }
                Err(_) => {
                    stats.not_applied += 1;
                    false
                }
            }
        };
        let pause = if ok {
            Duration::from_millis(rng.below(options.pause_ms_max + 1))
        } else {
            tick
        };
        tokio::time::sleep(pause).await;
    }
    stats
}
