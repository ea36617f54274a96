-- Devices: an account holds one or more devices, each with its own public
-- key, queue and sessions. Every existing account becomes one with device 1
-- holding its current key; its queued messages and its sessions move to
-- device 1, so nothing queued is lost and every signed-in client stays
-- signed in.
CREATE TABLE devices (
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- Numbered from 1 within the account, from `users.next_device_id`: a
    -- number is never reused, so a removed device's tokens and queued
    -- copies can never reach a later one.
    device_id      integer NOT NULL CHECK (device_id > 0),
    public_key     bytea NOT NULL,
    key_updated_at timestamptz NOT NULL,
    -- Seen only by the account itself.
    name           text,
    created_at     timestamptz NOT NULL,
    last_seen_at   timestamptz NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
INSERT INTO devices (user_id, device_id, public_key, key_updated_at, created_at, last_seen_at)
    SELECT id, 1, public_key, key_updated_at, created_at, created_at FROM users;
ALTER TABLE users
    ADD COLUMN next_device_id integer NOT NULL DEFAULT 2,
    DROP COLUMN public_key,
    DROP COLUMN key_updated_at;

-- A session (refresh-token family) belongs to one device. The defaults move
-- today's rows to device 1 (a catalogue change: no table rewrite) and are
-- dropped at once, so no later insert can forget the column.
ALTER TABLE refresh_tokens ADD COLUMN device_id integer NOT NULL DEFAULT 1;
ALTER TABLE refresh_tokens ALTER COLUMN device_id DROP DEFAULT;

-- One queue per device: a message to an account with three devices is three
-- rows under one id, each acknowledged on its own. The primary key becomes
-- (id, device_id); the sweeper still expires by id range through it.
ALTER TABLE messages ADD COLUMN device_id integer NOT NULL DEFAULT 1;
ALTER TABLE messages ALTER COLUMN device_id DROP DEFAULT;
ALTER TABLE messages DROP CONSTRAINT messages_pkey;
ALTER TABLE messages ADD PRIMARY KEY (id, device_id);
-- Drain and poll scan one device's queue in id order.
DROP INDEX messages_recipient_id;
CREATE INDEX messages_recipient_device_id ON messages (recipient, device_id, id);
