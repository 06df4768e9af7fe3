//! What a multi-group host knows about its peer hosts, sans IO: the views
//! that tell a hibernating follower whether its leader's host is still
//! there (the tokio `Host` and the simulator both run this).
//!
//! Each host sends one heartbeat per peer host per tick in group
//! [`HOST_GROUP`], whatever its number of groups: a `MsgHeartbeat` whose
//! `index` is the sender's incarnation and `commit` its epoch.
//!
//! ```text
//!  MsgHeartbeat { group_id: 0, from, to, index: incarnation, commit: epoch }
//! ```
//!
//! Invariants:
//! * a peer is alive only if heard within the timeout (time is the
//!   caller's, in milliseconds, and never goes back);
//! * the incarnation differs between any two starts of a host, and the
//!   epoch moves each time one of its groups stops while leading: a
//!   change of either tells that host's followers to check on their
//!   leaders;
//! * [`HostLiveness::generation`] moves whenever any peer's view does.

use std::collections::BTreeMap;

use raft::prelude::{Message, MessageType};

use crate::NodeId;

/// The group id of host-level messages (the coalesced heartbeats): no Raft
/// group may use it.
pub const HOST_GROUP: u64 = 0;

/// What a host knows about a peer host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostView {
    /// Heard within the liveness timeout.
    pub alive: bool,
    /// The peer's incarnation (differs between any two starts).
    pub incarnation: u64,
    /// How many times a group on the peer stopped while leading.
    pub epoch: u64,
}

#[derive(Debug, Default)]
struct Peer {
    view: HostView,
    last_heard_ms: Option<u64>,
}

/// A host's view of its peer hosts, and what it tells them about itself.
#[derive(Debug)]
pub struct HostLiveness {
    incarnation: u64,
    epoch: u64,
    timeout_ms: u64,
    peers: BTreeMap<NodeId, Peer>,
    generation: u64,
}

impl HostLiveness {
    /// A host started as `incarnation`, for which a peer not heard for
    /// `timeout_ms` is dead.
    pub fn new(incarnation: u64, timeout_ms: u64) -> Self {
        Self {
            incarnation,
            epoch: 0,
            timeout_ms,
            peers: BTreeMap::new(),
            generation: 0,
        }
    }

    /// This host's incarnation and epoch, for its heartbeats.
    pub fn own(&self) -> (u64, u64) {
        (self.incarnation, self.epoch)
    }

    /// A group here stopped while leading.
    pub fn stopped_leading(&mut self) {
        self.epoch += 1;
    }

    /// Peer hosts to send heartbeats to, in id order.
    pub fn peers(&self) -> Vec<NodeId> {
        self.peers.keys().copied().collect()
    }

    /// Makes sure these hosts are heartbeat peers.
    pub fn add_peers(&mut self, ids: impl IntoIterator<Item = NodeId>) {
        for id in ids {
            self.peers.entry(id).or_default();
        }
    }

    /// A heartbeat from `from` at `now_ms`: alive, with this incarnation
    /// and epoch.
    pub fn heard(&mut self, from: NodeId, incarnation: u64, epoch: u64, now_ms: u64) {
        let peer = self.peers.entry(from).or_default();
        peer.last_heard_ms = Some(now_ms);
        let view = HostView {
            alive: true,
            incarnation,
            epoch,
        };
        if peer.view != view {
            peer.view = view;
            self.generation += 1;
        }
    }

    /// Marks dead every peer not heard within the timeout of `now_ms`.
    pub fn check(&mut self, now_ms: u64) {
        for peer in self.peers.values_mut() {
            let silent = peer
                .last_heard_ms
                .is_none_or(|t| now_ms.saturating_sub(t) > self.timeout_ms);
            if silent && std::mem::replace(&mut peer.view.alive, false) {
                self.generation += 1;
            }
        }
    }

    /// The view of host `id` now (a host never heard of: not alive).
    pub fn view(&self, id: NodeId) -> HostView {
        self.peers.get(&id).map(|p| p.view).unwrap_or_default()
    }

    /// A number that moves whenever a peer's view changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// This host's heartbeat to `to`.
    pub fn heartbeat(&self, from: NodeId, to: NodeId) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = from;
        m.to = to;
        m.index = self.incarnation;
        m.commit = self.epoch;
        m
    }

    /// Takes in a host-group message from `from` at `now_ms` (anything but
    /// a heartbeat from its sender is ignored).
    pub fn receive(&mut self, from: NodeId, m: &Message, now_ms: u64) {
        if m.get_msg_type() == MessageType::MsgHeartbeat && m.from == from {
            self.heard(from, m.index, m.commit, now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_dies_and_a_restart_or_a_lost_leader_moves_the_generation() {
        let mut l = HostLiveness::new(7, 100);
        l.add_peers([2]);
        assert!(!l.view(2).alive, "never heard: not alive");
        let g0 = l.generation();
        l.heard(2, 11, 0, 0);
        assert!(l.view(2).alive);
        assert!(l.generation() > g0);
        let g1 = l.generation();
        l.heard(2, 11, 0, 50);
        l.check(150);
        assert_eq!(l.generation(), g1, "a repeat changes nothing");
        assert!(l.view(2).alive, "heard 100 ms ago: still alive");
        l.check(151);
        assert!(!l.view(2).alive, "silent past the timeout");
        let g2 = l.generation();
        l.heard(2, 12, 0, 200);
        assert!(l.generation() > g2, "a new incarnation");
        let g3 = l.generation();
        l.heard(2, 12, 1, 210);
        assert!(l.generation() > g3, "a group there stopped while leading");
        assert_eq!(l.view(2).epoch, 1);
        l.stopped_leading();
        let hb = l.heartbeat(1, 2);
        assert_eq!((hb.index, hb.commit), (7, 1));
        let mut other = HostLiveness::new(3, 100);
        other.receive(1, &hb, 0);
        assert_eq!(other.view(1).incarnation, 7);
        other.receive(9, &hb, 0);
        assert!(!other.view(9).alive, "a heartbeat from someone else's name");
    }
}
