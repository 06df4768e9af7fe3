//! Crash loop: a child process writes through a durable node and prints each
//! acknowledged write; the parent SIGKILLs it at random moments, restarts it
//! on the same data dir, and checks that every acknowledged write survived,
//! in order. Small segments and frequent snapshots put the kills in the
//! middle of rotations, snapshots, compactions and purges too.
//!
//! `RAFTWORK_CRASH_CYCLES` sets the number of kills (default 50);
//! `RAFTWORK_CRASH_SEED` replays a run's kill timing.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use raftwork::{Builder, Command, StateMachine, WalOptions};

const CHILD_DIR_ENV: &str = "RAFTWORK_CRASH_CHILD_DIR";
const WRITERS: u64 = 4;

/// The applied history: `(writer, n)` pairs in log order.
#[derive(Default)]
struct History(Vec<(u64, u64)>);

impl StateMachine for History {
    type Response = ();

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<()> {
        for c in commands {
            let w = u64::from_le_bytes(c.data[..8].try_into().unwrap());
            let n = u64::from_le_bytes(c.data[8..16].try_into().unwrap());
            self.0.push((w, n));
        }
        vec![(); commands.len()]
    }

    fn snapshot(&self, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(&(self.0.len() as u64).to_le_bytes())?;
        for (w, n) in &self.0 {
            out.write_all(&w.to_le_bytes())?;
            out.write_all(&n.to_le_bytes())?;
        }
        Ok(())
    }

    fn restore(&mut self, input: &mut dyn Read) -> std::io::Result<()> {
        let mut b = [0u8; 8];
        input.read_exact(&mut b)?;
        let len = u64::from_le_bytes(b);
        self.0.clear();
        for _ in 0..len {
            input.read_exact(&mut b)?;
            let w = u64::from_le_bytes(b);
            input.read_exact(&mut b)?;
            self.0.push((w, u64::from_le_bytes(b)));
        }
        Ok(())
    }
}

/// Per writer, checks its values are exactly 1..=m in order; returns the m's.
fn check_history(h: &[(u64, u64)]) -> Result<Vec<u64>, String> {
    let mut next = vec![1u64; WRITERS as usize];
    for (pos, &(w, n)) in h.iter().enumerate() {
        let want = next
            .get_mut(w as usize)
            .ok_or(format!("writer {w} unknown"))?;
        if n != *want {
            return Err(format!("at {pos}: writer {w} wrote {n}, expected {want}"));
        }
        *want += 1;
    }
    Ok(next.into_iter().map(|n| n - 1).collect())
}

/// The child: recover, report, then write forever (until killed).
#[test]
#[ignore = "child process of crash_loop_keeps_every_acknowledged_write"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let node = Builder::new(1, History::default())
            .data_dir(dir)
            .wal_options(WalOptions {
                segment_size_bytes: 8 << 10,
                cache_bytes: 4 << 10,
                ..Default::default()
            })
            .configure(|c| {
                c.tick_interval = Duration::from_millis(20);
                c.core.snapshot_interval_entries = 37;
                c.core.snapshot_keep_entries = 10;
            })
            .build()
            .expect("node starts");
        node.wait_for_leader(Duration::from_secs(30)).await.unwrap();
        let history = node.read(|h: &History| h.0.clone()).await.unwrap();
        let maxes = match check_history(&history) {
            Ok(m) => m,
            Err(e) => {
                println!("bad {e}");
                std::process::exit(3);
            }
        };
        println!(
            "recovered {}",
            maxes
                .iter()
                .map(|m| m.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let node = node.clone();
            let start = maxes[w as usize] + 1;
            tasks.push(tokio::spawn(async move {
                for n in start.. {
                    let mut cmd = w.to_le_bytes().to_vec();
                    cmd.extend_from_slice(&n.to_le_bytes());
                    node.propose(cmd).await.expect("write applied");
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {w} {n}").unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

/// A small deterministic generator for the kill timing.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn spawn_child(dir: &std::path::Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Process::new(std::env::current_exe().unwrap())
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning the child");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Applies one line of child output to what the parent knows. Returns true
/// for the child's recovery report.
fn absorb(line: &str, acked: &mut HashMap<u64, u64>, recovered: &mut Option<Vec<u64>>) -> bool {
    // The test harness prints "test crash_child ... " before the first line.
    let line = ["recovered ", "ack ", "bad "]
        .iter()
        .filter_map(|k| line.find(k).map(|p| &line[p..]))
        .next()
        .unwrap_or(line);
    let parts: Vec<&str> = line.split_whitespace().collect();
    match parts.first().copied() {
        Some("ack") => {
            let w: u64 = parts[1].parse().unwrap();
            let n: u64 = parts[2].parse().unwrap();
            let e = acked.entry(w).or_default();
            *e = (*e).max(n);
        }
        Some("recovered") => {
            let maxes: Vec<u64> = parts[1..].iter().map(|p| p.parse().unwrap()).collect();
            for (w, &m) in maxes.iter().enumerate() {
                let want = acked.get(&(w as u64)).copied().unwrap_or(0);
                assert!(
                    m >= want,
                    "writer {w}: recovered up to {m} but {want} was acknowledged"
                );
            }
            *recovered = Some(maxes);
            return true;
        }
        Some("bad") => panic!("the child found a broken history: {line}"),
        _ => {}
    }
    false
}

#[test]
fn crash_loop_keeps_every_acknowledged_write() {
    let cycles: u64 = std::env::var("RAFTWORK_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("RAFTWORK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("crash loop: {cycles} cycles, replay with RAFTWORK_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashMap<u64, u64> = HashMap::new();
    let mut recoveries = 0;
    for cycle in 0..=cycles {
        let (mut child, lines) = spawn_child(dir.path());
        let mut recovered = None;
        // One kill in five lands during start-up (recovery, bootstrap, the
        // first snapshot); the rest after a random stretch of writing.
        let early = rng.below(5) == 0 && cycle < cycles;
        let run_for = Duration::from_millis(if early {
            rng.below(60)
        } else {
            20 + rng.below(280)
        });
        let hang_guard = Instant::now() + Duration::from_secs(60);
        let mut started_at = None;
        loop {
            if early && Instant::now() >= hang_guard - Duration::from_secs(60) + run_for {
                break;
            }
            if let Some(t) = started_at {
                if Instant::now() >= t + run_for || cycle == cycles {
                    break;
                }
            }
            assert!(
                Instant::now() < hang_guard,
                "cycle {cycle}: the child never recovered"
            );
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(5)) {
                if absorb(&line, &mut acked, &mut recovered) {
                    started_at = Some(Instant::now());
                    recoveries += 1;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("cycle {cycle}: the child exited on its own: {status}");
            }
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        // Lines printed before the kill are real acknowledgements.
        while let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) {
            absorb(&line, &mut acked, &mut recovered);
        }
    }
    let total: u64 = acked.values().sum();
    // Straight to stderr, past the test harness's capture.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "crash loop: {cycles} kills (seed {seed}), {recoveries} recoveries checked, {total} acknowledged writes survived"
    );
    assert!(
        recoveries as u64 > cycles / 2,
        "most cycles got past start-up"
    );
    assert!(total > 0, "the children wrote something");
}
