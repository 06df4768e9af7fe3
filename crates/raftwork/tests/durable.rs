//! Nodes on the native WAL and the file snapshot store: restart with state,
//! snapshots and compaction, catch-up by snapshot, and refusing to start
//! from a corrupt snapshot.

mod common;

use std::path::{Path, PathBuf};

use common::{init_logging, HashSm, TICK, WAIT};
use raftwork::{BuildError, Builder, MemNetwork, Node, NodeId, WalOptions};

/// A node whose log and snapshots live in `dir`. Snapshots every 100
/// entries keeping 20 behind, and 16 KiB segments, so rotation, snapshots,
/// compaction and purging all happen within a few hundred writes.
fn durable(
    network: &MemNetwork,
    id: NodeId,
    voters: &[NodeId],
    dir: &Path,
) -> Result<Node<HashSm>, BuildError> {
    let (transport, inbox) = network.join(id);
    Builder::new(id, HashSm::default())
        .data_dir(dir)
        .wal_options(WalOptions {
            segment_size_bytes: 16 << 10,
            ..Default::default()
        })
        .transport(transport, inbox)
        .initial_voters(voters.iter().copied())
        .configure(|c| {
            c.tick_interval = TICK;
            c.core.snapshot_interval_entries = 100;
            c.core.snapshot_keep_entries = 20;
        })
        .build()
}

async fn write(node: &Node<HashSm>, from: u64, to: u64) -> u64 {
    let mut last = 0;
    for i in from..=to {
        last = node.propose(format!("w{i}").into_bytes()).await.unwrap().0;
    }
    last
}

async fn fingerprint(node: &Node<HashSm>) -> (u64, u64) {
    node.read(|sm: &HashSm| (sm.hash, sm.count)).await.unwrap()
}

async fn wait_applied(node: &Node<HashSm>, index: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = node.status().await.expect("running");
        if st.applied_index >= index {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {} stuck at {} < {index}",
            node.id(),
            st.applied_index
        );
        tokio::time::sleep(TICK).await;
    }
}

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == ext))
                .collect()
        })
        .unwrap_or_default()
}

fn snapshot_dirs(data_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data_dir.join("snapshots"))
        .map(|d| {
            d.map(|e| e.unwrap().path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("snap-"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_node_restarts_with_its_state_after_snapshots_and_purges() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let node = durable(&net, 1, &[1], dir.path()).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    write(&node, 1, 1_000).await;
    let before = fingerprint(&node).await;
    let st = node.status().await.unwrap();
    assert!(
        st.snapshot_index > 800,
        "log compacted behind automatic snapshots: {st:?}"
    );
    node.shutdown().await;
    let wal_files = files_with_ext(&dir.path().join("wal"), "wal");
    assert!(
        wal_files.len() <= 4,
        "compacted segments purged: {wal_files:?}"
    );
    assert!(snapshot_dirs(dir.path()).len() <= 2, "old snapshots pruned");

    let node = durable(&net, 1, &[1], dir.path()).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    assert_eq!(fingerprint(&node).await, before, "state after restart");
    write(&node, 1_001, 1_050).await;
    assert_eq!(fingerprint(&node).await.1, 1_050);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarts_from_its_log_alone_before_any_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let node = durable(&net, 1, &[1], dir.path()).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    write(&node, 1, 40).await;
    let before = fingerprint(&node).await;
    node.shutdown().await;
    assert!(snapshot_dirs(dir.path()).is_empty());
    let node = durable(&net, 1, &[1], dir.path()).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    assert_eq!(fingerprint(&node).await, before);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_durable_nodes_restart_together_and_a_lagging_one_catches_up_by_snapshot() {
    init_logging();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids = [1u64, 2, 3];
    let net = MemNetwork::new();
    let mut nodes: Vec<_> = ids
        .iter()
        .map(|&id| durable(&net, id, &ids, dirs[id as usize - 1].path()).unwrap())
        .collect();
    let leader = nodes[0].wait_for_leader(WAIT).await.unwrap();
    let lagger = if leader == 3 { 2 } else { 3 };
    net.isolate(lagger);
    let live = nodes[leader as usize - 1].clone();
    let last = write(&live, 1, 600).await;
    let st = live.status().await.unwrap();
    assert!(st.snapshot_index > 500, "leader compacted: {st:?}");
    net.heal();
    let lag_node = nodes[lagger as usize - 1].clone();
    wait_applied(&lag_node, last).await;
    assert!(
        !snapshot_dirs(dirs[lagger as usize - 1].path()).is_empty(),
        "the lagging node received a snapshot"
    );
    let want = fingerprint(&live).await;
    for n in &nodes {
        wait_applied(n, last).await;
        assert_eq!(
            n.read_stale(|sm: &HashSm| (sm.hash, sm.count))
                .await
                .unwrap(),
            want,
            "node {}",
            n.id()
        );
    }

    // Stop everyone, start everyone from disk.
    for n in &nodes {
        n.shutdown().await;
    }
    nodes = ids
        .iter()
        .map(|&id| durable(&net, id, &ids, dirs[id as usize - 1].path()).unwrap())
        .collect();
    let leader = nodes[0].wait_for_leader(WAIT).await.unwrap();
    let live = nodes[leader as usize - 1].clone();
    assert_eq!(fingerprint(&live).await, want, "state after a full restart");
    let last = write(&live, 601, 650).await;
    for n in &nodes {
        wait_applied(n, last).await;
    }
    let want = fingerprint(&live).await;
    for n in &nodes {
        assert_eq!(
            n.read_stale(|sm: &HashSm| (sm.hash, sm.count))
                .await
                .unwrap(),
            want
        );
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_snapshot_compacts_and_a_corrupt_one_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let node = durable(&net, 1, &[1], dir.path()).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    let last = write(&node, 1, 50).await;
    let meta = node.snapshot().await.unwrap();
    assert_eq!(meta.metadata.index, last, "snapshot at the applied index");
    assert_eq!(meta.metadata.get_conf_state().voters, vec![1]);
    let again = node.snapshot().await.unwrap();
    assert_eq!(again, meta, "nothing applied since: same snapshot");
    node.shutdown().await;

    let snap = snapshot_dirs(dir.path()).pop().expect("a snapshot dir");
    let data = snap.join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&data, bytes).unwrap();
    match durable(&net, 1, &[1], dir.path()) {
        Err(e @ BuildError::Restore { .. }) => {
            let msg = format!("{e}");
            assert!(
                msg.contains(&data.display().to_string()),
                "names the file: {msg}"
            );
        }
        Err(e) => panic!("expected a restore error, got {e}"),
        Ok(_) => panic!("started from a corrupt snapshot"),
    }
}

/// A durable-looking store whose sync starts failing on demand, as a full or
/// dying disk would.
#[derive(Clone)]
struct FailingSync {
    inner: raftwork::MemLogStore,
    fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    syncs: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Makes `stage` panic, as a store that finds a broken invariant does.
    panic_on_stage: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl raft::Storage for FailingSync {
    fn initial_state(&self) -> raft::Result<raft::RaftState> {
        self.inner.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: raft::GetEntriesContext,
    ) -> raft::Result<Vec<raft::prelude::Entry>> {
        self.inner.entries(low, high, max_size, context)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.inner.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        self.inner.first_index()
    }
    fn last_index(&self) -> raft::Result<u64> {
        self.inner.last_index()
    }
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<raft::prelude::Snapshot> {
        self.inner.snapshot(request_index, to)
    }
}

impl raftwork::LogStore for FailingSync {
    fn stage(&self, batch: raftwork::storage::WriteBatch) -> Result<(), raftwork::StorageError> {
        if self
            .panic_on_stage
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            panic!("test store: broken invariant while staging");
        }
        self.inner.stage(batch)
    }
    fn sync(&self) -> Result<(), raftwork::StorageError> {
        use std::sync::atomic::Ordering;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(raftwork::StorageError::Io {
                path: "/dev/dying-disk".into(),
                source: std::io::Error::other("EIO"),
            });
        }
        Ok(())
    }
    // Not volatile: the node must sync through the sync worker.
}

/// A single-voter node on a fresh [`FailingSync`] store, and the store.
fn single_node_on_failing_store() -> (FailingSync, raftwork::Node<HashSm>) {
    let store = FailingSync {
        inner: raftwork::MemLogStore::new(),
        fail: Default::default(),
        syncs: Default::default(),
        panic_on_stage: Default::default(),
    };
    let node = Builder::new(1, HashSm::default())
        .log_store(store.clone())
        .snapshot_store(raftwork::MemSnapshotStore::new(2))
        .configure(|c| c.tick_interval = TICK)
        .build()
        .unwrap();
    (store, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fsync_error_stops_the_node_and_is_never_retried() {
    use std::sync::atomic::Ordering;
    let (store, node) = single_node_on_failing_store();
    node.wait_for_leader(WAIT).await.unwrap();
    write(&node, 1, 20).await;
    assert!(store.syncs.load(Ordering::SeqCst) > 0, "writes were synced");

    store.fail.store(true, Ordering::SeqCst);
    let err = node.propose(b"lost".to_vec()).await.unwrap_err();
    assert!(
        matches!(err, raftwork::ProposeError::Shutdown),
        "the write fails: {err:?}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while !node.is_stopped() {
        assert!(tokio::time::Instant::now() < deadline, "node kept running");
        tokio::time::sleep(TICK).await;
    }
    let syncs = store.syncs.load(Ordering::SeqCst);
    tokio::time::sleep(TICK * 10).await;
    assert_eq!(
        store.syncs.load(Ordering::SeqCst),
        syncs,
        "no sync after the failure"
    );
    assert!(node.status().await.is_none(), "the node is stopped");
    match node.stop_reason() {
        Some(raftwork::Stopped::Fatal(raftwork::FatalReason::LogStore { detail })) => {
            assert!(detail.contains("sync"), "{detail}")
        }
        other => panic!("expected a log store failure, got {other:?}"),
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_loop_leaves_a_stopped_node_without_a_leader() {
    use std::sync::atomic::Ordering;
    let (store, node) = single_node_on_failing_store();
    node.wait_for_leader(WAIT).await.unwrap();
    write(&node, 1, 5).await;
    assert_eq!(node.leader(), Some(1));

    // The loop panics while staging the next write.
    store.panic_on_stage.store(true, Ordering::SeqCst);
    let err = node.propose(b"boom".to_vec()).await.unwrap_err();
    assert!(matches!(err, raftwork::ProposeError::Shutdown), "{err:?}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !node.is_stopped() {
        assert!(tokio::time::Instant::now() < deadline, "not marked stopped");
        tokio::time::sleep(TICK).await;
    }
    // No stale leader, and waiting for one ends at once, not at the timeout.
    assert_eq!(node.leader(), None);
    let waited = tokio::time::timeout(WAIT, node.wait_for_leader(WAIT * 10)).await;
    assert_eq!(waited, Ok(Err(raftwork::WaitError::Shutdown)));
    // The panic is the typed stop reason, with its message.
    match node.stopped().await {
        raftwork::Stopped::Fatal(raftwork::FatalReason::LoopPanicked { message }) => {
            assert!(!message.is_empty())
        }
        other => panic!("expected a loop panic, got {other:?}"),
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_node_id_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let node = durable(&net, 1, &[1], dir.path()).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    write(&node, 1, 5).await;
    node.shutdown().await;
    let wal_before = files_with_ext(&dir.path().join("wal"), "wal");
    match durable(&net, 2, &[2], dir.path()) {
        Err(e @ BuildError::WrongDataDir { .. }) => {
            assert!(e.to_string().contains("node=1"), "{e}")
        }
        Err(e) => panic!("expected WrongDataDir, got {e}"),
        Ok(_) => panic!("node 2 started on node 1's data dir"),
    }
    assert_eq!(files_with_ext(&dir.path().join("wal"), "wal"), wal_before);
    // The rightful owner still starts with its state.
    let node = durable(&net, 1, &[1], dir.path()).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    assert_eq!(fingerprint(&node).await.1, 5);
    node.shutdown().await;
}

/// A backup restored into a new cluster: three data dirs seeded from one
/// node's state (read with the point it stands at) start as a cluster that
/// holds that state, elects a leader and takes writes; a non-empty dir is
/// refused and left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dirs_seeded_from_a_state_start_a_new_cluster_with_it() {
    init_logging();
    let old_dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let old = durable(&net, 1, &[1], old_dir.path()).unwrap();
    old.wait_for_leader(WAIT).await.unwrap();
    let last = write(&old, 1, 150).await;
    let (state, at) = old
        .read_at(|sm: &HashSm, at| (sm.clone(), at))
        .await
        .unwrap();
    assert!(at.index >= last, "the read ran at {at:?}, before {last}");
    assert!(at.term >= 1);
    let want = (state.hash, state.count);
    old.shutdown().await;

    let voters = [11, 12, 13];
    let new_dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (dir, &id) in new_dirs.iter().zip(&voters) {
        let seed = raftwork::Seed {
            id,
            voters: voters.to_vec(),
            index: at.index,
            term: at.term,
        };
        raftwork::seed_data_dir(
            dir.path(),
            &seed,
            &raftwork::Config::default(),
            WalOptions::default(),
            &state,
        )
        .unwrap();
        // A second seed into the same dir is refused.
        let again = raftwork::seed_data_dir(
            dir.path(),
            &seed,
            &raftwork::Config::default(),
            WalOptions::default(),
            &state,
        );
        assert!(
            matches!(again, Err(BuildError::DataDirNotEmpty(_))),
            "{again:?}"
        );
    }
    let net = MemNetwork::new();
    let nodes: Vec<_> = new_dirs
        .iter()
        .zip(&voters)
        .map(|(dir, &id)| durable(&net, id, &voters, dir.path()).unwrap())
        .collect();
    let leader = nodes[0].wait_for_leader(WAIT).await.unwrap();
    let leader = nodes.iter().find(|n| n.id() == leader).unwrap();
    for n in &nodes {
        assert_eq!(fingerprint(n).await, want, "node {} after the seed", n.id());
        let st = n.status().await.unwrap();
        let mut members = st.voters.clone();
        members.sort_unstable();
        assert_eq!(members, voters.to_vec(), "node {}", n.id());
    }
    let index = write(leader, 1000, 1010).await;
    assert!(index > at.index);
    for n in &nodes {
        wait_applied(n, index).await;
    }
    let after = fingerprint(&nodes[0]).await;
    assert_eq!(after.1, want.1 + 11);
    for n in &nodes {
        assert_eq!(fingerprint(n).await, after);
    }
    for n in &nodes {
        n.shutdown().await;
    }
}

/// Disaster recovery: two of three members are lost for good; the
/// survivor's log becomes a one-member cluster that leads alone, holds
/// every write, and takes new ones. A running node's data dir is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survivor_forced_into_a_new_cluster_leads_alone_with_every_write() {
    init_logging();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let net = MemNetwork::new();
    let nodes: Vec<_> = dirs
        .iter()
        .zip(1..=3)
        .map(|(d, id)| durable(&net, id, &[1, 2, 3], d.path()).unwrap())
        .collect();
    let leader = nodes[0].wait_for_leader(WAIT).await.unwrap();
    let leader = nodes.iter().find(|n| n.id() == leader).unwrap();
    let last = write(leader, 1, 250).await;
    wait_applied(&nodes[0], last).await;
    let want = fingerprint(&nodes[0]).await;
    // Refused while node 1 runs (the WAL is locked).
    let busy = raftwork::force_new_cluster(
        dirs[0].path(),
        1,
        &raftwork::Config::default(),
        WalOptions::default(),
    );
    assert!(busy.is_err(), "{busy:?}");
    for n in &nodes {
        n.shutdown().await;
    }
    // Another node's id is refused too.
    assert!(matches!(
        raftwork::force_new_cluster(
            dirs[0].path(),
            2,
            &raftwork::Config::default(),
            WalOptions::default()
        ),
        Err(BuildError::WrongDataDir { .. })
    ));
    let recovered = raftwork::force_new_cluster(
        dirs[0].path(),
        1,
        &raftwork::Config::default(),
        WalOptions {
            segment_size_bytes: 16 << 10,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(recovered.removed, vec![2, 3]);
    assert!(recovered.last_index > recovered.last_index_before);

    let net = MemNetwork::new();
    let survivor = durable(&net, 1, &[1, 2, 3], dirs[0].path()).unwrap();
    assert_eq!(survivor.wait_for_leader(WAIT).await.unwrap(), 1);
    let st = survivor.status().await.unwrap();
    assert_eq!((st.voters.clone(), st.learners.clone()), (vec![1], vec![]));
    wait_applied(&survivor, recovered.last_index).await;
    assert_eq!(fingerprint(&survivor).await, want);
    write(&survivor, 1000, 1009).await;
    assert_eq!(fingerprint(&survivor).await.1, want.1 + 10);
    survivor.shutdown().await;
}
