//! Three nodes in one process over the in-memory network: elect a leader,
//! write through it, read on a follower, move leadership, keep writing.
//!
//! Shows: `MemNetwork`, `initial_voters` for a static bootstrap, follower
//! reads (ReadIndex), `transfer_leader`, and leader-change events.
//!
//! Run: `cargo run -p raftwork --example cluster`

use std::io::{Read, Write};
use std::time::Duration;

use raftwork::{Builder, Command, MemNetwork, Node, NodeEvent, StateMachine};

/// Sums the numbers it is sent.
#[derive(Default)]
struct Sum(i64);

impl StateMachine for Sum {
    type Response = i64;

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<i64> {
        commands
            .iter()
            .map(|c| {
                let n: i64 = std::str::from_utf8(c.data)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                self.0 += n;
                self.0
            })
            .collect()
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(&self.0.to_le_bytes())
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        self.0 = i64::from_le_bytes(b);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let network = MemNetwork::new();
    let ids = [1, 2, 3];
    let nodes: Vec<Node<Sum>> = ids
        .iter()
        .map(|&id| {
            let (transport, inbox) = network.join(id);
            Builder::new(id, Sum::default())
                .in_memory()
                .transport(transport, inbox)
                .initial_voters(ids)
                .build()
        })
        .collect::<Result<_, _>>()?;

    let mut events = nodes[0].subscribe();
    let leader = nodes[0].wait_for_leader(Duration::from_secs(10)).await?;
    println!("leader is node {leader}");
    let leader_node = &nodes[(leader - 1) as usize];

    for n in 1..=10 {
        leader_node.propose(n.to_string()).await?;
    }
    let follower = &nodes[(leader % 3) as usize];
    let sum = follower.read(|s: &Sum| s.0).await?;
    println!("node {} (follower) reads sum = {sum}", follower.id());
    assert_eq!(sum, 55);

    leader_node.transfer_leader(follower.id()).await?;
    println!("leadership moved to node {}", follower.id());
    follower.propose("45").await?;
    println!(
        "sum after one more write: {}",
        follower.read(|s: &Sum| s.0).await?
    );

    while let Ok(event) = events.try_recv() {
        if let NodeEvent::LeaderChanged { leader, term } = event {
            println!("node 1 saw leader {leader:?} in term {term}");
        }
    }
    for n in &nodes {
        n.shutdown().await;
    }
    Ok(())
}
