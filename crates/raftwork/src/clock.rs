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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftwork_transport::NodeId;

use raftwork_core::liveness::HostLiveness;
pub(crate) use raftwork_core::liveness::HostView;

/// A host's view of its peer hosts (the core's sans-IO [`HostLiveness`],
/// on the wall clock, shared by the ticker, the router and the shards),
/// and how many of its groups sleep.
pub(crate) struct Liveness {
    inner: Mutex<HostLiveness>,
    /// The wall clock's zero for `HostLiveness`'s milliseconds.
    started: Instant,
    asleep: AtomicUsize,
    /// This host stopped announcing itself (`PeerLiveness::stop_announcing`).
    silent: std::sync::atomic::AtomicBool,
}

impl Liveness {
    pub(crate) fn new(incarnation: u64, timeout: Duration) -> Self {
        Self {
            inner: Mutex::new(HostLiveness::new(incarnation, timeout.as_millis() as u64)),
            started: Instant::now(),
            asleep: AtomicUsize::new(0),
            silent: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }

    /// This host's heartbeats to every peer host (none once silent).
    pub(crate) fn heartbeats(&self, from: NodeId) -> Vec<(NodeId, raft::prelude::Message)> {
        if self.silent.load(Ordering::Acquire) {
            return Vec::new();
        }
        let l = self.inner.lock().unwrap();
        l.peers()
            .into_iter()
            .map(|to| (to, l.heartbeat(from, to)))
            .collect()
    }

    /// Stops this host's heartbeats for good.
    pub(crate) fn fall_silent(&self) {
        self.silent.store(true, Ordering::Release);
    }

    /// A group here stopped while leading.
    pub(crate) fn stopped_leading(&self) {
        self.inner.lock().unwrap().stopped_leading();
    }

    /// Makes sure these hosts are heartbeat peers.
    pub(crate) fn add_peers(&self, ids: impl IntoIterator<Item = NodeId>) {
        self.inner.lock().unwrap().add_peers(ids);
    }

    /// A host-group message from `from`, arrived at `now`.
    pub(crate) fn receive(&self, from: NodeId, m: &raft::prelude::Message, now: Instant) {
        let ms = self.ms(now);
        self.inner.lock().unwrap().receive(from, m, ms);
    }

    /// Marks dead every peer not heard within the timeout.
    pub(crate) fn check(&self, now: Instant) {
        let ms = self.ms(now);
        self.inner.lock().unwrap().check(ms);
    }

    /// The view of host `id` now.
    pub(crate) fn view(&self, id: NodeId) -> HostView {
        self.inner.lock().unwrap().view(id)
    }

    /// A number that moves whenever a peer's view changes.
    pub(crate) fn generation(&self) -> u64 {
        self.inner.lock().unwrap().generation()
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
