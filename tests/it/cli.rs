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

/// A value that does not parse stops `serve` and `check-config` with an
/// error naming the setting as the operator gave it: the environment
/// variable they set, or the flag they typed, never the other.
#[test]
fn bad_settings_stop_start_up_naming_the_setting_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    for (var, flag, value) in [
        ("SEALPOST_ACCESS_TOKEN_TTL", "--access-token-ttl", "banana"),
        ("SEALPOST_MESSAGE_TTL", "--message-ttl", "forever"),
        (
            "SEALPOST_HEADER_READ_TIMEOUT",
            "--header-read-timeout",
            "0s",
        ),
        ("SEALPOST_JWT_SECRET", "--jwt-secret", "too-short"),
        ("SEALPOST_MAX_BODY_BYTES", "--max-body-bytes", "0"),
        ("SEALPOST_ADDR", "--addr", "nowhere"),
        ("SEALPOST_LOG_FORMAT", "--log-format", "xml"),
        ("SEALPOST_STORAGE_KEYS", "--storage-keys", "not-a-key"),
    ] {
        for command in ["serve", "check-config"] {
            let from_env = sealpost(&[command], &[("DATABASE_URL", &url), (var, value)]);
            let err = stderr(&from_env);
            assert_eq!(
                from_env.status.code(),
                Some(2),
                "{command} {var}={value}: {err}"
            );
            assert!(
                err.contains(&format!("for '{var}'")) && !err.contains(flag),
                "{command} {var}={value}: {err}"
            );

            let typed = format!("{flag}={value}");
            let from_flag = sealpost(&[command, &typed], &[("DATABASE_URL", &url)]);
            let err = stderr(&from_flag);
            assert_eq!(from_flag.status.code(), Some(2), "{command} {typed}: {err}");
            assert!(
                err.contains(&format!("for '{flag} <")) && !err.contains(var),
                "{command} {typed}: {err}"
            );
        }
    }
    // Set both ways, the flag wins (clap does not read the variable), and
    // its bad value is reported as the flag's.
    let output = sealpost(
        &["serve", "--access-token-ttl", "banana"],
        &[("DATABASE_URL", &url), ("SEALPOST_ACCESS_TOKEN_TTL", "5m")],
    );
    let err = stderr(&output);
    assert!(!output.status.success());
    assert!(
        err.contains("'--access-token-ttl <") && !err.contains("SEALPOST_ACCESS_TOKEN_TTL"),
        "{err}"
    );
    // Without a subcommand `sealpost` serves, reading the environment.
    let output = sealpost(
        &[],
        &[
            ("DATABASE_URL", &url),
            ("SEALPOST_ACCESS_TOKEN_TTL", "banana"),
        ],
    );
    let err = stderr(&output);
    assert!(!output.status.success());
    assert!(
        err.contains("'SEALPOST_ACCESS_TOKEN_TTL'") && !err.contains("--access-token-ttl"),
        "{err}"
    );
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
    // The test stands in for a proxy: only a trusted one's id is kept.
    let server = ServerProcess::spawn(
        &db.url,
        &[
            ("SEALPOST_LOG_FORMAT", "json"),
            ("SEALPOST_TRUSTED_PROXIES", "127.0.0.1"),
        ],
    );
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
