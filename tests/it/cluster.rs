//! The cluster (issue 13): nodes on one PostgreSQL database, joined by
//! NATS, behave to a client as one server. Pushes, backlog drains,
//! exclusive sockets, revocations, ephemeral sends, multi sends, receipts
//! and `devices_changed` cross nodes; per-sender order holds; a node killed
//! with SIGKILL or a NATS restart loses nothing. The cluster interface is
//! /work/spec/cluster-interface.md; the harness is `common::cluster`.
//!
//! The cluster tests need PostgreSQL (SQLite is single-node) and live in
//! `postgres`; what a single node says, and the refusal to run NATS with
//! SQLite, run on every build.

use std::time::Duration;

use sealpost::{Config, Server};

use crate::common::{JWT_SECRET, TestDb};

/// Readiness and node info of a node without NATS, on both backends.
mod single_node {
    use crate::backend_tests;
    use crate::common::cluster::{metric, readyz};
    use crate::common::{Backend, TestServer};

    backend_tests!(readyz_says_local_broker_and_names_the_node);

    async fn readyz_says_local_broker_and_names_the_node(backend: Backend) {
        // Unnamed: a generated `node-<8 hex>`.
        let server = TestServer::start(backend).await;
        let (status, body) = readyz(&server).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "ready", "{body}");
        assert_eq!(body["broker"], "local", "{body}");
        let node = body["node"].as_str().unwrap_or_default();
        let hex = node.strip_prefix("node-").unwrap_or_default();
        assert!(
            hex.len() == 8 && hex.chars().all(|c| c.is_ascii_hexdigit()),
            "a generated node id is node-<8 hex>: {body}"
        );
        let db = server.stop().await;

        // Named: that name, here and in the metrics.
        let server =
            TestServer::start_on(db, &["--node-id", "solo", "--metrics-addr", "127.0.0.1:0"]).await;
        let (status, body) = readyz(&server).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["node"], "solo", "{body}");
        assert_eq!(body["broker"], "local", "{body}");
        let addr = server.metrics_addr.expect("metrics are on");
        assert_eq!(
            metric(
                addr,
                "sealpost_node_info",
                &[("node", "solo"), ("broker", "local")]
            )
            .await,
            Some(1.0),
            "sealpost_node_info{{node=\"solo\",broker=\"local\"}}"
        );
        server.stop().await;
    }
}

/// SQLite is one process's database: asked to join a cluster, the server
/// refuses to start, as a process and in this one. The NATS URL is a port
/// nothing listens on: the refusal must come before any connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_sqlite_refuses_to_start() {
    const NATS: &str = "nats://127.0.0.1:1";
    const MESSAGE: &str = "SQLite is single-node";
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("sealpost.db").display());
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .arg("serve")
        .env_clear()
        .env("SEALPOST_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", &url)
        .env("SEALPOST_JWT_SECRET", JWT_SECRET)
        .env("SEALPOST_NATS_URL", NATS)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sealpost");
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("sealpost serve with NATS and SQLite exits instead of serving")
        .expect("sealpost serve's output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "exited {}: {stderr}",
        output.status
    );
    assert!(stderr.contains(MESSAGE), "stderr: {stderr}");

    let db = TestDb::new(crate::common::Backend::Sqlite).await;
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--database-url",
        &db.url,
        "--jwt-secret",
        JWT_SECRET,
        "--nats-url",
        NATS,
    ];
    // Refused while parsing or at bind: either will do, with the message.
    let refusal = match Config::parse_from(args) {
        Err(err) => err.to_string(),
        Ok(config) => match Server::bind(config).await {
            Ok(_) => panic!("a server bound with NATS and SQLite"),
            Err(err) => format!("{err:#}"),
        },
    };
    assert!(refusal.contains(MESSAGE), "{refusal}");
}

#[cfg(sealpost_pg_tests)]
mod postgres {
    use std::collections::{BTreeSet, HashMap};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serde_json::{Value, json};
    use tokio::task::JoinHandle;
    use tokio::time::Instant;
    use uuid::Uuid;

    use crate::common::cluster::{Cluster, Nats, metric, node_id, readyz, wait_for_broker};
    use crate::common::multi::{self, assert_copy};
    use crate::common::traffic::ANSWER_BOUND;
    use crate::common::ws::{Close, Event, WsClient, assert_next_is_sentinel, close};
    use crate::common::{
        Account, Api, PASSWORD, ServerProcess, assert_message, b64, device_id, eventually,
        eventually_within, id, public_key, session, unb64,
    };

    /// Takes the database's revocation poll out of the picture, so that
    /// what reaches another node got there through NATS.
    const NO_POLL: &[&str] = &["--revocation-poll-interval", "1h"];

    /// How soon a revocation on one node closes sockets on another: issue
    /// 13 asks for "at once"; a functional bound, not a performance target.
    const REVOCATION_OVER_NATS: Duration = Duration::from_secs(1);

    /// How long every accepted message may take to reach the recipient
    /// once the senders have stopped (a drain, a re-read after NATS came
    /// back).
    const ARRIVAL: Duration = Duration::from_secs(30);

    /// How soon a message sent once everything has settled is pushed.
    const LIVE: Duration = Duration::from_secs(5);

    /// Sends awaiting `sent` on one socket: well under the server's 256, so
    /// that the sender never depends on the server pausing its reads.
    const WINDOW: usize = 32;

    /// Between two requests of a steady [`Stream`]: a steady trickle, not a
    /// load test, on a machine the other tests share.
    const PACE: Duration = Duration::from_millis(10);

    // -----------------------------------------------------------------------
    // Helpers

    /// A `send` frame with one envelope per `(device, body)`.
    fn send_frame(reference: &str, to: Uuid, list: &[(i64, &[u8])]) -> Value {
        let envelopes: Value = list
            .iter()
            .map(|(device, body)| json!({ "device_id": device, "body": b64(body) }))
            .collect();
        json!({ "type": "send", "ref": reference, "to": to, "envelopes": envelopes })
    }

    /// An ephemeral `send` frame with a plain body.
    fn ephemeral_frame(reference: &str, to: Uuid, body: &[u8]) -> Value {
        json!({ "type": "send", "ref": reference, "to": to, "body": b64(body), "ephemeral": true })
    }

    /// Asserts that `error` (a REST reply's `error` object or an `error`
    /// frame) is `devices_changed` naming `missing` and `extra`.
    #[track_caller]
    fn assert_devices_changed(error: &Value, missing: &[i64], extra: &[i64]) {
        assert_eq!(error["code"], "devices_changed", "{error}");
        assert_eq!(error["missing"], json!(missing), "missing: {error}");
        assert_eq!(error["extra"], json!(extra), "extra: {error}");
    }

    /// Ends a check that nothing more reaches `sockets` (of the account of
    /// `devices`): a sentinel through each of `nodes`, next on every socket.
    /// Messages accepted by different nodes have no order between them, so
    /// one goes through each node whose messages are under test.
    async fn nothing_more(nodes: &[&Api], devices: &[&Account], sockets: &mut [&mut WsClient]) {
        for node in nodes {
            assert_next_is_sentinel(node, devices, sockets).await;
        }
    }

    /// Asserts that `ws` is closed with `want` by `deadline`.
    async fn closed_by(ws: &mut WsClient, want: Close, deadline: Instant, what: &str) {
        let closed = async {
            loop {
                match ws.event().await {
                    Event::Json(_) => continue,
                    other => return other,
                }
            }
        };
        let got = tokio::time::timeout_at(deadline, closed)
            .await
            .unwrap_or_else(|_| panic!("{what}: not closed within {REVOCATION_OVER_NATS:?}"));
        assert!(got.is(want), "{what}: {got:?}, not {want:?}");
    }

    /// Sends `count` messages from `from` to `to` over one new socket on
    /// `api`, pipelined, with bodies `"{tag}:{n}"`; returns their ids in
    /// send order. Every send must be answered `sent`.
    async fn send_over_ws(
        api: Api,
        from: Account,
        to: Uuid,
        tag: String,
        count: usize,
    ) -> Vec<Uuid> {
        let (mut ws, _) = WsClient::ready(&api, &from).await;
        let mut sent: Vec<Option<Uuid>> = vec![None; count];
        let (mut next, mut done) = (0, 0);
        while done < count {
            while next < count && next - done < WINDOW {
                ws.send_message(&next.to_string(), to, format!("{tag}:{next}").as_bytes())
                    .await;
                next += 1;
            }
            // `expect` panics on an `error` frame, naming it.
            let frame = ws.expect("sent").await;
            let n: usize = frame["ref"]
                .as_str()
                .and_then(|r| r.parse().ok())
                .unwrap_or_else(|| panic!("a sent frame with a ref not ours: {frame}"));
            assert!(
                sent[n].replace(id(&frame["id"])).is_none(),
                "two sent for {n}: {frame}"
            );
            done += 1;
        }
        ws.close().await;
        sent.into_iter().map(Option::unwrap).collect()
    }

    /// As [`send_over_ws`], over sequential `POST /v1/messages`.
    async fn send_over_rest(
        api: Api,
        from: Account,
        to: Uuid,
        tag: String,
        count: usize,
    ) -> Vec<Uuid> {
        let mut sent = Vec::with_capacity(count);
        for n in 0..count {
            let reply = api.send(&from, to, format!("{tag}:{n}").as_bytes()).await;
            sent.push(id(&reply["id"]));
        }
        sent
    }

    /// Asserts that `sent` (one sender's ids, in send order) ascends: a node
    /// gives one sender's sequential messages ascending ids, which is the
    /// order a backlog has.
    #[track_caller]
    fn assert_ascending(sent: &[Uuid], who: &str) {
        let first_out_of_order = sent.windows(2).position(|w| w[0] >= w[1]);
        assert!(
            first_out_of_order.is_none(),
            "{who}'s ids do not ascend in send order at {first_out_of_order:?}"
        );
    }

    /// What a [`Receiver`] saw on its socket, in order.
    #[derive(Debug)]
    enum Seen {
        Message(Value),
        Drained,
        /// A frame other than a message, `drained` or a notice.
        Other(Value),
        Closed(u16, String),
        Ended,
    }

    /// A socket read in the background, as an always-connected client
    /// reads it: backlog, `drained`, live messages, each acknowledged soon
    /// after it arrives (in batches, and whenever the socket goes quiet).
    struct Receiver {
        seen: Arc<Mutex<Vec<Seen>>>,
        stop: Arc<AtomicBool>,
        task: JoinHandle<Option<WsClient>>,
        /// Whose socket, for failure messages.
        who: String,
    }

    /// Acks sent at once at most: a client acks in batches.
    const ACK_BATCH: usize = 50;

    impl Receiver {
        /// Opens `who`'s socket on `api`, checks `ready` and reads on in
        /// the background.
        async fn connect(api: &Api, who: &Account) -> Self {
            let mut ws = WsClient::connect(api, Some(&who.access)).await;
            let ready = ws.expect_exactly("ready").await;
            assert_eq!(ready["user_id"], who.id.to_string(), "{ready}");
            let seen = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(Self::read(ws, seen.clone(), stop.clone()));
            Self {
                seen,
                stop,
                task,
                who: who.username.clone(),
            }
        }

        async fn read(
            mut ws: WsClient,
            seen: Arc<Mutex<Vec<Seen>>>,
            stop: Arc<AtomicBool>,
        ) -> Option<WsClient> {
            let mut unacked: Vec<String> = Vec::new();
            loop {
                if stop.load(Ordering::SeqCst) || unacked.len() >= ACK_BATCH {
                    if !unacked.is_empty() {
                        let refs: Vec<&str> = unacked.iter().map(String::as_str).collect();
                        // A failed write: the socket is gone; its end is
                        // read next.
                        ws.try_ack(&refs).await;
                        unacked.clear();
                    }
                    if stop.load(Ordering::SeqCst) {
                        return Some(ws);
                    }
                }
                let Some(event) = ws.event_within(Duration::from_millis(50)).await else {
                    // Quiet: acknowledge what came so far.
                    if !unacked.is_empty() {
                        let refs: Vec<&str> = unacked.iter().map(String::as_str).collect();
                        ws.try_ack(&refs).await;
                        unacked.clear();
                    }
                    continue;
                };
                let next = match event {
                    Event::Json(frame) => match frame["type"].as_str() {
                        Some("message") => {
                            if frame["ephemeral"] != true {
                                unacked.push(frame["id"].as_str().unwrap_or_default().to_owned());
                            }
                            Seen::Message(frame)
                        }
                        Some("drained") => Seen::Drained,
                        Some("receipt" | "devices_changed") => continue,
                        _ => Seen::Other(frame),
                    },
                    Event::Closed(code, reason) => {
                        seen.lock().unwrap().push(Seen::Closed(code, reason));
                        return None;
                    }
                    Event::Ended => {
                        seen.lock().unwrap().push(Seen::Ended);
                        return None;
                    }
                };
                seen.lock().unwrap().push(next);
            }
        }

        /// The ids of the messages seen so far, in arrival order.
        fn ids(&self) -> Vec<Uuid> {
            message_ids(&self.seen.lock().unwrap())
        }

        /// How the socket ended, if it has.
        fn end(&self) -> Option<String> {
            self.seen.lock().unwrap().iter().find_map(|s| match s {
                Seen::Closed(code, reason) => Some(format!("closed with {code} ({reason:?})")),
                Seen::Ended => Some("ended without a close frame".to_owned()),
                _ => None,
            })
        }

        /// Waits until every id of `expected` has arrived, at most `limit`.
        async fn until_all(&self, expected: &[Uuid], limit: Duration) {
            let deadline = Instant::now() + limit;
            loop {
                let got: BTreeSet<Uuid> = self.ids().into_iter().collect();
                let missing: Vec<&Uuid> = expected.iter().filter(|i| !got.contains(i)).collect();
                if missing.is_empty() {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} of {} messages never reached {}'s socket within {limit:?} \
                     (socket: {}); the first missing: {:?}",
                    missing.len(),
                    expected.len(),
                    self.who,
                    self.end().unwrap_or_else(|| "open".to_owned()),
                    &missing[..missing.len().min(5)],
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// Waits until the socket has ended (its node died), at most
        /// [`ARRIVAL`]; returns what it saw.
        async fn ended(self) -> Vec<Seen> {
            let who = self.who;
            let task = tokio::time::timeout(ARRIVAL, self.task)
                .await
                .unwrap_or_else(|_| panic!("{who}'s socket did not end"))
                .expect("the reader");
            assert!(task.is_none(), "the reader stopped with the socket open");
            Arc::try_unwrap(self.seen)
                .expect("the reader is done")
                .into_inner()
                .unwrap()
        }

        /// Acknowledges what is left and stops reading; the socket must
        /// still be open. Returns what it saw and the socket.
        async fn finish(self) -> (Vec<Seen>, WsClient) {
            self.stop.store(true, Ordering::SeqCst);
            let ws = self.task.await.expect("the reader");
            let seen = Arc::try_unwrap(self.seen)
                .expect("the reader is done")
                .into_inner()
                .unwrap();
            let ws = ws.unwrap_or_else(|| {
                panic!(
                    "{}'s socket ended; it should have stayed open: {:?}",
                    self.who,
                    seen.last()
                )
            });
            (seen, ws)
        }
    }

    fn message_ids(seen: &[Seen]) -> Vec<Uuid> {
        seen.iter()
            .filter_map(|s| match s {
                Seen::Message(frame) => Some(id(&frame["id"])),
                _ => None,
            })
            .collect()
    }

    fn messages(seen: &[Seen]) -> Vec<&Value> {
        seen.iter()
            .filter_map(|s| match s {
                Seen::Message(frame) => Some(frame),
                _ => None,
            })
            .collect()
    }

    /// The frames other than messages, `drained` and notices.
    fn others(seen: &[Seen]) -> Vec<&Value> {
        seen.iter()
            .filter_map(|s| match s {
                Seen::Other(frame) => Some(frame),
                _ => None,
            })
            .collect()
    }

    /// Asserts that `got` holds each of `expected` exactly once and nothing
    /// else.
    #[track_caller]
    fn assert_exactly_once(got: &[Uuid], expected: &[Uuid], who: &str) {
        assert!(!expected.is_empty(), "nothing was sent");
        let mut counts: HashMap<Uuid, usize> = HashMap::new();
        for i in got {
            *counts.entry(*i).or_default() += 1;
        }
        let twice: Vec<&Uuid> = counts
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(i, _)| i)
            .collect();
        assert!(
            twice.is_empty(),
            "{} messages reached {who} more than once, e.g. {:?}",
            twice.len(),
            &twice[..twice.len().min(5)]
        );
        let expected_set: BTreeSet<&Uuid> = expected.iter().collect();
        let strangers: Vec<&Uuid> = got.iter().filter(|i| !expected_set.contains(i)).collect();
        assert!(
            strangers.is_empty(),
            "{who} got {} messages nobody was told were sent: {:?}",
            strangers.len(),
            &strangers[..strangers.len().min(5)]
        );
        assert_eq!(got.len(), expected.len(), "{who}: every message once");
    }

    /// The ids of `from`'s messages among `seen`, in arrival order.
    fn ids_from(seen: &[Seen], from: &Account) -> Vec<Uuid> {
        messages(seen)
            .into_iter()
            .filter(|m| m["from"] == from.id.to_string())
            .map(|m| id(&m["id"]))
            .collect()
    }

    /// A sender that keeps sending over `POST /v1/messages` at a steady
    /// pace until stopped, recording what was accepted and what was not;
    /// an answer later than any request may wait ([`ANSWER_BOUND`]) is a
    /// failure too.
    struct Stream {
        accepted: Arc<Mutex<Vec<Uuid>>>,
        failures: Arc<Mutex<Vec<String>>>,
        stop: Arc<AtomicBool>,
        task: JoinHandle<()>,
    }

    /// A stream gives up after this many refusals: the test fails anyway.
    const MAX_FAILURES: usize = 10;

    impl Stream {
        fn start(api: &Api, from: &Account, to: Uuid) -> Self {
            let accepted = Arc::new(Mutex::new(Vec::new()));
            let failures = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (api, token) = (api.clone(), from.access.clone());
            let task = tokio::spawn({
                let (accepted, failures, stop) = (accepted.clone(), failures.clone(), stop.clone());
                async move {
                    let mut pace = tokio::time::interval(PACE);
                    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    for n in 0usize.. {
                        pace.tick().await;
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let request = api
                            .http
                            .post(api.url("/v1/messages"))
                            .bearer_auth(&token)
                            .timeout(Duration::from_secs(30))
                            .json(
                                &json!({ "to": to, "body": b64(format!("stream:{n}").as_bytes()) }),
                            );
                        let started = Instant::now();
                        let response = request.send().await;
                        let took = started.elapsed();
                        let failure = match response {
                            _ if took > ANSWER_BOUND => {
                                format!("send {n}: answered after {took:?}, past its deadline")
                            }
                            Ok(response) if response.status() == 201 => {
                                let reply: Value = response.json().await.expect("a 201 body");
                                accepted.lock().unwrap().push(id(&reply["id"]));
                                continue;
                            }
                            Ok(response) => format!(
                                "send {n}: {} {}",
                                response.status(),
                                response.text().await.unwrap_or_default()
                            ),
                            Err(err) => format!("send {n}: {err}"),
                        };
                        let mut failures = failures.lock().unwrap();
                        failures.push(failure);
                        if failures.len() >= MAX_FAILURES {
                            return;
                        }
                    }
                }
            });
            Self {
                accepted,
                failures,
                stop,
                task,
            }
        }

        fn accepted(&self) -> usize {
            self.accepted.lock().unwrap().len()
        }

        fn accepted_ids(&self) -> Vec<Uuid> {
            self.accepted.lock().unwrap().clone()
        }

        #[track_caller]
        fn assert_no_failures(&self) {
            let failures = self.failures.lock().unwrap();
            assert!(failures.is_empty(), "sends not answered 201: {failures:?}");
        }

        /// Waits until at least `n` sends were accepted; every send so far
        /// must have been.
        async fn until_accepted(&self, n: usize) {
            eventually_within(&format!("{n} sends accepted"), ARRIVAL, async || {
                self.assert_no_failures();
                (self.accepted() >= n).then_some(())
            })
            .await;
        }

        /// Stops sending; returns every accepted id, in acceptance order.
        async fn finish(mut self) -> Vec<Uuid> {
            self.stop.store(true, Ordering::SeqCst);
            (&mut self.task).await.expect("the sender");
            self.assert_no_failures();
            Arc::try_unwrap(self.accepted)
                .unwrap()
                .into_inner()
                .unwrap()
        }
    }

    // -----------------------------------------------------------------------
    // Tests

    /// A message sent through any node is pushed live on the recipient's
    /// socket on another, once, with its sender, sending device and body.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cross_node_push() {
        let cluster = Cluster::start(3, &[]).await;
        let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
        let alice = a.account("alice").await;
        let bob = b.account("bob").await;
        let (mut alice_ws, _) = WsClient::ready(a, &alice).await;
        let (mut bob_ws, backlog) = WsClient::ready(b, &bob).await;
        assert!(backlog.is_empty(), "{backlog:?}");

        // Over alice's socket on A.
        alice_ws
            .send_message("1", bob.id, b"over a socket on n1")
            .await;
        let sent = alice_ws.expect("sent").await;
        assert_eq!(sent["ref"], "1", "{sent}");
        let pushed = bob_ws.expect_exactly("message").await;
        assert_message(
            &pushed,
            id(&sent["id"]),
            alice.id,
            1,
            b"over a socket on n1",
        );

        // Over REST on C, from her second device.
        let (laptop_id, laptop) = c.add_device(&alice, &public_key()).await;
        let reply = c.send(&laptop, bob.id, b"over REST on n3").await;
        let pushed = bob_ws.expect_exactly("message").await;
        assert_message(
            &pushed,
            id(&reply["id"]),
            alice.id,
            laptop_id,
            b"over REST on n3",
        );

        // Each once: no second copy through another node.
        nothing_more(&[a, c], &[&bob], &mut [&mut bob_ws]).await;
        drop((alice_ws, bob_ws));
        cluster.stop().await;
    }

    /// Bob drains on B a backlog queued through A and C while A and C keep
    /// sending: the backlog, `drained`, then live, every accepted message
    /// exactly once and nothing else.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_gap_no_duplicate_while_draining() {
        const EACH: usize = 150;
        let cluster = Cluster::start(3, &[]).await;
        let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
        let alice = a.account("alice").await;
        let bob = b.account("bob").await;
        let carol = c.account("carol").await;

        let (over_ws, over_rest) = tokio::join!(
            send_over_ws(a.api.clone(), alice.clone(), bob.id, "alice".into(), EACH),
            send_over_rest(c.api.clone(), carol.clone(), bob.id, "carol".into(), EACH),
        );
        let queued: Vec<Uuid> = over_ws.into_iter().chain(over_rest).collect();

        // The senders go on while bob connects and drains.
        let live_ws = tokio::spawn(send_over_ws(
            a.api.clone(),
            alice.clone(),
            bob.id,
            "alice-live".into(),
            EACH,
        ));
        let live_rest = tokio::spawn(send_over_rest(
            c.api.clone(),
            carol.clone(),
            bob.id,
            "carol-live".into(),
            EACH,
        ));
        let receiver = Receiver::connect(b, &bob).await;
        let mut all = queued.clone();
        all.extend(live_ws.await.expect("alice's sender"));
        all.extend(live_rest.await.expect("carol's sender"));

        receiver.until_all(&all, ARRIVAL).await;
        let (seen, mut ws) = receiver.finish().await;
        nothing_more(&[a, c], &[&bob], &mut [&mut ws]).await;

        let others = others(&seen);
        assert!(others.is_empty(), "unexpected frames: {others:?}");
        let drained: Vec<usize> = seen
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Seen::Drained))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(drained.len(), 1, "one drained: {drained:?}");
        let backlog: BTreeSet<Uuid> = message_ids(&seen[..drained[0]]).into_iter().collect();
        let late: Vec<&Uuid> = queued.iter().filter(|i| !backlog.contains(i)).collect();
        assert!(
            late.is_empty(),
            "{} messages queued before bob connected came after drained, e.g. {:?}",
            late.len(),
            &late[..late.len().min(5)]
        );
        assert_exactly_once(&message_ids(&seen), &all, "bob");
        drop(ws);
        cluster.stop().await;
    }

    /// Two senders on two nodes, interleaved: each sender's messages reach
    /// bob in its send order, live and in the backlog.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_sender_order() {
        const EACH: usize = 200;
        let cluster = Cluster::start(3, &[]).await;
        let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
        let alice = a.account("alice").await;
        let bob = b.account("bob").await;
        let carol = c.account("carol").await;
        let send_both = async |phase: &str| {
            tokio::join!(
                send_over_ws(
                    a.api.clone(),
                    alice.clone(),
                    bob.id,
                    format!("alice-{phase}"),
                    EACH
                ),
                send_over_ws(
                    c.api.clone(),
                    carol.clone(),
                    bob.id,
                    format!("carol-{phase}"),
                    EACH
                ),
            )
        };

        // Live: bob online on B.
        let receiver = Receiver::connect(b, &bob).await;
        let (from_alice, from_carol) = send_both("live").await;
        assert_ascending(&from_alice, "alice (live)");
        assert_ascending(&from_carol, "carol (live)");
        let all: Vec<Uuid> = from_alice.iter().chain(&from_carol).copied().collect();
        receiver.until_all(&all, ARRIVAL).await;
        let (seen, ws) = receiver.finish().await;
        assert_eq!(
            ids_from(&seen, &alice),
            from_alice,
            "alice's messages, live"
        );
        assert_eq!(
            ids_from(&seen, &carol),
            from_carol,
            "carol's messages, live"
        );
        ws.close().await;
        eventually("bob's acks to be applied", async || {
            b.inbox(&bob).await.is_empty().then_some(())
        })
        .await;

        // Backlog: bob offline while they send, then connecting.
        let (from_alice, from_carol) = send_both("backlog").await;
        assert_ascending(&from_alice, "alice (backlog)");
        assert_ascending(&from_carol, "carol (backlog)");
        let (mut ws, backlog) = WsClient::ready(b, &bob).await;
        let seen: Vec<Seen> = backlog.into_iter().map(Seen::Message).collect();
        assert_eq!(
            ids_from(&seen, &alice),
            from_alice,
            "alice's messages, backlog"
        );
        assert_eq!(
            ids_from(&seen, &carol),
            from_carol,
            "carol's messages, backlog"
        );
        assert_eq!(seen.len(), 2 * EACH, "nothing else in the backlog");
        nothing_more(&[a, b, c], &[&bob], &mut [&mut ws]).await;
        drop(ws);
        cluster.stop().await;
    }

    /// `?exclusive=true` on B closes the device's socket on A with 4409;
    /// the new socket stays and gets the messages, another device's socket
    /// on A is untouched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exclusive_displaces_across_nodes() {
        let cluster = Cluster::start(3, &[]).await;
        let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
        let alice = c.account("alice").await;
        let bob = a.account("bob").await;
        let (_, laptop) = a.add_device(&bob, &public_key()).await;
        let (mut old, _) = WsClient::ready(a, &bob).await;
        let (mut laptop_ws, _) = WsClient::ready(a, &laptop).await;

        let (mut new, ready, _) = WsClient::ready_with(b, &bob, "exclusive=true").await;
        assert_eq!(ready["device_id"], 1, "{ready}");
        old.expect_close(close::CONNECTED_ELSEWHERE).await;

        for (node, text) in [(a, "through n1"), (c, "through n3")] {
            let sent = id(&node.send(&alice, bob.id, text.as_bytes()).await["id"]);
            let pushed = new.expect("message").await;
            assert_message(&pushed, sent, alice.id, 1, text.as_bytes());
            let pushed = laptop_ws.expect("message").await;
            assert_message(&pushed, sent, alice.id, 1, text.as_bytes());
        }
        nothing_more(&[a, c], &[&bob, &laptop], &mut [&mut new, &mut laptop_ws]).await;
        drop((new, laptop_ws));
        cluster.stop().await;
    }

    /// A logout through B closes the session's socket on A with 4401 at
    /// once (the database poll is an hour away) and A refuses its token;
    /// another session of the same device keeps its socket.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn revocation_closes_sockets_on_other_nodes() {
        let cluster = Cluster::start(3, NO_POLL).await;
        let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
        let alice = c.account("alice").await;
        let bob = b.account("bob").await;
        let other = session(&bob, &c.login("bob").await);
        let (mut socket, _) = WsClient::ready(a, &bob).await;
        let (mut other_ws, _) = WsClient::ready(a, &other).await;
        a.get("/v1/me", Some(&bob.access)).await.expect(200);

        b.post("/v1/logout", Some(&bob.access), json!({}))
            .await
            .expect(204);
        let deadline = Instant::now() + REVOCATION_OVER_NATS;
        closed_by(
            &mut socket,
            close::REVOKED,
            deadline,
            "bob's socket on n1 after a logout on n2",
        )
        .await;
        for node in [a, c] {
            node.get("/v1/me", Some(&bob.access))
                .await
                .expect_error(401, "unauthorized");
        }

        let sent = id(&c.send(&alice, bob.id, b"still here").await["id"]);
        let pushed = other_ws.expect("message").await;
        assert_message(&pushed, sent, alice.id, 1, b"still here");
        a.get("/v1/me", Some(&other.access)).await.expect(200);
        drop(other_ws);
        cluster.stop().await;
    }

    /// Deleting an account through B closes its sockets on A with 4401 at
    /// once, and every node then refuses sends to it (404), the database
    /// poll being off: the deletion crossed as a directory change.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deleting_an_account_reaches_every_node() {
        let cluster = Cluster::start(3, NO_POLL).await;
        let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
        let alice = c.account("alice").await;
        let bob = a.account("bob").await;
        // C learns bob's devices by sending to him.
        c.send(&alice, bob.id, b"before").await;
        let (mut bob_ws, _) = WsClient::ready(a, &bob).await;

        let reply = b
            .delete("/v1/me", Some(&bob.access), json!({ "password": PASSWORD }))
            .await;
        assert_eq!(reply.status.as_u16(), 204, "{:?}", reply.body);
        let deadline = Instant::now() + REVOCATION_OVER_NATS;
        closed_by(&mut bob_ws, close::REVOKED, deadline, "bob's socket on n1").await;
        for node in [a, c] {
            eventually_within(
                "the deletion to reach every node",
                Duration::from_secs(2),
                async || {
                    let reply = node
                        .post(
                            "/v1/messages",
                            Some(&alice.access),
                            json!({ "to": bob.id, "body": b64(b"after") }),
                        )
                        .await;
                    (reply.status.as_u16() == 404).then_some(())
                },
            )
            .await;
        }
        cluster.stop().await;
    }

    /// A password change through B closes every device's sockets on A and C
    /// with 4401 at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_password_change_closes_every_device_socket_on_other_nodes() {
        let cluster = Cluster::start(3, NO_POLL).await;
        let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
        let bob = a.account("bob").await;
        let (_, laptop) = a.add_device(&bob, &public_key()).await;
        let (mut phone_ws, _) = WsClient::ready(a, &bob).await;
        let (mut laptop_ws, _) = WsClient::ready(c, &laptop).await;

        let tokens = b
            .put(
                "/v1/password",
                Some(&bob.access),
                json!({ "current_password": PASSWORD, "new_password": "another long passphrase" }),
            )
            .await
            .expect(200);
        let deadline = Instant::now() + REVOCATION_OVER_NATS;
        closed_by(
            &mut phone_ws,
            close::REVOKED,
            deadline,
            "bob's phone socket on n1",
        )
        .await;
        closed_by(
            &mut laptop_ws,
            close::REVOKED,
            deadline,
            "bob's laptop socket on n3",
        )
        .await;
        a.get("/v1/me", Some(&bob.access))
            .await
            .expect_error(401, "unauthorized");
        c.get("/v1/me", Some(&laptop.access))
            .await
            .expect_error(401, "unauthorized");
        a.get("/v1/me", Some(&session(&bob, &tokens).access))
            .await
            .expect(200);
        cluster.stop().await;
    }

    /// Removing a device through B closes that device's socket on A with
    /// 4401 at once; the other device's socket on C is told
    /// `devices_changed` and stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removing_a_device_closes_its_sockets_on_other_nodes() {
        let cluster = Cluster::start(3, NO_POLL).await;
        let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
        let alice = b.account("alice").await;
        let bob = a.account("bob").await;
        let (laptop_id, laptop) = a.add_device(&bob, &public_key()).await;
        let (mut laptop_ws, _) = WsClient::ready(a, &laptop).await;
        let (mut phone_ws, _) = WsClient::ready(c, &bob).await;

        let reply = b
            .delete(
                &format!("/v1/devices/{laptop_id}"),
                Some(&bob.access),
                json!({ "password": PASSWORD }),
            )
            .await;
        assert_eq!(reply.status.as_u16(), 204, "{:?}", reply.body);
        let deadline = Instant::now() + REVOCATION_OVER_NATS;
        closed_by(
            &mut laptop_ws,
            close::REVOKED,
            deadline,
            "bob's laptop socket on n1",
        )
        .await;
        a.get("/v1/me", Some(&laptop.access))
            .await
            .expect_error(401, "unauthorized");

        let changed = phone_ws.expect_exactly("devices_changed").await;
        let devices: Vec<i64> = changed["devices"]
            .as_array()
            .unwrap_or_else(|| panic!("no device list: {changed}"))
            .iter()
            .map(device_id)
            .collect();
        assert_eq!(devices, [1], "{changed}");
        let sent = id(&a.send(&alice, bob.id, b"for the phone").await["id"]);
        let pushed = phone_ws.expect_exactly("message").await;
        assert_message(&pushed, sent, alice.id, 1, b"for the phone");
        drop(phone_ws);
        cluster.stop().await;
    }

    /// An ephemeral send through A says `delivered: true` only when a
    /// socket of the recipient on some node took it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ephemeral_delivered_is_truthful_across_nodes() {
        let cluster = Cluster::start(2, &["--metrics-addr", "127.0.0.1:0"]).await;
        let (a, b) = (&cluster[0], &cluster[1]);
        let alice = a.account("alice").await;
        let bob = b.account("bob").await;
        let carol = a.account("carol").await;
        let (mut alice_ws, _) = WsClient::ready(a, &alice).await;
        let (mut bob_ws, _) = WsClient::ready(b, &bob).await;

        // Bob online on B only.
        alice_ws
            .send_json(ephemeral_frame("e1", bob.id, b"typing"))
            .await;
        let sent = alice_ws.expect("sent").await;
        assert_eq!(sent["delivered"], true, "bob is online on n2: {sent}");
        let pushed = bob_ws.expect_exactly("message").await;
        assert_message(&pushed, id(&sent["id"]), alice.id, 1, b"typing");
        assert_eq!(pushed["ephemeral"], true, "{pushed}");

        // Carol never connected anywhere.
        alice_ws
            .send_json(ephemeral_frame("e2", carol.id, b"typing"))
            .await;
        let sent = alice_ws.expect("sent").await;
        assert_eq!(
            sent["delivered"], false,
            "carol is offline everywhere: {sent}"
        );

        // Bob gone: once B has let go of his socket, nobody takes it.
        bob_ws.close().await;
        let b_metrics = b.metrics_addr.expect("metrics are on");
        eventually("n2 to hold no socket", async || {
            (metric(b_metrics, "sealpost_ws_connections", &[]).await == Some(0.0)).then_some(())
        })
        .await;
        alice_ws
            .send_json(ephemeral_frame("e3", bob.id, b"typing"))
            .await;
        let sent = alice_ws.expect("sent").await;
        assert_eq!(
            sent["delivered"], false,
            "bob is offline everywhere: {sent}"
        );

        // Never stored.
        assert!(b.inbox(&bob).await.is_empty());
        drop(alice_ws);
        cluster.stop().await;
    }

    /// Bob acks on B: alice's socket on A gets the receipt. Bob adds a
    /// device through C: his socket on B is told, and alice's send through
    /// A with the old device list is refused `devices_changed`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receipts_and_devices_changed_cross_nodes() {
        let cluster = Cluster::start(3, NO_POLL).await;
        let (a, b, c) = (&cluster[0], &cluster[1], &cluster[2]);
        let alice = a.account("alice").await;
        let bob = b.account("bob").await;
        let (mut alice_ws, _) = WsClient::ready(a, &alice).await;
        let (mut bob_ws, _) = WsClient::ready(b, &bob).await;

        // A learns bob's directory by sending with it.
        alice_ws
            .send_json(send_frame("1", bob.id, &[(1, b"hello bob")]))
            .await;
        let sent = alice_ws.expect_exactly("sent").await;
        let message = id(&sent["id"]);
        let pushed = bob_ws.expect_exactly("message").await;
        assert_message(&pushed, message, alice.id, 1, b"hello bob");
        bob_ws.ack(&[&message.to_string()]).await;
        let receipt = alice_ws.expect_exactly("receipt").await;
        assert_eq!(id(&receipt["id"]), message, "{receipt}");
        assert_eq!(id(&receipt["to"]), bob.id, "{receipt}");
        assert_eq!(receipt["device_id"], 1, "{receipt}");

        let (laptop_id, laptop) = c.add_device(&bob, &public_key()).await;
        let changed = bob_ws.expect_exactly("devices_changed").await;
        assert_eq!(changed["devices"], json!([1, laptop_id]), "{changed}");

        // The change reaches A over NATS within its latency (C answered
        // before A heard of it): a send through A with the new list is
        // accepted once A knows it. Bounded: the database poll is off.
        let both = json!({ "to": bob.id, "envelopes": [
            { "device_id": 1, "body": b64(b"both") },
            { "device_id": laptop_id, "body": b64(b"both") },
        ] });
        eventually_within(
            "A to learn bob's new device",
            Duration::from_secs(2),
            async || {
                let reply = a
                    .post("/v1/messages", Some(&alice.access), both.clone())
                    .await;
                (reply.status == 201).then_some(())
            },
        )
        .await;
        let pushed = bob_ws.expect_exactly("message").await;
        assert_eq!(unb64(pushed["body"].as_str().unwrap()), b"both", "{pushed}");
        bob_ws.ack(&[pushed["id"].as_str().unwrap()]).await;
        alice_ws.expect_exactly("receipt").await;

        // From then on the old list is refused, on both paths.
        alice_ws
            .send_json(send_frame("2", bob.id, &[(1, b"stale")]))
            .await;
        let error = alice_ws.expect_exactly("error").await;
        assert_eq!(error["ref"], "2", "{error}");
        assert_devices_changed(&error, &[laptop_id], &[]);
        let reply = a
            .post(
                "/v1/messages",
                Some(&alice.access),
                json!({ "to": bob.id, "envelopes": [{ "device_id": 1, "body": b64(b"stale") }] }),
            )
            .await;
        reply.expect_error(409, "devices_changed");
        assert_devices_changed(&reply.body["error"], &[laptop_id], &[]);
        // Nothing of them was stored.
        nothing_more(&[a], &[&bob, &laptop], &mut [&mut bob_ws]).await;
        eventually("bob's ack to be applied", async || {
            b.inbox(&bob).await.is_empty().then_some(())
        })
        .await;
        drop((alice_ws, bob_ws));
        cluster.stop().await;
    }

    /// Node 1, holding bob's socket, is SIGKILLed while alice sends through
    /// node 2: her sends go on being accepted, none waiting past its
    /// deadline, the other nodes stay ready, and bob, reconnecting to
    /// node 3, gets every accepted message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_killed_with_sigkill_loses_nothing() {
        let mut cluster = Cluster::<ServerProcess>::spawn(3, &[]).await;
        let alice = cluster[1].account("alice").await;
        let bob = cluster[0].account("bob").await;

        let first = Receiver::connect(&cluster[0], &bob).await;
        let stream = Stream::start(&cluster[1], &alice, bob.id);
        stream.until_accepted(100).await;
        first.until_all(&stream.accepted_ids(), ARRIVAL).await;

        cluster.kill9(0);
        let at_kill = stream.accepted();
        let first = first.ended().await;
        stream.until_accepted(at_kill + 100).await;
        // The survivors serve on, ready.
        for i in 1..cluster.len() {
            let (status, body) = readyz(&cluster[i]).await;
            assert_eq!(status, 200, "{} after node 1 died: {body}", node_id(i));
        }

        let second = Receiver::connect(&cluster[2], &bob).await;
        stream.until_accepted(stream.accepted() + 50).await;
        let accepted = stream.finish().await;
        let before: BTreeSet<Uuid> = message_ids(&first).into_iter().collect();
        let remaining: Vec<Uuid> = accepted
            .iter()
            .filter(|i| !before.contains(i))
            .copied()
            .collect();
        second.until_all(&remaining, ARRIVAL).await;
        let (seen, mut ws) = second.finish().await;
        nothing_more(&[&cluster[1], &cluster[2]], &[&bob], &mut [&mut ws]).await;

        // What came twice came once on each socket: unacknowledged on node
        // 1 when it died. Nothing came that was not accepted.
        let after = message_ids(&seen);
        let unique: BTreeSet<&Uuid> = after.iter().collect();
        assert_eq!(
            unique.len(),
            after.len(),
            "a message twice on node 3's socket"
        );
        let accepted_set: BTreeSet<&Uuid> = accepted.iter().collect();
        let strangers: Vec<&Uuid> = before
            .iter()
            .chain(&after)
            .filter(|i| !accepted_set.contains(i))
            .collect();
        assert!(
            strangers.is_empty(),
            "messages never accepted: {strangers:?}"
        );
        drop(ws);
        drop(cluster);
    }

    /// A node starts while NATS is down: it serves, says
    /// `"broker":"disconnected"`, accepts and stores; once NATS is up it
    /// connects by itself, and a message waiting for a socket on it is
    /// in that socket's backlog.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_starts_and_serves_while_nats_is_down() {
        let mut nats = Nats::private().await;
        nats.stop();
        let db = crate::common::TestDb::new(crate::common::Backend::Postgres).await;
        let args = [
            "--nats-url",
            nats.url.as_str(),
            "--nats-subject-prefix",
            nats.prefix.as_str(),
            "--node-id",
            "early",
        ];
        let node = crate::common::TestServer::start_on(db.shared(), &args).await;
        wait_for_broker(&node, "early", "disconnected").await;
        let alice = node.account("alice").await;
        let bob = node.account("bob").await;
        let sent = id(&node.send(&alice, bob.id, b"while alone").await["id"]);

        nats.start().await;
        wait_for_broker(&node, "early", "connected").await;
        let (bob_ws, backlog) = WsClient::ready(&node, &bob).await;
        assert_eq!(backlog.len(), 1, "{backlog:?}");
        assert_message(&backlog[0], sent, alice.id, 1, b"while alone");
        drop(bob_ws);
        node.stop().await;
        drop(db);
    }

    /// NATS is killed mid-traffic and started again: every send is still
    /// accepted, none waiting past its deadline, and bob, connected
    /// throughout on B without reconnecting, gets every message exactly
    /// once; live pushes resume.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_restart_mid_traffic_loses_nothing() {
        let nats = Nats::private().await;
        let mut cluster = Cluster::start_on(nats, 2, &["--metrics-addr", "127.0.0.1:0"]).await;
        let (a, b) = (cluster[0].api.clone(), cluster[1].api.clone());
        let metrics: Vec<_> = (0..2)
            .map(|i| cluster[i].metrics_addr.expect("metrics are on"))
            .collect();
        let connected_is = async |value: f64| {
            for (i, addr) in metrics.iter().enumerate() {
                eventually_within(
                    &format!("sealpost_broker_connected {value} on {}", node_id(i)),
                    crate::common::cluster::BROKER_CONNECT,
                    async || {
                        (metric(*addr, "sealpost_broker_connected", &[]).await == Some(value))
                            .then_some(())
                    },
                )
                .await;
            }
        };
        let alice = a.account("alice").await;
        let bob = b.account("bob").await;
        let receiver = Receiver::connect(&b, &bob).await;
        let stream = Stream::start(&a, &alice, bob.id);
        stream.until_accepted(30).await;
        receiver.until_all(&stream.accepted_ids(), ARRIVAL).await;
        connected_is(1.0).await;

        // The outage: sends go on being accepted.
        cluster.nats.stop();
        for (i, api) in [&a, &b].into_iter().enumerate() {
            wait_for_broker(api, &node_id(i), "disconnected").await;
        }
        connected_is(0.0).await;
        stream.until_accepted(stream.accepted() + 30).await;
        for (i, api) in [&a, &b].into_iter().enumerate() {
            let (status, body) = readyz(api).await;
            assert_eq!(status, 200, "a lost broker is reported, not fatal: {body}");
            assert_eq!(
                body["broker"],
                "disconnected",
                "{} during the outage: {body}",
                node_id(i)
            );
        }

        // Back on the same port.
        cluster.nats.start().await;
        for (i, api) in [&a, &b].into_iter().enumerate() {
            wait_for_broker(api, &node_id(i), "connected").await;
        }
        connected_is(1.0).await;
        stream.until_accepted(stream.accepted() + 30).await;
        let mut accepted = stream.finish().await;
        receiver.until_all(&accepted, ARRIVAL).await;

        // Pushed live again.
        let last = id(&a.send(&alice, bob.id, b"after the restart").await["id"]);
        accepted.push(last);
        receiver.until_all(&[last], LIVE).await;

        let (seen, mut ws) = receiver.finish().await;
        nothing_more(&[&a, &b], &[&bob], &mut [&mut ws]).await;
        let drained = seen.iter().filter(|s| matches!(s, Seen::Drained)).count();
        assert_eq!(drained, 1, "bob's socket drained once: {drained}");
        let others = others(&seen);
        assert!(others.is_empty(), "unexpected frames: {others:?}");
        assert_exactly_once(&message_ids(&seen), &accepted, "bob");

        // B re-read its connected devices' backlog when NATS came back.
        let b_metrics = metrics[1];
        let rereads = metric(b_metrics, "sealpost_broker_rereads_total", &[]).await;
        assert!(
            rereads.is_some_and(|n| n >= 1.0),
            "sealpost_broker_rereads_total on n2: {rereads:?}"
        );
        let disconnects = metric(b_metrics, "sealpost_broker_disconnects_total", &[]).await;
        assert!(
            disconnects.is_some_and(|n| n >= 1.0),
            "sealpost_broker_disconnects_total on n2: {disconnects:?}"
        );
        drop(ws);
        cluster.stop().await;
    }

    /// A multi send (issue 27) through node 1 reaches bob's socket on node
    /// 1 and carol's on node 2 live, one id for both, each copy with its
    /// device's key, the shared body stored once; a `send_multi` frame
    /// through node 2 crosses the other way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_multi_send_reaches_sockets_on_every_node() {
        let cluster = Cluster::start(2, &[]).await;
        let (a, b) = (&cluster[0], &cluster[1]);
        let alice = a.account("alice").await;
        let bob = a.account("bob").await;
        let carol = b.account("carol").await;
        let (mut bob_ws, _) = WsClient::ready(a, &bob).await;
        let (mut carol_ws, _) = WsClient::ready(b, &carol).await;
        let to_both = |tag: &str| {
            [
                (bob.id, vec![(1, format!("{tag} key for bob").into_bytes())]),
                (
                    carol.id,
                    vec![(1, format!("{tag} key for carol").into_bytes())],
                ),
            ]
        };

        // Over REST on node 1.
        let body = b"to the group through n1";
        let request = multi::shared(body, &to_both("rest"));
        let reply = multi::send(a, &alice, &request).await.expect(201);
        let message = id(&reply["id"]);
        let pushed = bob_ws.expect_exactly("message").await;
        assert_copy(
            &pushed,
            message,
            alice.id,
            1,
            body,
            Some(b"rest key for bob"),
        );
        let pushed = carol_ws.expect_exactly("message").await;
        assert_copy(
            &pushed,
            message,
            alice.id,
            1,
            body,
            Some(b"rest key for carol"),
        );
        assert_eq!(
            multi::rows(cluster.db()).await,
            (2, 1),
            "(queued copies, shared bodies): one body for both nodes' recipients"
        );

        // Over alice's socket on node 2.
        let (mut alice_ws, _) = WsClient::ready(b, &alice).await;
        let body = b"to the group through n2";
        let request = multi::shared(body, &to_both("ws"));
        alice_ws.send_json(multi::frame("g", &request)).await;
        let sent = alice_ws.expect_exactly("sent").await;
        assert_eq!(sent["ref"], "g", "{sent}");
        let message = id(&sent["id"]);
        let pushed = bob_ws.expect_exactly("message").await;
        assert_copy(&pushed, message, alice.id, 1, body, Some(b"ws key for bob"));
        let pushed = carol_ws.expect_exactly("message").await;
        assert_copy(
            &pushed,
            message,
            alice.id,
            1,
            body,
            Some(b"ws key for carol"),
        );

        // Each once: no second copy through the other node.
        nothing_more(&[a, b], &[&bob], &mut [&mut bob_ws]).await;
        nothing_more(&[a, b], &[&carol], &mut [&mut carol_ws]).await;
        drop((alice_ws, bob_ws, carol_ws));
        cluster.stop().await;
    }

    /// Each node's `/readyz` names it and its connected broker, as its
    /// metrics do.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readyz_names_the_node_and_broker() {
        let cluster = Cluster::start(2, &["--metrics-addr", "127.0.0.1:0"]).await;
        for i in 0..cluster.len() {
            let node = &cluster[i];
            let (status, body) = readyz(node).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["status"], "ready", "{body}");
            assert_eq!(body["node"], node_id(i), "{body}");
            assert_eq!(body["broker"], "connected", "{body}");
            let addr = node.metrics_addr.expect("metrics are on");
            let info = metric(
                addr,
                "sealpost_node_info",
                &[("node", &node_id(i)), ("broker", "nats")],
            )
            .await;
            assert_eq!(info, Some(1.0), "sealpost_node_info on {}", node_id(i));
            let connected = metric(addr, "sealpost_broker_connected", &[]).await;
            assert_eq!(
                connected,
                Some(1.0),
                "sealpost_broker_connected on {}",
                node_id(i)
            );
        }
        cluster.stop().await;
    }
}
