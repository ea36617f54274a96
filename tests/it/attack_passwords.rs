//! Issue 24, items 3 and 4: password checks that hash (password change,
//! account and device deletion) limited per account and address, hashing
//! shared fairly, and a stolen token that guesses the password.
