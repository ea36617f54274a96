//! Request bodies: how large each route's may be, and how long it may take
//! to arrive.
//!
//! Every extractor that reads a body ([`super::ApiJson`], the login form)
//! first [`check`]s the limit a route set with [`limit`] against the
//! declared `Content-Length`, before it reads a byte (an oversized request
//! is answered 413 at once); axum enforces the limit again while reading a
//! body that declares none (chunked); and it reads [`within`] the deadline
//! `SEALPOST_BODY_READ_TIMEOUT`: a client that stalls inside its body is
//! answered 408 and closed on, instead of holding its buffered part for as
//! long as it likes. (tower-http's `RequestBodyTimeoutLayer` times each
//! chunk, not the body: a byte every few seconds would pass.)
//!
//! Only a send carries a large body; every other route takes a few KiB, so
//! a client that needs no account cannot make the server buffer more than
//! [`SMALL`] per connection.

use std::future::Future;
use std::time::Duration;

use axum::Extension;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderMap;
use axum::http::header::CONTENT_LENGTH;

use crate::error::{Error, Result};

/// The body limit of every route that does not set its own. The largest
/// such body is a sign-up: a 2732-character base64 key (2048 bytes), a
/// 32-character username and a 1024-character password, which a client
/// that escapes all non-ASCII (Python's `json.dumps` does by default) may
/// write as 12 bytes a character (`\ud83d\ude00`): about 15 KiB in all.
/// A login, a refresh or a device (a key and a 64-character name) is less.
pub const SMALL: usize = 16 * 1024;

/// The limit of the two routes that carry more than one of those fields:
/// an ack of a whole page (500 ids of 39 bytes each with quotes and comma,
/// 19.5 KB, more if pretty-printed) and a password change (two passwords,
/// up to 24 KiB escaped as above).
pub const LIST: usize = 32 * 1024;

/// The largest body a route reads, as its handler's `ApiJson` sees it.
#[derive(Clone, Copy, Debug)]
pub struct Limit(pub usize);

/// The layer that sets a route's body limit to `bytes`: for [`check`] and
/// for axum's cap on the bytes read. A layer nearer the handler overrides
/// one further out.
pub fn limit(bytes: usize) -> (Extension<Limit>, DefaultBodyLimit) {
    (Extension(Limit(bytes)), DefaultBodyLimit::max(bytes))
}

/// Refuses a request whose declared body is over its route's limit, before
/// any of it is read: a client announcing megabytes to a login is answered
/// at once, not after the server has buffered up to the limit.
/// (tower-http's `RequestBodyLimitLayer` does this too, but answers in
/// plain text, and its body type does not fit a route's.)
pub fn check(req: &Request) -> Result<()> {
    let limit = req.extensions().get::<Limit>().map_or(SMALL, |l| l.0);
    check_declared(req.headers(), limit)
}

/// Runs `read`, an extractor reading the body, under the body deadline.
pub async fn within<T, E: Into<Error>>(
    deadline: Duration,
    read: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(deadline, read).await {
        Ok(read) => read.map_err(Into::into),
        Err(_) => Err(Error::RequestTimeout),
    }
}

/// An unparsable length never gets here: hyper refuses it with 400.
fn check_declared(headers: &HeaderMap, limit: usize) -> Result<()> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => Err(Error::TooLarge(
            format!("request body is too large: this route takes at most {limit} bytes").into(),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_length_over_the_limit_is_refused() {
        let with = |length: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_LENGTH, length.parse().unwrap());
            check_declared(&headers, SMALL)
        };
        assert!(with(&SMALL.to_string()).is_ok());
        assert!(matches!(
            with(&(SMALL + 1).to_string()),
            Err(Error::TooLarge(_))
        ));
        // No length (chunked): left to the cap on the bytes read.
        assert!(check_declared(&HeaderMap::new(), SMALL).is_ok());
    }
}
