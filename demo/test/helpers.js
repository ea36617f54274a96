// What the demo page's browser tests share: the server and browser they
// are pointed at, and the steps a person takes on the page (open it, sign
// up or in, find someone, make a group, write), each waiting, bounded by
// TIMEOUT, for the page to show it done.

import { chromium } from 'playwright-core';
import { existsSync } from 'node:fs';
import assert from 'node:assert/strict';

export const url = process.env.SEALPOST_DEMO_URL;
export const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
export const shots = process.env.SEALPOST_SCREENSHOTS ?? new URL('../../target/demo-screenshots/', import.meta.url).pathname;
// Generous: CI runs this beside the rest of the suite on two cores.
export const TIMEOUT = 30_000;
export const PASSWORD = 'correct horse battery staple';

/** Chromium, headless, once the demo server's URL and the browser are there (fails, never skips, without them). */
export async function launch() {
  assert.ok(url, 'set SEALPOST_DEMO_URL to a sealpost server started with SEALPOST_DEMO=true');
  assert.ok(existsSync(executablePath), `no browser at ${executablePath}: apt-get install chromium, or set CHROMIUM`);
  return chromium.launch({ executablePath, headless: true, args: ['--no-sandbox'] });
}

export async function newGroup({ page }, name, members) {
  if ((await page.locator('#new-group[open]').count()) === 0) await page.click('#new-group summary');
  await page.fill('#group-name', name);
  await page.fill('#group-members', members);
  await page.click('#group-create');
}

export async function open(browser, name, problems) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const requests = [];
  page.on('pageerror', (err) => problems.push(`${name}: ${err.message}`));
  page.on('console', (msg) => {
    // A server without Web Push answers the page's GET /v1/push/vapid 404
    // (the page then says quietly that it sends no wake-ups).
    if (msg.type() === 'error' && !msg.location()?.url?.endsWith('/v1/push/vapid')) problems.push(`${name}: ${msg.text()}`);
  });
  page.on('request', (request) => requests.push(`${request.method()} ${new URL(request.url()).pathname}`));
  // Which resource a console 404 was about; the API's own refusals (a
  // contact not found) are the page's to show, not errors.
  page.on('response', (response) => {
    if (response.status() >= 400 && !new URL(response.url()).pathname.startsWith('/v1/')) {
      problems.push(`${name}: ${response.status()} for ${response.url()}`);
    }
  });
  await page.goto(new URL('/demo/', url).href);
  return { name, page, requests };
}

export async function signUp({ name, page }) {
  await page.locator('#signin:not(.hidden)').waitFor({ timeout: TIMEOUT });
  await page.fill('#username', name);
  await page.fill('#password', PASSWORD);
  await page.click('#signup');
  await page.locator('#status[data-state="drained"]').waitFor({ timeout: TIMEOUT });
}

export async function signIn({ name, page }) {
  await page.locator('#signin:not(.hidden)').waitFor({ timeout: TIMEOUT });
  await page.fill('#username', name);
  await page.fill('#password', PASSWORD);
  await page.click('#login');
  await page.locator('#status[data-state="drained"]').waitFor({ timeout: TIMEOUT });
}

export async function find({ page }, other) {
  await page.fill('#find', other);
  await page.click('#find-button');
  await page.locator('#chat-title', { hasText: other }).waitFor({ timeout: TIMEOUT });
}

export async function say({ page }, text) {
  await page.fill('#text', text);
  await page.click('#send');
}

export function mine({ page }, text) {
  return page.locator('#messages li.mine', { hasText: text });
}

export async function delivered(who, text) {
  await mine(who, text).locator('.tick[data-state="delivered"]').waitFor({ timeout: TIMEOUT });
}
