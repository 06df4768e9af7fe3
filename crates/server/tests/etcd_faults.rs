//! The etcd API under faults, on three real `raftwork serve` processes:
//!
//! * **Linearizability.** Clients on every node (followers included) run
//!   reads (`Range`, linearizable), puts and compare-and-sets (`Txn` on a
//!   key's value, or on its absence through `version == 0`) against a few
//!   keys, through etcd's gRPC API, while a nemesis SIGKILLs a node (often
//!   the leader) and restarts it, over and over. The history goes through
//!   `raftwork-check`, the checker the simulator uses. A write that got no
//!   answer is open-ended (it may have applied, or not); a read that got
//!   none is left out.
//! * **Lease expiry on every replica alike.** Meanwhile leases of 2 s are
//!   granted with a key each and never kept alive; leaders die during
//!   their expiry. Once the cluster is whole, every lease key is gone on
//!   every member, and `HashKV` at the same revision (a hash of every
//!   version, deletions included) is equal on every member: each deleted
//!   the keys at the same revisions (a fingerprint of the applied history).
//!
//! * **Watch across failures.** A watcher on `lin/` moves to the next node
//!   whenever its node dies, resuming at the revision after the last it
//!   saw. What it saw is in strictly increasing revision order (no
//!   duplicate) and equals what one watch from its first revision gets on
//!   the healed cluster (no gap).
//!
//! The seed of the nemesis is printed; `RAFTWORK_FAULT_SEED` replays its
//! schedule (the clients' timing still varies).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::members::{agreed_leader, members, request, Member};
use raftwork_check::{Input, Operation, Output};
use raftwork_server::etcd::pb::etcdserverpb as pb;
use tonic::transport::{Channel, Endpoint};

/// Keys the clients share (few, so that operations contend).
const KEYS: u64 = 8;
/// A client's pause between operations: keeps the history to a few
/// thousand operations, which the checker searches in seconds (open-ended
/// writes make the search grow fast with the history's length).
const THINK: Duration = Duration::from_millis(20);
/// Clients per node.
const CLIENTS_PER_NODE: usize = 2;
/// How long the nemesis runs.
const RUN: Duration = Duration::from_secs(20);
/// A client's wait for one answer before it counts the outcome unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// Hang guard for the heal and expiry waits.
const GUARD: Duration = Duration::from_secs(90);

/// A small deterministic generator (xorshift64*), seeded per test run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn channel(api: std::net::SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{api}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(OP_TIMEOUT)
        .connect_lazy()
}

fn key(k: u64) -> bytes::Bytes {
    bytes::Bytes::from(format!("lin/{k}"))
}

fn value_of(kvs: &[raftwork_server::etcd::pb::mvccpb::KeyValue]) -> Option<u64> {
    kvs.first().map(|kv| {
        std::str::from_utf8(&kv.value)
            .unwrap()
            .parse()
            .expect("a value the clients wrote")
    })
}

/// The request never reached a server: the connection to its node could
/// not be opened (the node is down). Such a write did nothing, so it is
/// left out of the history rather than counted as open-ended (every
/// open-ended write multiplies the checker's search).
fn never_sent(e: &tonic::Status) -> bool {
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cause {
        let refused = c
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        if refused || c.to_string().contains("tcp connect error") {
            return true;
        }
        cause = c.source();
    }
    false
}

/// One client: random operations on the shared keys until `stop`.
async fn client(
    id: u64,
    api: std::net::SocketAddr,
    start: Instant,
    stop: Instant,
    seed: u64,
) -> Vec<Operation> {
    let mut kv = pb::kv_client::KvClient::new(channel(api));
    let mut rng = Rng(seed | 1);
    let mut seen: Vec<Option<u64>> = vec![None; KEYS as usize];
    let mut history = Vec::new();
    let mut seq = 0u64;
    let now_us = || start.elapsed().as_micros() as u64;
    while Instant::now() < stop {
        let k = rng.below(KEYS);
        seq += 1;
        let fresh = id * 1_000_000 + seq;
        let call_time = now_us();
        let (input, output) = match rng.below(10) {
            0..=3 => {
                let r = tokio::time::timeout(
                    OP_TIMEOUT,
                    kv.range(pb::RangeRequest {
                        key: key(k),
                        ..Default::default()
                    }),
                )
                .await;
                match r {
                    Ok(Ok(answer)) => {
                        let v = value_of(&answer.into_inner().kvs);
                        seen[k as usize] = v;
                        (Input::Read, Output::Read(v))
                    }
                    // A read with no answer changed nothing: left out.
                    _ => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            4..=6 => {
                let r = tokio::time::timeout(
                    OP_TIMEOUT,
                    kv.put(pb::PutRequest {
                        key: key(k),
                        value: fresh.to_string().into(),
                        ..Default::default()
                    }),
                )
                .await;
                match r {
                    Ok(Ok(_)) => (Input::Write(fresh), Output::Written),
                    Ok(Err(e)) if never_sent(&e) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    _ => (Input::Write(fresh), Output::Unknown),
                }
            }
            _ => {
                let expected = seen[k as usize];
                let (target, union) = match expected {
                    Some(v) => (
                        pb::compare::CompareTarget::Value,
                        pb::compare::TargetUnion::Value(v.to_string().into()),
                    ),
                    None => (
                        pb::compare::CompareTarget::Version,
                        pb::compare::TargetUnion::Version(0),
                    ),
                };
                let txn = pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: pb::compare::CompareResult::Equal as i32,
                        target: target as i32,
                        key: key(k),
                        target_union: Some(union),
                        ..Default::default()
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: key(k),
                            value: fresh.to_string().into(),
                            ..Default::default()
                        })),
                    }],
                    failure: Vec::new(),
                };
                let input = Input::Cas {
                    expected,
                    new: fresh,
                };
                match tokio::time::timeout(OP_TIMEOUT, kv.txn(txn)).await {
                    Ok(Ok(answer)) => (input, Output::Cas(answer.into_inner().succeeded)),
                    Ok(Err(e)) if never_sent(&e) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    _ => (input, Output::Unknown),
                }
            }
        };
        history.push(Operation {
            client: id,
            key: k,
            input,
            output,
            call_time,
            return_time: now_us(),
        });
        tokio::time::sleep(THINK).await;
    }
    history
}

/// Grants 2 s leases with a key each, never kept alive, until `stop`;
/// the number of leases granted.
async fn leaser(apis: Vec<std::net::SocketAddr>, stop: Instant) -> usize {
    let mut granted = 0;
    let mut n = 0usize;
    while Instant::now() < stop {
        n += 1;
        let api = apis[n % apis.len()];
        let mut lease = pb::lease_client::LeaseClient::new(channel(api));
        let mut kv = pb::kv_client::KvClient::new(channel(api));
        let grant = tokio::time::timeout(
            OP_TIMEOUT,
            lease.lease_grant(pb::LeaseGrantRequest { ttl: 2, id: 0 }),
        )
        .await;
        if let Ok(Ok(g)) = grant {
            granted += 1;
            let _ = tokio::time::timeout(
                OP_TIMEOUT,
                kv.put(pb::PutRequest {
                    key: format!("lease/{n}").into(),
                    value: "v".into(),
                    lease: g.into_inner().id,
                    ..Default::default()
                }),
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    granted
}

/// One watched change: revision, key, value (empty for a deletion).
type Seen = (i64, bytes::Bytes, bytes::Bytes);

/// Watches `lin/` from `from` on node `apis[at]` until `stop` or an error;
/// appends what it sees to `seen`.
async fn watch_once_on(api: std::net::SocketAddr, from: i64, stop: Instant, seen: &mut Vec<Seen>) {
    let mut w = pb::watch_client::WatchClient::new(channel(api));
    let create = pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
            pb::WatchCreateRequest {
                key: "lin/".into(),
                range_end: "lin0".into(),
                start_revision: from,
                ..Default::default()
            },
        )),
    };
    use tokio_stream::StreamExt as _;
    let requests = tokio_stream::iter([create]).chain(tokio_stream::pending());
    let Ok(Ok(stream)) = tokio::time::timeout(OP_TIMEOUT, w.watch(requests)).await else {
        return;
    };
    let mut stream = stream.into_inner();
    loop {
        let left = stop.saturating_duration_since(Instant::now());
        let Ok(Ok(Some(r))) = tokio::time::timeout(left, stream.message()).await else {
            return;
        };
        assert!(!r.canceled, "watch cancelled: {r:?}");
        for e in r.events {
            let kv = e.kv.expect("an event's kv");
            seen.push((kv.mod_revision, kv.key, kv.value));
        }
    }
}

/// The watcher of the module header: on node after node until `stop`.
async fn watcher(apis: Vec<std::net::SocketAddr>, from: i64, stop: Instant) -> Vec<Seen> {
    let mut seen: Vec<Seen> = Vec::new();
    let mut at = 0;
    while Instant::now() < stop {
        let next = seen.last().map_or(from, |s| s.0 + 1);
        watch_once_on(apis[at % apis.len()], next, stop, &mut seen).await;
        at += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

/// Whether member `m` leads (its `/v1/status`).
fn leads(m: &Member) -> bool {
    request(m.api, "GET", "/v1/status", b"")
        .ok()
        .filter(|(status, _)| *status == 200)
        .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .is_some_and(|v| v["role"] == "leader")
}

/// Kills a node (the leader half of the time) and restarts it, again and
/// again until `stop`; one node down at a time. The number of kills.
fn nemesis(all: Arc<Mutex<Vec<Member>>>, initial: String, seed: u64, stop: Instant) -> usize {
    let mut rng = Rng(seed | 1);
    let mut kills = 0;
    while Instant::now() < stop {
        std::thread::sleep(Duration::from_millis(800 + rng.below(1200)));
        let victim = {
            let mut ms = all.lock().unwrap();
            let victim = if rng.below(2) == 0 {
                ms.iter().position(leads).unwrap_or(0)
            } else {
                rng.below(3) as usize
            };
            ms[victim].kill9();
            victim
        };
        kills += 1;
        std::thread::sleep(Duration::from_millis(300 + rng.below(1500)));
        all.lock().unwrap()[victim].start(&initial);
    }
    kills
}

#[test]
fn etcd_api_histories_stay_linearizable_and_leases_expire_alike_through_kills() {
    let seed = std::env::var("RAFTWORK_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("RAFTWORK_FAULT_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    for m in ms.iter_mut() {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    let apis: Vec<_> = ms.iter().map(|m| m.api).collect();
    let all = Arc::new(Mutex::new(ms));

    let start = Instant::now();
    let stop = start + RUN;
    let nemesis = {
        let (all, initial) = (all.clone(), initial.clone());
        std::thread::spawn(move || nemesis(all, initial, seed, stop))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (history, granted, watched) = runtime.block_on(async {
        let mut tasks = Vec::new();
        for (n, &api) in apis.iter().enumerate() {
            for c in 0..CLIENTS_PER_NODE {
                let id = (n * CLIENTS_PER_NODE + c + 1) as u64;
                tasks.push(tokio::spawn(client(
                    id,
                    api,
                    start,
                    stop,
                    seed.wrapping_add(id),
                )));
            }
        }
        let leases = tokio::spawn(leaser(apis.clone(), stop));
        let watched = tokio::spawn(watcher(apis.clone(), 1, stop));
        let mut history = Vec::new();
        for t in tasks {
            history.extend(t.await.unwrap());
        }
        (history, leases.await.unwrap(), watched.await.unwrap())
    });
    let kills = nemesis.join().unwrap();

    let answered = history
        .iter()
        .filter(|o| o.output != Output::Unknown)
        .count();
    let unknown = history.len() - answered;
    eprintln!(
        "{} operations ({answered} answered, {unknown} unknown), {kills} kills, {granted} leases",
        history.len()
    );
    // The run must have done something worth checking.
    assert!(kills >= 4, "only {kills} kills");
    assert!(
        watched.len() >= 100,
        "the watcher saw {} changes",
        watched.len()
    );
    assert!(answered >= 200, "only {answered} operations answered");
    assert!(granted >= 10, "only {granted} leases granted");
    let checking = Instant::now();
    if let Err(v) = raftwork_check::check(&history) {
        let logs: String = all.lock().unwrap().iter().map(|m| m.logs()).collect();
        panic!("RAFTWORK_FAULT_SEED={seed}: {v}\n{logs}");
    }
    eprintln!("linearizable (checked in {:?})", checking.elapsed());

    // Healed (every node runs): every lease expires on every member, and
    // the members' hashes of the key space with its history agree at one
    // revision.
    runtime.block_on(async {
        let deadline = Instant::now() + GUARD;
        let revision = loop {
            let mut kv = pb::kv_client::KvClient::new(channel(apis[0]));
            let mut left = 0;
            let mut revision = 0;
            let mut reached = true;
            for &api in &apis {
                let mut kv = pb::kv_client::KvClient::new(channel(api));
                match kv
                    .range(pb::RangeRequest {
                        key: "lease/".into(),
                        range_end: "lease0".into(),
                        count_only: true,
                        serializable: true,
                        ..Default::default()
                    })
                    .await
                {
                    Ok(r) => {
                        let r = r.into_inner();
                        left += r.count;
                        revision = revision.max(r.header.unwrap().revision);
                    }
                    Err(_) => reached = false,
                }
            }
            if reached && left == 0 {
                // A linearizable read fixes a revision every member must
                // reach.
                if let Ok(r) = kv
                    .range(pb::RangeRequest {
                        key: "lin/0".into(),
                        ..Default::default()
                    })
                    .await
                {
                    break r.into_inner().header.unwrap().revision;
                }
            }
            assert!(
                Instant::now() < deadline,
                "lease keys left: {left} (revision {revision})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let mut hashes = Vec::new();
        for &api in &apis {
            let mut m = pb::maintenance_client::MaintenanceClient::new(channel(api));
            let hash = loop {
                match m.hash_kv(pb::HashKvRequest { revision }).await {
                    Ok(h) => break h.into_inner(),
                    Err(e) => {
                        // A member that has not applied that far yet.
                        assert!(Instant::now() < deadline, "hashkv at {revision}: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            hashes.push((hash.hash, hash.hash_revision, hash.compact_revision));
        }
        eprintln!("hashkv at {revision}: {hashes:?}");

        // The watcher: no duplicate, and no gap against one watch of the
        // healed cluster over the same revisions.
        assert!(
            watched.windows(2).all(|w| w[0].0 < w[1].0),
            "the watcher saw a revision twice or out of order"
        );
        // The replay starts after any history compaction (the server keeps
        // at least the last 1,000 revisions).
        let compacted = hashes.iter().map(|h| h.2).max().unwrap();
        let first = watched[0].0.max(compacted + 1);
        let last = watched.last().unwrap().0;
        let watched: Vec<Seen> = watched.into_iter().filter(|s| s.0 >= first).collect();
        let mut replay = Vec::new();
        watch_once_on(
            apis[0],
            first,
            Instant::now() + Duration::from_secs(3),
            &mut replay,
        )
        .await;
        replay.retain(|s| s.0 <= last);
        eprintln!(
            "watched {} changes from revision {first} to {last}",
            watched.len()
        );
        assert!(
            replay == watched,
            "the watcher's {} changes differ from a replay's {}",
            watched.len(),
            replay.len()
        );
        assert!(
            hashes.iter().all(|h| h.0 == hashes[0].0 && h.1 == revision),
            "members disagree at revision {revision}: {hashes:?}"
        );
    });
}
