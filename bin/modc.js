#!/usr/bin/env node
// The modc command. The TypeScript sources are compiled to dist/ by `npm install` (prepare).
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const entry = new URL('../dist/compiler/cli/main.js', import.meta.url);
if (!existsSync(fileURLToPath(entry))) {
  process.stderr.write('modc: not built yet: run `npm install` (or `npm run build`) in the modc folder\n');
  process.exit(1);
}
// A reader that stops early (`modc run ... --json | head`) is not an error.
process.stdout.on('error', (e) => {
  if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  throw e;
});
const { main, relaunchForBench } = await import(entry.href);
const argv = process.argv.slice(2);
// `modc bench` measures under the benchmarks' malloc settings: glibc reads them at start-up only,
// so it runs itself again with them set (see `modc bench --help`).
process.exitCode = relaunchForBench(fileURLToPath(import.meta.url), argv) ?? (await main(argv));
