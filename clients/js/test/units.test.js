// Unit tests of the parts that need no server (or a fake one answering
// `fetch`): backoff, the bounded map, error construction, the typing
// tracker, the register answer's session, the size check before sealing,
// a token store shared by several clients of one session.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Backoff, SealpostError, SealpostClient, DEFAULT_LIMITS, TYPING_SHOWN_MS, loadSodium, generateDeviceKeys, exportDeviceKeys,
  pushTargetBody, WIRE_CODES,
} from '../src/index.js';
import { BoundedMap } from '../src/bounded.js';
import { TypingTracker } from '../src/typing.js';
import { errorFromFrame, errorFromResponse } from '../src/errors.js';

test('full-jitter backoff stays within [0, min(cap, base*2^n))', () => {
  const b = new Backoff({ baseMs: 250, capMs: 30_000, random: () => 0.999999 });
  const seen = Array.from({ length: 10 }, () => b.next());
  assert.deepEqual(seen.slice(0, 4), [249, 499, 999, 1999]);
  assert.equal(Math.max(...seen), 29_999);
  const zero = new Backoff({ random: () => 0 });
  assert.equal(zero.next(), 0);
  b.reset();
  assert.equal(b.next(), 249);
});

test('bounded map forgets the least recently used first', () => {
  const m = new BoundedMap(2);
  m.set('a', 1).set('b', 2);
  m.get('a');
  m.set('c', 3);
  assert.equal(m.has('b'), false);
  assert.equal(m.get('a'), 1);
  assert.equal(m.get('c'), 3);
  assert.equal(m.size, 2);
});

test('error frames become typed errors; rate_limited carries the wait', () => {
  const e = errorFromFrame({ code: 'devices_changed', message: 'x', missing: [2], extra: [] });
  assert.ok(e instanceof SealpostError);
  assert.equal(e.code, 'devices_changed');
  assert.deepEqual(e.missing, [2]);
  assert.deepEqual(e.extra, []);
  assert.equal(errorFromFrame({ code: 'rate_limited', message: 'rate limit exceeded; retry in 250 ms' }).retryAfter, 0.25);
});

test('REST error replies become typed errors with status, field, Retry-After, request id', async () => {
  const r = new Response(JSON.stringify({ error: { code: 'rate_limited', message: 'slow down' } }), {
    status: 429, headers: { 'retry-after': '3', 'x-request-id': 'req-1' },
  });
  const e = await errorFromResponse(r);
  assert.equal(e.code, 'rate_limited');
  assert.equal(e.status, 429);
  assert.equal(e.retryAfter, 3);
  assert.equal(e.requestId, 'req-1');
  const proxy = await errorFromResponse(new Response('<html>', { status: 502 }));
  assert.equal(proxy.code, 'unavailable');
  assert.equal(proxy.retryable, true);
});

test('index.d.ts declares exactly the runtime exports', async () => {
  const { readFile } = await import('node:fs/promises');
  const dts = await readFile(new URL('../index.d.ts', import.meta.url), 'utf8');
  const declared = [...dts.matchAll(/^export (?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort();
  const runtime = Object.keys(await import('../src/index.js')).sort();
  assert.deepEqual(declared, runtime);
});

test('error frames: retry_after_ms is the wait, on every code that carries it', () => {
  assert.equal(errorFromFrame({ code: 'rate_limited', message: 'slow down', retry_after_ms: 1500 }).retryAfter, 1.5);
  assert.equal(errorFromFrame({ code: 'queue_full', message: 'full', retry_after_ms: 250 }).retryAfter, 0.25);
  // The field wins over the message's figure.
  assert.equal(errorFromFrame({ code: 'rate_limited', message: 'retry in 9 ms', retry_after_ms: 40 }).retryAfter, 0.04);
  assert.equal(errorFromFrame({ code: 'invalid', message: 'x' }).retryAfter, undefined);
});

test('typing: shown from the first typing until 5 s pass, a stopped, or the text', async () => {
  const tracker = new TypingTracker(60);
  const events = [];
  tracker.on('typing', (t) => events.push([t.from, t.typing]));
  tracker.heard('alice', 1, { type: 'typing' });
  tracker.heard('alice', 2, { type: 'typing' }); // still typing: no second start
  tracker.heard('bob', 1, { type: 'typing' });
  assert.equal(tracker.isTyping('alice'), true);
  tracker.stopped('alice'); // her text arrived
  tracker.stopped('alice');
  tracker.heard('carol', 1, { type: 'typing' });
  tracker.heard('carol', 1, { type: 'typing', state: 'stopped' });
  await new Promise((r) => setTimeout(r, 120)); // bob's time runs out
  assert.deepEqual(events, [
    ['alice', true], ['bob', true], ['alice', false], ['carol', true], ['carol', false], ['bob', false],
  ]);
  assert.equal(TYPING_SHOWN_MS, 5000);
});

/**
 * A `fetch` that answers as a sealpost server would, from `routes`
 * ("METHOD /path" -> [status, body]), and records every request. Unknown
 * routes are 404 `not_found`, as on a server without them.
 */
function fakeServer(routes) {
  const requests = [];
  /** [request, parsed body] of every request with a body. */
  const bodies = [];
  const fetch = async (input, init) => {
    const key = `${init?.method ?? 'GET'} ${new URL(String(input)).pathname}`;
    requests.push(key);
    if (typeof init?.body === 'string') bodies.push([key, JSON.parse(init.body)]);
    const [status, body] = routes[key] ?? [404, { error: { code: 'not_found', message: 'no route' } }];
    return new Response(body === null ? null : JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } });
  };
  return { fetch, requests, bodies };
}

const USER = '5b0c52f4-9d4e-4a8e-9a56-3f0a2b7d1c11';
const PAIR = { access_token: 'a.b.c', token_type: 'bearer', expires_in: 1800, refresh_token: 'r1' };

async function registeredOn(routes) {
  const sodium = await loadSodium();
  const keys = generateDeviceKeys(sodium);
  const publicKey = exportDeviceKeys(sodium, keys).publicKey;
  const server = fakeServer(typeof routes === 'function' ? routes(publicKey) : routes);
  const client = await SealpostClient.register({ baseUrl: 'http://sealpost.test', fetch: server.fetch, username: 'Alice', password: 'correct horse', keys });
  return { client, server, publicKey };
}

test('register: the session in the answer is used, with no login and no /v1/me', async () => {
  const { client, server } = await registeredOn((publicKey) => ({
    'POST /v1/register': [201, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1, ...PAIR, user_id: USER }],
  }));
  assert.deepEqual(server.requests, ['POST /v1/register']);
  assert.equal(client.userId, USER);
  assert.equal(client.username, 'Alice');
  assert.equal(client.deviceId, 1);
  assert.equal(client.tokens().refreshToken, 'r1');
  assert.equal(client.tokens().userId, USER);
  await client.close();
});

test('register on a server whose answer has no session: log in, then ask who we are', async () => {
  const { client, server } = await registeredOn((publicKey) => ({
    'POST /v1/register': [201, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1 }],
    'POST /v1/login': [200, { ...PAIR, device_id: 1 }],
    'GET /v1/me': [200, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1 }],
  }));
  assert.deepEqual(server.requests, ['POST /v1/register', 'POST /v1/login', 'GET /v1/me']);
  assert.equal(client.userId, USER);
  assert.equal(client.tokens().userId, USER);
  await client.close();
});

test('a message over the server\'s body limit is refused before it is sealed', async () => {
  // A server without /v1/limits: the defaults (65,536 bytes).
  const { client, server } = await registeredOn((publicKey) => ({
    'POST /v1/register': [201, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1, ...PAIR, user_id: USER }],
  }));
  const emoji = '😀'.repeat(16_384); // within the text limit, 65,536 bytes of UTF-8
  assert.equal(client.measureText(emoji).chars, 16_384);
  assert.equal(client.measureText(emoji).fits, false);
  assert.equal(client.measureText('hello').fits, true);
  await assert.rejects(client.send('8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13', emoji), (e) => e instanceof SealpostError && e.code === 'too_large' && e.field === 'text' && /65536/.test(e.message));
  assert.deepEqual(await client.limits(), DEFAULT_LIMITS);
  // Asked once, and nothing else: no directory fetched, nothing sent.
  assert.deepEqual(server.requests, ['POST /v1/register', 'GET /v1/limits']);
  await client.close();

  // A server that says 300 bytes.
  const small = await registeredOn((publicKey) => ({
    'POST /v1/register': [201, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1, ...PAIR, user_id: USER }],
    'GET /v1/limits': [200, { max_body_bytes: 300, max_devices_per_user: 10, max_ids_per_ack: 500 }],
  }));
  const limits = await small.client.limits();
  assert.equal(limits.max_body_bytes, 300);
  const fits = small.client.measureText('x'.repeat(100));
  const over = small.client.measureText('x'.repeat(200));
  assert.ok(fits.fits && fits.sealedBytes <= 300, JSON.stringify(fits));
  assert.ok(!over.fits && over.sealedBytes > 300, JSON.stringify(over));
  await assert.rejects(small.client.send(USER, 'x'.repeat(200)), (e) => e.code === 'too_large');
  assert.ok(!small.server.requests.some((r) => r.startsWith('POST /v1/messages') || r.includes('/devices')), small.server.requests.join());
  await small.client.close();
});

/**
 * A fake server for refreshes: `POST /v1/token/refresh` answers `r<n+1>`
 * for `r<n>` (`<token>-next` for others) as device `deviceOf(token)`,
 * records what was presented, and the account's directory names device 1
 * and 2 with `publicKey`.
 */
function refreshServer(publicKey, deviceOf = () => 1) {
  const presented = [];
  const fetch = async (input, init) => {
    const path = new URL(String(input)).pathname;
    const json = (status, body) => new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } });
    if (path === '/v1/token/refresh') {
      const token = JSON.parse(init.body).refresh_token;
      presented.push(token);
      const n = /^r(\d+)$/.exec(token);
      return json(200, { ...PAIR, refresh_token: n ? `r${Number(n[1]) + 1}` : `${token}-next`, user_id: USER, device_id: deviceOf(token) });
    }
    if (path === `/v1/users/${USER}/devices`) {
      return json(200, { user_id: USER, username: 'Alice', devices: [1, 2].map((d) => ({ device_id: d, public_key: publicKey })) });
    }
    return json(404, { error: { code: 'not_found', message: 'no route' } });
  };
  return { fetch, presented };
}

/** A token store in memory whose lock records, for each `fn`, what the client did inside it. */
function memoryStore(initial = null) {
  let tail = Promise.resolve();
  const store = {
    latest: initial,
    saves: [],
    locked: false,
    withLock(fn) {
      const run = tail.then(async () => {
        store.locked = true;
        try {
          return await fn();
        } finally {
          store.locked = false;
        }
      });
      tail = run.catch(() => {});
      return run;
    },
    load: () => store.latest,
    save(tokens) {
      assert.equal(store.locked, true, 'saved in the lock');
      store.latest = tokens.refreshToken;
      store.saves.push(tokens.refreshToken);
    },
  };
  return store;
}

async function keyed() {
  const sodium = await loadSodium();
  const keys = exportDeviceKeys(sodium, generateDeviceKeys(sodium));
  return { keys, publicKey: keys.publicKey };
}

test('token store: resume and every refresh present the latest stored token, in the lock, and save the new one', async () => {
  const { keys, publicKey } = await keyed();
  const server = refreshServer(publicKey);
  const store = memoryStore('r1');
  // The token the app passes is stale: another tab replaced it with r1.
  const client = await SealpostClient.resume({ baseUrl: 'http://sealpost.test', fetch: server.fetch, tokenStore: store, refreshToken: 'r0', keys });
  assert.deepEqual(server.presented, ['r1']);
  assert.deepEqual(store.saves, ['r2']);
  assert.equal(client.tokens().refreshToken, 'r2');

  // Another client of the session refreshed meanwhile (r2 -> r3).
  store.latest = 'r3';
  const inLock = [];
  client.on('tokens', (t) => inLock.push([t.refreshToken, store.locked]));
  const tokens = await client.refreshTokens();
  assert.deepEqual(server.presented, ['r1', 'r3']);
  assert.equal(tokens.refreshToken, 'r4');
  assert.deepEqual(store.saves, ['r2', 'r4']);
  assert.deepEqual(inLock, [['r4', true]], 'the tokens event fires in the lock, after the save');
  // Nothing newer stored: its own.
  await client.refreshTokens();
  assert.deepEqual(server.presented, ['r1', 'r3', 'r4']);

  // A resume with only the store.
  const second = await SealpostClient.resume({ baseUrl: 'http://sealpost.test', fetch: server.fetch, tokenStore: store, keys });
  assert.deepEqual(server.presented, ['r1', 'r3', 'r4', 'r5']);
  assert.equal(second.tokens().refreshToken, 'r6');
  await assert.rejects(
    SealpostClient.resume({ baseUrl: 'http://sealpost.test', fetch: server.fetch, tokenStore: memoryStore(), keys }),
    (e) => e instanceof SealpostError && e.code === 'unauthorized',
  );
  await assert.rejects(SealpostClient.resume({ baseUrl: 'http://sealpost.test', tokenStore: { load() {} }, keys }), TypeError);
  await client.close();
  await second.close();
});

test('token store: a new session is saved; one closed while waiting for the lock spends nothing', async () => {
  const { keys, publicKey } = await keyed();
  const server = refreshServer(publicKey);
  const store = memoryStore();
  const fresh = await SealpostClient.register({
    baseUrl: 'http://sealpost.test', keys, username: 'Alice', password: 'correct horse', tokenStore: store,
    fetch: fakeServer({ 'POST /v1/register': [201, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1, ...PAIR, user_id: USER }] }).fetch,
  });
  assert.deepEqual(store.saves, ['r1']);
  await fresh.close();

  const resumed = await SealpostClient.resume({ baseUrl: 'http://sealpost.test', fetch: server.fetch, tokenStore: store, keys });
  let release;
  const held = store.withLock(() => new Promise((r) => { release = r; }));
  const refreshing = resumed.refreshTokens();
  await new Promise((r) => setTimeout(r, 20));
  await resumed.close();
  release();
  await held;
  await assert.rejects(refreshing, (e) => e.code === 'unauthorized');
  assert.deepEqual(server.presented, ['r1'], 'only the resume refreshed');
});

test('token store: a failed save is reported and the session goes on; another device\'s session is refused', async () => {
  const { keys, publicKey } = await keyed();
  const server = refreshServer(publicKey, (token) => (token === 'theirs' ? 2 : 1));
  const store = memoryStore('r1');
  const client = await SealpostClient.resume({ baseUrl: 'http://sealpost.test', fetch: server.fetch, tokenStore: store, keys });
  const errors = [];
  client.on('error', (e) => errors.push(e));
  const save = store.save;
  store.save = () => { throw new Error('quota exceeded'); };
  const tokens = await client.refreshTokens();
  assert.equal(tokens.refreshToken, 'r3');
  assert.deepEqual(errors.map((e) => e.message), ['quota exceeded']);
  assert.equal(client.sessionState, 'active');
  store.save = save;

  // The store was given device 2's session: its successor is kept for
  // device 2's clients, and this one (device 1) ends rather than take it.
  store.latest = 'theirs';
  const loggedOut = [];
  client.on('loggedOut', (e) => loggedOut.push(e));
  await assert.rejects(client.refreshTokens(), (e) => e.code === 'unauthorized' && /another device/.test(e.message));
  assert.equal(store.latest, 'theirs-next');
  assert.equal(client.sessionState, 'loggedOut');
  assert.equal(loggedOut.length, 1);
  assert.equal(client.tokens().refreshToken, 'r3');
  await client.close();
});

const SUBSCRIPTION = {
  endpoint: 'https://push.example.net/send/abc',
  expirationTime: null,
  keys: { p256dh: 'BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1XbjhazAkj7I99e8QcYP7DkM', auth: 'tBHItJI5svbpez7KI4CCXg' },
};

test('push targets: a PushSubscription (or its JSON) is a webpush target; a kind is taken as it is', () => {
  const subscription = { toJSON: () => SUBSCRIPTION, endpoint: 'ignored: toJSON says' };
  assert.deepEqual(pushTargetBody(subscription), { kind: 'webpush', ...SUBSCRIPTION });
  assert.deepEqual(pushTargetBody({ ...SUBSCRIPTION, options: { userVisibleOnly: true } }), { kind: 'webpush', ...SUBSCRIPTION });
  assert.deepEqual(pushTargetBody({ kind: 'apns', token: '0a1b', topic: 'com.example.app' }), { kind: 'apns', token: '0a1b', topic: 'com.example.app' });
  assert.deepEqual(pushTargetBody({ kind: 'fcm', token: 't' }), { kind: 'fcm', token: 't' });
  assert.throws(() => pushTargetBody(null), TypeError);
  assert.throws(() => pushTargetBody({ token: 'no kind, no endpoint' }), TypeError);
  assert.ok(WIRE_CODES.includes('push_unavailable'));
});

test('push targets: set, delete, the VAPID key, and a server without Web Push', async () => {
  const { client, server } = await registeredOn((publicKey) => ({
    'POST /v1/register': [201, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1, ...PAIR, user_id: USER }],
    'PUT /v1/devices/1/push': [200, { kind: 'webpush', updated_at: '2026-12-07T18:00:00.123Z' }],
    'DELETE /v1/devices/1/push': [204, null],
    'GET /v1/push/vapid': [200, { public_key: 'BPk' }],
  }));
  assert.deepEqual(await client.setPushTarget({ toJSON: () => SUBSCRIPTION }), { kind: 'webpush', updatedAt: '2026-12-07T18:00:00.123Z' });
  assert.deepEqual(server.bodies.at(-1), ['PUT /v1/devices/1/push', { kind: 'webpush', ...SUBSCRIPTION }]);
  await client.deletePushTarget();
  assert.equal(await client.vapidPublicKey(), 'BPk');
  assert.deepEqual(server.requests.slice(1), ['PUT /v1/devices/1/push', 'DELETE /v1/devices/1/push', 'GET /v1/push/vapid']);
  await client.close();

  // No Web Push: the documented 404 push_unavailable, and an older server's plain 404, are both null.
  for (const answer of [[404, { error: { code: 'push_unavailable', message: 'no webpush' } }], undefined]) {
    const off = await registeredOn((publicKey) => ({
      'POST /v1/register': [201, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1, ...PAIR, user_id: USER }],
      'PUT /v1/devices/1/push': [422, { error: { code: 'push_unavailable', message: 'this server has no apns provider configured', field: 'kind' } }],
      ...(answer ? { 'GET /v1/push/vapid': answer } : {}),
    }));
    assert.equal(await off.client.vapidPublicKey(), null);
    await assert.rejects(off.client.setPushTarget({ kind: 'apns', token: '0a1b', topic: 'x' }), (e) => e.code === 'push_unavailable' && e.field === 'kind');
    await off.client.close();
  }
});

test('urgent: said only when false, and the sync copy never is', async () => {
  const PEER = '8d2f6c1e-0b7a-4f34-9a1d-2c5e7b9f0a13';
  const sodium = await loadSodium();
  const peerKey = exportDeviceKeys(sodium, generateDeviceKeys(sodium)).publicKey;
  const { client, server } = await registeredOn((publicKey) => ({
    'POST /v1/register': [201, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1, ...PAIR, user_id: USER }],
    [`GET /v1/users/${PEER}/devices`]: [200, { user_id: PEER, username: 'bob', devices: [{ device_id: 1, public_key: peerKey }] }],
    [`GET /v1/users/${USER}/devices`]: [200, { user_id: USER, username: 'Alice', devices: [{ device_id: 1, public_key: publicKey }, { device_id: 2, public_key: peerKey }] }],
    'POST /v1/messages': [201, { id: '01a20ab2-3e82-7a14-b6c3-8d2e4f6a1b90', sent_at: '2026-12-07T18:00:00.000Z' }],
  }));
  await client.send(PEER, 'wake them');
  await client.send(PEER, 'it can wait', { urgent: false });
  const sends = server.bodies.filter(([key]) => key === 'POST /v1/messages').map(([, body]) => [body.to, body.urgent]);
  assert.deepEqual(sends, [[PEER, undefined], [USER, false], [PEER, false], [USER, false]]);
  await client.close();
});

test('pushDropped: a ready that says the push target was dropped is told, once per ready', async () => {
  const { client } = await registeredOn((publicKey) => ({
    'POST /v1/register': [201, { id: USER, username: 'Alice', public_key: publicKey, created_at: '2026-01-01T00:00:00.000Z', device_id: 1, ...PAIR, user_id: USER }],
  }));
  const readies = [{ push_dropped: true }, {}];
  class OneFrameSocket {
    constructor() {
      const extra = readies.shift();
      setTimeout(() => {
        this.onopen?.();
        this.onmessage?.({ data: JSON.stringify({ type: 'ready', user_id: USER, device_id: 1, expires_at: '2026-12-07T19:00:00Z', ...extra }) });
        this.onmessage?.({ data: JSON.stringify({ type: 'drained' }) });
      }, 0);
    }

    send() {}

    close(code = 1000, reason = '') {
      setTimeout(() => this.onclose?.({ code, reason }), 0);
    }
  }
  client._opts.WebSocket = OneFrameSocket;
  const dropped = [];
  const ready = [];
  client.on('pushDropped', (x) => dropped.push(x));
  client.on('ready', (x) => ready.push(x.pushDropped));
  await client.connect();
  await client.waitForDrained();
  assert.deepEqual(dropped, [{ deviceId: 1 }]);
  assert.deepEqual(ready, [true]);
  client.disconnect();
  await client.connect();
  assert.deepEqual(ready, [true, undefined]);
  assert.equal(dropped.length, 1);
  await client.close();
});

test('resume with kept tokens: a fresh access token is used as it is; a stale one is refreshed in the lock', async () => {
  const { keys, publicKey } = await keyed();
  const server = refreshServer(publicKey);
  const store = memoryStore('r7');
  const kept = { accessToken: 'kept.access.token', refreshToken: 'r1', expiresAt: Date.now() + 10 * 60_000, deviceId: 1, userId: USER };
  const fresh = await SealpostClient.resume({ baseUrl: 'http://sealpost.test', fetch: server.fetch, tokenStore: store, tokens: kept, keys });
  assert.deepEqual(server.presented, [], 'no refresh spent');
  assert.equal(fresh.tokens().accessToken, 'kept.access.token');
  assert.equal(fresh.userId, USER);
  await fresh.close();
  // Less than a minute left: refreshed, with the store's latest token.
  const stale = await SealpostClient.resume({ baseUrl: 'http://sealpost.test', fetch: server.fetch, tokenStore: store, tokens: { ...kept, expiresAt: Date.now() + 30_000 }, keys });
  assert.deepEqual(server.presented, ['r7']);
  assert.equal(stale.tokens().refreshToken, 'r8');
  await stale.close();
});
