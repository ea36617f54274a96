//! Where the JWT signing secret comes from.
//!
//! Configured: used as given. Unset with SQLite: generated once and kept in a
//! file beside the database (mode 0600), so that `cargo run` works with no
//! set-up and tokens survive restarts. Unset with PostgreSQL: refused, since a
//! production deployment, possibly of several nodes, must share one secret
//! that an operator manages.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::config::{MIN_SECRET_BYTES, Secret};
use crate::store;

/// Resolves the secret for `database_url`.
pub fn resolve(configured: Option<&Secret>, database_url: &str) -> anyhow::Result<Secret> {
    if let Some(secret) = configured {
        return Ok(secret.clone());
    }
    if store::is_postgres(database_url) {
        bail!(
            "SEALPOST_JWT_SECRET is not set: with a PostgreSQL database it is required \
             (at least {MIN_SECRET_BYTES} bytes, shared by every node; e.g. `openssl rand -base64 48`)"
        );
    }
    match store::sqlite::database_path(database_url) {
        Some(db) => load_or_create(&secret_path(&db)),
        None => {
            tracing::warn!(
                "SEALPOST_JWT_SECRET is not set: using a random secret for this in-memory database; \
                 tokens will not survive a restart"
            );
            Ok(generate())
        }
    }
}

/// `sealpost.db` keeps its secret in `sealpost.db.jwt-secret`.
pub fn secret_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".jwt-secret");
    PathBuf::from(name)
}

fn generate() -> Secret {
    let bytes: [u8; 48] = rand::random();
    Secret::new(URL_SAFE_NO_PAD.encode(bytes))
}

fn load_or_create(path: &Path) -> anyhow::Result<Secret> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let value = text.trim().to_owned();
            if value.len() < MIN_SECRET_BYTES {
                bail!(
                    "{} holds fewer than {MIN_SECRET_BYTES} bytes; delete it to generate a new one",
                    path.display()
                );
            }
            Ok(Secret::new(value))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = generate();
            write_private(path, secret.expose())
                .with_context(|| format!("writing generated JWT secret to {}", path.display()))?;
            tracing::warn!(
                path = %path.display(),
                "SEALPOST_JWT_SECRET is not set: generated one and stored it beside the database"
            );
            Ok(secret)
        }
        Err(e) => Err(e).with_context(|| format!("reading JWT secret from {}", path.display())),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secret_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("x.db").display());
        let first = resolve(None, &url).unwrap();
        let second = resolve(None, &url).unwrap();
        assert_eq!(first.expose(), second.expose());
        assert!(first.expose().len() >= MIN_SECRET_BYTES);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("x.db.jwt-secret"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn postgres_without_secret_is_refused() {
        let err = resolve(None, "postgres://localhost/x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("SEALPOST_JWT_SECRET"), "{err}");
    }
}
