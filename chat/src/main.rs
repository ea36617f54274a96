//! `sealpost-chat`: a terminal client of sealpost on `sealpost-client`.
//!
//! The device's identity (server, username, device id and its secret key)
//! lives in a local state file written with mode 0600, so the key never
//! leaves this machine. The password is asked on standard input, or taken
//! from `SEALPOST_PASSWORD`; no token is stored.
//!
//! ```text
//! sealpost-chat --server http://127.0.0.1:8080 register alice
//! sealpost-chat add-device alice --name laptop     # this machine as a new device
//! sealpost-chat devices
//! sealpost-chat send bob "hello"
//! sealpost-chat listen                             # print what arrives, ack it
//! sealpost-chat chat bob                           # one line, one message
//! ```
//!
//! With `--json` every output line is one JSON object.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sealpost_client::{Client, ConnectOptions, DeviceKeys, Event, Incoming};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

#[derive(Parser)]
#[command(version, about = "Terminal chat over sealpost")]
struct Cli {
    /// The server's root URL; saved in the state file at register or
    /// add-device.
    #[arg(long, env = "SEALPOST_SERVER")]
    server: Option<String>,
    /// This device's state file (key, username, device id).
    #[arg(
        long,
        env = "SEALPOST_CHAT_STATE",
        default_value = "sealpost-chat.json"
    )]
    state: PathBuf,
    /// One JSON object per output line.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create an account, with this machine as its first device.
    Register { username: String },
    /// Add this machine as a new device of an existing account.
    AddDevice {
        username: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Check that this device can sign in.
    Login,
    /// List the account's devices.
    Devices,
    /// Send one message to a user (a username or a user id).
    Send { user: String, text: String },
    /// Print every message that arrives, and acknowledge it.
    Listen,
    /// Chat with one user: each line read is sent, what they send is shown.
    Chat { user: String },
}

/// What the state file holds.
#[derive(Serialize, Deserialize)]
struct State {
    server: String,
    username: String,
    device_id: u32,
    keys: DeviceKeys,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = Output { json: cli.json };
    match &cli.command {
        Command::Register { username } => {
            let server = cli
                .server
                .clone()
                .context("--server is needed to register")?;
            let keys = DeviceKeys::generate();
            let client = Client::register(&server, username, &password()?, keys.clone()).await?;
            save(&cli.state, &server, &client)?;
            out.line(
                json!({ "registered": username, "user_id": client.user_id(), "device_id": client.device_id() }),
                format!("registered {username} ({}), device {}", client.user_id(), client.device_id()),
            );
        }
        Command::AddDevice { username, name } => {
            let server = cli
                .server
                .clone()
                .context("--server is needed to add a device")?;
            let client = Client::add_device(
                &server,
                username,
                &password()?,
                DeviceKeys::generate(),
                name.as_deref(),
            )
            .await?;
            save(&cli.state, &server, &client)?;
            out.line(
                json!({ "added_device": client.device_id(), "user_id": client.user_id() }),
                format!(
                    "this machine is device {} of {username}",
                    client.device_id()
                ),
            );
        }
        Command::Login => {
            let client = login(&cli).await?;
            out.line(
                json!({ "user_id": client.user_id(), "device_id": client.device_id() }),
                format!(
                    "signed in as {} device {}",
                    client.username(),
                    client.device_id()
                ),
            );
        }
        Command::Devices => {
            let client = login(&cli).await?;
            for d in client.devices().await? {
                out.line(
                    json!({ "device_id": d.device_id, "name": d.name, "current": d.current, "last_seen_at": d.last_seen_at }),
                    format!(
                        "{}{} {}",
                        d.device_id,
                        if d.current { "*" } else { " " },
                        d.name.as_deref().unwrap_or("(unnamed)")
                    ),
                );
            }
        }
        Command::Send { user, text } => {
            let client = login(&cli).await?;
            let to = resolve(&client, user).await?;
            let sent = client.send(to, text).await?;
            out.line(
                json!({ "sent": sent.id, "client_id": sent.client_id, "sent_at": sent.sent_at }),
                format!("sent {}", sent.id),
            );
        }
        Command::Listen => {
            let client = login(&cli).await?;
            let mut events = client.connect(ConnectOptions::default())?;
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    event = events.next() => match event {
                        Some(event) => show(&out, &client, event, None).await?,
                        None => break,
                    },
                }
            }
        }
        Command::Chat { user } => {
            let client = login(&cli).await?;
            let peer = resolve(&client, user).await?;
            let mut events = client.connect(ConnectOptions::default())?;
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break,
                    event = events.next() => match event {
                        Some(event) => show(&out, &client, event, Some(peer)).await?,
                        None => break,
                    },
                    line = lines.next_line() => match line? {
                        Some(line) if line.trim().is_empty() => {}
                        Some(line) => {
                            // Sent in the background, so that what arrives
                            // meanwhile is still shown.
                            let client = client.clone();
                            tokio::spawn(async move {
                                match client.send(peer, &line).await {
                                    Ok(sent) => out.line(json!({ "sent": sent.id }), format!("  (sent {})", sent.id)),
                                    Err(e) => out.line(json!({ "error": e.to_string() }), format!("  (not sent: {e})")),
                                }
                            });
                        }
                        None => break,
                    },
                }
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    fn line(&self, json: serde_json::Value, text: String) {
        let mut stdout = std::io::stdout().lock();
        let _ = if self.json {
            writeln!(stdout, "{json}")
        } else {
            writeln!(stdout, "{text}")
        };
    }
}

/// Prints one event; acknowledges messages once printed. In a chat,
/// messages of other conversations are shown but marked.
async fn show(out: &Output, client: &Client, event: Event, peer: Option<Uuid>) -> Result<()> {
    match event {
        Event::Message(m) => {
            print_message(out, client, &m, peer);
            if !m.ephemeral {
                client.ack(&[m.id]).await?;
            }
        }
        Event::Undecryptable { id, from, .. } => out.line(
            json!({ "undecryptable": id, "from": from }),
            format!("! a message from {from} could not be read"),
        ),
        Event::Receipt { id, device_id, .. } => out.line(
            json!({ "receipt": id, "device_id": device_id }),
            format!("  (delivered to device {device_id})"),
        ),
        Event::DevicesChanged { devices, added } => {
            let ids: Vec<u32> = devices.iter().map(|d| d.device_id).collect();
            out.line(
                json!({ "devices": ids, "added": added }),
                if added.is_empty() {
                    format!("! your devices are now {ids:?}")
                } else {
                    format!("! NEW device(s) {added:?} on your account: if that was not you, change your password")
                },
            );
        }
        Event::State(state) => {
            if out.json {
                out.line(json!({ "state": format!("{state:?}") }), String::new());
            } else {
                eprintln!("[{state:?}]");
            }
        }
        _ => {}
    }
    Ok(())
}

fn print_message(out: &Output, client: &Client, m: &Incoming, peer: Option<Uuid>) {
    let mine = m.from == client.user_id();
    let other = match (peer, mine) {
        (Some(peer), false) => m.from != peer,
        (Some(peer), true) => m.to != Some(peer),
        (None, _) => false,
    };
    let who = if mine {
        format!(
            "me (device {}) to {}",
            m.from_device,
            m.to.map(|t| t.to_string()).unwrap_or_default()
        )
    } else {
        m.from.to_string()
    };
    out.line(
        json!({ "id": m.id, "from": m.from, "from_device": m.from_device, "to": m.to, "text": m.text,
                "ts": m.ts, "sent_at": m.sent_at, "ephemeral": m.ephemeral }),
        format!("{}{} {who}: {}", if other { "[other chat] " } else { "" }, m.ts.format("%H:%M"), m.text),
    );
}

async fn resolve(client: &Client, user: &str) -> Result<Uuid> {
    if let Ok(id) = user.parse::<Uuid>() {
        return Ok(id);
    }
    Ok(client.find_user(user).await?.id)
}

async fn login(cli: &Cli) -> Result<Client> {
    let state = load(&cli.state)?;
    let server = cli.server.clone().unwrap_or(state.server);
    Ok(Client::login(
        &server,
        &state.username,
        &password()?,
        state.device_id,
        state.keys,
    )
    .await?)
}

fn password() -> Result<String> {
    if let Ok(password) = std::env::var("SEALPOST_PASSWORD") {
        return Ok(password);
    }
    eprint!("password: ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        bail!("no password given");
    }
    Ok(password)
}

fn load(path: &Path) -> Result<State> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "no state at {} (register or add-device first)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("unreadable state at {}", path.display()))
}

/// Writes the state file readable by its owner only: it holds the secret
/// key.
fn save(path: &Path, server: &str, client: &Client) -> Result<()> {
    let state = State {
        server: server.to_owned(),
        username: client.username().to_owned(),
        device_id: client.device_id(),
        keys: client.keys().clone(),
    };
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.write_all(serde_json::to_string_pretty(&state)?.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}
