/**
 * The fuzzer's short run: a fixed seed, 500 mutated fixtures (those under 2 MB) through load -> inspect -> analyse ->
 * compile -> save -> reload, a sample loaded in ONNX Runtime. Any crash (an error that is not a
 * ModcError), hang, multi-line message, or output ONNX Runtime rejects while it loads the input
 * fails the suite, with the reproducing case in the message. The long run is `npm run fuzz`.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fuzz } from './fuzz/pool.js';
import { seedModels } from './fuzz/seeds.js';

const scratch = mkdtempSync(join(tmpdir(), 'modc-fuzz-test-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

describe('mutation fuzzing (short run)', () => {
  it('500 cases, seed 12: no crash, hang, multi-line error or output ONNX Runtime rejects', async () => {
    const stats = await fuzz({ fixtures: seedModels(scratch, [], 2 ** 21), seed: 12, cases: 500, workers: 2, ortSample: 0.1, timeoutMs: 60_000 });
    const report = stats.failures.map(
      (f) => `${f.kind} x${f.count} at ${f.stage} (seed ${f.seed}, case ${f.index}, ${f.fixture}): ${f.message.split('\n')[0]} [${f.log.join('; ')}]`,
    );
    expect(report).toEqual([]);
    expect(stats.cases).toBe(500);
    // The run exercised both sides: inputs refused, and outputs compiled, saved and loaded back.
    expect(stats.outcomes.refused).toBeGreaterThan(100);
    expect(stats.outcomes.accepted).toBeGreaterThan(25);
    expect(stats.ortInputLoaded).toBeGreaterThan(0);
  }, 600_000);
});
