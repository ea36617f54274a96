//! Firebase Cloud Messaging, HTTP v1 API: a data-only message per
//! wake-up, authorised by an OAuth 2.0 access token that the service
//! account's key obtains (RFC 7523: an RS256 JWT assertion posted to the
//! account's `token_uri`).
//!
//! - The access token is cached until [`REFRESH_MARGIN`] before it
//!   expires; one refresh at a time, the others waiting for it (a burst of
//!   wake-ups at start-up asks Google once, not once each).
//! - A 401 drops the cached token (it was revoked, or the clocks disagree)
//!   and the message is tried once more with a new one.
//! - The message is data-only (`{"type": "wake"}`), so that Android hands
//!   it to the app, which fetches and decrypts over REST and shows what it
//!   finds; Android's `collapse_key` keeps one undelivered wake-up per
//!   device.
//! - Nothing here logs or returns a registration token, an access token
//!   or the key: an [`Outcome`]'s text names Google's status and error
//!   code and the setting to check.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, header};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::config::PushConfig;
use super::guard::{AllowHosts, check_static};
use super::http::{Answer, Outbound};
use super::provider::{
    Outcome, Provider, Urgency, by_status_class, exchange, retry_after, unix_now, wrong_kind,
};
use super::target::{Kind, Target};
use crate::config::both_names;

/// The one scope FCM's send needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// RFC 7523's grant type, form-encoded.
const GRANT_TYPE: &str = "urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer";

/// An assertion's lifetime: Google takes at most an hour.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(60 * 60);

/// An access token is renewed this long before it expires (Google's last
/// an hour), so that none expires in flight; half its lifetime when that
/// is shorter.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

/// `android.ttl`, as Web Push's `TTL`: a day.
const TTL: &str = "86400s";

/// `android.collapse_key`: constant, so that an undelivered wake-up is
/// replaced by the next one.
const COLLAPSE_KEY: &str = "sealpost";

/// The FCM provider for [`super::Providers`], if the settings turn it
/// on; an error for the operator (naming the settings) if they are wrong.
pub fn provider(
    config: &PushConfig,
    allow: Arc<AllowHosts>,
) -> anyhow::Result<Option<Arc<dyn Provider>>> {
    Ok(FcmProvider::from_config(config, allow)?.map(|p| Arc::new(p) as Arc<dyn Provider>))
}

pub struct FcmProvider {
    outbound: Outbound,
    /// `{SEALPOST_FCM_URL}/v1/projects/{project_id}/messages:send`.
    send_url: String,
    account: ServiceAccount,
    /// The access token and when to stop using it. A std mutex, held for
    /// a copy only, never across an `.await`.
    token: Mutex<Option<AccessToken>>,
    /// One permit: one token request in flight. A caller that finds no
    /// usable token waits for the permit, then looks again before asking.
    refreshing: Semaphore,
}

/// The parts of a service-account JSON that are used.
struct ServiceAccount {
    client_email: String,
    token_uri: String,
    key: EncodingKey,
    /// `private_key_id`: the JWT's `kid`, when the file has it, so that
    /// Google need not try each of the account's keys.
    key_id: Option<String>,
}

#[derive(Clone)]
struct AccessToken {
    /// `Bearer ...`, ready for the header.
    header: HeaderValue,
    renew_at: Instant,
}

impl FcmProvider {
    /// The provider the settings ask for: `None` when FCM is off (no
    /// credentials file), an error naming the setting when the file cannot
    /// be read, lacks a field or holds a key that does not parse.
    pub fn from_config(
        config: &PushConfig,
        allow: Arc<AllowHosts>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(path) = &config.fcm_credentials_file else {
            return Ok(None);
        };
        let (project_id, account) = read_credentials(path)?;
        check_static(&account.token_uri, &allow).map_err(|why| {
            anyhow!(
                "the token_uri of the FCM service-account file, {}, {why}",
                both_names("SEALPOST_FCM_CREDENTIALS_FILE")
            )
        })?;
        let base = config.fcm_url.trim_end_matches('/');
        check_static(base, &allow)
            .map_err(|why| anyhow!("{} {why}", both_names("SEALPOST_FCM_URL")))?;
        Ok(Some(Self {
            outbound: Outbound::new(allow, config.push_timeout, false),
            send_url: format!("{base}/v1/projects/{project_id}/messages:send"),
            account,
            token: Mutex::new(None),
            refreshing: Semaphore::new(1),
        }))
    }

    fn cached(&self) -> Option<HeaderValue> {
        let token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        token
            .as_ref()
            .filter(|t| Instant::now() < t.renew_at)
            .map(|t| t.header.clone())
    }

    /// Forgets `used` if it is still the cached token (a 401 says it is no
    /// good), leaving a newer one another request fetched meanwhile.
    fn forget(&self, used: &HeaderValue) {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if token.as_ref().is_some_and(|t| t.header == *used) {
            *token = None;
        }
    }

    /// A usable access token: the cached one, or a new one.
    async fn access_token(&self) -> Result<HeaderValue, Outcome> {
        if let Some(header) = self.cached() {
            return Ok(header);
        }
        let _permit = self
            .refreshing
            .acquire()
            .await
            .map_err(|_| Outcome::Transient("FCM: shutting down".into()))?;
        // Another caller may have refreshed while this one waited.
        if let Some(header) = self.cached() {
            return Ok(header);
        }
        let fetched = self.fetch_token().await?;
        let header = fetched.header.clone();
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(fetched);
        Ok(header)
    }

    /// Asks the token endpoint for an access token (RFC 7523 section 2.1).
    async fn fetch_token(&self) -> Result<AccessToken, Outcome> {
        #[derive(Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            scope: &'a str,
            aud: &'a str,
            iat: u64,
            exp: u64,
        }
        let iat = unix_now();
        let claims = Claims {
            iss: &self.account.client_email,
            scope: SCOPE,
            aud: &self.account.token_uri,
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        let mut jwt_header = Header::new(Algorithm::RS256);
        jwt_header.kid.clone_from(&self.account.key_id);
        let assertion = jsonwebtoken::encode(&jwt_header, &claims, &self.account.key)
            .map_err(|e| Outcome::Config(format!("signing the FCM token request failed: {e}")))?;
        // A JWT is base64url and dots: nothing in it needs escaping in a
        // form body.
        let body = format!("grant_type={GRANT_TYPE}&assertion={assertion}");
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.account.token_uri)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Bytes::from(body))
            .map_err(|_| {
                Outcome::Config(format!(
                    "the token_uri of {} is not a URL",
                    both_names("SEALPOST_FCM_CREDENTIALS_FILE")
                ))
            })?;
        let asked = Instant::now();
        let answer = exchange(&self.outbound, "FCM token endpoint", request).await?;
        judge_token(&answer, asked)
    }

    async fn post(&self, message: &Bytes, bearer: HeaderValue) -> Result<Answer, Outcome> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.send_url)
            .header(header::AUTHORIZATION, bearer)
            .header(header::CONTENT_TYPE, "application/json")
            .body(message.clone())
            .map_err(|_| Outcome::Config("the FCM send URL is not a URL".into()))?;
        exchange(&self.outbound, "FCM", request).await
    }
}

#[async_trait]
impl Provider for FcmProvider {
    fn kind(&self) -> Kind {
        Kind::Fcm
    }

    async fn wake(&self, target: &Target, urgency: Urgency) -> Outcome {
        let Target::Fcm { token } = target else {
            return wrong_kind("FCM", target);
        };
        let message = message(token, urgency);
        let mut tries = 0;
        loop {
            tries += 1;
            let bearer = match self.access_token().await {
                Ok(bearer) => bearer,
                Err(outcome) => return outcome,
            };
            let answer = match self.post(&message, bearer.clone()).await {
                Ok(answer) => answer,
                Err(outcome) => return outcome,
            };
            if answer.status == StatusCode::FORBIDDEN {
                // Permissions may have changed since the token was issued.
                self.forget(&bearer);
            }
            if answer.status == StatusCode::UNAUTHORIZED {
                self.forget(&bearer);
                // Once more with a new token: the cached one may have been
                // revoked, or expired early on a clock that runs slow.
                if tries < 2 {
                    continue;
                }
            }
            return judge(&answer);
        }
    }
}

/// The message for `token`: data only (`data` values must be strings).
pub fn message(token: &str, urgency: Urgency) -> Bytes {
    let priority = match urgency {
        Urgency::High => "HIGH",
        Urgency::Low => "NORMAL",
    };
    let message = serde_json::json!({
        "message": {
            "token": token,
            "data": {"type": "wake"},
            "android": {"priority": priority, "collapse_key": COLLAPSE_KEY, "ttl": TTL},
        }
    });
    Bytes::from(message.to_string())
}

/// FCM's answer to a send ("FCM HTTP v1 error codes"): the HTTP status,
/// the `error.status` and the `errorCode` of the `FcmError` detail.
fn judge(answer: &Answer) -> Outcome {
    let error = FcmError::parse(&answer.body);
    let shown = || format!("FCM answered {} {}", answer.status.as_u16(), error.shown());
    match answer.status {
        StatusCode::OK => Outcome::Sent,
        // The app was removed, or the token expired: the device must
        // register again.
        _ if error.code.as_deref() == Some("UNREGISTERED") => Outcome::Gone,
        StatusCode::NOT_FOUND => Outcome::Gone,
        // 429 (QUOTA_EXCEEDED) waits, 5xx is Google's; INVALID_ARGUMENT
        // (a malformed token included: the target is kept, as a bad
        // message of ours looks the same), SENDER_ID_MISMATCH,
        // THIRD_PARTY_AUTH_ERROR, a 401 twice: ours.
        _ => by_status_class(answer, shown),
    }
}

/// The token endpoint's answer: a token, or what to do about none.
fn judge_token(answer: &Answer, asked: Instant) -> Result<AccessToken, Outcome> {
    #[derive(Deserialize)]
    struct Granted {
        access_token: String,
        expires_in: u64,
    }
    #[derive(Deserialize)]
    struct Refused {
        error: String,
    }
    let status = answer.status;
    if status == StatusCode::OK {
        let granted: Granted = serde_json::from_slice(&answer.body).map_err(|_| {
            Outcome::Config(format!(
                "the FCM token endpoint (token_uri of {}) answered 200 without a token",
                both_names("SEALPOST_FCM_CREDENTIALS_FILE")
            ))
        })?;
        let header = HeaderValue::from_str(&format!("Bearer {}", granted.access_token))
            .map_err(|_| Outcome::Config("the FCM access token is not a header value".into()))?;
        let lifetime = Duration::from_secs(granted.expires_in);
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        return Ok(AccessToken {
            header,
            renew_at: asked + lifetime - margin,
        });
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(Outcome::Throttled(retry_after(&answer.headers)));
    }
    if status.is_server_error() {
        return Err(Outcome::Transient(format!(
            "the FCM token endpoint answered {}",
            status.as_u16()
        )));
    }
    // `invalid_grant` (a revoked or wrong key, a clock far off),
    // `invalid_client`, `unauthorized_client`: the service account's.
    let error = serde_json::from_slice::<Refused>(&answer.body)
        .ok()
        .map(|r| r.error)
        .filter(|e| safe_word(e));
    Err(Outcome::Config(format!(
        "the FCM token endpoint refused the service account of {} ({} {}); check the key and the clock",
        both_names("SEALPOST_FCM_CREDENTIALS_FILE"),
        status.as_u16(),
        error.as_deref().unwrap_or("(no error code)"),
    )))
}

/// The parts of a Google API error body that are used.
#[derive(Default)]
struct FcmError {
    /// `error.status`: `INVALID_ARGUMENT`, `NOT_FOUND`...
    status: Option<String>,
    /// The `google.firebase.fcm.v1.FcmError` detail's `errorCode`:
    /// `UNREGISTERED`, `SENDER_ID_MISMATCH`, `QUOTA_EXCEEDED`...
    code: Option<String>,
}

impl FcmError {
    fn parse(body: &[u8]) -> Self {
        #[derive(Deserialize)]
        struct Body {
            error: Error,
        }
        #[derive(Deserialize)]
        struct Error {
            status: Option<String>,
            #[serde(default)]
            details: Vec<serde_json::Value>,
        }
        let Ok(body) = serde_json::from_slice::<Body>(body) else {
            return Self::default();
        };
        let code = body
            .error
            .details
            .iter()
            .filter(|d| {
                d.get("@type")
                    .and_then(|t| t.as_str())
                    .is_some_and(|t| t.ends_with("google.firebase.fcm.v1.FcmError"))
            })
            .find_map(|d| d.get("errorCode")?.as_str())
            .map(str::to_owned);
        // Both reach the logs: Google's words only.
        Self {
            status: body.error.status.filter(|s| safe_word(s)),
            code: code.filter(|c| safe_word(c)),
        }
    }

    fn shown(&self) -> String {
        match (&self.status, &self.code) {
            (Some(s), Some(c)) => format!("{s} ({c})"),
            (Some(s), None) => s.clone(),
            (None, Some(c)) => c.clone(),
            (None, None) => "(no error status)".into(),
        }
    }
}

/// An error word safe to log: Google's are upper or lower case with
/// underscores.
fn safe_word(word: &str) -> bool {
    !word.is_empty()
        && word.len() <= 64
        && word.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether the service-account file would start FCM (`sealpost
/// check-config`): read and parsed as start-up does. Its project, or why
/// not; never the key.
pub fn check_credentials(path: &Path) -> Result<String, String> {
    read_credentials(path)
        .map(|(project, _)| project)
        .map_err(|e| format!("{e:#}"))
}

/// The service-account JSON: its project and the account that signs.
fn read_credentials(path: &Path) -> anyhow::Result<(String, ServiceAccount)> {
    let setting = both_names("SEALPOST_FCM_CREDENTIALS_FILE");
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading the FCM service-account file {}, {setting}",
            path.display()
        )
    })?;
    parse_credentials(&text)
        .with_context(|| format!("the FCM service-account file {}, {setting}", path.display()))
}

/// A service-account JSON as the Firebase console downloads it.
fn parse_credentials(text: &str) -> anyhow::Result<(String, ServiceAccount)> {
    #[derive(Deserialize)]
    struct File {
        #[serde(rename = "type")]
        kind: Option<String>,
        project_id: Option<String>,
        client_email: Option<String>,
        private_key: Option<String>,
        private_key_id: Option<String>,
        token_uri: Option<String>,
    }
    // serde_json's error names a line and column, never the content.
    let file: File =
        serde_json::from_str(text).map_err(|e| anyhow!("not a service-account JSON: {e}"))?;
    if let Some(kind) = &file.kind
        && kind != "service_account"
    {
        bail!("its type is {kind:?}, not \"service_account\"");
    }
    let missing: Vec<&str> = [
        ("project_id", file.project_id.is_none()),
        ("client_email", file.client_email.is_none()),
        ("private_key", file.private_key.is_none()),
        ("token_uri", file.token_uri.is_none()),
    ]
    .into_iter()
    .filter_map(|(name, missing)| missing.then_some(name))
    .collect();
    if !missing.is_empty() {
        bail!("it lacks {}", missing.join(", "));
    }
    let (Some(project_id), Some(client_email), Some(private_key), Some(token_uri)) = (
        file.project_id,
        file.client_email,
        file.private_key,
        file.token_uri,
    ) else {
        unreachable!("all four were checked present")
    };
    // A project id goes into the send URL's path.
    if project_id.is_empty()
        || !project_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        bail!("its project_id is not a project id (letters, digits and dashes)");
    }
    // Parsed and checked (RSA, consistent) by the RustCrypto crate
    // jsonwebtoken signs with, which takes PKCS#1: a bad key stops the
    // start, not the first wake-up. The error never quotes the key.
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(private_key.trim())
        .map_err(|_| anyhow!("its private_key is not an RSA key in PKCS#8 PEM"))?;
    let der = key
        .to_pkcs1_der()
        .map_err(|_| anyhow!("its private_key cannot be encoded"))?;
    let account = ServiceAccount {
        client_email,
        token_uri,
        key: EncodingKey::from_rsa_der(der.as_bytes()),
        key_id: file.private_key_id.filter(|id| safe_word(id)),
    };
    // One signature now, so that a key the signer refuses shows at start.
    let mut header = Header::new(Algorithm::RS256);
    header.kid.clone_from(&account.key_id);
    jsonwebtoken::encode(&header, &serde_json::json!({"probe": true}), &account.key)
        .map_err(|_| anyhow!("its private_key does not sign RS256"))?;
    Ok((project_id, account))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        crate::push::http::fake_answer(status, &[], body)
    }

    fn error(code: u16, status: &str, fcm: Option<&str>) -> String {
        let details = match fcm {
            Some(c) => serde_json::json!([{
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": c,
            }]),
            None => serde_json::json!([]),
        };
        serde_json::json!({"error": {"code": code, "message": "m", "status": status, "details": details}})
            .to_string()
    }

    #[test]
    fn answers_are_judged_by_status_and_error_code() {
        assert_eq!(
            judge(&answer(200, r#"{"name":"projects/p/messages/1"}"#)),
            Outcome::Sent
        );
        let unregistered = error(404, "NOT_FOUND", Some("UNREGISTERED"));
        assert_eq!(judge(&answer(404, &unregistered)), Outcome::Gone);
        assert_eq!(judge(&answer(404, "")), Outcome::Gone);
        // UNREGISTERED under another status still means gone.
        let odd = error(400, "INVALID_ARGUMENT", Some("UNREGISTERED"));
        assert_eq!(judge(&answer(400, &odd)), Outcome::Gone);
        let invalid = error(400, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"));
        match judge(&answer(400, &invalid)) {
            Outcome::Config(text) => assert!(text.contains("INVALID_ARGUMENT"), "{text}"),
            other => panic!("{other:?}"),
        }
        let mismatch = error(403, "PERMISSION_DENIED", Some("SENDER_ID_MISMATCH"));
        assert!(matches!(judge(&answer(403, &mismatch)), Outcome::Config(_)));
        let quota = error(429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED"));
        assert_eq!(judge(&answer(429, &quota)), Outcome::Throttled(None));
        let unavailable = error(503, "UNAVAILABLE", Some("UNAVAILABLE"));
        assert!(matches!(
            judge(&answer(503, &unavailable)),
            Outcome::Transient(_)
        ));
        assert!(matches!(
            judge(&answer(500, "<html>")),
            Outcome::Transient(_)
        ));
    }

    #[test]
    fn the_message_is_data_only() {
        let m: serde_json::Value = serde_json::from_slice(&message("tok", Urgency::High)).unwrap();
        assert_eq!(
            m,
            serde_json::json!({"message": {"token": "tok", "data": {"type": "wake"},
                "android": {"priority": "HIGH", "collapse_key": "sealpost", "ttl": "86400s"}}})
        );
        let m: serde_json::Value = serde_json::from_slice(&message("tok", Urgency::Low)).unwrap();
        assert_eq!(m["message"]["android"]["priority"], "NORMAL");
    }

    #[test]
    fn a_token_is_renewed_before_it_expires() {
        let asked = Instant::now();
        let granted = answer(
            200,
            r#"{"access_token":"ya29.x","expires_in":3599,"token_type":"Bearer"}"#,
        );
        let token = judge_token(&granted, asked).unwrap();
        assert_eq!(token.header, "Bearer ya29.x");
        assert_eq!(
            token.renew_at,
            asked + Duration::from_secs(3599) - REFRESH_MARGIN
        );
        // A short-lived one is used for half its life.
        let short = answer(200, r#"{"access_token":"ya29.x","expires_in":60}"#);
        let token = judge_token(&short, asked).unwrap();
        assert_eq!(token.renew_at, asked + Duration::from_secs(30));
    }

    #[test]
    fn token_endpoint_refusals() {
        let refused = answer(
            400,
            r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
        );
        match judge_token(&refused, Instant::now()) {
            Err(Outcome::Config(text)) => assert!(text.contains("invalid_grant"), "{text}"),
            _ => panic!("not a configuration error"),
        }
        assert!(matches!(
            judge_token(&answer(503, ""), Instant::now()),
            Err(Outcome::Transient(_))
        ));
        assert!(matches!(
            judge_token(&answer(429, ""), Instant::now()),
            Err(Outcome::Throttled(None))
        ));
        assert!(matches!(
            judge_token(&answer(200, "{}"), Instant::now()),
            Err(Outcome::Config(_))
        ));
    }

    #[test]
    fn credentials_lacking_fields_are_named() {
        let err = parse_credentials(r#"{"type":"service_account","project_id":"p"}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("client_email, private_key, token_uri"),
            "{err}"
        );
        let err = parse_credentials("{").err().unwrap().to_string();
        assert!(err.contains("not a service-account JSON"), "{err}");
        let bad_key = serde_json::json!({
            "type": "service_account", "project_id": "p", "client_email": "a@b",
            "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            "token_uri": "https://oauth2.googleapis.com/token",
        });
        let err = parse_credentials(&bad_key.to_string())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not an RSA key"), "{err}");
        assert!(!err.contains("AAAA"), "{err}");
    }
}
