//! `raftwork local-cluster`: starts three `raftwork serve` children on
//! ephemeral loopback ports under a temp base dir, prints their URLs; a
//! write through one node is read through another (with the CLI client);
//! SIGTERM stops every child and exits 0; a second run on the same base
//! dir restarts the same cluster with its data.
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
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(base.with_extension("stderr"))
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
