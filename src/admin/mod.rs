//! Operator commands, run by the same binary as the server: `check-config`,
//! `user`, `stats` and `healthcheck`.
//!
//! They take the settings of `sealpost serve` (flags or the environment), so
//! in a container they run with the server's own environment
//! (`docker exec <container> sealpost user list`). Each prints readable text
//! to stdout, or one JSON object with `--json`; a failure goes to stderr
//! with a non-zero exit.
//!
//! - [`check`]: `check-config`, the effective settings with secrets masked,
//!   and the checks start-up would make, without creating anything.
//! - [`accounts`]: `user list|show|disable|enable|delete` and `stats`,
//!   straight against the database.
//! - [`probe`]: `healthcheck`, a GET of `/healthz` for a container
//!   `HEALTHCHECK` in an image without a shell or curl.
//!
//! The account commands write to the database, not to a running server: a
//! server learns of the sessions they revoke at its next revocation poll
//! (`SEALPOST_REVOCATION_POLL_INTERVAL`, see [`crate::auth::sessions`]).

pub mod accounts;
pub mod check;
pub mod probe;

use std::fmt;
use std::io::Write;
use std::time::Duration;

use clap::{ArgMatches, Args, Subcommand};
use serde::Serialize;

use crate::config::Config;

/// The help heading of the server settings every command takes.
const SETTINGS: &str = "Settings (as for `sealpost serve`)";

#[derive(Subcommand)]
pub enum Command {
    /// Print the effective configuration, secrets masked, and check it as
    /// start-up would: without creating anything or connecting to the
    /// database. Exits 1 if start-up would fail.
    CheckConfig {
        #[command(flatten)]
        output: Output,
        #[command(flatten, next_help_heading = SETTINGS)]
        config: Config,
    },
    /// List, inspect, disable, enable or delete accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// Counts of accounts, sessions and queued messages.
    Stats {
        #[command(flatten)]
        output: Output,
        #[command(flatten, next_help_heading = SETTINGS)]
        config: Config,
    },
    /// Exit 0 if the server at SEALPOST_ADDR answers `GET /healthz` with
    /// 200, else 1: for a container HEALTHCHECK. Speaks HTTPS when
    /// SEALPOST_TLS_CERT is set, trusting exactly that certificate.
    Healthcheck {
        /// Probe `/readyz` instead, which also needs the database to answer.
        #[arg(long)]
        ready: bool,
        /// Give up after this long.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        #[command(flatten, next_help_heading = SETTINGS)]
        config: Config,
    },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Accounts in username order, a page at a time.
    List {
        /// Accounts per page.
        #[arg(long, default_value_t = 100,
              value_parser = clap::value_parser!(u32).range(1..=accounts::MAX_PAGE as i64))]
        limit: u32,
        /// Start after this username (the `next` of the previous page).
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        output: Output,
        #[command(flatten, next_help_heading = SETTINGS)]
        config: Config,
    },
    /// One account: id, creation, key, status, sessions, queue.
    Show {
        /// A username (any letter case) or a user id.
        user: String,
        #[command(flatten)]
        output: Output,
        #[command(flatten, next_help_heading = SETTINGS)]
        config: Config,
    },
    /// Refuse the account's logins and revoke every session it has.
    Disable {
        /// A username (any letter case) or a user id.
        user: String,
        #[command(flatten)]
        output: Output,
        #[command(flatten, next_help_heading = SETTINGS)]
        config: Config,
    },
    /// Let a disabled account log in again.
    Enable {
        /// A username (any letter case) or a user id.
        user: String,
        #[command(flatten)]
        output: Output,
        #[command(flatten, next_help_heading = SETTINGS)]
        config: Config,
    },
    /// Delete the account with its key and queued messages, revoking every
    /// session. Cannot be undone.
    Delete {
        /// A username (any letter case) or a user id.
        user: String,
        /// Really delete: without it, nothing is deleted.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        output: Output,
        #[command(flatten, next_help_heading = SETTINGS)]
        config: Config,
    },
}

/// How a command prints its result.
#[derive(Args, Clone, Copy, Debug)]
pub struct Output {
    /// Print one JSON object instead of text, for scripts.
    #[arg(long)]
    pub json: bool,
}

/// The command line as clap parsed it: `check-config` tells from it where
/// each value came from (flag, environment or default).
pub struct Invocation<'a> {
    /// The whole `sealpost` command, built.
    pub command: &'a clap::Command,
    pub matches: &'a ArgMatches,
}

/// Runs one operator command.
pub async fn run(command: Command, invocation: &Invocation<'_>) -> anyhow::Result<()> {
    match command {
        Command::CheckConfig { output, config } => {
            let report = check::report(&config, invocation);
            emit(output, &report)?;
            report.verdict()
        }
        Command::Stats { output, config } => {
            let store = accounts::open(&config).await?;
            emit(output, &accounts::stats(store.as_ref()).await?)
        }
        Command::Healthcheck {
            ready,
            timeout,
            config,
        } => probe::healthcheck(&config, ready, timeout).await,
        Command::User(command) => user(command).await,
    }
}

async fn user(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::List {
            limit,
            after,
            output,
            config,
        } => {
            let store = accounts::open(&config).await?;
            emit(
                output,
                &accounts::list(store.as_ref(), after.as_deref(), limit).await?,
            )
        }
        UserCommand::Show {
            user,
            output,
            config,
        } => {
            let store = accounts::open(&config).await?;
            emit(output, &accounts::show(store.as_ref(), &user).await?)
        }
        UserCommand::Disable {
            user,
            output,
            config,
        } => {
            let store = accounts::open(&config).await?;
            emit(output, &accounts::disable(store.as_ref(), &user).await?)
        }
        UserCommand::Enable {
            user,
            output,
            config,
        } => {
            let store = accounts::open(&config).await?;
            emit(output, &accounts::enable(store.as_ref(), &user).await?)
        }
        UserCommand::Delete {
            user,
            yes,
            output,
            config,
        } => {
            let store = accounts::open(&config).await?;
            emit(output, &accounts::delete(store.as_ref(), &user, yes).await?)
        }
    }
}

/// Prints `value` to stdout as text, or as pretty JSON with `--json`.
fn emit<T: Serialize + fmt::Display>(output: Output, value: &T) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    if output.json {
        serde_json::to_writer_pretty(&mut stdout, value)?;
        writeln!(stdout)?;
    } else {
        write!(stdout, "{value}")?;
    }
    stdout.flush()?;
    Ok(())
}

/// A timestamp as the API writes them: RFC 3339, UTC, milliseconds.
fn timestamp(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
