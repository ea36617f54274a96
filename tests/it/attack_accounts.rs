//! Issue 24, items 5, 10, 14 and 15: credentials versions against a racing
//! login, concurrent logins on PostgreSQL, look-alike names and control
//! characters, and file modes of the SQLite database.
