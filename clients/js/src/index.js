// sealpost-client: a client for the sealpost push relay. Layout (one module
// per concept):
//   client.js    SealpostClient: accounts, sending, the incoming stream
//   session.js   tokens and keeping them fresh
//   rest.js      HTTP requests, errors, the 401 refresh-and-retry
//   socket.js    the live WebSocket: auth, refs, renewal, reconnect
//   inbox.js     decryption, de-duplication, the message stream, acks
//   typing.js    who is typing to us (the `typing` plaintext)
//   limits.js    the server's limits, and a message's size against them
//   directory.js cached device directories (keys to encrypt to / open with)
//   body.js      the client body format (crypto_box; groups: secretbox + keys) of protocol.md
//   keys.js      device key pairs, export and import
//   errors.js    SealpostError and the wire codes
//   backoff.js   full-jitter exponential backoff
//   bounded.js   the size-capped map behind every cache
//   emitter.js   events, the same in Node and browsers
//   sodium.js    where libsodium comes from; base64 and UUIDs

export { SealpostClient, DEVICES_CHANGED_RETRIES, TRANSIENT_RETRIES, DEFAULT_POLL_INTERVAL_MS, pushTargetBody } from './client.js';
export { SealpostError, WIRE_CODES, CLIENT_CODES } from './errors.js';
export {
  sealBody, openBody, encodePlaintext, decodePlaintext, BodyError, BODY_VERSION, MIN_BODY_BYTES, MAX_TEXT_CHARS,
  sealShared, sealKey, openShared, sha256, SHARED_BODY_VERSION, CONTENT_KEY_BYTES, KEY_MATERIAL_BYTES, MAX_GROUP_NAME_CHARS,
} from './body.js';
export { generateDeviceKeys, exportDeviceKeys, importDeviceKeys } from './keys.js';
export { loadSodium } from './sodium.js';
export { Backoff, DEFAULT_BACKOFF } from './backoff.js';
export { SEEN_IDS, SEEN_CLIENT_IDS, MAX_BUFFERED, MAX_ACK_IDS } from './inbox.js';
export { MAX_IN_FLIGHT } from './socket.js';
export { DIRECTORY_CAPACITY } from './directory.js';
export { DEFAULT_LIMITS, sealedBodyBytes } from './limits.js';
export { TYPING_SHOWN_MS } from './typing.js';
