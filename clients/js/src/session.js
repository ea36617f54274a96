// session: the tokens of one logged-in device and keeping them fresh. It
// holds the current access token and only the latest refresh token
// (refresh tokens are single-use; presenting a spent one revokes every
// session of the user), refreshes at 80% of the access token's lifetime,
// and merges concurrent refreshes into one request so a burst of 401s never
// spends the same refresh token twice. A refresh answered 401 ends the
// session: state `loggedOut`, the `loggedOut` event, and every later call
// fails with `unauthorized`.

import { Emitter } from './emitter.js';
import { SealpostError } from './errors.js';

/** Refresh when this share of `expires_in` has passed: room for a slow network and the socket's `auth` round trip. */
export const REFRESH_AT = 0.8;
/** After a refresh that failed for lack of a reply, try again this much later (not at once: see `refresh`). */
const RETRY_AFTER_NETWORK_MS = 5_000;

/**
 * @typedef {{access_token: string, refresh_token: string, expires_in: number, device_id: number, user_id?: string}} TokenPair
 * @typedef {{accessToken: string, refreshToken: string, expiresAt: number, deviceId: number, userId?: string}} Tokens
 */

export class Session extends Emitter {
  /**
   * @param {import('./rest.js').Rest} rest
   * @param {TokenPair} pair
   */
  constructor(rest, pair) {
    super();
    this._rest = rest;
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
   * the protocol's intended outcome for a lost reply.
   * @returns {Promise<Tokens>}
   */
  refresh() {
    if (this.state !== 'active') return Promise.reject(new SealpostError('unauthorized', 'logged out'));
    if (this._inflight) return this._inflight;
    const presented = this._refresh;
    this._inflight = this._rest
      .request('POST', '/v1/token/refresh', { body: { refresh_token: presented }, auth: false })
      .then(
        (pair) => {
          this._inflight = null;
          if (this.state !== 'active') throw new SealpostError('unauthorized', 'logged out');
          this._apply(pair);
          const tokens = this.tokens();
          this.emit('tokens', tokens);
          return tokens;
        },
        (err) => {
          this._inflight = null;
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
    return this._inflight;
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
