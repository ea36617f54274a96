// The JavaScript half of the interop test (tests/it/js.rs drives the Rust
// half): signs up as PEER_NAME, finds RUST_NAME, sends it one message,
// answers the first message it gets from it with "pong: <text>", and
// prints one JSON line per step on stdout for the Rust side to check.
// Exits 0 once its reply is stored; bounded by DEADLINE_MS.
import WebSocket from 'ws';
import { SealpostClient } from '../../src/index.js';

const { SEALPOST_TEST_URL: baseUrl, PEER_NAME: username, RUST_NAME: rustName } = process.env;
const DEADLINE_MS = 60_000;
const say = (line) => process.stdout.write(JSON.stringify(line) + '\n');

const timer = setTimeout(() => {
  say({ error: 'deadline' });
  process.exit(2);
}, DEADLINE_MS);

const client = await SealpostClient.register({
  baseUrl, WebSocket, username, password: 'correct horse battery staple',
});
await client.connect();
await client.waitForDrained();
const rust = await client.request('GET', `/v1/users/${encodeURIComponent(rustName)}`);
say({ ready: client.userId });

const sent = await client.send(rust.id, 'hello from js');
say({ sent: sent.id });

for await (const message of client.messages()) {
  await message.ack();
  if (message.from !== rust.id) continue;
  say({ got: message.text, from: message.from, fromDevice: message.fromDevice });
  const reply = await client.send(rust.id, `pong: ${message.text}`);
  say({ replied: reply.id });
  break;
}
await client.flushAcks();
client.disconnect();
clearTimeout(timer);
process.exit(0);
