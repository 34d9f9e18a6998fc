/**
 * Static KV caches in the MoD passes: a layer whose standard ONNX Attention (opset 24) reads a
 * fixed-size buffer that TensorScatter writes at `write_indices`, with `nonpad_kv_seqlen` counting
 * each row's valid keys (compiler/analysis/attention.ts finds them).
 *
 * A compacted static layer l keeps its own buffer and its own per-row valid length:
 *
 *   past_lengths.l  int64 [B]   valid slots of each row of layer l's buffer (its write index)
 *   TensorScatter(buffer_l, k_sel, past_lengths.l)      the selected tokens, packed at the row's end
 *   Attention(.., nonpad_kv_seqlen = past_lengths.l + selected count, mask rebuilt from past_lengths.l;
 *             is_causal=1 without a mask becomes that mask by slot, is_causal=0)
 *   present_lengths.l = past_lengths.l + selected count
 *
 * The buffer's length dim becomes `max_sequence_length_l` (a runner may size it smaller than the
 * original's, as long as every call fits: past_lengths.l + S <= length). The original
 * write_indices / nonpad_kv_seqlen stay the inputs of the layers that are not converted.
 *
 * Recomputing the model's own mask with write_indices -> past_lengths.l is right for causality and
 * validity, which compaction keeps (keys stay in order), and wrong for a distance: a sliding
 * window (q - slot < W, compiler/analysis/static-mask.ts) counts slots of the original buffer,
 * which are positions there but not in a compacted one. A windowed layer takes the window by
 * original position instead, as a compacted GroupQueryAttention does (window-mask.ts):
 *
 *   pos_sel  = GatherElements(write_indices + t, indices)          [B, K]: each selected token's slot in the original
 *   present_positions.l = TensorScatter(past_positions.l, pos_sel, past_lengths.l)   [B, max_sequence_length_l]
 *   attn_mask = WindowBias(pos_sel, present_positions.l, W)         a query at p sees keys at p - W < q <= p
 *
 * with validity still from nonpad_kv_seqlen = past_lengths.l + selected count. past_positions.l is
 * carried like the cache (zeros at the start), through the layer's If like its buffers.
 */
import { staticWindow } from '../analysis/attention.js';
import { kvSequenceAxis, type LayerInfo } from '../analysis/types.js';
import { DataType } from '../core/ir/dtype.js';
import { attribute, type Graph, type Node, tensorType, Value, withDim } from '../core/ir/graph.js';
import type { Model } from '../core/ir/model.js';
import { Tensor } from '../core/ir/tensor.js';
import {
  pastLengthName,
  pastPositionsName,
  presentLengthName,
  presentPositionsName,
  STATIC_CACHE_INPUTS_KEY,
  STATIC_CACHE_LENGTH_KEY,
} from '../metadata/decoder-io.js';
import { type CacheContext, type Carried, type LayerCache, namedOutput, recomputeMasks } from './cache-contract.js';
import type { Emitter } from './modc-ops/emitter.js';

/** The graph inputs the static caches' writes and attention read (through casts), or null. */
export function staticCacheInputs(graph: Graph): { write: Value; nonpad: Value | null } | null {
  const inputs = new Set(graph.inputs);
  const source = (v: Value | null): Value | null => {
    for (let cur = v, hops = 0; cur && hops < 4; hops++) {
      if (inputs.has(cur)) return cur;
      const p = cur.producer;
      cur = p && (p.opType === 'Cast' || p.opType === 'Identity') ? p.input(0) : null;
    }
    return null;
  };
  let write: Value | null = null;
  let nonpad: Value | null = null;
  for (const n of graph.nodes) {
    if (n.domain !== '' && n.domain !== 'ai.onnx') continue;
    if (n.opType === 'TensorScatter') write ??= source(n.input(2));
    if (n.opType === 'Attention') nonpad ??= source(n.input(6));
  }
  return write ? { write, nonpad } : null;
}

/**
 * The routers' token mask and past length for a model with no attention_mask. With static caches:
 * token t of row b is real iff t < nonpad_kv_seqlen[b] - write_indices[b] (the row's real tokens of
 * this call, right padding), and the past length is the longest row's write index.
 */
export function staticTokenInputs(model: Model, e: Emitter, ids: Value): { tokenMask: Value; pastLength: Value } | null {
  const inputs = staticCacheInputs(model.graph);
  if (!inputs?.nonpad) return positionTokenInputs(model, e, ids);
  const write = e.cast(inputs.write, DataType.INT64);
  const real = e.op('Sub', [e.cast(inputs.nonpad, DataType.INT64), write]);
  const t = e.op('Range', [e.i64(0), e.dimScalar(ids, 1), e.i64(1)]);
  const tokenMask = e.cast(e.op('Less', [e.unsqueeze(t, [0]), e.unsqueeze(real, [1])]), DataType.INT64);
  return { tokenMask, pastLength: e.reduceMax(write, [0], false) };
}

/**
 * A model with neither attention_mask nor static cache lengths (a causal export that cannot pad):
 * every token is real, and the past length is what position_ids say (max position + 1 - S), so
 * a decode step is told from a one-token prompt. Null without position_ids.
 */
function positionTokenInputs(model: Model, e: Emitter, ids: Value): { tokenMask: Value; pastLength: Value } | null {
  const positions = model.graph.inputs.find((v) => v.name === 'position_ids');
  if (!positions) return null;
  const batchAndLength = e.op('Slice', [e.op('Shape', [ids]), e.i64([0]), e.i64([2])]);
  const tokenMask = e.op('ConstantOfShape', [batchAndLength], { value: Tensor.fromArray('', [1], BigInt64Array.of(1n)) });
  const last = e.reduceMax(e.reduceMax(e.cast(positions, DataType.INT64), [1], false), [0], false);
  return { tokenMask, pastLength: e.op('Sub', [e.op('Add', [last, e.i64(1)]), e.dimScalar(ids, 1)]) };
}

/** The static-cache contract of a routed layer (see the file comment; compiler/passes/cache-contract.ts for the two phases). */
export function staticCache(c: CacheContext): LayerCache {
  const g = c.model.graph;
  const { e, layer } = c;
  const l = layer.index;
  const seqAxis = kvSequenceAxis(layer.kv.layout);
  const pastLength = g.addInput(new Value(pastLengthName(l), tensorType(DataType.INT64, ['batch'])));
  // Valid keys after this call: the past and the row's selected tokens (0 when the layer is skipped).
  const valid = namedOutput(c, e.op('Add', [pastLength, c.routing.count]), presentLengthName(l), tensorType(DataType.INT64, ['batch']));
  recordStaticInputs(c.model, layer, seqAxis);
  // A windowed layer's positions buffer (see the file comment): its input, beside the cache's.
  // The slot each of this call's tokens has in the original buffer is its write index + t.
  const window = layer.attention.form === 'StandardAttention' ? staticWindow(layer.attention) : null;
  const write = layer.kv.writes?.key.input(2) ?? null;
  const windowed =
    window !== null && write
      ? { past: g.addInput(new Value(pastPositionsName(l), tensorType(DataType.INT64, ['batch', `max_sequence_length_${l}`]))), window, write }
      : null;
  return {
    oneToken: false,
    rewire() {
      const positions = rewireStatic(c, pastLength, valid, seqAxis, windowed);
      for (const t of [layer.kv.key, layer.kv.value]) {
        t.input.type = withDim(t.input.type, seqAxis, `max_sequence_length_${l}`);
        t.output.type = withDim(t.output.type, seqAxis, `max_sequence_length_${l}`);
      }
      return [...[layer.kv.key, layer.kv.value].map((t) => [t.output, t.input] as Carried), ...positions];
    },
  };
}

/**
 * Inside the layer: writes at past_lengths.l, valid keys up to past + count, causality by slot,
 * a window by original position. Returns the positions buffer's [present, past] pair, if any.
 */
function rewireStatic(
  c: CacheContext,
  pastLength: Value,
  valid: Value,
  seqAxis: number,
  windowed: { past: Value; window: number; write: Value } | null,
): Carried[] {
  const g = c.model.graph;
  const { e, layer } = c;
  const writes = layer.kv.writes!;
  const attention = layer.attention.form === 'StandardAttention' ? layer.attention.node : null;
  const like = (v: Value, x: Value | null) => (x?.dtype !== undefined && x.dtype !== DataType.INT64 ? e.cast(v, x.dtype) : v);
  const sub = c.substitutes();
  const mask = g.inputs.find((v) => v.name === 'attention_mask');
  if (mask) {
    // The buffer's valid slots, then this call's selected tokens.
    const past = c.call('PrefixMask', [pastLength, e.dimScalar(layer.kv.key.input, seqAxis)])[0]!;
    sub.set(mask, e.cast(e.op('Concat', [past, c.routing.valid], { axis: 1 }), mask.dtype ?? DataType.INT64));
  }
  const inputs = staticCacheInputs(g);
  if (inputs) {
    sub.set(inputs.write, like(pastLength, inputs.write));
    if (inputs.nonpad) sub.set(inputs.nonpad, like(valid, inputs.nonpad));
  }
  recomputeMasks(c, sub);
  // Whatever the original computed them from: this layer writes at its own valid length, and its
  // valid keys are those plus this call's selected tokens.
  for (const w of [writes.key, writes.value]) w.setInput(2, like(pastLength, w.input(2)));
  if (attention) attention.setInput(6, like(valid, attention.input(6)));
  // is_causal=1 with no mask aligns causality on nonpad_kv_seqlen - K, which holds only for rows
  // that selected all K tokens: state it by slot instead (key j visible to token i iff
  // j <= past_lengths.l + i; the selected tokens come first, in order).
  if (attention && !attention.input(3) && attention.attrInt('is_causal', 0) === 1) {
    const i = e.op('Range', [e.i64(0), e.dimScalar(c.routing.indices, 1), e.i64(1)]);
    const j = e.op('Range', [e.i64(0), e.dimScalar(layer.kv.key.input, seqAxis), e.i64(1)]);
    const last = e.op('Add', [e.unsqueeze(pastLength, [1]), e.unsqueeze(i, [0])]);
    attention.setInput(3, e.unsqueeze(e.op('LessOrEqual', [j, e.unsqueeze(last, [2])]), [1]));
    attention.setAttr(attribute('is_causal', 0));
  }
  return attention && windowed ? [windowByPosition(c, attention, windowed.write, pastLength, windowed.past, windowed.window)] : [];
}

/**
 * The window of a compacted static layer by original position (see the file comment): the
 * positions buffer out, and the Attention's attn_mask. Returns the [present, past] pair.
 */
function windowByPosition(c: CacheContext, attention: Node, write: Value, pastLength: Value, past: Value, window: number): Carried {
  const { e } = c;
  const l = c.layer.index;
  const t = e.op('Range', [e.i64(0), e.dimScalar(c.tokens, 1), e.i64(1)]);
  const slots = e.op('Add', [e.unsqueeze(e.cast(write, DataType.INT64), [1]), e.unsqueeze(t, [0])]);
  const selected = e.op('GatherElements', [slots, c.routing.indices], { axis: 1 });
  const present = e.op('TensorScatter', [past, selected, pastLength], { axis: 1 });
  namedOutput(c, present, presentPositionsName(l), tensorType(DataType.INT64, ['batch', `max_sequence_length_${l}`]));
  attention.setInput(3, c.call('WindowBias', [selected, present, e.i64(window)])[0]!);
  return [present, past];
}

/** The original's buffer length and the model's own write index and valid-key inputs, as metadata (read by runners). */
function recordStaticInputs(model: Model, layer: LayerInfo, seqAxis: number): void {
  const original = layer.kv.key.input.shape?.[seqAxis];
  if (typeof original === 'number' && !model.metadataProps.some((p) => p.key === STATIC_CACHE_LENGTH_KEY)) {
    model.metadataProps = [...model.metadataProps, { key: STATIC_CACHE_LENGTH_KEY, value: String(original) }];
  }
  // No converted layer reads them any more: runners find them by these names.
  const inputs = staticCacheInputs(model.graph);
  if (inputs && !model.metadataProps.some((p) => p.key === STATIC_CACHE_INPUTS_KEY)) {
    model.metadataProps = [
      ...model.metadataProps,
      { key: STATIC_CACHE_INPUTS_KEY, value: JSON.stringify({ write_indices: inputs.write.name, nonpad_kv_seqlen: inputs.nonpad?.name ?? null }) },
    ];
  }
}

/**
 * A standard Attention with its own past (growing cache), is_causal=1 and no attn_mask: a
 * routed layer's cache has slots that hold no token (batch padding, a row's unselected slots), so
 * the layer gets a mask of its valid keys ([B, 1, K, P + K]; `tokens` is K as a [1] tensor), and
 * is_causal=1 keeps causality (query i sees slot j <= P + i: this call's slots are the last K).
 */
export function maskCompactedKeys(e: Emitter, attention: Node, keep: Value, tokens: Value): void {
  const rows = e.op('Concat', [e.i64([1, 1]), tokens, e.i64([1])], { axis: 0 });
  attention.setInput(3, e.op('Expand', [e.unsqueeze(keep, [1, 2]), rows]));
}
