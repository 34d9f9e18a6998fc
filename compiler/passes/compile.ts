/**
 * compile(model, request): the MoD compile as one library call, used by `modc compile`, the
 * benchmarks, calibration and users' code alike.
 *
 *   const model = loadModel('model.onnx');
 *   const { plan, report } = compile(model, { routers: { kind: 'random', seed: 1 }, schedule: 'every-other' });
 *   saveModel(model, 'model.mod.onnx');
 *
 * It analyses the model once, resolves the routing plan against it, runs the MoD pipeline
 * (record-costs, dense-past-length, split-fused-boundaries, insert-routers, route-layers, [last-logits,] cleanup
 * [, inline-modc-ops]) with that analysis handed to the passes, and records the source
 * fingerprint `modc verify` checks. The model is rewritten in place. Reading and writing files
 * (the model, genai_config.json) is the caller's.
 */
import { analyzeDecoder } from '../analysis/analyze.js';
import type { DecoderStructure } from '../analysis/types.js';
import { ModcError } from '../core/errors.js';
import { summarizeModel } from '../core/ir/model-summary.js';
import type { Model } from '../core/ir/model.js';
import { batchOne, recordBatchOne } from '../metadata/decoder-io.js';
import { readRoutingMetadata } from '../metadata/routing-metadata.js';
import { graphFingerprint, recordSource } from '../metadata/source-fingerprint.js';
import { describeLayerPart, planRouting, type PlanRequest, type RoutedPart, type RoutingMode, type RoutingPlan } from '../routing/routing-plan.js';
import { runPipeline, type PassRecord } from './pass-manager.js';
import { modPipeline } from './pipeline.js';

/** How to route: the plan's choices, resolved against the model, or a plan made already. */
export type RoutingRequest = Omit<PlanRequest, 'numLayers' | 'hiddenSize'> | { plan: RoutingPlan };

export type CompileRequest = RoutingRequest & CompileOptions;

export interface CompileOptions {
  /** 'last': the lm_head runs for each row's last real token only (the last-logits pass). */
  logits?: 'all' | 'last';
  /** Emit the modc op bodies inline instead of as model-local functions. */
  inlineOps?: boolean;
  /** Verify the IR after each pass (default true). */
  verify?: boolean;
  /** Pass names after which to dump the model (`*` for all), into `dumpDir`. */
  dumpAfter?: string[];
  dumpDir?: string;
  /** Progress and pass notes. */
  log?: (message: string) => void;
  /** The analysis of `model` as given, when the caller has it already. */
  structure?: DecoderStructure;
}

/** One routed part of the compiled model. */
export interface ConvertedPart {
  layer: number;
  part: RoutedPart;
  threshold: number;
  capacity: number;
}

/** A layer (or part) left dense, and why. `part` absent: the whole layer. */
export interface DenseLayer {
  layer: number;
  part?: RoutedPart;
  reason: string;
}

export interface CompileReport {
  mode: RoutingMode;
  gated: boolean;
  converted: ConvertedPart[];
  /** MLP parts replaced by their surrogate on every token (capacity 0, no router). */
  replaced: { layer: number; part: 'mlp'; rank: number }[];
  notConverted: DenseLayer[];
  /** modc ops the compile added, by op type. */
  opsAdded: Record<string, number>;
}

export interface CompileResult {
  model: Model;
  plan: RoutingPlan;
  records: PassRecord[];
  report: CompileReport;
}

/**
 * Compiles `model` in place into a Mixture-of-Depths model. Throws a ModcError when no layer
 * could be converted, naming each layer's reason.
 */
export function compile(model: Model, request: CompileRequest): CompileResult {
  const structure = request.structure ?? analyzeDecoder(model);
  const plan = planFor(structure, request);
  const { logits, inlineOps, verify, dumpAfter, dumpDir, log } = request;
  const source = graphFingerprint(model);
  const oneRow = batchOne(model);
  const opsBefore = modcOpCounts(model);
  const outputsBefore = new Set(model.graph.outputs.map((v) => v.name));
  const records = runPipeline(model, modPipeline({ plan, inlineOps, logits }), {
    structure,
    ...(verify !== undefined ? { verify } : {}),
    ...(dumpAfter ? { dumpAfter } : {}),
    ...(dumpDir ? { dumpDir } : {}),
    ...(log ? { log } : {}),
  });
  addedOutputsAfterFirst(model, outputsBefore);
  const report = routingReport(model, plan, opsBefore);
  if (report.converted.length === 0 && report.replaced.length === 0)
    throw new ModcError(noLayerConverted(readRoutingMetadata(model)?.skipped ?? report.notConverted));
  recordSource(model, source);
  recordBatchOne(model, oneRow);
  return { model, plan, records, report };
}

/**
 * Moves the outputs the compile added (each converted layer's cache validity, lengths or
 * positions: a few bytes a row) to just after the model's first output (its logits), ahead of
 * the KV caches. Names are the contract, not positions, but the order is what ONNX Runtime
 * returns outputs in: on the CPU EP, with the Node binding copying each output into a fresh
 * buffer, small outputs after the caches made every decode step measurably slower (about one
 * point of the per-step ratio, bench/README.md).
 */
function addedOutputsAfterFirst(model: Model, before: ReadonlySet<string>): void {
  const outputs = model.graph.outputs;
  const added = outputs.filter((v) => !before.has(v.name));
  if (!added.length) return;
  const kept = outputs.filter((v) => before.has(v.name));
  model.graph.outputs = [...kept.slice(0, 1), ...added, ...kept.slice(1)];
}

/** The routing plan `request` resolves to on the analysed model. */
export function planFor(structure: DecoderStructure, request: CompileRequest): RoutingPlan {
  if ('plan' in request) return request.plan;
  const { logits: _l, inlineOps: _i, verify: _v, dumpAfter: _d, dumpDir: _dd, log: _lg, structure: _s, ...planRequest } = request;
  return planRouting({ ...planRequest, numLayers: structure.layers.length, hiddenSize: structure.hiddenSize });
}

/** What a compile did: the plan's parts less those route-layers left dense (recorded in the model). */
export function routingReport(model: Model, plan: RoutingPlan, opsBefore: Record<string, number>): CompileReport {
  const skipped = readRoutingMetadata(model)?.skipped ?? [];
  const notConverted: DenseLayer[] = [...plan.unconverted, ...skipped].sort((a, b) => a.layer - b.layer);
  const converted = plan.layers
    .filter((l) => !skipped.some((u) => u.layer === l.layer && (u.part ?? 'block') === l.part))
    .map(({ layer, part, threshold, capacity }) => ({ layer, part, threshold, capacity }));
  const opsAfter = modcOpCounts(model);
  const opsAdded = Object.fromEntries(
    Object.entries(opsAfter)
      .map(([op, n]) => [op, n - (opsBefore[op] ?? 0)])
      .filter(([, n]) => (n as number) > 0),
  );
  const replaced = (readRoutingMetadata(model)?.replaced ?? []).map((r) => ({ layer: r.layer, part: r.part, rank: r.surrogate.rank }));
  return { mode: plan.mode, gated: plan.gated, converted, replaced, notConverted, opsAdded };
}

export function modcOpCounts(model: Model): Record<string, number> {
  return summarizeModel(model).ops['modc'] ?? {};
}

/** One line: the first layer's reason, and which others stayed dense too. */
function noLayerConverted(dense: readonly DenseLayer[]): string {
  const name = (d: DenseLayer) => (d.part ? describeLayerPart({ layer: d.layer, part: d.part }) : String(d.layer));
  const [first, ...rest] = dense;
  if (!first) return 'no layer was converted';
  const more = rest.length ? `; layer${rest.length > 1 ? 's' : ''} ${rest.map(name).join(', ')} also stayed dense` : '';
  return `no layer was converted (layer ${name(first)}: ${first.reason}${more})`;
}
