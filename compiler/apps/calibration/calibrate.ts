/**
 * `calibrate`: routers that keep quality, from the model and a little data.
 *
 *   1. capture: run the original model batch by batch with each layer's stream points exposed;
 *      reduce each batch to ridge statistics per routed part (input Gram matrix, input-target
 *      sums) and drop it;
 *   2. fit: one router per part in closed form (ridge regression of a per-token importance
 *      target on the part's input), scaled so scores are in standard deviations. With
 *      surrogates (the default), each MLP part first gets low-rank linear surrogates of its
 *      update (surrogate.ts; one variant per rank), and each variant's router is fitted, in a
 *      second capture pass, to the surrogate's residual |m - s(u)| / |h|: what a skipped token
 *      loses once the surrogate stands in for the MLP;
 *   3. score: run the model compiled with every candidate router (all selecting every token, so
 *      the activations are the original's) and keep each part's scores on the data;
 *   4. sensitivity: the NLL increase when one part alone is routed at a few capacities, each
 *      capacity set by a threshold between scores (exact: the real compiled model); a
 *      surrogate variant also at capacity 0 (the surrogate on every token, no router);
 *   5. allocate: greedy by loss per compute saved, to the target compute fraction (variants of
 *      one MLP part exclude each other; a variant's saving is net of its surrogate's MACs);
 *   6. refit (surrogates): in layer order, each chosen surrogate is fitted again with every
 *      chosen part routed (the surrogates above it already refitted), to what restores the
 *      dense stream: u (routed) -> out_dense - h (routed) on the tokens the part skips;
 *   7. refine: with every chosen part routed, re-set each part's threshold from the scores its
 *      router now sees (upstream routing shifts them), so each part keeps its capacity.
 *
 * Every threshold is baked into the router's bias, so p = 0.5 selects the calibrated fraction,
 * and top-k decode (r >= 0.5) agrees with it.
 */
import { rmSync } from 'node:fs';
import type { Model } from '../../core/ir/model.js';
import { ModcError, UsageError } from '../../core/errors.js';
import { cloneModel } from '../../core/io/convert.js';
import { loadModel } from '../../core/io/load.js';
import { workFolder } from '../../core/io/work-folder.js';
import { mulberry32 } from '../../core/random.js';
import { decoderIo } from '../../metadata/decoder-io.js';
import { type EmbeddingSource, genaiEmbeddingModel } from '../../runtime/embeddings.js';
import type { SessionOptions } from '../../runtime/ort.js';
import { splitAndAnalyze } from '../../passes/split-fused-boundaries.js';
import type { DecoderStructure } from '../../analysis/types.js';
import { allocate, type PartSensitivity } from './allocate.js';
import { ActivationCapture, layerPoints, type LayerPoints, STREAM_TYPE } from './capture.js';
import { modelCosts, type ModelCosts } from '../../analysis/cost.js';
import { denseMacs, savedMacs } from './compute.js';
import { type PartRouter, RoutedEvaluator } from './sensitivity.js';
import { allowedParts, type Granularity, partKey, type PartRef, type RoutedPart } from './parts.js';
import { RidgeStats, solveRidge, thresholdKeeping } from './ridge.js';
import { importanceTargets, partValues, TARGET_KINDS, type TargetKind } from './targets.js';
import { applySurrogate, defaultRanks, fitSurrogate, fitSurrogates, SurrogateStats } from './surrogate.js';
import { mlpInputNames } from './surrogate-inputs.js';
import { surrogateMacs, type ReplacedPart } from '../../routing/router-weights.js';

export interface CalibrateOptions {
  /** Compute fraction to reach, in (0, 1]. */
  targetCompute: number;
  granularity?: Granularity;
  mode?: 'threshold' | 'topk';
  /** Use at most this many tokens of the data (sequences drawn in a seeded order). */
  maxTokens?: number;
  seed?: number;
  target?: TargetKind;
  /** Ridge penalty on standardised inputs. */
  ridge?: number;
  /** Capacities at which each part's sensitivity is measured. */
  capacities?: number[];
  /** Tokens used for the sensitivity runs. */
  sensitivityTokens?: number;
  /** Aim this much below the target on the calibration data (threshold drift on unseen data). */
  margin?: number;
  gated?: boolean;
  /** Tokens per batch (bounds memory: one batch of activations at a time); default from batchBytes. */
  batchTokens?: number;
  batchBytes?: number;
  /** Threshold refinement rounds with every chosen part routed. */
  refineRounds?: number;
  /** MLP surrogates: `lowrank` (default) fits linear surrogates at each of `surrogateRanks`; `none` skips tokens with no update. */
  surrogate?: 'none' | 'lowrank';
  /** Surrogate ranks, one variant per rank (default: about 5% and 10% of the MLP's MACs, multiples of 8). */
  surrogateRanks?: number[];
  /** Refit the chosen surrogates in layer order with every chosen part routed (default true). */
  refit?: boolean;
  workDir?: string;
  session?: SessionOptions;
  onProgress?: (p: Progress) => void;
}

export interface Progress {
  stage: 'capture' | 'fit' | 'score' | 'sensitivity' | 'refit' | 'refine' | 'done';
  done: number;
  total: number;
}

/** A calibrated router as written to the router file. */
export interface CalibratedRouter extends PartRouter {
  capacity: number;
  threshold: number;
}

export interface PartReport extends PartRef {
  capacity: number;
  /** The part's surrogate: rank and R2 of s(u) for the MLP's update on the calibration data. */
  surrogate?: { rank: number; r2: number };
  /** Selected fraction on the calibration data with every chosen part routed. */
  selectedFraction: number;
  r2: number;
  predictedDeltaNll: number;
}

export interface CalibrationReport {
  tokens: number;
  sequences: number;
  denseNll: number;
  /** NLL on the calibration data with the chosen routers (threshold or top-k as chosen; measured in threshold form). */
  nll: number;
  /** Compute fraction on the calibration data by the cost model, with the selected fractions measured. */
  computeFraction: number;
  predictedCompute: number;
  parts: PartReport[];
  sensitivity: { layer: number; part: RoutedPart; rank?: number; points: { capacity: number; deltaNll: number }[]; r2: number }[];
}

export interface CalibrationResult {
  routers: CalibratedRouter[];
  /** MLP parts replaced by their surrogate on every token (capacity 0, no router). */
  replaced: ReplacedPart[];
  mode: 'threshold' | 'topk';
  gated: boolean;
  report: CalibrationReport;
  /** The recipe: every option that shaped the result, for the file's metadata. */
  recipe: Record<string, unknown>;
}

export const DEFAULTS = {
  granularity: 'auto' as Granularity,
  mode: 'threshold' as const,
  maxTokens: 65536,
  seed: 0,
  target: 'relative' as TargetKind,
  ridge: 1e-3,
  capacities: [0.75, 0.5, 0.25],
  /** Default: about 6 passes over the data in total, 1024 to 8192 tokens per measurement. */
  sensitivityTokens: 0,
  /** With surrogates; 0.02 without (`surrogate: 'none'`). */
  margin: 0.01,
  /** Bytes of activations (or logits) one batch may hold; sets the batch size when batchTokens is absent. */
  batchBytes: 64 * 2 ** 20,
  refineRounds: 2,
  surrogate: 'lowrank' as 'none' | 'lowrank',
  refit: true,
};

/** Hidden sizes above this get no MLP surrogates unless asked for (`surrogate: 'lowrank'`). */
export const MAX_SURROGATE_HIDDEN = 2048;

/** The margin when MLP parts have no surrogate. */
export const MARGIN_WITHOUT_SURROGATES = 0.02;

/** Checks option ranges (usage errors), before any work. */
export function checkCalibrateOptions(o: CalibrateOptions): void {
  if (!(o.targetCompute > 0 && o.targetCompute <= 1)) throw new UsageError(`--target-compute must be in (0, 1], got ${o.targetCompute}`);
  if (o.maxTokens !== undefined && !(Number.isInteger(o.maxTokens) && o.maxTokens >= 2))
    throw new UsageError(`--max-tokens must be an integer >= 2, got ${o.maxTokens}`);
  if (o.capacities?.some((c) => !(c > 0 && c < 1))) throw new UsageError('sensitivity capacities must be in (0, 1)');
  if (o.ridge !== undefined && !(o.ridge > 0)) throw new UsageError(`the ridge penalty must be > 0, got ${o.ridge}`);
  if (o.surrogateRanks?.some((r) => !(Number.isInteger(r) && r >= 1))) throw new UsageError('surrogate ranks must be integers >= 1');
}

/** Sequences in a seeded order, cut to `maxTokens` in total. */
export function pickSequences(sequences: readonly number[][], maxTokens: number, seed: number): number[][] {
  const order = sequences.map((_, i) => i);
  const next = mulberry32(seed);
  for (let i = order.length - 1; i > 0; i--) {
    const j = Math.floor(next() * (i + 1));
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  const out: number[][] = [];
  let total = 0;
  for (const i of order) {
    const s = sequences[i]!;
    if (s.length < 2) continue;
    const take = Math.min(s.length, maxTokens - total);
    if (take < 2) break;
    out.push(s.slice(0, take));
    total += take;
  }
  return out;
}

/** Consecutive groups of rows holding about `batchTokens` tokens (padded width x rows). */
export function batchesOf(rows: readonly number[][], batchTokens: number): number[][][] {
  const out: number[][][] = [];
  let cur: number[][] = [];
  let width = 0;
  for (const r of rows) {
    const w = Math.max(width, r.length);
    if (cur.length > 0 && w * (cur.length + 1) > batchTokens) {
      out.push(cur);
      cur = [];
    }
    cur.push(r);
    width = Math.max(...cur.map((c) => c.length));
  }
  if (cur.length) out.push(cur);
  return out;
}

/** Checks the data against the model: ids in the vocabulary, lengths within its positions. */
function checkData(sequences: readonly number[][], vocab: number | null, maxPositions: number | null): void {
  if (sequences.length === 0) throw new ModcError('the calibration data has no sequence of at least 2 tokens');
  sequences.forEach((s, i) => {
    const bad = s.find((id) => !Number.isInteger(id) || id < 0 || (vocab !== null && id >= vocab));
    if (bad !== undefined)
      throw new ModcError(`calibration sequence ${i + 1}: token id ${bad} is outside the model's vocabulary${vocab !== null ? ` (0-${vocab - 1})` : ''}`);
    if (maxPositions !== null && s.length > maxPositions)
      throw new ModcError(
        `calibration sequence ${i + 1} has ${s.length} tokens, more than the model's ${maxPositions} positions (split the data, e.g. with a max length)`,
      );
  });
}

/** One ridge accumulator per distinct part input; targets are (part, kind) pairs. */
interface InputStats {
  input: string;
  parts: { ref: PartRef; from: string; to: string }[];
  stats: RidgeStats;
}

/** Everything calibration measures before choosing: fits, dense scores, per-part sensitivity. */
/** What `Calibrator.prepare` measured, kept for `finish`. */
interface Measured {
  /** The model with its fused layer boundaries split, as the routed evaluators compile it. */
  model: Model;
  structure: DecoderStructure;
  o: ResolvedOptions;
  workDir: string;
  /** The temp folder calibration made (removed by release), or null for the caller's workDir. */
  ownDir: string | null;
  costs: ModelCosts;
  rows: number[][];
  batches: number[][][];
  /** Per candidate key (candidateKey): the router (with its surrogate), the router fit's R2 and the surrogate's. */
  fits: Map<string, Fit>;
  denseScores: Map<string, Float32Array>;
  /** Mean dense NLL per predicted token, and the number of predicted tokens. */
  denseNll: number;
  predicted: number;
  sensitivity: PartSensitivity[];
  /** Tokens each sensitivity measurement ran on. */
  sensitivityTokens: number;
  /** Where a decoder fed inputs_embeds gets its embeddings (the model genai_config.json names). */
  embeddings: EmbeddingSource | null;
}

export class Calibrator {
  private constructor(private readonly m: Measured) {}

  get costs(): ModelCosts {
    return this.m.costs;
  }

  get rows(): number[][] {
    return this.m.rows;
  }

  get fits(): Map<string, Fit> {
    return this.m.fits;
  }

  get denseNll(): number {
    return this.m.denseNll;
  }

  get sensitivity(): PartSensitivity[] {
    return this.m.sensitivity;
  }

  get sensitivityTokens(): number {
    return this.m.sensitivityTokens;
  }

  get lengths(): number[] {
    return this.rows.map((r) => r.length);
  }

  get tokens(): number {
    return this.rows.reduce((a, r) => a + r.length, 0);
  }

  /**
   * Steps 1-4: capture, fit, dense scores, sensitivity of every part `opts.granularity` allows.
   * `original` is a path or a model loadModel read; it is not changed.
   */
  static async prepare(original: Model | string, sequences: readonly number[][], opts: CalibrateOptions): Promise<Calibrator> {
    checkCalibrateOptions(opts);
    if (typeof original === 'string') original = loadModel(original);
    const o = resolveOptions(opts);
    const progress = opts.onProgress ?? (() => {});
    const modelPath = original.sourcePath ?? 'the model';
    const io = decoderIo(original);
    const model = cloneModel(original);
    const structure = splitAndAnalyze(model);
    const costs = modelCosts(structure);
    const points = layerPoints(structure);
    const H = structure.hiddenSize;

    // A decoder fed inputs_embeds is calibrated on the real token embeddings, as eval scores it.
    const embeddingModel = io.inputsEmbeds && original.sourcePath ? genaiEmbeddingModel(original.sourcePath) : null;
    if (io.inputsEmbeds && !embeddingModel)
      throw new ModcError(`${modelPath} takes inputs_embeds: calibrate needs the embedding model that genai_config.json beside it names`);
    const embeddings: EmbeddingSource | null = embeddingModel ? { kind: 'model', path: embeddingModel } : null;
    const rows = pickSequences(sequences, o.maxTokens, o.seed);
    checkData(rows, io.vocabSize, io.maxPositions);
    const perToken = 4 * Math.max((2 * points.length + 1) * H, io.vocabSize ?? 0);
    // A model that runs one row per call (DecoderIo.batchOne), or cannot mask padding, gets one row per batch.
    const batches = io.batchOne || io.unpaddable ? rows.map((r) => [r]) : batchesOf(rows, opts.batchTokens ?? Math.max(Math.floor(o.batchBytes / perToken), 1));

    const parts = candidateParts(points, allowedParts(o.granularity));
    if (parts.length === 0) throw new ModcError(`no layer of this model can be routed at granularity ${o.granularity}`);
    // MLP parts with a normalised input a surrogate can read: one candidate per surrogate rank.
    // Surrogate statistics hold two H x H sums per MLP and the fit is O(H^3): by default only up to MAX_SURROGATE_HIDDEN.
    const surrogates = o.surrogate === 'lowrank' && (opts.surrogate === 'lowrank' || H <= MAX_SURROGATE_HIDDEN);
    if (!surrogates) {
      o.surrogate = 'none';
      if (opts.margin === undefined) o.margin = MARGIN_WITHOUT_SURROGATES;
    }
    const uNames = surrogates ? mlpInputNames(model, structure) : points.map(() => null);
    const ranksOf = (layer: number) =>
      o.surrogateRanks?.length ? [...new Set(o.surrogateRanks.map((r) => Math.min(r, H)))] : defaultRanks(costs.layers[layer]!.mlp, H);
    const candidates: Candidate[] = parts.flatMap((p) =>
      p.part === 'mlp' && uNames[p.layer] ? ranksOf(p.layer).map((rank, variant) => ({ ...p, rank, variant, surrogateMacs: surrogateMacs({ rank }, H) })) : [p],
    );
    const surrogateLayers = [...new Set(candidates.filter((c) => c.rank !== undefined).map((c) => c.layer))];

    const ownDir = opts.workDir ? null : workFolder(model, 'modc-calibrate');
    const workDir = opts.workDir ?? ownDir!;
    const evaluators = new Map<string, RoutedEvaluator>();
    try {
      // 1. capture -> ridge statistics (and the surrogates' statistics of u and m)
      const inputs = groupByInput(
        points,
        candidates.filter((c) => c.rank === undefined),
        H,
      );
      const surStats = new Map(surrogateLayers.map((l) => [l, new SurrogateStats(H)]));
      const extra = surrogateLayers.map((l) => uNames[l]!);
      const capture = await ActivationCapture.create(model, structure, workDir, opts.session, embeddings, extra);
      const passes = surrogateLayers.length > 0 ? 2 : 1;
      const fits = new Map<string, Fit>();
      const routerStats = new Map<number, RidgeStats>();
      try {
        for (let pass = 0; pass < passes; pass++) {
          for (let bi = 0; bi < batches.length; bi++) {
            progress({ stage: 'capture', done: pass * batches.length + bi, total: passes * batches.length });
            const batch = await capture.batch(batches[bi]!);
            const values = await capture.run(batch);
            if (pass === 0) {
              for (const g of inputs) {
                const t = g.parts.flatMap((p) => {
                  const all = importanceTargets(values.get(p.from)!, values.get(p.to)!, batch.real, H);
                  return TARGET_KINDS.map((k) => all[k]);
                });
                if (g.parts.length) g.stats.add(values.get(g.input)!, batch.real, t);
              }
              for (const l of surrogateLayers) {
                const v = partValues(points[l]!, 'mlp')!;
                surStats.get(l)!.add(values.get(uNames[l]!)!, difference(values.get(v.to)!, values.get(v.from)!), batch.real);
              }
            } else {
              // Each variant's router target: the surrogate's residual relative to the stream.
              for (const l of surrogateLayers) {
                const v = partValues(points[l]!, 'mlp')!;
                const variants = candidates.filter((c) => c.layer === l && c.rank !== undefined);
                const t = variants.map((c) =>
                  residualTargets(fits.get(candidateKey(c))!.router.surrogate!, values.get(uNames[l]!)!, values.get(v.from)!, values.get(v.to)!, batch.real, H),
                );
                if (!routerStats.has(l)) routerStats.set(l, new RidgeStats(H, variants.length));
                routerStats.get(l)!.add(values.get(v.input)!, batch.real, t);
              }
            }
          }
          if (pass === 0) {
            // Surrogates, one per rank (one ridge solve per layer).
            for (const l of surrogateLayers) {
              const variants = candidates.filter((c) => c.layer === l && c.rank !== undefined);
              const fitted = fitSurrogates(
                surStats.get(l)!,
                o.ridge,
                variants.map((c) => c.rank!),
              );
              variants.forEach((c, i) => {
                const { r2, ...surrogate } = fitted[i]!;
                fits.set(candidateKey(c), {
                  router: { layer: c.layer, part: c.part, weight: new Float32Array(H), bias: 0, surrogate },
                  r2: 0,
                  surrogateR2: r2,
                });
              });
            }
          }
        }
      } finally {
        await capture.release();
      }

      // 2. fit: scores in standard deviations of the fitted target
      const kindIndex = TARGET_KINDS.indexOf(o.target);
      let fitted = 0;
      for (const g of inputs) {
        g.parts.forEach((p, i) => {
          progress({ stage: 'fit', done: fitted++, total: candidates.length });
          const fit = solveRidge(g.stats, o.ridge, i * TARGET_KINDS.length + kindIndex);
          const scale = fit.predictionStd > 0 ? 1 / fit.predictionStd : 1;
          fits.set(partKey(p.ref), { router: { ...p.ref, weight: Float32Array.from(fit.weight, (w) => w * scale), bias: 0 }, r2: fit.r2 });
        });
      }
      for (const l of surrogateLayers) {
        candidates
          .filter((c) => c.layer === l && c.rank !== undefined)
          .forEach((c, i) => {
            progress({ stage: 'fit', done: fitted++, total: candidates.length });
            const fit = solveRidge(routerStats.get(l)!, o.ridge, i);
            const scale = fit.predictionStd > 0 ? 1 / fit.predictionStd : 1;
            const f = fits.get(candidateKey(c))!;
            fits.set(candidateKey(c), { ...f, router: { ...f.router, weight: Float32Array.from(fit.weight, (w) => w * scale) }, r2: fit.r2 });
          });
      }

      // 3. dense scores per part (every router selects every token: the original activations)
      for (const [name, group] of familiesOf(candidates)) {
        evaluators.set(
          name,
          await RoutedEvaluator.create(
            model,
            group.map((p) => fits.get(candidateKey(p))!.router),
            workDir,
            `calib-${name}`,
            opts.session,
            embeddings,
          ),
        );
      }
      const first = [...evaluators.values()][0]!;
      let denseNll = 0;
      let predicted = 0;
      const perBatchDense: number[] = [];
      const chunks = new Map<string, Float32Array[]>();
      let step = 0;
      for (const [name, ev] of evaluators) {
        const group = familiesOf(candidates).get(name)!;
        for (const rowsOfBatch of batches) {
          progress({ stage: 'score', done: step++, total: batches.length * evaluators.size });
          const r = await ev.run(await ev.batch(rowsOfBatch), new Map(), { scores: true, logits: ev === first });
          if (ev === first) {
            denseNll += r.nll;
            predicted += r.predicted;
            perBatchDense.push(r.nll);
          }
          for (const c of group) pushTo(chunks, candidateKey(c), r.scores!.get(partKey(c))!);
        }
      }
      const denseScores = new Map([...chunks].map(([k, list]) => [k, concat(list)]));

      // 4. sensitivity: one part routed alone, on the first batches (about sensitivityTokens tokens)
      const capacitiesOf = (c: Candidate) => (c.rank !== undefined ? [...o.capacities, 0] : o.capacities);
      const measurements = candidates.reduce((a, c) => a + capacitiesOf(c).length, 0);
      const sensTokens = o.sensitivityTokens || defaultSensitivityTokens(rows, measurements);
      const sensBatches: number[] = [];
      for (let bi = 0, n = 0; bi < batches.length && n < sensTokens; bi++) {
        sensBatches.push(bi);
        n += batches[bi]!.reduce((a, r) => a + r.length, 0);
      }
      const sensDense = sensBatches.reduce((a, bi) => a + perBatchDense[bi]!, 0);
      const sensPredicted = sensBatches.reduce((a, bi) => a + batches[bi]!.reduce((x, r) => x + r.length - 1, 0), 0);
      const sensitivity: PartSensitivity[] = [];
      let done = 0;
      for (const p of candidates) {
        const ev = evaluators.get(familyOf(p))!;
        const key = partKey(p);
        const pts: { capacity: number; deltaNll: number }[] = [];
        for (const c of capacitiesOf(p)) {
          progress({ stage: 'sensitivity', done: done++, total: measurements });
          const bias = -thresholdKeeping(denseScores.get(candidateKey(p))!, c);
          let nll = 0;
          for (const bi of sensBatches) nll += (await ev.run(await ev.batch(batches[bi]!), new Map([[key, bias]]))).nll;
          pts.push({ capacity: c, deltaNll: (nll - sensDense) / sensPredicted });
        }
        sensitivity.push({ ...p, points: pts });
      }
      const sensitivityTokens = sensBatches.reduce((a, bi) => a + batches[bi]!.reduce((x, r) => x + r.length, 0), 0);
      return new Calibrator({
        model,
        structure,
        o,
        workDir,
        ownDir,
        costs,
        rows,
        batches,
        fits,
        denseScores,
        denseNll: denseNll / predicted,
        predicted,
        sensitivity,
        sensitivityTokens,
        embeddings,
      });
    } catch (e) {
      if (ownDir) rmSync(ownDir, { recursive: true, force: true });
      throw e;
    } finally {
      for (const ev of evaluators.values()) await ev.release();
    }
  }

  /**
   * Steps 5-7 for one target: allocate, refit the chosen surrogates, then refine each chosen part's threshold with every
   * chosen part routed. `granularity` may narrow what `prepare` measured.
   */
  async finish(
    target: { targetCompute: number; granularity?: Granularity; mode?: 'threshold' | 'topk'; gated?: boolean; margin?: number },
    onProgress?: (p: Progress) => void,
  ): Promise<CalibrationResult> {
    checkCalibrateOptions({ targetCompute: target.targetCompute });
    const o = { ...this.m.o, ...Object.fromEntries(Object.entries(target).filter(([, v]) => v !== undefined)) } as ResolvedOptions;
    const progress = onProgress ?? this.m.o.onProgress ?? (() => {});
    const allowed = allowedParts(o.granularity);
    const sens = this.m.sensitivity.filter((s) => allowed.includes(s.part));
    if (sens.length === 0) throw new ModcError(`no layer of this model can be routed at granularity ${o.granularity}`);
    const lengths = this.lengths;
    const tokens = this.tokens;
    const alloc = allocate(sens, this.m.costs, lengths, Math.max(o.targetCompute - o.margin, 0));
    if (alloc.predictedCompute > o.targetCompute) {
      throw new ModcError(
        `cannot reach compute fraction ${o.targetCompute} by routing ${o.granularity === 'auto' ? 'parts' : `${o.granularity} parts`} at the measured capacities (lowest reachable: ${alloc.predictedCompute.toFixed(3)})`,
      );
    }

    const chosen = alloc.parts.map((p) => ({ ...this.m.fits.get(candidateKey(p))!.router, capacity: p.capacity, key: candidateKey(p) }));
    const biases = new Map(chosen.map((p) => [partKey(p), -thresholdKeeping(this.m.denseScores.get(p.key)!, p.capacity)]));
    let final = { nll: this.m.denseNll * this.m.predicted, selected: new Map<string, number>() };
    if (o.refit && chosen.some((p) => p.surrogate)) await this.refit(chosen, biases, o.ridge, progress);
    if (chosen.length > 0) {
      const ev = await RoutedEvaluator.create(this.m.model, chosen, this.m.workDir, 'calib-chosen', this.m.o.session, this.m.embeddings);
      try {
        const rounds = o.refineRounds;
        for (let round = 0; round <= rounds; round++) {
          const scoreChunks = new Map<string, Float32Array[]>();
          let nll = 0;
          const selected = new Map<string, number>();
          for (let bi = 0; bi < this.m.batches.length; bi++) {
            progress({ stage: 'refine', done: round * this.m.batches.length + bi, total: (rounds + 1) * this.m.batches.length });
            const r = await ev.run(await ev.batch(this.m.batches[bi]!), biases, { scores: round < rounds, logits: round === rounds });
            nll += r.nll;
            for (const [k, v] of r.selected) selected.set(k, (selected.get(k) ?? 0) + v);
            if (r.scores) for (const [k, sc] of r.scores) pushTo(scoreChunks, k, sc);
          }
          if (round < rounds) for (const p of chosen) biases.set(partKey(p), -thresholdKeeping(concat(scoreChunks.get(partKey(p))!), p.capacity));
          else final = { nll, selected };
        }
      } finally {
        await ev.release();
      }
    }
    progress({ stage: 'done', done: 1, total: 1 });

    const fractions = new Map(chosen.map((p) => [partKey(p), (final.selected.get(partKey(p)) ?? 0) / tokens]));
    // An MLP part at capacity 0 with a surrogate is replaced by it: no router.
    const routers: CalibratedRouter[] = chosen
      .filter((p) => !(p.surrogate && p.capacity <= 0))
      .map((p) => ({
        layer: p.layer,
        part: p.part,
        weight: p.weight,
        bias: biases.get(partKey(p))!,
        capacity: p.capacity,
        threshold: 0.5,
        ...(p.surrogate ? { surrogate: p.surrogate } : {}),
      }));
    const replaced: ReplacedPart[] = chosen
      .filter((p) => p.surrogate && p.capacity <= 0)
      .map((p) => ({ layer: p.layer, part: 'mlp', surrogate: p.surrogate! }));
    return {
      routers,
      replaced,
      mode: o.mode,
      gated: !!o.gated,
      report: {
        tokens,
        sequences: this.m.rows.length,
        denseNll: this.m.denseNll,
        nll: final.nll / this.m.predicted,
        computeFraction: computeFraction(
          this.m.costs,
          lengths,
          alloc.parts.map((p) => ({ ...p, capacity: fractions.get(partKey(p))! })),
        ),
        predictedCompute: alloc.predictedCompute,
        parts: alloc.parts.map((p) => {
          const fit = this.m.fits.get(candidateKey(p))!;
          return {
            layer: p.layer,
            part: p.part,
            capacity: p.capacity,
            selectedFraction: fractions.get(partKey(p))!,
            r2: fit.r2,
            predictedDeltaNll: p.predictedDeltaNll,
            ...(p.rank !== undefined ? { surrogate: { rank: p.rank, r2: fit.surrogateR2 ?? 0 } } : {}),
          };
        }),
        sensitivity: this.m.sensitivity.map((s) => ({
          layer: s.layer,
          part: s.part,
          ...(s.rank !== undefined ? { rank: s.rank } : {}),
          points: s.points,
          r2: this.m.fits.get(candidateKey(s))!.r2,
        })),
      },
      recipe: {
        targetCompute: o.targetCompute,
        granularity: o.granularity,
        mode: o.mode,
        gated: !!o.gated,
        target: o.target,
        ridge: o.ridge,
        capacities: o.capacities,
        sensitivityTokens: this.m.sensitivityTokens,
        margin: o.margin,
        maxTokens: o.maxTokens,
        seed: o.seed,
        refineRounds: o.refineRounds,
        surrogate: o.surrogate,
        ...(o.surrogate === 'lowrank' ? { refit: o.refit } : {}),
        ...(o.surrogate === 'lowrank' ? { surrogateRanks: [...new Set(this.m.sensitivity.flatMap((s) => (s.rank !== undefined ? [s.rank] : [])))] } : {}),
      },
    };
  }

  /**
   * Step 6: each chosen surrogate (layer order, sequential layers) refitted with every chosen
   * part routed: ridge of u (routed) on out_dense - h (routed), over the tokens the part skips.
   * A refit that raises the calibration NLL (measured with every chosen part routed) is undone.
   */
  private async refit(
    chosen: (PartRouter & { capacity: number })[],
    biases: ReadonlyMap<string, number>,
    ridge: number,
    progress: (p: Progress) => void,
  ): Promise<void> {
    const points = layerPoints(this.m.structure);
    const H = this.m.structure.hiddenSize;
    // Not on a layer whose attention is routed too: there out_dense - h would ask u to stand in for skipped attention.
    const order = chosen
      .filter((p) => p.surrogate && !points[p.layer]!.parallel && !chosen.some((o) => o.layer === p.layer && o.part !== 'mlp'))
      .sort((a, b) => a.layer - b.layer);
    const nb = this.m.batches.length;
    const capture = await ActivationCapture.create(this.m.model, this.m.structure, this.m.workDir, this.m.o.session, this.m.embeddings);
    // A refit is kept only if the calibration NLL with it (measured on the next pass) is no worse.
    let baseline: number | null = null;
    let pending: { part: PartRouter; old: PartRouter['surrogate'] } | null = null;
    try {
      for (let i = 0; ;) {
        const p = order[i];
        const ev = await RoutedEvaluator.create(
          this.m.model,
          chosen,
          this.m.workDir,
          'calib-refit',
          this.m.o.session,
          this.m.embeddings,
          STREAM_TYPE[this.m.structure.dtype],
        );
        const stats = new SurrogateStats(H);
        let nll = 0;
        try {
          for (let bi = 0; bi < nb; bi++) {
            progress({ stage: 'refit', done: Math.min(i, order.length - 1) * nb + bi, total: order.length * nb });
            const rows = this.m.batches[bi]!;
            const batch = await ev.batch(rows);
            const r = await ev.run(batch, biases, { values: p !== undefined });
            nll += r.nll;
            if (!p) continue;
            const v = r.values!.get(partKey(p));
            if (!v?.u) return; // the compiled model does not expose what the refit needs: keep the fitted surrogates
            const dense = await capture.run(await capture.batch(rows));
            const skipped = batch.real.filter((t) => !v.selected[t]);
            stats.add(v.u, difference(dense.get(points[p.layer]!.out)!, v.input), skipped);
          }
        } finally {
          await ev.release();
        }
        if (pending) {
          const worse = nll > baseline!;
          if (worse) pending.part.surrogate = pending.old;
          else baseline = nll;
          pending = null;
          if (worse) continue; // measure again with the refit undone
        } else if (baseline === null) baseline = nll;
        if (!p) break;
        if (stats.n > H) {
          const { r2: _, ...surrogate } = fitSurrogate(stats, ridge, p.surrogate!.rank);
          pending = { part: p, old: p.surrogate };
          p.surrogate = surrogate;
        }
        i++;
      }
    } finally {
      await capture.release();
    }
  }

  /** Removes the temp folder (when calibration made it). */
  release(): void {
    if (this.m.ownDir) rmSync(this.m.ownDir, { recursive: true, force: true });
  }
}

/** Capture, fit, measure, allocate, refine: routers for `opts.targetCompute`. */
export async function calibrate(model: Model | string, sequences: readonly number[][], opts: CalibrateOptions): Promise<CalibrationResult> {
  const c = await Calibrator.prepare(model, sequences, opts);
  try {
    return await c.finish(opts);
  } finally {
    c.release();
  }
}

type ResolvedOptions = typeof DEFAULTS & CalibrateOptions & { gated?: boolean };

function resolveOptions(opts: CalibrateOptions): ResolvedOptions {
  const o = { ...DEFAULTS, ...Object.fromEntries(Object.entries(opts).filter(([, v]) => v !== undefined)) } as ResolvedOptions;
  if (opts.margin === undefined && o.surrogate === 'none') o.margin = MARGIN_WITHOUT_SURROGATES;
  return o;
}

/** Tokens per sensitivity measurement: about 6 passes over the data for all of them together. */
function defaultSensitivityTokens(rows: readonly number[][], measurements: number): number {
  const tokens = rows.reduce((a, r) => a + r.length, 0);
  return Math.min(8192, Math.max(1024, Math.floor((6 * tokens) / Math.max(measurements, 1))));
}

function pushTo(m: Map<string, Float32Array[]>, k: string, v: Float32Array): void {
  const list = m.get(k);
  if (list) list.push(v);
  else m.set(k, [v]);
}

/** The cost model's compute fraction with these parts keeping these fractions of tokens. */
export function computeFraction(
  cost: ModelCosts,
  lengths: readonly number[],
  parts: readonly (PartRef & { capacity: number; surrogateMacs?: number })[],
): number {
  const dense = denseMacs(cost, lengths);
  return 1 - parts.reduce((a, p) => a + savedMacs(cost, p.layer, p.part, p.capacity, lengths, p.surrogateMacs ?? 0), 0) / dense;
}

function candidateParts(points: readonly LayerPoints[], allowed: readonly RoutedPart[]): PartRef[] {
  return points.flatMap((p) =>
    allowed.filter((part) => partValues(p, part) !== null && !p.stateful && !(p.mlpOnly && part !== 'mlp')).map((part) => ({ layer: p.layer, part })),
  );
}

function groupByInput(points: readonly LayerPoints[], candidates: readonly PartRef[], H: number): InputStats[] {
  const byInput = new Map<string, { ref: PartRef; from: string; to: string }[]>();
  for (const ref of candidates) {
    const v = partValues(points[ref.layer]!, ref.part)!;
    const list = byInput.get(v.input) ?? [];
    list.push({ ref, from: v.from, to: v.to });
    byInput.set(v.input, list);
  }
  return [...byInput].map(([input, parts]) => ({ input, parts, stats: new RidgeStats(H, parts.length * TARGET_KINDS.length) }));
}

/**
 * Whole-block routers exclude sub-layer ones on a layer, and variants of an MLP part exclude each
 * other: they are measured in separate compiles.
 */
const familyOf = (c: Candidate): string => (c.variant ? `mlp-v${c.variant}` : c.part === 'block' ? 'block' : 'sublayer');

function familiesOf(candidates: readonly Candidate[]): Map<string, Candidate[]> {
  const out = new Map<string, Candidate[]>();
  for (const p of candidates) {
    const f = familyOf(p);
    out.set(f, [...(out.get(f) ?? []), p]);
  }
  return out;
}

/** A part calibration may route; an MLP part with a surrogate is one candidate per rank (variant 0, 1, ...). */
interface Candidate extends PartRef {
  rank?: number;
  variant?: number;
  /** The surrogate's MACs per token it runs on. */
  surrogateMacs?: number;
}

/** A fitted router (with its surrogate, for an MLP variant), its fit's R2 and the surrogate's. */
export interface Fit {
  router: PartRouter;
  r2: number;
  surrogateR2?: number;
}

/** `layer.part`, and `.rRANK` for a surrogate variant. */
export const candidateKey = (c: PartRef & { rank?: number }): string => (c.rank !== undefined ? `${partKey(c)}.r${c.rank}` : partKey(c));

/** a - b, elementwise. */
function difference(a: Float32Array, b: Float32Array): Float32Array {
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i]! - b[i]!;
  return out;
}

/** |m - s(u)| / |from| for the listed real tokens, m = to - from. */
function residualTargets(
  s: import('../../routing/router-weights.js').Surrogate,
  u: Float32Array,
  from: Float32Array,
  to: Float32Array,
  real: Int32Array,
  H: number,
): Float64Array {
  const pred = applySurrogate(s, u, real, H);
  const out = new Float64Array(real.length);
  real.forEach((i, k) => {
    let rr = 0;
    let hh = 0;
    for (let j = 0; j < H; j++) {
      const f = from[i * H + j]!;
      const d = to[i * H + j]! - f - pred[k * H + j]!;
      rr += d * d;
      hh += f * f;
    }
    out[k] = Math.sqrt(rr) / Math.max(Math.sqrt(hh), 1e-12);
  });
  return out;
}

function concat(list: readonly Float32Array[]): Float32Array {
  const out = new Float32Array(list.reduce((a, l) => a + l.length, 0));
  let at = 0;
  for (const l of list) {
    out.set(l, at);
    at += l.length;
  }
  return out;
}
