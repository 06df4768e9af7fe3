//! The core against hostile peers: property tests over
//! [`raftwork_sim::hostile::run`], plus every input that ever broke it.
//!
//! The long run is the fuzzer: `cargo fuzz run hostile_core` in `fuzz/`
//! (see fuzz/README.md). A crash it finds goes into `tests/hostile-cases/`
//! as a file, and this test replays it from then on.

use proptest::prelude::*;
use raftwork_sim::hostile;

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    /// Any sequence of ticks, proposals and hostile messages: no node
    /// panics, commits go back, or committed entries change.
    #[test]
    fn no_message_stops_a_node_or_rewrites_its_commits(input in prop::collection::vec(any::<u8>(), 0..4096)) {
        hostile::run(&input);
    }
}

#[test]
fn saved_cases_still_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile-cases");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        eprintln!("replaying {}", path.display());
        hostile::run(&input);
        count += 1;
    }
    assert!(count > 0, "no saved cases in {}", dir.display());
}

/// The input reaches the rules: a fair share of hostile messages is
/// rejected and a fair share gets through, and the cluster keeps committing.
#[test]
fn random_input_exercises_both_sides_of_the_rules() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let input: Vec<u8> = (0..200_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut total = hostile::Summary::default();
    for chunk in input.chunks(4000) {
        let s = hostile::run(chunk);
        total.hostile_messages += s.hostile_messages;
        total.rejected += s.rejected;
        total.commits += s.commits;
        for (reason, n) in s.reasons {
            *total.reasons.entry(reason).or_default() += n;
        }
    }
    eprintln!("{total:?}");
    assert!(total.rejected > total.hostile_messages / 10, "{total:?}");
    assert!(total.rejected < total.hostile_messages, "{total:?}");
    assert!(total.commits > 0, "{total:?}");
    // Every rule the core checks is reached (the shell's own rule,
    // SnapshotDataMissing, is not the core's to check).
    for rule in [
        "WrongRecipient",
        "BadSender",
        "NotFromPeers",
        "OutOfRange",
        "BadTerm",
        "SnapshotRequest",
        "CommitBeyondLog",
        "AckBeyondLog",
        "BadAppend",
        "LogTermBelowCommitted",
        "BadConfChange",
        "BadSnapshot",
        "BadReadIndex",
        "NotFromLeader",
    ] {
        assert!(
            total.reasons.contains_key(rule),
            "{rule} never fired: {total:?}"
        );
    }
}
