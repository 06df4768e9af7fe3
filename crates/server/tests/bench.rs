//! `raftwork bench` against a real `raftwork serve` process on ephemeral
//! loopback ports with a temp data dir: puts succeed over keep-alive
//! connections (REST, plainly and in sessions) and over etcd's gRPC API on
//! shared connections (`--target etcd --conns`), no errors.

mod common;

use std::process::Stdio;

use common::{free_port, get, raftwork, start};
use serde_json::Value;

#[test]
fn bench_loads_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let pid = server.child.id().to_string();
    for extra in [&["--cpu-of", &pid][..], &["--sessions"][..]] {
        load(&server.url, "raftwork", extra);
    }
    // raftwork's API port speaks etcd's API: 4 clients on 2 connections.
    load(&server.url, "etcd", &["--conns", "2"]);
    // --sessions is raftwork's only.
    let out = raftwork()
        .args([
            "bench",
            "--target",
            "etcd",
            "--endpoints",
            &server.url,
            "--sessions",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run raftwork bench");
    assert_eq!(out.status.code(), Some(2));
}

/// Four clients for a second against `target` with `extra` flags.
fn load(url: &str, target: &str, extra: &[&str]) {
    let sessions = extra.contains(&"--sessions");
    let out = raftwork()
        .args(["bench", "--target", target, "--endpoints", url])
        .args(["--clients", "4", "--value-bytes", "64", "--seconds", "1"])
        .args(["--warmup-ms", "200", "--keys", "50"])
        .args(extra)
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
    // CPU per put: the bench's own always, the server's when asked for
    // (a server that answered puts spent some, ticks of 10 ms over a
    // second of load).
    assert!(field("client_cpu_us_per_op") > 0.0, "{stdout}");
    if extra.contains(&"--cpu-of") {
        assert!(field("servers_cpu_us_per_op") > 0.0, "{stdout}");
    } else {
        assert!(stdout.contains("servers_cpu_us_per_op=-"), "{stdout}");
    }
    assert!(
        stdout.contains(&format!("sessions={sessions} ")),
        "{stdout}"
    );
    // The puts landed: a bench key is readable.
    let addr = url.trim_start_matches("http://").parse().unwrap();
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
