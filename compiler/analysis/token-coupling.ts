/**
 * Ops that couple the tokens of a call: their output at one token depends on every other token
 * of the tensor, not through attention but through a statistic taken over the whole input.
 * A routed layer runs on its selected tokens only, so it would compute such a statistic over
 * them alone: the all-pass compile would not equal the original (padding tokens, which are never
 * selected, would drop out of it too). Such a region stays dense.
 *
 * - Dynamic activation quantization: `DynamicQuantizeLinear` (and ORT's fused
 *   `DynamicQuantizeMatMul`) compute one scale and zero point from the minimum and maximum of
 *   the whole activation tensor.
 * - A reduction or normalisation along the token or batch axis of a value computed from the
 *   region's input (ReduceMean over the sequence, a LayerNormalization from axis 1, a Softmax or
 *   CumSum along the tokens), found by tracking the input's [batch, token] axes through the
 *   region (compiler/analysis/token-axes.ts). The attention core itself mixes tokens through its
 *   cache, which routing handles; its nodes are not checked.
 */
import type { Node, Value } from '../core/ir/graph.js';
import { quote } from '../core/errors.js';
import { axesOf, type GraphFacts } from './graph-facts.js';
import { trackAxes, type AxisFact } from './token-axes.js';

const COUPLING: Record<string, string> = {
  DynamicQuantizeLinear: 'quantizes its input with one scale taken over all tokens of the call',
  DynamicQuantizeMatMul: 'quantizes its input with one scale taken over all tokens of the call',
};

const REDUCE = new Set([
  'ReduceMean',
  'ReduceSum',
  'ReduceMax',
  'ReduceMin',
  'ReduceProd',
  'ReduceL1',
  'ReduceL2',
  'ReduceLogSum',
  'ReduceLogSumExp',
  'ReduceSumSquare',
]);

/** The axes of its input 0 an op reduces or normalises over (of a tensor of `rank`), or null when it reduces none. */
function reducedAxes(n: Node, rank: number, facts: GraphFacts): number[] | null {
  const all = Array.from({ length: rank }, (_, i) => i);
  const from = (axis: number) => all.slice(axis < 0 ? axis + rank : axis);
  const one = (axis: number) => [axis < 0 ? axis + rank : axis];
  if (REDUCE.has(n.opType)) {
    const axes = axesOf(n, facts);
    if (!axes || axes.length === 0) return n.attrInt('noop_with_empty_axes', 0) === 1 ? null : all;
    return axes.map((a) => (a < 0 ? a + rank : a));
  }
  switch (n.opType) {
    case 'ArgMax':
    case 'ArgMin':
      return one(n.attrInt('axis', 0) ?? 0);
    case 'Softmax':
    case 'LogSoftmax':
    case 'Hardmax':
      return one(n.attrInt('axis', -1) ?? -1);
    case 'TopK':
      return one(n.attrInt('axis', -1) ?? -1);
    case 'CumSum': {
      const axis = facts.constInts(n.input(1))?.[0];
      return axis === undefined ? all : one(axis);
    }
    case 'LayerNormalization':
    case 'RMSNormalization':
    case 'SimplifiedLayerNormalization':
      return from(n.attrInt('axis', -1) ?? -1);
    case 'MeanVarianceNormalization':
      return (n.attrInts('axes') ?? [0, 2, 3]).map((a) => (a < 0 ? a + rank : a));
    default:
      return null;
  }
}

/**
 * Why a region with these nodes cannot run on a subset of its tokens, or null. `inputs` are the
 * values the region reads the stream through ([batch, token, hidden]); `exempt`, the attention core.
 */
export function tokenCouplingBlocker(
  nodes: Iterable<Node>,
  dataflow?: { inputs: readonly Value[]; facts: GraphFacts; exempt: readonly Node[]; paddingMask?: readonly Value[] },
): string | null {
  const list = [...nodes];
  for (const n of list) {
    const why = COUPLING[n.opType];
    if (why && (n.domain === '' || n.domain === 'ai.onnx' || n.domain === 'com.microsoft')) {
      return `${n.opType} ${quote(n.name)} ${why}, so the selected tokens alone cannot reproduce it (dynamic activation quantization is not routed)`;
    }
  }
  if (!dataflow || list.length === 0) return null;
  const region = new Set(list);
  const exempt = new Set(dataflow.exempt);
  const graph = list[0]!.graph;
  if (!graph) return null;
  const known = new Map<Value, AxisFact>();
  for (const x of dataflow.inputs) {
    for (const [v, fact] of trackAxes(graph, x, [0, 1], dataflow.facts, (n) => region.has(n), dataflow.facts.rank(x) ?? 3))
      if (!known.has(v)) known.set(v, fact);
  }
  for (const n of list) {
    if (exempt.has(n) || (n.domain !== '' && n.domain !== 'ai.onnx' && n.domain !== 'com.microsoft')) continue;
    const input = n.input(0);
    const fact = input ? known.get(input) : undefined;
    if (!fact) continue;
    const reduced = reducedAxes(n, fact.rank, dataflow.facts);
    if (!reduced) continue;
    const [batch, token] = fact.axes;
    const hit =
      token !== null && token !== undefined && reduced.includes(token)
        ? 'token'
        : batch !== null && batch !== undefined && reduced.includes(batch)
          ? 'batch'
          : null;
    if (hit === 'token' && dataflow.paddingMask && zeroesPadding(input!, known, dataflow.paddingMask)) continue;
    if (hit) {
      return `${n.describe()} reduces over the ${hit} axis of ${input} (axis ${hit === 'token' ? token : batch}), so the selected tokens alone cannot reproduce it`;
    }
  }
  return null;
}

/** Whether `v` is a Mul of a stream value by a factor read from the padding mask alone (no stream value in it). */
function zeroesPadding(v: Value, stream: ReadonlyMap<Value, AxisFact>, masks: readonly Value[]): boolean {
  const mul = v.producer;
  if (!mul || mul.opType !== 'Mul' || (mul.domain !== '' && mul.domain !== 'ai.onnx')) return false;
  const [a, b] = [mul.input(0), mul.input(1)];
  if (!a || !b) return false;
  const factor = stream.has(a) && !stream.has(b) ? b : stream.has(b) && !stream.has(a) ? a : null;
  return factor !== null && readsOnly(factor, new Set(masks));
}

/** Whether every graph input whose data reaches `v` is one of `allowed` (constants and shapes aside), and at least one is. */
function readsOnly(v: Value, allowed: ReadonlySet<Value>): boolean {
  const seen = new Set<Value>();
  const stack = [v];
  let reached = false;
  while (stack.length > 0) {
    const x = stack.pop()!;
    if (seen.has(x)) continue;
    seen.add(x);
    if (allowed.has(x)) {
      reached = true;
      continue;
    }
    const p = x.producer;
    if (!p) {
      if (x.isConstant) continue;
      return false;
    }
    if (p.opType === 'Shape' || p.opType === 'Size') continue; // reads no data
    for (const i of p.inputs) if (i) stack.push(i);
  }
  return reached;
}
