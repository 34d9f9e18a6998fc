/**
 * route-kv: key/value routing (SPEC.md, "Key/value routing"). Every token runs the whole layer;
 * the layer's router only decides which tokens stay keys and values for good. A key j is visible
 * to a query i when the layer's own mask allows it (j <= i, j real) and
 *
 *   p_j < sinks  or  keep_j  or  p_i - p_j < window          (p: the token's position)
 *
 * and the layer's cache holds, after a row's last token t, the entries with p_j < sinks, keep_j,
 * or p_j > p_t - window. Each entry carries a code: its position p while it may still leave with
 * the window, -1 - p once it is held for good. For a layer l with router selection keep [B, S]:
 *
 *   p_new    = positions of this call's tokens (real tokens before each, off attention_mask)
 *   codes    = Concat(past_positions.l, KvCodes(p_new, keep, sinks))              [B, P_l + S]
 *   valid    = KeyMask(past_lengths.l, P_l, token_mask)                             [B, P_l + S]
 *   masks    = the model's own mask nodes, recomputed with attention_mask := valid (this layer's keys)
 *   visible  = KvVisible(p_new, codes, window)                                      [B, 1, S, P_l + S]
 *   unfused:  Softmax(Where(visible, scores, lowest));  fused ops: their mask or bias input joined with visible
 *   retain   = KvRetain(codes, valid, last real position of each row, window)
 *   present.l.*, present_positions.l = GatherKv(Concat(past, new), Compact(retain)), codes likewise
 *   present_lengths.l = retained entries per row
 *
 * When every row retains every slot (a prefill shorter than sinks + window, or routers keeping
 * every token) the presents pass through unchanged. The interface is the compacted layers' one
 * (docs/interface.md): `past_lengths.l`, `past_positions.l` (codes here) and their presents.
 * Forms: unfused attention (Softmax over the scores), the standard ONNX Attention with a past
 * (its attn_mask) and MultiHeadAttention (its attention_bias). A form whose masks cannot take a
 * per-query rule is refused with the reason: ONNX Runtime's Attention (no attention_bias with a
 * past), static caches, a caller's 4-D mask, recurrent state.
 */
import type { DecoderStructure, KvTensor, LayerInfo } from '../analysis/types.js';
import { isStaticLayout, kvSequenceAxis } from '../analysis/types.js';
import { kvCompactionBlocker } from '../analysis/attention.js';
import { ModcError } from '../core/errors.js';
import { DataType, lowestFinite } from '../core/ir/dtype.js';
import { Graph, graphAttribute, tensorType, Value, withDim } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { recomputeWith, replaceUsesWithin } from '../core/ir/rewrite.js';
import type { TypeProto } from '../core/proto/index.js';
import { pastLengthName, pastPositionsName, presentLengthName, presentPositionsName } from '../metadata/decoder-io.js';
import { readRoutingMetadata, writeRoutingMetadata } from '../metadata/routing-metadata.js';
import { DEFAULT_KV_POLICY, type KvPolicy } from '../routing/router-weights.js';
import { elementTypeOf } from './element-type.js';
import { Emitter } from './modc-ops/emitter.js';
import { callModcOp, defaultOpset, MODC_DOMAIN } from './modc-ops/index.js';
import { streamElementType } from './mod-common.js';
import type { Pass } from './pass-manager.js';

export interface RouteKvReport {
  routed: number[];
  skipped: { layer: number; part: 'kv'; reason: string }[];
}

/** The input slot where a fused attention op takes a mask or additive bias key/value routing can join. */
const VISIBILITY_SLOT: Record<string, number> = { StandardAttention: 3, MultiHeadAttention: 5 };

/** Why layer `layer` cannot route its KV cache, or null. */
export function kvRoutingBlocker(model: Model, layer: LayerInfo): string | null {
  const a = layer.attention;
  if (layer.state.length) return `it carries state besides the KV cache (${layer.state[0]!.input}), which no routing changes`;
  if (a.form === 'recurrent') return 'it has no attention, so no KV cache to route';
  if (isStaticLayout(a.kv.layout))
    return `its cache is a static buffer (${a.kv.layout}) written in place at each row's write index; key/value routing drops an entry when it leaves the window, which needs a cache the layer can re-pack`;
  if (!model.graph.inputs.some((v) => v.name === 'attention_mask'))
    return "key/value routing takes each token's position off attention_mask (the real tokens before it), and the model has no attention_mask input";
  if (a.form === 'Attention')
    return `${a.node.describe()} (ONNX Runtime's Attention) takes no attention_bias together with a past cache, so the per-query visibility of key/value routing has no input to go to`;
  if (a.form === 'GroupQueryAttention')
    return `${a.node.describe()} numbers its keys by cache slot and writes them into its own buffer layout; key/value routing rebuilds visibility per original position for unfused attention, the standard Attention and MultiHeadAttention only`;
  const other = layer.sideInputs.find((si) => si.kind === 'other');
  if (other) return `side input ${other.value} is not understood (${(other as { reason: string }).reason})`;
  const caller = layer.sideInputs.find((si) => si.kind === 'attention-mask' && si.form === 'caller-4d');
  if (caller) return `it reads the caller's 4-D attention mask ${caller.value}, which key/value routing cannot rebuild for its own keys`;
  const blocked = kvCompactionBlocker(a);
  if (blocked) return blocked;
  if (a.form === 'unfused') {
    const axis = a.softmax.attrInt('axis', -1) ?? -1;
    if (axis !== -1 && axis !== 3) return `its ${a.softmax.describe()} normalises axis ${axis}, not the key axis (-1) of [batch, heads, queries, keys] scores`;
    return null;
  }
  const slot = VISIBILITY_SLOT[a.form];
  if (slot === undefined) return `${a.node.describe()} has no mask or bias input key/value routing can join`;
  if (a.form === 'MultiHeadAttention' && a.node.attrInt('unidirectional', 0) !== 1 && !a.node.input(5) && !a.node.input(4))
    return `${a.node.describe()} has no causal attribute and no mask; key/value routing routes causal attention only`;
  return null;
}

/** The call's shared values, built once: token mask, positions and each row's last position. */
interface CallValues {
  mask: Value;
  tokenMask: Value;
  positions: Value;
  last: Value;
}

function callValues(model: Model, e: Emitter): CallValues {
  const g = model.graph;
  const mask = g.inputs.find((v) => v.name === 'attention_mask')!;
  const ids = g.inputs.find((v) => v.name === 'input_ids') ?? g.inputs.find((v) => v.name === 'inputs_embeds');
  if (!ids) throw new ModcError("key/value routing needs the 'input_ids' (or 'inputs_embeds') input");
  const m = e.cast(mask, DataType.INT64);
  const total = e.dim(mask, 1);
  const start = e.op('Sub', [total, e.dim(ids, 1)]);
  const call = (v: Value) => e.op('Slice', [v, start, total, e.i64([1])]);
  const before = e.op('CumSum', [m, e.i64(1)], { exclusive: 1 });
  return {
    mask,
    tokenMask: e.cast(call(m), DataType.BOOL),
    positions: call(before),
    last: e.op('Sub', [e.reduceSum(m, [1], false), e.i64(1)]),
  };
}

class KvLayerRouter {
  private readonly e: Emitter;
  private readonly l: number;

  constructor(
    private readonly model: Model,
    private readonly s: DecoderStructure,
    private readonly layer: LayerInfo,
    private readonly keep: Value,
    private readonly policy: KvPolicy,
    private readonly call: CallValues,
  ) {
    this.l = layer.index;
    this.e = new Emitter(model.graph, defaultOpset(model), `modc/layer${this.l}/kv/`);
  }

  private op(name: string, inputs: Value[], graph?: Graph): Value[] {
    return callModcOp(this.model, name, inputs, { dtype: streamElementType(this.s), name: `modc/layer${this.l}/kv`, graph });
  }

  route(): void {
    const { e, layer, call, policy } = this;
    const g = this.model.graph;
    const kv = layer.kv;
    const seqAxis = kvSequenceAxis(kv.layout);
    const pastLength = g.addInput(new Value(pastLengthName(this.l), tensorType(DataType.INT64, ['batch'])));
    const pastCodes = g.addInput(new Value(pastPositionsName(this.l), tensorType(DataType.INT64, ['batch', `past_sequence_length_${this.l}`])));
    const capacity = e.dimScalar(kv.key.input, seqAxis);
    const codes = e.op('Concat', [pastCodes, this.op('KvCodes', [call.positions, this.keep, e.i64(policy.sinks)])[0]!], { axis: 1 });
    const valid = this.op('KeyMask', [pastLength, capacity, call.tokenMask])[0]!;
    const visible = this.op('KvVisible', [call.positions, codes, e.i64(policy.window)])[0]!;

    // The layer's masks and lengths, rebuilt for its own keys: cache slots, then this call's tokens.
    const region = new Set(layer.nodes);
    const recompute = layer.sideInputs.filter((si) => si.kind === 'attention-mask' || si.kind === 'sequence-length').map((si) => si.value);
    if (recompute.length) {
      const sub = new Map<Value, Value>([[call.mask, e.cast(valid, call.mask.dtype ?? DataType.INT64)]]);
      // Lengths read off another layer's cache mean "the past length": this layer's own.
      for (const other of this.s.layers) {
        if (other === layer || other.attention.form === 'recurrent') continue;
        sub.set(other.kv.key.input, kv.key.input);
        sub.set(other.kv.value.input, kv.value.input);
      }
      const recomputed = recomputeWith(g, recompute, sub, `_l${this.l}kv`);
      for (const v of recompute) replaceUsesWithin(region, v, recomputed.get(v)!);
    }
    this.applyVisibility(visible, valid);

    // The cache after this call: held entries and the window behind each row's last token.
    const retain = this.op('KvRetain', [codes, valid, call.last, e.i64(policy.window)])[0]!;
    const presentLength = e.reduceSum(e.cast(retain, DataType.INT64), [1], false);
    presentLength.name = g.uniqueName(presentLengthName(this.l));
    presentLength.type = tensorType(DataType.INT64, ['batch']);
    g.outputs.push(presentLength);
    const tensors: KvTensor[] = kv.layout === 'combined-2BHTD' ? [kv.key] : [kv.key, kv.value];
    this.packPresent(tensors, retain, codes, seqAxis, kv.layout === 'combined-2BHTD' ? 'GatherKvCombined' : 'GatherKv');
  }

  /** Joins `visible` [B, 1, S, T] with what the layer's attention already masks. */
  private applyVisibility(visible: Value, valid: Value): void {
    const { e } = this;
    const a = this.layer.attention;
    if (a.form === 'unfused') {
      const scores = a.softmax.input(0)!;
      a.softmax.setInput(0, this.where(visible, scores, elementTypeOf(scores) ?? streamElementType(this.s)));
      return;
    }
    if (a.form === 'recurrent' || a.form === 'GroupQueryAttention') throw new ModcError(`route-kv: layer ${this.l} cannot route its KV cache`);
    const slot = VISIBILITY_SLOT[a.form]!;
    const node = a.node;
    const existing = node.input(slot);
    if (existing) {
      const t = elementTypeOf(existing);
      node.setInput(slot, t === DataType.BOOL ? e.op('And', [existing, visible]) : this.where(visible, existing, t ?? streamElementType(this.s)));
    } else if (a.form === 'StandardAttention') {
      // Causal by is_causal=1 alone: the compacted cache's empty slots need masking too.
      node.setInput(slot, e.op('And', [visible, e.op('Reshape', [valid, e.i64([0, 1, 1, -1])])]));
    } else {
      const dtype = streamElementType(this.s);
      node.setInput(slot, this.where(visible, e.scalar(0, dtype === DataType.BFLOAT16 ? DataType.FLOAT : dtype), dtype));
    }
  }

  /** Where(visible, x, lowest) in x's element type (bfloat16 chosen in float32, then cast). */
  private where(visible: Value, x: Value, dtype: number): Value {
    const { e } = this;
    if (dtype === DataType.BFLOAT16) {
      const f = e.op('Where', [visible, e.cast(x, DataType.FLOAT), e.f32(lowestFinite(DataType.BFLOAT16)!)]);
      return e.cast(f, DataType.BFLOAT16);
    }
    const lowest = lowestFinite(dtype);
    if (lowest === null) throw new ModcError(`route-kv: layer ${this.l}'s attention scores have element type ${dtype}, not a float type`);
    return e.op('Where', [visible, x, e.scalar(lowest, dtype)]);
  }

  /**
   * The present graph outputs become the retained entries, each row packed first, with their
   * codes as present_positions.l. Packing copies the cache, so it runs only when some slot goes.
   */
  private packPresent(tensors: KvTensor[], retain: Value, codes: Value, seqAxis: number, gather: string): void {
    const g = this.model.graph;
    const e = this.e;
    const fulls = tensors.map((t) => {
      const full = t.output;
      const name = full.name;
      full.name = g.uniqueName(`${name}_full`);
      return { t, full, name, type: full.type };
    });
    const kept = e.reduceSum(e.cast(retain, DataType.INT64), [0, 1], false);
    const everySlot = e.op('Equal', [kept, e.op('Size', [retain])]);
    const branches = [new Graph(`modc/layer${this.l}/kv/pack_then`, g), new Graph(`modc/layer${this.l}/kv/pack_else`, g)] as const;
    branches[0].outputs = [...fulls.map((f) => f.full), codes].map((v) =>
      branches[0].addNode('Identity', [v], [branches[0].newValue(`${v.name}_kept`)]).output(0),
    );
    const [indices] = this.op('Compact', [retain], branches[1]);
    const inner = new Emitter(branches[1], e.opset, `modc/layer${this.l}/kv/pack/`);
    branches[1].outputs = [
      ...fulls.map((f) => this.op(gather, [f.full, indices!], branches[1])[0]!),
      inner.op('GatherElements', [codes, indices!], { axis: 1 }),
    ];
    const elem = (v: Value): TypeProto | undefined => {
      const t = elementTypeOf(v);
      return t === undefined ? undefined : ({ tensor_type: { elem_type: t } } as TypeProto);
    };
    const outs = [
      ...fulls.map((f) => g.newValue(f.name, elem(f.t.input) ?? elem(f.full))),
      g.newValue(presentPositionsName(this.l), { tensor_type: { elem_type: DataType.INT64 } } as TypeProto),
    ];
    branches.forEach((b) => b.outputs.forEach((v, i) => (v.type ??= outs[i]!.type)));
    const node = g.addNode('If', [everySlot], outs, { name: `modc/layer${this.l}/kv/pack_cache` });
    node.setAttr(graphAttribute('then_branch'), branches[0]);
    node.setAttr(graphAttribute('else_branch'), branches[1]);
    fulls.forEach((f, i) => {
      const out = outs[i]!;
      out.name = f.name;
      out.type = withDim(f.type, seqAxis, `present_sequence_length_${this.l}`);
      g.outputs = g.outputs.map((v) => (v === f.full ? out : v));
      f.t.input.type = withDim(f.t.input.type, seqAxis, `past_sequence_length_${this.l}`);
    });
    const positions = outs.at(-1)!;
    positions.type = tensorType(DataType.INT64, ['batch', `present_sequence_length_${this.l}`]);
    g.outputs.push(positions);
  }
}

/** Routes every kv part the routing metadata lists; refused layers lose their router again. */
export function routeKv(model: Model, s: DecoderStructure): RouteKvReport {
  const meta = readRoutingMetadata(model);
  const report: RouteKvReport = { routed: [], skipped: [] };
  const entries = (meta?.layers ?? []).filter((l) => l.part === 'kv');
  if (!meta || entries.length === 0) return report;
  const policy = meta.kv ?? DEFAULT_KV_POLICY;
  const g = model.graph;
  let call: CallValues | null = null;
  for (const entry of entries) {
    const keep = entry.selected ? g.findValue(entry.selected) : undefined;
    const select = keep?.producer;
    const router = select?.input(0)?.producer;
    const layer = s.layers[entry.layer];
    if (!keep || !select || select.domain !== MODC_DOMAIN || select.opType !== 'SelectThreshold' || !router || !layer)
      throw new ModcError(
        `route-kv: the routing metadata names ${entry.selected ? `selection ${entry.selected}` : 'no selection value'} for layer ${entry.layer} (kv), which no modc.SelectThreshold computes (run insert-routers with threshold routing first)`,
      );
    const why = kvRoutingBlocker(model, layer);
    if (why) {
      report.skipped.push({ layer: entry.layer, part: 'kv', reason: why });
      for (const n of [select, router]) g.removeNode(n, true);
      continue;
    }
    call ??= callValues(model, new Emitter(g, defaultOpset(model), 'modc/kv/'));
    new KvLayerRouter(model, s, layer, keep, policy, call).route();
    report.routed.push(entry.layer);
  }
  g.toposort();
  writeRoutingMetadata(model, {
    ...meta,
    kv: policy,
    layers: meta.layers.filter((l) => l.part !== 'kv' || report.routed.includes(l.layer)),
    ...(report.skipped.length || meta.skipped ? { skipped: [...(meta.skipped ?? []), ...report.skipped] } : {}),
  });
  return report;
}

export const routeKvPass: Pass = {
  name: 'route-kv',
  description: "key/value routing: every token runs the layer; a layer's KV cache keeps its sinks, the tokens its router keeps and a recent window",
  // The layers' nodes, boundaries and past inputs stay as analysed (route-layers reads them next).
  preserves: ['structure'],
  run(model, _options, ctx) {
    const r = routeKv(model, ctx.structure());
    const policy = readRoutingMetadata(model)?.kv ?? DEFAULT_KV_POLICY;
    return {
      changed: r.routed.length > 0 || r.skipped.length > 0,
      notes: [
        ...(r.routed.length ? [`routed the KV cache of layers ${r.routed.join(', ')} (sinks ${policy.sinks}, window ${policy.window})`] : []),
        ...r.skipped.map((sk) => `layer ${sk.layer} (kv) not converted: ${sk.reason}`),
      ],
    };
  },
};
