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
 * Accepts an exported pair (base64 strings) or raw bytes; checks the sizes and
 * that the public key belongs to the secret one, so a mixed-up pair fails here
 * rather than as unreadable messages later.
 * @param {ExportedDeviceKeys | DeviceKeys} exported
 * @returns {DeviceKeys}
 */
export function importDeviceKeys(sodium, exported) {
  const pk = typeof exported.publicKey === 'string' ? fromBase64(sodium, exported.publicKey) : exported.publicKey;
  const sk = typeof exported.secretKey === 'string' ? fromBase64(sodium, exported.secretKey) : exported.secretKey;
  if (pk.length !== sodium.crypto_box_PUBLICKEYBYTES || sk.length !== sodium.crypto_box_SECRETKEYBYTES) {
    throw new TypeError('device keys: expected a 32-byte public and a 32-byte secret key');
  }
  const derived = sodium.crypto_scalarmult_base(sk);
  if (!sodium.memcmp(derived, pk)) throw new TypeError('device keys: the public key does not match the secret key');
  return { publicKey: pk, secretKey: sk };
}
