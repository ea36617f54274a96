//! The Web Push provider (RFC 8030, 8291, 8292): browsers, UnifiedPush
//! distributors and FCM's Web Push endpoint, all through one protocol.
//!
//! A wake-up is a `POST` to the subscription's endpoint whose body is a
//! constant plaintext, `{"type":"wake"}`, encrypted to the browser's
//! `p256dh` key and `auth` secret (`aes128gcm`, one record, so every
//! wake-up has the same size and says nothing), with `TTL` (a day: a phone
//! off for longer gets its messages when it next connects anyway),
//! `Urgency`, a constant `Topic` (the service keeps only the newest
//! undelivered push of a topic: wake-ups collapse there too) and VAPID.
//! The endpoint never appears in a log line or an outcome's text.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, header};

use super::http::{Answer, Outbound, OutboundError};
use super::provider::{Outcome, Provider, Urgency, retry_after_within};
use super::target::{Kind, Target};
use super::vapid::Vapid;

/// What every wake-up says, whoever it is for.
pub const PLAINTEXT: &[u8] = br#"{"type":"wake"}"#;

/// How long the push service keeps a wake-up for a device that is off
/// (`TTL`, in seconds): a day, as the issue asks. Longer is useless (the
/// device will connect before and read its queue), shorter loses the
/// wake-up of a phone switched off for the night.
pub const TTL_SECONDS: u32 = 86_400;

/// The constant `Topic`: a newer wake-up replaces one still undelivered.
pub const TOPIC: &str = "sealpost";

/// The longest `Retry-After` honoured: a service asking for more is
/// retried after this (the scheduler's backoff takes over from there).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The most of a service's error answer that goes into a log line.
const MAX_REASON: usize = 120;

pub struct WebPushProvider {
    vapid: Vapid,
    outbound: Arc<Outbound>,
}

impl WebPushProvider {
    pub fn new(vapid: Vapid, outbound: Arc<Outbound>) -> Self {
        Self { vapid, outbound }
    }

    /// The VAPID public key browsers subscribe with.
    pub fn public_key(&self) -> &str {
        self.vapid.public_key()
    }

    /// The request for one wake-up, or why there can be none (the text
    /// names no endpoint or key).
    pub fn request(&self, target: &Target, urgency: Urgency) -> Result<Request<Bytes>, String> {
        let Target::WebPush {
            endpoint,
            p256dh,
            auth,
        } = target
        else {
            return Err(format!(
                "a {} target handed to the Web Push provider",
                target.kind().as_str()
            ));
        };
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|_| "the stored endpoint is not a URL")?;
        let auth: [u8; 16] = auth
            .as_slice()
            .try_into()
            .map_err(|_| "the stored auth secret is not 16 bytes")?;
        let body = encrypt(PLAINTEXT, p256dh, &auth)?;
        let authorization = self.vapid.authorization(&uri)?;
        Request::post(uri)
            .header("TTL", TTL_SECONDS)
            .header(
                "Urgency",
                match urgency {
                    Urgency::High => "high",
                    Urgency::Low => "low",
                },
            )
            .header("Topic", TOPIC)
            .header(header::CONTENT_ENCODING, "aes128gcm")
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, body.len())
            .header(header::AUTHORIZATION, &*authorization)
            .body(Bytes::from(body))
            .map_err(|_| "cannot build the request".to_owned())
    }
}

#[async_trait]
impl Provider for WebPushProvider {
    fn kind(&self) -> Kind {
        Kind::WebPush
    }

    async fn wake(&self, target: &Target, urgency: Urgency) -> Outcome {
        let request = match self.request(target, urgency) {
            Ok(request) => request,
            // Targets are checked when registered, so this is our bug or a
            // stored row we cannot read: keep the target, say so.
            Err(why) => return Outcome::Config(why),
        };
        // No error's text names the URL.
        match self.outbound.send(request).await {
            Ok(answer) => outcome(&answer),
            // The endpoint now resolves only to addresses the SSRF guard
            // forbids: never sent to, but kept (a name may resolve
            // elsewhere later, and what we cannot tell apart from our own
            // mistake we do not delete); logged and counted.
            Err(e @ OutboundError::Refused(_)) => Outcome::Config(e.to_string()),
            // Timeouts, refused or reset connections, a name that does not
            // resolve: the service's trouble, retried with backoff.
            Err(e @ (OutboundError::Timeout | OutboundError::Failed(_))) => {
                Outcome::Transient(e.to_string())
            }
        }
    }
}

/// What a push service's answer means (RFC 8030 section 5 and what the
/// big services answer).
pub fn outcome(answer: &Answer) -> Outcome {
    let status = answer.status;
    match status.as_u16() {
        200..=299 => Outcome::Sent,
        // The subscription expired or was unsubscribed.
        404 | 410 => Outcome::Gone,
        429 => Outcome::Throttled(retry_after_within(&answer.headers, MAX_RETRY_AFTER)),
        500..=599 => Outcome::Transient(format!("push service answered {status}")),
        // 400 (bad headers), 401/403 (VAPID refused: a wrong key or
        // subject), 413 (too large): ours to fix, never the device's, so
        // the target is kept. Mozilla's service once answered 404 to a
        // wrong VAPID key; what we cannot tell apart we keep too.
        _ => Outcome::Config(format!(
            "push service answered {status}{}",
            reason(&answer.body)
        )),
    }
}

/// The start of an error answer, for the log: services say what they
/// refused (Apple `{"reason":"BadJwtToken"}`, Mozilla a JSON `message`).
/// Printable ASCII only, and short.
fn reason(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_REASON)
        .collect();
    if text.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", text.trim())
    }
}

/// RFC 8291 §3.4: `plaintext` encrypted to a subscription (its `p256dh`
/// and `auth`), as one `aes128gcm` record (RFC 8188) under a new ephemeral
/// key, the key id being that key's uncompressed point.
fn encrypt(plaintext: &[u8], p256dh: &[u8], auth: &[u8; 16]) -> Result<Vec<u8>, String> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use ring::{agreement, hkdf, rand::SecureRandom};

    /// The 32-byte IKM that HKDF expands to.
    struct Ikm;
    impl hkdf::KeyType for Ikm {
        fn len(&self) -> usize {
            32
        }
    }

    // The browser's key as the info string has it: uncompressed, whatever
    // form it was registered in.
    let ua_public = p256::PublicKey::from_sec1_bytes(p256dh)
        .map_err(|_| "the stored p256dh is not a P-256 point")?;
    let ua_public = ua_public.to_encoded_point(false);
    let rng = ring::rand::SystemRandom::new();
    let failed = |_| "cannot encrypt the wake-up".to_owned();
    let private =
        agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng).map_err(failed)?;
    let as_public = private.compute_public_key().map_err(failed)?;
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, ua_public.as_bytes());
    let ikm = agreement::agree_ephemeral(private, &peer, |ecdh_secret| {
        // IKM = HKDF(salt = auth, ikm = ECDH secret,
        //            info = "WebPush: info" 0x00 || ua_public || as_public)
        let info = [
            b"WebPush: info\0".as_slice(),
            ua_public.as_bytes(),
            as_public.as_ref(),
        ];
        let mut ikm = [0u8; 32];
        hkdf::Salt::new(hkdf::HKDF_SHA256, auth)
            .extract(ecdh_secret)
            .expand(&info, Ikm)
            .and_then(|okm| okm.fill(&mut ikm))
            .map(|()| ikm)
    })
    .map_err(failed)?
    .map_err(failed)?;
    let mut salt = [0u8; 16];
    rng.fill(&mut salt).map_err(failed)?;
    // One record: the plaintext, its delimiter and the 16-byte tag.
    let record_size = u32::try_from(plaintext.len() + 17).map_err(|_| "the wake-up is too long")?;
    ece_native::encrypt(
        ikm,
        salt,
        as_public.as_ref(),
        std::iter::once(plaintext.to_vec()),
        record_size,
    )
    .map_err(|err| format!("cannot encrypt the wake-up: {err:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::http::fake_answer as answer;

    /// What we encrypt, another implementation (`web-push-native`, on
    /// RustCrypto) decrypts with the subscription's private key; each
    /// wake-up under a new key and salt.
    #[test]
    fn a_wakeup_decrypts_with_the_subscription_key() {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        let secret = p256::SecretKey::random(&mut p256::elliptic_curve::rand_core::OsRng);
        let public = secret.public_key().to_encoded_point(false);
        let auth = [7u8; 16];
        let one = encrypt(PLAINTEXT, public.as_bytes(), &auth).unwrap();
        let two = encrypt(PLAINTEXT, public.as_bytes(), &auth).unwrap();
        assert_ne!(one, two);
        assert_eq!(one.len(), two.len(), "every wake-up has the same size");
        for body in [one, two] {
            let plain = web_push_native::decrypt(body, &secret, &auth.into()).unwrap();
            assert_eq!(plain, PLAINTEXT);
        }
        // A compressed key is the same key.
        let compressed = secret.public_key().to_encoded_point(true);
        let body = encrypt(PLAINTEXT, compressed.as_bytes(), &auth).unwrap();
        assert_eq!(
            web_push_native::decrypt(body, &secret, &auth.into()).unwrap(),
            PLAINTEXT
        );
        // The wrong auth secret does not decrypt it.
        let body = encrypt(PLAINTEXT, public.as_bytes(), &auth).unwrap();
        assert!(web_push_native::decrypt(body, &secret, &[8u8; 16].into()).is_err());
        assert!(encrypt(PLAINTEXT, &[4u8; 65], &auth).is_err());
    }

    #[test]
    fn answers_map_to_outcomes() {
        for status in [200, 201, 202] {
            assert_eq!(outcome(&answer(status, &[], "")), Outcome::Sent, "{status}");
        }
        for status in [404, 410] {
            assert_eq!(outcome(&answer(status, &[], "")), Outcome::Gone, "{status}");
        }
        assert_eq!(
            outcome(&answer(429, &[("retry-after", "7")], "")),
            Outcome::Throttled(Some(Duration::from_secs(7)))
        );
        assert_eq!(outcome(&answer(429, &[], "")), Outcome::Throttled(None));
        for status in [500, 502, 503] {
            assert!(
                matches!(outcome(&answer(status, &[], "")), Outcome::Transient(_)),
                "{status}"
            );
        }
        for status in [400, 401, 403, 413, 301] {
            assert!(
                matches!(outcome(&answer(status, &[], "")), Outcome::Config(_)),
                "{status}"
            );
        }
        let Outcome::Config(why) = outcome(&answer(403, &[], "{\"reason\":\"BadJwtToken\"}\n"))
        else {
            panic!()
        };
        assert!(why.contains("403") && why.contains("BadJwtToken"), "{why}");
    }

    #[test]
    fn retry_after_is_bounded_by_a_day() {
        let wait = |v: &str| outcome(&answer(429, &[("retry-after", v)], ""));
        assert_eq!(
            wait("7200"),
            Outcome::Throttled(Some(Duration::from_secs(7200)))
        );
        assert_eq!(wait("9999999"), Outcome::Throttled(Some(MAX_RETRY_AFTER)));
    }
}
