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
