/**
 * The cost model: multiply-accumulates (MACs) of a decoder, per layer and per part, and the
 * accounting that turns "which tokens ran which part" into the compute and KV-cache fractions.
 * This file is the one definition of those metrics (docs/commands.md, "Metrics").
 *
 * Per token, a part costs the elements of every weight its MatMul / Gemm / fused ops read
 * (x[.., K] @ W[K, N] is K*N MACs per row). The attention part is every such op of the layer
 * that is not in the MLP (`LayerInfo.mlpNodes`): Q, K, V and output projections, fused QKV.
 * Attention itself costs 2 * numHeads * headSize MACs per (query, key) pair: Q.K and the
 * weighted sum of V. A router costs H per token per routed part, lm_head H * V per token;
 * embeddings and norms cost nothing here. A surrogate (an MLP part's linear stand-in,
 * s(u) = (u A) B + c) costs 2 H rank per token it runs on (RowUsage's `surrogateMacs`).
 *
 * A mixture-of-experts MLP in one com.microsoft MoE / QMoE op runs each token through its top k
 * experts: k times one expert's fc1 + fc2 (+ fc3) weight elements per token (QMoE's packed
 * weights counted unpacked, 8 / expert_weight_bits values per byte), plus the gate MatMul that
 * scores the experts.
 */
import type { Node, Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import type { DecoderStructure, LayerInfo } from './types.js';

export const COSTS_METADATA_KEY = 'modc.costs';

export interface LayerCost {
  layer: number;
  /** MACs per token of the attention part's projections. */
  attention: number;
  /** MACs per (query, key) pair: scores and weighted values. */
  attentionPair: number;
  /** MACs per token of the MLP part. */
  mlp: number;
  /** Cache elements one token adds to this layer's KV cache (key and value). */
  kvPerToken: number;
}

/** What the compile pipeline records under `modc.costs`, from the original model. */
export interface ModelCosts {
  hiddenSize: number;
  vocabSize: number;
  /** MACs per token of one router (its dot product). */
  router: number;
  /** MACs per token of lm_head. */
  lmHead: number;
  layers: LayerCost[];
}

/** Ops that multiply activations by a weight, and how many MACs per token that weight costs. */
const WEIGHT_MACS: Record<string, (n: Node, weights: ReadonlySet<Value>) => number> = {
  MatMul: (n, w) => weightOperands(n, w, [0, 1]),
  Gemm: (n, w) => weightOperands(n, w, [0, 1]),
  FusedMatMul: (n, w) => weightOperands(n, w, [0, 1]),
  // com.microsoft Attention: input 1 is the packed QKV weight [H, 3H].
  Attention: (n, w) => weightOperands(n, w, [1]),
  MatMulNBits: (n) => n.attrInt('K', 0) * n.attrInt('N', 0),
  // Quantized forms: the weight slot of each (A, B, then scales and zero points).
  MatMulInteger: (n, w) => weightOperands(n, w, [0, 1]),
  MatMulIntegerToFloat: (n, w) => weightOperands(n, w, [0, 1]),
  DynamicQuantizeMatMul: (n, w) => weightOperands(n, w, [1]),
  QLinearMatMul: (n, w) => weightOperands(n, w, [0, 3]),
  QGemm: (n, w) => weightOperands(n, w, [3]),
  QAttention: (n, w) => weightOperands(n, w, [1]),
  // com.microsoft MoE: input, router_probs, fc1, fc1 bias, fc2, fc2 bias, fc3, fc3 bias.
  MoE: (n, w) => expertMacs(n, w, [2, 4, 6], 1),
  // com.microsoft QMoE: input, router_probs, fc1, fc1 scales, fc1 bias, fc2, fc2 scales, fc2 bias, fc3, ...
  QMoE: (n, w) => expertMacs(n, w, [2, 5, 8], 8 / (n.attrInt('expert_weight_bits', 4) || 4)),
};

/** k experts per token, each costing its share of the expert weights (`pack` values per stored element). */
function expertMacs(n: Node, weights: ReadonlySet<Value>, slots: number[], pack: number): number {
  const fc1 = n.input(slots[0]!);
  const experts = fc1 ? leadingDim(fc1) : null;
  if (!experts) return 0;
  const perExpert = (weightOperands(n, weights, slots) * pack) / experts;
  return (n.attrInt('k', 1) ?? 1) * perExpert;
}

/** Dim 0 of a constant weight (its initializer's, through casts). */
function leadingDim(v: Value): number | null {
  for (let cur: Value | null = v, hops = 0; cur && hops < 8; hops++) {
    const d = (cur.initializer?.dims ?? cur.shape)?.[0];
    if (typeof d === 'number') return d;
    cur = cur.producer?.input(0) ?? null;
  }
  return null;
}

function weightOperands(n: Node, weights: ReadonlySet<Value>, slots: number[]): number {
  let macs = 0;
  for (const i of slots) {
    const v = n.input(i);
    if (v && weights.has(v)) macs += elementCount(v) ?? 0;
  }
  return macs;
}

/** Elements of a constant weight: its shape, or the initializer it is computed from. */
function elementCount(v: Value): number | null {
  for (let cur: Value | null = v, hops = 0; cur && hops < 8; hops++) {
    const shape = cur.initializer?.dims ?? cur.shape;
    if (shape && shape.every((d) => typeof d === 'number')) return (shape as number[]).reduce((a, d) => a * d, 1);
    const p: Node | null = cur.producer;
    if (p?.opType === 'Constant') {
      const dims = p.attr('value')?.t?.dims;
      return dims ? dims.reduce((a: number, d) => a * Number(d), 1) : null;
    }
    cur = p?.input(0) ?? null;
  }
  return null;
}

function partMacs(nodes: readonly Node[], weights: ReadonlySet<Value>): number {
  let macs = 0;
  for (const n of nodes) macs += WEIGHT_MACS[n.opType]?.(n, weights) ?? 0;
  return macs;
}

export function layerCost(layer: LayerInfo): LayerCost {
  const weights = new Set(layer.sideInputs.filter((s) => s.kind === 'weight').map((s) => s.value));
  const mlp = new Set(layer.mlpNodes);
  const { numHeads, kv } = layer.attention;
  return {
    layer: layer.index,
    attention: partMacs(
      layer.nodes.filter((n) => !mlp.has(n)),
      weights,
    ),
    attentionPair: 2 * numHeads * kv.headSize,
    mlp: partMacs(layer.mlpNodes, weights),
    kvPerToken: 2 * kv.numKvHeads * kv.headSize,
  };
}

export function modelCosts(s: DecoderStructure): ModelCosts {
  const vocab = s.final.logits.shape?.at(-1);
  // A hidden-states output has no lm_head (its last dim is the hidden size, not a vocabulary).
  const vocabSize = s.final.kind === 'hidden' ? 0 : typeof vocab === 'number' ? vocab : ((s.embedding.table.shape?.[0] as number | undefined) ?? 0);
  return { hiddenSize: s.hiddenSize, vocabSize, router: s.hiddenSize, lmHead: s.hiddenSize * vocabSize, layers: s.layers.map(layerCost) };
}

export function readCosts(model: Model): ModelCosts | null {
  const entry = model.metadataProps.find((p) => p.key === COSTS_METADATA_KEY);
  return entry?.value ? (JSON.parse(entry.value) as ModelCosts) : null;
}

export function writeCosts(model: Model, costs: ModelCosts): void {
  model.metadataProps = [...model.metadataProps.filter((p) => p.key !== COSTS_METADATA_KEY), { key: COSTS_METADATA_KEY, value: JSON.stringify(costs) }];
}

/**
 * What ran in one row of a forward with no past: the row's real tokens, and per layer how many
 * of them ran the attention part and the MLP part, and how many routers scored them.
 * Selected tokens see, in their layer, only the earlier selected tokens and themselves (the
 * compacted cache, causal), so k attention tokens make k(k+1)/2 (query, key) pairs, and the
 * layer's cache holds k entries. A key/value-routed layer (`kv`) says both itself: `pairs`, the
 * (query, key) pairs its visibility rule leaves (every token queries), and `kvHeld`, the
 * entries its cache holds after the row's last token (kvRowUsage).
 */
export interface RowUsage {
  tokens: number;
  /** `surrogateMacs`: what the layer's surrogates executed in this row (MACs per token times the tokens they ran on). */
  layers: { attention: number; mlp: number; routers: number; pairs?: number; kvHeld?: number; surrogateMacs?: number }[];
}

/**
 * A key/value-routed layer on one row of n tokens at positions 0..n-1 (SPEC.md, "Key/value
 * routing"): `keep[j]` the router's choice for token j. Query i sees key j <= i iff j < sinks,
 * keep[j] or i - j < window; after the last token the cache holds j < sinks, keep[j] or
 * j >= n - window.
 */
export function kvRowUsage(keep: ArrayLike<number | boolean>, sinks: number, window: number): { pairs: number; held: number } {
  const n = keep.length;
  const held = (j: number) => j < sinks || !!keep[j];
  // held(j) for j <= i - window, counted as i grows.
  let heldBehind = 0;
  let pairs = 0;
  for (let i = 0; i < n; i++) {
    const leaving = i - window;
    if (leaving >= 0 && held(leaving)) heldBehind++;
    pairs += Math.min(window, i + 1) + heldBehind;
  }
  let total = 0;
  for (let j = 0; j < n; j++) if (held(j) || j >= n - window) total++;
  return { pairs, held: total };
}

export const denseUsage = (costs: ModelCosts, tokens: number): RowUsage => ({
  tokens,
  layers: costs.layers.map(() => ({ attention: tokens, mlp: tokens, routers: 0 })),
});

/** MACs the row executed: each part on the tokens that ran it, attention pairs, routers, lm_head. */
export function executedMacs(costs: ModelCosts, row: RowUsage): number {
  let macs = costs.lmHead * row.tokens;
  costs.layers.forEach((c, l) => {
    const u = row.layers[l]!;
    const pairs = u.pairs ?? (u.attention * (u.attention + 1)) / 2;
    macs += c.attention * u.attention + c.attentionPair * pairs + c.mlp * u.mlp + costs.router * u.routers * row.tokens;
    macs += u.surrogateMacs ?? 0;
  });
  return macs;
}

/** KV-cache elements the row leaves behind: entries held (attention tokens, or kvHeld) times each layer's per-token width. */
export function kvElements(costs: ModelCosts, row: RowUsage): number {
  return costs.layers.reduce((a, c, l) => a + c.kvPerToken * (row.layers[l]!.kvHeld ?? row.layers[l]!.attention), 0);
}
