// Compiled (not run) by `npm run check:types`: the declarations in
// index.d.ts must describe how the README uses the library.
declare const WebSocket: unknown;
declare const console: { log(...args: unknown[]): void };
import { SealpostClient, SealpostError, pushTargetBody, type Message, type StateEvent, type TokenStore, type Tokens, type PushKind, type WebPushSubscriptionJSON, type Group } from 'sealpost-client';

async function example(): Promise<void> {
  const client = await SealpostClient.register({ baseUrl: 'http://127.0.0.1:8080', username: 'alice', password: 'correct horse', WebSocket });
  const keys: { publicKey: string; secretKey: string } = client.exportKeys();
  const again = await SealpostClient.login({ baseUrl: 'http://x', username: 'alice', password: 'p', deviceId: client.deviceId, keys });
  again.on('state', (s: StateEvent) => console.log(s.state, s.code));
  again.on('tokens', (t) => console.log(t.refreshToken.length));
  again.on('loggedOut', (e: SealpostError) => console.log(e.code === 'unauthorized'));
  await again.connect({ exclusive: true });
  await again.waitForDrained();
  const r = await again.send('5b0c52f4-9d4e-4a8e-9a56-3f0a2b7d1c11', 'hi');
  console.log(r.id, r.clientId, r.sync?.id);
  const group: Group = again.createGroup('hikers', ['5b0c52f4-9d4e-4a8e-9a56-3f0a2b7d1c11', 'u2']);
  const g = await again.sendGroup(group, 'hi all', { urgent: false });
  console.log(g.id, g.clientId, g.group.members.length, g.recipients);
  const e = await again.sendEphemeral('u', { type: 'typing' });
  console.log(e.delivered);
  for await (const m of again.messages()) {
    const msg: Message = m;
    console.log(msg.text, msg.group?.id ?? msg.to ?? msg.from, msg.fromDevice, msg.group?.name, msg.group?.members);
    await msg.ack();
  }
  try {
    await again.send('u', 'x');
  } catch (err) {
    if (err instanceof SealpostError && err.code === 'devices_changed') console.log(err.missing, err.extra, err.retryAfter, err.recipients?.[0]?.to, err.unknown);
  }
  await again.close();
}
void example;

// Two tabs of one device: refreshes take turns in a lock, with the latest stored token.
declare const navigator: { locks: { request<T>(name: string, fn: () => Promise<T>): Promise<T> } };
declare const localStorage: { getItem(k: string): string | null; setItem(k: string, v: string): void };
async function tabs(keys: { publicKey: string; secretKey: string }): Promise<void> {
  const tokenStore: TokenStore = {
    withLock: (fn) => navigator.locks.request('sealpost-refresh:alice', fn),
    load: () => localStorage.getItem('refresh:alice'),
    save: (t: Tokens) => localStorage.setItem('refresh:alice', t.refreshToken),
  };
  const tab = await SealpostClient.resume({ baseUrl: 'http://x', tokenStore, keys });
  const other = await SealpostClient.resume({ baseUrl: 'http://x', refreshToken: 'r', keys });
  console.log(tab.tokens().refreshToken, other.deviceId);
}
void tabs;

// Push targets (issue 26).
export async function pushUsage(client: SealpostClient, subscription: { toJSON(): WebPushSubscriptionJSON }) {
  const key: string | null = await client.vapidPublicKey();
  const set: { kind: PushKind; updatedAt: string } = await client.setPushTarget(subscription);
  await client.setPushTarget({ kind: 'apns', token: '0a1b', topic: 'com.example.app', environment: 'sandbox' });
  await client.setPushTarget({ kind: 'fcm', token: 't' });
  await client.deletePushTarget();
  client.on('pushDropped', ({ deviceId }) => void deviceId);
  await client.send('u', 'later', { urgent: false });
  const devices = await client.devices();
  const kinds = devices.map((d) => d.push?.kind ?? null);
  return { key, set, kinds, body: pushTargetBody({ kind: 'fcm', token: 't' }) };
}
