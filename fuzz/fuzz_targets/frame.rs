//! WebSocket frame decoding: `sealpost::ws::frame::parse` and the nesting
//! scan in front of it, on arbitrary input.
//!
//! Beyond "does not panic", it checks what the decoder promises: a ref is
//! echoed only if the frame carried it and it is short enough, a decoded
//! frame agrees with its JSON, an error is always `invalid`, and the nesting
//! scan finds exactly the depth serde_json finds on any valid JSON.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sealpost::nesting;
use sealpost::ws::frame::{ClientFrame, MAX_REF_BYTES, parse};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // The scan runs on raw bytes (request bodies need not be UTF-8).
    let _ = nesting::check(data, 32);
    // Text frames are UTF-8: tungstenite refuses anything else before us.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let value: Option<Value> = serde_json::from_str(text).ok();
    if let Some(value) = &value {
        let depth = depth(value);
        assert!(
            nesting::check(data, depth).is_ok(),
            "scan deeper than {depth}"
        );
        if depth > 0 {
            assert!(
                nesting::check(data, depth - 1).is_err(),
                "scan shallower than {depth}"
            );
        }
    }
    let claimed_ref = value
        .as_ref()
        .and_then(|v| v.get("ref"))
        .and_then(Value::as_str);
    for max_depth in [1, 2, 32, 127] {
        let inbound = parse(text, max_depth);
        if let Some(reference) = &inbound.reference {
            assert!(reference.len() <= MAX_REF_BYTES);
            assert_eq!(Some(reference.as_str()), claimed_ref);
        }
        match inbound.frame {
            Err(err) => assert_eq!(err.code(), "invalid"),
            Ok(frame) => {
                let value = value.as_ref().expect("decoded a frame that is not JSON");
                assert_eq!(inbound.reference.as_deref(), claimed_ref);
                let kind = match frame {
                    ClientFrame::Auth { token } => {
                        assert_eq!(value["token"], token.as_str());
                        "auth"
                    }
                    ClientFrame::Send { to, body, .. } => {
                        assert_eq!(value["to"], to.as_str());
                        assert_eq!(value["body"], body.as_str());
                        "send"
                    }
                    ClientFrame::Ack { ids } => {
                        assert_eq!(value["ids"].as_array().map(Vec::len), Some(ids.len()));
                        "ack"
                    }
                };
                assert_eq!(value["type"], kind);
            }
        }
    }
});

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
