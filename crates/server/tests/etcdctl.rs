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
//! Needs `etcdctl` and `etcd` on the PATH (`.ci/run` installs them); set
//! `RAFTWORK_SKIP_ETCD=1` to skip when they cannot be installed: the
//! test says so rather than passing silently.

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
    if std::env::var_os("RAFTWORK_SKIP_ETCD").is_some() {
        eprintln!("SKIPPED: etcd or etcdctl is not installed (RAFTWORK_SKIP_ETCD set)");
        return false;
    }
    panic!(
        "etcdctl and etcd are needed (apt-get install etcd-client etcd-server); \
         set RAFTWORK_SKIP_ETCD=1 to skip"
    );
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
}

struct Raftwork {
    ms: Vec<Member>,
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
    Raftwork { ms }
}

struct Etcd {
    clients: Vec<SocketAddr>,
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
    fn logs(&self) -> String {
        self.logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect()
    }
}

fn start_etcd(dir: &Path) -> Etcd {
    let clients: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    let peers: Vec<String> = (0..3)
        .map(|_| format!("http://127.0.0.1:{}", free_port()))
        .collect();
    let initial = (0..3)
        .map(|i| format!("e{i}={}", peers[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut etcd = Etcd {
        clients: clients.clone(),
        children: Vec::new(),
        logs: Vec::new(),
    };
    for i in 0..3 {
        let log = dir.join(format!("etcd{i}.log"));
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(dir.join(format!("etcd{i}")))
            .args(["--listen-client-urls", &format!("http://{}", clients[i])])
            .args(["--advertise-client-urls", &format!("http://{}", clients[i])])
            .args(["--listen-peer-urls", &peers[i]])
            .args(["--initial-advertise-peer-urls", &peers[i]])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", "etcdctl-test"])
            .args(["--initial-cluster-state", "new"])
            .args(["--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start etcd");
        etcd.children.push(Some(child));
        etcd.logs.push(log);
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
