//! Three nodes in one process over the in-memory parts: election, replication,
//! failover, reads, membership and shutdown.

mod common;

use std::time::Duration;

use common::{start_node, Cluster, HashSm, WAIT};
use raftwork::{ConfChangeError, ProposeError, Role};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_is_elected_and_all_agree() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(&[1, 2, 3]).await;
    assert!((1..=3).contains(&leader));
    let st = c.node(leader).status().await.unwrap();
    assert_eq!(st.role, Role::Leader);
    assert_eq!(st.voters.len(), 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_proposals_apply_identically_everywhere() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let node = c.node(leader).clone();
    let tasks_count = 50;
    let per_task = 200;
    let mut tasks = Vec::new();
    for t in 0..tasks_count {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..per_task {
                let (index, _) = node
                    .propose(format!("t{t}-{i}").into_bytes())
                    .await
                    .expect("proposal applied");
                assert!(index > last, "indexes from one proposer must increase");
                last = index;
            }
            last
        }));
    }
    let mut max_index = 0;
    for t in tasks {
        max_index = max_index.max(t.await.unwrap());
    }
    c.wait_applied(&[1, 2, 3], max_index).await;
    let hashes = c.hashes(&[1, 2, 3]).await;
    assert_eq!(
        hashes[0].1,
        (tasks_count * per_task) as u64,
        "every command applied once"
    );
    assert!(
        hashes.iter().all(|h| *h == hashes[0]),
        "state differs: {hashes:?}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leaders_proposals_fail_as_dropped_once_it_hears_the_new_leader() {
    let c = Cluster::start(3);
    let old = c.wait_leader(&[1, 2, 3]).await;
    let (_, _) = c.node(old).propose(b"before".to_vec()).await.unwrap();

    // Cut the leader off, then propose to it: nothing can commit.
    c.network.isolate(old);
    let mut pending = Vec::new();
    for i in 0..20 {
        let n = c.node(old).clone();
        pending.push(tokio::spawn(async move {
            n.propose(format!("lost-{i}").into_bytes()).await
        }));
    }
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != old).collect();
    let new = c.wait_leader(&rest).await;
    assert_ne!(new, old);
    // The cached leader (no round trip) moved with the status: the loop
    // brings it up to date before it answers a status request.
    for &id in &rest {
        assert_eq!(c.node(id).leader(), Some(new), "node {id}");
    }

    // Proposals resume on the new leader.
    let (index, _) = c.node(new).propose(b"after".to_vec()).await.unwrap();
    assert!(index > 0);

    // The old leader steps down (check-quorum) and settles what it holds
    // in its log once it hears from the new leader, whose log overwrote
    // those indexes (Dropped: certainly not applied), or, if that takes
    // over two election timeouts, as unknown. None is applied anywhere.
    c.network.heal();
    for p in pending {
        let r = tokio::time::timeout(WAIT, p)
            .await
            .expect("pending proposal must not hang")
            .unwrap();
        match r {
            Err(ProposeError::Dropped)
            | Err(ProposeError::NotLeader {
                in_flight: true, ..
            }) => {}
            other => panic!("expected Dropped or unknown, got {other:?}"),
        }
    }
    let count = c.node(new).read(|sm: &HashSm| sm.count).await.unwrap();
    assert_eq!(count, 2, "only \"before\" and \"after\" applied");
    // The old leader is now a follower; kill it for good. A stopped node
    // knows no leader and a wait for one ends at once.
    c.node(old).shutdown().await;
    assert_eq!(c.node(old).leader(), None);
    assert_eq!(
        c.node(old).wait_for_leader(WAIT).await,
        Err(raftwork::WaitError::Shutdown)
    );
    let (_, _) = c.node(new).propose(b"still".to_vec()).await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_see_earlier_writes_on_leader_and_followers() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(&[1, 2, 3]).await;
    for i in 0..20u32 {
        let value = format!("v{i}").into_bytes();
        c.node(leader).propose(value.clone()).await.unwrap();
        for id in 1..=3 {
            let seen = c
                .node(id)
                .read(|sm: &HashSm| sm.last.clone())
                .await
                .unwrap();
            assert_eq!(seen, value, "node {id} missed write {i}");
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_change_nothing() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();

    let err = c.node(follower).propose(b"x".to_vec()).await.unwrap_err();
    assert_eq!(
        err,
        ProposeError::NotLeader {
            leader_hint: Some(leader),
            in_flight: false
        }
    );

    let big = vec![0u8; 2 * 1024 * 1024];
    assert!(matches!(
        c.node(leader).propose(big).await,
        Err(ProposeError::TooLarge { .. })
    ));

    let n = c.node(leader);
    assert_eq!(
        n.remove_node(42).await.unwrap_err(),
        ConfChangeError::UnknownNode(42)
    );
    assert_eq!(
        n.promote_learner(2).await.unwrap_err(),
        ConfChangeError::NotLearner(2)
    );
    assert_eq!(
        n.add_voter(0, vec![]).await.unwrap_err(),
        ConfChangeError::InvalidNodeId
    );
    assert_eq!(
        n.add_voter(follower, vec![]).await.unwrap_err(),
        ConfChangeError::AlreadyMember(follower)
    );
    assert!(matches!(
        n.transfer_leader(42).await,
        Err(raftwork::TransferError::NotVoter(42))
    ));
    let st = n.status().await.unwrap();
    assert_eq!(st.voters.len(), 3);
    assert!(st.learners.is_empty());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_voter_cannot_be_removed() {
    let c = Cluster::start(1);
    let leader = c.wait_leader(&[1]).await;
    assert_eq!(
        c.node(leader).remove_node(1).await.unwrap_err(),
        ConfChangeError::NoVoterLeft
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_learner_promote_remove_and_transfer_leadership() {
    let mut c = Cluster::start(3);
    let leader = c.wait_leader(&[1, 2, 3]).await;
    for i in 0..100 {
        c.node(leader)
            .propose(format!("pre-{i}").into_bytes())
            .await
            .unwrap();
    }
    let mut events = c.node(leader).subscribe();

    // A fresh node joins as a learner and catches up from the log.
    let n4 = start_node(&c.network, 4, None);
    c.nodes.push(n4);
    let cs = c
        .node(leader)
        .add_learner(4, b"node-4".to_vec())
        .await
        .unwrap();
    assert!(cs.learners.contains(&4));
    let st = c.node(leader).status().await.unwrap();
    c.wait_applied(&[4], st.commit_index).await;
    assert_eq!(c.node(4).status().await.unwrap().role, Role::Learner);
    let mut saw_change = false;
    while let Ok(ev) = events.try_recv() {
        if let raftwork::NodeEvent::MembershipChanged { context, .. } = ev {
            saw_change |= context.as_ref() == b"node-4";
        }
    }
    assert!(saw_change, "membership event with the replicated context");

    // Promote once caught up.
    let cs = c.node(leader).promote_learner(4).await.unwrap();
    assert!(cs.voters.contains(&4) && cs.learners.is_empty());

    // Remove a follower voter.
    let victim = [1, 2, 3].into_iter().find(|&id| id != leader).unwrap();
    let cs = c.node(leader).remove_node(victim).await.unwrap();
    assert!(!cs.voters.contains(&victim));
    let voters: Vec<u64> = cs.voters.clone();

    // Transfer leadership to node 4 and wait until it leads.
    tokio::time::timeout(WAIT, c.node(leader).transfer_leader(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.wait_leader(&voters).await, 4);

    // Remove the old leader (now a follower) through the new leader, then the
    // new leader removes itself: leadership moves on without it.
    let cs = c.node(4).remove_node(leader).await.unwrap();
    assert_eq!(cs.voters.len(), 1 + voters.len() - 2);
    let remaining: Vec<u64> = cs.voters.iter().copied().filter(|&id| id != 4).collect();
    assert!(!remaining.is_empty());
    let _ = c.node(4).remove_node(4).await.unwrap();
    let new = c.wait_leader(&remaining).await;
    assert_ne!(new, 4);
    let (_, _) = c
        .node(new)
        .propose(b"after-removals".to_vec())
        .await
        .unwrap();
    let st = c.node(new).status().await.unwrap();
    assert!(!st.voters.contains(&4));
    c.shutdown().await;
}

#[test]
fn shutdown_leaves_no_task_running() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Cluster::start(3);
        let leader = c.wait_leader(&[1, 2, 3]).await;
        // Leave work in flight: a proposal and a read on a follower.
        let n = c.node(leader).clone();
        let p = tokio::spawn(async move { n.propose(b"x".to_vec()).await });
        c.shutdown().await;
        let _ = p.await;
        // A task's JoinHandle may resolve a moment before tokio releases the
        // task itself, so give the count a bounded moment to settle.
        let metrics = tokio::runtime::Handle::current().metrics();
        for _ in 0..100 {
            if metrics.num_alive_tasks() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            metrics.num_alive_tasks(),
            0,
            "tasks still alive after shutdown"
        );
        for n in &c.nodes {
            assert!(n.is_stopped());
            assert!(n.status().await.is_none());
            assert!(matches!(
                n.propose(b"y".to_vec()).await,
                Err(ProposeError::Shutdown)
            ));
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_reads_and_stale_reads_are_explicit_options() {
    use raftwork::{Builder, MemLogStore, MemNetwork};
    common::init_logging();
    let network = MemNetwork::new();
    let ids = [1u64, 2, 3];
    let nodes: Vec<_> = ids
        .iter()
        .map(|&id| {
            let (t, inbox) = network.join(id);
            Builder::new(id, HashSm::default())
                .log_store(MemLogStore::new())
                .transport(t, inbox)
                .initial_voters(ids)
                .configure(|c| {
                    c.tick_interval = common::TICK;
                    c.core.lease_read = true;
                })
                .build()
                .unwrap()
        })
        .collect();
    let leader = nodes[0].wait_for_leader(WAIT).await.unwrap();
    let l = &nodes[(leader - 1) as usize];
    l.propose(b"leased".to_vec()).await.unwrap();
    for n in &nodes {
        assert_eq!(
            n.read(|sm: &HashSm| sm.last.clone()).await.unwrap(),
            b"leased"
        );
    }
    // A stale read answers from local state, whatever it holds.
    let count = nodes[0].read_stale(|sm: &HashSm| sm.count).await.unwrap();
    assert!(count <= 1);
    for n in &nodes {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn hibernation_is_refused_for_a_node_of_its_own() {
    let mut config = raftwork::Config::default();
    config.core.hibernate_after_ticks = 5;
    let built = raftwork::Builder::new(1, HashSm::default())
        .in_memory()
        .initial_voters([1])
        .config(config)
        .build();
    assert!(
        matches!(built, Err(raftwork::BuildError::Config(_))),
        "a node of its own accepted hibernate_after_ticks"
    );
}

#[test]
fn lease_reads_require_check_quorum() {
    let mut config = raftwork::Config::default();
    config.core.lease_read = true;
    config.core.check_quorum = false;
    assert!(config.validate().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_state_machine_stops_its_node_with_a_reason_and_the_rest_go_on() {
    let c = Cluster::start(3);
    let old = c.wait_leader(&[1, 2, 3]).await;
    assert_eq!(c.node(old).stop_reason(), None);
    // Applied everywhere; only the leader's state machine panics on it.
    let poison = format!("poison-{old}").into_bytes();
    let _ = c.node(old).propose(poison).await;
    let stopped = tokio::time::timeout(WAIT, c.node(old).stopped())
        .await
        .expect("the node stops");
    match &stopped {
        raftwork::Stopped::Fatal(raftwork::FatalReason::StateMachinePanicked { message }) => {
            assert!(message.contains("poisoned"), "{message}")
        }
        other => panic!("expected a state machine panic, got {other:?}"),
    }
    assert_eq!(c.node(old).stop_reason(), Some(stopped));
    assert!(c.node(old).is_stopped());
    // No zombie: requests fail at once instead of being queued forever.
    assert_eq!(
        c.node(old).propose(b"x".to_vec()).await,
        Err(ProposeError::Shutdown)
    );
    // The others elect a new leader and go on.
    let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|&id| id != old).collect();
    let new = c.wait_leader(&rest).await;
    let (index, _) = c.node(new).propose(b"after".to_vec()).await.unwrap();
    c.wait_applied(&rest, index).await;
    let hashes = c.hashes(&rest).await;
    assert_eq!(hashes[0], hashes[1]);
    c.shutdown().await;
    assert_eq!(c.node(new).stop_reason(), Some(raftwork::Stopped::Shutdown));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notes_reach_the_peer_they_are_sent_to_and_never_raft() {
    let c = Cluster::start(3);
    let leader = c.wait_leader(&[1, 2, 3]).await;
    let mut events = c.node(2).subscribe();
    let before = c.node(2).status().await.unwrap();
    c.node(1).send_note(2, b"hello, 2".to_vec()).await.unwrap();
    let note = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(raftwork::NodeEvent::Note { from, data }) = events.recv().await {
                return (from, data);
            }
        }
    })
    .await
    .expect("the note arrives");
    assert_eq!(note, (1, bytes::Bytes::from_static(b"hello, 2")));
    // Raft never saw it: nothing was appended or refused for it.
    let after = c.node(2).status().await.unwrap();
    assert_eq!(after.messages_rejected, before.messages_rejected);
    assert_eq!(c.node(leader).status().await.unwrap().leader, Some(leader));
    let err = c
        .node(1)
        .send_note(2, vec![0; raftwork::NOTE_BYTES_MAX + 1])
        .await
        .unwrap_err();
    assert!(matches!(err, raftwork::NoteError::TooLarge { .. }), "{err}");
    c.shutdown().await;
}
