//! The JSON shapes of `protocol.md` that this client reads and writes, in
//! one place: REST bodies and WebSocket frames share the message view, the
//! envelope and the error object.
//!
//! Unknown fields are ignored everywhere (serde's default), as the
//! protocol asks of clients.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::WireError;

/// A token pair: the reply of login, device addition and refresh.
#[derive(Deserialize)]
pub(crate) struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    /// Seconds the access token lives.
    pub expires_in: u64,
}

impl fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenPair")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/register`'s reply.
#[derive(Debug, Deserialize)]
pub(crate) struct Registered {
    pub device_id: u32,
}

/// `GET /v1/me`.
#[derive(Debug, Deserialize)]
pub(crate) struct Me {
    pub id: Uuid,
    pub username: String,
    pub public_key: String,
    pub device_id: u32,
}

/// `GET /v1/users/{username}`.
#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub id: Uuid,
    pub username: String,
}

/// One item of `GET /v1/users/{id}/devices`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct DirectoryDevice {
    pub device_id: u32,
    pub public_key: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Directory {
    pub devices: Vec<DirectoryDevice>,
}

/// One of your account's devices, as `GET /v1/devices` lists them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct OwnDevice {
    pub device_id: u32,
    /// Seen only by the account itself; `None` when unset.
    pub name: Option<String>,
    pub public_key: String,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
    /// This client's own device.
    pub current: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct OwnDevices {
    pub devices: Vec<OwnDevice>,
}

/// One body for one device of the recipient.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Envelope {
    pub device_id: u32,
    /// base64 of the sealed body.
    pub body: String,
}

/// `POST /v1/messages` (and the fields of a `send` frame).
#[derive(Debug, Serialize)]
pub(crate) struct SendRequest<'a> {
    pub to: Uuid,
    pub envelopes: &'a [Envelope],
    /// The send's key, the same on each of its retries: the server answers
    /// a repeat with the first answer and stores nothing again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<&'a str>,
}

/// `POST /v1/messages`' reply.
#[derive(Debug, Deserialize)]
pub(crate) struct Accepted {
    pub id: Uuid,
    pub sent_at: DateTime<Utc>,
}

/// A delivered copy: an item of `GET /v1/messages`, or a `message` frame.
#[derive(Deserialize)]
pub(crate) struct MessageView {
    pub id: Uuid,
    pub from: Uuid,
    pub from_device: u32,
    pub body: String,
    pub sent_at: DateTime<Utc>,
    #[serde(default)]
    pub ephemeral: bool,
}

/// `GET /v1/messages`.
#[derive(Deserialize)]
pub(crate) struct Page {
    pub messages: Vec<MessageView>,
    pub next: Option<Uuid>,
}

/// `POST /v1/messages/ack`'s reply.
#[derive(Debug, Deserialize)]
pub(crate) struct Acked {
    #[allow(dead_code)]
    pub acked: u64,
}

/// A frame from the server. Frame types this client does not know land in
/// `Unknown` and are ignored.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ServerFrame {
    Ready {
        #[allow(dead_code)]
        user_id: Uuid,
        #[allow(dead_code)]
        device_id: u32,
        expires_at: DateTime<Utc>,
    },
    Message(MessageView),
    Drained,
    Sent {
        #[serde(rename = "ref")]
        reference: Option<String>,
        id: Uuid,
        sent_at: DateTime<Utc>,
        delivered: Option<bool>,
    },
    Authed {
        #[allow(dead_code)]
        #[serde(rename = "ref")]
        reference: Option<String>,
        expires_at: DateTime<Utc>,
    },
    Receipt {
        id: Uuid,
        to: Uuid,
        device_id: u32,
    },
    DevicesChanged {
        #[allow(dead_code)]
        devices: Vec<u32>,
    },
    Error {
        #[serde(rename = "ref")]
        reference: Option<String>,
        #[serde(flatten)]
        error: WireError,
    },
    #[serde(other)]
    Unknown,
}

/// A frame to the server.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum ClientFrame<'a> {
    Send {
        #[serde(rename = "ref")]
        reference: &'a str,
        to: Uuid,
        envelopes: &'a [Envelope],
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        ephemeral: bool,
        /// As in [`SendRequest::client_id`]; `None` for ephemeral sends.
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
    },
    Ack {
        ids: &'a [Uuid],
    },
    Auth {
        #[serde(rename = "ref")]
        reference: &'a str,
        token: &'a str,
    },
}

impl ClientFrame<'_> {
    pub fn to_text(&self) -> String {
        // Serialising these types cannot fail: no maps, no foreign types.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_frames() {
        let frame: ServerFrame = serde_json::from_str(
            r#"{"type":"error","ref":"b-7","code":"devices_changed","message":"m","missing":[2],"extra":[]}"#,
        )
        .unwrap();
        match frame {
            ServerFrame::Error { reference, error } => {
                assert_eq!(reference.as_deref(), Some("b-7"));
                assert_eq!(error.missing, vec![2]);
            }
            _ => panic!("not an error frame"),
        }
        let frame: ServerFrame =
            serde_json::from_str(r#"{"type":"from_the_future","x":1}"#).unwrap();
        assert!(matches!(frame, ServerFrame::Unknown));
        let frame: ServerFrame = serde_json::from_str(
            r#"{"type":"message","id":"01a20ab2-3e82-7a14-b6c3-8d2e4f6a1b90","from":"8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13","from_device":1,"body":"Zm9y","sent_at":"2026-11-24T09:12:17.452Z","ephemeral":true}"#,
        )
        .unwrap();
        assert!(matches!(frame, ServerFrame::Message(m) if m.ephemeral && m.from_device == 1));
    }

    #[test]
    fn writes_the_documented_frames() {
        let to = Uuid::nil();
        let envelopes = [Envelope {
            device_id: 1,
            body: "Zm9y".into(),
        }];
        let send = ClientFrame::Send {
            reference: "s-1",
            to,
            envelopes: &envelopes,
            ephemeral: false,
            client_id: Some("k-1"),
        };
        assert_eq!(
            serde_json::to_value(&send).unwrap(),
            serde_json::json!({"type":"send","ref":"s-1","to":to,"envelopes":[{"device_id":1,"body":"Zm9y"}],"client_id":"k-1"})
        );
        let typing = ClientFrame::Send {
            reference: "s-2",
            to,
            envelopes: &envelopes,
            ephemeral: true,
            client_id: None,
        };
        assert_eq!(
            serde_json::to_value(&typing).unwrap(),
            serde_json::json!({"type":"send","ref":"s-2","to":to,"envelopes":[{"device_id":1,"body":"Zm9y"}],"ephemeral":true})
        );
        let ack = ClientFrame::Ack { ids: &[to] };
        assert_eq!(ack.to_text(), format!(r#"{{"type":"ack","ids":["{to}"]}}"#));
    }
}
