/**
 * Real third-party decoder exports, end to end, read in place from ../shared/models (see
 * shared-models.ts): for each export, the layers modc finds; an all-pass ungated compile
 * reproducing the original (SPEC.md's equivalence anchor, prefill and decode steps); a
 * random-router compile passing `modc verify` (the reference executor); and every runner
 * (run, generate, bench, eval, calibrate) driving it.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { lastRealOf, worstReal } from '../../compiler/apps/verify/verify.js';
import { loadModel } from '../../compiler/core/io/load.js';
import { decoderIo, resolvePadSide } from '../../compiler/metadata/decoder-io.js';
import { argmax, lastPosition, ModSession } from '../../compiler/runtime/session.js';
import { expectOneLineError, runCli, tempDir } from '../helpers.js';
import { tolerance } from '../mod-helpers.js';
import { REAL_EXPORTS, sharedModel } from './shared-models.js';

const tmp = tempDir('modc-interop');

describe.each(REAL_EXPORTS)('$name', (e) => {
  const path = sharedModel(e);
  const dir = join(tmp, e.name);
  const io = decoderIo(loadModel(path));
  const vocab = io.vocabSize ?? 32;
  const id = (i: number) => (i * 7 + 3) % vocab;
  const rows = e.batchOne ? [[1, 2, 3, 4, 5, 6].map(id)] : [[1, 2, 3, 4, 5, 6].map(id), [7, 8, 9].map(id), [10, 11, 12, 13].map(id)];
  const idsFlag = rows.map((r) => r.join(',')).join(';');
  const compiled = (tag: string) => join(dir, tag, 'model.onnx');

  it('inspect finds its layers', async () => {
    const res = await runCli('inspect', path, '--json');
    expect(res.stderr).toBe('');
    expect(JSON.parse(res.stdout).layers).toHaveLength(e.layers);
  });

  it('an all-pass ungated compile reproduces the original, prefill and 3 decode steps (the equivalence anchor)', async () => {
    const out = compiled('all-pass');
    const res = await runCli('compile', path, '-o', out, '--router-init', 'all-pass', '--ungated', '-q');
    expect(res.stderr).toBe('');
    const tol = await tolerance(path, 1e-4);
    const pad = resolvePadSide(io, undefined);
    const [original, mod] = [await ModSession.create(path), await ModSession.create(out)];
    const first = await original.forward(rows, { pad });
    expect(worstReal(first, await mod.forward(rows, { pad }), rows, pad)).toBeLessThanOrEqual(tol);
    let next = lastRealOf(first, rows, pad).map(argmax);
    for (let t = 0; t < 3; t++) {
      const a = lastPosition(await original.step(next));
      const b = lastPosition(await mod.step(next));
      const worst = Math.max(...a.map((row, r) => row.reduce((m, v, i) => Math.max(m, Math.abs(v - b[r]![i]!)), 0)));
      expect(worst, `decode step ${t + 1}`).toBeLessThanOrEqual(tol);
      next = a.map(argmax);
    }
  });

  it('a random-router compile passes modc verify: the reference executor and the anchor, prefill and 3 decode steps', async () => {
    const res = await runCli('compile', path, '-o', compiled('random'), '--router-init', 'random', '-q');
    expect(res.stderr).toBe('');
    // The export's own prompt rows: ids within its vocabulary, one row where it runs one row per call.
    const verified = await runCli('verify', path, compiled('random'), '--ids', idsFlag, '--steps', '3', '--json');
    expect(verified.stderr).toBe('');
    const report = JSON.parse(verified.stdout) as { checks: { name: string; passed: boolean; maxDiff: number[] }[] };
    expect(report.checks.map((c) => [c.name, c.passed, c.maxDiff.length])).toEqual([
      ['semantics', true, 4],
      ['anchor', true, 4],
    ]);
    expect(verified.code).toBe(0);
  });

  it('run, generate, bench, eval and calibrate drive the original and the compiled model', async () => {
    const random = compiled('random');
    for (const model of [path, random]) {
      const run = await runCli('run', model, '--ids', idsFlag, '--json');
      expect(run.stderr, `run ${model}`).toBe('');
      expect(JSON.parse(run.stdout).dims).toEqual([rows.length, Math.max(...rows.map((r) => r.length)), vocab]);
      const gen = await runCli('generate', model, '--ids', idsFlag, '--max-new', '2', '--json');
      expect(gen.stderr, `generate ${model}`).toBe('');
      expect(JSON.parse(gen.stdout).ids.map((r: number[]) => r.length)).toEqual(rows.map((r) => r.length + 2));
    }
    const bench = await runCli('bench', path, random, '--prompt', '8', '--steps', '2', '--runs', '1', '--warmup', '0', '--json');
    expect(bench.stderr).toBe('');
    expect(bench.code).toBe(0);
    const data = join(dir, 'data.jsonl');
    const lines = Array.from({ length: 6 }, (_, s) => Array.from({ length: 5 + s }, (_, t) => id(13 * s + t + 1)));
    writeFileSync(data, lines.map((ids) => JSON.stringify({ ids })).join('\n') + '\n');
    for (const model of [path, random]) {
      const evaluated = await runCli('eval', model, '--data', data, '--json');
      expect(evaluated.stderr, `eval ${model}`).toBe('');
      expect(JSON.parse(evaluated.stdout).tokens).toBeGreaterThan(0);
    }
    const routers = join(dir, 'routers.safetensors');
    const calibrated = await runCli('calibrate', path, '--data', data, '-o', routers, '--target-compute', '0.8', '--sensitivity-tokens', '16', '-q');
    expect(calibrated.stderr).toBe('');
    expect(calibrated.code).toBe(0);
    if (e.batchOne) expectOneLineError(await runCli('run', path, '--ids', '1,2;3,4'), 1, /this model runs one row at a time/);
  });
});
