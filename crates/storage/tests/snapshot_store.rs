//! The volatile snapshot store: streamed writes, visibility only after
//! commit, retention of the newest N.

use std::io::{Read, Write};

use raft::prelude::SnapshotMetadata;
use raftwork_storage::{MemSnapshotStore, SnapshotStore, StorageError};

fn meta(index: u64) -> SnapshotMetadata {
    SnapshotMetadata {
        index,
        term: 1,
        ..Default::default()
    }
}

#[test]
fn snapshots_are_streamed_visible_after_commit_and_retained_newest_first() {
    let store = MemSnapshotStore::new(2);
    assert!(store.latest().unwrap().is_none());

    let mut w = store.create(meta(10)).unwrap();
    for chunk in 0..100u8 {
        w.write_all(&[chunk; 1000]).unwrap();
    }
    assert!(
        store.latest().unwrap().is_none(),
        "not visible before commit"
    );
    let m = w.commit().unwrap();
    assert_eq!(m.size_bytes, 100_000);
    assert_eq!(store.latest().unwrap().unwrap().metadata.index, 10);

    let (_, mut r) = store.open(10).unwrap();
    let mut buf = Vec::new();
    r.read_to_end(&mut buf).unwrap();
    assert_eq!(buf.len(), 100_000);
    assert_eq!(buf[99_999], 99);

    // An abandoned writer leaves nothing behind.
    let mut w = store.create(meta(15)).unwrap();
    w.write_all(b"half").unwrap();
    drop(w);
    assert_eq!(store.latest().unwrap().unwrap().metadata.index, 10);

    for index in [20, 30] {
        let mut w = store.create(meta(index)).unwrap();
        w.write_all(b"x").unwrap();
        w.commit().unwrap();
    }
    assert_eq!(store.latest().unwrap().unwrap().metadata.index, 30);
    assert!(matches!(
        store.open(10),
        Err(StorageError::SnapshotNotFound { index: 10, .. })
    ));
    assert!(store.open(20).is_ok());
}
