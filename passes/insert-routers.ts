/**
 * insert-routers: for each layer of the routing plan, a router on the residual stream entering
 * it and the token selection:
 *
 *   score = modc.Router(x, w, b)
 *   selected = modc.SelectThreshold(score, token_mask, p)          (threshold-p)
 *            | modc.SelectTopK(score, token_mask, c, past_length)  (top-k)
 *   indices, valid, count = modc.Compact(selected)
 *
 * token_mask is this call's columns of attention_mask. route-layers finds these nodes from the
 * layer's residual input by dataflow.
 */
import { ModcError } from '../compiler/errors.js';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import type { Value } from '../compiler/ir/graph.js';
import type { Model } from '../compiler/ir/model.js';
import { Tensor } from '../compiler/ir/tensor.js';
import type { Pass } from '../compiler/pass-manager.js';
import type { RoutingPlan } from '../compiler/routing-plan.js';
import { Emitter } from '../runtime-ops/emit.js';
import { callModcOp, defaultOpset } from '../runtime-ops/index.js';
import { writeRoutingMetadata } from '../compiler/routing-metadata.js';
import { streamElementType } from './mod-common.js';

/** This call's token mask [B,S] and past length (T - S), built once for all routers. */
function tokenInputs(model: Model): { tokenMask: Value; pastLength: Value } {
  const g = model.graph;
  const e = new Emitter(g, defaultOpset(model), 'modc/');
  // The tokens of this call: input_ids [B, S], or inputs_embeds [B, S, H] for an embeddings-fed decoder.
  const ids = g.inputs.find((v) => v.name === 'input_ids') ?? g.inputs.find((v) => v.name === 'inputs_embeds');
  if (!ids) throw new ModcError("routing needs the 'input_ids' (or 'inputs_embeds') input");
  const mask = g.inputs.find((v) => v.name === 'attention_mask');
  if (!mask) {
    const batchAndLength = e.op('Slice', [e.op('Shape', [ids]), e.i64([0]), e.i64([2])]);
    const ones = e.op('ConstantOfShape', [batchAndLength], { value: Tensor.fromArray('', [1], BigInt64Array.of(1n)) });
    return { tokenMask: ones, pastLength: e.i64(0) };
  }
  const s = e.dim(ids, 1);
  const tokenMask = e.op('Slice', [mask, e.op('Neg', [s]), e.i64([Number.MAX_SAFE_INTEGER]), e.i64([1])]);
  const pastLength = e.op('Sub', [e.dimScalar(mask, 1), e.dimScalar(ids, 1)]);
  return { tokenMask, pastLength };
}

function scalarInit(model: Model, name: string, value: number): Value {
  const g = model.graph;
  const v = g.newValue(name);
  return g.addInitializer(v, Tensor.fromArray(v.name, [], Float32Array.of(value)));
}

export function insertRouters(model: Model, plan: RoutingPlan): string[] {
  const s = analyzeDecoder(model);
  const g = model.graph;
  const dtype = streamElementType(s);
  const { tokenMask, pastLength } = tokenInputs(model);
  const notes: string[] = [];
  for (const lp of plan.layers) {
    const layer = s.layers[lp.layer];
    if (!layer) throw new ModcError(`the routing plan names layer ${lp.layer}, but the model has ${s.layers.length} layers`);
    if (lp.router.weight.length !== s.hiddenSize) throw new ModcError(`router for layer ${lp.layer} has ${lp.router.weight.length} weights, the hidden size is ${s.hiddenSize}`);
    const prefix = `modc.router.${lp.layer}`;
    const w = g.addInitializer(g.newValue(`${prefix}.weight`), Tensor.fromArray(`${prefix}.weight`, [s.hiddenSize], lp.router.weight));
    const b = g.addInitializer(g.newValue(`${prefix}.bias`), Tensor.fromArray(`${prefix}.bias`, [1], Float32Array.of(lp.router.bias)));
    const opts = { dtype, name: `modc/layer${lp.layer}` };
    const [score] = callModcOp(model, 'Router', [layer.residualIn, w, b], opts);
    const [selected] = plan.mode === 'threshold'
      ? callModcOp(model, 'SelectThreshold', [score!, tokenMask, scalarInit(model, `${prefix}.threshold`, lp.threshold)], opts)
      : callModcOp(model, 'SelectTopK', [score!, tokenMask, scalarInit(model, `${prefix}.capacity`, lp.capacity), pastLength], opts);
    callModcOp(model, 'Compact', [selected!], opts);
    notes.push(`layer ${lp.layer}: router on ${layer.residualIn}, ${plan.mode === 'threshold' ? `p = ${lp.threshold}` : `capacity ${lp.capacity}`}`);
  }
  g.toposort();
  writeRoutingMetadata(model, {
    mode: plan.mode,
    gated: plan.gated,
    layers: plan.layers.map((l) => ({ layer: l.layer, threshold: l.threshold, capacity: l.capacity })),
  });
  return notes;
}

export function insertRoutersPass(plan: RoutingPlan): Pass {
  return {
    name: 'insert-routers',
    description: 'add a router and token selection on each converted layer\'s residual input',
    run(model) {
      return { changed: plan.layers.length > 0, notes: insertRouters(model, plan) };
    },
  };
}
