//! The wire types REST and WebSocket both speak: ids, timestamps, the
//! message as a recipient sees it, and the envelopes of a send. Both
//! protocols depend on this module; neither depends on the other.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use utoipa::ToSchema;

use crate::error::Error;
use crate::store::{DeviceId, Message};

/// Serialises a timestamp as RFC 3339 in UTC with exactly three fraction
/// digits, as `protocol.md` promises (chrono's default drops the fraction on
/// whole seconds).
pub fn timestamp<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Parses an id field, naming the field on failure.
pub fn parse_id(field: &'static str, value: &str) -> Result<Uuid, Error> {
    Uuid::parse_str(value).map_err(|_| Error::field(field, "must be a UUID"))
}

/// A queued message as clients see it: in a `message` frame and in a
/// listing.
#[derive(Serialize, ToSchema)]
pub struct MessageView {
    pub id: Uuid,
    pub from: Uuid,
    /// The sender's device, whose key sealed the body.
    pub from_device: DeviceId,
    /// This device's envelope, or a multi-recipient send's shared body.
    pub body: String,
    /// With a shared body: this device's key material for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = Byte)]
    pub key: Option<String>,
    #[serde(serialize_with = "timestamp")]
    pub sent_at: DateTime<Utc>,
}

impl From<&Message> for MessageView {
    fn from(m: &Message) -> Self {
        Self {
            id: m.id,
            from: m.sender,
            from_device: m.sender_device,
            body: STANDARD.encode(&m.body),
            key: m.key.as_ref().map(|key| STANDARD.encode(key)),
            sent_at: m.sent_at,
        }
    }
}

/// One envelope of a send: the body for one device of the recipient.
#[derive(Debug, Deserialize, ToSchema)]
pub struct Envelope {
    #[schema(minimum = 1)]
    pub device_id: DeviceId,
    #[schema(format = Byte, min_length = 4)]
    pub body: String,
}

/// One device's key material for a multi-recipient send's shared body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct KeyEnvelope {
    #[schema(minimum = 1)]
    pub device_id: DeviceId,
    #[schema(format = Byte, min_length = 4)]
    pub key: String,
}

/// One recipient account of a multi-recipient send: envelopes for each of
/// its devices, or (with a shared body) key material for each.
#[derive(Debug, Deserialize, ToSchema)]
pub struct MultiRecipient {
    #[schema(format = Uuid)]
    pub to: String,
    pub envelopes: Option<Vec<Envelope>>,
    pub keys: Option<Vec<KeyEnvelope>>,
}

/// A multi-recipient send (`POST /v1/messages/multi`, and the `send_multi`
/// frame around it).
#[derive(Debug, Deserialize, ToSchema)]
pub struct MultiSend {
    /// The shared body, with `keys` in every recipient entry.
    #[schema(format = Byte, min_length = 4)]
    pub shared: Option<String>,
    pub recipients: Vec<MultiRecipient>,
    /// The client's key for this send: a retry under the same key is
    /// answered with the first answer instead of storing the message again.
    #[schema(min_length = 1, max_length = 64)]
    pub client_id: Option<String>,
    /// Whether offline recipient devices are woken at once, at high
    /// priority (true), or at low priority.
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub urgent: bool,
    /// Whether each recipient device's ack sends the sender a receipt.
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub receipts: bool,
}

fn yes() -> bool {
    true
}

/// The envelopes of a send as the delivery core decodes them.
pub fn envelopes(
    list: Option<&[Envelope]>,
) -> Option<impl ExactSizeIterator<Item = (DeviceId, &str)>> {
    list.map(|list| list.iter().map(|e| (e.device_id, e.body.as_str())))
}
