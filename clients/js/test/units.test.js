// Unit tests of the parts that need no server: backoff, the bounded map,
// error construction.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Backoff, SealpostError } from '../src/index.js';
import { BoundedMap } from '../src/bounded.js';
import { errorFromFrame, errorFromResponse } from '../src/errors.js';

test('full-jitter backoff stays within [0, min(cap, base*2^n))', () => {
  const b = new Backoff({ baseMs: 250, capMs: 30_000, random: () => 0.999999 });
  const seen = Array.from({ length: 10 }, () => b.next());
  assert.deepEqual(seen.slice(0, 4), [249, 499, 999, 1999]);
  assert.equal(Math.max(...seen), 29_999);
  const zero = new Backoff({ random: () => 0 });
  assert.equal(zero.next(), 0);
  b.reset();
  assert.equal(b.next(), 249);
});

test('bounded map forgets the least recently used first', () => {
  const m = new BoundedMap(2);
  m.set('a', 1).set('b', 2);
  m.get('a');
  m.set('c', 3);
  assert.equal(m.has('b'), false);
  assert.equal(m.get('a'), 1);
  assert.equal(m.get('c'), 3);
  assert.equal(m.size, 2);
});

test('error frames become typed errors; rate_limited carries the wait', () => {
  const e = errorFromFrame({ code: 'devices_changed', message: 'x', missing: [2], extra: [] });
  assert.ok(e instanceof SealpostError);
  assert.equal(e.code, 'devices_changed');
  assert.deepEqual(e.missing, [2]);
  assert.deepEqual(e.extra, []);
  assert.equal(errorFromFrame({ code: 'rate_limited', message: 'rate limit exceeded; retry in 250 ms' }).retryAfter, 0.25);
});

test('REST error replies become typed errors with status, field, Retry-After, request id', async () => {
  const r = new Response(JSON.stringify({ error: { code: 'rate_limited', message: 'slow down' } }), {
    status: 429, headers: { 'retry-after': '3', 'x-request-id': 'req-1' },
  });
  const e = await errorFromResponse(r);
  assert.equal(e.code, 'rate_limited');
  assert.equal(e.status, 429);
  assert.equal(e.retryAfter, 3);
  assert.equal(e.requestId, 'req-1');
  const proxy = await errorFromResponse(new Response('<html>', { status: 502 }));
  assert.equal(proxy.code, 'unavailable');
  assert.equal(proxy.retryable, true);
});

test('index.d.ts declares exactly the runtime exports', async () => {
  const { readFile } = await import('node:fs/promises');
  const dts = await readFile(new URL('../index.d.ts', import.meta.url), 'utf8');
  const declared = [...dts.matchAll(/^export (?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort();
  const runtime = Object.keys(await import('../src/index.js')).sort();
  assert.deepEqual(declared, runtime);
});
