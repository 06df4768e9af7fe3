//! Exactly-once client sessions on real nodes (in-process network): a
//! command sent again is applied once and answered with its first response,
//! on the leader and through followers, through dropped, duplicated and
//! delayed messages and leader changes, across snapshot installs and
//! restarts; stale, expired and unknown sessions get their errors and
//! apply nothing.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{init_logging, Cluster, HashSm, TICK, WAIT};
use raftwork::transport::Faults;
use raftwork::{Builder, MemLogStore, Node, NodeId, ProposeError, SessionToken};

/// Waits until `node` knows a leader.
async fn leader_of(node: &Node<HashSm>) -> NodeId {
    node.wait_for_leader(WAIT).await.expect("a leader")
}

async fn count(node: &Node<HashSm>) -> u64 {
    node.read(|sm: &HashSm| sm.count).await.expect("read")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_twice_applies_once_and_both_copies_get_the_first_answer() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let node = c.node(leader);
    let s = node.register_session().await.expect("register");
    let (i1, r1) = node
        .propose_in_session(s, 1, 1, b"x".to_vec())
        .await
        .unwrap();
    assert_eq!(r1, 1, "first command of the state machine");
    // The same sequence again (as after a lost answer): answered from the
    // cache by a later entry, applied nowhere.
    let (i2, r2) = node
        .propose_in_session(s, 1, 1, b"x".to_vec())
        .await
        .unwrap();
    assert!(i2 > i1, "a second entry committed");
    assert_eq!(r2, r1, "with the first answer");
    c.wait_applied(&[1, 2, 3], i2).await;
    for id in [1, 2, 3] {
        let n = c.node(id).read_stale(|sm: &HashSm| sm.count).await.unwrap();
        assert_eq!(n, 1, "node {id} applied the command once");
    }
    // A plain propose of the same bytes applies again: the dedupe is the
    // session's, not a property of the state machine.
    let (_, r3) = node.propose(b"x".to_vec()).await.unwrap();
    assert_eq!(r3, 2);
    c.shutdown().await;
}

/// Every command carries the leader's clock as log time: never going back,
/// the same on every replica (the hash covers it), and within the wall
/// clock around the proposal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_carry_the_same_log_time_on_every_replica() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let mut last = (0, 0);
    for k in 0..20 {
        let before = now_ms();
        let (index, _) = c.node(leader).propose(format!("t{k}")).await.unwrap();
        let after = now_ms();
        let t = c
            .node(leader)
            .read_stale(|sm: &HashSm| sm.last_log_time_ms)
            .await
            .unwrap();
        assert!(t >= before && t <= after, "{before} <= {t} <= {after}");
        last = (index, t);
    }
    c.wait_applied(&[1, 2, 3], last.0).await;
    let hashes: BTreeSet<u64> = replica_hashes(&c).await;
    assert_eq!(
        hashes.len(),
        1,
        "replicas disagree on commands or log times"
    );
    c.shutdown().await;
}

async fn replica_hashes(c: &Cluster) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for id in [1, 2, 3] {
        out.insert(c.node(id).read_stale(|sm: &HashSm| sm.hash).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_work_through_followers() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let follower = c.node(if leader == 1 { 2 } else { 1 });
    leader_of(follower).await;
    let session = follower
        .session()
        .await
        .expect("register through a follower");
    for k in 1..=20u64 {
        let (_, r) = session.propose(format!("cmd-{k}")).await.expect("propose");
        assert_eq!(r, k);
    }
    assert_eq!(session.next_seq(), 21);
    // A copy of an answered command sent through the leader gets the same
    // answer: the table is the cluster's, not the node's.
    let (_, r) = c
        .node(leader)
        .propose_in_session(session.token(), 20, 20, b"cmd-20".to_vec())
        .await
        .unwrap();
    assert_eq!(r, 20);
    assert_eq!(count(follower).await, 20);
    session.close().await.expect("unregister");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_expired_and_unknown_sessions_get_their_errors_and_apply_nothing() {
    init_logging();
    let node = Builder::new(1, HashSm::default())
        .in_memory()
        .configure(|c| {
            c.tick_interval = TICK;
            c.sessions.ttl_ms = 300;
        })
        .build()
        .unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    // Unknown.
    assert_eq!(
        node.propose_in_session(SessionToken { id: 999, secret: 1 }, 1, 1, b"a".to_vec())
            .await
            .unwrap_err(),
        ProposeError::SessionExpired {
            session: 999,
            earlier_copy_in_flight: false
        }
    );
    // Stale: the client said it saw every answer below 5, then sends 3.
    let s = node.register_session().await.unwrap();
    node.propose_in_session(s, 5, 5, b"b".to_vec())
        .await
        .unwrap();
    assert_eq!(
        node.propose_in_session(s, 3, 3, b"c".to_vec())
            .await
            .unwrap_err(),
        ProposeError::SessionSequenceStale {
            session: s.id,
            seq: 3,
            low_water: 5
        }
    );
    assert_eq!(count(&node).await, 1, "only the command of sequence 5");
    // Expired: idle past the TTL of log time. The next entry's stamp moves
    // log time on and ends it before the command is looked at.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        node.propose_in_session(s, 6, 6, b"d".to_vec())
            .await
            .unwrap_err(),
        ProposeError::SessionExpired {
            session: s.id,
            earlier_copy_in_flight: false
        }
    );
    // Unregistered.
    let s2 = node.register_session().await.unwrap();
    node.unregister_session(s2).await.unwrap();
    assert_eq!(
        node.propose_in_session(s2, 1, 1, b"e".to_vec())
            .await
            .unwrap_err(),
        ProposeError::SessionExpired {
            session: s2.id,
            earlier_copy_in_flight: false
        }
    );
    assert_eq!(
        node.unregister_session(s2).await.unwrap_err(),
        ProposeError::SessionExpired {
            session: s2.id,
            earlier_copy_in_flight: false
        }
    );
    // Someone else's session: the right id with a wrong secret is refused
    // as unknown, and neither writes in it nor ends it.
    let s3 = node.register_session().await.unwrap();
    let forged = SessionToken {
        id: s3.id,
        secret: s3.secret ^ 1,
    };
    for attempt in [
        node.propose_in_session(forged, 1, 1, b"f".to_vec())
            .await
            .map(|_| ()),
        node.unregister_session(forged).await,
    ] {
        assert_eq!(
            attempt.unwrap_err(),
            ProposeError::SessionExpired {
                session: s3.id,
                earlier_copy_in_flight: false
            }
        );
    }
    let (_, r) = node
        .propose_in_session(s3, 1, 1, b"g".to_vec())
        .await
        .expect("the owner's session is untouched");
    assert_eq!(r, 2);
    assert_eq!(count(&node).await, 2, "nothing refused was applied");
    node.shutdown().await;
}

/// Clients on every node propose through sessions while the network drops,
/// duplicates and delays messages and the leader is cut off again and
/// again. Every propose returns an answer, and each command was applied
/// exactly once: the count every replica reaches equals the commands sent,
/// and the answers (the count at apply) are all distinct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_applies_exactly_once_through_faults_and_leader_changes() {
    const CLIENTS: u64 = 6;
    const COMMANDS: u64 = 40;
    let c = Arc::new(Cluster::start(3));
    c.wait_leader(&[1, 2, 3]).await;
    c.network
        .set_faults(Faults {
            drop_per_mille: 50,
            duplicate_per_mille: 100,
            delay_ms_min: 0,
            delay_ms_max: 20,
        })
        .unwrap();
    let mut clients = Vec::new();
    for k in 0..CLIENTS {
        let node = c.nodes[(k % 3) as usize].clone();
        clients.push(tokio::spawn(async move {
            let session = node.session().await.expect("register");
            let mut answers = Vec::new();
            for i in 0..COMMANDS {
                let (_, r) = session
                    .propose(format!("client-{k}-{i}"))
                    .await
                    .unwrap_or_else(|e| panic!("client {k} command {i}: {e}"));
                answers.push(r);
            }
            answers
        }));
    }
    // Cut the leader off a few times while the clients run.
    let chaos = {
        let c = c.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(700)).await;
                let Some(leader) = c.nodes[0].leader() else {
                    continue;
                };
                c.network.isolate(leader);
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                c.network.heal();
            }
        })
    };
    let mut answers = BTreeSet::new();
    for client in clients {
        for r in client.await.unwrap() {
            assert!(answers.insert(r), "answer {r} given twice");
        }
    }
    chaos.await.unwrap();
    c.network.set_faults(Faults::NONE).unwrap();
    c.network.heal();
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let (last, _) = c.node(leader).propose(b"end".to_vec()).await.unwrap();
    c.wait_applied(&[1, 2, 3], last).await;
    let total = CLIENTS * COMMANDS;
    let hashes = c.hashes(&[1, 2, 3]).await;
    for (id, (_, n)) in (1..).zip(&hashes) {
        assert_eq!(*n, total + 1, "node {id}: commands applied");
    }
    assert!(hashes.windows(2).all(|w| w[0] == w[1]), "{hashes:?}");
    assert_eq!(answers.len() as u64, total);
    c.shutdown().await;
}

/// A learner that joins after the log was compacted gets the session table
/// in the snapshot it installs: a copy of an old command sent through it is
/// answered from the cache, not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_table_travels_in_snapshots() {
    init_logging();
    let network = raftwork::MemNetwork::new();
    let start = |id: NodeId, voters: Option<&[NodeId]>| {
        let (transport, inbox) = network.join(id);
        let mut b = Builder::new(id, HashSm::default())
            .log_store(MemLogStore::new())
            .transport(transport, inbox)
            .configure(|c| {
                c.tick_interval = TICK;
                c.core.snapshot_interval_entries = 10;
                c.core.snapshot_keep_entries = 0;
            });
        b = match voters {
            Some(v) => b.initial_voters(v.iter().copied()),
            None => b.join_existing(),
        };
        b.build().expect("node starts")
    };
    let n1 = start(1, Some(&[1]));
    n1.wait_for_leader(WAIT).await.unwrap();
    let session = n1.register_session().await.unwrap();
    // Every command says the answer of sequence 1 is not seen yet, so it
    // stays cached.
    let (_, first) = n1
        .propose_in_session(session, 1, 1, b"first".to_vec())
        .await
        .unwrap();
    for seq in 2..=41 {
        n1.propose_in_session(session, seq, 1, format!("c{seq}"))
            .await
            .unwrap();
    }
    let n2 = start(2, None);
    n1.add_learner(2, Vec::new()).await.unwrap();
    let st = n1.status().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while n2.status().await.unwrap().applied_index < st.applied_index {
        assert!(tokio::time::Instant::now() < deadline, "learner caught up");
        tokio::time::sleep(TICK).await;
    }
    assert!(
        n2.status().await.unwrap().snapshot_index > 0,
        "the learner installed a snapshot"
    );
    let (_, again) = n2
        .propose_in_session(session, 1, 1, b"first".to_vec())
        .await
        .expect("a copy through the learner");
    assert_eq!(again, first, "answered from the snapshot's table");
    let counts = (
        n1.read_stale(|sm: &HashSm| sm.count).await.unwrap(),
        n2.read_stale(|sm: &HashSm| sm.count).await.unwrap(),
    );
    assert_eq!(counts, (41, 41));
    n1.shutdown().await;
    n2.shutdown().await;
}

/// A durable node keeps its sessions across a restart (from its snapshot
/// and the log after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_restart() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        Builder::new(1, HashSm::default())
            .data_dir(dir.path())
            .configure(|c| {
                c.tick_interval = TICK;
                c.core.snapshot_interval_entries = 8;
                c.core.snapshot_keep_entries = 2;
            })
            .build()
            .expect("node starts")
    };
    let node = start();
    node.wait_for_leader(WAIT).await.unwrap();
    let id = node.register_session().await.unwrap();
    let mut answers = Vec::new();
    // The mark stays at 1: every answer stays cached.
    for seq in 1..=20u64 {
        let (_, r) = node
            .propose_in_session(id, seq, 1, format!("c{seq}"))
            .await
            .unwrap();
        answers.push(r);
    }
    node.shutdown().await;
    drop(node);
    let node = start();
    node.wait_for_leader(WAIT).await.unwrap();
    assert!(
        node.status().await.unwrap().snapshot_index > 0,
        "restarted from a snapshot"
    );
    for (seq, answer) in (1..=20u64).zip(&answers) {
        let (_, r) = node
            .propose_in_session(id, seq, 1, b"again".to_vec())
            .await
            .unwrap();
        assert_eq!(r, *answer, "sequence {seq}");
    }
    assert_eq!(count(&node).await, 20);
    node.shutdown().await;
}
