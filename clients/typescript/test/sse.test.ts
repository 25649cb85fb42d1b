/**
 * The streamed-invocation reader (src/sse.ts) against API.md §5.1's framing: on in-memory
 * streams split at every byte, and over real HTTP from a tiny local server that speaks §5.1
 * (test/support/sse-server.ts), through a client made by `createHub`. The hub's own streams are
 * read in hub.test.ts (Node) and browser.test.ts (Chromium).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import {
  createHub,
  HubError,
  invokeStream,
  quotaOf,
  readEvents,
  StreamProtocolError,
  type StreamEvent,
} from '../src/index.js';
import { startSseServer, type SseServer } from './support/sse-server.js';
import { EXPECTED, PINGS, STREAM_BYTES, streamOf } from './support/sse-stream.js';

async function collect(
  stream: AsyncIterable<StreamEvent>,
): Promise<StreamEvent[]> {
  const events: StreamEvent[] = [];
  for await (const event of stream) events.push(event);
  return events;
}

describe('readEvents', () => {
  test('reads the §5.1 sample stream, split in two at every byte', async () => {
    for (let cut = 0; cut <= STREAM_BYTES.length; cut++) {
      const body = streamOf(STREAM_BYTES.subarray(0, cut), STREAM_BYTES.subarray(cut));
      assert.deepEqual(await collect(readEvents(body)), EXPECTED, `split at byte ${cut}`);
    }
  });

  test('reads it one byte at a time, and reports each comment', async () => {
    const comments: string[] = [];
    const pieces = Array.from(STREAM_BYTES, (byte) => Uint8Array.of(byte));
    const events = await collect(readEvents(streamOf(...pieces), { onComment: (text) => comments.push(text) }));
    assert.deepEqual(events, EXPECTED);
    assert.deepEqual(comments, Array(PINGS).fill('ping'));
  });

  test('stops at the error event', async () => {
    const text =
      'event: chunk\ndata: {"n": 1}\n\nevent: error\ndata: {"code": "QUOTA_EXCEEDED", "message": "m", ' +
      '"invocation_id": "i", "tokens_used": 7}\n\nevent: chunk\ndata: {"n": 2}\n\n';
    const events = await collect(readEvents(streamOf(new TextEncoder().encode(text))));
    assert.deepEqual(
      events.map((e) => e.event),
      ['chunk', 'error'],
    );
    const last = events[1];
    assert.ok(last?.event === 'error');
    assert.equal(last.data.code, 'QUOTA_EXCEEDED'); // typed: StreamFailure
    assert.equal(last.data.tokens_used, 7);
  });

  test('a body that ends before done or error is an interrupted stream', async () => {
    const text = 'event: chunk\ndata: {"n": 1}\n\nevent: done\ndata: {"tokens_used": 1'; // cut mid-event
    const events: StreamEvent[] = [];
    await assert.rejects(async () => {
      for await (const event of readEvents(streamOf(new TextEncoder().encode(text)))) events.push(event);
    }, StreamProtocolError);
    assert.deepEqual(events, [{ event: 'chunk', data: { n: 1 } }]);
  });

  test('data that is not a JSON object is a protocol error', async () => {
    for (const data of ['not json', '[1, 2]', '42']) {
      const body = streamOf(new TextEncoder().encode(`event: chunk\ndata: ${data}\n\n`));
      await assert.rejects(collect(readEvents(body)), StreamProtocolError);
    }
  });
});

describe('invokeStream over HTTP', () => {
  let server: SseServer;
  before(async () => {
    server = await startSseServer();
  });
  after(async () => {
    await server.close();
  });

  function hub() {
    return createHub({ baseUrl: server.baseUrl, apiKey: 'jfui_test_key_0123456789abcdefghijklmnopqrstuv' });
  }

  test('yields the events in order, with the quota headers and the request it should send', async () => {
    let quota: ReturnType<typeof quotaOf>;
    const events = await collect(
      invokeStream({
        client: hub().client,
        toolId: 'script',
        input: { text: 'Bonjour' },
        idempotencyKey: 'key-1',
        onResponse: (response) => (quota = quotaOf(response)),
      }),
    );
    assert.deepEqual(events, EXPECTED);
    assert.equal(quota?.remaining, 988);
    const request = server.seen.find((r) => r.toolId === 'script');
    assert.ok(request);
    assert.deepEqual(request.body, { input: { text: 'Bonjour' }, stream: true });
    assert.equal(request.headers.authorization, 'Bearer jfui_test_key_0123456789abcdefghijklmnopqrstuv');
    assert.equal(request.headers['idempotency-key'], 'key-1');
    assert.match(request.headers.accept ?? '', /text\/event-stream/);
  });

  test('hands over each chunk as it arrives, before the stream is complete', async () => {
    const stream = invokeStream({ client: hub().client, toolId: 'stepwise', input: {} });
    const first = await stream.next(); // the server sends nothing more until release()
    assert.deepEqual(first.value, { event: 'chunk', data: { n: 1 } });
    server.release();
    const rest = await collect({ [Symbol.asyncIterator]: () => stream });
    assert.deepEqual(
      rest.map((e) => e.event),
      ['chunk', 'done'],
    );
  });

  test('a refusal before the stream is a typed HubError from the envelope', async () => {
    await assert.rejects(collect(invokeStream({ client: hub().client, toolId: 'refused', input: {} })), (error) => {
      assert.ok(error instanceof HubError);
      assert.equal(error.status, 402);
      assert.equal(error.code, 'SUBSCRIPTION_REQUIRED');
      assert.equal(error.requestId, 'sse-test');
      return true;
    });
  });

  test('a failure after the first chunk ends with the error event', async () => {
    const events = await collect(invokeStream({ client: hub().client, toolId: 'fails', input: {} }));
    assert.deepEqual(
      events.map((e) => e.event),
      ['chunk', 'error'],
    );
  });

  test('a dropped connection is an interrupted stream, not a silent end', async () => {
    await assert.rejects(
      collect(invokeStream({ client: hub().client, toolId: 'drops', input: {} })),
      StreamProtocolError,
    );
  });

  test('stopping early hangs up, so the hub can stop the upstream', async () => {
    let seen = 0;
    for await (const event of invokeStream({ client: hub().client, toolId: 'endless', input: {} })) {
      assert.equal(event.event, 'chunk');
      if (++seen === 3) break;
    }
    await server.hungUp; // the server saw the connection close (the test times out otherwise)
  });
});
