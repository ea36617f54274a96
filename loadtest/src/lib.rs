//! sealpost-loadtest: drives a running sealpost through its public API only,
//! as real clients do, and measures it.
//!
//! # Layout
//!
//! - [`client`]: REST (with backoff and a token cache) and WebSocket clients.
//! - [`stats`]: latency histograms, counters and timelines that merge across
//!   processes.
//! - [`scenario`]: `connect`, `pairs` (optionally with several devices per
//!   recipient; across the nodes of a cluster, optionally killing one, or
//!   killing and restarting a single server), `drain`, `poll`, `storm`
//!   (optionally with a queued backlog per device), `soak` (hours of mixed
//!   traffic), `wakeups` (online senders to offline devices with push
//!   targets).
//! - [`fakepush`]: a fake Web Push service on loopback that mints
//!   subscriptions and counts the wake-ups the server sends them.
//! - [`metrics`]: the server's own counters, scraped from its Prometheus
//!   text before and after a run (the ack window's elided copies).
//! - [`chart`]: SVG charts drawn from a directory of JSON results.
//! - This file: the run itself. A run signs up its accounts, writes a
//!   [`Plan`], and executes it in `--workers` shards: in this process for one
//!   worker, else in child processes of the same binary, each holding its
//!   share of the sockets (one process holds at most ~19,900 sockets under a
//!   20,000 open-file limit). Shards meet at a [`Gate`] between their setup
//!   and their measured phase, where the parent acts (measures memory,
//!   restarts the server, starts the clock), then report; the parent merges
//!   the reports into one JSON result on stdout.

pub mod chart;
pub mod client;
pub mod fakepush;
pub mod metrics;
pub mod scenario;
pub mod stats;

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use client::{Account, Target};
use stats::Report;

/// What to run, with its parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Spec {
    Connect {
        conns: usize,
        hold: Duration,
    },
    Pairs(Traffic, Fanout, Kill),
    Drain {
        users: usize,
        per_user: usize,
    },
    Poll(Traffic),
    Storm {
        conns: usize,
        restart_cmd: Option<String>,
        timeout: Duration,
    },
    Soak(Soak),
    Wakeups(scenario::wakeups::Load),
}

/// The mixed traffic of `soak`: rates are totals over the run (shards
/// share them), periods are in seconds (`--duration 30m` and the like are
/// parsed by [`parse_secs`]).
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct Soak {
    /// Accounts signed up before the run, each holding one socket.
    #[arg(long, default_value_t = 300)]
    pub clients: usize,
    /// Total messages per second, each from a random client to another.
    #[arg(long, default_value_t = 150.0)]
    pub rate: f64,
    /// Percent of the sends that go over REST (`POST /v1/messages`)
    /// instead of the sender's socket.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub rest_percent: u32,
    /// How long the mixed traffic runs (`1800`, `30m`, `1h`, `90s`).
    #[arg(long = "duration", default_value = "30m", value_parser = parse_secs)]
    pub duration_s: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Every this many seconds, `--reconnect-percent` of the sockets are
    /// closed and opened again (after a token refresh); 0: never.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub reconnect_every: u64,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub reconnect_percent: u32,
    /// Every this many seconds one new account signs up (two argon2
    /// hashes), connects and joins the traffic; 0: never.
    #[arg(long, default_value = "20", value_parser = parse_secs)]
    pub signup_every: u64,
    /// Every this many seconds one client logs out (`POST /v1/logout`):
    /// the server closes its socket (4401), it logs in again (an argon2
    /// hash) and reconnects; 0: never.
    #[arg(long, default_value = "15", value_parser = parse_secs)]
    pub logout_every: u64,
    /// The same with `POST /v1/logout-all`; 0: never.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    pub logout_all_every: u64,
    /// With --server-pid: seconds between readings of its VmRSS and open
    /// file descriptors.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    pub sample_every: u64,
    /// Names this run's sign-ups apart from earlier runs' (set by the
    /// parent).
    #[arg(skip)]
    pub signup_prefix: String,
}

impl Soak {
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_s)
    }
}

/// Seconds from `90`, `90s`, `30m` or `2h`.
pub fn parse_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text}: expected seconds, or a number with s, m or h"))?;
    match unit {
        "s" => Ok(n),
        "m" => Ok(n * 60),
        "h" => Ok(n * 3600),
        _ => Err(format!("{text}: the unit must be s, m or h")),
    }
}

/// The traffic of `pairs` (over WebSockets) and `poll` (over REST).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, clap::Args)]
pub struct Traffic {
    /// Sender/receiver pairs.
    #[arg(long)]
    pub pairs: usize,
    /// Total messages per second; 0 sends as fast as it goes.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seconds of sending.
    #[arg(long = "duration", default_value_t = 30)]
    pub duration_s: u64,
    /// Body size in bytes (at least 16: time and sequence).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
}

impl Traffic {
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_s)
    }

    pub fn body_size(&self) -> usize {
        self.size.max(16)
    }

    /// Each sender's share of the total rate, or `None` for as fast as it
    /// goes.
    pub fn interval(&self) -> Option<Duration> {
        (self.rate > 0).then(|| Duration::from_secs_f64(self.pairs as f64 / self.rate as f64))
    }
}

/// How `pairs` reaches a recipient's devices.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, clap::Args)]
pub struct Fanout {
    /// Devices per receiving account, each with its own socket that must
    /// get every message; 1 is today's single-device recipient. Devices
    /// 2..N are added with `POST /v1/devices` (the server's
    /// SEALPOST_MAX_DEVICES_PER_USER, default 10, must allow N).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub devices: u32,
    /// Send one envelope per device (`envelopes`) instead of one `body`
    /// the server copies to every device.
    #[arg(long)]
    pub envelopes: bool,
}

impl Fanout {
    pub fn devices(&self) -> usize {
        self.devices.max(1) as usize
    }
}

/// A server killed mid-run, for `pairs`, `--kill-after` seconds into the
/// sending: either the parent sends SIGKILL to `--kill-pid` (one of the
/// `--url` nodes; its clients reconnect to the next URL), or it runs
/// `--restart-cmd`, a shell command that kills the server and starts it
/// again (its clients reconnect to the same URL, the only one). Either
/// way, clients whose socket drops reconnect and go on: receivers drain
/// their backlog and keep counting, and senders keep sending. Without
/// either a lost socket ends its client, as before.
#[derive(Debug, Clone, Default, Serialize, Deserialize, clap::Args)]
pub struct Kill {
    /// The node process to SIGKILL mid-run (its pid); clients reconnect.
    #[arg(long, requires = "kill_after", conflicts_with = "restart_cmd")]
    pub kill_pid: Option<u32>,
    /// A shell command (`sh -c`) run mid-run that kills the server (kill
    /// -9) and starts it again on the same address, returning once it
    /// answers; clients reconnect to the same URL.
    #[arg(long, requires = "kill_after")]
    pub restart_cmd: Option<String>,
    /// Seconds into the sending at which to kill (with --kill-pid or
    /// --restart-cmd).
    #[arg(long)]
    pub kill_after: Option<u64>,
}

/// What became of a [`Kill`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Struck {
    /// The SIGKILL went out, or the restart command was started (killing
    /// is its job).
    pub killed: bool,
    /// With `--restart-cmd`: whether it exited 0 (the server is back).
    pub restarted: Option<bool>,
}

impl Kill {
    /// Whether clients reconnect after losing their socket.
    pub fn reconnect(&self) -> bool {
        self.kill_pid.is_some() || self.restart_cmd.is_some()
    }

    /// How long into the sending the kill goes off.
    pub fn after(&self) -> Duration {
        Duration::from_secs(self.kill_after.unwrap_or(0))
    }

    /// Kills now: sends the SIGKILL, or runs the restart command to its
    /// end. Spawned at the gate after a sleep of [`Kill::after`], so the
    /// clock starts with the sending.
    pub async fn strike(&self) -> Struck {
        let after = self.kill_after.unwrap_or(0);
        if let Some(cmd) = &self.restart_cmd {
            eprintln!("killing and restarting the server, {after} s into the sending: {cmd}");
            let status = shell(cmd).await;
            return Struck {
                killed: status.is_some(),
                restarted: Some(status == Some(true)),
            };
        }
        let Some(pid) = self.kill_pid else {
            return Struck::default();
        };
        let status = tokio::process::Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status()
            .await;
        let killed = matches!(status, Ok(s) if s.success());
        eprintln!(
            "{} node process {pid} with SIGKILL, {after} s into the sending",
            if killed { "killed" } else { "could not kill" },
        );
        Struck {
            killed,
            restarted: None,
        }
    }
}

/// Runs `cmd` through `sh -c` to its end: `None` if it could not be
/// started, else whether it exited 0.
pub async fn shell(cmd: &str) -> Option<bool> {
    match tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .await
    {
        Ok(status) => {
            if !status.success() {
                eprintln!("{cmd}: {status}");
            }
            Some(status.success())
        }
        Err(e) => {
            eprintln!("{cmd}: not started: {e}");
            None
        }
    }
}

/// Everything a shard needs, written once by the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub spec: Spec,
    pub targets: Vec<Target>,
    pub sources: Vec<Option<IpAddr>>,
    pub accounts: Vec<Account>,
}

/// Which part of the plan a shard runs: every `count`-th item from `index`.
#[derive(Debug, Clone, Copy)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// This shard's share of the indices `0..n`.
    pub fn indices(&self, n: usize) -> Vec<usize> {
        (self.index..n).step_by(self.count.max(1)).collect()
    }
}

/// The meeting point between a shard's setup and its measured phase.
pub enum Gate {
    /// In-process: run the parent's action right here, keeping the setup
    /// report to merge with the measured one.
    Local {
        action: Option<BoxFuture<'static, ()>>,
        setup: Report,
    },
    /// In a child: tell the parent, and wait until it says go.
    Child,
}

impl Gate {
    pub async fn pass(&mut self, setup: &Report) {
        match self {
            Gate::Local {
                action,
                setup: kept,
            } => {
                kept.merge(setup);
                if let Some(action) = action.take() {
                    action.await;
                }
            }
            Gate::Child => {
                let line = serde_json::json!({ "ready": setup });
                println!("{line}");
                let _ = std::io::stdout().flush();
                // Wait for the parent's go (a line, or EOF if it died).
                let _ = tokio::task::spawn_blocking(|| {
                    let mut go = String::new();
                    std::io::stdin().read_line(&mut go)
                })
                .await;
            }
        }
    }
}

/// Runs `plan` in `workers` shards and returns the merged report: each
/// shard's setup (reported at the gate) and its measurements. `between`
/// runs once every shard has finished its setup.
pub async fn execute(
    plan: &Plan,
    workers: usize,
    between: BoxFuture<'static, ()>,
) -> anyhow::Result<Report> {
    if workers <= 1 {
        let mut gate = Gate::Local {
            action: Some(between),
            setup: Report::default(),
        };
        let measured = scenario::run(plan, Shard { index: 0, count: 1 }, &mut gate).await?;
        let Gate::Local {
            setup: mut report, ..
        } = gate
        else {
            unreachable!("a local gate stays local")
        };
        report.merge(&measured);
        return Ok(report);
    }
    let path = std::env::temp_dir().join(format!("sealpost-loadtest-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec(plan)?).context("writing the plan")?;
    let result = spawn_workers(&path, workers, between).await;
    let _ = std::fs::remove_file(&path);
    result
}

async fn spawn_workers(
    plan: &PathBuf,
    workers: usize,
    between: BoxFuture<'static, ()>,
) -> anyhow::Result<Report> {
    let exe = std::env::current_exe().context("locating the loadtest binary")?;
    let mut children = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Value)>();
    for index in 0..workers {
        let mut child = Command::new(&exe)
            .arg("worker")
            .arg("--plan")
            .arg(plan)
            .arg("--shard")
            .arg(index.to_string())
            .arg("--of")
            .arg(workers.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning a worker")?;
        let stdout = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send((index, value));
                }
            }
            let _ = tx.send((index, Value::Null));
        });
        children.push(child);
    }
    drop(tx);

    let mut report = Report::default();
    let (mut ready, mut done, mut between) = (0, 0, Some(between));
    while done < workers {
        let Some((index, event)) = rx.recv().await else {
            break;
        };
        if let Some(setup) = event.get("ready") {
            let setup: Report = serde_json::from_value(setup.clone())?;
            report.merge(&setup);
            ready += 1;
            if ready == workers {
                if let Some(action) = between.take() {
                    action.await;
                }
                for child in &mut children {
                    if let Some(stdin) = child.stdin.as_mut() {
                        let _ = writeln!(stdin, "go");
                        let _ = stdin.flush();
                    }
                }
            }
        } else if let Some(result) = event.get("report") {
            report.merge(&serde_json::from_value(result.clone())?);
        } else if event.is_null() {
            done += 1;
        } else {
            eprintln!("worker {index}: {event}");
        }
    }
    for mut child in children {
        let status = child.wait()?;
        if !status.success() {
            bail!("a worker failed: {status}");
        }
    }
    Ok(report)
}

/// The child side: run one shard of the plan at `path`, reporting on stdout.
pub async fn worker(path: PathBuf, index: usize, count: usize) -> anyhow::Result<()> {
    let plan: Plan = serde_json::from_slice(&std::fs::read(&path)?).context("reading the plan")?;
    // The setup was reported at the gate; this is what came after.
    let measured = scenario::run(&plan, Shard { index, count }, &mut Gate::Child).await?;
    println!("{}", serde_json::json!({ "report": measured }));
    Ok(())
}

/// VmRSS of `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// VmHWM of `pid` in KiB: the most its RSS has been since it started.
pub fn hwm_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU time `pid` has used, user and system, in clock ticks (USER_HZ,
/// 100 a second): fields 14 and 15 of /proc/PID/stat.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count from the last `)`, after which field 3 comes first.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// How many file descriptors `pid` has open (entries of /proc/PID/fd).
pub fn open_fds(pid: u32) -> Option<u64> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_secs;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_secs("90"), Ok(90));
        assert_eq!(parse_secs("90s"), Ok(90));
        assert_eq!(parse_secs("30m"), Ok(1800));
        assert_eq!(parse_secs("2h"), Ok(7200));
        assert!(parse_secs("3d").is_err() && parse_secs("m").is_err());
    }
}
