//! The WAL's in-memory index: where each live entry is on disk, and its term.
//!
//! Per entry the index keeps only the record's offset inside its segment (4
//! bytes); the record header on disk gives its length. Terms and segments are
//! kept as runs (`(first index, value)` pairs), because they change rarely: a
//! leader writes thousands of entries per term and a segment holds thousands
//! of entries. So the index costs 4 bytes per entry (plus the slack of a
//! growing `VecDeque`) and a few bytes per term change and per segment,
//! whatever the payload size.
//!
//! Entries staged but not yet written are in the index too (raft-rs reads
//! their terms at once), in the segment [`PENDING`] with no location; they
//! are always a suffix of the log, and [`EntryIndex::place`] gives them
//! their place, oldest first, once the sync thread has written them.
//!
//! Invariants:
//! * `locs[k]` belongs to index `first + k`; the log is contiguous;
//! * pending entries, if any, are the last run of `seg_runs`;
//! * `term_runs` and `seg_runs` are sorted by first index, and the first run
//!   starts at or before `first` whenever `locs` is not empty.

use std::collections::VecDeque;

/// Where one entry record starts, relative to the start of its segment.
pub(crate) type Loc = u32;

/// The "segment" of entries staged but not yet written.
pub(crate) const PENDING: u64 = u64::MAX;

#[derive(Debug)]
pub(crate) struct EntryIndex {
    first: u64,
    locs: VecDeque<Loc>,
    /// `(first index, term)`: entries from that index on have that term.
    term_runs: VecDeque<(u64, u64)>,
    /// `(first index, segment seq)`: entries from that index on are in that segment.
    seg_runs: VecDeque<(u64, u64)>,
}

impl EntryIndex {
    pub(crate) fn new(first: u64) -> Self {
        Self {
            first,
            locs: VecDeque::new(),
            term_runs: VecDeque::new(),
            seg_runs: VecDeque::new(),
        }
    }

    /// Index of the first entry (or of the next one, when empty).
    pub(crate) fn first(&self) -> u64 {
        self.first
    }

    /// Index of the last entry (`first - 1` when empty).
    pub(crate) fn last(&self) -> u64 {
        self.first + self.locs.len() as u64 - 1
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.locs.is_empty()
    }

    /// Forgets everything; the next entry will be `first`.
    pub(crate) fn reset(&mut self, first: u64) {
        self.first = first;
        self.locs.clear();
        self.term_runs.clear();
        self.seg_runs.clear();
    }

    /// Drops every entry at `index` and after.
    pub(crate) fn truncate_from(&mut self, index: u64) {
        assert!(
            index >= self.first,
            "truncate at {index} before first {}",
            self.first
        );
        if index > self.last() {
            return;
        }
        self.locs.truncate((index - self.first) as usize);
        while self.term_runs.back().is_some_and(|r| r.0 >= index) {
            self.term_runs.pop_back();
        }
        while self.seg_runs.back().is_some_and(|r| r.0 >= index) {
            self.seg_runs.pop_back();
        }
    }

    /// Appends entry `index` (must be `last + 1`).
    pub(crate) fn push(&mut self, index: u64, term: u64, seq: u64, loc: Loc) {
        assert_eq!(index, self.last() + 1, "index must grow by one");
        if self.term_runs.back().map(|r| r.1) != Some(term) {
            self.term_runs.push_back((index, term));
        }
        if self.seg_runs.back().map(|r| r.1) != Some(seq) {
            self.seg_runs.push_back((index, seq));
        }
        self.locs.push_back(loc);
    }

    /// The first entry not yet written, if any.
    pub(crate) fn first_pending(&self) -> Option<u64> {
        match self.seg_runs.back() {
            Some(&(start, PENDING)) if !self.locs.is_empty() => Some(start.max(self.first)),
            _ => None,
        }
    }

    /// Entry `index`, the first pending one, was written at `seq`/`loc`.
    pub(crate) fn place(&mut self, index: u64, seq: u64, loc: Loc) {
        assert_eq!(self.first_pending(), Some(index), "placing out of order");
        assert_ne!(seq, PENDING);
        self.locs[(index - self.first) as usize] = loc;
        let pending = self.seg_runs.pop_back().expect("a pending run");
        debug_assert_eq!(pending.1, PENDING);
        if self.seg_runs.back().map(|r| r.1) != Some(seq) {
            self.seg_runs.push_back((index, seq));
        }
        if index < self.last() {
            self.seg_runs.push_back((index + 1, PENDING));
        }
    }

    /// Drops entries before `first`, which becomes the first index.
    pub(crate) fn compact_to(&mut self, first: u64) {
        if first <= self.first {
            return;
        }
        if first > self.last() {
            self.reset(first);
            return;
        }
        self.locs.drain(..(first - self.first) as usize);
        self.first = first;
        while self.term_runs.len() >= 2 && self.term_runs[1].0 <= first {
            self.term_runs.pop_front();
        }
        while self.seg_runs.len() >= 2 && self.seg_runs[1].0 <= first {
            self.seg_runs.pop_front();
        }
        // VecDeque never gives memory back on its own.
        if self.locs.capacity() > 2 * self.locs.len() + 4096 {
            self.locs.shrink_to_fit();
        }
    }

    fn run_at(runs: &VecDeque<(u64, u64)>, index: u64) -> u64 {
        let k = runs.partition_point(|r| r.0 <= index);
        assert!(k > 0, "no run covers index {index}");
        runs[k - 1].1
    }

    /// Term of a live entry.
    pub(crate) fn term(&self, index: u64) -> u64 {
        assert!(
            index >= self.first && index <= self.last(),
            "term of {index} outside the index"
        );
        Self::run_at(&self.term_runs, index)
    }

    /// Offset of the record after `index`'s, if that entry is in the same
    /// segment: an upper bound of where `index`'s record ends.
    pub(crate) fn next_in_segment(&self, index: u64) -> Option<Loc> {
        if index >= self.last() {
            return None;
        }
        let next = index + 1;
        if Self::run_at(&self.seg_runs, next) != Self::run_at(&self.seg_runs, index) {
            return None;
        }
        Some(self.locs[(next - self.first) as usize])
    }

    /// Segment and location of a live entry.
    pub(crate) fn loc(&self, index: u64) -> (u64, Loc) {
        assert!(
            index >= self.first && index <= self.last(),
            "loc of {index} outside the index"
        );
        (
            Self::run_at(&self.seg_runs, index),
            self.locs[(index - self.first) as usize],
        )
    }

    /// Bytes of memory the index holds (its allocations' capacity).
    pub(crate) fn memory_bytes(&self) -> usize {
        self.locs.capacity() * std::mem::size_of::<Loc>()
            + (self.term_runs.capacity() + self.seg_runs.capacity())
                * std::mem::size_of::<(u64, u64)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(k: u64) -> Loc {
        k as u32 * 10
    }

    #[test]
    fn push_truncate_compact() {
        let mut ix = EntryIndex::new(1);
        for i in 1..=100 {
            ix.push(
                i,
                if i < 50 { 1 } else { 2 },
                if i < 70 { 1 } else { 2 },
                loc(i),
            );
        }
        assert_eq!((ix.first(), ix.last()), (1, 100));
        assert_eq!(ix.term(49), 1);
        assert_eq!(ix.term(50), 2);
        assert_eq!(ix.loc(70), (2, loc(70)));
        assert_eq!(ix.next_in_segment(68), Some(loc(69)));
        assert_eq!(ix.next_in_segment(69), None);
        assert_eq!(ix.next_in_segment(100), None);
        ix.truncate_from(60);
        assert_eq!(ix.last(), 59);
        ix.push(60, 3, 3, loc(600));
        assert_eq!(ix.term(60), 3);
        assert_eq!(ix.loc(60), (3, loc(600)));
        assert_eq!(ix.loc(59), (1, loc(59)));
        ix.compact_to(55);
        assert_eq!(ix.first(), 55);
        assert_eq!(ix.term(55), 2);
        assert_eq!(ix.loc(55), (1, loc(55)));
        ix.compact_to(61);
        assert!(ix.is_empty());
        assert_eq!((ix.first(), ix.last()), (61, 60));
    }

    #[test]
    fn pending_entries_are_placed_in_order() {
        let mut ix = EntryIndex::new(1);
        ix.push(1, 1, 7, loc(1));
        assert_eq!(ix.first_pending(), None);
        for i in 2..=4 {
            ix.push(i, 1, PENDING, 0);
        }
        assert_eq!(ix.first_pending(), Some(2));
        assert_eq!(ix.next_in_segment(1), None, "the next one is not written");
        ix.place(2, 7, loc(2));
        assert_eq!(ix.loc(2), (7, loc(2)));
        assert_eq!(ix.next_in_segment(1), Some(loc(2)));
        assert_eq!(ix.first_pending(), Some(3));
        ix.place(3, 8, loc(3));
        ix.place(4, 8, loc(4));
        assert_eq!(ix.first_pending(), None);
        assert_eq!(ix.loc(4), (8, loc(4)));
        assert_eq!(ix.loc(1), (7, loc(1)));
        // An overwrite of pending entries keeps them pending.
        ix.push(5, 1, PENDING, 0);
        ix.push(6, 1, PENDING, 0);
        ix.truncate_from(6);
        ix.push(6, 2, PENDING, 0);
        assert_eq!(ix.first_pending(), Some(5));
        assert_eq!(ix.term(6), 2);
    }
}
