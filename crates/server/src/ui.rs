//! The status page: `GET /ui` on every node (issue 16, item 5).
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /ui` (also `/ui/`) | the page (HTML); `/ui/app.js` and `/ui/style.css` its script and style |
//! | `GET /v1/ui/node` | this node's own view ([`NodeView`]): status, the leader's match indexes, WAL size, write rate and latency, recent events |
//! | `GET /v1/ui/overview` | the whole cluster as this node gathers it ([`Overview`]) |
//!
//! # Design
//! * **Self-contained.** The page is plain HTML, CSS and vanilla JS in
//!   `src/ui/`, compiled into the binary with `include_str!`: no CDN, no
//!   npm build, nothing fetched from anywhere but the node that serves it.
//!   Its answers carry a `Content-Security-Policy` that allows only this
//!   origin, so a stray external reference would not load either.
//! * **Gathered on the server.** The page polls `/v1/ui/overview` about
//!   once a second and renders it with plain DOM calls. The node it asked
//!   fetches every other member's `/v1/ui/node` concurrently over the
//!   server's pooled client ([`crate::forward`]: HTTPS with the cluster's
//!   CA and the member's own certificate when the API is on TLS), each
//!   within [`FETCH_TIMEOUT`] (or the request timeout, if shorter); a
//!   member that does not answer is marked unreachable with the reason.
//!   The browser therefore talks to one node only, and any node's page
//!   shows the whole cluster. Members come from this node's membership
//!   (voters and learners) and their API URLs from the member records
//!   ([`crate::members`]).
//! * **`/v1/ui/node` rather than `/v1/status`.** A member's lag needs the
//!   leader's match indexes (`Status::followers_matched`), which
//!   `/v1/status` does not carry, and each member's WAL size, write rate
//!   and events live only in that member; one small local route gives
//!   them all, so `/v1/status` stays as it is.
//! * **Lag** of a member is the leader's last index minus the leader's
//!   match index for that member, both from the view of the member that
//!   says it leads (the reachable one with the highest term); with no such
//!   view, lag is unknown (null).
//! * **Leader** and the **banners** ("no leader", "removed") are this
//!   node's own view, the one its API acts on.
//! * **Events** ([`EVENTS_KEPT`] newest, with wall-clock times) come from
//!   [`Node::subscribe`]: leader changes, applied membership changes and
//!   this node's removal, as this node saw them.
//! * **Write rate and p99** ([`WriteWindow`]): the latency of each write
//!   (put, delete, compare-and-set, increment, and the etcd API's writes)
//!   taken by this node's API, from the request entering the write path
//!   ([`crate::api::write`]) to its answer from the state machine, counted
//!   over the last [`WINDOW_SECS`] whole seconds. Only writes that got an
//!   answer count; a write forwarded here by another member is counted by
//!   the member the client sent it to, not twice. The overview's cluster
//!   rate is the sum of the members' rates.
//! * **Auth** is that of `/v1/status`: whoever may reach the API (with
//!   `--client-cert-auth`, any client certificate from the trusted CA; no
//!   admin identity needed). The routes only read.
//! * **WAL size**: the segment files (`*.wal`) in `<data dir>/wal`, their
//!   size on disk, read when the view is asked for.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hdrhistogram::Histogram;
use raftwork::{Node, NodeEvent};
use serde::{Deserialize, Serialize};

use crate::api::{role_of, shutting_down, ApiResult, AppState, Shared};
use crate::kv::KvStore;

/// Whole seconds of writes the rate and latencies cover.
pub const WINDOW_SECS: u64 = 10;
/// Events a node keeps for its page (the newest).
pub const EVENTS_KEPT: usize = 50;
/// How long the overview waits for another member's view.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(1);

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE_CSS: &str = include_str!("ui/style.css");

/// Only this origin: the page loads nothing from anywhere else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The page's routes, on the API's state.
pub(crate) fn routes(state: Shared) -> Router {
    Router::new()
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/app.js", get(script))
        .route("/ui/style.css", get(style))
        .route("/v1/ui/node", get(node_view))
        .route("/v1/ui/overview", get(overview))
        .with_state(state)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

// ---------- what the server keeps for the page ----------

/// The page's state in the API: the write window and the events ring.
pub(crate) struct UiState {
    /// Latencies of the writes this node's API took.
    pub(crate) writes: WriteWindow,
    events: Arc<Mutex<VecDeque<UiEvent>>>,
    data_dir: Option<PathBuf>,
}

impl UiState {
    /// Starts keeping `node`'s events (in a task that ends when the node
    /// stops; none outside a tokio runtime). `data_dir`: where the WAL is,
    /// if known.
    pub(crate) fn start(node: &Node<KvStore>, data_dir: Option<PathBuf>) -> Self {
        let events = Arc::new(Mutex::new(VecDeque::with_capacity(EVENTS_KEPT)));
        push(
            &events,
            UiEvent {
                kind: "started".into(),
                ..UiEvent::now()
            },
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let mut rx = node.subscribe();
            let node = node.clone();
            let ring = events.clone();
            runtime.spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                let stopped = node.stopped();
                tokio::pin!(stopped);
                loop {
                    let event = tokio::select! {
                        event = rx.recv() => event,
                        _ = &mut stopped => return,
                    };
                    match event {
                        Ok(e) => {
                            if let Some(e) = UiEvent::of(&e) {
                                push(&ring, e);
                            }
                        }
                        Err(RecvError::Lagged(n)) => push(
                            &ring,
                            UiEvent {
                                kind: "missed".into(),
                                missed: Some(n),
                                ..UiEvent::now()
                            },
                        ),
                        Err(RecvError::Closed) => return,
                    }
                }
            });
        }
        Self {
            writes: WriteWindow::new(),
            events,
            data_dir,
        }
    }

    fn events(&self) -> Vec<UiEvent> {
        lock(&self.events).iter().cloned().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn push(ring: &Mutex<VecDeque<UiEvent>>, event: UiEvent) {
    let mut ring = lock(ring);
    if ring.len() == EVENTS_KEPT {
        ring.pop_front();
    }
    ring.push_back(event);
}

/// One event a node saw. Ids are decimal strings, as in the rest of the API.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UiEvent {
    /// Wall-clock time, Unix milliseconds.
    pub unix_ms: u64,
    /// `started` (the API started), `leader` (the known leader changed),
    /// `membership` (a membership change applied), `removed` (this node
    /// applied its own removal), `missed` (events lost to a slow reader).
    pub kind: String,
    /// `leader`: the new leader, null when none is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// `leader`: the term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    /// `membership`: the single changes, `{"op": "add-voter" | "add-learner"
    /// | "remove", "id"}` (empty when leaving a joint configuration).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    /// `membership`: the voters after the change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub voters: Vec<String>,
    /// `membership`: the learners after the change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learners: Vec<String>,
    /// `missed`: how many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<u64>,
}

/// One single membership change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    /// `add-voter` (also a learner's promotion), `add-learner`, `remove`.
    pub op: String,
    /// The member.
    pub id: String,
}

impl UiEvent {
    fn now() -> Self {
        Self {
            unix_ms: unix_ms(SystemTime::now()),
            ..Self::default()
        }
    }

    /// The page's record of `event`; `None` for what the page does not show
    /// (notes between members).
    fn of(event: &NodeEvent) -> Option<Self> {
        Some(match event {
            NodeEvent::LeaderChanged { leader, term } => Self {
                kind: "leader".into(),
                leader: leader.map(|l| l.to_string()),
                term: Some(*term),
                ..Self::now()
            },
            NodeEvent::MembershipChanged {
                conf_state,
                changes,
                ..
            } => Self {
                kind: "membership".into(),
                changes: changes
                    .iter()
                    .map(|c| Change {
                        // raft's ConfChangeType: AddNode, AddLearnerNode, RemoveNode.
                        op: match format!("{:?}", c.get_change_type()).as_str() {
                            "AddNode" => "add-voter".into(),
                            "AddLearnerNode" => "add-learner".into(),
                            "RemoveNode" => "remove".into(),
                            other => other.to_string(),
                        },
                        id: c.node_id.to_string(),
                    })
                    .collect(),
                voters: ids(&conf_state.voters),
                learners: ids(&conf_state.learners),
                ..Self::now()
            },
            NodeEvent::Removed => Self {
                kind: "removed".into(),
                ..Self::now()
            },
            NodeEvent::Note { .. } => return None,
        })
    }
}

fn ids(ids: &[u64]) -> Vec<String> {
    ids.iter().map(u64::to_string).collect()
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------- write rate and latency ----------

/// Slots of the ring: the second being filled plus [`WINDOW_SECS`] whole ones.
const SLOTS: usize = WINDOW_SECS as usize + 1;

/// A rolling window of write latencies: one histogram per second of the
/// last [`WINDOW_SECS`] (plus the current one), reused in a ring. A record
/// is one short mutex hold and one histogram increment; reading merges the
/// whole seconds.
pub(crate) struct WriteWindow {
    start: Instant,
    slots: Mutex<Vec<Slot>>,
}

struct Slot {
    /// Which second since `start` this slot holds (`u64::MAX`: none yet).
    second: u64,
    /// Latencies in microseconds.
    hist: Histogram<u64>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs to 10 min, 2 significant digits (a write waits at most the
    // request timeout; slower ones count at the top).
    Histogram::new_with_bounds(1, 600_000_000, 2).expect("valid histogram bounds")
}

/// Write rate and latency over the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WriteStats {
    /// Seconds covered (fewer in the first seconds after start).
    pub window_seconds: u64,
    /// Writes answered in the window.
    pub count: u64,
    /// `count / window_seconds`.
    pub rate_per_sec: f64,
    /// Median latency, milliseconds (null with no writes).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, milliseconds (null with no writes).
    pub p99_ms: Option<f64>,
    /// Slowest, milliseconds (null with no writes).
    pub max_ms: Option<f64>,
}

impl WriteWindow {
    pub(crate) fn new() -> Self {
        Self {
            start: Instant::now(),
            slots: Mutex::new(
                (0..SLOTS)
                    .map(|_| Slot {
                        second: u64::MAX,
                        hist: new_hist(),
                    })
                    .collect(),
            ),
        }
    }

    /// Records one answered write that took `latency`.
    pub(crate) fn record(&self, latency: Duration) {
        self.record_at(self.start.elapsed().as_secs(), latency);
    }

    fn record_at(&self, second: u64, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let mut slots = lock(&self.slots);
        let slot = &mut slots[(second % SLOTS as u64) as usize];
        if slot.second != second {
            slot.hist.reset();
            slot.second = second;
        }
        slot.hist.saturating_record(micros);
    }

    /// The last [`WINDOW_SECS`] whole seconds.
    pub(crate) fn stats(&self) -> WriteStats {
        self.stats_at(self.start.elapsed().as_secs())
    }

    fn stats_at(&self, now: u64) -> WriteStats {
        let mut merged = new_hist();
        for slot in lock(&self.slots).iter() {
            if slot.second < now && now - slot.second <= WINDOW_SECS {
                merged.add(&slot.hist).expect("same bounds");
            }
        }
        let window = now.min(WINDOW_SECS);
        let count = merged.len();
        let ms = |q: f64| (count > 0).then(|| merged.value_at_quantile(q) as f64 / 1000.0);
        WriteStats {
            window_seconds: window,
            count,
            rate_per_sec: if window == 0 {
                0.0
            } else {
                count as f64 / window as f64
            },
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            max_ms: (count > 0).then(|| merged.max() as f64 / 1000.0),
        }
    }
}

// ---------- the views ----------

/// `GET /v1/ui/node`: one node's own view. Ids are decimal strings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    /// Raft id.
    pub id: String,
    /// `--name`.
    pub name: String,
    /// As in `/v1/status`: `leader`, `follower`, `candidate`,
    /// `pre-candidate`, `learner` or `removed`.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// The leader this node knows, if any.
    pub leader: Option<String>,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Last log index.
    pub last_index: u64,
    /// Newest snapshot's index.
    pub snapshot_index: u64,
    /// Voters in this node's configuration.
    pub voters: Vec<String>,
    /// Learners in this node's configuration.
    pub learners: Vec<String>,
    /// On the leader: how far each other member's log matches its own.
    pub followers_matched: Vec<Matched>,
    /// The WAL's segments on disk, if the data dir is known.
    pub wal: Option<WalSize>,
    /// Writes taken by this node's API.
    pub writes: WriteStats,
    /// The newest events, oldest first (left out of the overview's
    /// members: the page shows those of the node it asked).
    #[serde(default)]
    pub events: Vec<UiEvent>,
    /// raftwork version.
    pub version: String,
}

/// A follower's match index, as the leader knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Matched {
    /// The member.
    pub id: String,
    /// Highest index known to match the leader's log.
    pub match_index: u64,
}

/// WAL segments on disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WalSize {
    /// Their total size in bytes.
    pub bytes: u64,
    /// How many.
    pub segments: u64,
}

fn wal_size(data_dir: &Path) -> Option<WalSize> {
    let mut size = WalSize {
        bytes: 0,
        segments: 0,
    };
    for entry in std::fs::read_dir(data_dir.join("wal")).ok()?.flatten() {
        let is_segment = entry.file_name().to_string_lossy().ends_with(".wal");
        match entry.metadata() {
            Ok(m) if is_segment && m.is_file() => {
                size.bytes += m.len();
                size.segments += 1;
            }
            _ => {}
        }
    }
    Some(size)
}

async fn local_view(state: &AppState) -> ApiResult<NodeView> {
    let s = state.node.status().await.ok_or_else(shutting_down)?;
    Ok(NodeView {
        id: s.id.to_string(),
        name: state.config.name.clone(),
        role: role_of(&s).into(),
        term: s.term,
        leader: s.leader.map(|l| l.to_string()),
        commit: s.commit_index,
        applied: s.applied_index,
        last_index: s.last_index,
        snapshot_index: s.snapshot_index,
        voters: ids(&s.voters),
        learners: ids(&s.learners),
        followers_matched: s
            .followers_matched
            .iter()
            .map(|&(id, match_index)| Matched {
                id: id.to_string(),
                match_index,
            })
            .collect(),
        wal: state.ui.data_dir.as_deref().and_then(wal_size),
        writes: state.ui.writes.stats(),
        events: state.ui.events(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

async fn node_view(State(state): State<Shared>) -> ApiResult<Json<NodeView>> {
    Ok(Json(local_view(&state).await?))
}

/// `GET /v1/ui/overview`: the cluster as the node asked gathers it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Overview {
    /// When it was gathered, Unix milliseconds.
    pub unix_ms: u64,
    /// The node asked, with its events.
    pub node: NodeView,
    /// The leader this node knows: `{"id", "name"}` (name null while its
    /// record is unknown), or null.
    pub leader: Option<MemberRef>,
    /// Something wrong with this node, shown across the top of the page.
    pub banner: Option<Banner>,
    /// Every member of this node's configuration, by name (then id).
    pub members: Vec<MemberRow>,
    /// Writes per second taken by all the members' APIs that answered.
    pub cluster_write_rate_per_sec: f64,
}

/// A member by id and name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberRef {
    /// Raft id.
    pub id: String,
    /// Name, if its record is known.
    pub name: Option<String>,
}

/// The page's banner.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Banner {
    /// `removed` or `no-leader`.
    pub kind: String,
    /// What to show.
    pub text: String,
}

/// One member in the overview.
#[derive(Debug, Serialize, Deserialize)]
pub struct MemberRow {
    /// Raft id.
    pub id: String,
    /// Name, if its record is known.
    pub name: Option<String>,
    /// API URL, if its record is known.
    pub api_url: Option<String>,
    /// A voter (else a learner).
    pub voter: bool,
    /// The node that answered the overview.
    pub is_self: bool,
    /// Whether its view came.
    pub reachable: bool,
    /// Why not.
    pub error: Option<String>,
    /// Its own view (without events), when reachable.
    pub view: Option<NodeView>,
    /// The leader's match index for it (the leader's last index for the
    /// leader itself), when a leader's view came.
    pub match_index: Option<u64>,
    /// Entries it is behind the leader: the leader's last index minus
    /// `match_index`.
    pub lag: Option<u64>,
}

async fn overview(State(state): State<Shared>) -> ApiResult<Json<Overview>> {
    let me = local_view(&state).await?;
    let records = state.config.members.all();
    let timeout = FETCH_TIMEOUT.min(state.config.request_timeout);
    let mut ids: Vec<u64> = me
        .voters
        .iter()
        .chain(&me.learners)
        .filter_map(|id| id.parse().ok())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    // Every other member's view, fetched at once.
    let fetches: Vec<_> = ids
        .iter()
        .map(|&id| {
            let url = records.get(&id).map(|m| m.api_url.clone());
            let fetch = match &url {
                Some(url) if id.to_string() != me.id => {
                    let (http, url) = (state.config.http.clone(), url.clone());
                    Some(tokio::spawn(async move {
                        fetch_view(&http, &url, timeout).await
                    }))
                }
                _ => None,
            };
            (id, url, fetch)
        })
        .collect();
    let mut members = Vec::with_capacity(fetches.len());
    for (id, api_url, fetch) in fetches {
        let is_self = id.to_string() == me.id;
        let got = match fetch {
            _ if is_self => Ok(NodeView {
                events: Vec::new(),
                ..me.clone()
            }),
            None => Err("its API URL is not known yet (no member record)".to_string()),
            Some(task) => task
                .await
                .unwrap_or_else(|e| Err(format!("fetch failed: {e}"))),
        };
        let (view, error) = match got {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        };
        members.push(MemberRow {
            id: id.to_string(),
            name: records.get(&id).map(|m| m.name.clone()),
            api_url,
            voter: me.voters.contains(&id.to_string()),
            is_self,
            reachable: view.is_some(),
            error,
            view,
            match_index: None,
            lag: None,
        });
    }
    fill_lag(&mut members);
    members.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
    let leader = me.leader.as_ref().map(|id| MemberRef {
        id: id.clone(),
        name: id
            .parse()
            .ok()
            .and_then(|id: u64| records.get(&id))
            .map(|m| m.name.clone()),
    });
    Ok(Json(Overview {
        unix_ms: unix_ms(SystemTime::now()),
        banner: banner(&me),
        leader,
        cluster_write_rate_per_sec: members
            .iter()
            .filter_map(|m| m.view.as_ref())
            .map(|v| v.writes.rate_per_sec)
            .sum(),
        members,
        node: me,
    }))
}

/// A member's view from its API.
async fn fetch_view(
    http: &crate::forward::HttpClient,
    url: &str,
    timeout: Duration,
) -> Result<NodeView, String> {
    let r = http
        .request(url, "GET", "/v1/ui/node", None, b"", timeout)
        .await
        .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("HTTP {}: {}", r.status, r.error_message()));
    }
    let mut view: NodeView =
        serde_json::from_slice(&r.body).map_err(|e| format!("unreadable answer: {e}"))?;
    view.events.clear();
    Ok(view)
}

/// Match index and lag of every member, from the view of the member that
/// says it leads (the highest term's, should two say so).
fn fill_lag(members: &mut [MemberRow]) {
    let Some(leader) = members
        .iter()
        .filter_map(|m| m.view.as_ref())
        .filter(|v| v.role == "leader")
        .max_by_key(|v| v.term)
        .cloned()
    else {
        return;
    };
    for m in members.iter_mut() {
        m.match_index = if m.id == leader.id {
            Some(leader.last_index)
        } else {
            leader
                .followers_matched
                .iter()
                .find(|f| f.id == m.id)
                .map(|f| f.match_index)
        };
        m.lag = m.match_index.map(|i| leader.last_index.saturating_sub(i));
    }
}

/// The banner for a node with this view, if any.
fn banner(me: &NodeView) -> Option<Banner> {
    if me.role == "removed" {
        Some(Banner {
            kind: "removed".into(),
            text: format!(
                "{} was removed from the cluster: it stops (its data dir stays)",
                me.name
            ),
        })
    } else if me.leader.is_none() {
        Some(Banner {
            kind: "no-leader".into(),
            text: format!(
                "{} knows no leader (term {}): writes and linearizable reads wait, then fail",
                me.name, me.term
            ),
        })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_whole_seconds_and_forgets_old_ones() {
        let w = WriteWindow::new();
        assert_eq!(w.stats_at(0).rate_per_sec, 0.0);
        assert_eq!(w.stats_at(5).p99_ms, None);
        // 100 writes in second 3: 99 of 1 ms, one of 200 ms.
        for _ in 0..99 {
            w.record_at(3, Duration::from_millis(1));
        }
        w.record_at(3, Duration::from_millis(200));
        // Not counted while second 3 is still being filled.
        assert_eq!(w.stats_at(3).count, 0);
        let s = w.stats_at(4);
        assert_eq!((s.count, s.window_seconds), (100, 4));
        assert_eq!(s.rate_per_sec, 25.0);
        let p50 = s.p50_ms.unwrap();
        assert!((0.99..=1.01).contains(&p50), "{p50}");
        let p99 = s.p99_ms.unwrap();
        assert!((0.99..=1.01).contains(&p99), "{p99}");
        let max = s.max_ms.unwrap();
        assert!((199.0..=201.0).contains(&max), "{max}");
        // Two slow ones more in second 12 make the p99 slow.
        w.record_at(12, Duration::from_millis(200));
        w.record_at(12, Duration::from_millis(200));
        let s = w.stats_at(13);
        assert_eq!((s.count, s.window_seconds), (102, 10));
        assert!(s.p99_ms.unwrap() > 150.0, "{s:?}");
        // Second 3 is out of the window of second 14; second 14 (reusing
        // second 3's slot) starts afresh.
        w.record_at(14, Duration::from_millis(7));
        let s = w.stats_at(15);
        assert_eq!(s.count, 3, "{s:?}");
        assert_eq!(w.stats_at(40).count, 0);
    }

    fn view(id: u64, role: &str, term: u64, last: u64, matched: &[(u64, u64)]) -> NodeView {
        NodeView {
            id: id.to_string(),
            name: format!("n{id}"),
            role: role.into(),
            term,
            leader: None,
            commit: last,
            applied: last,
            last_index: last,
            snapshot_index: 0,
            voters: ids(&[1, 2, 3]),
            learners: Vec::new(),
            followers_matched: matched
                .iter()
                .map(|&(id, match_index)| Matched {
                    id: id.to_string(),
                    match_index,
                })
                .collect(),
            wal: None,
            writes: WriteStats::default(),
            events: Vec::new(),
            version: "0".into(),
        }
    }

    fn row(id: u64, view: Option<NodeView>) -> MemberRow {
        MemberRow {
            id: id.to_string(),
            name: Some(format!("n{id}")),
            api_url: None,
            voter: true,
            is_self: false,
            reachable: view.is_some(),
            error: None,
            view,
            match_index: None,
            lag: None,
        }
    }

    #[test]
    fn lag_comes_from_the_leaders_view() {
        let mut members = vec![
            row(1, Some(view(1, "follower", 4, 90, &[]))),
            // A deposed leader of an older term does not count.
            row(2, Some(view(2, "leader", 3, 70, &[(1, 10), (3, 10)]))),
            row(3, Some(view(3, "leader", 4, 100, &[(1, 90), (2, 60)]))),
            row(4, None),
        ];
        fill_lag(&mut members);
        let got: Vec<_> = members.iter().map(|m| (m.match_index, m.lag)).collect();
        assert_eq!(
            got,
            vec![
                (Some(90), Some(10)),
                (Some(60), Some(40)),
                (Some(100), Some(0)),
                (None, None)
            ]
        );
        // No leader's view: lag unknown.
        let mut members = vec![row(1, Some(view(1, "follower", 4, 90, &[]))), row(3, None)];
        fill_lag(&mut members);
        assert!(members.iter().all(|m| m.lag.is_none()));
    }

    #[test]
    fn banners() {
        let mut v = view(1, "follower", 4, 9, &[]);
        assert_eq!(banner(&v).unwrap().kind, "no-leader");
        v.leader = Some("2".into());
        assert_eq!(banner(&v), None);
        v.role = "removed".into();
        assert_eq!(banner(&v).unwrap().kind, "removed");
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            for foreign in ["://", "@import", "url("] {
                assert!(!text.contains(foreign), "{name} has {foreign}");
            }
        }
        // Every reference in the page is one of ours.
        for attr in ["src=\"", "href=\""] {
            for (i, _) in INDEX_HTML.match_indices(attr) {
                let target = &INDEX_HTML[i + attr.len()..];
                assert!(target.starts_with("/ui/"), "{}", &target[..20]);
            }
        }
        assert!(INDEX_HTML.contains("\"/ui/app.js\""));
        assert!(INDEX_HTML.contains("\"/ui/style.css\""));
    }

    #[test]
    fn events_of_the_node() {
        let e = UiEvent::of(&NodeEvent::LeaderChanged {
            leader: Some(7),
            term: 3,
        })
        .unwrap();
        assert_eq!(
            (e.kind.as_str(), e.leader.as_deref(), e.term),
            ("leader", Some("7"), Some(3))
        );
        assert!(e.unix_ms > 0);
        let ring = Mutex::new(VecDeque::new());
        for i in 0..EVENTS_KEPT as u64 + 5 {
            push(
                &ring,
                UiEvent {
                    term: Some(i),
                    ..UiEvent::now()
                },
            );
        }
        let kept = lock(&ring);
        assert_eq!(kept.len(), EVENTS_KEPT);
        assert_eq!(kept.front().unwrap().term, Some(5));
    }
}
