//! What the chat prints, as a person reads it: peers by username (the
//! name the client learnt, else the user id), receipts naming the message
//! they are for, connection states in words, device changes of the account
//! as sentences, "bob is typing…" while bob types. With `--json`, one
//! object per line instead.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use sealpost_client::{
    Client, ConnectionState, DeviceChangeReason, Event, Group, Incoming, Sent, TYPING_SHOWN,
};
use serde_json::json;
use uuid::Uuid;

use crate::input::Input;

/// Sent messages remembered to name them in their receipts. Receipts come
/// within seconds of the send; older ones are named by device only.
const REMEMBERED: usize = 256;
/// Characters of a message quoted in its receipt.
const QUOTE_CHARS: usize = 24;
/// Groups remembered, learnt from messages or made here: far more than a
/// person has open; past it the oldest goes, and comes back with its next
/// message.
const GROUPS: usize = 256;
/// Receipts held until the answer to their send reaches the chat loop
/// (a quick peer's receipt can overtake it); past this many, the oldest is
/// shown without its message.
const EARLY_RECEIPTS: usize = 64;

#[derive(Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints one line: `json` with `--json`, else `text`.
    pub fn line(&self, json: serde_json::Value, text: String) {
        let mut stdout = std::io::stdout().lock();
        let _ = if self.json {
            writeln!(stdout, "{json}")
        } else {
            writeln!(stdout, "{text}")
        };
    }

    /// As [`Output::line`], above the line being typed.
    fn to(&self, input: &mut Input, json: serde_json::Value, text: String) {
        if self.json {
            input.print(&json.to_string());
        } else {
            input.print(&text);
        }
    }
}

/// What the chat remembers to show events well.
pub struct Shown {
    client: Client,
    /// The conversation's peer and its name, in `chat` with one user.
    peer: Option<(Uuid, String)>,
    /// The conversation's group, in `chat` in a group.
    group: Option<Uuid>,
    /// The groups known, by id: their latest name and members.
    groups: HashMap<Uuid, Group>,
    /// Group ids, the least recently seen first.
    groups_order: VecDeque<Uuid>,
    /// The messages sent in this chat, numbered from 1 as typed.
    typed: u64,
    /// Server id → (number, quote) of the messages sent, oldest first.
    sent: HashMap<Uuid, (u64, String)>,
    sent_order: VecDeque<Uuid>,
    /// Who is typing, since when (their last `typing`).
    typing: HashMap<Uuid, Instant>,
    /// Sends typed whose answer has not been shown yet.
    in_flight: usize,
    /// Receipts (id, to, device) for ids not known yet while sends are in
    /// flight: shown with their send's answer.
    early: VecDeque<(Uuid, Uuid, u32)>,
}

impl Shown {
    pub fn new(client: Client, peer: Option<(Uuid, String)>) -> Self {
        Self {
            client,
            peer,
            group: None,
            groups: HashMap::new(),
            groups_order: VecDeque::new(),
            typed: 0,
            sent: HashMap::new(),
            sent_order: VecDeque::new(),
            typing: HashMap::new(),
            in_flight: 0,
            early: VecDeque::new(),
        }
    }

    /// Switches the conversation to one user, or to a group (`peer`
    /// `None`): what is marked "[other chat]" follows.
    pub fn switch(&mut self, peer: Option<(Uuid, String)>, group: Option<Uuid>) {
        self.peer = peer;
        self.group = group;
    }

    /// Keeps `group` as the latest word on it (its name and members).
    pub fn learn_group(&mut self, group: &Group) {
        self.groups_order.retain(|id| *id != group.id);
        self.groups_order.push_back(group.id);
        self.groups.insert(group.id, group.clone());
        if self.groups_order.len() > GROUPS
            && let Some(old) = self.groups_order.pop_front()
        {
            self.groups.remove(&old);
        }
    }

    /// The most recently seen group called `name`.
    pub fn group_named(&self, name: &str) -> Option<Group> {
        self.groups_order
            .iter()
            .rev()
            .filter_map(|id| self.groups.get(id))
            .find(|g| g.name == name)
            .cloned()
    }

    /// The group `id`, as last seen.
    pub fn group(&self, id: Uuid) -> Option<&Group> {
        self.groups.get(&id)
    }

    /// The groups known, the most recent first.
    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups_order
            .iter()
            .rev()
            .filter_map(|id| self.groups.get(id))
    }

    /// The members of `group` by name, for a person.
    pub async fn member_names(&self, group: &Group) -> String {
        let mut names = Vec::with_capacity(group.members.len());
        for member in &group.members {
            names.push(self.name(*member).await);
        }
        names.join(", ")
    }

    /// The name to show for `user`.
    async fn name(&self, user: Uuid) -> String {
        if let Some((peer, name)) = &self.peer
            && *peer == user
        {
            return name.clone();
        }
        if user == self.client.user_id() {
            return self.client.username().to_owned();
        }
        match self.client.username_of(user).await {
            Ok(Some(name)) => name,
            _ => user.to_string(),
        }
    }

    /// A line typed: echoed as sent, numbered for its receipts.
    pub fn outgoing(&mut self, out: &Output, input: &mut Input, line: &str) -> u64 {
        self.typed += 1;
        self.in_flight += 1;
        if !out.json {
            input.print(&format!(
                "{} {}: {line}",
                chrono_now(),
                self.client.username()
            ));
        }
        self.typed
    }

    /// The server's answer to message `number`.
    pub async fn sent(
        &mut self,
        out: &Output,
        input: &mut Input,
        number: u64,
        line: &str,
        result: sealpost_client::Result<Sent>,
    ) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let id = result.as_ref().ok().map(|sent| sent.id);
        match result {
            Ok(sent) => {
                self.sent.insert(sent.id, (number, quote(line)));
                self.sent_order.push_back(sent.id);
                if self.sent_order.len() > REMEMBERED
                    && let Some(old) = self.sent_order.pop_front()
                {
                    self.sent.remove(&old);
                }
                out.to(
                    input,
                    json!({ "sent": sent.id, "number": number }),
                    format!("  (#{number} sent)"),
                );
            }
            Err(e) => out.to(
                input,
                json!({ "error": e.to_string(), "number": number }),
                format!("  (#{number} {} not sent: {e})", quote(line)),
            ),
        }
        // Receipts that came first: this send's now, with its message;
        // the others once no send is left to claim them.
        let mut held = std::mem::take(&mut self.early);
        if let Some(id) = id {
            for (_, to, device_id) in held.iter().filter(|(r, ..)| *r == id) {
                self.receipt(out, input, id, *to, *device_id).await;
            }
            held.retain(|(r, ..)| *r != id);
        }
        if self.in_flight == 0 {
            for (id, to, device_id) in held.drain(..) {
                self.receipt(out, input, id, to, device_id).await;
            }
        }
        self.early = held;
    }

    async fn receipt(&self, out: &Output, input: &mut Input, id: Uuid, to: Uuid, device_id: u32) {
        let whose = if to == self.client.user_id() {
            format!("your device {device_id}")
        } else {
            format!("{}'s device {device_id}", self.name(to).await)
        };
        let text = match self.sent.get(&id) {
            Some((number, quote)) => format!("  (#{number} {quote} delivered to {whose})"),
            None => format!("  (a message delivered to {whose})"),
        };
        out.to(
            input,
            json!({ "receipt": id, "to": to, "device_id": device_id,
                    "number": self.sent.get(&id).map(|(n, _)| n) }),
            text,
        );
    }

    /// Clears "typing…" of whoever stopped longer ago than the protocol's
    /// five seconds.
    pub fn expire_typing(&mut self, input: &mut Input) {
        let before = self.typing.len();
        self.typing.retain(|_, at| at.elapsed() < TYPING_SHOWN);
        if self.typing.len() != before {
            self.show_typing(input);
        }
    }

    fn show_typing(&self, input: &mut Input) {
        let status = match &self.peer {
            Some((peer, name)) if self.typing.contains_key(peer) => {
                Some(format!("{name} is typing…"))
            }
            _ => None,
        };
        input.set_status(status);
    }

    /// Prints one event; acknowledges messages once printed. Messages of
    /// other conversations are shown, marked. Returns whether the socket
    /// stopped for good (the loop should end).
    pub async fn event(&mut self, out: &Output, input: &mut Input, event: Event) -> Result<bool> {
        match event {
            Event::Message(m) => {
                if self.typing.remove(&m.from).is_some() {
                    self.show_typing(input);
                }
                if let Some(group) = &m.group {
                    self.learn_group(group);
                }
                let line = self.message(&m).await;
                out.to(
                    input,
                    json!({ "id": m.id, "from": m.from, "from_name": self.client.known_username(m.from),
                            "from_device": m.from_device, "to": m.to, "group": m.group, "text": m.text,
                            "ts": m.ts, "sent_at": m.sent_at, "ephemeral": m.ephemeral }),
                    line,
                );
                if !m.ephemeral {
                    self.client.ack(&[m.id]).await?;
                }
            }
            Event::Undecryptable { id, from, .. } => {
                let name = self.name(from).await;
                out.to(
                    input,
                    json!({ "undecryptable": id, "from": from }),
                    format!("! a message from {name} could not be read"),
                );
            }
            Event::Receipt { id, to, device_id } => {
                if self.sent.contains_key(&id) || self.in_flight == 0 {
                    self.receipt(out, input, id, to, device_id).await;
                } else {
                    // Perhaps for a send whose answer is still on its way.
                    self.early.push_back((id, to, device_id));
                    if self.early.len() > EARLY_RECEIPTS
                        && let Some((id, to, device_id)) = self.early.pop_front()
                    {
                        self.receipt(out, input, id, to, device_id).await;
                    }
                }
            }
            Event::DevicesChanged {
                devices,
                added,
                change,
            } => {
                let ids: Vec<u32> = devices.iter().map(|d| d.device_id).collect();
                let text = match change {
                    Some(change) => {
                        let id = change.device_id;
                        match change.reason {
                            DeviceChangeReason::Added => format!(
                                "! a new device {id} was added to your account (if that was not you, change your password)"
                            ),
                            DeviceChangeReason::Removed => {
                                format!("! your device {id} was removed from your account")
                            }
                            DeviceChangeReason::Key => {
                                format!("! your device {id} has a new key")
                            }
                            DeviceChangeReason::Login => format!(
                                "! your device {id} logged in again (if that was not you, change your password)"
                            ),
                            _ => format!("! your device {id} changed; your devices are {ids:?}"),
                        }
                    }
                    None if added.is_empty() => format!("! your devices are now {ids:?}"),
                    None => format!(
                        "! new device(s) {added:?} on your account: if that was not you, change your password"
                    ),
                };
                out.to(input, json!({ "devices": ids, "added": added }), text);
            }
            Event::Typing { from, stopped, .. } => {
                if stopped {
                    self.typing.remove(&from);
                } else {
                    self.typing.insert(from, Instant::now());
                }
                if out.json {
                    out.to(
                        input,
                        json!({ "typing": from, "stopped": stopped }),
                        String::new(),
                    );
                } else if self.peer.as_ref().is_some_and(|(peer, _)| *peer == from) {
                    self.show_typing(input);
                }
            }
            Event::State(state) => {
                let stopped = matches!(state, ConnectionState::Stopped { .. });
                out.to(
                    input,
                    json!({ "state": state.to_string() }),
                    format!("[{state}]"),
                );
                return Ok(stopped);
            }
            _ => {}
        }
        Ok(false)
    }

    async fn message(&self, m: &Incoming) -> String {
        let mine = m.from == self.client.user_id();
        if let Some(group) = &m.group {
            // Filed under its group, whoever sent it.
            let other =
                (self.peer.is_some() || self.group.is_some()) && self.group != Some(group.id);
            let who = if mine {
                format!("{} (device {})", self.client.username(), m.from_device)
            } else {
                self.name(m.from).await
            };
            return format!(
                "{}{} [#{}] {who}: {}",
                if other { "[other chat] " } else { "" },
                m.ts.with_timezone(&chrono::Local).format("%H:%M"),
                group.name,
                m.text
            );
        }
        let other = match (&self.peer, mine) {
            (Some((peer, _)), false) => m.from != *peer,
            (Some((peer, _)), true) => m.to != Some(*peer),
            // In a group's conversation, a message between two people.
            (None, _) => self.group.is_some(),
        };
        let who = if mine {
            let to = match m.to {
                Some(to) => self.name(to).await,
                None => "yourself".into(),
            };
            format!(
                "{} (device {}) to {to}",
                self.client.username(),
                m.from_device
            )
        } else {
            self.name(m.from).await
        };
        format!(
            "{}{} {who}: {}",
            if other { "[other chat] " } else { "" },
            m.ts.with_timezone(&chrono::Local).format("%H:%M"),
            m.text
        )
    }
}

fn chrono_now() -> String {
    chrono::Local::now().format("%H:%M").to_string()
}

/// A short quote of `text` for a receipt.
fn quote(text: &str) -> String {
    let mut quoted: String = text.chars().take(QUOTE_CHARS).collect();
    if text.chars().count() > QUOTE_CHARS {
        quoted.push('…');
    }
    format!("\"{quoted}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_short() {
        assert_eq!(quote("hello"), "\"hello\"");
        let long = "x".repeat(100);
        let quoted = quote(&long);
        assert_eq!(quoted.chars().count(), QUOTE_CHARS + 3);
        assert!(quoted.ends_with("…\""));
    }
}
