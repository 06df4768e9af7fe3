//! Operating a cluster of real processes: a rolling restart under load.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::members::*;
use common::BIN;

/// One `raftwork kv put` (a write in a session, sent again to the next
/// endpoint while its outcome is unknown): Ok, or what it printed.
fn cli_put(endpoints: &str, key: &str, value: &str) -> Result<(), String> {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RAFTWORK_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
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
