//! Wake-ups: telling an offline device, through its platform's push
//! service, that messages wait for it. The push carries nothing (no sender,
//! id, count or body); the device wakes, reads its queue over REST and
//! shows what it decrypts.
//!
//! - [`target`]: a device's push target (Web Push subscription, APNs or FCM
//!   token), its validation (the SSRF guard on client-chosen URLs) and the
//!   sealed form it is stored in.
//! - [`targets`]: which devices have a target, cached per account, so that
//!   neither a send nor a connect asks the database.
//! - [`provider`]: the [`provider::Provider`] seam, one implementation per
//!   push service, and what a service's answer means for the target.
//! - [`http`]: the outbound HTTP client every provider sends through:
//!   timeouts, no redirects, a cap on what is read back, and the resolved
//!   address checked against the SSRF guard.
//! - [`webpush`], [`vapid`]: RFC 8030/8291/8292 (browsers, UnifiedPush,
//!   FCM's Web Push endpoint).
//! - [`apns`], [`fcm`]: Apple's and Google's native services.
//! - [`scheduler`]: when a device is woken: the post-commit listener, the
//!   presence check, the pending wake-ups in the database (one per device,
//!   durable, taken by any node), coalescing and cool-downs, retries.

pub mod apns;
pub mod config;
pub mod fcm;
pub mod guard;
pub mod http;
pub mod provider;
pub mod scheduler;
pub mod target;
pub mod targets;
pub mod vapid;
pub mod webpush;

use std::sync::Arc;

use anyhow::anyhow;

pub use provider::Providers;

use crate::Config;

/// The providers `config` turns on, each with its own outbound client (so
/// that one service's slow connections never hold up another's), and the
/// VAPID public key. Fails, naming the setting, when a provider's settings
/// are wrong: better at start-up than at the first wake-up.
pub fn build_providers(
    config: &Config,
    allow: Arc<guard::AllowHosts>,
) -> anyhow::Result<Providers> {
    let push = &config.push;
    let mut providers = Providers::default();

    // Web Push: on whenever SEALPOST_VAPID_SUBJECT is set.
    if let Some(subject) = &push.vapid_subject {
        vapid::check_subject(subject).map_err(|e| {
            anyhow!(
                "{}: {e}",
                crate::config::both_names("SEALPOST_VAPID_SUBJECT")
            )
        })?;
        let key = vapid::resolve(push, config.database_url())?;
        // Push services speak HTTP/2 or 1.1 over TLS (ALPN decides).
        let outbound = Arc::new(http::Outbound::new(allow.clone(), push.push_timeout, false));
        let provider =
            webpush::WebPushProvider::new(vapid::Vapid::new(key, subject.clone()), outbound);
        providers.vapid_public_key = Some(provider.public_key().to_owned());
        providers.webpush = Some(Arc::new(provider));
    }

    // APNs: on when the key file, key id and team id are set.
    if let Some(apns) = apns::ApnsProvider::from_config(push, allow.clone())? {
        providers.apns = Some(Arc::new(apns));
    }

    // FCM: on when the credentials file is set.
    if let Some(fcm) = fcm::FcmProvider::from_config(push, allow)? {
        providers.fcm = Some(Arc::new(fcm));
    }

    Ok(providers)
}
