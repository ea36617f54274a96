//! Issue 24, item 9: slow readers and the drain budget.
//!
//! The attack: sockets that complete the handshake, authenticate, and then
//! read their large backlog a few kilobytes at a time. Each server write
//! still progresses within its own timeout, so nothing closed them, and
//! their pages held the server-wide drain budget: every other device's poll
//! waited for room until it was refused with 503, and every socket's drain
//! until it was closed. Now a page takes its account's and its address's
//! share of the budget first (`SEALPOST_DRAIN_SHARE_BYTES`), and a socket
//! must write each page within `SEALPOST_WS_PAGE_WRITE_TIMEOUT`.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::backend_tests;
use crate::common::cluster::metric;
use crate::common::ws::WsClient;
use crate::common::{Account, Api, Backend, TestServer, eventually_within, ids};

backend_tests!(
    slow_readers_on_one_address_leave_the_drain_budget_to_others,
    a_socket_that_does_not_write_its_page_in_time_is_closed_and_keeps_its_messages,
);

/// Where the attack comes from, as the trusted proxy (127.0.0.1) says.
const ATTACKER: &str = "203.0.113.7";

/// A body near the default `SEALPOST_MAX_BODY_BYTES` (64 KiB).
const BODY: usize = 60 * 1024;

/// What a slow reader reads at a time, and how often: 16 KB/s, enough that
/// no single write of the server waits for its 10 s write timeout, and far
/// too slow for a page of hundreds of kilobytes.
const TRICKLE: usize = 4096;
const TRICKLE_EVERY: Duration = Duration::from_millis(250);

/// Queues `count` large messages for `to`, from `from`.
async fn fill(api: &Api, from: &Account, to: &Account, count: usize) {
    for i in 0..count {
        api.send(from, to.id, &vec![i as u8; BODY]).await;
    }
}

/// A WebSocket to `addr` authenticated by `token`, from `ATTACKER` behind
/// the trusted proxy, that then reads [`TRICKLE`] bytes every
/// [`TRICKLE_EVERY`] until the server ends it. Its receive buffer and
/// segment size are small, so the server's writes block after a few
/// kilobytes. The task returns how the connection ended, once it has.
async fn slow_reader(addr: SocketAddr, token: &str) -> JoinHandle<String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    socket.set_recv_buffer_size(TRICKLE).unwrap();
    // Announced in the SYN: the server's send buffer is sized from it.
    socket.set_tcp_mss(1024).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut stream = TcpStream::from_std(socket.into()).unwrap();
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\nX-Forwarded-For: {ATTACKER}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // The answer's head, a byte at a time so that no frame is read with it.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "upgrade answered");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tokio::spawn(async move {
        let mut chunk = vec![0u8; TRICKLE];
        let mut read = 0;
        loop {
            tokio::time::sleep(TRICKLE_EVERY).await;
            match stream.read(&mut chunk).await {
                Ok(0) => return format!("EOF after {read} bytes"),
                Err(err) => return format!("{err} after {read} bytes"),
                Ok(n) => read += n,
            }
        }
    })
}

/// Four free accounts on one address, five slow sockets each, each socket
/// with more than a megabyte queued: together they ask for more than the
/// budget. Another user's poll and socket drain still get their backlog
/// (no 503, no 1011).
async fn slow_readers_on_one_address_leave_the_drain_budget_to_others(backend: Backend) {
    // A 4 MiB budget, so that backlogs of a few megabytes fill it (at the
    // default 64 MiB the attack needs 4 MiB pages, whose reads alone
    // outlast the database deadline on a test machine). Its share stays
    // the default (a sixteenth), and so does the page-write timeout (30 s:
    // longer than this test needs a slow page to hold).
    let server = TestServer::start_with(
        backend,
        &[
            "--drain-budget-bytes",
            "4194304",
            "--trusted-proxies",
            "127.0.0.1",
        ],
    )
    .await;
    let sender = server.account("sender").await;
    let victim = server.account("victim").await;
    let mut attackers = Vec::new();
    for i in 0..4 {
        let attacker = server.account(&format!("attacker{i}")).await;
        fill(&server, &sender, &attacker, 20).await;
        attackers.push(attacker);
    }
    for i in 0..3u8 {
        server.send(&sender, victim.id, &[i; 100]).await;
    }
    let mut readers = Vec::new();
    for attacker in &attackers {
        for _ in 0..5 {
            readers.push(slow_reader(server.addr, &attacker.access).await);
        }
    }
    // Their first pages are being written, slowly.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ended = Vec::new();
    for reader in &mut readers {
        if reader.is_finished() {
            ended.push(reader.await.unwrap());
        }
    }
    assert!(ended.is_empty(), "slow readers ended: {ended:?}");

    let page = server
        .get("/v1/messages", Some(&victim.access))
        .await
        .expect(200);
    assert_eq!(page["messages"].as_array().unwrap().len(), 3, "{page}");
    let (_socket, backlog) = WsClient::ready(&server, &victim).await;
    assert_eq!(ids(&backlog), ids(page["messages"].as_array().unwrap()));

    for reader in readers {
        reader.abort();
    }
}

/// A socket that reads too slowly to write its page within
/// `SEALPOST_WS_PAGE_WRITE_TIMEOUT` is closed then; its messages stay
/// queued, and its next connection gets them all.
async fn a_socket_that_does_not_write_its_page_in_time_is_closed_and_keeps_its_messages(
    backend: Backend,
) {
    let server = TestServer::start_with(
        backend,
        &[
            "--ws-page-write-timeout",
            "2s",
            "--trusted-proxies",
            "127.0.0.1",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    )
    .await;
    let metrics = server.metrics_addr.expect("metrics are on");
    let sender = server.account("sender").await;
    let attacker = server.account("attacker").await;
    fill(&server, &sender, &attacker, 20).await;
    let readers = [
        slow_reader(server.addr, &attacker.access).await,
        slow_reader(server.addr, &attacker.access).await,
    ];
    let slow = [("reason", "slow")];
    // The page's deadline, then the close frame's 5 s, with room to spare.
    eventually_within(
        "both slow sockets closed as slow",
        Duration::from_secs(30),
        async || {
            let closed = metric(metrics, "sealpost_ws_closed_total", &slow).await;
            (closed == Some(2.0)).then_some(())
        },
    )
    .await;

    let (_socket, backlog) = WsClient::ready(&server, &attacker).await;
    assert_eq!(backlog.len(), 20, "every message is still queued");
    for reader in readers {
        reader.abort();
    }
}
