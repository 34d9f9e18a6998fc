/**
 * Each modc op's ONNX function body, run by onnxruntime-node, agrees with its TypeScript
 * reference kernel: on random inputs and on the edges (nothing selected, everything selected,
 * rows selecting different counts, all-padding rows), batch 1 and 4, as a local function and
 * inlined, at an old (11) and a current (17) opset. The selection ops also meet their boundaries
 * (r = p, equal top-k scores, one-token steps and prompts) with expected values written by hand
 * from SPEC.md, which the body and the kernel must both give.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { saveModel } from '../compiler/core/io/save.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { attribute, Graph, Value } from '../compiler/core/ir/graph.js';
import { Model } from '../compiler/core/ir/model.js';
import { createSession, ort } from '../compiler/runtime/ort.js';
import { callModcOp, modcOp, reference as ref } from '../compiler/passes/modc-ops/index.js';
import { mulberry32 } from '../compiler/core/random.js';
import { tempDir } from './helpers.js';

const tmp = tempDir('modc-ops');

type Feed = { name: string; type: 'float32' | 'int64' | 'bool'; dims: number[]; data: Float32Array | BigInt64Array | Uint8Array };
const ONNX_TYPE = { float32: DataType.FLOAT, int64: DataType.INT64, bool: DataType.BOOL } as const;

function f32(name: string, dims: number[], data: ArrayLike<number>): Feed {
  return { name, type: 'float32', dims, data: Float32Array.from(data) };
}
function i64(name: string, dims: number[], data: ArrayLike<number>): Feed {
  return { name, type: 'int64', dims, data: BigInt64Array.from(Array.from(data, (v) => BigInt(v))) };
}
function bool(name: string, dims: number[], data: ArrayLike<number>): Feed {
  return { name, type: 'bool', dims, data: Uint8Array.from(data) };
}

let counter = 0;
/** Runs one modc op in ORT on the feeds (ranks fixed, dims symbolic so shapes really vary). */
async function runOp(op: string, feeds: Feed[], opts: { inline: boolean; opset: number }): Promise<ort.Tensor[]> {
  const g = new Graph('op');
  const inputs = feeds.map((f) =>
    g.addInput(
      new Value(f.name, {
        tensor_type: { elem_type: ONNX_TYPE[f.type], shape: { dim: f.dims.map((_, i) => ({ dim_param: `${f.name}_d${i}` })) } },
      }),
    ),
  );
  const model = new Model(g, 8);
  model.opsetImports = [{ domain: '', version: opts.opset }];
  const outs = callModcOp(model, op, inputs, { dtype: DataType.FLOAT, inline: opts.inline });
  const outTypes: Record<string, number[]> = {
    Router: [DataType.FLOAT],
    SelectThreshold: [DataType.BOOL],
    SelectTopK: [DataType.BOOL],
    TokenGrid: [DataType.INT64, DataType.INT64, DataType.INT64],
    CompactTokens: [DataType.INT64, DataType.BOOL, DataType.INT64, DataType.INT64, DataType.BOOL],
    Compact: [DataType.INT64, DataType.BOOL, DataType.INT64],
    ScatterTokens: [DataType.FLOAT],
    ScatterTokensGated: [DataType.FLOAT],
    GatherMask: [DataType.FLOAT],
    PrefixMask: [DataType.BOOL],
    KeyMask: [DataType.BOOL],
    GatherKv: [DataType.FLOAT],
    GatherKvCombined: [DataType.FLOAT],
    SlotPositions: [DataType.INT64],
    WindowBias: [DataType.FLOAT],
    KvCodes: [DataType.INT64],
    KvVisible: [DataType.BOOL],
    KvRetain: [DataType.BOOL],
  };
  outs.forEach((v, i) => (v.type = { tensor_type: { elem_type: outTypes[op]![i]! } }));
  g.outputs = outs;
  const path = join(tmp, `${op}-${counter++}.onnx`);
  saveModel(model, path);
  const session = await createSession(path);
  const ortFeeds = Object.fromEntries(feeds.map((f) => [f.name, new ort.Tensor(f.type, f.data, f.dims)]));
  const result = await session.run(ortFeeds);
  return outs.map((v) => result[v.name]!);
}

const rng = mulberry32;
const randn = (r: () => number, n: number, scale = 1) => Float32Array.from({ length: n }, () => (r() * 2 - 1) * scale);

/** Token masks for the edge cases: full rows, left padding, right padding, an all-padding row. */
function masks(B: number, S: number): number[] {
  const m: number[] = [];
  for (let b = 0; b < B; b++) {
    for (let s = 0; s < S; s++) {
      const kind = b % 4;
      m.push(kind === 0 ? 1 : kind === 1 ? (s >= 2 ? 1 : 0) : kind === 2 ? (s < S - 3 ? 1 : 0) : 0);
    }
  }
  return m;
}

const data = (t: ort.Tensor) => Array.from(t.data as ArrayLike<number | bigint | boolean>, (v) => Number(v));

/** Selections for the compaction ops: rows with different counts, nothing, everything, batch 1. */
const SELECTIONS: [string, number[], number][] = [
  ['rows selecting different counts', [1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0], 4],
  ['nothing selected', Array(20).fill(0), 4],
  ['everything selected', Array(20).fill(1), 4],
  ['batch 1', [0, 1, 1, 0, 1], 1],
];

/** indices, valid and count as the reference kernel compacts `selected`; returns the reference. */
function expectCompacted([indices, valid, count]: ort.Tensor[], selected: number[], [B, S]: [number, number]): ref.Compacted {
  const want = ref.compact(selected, [B, S]);
  expect(indices!.dims).toEqual([B, want.K]);
  expect(data(indices!)).toEqual(want.indices);
  expect(data(valid!)).toEqual(Array.from(want.valid));
  expect(data(count!)).toEqual(want.count);
  return want;
}
const modes = [
  { inline: false, opset: 17 },
  { inline: true, opset: 17 },
  { inline: false, opset: 11 },
];

describe.each(modes)('modc ops (inline=$inline, opset $opset)', (mode) => {
  it.each([1, 4])('Router matches w.x + b (batch %i)', async (B) => {
    const r = rng(1);
    const [S, H] = [5, 8];
    const x = randn(r, B * S * H);
    const w = randn(r, H);
    const [score] = await runOp('Router', [f32('x', [B, S, H], x), f32('weight', [H], w), f32('bias', [1], [0.25])], mode);
    const want = ref.router(x, [B, S, H], w, 0.25);
    data(score!).forEach((v, i) => expect(v).toBeCloseTo(want[i]!, 5));
  });

  it.each([
    ['half of the tokens', 0.5],
    ['nothing', 1.0],
    ['everything', 0.0],
  ])('SelectThreshold selects %s', async (_, p) => {
    const r = rng(2);
    const [B, S] = [4, 7];
    const score = randn(r, B * S, 3);
    const mask = masks(B, S);
    const [sel] = await runOp('SelectThreshold', [f32('score', [B, S], score), i64('token_mask', [B, S], mask), f32('score_cut', [], [ref.scoreCut(p)])], mode);
    const want = Array.from(ref.selectThreshold(score, mask, p));
    expect(data(sel!)).toEqual(want);
    if (p === 0) expect(want).toEqual(mask); // every real token, never padding
  });

  it.each([
    [1, 0.5, 0],
    [4, 0.5, 0],
    [4, 0.3, 0],
    [4, 1.0, 0],
    [4, 0.01, 0],
    [4, 0.5, 3],
  ])('SelectTopK (batch %i, capacity %f, past %i)', async (B, c, past) => {
    const r = rng(3);
    const S = past > 0 ? 1 : 9;
    const score = randn(r, B * S, 3);
    // Ties: equal scores must go to the earlier token.
    if (S > 3) score[1] = score[2] = score[3] = 0.125;
    const mask = past > 0 ? Array(B * S).fill(1) : masks(B, S);
    const [sel] = await runOp(
      'SelectTopK',
      [f32('score', [B, S], score), i64('token_mask', [B, S], mask), f32('capacity', [], [c]), i64('past_length', [], [past])],
      mode,
    );
    expect(data(sel!)).toEqual(Array.from(ref.selectTopK(score, mask, [B, S], c, past)));
  });

  // The boundaries, with expected selections written by hand from SPEC.md (r >= p; top-k ties to
  // the earlier token; a one-token step with a past uses r >= 0.5, a one-token prompt top-k):
  // the op body and the reference kernel must both give them. In float32, sigmoid(0) = 0.5 and
  // sigmoid(20) = 1 exactly; sigmoid(-1e-3) = 0.49975.
  it('scoreCut(p): the least float32 score whose float32 sigmoid reaches p', () => {
    // By hand: every score passes p = 0; below 0.5 float32 values are 2^-25 apart, and
    // sigmoid(s) = 0.5 + s/4 near 0 rounds to 0.5 (ties to even) for s >= -2^-24, below it for
    // s < -2^-24; sigmoid(17) = 1 - 4.1e-8 rounds below 1 (float32 steps there are 6e-8 apart),
    // sigmoid(18) = 1 - 1.5e-8 rounds to 1.
    expect(ref.scoreCut(0)).toBe(-Infinity);
    expect(ref.scoreCut(0.5)).toBe(-(2 ** -24));
    expect(ref.scoreCut(1)).toBeGreaterThan(17);
    expect(ref.scoreCut(1)).toBeLessThanOrEqual(18);
    // Each cut passes and the float32 just below it does not.
    const f = new Float32Array(1);
    const u = new Uint32Array(f.buffer);
    const below = (v: number) => {
      f[0] = v;
      u[0] = v > 0 ? u[0]! - 1 : u[0]! + 1;
      return f[0]!;
    };
    for (const p of [1e-30, 0.1, 0.25, 0.5, 0.7, 0.9, 0.999, 1]) {
      const cut = ref.scoreCut(p);
      expect(Math.fround(cut), `p = ${p}: a float32`).toBe(cut);
      expect(Math.fround(ref.sigmoid(cut)) >= Math.fround(p), `p = ${p}: the cut passes`).toBe(true);
      expect(Math.fround(ref.sigmoid(below(cut))) >= Math.fround(p), `p = ${p}: the float below fails`).toBe(false);
    }
  });

  it.each([
    ['r = p = 0.5 is selected', 0.5, [1, 1, 0, 1, 0, 0]],
    ['r = p = 1 is selected', 1, [0, 0, 0, 1, 0, 0]],
  ])('SelectThreshold on the boundary, by hand: %s', async (_, p, want) => {
    // Row 0: scores 0, -0, -1e-3; row 1: 20 then two padding tokens (scores 0 and 20, never selected).
    const score = [0, -0, -1e-3, 20, 0, 20];
    const mask = [1, 1, 1, 1, 0, 0];
    const [sel] = await runOp('SelectThreshold', [f32('score', [2, 3], score), i64('token_mask', [2, 3], mask), f32('score_cut', [], [ref.scoreCut(p)])], mode);
    expect(data(sel!), 'op body').toEqual(want);
    expect(Array.from(ref.selectThreshold(Float32Array.from(score), mask, p)), 'reference kernel').toEqual(want);
  });

  it.each([
    // c = 0.3. Row 0 (n = 5): k = ceil(1.5) = 2 of three tied 2s, the first two. Row 1 (left
    // padding, n = 4): k = ceil(1.2) = 2 of four tied 5s; the padding's 9 does not count. Row 2
    // (right padding, n = 3): k = ceil(0.9) = 1 of three tied -3s.
    [
      'equal scores at the cut go to the earlier tokens',
      3,
      5,
      0.3,
      0,
      [1, 2, 2, 2, 0, 9, 5, 5, 5, 5, -3, -3, -3, 9, 9],
      [0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 0],
    ],
    // c = 0.5, a one-token step after 3 tokens: r >= 0.5 (r = 0.5, 0.49975, 0.73, 0.0067), where top-k would keep every row's token.
    ['a one-token step with a past selects r >= 0.5', 4, 1, 0.5, 3, [0, -1e-3, 1, -5], [1, 0, 1, 0]],
    // c = 0.1, a one-token prompt (no past): top-k keeps ceil(0.1) = 1 token whatever its r.
    ['a one-token prompt is top-k: its token is kept', 2, 1, 0.1, 0, [-5, 0], [1, 1]],
  ])('SelectTopK, by hand: %s', async (_, B, S, c, past, score, want) => {
    const mask = S === 5 ? [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0] : Array(B * S).fill(1);
    const [sel] = await runOp(
      'SelectTopK',
      [f32('score', [B, S], score), i64('token_mask', [B, S], mask), f32('capacity', [], [c]), i64('past_length', [], [past])],
      mode,
    );
    expect(data(sel!), 'op body').toEqual(want);
    expect(Array.from(ref.selectTopK(Float32Array.from(score), mask, [B, S], c, past)), 'reference kernel').toEqual(want);
  });

  it.each(SELECTIONS)('Compact: %s', async (_, selected, B) => {
    const S = selected.length / B;
    expectCompacted(await runOp('Compact', [bool('selected', [B, S], selected)], mode), selected, [B, S]);
  });

  it.each(SELECTIONS)(
    'TokenGrid then CompactTokens: Compact, each slot as its (row, position) pair, and whether any row selects (%s)',
    async (_, selected, B) => {
      const S = selected.length / B;
      const mask = bool('token_mask', [B, S], Array(B * S).fill(1));
      const [first, rest, rows] = await runOp('TokenGrid', [mask], mode);
      // By hand: selected positions sort first by S - t, the others after by -t; rows are (b, 0).
      expect(data(first!)).toEqual(Array.from({ length: S }, (_, t) => S - t));
      expect(data(rest!)).toEqual(Array.from({ length: S }, (_, t) => (t === 0 ? 0 : -t)));
      expect(rows!.dims).toEqual([B, 1, 2]);
      expect(data(rows!)).toEqual(Array.from({ length: B }, (_, b) => [b, 0]).flat());
      const grid = [i64('first', [S], data(first!)), i64('rest', [S], data(rest!)), i64('rows', [B, 1, 2], data(rows!))];
      const [indices, valid, count, slots, any] = await runOp('CompactTokens', [bool('selected', [B, S], selected), ...grid], mode);
      const want = expectCompacted([indices!, valid!, count!], selected, [B, S]);
      expect(slots!.dims).toEqual([B, want.K, 2]);
      expect(data(slots!)).toEqual(want.indices.flatMap((t, i) => [Math.floor(i / want.K), t]));
      expect(data(any!)).toEqual([selected.some((v) => v) ? 1 : 0]);
    },
  );

  it.each([
    ['ScatterTokens', false],
    ['ScatterTokensGated', true],
  ])('%s writes back only valid slots', async (op, gated) => {
    const r = rng(5);
    const [B, S, H] = [4, 6, 3];
    const selected = [1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1];
    const c = ref.compact(selected, [B, S]);
    const x = randn(r, B * S * H);
    const xSel = ref.gatherTokens(x, [B, S], H, c.indices, c.K);
    const y = randn(r, B * c.K * H);
    const gate = Float32Array.from({ length: B * c.K }, () => r());
    const feeds = [
      f32('x', [B, S, H], x),
      i64(
        'slots',
        [B, c.K, 2],
        c.indices.flatMap((t, i) => [Math.floor(i / c.K), t]),
      ),
      bool('valid', [B, c.K], c.valid),
      f32('x_sel', [B, c.K, H], xSel),
      f32('y', [B, c.K, H], y),
    ];
    if (gated) feeds.push(f32('gate', [B, c.K], gate));
    const [out] = await runOp(op, feeds, mode);
    const want = ref.scatterTokens(x, [B, S, H], c.indices, c.valid, c.K, y, gated ? gate : undefined);
    data(out!).forEach((v, i) => expect(v).toBeCloseTo(want[i]!, 6));
    // Unselected tokens pass through bit for bit.
    for (let t = 0; t < B * S; t++) if (!selected[t]) for (let h = 0; h < H; h++) expect(data(out!)[t * H + h]).toBe(x[t * H + h]);
  });

  it.each([1, 4])('GatherMask picks query rows and key columns, filling invalid keys (batch %i)', async (B) => {
    const r = rng(6);
    const [S, T] = [5, 7];
    const mask = randn(r, 1 * 1 * S * T); // batch-1 mask broadcast over rows
    const qSel = Array.from({ length: B * S }, (_, i) => (i % 2 ? 1 : 0));
    const kSel = Array.from({ length: B * T }, (_, i) => (i % 3 ? 1 : 0));
    const q = ref.compact(qSel, [B, S]);
    const k = ref.compact(kSel, [B, T]);
    const [out] = await runOp(
      'GatherMask',
      [
        f32('mask', [1, 1, S, T], mask),
        i64('q_idx', [B, q.K], q.indices),
        i64('k_idx', [B, k.K], k.indices),
        bool('k_valid', [B, k.K], k.valid),
        f32('fill', [], [-1e9]),
      ],
      mode,
    );
    expect(out!.dims).toEqual([B, 1, q.K, k.K]);
    expect(data(out!)).toEqual(Array.from(ref.gatherMask(mask, [1, 1, S, T], B, q.indices, q.K, k.indices, k.K, k.valid, -1e9)));
  });
});

describe.each(modes)('modc cache ops (inline=$inline, opset $opset)', (mode) => {
  it("PrefixMask marks each row's valid cache slots (a GroupQueryAttention or static layer's keys)", async () => {
    const lengths = [0, 3, 1, 4];
    const [pm] = await runOp('PrefixMask', [i64('lengths', [4], lengths), i64('total', [], [4])], mode);
    expect(data(pm!)).toEqual(Array.from(ref.prefixMask(lengths, 4)));
  });

  it("KeyMask marks a key/value-routed layer's valid cache slots and this call's valid slots", async () => {
    const lengths = [0, 3, 1, 4];
    const valid = [1, 0, 1, 1, 0, 0, 1, 0];
    const [km] = await runOp('KeyMask', [i64('past_length', [4], lengths), i64('past_capacity', [], [4]), bool('valid', [4, 2], valid)], mode);
    expect(km!.dims).toEqual([4, 6]);
    expect(data(km!)).toEqual(Array.from(ref.keyMask(lengths, 4, Uint8Array.from(valid), 2)));
  });

  it.each([
    ['GatherKv', [3, 2, 5, 4]],
    ['GatherKvCombined', [2, 3, 2, 5, 4]],
  ])('%s re-packs each row of a cache', async (op, dims) => {
    const r = rng(7);
    const kv = randn(
      r,
      dims.reduce((a, b) => a * b, 1),
    );
    const keep = [1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1];
    const c = ref.compact(keep, [3, 5]);
    const [out] = await runOp(op, [f32('kv', dims, kv), i64('indices', [3, c.K], c.indices)], mode);
    expect(data(out!)).toEqual(Array.from(ref.gatherKv(kv, dims, c.indices, c.K)));
  });
});

describe.each(modes)('modc position ops for sliding windows (inline=$inline, opset $opset)', (mode) => {
  it("SlotPositions lays out each row's key positions as GroupQueryAttention writes its keys (past, this call, rest)", async () => {
    const past = [10, 11, 12, 0, 20, 21, 0, 0, 30, 0, 0, 0];
    const lengths = [3, 2, 1];
    const positions = [40, 41, 50, 51, 60, 61];
    const [out] = await runOp(
      'SlotPositions',
      [i64('past_positions', [3, 4], past), i64('past_length', [3], lengths), i64('positions', [3, 2], positions)],
      mode,
    );
    expect(out!.dims).toEqual([3, 6]);
    expect(data(out!)).toEqual(ref.slotPositions(past, [3, 4], lengths, positions, 2));
    expect(data(out!)).toEqual([10, 11, 12, 40, 41, 0, 20, 21, 50, 51, 0, 0, 30, 60, 61, 0, 0, 0]);
    // A prefill: no past at all.
    const [first] = await runOp(
      'SlotPositions',
      [i64('past_positions', [2, 0], []), i64('past_length', [2], [0, 0]), i64('positions', [2, 3], [0, 2, 5, 1, 3, 4])],
      mode,
    );
    expect(data(first!)).toEqual([0, 2, 5, 1, 3, 4]);
  });

  it('WindowBias: a query at p sees a key at q iff p - window < q <= p', async () => {
    const q = [0, 3, 7, 9, 4, 5];
    const k = [0, 1, 3, 5, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8];
    const [out] = await runOp('WindowBias', [i64('query_positions', [2, 3], q), i64('key_positions', [2, 7], k), i64('window', [], [3])], mode);
    expect(out!.dims).toEqual([2, 1, 3, 7]);
    const want = ref.windowBias(q, k, [2, 3, 7], 3, -3.4028234663852886e38);
    expect(data(out!)).toEqual(Array.from(want));
    // Query 7 of row 0 sees keys 5 and 7 only (window 3: positions 5, 6, 7).
    expect(
      data(out!)
        .slice(14, 21)
        .map((v) => v === 0),
    ).toEqual([false, false, false, true, true, false, false]);
  });

  it("WindowBias in float16 and bfloat16 models: 0 and the type's lowest finite value", async () => {
    // bfloat16 casts exist from opset 13.
    const types = [
      [DataType.FLOAT16, -65504],
      [DataType.BFLOAT16, -3.3895313892515355e38],
    ] as const;
    for (const [dtype, lowest] of types.filter(([t]) => t !== DataType.BFLOAT16 || mode.opset >= 13)) {
      const g = new Graph('op');
      const int64 = (name: string, rank: number) =>
        g.addInput(
          new Value(name, {
            tensor_type: { elem_type: DataType.INT64, shape: { dim: Array.from({ length: rank }, (_, i) => ({ dim_param: `${name}_d${i}` })) } },
          }),
        );
      const model = new Model(g, 8);
      model.opsetImports = [{ domain: '', version: mode.opset }];
      const [bias] = callModcOp(model, 'WindowBias', [int64('q', 2), int64('k', 2), int64('w', 0)], { dtype, inline: mode.inline });
      const out = g
        .addNode('Cast', [bias!], [g.newValue('out', { tensor_type: { elem_type: DataType.FLOAT } })], { attributes: [attribute('to', DataType.FLOAT)] })
        .output(0);
      g.outputs = [out];
      const path = join(tmp, `WindowBias-${dtype}-${counter++}.onnx`);
      saveModel(model, path);
      const result = await (
        await createSession(path)
      ).run({
        q: new ort.Tensor('int64', BigInt64Array.from([3n, 5n]), [1, 2]),
        k: new ort.Tensor('int64', BigInt64Array.from([1n, 2n, 3n, 4n, 5n]), [1, 5]),
        w: new ort.Tensor('int64', BigInt64Array.of(2n), []),
      });
      expect(Array.from(result.out!.data as Float32Array)).toEqual(Array.from(ref.windowBias([3, 5], [1, 2, 3, 4, 5], [1, 2, 5], 2, lowest)));
    }
  });
});

describe.each(modes)('modc key/value routing ops (inline=$inline, opset $opset)', (mode) => {
  it('KvCodes: a kept token or one of the first `sinks` is held for good (-1 - p), any other carries its position', async () => {
    const positions = [0, 1, 2, 3, 4, 5, 7, 8, 9];
    const keep = [0, 0, 0, 1, 0, 0, 0, 1, 0];
    const [out] = await runOp('KvCodes', [i64('positions', [3, 3], positions), bool('keep', [3, 3], keep), i64('sinks', [], [2])], mode);
    expect(data(out!)).toEqual([-1, -2, 2, -4, 4, 5, 7, -9, 9]);
    expect(data(out!)).toEqual(ref.kvCodes(positions, keep, 2));
  });

  it('KvVisible: held entries are keys for every query, others while the query is fewer than `window` positions after them', async () => {
    // Row 0: entries at 0 (held), 3, 5, 6 and 7; row 1: held 1, then 2, 4, 8, 9.
    const codes = [-1, 3, 5, 6, 7, -2, 2, 4, 8, 9];
    const queries = [6, 7, 9, 8];
    const [out] = await runOp('KvVisible', [i64('query_positions', [2, 2], queries), i64('codes', [2, 5], codes), i64('window', [], [3])], mode);
    expect(out!.dims).toEqual([2, 1, 2, 5]);
    // Query 7 (window 3: 5, 6, 7 and beyond) sees the held entry, 5, 6 and 7; not 3. Causality is the model's own mask's.
    expect(data(out!)).toEqual([1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1]);
    expect(data(out!)).toEqual(Array.from(ref.kvVisible(queries, codes, [2, 2, 5], 3)));
  });

  it("KvRetain: after a row's last token at p the cache keeps its valid held entries and the `window` positions p - window + 1 .. p", async () => {
    const codes = [-1, 3, 5, 6, 7, 0, -2, 2, 4, 8, 9, 0];
    const valid = [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0];
    const [out] = await runOp('KvRetain', [i64('codes', [2, 6], codes), bool('valid', [2, 6], valid), i64('last', [2], [7, 9]), i64('window', [], [3])], mode);
    expect(data(out!)).toEqual([1, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1, 0]);
    expect(data(out!)).toEqual(Array.from(ref.kvRetain(codes, valid, [7, 9], [2, 6], 3)));
  });
});

describe('modc functions in a model', () => {
  it('are added once, in domain modc, with the domain imported', () => {
    const g = new Graph('g');
    const x = g.addInput(new Value('x', { tensor_type: { elem_type: DataType.BOOL } }));
    const model = new Model(g, 8);
    model.opsetImports = [{ domain: '', version: 17 }];
    callModcOp(model, 'Compact', [x], { dtype: DataType.FLOAT });
    callModcOp(model, 'Compact', [x], { dtype: DataType.FLOAT });
    expect(model.functions.map((f) => f.key)).toEqual(['modc::Compact']);
    expect(model.opsetVersion('modc')).toBe(1);
    expect(g.nodes.map((n) => `${n.domain}::${n.opType}`)).toEqual(['modc::Compact', 'modc::Compact']);
    expect(modcOp('Compact').outputs).toEqual(['indices', 'valid', 'count']);
  });
});
