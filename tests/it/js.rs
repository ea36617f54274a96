//! The JavaScript side, run by `cargo test` so that one command runs the
//! whole suite: the JS client's own tests (`clients/js`, Node's test
//! runner) against real servers, and the demo page in Chromium
//! (`demo/test`, playwright-core). They install what they need that is
//! missing (`common::toolchain`: the npm dependencies from the lockfiles,
//! Chromium as root on Debian) and fail, never skip, when they cannot, or
//! when Node is missing. The demo's server can be stopped and started
//! again by the browser test ([`DemoServer`]). Last, the three clients in
//! one group chat: the Rust library, the JS library and the demo page.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sealpost::Server;
use sealpost_client::{Client, ConnectOptions, DeviceKeys, Event, Events, Incoming};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

use crate::backend_tests;
use crate::common::{Backend, PASSWORD, TestDb, TestServer, config, free_local_addr, toolchain};

backend_tests!(
    js_client_suite,
    demo_page_in_a_browser,
    demo_tabs_share_a_session,
    demo_service_worker_shows_a_push,
    rust_and_js_clients_talk_both_ways,
    rust_js_and_demo_chat_in_one_group,
);

/// Long enough for the JS suite on a loaded two-core machine; a hung
/// browser or socket fails the test rather than CI.
const NODE_TIMEOUT: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `dir` under the repository, with its npm dependencies installed.
async fn npm_ready(dir: &str) -> PathBuf {
    let dir = root().join(dir);
    tokio::task::spawn_blocking(move || toolchain::npm_ready(&dir))
        .await
        .expect("npm install task")
}

/// Runs `node --test files` in `dir` with `env`, and fails with its output
/// unless every test passed.
async fn node_test(dir: &Path, files: &[&str], env: &[(&str, String)]) {
    let mut command = tokio::process::Command::new("node");
    command
        .arg("--test")
        .arg("--test-reporter=spec")
        // A failed test may leave a client's timers and sockets open: the
        // file reports and exits rather than wait for them until
        // NODE_TIMEOUT (Node 20.14+).
        .arg("--test-force-exit")
        .args(files)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(NODE_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("node --test in {} ran past {NODE_TIMEOUT:?}", dir.display()))
        .unwrap_or_else(|e| panic!("cannot run node (is Node.js 20+ installed?): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "node --test in {} failed ({}):\n{stdout}\n{stderr}",
        dir.display(),
        output.status
    );
    // The runner's summary: something ran, and nothing was skipped.
    let count = |label: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim_start_matches(['ℹ', ' ']).strip_prefix(label))
            .and_then(|n| n.trim().parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no `{label}` in node's summary:\n{stdout}"))
    };
    assert!(count("pass") > 0, "no JS test passed:\n{stdout}");
    assert_eq!(count("skipped"), 0, "JS tests were skipped:\n{stdout}");
    assert_eq!(count("todo"), 0, "JS tests left as todo:\n{stdout}");
}

/// The JS client's suite, against a server, one with 8-second access
/// tokens (renewal on a live socket), one with 6-second access tokens
/// and no refresh grace (clients of one session refreshing in turns: a
/// spent refresh token is reuse at once, and the first refresh at 4.8 s is
/// before the token's expiry, whose second is truncated), and one with
/// Web Push and APNs (push targets).
async fn js_client_suite(backend: Backend) {
    let dir = npm_ready("clients/js").await;
    let server = TestServer::start(backend).await;
    let short =
        TestServer::start_on(TestDb::new(backend).await, &["--access-token-ttl", "8s"]).await;
    let no_grace = TestServer::start_on(
        TestDb::new(backend).await,
        &["--access-token-ttl", "6s", "--refresh-grace", "0"],
    )
    .await;
    // Web Push and APNs on, `push.test` allowed: push targets (push.test.js).
    let push = crate::push_targets::push_server(backend).await;
    let mut files: Vec<String> = std::fs::read_dir(dir.join("test"))
        .expect("clients/js/test")
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.ends_with(".test.js").then(|| format!("test/{name}"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.test.js in clients/js/test");
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    node_test(
        &dir,
        &files,
        &[
            ("SEALPOST_TEST_URL", server.api.base.clone()),
            ("SEALPOST_TEST_URL_SHORT_TTL", short.api.base.clone()),
            ("SEALPOST_TEST_URL_NO_GRACE", no_grace.api.base.clone()),
            ("SEALPOST_TEST_URL_PUSH", push.api.base.clone()),
            (
                "SEALPOST_TEST_PUSH_HOST",
                crate::push_targets::PUSH_HOST.to_owned(),
            ),
        ],
    )
    .await;
    push.server.stop().await;
    no_grace.stop().await;
    short.stop().await;
    server.stop().await;
}

/// The demo page in Chromium: two people chat both ways, a reload keeps
/// the session and the contacts' names, a message typed while the server
/// is down arrives once it is back (the test stops and starts it through
/// SEALPOST_DEMO_CONTROL), typing shows.
async fn demo_page_in_a_browser(backend: Backend) {
    let dir = npm_ready("demo/test").await;
    let chromium = tokio::task::spawn_blocking(toolchain::chromium)
        .await
        .expect("Chromium lookup task");
    let db = TestDb::new(backend).await;
    let addr: SocketAddr = free_local_addr().parse().unwrap();
    let server = DemoServer::start(&db, addr).await;
    let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_url = format!("http://{}", control.local_addr().unwrap());
    let (done, finish) = oneshot::channel();
    let controller = tokio::spawn(control_loop(control, db.shared(), addr, server, finish));
    let shots = root().join(format!("target/demo-screenshots/{backend:?}").to_lowercase());
    node_test(
        &dir,
        &["demo.test.js"],
        &[
            ("SEALPOST_DEMO_URL", format!("http://{addr}")),
            ("SEALPOST_DEMO_CONTROL", control_url),
            ("CHROMIUM", chromium.display().to_string()),
            ("SEALPOST_SCREENSHOTS", shots.display().to_string()),
        ],
    )
    .await;
    assert!(
        shots.join("alice.png").is_file(),
        "the test saved its screenshots"
    );
    done.send(()).unwrap();
    let (server, restarts) = controller.await.unwrap();
    assert_eq!(
        restarts, 1,
        "the browser test stopped and started the server once"
    );
    server
        .expect("the browser test left the server running")
        .stop()
        .await;
}

/// Two tabs of one account in Chromium, on a demo server with 6-second
/// access tokens and no refresh grace: each refreshes several times, in
/// turns with the token the other stored, and neither is signed out.
async fn demo_tabs_share_a_session(backend: Backend) {
    let dir = npm_ready("demo/test").await;
    let chromium = tokio::task::spawn_blocking(toolchain::chromium)
        .await
        .expect("Chromium lookup task");
    let server = TestServer::start_on(
        TestDb::new(backend).await,
        &[
            "--demo",
            "true",
            "--access-token-ttl",
            "6s",
            "--refresh-grace",
            "0",
        ],
    )
    .await;
    node_test(
        &dir,
        &["tabs.test.js"],
        &[
            ("SEALPOST_DEMO_TABS_URL", server.api.base.clone()),
            ("CHROMIUM", chromium.display().to_string()),
        ],
    )
    .await;
    server.stop().await;
}

/// The demo's service worker in Chromium: a push delivered to it through
/// the DevTools protocol (Chromium cannot subscribe without Google's push
/// service) while a message waits in the queue makes it read the queue
/// over REST with the session the page stored, open the message and show
/// it as a notification with the sender's name and text; with no session
/// stored (signed out), "New message".
async fn demo_service_worker_shows_a_push(backend: Backend) {
    let dir = npm_ready("demo/test").await;
    let chromium = tokio::task::spawn_blocking(toolchain::chromium)
        .await
        .expect("Chromium lookup task");
    let server = TestServer::start_on(TestDb::new(backend).await, &["--demo", "true"]).await;
    node_test(
        &dir,
        &["push.test.js"],
        &[
            ("SEALPOST_DEMO_PUSH_URL", server.api.base.clone()),
            ("CHROMIUM", chromium.display().to_string()),
        ],
    )
    .await;
    server.stop().await;
}

/// The demo's server, in this process, on an address of its own so that it
/// can come back on the same one.
struct DemoServer {
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl DemoServer {
    async fn start(db: &TestDb, addr: SocketAddr) -> Self {
        let mut settings = config(db, &["--demo", "true"]);
        settings.addr = addr;
        let server = Server::bind(settings)
            .await
            .expect("the demo's server starts");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.send(()).ok();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the demo's server stops within 30 s")
            .expect("server task")
            .expect("the demo's server ran cleanly");
    }
}

/// Serves the browser test's `POST /stop` and `POST /start` (answered 204
/// once done, 409 when the server is already so) until `finish`; returns
/// the server, if running, and how many times it was started again.
async fn control_loop(
    listener: TcpListener,
    db: TestDb,
    addr: SocketAddr,
    server: DemoServer,
    mut finish: oneshot::Receiver<()>,
) -> (Option<DemoServer>, u32) {
    let mut server = Some(server);
    let mut restarts = 0;
    loop {
        let mut conn = tokio::select! {
            _ = &mut finish => return (server, restarts),
            accepted = listener.accept() => accepted.expect("control accept").0,
        };
        // One small request per connection: read its head.
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        let line = String::from_utf8_lossy(&head);
        let status = match (
            line.starts_with("POST /stop "),
            line.starts_with("POST /start "),
        ) {
            (true, _) => match server.take() {
                Some(running) => {
                    running.stop().await;
                    "204 No Content"
                }
                None => "409 Conflict",
            },
            (_, true) if server.is_none() => {
                server = Some(DemoServer::start(&db, addr).await);
                restarts += 1;
                "204 No Content"
            }
            (_, true) => "409 Conflict",
            _ => "404 Not Found",
        };
        let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        let _ = conn.write_all(reply.as_bytes()).await;
        let _ = conn.shutdown().await;
    }
}

/// Interop: the Rust client and the JavaScript client (a Node peer,
/// `clients/js/test/interop/peer.js`) on one server. The JS side seals to
/// the Rust side's key, the Rust side opens it and answers, the JS side
/// opens that and answers again: each library reads what the other wrote.
async fn rust_and_js_clients_talk_both_ways(backend: Backend) {
    let dir = npm_ready("clients/js").await;
    let server = TestServer::start(backend).await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (rust_name, js_name) = (format!("rust_{suffix}"), format!("js_{suffix}"));
    let rust = Client::register(
        &server.api.base,
        &rust_name,
        PASSWORD,
        DeviceKeys::generate(),
    )
    .await
    .expect("the Rust client signs up");
    let mut events = rust.connect(ConnectOptions::default()).unwrap();

    let mut peer = tokio::process::Command::new("node")
        .arg("test/interop/peer.js")
        .current_dir(&dir)
        .env("SEALPOST_TEST_URL", &server.api.base)
        .env("PEER_NAME", &js_name)
        .env("RUST_NAME", &rust_name)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = BufReader::new(peer.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next_line = async || -> Value {
        let line = timeout_at(deadline, lines.next_line())
            .await
            .expect("the JS peer answers in time")
            .unwrap()
            .expect("the JS peer is still running");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON from the peer: {line}"))
    };

    let ready = next_line().await;
    let js_id: uuid::Uuid = ready["ready"].as_str().expect("ready").parse().unwrap();
    assert!(next_line().await["sent"].is_string());

    // JS -> Rust.
    let hello = next_message(&mut events, deadline).await;
    assert_eq!((hello.from, hello.text.as_str()), (js_id, "hello from js"));
    rust.ack(&[hello.id]).await.unwrap();

    // Rust -> JS, and JS's answer back.
    rust.send(js_id, "hello from rust")
        .await
        .expect("sent to the JS peer");
    let got = next_line().await;
    assert_eq!(got["got"], "hello from rust", "the JS peer read it: {got}");
    assert_eq!(got["from"], rust.user_id().to_string());
    assert_eq!(got["fromDevice"], 1);
    assert!(next_line().await["replied"].is_string());
    let pong = next_message(&mut events, deadline).await;
    assert_eq!(
        (pong.from, pong.text.as_str()),
        (js_id, "pong: hello from rust")
    );
    rust.ack(&[pong.id]).await.unwrap();

    let status = timeout_at(deadline, peer.wait()).await.unwrap().unwrap();
    assert!(status.success(), "the JS peer exited with {status}");
    rust.close();
    server.stop().await;
}

/// The texts each user writes to the group (the JS user,
/// `clients/js/test/interop/group-peer.js`, and the demo page,
/// `demo/test/group-interop.test.js`, expect the same).
const FROM_DEMO: &str = "hello from the demo";
const FROM_JS: &str = "hello from js";
const FROM_RUST: &str = "hello from rust";

/// The "done when": a three-user group chat between a Rust client
/// (R, this process), a JS client (J, a Node script) and the demo page in
/// Chromium (D, a browser test), on one server. D makes the group with
/// "New group" and writes first, which tells R and J the group and its
/// members; J answers in it once it has D's message; R writes once it has
/// both. Each checks that the other two's messages reached it in that
/// group, from the right user, with the right text: R here, J in its
/// script (and again here, from what it prints), D on the page. Every wait
/// is bounded: the scripts' own (J 150 s, D 30 s a step) fail first, with
/// what they saw; a 240-second deadline bounds the whole.
async fn rust_js_and_demo_chat_in_one_group(backend: Backend) {
    let js_dir = npm_ready("clients/js").await;
    let demo_dir = npm_ready("demo/test").await;
    let chromium = tokio::task::spawn_blocking(toolchain::chromium)
        .await
        .expect("Chromium lookup task");
    let server = TestServer::start_on(TestDb::new(backend).await, &["--demo", "true"]).await;
    let deadline = Instant::now() + Duration::from_secs(240);
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (rust_name, js_name, demo_name) = (
        format!("rust_{suffix}"),
        format!("js_{suffix}"),
        format!("demo_{suffix}"),
    );
    let group_name = format!("trio {suffix}");

    let rust = Client::register(
        &server.api.base,
        &rust_name,
        PASSWORD,
        DeviceKeys::generate(),
    )
    .await
    .expect("the Rust user signs up");
    let mut events = rust.connect(ConnectOptions::default()).unwrap();

    // J signs up before D starts: the page looks both others up by name
    // when it makes the group.
    let mut peer = tokio::process::Command::new("node")
        .arg("test/interop/group-peer.js")
        .current_dir(&js_dir)
        .env("SEALPOST_TEST_URL", &server.api.base)
        .env("PEER_NAME", &js_name)
        .env("DEMO_NAME", &demo_name)
        .env("RUST_NAME", &rust_name)
        .env("GROUP_NAME", &group_name)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs");
    let mut lines = BufReader::new(peer.stdout.take().unwrap()).lines();
    let mut next_line = async || -> Option<Value> {
        let line = timeout_at(deadline, lines.next_line())
            .await
            .expect("the JS user says something in time")
            .expect("the JS user's output")?;
        let line: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("not JSON from the JS user: {line}"));
        assert!(line.get("error").is_none(), "the JS user failed: {line}");
        Some(line)
    };
    let ready = next_line().await.expect("the JS user signs up");
    let js_id: uuid::Uuid = ready["ready"]
        .as_str()
        .unwrap_or_else(|| panic!("not ready: {ready}"))
        .parse()
        .unwrap();

    let demo_env = [
        ("SEALPOST_DEMO_URL", server.api.base.clone()),
        ("CHROMIUM", chromium.display().to_string()),
        ("INTEROP_DEMO_NAME", demo_name.clone()),
        ("INTEROP_RUST_NAME", rust_name.clone()),
        ("INTEROP_JS_NAME", js_name.clone()),
        ("INTEROP_GROUP", group_name.clone()),
    ];
    let demo_side = node_test(&demo_dir, &["group-interop.test.js"], &demo_env);
    // What J printed: every message it got, in order, and its exit.
    let js_side = async {
        let mut got = Vec::new();
        while let Some(line) = next_line().await {
            if line.get("got").is_some() {
                got.push(line);
            }
        }
        let status = timeout_at(deadline, peer.wait())
            .await
            .expect("the JS user exits in time")
            .unwrap();
        assert!(status.success(), "the JS user exited with {status}");
        got
    };
    let rust_side = async {
        // D's message and J's answer, in whichever order they come.
        let mut got: Vec<Incoming> = Vec::new();
        while got.len() < 2 {
            let event = timeout_at(deadline, events.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("the Rust user has {} of its 2 group messages", got.len())
                })
                .expect("the Rust user's events go on");
            if let Event::Message(m) = event {
                rust.ack(&[m.id]).await.unwrap();
                got.push(m);
            }
        }
        let demo_id = rust
            .find_user(&demo_name)
            .await
            .expect("the demo user's id")
            .id;
        let group = got[0].group.clone().expect("the first message has a group");
        assert_eq!(group.name, group_name, "{:?}", got[0]);
        let mut members = group.members.clone();
        members.sort();
        let mut expected = vec![demo_id, js_id, rust.user_id()];
        expected.sort();
        assert_eq!(members, expected, "the group's members");
        got.sort_by_key(|m| m.text != FROM_DEMO);
        for (m, from, text) in [(&got[0], demo_id, FROM_DEMO), (&got[1], js_id, FROM_JS)] {
            assert_eq!(
                (m.text.as_str(), m.from),
                (text, from),
                "the Rust user got {m:?}"
            );
            assert_eq!(m.group.as_ref(), Some(&group), "{text:?} in the group");
        }

        let sent = rust
            .send_group(&group, FROM_RUST)
            .await
            .expect("the Rust user writes to the group");
        assert!(sent.sync_error.is_none());
        (group, demo_id)
    };
    let ((), js_got, (group, demo_id)) = tokio::join!(demo_side, js_side, rust_side);

    // J's own checks passed (it exited 0); what it printed agrees.
    let summary: Vec<_> = js_got
        .iter()
        .map(|l| {
            (
                l["got"].as_str().unwrap().to_owned(),
                l["from"].as_str().unwrap().parse::<uuid::Uuid>().unwrap(),
                l["group"]["id"]
                    .as_str()
                    .unwrap()
                    .parse::<uuid::Uuid>()
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (FROM_DEMO.to_owned(), demo_id, group.id),
            (FROM_RUST.to_owned(), rust.user_id(), group.id),
        ],
        "what the JS user got: {js_got:?}"
    );
    rust.close();
    server.stop().await;
}

async fn next_message(events: &mut Events, deadline: Instant) -> Incoming {
    loop {
        match timeout_at(deadline, events.next())
            .await
            .expect("a message in time")
        {
            Some(Event::Message(message)) => return message,
            Some(_) => continue,
            None => panic!("the Rust client's events ended"),
        }
    }
}
