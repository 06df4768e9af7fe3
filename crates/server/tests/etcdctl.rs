//! The real `etcdctl` (Debian's etcd-client) against a 3-node raftwork
//! cluster and a 3-node etcd cluster (Debian's etcd-server) started by the
//! same test: the same script on both, outputs compared after
//! normalising what legitimately differs:
//!
//! * revisions are compared relative to each cluster's revision when the
//!   script starts (raftwork's own member records take the first few, etcd
//!   starts empty at 1);
//! * member, cluster and lease ids, raft terms, URLs and timings are
//!   masked (etcd draws ids at random, raftwork derives them);
//! * lease TTLs still to run may differ by a second.
//!
//! Needs `etcdctl` and `etcd` on the PATH, and for the aetcd test a Python
//! with Python's `aetcd` client (`RAFTWORK_AETCD_PYTHON`, default
//! `python3`). `.ci/run` installs them and sets `RAFTWORK_REQUIRE_ETCD`,
//! which makes a missing tool fail the tests; without it they say SKIPPED
//! (so that `cargo test` runs on a fresh machine).

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::free_port;
use common::members::{members, Member};
use serde_json::Value;

const GUARD: Duration = Duration::from_secs(60);

fn tools_present() -> bool {
    let found = |tool: &str, flag: &str| {
        Command::new(tool)
            .env("ETCDCTL_API", "3")
            .arg(flag)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if found("etcdctl", "version") && found("etcd", "--version") {
        return true;
    }
    missing("etcdctl and etcd (apt-get install etcd-client etcd-server)")
}

/// A tool these tests drive is missing: fatal where the run requires them
/// (`RAFTWORK_REQUIRE_ETCD`, which `.ci/run` sets after installing them),
/// else the test says SKIPPED, so that `cargo test` on a fresh machine runs.
fn missing(what: &str) -> bool {
    if std::env::var_os("RAFTWORK_REQUIRE_ETCD").is_some() {
        panic!("{what} needed (RAFTWORK_REQUIRE_ETCD is set)");
    }
    eprintln!("SKIPPED: {what} not installed; .ci/run installs them");
    false
}

/// `etcdctl` (API v3) against `endpoints`; (success, stdout, stderr).
fn etcdctl(endpoints: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(["--dial-timeout=5s", "--command-timeout=15s"])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A cluster the script runs against.
trait Target {
    fn name(&self) -> &'static str;
    /// Client endpoints, comma-separated.
    fn endpoints(&self) -> String;
    fn endpoint(&self, i: usize) -> String;
    /// Kills member `i` (SIGKILL).
    fn kill(&mut self, i: usize);
    fn logs(&self) -> String;
    /// Starts member `name`, already added at `peer_url`, to join the
    /// running cluster; its client endpoint.
    fn join(&mut self, dir: &Path, name: &str, peer_url: &str) -> String;
    /// Kills the member started last and starts it again from an empty
    /// data dir, as it first joined; `false` where not supported.
    fn restart_last(&mut self) -> bool {
        false
    }
}

struct Raftwork {
    ms: Vec<Member>,
    /// The `--initial-cluster` the last member joined with.
    joined_with: String,
}

impl Target for Raftwork {
    fn name(&self) -> &'static str {
        "raftwork"
    }
    fn endpoints(&self) -> String {
        (0..self.ms.len())
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }
    fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.ms[i].api)
    }
    fn kill(&mut self, i: usize) {
        self.ms[i].kill9();
    }
    fn join(&mut self, dir: &Path, name: &str, peer_url: &str) -> String {
        let peer = peer_url.trim_start_matches("http://").to_string();
        let initial = self
            .ms
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .chain([format!("{name}={peer}")])
            .collect::<Vec<_>>()
            .join(",");
        let mut m = Member {
            name: name.to_string(),
            api: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            peer,
            data: dir.join(name),
            log: dir.join(format!("{name}.log")),
            child: None,
        };
        m.start_with(&initial, &["--initial-cluster-state", "existing"]);
        self.ms.push(m);
        self.joined_with = initial;
        self.endpoint(self.ms.len() - 1)
    }
    fn restart_last(&mut self) -> bool {
        let m = self.ms.last_mut().expect("a member");
        if m.child.is_some() {
            m.kill9();
        }
        // From scratch, as it joined: it does not know it was removed.
        std::fs::remove_dir_all(&m.data).unwrap();
        m.start_with(&self.joined_with, &["--initial-cluster-state", "existing"]);
        true
    }
    fn logs(&self) -> String {
        self.ms
            .iter()
            .map(|m| format!("--- {}\n{}", m.name, m.logs()))
            .collect()
    }
}

fn start_raftwork(dir: &Path) -> Raftwork {
    let (mut ms, initial) = members(dir, 3);
    for m in ms.iter_mut() {
        m.start(&initial);
    }
    common::members::agreed_leader(&mut ms, &[0, 1, 2]);
    Raftwork {
        ms,
        joined_with: String::new(),
    }
}

struct Etcd {
    clients: Vec<SocketAddr>,
    /// `name=peer URL` of every member started.
    initial: Vec<String>,
    children: Vec<Option<Child>>,
    logs: Vec<PathBuf>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Target for Etcd {
    fn name(&self) -> &'static str {
        "etcd"
    }
    fn endpoints(&self) -> String {
        (0..self.clients.len())
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }
    fn endpoint(&self, i: usize) -> String {
        format!("http://{}", self.clients[i])
    }
    fn kill(&mut self, i: usize) {
        let mut c = self.children[i].take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }
    fn join(&mut self, dir: &Path, name: &str, peer_url: &str) -> String {
        self.initial.push(format!("{name}={peer_url}"));
        let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        self.clients.push(client);
        self.spawn(dir, name, client, peer_url, "existing");
        self.endpoint(self.clients.len() - 1)
    }
    fn logs(&self) -> String {
        self.logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect()
    }
}

impl Etcd {
    /// Starts member `name` of the cluster `self.initial` describes.
    fn spawn(&mut self, dir: &Path, name: &str, client: SocketAddr, peer: &str, state: &str) {
        let log = dir.join(format!("etcd-{name}.log"));
        let child = Command::new("etcd")
            .args(["--name", name])
            .arg("--data-dir")
            .arg(dir.join(format!("etcd-{name}")))
            .args(["--listen-client-urls", &format!("http://{client}")])
            .args(["--advertise-client-urls", &format!("http://{client}")])
            .args(["--listen-peer-urls", peer])
            .args(["--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &self.initial.join(",")])
            .args(["--initial-cluster-token", "etcdctl-test"])
            .args(["--initial-cluster-state", state])
            .args(["--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start etcd");
        self.children.push(Some(child));
        self.logs.push(log);
    }
}

/// A 3-member etcd, named as raftwork's test members are (n1..n3).
fn start_etcd(dir: &Path) -> Etcd {
    let clients: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let peers: Vec<String> = (0..3)
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let mut etcd = Etcd {
        clients: clients.clone(),
        initial: (0..3).map(|i| format!("n{}={}", i + 1, peers[i])).collect(),
        children: Vec::new(),
        logs: Vec::new(),
    };
    for i in 0..3 {
        etcd.spawn(dir, &format!("n{}", i + 1), clients[i], &peers[i], "new");
    }
    let deadline = Instant::now() + GUARD;
    while !etcdctl(
        &etcd.endpoints(),
        &["endpoint", "health", "--cluster"],
        None,
    )
    .0
    {
        assert!(
            Instant::now() < deadline,
            "etcd not healthy:\n{}",
            etcd.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    etcd
}

/// Runs `f` against a 3-member etcd, then a 3-member raftwork, each in
/// its own temp dir; what it returned for each, etcd's first.
fn on_both<T>(mut f: impl FnMut(&mut dyn Target, &Path) -> T) -> Vec<T> {
    let dir = tempfile::tempdir().unwrap();
    ["etcd", "raftwork"]
        .into_iter()
        .map(|kind| {
            let d = dir.path().join(kind);
            std::fs::create_dir_all(&d).unwrap();
            let mut target: Box<dyn Target> = match kind {
                "etcd" => Box::new(start_etcd(&d)),
                _ => Box::new(start_raftwork(&d)),
            };
            f(target.as_mut(), &d)
        })
        .collect()
}

/// The cluster's current revision.
fn revision(t: &dyn Target) -> i64 {
    let (ok, out, err) = etcdctl(
        &t.endpoints(),
        &["get", "revision-probe", "-w", "json"],
        None,
    );
    assert!(ok, "{}: {err}", t.name());
    let v: Value = serde_json::from_str(&out).unwrap();
    v["header"]["revision"].as_i64().unwrap()
}

/// Masks what legitimately differs between the clusters (module header);
/// `base` is the revision the script started at.
fn normalise(text: &str, base: i64) -> String {
    let hex_id = regex::Regex::new(r"\b[0-9a-f]{16}\b").unwrap();
    let url = regex::Regex::new(r"https?://127\.0\.0\.1:\d+").unwrap();
    let took = regex::Regex::new(r"took = [0-9.]+[µmn]?s").unwrap();
    let remaining = regex::Regex::new(r"remaining\(\d+s\)").unwrap();
    let compacted = regex::Regex::new(r"compacted revision (\d+)").unwrap();
    let text = hex_id.replace_all(text, "<id>");
    let text = url.replace_all(&text, "<url>");
    let text = took.replace_all(&text, "took = <t>");
    let text = remaining.replace_all(&text, "remaining(<s>)");
    compacted
        .replace_all(&text, |c: &regex::Captures| {
            format!("compacted revision {}", c[1].parse::<i64>().unwrap() - base)
        })
        .into_owned()
}

/// JSON output with revisions made relative to `base` and ids masked.
fn normalise_json(text: &str, base: i64) -> Value {
    fn walk(v: &mut Value, base: i64) {
        match v {
            Value::Object(map) => {
                for (k, x) in map.iter_mut() {
                    match k.as_str() {
                        "cluster_id" | "member_id" | "raft_term" | "ID" | "lease" => {
                            *x = Value::from("<id>")
                        }
                        "revision" | "create_revision" | "mod_revision" => {
                            if let Some(n) = x.as_i64() {
                                *x = Value::from(n - base);
                            }
                        }
                        _ => walk(x, base),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|x| walk(x, base)),
            _ => {}
        }
    }
    let mut v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    walk(&mut v, base);
    v
}

/// One step of the script: etcdctl arguments (`{rev+N}` is the start
/// revision plus N, `{lease}` the last lease granted), stdin, and whether
/// the output is JSON.
struct Step {
    args: &'static str,
    stdin: Option<&'static str>,
    json: bool,
    /// Seconds to wait after it (lease expiry).
    sleep_s: u64,
}

const fn step(args: &'static str) -> Step {
    Step {
        args,
        stdin: None,
        json: false,
        sleep_s: 0,
    }
}

const TXN_SUCCESS: &str =
    "value(\"t/a\") = \"11\"\nmod(\"t/c\") > \"0\"\n\nput t/txn yes\nget t/a\n\nput t/txn no\n\n";
const TXN_FAILURE: &str =
    "version(\"t/a\") = \"7\"\n\nput t/txn yes\n\ndel t/txn\nget t/ --prefix --keys-only\n\n";

fn script() -> Vec<Step> {
    vec![
        step("put t/a 1"),
        step("put t/b 2"),
        step("put t/c 3"),
        step("put t/a 11"),
        step("put t/d 4 --prev-kv"),
        step("put t/d 44 --prev-kv"),
        step("get t/a"),
        step("get t/ --prefix"),
        step("get t/ --prefix --limit=2"),
        step("get t/ --prefix --keys-only"),
        step("get t/a --print-value-only"),
        step("get t/a --rev={rev+1}"),
        step("get t/ --prefix --rev={rev+3}"),
        step("get t/ --prefix --sort-by=MODIFY --order=DESCEND"),
        step("get t/a t/c"),
        step("get t/ --prefix --count-only -w json"),
        Step {
            json: true,
            ..step("get t/ --prefix -w json")
        },
        Step {
            json: true,
            ..step("put t/e 5 --prev-kv -w json")
        },
        Step {
            stdin: Some(TXN_SUCCESS),
            ..step("txn")
        },
        Step {
            stdin: Some(TXN_FAILURE),
            ..step("txn")
        },
        Step {
            stdin: Some(TXN_SUCCESS),
            json: true,
            ..step("txn -w json")
        },
        step("del t/b"),
        step("del t/nothing"),
        step("del t/d --prev-kv"),
        step("lease grant 100"),
        step("put t/l leased --lease={lease}"),
        step("lease timetolive {lease} --keys"),
        step("lease keep-alive --once {lease}"),
        step("lease list"),
        step("lease revoke {lease}"),
        step("get t/l"),
        step("lease timetolive {lease}"),
        step("lease grant 2"),
        Step {
            sleep_s: 5,
            ..step("put t/short gone-soon --lease={lease}")
        },
        step("get t/short"),
        step("lease timetolive {lease}"),
        step("compaction {rev+3}"),
        step("get t/a --rev={rev+2}"),
        step("get t/a --rev={rev+3}"),
        step("get t/a --rev=100000"),
        step("alarm list"),
        step("endpoint health --cluster"),
        step("put '' empty-key"),
        step("del t/ --prefix"),
        step("get t/ --prefix"),
    ]
}

/// Runs the script; the transcript, normalised.
fn run_script(t: &dyn Target, dir: &Path) -> Vec<String> {
    let base = revision(t);
    let eps = t.endpoints();
    let mut lease = String::new();
    let mut transcript = Vec::new();
    for s in script() {
        let args = s
            .args
            .replace("{lease}", &lease)
            .replace("{rev+1}", &(base + 1).to_string())
            .replace("{rev+2}", &(base + 2).to_string())
            .replace("{rev+3}", &(base + 3).to_string());
        let words: Vec<String> = args
            .split(' ')
            .map(|w| {
                if w == "''" {
                    String::new()
                } else {
                    w.to_string()
                }
            })
            .collect();
        let words: Vec<&str> = words.iter().map(|w| w.as_str()).collect();
        let (ok, out, err) = etcdctl(&eps, &words, s.stdin);
        if let Some(id) = out
            .strip_prefix("lease ")
            .and_then(|r| r.split_once(" granted"))
            .map(|(id, _)| id.to_string())
        {
            lease = id;
        }
        // etcdctl's error line, without its client-side log lines.
        let err_line = err
            .lines()
            .filter(|l| l.starts_with("Error:"))
            .collect::<Vec<_>>()
            .join("\n");
        let out = if s.json && ok {
            normalise_json(&out, base).to_string()
        } else {
            normalise(&out, base)
        };
        transcript.push(format!(
            "$ etcdctl {}\n{}{out}{}",
            s.args,
            if ok { "" } else { "[failed] " },
            err_line
        ));
        if s.sleep_s > 0 {
            std::thread::sleep(Duration::from_secs(s.sleep_s));
        }
    }
    let (ok, _, err) = etcdctl(
        &t.endpoint(0),
        &["snapshot", "save", dir.join("snap.db").to_str().unwrap()],
        None,
    );
    transcript.push(format!(
        "$ etcdctl snapshot save: {ok} {}",
        err.contains("saved")
    ));
    transcript
}

#[test]
fn etcdctl_prints_the_same_for_raftwork_as_for_etcd() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd_dir = dir.path().join("etcd");
    let rw_dir = dir.path().join("raftwork");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    std::fs::create_dir_all(&rw_dir).unwrap();
    let etcd = start_etcd(&etcd_dir);
    let want = run_script(&etcd, &etcd_dir);
    drop(etcd);
    let rw = start_raftwork(&rw_dir);
    let got = run_script(&rw, &rw_dir);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w, "raftwork (left) and etcd (right) differ");
    }
    assert_eq!(got.len(), want.len());
    let _ = rw.logs();
}

/// The index of the member that leads, from `endpoint status`.
fn leader_index(t: &dyn Target, alive: &[usize]) -> usize {
    let deadline = Instant::now() + GUARD;
    loop {
        // host:port, not URLs: etcdctl 3.4 dials each endpoint for its
        // status with the URL as the HTTP/2 :authority, which hyper's h2
        // refuses as malformed (etcd's Go server takes it). See
        // crates/server/README.md.
        let eps: Vec<String> = alive
            .iter()
            .map(|&i| t.endpoint(i).trim_start_matches("http://").to_string())
            .collect();
        let (ok, out, err) = etcdctl(&eps.join(","), &["endpoint", "status", "-w", "json"], None);
        if ok {
            let v: Value = serde_json::from_str(out.trim()).unwrap();
            for (n, s) in v.as_array().unwrap().iter().enumerate() {
                let st = &s["Status"];
                if st["leader"].as_u64().is_some() && st["leader"] == st["header"]["member_id"] {
                    return alive[n];
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}: no leader: {out}{err}\n{}",
            t.name(),
            t.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A put that is retried until it succeeds, each try with its own value:
/// a try whose outcome is unknown may be applied too.
fn put_until_done(eps: &str, key: &str, value: &str) {
    let deadline = Instant::now() + GUARD;
    for attempt in 0.. {
        if etcdctl(eps, &["put", key, &format!("{value}.{attempt}")], None).0 {
            return;
        }
        assert!(Instant::now() < deadline, "put {key} never succeeded");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !f() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_etcdctl(eps: &str, args: &[&str], stdout: &Path) -> Child {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={eps}"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(stdout).unwrap())
        .stderr(std::fs::File::create(stdout.with_extension("err")).unwrap())
        .spawn()
        .expect("run etcdctl")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A watch through a leader kill: the watcher (on every endpoint, so
/// etcdctl may move) sees every put once, in revision order, no gap.
/// Returns the watched (key, value) sequence.
fn watch_through_a_leader_kill(t: &mut dyn Target, dir: &Path) -> Vec<(String, String)> {
    let out = dir.join("watch.out");
    let eps = t.endpoints();
    let start = revision(t) + 1;
    let mut watch = spawn_etcdctl(
        &eps,
        &[
            "watch",
            "w/",
            "--prefix",
            "--prev-kv",
            "-w",
            "json",
            &format!("--rev={start}"),
        ],
        &out,
    );
    for i in 0..10 {
        put_until_done(&eps, &format!("w/{i:02}"), "before");
    }
    let leader = leader_index(t, &[0, 1, 2]);
    t.kill(leader);
    let alive: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let eps_alive: Vec<String> = alive.iter().map(|&i| t.endpoint(i)).collect();
    let eps_alive = eps_alive.join(",");
    for i in 10..20 {
        put_until_done(&eps_alive, &format!("w/{i:02}"), "after");
    }
    let last = revision_at(&eps_alive);
    // Every revision from the start to the last put, once each, in order.
    let mut seen: Vec<(i64, String, String)> = Vec::new();
    wait_for("the watch to catch up", || {
        seen = watched(&read(&out));
        seen.last().is_some_and(|(r, _, _)| *r >= last)
    });
    let _ = watch.kill();
    let _ = watch.wait();
    let revs: Vec<i64> = seen.iter().map(|(r, _, _)| *r).collect();
    let want: Vec<i64> = (start..=last).collect();
    assert_eq!(
        revs,
        want,
        "{}: watched revisions (a gap or a duplicate)",
        t.name()
    );
    seen.into_iter().map(|(_, k, v)| (k, v)).collect()
}

fn revision_at(eps: &str) -> i64 {
    let (ok, out, err) = etcdctl(eps, &["get", "revision-probe", "-w", "json"], None);
    assert!(ok, "{err}");
    serde_json::from_str::<Value>(&out).unwrap()["header"]["revision"]
        .as_i64()
        .unwrap()
}

/// (mod revision, key, value) of every event in `etcdctl watch -w json`
/// output (one JSON object per response).
fn watched(text: &str) -> Vec<(i64, String, String)> {
    use base64::Engine as _;
    let b64 = |v: &Value| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap_or(""))
                .unwrap(),
        )
        .unwrap()
    };
    let mut events = Vec::new();
    for line in text.lines().filter(|l| l.starts_with('{')) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue; // a line still being written
        };
        for e in v["Events"].as_array().into_iter().flatten() {
            let kv = &e["kv"];
            events.push((
                kv["mod_revision"].as_i64().unwrap(),
                b64(&kv["key"]),
                b64(&kv["value"]),
            ));
        }
    }
    events
}

/// Two contenders for a lock never hold it at once, and a holder killed
/// without unlocking passes it on when its session's lease expires; an
/// election's leader is replaced the same way.
fn lock_and_elect(t: &dyn Target, dir: &Path) {
    let eps = t.endpoints();
    let log = dir.join("lock.log");
    let holder = |name: &str| {
        let path = dir.join(format!("hold-{name}.sh"));
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho {name} in >> {log}\nsleep 1\necho {name} out >> {log}\n",
                log = log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    };
    let (a, b) = (holder("A"), holder("B"));
    eprintln!("{}: lock", t.name());
    let mut ca = spawn_etcdctl(
        &eps,
        &["lock", "L", a.to_str().unwrap()],
        &dir.join("a.out"),
    );
    wait_for("A to hold the lock", || read(&log).contains("A in"));
    let mut cb = spawn_etcdctl(
        &eps,
        &["lock", "L", b.to_str().unwrap()],
        &dir.join("b.out"),
    );
    assert!(ca.wait().unwrap().success());
    assert!(cb.wait().unwrap().success());
    assert_eq!(
        read(&log),
        "A in\nA out\nB in\nB out\n",
        "{}: the lock was held twice at once",
        t.name()
    );

    eprintln!("{}: lock holder killed", t.name());
    // A holder killed while it holds the lock (its session's TTL is 2 s).
    let mut holder = spawn_etcdctl(
        &eps,
        &["lock", "--ttl=2", "K", "sleep", "600"],
        &dir.join("c.out"),
    );
    wait_for("the holder's lock key", || {
        let (ok, out, _) = etcdctl(&eps, &["get", "K/", "--prefix", "--keys-only"], None);
        ok && out.contains("K/")
    });
    holder.kill().unwrap();
    holder.wait().unwrap();
    let (ok, out, err) = etcdctl(&eps, &["lock", "K", "echo", "next-holder"], None);
    assert!(
        ok && out.contains("next-holder"),
        "{}: {out} {err}",
        t.name()
    );

    eprintln!("{}: elect", t.name());
    // An election: p1 leads until killed, then p2.
    let mut p1 = spawn_etcdctl(&eps, &["elect", "E", "p1"], &dir.join("p1.out"));
    // `elect -l` observes: it prints each leader (key, then value) as the
    // election changes hands.
    let observed = dir.join("observer.out");
    let mut observer = spawn_etcdctl(&eps, &["elect", "-l", "E"], &observed);
    let leader_is = |who: &str| read(&observed).lines().last() == Some(who);
    wait_for("p1 to lead", || leader_is("p1"));
    let mut p2 = spawn_etcdctl(&eps, &["elect", "E", "p2"], &dir.join("p2.out"));
    std::thread::sleep(Duration::from_millis(500));
    assert!(leader_is("p1"), "{}: p2 took over a live leader", t.name());
    p1.kill().unwrap();
    p1.wait().unwrap();
    wait_for("p2 to lead once p1's lease expired", || leader_is("p2"));
    let _ = p2.kill();
    let _ = p2.wait();
    let _ = observer.kill();
    let _ = observer.wait();
}

#[test]
fn watch_lock_and_elect_through_failures_as_on_etcd() {
    if !tools_present() {
        return;
    }
    let results = on_both(|target, d| {
        lock_and_elect(target, d);
        eprintln!("{}: watch", target.name());
        watch_through_a_leader_kill(target, d)
    });
    // Both watchers saw the puts of the script in order; a put tried again
    // after an unknown outcome may show twice, under another value.
    for w in &results {
        let keys: Vec<&str> = w.iter().map(|(k, _)| k.as_str()).collect();
        let mut distinct = keys.clone();
        distinct.dedup();
        let want: Vec<String> = (0..20).map(|i| format!("w/{i:02}")).collect();
        assert_eq!(distinct, want);
    }
}

/// Over `--quota-backend-bytes` a member raises NOSPACE: puts are refused
/// through etcdctl and through REST (507) until data is deleted and
/// compacted and the alarm disarmed; deletes still work meanwhile.
#[test]
fn nospace_refuses_puts_until_disarmed() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_with(dir.path(), &["--quota-backend-bytes", "20000"]);
    let ep = server.url.trim_start_matches("http://").to_string();
    let value = "x".repeat(30_000);
    let (ok, _, err) = etcdctl(&ep, &["put", "big", &value], None);
    assert!(ok, "{err}");
    wait_for("the NOSPACE alarm", || {
        etcdctl(&ep, &["alarm", "list"], None)
            .1
            .contains("alarm:NOSPACE")
    });
    let (ok, _, err) = etcdctl(&ep, &["put", "small", "v"], None);
    assert!(
        !ok && err.contains("etcdserver: mvcc: database space exceeded"),
        "{err}"
    );
    let addr: SocketAddr = ep.parse().unwrap();
    let (status, body) = common::members::request(addr, "PUT", "/v1/kv/small", b"v").unwrap();
    assert_eq!(status, 507, "{}", String::from_utf8_lossy(&body));
    // Deletes work; the history still holds the value until compacted.
    assert!(etcdctl(&ep, &["del", "big"], None).0);
    let rev = revision_at(&ep);
    assert!(etcdctl(&ep, &["compaction", &rev.to_string()], None).0);
    let (ok, out, err) = etcdctl(&ep, &["alarm", "disarm"], None);
    assert!(ok && out.contains("alarm:NOSPACE"), "{out}{err}");
    let (ok, _, err) = etcdctl(&ep, &["put", "small", "v"], None);
    assert!(ok, "{err}");
    assert_eq!(
        etcdctl(&ep, &["get", "small", "--print-value-only"], None).1,
        "v\n"
    );
}

/// `curl` against etcd's JSON gateway, as etcd's documentation shows it;
/// the answer as normalised JSON lines.
fn curl(base: &str, path: &str, body: &str, max_time_s: Option<u64>) -> Vec<Value> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-N",
        "-L",
        &format!("{base}{path}"),
        "-X",
        "POST",
        "-d",
        body,
    ]);
    if let Some(s) = max_time_s {
        cmd.args(["--max-time", &s.to_string()]);
    }
    let out = cmd.output().expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The gateway session of etcd's documentation: put, range, a streamed
/// watch, txns, lease grant and keep-alive; and `GET /version`.
fn gateway_session(base: &str, dir: &Path) -> Vec<String> {
    let mut log = Vec::new();
    let probe = curl(base, "/v3/kv/range", r#"{"key": "cHJvYmU="}"#, None);
    let rev0: i64 = probe[0]["header"]["revision"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut note = |what: &str, answers: Vec<Value>| {
        for a in answers {
            log.push(format!("{what}: {}", normalise_gateway(a, rev0)));
        }
    };
    // A watch on foo, streamed by curl while the puts run.
    let watch_out = dir.join("gateway-watch.out");
    let mut watch = Command::new("curl")
        .args(["-s", "-N", &format!("{base}/v3/watch"), "-X", "POST", "-d"])
        .arg(r#"{"create_request": {"key":"Zm9v"} }"#)
        .stdout(std::fs::File::create(&watch_out).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    note(
        "put",
        curl(
            base,
            "/v3/kv/put",
            r#"{"key": "Zm9v", "value": "YmFy"}"#,
            None,
        ),
    );
    note(
        "range",
        curl(base, "/v3/kv/range", r#"{"key": "Zm9v"}"#, None),
    );
    note(
        "range_end",
        curl(
            base,
            "/v3/kv/range",
            r#"{"key": "Zm9v", "range_end": "Zm9w"}"#,
            None,
        ),
    );
    let txn_create = format!(
        r#"{{"compare":[{{"target":"CREATE","key":"Zm9v","createRevision":"{}"}}],"success":[{{"requestPut":{{"key":"Zm9v","value":"YmFy"}}}}]}}"#,
        rev0 + 1
    );
    note("txn create", curl(base, "/v3/kv/txn", &txn_create, None));
    note(
        "txn version",
        curl(
            base,
            "/v3/kv/txn",
            r#"{"compare":[{"version":"4","result":"EQUAL","target":"VERSION","key":"Zm9v"}],"success":[{"requestRange":{"key":"Zm9v"}}]}"#,
            None,
        ),
    );
    note(
        "delete",
        curl(
            base,
            "/v3/kv/deleterange",
            r#"{"key": "Zm9v", "prev_kv": true}"#,
            None,
        ),
    );
    let grant = curl(base, "/v3/lease/grant", r#"{"TTL": 30}"#, None);
    let id = grant[0]["ID"].as_str().unwrap().to_string();
    note("grant", grant);
    note(
        "keepalive",
        curl(
            base,
            "/v3/lease/keepalive",
            &format!(r#"{{"ID": {id}}}"#),
            None,
        ),
    );
    note(
        "timetolive",
        curl(
            base,
            "/v3/lease/timetolive",
            &format!(r#"{{"ID": {id}, "keys": true}}"#),
            None,
        ),
    );
    note(
        "revoke",
        curl(
            base,
            "/v3/lease/revoke",
            &format!(r#"{{"ID": {id}}}"#),
            None,
        ),
    );
    note(
        "empty key",
        curl(base, "/v3/kv/put", r#"{"value": "YmFy"}"#, None),
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = watch.kill();
    let _ = watch.wait();
    let watched: Vec<Value> = read(&watch_out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    note("watch", watched);
    let out = Command::new("curl")
        .args(["-s", &format!("{base}/version")])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    log.push(format!(
        "version has etcdserver: {}",
        v["etcdserver"].is_string()
    ));
    log
}

/// Gateway JSON with ids and terms masked, revisions relative to `base`
/// (strings, as the gateway writes 64-bit integers), TTLs still to run
/// rounded away.
fn normalise_gateway(mut v: Value, base: i64) -> Value {
    fn walk(v: &mut Value, base: i64) {
        match v {
            Value::Object(map) => {
                for (k, x) in map.iter_mut() {
                    match k.as_str() {
                        "cluster_id" | "member_id" | "raft_term" | "ID" | "watch_id" => {
                            *x = Value::from("<id>")
                        }
                        "TTL" => *x = Value::from("<ttl>"),
                        "revision" | "create_revision" | "mod_revision" => {
                            if let Some(n) = x.as_str().and_then(|s| s.parse::<i64>().ok()) {
                                *x = Value::from((n - base).to_string());
                            }
                        }
                        _ => walk(x, base),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|x| walk(x, base)),
            _ => {}
        }
    }
    walk(&mut v, base);
    v
}

#[test]
fn the_json_gateway_answers_as_etcds() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let etcd_dir = dir.path().join("etcd");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    let etcd = start_etcd(&etcd_dir);
    let want = gateway_session(&etcd.endpoint(0), &etcd_dir);
    drop(etcd);
    let rw_dir = dir.path().join("raftwork");
    std::fs::create_dir_all(&rw_dir).unwrap();
    let rw = start_raftwork(&rw_dir);
    let got = gateway_session(&rw.endpoint(1), &rw_dir);
    for (w, g) in want.iter().zip(&got) {
        assert_eq!(g, w, "raftwork (left) and etcd (right) differ");
    }
    assert_eq!(got.len(), want.len(), "{got:#?}\n{want:#?}");
}

/// Hashes agree across members (after a lease expired: every member
/// deleted its key at the same revision), `move-leader` moves leadership
/// to the member named, and `member remove` removes one, leaving a
/// working cluster: on etcd and on raftwork alike.
fn hashkv_move_leader_and_remove(t: &dyn Target) {
    let hostport = |i: usize| t.endpoint(i).trim_start_matches("http://").to_string();
    let all = (0..3).map(hostport).collect::<Vec<_>>().join(",");
    // A key on a 2 s lease, left to expire: every member must delete it at
    // the same revision (the hash covers every version, deletions too).
    let (ok, out, err) = etcdctl(&t.endpoints(), &["lease", "grant", "2"], None);
    assert!(ok, "{err}");
    let lease = out.split_whitespace().nth(1).unwrap().to_string();
    let (ok, _, err) = etcdctl(
        &t.endpoints(),
        &["put", "h/leased", "v", &format!("--lease={lease}")],
        None,
    );
    assert!(ok, "{err}");
    for i in 0..5 {
        put_until_done(&t.endpoints(), &format!("h/{i}"), "v");
    }
    // Every member applied the puts and the expiry once a linearizable
    // read on each saw them; then their hashes at the current revision
    // agree.
    for i in 0..3 {
        wait_for("the last put and the expiry everywhere", || {
            let (_, out, _) = etcdctl(
                &hostport(i),
                &["get", "h/", "--prefix", "--keys-only"],
                None,
            );
            out.contains("h/4") && !out.contains("h/leased")
        });
    }
    let (ok, out, err) = etcdctl(&all, &["endpoint", "hashkv"], None);
    assert!(ok, "{}: {err}", t.name());
    let hashes: std::collections::BTreeSet<&str> =
        out.lines().filter_map(|l| l.split(", ").nth(1)).collect();
    assert_eq!(hashes.len(), 1, "{}: hashes differ: {out}", t.name());

    // Member ids by client URL.
    let (ok, out, err) = etcdctl(&all, &["member", "list", "-w", "json"], None);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let id_of = |i: usize| -> u64 {
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["clientURLs"][0].as_str() == Some(t.endpoint(i).as_str()))
            .unwrap_or_else(|| panic!("{}: no member with {}: {out}", t.name(), t.endpoint(i)))
            ["ID"]
            .as_u64()
            .unwrap()
    };
    let leader = leader_index(t, &[0, 1, 2]);
    let target = (leader + 1) % 3;
    let (ok, out, err) = etcdctl(
        &hostport(leader),
        &["move-leader", &format!("{:x}", id_of(target))],
        None,
    );
    assert!(
        ok && out.contains("Leadership transferred"),
        "{}: {out}{err}",
        t.name()
    );
    wait_for("the new leader", || leader_index(t, &[0, 1, 2]) == target);

    let removed = (target + 1) % 3;
    // etcd refuses a removal until its new leader has heard from the
    // others for a while ("unhealthy cluster"): try again meanwhile.
    wait_for("the member removed", || {
        let (ok, out, err) = etcdctl(
            &hostport(target),
            &["member", "remove", &format!("{:x}", id_of(removed))],
            None,
        );
        assert!(
            ok && out.contains("removed from cluster") || err.contains("unhealthy cluster"),
            "{}: {out}{err}",
            t.name()
        );
        ok
    });
    let left = format!("{},{}", hostport(target), hostport((removed + 1) % 3));
    let (ok, out, _) = etcdctl(&left, &["member", "list"], None);
    assert!(ok && out.lines().count() == 2, "{}: {out}", t.name());
    put_until_done(&left, "h/after", "v");
}

#[test]
fn hashkv_move_leader_and_member_remove_as_on_etcd() {
    if !tools_present() {
        return;
    }
    on_both(|target, _| hashkv_move_leader_and_remove(target));
}

/// `etcdctl member` through a member's life: added as a learner by its
/// peer URL (listed unstarted), started, promoted, its peer URL updated,
/// removed; the transcript normalised (ids and URLs masked, member lists
/// and `ETCD_INITIAL_CLUSTER` sorted, as their order follows the ids).
/// The ids given to promote, update and remove are the one `member add`
/// printed, as a user following etcd's docs would use; every call goes to
/// a follower.
fn membership_session(t: &mut dyn Target, dir: &Path) -> Vec<String> {
    let mut transcript = Vec::new();
    let mut record = |args: &[&str], ok: bool, out: &str, err: &str| {
        let err_line = err
            .lines()
            .filter(|l| l.starts_with("Error:"))
            .collect::<Vec<_>>()
            .join("\n");
        transcript.push(format!(
            "$ etcdctl {}\n{}{}{err_line}",
            // Ids as given: %x, so sometimes shorter than 16 digits.
            regex::Regex::new(r"\b(promote|update|remove) [0-9a-f]{1,16}\b")
                .unwrap()
                .replace_all(&normalise(&args.join(" "), 0), "$1 <id>"),
            if ok { "" } else { "[failed] " },
            normalise_membership(out)
        ));
    };
    // Through a follower: membership calls go to the leader from there.
    let leader = leader_index(t, &[0, 1, 2]);
    let at = t
        .endpoint((leader + 1) % 3)
        .trim_start_matches("http://")
        .to_string();
    let peer = format!("http://127.0.0.1:{}", free_port());
    let peer_arg = format!("--peer-urls={peer}");
    let add = ["member", "add", "n4", &peer_arg, "--learner"];
    // etcd refuses changes until its leader has heard from every member
    // for a while ("unhealthy cluster").
    let (out, err) = until_ok(t, &at, &add, &["unhealthy cluster"]);
    record(&add, true, &out, &err);
    let id = out
        .strip_prefix("Member ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{}: member add: {out}{err}", t.name()))
        .to_string();
    let list = ["member", "list"];
    let (ok, out, err) = etcdctl(&at, &list, None);
    record(&list, ok, &out, &err);

    // Started: it joins, and the list shows it started, as a learner.
    let new_endpoint = t.join(dir, "n4", &peer);
    wait_for("n4 to join", || {
        let (ok, out, _) = etcdctl(&at, &list, None);
        ok && out.contains(", started, n4,")
    });
    let (ok, out, err) = etcdctl(&at, &list, None);
    record(&list, ok, &out, &err);

    // etcd promotes a learner once it is in sync with the leader; both
    // refuse before, so the promotion is tried until it goes through.
    let promote = ["member", "promote", &id];
    let (out, err) = until_ok(t, &at, &promote, &["in sync with leader", "caught up"]);
    record(&promote, true, &out, &err);
    put_until_done(&new_endpoint, "m/through-n4", "v");

    let moved = format!("--peer-urls=http://127.0.0.1:{}", free_port());
    let update = ["member", "update", &id, &moved];
    let (ok, out, err) = etcdctl(&at, &update, None);
    record(&update, ok, &out, &err);
    // The moved member, still at its old address, must not undo the
    // update (raftwork members republish their records every 200 ms).
    std::thread::sleep(Duration::from_secs(1));
    let (ok, out, err) = etcdctl(&at, &list, None);
    record(&list, ok, &out, &err);
    assert!(
        out.contains(moved.trim_start_matches("--peer-urls=")),
        "{}: the update does not show: {out}",
        t.name()
    );

    let remove = ["member", "remove", &id];
    let (out, err) = until_ok(t, &at, &remove, &["unhealthy cluster"]);
    record(&remove, true, &out, &err);
    let (ok, out, err) = etcdctl(&at, &list, None);
    record(&list, ok, &out, &err);
    let three = (0..3).map(|i| t.endpoint(i)).collect::<Vec<_>>().join(",");
    put_until_done(&three, "m/after", "v");
    // A removed member started again from scratch, as it first joined,
    // does not get back in (raftwork: the slot it joined through was
    // dropped with it).
    if t.restart_last() {
        std::thread::sleep(Duration::from_secs(3));
        let (ok, out, _) = etcdctl(&at, &list, None);
        assert!(
            ok && out.lines().count() == 3 && !out.contains("n4"),
            "{}: the removed member is back: {out}",
            t.name()
        );
    }

    // A second add at a peer URL in use is refused.
    let taken = format!(
        "--peer-urls={}",
        members_peer_url(t, &at).expect("a member's peer URL")
    );
    let again = ["member", "add", "n5", taken.as_str()];
    let (ok, out, err) = etcdctl(&at, &again, None);
    record(&again, ok, &out, &err);
    transcript
}

/// `etcdctl args` at `at`, tried again while it fails with one of the
/// `passing` errors; its output once it succeeds.
fn until_ok(t: &dyn Target, at: &str, args: &[&str], passing: &[&str]) -> (String, String) {
    let deadline = Instant::now() + GUARD;
    loop {
        let (ok, out, err) = etcdctl(at, args, None);
        if ok {
            return (out, err);
        }
        assert!(
            Instant::now() < deadline && passing.iter().any(|p| err.contains(p)),
            "{}: {args:?}: {out}{err}\n{}",
            t.name(),
            t.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A peer URL of one of the members `at` lists.
fn members_peer_url(t: &dyn Target, at: &str) -> Option<String> {
    let (ok, out, _) = etcdctl(at, &["member", "list", "-w", "json"], None);
    assert!(ok, "{}: member list", t.name());
    let v: Value = serde_json::from_str(&out).ok()?;
    v["members"][0]["peerURLs"][0].as_str().map(str::to_string)
}

/// `normalise` for membership output: ids and URLs masked, and lines of
/// member lists and entries of `ETCD_INITIAL_CLUSTER` sorted.
fn normalise_membership(text: &str) -> String {
    // etcdctl prints ids with %16x (space-padded when short) after the
    // add, and with %x (shorter when short) in member lists.
    let padded = regex::Regex::new(r"(Member|cluster) +[0-9a-f]{1,16}\b").unwrap();
    let listed = regex::Regex::new(r"(?m)^[0-9a-f]{1,16}, ").unwrap();
    let text = padded.replace_all(text, "$1 <id>");
    let text = normalise(&listed.replace_all(&text, "<id>, "), 0);
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| match l.strip_prefix("ETCD_INITIAL_CLUSTER=\"") {
            Some(rest) => {
                let mut entries: Vec<&str> = rest.trim_end_matches('"').split(',').collect();
                entries.sort();
                format!("ETCD_INITIAL_CLUSTER=\"{}\"", entries.join(","))
            }
            None => l.to_string(),
        })
        .collect();
    if lines.iter().all(|l| l.starts_with("<id>, ")) {
        lines.sort();
    }
    lines.join("\n")
}

#[test]
fn etcdctl_member_commands_as_on_etcd() {
    if !tools_present() {
        return;
    }
    let transcripts = on_both(membership_session);
    let (want, got) = (&transcripts[0], &transcripts[1]);
    eprintln!("{}", want.join("\n\n"));
    for (w, g) in want.iter().zip(got) {
        assert_eq!(g, w, "raftwork (left) and etcd (right) differ");
    }
    assert_eq!(got.len(), want.len());
}

/// etcdctl over TLS with a client certificate (`--cacert/--cert/--key`)
/// against a server with `--client-cert-auth`: gRPC over HTTP/2 over TLS,
/// writes and reads work; without a certificate etcdctl is refused; with
/// `--admin-identities admin`, membership calls need the admin's
/// certificate (as on the REST API).
#[test]
fn etcdctl_over_tls_with_client_certificates() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    common::tls_init("cli,client,admin", &certs);
    let pem = |f: &str| certs.join(f).to_string_lossy().into_owned();
    let api = format!("127.0.0.1:{}", free_port());
    let child = common::raftwork()
        .args(["serve", "--name", "cli", "--log-level", "warn"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--api-addr", &api])
        .args(["--peer-addr", &format!("127.0.0.1:{}", free_port())])
        .args([
            "--cert-file",
            &pem("cli.pem"),
            "--key-file",
            &pem("cli-key.pem"),
        ])
        .args(["--trusted-ca-file", &pem("ca.pem"), "--client-cert-auth"])
        .args(["--admin-identities", "admin"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let ep = format!("https://{api}");
    // Killed when dropped, a failed assertion included.
    let mut server = common::Server {
        child,
        url: ep.clone(),
    };
    let tls = [
        format!("--cacert={}", pem("ca.pem")),
        format!("--cert={}", pem("client.pem")),
        format!("--key={}", pem("client-key.pem")),
    ];
    let with_tls = |args: &[&str]| {
        let mut all: Vec<&str> = tls.iter().map(|s| s.as_str()).collect();
        all.extend_from_slice(args);
        etcdctl(&ep, &all, None)
    };
    wait_for("the TLS server", || {
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "{}",
            read(&dir.path().join("serve.log"))
        );
        with_tls(&["put", "secure", "yes"]).0
    });
    let (ok, out, err) = with_tls(&["get", "secure", "--print-value-only"]);
    assert!(ok && out == "yes\n", "{out}{err}");
    // No client certificate: refused at the handshake.
    let (ok, _, err) = etcdctl(
        &ep,
        &[&format!("--cacert={}", pem("ca.pem")), "get", "secure"],
        None,
    );
    assert!(!ok, "a client without a certificate was served: {err}");

    // Membership: the client's certificate is not an admin's.
    let (ok, out, err) = with_tls(&["member", "list", "-w", "json"]);
    assert!(ok, "{err}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["members"][0]["ID"]
        .as_u64()
        .unwrap();
    let promote = ["member", "promote", &format!("{id:x}")];
    let (ok, _, err) = with_tls(&promote);
    assert!(!ok && err.contains("permission denied"), "{err}");
    let admin = [
        format!("--cacert={}", pem("ca.pem")),
        format!("--cert={}", pem("admin.pem")),
        format!("--key={}", pem("admin-key.pem")),
    ];
    let mut args: Vec<&str> = admin.iter().map(|s| s.as_str()).collect();
    args.extend_from_slice(&promote);
    let (ok, _, err) = etcdctl(&ep, &args, None);
    // Past the admin check, refused for what it asks: n1 is a voter.
    assert!(
        !ok && err.contains("can only promote a learner member"),
        "{err}"
    );
}

/// The Python that has `aetcd`, if any.
fn aetcd_python() -> Option<String> {
    let python = std::env::var("RAFTWORK_AETCD_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", "import aetcd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(python)
    } else {
        missing("Python's aetcd client (pip install aetcd; RAFTWORK_AETCD_PYTHON)");
        None
    }
}

/// Python's `aetcd` client library (another ecosystem's etcd client,
/// grpcio underneath) runs one session of KV, Txn, Watch and Lease calls
/// (`tests/clients/aetcd_session.py`, which asserts etcd's semantics as it
/// goes) against a real etcd and against raftwork, through a follower on
/// raftwork; the two transcripts, with revisions relative to the session's
/// first write, are equal.
#[test]
fn the_aetcd_python_client_works_as_against_etcd() {
    if !tools_present() {
        return;
    }
    let Some(python) = aetcd_python() else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/aetcd_session.py");
    let transcripts = on_both(|target, _| {
        let kind = target.name();
        let leader = leader_index(target, &[0, 1, 2]);
        let follower = target.endpoint((leader + 1) % 3);
        let (host, port) = follower
            .trim_start_matches("http://")
            .rsplit_once(':')
            .unwrap();
        let out = Command::new(&python)
            .arg(&script)
            .args([host, port])
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{kind}: the aetcd session failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            target.logs()
        );
        String::from_utf8(out.stdout).unwrap()
    });
    eprintln!("{}", transcripts[0]);
    assert_eq!(
        transcripts[1], transcripts[0],
        "raftwork (left) and etcd (right) differ"
    );
}
