-- The Unicode TR39 skeleton of each username (see
-- `store::accounts::username_skeleton`), unique so that no two accounts
-- have names that look alike (`alice`, `al1ce`, `aIice`). SQL cannot compute
-- it: the server fills it in for existing accounts at start-up, after the
-- migrations (NULL until then; NULLs do not collide in a unique index).
ALTER TABLE users ADD COLUMN username_skeleton TEXT;
CREATE UNIQUE INDEX users_username_skeleton ON users (username_skeleton);
