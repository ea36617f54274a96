//! `sealpost-chat` without a server: what it refuses before asking
//! anything, and what it says about itself. The conversation itself, in a
//! terminal against a real server, is `tests/it/chat.rs` at the root.
//!
//! (Being an integration test of this package also makes `cargo test
//! --workspace` build the `sealpost-chat` binary, which that test runs.)

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn chat(dir: &std::path::Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpost-chat"))
        .args(args)
        .current_dir(dir)
        .env_clear()
        // Nowhere to connect: nothing here may need the server.
        .env("SEALPOST_SERVER", "http://127.0.0.1:9")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run sealpost-chat");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn register_never_replaces_a_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sealpost-chat.json");
    std::fs::write(&state, "not mine to replace").unwrap();
    let output = chat(dir.path(), &["register", "carol"], "pw\npw\n");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("sealpost-chat.json already holds"), "{err}");
    assert!(err.contains("--state OTHER.json"), "{err}");
    // Refused before the password was asked.
    assert!(!err.contains("password"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        "not mine to replace"
    );
}

#[test]
fn sign_up_asks_the_password_twice() {
    let dir = tempfile::tempdir().unwrap();
    let output = chat(dir.path(), &["register", "carol"], "one\nother\n");
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("the same password again"), "{err}");
    assert!(err.contains("the two passwords differ"), "{err}");
    assert!(!dir.path().join("sealpost-chat.json").exists());
}

#[test]
fn help_names_the_default_server_and_the_guide() {
    let dir = tempfile::tempdir().unwrap();
    let output = chat(dir.path(), &["--help"], "");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("http://127.0.0.1:8080"), "{help}");
    assert!(help.contains("chat/README.md"), "{help}");
}
