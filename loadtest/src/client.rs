//! Talking to sealpost the way its clients do: REST for accounts and the
//! polling path (backing off on 429 and 503), WebSockets for the rest.
//!
//! Sign-up costs the server two argon2 hashes per account, so accounts can be
//! kept in a cache file: a rerun trades each cached refresh token for fresh
//! tokens (no hashing) instead of registering again. Accounts with several
//! devices keep one refresh token per device there (refresh tokens belong to
//! a device), so a rerun refreshes every device instead of adding or logging
//! in devices again.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt, stream};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use uuid::Uuid;

pub const PASSWORD: &str = "loadtest-password-0123456789";

/// A server to drive: its HTTP base URL and the socket address behind it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub base: String,
    pub addr: SocketAddr,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        let authority = base
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--url must be http://host:port, got {url}"))?;
        let authority = authority.split('/').next().unwrap_or(authority);
        let addr = authority
            .to_socket_addrs()
            .with_context(|| format!("resolving {authority}"))?
            .next()
            .ok_or_else(|| anyhow!("{authority} resolves to nothing"))?;
        if !addr.ip().is_loopback() {
            bail!("{url}: load tests target loopback addresses only");
        }
        Ok(Self { base, addr })
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }
}

/// A logged-in account: `access` and `refresh` are device 1's session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Account {
    pub username: String,
    pub user_id: Uuid,
    pub access: String,
    pub refresh: String,
    /// The account's other devices with a session each, ascending by id:
    /// empty unless a run asked for several devices per account.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<Device>,
}

/// A device beyond device 1, logged in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Device {
    pub device_id: u32,
    pub access: String,
    pub refresh: String,
}

impl Account {
    /// The first `count` devices' (device id, access token), device 1
    /// first.
    pub fn sessions(&self, count: usize) -> anyhow::Result<Vec<(u32, &str)>> {
        let all: Vec<(u32, &str)> = std::iter::once((1, self.access.as_str()))
            .chain(
                self.devices
                    .iter()
                    .map(|d| (d.device_id, d.access.as_str())),
            )
            .take(count)
            .collect();
        if all.len() < count {
            bail!(
                "{} has {} devices logged in, the run wants {count}",
                self.username,
                all.len()
            );
        }
        Ok(all)
    }
}

/// What setting up accounts' extra devices cost: each `added` or
/// `logged_in` device is an argon2 hash on the server, each `refreshed` one
/// is not.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct DeviceSetup {
    pub added: u64,
    pub refreshed: u64,
    pub logged_in: u64,
    pub removed: u64,
}

impl DeviceSetup {
    fn merge(&mut self, other: &DeviceSetup) {
        self.added += other.added;
        self.refreshed += other.refreshed;
        self.logged_in += other.logged_in;
        self.removed += other.removed;
    }
}

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    pub target: Target,
}

/// Attempts for a request that the server answers with 429 or 503.
const MAX_ATTEMPTS: u32 = 10;

impl Api {
    pub fn new(target: Target) -> Self {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("HTTP client");
        Self { http, target }
    }

    /// As [`Api::new`], with every request from `source` (a loopback
    /// address such as 127.0.2.7), so that per-address limits count it
    /// apart from other clients'.
    pub fn bound(target: Target, source: IpAddr) -> Self {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .local_address(source)
            .build()
            .expect("HTTP client");
        Self { http, target }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.target.base)
    }

    /// Sends a request, retrying with jittered exponential backoff while the
    /// server says 429 or 503 (honouring `Retry-After`). Returns the status
    /// and the JSON body.
    pub async fn call(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=MAX_ATTEMPTS {
            let response = build(&self.http).send().await?;
            let status = response.status();
            if matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            ) && attempt < MAX_ATTEMPTS
            {
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                    .map(Duration::from_secs);
                let jitter = rand::rng().random_range(0..=delay.as_millis() as u64);
                tokio::time::sleep(
                    retry_after.unwrap_or(delay / 2 + Duration::from_millis(jitter)),
                )
                .await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
            let body = response.json().await.unwrap_or(Value::Null);
            return Ok((status, body));
        }
        unreachable!("the last attempt returns")
    }

    async fn tokens(&self, path: &str, body: Value) -> anyhow::Result<(String, String)> {
        let (access, refresh, _) = self.token_pair(path, body, StatusCode::OK).await?;
        Ok((access, refresh))
    }

    /// A token pair reply: (access, refresh, device_id when the server
    /// names one).
    async fn token_pair(
        &self,
        path: &str,
        body: Value,
        expect: StatusCode,
    ) -> anyhow::Result<(String, String, Option<u32>)> {
        let (status, reply) = self.call(|h| h.post(self.url(path)).json(&body)).await?;
        if status != expect {
            bail!("{path}: {status} {reply}");
        }
        let field = |name: &str| {
            reply[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("{path}: no {name}"))
        };
        let device_id = reply["device_id"].as_u64().map(|d| d as u32);
        Ok((field("access_token")?, field("refresh_token")?, device_id))
    }

    /// Registers (a taken name is fine: it is ours from an earlier run) and
    /// logs in.
    pub async fn sign_up(&self, username: &str) -> anyhow::Result<Account> {
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
        let body = json!({ "username": username, "password": PASSWORD, "public_key": key });
        let (status, reply) = self
            .call(|h| h.post(self.url("/v1/register")).json(&body))
            .await?;
        if status != StatusCode::CREATED && status != StatusCode::CONFLICT {
            bail!("register {username}: {status} {reply}");
        }
        let (access, refresh) = self
            .tokens(
                "/v1/login",
                json!({ "username": username, "password": PASSWORD }),
            )
            .await?;
        self.account(username, access, refresh).await
    }

    /// Trades a cached refresh token for fresh tokens.
    pub async fn resume(&self, username: &str, refresh: &str) -> anyhow::Result<Account> {
        let (access, refresh) = self
            .tokens("/v1/token/refresh", json!({ "refresh_token": refresh }))
            .await?;
        self.account(username, access, refresh).await
    }

    async fn account(
        &self,
        username: &str,
        access: String,
        refresh: String,
    ) -> anyhow::Result<Account> {
        let (status, me) = self
            .call(|h| h.get(self.url("/v1/me")).bearer_auth(&access))
            .await?;
        if status != StatusCode::OK {
            bail!("me: {status} {me}");
        }
        let user_id = me["id"]
            .as_str()
            .ok_or_else(|| anyhow!("me: no id"))?
            .parse()?;
        Ok(Account {
            username: username.to_owned(),
            user_id,
            access,
            refresh,
            devices: Vec::new(),
        })
    }

    /// Gives `account` exactly `wanted` devices, each logged in, and fills
    /// `account.devices` with devices 2.. (device 1 is the account's own
    /// session). Devices it already has are reused: refreshed with the
    /// token in `cached` when there is one (no hashing), else logged in.
    /// Missing ones are added with `POST /v1/devices`; devices beyond
    /// `wanted` are removed, since they would queue copies that nobody
    /// acks. Bounded: at most `wanted` - 1 additions.
    pub async fn ensure_devices(
        &self,
        account: &mut Account,
        cached: &[Device],
        wanted: usize,
    ) -> anyhow::Result<DeviceSetup> {
        let mut setup = DeviceSetup::default();
        let (status, listing) = self
            .call(|h| h.get(self.url("/v1/devices")).bearer_auth(&account.access))
            .await?;
        if status != StatusCode::OK {
            bail!("devices of {}: {status} {listing}", account.username);
        }
        let mut others: Vec<u32> = listing["devices"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|d| d["device_id"].as_u64())
            .map(|d| d as u32)
            .filter(|&d| d != 1)
            .collect();
        others.sort_unstable();
        let keep = wanted.saturating_sub(1);
        for extra in others.split_off(keep.min(others.len())) {
            let path = format!("/v1/devices/{extra}");
            let body = json!({ "password": PASSWORD });
            let (status, reply) = self
                .call(|h| {
                    h.delete(self.url(&path))
                        .bearer_auth(&account.access)
                        .json(&body)
                })
                .await?;
            if status != StatusCode::NO_CONTENT {
                bail!(
                    "removing device {extra} of {}: {status} {reply}",
                    account.username
                );
            }
            setup.removed += 1;
        }
        let mut devices = Vec::with_capacity(keep);
        for device_id in others {
            let refreshed = match cached.iter().find(|d| d.device_id == device_id) {
                Some(old) => self.refresh_device(&old.refresh, device_id).await.ok(),
                None => None,
            };
            let device = match refreshed {
                Some(device) => {
                    setup.refreshed += 1;
                    device
                }
                None => {
                    setup.logged_in += 1;
                    self.login_device(&account.username, device_id).await?
                }
            };
            devices.push(device);
        }
        for _ in devices.len()..keep {
            devices.push(self.add_device(&account.username).await?);
            setup.added += 1;
        }
        account.devices = devices;
        Ok(setup)
    }

    /// `POST /v1/devices`: a new device with its own key, logged in.
    pub async fn add_device(&self, username: &str) -> anyhow::Result<Device> {
        let key: [u8; 32] = rand::rng().random();
        let body = json!({ "username": username, "password": PASSWORD,
                           "public_key": b64(&key), "name": "sealpost-loadtest" });
        let (access, refresh, device_id) = self
            .token_pair("/v1/devices", body, StatusCode::CREATED)
            .await
            .map_err(|e| {
                if e.to_string().contains("too_many_devices") {
                    e.context("at the server's device cap: raise SEALPOST_MAX_DEVICES_PER_USER")
                } else {
                    e
                }
            })?;
        let device_id = device_id.ok_or_else(|| anyhow!("/v1/devices: no device_id"))?;
        Ok(Device {
            device_id,
            access,
            refresh,
        })
    }

    /// `POST /v1/login` as one device (an argon2 hash on the server).
    pub async fn login_device(&self, username: &str, device_id: u32) -> anyhow::Result<Device> {
        let body = json!({ "username": username, "password": PASSWORD, "device_id": device_id });
        let (access, refresh, named) = self.token_pair("/v1/login", body, StatusCode::OK).await?;
        if named.is_some_and(|n| n != device_id) {
            bail!("login as device {device_id} of {username} answered device {named:?}");
        }
        Ok(Device {
            device_id,
            access,
            refresh,
        })
    }

    /// Trades one device's cached refresh token for fresh tokens.
    pub async fn refresh_device(&self, refresh: &str, device_id: u32) -> anyhow::Result<Device> {
        let body = json!({ "refresh_token": refresh });
        let (access, refresh, named) = self
            .token_pair("/v1/token/refresh", body, StatusCode::OK)
            .await?;
        if named.is_some_and(|n| n != device_id) {
            bail!("refreshing device {device_id} answered device {named:?}");
        }
        Ok(Device {
            device_id,
            access,
            refresh,
        })
    }

    /// `POST /v1/login` as device 1: a fresh session (an argon2 hash on the
    /// server). Returns (access, refresh).
    pub async fn log_in(&self, username: &str) -> anyhow::Result<(String, String)> {
        self.tokens(
            "/v1/login",
            json!({ "username": username, "password": PASSWORD }),
        )
        .await
    }

    /// Trades a refresh token for a fresh (access, refresh) pair.
    pub async fn refresh(&self, refresh: &str) -> anyhow::Result<(String, String)> {
        self.tokens("/v1/token/refresh", json!({ "refresh_token": refresh }))
            .await
    }

    /// `POST /v1/logout` (this session) or, with `all`, `POST
    /// /v1/logout-all` (every session of the user).
    pub async fn log_out(&self, access: &str, all: bool) -> anyhow::Result<()> {
        let path = if all { "/v1/logout-all" } else { "/v1/logout" };
        let (status, reply) = self
            .call(|h| h.post(self.url(path)).bearer_auth(access))
            .await?;
        if status != StatusCode::NO_CONTENT {
            bail!("{path}: {status} {reply}");
        }
        Ok(())
    }

    /// `POST /v1/messages`; returns the message id.
    pub async fn send(&self, from: &Account, to: Uuid, body: &[u8]) -> anyhow::Result<Uuid> {
        let payload = json!({ "to": to, "body": b64(body) });
        let (status, reply) = self
            .call(|h| {
                h.post(self.url("/v1/messages"))
                    .bearer_auth(&from.access)
                    .json(&payload)
            })
            .await?;
        if status != StatusCode::CREATED {
            bail!("send: {status} {reply}");
        }
        Ok(reply["id"]
            .as_str()
            .ok_or_else(|| anyhow!("send: no id"))?
            .parse()?)
    }

    /// One page of `who`'s queue: (id, body) pairs.
    pub async fn fetch(&self, who: &Account, limit: u32) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let (status, page) = self
            .call(|h| {
                h.get(self.url(&format!("/v1/messages?limit={limit}")))
                    .bearer_auth(&who.access)
            })
            .await?;
        if status != StatusCode::OK {
            bail!("fetch: {status} {page}");
        }
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        Ok(messages
            .iter()
            .filter_map(|m| Some((m["id"].as_str()?.to_owned(), unb64(m["body"].as_str()?)?)))
            .collect())
    }

    pub async fn ack(&self, who: &Account, ids: &[String]) -> anyhow::Result<()> {
        let payload = json!({ "ids": ids });
        let (status, reply) = self
            .call(|h| {
                h.post(self.url("/v1/messages/ack"))
                    .bearer_auth(&who.access)
                    .json(&payload)
            })
            .await?;
        if status != StatusCode::OK {
            bail!("ack: {status} {reply}");
        }
        Ok(())
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

pub fn unb64(text: &str) -> Option<Vec<u8>> {
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text).ok()
}

/// `count` accounts named `{prefix}{n}`, signed up `concurrency` at a time,
/// reusing and updating `cache` when given.
pub async fn accounts(
    api: &Api,
    prefix: &str,
    count: usize,
    concurrency: usize,
    cache: Option<&Path>,
) -> anyhow::Result<Vec<Account>> {
    let (accounts, _) =
        accounts_with_devices(api, prefix, count, |_| 1, concurrency, cache).await?;
    Ok(accounts)
}

/// As [`accounts`], and the n-th account gets exactly `devices(n)` devices
/// (see [`Api::ensure_devices`]). An account wanting one device is left as
/// it is, as [`accounts`] always did: its cached device sessions, if any,
/// are kept in the cache untouched.
pub async fn accounts_with_devices(
    api: &Api,
    prefix: &str,
    count: usize,
    devices: impl Fn(usize) -> usize,
    concurrency: usize,
    cache: Option<&Path>,
) -> anyhow::Result<(Vec<Account>, DeviceSetup)> {
    let cached: HashMap<String, Account> = match cache {
        Some(path) if path.exists() => {
            serde_json::from_slice(&std::fs::read(path)?).context("token cache")?
        }
        _ => HashMap::new(),
    };
    let bar = progress(count as u64, "accounts");
    let results: Vec<anyhow::Result<(Account, DeviceSetup)>> = stream::iter(0..count)
        .map(|n| {
            let username = format!("{prefix}{n}");
            let previous = cached.get(&username).cloned();
            let wanted = devices(n).max(1);
            let (api, bar) = (api.clone(), bar.clone());
            async move {
                let old_devices = previous
                    .as_ref()
                    .map(|old| old.devices.clone())
                    .unwrap_or_default();
                let mut account = match previous {
                    Some(old) => match api.resume(&username, &old.refresh).await {
                        Ok(account) => account,
                        Err(_) => api.sign_up(&username).await?,
                    },
                    None => api.sign_up(&username).await?,
                };
                let setup = if wanted > 1 {
                    api.ensure_devices(&mut account, &old_devices, wanted)
                        .await?
                } else {
                    account.devices = old_devices;
                    DeviceSetup::default()
                };
                bar.inc(1);
                Ok::<_, anyhow::Error>((account, setup))
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let mut setup = DeviceSetup::default();
    let mut accounts = Vec::with_capacity(count);
    for result in results {
        let (account, cost) = result?;
        setup.merge(&cost);
        accounts.push(account);
    }
    if let Some(path) = cache {
        let mut all = cached;
        all.extend(accounts.iter().map(|a| (a.username.clone(), a.clone())));
        std::fs::write(path, serde_json::to_vec(&all)?).context("writing token cache")?;
    }
    Ok((accounts, setup))
}

pub fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, {elapsed})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

pub type Ws = WebSocketStream<TcpStream>;

/// Small buffers: the load generator holds as many sockets as the server.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

/// Opens `/v1/ws` from `source` (any local address when `None`) with the
/// token in the `Authorization` header.
pub async fn connect(
    target: &Target,
    source: Option<IpAddr>,
    token: &str,
) -> Result<Ws, ConnectError> {
    let socket = TcpSocket::new_v4().map_err(ConnectError::Tcp)?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(ConnectError::Tcp)?;
    }
    let stream = socket
        .connect(target.addr)
        .await
        .map_err(ConnectError::Tcp)?;
    stream.set_nodelay(true).map_err(ConnectError::Tcp)?;
    let mut request = target
        .ws_url()
        .into_client_request()
        .map_err(ConnectError::Ws)?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
        .await
        .map_err(ConnectError::Ws)?;
    Ok(ws)
}

#[derive(Debug)]
pub enum ConnectError {
    Tcp(std::io::Error),
    Ws(WsError),
}

impl ConnectError {
    /// A short cause for the failure counters.
    pub fn cause(&self) -> &'static str {
        match self {
            ConnectError::Tcp(e) if e.raw_os_error() == Some(24) => "fail_fd_limit",
            ConnectError::Tcp(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                "fail_no_ports"
            }
            ConnectError::Tcp(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                "fail_refused"
            }
            ConnectError::Tcp(_) => "fail_tcp",
            ConnectError::Ws(WsError::Http(_)) => "fail_http",
            ConnectError::Ws(_) => "fail_handshake",
        }
    }
}

/// A JSON frame from the server, skipping pings; `None` when the socket
/// closed or failed.
pub async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(text)) => return serde_json::from_str(&text).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Reads `ready` and the backlog up to `drained`; returns the backlog's
/// message frames.
pub async fn until_drained(ws: &mut Ws) -> anyhow::Result<Vec<Value>> {
    Ok(ready_and_backlog(ws).await?.1)
}

/// As [`until_drained`], also returning the `ready` frame.
pub async fn ready_and_backlog(ws: &mut Ws) -> anyhow::Result<(Value, Vec<Value>)> {
    let ready = next_json(ws)
        .await
        .ok_or_else(|| anyhow!("closed before ready"))?;
    if ready["type"] != "ready" {
        bail!("expected ready, got {ready}");
    }
    let mut backlog = Vec::new();
    loop {
        let frame = next_json(ws)
            .await
            .ok_or_else(|| anyhow!("closed while draining"))?;
        match frame["type"].as_str() {
            Some("drained") => return Ok((ready, backlog)),
            Some("message") => backlog.push(frame),
            _ => {}
        }
    }
}

pub async fn send_text(ws: &mut Ws, value: &Value) -> Result<(), WsError> {
    ws.send(Message::Text(value.to_string().into())).await
}

/// The source addresses `127.0.0.2 ..` to spread sockets over, or none.
pub fn sources(count: u8) -> Vec<Option<IpAddr>> {
    if count == 0 {
        return vec![None];
    }
    (0..count)
        .map(|n| Some(IpAddr::from([127, 0, 0, 2 + n])))
        .collect()
}
