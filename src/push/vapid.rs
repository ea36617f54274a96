//! VAPID (RFC 8292): who we are to a Web Push service. Every push carries
//! `Authorization: vapid t=<JWT>, k=<public key>`; the service checks the
//! JWT's ES256 signature with `k`, and that `k` is the key the browser
//! subscribed with (its `applicationServerKey`, which clients read from
//! `GET /v1/push/vapid`). So the key must outlive every subscription made
//! with it: configured (`SEALPOST_VAPID_KEY` or `_FILE`), or generated once
//! and kept beside an SQLite database like the JWT secret
//! ([`crate::keyfile`]); with PostgreSQL it is required, as every node must
//! sign with the same key.
//!
//! The JWT says `aud` (the endpoint's origin, with its port when not the
//! scheme's default: services compare it with their own origin), `exp`
//! (at most 24 h ahead; we use 12 h) and `sub` (`SEALPOST_VAPID_SUBJECT`,
//! a `mailto:` or `https:` contact: Apple refuses a push without one). One
//! token per audience is cached and renewed before it expires, so a burst
//! of wake-ups to one service signs once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::SecretKey;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use serde::Serialize;

use super::config::PushConfig;
use crate::keyfile::{self, Kind};

const KIND: Kind = Kind {
    setting: "SEALPOST_VAPID_KEY",
    suffix: ".vapid-key",
    hint: "Web Push is on because SEALPOST_VAPID_SUBJECT is set: give every node the same \
           P-256 key as PKCS#8 PEM in SEALPOST_VAPID_KEY or SEALPOST_VAPID_KEY_FILE, e.g. from \
           `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`",
    ephemeral: "browsers' subscriptions will not survive a restart",
};

/// How long a token is valid: RFC 8292 allows at most 24 h; half of that
/// leaves room for a push service whose clock is ahead of ours.
const LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// A cached token is replaced once less than this is left of it, so none
/// is sent close to its expiry (a retry may go out minutes later, and the
/// service's clock may differ from ours).
const RENEW_BEFORE: Duration = Duration::from_secs(6 * 3600);

/// At most this many audiences' tokens are cached. Browsers' push services
/// are a handful of origins, but UnifiedPush distributors are self-hosted,
/// one origin each, and clients choose them: past the bound, expired
/// tokens are dropped, then all of them (signing again costs tens of
/// microseconds, so a full cache only costs that). Small in unit tests,
/// where unoptimised signing is slow.
const MAX_AUDIENCES: usize = if cfg!(test) { 32 } else { 1024 };

/// The VAPID private key and its public point. `Debug` shows the public
/// key only.
#[derive(Clone)]
pub struct VapidKey {
    signing: EncodingKey,
    /// The uncompressed P-256 point (65 bytes), base64url without padding:
    /// `k=` and the browser's `applicationServerKey`.
    public: String,
}

impl VapidKey {
    /// A P-256 private key as PKCS#8 PEM (`BEGIN PRIVATE KEY`), or as SEC1
    /// PEM (`BEGIN EC PRIVATE KEY`, what `openssl ecparam -genkey` prints).
    /// The error never quotes the key.
    pub fn parse(pem: &str) -> Result<Self, String> {
        let pem = pem.trim();
        let secret = SecretKey::from_pkcs8_pem(pem)
            .or_else(|_| SecretKey::from_sec1_pem(pem))
            .map_err(|_| {
                "is not a P-256 private key in PEM (PKCS#8 `BEGIN PRIVATE KEY` or SEC1 \
                 `BEGIN EC PRIVATE KEY`)"
                    .to_owned()
            })?;
        Self::from_secret(&secret)
    }

    fn from_secret(secret: &SecretKey) -> Result<Self, String> {
        let der = secret
            .to_pkcs8_der()
            .map_err(|_| "cannot encode the key as PKCS#8".to_owned())?;
        let point = secret.public_key().to_encoded_point(false);
        Ok(Self {
            signing: EncodingKey::from_ec_der(der.as_bytes()),
            public: URL_SAFE_NO_PAD.encode(point.as_bytes()),
        })
    }

    /// A new random key, as PKCS#8 PEM.
    pub fn generate_pem() -> String {
        let secret = loop {
            // A random 32-byte string is a valid scalar unless it is zero
            // or above the group order: about once in 2^32 tries.
            let bytes: [u8; 32] = rand::random();
            if let Ok(secret) = SecretKey::from_bytes(&bytes.into()) {
                break secret;
            }
        };
        secret
            .to_pkcs8_pem(LineEnding::LF)
            .expect("a P-256 key always encodes as PKCS#8")
            .to_string()
    }

    /// The public key, base64url of the uncompressed point.
    pub fn public_key(&self) -> &str {
        &self.public
    }
}

impl std::fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VapidKey(public {})", self.public)
    }
}

/// Checks `SEALPOST_VAPID_SUBJECT`: a `mailto:` address or an `https:`
/// URL, the only contacts RFC 8292 allows (Apple's service answers
/// `BadJwtToken` to anything else).
pub fn check_subject(subject: &str) -> Result<(), String> {
    let lower = subject.to_ascii_lowercase();
    let ok = if let Some(address) = lower.strip_prefix("mailto:") {
        match address.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !address.contains(|c: char| c.is_whitespace() || c.is_control())
            }
            None => false,
        }
    } else if lower.starts_with("https:") {
        http::Uri::try_from(subject)
            .ok()
            .is_some_and(|uri| uri.host().is_some_and(|h| !h.is_empty()))
    } else {
        false
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{subject:?} is not a mailto: or https: URI (e.g. mailto:ops@example.com or \
             https://example.com/contact); push services refuse pushes without one"
        ))
    }
}

/// The VAPID key for `push`: configured, or (SQLite) read from or
/// generated into `<database>.vapid-key`; refused with PostgreSQL. Errors
/// name the setting, by variable and flag.
pub fn resolve(push: &PushConfig, database_url: &str) -> anyhow::Result<VapidKey> {
    if let Some(key) = &push.vapid_key {
        return VapidKey::parse(key.as_str())
            .map_err(|e| anyhow!("{}: {e}", crate::config::both_names("SEALPOST_VAPID_KEY")));
    }
    if let Some(path) = &push.vapid_key_file {
        let setting = crate::config::both_names("SEALPOST_VAPID_KEY_FILE");
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{setting}: reading {}", path.display()))?;
        keyfile::warn_if_shared(path, "the VAPID key file");
        return VapidKey::parse(&text).map_err(|e| anyhow!("{setting}: {}: {e}", path.display()));
    }
    keyfile::resolve(&KIND, database_url, VapidKey::generate_pem, VapidKey::parse)
}

/// What [`resolve`] would do, without creating anything (`sealpost
/// check-config`): where the key comes from and its public half, or why
/// start-up would fail. Never shows the private key.
pub fn check(push: &PushConfig, database_url: &str) -> Result<String, String> {
    let Some(subject) = &push.vapid_subject else {
        return Ok("off (SEALPOST_VAPID_SUBJECT is not set)".into());
    };
    check_subject(subject).map_err(|e| format!("SEALPOST_VAPID_SUBJECT: {e}"))?;
    let with_public =
        |source: &str, key: VapidKey| format!("on; key {source}, public key {}", key.public_key());
    if let Some(key) = &push.vapid_key {
        return VapidKey::parse(key.as_str())
            .map(|k| with_public("set", k))
            .map_err(|e| format!("SEALPOST_VAPID_KEY {e}"));
    }
    if let Some(path) = &push.vapid_key_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("SEALPOST_VAPID_KEY_FILE: reading {}: {e}", path.display()))?;
        return VapidKey::parse(&text)
            .map(|k| with_public(&format!("from {}", path.display()), k))
            .map_err(|e| format!("SEALPOST_VAPID_KEY_FILE: {} {e}", path.display()));
    }
    keyfile::check(&KIND, database_url, VapidKey::parse).map(|how| format!("on; key {how}"))
}

/// The `aud` of a push to `endpoint`: its origin, `scheme://host`, with
/// `:port` unless the port is the scheme's default (RFC 6454
/// serialisation, which push services compare with their own).
pub fn audience(endpoint: &http::Uri) -> Result<String, String> {
    let scheme = endpoint.scheme_str().ok_or("the endpoint has no scheme")?;
    let default_port = match scheme {
        "https" => 443,
        "http" => 80,
        _ => return Err("the endpoint is neither https nor http".into()),
    };
    let host = endpoint
        .host()
        .filter(|h| !h.is_empty())
        .ok_or("the endpoint has no host")?
        .to_ascii_lowercase();
    Ok(match endpoint.port_u16() {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    exp: u64,
    sub: &'a str,
}

/// A signed token, kept per audience.
struct Token {
    /// The whole `Authorization` value.
    header: Arc<str>,
    /// Its `exp`, in seconds since the epoch.
    expires: u64,
}

/// Signs the `Authorization` header of pushes, caching a token per
/// audience.
pub struct Vapid {
    key: VapidKey,
    subject: String,
    /// Audience → its current token. Held only to look up or insert,
    /// never across an `.await` or a signature. Bounded by
    /// [`MAX_AUDIENCES`].
    tokens: Mutex<HashMap<String, Token>>,
}

impl Vapid {
    /// `subject` must have passed [`check_subject`].
    pub fn new(key: VapidKey, subject: String) -> Self {
        Self {
            key,
            subject,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    pub fn public_key(&self) -> &str {
        self.key.public_key()
    }

    /// `vapid t=<JWT>, k=<public key>` for a push to `endpoint`.
    pub fn authorization(&self, endpoint: &http::Uri) -> Result<Arc<str>, String> {
        self.authorization_at(endpoint, SystemTime::now())
    }

    fn authorization_at(&self, endpoint: &http::Uri, now: SystemTime) -> Result<Arc<str>, String> {
        let aud = audience(endpoint)?;
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970")?
            .as_secs();
        let fresh = |t: &Token| t.expires > now + RENEW_BEFORE.as_secs();
        if let Some(token) = self.lock().get(&aud).filter(|t| fresh(t)) {
            return Ok(token.header.clone());
        }
        let expires = now + LIFETIME.as_secs();
        let claims = Claims {
            aud: &aud,
            exp: expires,
            sub: &self.subject,
        };
        let jwt = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims, &self.key.signing)
            .map_err(|e| format!("cannot sign the VAPID token: {e}"))?;
        let header: Arc<str> = format!("vapid t={jwt}, k={}", self.key.public).into();
        let mut tokens = self.lock();
        if tokens.len() >= MAX_AUDIENCES && !tokens.contains_key(&aud) {
            tokens.retain(|_, t| fresh(t));
            if tokens.len() >= MAX_AUDIENCES {
                tokens.clear();
            }
        }
        tokens.insert(
            aud,
            Token {
                header: header.clone(),
                expires,
            },
        );
        Ok(header)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Token>> {
        // A panic while holding it cannot leave a map of tokens half
        // written in a way that matters: use it as it is.
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    /// The claims of a `vapid t=..., k=...` value, after checking its
    /// signature with `k`.
    fn verified(header: &str) -> serde_json::Value {
        use p256::ecdsa::signature::Verifier;
        let rest = header.strip_prefix("vapid t=").unwrap();
        let (jwt, k) = rest.split_once(", k=").unwrap();
        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(k).unwrap())
            .unwrap();
        let (signed, signature) = jwt.rsplit_once('.').unwrap();
        let signature =
            p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap())
                .unwrap();
        key.verify(signed.as_bytes(), &signature).unwrap();
        let (head, claims) = signed.split_once('.').unwrap();
        let head: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(head).unwrap()).unwrap();
        assert_eq!(head["alg"], "ES256");
        assert_eq!(head["typ"], "JWT");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap()
    }

    fn vapid() -> Vapid {
        let key = VapidKey::parse(&VapidKey::generate_pem()).unwrap();
        Vapid::new(key, "mailto:ops@example.com".into())
    }

    #[test]
    fn the_audience_is_the_origin_with_a_port_that_is_not_the_default() {
        let cases = [
            ("https://push.example.com/x/y?z", "https://push.example.com"),
            ("https://push.example.com:443/x", "https://push.example.com"),
            (
                "https://push.example.com:8443/x",
                "https://push.example.com:8443",
            ),
            ("http://127.0.0.1:41234/push/1", "http://127.0.0.1:41234"),
            ("http://127.0.0.1:80/push/1", "http://127.0.0.1"),
            ("HTTPS://Push.Example.COM/x", "https://push.example.com"),
            ("https://[::1]:9000/x", "https://[::1]:9000"),
        ];
        for (endpoint, aud) in cases {
            assert_eq!(audience(&uri(endpoint)).unwrap(), aud, "{endpoint}");
        }
        assert!(audience(&uri("/relative")).is_err());
        assert!(audience(&uri("ftp://x.example/")).is_err());
    }

    #[test]
    fn a_token_is_signed_with_k_and_says_aud_exp_and_sub() {
        let vapid = vapid();
        let now = SystemTime::now();
        let header = vapid
            .authorization_at(&uri("https://push.example.com:8443/abc"), now)
            .unwrap();
        assert!(
            header.ends_with(&format!(", k={}", vapid.public_key())),
            "{header}"
        );
        let claims = verified(&header);
        let now = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(claims["aud"], "https://push.example.com:8443");
        assert_eq!(claims["sub"], "mailto:ops@example.com");
        let exp = claims["exp"].as_u64().unwrap();
        assert!(exp > now && exp <= now + 24 * 3600, "exp {exp}, now {now}");
        assert_eq!(
            URL_SAFE_NO_PAD.decode(vapid.public_key()).unwrap().len(),
            65
        );
    }

    #[test]
    fn tokens_are_cached_per_audience_and_renewed_before_they_expire() {
        let vapid = vapid();
        let t0 = SystemTime::now();
        let a = uri("https://a.example/1");
        let first = vapid.authorization_at(&a, t0).unwrap();
        // Another endpoint of the same service shares the token.
        let again =
            vapid.authorization_at(&uri("https://a.example/2"), t0 + Duration::from_secs(60));
        assert!(Arc::ptr_eq(&first, &again.unwrap()));
        // Another service gets its own.
        let other = vapid
            .authorization_at(&uri("https://b.example/1"), t0)
            .unwrap();
        assert_eq!(verified(&other)["aud"], "https://b.example");
        // Near its expiry, a new one: still valid long after the old one
        // has expired.
        let later = t0 + LIFETIME - RENEW_BEFORE + Duration::from_secs(1);
        let renewed = vapid.authorization_at(&a, later).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        let exp = verified(&renewed)["exp"].as_u64().unwrap();
        let old_exp = verified(&first)["exp"].as_u64().unwrap();
        assert!(exp > old_exp, "{exp} <= {old_exp}");
    }

    #[test]
    fn the_cache_is_bounded() {
        let vapid = vapid();
        let now = SystemTime::now();
        for i in 0..MAX_AUDIENCES + 10 {
            vapid
                .authorization_at(&uri(&format!("https://h{i}.example/")), now)
                .unwrap();
            assert!(vapid.lock().len() <= MAX_AUDIENCES);
        }
        // The newest is cached whatever was dropped.
        let last = format!("https://h{}.example", MAX_AUDIENCES + 9);
        assert!(vapid.lock().contains_key(&last));
    }

    #[test]
    fn subjects_must_be_mailto_or_https() {
        for good in [
            "mailto:ops@example.com",
            "MAILTO:ops@example.com",
            "https://example.com/contact",
        ] {
            check_subject(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            "ops@example.com",
            "mailto:",
            "mailto:ops",
            "mailto:@example.com",
            "mailto:ops @example.com",
            "http://example.com",
            "https://",
            "example.com",
        ] {
            assert!(check_subject(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn keys_parse_from_pkcs8_and_sec1_pem_and_errors_quote_nothing() {
        let pem = VapidKey::generate_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        let key = VapidKey::parse(&pem).unwrap();
        let secret = SecretKey::from_pkcs8_pem(&pem).unwrap();
        let sec1 = secret.to_sec1_pem(LineEnding::LF).unwrap();
        assert_eq!(
            VapidKey::parse(&sec1).unwrap().public_key(),
            key.public_key()
        );
        assert!(!format!("{key:?}").contains(pem.lines().nth(1).unwrap()));

        let garbage = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END PRIVATE KEY-----";
        let err = VapidKey::parse(garbage).unwrap_err();
        assert!(!err.contains("c2VjcmV0"), "{err}");
    }

    fn push_config(args: &[&str]) -> PushConfig {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            push: PushConfig,
        }
        let mut argv = vec!["sealpost"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().push
    }

    #[test]
    fn a_key_is_generated_beside_sqlite_kept_and_refused_with_postgres() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("x.db").display());
        let config = push_config(&["--vapid-subject", "mailto:a@example.com"]);
        let first = resolve(&config, &url).unwrap();
        let second = resolve(&config, &url).unwrap();
        assert_eq!(first.public_key(), second.public_key());
        let kept = dir.path().join("x.db.vapid-key");
        assert!(
            std::fs::read_to_string(&kept)
                .unwrap()
                .contains("BEGIN PRIVATE KEY")
        );
        assert!(check(&config, &url).unwrap().contains("kept in"));

        let err = resolve(&config, "postgres://localhost/x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("SEALPOST_VAPID_KEY"), "{err}");
        assert!(err.contains("--vapid-key"), "{err}");
        assert!(err.contains("SEALPOST_VAPID_KEY_FILE"), "{err}");

        // A file, as given: the same key on every node.
        let file = dir.path().join("vapid.pem");
        std::fs::write(&file, VapidKey::generate_pem()).unwrap();
        let from_file = push_config(&[
            "--vapid-subject",
            "mailto:a@example.com",
            "--vapid-key-file",
            file.to_str().unwrap(),
        ]);
        let a = resolve(&from_file, "postgres://localhost/x").unwrap();
        let b = resolve(&from_file, &url).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_ne!(a.public_key(), first.public_key());
    }
}
