/**
 * The client in a real browser, on another origin than the hub: Debian's Chromium (installed
 * by .ci/install-chromium) driven by playwright-core, a page served from this test's own
 * origin (test/browser/page.ts) calling the hub on another port whose CORS_ORIGINS is that
 * origin. Proves what only a browser enforces: the CORS preflight of a call carrying
 * `Authorization` and `Idempotency-Key`, and which response headers JavaScript may read; and
 * that a streamed invocation (API.md §5.1) reaches the page word by word, not all at the end —
 * nothing between the hub and the page's fetch body holds the stream back.
 * The screenshot lands in artifacts/browser/ (not committed).
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { access, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import { extname, join, normalize } from 'node:path';
import { after, before, test } from 'node:test';

import { type BrowserContext, chromium } from 'playwright-core';

import type { HubCheck } from './browser/page.js';
import { freePort, PACKAGE_DIR, type ServedHub, startHub } from './support/hub.js';
import { GRACE, STORY_DELAY_MS } from './support/story.js';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
const ARTIFACTS = join(PACKAGE_DIR, 'artifacts', 'browser');
const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.map': 'application/json',
};

let hub: ServedHub;
let pages: Server;
let pageOrigin: string;
let profile: string;
let browser: BrowserContext;

/** The dashboard's origin: the page and the compiled client (dist/); the hub is elsewhere. */
async function servePages(port: number): Promise<Server> {
  const server = createServer(async (req, res) => {
    const path = new URL(req.url ?? '/', 'http://page').pathname;
    const file = path === '/' ? 'test/browser/index.html' : normalize(path.slice(1));
    if (!(file.startsWith('dist/') || file === 'test/browser/index.html') || file.includes('..')) {
      return res.writeHead(404).end();
    }
    try {
      const body = await readFile(join(PACKAGE_DIR, file));
      res.writeHead(200, { 'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream' }).end(body);
    } catch {
      res.writeHead(404).end();
    }
  });
  server.listen(port, '127.0.0.1');
  await once(server, 'listening');
  return server;
}

before(async () => {
  await access(CHROMIUM).catch(() => {
    throw new Error(`no Chromium at ${CHROMIUM}: run .ci/install-chromium (as root)`);
  });
  const port = await freePort();
  pageOrigin = `http://127.0.0.1:${port}`;
  pages = await servePages(port);
  hub = await startHub({ corsOrigins: pageOrigin });
  profile = await mkdtemp(join(tmpdir(), 'joyhub-chromium-'));
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: FLAGS,
    viewport: { width: 1000, height: 900 },
  });
});

after(async () => {
  await browser?.close();
  if (profile) await rm(profile, { recursive: true, force: true });
  pages?.close();
  await hub?.stop();
});

interface Seen {
  method: string;
  url: string;
  requestHeaders: Record<string, string>;
  status?: number;
  responseHeaders?: Record<string, string>;
}

test('a page on another origin uses the client: preflight, readable headers, invocations, a live stream', async () => {
  const page = browser.pages()[0] ?? (await browser.newPage());
  const console: string[] = [];
  page.on('console', (message) => console.push(`${message.type()}: ${message.text()}`));

  // Chromium's own record of the network, preflights included (the page's fetch never sees them)
  const cdp = await browser.newCDPSession(page);
  await cdp.send('Network.enable');
  const seen = new Map<string, Seen>();
  cdp.on('Network.requestWillBeSent', (event) => {
    seen.set(event.requestId, {
      method: event.request.method,
      url: event.request.url,
      requestHeaders: lower(event.request.headers),
    });
  });
  cdp.on('Network.responseReceived', (event) => {
    const entry = seen.get(event.requestId);
    if (entry) Object.assign(entry, { status: event.response.status, responseHeaders: lower(event.response.headers) });
  });

  await page.goto(`${pageOrigin}/?hub=${encodeURIComponent(hub.baseUrl)}`);
  // watched from outside while the page runs: some words on screen, not all, the stream open
  const midStream = page.waitForFunction(
    (words) => {
      const shown = document.querySelectorAll('#stream li').length;
      if (shown >= 2 && shown < words) return { shown };
      if (window.hubCheck !== undefined || window.hubCheckError !== undefined) return { shown: null };
      return false;
    },
    GRACE.words.length,
    { polling: 10, timeout: 60_000 },
  );
  await page.waitForFunction(() => window.hubCheck !== undefined || window.hubCheckError !== undefined, null, {
    timeout: 60_000,
  });
  await mkdir(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: join(ARTIFACTS, 'dashboard.png'), fullPage: true });
  const error = await page.evaluate(() => window.hubCheckError);
  assert.equal(error, undefined, `the page failed:\n${error}\nconsole:\n${console.join('\n')}`);
  const check = (await page.evaluate(() => window.hubCheck)) as HubCheck;

  // the calls worked, and their typed results reached the page
  assert.equal(check.plan, 'free');
  assert.equal(check.toolName, 'Word Count');
  assert.deepEqual(check.invocation, { status: 'success', tokensUsed: check.invocation.tokensUsed, words: 7 });
  assert.ok(check.invocation.tokensUsed > 0);

  // response headers JavaScript may read only because the hub exposes them to this origin
  assert.ok(check.quota, 'X-Quota-* readable from JavaScript');
  assert.equal(check.quota.limit, 1000);
  assert.equal(check.quota.remaining, 1000 - check.invocation.tokensUsed);
  assert.match(check.requestId ?? '', /.+/, 'X-Request-ID readable');
  assert.equal(check.replayed, true, 'Idempotent-Replayed readable');
  assert.equal(check.throttled.status, 429);
  assert.equal(check.throttled.code, 'RATE_LIMITED');
  assert.ok((check.throttled.retryAfter ?? 0) >= 1, 'Retry-After readable');
  // the free plan's per-minute limit (API.md §4.1: 20 by default) is readable from JavaScript
  assert.ok(check.rateLimit, 'X-RateLimit-* readable');
  assert.equal(check.rateLimit.limit, 20);
  assert.ok(check.rateLimit.remaining < 20);

  // the preflight: Chromium asked for Authorization and Idempotency-Key, and the hub allowed them
  const calls = [...seen.values()];
  const invokes = calls.filter((c) => c.url.startsWith(`${hub.baseUrl}/api/v1/tools/`) && c.url.endsWith('/invoke'));
  const preflight = invokes.find((c) => c.method === 'OPTIONS');
  assert.ok(preflight, `no preflight seen among ${calls.map((c) => `${c.method} ${c.url}`).join(', ')}`);
  const asked = (preflight.requestHeaders['access-control-request-headers'] ?? '').split(',').map((h) => h.trim());
  for (const header of ['authorization', 'content-type', 'idempotency-key']) assert.ok(asked.includes(header), header);
  assert.equal(preflight.requestHeaders.origin, pageOrigin);
  assert.ok(preflight.status !== undefined && preflight.status < 300, `preflight answered ${preflight.status}`);
  assert.equal(preflight.responseHeaders?.['access-control-allow-origin'], pageOrigin);
  const allowed = (preflight.responseHeaders?.['access-control-allow-headers'] ?? '').toLowerCase();
  for (const header of ['authorization', 'idempotency-key']) assert.ok(allowed.includes(header), allowed);

  const post = invokes.find((c) => c.method === 'POST' && c.status === 200);
  assert.ok(post?.responseHeaders);
  const exposed = (post.responseHeaders['access-control-expose-headers'] ?? '').toLowerCase().split(/\s*,\s*/);
  for (const header of [
    'x-request-id',
    'x-quota-limit',
    'x-quota-remaining',
    'x-quota-reset',
    'x-ratelimit-limit',
    'x-ratelimit-remaining',
    'x-ratelimit-reset',
    'retry-after',
    'idempotent-replayed',
  ]) {
    assert.ok(exposed.includes(header), `${header} in Access-Control-Expose-Headers: ${exposed.join(', ')}`);
  }

  // the streamed invocation, through the hub on the other origin: every word, then done
  const { stream } = check;
  assert.equal(stream.toolName, 'Story Stream');
  const texts = [...GRACE.words, `done: ${GRACE.tokens} tokens`];
  assert.deepEqual(
    stream.rendered.map((r) => r.text),
    texts,
  );
  assert.deepEqual(
    stream.rendered.map((r) => r.event),
    [...GRACE.words.map(() => 'chunk'), 'done'],
  );
  assert.deepEqual(await page.locator('#stream li').allTextContents(), texts);
  assert.equal(stream.done?.status, 'success');
  assert.equal(stream.done.tokens_used, GRACE.tokens);
  assert.equal(stream.done.token_source, 'reported');
  assert.ok(stream.quota, 'X-Quota-* readable on the stream too');
  assert.equal(stream.quota.remaining, 1000 - check.invocation.tokensUsed); // the replay cost nothing

  // ... rendered one by one as the words arrived: the tool sends one every 40 ms, so a page
  // rendering only once the answer is complete would show all of them within a few ms
  const times = stream.rendered.map((r) => r.at);
  assert.deepEqual(
    times,
    [...times].sort((a, b) => a - b),
  );
  const spread = (times[GRACE.words.length - 1] ?? 0) - (times[0] ?? 0);
  const paced = (GRACE.words.length - 1) * STORY_DELAY_MS;
  assert.ok(spread >= paced / 2, `the words were rendered within ${spread} ms; the tool took ≥ ${paced} ms`);
  const partly = (await (await midStream).jsonValue()) as { shown: number | null };
  assert.ok(partly.shown !== null, 'the list was never seen partly rendered while the stream was open');

  // the streamed POST itself: preflighted, answered text/event-stream to this origin
  const storyCalls = invokes.filter((c) => c.url.includes(stream.done?.tool_id ?? '?'));
  const streamPreflight = storyCalls.find((c) => c.method === 'OPTIONS');
  assert.ok(streamPreflight?.status !== undefined && streamPreflight.status < 300, 'the stream was preflighted');
  const streamPost = storyCalls.find((c) => c.method === 'POST');
  assert.ok(streamPost?.responseHeaders, 'the streamed POST was seen');
  assert.ok((streamPost.requestHeaders.authorization ?? '').startsWith('Bearer '), 'sent with Authorization');
  assert.match(streamPost.requestHeaders.accept ?? '', /text\/event-stream/);
  assert.equal(streamPost.status, 200);
  assert.match(streamPost.responseHeaders['content-type'] ?? '', /^text\/event-stream/);
  assert.equal(streamPost.responseHeaders['access-control-allow-origin'], pageOrigin);
});

function lower(headers: Record<string, unknown>): Record<string, string> {
  return Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), String(v)]));
}
