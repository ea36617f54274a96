// bounded: a size-capped map that forgets its least recently touched entry
// when full (insertion order of a JS Map, refreshed on access). The
// de-duplication sets and the device directory cache are built on it, each
// with its own bound, explained where it is chosen.

export class BoundedMap {
  /** @param {number} capacity at least 1 */
  constructor(capacity) {
    if (!(capacity >= 1)) throw new RangeError('capacity must be at least 1');
    this.capacity = capacity;
    /** @type {Map<any, any>} */
    this._map = new Map();
  }

  get size() {
    return this._map.size;
  }

  has(key) {
    return this._map.has(key);
  }

  /** Returns the value and marks it recently used. */
  get(key) {
    if (!this._map.has(key)) return undefined;
    const value = this._map.get(key);
    this._map.delete(key);
    this._map.set(key, value);
    return value;
  }

  set(key, value) {
    this._map.delete(key);
    this._map.set(key, value);
    while (this._map.size > this.capacity) {
      this._map.delete(this._map.keys().next().value);
    }
    return this;
  }

  delete(key) {
    return this._map.delete(key);
  }

  clear() {
    this._map.clear();
  }
}
