/**
 * One routed layer or sub-layer part (route-layers, docs/routing.md "How a layer is routed"): the
 * region runs on its selected tokens inside one If, one level below the main graph, for a
 * prefill and a decode step alike:
 *
 *   indices, valid, slots, any = CompactTokens(selected, ...)            main graph
 *   out, present.., ..  = If(any) {
 *                           x_sel = GatherND(x, slots)                   the region reads x_sel
 *                           per-token side inputs gathered (or recomputed from the gathered
 *                           ids and positions); masks and lengths rebuilt from the layer's keys
 *                           the region's own nodes, unchanged (its cache appends where they were)
 *                           out = ScatterTokens[Gated](x, slots, valid, x_sel, y)
 *                         } else { x, the past caches }                 (Identity each)
 *
 * Every weight the region reads is then one If level below the graph that owns it, where ONNX
 * Runtime prepacks it, and the presents are made by the region's own nodes straight into the
 * If's outputs. The cache contract (what the If carries besides out) is layer-cache.ts's.
 * A part scatters its update u into zeros instead, so the residual add it feeds adds nothing for
 * unselected tokens. Where it can, one-token-path.ts then moves CompactTokens into the If, behind
 * small Ifs that skip the compaction, the gathers and the scatter in a batch-1 call of one token
 * (the If's condition becomes any selected token, reduced from the selection).
 */
import type { DecoderStructure, SideInput } from '../analysis/types.js';
import { ModcError } from '../core/errors.js';
import { DataType } from '../core/ir/dtype.js';
import { Graph, graphAttribute, type Node, type Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { recomputeWith, replaceUsesWithin } from '../core/ir/rewrite.js';
import { Tensor } from '../core/ir/tensor.js';
import type { CacheContext, Carried, StepForm } from './cache-contract.js';
import { layerCache } from './layer-cache.js';
import { elementType, type LayerRouting, passOutput, streamElementType } from './mod-common.js';
import { Emitter } from './modc-ops/emitter.js';
import { callModcOp, defaultOpset } from './modc-ops/index.js';
import { splitOneToken, type StepContext } from './one-token-path.js';
import { fromTokenInputsOnly, type RoutedRegion, tokenMajor } from './routed-region.js';

export interface RouteOptions {
  gated: boolean;
}

/** The layer being routed, and the gathers made for it so far. */
interface Layer {
  model: Model;
  s: DecoderStructure;
  r: RoutedRegion;
  routing: LayerRouting;
  opts: RouteOptions;
  /** The value now carrying the region's input: the original, or the scatter of the routed layer before. */
  x: Value;
  e: Emitter;
  tag: string;
  gathered: Map<Value, Value>;
  /** The selected positions shaped [B, 1, ..., K, 1] for a gather at batch_dims = the key (gatherBehindUnitAxes). */
  unitAxisIndices: Map<number, Value>;
  /** Each selected slot's (row, position) pair [B,K,2]. */
  slots: Value;
  /** Every node's position in the graph before any layer was routed. */
  original: ReadonlyMap<Node, number>;
  /** Each value made for the selected tokens -> the value it stands for when every token is selected (a gather -> what it gathers). */
  stepSubs: Map<Value, Value>;
  /** Values the one-token path computes more cheaply (layer-cache.ts). */
  stepForms: Map<Value, StepForm>;
}

/** Rewrites the region as the file comment says; returns the value that now carries its output. */
export function routeRegion(
  model: Model,
  s: DecoderStructure,
  r: RoutedRegion,
  routing: LayerRouting,
  opts: RouteOptions,
  x: Value,
  original: ReadonlyMap<Node, number>,
): Value {
  const tag = r.part === 'block' ? `layer${r.layer.index}` : `layer${r.layer.index}/${r.part}`;
  const { slots, any } = routing;
  if (!slots || !any) throw new ModcError(`layer ${r.layer.index} was routed with Compact, not CompactTokens: compile it from the original model`);
  const e = new Emitter(model.graph, defaultOpset(model), `modc/${tag}/`);
  const L: Layer = {
    model,
    s,
    r,
    routing,
    opts,
    x,
    e,
    tag,
    gathered: new Map(),
    unitAxisIndices: new Map(),
    slots,
    original,
    stepSubs: new Map(),
    stepForms: new Map(),
  };
  const g = model.graph;
  // Main graph (besides the routing): the cache's inputs and length outputs, the skipped update.
  const recompute = r.sideInputs.filter((si) => si.kind === 'attention-mask' || si.kind === 'sequence-length').map((si) => si.value);
  const cache = r.compactsKv ? layerCache(cacheContext(L, recompute)) : null;
  const passed = r.output.kind === 'update' ? zerosLike(L, x) : x;
  const existing = new Set(g.nodes);
  // Inside the If: the region on the selected tokens.
  const xSel = gatherInputs(L);
  gatherSideInputs(L);
  const carried = cache ? cache.rewire() : [];
  readShapeOffSlots(L);
  const scatter = scatterOutput(L, xSel, passed);
  const y = r.output.value;
  const added = g.nodes.filter((n) => !existing.has(n));
  const inside = new Set([...r.nodes, ...added]);
  for (const use of [...y.uses]) if (!inside.has(use.node)) use.node.setInput(use.index, scatter);
  if (g.outputs.includes(y)) g.outputs = g.outputs.map((v) => (v === y ? scatter : v));
  for (const n of dropUnread(g, added, new Set(carried.flat()))) inside.delete(n);
  const split = cache?.oneToken === false || L.opts.gated ? null : splitOneToken(stepContext(L, inside, scatter));
  return skipWhenNothingSelected(L, inside, split?.cond ?? any, [[split?.out ?? scatter, passed], ...carried]);
}

function stepContext(L: Layer, inside: Set<Node>, scatter: Value): StepContext {
  return {
    graph: L.model.graph,
    e: L.e,
    tag: L.tag,
    routing: L.routing,
    inside,
    region: L.r.nodes,
    scatter,
    subs: L.stepSubs,
    forms: L.stepForms,
  };
}

/** Removes the added nodes nothing reads (a substitute no rebuilt mask needed); returns them. */
function dropUnread(g: Graph, added: Node[], kept: ReadonlySet<Value>): Node[] {
  const dropped: Node[] = [];
  for (const n of [...added].reverse()) {
    if (n.outputs.some((v) => v.uses.size > 0 || kept.has(v) || g.outputs.includes(v))) continue;
    g.removeNode(n, true);
    dropped.push(n);
  }
  return dropped;
}

function call(L: Layer, op: string, inputs: Value[]): Value[] {
  return callModcOp(L.model, op, inputs, { dtype: streamElementType(L.s), name: `modc/${L.tag}` });
}

function suffix(L: Layer): string {
  const l = L.r.layer.index;
  return L.r.part === 'block' ? `l${l}` : `l${l}${L.r.part === 'attention' ? 'a' : 'm'}`;
}

function cacheContext(L: Layer, recompute: Value[]): CacheContext {
  return {
    model: L.model,
    layer: L.r.layer,
    e: L.e,
    region: L.r.nodes,
    routing: L.routing,
    call: (op, inputs) => call(L, op, inputs),
    recompute,
    substitutes: () => substitutes(L),
    tokens: L.x,
    suffix: suffix(L),
    stepForms: L.stepForms,
    stepSubs: L.stepSubs,
  };
}

/** A zero update shaped like x (the skipped part's update; built outside the If). */
function zerosLike(L: Layer, x: Value): Value {
  return L.e.op('ConstantOfShape', [L.e.op('Shape', [x])], { value: zerosTensor(L) });
}

/**
 * `v` at the selected tokens, once per value and layer: a [B, S] value (token ids, positions,
 * the gate) with one GatherElements on axis 1; a [B, S, ...] value with one GatherND on the
 * slots' (row, position) pairs.
 */
function gather(L: Layer, v: Value): Value {
  let out = L.gathered.get(v);
  if (out) return out;
  const { e, routing } = L;
  out = v.shape?.length === 2 ? e.op('GatherElements', [v, routing.indices], { axis: 1 }) : e.op('GatherND', [v, L.slots]);
  L.gathered.set(v, out);
  L.stepSubs.set(out, v);
  return out;
}

/** The region reads its stream input (and a fused entry boundary's normed copy) at the selected tokens. */
function gatherInputs(L: Layer): Value {
  const { r } = L;
  const xSel = gather(L, L.x);
  const boundary = r.layer.entryBoundary;
  if (r.part === 'block' && boundary) replaceUsesWithin(r.nodes, boundary.normed, gather(L, boundary.normed));
  replaceUsesWithin(r.nodes, L.x, xSel);
  return xSel;
}

/**
 * Per-token side inputs at the selected tokens: gathered when laid out [batch, sequence, ...] or
 * unsqueezed from such a value (rotary cos/sin [B, 1, S, d]: gathered in place behind the unit
 * axes, or before opset 12 the [B, S, d] tables gathered and unsqueezed again); otherwise
 * recomputed from the gathered ids and positions. Either way the tokens keep their original
 * positions.
 */
function gatherSideInputs(L: Layer): void {
  const { model, r } = L;
  const g = model.graph;
  const recompute: Value[] = [];
  for (const si of r.sideInputs) {
    if (si.kind !== 'per-token') continue;
    const unsqueezed = tokenMajor(si) ? null : unsqueezedTokenMajor(si);
    if (unsqueezed && L.e.opset >= 12 && unsqueezed.axes.every((a) => a < si.sequenceAxis!))
      replaceUsesWithin(r.nodes, si.value, gatherBehindUnitAxes(L, si.value, si.sequenceAxis!));
    else if (unsqueezed) {
      const again = L.e.op('Unsqueeze', [gather(L, unsqueezed.input), ...unsqueezed.rest], unsqueezed.attrs);
      L.stepSubs.set(again, si.value);
      replaceUsesWithin(r.nodes, si.value, again);
    } else if (tokenMajor(si) || !fromTokenInputsOnly(model, si.value)) replaceUsesWithin(r.nodes, si.value, gather(L, si.value));
    else recompute.push(si.value);
  }
  if (!recompute.length) return;
  const tokens = new Map(g.inputs.filter((v) => v.name === 'position_ids' || v.name === 'input_ids').map((v) => [v, gather(L, v)]));
  const recomputed = recomputeWith(g, recompute, tokens, `_${suffix(L)}`);
  for (const v of recompute) {
    L.stepSubs.set(recomputed.get(v)!, v);
    replaceUsesWithin(r.nodes, v, recomputed.get(v)!);
  }
}

/**
 * `v` [B, 1, ..., 1, S, ...] (S at `axis`) at the selected tokens, read in place: one GatherND
 * with batch_dims = axis on the indices [B, 1, ..., K, 1], which every such value of the layer
 * shares (rotary cos and sin [B, 1, S, d]: two gathers and one Unsqueeze).
 */
function gatherBehindUnitAxes(L: Layer, v: Value, axis: number): Value {
  let out = L.gathered.get(v);
  if (out) return out;
  let idx = L.unitAxisIndices.get(axis);
  if (!idx) {
    idx = L.e.unsqueeze(L.routing.indices, [...Array.from({ length: axis - 1 }, (_, i) => i + 1), axis + 1]);
    L.unitAxisIndices.set(axis, idx);
  }
  out = L.e.op('GatherND', [v, idx], { batch_dims: axis });
  L.gathered.set(v, out);
  L.stepSubs.set(out, v);
  return out;
}

/**
 * A per-token value [B, ..., S at axis s, ...] made by an Unsqueeze of a [B, S, ...] value: that
 * value, the axes inserted, and the Unsqueeze's other inputs and attributes to apply again.
 */
function unsqueezedTokenMajor(si: SideInput): { input: Value; axes: number[]; rest: (Value | null)[]; attrs: Record<string, number[]> } | null {
  if (si.kind !== 'per-token' || si.batchAxis !== 0 || si.sequenceAxis === null) return null;
  const n = si.value.producer;
  if (!n || n.opType !== 'Unsqueeze' || n.domain !== '') return null;
  const axes = n.input(1)?.initializer?.toNumbers() ?? constantInts(n.input(1)) ?? n.attrInts('axes');
  if (!axes || axes.some((a) => a <= 0)) return null;
  // The sequence axis must land on 1 once the inserted axes are taken out.
  if (si.sequenceAxis - axes.filter((a) => a < si.sequenceAxis!).length !== 1) return null;
  return { input: n.input(0)!, axes, rest: n.inputs.slice(1), attrs: n.input(1) ? {} : { axes } };
}

/** The ints of a Constant node's value, or null. */
function constantInts(v: Value | null): number[] | null {
  const t = v?.producer?.opType === 'Constant' ? v.producer.attr('value')?.t : undefined;
  return t ? new Tensor(t).toNumbers() : null;
}

/** What the shared mask and length builders read, in this layer's terms (the attention mask is the cache contract's). */
function substitutes(L: Layer): Map<Value, Value> {
  const g = L.model.graph;
  const sub = new Map<Value, Value>();
  for (const name of ['input_ids', 'position_ids']) {
    const v = g.inputs.find((i) => i.name === name);
    if (v) sub.set(v, gather(L, v));
  }
  const xSel = gather(L, L.x);
  for (const stream of [L.s.embedding.output, ...L.s.steps.flatMap((st) => [st.sum, st.carried])]) if (stream) sub.set(stream, xSel);
  // Lengths read off another layer's cache mean "the past length": use this layer's own.
  const own = L.r.layer.kv;
  for (const other of L.s.layers) {
    if (other === L.r.layer) continue;
    sub.set(other.kv.key.input, own.key.input);
    sub.set(other.kv.value.input, own.value.input);
  }
  return sub;
}

/**
 * A rebuilt mask that reads the gathered token ids only for their shape ([B, K]) reads it off
 * the slots' validity instead, which has that shape: one gather fewer per layer and call (and a
 * one-token call, which passes the selection on as the validity, reads no indices).
 */
function readShapeOffSlots(L: Layer): void {
  const ids = L.model.graph.inputs.find((v) => v.name === 'input_ids');
  const gathered = ids && L.gathered.get(ids);
  if (!gathered || ![...gathered.uses].every((u) => u.node.opType === 'Shape' && u.node.domain === '')) return;
  for (const use of [...gathered.uses]) use.node.setInput(use.index, L.routing.valid);
}

/** out = ScatterTokens[Gated](base, slots, valid, base at the tokens, y): x for a block, zeros for a part. */
function scatterOutput(L: Layer, xSel: Value, base: Value): Value {
  const { routing, e } = L;
  const y = L.r.output.value;
  const baseSel = L.r.output.kind === 'stream' ? xSel : e.op('ConstantOfShape', [e.op('Shape', [y])], { value: zerosTensor(L) });
  const inputs = [base, L.slots, routing.valid, baseSel, y];
  if (!L.opts.gated) return call(L, 'ScatterTokens', inputs)[0]!;
  return call(L, 'ScatterTokensGated', [...inputs, gather(L, e.op('Sigmoid', [routing.score]))])[0]!;
}

function zerosTensor(L: Layer): Tensor {
  const dtype = streamElementType(L.s);
  return dtype === DataType.FLOAT16 || dtype === DataType.BFLOAT16
    ? Tensor.fromArray('', [1], Uint16Array.of(0), dtype)
    : Tensor.fromArray('', [1], Float32Array.of(0));
}

/**
 * Moves `nodes` into `If(any)`: when no row selects a token (a batch-1 decode step the router
 * skips) none of them runs, and each carried value is passed on (an Identity per value: the
 * one copy a skipped layer makes, as the original's append would). Graph outputs keep their
 * names: the If output takes them over. Returns what now carries the first carried value.
 */
function skipWhenNothingSelected(L: Layer, nodes: ReadonlySet<Node>, any: Value, carried: Carried[]): Value {
  const g = L.model.graph;
  g.toposort();
  const run = new Graph(`modc/${L.tag}/if_selected_then`, g);
  const skip = new Graph(`modc/${L.tag}/if_selected_else`, g);
  g.moveNodesTo(nodes, run);
  keepOriginalOrder(run, L.original);
  run.outputs = carried.map(([computed]) => computed);
  skip.outputs = carried.map(([, passed]) => skip.addNode('Identity', [passed], [skip.newValue(`${passed.name}_skipped`, elementType(passed))]).output(0));
  const outs = carried.map(([computed, passed]) => g.newValue(`${computed.name}_if`, elementType(computed) ?? elementType(passed)));
  const node = g.addNode('If', [any], outs, { name: `modc/${L.tag}/if_selected` });
  node.setAttr(graphAttribute('then_branch'), run);
  node.setAttr(graphAttribute('else_branch'), skip);
  carried.forEach(([computed], i) => takeOver(g, run, computed, outs[i]!));
  return outs[0]!;
}

/**
 * Orders the then-branch as the original ordered the region's nodes, each added node (gathers,
 * rebuilt masks) just before the first region node that reads it, and the rest (the scatter)
 * last. ONNX Runtime runs a graph in about this order, so the cache appends keep their place
 * beside the attention that reads them (a plain stable sort would put every node that does not
 * wait for a rebuilt mask, the value projection and its append among them, first).
 */
function keepOriginalOrder(run: Graph, original: ReadonlyMap<Node, number>): void {
  const nodes = run.nodes;
  const key = new Map<Node, number>();
  // A read inside a node's branches (the one-token Ifs) is that node's read.
  const holder = new Map<Node, Node>();
  for (const n of nodes) for (const sub of n.subgraphs()) for (const inner of sub.allNodes()) holder.set(inner, n);
  for (const n of [...nodes].reverse()) {
    const own = original.get(n);
    const readers = n.outputs.flatMap((v) => [...v.uses].map((u) => key.get(holder.get(u.node) ?? u.node) ?? Infinity));
    key.set(n, own ?? Math.min(Infinity, ...readers));
  }
  // At equal keys the added nodes go first (before their reader), each group in its current order.
  const rank = (n: Node) => (original.has(n) ? 1 : 0);
  const index = new Map(nodes.map((n, i) => [n, i]));
  run.setNodes([...nodes].sort((a, b) => key.get(a)! - key.get(b)! || rank(a) - rank(b) || index.get(a)! - index.get(b)!));
  run.toposort();
}

/** Uses of `computed` outside the branch read the If output instead; a graph output passes its name and type on. */
function takeOver(g: Graph, run: Graph, computed: Value, out: Value): void {
  const within = (sub: Graph | null): boolean => sub !== null && (sub === run || within(sub.parent));
  for (const use of [...computed.uses]) if (!within(use.node.graph)) use.node.setInput(use.index, out);
  if (g.outputs.includes(computed)) passOutput(g, computed, out, '_run');
}
