// Fails when src/gen is not what @hey-api/openapi-ts makes of the committed openapi.json:
// generates into a scratch folder with the same config and compares file by file. (Whether
// openapi.json itself is the app's current document is checked first by `make client-check`,
// and by the Python suite: tests/contract/test_openapi.py.)
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const packageDir = dirname(dirname(fileURLToPath(import.meta.url)));
const committed = join(packageDir, 'src', 'gen');
const fresh = mkdtempSync(join(tmpdir(), 'hub-client-gen-'));

function files(root) {
  const found = new Map();
  const walk = (dir) => {
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, entry.name);
      if (entry.isDirectory()) walk(path);
      else found.set(relative(root, path), readFileSync(path, 'utf8'));
    }
  };
  walk(root);
  return found;
}

try {
  execFileSync(join(packageDir, 'node_modules', '.bin', 'openapi-ts'), ['--silent'], {
    cwd: packageDir,
    env: { ...process.env, HUB_CLIENT_OUTPUT: fresh },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  const want = files(fresh);
  const have = files(committed);
  const differing = [...new Set([...want.keys(), ...have.keys()])].filter((f) => want.get(f) !== have.get(f)).sort();
  if (differing.length > 0) {
    console.error(`clients/typescript/src/gen differs from a fresh generation (${differing.join(', ')}): run make client`);
    process.exitCode = 1;
  } else {
    console.log(`clients/typescript/src/gen is up to date (${have.size} files)`);
  }
} finally {
  rmSync(fresh, { recursive: true, force: true });
}
