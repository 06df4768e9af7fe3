//! etcd's v3 gRPC services on the API port: KV, Watch, Lease, Cluster and
//! Maintenance, mounted on the API's axum router beside the REST routes
//! (one port, HTTP/1.1 for REST and HTTP/2 for gRPC, TLS and client-cert
//! auth from the API listener).
//!
//! * Writes (Put, DeleteRange, Txn, Compact, lease grant, revoke and
//!   keep-alive, alarm changes) go through the REST API's write path
//!   (`api::write`): on any node; a follower proposes them in its own
//!   exactly-once session, so a write sent again after a leader change is
//!   never applied twice. They apply in [`super::apply`].
//! * Reads (Range, lease TimeToLive and Leases, alarm list, hashes) run on
//!   the local state machine: linearizable ones after a ReadIndex round
//!   (on followers too), `serializable` ones at once.
//! * Watches run on the node they are opened on, from its applied log
//!   (see [`watch_one`]): events come in revision order with no gap and no
//!   duplicate, whoever leads.
//! * Every read-only transaction is a write too (it goes through the log,
//!   taking no revision): linearizable, at the cost of a log append.
//!
//! Errors carry etcd's gRPC codes and messages where etcd has one, since
//! clients match on them; this server's own conditions (no leader within
//! the request timeout, shutting down) are `Unavailable`, which etcd
//! clients retry.

// tonic's calls answer `Result<_, Status>`, and `Status` is large; the
// helpers here speak the same type.
#![allow(clippy::result_large_err)]

use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status, Streaming};

use super::apply::{self, alarms_of, key_range, range_request, range_response};
use super::pb::etcdserverpb as pb;
use super::pb::etcdserverpb::{
    cluster_server, kv_server, lease_server, maintenance_server, watch_server,
};
use super::pb::internal::{request, response};
use super::pb::mvccpb;
use crate::api::{self, ApiError, Shared};
use crate::kv::{FeedItem, KvCommand, KvResponse};
use crate::mvcc::{Event, EventKind, KeyRange, MvccError};

/// The etcd version this server reports (`Status`, `GET /version`): the
/// API level it follows. Clients pick their API paths by it.
pub const ETCD_VERSION: &str = "3.5.0";

/// Most events in one watch response while catching up from history.
const WATCH_BATCH_EVENTS: usize = 1000;

/// Interval of progress notifications to watchers that asked for them
/// (etcd's default).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(600);

/// The etcd services of one node.
#[derive(Clone)]
pub struct Etcd {
    state: Shared,
    cluster_id: u64,
}

/// The route of every call of gRPC service `S`.
fn path<S: NamedService>() -> String {
    format!("/{}/{{*rpc}}", S::NAME)
}

/// The routes of etcd's gRPC services, for the API router.
pub(crate) fn routes(state: Shared) -> axum::Router {
    let cluster_id = crate::cluster::member_id(&state.config.token, "");
    let etcd = Etcd { state, cluster_id };
    axum::Router::new()
        .route_service(
            &path::<kv_server::KvServer<Etcd>>(),
            kv_server::KvServer::new(etcd.clone()),
        )
        .route_service(
            &path::<watch_server::WatchServer<Etcd>>(),
            watch_server::WatchServer::new(etcd.clone()),
        )
        .route_service(
            &path::<lease_server::LeaseServer<Etcd>>(),
            lease_server::LeaseServer::new(etcd.clone()),
        )
        .route_service(
            &path::<cluster_server::ClusterServer<Etcd>>(),
            cluster_server::ClusterServer::new(etcd.clone()),
        )
        .route_service(
            &path::<maintenance_server::MaintenanceServer<Etcd>>(),
            maintenance_server::MaintenanceServer::new(etcd.clone()),
        )
        .merge(super::gateway::routes(etcd))
}

/// The etcd API's routes on a member that does not serve it (keys split
/// over several groups, `crate::groups`, or kept on disk without
/// history, `--state-store disk`): every gRPC call is refused with
/// FAILED_PRECONDITION and the gateway's with 501, with `message`.
pub(crate) fn refused_routes(message: String) -> axum::Router {
    let grpc = {
        let message = message.clone();
        move || {
            let message = message.clone();
            async move { Status::failed_precondition(message).into_http::<axum::body::Body>() }
        }
    };
    let gateway = move || {
        let message = message.clone();
        async move { ApiError::new(StatusCode::NOT_IMPLEMENTED, message) }
    };
    let mut router = axum::Router::new();
    for p in [
        path::<kv_server::KvServer<Etcd>>(),
        path::<watch_server::WatchServer<Etcd>>(),
        path::<lease_server::LeaseServer<Etcd>>(),
        path::<cluster_server::ClusterServer<Etcd>>(),
        path::<maintenance_server::MaintenanceServer<Etcd>>(),
    ] {
        router = router.route(&p, axum::routing::any(grpc.clone()));
    }
    router.route("/v3/{*rest}", axum::routing::any(gateway))
}

/// A REST API error as a gRPC status.
fn status_of(e: ApiError) -> Status {
    let code = match e.status {
        StatusCode::BAD_REQUEST => Code::InvalidArgument,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::CONFLICT | StatusCode::GONE | StatusCode::PRECONDITION_FAILED => {
            Code::FailedPrecondition
        }
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, e.message)
}

fn mvcc_status(e: MvccError) -> Status {
    let e = apply::mvcc_error(e);
    Status::new(Code::from(e.code), e.message)
}

fn empty_key() -> Status {
    Status::invalid_argument("etcdserver: key is not provided")
}

impl Etcd {
    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.state.node.id(),
            revision,
            raft_term: self.state.node.term(),
        })
    }

    /// Fills in the node's part of a header the state machine began.
    fn fill(&self, header: &mut Option<pb::ResponseHeader>) {
        let revision = header.as_ref().map_or(0, |h| h.revision);
        *header = self.header(revision);
    }

    /// Proposes an etcd write and waits for its answer.
    async fn write(&self, r: request::Request) -> Result<response::Response, Status> {
        let command = KvCommand::Etcd(super::pb::internal::Request { request: Some(r) });
        let (_, answer) = api::write(&self.state, &HeaderMap::new(), command)
            .await
            .map_err(status_of)?;
        match answer {
            KvResponse::Etcd(super::pb::internal::Response {
                response: Some(response::Response::Error(e)),
            }) => Err(Status::new(Code::from(e.code), e.message)),
            KvResponse::Etcd(super::pb::internal::Response { response: Some(r) }) => Ok(r),
            other => Err(Status::internal(format!(
                "the state machine answered an etcd write with {other:?}"
            ))),
        }
    }

    /// Runs `f` on the state machine: after a ReadIndex round unless
    /// `serializable`.
    async fn read<R, F>(&self, serializable: bool, f: F) -> Result<R, Status>
    where
        F: Fn(&crate::kv::KvStore) -> R + Send + Sync + Clone + 'static,
        R: Send + 'static,
    {
        api::read(&self.state, serializable, f)
            .await
            .map_err(status_of)
    }

    fn unexpected(what: &str, r: response::Response) -> Status {
        Status::internal(format!("the state machine answered a {what} with {r:?}"))
    }
}

// ---------- KV ----------

/// Checks etcd does on a transaction before it is proposed: keys given,
/// at most [`apply::MAX_TXN_OPS`] operations per branch.
fn check_txn(t: &pb::TxnRequest) -> Result<(), Status> {
    use pb::request_op::Request as R;
    if t.success.len() > apply::MAX_TXN_OPS || t.failure.len() > apply::MAX_TXN_OPS {
        return Err(Status::invalid_argument(
            "etcdserver: too many operations in txn request",
        ));
    }
    if t.compare.iter().any(|c| c.key.is_empty()) {
        return Err(empty_key());
    }
    for op in t.success.iter().chain(&t.failure) {
        match &op.request {
            Some(R::RequestRange(r)) if r.key.is_empty() => return Err(empty_key()),
            Some(R::RequestPut(p)) if p.key.is_empty() => return Err(empty_key()),
            Some(R::RequestDeleteRange(d)) if d.key.is_empty() => return Err(empty_key()),
            Some(R::RequestTxn(inner)) => check_txn(inner)?,
            _ => {}
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl kv_server::Kv for Etcd {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let r = request.into_inner();
        if r.key.is_empty() {
            return Err(empty_key());
        }
        let read = range_request(&r);
        let answer = self
            .read(r.serializable, move |sm| sm.mvcc().range(&read))
            .await?
            .map_err(mvcc_status)?;
        let mut response = range_response(&r, answer);
        self.fill(&mut response.header);
        Ok(Response::new(response))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let p = request.into_inner();
        if p.key.is_empty() {
            return Err(empty_key());
        }
        if p.ignore_value && !p.value.is_empty() {
            return Err(Status::invalid_argument("etcdserver: value is provided"));
        }
        if p.ignore_lease && p.lease != 0 {
            return Err(Status::invalid_argument("etcdserver: lease is provided"));
        }
        match self.write(request::Request::Put(p)).await? {
            response::Response::Put(mut r) => {
                self.fill(&mut r.header);
                Ok(Response::new(r))
            }
            other => Err(Self::unexpected("put", other)),
        }
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let d = request.into_inner();
        if d.key.is_empty() {
            return Err(empty_key());
        }
        match self.write(request::Request::DeleteRange(d)).await? {
            response::Response::DeleteRange(mut r) => {
                self.fill(&mut r.header);
                Ok(Response::new(r))
            }
            other => Err(Self::unexpected("delete", other)),
        }
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> Result<Response<pb::TxnResponse>, Status> {
        let t = request.into_inner();
        check_txn(&t)?;
        match self.write(request::Request::Txn(t)).await? {
            response::Response::Txn(mut r) => {
                // Only the outer header: etcd's inner ones carry the
                // revision alone.
                self.fill(&mut r.header);
                Ok(Response::new(r))
            }
            other => Err(Self::unexpected("txn", other)),
        }
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        match self
            .write(request::Request::Compaction(request.into_inner()))
            .await?
        {
            response::Response::Compaction(mut r) => {
                self.fill(&mut r.header);
                Ok(Response::new(r))
            }
            other => Err(Self::unexpected("compaction", other)),
        }
    }
}

// ---------- Lease ----------

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl lease_server::Lease for Etcd {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        match self
            .write(request::Request::LeaseGrant(request.into_inner()))
            .await?
        {
            response::Response::LeaseGrant(mut r) => {
                self.fill(&mut r.header);
                Ok(Response::new(r))
            }
            other => Err(Self::unexpected("lease grant", other)),
        }
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        match self
            .write(request::Request::LeaseRevoke(request.into_inner()))
            .await?
        {
            response::Response::LeaseRevoke(mut r) => {
                self.fill(&mut r.header);
                Ok(Response::new(r))
            }
            other => Err(Self::unexpected("lease revoke", other)),
        }
    }

    type LeaseKeepAliveStream = ResponseStream<pb::LeaseKeepAliveResponse>;

    /// Each keep-alive is a replicated write (leases expire by log time);
    /// a lease that does not exist is answered with TTL 0, as etcd does.
    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let etcd = self.clone();
        tokio::spawn(async move {
            while let Some(next) = requests.next().await {
                let answer = match next {
                    Ok(k) => etcd.keep_alive_once(k).await,
                    Err(e) => Err(e),
                };
                let failed = answer.is_err();
                if tx.send(answer).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let r = request.into_inner();
        let now = super::wall_clock_ms();
        let id = r.id;
        let (status, revision) = self
            .read(false, move |sm| {
                (sm.etcd().leases.status(id, now), sm.mvcc().revision())
            })
            .await?;
        // etcd answers a lease that does not exist with TTL -1.
        let response = match status {
            Some(s) => pb::LeaseTimeToLiveResponse {
                header: self.header(revision),
                id,
                ttl: s.remaining_s,
                granted_ttl: s.granted_ttl_s,
                keys: if r.keys { s.keys } else { Vec::new() },
            },
            None => pb::LeaseTimeToLiveResponse {
                header: self.header(revision),
                id,
                ttl: -1,
                ..Default::default()
            },
        };
        Ok(Response::new(response))
    }

    async fn lease_leases(
        &self,
        _: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let (ids, revision) = self
            .read(false, |sm| (sm.etcd().leases.ids(), sm.mvcc().revision()))
            .await?;
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: self.header(revision),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }))
    }
}

impl Etcd {
    /// One keep-alive: a replicated write. A lease that does not exist is
    /// answered with TTL 0, as etcd does.
    pub(crate) async fn keep_alive_once(
        &self,
        k: pb::LeaseKeepAliveRequest,
    ) -> Result<pb::LeaseKeepAliveResponse, Status> {
        match self.write(request::Request::LeaseKeepAlive(k)).await {
            Ok(response::Response::LeaseKeepAlive(mut r)) => {
                self.fill(&mut r.header);
                Ok(r)
            }
            Err(e) if e.code() == Code::NotFound => Ok(pb::LeaseKeepAliveResponse {
                header: self.header(0),
                id: k.id,
                ttl: 0,
            }),
            Ok(other) => Err(Etcd::unexpected("keep-alive", other)),
            Err(e) => Err(e),
        }
    }

    /// etcd's health: a linearizable read completes, and no alarm is
    /// raised. The reason when not.
    pub(crate) async fn health(&self) -> Result<(), String> {
        let alarms = self
            .read(false, |sm| alarms_of(sm.etcd(), 0))
            .await
            .map_err(|e| e.message().to_string())?;
        match alarms.first() {
            None => Ok(()),
            Some(a) => Err(format!("alarm {} raised", alarm_name(a.alarm))),
        }
    }
}

// ---------- Watch ----------

/// One watcher's settings.
#[derive(Clone)]
struct WatchSpec {
    id: i64,
    range: KeyRange,
    start_revision: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
}

impl WatchSpec {
    fn wants(&self, e: &Event) -> bool {
        self.range.contains(&e.kv.key)
            && match e.kind {
                EventKind::Put => !self.no_put,
                EventKind::Delete => !self.no_delete,
            }
    }

    fn event_pb(&self, e: &Event) -> mvccpb::Event {
        mvccpb::Event {
            r#type: match e.kind {
                EventKind::Put => mvccpb::event::EventType::Put as i32,
                EventKind::Delete => mvccpb::event::EventType::Delete as i32,
            },
            kv: Some(apply::kv_pb(&e.kv)),
            prev_kv: e.prev.as_ref().filter(|_| self.prev_kv).map(apply::kv_pb),
        }
    }
}

type WatchOut = mpsc::Sender<Result<pb::WatchResponse, Status>>;

#[tonic::async_trait]
impl watch_server::Watch for Etcd {
    type WatchStream = ResponseStream<pb::WatchResponse>;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(self.watch_stream(request.into_inner())))
    }
}

impl Etcd {
    /// A watch session: creates, cancels and progress requests in, the
    /// watchers' responses out; it ends (and its watchers with it) when the
    /// requests end.
    pub(crate) fn watch_stream<S>(&self, mut requests: S) -> ResponseStream<pb::WatchResponse>
    where
        S: Stream<Item = Result<pb::WatchRequest, Status>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel::<Result<pb::WatchResponse, Status>>(64);
        let etcd = self.clone();
        tokio::spawn(async move {
            use pb::watch_request::RequestUnion as U;
            let mut watchers: std::collections::BTreeMap<
                i64,
                (tokio::task::JoinHandle<()>, mpsc::Sender<()>),
            > = Default::default();
            let next_id = AtomicI64::new(0);
            while let Some(Ok(req)) = requests.next().await {
                watchers.retain(|_, (task, _)| !task.is_finished());
                match req.request_union {
                    Some(U::CreateRequest(c)) => {
                        let id = if c.watch_id != 0 {
                            c.watch_id
                        } else {
                            loop {
                                let id = next_id.fetch_add(1, Ordering::Relaxed);
                                if !watchers.contains_key(&id) {
                                    break id;
                                }
                            }
                        };
                        if watchers.contains_key(&id) {
                            let _ = tx
                                .send(Ok(pb::WatchResponse {
                                    header: etcd.header(0),
                                    watch_id: id,
                                    created: true,
                                    canceled: true,
                                    cancel_reason: "etcdserver: duplicate watch ID".into(),
                                    ..Default::default()
                                }))
                                .await;
                            continue;
                        }
                        let spec = WatchSpec {
                            id,
                            range: key_range(&c.key, &c.range_end),
                            start_revision: c.start_revision,
                            prev_kv: c.prev_kv,
                            no_put: c
                                .filters
                                .contains(&(pb::watch_create_request::FilterType::Noput as i32)),
                            no_delete: c
                                .filters
                                .contains(&(pb::watch_create_request::FilterType::Nodelete as i32)),
                            progress_notify: c.progress_notify,
                        };
                        let (ctl_tx, ctl_rx) = mpsc::channel(4);
                        let task = tokio::spawn(watch_one(etcd.clone(), spec, tx.clone(), ctl_rx));
                        watchers.insert(id, (task, ctl_tx));
                    }
                    Some(U::CancelRequest(c)) => {
                        if let Some((task, _)) = watchers.remove(&c.watch_id) {
                            task.abort();
                        }
                        let _ = tx
                            .send(Ok(pb::WatchResponse {
                                header: etcd.header(0),
                                watch_id: c.watch_id,
                                canceled: true,
                                ..Default::default()
                            }))
                            .await;
                    }
                    Some(U::ProgressRequest(_)) => {
                        for (_, ctl) in watchers.values() {
                            let _ = ctl.try_send(());
                        }
                    }
                    None => {}
                }
            }
            for (task, _) in watchers.into_values() {
                task.abort();
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// Runs one watcher: subscribes to the store's feed and reads the
/// revision it starts after in one step on the apply task, sends the
/// history from its start revision up to there, then every later write's
/// events as the feed brings them. It skips revisions it already sent, and
/// catches up from history again when it fell behind the feed or the
/// store was replaced by a snapshot, so its events come in revision order
/// with no gap and no duplicate. History compacted past its position ends
/// it with etcd's compacted answer. A progress request (or, with
/// `progress_notify`, every [`PROGRESS_INTERVAL`]) answers the revision
/// everything up to which was sent.
async fn watch_one(etcd: Etcd, spec: WatchSpec, out: WatchOut, mut ctl: mpsc::Receiver<()>) {
    let node = etcd.state.node.clone();
    let Ok((mut feed, now)) = node.read_stale(|sm| sm.watch()).await else {
        let _ = out
            .send(Err(Status::unavailable("node is shutting down")))
            .await;
        return;
    };
    let created = pb::WatchResponse {
        header: etcd.header(now),
        watch_id: spec.id,
        created: true,
        ..Default::default()
    };
    if out.send(Ok(created)).await.is_err() {
        return;
    }
    // The next revision this watcher owes its client.
    let mut next = if spec.start_revision > 0 {
        spec.start_revision
    } else {
        now + 1
    };
    if !catch_up(&etcd, &spec, &out, &mut next, now).await {
        return;
    }
    let mut progress = tokio::time::interval(PROGRESS_INTERVAL);
    progress.tick().await;
    loop {
        let item = tokio::select! {
            item = feed.recv() => item,
            Some(()) = ctl.recv() => {
                if !send_progress(&etcd, &spec, &out, next - 1).await {
                    return;
                }
                continue;
            }
            _ = progress.tick(), if spec.progress_notify => {
                if !send_progress(&etcd, &spec, &out, next - 1).await {
                    return;
                }
                continue;
            }
        };
        match item {
            Ok(FeedItem::Events(events)) => {
                let Some(rev) = events.first().map(|e| e.rev.main) else {
                    continue;
                };
                if rev < next {
                    continue;
                }
                // The feed sends every write in order; a revision past
                // `next` here means a write the feed skipped (it only
                // sends while someone watches): read it from history.
                if rev > next && !catch_up(&etcd, &spec, &out, &mut next, rev - 1).await {
                    return;
                }
                let wanted: Vec<mvccpb::Event> = events
                    .iter()
                    .filter(|e| spec.wants(e))
                    .map(|e| spec.event_pb(e))
                    .collect();
                next = rev + 1;
                if !wanted.is_empty() && !send_events(&etcd, &spec, &out, rev, wanted).await {
                    return;
                }
            }
            Ok(FeedItem::Restored(rev)) => {
                if !catch_up(&etcd, &spec, &out, &mut next, rev).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let Ok(now) = node.read_stale(|sm| sm.mvcc().revision()).await else {
                    return;
                };
                if !catch_up(&etcd, &spec, &out, &mut next, now).await {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Closed) => {
                let _ = out
                    .send(Err(Status::unavailable("node is shutting down")))
                    .await;
                return;
            }
        }
    }
}

/// Sends the events from `next` up to `to` from the key space's history
/// and moves `next` past `to`. False when the watcher must end (its client
/// left, the history was compacted past it, the node stopped).
async fn catch_up(etcd: &Etcd, spec: &WatchSpec, out: &WatchOut, next: &mut i64, to: i64) -> bool {
    if *next > to {
        return true;
    }
    let (range, from) = (spec.range.clone(), *next);
    let history = etcd
        .state
        .node
        .read_stale(move |sm| sm.mvcc().events(&range, from, to))
        .await;
    match history {
        Err(_) => {
            let _ = out
                .send(Err(Status::unavailable("node is shutting down")))
                .await;
            false
        }
        Ok(Err(MvccError::Compacted { compacted })) => {
            let _ = out
                .send(Ok(pb::WatchResponse {
                    header: etcd.header(to),
                    watch_id: spec.id,
                    canceled: true,
                    // Compaction drops the compacted revision's deletions,
                    // so a watch can start right after it.
                    compact_revision: compacted + 1,
                    cancel_reason: "mvcc: required revision has been compacted".into(),
                    ..Default::default()
                }))
                .await;
            false
        }
        Ok(Err(e)) => {
            let _ = out.send(Err(mvcc_status(e))).await;
            false
        }
        Ok(Ok(events)) => {
            *next = to + 1;
            let wanted: Vec<mvccpb::Event> = events
                .iter()
                .filter(|e| spec.wants(e))
                .map(|e| spec.event_pb(e))
                .collect();
            for chunk in wanted.chunks(WATCH_BATCH_EVENTS) {
                let rev = chunk
                    .last()
                    .and_then(|e| e.kv.as_ref())
                    .map_or(to, |kv| kv.mod_revision);
                if !send_events(etcd, spec, out, rev, chunk.to_vec()).await {
                    return false;
                }
            }
            true
        }
    }
}

async fn send_events(
    etcd: &Etcd,
    spec: &WatchSpec,
    out: &WatchOut,
    revision: i64,
    events: Vec<mvccpb::Event>,
) -> bool {
    out.send(Ok(pb::WatchResponse {
        header: etcd.header(revision),
        watch_id: spec.id,
        events,
        ..Default::default()
    }))
    .await
    .is_ok()
}

async fn send_progress(etcd: &Etcd, spec: &WatchSpec, out: &WatchOut, revision: i64) -> bool {
    out.send(Ok(pb::WatchResponse {
        header: etcd.header(revision),
        watch_id: spec.id,
        ..Default::default()
    }))
    .await
    .is_ok()
}

// ---------- Cluster ----------

impl Etcd {
    /// Every member as etcd lists it: voters and learners of the current
    /// configuration, with the URLs of their replicated member records.
    async fn members(&self) -> Result<Vec<pb::Member>, Status> {
        let status = self
            .state
            .node
            .status()
            .await
            .ok_or_else(|| Status::unavailable("node is shutting down"))?;
        let records = self.state.config.members.all();
        let member = |id: u64, learner: bool| {
            let record = records.get(&id);
            pb::Member {
                id,
                name: record.map(|r| r.name.clone()).unwrap_or_default(),
                peer_ur_ls: record
                    .map(|r| vec![format!("http://{}", r.peer_addr)])
                    .unwrap_or_default(),
                client_ur_ls: record.map(|r| vec![r.api_url.clone()]).unwrap_or_default(),
                is_learner: learner,
            }
        };
        // Pending slots are listed as etcd lists a member added but not
        // started: no name, no client URLs. A slot being taken (the joining
        // member's record already names its address) is not listed twice.
        let mut pending = self.state.config.members.waiting();
        pending.retain(|addr, _| !records.values().any(|r| r.peer_addr == *addr));
        let mut members: Vec<pb::Member> = status
            .voters
            .iter()
            .map(|&id| member(id, false))
            .chain(status.learners.iter().map(|&id| member(id, true)))
            .chain(pending.values().map(|p| pb::Member {
                id: p.id,
                name: String::new(),
                peer_ur_ls: vec![format!("http://{}", p.peer_addr)],
                client_ur_ls: Vec::new(),
                is_learner: p.learner,
            }))
            .collect();
        members.sort_by_key(|m| m.id);
        Ok(members)
    }

    /// [`Etcd::members`] after a change: once this node has applied
    /// everything committed (a ReadIndex round), so that a change made on
    /// the leader shows in a follower's answer too.
    async fn members_after_change(&self) -> Result<Vec<pb::Member>, Status> {
        self.read(false, |_| ()).await?;
        self.state.config.members.refresh(&self.state.records).await;
        self.members().await
    }

    /// The member a client's id means: a member's own id, or the id its
    /// pending slot had (see `crate::members`), from a fresh look at the
    /// records.
    async fn resolve(&self, id: u64) -> u64 {
        let members = &self.state.config.members;
        members.refresh(&self.state.records).await;
        members.resolve(id)
    }

    /// With `--admin-identities`, membership changes and leadership moves
    /// need a client certificate naming an admin, as on the REST API.
    fn admin_only<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let peer = request
            .extensions()
            .get::<axum::extract::ConnectInfo<crate::listener::ApiPeer>>()
            .map(|c| &c.0);
        if api::is_admin(&self.state, peer) {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "etcdserver: permission denied (this needs a client certificate naming an \
                 admin identity: --admin-identities)",
            ))
        }
    }

    /// Membership changes run on the leader, as the REST API runs them:
    /// from a follower, the REST route `method path` is sent to the leader
    /// (`Ok(true)`: done there); on the leader, `Ok(false)`: do it here.
    /// `path` is `None` when the member has no record (no name) yet, which
    /// only the leader can handle.
    async fn on_leader(&self, method: &str, path: Option<String>) -> Result<bool, Status> {
        let Some(url) = api::leader_url(&self.state).await.map_err(status_of)? else {
            return Ok(false);
        };
        let path = path.ok_or_else(|| {
            Status::failed_precondition(
                "etcdserver: not leader (this member has no record yet; send the request to \
                 the leader)",
            )
        })?;
        api::forward_change(&self.state, &url, method, &path)
            .await
            .map_err(status_of)?;
        Ok(true)
    }

    async fn leader_only(&self) -> Result<(), Status> {
        if self.state.node.leader() != Some(self.state.node.id()) {
            return Err(Status::failed_precondition("etcdserver: not leader"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for Etcd {
    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        self.admin_only(&request)?;
        let req = request.into_inner();
        let addr = one_peer_addr(&req.peer_ur_ls)?;
        self.state.config.members.refresh(&self.state.records).await;
        if self
            .members()
            .await?
            .iter()
            .any(|m| m.peer_ur_ls.iter().any(|u| peer_addr_of(u) == Some(&addr)))
        {
            return Err(Status::failed_precondition(
                "etcdserver: Peer URLs already exists",
            ));
        }
        let slot = api::add_pending(&self.state, &HeaderMap::new(), addr, req.is_learner)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::MemberAddResponse {
            header: self.header(0),
            member: Some(pb::Member {
                id: slot.id,
                name: String::new(),
                peer_ur_ls: req.peer_ur_ls,
                client_ur_ls: Vec::new(),
                is_learner: slot.learner,
            }),
            members: self.members_after_change().await?,
        }))
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        self.admin_only(&request)?;
        let id = self.resolve(request.into_inner().id).await;
        if !self.members().await?.iter().any(|m| m.id == id) {
            return Err(Status::not_found("etcdserver: member not found"));
        }
        let members = &self.state.config.members;
        if let Some(slot) = members.waiting().values().find(|p| p.id == id) {
            // Added, never started: its slot goes.
            let path = format!("/cluster/pending/{}", slot.peer_addr);
            if !self.on_leader("DELETE", Some(path)).await? {
                api::drop_pending(&self.state, &slot.peer_addr)
                    .await
                    .map_err(status_of)?;
            }
        } else {
            let name = members.get(id).map(|m| m.name);
            let path = name.as_ref().map(|n| format!("/cluster/members/{n}"));
            if !self.on_leader("DELETE", path).await? {
                api::remove_here(&self.state, id, name.as_deref())
                    .await
                    .map_err(status_of)?;
            }
        }
        Ok(Response::new(pb::MemberRemoveResponse {
            header: self.header(0),
            members: self.members_after_change().await?,
        }))
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        self.admin_only(&request)?;
        let req = request.into_inner();
        let addr = one_peer_addr(&req.peer_ur_ls)?;
        let id = self.resolve(req.id).await;
        let Some(record) = self.state.config.members.get(id) else {
            return Err(Status::not_found("etcdserver: member not found"));
        };
        api::update_peer_addr(&self.state, &HeaderMap::new(), &record.name, addr)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: self.header(0),
            members: self.members_after_change().await?,
        }))
    }

    async fn member_list(
        &self,
        _: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        Ok(Response::new(pb::MemberListResponse {
            header: self.header(0),
            members: self.members().await?,
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        self.admin_only(&request)?;
        let id = self.resolve(request.into_inner().id).await;
        if self
            .state
            .config
            .members
            .waiting()
            .values()
            .any(|p| p.id == id)
        {
            // Added, not started yet: nothing to be in sync.
            return Err(not_in_sync());
        }
        let name = match self.members().await?.iter().find(|m| m.id == id) {
            None => return Err(Status::not_found("etcdserver: member not found")),
            Some(m) if !m.is_learner => {
                return Err(Status::failed_precondition(
                    "etcdserver: can only promote a learner member",
                ))
            }
            Some(m) => m.name.clone(),
        };
        let path = (!name.is_empty()).then(|| format!("/cluster/members/{name}/promote"));
        let forwarded = self.on_leader("POST", path).await.map_err(|e| {
            if e.message().contains("has not caught up") {
                not_in_sync()
            } else {
                e
            }
        })?;
        if forwarded {
            return Ok(Response::new(pb::MemberPromoteResponse {
                header: self.header(0),
                members: self.members_after_change().await?,
            }));
        }
        self.state
            .node
            .promote_learner(id)
            .await
            .map_err(|e| match e {
                raftwork::ConfChangeError::LearnerNotCaughtUp { .. } => not_in_sync(),
                e => Status::failed_precondition(e.to_string()),
            })?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: self.header(0),
            members: self.members_after_change().await?,
        }))
    }
}

/// etcd's refusal to promote a learner that has not caught up.
fn not_in_sync() -> Status {
    Status::failed_precondition(
        "etcdserver: can only promote a learner member which is in sync with leader",
    )
}

/// The one peer address (host:port) of a member's peer URLs: raftwork
/// members have one.
fn one_peer_addr(urls: &[String]) -> Result<String, Status> {
    match urls {
        [url] => peer_addr_of(url)
            .map(str::to_string)
            .ok_or_else(|| Status::invalid_argument("etcdserver: given member URLs are invalid")),
        [] => Err(Status::invalid_argument(
            "etcdserver: given member URLs are invalid",
        )),
        _ => Err(Status::invalid_argument(
            "etcdserver: given member URLs are invalid (a raftwork member has one peer URL)",
        )),
    }
}

/// `host:port` of `http://host:port` (or `https://`), if well formed.
fn peer_addr_of(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?
        .trim_end_matches('/');
    crate::cluster::parse_host_port(rest).ok().map(|_| rest)
}

// ---------- Maintenance ----------

/// Bytes of a snapshot stream's chunks.
const SNAPSHOT_CHUNK_BYTES: usize = 64 * 1024;

#[tonic::async_trait]
impl maintenance_server::Maintenance for Etcd {
    async fn alarm(
        &self,
        request: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        let a = request.into_inner();
        if a.action == pb::alarm_request::AlarmAction::Get as i32 {
            let alarm = a.alarm;
            let (alarms, revision) = self
                .read(false, move |sm| {
                    (alarms_of(sm.etcd(), alarm), sm.mvcc().revision())
                })
                .await?;
            return Ok(Response::new(pb::AlarmResponse {
                header: self.header(revision),
                alarms,
            }));
        }
        match self.write(request::Request::Alarm(a)).await? {
            response::Response::Alarm(mut r) => {
                self.fill(&mut r.header);
                Ok(Response::new(r))
            }
            other => Err(Self::unexpected("alarm", other)),
        }
    }

    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self
            .state
            .node
            .status()
            .await
            .ok_or_else(|| Status::unavailable("node is shutting down"))?;
        let (revision, size, alarms) = self
            .read(true, |sm| {
                (
                    sm.mvcc().revision(),
                    sm.mvcc().size_bytes(),
                    alarms_of(sm.etcd(), 0),
                )
            })
            .await?;
        let id = self.state.node.id();
        Ok(Response::new(pb::StatusResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: self.cluster_id,
                member_id: id,
                revision,
                raft_term: s.term,
            }),
            version: ETCD_VERSION.into(),
            db_size: size as i64,
            leader: s.leader.unwrap_or(0),
            raft_index: s.commit_index,
            raft_term: s.term,
            raft_applied_index: s.applied_index,
            errors: alarms
                .iter()
                .filter(|a| a.member_id == id)
                .map(|a| format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm)))
                .collect(),
            db_size_in_use: size as i64,
            is_learner: s.learners.contains(&id),
        }))
    }

    async fn defragment(
        &self,
        _: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        // The key space lives in memory: there is nothing to defragment.
        Ok(Response::new(pb::DefragmentResponse {
            header: self.header(0),
        }))
    }

    async fn hash(
        &self,
        _: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let (hash, revision) = self
            .read(true, |sm| (sm.mvcc().hash(), sm.mvcc().revision()))
            .await?;
        Ok(Response::new(pb::HashResponse {
            header: self.header(revision),
            hash: fold(hash),
        }))
    }

    /// The hash of the key space's history up to a revision (0: the
    /// current one): equal on every member that applied that far.
    async fn hash_kv(
        &self,
        request: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        let at = request.into_inner().revision;
        let (hash, revision, compacted, hashed) = self
            .read(true, move |sm| {
                let m = sm.mvcc();
                let at = if at <= 0 { m.revision() } else { at };
                (m.hash_at(at), m.revision(), m.compacted_revision(), at)
            })
            .await?;
        let hash = hash.map_err(mvcc_status)?;
        Ok(Response::new(pb::HashKvResponse {
            header: self.header(revision),
            hash: fold(hash),
            compact_revision: compacted,
            hash_revision: hashed,
        }))
    }

    type SnapshotStream = ResponseStream<pb::SnapshotResponse>;

    /// The state machine's snapshot (raftwork's format: the key space with
    /// its history, leases and alarms), taken at once on the apply task and
    /// streamed in chunks, in the frame etcd's tools check:
    ///
    /// ```text
    /// +--------------------+---------------------------------+--------------------------+
    /// | snapshot (kv.rs)   | zeros to a multiple of 512 bytes | SHA-256 of what precedes |
    /// +--------------------+---------------------------------+--------------------------+
    /// ```
    async fn snapshot(
        &self,
        request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        use raftwork::StateMachine as _;
        // Every key is in it: an admin's, as the REST API's backups are
        // (etcd asks for root under auth).
        self.admin_only(&request)?;
        let (bytes, revision) = self
            .read(true, |sm| {
                let mut buf = Vec::new();
                let written = sm.snapshot(&mut buf).map(|()| buf);
                (written, sm.mvcc().revision())
            })
            .await?;
        let mut bytes = bytes.map_err(|e| Status::internal(e.to_string()))?;
        bytes.resize(bytes.len().next_multiple_of(512), 0);
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        bytes.extend_from_slice(digest.as_ref());
        let bytes = Bytes::from(bytes);
        let header = self.header(revision);
        let chunks: Vec<Result<pb::SnapshotResponse, Status>> = (0..bytes.len())
            .step_by(SNAPSHOT_CHUNK_BYTES)
            .map(|at| {
                let end = (at + SNAPSHOT_CHUNK_BYTES).min(bytes.len());
                Ok(pb::SnapshotResponse {
                    header,
                    remaining_bytes: (bytes.len() - end) as u64,
                    blob: bytes.slice(at..end),
                    version: ETCD_VERSION.into(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }

    async fn move_leader(
        &self,
        request: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        self.admin_only(&request)?;
        self.leader_only().await?;
        let to = self.resolve(request.into_inner().target_id).await;
        if !self.members().await?.iter().any(|m| m.id == to) {
            return Err(Status::not_found("etcdserver: member not found"));
        }
        self.state
            .node
            .transfer_leader(to)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(Response::new(pb::MoveLeaderResponse {
            header: self.header(0),
        }))
    }
}

fn alarm_name(alarm: i32) -> &'static str {
    pb::AlarmType::try_from(alarm).map_or("UNKNOWN", |a| a.as_str_name())
}

/// A 64-bit hash folded to etcd's 32.
fn fold(hash: u64) -> u32 {
    (hash ^ (hash >> 32)) as u32
}
