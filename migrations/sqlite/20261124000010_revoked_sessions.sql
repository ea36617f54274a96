-- Sessions revoked before their access tokens expired (logout, logout-all,
-- password change, account deletion, refresh-token reuse). An access token
-- names its session (its refresh-token family) and is refused while the
-- session is listed here. The server keeps the list in memory and loads it
-- at start-up; rows older than one access-token lifetime are swept, since
-- every token of the session has expired by then.
CREATE TABLE revoked_sessions (
    id         BLOB PRIMARY KEY NOT NULL,
    user_id    BLOB NOT NULL,
    revoked_at INTEGER NOT NULL
);
CREATE INDEX revoked_sessions_revoked_at ON revoked_sessions (revoked_at);
