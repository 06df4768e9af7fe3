//! raftwork clusters over the network transports on loopback (TCP plaintext
//! and mutual TLS, HTTP in both modes, gRPC plaintext and mutual TLS):
//! election, replication, follower reads, leader failover, membership
//! changes, leadership transfer, and catch-up by snapshot after a restart.
//! One scenario, run per transport.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{init_logging, Ca, WAIT};
use raftwork::storage::SnapshotStore;
use raftwork::{Builder, Command, Node, NodeId, Role, StateMachine};
use raftwork_net::{
    Envelope, GrpcTransport, HttpMode, HttpTransport, Inbox, NetConfig, NetError, TcpTransport,
    Transport, TransportError,
};

const TICK: Duration = Duration::from_millis(50);

/// A fingerprint of every command entry (`c<i>`) applied, in log order, and
/// the count of distinct `i`. A write whose outcome is unknown (leadership
/// lost while in flight) is sent again, as a client with sessions would, so
/// one `i` may sit in the log twice; the count ignores the second, but the
/// fingerprint covers every entry with its index, so a node that applies an
/// entry twice (or skips one) differs from the others. Entries must arrive
/// in strictly increasing index order; `out_of_order` counts any that did
/// not (an entry applied twice is one).
#[derive(Default)]
struct Sum {
    hash: u64,
    count: u64,
    last_index: u64,
    out_of_order: u64,
    seen: std::collections::BTreeSet<u64>,
}

impl StateMachine for Sum {
    type Response = u64;
    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<u64> {
        commands
            .iter()
            .map(|c| {
                let i = std::str::from_utf8(c.data)
                    .ok()
                    .and_then(|t| t.strip_prefix('c'))
                    .and_then(|n| n.parse::<u64>().ok())
                    .expect("commands are c<i>");
                if c.index <= self.last_index {
                    self.out_of_order += 1;
                }
                self.last_index = self.last_index.max(c.index);
                for b in c.index.to_le_bytes().iter().chain(c.data) {
                    self.hash = (self.hash ^ *b as u64).wrapping_mul(0x100000001b3);
                }
                if self.seen.insert(i) {
                    self.count += 1;
                }
                self.count
            })
            .collect()
    }
    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(&self.hash.to_le_bytes())?;
        w.write_all(&self.count.to_le_bytes())?;
        w.write_all(&self.last_index.to_le_bytes())?;
        w.write_all(&self.out_of_order.to_le_bytes())?;
        for i in &self.seen {
            w.write_all(&i.to_le_bytes())?;
        }
        Ok(())
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
        self.out_of_order = u64::from_le_bytes(b);
        self.seen.clear();
        for _ in 0..self.count {
            r.read_exact(&mut b)?;
            self.seen.insert(u64::from_le_bytes(b));
        }
        Ok(())
    }
}

/// Which transport a cluster runs on.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Tcp,
    Http(HttpMode),
    Grpc,
}

/// Any of the transports, so one scenario drives them all.
#[derive(Clone)]
enum Net {
    Tcp(TcpTransport),
    Http(HttpTransport),
    Grpc(GrpcTransport),
}

impl Net {
    async fn bind(
        kind: Kind,
        id: NodeId,
        listen: impl tokio::net::ToSocketAddrs + std::fmt::Debug,
        config: NetConfig,
    ) -> Result<(Net, Inbox), NetError> {
        Ok(match kind {
            Kind::Tcp => {
                let (t, inbox) = TcpTransport::bind(id, listen, config).await?;
                (Net::Tcp(t), inbox)
            }
            Kind::Http(mode) => {
                let (t, inbox) = HttpTransport::bind(id, listen, config, mode).await?;
                (Net::Http(t), inbox)
            }
            Kind::Grpc => {
                let (t, inbox) = GrpcTransport::bind(id, listen, config).await?;
                (Net::Grpc(t), inbox)
            }
        })
    }

    fn local_addr(&self) -> SocketAddr {
        match self {
            Net::Tcp(t) => t.local_addr(),
            Net::Http(t) => t.local_addr(),
            Net::Grpc(t) => t.local_addr(),
        }
    }

    fn inner(&self) -> &dyn Transport {
        match self {
            Net::Tcp(t) => t,
            Net::Http(t) => t,
            Net::Grpc(t) => t,
        }
    }
}

/// Forwards every method, so each transport keeps its own behaviour
/// (snapshot streaming included).
impl Transport for Net {
    fn send(&self, envelope: Envelope) {
        self.inner().send(envelope)
    }
    fn set_peer(&self, id: NodeId, address: &str) -> Result<(), TransportError> {
        self.inner().set_peer(id, address)
    }
    fn remove_peer(&self, id: NodeId) {
        self.inner().remove_peer(id)
    }
    fn shutdown(&self) {
        self.inner().shutdown()
    }
    fn streams_snapshots(&self) -> bool {
        self.inner().streams_snapshots()
    }
    fn attach_snapshots(&self, group_id: u64, store: Arc<dyn SnapshotStore>) {
        self.inner().attach_snapshots(group_id, store)
    }
}

struct Member {
    node: Node<Sum>,
    transport: Net,
}

struct Cluster {
    kind: Kind,
    net: NetConfig,
    addrs: HashMap<NodeId, SocketAddr>,
    members: HashMap<NodeId, Member>,
    dirs: HashMap<NodeId, tempfile::TempDir>,
}

impl Cluster {
    async fn start(n: u64, kind: Kind, net: NetConfig) -> Self {
        init_logging();
        let mut c = Cluster {
            kind,
            net,
            addrs: HashMap::new(),
            members: HashMap::new(),
            dirs: HashMap::new(),
        };
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut transports = Vec::new();
        for &id in &ids {
            let (t, inbox) = Net::bind(kind, id, "127.0.0.1:0", c.net.clone())
                .await
                .unwrap();
            c.addrs.insert(id, t.local_addr());
            transports.push((id, t, inbox));
        }
        for (id, t, inbox) in transports {
            c.dirs.insert(id, tempfile::tempdir().unwrap());
            let node = c.build(id, t.clone(), inbox, Some(&ids));
            c.members.insert(id, Member { node, transport: t });
        }
        c
    }

    fn build(&self, id: NodeId, t: Net, inbox: Inbox, voters: Option<&[NodeId]>) -> Node<Sum> {
        for (&peer, addr) in &self.addrs {
            if peer != id {
                t.set_peer(peer, &addr.to_string()).unwrap();
            }
        }
        let dir: &Path = self.dirs[&id].path();
        let b = Builder::new(id, Sum::default())
            .data_dir(dir)
            .transport(t, inbox)
            .configure(|c| {
                c.tick_interval = TICK;
                c.core.snapshot_interval_entries = 200;
                c.core.snapshot_keep_entries = 20;
            });
        let b = match voters {
            Some(v) => b.initial_voters(v.iter().copied()),
            None => b.join_existing(),
        };
        b.build().expect("node starts")
    }

    fn node(&self, id: NodeId) -> &Node<Sum> {
        &self.members[&id].node
    }

    async fn leader(&self) -> NodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            for (&id, m) in &self.members {
                if let Some(st) = m.node.status().await {
                    if st.role == Role::Leader {
                        return id;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "no leader");
            tokio::time::sleep(TICK).await;
        }
    }

    async fn wait_applied(&self, index: u64) {
        for (&id, m) in &self.members {
            let deadline = tokio::time::Instant::now() + WAIT;
            while m.node.status().await.expect("running").applied_index < index {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "node {id} behind {index}"
                );
                tokio::time::sleep(TICK).await;
            }
        }
    }

    async fn fingerprints(&self) -> Vec<(NodeId, u64, u64)> {
        let mut v = Vec::new();
        for (&id, m) in &self.members {
            let (h, c, out_of_order) = m
                .node
                .read_stale(|s: &Sum| (s.hash, s.count, s.out_of_order))
                .await
                .unwrap();
            assert_eq!(out_of_order, 0, "node {id} applied an entry twice");
            v.push((id, h, c));
        }
        v.sort();
        v
    }

    async fn assert_same_state(&self, index: u64) {
        self.wait_applied(index).await;
        let f = self.fingerprints().await;
        assert!(
            f.iter().all(|x| (x.1, x.2) == (f[0].1, f[0].2)),
            "states differ: {f:?}"
        );
    }

    async fn stop(&mut self, id: NodeId) {
        let m = self.members.remove(&id).unwrap();
        m.node.shutdown().await;
    }

    /// Restarts `id` on its data dir and its old address.
    async fn restart(&mut self, id: NodeId) {
        let addr = self.addrs[&id];
        let (t, inbox) = loop {
            match Net::bind(self.kind, id, addr, self.net.clone()).await {
                Ok(x) => break x,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let node = self.build(id, t.clone(), inbox, None);
        self.members.insert(id, Member { node, transport: t });
    }

    /// Writes `from..=to` through `via`, following the leader if it moves.
    /// A write whose outcome is unknown (leadership lost while it was in
    /// flight, a timeout) is sent again: the state machine ignores a
    /// command it applied before, so every write still counts once.
    async fn write(&self, via: NodeId, from: u64, to: u64) -> u64 {
        let nodes: HashMap<NodeId, Node<Sum>> = self
            .members
            .iter()
            .map(|(&id, m)| (id, m.node.clone()))
            .collect();
        let mut tasks = Vec::new();
        for chunk in 0..8u64 {
            let nodes = nodes.clone();
            tasks.push(tokio::spawn(async move {
                let mut last = 0;
                let mut target = via;
                for i in (from..=to).filter(|i| i % 8 == chunk) {
                    let deadline = tokio::time::Instant::now() + WAIT;
                    loop {
                        match nodes[&target].propose(format!("c{i}").into_bytes()).await {
                            Ok((index, _)) => {
                                last = last.max(index);
                                break;
                            }
                            Err(e) => {
                                let hint = match e {
                                    raftwork::ProposeError::NotLeader { leader_hint, .. } => {
                                        leader_hint
                                    }
                                    raftwork::ProposeError::Dropped
                                    | raftwork::ProposeError::Timeout => None,
                                    e => panic!("write {i} failed: {e}"),
                                };
                                assert!(
                                    tokio::time::Instant::now() < deadline,
                                    "write {i}: no leader to write to ({e})"
                                );
                                if let Some(l) = hint.filter(|l| nodes.contains_key(l)) {
                                    target = l;
                                }
                                tokio::time::sleep(TICK).await;
                            }
                        }
                    }
                }
                last
            }));
        }
        let mut last = 0;
        for t in tasks {
            last = last.max(t.await.unwrap());
        }
        last
    }

    async fn shutdown(self) {
        for m in self.members.values() {
            m.node.shutdown().await;
        }
    }
}

async fn scenario(kind: Kind, net: NetConfig) {
    let mut c = Cluster::start(3, kind, net).await;
    let leader = c.leader().await;
    let last = c.write(leader, 1, 2_000).await;
    c.assert_same_state(last).await;

    // A follower's linearizable read sees every acknowledged write.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let count = c.node(follower).read(|s: &Sum| s.count).await.unwrap();
    assert_eq!(count, 2_000);

    // Leadership transfer.
    c.node(leader).transfer_leader(follower).await.unwrap();
    assert_eq!(c.leader().await, follower);

    // Leader failover: stop the leader, the others elect a new one and go on.
    let old = c.leader().await;
    c.stop(old).await;
    let new = c.leader().await;
    assert_ne!(new, old);
    let last = c.write(new, 2_001, 2_600).await;
    // The old leader restarts from its WAL; it is far behind a compacted log
    // (snapshots every 200 entries), so it catches up by snapshot over the
    // network.
    c.restart(old).await;
    c.assert_same_state(last).await;

    // Membership: a fourth node joins as a learner, is promoted, then removed.
    let (t4, inbox4) = Net::bind(c.kind, 4, "127.0.0.1:0", c.net.clone())
        .await
        .unwrap();
    c.addrs.insert(4, t4.local_addr());
    for m in c.members.values() {
        m.transport
            .set_peer(4, &t4.local_addr().to_string())
            .unwrap();
    }
    c.dirs.insert(4, tempfile::tempdir().unwrap());
    let n4 = c.build(4, t4.clone(), inbox4, None);
    c.members.insert(
        4,
        Member {
            node: n4,
            transport: t4,
        },
    );
    let leader = c.leader().await;
    c.node(leader).add_learner(4, Vec::new()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match c.node(leader).promote_learner(4).await {
            Ok(cs) => {
                assert!(cs.voters.contains(&4));
                break;
            }
            Err(raftwork::ConfChangeError::LearnerNotCaughtUp { .. }) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "learner never caught up"
                );
                tokio::time::sleep(TICK).await;
            }
            Err(e) => panic!("promote failed: {e}"),
        }
    }
    let last = c.write(leader, 2_601, 2_700).await;
    c.assert_same_state(last).await;
    let cs = c.node(leader).remove_node(4).await.unwrap();
    assert!(!cs.voters.contains(&4));
    c.stop(4).await;
    let last = c.write(leader, 2_701, 2_750).await;
    c.assert_same_state(last).await;
    let f = c.fingerprints().await;
    assert_eq!(f[0].2, 2_750, "every write applied once");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_tcp() {
    scenario(Kind::Tcp, NetConfig::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_mutual_tls() {
    let ca = Ca::new("cluster CA");
    // One certificate for every node is enough here: each names localhost.
    let tls = ca.node_tls(false);
    scenario(
        Kind::Tcp,
        NetConfig {
            tls: Some(tls),
            ..Default::default()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_http_stream() {
    scenario(Kind::Http(HttpMode::Stream), NetConfig::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_http_short() {
    scenario(Kind::Http(HttpMode::Short), NetConfig::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_grpc() {
    scenario(Kind::Grpc, NetConfig::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_grpc_with_mutual_tls() {
    let ca = Ca::new("cluster CA");
    scenario(
        Kind::Grpc,
        NetConfig {
            tls: Some(ca.node_tls(false)),
            ..Default::default()
        },
    )
    .await;
}
