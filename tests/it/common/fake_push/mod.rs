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

use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::response::Response;
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

/// A fake's server: where it listens, how many connections it accepted,
/// and its task, which ends (with its connections, hung answers
/// included) when this is dropped.
pub(crate) struct Served {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Served {
    /// Serves `router` on `listener`: HTTP/2 only, with prior knowledge (as
    /// APNs is HTTP/2 only, and tests have no TLS for ALPN), or HTTP/1.1.
    pub(crate) fn new(listener: TcpListener, router: Router, http2_only: bool) -> Self {
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let task = tokio::spawn(async move {
            // Dropped with the task when it is aborted: the connections end
            // with it, hung answers included.
            let mut tasks = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
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
        });
        Self {
            addr,
            connections,
            task,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:<port>`, for `--push-allow-hosts`.
    pub(crate) fn host(&self) -> String {
        self.addr.to_string()
    }

    /// How many connections clients opened to it.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request a per-device fake (APNs, FCM) accepted, recorded with the
/// device it was for.
pub(crate) trait ForDevice: Clone {
    fn device(&self) -> &str;
}

/// What a per-device fake keeps: the requests it accepted (`R`), what it
/// refused and why, and the answers (`A`) scripted per device.
pub(crate) struct Record<R, A> {
    received: Mutex<Vec<R>>,
    problems: Mutex<Vec<String>>,
    scripts: Mutex<HashMap<String, VecDeque<A>>>,
}

impl<R, A> Default for Record<R, A> {
    fn default() -> Self {
        Self {
            received: Mutex::default(),
            problems: Mutex::default(),
            scripts: Mutex::default(),
        }
    }
}

impl<R: ForDevice, A> Record<R, A> {
    /// Queues `replies` for `device`'s next requests, after those queued.
    pub(crate) fn script(&self, device: &str, replies: impl IntoIterator<Item = A>) {
        self.scripts
            .lock()
            .unwrap()
            .entry(device.to_owned())
            .or_default()
            .extend(replies);
    }

    /// Records an accepted request; its scripted answer, if one is left.
    pub(crate) fn accept(&self, request: R) -> Option<A> {
        let device = request.device().to_owned();
        self.received.lock().unwrap().push(request);
        self.scripts
            .lock()
            .unwrap()
            .get_mut(&device)
            .and_then(VecDeque::pop_front)
    }

    /// Records a refusal: what the real service would have refused.
    pub(crate) fn problem(&self, problem: String) {
        self.problems.lock().unwrap().push(problem);
    }

    pub(crate) fn received(&self) -> Vec<R> {
        self.received.lock().unwrap().clone()
    }

    pub(crate) fn received_for(&self, device: &str) -> Vec<R> {
        self.received()
            .into_iter()
            .filter(|r| r.device() == device)
            .collect()
    }

    pub(crate) fn problems(&self) -> Vec<String> {
        self.problems.lock().unwrap().clone()
    }
}

/// A request an APNs or FCM fake refused: the status, the service's word
/// for why, and the problem recorded for the test.
pub(crate) type Refusal = (u16, &'static str, String);

/// `response` with a `Retry-After` of `after` (seconds, or an HTTP date),
/// if given.
pub(crate) fn with_retry_after(mut response: Response, after: Option<impl Display>) -> Response {
    if let Some(after) = after {
        response
            .headers_mut()
            .insert("retry-after", after.to_string().parse().unwrap());
    }
    response
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
