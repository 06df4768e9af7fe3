//! `GET /metrics` of a real 3-member cluster (processes on loopback):
//!
//! - every metric raftwork's catalogue declares is exposed, every histogram
//!   with the catalogue's buckets and in a well-formed exposition
//!   (cumulative buckets, `+Inf` equal to `_count`), and the values say
//!   what happened (one leader, fsyncs observed, heartbeats timed, writes
//!   counted by route);
//! - every metric the Grafana dashboard (`deploy/grafana/raftwork.json`)
//!   queries is exposed by a live cluster;
//! - a leader killed with -9 is seen as a leader change by the survivors;
//! - a real Prometheus (Debian's package, installed here if absent) scrapes
//!   the cluster under load, and PromQL through its HTTP API finds the
//!   leader change and the fsync histogram's observations; `promtool check
//!   metrics` passes each member's exposition.
//!
//! Every wait is a poll with a generous hang guard, never a timing
//! assertion.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::members::*;
use raftwork::metrics::MetricKind;
use serde_json::Value;

/// A sample's labels, `(name, value)` in the order printed.
type Labels = Vec<(String, String)>;

/// One exposition, parsed: `# TYPE` per family and every sample.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    /// (name, labels as `k="v"` pairs in order, value).
    samples: Vec<(String, Labels, f64)>,
}

impl Exposition {
    /// Parses Prometheus's text format strictly enough to catch a broken
    /// line: a sample is `name{k="v",…} value`, a comment is HELP or TYPE.
    fn parse(text: &str) -> Self {
        let mut out = Exposition::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect(line);
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
                out.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            assert!(!line.starts_with('#'), "unknown comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect(line);
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect(line);
                    let labels = body
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect(line);
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad name: {line}"
            );
            out.samples.push((name.to_string(), labels, value));
        }
        out
    }

    fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|(n, _, _)| n.clone()).collect()
    }

    /// The value of `name` with exactly these labels (none for `&[]`).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| *v)
    }

    /// Every series of `name`, by its labels.
    fn series(&self, name: &str) -> Vec<(&[(String, String)], f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l.as_slice(), *v))
            .collect()
    }

    /// Checks every histogram family: buckets as the catalogue says,
    /// cumulative, `+Inf` equal to `_count`.
    fn check_histograms(&self, buckets_of: &BTreeMap<&str, &[f64]>) {
        for (family, kind) in &self.types {
            if kind != "histogram" {
                continue;
            }
            let expected = buckets_of
                .get(family.as_str())
                .unwrap_or_else(|| panic!("histogram {family} is not in the catalogue"));
            // Group the buckets by their other labels.
            let mut groups: BTreeMap<Labels, Vec<(String, f64)>> = BTreeMap::new();
            for (labels, v) in self.series(&format!("{family}_bucket")) {
                let le = labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .expect("le")
                    .1
                    .clone();
                let rest: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                groups.entry(rest).or_default().push((le, v));
            }
            assert!(!groups.is_empty(), "{family} has no buckets");
            for (rest, buckets) in groups {
                let les: Vec<String> = buckets.iter().map(|(le, _)| le.clone()).collect();
                let mut want: Vec<String> = expected
                    .iter()
                    .map(|b| b.parse_back(&les))
                    .collect::<Vec<_>>();
                want.push("+Inf".into());
                assert_eq!(les, want, "{family}{rest:?} buckets");
                let counts: Vec<f64> = buckets.iter().map(|(_, v)| *v).collect();
                assert!(
                    counts.windows(2).all(|w| w[0] <= w[1]),
                    "{family}{rest:?}: buckets not cumulative: {counts:?}"
                );
                let labels: Vec<(&str, &str)> =
                    rest.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let count = self
                    .value(&format!("{family}_count"), &labels)
                    .unwrap_or_else(|| panic!("{family}{rest:?} has no _count"));
                assert_eq!(*counts.last().unwrap(), count, "{family}{rest:?}: +Inf");
                assert!(
                    self.value(&format!("{family}_sum"), &labels).is_some(),
                    "{family}{rest:?} has no _sum"
                );
            }
        }
    }
}

/// A bucket bound as the exposition prints it (the same float, whatever
/// its formatting).
trait ParseBack {
    fn parse_back(&self, printed: &[String]) -> String;
}

impl ParseBack for f64 {
    fn parse_back(&self, printed: &[String]) -> String {
        printed
            .iter()
            .find(|p| p.parse::<f64>().ok() == Some(*self))
            .cloned()
            .unwrap_or_else(|| format!("{self} (missing from {printed:?})"))
    }
}

fn scrape(m: &Member) -> Exposition {
    let (status, body) = m.req("GET", "/metrics", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    Exposition::parse(&String::from_utf8(body).expect("UTF-8"))
}

/// The names a family of `kind` is exposed under.
fn exposed_as(name: &str, kind: MetricKind) -> Vec<String> {
    match kind {
        MetricKind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| format!("{name}{s}"))
            .collect(),
        _ => vec![name.to_string()],
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every metric name the dashboard's queries use.
fn dashboard_metrics() -> BTreeSet<String> {
    let path = repo_root().join("deploy/grafana/raftwork.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    if (k == "expr" || k == "definition" || k == "query") && v.is_string() {
                        out.push(v.as_str().unwrap().to_string());
                    } else {
                        walk(v, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    assert!(
        exprs.len() > 20,
        "the dashboard has queries: {}",
        exprs.len()
    );
    let mut names = BTreeSet::new();
    for e in exprs {
        let mut word = String::new();
        for c in e.chars().chain(std::iter::once(' ')) {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                word.push(c);
            } else {
                if word.starts_with("raftwork_") || word.starts_with("process_") {
                    names.insert(std::mem::take(&mut word));
                }
                word.clear();
            }
        }
    }
    names
}

/// Writes through each member until `stop`, ignoring failures (members
/// die and elections happen under it).
fn spawn_load(apis: Vec<SocketAddr>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut ok = 0u64;
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let api = apis[i % apis.len()];
            let path = format!("/v1/kv/load-{}", i % 100);
            if let Ok((200, _)) = request(api, "PUT", &path, b"value") {
                ok += 1;
            }
            // A linearizable read now and then: ReadIndex.
            if i.is_multiple_of(10) {
                let _ = request(api, "GET", &path, b"");
            }
            i += 1;
        }
        ok
    })
}

fn leader_index(ms: &[Member], leader: &str) -> usize {
    ms.iter().position(|m| m.name == leader).unwrap()
}

/// A put on a single durable member makes one persist that must sync
/// (its entry) and one that need not (the commit index moving after it).
/// Only the first goes to the sync thread: the second is acknowledged on
/// the ready loop, since no sync is in flight then. Sequential puts, so
/// the count is exact up to the few persists of start-up; handing every
/// persist to the thread would count two per put.
#[test]
fn a_put_hands_one_persist_to_the_sync_thread() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 1);
    ms[0].start(&initial);
    ms[0].wait_ready();
    put(&mut ms[0], "warm", "v");
    let handoffs = |m: &Member| {
        scrape(m)
            .value("raftwork_server_persist_handoffs_total", &[])
            .expect("the counter is exposed")
    };
    let before = handoffs(&ms[0]);
    const PUTS: usize = 200;
    for i in 0..PUTS {
        put(&mut ms[0], &format!("k{i}"), "v");
    }
    let handed = handoffs(&ms[0]) - before;
    assert!(
        handed >= PUTS as f64 && handed < 1.25 * PUTS as f64,
        "{handed} persists handed to the sync thread for {PUTS} puts"
    );
}

#[test]
fn a_live_cluster_exposes_the_catalogue_and_the_dashboards_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 3);
    for m in &mut ms {
        m.start(&initial);
    }
    let leader = agreed_leader(&mut ms, &[0, 1, 2]);
    for m in &mut ms {
        let name = m.name.clone();
        put(m, &format!("k-{name}"), "v");
        let (status, _) = m.req("GET", &format!("/v1/kv/k-{name}"), b"");
        assert_eq!(status, 200);
    }
    let l = leader_index(&ms, &leader);
    let leader_id = |m: &Member| raftwork_server::cluster::member_id("cluster-test", &m.name);
    // The leader times a heartbeat round trip to each follower.
    ms[l].wait("heartbeat round trips to both followers", |m| {
        let e = scrape(m);
        let timed = e
            .series("raftwork_network_peer_round_trip_time_seconds_count")
            .iter()
            .filter(|(_, v)| *v > 0.0)
            .count();
        (timed == 2).then_some(())
    });

    let scrapes: Vec<Exposition> = ms.iter().map(scrape).collect();
    let buckets_of: BTreeMap<&str, &[f64]> = raftwork::metrics::catalogue()
        .chain(raftwork_server::telemetry::SERVER)
        .filter(|d| d.kind == MetricKind::Histogram)
        .map(|d| (d.name, d.buckets))
        .collect();
    let mut exposed = BTreeSet::new();
    for (m, e) in ms.iter().zip(&scrapes) {
        e.check_histograms(&buckets_of);
        exposed.extend(e.names());
        // The catalogue's kinds are the exposition's types.
        for d in raftwork::metrics::catalogue().chain(raftwork_server::telemetry::SERVER) {
            if let Some(t) = e.types.get(d.name) {
                let want = match d.kind {
                    MetricKind::Counter => "counter",
                    MetricKind::Gauge => "gauge",
                    MetricKind::Histogram => "histogram",
                };
                assert_eq!(t, want, "{} on {}", d.name, m.name);
            }
        }
        // What happened, as each member counts it.
        let is_leader = (m.name == leader) as u8 as f64;
        assert_eq!(e.value("raftwork_server_is_leader", &[]), Some(is_leader));
        assert_eq!(e.value("raftwork_server_has_leader", &[]), Some(1.0));
        assert!(e.value("raftwork_server_leader_changes_seen_total", &[]) >= Some(1.0));
        assert!(
            e.value("raftwork_disk_wal_fsync_duration_seconds_count", &[]) > Some(0.0),
            "{}: no fsync observed",
            m.name
        );
        assert!(e.value("raftwork_server_commit_index", &[]) > Some(0.0));
        assert!(e.value("raftwork_server_proposals_applied_total", &[]) > Some(0.0));
        assert!(
            e.value(
                "raftwork_http_requests_total",
                &[
                    ("route", "/v1/kv/{*key}"),
                    ("method", "PUT"),
                    ("status", "200")
                ]
            ) >= Some(1.0),
            "{}: the PUT is not counted",
            m.name
        );
        assert!(e.value("process_resident_memory_bytes", &[]) > Some(0.0));
        // Traffic both ways between the leader and each follower
        // (followers do not talk to each other).
        for other in ms
            .iter()
            .filter(|o| o.name != m.name && (o.name == leader || m.name == leader))
        {
            let id = leader_id(other).to_string();
            for (name, label) in [
                ("raftwork_network_peer_sent_messages_total", "to"),
                ("raftwork_network_peer_sent_bytes_total", "to"),
                ("raftwork_network_peer_received_messages_total", "from"),
                ("raftwork_network_peer_received_bytes_total", "from"),
            ] {
                assert!(
                    e.value(name, &[(label, &id)]) > Some(0.0),
                    "{}: {name}{{{label}={id}}}",
                    m.name
                );
            }
        }
    }

    for d in raftwork::metrics::catalogue().chain(raftwork_server::telemetry::SERVER) {
        for name in exposed_as(d.name, d.kind) {
            assert!(
                exposed.contains(&name),
                "{name} is not exposed by any member"
            );
        }
    }
    let dashboard = dashboard_metrics();
    assert!(dashboard.len() > 30, "{dashboard:?}");
    let missing: Vec<_> = dashboard.difference(&exposed).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics no member exposes: {missing:?}"
    );

    // kill -9 the leader: each survivor counts the change.
    let before: Vec<f64> = scrapes
        .iter()
        .map(|e| {
            e.value("raftwork_server_leader_changes_seen_total", &[])
                .unwrap()
        })
        .collect();
    ms[l].kill9();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let new_leader = loop {
        let n = agreed_leader(&mut ms, &survivors);
        if n != leader {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for &i in &survivors {
        let e = scrape(&ms[i]);
        assert!(
            e.value("raftwork_server_leader_changes_seen_total", &[]) > Some(before[i]),
            "{}: leader change not counted",
            ms[i].name
        );
        let is_new = (ms[i].name == new_leader) as u8 as f64;
        assert_eq!(e.value("raftwork_server_is_leader", &[]), Some(is_new));
    }
}

/// `prometheus` and `promtool`: found, or installed from Debian (as root).
/// With `RAFTWORK_REQUIRE_PROMETHEUS` set (`.ci/run` sets it) a missing
/// Prometheus fails the test; without, the test says SKIPPED.
fn prometheus() -> Option<(PathBuf, PathBuf)> {
    let find = || {
        let p = PathBuf::from("/usr/bin/prometheus");
        let t = PathBuf::from("/usr/bin/promtool");
        (p.exists() && t.exists()).then_some((p, t))
    };
    if let Some(found) = find() {
        return Some(found);
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let installed = Command::new("sh")
            .args([
                "-c",
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        eprintln!("apt-get install prometheus: {installed:?}");
    }
    if let Some(found) = find() {
        return Some(found);
    }
    if std::env::var_os("RAFTWORK_REQUIRE_PROMETHEUS").is_some() {
        panic!(
            "prometheus needed (RAFTWORK_REQUIRE_PROMETHEUS is set): apt-get install prometheus"
        );
    }
    eprintln!("SKIPPED: prometheus is not installed (apt-get install prometheus)");
    None
}

/// A Prometheus server scraping `targets` every second, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn start(bin: &Path, dir: &Path, targets: &[SocketAddr]) -> Self {
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: raftwork\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start prometheus");
        Prometheus { child, addr, log }
    }

    /// The result vector of an instant PromQL query, as (labels, value).
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let mut encoded = String::new();
        for b in promql.bytes() {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                encoded.push(b as char);
            } else {
                encoded.push_str(&format!("%{b:02X}"));
            }
        }
        let path = format!("/api/v1/query?query={encoded}");
        let Ok((200, body)) = request(self.addr, "GET", &path, b"") else {
            return Vec::new();
        };
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], "success", "{promql}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let value: f64 = r["value"][1].as_str().unwrap().parse().unwrap();
                (r["metric"].clone(), value)
            })
            .collect()
    }

    /// Polls `promql` until `accept` takes its result.
    fn wait_for(&self, what: &str, promql: &str, accept: impl Fn(&[(Value, f64)]) -> bool) {
        let deadline = Instant::now() + GUARD;
        loop {
            let result = self.query(promql);
            if accept(&result) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what} ({promql} = {result:?}):\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_a_cluster_under_load_and_sees_a_leader_change() {
    let Some((prom_bin, promtool)) = prometheus() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 3);
    for m in &mut ms {
        m.start(&initial);
    }
    let leader = agreed_leader(&mut ms, &[0, 1, 2]);

    // promtool's own check of each member's exposition.
    for m in &ms {
        let (_, body) = m.req("GET", "/metrics", b"");
        let mut check = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        check.stdin.take().unwrap().write_all(&body).unwrap();
        let out = check.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics on {}: {}{}",
            m.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let apis: Vec<SocketAddr> = ms.iter().map(|m| m.api).collect();
    let prom = Prometheus::start(&prom_bin, tmp.path(), &apis);
    let stop = Arc::new(AtomicBool::new(false));
    let load = spawn_load(apis.clone(), stop.clone());

    // All three scraped, one leader among them.
    prom.wait_for(
        "three members scraped",
        "sum(raftwork_server_has_leader)",
        |r| r.len() == 1 && r[0].1 == 3.0,
    );
    prom.wait_for("one leader", "sum(raftwork_server_is_leader)", |r| {
        r.len() == 1 && r[0].1 == 1.0
    });
    // The fsync histogram has observations, and a quantile comes out of it.
    prom.wait_for(
        "fsyncs on every member",
        "raftwork_disk_wal_fsync_duration_seconds_count > 0",
        |r| r.len() == 3,
    );
    prom.wait_for(
        "an fsync p99",
        "histogram_quantile(0.99, sum by (le) (rate(raftwork_disk_wal_fsync_duration_seconds_bucket[30s])))",
        |r| r.len() == 1 && r[0].1.is_finite() && r[0].1 > 0.0,
    );
    prom.wait_for(
        "writes counted by route",
        "sum(rate(raftwork_http_requests_total{route=\"/v1/kv/{*key}\",method=\"PUT\"}[30s]))",
        |r| r.len() == 1 && r[0].1 > 0.0,
    );

    // Each survivor's count of leader changes as Prometheus has it now.
    let l = leader_index(&ms, &leader);
    let survivors: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let changes = |i: usize| -> f64 {
        let q = format!(
            "raftwork_server_leader_changes_seen_total{{instance=\"{}\"}}",
            ms[i].api
        );
        prom.query(&q).first().map_or(-1.0, |(_, v)| *v)
    };
    let before: Vec<f64> = survivors.iter().map(|&i| changes(i)).collect();
    assert!(before.iter().all(|&v| v >= 1.0), "{before:?}");

    ms[l].kill9();
    let new_leader = loop {
        let n = agreed_leader(&mut ms, &survivors);
        if n != leader {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for (k, &i) in survivors.iter().enumerate() {
        let q = format!(
            "raftwork_server_leader_changes_seen_total{{instance=\"{}\"}} > {}",
            ms[i].api, before[k]
        );
        prom.wait_for("the leader change counted", &q, |r| r.len() == 1);
    }
    let new = &ms[leader_index(&ms, &new_leader)];
    let q = format!("raftwork_server_is_leader{{instance=\"{}\"}} == 1", new.api);
    prom.wait_for("the new leader", &q, |r| r.len() == 1);
    prom.wait_for(
        "leadership lost by the old one",
        "increase(raftwork_server_leader_changes_seen_total[1m]) > 0",
        |r| r.len() == 2,
    );

    stop.store(true, Ordering::Relaxed);
    let writes = load.join().unwrap();
    assert!(writes > 0, "the load made no write");
}
