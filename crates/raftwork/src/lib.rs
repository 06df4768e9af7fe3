//! raftwork: an embeddable Raft framework on raft-rs.
//!
//! raft-rs (the `raft` crate, TiKV's port of etcd Raft) is the consensus
//! algorithm; raftwork is everything around it: the ready loop, storage,
//! transport, and a node API. You write a [`StateMachine`]; raftwork
//! replicates it.
//!
//! # Quick start
//! ```
//! use raftwork::{Builder, Command, StateMachine};
//!
//! /// A replicated counter.
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
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let node = Builder::new(1, Counter::default()).in_memory().build()?;
//! node.wait_for_leader(std::time::Duration::from_secs(10)).await?;
//! let (_index, count) = node.propose(b"incr".to_vec()).await?;
//! assert_eq!(count, 1);
//! assert_eq!(node.read(|c: &Counter| c.0).await?, 1);
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Layers
//! * [`raftwork_core`]: the sans-IO core (events in, actions out);
//! * [`raftwork_storage`]: log and snapshot stores;
//! * [`raftwork_transport`]: the transport trait and in-process network;
//! * this crate: the tokio shell, [`Node`] and [`Builder`].
//!
//! See ARCHITECTURE.md at the repository root for the map.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod builder;
mod clock;
#[cfg(feature = "host")]
mod host;
mod logging;
pub mod metrics;
mod node;
mod runtime;
mod seed;
mod session;
mod shard;
mod state_machine;
mod typed;

pub use builder::{BuildError, Builder, Config, DataDir, TransportKind};
#[cfg(feature = "host")]
pub use host::{Host, HostConfig, PeerLiveness, GROUP_INFLIGHT_MSGS};
pub use logging::{raft_logger, TracingDrain};
pub use node::{
    AppliedAt, FatalReason, Node, NoteError, SnapshotError, Stopped, WaitError, NOTE_BYTES_MAX,
};
pub use seed::{force_new_cluster, seed_data_dir, Recovered, Seed};
pub use session::{Session, SessionId, SessionToken, SESSION_RETRY_TIMEOUT};
#[cfg(feature = "host")]
pub use shard::SHARD_INBOX_ENVELOPES;
pub use state_machine::{
    Command, DiskHooks, DiskStateMachine, OnDisk, ResponseBytes, SnapshotView, StateMachine,
};
pub use typed::{
    decode_command, encode_command, CommandError, Typed, TypedCommand, TypedProposeError,
    TypedReply, TypedStateMachine,
};

pub use raft::prelude::ConfState;
pub use raftwork_core::session::SessionConfig;
pub use raftwork_core::{
    ConfChangeError, ConfigError, CoreConfig, MembershipChange, NodeEvent, NodeId, ProposeError,
    ReadError, Role, Status, TransferError,
};
pub use raftwork_net::{
    GrpcTransport, HttpMode, HttpTransport, NetConfig, TcpTransport, TlsConfig,
};
pub use raftwork_storage::{
    FileSnapshotStore, LogStore, MemLogStore, MemSnapshotStore, SnapshotCompression, SnapshotMeta,
    SnapshotStore, StorageError, Wal, WalOptions, WalWrites,
};
pub use raftwork_transport::{
    Envelope, Inbound, Inbox, MemNetwork, MemTransport, Transport, TransportError,
};

/// Re-exports of the layer crates, for users who plug in their own parts.
pub use raftwork_core as core;
pub use raftwork_net as net;
pub use raftwork_storage as storage;
pub use raftwork_transport as transport;
