/**
 * A streamed invocation as API.md §5.1 frames it, in bytes, with the events a reader must
 * find in it. It uses every part of the framing a reader has to get right: `: ping`
 * comments, CRLF and CR line ends, a `data:` split over two lines, fields without the optional
 * space, `id:`/`retry:` fields and an unknown event type (both to be ignored), and text whose
 * UTF-8 bytes a transport may split inside a character.
 */
import type { StreamEvent } from '../../src/index.js';

export const INVOCATION_ID = '6f1c3f0e-8d7a-4f43-9b1e-0c2d7e9a5b11';
export const TOOL_ID = '0b8e2a1c-5d4f-4e6a-8c3b-9f7d1e2a4c6b';

const FRAMES: string[] = [
  ': ping\n\n',
  'event: chunk\ndata: {"delta": "Bonjour"}\n\n',
  'id: 1\r\nretry: 1000\r\nevent: chunk\r\ndata: {"delta": ", ça va"}\r\n\r\n',
  'event: progress\ndata: {"percent": 50}\n\n', // unknown to §5.1: skipped
  ': ping\n\n',
  'event:chunk\rdata:{"delta": " — très bien 🎉",\rdata: "n": 3}\r\r',
  `event: done\ndata: {"invocation_id": "${INVOCATION_ID}", "tool_id": "${TOOL_ID}", "status": "success", "tokens_used": 12, "token_source": "reported", "duration_ms": 40}\n\n`,
];

export const STREAM_TEXT = FRAMES.join('');
export const STREAM_BYTES = new TextEncoder().encode(STREAM_TEXT);
export const FRAME_BYTES = FRAMES.map((frame) => new TextEncoder().encode(frame));
export const PINGS = 2;

export const EXPECTED: StreamEvent[] = [
  { event: 'chunk', data: { delta: 'Bonjour' } },
  { event: 'chunk', data: { delta: ', ça va' } },
  { event: 'chunk', data: { delta: ' — très bien 🎉', n: 3 } },
  {
    event: 'done',
    data: {
      invocation_id: INVOCATION_ID,
      tool_id: TOOL_ID,
      status: 'success',
      tokens_used: 12,
      token_source: 'reported',
      duration_ms: 40,
    },
  },
];

/** A body stream that hands the bytes over in the given pieces. */
export function streamOf(...pieces: Uint8Array[]): ReadableStream<Uint8Array> {
  let next = 0;
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      const piece = pieces[next++];
      if (piece === undefined) controller.close();
      else controller.enqueue(piece);
    },
  });
}
