//! Issue 24, items 2 and 13: slow and oversized request bodies, per-route
//! body limits, HTTP connections per address, and client request ids.
