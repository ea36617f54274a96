//! The chat's input: a line being typed, and everything printed above it.
//!
//! On a terminal ([`Input::start`]) the terminal is in raw mode and key
//! presses arrive on crossterm's async event stream, so that
//! - Ctrl-C (or Ctrl-D on an empty line) quits at once: it is a key the
//!   loop reads like any other, not a signal racing a blocked read;
//! - what arrives is printed above the line being typed, which is drawn
//!   again below it ([`Input::print`]), with a status before the prompt
//!   ("bob is typing…");
//! - each edit is reported ([`Key::Edited`]), so the chat can tell the peer
//!   that the user is typing.
//!
//! The line is edited at its end only (characters, Backspace, Ctrl-U,
//! Ctrl-W); one too long for the terminal shows its tail. Raw mode is left
//! when the [`Input`] is dropped, on a panic's unwinding too.
//!
//! Elsewhere (a pipe, a file, `--json`) lines are read by a plain thread
//! and Ctrl-C is the signal: the thread is never joined, so a read it is
//! blocked in never holds the process up at exit (tokio's `stdin` reads on
//! its blocking pool, whose shutdown waits for that read: the reason
//! `chat` used to wait for Enter after Ctrl-C).

use std::io::{self, BufRead, IsTerminal, Write};

use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::terminal;
use futures_util::StreamExt;
use tokio::sync::mpsc;

/// What the user did.
pub enum Key {
    /// A finished line (Enter).
    Line(String),
    /// The line being typed changed; `empty` once nothing is left of it.
    Edited { empty: bool },
    /// Ctrl-C, Ctrl-D on an empty line, or the end of the input.
    Quit,
}

pub struct Input {
    mode: Mode,
}

enum Mode {
    Terminal(Editor),
    /// Lines from a reader thread; a handful in flight is plenty for a
    /// person or a script, and a full channel only pauses the thread.
    Lines(mpsc::Receiver<String>),
}

const LINES: usize = 16;

impl Input {
    /// The line editor when standard input and output are a terminal and
    /// `plain` is not asked for, else plain lines.
    pub fn start(prompt: &str, plain: bool) -> io::Result<Input> {
        if !plain && io::stdin().is_terminal() && io::stdout().is_terminal() {
            return Ok(Input {
                mode: Mode::Terminal(Editor::start(prompt)?),
            });
        }
        let (lines, rx) = mpsc::channel(LINES);
        std::thread::spawn(move || {
            for line in io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if lines.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Input {
            mode: Mode::Lines(rx),
        })
    }

    /// Printing only: nothing is read (`listen`).
    pub fn none() -> Input {
        let (_, rx) = mpsc::channel(1);
        Input {
            mode: Mode::Lines(rx),
        }
    }

    pub async fn next(&mut self) -> Key {
        match &mut self.mode {
            Mode::Terminal(editor) => editor.next().await,
            Mode::Lines(rx) => match rx.recv().await {
                Some(line) => Key::Line(line),
                None => Key::Quit,
            },
        }
    }

    /// Prints `line` above the line being typed.
    pub fn print(&mut self, line: &str) {
        match &mut self.mode {
            Mode::Terminal(editor) => editor.print(line),
            Mode::Lines(_) => {
                let mut out = io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    /// Replaces the prompt (the conversation changed); without a
    /// terminal there is none.
    pub fn set_prompt(&mut self, prompt: &str) {
        if let Mode::Terminal(editor) = &mut self.mode {
            editor.prompt = prompt.to_owned();
            editor.draw();
        }
    }

    /// Shows `status` before the prompt (or clears it); without a terminal,
    /// a new status is printed as a line of its own.
    pub fn set_status(&mut self, status: Option<String>) {
        match &mut self.mode {
            Mode::Terminal(editor) => {
                if editor.status != status {
                    editor.status = status;
                    editor.draw();
                }
            }
            Mode::Lines(_) => {
                if let Some(status) = status {
                    self.print(&status);
                }
            }
        }
    }
}

/// The raw-mode line editor.
struct Editor {
    events: EventStream,
    prompt: String,
    status: Option<String>,
    line: String,
}

impl Editor {
    fn start(prompt: &str) -> io::Result<Editor> {
        terminal::enable_raw_mode()?;
        let editor = Editor {
            events: EventStream::new(),
            prompt: prompt.to_owned(),
            status: None,
            line: String::new(),
        };
        editor.draw();
        Ok(editor)
    }

    async fn next(&mut self) -> Key {
        loop {
            let event = match self.events.next().await {
                Some(Ok(event)) => event,
                // The terminal went away.
                Some(Err(_)) | None => return Key::Quit,
            };
            let key = match event {
                Event::Key(key) if key.kind != KeyEventKind::Release => key,
                Event::Resize(..) => {
                    self.draw();
                    continue;
                }
                _ => continue,
            };
            if let Some(key) = self.edit(key) {
                return key;
            }
        }
    }

    fn edit(&mut self, key: KeyEvent) -> Option<Key> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('c') if ctrl => return Some(Key::Quit),
            KeyCode::Char('d') if ctrl && self.line.is_empty() => return Some(Key::Quit),
            KeyCode::Char('u') if ctrl => self.line.clear(),
            KeyCode::Char('w') if ctrl => {
                let kept = self.line.trim_end().rfind(' ').map_or(0, |i| i + 1);
                self.line.truncate(kept);
            }
            KeyCode::Char(c) if !ctrl => self.line.push(c),
            KeyCode::Backspace => {
                self.line.pop();
            }
            KeyCode::Enter => {
                let line = std::mem::take(&mut self.line);
                self.draw();
                return Some(Key::Line(line));
            }
            _ => return None,
        }
        self.draw();
        Some(Key::Edited {
            empty: self.line.is_empty(),
        })
    }

    fn print(&mut self, line: &str) {
        let mut out = io::stdout().lock();
        // Raw mode: a line feed does not return the carriage.
        let _ = write!(out, "\r\x1b[2K{}\r\n", line.replace('\n', "\r\n"));
        drop(out);
        self.draw();
    }

    /// The status, the prompt and the tail of the line that fits.
    fn draw(&self) {
        let width = terminal::size().map_or(80, |(w, _)| usize::from(w));
        let status = self
            .status
            .as_deref()
            .map(|s| format!("({s}) "))
            .unwrap_or_default();
        let head = format!("{status}{}", self.prompt);
        let room = width.saturating_sub(head.chars().count() + 1).max(1);
        let skip = self.line.chars().count().saturating_sub(room);
        let tail: String = self.line.chars().skip(skip).collect();
        let mut out = io::stdout().lock();
        let _ = write!(out, "\r\x1b[2K{head}{tail}");
        let _ = out.flush();
    }
}

impl Drop for Editor {
    fn drop(&mut self) {
        let mut out = io::stdout().lock();
        let _ = write!(out, "\r\x1b[2K");
        let _ = out.flush();
        let _ = terminal::disable_raw_mode();
    }
}
