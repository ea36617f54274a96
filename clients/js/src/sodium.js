// sodium: where the library gets libsodium from. There is no module-level
// copy: each client holds the instance it was given (the `sodium` option, e.g.
// a copy a web page preloaded) or the one this loader imported, so a page
// never needs an import map for the bare name `libsodium-wrappers`.

/**
 * @param {any} [injected] an object with libsodium-wrappers' API (and maybe `ready`)
 * @returns {Promise<any>} a ready libsodium
 */
export async function loadSodium(injected) {
  if (injected) {
    if (injected.ready) await injected.ready;
    return injected;
  }
  // Dynamic, so that the module graph loads in a browser without it.
  const mod = await import('libsodium-wrappers');
  const sodium = mod.default ?? mod;
  await sodium.ready;
  return sodium;
}

/** Standard base64 with padding (protocol.md, "Conventions"). */
export function toBase64(sodium, bytes) {
  return sodium.to_base64(bytes, sodium.base64_variants.ORIGINAL);
}

/** @returns {Uint8Array} throws on text that is not standard padded base64 */
export function fromBase64(sodium, text) {
  return sodium.from_base64(text, sodium.base64_variants.ORIGINAL);
}

/** A random (version 4) UUID from libsodium's generator: works in any page, secure context or not. */
export function randomUuid(sodium) {
  const b = sodium.randombytes_buf(16);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
