// rest: the HTTP side of the protocol. One `request` that speaks JSON, turns
// every non-2xx reply into a SealpostError, and, for authenticated calls,
// answers a 401 by refreshing the session once and retrying once (a second
// 401 is final). It holds no tokens itself: the Session does.

import { SealpostError, errorFromResponse } from './errors.js';

/** A request that got no reply within this time fails with `timeout`. 30 s covers a slow argon2 queue at login. */
export const DEFAULT_TIMEOUT_MS = 30_000;

export class Rest {
  /**
   * @param {{baseUrl: string, fetch?: typeof fetch, timeoutMs?: number}} opts
   */
  constructor(opts) {
    this.baseUrl = opts.baseUrl.replace(/\/+$/, '');
    const f = opts.fetch ?? globalThis.fetch;
    if (typeof f !== 'function') throw new TypeError('no fetch: pass the `fetch` option');
    // Called unbound, browsers throw "Illegal invocation".
    this._fetch = (...args) => f.call(globalThis, ...args);
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    /** @type {null | {accessToken: () => string, refresh: () => Promise<unknown>}} set by the client once it has a session */
    this.session = null;
  }

  /**
   * @param {string} method
   * @param {string} path starting with /v1/
   * @param {{body?: unknown, auth?: boolean}} [opts]
   * @returns {Promise<any>} the parsed JSON reply, or null for 204
   */
  async request(method, path, opts = {}) {
    const auth = opts.auth ?? true;
    try {
      return await this._once(method, path, opts.body, auth);
    } catch (err) {
      if (!auth || !(err instanceof SealpostError) || err.code !== 'unauthorized' || !this.session) throw err;
      // The access token expired or was revoked: one refresh, one retry.
      await this.session.refresh();
      return this._once(method, path, opts.body, auth);
    }
  }

  async _once(method, path, body, auth) {
    /** @type {Record<string, string>} */
    const headers = { accept: 'application/json' };
    if (body !== undefined) headers['content-type'] = 'application/json';
    if (auth) {
      if (!this.session) throw new SealpostError('unauthorized', 'not logged in');
      headers.authorization = `Bearer ${this.session.accessToken()}`;
    }
    let response;
    try {
      response = await this._fetch(this.baseUrl + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(this.timeoutMs),
      });
    } catch (cause) {
      const timedOut = cause && (cause.name === 'TimeoutError' || cause.name === 'AbortError');
      throw new SealpostError(timedOut ? 'timeout' : 'network', `${method} ${path}: ${timedOut ? 'no reply in time' : 'request failed'}`, { cause });
    }
    if (!response.ok) throw await errorFromResponse(response);
    if (response.status === 204) return null;
    const text = await response.text();
    if (text === '') return null;
    try {
      return JSON.parse(text);
    } catch (cause) {
      throw new SealpostError('protocol', `${method} ${path}: reply is not JSON`, { status: response.status, cause });
    }
  }
}
