/**
 * The generated client against a served hub (`joyhub serve --demo`): what the dashboard does,
 * asserted on the typed results the client gives back — not on raw JSON.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import {
  type ApiKeyCreatedOut,
  authLogin,
  authLogout,
  authRefresh,
  authRegister,
  createHub,
  type Hub,
  type Invocation,
  isReplayed,
  quotaOf,
  retryAfterSeconds,
  subscriptionsCurrent,
  subscriptionsListPlans,
  subscriptionsSubscribe,
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
    assert.deepEqual(
      listed.data.data.map((t) => t.name),
      [...listed.data.data.map((t) => t.name)].sort(),
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
