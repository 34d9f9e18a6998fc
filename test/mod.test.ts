/**
 * The MoD contract of SPEC.md, on every model in fixtures/ (ours and the vendored third-party ones):
 * - equivalence anchor: all tokens selected, ungated, reproduces the original (prefill and
 *   every step of a greedy run, batch 1 and batch 3 with padding on each supported side);
 * - MoD semantics: with random routers selecting about half the tokens, the compiled model
 *   agrees with the reference executor (threshold-p and top-k, gated and ungated), prefill and
 *   decode, with the same per-layer cache lengths and KV bytes.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/io/load.js';
import { saveModel } from '../compiler/io/save.js';
import { runPipeline } from '../compiler/pass-manager.js';
import { ModReference } from '../compiler/reference/mod-reference.js';
import { planRouting, type RoutingMode } from '../compiler/routing-plan.js';
import { argmax, lastPosition, ModSession, type Logits } from '../compiler/runtime/session.js';
import { modPipeline } from '../passes/index.js';
import { routingPlanOf, worstReal as realDiff } from '../compiler/verify.js';
import { allModels, contractModels, tempDir } from './helpers.js';

const tmp = tempDir('modc-mod');
let counter = 0;

interface Compiled {
  path: string;
  plan: ReturnType<typeof planRouting>;
}

function compile(source: string, routers: 'all-pass' | 'random', opts: { mode?: RoutingMode; gated: boolean; threshold?: number; capacity?: number }): Compiled {
  const model = loadModel(source);
  const s = analyzeDecoder(model);
  const plan = planRouting({
    numLayers: s.layers.length, hiddenSize: s.hiddenSize,
    routers: routers === 'all-pass' ? { kind: 'all-pass' } : { kind: 'random', seed: 11 },
    mode: opts.mode, gated: opts.gated, threshold: opts.threshold, capacity: opts.capacity,
  });
  runPipeline(model, modPipeline({ plan }));
  const path = join(tmp, `c${counter++}`, 'model.onnx');
  saveModel(model, path);
  // The plan the compiled model carries: layers the compiler could not route (e.g. with recurrent state) stay dense.
  return { path, plan: routingPlanOf(loadModel(path)) };
}

/** fp16 models get SPEC.md's fp16 tolerance. */
function tolerance(path: string, fp32: number): number {
  return analyzeDecoder(loadModel(path)).dtype === 'float16' ? 1e-2 : fp32;
}

function worstReal(a: Logits, b: Logits, rows: number[][], pad: 'left' | 'right'): number {
  expect(b.dims).toEqual(a.dims);
  return realDiff(a, b, rows, pad);
}

function worstRows(a: Float32Array[], b: Float32Array[]): number {
  let worst = 0;
  a.forEach((row, r) => row.forEach((v, i) => (worst = Math.max(worst, Math.abs(v - b[r]![i]!)))));
  return worst;
}

/** GroupQueryAttention takes right padding only (per-row lengths); the others take both sides. */
function padSides(path: string): ('left' | 'right')[] {
  const s = analyzeDecoder(loadModel(path));
  return s.layers.some((l) => l.attention.form === 'GroupQueryAttention') ? ['right'] : ['left', 'right'];
}

const PROMPTS = { b1: [[5, 6, 7, 8, 9, 10, 11]], b3: [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]] };

describe.each(contractModels())('$name', ({ path }) => {
  it('all tokens selected and ungated reproduces the original: prefill and a 32-token greedy run', async () => {
    const tol = tolerance(path, 1e-4);
    const compiled = compile(path, 'all-pass', { gated: false });
    for (const pad of padSides(path)) {
      for (const rows of [PROMPTS.b1, PROMPTS.b3]) {
        const [orig, mod] = await Promise.all([ModSession.create(path), ModSession.create(compiled.path)]);
        expect(worstReal(await orig.forward(rows, { pad }), await mod.forward(rows, { pad }), rows, pad), `prefill, pad ${pad}, batch ${rows.length}`).toBeLessThan(tol);
        let stepsOrig = lastPosition(await orig.step(rows.map(() => 1)));
        let stepsMod = lastPosition(await mod.step(rows.map(() => 1)));
        for (let t = 0; t < 32; t++) {
          expect(worstRows(stepsOrig, stepsMod), `step ${t}, pad ${pad}, batch ${rows.length}`).toBeLessThan(tol);
          const next = stepsOrig.map(argmax);
          expect(stepsMod.map(argmax), `greedy token at step ${t}`).toEqual(next);
          stepsOrig = lastPosition(await orig.step(next));
          stepsMod = lastPosition(await mod.step(next));
        }
        expect(mod.layerCacheLengths()).toEqual(orig.layerCacheLengths());
      }
    }
  });

  it.each([
    ['threshold', true], ['threshold', false], ['topk', true], ['topk', false],
  ] as const)('random routers, %s routing (gated %s), agree with the reference executor', async (mode, gated) => {
    const tol = tolerance(path, 1e-4);
    const compiled = compile(path, 'random', { mode, gated, threshold: 0.5, capacity: 0.5 });
    const pad = padSides(path).at(-1)!;
    const rows = PROMPTS.b3;
    const mod = await ModSession.create(compiled.path);
    const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      expect(worstReal(await mod.forward(rows, { pad }), await ref.forward(rows, { pad }), rows, pad), 'prefill').toBeLessThan(tol);
      const steps = mode === 'threshold' && gated ? 32 : 4;
      for (let t = 0; t < steps; t++) {
        const next = [t + 1, t + 2, t + 3];
        expect(worstRows(lastPosition(await mod.step(next)), lastPosition(await ref.step(next))), `step ${t}`).toBeLessThan(tol);
      }
      expect(mod.layerCacheLengths()).toEqual(ref.layerCacheLengths());
      expect(mod.kvBytes()).toBe(ref.kvBytes());
      // About half the tokens: some layer cache must be shorter than the context, and not empty.
      const lengths = mod.layerCacheLengths().flat();
      expect(Math.min(...lengths)).toBeGreaterThan(0);
      expect(Math.min(...lengths)).toBeLessThan(rows[0]!.length + steps);
    } finally {
      await ref.release();
    }
  });
});
