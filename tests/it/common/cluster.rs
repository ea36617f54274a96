//! Several sealpost nodes on one PostgreSQL database, joined by NATS, for
//! the cluster tests (issue 13).
//!
//! - [`Nats`]: the NATS a cluster uses. Either the shared one CI starts
//!   (`SEALPOST_TEST_NATS_URL`, `nats://127.0.0.1:4222` by default), with a
//!   subject prefix of its own per test so that tests running at once never
//!   hear each other; or a private `nats-server` child process the test can
//!   kill and start again on the same port.
//! - [`Cluster`]: N nodes named `n1`, `n2`, ... on one fresh PostgreSQL
//!   database: in this process ([`TestServer`]) or as child processes
//!   ([`ServerProcess`], for SIGKILL). Each has said `"broker":"connected"`
//!   on `/readyz` before the test gets the cluster.
//!
//! The nodes are dropped before the NATS server and the database (field
//! order), so that neither disappears under a running node at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use super::{Api, Backend, ServerProcess, TestDb, TestServer, free_port};

/// How long a node may take to (re)connect to NATS and say so on
/// `/readyz`: longer than [`super::SETTLE`], because a client that lost its
/// server reconnects with a backoff of up to a few seconds.
pub const BROKER_CONNECT: Duration = Duration::from_secs(20);

/// How long a fresh `nats-server` may take to accept connections.
const NATS_START: Duration = Duration::from_secs(5);

/// The NATS a cluster's nodes talk through.
pub struct Nats {
    /// What the nodes get as `--nats-url`.
    pub url: String,
    /// What the nodes get as `--nats-subject-prefix`: unique per test.
    pub prefix: String,
    /// Set for a private server, which the test may stop and start.
    private: Option<PrivateNats>,
}

struct PrivateNats {
    binary: PathBuf,
    port: u16,
    /// `None` while stopped.
    child: Option<Child>,
}

impl Nats {
    /// The shared NATS of `SEALPOST_TEST_NATS_URL`, which must answer: CI
    /// starts one, and a cluster test never skips.
    pub async fn shared() -> Self {
        let url = std::env::var("SEALPOST_TEST_NATS_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
        let addr = host_port(&url);
        let reachable = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&addr),
        )
        .await;
        if !matches!(reachable, Ok(Ok(_))) {
            panic!(
                "no NATS answers at {url} (SEALPOST_TEST_NATS_URL): the cluster tests need one; \
                 start `nats-server -a 127.0.0.1 -p 4222` or point SEALPOST_TEST_NATS_URL at one"
            );
        }
        Self {
            url,
            prefix: unique_prefix(),
            private: None,
        }
    }

    /// A `nats-server` of this test's own (`SEALPOST_TEST_NATS_SERVER`, or
    /// `nats-server` on `PATH`) on a free port, accepting connections.
    pub async fn private() -> Self {
        let binary = std::env::var_os("SEALPOST_TEST_NATS_SERVER")
            .filter(|b| !b.is_empty())
            .map(PathBuf::from)
            .or_else(|| find_on_path("nats-server"))
            .unwrap_or_else(|| {
                panic!(
                    "this test runs its own nats-server and found none: install nats-server \
                     on PATH or set SEALPOST_TEST_NATS_SERVER to its path"
                )
            });
        let port = free_port();
        let mut nats = Self {
            url: format!("nats://127.0.0.1:{port}"),
            prefix: unique_prefix(),
            private: Some(PrivateNats {
                binary,
                port,
                child: None,
            }),
        };
        nats.start().await;
        nats
    }

    fn private_mut(&mut self) -> &mut PrivateNats {
        self.private
            .as_mut()
            .expect("only a private NATS server can be stopped and started")
    }

    /// Kills the private server with SIGKILL and reaps it: no goodbye to
    /// its clients.
    pub fn stop(&mut self) {
        let private = self.private_mut();
        let mut child = private.child.take().expect("the NATS server is running");
        child.kill().expect("kill -9 nats-server");
        child.wait().expect("reap nats-server");
    }

    /// Starts the private server (again) on its port; returns once the port
    /// accepts connections.
    pub async fn start(&mut self) {
        let private = self.private_mut();
        assert!(
            private.child.is_none(),
            "the NATS server is already running"
        );
        let port = private.port.to_string();
        let child = Command::new(&private.binary)
            .args(["-a", "127.0.0.1", "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", private.binary.display()));
        private.child = Some(child);
        let addr = format!("127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + NATS_START;
        loop {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return;
            }
            let private = self.private_mut();
            if let Some(status) = private.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nats-server on port {port} exited at start: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server on port {port} did not accept connections within {NATS_START:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(child) = self.private.as_mut().and_then(|p| p.child.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A subject prefix no other test uses.
fn unique_prefix() -> String {
    format!("t{}", Uuid::new_v4().simple())
}

/// `host:port` of the first server of a NATS URL list
/// (`nats://user:pass@h:4222,nats://h2:4222`).
fn host_port(url: &str) -> String {
    let first = url.split(',').next().unwrap_or(url).trim();
    let rest = first.split_once("://").map_or(first, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    let rest = rest.split('/').next().unwrap_or(rest);
    if rest.contains(':') {
        rest.to_owned()
    } else {
        format!("{rest}:4222")
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// N nodes on one database and one NATS. Index it for node `i` (0-based;
/// node `i` is named `n{i + 1}`).
pub struct Cluster<N> {
    /// `None` once killed.
    nodes: Vec<Option<N>>,
    pub nats: Nats,
    /// Dropped last: it drops the database.
    db: TestDb,
}

/// The `--node-id` of node `i`.
pub fn node_id(i: usize) -> String {
    format!("n{}", i + 1)
}

impl<N> Cluster<N> {
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The database URL every node uses.
    pub fn db_url(&self) -> &str {
        &self.db.url
    }

    /// The database every node uses, for a test that reads it behind the
    /// nodes' backs ([`TestDb::count`]).
    pub fn db(&self) -> &TestDb {
        &self.db
    }
}

impl<N> std::ops::Index<usize> for Cluster<N> {
    type Output = N;
    fn index(&self, i: usize) -> &N {
        self.nodes[i]
            .as_ref()
            .unwrap_or_else(|| panic!("node {} was killed", node_id(i)))
    }
}

impl Cluster<TestServer> {
    /// `n` in-process nodes on the shared NATS, each with `extra` flags.
    pub async fn start(n: usize, extra: &[&str]) -> Self {
        Self::start_on(Nats::shared().await, n, extra).await
    }

    /// `n` in-process nodes on `nats`, each with `extra` flags.
    pub async fn start_on(nats: Nats, n: usize, extra: &[&str]) -> Self {
        let db = TestDb::new(Backend::Postgres).await;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let id = node_id(i);
            let mut args = vec![
                "--nats-url",
                &nats.url,
                "--nats-subject-prefix",
                &nats.prefix,
                "--node-id",
                &id,
            ];
            args.extend_from_slice(extra);
            nodes.push(Some(TestServer::start_on(db.shared(), &args).await));
        }
        let cluster = Self { nodes, nats, db };
        for i in 0..n {
            wait_for_broker(&cluster[i], &node_id(i), "connected").await;
        }
        cluster
    }

    /// Stops every node gracefully (each must stop cleanly), then drops the
    /// NATS server and the database.
    pub async fn stop(mut self) {
        for node in self.nodes.drain(..).flatten() {
            node.stop().await;
        }
    }
}

impl Cluster<ServerProcess> {
    /// `n` nodes as child processes on the shared NATS, each with
    /// `extra_env`.
    pub async fn spawn(n: usize, extra_env: &[(&str, &str)]) -> Self {
        let nats = Nats::shared().await;
        let db = TestDb::new(Backend::Postgres).await;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let id = node_id(i);
            let mut env = vec![
                ("SEALPOST_NATS_URL", nats.url.as_str()),
                ("SEALPOST_NATS_SUBJECT_PREFIX", nats.prefix.as_str()),
                ("SEALPOST_NODE_ID", id.as_str()),
                ("SEALPOST_MAX_CONNECTIONS_PER_IP", "0"),
            ];
            env.extend_from_slice(extra_env);
            nodes.push(Some(ServerProcess::spawn(&db.url, &env)));
        }
        let cluster = Self { nodes, nats, db };
        for i in 0..n {
            wait_for_broker(&cluster[i], &node_id(i), "connected").await;
        }
        cluster
    }

    /// SIGKILLs node `i`.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i]
            .take()
            .unwrap_or_else(|| panic!("node {} was killed already", node_id(i)))
            .kill9();
    }
}

/// `GET /readyz` of `api`: its status and body.
pub async fn readyz(api: &Api) -> (u16, Value) {
    let reply = api.get("/readyz", None).await;
    (reply.status.as_u16(), reply.body)
}

/// Waits (at most [`BROKER_CONNECT`]) until `node`'s `/readyz` answers 200
/// with `"broker": broker`.
pub async fn wait_for_broker(api: &Api, node: &str, broker: &str) {
    let deadline = tokio::time::Instant::now() + BROKER_CONNECT;
    loop {
        let (status, body) = readyz(api).await;
        if status == 200 && body["broker"] == broker {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {node}'s /readyz did not say \"broker\":\"{broker}\" within \
             {BROKER_CONNECT:?}; last answer {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the series `name` with exactly `labels` (in any order) in
/// one scrape of the metrics listener at `addr`, if it is there.
pub async fn metric(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("the metrics listener answers")
        .text()
        .await
        .expect("a metrics scrape");
    let wanted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.strip_suffix('}')?)),
                None => (series, BTreeMap::new()),
            };
            let same_labels = series_labels.len() == wanted.len()
                && wanted
                    .iter()
                    .all(|(k, v)| series_labels.get(k).is_some_and(|got| got == v));
            (series_name == name && same_labels).then(|| {
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("not a value: {line}"))
            })
        })
}

/// `a="x",b="y"` (values without commas or escaped quotes: ours).
fn parse_labels(text: &str) -> BTreeMap<&str, String> {
    text.split(',')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key, value.trim_matches('"').to_owned()))
        })
        .collect()
}
