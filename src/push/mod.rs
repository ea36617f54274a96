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

pub mod config;
pub mod guard;
pub mod http;
pub mod provider;
pub mod scheduler;
pub mod target;
pub mod targets;
