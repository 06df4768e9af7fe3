//! Test helpers: certificates made on the fly, and waiting on an inbox.

#![allow(dead_code)]

use std::time::Duration;

use raft::prelude::{Message, MessageType};
use raftwork_net::{Envelope, Inbound, Inbox, TlsConfig};
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
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
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
