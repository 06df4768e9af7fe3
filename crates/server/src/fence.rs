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
//! * A member joining with a fresh data dir first asks the members it was
//!   given for the cluster's membership ([`check_join`], over the peer
//!   port: `raftwork_net::probe_hello` with a description, which every
//!   member serves from [`ServerFencing::set_description`]) and refuses to
//!   start, writing nothing, if the cluster does not expect it: no member
//!   with its id (token and name) and no pending slot at its peer address,
//!   or its id recorded at another peer address.
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
    /// What this member tells a joining one ([`Membership`], JSON).
    description: Mutex<Vec<u8>>,
}

/// The membership a member describes to a joining one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Membership {
    /// Voters' ids, as strings.
    pub voters: Vec<String>,
    /// Learners' ids, as strings.
    pub learners: Vec<String>,
    /// Known member records: (id as a string, name, peer address).
    pub records: Vec<(String, String, String)>,
    /// Peer addresses reserved by a nameless member add, not yet joined.
    pub pending: Vec<String>,
    /// The Raft groups the key space is split over (`--groups`; absent
    /// from members before it: 1).
    #[serde(default = "one_group")]
    pub groups: u32,
    /// Where the key space lives (`--state-store`; absent from members
    /// before it: memory). Members exchange snapshots in its format.
    #[serde(default)]
    pub state_store: crate::cluster::StateStore,
}

fn one_group() -> u32 {
    1
}

/// Why a joining member refuses to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// Its flags disagree with the cluster (exit 2).
    #[error("{0}")]
    Disagrees(String),
    /// No member answered (exit 1).
    #[error("{0}")]
    NoAnswer(String),
}

/// Checks a joining member's flags against the cluster before anything is
/// written: asks each of `peers` for its membership (adopting a newer
/// epoch in memory on the way) and returns the epoch to start at. `me` is
/// the member's id, `peer_addr` the address it advertises, `name` its name,
/// `groups` its `--groups` and `state_store` its `--state-store` (which
/// must be the cluster's).
#[allow(clippy::too_many_arguments)]
pub async fn check_join(
    config: &NetConfig,
    me: u64,
    name: &str,
    peer_addr: &str,
    epoch: u64,
    peers: &[(u64, String)],
    groups: u32,
    state_store: crate::cluster::StateStore,
) -> Result<u64, JoinError> {
    // A member add answers once the leader applied it; the member asked
    // may lag behind, and describes what it knows every half second: so a
    // refusal is only final after a few seconds of asking again.
    let deadline = tokio::time::Instant::now() + JOIN_CHECK_TIME;
    loop {
        let outcome = check_join_once(
            config,
            me,
            name,
            peer_addr,
            epoch,
            peers,
            groups,
            state_store,
        )
        .await;
        match outcome {
            Ok(epoch) => return Ok(epoch),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// How long a joining member keeps asking before it takes a refusal as
/// final.
const JOIN_CHECK_TIME: Duration = Duration::from_secs(4);

#[allow(clippy::too_many_arguments)]
async fn check_join_once(
    config: &NetConfig,
    me: u64,
    name: &str,
    peer_addr: &str,
    mut epoch: u64,
    peers: &[(u64, String)],
    groups: u32,
    state_store: crate::cluster::StateStore,
) -> Result<u64, JoinError> {
    let mut errors = Vec::new();
    for (id, addr) in peers {
        let probe = |epoch| {
            raftwork::net::probe_hello(config, me, *id, addr, epoch, true, Duration::from_secs(2))
        };
        let mut answer = probe(epoch).await;
        if let Ok(p) = &answer {
            if p.verdict == HelloVerdict::DialerOlder && p.epoch > epoch {
                epoch = p.epoch;
                answer = probe(epoch).await;
            }
        }
        let description = match answer {
            Ok(p) if p.verdict == HelloVerdict::NotForMe => {
                return Err(JoinError::Disagrees(format!(
                    "the member at {addr} is not member {id} of this cluster as this member \
                     computes ids (from --initial-cluster-token and the --initial-cluster \
                     names): check them; nothing was written"
                )));
            }
            Ok(p) => match p.description {
                Some(d) => d,
                None => {
                    errors.push(format!("{addr}: refused the hello ({:?})", p.verdict));
                    continue;
                }
            },
            Err(e) => {
                errors.push(format!("{addr}: {e}"));
                continue;
            }
        };
        let Ok(m) = serde_json::from_slice::<Membership>(&description) else {
            errors.push(format!("{addr}: no membership in its answer"));
            continue;
        };
        if m.groups != groups {
            return Err(JoinError::Disagrees(format!(
                "the cluster (asked at {addr}) splits its keys over {} group(s), and this \
                 member was started with --groups {groups}: start it with --groups {}; \
                 nothing was written",
                m.groups, m.groups
            )));
        }
        if m.state_store != state_store {
            return Err(JoinError::Disagrees(format!(
                "the cluster (asked at {addr}) keeps its key space with --state-store {}, and \
                 this member was started with --state-store {}: start it with --state-store \
                 {}; nothing was written",
                m.state_store.as_str(),
                state_store.as_str(),
                m.state_store.as_str()
            )));
        }
        let id = me.to_string();
        let known = m.voters.contains(&id) || m.learners.contains(&id);
        if let Some((_, _, recorded)) = m.records.iter().find(|(rid, _, _)| *rid == id) {
            if known && recorded != peer_addr {
                return Err(JoinError::Disagrees(format!(
                    "the cluster has member {name} at peer address {recorded}, not {peer_addr}                      (--advertise-peer-addr / --peer-addr); nothing was written"
                )));
            }
        }
        if known || m.pending.iter().any(|p| p == peer_addr) {
            return Ok(epoch);
        }
        return Err(JoinError::Disagrees(format!(
            "the cluster (asked at {addr}) does not expect this member: no member {name} (id {me},              from --name and --initial-cluster-token) and no member add reserved peer address              {peer_addr}; add it first (raftwork member add), or check those flags; nothing was              written"
        )));
    }
    Err(JoinError::NoAnswer(format!(
        "no member of the cluster answered to check this member's flags before it joins ({});          nothing was written",
        errors.join("; ")
    )))
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
            description: Mutex::new(Vec::new()),
        })
    }

    /// What this member tells a joining one from now on.
    pub fn set_description(&self, membership: &Membership) {
        *self.description.lock().unwrap() = serde_json::to_vec(membership).expect("serializable");
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
                    false,
                    Duration::from_secs(1),
                )
                .await
                .map(|p| (p.verdict, p.epoch));
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

    fn describe(&self) -> Vec<u8> {
        self.description.lock().unwrap().clone()
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
