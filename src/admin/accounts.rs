//! `sealpost user ...` and `sealpost stats`: accounts and counts, straight
//! against the database a server uses (or several servers share).
//!
//! Each function returns what the command prints: a value that serialises
//! to its `--json` form and displays as its text form. Disabling and
//! deleting go through the same store calls as the API (one transaction
//! each, revoking every session); running servers learn of the revocations
//! at their next poll.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use uuid::Uuid;

use super::timestamp;
use crate::api::accounts::is_username;
use crate::config::{Config, both_names};
use crate::store::{self, AccountDetails, AccountSummary, Store, StoreOptions, User};

/// The largest `--limit` of `user list`: a page is read and printed at once.
pub const MAX_PAGE: u32 = 10_000;

/// Connections an operator command needs: it runs one query at a time.
const POOL_SIZE: u32 = 2;

/// Opens the database of `config` for an operator command. Unlike `serve`
/// and `migrate`, it never creates the database (a mistyped SQLite path
/// would otherwise show an empty one) and never migrates it: an outdated
/// schema is refused, and migrating stays the operator's decision.
pub async fn open(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = config.database_url();
    if url.starts_with("sqlite:") {
        match store::sqlite::database_path(url) {
            None => bail!(
                "{} names an in-memory SQLite database: nothing outlives the server process, \
                 so there is nothing to look at",
                both_names("DATABASE_URL")
            ),
            Some(path) if !path.exists() => bail!(
                "there is no database at {}, {}",
                path.display(),
                both_names("DATABASE_URL")
            ),
            Some(_) => {}
        }
    }
    let store = store::connect(&StoreOptions {
        url: url.to_owned(),
        pool_size: POOL_SIZE,
    })
    .await
    .with_context(|| format!("opening the database of {}", both_names("DATABASE_URL")))?;
    let pending = store
        .pending_migrations()
        .await
        .context("reading the database's migrations")?;
    if !pending.is_empty() {
        bail!(
            "the database lacks {} migration(s) of this release ({pending:?}): run `sealpost \
             migrate` first (servers of this release also migrate when they start)",
            pending.len()
        );
    }
    Ok(store)
}

/// The account `who` names: a user id, or a username in any letter case.
async fn find(store: &dyn Store, who: &str) -> anyhow::Result<User> {
    let found = match who.parse::<Uuid>() {
        Ok(id) => store.user(id).await?,
        // Only a valid username can match, as in the API.
        Err(_) if is_username(who) => store.user_by_name(who).await?,
        Err(_) => None,
    };
    found.ok_or_else(|| anyhow!("there is no user {who:?}"))
}

async fn details(store: &dyn Store, id: Uuid) -> anyhow::Result<AccountDetails> {
    store
        .account_details(id, store::now())
        .await?
        .ok_or_else(|| anyhow!("user {id} was deleted meanwhile"))
}

/// A page of `user list`.
#[derive(Debug, Serialize)]
pub struct UserList {
    pub users: Vec<UserRow>,
    /// The `--after` of the next page; `None` on the last.
    pub next: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct UserRow {
    pub id: Uuid,
    pub username: String,
    pub created_at: String,
    pub disabled_at: Option<String>,
    pub queued: u64,
}

impl From<AccountSummary> for UserRow {
    fn from(account: AccountSummary) -> Self {
        Self {
            id: account.id,
            username: account.username,
            created_at: timestamp(account.created_at),
            disabled_at: account.disabled_at.map(timestamp),
            queued: account.queued,
        }
    }
}

pub async fn list(store: &dyn Store, after: Option<&str>, limit: u32) -> anyhow::Result<UserList> {
    let limit = limit.clamp(1, MAX_PAGE);
    // One more than asked tells whether another page follows.
    let mut page = store.list_accounts(after, limit + 1).await?;
    let next = if page.len() > limit as usize {
        page.truncate(limit as usize);
        page.last().map(|a| a.username.clone())
    } else {
        None
    };
    Ok(UserList {
        users: page.into_iter().map(UserRow::from).collect(),
        next,
    })
}

impl fmt::Display for UserList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.users.is_empty() {
            return writeln!(f, "no users");
        }
        let name = self
            .users
            .iter()
            .map(|u| u.username.len())
            .max()
            .unwrap_or(0)
            .max("USERNAME".len());
        writeln!(
            f,
            "{:name$}  {:36}  {:24}  {:8}  QUEUED",
            "USERNAME", "ID", "CREATED", "STATUS"
        )?;
        for user in &self.users {
            let status = if user.disabled_at.is_some() {
                "disabled"
            } else {
                "active"
            };
            writeln!(
                f,
                "{:name$}  {:36}  {:24}  {:8}  {}",
                user.username,
                user.id.to_string(),
                user.created_at,
                status,
                user.queued
            )?;
        }
        if let Some(next) = &self.next {
            writeln!(f, "more: sealpost user list --after {next}")?;
        }
        Ok(())
    }
}

/// `user show`.
#[derive(Debug, Serialize)]
pub struct UserDetails {
    pub id: Uuid,
    pub username: String,
    pub created_at: String,
    pub disabled_at: Option<String>,
    /// The lowest-numbered device's key, as before devices.
    pub public_key_bytes: u64,
    pub key_updated_at: String,
    /// In number order.
    pub devices: Vec<DeviceDetails>,
    /// Sessions that can still refresh.
    pub live_sessions: u64,
    pub queued: u64,
    pub oldest_queued_at: Option<String>,
}

/// One device in `user show`: no key and no name (names are the account's
/// own), only their sizes and times.
#[derive(Debug, Serialize)]
pub struct DeviceDetails {
    pub device_id: store::DeviceId,
    pub public_key_bytes: u64,
    pub key_updated_at: String,
    pub created_at: String,
    pub last_seen_at: String,
    pub queued: u64,
}

impl From<AccountDetails> for UserDetails {
    fn from(details: AccountDetails) -> Self {
        let account = details.summary;
        Self {
            id: account.id,
            username: account.username,
            created_at: timestamp(account.created_at),
            disabled_at: account.disabled_at.map(timestamp),
            public_key_bytes: details.devices.first().map_or(0, |d| d.public_key_bytes),
            key_updated_at: details
                .devices
                .first()
                .map(|d| timestamp(d.key_updated_at))
                .unwrap_or_default(),
            devices: details
                .devices
                .into_iter()
                .map(|d| DeviceDetails {
                    device_id: d.id,
                    public_key_bytes: d.public_key_bytes,
                    key_updated_at: timestamp(d.key_updated_at),
                    created_at: timestamp(d.created_at),
                    last_seen_at: timestamp(d.last_seen_at),
                    queued: d.queued,
                })
                .collect(),
            live_sessions: details.live_sessions,
            queued: account.queued,
            oldest_queued_at: details
                .oldest_queued
                .map(|id| timestamp(store::id_time(id))),
        }
    }
}

pub async fn show(store: &dyn Store, who: &str) -> anyhow::Result<UserDetails> {
    let user = find(store, who).await?;
    Ok(details(store, user.id).await?.into())
}

impl fmt::Display for UserDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "username       {}", self.username)?;
        writeln!(f, "id             {}", self.id)?;
        writeln!(f, "created        {}", self.created_at)?;
        match &self.disabled_at {
            Some(at) => writeln!(f, "status         disabled since {at}")?,
            None => writeln!(f, "status         active")?,
        }
        writeln!(
            f,
            "public key     {} bytes, set {}",
            self.public_key_bytes, self.key_updated_at
        )?;
        writeln!(f, "devices        {}", self.devices.len())?;
        for d in &self.devices {
            writeln!(
                f,
                "  device {:<6} key {} bytes set {}, added {}, last seen {}, {} queued",
                d.device_id,
                d.public_key_bytes,
                d.key_updated_at,
                d.created_at,
                d.last_seen_at,
                d.queued
            )?;
        }
        writeln!(f, "live sessions  {}", self.live_sessions)?;
        match &self.oldest_queued_at {
            Some(oldest) => writeln!(
                f,
                "queued         {} message(s), the oldest from {oldest}",
                self.queued
            ),
            None => writeln!(f, "queued         none"),
        }
    }
}

/// `user disable` and `user enable`.
#[derive(Debug, Serialize)]
pub struct StatusChange {
    pub id: Uuid,
    pub username: String,
    /// Whether the account is disabled now.
    pub disabled: bool,
    /// Whether it was in that state already.
    pub unchanged: bool,
    pub disabled_at: Option<String>,
    /// Sessions this command revoked.
    pub sessions_revoked: u64,
}

pub async fn disable(store: &dyn Store, who: &str) -> anyhow::Result<StatusChange> {
    let user = find(store, who).await?;
    let before = details(store, user.id).await?;
    let revoked = store
        .disable_user(user.id, store::now())
        .await?
        .ok_or_else(|| anyhow!("user {} was deleted meanwhile", user.id))?;
    let after = details(store, user.id).await?;
    Ok(StatusChange {
        id: user.id,
        username: user.username,
        disabled: true,
        unchanged: before.summary.disabled_at.is_some(),
        disabled_at: after.summary.disabled_at.map(timestamp),
        sessions_revoked: revoked.len() as u64,
    })
}

pub async fn enable(store: &dyn Store, who: &str) -> anyhow::Result<StatusChange> {
    let user = find(store, who).await?;
    let before = details(store, user.id).await?;
    if !store.enable_user(user.id).await? {
        bail!("user {} was deleted meanwhile", user.id);
    }
    Ok(StatusChange {
        id: user.id,
        username: user.username,
        disabled: false,
        unchanged: before.summary.disabled_at.is_none(),
        disabled_at: None,
        sessions_revoked: 0,
    })
}

impl fmt::Display for StatusChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = format!("{} ({})", self.username, self.id);
        match (self.disabled, self.unchanged) {
            (true, false) => writeln!(f, "disabled {who}")?,
            (true, true) => writeln!(
                f,
                "{who} was disabled already, since {}",
                self.disabled_at.as_deref().unwrap_or("?")
            )?,
            (false, false) => return writeln!(f, "enabled {who}: it may log in again"),
            (false, true) => return writeln!(f, "{who} was not disabled"),
        }
        write_revoked(f, self.sessions_revoked)
    }
}

/// What a disable or a delete did to the account's sessions, and when
/// running servers notice.
fn write_revoked(f: &mut fmt::Formatter<'_>, sessions: u64) -> fmt::Result {
    writeln!(
        f,
        "{sessions} session(s) revoked; running servers refuse their access tokens and close \
         their sockets at their next revocation poll (SEALPOST_REVOCATION_POLL_INTERVAL)"
    )
}

/// `user delete`.
#[derive(Debug, Serialize)]
pub struct Deleted {
    pub id: Uuid,
    pub username: String,
    pub queued_deleted: u64,
    pub sessions_revoked: u64,
}

pub async fn delete(store: &dyn Store, who: &str, confirmed: bool) -> anyhow::Result<Deleted> {
    let user = find(store, who).await?;
    let before = details(store, user.id).await?;
    if !confirmed {
        bail!(
            "deleting {} ({}) also deletes its public key and its {} queued message(s), and \
             cannot be undone: add --yes to delete it",
            user.username,
            user.id,
            before.summary.queued
        );
    }
    let revoked = store
        .delete_user(user.id, store::now())
        .await?
        .ok_or_else(|| anyhow!("user {} was deleted meanwhile", user.id))?;
    Ok(Deleted {
        id: user.id,
        username: user.username,
        queued_deleted: before.summary.queued,
        sessions_revoked: revoked.len() as u64,
    })
}

impl fmt::Display for Deleted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "deleted {} ({}) with its key and {} queued message(s)",
            self.username, self.id, self.queued_deleted
        )?;
        write_revoked(f, self.sessions_revoked)
    }
}

/// `stats`.
#[derive(Debug, Serialize)]
pub struct StatsReport {
    pub users: u64,
    pub disabled_users: u64,
    pub devices: u64,
    pub live_sessions: u64,
    /// Revocations kept until every access token they refuse has expired.
    pub revocations: u64,
    /// Queued copies: a message to three devices counts three.
    pub queued: u64,
    /// Accounts with at least one queued message.
    pub recipients: u64,
    pub oldest_queued_at: Option<String>,
    pub oldest_queued_age_seconds: Option<u64>,
    /// Queued messages per storage key; `key_id` null counts legacy
    /// plaintext rows. A key whose count is 0 is no longer needed.
    pub queued_by_key: Vec<KeyCount>,
}

#[derive(Debug, Serialize)]
pub struct KeyCount {
    pub key_id: Option<store::KeyId>,
    pub messages: u64,
}

pub async fn stats(store: &dyn Store) -> anyhow::Result<StatsReport> {
    let now = store::now();
    let stats = store.stats(now).await?;
    let oldest = stats.oldest_queued.map(store::id_time);
    Ok(StatsReport {
        users: stats.users,
        disabled_users: stats.disabled_users,
        devices: stats.devices,
        live_sessions: stats.live_sessions,
        revocations: stats.revocations,
        queued: stats.queued,
        recipients: stats.recipients,
        oldest_queued_at: oldest.map(timestamp),
        oldest_queued_age_seconds: oldest.map(|t| (now - t).num_seconds().max(0) as u64),
        queued_by_key: stats
            .by_key
            .into_iter()
            .map(|(key_id, messages)| KeyCount { key_id, messages })
            .collect(),
    })
}

impl fmt::Display for StatsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "users             {} ({} disabled)",
            self.users, self.disabled_users
        )?;
        writeln!(f, "devices           {}", self.devices)?;
        writeln!(f, "live sessions     {}", self.live_sessions)?;
        writeln!(f, "revocations kept  {}", self.revocations)?;
        writeln!(
            f,
            "queued messages   {} for {} recipient(s)",
            self.queued, self.recipients
        )?;
        if let (Some(at), Some(age)) = (&self.oldest_queued_at, self.oldest_queued_age_seconds) {
            let age = humantime::format_duration(Duration::from_secs(age));
            writeln!(f, "oldest queued     {at} ({age} ago)")?;
        }
        if !self.queued_by_key.is_empty() {
            let keys: Vec<String> = self
                .queued_by_key
                .iter()
                .map(|k| match k.key_id {
                    Some(id) => format!("key {id}: {}", k.messages),
                    None => format!("legacy plaintext: {}", k.messages),
                })
                .collect();
            writeln!(f, "by storage key    {}", keys.join(", "))?;
        }
        Ok(())
    }
}
