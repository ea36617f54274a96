//! The REST API: one file per resource, each with its own `router()`.
//!
//! Handlers are thin: they parse and validate the wire format, call the core
//! (store, delivery, auth), and map the result. The extractors here turn
//! every malformed request into an [`Error`] with the JSON error body, never
//! axum's plain-text rejections.

pub mod accounts;
pub mod body;
pub mod demo;
mod devices;
mod headers;
mod health;
mod keys;
mod limits;
pub mod messages;
pub mod openapi;
mod push;

use axum::Router;
use axum::body::Bytes;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::error::Error;
use crate::limits::client_ip::TrustedProxies;
use crate::metrics::Metrics;
use crate::state::AppState;

/// All routes, with the layers every request passes through.
pub fn router(state: AppState) -> Router {
    let send_limit = state.config.max_request_bytes();
    let config = state.config.clone();
    let proxies = state.proxies.clone();
    let metrics = state.metrics.clone();
    // In a cluster, every request's lines name the node that served it.
    let node = state.config.clustered().then(|| state.node_id.clone());
    let routes = Router::new()
        .merge(accounts::router(state.auth_limit.clone()))
        .merge(keys::router())
        .merge(devices::router(state.auth_limit.clone()))
        .merge(messages::router(
            send_limit,
            state.config.max_multi_request_bytes(),
        ))
        .merge(health::router())
        .merge(limits::router())
        .merge(openapi::router())
        .merge(push::router())
        .merge(crate::ws::router())
        .fallback(|| async { Error::NotFound("route") })
        .method_not_allowed_fallback(|| async { method_not_allowed() })
        // Routes that take more set their own, nearer the handler.
        .layer(body::limit(body::SMALL));
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
        // Before the above: only a trusted proxy's id, and only a plain one.
        .layer(middleware::from_fn_with_state(proxies, screen_request_id))
        // Outermost of all: every response is counted, the rate limiter's
        // and the fallbacks' too.
        .layer(middleware::from_fn_with_state(metrics, count_response))
        .with_state(state)
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Drops the `X-Request-Id` a request came with unless a trusted proxy
/// (`SEALPOST_TRUSTED_PROXIES`) sent exactly one, of [`plain_request_id`]:
/// then the request gets a fresh one. The id goes into every log line of
/// the request and back to the client; from anyone else it could be
/// kilobytes of text forging log lines, or the id of someone else's
/// request to muddle an investigation.
async fn screen_request_id(
    State(proxies): State<TrustedProxies>,
    mut request: Request,
    next: Next,
) -> Response {
    let from_proxy = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|ConnectInfo(peer)| proxies.trusts(peer.ip()));
    let mut ids = request.headers().get_all(X_REQUEST_ID).iter();
    let keep = match (ids.next(), ids.next()) {
        (Some(id), None) => from_proxy && plain_request_id(id.as_bytes()),
        (None, _) => true,
        _ => false,
    };
    if !keep {
        request.headers_mut().remove(X_REQUEST_ID);
    }
    next.run(request).await
}

/// 1 to 64 of `A-Z a-z 0-9 . _ -`: a UUID, nginx's `$request_id`, a
/// load balancer's trace id; nothing that can break a log line or hide in
/// one.
fn plain_request_id(id: &[u8]) -> bool {
    (1..=64).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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
        body::check(&req)?;
        let deadline = state.config.body_read_timeout;
        let bytes = body::within(deadline, Bytes::from_request(req, state)).await?;
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
    fn only_plain_request_ids_are_kept() {
        let uuid = "7e1767ea-0212-4ab9-8dd6-69ea0237da34";
        for yes in [
            uuid,
            "edge-7f3a9c",
            "a",
            "0123456789abcdef0123456789abcdef",
            &"x".repeat(64),
        ] {
            assert!(plain_request_id(yes.as_bytes()), "{yes}");
        }
        for no in [
            "",
            &"x".repeat(65),
            "a b",
            "a\nb",
            "a\rb",
            "id\u{202e}",
            "a/b",
            "a=b",
            "\"a\"",
        ] {
            assert!(!plain_request_id(no.as_bytes()), "{no:?}");
        }
    }

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
