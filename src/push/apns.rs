//! Apple Push Notification service (APNs) with token authentication: the
//! team's `.p8` key signs a provider token (an ES256 JWT), which every
//! request carries, over one HTTP/2 connection per APNs host.
//!
//! - The provider token is cached and renewed after [`RENEW_AFTER`]: Apple
//!   refuses one older than an hour (`ExpiredProviderToken`) and one
//!   renewed more often than every 20 minutes
//!   (`TooManyProviderTokenUpdates`).
//! - A target names its environment: tokens of an app built for
//!   development are known to the sandbox host only.
//! - The payload is content-free ([`ALERT`], [`BACKGROUND`]): the app's
//!   notification service extension fetches and decrypts the queue over
//!   REST.
//! - Nothing here logs or returns a device token or the key: an
//!   [`Outcome`]'s text names Apple's `reason` and the setting to check.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use serde::{Deserialize, Serialize};

use super::config::PushConfig;
use super::guard::{AllowHosts, check_static};
use super::http::{Answer, Outbound};
use super::provider::{
    Outcome, Provider, Urgency, by_status_class, exchange, unix_now, wrong_kind,
};
use super::target::{ApnsEnvironment, Kind, Target};
use crate::config::{both_names, not_set};

/// A provider token is renewed when this old: Apple takes one up to an
/// hour old, so 40 minutes leaves 20 for clocks that disagree and for
/// requests in flight.
pub const RENEW_AFTER: Duration = Duration::from_secs(40 * 60);

/// A rejected provider token is renewed at once (then the request tried
/// again), but not twice within this: Apple answers
/// `TooManyProviderTokenUpdates` to a team that renews more often, and a
/// token refused for a wrong key id or team is refused again however new.
pub const MIN_FORCED_RENEWAL: Duration = Duration::from_secs(20 * 60);

/// How long APNs keeps trying an undelivered wake-up (`apns-expiration`),
/// as Web Push's `TTL`: a day; a phone off for longer gets its messages
/// when it comes back anyway.
const EXPIRATION: Duration = Duration::from_secs(24 * 60 * 60);

/// `apns-collapse-id`: constant, so that a wake-up still undelivered is
/// replaced by the next one rather than joined by it (the app shows one
/// "new messages" however many wait).
const COLLAPSE_ID: &str = "sealpost";

/// An urgent wake-up (priority 10): an alert the notification service
/// extension (`mutable-content`) replaces with what it decrypts, shown
/// from a localisable key when it cannot.
pub const ALERT: &str = r#"{"aps":{"alert":{"loc-key":"NEW_MESSAGE"},"mutable-content":1}}"#;

/// A non-urgent wake-up (priority 5): a background push, which iOS
/// delivers when it sees fit, for the app to sync silently.
pub const BACKGROUND: &str = r#"{"aps":{"content-available":1}}"#;

/// The APNs provider for [`super::Providers`], if the settings turn it
/// on; an error for the operator (naming the settings) if they are wrong.
pub fn provider(
    config: &PushConfig,
    allow: Arc<AllowHosts>,
) -> anyhow::Result<Option<Arc<dyn Provider>>> {
    Ok(ApnsProvider::from_config(config, allow)?.map(|p| Arc::new(p) as Arc<dyn Provider>))
}

pub struct ApnsProvider {
    /// HTTP/2 only, as APNs is: one multiplexed connection per host, kept
    /// by the client's pool.
    outbound: Outbound,
    /// Base URLs without a trailing slash.
    production: String,
    sandbox: String,
    tokens: ProviderTokens,
}

impl ApnsProvider {
    /// The provider the settings ask for: `None` when APNs is off (none
    /// of the key file, key id and team id given), an error naming the
    /// settings when only some are or the key does not parse.
    pub fn from_config(
        config: &PushConfig,
        allow: Arc<AllowHosts>,
    ) -> anyhow::Result<Option<Self>> {
        let given = [
            ("SEALPOST_APNS_KEY_FILE", config.apns_key_file.is_some()),
            ("SEALPOST_APNS_KEY_ID", config.apns_key_id.is_some()),
            ("SEALPOST_APNS_TEAM_ID", config.apns_team_id.is_some()),
        ];
        if given.iter().all(|(_, set)| !set) {
            return Ok(None);
        }
        let missing: Vec<String> = given
            .iter()
            .filter(|(_, set)| !set)
            .map(|(env, _)| not_set(env))
            .collect();
        if !missing.is_empty() {
            bail!(
                "APNs needs its key file, key id and team id together: {}",
                missing.join("; ")
            );
        }
        let (Some(path), Some(key_id), Some(team_id)) = (
            &config.apns_key_file,
            &config.apns_key_id,
            &config.apns_team_id,
        ) else {
            unreachable!("all three were checked present")
        };
        let key = read_key(path)?;
        let tokens = ProviderTokens::new(&key, key_id, team_id)?;
        let outbound = Outbound::new(allow.clone(), config.push_timeout, true);
        Ok(Some(Self::new(
            tokens,
            &config.apns_url,
            &config.apns_sandbox_url,
            &allow,
            outbound,
        )?))
    }

    /// `allow`: the service URLs are checked by the guard's rules now, so
    /// that one it would refuse stops the start.
    fn new(
        tokens: ProviderTokens,
        production: &str,
        sandbox: &str,
        allow: &AllowHosts,
        outbound: Outbound,
    ) -> anyhow::Result<Self> {
        let base = |url: &str, env: &str| -> anyhow::Result<String> {
            let trimmed = url.trim_end_matches('/');
            check_static(trimmed, allow).map_err(|why| anyhow!("{} {why}", both_names(env)))?;
            Ok(trimmed.to_owned())
        };
        Ok(Self {
            outbound,
            production: base(production, "SEALPOST_APNS_URL")?,
            sandbox: base(sandbox, "SEALPOST_APNS_SANDBOX_URL")?,
            tokens,
        })
    }

    async fn post(
        &self,
        base: &str,
        device: &str,
        topic: &str,
        urgency: Urgency,
        jwt: &str,
    ) -> Result<Answer, Outcome> {
        let (payload, push_type, priority) = match urgency {
            Urgency::High => (ALERT, "alert", "10"),
            Urgency::Low => (BACKGROUND, "background", "5"),
        };
        let expiration = (unix_now() + EXPIRATION.as_secs()).to_string();
        let topic = HeaderValue::from_str(topic)
            .map_err(|_| Outcome::Config("an APNs target's topic is not a header value".into()))?;
        let authorization = HeaderValue::from_str(&format!("bearer {jwt}"))
            .map_err(|_| Outcome::Config("the APNs provider token is not a header value".into()))?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{base}/3/device/{device}"))
            .header(header::AUTHORIZATION, authorization)
            .header("apns-topic", topic)
            .header("apns-push-type", push_type)
            .header("apns-priority", priority)
            .header("apns-collapse-id", COLLAPSE_ID)
            .header("apns-expiration", expiration)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Bytes::from_static(payload.as_bytes()))
            // Only the device token is not ours, and targets are checked
            // to be hex when registered.
            .map_err(|_| Outcome::Config("an APNs target's token does not fit a URL".into()))?;
        exchange(&self.outbound, "APNs", request).await
    }
}

#[async_trait]
impl Provider for ApnsProvider {
    fn kind(&self) -> Kind {
        Kind::Apns
    }

    async fn wake(&self, target: &Target, urgency: Urgency) -> Outcome {
        let Target::Apns {
            token,
            topic,
            environment,
        } = target
        else {
            return wrong_kind("APNs", target);
        };
        let base = match environment {
            ApnsEnvironment::Production => &self.production,
            ApnsEnvironment::Sandbox => &self.sandbox,
        };
        let jwt = match self.tokens.current(unix_now()) {
            Ok(jwt) => jwt,
            Err(outcome) => return outcome,
        };
        let answer = match self.post(base, token, topic, urgency, &jwt).await {
            Ok(answer) => answer,
            Err(outcome) => return outcome,
        };
        match judge(&answer) {
            Judged::Outcome(outcome) => outcome,
            Judged::TokenRefused(reason) => {
                // Renewed once; a second refusal is the key's, id's or
                // team's fault, which no renewal mends.
                let Some(renewed) = self.tokens.renew_refused(&jwt, unix_now()) else {
                    return refused(&reason);
                };
                let jwt = match renewed {
                    Ok(jwt) => jwt,
                    Err(outcome) => return outcome,
                };
                match self.post(base, token, topic, urgency, &jwt).await {
                    Ok(answer) => match judge(&answer) {
                        Judged::Outcome(outcome) => outcome,
                        Judged::TokenRefused(reason) => refused(&reason),
                    },
                    Err(outcome) => outcome,
                }
            }
        }
    }
}

fn refused(reason: &str) -> Outcome {
    Outcome::Config(format!(
        "APNs refused the provider token ({reason}): check {}, {} and the key in {}",
        both_names("SEALPOST_APNS_KEY_ID"),
        both_names("SEALPOST_APNS_TEAM_ID"),
        both_names("SEALPOST_APNS_KEY_FILE"),
    ))
}

/// What an answer means.
enum Judged {
    Outcome(Outcome),
    /// 403 `InvalidProviderToken` or `ExpiredProviderToken`: renew the
    /// provider token and try once more.
    TokenRefused(String),
}

/// APNs's answer to one request, by its status and the `reason` of its
/// JSON body (Apple's "Handling notification responses from APNs").
fn judge(answer: &Answer) -> Judged {
    let reason = reason(&answer.body);
    let status = answer.status;
    let shown = || {
        format!(
            "APNs answered {} {}",
            status.as_u16(),
            reason.as_deref().unwrap_or("(no reason)")
        )
    };
    let outcome = match (status, reason.as_deref()) {
        (StatusCode::OK, _) => Outcome::Sent,
        // `Unregistered` (the app was removed) and `ExpiredToken`.
        (StatusCode::GONE, _) => Outcome::Gone,
        // The token is not one APNs knows (a sandbox token sent to
        // production, or garbage) or is another app's: the device must
        // register again, so the target goes.
        (
            StatusCode::BAD_REQUEST,
            Some("BadDeviceToken" | "DeviceTokenNotForTopic" | "Unregistered"),
        ) => Outcome::Gone,
        (StatusCode::FORBIDDEN, Some(r @ ("InvalidProviderToken" | "ExpiredProviderToken"))) => {
            return Judged::TokenRefused(r.to_owned());
        }
        // 429 `TooManyRequests` (this device, too often) and
        // `TooManyProviderTokenUpdates` mend with time; 5xx is Apple's;
        // every other 4xx (`BadTopic`, `TopicDisallowed`, `BadCertificate`,
        // `BadPath`, `PayloadTooLarge`...) and anything unexpected: ours.
        _ => by_status_class(answer, shown),
    };
    Judged::Outcome(outcome)
}

/// The `reason` of an APNs error body, if it is one of Apple's words (it
/// reaches the logs, so nothing else is let through).
fn reason(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Body {
        reason: String,
    }
    let reason = serde_json::from_slice::<Body>(body).ok()?.reason;
    (reason.len() <= 64 && reason.bytes().all(|b| b.is_ascii_alphanumeric())).then_some(reason)
}

/// Whether the `.p8` file would start APNs (`sealpost check-config`): read
/// and parsed as start-up does; the error names the file, never the key.
pub fn check_key(path: &Path) -> Result<(), String> {
    read_key(path).map(drop).map_err(|e| format!("{e:#}"))
}

/// The `.p8` file, read and parsed; the error names the file's setting.
fn read_key(path: &Path) -> anyhow::Result<p256::SecretKey> {
    let setting = both_names("SEALPOST_APNS_KEY_FILE");
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the APNs key {}, {setting}", path.display()))?;
    parse_key(&text).with_context(|| format!("the APNs key {}, {setting}", path.display()))
}

/// A PKCS#8 PEM P-256 private key, as Apple issues `.p8` files. Parsed by
/// the RustCrypto crate that signs with it (inside jsonwebtoken) so that a
/// wrong curve or a damaged file stops the start, not the first wake-up.
pub fn parse_key(pem: &str) -> anyhow::Result<p256::SecretKey> {
    // The error's text never quotes the key.
    p256::SecretKey::from_pkcs8_pem(pem.trim())
        .map_err(|_| anyhow!("not a P-256 private key in PKCS#8 PEM (-----BEGIN PRIVATE KEY-----)"))
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

/// The provider token: signed, cached, renewed. Signing is a few tens of
/// microseconds of ES256, so it is done under the lock, which is never
/// held across an `.await`.
struct ProviderTokens {
    key: EncodingKey,
    header: Header,
    team_id: String,
    state: Mutex<TokenState>,
}

#[derive(Default)]
struct TokenState {
    current: Option<Signed>,
    /// When a refused token was last renewed (unix seconds).
    forced_at: Option<u64>,
}

#[derive(Clone)]
struct Signed {
    jwt: Arc<str>,
    iat: u64,
}

impl ProviderTokens {
    /// Checks the key by signing once: what is wrong with it shows at
    /// start-up.
    fn new(key: &p256::SecretKey, key_id: &str, team_id: &str) -> anyhow::Result<Self> {
        for (env, value) in [
            ("SEALPOST_APNS_KEY_ID", key_id),
            ("SEALPOST_APNS_TEAM_ID", team_id),
        ] {
            // Apple's ids are 10 characters of A-Z and 0-9; anything else
            // is a paste gone wrong, and would be refused on every request.
            if value.is_empty()
                || value.len() > 64
                || !value.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                bail!(
                    "{} must be Apple's id (letters and digits)",
                    both_names(env)
                );
            }
        }
        let der = key
            .to_pkcs8_der()
            .map_err(|_| anyhow!("the APNs key cannot be encoded"))?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key_id.to_owned());
        let tokens = Self {
            key: EncodingKey::from_ec_der(der.as_bytes()),
            header,
            team_id: team_id.to_owned(),
            state: Mutex::default(),
        };
        tokens.sign(unix_now()).map_err(|_| {
            anyhow!(
                "the APNs key does not sign ES256, {}",
                both_names("SEALPOST_APNS_KEY_FILE")
            )
        })?;
        Ok(tokens)
    }

    fn sign(&self, iat: u64) -> Result<Signed, jsonwebtoken::errors::Error> {
        let claims = Claims {
            iss: &self.team_id,
            iat,
        };
        let jwt = jsonwebtoken::encode(&self.header, &claims, &self.key)?;
        Ok(Signed {
            jwt: jwt.into(),
            iat,
        })
    }

    /// The token to send at `now` (unix seconds): the cached one unless it
    /// is [`RENEW_AFTER`] old (or from the future: the clock was set back).
    fn current(&self, now: u64) -> Result<Arc<str>, Outcome> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(signed) = &state.current
            && signed.iat <= now
            && now - signed.iat < RENEW_AFTER.as_secs()
        {
            return Ok(signed.jwt.clone());
        }
        let signed = self.sign(now).map_err(signing_failed)?;
        let jwt = signed.jwt.clone();
        state.current = Some(signed);
        Ok(jwt)
    }

    /// After APNs refused `refused`: the token to try once more, or `None`
    /// when it is not worth trying (renewed for a refusal less than
    /// [`MIN_FORCED_RENEWAL`] ago). A request that raced another one's
    /// renewal takes the renewed token without renewing again.
    fn renew_refused(&self, refused: &str, now: u64) -> Option<Result<Arc<str>, Outcome>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(signed) = &state.current
            && &*signed.jwt != refused
        {
            return Some(Ok(signed.jwt.clone()));
        }
        if let Some(at) = state.forced_at
            && now.saturating_sub(at) < MIN_FORCED_RENEWAL.as_secs()
        {
            return None;
        }
        state.forced_at = Some(now);
        Some(match self.sign(now) {
            Ok(signed) => {
                let jwt = signed.jwt.clone();
                state.current = Some(signed);
                Ok(jwt)
            }
            Err(e) => Err(signing_failed(e)),
        })
    }
}

fn signing_failed(e: jsonwebtoken::errors::Error) -> Outcome {
    Outcome::Config(format!("signing the APNs provider token failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> ProviderTokens {
        let key = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        ProviderTokens::new(&key, "KEY1234567", "TEAM123456").unwrap()
    }

    fn iat(jwt: &str) -> u64 {
        let claims = jwt.split('.').nth(1).unwrap();
        let claims =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims)
                .unwrap();
        serde_json::from_slice::<serde_json::Value>(&claims).unwrap()["iat"]
            .as_u64()
            .unwrap()
    }

    #[test]
    fn the_token_is_kept_for_40_minutes_then_renewed() {
        let tokens = tokens();
        let t0 = 1_800_000_000;
        let first = tokens.current(t0).unwrap();
        assert_eq!(iat(&first), t0);
        let later = tokens.current(t0 + RENEW_AFTER.as_secs() - 1).unwrap();
        assert_eq!(later, first, "renewed before 40 minutes");
        let renewed = tokens.current(t0 + RENEW_AFTER.as_secs()).unwrap();
        assert_eq!(iat(&renewed), t0 + RENEW_AFTER.as_secs());
        // A clock set back does not keep a token from the future.
        let back = tokens.current(t0).unwrap();
        assert_eq!(iat(&back), t0);
    }

    #[test]
    fn a_refused_token_is_renewed_once_per_20_minutes() {
        let tokens = tokens();
        let t0 = 1_800_000_000;
        let refused = tokens.current(t0).unwrap();
        let renewed = tokens.renew_refused(&refused, t0 + 5).unwrap().unwrap();
        assert_eq!(iat(&renewed), t0 + 5);
        // A request that was refused the old token meanwhile takes the new
        // one without renewing.
        let raced = tokens.renew_refused(&refused, t0 + 6).unwrap().unwrap();
        assert_eq!(raced, renewed);
        // The new one refused too, within 20 minutes: not renewed again.
        assert!(tokens.renew_refused(&renewed, t0 + 60).is_none());
        let much_later = t0 + 5 + MIN_FORCED_RENEWAL.as_secs();
        let again = tokens.renew_refused(&renewed, much_later).unwrap().unwrap();
        assert_eq!(iat(&again), much_later);
    }

    #[test]
    fn the_key_id_and_team_are_in_the_token() {
        let tokens = tokens();
        let jwt = tokens.current(1_800_000_000).unwrap();
        let header = jsonwebtoken::decode_header(&*jwt).unwrap();
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some("KEY1234567"));
        let claims = jwt.split('.').nth(1).unwrap();
        let claims =
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, claims)
                .unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"iss": "TEAM123456", "iat": 1_800_000_000})
        );
    }

    #[test]
    fn bad_keys_and_ids_are_refused() {
        assert!(parse_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----").is_err());
        assert!(parse_key("").is_err());
        let key = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        assert!(ProviderTokens::new(&key, "", "TEAM123456").is_err());
        assert!(ProviderTokens::new(&key, "KEY1234567", "TEAM 12345").is_err());
        let pem = key.to_pkcs8_pem(Default::default()).unwrap();
        assert!(parse_key(&pem).is_ok());
    }

    fn outcome(status: u16, body: &str) -> Option<Outcome> {
        match judge(&crate::push::http::fake_answer(status, &[], body)) {
            Judged::Outcome(o) => Some(o),
            Judged::TokenRefused(_) => None,
        }
    }

    #[test]
    fn answers_are_judged_by_status_and_reason() {
        assert_eq!(outcome(200, ""), Some(Outcome::Sent));
        assert_eq!(
            outcome(410, r#"{"reason":"Unregistered","timestamp":1}"#),
            Some(Outcome::Gone)
        );
        assert_eq!(
            outcome(400, r#"{"reason":"BadDeviceToken"}"#),
            Some(Outcome::Gone)
        );
        assert_eq!(
            outcome(400, r#"{"reason":"DeviceTokenNotForTopic"}"#),
            Some(Outcome::Gone)
        );
        assert!(matches!(
            outcome(400, r#"{"reason":"BadTopic"}"#),
            Some(Outcome::Config(_))
        ));
        assert!(matches!(outcome(400, "not json"), Some(Outcome::Config(_))));
        assert!(outcome(403, r#"{"reason":"ExpiredProviderToken"}"#).is_none());
        assert!(outcome(403, r#"{"reason":"InvalidProviderToken"}"#).is_none());
        assert!(matches!(
            outcome(403, r#"{"reason":"BadCertificate"}"#),
            Some(Outcome::Config(_))
        ));
        assert_eq!(
            outcome(429, r#"{"reason":"TooManyRequests"}"#),
            Some(Outcome::Throttled(None))
        );
        assert!(matches!(
            outcome(500, r#"{"reason":"InternalServerError"}"#),
            Some(Outcome::Transient(_))
        ));
        assert!(matches!(
            outcome(503, r#"{"reason":"ServiceUnavailable"}"#),
            Some(Outcome::Transient(_))
        ));
        assert!(matches!(outcome(302, ""), Some(Outcome::Config(_))));
    }

    #[test]
    fn only_apples_words_reach_the_log() {
        assert_eq!(
            reason(br#"{"reason":"BadTopic"}"#).as_deref(),
            Some("BadTopic")
        );
        assert_eq!(reason(br#"{"reason":"a token: 0123abcd..."}"#), None);
        assert_eq!(reason(b"<html>"), None);
    }
}
