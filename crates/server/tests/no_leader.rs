//! The API of a node that knows no leader: requests wait for one up to the
//! request timeout, then fail with 503 and a clear error; stale reads and
//! the liveness probe still answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use raftwork::Builder;
use raftwork_server::api::{router, ApiConfig};
use raftwork_server::kv::KvStore;
use serde_json::Value;

/// One HTTP/1.1 request (`Connection: close`): status and body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = String::from_utf8_lossy(&buf[..split])
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    (status, buf[split + 4..].to_vec())
}

async fn call(addr: SocketAddr, method: &'static str, path: &'static str) -> (u16, Vec<u8>) {
    tokio::task::spawn_blocking(move || request(addr, method, path, b"v"))
        .await
        .unwrap()
}

fn error_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).unwrap();
    assert!(v["leader"].is_null(), "{v}");
    v["error"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_leader_get_503() {
    // A node with no members never campaigns: it never learns a leader.
    let node = Builder::new(1, KvStore::new())
        .in_memory()
        .join_existing()
        .build()
        .unwrap();
    let app = router(
        vec![node.clone()],
        ApiConfig {
            name: "lonely".into(),
            data_dir: None,
            request_timeout: Duration::from_millis(300),
            token: "raftwork".into(),
            members: Default::default(),
            http: raftwork_server::forward::HttpClient::forwarding(Duration::from_secs(1)),
            admin_identities: Vec::new(),
            peer_names_checked: false,
            on_disk: false,
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    for (method, path) in [
        ("PUT", "/v1/kv/k"),
        ("PUT", "/v1/kv/k?prev_exist=false"),
        ("DELETE", "/v1/kv/k"),
        ("GET", "/v1/kv/k"),
        ("GET", "/v1/kv?prefix=k"),
    ] {
        let (status, body) = call(addr, method, path).await;
        assert_eq!(status, 503, "{method} {path}");
        let error = error_of(&body);
        assert!(error.contains("no leader"), "{method} {path}: {error}");
    }

    // Stale reads use the local state, leader or not.
    let (status, _) = call(addr, "GET", "/v1/kv/k?consistency=stale").await;
    assert_eq!(status, 404);
    let (status, body) = call(addr, "GET", "/v1/kv?consistency=stale").await;
    assert_eq!((status, body.as_slice()), (200, &b"[]"[..]));

    // Alive, but not ready.
    let (status, body) = call(addr, "GET", "/healthz").await;
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    let (status, body) = call(addr, "GET", "/readyz").await;
    assert_eq!(status, 503);
    assert!(error_of(&body).contains("no known leader"));
    let (status, body) = call(addr, "GET", "/v1/status").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["name"], "lonely");
    assert!(v["leader"].is_null(), "{v}");

    server.abort();
    node.shutdown().await;
}
