//! Secrets that sealpost makes for itself when none is configured: the JWT
//! signing secret and the storage key.
//!
//! With SQLite the secret is generated once and kept in a file beside the
//! database (mode 0600), so that `cargo run` works with no set-up and what it
//! protects survives restarts. With an in-memory database it is random and
//! lives as long as the process. With PostgreSQL it is refused: a production
//! deployment, possibly of several nodes, must share one secret that an
//! operator manages.
//!
//! A kept secret, like the database beside it, should be readable by its
//! owner only: [`warn_if_shared`] says so at start-up when it is not (the
//! file is left as it is: a group the operator chose may be meant).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};

use crate::config::{both_names, not_set};
use crate::store;

/// One kind of generated secret, for file names and messages.
pub struct Kind {
    /// The setting that replaces it, by its variable, e.g.
    /// `SEALPOST_JWT_SECRET`.
    pub setting: &'static str,
    /// What is appended to the database's file name, e.g. `.jwt-secret`.
    pub suffix: &'static str,
    /// How to make one, for the refusal with PostgreSQL.
    pub hint: &'static str,
    /// What a random one means for an in-memory database.
    pub ephemeral: &'static str,
}

/// Where the secret of `kind` lives when its setting is unset.
enum Home {
    /// Random, for the life of the process: the database is in memory.
    Memory,
    /// In this file beside the SQLite database.
    File(PathBuf),
}

/// Where the secret of `kind` for `database_url` lives, or why there can be
/// none (PostgreSQL, or a URL of no known database).
fn home(kind: &Kind, database_url: &str) -> anyhow::Result<Home> {
    if store::is_postgres(database_url) {
        bail!(
            "{}: with a PostgreSQL database it is required ({})",
            not_set(kind.setting),
            kind.hint
        );
    }
    if !database_url.starts_with("sqlite:") {
        // Not ours to judge here: opening the store names the bad URL.
        bail!("{}", store::StoreError::UnsupportedUrl);
    }
    Ok(match store::sqlite::database_path(database_url) {
        None => Home::Memory,
        Some(db) => Home::File(path_beside(&db, kind.suffix)),
    })
}

/// What [`resolve`] would do, found out without creating anything: for
/// `sealpost check-config`. `Ok` says where the secret comes from; `Err`
/// why start-up would fail. Never shows the secret.
pub fn check<T>(
    kind: &Kind,
    database_url: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<String, String> {
    if store::is_postgres(database_url) {
        return Err(format!(
            "not set, and a PostgreSQL database requires it ({})",
            kind.hint
        ));
    }
    match home(kind, database_url).map_err(|e| e.to_string())? {
        Home::Memory => {
            Ok("not set: a random one per process, as the database is in memory".into())
        }
        Home::File(path) => match std::fs::read_to_string(&path) {
            Ok(text) => parse(text.trim())
                .map(|_| format!("not set: using the one kept in {}", path.display()))
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(format!(
                "not set: the first start generates one into {}",
                path.display()
            )),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        },
    }
}

/// The secret of `kind` for `database_url` when its setting is unset:
/// read from its file, or generated (and stored), then `parse`d.
pub fn resolve<T>(
    kind: &Kind,
    database_url: &str,
    generate: impl FnOnce() -> String,
    parse: impl Fn(&str) -> Result<T, String>,
) -> anyhow::Result<T> {
    let setting = both_names(kind.setting);
    let path = match home(kind, database_url)? {
        Home::File(path) => path,
        Home::Memory => {
            tracing::warn!(
                "{}: using a random one for this in-memory database; {}",
                not_set(kind.setting),
                kind.ephemeral
            );
            return parse(&generate()).map_err(|e| anyhow!("generated {setting}: {e}"));
        }
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            warn_if_shared(&path, &format!("the kept {setting}"));
            parse(text.trim()).map_err(|e| anyhow!("the {setting} kept in {}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = generate();
            let value = parse(&text).map_err(|e| anyhow!("generated {setting}: {e}"))?;
            write_private(&path, text.as_bytes())
                .with_context(|| format!("writing generated {setting} to {}", path.display()))?;
            tracing::warn!(
                path = %path.display(),
                "{}: generated one and stored it beside the database",
                not_set(kind.setting)
            );
            Ok(value)
        }
        Err(e) => Err(e).with_context(|| format!("reading {setting} from {}", path.display())),
    }
}

/// `sealpost.db` keeps its secrets in `sealpost.db<suffix>`.
fn path_beside(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates `path` readable by its owner only; fails if it already exists, so
/// two processes racing to create it cannot end up with different secrets.
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

/// Logs a warning if `path` exists and users other than its owner may read
/// or write it (mode bits 0o077): it holds `what`, which anyone who can
/// read the file has. Says nothing of a file that is not there.
pub fn warn_if_shared(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(path) else {
            return;
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "{what} is readable by users other than its owner; `chmod 600` it"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
}
