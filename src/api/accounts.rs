//! Accounts and sessions: sign-up, login, token refresh, logout, password
//! change, account deletion and the caller's own profile.
//!
//! Sign-up, login and refresh sit behind the per-IP auth rate limit, and so
//! do password change and account deletion, which hash the current
//! password; those two also follow [`crate::auth::confirm`]'s rules.

use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::routing::{delete, get, post, put};
use axum::{Form, Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::keys::parse_public_key;
use super::{ApiJson, body};
use crate::auth::AuthUser;
use crate::auth::confirm::Verdict;
use crate::auth::password::Caller;
use crate::auth::sessions::Scope;
use crate::auth::token::{Tokens, hash_refresh};
use crate::devices::ChangeReason;
use crate::error::{Error, Result};
use crate::limits::client_ip::ClientKey;
use crate::limits::rate::AuthLimit;
use crate::metrics::{AuthFailure, Limited};
use crate::state::AppState;
use crate::store::{
    self, Device, DeviceId, NewSession, RefreshToken, Rotation, SessionStart, User, Verified,
};

pub fn router(auth_limit: Option<AuthLimit>) -> Router<AppState> {
    // Every route that hashes a password.
    let mut hashing = Router::new()
        .route("/v1/register", post(register))
        .route("/v1/login", post(login))
        .route("/v1/token/refresh", post(refresh))
        .route("/v1/me", delete(delete_me))
        // Two passwords: a larger body than the other routes take.
        .route(
            "/v1/password",
            put(change_password).layer(body::limit(body::LIST)),
        );
    if let Some(limit) = auth_limit {
        hashing = hashing.layer(limit.layer);
    }
    Router::new()
        .merge(hashing)
        .route("/v1/me", get(me))
        .route("/v1/logout", post(logout))
        .route("/v1/logout-all", post(logout_all))
}

const USERNAME_LEN: std::ops::RangeInclusive<usize> = 3..=32;
/// At least what NIST SP 800-63B asks; at most enough for any passphrase,
/// and a bound on what one hash has to chew.
const PASSWORD_LEN: std::ops::RangeInclusive<usize> = 8..=1024;

/// Whether `username` could name an account. Only such names ever reach a
/// query: databases disagree on what else letter case means (PostgreSQL's
/// `lower()` folds the Kelvin sign 'K' to 'k'; SQLite's NOCASE does not) and
/// PostgreSQL refuses NUL bytes outright.
pub fn is_username(username: &str) -> bool {
    validate_username(username).is_ok()
}

fn validate_username(username: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if !USERNAME_LEN.contains(&username.len()) || !username.chars().all(allowed) {
        return Err(Error::field(
            "username",
            "must be 3-32 characters of A-Z, a-z, 0-9, '_', '.' and '-'",
        ));
    }
    Ok(())
}

fn validate_password(password: &str) -> Result<()> {
    if !PASSWORD_LEN.contains(&password.chars().count()) {
        return Err(Error::field("password", "must be 8-1024 characters"));
    }
    Ok(())
}

#[derive(Deserialize, ToSchema)]
struct Register {
    #[schema(min_length = 3, max_length = 32, pattern = "^[A-Za-z0-9_.-]+$")]
    username: String,
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
    #[schema(format = Byte, min_length = 44, max_length = 2732)]
    public_key: String,
}

/// The caller's own account, as seen from one of its devices.
#[derive(Serialize, ToSchema)]
struct Profile {
    id: Uuid,
    username: String,
    /// The key of the device this profile is seen from.
    public_key: String,
    #[serde(serialize_with = "crate::wire::timestamp")]
    created_at: DateTime<Utc>,
    device_id: DeviceId,
}

impl Profile {
    fn of(user: User, device: &Device) -> Self {
        Self {
            id: user.id,
            public_key: STANDARD.encode(&device.public_key),
            username: user.username,
            created_at: user.created_at,
            device_id: device.id,
        }
    }
}

/// A new account: its profile, as `GET /v1/me` shows it from device 1,
/// and the token pair of device 1's first session, so that signing up
/// costs one password hash and one auth-limit token, not a login more.
#[derive(Serialize, ToSchema)]
struct Registered {
    id: Uuid,
    username: String,
    /// Device 1's key, as registered.
    public_key: String,
    #[serde(serialize_with = "crate::wire::timestamp")]
    created_at: DateTime<Utc>,
    /// Always 1.
    device_id: DeviceId,
    /// The same as `id`, as every token pair says it.
    user_id: Uuid,
    access_token: String,
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
    refresh_token: String,
}

#[utoipa::path(post, path = "/v1/register", tag = "accounts", request_body = Register,
    responses((status = 201, description = "The account, with its first device (device 1) and a token pair for a session of it.", body = Registered), crate::api::openapi::Errors))]
async fn register(
    State(state): State<AppState>,
    ClientKey(client): ClientKey,
    ApiJson(request): ApiJson<Register>,
) -> Result<(StatusCode, Json<Registered>)> {
    validate_username(&request.username)?;
    validate_password(&request.password)?;
    let public_key = parse_public_key(&request.public_key)?;
    // Cheap check first so a taken name (or a look-alike of one) does not
    // cost a hash; the unique indexes still decide a race.
    if state.store.name_taken(&request.username).await? {
        return Err(Error::Conflict("username is taken"));
    }
    let password_hash = state
        .passwords
        .hash(Caller::Address(client), request.password)
        .await?;
    let now = store::now();
    let user = User {
        id: Uuid::new_v4(),
        username: request.username,
        created_at: now,
    };
    let device = Device {
        id: 1,
        public_key,
        key_updated_at: now,
        name: None,
        created_at: now,
        last_seen_at: now,
    };
    // The account and its first session in one transaction, as adding a
    // device does.
    let refresh = Tokens::new_refresh();
    let session = NewSession {
        hash: refresh.hash,
        family_id: Uuid::new_v4(),
        expires_at: store::add(now, state.tokens.refresh_ttl),
    };
    state
        .store
        .create_user(&user, &password_hash, &device, &session)
        .await?;
    tracing::info!(user.id = %user.id, "registered");
    let pair = token_pair(&state, user.id, device.id, session.family_id, refresh.token)?;
    let Profile {
        id,
        username,
        public_key,
        created_at,
        device_id,
    } = Profile::of(user, &device);
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            id,
            username,
            public_key,
            created_at,
            device_id,
            user_id: pair.user_id,
            access_token: pair.access_token,
            token_type: pair.token_type,
            expires_in: pair.expires_in,
            refresh_token: pair.refresh_token,
        }),
    ))
}

#[derive(Deserialize, ToSchema)]
struct Login {
    #[schema(min_length = 3, max_length = 32, pattern = "^[A-Za-z0-9_.-]+$")]
    username: String,
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
    /// The device to sign in as; device 1 when absent, as before devices.
    /// Wide enough that any number parses and a bad one gets a 422 naming
    /// the field.
    #[schema(minimum = 1, maximum = 2147483647)]
    device_id: Option<i64>,
}

/// The OAuth2 resource-owner password form (RFC 6749 §4.3.2).
#[derive(Deserialize, ToSchema)]
struct PasswordGrant {
    #[schema(pattern = "^password$")]
    grant_type: String,
    #[schema(min_length = 3, max_length = 32, pattern = "^[A-Za-z0-9_.-]+$")]
    username: String,
    #[schema(min_length = 8, max_length = 1024)]
    password: String,
    device_id: Option<i64>,
}

/// A `device_id` field: 1 to the largest id a device can have.
pub(super) fn device_field(value: i64) -> Result<DeviceId> {
    u32::try_from(value)
        .ok()
        .filter(|id| (1..=store::MAX_DEVICE_ID).contains(id))
        .ok_or_else(|| Error::field("device_id", "must be a device number, 1 or more"))
}

/// A login request as JSON or as the OAuth2 password form.
struct LoginRequest(Login);

impl FromRequest<AppState> for LoginRequest {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self> {
        let is_form = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.get(..33)
                    .is_some_and(|t| t.eq_ignore_ascii_case("application/x-www-form-urlencoded"))
            });
        if is_form {
            body::check(&req)?;
            let read = Form::<PasswordGrant>::from_request(req, state);
            let Form(grant) = body::within(state.config.body_read_timeout, read).await?;
            if grant.grant_type != "password" {
                return Err(Error::field("grant_type", "must be \"password\""));
            }
            Ok(Self(Login {
                username: grant.username,
                password: grant.password,
                device_id: grant.device_id,
            }))
        } else {
            let ApiJson(login) = ApiJson::<Login>::from_request(req, state).await?;
            Ok(Self(login))
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(super) struct TokenPair {
    access_token: String,
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
    refresh_token: String,
    /// The account the session belongs to.
    user_id: Uuid,
    /// The device the session belongs to.
    device_id: DeviceId,
}

/// One generic answer for an unknown user and a wrong password.
pub(super) const BAD_LOGIN: Error = Error::Unauthorized("invalid username or password");

#[utoipa::path(post, path = "/v1/login", tag = "accounts",
    request_body(content((Login = "application/json"), (PasswordGrant = "application/x-www-form-urlencoded"))),
    responses((status = 200, description = "A token pair for a session of the device.", body = TokenPair), crate::api::openapi::Errors))]
async fn login(
    State(state): State<AppState>,
    ClientKey(client): ClientKey,
    LoginRequest(login): LoginRequest,
) -> Result<Json<TokenPair>> {
    let device = login.device_id.map(device_field).transpose()?.unwrap_or(1);
    let caller = Caller::Address(client);
    let account = check_credentials(&state, caller, &login.username, login.password).await?;
    let pair = start_session(&state, account, device).await?;
    tracing::info!(user.id = %account.user_id, device, "logged in");
    // A password holder can open a session of any device: the account's
    // other devices are told, so that a take-over is seen.
    let devices = super::devices::device_list(&state, account.user_id).await;
    state
        .delivery
        .device_updated(account.user_id, device, ChangeReason::Login, devices);
    Ok(Json(pair))
}

/// The account a username and password open, with the version of the
/// credentials checked, refused alike for an unknown name and a wrong
/// password; for a disabled account, refused only once the password is
/// right. The hash queues as `caller`'s.
pub(super) async fn check_credentials(
    state: &AppState,
    caller: Caller,
    username: &str,
    password: String,
) -> Result<Verified> {
    // A name no account can have, or a password too long to be one, cannot
    // match: refuse before it costs a query or a hash.
    if !is_username(username) || password.len() > 4 * *PASSWORD_LEN.end() {
        state.metrics.auth_failed(AuthFailure::Credentials);
        return Err(BAD_LOGIN);
    }
    let credentials = state.store.credentials(username).await?;
    let account = credentials
        .as_ref()
        .map(|c| (c.user_id, c.disabled, c.version));
    let verified = state
        .passwords
        .verify(caller, password, credentials.map(|c| c.password_hash))
        .await?;
    let Some((user_id, disabled, version)) = account.filter(|_| verified) else {
        tracing::info!("login refused");
        state.metrics.auth_failed(AuthFailure::Credentials);
        return Err(BAD_LOGIN);
    };
    // Said only to the holder of the right password, so that a guesser
    // cannot tell which accounts are disabled.
    if disabled {
        tracing::info!(user.id = %user_id, "login refused: the account is disabled");
        return Err(DISABLED);
    }
    Ok(Verified {
        user_id,
        credentials: version,
    })
}

/// The answer to a correct password for an account an operator disabled.
pub(super) const DISABLED: Error = Error::Forbidden("this account has been disabled");

/// Opens a new session (refresh-token family) for the `account`'s `device`,
/// unless the account was disabled or deleted, the device removed (or never
/// added), or the password changed, since its password was checked.
pub(super) async fn start_session(
    state: &AppState,
    account: Verified,
    device: DeviceId,
) -> Result<TokenPair> {
    let now = store::now();
    let refresh = Tokens::new_refresh();
    let family_id = Uuid::new_v4();
    let user_id = account.user_id;
    let started = state
        .store
        .insert_refresh_token(
            &RefreshToken {
                hash: refresh.hash,
                user_id,
                device,
                family_id,
                expires_at: store::add(now, state.tokens.refresh_ttl),
            },
            account.credentials,
        )
        .await?;
    match started {
        SessionStart::Started => {}
        SessionStart::NoAccount => return Err(Error::Unauthorized("account no longer exists")),
        SessionStart::NoDevice => return Err(Error::NotFound("device")),
        SessionStart::Disabled => return Err(DISABLED),
        // What the same password gets from now on.
        SessionStart::Stale => return Err(BAD_LOGIN),
    }
    token_pair(state, user_id, device, family_id, refresh.token)
}

pub(super) fn token_pair(
    state: &AppState,
    user_id: Uuid,
    device: DeviceId,
    session: Uuid,
    refresh_token: String,
) -> Result<TokenPair> {
    Ok(TokenPair {
        access_token: state
            .tokens
            .issue_access(user_id, device, session, Utc::now())?,
        token_type: "bearer",
        expires_in: state.tokens.access_ttl.as_secs(),
        refresh_token,
        user_id,
        device_id: device,
    })
}

#[derive(Deserialize, ToSchema)]
struct Refresh {
    refresh_token: String,
}

/// Trades a refresh token for a new pair. The token just replaced is good
/// once more, and again, within `SEALPOST_REFRESH_GRACE` of its rotation
/// while its replacement is unused: answered with that same replacement,
/// for a client that lost the answer (see [`Tokens::successor`]).
#[utoipa::path(post, path = "/v1/token/refresh", tag = "accounts", request_body = Refresh,
    responses((status = 200, description = "A new token pair; the presented refresh token is spent. Presented again within the refresh grace, before the new one is used: the same pair.", body = TokenPair), crate::api::openapi::Errors))]
async fn refresh(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<Refresh>,
) -> Result<Json<TokenPair>> {
    let now = store::now();
    let next = state.tokens.successor(&request.refresh_token);
    let grace = state.config.refresh_grace;
    let grace_from = (!grace.is_zero()).then(|| store::sub(now, grace));
    let rotation = state
        .store
        .rotate_refresh_token(
            &hash_refresh(&request.refresh_token),
            &next.hash,
            store::add(now, state.tokens.refresh_ttl),
            grace_from,
            now,
        )
        .await?;
    match rotation {
        Rotation::Rotated {
            user_id,
            device,
            family_id,
        } => Ok(Json(token_pair(
            &state, user_id, device, family_id, next.token,
        )?)),
        Rotation::Replayed {
            user_id,
            device,
            family_id,
        } => {
            tracing::info!(user.id = %user_id, device, "refresh token presented again within the grace: the same pair");
            Ok(Json(token_pair(
                &state, user_id, device, family_id, next.token,
            )?))
        }
        Rotation::Reused { user_id, revoked } => {
            tracing::warn!(user.id = %user_id, "refresh token reused: revoking every session of the user");
            state.metrics.auth_failed(AuthFailure::RefreshReuse);
            state
                .revocations
                .revoked_elsewhere(&state.hub, user_id, Scope::All, &revoked);
            Err(Error::Unauthorized("invalid refresh token"))
        }
        Rotation::Invalid => {
            state.metrics.auth_failed(AuthFailure::RefreshToken);
            Err(Error::Unauthorized("invalid refresh token"))
        }
    }
}

#[utoipa::path(get, path = "/v1/me", tag = "accounts", security(("bearer" = [])),
    responses((status = 200, description = "The caller's account, seen from its device.", body = Profile), crate::api::openapi::Errors))]
async fn me(caller: AuthUser, State(state): State<AppState>) -> Result<Json<Profile>> {
    let gone = || Error::Unauthorized("account no longer exists");
    let user = state.store.user(caller.id).await?.ok_or_else(gone)?;
    let devices = state.store.devices(caller.id).await?;
    let device = devices
        .iter()
        .find(|d| d.id == caller.device)
        .ok_or(Error::Unauthorized("device no longer exists"))?;
    Ok(Json(Profile::of(user, device)))
}

/// Ends the caller's session: its access tokens are refused from now on,
/// its refresh token is void and its sockets close with 4401.
#[utoipa::path(post, path = "/v1/logout", tag = "accounts", security(("bearer" = [])),
    responses((status = 204, description = "This session is ended."), crate::api::openapi::Errors))]
async fn logout(caller: AuthUser, State(state): State<AppState>) -> Result<StatusCode> {
    end_session(&state, &caller).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ends the caller's own session (logout, or too many wrong passwords).
async fn end_session(state: &AppState, caller: &AuthUser) -> Result<()> {
    state
        .revocations
        .revoke(
            state.store.as_ref(),
            &state.hub,
            caller.id,
            Scope::One(caller.session),
        )
        .await
}

/// Ends every session of the caller, this one included.
#[utoipa::path(post, path = "/v1/logout-all", tag = "accounts", security(("bearer" = [])),
    responses((status = 204, description = "Every session of the account is ended."), crate::api::openapi::Errors))]
async fn logout_all(caller: AuthUser, State(state): State<AppState>) -> Result<StatusCode> {
    state
        .revocations
        .revoke(state.store.as_ref(), &state.hub, caller.id, Scope::All)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Checks the caller's current password: a stolen access token alone must
/// not be enough to take the account over or delete it, nor to guess the
/// password (see [`crate::auth::confirm`]). Refused with 429 before any
/// hash while the account is locked out or over its budget; the wrong
/// password that reaches the limit ends the caller's session (401).
pub(super) async fn confirm_password(
    state: &AppState,
    caller: &AuthUser,
    password: String,
) -> Result<()> {
    state
        .confirmations
        .admit(caller.id)
        .inspect_err(|_| state.metrics.rate_limited(Limited::Password))?;
    // A password too long to be one cannot match: a strike without a hash.
    let right = password.len() <= 4 * *PASSWORD_LEN.end() && {
        let Some(hash) = state.store.password_hash(caller.id).await? else {
            return Err(Error::Unauthorized("account no longer exists"));
        };
        state
            .passwords
            .verify(Caller::Account(caller.id), password, Some(hash))
            .await?
    };
    if right {
        state.confirmations.right(caller.id);
        return Ok(());
    }
    state.metrics.auth_failed(AuthFailure::CurrentPassword);
    match state.confirmations.wrong(caller.id) {
        Verdict::Wrong => Err(WRONG_PASSWORD),
        Verdict::EndSession => {
            tracing::warn!(user.id = %caller.id, device = caller.device, "too many wrong passwords: ending the session that sent them");
            end_session(state, caller).await?;
            Err(Error::Unauthorized(
                "too many wrong passwords: this session has ended",
            ))
        }
    }
}

const WRONG_PASSWORD: Error = Error::Forbidden("current password is wrong");

#[derive(Deserialize, ToSchema)]
struct ChangePassword {
    current_password: String,
    #[schema(min_length = 8, max_length = 1024)]
    new_password: String,
}

/// Sets a new password and ends every session, then opens a fresh one for
/// the caller so that the device that changed it stays signed in.
#[utoipa::path(put, path = "/v1/password", tag = "accounts", security(("bearer" = [])), request_body = ChangePassword,
    responses((status = 200, description = "A token pair for a fresh session; every other session is ended.", body = TokenPair), crate::api::openapi::Errors))]
async fn change_password(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ChangePassword>,
) -> Result<Json<TokenPair>> {
    validate_password(&request.new_password)
        .map_err(|_| Error::field("new_password", "must be 8-1024 characters"))?;
    confirm_password(&state, &caller, request.current_password).await?;
    let hash = state
        .passwords
        .hash(Caller::Account(caller.id), request.new_password)
        .await?;
    let (revoked, credentials) = state
        .store
        .set_password(caller.id, &hash, store::now())
        .await?
        .ok_or(Error::Unauthorized("account no longer exists"))?;
    state
        .revocations
        .revoked_elsewhere(&state.hub, caller.id, Scope::All, &revoked);
    tracing::info!(user.id = %caller.id, "password changed");
    let account = Verified {
        user_id: caller.id,
        credentials,
    };
    Ok(Json(start_session(&state, account, caller.device).await?))
}

#[derive(Deserialize, ToSchema)]
struct DeleteAccount {
    password: String,
}

/// Deletes the caller's account with its key and queued messages, and
/// closes its sockets. Messages it sent to others stay theirs.
#[utoipa::path(delete, path = "/v1/me", tag = "accounts", security(("bearer" = [])), request_body = DeleteAccount,
    responses((status = 204, description = "The account, its devices and their queues are deleted."), crate::api::openapi::Errors))]
async fn delete_me(
    caller: AuthUser,
    State(state): State<AppState>,
    ApiJson(request): ApiJson<DeleteAccount>,
) -> Result<StatusCode> {
    confirm_password(&state, &caller, request.password).await?;
    let revoked = state
        .store
        .delete_user(caller.id, store::now())
        .await?
        .ok_or(Error::Unauthorized("account no longer exists"))?;
    state
        .revocations
        .revoked_elsewhere(&state.hub, caller.id, Scope::All, &revoked);
    state.delivery.account_deleted(caller.id).await;
    // Its targets went with it (other nodes learn it from the directory
    // announcement).
    state.targets.changed(caller.id);
    tracing::info!(user.id = %caller.id, "account deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames() {
        for ok in ["abc", "Alice_01", "a.b-c", &"x".repeat(32)] {
            assert!(validate_username(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ab",
            "",
            "has space",
            "ünï",
            "a;DROP",
            &"x".repeat(33),
            "tab\t",
        ] {
            assert!(validate_username(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn passwords_count_characters() {
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password("1234567").is_err());
        // 8 characters, 16 bytes.
        assert!(validate_password("éééééééé").is_ok());
        assert!(validate_password(&"x".repeat(1025)).is_err());
    }
}
