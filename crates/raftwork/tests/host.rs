//! Many groups on three hosts (`Host`, feature `host`) over one in-process
//! network: every group elects a leader and commits through it; a message
//! for a group a host does not run creates nothing there; a group removed
//! from one host at run time goes on with the other two; a host restarted
//! on its directory recovers every group from its one log engine and
//! catches up with what it missed.

// Groups are indexes into parallel vectors (per host, per group): plain
// index loops read better than zipped iterators here.
#![allow(clippy::needless_range_loop)]

use std::io::{Read, Write};
use std::time::Duration;

use raftwork::{Command, Envelope, Host, HostConfig, MemNetwork, Node, StateMachine, Transport};

/// The commands applied, in order: enough to compare replicas; and
/// whether it was ever restored from a snapshot.
#[derive(Default)]
struct Log(Vec<Vec<u8>>, bool);

impl StateMachine for Log {
    type Response = ();

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<()> {
        for c in commands {
            self.0.push(c.data.to_vec());
        }
        vec![(); commands.len()]
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        for c in &self.0 {
            w.write_all(&(c.len() as u32).to_le_bytes())?;
            w.write_all(c)?;
        }
        Ok(())
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut all = Vec::new();
        r.read_to_end(&mut all)?;
        self.1 = true;
        self.0.clear();
        let mut at = 0;
        while at < all.len() {
            let n = u32::from_le_bytes(all[at..at + 4].try_into().unwrap()) as usize;
            self.0.push(all[at + 4..at + 4 + n].to_vec());
            at += 4 + n;
        }
        Ok(())
    }
}

/// A state machine of another type, for `Host::group`'s type check.
#[derive(Default)]
struct Other;

impl StateMachine for Other {
    type Response = ();

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<()> {
        vec![(); commands.len()]
    }

    fn snapshot(&self, _w: &mut dyn Write) -> std::io::Result<()> {
        Ok(())
    }

    fn restore(&mut self, _r: &mut dyn Read) -> std::io::Result<()> {
        Ok(())
    }
}

const GROUPS: u64 = 8;

/// Prometheus's recorder, installed once for the test binary before any
/// host starts (handles made before it would record nothing).
fn recorder() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .unwrap()
    })
}

/// Threads of this process (Linux).
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line[8..].trim().parse().unwrap()
}
const GUARD: Duration = Duration::from_secs(30);

/// Ticks of 20 ms: elections after 200–400 ms, a silent host dead after 200 ms.
const TICK: Duration = Duration::from_millis(20);

fn open_host(net: &MemNetwork, id: u64, dir: &std::path::Path) -> Host {
    let (t, inbox) = net.join(id);
    let config = HostConfig {
        tick_interval: TICK,
        ..HostConfig::default()
    };
    Host::open_with(id, dir.join(format!("host-{id}")), t, inbox, config).unwrap()
}

fn start_groups(host: &Host) -> Vec<Node<Log>> {
    (1..=GROUPS)
        .map(|g| {
            host.create_group(g, &[1, 2, 3], Log::default(), |_| {})
                .unwrap()
        })
        .collect()
}

/// Proposes `data` to group `g` through whichever node leads it.
async fn propose(nodes: &[&Vec<Node<Log>>], g: usize, data: &str) {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        for hosts in nodes {
            if let Ok((_, ())) = hosts[g].propose(data.as_bytes().to_vec()).await {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader took {data}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `node` has applied `want` (in order).
async fn applied(node: &Node<Log>, want: &[String]) {
    let want: Vec<Vec<u8>> = want.iter().map(|s| s.as_bytes().to_vec()).collect();
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let got = node.read_stale(|sm| sm.0.clone()).await.unwrap();
        if got == want {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{}", {
            let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
            format!(
                "applied {} commands, want {}; the first {same} agree",
                got.len(),
                want.len()
            )
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_on_three_hosts_commit_survive_removal_and_restart() {
    let metrics = recorder();
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let mut hosts: Vec<Host> = (1..=3).map(|id| open_host(&net, id, dir.path())).collect();
    // Groups add no threads (one sync thread per host serves them all)
    // and no tasks (each host's shards drive them all).
    let threads_before = threads();
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let tasks_before = tasks();
    let mut nodes: Vec<Vec<Node<Log>>> = hosts.iter().map(start_groups).collect();
    assert_eq!(threads(), threads_before, "24 groups started threads");
    assert_eq!(tasks(), tasks_before, "24 groups started tasks");
    assert_eq!(hosts[0].running_groups(), (1..=GROUPS).collect::<Vec<_>>());

    // Every group elects a leader and commits through it, on every host.
    let mut want: Vec<Vec<String>> = vec![Vec::new(); GROUPS as usize];
    for g in 0..GROUPS as usize {
        let data = format!("g{}-first", g + 1);
        propose(&[&nodes[0], &nodes[1], &nodes[2]], g, &data).await;
        want[g].push(data);
    }
    for host_nodes in &nodes {
        for g in 0..GROUPS as usize {
            applied(&host_nodes[g], &want[g]).await;
        }
    }
    // Groups lead on their own: not every group's leader need be the same
    // host, and each group's log is its own.
    for g in 0..GROUPS as usize {
        assert!(nodes[0][g].wait_for_leader(GUARD).await.is_ok());
    }

    // Each group's own metrics carry its id (sampled each tick).
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        let text = metrics.render();
        let labelled =
            (1..=GROUPS).all(|g| text.contains(&format!("raftwork_server_term{{group=\"{g}\"}}")));
        if labelled {
            assert!(
                !text.lines().any(|l| l.starts_with("raftwork_server_term ")),
                "a group without its label: {text}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A message for a group host 1 does not run creates nothing there.
    let (stranger, _inbox) = net.join(99);
    stranger.send(Envelope {
        group_id: 4242,
        from: 99,
        to: 1,
        messages: vec![raft::prelude::Message {
            msg_type: raft::prelude::MessageType::MsgHeartbeat,
            from: 99,
            to: 1,
            term: 7,
            ..Default::default()
        }],
    });
    let counted = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("raftwork_host_unknown_group_messages_total "))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
    };
    let deadline = tokio::time::Instant::now() + GUARD;
    while counted(&metrics.render()).unwrap_or(0.0) < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stranger's message was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hosts[0].running_groups(), (1..=GROUPS).collect::<Vec<_>>());
    assert!(!hosts[0].stored_groups().contains(&4242));
    // The shards' gauges (`metrics::HOST`) are sampled each tick.
    let text = metrics.render();
    for name in [
        "raftwork_host_shard_groups{shard=\"0\",state=\"awake\"}",
        "raftwork_host_shard_groups{shard=\"0\",state=\"asleep\"}",
        "raftwork_host_shard_inbox_envelopes{shard=\"0\"}",
        "raftwork_host_shard_requests_queued{shard=\"0\"}",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }

    // The host hands out a group's handle again, typed by its state machine.
    let again: Node<Log> = hosts[1].group(4).expect("group 4 runs on host 2");
    assert_eq!(again.id(), 2);
    assert!(hosts[1].group::<Log>(4242).is_none());
    assert!(
        hosts[1].group::<Other>(4).is_none(),
        "another state machine type"
    );

    // Group 3 leaves host 3 at run time: it goes on with hosts 1 and 2.
    assert!(hosts[2].remove_group(3).await);
    assert!(!hosts[2].remove_group(3).await);
    assert!(hosts[2].group::<Log>(3).is_none());
    let data = "g3-without-host-3".to_string();
    propose(&[&nodes[0], &nodes[1]], 2, &data).await;
    want[2].push(data);
    applied(&nodes[0][2], &want[2]).await;
    applied(&nodes[1][2], &want[2]).await;

    // Host 1 stops; the others go on; it restarts on its directory with
    // every group from its log engine and catches up.
    let host1 = hosts.remove(0);
    nodes.remove(0);
    host1.shutdown().await;
    for g in 0..GROUPS as usize {
        if g == 2 {
            continue; // group 3 has only host 2 left: no quorum without host 1
        }
        let data = format!("g{}-while-host-1-was-down", g + 1);
        propose(&[&nodes[0], &nodes[1]], g, &data).await;
        want[g].push(data);
    }
    let host1 = open_host(&net, 1, dir.path());
    assert_eq!(host1.stored_groups(), (1..=GROUPS).collect::<Vec<_>>());
    let restarted = start_groups(&host1);
    for g in 0..GROUPS as usize {
        applied(&restarted[g], &want[g]).await;
    }
    host1.shutdown().await;
    for h in hosts {
        h.shutdown().await;
    }
}

/// A host with 1,000 groups (one member each, so each leads at once)
/// writes one entry per group, stops, and on restart recovers every group
/// from its one log engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_restarts_with_a_thousand_groups() {
    recorder();
    const MANY: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let create = |host: &Host, g: u64| host.create_group(g, &[1], Log::default(), |_| {}).unwrap();
    let host = open_host(&net, 1, dir.path());
    let nodes: Vec<Node<Log>> = (1..=MANY).map(|g| create(&host, g)).collect();
    for (k, node) in nodes.iter().enumerate() {
        node.wait_for_leader(GUARD).await.unwrap();
        let data = format!("group-{}", k + 1);
        node.propose(data.into_bytes()).await.unwrap();
    }
    drop(nodes);
    host.shutdown().await;

    let host = open_host(&net, 1, dir.path());
    assert_eq!(host.stored_groups(), (1..=MANY).collect::<Vec<_>>());
    let nodes: Vec<Node<Log>> = (1..=MANY).map(|g| create(&host, g)).collect();
    for (k, node) in nodes.iter().enumerate() {
        applied(node, &[format!("group-{}", k + 1)]).await;
    }
    host.shutdown().await;
}

/// The term of each of these nodes.
async fn terms(nodes: &[Node<Log>]) -> Vec<u64> {
    let mut t = Vec::new();
    for n in nodes {
        t.push(n.status().await.unwrap().term);
    }
    t
}

/// Waits until `host` has `n` groups asleep.
async fn asleep(host: &Host, n: usize) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while host.hibernating_groups() != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "host {} has {} groups asleep, want {n}",
            host.id(),
            host.hibernating_groups()
        );
        tokio::time::sleep(TICK).await;
    }
}

/// Idle groups stop ticking on every host and stay asleep without an
/// election; a write wakes its group, which applies it everywhere and
/// sleeps again; a host cut off from the others is noticed through the
/// missing host heartbeats, and every group it led elects a new leader on
/// the other two; once it is back, its groups catch up. A group that stops
/// on the live host leading it is replaced too (through the host's epoch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_hibernate_and_a_lost_hosts_groups_elect_new_leaders() {
    recorder();
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let hosts: Vec<Host> = (1..=3).map(|id| open_host(&net, id, dir.path())).collect();
    let nodes: Vec<Vec<Node<Log>>> = hosts.iter().map(start_groups).collect();
    let all = [&nodes[0], &nodes[1], &nodes[2]];
    let mut want: Vec<Vec<String>> = vec![Vec::new(); GROUPS as usize];
    for g in 0..GROUPS as usize {
        let data = format!("g{}-first", g + 1);
        propose(&all, g, &data).await;
        want[g].push(data);
    }
    for h in &hosts {
        asleep(h, GROUPS as usize).await;
    }
    // Every group sleeps, and its replicas hold what it committed.
    for host_nodes in &nodes {
        for g in 0..GROUPS as usize {
            applied(&host_nodes[g], &want[g]).await;
            assert!(host_nodes[g].status().await.unwrap().hibernating);
        }
    }
    let before = terms(&nodes[0]).await;
    // Five election timeouts asleep: no group wakes, none campaigns.
    for _ in 0..10 {
        tokio::time::sleep(TICK * 10).await;
        for h in &hosts {
            assert_eq!(h.hibernating_groups(), GROUPS as usize, "a group woke");
        }
    }
    assert_eq!(terms(&nodes[0]).await, before, "an election while asleep");

    // A write wakes its group; it is applied everywhere, then all sleep.
    propose(&all, 0, "g1-second").await;
    want[0].push("g1-second".into());
    for host_nodes in &nodes {
        applied(&host_nodes[0], &want[0]).await;
    }
    for h in &hosts {
        asleep(h, GROUPS as usize).await;
    }

    // The host leading the most groups is cut off from the others.
    let mut leaders = Vec::new();
    for g in 0..GROUPS as usize {
        leaders.push(nodes[0][g].leader().expect("a leader"));
    }
    let lost = (1..=3u64)
        .max_by_key(|h| leaders.iter().filter(|l| *l == h).count())
        .unwrap();
    let led: Vec<usize> = (0..GROUPS as usize)
        .filter(|&g| leaders[g] == lost)
        .collect();
    assert!(!led.is_empty());
    net.isolate(lost);
    let survivors: Vec<&Vec<Node<Log>>> = (1..=3u64)
        .filter(|&h| h != lost)
        .map(|h| &nodes[h as usize - 1])
        .collect();
    // Every group it led gets a new leader on the survivors, which takes
    // writes.
    for &g in &led {
        let deadline = tokio::time::Instant::now() + GUARD;
        loop {
            let leader = survivors[0][g].leader();
            if leader.is_some_and(|l| l != lost) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "group {} has no new leader after host {lost} was lost",
                g + 1
            );
            tokio::time::sleep(TICK).await;
        }
        let data = format!("g{}-without-host-{lost}", g + 1);
        propose(&survivors, g, &data).await;
        want[g].push(data);
    }
    // Back: it catches up on every group.
    net.heal();
    for g in 0..GROUPS as usize {
        let data = format!("g{}-after-heal", g + 1);
        propose(&all, g, &data).await;
        want[g].push(data);
    }
    for host_nodes in &nodes {
        for g in 0..GROUPS as usize {
            applied(&host_nodes[g], &want[g]).await;
        }
    }

    // Asleep again, group 1 stops on the live host that leads it: it goes
    // silent, and its followers learn of it only through that host's
    // epoch; they wake and elect a new leader.
    for h in &hosts {
        asleep(h, GROUPS as usize).await;
    }
    let leader = nodes[0][0].leader().expect("group 1 has a leader");
    assert!(hosts[leader as usize - 1].remove_group(1).await);
    let others: Vec<&Vec<Node<Log>>> = (1..=3u64)
        .filter(|&h| h != leader)
        .map(|h| &nodes[h as usize - 1])
        .collect();
    let deadline = tokio::time::Instant::now() + GUARD;
    while others[0][0].leader().is_none_or(|l| l == leader) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "group 1's followers never replaced the leader that stopped"
        );
        tokio::time::sleep(TICK).await;
    }
    propose(&others, 0, "g1-after-its-leader-stopped").await;
    for h in hosts {
        h.shutdown().await;
    }
}

/// One host's TCP transport on an ephemeral loopback port, with frames
/// capped at 512 KiB: a snapshot larger than that crosses only if it is
/// streamed in chunks (a frame that big is dropped).
fn open_tcp_host(id: u64, dir: &std::path::Path) -> (Host, String) {
    let net = raftwork::NetConfig {
        max_frame_bytes: 512 << 10,
        snapshot_chunk_bytes: 64 << 10,
        ..raftwork::NetConfig::default()
    };
    let (t, inbox) =
        raftwork::TcpTransport::bind_now(id, "127.0.0.1:0".parse().unwrap(), net).unwrap();
    let addr = t.local_addr().to_string();
    let config = HostConfig {
        tick_interval: TICK,
        ..HostConfig::default()
    };
    let host = Host::open_with(id, dir.join(format!("host-{id}")), t, inbox, config).unwrap();
    (host, addr)
}

/// Three hosts over TCP. Host 3 stops; group 1 then takes 1.2 MB of
/// writes and compacts its log past where host 3 is, while the other
/// groups take one write each. Host 3 restarts: group 1 catches up through
/// a snapshot streamed over the shared transport into that group's own
/// snapshot store, the others from their logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_snapshots_and_compacts_while_the_others_lag() {
    recorder();
    const LAGGING: u64 = 4;
    let dir = tempfile::tempdir().unwrap();
    let configure = |g: u64| {
        move |c: &mut raftwork::Config| {
            c.core.max_size_per_msg_bytes = 64 << 10;
            if g == 1 {
                c.core.snapshot_interval_entries = 50;
                c.core.snapshot_keep_entries = 10;
            }
        }
    };
    let start = |host: &Host| -> Vec<Node<Log>> {
        (1..=LAGGING)
            .map(|g| {
                host.create_group(g, &[1, 2, 3], Log::default(), configure(g))
                    .unwrap()
            })
            .collect()
    };
    let mut hosts = Vec::new();
    let mut addrs = Vec::new();
    for id in 1..=3 {
        let (h, a) = open_tcp_host(id, dir.path());
        hosts.push(h);
        addrs.push(a);
    }
    for (i, h) in hosts.iter().enumerate() {
        for (j, a) in addrs.iter().enumerate() {
            if i != j {
                h.set_peer(j as u64 + 1, a).unwrap();
            }
        }
    }
    let nodes: Vec<Vec<Node<Log>>> = hosts.iter().map(start).collect();
    let mut want: Vec<Vec<String>> = vec![Vec::new(); LAGGING as usize];
    for g in 0..LAGGING as usize {
        let data = format!("g{}-first", g + 1);
        propose(&[&nodes[0], &nodes[1], &nodes[2]], g, &data).await;
        want[g].push(data);
    }
    for g in 0..LAGGING as usize {
        applied(&nodes[2][g], &want[g]).await;
    }

    // Host 3 stops; group 1 moves on far past it, the others barely.
    let host3 = hosts.pop().unwrap();
    host3.shutdown().await;
    let up = [&nodes[0], &nodes[1]];
    for k in 0..300 {
        let data = format!("g1-{k:04}-{}", "x".repeat(4000));
        propose(&up, 0, &data).await;
        want[0].push(data);
    }
    for g in 1..LAGGING as usize {
        let data = format!("g{}-while-host-3-was-down", g + 1);
        propose(&up, g, &data).await;
        want[g].push(data);
    }
    let compacted = |status: raftwork::Status| status.snapshot_index > 2;
    let deadline = tokio::time::Instant::now() + GUARD;
    while !compacted(nodes[0][0].status().await.unwrap()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "group 1 never snapshotted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Host 3 comes back on a new port.
    let (host3, addr3) = open_tcp_host(3, dir.path());
    for (j, a) in addrs.iter().take(2).enumerate() {
        host3.set_peer(j as u64 + 1, a).unwrap();
        hosts[j].set_peer(3, &addr3).unwrap();
    }
    let back = start(&host3);
    for g in 0..LAGGING as usize {
        applied(&back[g], &want[g]).await;
    }
    let status = back[0].status().await.unwrap();
    assert!(
        status.snapshot_index > 2,
        "group 1 caught up without a snapshot: {status:?}"
    );
    for node in &back[1..] {
        let status = node.status().await.unwrap();
        assert_eq!(status.snapshot_index, 0, "a lagging group got a snapshot");
    }
    host3.shutdown().await;
    for h in hosts {
        h.shutdown().await;
    }
}

/// The node that leads group `g` among `nodes` (one per host), once one
/// does.
async fn leader_of(nodes: &[&Node<Log>]) -> Node<Log> {
    let deadline = tokio::time::Instant::now() + GUARD;
    loop {
        if let Some(n) = nodes.iter().find(|n| n.leader() == Some(n.id())) {
            return (*n).clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A group's replica moves from host 3 to a fourth host at run time, as a
/// rebalancer would move it: the new host joins as a learner, catches up
/// through a snapshot (the group compacted its log), is promoted, and
/// host 3 is removed and lets the group go. The other group on the same
/// hosts never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_moves_to_another_host_at_run_time() {
    recorder();
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let hosts: Vec<Host> = (1..=4).map(|id| open_host(&net, id, dir.path())).collect();
    let snapshots_often = |c: &mut raftwork::Config| {
        c.core.snapshot_interval_entries = 20;
        c.core.snapshot_keep_entries = 5;
    };
    let group = |h: &Host, g: u64| {
        h.create_group(g, &[1, 2, 3], Log::default(), snapshots_often)
            .unwrap()
    };
    let one: Vec<Node<Log>> = hosts[..3].iter().map(|h| group(h, 1)).collect();
    let two: Vec<Node<Log>> = hosts[..3].iter().map(|h| group(h, 2)).collect();
    let mut want_one = Vec::new();
    for k in 0..60 {
        let data = format!("one-{k}");
        leader_of(&[&one[0], &one[1], &one[2]])
            .await
            .propose(data.clone().into_bytes())
            .await
            .unwrap();
        want_one.push(data);
    }

    // Host 4 joins group 1 empty, as a learner, and catches up.
    let newcomer = hosts[3]
        .create_group(1, &[], Log::default(), snapshots_often)
        .unwrap();
    let leader = leader_of(&[&one[0], &one[1], &one[2]]).await;
    leader.add_learner(4, Vec::new()).await.unwrap();
    applied(&newcomer, &want_one).await;
    assert!(
        newcomer.read_stale(|sm| sm.1).await.unwrap(),
        "the newcomer caught up without a snapshot"
    );
    leader.promote_learner(4).await.unwrap();

    // Host 3 leaves group 1 (handing leadership over first if it leads).
    if leader.id() == 3 {
        leader.transfer_leader(1).await.unwrap();
    }
    let leader = leader_of(&[&one[0], &one[1], &newcomer]).await;
    leader.remove_node(3).await.unwrap();
    assert!(hosts[2].remove_group(1).await);
    assert_eq!(hosts[2].running_groups(), vec![2]);
    assert_eq!(hosts[3].running_groups(), vec![1]);

    // Group 1 goes on with hosts 1, 2 and 4; group 2 with 1, 2 and 3.
    let data = "one-after-the-move".to_string();
    leader_of(&[&one[0], &one[1], &newcomer])
        .await
        .propose(data.clone().into_bytes())
        .await
        .unwrap();
    want_one.push(data);
    for node in [&one[0], &one[1], &newcomer] {
        applied(node, &want_one).await;
    }
    let data = "two-after-the-move".to_string();
    leader_of(&[&two[0], &two[1], &two[2]])
        .await
        .propose(data.clone().into_bytes())
        .await
        .unwrap();
    for node in &two {
        applied(node, std::slice::from_ref(&data)).await;
    }
    let mut voters = newcomer.status().await.unwrap().voters;
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 4]);
    for h in hosts {
        h.shutdown().await;
    }
}

/// A state machine that panics on the command `boom`.
#[derive(Default)]
struct Fragile(u64);

impl StateMachine for Fragile {
    type Response = ();

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<()> {
        for c in commands {
            assert!(c.data != b"boom", "the state machine was told to fail");
            self.0 += 1;
        }
        vec![(); commands.len()]
    }

    fn snapshot(&self, w: &mut dyn Write) -> std::io::Result<()> {
        w.write_all(&self.0.to_le_bytes())
    }

    fn restore(&mut self, r: &mut dyn Read) -> std::io::Result<()> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        self.0 = u64::from_le_bytes(b);
        Ok(())
    }
}

/// Groups share a shard (one here), not their fate: a group whose state
/// machine panics stops with that reason, and the other groups on the
/// shard go on. A group removed and created again under the same id is a
/// new instance: a handle of the old one gets shutdown errors, never the
/// new group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shards_groups_fail_alone_and_a_recreated_group_is_new() {
    recorder();
    let dir = tempfile::tempdir().unwrap();
    let net = MemNetwork::new();
    let (t, inbox) = net.join(1);
    let config = HostConfig {
        tick_interval: TICK,
        shards: 1,
        ..HostConfig::default()
    };
    let host = Host::open_with(1, dir.path(), t, inbox, config).unwrap();
    let fragile = host
        .create_group(1, &[1], Fragile::default(), |_| {})
        .unwrap();
    let sturdy = host
        .create_group(2, &[1], Fragile::default(), |_| {})
        .unwrap();
    for node in [&fragile, &sturdy] {
        node.wait_for_leader(GUARD).await.unwrap();
        node.propose(b"one".to_vec()).await.unwrap();
    }
    assert!(fragile.propose(b"boom".to_vec()).await.is_err());
    let stopped = tokio::time::timeout(GUARD, fragile.stopped())
        .await
        .unwrap();
    assert!(
        matches!(
            stopped,
            raftwork::Stopped::Fatal(raftwork::FatalReason::StateMachinePanicked { .. })
        ),
        "{stopped:?}"
    );
    // The other group on the same shard goes on.
    sturdy.propose(b"two".to_vec()).await.unwrap();
    assert_eq!(sturdy.read_stale(|sm| sm.0).await.unwrap(), 2);

    // Group 2 removed and created again: the old handle is not the new
    // group's, whatever it asks.
    let old = sturdy;
    assert!(host.remove_group(2).await);
    assert!(old.is_stopped());
    let new = host
        .create_group(2, &[1], Fragile::default(), |_| {})
        .unwrap();
    new.wait_for_leader(GUARD).await.unwrap();
    assert!(
        matches!(
            old.propose(b"stale".to_vec()).await,
            Err(raftwork::ProposeError::Shutdown)
        ),
        "an old handle reached the new group"
    );
    old.shutdown().await;
    new.propose(b"three".to_vec()).await.unwrap();
    // Restarted from the log: one, two, three (the stale one never came).
    let deadline = tokio::time::Instant::now() + GUARD;
    while new.read_stale(|sm| sm.0).await.unwrap() != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new group did not apply"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !new.is_stopped(),
        "the old handle's shutdown stopped the new group"
    );

    // The same while busy: a writer keeps proposing through its handle
    // while the group is removed and created again. Whatever it got
    // acknowledged was the old instance's (an index at or below where the
    // new one started); everything it sends afterwards is refused.
    let busy = new;
    let writer = {
        let busy = busy.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut refused_in_a_row = 0;
            let until = tokio::time::Instant::now() + Duration::from_secs(5);
            while refused_in_a_row < 200 && tokio::time::Instant::now() < until {
                match busy.propose(b"busy".to_vec()).await {
                    Ok((index, ())) => {
                        acked.push(index);
                        refused_in_a_row = 0;
                    }
                    Err(_) => refused_in_a_row += 1,
                }
                tokio::task::yield_now().await;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(host.remove_group(2).await);
    let again = host
        .create_group(2, &[1], Fragile::default(), |_| {})
        .unwrap();
    again.wait_for_leader(GUARD).await.unwrap();
    let started_at = again.status().await.unwrap().last_index;
    let acked = tokio::time::timeout(GUARD, writer).await.unwrap().unwrap();
    assert!(!acked.is_empty(), "the writer got nothing through before");
    assert!(
        acked.iter().all(|&i| i <= started_at),
        "an old handle's write reached the new instance: {acked:?} past {started_at}"
    );
    host.shutdown().await;
}
