//! `sealpost-chat`: a terminal client of sealpost on `sealpost-client`.
//! How to use it: `chat/README.md`.
//!
//! The device's identity (server, username, device id and its secret key)
//! and its session live in a local state file written with mode 0600, so
//! the key never leaves this machine and commands after sign-up ask no
//! password while the session lives ([`state`]). The password is asked on
//! the terminal without echo (twice at sign-up), or taken from
//! `SEALPOST_PASSWORD`.
//!
//! ```text
//! sealpost-chat register alice                     # server: http://127.0.0.1:8080
//! sealpost-chat add-device alice --name laptop     # this machine as a new device
//! sealpost-chat devices
//! sealpost-chat send bob "hello"
//! sealpost-chat listen                             # print what arrives, ack it
//! sealpost-chat chat bob                           # one line, one message
//!   /group friends bob carol                       # ...then lines go to a group
//! sealpost-chat logout                             # end the stored session
//! ```
//!
//! With `--json` every output line is one JSON object.
//!
//! # Layout
//!
//! - `main`: the commands, and signing in (stored session, else password).
//! - [`state`]: the state file and the lock on its session.
//! - [`input`]: the chat's input line on a terminal (raw mode), or plain
//!   lines elsewhere.
//! - [`show`]: events as lines a person reads: names, receipts, typing.

mod input;
mod show;
mod state;

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use sealpost_client::{Client, ConnectOptions, DeviceKeys, Error, Group};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::input::{Input, Key};
use crate::show::{Output, Shown};
use crate::state::{SessionLock, State};

/// Where `register` and `add-device` go without `--server`: a server
/// started on this machine with its defaults.
const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";
/// A `typing` is sent again this often while the user types: readers
/// show it for 5 s after the last one (`protocol.md`).
const TYPING_EVERY: Duration = Duration::from_secs(3);
/// Send results waiting for the chat loop to print them.
const RESULTS: usize = 64;

#[derive(Parser)]
#[command(version, about = "Terminal chat over sealpost (see chat/README.md)")]
struct Cli {
    /// The server's root URL. `register` and `add-device` save it in the
    /// state file (default http://127.0.0.1:8080); later commands use the
    /// saved one unless this is given.
    #[arg(long, env = "SEALPOST_SERVER")]
    server: Option<String>,
    /// This device's state file (key, username, device id, session).
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
    /// End the stored session on the server; the next command asks for
    /// the password.
    Logout,
    /// List the account's devices.
    Devices,
    /// Send one message to a user (a username or a user id).
    Send { user: String, text: String },
    /// Print every message that arrives, and acknowledge it.
    Listen,
    /// Chat with one user: each line typed is sent, what they send is
    /// shown. Ctrl-C quits.
    Chat { user: String },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = Output { json: cli.json };
    match &cli.command {
        Command::Register { username } => {
            state::refuse_existing(&cli.state, "register")?;
            let server = cli.server.as_deref().unwrap_or(DEFAULT_SERVER);
            let password = new_password(username)?;
            let keys = DeviceKeys::generate();
            let client = Client::register(server, username, &password, keys).await?;
            create_state(&cli.state, server, &client)?;
            out.line(
                json!({ "registered": username, "user_id": client.user_id(), "device_id": client.device_id() }),
                format!(
                    "registered {username} ({}), device {}; this device's key and session are in {}",
                    client.user_id(),
                    client.device_id(),
                    cli.state.display()
                ),
            );
        }
        Command::AddDevice { username, name } => {
            state::refuse_existing(&cli.state, "add-device")?;
            let server = cli.server.as_deref().unwrap_or(DEFAULT_SERVER);
            let password = password(&format!("password of {username}: "))?;
            let client = Client::add_device(
                server,
                username,
                &password,
                DeviceKeys::generate(),
                name.as_deref(),
            )
            .await?;
            create_state(&cli.state, server, &client)?;
            out.line(
                json!({ "added_device": client.device_id(), "user_id": client.user_id() }),
                format!(
                    "this machine is device {} of {username}; its key and session are in {}",
                    client.device_id(),
                    cli.state.display()
                ),
            );
        }
        Command::Login => {
            let signed = sign_in(&cli).await?;
            let client = &signed.client;
            out.line(
                json!({ "user_id": client.user_id(), "device_id": client.device_id(), "resumed": signed.resumed }),
                format!(
                    "signed in as {} device {}{}",
                    client.username(),
                    client.device_id(),
                    if signed.resumed {
                        " (stored session)"
                    } else {
                        ""
                    }
                ),
            );
        }
        Command::Logout => {
            let signed = sign_in(&cli).await?;
            signed.forget_session()?;
            signed.client.logout().await?;
            out.line(
                json!({ "logged_out": true }),
                "signed out; the next command asks for the password".into(),
            );
        }
        Command::Devices => {
            let client = sign_in(&cli).await?.client;
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
            let client = sign_in(&cli).await?.client;
            let (to, name) = resolve(&client, user).await?;
            let sent = client.send(to, text).await?;
            out.line(
                json!({ "sent": sent.id, "client_id": sent.client_id, "sent_at": sent.sent_at }),
                format!("sent to {name}"),
            );
        }
        Command::Listen => {
            let signed = sign_in(&cli).await?;
            let client = signed.client.clone();
            let mut events = client.connect(ConnectOptions::default())?;
            let mut shown = Shown::new(client.clone(), None);
            let mut input = Input::none();
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::pin!(ctrl_c);
            loop {
                tokio::select! {
                    _ = &mut ctrl_c => break,
                    event = events.next() => match event {
                        Some(event) => {
                            if shown.event(&out, &mut input, event).await? {
                                break;
                            }
                        }
                        None => break,
                    },
                }
            }
        }
        Command::Chat { user } => {
            let signed = sign_in(&cli).await?;
            chat(&out, &signed.client, user).await?;
        }
    }
    Ok(())
}

/// Where the chat's lines go: one user, or a group.
#[derive(Clone)]
enum Target {
    User(Uuid, String),
    Group(Group),
}

impl Target {
    fn prompt(&self) -> String {
        match self {
            Target::User(_, name) => format!("to {name}> "),
            Target::Group(group) => format!("to #{}> ", group.name),
        }
    }
}

/// What the chat's `/` commands do, for `/help` and a command it does not
/// know.
const CHAT_HELP: &str = "/group NAME USER USER... makes a group of you and the users and chats in it; \
/to USER or /to #GROUP switches the conversation; /groups lists the groups known; \
//TEXT sends /TEXT";

/// The chat loop: lines typed go to `user` (or, after `/group` or
/// `/to #GROUP`, to a group), events are shown, Ctrl-C quits at once.
async fn chat(out: &Output, client: &Client, user: &str) -> Result<()> {
    let (peer, name) = resolve(client, user).await?;
    let mut events = client.connect(ConnectOptions::default())?;
    let mut shown = Shown::new(client.clone(), Some((peer, name.clone())));
    let mut target = Target::User(peer, name.clone());
    let mut input = Input::start(&target.prompt(), out.json)?;
    if !out.json {
        input.print(&format!(
            "chatting with {name} as {}: Enter sends, Ctrl-C quits, /help for groups",
            client.username()
        ));
    }
    let (results, mut sent) = mpsc::channel(RESULTS);
    let mut last_typing: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Ctrl-C is the signal without a terminal; on one (raw mode) it is a
    // key, and the signal comes only from `kill -INT`.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            key = input.next() => match key {
                Key::Quit => break,
                Key::Line(line) if line.trim().is_empty() => {}
                Key::Line(line) if line.starts_with('/') && !line.starts_with("//") => {
                    if let Some(next) = chat_command(out, client, &mut shown, &mut input, &line).await {
                        if let Target::User(peer, _) = &target
                            && last_typing.take().is_some()
                        {
                            typing(client, *peer, true);
                        }
                        match &next {
                            Target::User(peer, name) => shown.switch(Some((*peer, name.clone())), None),
                            Target::Group(group) => shown.switch(None, Some(group.id)),
                        }
                        input.set_prompt(&next.prompt());
                        target = next;
                    }
                }
                Key::Line(line) => {
                    last_typing = None;
                    let line = line.strip_prefix('/').filter(|l| l.starts_with('/')).map(str::to_owned).unwrap_or(line);
                    let number = shown.outgoing(out, &mut input, &line);
                    // Sent in the background, so that what arrives
                    // meanwhile is still shown; the result comes back here.
                    let client = client.clone();
                    let results = results.clone();
                    let to = match &target {
                        // The group as last seen: a member's message may
                        // have renamed it or changed its members.
                        Target::Group(group) => Target::Group(shown.group(group.id).cloned().unwrap_or_else(|| group.clone())),
                        other => other.clone(),
                    };
                    tokio::spawn(async move {
                        let result = match &to {
                            Target::User(peer, _) => client.send(*peer, &line).await,
                            Target::Group(group) => client.send_group(group, &line).await,
                        };
                        let _ = results.send((number, line, result)).await;
                    });
                }
                Key::Edited { empty } => {
                    // Typing is told to one peer, not to a group.
                    let Target::User(peer, _) = &target else { continue };
                    let peer = *peer;
                    let due = last_typing.is_none_or(|at| at.elapsed() >= TYPING_EVERY);
                    if empty && last_typing.is_some() {
                        last_typing = None;
                        typing(client, peer, true);
                    } else if !empty && due {
                        last_typing = Some(Instant::now());
                        typing(client, peer, false);
                    }
                }
            },
            event = events.next() => match event {
                Some(event) => {
                    if shown.event(out, &mut input, event).await? {
                        break;
                    }
                }
                None => break,
            },
            Some((number, line, result)) = sent.recv() => {
                shown.sent(out, &mut input, number, &line, result).await
            }
            _ = tick.tick() => shown.expire_typing(&mut input),
        }
    }
    Ok(())
}

/// One `/` command of the chat; the conversation to switch to, if any.
async fn chat_command(
    out: &Output,
    client: &Client,
    shown: &mut Shown,
    input: &mut Input,
    line: &str,
) -> Option<Target> {
    let mut words = line.split_whitespace();
    let command = words.next().unwrap_or_default();
    let say = |input: &mut Input, json: serde_json::Value, text: String| {
        if out.json {
            input.print(&json.to_string());
        } else {
            input.print(&text);
        }
    };
    match command {
        "/group" => {
            let (Some(name), users) = (words.next(), words.collect::<Vec<_>>()) else {
                say(
                    input,
                    json!({ "error": "usage: /group NAME USER..." }),
                    "usage: /group NAME USER USER...".into(),
                );
                return None;
            };
            let name = name.trim_start_matches('#');
            if users.is_empty() {
                say(
                    input,
                    json!({ "error": "a group needs members" }),
                    "usage: /group NAME USER USER...".into(),
                );
                return None;
            }
            let mut members = Vec::with_capacity(users.len());
            for user in users {
                match resolve(client, user).await {
                    Ok((id, _)) => members.push(id),
                    Err(e) => {
                        say(
                            input,
                            json!({ "error": format!("{e:#}"), "user": user }),
                            format!("! no group made: {user}: {e:#}"),
                        );
                        return None;
                    }
                }
            }
            let group = match client.new_group(name, members) {
                Ok(group) => group,
                Err(e) => {
                    say(
                        input,
                        json!({ "error": e.to_string() }),
                        format!("! no group made: {e}"),
                    );
                    return None;
                }
            };
            shown.learn_group(&group);
            let names = shown.member_names(&group).await;
            say(
                input,
                json!({ "group": group }),
                format!(
                    "group #{} of {names}: your lines now go to it (its members learn of it with the first)",
                    group.name
                ),
            );
            Some(Target::Group(group))
        }
        "/to" => {
            let Some(to) = words.next() else {
                say(
                    input,
                    json!({ "error": "usage: /to USER or /to #GROUP" }),
                    "usage: /to USER or /to #GROUP".into(),
                );
                return None;
            };
            if let Some(name) = to.strip_prefix('#') {
                let Some(group) = shown.group_named(name) else {
                    say(
                        input,
                        json!({ "error": "no such group", "group": name }),
                        format!("! no group #{name} known here (/groups lists them)"),
                    );
                    return None;
                };
                let names = shown.member_names(&group).await;
                say(
                    input,
                    json!({ "to_group": group.id }),
                    format!("now in #{} ({names})", group.name),
                );
                return Some(Target::Group(group));
            }
            match resolve(client, to).await {
                Ok((id, name)) => {
                    say(
                        input,
                        json!({ "to": id }),
                        format!("now chatting with {name}"),
                    );
                    Some(Target::User(id, name))
                }
                Err(e) => {
                    say(
                        input,
                        json!({ "error": format!("{e:#}") }),
                        format!("! {to}: {e:#}"),
                    );
                    None
                }
            }
        }
        "/groups" => {
            let groups: Vec<Group> = shown.groups().cloned().collect();
            if groups.is_empty() {
                say(
                    input,
                    json!({ "groups": [] }),
                    "no groups yet: /group NAME USER... makes one".into(),
                );
            }
            for group in groups {
                let names = shown.member_names(&group).await;
                say(
                    input,
                    json!({ "group": group }),
                    format!("#{} ({names})", group.name),
                );
            }
            None
        }
        _ => {
            say(input, json!({ "help": CHAT_HELP }), CHAT_HELP.into());
            None
        }
    }
}

/// Tells the peer the user is typing (or stopped), in the background:
/// best effort, a lost one matters to nobody.
fn typing(client: &Client, peer: Uuid, stopped: bool) {
    let client = client.clone();
    tokio::spawn(async move {
        let _ = client.send_typing(peer, stopped).await;
    });
}

/// A signed-in client, and how its session is kept.
struct Signed {
    client: Client,
    /// Whether the stored session was resumed (no password asked).
    resumed: bool,
    /// The state and its lock, when this process keeps the session.
    kept: Option<(Arc<Mutex<State>>, PathBuf, SessionLock)>,
}

impl Signed {
    fn forget_session(&self) -> Result<()> {
        if let Some((state, path, _)) = &self.kept {
            // No more saving of refreshed tokens: the session is ending.
            self.client.on_session_tokens(|_| {});
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            state.session = None;
            state::save(path, &state)?;
        }
        Ok(())
    }
}

/// Signs in as the device of the state file: with the stored session
/// while it lives, else with the password. The session in use is kept in
/// the state file from then on, unless another process holds it.
async fn sign_in(cli: &Cli) -> Result<Signed> {
    let path = &cli.state;
    let mut state = state::load(path)?;
    let server = cli.server.clone().unwrap_or_else(|| state.server.clone());
    let lock = SessionLock::try_take(path)?;
    if lock.is_none() {
        eprintln!(
            "another sealpost-chat is using the session stored in {}; this one signs in with the \
             password, on a session of its own",
            path.display()
        );
    }
    let mut resumed = None;
    if lock.is_some()
        && let Some(tokens) = state.session.take()
    {
        match Client::resume(&server, tokens, state.keys.clone()).await {
            Ok(client) => resumed = Some(client),
            Err(Error::Unauthorized(_)) => {
                eprintln!("the stored session has ended; sign in again");
                state::save(path, &state)?;
            }
            Err(e) => return Err(e).context(format!("cannot resume the session on {server}")),
        }
    }
    let was_resumed = resumed.is_some();
    let client = match resumed {
        Some(client) => client,
        None => {
            let password = password(&format!("password of {}: ", state.username))?;
            Client::login(
                &server,
                &state.username,
                &password,
                state.device_id,
                state.keys.clone(),
            )
            .await?
        }
    };
    let kept = lock.map(|lock| {
        state.user_id = Some(client.user_id());
        let state = Arc::new(Mutex::new(state));
        keep_session(&client, path, state.clone());
        (state, path.clone(), lock)
    });
    Ok(Signed {
        client,
        resumed: was_resumed,
        kept,
    })
}

/// Stores the client's session in the state file now and after every
/// refresh, before the new tokens are used.
fn keep_session(client: &Client, path: &Path, state: Arc<Mutex<State>>) {
    let path = path.to_owned();
    client.on_session_tokens(move |tokens| {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        state.session = Some(tokens.clone());
        if let Err(e) = state::save(&path, &state) {
            eprintln!("cannot store the session: {e:#}");
        }
    });
}

/// The new device's state file, with its session: the commands after
/// sign-up need no password.
fn create_state(path: &Path, server: &str, client: &Client) -> Result<()> {
    let state = State {
        server: server.to_owned(),
        username: client.username().to_owned(),
        device_id: client.device_id(),
        keys: client.keys().clone(),
        user_id: Some(client.user_id()),
        session: Some(client.session_tokens()),
    };
    state::create(path, &state).with_context(|| {
        format!(
            "{} is signed up, but its state could not be written: its key is lost",
            client.username()
        )
    })
}

/// A user id and the name to show for it, from a username or a user id.
async fn resolve(client: &Client, user: &str) -> Result<(Uuid, String)> {
    if let Ok(id) = user.parse::<Uuid>() {
        let name = client
            .username_of(id)
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| id.to_string());
        return Ok((id, name));
    }
    let found = client.find_user(user).await?;
    Ok((found.id, found.username))
}

/// The password of an existing account.
fn password(prompt: &str) -> Result<String> {
    if let Ok(password) = std::env::var("SEALPOST_PASSWORD") {
        return Ok(password);
    }
    let password = if std::io::stdin().is_terminal() {
        // From the terminal, without echo.
        rpassword::prompt_password(prompt).context("cannot read the password")?
    } else {
        // A script's: one line of standard input.
        eprint!("{prompt}");
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    if password.is_empty() {
        bail!("no password given");
    }
    Ok(password)
}

/// A new account's password, asked twice.
fn new_password(username: &str) -> Result<String> {
    if let Ok(password) = std::env::var("SEALPOST_PASSWORD") {
        return Ok(password);
    }
    let first = password(&format!("choose a password for {username}: "))?;
    let again = password("the same password again: ")?;
    if first != again {
        bail!("the two passwords differ; nothing was registered");
    }
    Ok(first)
}
