//! Server configuration: every setting, its environment variable, its flag and
//! its default, in one place.
//!
//! Each field is read from the same-named flag (`--addr`) or environment
//! variable (`SEALPOST_ADDR`); `sealpost serve --help` lists them all. Values
//! are validated while parsing, so a bad one stops start-up with a message
//! that names the setting.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

/// Settings for `sealpost serve`.
#[derive(Args, Clone, Debug)]
pub struct Config {
    /// Address to listen on for HTTP and WebSocket clients.
    #[arg(long, env = "SEALPOST_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Database: `sqlite://path` (created if missing) or `postgres://...`.
    /// (The value may hold a password, so `--help` does not print it.)
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://sealpost.db",
        hide_env_values = true
    )]
    pub database_url: String,

    /// Secret that signs access tokens, at least 32 bytes. With SQLite and no
    /// secret, one is generated and kept beside the database file.
    #[arg(long, env = "SEALPOST_JWT_SECRET", hide_env_values = true, value_parser = parse_secret)]
    pub jwt_secret: Option<Secret>,

    /// Lifetime of an access token (human units: `90s`, `30m`, `2h`).
    #[arg(long, env = "SEALPOST_ACCESS_TOKEN_TTL", default_value = "30m", value_parser = parse_ttl)]
    pub access_token_ttl: Duration,

    /// Lifetime of a refresh token.
    #[arg(long, env = "SEALPOST_REFRESH_TOKEN_TTL", default_value = "30d", value_parser = parse_ttl)]
    pub refresh_token_ttl: Duration,

    /// How long an undelivered message waits before the sweeper deletes it.
    #[arg(long, env = "SEALPOST_MESSAGE_TTL", default_value = "7d", value_parser = parse_ttl)]
    pub message_ttl: Duration,

    /// How often the sweeper looks for expired messages and refresh tokens.
    #[arg(long, env = "SEALPOST_SWEEP_INTERVAL", default_value = "1m", value_parser = parse_ttl)]
    pub sweep_interval: Duration,

    /// Largest message body accepted, in bytes after base64 decoding, at most
    /// 1 MiB: sealpost carries chat envelopes; attachments belong in blob
    /// storage, with their key in an envelope.
    #[arg(long, env = "SEALPOST_MAX_BODY_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1..=1024 * 1024))]
    pub max_body_bytes: u32,

    /// How often the server pings each WebSocket; a peer that has not
    /// answered by the next ping is dropped.
    #[arg(long, env = "SEALPOST_WS_PING_INTERVAL", default_value = "30s", value_parser = parse_ttl)]
    pub ws_ping_interval: Duration,

    /// How long a WebSocket without an `Authorization` header has to send its
    /// `auth` frame.
    #[arg(long, env = "SEALPOST_WS_AUTH_TIMEOUT", default_value = "10s", value_parser = parse_ttl)]
    pub ws_auth_timeout: Duration,

    /// Messages waiting to be written to one WebSocket. A connection whose
    /// queue overflows (a stalled reader) is closed; its messages stay queued
    /// in the database for its next connection.
    #[arg(long, env = "SEALPOST_WS_QUEUE", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub ws_queue: u32,

    /// Database connections in the pool; 0 picks twice the number of cores.
    /// The pool is sized to the machine, not to the number of clients: the
    /// write path is batched through one committer.
    #[arg(long, env = "SEALPOST_DB_POOL_SIZE", default_value_t = 0)]
    pub db_pool_size: u32,

    /// Deepest nesting of arrays and objects accepted in a JSON request body
    /// or WebSocket frame, checked before parsing (see [`crate::nesting`]).
    /// The protocol itself nests two levels deep.
    #[arg(long, env = "SEALPOST_MAX_JSON_DEPTH", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=MAX_JSON_DEPTH as i64))]
    pub max_json_depth: u32,

    /// Password hashes computed at once; 0 picks the number of cores. Each
    /// argon2id hash takes 19 MiB and a core for tens of milliseconds, so a
    /// login flood queues here instead of starving message delivery.
    #[arg(long, env = "SEALPOST_HASH_CONCURRENCY", default_value_t = 0)]
    pub hash_concurrency: usize,
}

impl Config {
    /// Parses settings from flags, falling back to the environment and then
    /// the defaults, as `sealpost serve` does. `args` excludes the program
    /// name.
    pub fn parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        #[command(name = "sealpost serve")]
        struct Serve {
            #[command(flatten)]
            config: Config,
        }
        let args = std::iter::once("sealpost".into()).chain(args.into_iter().map(Into::into));
        <Serve as clap::Parser>::try_parse_from(args).map(|s| s.config)
    }

    /// The effective pool size: explicit, or derived from the core count.
    pub fn db_pool_size(&self) -> u32 {
        match self.db_pool_size {
            0 => (2 * cores() as u32).max(4),
            n => n,
        }
    }

    /// The effective number of concurrent password hashes.
    pub fn hash_concurrency(&self) -> usize {
        match self.hash_concurrency {
            0 => cores(),
            n => n,
        }
    }

    /// The largest request body the HTTP layer buffers: a maximal message
    /// body in base64 plus room for the JSON around it.
    pub fn max_request_bytes(&self) -> usize {
        let body = self.max_body_bytes as usize;
        (body.div_ceil(3) * 4 + 4096).max(16 * 1024)
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A secret string whose `Debug` and `Display` never show its value.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The largest `--max-json-depth`: serde_json refuses anything deeper than
/// this on its own (its recursion limit), so a larger cap would be a lie.
pub const MAX_JSON_DEPTH: u32 = 127;

/// JWT secrets shorter than this are brute-forceable offline from a single
/// captured token (RFC 7518 §3.2 asks for at least the hash size, 256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

fn parse_secret(value: &str) -> Result<Secret, String> {
    if value.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "must be at least {MIN_SECRET_BYTES} bytes, got {}",
            value.len()
        ));
    }
    Ok(Secret(value.to_owned()))
}

fn parse_ttl(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|e| format!("{e} (use human units such as 2s, 30m, 7d)"))?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::parse_from(args)
    }

    #[test]
    fn human_durations_parse() {
        let config = parse(&["--message-ttl", "7d", "--sweep-interval", "2s"]).unwrap();
        assert_eq!(config.message_ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(config.sweep_interval, Duration::from_secs(2));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = parse(&["--jwt-secret", "short"]).unwrap_err().to_string();
        assert!(err.contains("--jwt-secret"), "{err}");
        assert!(err.contains("at least 32 bytes"), "{err}");
        let err = parse(&["--message-ttl", "0s"]).unwrap_err().to_string();
        assert!(err.contains("--message-ttl"), "{err}");
        let err = parse(&["--access-token-ttl", "soon"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--access-token-ttl"), "{err}");
    }

    #[test]
    fn json_depth_is_bounded() {
        assert_eq!(parse(&[]).unwrap().max_json_depth, 32);
        assert_eq!(
            parse(&["--max-json-depth", "127"]).unwrap().max_json_depth,
            127
        );
        for bad in ["0", "128", "deep"] {
            let err = parse(&["--max-json-depth", bad]).unwrap_err().to_string();
            assert!(err.contains("--max-json-depth"), "{bad}: {err}");
        }
    }

    #[test]
    fn secrets_do_not_print() {
        let secret = Secret::new("x".repeat(40));
        assert_eq!(format!("{secret:?}"), "Secret(***)");
    }

    #[test]
    fn request_limit_fits_a_maximal_body() {
        let config = parse(&["--max-body-bytes", "65536"]).unwrap();
        assert!(config.max_request_bytes() > 65536 / 3 * 4);
    }
}
