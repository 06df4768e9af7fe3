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
//!   node publishes it: the leader proposes it directly; a follower sends
//!   `PUT /v1/internal/members/{name}` (the record as JSON) to the leader's
//!   API URL, taken from the leader's record.
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

use crate::forward::HttpClient;
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
    request_timeout: Duration,
    http: HttpClient,
) -> tokio::task::JoinHandle<()> {
    let events = tokio::spawn(follow_events(node.clone(), me.id));
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
                if let Err(e) = publish(&node, &members, &me, &http, request_timeout).await {
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
/// is applied here.
async fn follow_events(node: Node<KvStore>, me: u64) {
    let mut events = node.subscribe();
    loop {
        match events.recv().await {
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
/// the leader's API.
async fn publish(
    node: &Node<KvStore>,
    members: &Members,
    me: &MemberInfo,
    http: &HttpClient,
    timeout: Duration,
) -> Result<(), String> {
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
    let url = members
        .get(leader)
        .map(|m| m.api_url)
        .ok_or_else(|| format!("the API URL of leader {leader} is not known yet"))?;
    let r = http
        .request(
            &url,
            "PUT",
            &format!("/v1/internal/members/{}", me.name),
            Some("application/json"),
            &value,
            timeout,
        )
        .await
        .map_err(|e| e.to_string())?;
    if r.status == 200 {
        tracing::info!(name = %me.name, leader = %url, "published this member's record");
        Ok(())
    } else {
        Err(format!(
            "the leader answered {}: {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        ))
    }
}
