// Push targets against real servers: one with Web Push and APNs on (not
// FCM) that lets the host SEALPOST_TEST_PUSH_HOST through its SSRF guard
// (SEALPOST_TEST_URL_PUSH), and one with no push at all
// (SEALPOST_TEST_URL). A browser's subscription goes as it is; what the
// server refuses comes back with its code and field; the devices' list
// shows each one's kind.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { serverUrl, newAccount, closeAll } from './helpers.js';

const url = serverUrl('SEALPOST_TEST_URL');
const pushUrl = serverUrl('SEALPOST_TEST_URL_PUSH');
const host = process.env.SEALPOST_TEST_PUSH_HOST ?? 'push.test';
const T = { timeout: 60_000 };

/** A browser's PushSubscription, as far as the client reads it (RFC 8291's example key). */
function subscription(n) {
  return {
    endpoint: `https://${host}/sub/${n}`,
    options: { userVisibleOnly: true },
    toJSON() {
      return {
        endpoint: this.endpoint,
        expirationTime: null,
        keys: { p256dh: 'BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4', auth: 'BTBZMqHH6r4Tts7J_aSIgg' },
      };
    },
  };
}

const ownPush = async (client) => (await client.devices()).find((d) => d.current).push;

if (pushUrl) {
  test('a subscription is set, listed, replaced, refused where it should be, and deleted', T, async () => {
    const [alice] = await newAccount(pushUrl, 'pusha', 1);
    const key = await alice.vapidPublicKey();
    assert.match(key, /^[A-Za-z0-9_-]{87}$/, 'a 65-byte point, base64url');
    assert.equal(await ownPush(alice), null);

    const set = await alice.setPushTarget(subscription(1));
    assert.equal(set.kind, 'webpush');
    assert.ok(!Number.isNaN(Date.parse(set.updatedAt)), set.updatedAt);
    assert.equal((await ownPush(alice)).kind, 'webpush');
    assert.deepEqual(await alice.setPushTarget(subscription(1).toJSON()).then((r) => r.kind), 'webpush', 'idempotent, from the JSON too');
    assert.equal((await alice.setPushTarget({ kind: 'apns', token: 'ab'.repeat(32), topic: 'com.example.app', environment: 'sandbox' })).kind, 'apns');

    await assert.rejects(alice.setPushTarget({ kind: 'fcm', token: 't' }), (e) => e.code === 'push_unavailable' && e.field === 'kind');
    await assert.rejects(alice.setPushTarget({ ...subscription(2).toJSON(), endpoint: 'http://10.0.0.1/sub' }), (e) => e.code === 'invalid' && e.field === 'endpoint');
    assert.equal((await ownPush(alice)).kind, 'apns', 'kept');

    await alice.deletePushTarget();
    assert.equal(await ownPush(alice), null);
    await alice.deletePushTarget();
    await closeAll(alice);
  });
}

if (url) {
  test('a server without push: no VAPID key, and a target is push_unavailable', T, async () => {
    const [bob] = await newAccount(url, 'pushb', 1);
    assert.equal(await bob.vapidPublicKey(), null);
    await assert.rejects(bob.setPushTarget(subscription(1)), (e) => e.code === 'push_unavailable');
    assert.equal(await ownPush(bob), null);
    await closeAll(bob);
  });
}
