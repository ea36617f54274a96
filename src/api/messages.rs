//! The message queue over REST: send, poll, acknowledge. The fallback for
//! clients that cannot hold a WebSocket, over the same delivery core. A
//! device polls and acknowledges its own queue: the caller's token names
//! the device.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{ApiJson, ApiPath, ApiQuery, body};
use crate::auth::AuthUser;
use crate::delivery::{MAX_PAGE, idempotency};
use crate::error::{Error, Result};
use crate::state::AppState;
use crate::wire::{self, MessageView, parse_id};

/// `send_limit`: the body limit of a send (see
/// `Config::max_request_bytes`), `multi_limit` that of a multi-recipient
/// send (`Config::max_multi_request_bytes`); the other routes take a few
/// KiB.
pub fn router(send_limit: usize, multi_limit: usize) -> Router<AppState> {
    Router::new()
        .route(
            "/v1/messages",
            post(send).layer(body::limit(send_limit)).get(list),
        )
        .route(
            "/v1/messages/multi",
            post(send_multi).layer(body::limit(multi_limit)),
        )
        .route("/v1/messages/ack", post(ack).layer(body::limit(body::LIST)))
        .route("/v1/messages/{id}/delivered", put(delivered))
}

const DEFAULT_PAGE: u32 = 100;

/// A send: one `body` for every device of the recipient, or one envelope
/// per device.
#[derive(Deserialize, ToSchema)]
struct Send {
    #[schema(format = Uuid)]
    to: String,
    #[schema(format = Byte, min_length = 4)]
    body: Option<String>,
    envelopes: Option<Vec<wire::Envelope>>,
    /// The client's key for this send: a retry under the same key is
    /// answered with the first answer instead of storing the message again.
    #[schema(min_length = 1, max_length = 64)]
    client_id: Option<String>,
    /// Whether an offline recipient device is woken at once, at high
    /// priority (true), or at low priority and at most once per quiet
    /// interval (false: receipts, sync messages and the like).
    #[serde(default = "urgent_by_default")]
    #[schema(default = true)]
    urgent: bool,
}

fn urgent_by_default() -> bool {
    true
}

#[derive(Serialize, ToSchema)]
struct Sent {
    id: Uuid,
    to: Uuid,
    #[serde(serialize_with = "crate::wire::timestamp")]
    sent_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/v1/messages", tag = "messages", security(("bearer" = [])), request_body = Send,
    responses((status = 201, description = "The message is durable for every device it covers.", body = Sent), crate::api::openapi::Errors))]
async fn send(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<Send>,
) -> Result<(StatusCode, Json<Sent>)> {
    let sent = async {
        let to = parse_id("to", &request.to)?;
        let content = state.delivery.decode_content(
            request.body.as_deref(),
            wire::envelopes(request.envelopes.as_deref()),
        )?;
        let client_id = request
            .client_id
            .as_deref()
            .map(idempotency::client_id)
            .transpose()?;
        let accepted = state
            .delivery
            .send(caller.address(), to, content, client_id, request.urgent)
            .await?;
        Ok(Sent {
            id: accepted.id,
            to,
            sent_at: accepted.sent_at,
        })
    }
    .await
    .inspect_err(|err| state.metrics.rejected(err))?;
    Ok((StatusCode::CREATED, Json(sent)))
}

#[derive(Serialize, ToSchema)]
struct SentMulti {
    id: Uuid,
    #[serde(serialize_with = "crate::wire::timestamp")]
    sent_at: DateTime<Utc>,
}

#[utoipa::path(post, path = "/v1/messages/multi", tag = "messages", security(("bearer" = [])), request_body = wire::MultiSend,
    responses((status = 201, description = "The message is durable for every device of every recipient.", body = SentMulti), crate::api::openapi::Errors))]
async fn send_multi(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<wire::MultiSend>,
) -> Result<(StatusCode, Json<SentMulti>)> {
    let sent = async {
        let multi = state.delivery.decode_multi(&request)?;
        let client_id = request
            .client_id
            .as_deref()
            .map(idempotency::client_id)
            .transpose()?;
        let accepted = state
            .delivery
            .send_multi(caller.address(), multi, client_id, request.urgent)
            .await?;
        Ok(SentMulti {
            id: accepted.id,
            sent_at: accepted.sent_at,
        })
    }
    .await
    .inspect_err(|err| state.metrics.rejected(err))?;
    Ok((StatusCode::CREATED, Json(sent)))
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    /// Wide enough that any number parses and an out-of-range one gets a
    /// 422 naming `limit`, not a parse error.
    limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
struct Listing {
    messages: Vec<MessageView>,
    next: Option<Uuid>,
}

#[utoipa::path(get, path = "/v1/messages", tag = "messages", security(("bearer" = [])),
    params(
        ("after" = Option<Uuid>, Query, description = "Only messages with larger ids; omit for the first page."),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "At most this many messages, 1-500 (default 100)."),
    ),
    responses((status = 200, description = "The calling device's undelivered copies, oldest first.", body = Listing), crate::api::openapi::Errors))]
async fn list(
    caller: AuthUser,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Listing>> {
    let after = query
        .after
        .as_deref()
        .map(|a| parse_id("after", a))
        .transpose()?;
    let limit = query.limit.unwrap_or(i64::from(DEFAULT_PAGE));
    let Some(limit) = u32::try_from(limit)
        .ok()
        .filter(|l| (1..=MAX_PAGE).contains(l))
    else {
        return Err(Error::field("limit", format!("must be 1-{MAX_PAGE}")));
    };
    // The page is charged to the caller's address too (its share of the
    // drain budget), keyed as the per-address limits key it.
    let client = state.proxies.client_key(peer.ip(), &headers);
    let page = state
        .delivery
        .fetch(caller.address(), client, after, limit)
        .await?;
    // The device reads its queue: it needs no wake-up for it.
    state.scheduler.showed_up(caller.id, caller.device);
    Ok(Json(Listing {
        messages: page.messages.iter().map(MessageView::from).collect(),
        next: page.next,
    }))
}

#[utoipa::path(put, path = "/v1/messages/{id}/delivered", tag = "messages", security(("bearer" = [])),
    params(("id" = Uuid, Path, description = "The message whose copy to acknowledge.")),
    responses((status = 204, description = "The calling device's copy is deleted."), crate::api::openapi::Errors))]
async fn delivered(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    let id = parse_id("id", &id)?;
    state.scheduler.showed_up(caller.id, caller.device);
    match state.delivery.ack(caller.address(), vec![id]).await? {
        0 => Err(Error::NotFound("message")),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}

#[derive(Deserialize, ToSchema)]
struct AckRequest {
    #[schema(value_type = Vec<uuid::Uuid>, max_items = 500)]
    ids: Vec<String>,
}

#[derive(Serialize, ToSchema)]
struct Acked {
    acked: u64,
}

#[utoipa::path(post, path = "/v1/messages/ack", tag = "messages", security(("bearer" = [])), request_body = AckRequest,
    responses((status = 200, description = "How many of the ids were queued for the calling device and are now deleted.", body = Acked), crate::api::openapi::Errors))]
async fn ack(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<AckRequest>,
) -> Result<Json<Acked>> {
    let ids = request
        .ids
        .iter()
        .map(|id| parse_id("ids", id))
        .collect::<Result<Vec<_>>>()?;
    state.scheduler.showed_up(caller.id, caller.device);
    let acked = state.delivery.ack(caller.address(), ids).await?;
    Ok(Json(Acked { acked }))
}
