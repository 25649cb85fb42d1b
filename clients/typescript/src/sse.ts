/**
 * Streamed invocations (API.md §5.1): a reader of the hub's Server-Sent Events.
 *
 * `POST /tools/{id}/invoke` with `stream: true` answers `200 text/event-stream`:
 *   event: chunk   data: <one upstream chunk, JSON>      (any number, in order)
 *   event: done    data: {invocation_id, tool_id, status, tokens_used, token_source, duration_ms}
 *   event: error   data: {code, message, invocation_id, tokens_used}   (a failure after a chunk)
 * with `: ping` comment lines while the upstream is silent. Refusals (§5's order) are the usual
 * JSON envelope. `EventSource` cannot POST or send `Authorization`, so this reads a `fetch`
 * body stream instead — the same code in Node and in the browser.
 *
 * Use `invokeStream` for `stream: true`, not the generated `toolsInvoke`: OpenAPI gives the
 * generated function one success type, the JSON `Invocation`, and it would read the whole event
 * stream as one string before handing it back. Without `stream: true`, `toolsInvoke` answers as
 * before — a streaming tool's `Invocation` then has `output: {chunks: [...]}`.
 *
 * Parsing follows the WHATWG event-stream rules: lines end in CRLF, LF or CR; a field's value
 * loses one leading space; several `data:` lines join with "\n"; a blank line dispatches; a
 * comment starts with ":"; an unfinished event at the end of the body is dropped. Bytes may
 * arrive split anywhere, inside a line or inside a UTF-8 character.
 */
import type { Client } from './gen/client/index.js';
import type { EnvelopeNoneType, InvokeRequest } from './gen/types.gen.js';

export interface StreamDone {
  invocation_id: string;
  tool_id: string;
  status: 'success';
  tokens_used: number;
  token_source: 'reported' | 'estimated';
  duration_ms: number;
}

export interface StreamFailure {
  code: string;
  message: string;
  invocation_id: string;
  tokens_used: number;
}

export type StreamEvent =
  | { event: 'chunk'; data: Record<string, unknown> }
  | { event: 'done'; data: StreamDone }
  | { event: 'error'; data: StreamFailure };

export interface ReadOptions {
  /** Each comment line's text (`ping` for the hub's keep-alive), e.g. to show "still working". */
  onComment?: (text: string) => void;
}

/** The stream broke the protocol, or ended before its `done` or `error` event. */
export class StreamProtocolError extends Error {
  override name = 'StreamProtocolError';
}

/** A refusal of a streamed call, answered as the JSON envelope (402, 404, 429, …). */
export class HubError extends Error {
  override name = 'HubError';
  readonly status: number;
  readonly code: string;
  readonly details: Array<Record<string, unknown>>;
  readonly requestId: string;
  readonly response: Response;

  constructor(response: Response, envelope: EnvelopeNoneType | undefined) {
    const error = envelope?.error;
    super(error?.message ?? `HTTP ${response.status}`);
    this.status = response.status;
    this.code = error?.code ?? 'HTTP_ERROR';
    this.details = error?.details ?? [];
    this.requestId = envelope?.meta.request_id ?? response.headers.get('X-Request-ID') ?? '';
    this.response = response;
  }
}

const KNOWN = new Set(['chunk', 'done', 'error']);

/**
 * The §5.1 events of a body stream, in order, ending with its `done` or `error` event (after
 * which the body is released). Throws `StreamProtocolError` when the body ends first — the
 * connection dropped — or an event's data is not JSON. Unknown event types are skipped.
 */
export async function* readEvents(
  body: ReadableStream<Uint8Array>,
  options: ReadOptions = {},
): AsyncGenerator<StreamEvent, void, undefined> {
  const reader = body.getReader();
  const decoder = new TextDecoder('utf-8'); // strips a leading BOM, as the SSE rules ask
  let buffer = '';
  let type = '';
  let data: string[] = [];
  try {
    for (;;) {
      const { value, done } = await read(reader);
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let start = 0;
      for (;;) {
        const cr = buffer.indexOf('\r', start);
        const lf = buffer.indexOf('\n', start);
        const end = cr === -1 ? lf : lf === -1 ? cr : Math.min(cr, lf);
        if (end === -1) break;
        // a CR last in the buffer may be the first half of a CRLF split between two reads
        if (end === cr && end === buffer.length - 1 && !done) break;
        const line = buffer.slice(start, end);
        start = end + (buffer[end] === '\r' && buffer[end + 1] === '\n' ? 2 : 1);
        if (line === '') {
          if (data.length > 0 && KNOWN.has(type)) {
            const event = parse(type, data.join('\n'));
            yield event;
            if (event.event !== 'chunk') return; // the last event: the body is let go below
          }
          type = '';
          data = [];
        } else if (line.startsWith(':')) {
          options.onComment?.(line.slice(1).replace(/^ /, ''));
        } else {
          const colon = line.indexOf(':');
          const field = colon === -1 ? line : line.slice(0, colon);
          const fieldValue = colon === -1 ? '' : line.slice(colon + 1).replace(/^ /, '');
          if (field === 'event') type = fieldValue;
          else if (field === 'data') data.push(fieldValue);
          // `id` and `retry` mean nothing here: a POST is never resumed by the client
        }
      }
      buffer = buffer.slice(start);
      if (done) break;
    }
    throw new StreamProtocolError('the stream ended before its done or error event');
  } finally {
    // after the last event, on a protocol error, or when the consumer stopped early (`break`):
    // closing the body hangs up, which the hub treats as the caller leaving (§5.1)
    await reader.cancel().catch(() => undefined);
  }
}

/** The next bytes; a connection lost mid-body is a `StreamProtocolError` (an abort stays one). */
async function read(reader: ReadableStreamDefaultReader<Uint8Array>): Promise<ReadableStreamReadResult<Uint8Array>> {
  try {
    return await reader.read();
  } catch (error) {
    if ((error as { name?: unknown } | null)?.name === 'AbortError') throw error;
    throw new StreamProtocolError('the stream was interrupted', { cause: error });
  }
}

function parse(type: string, text: string): StreamEvent {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    throw new StreamProtocolError(`event ${type}: data is not JSON`);
  }
  if (typeof data !== 'object' || data === null || Array.isArray(data)) {
    throw new StreamProtocolError(`event ${type}: data is not a JSON object`);
  }
  return { event: type, data } as StreamEvent;
}

export interface InvokeStreamOptions extends ReadOptions {
  /** A client from `createHub` (its session's credential is sent, and renewed on expiry). */
  client: Client;
  toolId: string;
  input: Record<string, unknown>;
  /** Makes a retry safe; a finished stream is replayed under the same key (§5.1). */
  idempotencyKey?: string;
  /** Abort to hang up: the hub stops the upstream and charges what was relayed until then. */
  signal?: AbortSignal;
}

/**
 * A streamed invocation: its events, or a `HubError` when the hub refused it before streaming.
 * `response` (for the `X-Quota-*` headers) is handed to `onResponse` before the first event.
 */
export async function* invokeStream(
  options: InvokeStreamOptions & { onResponse?: (response: Response) => void },
): AsyncGenerator<StreamEvent, void, undefined> {
  const headers: Record<string, string> = { Accept: 'text/event-stream', 'Content-Type': 'application/json' };
  if (options.idempotencyKey !== undefined) headers['Idempotency-Key'] = options.idempotencyKey;
  const result = await options.client.post<ReadableStream<Uint8Array>, EnvelopeNoneType, false>({
    url: '/api/v1/tools/{tool_id}/invoke',
    path: { tool_id: options.toolId },
    body: { input: options.input, stream: true } satisfies InvokeRequest, // fails to build if §5.1's body changes
    headers,
    security: [{ scheme: 'bearer', type: 'http' }],
    parseAs: 'stream',
    signal: options.signal ?? null,
  });
  const response: Response | undefined = result.response;
  if (response === undefined) throw result.error; // the request never got an answer
  if (!response.ok) throw new HubError(response, result.error as EnvelopeNoneType | undefined);
  const type = response.headers.get('Content-Type') ?? '';
  if (!type.startsWith('text/event-stream') || result.data === undefined || result.data === null) {
    await response.body?.cancel();
    throw new StreamProtocolError(`expected text/event-stream, got ${type || 'no body'}`);
  }
  options.onResponse?.(response);
  yield* readEvents(result.data, options);
}
