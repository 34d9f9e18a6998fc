/**
 * The branch of a residual step: the nodes between the stream and the step's other operand,
 * found by walking backwards until stream values, normalised copies made by fused ops, or
 * values that do not depend on the stream at all (masks, positions, weights).
 */
import type { Node, Value } from '../core/ir/graph.js';
import { isNormOp } from './ops.js';
import type { NormEvidence } from './types.js';

/** What the stream walk knows so far. */
export interface StreamState {
  /** Values downstream of the stream start (the only values a branch can be built from). */
  dependent: ReadonlySet<Value>;
  /** Stream values accepted so far. */
  streamValues: ReadonlySet<Value>;
  /** Output 0 of fused norm ops, and the stream value each is a normalised copy of. */
  normedCopies: ReadonlyMap<Value, { node: Node; of: Value }>;
}

export interface BranchWalk {
  nodes: Set<Node>;
  /** Stream values the branch reads, each with the branch nodes reading it. */
  reads: Map<Value, Node[]>;
  /** Fused normed copies the branch reads. */
  fusedReads: Value[];
}

export function walkBranch(branch: Value, state: StreamState): BranchWalk {
  const walk: BranchWalk = { nodes: new Set(), reads: new Map(), fusedReads: [] };
  const stack: [Value, Node | null][] = [[branch, null]];
  while (stack.length) {
    const [v, reader] = stack.pop()!;
    if (state.streamValues.has(v)) {
      const list = walk.reads.get(v) ?? [];
      if (reader) list.push(reader);
      walk.reads.set(v, list);
      continue;
    }
    if (state.normedCopies.has(v)) {
      if (!walk.fusedReads.includes(v)) walk.fusedReads.push(v);
      continue;
    }
    const p = v.producer;
    if (!state.dependent.has(v) || !p || walk.nodes.has(p)) continue;
    walk.nodes.add(p);
    for (const i of p.inputs) if (i) stack.push([i, p]);
  }
  return walk;
}

/** The norm op a reader of the stream is, or feeds through one Cast (fp16 models norm in fp32). */
function normOpReading(reader: Node, walk: BranchWalk): Node | null {
  if (isNormOp(reader)) return reader;
  if (reader.opType !== 'Cast') return null;
  return (
    reader
      .output(0)
      .consumers()
      .find((n) => isNormOp(n) && walk.nodes.has(n)) ?? null
  );
}

/** Ops a decomposed norm applies to x before its ReduceMean (x², x - mean, casts). */
const DECOMPOSED_NORM_PATH = new Set(['Pow', 'Mul', 'Sub', 'Cast', 'ReduceMean']);

/**
 * Evidence that the branch reads a normalised copy of one of `allowed` (the stream values of
 * the current layer): a norm op on it, a decomposed norm (ReduceMean of x², or of x - mean),
 * or a fused norm's output 0.
 */
export function findNormEvidence(walk: BranchWalk, allowed: ReadonlySet<Value>, state: StreamState): NormEvidence | null {
  for (const v of walk.fusedReads) {
    const copy = state.normedCopies.get(v)!;
    if (allowed.has(copy.of)) return { kind: 'fused', node: copy.node, of: copy.of };
  }
  for (const [x, readers] of walk.reads) {
    if (!allowed.has(x)) continue;
    const op = readers.map((n) => normOpReading(n, walk)).find((n) => n !== null);
    if (op) return { kind: 'op', node: op, of: x };
  }
  for (const n of walk.nodes) {
    if (n.opType !== 'ReduceMean') continue;
    const x = decomposedNormSource(n, walk, allowed);
    if (x) return { kind: 'decomposed', node: n, of: x };
  }
  return null;
}

/** The stream value a ReduceMean reduces (x, x², x - mean(x)) within a few hops, if any. */
function decomposedNormSource(reduce: Node, walk: BranchWalk, allowed: ReadonlySet<Value>): Value | null {
  let frontier: Value[] = [reduce.inputs[0]!];
  for (let depth = 0; depth < 4 && frontier.length; depth++) {
    const next: Value[] = [];
    for (const v of frontier) {
      if (allowed.has(v)) return v;
      const p = v.producer;
      if (p && walk.nodes.has(p) && DECOMPOSED_NORM_PATH.has(p.opType)) next.push(...p.inputs.filter((i): i is Value => i !== null));
    }
    frontier = next;
  }
  return null;
}
