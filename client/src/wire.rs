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
    /// Whose session it is. Newer servers say it in every pair; older
    /// ones do not, and `GET /v1/me` tells.
    #[serde(default)]
    #[allow(dead_code)]
    pub user_id: Option<Uuid>,
    #[serde(default)]
    #[allow(dead_code)]
    pub device_id: Option<u32>,
}

impl fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenPair")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// `POST /v1/register`'s reply: the account, and on newer servers a
/// session of device 1 (so that signing up costs one password hash, not a
/// login more).
#[derive(Deserialize)]
pub(crate) struct Registered {
    pub device_id: u32,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    id: Option<Uuid>,
}

impl Registered {
    /// The session the server opened with the account, if it did (a
    /// server older than the session in the register answer did not).
    pub fn session(self) -> Option<TokenPair> {
        Some(TokenPair {
            access_token: self.access_token?,
            refresh_token: self.refresh_token?,
            expires_in: self.expires_in?,
            user_id: self.id,
            device_id: Some(self.device_id),
        })
    }
}

impl fmt::Debug for Registered {
    // Never the tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registered")
            .field("device_id", &self.device_id)
            .field("session", &self.access_token.is_some())
            .finish_non_exhaustive()
    }
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
    /// The account's username; newer servers say it, so that a receiver
    /// can name a sender it never looked up.
    #[serde(default)]
    pub username: Option<String>,
    pub devices: Vec<DirectoryDevice>,
}

/// What the server accepts (`GET /v1/limits`), from its running
/// configuration. A server older than that endpoint is taken to have the
/// defaults of `protocol.md`, which [`Default`] gives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Limits {
    /// The largest sealed body, in bytes before base64: version, nonce
    /// and tag (41 bytes) and the plaintext JSON.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Devices one account may hold.
    #[serde(default = "default_max_devices")]
    pub max_devices_per_user: u32,
    /// Ids one ack may carry.
    #[serde(default = "default_max_ids")]
    pub max_ids_per_ack: usize,
    /// How long an access token lives, if the server says.
    #[serde(default)]
    pub access_token_ttl_seconds: Option<u64>,
    /// How long an unacknowledged message is kept, if the server says.
    #[serde(default)]
    pub message_ttl_seconds: Option<u64>,
}

fn default_max_body_bytes() -> usize {
    65_536
}
fn default_max_devices() -> u32 {
    10
}
fn default_max_ids() -> usize {
    500
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: default_max_body_bytes(),
            max_devices_per_user: default_max_devices(),
            max_ids_per_ack: default_max_ids(),
            access_token_ttl_seconds: None,
            message_ttl_seconds: None,
        }
    }
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
    /// The device's push target (`PUT /v1/devices/{id}/push`): its kind and
    /// when it was registered, never the endpoint or token. `None` when it
    /// has none, when its push service dropped it (register again), or
    /// from a server older than push targets.
    #[serde(default)]
    pub push: Option<PushInfo>,
}

/// A device's push target as the server shows it: what kind, and since
/// when. The answer of [`Client::set_push_target`](crate::Client::set_push_target).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct PushInfo {
    pub kind: PushKind,
    pub updated_at: DateTime<Utc>,
}

/// The push services a target can belong to, by their wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum PushKind {
    /// Web Push (RFC 8030): browsers, UnifiedPush distributors.
    #[serde(rename = "webpush")]
    WebPush,
    /// Apple Push Notification service.
    #[serde(rename = "apns")]
    Apns,
    /// Firebase Cloud Messaging.
    #[serde(rename = "fcm")]
    Fcm,
    /// A kind this version of the client does not know.
    #[serde(other)]
    Other,
}

/// Which APNs service knows the token: an app built for development gets
/// sandbox tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApnsEnvironment {
    #[default]
    Production,
    Sandbox,
}

/// A Web Push subscription's keys, base64url as a browser's
/// `PushSubscription.toJSON()` gives them.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct WebPushKeys {
    /// The subscriber's P-256 public key, uncompressed (65 bytes).
    pub p256dh: String,
    /// The subscriber's authentication secret (16 bytes).
    pub auth: String,
}

/// Where the server sends this device's wake-ups
/// ([`Client::set_push_target`](crate::Client::set_push_target)). A
/// wake-up carries nothing: on one, fetch the queue and show what it holds.
/// `Debug` never shows the endpoint, keys or token: each is a capability
/// to notify the device.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind")]
#[non_exhaustive]
pub enum PushTarget {
    /// A Web Push subscription (a browser's, or a UnifiedPush
    /// distributor's): an `https` endpoint and its keys.
    #[serde(rename = "webpush")]
    WebPush { endpoint: String, keys: WebPushKeys },
    /// An APNs device token (hex) for the app whose bundle id is `topic`.
    #[serde(rename = "apns")]
    Apns {
        token: String,
        topic: String,
        environment: ApnsEnvironment,
    },
    /// An FCM registration token.
    #[serde(rename = "fcm")]
    Fcm { token: String },
}

impl PushTarget {
    /// A Web Push subscription: its endpoint and its base64url keys.
    pub fn web_push(
        endpoint: impl Into<String>,
        p256dh: impl Into<String>,
        auth: impl Into<String>,
    ) -> Self {
        PushTarget::WebPush {
            endpoint: endpoint.into(),
            keys: WebPushKeys {
                p256dh: p256dh.into(),
                auth: auth.into(),
            },
        }
    }

    /// An APNs device token (hex) of the production service for the app
    /// `topic` (its bundle id).
    pub fn apns(token: impl Into<String>, topic: impl Into<String>) -> Self {
        PushTarget::Apns {
            token: token.into(),
            topic: topic.into(),
            environment: ApnsEnvironment::Production,
        }
    }

    /// An APNs device token of the sandbox service (development builds).
    pub fn apns_sandbox(token: impl Into<String>, topic: impl Into<String>) -> Self {
        PushTarget::Apns {
            token: token.into(),
            topic: topic.into(),
            environment: ApnsEnvironment::Sandbox,
        }
    }

    /// An FCM registration token.
    pub fn fcm(token: impl Into<String>) -> Self {
        PushTarget::Fcm {
            token: token.into(),
        }
    }

    pub fn kind(&self) -> PushKind {
        match self {
            PushTarget::WebPush { .. } => PushKind::WebPush,
            PushTarget::Apns { .. } => PushKind::Apns,
            PushTarget::Fcm { .. } => PushKind::Fcm,
        }
    }
}

impl fmt::Debug for PushTarget {
    // The kind only: the rest is a capability.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PushTarget({:?})", self.kind())
    }
}

/// `GET /v1/push/vapid`.
#[derive(Debug, Deserialize)]
pub(crate) struct Vapid {
    pub public_key: String,
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
    /// `false` asks the server to wake the recipient's offline devices at
    /// low priority (and rarely); left out when `true`, the default, so
    /// that an older server sees the request it knows.
    #[serde(skip_serializing_if = "is_true")]
    pub urgent: bool,
}

/// One recipient device's key to a shared body.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeviceKey {
    pub device_id: u32,
    /// base64 of the sealed key.
    pub key: String,
}

/// One account of a shared-form multi send, with a key for each of its
/// devices (but the sending one, on the sender's own account).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SharedRecipient {
    pub to: Uuid,
    pub keys: Vec<DeviceKey>,
}

/// `POST /v1/messages/multi` in the shared form (and the fields of a
/// `send_multi` frame).
#[derive(Debug, Serialize)]
pub(crate) struct MultiRequest<'a> {
    /// base64 of the shared body, stored once by the server.
    pub shared: &'a str,
    pub recipients: &'a [SharedRecipient],
    /// As in [`SendRequest::client_id`]: one for the whole send.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<&'a str>,
    /// As in [`SendRequest::urgent`].
    #[serde(skip_serializing_if = "is_true")]
    pub urgent: bool,
}

fn is_true(b: &bool) -> bool {
    *b
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
    /// On a copy of a shared-form send only: this device's key to `body`.
    #[serde(default)]
    pub key: Option<String>,
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
        /// The account's device ids, ascending; newer servers only.
        #[serde(default)]
        devices: Option<Vec<u32>>,
        /// This device's push target was dropped by its push service
        /// (present and `true` only then): register one again.
        #[serde(default)]
        push_dropped: bool,
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
        /// The device the change is about, and what happened to it:
        /// newer servers only.
        #[serde(default)]
        device_id: Option<u32>,
        #[serde(default)]
        reason: Option<String>,
    },
    /// An ack with a `ref` is durable (newer servers only).
    Acked {
        #[serde(rename = "ref")]
        reference: String,
        #[serde(default)]
        #[allow(dead_code)]
        ids: Vec<Uuid>,
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
        /// As in [`SendRequest::urgent`].
        #[serde(skip_serializing_if = "is_true")]
        urgent: bool,
    },
    SendMulti {
        #[serde(rename = "ref")]
        reference: &'a str,
        shared: &'a str,
        recipients: &'a [SharedRecipient],
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        ephemeral: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_id: Option<&'a str>,
        #[serde(skip_serializing_if = "is_true")]
        urgent: bool,
    },
    Ack {
        /// Asks for an `acked` answer once the ack is durable; an older
        /// server ignores it.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a str>,
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
    fn reads_the_newer_fields_and_does_without_them() {
        // `ready` with and without the account's devices.
        let frame: ServerFrame = serde_json::from_str(
            r#"{"type":"ready","user_id":"8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13","device_id":1,"expires_at":"2026-11-24T09:42:17.452Z","devices":[1,3]}"#,
        )
        .unwrap();
        assert!(matches!(frame, ServerFrame::Ready { devices: Some(d), .. } if d == [1, 3]));
        let frame: ServerFrame = serde_json::from_str(
            r#"{"type":"ready","user_id":"8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13","device_id":1,"expires_at":"2026-11-24T09:42:17Z"}"#,
        )
        .unwrap();
        assert!(matches!(frame, ServerFrame::Ready { devices: None, .. }));
        // `devices_changed` with what happened, and without.
        let frame: ServerFrame = serde_json::from_str(
            r#"{"type":"devices_changed","devices":[1,2],"device_id":2,"reason":"login"}"#,
        )
        .unwrap();
        assert!(matches!(
            frame,
            ServerFrame::DevicesChanged { device_id: Some(2), reason: Some(r), .. } if r == "login"
        ));
        let frame: ServerFrame =
            serde_json::from_str(r#"{"type":"devices_changed","devices":[1]}"#).unwrap();
        assert!(matches!(
            frame,
            ServerFrame::DevicesChanged {
                device_id: None,
                reason: None,
                ..
            }
        ));
        let frame: ServerFrame = serde_json::from_str(
            r#"{"type":"acked","ref":"a-7","ids":["01a20ab2-3e82-7a14-b6c3-8d2e4f6a1b90"]}"#,
        )
        .unwrap();
        assert!(
            matches!(frame, ServerFrame::Acked { reference, ids } if reference == "a-7" && ids.len() == 1)
        );
        // A register answer with a session, and one without (older).
        let with: Registered = serde_json::from_str(
            r#"{"id":"8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13","username":"a","public_key":"k","created_at":"2026-11-24T09:12:17.452Z","device_id":1,
                "access_token":"A","token_type":"bearer","expires_in":1800,"refresh_token":"R-secret","user_id":"8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13"}"#,
        )
        .unwrap();
        assert!(!format!("{with:?}").contains("R-secret"), "{with:?}");
        let pair = with.session().unwrap();
        assert_eq!(
            (pair.access_token.as_str(), pair.refresh_token.as_str()),
            ("A", "R-secret")
        );
        assert_eq!(pair.device_id, Some(1));
        let without: Registered = serde_json::from_str(
            r#"{"id":"8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13","username":"a","public_key":"k","created_at":"2026-11-24T09:12:17.452Z","device_id":1}"#,
        )
        .unwrap();
        assert!(without.session().is_none());
        // The directory's username, when given.
        let listed: Directory = serde_json::from_str(
            r#"{"user_id":"8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13","username":"bob","devices":[]}"#,
        )
        .unwrap();
        assert_eq!(listed.username.as_deref(), Some("bob"));
        let listed: Directory = serde_json::from_str(r#"{"devices":[]}"#).unwrap();
        assert_eq!(listed.username, None);
        // Limits: the server's numbers, and the defaults for what it omits.
        let limits: Limits =
            serde_json::from_str(r#"{"max_body_bytes":4096,"max_ref_bytes":128}"#).unwrap();
        assert_eq!(limits.max_body_bytes, 4096);
        assert_eq!(limits.max_devices_per_user, 10);
        assert_eq!(Limits::default().max_body_bytes, 65_536);
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
            urgent: true,
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
            urgent: true,
        };
        assert_eq!(
            serde_json::to_value(&typing).unwrap(),
            serde_json::json!({"type":"send","ref":"s-2","to":to,"envelopes":[{"device_id":1,"body":"Zm9y"}],"ephemeral":true})
        );
        let ack = ClientFrame::Ack {
            reference: None,
            ids: &[to],
        };
        assert_eq!(ack.to_text(), format!(r#"{{"type":"ack","ids":["{to}"]}}"#));
        let ack = ClientFrame::Ack {
            reference: Some("a-1"),
            ids: &[to],
        };
        assert_eq!(
            ack.to_text(),
            format!(r#"{{"type":"ack","ref":"a-1","ids":["{to}"]}}"#)
        );
    }

    #[test]
    fn writes_and_reads_the_shared_form() {
        let to = Uuid::nil();
        let recipients = [SharedRecipient {
            to,
            keys: vec![DeviceKey {
                device_id: 1,
                key: "a2V5".into(),
            }],
        }];
        let frame = ClientFrame::SendMulti {
            reference: "s-7",
            shared: "c2hhcmVk",
            recipients: &recipients,
            ephemeral: false,
            client_id: Some("k-7"),
            urgent: true,
        };
        assert_eq!(
            serde_json::to_value(&frame).unwrap(),
            serde_json::json!({"type":"send_multi","ref":"s-7","shared":"c2hhcmVk",
                "recipients":[{"to":to,"keys":[{"device_id":1,"key":"a2V5"}]}],"client_id":"k-7"})
        );
        let rest = MultiRequest {
            shared: "c2hhcmVk",
            recipients: &recipients,
            client_id: None,
            urgent: false,
        };
        assert_eq!(
            serde_json::to_value(&rest).unwrap(),
            serde_json::json!({"shared":"c2hhcmVk","recipients":[{"to":to,"keys":[{"device_id":1,"key":"a2V5"}]}],"urgent":false})
        );
        // A shared copy carries its key; an ordinary one none.
        let frame: ServerFrame = serde_json::from_str(
            r#"{"type":"message","id":"01a20ab1-4c10-7620-acf5-5f026d55cbc5","from":"0c9e2d7a-3b51-4e8f-a1c4-9d6f0b2e7a35","from_device":1,"body":"c2hhcmVkIGNpcGhlcnRleHQ=","key":"a2V5IDE=","sent_at":"2026-11-23T23:15:21.232Z"}"#,
        )
        .unwrap();
        assert!(matches!(frame, ServerFrame::Message(m) if m.key.as_deref() == Some("a2V5IDE=")));
        // `devices_changed` of a multi send names the accounts.
        let frame: ServerFrame = serde_json::from_str(
            r#"{"type":"error","ref":"s-7","code":"devices_changed","message":"m","recipients":[{"to":"5b0c52f4-9d4e-4a8e-9a56-3f0a2b7d1c11","missing":[3],"extra":[]}]}"#,
        )
        .unwrap();
        let ServerFrame::Error { error, .. } = frame else {
            panic!("not an error frame");
        };
        match error.into_error(None) {
            crate::Error::DevicesChanged { recipients, .. } => assert_eq!(
                recipients,
                ["5b0c52f4-9d4e-4a8e-9a56-3f0a2b7d1c11"
                    .parse::<Uuid>()
                    .unwrap()]
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_send_says_urgent_only_when_it_is_not() {
        let to = Uuid::nil();
        let quiet = ClientFrame::Send {
            reference: "s-3",
            to,
            envelopes: &[],
            ephemeral: false,
            client_id: Some("k-3"),
            urgent: false,
        };
        assert_eq!(
            serde_json::to_value(&quiet).unwrap(),
            serde_json::json!({"type":"send","ref":"s-3","to":to,"envelopes":[],"client_id":"k-3","urgent":false})
        );
        let rest = SendRequest {
            to,
            envelopes: &[],
            client_id: None,
            urgent: false,
        };
        assert_eq!(
            serde_json::to_value(&rest).unwrap(),
            serde_json::json!({"to":to,"envelopes":[],"urgent":false})
        );
        let loud = SendRequest {
            urgent: true,
            ..rest
        };
        assert_eq!(
            serde_json::to_value(&loud).unwrap(),
            serde_json::json!({"to":to,"envelopes":[]})
        );
    }

    #[test]
    fn push_targets_are_written_as_the_protocol_says() {
        let web = PushTarget::web_push("https://push.example/abc", "BP-key", "auth-secret");
        assert_eq!(
            serde_json::to_value(&web).unwrap(),
            serde_json::json!({"kind":"webpush","endpoint":"https://push.example/abc","keys":{"p256dh":"BP-key","auth":"auth-secret"}})
        );
        assert_eq!(
            serde_json::to_value(PushTarget::apns("0a1b", "com.example.app")).unwrap(),
            serde_json::json!({"kind":"apns","token":"0a1b","topic":"com.example.app","environment":"production"})
        );
        assert_eq!(
            serde_json::to_value(PushTarget::apns_sandbox("0a1b", "com.example.app")).unwrap()["environment"],
            "sandbox"
        );
        assert_eq!(
            serde_json::to_value(PushTarget::fcm("tok:en")).unwrap(),
            serde_json::json!({"kind":"fcm","token":"tok:en"})
        );
        // Capabilities never reach a log.
        let shown = format!("{web:?} {:?}", PushTarget::fcm("secret-token"));
        assert!(
            !shown.contains("push.example") && !shown.contains("secret-token"),
            "{shown}"
        );
        assert_eq!(shown, "PushTarget(WebPush) PushTarget(Fcm)");
    }

    #[test]
    fn reads_push_fields_and_does_without_them() {
        let listed: OwnDevices = serde_json::from_str(
            r#"{"devices":[
                {"device_id":1,"name":null,"public_key":"k","created_at":"2026-11-24T09:12:17.452Z","last_seen_at":null,"current":true,
                 "push":{"kind":"webpush","updated_at":"2026-11-24T09:12:18.001Z"}},
                {"device_id":2,"name":"x","public_key":"k","created_at":"2026-11-24T09:12:17.452Z","last_seen_at":null,"current":false,"push":null},
                {"device_id":3,"name":"x","public_key":"k","created_at":"2026-11-24T09:12:17.452Z","last_seen_at":null,"current":false,
                 "push":{"kind":"pigeon","updated_at":"2026-11-24T09:12:18Z"}},
                {"device_id":4,"name":"old","public_key":"k","created_at":"2026-11-24T09:12:17.452Z","last_seen_at":null,"current":false}
            ]}"#,
        )
        .unwrap();
        let push: Vec<Option<PushKind>> = listed
            .devices
            .iter()
            .map(|d| d.push.as_ref().map(|p| p.kind))
            .collect();
        assert_eq!(
            push,
            [Some(PushKind::WebPush), None, Some(PushKind::Other), None]
        );
        let ready = |extra: &str| {
            serde_json::from_str::<ServerFrame>(&format!(
                r#"{{"type":"ready","user_id":"8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13","device_id":1,"expires_at":"2026-11-24T09:42:17Z"{extra}}}"#
            ))
            .unwrap()
        };
        assert!(matches!(
            ready(r#","push_dropped":true"#),
            ServerFrame::Ready {
                push_dropped: true,
                ..
            }
        ));
        assert!(matches!(
            ready(""),
            ServerFrame::Ready {
                push_dropped: false,
                ..
            }
        ));
        let vapid: Vapid = serde_json::from_str(r#"{"public_key":"BPk"}"#).unwrap();
        assert_eq!(vapid.public_key, "BPk");
    }
}
