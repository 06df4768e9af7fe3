//! Shared helpers for the cluster tests: a hashing state machine and an
//! in-process cluster over the in-memory network.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::time::Duration;

use raftwork::{Builder, Command, MemLogStore, MemNetwork, Node, NodeId, StateMachine};

/// Records every command; its hash is a fingerprint of the applied history.
#[derive(Default, Clone)]
pub struct HashSm {
    /// FNV-1a over (index, data) of every command applied.
    pub hash: u64,
    pub count: u64,
    pub last: Vec<u8>,
    pub last_index: u64,
    /// The log time of the last command applied since this instance was
    /// made or restored (not in snapshots; the hash covers every one).
    pub last_log_time_ms: u64,
    /// A command that makes this state machine panic (for the tests of a
    /// node whose state machine fails); `start_node` sets `poison-<id>`.
    pub poison: Option<Vec<u8>>,
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    if h == 0 {
        h = 0xcbf29ce484222325;
    }
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

impl StateMachine for HashSm {
    type Response = u64;

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<u64> {
        commands
            .iter()
            .map(|c| {
                if self.poison.as_deref() == Some(c.data) {
                    panic!("poisoned by command {}", c.index);
                }
                assert!(c.index > self.last_index, "commands out of order");
                assert!(
                    c.log_time_ms >= self.last_log_time_ms,
                    "log time went back at index {}",
                    c.index
                );
                self.last_index = c.index;
                self.last_log_time_ms = c.log_time_ms;
                // Replicas must agree on log time too: it is in the hash
                // the tests compare.
                self.hash = fnv(self.hash, &c.log_time_ms.to_le_bytes());
                self.hash = fnv(self.hash, &c.index.to_le_bytes());
                self.hash = fnv(self.hash, c.data);
                self.count += 1;
                self.last = c.data.to_vec();
                self.count
            })
            .collect()
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(&self.hash.to_le_bytes())?;
        w.write_all(&self.count.to_le_bytes())?;
        w.write_all(&self.last_index.to_le_bytes())?;
        w.write_all(&(self.last.len() as u64).to_le_bytes())?;
        w.write_all(&self.last)
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        self.hash = u64::from_le_bytes(b);
        r.read_exact(&mut b)?;
        self.count = u64::from_le_bytes(b);
        r.read_exact(&mut b)?;
        self.last_index = u64::from_le_bytes(b);
        r.read_exact(&mut b)?;
        let mut last = vec![0u8; u64::from_le_bytes(b) as usize];
        r.read_exact(&mut last)?;
        self.last = last;
        Ok(())
    }
}

/// Tick length in tests: elections after 0.5–1 s, so a busy CI machine does
/// not see spurious ones.
pub const TICK: Duration = Duration::from_millis(50);
/// Hang guard for waits; far above any expected time.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Cluster {
    pub network: MemNetwork,
    pub nodes: Vec<Node<HashSm>>,
}

pub fn start_node(network: &MemNetwork, id: NodeId, voters: Option<&[NodeId]>) -> Node<HashSm> {
    let (transport, inbox) = network.join(id);
    let sm = HashSm {
        poison: Some(format!("poison-{id}").into_bytes()),
        ..HashSm::default()
    };
    let mut b = Builder::new(id, sm)
        .log_store(MemLogStore::new())
        .transport(transport, inbox)
        .configure(|c| c.tick_interval = TICK);
    b = match voters {
        Some(v) => b.initial_voters(v.iter().copied()),
        None => b.join_existing(),
    };
    b.build().expect("node starts")
}

/// Logs to the test output when RUST_LOG is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

impl Cluster {
    pub fn start(n: u64) -> Self {
        init_logging();
        let network = MemNetwork::new();
        let ids: Vec<NodeId> = (1..=n).collect();
        let nodes = ids
            .iter()
            .map(|&id| start_node(&network, id, Some(&ids)))
            .collect();
        Self { network, nodes }
    }

    pub fn node(&self, id: NodeId) -> &Node<HashSm> {
        self.nodes
            .iter()
            .find(|n| n.id() == id)
            .expect("node exists")
    }

    /// Waits until every given node agrees on one leader, and returns it.
    pub async fn wait_leader(&self, among: &[NodeId]) -> NodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut leaders = Vec::new();
            for &id in among {
                let st = self.node(id).status().await.expect("running");
                leaders.push(st.leader);
            }
            if let Some(Some(l)) = leaders.first().copied() {
                if leaders.iter().all(|x| *x == Some(l)) && among.contains(&l) {
                    let st = self.node(l).status().await.unwrap();
                    if st.role == raftwork::Role::Leader {
                        return l;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader among {among:?}: {leaders:?}"
            );
            tokio::time::sleep(TICK).await;
        }
    }

    /// Waits until every given node applied at least `index`.
    pub async fn wait_applied(&self, among: &[NodeId], index: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        for &id in among {
            loop {
                let st = self.node(id).status().await.expect("running");
                if st.applied_index >= index {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {id} stuck at {} < {index}",
                    st.applied_index
                );
                tokio::time::sleep(TICK).await;
            }
        }
    }

    pub async fn hashes(&self, among: &[NodeId]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &id in among {
            out.push(
                self.node(id)
                    .read_stale(|sm: &HashSm| (sm.hash, sm.count))
                    .await
                    .unwrap(),
            );
        }
        out
    }

    pub async fn shutdown(&self) {
        for n in &self.nodes {
            n.shutdown().await;
        }
    }
}
