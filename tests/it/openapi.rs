//! The OpenAPI description: served at `/v1/openapi.json`, the same as the
//! committed docs/openapi.json, and naming only routes the server has.
//! (CI also runs schemathesis against a live server with it: every
//! response must fit the schema, and none may be a 5xx.)

use std::path::Path;

use reqwest::Method;
use serde_json::{Value, json};

use crate::backend_tests;
use crate::common::{Backend, TestServer};

backend_tests!(
    the_served_description_is_the_committed_one,
    every_described_operation_is_routed,
);

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

async fn served(server: &TestServer) -> (Value, String) {
    let reply = server.get("/v1/openapi.json", None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        "application/json"
    );
    let text = serde_json::to_string_pretty(&reply.body).unwrap() + "\n";
    (reply.body, text)
}

/// docs/openapi.json is what the server serves. After changing an
/// endpoint, `SEALPOST_BLESS=1 cargo test openapi` rewrites it.
async fn the_served_description_is_the_committed_one(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (doc, text) = served(&server).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "OpenAPI 3.1, got {}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    if std::env::var_os("SEALPOST_BLESS").is_some() {
        std::fs::write(COMMITTED, &text).unwrap();
    }
    let committed = std::fs::read_to_string(Path::new(COMMITTED)).unwrap_or_default();
    let committed: Value = serde_json::from_str(&committed).unwrap_or(Value::Null);
    assert!(
        committed == doc,
        "docs/openapi.json differs from what the server serves: run `SEALPOST_BLESS=1 cargo test openapi` and commit it"
    );
    server.stop().await;
}

/// Each operation of the description reaches a handler: called without
/// credentials or body, it is refused by the handler (401, 415, 422 ...)
/// and never falls through to the router's `route not found`; and each
/// authenticated one says so with `401`.
async fn every_described_operation_is_routed(backend: Backend) {
    let server = TestServer::start(backend).await;
    let (doc, _) = served(&server).await;
    let paths = doc["paths"].as_object().expect("paths");
    let mut operations = 0;
    for (template, item) in paths {
        let path = template
            .replace("{user_id}", "5b0c52f4-9d4e-4a8e-9a56-3f0a2b7d1c11")
            .replace("{username}", "nobody")
            .replace("{device_id}", "1")
            .replace("{id}", "01a20ab1-4c10-7620-acf5-5f026d55cbc5");
        for (method, operation) in item.as_object().unwrap() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let reply = server
                .raw(method.clone(), &path, None, "application/json", "")
                .await;
            operations += 1;
            assert!(
                !(reply.status == 404 && reply.body["error"]["message"] == "route not found"),
                "{method} {template} is described but not routed"
            );
            let authed = operation["security"] == json!([{ "bearer": [] }]);
            if authed {
                assert_eq!(
                    reply.status, 401,
                    "{method} {template} is described as authenticated"
                );
            } else {
                assert_ne!(
                    reply.status, 401,
                    "{method} {template} is described as open"
                );
            }
        }
    }
    assert!(operations >= 23, "only {operations} operations described");
    server.stop().await;
}
