//! The one error type of the service and its mapping to wire codes.
//!
//! Every failure a client can see is an [`Error`]; its [`Error::code`] is the
//! stable `code` of `protocol.md` and its status the HTTP status. Internal
//! errors are logged here with their cause and reach the client only as
//! `internal` with a generic message: no SQL, stack or secret leaves the
//! process.

use std::borrow::Cow;
use std::time::Duration;

use axum::extract::rejection::{
    BytesRejection, FormRejection, JsonRejection, PathRejection, QueryRejection,
};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;
use uuid::Uuid;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every code [`Error::code`] can return: the finite set a metric may use
/// as label values.
pub const CODES: [&str; 15] = [
    "invalid",
    "unauthorized",
    "not_found",
    "forbidden",
    "conflict",
    "too_many_devices",
    "devices_changed",
    "rate_limited",
    "queue_full",
    "too_many_connections",
    "too_large",
    "request_timeout",
    "unavailable",
    "push_unavailable",
    "internal",
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (400), or a named field fails validation (422).
    #[error("{message}")]
    Invalid {
        field: Option<Cow<'static, str>>,
        message: Cow<'static, str>,
    },
    /// The body is not in a media type the endpoint takes.
    #[error("{0}")]
    UnsupportedMediaType(Cow<'static, str>),
    /// Missing, malformed, expired or revoked credentials.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The named thing does not exist, or is not the caller's to see.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// Authenticated, but not allowed: e.g. a wrong current password, or a
    /// browser origin not on the allowlist.
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    Conflict(&'static str),
    /// The account holds as many devices as it may.
    #[error("this account has as many devices as it may; remove one first")]
    TooManyDevices,
    /// A send's envelopes do not match the recipient's current devices:
    /// nothing was stored. The sender refreshes its directory and retries.
    #[error("the recipient's devices have changed; fetch them and send again")]
    DevicesChanged {
        /// Devices with no envelope, in ascending order.
        missing: Vec<u32>,
        /// Envelopes for devices that are not (or no longer) there.
        extra: Vec<u32>,
    },
    /// A multi-recipient send's entries do not match the current devices
    /// of these recipients (and only these): nothing was stored.
    #[error("the devices of {} of the recipients have changed; fetch them and send again", .0.len())]
    RecipientsChanged(Vec<Mismatch>),
    /// A multi-recipient send names accounts that do not exist: nothing
    /// was stored.
    #[error("no such recipient: {}", .0.iter().map(Uuid::to_string).collect::<Vec<_>>().join(", "))]
    UnknownRecipients(Vec<Uuid>),
    #[error("{0}")]
    TooLarge(Cow<'static, str>),
    /// Over a rate limit; retry after the given time.
    #[error("rate limit exceeded; retry in {} ms", retry_after.as_millis())]
    RateLimited { retry_after: Duration },
    /// The recipient's queue holds as many messages as it may.
    #[error("the recipient's queue is full; retry later")]
    QueueFull,
    /// A connection cap (per user, per IP, unauthenticated sockets).
    #[error("{0}")]
    TooManyConnections(&'static str),
    /// The request body did not arrive in time
    /// (`SEALPOST_BODY_READ_TIMEOUT`); the connection is closed after the
    /// answer.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// A dependency (the database) is not reachable right now, did not
    /// answer within its deadline, or has no room (a full disk). A write
    /// answered so may still have been stored.
    #[error("service unavailable")]
    Unavailable,
    /// The server has no provider of this kind of push target configured:
    /// 422 naming the field when a target of it is registered, 404 when
    /// its key is asked for (`GET /v1/push/vapid`).
    #[error("this server has no {} provider configured", kind.as_str())]
    PushUnavailable {
        kind: crate::push::target::Kind,
        field: Option<&'static str>,
    },
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    /// A validation failure of one request field (422).
    pub fn field(field: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Error::Invalid {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// A request that cannot be parsed at all (400).
    pub fn malformed(message: impl Into<Cow<'static, str>>) -> Self {
        Error::Invalid {
            field: None,
            message: message.into(),
        }
    }

    /// The stable machine-readable code of `protocol.md`, one of [`CODES`].
    pub fn code(&self) -> &'static str {
        match self {
            Error::Invalid { .. } | Error::UnsupportedMediaType(_) => "invalid",
            Error::Unauthorized(_) => "unauthorized",
            Error::NotFound(_) => "not_found",
            Error::Forbidden(_) => "forbidden",
            Error::Conflict(_) => "conflict",
            Error::TooManyDevices => "too_many_devices",
            Error::DevicesChanged { .. } | Error::RecipientsChanged(_) => "devices_changed",
            Error::UnknownRecipients(_) => "not_found",
            Error::RateLimited { .. } => "rate_limited",
            Error::QueueFull => "queue_full",
            Error::TooManyConnections(_) => "too_many_connections",
            Error::TooLarge(_) => "too_large",
            Error::RequestTimeout => "request_timeout",
            Error::Unavailable => "unavailable",
            Error::PushUnavailable { .. } => "push_unavailable",
            Error::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::Invalid { field: Some(_), .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Invalid { field: None, .. } => StatusCode::BAD_REQUEST,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) | Error::UnknownRecipients(_) => StatusCode::NOT_FOUND,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Conflict(_)
            | Error::TooManyDevices
            | Error::DevicesChanged { .. }
            | Error::RecipientsChanged(_) => StatusCode::CONFLICT,
            Error::RateLimited { .. } | Error::QueueFull | Error::TooManyConnections(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Error::PushUnavailable { field: Some(_), .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Error::PushUnavailable { field: None, .. } => StatusCode::NOT_FOUND,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// How long a client should wait before it tries again, for the
    /// errors that are about "not now": REST sends it as `Retry-After`
    /// (whole seconds, rounded up), a socket's `error` frame as
    /// `retry_after_ms`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after } => Some(*retry_after),
            Error::QueueFull => Some(QUEUE_FULL_RETRY),
            Error::TooManyConnections(_) => Some(CONNECTIONS_RETRY),
            Error::Unavailable => Some(UNAVAILABLE_RETRY),
            _ => None,
        }
    }

    /// The message a client may see. Internal causes stay in the log.
    pub fn public_message(&self) -> Cow<'static, str> {
        match self {
            Error::Internal(_) => "internal server error".into(),
            other => other.to_string().into(),
        }
    }

    fn field_name(&self) -> Option<Cow<'static, str>> {
        match self {
            Error::Invalid { field, .. } => field.clone(),
            Error::PushUnavailable { field, .. } => field.map(Cow::Borrowed),
            _ => None,
        }
    }

    /// What the error body carries beside its code and message, on REST and
    /// on the socket alike.
    pub fn detail(&self) -> ErrorDetail {
        let (missing, extra) = match self {
            Error::DevicesChanged { missing, extra } => {
                (Some(missing.clone()), Some(extra.clone()))
            }
            _ => (None, None),
        };
        ErrorDetail {
            code: self.code(),
            message: self.public_message(),
            field: self.field_name(),
            missing,
            extra,
            recipients: match self {
                Error::RecipientsChanged(recipients) => Some(recipients.clone()),
                _ => None,
            },
            unknown: match self {
                Error::UnknownRecipients(unknown) => Some(unknown.clone()),
                _ => None,
            },
        }
    }
}

/// When to retry after `queue_full`. A queue drains only as its device
/// comes online and acks, which no one can predict: 10 s keeps a sender
/// from hammering a full queue while a device that reconnects is caught
/// within a breath of a chat's pace.
pub const QUEUE_FULL_RETRY: Duration = Duration::from_secs(10);

/// When to retry a WebSocket upgrade refused with `too_many_connections`:
/// a slot for an unauthenticated socket turns over within a round trip
/// (at most `SEALPOST_WS_AUTH_TIMEOUT`), so a second is worth a try; a
/// client refused again backs off.
pub const CONNECTIONS_RETRY: Duration = Duration::from_secs(1);

/// When to retry after `unavailable`. Most causes pass within a second (a
/// deadlock's victim, a failover); a client that backs off from there
/// loses little.
pub const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

/// The JSON body of every error: `{"error": {"code", "message", "field"?}}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable; program against it: `invalid`, `unauthorized`, `not_found`,
    /// `conflict`, `too_many_devices`, `devices_changed`, `too_large`,
    /// `forbidden`, `rate_limited`, `queue_full`, `too_many_connections`,
    /// `request_timeout`, `unavailable`, `push_unavailable`, `internal`.
    pub code: &'static str,
    /// For humans; may change.
    #[schema(value_type = String)]
    pub message: Cow<'static, str>,
    /// The request field at fault, with `invalid` (422) and
    /// `push_unavailable` (422).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub field: Option<Cow<'static, str>>,
    /// With `devices_changed`: the recipient's devices the send missed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub missing: Option<Vec<u32>>,
    /// With `devices_changed`: envelopes for devices that are not there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<Vec<u32>>,
    /// With `devices_changed` to a multi-recipient send: each recipient
    /// whose devices differ from the send's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Vec<Mismatch>>,
    /// With `not_found` to a multi-recipient send: the recipients that are
    /// no account.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<Vec<Uuid>>,
}

/// One recipient of a multi-recipient send whose devices differ from the
/// send's entry for it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Mismatch {
    pub to: Uuid,
    /// Its devices with no envelope or key, ascending.
    pub missing: Vec<u32>,
    /// Envelopes or keys for devices it does not have, ascending.
    pub extra: Vec<u32>,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        if let Error::Internal(cause) = &self {
            // `{:#}` prints the whole context chain on one line.
            tracing::error!(error = format!("{cause:#}"), "internal error");
        }
        let body = ErrorBody {
            error: self.detail(),
        };
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Error::Unauthorized(_) = self {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // Every 429 and 503 says when to come back, never sooner than a
        // second: `Retry-After: 0` would invite a client to spin.
        if let Some(wait) = self.retry_after() {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(wait).max(1)),
            );
        }
        response
    }
}

/// `Retry-After` counts whole seconds: round up, so that a client that
/// waits as told is not refused again.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

impl From<StoreError> for Error {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::UsernameTaken => Error::Conflict("username is taken"),
            err if err.is_unavailable() => Error::Unavailable,
            other => Error::Internal(other.into()),
        }
    }
}

impl From<JsonRejection> for Error {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => json_data_error(&e),
            JsonRejection::JsonSyntaxError(_) => Error::malformed("request body is not valid JSON"),
            JsonRejection::MissingJsonContentType(_) => {
                Error::UnsupportedMediaType("expected Content-Type: application/json".into())
            }
            other => body_rejection(other.status(), other.body_text()),
        }
    }
}

impl From<BytesRejection> for Error {
    fn from(rejection: BytesRejection) -> Self {
        body_rejection(rejection.status(), rejection.body_text())
    }
}

impl From<FormRejection> for Error {
    fn from(rejection: FormRejection) -> Self {
        match rejection {
            FormRejection::FailedToDeserializeForm(_)
            | FormRejection::FailedToDeserializeFormBody(_) => {
                Error::field("body", rejection.body_text())
            }
            other => body_rejection(other.status(), other.body_text()),
        }
    }
}

/// A body that is JSON but not of the expected shape: 422 naming the field.
fn json_data_error(e: &axum::extract::rejection::JsonDataError) -> Error {
    type PathError = serde_path_to_error::Error<serde_json::Error>;
    // The path error sits a level or two down the rejection's source chain.
    let mut source = std::error::Error::source(e);
    let mut found = None;
    while let Some(err) = source {
        if let Some(path_error) = err.downcast_ref::<PathError>() {
            found = Some(path_error);
            break;
        }
        source = err.source();
    }
    let Some(inner) = found else {
        return Error::field("body", e.body_text());
    };
    let message = inner.inner().to_string();
    let path = inner.path().to_string();
    // serde reports a missing field at its parent's path, naming it in the
    // message: "missing field `username` at line 1 column 20".
    let field = match message
        .strip_prefix("missing field `")
        .and_then(|m| m.split_once('`'))
    {
        Some((name, _)) if path == "." => name.to_owned(),
        Some((name, _)) => format!("{path}.{name}"),
        None if path == "." => "body".to_owned(),
        None => path.clone(),
    };
    let message = if path == "." {
        message
    } else {
        format!("{path}: {message}")
    };
    Error::Invalid {
        field: Some(field.into()),
        message: message.into(),
    }
}

/// Rejections while reading the body: too large, unreadable, wrong type.
fn body_rejection(status: StatusCode, text: String) -> Error {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => Error::TooLarge("request body is too large".into()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Error::UnsupportedMediaType(text.into()),
        _ => Error::malformed(text),
    }
}

impl From<QueryRejection> for Error {
    fn from(rejection: QueryRejection) -> Self {
        Error::malformed(rejection.body_text())
    }
}

impl From<PathRejection> for Error {
    fn from(rejection: PathRejection) -> Self {
        Error::malformed(rejection.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed() {
        let errors = [
            Error::malformed("x"),
            Error::UnsupportedMediaType("x".into()),
            Error::Unauthorized("x"),
            Error::NotFound("x"),
            Error::Forbidden("x"),
            Error::Conflict("x"),
            Error::TooManyDevices,
            Error::DevicesChanged {
                missing: vec![1],
                extra: vec![],
            },
            Error::TooLarge("x".into()),
            Error::RequestTimeout,
            Error::RateLimited {
                retry_after: Duration::ZERO,
            },
            Error::QueueFull,
            Error::TooManyConnections("x"),
            Error::Unavailable,
            Error::PushUnavailable {
                kind: crate::push::target::Kind::Apns,
                field: Some("kind"),
            },
            Error::Internal(anyhow::anyhow!("x")),
        ];
        for err in &errors {
            assert!(
                CODES.contains(&err.code()),
                "{} is not in CODES",
                err.code()
            );
        }
        let used: std::collections::HashSet<_> = errors.iter().map(Error::code).collect();
        assert_eq!(used.len(), CODES.len(), "CODES lists a code no error has");
    }

    /// Every 429 and every 503 carries `Retry-After`, of at least a second.
    #[test]
    fn every_429_and_503_says_when_to_retry() {
        let errors = [
            Error::RateLimited {
                retry_after: Duration::ZERO,
            },
            Error::RateLimited {
                retry_after: Duration::from_millis(1500),
            },
            Error::QueueFull,
            Error::TooManyConnections("x"),
            Error::Unavailable,
        ];
        for err in errors {
            let status = err.status();
            assert!(
                matches!(status.as_u16(), 429 | 503),
                "{} is {status}",
                err.code()
            );
            let response = err.into_response();
            let after: u64 = response.headers()[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(after >= 1, "Retry-After: {after}");
        }
        let limited = Error::RateLimited {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(limited.into_response().headers()[header::RETRY_AFTER], "2");
    }
}
