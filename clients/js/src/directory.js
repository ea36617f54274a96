// directory: the cache of device directories (ids and public keys) the
// client encrypts to and decrypts with, one entry per user. An entry is
// fetched on first use and again when the server says it is stale (a `409
// devices_changed`, a `devices_changed` frame for our own account, a body
// that does not open with the cached key). Concurrent fetches of one user
// share one request. An entry also names the account (`username`), so a
// sender never looked up by name can be shown by it.

import { BoundedMap } from './bounded.js';
import { fromBase64 } from './sodium.js';

/**
 * Users whose directories are kept. An entry is ~10 devices x 32-byte keys;
 * a messaging session talks to far fewer peers than this, and an evicted
 * entry only costs one GET when that peer is written to or heard from again.
 */
export const DIRECTORY_CAPACITY = 1000;

/**
 * @typedef {{deviceId: number, publicKey: Uint8Array}} DirectoryDevice
 * @typedef {{userId: string, username?: string, devices: DirectoryDevice[], fetchedAt: number}} DirectoryEntry
 */


export class Directory {
  /** @param {import('./rest.js').Rest} rest */
  constructor(rest, sodium, capacity = DIRECTORY_CAPACITY) {
    this._rest = rest;
    this._sodium = sodium;
    /** @type {BoundedMap} userId -> DirectoryEntry */
    this._entries = new BoundedMap(capacity);
    /** @type {Map<string, Promise<DirectoryEntry>>} fetches in flight, at most one per user */
    this._inflight = new Map();
  }

  /** @returns {Promise<DirectoryEntry>} the cached entry, fetched if absent */
  async get(userId) {
    return this._entries.get(userId) ?? this.refresh(userId);
  }

  /** @returns {DirectoryEntry | undefined} */
  cached(userId) {
    return this._entries.get(userId);
  }

  /** Fetches `GET /v1/users/{id}/devices` again. */
  refresh(userId) {
    let p = this._inflight.get(userId);
    if (p) return p;
    p = this._rest
      .request('GET', `/v1/users/${encodeURIComponent(userId)}/devices`)
      .then((reply) => this.store(userId, reply.devices, reply.username))
      .finally(() => this._inflight.delete(userId));
    this._inflight.set(userId, p);
    return p;
  }

  /**
   * Stores a device list as the server sent it (`device_id`, `public_key`),
   * with the account's username when the server gave it (the directory
   * carries it; a server older than that does not, and `GET /v1/devices`
   * never does): then the one already known is kept.
   */
  store(userId, devices, username) {
    const known = typeof username === 'string' ? username : this._entries.get(userId)?.username;
    /** @type {DirectoryEntry} */
    const entry = {
      userId,
      ...(known !== undefined ? { username: known } : {}),
      devices: devices.map((d) => ({ deviceId: d.device_id, publicKey: fromBase64(this._sodium, d.public_key) })),
      fetchedAt: Date.now(),
    };
    this._entries.set(userId, entry);
    return entry;
  }

  /** Forgets a user's entry, so the next use fetches it. */
  invalidate(userId) {
    this._entries.delete(userId);
  }
}
