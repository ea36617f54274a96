// Two clients of one session, as two browser tabs of one account are: the
// second resumes from the refresh token the first kept, and from then on
// both refresh on their own timers. Against a server with short access
// tokens and no refresh grace (SEALPOST_TEST_URL_NO_GRACE: a spent refresh
// token is reuse at once), so a refresh with a token the other client
// already spent ends every session of the user, as it would 30 s later
// with the default grace. With a shared `tokenStore` both keep working
// across several refreshes each; without one (what every app did before
// it) both are signed out at the first refresh, which shows that the
// first test has the hazard to survive.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SealpostClient } from '../src/index.js';
import { serverUrl, clientOptions, uniqueName, eventually, closeAll, PASSWORD } from './helpers.js';

const url = serverUrl('SEALPOST_TEST_URL_NO_GRACE');
const T = { timeout: 120_000 };
/** Refreshes each client must come through: several turns each on one chain of tokens. */
const REFRESHES = 3;

/**
 * A token store shared in this process, as localStorage and a Web Lock are
 * shared by tabs: the lock is a promise chain, `fn`s run one at a time.
 * `saves` lists every refresh token saved, in order.
 */
function sharedStore() {
  let tail = Promise.resolve();
  let latest = null;
  let holders = 0;
  const store = {
    saves: [],
    /** Most `fn`s that ever ran at once (must stay 1). */
    maxHolders: 0,
    withLock(fn) {
      const run = tail.then(async () => {
        holders++;
        store.maxHolders = Math.max(store.maxHolders, holders);
        try {
          return await fn();
        } finally {
          holders--;
        }
      });
      tail = run.catch(() => {});
      return run;
    },
    load: () => latest,
    save(tokens) {
      latest = tokens.refreshToken;
      store.saves.push(tokens.refreshToken);
    },
  };
  return store;
}

/** A `fetch` that records the refresh token of every `POST /v1/token/refresh`, in order, in `presented`. */
function refreshRecorder(presented) {
  return (input, init) => {
    if (init?.method === 'POST' && new URL(String(input)).pathname === '/v1/token/refresh') {
      presented.push(JSON.parse(init.body).refresh_token);
    }
    return globalThis.fetch(input, init);
  };
}

/**
 * Tab A signs up; tab B opens later and resumes from the refresh token A
 * kept (with a store: the store's; without: the latest any tab's `tokens`
 * handler wrote, as the demo kept it). Both connect and call the API every
 * 250 ms. Returns the clients and what happened to each.
 */
async function twoTabs(store) {
  const presented = [];
  const extra = { fetch: refreshRecorder(presented), ...(store ? { tokenStore: store } : {}) };
  const username = uniqueName('tabs');
  const a = await SealpostClient.register({ ...clientOptions(url, extra), username, password: PASSWORD });
  let kept = a.tokens().refreshToken;
  const b = await SealpostClient.resume({ ...clientOptions(url, extra), refreshToken: kept, keys: a.exportKeys() });
  const tabs = [a, b].map((client, i) => {
    const tab = { name: 'AB'[i], client, refreshes: 0, authed: 0, loggedOut: [], errors: [], calls: 0, failed: [] };
    client.on('tokens', (t) => {
      tab.refreshes++;
      if (!store) kept = t.refreshToken;
    });
    client.on('authed', () => tab.authed++);
    client.on('loggedOut', (err) => tab.loggedOut.push(err));
    client.on('error', (err) => tab.errors.push(err));
    return tab;
  });
  await Promise.all([a.connect(), b.connect()]);
  let stop = false;
  const callers = tabs.map(async (tab) => {
    while (!stop && tab.client.sessionState === 'active') {
      try {
        const me = await tab.client.request('GET', '/v1/me');
        assert.equal(me.id, a.userId);
        tab.calls++;
      } catch (err) {
        tab.failed.push(err);
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  });
  return {
    tabs,
    presented,
    async stop() {
      stop = true;
      await Promise.all(callers);
      for (const tab of tabs) tab.session = tab.client.sessionState;
      await closeAll(a, b);
    },
  };
}

const describe = (tab) => JSON.stringify({
  tab: tab.name, refreshes: tab.refreshes, calls: tab.calls, session: tab.session,
  loggedOut: tab.loggedOut.map((e) => e.message), failed: tab.failed.map((e) => `${e.code}: ${e.message}`),
  errors: tab.errors.map((e) => `${e.code ?? e.name}: ${e.message}`),
});

if (url) {
  test('two tabs sharing a token store both stay signed in across several refreshes each', T, async () => {
    const store = sharedStore();
    const run = await twoTabs(store);
    const { tabs, presented } = run;
    const ttlMs = tabs[0].client.tokens().expiresAt - Date.now();
    assert.ok(ttlMs < 15_000, `SEALPOST_TEST_URL_NO_GRACE must run with a short SEALPOST_ACCESS_TOKEN_TTL (got ~${Math.round(ttlMs / 1000)}s)`);
    try {
      await eventually(
        () => tabs.every((t) => t.refreshes >= REFRESHES) || tabs.some((t) => t.client.sessionState !== 'active'),
        { ms: (REFRESHES + 2) * ttlMs, every: 100, what: `${REFRESHES} refreshes of each tab` },
      );
      // One more call each after the last refresh.
      const calls = tabs.map((t) => t.calls);
      await eventually(() => tabs.every((t, i) => t.calls > calls[i] || t.client.sessionState !== 'active'), { what: 'a call after the refreshes' });
    } finally {
      await run.stop();
    }
    for (const tab of tabs) {
      assert.equal(tab.session, 'active', describe(tab));
      assert.deepEqual(tab.loggedOut, [], describe(tab));
      assert.deepEqual(tab.failed, [], describe(tab));
      assert.deepEqual(tab.errors, [], describe(tab));
      assert.ok(tab.refreshes >= REFRESHES, describe(tab));
      assert.ok(tab.calls > 0, describe(tab));
      // Renewed in place on the live socket after each refresh.
      assert.ok(tab.authed >= REFRESHES, describe(tab));
    }
    // One chain, in turns: every refresh (B's resume first) presented the
    // token saved just before it, none twice, and the register's started it.
    assert.equal(store.maxHolders, 1, 'one refresh in the lock at a time');
    assert.ok(presented.length >= 1 + 2 * REFRESHES, `refreshes: ${presented.length}`);
    assert.equal(new Set(presented).size, presented.length, 'no refresh token presented twice');
    assert.deepEqual(presented, store.saves.slice(0, presented.length));
    assert.equal(store.saves.length, presented.length + 1);
  });

  test('two tabs without a token store sign each other out at the first refresh', T, async () => {
    const run = await twoTabs(null);
    const { tabs, presented } = run;
    const ttlMs = tabs[0].client.tokens().expiresAt - Date.now();
    try {
      await eventually(() => tabs.every((t) => t.loggedOut.length > 0), { ms: 3 * ttlMs, every: 100, what: 'both tabs signed out' });
    } finally {
      await run.stop();
    }
    for (const tab of tabs) {
      assert.equal(tab.session, 'loggedOut', describe(tab));
      assert.equal(tab.loggedOut[0].code, 'unauthorized', describe(tab));
    }
    // A refreshed with the token B's resume had spent: reuse.
    assert.equal(presented[1], presented[0], `refreshes presented: ${presented.length}`);
  });
}
