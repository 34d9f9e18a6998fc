/**
 * What the KV cache contracts of a routed layer share (compiler/passes/layer-cache.ts,
 * compiler/passes/static-cache.ts): what they need from the layer being routed, the two-phase
 * shape of a contract, and the helpers that retype caches, rebuild masks and add outputs.
 */
import type { KvTensor, LayerInfo } from '../analysis/types.js';
import { kvSequenceAxis } from '../analysis/types.js';
import type { Node, Value } from '../core/ir/graph.js';
import { withDim } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { recomputeWith, replaceUsesWithin } from '../core/ir/rewrite.js';
import type { LayerRouting } from './mod-common.js';
import type { Emitter } from './modc-ops/emitter.js';

/** What a cache contract needs from the layer being routed. */
export interface CacheContext {
  model: Model;
  layer: LayerInfo;
  e: Emitter;
  /** The region's nodes (rewired in place). */
  region: ReadonlySet<Node>;
  routing: LayerRouting;
  /** Calls a modc op (in the stream's dtype). */
  call: (op: string, inputs: Value[]) => Value[];
  /** Masks and sequence lengths the region reads, to rebuild from this layer's own keys. */
  recompute: Value[];
  /** The layer's substitutes for the shared mask and length builders, besides the attention mask. */
  substitutes: () => Map<Value, Value>;
  /** This call's stream [B, S, H] entering the layer (its S is the call's length). */
  tokens: Value;
  /** Name suffix of recomputed values (`l3`, `l3a`). */
  suffix: string;
  /** Where the contract records values a one-token call computes another way (compiler/passes/one-token-path.ts). */
  stepForms?: Map<Value, StepForm>;
  /** Where it records a value gathered at the selected tokens -> the value gathered (the same when every token is selected). */
  stepSubs?: Map<Value, Value>;
}

/**
 * How a one-token call computes a value of the compacted branch: from the one-token path's
 * counterpart of each value the branch reads (`of`).
 */
export type StepForm = (of: (v: Value) => Value) => Value;

/** [value the layer computes, value passed on when no row selects a token]. */
export type Carried = [Value, Value];

export interface LayerCache {
  /** Rewires the region to the layer's own cache (new nodes run inside the layer's If); returns the values the If carries. */
  rewire(): Carried[];
  /** Whether a one-token call may run the layer without compaction (the contract reads no count or position of the compaction). */
  oneToken: boolean;
}

/** The cache tensors of a layer: key and value, or the one combined tensor. */
export function cacheTensors(layer: LayerInfo): KvTensor[] {
  return layer.kv.layout === 'combined-2BHTD' ? [layer.kv.key] : [layer.kv.key, layer.kv.value];
}

/** The past and present caches get the layer's own sequence dims. */
export function ownLengthDims(layer: LayerInfo): void {
  const axis = kvSequenceAxis(layer.kv.layout);
  for (const t of cacheTensors(layer)) {
    t.input.type = withDim(t.input.type, axis, `past_sequence_length_${layer.index}`);
    t.output.type = withDim(t.output.type, axis, `present_sequence_length_${layer.index}`);
  }
}

/** Rebuilds the region's masks and lengths from `sub`. */
export function recomputeMasks(c: CacheContext, sub: Map<Value, Value>): void {
  if (!c.recompute.length) return;
  const recomputed = recomputeWith(c.model.graph, c.recompute, sub, `_${c.suffix}`);
  for (const v of c.recompute) replaceUsesWithin(c.region, v, recomputed.get(v)!);
}

/** `name` as a graph output of the given type. */
export function namedOutput(c: CacheContext, v: Value, name: string, type: Value['type']): Value {
  const g = c.model.graph;
  v.name = g.uniqueName(name);
  v.type = type;
  g.outputs.push(v);
  return v;
}
