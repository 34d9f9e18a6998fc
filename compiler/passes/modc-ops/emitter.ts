/**
 * An opset-aware node emitter: the modc op bodies are written once against it and come out
 * right for the model's default-domain opset (11 to 23): Unsqueeze/Squeeze/ReduceSum take axes
 * as an input from opset 13, ReduceMax/ReduceMin from 18; GreaterOrEqual exists only from 12.
 *
 * The same bodies are emitted into a FunctionProto body (a local function) or straight into the
 * model's graph (`--inline-ops`).
 */
import { attribute, Graph, graphAttribute, type Node, type Value } from '../../core/ir/graph.js';
import { DataType, floatToHalf } from '../../core/ir/dtype.js';
import { Tensor } from '../../core/ir/tensor.js';
import type { AttributeProto } from '../../core/proto/index.js';

export type AttrValue = number | string | number[] | Tensor | { float: number } | { floats: number[] };

export class Emitter {
  /**
   * @param graph where nodes go
   * @param opset the default-domain opset version of the model
   * @param prefix prefix of new value names (keeps inlined bodies readable)
   * @param before insert before this node instead of appending
   */
  constructor(
    readonly graph: Graph,
    readonly opset: number,
    readonly prefix = '',
    readonly before?: Node,
  ) {}

  /** One node; returns its outputs. */
  node(op: string, inputs: (Value | null)[], attrs: Record<string, AttrValue> = {}, outputs = 1, domain = ''): Value[] {
    const outs = Array.from({ length: outputs }, (_, i) => this.graph.newValue(`${this.prefix}${op.toLowerCase()}${outputs > 1 ? `_${i}` : ''}`));
    const protos: AttributeProto[] = Object.entries(attrs).map(([k, v]) => toAttribute(k, v));
    this.graph.addNode(op, inputs, outs, { domain, attributes: protos, before: this.before });
    return outs;
  }

  op(op: string, inputs: (Value | null)[], attrs: Record<string, AttrValue> = {}): Value {
    return this.node(op, inputs, attrs)[0]!;
  }

  /**
   * If(cond): each branch's nodes come from its callback, on an emitter for that branch (they
   * may read any value of this graph); `types` are the element types of the outputs, `name`
   * the If's name after this emitter's prefix.
   */
  ifThenElse(cond: Value, then: (e: Emitter) => Value[], otherwise: (e: Emitter) => Value[], types: number[], name?: string): Value[] {
    const branch = (branchName: string, build: (e: Emitter) => Value[]): Graph => {
      const g = new Graph(`${this.prefix}${branchName}`, this.graph);
      const e = new Emitter(g, this.opset, this.prefix);
      // A branch output is made in the branch (ONNX Runtime refuses an outer value returned as is).
      g.outputs = build(e).map((v, i) => {
        const out = v.producer?.graph === g ? v : e.op('Identity', [v]);
        out.type = { tensor_type: { elem_type: types[i]! } };
        return out;
      });
      return g;
    };
    const outs = types.map(() => this.graph.newValue(`${this.prefix}if`));
    const node = this.graph.addNode('If', [cond], outs, { before: this.before, name: name && `${this.prefix}${name}` });
    node.setAttr(graphAttribute('then_branch'), branch('then', then));
    node.setAttr(graphAttribute('else_branch'), branch('else', otherwise));
    return outs;
  }

  // ---- constants (Constant nodes: function bodies cannot hold initializers)

  constant(t: Tensor): Value {
    return this.op('Constant', [], { value: t });
  }

  i64(values: number[] | number): Value {
    const arr = Array.isArray(values) ? values : [values];
    return this.constant(Tensor.fromArray('', Array.isArray(values) ? [arr.length] : [], BigInt64Array.from(arr.map(BigInt))));
  }

  f32(value: number): Value {
    return this.constant(Tensor.fromArray('', [], Float32Array.from([value])));
  }

  /** A scalar of the given element type (float, float16 or double). */
  scalar(value: number, dtype: number): Value {
    if (dtype === DataType.FLOAT16) return this.constant(Tensor.fromArray('', [], Uint16Array.from([floatToHalf(value)]), DataType.FLOAT16));
    if (dtype === DataType.DOUBLE) return this.constant(Tensor.fromArray('', [], Float64Array.from([value])));
    return this.f32(value);
  }

  // ---- ops whose form changed across opsets

  unsqueeze(x: Value, axes: number[]): Value {
    return this.opset >= 13 ? this.op('Unsqueeze', [x, this.i64(axes)]) : this.op('Unsqueeze', [x], { axes });
  }

  squeeze(x: Value, axes: number[]): Value {
    return this.opset >= 13 ? this.op('Squeeze', [x, this.i64(axes)]) : this.op('Squeeze', [x], { axes });
  }

  reduceSum(x: Value, axes: number[], keepdims: boolean): Value {
    const k = keepdims ? 1 : 0;
    return this.opset >= 13 ? this.op('ReduceSum', [x, this.i64(axes)], { keepdims: k }) : this.op('ReduceSum', [x], { axes, keepdims: k });
  }

  reduceMax(x: Value, axes: number[], keepdims: boolean): Value {
    const k = keepdims ? 1 : 0;
    return this.opset >= 18 ? this.op('ReduceMax', [x, this.i64(axes)], { keepdims: k }) : this.op('ReduceMax', [x], { axes, keepdims: k });
  }

  /** x >= y: GreaterOrEqual from opset 12, Not(Less) before it. */
  greaterOrEqual(x: Value, y: Value): Value {
    return this.opset >= 12 ? this.op('GreaterOrEqual', [x, y]) : this.op('Not', [this.op('Less', [x, y])]);
  }

  cast(x: Value, to: number): Value {
    return this.op('Cast', [x], { to });
  }

  /** Dimension `axis` (>= 0) of x's shape as a 1-element int64 tensor: one Shape slice from opset 15. */
  dim(x: Value, axis: number): Value {
    if (this.opset >= 15) return this.op('Shape', [x], { start: axis, end: axis + 1 });
    return this.op('Gather', [this.op('Shape', [x]), this.i64([axis])], { axis: 0 });
  }

  /** Dimension `axis` of x's shape as an int64 scalar. */
  dimScalar(x: Value, axis: number): Value {
    return this.op('Gather', [this.op('Shape', [x]), this.i64(axis)], { axis: 0 });
  }
}

function toAttribute(name: string, v: AttrValue): AttributeProto {
  if (typeof v === 'object' && !Array.isArray(v) && !(v instanceof Tensor)) {
    return 'float' in v ? attribute(name, v.float, 'float') : attribute(name, v.floats, 'float');
  }
  return attribute(name, v as number | string | number[] | Tensor, typeof v === 'number' ? 'int' : undefined);
}
