/**
 * The generated client against a served hub (`joyhub serve --demo`): what the dashboard does,
 * asserted on the typed results the client gives back — not on raw JSON.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { setTimeout as pause } from 'node:timers/promises';

import {
  type ApiKeyCreatedOut,
  authLogin,
  authLogout,
  authRefresh,
  authRegister,
  createHub,
  type Hub,
  HubError,
  type Invocation,
  invokeStream,
  isReplayed,
  quotaOf,
  retryAfterSeconds,
  subscriptionsCurrent,
  subscriptionsListPlans,
  subscriptionsSubscribe,
  type StreamDone,
  type StreamEvent,
  type SubscriptionOut,
  type TokenPair,
  toolsInvoke,
  toolsList,
  type ToolOut,
  usageList,
  type UsageRecord,
  usageSummary,
  usersChangePassword,
  usersCreateApiKey,
  usersGetMe,
  usersListApiKeys,
  usersRevokeApiKey,
  usersUpdateMe,
  type UserOut,
} from '../src/index.js';
import { type ServedHub, startHub } from './support/hub.js';
import { ADA, chunksOf, STORY_DELAY_MS } from './support/story.js';

const PASSWORD = 'Correct-Horse-Battery-9';
let served: ServedHub;

before(async () => {
  served = await startHub();
});
after(async () => {
  await served?.stop();
});

function email(): string {
  return `ada-${randomUUID()}@example.com`;
}

/** A client whose transport counts what it sends: refreshes are what these tests watch. */
function countingHub(options: { apiKey?: string; onTokens?: (t: TokenPair | null) => void } = {}) {
  const sent: string[] = [];
  const hub = createHub({
    baseUrl: served.baseUrl,
    ...options,
    fetch: (input, init) => {
      const request = new Request(input, init);
      sent.push(`${request.method} ${new URL(request.url).pathname}`);
      return fetch(request);
    },
  });
  const refreshes = () => sent.filter((line) => line === 'POST /api/v1/auth/refresh').length;
  return { ...hub, sent, refreshes };
}

async function signedUp(hub: Hub, address = email()): Promise<{ user: UserOut; tokens: TokenPair }> {
  const { data, response } = await authRegister({
    client: hub.client,
    body: { name: 'Ada Lovelace', email: address, password: PASSWORD },
  });
  assert.equal(response.status, 201);
  assert.ok(data, 'registered');
  hub.session.signIn(data.data.tokens);
  return data.data;
}

async function wordCount(hub: Hub): Promise<ToolOut> {
  const { data } = await toolsList({ client: hub.client, query: { search: 'word' } });
  assert.ok(data);
  const tool = data.data.find((t) => t.name === 'Word Count');
  assert.ok(tool, 'the demo tool Word Count is in the catalog');
  return tool;
}

describe('a new user', () => {
  test('registers, logs in, refreshes, subscribes, invokes a demo tool and reads usage', async () => {
    const hub = createHub({ baseUrl: served.baseUrl });
    const address = email();
    const { user } = await signedUp(hub, address);
    assert.equal(user.email, address);
    assert.equal(user.role, 'user');
    assert.equal(user.is_active, true);

    // log in: a second session, the one this client goes on with
    const login = await authLogin({ client: hub.client, body: { email: address, password: PASSWORD } });
    assert.ok(login.data);
    const pair: TokenPair = login.data.data;
    assert.equal(pair.token_type, 'bearer');
    assert.ok(pair.expires_in >= 15 * 60);
    hub.session.signIn(pair);

    // an explicit refresh rotates the pair
    const refreshed = await authRefresh({ client: hub.client, body: { refresh_token: pair.refresh_token } });
    assert.ok(refreshed.data);
    assert.notEqual(refreshed.data.data.refresh_token, pair.refresh_token);
    assert.notEqual(refreshed.data.data.access_token, pair.access_token);
    hub.session.signIn(refreshed.data.data);

    const me = await usersGetMe({ client: hub.client });
    assert.equal(me.data?.data.id, user.id);
    assert.match(me.response.headers.get('X-Request-ID') ?? '', /.+/);
    assert.equal(me.data?.meta.request_id, me.response.headers.get('X-Request-ID'));

    // no subscription yet: the invocation is refused with a typed error
    const tool = await wordCount(hub);
    const refused = await toolsInvoke({ client: hub.client, path: { tool_id: tool.id }, body: { input: { text: 'x' } } });
    assert.equal(refused.response.status, 402);
    assert.equal(refused.error?.error?.code, 'SUBSCRIPTION_REQUIRED');
    assert.equal(refused.data, undefined);

    const plans = await subscriptionsListPlans({ client: hub.client });
    assert.deepEqual(
      plans.data?.data.map((p) => p.code),
      ['free', 'pro', 'enterprise'],
    );
    const subscribed = await subscriptionsSubscribe({ client: hub.client, body: { plan: 'free' } });
    assert.equal(subscribed.response.status, 201);
    assert.ok(subscribed.data);
    const subscription: SubscriptionOut = subscribed.data.data;
    assert.equal(subscription.plan, 'free');
    assert.equal(subscription.status, 'active');
    assert.equal(subscription.tokens_used, 0);

    const listed = await toolsList({ client: hub.client });
    assert.ok(listed.data);
    assert.ok(listed.data.data.length >= 3);
    assert.equal(listed.data.meta.pagination?.total, listed.data.data.length);
    // the catalog is ordered by name, case-insensitively (the hub sorts on lower(name))
    const byName = (a: string, b: string): number => {
      const [x, y] = [a.toLowerCase(), b.toLowerCase()];
      return x < y ? -1 : x > y ? 1 : 0;
    };
    assert.deepEqual(
      listed.data.data.map((t) => t.name),
      [...listed.data.data.map((t) => t.name)].sort(byName),
    );

    const key = randomUUID();
    const invoked = await toolsInvoke({
      client: hub.client,
      path: { tool_id: tool.id },
      body: { input: { text: 'The hub meters every token.' } },
      headers: { 'Idempotency-Key': key },
    });
    assert.equal(invoked.response.status, 200);
    assert.ok(invoked.data);
    const invocation: Invocation = invoked.data.data;
    assert.equal(invocation.tool_id, tool.id);
    assert.equal(invocation.status, 'success');
    assert.ok(invocation.tokens_used > 0);
    assert.equal((invocation.output as { words: number }).words, 5);
    const quota = quotaOf(invoked.response);
    assert.ok(quota, 'X-Quota-* headers on the invocation');
    assert.equal(quota.limit, subscription.token_limit);
    assert.equal(quota.remaining, subscription.token_limit - invocation.tokens_used);
    assert.equal(quota.reset.getTime(), new Date(subscription.current_period_end).getTime());
    assert.equal(isReplayed(invoked.response), false);

    // the same Idempotency-Key: the first answer again, not charged twice
    const replayed = await toolsInvoke({
      client: hub.client,
      path: { tool_id: tool.id },
      body: { input: { text: 'The hub meters every token.' } },
      headers: { 'Idempotency-Key': key },
    });
    assert.equal(isReplayed(replayed.response), true);
    assert.equal(replayed.data?.data.invocation_id, invocation.invocation_id);

    const usage = await usageList({ client: hub.client });
    assert.ok(usage.data);
    assert.equal(usage.data.meta.pagination?.total, 1);
    const record: UsageRecord | undefined = usage.data.data[0];
    assert.ok(record);
    assert.equal(record.tool_name, 'Word Count');
    assert.equal(record.status, 'success');
    assert.equal(record.tokens_used, invocation.tokens_used);

    const summary = await usageSummary({ client: hub.client });
    assert.ok(summary.data);
    assert.equal(summary.data.data.total_invocations, 1);
    assert.equal(summary.data.data.total_tokens, invocation.tokens_used);
    assert.equal(summary.data.data.quota?.tokens_remaining, quota.remaining);
    assert.equal(summary.data.data.by_tool[0]?.tool_name, 'Word Count');
  });

  test('hits the login throttle: the 6th wrong password is a 429 with Retry-After', async () => {
    const hub = createHub({ baseUrl: served.baseUrl });
    const address = email();
    await signedUp(createHub({ baseUrl: served.baseUrl }), address);
    const codes: Array<[number, string | undefined]> = [];
    let last: Response | undefined;
    for (let attempt = 0; attempt < 6; attempt++) {
      const { error, response } = await authLogin({
        client: hub.client,
        body: { email: address, password: 'Wrong-Password-1' },
      });
      codes.push([response.status, error?.error?.code]);
      last = response;
    }
    assert.deepEqual(codes, [
      ...Array.from({ length: 5 }, (): [number, string] => [401, 'INVALID_CREDENTIALS']),
      [429, 'RATE_LIMITED'],
    ]);
    assert.ok(last);
    const wait = retryAfterSeconds(last);
    assert.ok(wait !== undefined && wait >= 1 && wait <= 900, `Retry-After: ${wait}`);
  });

  test('creates an API key, calls with it, and revokes it', async () => {
    const owner = countingHub();
    await signedUp(owner);
    await subscriptionsSubscribe({ client: owner.client, body: { plan: 'free' } });

    const created = await usersCreateApiKey({ client: owner.client, body: { name: 'CI pipeline' } });
    assert.equal(created.response.status, 201);
    assert.ok(created.data);
    const apiKey: ApiKeyCreatedOut = created.data.data;
    assert.match(apiKey.key, /^jfui_[A-Za-z0-9_-]{32,}$/);
    assert.equal(apiKey.key_prefix, apiKey.key.slice(0, 12));
    assert.equal(apiKey.is_active, true);

    const script = countingHub({ apiKey: apiKey.key });
    const me = await usersGetMe({ client: script.client });
    assert.equal(me.response.status, 200);
    const tool = await wordCount(script);
    const invoked = await toolsInvoke({ client: script.client, path: { tool_id: tool.id }, body: { input: { text: 'a b' } } });
    assert.equal(invoked.data?.data.status, 'success');
    assert.ok(quotaOf(invoked.response));
    // a key cannot manage keys (403), and says so in a typed error
    const forbidden = await usersListApiKeys({ client: script.client });
    assert.equal(forbidden.error?.error?.code, 'FORBIDDEN');

    const listed = await usersListApiKeys({ client: owner.client });
    assert.deepEqual(
      listed.data?.data.map((k) => k.id),
      [apiKey.id],
    );
    const revoked = await usersRevokeApiKey({ client: owner.client, path: { key_id: apiKey.id } });
    assert.equal(revoked.response.status, 204);

    const after = await usersGetMe({ client: script.client });
    assert.equal(after.response.status, 401);
    assert.equal(after.error?.error?.code, 'INVALID_TOKEN');
    assert.equal(script.refreshes(), 0, 'an API key is never refreshed');
    const keys = await usersListApiKeys({ client: owner.client });
    assert.equal(keys.data?.data[0]?.is_active, false);
  });
});

describe('the session', () => {
  test('renews an expired access token once for many calls at once, and replays their bodies', async () => {
    const rotations: Array<TokenPair | null> = [];
    const hub = countingHub({ onTokens: (t) => rotations.push(t) });
    const { tokens } = await signedUp(hub);
    // the hub refuses this access token exactly as an expired one: 401 INVALID_TOKEN
    hub.session.signIn({ ...tokens, access_token: `${tokens.access_token}x` });
    rotations.length = 0;

    const results = await Promise.all([
      usersGetMe({ client: hub.client }),
      usersGetMe({ client: hub.client }),
      subscriptionsCurrent({ client: hub.client }),
      toolsList({ client: hub.client }),
      usageSummary({ client: hub.client }),
      usersUpdateMe({ client: hub.client, body: { name: 'Ada King' } }),
      subscriptionsSubscribe({ client: hub.client, body: { plan: 'pro' } }),
    ]);
    assert.deepEqual(
      results.map((r) => r.response.status),
      [200, 200, 200, 200, 200, 200, 201],
    );
    assert.equal(hub.refreshes(), 1, 'one refresh for all of them (a second would be a reuse)');
    assert.equal(rotations.length, 1);
    assert.notEqual(hub.session.tokens?.refresh_token, tokens.refresh_token);
    const updated = results[5] as Awaited<ReturnType<typeof usersUpdateMe>>;
    assert.equal(updated.data?.data.name, 'Ada King'); // its JSON body was sent again intact
    const subscribed = results[6] as Awaited<ReturnType<typeof subscriptionsSubscribe>>;
    assert.equal(subscribed.data?.data.plan, 'pro');

    // and the renewed token goes on working, without another refresh
    assert.equal((await usersGetMe({ client: hub.client })).response.status, 200);
    assert.equal(hub.refreshes(), 1);
  });

  test('a 401 that is not an expired token (wrong current password) is not refreshed', async () => {
    const hub = countingHub();
    await signedUp(hub);
    const { error, response } = await usersChangePassword({
      client: hub.client,
      body: { current_password: 'Not-The-Password-1', new_password: 'Another-Horse-Battery-7' },
    });
    assert.equal(response.status, 401);
    assert.equal(error?.error?.code, 'INVALID_CREDENTIALS');
    assert.equal(hub.refreshes(), 0);
  });

  test('ends when the hub refuses the refresh token, and says so with onTokens(null)', async () => {
    const rotations: Array<TokenPair | null> = [];
    const hub = countingHub({ onTokens: (t) => rotations.push(t) });
    const { tokens } = await signedUp(hub);
    await authLogout({ client: hub.client, body: { refresh_token: tokens.refresh_token } });
    rotations.length = 0;

    const { error, response } = await usersGetMe({ client: hub.client });
    assert.equal(response.status, 401);
    assert.equal(error?.error?.code, 'INVALID_TOKEN');
    assert.equal(hub.refreshes(), 1);
    assert.deepEqual(rotations, [null]);
    assert.equal(hub.session.tokens, undefined);
    assert.equal(hub.session.credential, undefined);
  });
});

/** The streaming demo tool (API.md §5.1): one word per event, every ~40 ms. */
async function storyStream(hub: Hub): Promise<ToolOut> {
  const { data } = await toolsList({ client: hub.client, query: { search: 'story' } });
  const tool = data?.data.find((t) => t.name === 'Story Stream');
  assert.ok(tool, 'the demo tool Story Stream is in the catalog');
  assert.equal(tool.streaming, true);
  return tool;
}

const STORY_INPUT = ADA.input;
const STORY_TOKENS = ADA.tokens;
const STORY_CHUNKS = chunksOf(ADA);
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

async function subscribedUser(): Promise<Hub> {
  const hub = createHub({ baseUrl: served.baseUrl });
  await signedUp(hub);
  const subscribed = await subscriptionsSubscribe({ client: hub.client, body: { plan: 'free' } });
  assert.equal(subscribed.response.status, 201);
  return hub;
}

async function tokensCharged(hub: Hub): Promise<number> {
  const { data } = await subscriptionsCurrent({ client: hub.client });
  assert.ok(data?.data);
  return data.data.tokens_used;
}

/**
 * `probe`'s first defined answer, asked again every 25 ms for at most `timeoutMs`: for what the
 * hub settles on its own after the caller has gone (a cancelled stream's usage record).
 */
async function eventually<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline) assert.fail(`${what}: not within ${timeoutMs} ms`);
    await pause(25);
  }
}

/**
 * Whether the served hub's `GET /usage` already tells streams apart (API.md §6: `token_source`,
 * `status: "cancelled"`). This branch's hub does not yet: that is the `usage-cancelled` work,
 * merged separately. Until then the assertions on it run as TODO (reported, not fatal); once
 * the hub has it they are ordinary assertions, with no change here.
 */
async function usageTellsStreams(): Promise<string | false> {
  const response = await fetch(`${served.baseUrl}/openapi.json`);
  const document = (await response.json()) as {
    components?: { schemas?: Record<string, { properties?: Record<string, { enum?: unknown[] }> }> };
  };
  const record = document.components?.schemas?.UsageRecord?.properties;
  const knows = record?.token_source !== undefined && record.status?.enum?.includes('cancelled') === true;
  return knows ? false : 'the hub under test has no token_source / cancelled in UsageRecord yet (usage-cancelled)';
}

/** A usage record as API.md §6 has it; the generated `UsageRecord` has `token_source` once the hub does. */
type StreamedUsageRecord = UsageRecord & { token_source?: 'reported' | 'estimated' };

describe('a streamed invocation (Story Stream)', () => {
  test('yields typed chunks in order, then done; a repeated key replays it free', async (t) => {
    const hub = await subscribedUser();
    const tool = await storyStream(hub);
    const key = randomUUID();
    let response: Response | undefined;
    const events: StreamEvent[] = [];
    for await (const event of invokeStream({
      client: hub.client,
      toolId: tool.id,
      input: STORY_INPUT,
      idempotencyKey: key,
      onResponse: (r) => (response = r),
    })) {
      events.push(event);
    }

    assert.deepEqual(
      events.map((e) => e.event),
      [...STORY_CHUNKS.map(() => 'chunk'), 'done'],
    );
    assert.deepEqual(
      events.flatMap((e) => (e.event === 'chunk' ? [e.data] : [])),
      STORY_CHUNKS,
    );
    const last = events.at(-1);
    assert.ok(last?.event === 'done');
    const done: StreamDone = last.data; // typed by the event name
    assert.deepEqual(Object.keys(done).sort(), [
      'duration_ms',
      'invocation_id',
      'status',
      'token_source',
      'tokens_used',
      'tool_id',
    ]);
    assert.match(done.invocation_id, UUID);
    assert.equal(done.tool_id, tool.id);
    assert.equal(done.status, 'success');
    assert.equal(done.tokens_used, STORY_TOKENS);
    assert.equal(done.token_source, 'reported'); // the demo's own count, in its last chunk
    // the whole stream, not the wait for its first chunk: the tool paces its words
    assert.ok(done.duration_ms >= (STORY_CHUNKS.length - 1) * STORY_DELAY_MS, `duration_ms ${done.duration_ms}`);

    assert.ok(response);
    assert.match(response.headers.get('Content-Type') ?? '', /^text\/event-stream/);
    const quota = quotaOf(response);
    assert.ok(quota, 'X-Quota-* on the stream');
    assert.equal(quota.remaining, quota.limit); // as admitted: nothing charged before this call
    assert.equal(isReplayed(response), false);
    assert.equal(await tokensCharged(hub), STORY_TOKENS);

    // the same key: the stored events as the same stream, no new call and no charge
    let replay: Response | undefined;
    const again: StreamEvent[] = [];
    for await (const event of invokeStream({
      client: hub.client,
      toolId: tool.id,
      input: STORY_INPUT,
      idempotencyKey: key,
      onResponse: (r) => (replay = r),
    })) {
      again.push(event);
    }
    assert.deepEqual(again, events);
    assert.ok(replay && isReplayed(replay));
    assert.equal(await tokensCharged(hub), STORY_TOKENS);

    const usage = await usageList({ client: hub.client });
    assert.equal(usage.data?.meta.pagination?.total, 1);
    const record: StreamedUsageRecord | undefined = usage.data?.data[0];
    assert.ok(record);
    assert.equal(record.tool_name, 'Story Stream');
    assert.equal(record.status, 'success');
    assert.equal(record.tokens_used, STORY_TOKENS);
    assert.equal(record.request_id, response.headers.get('X-Request-ID'));
    await t.test('its usage record says the count was reported', { todo: await usageTellsStreams() }, () => {
      assert.equal(record.token_source, 'reported');
    });
  });

  test('a caller who aborts after two chunks: the hub settles it cancelled, charged what was relayed', async (t) => {
    const hub = await subscribedUser();
    const tool = await storyStream(hub);
    const words = 200; // ~8 s of story: the abort lands mid-stream
    const stop = new AbortController();
    const events: StreamEvent[] = [];
    await assert.rejects(
      async () => {
        const stream = invokeStream({
          client: hub.client,
          toolId: tool.id,
          input: { text: STORY_INPUT.text, words },
          signal: stop.signal,
        });
        for await (const event of stream) {
          events.push(event);
          if (events.length === 2) stop.abort(); // e.g. the dashboard's Stop button
        }
      },
      { name: 'AbortError' },
    );
    assert.deepEqual(
      events.slice(0, 2).map((e) => e.data),
      STORY_CHUNKS.slice(0, 2),
    );
    assert.ok(
      events.every((e) => e.event === 'chunk'),
      'no done or error after the abort',
    );

    // the hub saw the hang-up, stopped the tool and settled the call on its own
    const charged = await eventually('the cancelled stream charged', async () => {
      const tokens = await tokensCharged(hub);
      return tokens > 0 ? tokens : undefined;
    });
    const wholeStory = Math.ceil(STORY_INPUT.text.length / 4) + words;
    assert.ok(charged < wholeStory / 2, `charged ${charged}: what was relayed, not the whole story (${wholeStory})`);

    // settled means logged: the charge and the usage record are one transaction (API.md §5, 2.)
    const todo = await usageTellsStreams();
    await t.test('GET /usage: status cancelled, token_source estimated', { todo }, async () => {
      const { data } = await usageList({ client: hub.client });
      assert.ok(data);
      assert.equal(data.meta.pagination?.total, 1);
      const record: StreamedUsageRecord | undefined = data.data[0];
      assert.ok(record);
      assert.equal(record.tool_name, 'Story Stream');
      assert.equal(record.status, 'cancelled');
      assert.equal(record.tokens_used, charged);
      // the tool reports its count in its last chunk, which never came: the hub's estimate
      assert.equal(record.token_source, 'estimated');
    });
  });

  test('refusals before the stream are typed HubErrors; without stream: true the answer is JSON', async () => {
    const hub = createHub({ baseUrl: served.baseUrl });
    await signedUp(hub);
    const tool = await storyStream(hub);
    const unsubscribed = invokeStream({ client: hub.client, toolId: tool.id, input: STORY_INPUT });
    await assert.rejects(unsubscribed.next(), (error) => {
      assert.ok(error instanceof HubError);
      assert.equal(error.status, 402);
      assert.equal(error.code, 'SUBSCRIPTION_REQUIRED');
      assert.match(error.requestId, /.+/);
      return true;
    });
    await subscriptionsSubscribe({ client: hub.client, body: { plan: 'free' } });

    // a tool that does not stream refuses stream: true (API.md §5.1)
    const notStreaming = invokeStream({ client: hub.client, toolId: (await wordCount(hub)).id, input: { text: 'a' } });
    await assert.rejects(notStreaming.next(), (error) => {
      assert.ok(error instanceof HubError);
      assert.equal(error.status, 422);
      assert.equal(error.code, 'VALIDATION_ERROR');
      assert.match(JSON.stringify(error.details), /stream/);
      return true;
    });

    // the generated toolsInvoke reads JSON as before: the streaming tool consumed whole
    const whole = await toolsInvoke({
      client: hub.client,
      path: { tool_id: tool.id },
      body: { input: { text: STORY_INPUT.text, words: 3 } },
    });
    assert.equal(whole.response.status, 200);
    assert.match(whole.response.headers.get('Content-Type') ?? '', /^application\/json/);
    assert.ok(whole.data);
    const invocation: Invocation = whole.data.data;
    assert.equal(invocation.status, 'success');
    assert.equal(invocation.tokens_used, 3 + 3);
    assert.deepEqual(invocation.output, {
      chunks: [
        { index: 0, text: 'Ada ' },
        { index: 1, text: 'Lovelace ' },
        { index: 2, text: 'once.', usage: { total_tokens: 6 } },
      ],
    });
    assert.equal(await tokensCharged(hub), 6);
  });
});
