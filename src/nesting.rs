//! The cap on JSON nesting depth, checked before any JSON is parsed.
//!
//! Every request body and WebSocket text frame is scanned once, byte by byte,
//! before serde sees it: each `[` or `{` outside a string opens a level. A
//! hostile body of ten thousand `[` is refused here, in one linear pass with
//! no allocation, instead of inside the parser, which recurses per level and
//! builds a value for each. Our protocol nests three levels deep at most
//! (`{"envelopes": [{...}]}`), so the default cap of
//! [`SEALPOST_MAX_JSON_DEPTH`](crate::config::Config::max_json_depth) leaves
//! clients plenty of room.
//!
//! The scan does not validate JSON; the parser does that afterwards. It only
//! has to count brackets that are not inside strings, so it tracks whether it
//! is in a string and whether the previous byte was a backslash. That is
//! sound on arbitrary bytes, even invalid UTF-8: `"`, `\`, brackets and
//! braces are ASCII, and UTF-8 never uses ASCII bytes inside a multibyte
//! character.

use crate::error::Error;

/// Fails when `json` nests arrays or objects more than `max` levels deep:
/// `[]` and `{}` are one level, `[[]]` and `{"a": {}}` two.
pub fn check(json: &[u8], max: usize) -> Result<(), TooDeep> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(TooDeep { max });
                }
            }
            // Unbalanced closers are the parser's to refuse; they must not
            // let a later run of openers go uncounted.
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// JSON nested deeper than the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    pub max: usize,
}

/// A request that cannot be parsed: 400 over REST, an `invalid` error frame
/// (and a strike) over a WebSocket.
impl From<TooDeep> for Error {
    fn from(err: TooDeep) -> Self {
        Error::malformed(format!("JSON is nested more than {} levels deep", err.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn exactly_at_the_limit_passes() {
        assert_eq!(check(nested(32).as_bytes(), 32), Ok(()));
        assert_eq!(check(nested(33).as_bytes(), 32), Err(TooDeep { max: 32 }));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(3), "}".repeat(3));
        assert_eq!(check(objects.as_bytes(), 3), Ok(()));
        assert!(check(objects.as_bytes(), 2).is_err());
        // Scalars and empty input have no depth.
        for flat in ["", "1", "\"x\"", "null", "   "] {
            assert_eq!(check(flat.as_bytes(), 0), Ok(()), "{flat}");
        }
        assert!(check(b"{}", 0).is_err());
    }

    #[test]
    fn brackets_in_strings_do_not_count() {
        let json = r#"{"a": "[[[[{{{{", "b": ["]]]]}}}}"]}"#;
        assert_eq!(check(json.as_bytes(), 2), Ok(()));
        assert!(check(json.as_bytes(), 1).is_err());
    }

    #[test]
    fn escapes_do_not_end_strings() {
        // An escaped quote keeps the string open, so its brackets are text.
        let json = r#"["\"[[[[", "\\"]"#;
        assert_eq!(check(json.as_bytes(), 1), Ok(()));
        // An escaped backslash does not escape the quote after it: the
        // string ends there and the brackets after it count.
        let json = r#"["\\", [[]]]"#;
        assert_eq!(check(json.as_bytes(), 3), Ok(()));
        assert!(check(json.as_bytes(), 2).is_err());
        // A \u escape is plain text to the scan.
        let json = r#"["\u005b\u005b", []]"#;
        assert_eq!(check(json.as_bytes(), 2), Ok(()));
    }

    #[test]
    fn unbalanced_closers_do_not_hide_openers() {
        let json = format!("{}{}", "]".repeat(100), "[".repeat(5));
        assert!(check(json.as_bytes(), 4).is_err());
    }

    #[test]
    fn invalid_utf8_is_scanned() {
        let json = b"[\xff\"\xc3[\", [\xfe]]";
        assert_eq!(check(json, 2), Ok(()));
        assert!(check(json, 1).is_err());
    }

    #[test]
    fn the_error_is_a_malformed_request() {
        let err = Error::from(TooDeep { max: 32 });
        assert_eq!(err.code(), "invalid");
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(err.to_string().contains("32 levels"), "{err}");
    }

    /// serde_json's own recursion limit: the deepest nesting it parses.
    /// The configurable cap may not exceed it (see `Config::max_json_depth`).
    #[test]
    fn serde_json_parses_the_largest_cap() {
        let max = crate::config::MAX_JSON_DEPTH as usize;
        assert!(serde_json::from_str::<Value>(&nested(max)).is_ok());
        assert!(serde_json::from_str::<Value>(&nested(max + 1)).is_err());
    }

    /// The depth of a parsed value, the way [`check`] counts it.
    fn depth(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        // Strings drawn from the characters that could fool the scan.
        let text = proptest::string::string_regex(r#"[\[\]{}"\\a\u{e9}\u{1f600}]{0,8}"#)
            .unwrap()
            .boxed();
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            text.clone().prop_map(Value::from),
        ];
        leaf.prop_recursive(12, 64, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((text.clone(), inner), 0..4)
                    .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// On any valid JSON, compact or pretty, the scan finds exactly the
        /// depth of the parsed value.
        #[test]
        fn agrees_with_the_parser(value in json_value()) {
            let depth = depth(&value);
            for text in [value.to_string(), serde_json::to_string_pretty(&value).unwrap()] {
                prop_assert_eq!(check(text.as_bytes(), depth), Ok(()));
                if depth > 0 {
                    prop_assert!(check(text.as_bytes(), depth - 1).is_err());
                }
            }
        }

        /// Any bytes at all: no panic, and the cap is monotonic.
        #[test]
        fn never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), max in 0usize..8) {
            if check(&bytes, max).is_ok() {
                prop_assert!(check(&bytes, max + 1).is_ok());
            }
        }
    }
}
