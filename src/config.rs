//! Server configuration: every setting, its environment variable, its flag and
//! its default, in one place.
//!
//! Each field is read from the same-named flag (`--addr`) or environment
//! variable (`SEALPOST_ADDR`); `sealpost serve --help` lists them all. Values
//! are validated while parsing, so a bad one stops start-up with a message
//! that names the setting as the operator gave it: the variable, or the
//! flag ([`name_as_given`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::http::{HeaderValue, Uri};
use clap::Args;
use clap::builder::TypedValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::parser::ValueSource;

use crate::seal::KeyRing;

/// Settings for `sealpost serve`.
#[derive(Args, Clone, Debug)]
pub struct Config {
    /// Address to listen on for HTTP and WebSocket clients.
    #[arg(long, env = "SEALPOST_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Database: `sqlite://path` (created if missing) or `postgres://...`.
    /// (The value may hold a password, so `--help` does not print it.)
    // Read it through `Config::database_url`, which honours the file.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://sealpost.db",
        hide_env_values = true,
        value_parser = Masked(parse_database_url)
    )]
    pub database_url: String,

    /// File holding the database URL, in place of `DATABASE_URL` (for
    /// container secrets: the URL holds the password). Trailing line breaks
    /// are dropped.
    #[arg(long, env = "DATABASE_URL_FILE", value_name = "PATH", conflicts_with = "database_url",
          value_parser = FromFile(|url| parse_database_url(url).map(Secret)))]
    pub database_url_file: Option<Secret>,

    /// Secret that signs access tokens, at least 32 bytes. With SQLite and no
    /// secret, one is generated and kept beside the database file.
    // Read it through `Config::jwt_secret`, which honours the file.
    #[arg(long, env = "SEALPOST_JWT_SECRET", hide_env_values = true,
          value_parser = Masked(parse_secret))]
    pub jwt_secret: Option<Secret>,

    /// File holding the JWT secret, in place of `SEALPOST_JWT_SECRET`.
    /// Trailing line breaks are dropped.
    #[arg(long, env = "SEALPOST_JWT_SECRET_FILE", value_name = "PATH", conflicts_with = "jwt_secret",
          value_parser = FromFile(parse_secret))]
    pub jwt_secret_file: Option<Secret>,

    /// Keys that seal queued messages at rest: `id:base64-of-32-bytes`,
    /// comma-separated; the first seals new rows, all open. With SQLite and
    /// no keys, one is generated and kept beside the database file.
    // Read them through `Config::storage_keys`, which honours the file.
    #[arg(long, env = "SEALPOST_STORAGE_KEYS", hide_env_values = true,
          value_parser = Masked(KeyRing::parse))]
    pub storage_keys: Option<KeyRing>,

    /// File holding the storage keys, in place of `SEALPOST_STORAGE_KEYS`.
    /// Trailing line breaks are dropped.
    #[arg(long, env = "SEALPOST_STORAGE_KEYS_FILE", value_name = "PATH",
          conflicts_with = "storage_keys", value_parser = FromFile(KeyRing::parse))]
    pub storage_keys_file: Option<KeyRing>,

    /// Lifetime of an access token (human units: `90s`, `30m`, `2h`).
    #[arg(long, env = "SEALPOST_ACCESS_TOKEN_TTL", default_value = "30m", value_parser = parse_ttl)]
    pub access_token_ttl: Duration,

    /// Lifetime of a refresh token.
    #[arg(long, env = "SEALPOST_REFRESH_TOKEN_TTL", default_value = "30d", value_parser = parse_ttl)]
    pub refresh_token_ttl: Duration,

    /// How long a refresh token stays good for one more use after it was
    /// replaced: a client whose refresh answer was lost presents it again
    /// and gets the same new pair, instead of tripping reuse detection
    /// (which ends every session of the account). Only until the
    /// replacement is used. 0 turns it off; at most 10m.
    #[arg(long, env = "SEALPOST_REFRESH_GRACE", default_value = "30s",
          value_parser = parse_refresh_grace)]
    pub refresh_grace: Duration,

    /// How long an undelivered message waits before the sweeper deletes it.
    #[arg(long, env = "SEALPOST_MESSAGE_TTL", default_value = "7d", value_parser = parse_ttl)]
    pub message_ttl: Duration,

    /// How often the sweeper looks for expired messages and refresh tokens.
    #[arg(long, env = "SEALPOST_SWEEP_INTERVAL", default_value = "1m", value_parser = parse_ttl)]
    pub sweep_interval: Duration,

    /// How often the server reads the session revocations that other
    /// processes recorded (other nodes; `sealpost user disable` and
    /// `delete`), to refuse their access tokens and close their sockets.
    /// Each look is one indexed query.
    #[arg(long, env = "SEALPOST_REVOCATION_POLL_INTERVAL", default_value = "5s",
          value_parser = parse_ttl)]
    pub revocation_poll_interval: Duration,

    /// Largest message body accepted, in bytes after base64 decoding, at most
    /// 1 MiB: sealpost carries chat envelopes; attachments belong in blob
    /// storage, with their key in an envelope.
    #[arg(long, env = "SEALPOST_MAX_BODY_BYTES", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1..=1024 * 1024))]
    pub max_body_bytes: u32,

    /// How long a client has to send a request's head (request line and
    /// headers) once the server waits for one: after connecting, and on a
    /// kept-alive connection after the previous answer, so it is also how
    /// long an idle connection stays open. A head that takes longer
    /// (slowloris) is closed on, without an answer.
    #[arg(long, env = "SEALPOST_HEADER_READ_TIMEOUT", default_value = "10s",
          value_parser = parse_ttl)]
    pub header_read_timeout: Duration,

    /// How long a client has to send a whole request body, from the moment
    /// a handler starts reading it. A body not complete by then is answered
    /// 408 (`request_timeout`) and the connection closed: a client that
    /// stops a few bytes short of its body holds nothing longer. The default
    /// lets a maximal send (under 1 MiB at the default limits) through a
    /// 256 kbit/s uplink.
    #[arg(long, env = "SEALPOST_BODY_READ_TIMEOUT", default_value = "30s",
          value_parser = parse_ttl)]
    pub body_read_timeout: Duration,

    /// HTTP connections open at once per client address (an IPv6 client
    /// counts per /64); 0 = no limit. Counted by TCP peer when accepted, so
    /// trusted proxies (`SEALPOST_TRUSTED_PROXIES`), whose connections carry
    /// many clients, are exempt. A connection over it is closed at once,
    /// without an answer. A WebSocket stops counting here once upgraded
    /// (`SEALPOST_MAX_CONNECTIONS_PER_IP` counts it then).
    #[arg(
        long,
        env = "SEALPOST_MAX_HTTP_CONNECTIONS_PER_IP",
        default_value_t = 64
    )]
    pub max_http_connections_per_ip: u32,

    /// How often the server pings each WebSocket; a peer that has not
    /// answered by the next ping is dropped.
    #[arg(long, env = "SEALPOST_WS_PING_INTERVAL", default_value = "30s", value_parser = parse_ttl)]
    pub ws_ping_interval: Duration,

    /// How long a WebSocket without a valid `Authorization` header has to
    /// send its `auth` frame. It holds a waiting slot meanwhile
    /// (`SEALPOST_MAX_UNAUTHENTICATED_SOCKETS`): a client sends the frame
    /// right after the upgrade, one round trip, so 5s is ample even on a
    /// poor mobile link, and a slot an attacker holds turns over twice as
    /// fast as at the former 10s.
    #[arg(long, env = "SEALPOST_WS_AUTH_TIMEOUT", default_value = "5s", value_parser = parse_ttl)]
    pub ws_auth_timeout: Duration,

    /// How long a client has to finish a WebSocket message it has begun: a
    /// message sent in fragments, or one frame whose payload is still
    /// arriving. The server holds what arrived (up to a maximal message,
    /// ~850 KiB) meanwhile; past it the socket is closed with 1008. 10s
    /// carries a maximal message at under 1 Mbit/s.
    #[arg(long, env = "SEALPOST_WS_MESSAGE_TIMEOUT", default_value = "10s",
          value_parser = parse_ttl)]
    pub ws_message_timeout: Duration,

    /// Messages waiting to be written to one WebSocket. A connection whose
    /// queue overflows (a stalled reader) is closed; its messages stay queued
    /// in the database for its next connection.
    #[arg(long, env = "SEALPOST_WS_QUEUE", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub ws_queue: u32,

    /// How long a WebSocket has to write one page of its backlog, from its
    /// first frame to the flush of its last. A socket that takes longer
    /// (a reader too slow for the backlog, or one that stopped reading) is
    /// closed with 1013; its messages stay queued for its next connection,
    /// and the page's bytes go back to the drain budget. A socket whose
    /// page took over half of this gets pages half as large.
    #[arg(long, env = "SEALPOST_WS_PAGE_WRITE_TIMEOUT", default_value = "30s",
          value_parser = parse_ttl)]
    pub ws_page_write_timeout: Duration,

    /// Stored bytes of backlog pages in memory at once, server-wide: a
    /// socket's page until it is written, a poll's until it is encoded.
    /// Pages take about three times their stored bytes in memory. Drains
    /// and polls wait for room (a poll up to 10 s, then 503).
    #[arg(long, env = "SEALPOST_DRAIN_BUDGET_BYTES",
          default_value_t = crate::delivery::DRAIN_BUDGET as u32,
          value_parser = clap::value_parser!(u32).range(65536..))]
    pub drain_budget_bytes: u32,

    /// The most of the drain budget one account, and one client address
    /// (an IPv6 /64), may hold at once; 0 = a sixteenth of the budget
    /// (4 MiB by default). A page is cut to at most this many bytes.
    #[arg(long, env = "SEALPOST_DRAIN_SHARE_BYTES", default_value_t = 0)]
    pub drain_share_bytes: u32,

    /// Database connections in the pool; 0 picks twice the number of cores.
    /// The pool is sized to the machine, not to the number of clients: the
    /// write path is batched through one committer.
    #[arg(long, env = "SEALPOST_DB_POOL_SIZE", default_value_t = 0)]
    pub db_pool_size: u32,

    /// How long a request waits for the database: each query, and a send's
    /// or ack's commit from the request's start. Past it the request is
    /// answered 503 `unavailable` (a write may still commit). 5 s answers
    /// well before the shortest common client timeout (10 s, Android's
    /// OkHttp) while riding out a failover or a checkpoint stall; at most
    /// 60s. See the "Faults" section of docs/operations.md.
    #[arg(long, env = "SEALPOST_DB_TIMEOUT", default_value = "5s", value_parser = parse_db_timeout)]
    pub db_timeout: Duration,

    /// Deepest nesting of arrays and objects accepted in a JSON request body
    /// or WebSocket frame, checked before parsing (see [`crate::nesting`]).
    /// The protocol itself nests three levels deep (a send's envelopes).
    #[arg(long, env = "SEALPOST_MAX_JSON_DEPTH", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..=MAX_JSON_DEPTH as i64))]
    pub max_json_depth: u32,

    /// Password hashes computed at once; 0 picks the number of cores. Each
    /// argon2id hash takes 19 MiB and a core for tens of milliseconds, so a
    /// login flood queues here instead of starving message delivery.
    #[arg(long, env = "SEALPOST_HASH_CONCURRENCY", default_value_t = 0)]
    pub hash_concurrency: usize,

    /// For the test suite only: hash new passwords with argon2's smallest
    /// parameters instead of OWASP's, so that a suite that signs up
    /// thousands of accounts spends its time on what it tests. Honoured by
    /// debug builds only, with a warning at start-up; a release build
    /// refuses to start with it, so no server built for use can hash
    /// below the floor. Hidden from `--help`.
    #[arg(long, env = "SEALPOST_INSECURE_TEST_HASHING", default_value_t = false,
          action = clap::ArgAction::Set, hide = true,
          value_parser = clap::builder::BoolishValueParser::new()
              .try_map(|on| insecure_test_hashing(on, cfg!(debug_assertions))))]
    pub insecure_test_hashing: bool,

    /// Proxies whose `X-Forwarded-For` is believed (comma-separated
    /// addresses or CIDR ranges, e.g. `10.0.0.0/8,::1`). From anyone else
    /// the header is ignored and the peer address is the client.
    #[arg(long, env = "SEALPOST_TRUSTED_PROXIES", value_delimiter = ',',
          value_parser = parse_ip_net)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// Sign-ups, logins and token refreshes per client IP per minute; 0
    /// turns the limit off. A password guesser gets this many tries.
    #[arg(long, env = "SEALPOST_AUTH_RATE_PER_MINUTE", default_value_t = 10)]
    pub auth_rate_per_minute: u32,

    /// Auth requests one client IP may make at once before the per-minute
    /// rate applies.
    #[arg(long, env = "SEALPOST_AUTH_RATE_BURST", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_rate_burst: u32,

    /// Password checks per signed-in account per minute (password change,
    /// account and device deletion); 0 turns the limit off. Wrong passwords
    /// lock the account out for growing times whatever this is.
    #[arg(long, env = "SEALPOST_PASSWORD_RATE_PER_MINUTE", default_value_t = 6)]
    pub password_rate_per_minute: u32,

    /// Password checks one account may have at once before the per-minute
    /// rate applies.
    #[arg(long, env = "SEALPOST_PASSWORD_RATE_BURST", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub password_rate_burst: u32,

    /// Messages one user may send per second, REST and WebSocket together;
    /// 0 turns the limit off.
    #[arg(long, env = "SEALPOST_SEND_RATE_PER_SECOND", default_value_t = 50)]
    pub send_rate_per_second: u32,

    /// Messages one user may send at once before the per-second rate applies.
    #[arg(long, env = "SEALPOST_SEND_RATE_BURST", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub send_rate_burst: u32,

    /// Sends from one user to one recipient per second, stored and
    /// ephemeral together (sends to your own account are not counted);
    /// 0 turns the limit off. Bounds what one sender pours into one
    /// account's queues and how often it can ask, by an ephemeral send,
    /// whether the account is online. A share of the sender's budget: off
    /// too while `SEALPOST_SEND_RATE_PER_SECOND` is 0 (see
    /// [`Config::pair_rate_per_second`]).
    #[arg(long, env = "SEALPOST_PAIR_RATE_PER_SECOND", default_value_t = 2)]
    pub pair_rate_per_second: u32,

    /// Sends from one user to one recipient at once before the per-second
    /// rate applies: a client flushing a conversation written offline.
    #[arg(long, env = "SEALPOST_PAIR_RATE_BURST", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pair_rate_burst: u32,

    /// Open WebSockets per device (all its sessions: tabs, an app
    /// restarting); 0 = no limit. The name is from before devices.
    #[arg(long, env = "SEALPOST_MAX_CONNECTIONS_PER_USER", default_value_t = 10)]
    pub max_connections_per_user: u32,

    /// Devices one account may hold (1-32). Each has its own key, queue
    /// and sessions, and a send carries one envelope per device, so the
    /// request size limit grows with it: 32 maximal envelopes are about
    /// 2.7 MiB at the default body limit.
    #[arg(long, env = "SEALPOST_MAX_DEVICES_PER_USER", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=32))]
    pub max_devices_per_user: u32,

    /// Recipient accounts one multi-recipient send (a group message) may
    /// name.
    #[arg(long, env = "SEALPOST_MAX_RECIPIENTS_PER_SEND", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_recipients_per_send: u32,

    /// Recipient devices one multi-recipient send may name, all accounts
    /// together. With the key limit it sets the size of such a request.
    #[arg(long, env = "SEALPOST_MAX_DEVICES_PER_SEND", default_value_t = 5000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_devices_per_send: u32,

    /// Bytes of key material per device in a multi-recipient send's shared
    /// form (a content key sealed to the device).
    #[arg(long, env = "SEALPOST_MAX_KEY_BYTES", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(16..=4096))]
    pub max_key_bytes: u32,

    /// Tell the sender's sockets when a recipient device acknowledges a
    /// message (`receipt` frames). Best effort, never stored.
    #[arg(long, env = "SEALPOST_DELIVERY_RECEIPTS", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub delivery_receipts: bool,

    /// Serve the browser demo at `/demo/` (two people chatting end to end
    /// with the JavaScript client; files embedded in the binary). Off by
    /// default: it is a showcase, not a product page.
    #[arg(long, env = "SEALPOST_DEMO", default_value_t = false,
          action = clap::ArgAction::Set)]
    pub demo: bool,

    /// How long a message to a recipient device that is online here waits
    /// for that device's ack before it is written (0 = write at once). One
    /// acked within it is never written: its `sent` then means "acked by
    /// the recipient". Worth the recipients' round trip (e.g. 100ms for
    /// phones) where writes are the bottleneck; it adds at most this much to
    /// the `sent` of a message that is not acked in time. At most 10s.
    #[arg(long, env = "SEALPOST_ACK_WINDOW", default_value = "5ms", value_parser = parse_ack_window)]
    pub ack_window: Duration,

    /// Open WebSockets per client IP; 0 = no limit. Mind carrier-grade NAT:
    /// many users may share one address.
    #[arg(long, env = "SEALPOST_MAX_CONNECTIONS_PER_IP", default_value_t = 1000)]
    pub max_connections_per_ip: u32,

    /// WebSockets that have not authenticated yet, server-wide; 0 = no
    /// limit. Bounds what a flood of idle sockets can hold.
    #[arg(
        long,
        env = "SEALPOST_MAX_UNAUTHENTICATED_SOCKETS",
        default_value_t = 1000
    )]
    pub max_unauthenticated_sockets: u32,

    /// WebSockets from one client address (IPv6: one /64) that have not
    /// authenticated yet; 0 = no limit. Its share of
    /// `SEALPOST_MAX_UNAUTHENTICATED_SOCKETS`, so that one address cannot
    /// take every slot. A socket waits one round trip (an upgrade with a
    /// valid `Authorization` header not at all), so 16 lets a NAT of many
    /// browsers connect dozens of sockets a second; one over it gets 429
    /// and retries.
    #[arg(
        long,
        env = "SEALPOST_MAX_UNAUTHENTICATED_SOCKETS_PER_IP",
        default_value_t = 16
    )]
    pub max_unauthenticated_sockets_per_ip: u32,

    /// Messages queued for one device of a recipient; further sends to the
    /// account are refused with `queue_full` until that device's queue
    /// drains. 0 = no limit; 10000 by default. Formerly
    /// `SEALPOST_MAX_QUEUED_PER_USER`, which still works, with a warning.
    // No `default_value_t`: whether it was given decides whether the former
    // name may be (see `Config::former_names`). Read it through
    // `Config::max_queued_per_device`.
    #[arg(long, env = "SEALPOST_MAX_QUEUED_PER_DEVICE", value_name = "MESSAGES")]
    max_queued_per_device: Option<u32>,

    /// The former name of `--max-queued-per-device`, from before devices,
    /// when the cap was already per device.
    #[arg(long, env = "SEALPOST_MAX_QUEUED_PER_USER", hide = true)]
    max_queued_per_user: Option<u32>,

    /// Messages one sender may hold in one device's queue; further sends
    /// from it to the account are refused with `queue_full`, while other
    /// senders go on. Once a device's queue is full, senders holding
    /// fewer than a hundredth of this there may still queue up to a tenth
    /// more. 0, or a share no smaller than `SEALPOST_MAX_QUEUED_PER_DEVICE`,
    /// = no shares (and no headroom).
    #[arg(long, env = "SEALPOST_MAX_QUEUED_PER_SENDER", default_value_t = 1_000)]
    pub max_queued_per_sender: u32,

    /// Stored bytes queued for one account, all its devices together
    /// (each copy counts: a body to ten devices is stored ten times); a
    /// send that would pass it is refused with `queue_full`. A sender may
    /// hold a tenth of it (when senders have shares, see
    /// `SEALPOST_MAX_QUEUED_PER_SENDER`). 0 = no limit.
    #[arg(long, env = "SEALPOST_MAX_QUEUED_BYTES_PER_USER", default_value_t = 256 * 1024 * 1024)]
    pub max_queued_bytes_per_user: u64,

    /// Browser origins allowed to call the API and open WebSockets, comma
    /// separated and exact (`https://chat.example.com`). None by default:
    /// native clients need no entry, and a browser page of another origin
    /// is refused.
    #[arg(long, env = "SEALPOST_CORS_ORIGINS", default_value = "", hide_default_value = true,
          value_parser = parse_origins)]
    pub cors_origins: Origins,

    /// PEM file with the TLS certificate chain, leaf first. With
    /// `--tls-key`, sealpost serves HTTPS and WSS itself; without both it
    /// serves plain HTTP (for a TLS-terminating proxy in front).
    #[arg(long, env = "SEALPOST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file with the private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SEALPOST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Address of a second listener serving Prometheus metrics at
    /// `GET /metrics` (plain HTTP, e.g. `127.0.0.1:9090`). Off when unset.
    /// Keep it off the public network: it tells how busy the server is. Its
    /// connections have the API's head timeout, head size and per-address
    /// cap.
    #[arg(long, env = "SEALPOST_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// NATS server(s) that carry pushes, notices and revocations between the
    /// nodes of a cluster, comma-separated (`nats://host:4222`, `tls://` for
    /// TLS; `user:password@` or `token@` in the URL when the server wants
    /// them). Unset: one node, as before. Needs PostgreSQL: SQLite is
    /// single-node.
    #[arg(long, env = "SEALPOST_NATS_URL", value_delimiter = ',')]
    pub nats_url: Vec<String>,

    /// A NATS `.creds` file (a user JWT and its nkey seed) to authenticate
    /// with.
    #[arg(long, env = "SEALPOST_NATS_CREDENTIALS", value_name = "PATH")]
    pub nats_credentials: Option<PathBuf>,

    /// PEM root certificate(s) to verify the NATS servers with; implies TLS.
    #[arg(long, env = "SEALPOST_NATS_TLS_CA", value_name = "PATH")]
    pub nats_tls_ca: Option<PathBuf>,

    /// A PEM client certificate for NATS servers that verify clients (with
    /// `SEALPOST_NATS_TLS_KEY`).
    #[arg(
        long,
        env = "SEALPOST_NATS_TLS_CERT",
        value_name = "PATH",
        requires = "nats_tls_key"
    )]
    pub nats_tls_cert: Option<PathBuf>,

    /// The PEM private key of `SEALPOST_NATS_TLS_CERT`.
    #[arg(
        long,
        env = "SEALPOST_NATS_TLS_KEY",
        value_name = "PATH",
        requires = "nats_tls_cert"
    )]
    pub nats_tls_key: Option<PathBuf>,

    /// The first token of every NATS subject this cluster uses: clusters
    /// (or test runs) that share one NATS keep apart by it.
    #[arg(long, env = "SEALPOST_NATS_SUBJECT_PREFIX", default_value = "sealpost",
          value_parser = parse_subject_token)]
    pub nats_subject_prefix: String,

    /// This node's name in logs, metrics and `/readyz`: letters, digits,
    /// `-`, `_` and `.`, at most 64. Default: `node-` and 8 random hex
    /// digits, new at every start.
    #[arg(long, env = "SEALPOST_NODE_ID", value_parser = parse_node_id)]
    pub node_id: Option<String>,

    /// Wake-ups of offline devices: providers and timing.
    #[command(flatten)]
    pub push: crate::push::config::PushConfig,
}

impl Config {
    /// The per-(sender, recipient) rate in force: the setting, unless the
    /// per-user send budget is off. The pair limit is a share of that
    /// budget; an operator who turns the budget off (a load test, a
    /// trusted deployment, the yardstick's comparison runs) means sends
    /// to be unlimited, and 1,000 pairs at 20 messages a second each would
    /// otherwise be refused by a limit they never named.
    pub fn pair_rate_per_second(&self) -> u32 {
        if self.send_rate_per_second == 0 {
            0
        } else {
            self.pair_rate_per_second
        }
    }

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
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let argv = std::iter::once("sealpost".into()).chain(args.iter().cloned());
        <Serve as clap::Parser>::try_parse_from(argv)
            .map(|s| s.config)
            .map_err(|err| name_as_given(err, &<Serve as clap::CommandFactory>::command(), &args))
    }

    /// Messages queued per device: `SEALPOST_MAX_QUEUED_PER_DEVICE`, else
    /// its former name, else the default.
    pub fn max_queued_per_device(&self) -> u32 {
        self.max_queued_per_device
            .or(self.max_queued_per_user)
            .unwrap_or(DEFAULT_MAX_QUEUED_PER_DEVICE)
    }

    /// Settings given under a former name: what to warn of at start, one
    /// line each, or why start-up must stop (the former name and the new one
    /// both given, with different values).
    pub fn former_names(&self) -> Result<Vec<String>, String> {
        let mut warnings = Vec::new();
        if let Some(old) = self.max_queued_per_user {
            let (old_name, new_name) = (
                both_names("SEALPOST_MAX_QUEUED_PER_USER"),
                both_names("SEALPOST_MAX_QUEUED_PER_DEVICE"),
            );
            match self.max_queued_per_device {
                Some(new) if new != old => {
                    return Err(format!(
                        "{old_name} is {old} and {new_name} is {new}: the first is the \
                         former name of the second; set only {new_name}"
                    ));
                }
                _ => warnings.push(format!(
                    "{old_name} is deprecated: it caps each device's queue and is now \
                     {new_name}; rename it, as the former name will go"
                )),
            }
        }
        Ok(warnings)
    }

    /// The database URL: `DATABASE_URL`, or the content of
    /// `DATABASE_URL_FILE`.
    pub fn database_url(&self) -> &str {
        self.database_url_file
            .as_ref()
            .map_or(&self.database_url, Secret::as_str)
    }

    /// The JWT secret, directly or from its file; `None` when neither is
    /// set.
    pub fn jwt_secret(&self) -> Option<&Secret> {
        self.jwt_secret.as_ref().or(self.jwt_secret_file.as_ref())
    }

    /// The storage keys, directly or from their file; `None` when neither
    /// is set.
    pub fn storage_keys(&self) -> Option<&KeyRing> {
        self.storage_keys
            .as_ref()
            .or(self.storage_keys_file.as_ref())
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

    /// Whether a request with this `Origin` header may use the API.
    pub fn origin_allowed(&self, origin: &HeaderValue) -> bool {
        self.cors_origins.0.contains(origin)
    }

    /// Whether this node is one of a cluster (a NATS broker is set).
    pub fn clustered(&self) -> bool {
        self.nats_urls().next().is_some()
    }

    /// The NATS servers, without empty entries.
    pub fn nats_urls(&self) -> impl Iterator<Item = &str> {
        self.nats_url
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
    }

    /// Whether sealpost terminates TLS itself.
    pub fn serves_tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// The largest frame the server writes: one message, whose body is one
    /// envelope or a shared body with its key.
    pub fn max_outbound_frame_bytes(&self) -> usize {
        let body = self.max_body_bytes as usize;
        let key = self.max_key_bytes as usize;
        (body.div_ceil(3) * 4 + key.div_ceil(3) * 4 + 4096).max(16 * 1024)
    }

    /// The largest request body the HTTP layer buffers: a maximal message
    /// body in base64 per device, plus room for the JSON around them.
    pub fn max_request_bytes(&self) -> usize {
        // Room for one maximal envelope per device: the size limit applies
        // per envelope. Each envelope adds its device id and JSON around
        // the base64.
        let body = self.max_body_bytes as usize;
        let envelopes = self.max_devices_per_user.max(1) as usize;
        (envelopes * (body.div_ceil(3) * 4 + 64) + 4096).max(16 * 1024)
    }

    /// The largest multi-recipient send (REST body or `send_multi` frame):
    /// a maximal shared body, a maximal key for every device a send may
    /// name with room for its JSON, and at least a single send's limit.
    pub fn max_multi_request_bytes(&self) -> usize {
        let shared = (self.max_body_bytes as usize).div_ceil(3) * 4;
        let key = (self.max_key_bytes as usize).div_ceil(3) * 4;
        let devices = self.max_devices_per_send as usize;
        // Per device: its key, `{"device_id":n,"key":""}` and a share of
        // its account's `{"to":"<uuid>","keys":[]}`.
        (shared + devices * (key + 96) + 4096).max(self.max_request_bytes())
    }
}

/// The default of `--max-queued-per-device`.
pub const DEFAULT_MAX_QUEUED_PER_DEVICE: u32 = 10_000;

/// How a message after parsing names a setting: by its environment variable
/// and its flag, `SEALPOST_JWT_SECRET (--jwt-secret)`. Past the parse it is
/// no longer known which of the two the operator used (or would use, for a
/// setting missing), so both are named. A name that is no setting's is
/// returned as it is.
pub fn both_names(env: &str) -> String {
    match flag_of(env) {
        Some(flag) => format!("{env} ({flag})"),
        None => env.to_owned(),
    }
}

/// A setting missing, named both ways: `SEALPOST_JWT_SECRET is not set
/// (nor --jwt-secret)`.
pub fn not_set(env: &str) -> String {
    match flag_of(env) {
        Some(flag) => format!("{env} is not set (nor {flag})"),
        None => format!("{env} is not set"),
    }
}

/// The flag of the setting whose variable is `env`.
fn flag_of(env: &str) -> Option<String> {
    let command = Config::augment_args(clap::Command::new("sealpost serve"));
    command
        .get_arguments()
        .find(|arg| arg.get_env().is_some_and(|e| e == env))
        .and_then(clap::Arg::get_long)
        .map(|long| format!("--{long}"))
}

/// Makes a settings error name each setting as the operator gave it. clap
/// names an argument by its flag (`--access-token-ttl`) even when the value
/// came from its environment variable, a flag the operator may never have
/// typed; for those, the error names the variable instead
/// (`invalid value 'banana' for 'SEALPOST_ACCESS_TOKEN_TTL'`). A required
/// setting that is missing was given neither way: it is named both ways
/// (`SEALPOST_TLS_KEY (--tls-key <TLS_KEY>)`).
///
/// clap builds the error while parsing, before there are matches to ask
/// where a value came from, so this asks the command line: clap reads a
/// variable only for an argument `args` (the arguments, without the program
/// name) does not hold. `command` is the command that parsed them, whose
/// subcommands are searched for the argument. Errors of our own value
/// parsers are already written with the right name (see [`setting_name`]).
pub fn name_as_given(
    mut err: clap::Error,
    command: &clap::Command,
    args: &[std::ffi::OsString],
) -> clap::Error {
    // A setting required by another (`--tls-key` with `--tls-cert`) was
    // given neither way: name both, the variable first.
    if err.kind() == ErrorKind::MissingRequiredArgument {
        if let Some(ContextValue::Strings(missing)) = err.get(ContextKind::InvalidArg) {
            let named = missing
                .iter()
                .map(
                    |shown| match find_arg(command, shown).and_then(clap::Arg::get_env) {
                        Some(env) => format!("{} ({shown})", env.to_string_lossy()),
                        None => shown.clone(),
                    },
                )
                .collect();
            err.insert(ContextKind::InvalidArg, ContextValue::Strings(named));
        }
        return err;
    }
    for kind in [ContextKind::InvalidArg, ContextKind::PriorArg] {
        let renamed = match err.get(kind) {
            Some(ContextValue::String(shown)) => {
                env_given(command, args, shown).map(ContextValue::String)
            }
            // A conflict with several others.
            Some(ContextValue::Strings(shown)) => {
                let names: Vec<_> = shown
                    .iter()
                    .map(|s| env_given(command, args, s).unwrap_or_else(|| s.clone()))
                    .collect();
                (&names != shown).then_some(ContextValue::Strings(names))
            }
            _ => None,
        };
        if let Some(renamed) = renamed {
            err.insert(kind, renamed);
        }
    }
    err
}

/// The environment variable that set the argument clap shows as `shown`
/// (`--addr <ADDR>`), when the command line did not.
fn env_given(command: &clap::Command, args: &[std::ffi::OsString], shown: &str) -> Option<String> {
    let arg = find_arg(command, shown)?;
    let env = arg.get_env()?;
    let flag = format!("--{}", arg.get_long()?);
    let typed = args
        .iter()
        .filter_map(|a| a.to_str())
        .take_while(|a| *a != "--")
        .any(|a| {
            a == flag
                || a.strip_prefix(flag.as_str())
                    .is_some_and(|v| v.starts_with('='))
        });
    (!typed && std::env::var_os(env).is_some()).then(|| env.to_string_lossy().into_owned())
}

/// The argument of `command` or of one of its subcommands that clap shows
/// as `shown`: its flag, then its value names.
fn find_arg<'a>(command: &'a clap::Command, shown: &str) -> Option<&'a clap::Arg> {
    let shows = |arg: &clap::Arg| {
        arg.get_long().is_some_and(|long| {
            shown
                .strip_prefix("--")
                .and_then(|rest| rest.strip_prefix(long))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        })
    };
    command.get_arguments().find(|arg| shows(arg)).or_else(|| {
        command
            .get_subcommands()
            .find_map(|sub| find_arg(sub, shown))
    })
}

/// How an error of our own value parsers names `arg`: by its environment
/// variable when the value came from there, else as clap shows the flag.
fn setting_name(arg: Option<&clap::Arg>, source: ValueSource, fallback: &str) -> String {
    match (source, arg.and_then(clap::Arg::get_env)) {
        (ValueSource::EnvVariable, Some(env)) => env.to_string_lossy().into_owned(),
        _ => arg.map_or_else(|| fallback.to_owned(), ToString::to_string),
    }
}

/// A NATS subject token: no dots, wildcards or whitespace.
fn parse_subject_token(value: &str) -> Result<String, String> {
    short_name(value, &['-', '_'])
        .ok_or_else(|| "must be 1-64 letters, digits, `-` or `_` (one NATS subject token)".into())
}

fn parse_node_id(value: &str) -> Result<String, String> {
    short_name(value, &['-', '_', '.'])
        .ok_or_else(|| "must be 1-64 letters, digits, `-`, `_` or `.`".into())
}

/// `value` if it is 1-64 ASCII letters, digits and `extra` characters.
fn short_name(value: &str, extra: &[char]) -> Option<String> {
    let ok = (1..=64).contains(&value.len())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(&c));
    ok.then(|| value.to_owned())
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

    pub fn as_str(&self) -> &str {
        &self.0
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

/// `--insecure-test-hashing`, allowed only in a `debug_build` (the test
/// suite's): a release build refuses it rather than hash passwords below
/// OWASP's floor, whatever its environment says.
fn insecure_test_hashing(on: bool, debug_build: bool) -> Result<bool, String> {
    if on && !debug_build {
        return Err(
            "is for the test suite's debug builds only: a release build always hashes \
                    passwords with OWASP's argon2id parameters"
                .into(),
        );
    }
    Ok(on)
}

fn parse_secret(value: &str) -> Result<Secret, String> {
    if value.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "must be at least {MIN_SECRET_BYTES} bytes, got {}",
            value.len()
        ));
    }
    Ok(Secret(value.to_owned()))
}

fn parse_ip_net(value: &str) -> Result<ipnet::IpNet, String> {
    let value = value.trim();
    value
        .parse::<ipnet::IpNet>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("`{value}` is not an IP address or CIDR range"))
}

/// The browser origins allowed by `SEALPOST_CORS_ORIGINS`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Origins(Vec<HeaderValue>);

impl Origins {
    pub fn iter(&self) -> impl Iterator<Item = &HeaderValue> {
        self.0.iter()
    }
}

/// A comma-separated list; empty (or an empty variable) allows none.
fn parse_origins(value: &str) -> Result<Origins, String> {
    value
        .split(',')
        .filter(|origin| !origin.trim().is_empty())
        .map(parse_origin)
        .collect::<Result<_, _>>()
        .map(Origins)
}

/// An origin as a browser sends it: `scheme://host[:port]`, no path. Kept in
/// lower case, as browsers serialise it, so it compares byte for byte with
/// the `Origin` header.
fn parse_origin(value: &str) -> Result<HeaderValue, String> {
    let value = value.trim().to_ascii_lowercase();
    if value == "*" || value == "null" {
        return Err(format!(
            "`{value}` is not allowed: list exact origins such as https://chat.example.com"
        ));
    }
    let expected = || format!("`{value}` is not an origin like https://chat.example.com");
    let uri: Uri = value.parse().map_err(|_| expected())?;
    // Exactly `scheme://authority`: no path (not even `/`), query, fragment
    // or credentials, none of which an `Origin` header carries.
    let exact = match (uri.scheme_str(), uri.authority()) {
        (Some(scheme @ ("http" | "https")), Some(authority)) => {
            !authority.as_str().contains('@') && value == format!("{scheme}://{authority}")
        }
        _ => false,
    };
    if !exact {
        return Err(expected());
    }
    HeaderValue::from_str(&value).map_err(|_| expected())
}

/// Parses a secret setting (`--jwt-secret`, `--storage-keys`,
/// `--database-url`) with the function it holds. Unlike a plain
/// `value_parser` function, whose errors quote the rejected value (clap's
/// `invalid value '<value>' for ...`), its errors never print the value.
#[derive(Clone)]
struct Masked<T>(fn(&str) -> Result<T, String>);

impl<T: Clone + Send + Sync + 'static> TypedValueParser for Masked<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        self.parse_ref_(cmd, arg, value, ValueSource::CommandLine)
    }

    // What clap calls: with where the value came from, to name it so.
    fn parse_ref_(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
        source: ValueSource,
    ) -> Result<T, clap::Error> {
        let name = setting_name(arg, source, "the secret");
        let invalid = |reason: String| {
            clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid value for '{name}': {reason}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| invalid("not valid UTF-8".into()))?;
        (self.0)(text).map_err(invalid)
    }
}

/// The largest `*_FILE` secret read: a URL, a secret or a key list is far
/// smaller, and a path to something endless (`/dev/zero`) must not be read
/// to the end.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Parses a `*_FILE` setting: reads the file it names and parses the content,
/// without its trailing line break, as the direct setting would. Errors name
/// the setting and the file; like [`Masked`]'s, they never quote the
/// content.
#[derive(Clone)]
struct FromFile<T>(fn(&str) -> Result<T, String>);

impl<T: Clone + Send + Sync + 'static> TypedValueParser for FromFile<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        self.parse_ref_(cmd, arg, value, ValueSource::CommandLine)
    }

    // What clap calls: with where the value came from, to name it so.
    fn parse_ref_(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
        source: ValueSource,
    ) -> Result<T, clap::Error> {
        let name = setting_name(arg, source, "--*-file");
        let path = std::path::Path::new(value);
        let invalid = |reason: String| {
            clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid value for '{name}': {}: {reason}\n", path.display()),
            )
            .with_cmd(cmd)
        };
        let text = read_secret_file(path).map_err(invalid)?;
        (self.0)(&text).map_err(invalid)
    }
}

/// The content of a secret file, without the line break(s) an editor or
/// `echo` leaves at its end.
fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!("larger than {MAX_SECRET_FILE_BYTES} bytes"));
    }
    let mut text = String::from_utf8(bytes).map_err(|_| "not valid UTF-8".to_owned())?;
    let kept = text.trim_end_matches(['\r', '\n']).len();
    text.truncate(kept);
    if text.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(text)
}

/// A database URL, given or read from a file. The scheme is checked where
/// the store is opened. A PostgreSQL URL may not carry a password-like
/// parameter the driver does not read (libpq's `sslpassword`): sqlx logs
/// each parameter it ignores with its value, which would write that
/// password to the log at every start.
fn parse_database_url(value: &str) -> Result<String, String> {
    let url = value.trim();
    if crate::store::is_postgres(url) {
        let query = url.split_once('?').map_or("", |(_, query)| query);
        let query = query.split_once('#').map_or(query, |(query, _)| query);
        for key in query.split('&').filter_map(|pair| pair.split('=').next()) {
            if key != "password" && key.to_ascii_lowercase().contains("password") {
                return Err(format!(
                    "the parameter `{key}` is not supported (its value would be logged)"
                ));
            }
        }
    }
    Ok(url.to_owned())
}

fn parse_ack_window(value: &str) -> Result<Duration, String> {
    let window = humantime::parse_duration(value)
        .map_err(|e| format!("{e} (use human units such as 0ms, 5ms, 100ms)"))?;
    if window > Duration::from_secs(10) {
        return Err("must be at most 10s: held messages wait in memory".into());
    }
    Ok(window)
}

/// The longest `--db-timeout`: past a minute every client and proxy in
/// front has given up, and the committer's budget would hold a minute of
/// traffic in memory.
const MAX_DB_TIMEOUT: Duration = Duration::from_secs(60);

fn parse_db_timeout(value: &str) -> Result<Duration, String> {
    let timeout = parse_ttl(value)?;
    if timeout > MAX_DB_TIMEOUT {
        return Err("must be at most 60s: clients have given up long before".into());
    }
    Ok(timeout)
}

/// The longest `--refresh-grace`: it is a window in which a stolen, spent
/// token still opens the session, so it is sized to a lost answer's retry
/// (seconds), not to a device that was offline.
const MAX_REFRESH_GRACE: Duration = Duration::from_secs(600);

fn parse_refresh_grace(value: &str) -> Result<Duration, String> {
    if value.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let grace = humantime::parse_duration(value)
        .map_err(|e| format!("{e} (use human units such as 0, 10s, 30s, 2m)"))?;
    if grace > MAX_REFRESH_GRACE {
        return Err("must be at most 10m: a spent token is good again within it".into());
    }
    Ok(grace)
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
    fn the_refresh_grace_may_be_off_but_not_long() {
        assert_eq!(parse(&[]).unwrap().refresh_grace, Duration::from_secs(30));
        let off = parse(&["--refresh-grace", "0"]).unwrap();
        assert_eq!(off.refresh_grace, Duration::ZERO);
        let short = parse(&["--refresh-grace", "2s"]).unwrap();
        assert_eq!(short.refresh_grace, Duration::from_secs(2));
        assert!(parse(&["--refresh-grace", "11m"]).is_err());
        assert!(parse(&["--refresh-grace", "soon"]).is_err());
    }

    #[test]
    fn the_pair_limit_is_off_with_the_send_budget() {
        assert_eq!(parse(&[]).unwrap().pair_rate_per_second(), 2);
        let pairs = parse(&["--pair-rate-per-second", "5"]).unwrap();
        assert_eq!(pairs.pair_rate_per_second(), 5);
        let off = parse(&["--send-rate-per-second", "0"]).unwrap();
        assert_eq!(off.pair_rate_per_second(), 0);
    }

    #[test]
    fn cheap_test_hashing_is_for_debug_builds_only() {
        assert!(!parse(&[]).unwrap().insecure_test_hashing);
        // The suite's builds are debug builds.
        let on = parse(&["--insecure-test-hashing", "1"]).unwrap();
        assert!(on.insecure_test_hashing);
        assert!(insecure_test_hashing(true, false).is_err());
        assert_eq!(insecure_test_hashing(false, false), Ok(false));
        assert_eq!(insecure_test_hashing(true, true), Ok(true));
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
    fn db_timeout_is_bounded() {
        assert_eq!(parse(&[]).unwrap().db_timeout, Duration::from_secs(5));
        assert_eq!(
            parse(&["--db-timeout", "750ms"]).unwrap().db_timeout,
            Duration::from_millis(750)
        );
        for bad in ["0s", "61s", "soon"] {
            let err = parse(&["--db-timeout", bad]).unwrap_err().to_string();
            assert!(err.contains("--db-timeout"), "{bad}: {err}");
        }
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
    fn cors_origins_are_exact_origins() {
        let config = parse(&[
            "--cors-origins",
            "https://chat.example.com, http://LOCALHOST:3000",
        ])
        .unwrap();
        assert_eq!(
            config.cors_origins.iter().collect::<Vec<_>>(),
            ["https://chat.example.com", "http://localhost:3000"]
        );
        assert!(config.origin_allowed(&HeaderValue::from_static("http://localhost:3000")));
        assert!(!config.origin_allowed(&HeaderValue::from_static("https://evil.example")));
        assert_eq!(parse(&[]).unwrap().cors_origins, Origins::default());
        assert_eq!(
            parse(&["--cors-origins", ""]).unwrap().cors_origins,
            Origins::default()
        );
        for bad in [
            "*",
            "null",
            "chat.example.com",
            "https://chat.example.com/",
            "https://chat.example.com/app",
            "ftp://chat.example.com",
            "https://",
            "https://user@chat.example.com",
            "https://chat.example.com?x",
        ] {
            let err = parse(&["--cors-origins", bad]).unwrap_err().to_string();
            assert!(err.contains("--cors-origins"), "{bad}: {err}");
        }
    }

    #[test]
    fn tls_needs_both_cert_and_key() {
        let err = parse(&["--tls-cert", "cert.pem"]).unwrap_err().to_string();
        assert!(err.contains("--tls-key"), "{err}");
        let err = parse(&["--tls-key", "key.pem"]).unwrap_err().to_string();
        assert!(err.contains("--tls-cert"), "{err}");
        let config = parse(&["--tls-cert", "cert.pem", "--tls-key", "key.pem"]).unwrap();
        assert!(config.serves_tls());
        assert!(!parse(&[]).unwrap().serves_tls());
    }

    #[test]
    fn bad_storage_keys_name_the_setting_and_hide_the_value() {
        let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let err = parse(&["--storage-keys", &format!("0:{key}")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--storage-keys"), "{err}");
        assert!(!err.contains("AAEC"), "{err}");
        let config = parse(&["--storage-keys", &format!("2:{key}")]).unwrap();
        assert_eq!(config.storage_keys.as_ref().unwrap().current(), 2);
        assert!(!format!("{config:?}").contains("AAEC"));
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given() {
        assert_eq!(parse(&[]).unwrap().metrics_addr, None);
        let config = parse(&["--metrics-addr", "127.0.0.1:9090"]).unwrap();
        assert_eq!(config.metrics_addr, Some("127.0.0.1:9090".parse().unwrap()));
        let err = parse(&["--metrics-addr", "9090"]).unwrap_err().to_string();
        assert!(err.contains("--metrics-addr"), "{err}");
    }

    #[test]
    fn secrets_come_from_files_without_their_line_break() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, content: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            path.display().to_string()
        };
        let secret = "s".repeat(40);
        let jwt = file("jwt", &format!("{secret}\r\n\n"));
        let url = file("url", "postgres://u:p@db/x\n");
        let config = parse(&["--jwt-secret-file", &jwt, "--database-url-file", &url]).unwrap();
        assert_eq!(config.jwt_secret().unwrap().expose(), secret.as_bytes());
        assert_eq!(config.database_url(), "postgres://u:p@db/x");
        assert!(!format!("{config:?}").contains("u:p@db"));
        assert_eq!(parse(&[]).unwrap().database_url(), "sqlite://sealpost.db");

        let err = parse(&["--jwt-secret", &secret, "--jwt-secret-file", &jwt])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--jwt-secret-file"), "{err}");
        let short = file("short", "hunter2\n");
        let err = parse(&["--jwt-secret-file", &short])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--jwt-secret-file") && err.contains("short"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_bad_jwt_secret_is_named_and_not_quoted() {
        let err = parse(&["--jwt-secret", "hunter2-is-short"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--jwt-secret") && err.contains("at least 32 bytes"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_database_url_whose_password_parameter_would_be_logged_is_refused() {
        let url = "postgres://u:pw@db/x?sslmode=require&sslpassword=hunter2";
        let err = parse(&["--database-url", url]).unwrap_err().to_string();
        assert!(
            err.contains("--database-url") && err.contains("sslpassword"),
            "{err}"
        );
        assert!(!err.contains("hunter2") && !err.contains("u:pw"), "{err}");
        let url = "postgres://u:pw@db/x?sslmode=require&password=pw";
        assert_eq!(parse(&["--database-url", url]).unwrap().database_url(), url);
        // SQLite URLs carry no password.
        let url = "sqlite://sslpassword.db";
        assert_eq!(parse(&["--database-url", url]).unwrap().database_url(), url);
    }

    #[test]
    fn the_queue_cap_has_a_new_name_and_keeps_its_former_one() {
        let config = parse(&[]).unwrap();
        assert_eq!(
            config.max_queued_per_device(),
            DEFAULT_MAX_QUEUED_PER_DEVICE
        );
        assert_eq!(config.former_names(), Ok(vec![]));

        let config = parse(&["--max-queued-per-device", "7"]).unwrap();
        assert_eq!(config.max_queued_per_device(), 7);
        assert_eq!(config.former_names(), Ok(vec![]));

        let config = parse(&["--max-queued-per-user", "5"]).unwrap();
        assert_eq!(config.max_queued_per_device(), 5);
        let warnings = config.former_names().unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        for name in [
            "SEALPOST_MAX_QUEUED_PER_USER (--max-queued-per-user)",
            "SEALPOST_MAX_QUEUED_PER_DEVICE (--max-queued-per-device)",
        ] {
            assert!(warnings[0].contains(name), "{name}: {warnings:?}");
        }

        // Both, agreeing: a migration half done, warned of.
        let both = ["--max-queued-per-user", "5", "--max-queued-per-device", "5"];
        let config = parse(&both).unwrap();
        assert_eq!(config.max_queued_per_device(), 5);
        assert_eq!(config.former_names().unwrap().len(), 1);
        // Both, disagreeing: which one was meant is not for us to guess.
        let both = ["--max-queued-per-user", "5", "--max-queued-per-device", "0"];
        let err = parse(&both).unwrap().former_names().unwrap_err();
        assert!(
            err.contains("SEALPOST_MAX_QUEUED_PER_USER (--max-queued-per-user) is 5"),
            "{err}"
        );
        assert!(
            err.contains("SEALPOST_MAX_QUEUED_PER_DEVICE (--max-queued-per-device) is 0"),
            "{err}"
        );
    }

    #[test]
    fn settings_are_named_by_variable_and_flag() {
        // Every name a message after parsing uses.
        for (env, flag) in [
            ("DATABASE_URL", "--database-url"),
            ("SEALPOST_ADDR", "--addr"),
            ("SEALPOST_METRICS_ADDR", "--metrics-addr"),
            ("SEALPOST_JWT_SECRET", "--jwt-secret"),
            ("SEALPOST_STORAGE_KEYS", "--storage-keys"),
            ("SEALPOST_TLS_CERT", "--tls-cert"),
            ("SEALPOST_TLS_KEY", "--tls-key"),
            ("SEALPOST_NATS_URL", "--nats-url"),
            ("SEALPOST_NATS_CREDENTIALS", "--nats-credentials"),
            ("SEALPOST_MAX_QUEUED_PER_USER", "--max-queued-per-user"),
            ("SEALPOST_MAX_QUEUED_PER_DEVICE", "--max-queued-per-device"),
        ] {
            assert_eq!(both_names(env), format!("{env} ({flag})"));
            assert_eq!(not_set(env), format!("{env} is not set (nor {flag})"));
        }
        assert_eq!(both_names("NOT_A_SETTING"), "NOT_A_SETTING");
    }

    #[test]
    fn a_missing_required_setting_is_named_both_ways() {
        let err = parse(&["--tls-cert", "cert.pem"]).unwrap_err().to_string();
        assert!(
            err.contains("SEALPOST_TLS_KEY (--tls-key <TLS_KEY>)"),
            "{err}"
        );
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
