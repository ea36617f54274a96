//! What the browser is told about every response: the security headers and
//! the CORS policy.
//!
//! sealpost serves JSON and WebSockets only, never a page, so the headers
//! forbid everything a page could do (scripts, frames, sniffing a JSON body
//! as HTML) and forbid caching, because replies carry tokens and messages.
//! CORS lets the browser origins of `SEALPOST_CORS_ORIGINS`, and no others,
//! read replies; the WebSocket endpoint checks the same list itself, since
//! browsers do not apply CORS to WebSockets.

use std::time::Duration;

use axum::Router;
use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::config::Config;

/// Two years, with subdomains: the value the HSTS preload list asks for.
const HSTS: &str = "max-age=63072000; includeSubDomains";

/// How long a browser may reuse a preflight answer. Browsers cap it anyway
/// (Chromium at 2 hours); 10 minutes keeps a changed allowlist effective
/// soon.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// `router` with the CORS policy and the security headers. The headers are
/// the outermost layer, so they reach every response: errors, the fallback
/// 404, CORS preflights and refused WebSocket upgrades alike.
pub fn apply<S: Clone + Send + Sync + 'static>(router: Router<S>, config: &Config) -> Router<S> {
    let router = router.layer(cors(config));
    let router = if config.serves_tls() {
        // Only over TLS: a browser ignores HSTS received over plain HTTP, and
        // behind a proxy it is the proxy's to send.
        router.layer(set(header::STRICT_TRANSPORT_SECURITY, HSTS))
    } else {
        router
    };
    router
        .layer(set(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(set(header::X_FRAME_OPTIONS, "DENY"))
        .layer(set(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; frame-ancestors 'none'",
        ))
        .layer(set(header::REFERRER_POLICY, "no-referrer"))
        .layer(set(header::CACHE_CONTROL, "no-store"))
}

/// Overrides whatever a handler set: these are policy, not defaults.
fn set(name: HeaderName, value: &'static str) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::overriding(name, HeaderValue::from_static(value))
}

/// Only the listed origins, with exactly what the API uses. No credentials
/// mode: clients authenticate with a bearer token, never a cookie, so a
/// cross-origin page cannot ride on a user's session.
fn cors(config: &Config) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(config.cors_origins.iter().cloned()))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .expose_headers([header::RETRY_AFTER, HeaderName::from_static("x-request-id")])
        .max_age(PREFLIGHT_MAX_AGE)
}
