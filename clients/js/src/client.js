// client: `SealpostClient`, the application's one object per logged-in
// device. It wires the parts together (rest, session, directory, socket,
// inbox, polling) and owns the send path: encrypt one envelope per recipient
// device, send, recover from `409 devices_changed` and dropped connections
// with bounded retries, then send the sync copy to the account's other
// devices. Each of the two sends has a `client_id` of its own, kept with its
// ciphertext across its retries, so the server stores a retried send once.
// All state lives in the instance.

import { Emitter } from './emitter.js';
import { Backoff, sleep } from './backoff.js';
import { SealpostError } from './errors.js';
import { Rest } from './rest.js';
import { Session } from './session.js';
import { Directory } from './directory.js';
import { Socket } from './socket.js';
import { Inbox } from './inbox.js';
import { loadSodium, toBase64, randomUuid } from './sodium.js';
import { generateDeviceKeys, exportDeviceKeys, importDeviceKeys } from './keys.js';
import { sealBody, encodePlaintext, textLength, MAX_TEXT_CHARS } from './body.js';

/** Re-encrypt-and-resend rounds after `409 devices_changed`: the devices may keep changing, so stop somewhere. */
export const DEVICES_CHANGED_RETRIES = 3;
/** Resends after a dropped connection, a timeout or a 5xx: the same envelopes under the same `client_id`, which the server answers with its first answer if it took the send. */
export const TRANSIENT_RETRIES = 4;
/** The pause between polling rounds when the last one found nothing more (protocol.md, "Polling"). */
export const DEFAULT_POLL_INTERVAL_MS = 3_000;

/**
 * @typedef {object} ClientOptions
 * @property {string} baseUrl e.g. `https://relay.example.com`
 * @property {any} [sodium] a libsodium-wrappers instance; imported when absent
 * @property {typeof fetch} [fetch] defaults to globalThis.fetch
 * @property {any} [WebSocket] a WebSocket constructor; defaults to globalThis.WebSocket
 * @property {{baseMs?: number, capMs?: number}} [backoff] reconnect backoff bounds
 * @property {number} [timeoutMs] per REST request
 */

async function setup(opts) {
  if (!opts || typeof opts.baseUrl !== 'string') throw new TypeError('baseUrl is required');
  const sodium = await loadSodium(opts.sodium);
  const rest = new Rest({ baseUrl: opts.baseUrl, fetch: opts.fetch, timeoutMs: opts.timeoutMs });
  return { sodium, rest };
}

function keysFrom(sodium, keys) {
  return keys ? importDeviceKeys(sodium, keys) : generateDeviceKeys(sodium);
}

export class SealpostClient extends Emitter {
  /**
   * Creates an account (its first device is device 1) and logs in as it.
   * @param {ClientOptions & {username: string, password: string, keys?: any}} opts
   */
  static async register(opts) {
    const { sodium, rest } = await setup(opts);
    const keys = keysFrom(sodium, opts.keys);
    await rest.request('POST', '/v1/register', {
      auth: false,
      body: { username: opts.username, password: opts.password, public_key: toBase64(sodium, keys.publicKey) },
    });
    const pair = await rest.request('POST', '/v1/login', {
      auth: false,
      body: { username: opts.username, password: opts.password, device_id: 1 },
    });
    return SealpostClient._start(opts, sodium, rest, pair, keys);
  }

  /**
   * Logs in as an existing device, with the key pair the app kept for it.
   * @param {ClientOptions & {username: string, password: string, deviceId?: number, keys: any}} opts
   */
  static async login(opts) {
    const { sodium, rest } = await setup(opts);
    if (!opts.keys) throw new TypeError('login needs the device\'s keys (a new device: use addDevice)');
    const keys = importDeviceKeys(sodium, opts.keys);
    const pair = await rest.request('POST', '/v1/login', {
      auth: false,
      body: { username: opts.username, password: opts.password, device_id: opts.deviceId ?? 1 },
    });
    return SealpostClient._start(opts, sodium, rest, pair, keys);
  }

  /**
   * Adds a new device to an account (`POST /v1/devices`) with a fresh key
   * pair (or `keys`), and returns a client logged in as it. Persist
   * `client.deviceId` and `client.exportKeys()`.
   * @param {ClientOptions & {username: string, password: string, name?: string, keys?: any}} opts
   */
  static async addDevice(opts) {
    const { sodium, rest } = await setup(opts);
    const keys = keysFrom(sodium, opts.keys);
    const body = { username: opts.username, password: opts.password, public_key: toBase64(sodium, keys.publicKey) };
    if (opts.name !== undefined) body.name = opts.name;
    const pair = await rest.request('POST', '/v1/devices', { auth: false, body });
    return SealpostClient._start(opts, sodium, rest, pair, keys);
  }

  /**
   * Resumes a session from a persisted refresh token (`client.tokens()`),
   * without the password. The token is spent; persist the new one
   * (`tokens` event).
   * @param {ClientOptions & {refreshToken: string, keys: any}} opts
   */
  static async resume(opts) {
    const { sodium, rest } = await setup(opts);
    const keys = importDeviceKeys(sodium, opts.keys);
    const pair = await rest.request('POST', '/v1/token/refresh', { auth: false, body: { refresh_token: opts.refreshToken } });
    return SealpostClient._start(opts, sodium, rest, pair, keys);
  }

  static async _start(opts, sodium, rest, pair, keys) {
    const session = new Session(rest, pair);
    rest.session = session;
    let me;
    try {
      me = await rest.request('GET', '/v1/me');
    } catch (err) {
      session.end('closed');
      throw err;
    }
    if (me.public_key !== toBase64(sodium, keys.publicKey)) {
      session.end('closed');
      throw new TypeError(`these keys are not device ${me.device_id}'s: its public key on the server differs`);
    }
    return new SealpostClient({ opts, sodium, rest, session, keys, me });
  }

  /** @private use register, login, addDevice or resume */
  constructor({ opts, sodium, rest, session, keys, me }) {
    super();
    // Only what later calls need: never the password.
    this._opts = { WebSocket: opts.WebSocket, backoff: opts.backoff };
    this._sodium = sodium;
    this._rest = rest;
    this._session = session;
    this.keys = keys;
    /** @type {string} */
    this.userId = me.id;
    /** @type {string} */
    this.username = me.username;
    /** @type {number} */
    this.deviceId = me.device_id;
    this.directory = new Directory(rest, sodium);
    this.inbox = new Inbox({ sodium, keys, directory: this.directory, sendAcks: (ids) => this._sendAcks(ids) });
    /** @type {Socket | null} */
    this._socket = null;
    this._polling = null;
    this._closed = false;
    /** Connection state, as in the `state` event; `idle` until `connect()`. */
    this.connectionState = 'idle';

    for (const event of ['message', 'undecryptable', 'ignored', 'duplicate', 'ephemeral']) {
      this.inbox.on(event, (x) => this.emit(event, x));
    }
    this.inbox.on('error', (err) => this.emit('error', err));
    this.inbox.on('overflow', () => this._socket?.pause());
    this.inbox.on('resume', () => this._socket?.resume());
    session.on('tokens', (t) => this.emit('tokens', t));
    session.on('refreshFailed', (err) => this.emit('error', err));
    session.on('loggedOut', (err) => {
      this.emit('loggedOut', err);
      this._stopPolling();
    });
  }

  /** The device's key pair as base64 strings, for the app to persist. */
  exportKeys() {
    return exportDeviceKeys(this._sodium, this.keys);
  }

  /** The current tokens (persist `refreshToken` to `resume` later; it changes on every refresh: `tokens` event). */
  tokens() {
    return this._session.tokens();
  }

  /** `active`, `loggedOut` or `closed`. */
  get sessionState() {
    return this._session.state;
  }

  /** Refreshes the tokens now (they are also refreshed at 80% of their lifetime). */
  refreshTokens() {
    return this._session.refresh();
  }

  /** Any authenticated REST call, with the 401 refresh-and-retry. */
  request(method, path, body) {
    this._checkOpen();
    return this._rest.request(method, path, { body });
  }

  _checkOpen() {
    if (this._closed) throw new SealpostError('closed', 'the client was closed');
  }

  // ---- the live socket -------------------------------------------------

  /**
   * Opens the WebSocket and keeps it open (reconnecting with backoff).
   * Resolves on the first `ready`; `waitForDrained()` for the backlog.
   * @param {{exclusive?: boolean}} [opts]
   */
  connect(opts = {}) {
    this._checkOpen();
    if (this._socket && this._socket.state !== 'closed') return this._waitState(['open', 'drained']);
    const WebSocketImpl = this._opts.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketImpl !== 'function') throw new TypeError('no WebSocket: pass the `WebSocket` option (in Node 20, the `ws` package)');
    const url = this._rest.baseUrl.replace(/^http/, 'ws') + '/v1/ws';
    const socket = new Socket({ url, WebSocket: WebSocketImpl, session: this._session, exclusive: opts.exclusive, backoff: this._opts.backoff });
    this._socket = socket;
    socket.on('state', (s) => {
      this.connectionState = s.state;
      this.emit('state', s);
      if (s.state === 'drained') this.emit('drained');
    });
    socket.on('message', (frame) => this.inbox.push(frame));
    socket.on('receipt', (f) => this.emit('receipt', { id: f.id, to: f.to, deviceId: f.device_id }));
    socket.on('devices_changed', (f) => this._ownDevicesChanged(f.devices));
    socket.on('authed', (f) => this.emit('authed', { expiresAt: f.expires_at }));
    socket.on('renewFailed', (err) => this.emit('error', err));
    socket.on('serverError', (err) => this.emit('error', err));
    socket.on('ready', () => {
      // Acks written while the socket was down went over REST; any still pending go now.
      if (this.inbox._ackPending.size > 0) this.inbox.flushAcks().catch(() => {});
    });
    const ready = this._waitState(['open', 'drained']);
    socket.start();
    return ready;
  }

  /** Resolves when the socket reaches one of `states`; rejects if it closes for good first. */
  _waitState(states) {
    return new Promise((resolve, reject) => {
      const socket = this._socket;
      if (!socket) return reject(new SealpostError('not_connected', 'connect() first'));
      if (states.includes(socket.state)) return resolve(undefined);
      const off = socket.on('state', (s) => {
        if (states.includes(s.state)) {
          off();
          resolve(undefined);
        } else if (s.state === 'closed') {
          off();
          reject(this._session.state === 'loggedOut'
            ? new SealpostError('unauthorized', 'logged out')
            : new SealpostError('closed', `the socket closed for good (${s.code})`));
        }
      });
    });
  }

  /** Resolves once the current connection's backlog has been delivered (`drained`). */
  waitForDrained() {
    return this._waitState(['drained']);
  }

  /** Closes the socket (no reconnect). Polling, if started, goes on. */
  disconnect() {
    this._socket?.stop();
  }

  async _ownDevicesChanged(ids) {
    try {
      const reply = await this._rest.request('GET', '/v1/devices');
      this.directory.store(this.userId, reply.devices);
      this.emit('devicesChanged', { deviceIds: ids, devices: reply.devices });
    } catch (err) {
      this.directory.invalidate(this.userId);
      this.emit('devicesChanged', { deviceIds: ids, devices: null });
      this.emit('error', err);
    }
  }

  // ---- REST polling ----------------------------------------------------

  /**
   * One polling round: every page of `GET /v1/messages`, each message handed
   * to the same stream as the socket's. Acks are the application's, as ever.
   * @returns {Promise<number>} copies received in this round
   */
  async pollOnce() {
    this._checkOpen();
    let after = null;
    let count = 0;
    do {
      if (this.inbox.overflowing) break;
      const q = after ? `?limit=500&after=${encodeURIComponent(after)}` : '?limit=500';
      const page = await this._rest.request('GET', `/v1/messages${q}`);
      for (const m of page.messages) this.inbox.push(m);
      count += page.messages.length;
      await this.inbox.settled();
      after = page.next;
    } while (after);
    return count;
  }

  /**
   * Polls in a loop for hosts that cannot hold a socket: a round, then
   * `intervalMs` of rest (or at once when the consumer is behind and catches
   * up). Errors are reported on `error` and retried with backoff; a session
   * that ends stops it.
   * @param {{intervalMs?: number}} [opts]
   */
  startPolling(opts = {}) {
    this._checkOpen();
    if (this._polling) return;
    const controller = new AbortController();
    const interval = opts.intervalMs ?? DEFAULT_POLL_INTERVAL_MS;
    const backoff = new Backoff(this._opts.backoff);
    this._polling = controller;
    (async () => {
      while (!controller.signal.aborted) {
        let wait = interval;
        try {
          if (!this.inbox.overflowing) await this.pollOnce();
          backoff.reset();
        } catch (err) {
          if (this._session.state !== 'active') break;
          this.emit('error', err);
          wait = Math.max(backoff.next(), 50);
        }
        try {
          await sleep(wait, controller.signal);
        } catch {
          break;
        }
      }
    })();
  }

  stopPolling() {
    this._stopPolling();
  }

  _stopPolling() {
    this._polling?.abort();
    this._polling = null;
  }

  // ---- incoming ----------------------------------------------------------

  /** An async iterator of decrypted messages (socket and polling alike). */
  messages() {
    return this.inbox[Symbol.asyncIterator]();
  }

  /** Acknowledges messages or ids, batched; resolves when written. */
  ack(items) {
    return this.inbox.ack(Array.isArray(items) || typeof items?.[Symbol.iterator] === 'function' && typeof items !== 'string' ? items : [items]);
  }

  /** Writes pending acks now. */
  flushAcks() {
    return this.inbox.flushAcks();
  }

  async _sendAcks(ids) {
    if (this._socket?.post({ type: 'ack', ids })) return;
    await this._rest.request('POST', '/v1/messages/ack', { body: { ids } });
  }

  // ---- sending -------------------------------------------------------------

  /**
   * Sends a text message to a user: one `send` with an envelope per device
   * of theirs, then the sync copy to this account's other devices (with
   * `to`), both with one client message id (`clientId`) in the plaintext.
   * Resolves when the first is accepted (`sent`/201) and the sync copy is
   * settled.
   * @param {string} userId
   * @param {string} text
   * @param {{clientId?: string}} [opts] a client message id to reuse (an app-level retry: encrypted and sent anew, receivers drop the copy they already showed)
   * @returns {Promise<{id: string, sentAt: string, clientId: string, envelopes: {deviceId: number, body: string}[], sync: {id: string, sentAt: string} | null, syncError?: SealpostError}>}
   */
  async send(userId, text, opts = {}) {
    this._checkOpen();
    if (typeof text !== 'string') throw new TypeError('text must be a string');
    if (textLength(text) > MAX_TEXT_CHARS) {
      throw new SealpostError('invalid', `text is over ${MAX_TEXT_CHARS} characters`, { field: 'text' });
    }
    const clientId = opts.clientId ?? randomUuid(this._sodium);
    const ts = Date.now();
    if (userId === this.userId) {
      // A note to yourself: the sync copy is the message.
      const r = await this._sendSealed(userId, { type: 'text', id: clientId, ts, text, to: userId }, false);
      return { id: r?.id ?? null, sentAt: r?.sentAt ?? null, clientId, envelopes: r?.envelopes ?? [], sync: null };
    }
    const main = await this._sendSealed(userId, { type: 'text', id: clientId, ts, text }, false);
    let sync = null;
    let syncError;
    try {
      sync = await this._sendSealed(this.userId, { type: 'text', id: clientId, ts, text, to: userId }, false);
    } catch (err) {
      // The message itself was accepted: report, do not throw (a retry would resend it).
      syncError = err;
      this.emit('error', err);
    }
    return {
      id: main.id,
      sentAt: main.sentAt,
      clientId,
      envelopes: main.envelopes,
      sync: sync && { id: sync.id, sentAt: sync.sentAt },
      ...(syncError ? { syncError } : {}),
    };
  }

  /**
   * Sends an ephemeral message over the socket (typing, presence): delivered
   * only to the recipient's connections online now, never stored. The
   * payload is any JSON object with a `type` (e.g. `{type: "typing"}`);
   * readers of the body format ignore types they do not know.
   * @returns {Promise<{id: string, delivered: boolean}>}
   */
  async sendEphemeral(userId, payload = { type: 'typing' }) {
    this._checkOpen();
    const plaintext = { ...payload, type: payload.type ?? 'typing', id: randomUuid(this._sodium), ts: Date.now() };
    const r = await this._sendSealed(userId, plaintext, true);
    return { id: r.id, delivered: r.delivered };
  }

  /**
   * Seals `plaintext` for every device of `to` (but this one when `to` is
   * us) and sends it, re-encrypting after `devices_changed` and resending
   * after transient failures. Returns null for a sync copy with nobody to
   * go to.
   *
   * One `client_id` for every attempt. A transient failure leaves it
   * unknown whether the server took the send, so the retry must be the same
   * send byte for byte: the same envelopes, never encrypted again (a fresh
   * nonce would make it another send, refused `409 conflict`). Only
   * `devices_changed` re-encrypts, under the same key: that refusal stored
   * nothing and recorded no key. Ephemeral sends are never stored and
   * carry none.
   */
  async _sendSealed(to, plaintext, ephemeral) {
    const bytes = encodePlaintext(plaintext);
    const backoff = new Backoff(this._opts.backoff);
    const clientId = ephemeral ? undefined : randomUuid(this._sodium);
    let changed = 0;
    let transient = 0;
    let envelopes = null;
    for (;;) {
      this._checkOpen();
      if (envelopes === null) {
        const entry = await this.directory.get(to);
        const devices = to === this.userId ? entry.devices.filter((d) => d.deviceId !== this.deviceId) : entry.devices;
        if (to === this.userId && devices.length === 0 && !ephemeral) return null;
        envelopes = devices.map((d) => ({
          device_id: d.deviceId,
          body: toBase64(this._sodium, sealBody(this._sodium, bytes, d.publicKey, this.keys.secretKey)),
        }));
      }
      try {
        const message = clientId === undefined ? { to, envelopes } : { to, envelopes, client_id: clientId };
        const sent = await this._transmit(message, ephemeral);
        // What crossed the server: for apps that show it (the demo does).
        return { ...sent, envelopes: envelopes.map((e) => ({ deviceId: e.device_id, body: e.body })) };
      } catch (err) {
        if (!(err instanceof SealpostError)) throw err;
        if (err.code === 'devices_changed' && changed < DEVICES_CHANGED_RETRIES) {
          changed++;
          await this.directory.refresh(to);
          envelopes = null;
          continue;
        }
        const wait = err.code === 'rate_limited' && err.retryAfter !== undefined
          ? err.retryAfter * 1000
          : err.retryable || (err.code === 'not_connected' && !ephemeral) ? backoff.next() : -1;
        if (wait >= 0 && transient < TRANSIENT_RETRIES && !(ephemeral && err.code === 'not_connected')) {
          transient++;
          await sleep(wait);
          continue;
        }
        throw err;
      }
    }
  }

  /** One attempt: over the socket when it is up (required for ephemeral), else REST. */
  async _transmit(message, ephemeral) {
    const socket = this._socket;
    if (ephemeral) {
      if (!socket?.isReady) throw new SealpostError('not_connected', 'ephemeral sends need the socket: connect() first');
      const sent = await socket.request({ type: 'send', ...message, ephemeral: true });
      return { id: sent.id, sentAt: sent.sent_at, delivered: sent.delivered === true };
    }
    if (socket?.isReady) {
      const sent = await socket.request({ type: 'send', ...message });
      return { id: sent.id, sentAt: sent.sent_at };
    }
    const created = await this._rest.request('POST', '/v1/messages', { body: message });
    return { id: created.id, sentAt: created.sent_at };
  }

  // ---- account ---------------------------------------------------------------

  /** This account's devices (`GET /v1/devices`), with names and times. */
  async devices() {
    const reply = await this.request('GET', '/v1/devices');
    this.directory.store(this.userId, reply.devices);
    return reply.devices;
  }

  /** Ends this session on the server (`POST /v1/logout`) and closes the client. */
  async logout() {
    await this.flushAcks().catch(() => {});
    // Stop the socket first: the logout closes it with 4401, which must not read as "refresh and reconnect".
    this._socket?.stop();
    try {
      await this._rest.request('POST', '/v1/logout');
    } finally {
      this.close();
    }
  }

  /** Stops the socket, polling and timers. Pending acks are written first, best effort. */
  async close() {
    if (this._closed) return;
    try {
      await this.inbox.flushAcks();
    } catch {
      /* best effort */
    }
    this._closed = true;
    this._socket?.stop();
    this._stopPolling();
    this.inbox.close();
    this._session.end('closed');
  }
}
