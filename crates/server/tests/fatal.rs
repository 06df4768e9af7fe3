//! A member whose disk fails ends its process: three real `raftwork serve`
//! processes under libfiu's `fiu-run` (Debian's fiu-utils, which `.ci/run`
//! installs); once they agree on a leader, the leader's `fdatasync` is made
//! to fail. The leader must exit non-zero with the reason in its log (not
//! linger answering "node is shutting down"), and the other two must elect
//! a new leader and take writes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::members::*;
use serde_json::Value;

fn status(m: &Member) -> Value {
    serde_json::from_slice(&m.req("GET", "/v1/status", b"").1).unwrap()
}

#[test]
fn a_failed_fsync_ends_the_process_and_the_others_go_on() {
    if Command::new("fiu-run").arg("-h").output().is_err() {
        eprintln!("SKIPPED: fiu-run is not installed (apt-get install fiu-utils)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 3);
    let ctl = |name: &str| tmp.path().join(format!("fiu-{name}"));
    for m in &mut ms {
        let ctl = ctl(&m.name).to_string_lossy().into_owned();
        m.start_under(&["fiu-run", "-x", "-f", &ctl], &initial, &[]);
    }
    let leader_name = agreed_leader(&mut ms, &[0, 1, 2]);
    let leader = ms.iter().position(|m| m.name == leader_name).unwrap();
    put(&mut ms[(leader + 1) % 3], "before", "ok");

    // Every fdatasync of the leader fails from now on.
    let pid = status(&ms[leader])["pid"].as_u64().unwrap().to_string();
    let enabled = Command::new("fiu-ctrl")
        .arg("-f")
        .arg(ctl(&leader_name))
        .args(["-c", "enable name=posix/io/sync/fdatasync", &pid])
        .status()
        .unwrap();
    assert!(enabled.success(), "fiu-ctrl");

    // A write makes the leader sync: it stops, and its process exits 1.
    let follower = (leader + 1) % 3;
    let _ = ms[follower].req("PUT", "/v1/kv/trigger", b"x");
    let deadline = Instant::now() + GUARD;
    let code = loop {
        if let Some(status) = ms[leader].child.as_mut().unwrap().try_wait().unwrap() {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "the leader did not exit:\n{}",
            ms[leader].logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(code, Some(1), "{}", ms[leader].logs());
    let logs = ms[leader].logs();
    assert!(
        logs.contains("the node stopped") && logs.contains("sync failed"),
        "{logs}"
    );
    ms[leader].child = None;

    // The other two elect a leader between them and take writes.
    let rest: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let deadline = Instant::now() + GUARD;
    loop {
        let named: Vec<Option<u64>> = rest
            .iter()
            .map(|&i| {
                status(&ms[i])["leader"]
                    .as_str()
                    .and_then(|l| l.parse().ok())
            })
            .collect();
        let old = raftwork_server::cluster::member_id("cluster-test", &leader_name);
        if named[0].is_some() && named[0] == named[1] && named[0] != Some(old) {
            break;
        }
        assert!(Instant::now() < deadline, "no new leader: {named:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    put(&mut ms[rest[0]], "after", "ok");
    assert!(Path::new(&ms[leader].data).exists());
}
