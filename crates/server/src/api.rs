//! The REST API (axum) of the `raftwork` server.
//!
//! | route | answer |
//! | --- | --- |
//! | `PUT /v1/kv/{key}` (body = raw value) | 200 `{"index": N}` |
//! | `PUT /v1/kv/{key}?prev_value=V` | compare-and-set: 200 `{"index": N}`, 412 if the value is not `V` (V percent-encoded; the URI is limited to 64 KiB) |
//! | `PUT /v1/kv/{key}` with header `raftwork-prev-value-length: N` (body = expected value's N bytes, then the new value) | compare-and-set for an expected value of any size up to [`MAX_VALUE_BYTES`]: as above |
//! | `PUT /v1/kv/{key}?prev_exist=false` / `=true` | create only / update only: 200, or 412 |
//! | `GET /v1/kv/{key}[?consistency=stale]` | 200 raw value (`application/octet-stream`), 404 |
//! | `DELETE /v1/kv/{key}` | 200 `{"index": N, "deleted": bool}` |
//! | `POST /v1/kv/{key}?incr=N` (N a signed integer; empty: 1) | 200 `{"index": N, "value": V}`, 409 if the value is not a decimal integer |
//! | `GET /v1/kv?prefix=p&limit=n[&start_after=k][&encoding=base64][&consistency=stale]` | 200 `[{"key", "value"}]`, keys after `k` only; header `raftwork-list-more: true` if more match, with `raftwork-list-next: <last key, percent-encoded>` to pass as `start_after` |
//! | `GET /healthz` | 200 `ok`; 503 once this member was removed from the cluster (it then stops: logs why, exits 0) |
//! | `GET /readyz` | 200 `ready`, or 503 |
//! | `GET /v1/status` | 200 JSON (see [`StatusBody`]) |
//! | `GET /cluster/nodes` | 200 `{"leader": name, "nodes": [{"id", "name", "role", "peer_addr", "api_url"}]}` |
//! | `POST /cluster/members` `{"name", "peer_addr", "api_url", "learner"}` | 200 `{"id", "name", "voters", "learners"}` |
//! | `POST /cluster/members` `{"peer_addr", "learner"}` (no name) | 200 `{"id", "peer_addr", "learner", "pending": true}`: a pending slot for whoever joins at that address ([`crate::members`]) |
//! | `POST /cluster/members/{name}/promote` | 200 as above |
//! | `DELETE /cluster/members/{name}` | 200 as above |
//! | `DELETE /cluster/pending/{peer_addr}` | 200 `{"dropped": peer_addr}`: the slot of a member added by peer address and not started, dropped |
//! | `PUT /cluster/members/{name}` `{"peer_addr"}` | 200 the member's new record `{"name", "id", "peer_addr", "api_url"}` |
//! | `POST /cluster/transfer-leader` `{"to": name}` | 200 `{"leader", "id"}` |
//! | `POST /v1/sessions` | 200 `{"session": "<id>-<secret>"}` (the token) |
//! | `DELETE /v1/sessions/{token}` | 200 `{"closed": true}`, 410 if not live |
//! | `GET /ui`, `GET /v1/ui/node`, `GET /v1/ui/overview` | the status page and its JSON ([`crate::ui`]) |
//!
//! Any node takes any request; the client never sees a redirect. A
//! follower forwards linearizable reads to the leader's API URL (from the
//! replicated member records) and returns the leader's answer as is,
//! status and body. A forwarded request carries [`FORWARDED_HEADER`] and is
//! never forwarded again: a node that gets one without leading answers
//! 503. While no leader is known, a request waits up to
//! [`ApiConfig::request_timeout`], then 503.
//!
//! Writes (PUT, DELETE, compare-and-set) are exactly-once where they can
//! be:
//! * with [`SESSION_HEADER`] and [`SEQUENCE_HEADER`] (and optionally
//!   [`LOW_WATER_HEADER`]) the write runs in that client session on any
//!   node (a follower's node forwards it to the leader over the peer
//!   connection) and is sent again until its outcome is certain: a client
//!   may send it again, to any node, as often as it likes, and it applies
//!   once, every copy answered alike. 410: the session expired or is
//!   unknown (nothing applied); 409: the sequence is below the low-water
//!   mark (nothing applied); 503: no answer within the request timeout
//!   (send it again);
//! * without them, a follower proposes the write in its own session (one
//!   per node), so that sending it again after a leader change cannot
//!   apply it twice; the leader proposes it plainly, and a leader change
//!   while it is in flight answers 503 "may or may not be applied".
//!
//! Keys are the rest of the raw path after `/v1/kv/`, percent-decoded to
//! bytes: they may contain `/` and any byte (`%00`..`%FF`), must be
//! non-empty and at most [`MAX_KEY_BYTES`]. Query values are percent-decoded
//! to bytes too (`+` is a space), so `prev_value` and `prefix` can be
//! binary. Unknown or repeated query parameters are refused (400), so a
//! typo never silently turns a compare-and-set into a plain put. Values
//! are at most [`MAX_VALUE_BYTES`]; a bigger `Content-Length` is refused
//! before the body is read. A URI over 64 KiB (or a head over about
//! 400 KiB) is answered 414 (431) with a JSON error saying to send the
//! expected value in the body ([`crate::listener`]).
//!
//! Member ids (`id`, `leader_id`, `voters`, `learners`, and `leader` in
//! `/v1/status`) are decimal strings in every JSON body above: they are
//! 64-bit, more than a JSON number read as a double (jq, JavaScript) holds
//! exactly. (The etcd gateway under `/v3/` follows etcd's own JSON
//! mapping, which also writes 64-bit integers as strings.)
//!
//! Errors are JSON: `{"error": "<message>", "leader": null}`. On a 503
//! about leadership (not the leader, leader unreachable) `leader` carries
//! the leader's API URL when known, and `"leader_id": "N"` is added when its
//! id is known; other errors have `"leader": null`. Codes: 400 bad input
//! (empty, oversized or reserved key, oversized value, unknown or malformed
//! query parameter, malformed JSON), 404 no such key, route or member, 405
//! wrong method, 409 membership conflict (already a member or voter, a
//! learner as transfer target, no voter left; a session sequence below its
//! low-water mark), 410 session expired or unknown, 412
//! compare-and-set mismatch, 507 the NOSPACE alarm is raised (see
//! `--quota-backend-bytes`), 503 no leader within
//! [`ApiConfig::request_timeout`], the leader unreachable or without a
//! published API URL, or shutting down; 500 anything else.
//!
//! Reads are linearizable by default (`Node::read`, ReadIndex);
//! `consistency=stale` reads the local state (`Node::read_stale`).
//! Listings give keys and values as UTF-8 (invalid sequences replaced by
//! U+FFFD) unless `encoding=base64` asks for standard padded base64.
//! `limit` defaults to [`DEFAULT_LIST_LIMIT`] and may not exceed
//! [`MAX_LIST_LIMIT`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use raftwork::{
    ConfChangeError, ConfState, Node, ProposeError, ReadError, Role, Session, SessionToken,
    TransferError,
};
use serde::Serialize;

use crate::cluster::member_id;
use crate::forward::{HttpClient, SendError, FORWARDED_HEADER};
use crate::kv::{Expect, KvCommand, KvResponse, KvStore, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::listener::ApiPeer;
use crate::members::{member_key, MemberInfo, Members, Slot, RESERVED_PREFIX};

/// Entries a listing returns when no `limit` is given.
pub const DEFAULT_LIST_LIMIT: usize = 1000;
/// Largest `limit` a listing accepts.
pub const MAX_LIST_LIMIT: usize = 10_000;
/// Most bytes of keys and values one listing returns (at least one entry
/// always fits: a key and a value are at most 4 KiB + 1 MiB). A listing cut
/// short by this or by `limit` says so in [`LIST_MORE_HEADER`].
pub const MAX_LIST_BYTES: usize = 4 << 20;
/// Response header of a listing: `true` when more entries match past the
/// last one returned (continue from [`LIST_NEXT_HEADER`]).
pub const LIST_MORE_HEADER: &str = "raftwork-list-more";
/// Response header of a listing cut short (with [`LIST_MORE_HEADER`]
/// `true`): the last key returned, percent-encoded (every byte but
/// `A-Za-z0-9-._~`), to pass as is as `start_after=` to get the next page.
pub const LIST_NEXT_HEADER: &str = "raftwork-list-next";
/// Request header of a compare-and-set with its expected value in the body:
/// the body's first N bytes are the value the key must hold, the rest the
/// new value. For expected values of any size up to [`MAX_VALUE_BYTES`]
/// (a `prev_value=` query parameter is bounded by the URI's 64 KiB).
pub const PREV_VALUE_LENGTH_HEADER: &str = "raftwork-prev-value-length";
/// Request header of a write in a client session: the session's token
/// (`<id>-<secret>`, from `POST /v1/sessions`). Without the secret a
/// session cannot be written in, so clients cannot use each other's.
pub const SESSION_HEADER: &str = "raftwork-session";
/// Request header of a write in a client session: its sequence number.
/// Sending the same write again with the same session and sequence never
/// applies it twice.
pub const SEQUENCE_HEADER: &str = "raftwork-sequence";
/// Optional request header of a write in a client session: the lowest
/// sequence whose answer the client has not seen (default: the write's own
/// sequence, for a client that sends one write at a time). Answers below
/// it are freed.
pub const LOW_WATER_HEADER: &str = "raftwork-low-water";

/// Settings of the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// This node's name (shown in the status).
    pub name: String,
    /// The node's data dir, for the status page's WAL size (`None`: not
    /// shown).
    pub data_dir: Option<PathBuf>,
    /// How long a request waits for a leader before 503.
    pub request_timeout: Duration,
    /// The cluster token (member ids derive from it and the names).
    pub token: String,
    /// The member records this node knows (see [`crate::members`]).
    pub members: Arc<Members>,
    /// Pooled connections to the leader, for forwarding (a
    /// [`HttpClient::forwarding`] client: it marks what it sends).
    pub http: HttpClient,
    /// Certificate identities (DNS names) allowed to change membership and
    /// move leadership (`--admin-identities`); empty: anyone.
    pub admin_identities: Vec<String>,
    /// Peer TLS binds certificates to member names: a member added by its
    /// peer address alone could not be checked, so such adds are refused.
    pub peer_names_checked: bool,
    /// The key space is on disk (`--state-store disk`): the etcd API,
    /// client sessions and backups are refused.
    pub on_disk: bool,
}

/// The caller of a request, as the API listener saw it (`None` when the
/// router is served some other way, as in some tests).
struct Caller(Option<ApiPeer>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(Caller(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<ApiPeer>>()
                .map(|c| c.0.clone()),
        ))
    }
}

impl Caller {
    /// Whether the caller's certificate names `name`.
    fn is(&self, name: &str) -> bool {
        self.0.as_ref().is_some_and(|p| p.is(name))
    }

    /// Whether the caller's certificate names a member of this cluster.
    fn is_member(&self, state: &AppState) -> bool {
        self.0.as_ref().is_some_and(|p| p.cert.is_some())
            && state
                .config
                .members
                .all()
                .values()
                .any(|m| self.is(&m.name))
    }
}

/// Whether `peer` may change membership and move leadership: anyone
/// without `--admin-identities`, else a client whose certificate names
/// one of them (the etcd API's check; it has no forwarded requests).
pub(crate) fn is_admin(state: &AppState, peer: Option<&ApiPeer>) -> bool {
    let admins = &state.config.admin_identities;
    admins.is_empty() || peer.is_some_and(|p| admins.iter().any(|a| p.is(a)))
}

/// Membership changes and leadership transfers: with `--admin-identities`,
/// only a client whose certificate names one of them, or a member
/// forwarding a request it already checked.
fn authorize_admin(state: &AppState, caller: &Caller, headers: &HeaderMap) -> ApiResult<()> {
    let admins = &state.config.admin_identities;
    if admins.is_empty() || admins.iter().any(|a| caller.is(a)) {
        return Ok(());
    }
    if headers.contains_key(FORWARDED_HEADER) && caller.is_member(state) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "this needs a client certificate naming an admin identity (--admin-identities)",
    ))
}

pub(crate) struct AppState {
    /// The group this state serves: the only one, or with `--groups` > 1
    /// group 1 for the router's own state (member records live there) and
    /// each key group's in [`AppState::key_groups`].
    pub(crate) node: Node<KvStore>,
    /// The group holding the member records (`crate::members`): group 1,
    /// whichever group `node` is.
    pub(crate) records: Node<KvStore>,
    pub(crate) config: ApiConfig,
    /// The status page's write window and events ([`crate::ui`]), one for
    /// the whole member.
    pub(crate) ui: Arc<crate::ui::UiState>,
    started: SystemTime,
    started_at: Instant,
    /// This node's own session in this group, for writes it takes as a
    /// follower without a client session: registered on first use, again
    /// if it expired.
    node_session: tokio::sync::Mutex<Option<Arc<Session<KvStore>>>>,
    /// The Raft groups the key space is split over (`--groups`).
    groups: u32,
    /// With more than one group: the state of group `g` at `g - 1`
    /// (empty in those states themselves, and with one group).
    key_groups: Vec<Arc<AppState>>,
}

impl AppState {
    /// The state of the group that holds `key` (`crate::groups`).
    fn for_key(self: &Arc<Self>, key: &[u8]) -> Arc<Self> {
        if self.key_groups.is_empty() {
            return self.clone();
        }
        let g = crate::groups::group_of(key, self.groups);
        self.key_groups[(g - 1) as usize].clone()
    }

    /// 501 for what a member whose keys are split over several groups
    /// does not do (see `crate::groups`).
    /// 501 for what a member with its key space on disk does not serve
    /// (`--state-store disk`, see `crate::kv::DiskBackend`).
    pub(crate) fn refuse_on_disk(&self, what: &str) -> ApiResult<()> {
        if !self.config.on_disk {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            crate::kv::disk_refusal(what),
        ))
    }

    pub(crate) fn refuse_split(&self, what: &str) -> ApiResult<()> {
        if self.groups == 1 {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            crate::groups::refusal(what, self.groups),
        ))
    }
}

pub(crate) type Shared = Arc<AppState>;

/// The API's router for `nodes`: one group's node, or the nodes of groups
/// 1..=G in order when the key space is split (`--groups`).
pub fn router(nodes: Vec<Node<KvStore>>, config: ApiConfig) -> Router {
    assert!(!nodes.is_empty(), "a router needs at least one group");
    let groups = u32::try_from(nodes.len()).expect("at most MAX_GROUPS groups");
    let ui = Arc::new(crate::ui::UiState::start(
        &nodes[0],
        config.data_dir.clone(),
    ));
    let started = SystemTime::now();
    let started_at = Instant::now();
    let state_of = |node: Node<KvStore>, key_groups: Vec<Arc<AppState>>| {
        Arc::new(AppState {
            node,
            records: nodes[0].clone(),
            config: config.clone(),
            ui: ui.clone(),
            started,
            started_at,
            node_session: tokio::sync::Mutex::new(None),
            groups,
            key_groups,
        })
    };
    let key_groups = if groups > 1 {
        nodes
            .iter()
            .map(|n| state_of(n.clone(), Vec::new()))
            .collect()
    } else {
        Vec::new()
    };
    let state = state_of(nodes[0].clone(), key_groups);
    let etcd = if groups > 1 {
        crate::etcd::service::refused_routes(crate::groups::refusal(
            "the etcd v3 API (its revision is one counter for the whole key space)",
            groups,
        ))
    } else if config.on_disk {
        crate::etcd::service::refused_routes(crate::kv::disk_refusal(
            "the etcd v3 API (it serves the key space's history, which a store on disk does not keep)",
        ))
    } else {
        crate::etcd::service::routes(state.clone())
    };
    let ui = crate::ui::routes(state.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/status", get(status))
        .route("/metrics", get(crate::telemetry::metrics_handler))
        .route("/cluster/nodes", get(cluster_nodes))
        .route("/cluster/members", axum::routing::post(add_member))
        .route(
            "/cluster/members/{name}",
            axum::routing::delete(remove_member).put(update_member),
        )
        .route(
            "/cluster/pending/{peer_addr}",
            axum::routing::delete(remove_pending),
        )
        .route(
            "/cluster/members/{name}/promote",
            axum::routing::post(promote_member),
        )
        .route(
            "/cluster/transfer-leader",
            axum::routing::post(transfer_leader),
        )
        .route(
            "/cluster/groups/{g}/change",
            axum::routing::post(change_group),
        )
        .route("/v1/snapshot", get(snapshot))
        .route(INTERNAL_PROPOSE_PATH, axum::routing::post(internal_propose))
        .route("/v1/sessions", axum::routing::post(open_session))
        .route("/v1/sessions/{token}", axum::routing::delete(close_session))
        .route("/v1/kv", get(list))
        .route(
            "/v1/kv/",
            get(empty_key)
                .put(empty_key)
                .delete(empty_key)
                .post(empty_key),
        )
        .route(
            "/v1/kv/{*key}",
            get(get_key).put(put_key).delete(delete_key).post(incr_key),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(bad_method)
        // Bodies are limited by the handlers (400 with a JSON error).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
        .merge(ui)
        .merge(etcd)
        .layer(axum::middleware::from_fn(crate::telemetry::track))
}

/// An API error: a status code and a JSON body.
#[derive(Debug)]
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    leader: Option<String>,
    leader_id: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    leader: Option<String>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "id_json::option"
    )]
    leader_id: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            leader: None,
            leader_id: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            leader: self.leader,
            leader_id: self.leader_id,
        };
        (self.status, Json(body)).into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

fn no_leader(timeout: Duration) -> ApiError {
    ApiError::unavailable(format!(
        "no leader elected within {} ms; retry later",
        timeout.as_millis()
    ))
}

pub(crate) fn shutting_down() -> ApiError {
    ApiError::unavailable("node is shutting down")
}

fn not_leader(leader: u64) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "this node is not the leader (node {leader} is) and the request was already \
             forwarded once; retry"
        ),
        leader: None,
        leader_id: Some(leader),
    }
}

// ---------- member ids in JSON ----------

/// Member ids in REST JSON bodies are decimal strings: they are 64-bit, and
/// JSON tools that read numbers as doubles (jq, JavaScript) would mangle
/// the ones over 2^53. Reading accepts a string or a number (an answer
/// forwarded from an older leader).
pub(crate) mod id_json {
    use serde::{Deserialize, Deserializer, Serializer};

    /// One id, as a string.
    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    /// One id, from a string or a number.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Id {
            Number(u64),
            Text(String),
        }
        match Id::deserialize(d)? {
            Id::Number(n) => Ok(n),
            Id::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }

    /// An optional id, as a string or null.
    pub fn option<S: Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.collect_str(id),
            None => s.serialize_none(),
        }
    }

    /// A list of ids, as strings.
    pub fn list<S: Serializer>(ids: &[u64], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ids.iter().map(u64::to_string))
    }
}

// ---------- query parsing ----------

/// Percent-encodes `bytes`: every byte but `A-Za-z0-9-._~` as `%XX`.
pub fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decodes `s` (`+` is a space in a query string, not in a path).
/// `None` for a malformed escape.
fn percent_decode(s: &[u8], plus_is_space: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Query parameters. Values are bytes (percent-decoded), so `prev_value`
/// and `prefix` can hold any byte; unknown or repeated names are refused so
/// typos are loud.
struct Params(HashMap<String, Vec<u8>>);

impl Params {
    fn parse(uri: &Uri, allowed: &[&str]) -> ApiResult<Self> {
        let mut map = HashMap::new();
        for pair in uri.query().unwrap_or("").split('&') {
            if pair.is_empty() {
                continue;
            }
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let malformed = || ApiError::bad_request(format!("malformed query parameter {pair:?}"));
            let name = percent_decode(name.as_bytes(), true)
                .and_then(|n| String::from_utf8(n).ok())
                .ok_or_else(malformed)?;
            let value = percent_decode(value.as_bytes(), true).ok_or_else(malformed)?;
            if !allowed.contains(&name.as_str()) {
                return Err(ApiError::bad_request(if allowed.is_empty() {
                    format!("unknown query parameter {name:?}; none are allowed here")
                } else {
                    format!(
                        "unknown query parameter {name:?}; allowed here: {}",
                        allowed.join(", ")
                    )
                }));
            }
            if map.insert(name.clone(), value).is_some() {
                return Err(ApiError::bad_request(format!(
                    "query parameter {name:?} is given more than once"
                )));
            }
        }
        Ok(Self(map))
    }

    fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }

    /// A parameter that must be UTF-8 text.
    fn text(&self, name: &str) -> ApiResult<Option<&str>> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v).map(Some).map_err(|_| {
                ApiError::bad_request(format!("query parameter {name:?} is not UTF-8"))
            }),
        }
    }

    fn stale(&self) -> ApiResult<bool> {
        match self.text("consistency")? {
            None | Some("linearizable") => Ok(false),
            Some("stale") => Ok(true),
            Some(other) => Err(ApiError::bad_request(format!(
                "consistency must be \"linearizable\" or \"stale\", not {other:?}"
            ))),
        }
    }
}

/// The key of a `/v1/kv/{key}` request: the rest of the raw path,
/// percent-decoded to bytes (so keys may hold `/` and any byte).
fn key_of(uri: &Uri) -> ApiResult<Vec<u8>> {
    let raw = uri.path().strip_prefix("/v1/kv/").unwrap_or("");
    let key = percent_decode(raw.as_bytes(), false).ok_or_else(|| {
        ApiError::bad_request(format!("malformed percent-escape in the key {raw:?}"))
    })?;
    if key.is_empty() {
        return Err(ApiError::bad_request("the key is empty: use /v1/kv/{key}"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(format!(
            "the key is {} bytes, over the limit of {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(key)
}

fn value_too_large() -> ApiError {
    ApiError::bad_request(format!(
        "the value is over the limit of {MAX_VALUE_BYTES} bytes"
    ))
}

/// A body of at most `max` bytes (a bigger one is refused as a value over
/// [`MAX_VALUE_BYTES`]: the only part whose size a client chooses).
async fn read_body(headers: &HeaderMap, body: Body, max: usize) -> ApiResult<Vec<u8>> {
    let too_large = value_too_large;
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > max as u64 {
            return Err(too_large());
        }
    }
    match axum::body::to_bytes(body, max).await {
        Ok(b) => Ok(b.to_vec()),
        Err(e) => {
            // to_bytes reports an over-limit body as a length-limit error.
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.to_string().contains("length limit") {
                    return Err(too_large());
                }
                source = s.source();
            }
            Err(ApiError::bad_request(format!(
                "could not read the body: {e}"
            )))
        }
    }
}

// ---------- waiting for a leader ----------

/// Runs `attempt` until it succeeds or fails for a reason other than "no
/// leader", waiting for a leader in between, up to the request timeout.
async fn with_leader<T, F, Fut>(state: &AppState, mut attempt: F) -> ApiResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Retry>>,
{
    let timeout = state.config.request_timeout;
    let deadline = Instant::now() + timeout;
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(Retry::Fail(mut e)) => {
                if let Some(id) = e.leader_id {
                    e.leader = state.config.members.get(id).map(|m| m.api_url);
                }
                return Err(e);
            }
            Err(Retry::NoLeader) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(no_leader(timeout));
                }
                match state.node.wait_for_leader(left).await {
                    Ok(_) => {
                        // A leader is known; if the attempt still finds none
                        // (the election is being settled), do not spin.
                        tokio::time::sleep(Duration::from_millis(20).min(left)).await;
                    }
                    Err(raftwork::WaitError::Timeout) => return Err(no_leader(timeout)),
                    Err(_) => return Err(shutting_down()),
                }
            }
        }
    }
}

enum Retry {
    NoLeader,
    Fail(ApiError),
}

fn propose_error(e: ProposeError) -> Retry {
    match e {
        ProposeError::NotLeader {
            leader_hint: Some(l),
            in_flight: false,
        } => Retry::Fail(not_leader(l)),
        ProposeError::NotLeader {
            in_flight: false, ..
        }
        | ProposeError::Dropped => Retry::NoLeader,
        ProposeError::NotLeader {
            in_flight: true, ..
        } => Retry::Fail(ApiError::unavailable(
            "leadership changed while the write was in flight; it may or may not be applied",
        )),
        ProposeError::Timeout => Retry::Fail(ApiError::unavailable(
            "the write timed out; it may or may not be applied",
        )),
        ProposeError::TooLarge {
            size_bytes,
            limit_bytes,
        } => Retry::Fail(ApiError::bad_request(format!(
            "the command is {size_bytes} bytes, over the limit of {limit_bytes}"
        ))),
        ProposeError::Shutdown => Retry::Fail(shutting_down()),
        other => Retry::Fail(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            other.to_string(),
        )),
    }
}

fn read_error(e: ReadError) -> Retry {
    match e {
        ReadError::Timeout => Retry::NoLeader,
        ReadError::Shutdown => Retry::Fail(shutting_down()),
        other => Retry::Fail(ApiError::unavailable(other.to_string())),
    }
}

// ---------- writes and sessions ----------

/// A client session's token and numbers from a write's headers.
struct ClientSession {
    token: SessionToken,
    seq: u64,
    low_water: u64,
}

/// The session headers of a request: all absent, or a session and a
/// sequence (and perhaps a low-water mark) that parse.
fn client_session(headers: &HeaderMap) -> ApiResult<Option<ClientSession>> {
    let number = |name: &str| -> ApiResult<Option<u64>> {
        let mut values = headers.get_all(name).iter();
        let Some(v) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(ApiError::bad_request(format!("{name} given twice")));
        }
        v.to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{name} must be an unsigned integer")))
    };
    let token = match headers.get_all(SESSION_HEADER).iter().collect::<Vec<_>>()[..] {
        [] => None,
        [v] => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<SessionToken>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "{SESSION_HEADER} must be a session token from POST /v1/sessions"
                    ))
                })?,
        ),
        _ => {
            return Err(ApiError::bad_request(format!(
                "{SESSION_HEADER} given twice"
            )))
        }
    };
    match (token, number(SEQUENCE_HEADER)?, number(LOW_WATER_HEADER)?) {
        (None, None, None) => Ok(None),
        (Some(token), Some(seq), low) => {
            let low_water = low.unwrap_or(seq);
            if low_water > seq {
                return Err(ApiError::bad_request(format!(
                    "{LOW_WATER_HEADER} {low_water} is above the write's own sequence {seq}"
                )));
            }
            Ok(Some(ClientSession {
                token,
                seq,
                low_water,
            }))
        }
        _ => Err(ApiError::bad_request(format!(
            "{SESSION_HEADER} and {SEQUENCE_HEADER} go together ({LOW_WATER_HEADER} only with them)"
        ))),
    }
}

/// A session write's error as an API error. `Timeout` means the handle
/// sent the write again for the whole request timeout without an answer.
fn session_error(state: &AppState, e: ProposeError, client_session: bool) -> ApiError {
    match e {
        ProposeError::SessionExpired {
            session,
            earlier_copy_in_flight,
        } => ApiError::new(
            StatusCode::GONE,
            format!(
                "session {session} expired or is unknown: this copy of the write was not \
                 applied{} (register a new session for new writes: POST /v1/sessions)",
                if earlier_copy_in_flight || client_session {
                    "; an earlier copy of it, if one was sent, may have been"
                } else {
                    ""
                }
            ),
        ),
        ProposeError::SessionSequenceStale {
            session,
            seq,
            low_water,
        } => ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "sequence {seq} of session {session} is below its low-water mark {low_water}: \
                 its answer was already seen; nothing was applied"
            ),
        ),
        ProposeError::Timeout if client_session => ApiError::unavailable(format!(
            "no answer within {} ms; the write may be applied: send it again with the same \
             session and sequence, which never applies it twice",
            state.config.request_timeout.as_millis()
        )),
        ProposeError::Timeout => ApiError::unavailable(format!(
            "no answer within {} ms (no leader, or no quorum); the write may or may not be applied",
            state.config.request_timeout.as_millis()
        )),
        e => match propose_error(e) {
            Retry::Fail(e) => e,
            Retry::NoLeader => no_leader(state.config.request_timeout),
        },
    }
}

/// Proposes a write. In the client's session when its headers name one
/// (on any node: a follower's node forwards it to the leader, and it is
/// sent again until the outcome is certain or the request timeout passes).
/// Otherwise here if this node leads (or the request was forwarded to it),
/// else in this node's own session, so that a write sent again after a
/// leader change cannot apply twice.
pub(crate) async fn write(
    state: &AppState,
    headers: &HeaderMap,
    command: KvCommand,
) -> ApiResult<(u64, KvResponse)> {
    let started = Instant::now();
    let answered = propose_write(state, headers, command).await;
    // The status page's write rate and p99: every write this node's API
    // took and got an answer for (one forwarded here counts where it came in).
    if answered.is_ok() && !headers.contains_key(FORWARDED_HEADER) {
        state.ui.writes.record(started.elapsed());
    }
    match answered? {
        (_, KvResponse::NoSpace) => Err(ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "etcdserver: mvcc: database space exceeded (the NOSPACE alarm is raised: delete \
             or compact data, then disarm it with etcdctl alarm disarm); nothing changed",
        )),
        answered => Ok(answered),
    }
}

/// [`write`] before the state machine's answer is looked at.
async fn propose_write(
    state: &AppState,
    headers: &HeaderMap,
    command: KvCommand,
) -> ApiResult<(u64, KvResponse)> {
    let data = command.encode();
    let timeout = state.config.request_timeout;
    if headers.contains_key(SESSION_HEADER) {
        state.refuse_split("client sessions (the raftwork-session header)")?;
        state.refuse_on_disk("client sessions (the raftwork-session header)")?;
    }
    if let Some(s) = client_session(headers)? {
        return Session::resume(state.node.clone(), s.token, s.seq)
            .with_retry_timeout(timeout)
            .propose_at(s.seq, s.low_water, data)
            .await
            .map_err(|e| session_error(state, e, true));
    }
    if headers.contains_key(FORWARDED_HEADER) {
        return propose_here(state, data).await;
    }
    if state.config.on_disk {
        // No sessions on a key space on disk: a follower sends the command
        // to the leader's API, once.
        return match route(state, headers).await? {
            None => propose_here(state, data).await,
            Some(url) => forward_command(state, &url, &data).await,
        };
    }
    if state.node.leader() == Some(state.node.id()) {
        match state.node.propose(data.clone()).await {
            // Leadership moved before the write entered the log, or raft
            // dropped it: certainly not applied, so it goes the follower's
            // way below.
            Err(ProposeError::NotLeader {
                in_flight: false, ..
            })
            | Err(ProposeError::Dropped) => {}
            result => {
                return result.map_err(|e| match propose_error(e) {
                    Retry::Fail(e) => e,
                    Retry::NoLeader => no_leader(timeout),
                })
            }
        }
    }
    // This node's session expired (idle for its TTL) or was ended: a
    // command none of whose copies could have entered the log is refused
    // unapplied, so one new session and one more try. If a copy may have
    // entered the log, the outcome is unknown (503).
    for _ in 0..2 {
        let session = node_session(state).await?;
        match session.propose(data.clone()).await {
            // Only when no copy could have been applied: else the write
            // would apply twice.
            Err(ProposeError::SessionExpired {
                session: id,
                earlier_copy_in_flight: false,
            }) => {
                let mut current = state.node_session.lock().await;
                if current.as_ref().is_some_and(|s| s.id() == id) {
                    *current = None;
                }
            }
            Err(ProposeError::SessionExpired { .. }) => {
                return Err(ApiError::unavailable(
                    "this node's session ended while the write was in flight; it may or may \
                     not be applied",
                ))
            }
            result => return result.map_err(|e| session_error(state, e, false)),
        }
    }
    Err(ApiError::unavailable(
        "this node's session expired twice in a row; nothing was applied; retry",
    ))
}

/// Path of the route a member on disk sends a follower's write to
/// ([`internal_propose`]).
const INTERNAL_PROPOSE_PATH: &str = "/v1/internal/propose";

/// Sends an encoded command to the leader's [`internal_propose`] once:
/// its index and response, or the leader's error as it gave it. A request
/// that may have reached it unanswered has an unknown outcome (503).
async fn forward_command(state: &AppState, url: &str, data: &[u8]) -> ApiResult<(u64, KvResponse)> {
    let timeout = state.config.request_timeout;
    let sent = state
        .config
        .http
        .request(
            url,
            "POST",
            INTERNAL_PROPOSE_PATH,
            Some("application/octet-stream"),
            data,
            timeout,
        )
        .await;
    let answer = match sent {
        Ok(answer) => answer,
        Err(SendError::Connect { .. }) => {
            return Err(ApiError::unavailable(format!(
                "the leader at {url} cannot be reached; nothing was applied; retry"
            )))
        }
        Err(e) => {
            return Err(ApiError::unavailable(format!(
                "the write was sent to the leader and no answer came ({e}); it may or may not \
                 be applied"
            )))
        }
    };
    if answer.status != 200 {
        let status =
            StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer.body).into_owned());
        return Err(ApiError::new(status, message));
    }
    let malformed = || ApiError::new(StatusCode::BAD_GATEWAY, "the leader's answer is malformed");
    let (index, response) = answer.body.split_at_checked(8).ok_or_else(malformed)?;
    let index = u64::from_le_bytes(index.try_into().expect("8 bytes"));
    let response =
        <KvResponse as raftwork::ResponseBytes>::from_bytes(response).ok_or_else(malformed)?;
    Ok((index, response))
}

/// `POST /v1/internal/propose` (members only, marked forwarded): a
/// follower's write on a key space on disk, proposed here, on the leader.
/// The body is an encoded command; only what the public routes take is
/// accepted (put, delete, compare-and-set, increment of a key that is not
/// reserved), so this route lets no one do more than the public ones. The
/// answer is `index u64 LE | response` (`ResponseBytes`).
async fn internal_propose(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    if !headers.contains_key(FORWARDED_HEADER) {
        return Err(ApiError::bad_request(
            "an internal route: members send it a follower's write",
        ));
    }
    // At most what the public routes encode: a compare-and-set carries a
    // key, the expected value and the new one.
    let body = read_body(&headers, body, 2 * MAX_VALUE_BYTES + MAX_KEY_BYTES + 64).await?;
    let command = KvCommand::decode(&body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match &command {
        KvCommand::Put { key, .. }
        | KvCommand::Delete { key }
        | KvCommand::Cas { key, .. }
        | KvCommand::Incr { key, .. } => refuse_reserved(key)?,
        KvCommand::Etcd(_) => return Err(ApiError::bad_request("not an etcd write")),
    }
    let (index, response) = propose_here(&state, body).await?;
    let mut out = index.to_le_bytes().to_vec();
    out.extend_from_slice(&raftwork::ResponseBytes::to_bytes(&response));
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Bytes::from(out),
    )
        .into_response())
}

/// Proposes `command` plainly on this node (the leader), waiting for a
/// leader while there is none.
async fn propose(state: &AppState, command: KvCommand) -> ApiResult<(u64, KvResponse)> {
    propose_here(state, command.encode()).await
}

async fn propose_here(state: &AppState, data: Vec<u8>) -> ApiResult<(u64, KvResponse)> {
    with_leader(state, || {
        let data = data.clone();
        async move { state.node.propose(data).await.map_err(propose_error) }
    })
    .await
}

/// Registers a session, waiting for a leader up to the request timeout;
/// its handle sends commands again for as long.
async fn register(state: &AppState) -> ApiResult<Session<KvStore>> {
    let timeout = state.config.request_timeout;
    let session = tokio::time::timeout(timeout, state.node.session())
        .await
        .map_err(|_| no_leader(timeout))?
        .map_err(|e| session_error(state, e, false))?;
    Ok(session.with_retry_timeout(timeout))
}

/// This node's own session, registered on first use.
async fn node_session(state: &AppState) -> ApiResult<Arc<Session<KvStore>>> {
    let mut current = state.node_session.lock().await;
    if let Some(s) = current.as_ref() {
        return Ok(s.clone());
    }
    let session = Arc::new(register(state).await?);
    *current = Some(session.clone());
    Ok(session)
}

#[derive(Serialize)]
struct SessionBody {
    /// The session's token (`<id>-<secret>`): the `raftwork-session`
    /// header's value.
    session: String,
}

/// `POST /v1/sessions`: registers a client session.
async fn open_session(State(state): State<Shared>) -> ApiResult<Json<SessionBody>> {
    state.refuse_split("client sessions")?;
    state.refuse_on_disk("client sessions")?;
    let session = register(&state).await?;
    Ok(Json(SessionBody {
        session: session.token().to_string(),
    }))
}

#[derive(Serialize)]
struct ClosedBody {
    closed: bool,
}

/// `DELETE /v1/sessions/{token}`: ends a client session.
async fn close_session(
    State(state): State<Shared>,
    axum::extract::Path(token): axum::extract::Path<String>,
) -> ApiResult<Json<ClosedBody>> {
    state.refuse_split("client sessions")?;
    state.refuse_on_disk("client sessions")?;
    let token: SessionToken = token.parse().map_err(ApiError::bad_request)?;
    Session::resume(state.node.clone(), token, 1)
        .with_retry_timeout(state.config.request_timeout)
        .close()
        .await
        .map_err(|e| session_error(&state, e, true))?;
    Ok(Json(ClosedBody { closed: true }))
}

/// Runs `f` on the state machine, linearizably unless `stale`.
pub(crate) async fn read<R, F>(state: &AppState, stale: bool, f: F) -> ApiResult<R>
where
    F: Fn(&KvStore) -> R + Send + Sync + Clone + 'static,
    R: Send + 'static,
{
    if stale {
        return state
            .node
            .read_stale(f)
            .await
            .map_err(|e| match read_error(e) {
                Retry::Fail(e) => e,
                Retry::NoLeader => ApiError::unavailable("stale read failed"),
            });
    }
    // A ReadIndex round without a leader only fails after the node's own
    // read timeout, which may be longer than ours: bound the whole wait.
    let timeout = state.config.request_timeout;
    let reading = with_leader(state, || {
        let f = f.clone();
        async move { state.node.read(f).await.map_err(read_error) }
    });
    tokio::time::timeout(timeout, reading)
        .await
        .unwrap_or_else(|_| Err(no_leader(timeout)))
}

/// `GET /v1/snapshot`: a backup of the whole key space (the file format
/// of [`crate::backup`]), from a linearizable read on this member: the
/// state it holds is the cluster's at one point, with that point's log
/// index and term. Admin only under `--admin-identities` (it holds every
/// key). Built in memory, as the state machine is.
async fn snapshot(
    State(state): State<Shared>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    state.refuse_split("backups (GET /v1/snapshot)")?;
    state.refuse_on_disk("backups (GET /v1/snapshot)")?;
    use raftwork::StateMachine as _;
    Params::parse(&uri, &[])?;
    authorize_admin(&state, &caller, &headers)?;
    let timeout = state.config.request_timeout;
    let capture = |kv: &KvStore, at: raftwork::AppliedAt| {
        let mut data = Vec::new();
        let written = kv.snapshot(&mut data).map(|()| data);
        let m = kv.mvcc();
        (
            written,
            at,
            m.revision(),
            m.compacted_revision(),
            kv.len() as u64,
        )
    };
    let reading = with_leader(&state, || async {
        state.node.read_at(capture).await.map_err(read_error)
    });
    let (data, at, revision, compact_revision, keys) = tokio::time::timeout(timeout, reading)
        .await
        .unwrap_or_else(|_| Err(no_leader(timeout)))?;
    let data = data.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let st = state.node.status().await.ok_or_else(shutting_down)?;
    let records = state.config.members.all();
    let member = |id: u64, learner: bool| {
        let r = records.get(&id);
        crate::backup::Member {
            id: id.to_string(),
            name: r.map(|r| r.name.clone()),
            peer_addr: r.map(|r| r.peer_addr.clone()),
            api_url: r.map(|r| r.api_url.clone()),
            learner,
        }
    };
    let members = st
        .voters
        .iter()
        .map(|&id| member(id, false))
        .chain(st.learners.iter().map(|&id| member(id, true)))
        .collect();
    let meta = crate::backup::Meta {
        cluster_token: state.config.token.clone(),
        taken_from: state.config.name.clone(),
        index: at.index,
        term: at.term,
        revision,
        compact_revision,
        keys,
        members,
        created_unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        server_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Bytes::from(crate::backup::encode(&meta, &data)),
    )
        .into_response())
}

// ---------- forwarding to the leader ----------

/// Where a write or a linearizable read must run: `None` for here (this
/// node leads, or the request was already forwarded once), else the
/// leader's API URL. Waits for a leader, and for its URL, up to the request
/// timeout.
async fn route(state: &AppState, headers: &HeaderMap) -> ApiResult<Option<String>> {
    if headers.contains_key(FORWARDED_HEADER) {
        return Ok(None);
    }
    let timeout = state.config.request_timeout;
    let deadline = Instant::now() + timeout;
    loop {
        // The cached leader: no round trip to the ready loop per request.
        let leader = state.node.leader();
        if leader.is_none() && state.node.is_stopped() {
            return Err(shutting_down());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match leader {
            Some(l) if l == state.node.id() => return Ok(None),
            Some(l) => {
                let members = &state.config.members;
                if members.get(l).is_none() {
                    members.refresh(&state.records).await;
                }
                if let Some(m) = members.get(l) {
                    return Ok(Some(m.api_url));
                }
                if left.is_zero() {
                    return Err(ApiError {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        message: format!(
                            "the leader (node {l}) has not published its API URL within {} ms; \
                             retry later",
                            timeout.as_millis()
                        ),
                        leader: None,
                        leader_id: Some(l),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50).min(left)).await;
            }
            None => {
                if left.is_zero() {
                    return Err(no_leader(timeout));
                }
                match state.node.wait_for_leader(left).await {
                    Ok(_) => {}
                    Err(raftwork::WaitError::Timeout) => return Err(no_leader(timeout)),
                    Err(_) => return Err(shutting_down()),
                }
            }
        }
    }
}

/// Sends the request to the leader at `url` and returns its answer as is.
async fn forward_to(
    state: &AppState,
    url: &str,
    method: &str,
    uri: &Uri,
    content_type: Option<&str>,
    body: &[u8],
) -> ApiResult<Response> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let timeout = state.config.request_timeout;
    let deadline = Instant::now() + timeout;
    let mut url = url.to_string();
    let mut sent = state
        .config
        .http
        .request(&url, method, path, content_type, body, timeout)
        .await;
    // A leader that cannot be reached (it just died or is stopping) was
    // sent nothing: wait for the next leader within the request timeout
    // and send it there, instead of failing at once.
    while let Err(SendError::Connect { .. }) = &sent {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50).min(left)).await;
        match route(state, &HeaderMap::new()).await {
            Ok(Some(next)) => url = next,
            // Leadership came here: the caller's handler would run it
            // locally; it is simplest and safe to have the client retry.
            Ok(None) => {
                return Err(ApiError::unavailable(
                    "the leader changed to this node while forwarding; nothing was applied; \
                     retry",
                ))
            }
            Err(e) => return Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        sent = state
            .config
            .http
            .request(&url, method, path, content_type, body, left)
            .await;
    }
    let url = url.as_str();
    match sent {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, Bytes::from(r.body)).into_response();
            if let Some(ct) = r.content_type.and_then(|c| c.parse().ok()) {
                response.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            // A listing's cursor headers, from the leader's answer.
            for (name, value) in &r.raftwork_headers {
                if let (Ok(n), Ok(v)) = (
                    header::HeaderName::from_bytes(name.as_bytes()),
                    axum::http::HeaderValue::from_str(value),
                ) {
                    response.headers_mut().insert(n, v);
                }
            }
            Ok(response)
        }
        Err(e) => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: match e {
                SendError::NoAnswer { .. } => format!(
                    "forwarding to the leader failed ({e}); a write may or may not be applied"
                ),
                SendError::Connect { .. } | SendError::BadUrl(_) => {
                    format!("forwarding to the leader failed ({e}); nothing was applied")
                }
            },
            leader: Some(url.to_string()),
            leader_id: None,
        }),
    }
}

fn refuse_reserved(key: &[u8]) -> ApiResult<()> {
    if key.starts_with(RESERVED_PREFIX) {
        return Err(ApiError::bad_request(
            "keys starting with \"\\0raftwork/\" are reserved for the server",
        ));
    }
    Ok(())
}

// ---------- handlers ----------

/// `ok`, unless this member was removed from the cluster (503): it is
/// about to stop, and must not be taken for a healthy member meanwhile.
async fn healthz(State(state): State<Shared>) -> Response {
    match state.node.status().await {
        Some(s) if s.removed => {
            ApiError::unavailable("this member was removed from the cluster; it stops")
                .into_response()
        }
        _ => "ok".into_response(),
    }
}

async fn readyz(State(state): State<Shared>) -> Response {
    let groups: Vec<&AppState> = if state.key_groups.is_empty() {
        vec![&state]
    } else {
        state.key_groups.iter().map(|g| &**g).collect()
    };
    for (g, group) in (1u64..).zip(groups) {
        match group.node.status().await {
            Some(s) => match not_ready(&s) {
                None => {}
                Some(why) if state.key_groups.is_empty() => {
                    return ApiError::unavailable(why).into_response()
                }
                Some(why) => {
                    return ApiError::unavailable(format!("group {g}: {why}")).into_response()
                }
            },
            None => return shutting_down().into_response(),
        }
    }
    (StatusCode::OK, "ready").into_response()
}

/// Whether a node with this status is ready, the one rule of `GET /readyz`
/// and of systemd's READY=1 ([`crate::notify`]): `None` when a leader is
/// known and everything committed is applied, else why not.
pub fn not_ready(s: &raftwork::Status) -> Option<String> {
    if s.leader.is_none() {
        Some("not ready: no known leader".into())
    } else if s.applied_index < s.commit_index {
        Some(format!(
            "not ready: applied {} < commit {}",
            s.applied_index, s.commit_index
        ))
    } else {
        None
    }
}

/// Body of `GET /v1/status`.
#[derive(Debug, Serialize)]
pub struct StatusBody {
    /// Raft node id (a decimal string in JSON, as every id below).
    #[serde(serialize_with = "id_json::serialize")]
    pub id: u64,
    /// Node name (`--name`).
    pub name: String,
    /// `leader`, `follower`, `candidate`, `pre-candidate`, `learner`, or
    /// `removed` (this member applied its own removal; it stops).
    pub role: &'static str,
    /// Current term.
    pub term: u64,
    /// Known leader's id, if any.
    #[serde(serialize_with = "id_json::option")]
    pub leader: Option<u64>,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// Newest snapshot index.
    pub snapshot_index: u64,
    /// Voting members.
    #[serde(serialize_with = "id_json::list")]
    pub voters: Vec<u64>,
    /// Learners.
    #[serde(serialize_with = "id_json::list")]
    pub learners: Vec<u64>,
    /// Messages from peers dropped by validation since the node started
    /// (forged, corrupt, or from a broken peer; each is logged with its
    /// sender).
    pub peer_messages_rejected: u64,
    /// Process id.
    pub pid: u32,
    /// Resident set size in bytes (VmRSS of /proc/self/status), if known.
    pub rss_bytes: Option<u64>,
    /// CPU used since the server started, as a percentage of one core
    /// averaged over the uptime (user + system time of /proc/self/stat, at
    /// Linux's fixed USER_HZ of 100), if known. Can exceed 100 with several
    /// busy threads.
    pub cpu_percent_avg: Option<f64>,
    /// raftwork version.
    pub version: &'static str,
    /// Process start, Unix milliseconds.
    pub start_time_unix_ms: u64,
    /// Seconds since start.
    pub uptime_seconds: f64,
    /// With `--groups` > 1, every group's view from this member (the
    /// fields above are group 1's); absent with one group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<GroupStatus>>,
}

/// One group's entry in [`StatusBody::groups`].
#[derive(Debug, Serialize)]
pub struct GroupStatus {
    /// The group's id (1..=G).
    pub group: u64,
    /// This member's role in it (as [`StatusBody::role`]).
    pub role: &'static str,
    /// The group's current term.
    pub term: u64,
    /// The group's known leader's id, if any.
    #[serde(serialize_with = "id_json::option")]
    pub leader: Option<u64>,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
}

/// The role `/v1/status` reports for a node with this status.
pub(crate) fn role_of(s: &raftwork::Status) -> &'static str {
    if s.removed {
        "removed"
    } else {
        role_name(s.role)
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::Candidate => "candidate",
        Role::PreCandidate => "pre-candidate",
        Role::Learner => "learner",
    }
}

/// Resident set size from `/proc/self/status` (exact kB, no page-size guess).
fn rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User plus system CPU time of this process, in seconds.
fn cpu_seconds() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields from after its closing parenthesis (field 3 is the state).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

async fn status(State(state): State<Shared>) -> ApiResult<Json<StatusBody>> {
    let s = state.node.status().await.ok_or_else(shutting_down)?;
    let groups = if state.key_groups.is_empty() {
        None
    } else {
        let mut groups = Vec::with_capacity(state.key_groups.len());
        for (g, group) in (1u64..).zip(&state.key_groups) {
            let s = group.node.status().await.ok_or_else(shutting_down)?;
            groups.push(GroupStatus {
                group: g,
                role: role_of(&s),
                term: s.term,
                leader: s.leader,
                commit: s.commit_index,
                applied: s.applied_index,
            });
        }
        Some(groups)
    };
    let uptime = state.started_at.elapsed().as_secs_f64();
    Ok(Json(StatusBody {
        id: s.id,
        name: state.config.name.clone(),
        role: role_of(&s),
        term: s.term,
        leader: s.leader,
        commit: s.commit_index,
        applied: s.applied_index,
        last_index: s.last_index,
        snapshot_index: s.snapshot_index,
        voters: s.voters,
        learners: s.learners,
        peer_messages_rejected: s.messages_rejected,
        pid: std::process::id(),
        rss_bytes: rss_bytes(),
        cpu_percent_avg: cpu_seconds()
            .filter(|_| uptime > 0.0)
            .map(|cpu| (cpu / uptime * 100.0 * 10.0).round() / 10.0),
        version: env!("CARGO_PKG_VERSION"),
        start_time_unix_ms: state
            .started
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        uptime_seconds: uptime,
        groups,
    }))
}

async fn empty_key() -> ApiError {
    ApiError::bad_request("the key is empty: use /v1/kv/{key}")
}

async fn no_route(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such route: {}", uri.path()),
    )
}

async fn bad_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

async fn get_key(State(state): State<Shared>, uri: Uri, headers: HeaderMap) -> ApiResult<Response> {
    let query = Params::parse(&uri, &["consistency"])?;
    let stale = query.stale()?;
    let key = key_of(&uri)?;
    let state = state.for_key(&key);
    if !stale {
        if let Some(url) = route(&state, &headers).await? {
            return forward_to(&state, &url, "GET", &uri, None, b"").await;
        }
    }
    let value = read(&state, stale, move |kv: &KvStore| {
        kv.get(&key).map(|v| v.to_vec())
    })
    .await?;
    match value {
        Some(v) => Ok((
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Bytes::from(v),
        )
            .into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "key not found")),
    }
}

#[derive(Serialize)]
struct IndexBody {
    index: u64,
}

async fn put_key(
    State(state): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let query = Params::parse(&uri, &["prev_value", "prev_exist"])?;
    let key = key_of(&uri)?;
    refuse_reserved(&key)?;
    let state = state.for_key(&key);
    let prev_exist = match query.text("prev_exist")? {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "prev_exist must be true or false, not {other:?}"
            )))
        }
    };
    let prev_len = match headers.get(PREV_VALUE_LENGTH_HEADER) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|v| v.parse::<usize>().ok()) {
            Some(n) if n <= MAX_VALUE_BYTES => Some(n),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{PREV_VALUE_LENGTH_HEADER} must be a byte count from 0 to {MAX_VALUE_BYTES}"
                )))
            }
        },
    };
    if prev_len.is_some() && (query.bytes("prev_value").is_some() || prev_exist.is_some()) {
        return Err(ApiError::bad_request(format!(
            "{PREV_VALUE_LENGTH_HEADER} (the expected value in the body) cannot go with \
             prev_value or prev_exist"
        )));
    }
    let mut expect = match (query.bytes("prev_value"), prev_exist) {
        (Some(_), Some(false)) => {
            return Err(ApiError::bad_request(
                "prev_value and prev_exist=false contradict each other",
            ))
        }
        (Some(v), _) => Some(Expect::Value(v.to_vec())),
        (None, Some(false)) => Some(Expect::Absent),
        (None, Some(true)) => Some(Expect::Present),
        (None, None) => None,
    };
    let mut value = read_body(&headers, body, prev_len.unwrap_or(0) + MAX_VALUE_BYTES).await?;
    if let Some(n) = prev_len {
        if value.len() < n {
            return Err(ApiError::bad_request(format!(
                "{PREV_VALUE_LENGTH_HEADER} is {n} but the body has only {} bytes",
                value.len()
            )));
        }
        let new_value = value.split_off(n);
        expect = Some(Expect::Value(value));
        value = new_value;
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(value_too_large());
    }
    let create_only = matches!(expect, Some(Expect::Absent));
    let command = match expect {
        None => KvCommand::Put { key, value },
        Some(expect) => KvCommand::Cas { key, expect, value },
    };
    let (index, response) = write(&state, &headers, command).await?;
    match response {
        KvResponse::Written => Ok(Json(IndexBody { index }).into_response()),
        KvResponse::CasFailed { current } => Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            match current {
                None => "compare failed: the key does not exist".to_string(),
                Some(_) if create_only => {
                    "compare failed: the key already exists (prev_exist=false)".to_string()
                }
                Some(_) => "compare failed: the key's value does not match".to_string(),
            },
        )),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected state machine response {other:?}"),
        )),
    }
}

#[derive(Serialize)]
struct DeleteBody {
    index: u64,
    deleted: bool,
}

async fn delete_key(
    State(state): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    Params::parse(&uri, &[])?;
    let key = key_of(&uri)?;
    refuse_reserved(&key)?;
    let state = state.for_key(&key);
    let (index, response) = write(&state, &headers, KvCommand::Delete { key }).await?;
    match response {
        KvResponse::Deleted { existed } => Ok(Json(DeleteBody {
            index,
            deleted: existed,
        })
        .into_response()),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected state machine response {other:?}"),
        )),
    }
}

#[derive(Serialize)]
struct IncrBody {
    index: u64,
    value: i64,
}

/// `POST /v1/kv/{key}?incr=N`: adds N (default 1) to the decimal integer
/// the key holds (absent: 0).
async fn incr_key(
    State(state): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let query = Params::parse(&uri, &["incr"])?;
    let by = match query.text("incr")? {
        None => {
            return Err(ApiError::bad_request(
                "POST on a key needs ?incr=N (the only operation it does)",
            ))
        }
        Some("") => 1,
        Some(n) => n.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!("incr must be a signed 64-bit integer, not {n:?}"))
        })?,
    };
    let key = key_of(&uri)?;
    refuse_reserved(&key)?;
    let state = state.for_key(&key);
    let (index, response) = write(&state, &headers, KvCommand::Incr { key, by }).await?;
    match response {
        KvResponse::Incremented { value } => Ok(Json(IncrBody { index, value }).into_response()),
        KvResponse::NotANumber => Err(ApiError::new(
            StatusCode::CONFLICT,
            "the key's value is not a decimal 64-bit integer, or the sum overflows; nothing changed",
        )),
        other => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected state machine response {other:?}"),
        )),
    }
}

#[derive(Serialize)]
struct Item {
    key: String,
    value: String,
}

async fn list(State(state): State<Shared>, uri: Uri, headers: HeaderMap) -> ApiResult<Response> {
    let query = Params::parse(
        &uri,
        &["prefix", "limit", "encoding", "consistency", "start_after"],
    )?;
    let stale = query.stale()?;
    let prefix = query.bytes("prefix").unwrap_or_default().to_vec();
    let start_after = query.bytes("start_after").map(<[u8]>::to_vec);
    let limit = match query.text("limit")? {
        None => DEFAULT_LIST_LIMIT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_LIST_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "limit must be an integer from 1 to {MAX_LIST_LIMIT}, not {s:?}"
                )))
            }
        },
    };
    let base64 = match query.text("encoding")? {
        None | Some("utf8") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "encoding must be \"utf8\" or \"base64\", not {other:?}"
            )))
        }
    };
    // On the apply task this only takes references (the store shares its
    // buffers); the bytes are copied into the response here.
    // A split member asks each group for its share of the page only.
    let (group_limit, group_bytes) =
        crate::groups::share_of_page(limit, MAX_LIST_BYTES, state.key_groups.len().max(1));
    let list_page = move |kv: &KvStore| {
        kv.list_page(
            &prefix,
            start_after.as_deref(),
            group_limit,
            group_bytes,
            RESERVED_PREFIX,
        )
    };
    let page = if state.key_groups.is_empty() {
        if !stale {
            if let Some(url) = route(&state, &headers).await? {
                return forward_to(&state, &url, "GET", &uri, None, b"").await;
            }
        }
        read(&state, stale, list_page).await?
    } else {
        // Every group's page, read here (a ReadIndex works on followers),
        // merged in key order.
        let mut reads = tokio::task::JoinSet::new();
        for group in &state.key_groups {
            let (group, list_page) = (group.clone(), list_page.clone());
            reads.spawn(async move { read(&group, stale, list_page).await });
        }
        let mut pages = Vec::with_capacity(state.key_groups.len());
        while let Some(page) = reads.join_next().await {
            pages.push(page.map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("listing: {e}"))
            })??);
        }
        crate::groups::merge_pages(pages, limit, MAX_LIST_BYTES)
    };
    let text = |b: &[u8]| {
        if base64 {
            base64::engine::general_purpose::STANDARD.encode(b)
        } else {
            String::from_utf8_lossy(b).into_owned()
        }
    };
    let mut response = Json(
        page.entries
            .iter()
            .map(|(k, v)| Item {
                key: text(k),
                value: text(v),
            })
            .collect::<Vec<_>>(),
    )
    .into_response();
    response.headers_mut().insert(
        LIST_MORE_HEADER,
        axum::http::HeaderValue::from_static(if page.more { "true" } else { "false" }),
    );
    if page.more {
        if let Some((last, _)) = page.entries.last() {
            // Percent-encoded: only ASCII, so always a valid header value.
            if let Ok(v) = axum::http::HeaderValue::from_str(&percent_encode(last)) {
                response.headers_mut().insert(LIST_NEXT_HEADER, v);
            }
        }
    }
    Ok(response)
}

/// One entry of `GET /cluster/nodes`.
#[derive(Debug, Serialize)]
struct NodeItem {
    #[serde(with = "id_json")]
    id: u64,
    name: Option<String>,
    role: &'static str,
    peer_addr: Option<String>,
    api_url: Option<String>,
}

/// Body of `GET /cluster/nodes`.
#[derive(Debug, Serialize)]
struct NodesBody {
    leader: Option<String>,
    nodes: Vec<NodeItem>,
}

/// The members in this node's view: Raft's membership for ids and roles,
/// the member records for names and addresses.
async fn cluster_nodes(State(state): State<Shared>) -> ApiResult<Json<NodesBody>> {
    let s = state.node.status().await.ok_or_else(shutting_down)?;
    let records = state
        .config
        .members
        .refresh(&state.records)
        .await
        .unwrap_or_else(|| state.config.members.all());
    let mut ids: Vec<u64> = s.voters.iter().chain(&s.learners).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let nodes = ids
        .into_iter()
        .map(|id| {
            let role = if Some(id) == s.leader {
                "leader"
            } else if id == s.id {
                match s.role {
                    Role::PreCandidate => "candidate",
                    r => role_name(r),
                }
            } else if s.learners.contains(&id) {
                "learner"
            } else if s.leader.is_some() {
                "follower"
            } else {
                "unknown"
            };
            let m = records.get(&id);
            NodeItem {
                id,
                name: m.map(|m| m.name.clone()),
                role,
                peer_addr: m.map(|m| m.peer_addr.clone()),
                api_url: m.map(|m| m.api_url.clone()),
            }
        })
        .collect();
    Ok(Json(NodesBody {
        leader: s
            .leader
            .and_then(|l| records.get(&l))
            .map(|m| m.name.clone()),
        nodes,
    }))
}

// ---------- membership ----------

/// Body of `POST /cluster/members`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AddMember {
    /// Absent: a pending slot for whoever joins at `peer_addr` (see
    /// [`crate::members`], "Members added by peer address").
    #[serde(default)]
    name: Option<String>,
    peer_addr: String,
    /// Required with a name.
    #[serde(default)]
    api_url: Option<String>,
    #[serde(default)]
    learner: bool,
}

/// Answer of `POST /cluster/members` without a name.
#[derive(Debug, Serialize, serde::Deserialize)]
pub(crate) struct PendingBody {
    #[serde(with = "id_json")]
    pub(crate) id: u64,
    pub(crate) peer_addr: String,
    pub(crate) learner: bool,
    pub(crate) pending: bool,
}

/// Body of `POST /cluster/transfer-leader`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferTo {
    to: String,
}

/// Answer of the membership routes.
#[derive(Debug, Serialize)]
struct MembershipBody {
    #[serde(with = "id_json")]
    id: u64,
    name: String,
    #[serde(serialize_with = "id_json::list")]
    voters: Vec<u64>,
    #[serde(serialize_with = "id_json::list")]
    learners: Vec<u64>,
}

fn json_of<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, message)
}

fn conf_error(state: &AppState, e: ConfChangeError) -> ApiError {
    match e {
        ConfChangeError::NotLeader { leader_hint } => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "leadership moved during the membership change; retry".into(),
            leader: leader_hint
                .and_then(|l| state.config.members.get(l))
                .map(|m| m.api_url),
            leader_id: leader_hint,
        },
        ConfChangeError::UnknownNode(id) => {
            ApiError::new(StatusCode::NOT_FOUND, format!("node {id} is not a member"))
        }
        e @ (ConfChangeError::AlreadyMember(_)
        | ConfChangeError::NotLearner(_)
        | ConfChangeError::NoVoterLeft
        | ConfChangeError::InProgress
        | ConfChangeError::LearnerNotCaughtUp { .. }) => conflict(e.to_string()),
        ConfChangeError::Dropped { in_flight } => ApiError::unavailable(if in_flight {
            "the membership change was dropped in flight; it may or may not be applied"
        } else {
            "the membership change was dropped; retry"
        }),
        ConfChangeError::Shutdown => shutting_down(),
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

/// The member `name` of the current membership: its id, and whether it
/// is a learner. 404 if it is not a member.
async fn member_of(state: &AppState, name: &str) -> ApiResult<(u64, bool)> {
    crate::serve::parse_name(name).map_err(ApiError::bad_request)?;
    let id = member_id(&state.config.token, name);
    let s = state.node.status().await.ok_or_else(shutting_down)?;
    if s.voters.contains(&id) {
        Ok((id, false))
    } else if s.learners.contains(&id) {
        Ok((id, true))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown member {name:?}"),
        ))
    }
}

fn membership_body(id: u64, name: &str, cs: ConfState) -> Response {
    Json(MembershipBody {
        id,
        name: name.to_string(),
        voters: cs.voters,
        learners: cs.learners,
    })
    .into_response()
}

/// Runs a membership change, retrying while another one is in progress or
/// the learner is catching up, up to the request timeout.
/// A membership change as a split member applies it in every group
/// (`crate::groups`): in group 1 as with one group, in each other group
/// at that group's leader (`POST /cluster/groups/{g}/change`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum GroupChange {
    AddVoter,
    AddLearner,
    Promote,
    Remove,
}

/// Body of `POST /cluster/groups/{g}/change` (member to member).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct GroupChangeBody {
    change: GroupChange,
    #[serde(with = "id_json")]
    id: u64,
    /// The member's record (JSON) for an add; empty otherwise.
    context: String,
}

/// Runs `change` on `node` (its group's leader). A change already made
/// there (a voter added again, a member already gone, a learner already
/// promoted) counts as made, so that an interrupted change can be sent
/// again until every group has it.
async fn apply_change(
    node: &Node<KvStore>,
    change: GroupChange,
    id: u64,
    context: &[u8],
) -> Result<ConfState, ConfChangeError> {
    let result = match change {
        GroupChange::AddVoter => node.add_voter(id, context.to_vec()).await,
        GroupChange::AddLearner => node.add_learner(id, context.to_vec()).await,
        GroupChange::Promote => node.promote_learner(id).await,
        GroupChange::Remove => node.remove_node(id).await,
    };
    match (change, result) {
        (
            GroupChange::AddVoter | GroupChange::AddLearner,
            Err(ConfChangeError::AlreadyMember(_)),
        )
        | (GroupChange::Remove, Err(ConfChangeError::UnknownNode(_)))
        | (GroupChange::Promote, Err(ConfChangeError::NotLearner(_))) => {
            let st = node.status().await.ok_or(ConfChangeError::Shutdown)?;
            Ok(ConfState {
                voters: st.voters,
                learners: st.learners,
                ..Default::default()
            })
        }
        (_, result) => result,
    }
}

/// Applies `change` in groups 2..=G (nothing with one group), each at its
/// leader: here, or forwarded to the member leading it. A group whose
/// leader moves meanwhile is tried again, up to the request timeout.
async fn change_every_other_group(
    state: &AppState,
    change: GroupChange,
    id: u64,
    context: &[u8],
) -> ApiResult<()> {
    for (g, group) in (1u64..).zip(&state.key_groups).skip(1) {
        let deadline = Instant::now() + state.config.request_timeout;
        loop {
            let attempt = match route(group, &HeaderMap::new()).await? {
                None => change_membership(group, || apply_change(&group.node, change, id, context))
                    .await
                    .map(|_| ()),
                Some(url) => {
                    let body = serde_json::to_value(GroupChangeBody {
                        change,
                        id,
                        context: String::from_utf8_lossy(context).into_owned(),
                    })
                    .expect("serializable");
                    let path = format!("/cluster/groups/{g}/change");
                    forward_json::<serde_json::Value>(state, &url, "POST", &path, &body)
                        .await
                        .map(|_| ())
                }
            };
            match attempt {
                Ok(()) => break,
                Err(e)
                    if e.status == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(mut e) => {
                    e.message = format!(
                        "group {g}: {} (the change is made in the groups before it; send it \
                         again to finish it)",
                        e.message
                    );
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// `POST /cluster/groups/{g}/change`: one group's part of a membership
/// change, sent by the member that runs the change to the member leading
/// group `g` (503 where it does not lead it).
async fn change_group(
    State(state): State<Shared>,
    caller: Caller,
    axum::extract::Path(g): axum::extract::Path<u64>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    Params::parse(&uri, &[])?;
    authorize_admin(&state, &caller, &headers)?;
    let group = usize::try_from(g)
        .ok()
        .and_then(|g| g.checked_sub(1))
        .and_then(|i| state.key_groups.get(i))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no group {g} here")))?;
    let raw = read_body(&headers, body, MAX_VALUE_BYTES).await?;
    let req: GroupChangeBody = json_of(&raw)?;
    if group.node.leader() != Some(group.node.id()) {
        return Err(ApiError::unavailable(format!(
            "this member does not lead group {g}"
        )));
    }
    let cs = change_membership(group, || {
        apply_change(&group.node, req.change, req.id, req.context.as_bytes())
    })
    .await?;
    tracing::info!(group = g, id = req.id, change = ?req.change, "group membership changed");
    Ok(membership_body(req.id, "", cs))
}

async fn change_membership<F, Fut>(state: &AppState, mut change: F) -> ApiResult<ConfState>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<ConfState, ConfChangeError>>,
{
    let deadline = Instant::now() + state.config.request_timeout;
    loop {
        match change().await {
            Ok(cs) => return Ok(cs),
            Err(ConfChangeError::InProgress | ConfChangeError::LearnerNotCaughtUp { .. })
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(conf_error(state, e)),
        }
    }
}

/// `POST /cluster/members`: publishes the new member's record, then adds
/// it (learner or voter) with the record as the change's context. Without
/// a name, reserves a pending slot at the peer address instead.
async fn add_member(
    State(state): State<Shared>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    Params::parse(&uri, &[])?;
    authorize_admin(&state, &caller, &headers)?;
    let raw = read_body(&headers, body, MAX_VALUE_BYTES).await?;
    let req: AddMember = json_of(&raw)?;
    let Some(name) = req.name else {
        state.refuse_split("adding a member by peer address alone (add it by name)")?;
        if req.api_url.is_some() {
            return Err(ApiError::bad_request(
                "api_url comes with a name: a member added by peer address alone publishes \
                 its own",
            ));
        }
        let slot = add_pending(&state, &headers, req.peer_addr, req.learner).await?;
        return Ok(Json(slot).into_response());
    };
    let api_url = req
        .api_url
        .ok_or_else(|| ApiError::bad_request("a member added by name needs its api_url"))?;
    let id = member_id(&state.config.token, &name);
    let info = MemberInfo {
        name: name.clone(),
        id,
        peer_addr: req.peer_addr.clone(),
        api_url,
        moved: false,
    };
    // The same checks as a record a member sends about itself.
    crate::members::check_record(&state.config.token, &info).map_err(ApiError::bad_request)?;
    if let Some(url) = route(&state, &headers).await? {
        return forward_to(&state, &url, "POST", &uri, Some("application/json"), &raw).await;
    }
    let s = state.node.status().await.ok_or_else(shutting_down)?;
    // Split over groups, an add that stopped part-way (group 1 took it,
    // not every other group) is finished by sending it again.
    let resumed = state.groups > 1
        && (s.voters.contains(&id) && !req.learner || s.learners.contains(&id) && req.learner);
    if (s.voters.contains(&id) || s.learners.contains(&id)) && !resumed {
        return Err(conflict(format!("{name:?} is already a member")));
    }
    peer_addr_free(&state, &req.peer_addr, Some(id)).await?;
    let record = serde_json::to_vec(&info).expect("serializable");
    state
        .node
        .set_peer_address(id, req.peer_addr.clone())
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    propose(
        &state,
        KvCommand::Put {
            key: member_key(&info.name),
            value: record.clone(),
        },
    )
    .await?;
    let learner = req.learner;
    let change = if learner {
        GroupChange::AddLearner
    } else {
        GroupChange::AddVoter
    };
    let cs = change_membership(&state, || apply_change(&state.node, change, id, &record)).await?;
    change_every_other_group(&state, change, id, &record).await?;
    tracing::info!(name = %info.name, id, learner, "member added");
    Ok(membership_body(id, &info.name, cs))
}

/// The nameless form of `POST /cluster/members`: a pending slot that the
/// member joining at `peer_addr` takes (see [`crate::members`]). Runs on
/// the leader (forwarded there from a follower).
pub(crate) async fn add_pending(
    state: &AppState,
    headers: &HeaderMap,
    peer_addr: String,
    learner: bool,
) -> ApiResult<PendingBody> {
    crate::cluster::parse_host_port(&peer_addr).map_err(ApiError::bad_request)?;
    if state.config.peer_names_checked {
        return Err(conflict(
            "peer TLS binds certificates to member names, and a member added by its peer \
             address alone has none yet: add it by name (raftwork member add)",
        ));
    }
    if let Some(url) = route(state, headers).await? {
        let body = serde_json::json!({"peer_addr": peer_addr, "learner": learner});
        return forward_json(state, &url, "POST", "/cluster/members", &body).await;
    }
    peer_addr_free(state, &peer_addr, None).await?;
    let slot = Slot {
        id: crate::members::slot_id(&state.config.token, &peer_addr),
        peer_addr: peer_addr.clone(),
        learner,
        claimed_by: None,
        dropped: false,
    };
    // Replaces a claimed or dropped slot at the address, unless it changed
    // meanwhile (a slot only changes by compare-and-set).
    let expect = match state.config.members.slots().get(&peer_addr) {
        Some(old) => Expect::Value(old.encode()),
        None => Expect::Absent,
    };
    crate::members::cas(
        &state.node,
        crate::members::pending_key(&peer_addr),
        expect,
        slot.encode(),
    )
    .await
    .map_err(|e| {
        conflict(format!(
            "the slot at {peer_addr} changed meanwhile ({e}); retry"
        ))
    })?;
    state.config.members.refresh(&state.records).await;
    tracing::info!(peer_addr = %peer_addr, id = slot.id, learner, "member added by peer address");
    Ok(PendingBody {
        id: slot.id,
        peer_addr,
        learner,
        pending: true,
    })
}

/// `DELETE /cluster/pending/{peer_addr}`: drops the slot waiting at the
/// address (a member added by peer address and never started, removed).
async fn remove_pending(
    State(state): State<Shared>,
    caller: Caller,
    axum::extract::Path(peer_addr): axum::extract::Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    state.refuse_split("pending member slots (DELETE /cluster/pending/...)")?;
    Params::parse(&uri, &[])?;
    authorize_admin(&state, &caller, &headers)?;
    if let Some(url) = route(&state, &headers).await? {
        return forward_to(&state, &url, "DELETE", &uri, None, b"").await;
    }
    drop_pending(&state, &peer_addr).await?;
    Ok(Json(serde_json::json!({"dropped": peer_addr})).into_response())
}

/// On the leader: drops the slot waiting at `peer_addr`. 404 if none waits
/// there; 409 if its member took it meanwhile (remove the member then).
pub(crate) async fn drop_pending(state: &AppState, peer_addr: &str) -> ApiResult<()> {
    state.config.members.refresh(&state.records).await;
    let Some(slot) = state.config.members.waiting().remove(peer_addr) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no member waits at {peer_addr}"),
        ));
    };
    crate::members::drop_slot(&state.node, &slot)
        .await
        .map_err(|e| {
            conflict(format!(
                "the member added at {peer_addr} is joining ({e}); remove it once it has joined"
            ))
        })?;
    tracing::info!(peer_addr = %peer_addr, "member added by peer address removed before it joined");
    Ok(())
}

/// 409 unless `peer_addr` is free: no member (but `except`) and no pending
/// slot has it.
async fn peer_addr_free(state: &AppState, peer_addr: &str, except: Option<u64>) -> ApiResult<()> {
    let members = &state.config.members;
    members.refresh(&state.records).await;
    if members
        .all()
        .values()
        .any(|m| m.peer_addr == peer_addr && Some(m.id) != except)
        || members.waiting().contains_key(peer_addr)
    {
        return Err(conflict(format!(
            "a member already has the peer address {peer_addr}"
        )));
    }
    Ok(())
}

/// Body of `PUT /cluster/members/{name}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateMember {
    peer_addr: String,
}

/// `PUT /cluster/members/{name}` with `{"peer_addr"}`.
async fn update_member(
    State(state): State<Shared>,
    caller: Caller,
    axum::extract::Path(name): axum::extract::Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    state.refuse_split("moving a member to another peer address (PUT /cluster/members/{name})")?;
    Params::parse(&uri, &[])?;
    authorize_admin(&state, &caller, &headers)?;
    let raw = read_body(&headers, body, MAX_VALUE_BYTES).await?;
    let req: UpdateMember = json_of(&raw)?;
    let record = update_peer_addr(&state, &headers, &name, req.peer_addr).await?;
    // The stored record keeps its numeric id; the answer's is a string.
    let mut v = serde_json::to_value(&record).expect("serializable");
    v["id"] = serde_json::Value::String(record.id.to_string());
    Ok(Json(v).into_response())
}

/// Moves member `name`'s peer address in its record (etcd's
/// `MemberUpdate`): every node dials it there from then on, and the member
/// itself follows the record (see [`crate::members`]) until it is restarted
/// at the new address. Runs on the leader.
pub(crate) async fn update_peer_addr(
    state: &AppState,
    headers: &HeaderMap,
    name: &str,
    peer_addr: String,
) -> ApiResult<MemberInfo> {
    crate::cluster::parse_host_port(&peer_addr).map_err(ApiError::bad_request)?;
    if let Some(url) = route(state, headers).await? {
        let body = serde_json::json!({"peer_addr": peer_addr});
        let path = format!("/cluster/members/{name}");
        return forward_json(state, &url, "PUT", &path, &body).await;
    }
    let (id, _) = member_of(state, name).await?;
    peer_addr_free(state, &peer_addr, Some(id)).await?;
    let mut record = state.config.members.get(id).ok_or_else(|| {
        conflict(format!(
            "{name:?} has not published its record yet; retry once it has"
        ))
    })?;
    let before = serde_json::to_vec(&record).expect("serializable");
    record.peer_addr = peer_addr;
    record.moved = true;
    // Against the record as read: a member's own republishing meanwhile
    // makes this fail (retry), never silently undoes it.
    crate::members::cas(
        &state.node,
        member_key(name),
        Expect::Value(before),
        serde_json::to_vec(&record).expect("serializable"),
    )
    .await
    .map_err(|e| conflict(format!("{name:?}'s record changed meanwhile ({e}); retry")))?;
    if id != state.node.id() {
        state
            .node
            .set_peer_address(id, record.peer_addr.clone())
            .await
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    state.config.members.refresh(&state.records).await;
    tracing::info!(name = %name, id, peer_addr = %record.peer_addr, "member's peer address updated");
    Ok(record)
}

/// The leader's API URL, or `None` if this node leads (see [`route`]).
pub(crate) async fn leader_url(state: &AppState) -> ApiResult<Option<String>> {
    route(state, &HeaderMap::new()).await
}

/// Sends the membership change `method path` (a REST route without a
/// body) to the leader at `url`; its error, if any, as is.
pub(crate) async fn forward_change(
    state: &AppState,
    url: &str,
    method: &str,
    path: &str,
) -> ApiResult<()> {
    forward_json::<serde_json::Value>(state, url, method, path, &serde_json::json!({}))
        .await
        .map(drop)
}

/// Sends a membership request to the leader at `url` and parses its JSON
/// answer; an error answer keeps its status and message.
async fn forward_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    url: &str,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> ApiResult<T> {
    let body = serde_json::to_vec(body).expect("serializable");
    let timeout = state.config.request_timeout;
    let r = state
        .config
        .http
        .request(url, method, path, Some("application/json"), &body, timeout)
        .await
        .map_err(|e| {
            ApiError::unavailable(format!(
                "forwarding to the leader failed ({e}); the change may or may not be applied"
            ))
        })?;
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_success() {
        return serde_json::from_slice(&r.body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the leader's answer is malformed: {e}"),
            )
        });
    }
    Err(ApiError::new(status, r.error_message()))
}

/// `POST /cluster/members/{name}/promote`.
async fn promote_member(
    State(state): State<Shared>,
    caller: Caller,
    axum::extract::Path(name): axum::extract::Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    Params::parse(&uri, &[])?;
    authorize_admin(&state, &caller, &headers)?;
    if let Some(url) = route(&state, &headers).await? {
        return forward_to(&state, &url, "POST", &uri, None, b"").await;
    }
    let (id, learner) = member_of(&state, &name).await?;
    if !learner && state.groups == 1 {
        return Err(conflict(format!("{name:?} is already a voter")));
    }
    // Every other group first: group 1 says whether it is done.
    change_every_other_group(&state, GroupChange::Promote, id, b"").await?;
    let cs = change_membership(&state, || {
        apply_change(&state.node, GroupChange::Promote, id, b"")
    })
    .await?;
    tracing::info!(name = %name, id, "member promoted");
    Ok(membership_body(id, &name, cs))
}

/// `DELETE /cluster/members/{name}`: removes the member, then its record.
async fn remove_member(
    State(state): State<Shared>,
    caller: Caller,
    axum::extract::Path(name): axum::extract::Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    Params::parse(&uri, &[])?;
    authorize_admin(&state, &caller, &headers)?;
    if let Some(url) = route(&state, &headers).await? {
        return forward_to(&state, &url, "DELETE", &uri, None, b"").await;
    }
    let (id, _) = member_of(&state, &name).await?;
    // Every other group first: group 1 holds the record, and a member
    // removed from it stops (so it must be the last).
    change_every_other_group(&state, GroupChange::Remove, id, b"").await?;
    let cs = remove_here(&state, id, Some(&name)).await?;
    Ok(membership_body(id, &name, cs))
}

/// On the leader: removes member `id`, then its record (named `name`) and
/// the aliases of its id (see [`crate::members`]).
pub(crate) async fn remove_here(
    state: &AppState,
    id: u64,
    name: Option<&str>,
) -> ApiResult<ConfState> {
    let cs = change_membership(state, || state.node.remove_node(id)).await?;
    tracing::info!(name = ?name, id, "member removed");
    // Best effort (a leader that removed itself no longer leads): the
    // record goes, and the slot the member took is dropped, so that the
    // member cannot join through it again.
    if let Some(name) = name {
        if let Err(e) = propose(
            state,
            KvCommand::Delete {
                key: member_key(name),
            },
        )
        .await
        {
            tracing::warn!(name = %name, error = %e.message, "the removed member's record stays");
        }
    }
    state.config.members.refresh(&state.records).await;
    for slot in state.config.members.slots().into_values() {
        if slot.claimed_by != Some(id) || slot.dropped {
            continue;
        }
        if let Err(e) = crate::members::drop_slot(&state.node, &slot).await {
            tracing::warn!(id, error = %e, "the removed member's slot stays");
        }
    }
    Ok(cs)
}

/// `POST /cluster/transfer-leader` with `{"to": name}`.
async fn transfer_leader(
    State(state): State<Shared>,
    caller: Caller,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    state.refuse_split("leadership transfer")?;
    Params::parse(&uri, &[])?;
    authorize_admin(&state, &caller, &headers)?;
    let raw = read_body(&headers, body, MAX_VALUE_BYTES).await?;
    let req: TransferTo = json_of(&raw)?;
    crate::serve::parse_name(&req.to).map_err(ApiError::bad_request)?;
    if let Some(url) = route(&state, &headers).await? {
        return forward_to(&state, &url, "POST", &uri, Some("application/json"), &raw).await;
    }
    let (id, learner) = member_of(&state, &req.to).await?;
    if learner {
        return Err(conflict(format!("{:?} is a learner, not a voter", req.to)));
    }
    if id != state.node.id() {
        state.node.transfer_leader(id).await.map_err(|e| match e {
            TransferError::NotLeader { leader_hint } => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "this node no longer leads; retry".into(),
                leader: leader_hint
                    .and_then(|l| state.config.members.get(l))
                    .map(|m| m.api_url),
                leader_id: leader_hint,
            },
            e @ (TransferError::NotVoter(_) | TransferError::InProgress) => conflict(e.to_string()),
            TransferError::Timeout => ApiError::unavailable(
                "the transfer timed out; leadership may have moved or stayed, see /cluster/nodes",
            ),
            TransferError::Shutdown => shutting_down(),
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        })?;
        tracing::info!(to = %req.to, id, "leadership transferred");
    }
    Ok(Json(serde_json::json!({"leader": req.to, "id": id.to_string()})).into_response())
}
