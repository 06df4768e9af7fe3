//! The checker on hand-made histories, and on random small histories
//! cross-checked against a brute-force search over every order.

use raftwork_check::{check, check_key, step, Input, Operation, Output, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn op(client: u64, input: Input, output: Output, call_time: u64, return_time: u64) -> Operation {
    Operation {
        client,
        key: 1,
        input,
        output,
        call_time,
        return_time,
    }
}

#[test]
fn sequential_and_overlapping_histories_that_fit_pass() {
    let h = vec![
        op(1, Input::Write(1), Output::Written, 0, 10),
        op(2, Input::Read, Output::Read(Some(1)), 11, 20),
        // Overlapping write and read: the read may see either value.
        op(1, Input::Write(2), Output::Written, 21, 40),
        op(2, Input::Read, Output::Read(Some(1)), 22, 30),
        op(
            3,
            Input::Cas {
                expected: Some(2),
                new: 3,
            },
            Output::Cas(true),
            41,
            50,
        ),
        op(
            3,
            Input::Cas {
                expected: Some(2),
                new: 4,
            },
            Output::Cas(false),
            51,
            60,
        ),
    ];
    assert_eq!(check(&h), Ok(1));
}

#[test]
fn a_stale_read_is_caught_and_explained() {
    let h = vec![
        op(1, Input::Write(1), Output::Written, 0, 10),
        op(1, Input::Write(2), Output::Written, 11, 20),
        // Called after the second write returned, yet sees the first.
        op(2, Input::Read, Output::Read(Some(1)), 21, 30),
    ];
    let v = check(&h).unwrap_err();
    assert_eq!(v.state, Some(2));
    assert_eq!(v.linearized.len(), 2);
    assert_eq!(v.stuck.len(), 1);
    let text = v.to_string();
    assert!(
        text.contains("not linearizable") && text.contains("Read(Some(1))"),
        "{text}"
    );
}

#[test]
fn a_lost_update_is_caught() {
    // Both compare-and-sets from None claim success: one must have failed.
    let h = vec![
        op(
            1,
            Input::Cas {
                expected: None,
                new: 1,
            },
            Output::Cas(true),
            0,
            10,
        ),
        op(
            2,
            Input::Cas {
                expected: None,
                new: 2,
            },
            Output::Cas(true),
            1,
            11,
        ),
    ];
    assert!(check(&h).is_err());
}

#[test]
fn a_write_with_unknown_outcome_may_or_may_not_have_happened() {
    let maybe = op(1, Input::Write(7), Output::Unknown, 0, 0);
    // Seen later: fine.
    let seen = vec![
        maybe.clone(),
        op(2, Input::Read, Output::Read(Some(7)), 50, 60),
    ];
    assert!(check(&seen).is_ok());
    // Never seen: also fine.
    let unseen = vec![
        maybe.clone(),
        op(2, Input::Read, Output::Read(None), 50, 60),
    ];
    assert!(check(&unseen).is_ok());
    // But it cannot take effect before it was called.
    let early = vec![
        op(2, Input::Read, Output::Read(Some(7)), 0, 5),
        op(1, Input::Write(7), Output::Unknown, 10, 0),
    ];
    assert!(check(&early).is_err());
}

#[test]
fn keys_are_checked_separately() {
    let mut a = op(1, Input::Write(1), Output::Written, 0, 10);
    a.key = 1;
    let mut b = op(2, Input::Read, Output::Read(None), 20, 30);
    b.key = 2;
    assert_eq!(check(&[a, b]), Ok(2));
}

/// Every order of every subset that keeps all known operations, checked
/// against real time and the model.
fn brute_force(ops: &[Operation]) -> bool {
    fn ret(o: &Operation) -> u64 {
        if o.output == Output::Unknown {
            u64::MAX
        } else {
            o.return_time
        }
    }
    fn go(ops: &[Operation], used: &mut Vec<bool>, order: &mut Vec<usize>, state: Value) -> bool {
        let all_known_done = ops
            .iter()
            .enumerate()
            .all(|(i, o)| used[i] || o.output == Output::Unknown);
        if all_known_done {
            // Omitted unknown operations never happened; the rest are ordered.
            return true;
        }
        for i in 0..ops.len() {
            if used[i] {
                continue;
            }
            // i may go next only if no unused known op returned before i's call.
            let blocked = ops.iter().enumerate().any(|(j, o)| {
                j != i && !used[j] && o.output != Output::Unknown && ret(o) < ops[i].call_time
            });
            if blocked {
                continue;
            }
            if let Some(next) = step(state, ops[i].input, ops[i].output) {
                used[i] = true;
                order.push(i);
                if go(ops, used, order, next) {
                    return true;
                }
                order.pop();
                used[i] = false;
            }
        }
        false
    }
    go(ops, &mut vec![false; ops.len()], &mut Vec::new(), None)
}

fn random_history(rng: &mut StdRng) -> Vec<Operation> {
    let n = rng.gen_range(1..=6);
    // Times may repeat: operations that return at the instant another is
    // called, and zero-length ones, must be handled like the brute force does.
    let span = 2 * n as u64;
    let times: Vec<u64> = (0..2 * n).map(|_| rng.gen_range(0..span)).collect();
    let value = |rng: &mut StdRng| -> Value { [None, Some(1), Some(2)][rng.gen_range(0..3)] };
    (0..n)
        .map(|k| {
            let (a, b) = (times[2 * k], times[2 * k + 1]);
            let (input, mut output) = match rng.gen_range(0..3) {
                0 => (Input::Read, Output::Read(value(rng))),
                1 => (Input::Write(rng.gen_range(1..=2)), Output::Written),
                _ => (
                    Input::Cas {
                        expected: value(rng),
                        new: rng.gen_range(1..=2),
                    },
                    Output::Cas(rng.gen_bool(0.5)),
                ),
            };
            if rng.gen_bool(0.15) {
                output = Output::Unknown;
            }
            op(k as u64, input, output, a.min(b), a.max(b))
        })
        .collect()
}

#[test]
fn random_small_histories_agree_with_brute_force() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..5_000 {
        let h = random_history(&mut rng);
        let fast = check_key(1, &h).is_ok();
        let slow = brute_force(&h);
        assert_eq!(fast, slow, "disagreement on {h:#?}");
        if fast {
            ok += 1
        } else {
            bad += 1
        }
    }
    // Both kinds must be exercised, or the cross-check proves little.
    assert!(ok > 500 && bad > 500, "linearizable {ok}, not {bad}");
}
