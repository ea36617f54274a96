// limits: what the server accepts (`GET /v1/limits`), learned once per
// client, and the check of a message against it before it is sealed. A
// server older than that endpoint answers 404; its limits are the defaults
// it was built with, which are the ones below. The check exists because the
// text limit counts characters and the server's body limit counts bytes:
// 16,384 emoji are within the first and, at four bytes each, over the
// second, and the server would refuse the send only after it was sealed.

import { SealpostError } from './errors.js';
import { MIN_BODY_BYTES } from './body.js';

/**
 * What a server without `GET /v1/limits` accepts: the defaults of
 * `SEALPOST_MAX_BODY_BYTES` and `SEALPOST_MAX_DEVICES_PER_USER`.
 */
export const DEFAULT_LIMITS = Object.freeze({ max_body_bytes: 65_536, max_devices_per_user: 10 });

/**
 * Fetches the limits. A 404 (an older server) is answered with the
 * defaults, for good; any other failure rejects, so that the caller can use
 * the defaults for now and ask again later.
 * @param {import('./rest.js').Rest} rest
 * @returns {Promise<Record<string, number>>}
 */
export async function fetchLimits(rest) {
  try {
    const reply = await rest.request('GET', '/v1/limits', { auth: false });
    return { ...DEFAULT_LIMITS, ...reply };
  } catch (err) {
    if (err instanceof SealpostError && err.code === 'not_found') return { ...DEFAULT_LIMITS };
    throw err;
  }
}

/** The sealed body's size, before base64, of a plaintext of `plaintextBytes` bytes. */
export function sealedBodyBytes(plaintextBytes) {
  return MIN_BODY_BYTES + plaintextBytes;
}

/**
 * Refuses a plaintext whose sealed body would be over `maxBodyBytes`, with
 * the error the server would give (`too_large`) and the sizes in words.
 * @param {Uint8Array} bytes the plaintext's UTF-8 JSON
 * @param {number} maxBodyBytes
 */
export function checkSealedSize(bytes, maxBodyBytes) {
  const size = sealedBodyBytes(bytes.length);
  if (size > maxBodyBytes) {
    throw new SealpostError(
      'too_large',
      `the message is too long: sealed it would be ${size} bytes, and the server takes at most ${maxBodyBytes}`,
      { field: 'text' },
    );
  }
}
