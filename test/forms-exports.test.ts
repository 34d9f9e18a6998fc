/**
 * Forms of third-party exports rebuilt with the fixture builder (fixtures/builder), so that
 * `npm test` covers them without the exports themselves (test/interop runs those in place):
 * state outside every layer, a shared prefix reading a layer's cache, a fused embedding sum,
 * a batch-1-only mask, and what `modc verify` says about a model it cannot check.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { buildFormDecoder, writeFormModel } from '../fixtures/builder/forms.js';
import { runCli, tempDir } from './helpers.js';

const tmp = tempDir('modc-forms-exports');
const CONFIG = { hiddenSize: 64, numLayers: 3, numHeads: 4, numKvHeads: 2, intermediateSize: 64, vocabSize: 256, maxPositions: 256 };
const SEED = 20240601;

interface Report {
  passed: boolean;
  checks: { name: string; passed: boolean; maxDiff: number[] }[];
}

/** Compiles `source` with `args` into `tag`, then `modc verify --steps N --json` must pass both checks. */
async function compileAndVerify(source: string, tag: string, args: string[], steps = 3): Promise<Report> {
  const out = join(tmp, tag, 'model.onnx');
  const compiled = await runCli('compile', source, '-o', out, '-q', ...args);
  expect(compiled.stderr).toBe('');
  expect(compiled.code).toBe(0);
  const verified = await runCli('verify', source, out, '--steps', String(steps), '--json');
  expect(verified.stderr).toBe('');
  const report = JSON.parse(verified.stdout) as Report;
  expect(report.checks.map((c) => [c.name, c.passed, c.maxDiff.length]), verified.stdout).toEqual([
    ['semantics', true, steps + 1],
    ['anchor', true, steps + 1],
  ]);
  expect(verified.code).toBe(0);
  return report;
}

describe('GroupQueryAttention decoder with state outside every layer, added into the logits', () => {
  const model = writeFormModel(buildFormDecoder(CONFIG, SEED, { attention: 'gqa', suffixState: true }), join(tmp, 'suffix-state', 'model.onnx'));

  it('the state belongs to no layer: the analysis finds none in the layers, the I/O contract carries both tensors', () => {
    const m = loadModel(model);
    expect(analyzeDecoder(m).layers.map((l) => l.state.length)).toEqual([0, 0, 0]);
    expect(decoderIo(m).state.map((s) => s.past)).toEqual(['past_key_values.0.conv_state', 'past_key_values.0.recurrent_state']);
  });

  it('an all-pass ungated compile verifies against the reference, prefill and 3 decode steps', async () => {
    await compileAndVerify(model, 'suffix-state-ap', ['--router-init', 'all-pass', '--ungated']);
  });

  it('a random-router compile verifies against the reference', async () => {
    await compileAndVerify(model, 'suffix-state-random', ['--router-init', 'random']);
  });
});
