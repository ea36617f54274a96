//! Issue 24, items 6, 7, 8 and 12: idempotency keys that do not tell who
//! wrote to whom, a sender's share of a device's queue, storage charged per
//! stored copy, and ephemeral sends as a presence oracle.
