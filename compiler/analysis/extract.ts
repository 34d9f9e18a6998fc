/**
 * Cutting an analysed decoder into standalone ONNX models that chain by value name:
 *
 *   prefix:   graph inputs -> stream start + every shared value the layers read (mask, positions, cos/sin, seqlens)
 *   layer l:  residual in + side inputs + past KV -> residual out + present KV
 *   suffix:   last residual (+ shared values) -> logits
 *
 * Each unit keeps the original names of the values it reads and writes, so a runner holds one
 * name -> tensor map and runs the units in order. Constants a unit reads (initializers, Constant
 * nodes and what is computed from them alone) are copied into it; weights are shared Tensor
 * objects (external data is referenced, never read here).
 */
import { ModcError } from '../core/errors.js';
import { Graph, Node, Value } from '../core/ir/graph.js';
import { Model } from '../core/ir/model.js';
import type { TypeProto } from '../core/proto/index.js';
import { GraphFacts } from './graph-facts.js';
import type { DecoderStructure, KvCacheSpec, SideInput } from './types.js';

/** A standalone model with the names of what it reads and writes. */
export interface RunnableUnit {
  /** 'prefix', 'layer.<l>' or 'suffix'. */
  name: string;
  model: Model;
  inputs: string[];
  outputs: string[];
}

export interface LayerUnit extends RunnableUnit {
  index: number;
  residualIn: string;
  residualOut: string;
  kv: { key: { input: string; output: string }; value: { input: string; output: string }; layout: KvCacheSpec['layout'] };
  /** Every non-weight input besides the residual, classified (per-token ones carry their axes). */
  sideInputs: Exclude<SideInput, { kind: 'weight' }>[];
}

export interface ExtractedDecoder {
  prefix: RunnableUnit;
  layers: LayerUnit[];
  suffix: RunnableUnit;
  /** The original model's inputs and outputs (what a caller feeds and gets back). */
  graphInputs: string[];
  graphOutputs: string[];
}

/** Per-token side inputs of a layer unit: what must be gathered with the tokens a layer runs on. */
export function perTokenInputs(unit: LayerUnit): Extract<SideInput, { kind: 'per-token' }>[] {
  return unit.sideInputs.filter((s): s is Extract<SideInput, { kind: 'per-token' }> => s.kind === 'per-token');
}

export function extractDecoder(model: Model, structure: DecoderStructure): ExtractedDecoder {
  for (const l of structure.layers) {
    const fused = l.entryBoundary ?? l.exitBoundary;
    if (fused || !l.residualOut) {
      const node = fused?.node ?? l.exit.node;
      throw new ModcError(`layer ${l.index} cannot be extracted: its boundary is fused into ${node.describe()}; run split-fused-boundaries first`);
    }
  }
  const facts = new GraphFacts(model.graph);
  const groups = [structure.prefixNodes, ...structure.layers.map((l) => l.nodes), structure.suffixNodes];
  const names = ['prefix', ...structure.layers.map((l) => `layer.${l.index}`), 'suffix'];
  const wiring = wire(model.graph, groups, facts);
  const units = groups.map((nodes, i) => buildUnit(model, names[i]!, nodes, wiring.inputs[i]!, wiring.outputs[i]!, facts));
  const layers = structure.layers.map((l, i) => layerUnit(units[i + 1]!, l.index, l.residualIn, l.residualOut!, l.kv, l.sideInputs));
  return {
    prefix: units[0]!,
    layers,
    suffix: units.at(-1)!,
    graphInputs: model.graph.inputs.filter((v) => !v.isConstant).map((v) => v.name),
    graphOutputs: model.graph.outputs.map((v) => v.name),
  };
}

export function layerUnit(unit: RunnableUnit, index: number, residualIn: Value, residualOut: Value, kv: KvCacheSpec, sides: readonly SideInput[]): LayerUnit {
  const io = (t: { input: Value; output: Value }) => ({ input: t.input.name, output: t.output.name });
  const sideInputs = sides.filter((s): s is Exclude<SideInput, { kind: 'weight' }> => s.kind !== 'weight');
  const first = [residualIn.name, ...sideInputs.map((s) => s.value.name)];
  const inputs = [...first.filter((n) => unit.inputs.includes(n)), ...unit.inputs.filter((n) => !first.includes(n))];
  return {
    ...unit,
    inputs,
    index,
    residualIn: residualIn.name,
    residualOut: residualOut.name,
    kv: { key: io(kv.key), value: io(kv.value), layout: kv.layout },
    sideInputs,
  };
}

/**
 * Standalone units for any ordered grouping of the graph's nodes (every node that matters in one
 * group): what extractDecoder does for prefix / layers / suffix, for finer cuts (sub-layers).
 */
export function extractUnits(model: Model, groups: readonly { name: string; nodes: readonly Node[] }[]): RunnableUnit[] {
  const facts = new GraphFacts(model.graph);
  const wiring = wire(
    model.graph,
    groups.map((g) => [...g.nodes]),
    facts,
  );
  return groups.map((g, i) => buildUnit(model, g.name, g.nodes, wiring.inputs[i]!, wiring.outputs[i]!, facts));
}

/** Which non-constant values each unit reads from outside and must hand on. */
function wire(graph: Graph, groups: readonly Node[][], facts: GraphFacts): { inputs: Value[][]; outputs: Value[][] } {
  const unitOf = new Map<Node, number>();
  groups.forEach((nodes, i) => nodes.forEach((n) => unitOf.set(n, i)));
  const inputs = groups.map(() => [] as Value[]);
  const outputs = groups.map(() => [] as Value[]);
  const add = (list: Value[], v: Value) => (list.includes(v) ? undefined : list.push(v));
  groups.forEach((nodes, i) => {
    for (const n of nodes) {
      for (const v of n.inputs) {
        if (!v || facts.isConstant(v)) continue;
        const from = v.producer ? unitOf.get(v.producer) : undefined;
        if (from === i) continue;
        if (v.producer && from === undefined)
          throw new ModcError(`extraction: ${n.describe()} reads ${v}, computed by ${v.producer.describe()} which belongs to no unit`);
        add(inputs[i]!, v);
        if (from !== undefined) add(outputs[from]!, v);
      }
    }
  });
  for (const v of graph.outputs) {
    const from = v.producer ? unitOf.get(v.producer) : undefined;
    if (from === undefined) throw new ModcError(`extraction: graph output ${v} is not computed by any unit`);
    add(outputs[from]!, v);
  }
  return { inputs, outputs };
}

function buildUnit(source: Model, name: string, nodes: readonly Node[], inputs: readonly Value[], outputs: readonly Value[], facts: GraphFacts): RunnableUnit {
  const g = new Graph(name);
  const map = new Map<Value, Value>();
  for (const v of inputs) map.set(v, g.addInput(new Value(v.name, typeFor(v, facts, name))));
  const body = [...constantProducers(nodes, facts), ...nodes].sort((a, b) => facts.order.get(a)! - facts.order.get(b)!);
  for (const n of body) cloneInto(g, n, map);
  g.outputs = outputs.map((v) => {
    const out = map.get(v)!;
    out.type ??= typeFor(v, facts, name);
    return out;
  });
  const model = new Model(g, source.irVersion);
  model.opsetImports = [...source.opsetImports];
  model.functions = [...source.functions];
  model.producerName = 'modc';
  return { name, model, inputs: inputs.map((v) => v.name), outputs: outputs.map((v) => v.name) };
}

/** Nodes computing the constant (non-initializer) values `nodes` read, transitively. */
function constantProducers(nodes: readonly Node[], facts: GraphFacts): Node[] {
  const found = new Set<Node>();
  const stack = nodes.flatMap((n) => n.inputs.filter((v): v is Value => v !== null && facts.isConstant(v)));
  while (stack.length) {
    const p = stack.pop()!.producer;
    if (!p || found.has(p)) continue;
    found.add(p);
    stack.push(...p.inputs.filter((v): v is Value => v !== null));
  }
  return [...found];
}

/** Copies a node into `g`, mapping its inputs (initializers are shared on first use). */
function cloneInto(g: Graph, n: Node, map: Map<Value, Value>): void {
  if (n.subgraphs().length) throw new ModcError(`extraction: ${n.describe()} has subgraphs, which units cannot carry yet`);
  const ins = n.inputs.map((v) => {
    if (!v) return null;
    const mapped = map.get(v);
    if (mapped) return mapped;
    if (!v.initializer) throw new ModcError(`extraction: ${n.describe()} reads ${v}, which the unit neither receives nor computes`);
    const init = g.addInitializer(new Value(v.name, v.type), v.initializer);
    map.set(v, init);
    return init;
  });
  const outs = n.outputs.map((o) => {
    const c = new Value(o.name, o.type);
    map.set(o, c);
    return c;
  });
  const copy = new Node(n.opType, n.domain, n.name);
  copy.overload = n.overload;
  copy.setInputs(ins);
  copy.graph = g;
  copy.setOutputs(outs);
  for (const a of n.attributes.values()) copy.setAttr(a.proto);
  g.claimName(n.name);
  g.insert(copy);
}

/** The declared type, or one built from the inferred element type and rank. */
function typeFor(v: Value, facts: GraphFacts, unit: string): TypeProto {
  if (v.type?.tensor_type?.elem_type) return v.type;
  const elem = facts.dtype(v);
  if (elem === undefined) throw new ModcError(`extraction: cannot infer the element type of ${v}, which unit ${unit} exchanges`);
  const rank = facts.rank(v);
  return { tensor_type: { elem_type: elem, ...(rank !== undefined ? { shape: { dim: Array.from({ length: rank }, () => ({})) } } : {}) } };
}
