//! The OpenAPI 3.1 description of the REST API, generated from the
//! handlers' own annotations (`utoipa`) so that it cannot drift from the
//! code: served at `GET /v1/openapi.json` and committed as
//! `docs/openapi.json` (a test keeps the two equal).
//!
//! It describes the REST endpoints only. The WebSocket (`GET /v1/ws`) and
//! the semantics behind every field (delivery guarantees, the device
//! rules, the client body format) are in protocol.md, which stays the
//! contract; this file is for tooling: client generators, schema tests.

use std::collections::BTreeMap;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use bytes::Bytes;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, ObjectBuilder, Ref, RefOr, Response, ResponseBuilder, Type};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use super::{accounts, devices, health, keys, limits, messages, push};
use crate::error::{ErrorBody, ErrorDetail};
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sealpost",
        description = "REST API of sealpost, a push relay for end-to-end encrypted messengers. \
            The server stores and forwards opaque, client-encrypted bodies. protocol.md is the \
            whole contract (the WebSocket at /v1/ws included); this describes its REST half.",
        license(name = "MIT OR Apache-2.0"),
    ),
    paths(
        accounts::register,
        accounts::login,
        accounts::refresh,
        accounts::me,
        accounts::delete_me,
        accounts::logout,
        accounts::logout_all,
        accounts::change_password,
        devices::add_device,
        devices::own_devices,
        devices::rename,
        devices::set_key,
        devices::remove,
        devices::directory,
        keys::user_by_name,
        keys::public_key,
        keys::update_key,
        messages::send,
        messages::send_multi,
        messages::list,
        messages::ack,
        messages::delivered,
        health::healthz,
        health::readyz,
        limits::limits,
        push::set_target,
        push::delete_target,
        push::vapid,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth),
    tags(
        (name = "accounts", description = "Sign-up, login, tokens and sessions."),
        (name = "devices", description = "An account's devices, each with its own key, queue and sessions."),
        (name = "keys", description = "Looking users up, and the single-key endpoints of before devices."),
        (name = "messages", description = "Sending, and the REST path of a device's queue."),
        (name = "health", description = "Probes for load balancers and orchestrators."),
        (name = "push", description = "Push targets: where a device is woken when messages wait for it and it holds no socket."),
        (name = "limits", description = "The limits this server enforces, for clients to check against before they send."),
    ),
)]
struct ApiDoc;

/// The `bearer` scheme the authenticated paths name: an access token from
/// login, refresh or adding a device.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The error responses every operation may give: any 4xx or 5xx, always
/// with the one error body (`code` is what to program against; protocol.md
/// lists which codes each endpoint gives).
pub struct Errors;

impl IntoResponses for Errors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let body = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                .build()
        };
        // On every 429 and 503: when to try again.
        let retry_after = || {
            HeaderBuilder::new()
                .schema(Some(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(1)),
                ))
                .description(Some(
                    "With 429 and 503: whole seconds to wait before trying again, at least 1.",
                ))
                .build()
        };
        BTreeMap::from([
            (
                "4XX".to_owned(),
                ResponseBuilder::new()
                    .description("Refused: the error body says why (`code`, and `field` for a field at fault).")
                    .content("application/json", body())
                    .header("Retry-After", retry_after())
                    .build()
                    .into(),
            ),
            (
                "5XX".to_owned(),
                ResponseBuilder::new()
                    .description("`unavailable` (503: retry later) or `internal` (500).")
                    .content("application/json", body())
                    .header("Retry-After", retry_after())
                    .build()
                    .into(),
            ),
        ])
    }
}

/// The description as JSON, pretty-printed as committed under docs/.
pub fn document() -> String {
    let mut json = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    json.push('\n');
    json
}

/// `GET /v1/openapi.json`. Made once, when the router is built.
pub fn router() -> Router<AppState> {
    let json = Bytes::from(document());
    Router::new().route(
        "/v1/openapi.json",
        get(move || {
            let json = json.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], json).into_response() }
        }),
    )
}
