//! STUB until the integrator's outbound client lands on main
//! (push-spec.md): plain `http` over HTTP/1.1 only, enough for the fakes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::guard::AllowHosts;

/// What a push service answered.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("timed out")]
    Timeout,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("{0}")]
    Other(String),
}

pub struct Outbound {
    allow: Arc<AllowHosts>,
    timeout: Duration,
}

impl Outbound {
    pub fn new(allow: Arc<AllowHosts>, timeout: Duration, _http2_only: bool) -> Self {
        Self { allow, timeout }
    }

    pub async fn send(&self, req: Request<Bytes>) -> Result<Answer, OutboundError> {
        tokio::time::timeout(self.timeout, self.exchange(req))
            .await
            .map_err(|_| OutboundError::Timeout)?
    }

    async fn exchange(&self, req: Request<Bytes>) -> Result<Answer, OutboundError> {
        let host = req.uri().host().unwrap_or_default().to_owned();
        let port = req.uri().port_u16().unwrap_or(80);
        if !self.allow.allows(&host, port) {
            return Err(OutboundError::Other("host not allowed (stub)".into()));
        }
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| OutboundError::Connect(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| OutboundError::Connect(e.to_string()))?;
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        let authority = parts
            .uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        parts
            .headers
            .insert(http::header::HOST, authority.parse().unwrap());
        let answer = sender
            .send_request(Request::from_parts(parts, Full::new(body)))
            .await
            .map_err(|e| OutboundError::Other(e.to_string()))?;
        let (parts, body) = answer.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| OutboundError::Other(e.to_string()))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}
