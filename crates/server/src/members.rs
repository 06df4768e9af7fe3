//! How every node learns every member's name, peer address and API URL.
//!
//! # Design
//! Raft's membership only knows ids. The rest of a member's identity is a
//! small **member record**, JSON `{"name", "id", "peer_addr", "api_url"}`,
//! kept in the replicated KV state machine itself under the reserved key
//! `"\0raftwork/member/" ++ name` ([`MEMBER_PREFIX`]). Being ordinary
//! entries, records are replicated, snapshotted and restored with the data:
//! a restarted or lagging node learns them by applying the log.
//!
//! * Each node runs [`spawn_sync`]: every [`SYNC_INTERVAL`] it reads the
//!   records locally (stale read), refreshes the [`Members`] cache the API
//!   uses, gives changed peer addresses to the transport
//!   (`Node::set_peer_address`), and checks its **own** record. If the
//!   record is missing or differs (first start, new advertised address), the
//!   node publishes it: the leader proposes it directly; a follower sends it
//!   to the leader as a note over the peer transport (`Node::send_note`),
//!   never through the client API. The leader writes a record it gets in a
//!   note only if the note's sender is the member the record describes
//!   (its id derives from the token and the record's name): with peer TLS
//!   bound to member names the sender is proven, so no one can publish a
//!   record for another member.
//! * The leader publishes its own record as soon as it leads, so followers
//!   can always reach it once they know who leads and have applied its
//!   record.
//! * `POST /cluster/members` publishes the new member's record before
//!   adding it, and passes the record as the membership change's context:
//!   every node gives the new peer address to its transport when it applies
//!   the change ([`NodeEvent::MembershipChanged`]), without waiting for the
//!   next poll.
//! * The public API refuses writes to keys under [`RESERVED_PREFIX`]
//!   (`"\0raftwork/"`) and hides them from listings.
//!
//! # Members added by peer address (etcd's `MemberAdd`)
//! etcd's `MemberAdd` carries only peer URLs, and raftwork ids derive from
//! names, so such an add cannot name the Raft id yet. It reserves a
//! **slot** instead: `"\0raftwork/pending/" ++ peer address` holds
//! [`Slot`] `{"id", "peer_addr", "learner", "claimed_by", "dropped"}`.
//! `id` is drawn when the slot is made (unique; etcd lists a waiting slot
//! as an unstarted member under it). A slot only ever changes by
//! compare-and-set on its whole value, so its steps cannot race:
//!
//! ```text
//!   waiting ──claim (a joining node)──▶ claimed_by = member id ──▶ (alias)
//!      │                                        │
//!      └──MemberRemove──▶ dropped ◀──member removed──┘
//! ```
//!
//! The new member is started with `--initial-cluster-state existing` and
//! the slot's peer address. Until it is a member it **introduces itself**:
//! it sends its record in a note to every member of its
//! `--initial-cluster`. The leader answers a note from a node that is not
//! a member only if a slot at the record's peer address is waiting (it
//! claims it, by compare-and-set) or is already claimed by that node (an
//! earlier introduction got that far): it then writes the record and adds
//! the node, learner or voter as the slot says. Anything else is refused,
//! so a removed member cannot publish itself back: its slot is dropped
//! with it. A claimed slot stays as an **alias**: the etcd API takes the
//! slot's id for the member ([`Members::resolve`]), as etcdctl prints it at
//! the add. Adding at the address again replaces a claimed or dropped
//! slot.
//!
//! With peer TLS bound to names the introduction cannot be checked (the
//! slot has no name), so a nameless add is refused there: add members with
//! `raftwork member add`, which names them.
//!
//! A member publishes its record when it is missing or differs from what
//! the member advertises, with two exceptions. A record whose peer address
//! an operator moved (etcd's `MemberUpdate`, `moved` set) keeps that
//! address while the member advertises another: the member publishes its
//! other fields with the recorded address, and is expected to be restarted
//! there (it then publishes itself, clearing `moved`). And once its record
//! agreed with it while it was a member, a member does not publish a
//! missing record again: it was removed. Records are written by
//! compare-and-set against the value read, so a late note cannot undo an
//! operator's update.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use raftwork::{Node, NodeEvent, Role};
use serde::{Deserialize, Serialize};

use crate::kv::{Expect, KvCommand, KvResponse, KvStore};

/// Keys under this prefix belong to the server, not to clients.
pub const RESERVED_PREFIX: &[u8] = b"\0raftwork/";
/// Member records live under this prefix, one key per member name.
pub const MEMBER_PREFIX: &[u8] = b"\0raftwork/member/";
/// Slots of members added by peer address, one key per address.
pub const PENDING_PREFIX: &[u8] = b"\0raftwork/pending/";
/// How often each node refreshes its view of the records.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// One member's identity, replicated in the KV store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Member name (`--name`).
    pub name: String,
    /// Raft id (derived from the token and the name). Stored as a number;
    /// read from a number or a string (a REST answer forwarded by the
    /// leader carries it as a string).
    #[serde(deserialize_with = "crate::api::id_json::deserialize")]
    pub id: u64,
    /// Where its peer transport listens (host:port).
    pub peer_addr: String,
    /// Its API, `http://host:port`.
    pub api_url: String,
    /// The peer address was set by an operator (etcd's `MemberUpdate`), not
    /// advertised by the member: the member follows it rather than publish
    /// its own, until it is restarted there (see the module header).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub moved: bool,
}

/// The KV key of `name`'s record.
pub fn member_key(name: &str) -> Vec<u8> {
    let mut k = MEMBER_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

/// A place reserved for a member added by its peer address (see the module
/// header), replicated under [`pending_key`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The id etcd's API shows for the member until it joins, and accepts
    /// for it afterwards ([`slot_id`]).
    pub id: u64,
    /// The peer address the new member will advertise (host:port).
    pub peer_addr: String,
    /// Added as a learner (else as a voter).
    pub learner: bool,
    /// The member that took the slot.
    #[serde(default)]
    pub claimed_by: Option<u64>,
    /// Removed (before or after it was taken): inert.
    #[serde(default)]
    pub dropped: bool,
}

impl Slot {
    /// Waiting for its member: listed as unstarted, holds its address.
    pub fn waiting(&self) -> bool {
        self.claimed_by.is_none() && !self.dropped
    }

    /// The value stored for it.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializable")
    }
}

/// The KV key of the slot for `peer_addr`.
pub fn pending_key(peer_addr: &str) -> Vec<u8> {
    let mut k = PENDING_PREFIX.to_vec();
    k.extend_from_slice(peer_addr.as_bytes());
    k
}

/// A fresh slot id for `peer_addr`: from the token, the address and the
/// time it is made, so an address added again gets another id (an old
/// alias never names a new slot). Names cannot hold a `/`, so the hashed
/// input is never a name.
pub fn slot_id(token: &str, peer_addr: &str) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    crate::cluster::member_id(token, &format!("pending/{peer_addr}/{nanos}"))
}

/// The slots in `kv`, by peer address.
pub fn slots(kv: &KvStore) -> BTreeMap<String, Slot> {
    kv.list(PENDING_PREFIX, usize::MAX)
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<Slot>(&v).ok())
        .map(|p| (p.peer_addr.clone(), p))
        .collect()
}

/// The records in `kv`, by id (records that do not parse are skipped).
pub fn records(kv: &KvStore) -> BTreeMap<u64, MemberInfo> {
    kv.list(MEMBER_PREFIX, usize::MAX)
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<MemberInfo>(&v).ok())
        .map(|m| (m.id, m))
        .collect()
}

/// This node's cached view of the member records.
#[derive(Debug, Default)]
pub struct Members {
    by_id: RwLock<BTreeMap<u64, MemberInfo>>,
    slots: RwLock<BTreeMap<String, Slot>>,
}

impl Members {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The record of member `id`, if known.
    pub fn get(&self, id: u64) -> Option<MemberInfo> {
        self.by_id.read().unwrap().get(&id).cloned()
    }

    /// The record named `name`, if known.
    pub fn by_name(&self, name: &str) -> Option<MemberInfo> {
        self.by_id
            .read()
            .unwrap()
            .values()
            .find(|m| m.name == name)
            .cloned()
    }

    /// Every known record.
    pub fn all(&self) -> BTreeMap<u64, MemberInfo> {
        self.by_id.read().unwrap().clone()
    }

    /// Every slot (waiting, claimed or dropped), by peer address.
    pub fn slots(&self) -> BTreeMap<String, Slot> {
        self.slots.read().unwrap().clone()
    }

    /// The slots waiting for their member, by peer address.
    pub fn waiting(&self) -> BTreeMap<String, Slot> {
        let mut slots = self.slots();
        slots.retain(|_, s| s.waiting());
        slots
    }

    /// The member an id given by a client means: `id` itself, or the member
    /// that took the slot whose id `id` is (see the module header).
    pub fn resolve(&self, id: u64) -> u64 {
        self.slots
            .read()
            .unwrap()
            .values()
            .find(|s| s.id == id && !s.dropped)
            .and_then(|s| s.claimed_by)
            .unwrap_or(id)
    }

    /// Rereads the records and slots from the local state machine.
    pub async fn refresh(&self, node: &Node<KvStore>) -> Option<BTreeMap<u64, MemberInfo>> {
        let (now, all) = node
            .read_stale(|kv: &KvStore| (records(kv), slots(kv)))
            .await
            .ok()?;
        *self.by_id.write().unwrap() = now.clone();
        *self.slots.write().unwrap() = all;
        Some(now)
    }
}

/// Starts the sync loop of the module header for this node (`me`).
/// `introduce_to` are the members this node tells about itself while it
/// knows no leader and is not a member (a node joining an existing
/// cluster: its `--initial-cluster` peers). It ends when the node stops.
pub fn spawn_sync(
    node: Node<KvStore>,
    members: Arc<Members>,
    me: MemberInfo,
    token: String,
    introduce_to: Vec<u64>,
) -> tokio::task::JoinHandle<()> {
    let events = tokio::spawn(follow_events(node.clone(), me.id, token));
    tokio::spawn(async move {
        let _events = AbortOnDrop(events);
        let mut peers: BTreeMap<u64, String> = BTreeMap::new();
        let mut last_error = String::new();
        // Once the record agreed with this member while it was a member, a
        // missing record means it was removed (see the module header).
        let mut agreed = false;
        let mut told_of_update = false;
        loop {
            if node.is_stopped() {
                return;
            }
            let Some(now) = members.refresh(&node).await else {
                return;
            };
            for m in now.values() {
                if m.id != me.id && peers.get(&m.id) != Some(&m.peer_addr) {
                    match node.set_peer_address(m.id, m.peer_addr.clone()).await {
                        Ok(()) => {
                            tracing::info!(peer = m.id, name = %m.name, addr = %m.peer_addr,
                                "peer address from the member records");
                            peers.insert(m.id, m.peer_addr.clone());
                        }
                        Err(e) => tracing::warn!(peer = m.id, error = %e, "bad peer address"),
                    }
                }
            }
            let member = node
                .status()
                .await
                .is_some_and(|s| s.voters.contains(&me.id) || s.learners.contains(&me.id));
            // What this member's record should say: its own fields, at the
            // recorded address while an operator's move stands.
            let wanted = match now.get(&me.id) {
                Some(r) if r.moved && r.peer_addr != me.peer_addr => {
                    if !told_of_update {
                        tracing::warn!(advertised = %me.peer_addr, recorded = %r.peer_addr,
                            "this member's peer address was moved by an operator; restart it \
                             with --advertise-peer-addr and --peer-addr there");
                        told_of_update = true;
                    }
                    MemberInfo {
                        peer_addr: r.peer_addr.clone(),
                        moved: true,
                        ..me.clone()
                    }
                }
                _ => me.clone(),
            };
            match now.get(&me.id) {
                Some(r) if *r == wanted && member => agreed = true,
                None if agreed => {}
                _ => {
                    if let Err(e) = publish(&node, &wanted, &introduce_to).await {
                        if e != last_error {
                            tracing::debug!(error = %e, "member record not published yet");
                            last_error = e;
                        }
                    }
                }
            }
            tokio::time::sleep(SYNC_INTERVAL).await;
        }
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gives the transport the peer address of every member added with a
/// record as its context (`POST /cluster/members`), as soon as the change
/// is applied here; and, on the leader, writes the records members send in
/// notes (see the module header).
async fn follow_events(node: Node<KvStore>, me: u64, token: String) {
    let mut events = node.subscribe();
    loop {
        match events.recv().await {
            Ok(NodeEvent::Note { from, data }) => {
                if let Err(e) = write_noted_record(&node, &token, from, &data).await {
                    tracing::debug!(from, error = %e, "member record from a note not written");
                }
            }
            Ok(NodeEvent::MembershipChanged { context, .. }) => {
                let Ok(m) = serde_json::from_slice::<MemberInfo>(&context) else {
                    continue;
                };
                if m.id != me {
                    if let Err(e) = node.set_peer_address(m.id, m.peer_addr.clone()).await {
                        tracing::warn!(peer = m.id, error = %e, "bad peer address");
                    }
                }
            }
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Publishes `me`'s record: proposed here if this node leads, else sent to
/// the leader in a note, or, knowing no leader and not being a member, to
/// every node of `introduce_to`.
async fn publish(
    node: &Node<KvStore>,
    me: &MemberInfo,
    introduce_to: &[u64],
) -> Result<(), String> {
    let status = node.status().await.ok_or("node stopped")?;
    let value = serde_json::to_vec(me).expect("serializable");
    let Some(leader) = status.leader else {
        let member = status.voters.contains(&me.id) || status.learners.contains(&me.id);
        if member || introduce_to.is_empty() {
            return Err("no leader".into());
        }
        for &to in introduce_to {
            node.send_note(to, value.clone())
                .await
                .map_err(|e| e.to_string())?;
        }
        return Err("no leader yet; introduced this member to its initial peers".into());
    };
    if leader == status.id && status.role == Role::Leader {
        let command = KvCommand::Put {
            key: member_key(&me.name),
            value,
        };
        node.propose(command.encode())
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(name = %me.name, api_url = %me.api_url, "published this member's record");
        return Ok(());
    }
    // Sent again at the next sync until the record shows up.
    node.send_note(leader, value)
        .await
        .map_err(|e| e.to_string())
}

/// On the leader: writes the record a member sent about itself in a note,
/// if it is well formed, really about the sender, and new. A sender that
/// is not a member is added if a slot at its peer address waits for it or
/// is already claimed by it (see the module header); otherwise its record
/// is not written.
async fn write_noted_record(
    node: &Node<KvStore>,
    token: &str,
    from: u64,
    data: &[u8],
) -> Result<(), String> {
    if node.leader() != Some(node.id()) {
        return Err("not the leader".into());
    }
    let info: MemberInfo =
        serde_json::from_slice(data).map_err(|e| format!("malformed member record: {e}"))?;
    check_record(token, &info)?;
    if info.id != from {
        return Err(format!(
            "node {from} sent a record for member {} (id {})",
            info.name, info.id
        ));
    }
    let status = node.status().await.ok_or("node stopped")?;
    let member = status.voters.contains(&from) || status.learners.contains(&from);
    let (key, slot_key) = (member_key(&info.name), pending_key(&info.peer_addr));
    let (current, slot) = node
        .read_stale(move |kv: &KvStore| {
            (
                kv.get(&key).map(|v| v.to_vec()),
                kv.get(&slot_key).map(|v| v.to_vec()),
            )
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut joining = None;
    if !member {
        let slot = slot
            .as_deref()
            .and_then(|v| serde_json::from_slice::<Slot>(v).ok().map(|s| (v, s)));
        match slot {
            Some((_, s)) if !s.dropped && s.claimed_by == Some(from) => joining = Some(s),
            Some((raw, s)) if s.waiting() => {
                let claimed = Slot {
                    claimed_by: Some(from),
                    ..s
                };
                cas(
                    node,
                    pending_key(&info.peer_addr),
                    Expect::Value(raw.to_vec()),
                    claimed.encode(),
                )
                .await
                .map_err(|e| format!("the slot at {} changed: {e}", info.peer_addr))?;
                tracing::info!(name = %info.name, id = from, slot = claimed.id,
                    "a member added by its peer address took its slot");
                joining = Some(claimed);
            }
            _ => {
                return Err(format!(
                    "node {from} ({}) is not a member, and no member was added at {}",
                    info.name, info.peer_addr
                ))
            }
        }
    }
    if current.as_deref() != Some(data) {
        let expect = current.map_or(Expect::Absent, Expect::Value);
        cas(node, member_key(&info.name), expect, data.to_vec())
            .await
            .map_err(|e| format!("the record of {} changed: {e}", info.name))?;
        tracing::info!(name = %info.name, api_url = %info.api_url, "wrote a member's record");
    }
    if let Some(slot) = joining {
        node.set_peer_address(from, info.peer_addr.clone())
            .await
            .map_err(|e| e.to_string())?;
        let added = if slot.learner {
            node.add_learner(from, data.to_vec()).await
        } else {
            node.add_voter(from, data.to_vec()).await
        };
        match added {
            Ok(_) | Err(raftwork::ConfChangeError::AlreadyMember(_)) => {}
            // The member's next introduction tries again.
            Err(e) => return Err(format!("adding {} failed: {e}", info.name)),
        }
        tracing::info!(name = %info.name, id = from, learner = slot.learner,
            "a member added by its peer address joined");
    }
    Ok(())
}

/// Marks `slot` dropped, if it is still exactly as read (see the module
/// header); `Err` if it changed meanwhile.
pub(crate) async fn drop_slot(node: &Node<KvStore>, slot: &Slot) -> Result<(), String> {
    let dropped = Slot {
        dropped: true,
        ..slot.clone()
    };
    cas(
        node,
        pending_key(&slot.peer_addr),
        Expect::Value(slot.encode()),
        dropped.encode(),
    )
    .await
}

/// Proposes a compare-and-set of `key`; `Err` if it was refused.
pub(crate) async fn cas(
    node: &Node<KvStore>,
    key: Vec<u8>,
    expect: Expect,
    value: Vec<u8>,
) -> Result<(), String> {
    let command = KvCommand::Cas { key, expect, value };
    let (_, answer) = node
        .propose(command.encode())
        .await
        .map_err(|e| e.to_string())?;
    match answer {
        KvResponse::Written => Ok(()),
        KvResponse::CasFailed { .. } => Err("compare-and-set failed".into()),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// A record's fields are valid, and its id is the one its name gives in
/// the cluster of `token`.
pub fn check_record(token: &str, info: &MemberInfo) -> Result<(), String> {
    crate::serve::parse_name(&info.name)?;
    if info.id != crate::cluster::member_id(token, &info.name) {
        return Err("the record's id is not the one its name gives in this cluster".into());
    }
    crate::cluster::parse_host_port(&info.peer_addr)?;
    let api = info
        .api_url
        .strip_prefix("http://")
        .or_else(|| info.api_url.strip_prefix("https://"))
        .ok_or("api_url must be http://host:port or https://host:port")?;
    crate::cluster::parse_host_port(api)?;
    Ok(())
}
