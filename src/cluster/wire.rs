//! What nodes send each other over the broker: JSON, one object per NATS
//! message, tagged by `type`.
//!
//! JSON rather than a compact binary format for the rolling upgrade: a node
//! ignores fields it does not know, so a newer node may add some while older
//! ones still run. A message a node cannot read at all (a type it does not
//! know) is counted, logged and dropped: the store still has what matters.
//! Bodies are the clients' sealed envelopes, in base64; run NATS over TLS
//! (`tls://`, `SEALPOST_NATS_TLS_CA`) where the network is not private, as
//! the metadata beside them (who sends to whom) is in the clear.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use super::{Announce, Notice};
use crate::devices::{ChangeReason, DevicesChange};
use crate::hub::Receipt;
use crate::store::{DeviceId, Message};

/// One message for one account: its copies for the devices a node may
/// hold. Stored messages carry the copies that were written (an ack in the
/// same batch may have settled some).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Push {
    pub recipient: Uuid,
    pub id: Uuid,
    pub sender: Uuid,
    pub sender_device: DeviceId,
    /// When the sending node accepted it (its clock): the start of the
    /// cross-node push latency.
    #[serde(with = "micros")]
    pub accepted: SystemTime,
    #[serde(default)]
    pub ephemeral: bool,
    /// A multi-recipient send's shared body, once for all its copies here
    /// (each of which then has a `key` and an empty `body`).
    #[serde(
        default,
        with = "base64_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub shared: Option<Vec<u8>>,
    pub copies: Vec<Copy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Copy {
    pub device: DeviceId,
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    /// A shared-body copy's key material.
    #[serde(
        default,
        with = "base64_option",
        skip_serializing_if = "Option::is_none"
    )]
    pub key: Option<Vec<u8>>,
}

impl Push {
    /// The copies of one message for one recipient (the committer hands
    /// its listeners each recipient's copies on their own). A shared body
    /// crosses once.
    pub fn of(copies: &[Arc<Message>], accepted: SystemTime, ephemeral: bool) -> Option<Self> {
        let first = copies.first()?;
        Some(Self {
            recipient: first.recipient,
            id: first.id,
            sender: first.sender,
            sender_device: first.sender_device,
            accepted,
            ephemeral,
            shared: first.shared().then(|| first.body.to_vec()),
            copies: copies
                .iter()
                .map(|m| Copy {
                    device: m.device,
                    body: if m.shared() {
                        Vec::new()
                    } else {
                        m.body.to_vec()
                    },
                    key: m.key.as_ref().map(|k| k.to_vec()),
                })
                .collect(),
        })
    }

    /// The bytes of bodies and keys it carries, shared bodies once.
    pub fn bytes(&self) -> usize {
        self.shared.as_ref().map_or(0, Vec::len)
            + self
                .copies
                .iter()
                .map(|c| c.body.len() + c.key.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}

/// Everything that crosses the broker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Wire {
    /// On the recipient's subject.
    Push(Push),
    /// On the sender's subject.
    Receipt {
        id: Uuid,
        to: Uuid,
        device: DeviceId,
    },
    Devices {
        devices: Vec<DeviceId>,
        /// The device the change is about; absent from a node of before
        /// it was carried.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<DeviceId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<ChangeReason>,
    },
    Displace {
        device: DeviceId,
    },
    /// A message too large for NATS (its `max_payload`) was committed at
    /// `since`: read this account's backlogs from there.
    Wake {
        #[serde(with = "micros")]
        since: SystemTime,
    },
    /// On the cluster subject.
    Directory {
        user: Uuid,
        #[serde(default)]
        removed: Option<DeviceId>,
        #[serde(default)]
        deleted: bool,
    },
    Revoked {
        user: Uuid,
        sessions: Vec<Uuid>,
        #[serde(default)]
        device: Option<DeviceId>,
    },
    Reread {
        node: String,
        #[serde(with = "micros")]
        since: SystemTime,
    },
    /// An account's push targets changed. Older nodes drop it (a type they
    /// do not know): they have no targets to forget.
    PushTargets {
        user: Uuid,
    },
}

impl Wire {
    pub(super) fn notice(notice: Notice) -> Self {
        match notice {
            Notice::Receipt(r) => Wire::Receipt {
                id: r.id,
                to: r.to,
                device: r.device,
            },
            Notice::Devices(change) => Wire::Devices {
                devices: change.devices.to_vec(),
                device: change.about.map(|(device, _)| device),
                reason: change.about.map(|(_, reason)| reason),
            },
            Notice::Displace(device) => Wire::Displace { device },
        }
    }

    pub(super) fn announce(event: Announce, node: &str) -> Self {
        match event {
            Announce::Directory {
                user,
                removed,
                deleted,
            } => Wire::Directory {
                user,
                removed,
                deleted,
            },
            Announce::Revoked {
                user,
                sessions,
                device,
            } => Wire::Revoked {
                user,
                sessions,
                device,
            },
            Announce::Reread { since } => Wire::Reread {
                node: node.to_owned(),
                since,
            },
            Announce::PushTargets { user } => Wire::PushTargets { user },
        }
    }

    pub(super) fn encode(&self) -> bytes::Bytes {
        // Serializing these types cannot fail: no maps with non-string keys.
        serde_json::to_vec(self).unwrap_or_default().into()
    }

    pub(super) fn decode(payload: &[u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(payload)
    }
}

/// What arrives on an account's subject, for [`super::Node`].
pub(super) enum ForUser {
    Push(Push),
    Notice(Notice),
    Wake(SystemTime),
}

impl Wire {
    /// Sorts what arrived: for an account's sockets, or for the node.
    pub(super) fn sort(self) -> Result<ForUser, Announce> {
        Ok(match self {
            Wire::Push(push) => ForUser::Push(push),
            Wire::Receipt { id, to, device } => {
                ForUser::Notice(Notice::Receipt(Receipt { id, to, device }))
            }
            Wire::Devices {
                devices,
                device,
                reason,
            } => ForUser::Notice(Notice::Devices(DevicesChange {
                devices: devices.into(),
                about: device.zip(reason),
            })),
            Wire::Displace { device } => ForUser::Notice(Notice::Displace(device)),
            Wire::Wake { since } => ForUser::Wake(since),
            Wire::Directory {
                user,
                removed,
                deleted,
            } => {
                return Err(Announce::Directory {
                    user,
                    removed,
                    deleted,
                });
            }
            Wire::Revoked {
                user,
                sessions,
                device,
            } => {
                return Err(Announce::Revoked {
                    user,
                    sessions,
                    device,
                });
            }
            Wire::Reread { since, .. } => return Err(Announce::Reread { since }),
            Wire::PushTargets { user } => return Err(Announce::PushTargets { user }),
        })
    }
}

mod micros {
    use super::*;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let micros = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros();
        s.serialize_u64(u64::try_from(micros).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let micros = u64::deserialize(d)?;
        Ok(UNIX_EPOCH + Duration::from_micros(micros))
    }
}

mod base64_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

mod base64_option {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => super::base64_bytes::serialize(bytes, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        text.map(|text| {
            STANDARD
                .decode(text.as_bytes())
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_survives_the_trip_and_unknown_fields_are_ignored() {
        let push = Push {
            recipient: Uuid::new_v4(),
            id: Uuid::now_v7(),
            sender: Uuid::new_v4(),
            sender_device: 3,
            accepted: UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456),
            ephemeral: false,
            shared: None,
            copies: vec![Copy {
                device: 2,
                body: vec![0, 255, 7],
                key: None,
            }],
        };
        let encoded = Wire::Push(push.clone()).encode();
        let mut value: serde_json::Value = serde_json::from_slice(&encoded).unwrap();
        // A newer node's extra field.
        value["trace"] = serde_json::json!("abc");
        let decoded = Wire::decode(&serde_json::to_vec(&value).unwrap()).unwrap();
        let Ok(ForUser::Push(back)) = decoded.sort() else {
            panic!("expected a push");
        };
        assert_eq!(
            (back.id, back.recipient, back.sender),
            (push.id, push.recipient, push.sender)
        );
        assert_eq!(back.accepted, push.accepted);
        assert_eq!(back.copies[0].body, vec![0, 255, 7]);
        assert!(Wire::decode(br#"{"type":"from_the_future"}"#).is_err());
    }

    #[test]
    fn a_push_target_change_crosses_as_an_announcement() {
        let user = Uuid::new_v4();
        let encoded = Wire::announce(Announce::PushTargets { user }, "node-a").encode();
        let value: serde_json::Value = serde_json::from_slice(&encoded).unwrap();
        assert_eq!(value["type"], "push_targets", "{value}");
        match Wire::decode(&encoded).unwrap().sort() {
            Err(Announce::PushTargets { user: back }) => assert_eq!(back, user),
            _ => panic!("expected a push targets announcement"),
        }
    }

    #[test]
    fn a_device_change_says_which_device_and_why_and_an_old_one_still_reads() {
        let change = DevicesChange {
            devices: vec![1, 3].into(),
            about: Some((3, ChangeReason::Login)),
        };
        let encoded = Wire::notice(Notice::Devices(change)).encode();
        let value: serde_json::Value = serde_json::from_slice(&encoded).unwrap();
        assert_eq!(value["device"], 3, "{value}");
        assert_eq!(value["reason"], "login", "{value}");
        let Ok(ForUser::Notice(Notice::Devices(back))) = Wire::decode(&encoded).unwrap().sort()
        else {
            panic!("expected a devices notice");
        };
        assert_eq!(*back.devices, [1, 3]);
        assert_eq!(back.about, Some((3, ChangeReason::Login)));
        // From a node of before: the list alone.
        let old = br#"{"type":"devices","devices":[1,2]}"#;
        let Ok(ForUser::Notice(Notice::Devices(back))) = Wire::decode(old).unwrap().sort() else {
            panic!("expected a devices notice");
        };
        assert_eq!((&*back.devices, back.about), (&[1, 2][..], None));
    }
}
