/**
 * Facts about every value of a graph that ONNX files rarely spell out for intermediates:
 * element type, rank, the length of small 1-D shape vectors, small constant contents, and
 * whether a value is computable from constants alone. One forward pass in graph order, table
 * driven; anything a rule does not cover stays unknown rather than guessed.
 */
import { DataType } from '../core/ir/dtype.js';
import type { Graph, Node, Value } from '../core/ir/graph.js';
import { Tensor } from '../core/ir/tensor.js';

/** Constants larger than this are never decoded (they are weights, not shapes or axes). */
const SMALL_CONSTANT = 64;

const BOOL_OPS = new Set(['Equal', 'Less', 'LessOrEqual', 'Greater', 'GreaterOrEqual', 'And', 'Or', 'Not', 'Xor', 'IsNaN', 'IsInf']);
const INT64_OPS = new Set(['Shape', 'Size', 'NonZero', 'ArgMax', 'ArgMin']);
/**
 * Broadcasting ops: the output rank is the largest input rank, known only when every input's
 * rank is (an operand of unknown rank may be the largest: Mul(x, scale[H]) is not rank 1).
 */
const BROADCASTING = new Set([
  'Add',
  'Sub',
  'Mul',
  'Div',
  'Pow',
  'Where',
  'Equal',
  'Less',
  'LessOrEqual',
  'Greater',
  'GreaterOrEqual',
  'And',
  'Or',
  'Xor',
  'Max',
  'Min',
  'Mod',
  'Sum',
  'Mean',
]);
/** Ops whose output has the rank of their first input (the data; other inputs are parameters). */
const RANK_OF_FIRST = new Set([
  'Not',
  'Cast',
  'Neg',
  'Sqrt',
  'Reciprocal',
  'Exp',
  'Log',
  'Erf',
  'Tanh',
  'Sigmoid',
  'Relu',
  'Gelu',
  'FastGelu',
  'BiasGelu',
  'Cos',
  'Sin',
  'Abs',
  'Identity',
  'Softmax',
  'LayerNormalization',
  'SimplifiedLayerNormalization',
  'RMSNormalization',
  'Transpose',
  'Slice',
  'Split',
  'CumSum',
  'Tile',
  'Pad',
  'Trilu',
  'Clip',
  'Floor',
  'Ceil',
  'Round',
  'Sign',
  'IsNaN',
  'IsInf',
  'QuickGelu',
  'SkipLayerNormalization',
  'SkipSimplifiedLayerNormalization',
  'RotaryEmbedding',
  'Dropout',
  'QuantizeLinear',
  'DequantizeLinear',
  'DynamicQuantizeLinear',
  'MatMulNBits',
]);
const REDUCE_OPS = new Set(['ReduceMean', 'ReduceSum', 'ReduceMax', 'ReduceMin', 'ReduceProd', 'ReduceL2', 'ReduceSumSquare', 'ReduceLogSumExp']);

export class GraphFacts {
  /** Position of each node in graph order. */
  readonly order = new Map<Node, number>();
  private readonly dtypes = new Map<Value, number>();
  private readonly ranks = new Map<Value, number>();
  private readonly lengths = new Map<Value, number>();
  private readonly ints = new Map<Value, number[]>();
  private readonly constants = new Set<Value>();

  constructor(readonly graph: Graph) {
    for (const v of graph.inputs) this.seed(v);
    for (const v of graph.initializers.values()) {
      this.seed(v);
      this.constants.add(v);
    }
    graph.nodes.forEach((n, i) => {
      this.order.set(n, i);
      this.visit(n);
    });
  }

  dtype(v: Value): number | undefined {
    return this.dtypes.get(v);
  }

  rank(v: Value): number | undefined {
    return this.ranks.get(v);
  }

  /** Whether the value can be computed from initializers and Constant nodes alone. */
  isConstant(v: Value): boolean {
    return this.constants.has(v);
  }

  /** The contents of a small integer or float constant (shapes, axes, scalars). */
  constInts(v: Value | null): number[] | undefined {
    return v ? this.ints.get(v) : undefined;
  }

  /** Element count of a 1-D vector (a shape), when known. */
  length1d(v: Value | null): number | undefined {
    if (!v) return undefined;
    return this.lengths.get(v) ?? this.ints.get(v)?.length;
  }

  private seed(v: Value): void {
    if (v.dtype !== undefined) this.dtypes.set(v, v.dtype);
    const shape = v.shape;
    if (shape) this.ranks.set(v, shape.length);
    if (shape?.length === 1 && typeof shape[0] === 'number') this.lengths.set(v, shape[0]);
    if (v.initializer && !v.initializer.isExternal && v.initializer.size <= SMALL_CONSTANT) this.setInts(v, v.initializer);
  }

  private setInts(v: Value, t: Tensor): void {
    try {
      this.ints.set(v, t.toNumbers());
    } catch {
      // Not decodable (strings, exotic types): stays unknown.
    }
  }

  private visit(n: Node): void {
    const ins = n.inputs.filter((v): v is Value => v !== null);
    if (ins.every((v) => this.constants.has(v)) && n.subgraphs().length === 0) for (const o of n.outputs) this.constants.add(o);
    if (n.opType === 'Constant') this.visitConstant(n);
    n.outputs.forEach((o, i) => {
      if (!this.dtypes.has(o)) {
        const dt = o.dtype ?? this.outputDtype(n, i);
        if (dt !== undefined) this.dtypes.set(o, dt);
      }
      if (!this.ranks.has(o)) {
        const r = o.shape?.length ?? (i === 0 || n.opType === 'Split' ? this.outputRank(n) : undefined);
        if (r !== undefined) this.ranks.set(o, r);
      }
    });
    this.foldSmallInts(n);
  }

  private visitConstant(n: Node): void {
    const out = n.outputs[0];
    if (!out) return;
    const a = n.attr('value');
    if (a?.t) {
      const t = new Tensor(a.t);
      this.dtypes.set(out, t.dataType);
      this.ranks.set(out, t.dims.length);
      if (t.size <= SMALL_CONSTANT) this.setInts(out, t);
      return;
    }
    const single = n.attrInt('value_int') ?? n.attrFloat('value_float');
    if (single !== undefined) {
      this.ranks.set(out, 0);
      this.dtypes.set(out, n.attr('value_int') ? DataType.INT64 : DataType.FLOAT);
      this.ints.set(out, [single]);
    }
    const list = n.attrInts('value_ints');
    if (list && n.attr('value_ints')) {
      this.ranks.set(out, 1);
      this.dtypes.set(out, DataType.INT64);
      this.ints.set(out, list);
    }
  }

  private outputDtype(n: Node, slot: number): number | undefined {
    const first = (i: number) => (n.inputs[i] ? this.dtypes.get(n.inputs[i]!) : undefined);
    if (n.opType === 'Cast') return n.attrInt('to');
    if (INT64_OPS.has(n.opType)) return DataType.INT64;
    if (BOOL_OPS.has(n.opType)) return DataType.BOOL;
    if (n.opType === 'Where') return first(1) ?? first(2);
    if (n.opType === 'ConstantOfShape') {
      const t = n.attr('value')?.t;
      return t?.data_type ?? DataType.FLOAT;
    }
    if (n.opType === 'MatMulInteger' || n.opType === 'ConvInteger') return DataType.INT32;
    // QuantizeLinear: output_dtype (opset 21), else the zero point's type, else uint8.
    if (n.opType === 'QuantizeLinear') return n.attrInt('output_dtype') || first(2) || DataType.UINT8;
    // DequantizeLinear: the scale's type (output_dtype, opset 23+, when set).
    if (n.opType === 'DequantizeLinear') return n.attrInt('output_dtype') || first(1);
    if (n.opType === 'DynamicQuantizeLinear') return slot === 1 ? DataType.FLOAT : DataType.UINT8;
    if (n.opType === 'EmbedLayerNormalization') return slot === 1 ? DataType.INT32 : first(2);
    if ((n.opType === 'LayerNormalization' || n.opType.startsWith('Skip')) && (slot === 1 || slot === 2)) return DataType.FLOAT;
    for (const v of n.inputs) if (v && this.dtypes.has(v)) return this.dtypes.get(v);
    return undefined;
  }

  private outputRank(n: Node): number | undefined {
    const r = (i: number) => (n.inputs[i] ? this.ranks.get(n.inputs[i]!) : undefined);
    const rule = RANK_RULES[n.opType];
    if (rule) return rule(n, r, this);
    if (BROADCASTING.has(n.opType)) {
      const ranks = n.inputs.filter((v): v is Value => v !== null).map((v) => this.ranks.get(v));
      return ranks.length && ranks.every((x) => x !== undefined) ? Math.max(...(ranks as number[])) : undefined;
    }
    if (n.opType === 'Concat') {
      // Every input has the output's rank: any known one tells.
      return n.inputs.map((v) => (v ? this.ranks.get(v) : undefined)).find((x) => x !== undefined);
    }
    if (RANK_OF_FIRST.has(n.opType)) return r(0);
    if (REDUCE_OPS.has(n.opType)) return reduceRank(n, r(0), this);
    return undefined;
  }

  /** Tracks the contents of small shape vectors through the ops shape arithmetic uses. */
  private foldSmallInts(n: Node): void {
    const out = n.outputs[0];
    if (!out || this.ints.has(out)) return;
    const ins = n.inputs.map((v) => this.constInts(v));
    if (n.opType === 'Concat' && ins.every((x) => x !== undefined) && ins.length > 0) this.ints.set(out, ins.flat() as number[]);
    else if ((n.opType === 'Cast' || n.opType === 'Identity' || n.opType === 'Unsqueeze' || n.opType === 'Squeeze') && ins[0]) this.ints.set(out, ins[0]);
    if (n.opType === 'Shape' && n.inputs[0]) {
      const rank = this.ranks.get(n.inputs[0]);
      if (rank !== undefined) {
        // Opset 15's start/end slice the shape, clamped to [0, rank] after negatives count from the end.
        const at = (v: number) => Math.min(rank, Math.max(0, v < 0 ? v + rank : v));
        this.lengths.set(out, Math.max(0, at(n.attrInt('end') ?? rank) - at(n.attrInt('start') ?? 0)));
      }
    }
    if (n.opType === 'Concat') {
      const lens = n.inputs.map((v) => this.length1d(v));
      if (lens.every((x) => x !== undefined))
        this.lengths.set(
          out,
          (lens as number[]).reduce((a, b) => a + b, 0),
        );
    }
    if (n.opType === 'Unsqueeze' && n.inputs[0] && this.ranks.get(n.inputs[0]) === 0) this.lengths.set(out, 1);
    if (n.opType === 'Cast' && n.inputs[0] && this.lengths.has(n.inputs[0])) this.lengths.set(out, this.lengths.get(n.inputs[0])!);
  }
}

type RankOf = (i: number) => number | undefined;

/** Axes given as input 1 (opset 13+) or as the `axes` attribute (older opsets). */
export function axesOf(n: Node, facts: GraphFacts): number[] | undefined {
  return facts.constInts(n.inputs[1] ?? null) ?? n.attrInts('axes');
}

function reduceRank(n: Node, r: number | undefined, facts: GraphFacts): number | undefined {
  if (r === undefined) return undefined;
  if (n.attrInt('keepdims', 1) === 1) return r;
  const axes = axesOf(n, facts);
  return axes ? r - axes.length : 0;
}

const RANK_RULES: Record<string, (n: Node, r: RankOf, f: GraphFacts) => number | undefined> = {
  Shape: () => 1,
  Size: () => 0,
  Range: () => 1,
  NonZero: () => 2,
  Unsqueeze: (n, r, f) => {
    const axes = axesOf(n, f);
    const base = r(0);
    return axes && base !== undefined ? base + axes.length : undefined;
  },
  Squeeze: (n, r, f) => {
    const axes = axesOf(n, f);
    const base = r(0);
    return axes && base !== undefined ? base - axes.length : undefined;
  },
  Gather: (_n, r) => {
    const [d, i] = [r(0), r(1)];
    return d !== undefined && i !== undefined ? d - 1 + i : undefined;
  },
  Reshape: (n, _r, f) => f.length1d(n.inputs[1] ?? null),
  ConstantOfShape: (n, _r, f) => f.length1d(n.inputs[0] ?? null),
  Expand: (n, r, f) => {
    const [a, b] = [r(0), f.length1d(n.inputs[1] ?? null)];
    return a !== undefined && b !== undefined ? Math.max(a, b) : undefined;
  },
  MatMulInteger: (n, r, f) => RANK_RULES.MatMul!(n, r, f),
  MatMul: (_n, r) => {
    const [a, b] = [r(0), r(1)];
    if (a === undefined || b === undefined) return undefined;
    if (a === 1 || b === 1) return Math.max(a, b) - 1;
    return Math.max(a, b);
  },
  Gemm: () => 2,
  EmbedLayerNormalization: () => 3,
  Attention: () => 3,
  MultiHeadAttention: () => 3,
  GroupQueryAttention: () => 3,
};
