//! Helpers shared by the tests that start real `raftwork serve` processes:
//! one node here, a cluster of them in `members`.

#![allow(dead_code)]

pub mod members;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_raftwork");

/// A loopback port free now, for a process started later to listen on.
///
/// Drawn below the kernel's ephemeral range: a port the kernel hands out
/// (`bind` to port 0, or the local end of any outgoing connection, such as
/// a node dialing its peers) could be taken again by another connection
/// between this pick and the process's own bind ("Address already in
/// use"). Below that range only an explicit bind takes a port, and each
/// pick in this process is a new one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.max(10_100));
    let span = high - low;
    // Test binaries run one after another; spread each one's picks apart.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low + (start + k) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {high}");
}

/// `raftwork` with no RAFTWORK_* variables inherited from the environment.
pub fn raftwork() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RAFTWORK_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Status and body of `GET path` (`Connection: close`).
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    members::request(addr, "GET", path, b"")
}

pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a single-node `raftwork serve` and waits for /readyz (retried on
/// new ports if a picked port was taken in between).
pub fn start(dir: &Path) -> Server {
    start_with(dir, &[])
}

/// [`start`] with extra `serve` flags.
pub fn start_with(dir: &Path, extra: &[&str]) -> Server {
    for attempt in 0..5 {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.join(format!("serve-{attempt}.log"))).unwrap();
        let mut child = raftwork()
            .args(["serve", "--name", "cli", "--log-level", "warn"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--api-addr", &api.to_string()])
            .args(["--peer-addr", &format!("127.0.0.1:{}", free_port())])
            .args(extra)
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

/// An expired certificate for `name`, signed by the CA in `dir` (rebuilt
/// from its key: the same name and key sign certificates that chain to it).
pub fn expired_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca-key.pem")).unwrap())
            .unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "raftwork cluster CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string(), "localhost".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let (c, k) = (dir.join("expired.pem"), dir.join("expired-key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// `raftwork tls init --names NAMES --out OUT`, which must succeed.
pub fn tls_init(names: &str, out: &Path) {
    let status = raftwork()
        .args(["tls", "init", "--names", names, "--out"])
        .arg(out)
        .status()
        .unwrap();
    assert!(status.success(), "tls init into {}", out.display());
}

/// A TLS client trusting `ca`, presenting `cert` (certificate, key) if given.
pub fn client_config(ca: &Path, cert: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(c)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(k).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}
