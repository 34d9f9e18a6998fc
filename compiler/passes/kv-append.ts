/**
 * Helpers of route-layers' decode fast path ("append outside the If", docs/routing.md, "How a layer
 * is routed"): which layers can take it, the nodes that compute a layer's new keys and values,
 * and the element types of the values a branch hands on (an If's else branch must return
 * values of the same element types as its then branch).
 */
import { DataType } from '../core/ir/dtype.js';
import type { Node, Value } from '../core/ir/graph.js';
import { Tensor } from '../core/ir/tensor.js';
import type { KvCacheSpec, LayerInfo } from '../analysis/types.js';
import { MODC_DOMAIN } from './modc-ops/index.js';

/** One cache tensor appended by `Concat(past, new)` on the sequence axis. */
export interface KvAppend {
  concat: Node;
  past: Value;
  /** The new entries `[B, H, K, D]`, computed by the layer from its selected tokens. */
  fresh: Value;
  /** `Concat(past, new)`: what the layer's attention reads and the present graph output. */
  full: Value;
}

/**
 * The appends of a layer whose cache is the unfused `present = Concat(past, new)` form (what
 * torch exporters and the ONNX Runtime builder's unfused models write), or why not.
 * Fused attention ops (MultiHeadAttention, GroupQueryAttention, ORT's Attention) write their
 * present themselves, and the combined [2, B, H, T, D] cache appends inside the op: those keep
 * the general structure.
 */
export function kvAppendsOf(layer: LayerInfo, nodes: ReadonlySet<Node>): KvAppend[] | { reason: string } {
  if (layer.attention.form !== 'unfused') return { reason: `attention form ${layer.attention.form}` };
  const kv: KvCacheSpec = layer.kv;
  if (kv.layout !== 'BHTD') return { reason: `cache layout ${kv.layout}` };
  const appends: KvAppend[] = [];
  for (const t of [kv.key, kv.value]) {
    const concat = t.output.producer;
    if (!concat || concat.opType !== 'Concat' || concat.domain !== '' || !nodes.has(concat)) return { reason: `${t.output} is not a Concat of the layer` };
    const axis = concat.attrInt('axis');
    if (concat.inputs.length !== 2 || concat.input(0) !== t.input || (axis !== 2 && axis !== -2))
      return { reason: `${concat.describe()} is not Concat(past, new) on the sequence axis` };
    const fresh = concat.input(1);
    if (!fresh?.producer || !nodes.has(fresh.producer)) return { reason: `the new entries of ${t.output} are not computed by the layer` };
    appends.push({ concat, past: t.input, fresh, full: t.output });
  }
  return appends;
}

/** Nodes of `within` that `values` depend on (their backward slice inside the set), in graph order of `order`. */
export function sliceWithin(values: readonly Value[], within: ReadonlySet<Node>, order: readonly Node[]): Node[] {
  const seen = new Set<Node>();
  const stack = values.map((v) => v.producer).filter((n): n is Node => !!n && within.has(n));
  while (stack.length) {
    const n = stack.pop()!;
    if (seen.has(n)) continue;
    seen.add(n);
    for (const v of n.inputs) if (v?.producer && within.has(v.producer) && !seen.has(v.producer)) stack.push(v.producer);
  }
  return order.filter((n) => seen.has(n));
}

const BOOL_OPS = new Set(['Equal', 'Less', 'LessOrEqual', 'Greater', 'GreaterOrEqual', 'And', 'Or', 'Not', 'Xor', 'IsNaN', 'IsInf']);
const INT64_OPS = new Set(['Shape', 'Size', 'NonZero', 'ArgMax', 'ArgMin']);
/** Ops whose every output has the element type of input `n` (data ops, element-wise math). */
const TYPE_OF_INPUT: Record<string, number> = {
  Where: 1,
  DequantizeLinear: 1,
};
/** Ops whose outputs have another type than their first input, and are not listed above: unknown. */
const UNKNOWN_OPS = new Set([
  'QuantizeLinear',
  'DynamicQuantizeLinear',
  'TopK',
  'Unique',
  'MatMulInteger',
  'ConvInteger',
  'Loop',
  'Scan',
  'RandomNormalLike',
  'RandomUniformLike',
  'Multinomial',
  'OneHot',
  'CastLike',
  'EyeLike',
  'Bernoulli',
]);

/** Element types of modc op outputs (compiler/passes/modc-ops/op-bodies.ts): -1 means "of input 0". */
const MODC_OUTPUTS: Record<string, number[]> = {
  Router: [DataType.FLOAT],
  SelectThreshold: [DataType.BOOL],
  SelectTopK: [DataType.BOOL],
  Compact: [DataType.INT64, DataType.BOOL, DataType.INT64],
  GatherTokens: [-1],
  ScatterTokens: [-1],
  ScatterTokensGated: [-1],
  GatherMask: [-1],
  PrefixMask: [DataType.BOOL],
  KeyMask: [DataType.BOOL],
  GatherKv: [-1],
  GatherKvCombined: [-1],
};

/**
 * The element type of `v`, from its declared type or its producer (recursively), or undefined
 * when a rule does not cover it (the caller then keeps the general structure).
 */
export function elementTypeOf(v: Value, memo = new Map<Value, number | undefined>()): number | undefined {
  if (v.dtype !== undefined) return v.dtype;
  if (memo.has(v)) return memo.get(v);
  memo.set(v, undefined);
  const n = v.producer;
  let t: number | undefined;
  if (n) {
    const slot = n.outputs.indexOf(v);
    const input = (i: number) => (n.input(i) ? elementTypeOf(n.input(i)!, memo) : undefined);
    if (n.domain === MODC_DOMAIN) {
      const k = MODC_OUTPUTS[n.opType]?.[slot];
      t = k === -1 ? input(0) : k;
    } else if (n.domain !== '' && n.domain !== 'ai.onnx' && n.domain !== 'com.microsoft') {
      t = undefined;
    } else if (n.opType === 'If') {
      const branch = n.subgraphs()[0]?.outputs[slot];
      t = branch ? elementTypeOf(branch, memo) : undefined;
    } else if (n.opType === 'Cast') {
      t = n.attrInt('to');
    } else if (n.opType === 'Constant') {
      const a = n.attr('value');
      t = a?.t
        ? new Tensor(a.t).dataType
        : n.attr('value_int') || n.attr('value_ints')
          ? DataType.INT64
          : n.attr('value_float') || n.attr('value_floats')
            ? DataType.FLOAT
            : undefined;
    } else if (n.opType === 'ConstantOfShape') {
      const a = n.attr('value');
      t = a?.t ? new Tensor(a.t).dataType : DataType.FLOAT;
    } else if (BOOL_OPS.has(n.opType)) {
      t = DataType.BOOL;
    } else if (INT64_OPS.has(n.opType)) {
      t = DataType.INT64;
    } else if (UNKNOWN_OPS.has(n.opType)) {
      t = undefined;
    } else if (n.opType in TYPE_OF_INPUT) {
      t = input(TYPE_OF_INPUT[n.opType]!);
    } else {
      t = input(0);
    }
  }
  memo.set(v, t);
  return t;
}
