//! Exactly-once writes on three real `raftwork serve` processes: clients
//! send 2,000 increments through a follower in client sessions while the
//! leader is killed with SIGKILL and restarted, sending every write whose
//! outcome is unknown again with the same session and sequence; the
//! counter ends at exactly 2,000 on every node. The same run without
//! session headers reports how many outcomes were unknown. And the API's
//! session errors: a stale sequence (409), an expired or unknown session
//! (410), bad headers (400), each applying nothing.
//!
//! Every wait is a poll with a generous hang guard, never a timing
//! assertion.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::members::*;
use serde_json::Value;

const CLIENTS: u64 = 8;
const PER_CLIENT: u64 = 250;

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Registers a session through `m`, retrying while there is no leader.
fn register(api: std::net::SocketAddr) -> String {
    let deadline = Instant::now() + GUARD;
    loop {
        if let Ok((200, body)) = request(api, "POST", "/v1/sessions", b"") {
            let token = json(&body)["session"]
                .as_str()
                .expect("a token")
                .to_string();
            assert!(token.contains('-'), "{token}");
            return token;
        }
        assert!(Instant::now() < deadline, "no session registered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one client saw.
#[derive(Default, Debug)]
struct Tally {
    /// Writes answered 200.
    acknowledged: u64,
    /// Sends that got no certain answer (503, broken connection).
    uncertain: u64,
}

/// Sends `count` increments of `key` through `api`. With a session, every
/// uncertain send is repeated with the same sequence until answered; without
/// one, an uncertain write is counted and not sent again (it may or may
/// not have been applied).
fn increments(api: std::net::SocketAddr, key: &str, count: u64, session: Option<String>) -> Tally {
    let mut tally = Tally::default();
    let path = format!("/v1/kv/{key}?incr=1");
    for seq in 1..=count {
        let headers: Vec<(&str, String)> = match &session {
            Some(s) => vec![
                ("raftwork-session", s.clone()),
                ("raftwork-sequence", seq.to_string()),
            ],
            None => Vec::new(),
        };
        let deadline = Instant::now() + GUARD;
        loop {
            match request_with(api, "POST", &path, &headers, b"") {
                Ok((200, _)) => {
                    tally.acknowledged += 1;
                    break;
                }
                Ok((503, _)) | Err(_) => {
                    tally.uncertain += 1;
                    if session.is_none() {
                        break;
                    }
                }
                Ok((status, body)) => panic!(
                    "increment {seq} of {key}: {status} {}",
                    String::from_utf8_lossy(&body)
                ),
            }
            assert!(Instant::now() < deadline, "increment {seq} never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    tally
}

/// Runs `CLIENTS` clients through member `via` while the leader is killed
/// and restarted twice; returns the tallies and the final counter value
/// every member agrees on.
fn run(
    ms: &mut [Member],
    initial: &str,
    via: usize,
    key: &str,
    sessions: bool,
) -> (Vec<Tally>, i64) {
    let api = ms[via].api;
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let key = key.to_string();
            let session = sessions.then(|| register(api));
            let sent = sent.clone();
            std::thread::spawn(move || {
                let t = increments(api, &key, PER_CLIENT, session);
                sent.fetch_add(PER_CLIENT, Ordering::Relaxed);
                t
            })
        })
        .collect();
    // Kill the leader twice while the clients write (never `via`: the
    // clients go through it), restarting it after a new leader is known.
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(400 + 300 * round));
        let names: Vec<String> = ms.iter().map(|m| m.name.clone()).collect();
        let leader = ms[via].converged_leader(3);
        let Some(k) = names
            .iter()
            .position(|n| *n == leader)
            .filter(|&k| k != via)
        else {
            continue;
        };
        ms[k].kill9();
        let deadline = Instant::now() + GUARD;
        while ms[via].converged_leader(3) == leader {
            assert!(Instant::now() < deadline, "no new leader after {leader}");
            std::thread::sleep(Duration::from_millis(50));
        }
        ms[k].start(initial);
    }
    let tallies: Vec<Tally> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(sent.load(Ordering::Relaxed), CLIENTS * PER_CLIENT);
    // Every member, restarted ones included, reaches the same value.
    let mut values = Vec::new();
    for m in ms.iter_mut() {
        let path = format!("/v1/kv/{key}");
        // A restarted member may still be starting: wait for its answer.
        let v = m.wait("the counter", |m| {
            let (status, body) = request(m.api, "GET", &path, b"").ok()?;
            (status == 200).then(|| String::from_utf8(body).unwrap().parse::<i64>().unwrap())
        });
        values.push(v);
    }
    // Linearizable reads (ReadIndex): every member answers the same.
    assert!(values.windows(2).all(|w| w[0] == w[1]), "{values:?}");
    (tallies, values[0])
}

#[test]
fn increments_through_a_follower_apply_exactly_once_across_leader_kills() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 3);
    for m in &mut ms {
        m.start(&initial);
    }
    let leader = agreed_leader(&mut ms, &[0, 1, 2]);
    let via = ms.iter().position(|m| m.name != leader).unwrap();

    let (tallies, value) = run(&mut ms, &initial, via, "with-sessions", true);
    let uncertain: u64 = tallies.iter().map(|t| t.uncertain).sum();
    let acknowledged: u64 = tallies.iter().map(|t| t.acknowledged).sum();
    println!(
        "with sessions: {acknowledged} increments acknowledged after {uncertain} uncertain \
         sends repeated; counter = {value}"
    );
    assert_eq!(acknowledged, CLIENTS * PER_CLIENT);
    assert_eq!(value, (CLIENTS * PER_CLIENT) as i64, "exactly once");

    let leader = agreed_leader(&mut ms, &[0, 1, 2]);
    let via = ms.iter().position(|m| m.name != leader).unwrap();
    let (tallies, value) = run(&mut ms, &initial, via, "without-sessions", false);
    let uncertain: u64 = tallies.iter().map(|t| t.uncertain).sum();
    let acknowledged: u64 = tallies.iter().map(|t| t.acknowledged).sum();
    println!(
        "without sessions: {acknowledged} increments acknowledged, {uncertain} outcomes \
         unknown; counter = {value}"
    );
    assert_eq!(acknowledged + uncertain, CLIENTS * PER_CLIENT);
    assert!(
        acknowledged as i64 <= value && value <= (acknowledged + uncertain) as i64,
        "{value} outside [{acknowledged}, {}]",
        acknowledged + uncertain
    );
}

#[test]
fn stale_expired_unknown_sessions_and_bad_headers_apply_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 1);
    ms[0].start_with(&initial, &["--session-ttl-ms", "1500"]);
    agreed_leader_of(&mut ms, &[0], 1);
    let api = ms[0].api;
    let incr = |headers: &[(&str, String)]| {
        let (status, body) = request_with(api, "POST", "/v1/kv/n?incr=1", headers, b"").unwrap();
        (status, json(&body))
    };
    let h = |s: &str, seq: u64, low: Option<u64>| {
        let mut v = vec![
            ("raftwork-session", s.to_string()),
            ("raftwork-sequence", seq.to_string()),
        ];
        if let Some(low) = low {
            v.push(("raftwork-low-water", low.to_string()));
        }
        v
    };
    let s = register(api);
    let (status, body) = incr(&h(&s, 5, None));
    assert_eq!((status, body["value"].as_i64()), (200, Some(1)));
    // The same write again: the first answer, not a second increment.
    let (status, again) = incr(&h(&s, 5, None));
    assert_eq!((status, again["value"].as_i64()), (200, Some(1)));
    // Below the mark (5: every answer below it was seen).
    let (status, body) = incr(&h(&s, 4, None));
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("low-water"),
        "{body}"
    );
    // Unknown session, and this one's id with another secret (ids are log
    // indexes, easy to guess; the secret is not): both refused, nothing
    // applied.
    let (id, secret) = s.split_once('-').unwrap();
    let unknown = format!("{}-{secret}", id.parse::<u64>().unwrap() + 1_000);
    let (status, body) = incr(&h(&unknown, 1, None));
    assert_eq!(status, 410, "{body}");
    let forged = format!("{id}-{:016x}", u64::from_str_radix(secret, 16).unwrap() ^ 1);
    let (status, body) = incr(&h(&forged, 6, None));
    assert_eq!(status, 410, "{body}");
    let (status, _) = request(api, "DELETE", &format!("/v1/sessions/{forged}"), b"").unwrap();
    assert_eq!(status, 410, "a forged token cannot end the session");
    // Closed session: gone, and closing it again is 410 too.
    let (status, _) = request(api, "DELETE", &format!("/v1/sessions/{s}"), b"").unwrap();
    assert_eq!(status, 200);
    let (status, body) = incr(&h(&s, 6, None));
    assert_eq!(status, 410, "{body}");
    let (status, _) = request(api, "DELETE", &format!("/v1/sessions/{s}"), b"").unwrap();
    assert_eq!(status, 410);
    // Expired: idle past the TTL of log time (the next write's stamp ends
    // it before it is looked at).
    let s2 = register(api);
    let (status, _) = incr(&h(&s2, 1, None));
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(2_500));
    let (status, body) = incr(&h(&s2, 2, None));
    assert_eq!(status, 410, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("expired"),
        "{body}"
    );
    // Bad headers: 400 before anything is proposed.
    for headers in [
        vec![("raftwork-session", "1".to_string())],
        vec![("raftwork-sequence", "1".to_string())],
        vec![
            ("raftwork-session", "x".to_string()),
            ("raftwork-sequence", "1".to_string()),
        ],
        h(&s, 1, Some(2)),
        vec![("raftwork-low-water", "1".to_string())],
        vec![
            ("raftwork-session", "7".to_string()),
            ("raftwork-sequence", "1".to_string()),
        ],
    ] {
        let (status, body) = incr(&headers);
        assert_eq!(status, 400, "{headers:?}: {body}");
    }
    let (status, body) = request(api, "DELETE", "/v1/sessions/abc", b"").unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    // Only the two first writes of each session applied.
    let (status, body) = request(api, "GET", "/v1/kv/n", b"").unwrap();
    assert_eq!((status, body), (200, b"2".to_vec()));
}
