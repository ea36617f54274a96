//! A device's push target: what a client registers
//! (`PUT /v1/devices/{id}/push`), how it is checked, and the form it is
//! kept in (JSON, sealed at rest by [`crate::seal`] like a queued message:
//! an endpoint or token is a capability to notify the device).

use serde::{Deserialize, Serialize};

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

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.kind().as_str())
    }
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
