/**
 * Where the batch and token axes of a graph input (position_ids [B, S], attention_mask [B, T])
 * end up in values computed from it: propagated forward through the shape-moving ops of the
 * prefix (Unsqueeze, Transpose, broadcasting, Gather by indices, ...). An axis that an op may
 * move in a way the rules do not model (Reshape, Squeeze of that axis) becomes unknown (null).
 */
import type { Graph, Node, Value } from '../core/ir/graph.js';
import { axesOf, type GraphFacts } from './graph-facts.js';

/** Rank of a value and the positions of the tracked axes in it (null: lost). */
export interface AxisFact {
  rank: number;
  axes: (number | null)[];
}

const SAME_SHAPE = new Set([
  'Cast',
  'Cos',
  'Sin',
  'Neg',
  'Sqrt',
  'Reciprocal',
  'Exp',
  'Log',
  'Identity',
  'Not',
  'Abs',
  'Erf',
  'Tanh',
  'Sigmoid',
  'Relu',
  'Floor',
  'Ceil',
  'Round',
  'Sign',
  'CumSum',
  'Slice',
  'Tile',
  'Pad',
  'Clip',
  'Softmax',
]);
const BROADCAST = new Set([
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
  'Concat',
  'Expand',
]);

type AxisRule = (n: Node, slot: number, fact: AxisFact, f: GraphFacts) => AxisFact | null;

const norm = (a: number, rank: number) => (a < 0 ? a + rank : a);

const RULES: Record<string, AxisRule> = {
  Unsqueeze: (n, _s, fact, f) => {
    const axes = axesOf(n, f);
    if (!axes) return null;
    const rank = fact.rank + axes.length;
    const inserted = axes.map((a) => norm(a, rank)).sort((a, b) => a - b);
    const move = (x: number | null) => {
      if (x === null) return null;
      for (const a of inserted) if (a <= x) x++;
      return x;
    };
    return { rank, axes: fact.axes.map(move) };
  },
  Squeeze: (n, _s, fact, f) => {
    const axes = axesOf(n, f)?.map((a) => norm(a, fact.rank));
    if (!axes) return null;
    const move = (x: number | null) => (x === null || axes.includes(x) ? null : x - axes.filter((a) => a < x).length);
    return { rank: fact.rank - axes.length, axes: fact.axes.map(move) };
  },
  Transpose: (n, _s, fact) => {
    const perm = n.attrInts('perm') ?? Array.from({ length: fact.rank }, (_, i) => fact.rank - 1 - i);
    return { rank: fact.rank, axes: fact.axes.map((x) => (x === null ? null : perm.indexOf(x))) };
  },
  Gather: (n, slot, fact, f) => {
    const dataRank = f.rank(n.inputs[0]!);
    const idxRank = f.rank(n.inputs[1]!);
    if (dataRank === undefined || idxRank === undefined) return null;
    const a = norm(n.attrInt('axis', 0), dataRank);
    const rank = dataRank - 1 + idxRank;
    if (slot === 1) return { rank, axes: fact.axes.map((x) => (x === null ? null : a + x)) };
    return { rank, axes: fact.axes.map((x) => (x === null || x === a ? null : x < a ? x : x - 1 + idxRank)) };
  },
  MatMul: (n, slot, fact, f) => {
    const rank = f.rank(n.output(0));
    if (rank === undefined) return null;
    const move = (x: number | null) => {
      if (x === null) return null;
      if (slot === 0 && x <= fact.rank - 2) return x + rank - fact.rank;
      if (slot === 1 && x === fact.rank - 1) return rank - 1;
      return null;
    };
    return { rank, axes: fact.axes.map(move) };
  },
};

function broadcastRule(n: Node, fact: AxisFact, f: GraphFacts): AxisFact | null {
  const rank = f.rank(n.output(0));
  if (rank === undefined) return null;
  return { rank, axes: fact.axes.map((x) => (x === null ? null : x + rank - fact.rank)) };
}

function step(n: Node, slot: number, fact: AxisFact, f: GraphFacts): AxisFact | null {
  if (SAME_SHAPE.has(n.opType)) return fact;
  const rule = RULES[n.opType];
  if (rule) return rule(n, slot, fact, f);
  if (BROADCAST.has(n.opType)) return broadcastRule(n, fact, f);
  return null;
}

/**
 * Axis facts for every value computed from `origin` (of `rank`, by default its known rank)
 * through the nodes `within` accepts (the prefix, or a routed region). When two operands carry
 * the origin with different axes the result is unknown.
 */
export function trackAxes(
  graph: Graph,
  origin: Value,
  axes: number[],
  facts: GraphFacts,
  within: (n: Node) => boolean,
  rank: number = facts.rank(origin) ?? axes.length,
): Map<Value, AxisFact> {
  const known = new Map<Value, AxisFact>([[origin, { rank, axes }]]);
  for (const n of graph.nodes) {
    if (!within(n)) continue;
    let result: AxisFact | null | undefined;
    n.inputs.forEach((v, slot) => {
      const fact = v ? known.get(v) : undefined;
      if (!fact || result === null) return;
      const next = step(n, slot, fact, facts);
      result = result === undefined || (next && sameAxes(result, next)) ? next : null;
    });
    if (result) known.set(n.output(0), result);
  }
  return known;
}

function sameAxes(a: AxisFact, b: AxisFact): boolean {
  return a.rank === b.rank && a.axes.every((x, i) => x === b.axes[i]);
}
