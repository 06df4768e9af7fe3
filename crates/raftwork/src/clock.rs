//! Where a ready loop's ticks come from, and what a hibernating group
//! waits on.
//!
//! A node of its own has its own interval timer. The groups of a `Host`
//! share the host's one ticker (a `watch` of the tick number): an awake
//! group waits for the next tick number; a hibernating group does not wait
//! for ticks at all, so 10,000 sleeping groups cost no wake-ups. A
//! sleeping follower waits instead on the view of its leader's host
//! ([`Liveness`]), which changes when that host stops answering, restarts,
//! or one of its groups stops while leading.
//!
//! Invariants:
//! * a group is ticked only while its core is awake
//!   (`Core::is_hibernating` false);
//! * a sleeping follower always watches its leader's host: a group never
//!   sleeps with nothing that could wake it but its own traffic, unless
//!   it leads (a leader's followers notice its host instead);
//! * [`Liveness::asleep`] counts the groups asleep right now.

// Only a `Host` (feature `host`) makes host clocks.
#![cfg_attr(not(feature = "host"), allow(dead_code))]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftwork_transport::NodeId;
use tokio::sync::watch;

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

struct Peer {
    view: watch::Sender<HostView>,
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
    asleep: AtomicUsize,
}

impl Liveness {
    pub(crate) fn new(incarnation: u64, timeout: Duration) -> Self {
        Self {
            incarnation,
            epoch: AtomicU64::new(0),
            timeout,
            peers: Mutex::default(),
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
            peers.entry(id).or_insert_with(new_peer);
        }
    }

    /// A heartbeat from `from`: alive, with this incarnation and epoch.
    pub(crate) fn heard(&self, from: NodeId, incarnation: u64, epoch: u64, now: Instant) {
        let mut peers = self.peers.lock().unwrap();
        let peer = peers.entry(from).or_insert_with(new_peer);
        peer.last_heard = Some(now);
        let view = HostView {
            alive: true,
            incarnation,
            epoch,
        };
        peer.view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }

    /// Marks dead every peer not heard within the timeout.
    pub(crate) fn check(&self, now: Instant) {
        for peer in self.peers.lock().unwrap().values_mut() {
            let silent = peer
                .last_heard
                .is_none_or(|t| now.duration_since(t) > self.timeout);
            if silent {
                peer.view
                    .send_if_modified(|v| std::mem::replace(&mut v.alive, false));
            }
        }
    }

    /// The view of host `id` now, and a receiver that sees its changes.
    fn watch(&self, id: NodeId) -> (HostView, watch::Receiver<HostView>) {
        let mut peers = self.peers.lock().unwrap();
        let peer = peers.entry(id).or_insert_with(new_peer);
        let rx = peer.view.subscribe();
        let view = *rx.borrow();
        (view, rx)
    }

    /// Groups asleep on this host right now.
    pub(crate) fn asleep(&self) -> usize {
        self.asleep.load(Ordering::Acquire)
    }
}

fn new_peer() -> Peer {
    Peer {
        view: watch::Sender::new(HostView::default()),
        last_heard: None,
    }
}

/// What woke a ready loop's clock.
pub(crate) enum ClockEvent {
    /// A tick.
    Tick,
    /// A sleeping follower's leader's host changed: check on the leader.
    LeaderHostChanged,
}

/// Where a ready loop's ticks come from.
pub(crate) enum Clock {
    /// A node of its own: its own timer (created when the loop starts).
    Own(Option<tokio::time::Interval>),
    /// A group on a host.
    Host(HostClock),
}

/// A host group's clock: the host's ticks while awake, its leader's host's
/// view while asleep as a follower.
pub(crate) struct HostClock {
    ticks: watch::Receiver<u64>,
    liveness: Arc<Liveness>,
    /// While asleep: counted in `Liveness::asleep`.
    asleep: bool,
    /// While asleep as a follower: its leader's host's view when it fell
    /// asleep, and that view's receiver.
    watching: Option<(HostView, watch::Receiver<HostView>)>,
}

impl HostClock {
    pub(crate) fn new(ticks: watch::Receiver<u64>, liveness: Arc<Liveness>) -> Self {
        Self {
            ticks,
            liveness,
            asleep: false,
            watching: None,
        }
    }

    fn wake(&mut self) {
        if std::mem::take(&mut self.asleep) {
            self.liveness.asleep.fetch_sub(1, Ordering::AcqRel);
        }
        self.watching = None;
    }
}

impl Drop for HostClock {
    fn drop(&mut self) {
        self.wake();
    }
}

impl Clock {
    /// The next event for a loop whose core is (or is not) hibernating.
    pub(crate) async fn next(&mut self, tick: Duration, hibernating: bool) -> ClockEvent {
        match self {
            Clock::Own(interval) => {
                let interval = interval.get_or_insert_with(|| {
                    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    i
                });
                interval.tick().await;
                ClockEvent::Tick
            }
            Clock::Host(clock) => {
                if !hibernating {
                    clock.wake();
                    // The host's ticker ended: the host is shutting down.
                    if clock.ticks.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    return ClockEvent::Tick;
                }
                match &mut clock.watching {
                    Some((_, rx)) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                        ClockEvent::LeaderHostChanged
                    }
                    // A sleeping leader: only its own traffic wakes it.
                    None => std::future::pending().await,
                }
            }
        }
    }

    /// The view of `leader`'s host now and its receiver, for a follower
    /// about to sleep (a node of its own has no view of hosts: `None`).
    pub(crate) fn watch_leader_host(
        &self,
        leader: NodeId,
    ) -> Option<(HostView, watch::Receiver<HostView>)> {
        match self {
            Clock::Own(_) => None,
            Clock::Host(clock) => Some(clock.liveness.watch(leader)),
        }
    }

    /// The core fell asleep; a follower watches its leader's host (as
    /// `watch_leader_host` gave it).
    pub(crate) fn fell_asleep(&mut self, watching: Option<(HostView, watch::Receiver<HostView>)>) {
        if let Clock::Host(clock) = self {
            if !clock.asleep {
                clock.asleep = true;
                clock.liveness.asleep.fetch_add(1, Ordering::AcqRel);
            }
            clock.watching = watching;
        }
    }

    /// A sleeping follower's leader's host changed its view: true if it
    /// is not the view the follower fell asleep under (dead, restarted,
    /// or a group there stopped while leading); false for a repeat.
    pub(crate) fn leader_host_really_changed(&mut self) -> bool {
        match self {
            Clock::Host(HostClock {
                watching: Some((then, rx)),
                ..
            }) => *rx.borrow_and_update() != *then,
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
