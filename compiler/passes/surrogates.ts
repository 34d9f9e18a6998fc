/**
 * surrogates: the MLP parts of the routing plan that have a linear surrogate (SPEC.md, "MLP
 * routed with a surrogate"). A token the MLP does not run gets s(u) = (u . A) . B + c instead of
 * no update, u being the MLP's normalised input (compiler/analysis/mlp-input.ts).
 *
 * A routed MLP part with a surrogate (runs after insert-routers, before route-layers):
 *
 *   u_all            = the MLP's norm, cloned onto the full stream h        [B, S, H], main graph
 *   rest             = Not(selected) And token_mask                          the tokens the MLP skips
 *   slots, valid     = modc.CompactTokens(rest, grid)                       grid: the router's TokenGrid
 *   s                = (GatherND(u_all, slots) . A) . B + c                  on the skipped tokens only
 *   s_full           = modc.ScatterTokens(0, slots, valid, 0, s)             s(u) where skipped, else 0
 *   the join's update m  ->  m + s_full
 *
 * route-layers then replaces m by the scatter of the MLP's update (zero where not selected), so
 * the layer adds g * m at selected tokens and s(u) at the others: the same as scattering the
 * selected tokens' updates into s_full, with no change to how the region is routed. With every
 * token selected, `rest` is empty and s_full is 0: the all-pass model is the original.
 *
 * An MLP part replaced by its surrogate (capacity 0, no router): the join reads s(u) computed
 * from the MLP's own norm output, on every token; the rest of the MLP is dead and cleanup drops it.
 *
 * Each surrogate's tensors are initializers `modc.router.{l}.mlp.surrogate.a|b|bias` in the
 * MLP's element type; the `modc.routing` metadata records rank, MACs per token and the values
 * holding u and the surrogate's update (`surrogate` on the routed part, `replaced` for the others).
 */
import { mlpInputOf } from '../analysis/mlp-input.js';
import { subLayersOf } from '../analysis/sub-layers.js';
import type { DecoderStructure, LayerInfo } from '../analysis/types.js';
import { ModcError } from '../core/errors.js';
import { DataType } from '../core/ir/dtype.js';
import { type Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { recomputeWith } from '../core/ir/rewrite.js';
import { Tensor } from '../core/ir/tensor.js';
import { floatToHalf } from '../core/ir/dtype.js';
import { GraphFacts } from '../analysis/graph-facts.js';
import { readRoutingMetadata, type ReplacedMetadata, type SurrogateMetadata, writeRoutingMetadata } from '../metadata/routing-metadata.js';
import { routerTensorPrefix, type Surrogate, surrogateMacs } from '../routing/router-weights.js';
import type { RoutingPlan } from '../routing/routing-plan.js';
import { routingOf, streamElementType } from './mod-common.js';
import { Emitter } from './modc-ops/emitter.js';
import { callModcOp, defaultOpset } from './modc-ops/index.js';
import type { Pass } from './pass-manager.js';
import { routeBlocker } from './route-layers.js';

/** Whether the plan has any surrogate (a routed MLP part with one, or a replaced part). */
export function planHasSurrogates(plan: RoutingPlan): boolean {
  return (plan.replaced?.length ?? 0) > 0 || plan.layers.some((l) => l.router.surrogate);
}

/** The layers whose MLP the plan replaces (no router): split-fused-boundaries must open them. */
export function replacedLayers(plan: RoutingPlan): number[] {
  return (plan.replaced ?? []).map((r) => r.layer);
}

interface MlpSite {
  layer: LayerInfo;
  /** The stream value the MLP reads (h, or x in a parallel layer). */
  input: Value;
  /** The MLP's update m and the Add that adds it. */
  update: Value;
  join: import('../core/ir/graph.js').Node;
  u: { value: Value; nodes: import('../core/ir/graph.js').Node[] };
}

function mlpSite(model: Model, s: DecoderStructure, layer: number): MlpSite | { reason: string } {
  const info = s.layers[layer];
  if (!info) return { reason: `the model has ${s.layers.length} layers` };
  const parts = subLayersOf(info, new Set(model.graph.outputs));
  if ('reason' in parts) return { reason: `no sub-layer boundary: ${parts.reason}` };
  const sub = parts.mlp;
  if (sub.join.opType !== 'Add' || sub.join.domain !== '')
    return { reason: `its MLP update is added by ${sub.join.describe()}, not a plain Add (run split-fused-boundaries with within=${layer} first)` };
  const u = mlpInputOf(sub);
  if ('reason' in u) return u;
  return { layer: info, input: sub.input, update: sub.update, join: sub.join, u };
}

/** The surrogate's tensors as initializers of element type `elem` (float, float16). */
function surrogateWeights(model: Model, layer: number, sur: Surrogate, H: number, elem: number): [Value, Value, Value] {
  const g = model.graph;
  const prefix = `modc.${routerTensorPrefix(layer, 'mlp')}.surrogate`;
  const tensor = (name: string, dims: number[], data: Float32Array) =>
    elem === DataType.FLOAT16 ? Tensor.fromArray(name, dims, Uint16Array.from(data, floatToHalf), DataType.FLOAT16) : Tensor.fromArray(name, dims, data);
  return [
    g.addInitializer(g.newValue(`${prefix}.a`), tensor(`${prefix}.a`, [H, sur.rank], sur.a)),
    g.addInitializer(g.newValue(`${prefix}.b`), tensor(`${prefix}.b`, [sur.rank, H], sur.b)),
    g.addInitializer(g.newValue(`${prefix}.bias`), tensor(`${prefix}.bias`, [H], sur.bias)),
  ];
}

/** s = (u . A) . B + c, cast to the stream's element type when u's differs. */
function applySurrogate(e: Emitter, u: Value, [a, b, c]: [Value, Value, Value], uElem: number, streamElem: number): Value {
  const s = e.op('Add', [e.op('MatMul', [e.op('MatMul', [u, a]), b]), c]);
  return uElem === streamElem ? s : e.cast(s, streamElem);
}

function surrogateElem(model: Model, s: DecoderStructure, u: Value): number {
  const elem = u.dtype ?? new GraphFacts(model.graph).dtype(u);
  if (elem === DataType.FLOAT || elem === DataType.FLOAT16) return elem;
  if (elem === undefined) return streamElementType(s) === DataType.FLOAT16 ? DataType.FLOAT16 : DataType.FLOAT;
  throw new ModcError(`the MLP's normalised input ${u} has element type ${elem}; a surrogate reads float or float16`);
}

export function insertSurrogates(model: Model, plan: RoutingPlan, s: DecoderStructure): string[] {
  const g = model.graph;
  const notes: string[] = [];
  const streamElem = streamElementType(s);
  const H = s.hiddenSize;
  const meta = readRoutingMetadata(model) ?? { mode: plan.mode, gated: plan.gated, layers: [] };
  const opset = defaultOpset(model);
  const check = (sur: Surrogate, layer: number) => {
    if (sur.a.length !== H * sur.rank || sur.b.length !== sur.rank * H || sur.bias.length !== H)
      throw new ModcError(`the surrogate of layer ${layer} (mlp) does not fit the hidden size ${H} at rank ${sur.rank}`);
  };

  // Replaced parts: s(u) on every token from the MLP's own norm.
  const replaced: ReplacedMetadata[] = [];
  for (const r of plan.replaced ?? []) {
    const clash = plan.layers.find((l) => l.layer === r.layer && (l.part === 'mlp' || l.part === 'block'));
    if (clash)
      throw new ModcError(`the routing plan replaces layer ${r.layer}'s MLP by its surrogate and also routes its ${clash.part}; give one or the other`);
    check(r.surrogate, r.layer);
    const site = mlpSite(model, s, r.layer);
    if ('reason' in site) throw new ModcError(`layer ${r.layer} (mlp) cannot be replaced by its surrogate: ${site.reason}`);
    const elem = surrogateElem(model, s, site.u.value);
    const e = new Emitter(g, opset, `modc/layer${r.layer}/mlp/surrogate/`);
    const out = applySurrogate(e, site.u.value, surrogateWeights(model, r.layer, r.surrogate, H, elem), elem, streamElem);
    out.name = g.uniqueName(`modc.surrogate.${r.layer}.mlp.output`);
    site.join.inputs.forEach((v, i) => v === site.update && site.join.setInput(i, out));
    const sm: SurrogateMetadata = { rank: r.surrogate.rank, macs: surrogateMacs(r.surrogate, H), input: site.u.value.name, output: out.name };
    replaced.push({ layer: r.layer, part: 'mlp', surrogate: sm });
    notes.push(`layer ${r.layer} (mlp): replaced by its rank-${r.surrogate.rank} surrogate on every token`);
  }

  // Routed parts with a surrogate: s(u) on the tokens the MLP skips.
  for (const lp of plan.layers) {
    const sur = lp.router.surrogate;
    if (!sur) continue;
    if (lp.part !== 'mlp') throw new ModcError(`layer ${lp.layer} (${lp.part}): only an MLP part has a surrogate`);
    check(sur, lp.layer);
    const entry = meta.layers.find((l) => l.layer === lp.layer && l.part === 'mlp');
    const selected = entry?.selected ? g.findValue(entry.selected) : undefined;
    const routing = selected ? routingOf(selected) : null;
    if (!entry || !selected || !routing?.grid) throw new ModcError(`surrogates: layer ${lp.layer} (mlp) has no router (run insert-routers first)`);
    // A part route-layers leaves dense keeps no surrogate either: route-layers reports why.
    if (routeBlocker(model, s.layers[lp.layer]!, 'mlp', s)) continue;
    const site = mlpSite(model, s, lp.layer);
    if ('reason' in site) throw new ModcError(`layer ${lp.layer} (mlp) cannot take a surrogate: ${site.reason}`);
    const elem = surrogateElem(model, s, site.u.value);
    const e = new Emitter(g, opset, `modc/layer${lp.layer}/mlp/surrogate/`);
    const opts = { dtype: streamElem, name: `modc/layer${lp.layer}/mlp/surrogate` };
    g.toposort();
    const uAll = site.u.nodes.length ? recomputeWith(g, [site.u.value], new Map([[site.input, site.input]]), '_surrogate').get(site.u.value)! : site.input;
    if (uAll !== site.input) uAll.name = g.uniqueName(`modc.surrogate.${lp.layer}.mlp.input`);
    const tokenMask = routing.nodes[1]!.input(1)!;
    const rest = e.op('And', [e.op('Not', [selected]), tokenMask.dtype === DataType.BOOL ? tokenMask : e.cast(tokenMask, DataType.BOOL)]);
    const [, valid, , slots] = callModcOp(model, 'CompactTokens', [rest, ...routing.grid], opts);
    const uRest = e.op('GatherND', [uAll, slots!]);
    const sRest = applySurrogate(e, uRest, surrogateWeights(model, lp.layer, sur, H, elem), elem, streamElem);
    const zero = Tensor.fromArray(
      '',
      [1],
      streamElem === DataType.FLOAT16 ? Uint16Array.of(0) : Float32Array.of(0),
      streamElem === DataType.FLOAT16 ? DataType.FLOAT16 : DataType.FLOAT,
    );
    const zeros = e.op('ConstantOfShape', [e.op('Shape', [site.input])], { value: zero });
    const zerosRest = e.op('ConstantOfShape', [e.op('Shape', [sRest])], { value: zero });
    const [full] = callModcOp(model, 'ScatterTokens', [zeros, slots!, valid!, zerosRest, sRest], opts);
    full!.name = g.uniqueName(`modc.surrogate.${lp.layer}.mlp.output`);
    const update = e.op('Add', [site.update, full!]);
    site.join.inputs.forEach((v, i) => v === site.update && site.join.setInput(i, update));
    entry.surrogate = { rank: sur.rank, macs: surrogateMacs(sur, H), input: uAll.name, output: full!.name };
    notes.push(`layer ${lp.layer} (mlp): rank-${sur.rank} surrogate on the tokens its router skips`);
  }
  g.toposort();
  writeRoutingMetadata(model, { ...meta, ...(replaced.length ? { replaced } : {}) });
  return notes;
}

export function surrogatesPass(plan: RoutingPlan): Pass {
  return {
    name: 'surrogates',
    description: 'give each MLP part with a surrogate its s(u) on the tokens it skips (or on every token when it has no router)',
    // The layers, boundaries and regions route-layers reads stay as analysed: only the MLP's
    // update gains an added term (a replaced MLP's nodes become dead and are left in place).
    preserves: ['structure'],
    run(model, _options, ctx) {
      return { changed: planHasSurrogates(plan), notes: insertSurrogates(model, plan, ctx.structure()) };
    },
  };
}
