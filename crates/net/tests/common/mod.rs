//! Test helpers: certificates made on the fly, and waiting on an inbox.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use raft::prelude::{Message, MessageType};
use raftwork_net::{frame, Envelope, Inbound, Inbox, NetConfig, TlsConfig};
use raftwork_storage::{FileSnapshotStore, SnapshotStore};
use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};

/// Hang guard for waits.
pub const WAIT: Duration = Duration::from_secs(30);

/// A certificate authority that signs node certificates.
pub struct Ca {
    pub cert: Certificate,
    pub key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A node certificate for localhost / 127.0.0.1, valid now unless `expired`.
    pub fn node_tls(&self, expired: bool) -> TlsConfig {
        self.tls_for(&[], expired)
    }

    /// A node certificate that also names `name` (a DNS SAN), with every
    /// node's certificate bound to `node-<id>` (`TlsConfig::node_names`).
    pub fn named_tls(&self, name: &str) -> TlsConfig {
        self.tls_for(&[name], false)
            .with_node_names(|id| Some(format!("node-{id}")))
    }

    fn tls_for(&self, names: &[&str], expired: bool) -> TlsConfig {
        let key = KeyPair::generate().unwrap();
        let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        sans.extend(names.iter().map(|n| n.to_string()));
        let mut params = CertificateParams::new(sans).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        TlsConfig::new(self.cert.pem(), cert.pem(), key.serialize_pem())
    }
}

pub fn heartbeat(from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

pub fn envelope(from: u64, to: u64, term: u64) -> Envelope {
    Envelope {
        group_id: 1,
        from,
        to,
        messages: vec![heartbeat(from, to, term)],
    }
}

/// Next envelope of messages on `inbox`, skipping unreachable reports.
pub async fn next_messages(inbox: &mut Inbox, within: Duration) -> Option<Envelope> {
    tokio::time::timeout(within, async {
        loop {
            match inbox.recv().await {
                Some(Inbound::Messages(env)) => return Some(env),
                Some(Inbound::Unreachable { .. } | Inbound::SnapshotStatus { .. }) => {}
                None => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Waits for an unreachable report about `to`.
pub async fn next_unreachable(inbox: &mut Inbox, to: u64) -> bool {
    tokio::time::timeout(WAIT, async {
        loop {
            match inbox.recv().await {
                Some(Inbound::Unreachable { to: t, .. }) if t == to => return true,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

// ---- shared by the per-transport tests ----

pub fn with_tls(tls: Option<TlsConfig>) -> NetConfig {
    NetConfig {
        tls,
        ..Default::default()
    }
}

/// Receives heartbeats until term `last`, checking they come in order from
/// term `first`.
pub async fn expect_terms(inbox: &mut Inbox, first: u64, last: u64) {
    let mut next = first;
    while next <= last {
        let env = next_messages(inbox, WAIT).await.expect("delivered");
        for m in env.messages {
            assert_eq!(m.term, next, "order kept");
            next += 1;
        }
    }
}

pub fn hello(to: u64) -> Vec<u8> {
    let mut b = Vec::new();
    frame::encode_hello(&mut b, 1, to);
    b
}

pub fn batch(from: u64, term: u64) -> Vec<u8> {
    let mut b = Vec::new();
    frame::encode_batch(&mut b, 1, from, 2, &[heartbeat(from, 2, term)]);
    b
}

pub fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

pub fn stored_crc(store: &FileSnapshotStore, index: u64) -> (u64, u32) {
    let (info, mut reader) = store.open(index).unwrap();
    let mut crc = 0u32;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
    }
    (info.size_bytes, crc)
}

pub fn snapshot_message(index: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = 1;
    m.to = 2;
    m.term = term;
    let meta = m.mut_snapshot().mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.mut_conf_state().voters = vec![1, 2];
    m
}

pub fn client_config(ca_pem: &[u8], cert: Option<(&[u8], &[u8])>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert)
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_slice(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

/// Node 1 with its own certificate reaches node 2; a node calling itself 1
/// with node 3's certificate does not (`TlsConfig::node_names`). `bind`
/// starts a transport of the kind under test: (transport, inbox, address).
pub async fn certificates_speak_only_for_their_node<T, F, Fut>(ca: &Ca, bind: F)
where
    T: raftwork_net::Transport,
    F: Fn(u64, NetConfig) -> Fut,
    Fut: std::future::Future<Output = (T, Inbox, std::net::SocketAddr)>,
{
    let tls = |name: &str| NetConfig {
        tls: Some(ca.named_tls(name)),
        ..Default::default()
    };
    let (_b, mut ib, b_addr) = bind(2, tls("node-2")).await;
    let to_b = b_addr.to_string();
    let (a, _ia, _) = bind(1, tls("node-1")).await;
    a.set_peer(2, &to_b).unwrap();
    a.send(envelope(1, 2, 3));
    let env = next_messages(&mut ib, WAIT).await.expect("delivered");
    assert_eq!(env.messages[0].term, 3);
    let (forger, _if, _) = bind(1, tls("node-3")).await;
    forger.set_peer(2, &to_b).unwrap();
    for term in 10..20 {
        forger.send(envelope(1, 2, term));
    }
    assert!(
        next_messages(&mut ib, Duration::from_secs(2))
            .await
            .is_none(),
        "node 3's certificate spoke for node 1"
    );
}
