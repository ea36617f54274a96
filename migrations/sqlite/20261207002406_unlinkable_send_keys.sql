-- Send keys that do not tell who wrote to whom (issue 24, item 6), and the
-- sender tag a sender's share of a device's queue is counted by (item 7).
--
-- `send_keys` kept the sender, its device, the client's key and the message
-- id in the clear: one join with `messages` gave the sender and recipient of
-- every keyed send, which sealed storage (src/seal.rs) hides. It is replaced
-- by a table keyed by a keyed hash (HMAC-SHA256 under a subkey of the
-- storage key) of (sender, device, client_id), whose answer (message id and
-- digest) is sealed, and which expires by a coarse time of its own rather
-- than by the message id. The keys of sends accepted before this migration
-- are dropped: a retry of one of them within a day is stored again (as a
-- send without a key would be).
DROP TABLE send_keys;
CREATE TABLE send_keys (
    -- HMAC of (sender, sender device, client_id) under the storage key
    -- `key_id` names (its tag subkey).
    key_hash    BLOB PRIMARY KEY,
    -- HMAC of the sender under the same key: deleting the account deletes
    -- its send keys by it.
    account_tag BLOB NOT NULL,
    key_id      INTEGER NOT NULL,
    -- nonce || XChaCha20-Poly1305(message id || digest) || tag, bound to
    -- `key_hash`.
    answer      BLOB NOT NULL,
    -- When the sweeper deletes it: a day after the send, rounded up to the
    -- hour (Unix milliseconds), so that it tells little about when its message was sent.
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX send_keys_expires_at ON send_keys (expires_at);
CREATE INDEX send_keys_account_tag ON send_keys (account_tag);

-- The keyed hash of a queued row's (sender, recipient) pair: what a sender
-- holds in a device's queue is counted by it, without its sender in the
-- clear. NULL in rows written before it (they count for no sender) until they
-- are acknowledged or expire. Nullable, no default: no table rewrite.
ALTER TABLE messages ADD COLUMN sender_tag BLOB;
