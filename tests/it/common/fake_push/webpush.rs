//! A fake Web Push service that is also the browser: it mints
//! subscriptions (a P-256 key pair and a 16-byte auth secret each, as
//! `PushManager.subscribe()` does), and checks each push as the real
//! services do before decrypting it with the subscription's private key:
//!
//! - `TTL` present, a number (RFC 8030: `400` otherwise);
//! - `Content-Encoding: aes128gcm`, a body of at most 4096 bytes (`413`);
//! - `Urgency` one of RFC 8030's four values, `Topic` at most 32 base64url
//!   characters, when present;
//! - `Authorization: vapid t=<JWT>, k=<key>` (RFC 8292): an ES256 JWT whose
//!   signature checks with `k`, `aud` this service's origin *with its
//!   port*, `exp` in the future and at most 24 h ahead, `sub` a `mailto:`
//!   or `https:` URI (`401` otherwise, as Mozilla's service answers), and
//!   `k` the subscription's application server key when it was made with
//!   one (`403`);
//! - the body decrypts (RFC 8291) with the subscription's keys (`400`).
//!
//! What passed is recorded ([`Received`]: plaintext, headers, claims),
//! what failed too ([`Rejected`]: why), and each subscription answers as
//! scripted ([`Answer`]: 201 by default, 404, 410, 429 with `Retry-After`,
//! 500, or a hang). The checks are written apart from sealpost's signer
//! (plain p256 ECDSA over the JWT's bytes, not jsonwebtoken), so the two
//! do not share a mistake.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Verifier;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{Served, listen, unix_now, with_retry_after};

/// The contact the tests' servers give (`--vapid-subject`).
pub const SUBJECT: &str = "mailto:push-tests@example.com";

/// A VAPID key for servers on PostgreSQL, which require one (SQLite
/// servers generate theirs beside the database, so that path runs too).
pub const VAPID_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgW8Nn3qvELdKTZNQ5
DoEv1yP52a1/WJ+hwdgS0mw3oeKhRANCAAQ3Paz6ddFn2m/C188JuDTSnZM+q9Rd
4tyChrMM5NlP9LMZ1dtsXEY7CbiW9qnYVpstF2FzOdZDHwy7FVHlBhLN
-----END PRIVATE KEY-----";

/// The most a push service accepts (RFC 8291 section 4: 4096 octets of
/// payload).
const MAX_BODY: usize = 4096;

/// The most `exp` may be ahead (RFC 8292 section 2).
const MAX_EXP: u64 = 24 * 3600;

/// How a subscription answers its next push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Any status, with no headers: 201 (the default), 404, 410, 500...
    Status(u16),
    /// 429, with this `Retry-After` (seconds or an HTTP date) if any.
    TooMany(Option<String>),
    /// Accepts the request, then answers nothing for this long (then 201):
    /// a service that hangs.
    Hang(Duration),
    /// Answers nothing for this long, then this status: a slow "gone".
    HangThen(Duration, u16),
}

impl Answer {
    pub const CREATED: Answer = Answer::Status(201);
}

/// A subscription as a browser's `PushSubscription` holds it; the private
/// half stays here (and in [`Subscription::private_key`] for the
/// cross-check).
#[derive(Clone)]
pub struct Subscription {
    pub id: String,
    pub endpoint: String,
    /// base64url of the uncompressed P-256 point.
    pub p256dh: String,
    /// base64url of the 16-byte auth secret.
    pub auth: String,
    secret: p256::SecretKey,
}

impl Subscription {
    /// What `PushSubscription.toJSON()` gives a page.
    pub fn to_json(&self) -> Value {
        json!({
            "endpoint": self.endpoint,
            "expirationTime": null,
            "keys": { "p256dh": self.p256dh, "auth": self.auth },
        })
    }

    /// The body of `PUT /v1/devices/{id}/push` for it.
    pub fn target_json(&self) -> Value {
        let mut body = self.to_json();
        body["kind"] = json!("webpush");
        body
    }

    /// The private key's scalar, base64url (32 bytes).
    pub fn private_key(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.secret.to_bytes())
    }
}

/// A push that passed every check.
#[derive(Debug, Clone)]
pub struct Received {
    pub plaintext: Vec<u8>,
    /// The encrypted body, as sent.
    pub body: Bytes,
    pub headers: HeaderMap,
    pub ttl: u64,
    pub urgency: Option<String>,
    pub topic: Option<String>,
    /// The VAPID JWT's claims, and `k`.
    pub claims: Value,
    pub vapid_key: String,
    /// What it was answered (a hang counts as its final 201).
    pub answered: u16,
    pub at: tokio::time::Instant,
}

impl Received {
    pub fn plaintext_json(&self) -> Value {
        serde_json::from_slice(&self.plaintext).expect("the plaintext is JSON")
    }
}

/// A push refused, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub status: u16,
    pub reason: String,
}

struct Sub {
    secret: p256::SecretKey,
    auth: [u8; 16],
    /// The VAPID key it was made for (`applicationServerKey`), if any.
    app_key: Option<Vec<u8>>,
    script: VecDeque<Answer>,
    received: Vec<Received>,
    rejected: Vec<Rejected>,
}

struct Shared {
    origin: String,
    subs: Mutex<HashMap<String, Sub>>,
    /// Woken at every request, for [`FakeWebPush::wait_for`].
    changed: Notify,
}

/// The fake; it stops when dropped.
pub struct FakeWebPush {
    shared: Arc<Shared>,
    served: Served,
}

impl FakeWebPush {
    pub async fn start() -> Self {
        let (listener, addr) = listen().await;
        let shared = Arc::new(Shared {
            origin: format!("http://{addr}"),
            subs: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        });
        let app = Router::new()
            .route("/push/{id}", post(push))
            .with_state(shared.clone());
        Self {
            shared,
            served: Served::new(listener, app, false),
        }
    }

    /// `http://127.0.0.1:<port>`: the `aud` a push to it must carry.
    pub fn origin(&self) -> &str {
        &self.shared.origin
    }

    /// `127.0.0.1:<port>`, for `--push-allow-hosts`.
    pub fn allow_host(&self) -> String {
        self.served.host()
    }

    /// The settings that turn Web Push on in a server pointed at this
    /// service, as environment variables: subject, allow-list and, with
    /// PostgreSQL (which requires one), the key.
    pub fn server_env(&self, postgres: bool) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("SEALPOST_VAPID_SUBJECT", SUBJECT.to_owned()),
            ("SEALPOST_PUSH_ALLOW_HOSTS", self.allow_host()),
        ];
        if postgres {
            env.push(("SEALPOST_VAPID_KEY", VAPID_KEY.to_owned()));
        }
        env
    }

    /// The same settings as `serve` flags (`--vapid-subject=...`): one
    /// argument each, as a PEM begins with dashes, which clap would take
    /// for a flag of its own.
    pub fn server_flags(&self, postgres: bool) -> Vec<String> {
        self.server_env(postgres)
            .into_iter()
            .map(|(var, value)| {
                let flag = var
                    .strip_prefix("SEALPOST_")
                    .unwrap()
                    .to_ascii_lowercase()
                    .replace('_', "-");
                format!("--{flag}={value}")
            })
            .collect()
    }

    /// A new subscription, as a browser makes one.
    pub fn subscribe(&self) -> Subscription {
        self.mint(None)
    }

    /// A subscription made for this VAPID public key (base64url): pushes
    /// signed with another are refused with 403, as real services do.
    pub fn subscribe_for(&self, application_server_key: &str) -> Subscription {
        let key = URL_SAFE_NO_PAD
            .decode(application_server_key)
            .expect("a base64url key");
        self.mint(Some(key))
    }

    fn mint(&self, app_key: Option<Vec<u8>>) -> Subscription {
        let secret = loop {
            let bytes: [u8; 32] = rand::random();
            if let Ok(secret) = p256::SecretKey::from_bytes(&bytes.into()) {
                break secret;
            }
        };
        let auth: [u8; 16] = rand::random();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let public = secret.public_key().to_encoded_point(false);
        let subscription = Subscription {
            endpoint: format!("{}/push/{id}", self.shared.origin),
            p256dh: URL_SAFE_NO_PAD.encode(public.as_bytes()),
            auth: URL_SAFE_NO_PAD.encode(auth),
            secret: secret.clone(),
            id: id.clone(),
        };
        self.lock().insert(
            id,
            Sub {
                secret,
                auth,
                app_key,
                script: VecDeque::new(),
                received: Vec::new(),
                rejected: Vec::new(),
            },
        );
        subscription
    }

    /// The answers to the next pushes to `id`, in order; then 201 again.
    pub fn script(&self, id: &str, answers: impl IntoIterator<Item = Answer>) {
        let mut subs = self.lock();
        let sub = subs.get_mut(id).expect("a subscription of this service");
        sub.script.extend(answers);
    }

    /// Forgets `id`: pushes to it are answered 404, as for a subscription
    /// that never was.
    pub fn unsubscribe(&self, id: &str) {
        self.lock().remove(id);
    }

    /// The pushes to `id` that passed the checks, in order.
    pub fn received(&self, id: &str) -> Vec<Received> {
        self.lock()
            .get(id)
            .map(|s| s.received.clone())
            .unwrap_or_default()
    }

    /// The pushes to `id` that were refused, and why.
    pub fn rejected(&self, id: &str) -> Vec<Rejected> {
        self.lock()
            .get(id)
            .map(|s| s.rejected.clone())
            .unwrap_or_default()
    }

    /// Waits until `id` has received at least `n` pushes; panics after
    /// `timeout`, saying what came and what was refused.
    pub async fn wait_for(&self, id: &str, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so a push between the look and the
            // wait still wakes it.
            let changed = self.shared.changed.notified();
            let received = self.received(id);
            if received.len() >= n {
                return received;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "subscription {id}: {} push(es) after {timeout:?}, not {n}; refused: {:?}",
                    self.received(id).len(),
                    self.rejected(id)
                );
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sub>> {
        self.shared.subs.lock().unwrap()
    }
}

async fn push(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let checked = {
        let subs = shared.subs.lock().unwrap();
        let Some(sub) = subs.get(&id) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        check(&shared.origin, sub, &headers, &body)
    };
    let answer = {
        let mut subs = shared.subs.lock().unwrap();
        let Some(sub) = subs.get_mut(&id) else {
            return StatusCode::NOT_FOUND.into_response();
        };
        match checked {
            Err((status, reason)) => {
                sub.rejected.push(Rejected {
                    status: status.as_u16(),
                    reason: reason.clone(),
                });
                drop(subs);
                shared.changed.notify_waiters();
                return (status, reason).into_response();
            }
            Ok(mut received) => {
                let answer = sub.script.pop_front().unwrap_or(Answer::CREATED);
                received.answered = match &answer {
                    Answer::Status(status) => *status,
                    Answer::TooMany(_) => 429,
                    Answer::Hang(_) => 201,
                    Answer::HangThen(_, status) => *status,
                };
                sub.received.push(received);
                answer
            }
        }
    };
    shared.changed.notify_waiters();
    match answer {
        Answer::Status(status) => {
            let status = StatusCode::from_u16(status).unwrap();
            if status == StatusCode::CREATED {
                let location = format!("{}/message/{}", shared.origin, uuid::Uuid::new_v4());
                (status, [(header::LOCATION, location)]).into_response()
            } else {
                status.into_response()
            }
        }
        Answer::TooMany(retry_after) => {
            with_retry_after(StatusCode::TOO_MANY_REQUESTS.into_response(), retry_after)
        }
        Answer::Hang(duration) => {
            tokio::time::sleep(duration).await;
            StatusCode::CREATED.into_response()
        }
        Answer::HangThen(duration, status) => {
            tokio::time::sleep(duration).await;
            StatusCode::from_u16(status).unwrap().into_response()
        }
    }
}

type Refusal = (StatusCode, String);

fn refuse<T>(status: StatusCode, reason: impl Into<String>) -> Result<T, Refusal> {
    Err((status, reason.into()))
}

/// Every check a real service makes, then the decryption.
fn check(origin: &str, sub: &Sub, headers: &HeaderMap, body: &[u8]) -> Result<Received, Refusal> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let Some(ttl) = text("ttl") else {
        return refuse(StatusCode::BAD_REQUEST, "missing TTL header");
    };
    let Ok(ttl) = ttl.trim().parse::<u64>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("TTL {ttl:?} is not a number"),
        );
    };
    if text("content-encoding").as_deref() != Some("aes128gcm") {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "Content-Encoding {:?} is not aes128gcm",
                text("content-encoding")
            ),
        );
    }
    if body.len() > MAX_BODY {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body of {} bytes", body.len()),
        );
    }
    let urgency = text("urgency");
    if let Some(u) = &urgency
        && !["very-low", "low", "normal", "high"].contains(&u.as_str())
    {
        return refuse(StatusCode::BAD_REQUEST, format!("Urgency {u:?}"));
    }
    let topic = text("topic");
    if let Some(t) = &topic
        && (t.is_empty()
            || t.len() > 32
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        return refuse(StatusCode::BAD_REQUEST, format!("Topic {t:?}"));
    }

    let (claims, vapid_key) = vapid(origin, text("authorization").as_deref())
        .map_err(|reason| (StatusCode::UNAUTHORIZED, reason))?;
    if let Some(expected) = &sub.app_key
        && URL_SAFE_NO_PAD.decode(&vapid_key).ok().as_ref() != Some(expected)
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "k is not the key this subscription was made for",
        );
    }

    let plaintext = web_push_native::decrypt(body.to_vec(), &sub.secret, &sub.auth.into())
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("cannot decrypt: {e}")))?;
    Ok(Received {
        plaintext,
        body: Bytes::copy_from_slice(body),
        headers: headers.clone(),
        ttl,
        urgency,
        topic,
        claims,
        vapid_key,
        answered: 0,
        at: tokio::time::Instant::now(),
    })
}

/// Checks an `Authorization: vapid t=..., k=...` value; its claims and `k`.
fn vapid(origin: &str, authorization: Option<&str>) -> Result<(Value, String), String> {
    let authorization = authorization.ok_or("no Authorization header")?;
    let params = authorization
        .strip_prefix("vapid ")
        .ok_or_else(|| format!("Authorization is not of the vapid scheme: {authorization:?}"))?;
    let mut t = None;
    let mut k = None;
    for param in params.split(',') {
        match param.trim().split_once('=') {
            Some(("t", value)) => t = Some(value.trim()),
            Some(("k", value)) => k = Some(value.trim()),
            _ => return Err(format!("unknown vapid parameter {param:?}")),
        }
    }
    let (jwt, k) = (t.ok_or("no t=")?, k.ok_or("no k=")?);
    let key_bytes = URL_SAFE_NO_PAD
        .decode(k)
        .map_err(|_| "k is not base64url")?;
    if key_bytes.len() != 65 || key_bytes[0] != 4 {
        return Err("k is not an uncompressed P-256 point".into());
    }
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&key_bytes)
        .map_err(|_| "k is not a point on P-256")?;

    let mut parts = jwt.split('.');
    let (Some(head), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("t is not a JWS of three parts".into());
    };
    let decode = |part: &str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| "a JWT part is not base64url")
    };
    let head: Value = serde_json::from_slice(&decode(head)?).map_err(|_| "bad JWT header")?;
    if head["alg"] != "ES256" {
        return Err(format!("JWT alg {} is not ES256", head["alg"]));
    }
    if !head["typ"].is_null() && head["typ"] != "JWT" {
        return Err(format!("JWT typ {}", head["typ"]));
    }
    let signature = p256::ecdsa::Signature::from_slice(&decode(signature)?)
        .map_err(|_| "the signature is not 64 bytes of r and s")?;
    let signed = &jwt[..jwt.rfind('.').unwrap()];
    key.verify(signed.as_bytes(), &signature)
        .map_err(|_| "the JWT signature does not verify with k")?;

    let claims: Value = serde_json::from_slice(&decode(payload)?).map_err(|_| "bad JWT claims")?;
    if claims["aud"] != origin {
        return Err(format!("aud {} is not {origin}", claims["aud"]));
    }
    let now = unix_now();
    let exp = claims["exp"].as_u64().ok_or("no numeric exp")?;
    if exp <= now {
        return Err(format!("exp {exp} has passed (now {now})"));
    }
    if exp > now + MAX_EXP {
        return Err(format!("exp {exp} is more than 24 h ahead (now {now})"));
    }
    let sub = claims["sub"].as_str().ok_or("no sub")?;
    let lower = sub.to_ascii_lowercase();
    let contact = lower
        .strip_prefix("mailto:")
        .is_some_and(|a| a.contains('@'))
        || lower.starts_with("https://");
    if !contact {
        return Err(format!("sub {sub:?} is not a mailto: or https: URI"));
    }
    Ok((claims, k.to_owned()))
}
