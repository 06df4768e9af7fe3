//! Bridges raft-rs's slog records into `tracing`, so raftwork's and raft-rs's
//! logs come out as one stream through whatever subscriber the user installs.

use std::fmt::Write as _;

use slog::{Drain, Key, OwnedKVList, Record, KV};

/// A slog drain that re-emits every record as a `tracing` event with target
/// `raft`.
pub struct TracingDrain;

struct Collect(String);

impl slog::Serializer for Collect {
    fn emit_arguments(&mut self, key: Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {}={}", key, val);
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), slog::Never> {
        // raft-rs logs every message it sends at debug level: format nothing
        // unless a subscriber wants the record.
        let enabled = match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            slog::Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            slog::Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            slog::Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            slog::Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut kv = Collect(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}{}", msg, kv.0)
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}{}", msg, kv.0),
            slog::Level::Info => tracing::info!(target: "raft", "{}{}", msg, kv.0),
            slog::Level::Debug => tracing::debug!(target: "raft", "{}{}", msg, kv.0),
            slog::Level::Trace => tracing::trace!(target: "raft", "{}{}", msg, kv.0),
        }
        Ok(())
    }
}

/// A slog logger for raft-rs that writes into `tracing`.
pub fn raft_logger(node_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("raft_id" => node_id))
}
