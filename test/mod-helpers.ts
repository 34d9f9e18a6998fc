/** What the MoD test files share: compiling a fixture with a routing plan, tolerances, comparisons. */
import { join } from 'node:path';
import { expect } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { type PlanRequest, type RoutedPart, type RoutingMode, type RoutingPlan } from '../compiler/routing/routing-plan.js';
import { argmax, lastPosition, ModSession, type Logits } from '../compiler/runtime/session.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { routingPlanOf, worstReal as realDiff } from '../compiler/apps/verify/verify.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { describeLayerPart } from '../compiler/routing/routing-plan.js';
import { compile } from '../compiler/passes/compile.js';

export interface Compiled {
  path: string;
  plan: RoutingPlan;
}

export interface CompileOptions {
  mode?: RoutingMode;
  gated?: boolean;
  threshold?: number;
  capacity?: number;
  granularity?: RoutedPart;
  /** Router source (default: the init named by `routers`). */
  routerFile?: string;
}

let counter = 0;

/** Compiles `source` with all-pass or seeded random routers (or a router file) into a fresh folder under `dir`. */
export function compileWith(dir: string, source: string, routers: 'all-pass' | 'random' | 'file', opts: CompileOptions): Compiled {
  const model = loadModel(source);
  const source_: PlanRequest['routers'] =
    routers === 'all-pass' ? { kind: 'all-pass' } : routers === 'random' ? { kind: 'random', seed: 11 } : { kind: 'file', path: opts.routerFile! };
  compile(model, { routers: source_, mode: opts.mode, gated: opts.gated, threshold: opts.threshold, capacity: opts.capacity, granularity: opts.granularity });
  const path = join(dir, `c${counter++}`, 'model.onnx');
  saveModel(model, path);
  // The plan the compiled model carries: parts the compiler could not route stay dense.
  return { path, plan: routingPlanOf(loadModel(path)) };
}

const logitScales = new Map<string, number>();

/**
 * fp16 models get SPEC.md's fp16 tolerance, 1e-2, scaled down to the model's logits when they
 * are smaller than 1 (a tiny random export's can be about 0.02: an absolute 1e-2 would pass
 * logits off by half their size). The scale is the largest |logit| of the original model's
 * batch-3 prefill (right padding, which every attention form takes).
 */
export async function tolerance(path: string, fp32: number): Promise<number> {
  if (analyzeDecoder(loadModel(path)).dtype !== 'float16') return fp32;
  let scale = logitScales.get(path);
  if (scale === undefined) {
    const logits = await (await ModSession.create(path)).forward(PROMPTS.b3, { pad: 'right' });
    scale = 0;
    for (const v of logits.data as Float32Array) scale = Math.max(scale, Math.abs(v));
    expect(Number.isFinite(scale) && scale > 0, `${path}: logits are finite and not all zero`).toBe(true);
    logitScales.set(path, scale);
  }
  return 1e-2 * Math.min(1, scale);
}

export function worstReal(a: Logits, b: Logits, rows: number[][], pad: 'left' | 'right'): number {
  expect(b.dims).toEqual(a.dims);
  const d = realDiff(a, b, rows, pad);
  expect(Number.isNaN(d), 'logits are NaN').toBe(false);
  return d;
}

export function worstRows(a: Float32Array[], b: Float32Array[]): number {
  let worst = 0;
  a.forEach((row, r) => row.forEach((v, i) => (worst = Math.max(worst, Math.abs(v - b[r]![i]!)))));
  expect(a.some((row) => row.some(Number.isNaN)) || b.some((row) => row.some(Number.isNaN)), 'logits are NaN').toBe(false);
  return worst;
}

/** GroupQueryAttention and static KV caches take right padding only (per-row lengths); the others take both sides. */
export function padSides(path: string): ('left' | 'right')[] {
  return decoderIo(loadModel(path)).paddingSides;
}

export const PROMPTS = {
  b1: [[5, 6, 7, 8, 9, 10, 11]],
  b3: [
    [5, 6, 7, 8, 9, 10, 11],
    [12, 13, 14],
    [15, 16, 17, 18, 19],
  ],
};

/** Anything driven like a decoder session (ModSession, ModReference). */
type Driven = Pick<ModSession, 'forward' | 'step' | 'layerCacheLengths'>;

/**
 * The equivalence anchor on one prompt: prefill within `tol` at real positions, then `steps`
 * greedy steps (the original's argmax fed to both) within `tol` with the same greedy tokens, and
 * the same per-layer cache lengths at the end.
 */
export async function expectSameRun(
  orig: Driven,
  mod: Driven,
  rows: number[][],
  pad: 'left' | 'right',
  steps: number,
  tol: number,
  what: string,
): Promise<void> {
  expect(worstReal(await orig.forward(rows, { pad }), await mod.forward(rows, { pad }), rows, pad), `prefill, ${what}`).toBeLessThan(tol);
  let stepsOrig = lastPosition(await orig.step(rows.map(() => 1)));
  let stepsMod = lastPosition(await mod.step(rows.map(() => 1)));
  for (let t = 0; t < steps; t++) {
    expect(worstRows(stepsOrig, stepsMod), `step ${t}, ${what}`).toBeLessThan(tol);
    const next = stepsOrig.map(argmax);
    expect(stepsMod.map(argmax), `greedy token at step ${t}, ${what}`).toEqual(next);
    stepsOrig = lastPosition(await orig.step(next));
    stepsMod = lastPosition(await mod.step(next));
  }
  expect(mod.layerCacheLengths(), `cache lengths, ${what}`).toEqual(orig.layerCacheLengths());
}

/** Selected and real tokens of the prefill, summed over the routed parts the reference ran. */
export function prefillSelection(ref: ModReference, rows: number[][]): { selected: number; real: number } {
  const parts = [...ref.selections[0]!.values()];
  return { selected: parts.flat(2).length, real: parts.length * rows.flat().length };
}

const sigmoid32 = (s: number) => Math.fround(1 / (1 + Math.exp(-s)));

/**
 * A threshold p that routes part of the real tokens of `rows` on this model with the seeded random
 * routers: midway between the two middle router probabilities of the first routed part in the
 * prefill (its input comes before any routing, so the compiled model sees the same scores).
 * Random routers (b = 0) at p = 0.5 pass about half the tokens of a random-weight fixture, but a
 * trained model's residual stream carries a large component shared by every token, so w.x can have
 * one sign for all of them (fixtures/quality-lm: no token passes p = 0.5). The contract needs
 * partial selection on every model, so each test picks its p from the model.
 */
export async function splittingThreshold(dir: string, path: string, rows: number[][], pad: 'left' | 'right', opts: CompileOptions): Promise<number> {
  const probe = compileWith(dir, path, 'random', { ...opts, mode: 'threshold', threshold: 0.5 });
  const ref = await ModReference.create(path, probe.plan, join(dir, `probe${counter++}`));
  try {
    await ref.forward(rows, { pad });
    const first = describeLayerPart(probe.plan.layers[0]!);
    const probs = ref.scores[0]!.get(first)!
      .flat()
      .map(sigmoid32)
      .sort((a, b) => a - b);
    const mid = probs.length >> 1;
    const [lo, hi] = [probs[mid - 1]!, probs[mid]!];
    const p = (lo + hi) / 2;
    expect(Math.fround(p) > lo && Math.fround(p) <= hi, `two middle router probabilities of ${first} differ (${lo}, ${hi})`).toBe(true);
    return p;
  } finally {
    await ref.release();
  }
}

/**
 * Mean NLL per predicted token (nats) of `rows` on the model at `path`, computed here as a check
 * of `modc eval`'s (which batches, pads and sums on its own): each row alone through ModSession
 * (batch 1, no padding), -log softmax of the logits at t for the id at t + 1, in float64.
 */
export async function rowByRowNll(path: string, rows: number[][]): Promise<number> {
  const session = await ModSession.create(path);
  let sum = 0;
  let count = 0;
  for (const row of rows) {
    const { data, dims } = await session.forward([row]);
    const V = dims[2];
    for (let t = 0; t + 1 < row.length; t++) {
      const logits = Array.from(data.subarray(t * V, (t + 1) * V));
      const max = Math.max(...logits);
      const logSum = Math.log(logits.reduce((a, v) => a + Math.exp(v - max), 0)) + max;
      sum += logSum - logits[row[t + 1]!]!;
      count += 1;
    }
  }
  return sum / count;
}
