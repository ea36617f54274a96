//! The seam between the wake-up scheduler and the push services: one
//! [`Provider`] per kind of target, and the [`Outcome`] of one wake-up,
//! which decides what happens to the target and whether to try again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

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
pub fn unanswered(service: &str, err: super::http::OutboundError) -> Outcome {
    match err {
        super::http::OutboundError::Refused(why) => Outcome::Config(format!(
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
    Some(wait.min(MAX_RETRY_AFTER))
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
    }
}
