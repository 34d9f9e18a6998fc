/**
 * The `modc` op domain: the routing primitives of a Mixture-of-Depths layer. Each op is an ONNX
 * function body (so compiled models run on stock ONNX Runtime, CPU or CUDA, with no native
 * library); `kernels.ts` has the TypeScript kernel each body is tested against.
 *
 * Shapes: B batch rows, S tokens in this call, H hidden size, K selected slots per row
 * (K = max over rows of the selected count, at least 1, so no tensor is ever empty).
 *
 * | op                 | inputs                                                   | outputs                        |
 * |--------------------|----------------------------------------------------------|--------------------------------|
 * | Router             | x T[B,S,H], weight T'[H], bias T'[] or [1]              | score float[B,S]               |
 * | SelectThreshold    | score float[B,S], token_mask int or bool[B,S], threshold float[] | selected bool[B,S]     |
 * | SelectTopK         | score, token_mask, capacity float[], past_length int64[] | selected bool[B,S]             |
 * | TokenGrid          | token_mask bool[B,S]                                      | first int64[S], rest int64[S], rows int64[B,1,2] |
 * | CompactTokens      | selected bool[B,S], first, rest, rows (TokenGrid's)       | indices int64[B,K], valid bool[B,K], count int64[B], slots int64[B,K,2], any bool[1] |
 * | Compact            | selected bool[B,S]                                        | indices int64[B,K], valid bool[B,K], count int64[B] |
 * | ScatterTokens      | x T[B,S,H], slots int64[B,K,2], valid, x_sel T[B,K,H], y T[B,K,H] | T[B,S,H]               |
 * | ScatterTokensGated | same + gate float[B,K]                                    | T[B,S,H]                       |
 * | GatherMask         | mask M[B|1,h,Sq,T], q_idx int64[B,K], k_idx int64[B,K2], k_valid bool[B,K2], fill M[] | M[B,h,K,K2] |
 * | PrefixMask         | lengths int64[B], total int64[]                           | bool[B,total]: j < lengths[b]  |
 * | SlotPositions      | past_positions int64[B,P], past_length int64[B], positions int64[B,K] | int64[B,P+K]: the original position of each key slot |
 * | WindowBias         | query_positions int64[B,K], key_positions int64[B,T], window int64[] | T[B,1,K,T]: 0 or lowest |
 * | KeyMask            | past_length int64[B], past_capacity int64[], valid bool[B,K] | bool[B,P+K]: a layer's valid keys |
 * | GatherKv(Combined) | kv [B,H,T,D] or [2,B,H,T,D], indices int64[B,K]             | the same with T = K: a per-row gather |
 * | KvCodes            | positions int64[B,S], keep bool[B,S], sinks int64[]       | int64[B,S]: p, or -1 - p for an entry held for good |
 * | KvVisible          | query_positions int64[B,S], codes int64[B,T], window int64[] | bool[B,1,S,T]: key/value routing's visibility |
 * | KvRetain           | codes int64[B,T], valid bool[B,T], last int64[B], window int64[] | bool[B,T]: the entries a kv layer's cache keeps |
 *
 * Semantics (SPEC.md): score = w.x + b in fp32; threshold-p selects r = sigmoid(score) >= p;
 * top-k selects per row the ceil(c * n) highest scores among the n real tokens (ceil taken of
 * the float32 product; ties to the earlier token), and in a one-token step with a past
 * (S = 1, past_length > 0) falls back to r >= 0.5. Padding (token_mask = 0) is never selected.
 * Compact lists each row's selected positions in ascending order, then pads the row up to K
 * with its lowest unselected positions, marked invalid: every index in a row is distinct, so a
 * scatter never writes one position twice, and padded slots write back the value they read.
 * CompactTokens is Compact for a call's tokens, with what every layer shares (the sort keys of
 * each position, the row numbers) computed once by TokenGrid: it also gives each slot as a
 * (row, position) pair, which GatherND and ScatterND take as they are, and whether any row
 * selects a token (the condition that skips the layer).
 */
import { DataType, lowestFinite } from '../../core/ir/dtype.js';
import type { Value } from '../../core/ir/graph.js';
import type { Emitter } from './emitter.js';
import { scoreCut } from './kernels.js';

export interface OpContext {
  /** Element type of the residual stream (float or float16). */
  dtype: number;
}

export interface ModcOpDef {
  name: string;
  inputs: string[];
  outputs: string[];
  doc: string;
  body(e: Emitter, inputs: Value[], ctx: OpContext): Value[];
}

const router: ModcOpDef = {
  name: 'Router',
  inputs: ['x', 'weight', 'bias'],
  outputs: ['score'],
  doc: 'score = x . weight + bias per token, computed in float32',
  body(e, [x, w, b]) {
    const xf = e.cast(x!, DataType.FLOAT);
    const wf = e.cast(w!, DataType.FLOAT);
    const bf = e.cast(b!, DataType.FLOAT);
    return [e.op('Add', [e.op('MatMul', [xf, wf]), bf])];
  },
};

const selectThreshold: ModcOpDef = {
  name: 'SelectThreshold',
  inputs: ['score', 'token_mask', 'score_cut'],
  outputs: ['selected'],
  doc: 'selected = score >= score_cut (sigmoid(score) >= p for score_cut = scoreCut(p)), and never padding',
  body(e, [score, mask, cut]) {
    return [e.op('And', [e.greaterOrEqual(score!, cut!), e.cast(mask!, DataType.BOOL)])];
  },
};

/** The name of a top-k selection's If on "this call is a one-token step with a past" (inlined copies add a prefix or suffix). */
export const DECODE_STEP_IF = 'modc_decode_step';

const selectTopK: ModcOpDef = {
  name: 'SelectTopK',
  inputs: ['score', 'token_mask', 'capacity', 'past_length'],
  outputs: ['selected'],
  doc: 'per row, the ceil(capacity * real tokens) highest scores (ties: earlier token); one-token steps with a past: sigmoid(score) >= 0.5',
  body(e, [score, mask, capacity, pastLength]) {
    // Read off the token mask and past length every router shares, so that ONNX Runtime computes
    // the condition once per call. A decode step runs only the threshold test; prompts sort.
    const s = e.dimScalar(mask!, 1);
    const isStep = e.op('And', [e.op('Equal', [s, e.i64(1)]), e.op('Greater', [pastLength!, e.i64(0)])]);
    const [selected] = e.ifThenElse(
      isStep,
      (t) => [t.op('And', [t.greaterOrEqual(score!, t.f32(scoreCut(0.5))), t.cast(mask!, DataType.BOOL)])],
      (p) => [topKOf(p, score!, mask!, capacity!)],
      [DataType.BOOL],
      DECODE_STEP_IF,
    );
    return [selected!];
  },
};

/** Per row, the ceil(capacity * real tokens) highest scores among the real tokens (ties: earlier token). */
function topKOf(e: Emitter, score: Value, mask: Value, capacity: Value): Value {
  const real = e.cast(mask, DataType.BOOL);
  const n = e.reduceSum(e.cast(mask, DataType.FLOAT), [1], true);
  const k = e.op('Ceil', [e.op('Mul', [capacity, n])]);
  const masked = e.op('Where', [real, score, e.f32(lowestFinite(DataType.FLOAT)!)]);
  const s = e.dimScalar(score, 1);
  const [, order] = e.node('TopK', [masked, e.dim(score, 1)], { axis: 1, largest: 1, sorted: 1 }, 2);
  const ranks = e.cast(e.op('Range', [e.i64(0), s, e.i64(1)]), DataType.FLOAT);
  const chosenInOrder = e.cast(e.op('Less', [ranks, k]), DataType.FLOAT);
  const zeros = e.op('ConstantOfShape', [e.op('Shape', [score])]);
  const chosen = e.op('ScatterElements', [zeros, order!, chosenInOrder], { axis: 1 });
  return e.op('And', [e.cast(chosen, DataType.BOOL), real]);
}

/** Each row's selected count [B] (of `chosen`, the selection as int64), the largest [1], and K = max(largest, 1) [1]. */
function selectedCounts(e: Emitter, chosen: Value): { count: Value; most: Value; k: Value } {
  const count = e.reduceSum(chosen, [1], false);
  const most = e.reduceMax(count, [0], true);
  // Max takes int64 from opset 12.
  const k = e.opset >= 12 ? e.op('Max', [most, e.i64([1])]) : e.reduceMax(e.op('Concat', [most, e.i64([1])], { axis: 0 }), [0], true);
  return { count, most, k };
}

const compact: ModcOpDef = {
  name: 'Compact',
  inputs: ['selected'],
  outputs: ['indices', 'valid', 'count'],
  doc: "each row's selected positions in order, padded to K with unselected positions marked invalid",
  body(e, [selected]) {
    const s = e.dimScalar(selected!, 1);
    const chosen = e.cast(selected!, DataType.INT64);
    // Selected tokens sort first (keys S - t in (0, S]), unselected after (keys -t in (-S, 0]), each group by position t.
    const key = e.op('Sub', [e.op('Mul', [chosen, s]), e.op('Range', [e.i64(0), s, e.i64(1)])]);
    const { count, k } = selectedCounts(e, chosen);
    const [values, indices] = e.node('TopK', [key, k], { axis: 1, largest: 1, sorted: 1 }, 2);
    return [indices!, e.op('Greater', [values!, e.i64(0)]), count];
  },
};

const tokenGrid: ModcOpDef = {
  name: 'TokenGrid',
  inputs: ['token_mask'],
  outputs: ['first', 'rest', 'rows'],
  doc: "CompactTokens' shared inputs for a call's [B,S] tokens: first[t] = S - t, rest[t] = -t, rows[b] = (b, 0)",
  body(e, [mask]) {
    const s = e.dimScalar(mask!, 1);
    const t = e.op('Range', [e.i64(0), s, e.i64(1)]);
    const rows = e.op('Range', [e.i64(0), e.dimScalar(mask!, 0), e.i64(1)]);
    return [e.op('Sub', [s, t]), e.op('Neg', [t]), e.op('Mul', [e.op('Reshape', [rows, e.i64([-1, 1, 1])]), e.i64([1, 0])])];
  },
};

const compactTokens: ModcOpDef = {
  name: 'CompactTokens',
  inputs: ['selected', 'first', 'rest', 'rows'],
  outputs: ['indices', 'valid', 'count', 'slots', 'any'],
  doc: 'Compact(selected), each slot also as its (row, position) pair, and whether any row selects a token',
  body(e, [selected, first, rest, rows]) {
    const { count, most, k } = selectedCounts(e, e.cast(selected!, DataType.INT64));
    // The keys of Compact: selected positions first (S - t > 0), the rest after (-t <= 0), each group by position.
    const [values, indices] = e.node('TopK', [e.op('Where', [selected!, first!, rest!]), k], { axis: 1, largest: 1, sorted: 1 }, 2);
    const slots = e.op('Add', [e.op('Mul', [e.unsqueeze(indices!, [2]), e.i64([0, 1])]), rows!]);
    return [indices!, e.op('Greater', [values!, e.i64(0)]), count, slots, e.op('Greater', [most, e.i64(0)])];
  },
};

/**
 * x with the valid slots' (row, position) pairs set to `updates` and the padded ones to what they
 * read: one ScatterND, which copies a whole hidden row per pair (ScatterElements, its indices
 * broadcast over the hidden size, walks them element by element: 18x slower on ORT's CPU).
 */
function scatterValid(e: Emitter, x: Value, slots: Value, valid: Value, updates: Value, xSel: Value): Value {
  return e.op('ScatterND', [x, slots, e.op('Where', [e.unsqueeze(valid, [2]), updates, xSel])]);
}

const scatterTokens: ModcOpDef = {
  name: 'ScatterTokens',
  inputs: ['x', 'slots', 'valid', 'x_sel', 'y'],
  outputs: ['out'],
  doc: 'out = x with out[slots[b,k]] = y[b,k] where valid (ungated: selected tokens take the layer output exactly)',
  body(e, [x, slots, valid, xSel, y]) {
    return [scatterValid(e, x!, slots!, valid!, y!, xSel!)];
  },
};

const scatterTokensGated: ModcOpDef = {
  name: 'ScatterTokensGated',
  inputs: ['x', 'slots', 'valid', 'x_sel', 'y', 'gate'],
  outputs: ['out'],
  doc: 'out = x with out[slots[b,k]] = x_sel + gate * (y - x_sel) where valid',
  body(e, [x, slots, valid, xSel, y, gate], ctx) {
    const g = e.unsqueeze(e.cast(gate!, ctx.dtype), [2]);
    const mixed = e.op('Add', [xSel!, e.op('Mul', [g, e.op('Sub', [y!, xSel!])])]);
    return [scatterValid(e, x!, slots!, valid!, mixed, xSel!)];
  },
};

const gatherMask: ModcOpDef = {
  name: 'GatherMask',
  inputs: ['mask', 'q_idx', 'k_idx', 'k_valid', 'fill'],
  outputs: ['out'],
  doc: 'out[b,h,i,j] = mask[b,h,q_idx[b,i],k_idx[b,j]] where k_valid[b,j], else fill',
  body(e, [mask, qIdx, kIdx, kValid, fill]) {
    const b = e.dim(qIdx!, 0);
    const h = e.dim(mask!, 1);
    const sq = e.dim(mask!, 2);
    const t = e.dim(mask!, 3);
    const k = e.dim(qIdx!, 1);
    const k2 = e.dim(kIdx!, 1);
    const full = e.op('Expand', [mask!, e.op('Concat', [b, h, sq, t], { axis: 0 })]);
    const qi = e.op('Expand', [e.op('Reshape', [qIdx!, e.i64([0, 1, -1, 1])]), e.op('Concat', [b, h, k, t], { axis: 0 })]);
    const rows = e.op('GatherElements', [full, qi], { axis: 2 });
    const ki = e.op('Expand', [e.op('Reshape', [kIdx!, e.i64([0, 1, 1, -1])]), e.op('Concat', [b, h, k, k2], { axis: 0 })]);
    const cols = e.op('GatherElements', [rows, ki], { axis: 3 });
    return [e.op('Where', [e.op('Reshape', [kValid!, e.i64([0, 1, 1, -1])]), cols, fill!])];
  },
};

/** j < lengths[b] for j in [0, total): valid-prefix masks (right padding). */
function prefixMask(e: Emitter, lengths: Value, total: Value): Value {
  const j = e.op('Range', [e.i64(0), total, e.i64(1)]);
  return e.op('Less', [e.unsqueeze(j, [0]), e.unsqueeze(lengths, [1])]);
}

const prefixMaskOp: ModcOpDef = {
  name: 'PrefixMask',
  inputs: ['lengths', 'total'],
  outputs: ['mask'],
  doc: 'mask[b, j] = j < lengths[b], j in [0, total)',
  body(e, [lengths, total]) {
    return [prefixMask(e, lengths!, total!)];
  },
};

/**
 * Key slots of a compacted GroupQueryAttention layer, as the op lays them out (it writes this
 * call's keys at each row's own past length): row b's valid cache slots, then this call's K
 * slots, then the rest of its cache (padding). A permutation of Concat(past, positions).
 */
const slotPositions: ModcOpDef = {
  name: 'SlotPositions',
  inputs: ['past_positions', 'past_length', 'positions'],
  outputs: ['slot_positions'],
  doc: 'out[b, t] = past_positions[b, t] for t < past_length[b], positions[b, t - past_length[b]] for the next K slots, then past_positions[b, t - K]',
  body(e, [past, pastLength, positions]) {
    const p = e.dimScalar(past!, 1);
    const k = e.dimScalar(positions!, 1);
    const t = e.unsqueeze(e.op('Range', [e.i64(0), e.op('Add', [p, k]), e.i64(1)]), [0]);
    const len = e.unsqueeze(pastLength!, [1]);
    const current = e.op('Add', [p, e.op('Sub', [t, len])]);
    const rest = e.op('Sub', [t, k]);
    const idx = e.op('Where', [e.op('Less', [t, len]), t, e.op('Where', [e.op('Less', [t, e.op('Add', [len, k])]), current, rest])]);
    const all = e.op('Concat', [past!, positions!], { axis: 1 });
    return [e.op('GatherElements', [all, idx], { axis: 1 })];
  },
};

/**
 * Sliding-window attention by original position, as an additive bias for GroupQueryAttention:
 * a query at position p sees a key at position q iff p - window < q <= p (ONNX Runtime's
 * local_window_size convention: the query and the window - 1 keys before it).
 */
const windowBias: ModcOpDef = {
  name: 'WindowBias',
  inputs: ['query_positions', 'key_positions', 'window'],
  outputs: ['bias'],
  doc: 'bias[b, 0, i, j] = 0 where query_positions[b,i] - window < key_positions[b,j] <= query_positions[b,i], else the lowest value of T',
  body(e, [queryPositions, keyPositions, window], ctx) {
    const q = e.op('Reshape', [queryPositions!, e.i64([0, 1, -1, 1])]);
    const k = e.op('Reshape', [keyPositions!, e.i64([0, 1, 1, -1])]);
    const visible = e.op('And', [e.op('Not', [e.op('Greater', [k, q])]), e.op('Greater', [k, e.op('Sub', [q, window!])])]);
    if (ctx.dtype === DataType.BFLOAT16) {
      // Where has no bfloat16 kernel on CPU: choose in float32, then cast (bfloat16's lowest finite value is exact in float32).
      return [e.cast(e.op('Where', [visible, e.f32(0), e.f32(lowestFinite(DataType.BFLOAT16)!)]), DataType.BFLOAT16)];
    }
    const lowest = ctx.dtype === DataType.FLOAT16 ? lowestFinite(DataType.FLOAT16)! : lowestFinite(DataType.FLOAT)!;
    return [e.op('Where', [visible, e.scalar(0, ctx.dtype), e.scalar(lowest, ctx.dtype)])];
  },
};

/**
 * Key/value routing (SPEC.md, "Key/value routing"): each cache entry carries a code, its original
 * position p while it may still leave the cache with the window, or -1 - p once it is held for
 * good (one of the first `sinks` tokens, or a token its router kept).
 */
const keyMask: ModcOpDef = {
  name: 'KeyMask',
  inputs: ['past_length', 'past_capacity', 'valid'],
  outputs: ['mask'],
  doc: "a layer's valid keys: its cache slots j < past_length[b], then this call's valid slots",
  body(e, [pastLength, capacity, valid]) {
    return [e.op('Concat', [prefixMask(e, pastLength!, capacity!), valid!], { axis: 1 })];
  },
};

/** Gathers `indices` [B,K] along the sequence axis of a [.., B, H, T, D] cache (batch at `batchAxis`). */
function gatherSequence(e: Emitter, kv: Value, indices: Value, batchAxis: 0 | 1): Value {
  const seqAxis = batchAxis + 2;
  const k = e.dim(indices, 1);
  const lead = batchAxis === 1 ? [e.dim(kv, 0)] : [];
  const target = e.op('Concat', [...lead, e.dim(kv, batchAxis), e.dim(kv, batchAxis + 1), k, e.dim(kv, seqAxis + 1)], { axis: 0 });
  const shaped = e.unsqueeze(indices, batchAxis === 1 ? [0, 2, 4] : [1, 3]);
  return e.op('GatherElements', [kv, e.op('Expand', [shaped, target])], { axis: seqAxis });
}

const gatherKv: ModcOpDef = {
  name: 'GatherKv',
  inputs: ['kv', 'indices'],
  outputs: ['out'],
  doc: 'out[b,h,k,d] = kv[b,h,indices[b,k],d]',
  body(e, [kv, indices]) {
    return [gatherSequence(e, kv!, indices!, 0)];
  },
};

const gatherKvCombined: ModcOpDef = {
  name: 'GatherKvCombined',
  inputs: ['kv', 'indices'],
  outputs: ['out'],
  doc: 'out[i,b,h,k,d] = kv[i,b,h,indices[b,k],d] for the combined [2,B,H,T,D] cache',
  body(e, [kv, indices]) {
    return [gatherSequence(e, kv!, indices!, 1)];
  },
};

const kvCodes: ModcOpDef = {
  name: 'KvCodes',
  inputs: ['positions', 'keep', 'sinks'],
  outputs: ['codes'],
  doc: 'codes[b, s] = -1 - positions[b, s] where keep[b, s] or positions[b, s] < sinks (held for good), else positions[b, s]',
  body(e, [positions, keep, sinks]) {
    const held = e.op('Or', [keep!, e.op('Less', [positions!, sinks!])]);
    return [e.op('Where', [held, e.op('Sub', [e.i64(-1), positions!]), positions!])];
  },
};

const kvVisible: ModcOpDef = {
  name: 'KvVisible',
  inputs: ['query_positions', 'codes', 'window'],
  outputs: ['visible'],
  doc: 'visible[b, 0, i, j] = codes[b, j] < 0 (held for good) or query_positions[b, i] - codes[b, j] < window',
  body(e, [queryPositions, codes, window]) {
    const q = e.op('Reshape', [queryPositions!, e.i64([0, 1, -1, 1])]);
    const c = e.op('Reshape', [codes!, e.i64([0, 1, 1, -1])]);
    return [e.op('Or', [e.op('Less', [c, e.i64(0)]), e.op('Less', [e.op('Sub', [q, c]), window!])])];
  },
};

const kvRetain: ModcOpDef = {
  name: 'KvRetain',
  inputs: ['codes', 'valid', 'last', 'window'],
  outputs: ['retain'],
  doc: "retain[b, j] = valid[b, j] and (codes[b, j] < 0 or codes[b, j] > last[b] - window): what stays after the row's last token",
  body(e, [codes, valid, last, window]) {
    const oldest = e.unsqueeze(e.op('Sub', [last!, window!]), [1]);
    return [e.op('And', [valid!, e.op('Or', [e.op('Less', [codes!, e.i64(0)]), e.op('Greater', [codes!, oldest])])])];
  },
};

export const MODC_OPS: readonly ModcOpDef[] = [
  router,
  selectThreshold,
  selectTopK,
  tokenGrid,
  compactTokens,
  compact,
  scatterTokens,
  scatterTokensGated,
  gatherMask,
  prefixMaskOp,
  slotPositions,
  windowBias,
  keyMask,
  gatherKv,
  gatherKvCombined,
  kvCodes,
  kvVisible,
  kvRetain,
];

export function modcOp(name: string): ModcOpDef {
  const op = MODC_OPS.find((o) => o.name === name);
  if (!op) throw new Error(`no modc op ${name}`);
  return op;
}
