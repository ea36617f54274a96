//! The frames of the WebSocket protocol: JSON text frames with a `type`,
//! and the close codes.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tungstenite::Message as WsMessage;
use uuid::Uuid;

use crate::devices::{ChangeReason, DevicesChange};
use crate::error::{Error, ErrorDetail};
use crate::hub::Receipt;
use crate::store::{DeviceId, Message};
use crate::wire::{Envelope, MessageView, MultiSend};

/// Close codes, beside RFC 6455's.
pub mod close {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame that breaks RFC 6455 (an unmasked client frame, a reserved
    /// opcode or bit, a continuation with nothing to continue...).
    pub const PROTOCOL: u16 = 1002;
    /// A text message that is not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Too many malformed frames, or a message not finished in time.
    pub const POLICY: u16 = 1008;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server failed; reconnect.
    pub const INTERNAL: u16 = 1011;
    /// The connection fell behind: its outbound queue overflowed, or it
    /// did not write a backlog page in time; reconnect (the messages are
    /// queued).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// Missing, invalid or expired credentials, a revoked session or a
    /// removed device.
    pub const UNAUTHORIZED: u16 = 4401;
    /// A newer exclusive socket of the same device took over
    /// (`GET /v1/ws?exclusive=true`).
    pub const CONNECTED_ELSEWHERE: u16 = 4409;
    /// The device holds as many sockets as it may
    /// (`SEALPOST_MAX_CONNECTIONS_PER_USER`, counted per device): close one
    /// before opening another.
    pub const TOO_MANY_CONNECTIONS: u16 = 4429;
}

/// The longest `ref` echoed back: refs are for matching replies, not for
/// storing data in the server's answers.
pub const MAX_REF_BYTES: usize = 128;

/// A frame from the client.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Auth {
        token: String,
    },
    Send {
        to: String,
        /// One body for every device of the recipient...
        body: Option<String>,
        /// ...or one envelope per device.
        envelopes: Option<Vec<Envelope>>,
        #[serde(default)]
        ephemeral: bool,
        /// The client's key for the send, making a retry safe.
        client_id: Option<String>,
        /// Whether an offline recipient device is woken at once (the
        /// default), or at low priority and at most once per quiet
        /// interval.
        #[serde(default = "urgent_by_default")]
        urgent: bool,
    },
    /// One message to several accounts: the fields of
    /// `POST /v1/messages/multi`, and `ephemeral`.
    SendMulti(Box<MultiFrame>),
    /// With a `ref`, answered by `acked` once durable.
    Ack {
        ids: Vec<String>,
    },
}

/// A `send_multi` frame's fields.
#[derive(Debug, Deserialize)]
pub struct MultiFrame {
    #[serde(flatten)]
    pub send: MultiSend,
    #[serde(default)]
    pub ephemeral: bool,
}

fn urgent_by_default() -> bool {
    true
}

/// A parsed client frame with the `ref` it carried, if any. The ref is
/// taken even from a frame that fails to parse, so that its error can name
/// it.
pub struct Inbound {
    pub reference: Option<String>,
    pub frame: Result<ClientFrame, Error>,
}

/// Parses a text frame. Nesting deeper than `max_depth` is refused before
/// the JSON is parsed (see [`crate::nesting`]); such a frame has no ref.
pub fn parse(text: &str, max_depth: usize) -> Inbound {
    if let Err(too_deep) = crate::nesting::check(text.as_bytes(), max_depth) {
        return Inbound {
            reference: None,
            frame: Err(too_deep.into()),
        };
    }
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(_) => {
            return Inbound {
                reference: None,
                frame: Err(Error::malformed("frame is not valid JSON")),
            };
        }
    };
    let reference = value.get("ref").and_then(Value::as_str).map(str::to_owned);
    let frame = match &reference {
        Some(r) if r.len() > MAX_REF_BYTES => Err(Error::field(
            "ref",
            format!("must be at most {MAX_REF_BYTES} bytes"),
        )),
        _ => ClientFrame::deserialize(value).map_err(|e| Error::malformed(e.to_string())),
    };
    Inbound {
        reference: reference.filter(|r| r.len() <= MAX_REF_BYTES),
        frame,
    }
}

/// A frame from the server. Not `Debug`: it can carry a message body, and
/// bodies never reach a log.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Authenticated; the queued backlog follows.
    Ready {
        user_id: Uuid,
        device_id: DeviceId,
        #[serde(serialize_with = "crate::wire::timestamp")]
        expires_at: DateTime<Utc>,
        /// The account's device numbers, ascending: a client compares them
        /// with the list it last saw, to notice a device added while it
        /// was offline.
        devices: Arc<[DeviceId]>,
        /// This device's push target was dropped by its push service (the
        /// subscription expired, the app was uninstalled and reinstalled):
        /// it is woken no more until it registers a target again. Absent
        /// otherwise.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        push_dropped: bool,
    },
    /// The backlog has been sent; what follows is live.
    Drained,
    Message {
        #[serde(flatten)]
        message: MessageView,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        ephemeral: bool,
    },
    Sent {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        id: Uuid,
        #[serde(serialize_with = "crate::wire::timestamp")]
        sent_at: DateTime<Utc>,
        /// For ephemeral sends only: whether a connection took it.
        #[serde(skip_serializing_if = "Option::is_none")]
        delivered: Option<bool>,
    },
    Authed {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(serialize_with = "crate::wire::timestamp")]
        expires_at: DateTime<Utc>,
    },
    /// The ack with this `ref` is durable: these ids, as the frame gave
    /// them, in its order, without repeats (unknown ones included: they
    /// are ignored, as ever).
    Acked {
        #[serde(rename = "ref")]
        reference: String,
        ids: Vec<String>,
    },
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// `code`, `message`, and `field`, `missing` and `extra` where they
        /// apply: the `error` object of a REST reply.
        #[serde(flatten)]
        detail: ErrorDetail,
        /// With the "not now" codes (`rate_limited`, `queue_full`,
        /// `unavailable`): how long to wait, what REST says in
        /// `Retry-After`, to the millisecond.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// A device of the recipient acknowledged a message this account sent.
    Receipt {
        id: Uuid,
        to: Uuid,
        device_id: DeviceId,
    },
    /// One of the account's other devices was added, removed, signed in
    /// to or given a new key: these are its device numbers now.
    DevicesChanged {
        devices: Arc<[DeviceId]>,
        /// The device it is about (absent only when a node of before sent
        /// it, in a cluster being upgraded).
        #[serde(skip_serializing_if = "Option::is_none")]
        device_id: Option<DeviceId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<ChangeReason>,
    },
}

impl ServerFrame {
    pub fn error(reference: Option<String>, error: &Error) -> Self {
        if let Error::Internal(cause) = error {
            tracing::error!(error = format!("{cause:#}"), "internal error on a socket");
        }
        ServerFrame::Error {
            reference,
            detail: error.detail(),
            // Rounded up, as `Retry-After` is: a client that waits as told
            // is not refused again for a fraction of a millisecond.
            retry_after_ms: error
                .retry_after()
                .map(|wait| u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)),
        }
    }

    pub fn devices_changed(change: DevicesChange) -> Self {
        ServerFrame::DevicesChanged {
            devices: change.devices,
            device_id: change.about.map(|(device, _)| device),
            reason: change.about.map(|(_, reason)| reason),
        }
    }

    pub fn receipt(receipt: &Receipt) -> Self {
        ServerFrame::Receipt {
            id: receipt.id,
            to: receipt.to,
            device_id: receipt.device,
        }
    }

    pub fn message(message: &Message, ephemeral: bool) -> Self {
        ServerFrame::Message {
            message: MessageView::from(message),
            ephemeral,
        }
    }

    pub fn to_ws(&self) -> WsMessage {
        // Serialising these types cannot fail: no maps with non-string keys.
        let text = serde_json::to_string(self).unwrap_or_default();
        WsMessage::Text(text.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_frames_and_keeps_the_ref() {
        let inbound = parse(r#"{"type":"send","ref":"r1","to":"x","body":"aGk="}"#, 32);
        assert_eq!(inbound.reference.as_deref(), Some("r1"));
        assert!(matches!(
            inbound.frame,
            Ok(ClientFrame::Send {
                ephemeral: false,
                ..
            })
        ));

        let inbound = parse(r#"{"type":"launch","ref":"r2"}"#, 32);
        assert_eq!(inbound.reference.as_deref(), Some("r2"));
        assert_eq!(inbound.frame.unwrap_err().code(), "invalid");

        for bad in [
            "",
            "{",
            "[]",
            "42",
            r#"{"ref":"x"}"#,
            r#"{"type":"ack","ids":"no"}"#,
        ] {
            assert!(parse(bad, 32).frame.is_err(), "{bad}");
        }
        let long = format!(r#"{{"type":"ack","ids":[],"ref":"{}"}}"#, "r".repeat(200));
        let inbound = parse(&long, 32);
        assert!(inbound.reference.is_none() && inbound.frame.is_err());
    }

    #[test]
    fn deep_frames_are_refused_before_parsing() {
        let at_limit = r#"{"type":"ack","ids":[],"ref":"r","x":[[]]}"#;
        assert!(parse(at_limit, 3).frame.is_ok());
        let inbound = parse(at_limit, 2);
        let err = inbound.frame.unwrap_err();
        assert_eq!(err.code(), "invalid");
        assert!(err.to_string().contains("2 levels"), "{err}");
        assert!(inbound.reference.is_none());
        // Brackets inside the ref are text, not depth.
        let inbound = parse(r#"{"type":"ack","ids":[],"ref":"[[[[[["}"#, 2);
        assert_eq!(inbound.reference.as_deref(), Some("[[[[[["));
        assert!(inbound.frame.is_ok());
    }

    #[test]
    fn server_frames_serialise_flat() {
        let frame = ServerFrame::Sent {
            reference: Some("a".into()),
            id: Uuid::nil(),
            sent_at: DateTime::UNIX_EPOCH,
            delivered: None,
        };
        let json: Value = serde_json::to_value(&frame).unwrap();
        assert_eq!(json["type"], "sent");
        assert_eq!(json["ref"], "a");
        // Whole seconds still carry milliseconds.
        assert_eq!(json["sent_at"], "1970-01-01T00:00:00.000Z");
        assert!(json.get("delivered").is_none());
        let drained = serde_json::to_value(ServerFrame::Drained).unwrap();
        assert_eq!(drained, serde_json::json!({ "type": "drained" }));
    }

    #[test]
    fn a_rate_limit_says_how_long_to_wait_in_ms() {
        let limited = Error::RateLimited {
            retry_after: std::time::Duration::from_millis(1250),
        };
        let json = serde_json::to_value(ServerFrame::error(Some("r".into()), &limited)).unwrap();
        assert_eq!(json["code"], "rate_limited");
        assert_eq!(json["retry_after_ms"], 1250);
        let full = serde_json::to_value(ServerFrame::error(None, &Error::QueueFull)).unwrap();
        assert_eq!(full["retry_after_ms"], 10_000);
        let invalid = Error::field("to", "must be a UUID");
        let json = serde_json::to_value(ServerFrame::error(None, &invalid)).unwrap();
        assert!(json.get("retry_after_ms").is_none(), "{json}");
    }
}
