// Group messages in the shared form (protocol.md, "Group messages (shared
// form)"): unit tests of sealing and opening (no server), then three users
// in one group against a real server (SEALPOST_TEST_URL): every device of
// every member reads each message with its group, sync copies included, over
// the socket and over REST, and a member's new device gets its key after
// `devices_changed` with the shared body unchanged.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  SealpostClient, loadSodium, generateDeviceKeys, sealShared, sealKey, openShared, sealBody, openBody,
  encodePlaintext, decodePlaintext, BodyError, KEY_MATERIAL_BYTES, sha256,
} from '../src/index.js';
import {
  serverUrl, newAccount, clientOptions, PASSWORD, collectMessages, queued, closeAll, eventuallyEmpty,
  recordingWebSocket, recordingFetch, lossyProxy, nextEvent,
} from './helpers.js';
import { createHash } from 'node:crypto';

const sodium = await loadSodium();
const alice = generateDeviceKeys(sodium);
const bob = generateDeviceKeys(sodium);
const group = { id: '7b3c1d2e-4f5a-4b6c-8d7e-9f0a1b2c3d4e', name: 'hikers', members: ['a', 'b', 'c'] };
const plaintext = { type: 'text', id: '4f8e2a0c-6d1b-4c3e-9a57-0b2d8e6f1a93', ts: 1764806400123, text: 'to all', group };

test('a shared body and its key round-trip, with the documented layout', async () => {
  const bytes = encodePlaintext(plaintext);
  const { shared, material } = await sealShared(sodium, bytes);
  assert.equal(shared[0], 0x02);
  assert.equal(shared.length, 1 + 24 + 16 + bytes.length);
  assert.equal(material.length, KEY_MATERIAL_BYTES);
  // The binding is SHA-256 of the shared body's bytes, by an independent implementation.
  assert.deepEqual(Buffer.from(material.subarray(32)), createHash('sha256').update(shared).digest());
  const key = sealKey(sodium, material, bob.publicKey, alice.secretKey);
  assert.equal(key[0], 0x01);
  assert.equal(key.length, 105);
  assert.deepEqual(decodePlaintext(await openShared(sodium, shared, key, alice.publicKey, bob.secretKey)), plaintext);
  // The shared body is crypto_secretbox_easy under the key's first 32 bytes, nonce after the version byte.
  const k = openBody(sodium, key, alice.publicKey, bob.secretKey).subarray(0, 32);
  assert.deepEqual(sodium.crypto_secretbox_open_easy(shared.subarray(25), shared.subarray(1, 25), k), bytes);
});

test('a body made by hand to the spec opens', async () => {
  const k = sodium.randombytes_buf(32);
  const n = sodium.randombytes_buf(24);
  const shared = new Uint8Array([2, ...n, ...sodium.crypto_secretbox_easy(encodePlaintext(plaintext), n, k)]);
  const material = new Uint8Array([...k, ...createHash('sha256').update(shared).digest()]);
  const key = sealBody(sodium, material, bob.publicKey, alice.secretKey);
  assert.deepEqual(decodePlaintext(await openShared(sodium, shared, key, alice.publicKey, bob.secretKey)), plaintext);
});

test('a shared body swapped under a key fails, even one under the same content key', async () => {
  const { shared, material } = await sealShared(sodium, encodePlaintext(plaintext));
  const key = sealKey(sodium, material, bob.publicKey, alice.secretKey);
  // Another message entirely.
  const other = await sealShared(sodium, encodePlaintext({ ...plaintext, text: 'forged' }));
  await assert.rejects(openShared(sodium, other.shared, key, alice.publicKey, bob.secretKey), (e) => e instanceof BodyError && e.reason === 'binding');
  // A member who knows K seals another body under it: the hash still tells.
  const n = sodium.randombytes_buf(24);
  const forged = new Uint8Array([2, ...n, ...sodium.crypto_secretbox_easy(encodePlaintext({ ...plaintext, text: 'forged' }), n, material.subarray(0, 32))]);
  await assert.rejects(openShared(sodium, forged, key, alice.publicKey, bob.secretKey), (e) => e.reason === 'binding');
  // One flipped bit of the body.
  const flipped = shared.slice();
  flipped[flipped.length - 1] ^= 1;
  await assert.rejects(openShared(sodium, flipped, key, alice.publicKey, bob.secretKey), (e) => e.reason === 'binding');
});

test('a key whose hash is wrong, or that is not 64 bytes, fails', async () => {
  const { shared, material } = await sealShared(sodium, encodePlaintext(plaintext));
  const wrongHash = material.slice();
  wrongHash[40] ^= 1;
  await assert.rejects(
    openShared(sodium, shared, sealKey(sodium, wrongHash, bob.publicKey, alice.secretKey), alice.publicKey, bob.secretKey),
    (e) => e instanceof BodyError && e.reason === 'binding',
  );
  await assert.rejects(
    openShared(sodium, shared, sealKey(sodium, material.subarray(0, 32), bob.publicKey, alice.secretKey), alice.publicKey, bob.secretKey),
    (e) => e.reason === 'binding',
  );
  // A key sealed by someone else than the claimed sender does not open.
  const mallory = generateDeviceKeys(sodium);
  await assert.rejects(
    openShared(sodium, shared, sealKey(sodium, material, bob.publicKey, mallory.secretKey), alice.publicKey, bob.secretKey),
    (e) => e.reason === 'open',
  );
  // A 0x02 body read without a key is not of the 0x01 format.
  assert.throws(() => openBody(sodium, shared, alice.publicKey, bob.secretKey), (e) => e.reason === 'version');
});

test('sha256 falls back to WebCrypto when libsodium has none', async () => {
  const bytes = encodePlaintext(plaintext);
  assert.equal(typeof sodium.crypto_hash_sha256, 'undefined', 'the standard build has no SHA-256 (else this tests nothing new)');
  assert.deepEqual(Buffer.from(await sha256(sodium, bytes)), createHash('sha256').update(bytes).digest());
});

test('a plaintext with a malformed group is refused', () => {
  assert.throws(() => decodePlaintext(encodePlaintext({ ...plaintext, group: { id: 'x', name: 'n', members: 'a' } })), (e) => e.reason === 'plaintext');
  assert.throws(() => decodePlaintext(encodePlaintext({ ...plaintext, group: { name: 'n', members: [] } })), (e) => e.reason === 'plaintext');
});

/** A `fetch` that records every request as "METHOD /path" and the body of every multi-recipient send. */
function multiRecorder() {
  const requests = [];
  const multis = [];
  const fetch = (input, init) => {
    const path = new URL(String(input)).pathname;
    requests.push(`${init?.method ?? 'GET'} ${path}`);
    if (init?.method === 'POST' && path === '/v1/messages/multi') multis.push(JSON.parse(init.body));
    return globalThis.fetch(input, init);
  };
  return { fetch, requests, multis };
}

const url = serverUrl('SEALPOST_TEST_URL');
const T = { timeout: 60_000 };

if (url) {
  test('three users in one group: every device of every member reads it, with the group, over socket and REST', T, async () => {
    const socket = recordingWebSocket();
    const rest = recordingFetch();
    const ann = await newAccount(url, 'gann', 2, { WebSocket: socket.WebSocket, fetch: rest.fetch });
    const ben = await newAccount(url, 'gben', 2);
    const cat = await newAccount(url, 'gcat', 1);
    const everyone = [...ann, ...ben, ...cat];
    await Promise.all(everyone.map((c) => c.connect()));
    await Promise.all(everyone.map((c) => c.waitForDrained()));

    const g = ann[0].createGroup('trip', [ben[0].userId, cat[0].userId]);
    assert.deepEqual(g.members, [ben[0].userId, cat[0].userId, ann[0].userId]);
    const arriving = [ann[1], ...ben, ...cat].map((c) => collectMessages(c, 1));
    const sent = await ann[0].sendGroup(g, 'hello group');
    // One send_multi, shared form, our own account last for the sync copy.
    const multi = socket.frames.filter((f) => f.type === 'send_multi');
    assert.equal(multi.length, 1);
    assert.deepEqual(multi[0].recipients.map((r) => [r.to, r.keys.map((k) => k.device_id)]),
      [[ben[0].userId, [1, 2]], [cat[0].userId, [1]], [ann[0].userId, [2]]]);
    assert.equal(multi[0].client_id.length, 36);
    assert.deepEqual(sent.recipients, [ben[0].userId, cat[0].userId, ann[0].userId]);
    const got = (await Promise.all(arriving)).map((m) => m[0]);
    for (const m of got) {
      assert.equal(m.id, sent.id, 'one id for every copy');
      assert.equal(m.text, 'hello group');
      assert.equal(m.from, ann[0].userId);
      assert.equal(m.clientId, sent.clientId);
      assert.deepEqual(m.group, g);
      assert.equal(m.body, multi[0].shared, 'every copy carries the one shared body');
    }
    await Promise.all(got.map((m) => m.ack()));

    // Cat answers over REST (no socket): both of Ann's devices and both of
    // Ben's get it; Cat has no other device, so her own account is left out.
    cat[0].disconnect();
    const catRest = recordingFetch();
    const catPoll = await SealpostClient.login({ ...clientOptions(url, { fetch: catRest.fetch }), username: cat.username, password: PASSWORD, keys: cat[0].exportKeys() });
    const replies = [...ann, ...ben].map((c) => collectMessages(c, 1));
    const reply = await catPoll.sendGroup(got[got.length - 1].group, 'hi all');
    const posted = catRest.requests.filter((r) => r === 'POST /v1/messages/multi');
    assert.equal(posted.length, 1);
    assert.deepEqual(reply.recipients, [ben[0].userId, ann[0].userId], 'no sync copy with no other device');
    for (const [m] of await Promise.all(replies)) {
      assert.equal(m.text, 'hi all');
      assert.equal(m.from, cat[0].userId);
      assert.equal(m.group.id, g.id);
      await m.ack();
    }
    // A polling member reads a group message too.
    const benSays = await ben[1].sendGroup(g, 'polled');
    assert.equal(benSays.recipients.length, 3);
    const polled = collectMessages(catPoll, 1);
    await catPoll.pollOnce();
    const [p] = await polled;
    assert.equal(p.text, 'polled');
    assert.deepEqual(p.group, g);
    await p.ack();
    await eventuallyEmpty(catPoll);
    await closeAll(everyone, catPoll);
  });

  test('after devices_changed only the named account gets new keys: same shared body, same client_id', T, async () => {
    const rest = multiRecorder();
    const [ann] = await newAccount(url, 'dcann', 1, { fetch: rest.fetch });
    const [ben] = await newAccount(url, 'dcben', 1);
    const cat = await newAccount(url, 'dccat', 1);
    const g = ann.createGroup('changing', [ben.userId, cat[0].userId]);
    // Ann learns Cat's devices, then Cat adds one: Ann's cached directory is stale.
    await ann.sendGroup(g, 'first');
    const catLaptop = await SealpostClient.addDevice({ ...clientOptions(url), username: cat.username, password: PASSWORD, name: 'laptop' });
    const before = rest.requests.length;
    const sent = await ann.sendGroup(g, 'second');
    const fetched = rest.requests.slice(before).filter((r) => r.startsWith('GET /v1/users/'));
    assert.deepEqual(fetched, [`GET /v1/users/${cat[0].userId}/devices`], 'only the account the server named is fetched again');
    const multis = rest.multis.slice(-2);
    assert.equal(multis.length, 2, 'refused once, then taken');
    assert.equal(multis[1].shared, multis[0].shared, 'the shared body is not sealed again');
    assert.equal(multis[1].client_id, multis[0].client_id);
    assert.deepEqual(multis[1].recipients[0], multis[0].recipients[0], 'Ben\'s keys stand');
    assert.deepEqual(multis[1].recipients[1].keys.map((k) => k.device_id), [1, 2]);
    for (const c of [catLaptop, cat[0], ben]) {
      const q = await queued(c);
      const m = q.find((x) => x.id === sent.id);
      assert.ok(m?.key, 'a shared copy carries its key');
    }
    // The new device, added after the first message, reads the second.
    const read = collectMessages(catLaptop, 1);
    await catLaptop.pollOnce();
    const [m] = await read;
    assert.equal(m.text, 'second');
    assert.deepEqual(m.group, g);
    await closeAll(ann, ben, cat, catLaptop);
  });

  test('a multi send whose 201 is lost is sent again byte for byte, and stored once', T, async () => {
    const proxy = await lossyProxy(url, { answerTo: 'POST /v1/messages/multi HTTP/1.1' });
    const rest = multiRecorder();
    const [ann] = await newAccount(url, 'lmann', 1);
    const annBehind = await SealpostClient.login({ ...clientOptions(proxy.url, { fetch: rest.fetch }), username: ann.username, password: PASSWORD, keys: ann.exportKeys() });
    const [ben] = await newAccount(url, 'lmben', 1);
    const [cat] = await newAccount(url, 'lmcat', 1);
    const sent = await annBehind.sendGroup(annBehind.createGroup('lossy', [ben.userId, cat.userId]), 'once');
    assert.equal(proxy.cuts, 1, 'the first answer was lost');
    assert.equal(rest.multis.length, 2, 'sent, then sent again');
    assert.deepEqual(rest.multis[1], rest.multis[0], 'the same client_id, shared body and keys');
    for (const c of [ben, cat]) assert.deepEqual((await queued(c)).map((m) => m.id), [sent.id], 'stored once');
    await closeAll(ann, annBehind, ben, cat);
    await proxy.close();
  });

  test('a shared body swapped under a device\'s key is reported undecryptable and acked', T, async () => {
    const [ann] = await newAccount(url, 'swann', 1);
    const [ben] = await newAccount(url, 'swben', 1);
    const benKey = (await ann.directory.get(ben.userId)).devices[0].publicKey;
    const real = await sealShared(sodium, encodePlaintext({ ...plaintext, group: { id: group.id, name: 'x', members: [ann.userId, ben.userId] } }));
    const other = await sealShared(sodium, encodePlaintext({ ...plaintext, text: 'swapped' }));
    const key = sealKey(sodium, real.material, benKey, ann.keys.secretKey);
    const b64 = (b) => sodium.to_base64(b, sodium.base64_variants.ORIGINAL);
    // What a server that swapped the body would deliver: another body under Ben's key.
    await ann.request('POST', '/v1/messages/multi', { shared: b64(other.shared), recipients: [{ to: ben.userId, keys: [{ device_id: 1, key: b64(key) }] }] });
    const bad = nextEvent(ben, 'undecryptable');
    await ben.pollOnce();
    const u = await bad;
    assert.equal(u.reason, 'binding');
    assert.equal(u.from, ann.userId);
    await eventuallyEmpty(ben, 'the unreadable copy acked');
    // The same key with its own body opens.
    await ann.request('POST', '/v1/messages/multi', { shared: b64(real.shared), recipients: [{ to: ben.userId, keys: [{ device_id: 1, key: b64(key) }] }] });
    const good = collectMessages(ben, 1);
    await ben.pollOnce();
    const [m] = await good;
    assert.equal(m.text, plaintext.text);
    assert.deepEqual(m.group.members, [ann.userId, ben.userId]);
    await closeAll(ann, ben);
  });
}
