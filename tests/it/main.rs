//! Integration tests: the real server on an ephemeral port, spoken to over
//! HTTP as clients do, on SQLite always and on PostgreSQL when
//! `SEALPOST_TEST_DATABASE_URL` is set. One test binary, so the suite links
//! once.

mod common;

mod accounts;
mod admin;
mod attack_accounts;
mod attack_drain;
mod attack_http;
mod attack_passwords;
mod attack_queue;
mod attack_sockets;
mod chat;
mod cli;
mod client;
mod client_groups;
mod client_push;
mod client_sessions;
mod cluster;
mod devices;
mod durability;
mod edges;
mod elision;
mod faults;
mod health;
mod hostile;
mod js;
mod keys;
mod logs;
mod messages;
mod metrics;
mod migration;
mod multi;
mod openapi;
mod props;
mod protocol_edges;
mod push_native;
mod push_store;
mod push_targets;
mod push_wakeups;
mod retries;
mod sealed;
mod security;
mod sweeper;
mod web;
mod webpush;
mod webpush_crosscheck;
mod ws;
mod ws_edges;
