// Integration tests against a real sealpost server (SEALPOST_TEST_URL):
// accounts and devices, encrypted exchange between two users with two
// devices each, sync copies, receipts, de-duplication, `409
// devices_changed` recovery, ephemeral sends, polling, typed errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SealpostClient, SealpostError, loadSodium, generateDeviceKeys, exportDeviceKeys, sealBody, encodePlaintext } from '../src/index.js';
import {
  serverUrl, newAccount, clientOptions, uniqueName, PASSWORD, nextEvent, collectMessages,
  eventually, eventuallyEmpty, pause, queued, closeAll,
} from './helpers.js';

const url = serverUrl('SEALPOST_TEST_URL');
const T = { timeout: 60_000 };

if (url) {
  test('register, login and addDevice; keys export and import', T, async () => {
    const username = uniqueName('reg');
    const first = await SealpostClient.register({ ...clientOptions(url), username, password: PASSWORD });
    assert.equal(first.deviceId, 1);
    assert.equal(first.username, username);
    assert.match(first.userId, /^[0-9a-f-]{36}$/);
    const keys = first.exportKeys();

    const again = await SealpostClient.login({ ...clientOptions(url), username, password: PASSWORD, deviceId: 1, keys });
    assert.equal(again.userId, first.userId);
    assert.equal(again.deviceId, 1);

    const second = await SealpostClient.addDevice({ ...clientOptions(url), username, password: PASSWORD, name: 'laptop' });
    assert.equal(second.deviceId, 2);
    assert.equal(second.userId, first.userId);
    const devices = await first.devices();
    assert.deepEqual(devices.map((d) => [d.device_id, d.name, d.current]), [[1, null, true], [2, 'laptop', false]]);
    assert.equal(devices[1].public_key, second.exportKeys().publicKey);

    // Logging in as device 2 with device 1's keys is caught before any message is unreadable.
    await assert.rejects(
      SealpostClient.login({ ...clientOptions(url), username, password: PASSWORD, deviceId: 2, keys }),
      /not device 2's/,
    );
    // A persisted refresh token resumes the session without the password.
    const resumed = await SealpostClient.resume({ ...clientOptions(url), refreshToken: again.tokens().refreshToken, keys });
    assert.equal(resumed.deviceId, 1);
    // ... and spent it. Once the new token has been used (before that, a
    // server with a refresh grace answers the spent one again, as for a
    // reply that was lost), the old client's own refresh fails and logs it out.
    await resumed.refreshTokens();
    const loggedOut = nextEvent(again, 'loggedOut');
    await assert.rejects(again.refreshTokens(), (e) => e instanceof SealpostError && e.code === 'unauthorized');
    assert.equal((await loggedOut).code, 'unauthorized');
    assert.equal(again.sessionState, 'loggedOut');
    await closeAll(first, again, second, resumed);
  });

  test('wire errors are typed', T, async () => {
    const username = uniqueName('err');
    const a = await SealpostClient.register({ ...clientOptions(url), username, password: PASSWORD });
    await assert.rejects(
      SealpostClient.register({ ...clientOptions(url), username: username.toUpperCase(), password: PASSWORD }),
      (e) => e instanceof SealpostError && e.code === 'conflict' && e.status === 409 && typeof e.requestId === 'string',
    );
    await assert.rejects(
      SealpostClient.register({ ...clientOptions(url), username: 'x', password: PASSWORD }),
      (e) => e.code === 'invalid' && e.status === 422 && e.field === 'username',
    );
    const sodium = await loadSodium();
    await assert.rejects(
      SealpostClient.login({ ...clientOptions(url), username, password: 'wrong password', keys: exportDeviceKeys(sodium, generateDeviceKeys(sodium)) }),
      (e) => e.code === 'unauthorized' && e.status === 401,
    );
    await assert.rejects(
      SealpostClient.login({ ...clientOptions(url), username, password: PASSWORD, deviceId: 7, keys: a.exportKeys() }),
      (e) => e.code === 'not_found' && e.status === 404,
    );
    await assert.rejects(a.send('00000000-0000-4000-8000-000000000000', 'hi'), (e) => e.code === 'not_found' && e.status === 404);
    await assert.rejects(a.send('not-a-user', 'hi'), (e) => e.code === 'invalid' && e.field === 'user_id');
    await assert.rejects(a.send(a.userId, 'x'.repeat(16_385)), (e) => e.code === 'invalid' && e.field === 'text');
    await assert.rejects(a.sendEphemeral(a.userId), (e) => e.code === 'not_connected');
    // devices_changed carries missing and extra, over REST ...
    await assert.rejects(
      a.request('POST', '/v1/messages', { to: a.userId, envelopes: [{ device_id: 1, body: 'eA==' }] }),
      (e) => e.code === 'devices_changed' && e.status === 409 && e.missing.length === 0 && e.extra[0] === 1,
    );
    // ... and over the socket (an error frame: no status).
    await a.connect();
    await a.waitForDrained();
    await assert.rejects(
      a._socket.request({ type: 'send', to: a.userId, envelopes: [{ device_id: 1, body: 'eA==' }] }),
      (e) => e instanceof SealpostError && e.code === 'devices_changed' && e.status === undefined && e.extra[0] === 1,
    );
    await assert.rejects(
      a._socket.request({ type: 'send', to: 'nope', body: 'eA==' }),
      (e) => e.code === 'invalid' && e.field === 'to',
    );
    await closeAll(a);
  });

  test('two users with two devices each: every device decrypts, sync copies, receipts, both ways', T, async () => {
    const alice = await newAccount(url, 'alice', 2);
    const bob = await newAccount(url, 'bob', 2);
    const everyone = [...alice, ...bob];
    await Promise.all(everyone.map((c) => c.connect()));
    await Promise.all(everyone.map((c) => c.waitForDrained()));

    // Alice's phone writes to Bob.
    const atBob = bob.map((c) => collectMessages(c, 1));
    const atAliceLaptop = collectMessages(alice[1], 1);
    const receipts = [];
    alice[0].on('receipt', (r) => receipts.push(r));
    const sent = await alice[0].send(bob[0].userId, 'hello bob');
    assert.match(sent.id, /^[0-9a-f-]{36}$/);
    assert.ok(sent.sync, 'a sync copy went to the other device');
    const [[b1], [b2]] = await Promise.all(atBob);
    for (const [m, c] of [[b1, bob[0]], [b2, bob[1]]]) {
      assert.equal(m.id, sent.id);
      assert.equal(m.text, 'hello bob');
      assert.equal(m.from, alice[0].userId);
      assert.equal(m.fromDevice, 1);
      assert.equal(m.clientId, sent.clientId);
      assert.equal(m.to, undefined);
      assert.equal(typeof m.ts, 'number');
      assert.equal(m.sentAt, sent.sentAt);
      await c.ack([m]);
    }
    const [sync] = await atAliceLaptop;
    assert.equal(sync.text, 'hello bob');
    assert.equal(sync.to, bob[0].userId, 'the sync copy names the peer');
    assert.equal(sync.from, alice[0].userId);
    assert.equal(sync.fromDevice, 1);
    assert.equal(sync.clientId, sent.clientId);
    assert.equal(sync.id, sent.sync.id);
    await sync.ack();
    // One receipt per acking device of Bob's, plus the laptop's for the sync copy.
    await eventually(() => receipts.filter((r) => r.id === sent.id).length === 2, { what: 'two receipts' });
    assert.deepEqual(receipts.filter((r) => r.id === sent.id).map((r) => r.deviceId).sort(), [1, 2]);
    assert.ok(receipts.filter((r) => r.id === sent.id).every((r) => r.to === bob[0].userId));
    await eventually(() => receipts.some((r) => r.id === sent.sync.id && r.to === alice[0].userId && r.deviceId === 2), { what: 'sync receipt' });

    // Bob's laptop answers.
    const atAlice = alice.map((c) => collectMessages(c, 1));
    const atBobPhone = collectMessages(bob[0], 1);
    const reply = await bob[1].send(alice[0].userId, 'hi alice, from the laptop 🙂');
    const got = (await Promise.all(atAlice)).flat();
    assert.deepEqual(got.map((m) => [m.text, m.from, m.fromDevice, m.id]), [
      ['hi alice, from the laptop 🙂', bob[0].userId, 2, reply.id],
      ['hi alice, from the laptop 🙂', bob[0].userId, 2, reply.id],
    ]);
    const [bobSync] = await atBobPhone;
    assert.equal(bobSync.to, alice[0].userId);
    assert.equal(bobSync.fromDevice, 2);
    await Promise.all([...got.map((m) => m.ack()), bobSync.ack()]);
    for (const c of everyone) await c.flushAcks();
    for (const c of everyone) await eventuallyEmpty(c, 'every copy acked');
    await closeAll(everyone);
  });

  test('de-duplication: a resend under the same client id is shown once and acked', T, async () => {
    const [alice] = await newAccount(url, 'dupa', 1);
    const [bob] = await newAccount(url, 'dupb', 1);
    await bob.connect();
    await bob.waitForDrained();
    const shown = [];
    bob.on('message', (m) => shown.push(m));
    const dup = nextEvent(bob, 'duplicate');
    const first = await alice.send(bob.userId, 'once', { clientId: 'b2c4a7e0-1111-4111-8111-000000000001' });
    const second = await alice.send(bob.userId, 'once', { clientId: 'b2c4a7e0-1111-4111-8111-000000000001' });
    assert.notEqual(first.id, second.id, 'the server stored two messages');
    const d = await dup;
    assert.equal(d.id, second.id);
    assert.equal(d.firstId, first.id);
    await eventually(() => shown.length === 1);
    await pause(200);
    assert.equal(shown.length, 1);
    // The duplicate was acked by the client itself; the original waits for the app.
    await bob.flushAcks();
    await eventually(async () => (await queued(bob)).map((m) => m.id).join() === first.id, { what: 'only the original queued' });

    // The same copy from the socket and from a poll is shown once (server id).
    await bob.pollOnce();
    await pause(100);
    assert.equal(shown.length, 1);
    // After a reconnect its redelivery in the backlog is not shown again either.
    bob.disconnect();
    await bob.connect();
    await bob.waitForDrained();
    await pause(100);
    assert.equal(shown.length, 1);
    await shown[0].ack();
    await eventuallyEmpty(bob);
    await closeAll(alice, bob);
  });

  test('409 devices_changed: a device added since the directory was fetched gets the message', T, async () => {
    const alice = await newAccount(url, 'dca', 1);
    const [bob] = await newAccount(url, 'dcb', 1);
    await bob.connect();
    await bob.waitForDrained();
    // Bob learns Alice's directory (one device) by writing to her.
    await bob.send(alice[0].userId, 'first');
    assert.deepEqual(bob.directory.cached(alice[0].userId).devices.map((d) => d.deviceId), [1]);
    // Alice adds a device; Bob's directory is now stale.
    const aliceNew = await SealpostClient.addDevice({ ...clientOptions(url), username: alice.username, password: PASSWORD });
    await alice[0].connect();
    await aliceNew.connect();
    await aliceNew.waitForDrained();
    const got = collectMessages(aliceNew, 1);
    const sent = await bob.send(alice[0].userId, 'after the new device');
    assert.deepEqual(bob.directory.cached(alice[0].userId).devices.map((d) => d.deviceId), [1, 2], 'refetched');
    const [m] = await got;
    assert.equal(m.text, 'after the new device');
    assert.equal(m.id, sent.id);
    // Alice's phone, connected before, lists its messages: both reached it.
    const phone = (await queued(alice[0])).map((x) => x.id);
    assert.ok(phone.includes(sent.id));
    // A third device added while the phone is connected is announced to it.
    await alice[0].waitForDrained();
    const seenOnPhone = nextEvent(alice[0], 'devicesChanged');
    const third = await SealpostClient.addDevice({ ...clientOptions(url), username: alice.username, password: PASSWORD, name: 'tablet' });
    const change = await seenOnPhone;
    assert.equal(change.devices.find((d) => d.device_id === third.deviceId).name, 'tablet');
    assert.ok(change.deviceIds.includes(third.deviceId));
    await eventually(() => alice[0].directory.cached(alice[0].userId)?.devices.some((d) => d.deviceId === third.deviceId), { what: 'own directory refreshed' });
    // The phone's next message to Bob carries a sync copy for both other devices, without a 409 round.
    const syncs = [collectMessages(aliceNew, 1), collectMessages(third, 1)];
    await third.connect();
    await alice[0].send(bob.userId, 'sync to two');
    const [[s2], [s3]] = await Promise.all(syncs);
    assert.equal(s2.text, 'sync to two');
    assert.equal(s3.text, 'sync to two');
    assert.equal(s3.to, bob.userId);
    await closeAll(alice, aliceNew, third, bob);
  });

  test('ephemeral sends resolve with delivered, and are never stored', T, async () => {
    const [alice] = await newAccount(url, 'epa', 1);
    const [bob] = await newAccount(url, 'epb', 1);
    await Promise.all([alice.connect(), bob.connect()]);
    await Promise.all([alice.waitForDrained(), bob.waitForDrained()]);
    const typing = nextEvent(bob, 'ephemeral');
    const r = await alice.sendEphemeral(bob.userId, { type: 'typing', state: 'on' });
    assert.equal(r.delivered, true);
    const e = await typing;
    assert.equal(e.from, alice.userId);
    assert.equal(e.payload.type, 'typing');
    assert.equal(e.payload.state, 'on');
    assert.deepEqual(await queued(bob), []);
    bob.disconnect();
    await eventually(() => bob.connectionState === 'closed');
    await eventually(async () => (await alice.sendEphemeral(bob.userId)).delivered === false, { what: 'offline bob' });
    assert.deepEqual(await queued(bob), []);
    await closeAll(alice, bob);
  });

  test('typing: sendTyping shows the sender typing until its text arrives', T, async () => {
    const [alice] = await newAccount(url, 'tya', 1);
    const [bob] = await newAccount(url, 'tyb', 1);
    await Promise.all([alice.connect(), bob.connect()]);
    await Promise.all([alice.waitForDrained(), bob.waitForDrained()]);
    const started = nextEvent(bob, 'typing');
    const ephemeral = nextEvent(bob, 'ephemeral');
    const r = await alice.sendTyping(bob.userId);
    assert.equal(r.delivered, true);
    assert.deepEqual(await started, { from: alice.userId, fromDevice: 1, typing: true });
    // The plaintext of protocol.md: type, id, ts and nothing else.
    const { payload } = await ephemeral;
    assert.deepEqual(Object.keys(payload).sort(), ['id', 'ts', 'type']);
    assert.equal(payload.type, 'typing');
    assert.equal(bob.typing.isTyping(alice.userId), true);
    // Her text ends it at once, not 5 s later.
    const stopped = nextEvent(bob, 'typing', { ms: 2000 });
    const got = collectMessages(bob, 1);
    await alice.send(bob.userId, 'done typing');
    assert.deepEqual(await stopped, { from: alice.userId, typing: false });
    assert.equal(bob.typing.isTyping(alice.userId), false);
    await (await got)[0].ack();
    // A `stopped` ends it too; none was ever stored.
    const again = nextEvent(bob, 'typing', { predicate: (t) => t.typing });
    await alice.sendTyping(bob.userId);
    await again;
    const off = nextEvent(bob, 'typing', { ms: 2000, predicate: (t) => !t.typing });
    await alice.sendTyping(bob.userId, { stopped: true });
    await off;
    await eventuallyEmpty(bob);
    await closeAll(alice, bob);
  });

  test('polling path: the same message stream, acked over REST', T, async () => {
    const [alice] = await newAccount(url, 'pola', 1);
    const carol = await newAccount(url, 'polc', 2);
    const sent = [];
    for (let i = 0; i < 3; i++) sent.push(await alice.send(carol[0].userId, `poll ${i}`));
    const iterator = carol[0].messages();
    carol[0].startPolling({ intervalMs: 200 });
    const got = [];
    for (let i = 0; i < 3; i++) got.push((await iterator.next()).value);
    assert.deepEqual(got.map((m) => m.text), ['poll 0', 'poll 1', 'poll 2']);
    assert.deepEqual(got.map((m) => m.id), sent.map((s) => s.id));
    // Until acked, polls see them again but do not show them again.
    await pause(500);
    assert.equal((await queued(carol[0])).length, 3);
    await carol[0].ack(got);
    assert.deepEqual(await queued(carol[0]), []);
    // A message arriving later comes through the running poller.
    const later = await alice.send(carol[0].userId, 'later');
    const next = (await iterator.next()).value;
    assert.equal(next.id, later.id);
    await next.ack();
    carol[0].stopPolling();
    // Carol's other device gets its own copies by a single round.
    const other = carol[1].messages();
    assert.equal(await carol[1].pollOnce(), 4);
    assert.equal((await other.next()).value.text, 'poll 0');
    await closeAll(alice, carol);
  });

  test('an undecryptable body is reported and acked', T, async () => {
    const [alice] = await newAccount(url, 'uda', 1);
    const [bob] = await newAccount(url, 'udb', 1);
    const sodium = await loadSodium();
    const stranger = generateDeviceKeys(sodium);
    // Sealed by a key that is not Alice's device's: opening it must fail.
    const forged = sealBody(sodium, encodePlaintext({ type: 'text', id: 'x', ts: 1, text: 'forged' }), bob.keys.publicKey, stranger.secretKey);
    await alice.request('POST', '/v1/messages', { to: bob.userId, envelopes: [{ device_id: 1, body: Buffer.from(forged).toString('base64') }] });
    await alice.request('POST', '/v1/messages', { to: bob.userId, envelopes: [{ device_id: 1, body: Buffer.from('not a sealed body at all, v2').toString('base64') }] });
    const reasons = [];
    bob.on('undecryptable', (u) => reasons.push(u.reason));
    const shown = [];
    bob.on('message', (m) => shown.push(m));
    await bob.connect();
    await bob.waitForDrained();
    await eventually(() => reasons.length === 2);
    assert.deepEqual(reasons.sort(), ['open', 'short']);
    assert.equal(shown.length, 0);
    await bob.flushAcks();
    await eventuallyEmpty(bob);
    await closeAll(alice, bob);
  });
}

if (url) {
  test('pipelined sends on one socket: matched by ref, received in order', T, async () => {
    const [alice] = await newAccount(url, 'pipa', 1);
    const [bob] = await newAccount(url, 'pipb', 1);
    await Promise.all([alice.connect(), bob.connect()]);
    await Promise.all([alice.waitForDrained(), bob.waitForDrained()]);
    const n = 30;
    const got = collectMessages(bob, n);
    const results = await Promise.all(Array.from({ length: n }, (_, i) => alice.send(bob.userId, `m${i}`)));
    assert.equal(new Set(results.map((r) => r.id)).size, n, 'every send got its own reply');
    const messages = await got;
    assert.deepEqual(messages.map((m) => m.text), Array.from({ length: n }, (_, i) => `m${i}`));
    assert.deepEqual(messages.map((m) => m.id), results.map((r) => r.id), 'each reply matched its own send');
    await bob.ack(messages);
    await eventuallyEmpty(bob);
    await closeAll(alice, bob);
  });
}
