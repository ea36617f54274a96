// backoff: full-jitter exponential backoff (the "Full Jitter" of the AWS
// architecture blog): attempt n waits a uniformly random time in
// [0, min(cap, base * 2^n)]. Randomising the whole interval spreads the
// reconnects of many clients cut at once (a server restart) instead of
// bringing them back in waves.

export const DEFAULT_BACKOFF = Object.freeze({ baseMs: 250, capMs: 30_000 });

export class Backoff {
  /** @param {{baseMs?: number, capMs?: number, random?: () => number}} [opts] */
  constructor(opts = {}) {
    this.baseMs = opts.baseMs ?? DEFAULT_BACKOFF.baseMs;
    this.capMs = opts.capMs ?? DEFAULT_BACKOFF.capMs;
    this.random = opts.random ?? Math.random;
    this.attempt = 0;
  }

  /** The upper bound of the next wait, in ms. */
  ceiling() {
    // 2^attempt overflows nothing: past ~17 doublings the cap applies anyway.
    return Math.min(this.capMs, this.baseMs * 2 ** Math.min(this.attempt, 30));
  }

  /** The next wait in ms; each call widens the window until the cap. */
  next() {
    const delay = Math.floor(this.random() * this.ceiling());
    this.attempt++;
    return delay;
  }

  reset() {
    this.attempt = 0;
  }
}

/** A promise that resolves after `ms`, or rejects early when `signal` aborts. */
export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(signal.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
