/**
 * Original positions for a compacted GroupQueryAttention layer (route-layers calls this when it
 * compacts a GQA layer's KV cache). The op numbers tokens by cache slot: its rotary angles
 * (do_rotary) and its sliding window (local_window_size) are computed from slot indices, and a
 * compacted cache holds only the layer's selected tokens, so slot distance is no longer
 * position distance. Here both are tied back to original positions:
 *
 *   pos_sel   = GatherElements(positions of this call's tokens, indices)     [B, K] int64
 *   rotary:   Q, K = com.microsoft RotaryEmbedding(Q or K, pos_sel, the op's cos/sin), do_rotary = 0
 *             (packed QKV split first; the op itself ignores position_ids in a prefill)
 *   window w: slot_pos = SlotPositions(past_positions.l, past_lengths.l, pos_sel)   [B, P_l + K]
 *             GQA input 10 (attention_bias) = WindowBias(pos_sel, slot_pos, w),  local_window_size = -1
 *             present_positions.l = slot_pos                                  (laid out like the op's present)
 *
 * A query at original position p then sees a key at original position q iff p - w < q <= p,
 * which is what the op computes on a full cache (where slot = position). The positions of this
 * call's tokens are the op's own: each row's count of real tokens before the token (the
 * exclusive cumulative sum of attention_mask), or the node's own position_ids input if it has one.
 *
 * Attention sinks (the `head_sink` input, gpt-oss style: one learned logit per head added to the
 * softmax denominator) depend on no position and pass through unchanged.
 */
import { GQA_ATTENTION_BIAS, GQA_POSITION_IDS, slotNumbered } from '../analysis/attention.js';
import type { AttentionCore } from '../analysis/types.js';
import { DataType } from '../core/ir/dtype.js';
import { attribute, type Graph, type Node, tensorType, Value } from '../core/ir/graph.js';
import { pastPositionsName, presentPositionsName } from '../metadata/decoder-io.js';
import type { Emitter } from './modc-ops/emitter.js';

const MS_DOMAIN = 'com.microsoft';

export interface PositionHook {
  graph: Graph;
  e: Emitter;
  /** Calls a modc op (in the stream's dtype). */
  call: (op: string, inputs: Value[]) => Value[];
  core: AttentionCore;
  layer: number;
  /** Compact's indices [B, K] of the selected tokens. */
  indices: Value;
  pastLength: Value;
  /** This call's positions [B, S] (callPositions), or null when the op takes position_ids. */
  positions: Value | null;
  /** Told of the selected tokens' positions gathered from `positions` (what they are when every token is selected). */
  gathered?: (selected: Value, all: Value) => void;
}

/** Whether a compacted GroupQueryAttention layer needs this call's positions from the mask (rotary or window by slot, no position_ids input). */
export function needsCallPositions(core: AttentionCore): boolean {
  const s = slotNumbered(core);
  return !!s && (s.rotary || s.window !== null) && !s.node.input(GQA_POSITION_IDS);
}

/**
 * Rewires a compacted GroupQueryAttention node to original positions (see the file comment).
 * Returns the [computed, passed when the layer is skipped] pairs of new cache state
 * (present_positions.l / past_positions.l) for the layer's If; none when the layer has no window.
 */
export function originalPositions(h: PositionHook): [Value, Value][] {
  const s = slotNumbered(h.core);
  if (!s || (!s.rotary && s.window === null)) return [];
  const { e, graph: g } = h;
  const given = s.node.input(GQA_POSITION_IDS);
  const positions = given ? e.cast(given, DataType.INT64) : e.op('GatherElements', [h.positions!, h.indices], { axis: 1 });
  if (!given) h.gathered?.(positions, h.positions!);
  if (s.rotary) rotaryOutside(h, s.node, positions);
  if (s.window === null) return [];

  const past = g.addInput(new Value(pastPositionsName(h.layer), tensorType(DataType.INT64, ['batch', `past_sequence_length_${h.layer}`])));
  const slots = h.call('SlotPositions', [past, h.pastLength, positions])[0]!;
  s.node.setAttr(attribute('local_window_size', -1));
  s.node.setInput(GQA_ATTENTION_BIAS, h.call('WindowBias', [positions, slots, e.i64(s.window)])[0]!);
  // The op's present holds P_l + K slots per row, each row's valid slots first: so do the positions.
  slots.name = g.uniqueName(presentPositionsName(h.layer));
  slots.type = tensorType(DataType.INT64, ['batch', `present_sequence_length_${h.layer}`]);
  g.outputs.push(slots);
  return [[slots, past]];
}

/**
 * do_rotary moved out of the op: com.microsoft RotaryEmbedding on Q and K with the tokens'
 * original positions and the op's own cos/sin caches, then GroupQueryAttention with
 * do_rotary=0. (With do_rotary the op ignores position_ids in a call whose length is the whole
 * sequence, a prefill, and rotates by slot there.) Packed QKV is split first.
 */
function rotaryOutside(h: PositionHook, node: Node, positions: Value): void {
  const { e } = h;
  const heads = h.core.numHeads;
  const kvHeads = h.core.kv.numKvHeads;
  const size = h.core.kv.headSize;
  let [q, k, v] = [node.input(0)!, node.input(1), node.input(2)];
  if (!k || !v) {
    const sizes = [heads * size, kvHeads * size, kvHeads * size];
    const parts = e.opset >= 13 ? e.node('Split', [q, e.i64(sizes)], { axis: 2 }, 3) : e.node('Split', [q], { axis: 2, split: sizes }, 3);
    [q, k, v] = parts as [Value, Value, Value];
  }
  const cos = node.input(7)!;
  const rotaryDim = cos.initializer?.dims[1];
  const rotate = (x: Value, n: number) =>
    e.node(
      'RotaryEmbedding',
      [x, positions, cos, node.input(8)!],
      {
        interleaved: node.attrInt('rotary_interleaved', 0) ?? 0,
        num_heads: n,
        ...(typeof rotaryDim === 'number' && rotaryDim * 2 !== size ? { rotary_embedding_dim: rotaryDim * 2 } : {}),
      },
      1,
      MS_DOMAIN,
    )[0]!;
  const inputs = [...node.inputs];
  inputs[0] = rotate(q, heads);
  inputs[1] = rotate(k, kvHeads);
  inputs[2] = v;
  inputs[7] = null;
  inputs[8] = null;
  while (inputs.length && !inputs.at(-1)) inputs.pop();
  node.setInputs(inputs);
  node.setAttr(attribute('do_rotary', 0));
}

const sharedPositions = new WeakMap<Graph, Value>();

/**
 * Original positions of this call's tokens [B, S], each row's real tokens before each one: made
 * once per graph with `e` (the main graph's emitter) and shared by every layer that needs them.
 */
export function callPositions(graph: Graph, e: Emitter, tokens: Value): Value {
  let positions = sharedPositions.get(graph);
  if (positions) return positions;
  const mask = graph.inputs.find((v) => v.name === 'attention_mask')!;
  const counts = e.op('CumSum', [e.cast(mask, DataType.INT64), e.i64(1)], { exclusive: 1 });
  const total = e.dim(mask, 1);
  positions = e.op('Slice', [counts, e.op('Sub', [total, e.dim(tokens, 1)]), total, e.i64([1])]);
  sharedPositions.set(graph, positions);
  return positions;
}
