//! The web-facing hardening, over real connections: security headers on
//! every response, CORS for the allowed origins only, the WebSocket origin
//! check, and TLS termination with a certificate made for the test.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use reqwest::Method;
use reqwest::header::HeaderMap;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::backend_tests;
use crate::common::ws::{FRAME_TIMEOUT, WsClient};
use crate::common::{
    Backend, PASSWORD, ServerProcess, TestDb, TestServer, b64, config, public_key,
};

backend_tests!(
    security_headers_on_every_response,
    cors_answers_allowed_origins_only,
    websocket_refuses_other_origins,
    tls_serves_https_and_wss,
    bad_tls_files_stop_start_up,
    requests_carry_an_id_into_the_reply_and_the_log,
);

const ORIGIN: &str = "https://chat.example.com";
const OTHER_ORIGIN: &str = "https://evil.example";
const ORIGINS: &str = "https://chat.example.com,http://localhost:3000";

/// Every header of `protocol.md`'s list, on any response.
#[track_caller]
fn assert_security_headers(headers: &HeaderMap, what: &str) {
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        (
            "content-security-policy",
            "default-src 'none'; frame-ancestors 'none'",
        ),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(
            headers.get(name).and_then(|v| v.to_str().ok()),
            Some(value),
            "{name} on {what}: {headers:?}"
        );
    }
}

async fn security_headers_on_every_response(backend: Backend) {
    let server = TestServer::start(backend).await;
    let ok = server.get("/healthz", None).await;
    assert_eq!(ok.status, 200);
    let error = server.get("/v1/me", None).await;
    error.expect_error(401, "unauthorized");
    let missing = server.get("/no/such/route", None).await;
    missing.expect_error(404, "not_found");
    let wrong_method = server
        .raw(Method::DELETE, "/healthz", None, "text/plain", "")
        .await;
    wrong_method.expect_error(405, "invalid");
    for (reply, what) in [
        (&ok, "a success"),
        (&error, "an error"),
        (&missing, "a 404"),
        (&wrong_method, "a 405"),
    ] {
        assert_security_headers(&reply.headers, what);
        // Plain HTTP: HSTS would be ignored, and belongs to a proxy in front.
        assert!(
            reply.headers.get("strict-transport-security").is_none(),
            "HSTS over plain HTTP on {what}"
        );
    }
    server.stop().await;
}

async fn cors_answers_allowed_origins_only(backend: Backend) {
    let server = TestServer::start_with(backend, &["--cors-origins", ORIGINS]).await;
    let preflight = |origin: &'static str| {
        server
            .http
            .request(Method::OPTIONS, server.url("/v1/messages"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
    };

    let allowed = server.call(preflight(ORIGIN)).await;
    assert!(allowed.status.is_success(), "{allowed:?}");
    let header = |name: &str| {
        allowed
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    assert_eq!(header("access-control-allow-origin"), ORIGIN);
    assert!(header("access-control-allow-methods").contains("post"));
    assert!(header("access-control-allow-headers").contains("authorization"));
    assert!(header("access-control-allow-headers").contains("content-type"));
    assert_eq!(header("access-control-max-age"), "600");
    // Bearer tokens, not cookies: no credentialed requests.
    assert!(
        allowed
            .headers
            .get("access-control-allow-credentials")
            .is_none()
    );
    assert_security_headers(&allowed.headers, "a preflight");

    let refused = server.call(preflight(OTHER_ORIGIN)).await;
    assert!(
        refused.headers.get("access-control-allow-origin").is_none(),
        "{refused:?}"
    );

    // An actual request: an allowed origin may read it and its headers.
    let read = server
        .call(
            server
                .http
                .get(server.url("/healthz"))
                .header("origin", ORIGIN),
        )
        .await;
    assert_eq!(read.status, 200);
    assert_eq!(read.headers["access-control-allow-origin"], ORIGIN);
    let exposed = read.headers["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("retry-after"), "{exposed}");
    assert!(exposed.contains("x-request-id"), "{exposed}");
    let other = server
        .call(
            server
                .http
                .get(server.url("/healthz"))
                .header("origin", OTHER_ORIGIN),
        )
        .await;
    assert!(other.headers.get("access-control-allow-origin").is_none());
    server.stop().await;
}

/// Opens `/v1/ws` with an `Origin` header and header auth.
async fn ws_with_origin(
    server: &TestServer,
    origin: &str,
    token: &str,
) -> Result<WsStream<TcpStream>, tungstenite::Error> {
    let mut request = format!("ws://{}/v1/ws", server.addr)
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert("origin", origin.parse().unwrap());
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    let stream = TcpStream::connect(server.addr).await.unwrap();
    tokio_tungstenite::client_async(request, stream)
        .await
        .map(|(ws, _)| ws)
}

async fn websocket_refuses_other_origins(backend: Backend) {
    let server = TestServer::start_with(backend, &["--cors-origins", ORIGINS]).await;
    let alice = server.account("alice").await;

    // A page of another origin, as a WebSocket client sees it.
    match ws_with_origin(&server, OTHER_ORIGIN, &alice.access).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403);
            assert_eq!(response.headers()["x-frame-options"], "DENY");
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("a WebSocket from {OTHER_ORIGIN} was accepted"),
    }
    // The same refusal read as HTTP: the JSON error body and every header.
    let refusal = server
        .call(
            server
                .http
                .get(server.url("/v1/ws"))
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .header("origin", OTHER_ORIGIN)
                .bearer_auth(&alice.access),
        )
        .await;
    refusal.expect_error(403, "forbidden");
    assert_security_headers(&refusal.headers, "a refused upgrade");

    // The allowed origins.
    for origin in [ORIGIN, "http://localhost:3000"] {
        let mut ws = ws_with_origin(&server, origin, &alice.access)
            .await
            .unwrap_or_else(|e| panic!("{origin} refused: {e}"));
        assert_eq!(next_json(&mut ws).await["type"], "ready");
        assert_eq!(next_json(&mut ws).await["type"], "drained");
    }
    // No Origin at all: a native client.
    let (client, backlog) = WsClient::ready(&server, &alice).await;
    assert!(backlog.is_empty());
    client.close().await;
    server.stop().await;
}

type WsStream<S> = WebSocketStream<S>;

/// The next text frame as JSON, skipping control frames.
async fn next_json<S>(ws: &mut WsStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let frame = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .expect("a frame in time")
            .expect("the socket stays open")
            .expect("a readable frame");
        match frame {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// A self-signed certificate for `localhost`, written as PEM into `dir`.
pub(crate) fn certificate(dir: &Path) -> (CertificateDer<'static>, String, String) {
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("generate a certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (
        generated.cert.der().clone(),
        cert.display().to_string(),
        key.display().to_string(),
    )
}

/// An HTTPS client that trusts one certificate, one connection per request.
pub(crate) struct Https {
    addr: SocketAddr,
    connector: TlsConnector,
}

impl Https {
    pub(crate) fn new(addr: SocketAddr, trusted: CertificateDer<'static>) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted).expect("a usable root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            addr,
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    pub(crate) async fn connect(&self) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        self.connector
            .connect(name, tcp)
            .await
            .expect("TLS handshake with a trusted certificate")
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, HeaderMap, Value) {
        let io = TokioIo::new(self.connect().await);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let response = sender
            .send_request(request.body(body).unwrap())
            .await
            .expect("HTTPS request");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("JSON body")
        };
        (parts.status.as_u16(), parts.headers, json)
    }

    pub(crate) async fn account(&self, username: &str) -> (String, String) {
        let (status, _, body) = self
            .request(
                Method::POST,
                "/v1/register",
                None,
                Some(json!({ "username": username, "password": PASSWORD, "public_key": public_key() })),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let id = body["id"].as_str().unwrap().to_owned();
        let (status, _, body) = self
            .request(
                Method::POST,
                "/v1/login",
                None,
                Some(json!({ "username": username, "password": PASSWORD })),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        (id, body["access_token"].as_str().unwrap().to_owned())
    }
}

async fn tls_serves_https_and_wss(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (trusted, cert, key) = certificate(dir.path());
    let server = TestServer::start_with(backend, &["--tls-cert", &cert, "--tls-key", &key]).await;
    let https = Https::new(server.addr, trusted);

    // Clients stuck mid-handshake (a partial ClientHello, then silence) do
    // not hold up others: handshakes run off the accept loop.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .await
            .unwrap();
        stalled.push(tcp);
    }
    let (status, headers, body) = tokio::time::timeout(
        Duration::from_secs(5),
        https.request(Method::GET, "/healthz", None, None),
    )
    .await
    .expect("served while other handshakes stall");
    drop(stalled);
    assert_eq!((status, body), (200, json!({ "status": "ok" })));
    assert_security_headers(&headers, "a success over TLS");
    assert_eq!(
        headers["strict-transport-security"],
        "max-age=63072000; includeSubDomains"
    );
    let (status, headers, body) = https.request(Method::GET, "/nope", None, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert!(headers.contains_key("strict-transport-security"));

    // Plain HTTP to the TLS port gets no answer in HTTP.
    assert!(
        reqwest::get(format!("http://{}/healthz", server.addr))
            .await
            .is_err(),
        "plain HTTP was served on the TLS port"
    );

    // A WebSocket session over wss: push, ack and send.
    let (alice_id, alice) = https.account("alice").await;
    let (bob_id, bob) = https.account("bob").await;
    let mut request = format!("wss://localhost:{}/v1/ws", server.addr.port())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bob}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(request, https.connect().await)
        .await
        .expect("WebSocket upgrade over TLS");
    let ready = next_json(&mut ws).await;
    assert_eq!(
        (ready["type"].as_str(), ready["user_id"].as_str()),
        (Some("ready"), Some(bob_id.as_str()))
    );
    assert_eq!(next_json(&mut ws).await["type"], "drained");

    let (status, _, sent) = https
        .request(
            Method::POST,
            "/v1/messages",
            Some(&alice),
            Some(json!({ "to": bob_id, "body": b64(b"over tls") })),
        )
        .await;
    assert_eq!(status, 201, "{sent}");
    let pushed = next_json(&mut ws).await;
    assert_eq!(pushed["type"], "message");
    assert_eq!(pushed["id"], sent["id"]);
    assert_eq!(pushed["body"], b64(b"over tls"));
    let frame = |value: Value| Message::Text(value.to_string().into());
    ws.send(frame(json!({ "type": "ack", "ids": [pushed["id"]] })))
        .await
        .unwrap();
    ws.send(frame(
        json!({ "type": "send", "ref": "r1", "to": alice_id, "body": b64(b"reply") }),
    ))
    .await
    .unwrap();
    let reply = next_json(&mut ws).await;
    assert_eq!(
        (reply["type"].as_str(), reply["ref"].as_str()),
        (Some("sent"), Some("r1")),
        "{reply}"
    );
    ws.close(None).await.unwrap();

    // The ack was applied and the reply stored.
    let (_, _, bob_inbox) = https
        .request(Method::GET, "/v1/messages", Some(&bob), None)
        .await;
    assert_eq!(bob_inbox["messages"], json!([]));
    let (_, _, alice_inbox) = https
        .request(Method::GET, "/v1/messages", Some(&alice), None)
        .await;
    assert_eq!(alice_inbox["messages"][0]["id"], reply["id"]);
    server.stop().await;
}

/// `Server::bind`'s error, in full.
async fn start_up_error(db: &TestDb, extra: &[&str]) -> String {
    match sealpost::Server::bind(config(db, extra)).await {
        Ok(_) => panic!("started with {extra:?}"),
        Err(err) => format!("{err:#}"),
    }
}

async fn bad_tls_files_stop_start_up(backend: Backend) {
    let db = TestDb::new(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = certificate(dir.path());
    let missing = dir.path().join("missing.pem").display().to_string();

    let err = start_up_error(&db, &["--tls-cert", &missing, "--tls-key", &key]).await;
    assert!(
        err.contains(&missing) && err.contains("SEALPOST_TLS_CERT"),
        "{err}"
    );
    let err = start_up_error(&db, &["--tls-cert", &cert, "--tls-key", &missing]).await;
    assert!(
        err.contains(&missing) && err.contains("SEALPOST_TLS_KEY"),
        "{err}"
    );

    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let not_pem = not_pem.display().to_string();
    let err = start_up_error(&db, &["--tls-cert", &not_pem, "--tls-key", &key]).await;
    assert!(
        err.contains(&not_pem) && err.contains("SEALPOST_TLS_CERT"),
        "{err}"
    );

    // A key of another certificate.
    let other = tempfile::tempdir().unwrap();
    let (_, _, other_key) = certificate(other.path());
    let err = start_up_error(&db, &["--tls-cert", &cert, "--tls-key", &other_key]).await;
    assert!(err.contains(&other_key), "{err}");

    // The good pair starts.
    let server = TestServer::start_on(db, &["--tls-cert", &cert, "--tls-key", &key]).await;
    server.stop().await;
}

/// Every reply carries an `X-Request-Id` (a fresh UUID, or the one a trusted proxy
/// sent), and the server's log lines for that request carry the same id.
async fn requests_carry_an_id_into_the_reply_and_the_log(backend: Backend) {
    let db = TestDb::new(backend).await;
    // The test stands in for a proxy: only a trusted one's id is kept.
    let server = ServerProcess::spawn(&db.url, &[("SEALPOST_TRUSTED_PROXIES", "127.0.0.1")]);
    let api = &server.api;
    let ids: Vec<String> = [
        api.get("/healthz", None).await,
        api.get("/v1/me", None).await,
        api.get("/no/such/route", None).await,
    ]
    .iter()
    .map(|reply| {
        let id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
        uuid::Uuid::parse_str(&id).unwrap_or_else(|_| panic!("not a UUID: {id}"));
        id
    })
    .collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "ids repeat: {ids:?}");

    let given = "edge-7f3a9c";
    let request = api
        .http
        .post(api.url("/v1/register"))
        .header("x-request-id", given)
        .json(&json!({
            "username": "traced",
            "password": PASSWORD,
            "public_key": public_key(),
        }));
    let reply = api.call(request).await;
    assert_eq!(reply.status, 201, "{reply:?}");
    assert_eq!(reply.headers["x-request-id"], given);
    // The handler's "registered" line is logged inside the request's span.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let lines = server.log_lines(given);
        if lines.iter().any(|l| l.contains("registered")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line with the request id: {:?}",
            server.log_lines("registered")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
