//! The `sealpost` command: `serve` (the default), `migrate`, and the
//! operator commands of [`sealpost::admin`].

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use sealpost::logging::{self, LogFormat};
use sealpost::{Config, Server, admin, config, server};

/// mimalloc returns freed memory to the OS promptly. With glibc's malloc,
/// the 19 MiB argon2 blocks stayed resident after their hashes (598 MB
/// after 60 sign-ups, measured).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sealpost",
    version,
    about = "Real-time push relay for end-to-end encrypted messengers"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Log lines as human-readable text, or as one JSON object per line for
    /// a log collector. The level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "SEALPOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default when no command is given).
    Serve(Config),
    /// Apply pending database migrations and exit.
    Migrate(Config),
    #[command(flatten)]
    Operator(admin::Command),
}

/// With no subcommand, `sealpost` serves with settings from the environment.
fn default_config() -> Config {
    Config::parse_from(std::iter::empty::<String>()).unwrap_or_else(|e| e.exit())
}

/// Raises the soft open-file limit to the hard one. Each WebSocket holds a
/// descriptor, and the usual soft default of 1024 would cap the server near
/// 1,000 connections where the hard limit allows far more.
fn raise_open_file_limit() {
    /// Below this, the limit, not the machine, decides how many sockets fit.
    const LOW: u64 = 4096;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < LOW => tracing::warn!(
            limit,
            "the open-file limit caps WebSockets near this number: raise its hard limit \
             (ulimit -Hn, LimitNOFILE= in systemd, ulimits in compose)"
        ),
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(err) => tracing::warn!(error = %err, "could not raise the open-file limit"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Parsed in two steps, as `Cli::parse` would, keeping the matches:
    // `check-config` reports where each value came from. A value that does
    // not parse is reported under the name the operator gave it.
    let mut command = Cli::command();
    let args: Vec<OsString> = std::env::args_os().collect();
    let matches = command.try_get_matches_from_mut(&args).unwrap_or_else(|e| {
        config::name_as_given(e, &command, args.get(1..).unwrap_or_default()).exit()
    });
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    logging::init(cli.log_format);

    match cli
        .command
        .unwrap_or_else(|| Command::Serve(default_config()))
    {
        Command::Serve(config) => {
            raise_open_file_limit();
            let server = Server::bind(config).await?;
            server.run(server::shutdown_signal()).await
        }
        Command::Migrate(config) => {
            server::open_store(&config).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Operator(operator) => {
            let invocation = admin::Invocation {
                command: &command,
                matches: &matches,
            };
            admin::run(operator, &invocation).await
        }
    }
}
