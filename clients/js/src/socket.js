// socket: the live WebSocket of one device, kept open. It authenticates
// with an `auth` frame after open (browsers cannot set headers), reports
// `ready` and `drained`, matches replies (`sent`, `authed`, `acked`) to
// requests by `ref`, renews the token in place when the session refreshes
// (`auth` -> `authed`), and reconnects with full-jitter exponential
// backoff, except where the protocol says not to (4409 connected
// elsewhere, 4429 too many sockets) or the session has ended. It knows
// frames, not messages: decryption and de-duplication are the inbox's.
//
// States (the `state` event, with the close code where there is one):
//   connecting -> open (after `ready`) -> drained (backlog delivered)
//   -> reconnecting (a wait of `delayMs`) -> connecting ...
//   closed: by `stop()`, 4409, 4429, or a session that ended.

import { Emitter } from './emitter.js';
import { Backoff } from './backoff.js';
import { SealpostError, errorFromFrame } from './errors.js';

/**
 * Requests (sends, auth renewals) awaiting a reply on one socket. The
 * server reads no more than 256 unconfirmed sends per connection; holding
 * more here would only queue them in the kernel. Further requests wait for a
 * slot (their promises are the caller's, so the wait is bounded by the app).
 */
export const MAX_IN_FLIGHT = 256;
/** A request without a reply after this long fails `timeout` and the socket, presumed half-dead, is reopened. */
export const REPLY_TIMEOUT_MS = 20_000;
/** `ready` must come this soon after open (the server's own auth deadline is 10 s). */
const READY_TIMEOUT_MS = 15_000;
/** Close codes after which reconnecting would only repeat the refusal. */
const FINAL_CODES = new Set([4409, 4429]);
/** The code this client closes with when it drops a socket it cannot keep up with (see the client's flow control). */
export const CLOSE_BEHIND = 4000;

export class Socket extends Emitter {
  /**
   * @param {{url: string, WebSocket: any, session: import('./session.js').Session,
   *          exclusive?: boolean, backoff?: {baseMs?: number, capMs?: number}}} opts
   */
  constructor(opts) {
    super();
    this._url = opts.url;
    this._WebSocket = opts.WebSocket;
    this._session = opts.session;
    this._exclusive = !!opts.exclusive;
    this._backoff = new Backoff(opts.backoff);
    /** @type {'idle'|'connecting'|'open'|'drained'|'reconnecting'|'paused'|'closed'} */
    this.state = 'idle';
    this._ws = null;
    this._refSeq = 0;
    /** @type {Map<string, {resolve: Function, reject: Function, timer: any}>} */
    this._pending = new Map();
    /** @type {Array<() => void>} requests waiting for an in-flight slot */
    this._slotWaiters = [];
    this._retryTimer = null;
    this._stopped = false;
    /** Whether the server answers an `ack` that carries a `ref` (`acked`); known from `ready`. */
    this.answersAcks = false;
    this._offTokens = this._session.on('tokens', (t) => this._renew(t.accessToken));
    this._offLoggedOut = this._session.on('loggedOut', () => this.stop(4401));
  }

  /** Opens the socket (and keeps it open) until `stop()`. */
  start() {
    this._stopped = false;
    if (this.state === 'idle' || this.state === 'closed' || this.state === 'paused') this._connect();
  }

  /** Whether requests can be sent now (authenticated). */
  get isReady() {
    return this.state === 'open' || this.state === 'drained';
  }

  _setState(state, extra = {}) {
    this.state = state;
    this.emit('state', { state, ...extra });
  }

  _connect() {
    clearTimeout(this._retryTimer);
    if (this._session.state !== 'active') return this._final(4401, 'logged out');
    this._setState('connecting', { attempt: this._backoff.attempt });
    const url = this._url + (this._exclusive ? '?exclusive=true' : '');
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (err) {
      return this._closed(null, 1006, String(err));
    }
    this._ws = ws;
    const readyTimer = setTimeout(() => {
      if (this._ws === ws && !this.isReady) this._drop(ws, 'no ready in time');
    }, READY_TIMEOUT_MS);
    ws.onopen = () => {
      let token;
      try {
        token = this._session.accessToken();
      } catch {
        return this._drop(ws, 'logged out');
      }
      ws.send(JSON.stringify({ type: 'auth', token }));
    };
    ws.onmessage = (event) => {
      if (this._ws !== ws) return;
      if (typeof event.data !== 'string') return; // the protocol is text frames only
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame && typeof frame.type === 'string') this._onFrame(frame, readyTimer);
    };
    ws.onerror = () => { /* the close event follows and carries the code */ };
    ws.onclose = (event) => {
      clearTimeout(readyTimer);
      this._closed(ws, event.code, event.reason);
    };
  }

  _onFrame(frame, readyTimer) {
    switch (frame.type) {
      case 'ready':
        clearTimeout(readyTimer);
        this.userId = frame.user_id;
        this.deviceId = frame.device_id;
        this.expiresAt = frame.expires_at;
        // `ready.devices` and the `acked` answer to an ack with a `ref` came
        // in the same revision of the protocol: a server that sends the
        // first answers the second (an older one ignores the `ref`, and an
        // ack waiting for its answer would wait for nothing).
        this.answersAcks = Array.isArray(frame.devices);
        this._setState('open', { userId: frame.user_id, deviceId: frame.device_id });
        this.emit('ready', frame);
        break;
      case 'drained':
        this._backoff.reset(); // a connection that got this far is healthy
        this._setState('drained');
        this.emit('drained');
        break;
      case 'sent':
      case 'authed':
      case 'acked':
        this._settle(frame.ref, null, frame);
        break;
      case 'error':
        if (frame.ref !== undefined && this._pending.has(frame.ref)) this._settle(frame.ref, errorFromFrame(frame));
        else this.emit('serverError', errorFromFrame(frame));
        break;
      case 'message':
      case 'receipt':
      case 'devices_changed':
        this.emit(frame.type, frame);
        break;
      default:
        break; // unknown frame types are ignored (protocol.md)
    }
  }

  _settle(ref, err, frame) {
    const p = ref === undefined ? undefined : this._pending.get(ref);
    if (!p) return;
    this._pending.delete(ref);
    clearTimeout(p.timer);
    if (err) p.reject(err);
    else p.resolve(frame);
    this._slotWaiters.shift()?.();
  }

  /** Sends a frame without a reply (acks). @returns {boolean} whether it was written */
  post(frame) {
    if (!this.isReady || !this._ws) return false;
    try {
      this._ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false; // closing: the close handler follows
    }
  }

  /**
   * Sends a frame with a fresh `ref` and resolves with the matching `sent`,
   * `authed` or `acked`, or rejects with the `error` frame's SealpostError; `network`
   * when the socket closes first, `not_connected` when it is not open.
   */
  async request(frame) {
    while (this._pending.size >= MAX_IN_FLIGHT) {
      await new Promise((resolve) => this._slotWaiters.push(resolve));
    }
    if (!this.isReady) throw new SealpostError('not_connected', 'the socket is not open');
    const ref = `r${++this._refSeq}`;
    const ws = this._ws;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(ref);
        reject(new SealpostError('timeout', `no reply to ${frame.type} in ${REPLY_TIMEOUT_MS} ms`));
        this._slotWaiters.shift()?.();
        if (this._ws === ws) this._drop(ws, 'reply timeout');
      }, REPLY_TIMEOUT_MS);
      this._pending.set(ref, { resolve, reject, timer });
      try {
        ws.send(JSON.stringify({ ...frame, ref }));
      } catch (cause) {
        this._settle(ref, new SealpostError('network', 'the socket is closing', { cause }));
      }
    });
  }

  /** Puts a refreshed access token in force on the live socket. */
  async _renew(token) {
    if (!this.isReady) return; // the next connection authenticates with it
    try {
      const authed = await this.request({ type: 'auth', token });
      this.expiresAt = authed.expires_at;
      this.emit('authed', authed);
    } catch (err) {
      // Refused (or lost): the old token runs out and the server closes
      // with 4401, which refreshes and reconnects; do it now instead.
      this.emit('renewFailed', err);
      if (this._ws && err instanceof SealpostError && err.code === 'unauthorized') this._drop(this._ws, 'renewal refused');
    }
  }

  /** Closes a socket abruptly from our side; the close handler reconnects. */
  _drop(ws, reason) {
    try {
      ws.close(CLOSE_BEHIND, reason.slice(0, 100));
    } catch {
      /* already closing */
    }
    // Some implementations report the close late; do not wait for them.
    this._closed(ws, 1006, reason);
  }

  _failPending(err) {
    for (const [, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this._pending.clear();
    for (const wake of this._slotWaiters.splice(0)) wake();
  }

  async _closed(ws, code, reason) {
    if (ws !== null && this._ws !== ws) return; // an old socket's late close
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.onerror = () => {};
    }
    this._failPending(new SealpostError('network', `the socket closed (${code})`));
    if (this._stopped) return this._final(this._stopCode ?? code, reason);
    if (FINAL_CODES.has(code)) return this._final(code, reason);
    if (this._paused) return this._setState('paused', { code, reason });
    if (code === 4401) {
      // The token expired or was revoked: refresh, then reconnect.
      try {
        await this._session.refresh();
      } catch {
        if (this._session.state !== 'active') return this._final(4401, 'logged out');
      }
      if (this._stopped) return this._final(this._stopCode ?? code, reason);
    }
    const delayMs = this._backoff.next();
    this._setState('reconnecting', { code, reason, delayMs, attempt: this._backoff.attempt });
    this._retryTimer = setTimeout(() => this._connect(), delayMs);
  }

  _final(code, reason) {
    clearTimeout(this._retryTimer);
    if (this.state !== 'closed') this._setState('closed', { code, reason });
  }

  /**
   * Closes the socket because the application is not consuming messages;
   * unacked ones stay queued on the server. `resume()` reconnects.
   */
  pause() {
    if (this._paused || this._stopped) return;
    this._paused = true;
    clearTimeout(this._retryTimer);
    const ws = this._ws;
    if (ws) this._drop(ws, 'client fell behind');
    else this._setState('paused', {});
  }

  resume() {
    if (!this._paused) return;
    this._paused = false;
    if (!this._stopped && this.state === 'paused') this._connect();
  }

  /** Closes for good (the app's choice, or the session ended). */
  stop(code = 1000) {
    this._stopped = true;
    this._stopCode = code;
    clearTimeout(this._retryTimer);
    this._offTokens();
    this._offLoggedOut();
    const ws = this._ws;
    if (ws) {
      try {
        ws.close(1000, 'client closed');
      } catch {
        /* already closed */
      }
      this._closed(ws, code, 'client closed');
    } else {
      this._failPending(new SealpostError('closed', 'the client was closed'));
      this._final(code, 'client closed');
    }
  }
}
