//! Fault scenarios on real nodes: disconnects, partitions (of a minority and
//! of the leader), leader failure, quorum loss, a full restart from the WAL,
//! and a learner catching up from a snapshot. Histories of concurrent
//! clients under mild message faults are checked for linearizability.
//!
//! Every failure names the seed; `RAFTWORK_TESTCLUSTER_SEED=<seed>` replays
//! the fault choices and workloads (not the thread scheduling).

use std::time::Duration;

use raftwork::{ProposeError, Role};
use raftwork_testcluster::{
    ClientError, ClusterError, Faults, KvCommand, KvSm, NodeId, Options, TestCluster,
    WorkloadOptions,
};

/// Mild faults: 2% of messages dropped, 2% duplicated, all delayed up to
/// 5 ms (so reordered).
const MILD: Faults = Faults {
    drop_per_mille: 20,
    duplicate_per_mille: 20,
    delay_ms_min: 0,
    delay_ms_max: 5,
};

type Result<T = ()> = std::result::Result<T, ClusterError>;

fn options() -> Options<KvSm> {
    Options::default().fingerprint(KvSm::fingerprint)
}

fn all(n: u64) -> Vec<NodeId> {
    (1..=n).collect()
}

fn without(ids: &[NodeId], gone: &[NodeId]) -> Vec<NodeId> {
    ids.iter()
        .copied()
        .filter(|id| !gone.contains(id))
        .collect()
}

async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Proposes writes `key = value` for every key in `keys` (value = key + 1)
/// on `leader`, 10 at a time, and returns the highest index applied.
/// Panics on any failure: use it where the leader is stable.
async fn write_keys(c: &TestCluster<KvSm>, leader: NodeId, keys: std::ops::Range<u64>) -> u64 {
    let node = c.node(leader).clone();
    let keys: Vec<u64> = keys.collect();
    let mut last = 0;
    for chunk in keys.chunks(10) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|&key| {
                let node = node.clone();
                let cmd = KvCommand::Write {
                    key,
                    value: key + 1,
                }
                .encode();
                tokio::spawn(async move { node.propose(cmd).await })
            })
            .collect();
        for t in tasks {
            let (index, _) = t.await.unwrap().unwrap_or_else(|e| {
                panic!("write on leader {leader} failed: {e} (seed {})", c.seed())
            });
            last = last.max(index);
        }
    }
    last
}

/// Stops the workload, checks that it did something, then checks the
/// history and that `among` converged to one state.
async fn finish(
    c: &TestCluster<KvSm>,
    workload: raftwork_testcluster::Workload,
    among: &[NodeId],
) -> Result {
    let stats = workload.stop().await;
    eprintln!("workload: {stats:?}");
    assert!(
        stats.acknowledged_writes() > 0 && stats.reads > 0,
        "the workload made no progress: {stats:?} (seed {})",
        c.seed()
    );
    let ops = c.check_history()?;
    eprintln!("history of {ops} operations is linearizable");
    c.check_state_hashes(among).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_follower_catches_up_after_heal() -> Result {
    let mut c = TestCluster::start(3, |_| KvSm::default(), options()).await?;
    let ids = all(3);
    let leader = c.wait_for_leader(&ids).await?;
    let follower = without(&ids, &[leader])[0];

    // Both ways cut: the other two keep committing without it.
    c.isolate(follower);
    let last = write_keys(&c, leader, 0..100).await;
    let st = c.statuses(&[follower]).await?.remove(0);
    assert!(
        st.applied_index < last,
        "an isolated node applied {} >= {last} (seed {})",
        st.applied_index,
        c.seed()
    );
    c.heal();
    c.wait_applied(last, &ids).await?;
    c.check_state_hashes(&ids).await?;

    // One way cut (leader → follower): the follower hears nothing, but its
    // pre-votes cannot disturb a leader the others still hear.
    c.disconnect(leader, follower);
    let last = write_keys(&c, leader, 100..200).await;
    assert_eq!(
        c.wait_for_leader(&without(&ids, &[follower])).await?,
        leader
    );
    c.connect(leader, follower);
    c.wait_applied(last, &ids).await?;
    c.check_state_hashes(&ids).await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partition_cannot_commit_and_converges_after_heal() -> Result {
    let mut c = TestCluster::start(5, |_| KvSm::default(), options().faults(MILD)).await?;
    let ids = all(5);
    let leader = c.wait_for_leader(&ids).await?;
    let others = without(&ids, &[leader]);
    let majority = vec![leader, others[0], others[1]];
    let minority = vec![others[2], others[3]];
    let workload = c.spawn_workload(WorkloadOptions::default());
    pause(1_000).await;

    c.partition(&[&majority, &minority]);
    c.wait_for_no_leader(&minority).await?;
    let frozen = c
        .statuses(&minority)
        .await?
        .iter()
        .map(|s| s.commit_index)
        .max();

    // The majority commits.
    let leader = c.wait_for_leader(&majority).await?;
    let mut client = c.client(leader);
    let mut acknowledged = 0;
    for i in 0..200 {
        if client.write(100 + i % 4, i).await.is_ok() {
            acknowledged += 1;
            if acknowledged == 10 {
                break;
            }
        }
    }
    assert_eq!(
        acknowledged,
        10,
        "the majority does not commit (seed {})",
        c.seed()
    );

    // The minority cannot: a proposal there is refused before the log, a
    // read finds no leader, and its commit index stands still.
    let err = c
        .node(minority[0])
        .propose(b"x".to_vec())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProposeError::NotLeader {
                in_flight: false,
                ..
            }
        ),
        "minority proposal: {err} (seed {})",
        c.seed()
    );
    let mut minority_client = c.client(minority[1]);
    assert!(matches!(
        minority_client.read_on(minority[1], 100).await,
        Err(ClientError::Read(_))
    ));
    // (A minority node may still learn a commit index its peer heard from
    // the leader before the cut, through a vote request; never a newer one.)
    let now = c
        .statuses(&minority)
        .await?
        .iter()
        .map(|s| s.commit_index)
        .max();
    assert_eq!(now, frozen, "the minority committed (seed {})", c.seed());

    c.heal();
    c.wait_for_leader(&ids).await?;
    pause(500).await;
    finish(&c, workload, &ids).await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_steps_down_and_its_uncommitted_writes_never_count() -> Result {
    let mut c = TestCluster::start(5, |_| KvSm::default(), options().faults(MILD)).await?;
    let ids = all(5);
    let old = c.wait_for_leader(&ids).await?;
    let others = without(&ids, &[old]);
    let minority = vec![old, others[0]];
    let majority = others[1..].to_vec();
    let workload = c.spawn_workload(WorkloadOptions::default());
    // A client stuck on the old leader: its writes there become unknown.
    let mut stuck = c.client(old);
    pause(1_000).await;

    c.partition(&[&minority, &majority]);
    // Writes the old leader accepts but cannot commit.
    let old_node = c.node(old).clone();
    let lost: Vec<_> = (0..10u64)
        .map(|i| {
            let node = old_node.clone();
            let cmd = KvCommand::Write {
                key: 1000 + i,
                value: i,
            }
            .encode();
            tokio::spawn(async move { node.propose(cmd).await })
        })
        .collect();
    let stuck_result = stuck.write(0, u64::MAX).await;
    assert!(
        matches!(stuck_result, Err(ClientError::Unknown(_))),
        "a write on a leader cut off from its quorum: {stuck_result:?} (seed {})",
        c.seed()
    );

    let new = c.wait_for_leader(&majority).await?;
    assert_ne!(new, old);
    for p in lost {
        let r = p.await.unwrap();
        assert!(
            r.is_err(),
            "a write on the minority leader was acknowledged: {r:?} (seed {})",
            c.seed()
        );
    }

    c.heal();
    let leader = c.wait_for_leader(&ids).await?;
    assert_ne!(
        leader,
        old,
        "the old leader's log is behind (seed {})",
        c.seed()
    );
    let st = c.statuses(&[old]).await?.remove(0);
    assert_eq!(st.role, Role::Follower, "seed {}", c.seed());
    // Its uncommitted writes are gone, never applied anywhere.
    for i in 0..10 {
        let v = c
            .node(leader)
            .read(move |sm: &KvSm| sm.get(1000 + i))
            .await
            .unwrap();
        assert_eq!(v, None, "key {} (seed {})", 1000 + i, c.seed());
    }
    finish(&c, workload, &ids).await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_dies_a_new_one_takes_over_and_the_old_one_catches_up() -> Result {
    let mut c = TestCluster::start(3, |_| KvSm::default(), options().faults(MILD)).await?;
    let ids = all(3);
    let old = c.wait_for_leader(&ids).await?;
    let workload = c.spawn_workload(WorkloadOptions::default());
    pause(1_000).await;

    c.kill(old).await?;
    let rest = without(&ids, &[old]);
    let new = c.wait_for_leader(&rest).await?;
    assert_ne!(new, old);
    pause(1_000).await;

    c.restart(old).await?;
    c.wait_for_leader(&ids).await?;
    pause(500).await;
    finish(&c, workload, &ids).await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_quorum_stops_progress_and_restarting_restores_it() -> Result {
    let mut c = TestCluster::start(3, |_| KvSm::default(), options().faults(MILD)).await?;
    let ids = all(3);
    let leader = c.wait_for_leader(&ids).await?;
    let survivor = without(&ids, &[leader])[0];
    let mut client = c.client(leader);
    for i in 0..20 {
        let _ = client.write(i % 4, i).await;
    }

    let dead = without(&ids, &[survivor]);
    for &id in &dead {
        c.kill(id).await?;
    }
    c.wait_for_no_leader(&[survivor]).await?;
    let before = c.statuses(&[survivor]).await?.remove(0).commit_index;
    let err = c.node(survivor).propose(b"x".to_vec()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProposeError::NotLeader {
                in_flight: false,
                ..
            }
        ),
        "{err} (seed {})",
        c.seed()
    );
    client.set_target(survivor);
    assert!(matches!(
        client.write(1, 1_000).await,
        Err(ClientError::NotApplied(_))
    ));
    assert!(matches!(
        client.read_on(survivor, 1).await,
        Err(ClientError::Read(_))
    ));
    let after = c.statuses(&[survivor]).await?.remove(0).commit_index;
    assert_eq!(
        before,
        after,
        "committed without a quorum (seed {})",
        c.seed()
    );

    for &id in &dead {
        c.restart(id).await?;
    }
    let leader = c.wait_for_leader(&ids).await?;
    client.set_target(leader);
    let mut acknowledged = 0;
    for i in 0..200 {
        if client.write(i % 4, 2_000 + i).await.is_ok() {
            acknowledged += 1;
            if acknowledged == 10 {
                break;
            }
        }
        let _ = client.read(i % 4).await;
    }
    assert_eq!(
        acknowledged,
        10,
        "no progress after restart (seed {})",
        c.seed()
    );
    c.check_history()?;
    c.check_state_hashes(&ids).await?;
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_recovers_every_acknowledged_write_from_the_wal() -> Result {
    // Snapshots every 100 entries: recovery restores a snapshot and replays
    // the log after it.
    let mut c = TestCluster::start(3, |_| KvSm::default(), options().snapshots(100, 20)).await?;
    let ids = all(3);
    let leader = c.wait_for_leader(&ids).await?;
    let last = write_keys(&c, leader, 0..350).await;
    c.wait_applied(last, &ids).await?;
    let before = c.check_state_hashes(&ids).await?;
    for st in c.statuses(&ids).await? {
        assert!(
            st.snapshot_index > 0,
            "no snapshot on {} (seed {})",
            st.id,
            c.seed()
        );
    }

    for &id in &ids {
        c.kill(id).await?;
    }
    for &id in &ids {
        c.restart(id).await?;
    }
    let leader = c.wait_for_leader(&ids).await?;
    let values = c
        .node(leader)
        .read(|sm: &KvSm| sm.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    let want: Vec<(u64, u64)> = (0..350).map(|k| (k, k + 1)).collect();
    assert_eq!(
        values,
        want,
        "acknowledged writes after restart (seed {})",
        c.seed()
    );
    assert_eq!(c.check_state_hashes(&ids).await?, before);
    c.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_catches_up_from_a_snapshot_is_promoted_and_a_voter_removed() -> Result {
    let mut c = TestCluster::start(3, |_| KvSm::default(), options().snapshots(100, 20)).await?;
    let ids = all(3);
    let leader = c.wait_for_leader(&ids).await?;
    write_keys(&c, leader, 0..300).await;

    let cs = c.add_node(4, true).await?;
    assert!(cs.learners.contains(&4));
    let commit = c.statuses(&[leader]).await?.remove(0).commit_index;
    c.wait_applied(commit, &[4]).await?;
    let st = c.statuses(&[4]).await?.remove(0);
    assert_eq!(st.role, Role::Learner);
    assert!(
        st.snapshot_index > 0,
        "the learner started from a snapshot: {st:?} (seed {})",
        c.seed()
    );
    c.check_state_hashes(&[1, 2, 3, 4]).await?;

    let cs = c.promote(4).await?;
    assert!(cs.voters.contains(&4) && cs.learners.is_empty());
    let victim = without(&ids, &[leader])[0];
    let cs = c.remove_node(victim).await?;
    assert!(!cs.voters.contains(&victim) && cs.voters.len() == 3);
    let voters = without(&[1, 2, 3, 4], &[victim]);
    let leader = c.wait_for_leader(&voters).await?;
    let last = write_keys(&c, leader, 300..350).await;
    c.wait_applied(last, &voters).await?;
    c.check_state_hashes(&voters).await?;
    c.shutdown().await;
    Ok(())
}

/// Issue 15's defect: a member removed, wiped and added back under its old
/// id replays the leader's log, its own removal included. It must take part
/// again once the re-add applies. Before the fix nothing cleared its
/// "removed" state: as leader it handed leadership away at once, so with
/// only such members left no leader stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_removed_and_added_back_under_their_ids_lead_and_serve() -> Result {
    let mut c = TestCluster::start(3, |_| KvSm::default(), options()).await?;
    let ids = all(3);
    let leader = c.wait_for_leader(&ids).await?;
    write_keys(&c, leader, 0..20).await;
    // Two members in turn: removed, wiped, added back as voters.
    let mut again = Vec::new();
    for id in without(&ids, &[leader]) {
        c.remove_node(id).await?;
        let cs = c.add_node(id, false).await?;
        assert!(cs.voters.contains(&id), "{id} is a voter again: {cs:?}");
        again.push(id);
    }
    // The last original member goes: only re-added members are left.
    c.remove_node(leader).await?;
    let leader = c.wait_for_leader(&again).await?;
    let last = write_keys(&c, leader, 20..120).await;
    c.wait_applied(last, &again).await?;
    for st in c.statuses(&again).await? {
        assert_eq!(st.leader, Some(leader), "a stable leader: {st:?}");
    }
    c.check_state_hashes(&again).await?;
    c.shutdown().await;
    Ok(())
}

/// Negative control: a stale read on a cut-off old leader, recorded as if it
/// were linearizable, must fail the history check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_a_stale_read_from_a_cut_off_leader() -> Result {
    let mut c = TestCluster::start(3, |_| KvSm::default(), options()).await?;
    let ids = all(3);
    let old = c.wait_for_leader(&ids).await?;
    let mut client = c.client(old);
    client.write(7, 1).await.unwrap();
    c.wait_applied(c.statuses(&[old]).await?[0].commit_index, &ids)
        .await?;

    c.isolate(old);
    let rest = without(&ids, &[old]);
    let new = c.wait_for_leader(&rest).await?;
    client.set_target(new);
    client.write(7, 2).await.unwrap();
    assert_eq!(client.read_stale_on(old, 7).await.unwrap(), Some(1));
    let err = c.check_history().unwrap_err();
    eprintln!("as expected: {err}");
    c.heal();
    c.shutdown().await;
    Ok(())
}

/// Isolates the leader after a write, writes through the new leader, and
/// reads from the old one while it still believes it leads; repeated until
/// `wanted` such reads were made (or `attempts` runs out). Returns the
/// reads made on a still-leading old leader and the stale ones among them;
/// the history of every read and write is checked at the end.
async fn lease_reads_on_a_cut_off_leader(
    unchecked: bool,
    wanted: usize,
    attempts: usize,
) -> Result<(usize, usize, Result<usize>)> {
    let opts = options()
        .tick(Duration::from_millis(20))
        .configure(move |c| {
            c.core.lease_read = true;
            c.core.unchecked_lease_reads = unchecked;
        });
    let mut c = TestCluster::start(3, |_| KvSm::default(), opts).await?;
    let ids = all(3);
    let (mut on_leader, mut stale) = (0, 0);
    for attempt in 0..attempts as u64 {
        if on_leader >= wanted {
            break;
        }
        let old = c.wait_for_leader(&ids).await?;
        let mut client = c.client(old);
        let before = 10 * attempt + 1;
        client.write(7, before).await.unwrap();
        c.wait_applied(c.statuses(&[old]).await?[0].commit_index, &ids)
            .await?;

        c.isolate(old);
        let rest = without(&ids, &[old]);
        let new = c.wait_for_leader(&rest).await?;
        client.set_target(new);
        client.write(7, before + 1).await.unwrap();
        // Only a read on an old leader that still leads tells anything.
        if c.statuses(&[old]).await?[0].role == Role::Leader {
            on_leader += 1;
            if let Ok(Some(v)) = client.read_on(old, 7).await {
                if v == before {
                    stale += 1;
                }
            }
        }
        c.heal();
    }
    let checked = c.check_history();
    c.shutdown().await;
    Ok((on_leader, stale, checked))
}

/// Lease reads are safe: a leader cut off from the others stops answering
/// reads before anyone else can be elected (raft-rs's lease mode answered
/// them until check-quorum made it step down, up to two election timeouts
/// later, while the others elect a leader after about one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_reads_on_a_cut_off_leader_are_never_stale() -> Result {
    let (on_leader, stale, checked) = lease_reads_on_a_cut_off_leader(false, 3, 40).await?;
    assert!(
        on_leader >= 1,
        "the old leader never still led when read ({on_leader} reads)"
    );
    assert_eq!(stale, 0, "stale lease reads on a cut-off leader");
    checked?;
    Ok(())
}

/// Negative control: with raft-rs's unchecked lease the same scenario finds
/// a stale read, and the history check catches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchecked_lease_reads_on_a_cut_off_leader_are_stale() -> Result {
    let (on_leader, stale, checked) = lease_reads_on_a_cut_off_leader(true, 1, 40).await?;
    assert!(
        on_leader >= 1 && stale >= 1,
        "{on_leader} reads, {stale} stale"
    );
    let err = checked.unwrap_err();
    eprintln!("as expected: {err}");
    Ok(())
}
