//! The `sealpost-loadtest` command: parse a scenario, sign up its accounts,
//! run it across workers, print one JSON result on stdout. Progress goes to
//! stderr. `chart` instead draws SVG charts from a directory of results.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use sealpost_loadtest::client::{self, Account, Api, Target};
use sealpost_loadtest::metrics::{Counts, Elision};
use sealpost_loadtest::scenario::{attack, drain, groups, wakeups};
use sealpost_loadtest::stats::{Report, now_nanos};
use sealpost_loadtest::{
    Fanout, Kill, Plan, Soak, Spec, Struck, Traffic, chart, execute, hwm_kib, open_fds, rss_kib,
    shell, worker,
};
use serde_json::{Value, json};
use tokio::sync::oneshot;

#[derive(Parser)]
#[command(
    name = "sealpost-loadtest",
    version,
    about = "Load generator for sealpost"
)]
struct Cli {
    /// Server to drive (repeat for several nodes of a cluster: sockets are
    /// spread over them, and pairs cross between them). Loopback addresses
    /// only.
    #[arg(long = "url", global = true, default_value = "http://127.0.0.1:8080")]
    urls: Vec<String>,
    /// Worker processes to spread the sockets over (each holds at most what
    /// its open-file limit allows, about 19,900).
    #[arg(long, global = true, default_value_t = 1)]
    workers: usize,
    /// Spread sockets over this many source addresses, 127.0.0.2 and up
    /// (each gives ~28,000 ephemeral ports); 0 lets the OS choose.
    #[arg(long, global = true, default_value_t = 0)]
    sources: u8,
    /// Keep accounts here between runs: reruns refresh their tokens instead
    /// of signing up again (which costs the server two argon2 hashes each).
    #[arg(long, global = true)]
    token_cache: Option<PathBuf>,
    /// Sign-ups and logins at once.
    #[arg(long, global = true, default_value_t = 8)]
    signup_concurrency: usize,
    /// The server's pid, to report its memory (VmRSS) before and after.
    /// Repeat it for several nodes, one per --url in the same order, for
    /// each node's memory per socket.
    #[arg(long = "server-pid", global = true)]
    server_pids: Vec<u32>,
    /// Account name prefix, so runs against one server can keep apart.
    #[arg(long, global = true, default_value = "lt")]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open N authenticated sockets and hold them.
    Connect {
        #[arg(long)]
        conns: usize,
        /// Seconds to hold them once all are ready.
        #[arg(long, default_value_t = 10)]
        hold: u64,
        /// Distinct accounts the sockets use (default: one per socket).
        #[arg(long)]
        users: Option<usize>,
    },
    /// Sender/receiver pairs over WebSockets at a total rate (optionally
    /// several devices per receiver; across nodes with several --url,
    /// optionally killing one mid-run).
    Pairs {
        #[command(flatten)]
        traffic: Traffic,
        #[command(flatten)]
        fanout: Fanout,
        #[command(flatten)]
        kill: Kill,
        /// A node's Prometheus endpoint (http://METRICS_ADDR/metrics),
        /// scraped before and after the measured phase for the ack
        /// window's figures (`results.elision`). Repeat it for every node
        /// of a cluster: their counts are summed.
        #[arg(long = "metrics-url")]
        metrics_urls: Vec<String>,
    },
    /// Queue users × per-user messages for offline users, then time the drain.
    Drain {
        #[arg(long)]
        users: usize,
        #[arg(long)]
        per_user: usize,
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
    /// The pairs traffic over the REST fallback.
    Poll(Traffic),
    /// N clients connected; the server restarts; time until all are back.
    Storm {
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        users: Option<usize>,
        /// Shell command that restarts the server, run once all are ready.
        /// Without it, restart the server by hand.
        #[arg(long)]
        restart_cmd: Option<String>,
        /// How long clients keep trying to come back.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Messages pushed before the restart (to distinct users), which must
        /// come back after it.
        #[arg(long, default_value_t = 200)]
        markers: usize,
        /// Messages queued for each user before its clients first connect
        /// (sent while they are offline; the clients never ack), which the
        /// restarted server must deliver again to every socket.
        #[arg(long, default_value_t = 0)]
        backlog: usize,
        /// Body size of the --backlog messages, in bytes.
        #[arg(long, default_value_t = 256)]
        backlog_size: usize,
        /// A file holding the server's pid, rewritten by --restart-cmd with
        /// the new server's: read at every memory sample, for the peak RSS
        /// of the restarted server (VmRSS and VmHWM). Without it,
        /// --server-pid is sampled (which a restart ends).
        #[arg(long)]
        server_pid_file: Option<PathBuf>,
        /// Milliseconds between the memory samples of the storm.
        #[arg(long, default_value_t = 100)]
        rss_sample_ms: u64,
    },
    /// Mixed traffic for a long time (sends over WebSockets and REST, acks,
    /// reconnects, sign-ups, logouts); with --server-pid, the server's RSS
    /// and open files over time.
    Soak(Soak),
    /// An attack of issue 24 beside a legitimate client (one process, its
    /// own accounts, signed up from addresses of their own): what the
    /// attacker got and what the legitimate client saw. Against a server
    /// with its default limits; `loadtest/run-attacks.sh` runs them all.
    Attack {
        #[command(subcommand)]
        attack: attack::Attack,
    },
    /// Online senders to offline recipients whose devices have Web Push
    /// targets at a fake push service in this process (or none, with
    /// --no-targets): send latency, wake-ups sent and coalesced.
    Wakeups(wakeups::Args),
    /// Group messages (issue 27): G groups of M members with D devices,
    /// all online, at a rate of group messages sent as one multi-recipient
    /// send each (or, with --single, as single sends): push latency,
    /// deliveries, send latency.
    Groups(groups::Args),
    /// Draw SVG charts from a directory of JSON results: push-latency.svg,
    /// sent-latency.svg, memory-per-socket.svg, elided.svg (each when
    /// some result has its data). Needs no server.
    Chart {
        /// Where the results are (one JSON per run; other files are skipped).
        #[arg(long = "in", default_value = "target/bench")]
        input: PathBuf,
        /// Where the charts go (created if missing).
        #[arg(long, default_value = "docs/bench")]
        out: PathBuf,
    },
    /// (internal) Run one shard of a plan written by the parent.
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        shard: usize,
        #[arg(long)]
        of: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Worker { plan, shard, of } => return worker(plan.clone(), *shard, *of).await,
        Command::Chart { input, out } => {
            let runs = chart::load(input)?;
            let written = chart::write_all(&runs, out)?;
            eprintln!(
                "{} results in {}: {} charts written to {}",
                runs.len(),
                input.display(),
                written.len(),
                out.display()
            );
            println!("{}", json!({ "charts": written }));
            return Ok(());
        }
        Command::Attack { attack } => {
            let target = Target::parse(&cli.urls[0])?;
            let pid = cli.server_pids.first().copied();
            let result = attack::run(attack, &target, pid, &cli.prefix).await?;
            println!("{}", serde_json::to_string_pretty(&result)?);
            return Ok(());
        }
        _ => {}
    }
    let targets = cli
        .urls
        .iter()
        .map(|u| Target::parse(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pids = cli.server_pids.clone();
    if pids.len() > 1 && pids.len() != targets.len() {
        anyhow::bail!(
            "{} --server-pid for {} --url: give one per node, in the same order",
            pids.len(),
            targets.len()
        );
    }
    let api = Api::new(targets[0].clone());
    if let Command::Groups(args) = &cli.command {
        let result = groups::main(
            args,
            groups::Common {
                api,
                target: targets[0].clone(),
                pids: &pids,
                prefix: &cli.prefix,
                token_cache: cli.token_cache.as_deref(),
                signup_concurrency: cli.signup_concurrency,
            },
        )
        .await?;
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    if let Command::Wakeups(args) = &cli.command {
        let plan = Plan {
            spec: Spec::Connect {
                conns: 0,
                hold: Duration::ZERO,
            },
            targets: targets.clone(),
            sources: client::sources(cli.sources),
            accounts: Vec::new(),
        };
        let result = wakeups::main(
            args,
            wakeups::Common {
                api,
                plan,
                workers: cli.workers,
                pids: &pids,
                prefix: &cli.prefix,
                token_cache: cli.token_cache.as_deref(),
                signup_concurrency: cli.signup_concurrency,
            },
        )
        .await?;
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    let accounts = |prefix: String, count: usize| {
        let (api, cache, concurrency) =
            (api.clone(), cli.token_cache.clone(), cli.signup_concurrency);
        async move { client::accounts(&api, &prefix, count, concurrency, cache.as_deref()).await }
    };
    let mut plan = Plan {
        spec: Spec::Connect {
            conns: 0,
            hold: Duration::ZERO,
        },
        targets: targets.clone(),
        sources: client::sources(cli.sources),
        accounts: Vec::new(),
    };
    let p = &cli.prefix;
    let mut params = json!({});
    let mut between: BoxFuture<'static, ()> = async {}.boxed();
    let mut after_setup_rss = None::<Shared<Vec<Option<u64>>>>;
    let mut memory_samples = None::<Shared<Vec<(u64, u64)>>>;
    let mut struck = None::<oneshot::Receiver<Struck>>;
    let mut scrapes = None::<Shared<Scrapes>>;
    let mut peak = None::<(PeakSampler, Shared<Option<u64>>)>;
    let mut soak_samples = None::<(
        Shared<Vec<FdSample>>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    )>;
    match &cli.command {
        Command::Connect { conns, hold, users } => {
            plan.spec = Spec::Connect {
                conns: *conns,
                hold: Duration::from_secs(*hold),
            };
            plan.accounts = accounts(format!("{p}-u-"), users.unwrap_or(*conns).max(1)).await?;
            params = json!({ "conns": conns, "hold_s": hold, "users": plan.accounts.len() });
            let (pids, hold) = (pids.clone(), Duration::from_secs(*hold));
            let measured = Shared::default();
            after_setup_rss = Some(measured.clone());
            // While the sockets open, the memory is sampled for the curve.
            let samples = Shared::default();
            memory_samples = Some(samples.clone());
            let sampler = MemorySampler::start(pids.clone(), samples);
            between = async move {
                sampler.stop();
                // Let the server settle (idle tasks, allocator) before reading.
                tokio::time::sleep(Duration::from_secs(1)).await;
                *measured.lock().unwrap() = pids.iter().map(|&pid| rss_kib(pid)).collect();
                tokio::time::sleep(hold.saturating_sub(Duration::from_secs(1))).await;
            }
            .boxed();
        }
        Command::Pairs {
            traffic,
            fanout,
            kill,
            metrics_urls,
        } => {
            if kill.kill_after.is_some() && !kill.reconnect() {
                anyhow::bail!("--kill-after needs --kill-pid or --restart-cmd");
            }
            plan.spec = Spec::Pairs(*traffic, *fanout, kill.clone());
            let devices = fanout.devices();
            // Receivers of an N-device run have names of their own: a device
            // that a run opens no socket for queues copies nobody acks, so
            // single-device runs (and poll, on the same accounts) must never
            // meet a multi-device recipient.
            let prefix = if devices > 1 {
                format!("{p}-p{devices}d-")
            } else {
                format!("{p}-p-")
            };
            // Senders (even accounts) keep one device; receivers get N.
            let wanted = move |n: usize| if n % 2 == 1 { devices } else { 1 };
            let (all, device_setup) = client::accounts_with_devices(
                &api,
                &prefix,
                2 * traffic.pairs,
                wanted,
                cli.signup_concurrency,
                cli.token_cache.as_deref(),
            )
            .await?;
            plan.accounts = all;
            params = serde_json::to_value(traffic)?;
            params["devices"] = json!(devices);
            params["envelopes"] = json!(fanout.envelopes);
            params["nodes"] = json!(targets.len());
            if devices > 1 {
                params["device_setup"] = serde_json::to_value(device_setup)?;
            }
            if !metrics_urls.is_empty() {
                params["metrics_urls"] = json!(metrics_urls);
                scrapes = Some(Shared::default());
            }
            if kill.reconnect() {
                params["kill_pid"] = json!(kill.kill_pid);
                params["restart_cmd"] = json!(kill.restart_cmd);
                params["kill_after_s"] = json!(kill.kill_after);
            }
            let strike = kill.reconnect().then(|| {
                let (tx, rx) = oneshot::channel();
                struck = Some(rx);
                (kill.clone(), tx)
            });
            between = pairs_action(metrics_urls.clone(), scrapes.clone(), strike).boxed();
        }
        Command::Poll(traffic) => {
            plan.spec = Spec::Poll(*traffic);
            plan.accounts = accounts(format!("{p}-p-"), 2 * traffic.pairs).await?;
            params = serde_json::to_value(traffic)?;
        }
        Command::Drain {
            users,
            per_user,
            size,
        } => {
            plan.spec = Spec::Drain {
                users: *users,
                per_user: *per_user,
            };
            plan.accounts = accounts(format!("{p}-d-"), *users).await?;
            let sender = accounts(format!("{p}-dsend-"), 1).await?.remove(0);
            let queue_started = std::time::Instant::now();
            let queued = drain::fill(
                &targets[0],
                &sender,
                &plan.accounts,
                *per_user,
                (*size).max(16),
            )
            .await?;
            let queue_secs = queue_started.elapsed().as_secs_f64();
            params = json!({ "users": users, "per_user": per_user, "size": size,
                             "queued": queued, "queue_s": queue_secs, "queue_rate": queued as f64 / queue_secs });
        }
        Command::Storm {
            conns,
            users,
            restart_cmd,
            timeout,
            markers,
            backlog,
            backlog_size,
            server_pid_file,
            rss_sample_ms,
        } => {
            plan.spec = Spec::Storm {
                conns: *conns,
                restart_cmd: restart_cmd.clone(),
                timeout: Duration::from_secs(*timeout),
            };
            plan.accounts = accounts(format!("{p}-u-"), users.unwrap_or(*conns).max(1)).await?;
            let marker_sender = accounts(format!("{p}-ssend-"), 1).await?.remove(0);
            params = json!({ "conns": conns, "users": plan.accounts.len(), "restart_cmd": restart_cmd,
                             "markers": markers, "backlog": backlog, "backlog_size": backlog_size });
            if *backlog > 0 {
                // Queued while every client is offline: their first connect
                // reads it, never acks it, and the restarted server must
                // send it to every socket again.
                let started = std::time::Instant::now();
                let queued = drain::fill(
                    &targets[0],
                    &marker_sender,
                    &plan.accounts,
                    *backlog,
                    (*backlog_size).max(16),
                )
                .await?;
                let secs = started.elapsed().as_secs_f64();
                params["backlog_queued"] = json!(queued);
                params["backlog_queue_s"] = json!(secs);
            }
            let watch = PeakWatch {
                pid_file: server_pid_file.clone(),
                pid: pids.first().copied(),
                every: Duration::from_millis((*rss_sample_ms).max(10)),
                limit: (timeout * 1000 / rss_sample_ms.max(&10)) as usize + 10_000,
            };
            let restarted_at = Shared::default();
            if watch.pid_file.is_some() || watch.pid.is_some() {
                peak = Some((watch.start(), restarted_at.clone()));
            }
            between = storm_action(
                api.clone(),
                marker_sender,
                plan.accounts.clone(),
                *markers,
                restart_cmd.clone(),
                restarted_at,
            )
            .boxed();
        }
        Command::Soak(soak) => {
            let mut soak = soak.clone();
            // Sign-ups of this run never meet an earlier run's accounts.
            soak.signup_prefix = format!("{p}-soak{}-n", now_nanos() / 1_000_000_000);
            plan.accounts = accounts(format!("{p}-soak-"), soak.clients.max(2)).await?;
            params = serde_json::to_value(&soak)?;
            let samples = Shared::default();
            let sampler = FdSampler {
                pids: pids.clone(),
                every: Duration::from_secs(soak.sample_every.max(1)),
                limit: (soak.duration_s / soak.sample_every.max(1)) as usize + 1_000,
            };
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            soak_samples = Some((samples.clone(), stop.clone()));
            between = async move {
                if !sampler.pids.is_empty() {
                    std::thread::spawn(move || sampler.run(&samples, &stop));
                }
            }
            .boxed();
            plan.spec = Spec::Soak(soak);
        }
        Command::Worker { .. }
        | Command::Chart { .. }
        | Command::Attack { .. }
        | Command::Wakeups(_)
        | Command::Groups(_) => {
            unreachable!("handled above")
        }
    }

    // The baseline is taken with the accounts ready and no socket open yet.
    let rss_start: Vec<Option<u64>> = pids.iter().map(|&pid| rss_kib(pid)).collect();
    let report = execute(&plan, cli.workers, between).await?;
    let peak = peak.map(|(sampler, restarted_at)| {
        let samples = sampler.stop();
        let restarted_at = *restarted_at.lock().unwrap();
        peak_summary(&samples, restarted_at)
    });
    let soak_samples = soak_samples.map(|(samples, stop)| {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        samples.lock().unwrap().clone()
    });
    // A restart command still running when the clients are done is waited
    // for, so that its outcome is known and the server is back.
    let struck = match struck {
        Some(rx) => Some(
            tokio::time::timeout(STRIKE_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok),
        ),
        None => None,
    };
    let rss_end = after_setup_rss
        .map(|m| m.lock().unwrap().clone())
        .unwrap_or_default();
    // Every confirmed copy was counted before its `sent` went out, so the
    // scrape can follow the run at once.
    let elision = match (&cli.command, &scrapes) {
        (Command::Pairs { metrics_urls, .. }, Some(scrapes)) => {
            let after = Counts::scrape(metrics_urls).await;
            let scrapes = scrapes.lock().unwrap().clone();
            match (scrapes.before, after) {
                (Some(before), Ok(after)) => Some(Elision::between(
                    &before,
                    scrapes.before_kill.as_ref(),
                    &after,
                )),
                (_, Err(e)) => {
                    eprintln!("no elision figures: {e:#}");
                    None
                }
                (None, _) => None,
            }
        }
        _ => None,
    };
    let mut result = summarise(
        &cli.command,
        &report,
        params,
        Memory {
            urls: &cli.urls,
            pids: &pids,
            before: &rss_start,
            with_conns: &rss_end,
        },
        cli.workers,
    );
    if let Some(struck) = struck {
        result["results"]["node_killed"] = json!(struck.map(|s| s.killed));
        if let Command::Pairs { kill, .. } = &cli.command
            && kill.restart_cmd.is_some()
        {
            result["results"]["restarted"] = json!(struck.and_then(|s| s.restarted));
        }
    }
    if scrapes.is_some() {
        result["results"]["elision"] = json!(elision);
    }
    if let Some(peak) = peak {
        result["results"]["server_memory"] = peak;
    }
    if let Some(samples) = soak_samples {
        result["results"]["server"] = soak_server_summary(&samples);
    }
    if let Some(samples) = memory_samples {
        let samples = samples.lock().unwrap().clone();
        let (before, with_conns) = Memory {
            urls: &cli.urls,
            pids: &pids,
            before: &rss_start,
            with_conns: &rss_end,
        }
        .totals();
        if !pids.is_empty() {
            result["results"]["memory_curve"] =
                json!(memory_curve(&samples, before, with_conns, &report));
        }
    }
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// A value the parent's gate action fills in and the summary reads.
type Shared<T> = std::sync::Arc<std::sync::Mutex<T>>;

/// The elision counters scraped during a `pairs` run: at the gate, and
/// just before the restart command (whose new server counts from zero).
#[derive(Clone, Default)]
struct Scrapes {
    before: Option<Counts>,
    before_kill: Option<Counts>,
}

/// How long after the run a kill that has not finished (a restart command
/// still waiting for its server) is waited for; then its outcome is `null`.
const STRIKE_WAIT: Duration = Duration::from_secs(60);

/// At the pairs' gate: scrape the metrics (when asked), then start the
/// kill's clock (when there is one), to report its outcome on `strike`'s
/// sender. The kill goes off during the measured phase, so it is spawned
/// here and the gate opens at once.
async fn pairs_action(
    metrics_urls: Vec<String>,
    scrapes: Option<Shared<Scrapes>>,
    strike: Option<(Kill, oneshot::Sender<Struck>)>,
) {
    if let Some(scrapes) = &scrapes {
        match Counts::scrape(&metrics_urls).await {
            Ok(counts) => scrapes.lock().unwrap().before = Some(counts),
            Err(e) => eprintln!("no elision figures: {e:#}"),
        }
    }
    let Some((kill, struck)) = strike else {
        return;
    };
    tokio::spawn(async move {
        tokio::time::sleep(kill.after()).await;
        if let Some(scrapes) = &scrapes
            && kill.restart_cmd.is_some()
        {
            // The last count of the server about to die.
            let counts = Counts::scrape(&metrics_urls).await.ok();
            scrapes.lock().unwrap().before_kill = counts;
        }
        let _ = struck.send(kill.strike().await);
    });
}

/// Memory samples while a `connect` run's sockets open: one per
/// [`MEMORY_SAMPLE_EVERY`], until stopped at the gate, at most
/// [`MEMORY_SAMPLES_MAX`].
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Ten minutes of samples: longer than any connect phase.
const MEMORY_SAMPLES_MAX: usize = 2_400;

/// Reads the servers' memory on a thread of its own: with one worker the
/// sockets open on this process's runtime, which leaves a task there no
/// time to sample on schedule (its missed ticks came in a burst, several
/// samples at one moment).
struct MemorySampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl MemorySampler {
    /// Appends (ns since the epoch, VmRSS in KiB summed over `pids`) to
    /// `samples` every [`MEMORY_SAMPLE_EVERY`]; a reading that fails (a
    /// pid gone) is skipped. Without pids, nothing runs.
    fn start(pids: Vec<u32>, samples: Shared<Vec<(u64, u64)>>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        if !pids.is_empty() {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for _ in 0..MEMORY_SAMPLES_MAX {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let at = now_nanos();
                    if let Some(total) = pids.iter().map(|&pid| rss_kib(pid)).sum::<Option<u64>>() {
                        samples.lock().unwrap().push((at, total));
                    }
                    std::thread::sleep(MEMORY_SAMPLE_EVERY);
                }
            });
        }
        Self { stop }
    }

    /// Stops the sampling and returns at once: the thread ends within one
    /// interval (a sample it was taking may still land, with every socket
    /// open by then).
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `results.memory_curve`: for each sample taken while the sockets opened,
/// the sockets ready by then (from the shards' `ready` timeline), the
/// memory, and KiB per socket over the baseline; then the reading at the
/// gate with every socket open. Samples before the first socket are left
/// out.
fn memory_curve(
    samples: &[(u64, u64)],
    before: Option<u64>,
    with_conns: Option<u64>,
    report: &Report,
) -> Vec<Value> {
    let point = |sockets: u64, rss: u64| {
        json!({
            "sockets": sockets,
            "rss_kib": rss,
            "kib_per_socket": kib_per_conn(before, Some(rss), sockets),
        })
    };
    let mut curve: Vec<Value> = samples
        .iter()
        .map(|&(at, rss)| (report.marked_by("ready", at), rss))
        .filter(|&(sockets, _)| sockets > 0)
        .map(|(sockets, rss)| point(sockets, rss))
        .collect();
    let ready = report.count("ready");
    if let Some(rss) = with_conns
        && ready > 0
    {
        curve.push(point(ready, rss));
    }
    curve
}

/// The nodes' memory (VmRSS, KiB) before the sockets opened and with them
/// open, per `--server-pid` (in `--url` order).
struct Memory<'a> {
    urls: &'a [String],
    pids: &'a [u32],
    before: &'a [Option<u64>],
    with_conns: &'a [Option<u64>],
}

impl Memory<'_> {
    /// Both readings of every pid, summed; `None` if any is missing.
    fn totals(&self) -> (Option<u64>, Option<u64>) {
        let sum = |values: &[Option<u64>]| {
            (!values.is_empty() && values.len() == self.pids.len())
                .then(|| values.iter().copied().sum::<Option<u64>>())
                .flatten()
        };
        (sum(self.before), sum(self.with_conns))
    }

    /// One entry per node: its URL, pid, sockets ready on it, memory
    /// before and with them, KiB per socket. Empty unless several `--url`.
    fn per_node(&self, report: &Report) -> Vec<Value> {
        if self.urls.len() < 2 {
            return Vec::new();
        }
        self.urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let ready = report.count(&format!("ready_node{i}"));
                // Several pids name the nodes in order; one pid can only
                // be read for all of them, above.
                let (before, with) = if self.pids.len() == self.urls.len() {
                    (
                        self.before.get(i).copied().flatten(),
                        self.with_conns.get(i).copied().flatten(),
                    )
                } else {
                    (None, None)
                };
                json!({
                    "url": url,
                    "pid": (self.pids.len() == self.urls.len()).then(|| self.pids[i]),
                    "ready": ready,
                    "server_rss_before_kib": before,
                    "server_rss_with_conns_kib": with,
                    "server_kib_per_conn": kib_per_conn(before, with, ready),
                })
            })
            .collect()
    }
}

fn kib_per_conn(before: Option<u64>, with: Option<u64>, ready: u64) -> Value {
    match (before, with) {
        (Some(a), Some(b)) if ready > 0 => json!(b.saturating_sub(a) as f64 / ready as f64),
        _ => Value::Null,
    }
}

/// At the storm's gate: push one marker to each of `markers` users (they are
/// online and will not ack), then restart the server.
async fn storm_action(
    api: Api,
    sender: Account,
    users: Vec<Account>,
    markers: usize,
    restart_cmd: Option<String>,
    restarted_at: Shared<Option<u64>>,
) {
    for user in users.iter().take(markers) {
        if let Err(e) = api.send(&sender, user.user_id, b"storm-marker-0123").await {
            eprintln!("marker not sent: {e}");
        }
    }
    // Let the pushes reach the clients before the server goes away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    match restart_cmd {
        Some(cmd) => {
            eprintln!("restarting the server: {cmd}");
            if shell(&cmd).await != Some(true) {
                eprintln!("restart command failed");
            }
            // The new server answers: samples from now on are its own.
            *restarted_at.lock().unwrap() = Some(now_nanos());
        }
        None => eprintln!("all clients ready: restart the server now"),
    }
}

fn summarise(
    command: &Command,
    report: &Report,
    params: Value,
    memory: Memory<'_>,
    workers: usize,
) -> Value {
    let rate = |count: u64, secs: f64| {
        if secs > 0.0 {
            (count as f64 / secs).round()
        } else {
            0.0
        }
    };
    let scenario = match command {
        Command::Connect { .. } => "connect",
        Command::Pairs { .. } => "pairs",
        Command::Drain { .. } => "drain",
        Command::Poll(_) => "poll",
        Command::Storm { .. } => "storm",
        Command::Soak(_) => "soak",
        Command::Worker { .. }
        | Command::Chart { .. }
        | Command::Attack { .. }
        | Command::Wakeups(_)
        | Command::Groups(_) => {
            unreachable!("handled in main")
        }
    };
    let mut result = json!({
        "scenario": scenario,
        "params": params,
        "workers": workers,
        "counters": report.counters,
    });
    let derived = match command {
        Command::Connect { conns, .. } => {
            let ready = report.count("ready");
            let (rss_start, rss_end) = memory.totals();
            let per_conn = kib_per_conn(rss_start, rss_end, ready);
            let per_node = memory.per_node(report);
            let mut connect = json!({
                "ready": ready,
                "failed": *conns as u64 - ready.min(*conns as u64),
                "all_ready_s": report.seconds("all_ready"),
                "ready_per_s": rate(ready, report.seconds("all_ready")),
                "connect_ready_latency": report.latency("connect_ready").summary(),
                "dropped_while_held": report.count("dropped_while_held"),
                "server_rss_before_kib": rss_start,
                "server_rss_with_conns_kib": rss_end,
                "server_kib_per_conn": per_conn,
            });
            if !per_node.is_empty() {
                connect["per_node"] = json!(per_node);
            }
            connect
        }
        Command::Pairs { .. } | Command::Poll(_) => {
            let durable = if report.latencies.contains_key("send_to_sent") {
                "send_to_sent"
            } else {
                "send_to_201"
            };
            let mut traffic = json!({
                "sent": report.count("sent"),
                "confirmed": report.count("confirmed"),
                "achieved_msgs_per_s": rate(report.count("confirmed"), report.seconds("sending")),
                "received": report.count("received"),
                "lost": report.count("lost"),
                "duplicated": report.count("duplicated"),
                "out_of_order": report.count("out_of_order"),
                "push_latency": report.latency("push").summary(),
                "durable_latency": report.latency(durable).summary(),
                // The full histograms (hdrhistogram V2, base64), for charts
                // and for percentiles the summaries leave out.
                "push_latency_hist": report.latency("push").encode(),
                "durable_latency_hist": report.latency(durable).encode(),
            });
            if let Command::Pairs { fanout, kill, .. } = command {
                // Worker processes' probes merged: the worst of them shows.
                traffic["generator_lag"] = report.latency("generator_lag").summary();
                let devices = fanout.devices();
                // Every device gets its own copy: deliveries are messages ×
                // devices, counted once per device (duplicates left out),
                // and push latency above covers all of them.
                traffic["devices"] = json!(devices);
                traffic["deliveries_expected"] = json!(report.count("confirmed") * devices as u64);
                traffic["delivered"] = json!(report.count("delivered"));
                traffic["achieved_deliveries_per_s"] =
                    json!(rate(report.count("delivered"), report.seconds("sending")));
                traffic["receipts_seen"] = json!(report.count("receipts_seen"));
                if kill.reconnect() {
                    // A node died mid-run: what its clients went through.
                    // `lost` above is confirmed and in neither the live
                    // stream nor the queue read at the end.
                    traffic["unconfirmed"] = json!(report.count("unconfirmed"));
                    traffic["unconfirmed_delivered"] = json!(report.count("unconfirmed_delivered"));
                    traffic["redelivered"] = json!(report.count("redelivered"));
                    traffic["missing_live"] = json!(report.count("missing_live"));
                    traffic["recovered_from_queue"] = json!(report.count("recovered_from_queue"));
                    traffic["sender_reconnects"] = json!(report.count("sender_reconnects"));
                    traffic["receiver_reconnects"] = json!(report.count("receiver_reconnects"));
                    traffic["reconnect_latency"] = report.latency("reconnect").summary();
                    traffic["push_latency_reconnected"] =
                        report.latency("push_reconnected").summary();
                }
                if devices > 1 {
                    traffic["per_device"] = (1..=devices)
                        .map(|k| {
                            json!({
                                "device": k,
                                "received": report.count(&format!("device{k}_received")),
                                "lost": report.count(&format!("device{k}_lost")),
                                "duplicated": report.count(&format!("device{k}_duplicated")),
                                "out_of_order": report.count(&format!("device{k}_out_of_order")),
                                "push_latency": report.latency(&format!("push_device{k}")).summary(),
                            })
                        })
                        .collect();
                }
            }
            traffic
        }
        Command::Drain { .. } => json!({
            "acked": report.count("acked"),
            "drained_users": report.count("drained_users"),
            "incomplete_users": report.count("incomplete_users"),
            "drain_s": report.seconds("drain"),
            "drain_msgs_per_s": rate(report.count("acked"), report.seconds("drain")),
        }),
        Command::Storm { .. } => json!({
            "ready_before": report.count("ready"),
            "back": report.count("back"),
            "not_back": report.count("not_back"),
            "first_drop_to_all_back_s": report.seconds("first_drop_to_all_back"),
            "reconnect_latency": report.latency("reconnect").summary(),
            "lost": report.count("lost"),
            "redelivered": report.count("redelivered"),
            "backlog_read_before": report.count("backlog_before"),
        }),
        Command::Soak(_) => soak_results(report),
        Command::Worker { .. }
        | Command::Chart { .. }
        | Command::Attack { .. }
        | Command::Wakeups(_)
        | Command::Groups(_) => Value::Null,
    };
    result["results"] = derived;
    result
}

/// What the storm's memory sampler reads, and how often.
struct PeakWatch {
    /// Read at every sample: the restart command writes the new pid here.
    pid_file: Option<PathBuf>,
    /// Used when there is no pid file.
    pid: Option<u32>,
    every: Duration,
    /// At most this many samples (the storm's timeout at `every`, and some).
    limit: usize,
}

/// One storm sample: when (ns since the epoch), which pid, its VmRSS and
/// VmHWM in KiB.
#[derive(Clone, Copy)]
struct PeakSample {
    at: u64,
    pid: u32,
    rss: u64,
    hwm: u64,
}

struct PeakSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    samples: Shared<Vec<PeakSample>>,
}

impl PeakWatch {
    /// Samples on a thread of its own, from now until stopped: the storm's
    /// clients keep this runtime busy.
    fn start(self) -> PeakSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let samples: Shared<Vec<PeakSample>> = Shared::default();
        let (flag, out) = (stop.clone(), std::sync::Arc::clone(&samples));
        std::thread::spawn(move || {
            for _ in 0..self.limit {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let pid = match &self.pid_file {
                    Some(file) => std::fs::read_to_string(file)
                        .ok()
                        .and_then(|t| t.trim().parse().ok()),
                    None => self.pid,
                };
                if let Some(pid) = pid
                    && let (Some(rss), Some(hwm)) = (rss_kib(pid), hwm_kib(pid))
                {
                    out.lock().unwrap().push(PeakSample {
                        at: now_nanos(),
                        pid,
                        rss,
                        hwm,
                    });
                }
                std::thread::sleep(self.every);
            }
        });
        PeakSampler { stop, samples }
    }
}

impl PeakSampler {
    fn stop(self) -> Vec<PeakSample> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.samples.lock().unwrap().clone()
    }
}

/// `results.server_memory` of a storm: the server's memory before the
/// restart and the restarted server's peak (the most of its sampled VmRSS
/// and its VmHWM, which also covers the moments between samples), with a
/// one-per-second curve.
fn peak_summary(samples: &[PeakSample], restarted_at: Option<u64>) -> Value {
    let Some(first) = samples.first() else {
        return Value::Null;
    };
    let cut = restarted_at.unwrap_or(u64::MAX);
    // The old server's own samples: the pid file names the new one as soon
    // as it is started, before it answers.
    let before: Vec<&PeakSample> = samples
        .iter()
        .filter(|s| s.at < cut && s.pid == first.pid)
        .collect();
    let after: Vec<&PeakSample> = samples.iter().filter(|s| s.at >= cut).collect();
    let new_pid = after.last().map(|s| s.pid);
    let mut curve = Vec::new();
    let mut next = first.at;
    for s in samples {
        if s.at >= next {
            curve.push(json!({
                "t_s": (s.at - first.at) as f64 / 1e9,
                "pid": s.pid,
                "rss_kib": s.rss,
            }));
            next = s.at + 1_000_000_000;
        }
    }
    json!({
        "samples": samples.len(),
        "interval_ms": samples.windows(2).next().map(|w| (w[1].at - w[0].at) / 1_000_000),
        "pid_before": first.pid,
        "pid_after": new_pid,
        "rss_before_restart_kib": before.last().map(|s| s.rss),
        "peak_before_restart_kib": before.iter().map(|s| s.rss.max(s.hwm)).max(),
        "rss_peak_after_restart_kib": after.iter().map(|s| s.rss).max(),
        "hwm_after_restart_kib": after.iter().map(|s| s.hwm).max(),
        "rss_after_drain_kib": after.last().map(|s| s.rss),
        "peak_after_restart_kib": after.iter().map(|s| s.rss.max(s.hwm)).max(),
        "curve": curve,
    })
}

/// One soak sample of the servers (summed over `--server-pid`): seconds
/// into the traffic, VmRSS in KiB, open file descriptors.
#[derive(Clone, Copy)]
struct FdSample {
    t: f64,
    rss: u64,
    fds: u64,
}

struct FdSampler {
    pids: Vec<u32>,
    every: Duration,
    limit: usize,
}

impl FdSampler {
    /// From the gate until stopped, on a thread of its own, one sample per
    /// `every` (the first at once); a reading that fails is skipped.
    fn run(&self, samples: &Shared<Vec<FdSample>>, stop: &std::sync::atomic::AtomicBool) {
        let started = std::time::Instant::now();
        for n in 0..self.limit {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let rss = self.pids.iter().map(|&p| rss_kib(p)).sum::<Option<u64>>();
            let fds = self.pids.iter().map(|&p| open_fds(p)).sum::<Option<u64>>();
            if let (Some(rss), Some(fds)) = (rss, fds) {
                let t = started.elapsed().as_secs_f64();
                samples.lock().unwrap().push(FdSample { t, rss, fds });
            }
            // On schedule, not drifting by the time a reading took.
            let next = self.every * (n as u32 + 1);
            // Sleep in short steps so a stop is seen soon.
            while started.elapsed() < next && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100).min(next - started.elapsed()));
            }
        }
    }
}

/// Least-squares slope of `y` over `x`, per unit of `x`.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

/// `results.server` of a soak: every sample, and the mean RSS and fds of
/// the first and last window (5 minutes, or a third of a shorter run)
/// with the slope over the whole run.
fn soak_server_summary(samples: &[FdSample]) -> Value {
    let Some(end) = samples.last().map(|s| s.t) else {
        return Value::Null;
    };
    let window = (end / 3.0).min(300.0);
    let mean = |pick: &dyn Fn(&FdSample) -> bool| {
        let chosen: Vec<&FdSample> = samples.iter().filter(|s| pick(s)).collect();
        let n = chosen.len().max(1) as f64;
        json!({
            "samples": chosen.len(),
            "rss_kib": (chosen.iter().map(|s| s.rss as f64).sum::<f64>() / n).round(),
            "fds": (chosen.iter().map(|s| s.fds as f64).sum::<f64>() / n * 10.0).round() / 10.0,
        })
    };
    let per_hour = |f: fn(&FdSample) -> f64| {
        let points: Vec<(f64, f64)> = samples.iter().map(|s| (s.t / 3600.0, f(s))).collect();
        slope(&points).map(|v| (v * 10.0).round() / 10.0)
    };
    json!({
        "window_s": window,
        "first_window": mean(&|s| s.t <= window),
        "last_window": mean(&|s| s.t >= end - window),
        "rss_slope_kib_per_hour": per_hour(|s| s.rss as f64),
        "fds_slope_per_hour": per_hour(|s| s.fds as f64),
        "samples": samples
            .iter()
            .map(|s| json!({ "t_s": (s.t * 10.0).round() / 10.0, "rss_kib": s.rss, "fds": s.fds }))
            .collect::<Vec<_>>(),
    })
}

/// `results` of a soak, from the shards' counters: `op_*` are operations
/// done, `error_*`, `skipped_*` and `closed_by_server_*` go by kind.
fn soak_results(report: &Report) -> Value {
    let by_prefix = |prefix: &str| {
        report
            .counters
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_owned(), json!(v))))
            .collect::<serde_json::Map<String, Value>>()
    };
    let sending = report.seconds("sending");
    json!({
        "ready_before": report.count("ready"),
        "clients_end": report.count("clients_end"),
        "sending_s": sending,
        "achieved_msgs_per_s": if sending > 0.0 { (report.count("confirmed") as f64 / sending).round() } else { 0.0 },
        "operations": by_prefix("op_"),
        "errors": by_prefix("error_"),
        "skipped": by_prefix("skipped_"),
        "closed_by_server": by_prefix("closed_by_server_"),
        "messages": {
            "confirmed": report.count("confirmed"),
            "received_unique": report.count("received_unique"),
            "received": report.count("received"),
            "from_backlogs": report.count("backlog_read"),
            "redelivered": report.count("redelivered"),
            "unconfirmed": report.count("unconfirmed"),
            "lost": report.count("lost"),
        },
    })
}
