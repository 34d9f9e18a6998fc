/**
 * RoutingPlan: which layers become MoD layers, with which router, threshold p or capacity c.
 * Resolves the user's choices (router file or init, --layers, --schedule, --threshold,
 * --capacity) against the model, per SPEC.md ("Router weights file", "Capacity schedules").
 */
import { ModcError, UsageError } from '../core/errors.js';
import {
  allPassRouters,
  compareParts,
  DEFAULT_KV_POLICY,
  type KvPolicy,
  kvPolicyProblem,
  type LayerRouter,
  loadRouterFile,
  randomRouters,
  type ReplacedPart,
  type RoutedPart,
  type RouterFileMetadata,
} from './router-weights.js';

export type { KvPolicy, ReplacedPart, RoutedPart, Surrogate } from './router-weights.js';
export type RoutingMode = 'threshold' | 'topk';
export type Schedule = 'uniform' | 'every-other' | 'prd';

/**
 * One routed part of a layer. A layer appears once with part 'block', or once or twice with
 * 'attention' and/or 'mlp', or with 'kv' (and optionally 'mlp').
 */
export interface LayerPlan {
  layer: number;
  part: RoutedPart;
  router: LayerRouter;
  /** threshold-p: selected iff sigmoid(score) >= threshold. */
  threshold: number;
  /** top-k: fraction of a row's real tokens selected. */
  capacity: number;
}

export interface RoutingPlan {
  mode: RoutingMode;
  gated: boolean;
  layers: LayerPlan[];
  /**
   * MLP parts replaced by their surrogate on every token (capacity 0, no router; SPEC.md "MLP
   * routed with a surrogate"). Absent or empty: none.
   */
  replaced?: ReplacedPart[];
  /** Layers left dense, and why (reported to the user). */
  unconverted: { layer: number; reason: string }[];
  /** Key/value routing's sinks and window (SPEC.md, "Key/value routing"); DEFAULT_KV_POLICY when absent. */
  kv?: KvPolicy;
}

/** The sinks and window of a plan's kv parts. */
export const kvPolicyOf = (plan: Pick<RoutingPlan, 'kv'>): KvPolicy => plan.kv ?? DEFAULT_KV_POLICY;

export type RouterSource = { kind: 'file'; path: string } | { kind: 'all-pass' } | { kind: 'random'; seed: number };

export interface PlanRequest {
  numLayers: number;
  hiddenSize: number;
  routers: RouterSource;
  /**
   * What each converted layer routes (default 'block'). With a router file: only the file's
   * routers of this part (default: every router in the file, each with its own part).
   */
  granularity?: RoutedPart;
  mode?: RoutingMode;
  gated?: boolean;
  threshold?: number;
  capacity?: number;
  /** `all`, `even`, `odd`, or a list like `1,3,5-7`. */
  layers?: string;
  schedule?: Schedule;
  /** p-MoD's progressive ratio decay: layers with retention >= cutoff stay dense; retention floored. */
  prd?: { cutoff: number; floor: number };
  /** Key/value routing: attention sinks and recent window (default: the router file's metadata, then 4 and 16). */
  kvSinks?: number;
  kvWindow?: number;
}

export const DEFAULT_THRESHOLD = 0.5;
export const DEFAULT_CAPACITY = 0.5;
export const DEFAULT_PRD = { cutoff: 1.0, floor: 0.125 };

/** Parses a layer selection against a model with `numLayers` layers. */
export function parseLayerSpec(spec: string, numLayers: number): number[] {
  const all = Array.from({ length: numLayers }, (_, i) => i);
  const s = spec.trim();
  if (s === 'all') return all;
  if (s === 'even') return all.filter((l) => l % 2 === 0);
  if (s === 'odd') return all.filter((l) => l % 2 === 1);
  const out = new Set<number>();
  for (const part of s
    .split(',')
    .map((p) => p.trim())
    .filter(Boolean)) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!m) throw new UsageError(`--layers: cannot parse '${part}' (use all, even, odd, or a list like 1,3,5-7)`);
    const [a, b] = [Number(m[1]), Number(m[2] ?? m[1])];
    if (b < a) throw new UsageError(`--layers: range '${part}' is empty`);
    for (let l = a; l <= b; l++) {
      if (l >= numLayers) throw new UsageError(`--layers names layer ${l}, but the model has ${numLayers} layers (0-${numLayers - 1})`);
      out.add(l);
    }
  }
  if (out.size === 0) throw new UsageError(`--layers '${spec}' names no layer`);
  return [...out].sort((x, y) => x - y);
}

/** p-MoD retention per layer: R_l = 0.5 cos(pi l / (L-1)) + R_mean. */
export function prdRetention(numLayers: number, mean: number): number[] {
  return Array.from({ length: numLayers }, (_, l) => 0.5 * Math.cos((Math.PI * l) / Math.max(1, numLayers - 1)) + mean);
}

function checkRange(name: string, v: number | undefined, ok: (v: number) => boolean, range: string): void {
  if (v !== undefined && !(Number.isFinite(v) && ok(v))) throw new UsageError(`${name} must be in ${range}, got ${v}`);
}

export function planRouting(req: PlanRequest): RoutingPlan {
  for (const [name, v] of [
    ['hidden size', req.hiddenSize],
    ['layer count', req.numLayers],
  ] as const) {
    if (!Number.isSafeInteger(v) || v < 1) throw new ModcError(`cannot plan routing for a model whose ${name} is ${v}: it must be a positive integer`);
  }
  checkRange('--threshold', req.threshold, (v) => v >= 0 && v <= 1, '[0, 1]');
  checkRange('--capacity', req.capacity, (v) => v > 0 && v <= 1, '(0, 1]');
  for (const [flag, key, v] of [
    ['--kv-sinks', 'sinks', req.kvSinks],
    ['--kv-window', 'window', req.kvWindow],
  ] as const) {
    const problem = v === undefined ? null : kvPolicyProblem({ [key]: v });
    if (problem) throw new UsageError(`${flag}: ${problem.replace(/^\w+ /, '')}`);
  }
  const unconverted: RoutingPlan['unconverted'] = [];
  const file = req.routers.kind === 'file' ? loadRouterFile(req.routers.path, req) : undefined;
  const meta: RouterFileMetadata = file?.metadata ?? {};
  // Explicit choices win over the file's metadata; the metadata over the defaults.
  const mode = req.mode ?? meta.mode ?? 'threshold';
  let fromFile = file?.routers;
  const filteredOut = new Map<number, string>();
  if (fromFile && req.granularity) {
    for (const r of fromFile)
      if ((r.part ?? 'block') !== req.granularity)
        filteredOut.set(r.layer, `the router file routes its ${r.part ?? 'block'}, not its ${req.granularity} (--granularity ${req.granularity})`);
    fromFile = fromFile.filter((r) => (r.part ?? 'block') === req.granularity);
    if (fromFile.length === 0 && !(req.granularity === 'mlp' && file!.replaced.length))
      throw new ModcError(
        `the router file ${(req.routers as { path: string }).path} has no ${req.granularity} router (its tensors are router.{l}${req.granularity === 'block' ? '' : req.granularity === 'attention' ? '.attn' : `.${req.granularity}`}.* for that part)`,
      );
  }
  const granularity = req.granularity ?? 'block';

  // Which layers, and each one's capacity under the schedule.
  const capacityOf = new Map<number, number>();
  let layers: number[];
  const schedule = req.schedule ?? 'uniform';
  if (req.layers) {
    layers = parseLayerSpec(req.layers, req.numLayers);
  } else if (schedule === 'every-other') {
    layers = parseLayerSpec('odd', req.numLayers);
  } else if (schedule === 'prd') {
    const prd = req.prd ?? DEFAULT_PRD;
    const retention = prdRetention(req.numLayers, req.capacity ?? DEFAULT_CAPACITY);
    layers = [];
    retention.forEach((r, l) => {
      if (r >= prd.cutoff) unconverted.push({ layer: l, reason: `prd retention ${r.toFixed(3)} >= dense cut-off ${prd.cutoff}` });
      else {
        layers.push(l);
        capacityOf.set(l, Math.min(1, Math.max(prd.floor, r)));
      }
    });
  } else if (fromFile) {
    const replacedLayers = req.granularity === undefined || req.granularity === 'mlp' ? file!.replaced.map((r) => r.layer) : [];
    layers = [...new Set([...fromFile.map((r) => r.layer), ...replacedLayers])].sort((a, b) => a - b);
  } else {
    layers = parseLayerSpec('all', req.numLayers);
  }
  if (layers.length === 0) throw new UsageError('the layer selection converts no layer');

  let routers: LayerRouter[];
  // MLP parts the file replaces by their surrogate (no router): kept unless another part is asked for.
  const replaced = (file?.replaced ?? []).filter((r) => layers.includes(r.layer) && (req.granularity ?? 'mlp') === 'mlp');
  if (fromFile) {
    routers = [];
    for (const l of layers) {
      const found = fromFile.filter((r) => r.layer === l);
      if (found.length) routers.push(...found);
      else if (!replaced.some((r) => r.layer === l))
        unconverted.push({ layer: l, reason: filteredOut.get(l) ?? `no router for layer ${l} in ${(req.routers as { path: string }).path}` });
    }
  } else if (req.routers.kind === 'all-pass') {
    routers = allPassRouters(layers, req.hiddenSize, granularity);
  } else if (req.routers.kind === 'random') {
    routers = randomRouters(layers, req.hiddenSize, req.routers.seed, granularity);
  } else {
    throw new Error('unreachable: router file handled above');
  }
  if (routers.length === 0 && replaced.length === 0) throw new ModcError('no layer can be converted: the router file has no router for any selected layer');

  const convertedSet = new Set([...routers.map((r) => r.layer), ...replaced.map((r) => r.layer)]);
  for (let l = 0; l < req.numLayers; l++) {
    if (!convertedSet.has(l) && !unconverted.some((u) => u.layer === l)) unconverted.push({ layer: l, reason: filteredOut.get(l) ?? 'not selected' });
  }
  unconverted.sort((a, b) => a.layer - b.layer);
  const metaOf = (layer: number, part: RoutedPart) => meta.layers?.find((e) => e.layer === layer && (e.part ?? 'block') === part);
  const routesKv = routers.some((r) => r.part === 'kv');
  if (routesKv && mode === 'topk')
    throw new UsageError(
      'key/value routing (kv parts) is threshold-only: a top-k choice over a prompt cannot be made again token by token in decode; use --routing threshold',
    );
  const kv: KvPolicy = { sinks: req.kvSinks ?? meta.kv?.sinks ?? DEFAULT_KV_POLICY.sinks, window: req.kvWindow ?? meta.kv?.window ?? DEFAULT_KV_POLICY.window };
  return {
    mode,
    gated: req.gated ?? meta.gated ?? true,
    layers: [...routers].sort(compareParts).map((r) => {
      const part = r.part ?? 'block';
      const router = { ...r, part };
      const recorded = metaOf(r.layer, part);
      return {
        layer: r.layer,
        part,
        router,
        // A threshold stored in the router file (tensor, then metadata) wins over the command line.
        threshold: r.threshold ?? recorded?.threshold ?? req.threshold ?? DEFAULT_THRESHOLD,
        // An explicit capacity (or schedule) wins over the file's recorded per-part capacity.
        capacity: capacityOf.get(r.layer) ?? req.capacity ?? recorded?.capacity ?? (req.routers.kind === 'all-pass' ? 1 : DEFAULT_CAPACITY),
      };
    }),
    ...(replaced.length ? { replaced } : {}),
    unconverted,
    ...(routesKv ? { kv } : {}),
  };
}

/** A layer part for messages: `3` for a whole block, `3 (mlp)` for a sub-layer. */
export function describeLayerPart(l: { layer: number; part: RoutedPart }): string {
  return l.part === 'block' ? `${l.layer}` : `${l.layer} (${l.part})`;
}
