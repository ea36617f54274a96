//! The `sealpost` command line: `migrate`, `--help`, and start-up refusals
//! that name the setting at fault.

use std::process::{Command, Output};

use crate::backend_tests;
use crate::common::{Backend, ServerProcess, TestDb};

backend_tests!(
    migrate_prepares_a_fresh_database,
    json_logs_are_one_object_per_line_with_the_request_id,
);

fn sealpost(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run sealpost")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn migrate_prepares_a_fresh_database(backend: Backend) {
    let db = TestDb::new(backend).await;
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("SEALPOST_JWT_SECRET", crate::common::JWT_SECRET),
    ];
    let first = sealpost(&["migrate"], &env);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(stderr(&first).contains("migrations applied"));
    // Idempotent.
    let again = sealpost(&["migrate"], &env);
    assert!(again.status.success(), "{}", stderr(&again));
    // A server on the migrated database works.
    let server = ServerProcess::spawn(&db.url, &[]);
    server.account("alice").await;
}

#[test]
fn serve_help_lists_every_setting_with_its_variable() {
    let output = sealpost(&["serve", "--help"], &[]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for var in [
        "SEALPOST_ADDR",
        "DATABASE_URL",
        "SEALPOST_JWT_SECRET",
        "SEALPOST_STORAGE_KEYS",
        "SEALPOST_ACCESS_TOKEN_TTL",
        "SEALPOST_REFRESH_TOKEN_TTL",
        "SEALPOST_MESSAGE_TTL",
        "SEALPOST_SWEEP_INTERVAL",
        "SEALPOST_MAX_BODY_BYTES",
        "SEALPOST_DB_POOL_SIZE",
        "SEALPOST_HASH_CONCURRENCY",
        "SEALPOST_WS_PING_INTERVAL",
        "SEALPOST_WS_AUTH_TIMEOUT",
        "SEALPOST_WS_QUEUE",
        "SEALPOST_LOG_FORMAT",
    ] {
        assert!(help.contains(var), "{var} missing from --help:\n{help}");
    }
    assert!(help.contains("[default: 7d]"), "{help}");
}

#[test]
fn bad_settings_stop_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    for (var, value, named) in [
        ("SEALPOST_MESSAGE_TTL", "forever", "--message-ttl"),
        ("SEALPOST_JWT_SECRET", "too-short", "--jwt-secret"),
        ("SEALPOST_MAX_BODY_BYTES", "0", "--max-body-bytes"),
        ("SEALPOST_ADDR", "nowhere", "--addr"),
        ("SEALPOST_LOG_FORMAT", "xml", "--log-format"),
    ] {
        let output = sealpost(&["serve"], &[("DATABASE_URL", &url), (var, value)]);
        assert!(!output.status.success(), "{var}={value} was accepted");
        assert!(
            stderr(&output).contains(named),
            "{var}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn postgres_without_a_secret_refuses_to_start() {
    let output = sealpost(
        &["serve"],
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("SEALPOST_JWT_SECRET is not set"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn unsupported_database_urls_are_refused() {
    let output = sealpost(
        &["serve"],
        &[
            ("DATABASE_URL", "mysql://localhost/x"),
            ("SEALPOST_JWT_SECRET", crate::common::JWT_SECRET),
        ],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("DATABASE_URL"),
        "{}",
        stderr(&output)
    );
}

/// `SEALPOST_LOG_FORMAT=json`: every line the server writes is one JSON
/// object, and a request's lines carry its request id in their span.
async fn json_logs_are_one_object_per_line_with_the_request_id(backend: Backend) {
    let db = TestDb::new(backend).await;
    let server = ServerProcess::spawn(&db.url, &[("SEALPOST_LOG_FORMAT", "json")]);
    let reply = server
        .api
        .call(
            server
                .api
                .http
                .post(server.api.url("/v1/register"))
                .header("x-request-id", "json-log-probe")
                .json(&serde_json::json!({
                    "username": "jsonlog",
                    "password": crate::common::PASSWORD,
                    "public_key": crate::common::public_key(),
                })),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let registered = loop {
        if let Some(line) = server.log_lines("registered").pop() {
            break line;
        }
        assert!(std::time::Instant::now() < deadline, "no `registered` line");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let entry: serde_json::Value = serde_json::from_str(&registered)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {registered}"));
    assert_eq!(entry["fields"]["message"], "registered", "{entry}");
    assert_eq!(entry["span"]["request_id"], "json-log-probe", "{entry}");
    for line in server.log_lines("") {
        assert!(
            serde_json::from_str::<serde_json::Value>(&line).is_ok(),
            "a line that is not JSON: {line}"
        );
    }
}
