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

// NaCl's published crypto_box vector (tests/box.c; libsodium's test/default/box.c),
// the one the Rust client's seal tests check too: both libraries agree on the
// bytes, not only on round trips with themselves.
const hex = (h) => Uint8Array.from(h.match(/../g), (b) => parseInt(b, 16));
const NACL = {
  aliceSk: hex('77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a'),
  alicePk: hex('8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a'),
  bobSk: hex('5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb'),
  bobPk: hex('de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f'),
  nonce: hex('69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37'),
  message: hex('be075fc53c81f2d5cf141316ebeb0c7b5228c52a4c62cbd44b66849b64244ffce5ecbaaf33bd751a1ac728d45e6c61296cdc3c01233561f41db66cce314adb310e3be8250c46f06dceea3a7fa1348057e2f6556ad6b1318a024a838f21af1fde048977eb48f59ffd4924ca1c60902e52f0a089bc76897040e082f937763848645e0705'),
  boxEasy: hex('f3ffc7703f9400e52a7dfb4b3d3305d98e993b9f48681273c29650ba32fc76ce48332ea7164d96a4476fb8c531a1186ac0dfc17c98dce87b4da7f011ec48c97271d2c20f9b928fe2270d6fb863d51738b48eeee314a7cc8ab932164548e526ae90224368517acfeabd6bb3732bc0e9da99832b61ca01b6de56244a9e88d5f9b37973f622a43d14a6599b1f654cb45a74e355a5'),
};

test('NaCl vector: a body built from it opens to the published message', () => {
  const body = new Uint8Array([1, ...NACL.nonce, ...NACL.boxEasy]);
  assert.deepEqual(openBody(sodium, body, NACL.alicePk, NACL.bobSk), NACL.message);
  // And libsodium's crypto_box_easy writes exactly that box (tag first).
  assert.deepEqual(sodium.crypto_box_easy(NACL.message, NACL.nonce, NACL.bobPk, NACL.aliceSk), NACL.boxEasy);
});

test('keys import from the Rust client\'s stored form {secret_key}', () => {
  const keys = importDeviceKeys(sodium, { secret_key: sodium.to_base64(NACL.aliceSk, sodium.base64_variants.ORIGINAL) });
  assert.deepEqual(keys.publicKey, NACL.alicePk);
  const secretOnly = importDeviceKeys(sodium, { secretKey: NACL.bobSk });
  assert.deepEqual(secretOnly.publicKey, NACL.bobPk);
});
