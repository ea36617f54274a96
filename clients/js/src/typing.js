// typing: who is typing to us, from the `typing` plaintexts of protocol.md
// ("Client body format"): ephemeral, one every few seconds while a person
// types. A sender counts as typing for TYPING_SHOWN_MS after its last one,
// and stops at once on a `"state": "stopped"` or on a text message from it.
// The tracker turns that into `typing` events with `typing: true` when a
// sender starts and `typing: false` when it stops, so an application only
// shows and hides.

import { Emitter } from './emitter.js';

/** How long one `typing` keeps a sender shown as typing (protocol.md: 5 s). */
export const TYPING_SHOWN_MS = 5_000;

export class TypingTracker extends Emitter {
  constructor(shownMs = TYPING_SHOWN_MS) {
    super();
    this._shownMs = shownMs;
    /**
     * sender user id -> its timer. Bounded by the senders heard from in the
     * last TYPING_SHOWN_MS: each entry removes itself when its time is up.
     * @type {Map<string, any>}
     */
    this._timers = new Map();
  }

  /** Whether `userId` is shown as typing now. */
  isTyping(userId) {
    return this._timers.has(userId);
  }

  /** A `typing` plaintext from `from` (device `fromDevice`). */
  heard(from, fromDevice, payload) {
    if (payload.state === 'stopped') return this.stopped(from);
    const was = this._timers.get(from);
    clearTimeout(was);
    const timer = setTimeout(() => this.stopped(from), this._shownMs);
    // Node: a pending indicator must not keep a process alive.
    timer?.unref?.();
    this._timers.set(from, timer);
    if (was === undefined) this.emit('typing', { from, fromDevice, typing: true });
  }

  /** `from` stopped: a `stopped` typing, its text arrived, or its time ran out. */
  stopped(from) {
    const timer = this._timers.get(from);
    if (timer === undefined) return;
    clearTimeout(timer);
    this._timers.delete(from);
    this.emit('typing', { from, typing: false });
  }

  close() {
    for (const timer of this._timers.values()) clearTimeout(timer);
    this._timers.clear();
  }
}
