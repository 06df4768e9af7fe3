//! The member's fencing epoch (see `raftwork_net::Fencing`): kept in the
//! data dir's `CLUSTER` file, raised by `raftwork recover`, carried in every
//! peer hello.
//!
//! * A member whose data dir was made by joining an existing cluster
//!   (`--initial-cluster-state existing`, fresh data dir) has not joined
//!   anything yet: the first newer epoch it meets is adopted and written to
//!   `CLUSTER` before the connection goes on.
//! * Any other member that meets a newer epoch was left out of a recovery:
//!   it is fenced. Before the node starts, `serve` says hello to every
//!   member it knows ([`ServerFencing::probe`]), so such a member refuses
//!   to start (exit 3) before it could campaign; one fenced while running
//!   stops the same way.
//!
//! Invariant: the epoch only grows, and is durable (in `CLUSTER`) before
//! any peer is told it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftwork::net::frame::HelloVerdict;
use raftwork::net::{Fencing, NetConfig};
use tokio::sync::watch;

use crate::cluster::{ClusterPlan, ClusterState};

/// Why a member must stop: a peer at a newer epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced {
    /// The peer that showed it.
    pub peer: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Ours.
    pub ours: u64,
}

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fenced: member {} is at cluster epoch {}, this member at {}; the cluster was \
             recovered without it (raftwork recover). Its data dir is stale: wipe it and add it \
             back as a new member",
            self.peer, self.epoch, self.ours
        )
    }
}

/// The epoch of a running `serve`.
#[derive(Debug)]
pub struct ServerFencing {
    epoch: AtomicU64,
    joining: AtomicBool,
    dir: PathBuf,
    plan: Mutex<ClusterPlan>,
    fenced: watch::Sender<Option<Fenced>>,
}

impl ServerFencing {
    /// The epoch of `plan` (the data dir `dir`'s `CLUSTER`).
    pub fn new(plan: &ClusterPlan, dir: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            epoch: AtomicU64::new(plan.epoch),
            joining: AtomicBool::new(plan.state == ClusterState::Existing && !plan.existing_dir),
            dir,
            plan: Mutex::new(plan.clone()),
            fenced: watch::channel(None).0,
        })
    }

    /// Why this member was fenced, if it was.
    pub fn fenced_now(&self) -> watch::Ref<'_, Option<Fenced>> {
        self.fenced.borrow()
    }

    /// Resolves (with why) once this member is fenced.
    pub async fn fenced(&self) -> Fenced {
        let mut rx = self.fenced.subscribe();
        loop {
            if let Some(f) = *rx.borrow_and_update() {
                return f;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Says hello to each of `peers` (`(id, host:port)`) as `me` and adopts
    /// or fails on a newer epoch, before the node starts. Peers that do not
    /// answer within a second are skipped: they cannot be told apart from
    /// dead ones.
    pub async fn probe(
        &self,
        config: &NetConfig,
        me: u64,
        peers: &[(u64, String)],
    ) -> Result<(), Fenced> {
        let mut probes = tokio::task::JoinSet::new();
        for (id, addr) in peers.iter().cloned() {
            let (config, epoch) = (config.clone(), self.epoch());
            probes.spawn(async move {
                let answer = raftwork::net::probe_hello(
                    &config,
                    me,
                    id,
                    &addr,
                    epoch,
                    Duration::from_secs(1),
                )
                .await;
                (id, answer)
            });
        }
        while let Some(done) = probes.join_next().await {
            let Ok((peer, answer)) = done else { continue };
            match answer {
                Ok((HelloVerdict::DialerOlder, theirs)) if theirs > self.epoch() => {
                    if !self.newer_seen(theirs, peer) {
                        return Err(Fenced {
                            peer,
                            epoch: theirs,
                            ours: self.epoch(),
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(peer, error = %e, "no hello answer before start"),
            }
        }
        Ok(())
    }
}

impl Fencing for ServerFencing {
    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn newer_seen(&self, epoch: u64, peer: u64) -> bool {
        let ours = self.epoch();
        if epoch <= ours {
            return true;
        }
        if self.joining.load(Ordering::SeqCst) {
            let mut plan = self.plan.lock().unwrap();
            let mut adopted = plan.clone();
            adopted.epoch = epoch;
            match adopted.rewrite(&self.dir) {
                Ok(()) => {
                    *plan = adopted;
                    self.epoch.store(epoch, Ordering::SeqCst);
                    self.joining.store(false, Ordering::SeqCst);
                    tracing::info!(
                        peer,
                        epoch,
                        "joined a cluster at a newer fencing epoch; adopted it"
                    );
                    return true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot write the adopted epoch to CLUSTER");
                    return false;
                }
            }
        }
        let fenced = Fenced { peer, epoch, ours };
        tracing::error!("{fenced}");
        self.fenced.send_replace(Some(fenced));
        false
    }
}
