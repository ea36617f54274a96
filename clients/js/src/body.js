// body: the client body format of protocol.md ("Client body format"), shared
// with the Rust client and the demo page. A body is
//   0x01 | 24-byte nonce | crypto_box_easy(plaintext, nonce, recipient pk, sender sk)
// and the plaintext a UTF-8 JSON object {type, id, ts, text, to?}. This module
// is pure: it takes libsodium as an argument and touches no network.

/** The only version this library writes and reads. */
export const BODY_VERSION = 0x01;
/** version + nonce + Poly1305 tag: a shorter body cannot be one of ours. */
export const MIN_BODY_BYTES = 1 + 24 + 16;
/** Longest `text`, in characters (Unicode code points). */
export const MAX_TEXT_CHARS = 16384;

/** Why a body could not be read: `version`, `short`, `open` (wrong key or altered), `plaintext`. */
export class BodyError extends Error {
  /** @param {'version'|'short'|'open'|'plaintext'} reason @param {string} message */
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
 * @typedef {{type: string, id: string, ts: number, text?: string, to?: string, [k: string]: unknown}} Plaintext
 */

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
      || (value.to !== undefined && typeof value.to !== 'string')) {
      throw new BodyError('plaintext', 'a text plaintext needs string id, number ts, string text');
    }
  }
  return value;
}
