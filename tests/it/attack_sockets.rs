//! Issue 24, items 1 and 2 (WebSocket part): the unauthenticated-socket
//! slots, header tokens, the auth timeout, unfinished fragmented messages,
//! close codes, and token expiry agreed by REST and sockets.
