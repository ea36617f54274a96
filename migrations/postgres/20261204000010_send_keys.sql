-- Idempotent sends: the key a client chose for a send (`client_id`), scoped
-- to the sending device, and the id its message got. A retry under the same
-- key is answered with that id instead of storing the message again, for as
-- long as the row is kept (the sweeper expires rows after a day, by the
-- time in `message_id`, a UUIDv7).
--
-- Written in the transaction that writes the message's copies, so a key is
-- here exactly when its message was accepted. No foreign key to `devices`:
-- a device removed while its send commits must not fail the whole batch,
-- and device numbers are never reused, so a stale key can match nothing.
CREATE TABLE send_keys (
    sender        uuid NOT NULL,
    sender_device integer NOT NULL,
    client_id     text NOT NULL,
    message_id    uuid NOT NULL,
    -- SHA-256 of what was sent (recipient and bodies): a retry must carry
    -- the same, or it is refused.
    digest        bytea NOT NULL,
    PRIMARY KEY (sender, sender_device, client_id)
);
-- The sweeper deletes by id range.
CREATE INDEX send_keys_message_id ON send_keys (message_id);
