// Unit tests of the client body format (protocol.md, "Client body format"):
// no server needed.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  loadSodium, sealBody, openBody, encodePlaintext, decodePlaintext, BodyError,
  generateDeviceKeys, exportDeviceKeys, importDeviceKeys, MIN_BODY_BYTES,
} from '../src/index.js';

const sodium = await loadSodium();
const alice = generateDeviceKeys(sodium);
const bob = generateDeviceKeys(sodium);
const mallory = generateDeviceKeys(sodium);
const plaintext = { type: 'text', id: '4f8e2a0c-6d1b-4c3e-9a57-0b2d8e6f1a93', ts: 1764806400123, text: 'hello ✉️' };

test('seal then open round-trips, with the documented layout', () => {
  const body = sealBody(sodium, encodePlaintext(plaintext), bob.publicKey, alice.secretKey);
  const plainBytes = encodePlaintext(plaintext);
  assert.equal(body[0], 0x01);
  assert.equal(body.length, 1 + 24 + 16 + plainBytes.length);
  const opened = decodePlaintext(openBody(sodium, body, alice.publicKey, bob.secretKey));
  assert.deepEqual(opened, plaintext);
});

test('the layout is crypto_box_easy with the nonce after the version byte', () => {
  // Independent of sealBody: build the body by hand and open it with openBody.
  const nonce = sodium.randombytes_buf(24);
  const boxed = sodium.crypto_box_easy(encodePlaintext(plaintext), nonce, bob.publicKey, alice.secretKey);
  const body = new Uint8Array([1, ...nonce, ...boxed]);
  assert.deepEqual(decodePlaintext(openBody(sodium, body, alice.publicKey, bob.secretKey)), plaintext);
});

test('fresh nonce per seal', () => {
  const a = sealBody(sodium, encodePlaintext(plaintext), bob.publicKey, alice.secretKey);
  const b = sealBody(sodium, encodePlaintext(plaintext), bob.publicKey, alice.secretKey);
  assert.notDeepEqual(a.subarray(1, 25), b.subarray(1, 25));
});

test('the wrong key fails to open', () => {
  const body = sealBody(sodium, encodePlaintext(plaintext), bob.publicKey, alice.secretKey);
  // Wrong recipient.
  assert.throws(() => openBody(sodium, body, alice.publicKey, mallory.secretKey), (e) => e instanceof BodyError && e.reason === 'open');
  // Right recipient, wrong claimed sender (a server that swapped `from`).
  assert.throws(() => openBody(sodium, body, mallory.publicKey, bob.secretKey), (e) => e instanceof BodyError && e.reason === 'open');
});

test('an altered body fails to open', () => {
  const body = sealBody(sodium, encodePlaintext(plaintext), bob.publicKey, alice.secretKey);
  body[body.length - 1] ^= 1;
  assert.throws(() => openBody(sodium, body, alice.publicKey, bob.secretKey), (e) => e.reason === 'open');
});

test('a bad version fails', () => {
  const body = sealBody(sodium, encodePlaintext(plaintext), bob.publicKey, alice.secretKey);
  body[0] = 0x02;
  assert.throws(() => openBody(sodium, body, alice.publicKey, bob.secretKey), (e) => e instanceof BodyError && e.reason === 'version');
});

test('a body shorter than 41 bytes fails', () => {
  assert.equal(MIN_BODY_BYTES, 41);
  const short = new Uint8Array(40);
  short[0] = 1;
  assert.throws(() => openBody(sodium, short, alice.publicKey, bob.secretKey), (e) => e.reason === 'short');
});

test('plaintexts: to is kept, unknown fields kept, bad shapes refused', () => {
  const sync = decodePlaintext(encodePlaintext({ ...plaintext, to: 'u', extra: 1 }));
  assert.equal(sync.to, 'u');
  assert.equal(sync.extra, 1);
  assert.equal(decodePlaintext(encodePlaintext({ type: 'typing', id: 'x' })).type, 'typing');
  for (const bad of ['[1]', '"x"', '{"type":1}', '{"type":"text","id":"x","ts":"1","text":"a"}', '{"type":"text","id":"x","ts":1}']) {
    assert.throws(() => decodePlaintext(new TextEncoder().encode(bad)), (e) => e.reason === 'plaintext', bad);
  }
  assert.throws(() => decodePlaintext(new Uint8Array([0xff, 0xfe])), (e) => e.reason === 'plaintext');
});

test('device keys export and import; a mismatched pair is refused', () => {
  const exported = exportDeviceKeys(sodium, alice);
  assert.match(exported.publicKey, /^[A-Za-z0-9+/]{43}=$/);
  const back = importDeviceKeys(sodium, JSON.parse(JSON.stringify(exported)));
  assert.deepEqual(back.publicKey, alice.publicKey);
  assert.deepEqual(back.secretKey, alice.secretKey);
  assert.throws(() => importDeviceKeys(sodium, { publicKey: exported.publicKey, secretKey: exportDeviceKeys(sodium, bob).secretKey }), /does not match/);
  assert.throws(() => importDeviceKeys(sodium, { publicKey: 'AAAA', secretKey: exported.secretKey }), /32-byte/);
});
