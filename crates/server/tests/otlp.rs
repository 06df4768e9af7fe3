//! `--otlp-endpoint`: with the cargo feature `otlp`, a real server exports
//! its trace spans over OTLP/HTTP to a collector stand-in bound here (a
//! loopback HTTP server that keeps every request body); without it, the
//! flag is refused with exit 2 and a message saying how to build it in.

mod common;

#[cfg(feature = "otlp")]
#[test]
fn spans_of_a_write_reach_the_collector() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    // The collector stand-in: every POST's path and body, answered 200
    // with an empty ExportTraceServiceResponse.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    // Each request's path and body.
    type Requests = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
    let received: Requests = Arc::default();
    let sink = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let sink = sink.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = request_line
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("")
                        .to_string();
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).unwrap();
                        if line.trim().is_empty() {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0u8; length];
                    reader.read_exact(&mut body).unwrap();
                    sink.lock().unwrap().push((path, body));
                    let _ = writer.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
                    );
                }
            });
        }
    });

    let tmp = tempfile::tempdir().unwrap();
    let mut server = common::start_with(tmp.path(), &["--otlp-endpoint", &endpoint]);
    let api: std::net::SocketAddr = server.url.trim_start_matches("http://").parse().unwrap();
    let (status, _) = common::members::request(api, "PUT", "/v1/kv/traced", b"v").unwrap();
    assert_eq!(status, 200);
    let (status, _) = common::get(api, "/v1/kv/traced").unwrap();
    assert_eq!(status, 200);
    // SIGTERM: the server flushes what is queued as it stops.
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    let bodies = received.lock().unwrap().clone();
    assert!(!bodies.is_empty(), "nothing exported");
    assert!(
        bodies.iter().all(|(path, _)| path == "/v1/traces"),
        "{bodies:?}"
    );
    let all: Vec<u8> = bodies.into_iter().flat_map(|(_, b)| b).collect();
    let has = |s: &str| all.windows(s.len()).any(|w| w == s.as_bytes());
    // Protobuf keeps strings as they are: the service, the spans along the
    // write's path, and their fields.
    for want in [
        "raftwork",
        "request",
        "/v1/kv/{*key}",
        "propose",
        "index",
        "wal_sync",
        "apply_batch",
    ] {
        assert!(has(want), "no {want:?} in what was exported");
    }
}

#[cfg(not(feature = "otlp"))]
#[test]
fn the_flag_is_refused_without_the_feature() {
    let tmp = tempfile::tempdir().unwrap();
    let out = common::raftwork()
        .args(["serve", "--otlp-endpoint", "http://127.0.0.1:4318"])
        .arg("--data-dir")
        .arg(tmp.path().join("d"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features otlp"), "{err}");
    assert!(!tmp.path().join("d").exists(), "nothing is written");
}
