//! The REST endpoints this client calls, one method each, and the one
//! place where an HTTP reply becomes a value or an [`Error`].
//!
//! [`Rest`] knows nothing of sessions: each authenticated call takes the
//! access token to present. Refreshing and retrying after a `401` is the
//! session's work ([`crate::session`]).

use std::time::Duration;

use reqwest::header::RETRY_AFTER;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::json;
use uuid::Uuid;

use crate::error::{Error, ErrorBody, Result, WireError};
use crate::wire::{
    Accepted, Acked, Directory, Envelope, Limits, Me, MultiRequest, OwnDevice, OwnDevices, Page,
    PushInfo, PushTarget, Registered, SendRequest, SharedRecipient, TokenPair, User, Vapid,
};

/// How long one request may take, connection included. A server that
/// answers nothing in this long is as good as gone; the callers retry.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP side of one server.
#[derive(Clone)]
pub(crate) struct Rest {
    base: String,
    http: reqwest::Client,
    /// The TLS settings of `http`, for the WebSocket to use the same.
    #[cfg(feature = "rustls")]
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl Rest {
    /// `base` is the server's root, e.g. `https://relay.example.com`.
    pub fn new(base: &str) -> Result<Self> {
        let builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
        #[cfg(feature = "rustls")]
        let tls = std::sync::Arc::new(crate::tls::client_config()?);
        #[cfg(feature = "rustls")]
        let builder = builder.tls_backend_preconfigured((*tls).clone());
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http: builder.build()?,
            #[cfg(feature = "rustls")]
            tls,
        })
    }

    #[cfg(feature = "rustls")]
    pub fn tls(&self) -> std::sync::Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn register(
        &self,
        username: &str,
        password: &str,
        public_key: &str,
    ) -> Result<Registered> {
        let body = json!({ "username": username, "password": password, "public_key": public_key });
        json_reply(self.http.post(self.url("/v1/register")).json(&body)).await
    }

    pub async fn login(&self, username: &str, password: &str, device_id: u32) -> Result<TokenPair> {
        let body = json!({ "username": username, "password": password, "device_id": device_id });
        json_reply(self.http.post(self.url("/v1/login")).json(&body)).await
    }

    pub async fn add_device(
        &self,
        username: &str,
        password: &str,
        public_key: &str,
        name: Option<&str>,
    ) -> Result<TokenPair> {
        let mut body =
            json!({ "username": username, "password": password, "public_key": public_key });
        if let Some(name) = name {
            body["name"] = json!(name);
        }
        json_reply(self.http.post(self.url("/v1/devices")).json(&body)).await
    }

    /// `POST /v1/token/refresh`. The error tells whether the token may have
    /// been spent: see [`RefreshError`].
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, RefreshError> {
        let request = self
            .http
            .post(self.url("/v1/token/refresh"))
            .json(&json!({ "refresh_token": refresh_token }));
        json_reply(request).await.map_err(|e| match e {
            // Never sent: the token is as good as before.
            Error::Http(h) if h.is_connect() => RefreshError::NotSent(Error::Http(h)),
            // The server answered: it did not spend the token on a refusal
            // of the request as a whole.
            Error::RateLimited { .. } | Error::Unavailable(_) | Error::Internal => {
                RefreshError::NotSent(e)
            }
            Error::Http(_) => RefreshError::Lost(e),
            other => RefreshError::Refused(other),
        })
    }

    pub async fn me(&self, token: &str) -> Result<Me> {
        json_reply(self.http.get(self.url("/v1/me")).bearer_auth(token)).await
    }

    pub async fn user(&self, token: &str, username: &str) -> Result<User> {
        let path = format!("/v1/users/{username}");
        json_reply(self.http.get(self.url(&path)).bearer_auth(token)).await
    }

    pub async fn directory(&self, token: &str, user: Uuid) -> Result<Directory> {
        let path = format!("/v1/users/{user}/devices");
        json_reply(self.http.get(self.url(&path)).bearer_auth(token)).await
    }

    /// `GET /v1/limits` (no authentication).
    pub async fn limits(&self) -> Result<Limits> {
        json_reply(self.http.get(self.url("/v1/limits"))).await
    }

    pub async fn own_devices(&self, token: &str) -> Result<Vec<OwnDevice>> {
        let listed: OwnDevices =
            json_reply(self.http.get(self.url("/v1/devices")).bearer_auth(token)).await?;
        Ok(listed.devices)
    }

    pub async fn remove_device(&self, token: &str, device_id: u32, password: &str) -> Result<()> {
        let path = format!("/v1/devices/{device_id}");
        let request = self
            .http
            .delete(self.url(&path))
            .bearer_auth(token)
            .json(&json!({ "password": password }));
        empty_reply(request).await
    }

    pub async fn send(
        &self,
        token: &str,
        to: Uuid,
        envelopes: &[Envelope],
        client_id: Option<&str>,
        urgent: bool,
    ) -> Result<Accepted> {
        let request = self
            .http
            .post(self.url("/v1/messages"))
            .bearer_auth(token)
            .json(&SendRequest {
                to,
                envelopes,
                client_id,
                urgent,
            });
        json_reply(request).await
    }

    /// `POST /v1/messages/multi`, in the shared form.
    pub async fn send_multi(
        &self,
        token: &str,
        shared: &str,
        recipients: &[SharedRecipient],
        client_id: Option<&str>,
        urgent: bool,
    ) -> Result<Accepted> {
        let request = self
            .http
            .post(self.url("/v1/messages/multi"))
            .bearer_auth(token)
            .json(&MultiRequest {
                shared,
                recipients,
                client_id,
                urgent,
            });
        json_reply(request).await
    }

    /// `PUT /v1/devices/{device_id}/push`.
    pub async fn set_push(
        &self,
        token: &str,
        device_id: u32,
        target: &PushTarget,
    ) -> Result<PushInfo> {
        let path = format!("/v1/devices/{device_id}/push");
        json_reply(
            self.http
                .put(self.url(&path))
                .bearer_auth(token)
                .json(target),
        )
        .await
    }

    /// `DELETE /v1/devices/{device_id}/push`.
    pub async fn delete_push(&self, token: &str, device_id: u32) -> Result<()> {
        let path = format!("/v1/devices/{device_id}/push");
        empty_reply(self.http.delete(self.url(&path)).bearer_auth(token)).await
    }

    /// `GET /v1/push/vapid` (no authentication).
    pub async fn vapid(&self) -> Result<Vapid> {
        json_reply(self.http.get(self.url("/v1/push/vapid"))).await
    }

    pub async fn messages(&self, token: &str, after: Option<Uuid>, limit: u32) -> Result<Page> {
        let mut request = self
            .http
            .get(self.url("/v1/messages"))
            .bearer_auth(token)
            .query(&[("limit", limit.to_string())]);
        if let Some(after) = after {
            request = request.query(&[("after", after.to_string())]);
        }
        json_reply(request).await
    }

    pub async fn ack(&self, token: &str, ids: &[Uuid]) -> Result<()> {
        let request = self
            .http
            .post(self.url("/v1/messages/ack"))
            .bearer_auth(token)
            .json(&json!({ "ids": ids }));
        let _: Acked = json_reply(request).await?;
        Ok(())
    }

    pub async fn logout(&self, token: &str) -> Result<()> {
        empty_reply(self.http.post(self.url("/v1/logout")).bearer_auth(token)).await
    }
}

/// Why a refresh failed, by what it did to the refresh token.
#[derive(Debug)]
pub(crate) enum RefreshError {
    /// The request never reached the server, or the server refused it
    /// before looking at the token: retry with the same token.
    NotSent(Error),
    /// The reply was lost: the token may have been spent. One more try is
    /// allowed (`protocol.md`); a spent token presented twice revokes every
    /// session of the user.
    Lost(Error),
    /// The server refused the token (`401`): the session is over.
    Refused(Error),
}

async fn json_reply<T: DeserializeOwned>(request: RequestBuilder) -> Result<T> {
    let response = checked(request.send().await?).await?;
    let bytes = response.bytes().await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Protocol(format!("unexpected reply: {e}")))
}

async fn empty_reply(request: RequestBuilder) -> Result<()> {
    checked(request.send().await?).await.map(drop)
}

/// The response if it succeeded; its error object as an [`Error`] if not.
async fn checked(response: Response) -> Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let bytes = response.bytes().await?;
    let wire = serde_json::from_slice::<ErrorBody>(&bytes)
        .map(|b| b.error)
        .unwrap_or_else(|_| WireError {
            // Not one of ours (a proxy's page): keep what the status says.
            code: fallback_code(status).into(),
            message: format!("HTTP {status}"),
            ..WireError::default()
        });
    Err(wire.into_error(retry_after))
}

fn fallback_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        413 => "too_large",
        429 => "rate_limited",
        500 => "internal",
        502..=504 => "unavailable",
        400..=499 => "invalid",
        _ => "internal",
    }
}
