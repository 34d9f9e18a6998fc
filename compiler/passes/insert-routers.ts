/**
 * insert-routers: for each routed part of the routing plan, a router on the stream value the
 * part reads (the layer's residual input for a block or an attention part; for an MLP part the
 * stream after the attention add, or the layer input in a parallel-residual layer) and the token
 * selection:
 *
 *   score = modc.Router(x, w, b)
 *   selected = modc.SelectThreshold(score, token_mask, scoreCut(p)) (threshold-p: sigmoid(score) >= p)
 *            | modc.SelectTopK(score, token_mask, c, past_length)  (top-k)
 *   indices, valid, count, slots, any = modc.CompactTokens(selected, grid)
 *
 * grid = modc.TokenGrid(token_mask) is built once for every router. token_mask is this call's
 * columns of attention_mask (of a caller's 4-D mask, its diagonal at the call's sequence indices:
 * compiler/passes/caller-mask.ts), as bool. The selection value is named
 * `modc.selected.{l}[.attn|.mlp|.kv]` and recorded in the `modc.routing` metadata, which is how
 * route-layers (and tools measuring what ran) find each part's routing.
 */
import { ModcError } from '../core/errors.js';
import { DataType } from '../core/ir/dtype.js';
import { analyzeDecoder } from '../analysis/analyze.js';
import type { DecoderStructure } from '../analysis/types.js';
import type { Value } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { Tensor } from '../core/ir/tensor.js';
import type { Pass } from './pass-manager.js';
import { kvPolicyOf, type RoutingPlan } from '../routing/routing-plan.js';
import { Emitter } from './modc-ops/emitter.js';
import { callModcOp, defaultOpset, reference } from './modc-ops/index.js';
import { type RoutedLayerMetadata, writeRoutingMetadata } from '../metadata/routing-metadata.js';
import { routerTensorPrefix } from '../routing/router-weights.js';
import { subLayersOf } from '../analysis/sub-layers.js';
import { describeLayerPart } from '../routing/routing-plan.js';
import { streamElementType } from './mod-common.js';
import { staticTokenInputs } from './static-cache.js';
import { callerTokenInputs } from './caller-mask.js';

/** This call's token mask [B,S] and past length (T - S), built once for all routers. */
function tokenInputs(model: Model): { tokenMask: Value; pastLength: Value } {
  const g = model.graph;
  const e = new Emitter(g, defaultOpset(model), 'modc/');
  // The tokens of this call: input_ids [B, S], or inputs_embeds [B, S, H] for an embeddings-fed decoder.
  const ids = g.inputs.find((v) => v.name === 'input_ids') ?? g.inputs.find((v) => v.name === 'inputs_embeds');
  if (!ids) throw new ModcError("routing needs the 'input_ids' (or 'inputs_embeds') input");
  const mask = g.inputs.find((v) => v.name === 'attention_mask');
  // Static KV caches carry each row's real tokens in write_indices / nonpad_kv_seqlen (compiler/passes/static-cache.ts).
  const fromStatic = mask ? null : staticTokenInputs(model, e, ids);
  if (fromStatic) return fromStatic;
  if (!mask) {
    const batchAndLength = e.op('Slice', [e.op('Shape', [ids]), e.i64([0]), e.i64([2])]);
    const ones = e.op('ConstantOfShape', [batchAndLength], { value: Tensor.fromArray('', [1], BigInt64Array.of(1n)) });
    return { tokenMask: ones, pastLength: e.i64(0) };
  }
  // The caller's 4-D mask [B, 1, M, M] (compiler/passes/caller-mask.ts).
  if (mask.shape?.length === 4) return callerTokenInputs(model, e, ids, mask);
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

export function insertRouters(model: Model, plan: RoutingPlan, s: DecoderStructure = analyzeDecoder(model)): string[] {
  const g = model.graph;
  const dtype = streamElementType(s);
  const tokens = tokenInputs(model);
  // One bool mask for every router (the select ops' own casts of it are then no-ops ONNX Runtime drops).
  const tokenMask = new Emitter(g, defaultOpset(model), 'modc/').cast(tokens.tokenMask, DataType.BOOL);
  const { pastLength } = tokens;
  let grid: Value[] | undefined;
  const notes: string[] = [];
  const recorded: RoutedLayerMetadata[] = [];
  const graphOutputs = new Set(g.outputs);
  for (const lp of plan.layers) {
    const layer = s.layers[lp.layer];
    if (!layer) throw new ModcError(`the routing plan names layer ${lp.layer}, but the model has ${s.layers.length} layers`);
    // kv (which tokens stay keys/values) excludes the parts that compact the cache themselves.
    const excludes = (a: string, b: string) =>
      a === b || a === 'block' || b === 'block' || (a === 'kv' && b === 'attention') || (a === 'attention' && b === 'kv');
    const twice = plan.layers.find((o) => o !== lp && o.layer === lp.layer && excludes(o.part, lp.part));
    if (twice)
      throw new ModcError(
        `the routing plan routes layer ${lp.layer} as ${lp.part} and as ${twice.part}; a layer routes its whole block, or its attention (or its KV cache) and/or its MLP`,
      );
    if (lp.router.weight.length !== s.hiddenSize)
      throw new ModcError(`router for layer ${describeLayerPart(lp)} has ${lp.router.weight.length} weights, the hidden size is ${s.hiddenSize}`);
    // An MLP router reads the stream the MLP reads; when the layer has no sub-layer boundary
    // route-layers refuses the part and removes this router again.
    // A kv router reads the layer input x, as a block or attention router does.
    const parts = lp.part === 'block' || lp.part === 'kv' ? null : subLayersOf(layer, graphOutputs);
    const input = parts && !('reason' in parts) ? parts[lp.part as 'attention' | 'mlp'].input : layer.residualIn;
    const prefix = `modc.${routerTensorPrefix(lp.layer, lp.part)}`;
    const w = g.addInitializer(g.newValue(`${prefix}.weight`), Tensor.fromArray(`${prefix}.weight`, [s.hiddenSize], lp.router.weight));
    const b = g.addInitializer(g.newValue(`${prefix}.bias`), Tensor.fromArray(`${prefix}.bias`, [1], Float32Array.of(lp.router.bias)));
    const opts = { dtype, name: `modc/layer${lp.layer}${lp.part === 'block' ? '' : `/${lp.part}`}` };
    const [score] = callModcOp(model, 'Router', [input, w, b], opts);
    const [selected] =
      plan.mode === 'threshold'
        ? callModcOp(model, 'SelectThreshold', [score!, tokenMask, scalarInit(model, `${prefix}.score_cut`, reference.scoreCut(lp.threshold))], opts)
        : callModcOp(model, 'SelectTopK', [score!, tokenMask, scalarInit(model, `${prefix}.capacity`, lp.capacity), pastLength], opts);
    selected!.name = g.uniqueName(prefix.replace('modc.router.', 'modc.selected.'));
    // Key/value routing gathers no token: every token runs the layer (compiler/passes/route-kv.ts).
    if (lp.part !== 'kv') {
      grid ??= callModcOp(model, 'TokenGrid', [tokenMask], { dtype, name: 'modc' });
      callModcOp(model, 'CompactTokens', [selected!, ...grid], opts);
    }
    recorded.push({ layer: lp.layer, part: lp.part, selected: selected!.name, threshold: lp.threshold, capacity: lp.capacity });
    notes.push(`layer ${describeLayerPart(lp)}: router on ${input}, ${plan.mode === 'threshold' ? `p = ${lp.threshold}` : `capacity ${lp.capacity}`}`);
  }
  g.toposort();
  writeRoutingMetadata(model, {
    mode: plan.mode,
    gated: plan.gated,
    layers: recorded,
    ...(plan.layers.some((l) => l.part === 'kv') ? { kv: kvPolicyOf(plan) } : {}),
  });
  return notes;
}

export function insertRoutersPass(plan: RoutingPlan): Pass {
  return {
    name: 'insert-routers',
    description: "add a router and token selection on each converted layer's residual input",
    // Routers only read stream values: the layers, their boundaries and caches stay as analysed.
    preserves: ['structure'],
    run(model, _options, ctx) {
      return { changed: plan.layers.length > 0, notes: insertRouters(model, plan, ctx.structure()) };
    },
  };
}
