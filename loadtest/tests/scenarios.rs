//! A tiny run of every scenario against a real sealpost in this process,
//! through the built `sealpost-loadtest` binary, checking the JSON it
//! prints. Benchmarks are not asserted here: only that the harness measures
//! what it claims (nothing lost, everything counted).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sealpost::{Config, Server};
use sealpost_loadtest::stats::Latency;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    addr: SocketAddr,
    /// Where `/metrics` is served, when the server was started with it.
    metrics: Option<SocketAddr>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start(db: &Path, addr: &str) -> Running {
    start_with(db, addr, &[]).await
}

/// As [`start`], with more server arguments (`--metrics-addr A`, or a
/// limit set back on: `--max-queued-per-device 30`).
async fn start_with(db: &Path, addr: &str, extra: &[&str]) -> Running {
    let url = format!("sqlite://{}", db.display());
    let base = [
        "--addr",
        addr,
        "--database-url",
        &url,
        "--jwt-secret",
        "loadtest-secret-loadtest-secret-0123456789",
        // A load generator is one client doing the work of thousands: the
        // per-IP and per-user limits are off, as in run-benchmarks.sh.
        "--auth-rate-per-minute",
        "0",
        "--send-rate-per-second",
        "0",
        "--max-connections-per-ip",
        "0",
        "--max-http-connections-per-ip",
        "0",
        "--max-unauthenticated-sockets",
        "0",
        "--max-unauthenticated-sockets-per-ip",
        "0",
        "--max-queued-per-device",
        "0",
        // Sign-ups by the hundred: argon2's smallest parameters, which the
        // suite's debug builds accept (release builds refuse them).
        "--insecure-test-hashing",
        if cfg!(debug_assertions) {
            "true"
        } else {
            "false"
        },
    ];
    // A flag in `extra` replaces the base's (clap takes each once).
    let kept = base
        .chunks(2)
        .filter(|pair| !extra.contains(&pair[0]))
        .flatten();
    let config = Config::parse_from(kept.chain(extra)).expect("config");
    let server = Server::bind(config).await.expect("server starts");
    let addr = server.local_addr().unwrap();
    let metrics = server.metrics_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running {
        addr,
        metrics,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// Runs the load tester against `addr` and returns its JSON result.
async fn loadtest(addr: SocketAddr, args: &[&str]) -> Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sealpost-loadtest"));
    command
        .arg("--url")
        .arg(format!("http://{addr}"))
        .args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run sealpost-loadtest");
    assert!(
        output.status.success(),
        "loadtest failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON result on stdout")
}

fn n(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a count: {value}"))
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn db(&self) -> PathBuf {
        self.dir.path().join("sealpost.db")
    }
    fn file(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_across_workers_and_sources() {
    let fixture = Fixture::new();
    let server = start(&fixture.db(), "127.0.0.1:0").await;
    let pid = std::process::id().to_string();
    let cache = fixture.file("cache.json");
    let result = loadtest(
        server.addr,
        &[
            "--workers",
            "2",
            "--sources",
            "2",
            "--server-pid",
            &pid,
            "--token-cache",
            &cache,
            "connect",
            "--conns",
            "40",
            "--users",
            "8",
            "--hold",
            "1",
        ],
    )
    .await;
    let results = &result["results"];
    assert_eq!(n(&results["ready"]), 40, "{result}");
    assert_eq!(n(&results["failed"]), 0);
    assert_eq!(n(&results["dropped_while_held"]), 0);
    assert_eq!(n(&results["connect_ready_latency"]["count"]), 40);
    assert!(results["server_kib_per_conn"].is_number(), "{result}");
    assert_eq!(result["workers"], 2);

    // A rerun reuses the cached accounts: it refreshes, it does not sign up.
    let cached: Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert_eq!(cached.as_object().unwrap().len(), 8);
    let again = loadtest(
        server.addr,
        &[
            "--token-cache",
            &cache,
            "connect",
            "--conns",
            "8",
            "--users",
            "8",
            "--hold",
            "0",
        ],
    )
    .await;
    assert_eq!(n(&again["results"]["ready"]), 8);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_count_every_message() {
    let fixture = Fixture::new();
    let server = start(&fixture.db(), "127.0.0.1:0").await;
    let result = loadtest(
        server.addr,
        &[
            "pairs",
            "--pairs",
            "4",
            "--rate",
            "400",
            "--duration",
            "2",
            "--size",
            "64",
        ],
    )
    .await;
    let r = &result["results"];
    assert!(n(&r["confirmed"]) > 100, "{result}");
    assert_eq!(n(&r["received"]), n(&r["confirmed"]), "{result}");
    assert_eq!(n(&r["lost"]), 0);
    assert_eq!(n(&r["duplicated"]), 0);
    assert_eq!(n(&r["out_of_order"]), 0);
    assert_eq!(n(&r["push_latency"]["count"]), n(&r["received"]));
    server.stop().await;
}

/// Three devices per recipient: every device gets and acks every message,
/// first with one `body` the server copies, then (a rerun on the token
/// cache, which refreshes every device instead of adding more) with one
/// envelope per device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_with_devices_deliver_to_every_device() {
    let fixture = Fixture::new();
    let server = start(&fixture.db(), "127.0.0.1:0").await;
    let cache = fixture.file("cache.json");
    let run = |envelopes: bool| {
        let cache = cache.clone();
        async move {
            let mut args = vec![
                "--token-cache",
                cache.as_str(),
                "pairs",
                "--pairs",
                "3",
                "--rate",
                "150",
                "--duration",
                "2",
                "--size",
                "64",
                "--devices",
                "3",
            ];
            if envelopes {
                args.push("--envelopes");
            }
            loadtest(server.addr, &args).await
        }
    };
    for (envelopes, added, refreshed) in [(false, 6, 0), (true, 0, 6)] {
        let result = run(envelopes).await;
        let (p, r) = (&result["params"], &result["results"]);
        assert_eq!(n(&p["device_setup"]["added"]), added, "{result}");
        assert_eq!(n(&p["device_setup"]["refreshed"]), refreshed, "{result}");
        assert_eq!(n(&p["device_setup"]["logged_in"]), 0, "{result}");
        assert_eq!(n(&r["devices"]), 3);
        let confirmed = n(&r["confirmed"]);
        assert!(confirmed > 100, "{result}");
        assert_eq!(n(&r["received"]), 3 * confirmed, "{result}");
        assert_eq!(n(&r["delivered"]), 3 * confirmed, "{result}");
        assert_eq!(n(&r["deliveries_expected"]), 3 * confirmed);
        assert_eq!(n(&r["lost"]), 0, "{result}");
        assert_eq!(n(&r["duplicated"]), 0);
        assert_eq!(n(&r["out_of_order"]), 0);
        assert_eq!(n(&r["push_latency"]["count"]), 3 * confirmed);
        assert!(r["achieved_deliveries_per_s"].as_f64().unwrap() > 0.0);
        let per_device = r["per_device"].as_array().expect("per_device");
        assert_eq!(per_device.len(), 3);
        for device in per_device {
            assert_eq!(n(&device["received"]), confirmed, "{result}");
            assert_eq!(n(&device["lost"]), 0, "{result}");
            assert_eq!(n(&device["push_latency"]["count"]), confirmed);
        }
        let send_errors: Vec<_> = result["counters"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with("send_error_"))
            .collect();
        assert!(send_errors.is_empty(), "{result}");
    }
    // The cache keeps one refresh token per device: two extra per receiver.
    let cached: Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    let receiver = &cached["lt-p3d-1"];
    assert_eq!(receiver["devices"].as_array().unwrap().len(), 2, "{cached}");
    assert!(cached["lt-p3d-0"].get("devices").is_none(), "{cached}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_acks_every_queued_message() {
    let fixture = Fixture::new();
    let server = start(&fixture.db(), "127.0.0.1:0").await;
    let result = loadtest(server.addr, &["drain", "--users", "5", "--per-user", "40"]).await;
    let r = &result["results"];
    assert_eq!(n(&result["params"]["queued"]), 200, "{result}");
    assert_eq!(n(&r["acked"]), 200, "{result}");
    assert_eq!(n(&r["drained_users"]), 5);
    assert_eq!(n(&r["incomplete_users"]), 0);
    assert!(r["drain_msgs_per_s"].as_f64().unwrap() > 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_counts_every_message() {
    let fixture = Fixture::new();
    let server = start(&fixture.db(), "127.0.0.1:0").await;
    let result = loadtest(
        server.addr,
        &["poll", "--pairs", "2", "--rate", "100", "--duration", "2"],
    )
    .await;
    let r = &result["results"];
    assert!(n(&r["confirmed"]) > 50, "{result}");
    assert_eq!(n(&r["received"]), n(&r["confirmed"]), "{result}");
    assert_eq!(n(&r["lost"]), 0);
    assert_eq!(n(&r["duplicated"]), 0);
    assert_eq!(n(&r["out_of_order"]), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_brings_everyone_back_with_nothing_lost() {
    let fixture = Fixture::new();
    let server = start(&fixture.db(), "127.0.0.1:0").await;
    let addr = server.addr;
    // The load tester's restart command only drops a file; the test sees it
    // and restarts the server on the same port.
    let signal = fixture.file("restart-now");
    let restart_cmd = format!("touch {signal}");
    // The server is this process, before the restart and after it.
    let pid_file = fixture.file("server.pid");
    std::fs::write(&pid_file, std::process::id().to_string()).unwrap();
    let run = tokio::spawn(async move {
        loadtest(
            addr,
            &[
                "storm",
                "--conns",
                "12",
                "--users",
                "6",
                "--markers",
                "4",
                "--backlog",
                "3",
                "--server-pid-file",
                &pid_file,
                "--timeout",
                "60",
                "--restart-cmd",
                &restart_cmd,
            ],
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(&signal).exists() {
        assert!(Instant::now() < deadline, "the restart command never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
    let restarted = start(&fixture.db(), &addr.to_string()).await;

    let result = run.await.unwrap();
    let r = &result["results"];
    assert_eq!(n(&r["ready_before"]), 12, "{result}");
    assert_eq!(n(&r["back"]), 12, "{result}");
    assert_eq!(n(&r["not_back"]), 0);
    assert_eq!(n(&r["lost"]), 0);
    // Each socket read its user's backlog of 3 before the restart and
    // again after it; each marker went to a user with two sockets.
    assert_eq!(n(&r["backlog_read_before"]), 12 * 3, "{result}");
    assert!(n(&r["redelivered"]) >= 12 * 3 + 8, "{result}");
    assert!(
        n(&r["server_memory"]["peak_after_restart_kib"]) > 0,
        "{result}"
    );
    restarted.stop().await;
}

/// A few seconds of everything the soak does, quickly: every confirmed
/// message arrives, every kind of operation happened, the server's memory
/// and files were sampled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_mixes_traffic_and_loses_nothing() {
    let fixture = Fixture::new();
    let server = start(&fixture.db(), "127.0.0.1:0").await;
    let pid = std::process::id().to_string();
    let result = loadtest(
        server.addr,
        &[
            "--server-pid",
            &pid,
            "soak",
            "--clients",
            "12",
            "--rate",
            "40",
            "--rest-percent",
            "25",
            "--duration",
            "6s",
            "--reconnect-every",
            "1",
            "--reconnect-percent",
            "20",
            "--signup-every",
            "2",
            "--logout-every",
            "2",
            "--logout-all-every",
            "3",
            "--sample-every",
            "1",
        ],
    )
    .await;
    let r = &result["results"];
    let m = &r["messages"];
    assert_eq!(n(&r["ready_before"]), 12, "{result}");
    assert!(n(&m["confirmed"]) > 100, "{result}");
    assert_eq!(n(&m["lost"]), 0, "{result}");
    let ops = &r["operations"];
    for op in [
        "send_ws",
        "send_rest",
        "reconnect",
        "logout",
        "logout_all",
        "login",
        "signup",
        "revoked_socket_closed",
    ] {
        assert!(ops[op].as_u64().unwrap_or(0) > 0, "no {op}: {result}");
    }
    assert!(n(&r["clients_end"]) > 12, "{result}");
    let samples = r["server"]["samples"].as_array().expect("samples");
    assert!(samples.len() >= 5, "{result}");
    assert!(
        samples
            .iter()
            .all(|s| n(&s["rss_kib"]) > 0 && n(&s["fds"]) > 0)
    );
    assert!(r["server"]["first_window"]["rss_kib"].as_f64().unwrap() > 0.0);
    server.stop().await;
}

/// Two `--url`: every sender is on the other URL than its receiver. Here
/// both name one server, so this checks the placement and the counting,
/// not a broker: nothing lost, nothing twice, every push measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_across_two_urls_count_every_message() {
    let fixture = Fixture::new();
    let server = start(&fixture.db(), "127.0.0.1:0").await;
    let url = format!("http://{}", server.addr);
    let result = loadtest(
        server.addr,
        &[
            "--url",
            &url,
            "pairs",
            "--pairs",
            "4",
            "--rate",
            "400",
            "--duration",
            "2",
            "--size",
            "64",
        ],
    )
    .await;
    let r = &result["results"];
    assert_eq!(n(&result["params"]["nodes"]), 2, "{result}");
    assert!(n(&r["confirmed"]) > 100, "{result}");
    assert_eq!(n(&r["received"]), n(&r["confirmed"]), "{result}");
    assert_eq!(n(&r["lost"]), 0);
    assert_eq!(n(&r["duplicated"]), 0);
    assert_eq!(n(&r["out_of_order"]), 0);
    assert_eq!(n(&r["push_latency"]["count"]), n(&r["received"]));
    // Without --kill-pid nothing reconnects, and the result is as before.
    assert!(r.get("node_killed").is_none(), "{result}");
    server.stop().await;
}

/// `--kill-pid`: the load tester kills the process named (a stand-in here)
/// mid-run; the test then restarts the server on its port, so that every
/// socket is lost at once, as on a node that died. Senders and receivers
/// reconnect and go on; every confirmed message arrives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_reconnect_after_a_kill_and_lose_nothing() {
    let fixture = Fixture::new();
    let server = start(&fixture.db(), "127.0.0.1:0").await;
    let addr = server.addr;
    let mut victim = std::process::Command::new("sleep")
        .arg("120")
        .spawn()
        .expect("spawn a stand-in process");
    let pid = victim.id().to_string();
    let run = tokio::spawn(async move {
        loadtest(
            addr,
            &[
                "pairs",
                "--pairs",
                "4",
                "--rate",
                "200",
                "--duration",
                "4",
                "--size",
                "64",
                "--kill-pid",
                &pid,
                "--kill-after",
                "1",
            ],
        )
        .await
    });
    // The kill is the signal: then the server goes away and comes back.
    let deadline = Instant::now() + Duration::from_secs(60);
    while victim.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the stand-in was never killed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
    let restarted = start(&fixture.db(), &addr.to_string()).await;

    let result = run.await.unwrap();
    let r = &result["results"];
    assert_eq!(r["node_killed"], true, "{result}");
    assert!(n(&r["confirmed"]) > 200, "{result}");
    assert!(n(&r["sender_reconnects"]) >= 1, "{result}");
    assert!(n(&r["receiver_reconnects"]) >= 1, "{result}");
    assert_eq!(n(&r["lost"]), 0, "{result}");
    assert_eq!(n(&r["duplicated"]), 0, "{result}");
    assert!(n(&r["delivered"]) >= n(&r["confirmed"]), "{result}");
    assert!(n(&r["reconnect_latency"]["count"]) >= 2, "{result}");
    restarted.stop().await;
}

/// `--metrics-url`: the server's elision counters, scraped before and
/// after the measured phase, account for every confirmed message once:
/// acked inside the ack window (elided) or written. The result carries
/// the full latency histograms too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_report_elision_from_the_servers_metrics() {
    let fixture = Fixture::new();
    let server = start_with(
        &fixture.db(),
        "127.0.0.1:0",
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let metrics_url = format!("http://{}/metrics", server.metrics.expect("metrics on"));
    let result = loadtest(
        server.addr,
        &[
            "pairs",
            "--pairs",
            "4",
            "--rate",
            "400",
            "--duration",
            "2",
            "--size",
            "64",
            "--metrics-url",
            &metrics_url,
        ],
    )
    .await;
    let r = &result["results"];
    let confirmed = n(&r["confirmed"]);
    assert!(confirmed > 100, "{result}");
    assert_eq!(n(&r["lost"]), 0, "{result}");
    let elision = &r["elision"];
    let (elided, written) = (n(&elision["elided"]), n(&elision["written"]));
    assert_eq!(elided + written, confirmed, "{result}");
    let fraction = elision["elided_fraction"].as_f64().expect("a fraction");
    assert!((fraction - elided as f64 / confirmed as f64).abs() < 1e-9);
    assert!(elision.get("restarted").is_none(), "{result}");
    assert_eq!(result["params"]["metrics_urls"][0], metrics_url.as_str());
    // The histograms behind the summaries.
    let push = Latency::decode(r["push_latency_hist"].as_str().unwrap()).unwrap();
    assert_eq!(push.count(), n(&r["received"]));
    let durable = Latency::decode(r["durable_latency_hist"].as_str().unwrap()).unwrap();
    assert_eq!(durable.count(), confirmed);
    server.stop().await;
}

/// `--restart-cmd`: the command (here it drops a file, and returns once a
/// second file says the server is back) stands for kill -9 and start;
/// the test stops the server and starts it again on the same addresses,
/// so every socket is lost at once. Clients reconnect to the one URL;
/// every confirmed message arrives, once, and the elision counts of both
/// servers are added up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_survive_a_restart_of_their_one_server() {
    let fixture = Fixture::new();
    let server = start_with(
        &fixture.db(),
        "127.0.0.1:0",
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let (addr, metrics) = (server.addr, server.metrics.expect("metrics on"));
    let (signal, back) = (fixture.file("restart-now"), fixture.file("back"));
    // Bounded: 30 s of waiting for the test to bring the server back.
    let restart_cmd = format!(
        "touch {signal}; i=0; while [ ! -f {back} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; [ -f {back} ]"
    );
    let metrics_url = format!("http://{metrics}/metrics");
    let run = tokio::spawn(async move {
        loadtest(
            addr,
            &[
                "pairs",
                "--pairs",
                "4",
                "--rate",
                "200",
                "--duration",
                "4",
                "--size",
                "64",
                "--restart-cmd",
                &restart_cmd,
                "--kill-after",
                "1",
                "--metrics-url",
                &metrics_url,
            ],
        )
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Path::new(&signal).exists() {
        assert!(Instant::now() < deadline, "the restart command never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
    let restarted = start_with(
        &fixture.db(),
        &addr.to_string(),
        &["--metrics-addr", &metrics.to_string()],
    )
    .await;
    std::fs::write(&back, b"").unwrap();

    let result = run.await.unwrap();
    let r = &result["results"];
    assert_eq!(r["node_killed"], true, "{result}");
    assert_eq!(r["restarted"], true, "{result}");
    assert!(n(&r["confirmed"]) > 200, "{result}");
    assert!(n(&r["sender_reconnects"]) >= 1, "{result}");
    assert!(n(&r["receiver_reconnects"]) >= 1, "{result}");
    assert_eq!(n(&r["lost"]), 0, "{result}");
    assert_eq!(n(&r["duplicated"]), 0, "{result}");
    assert!(n(&r["delivered"]) >= n(&r["confirmed"]), "{result}");
    assert_eq!(r["elision"]["restarted"], true, "{result}");
    assert!(
        n(&r["elision"]["elided"]) + n(&r["elision"]["written"]) > 0,
        "{result}"
    );
    assert!(result["params"]["restart_cmd"].as_str().is_some());
    restarted.stop().await;
}

/// `connect --server-pid`: memory sampled while the sockets open, each
/// sample with the sockets ready by then; `chart` draws it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_samples_memory_as_sockets_open_and_chart_draws_it() {
    let fixture = Fixture::new();
    // 30 sockets per account: past the default 10 per device.
    let server = start_with(
        &fixture.db(),
        "127.0.0.1:0",
        &["--max-connections-per-user", "0"],
    )
    .await;
    let pid = std::process::id().to_string();
    // Past chart::MIN_SOCKETS_CHARTED, so the chart has a point to draw.
    let conns = 600u64;
    let result = loadtest(
        server.addr,
        &[
            "--server-pid",
            &pid,
            "connect",
            "--conns",
            &conns.to_string(),
            "--users",
            "20",
            "--hold",
            "1",
        ],
    )
    .await;
    let r = &result["results"];
    assert_eq!(n(&r["ready"]), conns, "{result}");
    let curve = r["memory_curve"].as_array().expect("memory_curve");
    assert!(!curve.is_empty(), "{result}");
    let sockets: Vec<u64> = curve.iter().map(|p| n(&p["sockets"])).collect();
    assert!(sockets.windows(2).all(|w| w[0] <= w[1]), "{sockets:?}");
    assert!(sockets.iter().all(|&s| s > 0), "{sockets:?}");
    let last = curve.last().unwrap();
    assert_eq!(n(&last["sockets"]), conns, "{result}");
    assert_eq!(last["rss_kib"], r["server_rss_with_conns_kib"], "{result}");
    assert!(last["kib_per_socket"].is_number(), "{result}");
    server.stop().await;

    let bench = fixture.dir.path().join("bench");
    std::fs::create_dir(&bench).unwrap();
    std::fs::write(
        bench.join("sqlite-connect.json"),
        serde_json::to_vec(&result).unwrap(),
    )
    .unwrap();
    let out = fixture.dir.path().join("charts");
    let output = Command::new(env!("CARGO_BIN_EXE_sealpost-loadtest"))
        .arg("chart")
        .arg("--in")
        .arg(&bench)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run sealpost-loadtest chart");
    assert!(output.status.success(), "{output:?}");
    let charts: Value = serde_json::from_slice(&output.stdout).unwrap();
    let written = charts["charts"].as_array().unwrap();
    assert_eq!(written.len(), 1, "{charts}");
    let svg = std::fs::read_to_string(out.join("memory-per-socket.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    assert!(svg.contains("sqlite-connect"));
}

/// The attacks' outcomes as `sealpost-loadtest attack` counts them: every
/// answer (`ready`, `429`, ...) under its name, adding up to the attempts.
fn outcomes_add_up(tally: &Value) -> u64 {
    let attempts = n(&tally["attempts"]);
    let outcomes = tally["outcomes"].as_object().expect("outcomes");
    assert_eq!(outcomes.values().map(n).sum::<u64>(), attempts, "{tally}");
    attempts
}

/// Item 1 of issue 24, small: an attacker holding the server's four
/// waiting slots (timed out after a second), a legitimate socket every
/// second beside it. Each of its tries is counted as `ready` or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_slots_counts_every_legitimate_upgrade() {
    let fixture = Fixture::new();
    let server = start_with(
        &fixture.db(),
        "127.0.0.1:0",
        &[
            "--max-unauthenticated-sockets",
            "4",
            "--ws-auth-timeout",
            "1s",
        ],
    )
    .await;
    let result = loadtest(
        server.addr,
        &[
            "attack",
            "slots",
            "--slots",
            "4",
            "--duration",
            "3",
            "--every",
            "1",
            "--ramp",
            "1",
        ],
    )
    .await;
    assert_eq!(
        (&result["attack"], n(&result["item"])),
        (&Value::from("slots"), 1)
    );
    let r = &result["results"];
    // The four slots, taken again as the server times them out.
    assert!(
        n(&r["attacker"]["upgrades"]["outcomes"]["101"]) >= 4,
        "{result}"
    );
    outcomes_add_up(&r["attacker"]["upgrades"]);
    assert_eq!(outcomes_add_up(&r["legitimate"]["baseline"]), 3, "{result}");
    let during = &r["legitimate"]["during"];
    assert!(outcomes_add_up(during) >= 2, "{result}");
    for outcome in during["outcomes"].as_object().unwrap().keys() {
        assert!(outcome == "ready" || outcome == "429", "{result}");
    }
    assert!(
        r["summary"]["legitimate"]
            .as_str()
            .unwrap()
            .contains("got ready")
    );
    server.stop().await;
}

/// Item 7, small: two attackers fill a 30-message queue, then the
/// legitimate sender's three sends are each counted, accepted or refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_inbox_lock_counts_every_send() {
    let fixture = Fixture::new();
    let server = start_with(
        &fixture.db(),
        "127.0.0.1:0",
        &["--max-queued-per-device", "30"],
    )
    .await;
    let result = loadtest(
        server.addr,
        &[
            "attack",
            "inbox-lock",
            "--attackers",
            "2",
            "--rate",
            "50",
            "--fill",
            "10",
            "--sends",
            "3",
        ],
    )
    .await;
    let r = &result["results"];
    let sends = &r["attacker"]["sends"];
    assert_eq!(outcomes_add_up(sends), n(&sends["attempts"]));
    assert!(n(&r["attacker"]["accepted"]) >= 1, "{result}");
    assert_eq!(n(&r["attacker"]["accepted"]), n(&sends["outcomes"]["sent"]));
    assert_eq!(outcomes_add_up(&r["legitimate"]["sends"]), 3, "{result}");
    assert!(
        r["attacker"]["errors"].as_array().unwrap().is_empty(),
        "{result}"
    );
    server.stop().await;
}

/// `wakeups --no-targets`: the baseline of issue 26's benchmark. Senders
/// send to recipients that never connect and have no target: every send
/// is confirmed and timed, the fake push service hears nothing, and the
/// server's CPU over the run is read from /proc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_without_targets_time_every_send_and_wake_nobody() {
    let fixture = Fixture::new();
    let server = start_with(
        &fixture.db(),
        "127.0.0.1:0",
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let metrics_url = format!("http://{}/metrics", server.metrics.expect("metrics on"));
    let pid = std::process::id().to_string();
    let result = loadtest(
        server.addr,
        &[
            "--server-pid",
            &pid,
            "wakeups",
            "--senders",
            "4",
            "--recipients",
            "30",
            "--rate",
            "200",
            "--duration",
            "2",
            "--size",
            "64",
            "--no-targets",
            "--metrics-url",
            &metrics_url,
        ],
    )
    .await;
    let r = &result["results"];
    let confirmed = n(&r["confirmed"]);
    assert!(confirmed > 300, "{result}");
    assert_eq!(n(&r["sent"]), confirmed, "{result}");
    assert_eq!(n(&r["senders_ready"]), 4);
    assert_eq!(n(&r["send_latency"]["count"]), confirmed);
    let hist = Latency::decode(r["send_latency_hist"].as_str().unwrap()).unwrap();
    assert_eq!(hist.count(), confirmed);
    // Every send is in the second it was written in.
    let seconds = r["send_p99_by_second"].as_array().unwrap();
    assert_eq!(seconds.len(), 2, "{result}");
    assert_eq!(
        seconds.iter().map(|s| n(&s["sends"])).sum::<u64>(),
        confirmed
    );
    // serde_json's default float parsing may be off in the last digit.
    let per_recipient = r["messages_per_recipient"].as_f64().unwrap();
    assert!(
        (per_recipient - confirmed as f64 / 30.0).abs() < 1e-9,
        "{result}"
    );
    // No target anywhere: nothing woken, every message "coalesced".
    assert_eq!(n(&r["wakeups_sent"]), 0, "{result}");
    assert_eq!(n(&r["fake_push"]["requests"]), 0);
    assert_eq!(r["coalesced_fraction"].as_f64(), Some(1.0));
    let setup = &result["params"]["setup"];
    assert_eq!(
        n(&setup["targets_removed"]) + n(&setup["no_push_api"]),
        30,
        "{result}"
    );
    assert_eq!(n(&setup["targets_registered"]), 0);
    assert_eq!(result["params"]["targets"], false);
    // The server's (here this process's) CPU from the gate to the end.
    let cpu = &r["server_cpu"];
    assert!(cpu["cpu_s"].as_f64().unwrap() > 0.0, "{result}");
    assert!(cpu["wall_s"].as_f64().unwrap() >= 2.0, "{result}");
    assert!(r["loadavg_start"].is_string() && r["loadavg_end"].is_string());
    server.stop().await;
}

/// `wakeups` with targets: each recipient's device gets a subscription at
/// the load tester's fake Web Push service, the server (Web Push on, the
/// fake allowed) wakes each offline device once within the cooldown, and
/// every other message is coalesced, in the fake's counts and in the
/// server's `sealpost_wakeups_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wakeups_wake_each_offline_device_once_and_coalesce_the_rest() {
    let fixture = Fixture::new();
    // The fake's address must be known before the server starts, which
    // allows it.
    let push = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let server = start_with(
        &fixture.db(),
        "127.0.0.1:0",
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--vapid-subject",
            "mailto:loadtest@example.com",
            "--push-allow-hosts",
            &push,
        ],
    )
    .await;
    let metrics_url = format!("http://{}/metrics", server.metrics.expect("metrics on"));
    let result = loadtest(
        server.addr,
        &[
            "wakeups",
            "--senders",
            "4",
            "--recipients",
            "30",
            "--rate",
            "300",
            "--duration",
            "2",
            "--size",
            "64",
            "--push-listen",
            &push,
            "--metrics-url",
            &metrics_url,
        ],
    )
    .await;
    let r = &result["results"];
    let confirmed = n(&r["confirmed"]);
    assert!(confirmed > 450, "{result}");
    assert_eq!(n(&result["params"]["setup"]["targets_registered"]), 30);
    assert_eq!(result["params"]["first_recipient_push"]["kind"], "webpush");
    assert_eq!(result["params"]["vapid_status"], 200);
    // Twenty messages to each device in two seconds, well inside the
    // 30 s cooldown: one wake-up each, and nothing the fake refused.
    let fake = &r["fake_push"];
    assert_eq!(n(&r["wakeups_sent"]), 30, "{result}");
    assert_eq!(n(&fake["requests"]), 30, "{result}");
    assert_eq!(n(&fake["subscriptions_woken"]), 30);
    assert_eq!(n(&r["wakeups_per_recipient_max"]), 1);
    assert!(fake["rejected"].as_object().unwrap().is_empty(), "{result}");
    assert_eq!(n(&fake["urgency"]["high"]), 30, "{result}");
    assert_eq!(n(&fake["with_topic"]), 30);
    let fraction = r["coalesced_fraction"].as_f64().unwrap();
    assert!((fraction - (1.0 - 30.0 / confirmed as f64)).abs() < 1e-9);
    // The server counts the same: 30 sent, the rest coalesced.
    let server_side = &r["server_wakeups"]["by_outcome"];
    assert_eq!(n(&server_side["sent"]), 30, "{result}");
    assert_eq!(n(&server_side["coalesced"]), confirmed - 30, "{result}");
    assert_eq!(n(&r["server_wakeups"]["targets"]), 30, "{result}");
    server.stop().await;
}
