//! A fake Web Push service on 127.0.0.1 for the `wakeups` scenario: it
//! mints subscriptions, answers every wake-up the server sends to one of
//! them, and counts them per subscription.
//!
//! It checks what makes a request a Web Push request (RFC 8030, 8291,
//! 8292), cheaply, since it shares the cores with the server being
//! measured: `TTL`, `Content-Encoding: aes128gcm`, an `aes128gcm` header
//! whose key id is an uncompressed P-256 point, at most 4096 bytes, and
//! `Authorization: vapid t=<jwt>, k=<key>` with an ES256 JWT whose `aud` is
//! this service's origin (port included), `exp` within 24 h and `sub` a
//! `mailto:` or `https:` URI. The signature is verified once per distinct
//! token (the server reuses one for hours), the claims on every request.
//! It does not decrypt: the test suite's fake does, and a benchmark's fake
//! should not cost the server under test a core. A request that fails a
//! check is answered 400 or 401 and counted by reason; one to a
//! subscription it never minted, 404 (as a real service says of a gone
//! one, which makes the server drop that target).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::stats::now_nanos;

/// RFC 8291's largest message a push service must accept.
const MAX_BODY: usize = 4096;
/// The `aes128gcm` header (salt 16, record size 4, key id length 1), the
/// sender's 65-byte public key as key id, and at least a padding delimiter
/// and the 16-byte tag.
const MIN_BODY: usize = 16 + 4 + 1 + 65 + 1 + 16;
/// RFC 8292: `exp` no more than 24 hours ahead; a minute of slack for
/// clocks (both ends are this machine, so none is needed in practice).
const MAX_EXP_AHEAD_S: i64 = 24 * 3600 + 60;
/// Verified (token, key) pairs kept: the server signs one token per
/// audience and renews it every few hours, so a handful is plenty; the set
/// is cleared when full.
const VERIFIED_MAX: usize = 64;

/// base64url, padded or not (browsers and libraries differ).
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// What the fake has seen so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Counts {
    /// Every POST to a push path.
    pub requests: u64,
    /// Answered 201: the wake-ups delivered.
    pub accepted: u64,
    /// Refused, by reason (`ttl`, `content_encoding`, `body`, `authorization`,
    /// `vapid_*`, `unknown_subscription`).
    pub rejected: BTreeMap<String, u64>,
    /// Distinct subscriptions that got at least one accepted wake-up.
    pub subscriptions_woken: u64,
    /// The most accepted wake-ups one subscription got.
    pub max_per_subscription: u64,
    /// How many subscriptions got exactly n accepted wake-ups, by n.
    pub per_subscription: BTreeMap<u64, u64>,
    /// Accepted wake-ups by their `Urgency` header (`none` when absent).
    pub urgency: BTreeMap<String, u64>,
    /// Accepted wake-ups with a `Topic` header.
    pub with_topic: u64,
    /// When the first and the last accepted wake-up arrived (ns since the
    /// epoch), 0 before the first.
    pub first_at_ns: u64,
    pub last_at_ns: u64,
}

struct Fake {
    /// `http://127.0.0.1:PORT`: the VAPID `aud` every token must carry.
    origin: String,
    /// Subscription ids this fake minted.
    known: Mutex<HashSet<String>>,
    /// Accepted wake-ups per subscription id.
    woken: Mutex<HashMap<String, u64>>,
    rejected: Mutex<BTreeMap<String, u64>>,
    urgency: Mutex<BTreeMap<String, u64>>,
    /// (token, key) pairs whose signature checked out.
    verified: Mutex<HashSet<(String, String)>>,
    requests: AtomicU64,
    with_topic: AtomicU64,
    first_at: AtomicU64,
    last_at: AtomicU64,
}

/// The running fake: its address, and the task serving it (aborted on
/// drop).
pub struct FakePush {
    fake: Arc<Fake>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl FakePush {
    /// Listens on `listen` (a loopback address; port 0 picks one).
    pub async fn start(listen: SocketAddr) -> anyhow::Result<Self> {
        anyhow::ensure!(
            listen.ip().is_loopback(),
            "the fake push service listens on loopback only, not {listen}"
        );
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the fake push service to {listen}"))?;
        let addr = listener.local_addr()?;
        let fake = Arc::new(Fake {
            origin: format!("http://{addr}"),
            known: Mutex::default(),
            woken: Mutex::default(),
            rejected: Mutex::default(),
            urgency: Mutex::default(),
            verified: Mutex::default(),
            requests: AtomicU64::new(0),
            with_topic: AtomicU64::new(0),
            first_at: AtomicU64::new(0),
            last_at: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/push/{id}", post(push))
            .with_state(fake.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake push service: {e}");
            }
        });
        Ok(Self { fake, addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the host the server must allow
    /// (`SEALPOST_PUSH_ALLOW_HOSTS=127.0.0.1:PORT`).
    pub fn origin(&self) -> &str {
        &self.fake.origin
    }

    /// A new subscription, as `PUT /v1/devices/{id}/push` takes it: a
    /// browser's `PushSubscription.toJSON()` plus `kind`. Its `p256dh` is a
    /// fresh P-256 public key (the server checks it is on the curve) and
    /// `auth` 16 random bytes; the private key is dropped, since this fake
    /// does not decrypt.
    pub fn subscribe(&self) -> Value {
        let mut rng = rand::rng();
        let secret = loop {
            let bytes: [u8; 32] = rng.random();
            // Zero or above the group order: about 2^-32 of draws.
            if let Ok(key) = p256::SecretKey::from_slice(&bytes) {
                break key;
            }
        };
        let point = secret.public_key().to_encoded_point(false);
        let auth: [u8; 16] = rng.random();
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.fake.known.lock().unwrap().insert(id.clone());
        json!({
            "kind": "webpush",
            "endpoint": format!("{}/push/{id}", self.fake.origin),
            "expirationTime": null,
            "keys": {
                "p256dh": URL_SAFE_NO_PAD.encode(point.as_bytes()),
                "auth": URL_SAFE_NO_PAD.encode(auth),
            },
        })
    }

    pub fn counts(&self) -> Counts {
        let fake = &self.fake;
        let woken = fake.woken.lock().unwrap();
        let mut per_subscription = BTreeMap::new();
        for &n in woken.values() {
            *per_subscription.entry(n).or_insert(0) += 1;
        }
        Counts {
            requests: fake.requests.load(Ordering::Relaxed),
            accepted: woken.values().sum(),
            rejected: fake.rejected.lock().unwrap().clone(),
            subscriptions_woken: woken.len() as u64,
            max_per_subscription: woken.values().copied().max().unwrap_or(0),
            per_subscription,
            urgency: fake.urgency.lock().unwrap().clone(),
            with_topic: fake.with_topic.load(Ordering::Relaxed),
            first_at_ns: fake.first_at.load(Ordering::Relaxed),
            last_at_ns: fake.last_at.load(Ordering::Relaxed),
        }
    }
}

impl Drop for FakePush {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn push(
    State(fake): State<Arc<Fake>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    fake.requests.fetch_add(1, Ordering::Relaxed);
    let (status, reason) = match fake.check(&id, &headers, &body) {
        Ok(()) => {
            fake.accept(&id, &headers);
            return StatusCode::CREATED;
        }
        Err(refusal) => refusal,
    };
    *fake
        .rejected
        .lock()
        .unwrap()
        .entry(reason.to_owned())
        .or_insert(0) += 1;
    status
}

impl Fake {
    fn check(
        &self,
        id: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), (StatusCode, &'static str)> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let bad = |reason| (StatusCode::BAD_REQUEST, reason);
        if !self.known.lock().unwrap().contains(id) {
            return Err((StatusCode::NOT_FOUND, "unknown_subscription"));
        }
        header("ttl")
            .and_then(|t| t.trim().parse::<u64>().ok())
            .ok_or(bad("ttl"))?;
        if !header("content-encoding").is_some_and(|e| e.eq_ignore_ascii_case("aes128gcm")) {
            return Err(bad("content_encoding"));
        }
        check_body(body).map_err(bad)?;
        if let Some(urgency) = header("urgency")
            && !matches!(urgency, "very-low" | "low" | "normal" | "high")
        {
            return Err(bad("urgency"));
        }
        if let Some(topic) = header("topic")
            && (topic.len() > 32 || !is_b64url_text(topic))
        {
            return Err(bad("topic"));
        }
        self.check_vapid(header("authorization").unwrap_or_default())
            .map_err(|reason| (StatusCode::UNAUTHORIZED, reason))
    }

    /// `vapid t=<jwt>, k=<b64url P-256 point>` (RFC 8292 section 3).
    fn check_vapid(&self, authorization: &str) -> Result<(), &'static str> {
        let params = authorization
            .strip_prefix("vapid ")
            .ok_or("authorization")?;
        let (mut token, mut key) = (None, None);
        for part in params.split(',') {
            let part = part.trim();
            if let Some(t) = part.strip_prefix("t=") {
                token = Some(t);
            } else if let Some(k) = part.strip_prefix("k=") {
                key = Some(k);
            }
        }
        let (token, key) = (token.ok_or("vapid_t")?, key.ok_or("vapid_k")?);
        let mut parts = token.split('.');
        let (Some(head), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("vapid_jwt");
        };
        let json = |part: &str| -> Option<Value> {
            serde_json::from_slice(&B64URL.decode(part).ok()?).ok()
        };
        let head = json(head).ok_or("vapid_jwt")?;
        if head["alg"] != "ES256" {
            return Err("vapid_alg");
        }
        let claims = json(claims).ok_or("vapid_jwt")?;
        if claims["aud"].as_str() != Some(self.origin.as_str()) {
            return Err("vapid_aud");
        }
        let now = (now_nanos() / 1_000_000_000) as i64;
        match claims["exp"].as_i64() {
            Some(exp) if exp > now && exp <= now + MAX_EXP_AHEAD_S => {}
            _ => return Err("vapid_exp"),
        }
        let sub = claims["sub"].as_str().unwrap_or_default();
        if !(sub.starts_with("mailto:") || sub.starts_with("https:")) {
            return Err("vapid_sub");
        }
        let pair = (token.to_owned(), key.to_owned());
        if self.verified.lock().unwrap().contains(&pair) {
            return Ok(());
        }
        let key = B64URL
            .decode(key)
            .ok()
            .and_then(|k| VerifyingKey::from_sec1_bytes(&k).ok())
            .ok_or("vapid_k")?;
        let signature = B64URL
            .decode(signature)
            .ok()
            .and_then(|s| Signature::from_slice(&s).ok())
            .ok_or("vapid_signature")?;
        let signed = &token[..token.rfind('.').expect("three parts")];
        key.verify(signed.as_bytes(), &signature)
            .map_err(|_| "vapid_signature")?;
        let mut verified = self.verified.lock().unwrap();
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        verified.insert(pair);
        Ok(())
    }

    fn accept(&self, id: &str, headers: &HeaderMap) {
        let now = now_nanos();
        let _ = self
            .first_at
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.last_at.fetch_max(now, Ordering::Relaxed);
        if headers.contains_key("topic") {
            self.with_topic.fetch_add(1, Ordering::Relaxed);
        }
        let urgency = headers
            .get("urgency")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        *self.urgency.lock().unwrap().entry(urgency).or_insert(0) += 1;
        *self.woken.lock().unwrap().entry(id.to_owned()).or_insert(0) += 1;
    }
}

/// RFC 8030 section 5.4: a topic is at most 32 characters of the base64url
/// alphabet (not necessarily decodable base64).
fn is_b64url_text(topic: &str) -> bool {
    topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An RFC 8188 `aes128gcm` body as RFC 8291 has it: one record, the key id
/// the sender's uncompressed P-256 public key.
fn check_body(body: &[u8]) -> Result<(), &'static str> {
    if body.len() < MIN_BODY || body.len() > MAX_BODY {
        return Err("body_size");
    }
    let record_size = u32::from_be_bytes(body[16..20].try_into().expect("4 bytes"));
    if record_size < 18 {
        return Err("body_record_size");
    }
    if body[20] != 65 || body[21] != 0x04 {
        return Err("body_key_id");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::SigningKey;
    use p256::ecdsa::signature::Signer;

    fn vapid(signing: &SigningKey, aud: &str, exp: i64, sub: &str) -> String {
        let head = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims =
            URL_SAFE_NO_PAD.encode(json!({ "aud": aud, "exp": exp, "sub": sub }).to_string());
        let signed = format!("{head}.{claims}");
        let signature: Signature = signing.sign(signed.as_bytes());
        let k = URL_SAFE_NO_PAD.encode(signing.verifying_key().to_encoded_point(false).as_bytes());
        format!(
            "vapid t={signed}.{}, k={k}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }

    fn body() -> Vec<u8> {
        let mut body = vec![7u8; 16];
        body.extend_from_slice(&4096u32.to_be_bytes());
        body.push(65);
        body.push(0x04);
        body.extend_from_slice(&[1u8; 64]);
        body.extend_from_slice(&[9u8; 40]);
        body
    }

    #[tokio::test]
    async fn counts_wake_ups_per_subscription_and_refuses_what_is_not_web_push() {
        let fake = FakePush::start("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let subscriptions: Vec<Value> = (0..3).map(|_| fake.subscribe()).collect();
        for sub in &subscriptions {
            let point = B64URL
                .decode(sub["keys"]["p256dh"].as_str().unwrap())
                .unwrap();
            assert!(p256::PublicKey::from_sec1_bytes(&point).is_ok(), "{sub}");
            assert_eq!(point.len(), 65);
            let auth = B64URL
                .decode(sub["keys"]["auth"].as_str().unwrap())
                .unwrap();
            assert_eq!(auth.len(), 16);
        }
        let signing = SigningKey::from_slice(&[3u8; 32]).unwrap();
        let now = (now_nanos() / 1_000_000_000) as i64;
        let good = vapid(
            &signing,
            fake.origin(),
            now + 12 * 3600,
            "mailto:ops@example.com",
        );
        let http = reqwest::Client::new();
        let post =
            |endpoint: &str, auth: &str, encoding: &str, ttl: Option<&str>, body: Vec<u8>| {
                let mut request = http
                    .post(endpoint)
                    .header("content-encoding", encoding)
                    .header("authorization", auth)
                    .header("urgency", "high")
                    .header("topic", "sealpost")
                    .body(body);
                if let Some(ttl) = ttl {
                    request = request.header("ttl", ttl);
                }
                async move { request.send().await.unwrap().status().as_u16() }
            };
        let endpoint = |n: usize| subscriptions[n]["endpoint"].as_str().unwrap().to_owned();
        // Two wake-ups to the first subscription, one to the second.
        for n in [0, 0, 1] {
            assert_eq!(
                post(&endpoint(n), &good, "aes128gcm", Some("86400"), body()).await,
                201
            );
        }
        // Each of these is refused, and none is counted as a wake-up.
        let wrong_aud = vapid(&signing, "http://127.0.0.1:1", now + 3600, "mailto:a@b.c");
        let late = vapid(&signing, fake.origin(), now + 48 * 3600, "mailto:a@b.c");
        let mut forged = good.clone();
        forged.replace_range(
            forged.find("k=").unwrap() + 2..,
            &URL_SAFE_NO_PAD.encode(
                SigningKey::from_slice(&[4u8; 32])
                    .unwrap()
                    .verifying_key()
                    .to_encoded_point(false)
                    .as_bytes(),
            ),
        );
        let cases = [
            (
                post(&endpoint(2), &good, "aesgcm", Some("60"), body()).await,
                400,
            ),
            (
                post(&endpoint(2), &good, "aes128gcm", None, body()).await,
                400,
            ),
            (
                post(&endpoint(2), &good, "aes128gcm", Some("60"), vec![0; 50]).await,
                400,
            ),
            (
                post(&endpoint(2), "WebPush x", "aes128gcm", Some("60"), body()).await,
                401,
            ),
            (
                post(&endpoint(2), &wrong_aud, "aes128gcm", Some("60"), body()).await,
                401,
            ),
            (
                post(&endpoint(2), &late, "aes128gcm", Some("60"), body()).await,
                401,
            ),
            (
                post(&endpoint(2), &forged, "aes128gcm", Some("60"), body()).await,
                401,
            ),
            (
                post(
                    &format!("{}/push/nobody", fake.origin()),
                    &good,
                    "aes128gcm",
                    Some("60"),
                    body(),
                )
                .await,
                404,
            ),
        ];
        for (n, (got, want)) in cases.iter().enumerate() {
            assert_eq!(got, want, "case {n}");
        }
        let counts = fake.counts();
        assert_eq!(counts.requests, 11);
        assert_eq!(counts.accepted, 3);
        assert_eq!(counts.subscriptions_woken, 2);
        assert_eq!(counts.max_per_subscription, 2);
        assert_eq!(counts.per_subscription, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(counts.urgency, BTreeMap::from([("high".to_owned(), 3)]));
        assert_eq!(counts.with_topic, 3);
        assert!(counts.first_at_ns > 0 && counts.last_at_ns >= counts.first_at_ns);
        let rejected: Vec<(&str, u64)> = counts
            .rejected
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(
            rejected,
            [
                ("authorization", 1),
                ("body_size", 1),
                ("content_encoding", 1),
                ("ttl", 1),
                ("unknown_subscription", 1),
                ("vapid_aud", 1),
                ("vapid_exp", 1),
                ("vapid_signature", 1),
            ]
        );
    }
}
