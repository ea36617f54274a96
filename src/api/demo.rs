//! The browser demo at `/demo/` (`SEALPOST_DEMO=true`): a chat page on the
//! JavaScript client of `clients/js`, to show end-to-end encryption at
//! work. Its files are embedded in the binary (no CDN, nothing fetched
//! elsewhere): the page from `demo/`, the client library from
//! `clients/js/src/` under `/demo/client/`, and libsodium vendored under
//! `demo/vendor/`.
//!
//! The demo's responses carry their own security headers, as strict as a
//! page that runs scripts can have: scripts only from this origin, plus
//! `'wasm-unsafe-eval'` for libsodium's WebAssembly (no `eval` of
//! JavaScript, no inline script or style), connections only to this
//! origin, no frames, no forms posted elsewhere. The rest of the API keeps
//! its `default-src 'none'`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use rust_embed::RustEmbed;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::error::Error;
use crate::state::AppState;

#[derive(RustEmbed)]
#[folder = "demo/"]
#[exclude = "test/*"]
#[exclude = "*.md"]
struct Page;

#[derive(RustEmbed)]
#[folder = "clients/js/src/"]
struct Client;

/// The demo page's policy (see the module header).
pub const CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// `/demo/`, its assets and the client library, with the page's headers.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/demo", get(|| async { Redirect::permanent("/demo/") }))
        .route("/demo/", get(|| async { file::<Page>("index.html") }))
        .route(
            "/demo/client/{*path}",
            get(|Path(path): Path<String>| async move { file::<Client>(&path) }),
        )
        .route(
            "/demo/{*path}",
            get(|Path(path): Path<String>| async move { file::<Page>(&path) }),
        )
        .layer(set(header::CONTENT_SECURITY_POLICY, CSP))
        .layer(set(header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(set(header::X_FRAME_OPTIONS, "DENY"))
        .layer(set(header::REFERRER_POLICY, "no-referrer"))
        // Small files, embedded: revalidating costs nothing, and a new
        // build's page is never mixed with an old build's scripts.
        .layer(set(header::CACHE_CONTROL, "no-cache"))
}

/// Where a browser on this machine finds the page, said at start-up: the
/// listening address, with `localhost` for an unspecified one (`0.0.0.0`,
/// `[::]`), which a browser cannot open.
pub fn url(scheme: &str, addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("{scheme}://localhost:{}/demo/", addr.port())
    } else {
        format!("{scheme}://{addr}/demo/")
    }
}

fn set(name: HeaderName, value: &'static str) -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::overriding(name, HeaderValue::from_static(value))
}

fn file<E: RustEmbed>(path: &str) -> Response {
    match E::get(path) {
        Some(file) => {
            let mime = match path.rsplit_once('.').map(|(_, ext)| ext) {
                // ES modules must be served as JavaScript.
                Some("js" | "mjs") => "text/javascript; charset=utf-8",
                Some("html") => "text/html; charset=utf-8",
                Some("css") => "text/css; charset=utf-8",
                Some("svg") => "image/svg+xml",
                Some("png") => "image/png",
                _ => "application/octet-stream",
            };
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, mime)],
                file.data.into_owned(),
            )
                .into_response()
        }
        None => Error::NotFound("file").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_url_is_one_a_browser_opens() {
        let at = |a: &str| url("http", a.parse().unwrap());
        assert_eq!(at("127.0.0.1:8080"), "http://127.0.0.1:8080/demo/");
        assert_eq!(at("0.0.0.0:8080"), "http://localhost:8080/demo/");
        assert_eq!(at("[::]:443"), "http://localhost:443/demo/");
        assert_eq!(at("[::1]:8080"), "http://[::1]:8080/demo/");
        assert_eq!(
            url("https", "10.0.0.5:8443".parse().unwrap()),
            "https://10.0.0.5:8443/demo/"
        );
    }
}
