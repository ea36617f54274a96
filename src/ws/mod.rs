//! The WebSocket endpoint, `GET /v1/ws`: the origin check and
//! authentication at upgrade (a header token is checked before the socket
//! takes a waiting slot), socket sizing, the [`deadline`] on unfinished
//! messages under tungstenite, and the hand-off to one [`connection`] task
//! per socket.
//!
//! Buffers are sized for tens of thousands of mostly idle sockets: a 1 KiB
//! read buffer (tungstenite's default is 128 KiB, allocated at open), frames
//! gathered into an 8 KiB write buffer only while several are written
//! together and flushed at once, and frame limits that fit one maximal
//! message. Larger frames grow the read buffer only while
//! they are being read.

mod connection;
mod deadline;
mod drain;
pub mod frame;
mod seen;

use axum::Router;
use std::net::SocketAddr;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tungstenite::protocol::{Role, WebSocketConfig};

use tracing::Instrument;

use serde::Deserialize;

use crate::auth::{self, bearer_token};
use crate::error::Error;
use crate::state::AppState;

use deadline::MessageDeadline;

/// A connection's socket: tungstenite over the deadline on unfinished
/// messages, over the upgraded HTTP connection.
type Socket = WebSocketStream<MessageDeadline<TokioIo<Upgraded>>>;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/ws", get(upgrade))
}

/// Bytes read from the socket at a time; the buffer a connection holds while
/// idle, and so most of an idle socket's memory. A client's frames are a
/// few hundred bytes (a chat message, an ack), so 1 KiB still reads a few
/// at a time; a larger frame grows the buffer to its size (tungstenite
/// reserves a frame's whole length once its header is read). At 4 KiB it
/// was 3 KiB more per idle socket, with no throughput to show for it.
const READ_BUFFER: usize = 1024;

/// Bytes of frames gathered before they are written to the socket: frames
/// queued together (a backlog page, pushes that arrived at once) go out a
/// buffer at a time instead of a syscall each. Every write path flushes
/// when it is done, so nothing waits in it. The buffer grows as frames are
/// written and keeps its capacity (tungstenite does not shrink it), so a
/// socket that once wrote a burst holds about this much more: 8 KiB, some
/// 25 frames of chat, rather than 16 or more.
const WRITE_BUFFER: usize = 8 * 1024;

/// The query of `GET /v1/ws`.
#[derive(Deserialize)]
struct Options {
    /// Close the older sockets of this device once authenticated (4409).
    #[serde(default)]
    exclusive: bool,
}

async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    options: Result<Query<Options>, QueryRejection>,
    Handover(on_upgrade): Handover,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // Browsers do not apply CORS to WebSockets: any page can open one to any
    // host. They do send the page's `Origin`, so refuse the origins not on
    // the allowlist. Native clients send none and are not affected.
    if let Some(origin) = headers.get(header::ORIGIN)
        && !state.config.origin_allowed(origin)
        && !(state.config.demo && same_origin(origin, &headers))
    {
        return Error::Forbidden("this origin may not open a WebSocket").into_response();
    }
    let exclusive = match options {
        Ok(Query(options)) => options.exclusive,
        Err(_) => {
            return Error::field("exclusive", "must be true or false").into_response();
        }
    };
    // axum's extractor checks the request and answers a bad one; the socket
    // is made here, over the deadline on unfinished messages, for which
    // axum's own `on_upgrade` has no room.
    if let Err(rejection) = upgrade {
        let mut response = Error::malformed(rejection.body_text()).into_response();
        *response.status_mut() = rejection.status();
        return response;
    }
    // Both present once axum's extractor accepted the request over HTTP/1.1,
    // the only HTTP sealpost speaks.
    let (Some(on_upgrade), Some(key)) = (on_upgrade, headers.get(header::SEC_WEBSOCKET_KEY)) else {
        return Error::malformed("not a WebSocket upgrade").into_response();
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if state.shutdown.is_cancelled() {
        return Error::Unavailable.into_response();
    }
    // A header token is checked before the socket is counted: with a valid
    // one it never waits to authenticate, so it takes no waiting slot and
    // cannot be locked out by those who hold them. A bad one is answered on
    // the socket with close code 4401, as the protocol promises, not with an
    // HTTP 401; until then it waits like a socket without one.
    let header_claims = bearer_token(&headers).map(|token| auth::verify(&state, token));
    let authenticated = matches!(header_claims, Some(Ok(_)));
    // Counted before the upgrade, so a refused client costs no socket task.
    let client = state.proxies.client_key(peer.ip(), &headers);
    let permit = match state.socket_caps.open(client, authenticated) {
        Ok(permit) => permit,
        Err(err) => return err.into_response(),
    };
    let max_frame = state.config.max_multi_request_bytes();
    let message_timeout = state.config.ws_message_timeout;
    let sockets = state.sockets.clone();
    // Outbound frames carry one envelope each, however many a send from
    // this client may carry.
    let max_write_buffer = 2 * state.config.max_outbound_frame_bytes() + READ_BUFFER;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max_write_buffer)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    let start = Box::new(connection::Start {
        state,
        header: header_claims,
        client,
        permit,
        exclusive,
    });
    // The request's span, with its request id, follows the socket's task.
    let span = tracing::Span::current();
    // hyper hands the connection over once the 101 below is written.
    tokio::spawn(
        sockets.track_future(
            async move {
                let upgraded = match on_upgrade.await {
                    Ok(upgraded) => upgraded,
                    Err(err) => {
                        tracing::debug!(error = %err, "WebSocket upgrade failed");
                        return;
                    }
                };
                let io = MessageDeadline::new(TokioIo::new(upgraded), message_timeout);
                // Boxed before the task's future is made: see `Start`.
                let socket = Box::pin(WebSocketStream::from_raw_socket(
                    io,
                    Role::Server,
                    Some(config),
                ));
                let socket = Box::new(socket.await);
                connection::run(socket, start).await;
            }
            .instrument(span),
        ),
    );
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
        .header(header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .expect("a valid response")
}

/// hyper's hand-over of the upgraded connection, taken before axum's
/// `WebSocketUpgrade` extractor removes it from the request (it is a
/// shared handle: either copy receives the connection).
struct Handover(Option<OnUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for Handover {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Handover(parts.extensions.get::<OnUpgrade>().cloned()))
    }
}

/// Whether `origin` names the host the request was sent to: a page this
/// server served itself (the demo). Only the host and port are compared:
/// behind a TLS proxy the page's `https` is this server's `http`.
fn same_origin(origin: &HeaderValue, headers: &HeaderMap) -> bool {
    let (Ok(origin), Some(Ok(host))) = (
        origin.to_str(),
        headers.get(header::HOST).map(HeaderValue::to_str),
    ) else {
        return false;
    };
    origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .is_some_and(|authority| authority.eq_ignore_ascii_case(host))
}
