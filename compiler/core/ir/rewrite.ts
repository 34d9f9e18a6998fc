/**
 * Rewiring helpers shared by passes: redirect a value's uses inside a region, take the backward
 * slice that computes some values, and re-run such a slice on substituted inputs.
 */
import { ModcError } from '../errors.js';
import type { Graph, Node, Value } from './graph.js';

/** Points every input slot of `nodes` that reads `from` at `to`. Returns how many were changed. */
export function replaceUsesWithin(nodes: ReadonlySet<Node>, from: Value, to: Value): number {
  let n = 0;
  for (const use of [...from.uses]) {
    if (!nodes.has(use.node)) continue;
    use.node.setInput(use.index, to);
    n++;
  }
  return n;
}

/** The nodes of `graph` that `values` depend on (transitively), in graph order. */
export function backwardSlice(graph: Graph, values: readonly Value[]): Node[] {
  const seen = new Set<Node>();
  const stack = [...values];
  while (stack.length) {
    const p = stack.pop()!.producer;
    if (!p || p.graph !== graph || seen.has(p)) continue;
    seen.add(p);
    for (const v of p.inputs) if (v) stack.push(v);
  }
  return graph.nodes.filter((n) => seen.has(n));
}

/** The graph inputs that `values` are computed from. */
export function graphInputsReached(graph: Graph, values: readonly Value[]): Set<Value> {
  const inputs = new Set(graph.inputs);
  const out = new Set<Value>();
  for (const v of values) if (inputs.has(v)) out.add(v);
  for (const n of backwardSlice(graph, values)) for (const v of n.inputs) if (v && inputs.has(v)) out.add(v);
  return out;
}

/**
 * Recomputes `values` with some of the values they depend on replaced: every node of their
 * backward slice that reads a substituted value, directly or through another such node, is
 * cloned (appended; sort the graph afterwards); the rest is shared. Returns what each requested
 * value becomes (itself when it does not depend on a substitute). The graph must be sorted.
 */
export function recomputeWith(graph: Graph, values: readonly Value[], substitute: ReadonlyMap<Value, Value>, suffix: string): Map<Value, Value> {
  const tainted = new Set<Value>(substitute.keys());
  const affected: Node[] = [];
  for (const n of backwardSlice(graph, values)) {
    if (!n.inputs.some((v) => v !== null && tainted.has(v))) continue;
    if (n.subgraphs().length > 0) throw new ModcError(`cannot recompute ${values.map(String).join(', ')}: ${n.describe()} has subgraphs`);
    affected.push(n);
    for (const o of n.outputs) tainted.add(o);
  }
  const mapping = new Map<Value, Value>(substitute);
  graph.cloneNodes(affected, mapping, { suffix });
  return new Map(values.map((v) => [v, mapping.get(v) ?? v]));
}
