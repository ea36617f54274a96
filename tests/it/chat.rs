//! `sealpost-chat` in a terminal, as a person uses it: two accounts in two
//! directories sign up, chat both ways, quit with Ctrl-C and chat again,
//! with no password asked after sign-up and no auth limit met.
//!
//! Each process runs in a pseudo-terminal of its own (portable-pty) that
//! is its controlling terminal, with a person's settings (echo on, Ctrl-C
//! as a key): the password prompt reads it without echo, the chat puts it
//! in raw mode, and Ctrl-C is the byte a keyboard sends. A pty crate rather
//! than tmux: nothing to install, no server process to clean up after a
//! failed test, and the output is read as a stream, so nothing that was
//! printed can scroll out of sight of an assertion.
//!
//! The server allows two auth requests (sign-ups, logins, refreshes) from
//! the loopback and then one a minute: the two sign-ups spend them, so any
//! login or refresh after them is refused `rate_limited` and the test
//! fails. Signing up without a login after it needs a server whose
//! register answer carries the session.
//!
//! The binary belongs to another package of the workspace, whose binaries
//! a test of this one cannot name: [`chat_binary`] asks cargo for it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use portable_pty::{Child, CommandBuilder, MasterPty, PtySize, native_pty_system};

use crate::backend_tests;
use crate::common::{Backend, PASSWORD, TestServer};

backend_tests!(two_people_chat_in_terminals_without_a_password_after_sign_up);

/// How long one expected line may take: a build of a shared, busy machine
/// runs the server and two clients at once.
const EXPECT: Duration = Duration::from_secs(30);
/// Ctrl-C quits at once: well within this.
const QUIT: Duration = Duration::from_secs(5);
/// How long the last output of a process that exited may take to be read.
const GRACE: Duration = Duration::from_millis(500);

async fn two_people_chat_in_terminals_without_a_password_after_sign_up(backend: Backend) {
    let server = TestServer::start_with(
        backend,
        &["--auth-rate-per-minute", "1", "--auth-rate-burst", "2"],
    )
    .await;
    let url = server.api.base.clone();
    let bin = chat_binary().to_owned();
    let (alice_dir, bob_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (alice_dir_path, bob_dir_path) = (alice_dir.path().to_owned(), bob_dir.path().to_owned());
    tokio::task::spawn_blocking(move || {
        let alice = Person::new(&bin, &url, &alice_dir_path, "alice");
        let bob = Person::new(&bin, &url, &bob_dir_path, "bob");
        alice.register();
        bob.register();

        // A second sign-up in alice's directory is refused before anything
        // is asked, naming the file and the way out.
        let mut again = alice.run(&["register", "carol"]);
        again.expect("already holds device 1 of alice");
        again.expect("--state");
        assert!(!again.exit().success(), "{}", again.transcript());
        assert!(
            !again.transcript().contains("password"),
            "{}",
            again.transcript()
        );
        // Two different passwords: nothing is registered, nothing written.
        let mut mistyped = bob.run(&["--state", "carol.json", "register", "carol"]);
        mistyped.expect("choose a password for carol: ");
        mistyped.type_keys("one password\r");
        mistyped.expect("the same password again: ");
        mistyped.type_keys("another one\r");
        mistyped.expect("the two passwords differ");
        assert!(!mistyped.exit().success());
        assert!(!bob.dir.join("carol.json").exists());

        let state = std::fs::read_to_string(alice.dir.join("sealpost-chat.json")).unwrap();
        assert!(
            state.contains("\"alice\"") && state.contains("refresh_token"),
            "{state}"
        );

        for (first, reply) in [("hello bob", "hi alice"), ("back again", "welcome back")] {
            let mut a = alice.run(&["chat", "bob"]);
            let mut b = bob.run(&["chat", "alice"]);
            a.expect("[connected]");
            b.expect("[connected]");

            // Typing is shown to the peer before the line is sent.
            a.type_keys(&first[..3]);
            b.expect("alice is typing");
            a.type_keys(&first[3..]);
            a.type_keys("\r");
            b.expect(&format!("alice: {first}"));
            // The receipt names the message it is for.
            a.expect(&format!("#1 \"{first}\" delivered to bob's device 1"));

            b.type_keys(reply);
            b.type_keys("\r");
            a.expect(&format!("bob: {reply}"));
            b.expect(&format!("#1 \"{reply}\" delivered to alice's device 1"));

            for chat in [&mut a, &mut b] {
                // Ctrl-C, and nothing else: no Enter after it.
                chat.type_keys("\x03");
                let started = Instant::now();
                let status = chat.exit();
                assert!(status.success(), "{status:?}: {}", chat.transcript());
                assert!(started.elapsed() < QUIT, "{}", chat.transcript());
                let transcript = chat.transcript();
                assert!(
                    !transcript.to_lowercase().contains("password"),
                    "a password was asked after sign-up: {transcript}"
                );
                assert!(!transcript.contains("rate limited"), "{transcript}");
            }
        }
    })
    .await
    .unwrap();
    drop((alice_dir, bob_dir));
}

/// One account's directory, where its `sealpost-chat` runs.
struct Person {
    bin: PathBuf,
    server: String,
    dir: PathBuf,
    name: &'static str,
}

impl Person {
    fn new(bin: &Path, server: &str, dir: &Path, name: &'static str) -> Self {
        Self {
            bin: bin.to_owned(),
            server: server.to_owned(),
            dir: dir.to_owned(),
            name,
        }
    }

    fn run(&self, args: &[&str]) -> Terminal {
        let mut all = vec!["--server", self.server.as_str()];
        all.extend_from_slice(args);
        Terminal::spawn(&self.bin, &self.dir, &all)
    }

    /// Signs up as a person does: the password twice, never echoed.
    fn register(&self) {
        let mut term = self.run(&["register", self.name]);
        term.expect(&format!("choose a password for {}: ", self.name));
        term.type_keys(&format!("{PASSWORD}\r"));
        term.expect("the same password again: ");
        term.type_keys(&format!("{PASSWORD}\r"));
        term.expect(&format!("registered {}", self.name));
        assert!(term.exit().success(), "{}", term.transcript());
        assert!(
            !term.transcript().contains(PASSWORD),
            "the password was echoed: {}",
            term.transcript()
        );
    }
}

/// A process in a pseudo-terminal, and what it printed so far.
struct Terminal {
    child: Box<dyn Child + Send + Sync>,
    writer: Box<dyn Write + Send>,
    /// Held: closing it hangs the terminal up.
    _master: Box<dyn MasterPty + Send>,
    output: Arc<Mutex<Vec<u8>>>,
    /// How much of the (escape-free) transcript expectations have used.
    seen: usize,
    /// When an expectation first found the process gone.
    exited_at: Option<Instant>,
}

impl Terminal {
    fn spawn(bin: &Path, dir: &Path, args: &[&str]) -> Terminal {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: 40,
                cols: 160,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("open a pty");
        let mut command = CommandBuilder::new(bin);
        command.args(args);
        command.cwd(dir);
        // Nothing of the test's environment (SEALPOST_PASSWORD above all).
        command.env_clear();
        command.env("TERM", "xterm");
        let child = pair
            .slave
            .spawn_command(command)
            .expect("spawn sealpost-chat");
        // Only the child holds the terminal: its exit ends the reads.
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().unwrap();
        let writer = pair.master.take_writer().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            child,
            writer,
            _master: pair.master,
            output,
            seen: 0,
            exited_at: None,
        }
    }

    /// What was printed, without the terminal's escape sequences.
    fn transcript(&self) -> String {
        strip_escapes(&String::from_utf8_lossy(&self.output.lock().unwrap()))
    }

    /// Waits until `needle` is printed after what earlier expectations
    /// matched.
    #[track_caller]
    fn expect(&mut self, needle: &str) {
        let deadline = Instant::now() + EXPECT;
        loop {
            let transcript = self.transcript();
            if let Some(at) = transcript.get(self.seen..).and_then(|t| t.find(needle)) {
                self.seen += at + needle.len();
                return;
            }
            // Exited without printing it: no use waiting (what it printed
            // last is read before the next look).
            let exited = matches!(self.child.try_wait(), Ok(Some(_)));
            if exited && self.exited_at.get_or_insert_with(Instant::now).elapsed() > GRACE {
                panic!(
                    "sealpost-chat exited without printing {needle:?}; the terminal shows:\n{transcript}"
                );
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "{needle:?} was not printed within {EXPECT:?}; the terminal shows:\n{transcript}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Keys, as a keyboard sends them ("\r" is Enter, "\x03" Ctrl-C).
    fn type_keys(&mut self, keys: &str) {
        self.writer.write_all(keys.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }

    /// The exit status, waited for [`QUIT`] at most (then killed).
    #[track_caller]
    fn exit(&mut self) -> portable_pty::ExitStatus {
        let deadline = Instant::now() + QUIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "sealpost-chat did not exit within {QUIT:?}; the terminal shows:\n{}",
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `text` without CSI sequences (`ESC [ ... final`), other two-byte
/// escapes and carriage returns: what a person reads.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            // A two-byte escape goes whole; a CSI up to its final byte.
            '\x1b' => {
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// The `sealpost-chat` binary, as `cargo test --workspace` (the README's
/// test command) builds it: asked of the cargo that runs the tests, once
/// per test process. After that command it is a check that finds
/// everything fresh; run alone, it builds what that command would. (A
/// `cargo build -p sealpost-chat` would build the chat's dependencies
/// again with the features of that package alone.)
fn chat_binary() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = Command::new(cargo);
        // Without what cargo sets for a test it runs: build scripts that
        // watch a variable (ring's, `CARGO_MANIFEST_DIR`) would see it
        // changed, and rebuild half the tree.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_MANIFEST_")
                || matches!(
                    name.as_ref(),
                    "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
            {
                command.env_remove(name.as_ref());
            }
        }
        let output = command
            .args([
                "test",
                "--workspace",
                "--no-run",
                "--message-format=json-render-diagnostics",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run cargo test --no-run");
        assert!(
            output.status.success(),
            "cargo test --workspace --no-run failed"
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find_map(|message| {
                // The binary itself, not its unit tests' harness.
                let built = message["reason"] == "compiler-artifact"
                    && message["target"]["name"] == "sealpost-chat"
                    && message["profile"]["test"] == false;
                built
                    .then(|| message["executable"].as_str().map(PathBuf::from))
                    .flatten()
            })
            .expect("cargo named the sealpost-chat executable")
    })
}

#[test]
fn escapes_are_stripped() {
    assert_eq!(
        strip_escapes("\r\x1b[2K[connected]\r\n\x1b[1;31mto bob> hi\x1b7"),
        "[connected]\nto bob> hi"
    );
}
