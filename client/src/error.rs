//! The one error type of the client: every wire error code of
//! `protocol.md` as its own variant, beside the failures of the transport
//! and of the cryptography.
//!
//! REST replies and WebSocket `error` frames carry the same error object
//! (`code`, `message`, `field`, `missing`, `extra`); `WireError` reads it
//! once and `WireError::into_error` maps it, so a caller matches on the same
//! variant whichever path the request took.

use std::time::Duration;

use serde::Deserialize;

/// The result of every fallible call of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong: a refusal by the server (one variant per wire code), or
/// a failure on the way to it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `invalid`: the request could not be parsed, or `field` fails
    /// validation (`username`, `to`, `ids[3]`, `body`, ...).
    #[error("invalid request{}: {message}", .field.as_deref().map(|f| format!(" ({f})")).unwrap_or_default())]
    Invalid {
        field: Option<String>,
        message: String,
    },
    /// `unauthorized`: wrong credentials, or a session that has ended and
    /// could not be refreshed. Log in again.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// `not_found`: the user, device or message does not exist (or is not
    /// yours to see).
    #[error("not found: {0}")]
    NotFound(String),
    /// `conflict`: the username is taken, the device to remove is the
    /// account's only one, or a send's `client_id` was already used for a
    /// different send.
    #[error("conflict: {0}")]
    Conflict(String),
    /// `too_many_devices`: remove a device before adding another.
    #[error("the account holds as many devices as it may")]
    TooManyDevices,
    /// `devices_changed`: the envelopes did not match the recipient's
    /// devices; nothing was stored. [`Client::send`](crate::Client::send)
    /// handles this itself (fetches the directory again and resends) and
    /// returns it only once its retries are spent. For a send to several
    /// accounts (a group message), `recipients` names the accounts whose
    /// devices differ (`missing` and `extra` are then empty); it is empty
    /// for a send to one.
    #[error("the recipient's devices changed (missing {missing:?}, extra {extra:?})")]
    DevicesChanged {
        missing: Vec<u32>,
        extra: Vec<u32>,
        recipients: Vec<uuid::Uuid>,
    },
    /// `too_large`: a body or request over the server's limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// `forbidden`: refused by policy (a wrong current password, a disabled
    /// account at login: stop retrying and tell the user).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// `rate_limited`: retry after `retry_after`.
    #[error("rate limited; retry in {retry_after:?}")]
    RateLimited { retry_after: Duration },
    /// `queue_full`: a device of the recipient has as many messages queued
    /// as it may; nothing was stored.
    #[error("a recipient device's queue is full")]
    QueueFull,
    /// `too_many_connections`: the WebSocket upgrade was refused.
    #[error("too many connections")]
    TooManyConnections,
    /// `unavailable`: the server cannot serve this now; retry later.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// `internal`: a failure on the server (details are in its log only).
    #[error("internal server error")]
    Internal,
    /// `push_unavailable`: this server has no provider for the push
    /// target's kind (or no Web Push at all, for the VAPID key).
    #[error("push unavailable: {0}")]
    PushUnavailable(String),
    /// An error code this version of the client does not know.
    #[error("server error {code}: {message}")]
    Other { code: String, message: String },

    /// The request did not complete: connection refused, reset, timed out.
    #[error("HTTP transport: {0}")]
    Http(#[from] reqwest::Error),
    /// The WebSocket failed to open or broke.
    #[error("WebSocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// The socket a send was written to dropped before its reply, and the
    /// send could not be carried over (an ephemeral one).
    #[error("the connection was lost before the server answered")]
    ConnectionLost,
    /// The server closed the socket for good: `4409` (a newer exclusive
    /// socket of this device took over) or `4429` (too many sockets for
    /// this device), which a client must not answer by reconnecting, or
    /// `1008`/`1009` (this client sent what it should not).
    #[error("the server closed the socket with {code}: {reason}")]
    Closed { code: u16, reason: String },
    /// An operation that needs a live socket (an ephemeral send) without
    /// one.
    #[error("no WebSocket is connected")]
    NotConnected,
    /// [`Client::connect`](crate::Client::connect) or
    /// [`Client::poll`](crate::Client::poll) was called while a transport is
    /// already running.
    #[error("a transport is already running for this client")]
    AlreadyStarted,
    /// The client was dropped or closed while the call was waiting.
    #[error("the client has shut down")]
    Shutdown,
    /// A key is not a 32-byte X25519 key (ours, or a peer device's: a
    /// client that does not follow the body format of `protocol.md`).
    #[error("unusable key: {0}")]
    Key(String),
    /// Sealing failed, or a reply of the server could not be understood.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl Error {
    /// The stable wire code for the server's refusals, `None` for the
    /// client's own failures.
    pub fn code(&self) -> Option<&str> {
        Some(match self {
            Error::Invalid { .. } => "invalid",
            Error::Unauthorized(_) => "unauthorized",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::TooManyDevices => "too_many_devices",
            Error::DevicesChanged { .. } => "devices_changed",
            Error::TooLarge(_) => "too_large",
            Error::Forbidden(_) => "forbidden",
            Error::RateLimited { .. } => "rate_limited",
            Error::QueueFull => "queue_full",
            Error::TooManyConnections => "too_many_connections",
            Error::Unavailable(_) => "unavailable",
            Error::Internal => "internal",
            Error::PushUnavailable(_) => "push_unavailable",
            Error::Other { code, .. } => code,
            _ => return None,
        })
    }

    /// Whether the same request may succeed later unchanged: the server
    /// was unreachable, busy or failing, not refusing the request itself.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_)
                | Error::Internal
                | Error::Http(_)
                | Error::WebSocket(_)
                | Error::ConnectionLost
                | Error::RateLimited { .. }
                | Error::TooManyConnections
        )
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for Error {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        Error::WebSocket(Box::new(e))
    }
}

/// The `error` object of a REST reply, or the fields of an `error` frame.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct WireError {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub missing: Vec<u32>,
    #[serde(default)]
    pub extra: Vec<u32>,
    /// A multi send's `devices_changed`: one entry per account that differs.
    #[serde(default)]
    pub recipients: Vec<ChangedRecipient>,
    /// How long to wait, on a rate limit's `error` frame (newer servers).
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
}

/// One account of a multi send whose devices differ from the send's.
#[derive(Debug, Deserialize)]
pub(crate) struct ChangedRecipient {
    pub to: uuid::Uuid,
}

/// `{"error": {...}}`, as REST replies carry it.
#[derive(Deserialize)]
pub(crate) struct ErrorBody {
    pub error: WireError,
}

impl WireError {
    /// The typed error. `retry_after` is the REST reply's `Retry-After`;
    /// an `error` frame carries `retry_after_ms` instead, and a server
    /// older than that field says the wait only in its message ("rate
    /// limit exceeded; retry in 120 ms"), read as a last resort.
    pub fn into_error(self, retry_after: Option<Duration>) -> Error {
        match self.code.as_str() {
            "invalid" => Error::Invalid {
                field: self.field,
                message: self.message,
            },
            "unauthorized" => Error::Unauthorized(self.message),
            "not_found" => Error::NotFound(self.message),
            "conflict" => Error::Conflict(self.message),
            "too_many_devices" => Error::TooManyDevices,
            "devices_changed" => Error::DevicesChanged {
                missing: self.missing,
                extra: self.extra,
                recipients: self.recipients.into_iter().map(|r| r.to).collect(),
            },
            "too_large" => Error::TooLarge(self.message),
            "forbidden" => Error::Forbidden(self.message),
            "rate_limited" => Error::RateLimited {
                retry_after: retry_after
                    .or(self.retry_after_ms.map(Duration::from_millis))
                    .or_else(|| millis_in(&self.message))
                    .unwrap_or(Duration::from_secs(1)),
            },
            "queue_full" => Error::QueueFull,
            "too_many_connections" => Error::TooManyConnections,
            "unavailable" => Error::Unavailable(self.message),
            "internal" => Error::Internal,
            "push_unavailable" => Error::PushUnavailable(self.message),
            _ => Error::Other {
                code: self.code,
                message: self.message,
            },
        }
    }
}

/// The number before " ms" in a message, if any.
fn millis_in(message: &str) -> Option<Duration> {
    let end = message.find(" ms")?;
    let digits = message[..end]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()?;
    digits.parse().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(json: &str) -> Error {
        serde_json::from_str::<WireError>(json)
            .unwrap()
            .into_error(None)
    }

    #[test]
    fn maps_every_code() {
        let cases = [
            (
                r#"{"code":"invalid","message":"must be a UUID","field":"to"}"#,
                "invalid",
            ),
            (r#"{"code":"unauthorized","message":"m"}"#, "unauthorized"),
            (r#"{"code":"not_found","message":"m"}"#, "not_found"),
            (r#"{"code":"conflict","message":"m"}"#, "conflict"),
            (
                r#"{"code":"too_many_devices","message":"m"}"#,
                "too_many_devices",
            ),
            (
                r#"{"code":"devices_changed","message":"m","missing":[2],"extra":[5]}"#,
                "devices_changed",
            ),
            (r#"{"code":"too_large","message":"m"}"#, "too_large"),
            (r#"{"code":"forbidden","message":"m"}"#, "forbidden"),
            (r#"{"code":"rate_limited","message":"m"}"#, "rate_limited"),
            (r#"{"code":"queue_full","message":"m"}"#, "queue_full"),
            (
                r#"{"code":"too_many_connections","message":"m"}"#,
                "too_many_connections",
            ),
            (r#"{"code":"unavailable","message":"m"}"#, "unavailable"),
            (r#"{"code":"internal","message":"m"}"#, "internal"),
            (
                r#"{"code":"push_unavailable","message":"m","field":"kind"}"#,
                "push_unavailable",
            ),
            (r#"{"code":"brand_new","message":"m"}"#, "brand_new"),
        ];
        for (json, code) in cases {
            assert_eq!(wire(json).code(), Some(code), "{json}");
        }
        match wire(r#"{"code":"devices_changed","message":"m","missing":[2],"extra":[5]}"#) {
            Error::DevicesChanged { missing, extra, .. } => {
                assert_eq!((missing, extra), (vec![2], vec![5]));
            }
            other => panic!("{other:?}"),
        }
        match wire(r#"{"code":"invalid","message":"must be a UUID","field":"to"}"#) {
            Error::Invalid { field, .. } => assert_eq!(field.as_deref(), Some("to")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            wire(r#"{"code":"push_unavailable","message":"no apns"}"#),
            Error::PushUnavailable(m) if m == "no apns"
        ));
    }

    #[test]
    fn a_rate_limit_frame_says_its_wait_in_the_message() {
        match wire(r#"{"code":"rate_limited","message":"rate limit exceeded; retry in 120 ms"}"#) {
            Error::RateLimited { retry_after } => {
                assert_eq!(retry_after, Duration::from_millis(120))
            }
            other => panic!("{other:?}"),
        }
        // The field, where the server sends it, over the message.
        match wire(
            r#"{"code":"rate_limited","message":"rate limit exceeded; retry in 120 ms","retry_after_ms":450}"#,
        ) {
            Error::RateLimited { retry_after } => {
                assert_eq!(retry_after, Duration::from_millis(450))
            }
            other => panic!("{other:?}"),
        }
        let rest = serde_json::from_str::<WireError>(r#"{"code":"rate_limited","message":"x"}"#)
            .unwrap()
            .into_error(Some(Duration::from_secs(3)));
        assert!(
            matches!(rest, Error::RateLimited { retry_after } if retry_after == Duration::from_secs(3))
        );
    }
}
