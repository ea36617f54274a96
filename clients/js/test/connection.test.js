// Integration tests of the connection and the session against a real
// server: reconnect after a cut socket (resume from the backlog), 4409 on an
// exclusive takeover, the REST 401 refresh-and-retry, a failed refresh
// ending the session, and, on a server with a short access-token lifetime
// (SEALPOST_TEST_URL_SHORT_TTL), renewal on the live socket and the 4401
// refresh-and-reconnect.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SealpostClient, SealpostError } from '../src/index.js';
import {
  serverUrl, newAccount, clientOptions, recordingWebSocket, nextEvent, collectMessages,
  eventually, eventuallyEmpty, pause, queued, closeAll, PASSWORD,
} from './helpers.js';

const url = serverUrl('SEALPOST_TEST_URL');
const shortUrl = serverUrl('SEALPOST_TEST_URL_SHORT_TTL');
const T = { timeout: 90_000 };

if (url) {
  test('reconnects with backoff after the socket is cut, and resumes from the backlog', T, async () => {
    const rec = recordingWebSocket();
    const [bob] = await newAccount(url, 'rcb', 1, { WebSocket: rec.WebSocket });
    const [alice] = await newAccount(url, 'rca', 1);
    const states = [];
    bob.on('state', (s) => states.push(s));
    await bob.connect();
    await bob.waitForDrained();
    const before = collectMessages(bob, 1);
    const m1 = await alice.send(bob.userId, 'before the cut');
    const [got1] = await before; // not acked: it must come back once, and not be shown again

    rec.sockets.at(-1).terminate(); // abrupt: no close frame, as a dead network
    await eventually(() => states.some((s) => s.state === 'reconnecting'), { what: 'reconnecting' });
    const after = collectMessages(bob, 1);
    const m2 = await alice.send(bob.userId, 'during the cut');
    await eventually(() => states.filter((s) => s.state === 'drained').length === 2, { what: 'drained again' });
    const [got2] = await after;
    assert.equal(got2.id, m2.id);
    assert.equal(got2.text, 'during the cut');
    const reconnecting = states.find((s) => s.state === 'reconnecting');
    assert.equal(reconnecting.code, 1006);
    assert.ok(reconnecting.delayMs >= 0 && reconnecting.delayMs < 1000, 'full-jitter delay within the configured bound');
    assert.deepEqual(states.map((s) => s.state), ['connecting', 'open', 'drained', 'reconnecting', 'connecting', 'open', 'drained']);
    assert.equal(rec.sockets.length, 2);
    await pause(200);
    await bob.ack([got1, got2]);
    assert.equal(got1.id, m1.id);
    await eventuallyEmpty(bob);

    // A send pipelined on the socket that is cut mid-way is retried under the same client id.
    const shown = [];
    bob.on('message', (m) => shown.push(m));
    const aliceRec = recordingWebSocket();
    const alice2 = await SealpostClient.login({ ...clientOptions(url, { WebSocket: aliceRec.WebSocket }), username: alice.username, password: PASSWORD, keys: alice.exportKeys() });
    await alice2.connect();
    await alice2.waitForDrained();
    await alice2.directory.get(bob.userId); // cached, so the frame is written before the cut
    await alice2.directory.get(alice2.userId);
    const sending = alice2.send(bob.userId, 'through the cut');
    await new Promise((r) => setImmediate(r));
    aliceRec.sockets.at(-1).terminate();
    const r = await sending;
    await eventually(() => shown.some((m) => m.clientId === r.clientId), { what: 'the retried message' });
    await pause(300);
    assert.equal(shown.filter((m) => m.clientId === r.clientId).length, 1, 'shown once, even if stored twice');
    await closeAll(alice, alice2, bob);
  });

  test('an exclusive socket elsewhere closes ours with 4409, and we do not reconnect', T, async () => {
    const [phone] = await newAccount(url, 'exc', 1);
    const states = [];
    phone.on('state', (s) => states.push(s));
    await phone.connect();
    await phone.waitForDrained();
    const twin = await SealpostClient.login({ ...clientOptions(url), username: phone.username, password: PASSWORD, keys: phone.exportKeys() });
    await twin.connect({ exclusive: true });
    await eventually(() => phone.connectionState === 'closed', { what: 'closed by 4409' });
    assert.equal(states.at(-1).code, 4409);
    await pause(1500);
    assert.equal(phone.connectionState, 'closed');
    assert.ok(!states.some((s) => s.state === 'reconnecting'));
    assert.equal(twin.connectionState === 'open' || twin.connectionState === 'drained', true);
    await closeAll(phone, twin);
  });

  test('a device at its socket cap gets 4429 and the client does not reconnect', T, async () => {
    const [dev] = await newAccount(url, 'cap', 1);
    const token = dev.tokens().accessToken;
    const { default: WebSocket } = await import('ws');
    const wsUrl = url.replace(/^http/, 'ws') + '/v1/ws';
    const held = [];
    for (let i = 0; i < 10; i++) { // SEALPOST_MAX_CONNECTIONS_PER_USER, 10 by default
      const ws = new WebSocket(wsUrl);
      await new Promise((resolve, reject) => {
        ws.onopen = () => ws.send(JSON.stringify({ type: 'auth', token }));
        ws.onmessage = (e) => { if (JSON.parse(e.data).type === 'ready') resolve(); };
        ws.onclose = (e) => reject(new Error(`raw socket ${i} closed ${e.code}`));
      });
      held.push(ws);
    }
    const states = [];
    dev.on('state', (st) => states.push(st));
    await assert.rejects(dev.connect(), (e) => e instanceof SealpostError && e.code === 'closed');
    assert.equal(states.at(-1).state, 'closed');
    assert.equal(states.at(-1).code, 4429);
    await pause(1000);
    assert.ok(!states.some((st) => st.state === 'reconnecting'));
    for (const ws of held) { ws.onclose = null; ws.close(); }
    await closeAll(dev);
  });

  test('a REST 401 refreshes the token and retries once', T, async () => {
    const [a] = await newAccount(url, 'r401', 1);
    const tokens = [];
    a.on('tokens', (t) => tokens.push(t));
    const oldRefresh = a.tokens().refreshToken;
    a._session._access = 'not-a-valid-token'; // the server will answer 401 to it
    const devices = await a.devices();
    assert.equal(devices.length, 1);
    assert.equal(tokens.length, 1);
    assert.notEqual(tokens[0].refreshToken, oldRefresh, 'only the newest refresh token is kept');
    assert.equal(a.tokens().refreshToken, tokens[0].refreshToken);
    await closeAll(a);
  });

  test('a refresh that fails (every session revoked) surfaces unauthorized and logs out', T, async () => {
    const [a, b] = await newAccount(url, 'lo', 2);
    await a.connect();
    await a.waitForDrained();
    const loggedOut = nextEvent(a, 'loggedOut');
    await b.request('POST', '/v1/logout-all');
    const err = await loggedOut;
    assert.ok(err instanceof SealpostError);
    assert.equal(err.code, 'unauthorized');
    assert.equal(a.sessionState, 'loggedOut');
    await eventually(() => a.connectionState === 'closed', { what: 'socket closed for good' });
    await assert.rejects(a.devices(), (e) => e.code === 'unauthorized');
    await closeAll(a, b);
  });
}

if (shortUrl) {
  test('short-TTL server: the token is renewed on the live socket (auth -> authed) and it stays open', T, async () => {
    const [alice] = await newAccount(shortUrl, 'ttla', 1);
    const [bob] = await newAccount(shortUrl, 'ttlb', 1);
    const ttlMs = alice.tokens().expiresAt - Date.now();
    assert.ok(ttlMs < 30_000, `SEALPOST_TEST_URL_SHORT_TTL must run with SEALPOST_ACCESS_TOKEN_TTL of at most 30s (got ~${Math.round(ttlMs / 1000)}s)`);
    const firstExpiry = bob.tokens().expiresAt;
    const states = [];
    bob.on('state', (s) => states.push(s.state));
    await bob.connect();
    await bob.waitForDrained();
    const authed = await nextEvent(bob, 'authed', { ms: ttlMs + 5000 });
    assert.ok(Date.parse(authed.expiresAt) > firstExpiry, 'the renewed token outlives the first');
    // Past the first token's expiry the same socket still delivers.
    await pause(Math.max(0, firstExpiry - Date.now()) + 2000);
    const got = collectMessages(bob, 1);
    const sent = await alice.send(bob.userId, 'after renewal');
    assert.equal((await got)[0].id, sent.id);
    assert.deepEqual(states, ['connecting', 'open', 'drained'], 'never reconnected');
    await closeAll(alice, bob);
  });

  test('short-TTL server: a socket closed 4401 on expiry refreshes and reconnects', T, async () => {
    const [bob] = await newAccount(shortUrl, 'ttlc', 1);
    const ttlMs = bob.tokens().expiresAt - Date.now();
    // Keep the token from being renewed, so that the server closes the socket on expiry.
    clearTimeout(bob._session._timer);
    bob._session._schedule = () => {};
    const states = [];
    bob.on('state', (s) => states.push(s));
    await bob.connect();
    await bob.waitForDrained();
    await eventually(() => states.some((s) => s.state === 'reconnecting'), { ms: ttlMs + 10_000, what: 'closed on expiry' });
    assert.equal(states.find((s) => s.state === 'reconnecting').code, 4401);
    await eventually(() => states.filter((s) => s.state === 'drained').length === 2, { what: 'reconnected' });
    assert.equal(bob.sessionState, 'active');
    await closeAll(bob);
  });
}
