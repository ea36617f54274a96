//! `sealpost check-config`: every setting with its effective value and where
//! it came from, secrets masked; then the checks start-up makes across
//! settings (a PostgreSQL database needs a JWT secret and storage keys, TLS
//! files must load, ...), made without side effects: nothing is created,
//! generated or connected to.
//!
//! The settings are listed from the command-line definition itself, so a
//! setting added to [`Config`] appears here without further work, and is
//! masked if it hides its value from `--help` (`hide_env_values`).

use std::fmt;

use clap::ArgMatches;
use clap::parser::ValueSource;
use serde::Serialize;

use super::Invocation;
use crate::config::Config;
use crate::store::{self, sqlite};
use crate::{auth, cluster, seal, tls};

/// What `check-config` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub settings: Vec<Setting>,
    pub checks: Vec<Check>,
    /// Whether start-up would get past the configuration.
    pub ok: bool,
}

/// One setting: its variable, its flag, its value (masked if secret, `None`
/// when unset) and where the value came from.
#[derive(Debug, Serialize)]
pub struct Setting {
    pub env: String,
    pub flag: String,
    pub value: Option<String>,
    /// `default`, `environment`, `flag`, `unset`, the `*_FILE` setting the
    /// value was read from, or the former name it was given under.
    pub source: String,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub level: Level,
    /// The setting (or settings) concerned.
    pub setting: &'static str,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Note,
    Warning,
    /// Start-up would fail.
    Error,
}

impl Report {
    /// Exit status: an error if start-up would fail.
    pub fn verdict(&self) -> anyhow::Result<()> {
        let errors = self
            .checks
            .iter()
            .filter(|c| c.level == Level::Error)
            .count();
        if errors > 0 {
            anyhow::bail!("{errors} problem(s) in the configuration: start-up would fail");
        }
        Ok(())
    }
}

/// Lists the settings of `config` as parsed in `invocation`, and checks them.
pub fn report(config: &Config, invocation: &Invocation<'_>) -> Report {
    let checks = checks(config);
    Report {
        settings: settings(config, invocation),
        ok: checks.iter().all(|c| c.level != Level::Error),
        checks,
    }
}

/// Every argument with an environment variable: the global ones of the
/// `sealpost` command (`SEALPOST_LOG_FORMAT`) and those of `check-config`,
/// which are the server's.
fn settings(config: &Config, invocation: &Invocation<'_>) -> Vec<Setting> {
    let mut settings = Vec::new();
    let globals = invocation
        .command
        .get_arguments()
        .filter(|arg| arg.is_global_set());
    for arg in globals {
        settings.extend(setting(config, arg, invocation.matches));
    }
    let leaf = invocation
        .command
        .find_subcommand("check-config")
        .zip(invocation.matches.subcommand_matches("check-config"));
    if let Some((command, matches)) = leaf {
        for arg in command.get_arguments().filter(|arg| !arg.is_global_set()) {
            settings.extend(setting(config, arg, matches));
        }
    }
    settings
}

fn setting(config: &Config, arg: &clap::Arg, matches: &ArgMatches) -> Option<Setting> {
    let env = arg.get_env()?.to_string_lossy().into_owned();
    let id = arg.get_id().as_str();
    // A former name, hidden from `--help`, is listed only when it is used.
    let given = matches!(
        matches.value_source(id),
        Some(ValueSource::EnvVariable | ValueSource::CommandLine)
    );
    if arg.is_hide_set() && !given {
        return None;
    }
    let flag = arg
        .get_long()
        .map_or_else(String::new, |long| format!("--{long}"));
    let raw = matches.get_raw(id).map(|values| {
        values
            .map(|v| v.to_string_lossy())
            .collect::<Vec<_>>()
            .join(",")
    });
    let mut source = match matches.value_source(id) {
        None => "unset",
        Some(ValueSource::DefaultValue) => "default",
        Some(ValueSource::EnvVariable) => "environment",
        Some(ValueSource::CommandLine) => "flag",
        Some(_) => "other",
    }
    .to_owned();
    let from_file = |file: bool, setting: &str| file.then(|| format!("file ({setting})"));
    let value = match id {
        "database_url" => {
            if let Some(file) = from_file(config.database_url_file.is_some(), "DATABASE_URL_FILE") {
                source = file;
            }
            Some(mask_url(config.database_url()))
        }
        "jwt_secret" => {
            if let Some(file) =
                from_file(config.jwt_secret_file.is_some(), "SEALPOST_JWT_SECRET_FILE")
            {
                source = file;
            }
            config.jwt_secret().map(|_| "***".to_owned())
        }
        "storage_keys" => {
            if let Some(file) = from_file(
                config.storage_keys_file.is_some(),
                "SEALPOST_STORAGE_KEYS_FILE",
            ) {
                source = file;
            }
            config.storage_keys().map(|keys| {
                let ids: Vec<String> = keys.ids().map(|id| id.to_string()).collect();
                format!("key ids {} (*** keys hidden)", ids.join(","))
            })
        }
        // A user's password or a token may be in a NATS URL.
        "nats_url" => {
            let urls: Vec<String> = config.nats_urls().map(mask_nats_url).collect();
            (!urls.is_empty()).then(|| urls.join(","))
        }
        // No clap default (see `Config::former_names`): the one in effect.
        "max_queued_per_device" => {
            if raw.is_none() {
                source = match matches.value_source("max_queued_per_user") {
                    Some(ValueSource::EnvVariable | ValueSource::CommandLine) => {
                        "former name (SEALPOST_MAX_QUEUED_PER_USER)"
                    }
                    _ => "default",
                }
                .to_owned();
            }
            Some(config.max_queued_per_device().to_string())
        }
        "db_pool_size" => raw.map(|v| format!("{v} (in effect: {})", config.db_pool_size())),
        "hash_concurrency" => {
            raw.map(|v| format!("{v} (in effect: {})", config.hash_concurrency()))
        }
        // Any other secret setting, including ones added later.
        _ if arg.is_hide_env_values_set() => raw.map(|_| "***".to_owned()),
        _ => raw,
    };
    Some(Setting {
        env,
        flag,
        value,
        source,
    })
}

/// The checks start-up makes across settings, made without side effects.
fn checks(config: &Config) -> Vec<Check> {
    let url = config.database_url();
    let mut checks = vec![database(url)];
    // With a URL of no known database, the secrets cannot be judged: the
    // database check has said what is wrong.
    if url.starts_with("sqlite:") || store::is_postgres(url) {
        checks.push(outcome(
            "SEALPOST_JWT_SECRET",
            auth::secret::check(config.jwt_secret(), url),
        ));
        checks.push(outcome(
            "SEALPOST_STORAGE_KEYS",
            seal::check(config.storage_keys(), url),
        ));
    }
    checks.push(match cluster::check(config) {
        Ok(message) if config.clustered() => check(Level::Ok, NATS, message),
        Ok(message) => check(Level::Note, NATS, message),
        Err(message) => check(Level::Error, NATS, message),
    });
    checks.push(match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => match tls::acceptor(cert, key) {
            Ok(_) => check(
                Level::Ok,
                TLS,
                format!("serves HTTPS and WSS with {}", cert.display()),
            ),
            Err(err) => check(Level::Error, TLS, format!("{err:#}")),
        },
        // Clap requires both or neither.
        _ => check(
            Level::Note,
            TLS,
            "not set: serves plain HTTP, for a TLS-terminating proxy in front".into(),
        ),
    });
    checks.extend(push(config));
    match config.former_names() {
        Ok(warnings) => checks.extend(
            warnings
                .into_iter()
                .map(|warning| check(Level::Warning, FORMER_NAMES, warning)),
        ),
        Err(message) => checks.push(check(Level::Error, FORMER_NAMES, message)),
    }
    if config.refresh_token_ttl <= config.access_token_ttl {
        checks.push(check(
            Level::Warning,
            "SEALPOST_REFRESH_TOKEN_TTL",
            "is not longer than SEALPOST_ACCESS_TOKEN_TTL: clients must log in again each time \
             their access token expires"
                .into(),
        ));
    }
    checks
}

const TLS: &str = "SEALPOST_TLS_CERT, SEALPOST_TLS_KEY";
const WEB_PUSH: &str = "SEALPOST_VAPID_SUBJECT";
const APNS: &str = "SEALPOST_APNS_KEY_FILE, SEALPOST_APNS_KEY_ID, SEALPOST_APNS_TEAM_ID";
const FCM: &str = "SEALPOST_FCM_CREDENTIALS_FILE";
const ALLOW_HOSTS: &str = "SEALPOST_PUSH_ALLOW_HOSTS";

/// Which push services are on, and what would stop start-up: a VAPID
/// subject that is not a `mailto:` or `https:` URI, Web Push on
/// PostgreSQL without a VAPID key, key files that cannot be read, an
/// allow-list that does not parse. The keys given are read and parsed as
/// start-up would (a `.p8` of another curve, a damaged service-account
/// file), and never shown.
fn push(config: &Config) -> Vec<Check> {
    use crate::push::{apns, fcm, vapid::VapidKey};
    let push = &config.push;
    let mut checks = Vec::new();
    checks.push(match &push.vapid_subject {
        None => check(Level::Note, WEB_PUSH, "not set: Web Push is off".into()),
        Some(subject) if !(subject.starts_with("mailto:") || subject.starts_with("https:")) => {
            check(
                Level::Error,
                WEB_PUSH,
                "must be a `mailto:` or `https:` URI (push services refuse others)".into(),
            )
        }
        Some(_) => match (&push.vapid_key, &push.vapid_key_file) {
            (Some(key), _) => match VapidKey::parse(key.as_str()) {
                Ok(key) => check(
                    Level::Ok,
                    WEB_PUSH,
                    format!(
                        "Web Push is on, VAPID key given (public key {})",
                        key.public_key()
                    ),
                ),
                Err(e) => check(Level::Error, "SEALPOST_VAPID_KEY", e),
            },
            (None, Some(file)) => match std::fs::read_to_string(file)
                .map_err(|e| format!("{} cannot be read: {e}", file.display()))
                .and_then(|text| {
                    VapidKey::parse(&text).map_err(|e| format!("{}: {e}", file.display()))
                }) {
                Ok(key) => check(
                    Level::Ok,
                    WEB_PUSH,
                    format!(
                        "Web Push is on, VAPID key from {} (public key {})",
                        file.display(),
                        key.public_key()
                    ),
                ),
                Err(e) => check(Level::Error, "SEALPOST_VAPID_KEY_FILE", e),
            },
            (None, None) if store::is_postgres(config.database_url()) => check(
                Level::Error,
                "SEALPOST_VAPID_KEY",
                "required with PostgreSQL when Web Push is on (every node signs with the same key)"
                    .into(),
            ),
            (None, None) => check(
                Level::Ok,
                WEB_PUSH,
                "Web Push is on, VAPID key kept beside the SQLite database (generated if missing)"
                    .into(),
            ),
        },
    });
    let apns = [
        push.apns_key_file.is_some(),
        push.apns_key_id.is_some(),
        push.apns_team_id.is_some(),
    ];
    checks.push(match (&push.apns_key_file, apns) {
        (_, [false, false, false]) => check(Level::Note, APNS, "not set: APNs is off".into()),
        (Some(file), [true, true, true]) => match apns::check_key(file) {
            Ok(()) => check(
                Level::Ok,
                APNS,
                format!(
                    "APNs is on ({} for production, {} for sandbox)",
                    push.apns_url, push.apns_sandbox_url
                ),
            ),
            Err(e) => check(Level::Error, APNS, e),
        },
        _ => check(
            Level::Warning,
            APNS,
            "only some are set: APNs is off until all three are".into(),
        ),
    });
    checks.push(match &push.fcm_credentials_file {
        None => check(Level::Note, FCM, "not set: FCM is off".into()),
        Some(file) => match fcm::check_credentials(file) {
            Ok(project) => check(
                Level::Ok,
                FCM,
                format!("FCM is on for project {project} ({})", push.fcm_url),
            ),
            Err(e) => check(Level::Error, FCM, e),
        },
    });
    match crate::push::guard::AllowHosts::parse(&push.push_allow_hosts) {
        Ok(allow) if allow.is_empty() => {}
        Ok(_) => checks.push(check(
            Level::Warning,
            ALLOW_HOSTS,
            "push requests may go to these hosts even on private addresses or plain http: \
             for tests and a push service of your own only"
                .into(),
        )),
        Err(message) => checks.push(check(Level::Error, ALLOW_HOSTS, message)),
    }
    checks
}
const NATS: &str = "SEALPOST_NATS_URL";
const FORMER_NAMES: &str = "SEALPOST_MAX_QUEUED_PER_USER";

/// A NATS URL with its password, or its token (userinfo without a colon),
/// masked.
fn mask_nats_url(url: &str) -> String {
    let masked = mask_url(url);
    match (masked.find("://"), masked.rfind('@')) {
        (Some(scheme), Some(at)) if !masked[scheme + 3..at].contains(':') => {
            format!("{}***{}", &masked[..scheme + 3], &masked[at..])
        }
        _ => masked,
    }
}

fn check(level: Level, setting: &'static str, message: String) -> Check {
    Check {
        level,
        setting,
        message,
    }
}

fn outcome(setting: &'static str, result: Result<String, String>) -> Check {
    match result {
        Ok(message) => check(Level::Ok, setting, message),
        Err(message) => check(Level::Error, setting, message),
    }
}

fn database(url: &str) -> Check {
    const SETTING: &str = "DATABASE_URL";
    if store::is_postgres(url) {
        return check(
            Level::Ok,
            SETTING,
            "PostgreSQL (not contacted: check-config does not connect)".into(),
        );
    }
    if !url.starts_with("sqlite:") {
        return check(
            Level::Error,
            SETTING,
            "unsupported scheme (expected sqlite:// or postgres://)".into(),
        );
    }
    let Some(path) = sqlite::database_path(url) else {
        return check(
            Level::Warning,
            SETTING,
            "an in-memory SQLite database: nothing survives a restart".into(),
        );
    };
    if path.exists() {
        return check(
            Level::Ok,
            SETTING,
            format!("SQLite database {}", path.display()),
        );
    }
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if dir.is_dir() {
        check(
            Level::Note,
            SETTING,
            format!(
                "SQLite database {} does not exist yet: `serve` or `migrate` creates it",
                path.display()
            ),
        )
    } else {
        check(
            Level::Error,
            SETTING,
            format!(
                "the directory of SQLite database {} does not exist",
                path.display()
            ),
        )
    }
}

/// `url` with the password in its user info, and any query parameter named
/// like a password, replaced by `***`.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let mut masked = url[..scheme_end].to_owned();
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            match userinfo.split_once(':') {
                Some((user, _password)) => masked.push_str(&format!("{user}:***")),
                None => masked.push_str(userinfo),
            }
            masked.push('@');
            masked.push_str(host);
        }
        None => masked.push_str(authority),
    }
    let Some((path, query)) = tail.split_once('?') else {
        masked.push_str(tail);
        return masked;
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.to_ascii_lowercase().contains("password") => {
                format!("{key}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    masked.push_str(path);
    masked.push('?');
    masked.push_str(&query.join("&"));
    if let Some(fragment) = fragment {
        masked.push('#');
        masked.push_str(fragment);
    }
    masked
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.settings.iter().map(|s| s.env.len()).max().unwrap_or(0);
        let value = |s: &Setting| match s.value.as_deref() {
            None => "-".to_owned(),
            Some("") => "\"\"".to_owned(),
            Some(value) => value.to_owned(),
        };
        let width = self
            .settings
            .iter()
            .map(|s| value(s).len())
            .max()
            .unwrap_or(0);
        writeln!(f, "settings (secrets masked):")?;
        for setting in &self.settings {
            writeln!(
                f,
                "  {:name$}  {:width$}  {}",
                setting.env,
                value(setting),
                setting.source
            )?;
        }
        writeln!(f, "checks:")?;
        for check in &self.checks {
            let level = match check.level {
                Level::Ok => "ok",
                Level::Note => "note",
                Level::Warning => "warning",
                Level::Error => "error",
            };
            writeln!(f, "  {level:7}  {}: {}", check.setting, check.message)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_masked() {
        for (url, masked) in [
            (
                "postgres://sealpost:hunter2@db.example:5432/sealpost",
                "postgres://sealpost:***@db.example:5432/sealpost",
            ),
            (
                "postgresql://u:p%40ss@db/x?sslmode=require&password=hunter2",
                "postgresql://u:***@db/x?sslmode=require&password=***",
            ),
            (
                "postgres://db/x?sslpassword=a#frag",
                "postgres://db/x?sslpassword=***#frag",
            ),
            ("postgres://only-user@db/x", "postgres://only-user@db/x"),
            ("postgres://db", "postgres://db"),
            ("sqlite://sealpost.db", "sqlite://sealpost.db"),
            ("sqlite:///data/a@b.db", "sqlite:///data/a@b.db"),
            ("sqlite::memory:", "sqlite::memory:"),
        ] {
            assert_eq!(mask_url(url), masked, "{url}");
        }
    }
}
