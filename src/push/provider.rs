//! The seam between the wake-up scheduler and the push services: one
//! [`Provider`] per kind of target, and the [`Outcome`] of one wake-up,
//! which decides what happens to the target and whether to try again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, StatusCode};

use super::http::{Answer, Outbound, OutboundError};
use super::target::{Kind, Target};

/// How soon the device should wake: Web Push `Urgency`, APNs priority,
/// FCM priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// A message someone wrote: wake at once (Web Push `high`, APNs 10 with
    /// an alert, FCM `HIGH`).
    High,
    /// Receipts, sync copies and the like (`"urgent": false`): Web Push
    /// `low`, APNs 5 with `content-available`, FCM `NORMAL`.
    Low,
}

/// What a push service answered, as it bears on the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted for delivery.
    Sent,
    /// The target no longer exists (404/410, APNs `Unregistered`,
    /// `BadDeviceToken`, `DeviceTokenNotForTopic`, FCM `UNREGISTERED`):
    /// remove it, if it is unchanged since this wake-up was sent.
    Gone,
    /// 429: try again after the service's `Retry-After`, if it gave one.
    Throttled(Option<Duration>),
    /// 5xx, a timeout, a refused or reset connection: retry with backoff.
    /// The text is for the log (never a target, token or URL).
    Transient(String),
    /// 400/401/403 and the like: our configuration's fault (a bad key, a
    /// wrong topic or project), never the device's. Logged and counted; the
    /// target is kept. The text is for the log.
    Config(String),
}

#[async_trait]
pub trait Provider: Send + Sync {
    fn kind(&self) -> Kind;

    /// Sends one content-free wake-up to `target` (always of this
    /// provider's kind) and says what came of it. Bounded in time by the
    /// provider's own timeout; never panics on a service's answer.
    async fn wake(&self, target: &Target, urgency: Urgency) -> Outcome;
}

/// The providers configured, one per kind at most.
#[derive(Clone, Default)]
pub struct Providers {
    pub webpush: Option<Arc<dyn Provider>>,
    pub apns: Option<Arc<dyn Provider>>,
    pub fcm: Option<Arc<dyn Provider>>,
    /// The VAPID public key, base64url of the uncompressed P-256 point
    /// (`GET /v1/push/vapid`), when Web Push is on.
    pub vapid_public_key: Option<String>,
}

impl Providers {
    pub fn get(&self, kind: Kind) -> Option<&Arc<dyn Provider>> {
        match kind {
            Kind::WebPush => self.webpush.as_ref(),
            Kind::Apns => self.apns.as_ref(),
            Kind::Fcm => self.fcm.as_ref(),
        }
    }

    /// Whether any provider is configured: otherwise no wake-up is ever
    /// scheduled.
    pub fn any(&self) -> bool {
        self.webpush.is_some() || self.apns.is_some() || self.fcm.is_some()
    }
}

/// A request that got no answer, as an outcome. The guard refusing a
/// service's URL is the operator's to mend (an `http` URL, or a private
/// host missing from `SEALPOST_PUSH_ALLOW_HOSTS`); a timeout or a refused
/// or reset connection passes. `service` names it in the log line.
pub fn unanswered(service: &str, err: OutboundError) -> Outcome {
    match err {
        OutboundError::Refused(why) => Outcome::Config(format!(
            "{service}: the URL {why} (or its host listed in SEALPOST_PUSH_ALLOW_HOSTS)"
        )),
        other => Outcome::Transient(format!("{service}: {other}")),
    }
}

/// The longest `Retry-After` taken as given: a service asking for more is
/// asked again after this, so that a typo on its side (or a date far
/// ahead) does not silence a device for good.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);

/// A 429's or 503's `Retry-After`, in seconds or as an HTTP date, capped
/// at [`MAX_RETRY_AFTER`]; `None` when absent or unreadable.
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    retry_after_within(headers, MAX_RETRY_AFTER)
}

/// [`retry_after`] with a cap of the caller's; a date already past means
/// now.
pub fn retry_after_within(headers: &http::HeaderMap, cap: Duration) -> Option<Duration> {
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(cap))
}

/// Sends one request to a service that is the operator's to configure
/// (APNs, FCM and its token endpoint) and reads the answer within the
/// provider's timeout; no answer is an [`unanswered`] outcome naming
/// `service`.
pub async fn exchange(
    outbound: &Outbound,
    service: &str,
    request: Request<Bytes>,
) -> Result<Answer, Outcome> {
    outbound
        .send(request)
        .await
        .map_err(|e| unanswered(service, e))
}

/// The rules APNs and FCM share, for an answer their own rules (success,
/// a gone target, a refused credential) did not settle: 429 waits for
/// the service's `Retry-After`, a 5xx is the service's trouble, and any
/// other status (a 4xx, a 3xx: hyper follows no redirect) is ours to fix.
/// `shown` is the log's text for the last two.
pub fn by_status_class(answer: &Answer, shown: impl FnOnce() -> String) -> Outcome {
    match answer.status {
        StatusCode::TOO_MANY_REQUESTS => Outcome::Throttled(retry_after(&answer.headers)),
        s if s.is_server_error() => Outcome::Transient(shown()),
        _ => Outcome::Config(shown()),
    }
}

/// A target of another kind handed to `service`'s provider: the
/// scheduler's bug, never the device's, so the target is kept.
pub fn wrong_kind(service: &str, target: &Target) -> Outcome {
    Outcome::Config(format!(
        "a {} target given to {service}",
        target.kind().as_str()
    ))
}

/// Seconds since the epoch (0 on a clock set before it), for the claims
/// the providers sign and APNs's expiration.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::RETRY_AFTER, value.parse().unwrap());
        headers
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(retry_after(&headers("120")), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(&headers("99999999")), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&http::HeaderMap::new()), None);
        assert_eq!(retry_after(&headers("soon")), None);
        let past = "Sun, 06 Nov 1994 08:49:37 GMT";
        assert_eq!(retry_after(&headers(past)), Some(Duration::ZERO));
        let ahead = (chrono::Utc::now() + chrono::Duration::seconds(90))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        let wait = retry_after(&headers(&ahead)).unwrap();
        assert!(
            wait > Duration::from_secs(80) && wait <= Duration::from_secs(90),
            "{wait:?}"
        );
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(retry_after_within(&headers("9999999"), day), Some(day));
        assert_eq!(
            retry_after_within(&headers("7200"), day),
            Some(Duration::from_secs(7200))
        );
    }

    fn answer(status: u16) -> Answer {
        crate::push::http::fake_answer(status, &[("retry-after", "7")], "")
    }

    #[test]
    fn statuses_no_provider_rule_settled() {
        let shown = || "shown".to_owned();
        assert_eq!(
            by_status_class(&answer(429), shown),
            Outcome::Throttled(Some(Duration::from_secs(7)))
        );
        for status in [500, 502, 503] {
            assert_eq!(
                by_status_class(&answer(status), shown),
                Outcome::Transient("shown".into())
            );
        }
        for status in [302, 400, 401, 403, 404, 413] {
            assert_eq!(
                by_status_class(&answer(status), shown),
                Outcome::Config("shown".into())
            );
        }
    }
}
