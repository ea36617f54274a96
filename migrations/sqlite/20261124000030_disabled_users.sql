-- Accounts an operator has disabled (`sealpost user disable`). A disabled
-- account cannot log in; disabling it also revoked every session it had.
-- NULL for an active account; otherwise Unix milliseconds, as every other
-- timestamp here.
ALTER TABLE users ADD COLUMN disabled_at INTEGER;
