// Two tabs of one account in one browser: the second opens the demo and
// resumes the session from the refresh token the first stored, and from
// then on each refreshes on its own timer. Against a demo server with
// 6-second access tokens and no refresh grace (SEALPOST_DEMO_TABS_URL), a
// tab that refreshed with a token the other had spent would end every
// session of the account at once (with the default grace, 30 s later):
// both tabs would be back at the sign-in form. They must take turns (a Web
// Lock) and use the token stored last, through several refreshes each.
//
// Needs Debian's chromium (CHROMIUM, default /usr/bin/chromium); fails,
// never skips, without it or the server. `cargo test` runs it
// (tests/it/js.rs).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

const url = process.env.SEALPOST_DEMO_TABS_URL;
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const TIMEOUT = 30_000;
const PASSWORD = 'correct horse battery staple';
/** Timer refreshes each tab must come through. */
const REFRESHES = 3;

test('two tabs of one account stay signed in across several refreshes each', { timeout: 180_000 }, async () => {
  assert.ok(url, 'set SEALPOST_DEMO_TABS_URL to a sealpost server started with SEALPOST_DEMO=true, a short SEALPOST_ACCESS_TOKEN_TTL and SEALPOST_REFRESH_GRACE=0');
  assert.ok(existsSync(executablePath), `no browser at ${executablePath}: apt-get install chromium, or set CHROMIUM`);
  const browser = await chromium.launch({ executablePath, headless: true, args: ['--no-sandbox'] });
  const problems = [];
  try {
    // One context: one browser profile, its localStorage and locks shared by its pages.
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const name = `tabs_${Math.random().toString(36).slice(2, 8)}`;
    const first = await open(context, 'first', problems);
    await first.page.locator('#signin:not(.hidden)').waitFor({ timeout: TIMEOUT });
    await first.page.fill('#username', name);
    await first.page.fill('#password', PASSWORD);
    await first.page.click('#signup');
    await drained(first);

    // The second tab resumes the session the first stored: no password.
    const second = await open(context, 'second', problems);
    await drained(second);
    assert.deepEqual(second.refreshes.map((r) => r.status), [200], 'the second tab resumed by a refresh');
    assert.ok(!second.requests.includes('POST /v1/login'), second.requests.join(', '));

    // Each tab's own timer refreshes at 80% of 6 s. A reuse would end the
    // session and send both tabs to the sign-in form: stop waiting then.
    const tabs = [first, second];
    const deadline = Date.now() + (REFRESHES + 3) * 6_000;
    const timerRefreshes = (tab) => tab.refreshes.length - (tab === second ? 1 : 0);
    while (tabs.some((tab) => timerRefreshes(tab) < REFRESHES) && Date.now() < deadline) {
      if (await signedOut(tabs)) break;
      await new Promise((r) => setTimeout(r, 250));
    }
    const report = () => JSON.stringify(tabs.map((t) => ({ tab: t.name, refreshes: t.refreshes, status: t.status })));
    for (const tab of tabs) {
      tab.status = await tab.page.locator('#status').getAttribute('data-state');
      assert.equal(await tab.page.locator('#signin').isHidden(), true, `${tab.name} tab signed out: ${report()}`);
    }
    for (const tab of tabs) {
      assert.ok(timerRefreshes(tab) >= REFRESHES, `${tab.name} tab: ${report()}`);
      assert.ok(tab.refreshes.every((r) => r.status === 200), `${tab.name} tab: ${report()}`);
      assert.equal(tab.status, 'drained', `${tab.name} tab: ${report()}`);
    }
    // No refresh token was presented twice (the server had none to refuse), and both tabs' went into one chain.
    const presented = tabs.flatMap((t) => t.refreshes.map((r) => r.presented));
    assert.equal(new Set(presented).size, presented.length, report());

    // The token stored last is live: a reload of the first tab resumes from it.
    first.refreshes.length = 0;
    await first.page.reload();
    await drained(first);
    assert.deepEqual(first.refreshes.map((r) => r.status), [200]);
    await second.page.locator('#devices li', { hasText: '1:' }).waitFor({ timeout: TIMEOUT });
    assert.equal(await second.page.locator('#signin').isHidden(), true);

    assert.deepEqual(problems, [], 'no page errors');
  } finally {
    await browser.close();
  }
});

/** A new tab of `context` on the demo, recording its requests and its refreshes (the token presented, the status). */
async function open(context, name, problems) {
  const page = await context.newPage();
  const requests = [];
  const refreshes = [];
  page.on('pageerror', (err) => problems.push(`${name}: ${err.message}`));
  page.on('console', (msg) => {
    // A server without Web Push answers the page's GET /v1/push/vapid 404
    // (the page then says quietly that it sends no wake-ups).
    if (msg.type() === 'error' && !msg.location()?.url?.endsWith('/v1/push/vapid')) problems.push(`${name}: ${msg.text()}`);
  });
  page.on('request', (request) => requests.push(`${request.method()} ${new URL(request.url()).pathname}`));
  page.on('response', (response) => {
    const request = response.request();
    if (request.method() === 'POST' && new URL(response.url()).pathname === '/v1/token/refresh') {
      refreshes.push({ presented: JSON.parse(request.postData()).refresh_token, status: response.status() });
    }
  });
  await page.goto(new URL('/demo/', url).href);
  return { name, page, requests, refreshes };
}

async function drained({ page }) {
  await page.locator('#status[data-state="drained"]').waitFor({ timeout: TIMEOUT });
}

async function signedOut(tabs) {
  for (const { page } of tabs) {
    if (await page.locator('#signin:not(.hidden)').count() > 0) return true;
  }
  return false;
}
