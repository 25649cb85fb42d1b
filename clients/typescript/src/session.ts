/**
 * A configured client for the hub, and the one thing generation cannot do: keep a login alive.
 *
 * Access tokens live 15–60 minutes; refresh tokens are single-use and rotate (API.md §2): each
 * `POST /auth/refresh` retires the token it was given, and presenting a retired one again is
 * treated as theft — the whole session is revoked. So when several calls fail at once because
 * the access token expired, exactly ONE refresh may be sent (single flight), and every call then
 * retries with the new access token. A second refresh with the same token would end the
 * session the first one just renewed.
 *
 * The generated functions take the client: `toolsList({ client: hub.client })`. Or pass the
 * generated default `client` as `options.client` and call them without it.
 */
import { authRefresh } from './gen/sdk.gen.js';
import type { Client } from './gen/client/index.js';
import { createClient, createConfig } from './gen/client/index.js';
import type { TokenPair } from './gen/types.gen.js';

export interface HubOptions {
  /** The hub's origin, e.g. `http://127.0.0.1:8000` (the API paths carry `/api/v1`). */
  baseUrl: string;
  /** A script's credential (`jfui_…`): sent as the bearer token; never refreshed. */
  apiKey?: string;
  /** A stored login to resume (for example from `sessionStorage`). */
  tokens?: TokenPair;
  /**
   * Called with the new pair after every rotation (persist it: the previous refresh token no
   * longer works), and with `null` when the session has ended (refresh refused: log in again).
   */
  onTokens?: (tokens: TokenPair | null) => void;
  /** The transport; defaults to `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** Configure this client (e.g. the generated default `client`) instead of a new one. */
  client?: Client;
}

export interface Hub {
  client: Client;
  session: Session;
}

/** Builds a client that sends the session's credential and refreshes it when it expires. */
export function createHub(options: HubOptions): Hub {
  const transport = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
  const client = options.client ?? createClient(createConfig());
  const session = new Session(client, transport, options);
  client.setConfig({
    baseUrl: options.baseUrl,
    fetch: session.fetch,
    // the generated functions of authenticated routes ask for `bearer` (and `X-API-Key`, which
    // the same credential would duplicate): answer the first only
    auth: (scheme) => (scheme.scheme === 'bearer' ? session.credential : undefined),
  });
  return { client, session };
}

/** The credential of one hub client: an API key, or a login's rotating token pair. */
export class Session {
  #tokens: TokenPair | undefined;
  #refreshing: Promise<string | undefined> | undefined;
  readonly #apiKey: string | undefined;
  readonly #client: Client;
  readonly #transport: typeof fetch;
  readonly #onTokens: ((tokens: TokenPair | null) => void) | undefined;

  constructor(client: Client, transport: typeof fetch, options: HubOptions) {
    this.#client = client;
    this.#transport = transport;
    this.#apiKey = options.apiKey;
    this.#tokens = options.tokens;
    this.#onTokens = options.onTokens;
  }

  /** The bearer credential sent now: the API key, or the current access token. */
  get credential(): string | undefined {
    return this.#apiKey ?? this.#tokens?.access_token;
  }

  get tokens(): TokenPair | undefined {
    return this.#tokens;
  }

  /** Start using a pair from `authLogin`, `authRegister`, a password change or a reset. */
  signIn(tokens: TokenPair): void {
    this.#tokens = tokens;
    this.#onTokens?.(tokens);
  }

  /** Forget the pair locally (call `authLogout` first to end it on the hub too). */
  signOut(): void {
    this.#tokens = undefined;
    this.#onTokens?.(null);
  }

  /**
   * A new access token after `rejected` was refused: the one a refresh already in flight will
   * bring, the one a refresh brought since `rejected` was sent, or a fresh refresh's.
   * `undefined` when there is nothing to refresh or the hub refused the refresh token.
   */
  renew(rejected?: string): Promise<string | undefined> {
    if (this.#apiKey !== undefined) return Promise.resolve(undefined);
    const current = this.#tokens?.access_token;
    if (current !== undefined && rejected !== undefined && current !== rejected) {
      return Promise.resolve(current); // renewed while the refused call was on its way
    }
    this.#refreshing ??= this.#refresh().finally(() => {
      this.#refreshing = undefined;
    });
    return this.#refreshing;
  }

  async #refresh(): Promise<string | undefined> {
    const tokens = this.#tokens;
    if (tokens === undefined) return undefined;
    const { data, response } = await authRefresh({
      client: this.#client,
      body: { refresh_token: tokens.refresh_token },
      fetch: this.#transport, // not this.fetch: a refused refresh is not retried
    });
    if (data !== undefined) {
      this.signIn(data.data);
      return data.data.access_token;
    }
    if (response !== undefined && response.status === 401 && this.#tokens === tokens) {
      this.signOut(); // INVALID_REFRESH_TOKEN: expired, revoked or reused; log in again
    }
    return undefined; // network failure or 5xx: keep the pair, the next call tries again
  }

  /**
   * The client's transport: sends the request; on 401 `INVALID_TOKEN` for the access token it
   * carried, renews the token (single flight) and sends the request once more.
   */
  readonly fetch = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const request = new Request(input, init);
    const sent = bearerOf(request);
    const mayRenew = sent !== undefined && this.#apiKey === undefined && sent === this.#tokens?.access_token;
    const replay = mayRenew ? request.clone() : undefined; // a body can be sent only once
    const response = await this.#transport(request);
    if (replay === undefined || response.status !== 401 || !(await isExpiredToken(response))) {
      return response;
    }
    const renewed = await this.renew(sent);
    if (renewed === undefined) return response;
    const headers = new Headers(replay.headers);
    headers.set('Authorization', `Bearer ${renewed}`);
    return this.#transport(new Request(replay, { headers }));
  };
}

function bearerOf(request: Request): string | undefined {
  const value = request.headers.get('Authorization');
  return value?.startsWith('Bearer ') ? value.slice('Bearer '.length) : undefined;
}

/** 401 `INVALID_TOKEN` (expired or revoked access token), not a wrong password or the like. */
async function isExpiredToken(response: Response): Promise<boolean> {
  try {
    const body: unknown = await response.clone().json();
    return (body as { error?: { code?: unknown } } | null)?.error?.code === 'INVALID_TOKEN';
  } catch {
    return false;
  }
}
