// Integration tests of the protocol's additions of issue 25, against a real
// server (SEALPOST_TEST_URL) that has them: register answers with a
// session, token pairs name the account, the device directory names it
// too, acks with a `ref` are answered `acked`, `devices_changed` says which
// device and why, `ready` lists the account's devices, `GET /v1/limits`.
// The client reads every one as optional (the unit tests cover a server
// without them); these check that it uses them where the server sends them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SealpostClient } from '../src/index.js';
import {
  serverUrl, newAccount, clientOptions, uniqueName, PASSWORD, nextEvent, collectMessages,
  queued, closeAll, recordingFetch, recordingWebSocket,
} from './helpers.js';

const url = serverUrl('SEALPOST_TEST_URL');
const T = { timeout: 60_000 };

if (url) {
  test('register starts the session its answer carries; pairs name the account; no /v1/me', T, async () => {
    const rec = recordingFetch();
    const username = uniqueName('Sess');
    const alice = await SealpostClient.register({ ...clientOptions(url, { fetch: rec.fetch }), username, password: PASSWORD });
    assert.deepEqual(rec.requests, ['POST /v1/register'], 'one request: no login after it');
    assert.equal(alice.deviceId, 1);
    assert.equal(alice.username, username);
    assert.equal(alice.tokens().userId, alice.userId);
    // The session works (an authenticated call) and refreshes.
    assert.equal((await alice.devices()).length, 1);
    const refreshed = await alice.refreshTokens();
    assert.equal(refreshed.userId, alice.userId);

    // A new device's pair names the account: who it is comes from its
    // directory (which names the account, as registered), not /v1/me.
    const rec2 = recordingFetch();
    const laptop = await SealpostClient.addDevice({ ...clientOptions(url, { fetch: rec2.fetch }), username: username.toLowerCase(), password: PASSWORD, name: 'laptop' });
    assert.deepEqual(rec2.requests, ['POST /v1/devices', `GET /v1/users/${alice.userId}/devices`]);
    assert.equal(laptop.userId, alice.userId);
    assert.equal(laptop.username, username, 'as registered, not as typed');
    assert.equal(laptop.tokens().userId, alice.userId);
    assert.deepEqual(laptop.directory.cached(alice.userId).devices.map((d) => d.deviceId), [1, 2]);

    // A login checks the kept keys against the directory's key of its device.
    await assert.rejects(
      SealpostClient.login({ ...clientOptions(url), username, password: PASSWORD, deviceId: 2, keys: alice.exportKeys() }),
      /not device 2's/,
    );
    await closeAll(alice, laptop);
  });

  test('a sender never looked up by name is named by its directory', T, async () => {
    const [alice] = await newAccount(url, 'Nama', 1);
    const [bob] = await newAccount(url, 'namb', 1);
    await bob.connect();
    const got = collectMessages(bob, 1);
    await alice.send(bob.userId, 'who am I?');
    const [m] = await got;
    assert.equal(bob.directory.cached(m.from).username, alice.username);
    await m.ack();
    await closeAll(alice, bob);
  });

  test('an ack with a ref is answered acked: ack() resolves once it is durable', T, async () => {
    const [alice] = await newAccount(url, 'acka', 1);
    const rec = recordingWebSocket();
    const [bob] = await newAccount(url, 'ackb', 1, { WebSocket: rec.WebSocket });
    await bob.connect();
    await bob.waitForDrained();
    const got = collectMessages(bob, 2);
    await alice.send(bob.userId, 'one');
    await alice.send(bob.userId, 'two');
    const messages = await got;
    await bob.ack(messages);
    // No waiting for the server: durable when ack() resolved.
    assert.deepEqual(await queued(bob), []);
    const acks = rec.frames.filter((f) => f.type === 'ack');
    assert.equal(acks.length, 1, JSON.stringify(acks));
    assert.equal(typeof acks[0].ref, 'string');
    assert.deepEqual(acks[0].ids.sort(), messages.map((m) => m.id).sort());
    await closeAll(alice, bob);
  });

  test('devices_changed says which device and why; ready lists the devices', T, async () => {
    const [phone] = await newAccount(url, 'dev', 1);
    const ready = nextEvent(phone, 'ready');
    await phone.connect();
    assert.deepEqual((await ready).devices, [1]);
    await phone.waitForDrained();

    const added = nextEvent(phone, 'devicesChanged');
    const laptop = await SealpostClient.addDevice({ ...clientOptions(url), username: phone.username, password: PASSWORD, name: 'laptop' });
    const a = await added;
    assert.deepEqual([a.deviceId, a.reason, a.deviceIds], [2, 'added', [1, 2]]);
    assert.equal(a.devices.find((d) => d.device_id === 2).name, 'laptop');

    // A password login as the laptop is announced to the phone.
    const login = nextEvent(phone, 'devicesChanged');
    const again = await SealpostClient.login({ ...clientOptions(url), username: phone.username, password: PASSWORD, deviceId: 2, keys: laptop.exportKeys() });
    const l = await login;
    assert.deepEqual([l.deviceId, l.reason, l.deviceIds], [2, 'login', [1, 2]]);

    // A device added while the phone was offline: ready tells it on return.
    phone.disconnect();
    const tablet = await SealpostClient.addDevice({ ...clientOptions(url), username: phone.username, password: PASSWORD, name: 'tablet' });
    const onReturn = nextEvent(phone, 'devicesChanged');
    await phone.connect();
    const r = await onReturn;
    assert.deepEqual([r.deviceId, r.reason, r.deviceIds], [3, 'added', [1, 2, 3]]);
    assert.equal(r.devices.find((d) => d.device_id === 3).name, 'tablet');
    await closeAll(phone, laptop, again, tablet);
  });

  test('limits come from the server, once', T, async () => {
    const rec = recordingFetch();
    const [alice] = await newAccount(url, 'lim', 1, { fetch: rec.fetch });
    const limits = await alice.limits();
    await alice.limits();
    assert.equal(limits.max_body_bytes, 65_536);
    assert.equal(limits.max_ids_per_ack, 500);
    assert.equal(limits.max_ref_bytes, 128);
    assert.equal(rec.requests.filter((r) => r === 'GET /v1/limits').length, 1);
    await closeAll(alice);
  });
}
