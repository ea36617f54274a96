-- Sealed storage: a queued message's sender and body are kept only inside
-- `sealed` (nonce || XChaCha20-Poly1305 ciphertext || tag, see src/seal.rs),
-- under the storage key `key_id` names, so a dump reveals neither.
--
-- Rows queued by an earlier release keep their plaintext `sender` and `body`
-- until the server's sweeper seals them (at start-up, in bounded batches);
-- new rows leave both NULL. A later release drops the two columns once every
-- deployment has run this one.
--
-- SQLite's ALTER TABLE cannot relax NOT NULL, so the table is rebuilt and
-- every queued row copied over, in this migration's transaction. Nothing
-- references `messages`, so dropping the old table breaks no foreign key.
CREATE TABLE messages_sealed (
    id        BLOB PRIMARY KEY NOT NULL,
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
    )
) WITHOUT ROWID;
INSERT INTO messages_sealed (id, recipient, sent_at, sender, body)
    SELECT id, recipient, sent_at, sender, body FROM messages;
DROP TABLE messages;
ALTER TABLE messages_sealed RENAME TO messages;
-- Drain and poll scan one recipient's queue in id order.
CREATE INDEX messages_recipient_id ON messages (recipient, id);
