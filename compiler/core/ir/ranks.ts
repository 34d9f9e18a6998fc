/**
 * Rank checks: the shape-inference errors ONNX Runtime raises at load for a rank that cannot
 * fit an op (a Gather whose data is a scalar, a Transpose whose perm has the wrong length, a
 * Concat of tensors of different ranks, an axis out of range). A library edit can rewire an
 * input to a value of another rank; the IR verifier then refuses the model rather than save one
 * that ONNX Runtime cannot load.
 *
 * Ranks are propagated forward from what is certain: graph inputs with a declared shape,
 * initializers, Constant nodes, and the ops below whose output rank follows from their input
 * ranks and attributes. A value whose rank is not certain is never checked, so a valid model is
 * never refused for a rank this pass merely failed to infer.
 */
import { int64ToNumber } from '../proto/index.js';
import { externalInputsOf, type Graph, type Node, type Value } from './graph.js';

const SAME_RANK = new Set([
  'Identity',
  'Cast',
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
  'Not',
  'Softmax',
  'LogSoftmax',
  'Floor',
  'Ceil',
  'Round',
  'Sign',
  'CumSum',
  'Gelu',
  'LayerNormalization',
  'RMSNormalization',
  'SimplifiedLayerNormalization',
  'Trilu',
  'IsNaN',
  'IsInf',
  'Slice',
  'Transpose',
  'Dropout',
  'ScatterND',
  'ScatterElements',
]);
const BROADCAST = new Set([
  'Add',
  'Sub',
  'Mul',
  'Div',
  'Pow',
  'Equal',
  'Less',
  'LessOrEqual',
  'Greater',
  'GreaterOrEqual',
  'And',
  'Or',
  'Xor',
  'Where',
  'Max',
  'Min',
  'Mod',
  'BitShift',
]);

/**
 * The nodes in an order where each comes after the producers it reads (stable: a sorted graph
 * keeps its order), without reordering the graph itself; nodes on a cycle are left out.
 */
export function dependencyOrder(g: Graph): Node[] {
  const waiting = new Map<Node, number>();
  const readers = new Map<Node, Node[]>();
  for (const n of g.nodes) {
    const deps = new Set<Node>();
    for (const v of externalInputsOf(n)) if (v.producer && v.producer.graph === g && v.producer !== n) deps.add(v.producer);
    waiting.set(n, deps.size);
    for (const d of deps) {
      const list = readers.get(d);
      if (list) list.push(n);
      else readers.set(d, [n]);
    }
  }
  const order: Node[] = [];
  const seen = new Set<Node>();
  // One pass in graph order places a sorted graph as it is; a node seen before its producers
  // is placed as soon as the last of them is.
  for (const first of g.nodes) {
    seen.add(first);
    if (waiting.get(first) !== 0) continue;
    const ready = [first];
    while (ready.length) {
      const n = ready.pop()!;
      order.push(n);
      for (const r of readers.get(n) ?? []) {
        const left = waiting.get(r)! - 1;
        waiting.set(r, left);
        if (left === 0 && seen.has(r)) ready.push(r);
      }
    }
  }
  return order;
}

/** The rank of each value whose rank is certain. */
export function certainRanks(g: Graph): Map<Value, number> {
  const rank = new Map<Value, number>();
  for (const v of g.inputs) {
    const s = v.type?.tensor_type?.shape;
    if (s) rank.set(v, s.dim.length);
  }
  for (const v of g.initializers.values()) if (v.initializer) rank.set(v, v.initializer.dims.length);
  for (const n of dependencyOrder(g)) {
    if (n.domain !== '' && n.domain !== 'ai.onnx') continue;
    const r = outputRank(n, rank);
    if (r !== undefined && r >= 0 && n.outputs[0]) rank.set(n.outputs[0], r);
  }
  return rank;
}

function outputRank(n: Node, rank: ReadonlyMap<Value, number>): number | undefined {
  const r = (i: number) => {
    const v = n.inputs[i];
    return v ? rank.get(v) : undefined;
  };
  const op = n.opType;
  if (SAME_RANK.has(op)) return r(0);
  if (BROADCAST.has(op)) {
    const rs = n.inputs.map((v) => (v ? rank.get(v) : undefined));
    return rs.length && rs.every((x) => x !== undefined) ? Math.max(...(rs as number[])) : undefined;
  }
  switch (op) {
    case 'Shape':
    case 'NonZero':
    case 'Range':
      return op === 'NonZero' ? 2 : 1;
    case 'Size':
      return 0;
    case 'Constant': {
      const t = n.attr('value')?.t;
      if (t) return t.dims.length;
      if (n.attr('value_float') || n.attr('value_int') || n.attr('value_string')) return 0;
      if (n.attr('value_floats') || n.attr('value_ints') || n.attr('value_strings')) return 1;
      return undefined;
    }
    case 'Gather': {
      const d = r(0),
        q = r(1);
      return d !== undefined && q !== undefined && d >= 1 ? d + q - 1 : undefined;
    }
    case 'GatherElements':
      return r(1);
    case 'Concat': {
      const known = n.inputs.map((v) => (v ? rank.get(v) : undefined)).filter((x): x is number => x !== undefined);
      return known[0];
    }
    case 'ConstantOfShape': {
      const shape = n.inputs[0]?.initializer;
      return shape && shape.dims.length === 1 ? shape.dims[0] : undefined;
    }
    case 'Unsqueeze':
    case 'Squeeze': {
      const axes = n.attrInts('axes') ?? constantInts(n.inputs[1] ?? null);
      const d = r(0);
      if (d === undefined || axes === undefined) return undefined;
      return op === 'Unsqueeze' ? d + axes.length : d - axes.length;
    }
    case 'Reshape': {
      const shape = n.inputs[1]?.initializer;
      return shape && shape.dims.length === 1 ? shape.dims[0] : undefined;
    }
    default:
      return undefined;
  }
}

function constantInts(v: Value | null): number[] | undefined {
  const t = v?.initializer;
  if (!t || t.dims.length !== 1) return undefined;
  const p = t.proto;
  if (p.int64_data?.length) return p.int64_data.map(int64ToNumber);
  if (p.raw_data && p.raw_data.byteLength === t.dims[0]! * 8) {
    const view = new DataView(p.raw_data.buffer, p.raw_data.byteOffset, p.raw_data.byteLength);
    return Array.from({ length: t.dims[0]! }, (_, i) => Number(view.getBigInt64(i * 8, true)));
  }
  return undefined;
}

/** Ops whose output has exactly the shape of input 0. */
const SAME_SHAPE = new Set([
  'Identity',
  'Cast',
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
  'Not',
  'Softmax',
  'LogSoftmax',
  'Floor',
  'Ceil',
  'Round',
  'Sign',
  'Gelu',
  'Dropout',
  'IsNaN',
  'IsInf',
  'LayerNormalization',
  'RMSNormalization',
  'SimplifiedLayerNormalization',
  'CumSum',
  'Trilu',
]);
const BROADCAST_SHAPE = new Set(['Add', 'Sub', 'Mul', 'Div']);

type Dims = (number | null)[];

/**
 * Dims that are certain (null where a dim is symbolic or unknown), for values whose rank is
 * certain: from declared inputs and initializers, through shape-preserving ops, broadcasting
 * arithmetic, Transpose and MatMul. Enough to see a MatMul whose inner dims cannot agree.
 */
export function certainDims(g: Graph): Map<Value, Dims> {
  const dims = new Map<Value, Dims>();
  for (const v of g.inputs) {
    const s = v.type?.tensor_type?.shape;
    if (s)
      dims.set(
        v,
        s.dim
          .map((d) => (d.dim_value !== undefined && d.dim_value !== null && !d.dim_param ? int64ToNumber(d.dim_value) : null))
          .map((d) => (d !== null && d > 0 ? d : null)),
      );
  }
  for (const v of g.initializers.values()) if (v.initializer) dims.set(v, v.initializer.dims);
  for (const n of dependencyOrder(g)) {
    if ((n.domain !== '' && n.domain !== 'ai.onnx') || !n.outputs[0]) continue;
    const d = (i: number) => (n.inputs[i] ? dims.get(n.inputs[i]!) : undefined);
    let out: Dims | undefined;
    if (SAME_SHAPE.has(n.opType)) out = d(0);
    else if (n.opType === 'Transpose') {
      const a = d(0);
      const perm = n.attrInts('perm');
      if (a && perm?.length === a.length && perm.every((p) => p >= 0 && p < a.length)) out = perm.map((p) => a[p]!);
    } else if (n.opType === 'MatMul') {
      const [a, b] = [d(0), d(1)];
      if (a && b && a.length >= 2 && b.length >= 2) out = [...Array(Math.max(a.length, b.length) - 2).fill(null), a[a.length - 2]!, b[b.length - 1]!];
    } else if (BROADCAST_SHAPE.has(n.opType)) {
      const [a, b] = [d(0), d(1)];
      if (a && b) {
        const r = Math.max(a.length, b.length);
        // A missing leading dim broadcasts as 1; a dim that is there but unknown (null) stays unknown.
        const at = (v: Dims, i: number) => (v.length - r + i >= 0 ? v[v.length - r + i]! : 1);
        out = Array.from({ length: r }, (_, i) => {
          const x = at(a, i);
          const y = at(b, i);
          if (x !== null && y !== null) return x === y || y === 1 ? x : x === 1 ? y : null;
          const known = x ?? y;
          return known !== null && known > 1 ? known : null;
        });
      }
    }
    if (out) dims.set(n.outputs[0], out);
  }
  return dims;
}

/**
 * The last dim of each value where it is certain, also when its other dims (or its rank) are not:
 * a MatMul by a weight [K, N] ends in N whatever its input, and shape-preserving and
 * broadcasting ops keep a last dim greater than 1.
 */
export function certainLastDims(g: Graph, dims: ReadonlyMap<Value, Dims>): Map<Value, number> {
  const last = new Map<Value, number>();
  for (const [v, d] of dims) if (typeof d.at(-1) === 'number') last.set(v, d.at(-1) as number);
  for (const n of dependencyOrder(g)) {
    if ((n.domain !== '' && n.domain !== 'ai.onnx') || !n.outputs[0] || last.has(n.outputs[0])) continue;
    const l = (i: number) => (n.inputs[i] ? last.get(n.inputs[i]!) : undefined);
    let out: number | undefined;
    if (SAME_SHAPE.has(n.opType)) out = l(0);
    else if (n.opType === 'MatMul') {
      const b = n.inputs[1] ? dims.get(n.inputs[1]) : undefined;
      if (b && b.length >= 2 && typeof b.at(-1) === 'number') out = b.at(-1) as number;
    } else if (BROADCAST_SHAPE.has(n.opType)) {
      const [x, y] = [l(0), l(1)];
      if (x !== undefined && y !== undefined) out = x === y || y === 1 ? x : x === 1 ? y : undefined;
      else out = [x, y].find((k) => k !== undefined && k > 1);
    }
    if (out !== undefined) last.set(n.outputs[0], out);
  }
  return last;
}

/** Messages for ops whose input ranks ONNX shape inference refuses. */
export function rankIssues(g: Graph): string[] {
  const rank = certainRanks(g);
  const dims = certainDims(g);
  const lastDims = certainLastDims(g, dims);
  const issues: string[] = [];
  const inAxis = (axis: number, r: number) => axis >= -r && axis < r;
  for (const n of g.nodes) {
    if (n.domain !== '' && n.domain !== 'ai.onnx') continue;
    const r = (i: number) => {
      const v = n.inputs[i];
      return v ? rank.get(v) : undefined;
    };
    const say = (what: string) => issues.push(`${n.describe()} ${what}`);
    switch (n.opType) {
      case 'Gather':
      case 'GatherElements': {
        const d = r(0);
        if (d === 0) say('reads a scalar as its data; it needs rank >= 1');
        else if (d !== undefined && !inAxis(n.attrInt('axis', 0), d)) say(`has axis ${n.attrInt('axis', 0)} for data of rank ${d}`);
        if (n.opType === 'GatherElements' && d !== undefined && r(1) !== undefined && r(1) !== d)
          say(`has data of rank ${d} and indices of rank ${r(1)}; they must match`);
        break;
      }
      case 'MatMul': {
        if (r(0) === 0 || r(1) === 0) {
          say('multiplies a scalar; MatMul needs inputs of rank >= 1');
          break;
        }
        const [a, b] = [n.inputs[0] ? dims.get(n.inputs[0]) : undefined, n.inputs[1] ? dims.get(n.inputs[1]) : undefined];
        const k = a?.[a.length - 1] ?? (n.inputs[0] ? lastDims.get(n.inputs[0]) : undefined);
        const kb = b ? b[b.length >= 2 ? b.length - 2 : 0] : undefined;
        if (typeof k === 'number' && typeof kb === 'number' && k !== kb)
          say(`multiplies an input whose last dim is ${k} by one whose ${b!.length >= 2 ? 'second-to-last' : 'only'} dim is ${kb}; they must agree`);
        break;
      }
      case 'Transpose': {
        const perm = n.attrInts('perm');
        const d = r(0);
        if (perm && perm.length && d !== undefined && perm.length !== d) say(`has a perm of length ${perm.length} for an input of rank ${d}`);
        break;
      }
      case 'Concat': {
        const ranks = n.inputs.map((v) => (v ? rank.get(v) : undefined)).filter((x): x is number => x !== undefined);
        if (new Set(ranks).size > 1) say(`joins inputs of ranks ${[...new Set(ranks)].join(' and ')}; they must match`);
        else if (ranks.length && (ranks[0] === 0 || !inAxis(n.attrInt('axis', 0), ranks[0]!)))
          say(`has axis ${n.attrInt('axis', 0)} for inputs of rank ${ranks[0]}`);
        break;
      }
      case 'Softmax':
      case 'LogSoftmax': {
        const d = r(0);
        if (d !== undefined && d > 0 && !inAxis(n.attrInt('axis', -1), d)) say(`has axis ${n.attrInt('axis', -1)} for an input of rank ${d}`);
        break;
      }
      default:
    }
  }
  return issues;
}
