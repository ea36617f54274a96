//! Local stand-ins for the push services, started in-process on
//! `127.0.0.1:0`, that check what the real ones check and record what they
//! received for the tests to assert on. A server under test reaches them
//! through `--push-allow-hosts 127.0.0.1:<port>` (they are loopback and
//! plain `http`, which the SSRF guard otherwise refuses).
//!
//! - [`webpush`]: a Web Push service (RFC 8030/8291/8292) that also plays
//!   the browser's half: it mints subscriptions and decrypts what is pushed
//!   to them.

pub mod webpush;
