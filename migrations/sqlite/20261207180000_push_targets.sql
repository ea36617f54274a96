-- Wake-ups (issue 26): each device's push target, and the wake-ups pending
-- for it. Timestamps are Unix milliseconds, as everywhere here; booleans
-- are 0 or 1.

-- One row per device that has registered a target. The target itself (a
-- Web Push endpoint and keys, an APNs or FCM token: a capability to notify
-- the device) is sealed JSON, bound to its (user, device) by the storage
-- key (src/seal.rs); only its kind is in the clear, for listings and the
-- metrics gauge. `updated_at` is the target's version: it strictly grows
-- with every replacement, so a provider's "gone" drops only the target the
-- wake-up was sent to. A dropped target keeps its row with no target and
-- `dropped` set, so that the device is told (its `ready` frame) until it
-- registers again or deletes it.
CREATE TABLE push_targets (
    user_id    BLOB NOT NULL,
    device_id  INTEGER NOT NULL,
    kind       TEXT CHECK (kind IN ('webpush', 'apns', 'fcm')),
    target     BLOB,
    updated_at INTEGER NOT NULL,
    dropped    INTEGER NOT NULL DEFAULT 0,
    -- A live target has both; a dropped one neither.
    CONSTRAINT push_targets_whole CHECK ((kind IS NULL) = (target IS NULL)),
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
) WITHOUT ROWID;

-- At most one row per device, written insert-if-absent, so that fifty
-- messages to an offline phone make one wake-up. Pending: `due_at` set (to
-- be sent then; taking it moves it a lease ahead). Cooling: `due_at` unset
-- and `sent_at` within the cool-down. `quiet_sent_at` is the last
-- non-urgent wake-up sent, for the quiet interval.
CREATE TABLE wakeups (
    user_id       BLOB NOT NULL,
    device_id     INTEGER NOT NULL,
    due_at        INTEGER,
    urgent        INTEGER NOT NULL DEFAULT 1,
    -- Tries made and failed for the pending wake-up.
    attempts      INTEGER NOT NULL DEFAULT 0,
    sent_at       INTEGER,
    quiet_sent_at INTEGER,
    PRIMARY KEY (user_id, device_id),
    FOREIGN KEY (user_id, device_id) REFERENCES devices (user_id, device_id) ON DELETE CASCADE
) WITHOUT ROWID;
-- The senders take due rows in due order; most rows are cooling or idle.
CREATE INDEX wakeups_due_at ON wakeups (due_at) WHERE due_at IS NOT NULL;
