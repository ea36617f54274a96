//! The REST API: one file per resource, each with its own `router()`.
//!
//! Handlers are thin: they parse and validate the wire format, call the core
//! (store, delivery, auth), and map the result. The extractors here turn
//! every malformed request into an [`Error`] with the JSON error body, never
//! axum's plain-text rejections.

pub mod accounts;
mod demo;
mod devices;
mod headers;
mod health;
mod keys;
pub mod messages;
pub mod openapi;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::Error;
use crate::metrics::Metrics;
use crate::state::AppState;

/// All routes, with the layers every request passes through.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_request_bytes();
    let config = state.config.clone();
    let metrics = state.metrics.clone();
    // In a cluster, every request's lines name the node that served it.
    let node = state.config.clustered().then(|| state.node_id.clone());
    let routes = Router::new()
        .merge(accounts::router(state.auth_limit.clone()))
        .merge(keys::router())
        .merge(devices::router(state.auth_limit.clone()))
        .merge(messages::router())
        .merge(health::router())
        .merge(openapi::router())
        .merge(crate::ws::router())
        .fallback(|| async { Error::NotFound("route") })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        .layer(DefaultBodyLimit::max(body_limit));
    let routes = headers::apply(routes, &config);
    // The demo page brings its own headers: merged after the API's, so
    // that theirs (`default-src 'none'`) do not override its policy.
    let routes = if config.demo {
        routes.merge(demo::router())
    } else {
        routes
    };
    routes
        // Outermost, so CORS preflights are traced too. Spans carry method,
        // path and request id only: never other headers, which hold tokens.
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |request: &Request| request_span(request, node.as_deref())),
        )
        // A proxy's id is kept, so one id follows a request through both
        // logs; otherwise each request gets a fresh UUID.
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        // Outermost of all: every response is counted, the rate limiter's
        // and the fallbacks' too.
        .layer(middleware::from_fn_with_state(metrics, count_response))
        .with_state(state)
}

/// Counts each response by its status class.
async fn count_response(
    State(metrics): State<std::sync::Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    metrics.http_response(response.status());
    response
}

/// The span of one request: method, path and the request id that the
/// `X-Request-Id` response header carries, so a client's report of a failed
/// request finds its log lines. A WebSocket's task keeps this span for the
/// connection's life. In a cluster it names the node too.
fn request_span(request: &Request, node: Option<&str>) -> tracing::Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    match node {
        Some(node) => tracing::info_span!(
            "request",
            node = %node,
            method = %request.method(),
            path = %request.uri().path(),
            request_id = %id,
        ),
        None => tracing::info_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            request_id = %id,
        ),
    }
}

fn method_not_allowed() -> Response {
    let mut response = Error::malformed("method not allowed on this path").into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

/// `axum::Json` with our error body on rejection, and the nesting cap
/// checked before the body is parsed.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Error> {
        // The media type first, as `axum::Json` does: a body of the wrong
        // type is refused without being read.
        if !is_json(req.headers()) {
            return Err(Error::UnsupportedMediaType(
                "expected Content-Type: application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state).await?;
        crate::nesting::check(&bytes, state.config.max_json_depth as usize)?;
        let axum::Json(value) = axum::Json::<T>::from_bytes(&bytes)?;
        Ok(Self(value))
    }
}

/// `application/json` or an `application/*+json` type, with any parameters:
/// what `axum::Json` accepts.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind.eq_ignore_ascii_case("application")
        && (subtype.eq_ignore_ascii_case("json")
            || subtype.len() > 5
                && subtype
                    .get(subtype.len() - 5..)
                    .is_some_and(|s| s.eq_ignore_ascii_case("+json")))
}

/// `axum::extract::Query` with our error body on rejection.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(Error))]
pub struct ApiQuery<T>(pub T);

/// `axum::extract::Path` with our error body on rejection.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Error))]
pub struct ApiPath<T>(pub T);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types() {
        let typed = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, value.parse().unwrap());
            is_json(&headers)
        };
        for yes in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/problem+json",
            " application/json ;x=y",
        ] {
            assert!(typed(yes), "{yes}");
        }
        for no in [
            "",
            "application",
            "application/",
            "application/jsonx",
            "application/+json",
            "text/json",
            "application/xml",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
        ] {
            assert!(!typed(no), "{no}");
        }
        assert!(!is_json(&HeaderMap::new()));
    }
}
