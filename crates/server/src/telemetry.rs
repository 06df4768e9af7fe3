//! `GET /metrics`: the Prometheus recorder, process metrics, and request
//! metrics of the API.
//!
//! The library records through the `metrics` facade
//! ([`raftwork::metrics`]); the server installs Prometheus's recorder as the
//! process's global recorder, once, before the node starts (handles made
//! before that would be no-ops), with every histogram's buckets taken from
//! the library's catalogue, so histograms are exposed as real Prometheus
//! histograms (`_bucket`, `_sum`, `_count`), never as summaries.
//!
//! Each scrape samples the process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, …, from
//! `/proc/self`) and renders the text format. A background task runs the
//! recorder's upkeep (draining histogram samples) every 5 s so memory stays
//! flat between scrapes.
//!
//! Every request also gets a `request` span and, when it is answered, a
//! log line, both at debug level under target `raftwork::request` (so
//! `--log-level info,raftwork::request=debug` logs every request).
//!
//! Request metrics, for every route of the API (REST, etcd gRPC and its
//! JSON gateway):
//! - `raftwork_http_requests_total{route, method, status}`
//! - `raftwork_http_request_duration_seconds{route, method}`: from the
//!   request's arrival to its response head (a streaming response, such as
//!   a watch, counts until its head).
//!
//! `route` is the matched route template (`/v1/kv/{*key}`, not the key), so
//! the number of series stays bounded; an unmatched path is `unmatched`. A
//! gRPC call's route is its method's path (`/etcdserverpb.KV/Put`), bounded
//! by the services' methods: a call the service does not implement is
//! counted under the service's template.
//! A gRPC call's `status` is its `grpc-status` when the response head
//! carries one (an error answered at once) and `0` otherwise (success, or an
//! error that only its trailers name).

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use raftwork::metrics::{MetricDef, MetricKind, FAST_SECONDS_BUCKETS};
use tracing::Instrument;

/// `raftwork_http_requests_total{route, method, status}`.
pub const HTTP_REQUESTS: MetricDef = MetricDef {
    name: "raftwork_http_requests_total",
    kind: MetricKind::Counter,
    help: "API requests answered, by route template, method and status.",
    labels: &["route", "method", "status"],
    buckets: &[],
};

/// `raftwork_http_request_duration_seconds{route, method}`.
pub const HTTP_DURATION: MetricDef = MetricDef {
    name: "raftwork_http_request_duration_seconds",
    kind: MetricKind::Histogram,
    help: "Time from an API request's arrival to its response head, by route template and method.",
    labels: &["route", "method"],
    buckets: FAST_SECONDS_BUCKETS,
};

/// The server's own metrics.
pub const SERVER: &[MetricDef] = &[HTTP_REQUESTS, HTTP_DURATION];

struct Installed {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static INSTALLED: OnceLock<Result<Installed, String>> = OnceLock::new();

/// Installs the Prometheus recorder as the global recorder, once per
/// process (later calls return the first outcome). Call before building
/// the node.
pub fn install() -> Result<(), String> {
    let outcome = INSTALLED.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        for d in raftwork::metrics::catalogue().chain(SERVER) {
            if d.kind == MetricKind::Histogram {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(d.name.to_string()), d.buckets)
                    .map_err(|e| format!("{}: {e}", d.name))?;
            }
        }
        let handle = builder
            .install_recorder()
            .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
        raftwork::metrics::describe();
        raftwork::metrics::describe_defs(SERVER);
        let process = metrics_process::Collector::default();
        process.describe();
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("raftwork-metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            })
            .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
        Ok(Installed { handle, process })
    });
    outcome.as_ref().map(|_| ()).map_err(Clone::clone)
}

/// The text exposition of every metric, process metrics sampled now;
/// `None` if no recorder is installed.
pub fn render() -> Option<String> {
    let installed = INSTALLED.get()?.as_ref().ok()?;
    installed.process.collect();
    Some(installed.handle.render())
}

/// `GET /metrics`.
pub async fn metrics_handler() -> Response {
    match render() {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are not enabled in this process\n",
        )
            .into_response(),
    }
}

/// The request metrics' handles, by route, method and status, made once
/// each: a request then costs a map lookup and two atomic updates, no
/// allocation (the set of keys is bounded, see the module header).
#[derive(Default)]
struct RouteHandles {
    routes: RwLock<HashMap<String, RouteEntry>>,
}

#[derive(Default)]
struct RouteEntry {
    /// By method.
    durations: Vec<(&'static str, Histogram)>,
    /// By method and status.
    counts: Vec<(&'static str, String, Counter)>,
}

static ROUTE_HANDLES: OnceLock<RouteHandles> = OnceLock::new();

impl RouteEntry {
    fn find(&self, method: &str, status: &str) -> Option<(&Histogram, &Counter)> {
        let (_, h) = self.durations.iter().find(|(m, _)| *m == method)?;
        let (_, _, c) = self
            .counts
            .iter()
            .find(|(m, s, _)| *m == method && s == status)?;
        Some((h, c))
    }

    /// Makes the handles `find` lacks for `route`, `method`, `status`.
    fn add_missing(&mut self, route: &str, method: &'static str, status: &str) {
        if !self.durations.iter().any(|(m, _)| *m == method) {
            let h = metrics::histogram!(HTTP_DURATION.name, "route" => route.to_string(), "method" => method);
            self.durations.push((method, h));
        }
        if !self
            .counts
            .iter()
            .any(|(m, s, _)| *m == method && s == status)
        {
            let c = metrics::counter!(HTTP_REQUESTS.name, "route" => route.to_string(),
                "method" => method, "status" => status.to_string());
            self.counts.push((method, status.to_string(), c));
        }
    }
}

impl RouteHandles {
    fn record(&self, route: &str, method: &'static str, status: &str, elapsed: Duration) {
        let record = |(h, c): (&Histogram, &Counter)| {
            h.record(elapsed);
            c.increment(1);
        };
        if let Some(found) = self
            .routes
            .read()
            .unwrap()
            .get(route)
            .and_then(|e| e.find(method, status))
        {
            return record(found);
        }
        let mut routes = self.routes.write().unwrap();
        let entry = routes.entry(route.to_string()).or_default();
        entry.add_missing(route, method, status);
        record(entry.find(method, status).expect("just made"));
    }
}

/// A method's name with a static lifetime (others are `other`: the label
/// set stays bounded).
fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Middleware: counts and times every request by route template.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let method = method_name(request.method());
    let uri = request.uri().clone();
    let route = matched.as_ref().map_or("unmatched", |p| p.as_str());
    // The request's span: a proposal it makes is a child of it (see
    // `raftwork::Node::propose`), so one request is followed to its log
    // index, the WAL sync and the apply that answered it.
    let span = tracing::debug_span!(target: "raftwork::request", "request", method, route, path = uri.path());
    let response = next.run(request).instrument(span.clone()).await;
    let elapsed = started.elapsed();
    let http_status = status_text(response.status());
    let status: &str = match response.headers().get("grpc-status") {
        Some(code) => code.to_str().unwrap_or("?"),
        None if is_grpc(&response) => "0",
        None => &http_status,
    };
    // tonic answers an unknown method with grpc-status 12 (Unimplemented).
    let route = if is_grpc(&response) && route.ends_with("/{*rpc}") && status != "12" {
        uri.path()
    } else {
        route
    };
    tracing::debug!(target: "raftwork::request", parent: &span, method, route, path = uri.path(),
        status, duration_us = elapsed.as_micros() as u64, "request");
    if INSTALLED.get().is_some() {
        ROUTE_HANDLES
            .get_or_init(RouteHandles::default)
            .record(route, method, status, elapsed);
    }
    response
}

/// A status code as text, without an allocation for the common ones.
fn status_text(status: StatusCode) -> std::borrow::Cow<'static, str> {
    const COMMON: [&str; 12] = [
        "200", "201", "204", "400", "403", "404", "405", "409", "412", "413", "500", "503",
    ];
    let text = status.as_str();
    match COMMON.iter().find(|c| **c == text) {
        Some(c) => std::borrow::Cow::Borrowed(c),
        None => std::borrow::Cow::Owned(text.to_string()),
    }
}

fn is_grpc(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition of a histogram recorded through the library's
    /// handles: Prometheus histogram lines with the catalogue's buckets, in
    /// seconds, cumulative, `+Inf` equal to the count.
    #[test]
    fn histograms_render_with_the_catalogues_buckets() {
        install().unwrap();
        install().unwrap(); // once per process; a second call is a no-op
        let bounds = raftwork::metrics::FSYNC_SECONDS_BUCKETS;
        let h = metrics::histogram!("raftwork_disk_wal_fsync_duration_seconds");
        h.record(Duration::from_micros(150)); // in (0.0001, 0.0002]
        h.record(Duration::from_secs(60)); // past the last bound
        let text = render().unwrap();
        let family = "raftwork_disk_wal_fsync_duration_seconds";
        assert!(
            text.contains(&format!("# TYPE {family} histogram")),
            "{text}"
        );
        let bucket = |le: &str| -> f64 {
            let prefix = format!("{family}_bucket{{le=\"{le}\"}} ");
            let line = text
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no {prefix}in {text}"));
            line[prefix.len()..].parse().unwrap()
        };
        assert_eq!(bucket("0.0001"), 0.0);
        assert_eq!(bucket("0.0002"), 1.0);
        assert_eq!(bucket("13.1072"), 1.0);
        assert_eq!(bucket("+Inf"), 2.0);
        let buckets = text
            .lines()
            .filter(|l| l.starts_with(&format!("{family}_bucket")))
            .count();
        assert_eq!(buckets, bounds.len() + 1, "{text}");
        assert!(text.contains(&format!("{family}_count 2")), "{text}");
        // Process metrics are sampled at each render.
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
    }
}
