//! Issue 24, items 3 and 4: password checks that hash (password change,
//! account and device deletion) limited per account and address, hashing
//! shared fairly, and a stolen token that guesses the password.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::RETRY_AFTER;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::backend_tests;
use crate::common::{
    Account, Api, Backend, OWASP_HASHING, PASSWORD, Reply, TestServer, public_key, session,
};

backend_tests!(
    one_account_cannot_stall_everyone_elses_logins,
    password_checks_are_limited_per_account_from_any_address,
    a_stolen_token_cannot_guess_the_password_by_removing_devices,
    a_stolen_token_cannot_guess_the_password_by_changing_it_or_deleting_the_account,
);

/// The per-address limit of the routes that hash, at its defaults: the
/// harness turns it off, and item 3 is about these routes being under it.
const AUTH_LIMIT_DEFAULTS: [&str; 4] = ["--auth-rate-per-minute", "10", "--auth-rate-burst", "5"];
/// The per-account budget of password checks, at its defaults (the harness
/// turns it off too).
const PASSWORD_LIMIT_DEFAULTS: [&str; 4] = [
    "--password-rate-per-minute",
    "6",
    "--password-rate-burst",
    "3",
];
/// Whom `X-Forwarded-For` is believed from: the tests, which play clients
/// at many addresses.
const TRUST_THE_TESTS: [&str; 2] = ["--trusted-proxies", "127.0.0.1"];

/// The wrong password that ends the session that sends it (the server's
/// `END_SESSION_AFTER`).
const END_SESSION_AFTER: usize = 5;

/// A request as a client at `address`, with `token` if any and a JSON body.
async fn from(
    api: &Api,
    address: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> Reply {
    let mut request = api
        .http
        .request(method, api.url(path))
        .header("x-forwarded-for", address)
        .json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    api.call(request).await
}

/// Registers and logs in `username` as a client at `address`.
async fn account_at(api: &Api, address: &str, username: &str) -> Account {
    let credentials = json!({ "username": username, "password": PASSWORD });
    let mut register = credentials.clone();
    register["public_key"] = json!(public_key());
    let registered = from(api, address, Method::POST, "/v1/register", None, register)
        .await
        .expect(201);
    let tokens = from(api, address, Method::POST, "/v1/login", None, credentials)
        .await
        .expect(200);
    let who = Account {
        id: registered["id"].as_str().unwrap().parse().unwrap(),
        username: username.to_owned(),
        access: String::new(),
        refresh: String::new(),
    };
    session(&who, &tokens)
}

/// The `Retry-After` of a 429 `rate_limited`, in whole seconds (at least 1).
#[track_caller]
fn retry_after(reply: &Reply) -> u64 {
    reply.expect_error(429, "rate_limited");
    let seconds: u64 = reply
        .headers
        .get(RETRY_AFTER)
        .unwrap_or_else(|| panic!("a 429 without Retry-After: {:?}", reply.headers))
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(seconds > 0, "Retry-After: {seconds}");
    seconds
}

/// The reply to `PUT /v1/password` as `who`.
async fn change_password(api: &Api, who: &Account, current: &str, new: &str) -> Reply {
    api.put(
        "/v1/password",
        Some(&who.access),
        json!({ "current_password": current, "new_password": new }),
    )
    .await
}

async fn one_account_cannot_stall_everyone_elses_logins(backend: Backend) {
    // Every limit of the hashing routes at its default.
    let mut flags = vec![];
    flags.extend(AUTH_LIMIT_DEFAULTS);
    flags.extend(PASSWORD_LIMIT_DEFAULTS);
    flags.extend(TRUST_THE_TESTS);
    // Hashes as slow as a real server's, or the queue never fills.
    flags.extend(OWASP_HASHING);
    let server = TestServer::start_with(backend, &flags).await;
    const ATTACKER: &str = "203.0.113.66";
    let mallory = account_at(&server, ATTACKER, "mallory").await;
    let alice = account_at(&server, "198.51.100.1", "alice").await;

    // A free account, from one address, keeps 300 wrong current passwords
    // in flight for a few seconds: before the fix, enough to queue well
    // over 10 s of hashing on a test machine (a hash takes 0.1-0.2 s here,
    // two at a time), so that every other login waited 10 s and got 503.
    // Its own client keeps connections alive, as an attacker's would.
    const IN_FLIGHT: usize = 300;
    const ATTACK: Duration = Duration::from_secs(5);
    let attacker = Api {
        base: server.base.clone(),
        http: reqwest::Client::new(),
    };
    let until = Instant::now() + ATTACK;
    let attack: Vec<_> = (0..IN_FLIGHT)
        .map(|n| {
            let (api, mallory) = (attacker.clone(), mallory.clone());
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while Instant::now() < until {
                    let guess = json!({
                        "current_password": format!("guess number {n}-{}", statuses.len()),
                        "new_password": "mallory's new passphrase",
                    });
                    let reply = from(
                        &api,
                        ATTACKER,
                        Method::PUT,
                        "/v1/password",
                        Some(&mallory.access),
                        guess,
                    )
                    .await;
                    statuses.push(reply.status.as_u16());
                    // Spares the test machine a busy loop of refusals;
                    // against a stalled queue each guess waits seconds,
                    // so the attack stays as deep.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                statuses
            })
        })
        .collect();

    // Meanwhile, once the attack is under way, other users log in, each
    // from its own address, one after the other, for as long as it lasts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut logins = Vec::new();
    let mut n = 0;
    while Instant::now() < until || logins.len() < 5 {
        n += 1;
        let reply = from(
            &server,
            &format!("198.51.100.{}", 10 + n % 200),
            Method::POST,
            "/v1/login",
            None,
            json!({ "username": "alice", "password": PASSWORD }),
        )
        .await;
        logins.push((reply.status.as_u16(), reply.body));
    }
    let mut statuses = Vec::new();
    for task in attack {
        statuses.extend(task.await.unwrap());
    }

    // Every login got through, none waited out the queue into a 503.
    assert!(logins.len() >= 5, "{logins:?}");
    for (status, body) in &logins {
        assert_eq!(*status, 200, "a login during the attack: {body}");
    }
    // The attacker was refused, and only a handful of its guesses were ever
    // hashed: the rest were turned away before costing anyone anything.
    let count = |status: u16| statuses.iter().filter(|s| **s == status).count();
    assert!(count(429) > 0, "never rate limited: {statuses:?}");
    assert!(
        count(403) < END_SESSION_AFTER,
        "{} guesses checked: {statuses:?}",
        count(403)
    );
    assert!(
        statuses.iter().all(|s| matches!(s, 401 | 403 | 429)),
        "{statuses:?}"
    );
    // The victim's account works as ever.
    let me = server.get("/v1/me", Some(&alice.access)).await.expect(200);
    assert_eq!(me["username"], "alice", "{me}");
}

async fn password_checks_are_limited_per_account_from_any_address(backend: Backend) {
    let mut flags = vec![];
    flags.extend(AUTH_LIMIT_DEFAULTS);
    flags.extend(PASSWORD_LIMIT_DEFAULTS);
    flags.extend(TRUST_THE_TESTS);
    let server = TestServer::start_with(backend, &flags).await;
    let mut mallory = account_at(&server, "203.0.113.1", "mallory").await;

    // The right password, set again and again, each time from a fresh
    // address so that no per-address limit applies: two hashes a request.
    // The default burst is three checks.
    for n in 0..3 {
        let tokens = from(
            &server,
            &format!("203.0.113.{}", 10 + n),
            Method::PUT,
            "/v1/password",
            Some(&mallory.access),
            json!({ "current_password": PASSWORD, "new_password": PASSWORD }),
        )
        .await
        .expect(200);
        mallory = session(&mallory, &tokens);
    }
    let refused = from(
        &server,
        "203.0.113.99",
        Method::PUT,
        "/v1/password",
        Some(&mallory.access),
        json!({ "current_password": PASSWORD, "new_password": PASSWORD }),
    )
    .await;
    let wait = retry_after(&refused);
    assert!(wait <= 10, "6 a minute refills one every 10 s, told {wait}");
    // The refusal ended nothing: the session still works.
    server
        .get("/v1/me", Some(&mallory.access))
        .await
        .expect(200);
}

/// Guesses wrong passwords with `guess` (which sends one as `who` and
/// returns the reply) until the session is ended, waiting out each lockout
/// as told; returns how many were refused as wrong (403) before, and how
/// many lockouts (429) were met.
async fn guess_until_the_session_ends(mut guess: impl AsyncFnMut(&str) -> Reply) -> (usize, usize) {
    let (mut wrong, mut locked) = (0, 0);
    for n in 0..100 {
        let reply = guess(&format!("wrong guess number {n}")).await;
        match reply.status.as_u16() {
            403 => {
                reply.expect_error(403, "forbidden");
                wrong += 1;
            }
            429 => {
                locked += 1;
                let wait = retry_after(&reply);
                assert!(wait <= 8, "a lockout of {wait} s before the session ended");
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            401 => {
                reply.expect_error(401, "unauthorized");
                return (wrong, locked);
            }
            _ => panic!(
                "unexpected reply to a guess: {:?} {:?}",
                reply.status, reply.body
            ),
        }
    }
    panic!("100 guesses and the session still stands ({wrong} refused as wrong)");
}

/// Asserts that `who`'s session is over: its access and refresh tokens are
/// refused.
async fn assert_session_ended(api: &Api, who: &Account) {
    api.get("/v1/me", Some(&who.access))
        .await
        .expect_error(401, "unauthorized");
    api.refresh(&who.refresh)
        .await
        .expect_error(401, "unauthorized");
}

async fn a_stolen_token_cannot_guess_the_password_by_removing_devices(backend: Backend) {
    // The lockout and the end of the session are always on; the budgets
    // stay off (the harness's default), so that only they answer here.
    let server = TestServer::start(backend).await;
    let alice = server.account("alice").await;
    let bob = server.account("bob").await;
    let (laptop_id, laptop) = server.add_device(&bob, &public_key()).await;
    assert_eq!(laptop_id, 2);
    // A thief has bob's phone's access token (device 1).
    let thief = bob.clone();
    let remove = async |device: u32, password: &str| {
        server
            .delete(
                &format!("/v1/devices/{device}"),
                Some(&thief.access),
                json!({ "password": password }),
            )
            .await
    };

    // A device that is not there answers 404 whatever the password, at
    // once and as often as asked: no password is checked, so the answer
    // tells nothing about it, and no guess counts.
    for n in 0..20 {
        remove(7, &format!("wrong guess {n}"))
            .await
            .expect_error(404, "not_found");
    }
    remove(7, PASSWORD).await.expect_error(404, "not_found");
    // Not another account's device either.
    server
        .delete(
            "/v1/devices/2",
            Some(&alice.access),
            json!({ "password": PASSWORD }),
        )
        .await
        .expect_error(404, "not_found");

    // On a device that is there, guesses meet growing lockouts, and the
    // fifth wrong password ends the session.
    let (wrong, locked) = guess_until_the_session_ends(async |guess| remove(2, guess).await).await;
    assert_eq!(
        wrong,
        END_SESSION_AFTER - 1,
        "refused as wrong before the end"
    );
    assert!(locked > 0, "guessed without a lockout");
    assert_session_ended(&server, &thief).await;
    // The right password does not get through from that session.
    remove(2, PASSWORD).await.expect_error(401, "unauthorized");

    // Nothing was removed, and bob's other session stands.
    assert_eq!(server.device_ids(&alice, bob.id).await, [1, 2]);
    let me = server.get("/v1/me", Some(&laptop.access)).await.expect(200);
    assert_eq!(me["device_id"], 2, "{me}");
}

async fn a_stolen_token_cannot_guess_the_password_by_changing_it_or_deleting_the_account(
    backend: Backend,
) {
    let server = TestServer::start(backend).await;
    let carol = server.account("carol").await;
    let dave = server.account("dave").await;
    let api: &Api = &server;

    // Two thieves at once, one per route, each with a stolen token.
    let changing = async {
        let (wrong, locked) = guess_until_the_session_ends(async |guess| {
            change_password(api, &carol, guess, "the thief's passphrase").await
        })
        .await;
        assert_eq!(wrong, END_SESSION_AFTER - 1, "password change");
        assert!(locked > 0, "guessed the password change without a lockout");
        assert_session_ended(api, &carol).await;
        change_password(api, &carol, PASSWORD, "the thief's passphrase")
            .await
            .expect_error(401, "unauthorized");
    };
    let deleting = async {
        let delete = async |password: &str| {
            api.delete(
                "/v1/me",
                Some(&dave.access),
                json!({ "password": password }),
            )
            .await
        };
        let (wrong, locked) = guess_until_the_session_ends(async |guess| delete(guess).await).await;
        assert_eq!(wrong, END_SESSION_AFTER - 1, "account deletion");
        assert!(locked > 0, "guessed the account deletion without a lockout");
        assert_session_ended(api, &dave).await;
        delete(PASSWORD).await.expect_error(401, "unauthorized");
    };
    tokio::join!(changing, deleting);

    // Both accounts stand, with their passwords unchanged.
    for name in ["carol", "dave"] {
        let tokens = server.login(name).await;
        let who = session(if name == "carol" { &carol } else { &dave }, &tokens);
        let me = server.get("/v1/me", Some(&who.access)).await.expect(200);
        assert_eq!(me["username"], name, "{me}");
    }
}
