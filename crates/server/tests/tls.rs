//! Peer TLS on three real `raftwork serve` processes, with certificates from
//! `raftwork tls init`: the cluster works, and the peer port refuses what
//! R11 lists (plaintext, no client certificate, another CA, an expired
//! certificate) and a member's valid certificate claiming another member,
//! each with a log line; bad TLS flags exit 2 before the data dir exists.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::members::*;
use common::{client_config as client, expired_cert, raftwork, tls_init};
use raftwork::net::frame;
use rustls::pki_types::ServerName;

const TOKEN: &str = "cluster-test";

fn tls_flags(dir: &Path, name: &str) -> Vec<String> {
    let p = |f: String| dir.join(f).to_string_lossy().into_owned();
    vec![
        "--peer-cert-file".into(),
        p(format!("{name}.pem")),
        "--peer-key-file".into(),
        p(format!("{name}-key.pem")),
        "--peer-trusted-ca-file".into(),
        p("ca.pem".into()),
    ]
}

fn hello_from(name: &str, to: &str) -> Vec<u8> {
    let mut hello = Vec::new();
    frame::encode_hello(
        &mut hello,
        raftwork_server::cluster::member_id(TOKEN, name),
        raftwork_server::cluster::member_id(TOKEN, to),
    );
    hello
}

/// True if the peer at `addr` closes a connection that says `hello` over
/// TLS as `config` (an accepted one stays open and silent).
fn refused_tls(addr: &str, config: Arc<rustls::ClientConfig>, hello: &[u8]) -> bool {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    if tls.write_all(hello).and_then(|_| tls.flush()).is_err() {
        return true;
    }
    let mut buf = [0u8; 16];
    match tls.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// True if the peer at `addr` closes a plaintext connection saying `hello`.
fn refused_plaintext(addr: &str, hello: &[u8]) -> bool {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if tcp.write_all(hello).is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a TLS alert, then the close
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
            }
        }
    }
}

#[test]
fn a_peer_tls_cluster_refuses_strangers_and_members_posing_as_others() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let other = tmp.path().join("other-ca");
    tls_init("n1,n2,n3", &certs);
    tls_init("n2", &other);
    let (mut ms, initial) = members(tmp.path(), 3);
    for m in &mut ms {
        let flags = tls_flags(&certs, &m.name);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        m.start_with(&initial, &flags);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    for (i, m) in ms.iter_mut().enumerate() {
        put(m, &format!("k{i}"), "over TLS peers");
    }

    let target = ms[0].peer.clone();
    let ca = certs.join("ca.pem");
    let n2 = (certs.join("n2.pem"), certs.join("n2-key.pem"));
    let hello_n2 = hello_from("n2", "n1");
    // Control: n2's own certificate, saying hello as n2, stays connected.
    assert!(!refused_tls(
        &target,
        client(&ca, Some((&n2.0, &n2.1))),
        &hello_n2
    ));
    // A valid certificate of another member: n2's, claiming to be n3.
    assert!(
        refused_tls(
            &target,
            client(&ca, Some((&n2.0, &n2.1))),
            &hello_from("n3", "n1")
        ),
        "n2's certificate spoke for n3"
    );
    // No client certificate.
    assert!(
        refused_tls(&target, client(&ca, None), &hello_n2),
        "no certificate"
    );
    // A certificate for n2 from another CA.
    let wrong = (other.join("n2.pem"), other.join("n2-key.pem"));
    assert!(
        refused_tls(&target, client(&ca, Some((&wrong.0, &wrong.1))), &hello_n2),
        "another CA"
    );
    // An expired certificate from the cluster's CA.
    let expired = expired_cert(&certs, "n2");
    assert!(
        refused_tls(
            &target,
            client(&ca, Some((&expired.0, &expired.1))),
            &hello_n2
        ),
        "expired"
    );
    // Plaintext.
    assert!(refused_plaintext(&target, &hello_n2), "plaintext");

    // Each refusal left a line in the target's log, and the cluster serves.
    let logs = ms[0].logs();
    assert!(
        logs.contains("not node"),
        "identity refusal not logged:\n{logs}"
    );
    let handshakes = logs.matches("TLS handshake failed").count();
    assert!(
        handshakes >= 3,
        "{handshakes} handshake refusals logged:\n{logs}"
    );
    put(&mut ms[1], "after", "still serving");
}

#[test]
fn unusable_peer_tls_flags_exit_2_before_the_data_dir_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    tls_init("n1,n2", &certs);
    let data = tmp.path().join("data");
    let run = |flags: &[String]| {
        raftwork()
            .args(["serve", "--name", "n1"])
            .arg("--data-dir")
            .arg(&data)
            .args(flags)
            .output()
            .unwrap()
    };
    let good = tls_flags(&certs, "n1");
    // Only two of the three files.
    let out = run(&good[..4]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("go together"));
    // A key that is not the certificate's.
    let mut mismatched = good.clone();
    mismatched[3] = certs.join("n2-key.pem").to_string_lossy().into_owned();
    let out = run(&mismatched);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A missing file.
    let mut missing = good.clone();
    missing[1] = certs.join("nope.pem").to_string_lossy().into_owned();
    let out = run(&missing);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.pem"));
    assert!(!data.exists(), "the data dir was created");
    // tls init never overwrites.
    let status = raftwork()
        .args(["tls", "init", "--names", "n1", "--out"])
        .arg(&certs)
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1));
}
