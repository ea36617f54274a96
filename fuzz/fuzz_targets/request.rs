//! Request parsing, end to end: the real axum router (every extractor,
//! validator and handler, the body limit and the nesting cap) over an
//! in-memory SQLite store, called in-process with `oneshot`.
//!
//! Driving the router rather than the extractors alone covers what a client
//! can actually reach, including the rejection mapping and the handlers'
//! own validation, and checks the contract that matters: every answer is a
//! 2xx, or a 4xx with the JSON error body and a documented code. A 5xx or a
//! bare rejection is a finding, as is a panic.
//!
//! Input layout: byte 0 picks the route, byte 1 the credentials and the
//! content type; the rest up to the first newline is the path segment or
//! query, and everything after it the body.

#![no_main]

use std::sync::OnceLock;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, header};
use libfuzzer_sys::fuzz_target;
use sealpost::{Config, Server};
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tower::ServiceExt;

const CODES: [&str; 6] = [
    "invalid",
    "unauthorized",
    "not_found",
    "conflict",
    "too_large",
    "rate_limited",
];

/// Method and path; `{}` takes the segment from the input, and every path
/// takes the input's query too.
const ROUTES: [(Method, &str); 11] = [
    (Method::POST, "/v1/register"),
    (Method::POST, "/v1/login"),
    (Method::POST, "/v1/token/refresh"),
    (Method::PUT, "/v1/update-key"),
    (Method::POST, "/v1/messages"),
    (Method::POST, "/v1/messages/ack"),
    (Method::GET, "/v1/messages"),
    (Method::GET, "/v1/users/{}"),
    (Method::GET, "/v1/public-key/{}"),
    (Method::PUT, "/v1/messages/{}/delivered"),
    (Method::GET, "/v1/me"),
];

const CONTENT_TYPES: [Option<&str>; 4] = [
    Some("application/json"),
    Some("application/x-www-form-urlencoded"),
    Some("text/plain"),
    None,
];

struct App {
    runtime: Runtime,
    router: Router,
    /// An access token of a registered user.
    token: String,
}

fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        // One thread: the committer and the handlers run inside block_on.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = Config::parse_from([
            "--addr",
            "127.0.0.1:0",
            "--database-url",
            "sqlite::memory:",
            "--jwt-secret",
            "fuzz-secret-fuzz-secret-fuzz-secret-0123",
            "--hash-concurrency",
            "1",
        ])
        .unwrap();
        let (router, token) = runtime.block_on(async {
            let router = Server::bind(config).await.unwrap().router();
            let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
            for name in ["alice", "bob"] {
                let body =
                    json!({ "username": name, "password": "correct horse", "public_key": key });
                let (status, _) = call(&router, post("/v1/register", &body)).await;
                assert_eq!(status, 201);
            }
            let login = json!({ "username": "alice", "password": "correct horse" });
            let (status, body) = call(&router, post("/v1/login", &login)).await;
            assert_eq!(status, 200);
            let token = body["access_token"].as_str().unwrap().to_owned();
            (router, token)
        });
        App {
            runtime,
            router,
            token,
        }
    })
}

fn post(path: &str, body: &Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The status and the JSON body (`Null` if empty); panics on a body that is
/// not JSON.
async fn call(router: &Router, request: Request<Body>) -> (u16, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{status} with a non-JSON body: {bytes:?}"))
    };
    (status, body)
}

fuzz_target!(|data: &[u8]| {
    let [route, flags, rest @ ..] = data else {
        return;
    };
    let (method, template) = &ROUTES[*route as usize % ROUTES.len()];
    let (tail, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (rest, &[][..]),
    };
    let Ok(tail) = std::str::from_utf8(tail) else {
        return;
    };
    let (segment, query) = tail.split_once('?').unwrap_or((tail, ""));
    let mut uri = template.replace("{}", segment);
    if !query.is_empty() {
        uri = format!("{uri}?{query}");
    }
    let app = app();
    let mut request = Request::builder().method(method.clone()).uri(&uri);
    if flags & 1 == 1 {
        request = request.header(header::AUTHORIZATION, format!("Bearer {}", app.token));
    }
    if let Some(content_type) = CONTENT_TYPES[(*flags as usize >> 1) % CONTENT_TYPES.len()] {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    // A URI the http crate refuses never reaches a server.
    let Ok(request) = request.body(Body::from(body.to_vec())) else {
        return;
    };
    let (status, reply) = app.runtime.block_on(call(&app.router, request));
    assert!(status < 500, "{method} {uri}: {status} {reply}");
    if !(200..300).contains(&status) {
        let code = reply["error"]["code"].as_str().unwrap_or_default();
        assert!(CODES.contains(&code), "{method} {uri}: {status} {reply}");
    }
});
