//! The state file: this device's identity (server, username, device id,
//! secret key) and its session, so that later commands need no password.
//!
//! - Written with mode 0600 (the secret key and the tokens are in it), by
//!   a temporary file renamed over it, so that a crash mid-write leaves the
//!   old file whole.
//! - `register` and `add-device` create it and never replace one: that
//!   would lose another device's only secret key ([`create`]).
//! - The session is used by one process at a time ([`SessionLock`]): each
//!   refresh spends the refresh token, and two processes refreshing the
//!   same one would present a spent token, which ends every session of the
//!   account. A second process signs in with the password instead, on a
//!   session of its own that it does not store.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sealpost_client::{DeviceKeys, SessionTokens};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What the state file holds. Files written before `user_id` and
/// `session` existed still load.
#[derive(Serialize, Deserialize)]
pub struct State {
    pub server: String,
    pub username: String,
    pub device_id: u32,
    pub keys: DeviceKeys,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Uuid>,
    /// The session to resume; `None` after a logout or a refused refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionTokens>,
}

pub fn load(path: &Path) -> Result<State> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "no state file at {} (run `sealpost-chat register NAME` or `add-device NAME` first, \
             or point --state at yours)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("unreadable state file {}", path.display()))
}

/// Refuses, before anything is asked or sent, to make a state file where
/// one is: it holds a device's only secret key.
pub fn refuse_existing(path: &Path, command: &str) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let holder = match load(path) {
        Ok(state) => format!(
            "device {} of {} on {}",
            state.device_id, state.username, state.server
        ),
        Err(_) => "a device's state".to_owned(),
    };
    bail!(
        "{path} already holds {holder}; `{command}` here would replace its secret key, the only \
         way to read that device's messages. Nothing was changed.\n\
         To use another state file: sealpost-chat --state OTHER.json {command} ... \
         (or set SEALPOST_CHAT_STATE), or run it in another directory.",
        path = path.display()
    )
}

/// Writes a new state file; fails if one appeared meanwhile (the link
/// of the finished file, unlike a rename, never replaces one).
pub fn create(path: &Path, state: &State) -> Result<()> {
    let tmp = write_tmp(path, state)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            refuse_existing(path, "register")
        }
        Err(e) => Err(e).with_context(|| format!("cannot write {}", path.display())),
    }
}

/// Replaces the state file with `state`.
pub fn save(path: &Path, state: &State) -> Result<()> {
    let tmp = write_tmp(path, state)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn write_tmp(path: &Path, state: &State) -> Result<PathBuf> {
    let tmp = sibling(path, &format!("{}.tmp", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
    file.sync_all()?;
    Ok(tmp)
}

/// `path` with `.suffix` added to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

/// This process's claim on the stored session, held while it runs: an
/// advisory lock on `<state file>.lock`, released by the system when the
/// process ends, however it ends.
pub struct SessionLock {
    _file: File,
}

impl SessionLock {
    /// The lock, or `None` while another process holds it.
    pub fn try_take(path: &Path) -> Result<Option<SessionLock>> {
        let lock_path = sibling(path, "lock");
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .with_context(|| format!("cannot open {}", lock_path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(SessionLock { _file: file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn state(name: &str) -> State {
        State {
            server: "http://127.0.0.1:8080".into(),
            username: name.into(),
            device_id: 1,
            keys: DeviceKeys::generate(),
            user_id: None,
            session: None,
        }
    }

    #[test]
    fn create_never_replaces_a_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        create(&path, &state("alice")).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = create(&path, &state("bob")).unwrap_err().to_string();
        assert!(err.contains("device 1 of alice"), "{err}");
        assert!(err.contains("--state"), "{err}");
        assert_eq!(load(&path).unwrap().username, "alice");
        // Nothing left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn one_process_at_a_time_holds_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let first = SessionLock::try_take(&path).unwrap();
        assert!(first.is_some());
        assert!(SessionLock::try_take(&path).unwrap().is_none());
        drop(first);
        assert!(SessionLock::try_take(&path).unwrap().is_some());
    }
}
