/**
 * The KV cache of a routed layer (route-layers, docs/interface.md): the layer caches its
 * selected tokens only, so it gets a cache interface of its own. The contract follows how the
 * layer's attention appends:
 *
 * - Concat semantics (the unfused `Concat(past, new)`, MultiHeadAttention, ORT's Attention with a
 *   combined past, the standard Attention with past/present): the present is the layer's own
 *   append of this call's K slots, made where the original makes it. Which slots hold a token
 *   travels with the cache as a mask:
 *
 *       past_valid.l     bool [B, P_l]                      in
 *       keys             = Concat(past_valid.l, valid)       [B, P_l + K]: the layer's keys mask,
 *                          fed to the model's own mask nodes in place of attention_mask
 *       present_valid.l  = keys                              out (past_valid.l when the layer is skipped)
 *
 *   A row that selected fewer than K tokens leaves invalid slots ("holes") at the end of its K.
 *   At batch 1 there are none; a runner compacts them when it likes (ModSession does).
 * - GroupQueryAttention: the op writes each row's K slots at the row's own length (seqlens_k), so
 *   its cache is packed by construction: `past_lengths.l` in, `present_lengths.l` =
 *   `past_lengths.l` + count out; rotary angles and the window move to original positions
 *   (compiler/passes/window-mask.ts).
 * - Static caches (TensorScatter buffers): compiler/passes/static-cache.ts, `past_lengths.l` as the
 *   layer's write index.
 *
 * Each contract is set up in two phases: `layerCache` adds the inputs and the outputs computed in
 * the main graph (lengths: no If needed, the count is 0 for every row of a skipped layer), then
 * `rewire` adds what runs inside the layer's If and returns the values the If hands on.
 */
import { isStaticLayout, kvSequenceAxis } from '../analysis/types.js';
import { causalKeyBias, causalKeyMask } from '../analysis/attention.js';
import { DataType, lowestFinite } from '../core/ir/dtype.js';
import { attribute, tensorType, Value } from '../core/ir/graph.js';
import type { Emitter } from './modc-ops/emitter.js';
import {
  pastLengthName,
  pastSequenceIndicesName,
  pastValidName,
  presentLengthName,
  presentSequenceIndicesName,
  presentValidName,
} from '../metadata/decoder-io.js';
import { callerMask, maskFill, sequenceLengthInput } from './caller-mask.js';
import { type CacheContext, type Carried, cacheTensors, type LayerCache, namedOutput, ownLengthDims, recomputeMasks } from './cache-contract.js';
import { maskCompactedKeys, staticCache } from './static-cache.js';
import { callPositions, needsCallPositions, originalPositions } from './window-mask.js';

/** Phase one of the layer's cache contract (see the file comment); `rewire` is phase two. */
export function layerCache(c: CacheContext): LayerCache {
  const kv = c.layer.kv;
  if (isStaticLayout(kv.layout)) return staticCache(c);
  if (c.layer.attention.form === 'GroupQueryAttention') return prefixCache(c);
  return validityCache(c);
}

/** Concat semantics: per-slot validity (see the file comment). */
function validityCache(c: CacheContext): LayerCache {
  const g = c.model.graph;
  const l = c.layer.index;
  const pastValid = g.addInput(new Value(pastValidName(l), tensorType(DataType.BOOL, ['batch', `past_sequence_length_${l}`])));
  return {
    oneToken: true,
    rewire() {
      const { e } = c;
      const keys = e.op('Concat', [pastValid, c.routing.valid], { axis: 1 });
      const sub = c.substitutes();
      const mask = g.inputs.find((v) => v.name === 'attention_mask');
      const caller = callerMask(g);
      const carried: Carried[] = [];
      if (caller) carried.push(callerMaskKeys(c, caller, keys, sub));
      else if (mask) sub.set(mask, e.cast(keys, mask.dtype ?? DataType.INT64));
      const attention = c.layer.attention;
      // A mask that is causality and attention_mask's keys, nothing else: is_causal=1 and the layer's own keys say it.
      if (attention.form === 'StandardAttention' && causalKeyMask(attention)) {
        attention.node.setAttr(attribute('is_causal', 1));
        attention.node.setInput(3, null);
      }
      // Unfused attention whose additive mask is the same two things: that bias from the layer's own keys.
      const bias = e.opset >= 14 ? causalKeyBias(attention) : null;
      const biasType = bias?.add.input(bias.slot)?.dtype ?? DataType.FLOAT;
      const lowest = biasType === DataType.BFLOAT16 ? null : lowestFinite(biasType);
      if (bias && lowest !== null) {
        const causal = causalKeysBias(e, keys, pastValid, c.routing.valid, biasType, lowest);
        bias.add.setInput(bias.slot, causal);
        // One query at the end of the keys reads every valid key: no Trilu, and the [1, T] bias of one row broadcasts as it is.
        c.stepForms?.set(causal, (of) => e.op('Where', [of(keys), e.scalar(0, biasType), e.scalar(lowest, biasType)]));
      }
      recomputeMasks(c, sub);
      // A standard Attention causal by is_causal=1 alone: the holes and padding slots masked too.
      if (attention.form === 'StandardAttention' && !attention.node.input(3)) {
        maskCompactedKeys(e, attention.node, keys, e.dim(c.routing.valid, 1));
        // One query: the keys mask as it is broadcasts over the query axis.
        c.stepForms?.set(attention.node.input(3)!, (of) => e.unsqueeze(of(keys), [1, 2]));
      }
      ownLengthDims(c.layer);
      const presentValid = namedOutput(c, keys, presentValidName(l), tensorType(DataType.BOOL, ['batch', `present_sequence_length_${l}`]));
      return [...cacheTensors(c.layer).map((t) => [t.output, t.input] as Carried), [presentValid, pastValid], ...carried];
    },
  };
}

/**
 * The additive bias [B, 1, K, P + K] of a compacted layer's unfused attention: 0 where query slot
 * i may read slot j (a valid key and j <= P + i: this call's slots are the last K of `keys`), the
 * dtype's lowest value elsewhere, as the model's own causal bias has it. A query slot that holds
 * no token (`valid` false) reads nothing; its output is dropped at the scatter. Seven kernels,
 * where a copy of the model's mask nodes is a dozen or more. Float, float16 or double (Where has
 * no bfloat16 kernel on CPU: a bfloat16 mask is rebuilt as before).
 */
function causalKeysBias(e: Emitter, keys: Value, past: Value, valid: Value, dtype: number, lowest: number): Value {
  const pairs = e.op('And', [e.unsqueeze(valid, [1, 3]), e.unsqueeze(keys, [1, 2])]);
  const allowed = e.op('Trilu', [pairs, e.dimScalar(past, 1)], { upper: 0 });
  return e.op('Where', [allowed, e.scalar(0, dtype), e.scalar(lowest, dtype)]);
}

/**
 * A caller's 4-D mask (compiler/passes/caller-mask.ts): the layer reads the caller's entries at
 * each key slot's sequence index, carried as `past_sequence_indices.l` / `present_sequence_indices.l`
 * (laid out like the cache). Returns that pair.
 */
function callerMaskKeys(c: CacheContext, caller: Value, keys: Value, sub: Map<Value, Value>): Carried {
  const g = c.model.graph;
  const { e } = c;
  const l = c.layer.index;
  const fresh = e.op('Add', [e.unsqueeze(sequenceLengthInput(c.model, e), [1]), c.routing.indices]);
  const past = g.addInput(new Value(pastSequenceIndicesName(l), tensorType(DataType.INT64, ['batch', `past_sequence_length_${l}`])));
  const seq = e.op('Concat', [past, fresh], { axis: 1 });
  sub.set(caller, c.call('GatherMask', [caller, seq, seq, keys, maskFill(e, caller)])[0]!);
  return [namedOutput(c, seq, presentSequenceIndicesName(l), tensorType(DataType.INT64, ['batch', `present_sequence_length_${l}`])), past];
}

/**
 * GroupQueryAttention's seqlens_k (int32 [B]) and total_sequence_length (an int32 scalar), when
 * the op reads them from side inputs to rebuild: made from the layer's own key counts (`keys`
 * per row, `total` slots) instead of the model's mask nodes rebuilt on a PrefixMask, a dozen
 * kernels fewer per layer and step. Only the op's own inputs change; a side input something
 * else in the layer reads is rebuilt as before. Returns the side inputs nothing else reads.
 */
function directLengths(c: CacheContext, keys: Value, total: Value): Set<Value> {
  const { e } = c;
  const a = c.layer.attention;
  const done = new Set<Value>();
  if (a.form !== 'GroupQueryAttention') return done;
  const node = a.node;
  const direct: [number, () => Value][] = [
    [5, () => e.cast(e.op('Sub', [keys, e.i64(1)]), DataType.INT32)],
    [6, () => e.cast(total, DataType.INT32)],
  ];
  for (const [index, make] of direct) {
    const v = node.input(index);
    if (!v || !c.recompute.includes(v)) continue;
    node.setInput(index, make());
    if (![...v.uses].some((u) => c.region.has(u.node))) done.add(v);
  }
  return done;
}

/** GroupQueryAttention: each row's valid slots first, by construction of the op (see the file comment). */
function prefixCache(c: CacheContext): LayerCache {
  const g = c.model.graph;
  const l = c.layer.index;
  const { e, routing } = c;
  const pastLength = g.addInput(new Value(pastLengthName(l), tensorType(DataType.INT64, ['batch'])));
  // The count from the selection itself, not the compaction's: a one-token call does not compact.
  const count = e.reduceSum(e.cast(routing.selected, DataType.INT64), [1], false);
  namedOutput(c, e.op('Add', [pastLength, count]), presentLengthName(l), tensorType(DataType.INT64, ['batch']));
  const callPos = needsCallPositions(c.layer.attention) ? callPositions(g, e, c.tokens) : null;
  return {
    oneToken: true,
    rewire() {
      const seqAxis = kvSequenceAxis(c.layer.kv.layout);
      // Row b's keys are its past_lengths[b] slots and this call's K: seqlens_k = past + K - 1.
      // K off the slots' validity [B, K] (the indices' shape): a one-token call then reads no indices.
      const k1 = e.dim(routing.valid, 1);
      const direct = directLengths(c, e.op('Add', [pastLength, k1]), e.op('Add', [e.dim(c.layer.kv.key.input, seqAxis), k1]));
      const rest = c.recompute.filter((v) => !direct.has(v));
      if (rest.length) {
        const k = e.dimScalar(routing.valid, 1);
        const capacity = e.dimScalar(c.layer.kv.key.input, seqAxis);
        const sub = c.substitutes();
        const mask = g.inputs.find((v) => v.name === 'attention_mask');
        const keys = c.call('PrefixMask', [e.op('Add', [pastLength, k]), e.op('Add', [capacity, k])])[0]!;
        if (mask) sub.set(mask, e.cast(keys, mask.dtype ?? DataType.INT64));
        recomputeMasks({ ...c, recompute: rest }, sub);
      }
      const positions = originalPositions({
        graph: g,
        e,
        call: c.call,
        core: c.layer.attention,
        layer: l,
        indices: routing.indices,
        pastLength,
        positions: callPos,
        gathered: (selected, all) => c.stepSubs?.set(selected, all),
      });
      ownLengthDims(c.layer);
      return [...cacheTensors(c.layer).map((t) => [t.output, t.input] as Carried), ...positions];
    },
  };
}
