// client: `SealpostClient`, the application's one object per logged-in
// device. It wires the parts together (rest, session, directory, socket,
// inbox, polling) and owns the send path: encrypt one envelope per recipient
// device, send, recover from `409 devices_changed` and dropped connections
// with bounded retries, then send the sync copy to the account's other
// devices. Each of the two sends has a `client_id` of its own, kept with its
// ciphertext across its retries, so the server stores a retried send once.
// A group message is one multi-recipient send in the shared form (one body
// for all, a sealed key per device), the sync copy included.
// A message is checked against the server's limits (`GET /v1/limits`, once
// per client) before it is sealed. All state lives in the instance.

import { Emitter } from './emitter.js';
import { Backoff, sleep } from './backoff.js';
import { SealpostError } from './errors.js';
import { Rest } from './rest.js';
import { Session, checkTokenStore, refreshInLock } from './session.js';
import { Directory } from './directory.js';
import { Socket } from './socket.js';
import { Inbox } from './inbox.js';
import { TypingTracker } from './typing.js';
import { DEFAULT_LIMITS, fetchLimits, checkSealedSize, sealedBodyBytes } from './limits.js';
import { loadSodium, toBase64, randomUuid } from './sodium.js';
import { generateDeviceKeys, exportDeviceKeys, importDeviceKeys } from './keys.js';
import { sealBody, sealShared, sealKey, encodePlaintext, textLength, MAX_TEXT_CHARS, MAX_GROUP_NAME_CHARS } from './body.js';

/** Re-encrypt-and-resend rounds after `409 devices_changed`: the devices may keep changing, so stop somewhere. */
export const DEVICES_CHANGED_RETRIES = 3;
/** Resends after a dropped connection, a timeout or a 5xx: the same envelopes under the same `client_id`, which the server answers with its first answer if it took the send. The default of `send`'s `retries`. */
export const TRANSIENT_RETRIES = 4;
/** A kept access token with less than this left is not used by `resume`: its first requests would find it expired. */
export const RESUME_MARGIN_MS = 60_000;
/** A UUID's width, to measure a plaintext before its ids are drawn. */
const SAMPLE_UUID = '00000000-0000-4000-8000-000000000000';

/**
 * How long to wait before resending after `err`, or -1 not to. A rate
 * limit says how long (`retry_after_ms`, `Retry-After`); other transient
 * failures back off, at least as long as a 503 asked.
 */
function retryWait(err, backoff, ephemeral) {
  const asked = (err.retryAfter ?? 0) * 1000;
  if (err.code === 'rate_limited') return err.retryAfter !== undefined ? asked : backoff.next();
  if (err.retryable) return Math.max(backoff.next(), asked);
  // The socket dropped between the check and the write: REST is next. An
  // ephemeral send has no REST path, and is not worth a wait.
  if (err.code === 'not_connected' && !ephemeral) return backoff.next();
  return -1;
}
/** The pause between polling rounds when the last one found nothing more (protocol.md, "Polling"). */
export const DEFAULT_POLL_INTERVAL_MS = 3_000;

/**
 * @typedef {object} SendOptions
 * @property {string} [clientId] a client message id to reuse (an app-level retry: encrypted and sent anew, receivers drop the copy they already showed)
 * @property {number} [retries] resends after transient failures (TRANSIENT_RETRIES by default); `Infinity` waits out a server that is down, resending the same ciphertext under the same `client_id` until it is taken
 * @property {(r: {error: SealpostError, attempt: number, delayMs: number}) => void} [onRetry] told before each wait, e.g. to show the message as pending
 * @property {boolean} [urgent] `true` (the default): the recipient's offline devices are woken at once, at high priority; `false`: at low priority, at most once per device in the server's quiet interval, for what can wait until the app is opened. The sync copy to your other devices is always sent non-urgent.
 */

/**
 * A group as protocol.md has it (`id`, `name` of at most
 * MAX_GROUP_NAME_CHARS, `members` with the sender's account), copied, the
 * sender added when missing and members listed once.
 */
function checkGroup(group, selfId) {
  if (!group || typeof group.id !== 'string' || group.id === '') throw new TypeError('a group needs a string id');
  if (typeof group.name !== 'string' || textLength(group.name) > MAX_GROUP_NAME_CHARS) {
    throw new SealpostError('invalid', `a group name is a string of at most ${MAX_GROUP_NAME_CHARS} characters`, { field: 'name' });
  }
  if (!Array.isArray(group.members) || !group.members.every((m) => typeof m === 'string')) throw new TypeError('a group\'s members are user ids');
  const members = [...new Set([...group.members, selfId])];
  return { id: group.id, name: group.name, members };
}

/** A push target's fields that a browser's `PushSubscription.toJSON()` gives, and the server takes. */
const WEBPUSH_FIELDS = ['endpoint', 'keys', 'expirationTime'];

/**
 * The body of `PUT /v1/devices/{id}/push` for `target`: a browser's
 * PushSubscription (or its `toJSON()`), which becomes a `webpush` target,
 * or an object with its `kind` (`webpush`, `apns`, `fcm`) as protocol.md
 * has it.
 */
export function pushTargetBody(target) {
  if (target === null || typeof target !== 'object') throw new TypeError('a push target is a PushSubscription or an object with a kind');
  const json = typeof target.toJSON === 'function' ? target.toJSON() : target;
  if (json.kind === undefined) {
    if (typeof json.endpoint !== 'string' || typeof json.keys !== 'object' || json.keys === null) {
      throw new TypeError('a push target without a kind must be a Web Push subscription (endpoint and keys)');
    }
    const body = { kind: 'webpush' };
    for (const field of WEBPUSH_FIELDS) if (json[field] !== undefined) body[field] = json[field];
    return body;
  }
  if (typeof json.kind !== 'string') throw new TypeError('a push target\'s kind is a string');
  return { ...json };
}

/**
 * @typedef {object} ClientOptions
 * @property {string} baseUrl e.g. `https://relay.example.com`
 * @property {any} [sodium] a libsodium-wrappers instance; imported when absent
 * @property {typeof fetch} [fetch] defaults to globalThis.fetch
 * @property {any} [WebSocket] a WebSocket constructor; defaults to globalThis.WebSocket
 * @property {{baseMs?: number, capMs?: number}} [backoff] reconnect backoff bounds
 * @property {number} [timeoutMs] per REST request
 * @property {import('./session.js').TokenStore} [tokenStore] shared by every client of this device's session (browser tabs, workers): refreshes take turns in its lock, each with the latest stored refresh token
 */

async function setup(opts) {
  if (!opts || typeof opts.baseUrl !== 'string') throw new TypeError('baseUrl is required');
  const sodium = await loadSodium(opts.sodium);
  if (opts.tokenStore !== undefined) checkTokenStore(opts.tokenStore);
  const rest = new Rest({ baseUrl: opts.baseUrl, fetch: opts.fetch, timeoutMs: opts.timeoutMs });
  return { sodium, rest };
}

function keysFrom(sodium, keys) {
  return keys ? importDeviceKeys(sodium, keys) : generateDeviceKeys(sodium);
}

/**
 * Who a new session is. A pair that names its account (`user_id`) is
 * answered by the account's directory, which carries the username and the
 * key of every device (the first sync copy needs them anyway); a server
 * older than those fields by `GET /v1/me`.
 * @returns {Promise<{me: {id: string, username: string, device_id: number, public_key: string}, ownDirectory?: any}>}
 */
async function whoAmI(rest, pair) {
  if (typeof pair.user_id === 'string') {
    const dir = await rest.request('GET', `/v1/users/${encodeURIComponent(pair.user_id)}/devices`);
    const device = dir?.devices?.find((d) => d.device_id === pair.device_id);
    if (typeof dir?.username === 'string' && device) {
      return { me: { id: pair.user_id, username: dir.username, device_id: pair.device_id, public_key: device.public_key }, ownDirectory: dir };
    }
  }
  return { me: await rest.request('GET', '/v1/me') };
}

export class SealpostClient extends Emitter {
  /**
   * Creates an account (its first device is device 1) and starts a session
   * of it: the one the register answer carries, or, from a server whose
   * answer has none, a login.
   * @param {ClientOptions & {username: string, password: string, keys?: any}} opts
   */
  static async register(opts) {
    const { sodium, rest } = await setup(opts);
    const keys = keysFrom(sodium, opts.keys);
    const account = await rest.request('POST', '/v1/register', {
      auth: false,
      body: { username: opts.username, password: opts.password, public_key: toBase64(sodium, keys.publicKey) },
    });
    if (typeof account?.access_token === 'string' && typeof account.refresh_token === 'string') {
      // The answer is the account and the session at once: nothing to ask.
      const deviceId = account.device_id ?? 1;
      const pair = { ...account, device_id: deviceId, user_id: account.user_id ?? account.id };
      return SealpostClient._start(opts, sodium, rest, pair, keys, { id: pair.user_id, username: account.username, device_id: deviceId });
    }
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
   * without the password. Given `tokens` (all of what `tokens()` returns,
   * kept) whose access token has a minute or more left, starts on it and
   * spends nothing. Otherwise the refresh token is spent; persist the new
   * one (`tokens` event). With a `tokenStore`, in its lock, from the latest
   * token stored there (`refreshToken` is then only the fallback, and may
   * be left out), and the new one is saved there.
   * @param {ClientOptions & {refreshToken?: string, tokens?: import('./session.js').Tokens, keys: any}} opts
   */
  static async resume(opts) {
    const { sodium, rest } = await setup(opts);
    const keys = importDeviceKeys(sodium, opts.keys);
    const store = opts.tokenStore;
    const kept = opts.tokens;
    if (kept && typeof kept.accessToken === 'string' && typeof kept.refreshToken === 'string'
      && typeof kept.deviceId === 'number' && kept.expiresAt - Date.now() >= RESUME_MARGIN_MS) {
      // An access token with a minute or more left is used as it is: no
      // refresh spent (a service worker woken by a push, a process that
      // restarted). A 401 on it refreshes as ever, in the store's lock.
      const pair = {
        access_token: kept.accessToken,
        refresh_token: kept.refreshToken,
        expires_in: (kept.expiresAt - Date.now()) / 1000,
        device_id: kept.deviceId,
        ...(typeof kept.userId === 'string' ? { user_id: kept.userId } : {}),
      };
      return SealpostClient._start(opts, sodium, rest, pair, keys, undefined, { saved: true });
    }
    const own = () => {
      if (typeof opts.refreshToken !== 'string' || opts.refreshToken === '') {
        throw new SealpostError('unauthorized', store ? 'no refresh token: none given, and none in the token store' : 'no refresh token given');
      }
      return opts.refreshToken;
    };
    let pair;
    if (store) {
      await refreshInLock(rest, store, { own, accept: (p) => { pair = p; } });
    } else {
      pair = await rest.request('POST', '/v1/token/refresh', { auth: false, body: { refresh_token: own() } });
    }
    return SealpostClient._start(opts, sodium, rest, pair, keys, undefined, { saved: true });
  }

  /**
   * Starts a client on a token pair. `known` is who the session is when the
   * caller already knows it (a register answer); otherwise it is asked,
   * and the device's key on the server checked against `keys`. A new
   * session's tokens go to the token store, if any (in its lock, not to
   * land between another client's refresh and its save); a resumed one's
   * are there already.
   */
  static async _start(opts, sodium, rest, pair, keys, known, { saved = false } = {}) {
    const store = opts.tokenStore;
    const session = new Session(rest, pair, store);
    rest.session = session;
    let saveError;
    if (store && !saved) {
      try {
        await store.withLock(() => store.save(session.tokens()));
      } catch (err) {
        // The session is fine; only the store's other clients keep theirs.
        saveError = err;
      }
    }
    let me = known;
    let ownDirectory;
    if (!me) {
      try {
        ({ me, ownDirectory } = await whoAmI(rest, pair));
      } catch (err) {
        session.end('closed');
        throw err;
      }
      if (me.public_key !== toBase64(sodium, keys.publicKey)) {
        session.end('closed');
        throw new TypeError(`these keys are not device ${me.device_id}'s: its public key on the server differs`);
      }
    }
    if (session.userId === undefined) session.userId = me.id;
    const client = new SealpostClient({ opts, sodium, rest, session, keys, me });
    if (ownDirectory) client.directory.store(me.id, ownDirectory.devices, ownDirectory.username);
    // Once the app can listen.
    if (saveError !== undefined) queueMicrotask(() => client.emit('error', saveError));
    return client;
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
    this.typing = new TypingTracker();
    /** @type {Promise<Record<string, number>> | null} the server's limits, asked once */
    this._limits = null;
    /** The limits as last learned (the defaults until then), for synchronous checks. */
    this._knownLimits = { ...DEFAULT_LIMITS };
    /** Wakes sends waiting to retry when the socket is back, or the client closes (see `_pause`). */
    this._wake = new Emitter();
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
    this.inbox.on('ephemeral', (e) => {
      if (e.payload?.type === 'typing' && e.from !== this.userId) this.typing.heard(e.from, e.fromDevice, e.payload);
    });
    // A text from a sender ends its typing at once.
    this.inbox.on('message', (m) => this.typing.stopped(m.from));
    this.typing.on('typing', (t) => this.emit('typing', t));
    this.inbox.on('overflow', () => this._socket?.pause());
    this.inbox.on('resume', () => this._socket?.resume());
    session.on('tokens', (t) => this.emit('tokens', t));
    session.on('refreshFailed', (err) => this.emit('error', err));
    session.on('storeFailed', (err) => this.emit('error', err));
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
    socket.on('devices_changed', (f) => this._ownDevicesChanged({ deviceIds: f.devices, deviceId: f.device_id, reason: f.reason }));
    socket.on('authed', (f) => this.emit('authed', { expiresAt: f.expires_at }));
    socket.on('renewFailed', (err) => this.emit('error', err));
    socket.on('serverError', (err) => this.emit('error', err));
    socket.on('ready', (f) => {
      const devices = Array.isArray(f.devices) ? f.devices : undefined;
      const pushDropped = f.push_dropped === true;
      this.emit('ready', { userId: f.user_id, deviceId: f.device_id, expiresAt: f.expires_at, ...(devices ? { devices } : {}), ...(pushDropped ? { pushDropped } : {}) });
      // The push service dropped this device's target: the server wakes
      // it no more until it registers again (setPushTarget).
      if (pushDropped) this.emit('pushDropped', { deviceId: f.device_id });
      // Devices added or removed while this one was offline: the frame
      // that said so went to nobody, so compare with what we last knew.
      const known = this.directory.cached(this.userId)?.devices.map((d) => d.deviceId);
      if (devices && known && known.join() !== devices.join()) {
        // One event per device that came or went, with its reason, as the
        // frames would have said (a login or key change while offline
        // cannot be told from the ids, and is not).
        const changes = [
          ...devices.filter((d) => !known.includes(d)).map((deviceId) => ({ deviceId, reason: 'added' })),
          ...known.filter((d) => !devices.includes(d)).map((deviceId) => ({ deviceId, reason: 'removed' })),
        ];
        for (const change of changes) this._ownDevicesChanged({ deviceIds: devices, ...change });
      }
      // Acks written while the socket was down went over REST; any still pending go now.
      if (this.inbox._ackPending.size > 0) this.inbox.flushAcks().catch(() => {});
      this._wake.emit('wake');
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

  /**
   * A change of this account's devices: `deviceIds` (the account's device
   * ids now) and, from a `devices_changed` frame of a server that says,
   * the device it is about and why (`added`, `removed`, `key`, `login`).
   */
  async _ownDevicesChanged({ deviceIds, deviceId, reason }) {
    const about = {
      deviceIds,
      ...(typeof deviceId === 'number' ? { deviceId } : {}),
      ...(typeof reason === 'string' ? { reason } : {}),
    };
    try {
      const reply = await this._rest.request('GET', '/v1/devices');
      this.directory.store(this.userId, reply.devices);
      this.emit('devicesChanged', { ...about, devices: reply.devices });
    } catch (err) {
      this.directory.invalidate(this.userId);
      this.emit('devicesChanged', { ...about, devices: null });
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

  /**
   * Writes one batch of acks: over the socket when it is up, else REST.
   * A server that answers acks (`acked`, see Socket.answersAcks) is asked
   * to, so the batch settles once the acks are durable, and fails with the
   * server's error (the ids then stay pending); an older one is not.
   */
  async _sendAcks(ids) {
    const socket = this._socket;
    if (socket?.isReady && socket.answersAcks) {
      try {
        await socket.request({ type: 'ack', ids });
        return;
      } catch (err) {
        // The socket went away under the ack: REST does the same, now.
        if (!(err instanceof SealpostError) || (err.code !== 'network' && err.code !== 'not_connected')) throw err;
      }
    } else if (socket?.post({ type: 'ack', ids })) {
      return;
    }
    await this._rest.request('POST', '/v1/messages/ack', { body: { ids } });
  }

  // ---- limits ----------------------------------------------------------------

  /**
   * The server's limits (`GET /v1/limits`: `max_body_bytes`,
   * `max_devices_per_user`, ...), asked once; a server without that
   * endpoint gets DEFAULT_LIMITS. A failure to ask (the server unreachable)
   * is not kept: the next call asks again.
   * @returns {Promise<Record<string, number>>}
   */
  limits() {
    if (!this._limits) {
      this._limits = fetchLimits(this._rest).then(
        (limits) => {
          this._knownLimits = limits;
          return limits;
        },
        (err) => {
          this._limits = null;
          throw err;
        },
      );
    }
    return this._limits;
  }

  /** The limits to check a send against: the server's, or, while it cannot be asked, the last known. */
  async _currentLimits() {
    try {
      return await this.limits();
    } catch {
      return this._knownLimits;
    }
  }

  /**
   * How `text` measures against what `send` checks: its length in
   * characters against MAX_TEXT_CHARS, and the size of its largest sealed
   * body (the sync copy's, which also names the peer) against the server's
   * `max_body_bytes` as last learned (the defaults until `limits()` has
   * answered). For an input's counter.
   * @param {string} text
   */
  measureText(text) {
    const chars = textLength(text);
    // A plaintext as `send` writes it, its ids and time at their full widths.
    const sample = encodePlaintext({ type: 'text', id: SAMPLE_UUID, ts: Date.now(), text, to: SAMPLE_UUID });
    const sealedBytes = sealedBodyBytes(sample.length);
    const maxBodyBytes = this._knownLimits.max_body_bytes;
    return { chars, maxChars: MAX_TEXT_CHARS, sealedBytes, maxBodyBytes, fits: chars <= MAX_TEXT_CHARS && sealedBytes <= maxBodyBytes };
  }

  // ---- sending -------------------------------------------------------------

  /**
   * Sends a text message to a user: one `send` with an envelope per device
   * of theirs, then the sync copy to this account's other devices (with
   * `to`), both with one client message id (`clientId`) in the plaintext.
   * Resolves when the first is accepted (`sent`/201) and the sync copy is
   * settled.
   *
   * Refused before anything is sealed: a text over MAX_TEXT_CHARS
   * (`invalid`), and one whose sealed body would be over the server's
   * `max_body_bytes` (`too_large`).
   * @param {string} userId
   * @param {string} text
   * @param {SendOptions} [opts]
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
    const retry = { retries: opts.retries, onRetry: opts.onRetry };
    const urgent = opts.urgent ?? true;
    // The sync copy also names the peer, so it is the larger of the two:
    // checked before either is sealed, a message never goes out without it.
    checkSealedSize(encodePlaintext({ type: 'text', id: clientId, ts, text, to: userId }), (await this._currentLimits()).max_body_bytes);
    if (userId === this.userId) {
      // A note to yourself: the sync copy is the message.
      const r = await this._sendSealed(userId, { type: 'text', id: clientId, ts, text, to: userId }, false, { ...retry, urgent });
      return { id: r?.id ?? null, sentAt: r?.sentAt ?? null, clientId, envelopes: r?.envelopes ?? [], sync: null };
    }
    const main = await this._sendSealed(userId, { type: 'text', id: clientId, ts, text }, false, { ...retry, urgent });
    let sync = null;
    let syncError;
    try {
      // Not urgent: you wrote it, nobody waits for it on your other
      // devices (Signal sends its sync messages so).
      sync = await this._sendSealed(this.userId, { type: 'text', id: clientId, ts, text, to: userId }, false, { ...retry, urgent: false });
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
   * Tells `userId` that you are typing: the `typing` plaintext of
   * protocol.md, ephemeral (never stored). Readers show it for 5 s after
   * the last one, so send one every few seconds while the user types, and
   * `{stopped: true}` when they stop without sending. Needs the live
   * socket (`not_connected` otherwise).
   * @param {string} userId
   * @param {{stopped?: boolean}} [opts]
   * @returns {Promise<{id: string, delivered: boolean}>}
   */
  sendTyping(userId, opts = {}) {
    return this.sendEphemeral(userId, opts.stopped ? { type: 'typing', state: 'stopped' } : { type: 'typing' });
  }

  /**
   * A new group, not yet known to anyone: a fresh id, `name`, and `members`
   * (user ids) with this account added. Nothing is sent: its first
   * `sendGroup` tells the members.
   * @param {string} name
   * @param {string[]} members
   * @returns {{id: string, name: string, members: string[]}}
   */
  createGroup(name, members) {
    return checkGroup({ id: randomUuid(this._sodium), name, members: [...members] }, this.userId);
  }

  /**
   * Sends a text message to a group in the shared form (protocol.md,
   * "Group messages"): one multi-recipient send to every other member and,
   * when this account has other devices, to itself (their sync copies), the
   * plaintext carrying `group`. Resolves when the server took it.
   *
   * The shared body and its content key are sealed once. A transient
   * failure resends the very same request under its `client_id`; after
   * `devices_changed`, only the keys of the accounts the server named are
   * sealed again (their directories fetched anew), under the same
   * `client_id`, the shared body unchanged.
   * @param {{id: string, name: string, members: string[]}} group
   * @param {string} text
   * @param {SendOptions} [opts]
   * @returns {Promise<{id: string, sentAt: string, clientId: string, group: {id: string, name: string, members: string[]}, recipients: string[], shared: string}>}
   */
  async sendGroup(group, text, opts = {}) {
    this._checkOpen();
    if (typeof text !== 'string') throw new TypeError('text must be a string');
    if (textLength(text) > MAX_TEXT_CHARS) {
      throw new SealpostError('invalid', `text is over ${MAX_TEXT_CHARS} characters`, { field: 'text' });
    }
    const g = checkGroup(group, this.userId);
    const clientId = opts.clientId ?? randomUuid(this._sodium);
    const plaintext = { type: 'text', id: clientId, ts: Date.now(), text, group: g };
    const bytes = encodePlaintext(plaintext);
    // The shared body is a secretbox of the plaintext: as long as a 0x01 body.
    checkSealedSize(bytes, (await this._currentLimits()).max_body_bytes);
    const { shared, material } = await sealShared(this._sodium, bytes);
    const sharedB64 = toBase64(this._sodium, shared);
    const r = await this._sendShared(g.members, sharedB64, material, { retries: opts.retries, onRetry: opts.onRetry, urgent: opts.urgent ?? true });
    // `shared`: what crossed the server, for apps that show it (the demo does).
    return { id: r.id, sentAt: r.sentAt, clientId, group: g, recipients: r.recipients, shared: sharedB64 };
  }

  /**
   * Seals `material` for every device of `members` (but this one) and sends
   * one `send_multi` / `POST /v1/messages/multi` with `shared`.
   */
  async _sendShared(members, shared, material, { retries = TRANSIENT_RETRIES, onRetry, urgent = true }) {
    const backoff = new Backoff(this._opts.backoff);
    const clientId = randomUuid(this._sodium);
    // Every member but us, then us (the sync copies), in the members' order:
    // a retry repeats the recipients in the same order, as it must.
    const accounts = [...new Set(members.filter((m) => m !== this.userId)), this.userId];
    /** @type {Map<string, {device_id: number, key: string}[]>} account -> its devices' keys; sealed once, kept across retries */
    const keys = new Map();
    const sealFor = async (userId) => {
      const entry = await this.directory.get(userId);
      const devices = userId === this.userId ? entry.devices.filter((d) => d.deviceId !== this.deviceId) : entry.devices;
      keys.set(userId, devices.map((d) => ({
        device_id: d.deviceId,
        key: toBase64(this._sodium, sealKey(this._sodium, material, d.publicKey, this.keys.secretKey)),
      })));
    };
    let changed = 0;
    let transient = 0;
    for (;;) {
      this._checkOpen();
      try {
        // In the try: a directory that cannot be fetched now waits like a send.
        for (const userId of accounts) if (!keys.has(userId)) await sealFor(userId);
        // Our own account only with another device to sync to; a member
        // without any device cannot be sent to, and the server says so.
        const recipients = accounts
          .filter((userId) => userId !== this.userId || keys.get(userId).length > 0)
          .map((userId) => ({ to: userId, keys: keys.get(userId) }));
        if (recipients.length === 0) throw new SealpostError('invalid', 'a group message needs a member other than this device', { field: 'members' });
        const message = { shared, recipients, client_id: clientId };
        if (urgent === false) message.urgent = false;
        const sent = await this._transmitMulti(message);
        return { ...sent, recipients: recipients.map((r) => r.to) };
      } catch (err) {
        if (!(err instanceof SealpostError)) throw err;
        if (err.code === 'devices_changed' && changed < DEVICES_CHANGED_RETRIES) {
          changed++;
          // Only the accounts named: the others' keys stand. A server that
          // names none gets every account's keys sealed again.
          const named = Array.isArray(err.recipients) ? err.recipients.map((r) => r.to) : accounts;
          for (const userId of named) {
            this.directory.invalidate(userId);
            keys.delete(userId);
          }
          continue;
        }
        const wait = retryWait(err, backoff, false);
        if (wait >= 0 && transient < retries) {
          transient++;
          onRetry?.({ error: err, attempt: transient, delayMs: wait });
          await this._pause(wait);
          continue;
        }
        throw err;
      }
    }
  }

  /** One attempt of a multi-recipient send: `send_multi` over the socket when it is up, else REST. */
  async _transmitMulti(message) {
    const socket = this._socket;
    if (socket?.isReady) {
      const sent = await socket.request({ type: 'send_multi', ...message });
      return { id: sent.id, sentAt: sent.sent_at };
    }
    const created = await this._rest.request('POST', '/v1/messages/multi', { body: message });
    return { id: created.id, sentAt: created.sent_at };
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
   * @param {{retries?: number, onRetry?: SendOptions['onRetry'], urgent?: boolean}} [retry]
   */
  async _sendSealed(to, plaintext, ephemeral, { retries = TRANSIENT_RETRIES, onRetry, urgent = true } = {}) {
    const bytes = encodePlaintext(plaintext);
    checkSealedSize(bytes, (await this._currentLimits()).max_body_bytes);
    const backoff = new Backoff(this._opts.backoff);
    const clientId = ephemeral ? undefined : randomUuid(this._sodium);
    let changed = 0;
    let transient = 0;
    let envelopes = null;
    for (;;) {
      this._checkOpen();
      try {
        if (envelopes === null) {
          // In the try: a directory that cannot be fetched now (the server
          // is down) is waited for like a send that cannot be made.
          const entry = await this.directory.get(to);
          const devices = to === this.userId ? entry.devices.filter((d) => d.deviceId !== this.deviceId) : entry.devices;
          if (to === this.userId && devices.length === 0 && !ephemeral) return null;
          envelopes = devices.map((d) => ({
            device_id: d.deviceId,
            body: toBase64(this._sodium, sealBody(this._sodium, bytes, d.publicKey, this.keys.secretKey)),
          }));
        }
        const message = clientId === undefined ? { to, envelopes } : { to, envelopes, client_id: clientId };
        // Said only when false: an older server sees the send it knows.
        if (!ephemeral && urgent === false) message.urgent = false;
        const sent = await this._transmit(message, ephemeral);
        // What crossed the server: for apps that show it (the demo does).
        return { ...sent, envelopes: envelopes.map((e) => ({ deviceId: e.device_id, body: e.body })) };
      } catch (err) {
        if (!(err instanceof SealpostError)) throw err;
        if (err.code === 'devices_changed' && changed < DEVICES_CHANGED_RETRIES) {
          changed++;
          this.directory.invalidate(to);
          envelopes = null;
          continue;
        }
        const wait = retryWait(err, backoff, ephemeral);
        if (wait >= 0 && transient < retries) {
          transient++;
          onRetry?.({ error: err, attempt: transient, delayMs: wait });
          await this._pause(wait);
          continue;
        }
        throw err;
      }
    }
  }

  /**
   * Waits `ms` before a retry, or less: until the socket is (back) up, when
   * the send has its best chance, or the client closes.
   */
  _pause(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const off = this._wake.on('wake', done);
      function done() {
        clearTimeout(timer);
        off();
        resolve(undefined);
      }
    });
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

  // ---- push targets ------------------------------------------------------

  /**
   * Registers where the server wakes this device when a message waits for
   * it and it holds no socket (`PUT /v1/devices/{id}/push`), replacing its
   * target. `target` is a browser's PushSubscription (or its `toJSON()`),
   * or `{kind: 'apns', token, topic, environment?}` / `{kind: 'fcm',
   * token}`. The same target again is harmless: register on every start,
   * and after `pushDropped`. A wake-up carries nothing: the service worker
   * (or app extension) reads the queue and shows what it opens.
   * Rejects with `push_unavailable` when the server has no provider of
   * that kind, `invalid` (with `field`) for a target it refuses.
   * @returns {Promise<{kind: string, updatedAt: string}>}
   */
  async setPushTarget(target) {
    const body = pushTargetBody(target);
    const reply = await this.request('PUT', `/v1/devices/${this.deviceId}/push`, body);
    return { kind: reply.kind, updatedAt: reply.updated_at };
  }

  /** Removes this device's push target (`DELETE /v1/devices/{id}/push`); resolves when it had none too. */
  async deletePushTarget() {
    await this.request('DELETE', `/v1/devices/${this.deviceId}/push`);
  }

  /**
   * The server's VAPID public key (`GET /v1/push/vapid`), base64url: a
   * browser's `applicationServerKey`. Null when the server offers no Web
   * Push (not configured, or older than push targets).
   * @returns {Promise<string | null>}
   */
  async vapidPublicKey() {
    this._checkOpen();
    try {
      const reply = await this._rest.request('GET', '/v1/push/vapid', { auth: false });
      return reply.public_key;
    } catch (err) {
      if (err instanceof SealpostError && (err.code === 'push_unavailable' || err.code === 'not_found')) return null;
      throw err;
    }
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
    this.typing.close();
    this._wake.emit('wake');
    this._session.end('closed');
  }
}
