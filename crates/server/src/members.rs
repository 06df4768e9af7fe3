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
}

/// The KV key of `name`'s record.
pub fn member_key(name: &str) -> Vec<u8> {
    let mut k = MEMBER_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
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

    /// Rereads the records from the local state machine.
    pub async fn refresh(&self, node: &Node<KvStore>) -> Option<BTreeMap<u64, MemberInfo>> {
        let now = node.read_stale(records).await.ok()?;
        *self.by_id.write().unwrap() = now.clone();
        Some(now)
    }
}

/// Starts the sync loop of the module header for this node (`me`). It ends
/// when the node stops.
pub fn spawn_sync(
    node: Node<KvStore>,
    members: Arc<Members>,
    me: MemberInfo,
    token: String,
) -> tokio::task::JoinHandle<()> {
    let events = tokio::spawn(follow_events(node.clone(), me.id, token));
    tokio::spawn(async move {
        let _events = AbortOnDrop(events);
        let mut peers: BTreeMap<u64, String> = BTreeMap::new();
        let mut last_error = String::new();
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
            if now.get(&me.id) != Some(&me) {
                if let Err(e) = publish(&node, &me).await {
                    if e != last_error {
                        tracing::debug!(error = %e, "member record not published yet");
                        last_error = e;
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
/// the leader in a note.
async fn publish(node: &Node<KvStore>, me: &MemberInfo) -> Result<(), String> {
    let status = node.status().await.ok_or("node stopped")?;
    let leader = status.leader.ok_or("no leader")?;
    // A learner or a node not (yet) in the membership still publishes: the
    // leader accepts records of any member.
    let value = serde_json::to_vec(me).expect("serializable");
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
/// if it is well formed, really about the sender, and new.
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
    let key = member_key(&info.name);
    let current = node
        .read_stale(move |kv: &KvStore| kv.get(&key).map(<[u8]>::to_vec))
        .await
        .map_err(|e| e.to_string())?;
    if current.as_deref() == Some(data) {
        return Ok(());
    }
    let command = KvCommand::Put {
        key: member_key(&info.name),
        value: data.to_vec(),
    };
    node.propose(command.encode())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(name = %info.name, api_url = %info.api_url, "wrote a member's record");
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
