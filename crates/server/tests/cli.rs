//! The CLI client (`raftwork kv|member|status`) against a real
//! `raftwork serve` process on ephemeral loopback ports with a temp data
//! dir. Every wait is a poll with a hang guard, never a timing assertion.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_raftwork");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `raftwork` with no RAFTWORK_* variables inherited from the environment.
fn raftwork() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RAFTWORK_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Status and body of `GET path` (`Connection: close`).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    Ok((status, buf[split + 4..].to_vec()))
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a single-node `raftwork serve` and waits for /readyz (retried on
/// new ports if a picked port was taken in between).
fn start(dir: &Path) -> Server {
    for attempt in 0..5 {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join(format!("serve-{attempt}.log"))).unwrap();
        let mut child = raftwork()
            .args(["serve", "--name", "cli", "--log-level", "warn"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--api-addr", &api.to_string()])
            .args(["--peer-addr", &format!("127.0.0.1:{}", free_port())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start raftwork");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().unwrap().is_some() {
                break; // most likely a port in use: try again
            }
            if let Ok((200, _)) = get(api, "/readyz") {
                let (_, body) = get(api, "/v1/status").unwrap();
                let status: Value = serde_json::from_slice(&body).unwrap();
                if status["pid"].as_u64() == Some(u64::from(child.id())) {
                    return Server {
                        child,
                        url: format!("http://{api}"),
                    };
                }
                break; // another process's port
            }
            assert!(Instant::now() < deadline, "raftwork serve not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("raftwork serve did not start");
}

/// Runs the CLI with `--endpoints endpoints` and `args`.
fn cli(endpoints: &str, args: &[&str]) -> Output {
    raftwork()
        .args(args)
        .args(["--endpoints", endpoints])
        .stdin(Stdio::null())
        .output()
        .expect("run raftwork")
}

fn ok(endpoints: &str, args: &[&str]) -> String {
    let o = cli(endpoints, args);
    assert!(
        o.status.success(),
        "{args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs a command that must fail with exit code `code`: its stderr.
fn fails(endpoints: &str, args: &[&str], code: i32) -> String {
    let o = cli(endpoints, args);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {o:?}");
    assert!(o.stdout.is_empty(), "{args:?}: {o:?}");
    String::from_utf8(o.stderr).unwrap()
}

#[test]
fn kv_commands_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let url = server.url.as_str();

    assert!(ok(url, &["kv", "put", "greeting", "hello"]).starts_with("OK (index "));
    assert_eq!(ok(url, &["kv", "get", "greeting"]), "hello");
    assert_eq!(ok(url, &["kv", "get", "greeting", "--stale"]), "hello");
    // Keys with slashes, spaces and non-ASCII survive the URL encoding.
    ok(url, &["kv", "put", "dir/a b/é", "x y&z"]);
    assert_eq!(ok(url, &["kv", "get", "dir/a b/é"]), "x y&z");

    // A missing key: exit 1 with a message.
    let err = fails(url, &["kv", "get", "nope"], 1);
    assert!(err.contains("key not found: nope"), "{err}");

    // Compare-and-set.
    let err = fails(
        url,
        &["kv", "put", "greeting", "x", "--prev-value", "bye"],
        1,
    );
    assert!(err.contains("412"), "{err}");
    ok(
        url,
        &["kv", "put", "greeting", "bonjour", "--prev-value", "hello"],
    );
    assert_eq!(ok(url, &["kv", "get", "greeting"]), "bonjour");
    fails(
        url,
        &["kv", "put", "greeting", "x", "--prev-exist", "false"],
        1,
    );
    ok(url, &["kv", "put", "lock", "me", "--prev-exist", "false"]);
    ok(url, &["kv", "put", "lock", "you", "--prev-exist", "true"]);
    fails(
        url,
        &["kv", "put", "absent", "x", "--prev-exist", "true"],
        1,
    );
    // Conflicting conditions are a usage error (exit 2).
    fails(
        url,
        &[
            "kv",
            "put",
            "k",
            "v",
            "--prev-value",
            "a",
            "--prev-exist",
            "true",
        ],
        2,
    );

    // Listing.
    ok(url, &["kv", "put", "gr2", "salut"]);
    assert_eq!(
        ok(url, &["kv", "list", "--prefix", "gr"]),
        "gr2\tsalut\ngreeting\tbonjour\n"
    );
    assert_eq!(
        ok(url, &["kv", "list", "--prefix", "gr", "--limit", "1"]),
        "gr2\tsalut\n"
    );
    assert_eq!(ok(url, &["kv", "list"]).lines().count(), 4);
    // The server's error message for bad input.
    let err = fails(url, &["kv", "list", "--limit", "0"], 1);
    assert!(err.contains("limit") && err.contains("400"), "{err}");

    // Delete.
    assert_eq!(ok(url, &["kv", "del", "lock"]), "1\n");
    assert_eq!(ok(url, &["kv", "del", "lock"]), "0\n");
    fails(url, &["kv", "get", "lock"], 1);

    // Endpoints are tried in order until one answers; the variable works too.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let both = format!("{dead},{url}");
    assert_eq!(ok(&both, &["kv", "get", "greeting"]), "bonjour");
    ok(&both, &["kv", "put", "via", "second"]);
    let o = raftwork()
        .args(["kv", "get", "via"])
        .env("RAFTWORK_ENDPOINTS", url)
        .output()
        .unwrap();
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(0), &b"second"[..])
    );
    let err = fails(&dead, &["kv", "get", "greeting"], 1);
    assert!(err.contains("no endpoint answered"), "{err}");
    fails("localhost:1", &["kv", "get", "greeting"], 2);
}

#[test]
fn member_and_status_commands_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let url = server.url.as_str();

    let status: Value = serde_json::from_str(&ok(url, &["status"])).unwrap();
    assert_eq!(status["name"], "cli");
    assert_eq!(status["role"], "leader");
    assert_eq!(status["pid"].as_u64(), Some(u64::from(server.child.id())));

    // The member table: a header and this node, leading.
    let table = ok(url, &["member", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("API URL"),
        "{table}"
    );
    assert!(
        lines[1].contains("cli") && lines[1].contains("leader") && lines[1].contains(url),
        "{table}"
    );

    // A learner that never starts can be added and removed in a one-voter
    // cluster (the leader alone is a quorum).
    let peer = format!("127.0.0.1:{}", free_port());
    let api = format!("http://127.0.0.1:{}", free_port());
    let out = ok(
        url,
        &[
            "member",
            "add",
            "ghost",
            "--peer-addr",
            &peer,
            "--api-url",
            &api,
            "--learner",
        ],
    );
    assert!(out.contains("member ghost added as a learner"), "{out}");
    let table = ok(url, &["member", "list"]);
    assert!(
        table.lines().any(|l| l.contains("learner")) && table.lines().count() == 3,
        "{table}"
    );
    let err = fails(
        url,
        &[
            "member",
            "add",
            "ghost",
            "--peer-addr",
            &peer,
            "--api-url",
            &api,
        ],
        1,
    );
    assert!(err.contains("409"), "{err}");
    let out = ok(url, &["member", "remove", "ghost"]);
    assert!(out.contains("member ghost removed"), "{out}");
    assert_eq!(ok(url, &["member", "list"]).lines().count(), 2);

    // The server's errors: unknown member, bad URL.
    let err = fails(url, &["member", "promote", "nobody"], 1);
    assert!(err.contains("404") && err.contains("nobody"), "{err}");
    let err = fails(url, &["member", "remove", "nobody"], 1);
    assert!(err.contains("404"), "{err}");
    let err = fails(
        url,
        &[
            "member",
            "add",
            "x",
            "--peer-addr",
            &peer,
            "--api-url",
            "ftp://x",
        ],
        1,
    );
    assert!(err.contains("400"), "{err}");
}
