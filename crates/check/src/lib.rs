//! A linearizability checker for key-value histories, in the style of
//! Wing–Gong and porcupine: a depth-first search for an order of the
//! operations that respects real time and a sequential register model, with
//! memoisation of (operations linearized, register state).
//!
//! Histories are split per key (a key-value store is linearizable iff each
//! key's register is), which keeps each search small.
//!
//! An operation whose outcome is unknown (it failed or timed out) is
//! open-ended: it may take effect at any point after its call, or never.
//!
//! What it deliberately does not do: model anything but a register per key
//! with read, write and compare-and-set.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// A register value; `None` is "absent".
pub type Value = Option<u64>;

/// What a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Input {
    /// Read the key.
    Read,
    /// Write a value.
    Write(u64),
    /// Write `new` if the current value is `expected`.
    Cas {
        /// Value the key must hold.
        expected: Value,
        /// Value to write.
        new: u64,
    },
}

/// What the client observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Output {
    /// A read returned this value.
    Read(Value),
    /// A write was acknowledged.
    Written,
    /// A compare-and-set answered whether it succeeded.
    Cas(bool),
    /// No answer (failed or timed out): the operation may or may not have
    /// taken effect.
    Unknown,
}

/// One completed (or abandoned) client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// Client that issued it (for reports only).
    pub client: u64,
    /// Key it touched.
    pub key: u64,
    /// What was asked.
    pub input: Input,
    /// What was observed.
    pub output: Output,
    /// Time of the call.
    pub call_time: u64,
    /// Time of the answer; ignored (taken as infinite) when `output` is `Unknown`.
    pub return_time: u64,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client {} key {} {:?} -> {:?} [{}, {}]",
            self.client,
            self.key,
            self.input,
            self.output,
            self.call_time,
            if self.output == Output::Unknown {
                "∞".to_string()
            } else {
                self.return_time.to_string()
            }
        )
    }
}

/// Why a history is not linearizable, for a person to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The key whose history fails.
    pub key: u64,
    /// Longest prefix the search could linearize, in order.
    pub linearized: Vec<Operation>,
    /// Register state after that prefix.
    pub state: Value,
    /// Operations that were due next but none of which fits the state.
    pub stuck: Vec<Operation>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "key {} is not linearizable: after {} operations the value is {:?}, and none of these can come next:",
            self.key,
            self.linearized.len(),
            self.state
        )?;
        for op in &self.stuck {
            writeln!(f, "  {op}")?;
        }
        if let Some(last) = self.linearized.last() {
            writeln!(f, "last linearized: {last}")?;
        }
        Ok(())
    }
}

/// Applies `input` to `state`; returns the new state if `output` is what
/// the model would answer (any answer fits `Unknown`).
pub fn step(state: Value, input: Input, output: Output) -> Option<Value> {
    match (input, output) {
        (Input::Read, Output::Read(v)) => (v == state).then_some(state),
        (Input::Read, Output::Unknown) => Some(state),
        (Input::Write(v), Output::Written | Output::Unknown) => Some(Some(v)),
        (Input::Cas { expected, new }, Output::Cas(ok)) => {
            let fits = expected == state;
            (fits == ok).then_some(if fits { Some(new) } else { state })
        }
        (Input::Cas { expected, new }, Output::Unknown) => {
            Some(if expected == state { Some(new) } else { state })
        }
        _ => None,
    }
}

/// Checks a whole history. `Ok` carries the number of keys checked.
pub fn check(history: &[Operation]) -> Result<usize, Violation> {
    let mut per_key: BTreeMap<u64, Vec<Operation>> = BTreeMap::new();
    for op in history {
        per_key.entry(op.key).or_default().push(op.clone());
    }
    for (key, ops) in &per_key {
        check_key(*key, ops)?;
    }
    Ok(per_key.len())
}

struct Search<'a> {
    ops: &'a [Operation],
    return_times: Vec<u64>,
    required_count: usize,
    memo: HashSet<(Vec<u64>, Value)>,
    path: Vec<usize>,
    best_path: Vec<usize>,
    best_state: Value,
    best_stuck: Vec<usize>,
}

fn is_set(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

impl Search<'_> {
    fn run(&mut self, done: &mut Vec<u64>, done_required: usize, state: Value) -> bool {
        if done_required == self.required_count {
            return true;
        }
        let n = self.ops.len();
        // The next operation must not be called after a pending one returned
        // (an operation that returns at the instant another is called counts
        // as concurrent with it; a zero-length operation can go next).
        let horizon = (0..n)
            .filter(|&i| !is_set(done, i))
            .map(|i| self.return_times[i])
            .min()
            .unwrap_or(u64::MAX);
        let candidates: Vec<usize> = (0..n)
            .filter(|&i| !is_set(done, i) && self.ops[i].call_time <= horizon)
            .collect();
        if self.path.len() >= self.best_path.len() {
            self.best_path = self.path.clone();
            self.best_state = state;
            self.best_stuck = candidates.clone();
        }
        for i in candidates {
            let op = &self.ops[i];
            let Some(next) = step(state, op.input, op.output) else {
                continue;
            };
            done[i / 64] |= 1 << (i % 64);
            if self.memo.insert((done.clone(), next)) {
                self.path.push(i);
                let required = usize::from(op.output != Output::Unknown);
                if self.run(done, done_required + required, next) {
                    return true;
                }
                self.path.pop();
            }
            done[i / 64] &= !(1 << (i % 64));
        }
        false
    }
}

/// Checks the history of one key.
pub fn check_key(key: u64, ops: &[Operation]) -> Result<(), Violation> {
    let return_times = ops
        .iter()
        .map(|o| {
            if o.output == Output::Unknown {
                u64::MAX
            } else {
                o.return_time
            }
        })
        .collect();
    let mut search = Search {
        ops,
        return_times,
        required_count: ops.iter().filter(|o| o.output != Output::Unknown).count(),
        memo: HashSet::new(),
        path: Vec::new(),
        best_path: Vec::new(),
        best_state: None,
        best_stuck: Vec::new(),
    };
    let mut done = vec![0u64; ops.len().div_ceil(64).max(1)];
    if search.run(&mut done, 0, None) {
        return Ok(());
    }
    Err(Violation {
        key,
        linearized: search.best_path.iter().map(|&i| ops[i].clone()).collect(),
        state: search.best_state,
        stuck: search.best_stuck.iter().map(|&i| ops[i].clone()).collect(),
    })
}
