/**
 * route-layers: makes each routed layer process only its selected tokens (SPEC.md, "One
 * converted layer"). For a layer with residual input x and routing (indices, valid, count):
 *
 *   x_sel = GatherTokens(x, indices)                    the layer now reads x_sel
 *   per-token side inputs (positions, rotary cos/sin)   gathered the same way: original positions
 *   masks and sequence lengths                          recomputed from this layer's own keys:
 *       attention_mask -> KeyMask(past_lengths.l, P_l, valid)  (GQA: PrefixMask(past + K, P_l + K))
 *       input_ids / position_ids / stream values       -> their gathered versions
 *   present K/V                                         re-packed per row: GatherKv(present, Compact(keep))
 *   out = ScatterTokens[Gated](x, indices, valid, x_sel, y)   replaces the layer's output y downstream
 *
 * The compiled layer's cache holds only its selected tokens, right-padded per row: its interface
 * gains `past_lengths.l` / `present_lengths.l` (int64 [batch]) and its own past length dim.
 * The layer's exit must be a plain residual add: run split-fused-boundaries first.
 */
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import type { DecoderStructure, KvTensor, LayerInfo } from '../compiler/analysis/types.js';
import { ModcError } from '../compiler/errors.js';
import { DataType } from '../compiler/ir/dtype.js';
import { Graph, type Node, Value } from '../compiler/ir/graph.js';
import type { Model } from '../compiler/ir/model.js';
import { graphInputsReached, recomputeWith, replaceUsesWithin } from '../compiler/ir/rewrite.js';
import type { Pass } from '../compiler/pass-manager.js';
import { AttributeType, type AttributeProto, type TypeProto } from '../compiler/proto/index.js';
import { pastLengthName, presentLengthName } from '../compiler/runtime/decoder-io.js';
import { Emitter } from '../runtime-ops/emit.js';
import { callModcOp, defaultOpset, MODC_DOMAIN } from '../runtime-ops/index.js';
import { readRoutingMetadata, writeRoutingMetadata } from '../compiler/routing-metadata.js';
import { findRouting, type LayerRouting, streamElementType } from './mod-common.js';

export interface RouteOptions {
  gated: boolean;
}

/**
 * Per-token values computed from token inputs alone (rotary cos/sin of position_ids) are
 * recomputed from the gathered inputs, whatever their layout; others must be [batch, seq, ...].
 */
function fromTokenInputsOnly(model: Model, v: Value): boolean {
  const sources = graphInputsReached(model.graph, [v]);
  return sources.size > 0 && [...sources].every((s) => s.name === 'position_ids' || s.name === 'input_ids');
}

/** Why a layer cannot be routed, found before anything is changed. */
function blocker(model: Model, layer: LayerInfo): string | null {
  if (!layer.residualOut) return `its residual add is fused into ${layer.exit.node.describe()} (run split-fused-boundaries first)`;
  if (layer.exit.node.opType !== 'Add') return `its exit ${layer.exit.node.describe()} is not a plain Add (run split-fused-boundaries first)`;
  for (const si of layer.sideInputs) {
    if (si.kind === 'other') return `side input ${si.value} is not understood (${si.reason})`;
    if (si.kind === 'per-token' && !fromTokenInputsOnly(model, si.value) && (si.batchAxis !== 0 || si.sequenceAxis !== 1)) {
      return `per-token side input ${si.value} has batch axis ${si.batchAxis} and sequence axis ${si.sequenceAxis}; only [batch, sequence, ...] layouts (batch axis 0) can be gathered`;
    }
  }
  return null;
}

function graphAttribute(name: string): AttributeProto {
  return { name, type: AttributeType.GRAPH, floats: [], ints: [], strings: [], tensors: [], graphs: [], sparse_tensors: [], type_protos: [] } as AttributeProto;
}

/** The element type of a value, without shape (a branch output's declared type). */
function elementType(v: Value): TypeProto | undefined {
  const elem = v.dtype;
  return elem === undefined ? undefined : ({ tensor_type: { elem_type: elem } } as TypeProto);
}

function tensorType(elem: number, dims: (number | string)[]): TypeProto {
  return { tensor_type: { elem_type: elem, shape: { dim: dims.map((d) => (typeof d === 'number' ? { dim_value: d } : { dim_param: d })) } } } as TypeProto;
}

/** A copy of `type` with dim `axis` renamed (types can be shared objects: never edit in place). */
function withDim(type: TypeProto | undefined, axis: number, name: string): TypeProto | undefined {
  const t = type?.tensor_type;
  if (!t?.shape) return type;
  const dim = t.shape.dim.map((d, i) => (i === axis ? { dim_param: name } : d));
  return { tensor_type: { elem_type: t.elem_type, shape: { dim } } } as TypeProto;
}

class LayerRouter {
  private readonly e: Emitter;
  private readonly region: Set<Node>;
  private readonly l: number;

  /**
   * @param residualIn the value now carrying this layer's input: the original, or the scatter
   *   output of the routed layer before it
   */
  constructor(private readonly model: Model, private readonly s: DecoderStructure, private readonly layer: LayerInfo, private readonly routing: LayerRouting, private readonly opts: RouteOptions, private readonly residualIn: Value) {
    this.l = layer.index;
    this.e = new Emitter(model.graph, defaultOpset(model), `modc/layer${this.l}/`);
    this.region = new Set(layer.nodes.filter((n) => n.domain !== MODC_DOMAIN));
  }

  private call(op: string, inputs: Value[], graph?: Graph): Value[] {
    return callModcOp(this.model, op, inputs, { dtype: streamElementType(this.s), name: `modc/layer${this.l}`, graph });
  }

  /**
   * `If(cond)` in the main graph with branches built by the callbacks; returns its outputs,
   * typed like the then-branch's (element type only: shapes may differ between branches).
   */
  private ifElse(name: string, cond: Value, thenBranch: (g: Graph) => Value[], elseBranch: (g: Graph) => Value[]): Value[] {
    const g = this.model.graph;
    const branches = [new Graph(`${name}_then`, g), new Graph(`${name}_else`, g)] as const;
    branches[0].outputs = thenBranch(branches[0]);
    branches[1].outputs = elseBranch(branches[1]);
    const outs = branches[0].outputs.map((v) => g.newValue(`${v.name}_if`, elementType(v)));
    for (const b of branches) b.outputs.forEach((v) => (v.type ??= elementType(outs[b.outputs.indexOf(v)]!)));
    const node = g.addNode('If', [cond], outs, { name });
    node.setAttr(graphAttribute('then_branch'), branches[0]);
    node.setAttr(graphAttribute('else_branch'), branches[1]);
    return outs;
  }

  private readonly gathered = new Map<Value, Value>();

  /** `v` at the selected tokens (one GatherTokens per value and layer). */
  private gather(v: Value): Value {
    let out = this.gathered.get(v);
    if (!out) {
      out = this.call('GatherTokens', [v, this.routing.indices])[0]!;
      this.gathered.set(v, out);
    }
    return out;
  }

  /**
   * Tokens selected per row, [B] int64, counted from `valid`: Compact's own `count` output read
   * inside an If branch makes ORT warn that it cannot rename it when inlining the function.
   */
  private selectedCount(): Value {
    return this.e.reduceSum(this.e.cast(this.routing.valid, DataType.INT64), [1], false);
  }

  /** Rewrites the layer; returns the value that now carries its output (the scatter). */
  route(): Value {
    const { layer, routing } = this;
    const g = this.model.graph;
    const existing = new Set(g.nodes);
    const x = this.residualIn;
    const y = layer.residualOut!;
    const xSel = this.gather(x);
    if (layer.entryBoundary) replaceUsesWithin(this.region, layer.entryBoundary.normed, this.gather(layer.entryBoundary.normed));
    replaceUsesWithin(this.region, x, xSel);

    const recompute: Value[] = [];
    const perToken: Value[] = [];
    for (const si of layer.sideInputs) {
      if (si.kind === 'per-token') {
        if (fromTokenInputsOnly(this.model, si.value)) perToken.push(si.value);
        else replaceUsesWithin(this.region, si.value, this.gather(si.value));
      } else if (si.kind === 'attention-mask' || si.kind === 'sequence-length') {
        recompute.push(si.value);
      }
    }
    if (perToken.length) {
      // Original positions: the same computation on the selected tokens' own ids and positions.
      const tokens = new Map(g.inputs.filter((v) => v.name === 'position_ids' || v.name === 'input_ids').map((v) => [v, this.gather(v)]));
      const recomputed = recomputeWith(g, perToken, tokens, `_l${this.l}`);
      for (const v of perToken) replaceUsesWithin(this.region, v, recomputed.get(v)!);
    }

    const kv = layer.kv;
    const pastKey = kv.key.input;
    const seqAxis = kv.layout === 'combined-2BHTD' ? 3 : 2;
    const pastLength = g.addInput(new Value(pastLengthName(this.l), tensorType(DataType.INT64, ['batch'])));
    const capacity = this.e.dimScalar(pastKey, seqAxis);
    const k = this.e.dimScalar(routing.indices, 1);
    const gqa = layer.attention.form === 'GroupQueryAttention';

    if (recompute.length) {
      const substitute = this.substitutes(xSel, pastLength, capacity, k, gqa);
      const recomputed = recomputeWith(g, recompute, substitute, `_l${this.l}`);
      for (const v of recompute) replaceUsesWithin(this.region, v, recomputed.get(v)!);
    }

    // Keep this layer's valid cache slots and this call's valid tokens, each row packed left.
    const keep = gqa
      ? this.call('PrefixMask', [this.e.op('Add', [pastLength, this.selectedCount()]), this.e.op('Add', [capacity, k])])[0]!
      : this.call('KeyMask', [pastLength, capacity, routing.valid])[0]!;
    const tensors: KvTensor[] = kv.layout === 'combined-2BHTD' ? [kv.key] : [kv.key, kv.value];
    const packed = this.packPresent(tensors, keep, seqAxis, kv.layout === 'combined-2BHTD' ? 'GatherKvCombined' : 'GatherKv');
    const presentLength = this.e.reduceSum(this.e.cast(keep, DataType.INT64), [1], false);
    presentLength.name = g.uniqueName(presentLengthName(this.l));
    presentLength.type = tensorType(DataType.INT64, ['batch']);
    g.outputs.push(presentLength);

    const scatter = this.opts.gated
      ? this.call('ScatterTokensGated', [x, routing.indices, routing.valid, xSel, y, this.gather(this.e.op('Sigmoid', [routing.score]))])
      : this.call('ScatterTokens', [x, routing.indices, routing.valid, xSel, y]);
    for (const use of [...y.uses]) if (!this.region.has(use.node) && use.node !== scatter[0]!.producer) use.node.setInput(use.index, scatter[0]!);
    if (g.outputs.includes(y)) g.outputs = g.outputs.map((v) => (v === y ? scatter[0]! : v));

    const layerNodes = new Set([...this.region, ...g.nodes.filter((n) => !existing.has(n))]);
    return this.skipWhenNothingSelected(layerNodes, [
      [scatter[0]!, x],
      ...packed.map((p, i) => [p, tensors[i]!.input] as [Value, Value]),
      [presentLength, pastLength],
    ]);
  }

  /**
   * Puts the layer in `If(any token selected)`: when no row selects a token (a batch-1 decode
   * step the router skips) no node of the layer runs, and its outputs are its inputs. Also keeps
   * ORT away from the empty tensors a zero-token layer would make.
   * `pairs` are [value the layer computes, value passed through when skipped].
   */
  private skipWhenNothingSelected(nodes: ReadonlySet<Node>, pairs: [Value, Value][]): Value {
    const g = this.model.graph;
    g.toposort();
    const cond = this.e.op('Greater', [this.e.reduceSum(this.selectedCount(), [0], false), this.e.i64(0)]);
    const outs = this.ifElse(`modc/layer${this.l}/if_selected`, cond,
      (run) => {
        g.moveNodesTo(nodes, run);
        return pairs.map(([computed]) => computed);
      },
      (skip) => pairs.map(([, passed]) => skip.addNode('Identity', [passed], [skip.newValue(`${passed.name}_skipped`)]).output(0)));
    const run = outs[0]!.producer!.subgraphs()[0]!;
    pairs.forEach(([computed], i) => {
      const out = outs[i]!;
      for (const use of [...computed.uses]) if (use.node.graph !== run) use.node.setInput(use.index, out);
      if (g.outputs.includes(computed)) {
        // Graph outputs keep their names: the If output takes it over.
        const name = computed.name;
        computed.name = g.uniqueName(`${name}_run`);
        out.name = name;
        out.type = computed.type;
        g.outputs = g.outputs.map((v) => (v === computed ? out : v));
      }
    });
    return outs[0]!;
  }

  /** What the shared mask / length builders read, in this layer's terms. */
  private substitutes(xSel: Value, pastLength: Value, capacity: Value, k: Value, gqa: boolean): Map<Value, Value> {
    const g = this.model.graph;
    const { routing } = this;
    const sub = new Map<Value, Value>();
    const mask = g.inputs.find((v) => v.name === 'attention_mask');
    if (mask) {
      const keys = gqa
        ? this.call('PrefixMask', [this.e.op('Add', [pastLength, k]), this.e.op('Add', [capacity, k])])[0]!
        : this.call('KeyMask', [pastLength, capacity, routing.valid])[0]!;
      sub.set(mask, this.e.cast(keys, mask.dtype ?? DataType.INT64));
    }
    for (const name of ['input_ids', 'position_ids']) {
      const v = g.inputs.find((i) => i.name === name);
      if (v) sub.set(v, this.gather(v));
    }
    for (const stream of [this.s.embedding.output, ...this.s.steps.map((st) => st.sum)]) if (stream) sub.set(stream, xSel);
    // Lengths read off another layer's cache mean "the past length": use this layer's own.
    for (const other of this.s.layers) {
      if (other === this.layer) continue;
      sub.set(other.kv.key.input, this.layer.kv.key.input);
      sub.set(other.kv.value.input, this.layer.kv.value.input);
    }
    return sub;
  }

  /**
   * The present graph outputs become the re-packed caches (the op's own presents feed only
   * them). Packing copies the whole cache, so it runs only when some slot must go: a batch-1
   * step or an all-selected prefill keeps every slot, and then the present passes through.
   */
  private packPresent(tensors: KvTensor[], keep: Value, seqAxis: number, op: string): Value[] {
    const g = this.model.graph;
    const fulls = tensors.map((t) => {
      const full = t.output;
      const name = full.name;
      full.name = g.uniqueName(`${name}_full`);
      return { t, full, name };
    });
    const kept = this.e.reduceSum(this.e.cast(keep, DataType.INT64), [0, 1], false);
    const everySlotKept = this.e.op('Equal', [kept, this.e.op('Size', [keep])]);
    const packed = this.ifElse(`modc/layer${this.l}/pack_cache`, everySlotKept,
      (branch) => fulls.map(({ full }) => branch.addNode('Identity', [full], [branch.newValue(`${full.name}_kept`)]).output(0)),
      (branch) => {
        const [slots] = this.call('Compact', [keep], branch);
        return fulls.map(({ full }) => this.call(op, [full, slots!], branch)[0]!);
      });
    return fulls.map(({ t, full, name }, i) => {
      const out = packed[i]!;
      out.name = name;
      out.type = withDim(full.type, seqAxis, `present_sequence_length_${this.l}`);
      g.outputs = g.outputs.map((v) => (v === full ? out : v));
      t.input.type = withDim(t.input.type, seqAxis, `past_sequence_length_${this.l}`);
      return out;
    });
  }
}

export interface RouteReport {
  routed: number[];
  skipped: { layer: number; reason: string }[];
}

export function routeLayers(model: Model, opts: RouteOptions): RouteReport {
  const s = analyzeDecoder(model);
  const report: RouteReport = { routed: [], skipped: [] };
  const plans: [LayerInfo, LayerRouting][] = [];
  for (const layer of s.layers) {
    const routing = findRouting(layer);
    if (!routing) continue;
    const why = blocker(model, layer);
    if (why) {
      report.skipped.push({ layer: layer.index, reason: why });
      for (const n of routing.nodes.reverse()) model.graph.removeNode(n, true);
      continue;
    }
    plans.push([layer, routing]);
  }
  // Routing layer l replaces its output downstream; layer l+1 then reads the scatter.
  const carried = new Map<Value, Value>();
  for (const [layer, routing] of plans) {
    const input = carried.get(layer.residualIn) ?? layer.residualIn;
    carried.set(layer.residualOut!, new LayerRouter(model, s, layer, routing, opts, input).route());
    report.routed.push(layer.index);
  }
  model.graph.toposort();
  const meta = readRoutingMetadata(model);
  if (meta) {
    writeRoutingMetadata(model, {
      ...meta,
      gated: opts.gated,
      layers: meta.layers.filter((l) => report.routed.includes(l.layer)),
      ...(report.skipped.length ? { skipped: report.skipped } : {}),
    });
  }
  return report;
}

export function routeLayersPass(opts: RouteOptions): Pass {
  return {
    name: 'route-layers',
    description: 'run each routed layer on its selected tokens only, with a compacted KV cache',
    run(model) {
      const r = routeLayers(model, opts);
      if (r.routed.length === 0 && r.skipped.length === 0) throw new ModcError('no routers found: run insert-routers first');
      return {
        changed: r.routed.length > 0,
        notes: [
          ...(r.routed.length ? [`routed layers ${r.routed.join(', ')} (${opts.gated ? 'gated' : 'ungated'})`] : []),
          ...r.skipped.map((sk) => `layer ${sk.layer} not converted: ${sk.reason}`),
        ],
      };
    },
  };
}
