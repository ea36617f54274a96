//! Access tokens (HS256 JWTs) and refresh tokens (random, stored hashed).
//!
//! An access token carries the user id (`sub`), the device (`dev`) and the
//! session id (`sid`, the refresh-token family it was issued from), so that
//! a later revocation of a session can find its tokens and sockets. A token
//! without `dev` was issued before devices existed and belongs to device 1,
//! where the upgrade moved every session. Refresh tokens are 256 bits
//! shown to the client once; the store keeps only their SHA-256, which is
//! enough for a secret with that much entropy.
//!
//! A session's first refresh token is random; each later one is its
//! predecessor's [`Tokens::successor`]: an HMAC of the predecessor under a
//! key derived from the signing secret. That is what lets a refresh whose
//! answer was lost be answered again with the same pair within
//! `SEALPOST_REFRESH_GRACE` ([`crate::store::Rotation::Replayed`]): any
//! node of a cluster recomputes the successor from the token presented
//! (they share the secret), and the store still holds only hashes. Without
//! the secret a successor is as unguessable as a random token; with it, a
//! holder of the signing key can mint access tokens anyway.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::Secret;
use crate::error::{Error, Result};
use crate::store::DeviceId;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user.
    pub sub: Uuid,
    /// The user's device the session belongs to.
    #[serde(default = "first_device")]
    pub dev: DeviceId,
    /// The session: the refresh-token family this token belongs to.
    pub sid: Uuid,
    pub iat: i64,
    pub exp: i64,
}

fn first_device() -> DeviceId {
    1
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    /// Derives each refresh token from the one it replaces; a key of its
    /// own, derived from the signing secret, so that no JWT signature is
    /// ever a refresh token or the other way round.
    successor: Hmac<Sha256>,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
}

/// What the successor key is derived for: changing it would change every
/// successor, and a refresh replayed across the change would be taken for
/// a reuse.
const SUCCESSOR_LABEL: &[u8] = b"sealpost refresh-token successor v1";

/// A newly minted refresh token: `token` goes to the client, `hash` to the
/// store.
pub struct NewRefreshToken {
    pub token: String,
    pub hash: [u8; 32],
}

impl Tokens {
    pub fn new(secret: &Secret, access_ttl: Duration, refresh_ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // We are the only issuer and verifier, on one clock: an expired token
        // is expired, with no grace period.
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let mut derive =
            Hmac::<Sha256>::new_from_slice(secret.expose()).expect("HMAC takes any key length");
        derive.update(SUCCESSOR_LABEL);
        let successor = Hmac::<Sha256>::new_from_slice(&derive.finalize().into_bytes())
            .expect("HMAC takes any key length");
        Self {
            encoding: EncodingKey::from_secret(secret.expose()),
            decoding: DecodingKey::from_secret(secret.expose()),
            validation,
            successor,
            access_ttl,
            refresh_ttl,
        }
    }

    /// Signs an access token for `user`'s `device` in session `session`.
    pub fn issue_access(
        &self,
        user: Uuid,
        device: DeviceId,
        session: Uuid,
        now: DateTime<Utc>,
    ) -> Result<String> {
        let claims = Claims {
            sub: user,
            dev: device,
            sid: session,
            iat: now.timestamp(),
            exp: crate::store::add(now, self.access_ttl).timestamp(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| Error::Internal(anyhow::anyhow!("signing access token: {e}")))
    }

    /// Checks signature, algorithm and expiry.
    pub fn verify_access(&self, token: &str) -> Result<Claims> {
        self.verify_access_at(token, Utc::now())
    }

    /// As [`Tokens::verify_access`] at the time `now`: a token is expired
    /// from the instant `exp` on. jsonwebtoken compares `exp` with the
    /// current whole second, and accepts `exp == now`, so a token passed for
    /// up to a second after `exp`, while a socket closes at `exp` itself:
    /// the same token must not be refused on one and accepted on the other.
    fn verify_access_at(&self, token: &str, now: DateTime<Utc>) -> Result<Claims> {
        const REFUSED: Error = Error::Unauthorized("invalid or expired access token");
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|_| REFUSED)?;
        if now.timestamp() >= claims.exp {
            return Err(REFUSED);
        }
        Ok(claims)
    }

    /// A random refresh token: the first of a session.
    pub fn new_refresh() -> NewRefreshToken {
        let bytes: [u8; 32] = rand::random();
        Self::refresh_of(bytes)
    }

    /// The refresh token that replaces `presented` at its rotation: the
    /// same for the same token on every node, so that a replay within the
    /// grace can be answered with it again.
    pub fn successor(&self, presented: &str) -> NewRefreshToken {
        let mut mac = self.successor.clone();
        mac.update(presented.as_bytes());
        Self::refresh_of(mac.finalize().into_bytes().into())
    }

    fn refresh_of(bytes: [u8; 32]) -> NewRefreshToken {
        let token = URL_SAFE_NO_PAD.encode(bytes);
        let hash = hash_refresh(&token);
        NewRefreshToken { token, hash }
    }
}

pub fn hash_refresh(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ttl: Duration) -> Tokens {
        Tokens::new(&Secret::new("k".repeat(32)), ttl, Duration::from_secs(60))
    }

    #[test]
    fn access_tokens_round_trip() {
        let tokens = tokens(Duration::from_secs(60));
        let (user, session) = (Uuid::new_v4(), Uuid::new_v4());
        let jwt = tokens.issue_access(user, 3, session, Utc::now()).unwrap();
        let claims = tokens.verify_access(&jwt).unwrap();
        assert_eq!((claims.sub, claims.dev, claims.sid), (user, 3, session));
    }

    /// Tokens minted before devices carry no `dev`: they are device 1's.
    #[test]
    fn a_token_without_a_device_is_device_1s() {
        #[derive(Serialize)]
        struct Old {
            sub: Uuid,
            sid: Uuid,
            iat: i64,
            exp: i64,
        }
        let secret = Secret::new("k".repeat(32));
        let now = Utc::now().timestamp();
        let old = Old {
            sub: Uuid::new_v4(),
            sid: Uuid::new_v4(),
            iat: now,
            exp: now + 60,
        };
        let jwt = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &old,
            &EncodingKey::from_secret(secret.expose()),
        )
        .unwrap();
        let claims = tokens(Duration::from_secs(60)).verify_access(&jwt).unwrap();
        assert_eq!((claims.sub, claims.dev), (old.sub, 1));
    }

    #[test]
    fn expired_tampered_and_foreign_tokens_fail() {
        let tokens = tokens(Duration::from_secs(60));
        let past = Utc::now() - chrono::TimeDelta::seconds(120);
        let expired = tokens
            .issue_access(Uuid::new_v4(), 1, Uuid::new_v4(), past)
            .unwrap();
        assert!(tokens.verify_access(&expired).is_err());

        let jwt = tokens
            .issue_access(Uuid::new_v4(), 1, Uuid::new_v4(), Utc::now())
            .unwrap();
        let mut tampered = jwt.clone();
        tampered.pop();
        tampered.push(if jwt.ends_with('A') { 'B' } else { 'A' });
        assert!(tokens.verify_access(&tampered).is_err());

        let other = Tokens::new(
            &Secret::new("o".repeat(32)),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        assert!(other.verify_access(&jwt).is_err());
    }

    /// Refused from the instant of `exp`, not a second later, as a socket
    /// closes at it.
    #[test]
    fn a_token_expires_at_exp_exactly() {
        let tokens = tokens(Duration::from_secs(60));
        let jwt = tokens
            .issue_access(Uuid::new_v4(), 1, Uuid::new_v4(), Utc::now())
            .unwrap();
        let exp = tokens.verify_access(&jwt).unwrap().exp;
        let at = |ms: i64| DateTime::from_timestamp_millis(exp * 1000 + ms).unwrap();
        assert!(tokens.verify_access_at(&jwt, at(-1)).is_ok());
        assert!(tokens.verify_access_at(&jwt, at(0)).is_err());
        assert!(tokens.verify_access_at(&jwt, at(999)).is_err());
    }

    #[test]
    fn a_successor_is_fixed_by_its_token_and_the_secret() {
        let tokens = tokens(Duration::from_secs(60));
        let first = Tokens::new_refresh();
        let next = tokens.successor(&first.token);
        assert_eq!(next.token, tokens.successor(&first.token).token);
        assert_eq!(hash_refresh(&next.token), next.hash);
        assert_eq!(next.token.len(), 43);
        assert_ne!(next.token, first.token);
        assert_ne!(tokens.successor(&next.token).token, next.token);
        let other = Tokens::new(
            &Secret::new("o".repeat(32)),
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
        assert_ne!(other.successor(&first.token).token, next.token);
    }

    #[test]
    fn refresh_tokens_are_random_and_hashed() {
        let (a, b) = (Tokens::new_refresh(), Tokens::new_refresh());
        assert_ne!(a.token, b.token);
        assert_eq!(hash_refresh(&a.token), a.hash);
        assert_eq!(a.token.len(), 43);
    }
}
