//! Public keys and the user directory: how peers find each other and the key
//! to encrypt to. Lookups require authentication, so the directory cannot be
//! enumerated anonymously.
//!
//! Each device has its own key (the device directory is in
//! [`super::devices`]). The single-key answers here, which clients from
//! before devices read, give the account's lowest-numbered device's key and
//! name that device.

use axum::extract::State;
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ApiJson, ApiPath};
use crate::auth::AuthUser;
use crate::devices::ChangeReason;
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::store::{self, Device, DeviceId};
use crate::wire::parse_id;

pub fn router() -> Router<AppState> {
    Router::new()
        // `{user}`: a username here, an id under `/devices`; one name for
        // the segment, as the router asks.
        .route("/v1/users/{user}", get(user_by_name))
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

/// As before devices, field for field: the lowest-numbered device's key.
#[derive(Serialize, ToSchema)]
struct DirectoryEntry {
    id: Uuid,
    username: String,
    public_key: String,
}

/// The account's lowest-numbered device, whose key the single-key answers
/// give; every account has at least one.
async fn first_device(state: &AppState, user: Uuid) -> Result<Device> {
    state
        .store
        .devices(user)
        .await?
        .into_iter()
        .next()
        .ok_or(Error::NotFound("user"))
}

#[utoipa::path(get, path = "/v1/users/{username}", tag = "keys", security(("bearer" = [])),
    params(("username" = String, Path, description = "A username, matched regardless of ASCII letter case.")),
    responses((status = 200, description = "The user, with the lowest-numbered device's key.", body = DirectoryEntry), crate::api::openapi::Errors))]
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
    let device = first_device(&state, user.id).await?;
    Ok(Json(DirectoryEntry {
        id: user.id,
        public_key: STANDARD.encode(&device.public_key),
        username: user.username,
    }))
}

/// One device's key. The single-key endpoints of before devices leave
/// `device_id` out, so that their replies stay field for field as they
/// were; `PUT /v1/devices/{id}/key` names it.
#[derive(Serialize, ToSchema)]
pub(super) struct KeyView {
    user_id: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<DeviceId>,
    public_key: String,
    #[serde(serialize_with = "crate::wire::timestamp")]
    updated_at: DateTime<Utc>,
}

impl KeyView {
    pub(super) fn of(user: Uuid, device: &Device) -> Self {
        Self {
            user_id: user,
            device_id: None,
            public_key: STANDARD.encode(&device.public_key),
            updated_at: device.key_updated_at,
        }
    }

    pub(super) fn naming_device(self, device: DeviceId) -> Self {
        Self {
            device_id: Some(device),
            ..self
        }
    }
}

#[utoipa::path(get, path = "/v1/public-key/{user_id}", tag = "keys", security(("bearer" = [])),
    params(("user_id" = Uuid, Path, description = "The user whose key to read.")),
    responses((status = 200, description = "The lowest-numbered device's key.", body = KeyView), crate::api::openapi::Errors))]
async fn public_key(
    _caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(user_id): ApiPath<String>,
) -> Result<Json<KeyView>> {
    let id = parse_id("user_id", &user_id)?;
    let device = first_device(&state, id).await?;
    Ok(Json(KeyView::of(id, &device)))
}

#[derive(Deserialize, ToSchema)]
pub(super) struct UpdateKey {
    #[schema(format = Byte, min_length = 44, max_length = 2732)]
    pub(super) public_key: String,
}

/// Replaces the calling device's key.
#[utoipa::path(put, path = "/v1/update-key", tag = "keys", security(("bearer" = [])), request_body = UpdateKey,
    responses((status = 200, description = "The calling device's new key.", body = KeyView), crate::api::openapi::Errors))]
async fn update_key(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<UpdateKey>,
) -> Result<Json<KeyView>> {
    set_own_key(&state, &caller, &request.public_key).await
}

/// Replaces the calling device's key: only a device itself may change its
/// key, so that a stolen token of one device cannot redirect what peers
/// encrypt to another. The account's other devices are told
/// (`devices_changed`, reason `key`).
pub(super) async fn set_own_key(
    state: &AppState,
    caller: &AuthUser,
    public_key: &str,
) -> Result<Json<KeyView>> {
    let key = parse_public_key(public_key)?;
    let device = state
        .store
        .set_device_key(caller.id, caller.device, &key, store::now())
        .await?
        .ok_or(Error::Unauthorized("device no longer exists"))?;
    // Peers encrypt to the new key from their next directory fetch; the
    // account's other devices are told now, as a key replaced by someone
    // holding a stolen token would otherwise go unseen.
    let devices = super::devices::device_list(state, caller.id).await;
    state
        .delivery
        .device_updated(caller.id, caller.device, ChangeReason::Key, devices);
    Ok(Json(KeyView::of(caller.id, &device)))
}
