//! What a hibernating group waits on, and how a host knows its peers are
//! alive.
//!
//! A node of its own ticks on its own timer and never sleeps. The groups
//! of a `Host` are ticked by their shard on the host's one ticker, and
//! only while awake: 10,000 sleeping groups cost no wake-ups. A sleeping
//! follower is checked instead when the view of its leader's host
//! ([`Liveness`]) changes: that host stops answering, restarts, or one of
//! its groups stops while leading.
//!
//! Invariants:
//! * a group is ticked only while its core is awake
//!   (`Core::is_hibernating` false);
//! * a sleeping follower always watches its leader's host: a group never
//!   sleeps with nothing that could wake it but its own traffic, unless
//!   it leads (a leader's followers notice its host instead);
//! * [`Liveness::asleep`] counts the groups asleep right now;
//! * [`Liveness::generation`] moves whenever any peer's view does, so a
//!   shard rechecks its sleeping followers only then.

// Only a `Host` (feature `host`) makes host clocks.
#![cfg_attr(not(feature = "host"), allow(dead_code))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftwork_transport::NodeId;

/// What a host knows about a peer host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct HostView {
    /// Heard within the liveness timeout.
    pub(crate) alive: bool,
    /// The peer's incarnation (differs between any two starts).
    pub(crate) incarnation: u64,
    /// How many times a group on the peer stopped while leading.
    pub(crate) epoch: u64,
}

#[derive(Default)]
struct Peer {
    view: HostView,
    last_heard: Option<Instant>,
}

/// A host's view of its peer hosts, fed by their coalesced heartbeats
/// (one per host pair per tick, whatever the number of groups), and what
/// it tells them about itself.
pub(crate) struct Liveness {
    incarnation: u64,
    /// Bumped each time a group here stops while leading, so that the
    /// followers of this host's groups on other hosts check on their leader.
    epoch: AtomicU64,
    /// A peer not heard for this long is dead.
    timeout: Duration,
    peers: Mutex<HashMap<NodeId, Peer>>,
    /// Moves whenever a peer's view changes.
    generation: AtomicU64,
    asleep: AtomicUsize,
}

impl Liveness {
    pub(crate) fn new(incarnation: u64, timeout: Duration) -> Self {
        Self {
            incarnation,
            epoch: AtomicU64::new(0),
            timeout,
            peers: Mutex::default(),
            generation: AtomicU64::new(0),
            asleep: AtomicUsize::new(0),
        }
    }

    /// This host's incarnation and epoch, for its heartbeats.
    pub(crate) fn own(&self) -> (u64, u64) {
        (self.incarnation, self.epoch.load(Ordering::Acquire))
    }

    /// A group here stopped while leading.
    pub(crate) fn stopped_leading(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Peer hosts to send heartbeats to.
    pub(crate) fn peers(&self) -> Vec<NodeId> {
        self.peers.lock().unwrap().keys().copied().collect()
    }

    /// Makes sure these hosts are heartbeat peers.
    pub(crate) fn add_peers(&self, ids: impl IntoIterator<Item = NodeId>) {
        let mut peers = self.peers.lock().unwrap();
        for id in ids {
            peers.entry(id).or_default();
        }
    }

    /// A heartbeat from `from`: alive, with this incarnation and epoch.
    pub(crate) fn heard(&self, from: NodeId, incarnation: u64, epoch: u64, now: Instant) {
        let mut peers = self.peers.lock().unwrap();
        let peer = peers.entry(from).or_default();
        peer.last_heard = Some(now);
        let view = HostView {
            alive: true,
            incarnation,
            epoch,
        };
        if peer.view != view {
            peer.view = view;
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Marks dead every peer not heard within the timeout.
    pub(crate) fn check(&self, now: Instant) {
        for peer in self.peers.lock().unwrap().values_mut() {
            let silent = peer
                .last_heard
                .is_none_or(|t| now.duration_since(t) > self.timeout);
            if silent && std::mem::replace(&mut peer.view.alive, false) {
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// The view of host `id` now.
    pub(crate) fn view(&self, id: NodeId) -> HostView {
        self.peers.lock().unwrap().entry(id).or_default().view
    }

    /// A number that moves whenever a peer's view changes.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Groups asleep on this host right now.
    pub(crate) fn asleep(&self) -> usize {
        self.asleep.load(Ordering::Acquire)
    }
}

/// A ready loop's place among hosts.
pub(crate) enum Clock {
    /// A node of its own: it never sleeps and knows no hosts.
    Own,
    /// A group on a host.
    Host(HostClock),
}

/// A host group's view of hibernation: whether it sleeps, and the view of
/// its leader's host it fell asleep under.
pub(crate) struct HostClock {
    liveness: Arc<Liveness>,
    /// While asleep: counted in `Liveness::asleep`.
    asleep: bool,
    /// While asleep as a follower: its leader and the view of the leader's
    /// host when it fell asleep.
    watching: Option<(NodeId, HostView)>,
}

impl HostClock {
    pub(crate) fn new(liveness: Arc<Liveness>) -> Self {
        Self {
            liveness,
            asleep: false,
            watching: None,
        }
    }
}

impl Drop for HostClock {
    fn drop(&mut self) {
        if self.asleep {
            self.liveness.asleep.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Clock {
    /// The view of `leader`'s host now, for a follower about to sleep (a
    /// node of its own has no view of hosts: `None`).
    pub(crate) fn leader_host_view(&self, leader: NodeId) -> Option<HostView> {
        match self {
            Clock::Own => None,
            Clock::Host(clock) => Some(clock.liveness.view(leader)),
        }
    }

    /// The core fell asleep; a follower watches its leader's host (as
    /// `leader_host_view` gave it).
    pub(crate) fn fell_asleep(&mut self, watching: Option<(NodeId, HostView)>) {
        if let Clock::Host(clock) = self {
            if !clock.asleep {
                clock.asleep = true;
                clock.liveness.asleep.fetch_add(1, Ordering::AcqRel);
            }
            clock.watching = watching;
        }
    }

    /// The core is awake (it was woken, or it stops).
    pub(crate) fn wake(&mut self) {
        if let Clock::Host(clock) = self {
            if std::mem::take(&mut clock.asleep) {
                clock.liveness.asleep.fetch_sub(1, Ordering::AcqRel);
            }
            clock.watching = None;
        }
    }

    /// For a sleeping follower: true if its leader's host's view is not
    /// the one it fell asleep under (dead, restarted, or a group there
    /// stopped while leading).
    pub(crate) fn leader_host_changed(&self) -> bool {
        match self {
            Clock::Host(HostClock {
                liveness,
                watching: Some((leader, then)),
                ..
            }) => liveness.view(*leader) != *then,
            _ => false,
        }
    }

    /// Makes sure these hosts get this host's heartbeats.
    pub(crate) fn add_peers(&self, ids: impl IntoIterator<Item = NodeId>) {
        if let Clock::Host(clock) = self {
            clock.liveness.add_peers(ids);
        }
    }

    /// A group of this host stopped while leading.
    pub(crate) fn stopped_leading(&self) {
        if let Clock::Host(clock) = self {
            clock.liveness.stopped_leading();
        }
    }
}
