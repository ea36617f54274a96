-- Accounts, refresh tokens and the message queue. Uuids are 16-byte blobs
-- (big-endian, so blob order is UUIDv7 time order); timestamps are integer
-- milliseconds since the Unix epoch.

CREATE TABLE users (
    id             BLOB PRIMARY KEY NOT NULL,
    -- Kept as registered; NOCASE makes uniqueness and lookups ignore ASCII
    -- letter case, and usernames are ASCII only.
    username       TEXT NOT NULL COLLATE NOCASE,
    -- PHC string of an argon2id hash.
    password_hash  TEXT NOT NULL,
    public_key     BLOB NOT NULL,
    key_updated_at INTEGER NOT NULL,
    created_at     INTEGER NOT NULL
);
CREATE UNIQUE INDEX users_username ON users (username);

-- Only the SHA-256 of a refresh token is stored. Spent tokens stay until they
-- expire so that presenting one again is recognised as reuse.
CREATE TABLE refresh_tokens (
    token_hash BLOB PRIMARY KEY NOT NULL,
    user_id    BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family_id  BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);
CREATE INDEX refresh_tokens_expires ON refresh_tokens (expires_at);

-- The queue, clustered by its time-ordered id: the sweeper expires rows by
-- primary-key range. No foreign key on recipient: the delivery core checks it
-- before accepting, and one stale row must never fail a group-commit batch.
CREATE TABLE messages (
    id        BLOB PRIMARY KEY NOT NULL,
    recipient BLOB NOT NULL,
    sender    BLOB NOT NULL,
    body      BLOB NOT NULL,
    sent_at   INTEGER NOT NULL
) WITHOUT ROWID;
-- Drain and poll scan one recipient's queue in id order.
CREATE INDEX messages_recipient_id ON messages (recipient, id);
