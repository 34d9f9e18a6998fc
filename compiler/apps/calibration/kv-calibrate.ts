/**
 * `calibrateKv`: key/value routers (SPEC.md, "Key/value routing") for a target KV fraction F,
 * from the model and a little data (`modc calibrate --target-kv F`).
 *
 *   1. capture: run the original model batch by batch with each layer's input x and attention
 *      probabilities P[h, i, j] (the Softmax output of unfused attention) exposed; reduce each
 *      batch to ridge statistics of the target
 *          y_j = log(1e-4 + sum_{i >= j + window} sum_h P[h, i, j])
 *      (the attention mass token j receives from the queries that can see it only if it is kept)
 *      on x_j, per layer, and drop it;
 *   2. fit: one ridge router per layer (lambda 1e-3 on standardised inputs), scores scaled to
 *      standard deviations of the fit;
 *   3. thresholds: score the data with every router keeping every token (the original
 *      activations), then per layer the threshold that keeps the most tokens while that layer's
 *      KV fraction on the data (entries held after each row's last token: sinks, kept tokens and
 *      window, over the row's tokens) is at most its share: the same share F_l for every routed
 *      layer, such that the model's KV fraction (layers weighted by their entry size, layers that
 *      cannot route holding everything) is F. A layer that cannot use its whole share (tokens
 *      whose scores tie at the threshold are kept or dropped together: a first layer's input is
 *      the token's embedding) passes what it leaves to the others;
 *   4. refine: with every layer routed (and any compute routers calibrated alongside), score again
 *      and re-set the thresholds (upstream routing moves the scores); then measure, and lower a
 *      threshold that the final run finds above its share until every layer is at or below it.
 *
 * The threshold goes into the router's bias, so p = 0.5 keeps the calibrated tokens.
 */
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { kvRowUsage, modelCosts, type ModelCosts, denseUsage, executedMacs, kvElements, type RowUsage } from '../../analysis/cost.js';
import type { DecoderStructure } from '../../analysis/types.js';
import { ModcError, UsageError } from '../../core/errors.js';
import { cloneModel } from '../../core/io/convert.js';
import { loadModel } from '../../core/io/load.js';
import { saveModel } from '../../core/io/save.js';
import { workFolder } from '../../core/io/work-folder.js';
import { DataType } from '../../core/ir/dtype.js';
import type { Model } from '../../core/ir/model.js';
import { decoderIo, type DecoderIo } from '../../metadata/decoder-io.js';
import { readRoutingMetadata } from '../../metadata/routing-metadata.js';
import { compile } from '../../passes/compile.js';
import { routingOf } from '../../passes/mod-common.js';
import { kvRoutingBlocker } from '../../passes/route-kv.js';
import { splitAndAnalyze } from '../../passes/split-fused-boundaries.js';
import { DEFAULT_KV_POLICY, kvPolicyProblem, type KvPolicy, type RouterFileMetadata, surrogateMacs } from '../../routing/router-weights.js';
import type { RoutingPlan } from '../../routing/routing-plan.js';
import { type EmbeddingSource, genaiEmbeddingModel, TokenEmbedder } from '../../runtime/embeddings.js';
import { createSession, ort, toFloat32, type SessionOptions } from '../../runtime/ort.js';
import { batchesOf, calibrate, type CalibrateOptions, type CalibratedRouter, type CalibrationResult, pickSequences } from './calibrate.js';
import { exposeValues, promptBatch, type Batch } from './capture.js';
import { RidgeStats, solveRidge } from './ridge.js';
import { routerFileMetadata } from './router-file.js';
import { ALL_PASS_BIAS, nextTokenNll } from './sensitivity.js';

export interface KvCalibrateOptions {
  /** KV fraction to reach, in (0, 1]. */
  targetKv: number;
  sinks?: number;
  window?: number;
  maxTokens?: number;
  seed?: number;
  /** Ridge penalty on standardised inputs. */
  ridge?: number;
  /** Threshold refinement rounds with every layer routed. */
  refineRounds?: number;
  /** Bytes of captured activations one batch may hold (sets the batch size). */
  batchBytes?: number;
  /**
   * Router directions to use instead of fitting them (scores are scaled to unit standard deviation
   * on the data): thresholds are placed the same way. For baselines (random routers at F).
   */
  directions?: ReadonlyMap<number, Float32Array>;
  /** Routers calibrated for compute (MLP parts), routed beside the kv parts while refining and measuring. */
  alongside?: CalibrationResult;
  workDir?: string;
  session?: SessionOptions;
  onProgress?: (p: KvProgress) => void;
}

export interface KvProgress {
  stage: 'capture' | 'fit' | 'score' | 'refine' | 'done';
  done: number;
  total: number;
}

export interface KvLayerReport {
  layer: number;
  /** Tokens the router keeps, over real tokens, on the calibration data (final run). */
  keptFraction: number;
  /** Entries the layer's cache holds after each row, over real tokens (sinks and window counted). */
  kvFraction: number;
  /** The threshold on the router's scaled score w.x that keeps a token (the bias is its negative). */
  threshold: number;
  r2: number;
}

export interface KvCalibrationReport {
  tokens: number;
  sequences: number;
  /** NLL on the calibration data of the original model (NaN from calibrateKv with compute routers alongside). */
  denseNll: number;
  /** With MLP routers calibrated alongside: the NLL with those routed and no key/value routing. */
  computeOnlyNll?: number;
  /** NLL on the calibration data with every chosen router routed. */
  nll: number;
  /** KV fraction on the calibration data, as modc eval counts it. */
  kvFraction: number;
  /** Compute fraction on the calibration data, as modc eval counts it (attention pairs by the kv rule). */
  computeFraction: number;
  /** The lowest KV fraction sinks and window allow on this data (every router keeping no token). */
  floor: number;
  layers: KvLayerReport[];
  /** Layers that cannot route their KV cache, and why. */
  skipped: { layer: number; reason: string }[];
}

export interface KvCalibrationResult {
  routers: CalibratedRouter[];
  kv: KvPolicy;
  report: KvCalibrationReport;
  recipe: Record<string, unknown>;
}

export const KV_DEFAULTS = {
  maxTokens: 65536,
  seed: 0,
  ridge: 1e-3,
  refineRounds: 1,
  batchBytes: 128 * 2 ** 20,
};

/** The attention mass a token must get from queries at least `window` later is scored on this scale. */
const MASS_FLOOR = 1e-4;

export function checkKvCalibrateOptions(o: KvCalibrateOptions): void {
  if (!(o.targetKv > 0 && o.targetKv <= 1)) throw new UsageError(`--target-kv must be in (0, 1], got ${o.targetKv}`);
  const problem = kvPolicyProblem({ sinks: o.sinks, window: o.window });
  if (problem) throw new UsageError(`--kv-${problem}`);
  if (o.ridge !== undefined && !(o.ridge > 0)) throw new UsageError(`the ridge penalty must be > 0, got ${o.ridge}`);
  if (o.maxTokens !== undefined && !(Number.isInteger(o.maxTokens) && o.maxTokens >= 2))
    throw new UsageError(`--max-tokens must be an integer >= 2, got ${o.maxTokens}`);
}

/** Per (row, layer): each real token's raw score w.x (bias excluded), in order. */
type Scores = Float32Array[][];

/**
 * The threshold on raw scores that keeps the most middle tokens while the layer's KV fraction
 * over rows of these lengths stays at most F; `scores[r]` are row r's tokens in order. Returns
 * null when sinks and window alone exceed F.
 */
export function kvThreshold(scores: readonly Float32Array[], policy: KvPolicy, F: number): { threshold: number; kvFraction: number } | null {
  const { sinks, window } = policy;
  let total = 0;
  let fixed = 0;
  const middle: number[] = [];
  for (const s of scores) {
    const n = s.length;
    total += n;
    fixed += Math.min(n, sinks + window);
    for (let j = sinks; j < n - window; j++) middle.push(s[j]!);
  }
  let m = Math.floor(F * total + 1e-9) - fixed;
  if (m < 0) return null;
  middle.sort((a, b) => b - a);
  if (m >= middle.length) return { threshold: (middle.at(-1) ?? 0) - 1, kvFraction: (fixed + middle.length) / total };
  // Halfway between the last kept and the first dropped; at a tie, keep fewer (the fraction must not pass F).
  while (m > 0 && middle[m - 1] === middle[m]) m--;
  const threshold = m === 0 ? middle[0]! + 1 : (middle[m - 1]! + middle[m]!) / 2;
  return { threshold, kvFraction: (fixed + m) / total };
}

/** The KV fraction a layer's raw scores give at `threshold` (keep: score >= threshold). */
function layerKvFraction(scores: readonly Float32Array[], policy: KvPolicy, threshold: number): { kv: number; kept: number } {
  let held = 0;
  let kept = 0;
  let total = 0;
  for (const s of scores) {
    const keep = Uint8Array.from(s, (v) => (v >= threshold ? 1 : 0));
    held += kvRowUsage(keep, policy.sinks, policy.window).held;
    for (const k of keep) kept += k;
    total += s.length;
  }
  return { kv: held / total, kept: kept / total };
}

/** The captured values of one layer: its input and its attention probabilities. */
interface KvPoint {
  layer: number;
  x: string;
  probs: string;
}

function kvPoints(model: Model, s: DecoderStructure): { points: KvPoint[]; skipped: { layer: number; reason: string }[] } {
  const points: KvPoint[] = [];
  const skipped: { layer: number; reason: string }[] = [];
  for (const l of s.layers) {
    const why = kvRoutingBlocker(model, l);
    if (why) {
      skipped.push({ layer: l.index, reason: why });
      continue;
    }
    const a = l.attention;
    if (a.form !== 'unfused') {
      skipped.push({
        layer: l.index,
        reason: `--target-kv reads attention probabilities off the Softmax of unfused attention; ${a.form === 'recurrent' ? 'it has none' : `${a.node.describe()} computes them inside the op`}`,
      });
      continue;
    }
    points.push({ layer: l.index, x: l.residualIn.name, probs: a.softmax.outputs[0]!.name });
  }
  return { points, skipped };
}

/** Adds one row's targets to `stats`: y_j = log(1e-4 + mass from queries >= j + window), for j < n. */
function addTargets(
  stats: RidgeStats,
  x: Float32Array,
  probs: Float32Array,
  [heads, S, T]: [number, number, number],
  row: number,
  n: number,
  window: number,
): void {
  const mass = new Float64Array(n);
  for (let h = 0; h < heads; h++) {
    const base = (row * heads + h) * S * T;
    for (let i = window; i < n; i++) {
      const q = base + i * T;
      for (let j = 0; j <= i - window; j++) mass[j] += probs[q + j]!;
    }
  }
  const y = Float64Array.from(mass, (m) => Math.log(MASS_FLOOR + m));
  const rows = Int32Array.from({ length: n }, (_, t) => row * S + t);
  stats.add(x, rows, [y]);
}

/** The model with kv routers (biases as graph inputs, scores exposed), and any compute routers beside them. */
class KvEvaluator {
  private constructor(
    private readonly session: ort.InferenceSession,
    readonly io: DecoderIo,
    readonly parts: Map<number, { bias: string; score: string }>,
    private readonly embedder: TokenEmbedder | null,
  ) {}

  static async create(
    split: Model,
    routers: { layer: number; weight: Float32Array }[],
    policy: KvPolicy,
    alongside: CalibrationResult | undefined,
    path: string,
    opts: SessionOptions,
    embeddings: EmbeddingSource | null,
  ): Promise<KvEvaluator> {
    const model = cloneModel(split);
    const plan: RoutingPlan = {
      mode: 'threshold',
      gated: alongside?.gated ?? false,
      kv: policy,
      unconverted: [],
      layers: [
        ...routers.map((r) => ({
          layer: r.layer,
          part: 'kv' as const,
          router: { layer: r.layer, part: 'kv' as const, weight: r.weight, bias: 0 },
          threshold: 0.5,
          capacity: 1,
        })),
        ...(alongside?.routers ?? []).map((r) => ({
          layer: r.layer,
          part: r.part,
          router: { layer: r.layer, part: r.part, weight: r.weight, bias: r.bias, ...(r.surrogate ? { surrogate: r.surrogate } : {}) },
          threshold: r.threshold,
          capacity: r.capacity,
        })),
      ],
      ...(alongside?.replaced?.length ? { replaced: alongside.replaced } : {}),
    };
    compile(model, { plan, verify: false });
    const g = model.graph;
    const parts = new Map<number, { bias: string; score: string }>();
    for (const entry of readRoutingMetadata(model)?.layers ?? []) {
      if (entry.part !== 'kv') continue;
      const selected = g.findValue(entry.selected);
      const router = selected?.producer?.input(0)?.producer;
      const bias = router?.input(2);
      if (!router || !bias?.initializer) continue;
      g.removeInitializer(bias);
      bias.type = { tensor_type: { elem_type: DataType.FLOAT, shape: { dim: [{ dim_value: 1 }] } } };
      if (!g.inputs.includes(bias)) g.inputs.push(bias);
      parts.set(entry.layer, { bias: bias.name, score: router.outputs[0]!.name });
    }
    const missing = routers.filter((r) => !parts.has(r.layer));
    if (missing.length) throw new ModcError(`the compiled model routes no KV cache on layer ${missing.map((r) => r.layer).join(', ')}`);
    // Compute routers alongside are checked the same way: each must be routed.
    for (const r of alongside?.routers ?? []) {
      const entry = readRoutingMetadata(model)?.layers.find((l) => l.layer === r.layer && l.part === r.part);
      if (!entry || !routingOf(g.findValue(entry.selected)!)) throw new ModcError(`the compiled model does not route layer ${r.layer} (${r.part})`);
    }
    exposeValues(
      model,
      [...parts.values()].map((p) => p.score),
      DataType.FLOAT,
    );
    const io = decoderIo(model);
    saveModel(model, path);
    const session = await createSession(path, opts);
    const embedder = io.inputsEmbeds && embeddings ? await TokenEmbedder.create(io, embeddings, opts) : null;
    return new KvEvaluator(session, io, parts, embedder);
  }

  batch(rows: number[][]): Promise<Batch> {
    return promptBatch(this.io, rows, this.embedder);
  }

  /** Runs a batch with these thresholds (a layer not listed keeps every token): raw scores per row and layer, and the NLL. */
  async run(batch: Batch, thresholds: ReadonlyMap<number, number>): Promise<{ scores: Map<number, Float32Array[]>; nll: number; predicted: number }> {
    const feeds = { ...batch.feeds };
    for (const [layer, p] of this.parts)
      feeds[p.bias] = new ort.Tensor('float32', Float32Array.of(thresholds.has(layer) ? -thresholds.get(layer)! : ALL_PASS_BIAS), [1]);
    let out: ort.InferenceSession.OnnxValueMapType;
    try {
      out = await this.session.run(feeds, [...[...this.parts.values()].map((p) => p.score), this.io.logits]);
    } catch (e) {
      throw new ModcError(`onnxruntime failed running the calibration model: ${(e as Error).message.split('\n')[0]}`);
    }
    const scores = new Map<number, Float32Array[]>();
    for (const [layer, p] of this.parts) {
      const s = (out[p.score] as ort.Tensor).data as Float32Array;
      const bias = thresholds.has(layer) ? -thresholds.get(layer)! : ALL_PASS_BIAS;
      scores.set(
        layer,
        batch.rows.map((row, b) => Float32Array.from({ length: row.length }, (_, t) => s[b * batch.width + t]! - bias)),
      );
    }
    const logits = out[this.io.logits] as ort.Tensor;
    return { scores, ...nextTokenNll(toFloat32(logits), logits.dims as number[], batch) };
  }

  async release(): Promise<void> {
    await this.embedder?.release();
    await this.session.release();
  }
}

/** Key/value routers for `opts.targetKv`: capture, fit, thresholds, refine. */
export async function calibrateKv(original: Model | string, sequences: readonly number[][], opts: KvCalibrateOptions): Promise<KvCalibrationResult> {
  checkKvCalibrateOptions(opts);
  const o = { ...KV_DEFAULTS, ...Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined)) } as typeof KV_DEFAULTS & KvCalibrateOptions;
  const policy: KvPolicy = { sinks: opts.sinks ?? DEFAULT_KV_POLICY.sinks, window: opts.window ?? DEFAULT_KV_POLICY.window };
  const progress = opts.onProgress ?? (() => {});
  if (typeof original === 'string') original = loadModel(original);
  const io = decoderIo(original);
  const modelPath = original.sourcePath ?? 'the model';
  const model = cloneModel(original);
  const structure = splitAndAnalyze(model);
  const costs = modelCosts(structure);
  const { points, skipped } = kvPoints(model, structure);
  if (points.length === 0)
    throw new ModcError(`no layer of ${modelPath} can route its KV cache for --target-kv (layer ${skipped[0]?.layer}: ${skipped[0]?.reason})`);
  const taken = new Set((opts.alongside?.routers ?? []).filter((r) => r.part === 'block' || r.part === 'attention').map((r) => r.layer));
  if (taken.size)
    throw new UsageError(`layers ${[...taken].join(', ')} route their ${'block or attention'} for compute; key/value routing goes with MLP routing only`);
  const embeddingModel = io.inputsEmbeds && original.sourcePath ? genaiEmbeddingModel(original.sourcePath) : null;
  if (io.inputsEmbeds && !embeddingModel)
    throw new ModcError(`${modelPath} takes inputs_embeds: calibrate needs the embedding model that genai_config.json beside it names`);
  const embeddings: EmbeddingSource | null = embeddingModel ? { kind: 'model', path: embeddingModel } : null;
  const rows = pickSequences(sequences, o.maxTokens, o.seed);
  if (rows.length === 0) throw new ModcError('the calibration data has no sequence of at least 2 tokens');
  const width = Math.max(...rows.map((r) => r.length));
  const perRow = 4 * width * (points.length * (structure.hiddenSize + structure.numHeads * width) + (io.vocabSize ?? 0));
  const batches = io.batchOne || io.unpaddable ? rows.map((r) => [r]) : batchesOf(rows, Math.max(1, Math.floor(o.batchBytes / perRow)) * width);
  const ownDir = opts.workDir ? null : workFolder(model, 'modc-calibrate-kv');
  const workDir = opts.workDir ?? ownDir!;
  try {
    // 1. capture -> ridge statistics of the attention-mass target
    const H = structure.hiddenSize;
    const stats = new Map(points.map((p) => [p.layer, new RidgeStats(H, 1)]));
    {
      const capture = cloneModel(model);
      exposeValues(capture, [...new Set(points.flatMap((p) => [p.x, p.probs]))], streamType(structure));
      const path = join(workDir, 'capture-kv.onnx');
      saveModel(capture, path);
      const session = await createSession(path, opts.session ?? {});
      const embedder = io.inputsEmbeds && embeddings ? await TokenEmbedder.create(io, embeddings, opts.session ?? {}) : null;
      try {
        for (let bi = 0; bi < batches.length; bi++) {
          progress({ stage: 'capture', done: bi, total: batches.length });
          const batch = await promptBatch(io, batches[bi]!, embedder);
          let out: ort.InferenceSession.OnnxValueMapType;
          try {
            out = await session.run(
              batch.feeds,
              points.flatMap((p) => [p.x, p.probs]),
            );
          } catch (e) {
            throw new ModcError(`onnxruntime failed running the capture model: ${(e as Error).message.split('\n')[0]}`);
          }
          for (const p of points) {
            const probs = out[p.probs] as ort.Tensor;
            const [, heads, S, T] = probs.dims as number[];
            const x = toFloat32(out[p.x] as ort.Tensor);
            const pd = toFloat32(probs);
            batch.rows.forEach((row, b) => addTargets(stats.get(p.layer)!, x, pd, [heads!, S!, T!], b, row.length, policy.window));
          }
        }
      } finally {
        await embedder?.release();
        await session.release();
      }
    }

    // 2. fit: scores in standard deviations of the fitted target
    const fits = points.map((p, i) => {
      progress({ stage: 'fit', done: i, total: points.length });
      const given = opts.directions?.get(p.layer);
      if (given) {
        if (given.length !== H) throw new UsageError(`the router direction for layer ${p.layer} has ${given.length} values, the hidden size is ${H}`);
        const std = scoreStd(stats.get(p.layer)!, given);
        return { layer: p.layer, weight: Float32Array.from(given, (w) => (std > 0 ? w / std : w)), r2: 0 };
      }
      const fit = solveRidge(stats.get(p.layer)!, o.ridge);
      const scale = fit.predictionStd > 0 ? 1 / fit.predictionStd : 1;
      return { layer: p.layer, weight: Float32Array.from(fit.weight, (w) => w * scale), r2: fit.r2 };
    });

    // 3-4. thresholds on the scores, then refined with every layer routed
    const ev = await KvEvaluator.create(model, fits, policy, opts.alongside, join(workDir, 'calib-kv.onnx'), opts.session ?? {}, embeddings);
    try {
      const runAll = async (thresholds: Map<number, number>, stage: KvProgress['stage'], round: number, rounds: number) => {
        const scores: Scores = [];
        let nll = 0;
        let predicted = 0;
        for (let bi = 0; bi < batches.length; bi++) {
          progress({ stage, done: round * batches.length + bi, total: rounds * batches.length });
          const r = await ev.run(await ev.batch(batches[bi]!), thresholds);
          nll += r.nll;
          predicted += r.predicted;
          batches[bi]!.forEach((_, b) => scores.push(points.map((p) => r.scores.get(p.layer)![b]!)));
        }
        return { scores, nll: nll / predicted };
      };
      const perLayer = (scores: Scores, i: number) => scores.map((row) => row[i]!);
      const dense = await runAll(new Map(), 'score', 0, 1);
      // Each routed layer's share of the budget: F over the whole model, less what the layers
      // that do not route their cache hold, split evenly (by entry size) over the routed ones.
      const tokens = rows.reduce((a, r) => a + r.length, 0);
      const weightOf = (layer: number) => costs.layers[layer]!.kvPerToken;
      const allWeight = costs.layers.reduce((a, c) => a + c.kvPerToken, 0);
      const routedWeight = points.reduce((a, p) => a + weightOf(p.layer), 0);
      const share = (o.targetKv * allWeight - (allWeight - routedWeight)) / routedWeight;
      if (!(share > 0)) throw new ModcError(unreachable(o.targetKv, policy, rows, skipped));
      const place = (scores: Scores) => {
        const targets = new Map(points.map((p) => [p.layer, share]));
        const thresholds = new Map<number, number>();
        const achieved = new Map<number, number>();
        // A layer that cannot use its whole share passes the rest on (a few rounds: ties are rare).
        for (let round = 0; round < 4; round++) {
          points.forEach((p, i) => {
            const t = kvThreshold(perLayer(scores, i), policy, targets.get(p.layer)!);
            if (!t) throw new ModcError(unreachable(o.targetKv, policy, rows, skipped));
            thresholds.set(p.layer, t.threshold);
            achieved.set(p.layer, t.kvFraction);
          });
          const left = points.reduce((a, p) => a + weightOf(p.layer) * (share - achieved.get(p.layer)!), 0);
          const open = points.filter((p) => achieved.get(p.layer)! > targets.get(p.layer)! - 1 / tokens && achieved.get(p.layer)! < 1);
          const openWeight = open.reduce((a, p) => a + weightOf(p.layer), 0);
          if (left * tokens < 1 || openWeight === 0) break;
          for (const p of points) targets.set(p.layer, achieved.get(p.layer)!);
          for (const p of open) targets.set(p.layer, achieved.get(p.layer)! + left / openWeight);
        }
        return { thresholds, targets };
      };
      let { thresholds, targets } = place(dense.scores);
      const rounds = o.refineRounds;
      for (let round = 0; round < rounds; round++) ({ thresholds, targets } = place((await runAll(thresholds, 'refine', round, rounds + 1)).scores));
      // Measure; a layer the final run finds above its share keeps fewer tokens until none is.
      let final = await runAll(thresholds, 'refine', rounds, rounds + 1);
      for (let tries = 0; tries < 4; tries++) {
        const over = points.filter((p, i) => layerKvFraction(perLayer(final.scores, i), policy, thresholds.get(p.layer)!).kv > targets.get(p.layer)! + 1e-9);
        if (over.length === 0) break;
        for (const p of over) {
          const i = points.indexOf(p);
          const s = perLayer(final.scores, i);
          const target = targets.get(p.layer)!;
          const t = kvThreshold(s, policy, target - (layerKvFraction(s, policy, thresholds.get(p.layer)!).kv - target) - 1e-6);
          if (!t) throw new ModcError(unreachable(o.targetKv, policy, rows, skipped));
          thresholds.set(p.layer, Math.max(t.threshold, thresholds.get(p.layer)!));
        }
        final = await runAll(thresholds, 'refine', rounds, rounds + 1);
      }
      progress({ stage: 'done', done: 1, total: 1 });

      const layerReports: KvLayerReport[] = points.map((p, i) => {
        const m = layerKvFraction(perLayer(final.scores, i), policy, thresholds.get(p.layer)!);
        return { layer: p.layer, keptFraction: m.kept, kvFraction: m.kv, threshold: thresholds.get(p.layer)!, r2: fits[i]!.r2 };
      });
      const measured = measure(costs, final.scores, points, thresholds, policy, opts.alongside, rows);
      const floor = rows.reduce((a, r) => a + Math.min(r.length, policy.sinks + policy.window), 0) / rows.reduce((a, r) => a + r.length, 0);
      return {
        routers: fits.map((f) => {
          const report = layerReports.find((l) => l.layer === f.layer)!;
          return { layer: f.layer, part: 'kv', weight: f.weight, bias: -thresholds.get(f.layer)!, capacity: report.keptFraction, threshold: 0.5 };
        }),
        kv: policy,
        report: {
          tokens: rows.reduce((a, r) => a + r.length, 0),
          sequences: rows.length,
          // With compute routers alongside the first run is not the original model (calibrateKvWithCompute fills it in).
          denseNll: opts.alongside ? NaN : dense.nll,
          ...(opts.alongside ? { computeOnlyNll: dense.nll } : {}),
          nll: final.nll,
          kvFraction: measured.kv,
          computeFraction: measured.compute,
          floor,
          layers: layerReports,
          skipped,
        },
        recipe: {
          targetKv: o.targetKv,
          sinks: policy.sinks,
          window: policy.window,
          target: `log(${MASS_FLOOR} + attention mass from queries >= window later, summed over heads)`,
          ridge: o.ridge,
          allocation: 'uniform share of F per routed layer; a share a layer cannot use (tied scores) passed to the others',
          refineRounds: o.refineRounds,
          maxTokens: o.maxTokens,
          seed: o.seed,
        },
      };
    } finally {
      await ev.release();
    }
  } finally {
    if (ownDir) rmSync(ownDir, { recursive: true, force: true });
  }
}

function streamType(s: DecoderStructure): number {
  return s.dtype === 'float16' ? DataType.FLOAT16 : s.dtype === 'bfloat16' ? DataType.BFLOAT16 : DataType.FLOAT;
}

function unreachable(F: number, policy: KvPolicy, rows: readonly number[][], skipped: readonly { layer: number }[]): string {
  const floor = rows.reduce((a, r) => a + Math.min(r.length, policy.sinks + policy.window), 0) / rows.reduce((a, r) => a + r.length, 0);
  const others = skipped.length ? `, and layer(s) ${skipped.map((u) => u.layer).join(', ')} hold every entry` : '';
  return `cannot reach KV fraction ${F}: the ${policy.sinks} sinks and the window of ${policy.window} alone hold ${floor.toFixed(3)} of these sequences' tokens${others} (lower --kv-sinks or --kv-window, or give longer sequences)`;
}

/** Standard deviation of w . x on the data `stats` summarises. */
function scoreStd(stats: RidgeStats, w: Float32Array): number {
  const d = stats.dim;
  const n = stats.n;
  const mean = Float64Array.from(stats.sumX, (v) => v / n);
  let v = 0;
  for (let i = 0; i < d; i++) {
    for (let j = i; j < d; j++) {
      const c = stats.gram[i * d + j]! / n - mean[i]! * mean[j]!;
      v += (i === j ? 1 : 2) * w[i]! * w[j]! * c;
    }
  }
  return Math.sqrt(Math.max(v, 0));
}

/** KV and compute fractions on the calibration data as modc eval counts them. */
function measure(
  costs: ModelCosts,
  scores: Scores,
  points: readonly KvPoint[],
  thresholds: ReadonlyMap<number, number>,
  policy: KvPolicy,
  alongside: CalibrationResult | undefined,
  rows: readonly number[][],
): { kv: number; compute: number } {
  let held = 0;
  let heldDense = 0;
  let macs = 0;
  let macsDense = 0;
  scores.forEach((row, r) => {
    const n = rows[r]!.length;
    const dense = denseUsage(costs, n);
    const usage: RowUsage = { tokens: n, layers: dense.layers.map((l) => ({ ...l })) };
    points.forEach((p, i) => {
      const keep = Uint8Array.from(row[i]!, (v) => (v >= thresholds.get(p.layer)! ? 1 : 0));
      const u = usage.layers[p.layer]!;
      const k = kvRowUsage(keep, policy.sinks, policy.window);
      u.pairs = k.pairs;
      u.kvHeld = k.held;
      u.routers += 1;
    });
    // MLP parts routed alongside: charged at their calibrated fraction (their own report measures them
    // exactly), a surrogate on the tokens its part skips; an MLP replaced by its surrogate, on every token.
    for (const a of alongside?.routers ?? []) {
      const u = usage.layers[a.layer]!;
      const f = alongside!.report.parts.find((q) => q.layer === a.layer && q.part === a.part)?.selectedFraction ?? a.capacity;
      if (a.part === 'mlp') u.mlp = f * n;
      u.routers += 1;
      if (a.surrogate) u.surrogateMacs = (u.surrogateMacs ?? 0) + surrogateMacs(a.surrogate, costs.hiddenSize) * (1 - f) * n;
    }
    for (const r of alongside?.replaced ?? []) {
      const u = usage.layers[r.layer]!;
      u.mlp = 0;
      u.surrogateMacs = (u.surrogateMacs ?? 0) + surrogateMacs(r.surrogate, costs.hiddenSize) * n;
    }
    held += kvElements(costs, usage);
    heldDense += kvElements(costs, dense);
    macs += executedMacs(costs, usage);
    macsDense += executedMacs(costs, dense);
  });
  return { kv: held / heldDense, compute: macs / macsDense };
}

/**
 * Key/value routers for `kvOpts.targetKv` together with MLP routers for `compute.targetCompute`
 * (`modc calibrate --target-kv F --target-compute C`). Key/value routing saves attention pairs on
 * its own, so the MLP parts only make up the rest: kv routers are calibrated alone first, their
 * compute fraction on the data measured, and the MLP parts calibrated for C plus what the kv
 * routing saves (none when kv routing alone reaches C); then the kv thresholds are placed again
 * with the MLP parts routed.
 */
export async function calibrateKvWithCompute(
  original: Model | string,
  sequences: readonly number[][],
  kvOpts: KvCalibrateOptions,
  computeOpts: CalibrateOptions,
): Promise<{ kv: KvCalibrationResult; compute: CalibrationResult | null; computeTarget: number }> {
  if (typeof original === 'string') original = loadModel(original);
  const alone = await calibrateKv(original, sequences, kvOpts);
  const saved = 1 - alone.report.computeFraction;
  const computeTarget = computeOpts.targetCompute + saved;
  if (computeTarget >= 1) return { kv: alone, compute: null, computeTarget };
  const compute = await calibrate(original, sequences, { ...computeOpts, granularity: 'mlp', targetCompute: computeTarget });
  const kv = await calibrateKv(original, sequences, { ...kvOpts, alongside: compute });
  // The original model's NLL is the kv-alone run's (calibrateKv ran the second one with the MLP parts routed).
  kv.report = { ...kv.report, denseNll: alone.report.denseNll };
  return { kv, compute, computeTarget };
}

/** The router file's metadata: kv routers (and compute routers calibrated alongside), policy, reports. */
export function kvRouterFileMetadata(
  kv: KvCalibrationResult,
  compute: CalibrationResult | null,
  data: { path: string; lines?: number; sha256?: string },
): RouterFileMetadata {
  return {
    mode: 'threshold',
    gated: compute?.gated ?? false,
    kv: kv.kv,
    layers: [
      ...(compute ? routerFileMetadata(compute, { path: data.path, tokens: 0, sequences: 0 }).layers! : []),
      ...kv.routers.map((r) => ({ layer: r.layer, part: r.part, capacity: r.capacity, threshold: r.threshold })),
    ],
    calibration: {
      tool: 'modc calibrate',
      data: { ...data, tokens: kv.report.tokens, sequences: kv.report.sequences },
      kv: { recipe: kv.recipe, report: kv.report },
      ...(compute ? { compute: { recipe: compute.recipe, report: compute.report } } : {}),
    },
  };
}
