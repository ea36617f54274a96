// The demo's service worker (demo/sw.js) handles a wake-up in Chromium.
// Chromium cannot subscribe to push without Google's service, so the push
// is handed to the registered worker through the DevTools protocol
// (`ServiceWorker.deliverPushMessage`), as the server's wake-up would be:
// content-free. Bob signs up (his page registers the worker and stores his
// session in IndexedDB), closes the page; Alice writes to him; the push
// makes the worker read Bob's queue over REST, open Alice's message with
// his device key and show it, named and in clear, as a notification
// (`registration.getNotifications()`), on the kept access token; once that
// has run out, after a refresh whose tokens it stores for the page. It
// acks nothing: Bob's page, opened again, still receives the message.
// Signed out (no session stored), a push shows "New message".
//
// Needs a server with SEALPOST_DEMO=true at SEALPOST_DEMO_PUSH_URL and
// Debian's chromium (CHROMIUM, default /usr/bin/chromium); fails, never
// skips, without them. `cargo test` runs it (tests/it/js.rs).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

const url = process.env.SEALPOST_DEMO_PUSH_URL;
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const TIMEOUT = 30_000;
const PASSWORD = 'correct horse battery staple';

test('a push to the demo\'s service worker shows the waiting message, named and decrypted', { timeout: 180_000 }, async () => {
  assert.ok(url, 'set SEALPOST_DEMO_PUSH_URL to a sealpost server started with SEALPOST_DEMO=true');
  assert.ok(existsSync(executablePath), `no browser at ${executablePath}: apt-get install chromium, or set CHROMIUM`);
  const origin = new URL(url).origin;
  const browser = await chromium.launch({ executablePath, headless: true, args: ['--no-sandbox'] });
  const problems = [];
  try {
    const suffix = Math.random().toString(36).slice(2, 8);
    const bob = await open(browser, `bob_${suffix}`, problems, { permissions: ['notifications'] });
    const alice = await open(browser, `alice_${suffix}`, problems);
    await signUp(bob);
    // The page registered the worker; the server here has no Web Push, which the page says quietly.
    await bob.page.locator('#push-status', { hasText: 'Notifications' }).waitFor({ timeout: TIMEOUT });
    const registrationId = await workerOf(bob, origin);

    // Bob closes the demo (a page outside it, of the same origin, to ask
    // the worker's registration): his socket goes, nothing acks.
    await leave(bob);
    await signUp(alice);
    await find(alice, bob.name);
    const text = `sealed for the notification ${suffix}`;
    await say(alice, text);
    await alice.page.locator('#messages li.mine .tick:is([data-state="sent"], [data-state="delivered"])').waitFor({ timeout: TIMEOUT });

    const before = await storedTokens(bob);
    await bob.cdp.send('ServiceWorker.deliverPushMessage', { origin, registrationId, data: '{"type":"wake"}' });
    const shown = await notifications(bob, (list) => list.length > 0);
    assert.deepEqual(shown.map((n) => [n.title, n.body]), [[alice.name, text]], JSON.stringify(shown));
    // On the kept access token: no refresh spent.
    assert.equal((await storedTokens(bob)).refreshToken, before.refreshToken);

    // The kept access token has run out: the worker refreshes (in the
    // tabs' lock) and stores the new tokens for the page and the next push.
    await clearNotifications(bob);
    await storeTokens(bob, { ...before, expiresAt: Date.now() - 1000 });
    await bob.cdp.send('ServiceWorker.deliverPushMessage', { origin, registrationId, data: '{"type":"wake"}' });
    const again = await notifications(bob, (list) => list.length > 0);
    assert.deepEqual(again.map((n) => [n.title, n.body]), [[alice.name, text]], JSON.stringify(again));
    const after = await storedTokens(bob);
    assert.notEqual(after.refreshToken, before.refreshToken, 'the refreshed tokens are stored');
    assert.ok(after.expiresAt > Date.now(), JSON.stringify({ expiresAt: after.expiresAt }));

    // Not acked by the worker: the page, opened again, receives it.
    await clearNotifications(bob);
    await bob.page.goto(new URL('/demo/', url).href);
    await bob.page.locator('#status[data-state="drained"]').waitFor({ timeout: TIMEOUT });
    await bob.page.locator(`#contacts li[data-user="${alice.name}"]`).click({ timeout: TIMEOUT });
    await bob.page.locator('#messages li', { hasText: text }).waitFor({ timeout: TIMEOUT });

    // Signed out: no session for the worker to read the queue with.
    await bob.page.click('#signout');
    await bob.page.locator('#signin:not(.hidden)').waitFor({ timeout: TIMEOUT });
    await leave(bob);
    await say(alice, 'one more, unreadable without the session');
    await bob.cdp.send('ServiceWorker.deliverPushMessage', { origin, registrationId, data: '{"type":"wake"}' });
    const fallback = await notifications(bob, (list) => list.length > 0);
    assert.deepEqual(fallback.map((n) => n.title), ['New message'], JSON.stringify(fallback));
    assert.ok(!fallback.some((n) => n.body.includes('unreadable')), 'nothing of the message is shown');

    assert.deepEqual(problems, [], 'no page or worker errors');
  } finally {
    await browser.close();
  }
});

async function open(browser, name, problems, options = {}) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, ...options });
  const page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`${name}: ${err.message}`));
  page.on('console', (msg) => {
    // A refusal by the API is the page's to show (a server without Web
    // Push answers GET /v1/push/vapid 404), and the browser asks for
    // /favicon.ico on the page outside the demo that `leave` opens.
    const path = pathOf(msg.location()?.url);
    if (msg.type() === 'error' && !path.startsWith('/v1/') && path !== '/favicon.ico') problems.push(`${name}: ${msg.text()} (${path})`);
  });
  await page.goto(new URL('/demo/', url).href);
  // The DevTools protocol, to find the worker's registration and push to it.
  const cdp = await context.newCDPSession(page);
  return { name, context, page, cdp };
}

function pathOf(address) {
  try {
    return new URL(address).pathname;
  } catch {
    return '';
  }
}

/** The id of the demo's worker registration, once it is activated. */
async function workerOf({ page, cdp }, origin) {
  await page.evaluate(() => navigator.serviceWorker.ready.then(() => undefined));
  const scope = `${origin}/demo/`;
  const registrations = new Map();
  const versions = [];
  cdp.on('ServiceWorker.workerRegistrationUpdated', ({ registrations: list }) => {
    for (const r of list) registrations.set(r.registrationId, r);
  });
  cdp.on('ServiceWorker.workerVersionUpdated', ({ versions: list }) => versions.push(...list));
  await cdp.send('ServiceWorker.enable');
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const found = [...registrations.values()].find((r) => r.scopeURL === scope && !r.isDeleted);
    const active = found && versions.some((v) => v.registrationId === found.registrationId && v.status === 'activated');
    if (found && active) return found.registrationId;
    assert.ok(Date.now() < deadline, `no activated worker for ${scope}: ${JSON.stringify([...registrations.values()])} ${JSON.stringify(versions)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Leaves the demo for a page of the same origin outside it: no app, no socket. */
async function leave({ page }) {
  await page.goto(new URL('/demo/style.css', url).href);
}

/** The notifications the demo's worker shows, once `ready(list)` holds. */
async function notifications({ page }, ready) {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const list = await page.evaluate(async () => {
      const registration = await navigator.serviceWorker.getRegistration('/demo/');
      const shown = await registration.getNotifications();
      return shown.map((n) => ({ title: n.title, body: n.body, tag: n.tag }));
    });
    if (ready(list)) return list;
    assert.ok(Date.now() < deadline, `no notification in time: ${JSON.stringify(list)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** The session's tokens as the page and the worker keep them (demo/store.js). */
function storedTokens({ page, name }) {
  return page.evaluate(idb, { key: `tokens:${name}` });
}

function storeTokens({ page, name }, value) {
  return page.evaluate(idb, { key: `tokens:${name}`, value });
}

/** In the page: reads `key` of the demo's IndexedDB store, or writes `value` there. */
function idb({ key, value }) {
  return new Promise((resolve, reject) => {
    const open = indexedDB.open('sealpost-demo');
    open.onerror = () => reject(open.error);
    open.onsuccess = () => {
      const tx = open.result.transaction('kv', value === undefined ? 'readonly' : 'readwrite');
      const request = value === undefined ? tx.objectStore('kv').get(key) : tx.objectStore('kv').put(value, key);
      tx.oncomplete = () => {
        open.result.close();
        resolve(value === undefined ? request.result : undefined);
      };
      tx.onerror = () => reject(tx.error);
    };
  });
}

async function clearNotifications({ page }) {
  await page.evaluate(async () => {
    const registration = await navigator.serviceWorker.getRegistration('/demo/');
    for (const n of await registration.getNotifications()) n.close();
  });
}

async function signUp({ name, page }) {
  await page.locator('#signin:not(.hidden)').waitFor({ timeout: TIMEOUT });
  await page.fill('#username', name);
  await page.fill('#password', PASSWORD);
  await page.click('#signup');
  await page.locator('#status[data-state="drained"]').waitFor({ timeout: TIMEOUT });
}

async function find({ page }, other) {
  await page.fill('#find', other);
  await page.click('#find-button');
  await page.locator('#chat-title', { hasText: other }).waitFor({ timeout: TIMEOUT });
}

async function say({ page }, text) {
  await page.fill('#text', text);
  await page.click('#send');
}
