// The JavaScript user of the three-client group chat (tests/it/js.rs,
// `rust_js_and_demo_chat_in_one_group`, drives it beside a Rust client and
// the demo page in Chromium). Signs up as PEER_NAME and waits for the group
// GROUP_NAME that the demo user DEMO_NAME makes with it and RUST_NAME: the
// demo's first message tells it the group; it answers in that group, then
// waits for the Rust user's message to it. It checks each message (in the
// group, with all three members, from the right user, with the right text)
// and prints one JSON line per step on stdout for the Rust side to check
// again. Exits 0 once it has both messages and its answer is stored, 1 on a
// wrong message (saying which), 2 past DEADLINE_MS.
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { SealpostClient } from '../../src/index.js';

const {
  SEALPOST_TEST_URL: baseUrl, PEER_NAME: username, DEMO_NAME: demoName, RUST_NAME: rustName, GROUP_NAME: groupName,
} = process.env;
// The texts each side writes (demo/test/group-interop.test.js, tests/it/js.rs).
const FROM_DEMO = 'hello from the demo';
const FROM_JS = 'hello from js';
const FROM_RUST = 'hello from rust';
// Past the browser's start, sign-up and first message on a loaded machine.
const DEADLINE_MS = 150_000;
const say = (line) => process.stdout.write(JSON.stringify(line) + '\n');

const timer = setTimeout(() => {
  say({ error: `deadline: no message from ${seen.has(FROM_DEMO) ? rustName : demoName} in ${DEADLINE_MS} ms` });
  process.exit(2);
}, DEADLINE_MS);
const seen = new Set();

try {
  for (const [name, value] of Object.entries({ SEALPOST_TEST_URL: baseUrl, PEER_NAME: username, DEMO_NAME: demoName, RUST_NAME: rustName, GROUP_NAME: groupName })) {
    assert.ok(value, `set ${name}`);
  }
  const client = await SealpostClient.register({ baseUrl, WebSocket, username, password: 'correct horse battery staple' });
  await client.connect();
  await client.waitForDrained();
  const lookup = (name) => client.request('GET', `/v1/users/${encodeURIComponent(name)}`);
  const rust = await lookup(rustName);
  say({ ready: client.userId });

  let demo = null;
  let groupId = null;
  for await (const message of client.messages()) {
    await message.ack();
    const { text, from, group } = message;
    say({ got: text, from, group });
    // The demo user signs up after this one is ready: looked up once it wrote.
    demo ??= await lookup(demoName);
    const expected = new Map([[FROM_DEMO, demo.id], [FROM_RUST, rust.id]]);
    assert.ok(expected.has(text), `an unexpected message: ${JSON.stringify(text)} from ${from}`);
    assert.ok(!seen.has(text), `${JSON.stringify(text)} twice`);
    seen.add(text);
    assert.equal(from, expected.get(text), `the sender of ${JSON.stringify(text)}`);
    assert.ok(group, `${JSON.stringify(text)} came with no group`);
    assert.equal(group.name, groupName, `the group of ${JSON.stringify(text)}`);
    assert.deepEqual([...group.members].sort(), [demo.id, rust.id, client.userId].sort(), `the members of ${groupName}`);
    groupId ??= group.id;
    assert.equal(group.id, groupId, `${JSON.stringify(text)} in the same group as the first`);
    if (text === FROM_DEMO) {
      const sent = await client.sendGroup(group, FROM_JS);
      assert.deepEqual([...sent.recipients].sort(), [demo.id, rust.id].sort(), 'the answer went to the other two');
      say({ replied: sent.id });
    }
    if (seen.size === 2) break;
  }
  await client.flushAcks();
  client.disconnect();
} catch (err) {
  say({ error: err.message });
  process.exit(1);
}
clearTimeout(timer);
process.exit(0);
