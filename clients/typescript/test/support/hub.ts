/**
 * A real hub for the client tests: `joyhub serve --demo` from the repository's .venv, on a
 * free port, with a fresh DATA_DIR (so its own embedded PostgreSQL: nothing to set up on a
 * clean clone), stopped with SIGTERM afterwards so it stops its database too.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createWriteStream } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** clients/typescript (this file is compiled to dist/test/support/hub.js). */
export const PACKAGE_DIR = resolve(fileURLToPath(import.meta.url), '../../../..');
const REPO_DIR = resolve(PACKAGE_DIR, '../..');
const JOYHUB = process.env.JOYHUB_BIN ?? join(REPO_DIR, '.venv/bin/joyhub');
const START_TIMEOUT_MS = 90_000;
const STOP_TIMEOUT_MS = 30_000;

export interface ServedHub {
  baseUrl: string;
  /** The hub's JSON log lines so far (access log included). */
  logLines(): Promise<Array<Record<string, unknown>>>;
  stop(): Promise<void>;
}

export async function freePort(): Promise<number> {
  const server = createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const address = server.address();
  server.close();
  await once(server, 'close');
  if (address === null || typeof address === 'string') throw new Error('no port');
  return address.port;
}

/** Starts the hub and resolves once uvicorn says it serves (start-up is complete then). */
export async function startHub(options: { corsOrigins?: string } = {}): Promise<ServedHub> {
  const dataDir = await mkdtemp(join(tmpdir(), 'joyhub-client-test-'));
  const port = await freePort();
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    // the hub under test is configured here only (CI exports DATABASE_URL/REDIS_URL for pytest)
    if (!/^(DATABASE_|REDIS_|ADMIN_|PROMETHEUS_|JWT_|CORS_|JOYHUB_)/.test(key)) env[key] = value;
  }
  Object.assign(env, {
    DATA_DIR: dataDir,
    ENVIRONMENT: 'development',
    LOG_LEVEL: 'INFO',
    LOG_FORMAT: 'json',
    CORS_ORIGINS: options.corsOrigins ?? 'http://localhost:3000',
    SWEEP_INTERVAL_SECONDS: '3600',
    BCRYPT_ROUNDS: '4', // the minimum: the tests log in often, and hashing cost is not under test
  });
  const logPath = join(dataDir, 'hub.log');
  const log = createWriteStream(logPath);
  const proc = spawn(JOYHUB, ['serve', '--demo', '--host', '127.0.0.1', '--port', String(port)], {
    cwd: dataDir, // no stray .env from the checkout
    env,
    detached: true, // its own process group: the embedded PostgreSQL is stopped with it
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  proc.stderr?.pipe(log, { end: false });
  await new Promise<void>((ready, fail) => {
    const timer = setTimeout(() => fail(new Error(`hub not serving within ${START_TIMEOUT_MS} ms`)), START_TIMEOUT_MS);
    let seen = '';
    proc.stdout?.on('data', (chunk: Buffer) => {
      log.write(chunk);
      seen = (seen + chunk.toString('utf8')).slice(-4096);
      if (seen.includes('Uvicorn running on')) {
        clearTimeout(timer);
        ready();
      }
    });
    proc.once('exit', (code) => {
      clearTimeout(timer);
      fail(new Error(`hub exited during start-up (${code}); see ${logPath}`));
    });
  }).catch(async (error: unknown) => {
    await stop(proc);
    throw error;
  });
  return {
    baseUrl: `http://127.0.0.1:${port}`,
    async logLines() {
      const text = await readFile(logPath, 'utf8');
      return text
        .split('\n')
        .filter((line) => line.startsWith('{'))
        .map((line) => JSON.parse(line) as Record<string, unknown>);
    },
    async stop() {
      await stop(proc);
      log.end();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

async function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null || proc.pid === undefined) return;
  const exited = once(proc, 'exit');
  proc.kill('SIGTERM'); // the hub drains, then stops its embedded PostgreSQL itself
  const timer = setTimeout(() => {
    if (proc.pid !== undefined) process.kill(-proc.pid, 'SIGKILL'); // its whole process group
  }, STOP_TIMEOUT_MS);
  await exited;
  clearTimeout(timer);
}
