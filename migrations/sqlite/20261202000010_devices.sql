-- Devices: an account holds one or more devices, each with its own public
-- key, queue and sessions. Every existing account becomes one with device 1
-- holding its current key; its queued messages and its sessions move to
-- device 1, so nothing queued is lost and every signed-in client stays
-- signed in. Runs in one transaction.
CREATE TABLE devices (
    user_id        BLOB NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- Numbered from 1 within the account, from `users.next_device_id`: a
    -- number is never reused, so a removed device's tokens and queued
    -- copies can never reach a later one.
    device_id      INTEGER NOT NULL CHECK (device_id > 0),
    public_key     BLOB NOT NULL,
    key_updated_at INTEGER NOT NULL,
    -- Seen only by the account itself.
    name           TEXT,
    created_at     INTEGER NOT NULL,
    last_seen_at   INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
INSERT INTO devices (user_id, device_id, public_key, key_updated_at, created_at, last_seen_at)
    SELECT id, 1, public_key, key_updated_at, created_at, created_at FROM users;
ALTER TABLE users ADD COLUMN next_device_id INTEGER NOT NULL DEFAULT 2;
ALTER TABLE users DROP COLUMN public_key;
ALTER TABLE users DROP COLUMN key_updated_at;

-- A session (refresh-token family) belongs to one device; today's move to
-- device 1. SQLite cannot drop the default without rebuilding the table
-- (PostgreSQL's migration drops it); every insert names the column.
ALTER TABLE refresh_tokens ADD COLUMN device_id INTEGER NOT NULL DEFAULT 1;

-- One queue per device: a message to an account with three devices is three
-- rows under one id, each acknowledged on its own. SQLite cannot change a
-- primary key in place, so the queue is rebuilt clustered by (id, device_id)
-- (the sweeper still expires by id range) and every queued row copied over
-- to device 1. Nothing references `messages`.
CREATE TABLE messages_by_device (
    id        BLOB NOT NULL,
    device_id INTEGER NOT NULL,
    recipient BLOB NOT NULL,
    sent_at   INTEGER NOT NULL,
    key_id    INTEGER,
    sealed    BLOB,
    -- Legacy plaintext, NULL in every sealed row.
    sender    BLOB,
    body      BLOB,
    -- Each row is either sealed or a whole legacy row.
    CONSTRAINT messages_sealed_or_legacy CHECK (
        (key_id IS NOT NULL AND sealed IS NOT NULL)
        OR (key_id IS NULL AND sealed IS NULL AND sender IS NOT NULL AND body IS NOT NULL)
    ),
    PRIMARY KEY (id, device_id)
) WITHOUT ROWID;
INSERT INTO messages_by_device (id, device_id, recipient, sent_at, key_id, sealed, sender, body)
    SELECT id, 1, recipient, sent_at, key_id, sealed, sender, body FROM messages;
DROP TABLE messages;
ALTER TABLE messages_by_device RENAME TO messages;
-- Drain and poll scan one device's queue in id order.
CREATE INDEX messages_recipient_device_id ON messages (recipient, device_id, id);
