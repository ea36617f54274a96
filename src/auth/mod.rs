//! Authentication: password hashing, the rules for confirming a signed-in
//! caller's password, tokens, the signing secret, session revocation, and
//! the
//! [`AuthUser`] extractor that every authenticated handler takes, so that none
//! can forget to check a token.

pub mod confirm;
pub mod password;
pub mod secret;
pub mod sessions;
pub mod token;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use uuid::Uuid;

use crate::delivery::Address;
use crate::error::Error;
use crate::metrics::AuthFailure;
use crate::state::AppState;
use crate::store::DeviceId;
use token::Claims;

/// The caller, proven by a valid `Authorization: Bearer` access token.
#[derive(Debug, Clone, Copy)]
pub struct AuthUser {
    pub id: Uuid,
    /// The caller's device: the one its token was issued to.
    pub device: DeviceId,
    pub session: Uuid,
    /// Unix seconds at which the presented token expires.
    pub expires_at: i64,
}

impl AuthUser {
    /// The caller's device as the delivery core addresses it.
    pub fn address(&self) -> Address {
        Address {
            user: self.id,
            device: self.device,
        }
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let Some(token) = bearer_token(&parts.headers) else {
            state.metrics.auth_failed(AuthFailure::MissingToken);
            return Err(Error::Unauthorized("missing bearer token"));
        };
        let claims = verify(state, token)?;
        Ok(AuthUser {
            id: claims.sub,
            device: claims.dev,
            session: claims.sid,
            expires_at: claims.exp,
        })
    }
}

/// Checks an access token: signature, expiry, and that its session has not
/// been revoked. Every way in (REST, socket upgrade, `auth` frames) goes
/// through here.
pub fn verify(state: &AppState, token: &str) -> Result<Claims, Error> {
    let claims = state
        .tokens
        .verify_access(token)
        .inspect_err(|_| state.metrics.auth_failed(AuthFailure::AccessToken))?;
    if state.revocations.is_revoked(claims.sid) {
        state.metrics.auth_failed(AuthFailure::RevokedSession);
        return Err(Error::Unauthorized("session has been revoked"));
    }
    Ok(claims)
}

/// The token of an `Authorization: Bearer <token>` header (scheme matched
/// without regard to case, as RFC 7235 asks).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}
