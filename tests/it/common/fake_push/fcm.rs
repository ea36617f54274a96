//! [`FakeFcm`]: FCM's HTTP v1 send (`POST /v1/projects/<id>/messages:send`)
//! and Google's OAuth 2.0 token endpoint (`POST /token`), over HTTP/1.1,
//! with a service account made for the run ([`FakeFcm::credentials_file`]).
//! It checks what Google checks, answering as Google does when something
//! is wrong (and recording a problem):
//!
//! - the token request: `grant_type` RFC 7523's, the assertion an RS256
//!   JWT signed by the account's key with `iss` the account, `scope`
//!   FCM's, `aud` the token URI, `exp` at most an hour after `iat`
//!   (`invalid_grant`, `unsupported_grant_type`);
//! - the send: a bearer token it issued and has not expired or revoked
//!   (401 `UNAUTHENTICATED`), the account's project (403
//!   `PERMISSION_DENIED`), a message with a token, string `data` values,
//!   `android.priority` HIGH or NORMAL, `ttl` in seconds (400
//!   `INVALID_ARGUMENT`); and, beyond Google, that it is data-only and
//!   carries nothing but `{"type": "wake"}`.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use serde_json::{Value, json};

use super::{ForDevice, Record, Refusal, Served, listen, unix_now, with_retry_after};

pub const PROJECT_ID: &str = "sealpost-fake";
pub const CLIENT_EMAIL: &str = "sealpost@sealpost-fake.iam.gserviceaccount.com";
pub const KEY_ID: &str = "fakekeyid0123456789";
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// What the fake answers a send that passed its checks, or a token
/// request.
#[derive(Debug, Clone)]
pub enum FcmReply {
    /// 200: a message name, or a token.
    Ok,
    /// A Google API error: HTTP status, `error.status`, and the
    /// `FcmError` detail's `errorCode` if any.
    Error(u16, &'static str, Option<&'static str>),
    /// 429 `RESOURCE_EXHAUSTED` (`QUOTA_EXCEEDED`), with `Retry-After` in
    /// seconds if given.
    Throttle(Option<u64>),
    /// No answer for this long, then 200.
    Hang(Duration),
}

impl FcmReply {
    pub const UNREGISTERED: Self = Self::Error(404, "NOT_FOUND", Some("UNREGISTERED"));
    pub const INVALID_ARGUMENT: Self =
        Self::Error(400, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT"));
    pub const SENDER_ID_MISMATCH: Self =
        Self::Error(403, "PERMISSION_DENIED", Some("SENDER_ID_MISMATCH"));
    pub const UNAVAILABLE: Self = Self::Error(503, "UNAVAILABLE", Some("UNAVAILABLE"));
    pub const INTERNAL: Self = Self::Error(500, "INTERNAL", Some("INTERNAL"));
}

/// One send the fake accepted (whatever it was scripted to answer).
#[derive(Debug, Clone)]
pub struct FcmRequest {
    /// The registration token.
    pub device: String,
    pub priority: String,
    pub collapse_key: Option<String>,
    pub ttl: Option<String>,
    pub data: Value,
    /// The access token it carried.
    pub bearer: String,
    pub at: Instant,
}

impl ForDevice for FcmRequest {
    fn device(&self) -> &str {
        &self.device
    }
}

struct Shared {
    token_uri: String,
    decoding: DecodingKey,
    /// Access tokens issued and when each expires.
    issued: Mutex<HashMap<String, Instant>>,
    /// `expires_in` of the next tokens, in seconds.
    token_lifetime: AtomicU64,
    token_requests: AtomicUsize,
    /// Sends refused for their access token.
    unauthenticated: AtomicUsize,
    token_script: Mutex<VecDeque<FcmReply>>,
    /// The sends.
    record: Record<FcmRequest, FcmReply>,
}

/// The fake; it stops when dropped.
pub struct FakeFcm {
    served: Served,
    shared: Arc<Shared>,
}

/// One RSA key for the test process: 2048 bits, as Google's, made once
/// (it takes a moment even optimised).
fn account_key() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| {
        rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key")
    })
}

impl FakeFcm {
    /// Starts on an ephemeral port, with the process's service-account key.
    pub async fn start() -> Self {
        let key = tokio::task::spawn_blocking(account_key).await.unwrap();
        let public = key
            .to_public_key()
            .to_pkcs1_der()
            .expect("PKCS#1 public key");
        let (listener, addr) = listen().await;
        let shared = Arc::new(Shared {
            token_uri: format!("http://{addr}/token"),
            decoding: DecodingKey::from_rsa_der(public.as_bytes()),
            issued: Mutex::default(),
            token_lifetime: AtomicU64::new(3599),
            token_requests: AtomicUsize::new(0),
            unauthenticated: AtomicUsize::new(0),
            token_script: Mutex::default(),
            record: Record::default(),
        });
        let router = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/messages:send", post(send))
            .with_state(shared.clone());
        Self {
            served: Served::new(listener, router, false),
            shared,
        }
    }

    /// The FCM base URL (`--fcm-url`).
    pub fn url(&self) -> String {
        self.served.url()
    }

    /// The token endpoint, the service account's `token_uri`.
    pub fn token_uri(&self) -> &str {
        &self.shared.token_uri
    }

    /// `host:port`, for `--push-allow-hosts`.
    pub fn host(&self) -> String {
        self.served.host()
    }

    /// The service-account JSON, as the Firebase console gives it, with
    /// its `token_uri` at this fake.
    pub fn credentials(&self) -> Value {
        let pem = account_key()
            .to_pkcs8_pem(LineEnding::LF)
            .expect("PKCS#8 PEM");
        json!({
            "type": "service_account",
            "project_id": PROJECT_ID,
            "private_key_id": KEY_ID,
            "private_key": pem.as_str(),
            "client_email": CLIENT_EMAIL,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri(),
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/sealpost",
            "universe_domain": "googleapis.com",
        })
    }

    /// Writes [`FakeFcm::credentials`] in `dir`; returns its path.
    pub fn credentials_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("fcm-service-account.json");
        std::fs::write(&path, self.credentials().to_string()).expect("write the credentials");
        path
    }

    /// `sealpost serve` flags for FCM through this fake (the credentials
    /// written in `dir`); `--push-allow-hosts` is the caller's.
    pub fn flags(&self, dir: &Path) -> Vec<String> {
        vec![
            "--fcm-credentials-file".into(),
            self.credentials_file(dir).display().to_string(),
            "--fcm-url".into(),
            self.url(),
        ]
    }

    /// The answers for sends to `device`'s next requests, in order; after
    /// them, 200.
    pub fn script(&self, device: &str, replies: impl IntoIterator<Item = FcmReply>) {
        self.shared.record.script(device, replies);
    }

    /// The answers to the next token requests (`Error`'s `status` is then
    /// the OAuth `error`), in order; after them, tokens.
    pub fn script_token(&self, replies: impl IntoIterator<Item = FcmReply>) {
        self.shared.token_script.lock().unwrap().extend(replies);
    }

    /// The `expires_in` of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.shared
            .token_lifetime
            .store(lifetime.as_secs(), Ordering::SeqCst);
    }

    /// Revokes every token issued so far: sends with them are answered
    /// 401.
    pub fn revoke_tokens(&self) {
        self.shared.issued.lock().unwrap().clear();
    }

    /// How many token requests reached it (granted or not).
    pub fn token_requests(&self) -> usize {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// How many sends it answered 401 (a token not issued, expired or
    /// revoked).
    pub fn unauthenticated(&self) -> usize {
        self.shared.unauthenticated.load(Ordering::SeqCst)
    }

    /// How many connections clients opened to it.
    pub fn connections(&self) -> usize {
        self.served.connections()
    }

    /// Every send accepted so far, in order.
    pub fn received(&self) -> Vec<FcmRequest> {
        self.shared.record.received()
    }

    /// Those to `device`.
    pub fn received_for(&self, device: &str) -> Vec<FcmRequest> {
        self.shared.record.received_for(device)
    }

    /// What it refused, and why: empty when all was as Google wants it.
    pub fn problems(&self) -> Vec<String> {
        self.shared.record.problems()
    }
}

/// A registration token, made at random, in FCM's shape.
pub fn registration_token() -> String {
    let bytes: [u8; 24] = rand::random();
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("fake:{id}_APA91b")
}

/// A Google API error body.
fn api_error(status: u16, word: &str, code: Option<&str>) -> Response {
    let details = match code {
        Some(code) => json!([{
            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
            "errorCode": code,
        }]),
        None => json!([]),
    };
    (
        StatusCode::from_u16(status).unwrap(),
        axum::Json(json!({"error": {
            "code": status,
            "message": "fake FCM",
            "status": word,
            "details": details,
        }})),
    )
        .into_response()
}

fn throttled(after: Option<u64>) -> Response {
    with_retry_after(
        api_error(429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED")),
        after,
    )
}

fn oauth_error(status: u16, error: &str, description: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn token(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    shared.token_requests.fetch_add(1, Ordering::SeqCst);
    if let Err((status, error, problem)) = check_assertion(&shared, &headers, &body) {
        shared.record.problem(problem);
        return oauth_error(status, error, "refused by the fake");
    }
    let reply = shared.token_script.lock().unwrap().pop_front();
    match reply {
        None | Some(FcmReply::Ok) => {}
        Some(FcmReply::Error(status, error, _)) => return oauth_error(status, error, "scripted"),
        Some(FcmReply::Throttle(after)) => return throttled(after),
        Some(FcmReply::Hang(time)) => tokio::time::sleep(time).await,
    }
    let lifetime = shared.token_lifetime.load(Ordering::SeqCst);
    let access = format!("ya29.fake-{}", uuid::Uuid::new_v4().simple());
    shared.issued.lock().unwrap().insert(
        access.clone(),
        Instant::now() + Duration::from_secs(lifetime),
    );
    axum::Json(json!({
        "access_token": access,
        "expires_in": lifetime,
        "token_type": "Bearer",
    }))
    .into_response()
}

/// The token request as Google checks it (RFC 7523 section 3).
fn check_assertion(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<(), Refusal> {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != "application/x-www-form-urlencoded" {
        return Err((
            400,
            "invalid_request",
            format!("content-type {content_type:?}"),
        ));
    }
    let form: HashMap<String, String> = form_urlencoded(body).ok_or((
        400_u16,
        "invalid_request",
        "a body that is not a form".to_owned(),
    ))?;
    if form.get("grant_type").map(String::as_str) != Some(GRANT_TYPE) {
        return Err((
            400,
            "unsupported_grant_type",
            format!("grant_type {:?}", form.get("grant_type")),
        ));
    }
    let invalid = |why: String| -> Refusal { (400, "invalid_grant", why) };
    let assertion = form
        .get("assertion")
        .ok_or_else(|| invalid("no assertion".into()))?;
    let header =
        jsonwebtoken::decode_header(assertion).map_err(|e| invalid(format!("JWT header: {e}")))?;
    if header.alg != Algorithm::RS256 {
        return Err(invalid(format!("alg {:?}", header.alg)));
    }
    if header.kid.as_deref().is_some_and(|kid| kid != KEY_ID) {
        return Err(invalid(format!("kid {:?}", header.kid)));
    }
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud"]);
    validation.set_audience(&[&shared.token_uri]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    let claims = jsonwebtoken::decode::<Value>(assertion, &shared.decoding, &validation)
        .map_err(|e| invalid(format!("assertion: {e}")))?
        .claims;
    let scopes = claims["scope"].as_str().unwrap_or("");
    if !scopes.split(' ').any(|s| s == SCOPE) {
        return Err(invalid(format!("scope {scopes:?}")));
    }
    let (Some(iat), Some(exp)) = (claims["iat"].as_u64(), claims["exp"].as_u64()) else {
        return Err(invalid(format!("iat/exp {claims}")));
    };
    let now = unix_now();
    if iat > now + 60 || exp <= iat || exp - iat > 3600 {
        return Err(invalid(format!("iat {iat}, exp {exp}, now {now}")));
    }
    Ok(())
}

/// `application/x-www-form-urlencoded`, decoded; `None` if malformed.
fn form_urlencoded(body: &[u8]) -> Option<HashMap<String, String>> {
    let text = std::str::from_utf8(body).ok()?;
    let decode = |s: &str| -> Option<String> {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    };
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((decode(k)?, decode(v)?))
        })
        .collect()
}

async fn send(
    State(shared): State<Arc<Shared>>,
    UrlPath(project): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match check_send(&shared, &project, &headers, &body) {
        Ok(request) => request,
        // Tests make the provider renew by revoking or expiring its
        // token: a 401 is counted, not a problem.
        Err((401, word, _)) => {
            shared.unauthenticated.fetch_add(1, Ordering::SeqCst);
            return api_error(401, word, None);
        }
        Err((status, word, problem)) => {
            shared.record.problem(problem);
            return api_error(status, word, None);
        }
    };
    let reply = shared.record.accept(request).unwrap_or(FcmReply::Ok);
    let ok = || {
        axum::Json(json!({
            "name": format!("projects/{PROJECT_ID}/messages/0:{}", uuid::Uuid::new_v4().simple()),
        }))
        .into_response()
    };
    match reply {
        FcmReply::Ok => ok(),
        FcmReply::Error(status, word, code) => api_error(status, word, code),
        FcmReply::Throttle(after) => throttled(after),
        FcmReply::Hang(time) => {
            tokio::time::sleep(time).await;
            ok()
        }
    }
}

/// A send as FCM checks it.
fn check_send(
    shared: &Shared,
    project: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<FcmRequest, Refusal> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    let valid = shared
        .issued
        .lock()
        .unwrap()
        .get(&bearer)
        .is_some_and(|expires| Instant::now() < *expires);
    if !valid {
        return Err((
            401,
            "UNAUTHENTICATED",
            "an access token not issued, expired or revoked".into(),
        ));
    }
    if project != PROJECT_ID {
        return Err((403, "PERMISSION_DENIED", format!("project {project:?}")));
    }
    let invalid = |why: String| -> Refusal { (400, "INVALID_ARGUMENT", why) };
    let body: Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    if keys(&body) != ["message"] {
        return Err(invalid(format!("body keys {:?}", keys(&body))));
    }
    let message = &body["message"];
    let device = message["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| invalid("no message.token".into()))?
        .to_owned();
    let mut message_keys = keys(message);
    message_keys.sort();
    // Data-only: no `notification` (which Android shows without the app,
    // with what it says), no `webpush`/`apns` blocks.
    if message_keys != ["android", "data", "token"] {
        return Err(invalid(format!("message keys {message_keys:?}")));
    }
    let data = message["data"].clone();
    if !data
        .as_object()
        .is_some_and(|d| d.values().all(Value::is_string))
    {
        return Err(invalid(format!("data values must be strings: {data}")));
    }
    if data != json!({"type": "wake"}) {
        return Err(invalid(format!("data is not content-free: {data}")));
    }
    let android = &message["android"];
    if android.get("notification").is_some() {
        return Err(invalid(
            "android.notification in a data-only message".into(),
        ));
    }
    let priority = android["priority"].as_str().unwrap_or("").to_owned();
    if !matches!(priority.as_str(), "HIGH" | "NORMAL") {
        return Err(invalid(format!("android.priority {priority:?}")));
    }
    let ttl = android["ttl"].as_str().map(str::to_owned);
    if let Some(ttl) = &ttl
        && !ttl
            .strip_suffix('s')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(invalid(format!("android.ttl {ttl:?}")));
    }
    Ok(FcmRequest {
        device,
        priority,
        collapse_key: android["collapse_key"].as_str().map(str::to_owned),
        ttl,
        data,
        bearer,
        at: Instant::now(),
    })
}
