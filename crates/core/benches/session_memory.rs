//! Memory of the session table: heap bytes per session, counted by a
//! global allocator that tracks live bytes (exact, unlike the resident
//! set).
//!
//! For each case the bench builds a fresh table of `BENCH_SESSIONS`
//! sessions (registered by log index, as the apply path does) and sends
//! each session's commands through `check`/`record` as a `Session` handle
//! would, keeping `BENCH_ANSWERS` unacknowledged answers of
//! `BENCH_ANSWER_BYTES` bytes each per session. It prints the live heap
//! bytes of the table divided by the sessions, and the encoded snapshot
//! size per session.
//!
//! Run: `cargo bench -p raftwork-core --bench session_memory`
//! Settings (environment): `BENCH_SESSIONS` (default 100000),
//! `BENCH_ANSWERS` (default `0,1,8`), `BENCH_ANSWER_BYTES` (default 16).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use raftwork_core::session::{Check, SessionConfig, SessionTable};

/// Live heap bytes of the process.
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn env_list(name: &str, default: &str) -> Vec<u64> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().parse().expect("a list of numbers"))
        .collect()
}

fn main() {
    let sessions = env_list("BENCH_SESSIONS", "100000")[0];
    let answer_bytes = env_list("BENCH_ANSWER_BYTES", "16")[0] as usize;
    println!("session table memory: {sessions} sessions, answers of {answer_bytes} bytes");
    for answers in env_list("BENCH_ANSWERS", "0,1,8") {
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let mut table = SessionTable::new(SessionConfig {
            ttl_ms: u64::MAX / 4,
            max_sessions: sessions as usize,
        });
        let mut index = 0u64;
        let mut ids = Vec::with_capacity(sessions as usize);
        for _ in 0..sessions {
            index += 1;
            table.register(index, index.wrapping_mul(0x9e37_79b9_7f4a_7c15), index);
            ids.push(index);
        }
        // Each session sends `answers` commands without acknowledging any
        // answer (low-water mark 1): all stay cached.
        for seq in 1..=answers {
            for &id in &ids {
                index += 1;
                let secret = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let check = table.check(id, secret, seq, 1, index).expect("live");
                assert_eq!(check, Check::New);
                table.record(id, seq, Bytes::from(vec![0xab; answer_bytes]));
            }
        }
        let ids_bytes = (ids.capacity() * 8) as isize;
        let live = LIVE_BYTES.load(Ordering::Relaxed) - before - ids_bytes;
        let encoded = table.encode().len();
        println!(
            "answers_per_session={answers} heap_bytes_per_session={:.1} snapshot_bytes_per_session={:.1} answer_bytes={}",
            live as f64 / sessions as f64,
            encoded as f64 / sessions as f64,
            table.answer_bytes()
        );
        drop(table);
    }
}
