//! HTTP/1.1 connections, from accept to close: the accept loop (a task per
//! connection, drained at shutdown; at most so many per address, see
//! [`crate::limits::connections`]), hyper's limits on a request head (how
//! long it may take, how large it may be), and the [`crate::linger`]ing
//! close every connection ends with. (The limits on a body are per route:
//! [`crate::api::body`].) Both listeners, the API's and the metrics', are
//! served here, each with its own per-address count: a scraper on a
//! private network is no reason to leave the head limits off.
//!
//! What the limits turn away is counted ([`ConnectionMetrics`]): heads cut
//! off by the timeout and connections refused at accept, by listener.
//!
//! It does what `axum::serve` did, plus those limits, which `axum::serve`
//! does not expose: without a timer hyper never times a head out, so a
//! client sending its headers a byte at a time (slowloris) held its
//! connection and task for as long as it liked. HTTP/1.1 only: sealpost
//! speaks nothing else (its TLS offers only `http/1.1`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::serve::Listener;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Layer;

use crate::limits::connections::HttpConnections;
use crate::linger::{self, Linger};
use crate::metrics::ConnectionMetrics;

/// The largest request head (request line and headers) read, in bytes;
/// larger is refused with 431 and the connection closed. The largest
/// legitimate heads here are well under it: an access token is under 1 KiB,
/// a browser's WebSocket upgrade 1-2 KiB before cookies (sealpost sets none,
/// but a parent domain's may come along). The same as Cloudflare's limit on
/// request headers, and nginx's default (4 × 8 KiB buffers), so a head that
/// passes a proxy in front passes here. Each connection holds at most this
/// much of an unfinished head, for at most the head timeout.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// The most a connection buffers of what it reads (hyper's default is
/// ~400 KiB): a head, or the part of a body not yet handed to a handler.
/// Twice [`MAX_HEAD_BYTES`], so a maximal head and the start of its body fit
/// in one read.
const MAX_BUF_BYTES: usize = 2 * MAX_HEAD_BYTES;

// Headers per request: hyper's default of 100 applies (more get 431). It is
// far above what clients send (a browser's upgrade carries about 15), and
// setting it, even to the same number, moves hyper's header array from the
// stack to the heap on every request.

/// The smallest drain of a lingering close: at least one whole request at
/// the configured body limit (a client answered early, say 401 for an
/// expired token, sends no more than that), and no less than this, so that
/// a small limit still lets a modest overshoot read its 413.
const MIN_LINGER_BYTES: usize = 1024 * 1024;

/// How long a closing connection is drained at most: a whole request at the
/// default limit (under 1 MiB) on a 1.5 Mbit/s uplink. A client that keeps
/// sending past it is closed on, with a reset; it cannot hold a connection
/// longer than a slow head can.
const LINGER_TIME: Duration = Duration::from_secs(5);

/// What each connection is allowed.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a client has to send a complete request head, from the
    /// moment the server waits for one: from accept, and, on a kept-alive
    /// connection, from the previous answer. hyper closes the connection
    /// when it passes, without an answer.
    pub header_read_timeout: Duration,
    pub linger: linger::Bounds,
}

impl Limits {
    /// The limits for a server whose largest request body is
    /// `max_request_bytes`.
    pub fn new(header_read_timeout: Duration, max_request_bytes: usize) -> Self {
        Self {
            header_read_timeout,
            linger: linger::Bounds {
                bytes: max_request_bytes.max(MIN_LINGER_BYTES),
                time: LINGER_TIME,
            },
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops
/// accepting, lets every connection finish the request it is serving (idle
/// ones close at once), and returns when all have closed. Upgraded sockets
/// are no longer connections here: their own tasks outlive this, and they
/// no longer count against `per_address`. What the limits turn away is
/// counted in `counted`.
pub async fn serve<L>(
    mut listener: L,
    app: Router,
    limits: Limits,
    per_address: Arc<HttpConnections>,
    counted: ConnectionMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    L: Listener<Addr = SocketAddr>,
    L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_BUF_BYTES);
    let connections = TaskTracker::new();
    let draining = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // `accept` is cancel-safe (see `tls::TlsListener`'s).
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Over its address's share: closed at once, before it costs a
        // task or a buffer. Not answered: an answer would need the request
        // read first, and a flood would be served by it.
        let Some(permit) = per_address.open(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: too many open from its address");
            counted.refused.increment(1);
            drop(io);
            continue;
        };
        tracing::trace!(%peer, "connection accepted");
        // What `into_make_service_with_connect_info` gives each connection:
        // the peer address, for `ConnectInfo<SocketAddr>`.
        let service =
            TowerToHyperService::new(axum::Extension(ConnectInfo(peer)).layer(app.clone()));
        let (io, begun) = HeadBegun::new(io);
        let io = TokioIo::new(Linger::new(io, limits.linger));
        let connection = builder.serve_connection(io, service).with_upgrades();
        let draining = draining.clone();
        let header_timeouts = counted.header_timeouts.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = draining.cancelled() => {
                    // Finish the request in progress, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            // Timed-out and oversized heads, and clients that vanish, end
            // here all the time: worth no more than debug.
            if let Err(err) = ended {
                tracing::debug!(%peer, error = %err, "connection ended");
                if err.is_timeout() && begun.load(Ordering::Relaxed) {
                    header_timeouts.increment(1);
                }
            }
            // Closed, or handed over as a WebSocket.
            drop(permit);
        });
    }
    drop(listener);
    draining.cancel();
    connections.close();
    connections.wait().await;
}

/// A connection's stream that notes whether a request head has begun:
/// whether bytes came in since the connection last wrote (an answer). The
/// head timeout also closes connections that sent nothing (an idle
/// keep-alive, a browser's speculative preconnect), which is how they are
/// meant to end; only a head begun and left unfinished is a slow head.
struct HeadBegun<T> {
    io: T,
    begun: Arc<AtomicBool>,
}

impl<T> HeadBegun<T> {
    /// The stream, and the flag to read once hyper has let go of it.
    fn new(io: T) -> (Self, Arc<AtomicBool>) {
        let begun = Arc::new(AtomicBool::new(false));
        let io = Self {
            io,
            begun: begun.clone(),
        };
        (io, begun)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadBegun<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            // Relaxed: read only once hyper is done with the stream, in the
            // task that drove it.
            self.begun.store(true, Ordering::Relaxed);
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadBegun<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.begun.store(false, Ordering::Relaxed);
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.begun.store(false, Ordering::Relaxed);
        }
        written
    }

    // hyper chooses how it buffers writes by this: pass it through.
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
