// emitter: a minimal typed event emitter, the same in Node and browsers
// (Node's EventEmitter is not in browsers; EventTarget wraps every payload
// in an Event). A listener that throws does not stop the others; its error
// is reported on the `error` event, or rethrown asynchronously if nobody
// listens, so it is never swallowed.

export class Emitter {
  constructor() {
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
  }

  /** @returns {() => void} a function that removes the listener */
  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    this._listeners.get(event)?.delete(listener);
  }

  once(event, listener) {
    const off = this.on(event, (...args) => {
      off();
      listener(...args);
    });
    return off;
  }

  listenerCount(event) {
    return this._listeners.get(event)?.size ?? 0;
  }

  emit(event, ...args) {
    const set = this._listeners.get(event);
    if (!set) return false;
    for (const listener of [...set]) {
      try {
        listener(...args);
      } catch (err) {
        if (event !== 'error' && this.listenerCount('error') > 0) this.emit('error', err);
        else queueMicrotask(() => { throw err; });
      }
    }
    return set.size > 0;
  }
}
