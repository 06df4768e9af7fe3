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
//! On the wire, in the log engine and in metric labels, group `g` of G has
//! the id [`wire_id`]` = G × 10,000 + g` (with G = 1: id 1, as a one-group
//! member always had). So members started with different G share no group:
//! each drops the other's messages as for a group it does not run (counted
//! and logged), and none takes part in a group that maps keys otherwise.
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
//! * Leaders are spread over the members ([`spawn_balancer`]): a member
//!   that leads more than one group more than the member leading fewest
//!   hands one of them over, every [`BALANCE_INTERVAL`]. Without it the
//!   leaders gather where elections and hand-overs left them (a restarted
//!   member leads nothing until an election; a stopping leader hands every
//!   group to the same caught-up voter).
//! * Membership changes (add by name, promote, remove) run on group 1's
//!   leader as with one group, and then in every other group at that
//!   group's leader (`api::change_every_other_group`, member to member
//!   through `POST /cluster/groups/{g}/change`): an add goes to group 1
//!   first, a removal last (a member removed from group 1 stops). A change
//!   already made in a group counts as made there, so one that failed
//!   part-way is finished by sending it again. A joining member
//!   (`--initial-cluster-state existing`) creates every group waiting to be
//!   added, after checking that the cluster has its G.
//! * Refused with a clear error ([`refusal`]; REST 501, gRPC
//!   FAILED_PRECONDITION):
//!   - the etcd v3 API: its revision is one counter for the whole key space,
//!     which G independent logs do not have;
//!   - client sessions: a session is registered in one group's log;
//!   - leadership transfer (the balancer places leaders), adding a member
//!     by peer address alone and moving a member's peer address (not
//!     carried over to every group yet);
//!   - backups (`GET /v1/snapshot`, `raftwork recover`, `raftwork wal`):
//!     there is no single WAL or read point to take them from.

use std::time::Duration;

use bytes::Bytes;
use raftwork::{Node, PeerLiveness, Role};

use crate::kv::{KvStore, Listing};
use crate::members::RESERVED_PREFIX;

/// How often a member of a split cluster looks at the groups' leaders
/// ([`spawn_balancer`]).
pub const BALANCE_INTERVAL: Duration = Duration::from_secs(2);

/// How long the balancer waits after a move failed or timed out.
pub const BALANCE_BACKOFF: Duration = Duration::from_secs(10);

/// How far behind the leader's log a member may be and still be given the
/// group's leadership (raft-rs first sends it the rest, while the group's
/// proposals wait).
pub const BALANCE_LAG_ENTRIES_MAX: u64 = 64;

/// Which group this member (`me`) should hand over, and to whom: given
/// each group's leader as seen here (`leaders[i]` for group `i + 1`) and
/// the live voters (`me` among them), the first group `me` leads if it
/// leads more than one more group than the live voter leading fewest (ties:
/// the lowest id), which takes it. Nothing while any group has no known
/// leader (an election is settling).
///
/// Only members above the fewest + 1 act, and each hands over one group at
/// a time, so the members' counts converge without two of them undoing
/// each other's moves.
pub fn rebalance(me: u64, live_voters: &[u64], leaders: &[Option<u64>]) -> Option<(usize, u64)> {
    let leaders: Vec<u64> = leaders.iter().copied().collect::<Option<_>>()?;
    let led = |id: u64| leaders.iter().filter(|&&l| l == id).count();
    let (fewest, least) = live_voters
        .iter()
        .map(|&v| (led(v), v))
        .min()
        .filter(|&(_, v)| v != me)?;
    if led(me) <= fewest + 1 {
        return None;
    }
    let group = leaders.iter().position(|&l| l == me)?;
    Some((group, least))
}

/// Spreads the leaders of `nodes` (groups 1..=G on this member) over the
/// live voters by [`rebalance`] (a move seen on two checks in a row), one
/// leadership transfer at a time, to a voter this host hears (`liveness`;
/// a member stopping falls silent first, see `serve`) and that is at most
/// [`BALANCE_LAG_ENTRIES_MAX`] entries behind (so the transfer does not
/// stall the group long). After a failed move it waits
/// [`BALANCE_BACKOFF`]. Ends when the groups stop.
pub fn spawn_balancer(
    nodes: Vec<Node<KvStore>>,
    liveness: PeerLiveness,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let me = nodes[0].id();
        let mut last = None;
        loop {
            tokio::time::sleep(BALANCE_INTERVAL).await;
            let Some(status) = nodes[0].status().await else {
                return;
            };
            let live: Vec<u64> = status
                .voters
                .iter()
                .copied()
                .filter(|&v| v == me || liveness.is_alive(v))
                .collect();
            let leaders: Vec<Option<u64>> = nodes.iter().map(Node::leader).collect();
            // A move is made only once seen twice in a row: a member that
            // just handed its groups over because it is stopping is gone
            // (and dead to the liveness view) by then, not given them back.
            let seen = rebalance(me, &live, &leaders);
            let confirmed = seen.is_some() && seen == last;
            last = seen;
            let Some((group, to)) = seen.filter(|_| confirmed) else {
                continue;
            };
            let node = &nodes[group];
            let Some(st) = node.status().await else {
                return;
            };
            let caught_up = st.followers_matched.iter().any(|&(id, matched)| {
                id == to && matched + BALANCE_LAG_ENTRIES_MAX >= st.last_index
            });
            if st.role != Role::Leader || !caught_up {
                continue;
            }
            let g = group + 1;
            let moved = tokio::time::timeout(BALANCE_INTERVAL, node.transfer_leader(to)).await;
            match moved {
                Ok(Ok(())) => {
                    tracing::info!(
                        group = g,
                        to,
                        "moved a group's leadership to even out the leaders"
                    );
                    continue;
                }
                Ok(Err(e)) => tracing::warn!(group = g, to, error = %e, "leadership move failed"),
                Err(_) => tracing::warn!(group = g, to, "leadership move timed out"),
            }
            // A group's proposals wait while a move is under way: one that
            // failed is not tried again at once.
            last = None;
            tokio::time::sleep(BALANCE_BACKOFF).await;
        }
    })
}

/// The id on the wire and in the log of group `g` (1..=`groups`) of a
/// key space split over `groups`; see the module header.
pub fn wire_id(g: u64, groups: u32) -> u64 {
    assert!(
        (1..=u64::from(groups)).contains(&g),
        "group {g} of {groups}"
    );
    if groups == 1 {
        1
    } else {
        u64::from(groups) * 10_000 + g
    }
}

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

/// How many entries, and bytes, a listing over `groups` groups asks of
/// each group for a page of `limit` entries and `bytes_max` bytes: an even
/// share with room to spare (at least 16 entries and 64 KiB, at most the
/// page's), so a page does not read G times what it returns. A page may
/// then come out shorter than `limit` while more match ([`merge_pages`]
/// stops where a group's share ends); the cursor goes on from there.
pub fn share_of_page(limit: usize, bytes_max: usize, groups: usize) -> (usize, usize) {
    let entries = (2 * limit).div_ceil(groups).clamp(16.min(limit), limit);
    let bytes = (2 * bytes_max)
        .div_ceil(groups)
        .clamp((64 << 10).min(bytes_max), bytes_max);
    (entries, bytes)
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
    fn leaders_even_out_one_move_at_a_time() {
        let voters = [1, 2, 3];
        // 2, 2, 0: both leading members hand one group to member 3.
        let leaders = [Some(1), Some(2), Some(1), Some(2)];
        assert_eq!(rebalance(1, &voters, &leaders), Some((0, 3)));
        assert_eq!(rebalance(2, &voters, &leaders), Some((1, 3)));
        assert_eq!(rebalance(3, &voters, &leaders), None);
        // 2, 1, 1 is even enough; so is anything with a group leaderless.
        let leaders = [Some(1), Some(2), Some(1), Some(3)];
        assert!(voters
            .iter()
            .all(|&v| rebalance(v, &voters, &leaders).is_none()));
        assert_eq!(
            rebalance(1, &voters, &[Some(1), Some(1), None, Some(1)]),
            None
        );
        // A dead member takes nothing: only live voters count.
        let leaders = [Some(1), Some(1), Some(1), Some(2)];
        assert_eq!(rebalance(1, &[1, 2], &leaders), Some((0, 2)));
        assert_eq!(rebalance(1, &voters, &leaders), Some((0, 3)));
        // Ties go to the lowest id.
        let leaders = [Some(3), Some(3), Some(3), Some(3)];
        assert_eq!(rebalance(3, &voters, &leaders), Some((0, 1)));
    }

    #[test]
    fn wire_ids_differ_between_splits() {
        assert_eq!(wire_id(1, 1), 1);
        assert_eq!(wire_id(3, 4), 40_003);
        let four: Vec<u64> = (1..=4).map(|g| wire_id(g, 4)).collect();
        let two: Vec<u64> = (1..=2).map(|g| wire_id(g, 2)).collect();
        assert!(four.iter().all(|id| !two.contains(id) && *id != 1));
        assert_eq!(wire_id(4096, 4096), 4096 * 10_000 + 4096);
    }

    #[test]
    fn a_groups_share_of_a_page() {
        assert_eq!(share_of_page(1000, 4 << 20, 1), (1000, 4 << 20));
        assert_eq!(share_of_page(1000, 4 << 20, 4), (500, 2 << 20));
        assert_eq!(share_of_page(10_000, 4 << 20, 4096), (16, 64 << 10));
        assert_eq!(share_of_page(5, 4 << 20, 4096), (5, 64 << 10));
    }

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
