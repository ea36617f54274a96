// What the demo page and its service worker (sw.js) share, in IndexedDB: a
// service worker has no localStorage, and on a push it must find, without
// the page, the session (tokens), the device's keys and the contacts'
// names. The page keeps its own records in localStorage as before and
// mirrors here what the worker needs; the tokens live only here, written in
// the refresh lock by whichever client (a tab, the worker) refreshed last.
//
// Keys of the one object store:
//   current            the username signed in in this browser (absent: nobody)
//   account:<name>     { username, deviceId, keys, contacts: [{id, username}] }
//   tokens:<name>      the session's tokens ({accessToken, refreshToken, expiresAt, deviceId, userId})
// <name> is the username in lower case.

const DB = 'sealpost-demo';
const STORE = 'kv';

/** @type {Promise<IDBDatabase> | null} one connection per page or worker */
let opening = null;

function db() {
  opening ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB, 1);
    request.onupgradeneeded = () => request.result.createObjectStore(STORE);
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
  opening.catch(() => { opening = null; });
  return opening;
}

async function run(mode, fn) {
  const conn = await db();
  return new Promise((resolve, reject) => {
    const tx = conn.transaction(STORE, mode);
    const request = fn(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(request.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

export const get = (key) => run('readonly', (s) => s.get(key));
export const put = (key, value) => run('readwrite', (s) => s.put(value, key));
export const remove = (key) => run('readwrite', (s) => s.delete(key));

export const accountKey = (username) => `account:${username.toLowerCase()}`;
export const tokensKey = (username) => `tokens:${username.toLowerCase()}`;

/**
 * Where every client of one account's session in this browser (its tabs,
 * the service worker) keeps the latest tokens and takes turns to refresh
 * them: refresh tokens are single-use, and one presented after another
 * client spent it would, after the server's grace, end every session of
 * the account. Each refresh runs in a Web Lock named for the account, with
 * the token stored last. Outside a secure context there are no Web Locks:
 * it refreshes unlocked. `legacy` reads a token kept by an older page.
 */
export function tokenStore(username, legacy = () => null) {
  const name = username.toLowerCase();
  return {
    withLock: (fn) => (navigator.locks ? navigator.locks.request(`sealpost-refresh:${name}`, fn) : fn()),
    load: async () => (await get(tokensKey(name)))?.refreshToken ?? legacy(),
    save: (tokens) => put(tokensKey(name), tokens),
  };
}

/**
 * What the service worker needs to read the queue: the account signed in,
 * its device's keys and contacts, and its tokens; null when nobody is
 * signed in here (signed out, or never).
 */
export async function storedSession() {
  const username = await get('current');
  if (typeof username !== 'string') return null;
  const [account, tokens] = await Promise.all([get(accountKey(username)), get(tokensKey(username))]);
  if (!account?.keys || !tokens?.refreshToken) return null;
  return { username, account, tokens };
}
