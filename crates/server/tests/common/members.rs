//! A cluster of real `raftwork serve` processes on loopback (ephemeral
//! ports, temp data dirs), for the tests that drive several members.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{free_port, BIN};

pub const GUARD: Duration = Duration::from_secs(60);

/// One HTTP/1.1 request (`Connection: close`): status and body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    request_with(addr, method, path, &[], body)
}

/// [`request`] with more headers.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(GUARD))?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
    assert!(!head.contains("transfer-encoding: chunked"), "{head}");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    Ok((status, buf[split + 4..].to_vec()))
}

pub struct Member {
    pub name: String,
    pub api: SocketAddr,
    pub peer: String,
    pub data: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Member {
    pub fn start(&mut self, initial_cluster: &str) {
        self.start_with(initial_cluster, &[]);
    }

    pub fn start_with(&mut self, initial_cluster: &str, extra: &[&str]) {
        self.start_under(&[], initial_cluster, extra);
    }

    /// Starts the member as the last argument of `wrapper` (a program that
    /// runs another, such as `fiu-run -x`), or directly if it is empty.
    pub fn start_under(&mut self, wrapper: &[&str], initial_cluster: &str, extra: &[&str]) {
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("RAFTWORK_") {
                cmd.env_remove(k);
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        cmd.args(["serve", "--name", &self.name, "--log-level", "info"]);
        // The tests' token, unless the caller gives its own.
        if !extra.contains(&"--initial-cluster-token") {
            cmd.args(["--initial-cluster-token", "cluster-test"]);
        }
        cmd.arg("--data-dir")
            .arg(&self.data)
            .args(["--api-addr", &self.api.to_string()])
            .args(["--peer-addr", &self.peer])
            .args(["--initial-cluster", initial_cluster])
            .args(["--request-timeout-ms", "10000"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("start raftwork"));
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let killed = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(killed.success());
        child.wait().unwrap()
    }

    /// Waits until `/readyz` answers 200.
    pub fn wait_ready(&mut self) {
        self.wait("/readyz", |m| {
            matches!(request(m.api, "GET", "/readyz", b""), Ok((200, _))).then_some(())
        });
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn req(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        request(self.api, method, path, body)
            .unwrap_or_else(|e| panic!("{} {method} {path}: {e}\n{}", self.name, self.logs()))
    }

    /// Polls `f` until it gives `Some`, checking the process stays up.
    pub fn wait<T>(&mut self, what: &str, mut f: impl FnMut(&Self) -> Option<T>) -> T {
        let deadline = Instant::now() + GUARD;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("{} exited ({status}):\n{}", self.name, self.logs());
                }
            }
            if let Some(v) = f(self) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{}: gave up waiting for {what}:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET /cluster/nodes` once every member is listed with its API URL
    /// and a leader is named: the leader's name.
    pub fn converged_leader(&mut self, members: usize) -> String {
        self.wait("a leader and every member's record", |m| {
            let (status, body) = request(m.api, "GET", "/cluster/nodes", b"").ok()?;
            if status != 200 {
                return None;
            }
            let v: Value = serde_json::from_slice(&body).ok()?;
            let nodes = v["nodes"].as_array()?;
            let complete = nodes.len() == members
                && nodes.iter().all(|n| {
                    n["api_url"].is_string() && n["name"].is_string() && n["peer_addr"].is_string()
                });
            let leaders = nodes.iter().filter(|n| n["role"] == "leader").count();
            match v["leader"].as_str() {
                Some(l) if complete && leaders == 1 => Some(l.to_string()),
                _ => None,
            }
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn members(dir: &Path, n: usize) -> (Vec<Member>, String) {
    let members: Vec<Member> = (1..=n)
        .map(|i| Member {
            name: format!("n{i}"),
            api: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            peer: format!("127.0.0.1:{}", free_port()),
            data: dir.join(format!("n{i}")),
            log: dir.join(format!("n{i}.log")),
            child: None,
        })
        .collect();
    let initial = members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    (members, initial)
}

/// Agreement on the leader: every running member names the same one.
pub fn agreed_leader(ms: &mut [Member], running: &[usize]) -> String {
    agreed_leader_of(ms, running, 3)
}

pub fn agreed_leader_of(ms: &mut [Member], running: &[usize], size: usize) -> String {
    let deadline = Instant::now() + GUARD;
    loop {
        let seen: Vec<String> = running
            .iter()
            .map(|&i| ms[i].converged_leader(size))
            .collect();
        if seen.iter().all(|l| *l == seen[0]) {
            return seen[0].clone();
        }
        assert!(Instant::now() < deadline, "no agreement: {seen:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A write through `m`, retried while the cluster answers 503 (an
/// election in progress).
pub fn put(m: &mut Member, key: &str, value: &str) {
    let path = format!("/v1/kv/{key}");
    m.wait("a successful write", |m| {
        let (status, body) = m.req("PUT", &path, value.as_bytes());
        match status {
            200 => Some(()),
            503 => None,
            other => panic!(
                "PUT {key} via {}: {other} {}",
                m.name,
                String::from_utf8_lossy(&body)
            ),
        }
    });
}
