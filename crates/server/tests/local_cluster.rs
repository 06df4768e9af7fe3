//! `raftwork local-cluster`: starts three `raftwork serve` children on
//! ephemeral loopback ports under a temp base dir, prints their URLs; a
//! write through one node is read through another (with the CLI client);
//! SIGTERM stops every child and exits 0; a second run on the same base
//! dir restarts the same cluster with its data; a node killed with
//! SIGKILL leaves the others serving, is reported on stderr with the
//! command that restarts it, and `local-cluster restart` brings it back.
//!
//! Every wait is a poll or a read with a hang guard, never a timing
//! assertion.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_raftwork");
const GUARD: Duration = Duration::from_secs(60);

fn raftwork() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RAFTWORK_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

struct Running {
    child: Child,
    /// Where local-cluster's stderr goes.
    stderr: std::path::PathBuf,
    /// `(name, url, pid)` per node.
    nodes: Vec<(String, String, u32)>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only on a failed test: the children are stopped by the test.
        for (_, _, pid) in &self.nodes {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `raftwork local-cluster --nodes 3 --base-dir base` and reads the
/// three node lines it prints once they answer /healthz. `None` if it
/// exited before (e.g. a picked port was taken in between).
fn start(base: &Path) -> Option<Running> {
    start_with(base, &[])
}

/// [`start`] with more flags for local-cluster.
fn start_with(base: &Path, extra: &[&str]) -> Option<Running> {
    let stderr_path = base.with_extension("stderr");
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&stderr_path)
        .unwrap();
    let mut child = raftwork()
        .args(["local-cluster", "--nodes", "3", "--base-dir"])
        .arg(base)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start raftwork local-cluster");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut running = Running {
        child,
        stderr: stderr_path,
        nodes: Vec::new(),
    };
    for _ in 0..3 {
        let mut line = String::new();
        // local-cluster gives up by itself (exit 1) if the nodes do not
        // answer within its own guard, closing stdout.
        if stdout.read_line(&mut line).unwrap() == 0 {
            let status = running.child.wait().unwrap();
            assert_eq!(status.code(), Some(1), "{status}");
            return None;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 3, "{line}");
        let pid = fields[2]
            .strip_prefix("pid=")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line}"));
        assert!(fields[1].starts_with("http://127.0.0.1:"), "{line}");
        running
            .nodes
            .push((fields[0].to_string(), fields[1].to_string(), pid));
    }
    Some(running)
}

fn start_retrying(base: &Path) -> Running {
    start_retrying_with(base, &[])
}

fn start_retrying_with(base: &Path, extra: &[&str]) -> Running {
    for _ in 0..3 {
        if let Some(r) = start_with(base, extra) {
            return r;
        }
        // A port was taken: start over with new ports.
        std::fs::remove_dir_all(base).unwrap();
    }
    panic!("local-cluster did not start");
}

fn cli(endpoint: &str, args: &[&str]) -> Output {
    raftwork()
        .args(args)
        .args(["--endpoints", endpoint])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Retries `args` until it succeeds (the cluster may still be electing
/// its first leader): its stdout.
fn eventually(endpoint: &str, args: &[&str]) -> String {
    let deadline = Instant::now() + GUARD;
    loop {
        let o = cli(endpoint, args);
        if o.status.success() {
            return String::from_utf8(o.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{args:?} against {endpoint}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to local-cluster: it exits 0 and every child is gone.
fn terminate(mut r: Running) {
    let status = Command::new("kill")
        .args(["-TERM", &r.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = r.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    for (name, url, pid) in std::mem::take(&mut r.nodes) {
        // Reaped by local-cluster before it exited: no such process.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{name} (pid {pid}) is still there"
        );
        let addr = url.strip_prefix("http://").unwrap();
        assert!(TcpStream::connect(addr).is_err(), "{name} still listens");
    }
}

#[test]
fn local_cluster_serves_writes_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("local");
    let r = start_retrying(&base);
    let names: Vec<&str> = r.nodes.iter().map(|n| n.0.as_str()).collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    for n in ["n1", "n2", "n3"] {
        assert!(base.join(n).join("CLUSTER").exists(), "{n}");
    }
    let (url1, url2, url3) = (
        r.nodes[0].1.clone(),
        r.nodes[1].1.clone(),
        r.nodes[2].1.clone(),
    );

    // Write through one node, read (linearizably) through another.
    eventually(&url1, &["kv", "put", "greeting", "hello"]);
    assert_eq!(eventually(&url2, &["kv", "get", "greeting"]), "hello");
    // Every member is listed, with one leader.
    let all = format!("{url1},{url2},{url3}");
    let deadline = Instant::now() + GUARD;
    loop {
        let table = eventually(&all, &["member", "list"]);
        let leaders = table.lines().filter(|l| l.contains(" leader ")).count();
        if table.lines().count() == 4 && leaders == 1 && !table.contains(" - ") {
            break;
        }
        assert!(Instant::now() < deadline, "{table}");
        std::thread::sleep(Duration::from_millis(100));
    }
    terminate(r);

    // A second run on the same base dir: same ports, same data.
    let r = start(&base).expect("restart on the remembered ports");
    assert_eq!(r.nodes[2].1, url3);
    assert_eq!(eventually(&url3, &["kv", "get", "greeting"]), "hello");
    terminate(r);

    // Asking for another size over an existing base dir is refused.
    let o = raftwork()
        .args(["local-cluster", "--nodes", "5", "--base-dir"])
        .arg(&base)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("3 nodes"),
        "{o:?}"
    );
}

#[test]
fn local_cluster_with_tls_runs_its_peers_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("local");
    let r = start_retrying_with(&base, &["--tls"]);
    for f in ["ca.pem", "n1.pem", "n1-key.pem", "n3-key.pem"] {
        assert!(base.join("certs").join(f).exists(), "{f}");
    }
    let (url1, url2) = (r.nodes[0].1.clone(), r.nodes[1].1.clone());
    // Replication works, so the peers found each other over TLS...
    eventually(&url1, &["kv", "put", "secure", "yes"]);
    assert_eq!(eventually(&url2, &["kv", "get", "secure"]), "yes");
    // ...and a node's peer port refuses plaintext (the TLS handshake fails
    // on a hello frame, and the node says so in its log).
    let log = std::fs::read_to_string(base.join("n1.log")).unwrap();
    assert!(!log.contains("TLS handshake failed"), "{log}");
    let ports = std::fs::read_to_string(base.join("ports")).unwrap();
    // "n1 API PEER" on the first line.
    let peer_port = ports
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("ports file: {ports}"));
    let mut tcp = TcpStream::connect(format!("127.0.0.1:{peer_port}")).unwrap();
    std::io::Write::write_all(&mut tcp, b"RWNET001 not a TLS client hello").unwrap();
    let deadline = Instant::now() + GUARD;
    loop {
        let log = std::fs::read_to_string(base.join("n1.log")).unwrap();
        if log.contains("TLS handshake failed") {
            break;
        }
        assert!(Instant::now() < deadline, "no refusal logged:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    terminate(r);
}

/// Which node leads, from `member list` through `endpoints`, once every
/// listed member has a role (None while there is no leader).
fn leader(endpoints: &str) -> Option<String> {
    let o = cli(endpoints, &["member", "list"]);
    if !o.status.success() {
        return None;
    }
    let table = String::from_utf8(o.stdout).unwrap();
    table
        .lines()
        .find(|l| l.contains(" leader "))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
}

#[test]
fn a_killed_node_leaves_the_others_serving_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("local");
    let mut r = start_retrying(&base);
    let urls: Vec<String> = r.nodes.iter().map(|n| n.1.clone()).collect();
    let all = urls.join(",");
    eventually(&urls[0], &["kv", "put", "before", "1"]);

    // Kill the leader: the survivors must elect another one.
    let deadline = Instant::now() + GUARD;
    let victim = loop {
        // (A member whose name is not known yet is listed as "-".)
        let found = leader(&all).and_then(|name| r.nodes.iter().position(|n| n.0 == name));
        if let Some(i) = found {
            break i;
        }
        assert!(Instant::now() < deadline, "no leader");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (name, url, pid) = r.nodes[victim].clone();
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    // local-cluster says who died, how, and how to restart it...
    let deadline = Instant::now() + GUARD;
    let report = loop {
        let text = std::fs::read_to_string(&r.stderr).unwrap();
        if let Some(line) = text.lines().find(|l| l.contains(" died ")) {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no death reported:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(report.contains(&format!("{name} (pid {pid})")), "{report}");
    assert!(report.contains("SIGKILL"), "{report}");
    let hint = format!("local-cluster restart {name} --base-dir ");
    assert!(report.contains(&hint), "{report}");
    // ...and keeps running, as do the two others.
    assert!(
        r.child.try_wait().unwrap().is_none(),
        "local-cluster exited"
    );
    let survivors: Vec<String> = (0..3)
        .filter(|&i| i != victim)
        .map(|i| urls[i].clone())
        .collect();
    for (i, (other, _, other_pid)) in r.nodes.iter().enumerate() {
        if i != victim {
            let alive = Path::new(&format!("/proc/{other_pid}")).exists();
            assert!(alive, "{other} was stopped too");
        }
    }
    // A write through a survivor succeeds (once they elected a leader)
    // and a linearizable read through the other sees it.
    eventually(&survivors[0], &["kv", "put", "during", "2"]);
    assert_eq!(eventually(&survivors[1], &["kv", "get", "during"]), "2");
    assert_eq!(eventually(&survivors[1], &["kv", "get", "before"]), "1");
    let new_leader = leader(&survivors.join(",")).unwrap_or_default();
    assert_ne!(new_leader, name);

    // Restart it from "another terminal".
    let o = raftwork()
        .args(["local-cluster", "restart", &name, "--base-dir"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let line = String::from_utf8(o.stdout).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[0], name, "{line}");
    assert_eq!(fields[1], url, "{line}");
    let new_pid: u32 = fields[2]
        .strip_prefix("pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"));
    assert_ne!(new_pid, pid);
    r.nodes[victim].2 = new_pid;
    // It is the same member (same data and ports): ready, and it has both
    // keys in its own copy.
    let addr = url.strip_prefix("http://").unwrap();
    let deadline = Instant::now() + GUARD;
    loop {
        let ready = http_status(addr, "/readyz") == Some(200);
        let o1 = cli(&url, &["kv", "get", "--stale", "before"]);
        let o2 = cli(&url, &["kv", "get", "--stale", "during"]);
        if ready && o1.stdout == b"1" && o2.stdout == b"2" {
            break;
        }
        assert!(Instant::now() < deadline, "{name} did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A restart of an unknown node is a usage error.
    let o = raftwork()
        .args(["local-cluster", "restart", "n9", "--base-dir"])
        .arg(&base)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");

    // SIGTERM stops everything, the restarted node included.
    terminate(r);
    assert!(!base.join("local-cluster.pid").exists());
    // With no local-cluster running, restart says so.
    let o = raftwork()
        .args(["local-cluster", "restart", &name, "--base-dir"])
        .arg(&base)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no local-cluster is running"),
        "{o:?}"
    );
}

/// The HTTP status of `GET path` on `addr`, None if it does not answer.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut tcp = TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}
