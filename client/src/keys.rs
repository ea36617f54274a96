//! A device's own key pair: made once on the device, its public half
//! published as the device's `public_key`, its secret half never sent.
//!
//! [`DeviceKeys`] serialises (serde) to `{"secret_key": "<base64>"}` so that
//! an application can keep it in its own storage; the public key is derived
//! from it. Its `Debug` never prints the secret.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crypto_box::aead::OsRng;
use crypto_box::{PublicKey, SecretKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// A device's libsodium `crypto_box` key pair (X25519).
#[derive(Clone)]
pub struct DeviceKeys {
    secret: SecretKey,
}

impl DeviceKeys {
    /// A fresh key pair from the operating system's random source, as
    /// `crypto_box_keypair` makes one.
    pub fn generate() -> Self {
        Self {
            secret: SecretKey::generate(&mut OsRng),
        }
    }

    /// The key pair of a 32-byte secret key (as `crypto_box_keypair`
    /// writes it).
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        Self {
            secret: SecretKey::from(bytes),
        }
    }

    /// The 32 secret bytes, for storage the application protects itself.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The public key, as the server and peers know it: base64 of 32 bytes.
    pub fn public_key_base64(&self) -> String {
        STANDARD.encode(self.secret.public_key().as_bytes())
    }

    pub(crate) fn secret(&self) -> &SecretKey {
        &self.secret
    }
}

impl fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceKeys")
            .field("public_key", &self.public_key_base64())
            .field("secret_key", &"<hidden>")
            .finish()
    }
}

/// The base64 of a public key on the wire as a `crypto_box` key: `None`
/// for one that is not 32 bytes (a device of another body format).
pub(crate) fn public_key(base64: &str) -> Option<PublicKey> {
    let bytes = STANDARD.decode(base64).ok()?;
    let bytes: [u8; 32] = bytes.try_into().ok()?;
    Some(PublicKey::from(bytes))
}

#[derive(Serialize, Deserialize)]
struct Stored {
    secret_key: String,
}

impl Serialize for DeviceKeys {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        Stored {
            secret_key: STANDARD.encode(self.secret.to_bytes()),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for DeviceKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let stored = Stored::deserialize(deserializer)?;
        decode_secret(&stored.secret_key).map_err(serde::de::Error::custom)
    }
}

fn decode_secret(text: &str) -> Result<DeviceKeys> {
    let bytes = STANDARD
        .decode(text)
        .map_err(|e| Error::Key(format!("secret key is not base64: {e}")))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| Error::Key("secret key is not 32 bytes".into()))?;
    Ok(DeviceKeys::from_secret_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_serde_and_hides_the_secret() {
        let keys = DeviceKeys::generate();
        let json = serde_json::to_string(&keys).unwrap();
        let back: DeviceKeys = serde_json::from_str(&json).unwrap();
        assert_eq!(back.secret_bytes(), keys.secret_bytes());
        assert_eq!(back.public_key_base64(), keys.public_key_base64());
        let debug = format!("{keys:?}");
        assert!(
            !debug.contains(&STANDARD.encode(keys.secret_bytes())),
            "{debug}"
        );
        assert!(debug.contains(&keys.public_key_base64()));
    }

    #[test]
    fn refuses_a_short_secret() {
        let err = serde_json::from_str::<DeviceKeys>(r#"{"secret_key":"AAAA"}"#).unwrap_err();
        assert!(err.to_string().contains("32 bytes"), "{err}");
    }
}
