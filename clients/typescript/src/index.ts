/**
 * The Joyfull UI Hub client: the generated functions and types (`gen/`, from the hub's OpenAPI
 * by `make client`; never edit them) and the small hand-written layer generation cannot give —
 * a session that renews its token (`session.ts`), the streamed-invocation reader (`sse.ts`) and
 * typed response headers (`headers.ts`).
 */
export * from './gen/index.js';
export { client as defaultClient } from './gen/client.gen.js';
export type { Client } from './gen/client/index.js';
export { createHub, Session, type Hub, type HubOptions } from './session.js';
export {
  HubError,
  invokeStream,
  readEvents,
  StreamProtocolError,
  type InvokeStreamOptions,
  type ReadOptions,
  type StreamDone,
  type StreamEvent,
  type StreamFailure,
} from './sse.js';
export { isReplayed, quotaOf, rateLimitOf, retryAfterSeconds, type Quota, type RateLimit } from './headers.js';

/** Every error answer's body: `{data: null, error: {code, message, details}, meta}`. */
export type { EnvelopeNoneType as ErrorEnvelope } from './gen/types.gen.js';
