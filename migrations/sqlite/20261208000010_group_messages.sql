-- Group messages (issue 27): one send to many accounts under one id, and a
-- shared body stored once.
--
-- A message id now names copies for several accounts, so a row's key is
-- (id, recipient, device_id): the same device number of two accounts holds
-- two copies of one message. SQLite cannot change a WITHOUT ROWID table's
-- key in place: the table is copied into one with the new key.
CREATE TABLE messages_by_recipient (
    id         BLOB NOT NULL,
    recipient  BLOB NOT NULL,
    device_id  INTEGER NOT NULL,
    sent_at    INTEGER NOT NULL,
    key_id     INTEGER,
    sealed     BLOB,
    -- Legacy plaintext, NULL in every sealed row.
    sender     BLOB,
    body       BLOB,
    sender_tag BLOB,
    -- Each row is either sealed or a whole legacy row.
    CONSTRAINT messages_sealed_or_legacy CHECK (
        (key_id IS NOT NULL AND sealed IS NOT NULL)
        OR (key_id IS NULL AND sealed IS NULL AND sender IS NOT NULL AND body IS NOT NULL)
    ),
    PRIMARY KEY (id, recipient, device_id)
) WITHOUT ROWID;
INSERT INTO messages_by_recipient (id, recipient, device_id, sent_at, key_id, sealed, sender, body, sender_tag)
    SELECT id, recipient, device_id, sent_at, key_id, sealed, sender, body, sender_tag FROM messages;
DROP TABLE messages;
ALTER TABLE messages_by_recipient RENAME TO messages;
-- Drain and poll scan one device's queue in id order.
CREATE INDEX messages_recipient_device_id ON messages (recipient, device_id, id);

-- The shared body of a multi-recipient send, once however many copies it
-- has: sealed (src/seal.rs) under the storage key `key_id` names, bound to
-- the message id. Its copies' rows hold their key material. Deleted with
-- the last of its copies (by the ack that deletes it, or by the sweeper).
CREATE TABLE shared_bodies (
    id      BLOB PRIMARY KEY NOT NULL,
    sent_at INTEGER NOT NULL,
    key_id  INTEGER NOT NULL,
    sealed  BLOB NOT NULL
) WITHOUT ROWID;
