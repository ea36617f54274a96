-- Accounts an operator has disabled (`sealpost user disable`). A disabled
-- account cannot log in; disabling it also revoked every session it had.
-- NULL for an active account. Nullable without a default, so adding it is a
-- catalogue change only: no table rewrite, no long lock on `users`.
ALTER TABLE users ADD COLUMN disabled_at timestamptz;
