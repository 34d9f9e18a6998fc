/**
 * From residual steps to layers: which node belongs to which layer, each layer's boundary
 * values and fused boundary nodes, and its MLP part.
 *
 * Node ownership is one forward pass in graph order: a node belongs to the latest layer any of
 * its inputs belongs to, and the value leaving a layer's exit step belongs to the next layer.
 * Nodes reading no stream-dependent value are prefix (-1); nodes after the last layer are the
 * suffix (layer count). A value computed in layer l from the stream's shape and read in layer
 * l+3 therefore leaves layer l+3 intact instead of dragging it into layer l.
 */
import type { Graph, Node, Value } from '../core/ir/graph.js';
import type { AttentionCore, EmbeddingInfo, FusedBoundary, StreamStep } from './types.js';

export const PREFIX = -1;

export interface NodeOwnership {
  /** Layer of every node: PREFIX, 0..L-1, or L for the suffix. */
  nodeLayer: Map<Node, number>;
  /** Layer of every stream-dependent value (values absent here are prefix or constant). */
  valueLayer: Map<Value, number>;
}

/** Values downstream of the stream start: the only values a layer can compute. */
export function streamDependentValues(graph: Graph, seeds: readonly Value[]): Set<Value> {
  const dependent = new Set<Value>(seeds);
  const seedProducers = new Set(seeds.map((v) => v.producer));
  for (const n of graph.nodes) {
    if (seedProducers.has(n) || shapeOfInputSeed(n, seeds)) continue;
    if (n.inputs.some((v) => v !== null && dependent.has(v))) for (const o of n.outputs) dependent.add(o);
  }
  return dependent;
}

/**
 * `isConstant` tells weights and constants apart (they belong to no layer). A node that reads no
 * stream value but computes only from layer l's past KV (data, not its shape: a combined past cut
 * by Split/Squeeze before the layer reads it) belongs to layer l: it is part of how that layer
 * reads its cache, not a value shared by every layer.
 */
export function assignNodes(
  graph: Graph,
  embedding: EmbeddingInfo,
  seeds: readonly Value[],
  steps: readonly StreamStep[],
  isConstant: (v: Value) => boolean = () => false,
): NodeOwnership {
  const pastOf = new Map<Value, number>();
  for (const s of steps) if (s.attention) for (const t of [s.attention.kv.key, s.attention.kv.value]) pastOf.set(t.input, s.layer);
  const overrides = new Map<Value, number>(seeds.map((v) => [v, 0]));
  for (const exit of exitSteps(steps)) {
    const next = exit.layer + 1;
    // The stream value leaving the layer (after any Cast/Identity carrying the sum) is the next layer's.
    if (exit.carried) overrides.set(exit.carried, next);
    if (exit.kind !== 'Add') for (const o of exit.node.outputs) overrides.set(o, next);
  }
  const nodeLayer = new Map<Node, number>();
  const valueLayer = new Map<Value, number>();
  // A stream that starts at a graph input (inputs_embeds) starts in layer 0 too.
  for (const v of seeds) if (!v.producer) valueLayer.set(v, 0);
  const embedNode = embedding.boundary?.node;
  for (const n of graph.nodes) {
    let layer = PREFIX;
    if (n !== embedNode && !shapeOfInputSeed(n, seeds)) for (const v of n.inputs) if (v) layer = Math.max(layer, valueLayer.get(v) ?? PREFIX);
    if (layer === PREFIX && n !== embedNode) layer = pastReader(n, pastOf, isConstant) ?? PREFIX;
    nodeLayer.set(n, layer);
    for (const o of n.outputs) {
      const l = overrides.get(o) ?? layer;
      if (l !== PREFIX) valueLayer.set(o, l);
    }
  }
  return { nodeLayer, valueLayer };
}

/**
 * The layer whose past KV a prefix node computes from (through data: not Shape or Size), when
 * every other input is a constant or another such value of the same layer; undefined otherwise.
 * Records its outputs as that layer's past-derived values.
 */
function pastReader(n: Node, pastOf: Map<Value, number>, isConstant: (v: Value) => boolean): number | undefined {
  if (n.opType === 'Shape' || n.opType === 'Size' || n.subgraphs().length) return undefined;
  let owner: number | undefined;
  for (const v of n.inputs) {
    if (!v || isConstant(v)) continue;
    const l = pastOf.get(v);
    if (l === undefined || (owner !== undefined && owner !== l)) return undefined;
    owner = l;
  }
  if (owner !== undefined) for (const o of n.outputs) pastOf.set(o, owner);
  return owner;
}

/**
 * A Shape of a stream start that is a graph input (inputs_embeds): batch and sequence length,
 * shared by every layer like Shape(input_ids), so prefix rather than layer 0.
 */
function shapeOfInputSeed(n: Node, seeds: readonly Value[]): boolean {
  return (n.opType === 'Shape' || n.opType === 'Size') && n.inputs[0] !== null && !n.inputs[0]!.producer && seeds.includes(n.inputs[0]!);
}

/** The last step of each layer. */
export function exitSteps(steps: readonly StreamStep[]): StreamStep[] {
  return steps.filter((s, i) => steps[i + 1]?.layer !== s.layer);
}

/** The fused node performing a layer's last add, when the exit step is fused. */
export function exitBoundaryOf(exit: StreamStep): FusedBoundary | null {
  if (exit.kind === 'Add') return null;
  return { node: exit.node, op: exit.kind, sum: exit.sum, normed: exit.node.output(0), addsForLayer: exit.layer, normedForLayer: exit.layer + 1 };
}

/** Nodes of the attention core itself. */
export function coreNodes(core: AttentionCore): Node[] {
  return core.form === 'unfused' ? [core.scores, core.softmax, core.context] : [core.node];
}

/**
 * MLP nodes: branch nodes of the layer's steps that neither feed nor follow its attention core
 * (all of a step's branch when the step has no attention; the mlp half of a parallel branch).
 */
export function mlpNodesOf(steps: readonly StreamStep[], core: AttentionCore): Node[] {
  const out: Node[] = [];
  for (const s of steps) {
    if (!s.attention) {
      out.push(...s.branchNodes);
      continue;
    }
    const inBranch = new Set(s.branchNodes);
    const tied = new Set([...upstream(coreNodes(core), inBranch), ...downstream(coreNodes(core), inBranch)]);
    out.push(...s.branchNodes.filter((n) => !tied.has(n)));
  }
  return out;
}

function upstream(from: Node[], within: ReadonlySet<Node>): Set<Node> {
  const seen = new Set<Node>(from);
  const stack = [...from];
  while (stack.length) {
    for (const v of stack.pop()!.inputs) {
      const p = v?.producer;
      if (p && within.has(p) && !seen.has(p)) {
        seen.add(p);
        stack.push(p);
      }
    }
  }
  return seen;
}

function downstream(from: Node[], within: ReadonlySet<Node>): Set<Node> {
  const seen = new Set<Node>(from);
  const stack = [...from];
  while (stack.length) {
    for (const o of stack.pop()!.outputs) {
      for (const u of o.uses) {
        if (within.has(u.node) && !seen.has(u.node)) {
          seen.add(u.node);
          stack.push(u.node);
        }
      }
    }
  }
  return seen;
}
