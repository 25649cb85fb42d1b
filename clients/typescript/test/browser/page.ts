/**
 * The page of the real-browser test (browser.test.ts): what a dashboard on another origin does
 * with the client. It runs in Chromium, served from the test's own origin, against the hub on
 * another port; it renders what it got and leaves a summary in `window.hubCheck` for the test.
 */
import {
  authLogin,
  authRegister,
  createHub,
  invokeStream,
  isReplayed,
  type Quota,
  quotaOf,
  rateLimitOf,
  retryAfterSeconds,
  type StreamDone,
  subscriptionsSubscribe,
  toolsInvoke,
  toolsList,
} from '../../src/index.js';
import { GRACE } from '../support/story.js';

/** One rendered item of the streamed invocation, and when it was on the page. */
export interface Rendered {
  event: 'chunk' | 'done' | 'error';
  text: string;
  /** ms since the page sent the call (`performance.now()`), taken right after rendering */
  at: number;
}

export interface HubCheck {
  email: string;
  plan: string;
  toolName: string;
  invocation: { status: string; tokensUsed: number; words: number };
  quota: { limit: number; remaining: number; reset: string } | null;
  requestId: string | null;
  replayed: boolean;
  rateLimit: { limit: number; remaining: number; resetSeconds: number } | null;
  throttled: { status: number; code: string | undefined; retryAfter: number | undefined };
  stream: {
    toolName: string;
    rendered: Rendered[];
    done: StreamDone | null;
    quota: { limit: number; remaining: number } | null;
  };
}

declare global {
  interface Window {
    hubCheck?: HubCheck;
    hubCheckError?: string;
  }
}

const PASSWORD = 'Correct-Horse-Battery-9';

function show(id: string, html: string): void {
  const element = document.getElementById(id);
  if (element) element.innerHTML = html;
}

function escape(text: string): string {
  return text.replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);
}

async function run(hubUrl: string): Promise<HubCheck> {
  const { client, session } = createHub({ baseUrl: hubUrl });
  const email = `browser-${crypto.randomUUID()}@example.com`;
  const registered = await authRegister({ client, body: { name: 'Grace Hopper', email, password: PASSWORD } });
  if (!registered.data) throw new Error(`register: ${JSON.stringify(registered.error)}`);
  session.signIn(registered.data.data.tokens);
  show('account', `<b>${escape(registered.data.data.user.name)}</b> &lt;${escape(email)}&gt;`);

  const subscribed = await subscriptionsSubscribe({ client, body: { plan: 'free' } });
  if (!subscribed.data) throw new Error(`subscribe: ${JSON.stringify(subscribed.error)}`);

  const tools = await toolsList({ client, query: { search: 'word' } });
  const tool = tools.data?.data.find((t) => t.name === 'Word Count');
  if (!tool) throw new Error('no Word Count tool');

  // Authorization + Idempotency-Key + JSON: a CORS preflight precedes this call
  const key = crypto.randomUUID();
  const input = { input: { text: 'Grace wrote the first compiler in 1952.' } };
  const invoked = await toolsInvoke({ client, path: { tool_id: tool.id }, body: input, headers: { 'Idempotency-Key': key } });
  if (!invoked.data) throw new Error(`invoke: ${JSON.stringify(invoked.error)}`);
  const invocation = invoked.data.data;
  const output = invocation.output as { words: number };
  const quota = quotaOf(invoked.response);
  show(
    'invocation',
    `<span class="ok">${escape(tool.name)}: ${invocation.status}</span>, ${invocation.tokens_used} tokens` +
      `<pre>${escape(JSON.stringify(invocation.output, null, 2))}</pre>`,
  );
  if (quota) {
    show('quota', `${quota.remaining} of ${quota.limit} tokens left until ${quota.reset.toISOString().slice(0, 10)}`);
    const bar = document.getElementById('quota-bar');
    if (bar) bar.style.width = `${(100 * quota.remaining) / quota.limit}%`;
  }
  const replay = await toolsInvoke({ client, path: { tool_id: tool.id }, body: input, headers: { 'Idempotency-Key': key } });

  // the login throttle's 429: its Retry-After must be readable too
  let throttled: Response | undefined;
  let code: string | undefined;
  for (let attempt = 0; attempt < 6; attempt++) {
    const refused = await authLogin({ client, body: { email, password: 'Wrong-Password-1' } });
    throttled = refused.response;
    code = refused.error?.error?.code;
  }
  const retryAfter = throttled ? retryAfterSeconds(throttled) : undefined;
  const rateLimit = rateLimitOf(invoked.response) ?? null;
  show(
    'limits',
    `login throttled: <span class="err">${throttled?.status} ${code}</span>, retry after ${retryAfter} s; ` +
      `per-minute limit on invoke: ${rateLimit ? `${rateLimit.remaining}/${rateLimit.limit}` : 'none'}`,
  );

  // a streamed invocation through the hub, each event rendered as it arrives: Story Stream
  // tells one word every ~40 ms, so a page that waited for the whole answer would show it late
  const stories = await toolsList({ client, query: { search: 'story' } });
  const story = stories.data?.data.find((t) => t.name === 'Story Stream');
  if (!story) throw new Error('no Story Stream tool');
  const list = document.getElementById('stream');
  const rendered: Rendered[] = [];
  let done: StreamDone | null = null;
  let streamQuota: Quota | undefined;
  const sent = performance.now();
  for await (const event of invokeStream({
    client,
    toolId: story.id,
    input: GRACE.input,
    idempotencyKey: crypto.randomUUID(),
    onResponse: (response) => (streamQuota = quotaOf(response)),
  })) {
    const item = document.createElement('li');
    if (event.event === 'chunk') {
      item.textContent = String(event.data.text);
    } else if (event.event === 'done') {
      done = event.data;
      item.textContent = `done: ${event.data.tokens_used} tokens`;
      item.className = 'ok';
    } else {
      item.textContent = `${event.data.code}: ${event.data.message}`;
      item.className = 'err';
    }
    list?.append(item);
    rendered.push({ event: event.event, text: item.textContent, at: performance.now() - sent });
  }
  const elapsed = Math.round(performance.now() - sent);
  show(
    'stream-status',
    `<span class="ok">${escape(story.name)}: ${rendered.length} events in ${elapsed} ms</span>` +
      (done ? `, ${done.tokens_used} tokens (${done.token_source})` : ''),
  );

  return {
    email,
    plan: subscribed.data.data.plan,
    toolName: tool.name,
    invocation: { status: invocation.status, tokensUsed: invocation.tokens_used, words: output.words },
    quota: quota ? { limit: quota.limit, remaining: quota.remaining, reset: quota.reset.toISOString() } : null,
    requestId: invoked.response.headers.get('X-Request-ID'),
    replayed: isReplayed(replay.response),
    rateLimit,
    throttled: { status: throttled?.status ?? 0, code, retryAfter },
    stream: {
      toolName: story.name,
      rendered,
      done,
      quota: streamQuota ? { limit: streamQuota.limit, remaining: streamQuota.remaining } : null,
    },
  };
}

const hubUrl = new URLSearchParams(location.search).get('hub') ?? '';
run(hubUrl).then(
  (check) => {
    window.hubCheck = check;
  },
  (error: unknown) => {
    window.hubCheckError = error instanceof Error ? `${error.message}\n${error.stack ?? ''}` : String(error);
    show('account', `<span class="err">${escape(window.hubCheckError)}</span>`);
  },
);
