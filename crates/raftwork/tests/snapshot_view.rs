//! Snapshots written from a point-in-time view, off the apply path: applies
//! and proposals go on while the view is written, and what is written is
//! the state at the view's index.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};

use common::{init_logging, HashSm, TICK, WAIT};
use raftwork::{Builder, Command, Node, SnapshotView, StateMachine};

/// A gate the test opens; views wait on it before writing.
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn open(&self) {
        *self.0 .0.lock().unwrap() = true;
        self.0 .1.notify_all();
    }

    /// Waits until opened; false after the hang guard.
    fn wait(&self) -> bool {
        let (lock, cv) = &*self.0;
        let (open, _) = cv
            .wait_timeout_while(lock.lock().unwrap(), WAIT, |open| !*open)
            .unwrap();
        *open
    }
}

/// `HashSm` whose snapshot view is a copy of it that waits for the gate.
#[derive(Default)]
struct GatedSm {
    inner: HashSm,
    gate: Gate,
}

struct GatedView {
    state: HashSm,
    gate: Gate,
}

impl SnapshotView for GatedView {
    fn write_to(self: Box<Self>, writer: &mut dyn Write) -> std::io::Result<()> {
        if !self.gate.wait() {
            return Err(std::io::Error::other("the test never opened the gate"));
        }
        self.state.snapshot(writer)
    }
}

impl StateMachine for GatedSm {
    type Response = u64;

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<u64> {
        self.inner.apply(commands)
    }

    fn snapshot(&self, writer: &mut dyn Write) -> std::io::Result<()> {
        // What a state machine without a view does: applies wait.
        Box::new(GatedView {
            state: self.inner.clone(),
            gate: self.gate.clone(),
        })
        .write_to(writer)
    }

    fn restore(&mut self, reader: &mut dyn Read) -> std::io::Result<()> {
        self.inner.restore(reader)
    }

    fn snapshot_view(&self) -> Option<Box<dyn SnapshotView>> {
        Some(Box::new(GatedView {
            state: self.inner.clone(),
            gate: self.gate.clone(),
        }))
    }
}

fn start(dir: &std::path::Path, gate: Gate) -> Node<GatedSm> {
    Builder::new(
        1,
        GatedSm {
            inner: HashSm::default(),
            gate,
        },
    )
    .data_dir(dir)
    .initial_voters([1])
    .configure(|c| {
        c.tick_interval = TICK;
        c.core.snapshot_interval_entries = 0;
        c.core.snapshot_keep_entries = 5;
    })
    .build()
    .unwrap()
}

/// Waits until the single node leads.
async fn wait_leader(node: &Node<GatedSm>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while node.status().await.unwrap().leader != Some(1) {
        assert!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(TICK).await;
    }
}

async fn fingerprint(node: &Node<GatedSm>) -> (u64, u64) {
    node.read(|sm: &GatedSm| (sm.inner.hash, sm.inner.count))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_go_on_while_a_snapshot_view_is_written_and_a_restart_restores_it() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::default();
    let node = start(dir.path(), gate.clone());
    wait_leader(&node).await;
    for i in 0..20 {
        node.propose(format!("a{i}").into_bytes()).await.unwrap();
    }
    let at_view = fingerprint(&node).await;
    let applied_at_view = node.status().await.unwrap().applied_index;
    // The snapshot is taken now, and its view waits for the gate.
    let snapshot = tokio::spawn({
        let node = node.clone();
        async move { node.snapshot().await }
    });
    // Proposals keep being applied while the view is written: with the
    // snapshot on the apply path, the first of them would wait for the
    // gate (and the hang guard would fail the test).
    let mut last = 0;
    for i in 0..50 {
        let proposed = tokio::time::timeout(WAIT, node.propose(format!("b{i}").into_bytes()));
        last = proposed
            .await
            .expect("a proposal waited for the snapshot being written")
            .unwrap()
            .0;
    }
    assert!(
        !snapshot.is_finished(),
        "the view did not wait for the gate"
    );
    gate.open();
    let meta = tokio::time::timeout(WAIT, snapshot)
        .await
        .expect("snapshot never finished")
        .unwrap()
        .unwrap();
    assert_eq!(
        meta.metadata.index, applied_at_view,
        "the snapshot is at the index its view was taken at"
    );
    assert!(last > meta.metadata.index);
    let before = fingerprint(&node).await;
    assert_ne!(before, at_view);
    node.shutdown().await;

    // The restart restores the view's state at its index and replays the
    // rest of the log: if the view had written a later state, the replay
    // would apply the later commands twice and the fingerprint would differ.
    let node = start(dir.path(), Gate::default());
    let deadline = tokio::time::Instant::now() + WAIT;
    while node.status().await.unwrap().applied_index < last {
        assert!(tokio::time::Instant::now() < deadline, "no catch-up");
        tokio::time::sleep(TICK).await;
    }
    assert_eq!(fingerprint(&node).await, before);
    node.shutdown().await;
}
