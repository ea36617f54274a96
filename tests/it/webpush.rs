//! The Web Push provider against the fake push service
//! (`common::fake_push::webpush`): what it sends passes the checks real
//! services make and decrypts to the constant wake-up, each answer becomes
//! the right outcome, and the fake itself refuses what real services
//! refuse (so that its passing means something).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::Request;
use p256::pkcs8::DecodePrivateKey;
use sealpost::push::guard::AllowHosts;
use sealpost::push::http::Outbound;
use sealpost::push::provider::{Outcome, Provider, Urgency};
use sealpost::push::target::Target;
use sealpost::push::vapid::{Vapid, VapidKey};
use sealpost::push::webpush::{TOPIC, TTL_SECONDS, WebPushProvider};
use serde_json::json;

use crate::common::fake_push::webpush::{Answer, FakeWebPush, SUBJECT, Subscription, VAPID_KEY};

const WAIT: Duration = Duration::from_secs(10);

fn outbound(fake: &FakeWebPush, timeout: Duration) -> Arc<Outbound> {
    let allow = AllowHosts::parse(&[fake.allow_host()]).unwrap();
    Arc::new(Outbound::new(Arc::new(allow), timeout, false))
}

fn provider_with(
    fake: &FakeWebPush,
    key: &str,
    subject: &str,
    timeout: Duration,
) -> WebPushProvider {
    let vapid = Vapid::new(VapidKey::parse(key).unwrap(), subject.to_owned());
    WebPushProvider::new(vapid, outbound(fake, timeout))
}

fn provider(fake: &FakeWebPush) -> WebPushProvider {
    provider_with(fake, VAPID_KEY, SUBJECT, Duration::from_secs(5))
}

fn target(sub: &Subscription) -> Target {
    serde_json::from_value(json!({
        "kind": "webpush",
        "endpoint": sub.endpoint,
        "p256dh": sub.p256dh,
        "auth": sub.auth,
    }))
    .unwrap()
}

#[tokio::test]
async fn a_wake_up_passes_the_fake_and_carries_nothing_but_wake() {
    let fake = FakeWebPush::start().await;
    let provider = provider(&fake);
    // Made for our key: the fake refuses any other `k`.
    let sub = fake.subscribe_for(provider.public_key());

    assert_eq!(
        provider.wake(&target(&sub), Urgency::High).await,
        Outcome::Sent
    );
    assert_eq!(
        provider.wake(&target(&sub), Urgency::Low).await,
        Outcome::Sent
    );
    let received = fake.wait_for(&sub.id, 2, WAIT).await;
    assert_eq!(received.len(), 2, "{received:?}");
    assert!(
        fake.rejected(&sub.id).is_empty(),
        "{:?}",
        fake.rejected(&sub.id)
    );

    for push in &received {
        assert_eq!(push.plaintext_json(), json!({ "type": "wake" }));
        assert_eq!(push.ttl, u64::from(TTL_SECONDS));
        assert_eq!(push.ttl, 86_400);
        assert_eq!(push.topic.as_deref(), Some(TOPIC));
        assert_eq!(push.claims["aud"], fake.origin());
        assert!(
            fake.origin()
                .rsplit_once(':')
                .unwrap()
                .1
                .parse::<u16>()
                .is_ok(),
            "the origin has its port: {}",
            fake.origin()
        );
        assert_eq!(push.claims["sub"], SUBJECT);
        assert_eq!(push.vapid_key, provider.public_key());
        assert_eq!(push.answered, 201);
        // The same size every time: the body says nothing by its length.
        assert_eq!(push.body.len(), received[0].body.len());
    }
    assert_eq!(received[0].urgency.as_deref(), Some("high"));
    assert_eq!(received[1].urgency.as_deref(), Some("low"));
    // Fresh salt and key each time: two wake-ups never look alike.
    assert_ne!(received[0].body, received[1].body);

    // Another subscription gets a body of the same size.
    let other = fake.subscribe();
    assert_eq!(
        provider.wake(&target(&other), Urgency::High).await,
        Outcome::Sent
    );
    let theirs = fake.wait_for(&other.id, 1, WAIT).await;
    assert_eq!(theirs[0].body.len(), received[0].body.len());
}

#[tokio::test]
async fn each_answer_becomes_its_outcome() {
    let fake = FakeWebPush::start().await;
    let provider = provider(&fake);
    let date = (chrono::Utc::now() + chrono::Duration::seconds(120))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    /// Whether an outcome is the one expected.
    type Expect = fn(&Outcome) -> bool;
    let cases: Vec<(Answer, Expect)> = vec![
        (Answer::Status(201), |o| *o == Outcome::Sent),
        (Answer::Status(200), |o| *o == Outcome::Sent),
        (Answer::Status(202), |o| *o == Outcome::Sent),
        (Answer::Status(404), |o| *o == Outcome::Gone),
        (Answer::Status(410), |o| *o == Outcome::Gone),
        (Answer::TooMany(Some("7".into())), |o| {
            *o == Outcome::Throttled(Some(Duration::from_secs(7)))
        }),
        (
            Answer::TooMany(Some(date)),
            |o| matches!(o, Outcome::Throttled(Some(d)) if *d > Duration::from_secs(100) && *d <= Duration::from_secs(120)),
        ),
        (Answer::TooMany(None), |o| *o == Outcome::Throttled(None)),
        (Answer::Status(500), |o| matches!(o, Outcome::Transient(_))),
        (Answer::Status(503), |o| matches!(o, Outcome::Transient(_))),
        (Answer::Status(400), |o| matches!(o, Outcome::Config(_))),
        (Answer::Status(401), |o| matches!(o, Outcome::Config(_))),
        (Answer::Status(403), |o| matches!(o, Outcome::Config(_))),
        (Answer::Status(413), |o| matches!(o, Outcome::Config(_))),
    ];
    for (answer, expected) in cases {
        let sub = fake.subscribe();
        fake.script(&sub.id, [answer.clone()]);
        let outcome = provider.wake(&target(&sub), Urgency::High).await;
        assert!(expected(&outcome), "{answer:?} became {outcome:?}");
        // It was a valid push, answered as scripted.
        assert_eq!(fake.received(&sub.id).len(), 1, "{answer:?}");
        assert!(fake.rejected(&sub.id).is_empty(), "{answer:?}");
    }

    // A subscription the service never knew, or forgot: gone.
    let sub = fake.subscribe();
    fake.unsubscribe(&sub.id);
    assert_eq!(
        provider.wake(&target(&sub), Urgency::High).await,
        Outcome::Gone
    );

    // Scripts run in order, then 201 again.
    let sub = fake.subscribe();
    fake.script(
        &sub.id,
        [Answer::Status(500), Answer::TooMany(Some("1".into()))],
    );
    let t = target(&sub);
    assert!(matches!(
        provider.wake(&t, Urgency::High).await,
        Outcome::Transient(_)
    ));
    assert!(matches!(
        provider.wake(&t, Urgency::High).await,
        Outcome::Throttled(_)
    ));
    assert_eq!(provider.wake(&t, Urgency::High).await, Outcome::Sent);
    let answered: Vec<u16> = fake.received(&sub.id).iter().map(|r| r.answered).collect();
    assert_eq!(answered, [500, 429, 201]);
}

#[tokio::test]
async fn a_hanging_or_absent_service_is_a_transient_failure_within_the_timeout() {
    let fake = FakeWebPush::start().await;
    let provider = provider_with(&fake, VAPID_KEY, SUBJECT, Duration::from_secs(1));
    let sub = fake.subscribe();
    fake.script(&sub.id, [Answer::Hang(Duration::from_secs(20))]);
    let started = tokio::time::Instant::now();
    let outcome = provider.wake(&target(&sub), Urgency::High).await;
    assert!(matches!(outcome, Outcome::Transient(_)), "{outcome:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The text names no endpoint.
    let Outcome::Transient(why) = outcome else {
        unreachable!()
    };
    assert!(
        !why.contains(&sub.id) && !why.contains("127.0.0.1"),
        "{why}"
    );

    // Nothing listens on the port any more.
    let gone = FakeWebPush::start().await;
    let sub = gone.subscribe();
    let provider = provider_with(&gone, VAPID_KEY, SUBJECT, Duration::from_secs(2));
    drop(gone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let outcome = provider.wake(&target(&sub), Urgency::High).await;
    assert!(matches!(outcome, Outcome::Transient(_)), "{outcome:?}");
}

/// A request as the provider makes it, after `change`, sent as is; what the
/// fake answered and why it refused it.
async fn tampered(
    fake: &FakeWebPush,
    sub: &Subscription,
    change: impl FnOnce(&mut Request<Bytes>),
) -> (u16, String) {
    let mut request = provider(fake).request(&target(sub), Urgency::High).unwrap();
    change(&mut request);
    let before = fake.rejected(&sub.id).len();
    let answer = outbound(fake, Duration::from_secs(5))
        .send(request)
        .await
        .unwrap();
    let rejected = fake.rejected(&sub.id);
    assert_eq!(rejected.len(), before + 1, "not refused: {}", answer.status);
    let last = rejected.last().unwrap();
    assert_eq!(last.status, answer.status.as_u16());
    (last.status, last.reason.clone())
}

/// `vapid t=<JWT>, k=<key>` signed with `key` over these claims.
fn authorization(key: &str, claims: serde_json::Value) -> String {
    let secret = p256::SecretKey::from_pkcs8_pem(key).unwrap();
    let der = p256::pkcs8::EncodePrivateKey::to_pkcs8_der(&secret).unwrap();
    let jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(der.as_bytes()),
    )
    .unwrap();
    let public = VapidKey::parse(key).unwrap().public_key().to_owned();
    format!("vapid t={jwt}, k={public}")
}

fn set(request: &mut Request<Bytes>, name: &'static str, value: &str) {
    request.headers_mut().insert(name, value.parse().unwrap());
}

#[tokio::test]
async fn the_fake_refuses_what_real_services_refuse() {
    let fake = FakeWebPush::start().await;
    let sub = fake.subscribe();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let other_key = VapidKey::generate_pem();
    let origin = fake.origin().to_owned();

    let (status, why) = tampered(&fake, &sub, |r| {
        r.headers_mut().remove("ttl");
    })
    .await;
    assert_eq!((status, why.contains("TTL")), (400, true), "{why}");

    let (status, why) = tampered(&fake, &sub, |r| set(r, "content-encoding", "aesgcm")).await;
    assert_eq!(
        (status, why.contains("Content-Encoding")),
        (400, true),
        "{why}"
    );

    let (status, why) = tampered(&fake, &sub, |r| {
        *r.body_mut() = Bytes::from(vec![0u8; 4097]);
        set(r, "content-length", "4097");
    })
    .await;
    assert_eq!(status, 413, "{why}");

    let (status, why) = tampered(&fake, &sub, |r| {
        let mut body = r.body().to_vec();
        let last = body.len() - 1;
        body[last] ^= 1;
        *r.body_mut() = body.into();
    })
    .await;
    assert_eq!((status, why.contains("decrypt")), (400, true), "{why}");

    // Signed with another key, but claiming ours.
    let (status, why) = tampered(&fake, &sub, |r| {
        let ours = VapidKey::parse(VAPID_KEY).unwrap().public_key().to_owned();
        let theirs = authorization(
            &other_key,
            json!({ "aud": origin, "exp": now + 3600, "sub": SUBJECT }),
        );
        let forged = format!("{}k={ours}", theirs.split("k=").next().unwrap());
        set(r, "authorization", &forged);
    })
    .await;
    assert_eq!((status, why.contains("signature")), (401, true), "{why}");

    // The origin without its port, as web-push-native would sign it.
    let (status, why) = tampered(&fake, &sub, |r| {
        let portless = origin.rsplit_once(':').unwrap().0;
        let value = authorization(
            VAPID_KEY,
            json!({ "aud": portless, "exp": now + 3600, "sub": SUBJECT }),
        );
        set(r, "authorization", &value);
    })
    .await;
    assert_eq!((status, why.contains("aud")), (401, true), "{why}");

    // Another port.
    let (status, why) = tampered(&fake, &sub, |r| {
        let aud = format!(
            "http://127.0.0.1:{}",
            fake.allow_host()
                .rsplit_once(':')
                .unwrap()
                .1
                .parse::<u16>()
                .unwrap()
                ^ 1
        );
        let value = authorization(
            VAPID_KEY,
            json!({ "aud": aud, "exp": now + 3600, "sub": SUBJECT }),
        );
        set(r, "authorization", &value);
    })
    .await;
    assert_eq!((status, why.contains("aud")), (401, true), "{why}");

    for (exp, what) in [(now - 10, "passed"), (now + 25 * 3600, "24 h")] {
        let (status, why) = tampered(&fake, &sub, |r| {
            let value = authorization(
                VAPID_KEY,
                json!({ "aud": origin, "exp": exp, "sub": SUBJECT }),
            );
            set(r, "authorization", &value);
        })
        .await;
        assert_eq!((status, why.contains(what)), (401, true), "{why}");
    }

    let (status, why) = tampered(&fake, &sub, |r| {
        let value = authorization(
            VAPID_KEY,
            json!({ "aud": origin, "exp": now + 3600, "sub": "ops@example.com" }),
        );
        set(r, "authorization", &value);
    })
    .await;
    assert_eq!((status, why.contains("sub")), (401, true), "{why}");

    let (status, _) = tampered(&fake, &sub, |r| {
        r.headers_mut().remove("authorization");
    })
    .await;
    assert_eq!(status, 401);

    // A subscription made for another key refuses ours.
    let theirs = VapidKey::parse(&other_key).unwrap();
    let bound = fake.subscribe_for(theirs.public_key());
    let (status, why) = tampered(&fake, &bound, |_| {}).await;
    assert_eq!((status, why.contains("k is not")), (403, true), "{why}");

    // Nothing refused was taken for a push; the untouched request passes.
    assert!(fake.received(&sub.id).is_empty());
    let request = provider(&fake)
        .request(&target(&sub), Urgency::High)
        .unwrap();
    let answer = outbound(&fake, Duration::from_secs(5))
        .send(request)
        .await
        .unwrap();
    assert_eq!(answer.status.as_u16(), 201);
    assert_eq!(fake.received(&sub.id).len(), 1);
    let decoded = URL_SAFE_NO_PAD.decode(&sub.p256dh).unwrap();
    assert_eq!(decoded.len(), 65);
}
