//! The outbound HTTP client every provider sends through.
//!
//! hyper's pooled client behind rustls (ring, the Mozilla roots), with a
//! connector of our own that resolves the host and connects only to
//! addresses the SSRF guard allows ([`super::guard`]): the check happens
//! on the addresses actually connected to, so a name that resolved to a
//! public address at registration and to a private one now is refused
//! now. hyper never follows redirects (a 3xx is an answer like any other:
//! the providers treat it as a configuration error). Every exchange, from
//! connecting to the last byte of the answer, is bounded by the timeout,
//! and at most [`MAX_ANSWER_BYTES`] of an answer are read.
//!
//! One [`Outbound`] per provider: its pool keeps connections per origin
//! (one HTTP/2 connection carries all of APNs's requests).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use super::guard::{AllowHosts, forbidden};

/// The most of an answer that is read: push services answer with a few
/// hundred bytes of JSON at most; anything longer is cut off and the
/// answer judged by its status.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Idle connections kept per origin: as many as the scheduler may have in
/// flight to one host (`SEALPOST_PUSH_HOST_CONCURRENCY`, at most 64), so
/// that a burst of wake-ups to a service speaking HTTP/1.1 reuses its
/// connections instead of opening (and, over TLS, handshaking) most of
/// them anew. An HTTP/2 service (APNs, FCM) multiplexes over one.
const IDLE_PER_HOST: usize = 64;

/// How long an idle pooled connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// A push service's answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// At most [`MAX_ANSWER_BYTES`].
    pub body: Bytes,
}

/// Why no answer came. Its `Display` never carries the URL (a target is a
/// capability).
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("timed out")]
    Timeout,
    /// The host is not allowed: it resolved only to addresses the guard
    /// forbids, or the URL broke a static rule.
    #[error("refused by the SSRF guard: {0}")]
    Refused(String),
    #[error("{0}")]
    Failed(String),
}

/// A client for one provider.
#[derive(Clone)]
pub struct Outbound {
    client: Client<HttpsConnector<Guarded>, Full<Bytes>>,
    allow: Arc<AllowHosts>,
    timeout: Duration,
}

impl Outbound {
    /// `http2_only`: speak HTTP/2 only (APNs): negotiated with ALPN over
    /// TLS, and with prior knowledge over plain `http` (an allowed host,
    /// such as a test's fake).
    pub fn new(allow: Arc<AllowHosts>, timeout: Duration, http2_only: bool) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let https = if http2_only {
            builder.enable_http2().wrap_connector(Guarded {
                allow: allow.clone(),
            })
        } else {
            builder.enable_all_versions().wrap_connector(Guarded {
                allow: allow.clone(),
            })
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(IDLE_PER_HOST)
            .pool_idle_timeout(IDLE_TIMEOUT)
            .http2_only(http2_only)
            .build(https);
        Self {
            client,
            allow,
            timeout,
        }
    }

    /// Sends `request` and reads the answer, all within the timeout. The
    /// URL's scheme and literal host are checked by the guard's static
    /// rules first (plain `http` only to an allowed host).
    pub async fn send(&self, request: Request<Bytes>) -> Result<Answer, OutboundError> {
        super::guard::check_static(&request.uri().to_string(), &self.allow)
            .map_err(OutboundError::Refused)?;
        let request = request.map(Full::new);
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|err| OutboundError::Failed(describe(&err)))?;
            let (parts, body) = response.into_parts();
            // An answer longer than the cap is judged by its status alone.
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(OutboundError::Timeout))
    }
}

/// An answer as a service would give it, for the providers' tests of how
/// they judge one.
#[cfg(test)]
pub fn fake_answer(status: u16, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    Answer {
        status: StatusCode::from_u16(status).unwrap(),
        headers: map,
        body: Bytes::from(body.to_owned()),
    }
}

/// The cause of a failed request, for the log: the error chain without
/// the URL (hyper's errors do not carry it; ours neither).
fn describe(err: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error as _;
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The TCP connector under TLS: resolves the host and connects to the
/// first address that the guard allows and answers.
#[derive(Clone)]
struct Guarded {
    allow: Arc<AllowHosts>,
}

impl tower::Service<Uri> for Guarded {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let allow = self.allow.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other("no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let allowed = allow.allows(&host, port);
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await?
                .filter(|addr| allowed || !forbidden(addr.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "the host resolves to no address the SSRF guard allows",
                ));
            }
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        return Ok(TokioIo::new(stream));
                    }
                    Err(err) => last = Some(err),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::other("no address")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_private_addresses_unless_allowed() {
        // A listener on loopback: without the allow-list the request is
        // refused before any byte is sent; with it, it is answered.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut buf = vec![0u8; 4096];
            let _ = socket.read(&mut buf).await.unwrap();
            socket
                .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
        });
        let url = format!("http://127.0.0.1:{port}/push/1");
        let timeout = Duration::from_secs(5);
        let closed = Outbound::new(Arc::new(AllowHosts::default()), timeout, false);
        let refused = closed
            .send(Request::post(&url).body(Bytes::new()).unwrap())
            .await;
        assert!(
            matches!(refused, Err(OutboundError::Refused(_))),
            "{refused:?}"
        );

        let allow = AllowHosts::parse(&[format!("127.0.0.1:{port}")]).unwrap();
        let open = Outbound::new(Arc::new(allow), timeout, false);
        let answer = open
            .send(Request::post(&url).body(Bytes::from_static(b"x")).unwrap())
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::CREATED);
        assert_eq!(&answer.body[..], b"ok");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_hanging_service_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(socket);
        });
        let allow = AllowHosts::parse(&[format!("127.0.0.1:{port}")]).unwrap();
        let outbound = Outbound::new(Arc::new(allow), Duration::from_millis(200), false);
        let url = format!("http://127.0.0.1:{port}/");
        let started = std::time::Instant::now();
        let answer = outbound
            .send(Request::post(&url).body(Bytes::new()).unwrap())
            .await;
        assert!(matches!(answer, Err(OutboundError::Timeout)), "{answer:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        server.abort();
    }
}
