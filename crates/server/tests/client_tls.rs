//! The API over TLS with client-certificate auth and admin identities, on
//! three real `raftwork serve` processes (peer TLS too), driven with the CLI
//! (`--cacert/--cert/--key`): writes through any member (followers forward
//! over HTTPS with their own certificate), membership and leadership routes
//! refused to a member's non-admin certificate and allowed to the admin's,
//! no route for member records on the client API, and no certificate,
//! another CA, an expired certificate or plain HTTP refused at the door.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::members::*;
use common::{raftwork, tls_init};
use rustls::pki_types::ServerName;

fn file(dir: &Path, f: &str) -> String {
    dir.join(f).to_string_lossy().into_owned()
}

/// The CLI against `endpoint` as the holder of `who`'s certificate from
/// `dir` (`None`: no client certificate).
fn cli(dir: &Path, who: Option<&str>, endpoint: &str, args: &[&str]) -> Output {
    let mut cmd = raftwork();
    cmd.args(args)
        .args(["--endpoints", endpoint, "--timeout-ms", "10000"])
        .args(["--cacert", &file(dir, "ca.pem")]);
    if let Some(who) = who {
        cmd.args(["--cert", &file(dir, &format!("{who}.pem"))])
            .args(["--key", &file(dir, &format!("{who}-key.pem"))]);
    }
    cmd.output().unwrap()
}

fn eventually(dir: &Path, who: &str, endpoint: &str, args: &[&str]) -> String {
    let deadline = Instant::now() + GUARD;
    loop {
        let o = cli(dir, Some(who), endpoint, args);
        if o.status.success() {
            return String::from_utf8(o.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "{args:?} against {endpoint}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One HTTPS request with `who`'s certificate (and `extra` header lines,
/// each ending in CRLF): the status code and the body.
fn https(
    dir: &Path,
    who: &str,
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    extra: &str,
) -> (u16, String) {
    let config = common::client_config(
        &dir.join("ca.pem"),
        Some((
            &dir.join(format!("{who}.pem")),
            &dir.join(format!("{who}-key.pem")),
        )),
    );
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(GUARD)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    write!(
        tls,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    tls.write_all(body).unwrap();
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

#[test]
fn the_api_over_tls_takes_clients_by_certificate_and_admins_by_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let other = tmp.path().join("other-ca");
    // Members' certificates are the nodes' own; clients get their own.
    tls_init("n1,n2,n3,admin,client", &certs);
    tls_init("admin", &other);
    let (mut ms, initial) = members(tmp.path(), 3);
    for m in &mut ms {
        let name = m.name.clone();
        let (cert, key, ca) = (
            file(&certs, &format!("{name}.pem")),
            file(&certs, &format!("{name}-key.pem")),
            file(&certs, "ca.pem"),
        );
        m.start_with(
            &initial,
            &[
                "--peer-cert-file",
                &cert,
                "--peer-key-file",
                &key,
                "--peer-trusted-ca-file",
                &ca,
                "--cert-file",
                &cert,
                "--key-file",
                &key,
                "--trusted-ca-file",
                &ca,
                "--client-cert-auth",
                "--admin-identities",
                "admin",
            ],
        );
    }
    let url = |i: usize| format!("https://{}", ms[i].api);
    let all = format!("{},{},{}", url(0), url(1), url(2));

    // Writes through every member, reads through another: followers forward
    // to the leader over HTTPS with their own certificate.
    for i in 0..3 {
        eventually(
            &certs,
            "client",
            &url(i),
            &["kv", "put", &format!("k{i}"), "v"],
        );
    }
    assert_eq!(
        eventually(&certs, "client", &url(2), &["kv", "get", "k0"]),
        "v"
    );
    // Every member published its https:// record.
    let deadline = Instant::now() + GUARD;
    loop {
        let table = eventually(&certs, "client", &all, &["member", "list"]);
        if table.matches("https://").count() == 3 && table.contains(" leader ") {
            break;
        }
        assert!(Instant::now() < deadline, "{table}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The status page's overview, to a plain client certificate (the
    // auth of /v1/status): a follower reaches every member over HTTPS with
    // its own certificate.
    let deadline = Instant::now() + GUARD;
    loop {
        let addr = ms[1].api.to_string();
        let (code, body) = https(&certs, "client", &addr, "GET", "/v1/ui/overview", b"", "");
        assert_eq!(code, 200, "{body}");
        let o: serde_json::Value = serde_json::from_str(&body).unwrap();
        let members = o["members"].as_array().unwrap();
        // Member records replicate on their own: this member may list one
        // (its own included) before it has its record.
        if members.len() == 3
            && members.iter().all(|m| {
                m["reachable"] == true
                    && m["api_url"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("https://"))
            })
        {
            break;
        }
        assert!(Instant::now() < deadline, "{o}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A client that is not an admin: membership and leadership routes
    // answer 403, through any member.
    for i in 0..3 {
        let o = cli(&certs, Some("client"), &url(i), &["member", "remove", "n3"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("admin identity"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = cli(
        &certs,
        Some("client"),
        &url(0),
        &["member", "transfer-leader", "n2"],
    );
    assert_eq!(o.status.code(), Some(1));
    // Claiming to be a forwarding member does not help a client.
    for m in &ms {
        let (code, _) = https(
            &certs,
            "client",
            &m.api.to_string(),
            "DELETE",
            "/cluster/members/n3",
            b"",
            "x-raftwork-forwarded: 1\r\n",
        );
        assert_eq!(code, 403);
    }
    // The admin's certificate may, through a follower as well.
    let spare_peer = format!("127.0.0.1:{}", common::free_port());
    let spare_api = format!("https://127.0.0.1:{}", common::free_port());
    for i in [1, 2] {
        let out = eventually(
            &certs,
            "admin",
            &url(i),
            &[
                "member",
                "add",
                "n4",
                "--peer-addr",
                &spare_peer,
                "--api-url",
                &spare_api,
                "--learner",
            ],
        );
        assert!(out.contains("n4"), "{out}");
        eventually(&certs, "admin", &url(i), &["member", "remove", "n4"]);
    }

    // Member records are not the client API's business: the route that
    // once took them is gone (members send their own over the peer
    // connection), so even an admin cannot forge one there.
    let forged = format!(
        r#"{{"name":"n1","id":{},"peer_addr":"127.0.0.1:9","api_url":"https://127.0.0.1:9"}}"#,
        raftwork_server::cluster::member_id("cluster-test", "n1")
    );
    for m in &ms {
        let (code, _) = https(
            &certs,
            "admin",
            &m.api.to_string(),
            "PUT",
            "/v1/internal/members/n1",
            forged.as_bytes(),
            "",
        );
        assert_eq!(code, 404);
    }
    let table = eventually(&certs, "client", &all, &["member", "list"]);
    assert!(!table.contains("127.0.0.1:9 "), "{table}");

    // At the door: no client certificate, another CA's, or plain HTTP.
    let o = cli(&certs, None, &url(0), &["kv", "get", "k0"]);
    assert_eq!(o.status.code(), Some(1), "no certificate");
    let o = cli(&other, Some("admin"), &url(0), &["kv", "get", "k0"]);
    assert_eq!(o.status.code(), Some(1), "another CA");
    common::expired_cert(&certs, "client");
    let o = cli(&certs, Some("expired"), &url(0), &["kv", "get", "k0"]);
    assert_eq!(o.status.code(), Some(1), "expired");
    let o = cli(
        &certs,
        Some("n1"),
        &format!("http://{}", ms[0].api),
        &["kv", "get", "k0"],
    );
    assert_eq!(o.status.code(), Some(1), "plain HTTP");
    let logs = ms[0].logs();
    assert!(
        logs.matches("refusing API connection: TLS handshake failed")
            .count()
            >= 2,
        "{logs}"
    );
    // Still serving.
    assert_eq!(
        eventually(&certs, "client", &url(0), &["kv", "get", "k1"]),
        "v"
    );
}
