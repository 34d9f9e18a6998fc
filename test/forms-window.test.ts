/**
 * Sliding-window attention and attention sinks on routed layers:
 * fixtures/forms-gqa-window-tiny (GroupQueryAttention local_window_size 4 on layers 0 and 2) and
 * fixtures/forms-gqa-sink-tiny (gpt-oss style: head_sink on every layer, window 3 on layers 0, 2).
 *
 * - ONNX Runtime's convention, by experiment on the dense model: a query at position p sees the
 *   keys at p - w < q <= p (w = local_window_size), and not p - w <= q <= p.
 * - A compacted layer applies the window by ORIGINAL position (its cache state carries each slot's
 *   position): every-token routing reproduces the original over contexts longer than the window,
 *   random routing agrees with the reference executor and passes `modc verify`, and the same
 *   model with the window put back on slots fails that check.
 * - head_sink (one logit per head) depends on no position: it passes through unchanged.
 */
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { attribute, type Node, Value } from '../compiler/core/ir/graph.js';
import type { TypeProto } from '../compiler/core/proto/index.js';
import type { Model } from '../compiler/core/ir/model.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { argmax, lastPosition, ModSession, type Logits } from '../compiler/runtime/session.js';
import { ort } from '../compiler/runtime/ort.js';
import type { RoutedPart, RoutingMode } from '../compiler/routing/routing-plan.js';
import { Emitter } from '../compiler/passes/modc-ops/emitter.js';
import { buildFormDecoder, writeFormModel } from '../fixtures/builder/forms.js';
import { FIXTURES_DIR, FORMS_CONFIG, TINY_SEED } from '../fixtures/build-fixtures.js';
import { runCli, tempDir } from './helpers.js';
import { compileWith, expectSameRun, prefillSelection, rowByRowNll, tolerance, worstReal, worstRows } from './mod-helpers.js';

const tmp = tempDir('modc-window');
const WINDOW = join(FIXTURES_DIR, 'forms-gqa-window-tiny', 'model.onnx');
const SINK = join(FIXTURES_DIR, 'forms-gqa-sink-tiny', 'model.onnx');
/** Right padding (GroupQueryAttention's side); every row longer than the windows (4 and 3). */
const ROWS = [
  [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
  [20, 21, 22, 23, 24, 25, 26],
  [30, 31, 32, 33, 34, 35, 36, 37, 38, 39],
];
const STEPS = 8;
let counter = 0;

const gqaNodes = (m: Model): Node[] => [...m.allNodes()].filter((n) => n.opType === 'GroupQueryAttention');

/**
 * The dense model with each window replaced by an attention_bias written here with plain ONNX
 * ops: a key at slot (= position, on a full right-padded cache) q is visible to the query at p iff
 * q <= p and q > p - w ('exclusive') or q >= p - w ('inclusive').
 */
function windowAsBias(source: string, rule: 'exclusive' | 'inclusive'): string {
  const model = loadModel(source);
  const g = model.graph;
  const e = new Emitter(g, 17, 'test/');
  const mask = g.inputs.find((v) => v.name === 'attention_mask')!;
  const counts = e.op('CumSum', [e.cast(mask, DataType.INT64), e.i64(1)], { exclusive: 1 });
  for (const n of gqaNodes(model)) {
    const w = n.attrInt('local_window_size', -1)!;
    if (w < 0) continue;
    const total = e.dim(mask, 1);
    const p = e.unsqueeze(e.op('Slice', [counts, e.op('Sub', [total, e.dim(n.input(0)!, 1)]), total, e.i64([1])]), [1, 3]);
    const q = e.unsqueeze(e.op('Range', [e.i64(0), e.dimScalar(mask, 1), e.i64(1)]), [0, 1, 2]);
    const lower = e.op('Sub', [p, e.i64(w)]);
    const inWindow = rule === 'exclusive' ? e.op('Greater', [q, lower]) : e.op('Not', [e.op('Less', [q, lower])]);
    const visible = e.op('And', [e.op('Not', [e.op('Greater', [q, p])]), inWindow]);
    n.setAttr(attribute('local_window_size', -1));
    n.setInput(10, e.op('Where', [visible, e.f32(0), e.f32(-3.4028234663852886e38)]));
  }
  g.toposort();
  const path = join(tmp, `bias-${rule}-${counter++}`, 'model.onnx');
  saveModel(model, path);
  return path;
}

/** Prefill ROWS, then STEPS greedy steps on both; the worst difference at real positions. */
async function worstOverRun(a: Pick<ModSession, 'forward' | 'step'>, b: Pick<ModSession, 'forward' | 'step'>): Promise<number> {
  const [la, lb] = [await a.forward(ROWS), await b.forward(ROWS)];
  let worst = worstReal(la, lb, ROWS, 'right');
  let next = ROWS.map((r, i) => argmax(lastOf(la, i, r.length - 1)));
  for (let t = 0; t < STEPS; t++) {
    const [sa, sb] = [lastPosition(await a.step(next)), lastPosition(await b.step(next))];
    worst = Math.max(worst, worstRows(sa, sb));
    next = sa.map(argmax);
  }
  return worst;
}

function lastOf(l: Logits, row: number, t: number): Float32Array {
  const [, S, V] = l.dims;
  return l.data.slice((row * S + t) * V, (row * S + t + 1) * V);
}

describe("ONNX Runtime's local_window_size, by experiment on the dense model", () => {
  it('a query at position p sees the keys at p - w < q <= p (w keys, itself included): prefill and 8 steps', async () => {
    const original = await ModSession.create(WINDOW);
    expect(await worstOverRun(original, await ModSession.create(windowAsBias(WINDOW, 'exclusive')))).toBe(0);
    // One more key (p - w itself) is another model: the comparison can fail.
    expect(await worstOverRun(await ModSession.create(WINDOW), await ModSession.create(windowAsBias(WINDOW, 'inclusive')))).toBeGreaterThan(1e-2);
  });

  it('the window matters: the same weights without it give other logits on a prompt longer than the window', async () => {
    const [a, b] = [await ModSession.create(WINDOW), await ModSession.create(join(FIXTURES_DIR, 'forms-gqa-tiny', 'model.onnx'))];
    expect(worstReal(await a.forward(ROWS), await b.forward(ROWS), ROWS, 'right')).toBeGreaterThan(1e-3);
  });
});

const PARTS: [RoutedPart, RoutingMode, boolean][] = [
  ['block', 'threshold', true],
  ['block', 'topk', false],
  ['attention', 'threshold', false],
  ['attention', 'topk', true],
];

describe.each([
  ['window', WINDOW],
  ['sink', SINK],
] as const)('sliding windows on routed layers (forms-gqa-%s-tiny)', (_name, path) => {
  it.each(['block', 'attention'] as const)(
    '%s: every token selected, ungated, reproduces the original (prefill and 8 decode steps, batch 3, contexts past the window)',
    async (granularity) => {
      const compiled = compileWith(tmp, path, 'all-pass', { gated: false, granularity });
      expect(compiled.plan.layers.map((l) => l.layer)).toEqual([0, 1, 2]);
      await expectSameRun(await ModSession.create(path), await ModSession.create(compiled.path), ROWS, 'right', STEPS, 1e-4, `${granularity} all-pass`);
    },
  );

  it('the reference executor with every token selected reproduces the original too', async () => {
    const compiled = compileWith(tmp, path, 'all-pass', { gated: false });
    const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      await expectSameRun(await ModSession.create(path), ref, ROWS, 'right', STEPS, 1e-4, 'reference all-pass');
    } finally {
      await ref.release();
    }
  });

  it.each(PARTS)(
    '%s, %s routing (gated %s): random routers agree with the reference over 8 decode steps, and routing drops tokens',
    async (granularity, mode, gated) => {
      const compiled = compileWith(tmp, path, 'random', { mode, gated, threshold: 0.5, capacity: 0.5, granularity });
      expect(compiled.plan.layers.map((l) => l.layer)).toEqual([0, 1, 2]);
      const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
      try {
        const mod = await ModSession.create(compiled.path);
        expect(await worstOverRun(mod, ref)).toBeLessThan(1e-4);
        expect(mod.layerCacheLengths()).toEqual(ref.layerCacheLengths());
        const { selected, real } = prefillSelection(ref, ROWS);
        expect(selected).toBeGreaterThan(0);
        expect(selected).toBeLessThan(real);
      } finally {
        await ref.release();
      }
    },
  );
});

describe('float16 (fixtures/forms-gqa-fp16-tiny with a window of 3 set on every layer)', () => {
  it('all-pass reproduces the original and random routers agree with the reference (block and attention, 8 steps)', async () => {
    const model = loadModel(join(FIXTURES_DIR, 'forms-gqa-fp16-tiny', 'model.onnx'));
    for (const n of gqaNodes(model)) n.setAttr(attribute('local_window_size', 3));
    const path = join(tmp, 'qwen-window', 'model.onnx');
    saveModel(model, path);
    expect(analyzeDecoder(loadModel(path)).dtype).toBe('float16');
    const tol = await tolerance(path, 1e-4);
    const allPass = compileWith(tmp, path, 'all-pass', { gated: false });
    expect(await worstOverRun(await ModSession.create(path), await ModSession.create(allPass.path))).toBeLessThan(tol);
    for (const granularity of ['block', 'attention'] as const) {
      const compiled = compileWith(tmp, path, 'random', { mode: 'topk', capacity: 0.5, gated: true, granularity });
      const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
      try {
        expect(await worstOverRun(await ModSession.create(compiled.path), ref), granularity).toBeLessThan(tol);
      } finally {
        await ref.release();
      }
    }
  });
});

describe('packed QKV (GroupQueryAttention reading Q, K and V from one input, as the GenAI builder writes for Phi-3)', () => {
  it('a routed layer splits it before moving the rotation out: all-pass and random routing agree (8 steps)', async () => {
    const model = loadModel(SINK);
    for (const n of gqaNodes(model)) {
      const packed = model.graph.addNode('Concat', [n.input(0), n.input(1), n.input(2)], 1, { before: n, attributes: [attribute('axis', 2)] }).output(0);
      n.setInput(0, packed);
      n.setInput(1, null);
      n.setInput(2, null);
    }
    const path = join(tmp, 'packed', 'model.onnx');
    saveModel(model, path);
    expect(await worstOverRun(await ModSession.create(SINK), await ModSession.create(path))).toBeLessThan(1e-5);
    const allPass = compileWith(tmp, path, 'all-pass', { gated: false });
    expect(await worstOverRun(await ModSession.create(path), await ModSession.create(allPass.path))).toBeLessThan(1e-4);
    const compiled = compileWith(tmp, path, 'random', { threshold: 0.5 });
    expect(gqaNodes(loadModel(compiled.path)).every((n) => n.input(0)?.producer?.opType === 'RotaryEmbedding' && n.input(1) !== null)).toBe(true);
    const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      expect(await worstOverRun(await ModSession.create(compiled.path), ref)).toBeLessThan(1e-4);
    } finally {
      await ref.release();
    }
  });
});

describe('the window is applied by original position, not by cache slot', () => {
  /** A routed compile and the reference, run over ROWS + STEPS; returns both and the present outputs. */
  async function routedRun(granularity: RoutedPart) {
    const compiled = compileWith(tmp, WINDOW, 'random', { mode: 'threshold', gated: true, threshold: 0.5, granularity });
    const ref = await ModReference.create(WINDOW, compiled.plan, join(tmp, `ref${counter++}`));
    return { compiled, ref };
  }

  it('present_positions.l holds the original position of every token the layer kept, packed like its cache, and the window really drops cached keys', async () => {
    const { compiled, ref } = await routedRun('block');
    try {
      const mod = await ModSession.create(compiled.path);
      expect(mod.io.kv.map((b) => [b.pastPositions, b.presentPositions])).toEqual([
        ['past_positions.0', 'present_positions.0'],
        [null, null],
        ['past_positions.2', 'present_positions.2'],
      ]);
      await worstOverRun(mod, ref);
      let dropped = 0;
      for (const layer of [0, 2]) {
        // The reference's selections, as original positions: prefill token s is at s (right
        // padding), the token of step t at the row's length + t.
        const expected = ROWS.map((row, b) => [
          ...ref.selections[0]!.get(String(layer))![b]!,
          ...ref.selections.slice(1).flatMap((call, t) => (call.get(String(layer))![b]!.length ? [row.length + t] : [])),
        ]);
        const lengths = Array.from(mod.lastOutputs[`present_lengths.${layer}`]!.data as BigInt64Array, Number);
        const pos = mod.lastOutputs[`present_positions.${layer}`] as ort.Tensor;
        const P = pos.dims[1]!;
        const got = lengths.map((n, b) => Array.from((pos.data as BigInt64Array).slice(b * P, b * P + n), Number));
        expect(got, `layer ${layer}`).toEqual(expected);
        // As wide as the layer's cache (GroupQueryAttention's present: each row's tokens first).
        expect(P).toBe((mod.lastOutputs[mod.io.kv[layer]!.presentKey] as ort.Tensor).dims[2]);
        expect(P).toBeGreaterThanOrEqual(Math.max(...lengths));
        // The last step's query sits at row length + STEPS - 1: keys at or before it minus the window are dropped.
        got.forEach((keys, b) => (dropped += keys.filter((q) => q <= ROWS[b]!.length + STEPS - 1 - 4).length));
      }
      expect(dropped).toBeGreaterThan(0);
    } finally {
      await ref.release();
    }
  });

  it.each(['block', 'attention'] as const)(
    '%s: the same compiled model with the window put back on cache slots disagrees with the reference',
    async (granularity) => {
      const { compiled, ref } = await routedRun(granularity);
      try {
        const model = loadModel(compiled.path);
        let changed = 0;
        for (const n of gqaNodes(model)) {
          const bias = n.input(10);
          if (!bias || bias.producer?.opType !== 'WindowBias') continue;
          n.setAttr(attribute('local_window_size', 4));
          n.setInput(10, null);
          changed++;
        }
        expect(changed).toBe(2);
        const bySlot = join(tmp, `by-slot${counter++}`, 'model.onnx');
        saveModel(model, bySlot);
        expect(await worstOverRun(await ModSession.create(bySlot), ref)).toBeGreaterThan(1e-3);
      } finally {
        await ref.release();
      }
    },
  );
});

describe('attention sinks (GroupQueryAttention head_sink, fixtures/forms-gqa-sink-tiny)', () => {
  it('the sinks matter: the same model without them gives other logits', async () => {
    const noSink = join(tmp, 'no-sink', 'model.onnx');
    writeFormModel(buildFormDecoder({ ...FORMS_CONFIG, hiddenSize: 64 }, TINY_SEED, { attention: 'gqa', localWindow: 3, windowLayers: [0, 2] }), noSink);
    const [a, b] = [await ModSession.create(SINK), await ModSession.create(noSink)];
    expect(worstReal(await a.forward(ROWS), await b.forward(ROWS), ROWS, 'right')).toBeGreaterThan(1e-3);
  });

  it("a per-head sink depends on no position: every routed layer's op keeps reading the same sink weights", () => {
    const compiled = compileWith(tmp, SINK, 'random', { threshold: 0.5 });
    const nodes = gqaNodes(loadModel(compiled.path));
    expect(nodes).toHaveLength(3);
    expect(nodes.map((n) => n.input(11)?.name).sort()).toEqual([0, 1, 2].map((l) => `model.layers.${l}.self_attn.sinks`));
    expect(nodes.map((n) => n.input(11)?.initializer?.dims)).toEqual([[4], [4], [4]]);
  });
});

describe('runners and refusals', () => {
  it('modc verify passes on routed compiles (block and attention), and run, generate, eval and bench drive the new cache state', async () => {
    for (const granularity of ['block', 'attention']) {
      const out = join(tmp, `cli-${granularity}`, 'model.onnx');
      expect((await runCli('compile', WINDOW, '-o', out, '-q', '--router-init', 'random', '--granularity', granularity)).code).toBe(0);
      const verify = await runCli('verify', WINDOW, out, '--steps', '8', '--ids', ROWS.map((r) => r.join(',')).join(';'), '--json');
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      expect(JSON.parse(verify.stdout).passed).toBe(true);
    }
    const out = join(tmp, 'cli-block', 'model.onnx');
    const run = await runCli('run', out, '--ids', '1,2,3,4,5,6;7,8', '--json');
    expect(run.code, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout).attentionMask).toEqual([
      [1, 1, 1, 1, 1, 1],
      [1, 1, 0, 0, 0, 0],
    ]);
    const gen = await runCli('generate', out, '--ids', '1,2,3,4,5,6;7,8', '--max-new', '9', '--json');
    expect(gen.code, gen.stderr).toBe(0);
    expect(JSON.parse(gen.stdout).ids.map((r: number[]) => r.length)).toEqual([15, 11]);
    const data = join(tmp, 'eval.jsonl');
    writeFileSync(data, '{"ids": [5, 6, 7, 8, 9, 10, 11, 12, 13]}\n{"ids": [11, 12, 13]}\n');
    const ev = await runCli('eval', out, '--data', data, '--json');
    expect(ev.code, ev.stderr).toBe(0);
    // eval scores the routed window model as its own logits say, row by row.
    expect(
      Math.abs(
        JSON.parse(ev.stdout).nll -
          (await rowByRowNll(out, [
            [5, 6, 7, 8, 9, 10, 11, 12, 13],
            [11, 12, 13],
          ])),
      ),
    ).toBeLessThan(1e-5);
    const bench = await runCli('bench', WINDOW, out, '--prompt', '8', '--steps', '6', '--runs', '1', '--warmup', '0', '--json');
    expect(bench.code, bench.stderr).toBe(0);
  });

  it('a window it cannot move to positions keeps the layer dense, saying why (window 0; a window with its own attention_bias)', async () => {
    const model = loadModel(WINDOW);
    const [first, , last] = gqaNodes(model);
    first!.setAttr(attribute('local_window_size', 0));
    const g = model.graph;
    const bias = g.addInput(new Value('extra_bias', { tensor_type: { elem_type: DataType.FLOAT } } as TypeProto));
    last!.setInput(10, bias);
    const path = join(tmp, 'blocked', 'model.onnx');
    saveModel(model, path);
    const res = await runCli('compile', path, '-o', join(tmp, 'blocked-out', 'model.onnx'), '--router-init', 'random', '--json');
    expect(res.code, res.stderr).toBe(0);
    const text = JSON.stringify(JSON.parse(res.stdout));
    expect(text).toMatch(/layer 0[^"]*local_window_size=0\): a window of 0 slots is not supported/);
    expect(text).toMatch(/layer 2[^"]*local_window_size=4\) also takes an attention_bias input/);
    expect(analyzeDecoder(loadModel(path)).layers).toHaveLength(3);
  });
});
