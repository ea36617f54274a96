//! Log output: its format (text or JSON lines), its level (`RUST_LOG`), and
//! the one rule that no level overrides: no password, token, message body
//! or key is ever written.
//!
//! sealpost's own code never logs those. Some dependencies do at `trace` or
//! `debug`: tungstenite logs every WebSocket frame it reads, and frames
//! carry access tokens (`auth`) and message bodies (`send`); the NATS
//! client's connector logs the server it dials as a `Url`'s `Debug`, which
//! shows the password of `SEALPOST_NATS_URL`. Those targets are kept below
//! that level whatever `RUST_LOG` asks, so an operator chasing a bug
//! with `RUST_LOG=trace` does not write credentials to disk. The log-secrecy
//! test (`tests/it/logs.rs`) runs a whole session at `trace` and looks for
//! every secret it used.
//!
//! Events that come in floods (a reconnect storm's refused drains) are
//! logged through a [`Throttle`]: a line now and then, with the count of
//! those held back, rather than one per event.

use std::io::IsTerminal;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

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

/// Targets that log wire payloads or credentials, and the least verbose
/// level at which they do: what they log at it, and below, is dropped.
const PAYLOAD_LOGGERS: &[(&str, Level)] = &[
    ("tungstenite", Level::TRACE),
    ("tokio_tungstenite", Level::TRACE),
    // `server = ?addr` at `debug`; louder, only with a reconnect callback,
    // which sealpost does not set.
    ("async_nats::connector", Level::DEBUG),
];

/// Whether an event is dropped whatever the level filter says: one of a
/// payload logger at or below its level.
fn carries_payload(level: &Level, target: &str) -> bool {
    PAYLOAD_LOGGERS.iter().any(|(logger, from)| {
        // `Level` orders by verbosity: TRACE is the greatest.
        level >= from
            && target
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

/// At most one log line per period for one kind of event: the first event
/// of a period is written, the others are counted, and the next line
/// written says how many were held back. It holds one time and one count
/// however large the flood; events held back in the last period of a
/// flood are not reported (their metric counts them).
pub struct Throttle {
    every: Duration,
    state: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    /// When the last line was written.
    last: Option<Instant>,
    /// Events held back since.
    count: u64,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::default(),
        }
    }

    /// `Some(held_back)` when a line may be written now, with the number of
    /// events held back since the last one; `None` when this one is held
    /// back (and counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut held = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match held.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                held.count = held.count.saturating_add(1);
                None
            }
            _ => {
                held.last = Some(now);
                Some(std::mem::take(&mut held.count))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_writes_one_line_a_period_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(throttle.admit_at(at(0)), Some(0));
        for secs in [0, 1, 9] {
            assert_eq!(throttle.admit_at(at(secs)), None, "{secs}s");
        }
        assert_eq!(throttle.admit_at(at(10)), Some(3));
        assert_eq!(throttle.admit_at(at(15)), None);
        // A quiet spell: the next event is written at once.
        assert_eq!(throttle.admit_at(at(100)), Some(1));
        assert_eq!(throttle.admit_at(at(111)), Some(0));
    }

    #[test]
    fn payload_loggers_never_log_at_trace() {
        for target in ["tungstenite", "tungstenite::protocol", "tokio_tungstenite"] {
            assert!(carries_payload(&Level::TRACE, target), "{target}");
            assert!(!carries_payload(&Level::DEBUG, target), "{target}");
        }
        for target in ["sealpost::ws", "hyper", "tungstenite_like"] {
            assert!(!carries_payload(&Level::TRACE, target), "{target}");
        }
        // The NATS connector shows the URL it dials, password and all, at
        // `debug`: dropped there and below, not above.
        for level in [Level::DEBUG, Level::TRACE] {
            assert!(carries_payload(&level, "async_nats::connector"), "{level}");
        }
        assert!(!carries_payload(&Level::INFO, "async_nats::connector"));
        assert!(!carries_payload(&Level::DEBUG, "async_nats::client"));
    }
}
