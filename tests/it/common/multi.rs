//! The multi-recipient send (`POST /v1/messages/multi` and the `send_multi`
//! frame, issue 27): its requests in either form, and what a copy of one
//! looks like to a recipient device.
//!
//! A recipient is `(user id, [(device id, bytes)])`: the bytes are that
//! device's `key` in the shared form, its `body` in the envelopes form.

use serde_json::{Value, json};
use uuid::Uuid;

use super::{Account, Api, Reply, TestDb, assert_message, b64, unb64};

/// One recipient account and, for each device the send covers, its key or
/// envelope body.
pub type Recipient = (Uuid, Vec<(i64, Vec<u8>)>);

/// The shared form: one `shared` body, and a `key` per device.
pub fn shared(body: &[u8], recipients: &[Recipient]) -> Value {
    let recipients: Vec<Value> = recipients
        .iter()
        .map(|(to, devices)| {
            let keys: Vec<Value> = devices
                .iter()
                .map(|(device, key)| json!({ "device_id": device, "key": b64(key) }))
                .collect();
            json!({ "to": to, "keys": keys })
        })
        .collect();
    json!({ "shared": b64(body), "recipients": recipients })
}

/// The per-device form: an envelope `body` per device.
pub fn envelopes(recipients: &[Recipient]) -> Value {
    let recipients: Vec<Value> = recipients
        .iter()
        .map(|(to, devices)| {
            let envelopes: Vec<Value> = devices
                .iter()
                .map(|(device, body)| json!({ "device_id": device, "body": b64(body) }))
                .collect();
            json!({ "to": to, "envelopes": envelopes })
        })
        .collect();
    json!({ "recipients": recipients })
}

/// `request` with `field` set to `value` (`client_id`, `receipts`, ...).
pub fn with(mut request: Value, field: &str, value: Value) -> Value {
    request[field] = value;
    request
}

/// `request` as a `send_multi` frame with `ref`.
pub fn frame(reference: &str, request: &Value) -> Value {
    let mut frame = request.clone();
    frame["type"] = json!("send_multi");
    frame["ref"] = json!(reference);
    frame
}

/// `POST /v1/messages/multi` as `from`; the reply, whatever it is.
pub async fn send(api: &Api, from: &Account, request: &Value) -> Reply {
    api.post("/v1/messages/multi", Some(&from.access), request.clone())
        .await
}

/// Asserts that `message` (a `message` frame or an entry of `GET
/// /v1/messages`) is the copy of `message_id` from `from`'s device
/// `from_device` with `body`, carrying `key` in the shared form and no
/// `key` at all otherwise.
#[track_caller]
pub fn assert_copy(
    message: &Value,
    message_id: Uuid,
    from: Uuid,
    from_device: i64,
    body: &[u8],
    key: Option<&[u8]>,
) {
    assert_message(message, message_id, from, from_device, body);
    match key {
        Some(key) => {
            let got = message["key"]
                .as_str()
                .unwrap_or_else(|| panic!("a shared copy without its key: {message}"));
            assert_eq!(
                unb64(got),
                key,
                "{message}: key {:?}",
                String::from_utf8_lossy(&unb64(got))
            );
        }
        None => assert!(
            message.get("key").is_none(),
            "a copy of its own with a key: {message}"
        ),
    }
}

/// The rows of the queue (`messages`: one per device copy not yet
/// acknowledged) and of `shared_bodies` (one per shared body still
/// referenced), read behind the server's back: "stored once" is not
/// something the API shows.
pub async fn rows(db: &TestDb) -> (i64, i64) {
    (
        db.count("SELECT COUNT(*) FROM messages").await,
        db.count("SELECT COUNT(*) FROM shared_bodies").await,
    )
}
