//! Issue 24, item 9: slow readers and the drain budget.
