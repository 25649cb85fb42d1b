/**
 * A tiny local server that speaks API.md §5.1 on `POST /api/v1/tools/{tool_id}/invoke`, for
 * what the reader must survive and a served hub does not do on demand: every framing detail at
 * once, a chunk held back until released, an error event, a connection cut mid-stream (the
 * real hub's stream is tested in hub.test.ts and browser.test.ts). What it answers depends on
 * the tool id, so each test asks for one behaviour:
 *
 * - `refused`: the JSON envelope of a refusal (402 SUBSCRIPTION_REQUIRED), as the hub does;
 * - `script`: the §5.1 sample stream (sse-stream.ts), frame by frame;
 * - `stepwise`: one chunk, then nothing until the test calls `release()` — so a reader that
 *   only yields once the body is complete would hang, and the test times out;
 * - `fails`: a chunk, then `event: error` (TOOL_TIMEOUT), as after an upstream failure;
 * - `drops`: a chunk, then the connection is cut;
 * - `endless`: chunks until the client hangs up; `hungUp` resolves when it has.
 */
import { once } from 'node:events';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';

import { FRAME_BYTES, INVOCATION_ID } from './sse-stream.js';

export interface SeenRequest {
  toolId: string;
  headers: IncomingMessage['headers'];
  body: unknown;
}

export interface SseServer {
  baseUrl: string;
  seen: SeenRequest[];
  release(): void;
  hungUp: Promise<void>;
  close(): Promise<void>;
}

const PATH = /^\/api\/v1\/tools\/([^/]+)\/invoke$/;

export async function startSseServer(): Promise<SseServer> {
  const seen: SeenRequest[] = [];
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  let hangUp!: () => void;
  const hungUp = new Promise<void>((resolve) => (hangUp = resolve));

  const server: Server = createServer(async (req, res) => {
    const match = PATH.exec(req.url ?? '');
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    if (req.method !== 'POST' || match?.[1] === undefined) return envelope(res, 404, 'NOT_FOUND', 'No such route');
    const toolId = decodeURIComponent(match[1]);
    const body: unknown = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    seen.push({ toolId, headers: req.headers, body });
    if ((body as { stream?: unknown }).stream !== true || !req.headers.accept?.includes('text/event-stream')) {
      return envelope(res, 422, 'VALIDATION_ERROR', 'stream: true and Accept: text/event-stream expected');
    }
    if (toolId === 'refused') {
      return envelope(res, 402, 'SUBSCRIPTION_REQUIRED', 'An active subscription is required');
    }
    res.writeHead(200, {
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-store',
      'X-Quota-Limit': '1000',
      'X-Quota-Remaining': '988',
      'X-Quota-Reset': '2030-01-01T00:00:00Z',
    });
    res.flushHeaders();
    const chunk = (n: number) => `event: chunk\ndata: {"n": ${n}}\n\n`;
    switch (toolId) {
      case 'script':
        for (const frame of FRAME_BYTES) await write(res, frame);
        return res.end();
      case 'stepwise':
        await write(res, chunk(1));
        await released;
        await write(res, chunk(2));
        await write(res, done(2));
        return res.end();
      case 'fails':
        await write(res, chunk(1));
        await write(
          res,
          `event: error\ndata: {"code": "TOOL_TIMEOUT", "message": "The tool did not answer in time", "invocation_id": "${INVOCATION_ID}", "tokens_used": 3}\n\n`,
        );
        return res.end();
      case 'drops':
        await write(res, chunk(1));
        return res.destroy();
      case 'endless': {
        res.once('close', hangUp);
        for (let n = 1; !res.destroyed && n < 10_000; n++) await write(res, chunk(n));
        return;
      }
      default:
        return res.end();
    }
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('no port');
  return {
    baseUrl: `http://127.0.0.1:${address.port}`,
    seen,
    release,
    hungUp,
    async close() {
      release();
      server.closeAllConnections();
      server.close();
      await once(server, 'close');
    },
  };
}

function done(tokens: number): string {
  return `event: done\ndata: {"invocation_id": "${INVOCATION_ID}", "tool_id": "stepwise", "status": "success", "tokens_used": ${tokens}, "token_source": "estimated", "duration_ms": 5}\n\n`;
}

/** One write, resolved once the socket took it (so frames leave as separate TCP segments). */
function write(res: ServerResponse, data: string | Uint8Array): Promise<void> {
  return new Promise((resolve) => {
    if (res.destroyed) return resolve();
    res.write(data, () => resolve());
  });
}

function envelope(res: ServerResponse, status: number, code: string, message: string): void {
  const body = JSON.stringify({ data: null, error: { code, message, details: [] }, meta: { request_id: 'sse-test' } });
  res.writeHead(status, { 'Content-Type': 'application/json' }).end(body);
}
