/**
 * Sub-layer routing (SPEC.md, "Sub-layer routing"), on every model in fixtures/:
 * - attention: an unselected token gets no attention update and is no key or value (the layer's
 *   cache is compacted); the MLP runs on every token;
 * - mlp: attention and the KV cache stay full; an unselected token gets no MLP update;
 * - the equivalence anchor holds for both (prefill and decode, batch 1 and batch 3 with padding);
 * - with random routers the compiled model agrees with the reference executor (threshold and
 *   top-k, gated and ungated), with the same per-layer cache lengths;
 * - a layer may route both parts; `modc.routing` names each part's selection value.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import type { StreamStep } from '../compiler/analysis/types.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { replaceUsesWithin } from '../compiler/core/ir/rewrite.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { randomRouters, writeRouterFile } from '../compiler/routing/router-weights.js';
import { readRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import { describeLayerPart, type RoutedPart, type RoutingMode } from '../compiler/routing/routing-plan.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { createSession, emptyTensor, ort } from '../compiler/runtime/ort.js';
import { lastPosition, ModSession, typed } from '../compiler/runtime/session.js';
import { contractModels, expectOneLineError, fixture, runCli, tempDir } from './helpers.js';
import { compileWith, expectSameRun, padSides, prefillSelection, PROMPTS, splittingThreshold, tolerance, worstReal, worstRows } from './mod-helpers.js';

const tmp = tempDir('modc-granularity');
let counter = 0;

/** Each part meets both routing modes and both gatings across its two cases. */
const CASES: Record<'attention' | 'mlp', [RoutingMode, boolean][]> = {
  attention: [
    ['threshold', true],
    ['topk', false],
  ],
  mlp: [
    ['threshold', false],
    ['topk', true],
  ],
};

/** The compiled model and the reference agree on a prompt and `steps` teacher-forced steps. */
async function agreeWithReference(mod: ModSession, ref: ModReference, rows: number[][], pad: 'left' | 'right', steps: number, tol: number): Promise<void> {
  expect(worstReal(await mod.forward(rows, { pad }), await ref.forward(rows, { pad }), rows, pad), 'prefill').toBeLessThan(tol);
  for (let t = 0; t < steps; t++) {
    const next = rows.map((_, r) => t + r + 1);
    expect(worstRows(lastPosition(await mod.step(next)), lastPosition(await ref.step(next))), `step ${t}`).toBeLessThan(tol);
  }
  expect(mod.layerCacheLengths()).toEqual(ref.layerCacheLengths());
  // A routed layer's empty slots (rows that selected different counts) go when the session compacts.
  mod.compact();
  expect(mod.layerCacheLengths()).toEqual(ref.layerCacheLengths());
  expect(mod.kvBytes()).toBe(ref.kvBytes());
}

/**
 * The per-model contract is split like test/mod.test.ts (quick models in `npm test`, the rest in
 * `npm run test:slow`); the single-model cases below run once per full run, in the quick
 * project, and are registered only there (describeOnce), so neither project lists them as skipped.
 */
const ONCE = process.env.MODC_TEST_MODELS !== 'rest';
const describeOnce = (ONCE ? describe : () => undefined) as typeof describe;

describe.each(contractModels())('$name', ({ path }) => {
  describe.each(['attention', 'mlp'] as const)('%s granularity', (part) => {
    it('all tokens selected and ungated reproduces the original: prefill and decode, batch 1 and batch 3 with padding', async () => {
      const tol = await tolerance(path, 1e-4);
      const compiled = compileWith(tmp, path, 'all-pass', { gated: false, granularity: part });
      const meta = readRoutingMetadata(loadModel(compiled.path))!;
      expect(meta.layers.map((l) => l.part)).toEqual(compiled.plan.layers.map(() => part));
      // Batch 3 with padding on each side the attention supports; batch 1 once.
      const runs = [...padSides(path).map((pad) => [pad, PROMPTS.b3] as const), [padSides(path)[0]!, PROMPTS.b1] as const];
      for (const [pad, rows] of runs) {
        const [orig, mod] = await Promise.all([ModSession.create(path), ModSession.create(compiled.path)]);
        await expectSameRun(orig, mod, rows, pad, 4, tol, `pad ${pad}, batch ${rows.length}`);
      }
    });

    it.each(CASES[part])('random routers, %s routing (gated %s), agree with the reference executor', async (mode, gated) => {
      const tol = await tolerance(path, 1e-4);
      const pad = padSides(path).at(-1)!;
      const rows = PROMPTS.b3;
      // p = 0.5 can pass none or all tokens of a trained model: a threshold that splits them.
      const threshold = mode === 'threshold' ? await splittingThreshold(tmp, path, rows, pad, { gated, granularity: part }) : 0.5;
      const compiled = compileWith(tmp, path, 'random', { mode, gated, threshold, capacity: 0.5, granularity: part });
      const mod = await ModSession.create(compiled.path);
      const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
      try {
        await agreeWithReference(mod, ref, rows, pad, 2, tol);
        // Routing is partial: some real tokens skip the part, some run it.
        const { selected, real } = prefillSelection(ref, rows);
        expect(selected).toBeGreaterThan(0);
        expect(selected).toBeLessThan(real);
        const context = rows.map((r) => r.length + 2);
        const lengths = mod.layerCacheLengths();
        if (part === 'mlp') {
          // Attention ran on every token: every cache holds the whole context.
          expect(lengths).toEqual(lengths.map(() => context));
        } else {
          // Skipped tokens are no keys: some cache is shorter than its row's context.
          expect(lengths.some((layer) => layer.some((n, r) => n < context[r]!))).toBe(true);
        }
      } finally {
        await ref.release();
      }
    });
  });
});

/** Both parts of every other layer routed from a BF16 router file, attention alone elsewhere. */
function bothPartsFile(path: string, dir: string): string {
  const s = analyzeDecoder(loadModel(path));
  const all = s.layers.map((l) => l.index);
  const file = join(dir, `both${counter++}.safetensors`);
  writeRouterFile(
    file,
    [
      ...randomRouters(all, s.hiddenSize, 5, 'attention'),
      ...randomRouters(
        all.filter((l) => l % 2 === 1),
        s.hiddenSize,
        6,
        'mlp',
      ),
    ],
    { mode: 'topk', gated: true },
    { dtype: 'BF16' },
  );
  return file;
}

/** Both parts on one layer: two forms in `npm test`, two more in `npm run test:slow`. */
const BOTH_PARTS = ONCE ? ['neox-tiny', 'genai-tiny'] : ['llama-tiny', 'forms-fused-gpt2-tiny'];

describe.each(BOTH_PARTS)('both parts on one layer: %s', (name) => {
  const path = fixture(name);

  it("agrees with the reference executor (mode and gating from the file's metadata)", async () => {
    const tol = await tolerance(path, 1e-4);
    const compiled = compileWith(tmp, path, 'file', { routerFile: bothPartsFile(path, tmp) });
    expect(compiled.plan.mode).toBe('topk');
    expect(compiled.plan.layers.filter((l) => l.layer === 1).map((l) => l.part)).toEqual(['attention', 'mlp']);
    const pad = padSides(path).at(-1)!;
    const mod = await ModSession.create(compiled.path);
    const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      await agreeWithReference(mod, ref, PROMPTS.b3, pad, 2, tol);
      expect([...ref.selections[0]!.keys()]).toContain('1 (mlp)');
    } finally {
      await ref.release();
    }
  });

  it('all-pass on both parts of every layer reproduces the original', async () => {
    const s = analyzeDecoder(loadModel(path));
    const file = join(tmp, `allpass${counter++}.safetensors`);
    const zero = new Float32Array(s.hiddenSize);
    writeRouterFile(
      file,
      s.layers.flatMap((l) => (['attention', 'mlp'] as RoutedPart[]).map((part) => ({ layer: l.index, part, weight: zero, bias: 20 }))),
      { mode: 'threshold', gated: false },
    );
    const compiled = compileWith(tmp, path, 'file', { gated: false, routerFile: file });
    expect(compiled.plan.layers).toHaveLength(2 * s.layers.length);
    const pad = padSides(path).at(-1)!;
    const [orig, mod] = await Promise.all([ModSession.create(path), ModSession.create(compiled.path)]);
    await expectSameRun(orig, mod, PROMPTS.b3, pad, 3, await tolerance(path, 1e-4), `pad ${pad}`);
  });
});

/**
 * llama-builder-tiny rewritten into a one-add parallel-residual decoder (out = x + (a(x) + m(x)),
 * GPT-J style): the MLP's norm reads x, and one Add joins the two branches.
 */
function parallelOneAdd(): string {
  const model = loadModel(fixture('llama-builder-tiny'));
  const g = model.graph;
  for (const layer of analyzeDecoder(model).layers) {
    const [attn, mlp] = layer.steps as [StreamStep, StreamStep];
    const x = attn.streamIn;
    replaceUsesWithin(new Set(mlp.branchNodes), attn.sum!, x);
    const join = g.addNode('Add', [attn.branch, mlp.branch], 1, { before: mlp.node }).output(0);
    mlp.node.setInput(mlp.streamOperandIndex, x);
    mlp.node.setInput(mlp.branchOperandIndex, join);
  }
  g.eliminateDeadCode();
  const path = join(tmp, 'parallel-one-add', 'model.onnx');
  saveModel(model, path);
  return path;
}

describeOnce('one-add parallel residual (out = x + (a + m))', () => {
  it('has one step per layer, and each part routes: anchor and reference agree', async () => {
    const path = parallelOneAdd();
    const s = analyzeDecoder(loadModel(path));
    expect(s.layers.map((l) => l.steps.length)).toEqual(s.layers.map(() => 1));
    for (const part of ['attention', 'mlp'] as const) {
      const anchor = compileWith(tmp, path, 'all-pass', { gated: false, granularity: part });
      expect(anchor.plan.layers).toHaveLength(s.layers.length);
      const [orig, mod] = await Promise.all([ModSession.create(path), ModSession.create(anchor.path)]);
      await expectSameRun(orig, mod, PROMPTS.b3, 'left', 3, 1e-4, `${part} anchor`);
      const compiled = compileWith(tmp, path, 'random', { mode: 'topk', gated: true, granularity: part });
      expect(readRoutingMetadata(loadModel(compiled.path))!.layers.map((l) => l.part)).toEqual(s.layers.map(() => part));
      const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
      try {
        await agreeWithReference(await ModSession.create(compiled.path), ref, PROMPTS.b3, 'left', 2, 1e-4);
      } finally {
        await ref.release();
      }
    }
  });
});

describeOnce('routing metadata of sub-layer parts', () => {
  it("names each part's selection: a bool [B, S] value equal to what the reference selected", async () => {
    const path = fixture('llama-tiny');
    const compiled = compileWith(tmp, path, 'file', { gated: true, routerFile: bothPartsFile(path, tmp) });
    const model = loadModel(compiled.path);
    const meta = readRoutingMetadata(model)!;
    expect(meta.layers.map((l) => describeLayerPart(l))).toEqual(compiled.plan.layers.map((l) => describeLayerPart(l)));
    // Expose each selection as a graph output and read it off one prefill.
    for (const l of meta.layers) {
      const v = model.graph.findValue(l.selected)!;
      expect(v.producer?.graph, `${l.selected} lives in the main graph`).toBe(model.graph);
      v.type = { tensor_type: { elem_type: DataType.BOOL } };
      model.graph.outputs.push(v);
    }
    const exposed = join(tmp, `exposed${counter++}`, 'model.onnx');
    saveModel(model, exposed);
    const io = decoderIo(model);
    const rows = PROMPTS.b1[0]!;
    const feeds: Record<string, ort.Tensor> = {
      [io.inputIds.name]: typed(io.inputIds.dtype, rows, [1, rows.length]),
      [io.attentionMask!.name]: typed(
        io.attentionMask!.dtype,
        rows.map(() => 1),
        [1, rows.length],
      ),
      [io.positionIds!.name]: typed(
        io.positionIds!.dtype,
        rows.map((_, i) => i),
        [1, rows.length],
      ),
    };
    for (const b of io.kv) {
      feeds[b.pastKey] = emptyTensor(b.dtype, [1, b.numHeads, 0, b.headSize]);
      if (b.pastValue) feeds[b.pastValue] = emptyTensor(b.dtype, [1, b.numHeads, 0, b.headSize]);
      if (b.pastLength) feeds[b.pastLength] = typed('int64', [0], [1]);
      if (b.pastValid) feeds[b.pastValid] = new ort.Tensor('bool', new Uint8Array(0), [1, 0]);
    }
    const session = await createSession(exposed);
    const out = await session.run(feeds);
    await session.release();
    const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      await ref.forward([rows]);
      for (const l of meta.layers) {
        const mask = Array.from(out[l.selected]!.data as Uint8Array, Boolean);
        const picks = mask.flatMap((on, i) => (on ? [i] : []));
        expect(picks, describeLayerPart(l)).toEqual(ref.selections[0]!.get(describeLayerPart(l))![0]);
      }
    } finally {
      await ref.release();
    }
  });
});

describeOnce('modc compile --granularity', () => {
  it('routes the named part, and verify passes it', async () => {
    const path = fixture('neox-tiny');
    const out = join(tmp, 'cli-mlp', 'model.onnx');
    const res = await runCli('compile', path, '-o', out, '--router-init', 'random', '--granularity', 'mlp', '--routing', 'topk', '--json');
    expect(res.code).toBe(0);
    expect(JSON.parse(res.stdout).routing.converted.map((l: { part: string }) => l.part)).toEqual(['mlp', 'mlp', 'mlp']);
    const verify = await runCli('verify', path, out, '--steps', '2', '--json');
    expect(verify.code).toBe(0);
    expect(JSON.parse(verify.stdout).checks.map((c: { passed: boolean }) => c.passed)).toEqual([true, true]);
  });

  it('refuses an unknown granularity (exit 2) and a router file whose part tensor does not fit (exit 1), naming it', async () => {
    const path = fixture('llama-tiny');
    expectOneLineError(
      await runCli('compile', path, '-o', join(tmp, 'x.onnx'), '--router-init', 'random', '--granularity', 'head'),
      2,
      /--granularity must be one of block, attention, mlp/,
    );
    const file = join(tmp, 'bad-part.safetensors');
    writeRouterFile(file, [{ layer: 1, part: 'mlp', weight: new Float32Array(10), bias: 0 }], undefined, { dtype: 'BF16' });
    expectOneLineError(
      await runCli('compile', path, '-o', join(tmp, 'y.onnx'), '--routers', file),
      1,
      /'router\.1\.mlp\.weight' has shape \[10\], expected \[64\]/,
    );
  });
});
