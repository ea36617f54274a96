-- Accounts, refresh tokens and the message queue.

CREATE TABLE users (
    id             uuid PRIMARY KEY,
    -- Kept as registered; uniqueness and lookups ignore letter case.
    username       text NOT NULL,
    -- PHC string of an argon2id hash.
    password_hash  text NOT NULL,
    public_key     bytea NOT NULL,
    key_updated_at timestamptz NOT NULL,
    created_at     timestamptz NOT NULL
);
CREATE UNIQUE INDEX users_username_lower ON users (lower(username));

-- Only the SHA-256 of a refresh token is stored. Spent tokens stay until they
-- expire so that presenting one again is recognised as reuse.
CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family_id  uuid NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    created_at timestamptz NOT NULL
);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);
CREATE INDEX refresh_tokens_expires ON refresh_tokens (expires_at);

-- The queue. Ids are UUIDv7, so id order is acceptance order and the
-- sweeper expires rows by primary-key range. No foreign key on recipient:
-- the delivery core checks it before accepting, and one stale row must never
-- fail a whole group-commit batch.
CREATE TABLE messages (
    id        uuid PRIMARY KEY,
    recipient uuid NOT NULL,
    sender    uuid NOT NULL,
    body      bytea NOT NULL,
    sent_at   timestamptz NOT NULL
);
-- Drain and poll scan one recipient's queue in id order.
CREATE INDEX messages_recipient_id ON messages (recipient, id);
-- A queue table churns: every row is deleted soon after it is written.
-- Vacuum it sooner than the default 20% of dead rows.
ALTER TABLE messages SET (autovacuum_vacuum_scale_factor = 0.02,
                          autovacuum_analyze_scale_factor = 0.05);
