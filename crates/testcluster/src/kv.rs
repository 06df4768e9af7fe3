//! [`KvSm`]: a ready-made key-value state machine (u64 keys and values) with
//! writes and compare-and-sets, the model the linearizability checker knows.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use raftwork::{Command, StateMachine};

/// A command for [`KvSm`]. Propose [`KvCommand::encode`]; reads go through
/// `Node::read(|sm: &KvSm| sm.get(key))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvCommand {
    /// Set `key` to `value`.
    Write {
        /// The key.
        key: u64,
        /// The new value.
        value: u64,
    },
    /// Set `key` to `new` if it holds `expected` (`None`: absent).
    Cas {
        /// The key.
        key: u64,
        /// Value the key must hold.
        expected: Option<u64>,
        /// Value to write.
        new: u64,
    },
}

const TAG_WRITE: u8 = 1;
const TAG_CAS: u8 = 2;

impl KvCommand {
    /// The bytes to propose.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(26);
        match *self {
            KvCommand::Write { key, value } => {
                out.push(TAG_WRITE);
                out.extend_from_slice(&key.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
            }
            KvCommand::Cas { key, expected, new } => {
                out.push(TAG_CAS);
                out.extend_from_slice(&key.to_le_bytes());
                out.push(u8::from(expected.is_some()));
                out.extend_from_slice(&expected.unwrap_or(0).to_le_bytes());
                out.extend_from_slice(&new.to_le_bytes());
            }
        }
        out
    }

    /// Parses proposed bytes; `None` if they are not a command.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let u64_at = |at: usize| -> Option<u64> {
            Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
        };
        match (bytes.first()?, bytes.len()) {
            (&TAG_WRITE, 17) => Some(KvCommand::Write {
                key: u64_at(1)?,
                value: u64_at(9)?,
            }),
            (&TAG_CAS, 26) => Some(KvCommand::Cas {
                key: u64_at(1)?,
                expected: match bytes[9] {
                    0 => None,
                    1 => Some(u64_at(10)?),
                    _ => return None,
                },
                new: u64_at(18)?,
            }),
            _ => None,
        }
    }
}

/// What [`KvSm`] answers to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvResponse {
    /// A write was applied.
    Written,
    /// A compare-and-set was applied; `true` if it wrote.
    Cas(bool),
    /// The bytes were not a [`KvCommand`]; nothing changed.
    Invalid,
}

/// `0` written, `1 | ok` compare-and-set, `2` invalid.
impl raftwork::ResponseBytes for KvResponse {
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            KvResponse::Written => vec![0],
            KvResponse::Cas(ok) => vec![1, u8::from(*ok)],
            KvResponse::Invalid => vec![2],
        }
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [0] => Some(KvResponse::Written),
            [1, ok @ (0 | 1)] => Some(KvResponse::Cas(*ok == 1)),
            [2] => Some(KvResponse::Invalid),
            _ => None,
        }
    }
}

/// A replicated map from u64 keys to u64 values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvSm {
    map: BTreeMap<u64, u64>,
    /// Commands applied (valid or not), part of the fingerprint.
    applied: u64,
}

impl KvSm {
    /// The value of `key`, if any.
    pub fn get(&self, key: u64) -> Option<u64> {
        self.map.get(&key).copied()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if no key is set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Commands applied since the beginning (including invalid ones).
    pub fn applied_commands(&self) -> u64 {
        self.applied
    }

    /// Every key and value, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(k, v)| (*k, *v))
    }

    /// FNV-1a over the command count and every key and value in key order:
    /// equal states give equal fingerprints. Pass it as the cluster's
    /// fingerprint function.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |x: u64| {
            for b in x.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(self.applied);
        for (k, v) in &self.map {
            eat(*k);
            eat(*v);
        }
        h
    }
}

impl StateMachine for KvSm {
    type Response = KvResponse;

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<KvResponse> {
        commands
            .iter()
            .map(|c| {
                self.applied += 1;
                match KvCommand::decode(c.data) {
                    Some(KvCommand::Write { key, value }) => {
                        self.map.insert(key, value);
                        KvResponse::Written
                    }
                    Some(KvCommand::Cas { key, expected, new }) => {
                        let ok = self.map.get(&key).copied() == expected;
                        if ok {
                            self.map.insert(key, new);
                        }
                        KvResponse::Cas(ok)
                    }
                    None => KvResponse::Invalid,
                }
            })
            .collect()
    }

    fn snapshot(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(&self.applied.to_le_bytes())?;
        w.write_all(&(self.map.len() as u64).to_le_bytes())?;
        for (k, v) in &self.map {
            w.write_all(&k.to_le_bytes())?;
            w.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    }

    fn restore(&mut self, r: &mut dyn Read) -> io::Result<()> {
        let mut next = || -> io::Result<u64> {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            Ok(u64::from_le_bytes(b))
        };
        let applied = next()?;
        let len = next()?;
        let mut map = BTreeMap::new();
        for _ in 0..len {
            let k = next()?;
            map.insert(k, next()?);
        }
        *self = KvSm { map, applied };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_garbage_is_refused() {
        let cmds = [
            KvCommand::Write {
                key: 1,
                value: u64::MAX,
            },
            KvCommand::Cas {
                key: 7,
                expected: None,
                new: 3,
            },
            KvCommand::Cas {
                key: 7,
                expected: Some(0),
                new: 3,
            },
        ];
        for c in cmds {
            assert_eq!(KvCommand::decode(&c.encode()), Some(c));
        }
        assert_eq!(KvCommand::decode(b""), None);
        assert_eq!(KvCommand::decode(&[TAG_WRITE, 1, 2]), None);
        let mut bad = cmds[1].encode();
        bad[9] = 2;
        assert_eq!(KvCommand::decode(&bad), None);
    }

    #[test]
    fn apply_snapshot_restore() {
        let mut sm = KvSm::default();
        let cmds: Vec<Vec<u8>> = vec![
            KvCommand::Write { key: 1, value: 10 }.encode(),
            KvCommand::Cas {
                key: 1,
                expected: Some(9),
                new: 11,
            }
            .encode(),
            KvCommand::Cas {
                key: 2,
                expected: None,
                new: 20,
            }
            .encode(),
            b"junk".to_vec(),
        ];
        let commands: Vec<Command<'_>> = cmds
            .iter()
            .enumerate()
            .map(|(i, d)| Command {
                index: i as u64 + 1,
                term: 1,
                data: d,
                log_time_ms: 0,
            })
            .collect();
        let out = sm.apply(&commands);
        assert_eq!(
            out,
            [
                KvResponse::Written,
                KvResponse::Cas(false),
                KvResponse::Cas(true),
                KvResponse::Invalid
            ]
        );
        assert_eq!(sm.iter().collect::<Vec<_>>(), [(1, 10), (2, 20)]);
        let mut bytes = Vec::new();
        sm.snapshot(&mut bytes).unwrap();
        let mut other = KvSm::default();
        other.restore(&mut bytes.as_slice()).unwrap();
        assert_eq!(other, sm);
        assert_eq!(other.fingerprint(), sm.fingerprint());
        assert_ne!(KvSm::default().fingerprint(), sm.fingerprint());
    }
}
