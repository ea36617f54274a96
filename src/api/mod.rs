//! The REST API: one file per resource, each with its own `router()`.
//!
//! Handlers are thin: they parse and validate the wire format, call the core
//! (store, delivery, auth), and map the result. The extractors here turn
//! every malformed request into an [`Error`] with the JSON error body, never
//! axum's plain-text rejections.

pub mod accounts;
mod headers;
mod health;
mod keys;
pub mod messages;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tower_http::trace::TraceLayer;
use uuid::Uuid;

use crate::error::Error;
use crate::state::AppState;

/// All routes, with the layers every request passes through.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_request_bytes();
    let config = state.config.clone();
    let routes = Router::new()
        .merge(accounts::router(state.auth_limit.clone()))
        .merge(keys::router())
        .merge(messages::router())
        .merge(health::router())
        .merge(crate::ws::router())
        .fallback(|| async { Error::NotFound("route") })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .layer(DefaultBodyLimit::max(body_limit));
    headers::apply(routes, &config)
        // Outermost, so CORS preflights are traced too. Spans carry method
        // and path only: never headers, which hold tokens.
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

fn method_not_allowed() -> Response {
    let mut response = Error::malformed("method not allowed on this path").into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

/// `axum::Json` with our error body on rejection.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(Error))]
pub struct ApiJson<T>(pub T);

/// `axum::extract::Query` with our error body on rejection.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Error))]
pub struct ApiQuery<T>(pub T);

/// `axum::extract::Path` with our error body on rejection.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
pub struct ApiPath<T>(pub T);

/// Serialises a timestamp as RFC 3339 in UTC with exactly three fraction
/// digits, as `protocol.md` promises (chrono's default drops the fraction on
/// whole seconds).
pub fn timestamp<S: serde::Serializer>(
    t: &chrono::DateTime<chrono::Utc>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Parses an id field, naming the field on failure.
pub fn parse_id(field: &'static str, value: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(value).map_err(|_| Error::field(field, "must be a UUID"))
}
