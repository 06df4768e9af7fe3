//! `raftwork bench --target raftwork` against a real `raftwork serve`
//! process on ephemeral loopback ports with a temp data dir: puts succeed
//! over keep-alive connections, no errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
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

#[test]
fn bench_loads_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let out = raftwork()
        .args(["bench", "--target", "raftwork", "--endpoints", &server.url])
        .args(["--clients", "4", "--value-bytes", "64", "--seconds", "1"])
        .args(["--warmup-ms", "200", "--keys", "50"])
        .stdin(Stdio::null())
        .output()
        .expect("run raftwork bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stdout} {stderr}");
    let field = |name: &str| -> f64 {
        stdout
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {stdout:?}"))
            .parse()
            .unwrap()
    };
    assert!(field("ops") > 0.0, "{stdout}");
    assert!(field("ops_per_sec") > 0.0, "{stdout}");
    assert_eq!(field("errors"), 0.0, "{stdout} {stderr}");
    assert_eq!(field("clients"), 4.0);
    assert!(field("p50_us") > 0.0 && field("p99_us") >= field("p50_us"));
    assert!(field("max_us") >= field("p99_us"));
    // The puts landed: a bench key is readable.
    let addr = server.url.trim_start_matches("http://").parse().unwrap();
    let (status, body) = get(addr, "/v1/kv?prefix=bench-&limit=100").unwrap();
    assert_eq!(status, 200);
    let list: Value = serde_json::from_slice(&body).unwrap();
    let n = list.as_array().unwrap().len();
    assert!((1..=50).contains(&n), "{n} bench keys");
    assert_eq!(list[0]["value"].as_str().unwrap(), "x".repeat(64));
}

/// A dead endpoint: no put succeeds, exit 1, errors counted.
#[test]
fn bench_against_nothing_fails() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = raftwork()
        .args(["bench", "--target", "raftwork", "--endpoints", &url])
        .args(["--seconds", "0.3", "--warmup-ms", "0"])
        .stdin(Stdio::null())
        .output()
        .expect("run raftwork bench");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(" ops=0 "), "{stdout}");
    assert!(!stdout.contains(" errors=0"), "{stdout}");
}
