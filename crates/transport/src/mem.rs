//! The in-process network: nodes in one process exchange envelopes over
//! bounded channels, with no serialization.
//!
//! Links can be cut one way ([`MemNetwork::set_link`]) to model partitions; a
//! message on a cut link is dropped silently, as a real network would.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;

use crate::{Envelope, Inbound, Inbox, InboxSender, NodeId, Transport, INBOX_CAPACITY_ENVELOPES};

#[derive(Default)]
struct State {
    routes: HashMap<NodeId, InboxSender>,
    /// Directed links that drop everything: (from, to).
    cut: HashSet<(NodeId, NodeId)>,
}

/// An in-process network shared by the nodes of one process.
#[derive(Clone, Default)]
pub struct MemNetwork {
    state: Arc<RwLock<State>>,
}

impl MemNetwork {
    /// A network with no nodes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Attaches node `id`, replacing any earlier attachment (a restart).
    /// Returns its transport and its inbox.
    pub fn join(&self, id: NodeId) -> (MemTransport, Inbox) {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY_ENVELOPES);
        self.state.write().unwrap().routes.insert(id, tx.clone());
        (
            MemTransport {
                id,
                network: self.clone(),
                own_inbox: tx,
            },
            rx,
        )
    }

    /// Cuts (`up == false`) or restores the directed link `from → to`.
    pub fn set_link(&self, from: NodeId, to: NodeId, up: bool) {
        let mut st = self.state.write().unwrap();
        if up {
            st.cut.remove(&(from, to));
        } else {
            st.cut.insert((from, to));
        }
    }

    /// Cuts every link to and from `id` among the nodes attached now.
    pub fn isolate(&self, id: NodeId) {
        let mut st = self.state.write().unwrap();
        let others: Vec<NodeId> = st.routes.keys().copied().filter(|&o| o != id).collect();
        for o in others {
            st.cut.insert((id, o));
            st.cut.insert((o, id));
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.state.write().unwrap().cut.clear();
    }

    fn detach(&self, id: NodeId, inbox: &InboxSender) {
        let mut st = self.state.write().unwrap();
        if st.routes.get(&id).is_some_and(|r| r.same_channel(inbox)) {
            st.routes.remove(&id);
        }
    }
}

/// One node's handle onto a [`MemNetwork`].
pub struct MemTransport {
    id: NodeId,
    network: MemNetwork,
    own_inbox: InboxSender,
}

impl Transport for MemTransport {
    fn send(&self, envelope: Envelope) {
        debug_assert_eq!(envelope.from, self.id);
        let (group_id, to) = (envelope.group_id, envelope.to);
        let route = {
            let st = self.network.state.read().unwrap();
            if st.cut.contains(&(self.id, to)) {
                return; // An injected fault: dropped without a word.
            }
            st.routes.get(&to).cloned()
        };
        let delivered = match route {
            Some(tx) => tx.try_send(Inbound::Messages(envelope)).is_ok(),
            None => false,
        };
        if !delivered {
            // Our own inbox full too means we are overloaded; raft will retry anyway.
            let _ = self
                .own_inbox
                .try_send(Inbound::Unreachable { group_id, to });
        }
    }

    fn shutdown(&self) {
        self.network.detach(self.id, &self.own_inbox);
    }
}
