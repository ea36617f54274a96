// The demo page in a real browser: two people sign up in two browser
// contexts (two separate browsers, as far as storage goes), find each
// other, chat both ways, see the delivered tick, and the page shows only
// ciphertext as what the server holds. Screenshots go to
// SEALPOST_SCREENSHOTS (default: target/demo-screenshots).
//
// Needs a server with SEALPOST_DEMO=true at SEALPOST_DEMO_URL, and Debian's
// chromium (CHROMIUM, default /usr/bin/chromium); fails, never skips,
// without them. `cargo test` runs it (tests/it/js.rs).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, existsSync } from 'node:fs';
import { chromium } from 'playwright-core';

const url = process.env.SEALPOST_DEMO_URL;
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const shots = process.env.SEALPOST_SCREENSHOTS ?? new URL('../../target/demo-screenshots/', import.meta.url).pathname;
// Generous: CI runs this beside the rest of the suite on two cores.
const TIMEOUT = 30_000;

test('two people chat end to end in the demo page', { timeout: 120_000 }, async () => {
  assert.ok(url, 'set SEALPOST_DEMO_URL to a sealpost server started with SEALPOST_DEMO=true');
  assert.ok(existsSync(executablePath), `no browser at ${executablePath}: apt-get install chromium, or set CHROMIUM`);
  mkdirSync(shots, { recursive: true });
  const browser = await chromium.launch({ executablePath, headless: true, args: ['--no-sandbox'] });
  const problems = [];
  try {
    const suffix = Math.random().toString(36).slice(2, 8);
    const alice = await open(browser, `alice_${suffix}`, problems);
    const bob = await open(browser, `bob_${suffix}`, problems);
    for (const who of [alice, bob]) await signUp(who);

    // Alice finds Bob and writes; Bob's page acks it, Alice sees ✓✓.
    await find(alice, bob.name);
    await say(alice, 'hello Bob, this is sealed in my browser');
    await bob.page.locator('#contacts li').first().waitFor({ timeout: TIMEOUT });
    await find(bob, alice.name);
    await bob.page.getByText('hello Bob, this is sealed in my browser').waitFor({ timeout: TIMEOUT });
    await delivered(alice, 'hello Bob, this is sealed in my browser');

    // And back.
    await say(bob, 'hi Alice, and this in mine');
    await alice.page.getByText('hi Alice, and this in mine').waitFor({ timeout: TIMEOUT });
    await delivered(bob, 'hi Alice, and this in mine');

    // The panel shows what crossed the server: base64 envelopes, with no
    // trace of the text.
    const wire = await alice.page.locator('#ciphertext').textContent();
    assert.match(wire, /device \d+:\n[A-Za-z0-9+/]+=*/);
    assert.ok(!wire.includes('Alice'), 'the sealed body shows no plaintext');
    const body = wire.split('\n')[1];
    const bytes = Buffer.from(body, 'base64');
    assert.equal(bytes[0], 0x01, 'version byte of the client body format');
    assert.ok(bytes.length >= 41 + 'hi Alice, and this in mine'.length);

    await alice.page.screenshot({ path: `${shots}/alice.png`, fullPage: true });
    await bob.page.screenshot({ path: `${shots}/bob.png`, fullPage: true });
    assert.deepEqual(problems, [], 'no CSP violations or page errors');
  } finally {
    await browser.close();
  }
});

async function open(browser, name, problems) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  page.on('pageerror', (err) => problems.push(`${name}: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') problems.push(`${name}: ${msg.text()}`);
  });
  // Which resource a console 404 was about; the API's own refusals (a
  // contact not found) are the page's to show, not errors.
  page.on('response', (response) => {
    if (response.status() >= 400 && !new URL(response.url()).pathname.startsWith('/v1/')) {
      problems.push(`${name}: ${response.status()} for ${response.url()}`);
    }
  });
  await page.goto(new URL('/demo/', url).href);
  return { name, page };
}

async function signUp({ name, page }) {
  await page.fill('#username', name);
  await page.fill('#password', 'correct horse battery staple');
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

async function delivered({ page }, text) {
  await page
    .locator('#messages li.mine', { hasText: text })
    .locator('.tick[data-state="delivered"]')
    .waitFor({ timeout: TIMEOUT });
}
