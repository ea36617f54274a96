// keys: a device's crypto_box key pair (X25519), made here and persisted by
// the application: the library never picks a storage. A pair exports to and
// imports from a plain JSON-able object of two base64 strings; the secret key
// never leaves the device it was made on (protocol.md, "Client body format").

import { toBase64, fromBase64 } from './sodium.js';

/**
 * @typedef {{publicKey: Uint8Array, secretKey: Uint8Array}} DeviceKeys
 * @typedef {{publicKey: string, secretKey: string}} ExportedDeviceKeys
 */

/** @returns {DeviceKeys} */
export function generateDeviceKeys(sodium) {
  const kp = sodium.crypto_box_keypair();
  return { publicKey: kp.publicKey, secretKey: kp.privateKey };
}

/** @param {DeviceKeys} keys @returns {ExportedDeviceKeys} */
export function exportDeviceKeys(sodium, keys) {
  return { publicKey: toBase64(sodium, keys.publicKey), secretKey: toBase64(sodium, keys.secretKey) };
}

/**
 * Accepts an exported pair (base64 strings) or raw bytes, or a secret key
 * alone (`secretKey`, or `secret_key` as the Rust client stores it), from
 * which the public key is derived. Checks the sizes and that a given public
 * key belongs to the secret one, so a mixed-up pair fails here rather than
 * as unreadable messages later.
 * @param {Partial<ExportedDeviceKeys | DeviceKeys> & {secret_key?: string}} exported
 * @returns {DeviceKeys}
 */
export function importDeviceKeys(sodium, exported) {
  const bytes = (v) => (typeof v === 'string' ? fromBase64(sodium, v) : v);
  const sk = bytes(exported.secretKey ?? exported.secret_key);
  if (!sk || sk.length !== sodium.crypto_box_SECRETKEYBYTES) throw new TypeError('device keys: expected a 32-byte secret key');
  const derived = sodium.crypto_scalarmult_base(sk);
  if (exported.publicKey === undefined) return { publicKey: derived, secretKey: sk };
  const pk = bytes(exported.publicKey);
  if (pk.length !== sodium.crypto_box_PUBLICKEYBYTES) throw new TypeError('device keys: expected a 32-byte public key');
  if (!sodium.memcmp(derived, pk)) throw new TypeError('device keys: the public key does not match the secret key');
  return { publicKey: pk, secretKey: sk };
}
