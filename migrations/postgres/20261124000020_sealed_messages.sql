-- Sealed storage: a queued message's sender and body are kept only inside
-- `sealed` (nonce || XChaCha20-Poly1305 ciphertext || tag, see src/seal.rs),
-- under the storage key `key_id` names, so a dump reveals neither.
--
-- Rows queued by an earlier release keep their plaintext `sender` and `body`
-- until the server's sweeper seals them (at start-up, in bounded batches);
-- new rows leave both NULL. A later release drops the two columns once every
-- deployment has run this one. Every step here is a catalogue change, apart
-- from the constraint's one scan of the (short-lived) queue.
ALTER TABLE messages
    ADD COLUMN key_id smallint,
    ADD COLUMN sealed bytea,
    ALTER COLUMN sender DROP NOT NULL,
    ALTER COLUMN body DROP NOT NULL,
    -- Each row is either sealed or a whole legacy row.
    ADD CONSTRAINT messages_sealed_or_legacy CHECK (
        (key_id IS NOT NULL AND sealed IS NOT NULL)
        OR (key_id IS NULL AND sealed IS NULL AND sender IS NOT NULL AND body IS NOT NULL)
    );
