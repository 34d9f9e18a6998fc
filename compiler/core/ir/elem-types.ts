/**
 * Element-type checks: the type errors ONNX Runtime raises at load when an input's element type
 * breaks an op's type constraints (a Slice whose starts are float, an Add of float and int64, a
 * Where whose condition is not bool). A library edit can rewire an input to a value of another
 * type; the IR verifier then refuses the model rather than save one ONNX Runtime cannot load.
 *
 * As for ranks (ranks.ts), types are propagated forward only from what is certain: declared graph
 * inputs, initializers, Constant nodes, and default-domain ops whose output type follows from
 * their inputs and attributes. A value whose type is not certain is never checked.
 */
import { DataType, dataTypeName as typeName } from './dtype.js';
import type { Graph, Node, Value } from './graph.js';
import { dependencyOrder } from './ranks.js';

/** Ops whose outputs have the element type of input 0. */
const SAME_AS_FIRST = new Set([
  'Identity',
  'Neg',
  'Abs',
  'Sqrt',
  'Exp',
  'Log',
  'Reciprocal',
  'Sigmoid',
  'Tanh',
  'Relu',
  'Erf',
  'Sin',
  'Cos',
  'Floor',
  'Ceil',
  'Round',
  'Sign',
  'Softmax',
  'LogSoftmax',
  'Slice',
  'Transpose',
  'Reshape',
  'Squeeze',
  'Unsqueeze',
  'Expand',
  'Gather',
  'GatherElements',
  'GatherND',
  'Concat',
  'Tile',
  'Pad',
  'Flatten',
  'CumSum',
  'Trilu',
  'Add',
  'Sub',
  'Mul',
  'Div',
  'Mod',
  'Max',
  'Min',
  'MatMul',
  'ReduceSum',
  'ReduceMean',
  'ReduceMax',
  'ReduceMin',
  'ReduceProd',
  'Split',
  'Range',
  'ScatterND',
  'ScatterElements',
  'Dropout',
]);
const BOOL_OUT = new Set(['Equal', 'Less', 'Greater', 'LessOrEqual', 'GreaterOrEqual', 'Not', 'And', 'Or', 'Xor', 'IsNaN', 'IsInf']);
const INT64_OUT = new Set(['Shape', 'Size', 'NonZero', 'ArgMax', 'ArgMin']);

/** Inputs that must hold indices or shapes, and the types they take. */
const INDEX_INPUTS: Record<string, { slots: number[]; types: number[] }> = {
  Slice: { slots: [1, 2, 3, 4], types: [DataType.INT32, DataType.INT64] },
  Gather: { slots: [1], types: [DataType.INT32, DataType.INT64] },
  GatherElements: { slots: [1], types: [DataType.INT32, DataType.INT64] },
  ScatterElements: { slots: [1], types: [DataType.INT32, DataType.INT64] },
  GatherND: { slots: [1], types: [DataType.INT64] },
  ScatterND: { slots: [1], types: [DataType.INT64] },
  Reshape: { slots: [1], types: [DataType.INT64] },
  Expand: { slots: [1], types: [DataType.INT64] },
  Unsqueeze: { slots: [1], types: [DataType.INT64] },
  Squeeze: { slots: [1], types: [DataType.INT64] },
  Tile: { slots: [1], types: [DataType.INT64] },
  TopK: { slots: [1], types: [DataType.INT64] },
  Split: { slots: [1], types: [DataType.INT64] },
  ConstantOfShape: { slots: [0], types: [DataType.INT64] },
  CumSum: { slots: [1], types: [DataType.INT32, DataType.INT64] },
  ReduceSum: { slots: [1], types: [DataType.INT64] },
  ReduceMean: { slots: [1], types: [DataType.INT64] },
  ReduceMax: { slots: [1], types: [DataType.INT64] },
};

/** Ops whose listed inputs must share one element type. */
const SAME_TYPE_INPUTS: Record<string, number[]> = {
  Add: [0, 1],
  Sub: [0, 1],
  Mul: [0, 1],
  Div: [0, 1],
  Mod: [0, 1],
  MatMul: [0, 1],
  Equal: [0, 1],
  Less: [0, 1],
  Greater: [0, 1],
  LessOrEqual: [0, 1],
  GreaterOrEqual: [0, 1],
  And: [0, 1],
  Or: [0, 1],
  Xor: [0, 1],
  Where: [1, 2],
  Range: [0, 1, 2],
};

/** The element type of each value whose type is certain. */
export function certainElemTypes(g: Graph): Map<Value, number> {
  const type = new Map<Value, number>();
  for (const v of g.inputs) {
    const t = v.type?.tensor_type?.elem_type;
    if (t) type.set(v, t);
  }
  for (const v of g.initializers.values()) if (v.initializer) type.set(v, v.initializer.dataType);
  for (const n of dependencyOrder(g)) {
    if (n.domain !== '' && n.domain !== 'ai.onnx') continue;
    const t = outputType(n, type);
    if (t === undefined) continue;
    // Split gives several outputs of one type; the others give one (extra outputs are masks or indices).
    for (const [i, v] of n.outputs.entries()) if (v.name !== '' && (i === 0 || n.opType === 'Split')) type.set(v, t);
  }
  return type;
}

function outputType(n: Node, type: ReadonlyMap<Value, number>): number | undefined {
  const first = n.inputs[0] ? type.get(n.inputs[0]) : undefined;
  if (n.opType === 'Cast') return n.attrInt('to') || undefined;
  if (n.opType === 'Constant') {
    const t = n.attr('value')?.t;
    if (t) return t.data_type || undefined;
    if (n.attr('value_float') || n.attr('value_floats')) return DataType.FLOAT;
    if (n.attr('value_int') || n.attr('value_ints')) return DataType.INT64;
    return undefined;
  }
  if (n.opType === 'ConstantOfShape') return n.attr('value')?.t?.data_type || DataType.FLOAT;
  if (n.opType === 'Where') return n.inputs[1] ? type.get(n.inputs[1]) : undefined;
  if (BOOL_OUT.has(n.opType)) return DataType.BOOL;
  if (INT64_OUT.has(n.opType)) return DataType.INT64;
  if (SAME_AS_FIRST.has(n.opType)) return first;
  return undefined;
}

/** Messages for default-domain ops whose input element types ONNX type checking refuses. */
export function elemTypeIssues(g: Graph): string[] {
  const type = certainElemTypes(g);
  const issues: string[] = [];
  const of = (n: Node, i: number) => {
    const v = n.inputs[i];
    return v ? type.get(v) : undefined;
  };
  for (const n of g.nodes) {
    if (n.domain !== '' && n.domain !== 'ai.onnx') continue;
    const index = INDEX_INPUTS[n.opType];
    if (index) {
      for (const slot of index.slots) {
        const t = of(n, slot);
        if (t !== undefined && !index.types.includes(t)) {
          issues.push(`${n.describe()} input ${slot} is ${typeName(t)}; ${n.opType} takes ${index.types.map(typeName).join(' or ')} there`);
        }
      }
    }
    const same = n.opType === 'Concat' ? n.inputs.map((_, i) => i) : SAME_TYPE_INPUTS[n.opType];
    if (same) {
      const ts = same.map((i) => of(n, i)).filter((t): t is number => t !== undefined);
      if (new Set(ts).size > 1) issues.push(`${n.describe()} mixes element types ${[...new Set(ts)].map(typeName).join(' and ')}; its inputs must share one`);
    }
    if (n.opType === 'Where') {
      const c = of(n, 0);
      if (c !== undefined && c !== DataType.BOOL) issues.push(`${n.describe()} condition is ${typeName(c)}; Where takes bool`);
    }
  }
  return issues;
}
