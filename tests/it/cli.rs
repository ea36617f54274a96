//! The `sealpost` command line: `migrate`, `--help`, and start-up refusals
//! that name the setting at fault.

use std::process::{Command, Output};

use crate::backend_tests;
use crate::common::{Backend, ServerProcess, TestDb};

backend_tests!(
    migrate_prepares_a_fresh_database,
    json_logs_are_one_object_per_line_with_the_request_id,
    the_queue_cap_is_read_under_its_new_name_and_its_former_one,
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

/// How long a run that must stop at start-up may take: a refused database
/// connection waits out the pool's acquire timeout (5 s).
const START_UP_STOPS_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// As [`sealpost`], for a run that must stop by itself: one still running
/// after [`START_UP_STOPS_WITHIN`] (a server that started) is killed, and
/// its output returned with a failed status, so the test fails rather than
/// waits for ever.
fn sealpost_stopping(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sealpost"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sealpost");
    let started = std::time::Instant::now();
    while child.try_wait().expect("wait on sealpost").is_none() {
        if started.elapsed() > START_UP_STOPS_WITHIN {
            child.kill().expect("kill sealpost");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("sealpost's output")
}

/// One run of `sealpost`: its arguments and its whole environment.
struct Run {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Run {
    fn new(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self {
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// Makes each run as [`sealpost_stopping`], all at once (a refused database
/// connection takes its acquire timeout), and returns their outputs in
/// order.
fn sealpost_all(runs: Vec<Run>) -> Vec<Output> {
    let handles: Vec<_> = runs
        .into_iter()
        .map(|run| {
            std::thread::spawn(move || {
                let args: Vec<&str> = run.args.iter().map(String::as_str).collect();
                let env: Vec<(&str, &str)> = run
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                sealpost_stopping(&args, &env)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// A configuration start-up refuses, and the secrets in it.
struct Refused<'a> {
    args: &'a [&'a str],
    env: Vec<(&'a str, &'a str)>,
    secrets: &'a [&'a str],
}

/// No configuration error, and nothing else `serve` or `check-config`
/// writes on its way to one, shows a secret it was given: a JWT secret or
/// storage keys that do not parse, the password of a database URL (in its
/// user info or in a parameter), of a NATS URL, or a TLS key that does not
/// load. At `trace`, so that no dependency's line passes unseen either.
#[test]
fn configuration_errors_never_show_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("x.db").display());
    let (_, cert, _) = crate::web::certificate(dir.path());
    let bad_key = dir.path().join("bad-key.pem");
    std::fs::write(
        &bad_key,
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA!!\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let url_file = dir.path().join("database-url");
    std::fs::write(
        &url_file,
        "postgres://sealpost:urlfilepw42@127.0.0.1:1/x?sslpassword=keyfilepass42\n",
    )
    .unwrap();
    let jwt = ("SEALPOST_JWT_SECRET", crate::common::JWT_SECRET);
    let keys = ("SEALPOST_STORAGE_KEYS", crate::common::STORAGE_KEYS);
    let postgres = "postgres://sealpost:dbpass42@127.0.0.1:1/x";
    let with_ssl_password = format!("{postgres}?sslmode=prefer&sslpassword=sslpass42");
    let refused = |args, env, secrets| Refused { args, env, secrets };
    let cases = [
        refused(
            &[],
            vec![
                ("DATABASE_URL", &*sqlite),
                ("SEALPOST_JWT_SECRET", "hunter2-too-short"),
            ],
            &["hunter2"],
        ),
        refused(
            &["--jwt-secret=hunter2-too-short"],
            vec![("DATABASE_URL", &*sqlite)],
            &["hunter2"],
        ),
        // 14 bytes, not 32.
        refused(
            &[],
            vec![
                ("DATABASE_URL", &*sqlite),
                ("SEALPOST_STORAGE_KEYS", "1:aHVudGVyMmh1bnRlcjI="),
            ],
            &["aHVudGVyMmh1bnRlcjI"],
        ),
        refused(
            &[],
            vec![("DATABASE_URL", postgres), jwt, keys],
            &["dbpass42"],
        ),
        refused(
            &[],
            vec![("DATABASE_URL", &*with_ssl_password), jwt, keys],
            &["dbpass42", "sslpass42"],
        ),
        refused(
            &[],
            vec![("DATABASE_URL_FILE", url_file.to_str().unwrap()), jwt, keys],
            &["urlfilepw42", "keyfilepass42"],
        ),
        refused(
            &[],
            vec![
                ("DATABASE_URL", "mysql://root:mysqlpass42@127.0.0.1/x"),
                jwt,
            ],
            &["mysqlpass42"],
        ),
        refused(
            &[],
            vec![
                ("DATABASE_URL", &*sqlite),
                (
                    "SEALPOST_NATS_URL",
                    "nats://natsuser:natspass42@127.0.0.1:1",
                ),
            ],
            &["natspass42"],
        ),
        refused(
            &[],
            vec![
                ("DATABASE_URL", &*sqlite),
                ("SEALPOST_TLS_CERT", &*cert),
                ("SEALPOST_TLS_KEY", bad_key.to_str().unwrap()),
            ],
            &["c2VjcmV0LWtleS1tYXRlcmlhbA"],
        ),
    ];
    const COMMANDS: [&str; 2] = ["serve", "check-config"];
    let mut runs = Vec::new();
    for case in &cases {
        let mut env = case.env.clone();
        env.push(("RUST_LOG", "trace"));
        for command in COMMANDS {
            let args: Vec<&str> = std::iter::once(command)
                .chain(case.args.iter().copied())
                .collect();
            runs.push(Run::new(&args, &env));
        }
    }
    let outputs = sealpost_all(runs);
    for (case, outputs) in cases.iter().zip(outputs.chunks(COMMANDS.len())) {
        let Refused { args, env, secrets } = case;
        for (command, output) in COMMANDS.iter().zip(outputs) {
            let written = format!(
                "{}{}",
                stderr(output),
                String::from_utf8_lossy(&output.stdout)
            );
            // Every case is one start-up refuses.
            if *command == "serve" {
                assert!(
                    !output.status.success(),
                    "{args:?} {env:?} started:\n{written}"
                );
            }
            for secret in *secrets {
                assert!(
                    !written.contains(secret),
                    "{command} {args:?} {env:?} wrote {secret}:\n{written}"
                );
            }
        }
    }
}

/// A setting missing after parsing, or named in a start-up error, is named
/// by its variable and its flag: the operator may use either.
#[test]
fn start_up_errors_name_each_setting_by_variable_and_flag() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("x.db").display());
    let postgres = "postgres://postgres@127.0.0.1:1/none";
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    // Each start-up's environment, and the names its error must hold.
    type Names<'a> = &'a [&'a str];
    let cases: [(Vec<(&str, &str)>, Names); 5] = [
        (
            vec![("DATABASE_URL", postgres)],
            &["SEALPOST_JWT_SECRET is not set (nor --jwt-secret)"],
        ),
        (
            vec![
                ("DATABASE_URL", postgres),
                ("SEALPOST_JWT_SECRET", crate::common::JWT_SECRET),
            ],
            &["SEALPOST_STORAGE_KEYS is not set (nor --storage-keys)"],
        ),
        // Required by a setting from the environment.
        (
            vec![("DATABASE_URL", &sqlite), ("SEALPOST_TLS_CERT", "cert.pem")],
            &["SEALPOST_TLS_KEY (--tls-key <TLS_KEY>)"],
        ),
        (
            vec![
                ("DATABASE_URL", &sqlite),
                ("SEALPOST_NATS_URL", "nats://127.0.0.1:1"),
            ],
            &[
                "SEALPOST_NATS_URL (--nats-url)",
                "DATABASE_URL (--database-url)",
            ],
        ),
        (
            vec![("DATABASE_URL", &sqlite), ("SEALPOST_ADDR", &taken)],
            &["SEALPOST_ADDR (--addr)"],
        ),
    ];
    let runs = cases
        .iter()
        .map(|(env, _)| Run::new(&["serve"], env))
        .collect();
    for ((env, names), output) in cases.iter().zip(sealpost_all(runs)) {
        let err = stderr(&output);
        assert!(!output.status.success(), "{env:?} started: {err}");
        for name in *names {
            assert!(err.contains(name), "{env:?}: no {name} in:\n{err}");
        }
    }
}

/// `SEALPOST_MAX_QUEUED_PER_DEVICE` caps each device's queue; its former
/// name, `SEALPOST_MAX_QUEUED_PER_USER`, still does, and says once at start
/// that it is deprecated. The new name says nothing of the kind.
async fn the_queue_cap_is_read_under_its_new_name_and_its_former_one(backend: Backend) {
    for (var, deprecated) in [
        ("SEALPOST_MAX_QUEUED_PER_DEVICE", false),
        ("SEALPOST_MAX_QUEUED_PER_USER", true),
    ] {
        let db = TestDb::new(backend).await;
        let server = ServerProcess::spawn(&db.url, &[(var, "2")]);
        let alice = server.account("alice").await;
        let bob = server.account("bob").await;
        server.send(&alice, bob.id, b"one").await;
        server.send(&alice, bob.id, b"two").await;
        server
            .post(
                "/v1/messages",
                Some(&alice.access),
                serde_json::json!({ "to": bob.id, "body": crate::common::b64(b"three") }),
            )
            .await
            .expect_error(429, "queue_full");
        let warnings = server.log_lines("is deprecated");
        if deprecated {
            assert_eq!(warnings.len(), 1, "{var}: {warnings:?}");
            for name in [
                "SEALPOST_MAX_QUEUED_PER_USER",
                "SEALPOST_MAX_QUEUED_PER_DEVICE",
            ] {
                assert!(warnings[0].contains(name), "{var}: {warnings:?}");
            }
        } else {
            assert_eq!(warnings, Vec::<String>::new(), "{var}");
        }
    }
}

/// The former name and the new one set to different values: start-up (and
/// `check-config`) stops, naming both, rather than guess which is meant. Set
/// alike, both are accepted.
#[test]
fn the_queue_cap_under_both_names_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("x.db").display());
    for command in ["serve", "check-config"] {
        let output = sealpost_stopping(
            &[command],
            &[
                ("DATABASE_URL", &url),
                ("SEALPOST_MAX_QUEUED_PER_USER", "5"),
                ("SEALPOST_MAX_QUEUED_PER_DEVICE", "7"),
            ],
        );
        let written = format!(
            "{}{}",
            stderr(&output),
            String::from_utf8_lossy(&output.stdout)
        );
        assert_eq!(output.status.code(), Some(1), "{command}: {written}");
        for named in [
            "SEALPOST_MAX_QUEUED_PER_USER (--max-queued-per-user) is 5",
            "SEALPOST_MAX_QUEUED_PER_DEVICE (--max-queued-per-device) is 7",
        ] {
            assert!(
                written.contains(named),
                "{command}: no {named} in:\n{written}"
            );
        }
    }
    let output = sealpost_stopping(
        &["check-config"],
        &[
            ("DATABASE_URL", &url),
            ("SEALPOST_MAX_QUEUED_PER_USER", "7"),
            ("SEALPOST_MAX_QUEUED_PER_DEVICE", "7"),
        ],
    );
    let written = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{written}{}", stderr(&output));
    assert!(written.contains("is deprecated"), "{written}");
}
