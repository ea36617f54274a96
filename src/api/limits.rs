//! `GET /v1/limits`: the limits a client must respect, as this server is
//! configured, so that it can refuse what the server would refuse before
//! it seals it (a body over the limit, a device too many) instead of
//! learning them from a `413` or a `409`. No authentication: they are the
//! same for everyone, and a client wants them before it signs up.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::config::Config;
use crate::delivery::MAX_PAGE;
use crate::state::AppState;
use crate::ws::frame::MAX_REF_BYTES;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/limits", get(limits))
}

/// The limits of this server's configuration, as a client checks a
/// message against them before it seals it.
#[derive(Serialize, ToSchema)]
struct Limits {
    /// The largest message body, in bytes after base64 decoding, for each
    /// envelope (`SEALPOST_MAX_BODY_BYTES`).
    max_body_bytes: u32,
    /// The most devices an account may hold (`SEALPOST_MAX_DEVICES_PER_USER`).
    max_devices_per_user: u32,
    /// The largest request body of a single send, in bytes.
    max_request_body_bytes: u64,
    /// The largest request body of a multi-recipient send, and WebSocket
    /// frame, in bytes.
    max_multi_request_body_bytes: u64,
    /// The most recipient accounts of a multi-recipient send
    /// (`SEALPOST_MAX_RECIPIENTS_PER_SEND`).
    max_recipients_per_send: u32,
    /// The most recipient devices of a multi-recipient send
    /// (`SEALPOST_MAX_DEVICES_PER_SEND`).
    max_devices_per_send: u32,
    /// The largest key material per device of a shared-body send, decoded
    /// (`SEALPOST_MAX_KEY_BYTES`).
    max_key_bytes: u32,
    /// The most ids one ack may carry.
    max_ids_per_ack: u32,
    /// The most messages one page of `GET /v1/messages` carries.
    max_messages_per_page: u32,
    /// The longest WebSocket `ref`, in bytes.
    max_ref_bytes: u32,
    /// An access token's lifetime (`SEALPOST_ACCESS_TOKEN_TTL`).
    access_token_ttl_seconds: u64,
    /// How long an unacknowledged message is kept (`SEALPOST_MESSAGE_TTL`).
    message_ttl_seconds: u64,
}

impl Limits {
    fn of(config: &Config) -> Self {
        Self {
            max_body_bytes: config.max_body_bytes,
            max_devices_per_user: config.max_devices_per_user,
            max_request_body_bytes: config.max_request_bytes() as u64,
            max_multi_request_body_bytes: config.max_multi_request_bytes() as u64,
            max_recipients_per_send: config.max_recipients_per_send,
            max_devices_per_send: config.max_devices_per_send,
            max_key_bytes: config.max_key_bytes,
            max_ids_per_ack: MAX_PAGE,
            max_messages_per_page: MAX_PAGE,
            max_ref_bytes: MAX_REF_BYTES as u32,
            access_token_ttl_seconds: config.access_token_ttl.as_secs(),
            message_ttl_seconds: config.message_ttl.as_secs(),
        }
    }
}

/// The limits of this server's configuration.
#[utoipa::path(get, path = "/v1/limits", tag = "limits",
    responses((status = 200, description = "The limits this server enforces.", body = Limits)))]
async fn limits(State(state): State<AppState>) -> Json<Limits> {
    Json(Limits::of(&state.config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults, as protocol.md quotes them.
    #[test]
    fn the_defaults_are_the_documented_ones() {
        let config = Config::parse_from(Vec::<String>::new()).unwrap();
        let json = serde_json::to_value(Limits::of(&config)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "max_body_bytes": 65536, "max_devices_per_user": 10,
                "max_request_body_bytes": 878576, "max_ids_per_ack": 500,
                "max_multi_request_body_bytes": 2291480, "max_recipients_per_send": 1000,
                "max_devices_per_send": 5000, "max_key_bytes": 256,
                "max_messages_per_page": 500, "max_ref_bytes": 128,
                "access_token_ttl_seconds": 1800, "message_ttl_seconds": 604800
            })
        );
    }
}
