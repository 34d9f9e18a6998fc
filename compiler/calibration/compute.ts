/**
 * The compute model calibration allocates against (SPEC.md "compute fraction": multiply-
 * accumulates of what runs, over the dense model's on the same tokens). Per layer: the MACs per
 * token of the attention sub-layer's projections and of the MLP (counted from the weights their
 * MatMul/Gemm nodes read), the MACs per (query, key) pair of the attention core
 * (2 x heads x head size: scores and weighted values), the router's H per token, and lm_head.
 */
import type { DecoderStructure } from '../analysis/types.js';
import type { Node } from '../ir/graph.js';
import type { RoutedPart } from './parts.js';

export interface LayerCost {
  /** Attention projections per token (q, k, v, o). */
  attention: number;
  /** Attention core per (query, key) pair. */
  pair: number;
  /** MLP per token. */
  mlp: number;
}

export interface CostModel {
  layers: LayerCost[];
  lmHead: number;
  router: number;
}

/** MACs per token of a node multiplying the stream by a constant weight, or 0. */
function weightMacs(n: Node): number {
  if (n.domain === 'com.microsoft' && n.opType === 'MatMulNBits') return n.attrInt('K', 0) * n.attrInt('N', 0);
  const weightSlot = n.opType === 'MatMul' || n.opType === 'Gemm' || n.opType === 'MatMulInteger' ? 1
    : n.domain === 'com.microsoft' && n.opType === 'Attention' ? 1 : -1;
  if (weightSlot < 0) return 0;
  const w = n.input(weightSlot);
  const dims = w?.initializer?.dims ?? (w?.producer && w.producer.opType !== 'MatMul' ? constantDims(w.producer) : undefined);
  if (!dims || dims.length !== 2) return 0;
  return dims[0]! * dims[1]!;
}

/** Dims of a weight behind a cast/dequantize/transpose of an initializer. */
function constantDims(n: Node): number[] | undefined {
  const src = n.input(0);
  const dims = src?.initializer?.dims;
  if (!dims || dims.length !== 2) return undefined;
  return n.opType === 'Transpose' ? [dims[1]!, dims[0]!] : dims;
}

export function costModel(s: DecoderStructure): CostModel {
  const layers = s.layers.map((l) => {
    const mlpSet = new Set(l.mlpNodes);
    let attention = 0;
    let mlp = 0;
    for (const n of l.nodes) {
      const macs = weightMacs(n);
      if (mlpSet.has(n)) mlp += macs;
      else attention += macs;
    }
    return { attention, pair: 2 * s.numHeads * s.headSize, mlp };
  });
  let lmHead = 0;
  for (const n of s.suffixNodes) lmHead += weightMacs(n);
  return { layers, lmHead, router: s.hiddenSize };
}

/** Causal (query, key) pairs of a row of n tokens, each query seeing itself. */
export const causalPairs = (n: number): number => (n * (n + 1)) / 2;

/** The dense model's MACs on rows of these lengths. */
export function denseMacs(cost: CostModel, lengths: readonly number[]): number {
  let total = 0;
  for (const n of lengths) {
    for (const l of cost.layers) total += n * (l.attention + l.mlp) + causalPairs(n) * l.pair;
    total += n * cost.lmHead;
  }
  return total;
}

/**
 * MACs a routed part saves on rows of these lengths when it keeps a fraction c of each row's
 * tokens (spread evenly: a kept query sees c of its keys), net of its router.
 */
export function savedMacs(cost: CostModel, layer: number, part: RoutedPart, c: number, lengths: readonly number[]): number {
  const l = cost.layers[layer]!;
  let saved = 0;
  for (const n of lengths) {
    const pairs = causalPairs(n) * l.pair * (1 - c * c);
    if (part === 'block') saved += n * (1 - c) * (l.attention + l.mlp) + pairs;
    else if (part === 'attention') saved += n * (1 - c) * l.attention + pairs;
    else saved += n * (1 - c) * l.mlp;
    saved -= n * cost.router;
  }
  return saved;
}
