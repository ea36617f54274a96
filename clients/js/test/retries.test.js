// Integration tests against a real sealpost server (SEALPOST_TEST_URL), with
// a proxy in front of the sending device that loses one answer: a send the
// server took but whose 201 or `sent` never arrived is retried with the same
// `client_id` and the same ciphertext, and stored once. And a proxy that
// plays a server that is down: a send told to wait (`retries: Infinity`)
// goes out once it is back, the same send.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SealpostClient } from '../src/index.js';
import {
  serverUrl, newAccount, clientOptions, PASSWORD, nextEvent, queued, closeAll, pause, eventually,
  lossyProxy, switchableProxy, recordingFetch, recordingWebSocket,
} from './helpers.js';

const url = serverUrl('SEALPOST_TEST_URL');
const T = { timeout: 60_000 };
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** Alice's phone on the server, her laptop behind `proxy` (recording its sends), and Bob. */
async function laptopBehind(proxy, prefix) {
  const [phone] = await newAccount(url, `${prefix}a`, 1);
  const rest = recordingFetch();
  const socket = recordingWebSocket();
  const laptop = await SealpostClient.addDevice({
    ...clientOptions(proxy.url, { fetch: rest.fetch, WebSocket: socket.WebSocket }),
    username: phone.username,
    password: PASSWORD,
    name: 'laptop',
  });
  const [bob] = await newAccount(url, `${prefix}b`, 1);
  return { phone, laptop, bob, rest, socket };
}

if (url) {
  test('a REST send whose 201 is lost is sent again under its client_id, and stored once', T, async () => {
    const proxy = await lossyProxy(url, { answerTo: 'POST /v1/messages HTTP/1.1' });
    const { phone, laptop, bob, rest } = await laptopBehind(proxy, 'lr');
    // No socket: the send goes over REST; the server takes it, the answer is lost, the client retries.
    const sent = await laptop.send(bob.userId, 'only once');
    assert.equal(proxy.cuts, 1, 'the first answer was lost');
    const main = rest.sends.filter((s) => s.to === bob.userId);
    assert.equal(main.length, 2, 'sent, then sent again');
    assert.match(main[0].client_id, UUID);
    assert.deepEqual(main[1], main[0], 'the same client_id and the same envelopes, not encrypted again');
    assert.deepEqual((await queued(bob)).map((m) => m.id), [sent.id], 'stored once, under the first id');
    // The sync copy has another `to`, so a key of its own (under the message's it would be refused).
    assert.equal(sent.syncError, undefined);
    const sync = rest.sends.filter((s) => s.to === laptop.userId);
    assert.equal(sync.length, 1);
    assert.match(sync[0].client_id, UUID);
    assert.notEqual(sync[0].client_id, main[0].client_id);
    assert.deepEqual((await queued(phone)).map((m) => m.id), [sent.sync.id]);
    await closeAll(phone, laptop, bob);
    await proxy.close();
  });

  test('a socket send whose sent is lost with the socket is retried under its client_id, and stored once', T, async () => {
    const proxy = await lossyProxy(url, { answer: '"type":"sent"' });
    const { phone, laptop, bob, rest, socket } = await laptopBehind(proxy, 'ls');
    await Promise.all([laptop.connect(), bob.connect()]);
    await Promise.all([laptop.waitForDrained(), bob.waitForDrained()]);
    const dropped = nextEvent(laptop, 'state', { predicate: (s) => s.state === 'reconnecting' });
    const sent = await laptop.send(bob.userId, 'once, socket');
    await dropped;
    assert.equal(proxy.cuts, 1, 'the first sent was lost');
    // The first attempt on the socket; the retry on the next socket or over REST, whichever was up.
    const attempts = [
      ...socket.frames.filter((f) => f.type === 'send' && f.to === bob.userId),
      ...rest.sends.filter((s) => s.to === bob.userId),
    ];
    assert.equal(attempts.length, 2, JSON.stringify(attempts));
    assert.match(attempts[0].client_id, UUID);
    for (const a of attempts) {
      assert.equal(a.client_id, attempts[0].client_id);
      assert.deepEqual(a.envelopes, attempts[0].envelopes);
    }
    assert.deepEqual((await queued(bob)).map((m) => m.id), [sent.id], 'stored once, under the first id');
    assert.equal(sent.syncError, undefined);
    // Ephemeral sends carry no key: never stored, nothing to repeat.
    await laptop.waitForDrained();
    await laptop.sendEphemeral(bob.userId);
    const typing = socket.frames.filter((f) => f.type === 'send' && f.ephemeral);
    assert.equal(typing.length, 1);
    assert.equal('client_id' in typing[0], false);
    await closeAll(phone, laptop, bob);
    await proxy.close();
  });

  test('a send made while the server is down waits, and goes out once, the same send, when it is back', T, async () => {
    const proxy = await switchableProxy(url);
    const [phone] = await newAccount(url, 'dna', 1);
    const rest = recordingFetch();
    const socket = recordingWebSocket();
    const laptop = await SealpostClient.addDevice({
      ...clientOptions(proxy.url, { fetch: rest.fetch, WebSocket: socket.WebSocket, backoff: { baseMs: 100, capMs: 500 } }),
      username: phone.username,
      password: PASSWORD,
      name: 'laptop',
    });
    const [bob] = await newAccount(url, 'dnb', 1);
    await laptop.connect();
    await laptop.waitForDrained();
    await laptop.directory.get(bob.userId);

    proxy.down();
    await eventually(() => laptop.connectionState === 'reconnecting' || laptop.connectionState === 'connecting', { what: 'the socket noticed' });
    const retries = [];
    let settled = false;
    const sending = laptop.send(bob.userId, 'written while the server was away', { retries: Infinity, onRetry: (r) => retries.push(r) });
    sending.finally(() => { settled = true; }).catch(() => {});
    // Far past what the default retries (4, with this backoff) would wait.
    await pause(4000);
    assert.equal(settled, false, 'still waiting, not failed');
    assert.ok(retries.length > 4, `retried ${retries.length} times`);
    assert.ok(retries.every((r) => r.error.retryable || r.error.code === 'not_connected'), JSON.stringify(retries.map((r) => r.error.code)));
    assert.deepEqual(await queued(bob), [], 'nothing reached the server');

    proxy.up();
    const sent = await sending;
    assert.deepEqual((await queued(bob)).map((m) => m.id), [sent.id], 'stored once');
    // Every attempt that reached the wire (the last one, at least) was the same send.
    const attempts = [
      ...socket.frames.filter((f) => f.type === 'send' && f.to === bob.userId),
      ...rest.sends.filter((s) => s.to === bob.userId),
    ];
    assert.ok(attempts.length >= 1);
    for (const a of attempts) {
      assert.match(a.client_id, UUID);
      assert.equal(a.client_id, attempts[0].client_id);
      assert.deepEqual(a.envelopes, attempts[0].envelopes);
    }
    assert.equal(sent.syncError, undefined);
    assert.deepEqual((await queued(phone)).map((m) => m.id), [sent.sync.id]);
    await closeAll(phone, laptop, bob);
    await proxy.close();
  });
}
