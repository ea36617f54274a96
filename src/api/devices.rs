//! Devices: adding one to an account, the account's own list, renaming,
//! a device's key, removal, and the directory of another account's devices
//! that a sender encrypts to.
//!
//! Adding a device takes the account's password, not a token (a new device
//! has none yet), and sits behind the per-IP auth rate limit like login.
//! Removing one takes a token and the password: behind the same limit, and
//! under [`crate::auth::confirm`]'s rules, after the device is found.
//! Every change to the list, and every login to or key change of one of
//! its devices, reaches the account's other devices' sockets at once as a
//! `devices_changed` frame: a device that appears unexpectedly, or one
//! signed in to from elsewhere, is how a user notices a stolen password.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, patch, post, put};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use std::sync::Arc;

use super::accounts::{TokenPair, check_credentials, confirm_password, token_pair};
use super::keys::{KeyView, UpdateKey, parse_public_key, set_own_key};
use super::push::PushView;
use super::{ApiJson, ApiPath};
use crate::auth::AuthUser;
use crate::auth::password::Caller;
use crate::auth::token::Tokens;
use crate::devices::validate_name;
use crate::error::{Error, Result};
use crate::limits::client_ip::ClientKey;
use crate::limits::rate::AuthLimit;
use crate::state::AppState;
use crate::store::{self, AddDevice, Device, DeviceId, NewSession, RemoveDevice};
use crate::wire::parse_id;

pub fn router(auth_limit: Option<AuthLimit>) -> Router<AppState> {
    // The routes that hash a password.
    let mut hashing = Router::new()
        .route("/v1/devices", post(add_device))
        .route("/v1/devices/{device_id}", delete(remove));
    if let Some(limit) = auth_limit {
        hashing = hashing.layer(limit.layer);
    }
    Router::new()
        .merge(hashing)
        .route("/v1/devices", get(own_devices))
        .route("/v1/devices/{device_id}", patch(rename))
        .route("/v1/devices/{device_id}/key", put(set_key))
        .route("/v1/users/{user}/devices", get(directory))
}

#[derive(Deserialize, ToSchema)]
struct AddDeviceRequest {
    #[schema(min_length = 3, max_length = 32, pattern = "^[A-Za-z0-9_.-]+$")]
    username: String,
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
    #[schema(format = Byte, min_length = 44, max_length = 2732)]
    public_key: String,
    #[schema(min_length = 1, max_length = 64)]
    name: Option<String>,
}

#[utoipa::path(post, path = "/v1/devices", tag = "devices", request_body = AddDeviceRequest,
    responses((status = 201, description = "The new device's id and a token pair for a session of it.", body = TokenPair), crate::api::openapi::Errors))]
async fn add_device(
    State(state): State<AppState>,
    ClientKey(client): ClientKey,
    ApiJson(request): ApiJson<AddDeviceRequest>,
) -> Result<(StatusCode, Json<TokenPair>)> {
    // Validated before the password costs a hash.
    let public_key = parse_public_key(&request.public_key)?;
    if let Some(name) = &request.name {
        validate_name(name)?;
    }
    let caller = Caller::Address(client);
    let account = check_credentials(&state, caller, &request.username, request.password).await?;
    let user = account.user_id;
    // The device and its first session in one transaction: a client whose
    // reply is lost retries with no device left behind without a session.
    let now = store::now();
    let refresh = Tokens::new_refresh();
    let session = NewSession {
        hash: refresh.hash,
        family_id: Uuid::new_v4(),
        expires_at: store::add(now, state.tokens.refresh_ttl),
    };
    let added = state
        .store
        .add_device(
            account,
            &public_key,
            request.name.as_deref(),
            state.config.max_devices_per_user,
            &session,
            now,
        )
        .await?;
    let device = match added {
        AddDevice::Added(device) => device,
        AddDevice::TooMany => return Err(Error::TooManyDevices),
        AddDevice::NoAccount => return Err(super::accounts::DISABLED),
        // What the same password gets from now on.
        AddDevice::Stale => return Err(super::accounts::BAD_LOGIN),
    };
    tracing::info!(user.id = %user, device = device.id, "device added");
    let devices = device_list(&state, user).await;
    state.delivery.device_added(user, device.id, devices);
    // The new device's number and its first session, in the shape of login.
    let pair = token_pair(&state, user, device.id, session.family_id, refresh.token)?;
    Ok((StatusCode::CREATED, Json(pair)))
}

/// The account's device numbers after a change, to announce; `None` if they
/// cannot be read, which costs only the frame: the change has committed.
pub(super) async fn device_list(state: &AppState, user: Uuid) -> Option<Arc<[DeviceId]>> {
    state
        .store
        .device_ids(user)
        .await
        .inspect_err(|err| {
            tracing::warn!(user.id = %user, error = %err, "devices changed, but the list could not be read to announce it");
        })
        .ok()
        .map(Into::into)
}

/// One of the caller's own devices, as its account sees it.
#[derive(Serialize, ToSchema)]
struct OwnDevice {
    device_id: DeviceId,
    name: Option<String>,
    public_key: String,
    #[serde(serialize_with = "crate::wire::timestamp")]
    updated_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::wire::timestamp")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "crate::wire::timestamp")]
    last_seen_at: DateTime<Utc>,
    /// Whether this is the device asking.
    current: bool,
    /// Its push target's kind and when it was set; `null` if it has none
    /// (or its push service dropped it).
    push: Option<PushView>,
}

impl OwnDevice {
    fn of(device: Device, caller: &AuthUser, push: Option<PushView>) -> Self {
        Self {
            push,
            current: device.id == caller.device,
            device_id: device.id,
            name: device.name,
            public_key: STANDARD.encode(&device.public_key),
            updated_at: device.key_updated_at,
            created_at: device.created_at,
            last_seen_at: device.last_seen_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
struct OwnDevices {
    devices: Vec<OwnDevice>,
}

#[utoipa::path(get, path = "/v1/devices", tag = "devices", security(("bearer" = [])),
    responses((status = 200, description = "The caller's own devices, in ascending id.", body = OwnDevices), crate::api::openapi::Errors))]
async fn own_devices(caller: AuthUser, State(state): State<AppState>) -> Result<Json<OwnDevices>> {
    let devices = state.store.devices(caller.id).await?;
    let targets = state.targets.account(caller.id).await?;
    let push = |device: DeviceId| {
        targets
            .binary_search_by_key(&device, |(d, _)| *d)
            .ok()
            .and_then(|i| PushView::of(targets[i].1))
    };
    Ok(Json(OwnDevices {
        devices: devices
            .into_iter()
            .map(|d| {
                let target = push(d.id);
                OwnDevice::of(d, &caller, target)
            })
            .collect(),
    }))
}

/// The `{device_id}` of a path.
pub(super) fn path_device(value: &str) -> Result<DeviceId> {
    value
        .parse::<i64>()
        .map_err(|_| Error::field("device_id", "must be a device number, 1 or more"))
        .and_then(super::accounts::device_field)
}

#[derive(Deserialize, ToSchema)]
struct Rename {
    /// `null` clears the name.
    #[schema(min_length = 1, max_length = 64)]
    name: Option<String>,
}

#[utoipa::path(patch, path = "/v1/devices/{device_id}", tag = "devices", security(("bearer" = [])), params(("device_id" = u32, Path, description = "One of the account's devices.")), request_body = Rename,
    responses((status = 200, description = "The renamed device.", body = OwnDevice), crate::api::openapi::Errors))]
async fn rename(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(device): ApiPath<String>,
    ApiJson(request): ApiJson<Rename>,
) -> Result<Json<OwnDevice>> {
    let device = path_device(&device)?;
    if let Some(name) = &request.name {
        validate_name(name)?;
    }
    let renamed = state
        .store
        .rename_device(caller.id, device, request.name.as_deref())
        .await?
        .ok_or(Error::NotFound("device"))?;
    let push = state.targets.state(caller.id, renamed.id).await?;
    Ok(Json(OwnDevice::of(renamed, &caller, PushView::of(push))))
}

#[utoipa::path(put, path = "/v1/devices/{device_id}/key", tag = "devices", security(("bearer" = [])), params(("device_id" = u32, Path, description = "One of the account's devices.")), request_body = UpdateKey,
    responses((status = 200, description = "The device's new key.", body = KeyView), crate::api::openapi::Errors))]
async fn set_key(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(device): ApiPath<String>,
    ApiJson(request): ApiJson<UpdateKey>,
) -> Result<Json<KeyView>> {
    if path_device(&device)? != caller.device {
        return Err(Error::Forbidden("only a device itself may change its key"));
    }
    let Json(view) = set_own_key(&state, &caller, &request.public_key).await?;
    Ok(Json(view.naming_device(caller.device)))
}

const ONLY_DEVICE: Error =
    Error::Conflict("this is the account's only device; delete the account instead");

#[derive(Deserialize, ToSchema)]
struct RemoveRequest {
    password: String,
}

/// Removes a device of the caller's account, itself or another: its
/// sessions end (tokens refused, sockets closed with 4401), its queue and
/// key are deleted, its number is never given out again.
#[utoipa::path(delete, path = "/v1/devices/{device_id}", tag = "devices", security(("bearer" = [])), params(("device_id" = u32, Path, description = "One of the account's devices.")), request_body = RemoveRequest,
    responses((status = 204, description = "The device, its sessions, key and queue are gone."), crate::api::openapi::Errors))]
async fn remove(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(device): ApiPath<String>,
    ApiJson(request): ApiJson<RemoveRequest>,
) -> Result<StatusCode> {
    let device = path_device(&device)?;
    // What the caller can see anyway (`GET /v1/devices`) is checked before
    // the password: a request that cannot remove anything costs no hash,
    // and its answer says nothing about the password. The store decides a
    // race with another removal.
    let devices = state.store.device_ids(caller.id).await?;
    if !devices.contains(&device) {
        return Err(Error::NotFound("device"));
    }
    if devices.len() == 1 {
        return Err(ONLY_DEVICE);
    }
    confirm_password(&state, &caller, request.password).await?;
    let removed = state
        .store
        .remove_device(caller.id, device, store::now())
        .await?;
    let revoked = match removed {
        RemoveDevice::Removed { revoked } => revoked,
        RemoveDevice::NotFound => return Err(Error::NotFound("device")),
        RemoveDevice::Last => return Err(ONLY_DEVICE),
    };
    state
        .revocations
        .device_removed(&state.hub, caller.id, device, &revoked);
    tracing::info!(user.id = %caller.id, device, "device removed");
    // Its target went with it (other nodes learn it from the directory
    // announcement).
    state.targets.changed(caller.id);
    let devices = device_list(&state, caller.id).await;
    state
        .delivery
        .device_removed(caller.id, device, devices)
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Another account's devices with their keys: what a sender encrypts to.
/// No device names: those are the account's own. The account's username
/// is public (anyone signed in can look it up), and with it a receiver
/// can name a sender it has only seen by id.
#[derive(Serialize, ToSchema)]
struct Directory {
    user_id: Uuid,
    /// As registered.
    username: String,
    devices: Vec<KeyEntry>,
}

#[derive(Serialize, ToSchema)]
struct KeyEntry {
    device_id: DeviceId,
    public_key: String,
    #[serde(serialize_with = "crate::wire::timestamp")]
    updated_at: DateTime<Utc>,
}

#[utoipa::path(get, path = "/v1/users/{user_id}/devices", tag = "devices", security(("bearer" = [])),
    params(("user_id" = Uuid, Path, description = "The account whose devices to list.")),
    responses((status = 200, description = "The account's devices with their keys: what a send must cover.", body = Directory), crate::api::openapi::Errors))]
async fn directory(
    _caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(user): ApiPath<String>,
) -> Result<Json<Directory>> {
    let user_id = parse_id("user_id", &user)?;
    let account = state
        .store
        .user(user_id)
        .await?
        .ok_or(Error::NotFound("user"))?;
    let devices = state.store.devices(user_id).await?;
    // Deleted between the two reads.
    if devices.is_empty() {
        return Err(Error::NotFound("user"));
    }
    Ok(Json(Directory {
        user_id,
        username: account.username,
        devices: devices
            .into_iter()
            .map(|d| KeyEntry {
                device_id: d.id,
                public_key: STANDARD.encode(&d.public_key),
                updated_at: d.key_updated_at,
            })
            .collect(),
    }))
}
