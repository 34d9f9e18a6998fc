/** Assembling LayerInfo records from the residual steps and the node ownership map. */
import type { Graph, Node, Value } from '../core/ir/graph.js';
import { type AttentionContext, stateTensors } from './attention.js';
import { exitBoundaryOf, mlpNodesOf, type NodeOwnership } from './layers.js';
import type { SideInputClassifier } from './side-inputs.js';
import type { EmbeddingInfo, LayerInfo, SideInput, StreamStep } from './types.js';

export function buildLayers(
  graph: Graph,
  steps: readonly StreamStep[],
  ownership: NodeOwnership,
  embedding: EmbeddingInfo,
  classifier: SideInputClassifier,
  ctx: AttentionContext,
): LayerInfo[] {
  const count = steps.at(-1)!.layer + 1;
  const nodesByLayer = Array.from({ length: count }, () => [] as Node[]);
  for (const n of graph.nodes) {
    const l = ownership.nodeLayer.get(n)!;
    if (l >= 0 && l < count) nodesByLayer[l]!.push(n);
  }
  const layers: LayerInfo[] = [];
  for (let l = 0; l < count; l++) {
    const own = steps.filter((s) => s.layer === l);
    const first = own[0]!;
    const last = own.at(-1)!;
    const attention = first.attention!;
    const nodes = nodesByLayer[l]!;
    const state =
      attention.form === 'recurrent'
        ? [...new Set([attention.kv.key, attention.kv.value])]
        : stateTensors(nodes, new Set([attention.kv.key.input, attention.kv.value.input]), ctx);
    const stateInputs = new Set(state.map((t) => t.input));
    layers.push({
      index: l,
      residualIn: first.streamIn,
      residualOut: last.carried,
      exit: { node: last.node, streamOperandIndex: last.streamOperandIndex, branchOperandIndex: last.branchOperandIndex },
      steps: own,
      nodes,
      entryBoundary: l === 0 ? embedding.boundary : layers[l - 1]!.exitBoundary,
      exitBoundary: exitBoundaryOf(last),
      attention,
      mlpNodes: mlpNodesOf(own, attention),
      sideInputs: sideInputsOf(l, nodes, ownership, (v, readers) => classifier.classify(v, readers, attention.kv, stateInputs)),
      kv: attention.kv,
      state,
    });
  }
  return layers;
}

/** Values the layer's nodes read that the layer neither computes nor receives as its stream. */
function sideInputsOf(
  layer: number,
  nodes: readonly Node[],
  ownership: NodeOwnership,
  classify: (v: Value, readers: ReadonlySet<Node>) => SideInput,
): SideInput[] {
  const readers = new Set(nodes);
  const seen = new Set<Value>();
  const out: SideInput[] = [];
  for (const n of nodes) {
    for (const v of n.inputs) {
      if (!v || seen.has(v)) continue;
      seen.add(v);
      const from = ownership.valueLayer.get(v);
      if (from === layer) continue;
      out.push(from !== undefined ? { kind: 'other', value: v, reason: `computed in layer ${from}` } : classify(v, readers));
    }
  }
  return out;
}
