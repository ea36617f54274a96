//! Push targets: a device registers where it can be woken
//! (`PUT /v1/devices/{device_id}/push`: a browser's Web Push subscription,
//! an APNs or FCM token), removes it (`DELETE`), and a browser reads the
//! server's VAPID key (`GET /v1/push/vapid`) to subscribe with.
//!
//! Only a device itself sets or removes its target: a target is where its
//! wake-ups go, and another device of the account (let alone another
//! account) has no business redirecting them. A target is checked
//! ([`crate::push::target`]: the SSRF guard on an endpoint, keys that work,
//! tokens of the right shape), sealed to its device with the storage key,
//! and never echoed back, logged or listed: `GET /v1/devices` shows its
//! kind and when it was set, nothing more.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::devices::path_device;
use super::{ApiJson, ApiPath};
use crate::auth::AuthUser;
use crate::error::{Error, Result};
use crate::push::target::{Kind, TargetRequest};
use crate::push::targets::TargetState;
use crate::state::AppState;
use crate::store;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/devices/{device_id}/push",
            put(set_target).delete(delete_target),
        )
        .route("/v1/push/vapid", get(vapid))
}

/// A device's push target as the account sees it: its kind and when it
/// was set, never the endpoint or token.
#[derive(Serialize, ToSchema, Debug, Clone, PartialEq, Eq)]
pub struct PushView {
    #[schema(value_type = String, example = "webpush")]
    #[serde(serialize_with = "kind_name")]
    pub kind: Kind,
    #[serde(serialize_with = "crate::wire::timestamp")]
    pub updated_at: DateTime<Utc>,
}

fn kind_name<S: serde::Serializer>(kind: &Kind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(kind.as_str())
}

impl PushView {
    /// What `GET /v1/devices` shows for a device: `None` without a live
    /// target (a dropped one included).
    pub fn of(state: TargetState) -> Option<Self> {
        match state {
            TargetState::Live { kind, updated_at } => Some(Self { kind, updated_at }),
            TargetState::None | TargetState::Dropped => None,
        }
    }
}

/// The caller's own device, named by the path; any other is refused.
fn own_device(caller: &AuthUser, path: &str) -> Result<()> {
    if path_device(path)? != caller.device {
        return Err(Error::Forbidden(
            "only a device itself may set or remove its push target",
        ));
    }
    Ok(())
}

/// Sets (or replaces) the calling device's push target. The same body
/// again is answered the same way; each call gives the target a new
/// `updated_at`.
#[utoipa::path(put, path = "/v1/devices/{device_id}/push", tag = "push", security(("bearer" = [])),
    params(("device_id" = u32, Path, description = "The calling device (another is `403 forbidden`).")),
    request_body = TargetRequest,
    responses((status = 200, description = "The target is set; its kind and version.", body = PushView), crate::api::openapi::Errors))]
async fn set_target(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(device): ApiPath<String>,
    ApiJson(request): ApiJson<TargetRequest>,
) -> Result<Json<PushView>> {
    own_device(&caller, &device)?;
    let kind = request.kind()?;
    // Before the endpoint is resolved: a kind that cannot be sent to costs
    // no look-up.
    if state.providers.get(kind).is_none() {
        return Err(Error::PushUnavailable {
            kind,
            field: Some("kind"),
        });
    }
    let target = request
        .check(&state.push_allow, state.config.push.push_timeout)
        .await?;
    let sealed = target
        .seal(&state.keys, caller.id, caller.device)
        .map_err(|err| Error::Internal(err.into()))?;
    let updated_at = state
        .store
        .set_target(caller.id, caller.device, kind, &sealed, store::now())
        .await?
        // The device was removed since its token was checked.
        .ok_or(Error::NotFound("device"))?;
    state
        .targets
        .changed_everywhere(caller.id, state.broker.as_ref());
    state.scheduler.targets_changed();
    tracing::info!(user.id = %caller.id, device = caller.device, kind = kind.as_str(), "push target set");
    Ok(Json(PushView { kind, updated_at }))
}

/// Removes the calling device's push target (and any wake-up pending for
/// it). Answered the same whether there was one or not.
#[utoipa::path(delete, path = "/v1/devices/{device_id}/push", tag = "push", security(("bearer" = [])),
    params(("device_id" = u32, Path, description = "The calling device (another is `403 forbidden`).")),
    responses((status = 204, description = "The device has no push target."), crate::api::openapi::Errors))]
async fn delete_target(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(device): ApiPath<String>,
) -> Result<StatusCode> {
    own_device(&caller, &device)?;
    if state.store.delete_target(caller.id, caller.device).await? {
        state
            .targets
            .changed_everywhere(caller.id, state.broker.as_ref());
        state.scheduler.targets_changed();
        tracing::info!(user.id = %caller.id, device = caller.device, "push target deleted");
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
struct Vapid {
    /// The server's VAPID public key: base64url of the uncompressed P-256
    /// point (65 bytes), a browser's `applicationServerKey`.
    public_key: String,
}

/// The key a browser subscribes with (`pushManager.subscribe({
/// applicationServerKey })`). The same for everyone, so no token is needed.
#[utoipa::path(get, path = "/v1/push/vapid", tag = "push",
    responses((status = 200, description = "The VAPID public key.", body = Vapid), crate::api::openapi::Errors))]
async fn vapid(State(state): State<AppState>) -> Result<Json<Vapid>> {
    match &state.providers.vapid_public_key {
        Some(key) => Ok(Json(Vapid {
            public_key: key.clone(),
        })),
        None => Err(Error::PushUnavailable {
            kind: Kind::WebPush,
            field: None,
        }),
    }
}
