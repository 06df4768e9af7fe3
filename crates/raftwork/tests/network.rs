//! Nodes that start their own network: the builder's default transport (TCP)
//! from a listen address and peer addresses, and run-time peer addresses.

mod common;

use common::{init_logging, HashSm, TICK, WAIT};
use raftwork::{BuildError, Builder, HttpMode, Node, NodeId, Role, TransportKind};

/// Free loopback addresses (bound and released; fine for tests).
fn free_addrs(n: usize) -> Vec<std::net::SocketAddr> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_starts_tcp_from_a_listen_address() {
    from_a_listen_address(TransportKind::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_starts_http_streams_from_a_listen_address() {
    from_a_listen_address(TransportKind::Http(HttpMode::Stream)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_starts_http_short_requests_from_a_listen_address() {
    from_a_listen_address(TransportKind::Http(HttpMode::Short)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_starts_grpc_from_a_listen_address() {
    from_a_listen_address(TransportKind::Grpc).await;
}

async fn from_a_listen_address(kind: TransportKind) {
    init_logging();
    let addrs = free_addrs(4);
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut nodes: Vec<Node<HashSm>> = Vec::new();
    for &id in &ids {
        let mut b = Builder::new(id, HashSm::default())
            .in_memory()
            .listen(addrs[id as usize - 1])
            .transport_kind(kind.clone())
            .initial_voters(ids.iter().copied())
            .configure(|c| c.tick_interval = TICK);
        for &peer in ids.iter().filter(|&&p| p != id) {
            b = b.peer(peer, addrs[peer as usize - 1].to_string());
        }
        nodes.push(b.build().unwrap());
    }
    let leader = nodes[0].wait_for_leader(WAIT).await.unwrap();
    let lnode = nodes[leader as usize - 1].clone();
    for i in 0..100 {
        lnode.propose(format!("x{i}").into_bytes()).await.unwrap();
    }

    // A fourth node joins; everyone learns its address at run time.
    let n4 = Builder::new(4, HashSm::default())
        .in_memory()
        .listen(addrs[3])
        .transport_kind(kind.clone())
        .join_existing()
        .configure(|c| c.tick_interval = TICK)
        .peer(1, addrs[0].to_string())
        .peer(2, addrs[1].to_string())
        .peer(3, addrs[2].to_string())
        .build()
        .unwrap();
    for n in &nodes {
        n.set_peer_address(4, addrs[3].to_string()).await.unwrap();
    }
    assert!(
        nodes[0].set_peer_address(5, "no port").await.is_err(),
        "a malformed address is refused"
    );
    lnode.add_learner(4, Vec::new()).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let count = n4.read_stale(|s: &HashSm| s.count).await.unwrap();
        if count == 100 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "learner at {count}");
        tokio::time::sleep(TICK).await;
    }
    assert_eq!(n4.status().await.unwrap().role, Role::Learner);
    n4.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_listen_address_and_a_taken_port_are_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = Builder::new(1, HashSm::default())
        .in_memory()
        .peer(2, "127.0.0.1:1")
        .build()
        .err()
        .expect("refused");
    assert!(matches!(err, BuildError::Network(_)), "{err}");
    let err = Builder::new(1, HashSm::default())
        .in_memory()
        .listen(taken.local_addr().unwrap())
        .build()
        .err()
        .expect("refused");
    assert!(err.to_string().contains("cannot listen"), "{err}");
}
