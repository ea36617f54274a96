// The sealpost demo page: a chat on the JavaScript client (clients/js,
// served under /demo/client/). Everything is sealed and opened here, in the
// browser; the server relays ciphertext. What this page keeps, it keeps in
// this browser's localStorage: each account's device id, device keys and
// latest refresh token, and its contacts. No inline script or style: the
// page's CSP forbids them.

import sodium from './vendor/libsodium-wrappers.mjs';
import { SealpostClient } from './client/index.js';

const $ = (id) => document.getElementById(id);
const STORE = 'sealpost-demo:';

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
}

let client = null;
let me = null;                 // { id, username }
const contacts = new Map();    // user id -> { id, username, unread }
const chats = new Map();       // user id -> [{ mine, text, ts, id, clientId, state }]
let current = null;            // the open chat's user id
// Ids of your messages some device of the recipient acknowledged. A
// receipt can come before `send` resolves (it waits for the sync copy to
// your other devices too), when the entry does not know its id yet.
const receipted = new Set();

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
  const options = { baseUrl: location.origin, sodium, username, password };
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
    refreshToken: c.tokens().refreshToken,
    contacts: known?.contacts ?? [],
  });
  return c;
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

  c.on('tokens', (t) => {
    const record = saved(me.username);
    if (record) save(me.username, { ...record, refreshToken: t.refreshToken });
  });
  c.on('state', (s) => setStatus(s.state, describe(s)));
  c.on('message', onMessage);
  c.on('receipt', onReceipt);
  c.on('undecryptable', (u) => append(u.from, { mine: false, text: `(a message that could not be read: ${u.reason})`, ts: Date.now(), id: u.id }));
  c.on('devicesChanged', () => refreshDevices());
  c.on('loggedOut', () => { setStatus('closed', 'signed out: sign in again'); });
  setStatus('connecting', 'connecting');
  await c.connect();
  await refreshDevices();
}

function describe(s) {
  switch (s.state) {
    case 'open': return `${me.username} · device ${client.deviceId} · receiving the backlog`;
    case 'drained': return `${me.username} · device ${client.deviceId} · live`;
    case 'reconnecting': return `reconnecting in ${Math.round((s.delayMs ?? 0) / 100) / 10} s`;
    case 'closed': return `disconnected${s.code ? ` (${s.code})` : ''}`;
    case 'paused': return `connected elsewhere${s.code ? ` (${s.code})` : ''}`;
    default: return s.state;
  }
}

async function refreshDevices() {
  const list = $('devices');
  try {
    const { devices } = await client.request('GET', '/v1/devices');
    list.replaceChildren(...devices.map((d) => {
      const li = document.createElement('li');
      li.textContent = `${d.device_id}: ${d.name ?? 'unnamed'}${d.current ? ' (this browser)' : ''}`;
      li.classList.toggle('current', d.current);
      return li;
    }));
  } catch (err) {
    list.replaceChildren(Object.assign(document.createElement('li'), { textContent: `could not list: ${err.message}` }));
  }
}

// ---- contacts and chats ----------------------------------------------------

function addContact({ id, username }) {
  if (id === me.id) return;
  if (!contacts.has(id)) {
    contacts.set(id, { id, username, unread: 0 });
    const record = saved(me.username);
    if (record && !record.contacts.some((c) => c.id === id)) {
      save(me.username, { ...record, contacts: [...record.contacts, { id, username }] });
    }
  } else if (username) {
    contacts.get(id).username = username;
  }
  renderContacts();
}

function nameOf(id) {
  // The protocol has no lookup from a user id to a name: a sender you
  // have not added shows by the start of its id until you add it.
  return contacts.get(id)?.username ?? `${id.slice(0, 8)}…`;
}

function renderContacts() {
  $('contacts').replaceChildren(...[...contacts.values()].map((c) => {
    const li = document.createElement('li');
    li.dataset.user = c.username ?? c.id;
    li.classList.toggle('active', c.id === current);
    li.append(document.createTextNode(nameOf(c.id)));
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
  const contact = contacts.get(id);
  if (contact) contact.unread = 0;
  $('chat-title').textContent = `Chat with ${nameOf(id)}`;
  $('text').disabled = false;
  $('send').disabled = false;
  $('text').focus();
  renderContacts();
  renderChat();
}

function append(peer, entry) {
  if (!contacts.has(peer)) addContact({ id: peer, username: null });
  const list = chats.get(peer) ?? [];
  list.push(entry);
  chats.set(peer, list);
  if (peer === current) renderChat();
  else if (!entry.mine) {
    contacts.get(peer).unread += 1;
    renderContacts();
  }
}

function renderChat() {
  const list = chats.get(current) ?? [];
  $('messages').replaceChildren(...list.map((m) => {
    const li = document.createElement('li');
    li.classList.toggle('mine', m.mine);
    li.dataset.clientId = m.clientId ?? '';
    li.append(document.createTextNode(m.text));
    const meta = document.createElement('span');
    meta.className = 'meta';
    meta.textContent = new Date(m.ts).toLocaleTimeString();
    if (m.mine) {
      const tick = document.createElement('span');
      tick.className = `tick ${m.state}`;
      tick.dataset.state = m.state;
      tick.textContent = { sending: '…', sent: '✓', delivered: '✓✓', failed: '✗' }[m.state];
      tick.title = { sending: 'sending', sent: 'stored by the server', delivered: 'delivered to a device of the recipient', failed: 'not sent' }[m.state];
      meta.append(tick);
    }
    li.append(meta);
    return li;
  }));
  $('messages').lastElementChild?.scrollIntoView({ block: 'end' });
}

function showWire(what, envelopes) {
  $('wire-meta').textContent = what;
  $('ciphertext').textContent = envelopes.length
    ? envelopes.map((e) => `device ${e.deviceId}:\n${e.body}`).join('\n\n')
    : '(no envelope)';
}

// ---- the wire --------------------------------------------------------------

function onMessage(m) {
  // A copy of what you sent from another of your devices: file it under
  // the peer, as yours.
  const mine = m.from === me.id;
  const peer = mine ? m.to : m.from;
  if (peer) append(peer, { mine, text: m.text, ts: m.ts, id: m.id, clientId: m.clientId, state: 'sent' });
  if (m.body) showWire(`received from ${nameOf(m.from)}, device ${m.fromDevice}, message ${m.id}`, [{ deviceId: client.deviceId, body: m.body }]);
  m.ack().catch(() => {});
}

function onReceipt(r) {
  const entry = (chats.get(r.to) ?? []).find((e) => e.mine && e.id === r.id);
  if (!entry) {
    // Not known yet (see `receipted`); `send` picks it up.
    receipted.add(r.id);
    return;
  }
  if (entry.state !== 'delivered') {
    entry.state = 'delivered';
    if (r.to === current) renderChat();
  }
}

async function send(text) {
  const peer = current;
  const entry = { mine: true, text, ts: Date.now(), id: null, clientId: null, state: 'sending' };
  append(peer, entry);
  try {
    const result = await client.send(peer, text);
    entry.id = result.id;
    entry.clientId = result.clientId;
    entry.state = receipted.delete(result.id) ? 'delivered' : 'sent';
    if (result.envelopes) showWire(`sent to ${nameOf(peer)}, message ${result.id}`, result.envelopes);
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

$('compose').addEventListener('submit', (event) => {
  event.preventDefault();
  const text = $('text').value;
  if (!text.trim() || !current) return;
  $('text').value = '';
  send(text);
});

$('signout').addEventListener('click', () => {
  client?.disconnect();
  location.reload();
});

await sodium.ready;
