// The demo page's part of the three-client group chat (tests/it/js.rs,
// `rust_js_and_demo_chat_in_one_group`, drives the other two: a Rust client
// and a JS client in Node). The person at the page signs up as
// INTEROP_DEMO_NAME, makes a group named INTEROP_GROUP with INTEROP_RUST_NAME
// and INTEROP_JS_NAME by "New group", writes the first message (which tells
// the others the group and its members), and then waits, bounded, for the
// JS user's and the Rust user's messages to show in that group's
// conversation, each once and said by its sender.
//
// Needs a server with SEALPOST_DEMO=true at SEALPOST_DEMO_URL on which the
// other two have signed up, and Chromium (CHROMIUM); fails, never skips,
// without them.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { shots, TIMEOUT, launch, newGroup, open, signUp, say, mine } from './helpers.js';

const {
  INTEROP_DEMO_NAME: demoName, INTEROP_RUST_NAME: rustName, INTEROP_JS_NAME: jsName, INTEROP_GROUP: groupName,
} = process.env;
// The texts each side writes; the Rust and JS sides expect the same.
const FROM_DEMO = 'hello from the demo';
const FROM_JS = 'hello from js';
const FROM_RUST = 'hello from rust';

test('the demo page chats in one group with a Rust and a JS client', { timeout: 180_000 }, async () => {
  for (const [name, value] of Object.entries({ INTEROP_DEMO_NAME: demoName, INTEROP_RUST_NAME: rustName, INTEROP_JS_NAME: jsName, INTEROP_GROUP: groupName })) {
    assert.ok(value, `set ${name} (tests/it/js.rs sets it)`);
  }
  mkdirSync(shots, { recursive: true });
  const browser = await launch();
  const problems = [];
  try {
    const demo = await open(browser, demoName, problems);
    await signUp(demo);

    // The group, made on the page from the others' usernames, is open.
    await newGroup(demo, groupName, `${rustName}, ${jsName}`);
    const title = demo.page.locator('#chat-title');
    await title.filter({ hasText: groupName }).waitFor({ timeout: TIMEOUT });
    for (const name of [rustName, jsName]) await title.filter({ hasText: name }).waitFor({ timeout: TIMEOUT });
    await say(demo, FROM_DEMO);
    await mine(demo, FROM_DEMO).locator('.tick:is([data-state="sent"], [data-state="delivered"])').waitFor({ timeout: TIMEOUT });

    // The others' answers land in the group's conversation (the open
    // one: a message filed anywhere else would not show here), each said
    // by its sender.
    for (const [text, author] of [[FROM_JS, jsName], [FROM_RUST, rustName]]) {
      const said = demo.page.locator('#messages li:not(.mine)', { hasText: text });
      try {
        await said.waitFor({ timeout: 2 * TIMEOUT });
      } catch (err) {
        const shown = await demo.page.locator('#messages').innerText();
        throw new Error(`the demo page did not show "${text}" from ${author} in ${groupName}; it shows:\n${shown}`, { cause: err });
      }
      assert.equal(await said.locator('.author').innerText(), author, `"${text}" is said by ${author}`);
    }
    assert.match(await title.innerText(), new RegExp(groupName), 'still in the group');
    assert.equal(await demo.page.locator('#contacts li.group').count(), 1, 'one group, no second one made up from a reply');
    for (const text of [FROM_DEMO, FROM_JS, FROM_RUST]) {
      assert.equal(await demo.page.locator('#messages li', { hasText: text }).count(), 1, `"${text}" shown once`);
    }
    await demo.page.screenshot({ path: `${shots}/group-interop.png`, fullPage: true });
    assert.deepEqual(problems, [], 'no CSP violations or page errors');
  } finally {
    await browser.close();
  }
});
