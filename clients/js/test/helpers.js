// Test helpers for the integration tests: the server under test (from the
// environment, never guessed), fresh accounts, waiting for events, and a
// proxy that loses answers.
import { test } from 'node:test';
import net from 'node:net';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { SealpostClient } from '../src/index.js';

const HOW = `Start a sealpost server and point the tests at it, e.g.

  SEALPOST_ADDR=127.0.0.1:18400 DATABASE_URL=sqlite:///tmp/jsdev.db \\
  SEALPOST_JWT_SECRET=dev-secret-dev-secret-dev-secret-0123456 \\
  SEALPOST_AUTH_RATE_PER_MINUTE=0 SEALPOST_SEND_RATE_PER_SECOND=0 sealpost serve &
  SEALPOST_ADDR=127.0.0.1:18401 DATABASE_URL=sqlite:///tmp/jsdev-ttl.db SEALPOST_ACCESS_TOKEN_TTL=8s \\
  SEALPOST_JWT_SECRET=dev-secret-dev-secret-dev-secret-0123456 \\
  SEALPOST_AUTH_RATE_PER_MINUTE=0 SEALPOST_SEND_RATE_PER_SECOND=0 sealpost serve &
  SEALPOST_ADDR=127.0.0.1:18402 DATABASE_URL=sqlite:///tmp/jsdev-ng.db SEALPOST_ACCESS_TOKEN_TTL=6s SEALPOST_REFRESH_GRACE=0 \\
  SEALPOST_JWT_SECRET=dev-secret-dev-secret-dev-secret-0123456 \\
  SEALPOST_AUTH_RATE_PER_MINUTE=0 SEALPOST_SEND_RATE_PER_SECOND=0 sealpost serve &
  SEALPOST_ADDR=127.0.0.1:18403 DATABASE_URL=sqlite:///tmp/jsdev-push.db SEALPOST_PUSH_ALLOW_HOSTS=push.test \\
  SEALPOST_VAPID_SUBJECT=mailto:ops@example.com SEALPOST_APNS_KEY_FILE=AuthKey.p8 SEALPOST_APNS_KEY_ID=ABCDE12345 \\
  SEALPOST_APNS_TEAM_ID=TEAM123456 SEALPOST_JWT_SECRET=dev-secret-dev-secret-dev-secret-0123456 \\
  SEALPOST_AUTH_RATE_PER_MINUTE=0 SEALPOST_SEND_RATE_PER_SECOND=0 sealpost serve &
  SEALPOST_TEST_URL=http://127.0.0.1:18400 SEALPOST_TEST_URL_SHORT_TTL=http://127.0.0.1:18401 \\
  SEALPOST_TEST_URL_NO_GRACE=http://127.0.0.1:18402 SEALPOST_TEST_URL_PUSH=http://127.0.0.1:18403 npm test

(AuthKey.p8: any P-256 key in PKCS#8 PEM: openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256.)`;

/**
 * The URL in `name`, or a failing test that says how to set it (the suite
 * must never pass by testing nothing).
 */
export function serverUrl(name) {
  const url = process.env[name];
  if (!url) {
    test(`${name} is set`, () => {
      assert.fail(`${name} is not set: these tests run against a real sealpost server.\n${HOW}`);
    });
    return null;
  }
  return url.replace(/\/+$/, '');
}

/**
 * A WebSocket class for the client that records every socket, so a test can
 * cut one, and every frame the client writes (parsed), in order.
 */
export function recordingWebSocket() {
  const sockets = [];
  const frames = [];
  class Recording extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }

    send(data, ...rest) {
      frames.push(JSON.parse(String(data)));
      return super.send(data, ...rest);
    }
  }
  return { WebSocket: Recording, sockets, frames };
}

/**
 * A `fetch` for the client that records the body of every `POST
 * /v1/messages` (parsed), and every request as "METHOD /path", in order.
 */
export function recordingFetch() {
  const sends = [];
  const requests = [];
  const fetch = (input, init) => {
    const path = new URL(String(input)).pathname;
    requests.push(`${init?.method ?? 'GET'} ${path}`);
    if (init?.method === 'POST' && path === '/v1/messages') sends.push(JSON.parse(init.body));
    return globalThis.fetch(input, init);
  };
  return { fetch, sends, requests };
}

/**
 * A TCP proxy in front of the server that loses answers (as
 * tests/it/common/proxy.rs does for the Rust tests). It relays both ways,
 * except on the connections picked, the first `times` of them: there the
 * server's answer is not relayed and the connection is closed instead, so
 * the client sees a request the server did handle fail like a dropped
 * connection.
 *
 * - `answerTo`: the answer to a request whose bytes contain this (e.g.
 *   `POST /v1/messages HTTP/1.1`; one request at a time per connection, so
 *   the server's next bytes are its answer).
 * - `answer`: server bytes that contain this (e.g. `"type":"sent"`: the
 *   server's WebSocket frames are neither masked nor compressed).
 *
 * @param {string} target the server's URL
 * @param {{answerTo?: string, answer?: string, times?: number}} cut
 * @returns {Promise<{url: string, cuts: number, close: () => Promise<void>}>}
 */
export async function lossyProxy(target, { answerTo, answer, times = 1 }) {
  const { hostname, port } = new URL(target);
  let left = times;
  const open = new Set();
  const proxy = { url: '', cuts: 0, close: null };
  // Whether `needle` is in the end of the last chunk plus this one (a needle split across reads is found).
  const spotter = (needle) => {
    let tail = '';
    return (chunk) => {
      const text = tail + chunk.toString('latin1');
      tail = text.slice(Math.max(0, text.length - needle.length + 1));
      return text.includes(needle);
    };
  };
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    const end = () => {
      client.destroy();
      upstream.destroy();
      open.delete(client);
    };
    open.add(client);
    // Set before the request that earns it is relayed, so its answer is the next thing from the server.
    let doomed = false;
    const request = answerTo && spotter(answerTo);
    const reply = answer && spotter(answer);
    client.on('data', (chunk) => {
      if (request && !doomed && request(chunk) && left > 0) {
        left--;
        doomed = true;
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk) => {
      let lose = doomed;
      if (reply && reply(chunk) && left > 0) {
        left--;
        lose = true;
      }
      if (lose) {
        proxy.cuts++;
        return end();
      }
      client.write(chunk);
    });
    for (const s of [client, upstream]) {
      s.on('close', end);
      s.on('error', end);
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  proxy.url = `http://127.0.0.1:${server.address().port}`;
  proxy.close = () => new Promise((resolve) => {
    for (const s of open) s.destroy();
    server.close(() => resolve());
  });
  return proxy;
}

/**
 * A TCP proxy in front of the server that can play a server that is down:
 * `down()` cuts every open connection and refuses new ones (accepted and
 * closed at once, as a port nobody listens on fails a request), `up()`
 * relays again.
 * @param {string} target the server's URL
 * @returns {Promise<{url: string, down: () => void, up: () => void, close: () => Promise<void>}>}
 */
export async function switchableProxy(target) {
  const { hostname, port } = new URL(target);
  const open = new Set();
  let isDown = false;
  const server = net.createServer((client) => {
    if (isDown) return client.destroy();
    const upstream = net.connect(Number(port), hostname);
    const pair = { client, upstream };
    open.add(pair);
    const end = () => {
      client.destroy();
      upstream.destroy();
      open.delete(pair);
    };
    client.pipe(upstream);
    upstream.pipe(client);
    for (const s of [client, upstream]) {
      s.on('close', end);
      s.on('error', end);
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const cutAll = () => {
    for (const { client, upstream } of open) {
      client.destroy();
      upstream.destroy();
    }
    open.clear();
  };
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    down() {
      isDown = true;
      cutAll();
    },
    up() {
      isDown = false;
    },
    close: () => new Promise((resolve) => {
      cutAll();
      server.close(() => resolve());
    }),
  };
}

let counter = 0;
export function uniqueName(prefix) {
  return `${prefix}${Date.now().toString(36)}${(counter++).toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
}

export const PASSWORD = 'correct horse battery staple';

/** Options every client in the tests gets: Node's `ws`, and quick reconnects. */
export function clientOptions(baseUrl, extra = {}) {
  return { baseUrl, WebSocket, backoff: { baseMs: 100, capMs: 1000 }, ...extra };
}

/** A new account with `devices` devices: an array of logged-in clients, device 1 first. */
export async function newAccount(baseUrl, prefix, devices = 2, extra = {}) {
  const username = uniqueName(prefix);
  const first = await SealpostClient.register({ ...clientOptions(baseUrl, extra), username, password: PASSWORD });
  const clients = [first];
  for (let i = 1; i < devices; i++) {
    clients.push(await SealpostClient.addDevice({ ...clientOptions(baseUrl, extra), username, password: PASSWORD, name: `${prefix}-${i + 1}` }));
  }
  return Object.assign(clients, { username });
}

/** Resolves with the next `event` for which `predicate` holds; fails after `ms`. */
export function nextEvent(emitter, event, { ms = 10_000, predicate = () => true } = {}) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} event within ${ms} ms`));
    }, ms);
    const off = emitter.on(event, (x) => {
      if (!predicate(x)) return;
      clearTimeout(timer);
      off();
      resolve(x);
    });
  });
}

/** Collects `message` events until `count` arrived (fails on timeout with what it got). */
export function collectMessages(client, count, ms = 10_000) {
  const got = [];
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`expected ${count} messages within ${ms} ms, got ${got.length}: ${JSON.stringify(got)}`));
    }, ms);
    const off = client.on('message', (m) => {
      got.push(m);
      if (got.length === count) {
        clearTimeout(timer);
        off();
        resolve(got);
      }
    });
  });
}

/** Polls `fn` until it returns a truthy value; fails after `ms`. */
export async function eventually(fn, { ms = 10_000, every = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`${what} not reached within ${ms} ms`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** Waits `ms`, to show that something does NOT happen in that time. */
export const pause = (ms) => new Promise((r) => setTimeout(r, ms));

/** The device's queue as the server has it (REST), without going through the client's stream. */
export async function queued(client) {
  const page = await client.request('GET', '/v1/messages?limit=500');
  return page.messages;
}

export async function closeAll(...clients) {
  await Promise.all(clients.flat().map((c) => c.close()));
}

/**
 * Waits until the device's queue on the server is empty. An ack frame on
 * the socket has no reply, so a REST read right after it may still see the
 * copy: wait for the server instead of assuming.
 */
export async function eventuallyEmpty(client, what = 'queue empty') {
  let last;
  try {
    await eventually(async () => (last = await queued(client)).length === 0, { what });
  } catch (err) {
    err.message += `: still queued ${JSON.stringify(last?.map((m) => m.id))}`;
    throw err;
  }
}
