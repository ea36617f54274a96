//! The APNs and FCM providers driven directly against the fake services
//! (`common::fake_push`): what each sends, what each answer becomes, the
//! provider token and access token caches, and the settings refused at
//! start-up. No database is involved, so these run once, not per backend;
//! the scenarios through a running server are in the `push_*` suites.

use std::fmt::Debug;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sealpost::Config;
use sealpost::push::apns::ApnsProvider;
use sealpost::push::fcm::FcmProvider;
use sealpost::push::guard::AllowHosts;
use sealpost::push::provider::{Outcome, Provider, Urgency};
use sealpost::push::target::{ApnsEnvironment, Target};
use serde_json::json;

use crate::common::fake_push::apns::{self, ApnsReply, FakeApns, device_token};
use crate::common::fake_push::fcm::{FakeFcm, FcmReply, registration_token};
use crate::common::fake_push::unix_now;

const TOPIC: &str = "com.example.sealpost";

/// Whether an outcome is the one a scripted answer should give.
type Expected = fn(&Outcome) -> bool;

/// The push settings from `flags` (with `--push-allow-hosts host`), as
/// the server parses them.
fn settings(flags: &[String], host: &str) -> (sealpost::push::config::PushConfig, Arc<AllowHosts>) {
    let mut args = flags.to_vec();
    args.extend(["--push-allow-hosts".into(), host.into()]);
    let config = Config::parse_from(args).expect("settings");
    let allow = AllowHosts::parse(&config.push.push_allow_hosts).expect("allow-list");
    (config.push, Arc::new(allow))
}

/// `flags` and `extra`, as one list.
fn with(mut flags: Vec<String>, extra: &[&str]) -> Vec<String> {
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

/// A fake APNs, and a provider configured for it with `extra` flags (its
/// key read from a directory gone once it is).
async fn apns_setup(extra: &[&str]) -> (FakeApns, ApnsProvider) {
    let fake = FakeApns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, allow) = settings(&with(fake.flags(dir.path()), extra), &fake.host());
    let provider = ApnsProvider::from_config(&config, allow).expect("APNs settings");
    (fake, provider.expect("APNs on"))
}

/// A fake FCM, and a provider configured for it with `extra` flags (its
/// credentials read from a directory gone once they are).
async fn fcm_setup(extra: &[&str]) -> (FakeFcm, FcmProvider) {
    let fake = FakeFcm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (config, allow) = settings(&with(fake.flags(dir.path()), extra), &fake.host());
    let provider = FcmProvider::from_config(&config, allow).expect("FCM settings");
    (fake, provider.expect("FCM on"))
}

/// Why APNs settings `flags` are refused at start-up, with its causes.
fn apns_refused(flags: &[String], host: &str) -> String {
    let (config, allow) = settings(flags, host);
    let err = ApnsProvider::from_config(&config, allow).err();
    format!("{:#}", err.expect("refused"))
}

/// Why FCM settings `flags` are refused at start-up, with its causes.
fn fcm_refused(flags: &[String], host: &str) -> String {
    let (config, allow) = settings(flags, host);
    let err = FcmProvider::from_config(&config, allow).err();
    format!("{:#}", err.expect("refused"))
}

/// For each case, scripts the reply for a new device (`device()`), wakes
/// it once, and checks the outcome: the one expected, no token in its
/// text, and no second try (`tries` counts what the fake received for a
/// device).
async fn answers_become_outcomes<R: Debug + Clone>(
    provider: &dyn Provider,
    cases: Vec<(R, Expected)>,
    device: fn() -> String,
    target: fn(&str) -> Target,
    script: impl Fn(&str, R),
    tries: impl Fn(&str) -> usize,
) {
    for (reply, expected) in cases {
        let device = device();
        script(&device, reply.clone());
        let outcome = provider.wake(&target(&device), Urgency::High).await;
        assert!(expected(&outcome), "{reply:?} became {outcome:?}");
        assert_no_token(&outcome, &device);
        assert_eq!(tries(&device), 1, "{reply:?}: tried again");
    }
}

fn apns_target(token: &str) -> Target {
    Target::Apns {
        token: token.to_owned(),
        topic: TOPIC.to_owned(),
        environment: ApnsEnvironment::Production,
    }
}

fn fcm_target(token: &str) -> Target {
    Target::Fcm {
        token: token.to_owned(),
    }
}

/// An outcome's text, for the log, never carries the token it was about.
fn assert_no_token(outcome: &Outcome, token: &str) {
    if let Outcome::Transient(text) | Outcome::Config(text) = outcome {
        assert!(!text.contains(token), "a token in {text:?}");
    }
}

#[tokio::test]
async fn apns_wakes_are_content_free_and_share_one_provider_token() {
    let (fake, provider) = apns_setup(&[]).await;
    let device = device_token();

    let before = unix_now();
    assert_eq!(
        provider.wake(&apns_target(&device), Urgency::High).await,
        Outcome::Sent
    );
    assert_eq!(
        provider.wake(&apns_target(&device), Urgency::Low).await,
        Outcome::Sent
    );

    let received = fake.received_for(&device);
    assert_eq!(received.len(), 2, "{received:#?}");
    let (urgent, quiet) = (&received[0], &received[1]);
    assert_eq!(urgent.push_type, "alert");
    assert_eq!(urgent.priority, 10);
    assert_eq!(
        urgent.payload,
        json!({"aps": {"alert": {"loc-key": "NEW_MESSAGE"}, "mutable-content": 1}})
    );
    assert_eq!(quiet.push_type, "background");
    assert_eq!(quiet.priority, 5);
    assert_eq!(quiet.payload, json!({"aps": {"content-available": 1}}));
    for request in &received {
        assert_eq!(request.topic, TOPIC);
        assert_eq!(request.collapse_id.as_deref(), Some("sealpost"));
        assert!(!request.sandbox);
        let expiration = request.expiration.expect("apns-expiration");
        assert!(
            (before + 86_400..=unix_now() + 86_400).contains(&expiration),
            "apns-expiration {expiration}, a day from {before}"
        );
        assert!(
            (before..=unix_now()).contains(&request.iat),
            "iat {}",
            request.iat
        );
    }
    assert_eq!(urgent.jwt, quiet.jwt, "the provider token is cached");
    assert!(fake.problems().is_empty(), "{:?}", fake.problems());
}

#[tokio::test]
async fn apns_sandbox_targets_go_to_the_sandbox() {
    let (fake, provider) = apns_setup(&[]).await;
    let device = device_token();
    let target = Target::Apns {
        token: device.clone(),
        topic: TOPIC.to_owned(),
        environment: ApnsEnvironment::Sandbox,
    };
    assert_eq!(provider.wake(&target, Urgency::High).await, Outcome::Sent);
    let received = fake.received_for(&device);
    assert_eq!(received.len(), 1);
    assert!(received[0].sandbox, "sent to production");
}

#[tokio::test]
async fn apns_answers_become_outcomes() {
    let (fake, provider) = apns_setup(&[]).await;
    let cases: Vec<(ApnsReply, Expected)> = vec![
        (ApnsReply::UNREGISTERED, |o| *o == Outcome::Gone),
        (ApnsReply::BAD_DEVICE_TOKEN, |o| *o == Outcome::Gone),
        (ApnsReply::NOT_FOR_TOPIC, |o| *o == Outcome::Gone),
        (ApnsReply::Throttle(Some(7)), |o| {
            *o == Outcome::Throttled(Some(Duration::from_secs(7)))
        }),
        (ApnsReply::Throttle(None), |o| {
            *o == Outcome::Throttled(None)
        }),
        (ApnsReply::INTERNAL, |o| matches!(o, Outcome::Transient(_))),
        (ApnsReply::UNAVAILABLE, |o| {
            matches!(o, Outcome::Transient(_))
        }),
        (
            ApnsReply::BAD_TOPIC,
            |o| matches!(o, Outcome::Config(text) if text.contains("BadTopic")),
        ),
        (ApnsReply::Reason(403, "BadCertificate"), |o| {
            matches!(o, Outcome::Config(_))
        }),
        (ApnsReply::Reason(413, "PayloadTooLarge"), |o| {
            matches!(o, Outcome::Config(_))
        }),
    ];
    answers_become_outcomes(
        &provider,
        cases,
        device_token,
        apns_target,
        |device, reply| fake.script(device, [reply]),
        |device| fake.received_for(device).len(),
    )
    .await;
    assert!(fake.problems().is_empty(), "{:?}", fake.problems());
}

#[tokio::test]
async fn apns_renews_a_refused_provider_token_once() {
    let (fake, provider) = apns_setup(&[]).await;

    // Refused, renewed, sent.
    let device = device_token();
    fake.script(&device, [ApnsReply::EXPIRED_PROVIDER_TOKEN]);
    assert_eq!(
        provider.wake(&apns_target(&device), Urgency::High).await,
        Outcome::Sent
    );
    assert_eq!(fake.received_for(&device).len(), 2);

    // Refused again within 20 minutes of that renewal: Apple would answer
    // TooManyProviderTokenUpdates to another, so it is not renewed, and
    // the refusal is the configuration's.
    let device = device_token();
    fake.script(
        &device,
        [
            ApnsReply::Reason(403, "InvalidProviderToken"),
            ApnsReply::Ok,
        ],
    );
    let outcome = provider.wake(&apns_target(&device), Urgency::High).await;
    match &outcome {
        Outcome::Config(text) => {
            assert!(text.contains("InvalidProviderToken"), "{text}");
            assert!(
                text.contains("SEALPOST_APNS_KEY_ID (--apns-key-id)"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.received_for(&device).len(), 1);
}

#[tokio::test]
async fn apns_checks_the_provider_token_signature() {
    // The fake verifies the JWT with its own key: a provider with another
    // key is refused, as Apple refuses it, and never renews its way in.
    let fake = FakeApns::start().await;
    let other = FakeApns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut flags = other.flags(dir.path());
    for (flag, url) in [
        ("--apns-url", fake.url()),
        ("--apns-sandbox-url", fake.sandbox_url()),
    ] {
        let at = flags.iter().position(|f| f == flag).unwrap() + 1;
        flags[at] = url;
    }
    let (config, allow) = settings(&flags, &fake.host());
    let provider = ApnsProvider::from_config(&config, allow).unwrap().unwrap();

    let device = device_token();
    let outcome = provider.wake(&apns_target(&device), Urgency::High).await;
    assert!(matches!(outcome, Outcome::Config(_)), "{outcome:?}");
    let problems = fake.problems();
    assert_eq!(
        problems.len(),
        2,
        "refused, renewed once, refused: {problems:?}"
    );
    assert!(
        problems.iter().all(|p| p.contains("signature")),
        "{problems:?}"
    );
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn apns_multiplexes_one_connection() {
    let (fake, provider) = apns_setup(&[]).await;
    let provider = Arc::new(provider);
    assert_eq!(
        provider
            .wake(&apns_target(&device_token()), Urgency::High)
            .await,
        Outcome::Sent
    );
    let wakes: Vec<_> = (0..20)
        .map(|_| {
            let provider = provider.clone();
            tokio::spawn(async move {
                provider
                    .wake(&apns_target(&device_token()), Urgency::High)
                    .await
            })
        })
        .collect();
    for wake in wakes {
        assert_eq!(wake.await.unwrap(), Outcome::Sent);
    }
    let received = fake.received();
    assert_eq!(received.len(), 21);
    assert!(
        received.iter().all(|r| r.jwt == received[0].jwt),
        "one provider token"
    );
    assert_eq!(fake.connections(), 1, "HTTP/2: one connection for all");
}

#[tokio::test]
async fn apns_a_hung_service_is_a_transient_failure_within_the_timeout() {
    let (fake, provider) = apns_setup(&["--push-timeout", "1s"]).await;
    let device = device_token();
    fake.script(&device, [ApnsReply::Hang(Duration::from_secs(30))]);
    let started = Instant::now();
    let outcome = provider.wake(&apns_target(&device), Urgency::High).await;
    assert!(matches!(outcome, Outcome::Transient(_)), "{outcome:?}");
    assert_no_token(&outcome, &device);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The next wake-up is not held up by the hung one.
    let device = device_token();
    assert_eq!(
        provider.wake(&apns_target(&device), Urgency::High).await,
        Outcome::Sent
    );
}

#[tokio::test]
async fn apns_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (config, allow) = settings(&[], "127.0.0.1:1");
    assert!(
        ApnsProvider::from_config(&config, allow).unwrap().is_none(),
        "off by default"
    );

    // Partial.
    let key = dir.path().join("AuthKey.p8");
    let flags = ["--apns-key-file".to_owned(), key.display().to_string()];
    let err = apns_refused(&flags, "127.0.0.1:1");
    assert!(
        err.contains("SEALPOST_APNS_KEY_ID is not set (nor --apns-key-id)"),
        "{err}"
    );
    assert!(
        err.contains("SEALPOST_APNS_TEAM_ID is not set (nor --apns-team-id)"),
        "{err}"
    );

    let all = |path: &Path| -> Vec<String> {
        [
            "--apns-key-file",
            &path.display().to_string(),
            "--apns-key-id",
            apns::KEY_ID,
            "--apns-team-id",
            apns::TEAM_ID,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    // Unreadable.
    let err = apns_refused(&all(&key), "127.0.0.1:1");
    assert!(
        err.contains("SEALPOST_APNS_KEY_FILE (--apns-key-file)"),
        "{err}"
    );

    // Not a P-256 key: an RSA one, as the FCM account's.
    let rsa_pem = FakeFcm::start().await.credentials()["private_key"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(&key, &rsa_pem).unwrap();
    let err = apns_refused(&all(&key), "127.0.0.1:1");
    assert!(
        err.contains("SEALPOST_APNS_KEY_FILE (--apns-key-file)"),
        "{err}"
    );
    assert!(err.contains("not a P-256 private key"), "{err}");
    let body = rsa_pem.lines().nth(1).unwrap();
    assert!(!err.contains(body), "the key in the error: {err}");

    // A bad team id.
    let fake = FakeApns::start().await;
    let mut flags = all(&fake.key_file(dir.path()));
    flags[5] = "TEAM 01".into();
    let err = apns_refused(&flags, "127.0.0.1:1");
    assert!(
        err.contains("SEALPOST_APNS_TEAM_ID (--apns-team-id)"),
        "{err}"
    );

    // A service URL the SSRF guard would refuse: plain http to a host not
    // allowed, a private address.
    for url in ["http://push.example.com", "https://10.0.0.1"] {
        let mut flags = all(&fake.key_file(dir.path()));
        flags.extend(["--apns-sandbox-url".into(), url.into()]);
        let err = apns_refused(&flags, "127.0.0.1:1");
        assert!(
            err.contains("SEALPOST_APNS_SANDBOX_URL (--apns-sandbox-url) must"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn fcm_wakes_are_data_only_and_share_one_access_token() {
    let (fake, provider) = fcm_setup(&[]).await;
    let device = registration_token();
    assert_eq!(
        provider.wake(&fcm_target(&device), Urgency::High).await,
        Outcome::Sent
    );
    assert_eq!(
        provider.wake(&fcm_target(&device), Urgency::Low).await,
        Outcome::Sent
    );

    let received = fake.received_for(&device);
    assert_eq!(received.len(), 2, "{received:#?}");
    assert_eq!(received[0].priority, "HIGH");
    assert_eq!(received[1].priority, "NORMAL");
    for request in &received {
        assert_eq!(request.data, json!({"type": "wake"}));
        assert_eq!(request.collapse_key.as_deref(), Some("sealpost"));
        assert_eq!(request.ttl.as_deref(), Some("86400s"));
    }
    assert_eq!(received[0].bearer, received[1].bearer);
    assert_eq!(fake.token_requests(), 1, "the access token is cached");
    assert!(fake.problems().is_empty(), "{:?}", fake.problems());
}

#[tokio::test]
async fn fcm_answers_become_outcomes() {
    let (fake, provider) = fcm_setup(&[]).await;
    let cases: Vec<(FcmReply, Expected)> = vec![
        (FcmReply::UNREGISTERED, |o| *o == Outcome::Gone),
        (FcmReply::Error(404, "NOT_FOUND", None), |o| {
            *o == Outcome::Gone
        }),
        (
            FcmReply::INVALID_ARGUMENT,
            |o| matches!(o, Outcome::Config(text) if text.contains("INVALID_ARGUMENT")),
        ),
        (
            FcmReply::SENDER_ID_MISMATCH,
            |o| matches!(o, Outcome::Config(text) if text.contains("SENDER_ID_MISMATCH")),
        ),
        (FcmReply::Throttle(Some(30)), |o| {
            *o == Outcome::Throttled(Some(Duration::from_secs(30)))
        }),
        (FcmReply::UNAVAILABLE, |o| {
            matches!(o, Outcome::Transient(_))
        }),
        (FcmReply::INTERNAL, |o| matches!(o, Outcome::Transient(_))),
    ];
    answers_become_outcomes(
        &provider,
        cases,
        registration_token,
        fcm_target,
        |device, reply| fake.script(device, [reply]),
        |device| fake.received_for(device).len(),
    )
    .await;
    assert!(fake.problems().is_empty(), "{:?}", fake.problems());
}

#[tokio::test]
async fn fcm_renews_the_access_token_before_it_expires() {
    let (fake, provider) = fcm_setup(&[]).await;
    // A token of 2 s is used for its first half.
    fake.set_token_lifetime(Duration::from_secs(2));
    let device = registration_token();
    assert_eq!(
        provider.wake(&fcm_target(&device), Urgency::High).await,
        Outcome::Sent
    );
    assert_eq!(
        provider.wake(&fcm_target(&device), Urgency::High).await,
        Outcome::Sent
    );
    assert_eq!(fake.token_requests(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        provider.wake(&fcm_target(&device), Urgency::High).await,
        Outcome::Sent
    );
    assert_eq!(fake.token_requests(), 2);
    assert_eq!(fake.unauthenticated(), 0, "a token used after it expired");
    assert!(fake.problems().is_empty(), "{:?}", fake.problems());
}

#[tokio::test]
async fn fcm_a_revoked_access_token_is_replaced_at_once() {
    let (fake, provider) = fcm_setup(&[]).await;
    let device = registration_token();
    assert_eq!(
        provider.wake(&fcm_target(&device), Urgency::High).await,
        Outcome::Sent
    );
    fake.revoke_tokens();
    assert_eq!(
        provider.wake(&fcm_target(&device), Urgency::High).await,
        Outcome::Sent
    );
    assert_eq!(fake.unauthenticated(), 1);
    assert_eq!(fake.token_requests(), 2);

    // Refused twice, the second time with a new token: ours to mend.
    let device = registration_token();
    let unauthenticated = FcmReply::Error(401, "UNAUTHENTICATED", None);
    fake.script(
        &device,
        [unauthenticated.clone(), unauthenticated, FcmReply::Ok],
    );
    let outcome = provider.wake(&fcm_target(&device), Urgency::High).await;
    assert!(matches!(outcome, Outcome::Config(_)), "{outcome:?}");
    assert_eq!(fake.received_for(&device).len(), 2);
    assert_eq!(fake.token_requests(), 3);
}

#[tokio::test]
async fn fcm_one_token_request_for_many_wakes() {
    let (fake, provider) = fcm_setup(&[]).await;
    let provider = Arc::new(provider);
    // A slow token endpoint: every wake-up of the burst arrives before
    // the token does.
    fake.script_token([FcmReply::Hang(Duration::from_millis(300))]);
    let wakes: Vec<_> = (0..20)
        .map(|_| {
            let provider = provider.clone();
            tokio::spawn(async move {
                provider
                    .wake(&fcm_target(&registration_token()), Urgency::High)
                    .await
            })
        })
        .collect();
    for wake in wakes {
        assert_eq!(wake.await.unwrap(), Outcome::Sent);
    }
    assert_eq!(fake.received().len(), 20);
    assert_eq!(fake.token_requests(), 1);
}

#[tokio::test]
async fn fcm_token_endpoint_failures() {
    let (fake, provider) = fcm_setup(&[]).await;
    let device = registration_token();
    fake.script_token([
        FcmReply::Error(400, "invalid_grant", None),
        FcmReply::Error(503, "temporarily_unavailable", None),
        FcmReply::Throttle(Some(5)),
    ]);
    let outcome = provider.wake(&fcm_target(&device), Urgency::High).await;
    assert!(
        matches!(&outcome, Outcome::Config(text) if text.contains("invalid_grant")),
        "{outcome:?}"
    );
    let outcome = provider.wake(&fcm_target(&device), Urgency::High).await;
    assert!(matches!(outcome, Outcome::Transient(_)), "{outcome:?}");
    let outcome = provider.wake(&fcm_target(&device), Urgency::High).await;
    assert_eq!(outcome, Outcome::Throttled(Some(Duration::from_secs(5))));
    assert!(fake.received().is_empty(), "sent without a token");
    assert_eq!(
        provider.wake(&fcm_target(&device), Urgency::High).await,
        Outcome::Sent
    );
}

#[tokio::test]
async fn fcm_checks_the_assertion() {
    // The fake verifies the assertion with the account's public key: a
    // file naming the account but holding another key is refused.
    let fake = FakeFcm::start().await;
    let dir = tempfile::tempdir().unwrap();
    let other_key = tokio::task::spawn_blocking(|| {
        use rsa::pkcs8::EncodePrivateKey;
        rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
            .unwrap()
            .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string()
    })
    .await
    .unwrap();
    let mut credentials = fake.credentials();
    credentials["private_key"] = other_key.into();
    let path = dir.path().join("other.json");
    std::fs::write(&path, credentials.to_string()).unwrap();
    let flags = [
        "--fcm-credentials-file".to_owned(),
        path.display().to_string(),
        "--fcm-url".into(),
        fake.url(),
    ];
    let (config, allow) = settings(&flags, &fake.host());
    let provider = FcmProvider::from_config(&config, allow).unwrap().unwrap();
    let outcome = provider
        .wake(&fcm_target(&registration_token()), Urgency::High)
        .await;
    assert!(
        matches!(&outcome, Outcome::Config(text) if text.contains("invalid_grant")),
        "{outcome:?}"
    );
    let problems = fake.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("assertion"), "{problems:?}");
}

#[tokio::test]
async fn fcm_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (config, allow) = settings(&[], "127.0.0.1:1");
    assert!(
        FcmProvider::from_config(&config, allow).unwrap().is_none(),
        "off by default"
    );

    let path = dir.path().join("service-account.json");
    let flags = [
        "--fcm-credentials-file".to_owned(),
        path.display().to_string(),
    ];
    let setting = "SEALPOST_FCM_CREDENTIALS_FILE (--fcm-credentials-file)";
    // Unreadable.
    let err = fcm_refused(&flags, "127.0.0.1:1");
    assert!(err.contains(setting), "{err}");

    // Lacking fields.
    let fake = FakeFcm::start().await;
    let mut credentials = fake.credentials();
    credentials.as_object_mut().unwrap().remove("token_uri");
    credentials.as_object_mut().unwrap().remove("project_id");
    std::fs::write(&path, credentials.to_string()).unwrap();
    let err = fcm_refused(&flags, "127.0.0.1:1");
    assert!(err.contains(setting), "{err}");
    assert!(err.contains("lacks project_id, token_uri"), "{err}");

    // A key that is not one.
    let mut credentials = fake.credentials();
    credentials["private_key"] =
        "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n".into();
    std::fs::write(&path, credentials.to_string()).unwrap();
    let err = fcm_refused(&flags, "127.0.0.1:1");
    assert!(err.contains("not an RSA key in PKCS#8 PEM"), "{err}");
    assert!(!err.contains("MIIB"), "the key in the error: {err}");

    // A service URL the SSRF guard would refuse.
    let flags_http = [
        "--fcm-credentials-file".to_owned(),
        fake.credentials_file(dir.path()).display().to_string(),
        "--fcm-url".into(),
        "http://fcm.example.com".into(),
    ];
    let err = fcm_refused(&flags_http, &fake.host());
    assert!(
        err.contains("SEALPOST_FCM_URL (--fcm-url) must be an https URL"),
        "{err}"
    );
    // The token URI too (the fake's is plain http on loopback).
    let err = fcm_refused(&fake.flags(dir.path()), "127.0.0.1:1");
    assert!(err.contains("token_uri"), "{err}");
    assert!(err.contains(setting), "{err}");

    // Not JSON.
    std::fs::write(&path, "project_id = x").unwrap();
    let err = fcm_refused(&flags, "127.0.0.1:1");
    assert!(err.contains("not a service-account JSON"), "{err}");
}
