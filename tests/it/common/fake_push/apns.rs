//! [`FakeApns`]: Apple's APNs provider API (`POST /3/device/<token>`)
//! over HTTP/2 with prior knowledge, with a key made for the run. It
//! checks what APNs checks, answering as APNs does when something is
//! wrong (and recording a problem):
//!
//! - the provider token: `authorization: bearer <JWT>`, ES256 signed by
//!   the key, `kid` its id, `iss` the team, `iat` within the last hour
//!   (`MissingProviderToken`, `InvalidProviderToken`,
//!   `ExpiredProviderToken`);
//! - the device token in the path: hex, 32 bytes or more
//!   (`BadDeviceToken`);
//! - `apns-topic` (`MissingTopic`), `apns-push-type` (`InvalidPushType`),
//!   `apns-priority` 10 or 5 and 5 for a background push (`BadPriority`),
//!   `apns-collapse-id` at most 64 bytes (`BadCollapseId`),
//!   `apns-expiration` a number (`BadExpirationDate`);
//! - the payload: at most 4096 bytes (`PayloadTooLarge`), JSON with `aps`;
//!   and, beyond Apple, that it carries nothing but the content-free
//!   alert or background flag sealpost sends (`FakeContentInPayload`).
//!
//! The sandbox host is the same fake under `/sandbox` ([`FakeApns::sandbox_url`]),
//! so that one fake tells the two environments apart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::EncodePrivateKey;
use serde_json::{Value, json};

use super::{ForDevice, Record, Refusal, Served, listen, unix_now, with_retry_after};

pub const KEY_ID: &str = "FAKEKEY001";
pub const TEAM_ID: &str = "FAKETEAM01";

/// What the fake answers a request that passed its checks.
#[derive(Debug, Clone)]
pub enum ApnsReply {
    /// 200 with an `apns-id`.
    Ok,
    /// This status with `{"reason": ...}`.
    Reason(u16, &'static str),
    /// 429 `TooManyRequests`, with `Retry-After` in seconds if given.
    Throttle(Option<u64>),
    /// No answer for this long, then 200 (a client's timeout ends it
    /// first).
    Hang(Duration),
}

impl ApnsReply {
    pub const UNREGISTERED: Self = Self::Reason(410, "Unregistered");
    pub const BAD_DEVICE_TOKEN: Self = Self::Reason(400, "BadDeviceToken");
    pub const NOT_FOR_TOPIC: Self = Self::Reason(400, "DeviceTokenNotForTopic");
    pub const INTERNAL: Self = Self::Reason(500, "InternalServerError");
    pub const UNAVAILABLE: Self = Self::Reason(503, "ServiceUnavailable");
    pub const EXPIRED_PROVIDER_TOKEN: Self = Self::Reason(403, "ExpiredProviderToken");
    pub const BAD_TOPIC: Self = Self::Reason(400, "BadTopic");
}

/// One request the fake accepted (whatever it was scripted to answer).
#[derive(Debug, Clone)]
pub struct ApnsRequest {
    /// The device token from the path.
    pub device: String,
    /// Sent to the sandbox path.
    pub sandbox: bool,
    pub topic: String,
    pub push_type: String,
    pub priority: u8,
    pub collapse_id: Option<String>,
    pub expiration: Option<u64>,
    pub payload: Value,
    /// The provider token, and its `iat`.
    pub jwt: String,
    pub iat: u64,
    pub at: Instant,
}

impl ForDevice for ApnsRequest {
    fn device(&self) -> &str {
        &self.device
    }
}

struct Shared {
    decoding: DecodingKey,
    record: Record<ApnsRequest, ApnsReply>,
}

/// The fake; it stops when dropped.
pub struct FakeApns {
    served: Served,
    key_pem: String,
    shared: Arc<Shared>,
}

impl FakeApns {
    /// Starts on an ephemeral port with a P-256 key made now.
    pub async fn start() -> Self {
        let key = p256::SecretKey::random(&mut rsa::rand_core::OsRng);
        let key_pem = key
            .to_pkcs8_pem(Default::default())
            .expect("PKCS#8")
            .to_string();
        let point = key.public_key().to_encoded_point(false);
        let shared = Arc::new(Shared {
            decoding: DecodingKey::from_ec_der(point.as_bytes()),
            record: Record::default(),
        });
        let router = Router::new()
            .route("/3/device/{token}", post(production))
            .route("/sandbox/3/device/{token}", post(sandbox))
            .with_state(shared.clone());
        let (listener, _) = listen().await;
        Self {
            served: Served::new(listener, router, true),
            key_pem,
            shared,
        }
    }

    /// The production base URL (`--apns-url`).
    pub fn url(&self) -> String {
        self.served.url()
    }

    /// The sandbox base URL (`--apns-sandbox-url`).
    pub fn sandbox_url(&self) -> String {
        format!("{}/sandbox", self.served.url())
    }

    /// `host:port`, for `--push-allow-hosts`.
    pub fn host(&self) -> String {
        self.served.host()
    }

    /// The `.p8` key (PKCS#8 PEM).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Writes the key as Apple names it, in `dir`; returns its path.
    pub fn key_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("AuthKey_{KEY_ID}.p8"));
        std::fs::write(&path, &self.key_pem).expect("write the .p8");
        path
    }

    /// `sealpost serve` flags for APNs through this fake (the key written
    /// in `dir`); `--push-allow-hosts` is the caller's, as other fakes may
    /// need it too.
    pub fn flags(&self, dir: &Path) -> Vec<String> {
        vec![
            "--apns-key-file".into(),
            self.key_file(dir).display().to_string(),
            "--apns-key-id".into(),
            KEY_ID.into(),
            "--apns-team-id".into(),
            TEAM_ID.into(),
            "--apns-url".into(),
            self.url(),
            "--apns-sandbox-url".into(),
            self.sandbox_url(),
        ]
    }

    /// The answers for `device`'s next requests, in order; after them,
    /// 200.
    pub fn script(&self, device: &str, replies: impl IntoIterator<Item = ApnsReply>) {
        self.shared.record.script(device, replies);
    }

    /// How many connections clients opened to it.
    pub fn connections(&self) -> usize {
        self.served.connections()
    }

    /// Every request accepted so far, in order.
    pub fn received(&self) -> Vec<ApnsRequest> {
        self.shared.record.received()
    }

    /// Those for `device`.
    pub fn received_for(&self, device: &str) -> Vec<ApnsRequest> {
        self.shared.record.received_for(device)
    }

    /// What it refused, and why: empty when all was as APNs wants it.
    pub fn problems(&self) -> Vec<String> {
        self.shared.record.problems()
    }
}

/// A 32-byte device token, as hex, made at random.
pub fn device_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn production(
    State(shared): State<Arc<Shared>>,
    UrlPath(token): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(shared, token, false, headers, body).await
}

async fn sandbox(
    State(shared): State<Arc<Shared>>,
    UrlPath(token): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(shared, token, true, headers, body).await
}

fn reason(status: u16, reason: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("apns-id", uuid::Uuid::new_v4().to_string())],
        axum::Json(json!({ "reason": reason })),
    )
        .into_response()
}

async fn handle(
    shared: Arc<Shared>,
    device: String,
    sandbox: bool,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = match check(&shared, device, sandbox, &headers, &body) {
        Ok(request) => request,
        Err((status, why, problem)) => {
            shared.record.problem(problem);
            return reason(status, why);
        }
    };
    match shared.record.accept(request).unwrap_or(ApnsReply::Ok) {
        ApnsReply::Ok => ok(),
        ApnsReply::Reason(status, why) => reason(status, why),
        ApnsReply::Throttle(after) => with_retry_after(reason(429, "TooManyRequests"), after),
        ApnsReply::Hang(time) => {
            tokio::time::sleep(time).await;
            ok()
        }
    }
}

fn ok() -> Response {
    (
        StatusCode::OK,
        [("apns-id", uuid::Uuid::new_v4().to_string())],
    )
        .into_response()
}

/// What APNs checks, in its order; a refusal is an answer and a problem.
fn check(
    shared: &Shared,
    device: String,
    sandbox: bool,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<ApnsRequest, Refusal> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());

    let (jwt, iat) = provider_token(shared, header("authorization"))?;

    if device.len() < 64
        || !device.len().is_multiple_of(2)
        || !device.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err((
            400,
            "BadDeviceToken",
            format!("device token not hex of 32+ bytes: {device}"),
        ));
    }
    let topic = match header("apns-topic") {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => return Err((400, "MissingTopic", "no apns-topic".into())),
    };
    let push_type = header("apns-push-type").unwrap_or("").to_owned();
    if !matches!(push_type.as_str(), "alert" | "background") {
        return Err((
            400,
            "InvalidPushType",
            format!("apns-push-type {push_type:?}"),
        ));
    }
    let priority: u8 = match header("apns-priority") {
        None => 10,
        Some("10") => 10,
        Some("5") => 5,
        Some(other) => return Err((400, "BadPriority", format!("apns-priority {other:?}"))),
    };
    if push_type == "background" && priority != 5 {
        return Err((
            400,
            "BadPriority",
            "a background push at priority 10".into(),
        ));
    }
    let collapse_id = header("apns-collapse-id").map(str::to_owned);
    if collapse_id.as_ref().is_some_and(|c| c.len() > 64) {
        return Err((
            400,
            "BadCollapseId",
            "apns-collapse-id over 64 bytes".into(),
        ));
    }
    let expiration = match header("apns-expiration") {
        None => None,
        Some(e) => Some(e.parse::<u64>().map_err(|_| {
            (
                400_u16,
                "BadExpirationDate",
                format!("apns-expiration {e:?}"),
            )
        })?),
    };
    if body.len() > 4096 {
        return Err((
            413,
            "PayloadTooLarge",
            format!("payload of {} bytes", body.len()),
        ));
    }
    let payload: Value = serde_json::from_slice(body)
        .ok()
        .filter(|p: &Value| p.get("aps").is_some_and(Value::is_object))
        .ok_or((
            400_u16,
            "PayloadEmpty",
            String::from("payload not JSON with aps"),
        ))?;
    content_free(&payload, &push_type).map_err(|why| (400_u16, "FakeContentInPayload", why))?;
    Ok(ApnsRequest {
        device,
        sandbox,
        topic,
        push_type,
        priority,
        collapse_id,
        expiration,
        payload,
        jwt,
        iat,
        at: Instant::now(),
    })
}

/// The provider token checked as APNs does: the JWT and its `iat`.
fn provider_token(shared: &Shared, authorization: Option<&str>) -> Result<(String, u64), Refusal> {
    let Some(value) = authorization else {
        return Err((403, "MissingProviderToken", "no authorization".into()));
    };
    let invalid = |why: String| -> Refusal { (403, "InvalidProviderToken", why) };
    let jwt = value
        .strip_prefix("bearer ")
        .ok_or_else(|| invalid(format!("authorization not `bearer <jwt>`: {value:.20}")))?;
    let header =
        jsonwebtoken::decode_header(jwt).map_err(|e| invalid(format!("JWT header: {e}")))?;
    if header.alg != Algorithm::ES256 || header.kid.as_deref() != Some(KEY_ID) {
        return Err(invalid(format!(
            "alg {:?}, kid {:?}",
            header.alg, header.kid
        )));
    }
    let mut validation = Validation::new(Algorithm::ES256);
    // A provider token has no `exp`: its age is judged by `iat`.
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<Value>(jwt, &shared.decoding, &validation)
        .map_err(|e| invalid(format!("signature: {e}")))?
        .claims;
    let keys: Vec<&String> = claims
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    if keys.len() != 2 || claims["iss"] != TEAM_ID {
        return Err(invalid(format!("claims {claims}")));
    }
    let iat = claims["iat"]
        .as_u64()
        .ok_or_else(|| invalid(format!("iat {}", claims["iat"])))?;
    let now = unix_now();
    if iat > now + 60 {
        return Err(invalid(format!("iat {iat} in the future (now {now})")));
    }
    if now - iat > 3600 {
        return Err((
            403,
            "ExpiredProviderToken",
            format!("iat {iat} over an hour old"),
        ));
    }
    Ok((jwt.to_owned(), iat))
}

/// What sealpost may send: an alert from a localisable key for the
/// notification extension to replace, or a bare background flag; no
/// title, body, sender or count, and nothing beside `aps`.
fn content_free(payload: &Value, push_type: &str) -> Result<(), String> {
    let object = payload.as_object().unwrap();
    if object.len() != 1 {
        return Err(format!("keys beside aps: {payload}"));
    }
    let aps = &payload["aps"];
    let expected = match push_type {
        "alert" => json!({"alert": {"loc-key": "NEW_MESSAGE"}, "mutable-content": 1}),
        _ => json!({"content-available": 1}),
    };
    if *aps != expected {
        return Err(format!("aps for {push_type} is {aps}"));
    }
    Ok(())
}
