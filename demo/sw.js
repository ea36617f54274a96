// The demo's service worker: it turns the server's wake-ups (Web Push,
// content-free) into notifications while no page of the demo is open.
//
// On a push it resumes the session the page stored in IndexedDB
// (store.js: a worker has no localStorage), on the kept access token when
// it has a minute left, else by a refresh in the same Web Lock as the
// tabs; reads the queue over REST (`GET /v1/messages`), opens each message
// with the device's key, and shows one notification per message with the
// sender's name and text (the latest MAX_SHOWN, and one summing up the
// rest). When it cannot (nobody signed in, the session ended, the server
// unreachable, a body that does not open, an empty queue) it shows "New
// message": a push must always show a notification (`userVisibleOnly`),
// or the browser shows its own and may stop delivering.
//
// It never acks: the page acks what it shows when it is opened, so a
// message is not lost if the user dismisses the notification. A later
// wake-up shows the still-unread ones again; each notification's tag is
// its message id, so one already shown is replaced, not doubled.
//
// A module worker (`type: 'module'`): the client library and libsodium
// are ES modules, as in the page.

import sodium from './vendor/libsodium-wrappers.mjs';
import { SealpostClient } from './client/index.js';
import { storedSession, tokenStore } from './store.js';

/** Messages shown one by one per push; past this, one more notification counts the rest. */
const MAX_SHOWN = 4;
/** The page that opens a chat. */
const PAGE = new URL('./', self.location.href).href;

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('push', (event) => {
  event.waitUntil(onPush());
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil(openChat(event.notification.data?.peer ?? null));
});

async function onPush() {
  let shown = 0;
  try {
    const messages = await readQueue();
    const latest = messages.slice(-MAX_SHOWN);
    for (const m of latest) {
      await self.registration.showNotification(m.title, { body: m.text, tag: m.id, data: { peer: m.peer } });
      shown++;
    }
    const more = messages.length - latest.length;
    if (more > 0) {
      await self.registration.showNotification(`${more} more new message${more === 1 ? '' : 's'}`, { tag: 'sealpost-more', data: { peer: null } });
    }
  } catch {
    // Shown below: whatever went wrong, a notification is due.
  }
  if (shown === 0) {
    await self.registration.showNotification('New message', { body: 'Open the sealpost demo to read it.', tag: 'sealpost-new', data: { peer: null } });
  }
}

/**
 * The queue, opened: [{id, title, text, peer}] oldest first; [] when
 * nothing in it could be read. Throws when there is no session to read
 * it with.
 */
async function readQueue() {
  const session = await storedSession();
  if (!session) throw new Error('nobody is signed in');
  const { username, account, tokens } = session;
  await sodium.ready;
  const client = await SealpostClient.resume({
    baseUrl: self.location.origin,
    sodium,
    keys: account.keys,
    tokens,
    tokenStore: tokenStore(username),
  });
  const opened = [];
  try {
    client.on('message', (m) => opened.push(m));
    await client.pollOnce();
  } finally {
    // Acks nothing the user has not seen (the inbox acks only bodies that
    // can never be read, as the protocol asks); stops the refresh timer.
    await client.close();
  }
  const names = new Map((account.contacts ?? []).map((c) => [c.id, c.username]));
  const nameOf = (id) => names.get(id) ?? client.directory.cached(id)?.username ?? 'someone';
  return opened.map((m) => {
    // A copy of what you sent from another device names the peer in `to`.
    const mine = m.from === client.userId;
    // A group message opens the group's chat (`group:<id>`: app.js tells it from a user's), titled by the group.
    if (m.group) return { id: m.id, title: `${mine ? 'You' : nameOf(m.from)} in ${m.group.name}`, text: m.text, peer: `group:${m.group.id}` };
    const peer = mine ? m.to : m.from;
    return { id: m.id, title: mine ? `You to ${nameOf(peer)}` : nameOf(m.from), text: m.text, peer };
  });
}

/** Focuses the demo's page (opening the chat with `peer`), or opens one. */
async function openChat(peer) {
  const windows = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
  const page = windows.find((w) => w.url.startsWith(PAGE));
  if (page) {
    if (peer) page.postMessage({ type: 'open-chat', peer });
    await page.focus();
    return;
  }
  await self.clients.openWindow(peer ? `${PAGE}#chat=${encodeURIComponent(peer)}` : PAGE);
}
