//! Log output: its format (text or JSON lines), its level (`RUST_LOG`), and
//! the one rule that no level overrides: no password, token, message body
//! or key is ever written.
//!
//! sealpost's own code never logs those. Some dependencies do at `trace`:
//! tungstenite logs every WebSocket frame it reads, and frames carry access
//! tokens (`auth`) and message bodies (`send`). Those targets are kept
//! below `trace` whatever `RUST_LOG` asks, so an operator chasing a bug
//! with `RUST_LOG=trace` does not write credentials to disk. The log-secrecy
//! test (`tests/it/logs.rs`) runs a whole session at `trace` and looks for
//! every secret it used.

use std::io::IsTerminal;

use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry;

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    Text,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// Targets that log wire payloads at `trace`.
const PAYLOAD_LOGGERS: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// Whether an event is dropped whatever the level filter says: `trace`
/// from a payload logger.
fn carries_payload(level: &Level, target: &str) -> bool {
    *level == Level::TRACE
        && PAYLOAD_LOGGERS.iter().any(|logger| {
            target
                .strip_prefix(logger)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
        })
}

/// The level filter: `RUST_LOG`, or `info` when it is unset or invalid.
fn level_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the process's log subscriber, writing to stderr.
pub fn init(format: LogFormat) {
    // Both filters are global (they gate every layer), not per-layer: an
    // `EnvFilter` combined per layer with another filter dropped events it
    // should have passed (sealpost's own `info` lines, on PostgreSQL).
    let filters = registry().with(level_filter()).with(filter_fn(|meta| {
        !carries_payload(meta.level(), meta.target())
    }));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => filters
            .with(logs.with_ansi(std::io::stderr().is_terminal()))
            .init(),
        // The current span's fields (method, path, request id) go with
        // every line, so each line stands on its own in a collector.
        LogFormat::Json => filters
            .with(logs.json().with_current_span(true).with_span_list(false))
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_loggers_never_log_at_trace() {
        for target in ["tungstenite", "tungstenite::protocol", "tokio_tungstenite"] {
            assert!(carries_payload(&Level::TRACE, target), "{target}");
            assert!(!carries_payload(&Level::DEBUG, target), "{target}");
        }
        for target in ["sealpost::ws", "hyper", "tungstenite_like"] {
            assert!(!carries_payload(&Level::TRACE, target), "{target}");
        }
    }
}
