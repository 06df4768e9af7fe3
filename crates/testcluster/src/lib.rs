//! A fault-injecting test cluster for raftwork state machines.
//!
//! [`TestCluster`] runs N real raftwork nodes (the production [`Node`],
//! ready loop, WAL and file snapshots) in one process, over one in-process
//! [`MemNetwork`](raftwork::MemNetwork) that can partition nodes, cut links
//! one way, and drop, duplicate and delay (so reorder) whole messages. Each
//! node keeps its data dir in a temporary directory the cluster owns, so a
//! killed node restarts from its own WAL and snapshots. On top of that:
//! membership changes through the leader, waits for a leader, for no leader
//! and for an applied index, a state comparison across nodes at one applied
//! index, and history clients whose operations are checked for
//! linearizability with [`raftwork_check`].
//!
//! It is the counterpart of the deterministic simulator (`raftwork-sim`):
//! the simulator replays a seed exactly but simulates the shell; this
//! cluster runs the real shell and storage, but on real threads and clocks.
//! The seed fixes the network's fault *choices* (the n-th message sent gets
//! the same fate) and the workload's random operations; thread scheduling,
//! and so which message is the n-th, still varies from run to run. Every
//! error names the seed, and `RAFTWORK_TESTCLUSTER_SEED=<seed>` sets it.
//!
//! # Using it for your own state machine
//! 1. Write a factory `Fn(NodeId) -> SM` that makes a fresh state machine
//!    (restarts restore it from the node's snapshot and log).
//! 2. Give [`Options::fingerprint`] a function `Fn(&SM) -> u64` that is
//!    equal for equal states, so [`TestCluster::check_state_hashes`] can
//!    compare nodes.
//! 3. Start the cluster, break things, and assert. Reach a node with
//!    [`TestCluster::node`] for anything the cluster does not wrap.
//!
//! ```
//! use raftwork::{Command, StateMachine};
//! use raftwork_testcluster::{Options, TestCluster};
//!
//! #[derive(Default)]
//! struct Counter(u64);
//!
//! impl StateMachine for Counter {
//!     type Response = u64;
//!     fn apply(&mut self, commands: &[Command<'_>]) -> Vec<u64> {
//!         commands.iter().map(|_| { self.0 += 1; self.0 }).collect()
//!     }
//!     fn snapshot(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
//!         w.write_all(&self.0.to_le_bytes())
//!     }
//!     fn restore(&mut self, r: &mut dyn std::io::Read) -> std::io::Result<()> {
//!         let mut b = [0u8; 8];
//!         r.read_exact(&mut b)?;
//!         self.0 = u64::from_le_bytes(b);
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let options = Options::default().fingerprint(|c: &Counter| c.0);
//! let mut cluster = TestCluster::start(3, |_id| Counter::default(), options).await?;
//! let leader = cluster.wait_for_leader(&[1, 2, 3]).await?;
//! cluster.node(leader).propose(b"+1".to_vec()).await?;
//!
//! // The leader dies; the other two elect a new one and go on.
//! cluster.kill(leader).await?;
//! let rest: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
//! let new = cluster.wait_for_leader(&rest).await?;
//! cluster.node(new).propose(b"+1".to_vec()).await?;
//!
//! // The old leader comes back from its WAL and catches up.
//! cluster.restart(leader).await?;
//! assert_eq!(cluster.check_state_hashes(&[1, 2, 3]).await?, 2);
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Checked histories
//! For histories, the crate brings its own state machine, [`KvSm`] (u64
//! keys and values; write and compare-and-set commands; reads through
//! `Node::read`). [`TestCluster::client`] gives a [`HistoryClient`] that
//! records every operation with its call and return time;
//! [`TestCluster::spawn_workload`] runs several of them at random; and
//! [`TestCluster::check_history`] checks all of it.
//!
//! ```
//! use raftwork_testcluster::{Faults, KvSm, Options, TestCluster, WorkloadOptions};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let options = Options::default()
//!     .fingerprint(KvSm::fingerprint)
//!     .faults(Faults { drop_per_mille: 20, duplicate_per_mille: 20, delay_ms_min: 0, delay_ms_max: 5 });
//! let mut cluster = TestCluster::start(3, |_| KvSm::default(), options).await?;
//! let leader = cluster.wait_for_leader(&[1, 2, 3]).await?;
//! let workload = cluster.spawn_workload(WorkloadOptions::default());
//! tokio::time::sleep(std::time::Duration::from_millis(300)).await;
//! cluster.isolate(leader);
//! tokio::time::sleep(std::time::Duration::from_millis(300)).await;
//! cluster.heal();
//! workload.stop().await;
//! cluster.check_history()?;
//! cluster.check_state_hashes(&[1, 2, 3]).await?;
//! cluster.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Limits
//! * [`TestCluster::kill`] is a graceful `Node::shutdown` (the node API has
//!   no abrupt stop); see `raftwork`'s `crash_loop` test for real process
//!   kills, and the simulator for lost unsynced writes.
//! * Waits poll every tick and fail after [`Options::wait_timeout`]: a hang
//!   guard, never a performance assertion.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod client;
mod cluster;
mod kv;
mod rng;

pub use client::{ClientError, HistoryClient, Workload, WorkloadOptions, WorkloadStats};
pub use cluster::{
    default_seed, ClusterError, ErrorKind, Fingerprint, Options, TestCluster, SEED_ENV,
};
pub use kv::{KvCommand, KvResponse, KvSm};

pub use raftwork_check::{Input, Operation, Output, Violation};
pub use raftwork_transport::Faults;

/// Sends `tracing` output (raft-rs's and raftwork's logs) to the test
/// output when `RUST_LOG` is set. [`TestCluster::start`] calls it.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

#[doc(no_inline)]
pub use raftwork::{Node, NodeId};
