-- Counts each account's password changes. A login reads it with the
-- password hash and starts its session only while it is unchanged, so a
-- login that checked the old password just before a change cannot land a
-- session just after it. NOT NULL with a constant default: a catalogue
-- change only, no table rewrite.
ALTER TABLE users ADD COLUMN credentials_version bigint NOT NULL DEFAULT 0;
