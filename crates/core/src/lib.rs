//! The sans-IO core of raftwork.
//!
//! [`Core`] wraps a [`raft::RawNode`] and is driven by events, in the style of
//! quinn-proto: the shell calls `handle_*` for each event (tick, incoming
//! message, proposal, read, persisted, applied) and then [`Core::poll`], which
//! returns a closed set of [`Action`]s to carry out (send, persist, apply,
//! reply). The core reads no clock, draws no randomness of its own, spawns
//! nothing and touches no socket, so a seeded simulator can drive it in
//! virtual time.
//!
//! ```text
//!   shell (tokio)                          core (this crate)
//!   ─────────────                          ─────────────────
//!   tick timer      ── handle_tick ──────▶ ┐
//!   transport inbox ── handle_message ───▶ │  raft::RawNode + bookkeeping
//!   Node::propose   ── handle_propose ───▶ │  (pending proposals, read batches,
//!   sync finished   ── handle_persisted ─▶ │   conf changes, transfers)
//!   apply finished  ── handle_applied ───▶ ┘
//!                   ◀── poll() → [Send, Persist, Apply, Read*, *Done, *Failed, Event]
//! ```
//!
//! # Ready-loop invariants
//! `poll` handles one raft `Ready` in the order raft-rs documents:
//! 1. messages a leader may send at once are emitted first ([`Action::Send`]),
//!    so followers write in parallel with the leader's own disk;
//! 2. a received snapshot, then committed entries, are emitted for applying
//!    ([`Action::RestoreSnapshot`], [`Action::Apply`]) — raft-rs only hands
//!    out committed entries that are already persisted locally;
//! 3. new entries and hard state are staged in the log store (readable at
//!    once) and [`Action::Persist`] asks the shell to make them durable;
//! 4. `advance_append_async` lets raft go on accepting proposals while the
//!    sync is in flight; messages that must wait for durability are held
//!    until [`Core::handle_persisted`] and only then emitted.
//!
//! The only I/O the core does is through the [`LogStore`] trait that raft-rs
//! itself reads through; staging is in-memory for every store (the durable
//! part, `sync`, is the shell's).

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod bootstrap;
mod config;
mod core;
mod error;
mod lease;
pub mod liveness;
pub mod session;
mod validate;

pub use crate::bootstrap::{adopt_snapshot, bootstrap};
pub use crate::config::{ConfigError, CoreConfig};
pub use crate::core::{
    entry_log_time_ms, is_command, Action, ApplyBatch, Core, MembershipChange, NodeEvent,
    RequestId, Role, Status, COMMAND_CONTEXT, STAMPED_COMMAND_TAG,
};
pub use crate::error::{ConfChangeError, FatalError, ProposeError, ReadError, TransferError};
pub use crate::validate::{Rejected, CONF_STATE_IDS_MAX, WIRE_VALUE_MAX};
pub use raftwork_storage::LogStore;

/// Node id within a Raft group (never 0).
pub type NodeId = u64;
