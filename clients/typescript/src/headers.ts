/**
 * Typed readers of the response headers the dashboard shows (API.md §4.1, §5). OpenAPI types
 * bodies, not headers, so the generated client hands back a plain `Response`: these read it.
 * On another origin, the hub's CORS `expose_headers` is what lets JavaScript see them at all.
 */

/** `X-Quota-*`: the caller's tokens this billing period (on invoke answers to a subscriber). */
export interface Quota {
  limit: number;
  remaining: number;
  /** End of the billing period. */
  reset: Date;
}

/** `X-RateLimit-*`: the per-minute limit with the fewest requests left (§4.1). */
export interface RateLimit {
  limit: number;
  remaining: number;
  /** Seconds until the bucket is full again. */
  resetSeconds: number;
}

export function quotaOf(response: Response): Quota | undefined {
  const limit = intHeader(response, 'X-Quota-Limit');
  const remaining = intHeader(response, 'X-Quota-Remaining');
  const reset = response.headers.get('X-Quota-Reset');
  if (limit === undefined || remaining === undefined || reset === null) return undefined;
  const when = new Date(reset);
  return Number.isNaN(when.getTime()) ? undefined : { limit, remaining, reset: when };
}

export function rateLimitOf(response: Response): RateLimit | undefined {
  const limit = intHeader(response, 'X-RateLimit-Limit');
  const remaining = intHeader(response, 'X-RateLimit-Remaining');
  const resetSeconds = intHeader(response, 'X-RateLimit-Reset');
  if (limit === undefined || remaining === undefined || resetSeconds === undefined) return undefined;
  return { limit, remaining, resetSeconds };
}

/** `Retry-After` in seconds (delta-seconds, or an HTTP date counted from now). */
export function retryAfterSeconds(response: Response, now: Date = new Date()): number | undefined {
  const value = response.headers.get('Retry-After')?.trim();
  if (!value) return undefined;
  if (/^\d+$/.test(value)) return Number(value);
  const when = Date.parse(value);
  return Number.isNaN(when) ? undefined : Math.max(0, Math.ceil((when - now.getTime()) / 1000));
}

/** `Idempotent-Replayed: true`: the answer is the stored first one (no new call, no charge). */
export function isReplayed(response: Response): boolean {
  return response.headers.get('Idempotent-Replayed') === 'true';
}

function intHeader(response: Response, name: string): number | undefined {
  const value = response.headers.get(name)?.trim();
  return value !== undefined && /^-?\d+$/.test(value) ? Number(value) : undefined;
}
