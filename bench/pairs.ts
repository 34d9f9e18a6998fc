/**
 * What the prefill, decode, recipe and sessions benchmarks share beyond common.ts: the compiled
 * models they time (all-pass and routed), timing one original/compiled pair with only those two
 * sessions alive (the interleaved core of compiler/apps/benchmark/benchmark.ts), what a routed
 * model actually selected (its selection masks, run once outside the timing), and the ideal time
 * from the original's unit times.
 */
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { type LayerCost, modelCosts } from '../compiler/analysis/cost.js';
import { type CallTime, median, medianOfPaired, pairedRatios, ratioStats, type RatioStats, spread } from '../compiler/apps/benchmark/benchmark.js';
import { type FreshTimes, timeInFreshProcess } from '../compiler/apps/benchmark/fresh-process.js';
import { exposeSelections } from '../compiler/apps/eval/index.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { readRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import type { RoutedPart } from '../compiler/routing/routing-plan.js';
import type { ort, SessionOptions } from '../compiler/runtime/ort.js';
import { ModSession } from '../compiler/runtime/session.js';
import { type BenchGranularity, compileModel, log, type PlanChoice, type Workdir } from './common.js';

/** A compiled model a benchmark times against the original. */
export interface Compiled {
  name: string;
  label: string;
  path: string;
  /** The routed parts the compile converted. */
  parts: { layer: number; part: RoutedPart; capacity: number }[];
  compileMs: number;
}

/** The all-pass compile: every layer's `granularity` part converted, every token selected, ungated. */
export function compileAllPass(w: Workdir, original: string, granularity: BenchGranularity, name = 'all-pass', logits: 'all' | 'last' = 'all'): Compiled {
  const path = w.path(`${name}.onnx`);
  const c = compileModel(original, path, { routers: { kind: 'all-pass' }, gated: false, granularity }, logits);
  const parts = c.report.converted.map((p) => ({ layer: p.layer, part: p.part, capacity: 1 }));
  return { name, label: `all-pass (${partsLabel(parts)}, ungated)`, path, parts, compileMs: c.ms };
}

/**
 * The routed compile: random routers (seed), top-k capacity c on the prompt (a one-token step
 * selects its token iff r >= 0.5, SPEC.md, so about half of them), on every layer or every other.
 */
export function compileRouted(
  w: Workdir,
  original: string,
  o: { granularity: BenchGranularity; capacity: number; seed: number; schedule: 'uniform' | 'every-other'; gated: boolean },
  name = 'routed',
  logits: 'all' | 'last' = 'all',
): Compiled {
  const path = w.path(`${name}.onnx`);
  const choice: PlanChoice = {
    routers: { kind: 'random', seed: o.seed },
    mode: 'topk',
    capacity: o.capacity,
    schedule: o.schedule,
    gated: o.gated,
    granularity: o.granularity,
  };
  const c = compileModel(original, path, choice, logits);
  const parts = c.report.converted.map((p) => ({ layer: p.layer, part: p.part, capacity: p.capacity }));
  return {
    name,
    label: `routed: random routers seed ${o.seed}, top-k c=${o.capacity} (${partsLabel(parts)}, ${o.gated ? 'gated' : 'ungated'})`,
    path,
    parts,
    compileMs: c.ms,
  };
}

/** "layers 0-7" / "attention of layers 1, 3" style. */
export function partsLabel(parts: readonly { layer: number; part: RoutedPart }[]): string {
  const kinds = [...new Set(parts.map((p) => p.part))];
  const layers = parts.map((p) => p.layer);
  const span = layers.length > 2 && layers.every((l, i) => i === 0 || l === layers[i - 1]! + 1) ? `${layers[0]}-${layers.at(-1)}` : layers.join(', ');
  const what = kinds.length === 1 && kinds[0] !== 'block' ? `${kinds[0]} of ` : '';
  return kinds.length > 1
    ? parts.map((p) => `${p.layer}${p.part === 'block' ? '' : p.part === 'attention' ? 'a' : 'm'}`).join(' ')
    : `${what}layer${layers.length === 1 ? '' : 's'} ${span}`;
}

/** The timed samples of one side of a pair. */
export interface Side {
  prefill: CallTime[];
  steps: CallTime[];
  kvAfterPrefill: number;
  lengthsAfterPrefill: number[][];
  kvAtEnd: number;
  lengthsAtEnd: number[][];
}

export interface PairTimes {
  original: Side;
  compiled: Side;
  /**
   * The median per-step ratio (wall) over the processes that created the original session first
   * and over those that created the compiled one first; null with one process.
   */
  byOrder: { originalFirst: number; compiledFirst: number } | null;
  /** compiled / original on wall time and on process CPU time, prefill (per round) and decode (per step). */
  ratios: { prefill: { wall: RatioStats; cpu: RatioStats }; decode: { wall: RatioStats; cpu: RatioStats } };
  gcMs: number[];
  /** Threads of the timing process with its idle sessions made, before the pair's (Linux; else null). */
  threads: number | null;
}

export interface PairPlan {
  prompt: number[][];
  /** Rounds of (prefill, steps); the first `warmupRounds` untimed. */
  rounds: number;
  warmupRounds: number;
  steps: number;
  warmupSteps: number;
  stepIds: (step: number) => number[];
  session: SessionOptions;
  gc: boolean;
  /** Every decode step from the prefilled caches, at the prompt's context (timeInterleaved's `rewind`). */
  rewind?: boolean;
  /** Fresh processes the pair is timed in, one after another, their samples pooled (default 1). */
  processes?: number;
  /** Idle sessions alive beside the pair (the sessions benchmark); none by default. */
  idle?: { path: string; count: number; prompt: number[][] };
}

/**
 * Times `original` against `compiled` with only their two sessions alive (and `plan.idle`'s),
 * interleaved (timeInterleaved), in a fresh process (compiler/apps/benchmark/fresh-process.ts:
 * the benchmark's own heap would slow the timed calls), `plan.processes` times over: a session
 * runs a few percent faster or slower for its whole life depending on where its memory lands
 * (the decode bench's GQA all-pass pair, one process per run: 1.038x and 1.062x), so the samples of several fresh
 * processes are pooled.
 */
export async function timePair(original: string, compiled: string, plan: PairPlan): Promise<PairTimes> {
  const ids = Array.from({ length: plan.steps }, (_, s) => plan.stepIds(s));
  const runs: FreshTimes[] = [];
  // Every other process makes the compiled session first: the order the two load in never favours one.
  const compiledFirst = (p: number) => p % 2 === 1;
  for (let p = 0; p < (plan.processes ?? 1); p++) {
    const flip = compiledFirst(p);
    runs.push(
      await timeInFreshProcess({
        paths: flip ? [compiled, original] : [original, compiled],
        prompt: plan.prompt,
        rounds: plan.rounds,
        warmupRounds: plan.warmupRounds,
        steps: plan.steps,
        warmupSteps: plan.warmupSteps,
        stepIds: Array.from({ length: plan.rounds }, () => ids),
        session: plan.session,
        gc: plan.gc,
        ...(plan.rewind ? { rewind: true } : {}),
        ...(plan.idle ? { idle: plan.idle } : {}),
      }).then((t) => (flip ? swapModels(t) : t)),
    );
  }
  // Samples pooled in process order; the sizes (KV bytes, cache lengths) are the last process's, the same in each.
  const last = runs.at(-1)!;
  const t = {
    ...last,
    prefill: [0, 1].map((m) => runs.flatMap((r) => r.prefill[m]!)),
    decode: [0, 1].map((m) => runs.flatMap((r) => r.decode[m]!)),
    gcMs: runs.flatMap((r) => r.gcMs),
  };
  const side = (m: number): Side => ({
    prefill: t.prefill[m]!,
    steps: t.decode[m]!,
    kvAfterPrefill: t.afterPrefill[m]!.kvBytes,
    lengthsAfterPrefill: t.afterPrefill[m]!.cacheLengths,
    kvAtEnd: t.kvBytes[m]!,
    lengthsAtEnd: t.cacheLengths[m]!,
  });
  const [o, c] = [side(0), side(1)];
  const wall = (xs: CallTime[]) => xs.map((x) => x.wallMs);
  const cpu = (xs: CallTime[]) => xs.map((x) => x.cpuMs);
  const ofOrder = (flipped: boolean) => {
    const of = runs.filter((_, p) => compiledFirst(p) === flipped);
    return medianOfPaired(
      of.flatMap((r) => wall(r.decode[0]!)),
      of.flatMap((r) => wall(r.decode[1]!)),
    );
  };
  return {
    original: o,
    compiled: c,
    byOrder: runs.length > 1 && o.steps.length ? { originalFirst: ofOrder(false), compiledFirst: ofOrder(true) } : null,
    ratios: {
      prefill: { wall: ratioStats(wall(o.prefill), wall(c.prefill)), cpu: ratioStats(cpu(o.prefill), cpu(c.prefill)) },
      decode: { wall: ratioStats(wall(o.steps), wall(c.steps)), cpu: ratioStats(cpu(o.steps), cpu(c.steps)) },
    },
    gcMs: t.gcMs,
    threads: t.threads,
  };
}

/** A process's times with its two models in the other order. */
function swapModels(t: FreshTimes): FreshTimes {
  const swap = <T>(xs: T[]): T[] => [xs[1]!, xs[0]!];
  return {
    ...t,
    prefill: swap(t.prefill),
    decode: swap(t.decode),
    kvBytes: swap(t.kvBytes),
    cacheLengths: swap(t.cacheLengths),
    afterPrefill: swap(t.afterPrefill),
  };
}

/** What one routed part selected: on the prompt, and at each timed decode step. */
export interface PartSelection {
  layer: number;
  part: RoutedPart;
  /** Selected tokens / real tokens of the prompt. */
  promptFraction: number;
  /** Timed decode steps in which some row selected the token (the part ran). */
  stepsRun: number;
  steps: number;
}

/**
 * Runs the compiled model once more, outside any timing and alone, with its selection masks as
 * extra outputs (`exposeSelections`, as modc eval does), on the same prompt and forced steps:
 * the routing is deterministic, so these are the timed runs' selections.
 */
export async function measureSelections(
  w: Workdir,
  compiled: string,
  o: { prompt: number[][]; steps: number; warmupSteps: number; stepIds: (step: number) => number[]; session: SessionOptions; rewind?: boolean },
): Promise<PartSelection[]> {
  const model = loadModel(compiled);
  const routing = readRoutingMetadata(model);
  if (!routing) return [];
  const selections = exposeSelections(model, routing);
  const probePath = w.path(
    `${compiled
      .split('/')
      .at(-1)!
      .replace(/\.onnx$/, '')}.selections.onnx`,
  );
  saveModel(model, probePath);
  const session = await ModSession.create(probePath, o.session);
  try {
    const masks = () => selections.map((s) => (session.lastOutputs[s.output] as ort.Tensor).data as Uint8Array);
    await session.forward(o.prompt);
    const prefilled = session.checkpoint();
    const real = o.prompt.reduce((a, r) => a + r.length, 0);
    const out: PartSelection[] = selections.map((s, i) => ({
      layer: s.layer,
      part: s.part,
      promptFraction: masks()[i]!.reduce((a, v) => a + (v ? 1 : 0), 0) / real,
      stepsRun: 0,
      steps: 0,
    }));
    for (let t = 0; t < o.steps; t++) {
      if (o.rewind) session.restore(prefilled);
      await session.step(o.stepIds(t));
      if (t < o.warmupSteps) continue;
      masks().forEach((m, i) => {
        out[i]!.steps++;
        if (m.some((v) => v)) out[i]!.stepsRun++;
      });
    }
    log(
      `selections of ${compiled}: ${out.map((p) => `${p.layer}${p.part === 'block' ? '' : p.part[0]} ${p.promptFraction.toFixed(2)}/${p.stepsRun}`).join(', ')}`,
    );
    return out;
  } finally {
    await session.session.release();
  }
}

/**
 * A part's share of its layer's time: from the part units' measured times when given
 * (timeUnits with `parts`), else by the cost model (compiler/analysis/cost.ts) for `queries`
 * tokens attending to `keys` keys each on average. The measured layer unit time is split between
 * the attention and MLP parts in this proportion. A block is the whole layer. The cost model
 * counts MACs only: at a decode step it gives the MLP more of the layer than it takes (the
 * attention's cache append and softmax cost time and no MACs), so the measured split is used
 * where there is one.
 */
export function partShare(cost: LayerCost, part: RoutedPart, queries: number, keys: number, measured?: { attention: number; mlp: number } | null): number {
  if (part === 'block') return 1;
  if (measured && measured.attention + measured.mlp > 0)
    return (part === 'attention' ? measured.attention : measured.mlp) / (measured.attention + measured.mlp);
  const attention = queries * (cost.attention + cost.attentionPair * keys);
  const mlp = queries * cost.mlp;
  const total = attention + mlp;
  return total > 0 ? (part === 'attention' ? attention : mlp) / total : 0;
}

/** The original's layer costs, for partShare. */
export function layerCosts(original: string): LayerCost[] {
  return modelCosts(analyzeDecoder(loadModel(original))).layers;
}

/** Per-round or per-step ratios as "median (min - max)". */
export function ratioSpan(r: RatioStats): string {
  return `${r.medianOfPaired.toFixed(3)}x (${r.paired.min.toFixed(3)} - ${r.paired.max.toFixed(3)})`;
}

export { median, pairedRatios, spread };
