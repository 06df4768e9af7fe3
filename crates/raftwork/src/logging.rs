//! Bridges raft-rs's slog records into `tracing`, so raftwork's and raft-rs's
//! logs come out as one stream through whatever subscriber the user installs.
//!
//! raft-rs's key-value pairs become fields of the event, not text in its
//! message: the keys raft-rs logs most (`raft_id`, `term`, `index`, `from`,
//! `to`, `commit`, `vote`, `msg_type`, …; keys with spaces get underscores)
//! are fields of their own, numbers as numbers, and every other pair is
//! kept in one `raft_kv` field as `key=value` text (tracing's fields are
//! named at compile time, so an open set of keys cannot each get one).
//! raft-rs adds `raft_id` to every record itself.

use std::fmt::Write as _;

use slog::{Drain, Key, OwnedKVList, Record, KV};

/// A slog drain that re-emits every record as a `tracing` event with target
/// `raft`.
pub struct TracingDrain;

/// The fields of one record.
#[derive(Default)]
struct Fields {
    raft_id: Option<u64>,
    term: Option<u64>,
    index: Option<u64>,
    from: Option<u64>,
    to: Option<u64>,
    commit: Option<u64>,
    vote: Option<u64>,
    last_index: Option<u64>,
    last_term: Option<u64>,
    log_index: Option<u64>,
    log_term: Option<u64>,
    msg_type: Option<String>,
    /// Every other pair, `key=value` separated by spaces.
    rest: String,
}

impl Fields {
    fn number_slot(&mut self, key: &str) -> Option<&mut Option<u64>> {
        Some(match key {
            "raft_id" => &mut self.raft_id,
            "term" => &mut self.term,
            "index" => &mut self.index,
            "from" => &mut self.from,
            "to" => &mut self.to,
            "commit" => &mut self.commit,
            "vote" => &mut self.vote,
            "last_index" | "last index" => &mut self.last_index,
            "last_term" | "last term" => &mut self.last_term,
            "log_index" => &mut self.log_index,
            "log_term" | "logterm" => &mut self.log_term,
            _ => return None,
        })
    }

    fn other(&mut self, key: &str, val: &dyn std::fmt::Display) {
        if !self.rest.is_empty() {
            self.rest.push(' ');
        }
        let _ = write!(self.rest, "{}={}", key.replace(' ', "_"), val);
    }
}

impl slog::Serializer for Fields {
    fn emit_u64(&mut self, key: Key, val: u64) -> slog::Result {
        match self.number_slot(key) {
            // The record's own pairs come before the logger's: keep the first.
            Some(slot) => {
                slot.get_or_insert(val);
            }
            None => self.other(key, &val),
        }
        Ok(())
    }

    fn emit_i64(&mut self, key: Key, val: i64) -> slog::Result {
        match u64::try_from(val) {
            Ok(v) => self.emit_u64(key, v),
            Err(_) => {
                self.other(key, &val);
                Ok(())
            }
        }
    }

    fn emit_usize(&mut self, key: Key, val: usize) -> slog::Result {
        self.emit_u64(key, val as u64)
    }

    fn emit_u32(&mut self, key: Key, val: u32) -> slog::Result {
        self.emit_u64(key, val.into())
    }

    fn emit_arguments(&mut self, key: Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        if key == "msg type" || key == "msg_type" || key == "type" {
            if self.msg_type.is_none() {
                self.msg_type = Some(val.to_string());
            }
            return Ok(());
        }
        // A number formatted as text (`%` or `?` in raft-rs's macros).
        let text = val.to_string();
        if let (Some(slot), Ok(n)) = (self.number_slot(key), text.parse::<u64>()) {
            slot.get_or_insert(n);
            return Ok(());
        }
        self.other(key, &text);
        Ok(())
    }
}

/// Emits one event at a level known at run time (tracing's macros want a
/// constant level).
macro_rules! emit {
    ($level:expr, $f:expr, $msg:expr) => {{
        let f = $f;
        let kv = (!f.rest.is_empty()).then_some(f.rest.as_str());
        let msg_type = f.msg_type.as_deref();
        macro_rules! at {
                                ($lvl:expr) => {
                                    tracing::event!(target: "raft", $lvl,
                                        raft_id = f.raft_id, term = f.term, index = f.index,
                                        from = f.from, to = f.to, commit = f.commit, vote = f.vote,
                                        last_index = f.last_index, last_term = f.last_term,
                                        log_index = f.log_index, log_term = f.log_term,
                                        msg_type, raft_kv = kv, "{}", $msg)
                                };
                            }
        match $level {
            tracing::Level::ERROR => at!(tracing::Level::ERROR),
            tracing::Level::WARN => at!(tracing::Level::WARN),
            tracing::Level::INFO => at!(tracing::Level::INFO),
            tracing::Level::DEBUG => at!(tracing::Level::DEBUG),
            _ => at!(tracing::Level::TRACE),
        }
    }};
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        let level = match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::Level::ERROR,
            slog::Level::Warning => tracing::Level::WARN,
            slog::Level::Info => tracing::Level::INFO,
            slog::Level::Debug => tracing::Level::DEBUG,
            slog::Level::Trace => tracing::Level::TRACE,
        };
        // raft-rs logs every message it sends at debug level: collect
        // nothing unless a subscriber wants the record.
        let enabled = match level {
            tracing::Level::ERROR => tracing::enabled!(target: "raft", tracing::Level::ERROR),
            tracing::Level::WARN => tracing::enabled!(target: "raft", tracing::Level::WARN),
            tracing::Level::INFO => tracing::enabled!(target: "raft", tracing::Level::INFO),
            tracing::Level::DEBUG => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            _ => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut fields = Fields::default();
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        emit!(level, &fields, record.msg());
        Ok(())
    }
}

/// A slog logger for raft-rs that writes into `tracing` (raft-rs adds the
/// node's `raft_id` to every record itself).
pub fn raft_logger() -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// A writer that keeps what the JSON formatter writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn raft_rs_pairs_become_json_fields() {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            // As raft-rs builds its logger: raft_id added by the library.
            let logger = raft_logger().new(slog::o!("raft_id" => 7u64));
            slog::info!(logger, "became leader"; "term" => 3u64, "msg type" => ?"MsgAppend",
                "last index" => 12u64, "progress" => "Probe");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let fields = &line["fields"];
        assert_eq!(fields["message"], "became leader");
        assert_eq!(fields["raft_id"], 7);
        assert_eq!(fields["term"], 3);
        assert_eq!(fields["last_index"], 12);
        assert_eq!(fields["msg_type"], "\"MsgAppend\"");
        assert_eq!(fields["raft_kv"], "progress=Probe");
        assert!(fields.get("index").is_none(), "absent keys are not fields");
        assert_eq!(text.matches("raft_id").count(), 1, "raft_id once: {text}");
    }
}
