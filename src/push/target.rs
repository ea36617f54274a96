//! A device's push target: what a client registers
//! (`PUT /v1/devices/{id}/push`, a [`TargetRequest`]), how it is checked
//! ([`TargetRequest::check`]: the SSRF guard on a Web Push endpoint, keys
//! that work, tokens of the right shape), and the form it is kept in (JSON,
//! sealed at rest by [`crate::seal`] like a queued message and bound to its
//! device: an endpoint or token is a capability to notify the device).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::guard::{self, AllowHosts};
use crate::error::{Error, Result};
use crate::seal::{KeyRing, SealError};
use crate::store::{DeviceId, StoredTarget};

/// The three kinds of target, by their wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    #[serde(rename = "webpush")]
    WebPush,
    #[serde(rename = "apns")]
    Apns,
    #[serde(rename = "fcm")]
    Fcm,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::WebPush => "webpush",
            Kind::Apns => "apns",
            Kind::Fcm => "fcm",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "webpush" => Some(Kind::WebPush),
            "apns" => Some(Kind::Apns),
            "fcm" => Some(Kind::Fcm),
            _ => None,
        }
    }
}

/// APNs's two services: tokens of an app built for development are only
/// known to the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApnsEnvironment {
    Production,
    Sandbox,
}

/// A checked target, as it is stored (sealed) and handed to a provider.
/// `Debug` never shows the endpoint, keys or token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Target {
    #[serde(rename = "webpush")]
    WebPush {
        /// An `https` URL (or `http` for an allowed host), at most 1000
        /// bytes.
        endpoint: String,
        /// The browser's P-256 public key, uncompressed (65 bytes).
        #[serde(with = "b64url")]
        p256dh: Vec<u8>,
        /// The browser's authentication secret (16 bytes).
        #[serde(with = "b64url")]
        auth: Vec<u8>,
    },
    #[serde(rename = "apns")]
    Apns {
        /// Lowercase hex.
        token: String,
        /// The app's bundle id (`apns-topic`).
        topic: String,
        environment: ApnsEnvironment,
    },
    #[serde(rename = "fcm")]
    Fcm { token: String },
}

impl Target {
    pub fn kind(&self) -> Kind {
        match self {
            Target::WebPush { .. } => Kind::WebPush,
            Target::Apns { .. } => Kind::Apns,
            Target::Fcm { .. } => Kind::Fcm,
        }
    }
}

impl Target {
    /// The sealed JSON the store keeps for `user`'s `device`: it opens on
    /// that device's row only.
    pub fn seal(&self, keys: &KeyRing, user: Uuid, device: DeviceId) -> Result<Vec<u8>, SealError> {
        // Serializing these fields cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        keys.seal_target(user, device, &json)
    }

    /// Opens a stored target. One that does not open (altered, moved, its
    /// key dropped from the ring) or does not parse is as good as none:
    /// logged, without its content, and `None`.
    pub fn open(
        keys: &KeyRing,
        user: Uuid,
        device: DeviceId,
        stored: &StoredTarget,
    ) -> Option<Target> {
        let opened = keys
            .open_target(user, device, &stored.sealed)
            .map_err(|err| err.to_string())
            .and_then(|json| {
                serde_json::from_slice::<Target>(&json)
                    .map_err(|_| "a push target opened but is not a target".to_owned())
            })
            .and_then(|target| {
                if target.kind() == stored.kind {
                    Ok(target)
                } else {
                    Err("a push target's kind is not the kind its row names".to_owned())
                }
            });
        match opened {
            Ok(target) => Some(target),
            Err(error) => {
                tracing::warn!(user.id = %user, device, error, "ignoring a push target that does not open; the device has none until it registers again");
                None
            }
        }
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.kind().as_str())
    }
}

/// `PUT /v1/devices/{device_id}/push`: a browser's
/// `PushSubscription.toJSON()` plus `kind` (its `expirationTime` and any
/// other field are ignored), or an APNs or FCM token.
#[derive(Deserialize, ToSchema)]
pub struct TargetRequest {
    /// `webpush`, `apns` or `fcm`.
    #[schema(example = "webpush")]
    pub kind: String,
    /// Web Push: the subscription's endpoint, an `https` URL of at most
    /// 1000 bytes on a public address.
    #[schema(max_length = 1000)]
    pub endpoint: Option<String>,
    /// Web Push: the subscription's keys.
    pub keys: Option<WebPushKeys>,
    /// APNs: the device token (hex). FCM: the registration token.
    #[schema(max_length = 4096)]
    pub token: Option<String>,
    /// APNs: the app's bundle id (`apns-topic`).
    #[schema(max_length = 255)]
    pub topic: Option<String>,
    /// APNs: `production` (the default) or `sandbox` (an app built for
    /// development).
    pub environment: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct WebPushKeys {
    /// The browser's P-256 public key, uncompressed (65 bytes), base64url.
    pub p256dh: Option<String>,
    /// The browser's authentication secret (16 bytes), base64url.
    pub auth: Option<String>,
}

/// The shortest and longest APNs device token accepted, in bytes: Apple's
/// are 32 today and documented as variable length (up to 100); 200 leaves
/// room without letting a client store kilobytes.
const APNS_TOKEN_BYTES: std::ops::RangeInclusive<usize> = 32..=200;
/// The longest APNs topic (a bundle id, with a suffix such as `.voip`).
const MAX_TOPIC_BYTES: usize = 255;
/// The longest FCM registration token: real ones are about 160 characters.
const MAX_FCM_TOKEN_BYTES: usize = 4096;

impl TargetRequest {
    /// The kind, or a field error naming `kind`.
    pub fn kind(&self) -> Result<Kind> {
        Kind::parse(&self.kind)
            .ok_or_else(|| Error::field("kind", "must be `webpush`, `apns` or `fcm`"))
    }

    /// Checks the request into a [`Target`]. A Web Push endpoint passes the
    /// SSRF guard ([`guard::check_endpoint`], its name resolved within
    /// `resolve_timeout`) unless `allow` lists its host.
    pub async fn check(self, allow: &AllowHosts, resolve_timeout: Duration) -> Result<Target> {
        match self.kind()? {
            Kind::WebPush => {
                let endpoint = required(self.endpoint, "endpoint")?;
                guard::check_endpoint(&endpoint, allow, resolve_timeout)
                    .await
                    .map_err(|message| Error::field("endpoint", message))?;
                let keys = self
                    .keys
                    .ok_or_else(|| Error::field("keys", "is required for kind `webpush`"))?;
                let p256dh = b64url_field(required(keys.p256dh, "keys.p256dh")?, "keys.p256dh")?;
                check_p256dh(&p256dh)?;
                let auth = b64url_field(required(keys.auth, "keys.auth")?, "keys.auth")?;
                if auth.len() != 16 {
                    return Err(Error::field("keys.auth", "must be 16 bytes, base64url"));
                }
                Ok(Target::WebPush {
                    endpoint,
                    p256dh,
                    auth,
                })
            }
            Kind::Apns => {
                let token = required(self.token, "token")?;
                let hex_ok = token.len() % 2 == 0
                    && APNS_TOKEN_BYTES.contains(&(token.len() / 2))
                    && token.bytes().all(|b| b.is_ascii_hexdigit());
                if !hex_ok {
                    return Err(Error::field(
                        "token",
                        format!(
                            "must be an APNs device token: hex, {} to {} bytes",
                            APNS_TOKEN_BYTES.start(),
                            APNS_TOKEN_BYTES.end()
                        ),
                    ));
                }
                let topic = required(self.topic, "topic")?;
                let topic_ok = !topic.is_empty()
                    && topic.len() <= MAX_TOPIC_BYTES
                    && !topic.chars().any(|c| c.is_control() || c.is_whitespace());
                if !topic_ok {
                    return Err(Error::field(
                        "topic",
                        format!(
                            "must be the app's bundle id: 1 to {MAX_TOPIC_BYTES} bytes, no spaces or control characters"
                        ),
                    ));
                }
                let environment = match self.environment.as_deref() {
                    None | Some("production") => ApnsEnvironment::Production,
                    Some("sandbox") => ApnsEnvironment::Sandbox,
                    Some(_) => {
                        return Err(Error::field(
                            "environment",
                            "must be `production` or `sandbox`",
                        ));
                    }
                };
                Ok(Target::Apns {
                    token: token.to_ascii_lowercase(),
                    topic,
                    environment,
                })
            }
            Kind::Fcm => {
                let token = required(self.token, "token")?;
                let ok = !token.is_empty()
                    && token.len() <= MAX_FCM_TOKEN_BYTES
                    && token.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(Error::field(
                        "token",
                        format!(
                            "must be an FCM registration token: 1 to {MAX_FCM_TOKEN_BYTES} printable ASCII characters"
                        ),
                    ));
                }
                Ok(Target::Fcm { token })
            }
        }
    }
}

fn required(value: Option<String>, field: &'static str) -> Result<String> {
    value.ok_or_else(|| Error::field(field, "is required for this kind"))
}

/// Base64url, as browsers give it (unpadded; padding is tolerated).
fn b64url_field(text: String, field: &'static str) -> Result<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| Error::field(field, "must be base64url"))
}

/// The browser's key: an uncompressed SEC1 point (65 bytes, `0x04`
/// first) that is on P-256. A point off the curve would make every
/// wake-up's ECDH fail, or worse, leak bits of our ephemeral key (an
/// invalid-curve attack).
fn check_p256dh(bytes: &[u8]) -> Result<()> {
    let uncompressed = bytes.len() == 65 && bytes[0] == 0x04;
    if uncompressed && p256::PublicKey::from_sec1_bytes(bytes).is_ok() {
        return Ok(());
    }
    Err(Error::field(
        "keys.p256dh",
        "must be an uncompressed P-256 public key on the curve: 65 bytes, base64url",
    ))
}

mod b64url {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real browser subscription's key (from the Web Push test vectors
    /// of RFC 8291, section 5).
    const P256DH: &str =
        "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
    const AUTH: &str = "BTBZMqHH6r4Tts7J_aSIgg";

    fn webpush(endpoint: &str, p256dh: &str, auth: &str) -> TargetRequest {
        serde_json::from_value(serde_json::json!({
            "kind": "webpush", "endpoint": endpoint, "expirationTime": null,
            "keys": { "p256dh": p256dh, "auth": auth },
        }))
        .unwrap()
    }

    async fn field(request: TargetRequest) -> String {
        let err = request
            .check(&AllowHosts::default(), Duration::from_secs(5))
            .await
            .unwrap_err();
        match err {
            Error::Invalid { field: Some(f), .. } => f.into_owned(),
            other => panic!("not a field error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_browser_subscription_is_taken_as_it_comes() {
        let allow = AllowHosts::parse(&["push.test".into()]).unwrap();
        let target = webpush("https://push.test/sub/1", P256DH, AUTH)
            .check(&allow, Duration::from_secs(5))
            .await
            .unwrap();
        let Target::WebPush { p256dh, auth, .. } = &target else {
            panic!("{target:?}");
        };
        assert_eq!((p256dh.len(), auth.len()), (65, 16));
        assert_eq!(format!("{target:?}"), "Target(webpush)");
    }

    #[tokio::test]
    async fn bad_keys_are_refused_by_field() {
        let allow = AllowHosts::parse(&["push.test".into()]).unwrap();
        let check = |r: TargetRequest| {
            let allow = allow.clone();
            async move {
                match r.check(&allow, Duration::from_secs(5)).await {
                    Err(Error::Invalid { field: Some(f), .. }) => f.into_owned(),
                    other => panic!("{:?}", other.map(|t| format!("{t:?}"))),
                }
            }
        };
        // Off the curve: the last coordinate byte changed.
        let mut off = URL_SAFE_NO_PAD.decode(P256DH).unwrap();
        off[64] ^= 1;
        let off = URL_SAFE_NO_PAD.encode(off);
        let short = URL_SAFE_NO_PAD.encode([4u8; 33]);
        for bad in [off.as_str(), short.as_str(), "!!"] {
            assert_eq!(
                check(webpush("https://push.test/x", bad, AUTH)).await,
                "keys.p256dh"
            );
        }
        let auth15 = URL_SAFE_NO_PAD.encode([7u8; 15]);
        assert_eq!(
            check(webpush("https://push.test/x", P256DH, &auth15)).await,
            "keys.auth"
        );
        assert_eq!(
            field(webpush("http://push.example.com/x", P256DH, AUTH)).await,
            "endpoint"
        );
    }

    #[tokio::test]
    async fn native_tokens() {
        let apns = |token: &str, topic: &str| -> TargetRequest {
            serde_json::from_value(serde_json::json!({
                "kind": "apns", "token": token, "topic": topic,
            }))
            .unwrap()
        };
        let none = AllowHosts::default();
        let good = "AB".repeat(32);
        let target = apns(&good, "com.example.app")
            .check(&none, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(
            target,
            Target::Apns {
                token: "ab".repeat(32),
                topic: "com.example.app".into(),
                environment: ApnsEnvironment::Production,
            }
        );
        for token in [
            "zz".repeat(32),
            "a".repeat(65),
            "ab".repeat(31),
            "ab".repeat(201),
        ] {
            assert_eq!(field(apns(&token, "com.example.app")).await, "token");
        }
        for topic in ["", "com.example app", "com.example\napp", &"a".repeat(256)] {
            assert_eq!(field(apns(&good, topic)).await, "topic");
        }
        let fcm = |token: &str| -> TargetRequest {
            serde_json::from_value(serde_json::json!({ "kind": "fcm", "token": token })).unwrap()
        };
        assert!(
            fcm("dGVzdA:APA91b-x_y")
                .check(&none, Duration::ZERO)
                .await
                .is_ok()
        );
        for token in ["", "a b", "caf\u{e9}", &"a".repeat(4097)] {
            assert_eq!(field(fcm(token)).await, "token");
        }
        let unknown: TargetRequest =
            serde_json::from_value(serde_json::json!({ "kind": "carrier-pigeon" })).unwrap();
        assert_eq!(field(unknown).await, "kind");
    }

    #[test]
    fn a_sealed_target_opens_on_its_device_only() {
        let keys = KeyRing::generate().unwrap();
        let user = Uuid::new_v4();
        let target = Target::Fcm {
            token: "secret-token".into(),
        };
        let sealed = target.seal(&keys, user, 4).unwrap();
        let stored = |sealed: Vec<u8>, kind| StoredTarget {
            kind,
            sealed,
            updated_at: crate::store::now(),
        };
        assert_eq!(
            Target::open(&keys, user, 4, &stored(sealed.clone(), Kind::Fcm)),
            Some(target)
        );
        assert_eq!(
            Target::open(&keys, user, 5, &stored(sealed.clone(), Kind::Fcm)),
            None
        );
        assert_eq!(
            Target::open(&keys, user, 4, &stored(sealed, Kind::Apns)),
            None
        );
    }
}
