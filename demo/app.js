// The sealpost demo page: a chat on the JavaScript client (clients/js,
// served under /demo/client/). Everything is sealed and opened here, in the
// browser; the server relays ciphertext. What this page keeps, it keeps in
// this browser's localStorage (each account's device id, device keys,
// contacts and groups, and which account is signed in) and, for the service worker
// that shows notifications while the page is closed (sw.js), in IndexedDB
// (store.js): the same records mirrored, and the session's tokens, so that
// a reload resumes the session without the password. Every tab of an
// account, and the worker, is a client of one session: they refresh in
// turns (a Web Lock) with the latest stored token (see `tokenStore`). No
// inline script or style: the page's CSP forbids them.

import sodium from './vendor/libsodium-wrappers.mjs';
import { SealpostClient, MAX_TEXT_CHARS } from './client/index.js';
import * as shared from './store.js';

const $ = (id) => document.getElementById(id);
const STORE = 'sealpost-demo:';
/** The username of the account signed in in this browser, whose session a reload resumes. */
const CURRENT = `${STORE}current`;
/** A message for the sign-in form after a reload (the session ended). */
const FLASH = `${STORE}flash`;
/**
 * Reconnects and resends back off up to 5 s (the library's default is
 * 30 s, for many clients coming back at once): a demo, one person, should
 * see a server that came back within seconds.
 */
const BACKOFF = { baseMs: 250, capMs: 5_000 };
/** One `typing` per chat this often while typing; readers show it for 5 s after the last. */
const TYPING_EVERY_MS = 3_000;

/** What this browser keeps for one account. */
function saved(username) {
  try {
    return JSON.parse(localStorage.getItem(STORE + username.toLowerCase())) ?? null;
  } catch {
    return null;
  }
}
function save(username, record) {
  localStorage.setItem(STORE + username.toLowerCase(), JSON.stringify(record));
  // The service worker's copy (it cannot read localStorage): best effort,
  // a worker without it shows "New message".
  const { deviceId, keys, contacts } = record;
  shared.put(shared.accountKey(username), { username, deviceId, keys, contacts }).catch(() => {});
}
/** Updates the kept record of the signed-in account (if any). */
function update(change) {
  const record = me && saved(me.username);
  if (record) save(me.username, { ...record, ...change(record) });
}
/**
 * Where the tabs of one account, and the service worker, keep its latest
 * tokens and take turns to refresh them (store.js: IndexedDB, in a Web
 * Lock named for the account). The tokens have a key of their own, written
 * only there: the account's record is read, changed and written back by
 * any tab (contacts), which could put back a token already spent. Pages
 * before IndexedDB kept the refresh token in localStorage: read once, as
 * the fallback.
 */
function tokenStore(username) {
  const name = username.toLowerCase();
  return shared.tokenStore(name, () => localStorage.getItem(`${STORE}${name}:refresh`) ?? saved(name)?.refreshToken ?? null);
}
/** Marks `username` signed in in this browser, for reloads and for the service worker. */
async function markCurrent(username) {
  localStorage.setItem(CURRENT, username);
  await shared.put('current', username).catch(() => {});
}
/** Ends this browser's session locally: the tokens and the marker go; keys and contacts stay for the next sign-in. */
async function forgetSession(username) {
  const record = saved(username);
  if (record?.refreshToken) save(username, { ...record, refreshToken: null });
  localStorage.removeItem(`${STORE}${username.toLowerCase()}:refresh`);
  localStorage.removeItem(CURRENT);
  await Promise.all([shared.remove(shared.tokensKey(username)), shared.remove('current')]).catch(() => {});
}

let client = null;
let me = null;                 // { id, username }
const contacts = new Map();    // user id -> { id, username, unread }
// Group id -> { id, name, members, unread }: a group is only what its
// messages say (protocol.md, "Group messages"); the latest one's name and
// members are the group's.
const groups = new Map();
// Names of group members who are not contacts: user id -> username.
const names = new Map();
// Conversation id (a user id, or a group id) -> [{ mine, text, ts, id, clientId, state, author? }]
const chats = new Map();
let current = null;            // the open chat's id: a user's, or a group's
// Ids of your messages some device of the recipient acknowledged. A
// receipt can come before `send` resolves (it waits for the sync copy to
// your other devices too), when the entry does not know its id yet.
const receipted = new Set();
/** Whether this device has a push target, as the devices' list last said. */
let hasPushTarget = false;
/** user id -> when we last told them we are typing. */
const typingSent = new Map();

function setStatus(state, text) {
  const el = $('status');
  el.dataset.state = state;
  el.textContent = text;
}

function showError(id, err) {
  $(id).textContent = err ? (err.message || String(err)) : '';
}

// ---- signing in ------------------------------------------------------------

async function signIn(mode, username, password) {
  // The new session's refresh token goes to the store (the client saves it).
  const options = { baseUrl: location.origin, sodium, username, password, backoff: BACKOFF, tokenStore: tokenStore(username) };
  const known = saved(username);
  let c;
  if (mode === 'signup') {
    c = await SealpostClient.register(options);
  } else if (known) {
    c = await SealpostClient.login({ ...options, deviceId: known.deviceId, keys: known.keys });
  } else {
    // A browser this account has not used: it becomes a device of its own.
    c = await SealpostClient.addDevice({ ...options, name: browserName() });
  }
  save(c.username, {
    deviceId: c.deviceId,
    keys: c.exportKeys(),
    contacts: known?.contacts ?? [],
    groups: known?.groups ?? [],
  });
  await markCurrent(c.username);
  return c;
}

/**
 * Resumes the session this browser kept (a reload, another tab): the
 * refresh token stored for the signed-in account, no password. A server
 * that cannot be reached is waited for; a refused token ends the session.
 * @returns {Promise<SealpostClient | null>}
 */
async function resume() {
  const username = localStorage.getItem(CURRENT);
  const record = username && saved(username);
  const store = username && tokenStore(username);
  if (!record || !(await store.load())) return null;
  // The worker's copy, for a browser whose page kept it all in localStorage.
  save(username, record);
  await markCurrent(username);
  for (let attempt = 0; ; attempt++) {
    setStatus('connecting', attempt === 0 ? `resuming ${username}'s session` : `the server does not answer; trying again (${attempt})`);
    try {
      // In the store's lock, with the token stored last (another tab may
      // be refreshing it now); the new one is stored before the lock goes.
      return await SealpostClient.resume({ baseUrl: location.origin, sodium, tokenStore: store, keys: record.keys, backoff: BACKOFF });
    } catch (err) {
      if (!err.retryable) {
        await forgetSession(username);
        sessionStorage.setItem(FLASH, `Your session ended (${err.message}): sign in again.`);
        return null;
      }
      await new Promise((r) => setTimeout(r, Math.min(BACKOFF.capMs, BACKOFF.baseMs * 2 ** attempt)));
    }
  }
}

function browserName() {
  const ua = navigator.userAgent;
  const name = /Firefox/.test(ua) ? 'Firefox' : /Chrom/.test(ua) ? 'Chromium' : /Safari/.test(ua) ? 'Safari' : 'browser';
  return `${name} (demo)`;
}

async function start(c) {
  client = c;
  me = { id: c.userId, username: c.username };
  $('signin').classList.add('hidden');
  $('app').classList.remove('hidden');
  for (const contact of saved(me.username)?.contacts ?? []) addContact(contact);
  for (const group of saved(me.username)?.groups ?? []) addGroup(group);

  // New refresh tokens are stored by `tokenStore`, in its lock.
  c.on('state', (s) => setStatus(s.state, describe(s)));
  c.on('message', onMessage);
  c.on('receipt', onReceipt);
  c.on('typing', onTyping);
  c.on('undecryptable', (u) => append(u.from, { mine: false, text: `(a message that could not be read: ${u.reason})`, ts: Date.now(), id: u.id }));
  c.on('devicesChanged', (change) => {
    announce(change);
    refreshDevices();
  });
  c.on('loggedOut', async () => {
    // Signed out elsewhere, or this device was removed: nothing to resume.
    await forgetSession(me.username);
    sessionStorage.setItem(FLASH, 'Your session ended (signed out, or this device was removed): sign in again.');
    location.reload();
  });
  // The push service dropped this browser's subscription: a fresh one.
  c.on('pushDropped', () => enablePush({ renew: true }));
  setStatus('connecting', 'connecting');
  // The server's body limit, for the input's counter (the defaults until it answers).
  c.limits().then(updateCounter, () => {});
  await c.connect();
  await refreshDevices();
  // A notification's click names the chat to open (sw.js).
  const wanted = /^#chat=(.+)$/.exec(location.hash);
  if (wanted) {
    history.replaceState(null, '', location.pathname);
    openRequested(decodeURIComponent(wanted[1]));
  }
  enablePush();
}

/** A group a notification named before its message reached this page (the backlog still arriving): opened when it does. */
let awaitedGroup = null;

/** Opens the chat a notification named: a user id, or `group:<id>` (sw.js). */
function openRequested(peer) {
  const group = /^group:(.+)$/.exec(peer)?.[1];
  if (group !== undefined) {
    if (groups.has(group)) openChat(group);
    else awaitedGroup = group;
    return;
  }
  if (!contacts.has(peer)) addContact({ id: peer, username: null });
  openChat(peer);
}

// ---- wake-ups ----------------------------------------------------------------

function pushStatus(text, on = false) {
  const el = $('push-status');
  el.textContent = text;
  el.dataset.on = String(on);
}

/**
 * Registers the service worker that shows messages as notifications while
 * the page is closed, and, when the server sends Web Push (its VAPID key
 * answers) and the browser can subscribe, registers the subscription as
 * this device's push target. Every step may fail (no service workers, no
 * push service: Chromium without Google's, notifications refused): it is
 * said quietly, beside the devices, and the chat works as before.
 */
async function enablePush({ renew = false } = {}) {
  if (!('serviceWorker' in navigator)) return pushStatus('Notifications: this browser has no service workers.');
  let registration;
  try {
    // Beside the page: its scope is /demo/ without Service-Worker-Allowed.
    registration = await navigator.serviceWorker.register('sw.js', { type: 'module' });
  } catch (err) {
    return pushStatus(`Notifications: no service worker (${err.message}).`);
  }
  let key;
  try {
    key = await client.vapidPublicKey();
  } catch (err) {
    return pushStatus(`Notifications: the server's key could not be read (${err.message}).`);
  }
  if (!key) return pushStatus('Notifications: this server sends no wake-ups (Web Push is off).');
  if (!registration.pushManager) return pushStatus('Notifications: this browser has no Push API.');
  try {
    if (Notification.permission === 'default') await Notification.requestPermission();
    if (Notification.permission !== 'granted') return pushStatus('Notifications: not allowed in this browser.');
    let subscription = await registration.pushManager.getSubscription();
    // A subscription made for another server key (the server's changed), or dropped by its service.
    if (subscription && (renew || !sameKey(subscription.options?.applicationServerKey, key))) {
      await subscription.unsubscribe();
      subscription = null;
    }
    subscription ??= await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key });
    await client.setPushTarget(subscription);
    hasPushTarget = true;
    pushStatus('Notifications: on. New messages are shown while this page is closed.', true);
  } catch (err) {
    pushStatus(`Notifications: off (${err.message}).`);
  }
}

/** Whether a subscription's key (bytes) is the base64url `key`. */
function sameKey(bytes, key) {
  if (!bytes) return false;
  const b64 = btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
  return b64 === key.replace(/=+$/, '');
}

/** Stops this browser's wake-ups (at sign-out): the device's target goes, if it has one, and the subscription. */
async function disablePush() {
  const registration = await navigator.serviceWorker?.getRegistration().catch(() => null);
  const subscription = await registration?.pushManager?.getSubscription().catch(() => null);
  if (subscription || hasPushTarget) await client?.deletePushTarget().catch(() => {});
  await subscription?.unsubscribe().catch(() => {});
}

navigator.serviceWorker?.addEventListener('message', (event) => {
  if (event.data?.type === 'open-chat' && client && typeof event.data.peer === 'string') openRequested(event.data.peer);
});

function describe(s) {
  switch (s.state) {
    case 'open': return `${me.username} · device ${client.deviceId} · receiving the backlog`;
    case 'drained': return `${me.username} · device ${client.deviceId} · live`;
    case 'reconnecting': return `the server does not answer; reconnecting in ${Math.round((s.delayMs ?? 0) / 100) / 10} s`;
    case 'closed': return `disconnected${s.code ? ` (${s.code})` : ''}`;
    case 'paused': return `connected elsewhere${s.code ? ` (${s.code})` : ''}`;
    default: return s.state;
  }
}

async function refreshDevices() {
  const list = $('devices');
  try {
    const { devices } = await client.request('GET', '/v1/devices');
    hasPushTarget = devices.some((d) => d.current && d.push);
    list.replaceChildren(...devices.map((d) => {
      const li = document.createElement('li');
      li.textContent = `${d.device_id}: ${d.name ?? 'unnamed'}${d.current ? ' (this browser)' : ''}${d.push ? ` · woken by ${d.push.kind}` : ''}`;
      li.classList.toggle('current', d.current);
      return li;
    }));
  } catch (err) {
    list.replaceChildren(Object.assign(document.createElement('li'), { textContent: `could not list: ${err.message}` }));
  }
}

/**
 * Tells the user that a device of their account changed: someone with the
 * password can add a device, or sign in as one, and should not do it
 * unseen.
 */
function announce({ deviceId, reason, deviceIds, devices }) {
  const device = devices?.find((d) => d.device_id === deviceId);
  const named = deviceId === undefined ? '' : `device ${deviceId}${device?.name ? `, “${device.name}”` : ''}`;
  const text = {
    added: `A new device was added to your account: ${named}. If that was not you, remove it and change your password.`,
    login: `Someone signed in to your account as ${named} with your password.`,
    key: `The key of ${named} was changed.`,
    removed: `A device was removed from your account: ${named}.`,
  }[reason] ?? `Your account's devices changed: now ${deviceIds?.join(', ') ?? 'unknown'}.`;
  const notice = $('notice');
  notice.dataset.reason = reason ?? 'changed';
  $('notice-text').textContent = text;
  notice.classList.remove('hidden');
}

// ---- contacts and chats ----------------------------------------------------

/**
 * Adds a contact, or names one known unnamed, and keeps it. A sender first
 * seen unnamed is named from its device directory (which names the
 * account), and the name is kept with it.
 */
function addContact({ id, username }) {
  if (id === me.id) return;
  const known = contacts.get(id);
  if (!known) {
    contacts.set(id, { id, username: username ?? null, unread: 0 });
  } else if (username && known.username !== username) {
    known.username = username;
  } else {
    return;
  }
  update(() => ({ contacts: [...contacts.values()].map((c) => ({ id: c.id, username: c.username })) }));
  renderContacts();
  if (id === current) $('chat-title').textContent = titleOf(id);
  if (!username) learnName(id);
}

async function learnName(id) {
  try {
    const entry = await client.directory.get(id);
    if (entry.username) addContact({ id, username: entry.username });
  } catch {
    /* shown by its id until it is added by name */
  }
}

/**
 * Adds a group, or takes the name and members of a later message to it,
 * and keeps it. Members who are not contacts are named from their
 * directories, for the group's messages and title.
 */
function addGroup({ id, name, members }) {
  const known = groups.get(id);
  if (known && known.name === name && known.members.join() === members.join()) return;
  groups.set(id, { id, name, members: [...members], unread: known?.unread ?? 0 });
  update(() => ({ groups: [...groups.values()].map((g) => ({ id: g.id, name: g.name, members: g.members })) }));
  for (const member of members) {
    if (member !== me.id && !contacts.get(member)?.username && !names.has(member)) learnMemberName(member);
  }
  renderContacts();
  if (id === current) $('chat-title').textContent = titleOf(id);
}

async function learnMemberName(id) {
  try {
    const entry = await client.directory.get(id);
    if (!entry.username) return;
    names.set(id, entry.username);
    renderContacts();
    if (current !== null) {
      $('chat-title').textContent = titleOf(current);
      renderChat();
    }
  } catch {
    /* shown by the start of its id */
  }
}

function nameOf(id) {
  if (id === me?.id) return me.username;
  const group = groups.get(id);
  if (group) return group.name;
  // A server older than the directory's `username` names nobody: a sender
  // you have not added shows by the start of its id until you add it.
  return contacts.get(id)?.username ?? names.get(id) ?? `${id.slice(0, 8)}…`;
}

function titleOf(id) {
  const group = groups.get(id);
  if (!group) return `Chat with ${nameOf(id)}`;
  return `${group.name}: ${group.members.map(nameOf).join(', ')}`;
}

function renderContacts() {
  const groupItems = [...groups.values()].map((g) => {
    const li = document.createElement('li');
    li.dataset.group = g.name;
    li.classList.add('group');
    li.classList.toggle('active', g.id === current);
    li.append(document.createTextNode(`# ${g.name}`));
    if (g.unread) {
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.textContent = String(g.unread);
      li.append(badge);
    }
    li.addEventListener('click', () => openChat(g.id));
    return li;
  });
  $('contacts').replaceChildren(...groupItems, ...[...contacts.values()].map((c) => {
    const li = document.createElement('li');
    li.dataset.user = c.username ?? c.id;
    li.classList.toggle('active', c.id === current);
    li.append(document.createTextNode(nameOf(c.id)));
    if (client.typing.isTyping(c.id)) {
      const typing = document.createElement('span');
      typing.className = 'typing';
      typing.textContent = 'typing…';
      li.append(typing);
    }
    if (c.unread) {
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.textContent = String(c.unread);
      li.append(badge);
    }
    li.addEventListener('click', () => openChat(c.id));
    return li;
  }));
}

function openChat(id) {
  current = id;
  const contact = contacts.get(id) ?? groups.get(id);
  if (contact) contact.unread = 0;
  $('chat-title').textContent = titleOf(id);
  $('text').disabled = false;
  $('text').focus();
  updateCounter();
  renderContacts();
  renderChat();
  renderTyping();
}

/** Adds an entry to a conversation: a user's (added as a contact when new) or a group's (added before). */
function append(peer, entry) {
  if (!contacts.has(peer) && !groups.has(peer)) addContact({ id: peer, username: null });
  const list = chats.get(peer) ?? [];
  list.push(entry);
  chats.set(peer, list);
  if (peer === current) renderChat();
  else if (!entry.mine) {
    (contacts.get(peer) ?? groups.get(peer)).unread += 1;
    renderContacts();
  }
}

const TICKS = {
  sending: ['…', 'sending'],
  pending: ['🕓', 'waiting for the server: it goes out when the server is back'],
  sent: ['✓', 'stored by the server'],
  delivered: ['✓✓', 'delivered to a device of the recipient'],
  failed: ['✗', 'not sent'],
};

function renderChat() {
  const list = chats.get(current) ?? [];
  $('messages').replaceChildren(...list.map((m) => {
    const li = document.createElement('li');
    li.classList.toggle('mine', m.mine);
    li.dataset.clientId = m.clientId ?? '';
    if (m.author && !m.mine) {
      // In a group, who said it.
      const author = document.createElement('span');
      author.className = 'author';
      author.textContent = nameOf(m.author);
      li.append(author);
    }
    li.append(document.createTextNode(m.text));
    const meta = document.createElement('span');
    meta.className = 'meta';
    meta.textContent = new Date(m.ts).toLocaleTimeString();
    if (m.mine) {
      const tick = document.createElement('span');
      tick.className = `tick ${m.state}`;
      tick.dataset.state = m.state;
      [tick.textContent, tick.title] = TICKS[m.state];
      meta.append(tick);
    }
    li.append(meta);
    return li;
  }));
  $('messages').lastElementChild?.scrollIntoView({ block: 'end' });
}

function renderTyping() {
  const el = $('typing');
  const on = current !== null && !groups.has(current) && client.typing.isTyping(current);
  el.textContent = on ? `${nameOf(current)} is typing…` : '';
  el.dataset.typing = String(on);
}

/** A group message: one shared body for every member (each device also got its own sealed key). */
function showShared(what, body) {
  $('wire-meta').textContent = what;
  $('ciphertext').textContent = `shared body, for every device (each also gets its key, sealed to it):\n${body}`;
}

function showWire(what, envelopes) {
  $('wire-meta').textContent = what;
  $('ciphertext').textContent = envelopes.length
    ? envelopes.map((e) => `device ${e.deviceId}:\n${e.body}`).join('\n\n')
    : '(no envelope)';
}

// ---- composing -------------------------------------------------------------

/**
 * The input's counter: characters against the text limit, and, for text
 * whose sealed body would be over the server's limit (emoji are four bytes
 * each), why it cannot be sent. Send is enabled only for what would go.
 */
function updateCounter() {
  const text = $('text').value;
  const counter = $('counter');
  if (!client) return;
  const m = client.measureText(text);
  counter.dataset.over = String(!m.fits);
  if (m.chars > m.maxChars) counter.textContent = `${m.chars.toLocaleString()} / ${m.maxChars.toLocaleString()} characters: too long`;
  else if (!m.fits) counter.textContent = `too long: ${m.sealedBytes.toLocaleString()} bytes sealed, the server takes ${m.maxBodyBytes.toLocaleString()}`;
  else counter.textContent = `${m.chars.toLocaleString()} / ${m.maxChars.toLocaleString()}`;
  $('send').disabled = current === null || !m.fits || !text.trim();
}

/** Tells the open chat's peer that you are typing, at most once every TYPING_EVERY_MS. */
function typed() {
  updateCounter();
  const peer = current;
  // Typing goes to one person; a group's members are not told.
  if (!peer || groups.has(peer) || !$('text').value.trim() || client.connectionState !== 'drained') return;
  const now = Date.now();
  if (now - (typingSent.get(peer) ?? 0) < TYPING_EVERY_MS) return;
  typingSent.set(peer, now);
  client.sendTyping(peer).catch(() => { /* best effort: it is only an indicator */ });
}

// ---- the wire --------------------------------------------------------------

function onMessage(m) {
  // A copy of what you sent from another of your devices: file it under
  // the peer (or the group), as yours.
  const mine = m.from === me.id;
  if (m.group) {
    addGroup(m.group);
    append(m.group.id, { mine, author: m.from, text: m.text, ts: m.ts, id: m.id, clientId: m.clientId, state: 'sent' });
    if (awaitedGroup === m.group.id) {
      awaitedGroup = null;
      openChat(m.group.id);
    }
  } else {
    const peer = mine ? m.to : m.from;
    if (peer) append(peer, { mine, text: m.text, ts: m.ts, id: m.id, clientId: m.clientId, state: 'sent' });
  }
  if (m.body && m.group) showShared(`received in ${m.group.name} from ${nameOf(m.from)}, device ${m.fromDevice}, message ${m.id}`, m.body);
  else if (m.body) showWire(`received from ${nameOf(m.from)}, device ${m.fromDevice}, message ${m.id}`, [{ deviceId: client.deviceId, body: m.body }]);
  m.ack().catch(() => {});
}

function onReceipt(r) {
  // A group message's receipt names the member, not the group: look in every group too.
  const where = [r.to, ...groups.keys()];
  const peer = where.find((id) => (chats.get(id) ?? []).some((e) => e.mine && e.id === r.id));
  const entry = peer === undefined ? undefined : chats.get(peer).find((e) => e.mine && e.id === r.id);
  if (!entry) {
    // Not known yet (see `receipted`); `send` picks it up.
    receipted.add(r.id);
    return;
  }
  if (entry.state !== 'delivered') {
    entry.state = 'delivered';
    if (peer === current) renderChat();
  }
}

function onTyping(t) {
  if (!contacts.has(t.from)) return;
  renderContacts();
  if (t.from === current) renderTyping();
}

async function send(text) {
  const peer = current;
  const entry = { mine: true, text, ts: Date.now(), id: null, clientId: null, state: 'sending' };
  append(peer, entry);
  // A text ends our typing at the peer's; the next keystroke may say it again.
  typingSent.delete(peer);
  try {
    // While the server is down the message waits, shown pending, and goes
    // out once it is back: the same ciphertext under the same client_id
    // on every attempt, so it is stored once however many it takes.
    const opts = {
      retries: Infinity,
      onRetry: () => {
        if (entry.state === 'pending') return;
        entry.state = 'pending';
        if (peer === current) renderChat();
      },
    };
    const group = groups.get(peer);
    const result = group ? await client.sendGroup(group, text, opts) : await client.send(peer, text, opts);
    entry.id = result.id;
    entry.clientId = result.clientId;
    entry.state = receipted.delete(result.id) ? 'delivered' : 'sent';
    if (result.envelopes) showWire(`sent to ${nameOf(peer)}, message ${result.id}`, result.envelopes);
    if (result.shared) showShared(`sent to the group ${group.name} (${result.recipients.length} accounts), message ${result.id}`, result.shared);
  } catch (err) {
    entry.state = 'failed';
    entry.text = `${text} (${err.message})`;
  }
  if (peer === current) renderChat();
}

// ---- the page --------------------------------------------------------------

$('signin-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const mode = event.submitter?.value ?? 'login';
  showError('signin-error', null);
  for (const b of document.querySelectorAll('#signin button')) b.disabled = true;
  try {
    await start(await signIn(mode, $('username').value.trim(), $('password').value));
  } catch (err) {
    showError('signin-error', err);
    setStatus('closed', 'not signed in');
  } finally {
    for (const b of document.querySelectorAll('#signin button')) b.disabled = false;
    $('password').value = '';
  }
});

$('find-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  showError('find-error', null);
  const name = $('find').value.trim();
  try {
    const user = await client.request('GET', `/v1/users/${encodeURIComponent(name)}`);
    addContact({ id: user.id, username: user.username });
    $('find').value = '';
    openChat(user.id);
  } catch (err) {
    showError('find-error', err.code === 'not_found' ? `no user named ${name}` : err);
  }
});

$('group-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  showError('group-error', null);
  const name = $('group-name').value.trim();
  const usernames = [...new Set($('group-members').value.split(/[\s,]+/).filter(Boolean))];
  $('group-create').disabled = true;
  try {
    if (usernames.length === 0) throw new Error('name at least one member');
    // Each member by username, through the directory; nothing is sent
    // until the group's first message, which tells them.
    const users = [];
    for (const username of usernames) {
      try {
        users.push(await client.request('GET', `/v1/users/${encodeURIComponent(username)}`));
      } catch (err) {
        throw err.code === 'not_found' ? new Error(`no user named ${username}`) : err;
      }
    }
    for (const user of users) if (user.id !== me.id) names.set(user.id, user.username);
    const group = client.createGroup(name, users.map((u) => u.id));
    addGroup(group);
    $('group-name').value = '';
    $('group-members').value = '';
    openChat(group.id);
  } catch (err) {
    showError('group-error', err);
  } finally {
    $('group-create').disabled = false;
  }
});

$('text').maxLength = MAX_TEXT_CHARS;
$('text').addEventListener('input', typed);

$('compose').addEventListener('submit', (event) => {
  event.preventDefault();
  const text = $('text').value;
  if (!text.trim() || !current || !client.measureText(text).fits) return;
  $('text').value = '';
  updateCounter();
  send(text);
});

$('notice-close').addEventListener('click', () => $('notice').classList.add('hidden'));

$('signout').addEventListener('click', async () => {
  $('signout').disabled = true;
  try {
    // No more wake-ups for a browser nobody is signed in on; then the
    // session ends on the server (POST /v1/logout): its refresh token is
    // void, not merely forgotten here.
    await disablePush();
    await client?.logout();
  } catch {
    /* the server may be down: the session is forgotten here all the same */
  }
  await forgetSession(me.username);
  location.reload();
});

await sodium.ready;
const flash = sessionStorage.getItem(FLASH);
sessionStorage.removeItem(FLASH);
const resumed = await resume();
if (resumed) {
  try {
    await start(resumed);
  } catch (err) {
    setStatus('closed', `not connected: ${err.message}`);
  }
} else {
  $('signin').classList.remove('hidden');
  setStatus('idle', 'not signed in');
  if (flash) showError('signin-error', flash);
}
