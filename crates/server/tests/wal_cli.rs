//! `raftwork wal inspect|repair` and `--wal-segment-bytes` on a real node's
//! data dir: a node writing across many small segments, then a flipped byte
//! in a closed segment. `serve` must refuse to start and name the repair
//! command; `inspect` must show the damage and say start refuses; `repair`
//! without `--yes` must change nothing; with it, the node starts again.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{raftwork, start_with};

fn wal(args: &[&str], data: &Path) -> Output {
    raftwork()
        .arg("wal")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .stdin(Stdio::null())
        .output()
        .expect("run raftwork wal")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn segments(wal_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(wal_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_damaged_closed_segment_is_refused_inspected_and_repaired_only_with_yes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let wal_dir = data.join("wal");
    {
        let server = start_with(tmp.path(), &["--wal-segment-bytes", "65536"]);
        let addr = server.url.trim_start_matches("http://").parse().unwrap();
        let value = vec![b'v'; 1000];
        for i in 0..300 {
            let (code, body) =
                common::members::request(addr, "PUT", &format!("/v1/kv/k{i}"), &value).unwrap();
            assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        }
        // A clean log opens as it is.
        let o = wal(&["inspect"], &data);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("no damage"), "{}", text(&o));
    } // kill -9
    let segs = segments(&wal_dir);
    assert!(segs.len() >= 4, "small segments rotate: {segs:?}");

    // Flip a byte in the middle of the first segment (closed, so synced).
    let victim = &segs[0];
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(victim)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 30_000).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, 30_000).unwrap();
    drop(f);

    // serve refuses, naming the file and the command to run.
    let out = raftwork()
        .args(["serve", "--name", "cli", "--log-level", "warn"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--api-addr", "127.0.0.1:0", "--peer-addr", "127.0.0.1:0"])
        .args(["--wal-segment-bytes", "65536"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains(&victim.display().to_string()), "{said}");
    assert!(said.contains("raftwork wal repair"), "{said}");

    // inspect: shows the damage, says start refuses, exits 1.
    let o = wal(&["inspect"], &data);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("REFUSES"), "{}", text(&o));
    assert!(text(&o).contains(&victim.display().to_string()));

    // repair without --yes: a plan, nothing changed.
    let before: Vec<Vec<u8>> = segs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let o = wal(&["repair"], &data);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("would cut"), "{}", text(&o));
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    let after: Vec<Vec<u8>> = segs.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(before == after, "repair without --yes changed the log");

    // repair --yes: cut and quarantined; the log opens, the node starts.
    let o = wal(&["repair", "--yes"], &data);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("quarantined"), "{}", text(&o));
    let o = wal(&["inspect"], &data);
    assert!(o.status.success(), "{}", text(&o));
    let server = start_with(tmp.path(), &["--wal-segment-bytes", "65536"]);
    let addr = server.url.trim_start_matches("http://").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, _) = common::members::request(addr, "PUT", "/v1/kv/after", b"x").unwrap();
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no write after the repair");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_wal_segment_bytes_are_refused_before_the_data_dir_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    for bad in ["1000", "4294967296", "lots"] {
        let out = raftwork()
            .args(["serve", "--wal-segment-bytes", bad])
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(!data.exists());
    }
}
