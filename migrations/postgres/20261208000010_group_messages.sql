-- Group messages (issue 27): one send to many accounts under one id, and a
-- shared body stored once.
--
-- A message id now names copies for several accounts, so a row's key is
-- (id, recipient, device_id): the same device number of two accounts holds
-- two copies of one message.
ALTER TABLE messages DROP CONSTRAINT messages_pkey;
ALTER TABLE messages ADD PRIMARY KEY (id, recipient, device_id);

-- The shared body of a multi-recipient send, once however many copies it
-- has: sealed (src/seal.rs) under the storage key `key_id` names, bound to
-- the message id. Its copies' rows hold their key material. Deleted with
-- the last of its copies (by the ack that deletes it, or by the sweeper).
CREATE TABLE shared_bodies (
    id      uuid PRIMARY KEY,
    sent_at timestamptz NOT NULL,
    key_id  smallint NOT NULL,
    sealed  bytea NOT NULL
);
