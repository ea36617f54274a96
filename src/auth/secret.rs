//! Where the JWT signing secret comes from.
//!
//! Configured: used as given. Unset: generated beside an SQLite database
//! (`sealpost.db.jwt-secret`) and refused with PostgreSQL, as
//! [`crate::keyfile`] describes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::config::{MIN_SECRET_BYTES, Secret};
use crate::keyfile::{self, Kind};

const KIND: Kind = Kind {
    setting: "SEALPOST_JWT_SECRET",
    suffix: ".jwt-secret",
    hint: "at least 32 bytes, shared by every node; e.g. `openssl rand -base64 48`",
    ephemeral: "tokens will not survive a restart",
};

/// Resolves the secret for `database_url`.
pub fn resolve(configured: Option<&Secret>, database_url: &str) -> anyhow::Result<Secret> {
    if let Some(secret) = configured {
        return Ok(secret.clone());
    }
    keyfile::resolve(&KIND, database_url, generate, parse_kept)
}

/// Where the secret for `database_url` comes from, found out without
/// creating anything (`sealpost check-config`); `Err` says why start-up
/// would fail.
pub fn check(configured: Option<&Secret>, database_url: &str) -> Result<String, String> {
    match configured {
        Some(_) => Ok("set".into()),
        None => keyfile::check(&KIND, database_url, parse_kept),
    }
}

/// A secret read from the file beside the database.
fn parse_kept(text: &str) -> Result<Secret, String> {
    if text.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "holds fewer than {MIN_SECRET_BYTES} bytes; delete it to generate a new one"
        ));
    }
    Ok(Secret::new(text.to_owned()))
}

fn generate() -> String {
    let bytes: [u8; 48] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
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
