/**
 * Checking a compiled model against its original, as `modc verify` does:
 * - semantics: the compiled model agrees with the MoD reference executor running the original
 *   with the compiled model's own routers (logits, per-layer cache lengths, KV bytes);
 * - anchor: the original compiled with every token selected, ungated, on the same layers and
 *   parts (block, attention, MLP, kv), reproduces the original.
 * Both run a prompt and then a number of teacher-forced steps.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { analyzeDecoder } from '../../analysis/analyze.js';
import { ModcError } from '../../core/errors.js';
import { loadModel } from '../../core/io/load.js';
import { saveModel } from '../../core/io/save.js';
import type { Model } from '../../core/ir/model.js';
import { ModReference } from '../reference/mod-reference.js';
import { readRoutingMetadata } from '../../metadata/routing-metadata.js';
import { allPassRouters, routerTensorPrefix, type Surrogate } from '../../routing/router-weights.js';
import { DEFAULT_THRESHOLD, describeLayerPart, type RoutingPlan } from '../../routing/routing-plan.js';
import { cudaProviderProblem } from '../../runtime/cuda.js';
import { decoderIo, resolvePadSide } from '../../metadata/decoder-io.js';
import type { ExecutionProvider } from '../../runtime/ort.js';
import { argmax, lastPosition, type Logits, ModSession } from '../../runtime/session.js';
import { checkCompiledFrom } from '../../metadata/source-fingerprint.js';
import { type CompileReport, routingReport } from '../../passes/compile.js';
import { runPipeline } from '../../passes/pass-manager.js';
import { modPipeline } from '../../passes/pipeline.js';
import type { DecoderStructure } from '../../analysis/types.js';

export interface VerifyOptions {
  prompt: number[][];
  steps: number;
  /** Padding side; default: the original model's (left, or right for GroupQueryAttention). */
  pad?: 'left' | 'right';
  /** Largest allowed |logit difference| (default: 1e-4, or 1e-2 for float16 models). */
  tolerance?: number;
  /** Where the compiled model and the anchor pair run (the reference executor runs on the CPU). */
  executionProvider?: ExecutionProvider;
  /** The prompt is the default one: cut to one row for a model that runs one row per call, its rows to one length for a model that cannot mask padding. */
  defaultPrompt?: boolean;
}

export interface CheckResult {
  name: 'semantics' | 'anchor';
  passed: boolean;
  /** Largest |logit difference| at real positions: the prefill, then each step. */
  maxDiff: number[];
  cacheLengthsMatch: boolean;
  kvBytesMatch: boolean;
}

export interface VerifyReport {
  tolerance: number;
  checks: CheckResult[];
  passed: boolean;
}

/** A surrogate's tensors from the compiled model's initializers (`modc.router.{l}.mlp.surrogate.*`). */
function surrogateOf(compiled: Model, layer: number, rank: number): Surrogate {
  const prefix = `modc.${routerTensorPrefix(layer, 'mlp')}.surrogate`;
  const read = (k: string) => {
    const t = compiled.graph.initializers.get(`${prefix}.${k}`)?.initializer;
    if (!t) throw new ModcError(`the compiled model lacks the surrogate tensor ${prefix}.${k} of layer ${layer} (mlp)`);
    return Float32Array.from(t.toNumbers());
  };
  return { rank, a: read('a'), b: read('b'), bias: read('bias') };
}

/** The routing plan a compiled model carries: its metadata plus its router (and surrogate) initializers. */
export function routingPlanOf(compiled: Model): RoutingPlan {
  const meta = readRoutingMetadata(compiled);
  if (!meta) throw new ModcError('the compiled model has no modc routing metadata: was it compiled by modc compile?');
  const replaced = (meta.replaced ?? []).map((r) => ({ layer: r.layer, part: 'mlp' as const, surrogate: surrogateOf(compiled, r.layer, r.surrogate.rank) }));
  if (meta.layers.length === 0 && replaced.length === 0) {
    const why = (meta.skipped ?? []).map((u) => `layer ${describeLayerPart({ layer: u.layer, part: u.part ?? 'block' })}: ${u.reason}`).join('; ');
    throw new ModcError(`the compiled model routes no layer, so there is nothing to verify${why ? ` (${why})` : ''}`);
  }
  const inits = compiled.graph.initializers;
  const layers = meta.layers.map((l) => {
    const prefix = `modc.${routerTensorPrefix(l.layer, l.part)}`;
    const w = inits.get(`${prefix}.weight`)?.initializer;
    const b = inits.get(`${prefix}.bias`)?.initializer;
    if (!w || !b) throw new ModcError(`the compiled model lacks the router tensors of layer ${describeLayerPart(l)} (${prefix}.weight, ${prefix}.bias)`);
    return {
      layer: l.layer,
      part: l.part,
      threshold: l.threshold,
      capacity: l.capacity,
      router: {
        layer: l.layer,
        part: l.part,
        weight: Float32Array.from(w.toNumbers()),
        bias: b.toNumbers()[0]!,
        ...(l.surrogate ? { surrogate: surrogateOf(compiled, l.layer, l.surrogate.rank) } : {}),
      },
    };
  });
  return { mode: meta.mode, gated: meta.gated, layers, ...(replaced.length ? { replaced } : {}), unconverted: [], ...(meta.kv ? { kv: meta.kv } : {}) };
}

/**
 * Refuses a routing plan ORIGINAL cannot carry (a layer it does not have, routers of another
 * width): ORIGINAL is then not the compiled model's source, whatever its metadata says.
 */
export function checkPlanFits(plan: RoutingPlan, structure: DecoderStructure, originalPath: string, compiledPath: string): void {
  const n = structure.layers.length;
  for (const l of plan.layers) {
    if (l.layer >= n)
      throw new ModcError(`${compiledPath} routes layer ${l.layer}, but ${originalPath} has ${n} layers (0-${n - 1}): it is not the compiled model's source`);
    const width = l.router.weight.length;
    if (width !== structure.hiddenSize) {
      throw new ModcError(
        `${compiledPath}'s router of layer ${describeLayerPart(l)} reads ${width} features, but ${originalPath}'s hidden size is ${structure.hiddenSize}: it is not the compiled model's source`,
      );
    }
  }
  for (const r of [
    ...plan.layers.flatMap((l) => (l.router.surrogate ? [{ layer: l.layer, s: l.router.surrogate }] : [])),
    ...(plan.replaced ?? []).map((r) => ({ layer: r.layer, s: r.surrogate })),
  ]) {
    if (r.layer >= n)
      throw new ModcError(
        `${compiledPath} replaces layer ${r.layer}'s MLP, but ${originalPath} has ${n} layers (0-${n - 1}): it is not the compiled model's source`,
      );
    if (r.s.bias.length !== structure.hiddenSize)
      throw new ModcError(
        `${compiledPath}'s surrogate of layer ${r.layer} (mlp) writes ${r.s.bias.length} features, but ${originalPath}'s hidden size is ${structure.hiddenSize}: it is not the compiled model's source`,
      );
  }
}

/**
 * The anchor model: ORIGINAL compiled on the plan's layers and parts with every token selected.
 * Each of them must route there, as it does in the compiled model.
 */
function compileAnchor(original: Model, structure: DecoderStructure, plan: RoutingPlan, originalPath: string): void {
  const anchorPlan = anchorPlanFor(plan, structure.hiddenSize);
  let report: CompileReport;
  try {
    runPipeline(original, modPipeline({ plan: anchorPlan }), { structure });
    report = routingReport(original, anchorPlan, {});
  } catch (e) {
    if (e instanceof ModcError) throw new ModcError(`anchor: compiling ${originalPath} with every token selected failed: ${e.message}`, e.exitCode);
    throw e;
  }
  const missing = plan.layers.find((l) => !report.converted.some((c) => c.layer === l.layer && c.part === l.part));
  if (missing) {
    const why = report.notConverted.find((u) => u.layer === missing.layer && (u.part ?? 'block') === missing.part)?.reason ?? 'it is not converted';
    throw new ModcError(
      `${originalPath} cannot route layer ${describeLayerPart(missing)} as the compiled model does (${why}): it is not the compiled model's source`,
    );
  }
}

/**
 * The equivalence anchor's plan for the same layers and parts as `plan`: every token selected
 * (all-pass routers, threshold routing), ungated. A routed MLP part keeps its surrogate (it then
 * runs on no token); an MLP replaced by its surrogate has no router to select with and stays dense.
 */
export function anchorPlanFor(plan: RoutingPlan, hiddenSize: number): RoutingPlan {
  return {
    mode: 'threshold',
    gated: false,
    layers: plan.layers.map((l) => ({
      layer: l.layer,
      part: l.part,
      threshold: DEFAULT_THRESHOLD,
      capacity: 1,
      router: { ...allPassRouters([l.layer], hiddenSize, l.part)[0]!, ...(l.router.surrogate ? { surrogate: l.router.surrogate } : {}) },
    })),
    unconverted: [],
    ...(plan.kv ? { kv: plan.kv } : {}),
  };
}

interface Runner {
  forward(rows: number[][], opts: { pad: 'left' | 'right' }): Promise<Logits>;
  step(next: number[]): Promise<Logits>;
  layerCacheLengths(): number[][];
  kvBytes(): number;
  /** Drops the cache slots that hold no token (ModSession; the reference holds none). */
  compact?(): void;
}

/** Each row's logits at its last real token: position 0 of last-position logits ([B, 1, V]), else found from the padding. */
export function lastRealOf(l: Logits, rows: number[][], pad: 'left' | 'right'): Float32Array[] {
  const [B, S, V] = l.dims;
  return Array.from({ length: B }, (_, r) => {
    const t = S === 1 || pad === 'left' ? S - 1 : rows[r]!.length - 1;
    return l.data.subarray((r * S + t) * V, (r * S + t + 1) * V);
  });
}

const worstRows = (a: Float32Array[], b: Float32Array[]) => Math.max(...a.map((row, r) => row.reduce((m, v, i) => Math.max(m, Math.abs(v - b[r]![i]!)), 0)));

/**
 * Largest |a - b| over the real (non-padding) positions of a prompt's logits; over each row's
 * last real token when either model gives only that one (`--logits last`).
 */
export function worstReal(a: Logits, b: Logits, rows: number[][], pad: 'left' | 'right'): number {
  if (a.dims[1] !== b.dims[1]) return worstRows(lastRealOf(a, rows, pad), lastRealOf(b, rows, pad));
  const [B, S, V] = a.dims;
  let worst = 0;
  for (let r = 0; r < B; r++) {
    const n = rows[r]!.length;
    for (let t = pad === 'left' ? S - n : 0; t < (pad === 'left' ? S : n); t++) {
      for (let v = 0; v < V; v++) worst = Math.max(worst, Math.abs(a.data[(r * S + t) * V + v]! - b.data[(r * S + t) * V + v]!));
    }
  }
  return worst;
}

/** Runs both on the prompt and `steps` tokens (the first runner's argmax, fed to both). */
async function compare(
  name: CheckResult['name'],
  a: Runner,
  b: Runner,
  opts: VerifyOptions & { pad: 'left' | 'right' },
  tolerance: number,
): Promise<CheckResult> {
  const first = await a.forward(opts.prompt, { pad: opts.pad });
  const maxDiff = [worstReal(first, await b.forward(opts.prompt, { pad: opts.pad }), opts.prompt, opts.pad)];
  let next = lastRealOf(first, opts.prompt, opts.pad).map(argmax);
  for (let t = 0; t < opts.steps; t++) {
    const la = lastPosition(await a.step(next));
    const lb = lastPosition(await b.step(next));
    maxDiff.push(worstRows(la, lb));
    next = la.map(argmax);
  }
  const cacheLengthsMatch = JSON.stringify(a.layerCacheLengths()) === JSON.stringify(b.layerCacheLengths());
  // A routed layer's cache may keep slots its rows did not fill until the session compacts it.
  a.compact?.();
  b.compact?.();
  const kvBytesMatch = a.kvBytes() === b.kvBytes();
  return { name, passed: maxDiff.every((d) => d <= tolerance) && cacheLengthsMatch && kvBytesMatch, maxDiff, cacheLengthsMatch, kvBytesMatch };
}

export async function verifyCompiled(
  originalPath: string,
  compiledPath: string,
  opts: VerifyOptions,
  log: (m: string) => void = () => {},
): Promise<VerifyReport> {
  const problem = opts.executionProvider === 'cuda' ? cudaProviderProblem() : null;
  if (problem) throw new ModcError(problem);
  const original = loadModel(originalPath);
  const structure = analyzeDecoder(original);
  const tolerance = opts.tolerance ?? (structure.dtype === 'float16' ? 1e-2 : 1e-4);
  const compiledModel = loadModel(compiledPath);
  checkCompiledFrom(original, compiledModel, originalPath, compiledPath);
  const plan = routingPlanOf(compiledModel);
  checkPlanFits(plan, structure, originalPath, compiledPath);
  const originalIo = decoderIo(original);
  const shortest = Math.min(...opts.prompt.map((r) => r.length));
  // The default prompt fits the model: one row for a model that runs one row per call, rows of one length for one that cannot pad.
  let prompt = originalIo.unpaddable && opts.defaultPrompt ? opts.prompt.map((r) => r.slice(0, shortest)) : opts.prompt;
  if (originalIo.batchOne && opts.defaultPrompt) prompt = prompt.slice(0, 1);
  const sided = { ...opts, prompt, pad: resolvePadSide(originalIo, opts.pad) };
  const work = mkdtempSync(join(tmpdir(), 'modc-verify-'));
  try {
    // The anchor is compiled first: it refuses an original that cannot carry the compiled model's routing.
    log('anchor: compiling the original with every token selected, ungated');
    compileAnchor(original, structure, plan, originalPath);
    const anchorPath = join(work, 'anchor', 'model.onnx');
    saveModel(original, anchorPath);

    log(`semantics: ${compiledPath} against the reference executor on ${originalPath}`);
    const reference = await ModReference.create(originalPath, plan, work);
    const ep = { executionProvider: opts.executionProvider ?? 'cpu' } as const;
    const semantics = await compare('semantics', await ModSession.create(compiledPath, ep), reference, sided, tolerance);
    await reference.release();

    log('anchor: every token selected, ungated, against the original');
    const anchor = await compare('anchor', await ModSession.create(originalPath, ep), await ModSession.create(anchorPath, ep), sided, tolerance);
    return { tolerance, checks: [semantics, anchor], passed: semantics.passed && anchor.passed };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
