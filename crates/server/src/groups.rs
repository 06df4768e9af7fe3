//! The key space split over G Raft groups (`--groups G`, issue 17).
//!
//! With G = 1 (the default) a member runs one group as it always has: the
//! `Builder`, the native WAL under `<data-dir>/wal`. With G > 1 it runs a
//! `raftwork::Host` under `<data-dir>/host` (raft-engine's shared log, one
//! transport on `--peer-addr`, one ticker, worker shards; see the library's
//! `host.rs`) with groups 1..=G, every member a voter of every group, and
//! each group elects its own leader, so writes to different keys are led by
//! different members.
//!
//! # Which group holds a key
//!
//! ```text
//! group(key) = 1                                  if key starts with "\0raftwork/"
//!            = 1 + crc32c(key) mod G              otherwise
//! ```
//!
//! CRC-32C (Castagnoli, the `crc32c` crate) is fixed here and pinned by a
//! test: every member and every version must map a key to the same group.
//! G is fixed when the cluster is created (the `CLUSTER` file's `groups=`
//! line); a member started with another `--groups` is refused. The
//! server's own records (member records) live in group 1.
//!
//! # What a split member serves
//!
//! * Single-key routes (`GET`/`PUT`/`DELETE`/`POST /v1/kv/{key}`): run in
//!   the key's group exactly as with one group, forwarded to that group's
//!   leader's API when this member does not lead it (the leader's API URL
//!   comes from the member records in group 1). Writes a follower takes
//!   stay exactly-once through its own session in that group.
//! * Listings (`GET /v1/kv`): every group is read with a ReadIndex on this
//!   member (followers too) and the pages are merged in key order
//!   ([`merge_pages`]). Each group's part is linearizable; the listing as a
//!   whole is not one point in time across groups (a write to one group
//!   may be seen while a later write to another is not).
//! * `/v1/status` adds each group's leader, term and indexes; `/readyz` is
//!   ready when every group is.
//! * Refused with a clear error ([`refusal`]; REST 501, gRPC
//!   FAILED_PRECONDITION):
//!   - the etcd v3 API: its revision is one counter for the whole key space,
//!     which G independent logs do not have;
//!   - client sessions: a session is registered in one group's log;
//!   - membership changes and leadership transfer: they would have to
//!     change every group, and a joining member create them all;
//!   - backups (`GET /v1/snapshot`, `raftwork recover`, `raftwork wal`):
//!     there is no single WAL or read point to take them from.

use bytes::Bytes;

use crate::kv::Listing;
use crate::members::RESERVED_PREFIX;

/// The group (1..=`groups`) that holds `key`; see the module header.
pub fn group_of(key: &[u8], groups: u32) -> u64 {
    assert!(groups >= 1, "at least one group");
    if groups == 1 || key.starts_with(RESERVED_PREFIX) {
        return 1;
    }
    1 + u64::from(crc32c::crc32c(key) % groups)
}

/// The message of a refusal of `what` on a member split over `groups`.
pub fn refusal(what: &str, groups: u32) -> String {
    format!(
        "{what}: not available on a cluster whose keys are split over {groups} Raft groups \
         (--groups {groups}); these need a cluster created with --groups 1"
    )
}

/// Merges one listing page per group (each in key order, each at most
/// `limit` entries) into one page of at most `limit` entries and
/// `bytes_max` bytes of keys and values (at least one entry, if any).
///
/// A group whose page was cut short may hold keys past its last entry
/// that sort before another group's entries: the merged page therefore
/// ends at the smallest last key of the pages cut short, so that the next
/// page (from the merged page's last key) misses nothing.
pub fn merge_pages(pages: Vec<Listing>, limit: usize, bytes_max: usize) -> Listing {
    let cut: Option<Bytes> = pages
        .iter()
        .filter(|p| p.more)
        .filter_map(|p| p.entries.last().map(|(k, _)| k.clone()))
        .min();
    let mut more = pages.iter().any(|p| p.more);
    let mut all: Vec<(Bytes, Bytes)> = pages.into_iter().flat_map(|p| p.entries).collect();
    all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut merged = Listing::default();
    let mut bytes = 0usize;
    for (k, v) in all {
        let size = k.len() + v.len();
        let past_cut = cut.as_ref().is_some_and(|c| k > *c);
        if past_cut
            || merged.entries.len() == limit
            || (!merged.entries.is_empty() && bytes + size > bytes_max)
        {
            more = true;
            break;
        }
        bytes += size;
        merged.entries.push((k, v));
    }
    merged.more = more;
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keys_group_is_pinned() {
        // Pinned: every member and every version must agree.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(group_of(b"123456789", 7), 1 + 0xe306_9283 % 7);
        assert_eq!(group_of(b"anything", 1), 1);
        assert_eq!(group_of(b"\0raftwork/member/1", 16), 1);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..1000 {
            let g = group_of(format!("key-{i}").as_bytes(), 8);
            assert!((1..=8).contains(&g));
            seen.insert(g);
        }
        assert_eq!(seen.len(), 8, "keys spread over every group");
    }

    fn page(keys: &[&str], more: bool) -> Listing {
        Listing {
            entries: keys
                .iter()
                .map(|k| (Bytes::from(k.to_string()), Bytes::from_static(b"v")))
                .collect(),
            more,
        }
    }

    fn keys(l: &Listing) -> Vec<String> {
        l.entries
            .iter()
            .map(|(k, _)| String::from_utf8(k.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn merged_pages_are_ordered_and_stop_where_a_cut_page_stops() {
        let m = merge_pages(
            vec![page(&["b", "d"], false), page(&["a", "c"], false)],
            10,
            1 << 20,
        );
        assert_eq!(keys(&m), ["a", "b", "c", "d"]);
        assert!(!m.more);
        // The second group was cut after "b": its next keys may sort before
        // "c", so the page ends at "b" and says there is more.
        let m = merge_pages(
            vec![page(&["c", "d"], false), page(&["a", "b"], true)],
            10,
            1 << 20,
        );
        assert_eq!(keys(&m), ["a", "b"]);
        assert!(m.more);
        // The limit and the byte cap (at least one entry).
        let m = merge_pages(
            vec![page(&["a", "c"], false), page(&["b"], false)],
            2,
            1 << 20,
        );
        assert_eq!((keys(&m), m.more), (vec!["a".into(), "b".into()], true));
        let m = merge_pages(vec![page(&["a", "b"], false)], 10, 1);
        assert_eq!((keys(&m), m.more), (vec!["a".to_string()], true));
        let m = merge_pages(vec![page(&[], false), page(&[], false)], 10, 1 << 20);
        assert!(m.entries.is_empty() && !m.more);
    }
}
