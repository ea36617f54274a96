//! Local stand-ins for the push services, started in-process on
//! `127.0.0.1:0`, that check what the real ones check and record what they
//! received for the tests to assert on. A server under test reaches them
//! through `--push-allow-hosts 127.0.0.1:<port>` (their `host()`: they are
//! loopback and plain `http`, which the SSRF guard otherwise refuses).
//!
//! - [`webpush`]: a Web Push service (RFC 8030/8291/8292) that also plays
//!   the browser's half: it mints subscriptions and decrypts what is pushed
//!   to them.
//! - [`apns`]: Apple's APNs over HTTP/2 with prior knowledge (h2c): the
//!   provider token (ES256, `kid`, `iss`, `iat`), the headers, the
//!   payload's size and that it carries no content.
//! - [`fcm`]: FCM HTTP v1 and its OAuth 2.0 token endpoint: the service
//!   account's RS256 assertion, the bearer token it issued, the project,
//!   a data-only message.
//!
//! APNs and FCM keep a list of problems (requests the real service would
//! have refused, or that carried content): a test asserts it is empty.

pub mod apns;
pub mod fcm;
pub mod webpush;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A listener on an ephemeral loopback port, and its address (a fake
/// may need to know its URL before it serves).
pub(crate) async fn listen() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Serves `router` on `listener`: HTTP/2 only, with prior knowledge (as
/// APNs is HTTP/2 only, and tests have no TLS for ALPN), or HTTP/1.1. The
/// task and its connections end when the handle is aborted.
/// `connections` counts the connections accepted.
pub(crate) fn serve(
    listener: TcpListener,
    router: Router,
    http2_only: bool,
    connections: Arc<AtomicUsize>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Dropped with the task when it is aborted: the connections end
        // with it, hung answers included.
        let mut tasks = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.fetch_add(1, Ordering::SeqCst);
            let service = TowerToHyperService::new(router.clone());
            let io = TokioIo::new(stream);
            if http2_only {
                tasks.spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                });
            } else {
                tasks.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        }
    })
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
