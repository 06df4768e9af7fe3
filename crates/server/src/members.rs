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
//! **pending slot** instead: `"\0raftwork/pending/" ++ peer address` holds
//! [`Pending`] `{"id", "peer_addr", "learner"}`, where `id` is
//! [`pending_id`] (derived from the token and the peer address, so every
//! node computes the same one; etcd lists the slot as an unstarted member
//! under it). The new member is then started with
//! `--initial-cluster-state existing` and that advertised peer address.
//! Knowing no leader, it **introduces itself**: it sends its record in a
//! note to every member of its `--initial-cluster`. The leader adopts the
//! slot when the sender's record is valid, about the sender, not a member
//! yet, and advertises exactly the slot's peer address: it writes the
//! record, adds the sender (learner or voter, as the slot says) and
//! deletes the slot. A record from a node that is not a member is written
//! only then, so a removed member cannot publish itself back.
//!
//! The member's real id (from its name) then replaces the slot's. The
//! etcd API still accepts the slot's id for that member, as etcdctl prints
//! it at the add: the leader keeps an **alias**,
//! `"\0raftwork/alias/" ++ slot id` (decimal) holding the member's id
//! (decimal), until the member is removed ([`Members::resolve`]).
//! With peer TLS bound to names the introduction cannot be checked (the
//! slot has no name), so `MemberAdd` is refused there: add members with
//! `raftwork member add`, which names them.
//!
//! A member publishes its record when it is missing or differs from what
//! the member advertises, with two exceptions. A record whose peer address
//! an operator moved (etcd's `MemberUpdate`, `moved` set) is followed, not
//! undone, while the member advertises another address: it is expected to
//! be restarted at the new one, and then publishes itself (clearing
//! `moved`). And once its record agreed with it in this process, a member
//! does not publish a missing record again: it was removed.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use raftwork::{Node, NodeEvent, Role};
use serde::{Deserialize, Serialize};

use crate::kv::{KvCommand, KvStore};

/// Keys under this prefix belong to the server, not to clients.
pub const RESERVED_PREFIX: &[u8] = b"\0raftwork/";
/// Member records live under this prefix, one key per member name.
pub const MEMBER_PREFIX: &[u8] = b"\0raftwork/member/";
/// Pending slots of members added by peer address, one key per address.
pub const PENDING_PREFIX: &[u8] = b"\0raftwork/pending/";
/// Aliases: the slot id a member was added under, to its id.
pub const ALIAS_PREFIX: &[u8] = b"\0raftwork/alias/";
/// How often each node refreshes its view of the records.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(200);

/// One member's identity, replicated in the KV store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Member name (`--name`).
    pub name: String,
    /// Raft id (derived from the token and the name).
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
pub struct Pending {
    /// [`pending_id`] of the address.
    pub id: u64,
    /// The peer address the new member will advertise (host:port).
    pub peer_addr: String,
    /// Added as a learner (else as a voter).
    pub learner: bool,
}

/// The KV key of the pending slot for `peer_addr`.
pub fn pending_key(peer_addr: &str) -> Vec<u8> {
    let mut k = PENDING_PREFIX.to_vec();
    k.extend_from_slice(peer_addr.as_bytes());
    k
}

/// The KV key of the alias of slot id `slot_id`.
pub fn alias_key(slot_id: u64) -> Vec<u8> {
    let mut k = ALIAS_PREFIX.to_vec();
    k.extend_from_slice(slot_id.to_string().as_bytes());
    k
}

/// The aliases in `kv`: slot id to member id.
pub fn aliases(kv: &KvStore) -> BTreeMap<u64, u64> {
    kv.list(ALIAS_PREFIX, usize::MAX)
        .into_iter()
        .filter_map(|(k, v)| {
            let slot = std::str::from_utf8(&k[ALIAS_PREFIX.len()..])
                .ok()?
                .parse()
                .ok()?;
            let id = std::str::from_utf8(&v).ok()?.parse().ok()?;
            Some((slot, id))
        })
        .collect()
}

/// The id etcd's API shows for a member added by `peer_addr` until it
/// joins (and accepts for it afterwards, through an alias). Names cannot
/// hold a `/`, so the hashed input is never a name.
pub fn pending_id(token: &str, peer_addr: &str) -> u64 {
    crate::cluster::member_id(token, &format!("pending/{peer_addr}"))
}

/// The pending slots in `kv`, by peer address.
pub fn pending(kv: &KvStore) -> BTreeMap<String, Pending> {
    kv.list(PENDING_PREFIX, usize::MAX)
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice::<Pending>(&v).ok())
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
    pending: RwLock<BTreeMap<String, Pending>>,
    aliases: RwLock<BTreeMap<u64, u64>>,
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

    /// Every pending slot, by peer address.
    pub fn pending(&self) -> BTreeMap<String, Pending> {
        self.pending.read().unwrap().clone()
    }

    /// The member an id given by a client means: `id` itself, or the member
    /// that joined through the pending slot whose id `id` is (see the module
    /// header).
    pub fn resolve(&self, id: u64) -> u64 {
        self.aliases.read().unwrap().get(&id).copied().unwrap_or(id)
    }

    /// The slot ids that alias member `id`.
    pub fn aliases_of(&self, id: u64) -> Vec<u64> {
        let aliases = self.aliases.read().unwrap();
        aliases
            .iter()
            .filter(|(_, &m)| m == id)
            .map(|(&s, _)| s)
            .collect()
    }

    /// Rereads the records and pending slots from the local state machine.
    pub async fn refresh(&self, node: &Node<KvStore>) -> Option<BTreeMap<u64, MemberInfo>> {
        let (now, slots, aliases) = node
            .read_stale(|kv: &KvStore| (records(kv), pending(kv), aliases(kv)))
            .await
            .ok()?;
        *self.by_id.write().unwrap() = now.clone();
        *self.pending.write().unwrap() = slots;
        *self.aliases.write().unwrap() = aliases;
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
        // Once the record agreed with this member, the record wins (see the
        // module header): an operator may have moved its peer address.
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
            match now.get(&me.id) {
                Some(r) if *r == me => agreed = true,
                Some(r) if r.moved && r.peer_addr != me.peer_addr => {
                    agreed = true;
                    if !told_of_update {
                        tracing::warn!(advertised = %me.peer_addr, recorded = %r.peer_addr,
                            "this member's peer address was moved by an operator; restart it \
                             with --advertise-peer-addr and --peer-addr there");
                        told_of_update = true;
                    }
                }
                None if agreed => {}
                _ => {
                    if let Err(e) = publish(&node, &me, &introduce_to).await {
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
/// is not a member is added if a pending slot waits at its peer address
/// (see the module header); otherwise its record is not written.
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
                kv.get(&key).map(<[u8]>::to_vec),
                kv.get(&slot_key)
                    .and_then(|v| serde_json::from_slice::<Pending>(v).ok()),
            )
        })
        .await
        .map_err(|e| e.to_string())?;
    if !member && slot.is_none() {
        return Err(format!(
            "node {from} ({}) is not a member, and no member was added at {}",
            info.name, info.peer_addr
        ));
    }
    if current.as_deref() != Some(data) {
        let command = KvCommand::Put {
            key: member_key(&info.name),
            value: data.to_vec(),
        };
        node.propose(command.encode())
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(name = %info.name, api_url = %info.api_url, "wrote a member's record");
    }
    let Some(slot) = slot else {
        return Ok(());
    };
    if !member {
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
            // The next introduction tries again.
            Err(e) => return Err(format!("adding {} failed: {e}", info.name)),
        }
        tracing::info!(name = %info.name, id = from, learner = slot.learner,
            "a member added by its peer address joined");
    }
    // The slot is done with (also when an earlier note's add went through):
    // its id becomes an alias of the member's.
    node.propose(
        KvCommand::Put {
            key: alias_key(slot.id),
            value: from.to_string().into_bytes(),
        }
        .encode(),
    )
    .await
    .map_err(|e| e.to_string())?;
    node.propose(
        KvCommand::Delete {
            key: pending_key(&info.peer_addr),
        }
        .encode(),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
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
