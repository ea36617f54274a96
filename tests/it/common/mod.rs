//! The test harness: real servers on ephemeral ports, each on a fresh
//! database, and a small HTTP client that speaks the API as a client would.
//!
//! - [`Backend`]: SQLite (a file in a temporary directory) or PostgreSQL (a
//!   fresh database created on `SEALPOST_TEST_DATABASE_URL` and dropped after
//!   the test).
//! - [`TestServer`]: the server in this process, stopped gracefully.
//! - [`ServerProcess`]: the `sealpost` binary as a child process, for tests
//!   that kill it with SIGKILL.
//! - [`Api`]: HTTP helpers; [`Account`]: a registered, logged-in user.
//! - [`cluster`]: several servers on one PostgreSQL database and one NATS.
//! - [`multi`]: requests of the multi-recipient send, and its copies.
//! - [`pg`]: a private PostgreSQL cluster, for tests that pause, crash and
//!   restart their database.
//! - [`traffic`]: steady, timed senders and the checks on what they were
//!   answered, for tests that break things under a running server.
//! - [`proxy`]: a TCP proxy in front of a server that loses chosen answers.
//! - [`fake_push`]: fake push services (Web Push, APNs, FCM) that check
//!   what the real ones check and record what they were sent.
//! - [`toolchain`]: the npm installs and the Chromium the JavaScript tests
//!   need, set up on first use.

#![allow(dead_code)]

pub mod cluster;
pub mod fake_push;
pub mod multi;
pub mod pg;
pub mod proxy;
pub mod toolchain;
pub mod traffic;
pub mod ws;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use reqwest::StatusCode;
use sealpost::{Config, Server};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Fixed so that a restarted [`ServerProcess`] accepts earlier tokens.
pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123";
pub const PASSWORD: &str = "correct horse battery staple";
/// Passed to PostgreSQL servers, which require storage keys, as they require
/// a JWT secret. SQLite servers generate theirs beside the database, so the
/// suite also runs the default path.
pub const STORAGE_KEYS: &str = "1:c2VhbHBvc3QtdGVzdC1zdG9yYWdlLWtleS0wMTIzNDU=";

/// Generates one `#[tokio::test]` per backend for each named async test
/// function taking a [`Backend`]. The PostgreSQL tests exist only when
/// `SEALPOST_TEST_DATABASE_URL` was set at build time (see `build.rs`).
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        #[cfg(sealpost_pg_tests)]
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty database for one test.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    /// (admin URL, database name) to drop when the test ends.
    pg: Option<(String, String)>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("sealpost.db").display());
                Self {
                    url,
                    _dir: Some(dir),
                    pg: None,
                }
            }
            Backend::Postgres => {
                let admin = std::env::var("SEALPOST_TEST_DATABASE_URL").expect(
                    "the PostgreSQL tests were compiled in, so SEALPOST_TEST_DATABASE_URL must be set",
                );
                let name = format!("sealpost_test_{}", Uuid::new_v4().simple());
                let mut conn = connect_pg(&admin).await;
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("CREATE DATABASE");
                let url = with_database(&admin, &name);
                Self {
                    url,
                    _dir: None,
                    pg: Some((admin, name)),
                }
            }
        }
    }
}

impl TestDb {
    /// The same database for a second server, without the cleanup: the
    /// original drops it. Stop the second server first.
    pub fn shared(&self) -> TestDb {
        TestDb {
            url: self.url.clone(),
            _dir: None,
            pg: None,
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.url.starts_with("postgres")
    }

    /// The number one query of the test's own (`SELECT COUNT(*) ...`, the
    /// same SQL on both backends) reads behind the server's back: for state
    /// no API shows, such as a wake-up waiting in the database.
    pub async fn count(&self, sql: &'static str) -> i64 {
        if self.is_postgres() {
            let pool = sqlx::PgPool::connect(&self.url)
                .await
                .expect("raw PostgreSQL");
            let count = sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            pool.close().await;
            count
        } else {
            use std::str::FromStr;
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.url)
                .expect("an SQLite URL")
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
            let pool = sqlx::SqlitePool::connect_with(options)
                .await
                .expect("raw SQLite");
            let count = sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            pool.close().await;
            count
        }
    }
}

async fn connect_pg(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at SEALPOST_TEST_DATABASE_URL: {e}"))
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{name}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin, name)) = self.pg.take() else {
            return;
        };
        // Drop runs outside any runtime we may block, so use a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = connect_pg(&admin).await;
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await;
            });
        })
        .join();
    }
}

/// Rate limits and caps the tests turn off by default, as flag and value.
pub const UNLIMITED: &[(&str, &str)] = &[
    ("--auth-rate-per-minute", "0"),
    ("--password-rate-per-minute", "0"),
    ("--send-rate-per-second", "0"),
    ("--pair-rate-per-second", "0"),
    ("--max-connections-per-ip", "0"),
    ("--max-http-connections-per-ip", "0"),
    ("--max-unauthenticated-sockets", "0"),
    ("--max-unauthenticated-sockets-per-ip", "0"),
];

/// Argon2 at OWASP's cost for a test of the hashing itself (the queue of
/// hashes, their time): pass it among a server's extra flags. The others
/// hash with argon2's smallest parameters (`--insecure-test-hashing`, which
/// only debug builds, as the suite's are, accept), so that the suite's time
/// goes to what it tests rather than to thousands of sign-ups and logins.
pub const OWASP_HASHING: [&str; 2] = ["--insecure-test-hashing", "false"];

/// Whether this build may ask for cheap hashing: the server's own check,
/// so that `cargo test --release` runs at OWASP's cost instead of failing.
const CHEAP_HASHING: bool = cfg!(debug_assertions);

/// Settings for a test server on `db`: ephemeral port, fixed secret.
pub fn config(db: &TestDb, extra: &[&str]) -> Config {
    let mut args = vec![
        "--addr",
        "127.0.0.1:0",
        "--database-url",
        &db.url,
        "--jwt-secret",
        JWT_SECRET,
        "--hash-concurrency",
        "2",
    ];
    if db.is_postgres() && !extra.contains(&"--storage-keys") {
        args.extend_from_slice(&["--storage-keys", STORAGE_KEYS]);
    }
    // Tests sign up and send faster than any client should: the limits are
    // off unless a test sets them.
    for (flag, value) in UNLIMITED {
        if !extra.contains(flag) {
            args.extend([*flag, *value]);
        }
    }
    if CHEAP_HASHING && !extra.contains(&OWASP_HASHING[0]) {
        args.extend([OWASP_HASHING[0], "true"]);
    }
    args.extend_from_slice(extra);
    Config::parse_from(args).expect("test config")
}

/// The server running inside the test process.
pub struct TestServer {
    pub api: Api,
    /// Where it listens; for clients other than [`Api`] (TLS).
    pub addr: std::net::SocketAddr,
    /// Where it serves metrics, if `--metrics-addr` was given.
    pub metrics_addr: Option<std::net::SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    pub db: TestDb,
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, &[]).await
    }

    /// Starts with extra `sealpost serve` flags, e.g. `["--message-ttl", "1s"]`.
    pub async fn start_with(backend: Backend, extra: &[&str]) -> Self {
        let db = TestDb::new(backend).await;
        Self::start_on(db, extra).await
    }

    pub async fn start_on(db: TestDb, extra: &[&str]) -> Self {
        let server = Server::bind(config(&db, extra))
            .await
            .expect("server starts");
        let addr = server.local_addr().unwrap();
        let metrics_addr = server.metrics_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            api: Api::new(format!("http://{addr}")),
            addr,
            metrics_addr,
            stop: Some(stop),
            task: Some(task),
            db,
        }
    }

    /// Graceful shutdown; returns the database for a restart.
    pub async fn stop(mut self) -> TestDb {
        self.stop.take().unwrap().send(()).ok();
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("server stops within 30 s")
            .expect("server task")
            .expect("server ran cleanly");
        let TestServer { db, .. } = self;
        db
    }
}

impl std::ops::Deref for TestServer {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// The `sealpost` binary as a child process.
pub struct ServerProcess {
    child: Child,
    pub api: Api,
    /// Every line the server has logged so far.
    log: Arc<Mutex<Vec<String>>>,
}

impl ServerProcess {
    pub fn spawn(db_url: &str, extra_env: &[(&str, &str)]) -> Self {
        Self::spawn_with(db_url, extra_env, &[])
    }

    /// As [`ServerProcess::spawn`], without the variables `unset` among its
    /// defaults (`DATABASE_URL`, `SEALPOST_JWT_SECRET`, ...), for a test that
    /// sets them another way.
    pub fn spawn_with(db_url: &str, extra_env: &[(&str, &str)], unset: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sealpost"));
        command
            .arg("serve")
            .env_clear()
            .env("SEALPOST_ADDR", "127.0.0.1:0")
            .env("DATABASE_URL", db_url)
            .env("SEALPOST_JWT_SECRET", JWT_SECRET)
            .env("RUST_LOG", "info")
            .env("SEALPOST_AUTH_RATE_PER_MINUTE", "0")
            .env("SEALPOST_SEND_RATE_PER_SECOND", "0")
            .env("SEALPOST_PAIR_RATE_PER_SECOND", "0")
            .env("SEALPOST_INSECURE_TEST_HASHING", CHEAP_HASHING.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if db_url.starts_with("postgres") {
            command.env("SEALPOST_STORAGE_KEYS", STORAGE_KEYS);
        }
        for (k, v) in extra_env {
            command.env(k, v);
        }
        for k in unset {
            command.env_remove(k);
        }
        let mut child = command.spawn().expect("spawn sealpost");
        let stderr = child.stderr.take().unwrap();
        let (addr_tx, addr_rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let lines = log.clone();
        // Keep draining stderr so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line.clone());
                // Text or JSON logs: the address is what follows the
                // scheme, up to the first character no address has.
                if let Some(rest) = line.split("listening on http://").nth(1)
                    && let Some(tx) = addr_tx.take()
                {
                    let addr: String = rest
                        .chars()
                        .take_while(|c| {
                            c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']')
                        })
                        .collect();
                    let _ = tx.send(addr);
                }
                eprintln!("[sealpost] {line}");
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                // Not left running after the test: nothing else owns it yet.
                let _ = child.kill();
                let _ = child.wait();
                panic!("sealpost did not log its address within 60 s");
            }
        };
        Self {
            child,
            api: Api::new(format!("http://{addr}")),
            log,
        }
    }

    /// The logged lines that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }

    /// Asserts that the process has not exited (crashed, or panicked out of
    /// `main`).
    #[track_caller]
    pub fn assert_running(&mut self) {
        let exited = self.child.try_wait().expect("wait on sealpost");
        assert!(exited.is_none(), "sealpost exited: {exited:?}");
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::ops::Deref for ServerProcess {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// A loopback address no listener holds now, for a [`ServerProcess`] that
/// must come back on the same address after a restart (pass it as
/// `SEALPOST_ADDR`). Another process could take the port in between; on a
/// test machine that is rare enough.
pub fn free_local_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").to_string()
}

/// A port nothing uses right now, below the kernel's ephemeral range
/// (32768 and up by default), so that no outgoing connection of this
/// suite's many takes it while a private server on it (NATS, PostgreSQL)
/// is down and must come back on the same port.
pub fn free_port() -> u16 {
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    for _ in 0..100 {
        let port = LOW + (Uuid::new_v4().as_u128() % u128::from(HIGH - LOW)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{HIGH} for a private server");
}

/// A registered and logged-in user.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: Uuid,
    pub username: String,
    pub access: String,
    pub refresh: String,
}

/// A JSON response: status and parsed body (`Null` when empty).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl Reply {
    /// The stable error code of an error reply.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    #[track_caller]
    pub fn expect(self, status: u16) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected reply: {:?}",
            self.body
        );
        self.body
    }

    /// Asserts an error reply with `status` and `code`.
    #[track_caller]
    pub fn expect_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected reply: {:?}",
            self.body
        );
        assert_eq!(self.code(), code, "unexpected error: {:?}", self.body);
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message: {:?}",
            self.body
        );
    }
}

impl Reply {
    /// Parses a raw HTTP/1.1 response read off a socket, whose body has a
    /// `Content-Length` and is JSON or empty (hyper's own refusals, such as
    /// 431, carry none).
    #[track_caller]
    pub fn parse_raw(raw: &[u8]) -> Reply {
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("incomplete reply: {:?}", String::from_utf8_lossy(raw)));
        let head = std::str::from_utf8(&raw[..split]).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        let mut headers = reqwest::header::HeaderMap::new();
        for line in lines {
            let (name, value) = line.split_once(':').expect("header line");
            headers.append(
                reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
                value.trim().parse().unwrap(),
            );
        }
        let length: usize = headers["content-length"].to_str().unwrap().parse().unwrap();
        let body = &raw[split + 4..];
        assert_eq!(
            body.len(),
            length,
            "whole body: {:?}",
            String::from_utf8_lossy(body)
        );
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(body).expect("JSON body")
        };
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            body,
            headers,
        }
    }
}

/// The server is up and still serves an ordinary authenticated request as
/// `who`.
pub async fn assert_alive(api: &Api, who: &Account) {
    let health = api.get("/healthz", None).await.expect(200);
    assert_eq!(health, json!({ "status": "ok" }));
    let me = api.get("/v1/me", Some(&who.access)).await.expect(200);
    assert_eq!(me["id"], who.id.to_string(), "{me}");
    assert_eq!(me["username"], who.username.as_str(), "{me}");
}

/// Asserts that `items` is not empty and that `check` holds for each:
/// `all` over nothing is true, and a check of nothing proves nothing.
#[track_caller]
pub fn assert_each<T: std::fmt::Debug>(items: &[T], what: &str, check: impl Fn(&T) -> bool) {
    assert!(!items.is_empty(), "{what}: nothing to check");
    if let Some(bad) = items.iter().find(|item| !check(item)) {
        panic!("{what}: fails for {bad:?} (of {} items)", items.len());
    }
}

/// An access token for the session `who.access` belongs to, signed with
/// the suite's secret as the server signs its own, expiring at `exp` (whole
/// seconds; past or future): a test chooses when a token expires instead
/// of starting a server with a short lifetime and waiting it out.
pub fn token_expiring_at(who: &Account, exp: chrono::DateTime<chrono::Utc>) -> String {
    use sealpost::auth::token::Tokens;
    let tokens = |lifetime: Duration| {
        Tokens::new(
            &sealpost::config::Secret::new(JWT_SECRET.into()),
            lifetime,
            lifetime,
        )
    };
    let claims = tokens(Duration::from_secs(60))
        .verify_access(&who.access)
        .expect("a live access token of the suite's servers");
    // Issued a minute before `exp` at the latest, as the server would have
    // with a lifetime reaching `exp`.
    let issued = chrono::Utc::now().min(exp - chrono::TimeDelta::minutes(1));
    let lifetime = (exp - issued).to_std().expect("exp after issue");
    tokens(lifetime)
        .issue_access(claims.sub, claims.dev, claims.sid, issued)
        .expect("signed")
}

/// A JSON string that must be a UUID.
pub fn id(value: &Value) -> Uuid {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not an id: {value}"))
        .parse()
        .unwrap_or_else(|e| panic!("not an id: {value}: {e}"))
}

/// The ids of message objects, in order.
pub fn ids(messages: &[Value]) -> Vec<Uuid> {
    messages.iter().map(|m| id(&m["id"])).collect()
}

/// A JSON string that must be an RFC 3339 timestamp.
pub fn time(value: &Value) -> chrono::DateTime<chrono::Utc> {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a timestamp: {value}"))
        .parse()
        .unwrap_or_else(|e| panic!("not a timestamp: {value}: {e}"))
}

pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

pub fn unb64(text: &str) -> Vec<u8> {
    STANDARD.decode(text).expect("base64")
}

/// A plausible 32-byte public key.
/// The decoded body of a message frame or listing item.
#[track_caller]
pub fn body(message: &Value) -> Vec<u8> {
    unb64(
        message["body"]
            .as_str()
            .unwrap_or_else(|| panic!("no body: {message}")),
    )
}

/// Asserts that a message frame or listing item is `message_id` from
/// `from`'s device `from_device` with `expected` as its body.
#[track_caller]
pub fn assert_message(
    message: &Value,
    message_id: Uuid,
    from: Uuid,
    from_device: i64,
    expected: &[u8],
) {
    assert_eq!(id(&message["id"]), message_id, "{message}");
    assert_eq!(id(&message["from"]), from, "{message}");
    assert_eq!(message["from_device"], from_device, "{message}");
    assert_eq!(
        body(message),
        expected,
        "{message}: body {:?}",
        String::from_utf8_lossy(&body(message))
    );
}

pub fn public_key() -> String {
    b64(Uuid::new_v4().as_bytes().repeat(2).as_slice())
}

/// Sorted keys of a JSON object.
#[track_caller]
pub fn keys(object: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = object
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {object}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// A JSON number that must be a device id (a positive integer).
#[track_caller]
pub fn device_id(value: &Value) -> i64 {
    value
        .as_i64()
        .filter(|d| *d > 0)
        .unwrap_or_else(|| panic!("not a device id: {value}"))
}

/// `who` signed in with the token pair of a login, device addition,
/// refresh or password change reply: the same account, the session (and so
/// the device) the reply names.
pub fn session(who: &Account, tokens: &Value) -> Account {
    let token = |field: &str| {
        tokens[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field} in {tokens}"))
            .to_owned()
    };
    Account {
        access: token("access_token"),
        refresh: token("refresh_token"),
        ..who.clone()
    }
}

/// The longest [`eventually`] waits for the server to settle something it
/// does asynchronously (an ack made on a socket, a socket gone).
pub const SETTLE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);

/// Polls `probe` until it answers `Some`, for at most [`SETTLE`]; panics
/// naming `what` if it never does.
pub async fn eventually<T>(what: &str, probe: impl AsyncFnMut() -> Option<T>) -> T {
    eventually_within(what, SETTLE, probe).await
}

/// As [`eventually`], for at most `limit`: for what takes longer than the
/// server settling (a NATS client reconnecting with backoff).
pub async fn eventually_within<T>(
    what: &str,
    limit: Duration,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(done) = probe().await {
            return done;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not after {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: String) -> Self {
        // No idle connections are reused: a server that refuses an oversized
        // body answers 413 and closes without reading the rest, and a pooled
        // connection reused in that instant fails with IncompleteMessage.
        // Real clients retry that; tests should not depend on its timing.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .expect("HTTP client");
        Self { base, http }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn call(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("request reaches the server");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("response body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "non-JSON reply {status}: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        Reply {
            status,
            body,
            headers,
        }
    }

    fn authed(request: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.call(Self::authed(self.http.get(self.url(path)), token))
            .await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.call(Self::authed(self.http.post(self.url(path)), token).json(&body))
            .await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.call(Self::authed(self.http.put(self.url(path)), token).json(&body))
            .await
    }

    pub async fn patch(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.call(Self::authed(self.http.patch(self.url(path)), token).json(&body))
            .await
    }

    /// `DELETE` with a JSON body (`DELETE /v1/devices/{id}` takes the
    /// password in one).
    pub async fn delete(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.call(Self::authed(self.http.delete(self.url(path)), token).json(&body))
            .await
    }

    /// `POST /v1/token/refresh` with `token`.
    pub async fn refresh(&self, token: &str) -> Reply {
        self.post("/v1/token/refresh", None, json!({ "refresh_token": token }))
            .await
    }

    /// A request with a raw body and content type, for hostile-input tests.
    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let request = self
            .http
            .request(method, self.url(path))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        self.call(Self::authed(request, token)).await
    }

    pub async fn register(&self, username: &str) -> Uuid {
        let body = self
            .post(
                "/v1/register",
                None,
                json!({ "username": username, "password": PASSWORD, "public_key": public_key() }),
            )
            .await
            .expect(201);
        body["id"].as_str().unwrap().parse().unwrap()
    }

    pub async fn login(&self, username: &str) -> Value {
        self.post(
            "/v1/login",
            None,
            json!({ "username": username, "password": PASSWORD }),
        )
        .await
        .expect(200)
    }

    /// Registers and logs in.
    pub async fn account(&self, username: &str) -> Account {
        let id = self.register(username).await;
        let tokens = self.login(username).await;
        Account {
            id,
            username: username.to_owned(),
            access: tokens["access_token"].as_str().unwrap().to_owned(),
            refresh: tokens["refresh_token"].as_str().unwrap().to_owned(),
        }
    }

    /// `POST /v1/devices`: adds a device to `username`'s account; the reply,
    /// whatever it is.
    pub async fn try_add_device(
        &self,
        username: &str,
        password: &str,
        public_key: &str,
        name: Option<&str>,
    ) -> Reply {
        let mut body =
            json!({ "username": username, "password": password, "public_key": public_key });
        if let Some(name) = name {
            body["name"] = json!(name);
        }
        self.post("/v1/devices", None, body).await
    }

    /// Adds a device with `public_key` to `who`'s account; returns its id
    /// and a session on it.
    pub async fn add_device(&self, who: &Account, public_key: &str) -> (i64, Account) {
        let reply = self
            .try_add_device(&who.username, PASSWORD, public_key, None)
            .await
            .expect(201);
        assert_eq!(reply["token_type"], "bearer", "{reply}");
        (device_id(&reply["device_id"]), session(who, &reply))
    }

    /// Registers `username` with `devices` devices: a session of each, in
    /// device order (device 1 first).
    pub async fn account_with_devices(&self, username: &str, devices: usize) -> Vec<Account> {
        assert!(devices >= 1, "an account has at least one device");
        let first = self.account(username).await;
        let mut sessions = vec![first.clone()];
        for n in 2..=devices {
            let (device, session) = self.add_device(&first, &public_key()).await;
            assert_eq!(
                device, n as i64,
                "{username}'s devices are numbered in order"
            );
            sessions.push(session);
        }
        sessions
    }

    /// `POST /v1/login` as `username` on `device`; the reply, whatever it is.
    pub async fn login_device(&self, username: &str, device: i64) -> Reply {
        self.post(
            "/v1/login",
            None,
            json!({ "username": username, "password": PASSWORD, "device_id": device }),
        )
        .await
    }

    /// The device ids `GET /v1/users/{user}/devices` lists, as `asker` sees
    /// them, in the order listed.
    pub async fn device_ids(&self, asker: &Account, user: Uuid) -> Vec<i64> {
        let listed = self
            .get(&format!("/v1/users/{user}/devices"), Some(&asker.access))
            .await
            .expect(200);
        assert_eq!(listed["user_id"], user.to_string(), "{listed}");
        listed["devices"]
            .as_array()
            .unwrap_or_else(|| panic!("no device list: {listed}"))
            .iter()
            .map(|d| device_id(&d["device_id"]))
            .collect()
    }

    /// Sends `body` from `from` to `to`; returns the 201 reply body.
    pub async fn send(&self, from: &Account, to: Uuid, body: &[u8]) -> Value {
        self.post(
            "/v1/messages",
            Some(&from.access),
            json!({ "to": to, "body": b64(body) }),
        )
        .await
        .expect(201)
    }

    /// Every queued message of `who`, following `next` cursors.
    pub async fn inbox(&self, who: &Account) -> Vec<Value> {
        let mut all = Vec::new();
        let mut path = "/v1/messages?limit=500".to_owned();
        loop {
            let page = self.get(&path, Some(&who.access)).await.expect(200);
            all.extend(page["messages"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(next) => path = format!("/v1/messages?limit=500&after={next}"),
                None => return all,
            }
        }
    }
}
