/**
 * Sliding windows in a static (TensorScatter) KV cache: fixtures/forms-static-window-tiny holds
 * onnxruntime/mobius's static-cache mask (create_static_cache_attention_bias: a float bias, is_causal=0)
 * with a window of 4 slots on layers 0 and 2, (q >= slot) and (q - slot < 4) and (slot <
 * nonpad_kv_seqlen), q = write_indices + t; layer 1 has the mask without the window.
 *
 * - The analysis reads what the mask computes (causality, the window, validity), not how many
 *   comparisons it makes, and every layer routes.
 * - A compacted layer applies the window by ORIGINAL position (a positions buffer per layer,
 *   written by TensorScatter like the cache): every-token routing reproduces the original over
 *   contexts longer than the window, random routing agrees with the reference executor and passes
 *   `modc verify`, and the same compile with the window put back on slots fails that check.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { kvCompactionBlocker, staticMaskOf } from '../compiler/analysis/attention.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import type { Model } from '../compiler/core/ir/model.js';
import type { Node } from '../compiler/core/ir/graph.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { argmax, lastPosition, ModSession, type Logits } from '../compiler/runtime/session.js';
import type { ort } from '../compiler/runtime/ort.js';
import type { RoutedPart, RoutingMode } from '../compiler/routing/routing-plan.js';
import { Emitter } from '../compiler/passes/modc-ops/emitter.js';
import { buildFormDecoder, type FormOptions, writeFormModel } from '../fixtures/builder/forms.js';
import { buildStandardDecoder } from '../fixtures/builder/standard.js';
import { FIXTURES_DIR, FORMS_CONFIG, TINY_SEED } from '../fixtures/build-fixtures.js';
import { runCli, tempDir } from './helpers.js';
import { compileWith, expectSameRun, prefillSelection, tolerance, worstReal, worstRows } from './mod-helpers.js';

const tmp = tempDir('modc-static-window');
const WINDOW = join(FIXTURES_DIR, 'forms-static-window-tiny', 'model.onnx');
const STATIC = join(FIXTURES_DIR, 'forms-static-tiny', 'model.onnx');
/** Right padding (a static cache's side); every row longer than the window (4). */
const ROWS = [
  [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
  [20, 21, 22, 23, 24, 25, 26],
  [30, 31, 32, 33, 34, 35, 36, 37, 38, 39],
];
const STEPS = 8;
let counter = 0;

function build(form: FormOptions, name: string): string {
  return writeFormModel(buildFormDecoder(FORMS_CONFIG, TINY_SEED, form), join(tmp, `${name}-${counter++}`, 'model.onnx'));
}

type Driven = Pick<ModSession, 'forward' | 'step'>;

/** Prefill ROWS, then STEPS greedy steps on both; the worst difference at real positions. */
async function worstOverRun(a: Driven, b: Driven): Promise<number> {
  const [la, lb] = [await a.forward(ROWS, { pad: 'right' }), await b.forward(ROWS, { pad: 'right' })];
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

const windowBiases = (m: Model): Node[] => [...m.allNodes()].filter((n) => n.opType === 'WindowBias');

describe("the analysis reads a static cache's mask by what it computes", () => {
  it("mobius's mask: causality and validity on every layer, a window of 4 on layers 0 and 2; every layer can be compacted", () => {
    const s = analyzeDecoder(loadModel(WINDOW));
    expect(s.layers.map((l) => staticMaskOf(l.attention))).toEqual([
      { causal: true, window: 4, validity: true },
      { causal: true, window: null, validity: true },
      { causal: true, window: 4, validity: true },
    ]);
    expect(s.layers.map((l) => kvCompactionBlocker(l.attention))).toEqual([null, null, null]);
  });

  it("ONNX Runtime's dense model computes the window the analysis reads: the same as the builder's own slot-window mask, and other logits than no window", async () => {
    const slots = build({ attention: 'static', localWindow: 4, windowLayers: [0, 2] }, 'slots');
    const rangeless = build({ attention: 'static', staticMask: 'mobius-rangeless', localWindow: 4, windowLayers: [0, 2] }, 'rangeless');
    const original = await ModSession.create(WINDOW);
    expect(await worstOverRun(original, await ModSession.create(slots))).toBeLessThan(1e-5);
    expect(await worstOverRun(await ModSession.create(WINDOW), await ModSession.create(rangeless))).toBeLessThan(1e-5);
    const a = await ModSession.create(WINDOW);
    expect(
      worstReal(await a.forward(ROWS, { pad: 'right' }), await (await ModSession.create(STATIC)).forward(ROWS, { pad: 'right' }), ROWS, 'right'),
    ).toBeGreaterThan(1e-3);
  });

  it('the three forms of the window (mobius, its Range-free variant, two comparisons of slots) and a window-free mobius mask are read alike', () => {
    const cases: [FormOptions, (number | null)[]][] = [
      [{ attention: 'static', staticMask: 'mobius-rangeless', localWindow: 3 }, [3, 3, 3]],
      [{ attention: 'static', localWindow: 5, windowLayers: [1] }, [null, 5, null]],
      [{ attention: 'static', staticMask: 'mobius' }, [null, null, null]],
    ];
    for (const [form, windows] of cases) {
      const s = analyzeDecoder(buildFormDecoder(FORMS_CONFIG, TINY_SEED, form));
      expect(
        s.layers.map((l) => staticMaskOf(l.attention)),
        JSON.stringify(form),
      ).toEqual(windows.map((window) => ({ causal: true, window, validity: form.staticMask !== undefined })));
      expect(s.layers.map((l) => kvCompactionBlocker(l.attention))).toEqual([null, null, null]);
    }
  });

  it('a mask it cannot read keeps the layer dense, naming the node (an Or of two clauses)', async () => {
    const model = loadModel(WINDOW);
    // The And joining causality and the window (q - slot < 4) of layers 0 and 2.
    const and = model.graph.nodes.find(
      (n) => n.opType === 'And' && n.inputs.some((v) => v?.producer?.opType === 'Less' && v.producer.input(0)?.producer?.opType === 'Sub'),
    )!;
    and.opType = 'Or';
    const path = join(tmp, 'or', 'model.onnx');
    saveModel(model, path);
    const res = await runCli('compile', path, '-o', join(tmp, 'or-out', 'model.onnx'), '--router-init', 'random', '--json');
    expect(res.code, res.stderr).toBe(0);
    const skipped = JSON.parse(res.stdout).routing.notConverted as { layer: number; reason: string }[];
    expect(skipped.map((s) => s.layer)).toEqual([0, 2]);
    for (const s of skipped)
      expect(s.reason).toMatch(
        /^the attn_mask of Attention node '.*' is computed by Or node '.*', an op modc does not read in a mask; the layer's KV cache is kept full$/,
      );
  });
});

describe('a windowed static layer routes, with the window by original position', () => {
  it.each(['block', 'attention'] as const)(
    '%s: every token selected, ungated, reproduces the original (prefill and 8 decode steps, batch 3, contexts past the window)',
    async (granularity) => {
      const compiled = compileWith(tmp, WINDOW, 'all-pass', { gated: false, granularity });
      expect(compiled.plan.layers.map((l) => l.layer)).toEqual([0, 1, 2]);
      const names = loadModel(compiled.path).graph.inputs.map((v) => v.name);
      expect(names.filter((n) => n.startsWith('past_positions'))).toEqual(['past_positions.0', 'past_positions.2']);
      await expectSameRun(await ModSession.create(WINDOW), await ModSession.create(compiled.path), ROWS, 'right', STEPS, 1e-4, `${granularity} all-pass`);
    },
  );

  it('the reference executor with every token selected reproduces the original too', async () => {
    const compiled = compileWith(tmp, WINDOW, 'all-pass', { gated: false });
    const ref = await ModReference.create(WINDOW, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      await expectSameRun(await ModSession.create(WINDOW), ref, ROWS, 'right', STEPS, 1e-4, 'reference all-pass');
    } finally {
      await ref.release();
    }
  });

  const PARTS: [RoutedPart, RoutingMode, boolean][] = [
    ['block', 'threshold', true],
    ['attention', 'topk', false],
  ];

  it.each(PARTS)(
    '%s, %s routing (gated %s): random routers agree with the reference over 8 decode steps, and routing drops tokens',
    async (granularity, mode, gated) => {
      const compiled = compileWith(tmp, WINDOW, 'random', { mode, gated, threshold: 0.5, capacity: 0.5, granularity });
      expect(compiled.plan.layers.map((l) => l.layer)).toEqual([0, 1, 2]);
      const ref = await ModReference.create(WINDOW, compiled.plan, join(tmp, `ref${counter++}`));
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

  it('present_positions.l holds the original position of every token the layer kept, in its first slots, and the window really drops cached keys', async () => {
    const compiled = compileWith(tmp, WINDOW, 'random', { mode: 'threshold', gated: true, threshold: 0.5 });
    const ref = await ModReference.create(WINDOW, compiled.plan, join(tmp, `ref${counter++}`));
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
        // The reference's selections as original positions: prefill token s is at s (right
        // padding), the token of step t at the row's length + t.
        const expected = ROWS.map((row, b) => [
          ...ref.selections[0]!.get(String(layer))![b]!,
          ...ref.selections.slice(1).flatMap((call, t) => (call.get(String(layer))![b]!.length ? [row.length + t] : [])),
        ]);
        const lengths = Array.from(mod.lastOutputs[`present_lengths.${layer}`]!.data as BigInt64Array, Number);
        const pos = mod.lastOutputs[`present_positions.${layer}`] as ort.Tensor;
        const P = pos.dims[1]!;
        expect(P).toBe(64);
        const got = lengths.map((n, b) => Array.from((pos.data as BigInt64Array).slice(b * P, b * P + n), Number));
        expect(got, `layer ${layer}`).toEqual(expected);
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
      const compiled = compileWith(tmp, WINDOW, 'random', { mode: 'threshold', gated: true, threshold: 0.5, granularity });
      const ref = await ModReference.create(WINDOW, compiled.plan, join(tmp, `ref${counter++}`));
      try {
        // By slot: the query i of this call at slot past_lengths.l + i, a key at its slot j.
        const model = loadModel(compiled.path);
        const nodes = windowBiases(model);
        expect(nodes).toHaveLength(2);
        for (const n of nodes) {
          const g = n.graph!;
          const layer = /^past_positions\.(\d+)$/.exec(n.input(1)!.producer!.input(0)!.name)![1];
          const pastLength = model.graph.inputs.find((v) => v.name === `past_lengths.${layer}`)!;
          const e = new Emitter(g, 24, `test/by-slot${layer}/`);
          const range = (of: number) => e.op('Range', [e.i64(0), e.dimScalar(n.input(of)!, 1), e.i64(1)]);
          n.setInput(0, e.op('Add', [e.unsqueeze(pastLength, [1]), e.unsqueeze(range(0), [0])]));
          n.setInput(1, e.unsqueeze(range(1), [0]));
          g.toposort();
        }
        const bySlot = join(tmp, `by-slot${counter++}`, 'model.onnx');
        saveModel(model, bySlot);
        expect(await worstOverRun(await ModSession.create(bySlot), ref)).toBeGreaterThan(1e-3);
        // The unmodified compile agrees (the check can pass).
        expect(await worstOverRun(await ModSession.create(compiled.path), ref)).toBeLessThan(1e-4);
      } finally {
        await ref.release();
      }
    },
  );

  it('modc verify passes on routed compiles (block and attention) over contexts past the window; generate runs the routed model', async () => {
    for (const granularity of ['block', 'attention']) {
      const out = join(tmp, `cli-${granularity}`, 'model.onnx');
      expect((await runCli('compile', WINDOW, '-o', out, '-q', '--router-init', 'random', '--granularity', granularity)).code).toBe(0);
      const verify = await runCli('verify', WINDOW, out, '--steps', '8', '--ids', ROWS.map((r) => r.join(',')).join(';'), '--json');
      expect(verify.code, verify.stdout + verify.stderr).toBe(0);
      expect(JSON.parse(verify.stdout).passed).toBe(true);
    }
    const gen = await runCli('generate', join(tmp, 'cli-block', 'model.onnx'), '--ids', '1,2,3,4,5,6;7,8', '--max-new', '9', '--json');
    expect(gen.code, gen.stderr).toBe(0);
    expect(JSON.parse(gen.stdout).ids.map((r: number[]) => r.length)).toEqual([15, 11]);
  });

  it("a causal mask with slot < nonpad_kv_seqlen and no window (mobius's bias without a sliding window) routes: all-pass reproduces the original", async () => {
    const path = build({ attention: 'static', staticMask: 'mobius' }, 'mobius-nowindow');
    const compiled = compileWith(tmp, path, 'all-pass', { gated: false });
    expect(compiled.plan.layers.map((l) => l.layer)).toEqual([0, 1, 2]);
    expect(windowBiases(loadModel(compiled.path))).toHaveLength(0);
    await expectSameRun(await ModSession.create(path), await ModSession.create(compiled.path), ROWS, 'right', 4, 1e-4, 'mobius, no window');
  });

  it('float16 static caches with the window: all-pass reproduces the original and random routers agree with the reference', async () => {
    const path = join(tmp, 'f16', 'model.onnx');
    writeFormModel(buildStandardDecoder(FORMS_CONFIG, TINY_SEED, { cache: 'static', float16: true, staticMask: 'mobius', slotWindow: 4 }), path);
    const tol = await tolerance(path, 1e-4);
    const allPass = compileWith(tmp, path, 'all-pass', { gated: false });
    expect(allPass.plan.layers).toHaveLength(3);
    expect(await worstOverRun(await ModSession.create(path), await ModSession.create(allPass.path))).toBeLessThan(tol);
    const compiled = compileWith(tmp, path, 'random', { mode: 'topk', capacity: 0.5, gated: true });
    const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      expect(await worstOverRun(await ModSession.create(compiled.path), ref)).toBeLessThan(tol);
    } finally {
      await ref.release();
    }
  });
});
