//! The in-process network: nodes in one process exchange envelopes over
//! bounded channels, with no serialization.
//!
//! Links can be cut one way ([`MemNetwork::set_link`]) to model partitions; a
//! message on a cut link is dropped silently, as a real network would.
//!
//! # Injected faults
//! [`MemNetwork::set_faults`] turns on seeded whole-envelope faults: every
//! envelope is independently dropped, duplicated, and (each copy) delayed by
//! a random time in `[delay_ms_min, delay_ms_max]`. Delays reorder envelopes,
//! so with faults on the network deliberately breaks the in-order promise of
//! the [`Transport`] trait (Raft stays safe under loss, duplication and
//! reordering; that is what the faults are for). Faults are off by default,
//! and then the network behaves exactly as without them.
//!
//! The fault *choices* come from a SplitMix64 generator seeded with
//! [`MemNetwork::with_seed`]: the n-th envelope sent on the network always
//! gets the same decisions for the same seed and faults. What is not
//! reproducible is which envelope is the n-th: real tokio nodes send from
//! several threads, and their scheduling varies from run to run. (The
//! deterministic simulator, `raftwork-sim`, replays a seed exactly.)

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::{Envelope, Inbound, Inbox, InboxSender, NodeId, Transport, INBOX_CAPACITY_ENVELOPES};

/// Whole-envelope faults injected by a [`MemNetwork`]. The default injects
/// nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Chance, in thousandths, that an envelope is dropped silently.
    pub drop_per_mille: u32,
    /// Chance, in thousandths, that an envelope (not dropped) is delivered
    /// twice.
    pub duplicate_per_mille: u32,
    /// Shortest delay of a delivered copy, in milliseconds.
    pub delay_ms_min: u64,
    /// Longest delay of a delivered copy, in milliseconds; 0 delivers at
    /// once. Each copy draws its own delay, so delays reorder envelopes.
    pub delay_ms_max: u64,
}

impl Faults {
    /// No faults: every envelope delivered once, at once, in order.
    pub const NONE: Faults = Faults {
        drop_per_mille: 0,
        duplicate_per_mille: 0,
        delay_ms_min: 0,
        delay_ms_max: 0,
    };

    /// True if these settings inject anything.
    pub fn is_none(&self) -> bool {
        self.drop_per_mille == 0 && self.duplicate_per_mille == 0 && self.delay_ms_max == 0
    }

    /// Rejects contradictions: a chance above 1000 per mille, or
    /// `delay_ms_min > delay_ms_max`.
    pub fn validate(&self) -> Result<(), InvalidFaults> {
        if self.drop_per_mille > 1000 || self.duplicate_per_mille > 1000 {
            return Err(InvalidFaults(format!(
                "chances are per mille, at most 1000: drop {}, duplicate {}",
                self.drop_per_mille, self.duplicate_per_mille
            )));
        }
        if self.delay_ms_min > self.delay_ms_max {
            return Err(InvalidFaults(format!(
                "delay_ms_min {} exceeds delay_ms_max {}",
                self.delay_ms_min, self.delay_ms_max
            )));
        }
        Ok(())
    }
}

/// [`Faults`] that contradict themselves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid faults: {0}")]
pub struct InvalidFaults(pub String);

/// SplitMix64's increment.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
/// Values drawn per envelope sent while faults are on, whatever the
/// settings use: drop, duplicate, and a delay for each of two copies.
const DRAWS_PER_ENVELOPE: u64 = 4;

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Default)]
struct State {
    routes: HashMap<NodeId, InboxSender>,
    /// Directed links that drop everything: (from, to).
    cut: HashSet<(NodeId, NodeId)>,
    faults: Faults,
}

#[derive(Default)]
struct Shared {
    state: RwLock<State>,
    seed: u64,
    /// SplitMix64 state. Its state is a counter, so one `fetch_add` reserves
    /// an envelope's draws without a lock.
    rng: AtomicU64,
}

/// An in-process network shared by the nodes of one process.
#[derive(Clone, Default)]
pub struct MemNetwork {
    shared: Arc<Shared>,
}

impl MemNetwork {
    /// A network with no nodes, no faults, and seed 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// A network with no nodes and no faults whose fault choices, once
    /// [`MemNetwork::set_faults`] turns them on, are drawn from `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            shared: Arc::new(Shared {
                seed,
                rng: AtomicU64::new(seed),
                ..Default::default()
            }),
        }
    }

    /// The seed fault choices are drawn from.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    /// Injects `faults` into every envelope sent from now on
    /// ([`Faults::NONE`] turns them off). Envelopes already delayed are
    /// still delivered.
    pub fn set_faults(&self, faults: Faults) -> Result<(), InvalidFaults> {
        faults.validate()?;
        self.shared.state.write().unwrap().faults = faults;
        Ok(())
    }

    /// The faults injected now.
    pub fn faults(&self) -> Faults {
        self.shared.state.read().unwrap().faults
    }

    /// Attaches node `id`, replacing any earlier attachment (a restart).
    /// Returns its transport and its inbox.
    pub fn join(&self, id: NodeId) -> (MemTransport, Inbox) {
        let (tx, rx) = mpsc::channel(INBOX_CAPACITY_ENVELOPES);
        self.shared
            .state
            .write()
            .unwrap()
            .routes
            .insert(id, tx.clone());
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
    /// An envelope delayed by a fault is dropped if its link is cut when it
    /// is due.
    pub fn set_link(&self, from: NodeId, to: NodeId, up: bool) {
        let mut st = self.shared.state.write().unwrap();
        if up {
            st.cut.remove(&(from, to));
        } else {
            st.cut.insert((from, to));
        }
    }

    /// Cuts every link to and from `id` among the nodes attached now.
    pub fn isolate(&self, id: NodeId) {
        let mut st = self.shared.state.write().unwrap();
        let others: Vec<NodeId> = st.routes.keys().copied().filter(|&o| o != id).collect();
        for o in others {
            st.cut.insert((id, o));
            st.cut.insert((o, id));
        }
    }

    /// Restores every link (injected faults stay as they are).
    pub fn heal(&self) {
        self.shared.state.write().unwrap().cut.clear();
    }

    fn detach(&self, id: NodeId, inbox: &InboxSender) {
        let mut st = self.shared.state.write().unwrap();
        if st.routes.get(&id).is_some_and(|r| r.same_channel(inbox)) {
            st.routes.remove(&id);
        }
    }

    /// The next envelope's draws.
    fn draws(&self) -> [u64; DRAWS_PER_ENVELOPE as usize] {
        let base = self
            .shared
            .rng
            .fetch_add(GAMMA.wrapping_mul(DRAWS_PER_ENVELOPE), Ordering::Relaxed);
        std::array::from_fn(|k| mix(base.wrapping_add(GAMMA.wrapping_mul(k as u64 + 1))))
    }
}

/// One node's handle onto a [`MemNetwork`].
pub struct MemTransport {
    id: NodeId,
    network: MemNetwork,
    own_inbox: InboxSender,
}

/// Delivers `envelope` on `network` unless its link is cut; reports a
/// missing or full inbox as unreachable on `own_inbox`.
fn deliver(network: &MemNetwork, own_inbox: &InboxSender, envelope: Envelope) {
    let (group_id, from, to) = (envelope.group_id, envelope.from, envelope.to);
    let route = {
        let st = network.shared.state.read().unwrap();
        if st.cut.contains(&(from, to)) {
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
        let _ = own_inbox.try_send(Inbound::Unreachable { group_id, to });
    }
}

impl Transport for MemTransport {
    fn send(&self, envelope: Envelope) {
        debug_assert_eq!(envelope.from, self.id);
        let faults = self.network.shared.state.read().unwrap().faults;
        if faults.is_none() {
            deliver(&self.network, &self.own_inbox, envelope);
            return;
        }
        let [drop, duplicate, delay_a, delay_b] = self.network.draws();
        if drop % 1000 < u64::from(faults.drop_per_mille) {
            return; // An injected fault: dropped without a word.
        }
        let copies = if duplicate % 1000 < u64::from(faults.duplicate_per_mille) {
            vec![(envelope.clone(), delay_a), (envelope, delay_b)]
        } else {
            vec![(envelope, delay_a)]
        };
        let span = faults.delay_ms_max - faults.delay_ms_min + 1;
        for (envelope, draw) in copies {
            let delay_ms = if faults.delay_ms_max == 0 {
                0
            } else {
                faults.delay_ms_min + draw % span
            };
            let runtime = tokio::runtime::Handle::try_current();
            match runtime {
                Ok(rt) if delay_ms > 0 => {
                    let network = self.network.clone();
                    let own_inbox = self.own_inbox.clone();
                    rt.spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                        deliver(&network, &own_inbox, envelope);
                    });
                }
                // No delay, or no runtime to wait on: deliver now.
                _ => deliver(&self.network, &self.own_inbox, envelope),
            }
        }
    }

    fn shutdown(&self) {
        self.network.detach(self.id, &self.own_inbox);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::Message;

    fn envelope(from: NodeId, to: NodeId, tag: u64) -> Envelope {
        Envelope {
            group_id: 1,
            from,
            to,
            messages: vec![Message {
                index: tag,
                ..Default::default()
            }],
        }
    }

    /// Tags of everything waiting in `inbox`.
    fn drain(inbox: &mut Inbox) -> Vec<u64> {
        let mut tags = Vec::new();
        while let Ok(Inbound::Messages(env)) = inbox.try_recv() {
            tags.push(env.messages[0].index);
        }
        tags
    }

    /// Sends tags 0..n from 1 to 2 on a fresh network and returns what 2 got.
    fn run(seed: u64, faults: Faults, n: u64) -> Vec<u64> {
        let net = MemNetwork::with_seed(seed);
        net.set_faults(faults).unwrap();
        let (t1, _in1) = net.join(1);
        let (_t2, mut in2) = net.join(2);
        let mut got = Vec::new();
        for tag in 0..n {
            t1.send(envelope(1, 2, tag));
            got.extend(drain(&mut in2));
        }
        got
    }

    #[test]
    fn without_faults_everything_arrives_once_in_order() {
        let got = run(7, Faults::NONE, 1000);
        assert_eq!(got, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn drops_and_duplicates_follow_the_seed() {
        let faults = Faults {
            drop_per_mille: 200,
            duplicate_per_mille: 200,
            ..Faults::NONE
        };
        let a = run(42, faults, 2000);
        let b = run(42, faults, 2000);
        let c = run(43, faults, 2000);
        assert_eq!(a, b, "same seed, same choices");
        assert_ne!(a, c, "another seed, other choices");
        let dropped = (0..2000).filter(|t| !a.contains(t)).count();
        let duplicated = a.windows(2).filter(|w| w[0] == w[1]).count();
        assert!((250..550).contains(&dropped), "dropped {dropped}");
        assert!((200..450).contains(&duplicated), "duplicated {duplicated}");
        assert!(a.windows(2).all(|w| w[0] <= w[1]), "no delay, no reorder");
    }

    #[test]
    fn invalid_faults_are_refused() {
        let net = MemNetwork::new();
        let bad = [
            Faults {
                drop_per_mille: 1001,
                ..Faults::NONE
            },
            Faults {
                delay_ms_min: 5,
                delay_ms_max: 4,
                ..Faults::NONE
            },
        ];
        for f in bad {
            assert!(net.set_faults(f).is_err(), "{f:?}");
        }
        assert_eq!(net.faults(), Faults::NONE);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn delays_reorder_and_cuts_drop_what_is_due() {
        let net = MemNetwork::with_seed(3);
        net.set_faults(Faults {
            delay_ms_min: 1,
            delay_ms_max: 50,
            ..Faults::NONE
        })
        .unwrap();
        let (t1, _in1) = net.join(1);
        let (_t2, mut in2) = net.join(2);
        for tag in 0..100 {
            t1.send(envelope(1, 2, tag));
        }
        assert!(drain(&mut in2).is_empty(), "everything is delayed");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let got = drain(&mut in2);
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "all delivered once");
        assert_ne!(got, sorted, "delays reorder");

        // A link cut while envelopes are in flight drops them when due.
        for tag in 0..10 {
            t1.send(envelope(1, 2, tag));
        }
        net.set_link(1, 2, false);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(drain(&mut in2).is_empty());
    }
}
