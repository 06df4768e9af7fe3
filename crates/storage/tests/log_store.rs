//! Conformance tests for `LogStore` implementations, including the index
//! boundaries (9→10, 99→100, 65535→65536) that broke stores keyed by decimal
//! strings.

use raft::prelude::{Entry, HardState};
use raft::GetEntriesContext;
use raftwork_storage::{LogStore, MemLogStore, Wal, WalOptions, WriteBatch};

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: index.to_le_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn append<S: LogStore>(s: &S, from: u64, to: u64, term: u64) {
    s.stage(WriteBatch {
        group_id: 1,
        entries: (from..=to).map(|i| entry(i, term)).collect(),
        ..Default::default()
    })
    .unwrap();
}

fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

fn conformance<S: LogStore>(make: impl Fn() -> S) {
    // Boundaries of decimal digits and of u16.
    for &(from, to) in &[(1u64, 20u64), (1, 120), (65_530, 65_540)] {
        let s = make();
        if from > 1 {
            append(&s, 1, from - 1, 1);
            compact(&s, from).unwrap();
            assert_eq!(s.first_index().unwrap(), from);
        }
        append(&s, from, to, 1);
        assert_eq!(s.last_index().unwrap(), to);
        let got = s.entries(from, to + 1, None, ctx()).unwrap();
        assert_eq!(got.len() as u64, to - from + 1);
        for (k, e) in got.iter().enumerate() {
            assert_eq!(
                e.index,
                from + k as u64,
                "entries contiguous across digit boundaries"
            );
        }
        assert_eq!(s.term(to).unwrap(), 1);
    }

    // Overwriting a suffix drops everything after it.
    let s = make();
    append(&s, 1, 10, 1);
    append(&s, 6, 7, 2);
    assert_eq!(s.last_index().unwrap(), 7);
    assert_eq!(s.term(5).unwrap(), 1);
    assert_eq!(s.term(6).unwrap(), 2);
    assert!(s.term(8).is_err());

    // Compaction keeps the term of the compaction point.
    compact(&s, 5).unwrap();
    assert_eq!(s.first_index().unwrap(), 5);
    assert_eq!(s.term(4).unwrap(), 1);
    assert!(matches!(
        s.entries(3, 6, None, ctx()),
        Err(raft::Error::Store(raft::StorageError::Compacted))
    ));
    assert!(
        compact(&s, 100).is_err(),
        "compacting past the end is refused"
    );

    // Size limits still return at least one entry.
    let one = s.entries(5, 8, Some(1), ctx()).unwrap();
    assert_eq!(one.len(), 1);

    // Hard state round-trips.
    let hs = HardState {
        term: 3,
        vote: 2,
        commit: 7,
        ..Default::default()
    };
    s.stage(WriteBatch {
        group_id: 1,
        hard_state: Some(hs.clone()),
        ..Default::default()
    })
    .unwrap();
    s.sync().unwrap();
    assert_eq!(s.initial_state().unwrap().hard_state, hs);
}

#[test]
fn mem_log_store_conforms() {
    conformance(MemLogStore::new);
}

#[test]
fn wal_conforms() {
    let root = tempfile::tempdir().unwrap();
    let next = std::cell::Cell::new(0);
    conformance(|| {
        next.set(next.get() + 1);
        // Small segments and no cache, so reads and compaction cross files.
        let options = WalOptions {
            segment_size_bytes: 4096,
            cache_bytes: 0,
            ..Default::default()
        };
        Wal::open(root.path().join(next.get().to_string()), options).unwrap()
    });
}

/// Compacts through `stage`, as the core does.
/// Each case a group of its own in one engine (nothing synced here, so
/// reads come from the group's cache; `tests/engine_log.rs` reads across
/// the cache and the engine).
#[cfg(feature = "engine")]
#[test]
fn engine_log_conforms() {
    let root = tempfile::tempdir().unwrap();
    let host = raftwork_storage::EngineHost::open(root.path()).unwrap();
    let next = std::cell::Cell::new(0);
    conformance(|| {
        next.set(next.get() + 1);
        host.group(next.get()).unwrap()
    });
}

fn compact<S: LogStore>(s: &S, index: u64) -> Result<(), raftwork_storage::StorageError> {
    s.stage(WriteBatch {
        group_id: 1,
        compact_to: Some(index),
        ..Default::default()
    })
}
