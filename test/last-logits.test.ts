/**
 * last-logits (`modc compile --logits last`): the lm_head runs for each row's last real token
 * only. On every model in fixtures/ (ours and the vendored third-party ones; the quick project
 * takes QUICK_MODELS, the slow one the rest, as for test/mod.test.ts), alone and in the MoD
 * pipeline:
 * - the prefill gives [B, 1, V], equal to the full-logits model's logits at each row's last
 *   real position (left and right padding, batch 3 with rows of different lengths);
 * - decode steps are unchanged;
 * - the runtime (ModSession.generate, modc run, modc verify) handles both kinds of model.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { logitsPositions } from '../compiler/metadata/logits-metadata.js';
import { runPipeline } from '../compiler/passes/pass-manager.js';
import { planRouting } from '../compiler/routing/routing-plan.js';
import { ModSession, type Logits } from '../compiler/runtime/session.js';
import { defaultRegistry, lastLogitsPass, modPipeline } from '../compiler/passes/pipeline.js';
import { allModels, contractModels, expectOneLineError, runCli, tempDir } from './helpers.js';
import { padSides, tolerance } from './mod-helpers.js';

const tmp = tempDir('modc-last-logits');
let counter = 0;

function save(model: ReturnType<typeof loadModel>): string {
  const path = join(tmp, `m${counter++}`, 'model.onnx');
  saveModel(model, path);
  return path;
}

/** The model alone with last-logits (`--passes last-logits`). */
function lastOnly(source: string): string {
  const model = loadModel(source);
  runPipeline(model, defaultRegistry().parsePipeline('last-logits,cleanup'));
  return save(model);
}

/** The MoD compile (random routers, threshold 0.5, gated), with all or last logits. */
function modCompile(source: string, logits: 'all' | 'last'): string {
  const model = loadModel(source);
  const s = analyzeDecoder(model);
  const plan = planRouting({ numLayers: s.layers.length, hiddenSize: s.hiddenSize, routers: { kind: 'random', seed: 5 } });
  runPipeline(model, modPipeline({ plan, logits }));
  return save(model);
}

/** Row r's logits at position t of a [B, S, V] result. */
const at = (l: Logits, r: number, t: number) => l.data.subarray((r * l.dims[1] + t) * l.dims[2], (r * l.dims[1] + t + 1) * l.dims[2]);

function maxDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let worst = 0;
  for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
  return worst;
}

const ROWS = [
  [5, 6, 7, 8, 9, 10, 11],
  [12, 13, 14],
  [15, 16, 17, 18, 19],
];
const FORCED = [3, 1, 4, 1];

/** Prefill and 4 forced steps on both; the last-only model matches the full one at each row's last real token. */
async function expectSameLastLogits(fullPath: string, lastPath: string, pad: 'left' | 'right', tol: number): Promise<void> {
  const [full, last] = await Promise.all([ModSession.create(fullPath), ModSession.create(lastPath)]);
  expect(full.logits).toBe('all');
  expect(last.logits).toBe('last');
  const a = await full.forward(ROWS, { pad });
  const b = await last.forward(ROWS, { pad });
  const [B, S, V] = a.dims;
  expect(S).toBe(7);
  expect(b.dims).toEqual([B, 1, V]);
  ROWS.forEach((row, r) => {
    const t = pad === 'left' ? S - 1 : row.length - 1;
    expect(maxDiff(at(a, r, t), at(b, r, 0)), `row ${r}, pad ${pad}`).toBeLessThan(tol);
  });
  for (const [i, id] of FORCED.entries()) {
    const sa = await full.step(ROWS.map(() => id));
    const sb = await last.step(ROWS.map(() => id));
    expect(sb.dims).toEqual(sa.dims);
    expect(maxDiff(sa.data, sb.data), `step ${i + 1}, pad ${pad}`).toBeLessThan(tol);
  }
  expect(last.layerCacheLengths()).toEqual(full.layerCacheLengths());
  expect(last.kvBytes()).toBe(full.kvBytes());
}

describe.each(contractModels())('$name', ({ path }) => {
  it("last-logits alone gives each row's last real token, [B, 1, V]; decode steps unchanged", async () => {
    const tol = await tolerance(path, 1e-4); // fp16: 1e-2 scaled to the logits
    const last = lastOnly(path);
    expect(logitsPositions(loadModel(last))).toBe('last');
    expect(padSides(path).length).toBeGreaterThan(0);
    for (const pad of padSides(path)) await expectSameLastLogits(path, last, pad, tol);
  });

  it('the MoD pipeline with --logits last equals the same compile with all logits at the last real token', async () => {
    const tol = await tolerance(path, 1e-4); // fp16: 1e-2 scaled to the logits
    const [all, last] = [modCompile(path, 'all'), modCompile(path, 'last')];
    for (const pad of padSides(path)) await expectSameLastLogits(all, last, pad, tol);
  });
});

// Once per full run: in the quick project (the slow one runs this file for its other models), and
// registered only there, so the slow project does not list it as skipped.
const describeOnce = (process.env.MODC_TEST_MODELS !== 'rest' ? describe : () => undefined) as typeof describe;
describeOnce('last-logits in the tools', () => {
  const llama = allModels().find((m) => m.name === 'fixtures/llama-tiny')!.path;

  it('running the pass twice changes nothing the second time', () => {
    const model = loadModel(llama);
    expect(runPipeline(model, [{ pass: lastLogitsPass, options: {} }])[0]!.changed).toBe(true);
    const nodes = model.graph.nodes.length;
    const [again] = runPipeline(model, [{ pass: lastLogitsPass, options: {} }]);
    expect(again!.changed).toBe(false);
    expect(model.graph.nodes.length).toBe(nodes);
  });

  it('generate picks the same tokens from both kinds of model, right padding included', async () => {
    const [full, last] = [modCompile(llama, 'all'), modCompile(llama, 'last')];
    for (const pad of ['left', 'right'] as const) {
      const a = await (await ModSession.create(full)).generate(ROWS, { maxNewTokens: 6, pad });
      const b = await (await ModSession.create(last)).generate(ROWS, { maxNewTokens: 6, pad });
      expect(b.ids).toEqual(a.ids);
      a.steps.forEach((rows, t) => rows.forEach((l, r) => expect(maxDiff(l, b.steps[t]![r]!), `step ${t} row ${r}`).toBeLessThan(1e-4)));
    }
  });

  it('modc compile --logits last, then modc run and modc verify handle the model', async () => {
    const out = join(tmp, 'cli', 'model.onnx');
    const res = await runCli('compile', llama, '-o', out, '--router-init', 'random', '--seed', '3', '--logits', 'last', '-q');
    expect(res.code, res.stderr).toBe(0);
    const run = await runCli('run', out, '--ids', '5,6,7;8,9', '--pad', 'right', '--json');
    expect(run.code, run.stderr).toBe(0);
    const json = JSON.parse(run.stdout) as { dims: number[]; positions: string; logits: number[][][] };
    expect(json.positions).toBe('last');
    expect(json.dims).toEqual([2, 1, 512]);
    const verify = await runCli('verify', llama, out, '--steps', '3', '--pad', 'right', '--json');
    expect(verify.code, verify.stdout + verify.stderr).toBe(0);
    expect((JSON.parse(verify.stdout) as { passed: boolean }).passed).toBe(true);
  });

  it('bad --logits values and --logits with --passes are usage errors', async () => {
    const out = join(tmp, 'bad', 'model.onnx');
    expectOneLineError(await runCli('compile', llama, '-o', out, '--router-init', 'all-pass', '--logits', 'first'), 2, /--logits must be one of all, last/);
    expectOneLineError(await runCli('compile', llama, '-o', out, '--passes', 'cleanup', '--logits', 'last'), 2, /name last-logits in LIST/);
  });
});
