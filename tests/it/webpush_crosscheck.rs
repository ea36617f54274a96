//! An independent check of what the Web Push provider sends: a request it
//! made to the fake service is handed to tests/crosscheck/
//! webpush_crosscheck.py, where Mozilla's `http_ece` decrypts it with the
//! subscription's private key and `py_vapid` verifies its VAPID JWT. The
//! fake and the provider are both ours; this is not, so a mistake they
//! share (in the key derivation, the JWT's encoding) fails here. The
//! Python packages are installed by the test into a venv under the target
//! directory (`toolchain::python_venv`); nothing is skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sealpost::push::guard::AllowHosts;
use sealpost::push::http::Outbound;
use sealpost::push::provider::{Outcome, Provider, Urgency};
use sealpost::push::target::Target;
use sealpost::push::vapid::{Vapid, VapidKey};
use sealpost::push::webpush::WebPushProvider;
use serde_json::{Value, json};

use crate::common::fake_push::webpush::{FakeWebPush, Received, SUBJECT, Subscription};
use crate::common::toolchain;

fn crosscheck_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/crosscheck")
}

/// Runs the script on `input`: its verdict on success, its complaint on
/// failure.
fn run(python: &Path, input: &Value) -> Result<Value, String> {
    let mut child = Command::new(python)
        .arg(crosscheck_dir().join("webpush_crosscheck.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs the cross-check script");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).expect("the script prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn input(fake: &FakeWebPush, sub: &Subscription, push: &Received) -> Value {
    let headers: serde_json::Map<String, Value> = push
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), json!(value.to_str().unwrap())))
        .collect();
    json!({
        "origin": fake.origin(),
        "headers": headers,
        "body": URL_SAFE_NO_PAD.encode(&push.body),
        "private_key": sub.private_key(),
        "auth": sub.auth,
    })
}

#[tokio::test]
async fn python_http_ece_and_py_vapid_accept_what_the_provider_sends() {
    let python = tokio::task::spawn_blocking(|| {
        toolchain::python_venv(
            "webpush-crosscheck-venv",
            &crosscheck_dir().join("requirements.txt"),
        )
    })
    .await
    .unwrap();

    let fake = FakeWebPush::start().await;
    let allow = Arc::new(AllowHosts::parse(&[fake.allow_host()]).unwrap());
    let key = VapidKey::parse(&VapidKey::generate_pem()).unwrap();
    let provider = WebPushProvider::new(
        Vapid::new(key, SUBJECT.to_owned()),
        Arc::new(Outbound::new(allow, Duration::from_secs(5), false)),
    );
    let sub = fake.subscribe_for(provider.public_key());
    let target: Target = serde_json::from_value(json!({
        "kind": "webpush", "endpoint": sub.endpoint, "p256dh": sub.p256dh, "auth": sub.auth,
    }))
    .unwrap();
    assert_eq!(provider.wake(&target, Urgency::Low).await, Outcome::Sent);
    let pushes = fake.wait_for(&sub.id, 1, Duration::from_secs(10)).await;
    let request = input(&fake, &sub, &pushes[0]);

    let verdict = tokio::task::spawn_blocking({
        let (python, request) = (python.clone(), request.clone());
        move || run(&python, &request)
    })
    .await
    .unwrap()
    .unwrap_or_else(|why| panic!("{why}"));
    assert_eq!(verdict["plaintext"], r#"{"type":"wake"}"#, "{verdict}");
    assert_eq!(verdict["claims"]["aud"], fake.origin(), "{verdict}");
    assert_eq!(verdict["claims"]["sub"], SUBJECT, "{verdict}");
    assert_eq!(verdict["k"], provider.public_key(), "{verdict}");

    // The script can fail: each of these must be refused, for its reason.
    let mut bad_signature = request.clone();
    let authorization = bad_signature["headers"]["authorization"]
        .as_str()
        .unwrap()
        .to_owned();
    let (jwt, k) = authorization.split_once(", k=").unwrap();
    let (signed, signature) = jwt.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(signature).unwrap();
    sig[10] ^= 1;
    bad_signature["headers"]["authorization"] =
        json!(format!("{signed}.{}, k={k}", URL_SAFE_NO_PAD.encode(sig)));

    let mut portless = request.clone();
    portless["origin"] = json!(fake.origin().rsplit_once(':').unwrap().0);

    let mut bad_body = request.clone();
    let mut body = URL_SAFE_NO_PAD
        .decode(request["body"].as_str().unwrap())
        .unwrap();
    let last = body.len() - 1;
    body[last] ^= 1;
    bad_body["body"] = json!(URL_SAFE_NO_PAD.encode(body));

    let mut no_ttl = request.clone();
    no_ttl["headers"].as_object_mut().unwrap().remove("ttl");

    let cases = [
        (bad_signature, "py_vapid"),
        (portless, "aud"),
        (bad_body, "http_ece"),
        (no_ttl, "ttl"),
    ];
    for (input, reason) in cases {
        let python = python.clone();
        let result = tokio::task::spawn_blocking(move || run(&python, &input))
            .await
            .unwrap();
        match result {
            Ok(verdict) => panic!("accepted a request broken for {reason}: {verdict}"),
            Err(why) => assert!(why.contains(reason), "refused, but not for {reason}: {why}"),
        }
    }
}
