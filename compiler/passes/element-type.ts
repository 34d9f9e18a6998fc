/**
 * The element type of a value from its declared type or its producer (recursively): what
 * route-kv needs to build a Where of the right type around a mask or a score it did not make.
 */
import { DataType } from '../core/ir/dtype.js';
import type { Value } from '../core/ir/graph.js';
import { Tensor } from '../core/ir/tensor.js';
import { MODC_DOMAIN } from './modc-ops/index.js';

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
  TokenGrid: [DataType.INT64, DataType.INT64, DataType.INT64],
  CompactTokens: [DataType.INT64, DataType.BOOL, DataType.INT64, DataType.INT64, DataType.BOOL],
  Compact: [DataType.INT64, DataType.BOOL, DataType.INT64],
  ScatterTokens: [-1],
  ScatterTokensGated: [-1],
  GatherMask: [-1],
  PrefixMask: [DataType.BOOL],
  KeyMask: [DataType.BOOL],
  GatherKv: [-1],
  GatherKvCombined: [-1],
  KvCodes: [DataType.INT64],
  KvVisible: [DataType.BOOL],
  KvRetain: [DataType.BOOL],
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
