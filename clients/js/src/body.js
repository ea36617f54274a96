// body: the client body format of protocol.md ("Client body format"), shared
// with the Rust client and the demo page. A body is
//   0x01 | 24-byte nonce | crypto_box_easy(plaintext, nonce, recipient pk, sender sk)
// and the plaintext a UTF-8 JSON object {type, id, ts, text, to?, group?}.
// A group message (the "shared form") is one body for every member,
//   0x02 | 24-byte nonce | crypto_secretbox_easy(plaintext, nonce, K)
// and per device a `key`: K || SHA-256(shared body), sealed as a 0x01 body.
// The hash binds the key to that very body, so neither the server nor
// another member can put a different body under a device's key. This module
// is pure: it takes libsodium as an argument and touches no network.

/** The only version this library writes and reads. */
export const BODY_VERSION = 0x01;
/** version + nonce + Poly1305 tag: a shorter body cannot be one of ours. */
export const MIN_BODY_BYTES = 1 + 24 + 16;
/** Longest `text`, in characters (Unicode code points). */
export const MAX_TEXT_CHARS = 16384;

/** The version of a group message's shared body. */
export const SHARED_BODY_VERSION = 0x02;
/** A group message's content key `K`: crypto_secretbox's key size. */
export const CONTENT_KEY_BYTES = 32;
/** What a device's `key` opens to: K || SHA-256(shared body). */
export const KEY_MATERIAL_BYTES = CONTENT_KEY_BYTES + 32;

/**
 * Why a body could not be read: `version`, `short`, `open` (wrong key or
 * altered), `plaintext`, `binding` (a group key that is not 64 bytes or
 * whose hash is not the shared body's: a body swapped under the key).
 */
export class BodyError extends Error {
  /** @param {'version'|'short'|'open'|'plaintext'|'binding'} reason @param {string} message */
  constructor(reason, message) {
    super(message);
    this.name = 'BodyError';
    this.reason = reason;
  }
}

/**
 * Seals plaintext bytes from the sending device to one recipient device.
 * @param {any} sodium
 * @param {Uint8Array} plaintext
 * @param {Uint8Array} recipientPublicKey
 * @param {Uint8Array} senderSecretKey
 * @returns {Uint8Array}
 */
export function sealBody(sodium, plaintext, recipientPublicKey, senderSecretKey) {
  const nonce = sodium.randombytes_buf(sodium.crypto_box_NONCEBYTES);
  const boxed = sodium.crypto_box_easy(plaintext, nonce, recipientPublicKey, senderSecretKey);
  const out = new Uint8Array(1 + nonce.length + boxed.length);
  out[0] = BODY_VERSION;
  out.set(nonce, 1);
  out.set(boxed, 1 + nonce.length);
  return out;
}

/**
 * Opens a body sealed by the sending device (the message's `from`/`from_device` key).
 * @returns {Uint8Array} the plaintext bytes
 * @throws {BodyError}
 */
export function openBody(sodium, body, senderPublicKey, recipientSecretKey) {
  if (body.length < MIN_BODY_BYTES) throw new BodyError('short', `body of ${body.length} bytes is shorter than ${MIN_BODY_BYTES}`);
  if (body[0] !== BODY_VERSION) throw new BodyError('version', `body version 0x${body[0].toString(16).padStart(2, '0')} is not 0x01`);
  const nonce = body.subarray(1, 25);
  const boxed = body.subarray(25);
  try {
    return sodium.crypto_box_open_easy(boxed, nonce, senderPublicKey, recipientSecretKey);
  } catch {
    throw new BodyError('open', 'the body does not open with the sending device\'s key');
  }
}

/**
 * SHA-256 of `bytes`. Standard libsodium-wrappers has no crypto_hash_sha256
 * (only the sumo build does), so WebCrypto's digest, present in Node 20 and
 * in every browser's secure context (localhost included), does it when the
 * sodium given lacks it.
 * @returns {Promise<Uint8Array>}
 */
export async function sha256(sodium, bytes) {
  if (typeof sodium.crypto_hash_sha256 === 'function') return sodium.crypto_hash_sha256(bytes);
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) throw new Error('no SHA-256: neither libsodium\'s crypto_hash_sha256 nor WebCrypto (a page served over plain http to another host has none)');
  return new Uint8Array(await subtle.digest('SHA-256', bytes));
}

/**
 * Seals a group message's plaintext once, for every member: a fresh content
 * key and nonce. `material` is what each device's `key` seals (sealKey).
 * @param {any} sodium
 * @param {Uint8Array} plaintext
 * @returns {Promise<{shared: Uint8Array, material: Uint8Array}>}
 */
export async function sealShared(sodium, plaintext) {
  const contentKey = sodium.randombytes_buf(CONTENT_KEY_BYTES);
  const nonce = sodium.randombytes_buf(sodium.crypto_secretbox_NONCEBYTES);
  const boxed = sodium.crypto_secretbox_easy(plaintext, nonce, contentKey);
  const shared = new Uint8Array(1 + nonce.length + boxed.length);
  shared[0] = SHARED_BODY_VERSION;
  shared.set(nonce, 1);
  shared.set(boxed, 1 + nonce.length);
  const material = new Uint8Array(KEY_MATERIAL_BYTES);
  material.set(contentKey, 0);
  material.set(await sha256(sodium, shared), CONTENT_KEY_BYTES);
  return { shared, material };
}

/** One device's `key`: the material sealed to it as a 0x01 body. */
export function sealKey(sodium, material, recipientPublicKey, senderSecretKey) {
  return sealBody(sodium, material, recipientPublicKey, senderSecretKey);
}

/**
 * Opens a group message: the device's `key` as a 0x01 body from the sending
 * device, its hash checked against the shared body as received, then the
 * shared body with the content key.
 * @param {Uint8Array} shared the message's `body`
 * @param {Uint8Array} key the message's `key`
 * @returns {Promise<Uint8Array>} the plaintext bytes
 * @throws {BodyError}
 */
export async function openShared(sodium, shared, key, senderPublicKey, recipientSecretKey) {
  const hash = await sha256(sodium, shared);
  return openSharedWithHash(sodium, shared, hash, key, senderPublicKey, recipientSecretKey);
}

/**
 * openShared with the shared body's hash computed already: synchronous, so
 * a caller that tries several sender keys hashes once.
 * @throws {BodyError}
 */
export function openSharedWithHash(sodium, shared, sharedHash, key, senderPublicKey, recipientSecretKey) {
  const material = openBody(sodium, key, senderPublicKey, recipientSecretKey);
  if (material.length !== KEY_MATERIAL_BYTES) {
    throw new BodyError('binding', `a group key opens to ${material.length} bytes, not ${KEY_MATERIAL_BYTES}`);
  }
  if (!sodium.memcmp(material.subarray(CONTENT_KEY_BYTES), sharedHash)) {
    throw new BodyError('binding', 'the group key was sealed for another body');
  }
  if (shared.length < MIN_BODY_BYTES) throw new BodyError('short', `shared body of ${shared.length} bytes is shorter than ${MIN_BODY_BYTES}`);
  if (shared[0] !== SHARED_BODY_VERSION) throw new BodyError('version', `shared body version 0x${shared[0].toString(16).padStart(2, '0')} is not 0x02`);
  try {
    return sodium.crypto_secretbox_open_easy(shared.subarray(25), shared.subarray(1, 25), material.subarray(0, CONTENT_KEY_BYTES));
  } catch {
    throw new BodyError('open', 'the shared body does not open with its content key');
  }
}

/**
 * @typedef {{id: string, name: string, members: string[]}} Group
 * @typedef {{type: string, id: string, ts: number, text?: string, to?: string, group?: Group, [k: string]: unknown}} Plaintext
 */

/** Longest group name, in characters. */
export const MAX_GROUP_NAME_CHARS = 64;

/** Whether `g` is a plaintext's `group` as protocol.md has it. */
export function isGroup(g) {
  return !!g && typeof g === 'object' && typeof g.id === 'string' && typeof g.name === 'string'
    && Array.isArray(g.members) && g.members.every((m) => typeof m === 'string');
}

/** Number of Unicode code points, the unit of the text limit. */
export function textLength(text) {
  let n = 0;
  for (const _ of text) n++;
  return n;
}

/** @param {Plaintext} p @returns {Uint8Array} */
export function encodePlaintext(p) {
  return new TextEncoder().encode(JSON.stringify(p));
}

/**
 * Parses a plaintext. Unknown fields are kept (and ignored by callers);
 * unknown `type`s are returned as they are, for the caller to drop.
 * @returns {Plaintext}
 * @throws {BodyError} reason `plaintext` when it is not a JSON object with a string `type` and `id`
 */
export function decodePlaintext(bytes) {
  let value;
  try {
    value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch {
    throw new BodyError('plaintext', 'the plaintext is not UTF-8 JSON');
  }
  if (!value || typeof value !== 'object' || Array.isArray(value) || typeof value.type !== 'string') {
    throw new BodyError('plaintext', 'the plaintext is not an object with a string type');
  }
  if (value.type === 'text') {
    if (typeof value.id !== 'string' || typeof value.ts !== 'number' || typeof value.text !== 'string'
      || (value.to !== undefined && typeof value.to !== 'string')
      || (value.group !== undefined && !isGroup(value.group))) {
      throw new BodyError('plaintext', 'a text plaintext needs string id, number ts, string text (and a group with id, name, members)');
    }
  }
  return value;
}
