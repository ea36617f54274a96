// inbox: turns the server's message copies, from the socket or from REST
// polling alike, into decrypted messages for the application, in arrival
// order; drops duplicates; and batches the application's acks.
//
// Guarantees, and the local state they rest on:
// - Each server message id reaches the application at most once per client
//   instance, as long as it is among the last SEEN_IDS ids seen (the `_seen`
//   map). A copy redelivered after a reconnect is dropped if still unacked
//   (the application holds it) and acked again if its ack may have been lost.
// - A message whose (sender, client id) pair was already shown, under
//   another server id (a retry after a lost `sent`), is acked and dropped,
//   within the last SEEN_CLIENT_IDS pairs (`_seenClient`).
// - Nothing is acked that the application did not ack, except duplicates,
//   bodies that cannot be read (reported as `undecryptable`) and plaintexts
//   of unknown types (reported as `ignored`): the protocol says to ack those.
// Both bounds forget the oldest entries first; a restarted client starts empty
// and relies on the server (never redelivers an acked copy) and on the app's
// own store.

import { Emitter } from './emitter.js';
import { BoundedMap } from './bounded.js';
import { BodyError, openBody, openSharedWithHash, sha256, decodePlaintext } from './body.js';
import { fromBase64 } from './sodium.js';

/** A device's queue holds at most 10,000 copies by default: a whole redelivered backlog fits. ~1 MB. */
export const SEEN_IDS = 10_000;
/** Same reasoning for the (sender, client id) pairs. */
export const SEEN_CLIENT_IDS = 10_000;
/**
 * Decrypted messages waiting for an iterator to take them. Past this the
 * inbox reports `overflow` and the client stops reading (closes the socket,
 * pauses polling) until the consumer has taken half: the copies stay queued
 * on the server, unacked, and come back in the next backlog.
 */
export const MAX_BUFFERED = 1000;
/** Ids per ack frame or request (the server's cap). */
export const MAX_ACK_IDS = 500;
/** Acks wait this long to be batched with the next ones. */
export const ACK_DELAY_MS = 20;

/**
 * @typedef {{id: string, from: string, from_device: number, body: string, key?: string, sent_at: string, ephemeral?: boolean}} WireMessage
 */

export class Inbox extends Emitter {
  /**
   * @param {{sodium: any, keys: {secretKey: Uint8Array}, directory: import('./directory.js').Directory,
   *          sendAcks: (ids: string[]) => Promise<void>}} opts
   */
  constructor(opts) {
    super();
    this._sodium = opts.sodium;
    this._keys = opts.keys;
    this._directory = opts.directory;
    this._sendAcks = opts.sendAcks;
    /** @type {BoundedMap} server id -> 'pending' | 'acked' */
    this._seen = new BoundedMap(SEEN_IDS);
    /** @type {BoundedMap} `${from}\n${clientId}` -> server id */
    this._seenClient = new BoundedMap(SEEN_CLIENT_IDS);
    /** Serialises processing, so messages reach the app in arrival order even when a key fetch awaits. */
    this._chain = Promise.resolve();
    this._queued = 0;
    /** @type {any[]} decrypted messages for the iterator */
    this._buffer = [];
    /** @type {Array<(r: IteratorResult<any>) => void>} */
    this._takers = [];
    this._iterating = 0;
    this._overflowing = false;
    this._closed = false;
    /** @type {Set<string>} */
    this._ackPending = new Set();
    this._ackTimer = null;
    /** @type {null | {promise: Promise<void>, resolve: Function, reject: Function}} the batch `ack()` callers wait on */
    this._ackBatch = null;
  }

  /** Whether the consumer is behind (see MAX_BUFFERED): new copies should not be read. */
  get overflowing() {
    return this._overflowing;
  }

  /**
   * Takes one copy from the server. Returns at once; processing is in order.
   * A copy that arrives while overflowing is dropped unseen (it stays queued
   * on the server).
   * @param {WireMessage} wire
   */
  push(wire) {
    if (this._closed || this._overflowing) return;
    this._queued++;
    this._chain = this._chain
      .then(() => this._process(wire))
      .catch((err) => this.emit('error', err))
      .finally(() => { this._queued--; });
  }

  /** Resolves once every copy pushed so far is processed. */
  settled() {
    return this._chain;
  }

  async _process(wire) {
    if (wire.ephemeral) return this._processEphemeral(wire);
    const state = this._seen.get(wire.id);
    if (state === 'acked') return this._queueAck(wire.id); // our ack may have been lost
    if (state === 'pending') return;
    const opened = await this._open(wire);
    if (opened.error) {
      this._seen.set(wire.id, 'acked');
      this._queueAck(wire.id);
      this.emit('undecryptable', {
        id: wire.id, from: wire.from, fromDevice: wire.from_device, sentAt: wire.sent_at,
        reason: opened.error.reason, error: opened.error,
      });
      return;
    }
    const p = opened.plaintext;
    if (p.type !== 'text') {
      this._seen.set(wire.id, 'acked');
      this._queueAck(wire.id);
      this.emit('ignored', { id: wire.id, from: wire.from, fromDevice: wire.from_device, type: p.type, plaintext: p });
      return;
    }
    const clientKey = `${wire.from}\n${p.id}`;
    const earlier = this._seenClient.get(clientKey);
    if (earlier !== undefined && earlier !== wire.id) {
      this._seen.set(wire.id, 'acked');
      this._queueAck(wire.id);
      this.emit('duplicate', { id: wire.id, clientId: p.id, from: wire.from, firstId: earlier });
      return;
    }
    this._seen.set(wire.id, 'pending');
    this._seenClient.set(clientKey, wire.id);
    const message = {
      id: wire.id,
      from: wire.from,
      fromDevice: wire.from_device,
      clientId: p.id,
      ts: p.ts,
      text: p.text,
      ...(p.to !== undefined ? { to: p.to } : {}),
      ...(p.group !== undefined ? { group: { id: p.group.id, name: p.group.name, members: [...p.group.members] } } : {}),
      sentAt: wire.sent_at,
      // The sealed body as it arrived (base64): what the server held.
      body: wire.body,
      ack: () => this.ack([wire.id]),
    };
    Object.defineProperty(message, 'ack', { enumerable: false });
    this._deliver(message);
  }

  async _processEphemeral(wire) {
    const opened = await this._open(wire);
    if (opened.error) {
      this.emit('undecryptable', { id: wire.id, from: wire.from, fromDevice: wire.from_device, sentAt: wire.sent_at, reason: opened.error.reason, error: opened.error, ephemeral: true });
      return;
    }
    this.emit('ephemeral', { id: wire.id, from: wire.from, fromDevice: wire.from_device, sentAt: wire.sent_at, payload: opened.plaintext });
  }

  /**
   * Decrypts with the sending device's cached key; on failure (unknown
   * device, or a key that may have changed), fetches the sender's directory
   * once and tries again. A copy with a `key` is a group message's
   * (shared form): the key opens as a 0x01 body, and must name this body.
   * @returns {Promise<{plaintext?: any, error?: BodyError}>}
   */
  async _open(wire) {
    let bytes;
    let key;
    try {
      bytes = fromBase64(this._sodium, wire.body);
      if (typeof wire.key === 'string') key = fromBase64(this._sodium, wire.key);
    } catch {
      return { error: new BodyError('plaintext', 'the body or key is not base64') };
    }
    // Hashed once, outside the attempts: the digest is async (WebCrypto).
    const sharedHash = key ? await sha256(this._sodium, bytes) : undefined;
    const attempt = (entry) => {
      const device = entry.devices.find((d) => d.deviceId === wire.from_device);
      if (!device) return { error: new BodyError('open', `sender device ${wire.from_device} is not in its directory`) };
      try {
        const plain = key
          ? openSharedWithHash(this._sodium, bytes, sharedHash, key, device.publicKey, this._keys.secretKey)
          : openBody(this._sodium, bytes, device.publicKey, this._keys.secretKey);
        return { plaintext: decodePlaintext(plain) };
      } catch (err) {
        if (err instanceof BodyError) return { error: err };
        throw err;
      }
    };
    const cached = this._directory.cached(wire.from);
    let result = cached ? attempt(cached) : undefined;
    if (result && (result.plaintext || result.error.reason === 'version' || result.error.reason === 'short' || result.error.reason === 'binding')) return result;
    let entry;
    try {
      entry = await this._directory.refresh(wire.from);
    } catch (err) {
      // No directory (the sender's account was deleted: 404, or the network):
      // report it unreadable rather than hold the queue.
      return { error: Object.assign(new BodyError('open', `no directory for the sender: ${err.message}`), { cause: err }) };
    }
    return attempt(entry);
  }

  _deliver(message) {
    this.emit('message', message);
    if (this._iterating === 0 && this.listenerCount('message') > 0) return;
    const taker = this._takers.shift();
    if (taker) return taker({ value: message, done: false });
    this._buffer.push(message);
    if (this._buffer.length >= MAX_BUFFERED && !this._overflowing) {
      this._overflowing = true;
      this.emit('overflow');
    }
  }

  /** An async iterator over decrypted messages. */
  [Symbol.asyncIterator]() {
    this._iterating++;
    let done = false;
    const finish = () => {
      if (!done) {
        done = true;
        this._iterating--;
      }
    };
    return {
      next: () => {
        if (this._buffer.length > 0) {
          const value = this._buffer.shift();
          if (this._overflowing && this._buffer.length <= MAX_BUFFERED / 2) {
            this._overflowing = false;
            this.emit('resume');
          }
          return Promise.resolve({ value, done: false });
        }
        if (this._closed || done) {
          finish();
          return Promise.resolve({ value: undefined, done: true });
        }
        return new Promise((resolve) => this._takers.push(resolve));
      },
      return: () => {
        finish();
        return Promise.resolve({ value: undefined, done: true });
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  /**
   * Acknowledges messages (or ids); batched with others within ACK_DELAY_MS.
   * Resolves once the batch holding them is written (socket frame, or REST)
   * and, where the server answers acks (`acked`), once it is durable.
   * @param {Iterable<string | {id: string}>} items
   */
  ack(items) {
    for (const item of items) {
      const id = typeof item === 'string' ? item : item.id;
      this._seen.set(id, 'acked');
      this._ackPending.add(id);
    }
    return this._scheduleAck();
  }

  _queueAck(id) {
    this._ackPending.add(id);
    this._scheduleAck().catch(() => { /* retried with the next batch */ });
  }

  _scheduleAck() {
    if (!this._ackBatch) {
      let resolve, reject;
      const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
      this._ackBatch = { promise, resolve, reject };
      this._ackTimer = setTimeout(() => this.flushAcks().catch(() => { /* the batch's callers have it */ }), ACK_DELAY_MS);
    } else if (this._ackPending.size >= MAX_ACK_IDS) {
      clearTimeout(this._ackTimer);
      this._ackTimer = setTimeout(() => this.flushAcks().catch(() => {}), 0);
    }
    return this._ackBatch.promise;
  }

  /**
   * Writes every pending ack now, in batches of MAX_ACK_IDS, and settles the
   * promises of the `ack()` calls waiting for them. Failed ids stay pending
   * for the next flush.
   */
  async flushAcks() {
    clearTimeout(this._ackTimer);
    const batch = this._ackBatch;
    this._ackBatch = null;
    try {
      while (this._ackPending.size > 0) {
        const ids = [...this._ackPending].slice(0, MAX_ACK_IDS);
        for (const id of ids) this._ackPending.delete(id);
        try {
          await this._sendAcks(ids);
        } catch (err) {
          for (const id of ids) this._ackPending.add(id);
          throw err;
        }
      }
    } catch (err) {
      batch?.reject(err);
      throw err;
    }
    batch?.resolve();
  }

  /** Ends the iterators; pending acks are left to the caller's final `flushAcks()`. */
  close() {
    this._closed = true;
    clearTimeout(this._ackTimer);
    for (const taker of this._takers.splice(0)) taker({ value: undefined, done: true });
  }
}
