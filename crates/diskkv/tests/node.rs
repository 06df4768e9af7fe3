//! `DiskKv` run by real raftwork nodes (WAL, file snapshots): restarts that
//! replay only the log's tail, a process crash that loses nothing and
//! applies nothing twice, catch-up by a snapshot streamed from the store
//! while writes go on, and sessions refused.

use std::path::Path;
use std::time::Duration;

use raftwork::{Builder, MemNetwork, Node, NodeId, OnDisk, ProposeError, Stopped};
use raftwork_diskkv::{DiskKv, KvOp, KvReply};

type KvNode = Node<OnDisk<DiskKv>>;

const TICK: Duration = Duration::from_millis(50);
const WAIT: Duration = Duration::from_secs(60);
/// Set in the child process of the crash test: its data dir.
const CRASH_DIR_ENV: &str = "RAFTWORK_DISKKV_CRASH_DIR";
const COUNTER: &[u8] = b"counter";

fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A node whose log, snapshots and store live in `dir`: snapshots every
/// 100 entries, 20 kept behind each.
fn start(
    id: NodeId,
    voters: &[NodeId],
    dir: &Path,
    network: Option<&MemNetwork>,
) -> Result<KvNode, raftwork::BuildError> {
    let mut builder = Builder::new(id, OnDisk::new(DiskKv::new(dir.join("kv"))))
        .data_dir(dir.join("node"))
        .initial_voters(voters.iter().copied())
        .configure(|c| {
            c.tick_interval = TICK;
            c.core.snapshot_interval_entries = 100;
            c.core.snapshot_keep_entries = 20;
        });
    if let Some(net) = network {
        let (transport, inbox) = net.join(id);
        builder = builder.transport(transport, inbox);
    }
    builder.build()
}

async fn propose(node: &KvNode, op: KvOp) -> (u64, KvReply) {
    node.propose(op.encode()).await.expect("proposal")
}

fn put(i: u64) -> KvOp {
    KvOp::Put {
        key: format!("key-{i:05}").into_bytes(),
        value: format!("value-{i}").into_bytes(),
    }
}

fn incr() -> KvOp {
    KvOp::Incr {
        key: COUNTER.to_vec(),
        by: 1,
    }
}

/// Puts keys `from..to` and increments the counter once per key; the last
/// index.
async fn write(node: &KvNode, from: u64, to: u64) -> u64 {
    let mut last = 0;
    for i in from..to {
        propose(node, put(i)).await;
        last = propose(node, incr()).await.0;
    }
    last
}

async fn wait_applied(node: &KvNode, index: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while node.status().await.expect("running").applied_index < index {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {} never applied {index}",
            node.id()
        );
        tokio::time::sleep(TICK).await;
    }
}

/// Reads the counter, how many keys, and the commands applied since open.
async fn state(node: &KvNode) -> (Option<Vec<u8>>, u64, u64) {
    node.read_stale(|kv: &OnDisk<DiskKv>| {
        (
            kv.get(COUNTER).unwrap(),
            kv.len().unwrap(),
            kv.applied_since_open(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_replays_nothing_into_the_store_and_sessions_are_refused() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let node = start(1, &[1], dir.path(), None).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    let last = write(&node, 0, 175).await;
    let status = node.status().await.unwrap();
    // `snapshot_index` is where the log starts: 20 behind the last snapshot.
    assert!(
        status.snapshot_index > 250,
        "snapshots were taken: {status:?}"
    );
    assert!(matches!(
        node.session().await.err(),
        Some(ProposeError::SessionsUnsupported)
    ));
    node.shutdown().await;

    let node = start(1, &[1], dir.path(), None).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    wait_applied(&node, last).await;
    let (counter, keys, applied_since_open) = state(&node).await;
    assert_eq!(counter.as_deref(), Some(&b"175"[..]));
    assert_eq!(keys, 176);
    // The stop synced the store at its applied index: the replay from the
    // snapshot hands it nothing.
    assert_eq!(
        applied_since_open, 0,
        "commands applied again after a clean stop"
    );
    let (_, reply) = propose(&node, incr()).await;
    assert_eq!(reply, KvReply::Incremented(176));
    node.shutdown().await;
}

/// The crash test's child: writes, prints how far, then aborts the process
/// (no stop, no sync: what a kill -9 or a crash leaves). Does nothing
/// unless the parent test set its data dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else {
        return;
    };
    let node = start(1, &[1], Path::new(&dir), None).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    let last = write(&node, 0, 260).await;
    println!("CRASH-CHILD-LAST {last}");
    std::process::abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loses_nothing_and_applies_nothing_twice() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CRASH_DIR_ENV, dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child aborts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("CRASH-CHILD-LAST ").map(|(_, n)| n))
        .unwrap_or_else(|| {
            panic!(
                "the child wrote nothing: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .trim()
        .parse()
        .unwrap();

    let node = start(1, &[1], dir.path(), None).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    wait_applied(&node, last).await;
    let (counter, keys, applied_since_open) = state(&node).await;
    // Every increment acknowledged before the crash, once: one lost would
    // read less, one applied twice (from the log on top of the store) more.
    assert_eq!(counter.as_deref(), Some(&b"260"[..]));
    assert_eq!(keys, 261);
    // Only the tail after the store's last sync (the last snapshot, at
    // most 100 entries back) is applied again.
    assert!(
        applied_since_open <= 100,
        "{applied_since_open} commands applied again after the crash"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_member_catches_up_by_a_snapshot_streamed_from_the_store() {
    init_logging();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ids = [1u64, 2, 3];
    let net = MemNetwork::new();
    let nodes: Vec<_> = ids
        .iter()
        .map(|&id| start(id, &ids, dirs[id as usize - 1].path(), Some(&net)).unwrap())
        .collect();
    let leader = nodes[0].wait_for_leader(WAIT).await.unwrap();
    let lagger = if leader == 3 { 2 } else { 3 };
    net.isolate(lagger);
    let live = nodes[leader as usize - 1].clone();
    let last = write(&live, 0, 300).await;
    let status = live.status().await.unwrap();
    assert!(
        status.snapshot_index > 450,
        "the leader compacted: {status:?}"
    );
    net.heal();
    let lag = nodes[lagger as usize - 1].clone();
    wait_applied(&lag, last).await;
    let (counter, keys, applied_since_open) = state(&lag).await;
    assert_eq!(counter.as_deref(), Some(&b"300"[..]));
    assert_eq!(keys, 301);
    assert!(
        applied_since_open < 200,
        "the lagging member got a snapshot, not the whole log ({applied_since_open} applied)"
    );
    for n in &nodes {
        wait_applied(n, last).await;
        assert_eq!(
            n.read_stale(|kv: &OnDisk<DiskKv>| kv.scan(b"", 1000).unwrap())
                .await
                .unwrap(),
            live.read_stale(|kv: &OnDisk<DiskKv>| kv.scan(b"", 1000).unwrap())
                .await
                .unwrap(),
            "node {}",
            n.id()
        );
    }
    for n in &nodes {
        n.shutdown().await;
        assert_eq!(n.stop_reason(), Some(Stopped::Shutdown));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_ahead_of_the_log_is_refused() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let node = start(1, &[1], dir.path(), None).unwrap();
    node.wait_for_leader(WAIT).await.unwrap();
    write(&node, 0, 10).await;
    node.shutdown().await;
    // The node's log is wiped, its snapshots and the store kept: the
    // node would bootstrap a new log whose commands the store claims.
    std::fs::remove_dir_all(dir.path().join("node/wal")).unwrap();
    let err = start(1, &[1], dir.path(), None).err().expect("refused");
    assert!(
        matches!(err, raftwork::BuildError::StateMachineAhead { .. }),
        "{err}"
    );
    // The whole data dir wiped: refused as well.
    std::fs::remove_dir_all(dir.path().join("node")).unwrap();
    let err = start(1, &[1], dir.path(), None).err().expect("refused");
    assert!(
        matches!(err, raftwork::BuildError::StateMachineAhead { .. }),
        "{err}"
    );
}
