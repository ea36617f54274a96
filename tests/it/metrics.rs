//! Prometheus metrics on their own listener: off unless configured, a bad
//! address named at start-up, and each counter and gauge moved by exactly
//! what a real exchange over HTTP and WebSocket did.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::header::CONTENT_TYPE;
use serde_json::json;
use uuid::Uuid;

use crate::backend_tests;
use crate::common::ws::{WsClient, close};
use crate::common::{self, Backend, TestDb, TestServer, b64, config};

backend_tests!(
    an_exchange_moves_each_metric_by_what_happened,
    the_sweeper_counts_expiry_and_samples_the_queue,
    the_sweeper_samples_the_devices_and_displaced_sockets_are_counted,
);

/// One scrape: every series, as printed (name and labels), and its value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Self {
        let series = text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("not a sample line: {line}"));
                let value = value
                    .parse()
                    .unwrap_or_else(|_| panic!("not a value: {line}"));
                (series.to_owned(), value)
            })
            .collect();
        Self(series)
    }

    #[track_caller]
    fn get(&self, series: &str) -> f64 {
        *self
            .0
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in the scrape"))
    }

    /// How much `series` grew since `before`.
    #[track_caller]
    fn since(&self, before: &Scrape, series: &str) -> f64 {
        self.get(series) - before.get(series)
    }

    /// How much all series of `name` (every label value) grew since `before`.
    fn family_since(&self, before: &Scrape, name: &str) -> f64 {
        let sum = |scrape: &Scrape| -> f64 {
            scrape
                .0
                .iter()
                .filter(|(series, _)| series.starts_with(&format!("{name}{{")))
                .map(|(_, value)| value)
                .sum()
        };
        sum(self) - sum(before)
    }
}

async fn scrape(addr: SocketAddr) -> Scrape {
    let response = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("the metrics listener answers");
    assert_eq!(response.status(), 200);
    let media_type = response.headers()[CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        media_type.starts_with("text/plain; version=0.0.4"),
        "{media_type}"
    );
    Scrape::parse(&response.text().await.unwrap())
}

/// Scrapes until `done` holds, for what moves after a reply has gone out.
async fn until(addr: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = scrape(addr).await;
        if done(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "metrics never showed {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metrics_addr(server: &TestServer) -> SocketAddr {
    server.metrics_addr.expect("metrics are on")
}

async fn an_exchange_moves_each_metric_by_what_happened(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--send-rate-per-second",
            "1",
            "--send-rate-burst",
            "5",
            "--sweep-interval",
            "200ms",
        ],
    )
    .await;
    let addr = metrics_addr(&server);
    // Not the API: the metrics listener serves nothing else.
    assert_eq!(
        reqwest::get(format!("http://{addr}/healthz"))
            .await
            .unwrap()
            .status(),
        404
    );
    let before = scrape(addr).await;
    assert_eq!(before.get("sealpost_ws_connections"), 0.0);
    assert_eq!(before.get("sealpost_users_online"), 0.0);

    // Two sign-ups, two logins and a wrong password: five hashes.
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    server
        .post(
            "/v1/login",
            None,
            json!({ "username": "alice", "password": "not the password" }),
        )
        .await
        .expect_error(401, "unauthorized");

    // Two messages to bob while he is offline, one to alice; one refused.
    let mut queued = Vec::new();
    for body in [&b"one"[..], b"two"] {
        queued.push(server.send(&alice, bob.id, body).await["id"].clone());
    }
    server.send(&bob, alice.id, b"hi").await;
    server
        .post(
            "/v1/messages",
            Some(&alice.access),
            json!({ "to": Uuid::new_v4(), "body": b64(b"lost") }),
        )
        .await
        .expect_error(404, "not_found");

    // The sweeper samples the queue: three in all, two of them bob's.
    until(addr, "the queue depth", |s| {
        s.get("sealpost_queued_messages") == 3.0
            && s.get("sealpost_queued_messages_max_per_user") == 2.0
    })
    .await;

    // Bob connects and drains his backlog; a live message follows.
    let (mut bob_ws, backlog) = WsClient::ready(&server.api, &bob).await;
    assert_eq!(backlog.len(), 2);
    until(addr, "bob online", |s| {
        s.get("sealpost_ws_connections") == 1.0 && s.get("sealpost_users_online") == 1.0
    })
    .await;
    let live = server.send(&alice, bob.id, b"live").await;
    let pushed = bob_ws.expect("message").await;
    assert_eq!(pushed["id"], live["id"]);
    queued.push(live["id"].clone());
    let ids: Vec<&str> = queued.iter().map(|id| id.as_str().unwrap()).collect();
    bob_ws.ack(&ids).await;
    until(addr, "the acks", |s| {
        s.since(&before, "sealpost_messages_acked_total") == 3.0
    })
    .await;

    // Alice sends on until her budget (a burst of 5, 1 a second) runs out.
    let mut more = 0.0;
    let limited = loop {
        let reply = server
            .post(
                "/v1/messages",
                Some(&alice.access),
                json!({ "to": bob.id, "body": b64(b"more") }),
            )
            .await;
        if reply.status != 201 {
            break reply;
        }
        bob_ws.expect("message").await;
        more += 1.0;
        assert!(more < 30.0, "the send budget never ran out");
    };
    limited.expect_error(429, "rate_limited");

    bob_ws.close().await;
    let after = until(addr, "bob's socket closed", |s| {
        s.since(&before, "sealpost_ws_closed_total{reason=\"client\"}") == 1.0
            && s.get("sealpost_ws_connections") == 0.0
            && s.get("sealpost_users_online") == 0.0
            && s.since(&before, "sealpost_messages_pushed_total{source=\"live\"}") == 1.0 + more
    })
    .await;

    let moved = |series: &str| after.since(&before, series);
    let stored = 4.0 + more;
    assert_eq!(
        moved("sealpost_messages_accepted_total{kind=\"stored\"}"),
        stored
    );
    assert_eq!(
        moved("sealpost_messages_accepted_total{kind=\"ephemeral\"}"),
        0.0
    );
    assert_eq!(
        moved("sealpost_messages_rejected_total{code=\"not_found\"}"),
        1.0
    );
    assert_eq!(
        moved("sealpost_messages_rejected_total{code=\"rate_limited\"}"),
        1.0
    );
    assert_eq!(
        after.family_since(&before, "sealpost_messages_rejected_total"),
        2.0
    );
    assert_eq!(
        moved("sealpost_messages_pushed_total{source=\"backlog\"}"),
        2.0
    );
    assert_eq!(moved("sealpost_push_latency_seconds_count"), 1.0 + more);
    assert!(moved("sealpost_push_latency_seconds_sum") > 0.0);
    assert_eq!(moved("sealpost_messages_acked_total"), 3.0);
    assert_eq!(moved("sealpost_messages_expired_total"), 0.0);
    assert_eq!(moved("sealpost_rate_limited_total{scope=\"send\"}"), 1.0);
    assert_eq!(moved("sealpost_rate_limited_total{scope=\"auth\"}"), 0.0);
    assert_eq!(
        moved("sealpost_auth_failures_total{reason=\"credentials\"}"),
        1.0
    );
    assert_eq!(
        after.family_since(&before, "sealpost_auth_failures_total"),
        1.0
    );
    assert_eq!(moved("sealpost_password_hash_wait_seconds_count"), 5.0);
    // Every stored message is one insert and the ack frame one ack; the
    // refused sends never reached the committer.
    assert_eq!(moved("sealpost_db_write_batch_ops_sum"), stored + 1.0);
    let batches = moved("sealpost_db_write_seconds_count");
    assert!(batches >= 1.0);
    assert_eq!(moved("sealpost_db_write_batch_ops_count"), batches);
    assert_eq!(moved("sealpost_db_write_errors_total"), 0.0);
    // Sign-ups, logins and sends; a 401, a 404 and a 429; one upgrade.
    assert_eq!(
        moved("sealpost_http_responses_total{class=\"2xx\"}"),
        4.0 + stored
    );
    assert_eq!(moved("sealpost_http_responses_total{class=\"4xx\"}"), 3.0);
    assert_eq!(moved("sealpost_http_responses_total{class=\"1xx\"}"), 1.0);
    assert_eq!(moved("sealpost_http_responses_total{class=\"5xx\"}"), 0.0);
    assert_eq!(after.family_since(&before, "sealpost_ws_closed_total"), 1.0);

    server.stop().await;
}

async fn the_sweeper_counts_expiry_and_samples_the_queue(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--message-ttl",
            "1s",
            "--sweep-interval",
            "200ms",
        ],
    )
    .await;
    let addr = metrics_addr(&server);
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    for body in [&b"one"[..], b"two"] {
        server.send(&alice, bob.id, body).await;
    }
    until(addr, "two queued", |s| {
        s.get("sealpost_queued_messages") == 2.0
            && s.get("sealpost_queued_messages_max_per_user") == 2.0
    })
    .await;
    until(addr, "both expired", |s| {
        s.get("sealpost_messages_expired_total") == 2.0
            && s.get("sealpost_queued_messages") == 0.0
            && s.get("sealpost_queued_messages_max_per_user") == 0.0
    })
    .await;
    server.stop().await;
}

async fn the_sweeper_samples_the_devices_and_displaced_sockets_are_counted(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &["--metrics-addr", "127.0.0.1:0", "--sweep-interval", "200ms"],
    )
    .await;
    let addr = metrics_addr(&server);
    until(addr, "no devices", |s| s.get("sealpost_devices") == 0.0).await;

    // Devices of every account together: alice's one and bob's three.
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (_, laptop) = server.add_device(&bob, &common::public_key()).await;
    server.add_device(&bob, &common::public_key()).await;
    until(addr, "four devices", |s| s.get("sealpost_devices") == 4.0).await;
    let removed = server
        .delete(
            "/v1/devices/3",
            Some(&laptop.access),
            json!({ "password": common::PASSWORD }),
        )
        .await;
    assert_eq!(removed.status.as_u16(), 204, "{:?}", removed.body);
    until(addr, "three devices", |s| s.get("sealpost_devices") == 3.0).await;

    // An exclusive socket displaces the older socket of its device: one
    // close, counted as displaced.
    let before = scrape(addr).await;
    let (mut older, _) = WsClient::ready(&server.api, &bob).await;
    let (mut alice_ws, _) = WsClient::ready(&server.api, &alice).await;
    let (exclusive, _, _) = WsClient::ready_with(&server.api, &bob, "exclusive=true").await;
    older.expect_close(close::CONNECTED_ELSEWHERE).await;
    let after = until(addr, "the displaced socket", |s| {
        s.since(&before, "sealpost_ws_closed_total{reason=\"displaced\"}") == 1.0
            && s.get("sealpost_ws_connections") == 2.0
    })
    .await;
    assert_eq!(after.family_since(&before, "sealpost_ws_closed_total"), 1.0);
    // The others stay open: the exclusive socket's own close is a client's.
    exclusive.close().await;
    let after = until(addr, "the exclusive socket closed", |s| {
        s.since(&before, "sealpost_ws_closed_total{reason=\"client\"}") == 1.0
            && s.get("sealpost_ws_connections") == 1.0
    })
    .await;
    assert_eq!(
        after.since(&before, "sealpost_ws_closed_total{reason=\"displaced\"}"),
        1.0
    );
    assert_eq!(after.family_since(&before, "sealpost_ws_closed_total"), 2.0);
    let hello = server.send(&bob, alice.id, b"still here").await;
    assert_eq!(alice_ws.expect("message").await["id"], hello["id"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_off_by_default() {
    let server = TestServer::start(Backend::Sqlite).await;
    assert_eq!(server.metrics_addr, None);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_in_one_process_count_apart() {
    let flags = ["--metrics-addr", "127.0.0.1:0"];
    let busy = TestServer::start_with(Backend::Sqlite, &flags).await;
    let idle = TestServer::start_with(Backend::Sqlite, &flags).await;
    let idle_before = scrape(metrics_addr(&idle)).await;
    busy.get("/healthz", None).await.expect(200);
    let series = "sealpost_http_responses_total{class=\"2xx\"}";
    assert_eq!(scrape(metrics_addr(&busy)).await.get(series), 1.0);
    assert_eq!(
        scrape(metrics_addr(&idle))
            .await
            .since(&idle_before, series),
        0.0
    );
    busy.stop().await;
    idle.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_in_use_stops_start_up_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let db = TestDb::new(Backend::Sqlite).await;
    let Err(err) = sealpost::Server::bind(config(&db, &["--metrics-addr", &port])).await else {
        panic!("started on a metrics address in use");
    };
    let err = format!("{err:#}");
    assert!(err.contains("SEALPOST_METRICS_ADDR"), "{err}");
    assert!(err.contains(&port), "{err}");
}

#[test]
fn a_bad_metrics_address_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    let output = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("SEALPOST_METRICS_ADDR", "9090")
        .output()
        .expect("run sealpost");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Set in the environment: named as set there.
    assert!(stderr.contains("'SEALPOST_METRICS_ADDR'"), "{stderr}");

    let help = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .args(["serve", "--help"])
        .env_clear()
        .output()
        .expect("run sealpost");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("SEALPOST_METRICS_ADDR"), "{help}");
}

/// What the server does with `request` on a fresh connection: the bytes it
/// answered before closing (empty if it closed without an answer), or the
/// error that ended the read with nothing. The request is held open (no
/// half-close) until the server is done; panics if it neither answers nor
/// closes within [`common::SETTLE`].
async fn raw_exchange(addr: SocketAddr, request: Vec<u8>) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let writing = tokio::spawn(async move {
        let _ = writer.write_all(&request).await;
        std::future::pending::<()>().await;
        drop(writer);
    });
    let mut raw = Vec::new();
    let read = tokio::time::timeout(common::SETTLE, reader.read_to_end(&mut raw))
        .await
        .unwrap_or_else(|_| panic!("neither answered nor closed after {:?}", common::SETTLE));
    writing.abort();
    match read {
        Ok(_) => Ok(raw),
        Err(_) if !raw.is_empty() => Ok(raw),
        Err(e) => Err(e.to_string()),
    }
}

/// Sends a head a byte every 100 ms, never finishing it (slowloris), until
/// the server closes the connection; returns how long that took. Panics if
/// the server answers, or keeps it open past [`common::SETTLE`].
async fn slow_head(addr: SocketAddr) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let opened = Instant::now();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let trickle = tokio::spawn(async move {
        let _ = writer
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await;
        while writer.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(common::SETTLE, reader.read(&mut buf)).await;
    trickle.abort();
    match read {
        Err(_) => panic!(
            "a slow head to {addr} still open after {:?}",
            common::SETTLE
        ),
        Ok(Ok(0) | Err(_)) => opened.elapsed(),
        Ok(Ok(n)) => panic!(
            "a slow head was answered: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

/// Opens a connection that sends nothing; returns how long until the server
/// closed it (at most [`common::SETTLE`], else it panics).
async fn silent_connection(addr: SocketAddr) -> Duration {
    silent_connection_from(Ipv4Addr::LOCALHOST, addr).await
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// [`silent_connection`] from a loopback address of the caller's choice.
async fn silent_connection_from(from: Ipv4Addr, addr: SocketAddr) -> Duration {
    use tokio::io::AsyncReadExt;
    let opened = Instant::now();
    let mut tcp = connect_from(from, addr).await;
    let mut buf = [0u8; 256];
    match tokio::time::timeout(common::SETTLE, tcp.read(&mut buf)).await {
        Err(_) => panic!(
            "a silent connection to {addr} still open after {:?}",
            common::SETTLE
        ),
        Ok(Ok(0) | Err(_)) => opened.elapsed(),
        Ok(Ok(n)) => panic!("a silent connection was answered: {:?}", &buf[..n]),
    }
}

const HEADER_TIMEOUTS_API: &str = "sealpost_http_header_timeouts_total{listener=\"api\"}";
const HEADER_TIMEOUTS_METRICS: &str = "sealpost_http_header_timeouts_total{listener=\"metrics\"}";
const REFUSED_API: &str = "sealpost_http_connections_refused_total{listener=\"api\"}";
const REFUSED_METRICS: &str = "sealpost_http_connections_refused_total{listener=\"metrics\"}";

/// The metrics listener's connections have the API's limits on a head: one
/// that trickles in is cut off at `SEALPOST_HEADER_READ_TIMEOUT`, one over
/// 32 KiB is answered 431. Each cut-off is counted under its listener; a
/// connection that sends nothing ends at the same timeout and is not.
/// (The HTTP layer never touches the store: SQLite only, as in `edges.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_limits_heads_as_the_api_does_and_cut_offs_are_counted() {
    let server = TestServer::start_with(
        Backend::Sqlite,
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--header-read-timeout",
            "1s",
        ],
    )
    .await;
    let addr = metrics_addr(&server);
    let before = scrape(addr).await;

    let (slow_metrics, slow_api, silent) = tokio::join!(
        slow_head(addr),
        slow_head(server.addr),
        silent_connection(addr)
    );
    // Cut off by the head timeout, not by anything sooner.
    for (what, took) in [
        ("metrics", slow_metrics),
        ("api", slow_api),
        ("silent", silent),
    ] {
        assert!(
            took >= Duration::from_secs(1),
            "{what}: closed after {took:?}"
        );
    }

    let head = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "p".repeat(40 * 1024)
    );
    let raw = raw_exchange(addr, head.into_bytes())
        .await
        .expect("an answer to an oversized head");
    assert_eq!(common::Reply::parse_raw(&raw).status, 431);

    let after = scrape(addr).await;
    assert_eq!(after.since(&before, HEADER_TIMEOUTS_METRICS), 1.0);
    assert_eq!(after.since(&before, HEADER_TIMEOUTS_API), 1.0);
    server.stop().await;
}

/// Past `SEALPOST_MAX_HTTP_CONNECTIONS_PER_IP` a connection is closed
/// unanswered, on each listener, and counted under it; each listener counts
/// its own connections, and gives an address its share back as they close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_address_cap_are_refused_on_both_listeners_and_counted() {
    let server = TestServer::start_with(
        Backend::Sqlite,
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--max-http-connections-per-ip",
            "2",
        ],
    )
    .await;
    let addr = metrics_addr(&server);
    let before = scrape(addr).await;
    // From an address of their own, so that no other connection of the
    // test (the scrapes, the API client's pooled ones, still being torn
    // down on a busy machine) takes one of the two places.
    let from = Ipv4Addr::new(127, 0, 0, 3);
    for (listener, at) in [("metrics", addr), ("api", server.addr)] {
        let held = [connect_from(from, at).await, connect_from(from, at).await];
        // The third is closed at once, long before the head timeout (10 s).
        let refused = silent_connection_from(from, at).await;
        assert!(refused < Duration::from_secs(5), "{listener}: {refused:?}");
        drop(held);
    }
    // The scrape comes from another address: nothing else was refused.
    let after = scrape(addr).await;
    assert_eq!(after.since(&before, REFUSED_METRICS), 1.0);
    assert_eq!(after.since(&before, REFUSED_API), 1.0);
    server.get("/healthz", None).await.expect(200);
    server.stop().await;
}
