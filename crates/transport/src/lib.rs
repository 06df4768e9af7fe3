//! Transport layer of raftwork: how Raft messages move between nodes.
//!
//! The unit of transfer is an [`Envelope`]: every message one ready produced
//! for one peer, tagged with the Raft group id, so that many groups can later
//! share one connection. A transport moves envelopes and reports what it could
//! not deliver as [`Inbound::Unreachable`]; it never blocks the ready loop.
//!
//! Invariants every transport keeps:
//! * envelopes from one node to one peer arrive in the order they were sent,
//!   or not at all (Raft tolerates loss and retries, not reordering within a
//!   stream it believes is ordered);
//! * `send` never blocks: a full queue drops the envelope and reports the
//!   peer unreachable.
//!
//! This crate holds the in-process [`MemNetwork`]; network transports plug in
//! through the same [`Transport`] trait.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod mem;

pub use mem::{Faults, InvalidFaults, MemNetwork, MemTransport};

use raft::prelude::Message;

/// Node id within a Raft group (never 0).
pub type NodeId = u64;

/// Messages from one node to one peer, for one Raft group.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Raft group the messages belong to.
    pub group_id: u64,
    /// Sending node.
    pub from: NodeId,
    /// Receiving node.
    pub to: NodeId,
    /// The messages, in the order raft produced them.
    pub messages: Vec<Message>,
}

/// What a transport hands to the node it serves.
#[derive(Debug)]
pub enum Inbound {
    /// Messages from a peer.
    Messages(Envelope),
    /// A send to `to` failed; raft should probe it gently.
    Unreachable {
        /// Raft group of the failed envelope.
        group_id: u64,
        /// Peer that could not be reached.
        to: NodeId,
    },
    /// A snapshot streamed by the transport to `to` was installed there
    /// (`ok`) or failed. Only from transports that stream snapshots.
    SnapshotStatus {
        /// Raft group of the snapshot.
        group_id: u64,
        /// Peer it was sent to.
        to: NodeId,
        /// True once the peer verified and stored the whole snapshot.
        ok: bool,
    },
}

/// Capacity of a node's inbound queue, in envelopes. A full queue drops;
/// raft retransmits.
pub const INBOX_CAPACITY_ENVELOPES: usize = 4096;

/// Sending half of a node's inbound queue, given to the transport.
pub type InboxSender = tokio::sync::mpsc::Sender<Inbound>;
/// Receiving half of a node's inbound queue, read by the ready loop.
pub type Inbox = tokio::sync::mpsc::Receiver<Inbound>;

/// Errors at the transport boundary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A peer address could not be parsed or resolved.
    #[error("invalid address {address:?} for node {id}: {reason}")]
    InvalidAddress {
        /// Node the address was for.
        id: NodeId,
        /// The address given.
        address: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// Moves envelopes to peers.
///
/// # Correctness requirements
/// * `send` does not block and does not reorder envelopes to the same peer.
/// * A failed delivery is reported as [`Inbound::Unreachable`] on the sending
///   node's inbox, unless the failure is an injected network fault (which a
///   real network would not report either).
pub trait Transport: Send + Sync + 'static {
    /// Queues `envelope` for delivery to `envelope.to`.
    fn send(&self, envelope: Envelope);

    /// Records the address of peer `id`. The in-process network ignores it.
    fn set_peer(&self, id: NodeId, address: &str) -> Result<(), TransportError> {
        let _ = (id, address);
        Ok(())
    }

    /// Forgets peer `id`.
    fn remove_peer(&self, id: NodeId) {
        let _ = id;
    }

    /// Stops delivering to and from this node.
    fn shutdown(&self) {}

    /// True if this transport streams snapshot data itself: the node then
    /// sends `MsgSnapshot` with empty data, the transport reads the data from
    /// the snapshot store, and the receiving side writes it into its own store
    /// before it delivers the message. It reports the outcome as
    /// [`Inbound::SnapshotStatus`]. Default: false (data travels inline).
    fn streams_snapshots(&self) -> bool {
        false
    }

    /// Gives a snapshot-streaming transport group `group_id`'s snapshot
    /// store: snapshots of that group are sent from it and received into
    /// it. Called by the node builder before the node starts (once per
    /// group: a host's groups share its transport).
    fn attach_snapshots(
        &self,
        group_id: u64,
        store: std::sync::Arc<dyn raftwork_storage::SnapshotStore>,
    ) {
        let _ = (group_id, store);
    }

    /// Forgets group `group_id`'s snapshot store (the group stopped here):
    /// its snapshots are refused from then on.
    fn detach_snapshots(&self, group_id: u64) {
        let _ = group_id;
    }
}
