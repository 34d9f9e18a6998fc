/**
 * The sub-layer boundary of a layer (SPEC.md, "Sub-layer routing"): its attention part and its
 * MLP part, each a function from a stream value (`input`) to a residual update (`update`) that
 * one Add (`join`) adds to the stream.
 *
 *   sequential pre-norm:   h = x + a(x)            out = h + m(h)      attention: x -> a, mlp: h -> m
 *   parallel, two adds:    h = x + a(x)            out = h + m(x)      both read x
 *   parallel, one add:     out = x + (a(x) + m(x))                     join = the Add of the branches
 *
 * A part can be routed when it is closed: its nodes read its input, side inputs (weights, masks,
 * positions, past KV) and each other's outputs only, and nothing outside it reads what it computes
 * besides the join (its update) and the graph outputs (present KV). `blocker` says why not.
 */
import type { Node, Value } from '../core/ir/graph.js';
import { coreNodes } from './layers.js';
import type { LayerInfo, SideInput } from './types.js';

export type SubLayerPart = 'attention' | 'mlp';

export interface SubLayer {
  part: SubLayerPart;
  /** The stream value the part reads (its router's input): x, or h after the attention add. */
  input: Value;
  /** The part's residual update (a or m): the operand `join` adds. */
  update: Value;
  /** The Add adding `update`: a residual step, or the Add joining a parallel layer's two branches. */
  join: Node;
  /** Nodes computing `update` from `input` and side inputs, in graph order. */
  nodes: Node[];
  /** The layer's side inputs read by these nodes. */
  sideInputs: SideInput[];
  /** Why this part cannot be routed on its own; null when it can. */
  blocker: string | null;
}

export interface SubLayers {
  attention: SubLayer;
  mlp: SubLayer;
  /** Both parts read x (NeoX/GPT-J/Phi style). */
  parallel: boolean;
}

/** The two parts of a layer, or why the layer has no sub-layer boundary modc understands. */
export function subLayersOf(layer: LayerInfo, graphOutputs: ReadonlySet<Value>): SubLayers | { reason: string } {
  const { steps } = layer;
  const x = steps[0]!.streamIn;
  const inLayer = new Set(layer.nodes);
  const own = (nodes: readonly Node[]) => {
    const set = new Set(nodes);
    return layer.nodes.filter((n) => set.has(n));
  };
  let parts: Omit<SubLayer, 'sideInputs' | 'blocker'>[];
  let parallel: boolean;
  if (steps.length === 2 && steps[0]!.attention && !steps[1]!.attention) {
    const [a, m] = steps as [(typeof steps)[0], (typeof steps)[0]];
    const mlpInput = m.input;
    if (mlpInput !== x && mlpInput !== a.carried)
      return { reason: `its MLP step ${m.node.describe()} is computed from neither the layer input nor the stream after attention` };
    parallel = mlpInput === x;
    parts = [
      { part: 'attention', input: x, update: a.branch, join: a.node, nodes: own(withCacheNodes(layer, a.branchNodes)) },
      { part: 'mlp', input: mlpInput, update: m.branch, join: m.node, nodes: own(m.branchNodes) },
    ];
  } else if (steps.length === 1) {
    const joined = parallelJoin(layer);
    if ('reason' in joined) return joined;
    parallel = true;
    parts = [
      { part: 'attention', input: x, update: joined.attention, join: joined.join, nodes: own(withCacheNodes(layer, joined.attentionNodes)) },
      { part: 'mlp', input: x, update: joined.mlp, join: joined.join, nodes: own(layer.mlpNodes) },
    ];
  } else {
    return { reason: `it has ${steps.length} residual steps; sub-layer routing needs an attention step then an MLP step, or one parallel step` };
  }
  const streamValues = new Set<Value>(steps.flatMap((s) => [s.streamIn, ...(s.sum ? [s.sum] : []), ...s.carry.map((n) => n.output(0))]));
  const [attention, mlp] = parts.map((p) => ({
    ...p,
    sideInputs: layer.sideInputs.filter((si) => p.nodes.some((n) => n.inputs.includes(si.value))),
    blocker: closedness(p, inLayer, streamValues, graphOutputs),
  })) as [SubLayer, SubLayer];
  return { attention, mlp, parallel };
}

/**
 * The attention part's nodes with the layer's cache plumbing outside every branch: nodes reading
 * only the past (a combined past cut by Split/Squeeze) that feed the part, and nodes computing
 * the present from the part's values (keys and values stacked into a combined present).
 */
function withCacheNodes(layer: LayerInfo, attention: readonly Node[]): Node[] {
  const taken = new Set<Node>(layer.steps.flatMap((s) => [s.node, ...s.carry, ...s.branchNodes]));
  const rest = layer.nodes.filter((n) => !taken.has(n));
  if (rest.length === 0) return [...attention];
  const part = new Set(attention);
  const feeds = (n: Node) => n.outputs.some((o) => o.consumers().some((c) => part.has(c)));
  const reads = (n: Node) => n.inputs.some((v) => v?.producer && part.has(v.producer));
  for (let grown = true; grown;) {
    grown = false;
    for (const n of rest) {
      if (part.has(n) || !(feeds(n) || reads(n))) continue;
      part.add(n);
      grown = true;
    }
  }
  return layer.nodes.filter((n) => part.has(n));
}

/** Why a part is not a closed function of its input and side inputs (see the file comment). */
function closedness(
  p: Omit<SubLayer, 'sideInputs' | 'blocker'>,
  inLayer: ReadonlySet<Node>,
  streamValues: ReadonlySet<Value>,
  graphOutputs: ReadonlySet<Value>,
): string | null {
  const region = new Set(p.nodes);
  if (!p.update.producer || !region.has(p.update.producer)) return `its update ${p.update} is not computed inside it`;
  for (const n of p.nodes) {
    for (const v of n.inputs) {
      if (!v || v === p.input || (v.producer && region.has(v.producer))) continue;
      if (streamValues.has(v)) return `${n.describe()} reads the stream value ${v}, not the part's input ${p.input}`;
      if (v.producer && inLayer.has(v.producer)) return `${n.describe()} reads ${v}, which the layer computes outside the ${p.part}`;
    }
    for (const o of n.outputs) {
      if (o === p.update || graphOutputs.has(o)) continue;
      const outside = o.consumers().find((c) => !region.has(c));
      if (outside) return `${outside.describe()} outside the ${p.part} reads ${o}, which the ${p.part} computes`;
    }
  }
  return null;
}

/** A one-step parallel layer: the Add of the attention branch and the MLP branch. */
function parallelJoin(layer: LayerInfo): { join: Node; attention: Value; mlp: Value; attentionNodes: Node[] } | { reason: string } {
  const step = layer.steps[0]!;
  const mlpSet = new Set(layer.mlpNodes);
  const branch = new Set(step.branchNodes);
  const core = coreNodes(layer.attention);
  const fromCore = new Set<Node>(core);
  for (const n of step.branchNodes) if (n.inputs.some((v) => v?.producer && fromCore.has(v.producer))) fromCore.add(n);
  for (const n of step.branchNodes) {
    if (n.opType !== 'Add' || n.domain !== '' || n.inputs.length !== 2) continue;
    const [p, q] = n.inputs as [Value, Value];
    const side = (v: Value) => (v.producer && mlpSet.has(v.producer) ? 'mlp' : v.producer && fromCore.has(v.producer) ? 'attention' : null);
    const sides = [side(p), side(q)];
    if (!sides.includes('mlp') || !sides.includes('attention')) continue;
    const attention = sides[0] === 'attention' ? p : q;
    const mlp = sides[0] === 'mlp' ? p : q;
    // The attention part: the branch nodes not in the MLP, up to (not including) the join.
    const after = new Set<Node>([n]);
    for (const m of step.branchNodes) if (m.inputs.some((v) => v?.producer && after.has(v.producer))) after.add(m);
    const attentionNodes = step.branchNodes.filter((m) => branch.has(m) && !mlpSet.has(m) && !after.has(m));
    return { join: n, attention, mlp, attentionNodes };
  }
  return { reason: `its one residual step ${step.node.describe()} has no Add joining an attention branch and an MLP branch` };
}
