//! The `sealpost` command: `serve` (the default), `migrate`, and the
//! operator commands of [`sealpost::admin`].

use std::io::IsTerminal;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use sealpost::{Config, Server, admin, server};
use tracing_subscriber::EnvFilter;

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

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Parsed in two steps, as `Cli::parse` would, keeping the matches:
    // `check-config` reports where each value came from.
    let mut command = Cli::command();
    let matches = command.get_matches_mut();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // The current span's fields (method, path, request id) go with
        // every line, so each line stands on its own in a collector.
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }

    match cli
        .command
        .unwrap_or_else(|| Command::Serve(default_config()))
    {
        Command::Serve(config) => {
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
