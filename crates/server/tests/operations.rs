//! Operating a cluster of real processes: a rolling restart under load.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::members::*;
use common::raftwork;

/// One `raftwork kv put` (a write in a session, sent again to the next
/// endpoint while its outcome is unknown): Ok, or what it printed.
fn cli_put(endpoints: &str, key: &str, value: &str) -> Result<(), String> {
    let out = raftwork()
        .args(["kv", "put", key, value, "--endpoints", endpoints])
        .args(["--timeout-ms", "15000"])
        .output()
        .expect("run raftwork kv put");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{key}: exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// SIGTERM each member in turn (the leader last) under a steady write load
/// from the CLI and from a plain HTTP client, restarting each before the
/// next: no write fails, and every acknowledged write is there afterwards. A stopping leader hands over its
/// leadership first, and writes that meet the change wait for the new
/// leader instead of failing.
#[test]
fn a_rolling_restart_under_write_load_fails_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    for m in ms.iter_mut() {
        m.start(&initial);
    }
    let leader = agreed_leader(&mut ms, &[0, 1, 2]);
    let urls: Vec<String> = ms.iter().map(|m| format!("http://{}", m.api)).collect();
    let leader_api = ms.iter().find(|m| m.name == leader).unwrap().api;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|t| {
            // Each writer starts at another member.
            let mut order = urls.clone();
            order.rotate_left(t);
            let endpoints = order.join(",");
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut failed = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("load/{t}/{i:06}");
                    match cli_put(&endpoints, &key, &format!("v{i}")) {
                        Ok(()) => acked.push((key, format!("v{i}"))),
                        Err(e) => failed.push(e),
                    }
                    i += 1;
                }
                (acked, failed)
            })
        })
        .collect();
    // And a plain HTTP client without sessions: a PUT is sent again to the
    // next member when the connection fails (refused, or reset by a
    // stopping member before any answer); any answer but 200 is a failure.
    // Several, so that writes are in flight on the leader when it hands
    // over (they must commit under the new leader, not fail).
    let apis: Vec<std::net::SocketAddr> = ms.iter().map(|m| m.api).collect();
    let plain: Vec<_> = (0..6)
        .map(|t| {
            let stop = stop.clone();
            let apis = apis.clone();
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut failed = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("plain/{t}/{i:06}");
                    let value = format!("p{i}");
                    let mut answered = false;
                    for k in 0..apis.len() {
                        // Mostly the leader: writes are in flight there.
                        let api = if k == 0 && i.is_multiple_of(2) {
                            leader_api
                        } else {
                            apis[(i as usize + k) % apis.len()]
                        };
                        match request(api, "PUT", &format!("/v1/kv/{key}"), value.as_bytes()) {
                            Ok((200, _)) => {
                                acked.push((key.clone(), value.clone()));
                                answered = true;
                                break;
                            }
                            Ok((status, body)) => {
                                failed.push(format!(
                                    "{key} via {api}: {status} {}",
                                    String::from_utf8_lossy(&body)
                                ));
                                answered = true;
                                break;
                            }
                            // A stopping member resets connections it had not
                            // accepted yet; a PUT of one value is idempotent, so
                            // like any HTTP client it may send it again.
                            Err(_) => {}
                        }
                    }
                    if !answered {
                        failed.push(format!("{key}: no member took the connection"));
                    }
                    i += 1;
                }
                (acked, failed)
            })
        })
        .collect();
    // Followers first, then the leader.
    let mut order: Vec<usize> = (0..3).filter(|&k| ms[k].name != leader).collect();
    order.push(ms.iter().position(|m| m.name == leader).unwrap());
    for k in order {
        std::thread::sleep(Duration::from_millis(1500));
        let status = ms[k].terminate();
        assert!(status.success(), "{} exited with {status}", ms[k].name);
        if ms[k].name == leader {
            let logs = ms[k].logs();
            assert!(logs.contains("leadership handed over"), "{logs}");
        }
        ms[k].start(&initial);
        ms[k].wait_ready();
    }
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    for w in writers.into_iter().chain(plain) {
        let (a, f) = w.join().unwrap();
        acked.extend(a);
        failed.extend(f);
    }
    assert!(
        failed.is_empty(),
        "{} writes failed: {failed:#?}",
        failed.len()
    );
    assert!(acked.len() >= 20, "only {} writes in the run", acked.len());
    let reader = &mut ms[0];
    for (key, value) in &acked {
        let (status, body) = reader.req("GET", &format!("/v1/kv/{key}"), b"");
        assert_eq!(
            (status, String::from_utf8_lossy(&body).as_ref()),
            (200, value.as_str()),
            "{key}"
        );
    }
}

fn run_cli(args: &[&str]) -> std::process::Output {
    raftwork().args(args).output().expect("run raftwork")
}

fn term_of(m: &Member) -> u64 {
    let (status, body) = m.req("GET", "/v1/status", b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["term"].as_u64().unwrap()
}

/// Disaster recovery: two of three members are lost; the third is
/// recovered into a one-member cluster (`raftwork recover`), two new
/// members join it, and it goes on writing. The two old members, restarted
/// on their old data dirs, are refused before they start Raft (exit 3,
/// "fenced"), never disturb the cluster's term, and every acknowledged
/// write is there.
#[test]
fn a_recovered_survivor_takes_new_members_and_fences_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    for m in ms.iter_mut() {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    let mut acked = Vec::new();
    for i in 0..60 {
        let key = format!("before/{i:03}");
        put(&mut ms[i % 3], &key, &format!("b{i}"));
        acked.push((key, format!("b{i}")));
    }
    // Two machines are lost; the third is stopped to be recovered.
    ms[1].kill9();
    ms[2].kill9();
    ms[0].kill9();
    let data = ms[0].data.to_str().unwrap().to_string();
    let dry = run_cli(&["recover", "--data-dir", &data]);
    assert_eq!(dry.status.code(), Some(1), "{dry:?}");
    let done = run_cli(&["recover", "--data-dir", &data, "--yes"]);
    assert!(done.status.success(), "{done:?}");
    let cluster = std::fs::read_to_string(ms[0].data.join("CLUSTER")).unwrap();
    assert!(cluster.contains("epoch=1"), "{cluster}");

    ms[0].start(&initial);
    ms[0].wait_ready();
    for (key, value) in &acked {
        let (status, body) = ms[0].req("GET", &format!("/v1/kv/{key}"), b"");
        assert_eq!((status, body), (200, value.as_bytes().to_vec()), "{key}");
    }

    // Two new members join as usual.
    let new_dir = dir.path().join("new");
    std::fs::create_dir_all(&new_dir).unwrap();
    let (mut fresh, _) = members(&new_dir, 2);
    for (k, m) in fresh.iter_mut().enumerate() {
        m.name = format!("n{}", k + 4);
    }
    let mut joined = format!("n1={}", ms[0].peer);
    for m in fresh.iter_mut() {
        let api_url = format!("http://{}", m.api);
        let added = run_cli(&[
            "member",
            "add",
            &m.name,
            "--peer-addr",
            &m.peer,
            "--api-url",
            &api_url,
            "--endpoints",
            &format!("http://{}", ms[0].api),
        ]);
        assert!(added.status.success(), "{added:?}");
        joined.push_str(&format!(",{}={}", m.name, m.peer));
        m.start_with(&joined, &["--initial-cluster-state", "existing"]);
        m.wait_ready();
        let cluster = std::fs::read_to_string(m.data.join("CLUSTER")).unwrap();
        assert!(
            cluster.contains("epoch=1"),
            "{} did not adopt: {cluster}",
            m.name
        );
    }
    for i in 0..30 {
        let key = format!("after/{i:03}");
        put(&mut fresh[i % 2], &key, &format!("a{i}"));
        acked.push((key, format!("a{i}")));
    }
    let term = term_of(&ms[0]);

    // The old members come back on their old data: refused, they stop.
    for k in [1, 2] {
        let before = ms[k].logs().len();
        ms[k].start(&initial);
        let mut child = ms[k].child.take().unwrap();
        let deadline = std::time::Instant::now() + GUARD;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} kept running:\n{}",
                ms[k].name,
                ms[k].logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let logs = ms[k].logs()[before..].to_string();
        assert_eq!(status.code(), Some(3), "{}:\n{logs}", ms[k].name);
        assert!(logs.contains("fenced"), "{logs}");
        assert!(!logs.contains("became leader"), "{logs}");
    }
    let survivors = [&ms[0], &fresh[0], &fresh[1]];
    for m in survivors {
        assert_eq!(term_of(m), term, "{}: the term moved", m.name);
    }
    for (key, value) in &acked {
        let (status, body) = fresh[1].req("GET", &format!("/v1/kv/{key}"), b"");
        assert_eq!((status, body), (200, value.as_bytes().to_vec()), "{key}");
    }
}

/// A member's addresses change: its peer address is moved through Raft
/// (`raftwork member update`, through a follower: `PUT
/// /cluster/members/{name}`, etcd's MemberUpdate), the member is
/// restarted there and at a new API address, and the cluster goes on: the
/// others reach it at the new addresses, its new API URL is published, and
/// writes through it and reads of them work.
#[test]
fn a_member_moved_to_new_addresses_stays_in_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    for m in ms.iter_mut() {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    put(&mut ms[0], "before", "move");
    let new_peer = format!("127.0.0.1:{}", common::free_port());
    let moved = run_cli(&[
        "member",
        "update",
        "n3",
        "--peer-addr",
        &new_peer,
        "--endpoints",
        &format!("http://{}", ms[1].api),
    ]);
    assert!(moved.status.success(), "{moved:?}");
    assert!(
        String::from_utf8_lossy(&moved.stdout)
            .contains(&format!("moved to peer address {new_peer}")),
        "{moved:?}"
    );
    // n3 moves: stopped, restarted at the new peer and API addresses.
    let status = ms[2].terminate();
    assert!(status.success());
    ms[2].peer = new_peer.clone();
    ms[2].api = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    ms[2].start(&initial);
    ms[2].wait_ready();
    let new_url = format!("http://{}", ms[2].api);
    ms[0].wait("n3 listed at its new addresses", |m| {
        let (status, body) = m.req("GET", "/cluster/nodes", b"");
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        let n3 = v["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == "n3")?
            .clone();
        (status == 200 && n3["peer_addr"] == new_peer.as_str() && n3["api_url"] == new_url.as_str())
            .then_some(())
    });
    // Make n3 lead: the others must reach it at its new peer address.
    let body = serde_json::json!({ "to": "n3" }).to_string();
    let (status, answer) = ms[0].req("POST", "/cluster/transfer-leader", body.as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    for i in 0..20 {
        put(&mut ms[i % 3], &format!("after/{i}"), "moved");
    }
    for m in ms.iter_mut() {
        m.wait_ready();
        let (status, body) = m.req("GET", "/v1/kv/after/19", b"");
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"moved"[..]),
            "{}",
            m.name
        );
        let (status, body) = m.req("GET", "/v1/kv/before", b"");
        assert_eq!((status, body.as_slice()), (200, &b"move"[..]), "{}", m.name);
    }
}

/// Keys of the re-add test's histories: each is checked on its own, so
/// more keys mean shorter searches.
const HISTORY_KEYS: u64 = 8;

/// One client of the re-add test: reads, writes and compare-and-sets over
/// REST on a few keys, through whichever current member it picks, until
/// `stop`; its history for the linearizability checker.
fn history_client(
    id: u64,
    apis: Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>,
    stop: Arc<AtomicBool>,
    start: std::time::Instant,
) -> Vec<raftwork_check::Operation> {
    use raftwork_check::{Input, Operation, Output};
    let now_us = || start.elapsed().as_micros() as u64;
    let mut history = Vec::new();
    let mut seen: Vec<Option<u64>> = vec![None; HISTORY_KEYS as usize];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let k = (n * 7 + id) % HISTORY_KEYS;
        let fresh = id * 1_000_000 + n;
        let api = {
            let apis = apis.lock().unwrap();
            apis[(n as usize + id as usize) % apis.len()]
        };
        let path = format!("/v1/kv/lin/{k}");
        let call_time = now_us();
        let (input, output) = match n % 5 {
            0 | 1 => match request(api, "GET", &path, b"") {
                Ok((200, body)) => {
                    let v = String::from_utf8(body).unwrap().parse().unwrap();
                    seen[k as usize] = Some(v);
                    (Input::Read, Output::Read(Some(v)))
                }
                Ok((404, _)) => {
                    seen[k as usize] = None;
                    (Input::Read, Output::Read(None))
                }
                // A read without an answer changed nothing: left out.
                _ => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
            2 | 3 => {
                let input = Input::Write(fresh);
                match request(api, "PUT", &path, fresh.to_string().as_bytes()) {
                    Ok((200, _)) => (input, Output::Written),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    _ => (input, Output::Unknown),
                }
            }
            _ => {
                let expected = seen[k as usize];
                let query = match expected {
                    Some(v) => format!("{path}?prev_value={v}"),
                    None => format!("{path}?prev_exist=false"),
                };
                let input = Input::Cas {
                    expected,
                    new: fresh,
                };
                match request(api, "PUT", &query, fresh.to_string().as_bytes()) {
                    Ok((200, _)) => (input, Output::Cas(true)),
                    Ok((412, _)) => (input, Output::Cas(false)),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
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
        std::thread::sleep(Duration::from_millis(5));
    }
    history
}

/// Removes member `k` through `via`, waits for it to stop on its own,
/// wipes its data dir and adds it back under the same name. The clients
/// leave it alone meanwhile (an operator drains a member first): requests
/// to a member being removed end without an answer, and every write with
/// an unknown outcome makes the checker's search longer.
fn remove_wipe_and_add_back(
    ms: &mut [Member],
    k: usize,
    via: usize,
    initial: &str,
    apis: &std::sync::Mutex<Vec<std::net::SocketAddr>>,
) {
    apis.lock().unwrap().retain(|a| *a != ms[k].api);
    std::thread::sleep(Duration::from_millis(200));
    let name = ms[k].name.clone();
    let (status, body) = ms[via].req("DELETE", &format!("/cluster/members/{name}"), b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    wait_exit(&mut ms[k]);
    std::fs::remove_dir_all(&ms[k].data).unwrap();
    let body = serde_json::json!({
        "name": name,
        "peer_addr": ms[k].peer,
        "api_url": format!("http://{}", ms[k].api),
    })
    .to_string();
    let (status, answer) = ms[via].req("POST", "/cluster/members", body.as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    ms[k].start_with(initial, &["--initial-cluster-state", "existing"]);
    ms[k].wait_ready();
    apis.lock().unwrap().push(ms[k].api);
}

/// Waits for a member's process to exit on its own (a removed member
/// does, after its grace period); its exit status.
fn wait_exit(m: &mut Member) -> std::process::ExitStatus {
    let mut child = m.child.take().expect("running");
    let deadline = std::time::Instant::now() + GUARD;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} did not stop:\n{}",
            m.name,
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Members removed, wiped and added back under their old names (n3, then
/// n2), and then n1 removed, under a load of reads, writes and
/// compare-and-sets through every member: the cluster keeps a stable
/// leader and serves writes, and the whole history is linearizable.
#[test]
fn members_removed_wiped_and_added_back_keep_the_history_linearizable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    for m in ms.iter_mut() {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    let apis = Arc::new(std::sync::Mutex::new(
        ms.iter().map(|m| m.api).collect::<Vec<_>>(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let start = std::time::Instant::now();
    let clients: Vec<_> = (1..=3)
        .map(|id| {
            let (apis, stop) = (apis.clone(), stop.clone());
            std::thread::spawn(move || history_client(id, apis, stop, start))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    remove_wipe_and_add_back(&mut ms, 2, 0, &initial, &apis);
    std::thread::sleep(Duration::from_millis(500));
    remove_wipe_and_add_back(&mut ms, 1, 0, &initial, &apis);
    std::thread::sleep(Duration::from_millis(500));
    // n1 goes for good: the clients stop using it first.
    apis.lock().unwrap().retain(|a| *a != ms[0].api);
    std::thread::sleep(Duration::from_millis(200));
    let (status, body) = ms[1].req("DELETE", "/cluster/members/n1", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(wait_exit(&mut ms[0]).success());
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let history: Vec<_> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    // A stable leader that serves writes, on the re-added members alone.
    let leader = agreed_leader_of(&mut ms, &[1, 2], 2);
    assert_ne!(leader, "n1");
    let term = term_of(&ms[1]);
    for i in 0..10 {
        put(&mut ms[1 + i % 2], &format!("final/{i}"), "ok");
    }
    assert_eq!(term_of(&ms[2]), term, "the leadership was not stable");
    let written = history
        .iter()
        .filter(|o| o.output == raftwork_check::Output::Written)
        .count();
    assert!(written > 20, "only {written} writes acknowledged");
    if let Err(v) = raftwork_check::check(&history) {
        panic!("not linearizable:\n{v}");
    }
}

/// A member joining with `--initial-cluster-state existing` checks its
/// flags against the cluster before it writes anything: not added, added
/// under another token (another id), or added at another peer address, it
/// exits 2 saying why and leaves no data dir; added as it says, it joins.
#[test]
fn a_join_whose_flags_disagree_with_the_cluster_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    for m in ms.iter_mut() {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    let extra_dir = dir.path().join("n4");
    std::fs::create_dir_all(&extra_dir).unwrap();
    let (mut extra, _) = members(&extra_dir, 1);
    let n4 = &mut extra[0];
    n4.name = "n4".into();
    let joined = format!("{initial},n4={}", n4.peer);
    let refused = |n4: &mut Member, extra: &[&str], why: &str| {
        let mut flags = vec!["--initial-cluster-state", "existing"];
        flags.extend_from_slice(extra);
        let before = n4.logs().len();
        n4.start_with(&joined, &flags);
        let status = wait_exit(n4);
        let logs = n4.logs()[before..].to_string();
        assert_eq!(status.code(), Some(2), "{why}:\n{logs}");
        assert!(!n4.data.exists(), "{why}: a data dir was written");
        logs
    };
    // Not added at all.
    let logs = refused(n4, &[], "not added");
    assert!(logs.contains("does not expect this member"), "{logs}");
    // Added, but started under another token: another id.
    let add = serde_json::json!({
        "name": "n4", "peer_addr": n4.peer, "api_url": format!("http://{}", n4.api),
    })
    .to_string();
    let (status, body) = ms[0].req("POST", "/cluster/members", add.as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let logs = refused(n4, &["--initial-cluster-token", "another"], "wrong token");
    assert!(logs.contains("--initial-cluster-token"), "{logs}");
    // Added at one peer address, started at another.
    let added_at = n4.peer.clone();
    n4.peer = format!("127.0.0.1:{}", common::free_port());
    let logs = refused(n4, &[], "wrong peer address");
    assert!(
        logs.contains(&format!("at peer address {added_at}")),
        "{logs}"
    );
    // As added: it joins.
    n4.peer = added_at;
    n4.start_with(&joined, &["--initial-cluster-state", "existing"]);
    n4.wait_ready();
    put(n4, "joined", "yes");
}
