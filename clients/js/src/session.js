// session: the tokens of one logged-in device and keeping them fresh. It
// holds the current access token and only the latest refresh token
// (refresh tokens are single-use; presenting a spent one revokes every
// session of the user), refreshes at 80% of the access token's lifetime,
// and merges concurrent refreshes into one request so a burst of 401s never
// spends the same refresh token twice. A refresh answered 401 ends the
// session: state `loggedOut`, the `loggedOut` event, and every later call
// fails with `unauthorized`.
//
// Several clients of one session (browser tabs, workers) each hold the
// refresh token in memory; once one of them refreshes, the others' copy is
// spent, and presenting it after the server's refresh grace ends every
// session of the user. An app that runs several passes a `tokenStore`:
// every refresh then runs inside its lock, presents the latest stored
// token when it differs from this client's, and stores the new one before
// the lock is released, so the clients take turns on one chain of tokens.

import { Emitter } from './emitter.js';
import { SealpostError } from './errors.js';

/** Refresh when this share of `expires_in` has passed: room for a slow network and the socket's `auth` round trip. */
export const REFRESH_AT = 0.8;
/** After a refresh that failed for lack of a reply, try again this much later (not at once: see `refresh`). */
const RETRY_AFTER_NETWORK_MS = 5_000;

/**
 * @typedef {{access_token: string, refresh_token: string, expires_in: number, device_id: number, user_id?: string}} TokenPair
 * @typedef {{accessToken: string, refreshToken: string, expiresAt: number, deviceId: number, userId?: string}} Tokens
 * @typedef {object} TokenStore shared by every client of one session
 * @property {<T>(fn: () => Promise<T>) => Promise<T>} withLock runs `fn` while no other client of the store runs its own (e.g. `navigator.locks.request(name, fn)`)
 * @property {() => (string | null | undefined | Promise<string | null | undefined>)} load the latest stored refresh token
 * @property {(tokens: Tokens) => (void | Promise<void>)} save stores the new tokens (at least `refreshToken`); called inside the lock
 */

/** Throws unless `store` has the three functions of a TokenStore. */
export function checkTokenStore(store) {
  for (const name of ['withLock', 'load', 'save']) {
    if (typeof store?.[name] !== 'function') throw new TypeError(`tokenStore.${name} must be a function`);
  }
  return store;
}

/** The tokens of a pair as an application keeps them (`tokens` event, `TokenStore.save`). */
function tokensOf(pair, receivedAt) {
  const tokens = { accessToken: pair.access_token, refreshToken: pair.refresh_token, expiresAt: receivedAt + pair.expires_in * 1000, deviceId: pair.device_id };
  return typeof pair.user_id === 'string' ? { ...tokens, userId: pair.user_id } : tokens;
}

/**
 * Trades a refresh token for a new pair inside the store's lock: the
 * latest stored token if there is one (another client may have replaced
 * ours already), else `own()`. `live()`, first in the lock, may throw not
 * to refresh at all (a session closed while it waited). The new tokens are
 * saved first, whatever becomes of them here: the presented token is
 * spent, and the other clients need its successor. Then `accept(pair)`
 * takes them (it may throw to refuse them), and `saved(tokens, saveError)`
 * runs, all before the lock is released. What `resume` and
 * `Session.refresh` share.
 * @param {import('./rest.js').Rest} rest
 * @param {TokenStore} store
 * @param {{own: () => string, live?: () => void, accept: (pair: TokenPair) => Tokens | void, saved?: (tokens: Tokens | void, saveError: unknown) => void}} steps
 * @returns {Promise<Tokens | void>}
 */
export function refreshInLock(rest, store, { own, live, accept, saved }) {
  return store.withLock(async () => {
    live?.();
    const stored = await store.load();
    const presented = typeof stored === 'string' && stored !== '' ? stored : own();
    const pair = await rest.request('POST', '/v1/token/refresh', { body: { refresh_token: presented }, auth: false });
    let saveError;
    try {
      await store.save(tokensOf(pair, Date.now()));
    } catch (err) {
      // This client holds the new token and its session goes on; only the
      // other clients will not find it. Reported, not thrown: the refresh
      // itself must not be retried.
      saveError = err;
    }
    const tokens = accept(pair);
    saved?.(tokens, saveError);
    return tokens;
  });
}

export class Session extends Emitter {
  /**
   * @param {import('./rest.js').Rest} rest
   * @param {TokenPair} pair
   * @param {TokenStore} [store] shared with the other clients of this session, if any
   */
  constructor(rest, pair, store) {
    super();
    this._rest = rest;
    this._store = store ?? null;
    /** @type {'active'|'loggedOut'|'closed'} */
    this.state = 'active';
    /** @type {Promise<Tokens> | null} the refresh in flight, shared by every caller */
    this._inflight = null;
    this._timer = null;
    this._apply(pair);
  }

  /** @returns {string} */
  accessToken() {
    if (this.state !== 'active') throw new SealpostError('unauthorized', 'logged out');
    return this._access;
  }

  /** @returns {Tokens} what an application persists to resume later */
  tokens() {
    const tokens = { accessToken: this._access, refreshToken: this._refresh, expiresAt: this.expiresAt, deviceId: this.deviceId };
    return this.userId === undefined ? tokens : { ...tokens, userId: this.userId };
  }

  _apply(pair) {
    this._access = pair.access_token;
    this._refresh = pair.refresh_token;
    this.deviceId = pair.device_id;
    // Every pair names its account (a server older than that field does
    // not: the client learns it from `GET /v1/me` then).
    if (typeof pair.user_id === 'string') this.userId = pair.user_id;
    this.expiresAt = Date.now() + pair.expires_in * 1000;
    this._schedule(pair.expires_in * 1000 * REFRESH_AT);
  }

  _schedule(ms) {
    clearTimeout(this._timer);
    if (this.state !== 'active') return;
    this._timer = setTimeout(() => {
      this.refresh().catch(() => { /* surfaced by the events; the next timer or 401 tries again */ });
    }, Math.max(0, ms));
  }

  /**
   * Trades the refresh token for a new pair; concurrent calls share one
   * request. A failure without a reply (`network`, `timeout`) keeps the
   * session and tries again in 5 s: the server may have spent the token
   * already, in which case that try fails 401 and the session ends, which is
   * the protocol's intended outcome for a lost reply (or, within the
   * server's refresh grace, is answered with the pair that was lost).
   *
   * With a token store, in its lock, with the latest stored token (see the
   * header); the `tokens` event is emitted inside the lock, after the save.
   * @returns {Promise<Tokens>}
   */
  refresh() {
    if (this.state !== 'active') return Promise.reject(new SealpostError('unauthorized', 'logged out'));
    if (this._inflight) return this._inflight;
    const request = this._store ? this._refreshInLock() : this._rest
      .request('POST', '/v1/token/refresh', { body: { refresh_token: this._refresh }, auth: false })
      .then((pair) => {
        // The only client of its session: as soon as the answer is taken.
        this._inflight = null;
        const tokens = this._accept(pair);
        this.emit('tokens', tokens);
        return tokens;
      });
    // Cleared only if still this one: a `tokens` listener may have started the next.
    const settled = () => {
      if (this._inflight === inflight) this._inflight = null;
    };
    const inflight = request.then(
      (tokens) => {
        settled();
        return tokens;
      },
      (err) => {
        settled();
        if (err instanceof SealpostError && (err.code === 'unauthorized' || err.code === 'forbidden' || err.code === 'not_found')) {
          this.end('loggedOut', err);
        } else if (this.state === 'active') {
          // A 429 or 503 says when to come back (`Retry-After`); without a
          // reply, or a shorter wait, in 5 s.
          this._schedule(Math.max(RETRY_AFTER_NETWORK_MS, (err?.retryAfter ?? 0) * 1000));
          this.emit('refreshFailed', err);
        }
        throw err;
      },
    );
    this._inflight = inflight;
    return inflight;
  }

  /** One of several clients of the session: in the store's lock, with the latest token. */
  async _refreshInLock() {
    return refreshInLock(this._rest, this._store, {
      live: () => {
        // Closed while waiting for the lock: spend nothing.
        if (this.state !== 'active') throw new SealpostError('unauthorized', 'logged out');
      },
      own: () => this._refresh,
      accept: (pair) => {
        // Every client of a store must be the same device (its keys): a
        // pair of another is of no use here, and a loop of refreshes with
        // it would only rotate that device's tokens.
        if (pair.device_id !== this.deviceId || (this.userId !== undefined && typeof pair.user_id === 'string' && pair.user_id !== this.userId)) {
          throw new SealpostError('unauthorized', `the token store holds the session of another device (device ${pair.device_id}, not ${this.deviceId}): one store per device`);
        }
        return this._accept(pair);
      },
      // In the lock, after the save: a listener that persists the token
      // itself cannot write it after another client's newer one.
      saved: (t, saveError) => {
        if (saveError !== undefined) this.emit('storeFailed', saveError);
        this.emit('tokens', t);
      },
    });
  }

  /** Takes a refresh's answer, unless the session ended meanwhile. */
  _accept(pair) {
    if (this.state !== 'active') throw new SealpostError('unauthorized', 'logged out');
    this._apply(pair);
    return this.tokens();
  }

  /** Ends the session locally (no request): `loggedOut` with the cause, or `closed` by the app. */
  end(state, cause) {
    if (this.state !== 'active') return;
    this.state = state;
    clearTimeout(this._timer);
    if (state === 'loggedOut') {
      const err = cause instanceof SealpostError && cause.code === 'unauthorized'
        ? cause
        : new SealpostError('unauthorized', 'the session ended; log in again', { cause });
      this.emit('loggedOut', err);
    }
  }
}
