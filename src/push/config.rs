//! The push settings (`#[command(flatten)]` into [`crate::Config`]): the
//! providers' credentials and endpoints, the SSRF allow-list and the
//! wake-up timing. A provider is on when its credentials are given.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::config::Secret;

#[derive(Args, Clone, Debug)]
pub struct PushConfig {
    /// Contact for push services (VAPID `sub`): a `mailto:` or `https:` URI.
    /// Web Push is on whenever this is set.
    #[arg(long, env = "SEALPOST_VAPID_SUBJECT")]
    pub vapid_subject: Option<String>,

    /// VAPID private key, a P-256 key as PKCS#8 PEM. With SQLite and no key,
    /// one is generated and kept beside the database file; required with
    /// PostgreSQL when Web Push is on.
    #[arg(long, env = "SEALPOST_VAPID_KEY", hide_env_values = true, value_parser = secret,
          allow_hyphen_values = true)]
    pub vapid_key: Option<Secret>,

    /// File holding the VAPID private key, in place of `SEALPOST_VAPID_KEY`.
    #[arg(
        long,
        env = "SEALPOST_VAPID_KEY_FILE",
        value_name = "PATH",
        conflicts_with = "vapid_key"
    )]
    pub vapid_key_file: Option<PathBuf>,

    /// APNs token-authentication key (`AuthKey_XXXXXXXXXX.p8`). APNs is on
    /// when this, the key id and the team id are set.
    #[arg(long, env = "SEALPOST_APNS_KEY_FILE", value_name = "PATH")]
    pub apns_key_file: Option<PathBuf>,

    /// The APNs key's id (10 characters).
    #[arg(long, env = "SEALPOST_APNS_KEY_ID")]
    pub apns_key_id: Option<String>,

    /// The Apple developer team id (10 characters).
    #[arg(long, env = "SEALPOST_APNS_TEAM_ID")]
    pub apns_team_id: Option<String>,

    /// APNs service for `"environment": "production"` targets.
    #[arg(
        long,
        env = "SEALPOST_APNS_URL",
        default_value = "https://api.push.apple.com"
    )]
    pub apns_url: String,

    /// APNs service for `"environment": "sandbox"` targets.
    #[arg(
        long,
        env = "SEALPOST_APNS_SANDBOX_URL",
        default_value = "https://api.sandbox.push.apple.com"
    )]
    pub apns_sandbox_url: String,

    /// FCM service-account JSON (its `project_id`, `client_email`,
    /// `private_key` and `token_uri` are used). FCM is on when this is set.
    #[arg(long, env = "SEALPOST_FCM_CREDENTIALS_FILE", value_name = "PATH")]
    pub fcm_credentials_file: Option<PathBuf>,

    /// FCM HTTP v1 service.
    #[arg(
        long,
        env = "SEALPOST_FCM_URL",
        default_value = "https://fcm.googleapis.com"
    )]
    pub fcm_url: String,

    /// Hosts (`host` or `host:port`, comma-separated) a push request may go
    /// to even when they are private or loopback addresses or use plain
    /// `http`: for tests and for a push service of your own.
    #[arg(long, env = "SEALPOST_PUSH_ALLOW_HOSTS", value_delimiter = ',')]
    pub push_allow_hosts: Vec<String>,

    /// The most one request to a push service may take, connecting
    /// included.
    #[arg(long, env = "SEALPOST_PUSH_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub push_timeout: Duration,

    /// Requests in flight at once to one push service host (a Web Push
    /// service; APNs and FCM are one host each); as many again may wait
    /// their turn, and the rest are put back a second. Bounds what a host
    /// that hangs holds of the node's 256 concurrent sends.
    #[arg(long, env = "SEALPOST_PUSH_HOST_CONCURRENCY", default_value_t = 32,
        value_parser = clap::value_parser!(u16).range(1..=64))]
    pub push_host_concurrency: u16,

    /// How long after a socket closes with messages unacknowledged its
    /// device is woken, unless it comes back first.
    #[arg(long, env = "SEALPOST_WAKEUP_AFTER_CLOSE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub wakeup_after_close: Duration,

    /// After a wake-up is sent, none again for that device until it shows
    /// up or this passes.
    #[arg(long, env = "SEALPOST_WAKEUP_COOLDOWN", default_value = "30s", value_parser = humantime::parse_duration)]
    pub wakeup_cooldown: Duration,

    /// Non-urgent sends (`"urgent": false`) wake a device at most once per
    /// this interval.
    #[arg(long, env = "SEALPOST_WAKEUP_QUIET_INTERVAL", default_value = "20m", value_parser = humantime::parse_duration)]
    pub wakeup_quiet_interval: Duration,
}

/// Any text, kept as a [`Secret`] so that it never prints; checked when the
/// provider is built.
fn secret(value: &str) -> Result<Secret, String> {
    Ok(Secret::new(value.to_owned()))
}
