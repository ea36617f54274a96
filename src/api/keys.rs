//! Public keys and the user directory: how peers find each other and the key
//! to encrypt to. Lookups require authentication, so the directory cannot be
//! enumerated anonymously.

use axum::extract::State;
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiJson, ApiPath, parse_id};
use crate::auth::AuthUser;
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store::{self, User};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/users/{username}", get(user_by_name))
        .route("/v1/public-key/{user_id}", get(public_key))
        .route("/v1/update-key", put(update_key))
}

/// Accepted public key sizes: room for any current curve or post-quantum
/// bundle, small enough that a directory row stays small.
const MIN_KEY_BYTES: usize = 32;
const MAX_KEY_BYTES: usize = 2048;

/// Decodes and checks a `public_key` field.
pub fn parse_public_key(value: &str) -> Result<Vec<u8>> {
    let key = STANDARD.decode(value).map_err(|_| {
        Error::field(
            "public_key",
            "must be standard base64 (RFC 4648, with padding)",
        )
    })?;
    if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
        return Err(Error::field(
            "public_key",
            format!(
                "must decode to {MIN_KEY_BYTES}-{MAX_KEY_BYTES} bytes, got {}",
                key.len()
            ),
        ));
    }
    Ok(key)
}

#[derive(Serialize)]
struct DirectoryEntry {
    id: Uuid,
    username: String,
    public_key: String,
}

async fn user_by_name(
    _caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(username): ApiPath<String>,
) -> Result<Json<DirectoryEntry>> {
    if !super::accounts::is_username(&username) {
        return Err(Error::NotFound("user"));
    }
    let user = state
        .store
        .user_by_name(&username)
        .await?
        .ok_or(Error::NotFound("user"))?;
    Ok(Json(DirectoryEntry {
        id: user.id,
        public_key: STANDARD.encode(&user.public_key),
        username: user.username,
    }))
}

#[derive(Serialize)]
struct KeyView {
    user_id: Uuid,
    public_key: String,
    #[serde(serialize_with = "crate::api::timestamp")]
    updated_at: DateTime<Utc>,
}

impl From<&User> for KeyView {
    fn from(user: &User) -> Self {
        Self {
            user_id: user.id,
            public_key: STANDARD.encode(&user.public_key),
            updated_at: user.key_updated_at,
        }
    }
}

async fn public_key(
    _caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
) -> Result<Json<KeyView>> {
    let id = parse_id("user_id", &user_id)?;
    let user = state.store.user(id).await?.ok_or(Error::NotFound("user"))?;
    Ok(Json(KeyView::from(&user)))
}

#[derive(Deserialize)]
struct UpdateKey {
    public_key: String,
}

async fn update_key(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<UpdateKey>,
) -> Result<Json<KeyView>> {
    let key = parse_public_key(&request.public_key)?;
    let user = state
        .store
        .set_public_key(caller.id, &key, store::now())
        .await?
        .ok_or(Error::Unauthorized("account no longer exists"))?;
    Ok(Json(KeyView::from(&user)))
}
