/**
 * Megatron GPT-2 as torch exports it (fixtures/forms-megatron-tiny, fixtures/builder/megatron.ts):
 * the caller supplies a 4-D float attention mask [B, 1, 64, 64] in sequence-index coordinates,
 * each layer has one combined cache past_i [2, B, H, P, D] cut by Split/Squeeze (nodes reading
 * no stream value) and stacked into present_i after its concats, and no-op Casts carry the
 * residual stream between adds. Analysis, the runners' 4-D mask, the equivalence anchor, routed
 * compiles against the reference executor (which gathers the caller's mask itself), and the CLI.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { subLayersOf } from '../compiler/analysis/sub-layers.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { loadModel } from '../compiler/core/io/load.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { attribute, Value } from '../compiler/core/ir/graph.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { createSession, emptyTensor, int64Tensor, ort, toFloat32 } from '../compiler/runtime/ort.js';
import { lastPosition, maskFeed, type MaskRule, ModSession } from '../compiler/runtime/session.js';
import { FORM_FIXTURES, FORMS_CONFIG, TINY_SEED } from '../fixtures/build-fixtures.js';
import { buildMegatronDecoder } from '../fixtures/builder/megatron.js';
import { saveModel } from '../compiler/core/io/save.js';
import { expectOneLineError, fixture, runCli, tempDir } from './helpers.js';
import { compileWith, expectSameRun, prefillSelection, PROMPTS, splittingThreshold, worstReal, worstRows } from './mod-helpers.js';

const tmp = tempDir('modc-megatron');
const PATH = fixture('forms-megatron-tiny');
const CONFIG = { ...FORMS_CONFIG, ...FORM_FIXTURES.find((f) => f.dir === 'forms-megatron-tiny')!.config };
const M = 64;
let counter = 0;

/** The caller's causal mask for rows `real` (1 real, 0 padding), as a [B, 1, M, M] float tensor built here. */
function causal(real: number[][], rule: MaskRule = (_b, i, j) => j <= i): ort.Tensor {
  const data = new Float32Array(real.length * M * M);
  real.forEach((row, b) => row.forEach((_, i) => row.forEach((r, j) => r && rule(b, i, j) && (data[(b * M + i) * M + j] = 1))));
  return new ort.Tensor('float32', data, [real.length, 1, M, M]);
}

/** Plain ONNX Runtime feeds of the fixture (no modc runner): ids, positions, mask, empty or given caches. */
function feeds(ids: number[][], positions: number[][], mask: ort.Tensor, past: ort.InferenceSession.OnnxValueMapType | null): Record<string, ort.Tensor> {
  const B = ids.length;
  const f: Record<string, ort.Tensor> = {
    input_ids: int64Tensor(ids.flat(), [B, ids[0]!.length]),
    position_ids: int64Tensor(positions.flat(), [B, ids[0]!.length]),
    attention_mask: mask,
  };
  for (let l = 0; l < CONFIG.numLayers; l++) f[`past_${l}`] = past ? (past[`present_${l}`] as ort.Tensor) : emptyTensor('float32', [2, B, 4, 0, 8]);
  return f;
}

const maxDiff = (a: Float32Array, b: Float32Array) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i]!)), 0);

describe('the fixture (plain ONNX Runtime, masks built here)', () => {
  it('is a causal decoder with a working cache: two calls give the one-call logits; a left-padded row gives the unpadded logits', async () => {
    const s = await createSession(PATH);
    const ids = [3, 9, 27, 81, 5, 15];
    const full = toFloat32((await s.run(feeds([ids], [[0, 1, 2, 3, 4, 5]], causal([[1, 1, 1, 1, 1, 1]]), null))).logits as ort.Tensor);
    const first = await s.run(feeds([ids.slice(0, 4)], [[0, 1, 2, 3]], causal([[1, 1, 1, 1]]), null));
    const rest = toFloat32((await s.run(feeds([ids.slice(4)], [[4, 5]], causal([[1, 1, 1, 1, 1, 1]]), first))).logits as ort.Tensor);
    expect(maxDiff(rest, full.slice(4 * 256))).toBeLessThan(1e-5);
    const padded = toFloat32((await s.run(feeds([[0, 0, ...ids]], [[0, 0, 0, 1, 2, 3, 4, 5]], causal([[0, 0, 1, 1, 1, 1, 1, 1]]), null))).logits as ort.Tensor);
    expect(maxDiff(padded.slice(2 * 256), full)).toBeLessThan(1e-5);
    // The mask is what the caller gives: a prefix-LM mask (the first 3 tokens see each other) changes the logits.
    const prefixLm = toFloat32(
      (
        await s.run(
          feeds(
            [ids],
            [[0, 1, 2, 3, 4, 5]],
            causal([[1, 1, 1, 1, 1, 1]], (_b, i, j) => j <= i || j < 3),
            null,
          ),
        )
      ).logits as ort.Tensor,
    );
    expect(maxDiff(prefixLm.slice(0, 256), full.slice(0, 256))).toBeGreaterThan(1e-3);
  });

  it('the no-op Casts on the stream change nothing: the same weights without them give the same logits', async () => {
    const plain = join(tmp, 'nocast', 'model.onnx');
    saveModel(buildMegatronDecoder(CONFIG, TINY_SEED, { castStream: false }), plain);
    const run = async (path: string) =>
      toFloat32((await (await createSession(path)).run(feeds([[4, 8, 15, 16]], [[0, 1, 2, 3]], causal([[1, 1, 1, 1]]), null))).logits as ort.Tensor);
    expect(maxDiff(await run(plain), await run(PATH))).toBe(0);
  });
});

describe('analysis', () => {
  let analysed: ReturnType<typeof analyzeDecoder> | undefined;
  const structure = () => (analysed ??= analyzeDecoder(loadModel(PATH)));

  it('takes the 4-D attention_mask as the caller-4d form: query axis 2, key axis 3', () => {
    expect(structure().mask.form).toBe('caller-4d');
    for (const l of structure().layers) {
      const masks = l.sideInputs.filter((si) => si.kind === 'attention-mask');
      expect(masks.map((m) => [m.value.name, m.kind === 'attention-mask' && [m.form, m.queryAxis, m.keyAxis]])).toEqual([
        ['attention_mask', ['caller-4d', 2, 3]],
      ]);
    }
    const io = decoderIo(loadModel(PATH));
    expect(io.attentionMask).toEqual({ name: 'attention_mask', dtype: 'int64', caller4d: { size: 64, dtype: 'float32' } });
    expect(io.maxPositions).toBe(64);
  });

  it('refuses a 4-D mask that is not [batch, 1, M, M], in one line', async () => {
    const model = buildMegatronDecoder(CONFIG, TINY_SEED);
    const mask = model.graph.inputs.find((v) => v.name === 'attention_mask')!;
    mask.type = { tensor_type: { elem_type: DataType.FLOAT, shape: { dim: [{ dim_param: 'b' }, { dim_value: 2 }, { dim_value: 64 }, { dim_value: 64 }] } } };
    const path = join(tmp, 'heads2', 'model.onnx');
    saveModel(model, path);
    expectOneLineError(await runCli('inspect', path), 1, /input attention_mask has dims \[b, 2, 64, 64\]; a caller's 4-D attention mask is \[batch, 1, M, M\]/);
  });

  it('follows each combined cache by dataflow: past_i through Split/Squeeze, present_i stacked after the concats', () => {
    expect(
      structure().layers.map((l) => [l.kv.key.input.name, l.kv.key.output.name, l.kv.value.input.name, l.kv.layout, l.kv.numKvHeads, l.kv.headSize]),
    ).toEqual([0, 1, 2].map((i) => [`past_${i}`, `present_${i}`, `past_${i}`, 'combined-2BHTD', 4, 8]));
  });

  it("owns the past's Split/Squeeze in the layer: it reads past_i itself, and no side input is left unexplained", () => {
    for (const l of structure().layers) {
      const cut = l.nodes.filter((n) => n.inputs[0] === l.kv.key.input);
      expect(cut.map((n) => n.opType)).toEqual(['Split']);
      expect(l.nodes.filter((n) => n.opType === 'Squeeze')).toHaveLength(2);
      expect(l.sideInputs.filter((si) => si.kind !== 'weight').map((si) => [si.kind, si.value.name])).toEqual([
        ['past-kv', `past_${l.index}`],
        ['attention-mask', 'attention_mask'],
      ]);
    }
    expect(structure().prefixNodes.map((n) => n.opType)).toEqual(['Gather', 'Gather', 'Add', 'Cast']);
  });

  it('carries the stream through the no-op Casts: attention and MLP steps in every layer, each layer ending at its Cast', () => {
    for (const l of structure().layers) {
      expect(l.steps.map((st) => [st.node.opType, st.carry.map((n) => n.opType)])).toEqual([
        ['Add', ['Cast']],
        ['Add', ['Cast']],
      ]);
      expect(l.residualOut).toBe(l.steps[1]!.carry[0]!.output(0));
      expect(l.mlpNodes.filter((n) => n.opType === 'MatMul')).toHaveLength(2);
      const parts = subLayersOf(l, new Set(loadModel(PATH).graph.outputs));
      expect('reason' in parts).toBe(false);
      if ('reason' in parts) continue;
      expect([parts.attention.blocker, parts.mlp.blocker]).toEqual([null, null]);
      // The MLP reads the stream after the Cast that follows the attention add.
      expect(parts.mlp.input).toBe(l.steps[0]!.carried);
    }
    expect(structure().final.residual).toBe(structure().layers[2]!.residualOut);
  });

  it('refuses, naming the Add, a residual step the walk cannot follow, instead of leaving the MLP in the suffix', () => {
    const model = buildMegatronDecoder({ ...CONFIG, numLayers: 1 }, TINY_SEED);
    // The Cast between the two residual adds now changes the element type: it no longer carries the stream.
    const add = model.graph.nodes.find((n) => n.name === '/layers.0/Add')!;
    const cast = add.output(0).consumers()[0]!;
    expect(cast.opType).toBe('Cast');
    cast.setAttr(attribute('to', DataType.DOUBLE));
    expect(() => analyzeDecoder(model)).toThrow(
      /ends at %\/layers\.0\/Add\/output_0 after layer 0, but Add node '\/layers\.0\/Add_1' adds a stream-dependent branch to a value carried from it: a residual step modc could not follow .*\(last rejected: .*cast to another element type \(1 -> 11\)/,
    );
  });
});

describe('runners build the 4-D mask', () => {
  it('maskFeed: m[b, 0, i, j] = key j real and j <= i, over the context, zero elsewhere', () => {
    const io = decoderIo(loadModel(PATH));
    const t = maskFeed(io, [
      [0, 1, 1],
      [1, 1, 0],
    ])!;
    expect([t.type, t.dims]).toEqual(['float32', [2, 1, 64, 64]]);
    const d = t.data as Float32Array;
    const rows = (b: number) => [0, 1, 2, 3].map((i) => Array.from(d.slice((b * M + i) * M, (b * M + i) * M + 4)));
    expect(rows(0)).toEqual([
      [0, 0, 0, 0],
      [0, 1, 0, 0],
      [0, 1, 1, 0],
      [0, 0, 0, 0],
    ]);
    expect(rows(1)).toEqual([
      [1, 0, 0, 0],
      [1, 1, 0, 0],
      [1, 1, 0, 0],
      [0, 0, 0, 0],
    ]);
    expect(d.reduce((a, v) => a + v, 0)).toBe(3 + 5);
  });

  it('ModSession gives the logits plain ONNX Runtime gives with the mask built here, left padding, prefill and a step', async () => {
    const rows = [[3, 9, 27, 81], [5]];
    const session = await ModSession.create(PATH);
    const got = await session.forward(rows, { pad: 'left' });
    const real = [
      [1, 1, 1, 1],
      [0, 0, 0, 1],
    ];
    const s = await createSession(PATH);
    const want = await s.run(
      feeds(
        [
          [3, 9, 27, 81],
          [0, 0, 0, 5],
        ],
        [
          [0, 1, 2, 3],
          [0, 0, 0, 0],
        ],
        causal(real),
        null,
      ),
    );
    expect(maxDiff(got.data, toFloat32(want.logits as ort.Tensor))).toBe(0);
    const step = await session.step([7, 7]);
    const next = await s.run(feeds([[7], [7]], [[4], [1]], causal(real.map((r) => [...r, 1])), want));
    expect(maxDiff(step.data, toFloat32(next.logits as ort.Tensor))).toBe(0);
  });

  it('run and generate drive the original; a context past the mask (padding included) is refused in one line', async () => {
    const run = await runCli('run', PATH, '--ids', '1,2,3;4,5', '--json');
    expect(run.code, run.stderr).toBe(0);
    expect(JSON.parse(run.stdout).dims).toEqual([2, 3, 256]);
    const gen = await runCli('generate', PATH, '--ids', '1,2,3;4,5', '--max-new', '3');
    expect(gen.code, gen.stderr).toBe(0);
    const long = Array.from({ length: 62 }, (_, i) => i + 1).join(',');
    expectOneLineError(
      await runCli('generate', PATH, '--ids', long, '--max-new', '3'),
      1,
      /a context of 65 tokens \(padding included\) is longer than the model's 64-position attention mask \(attention_mask\)/,
    );
    const session = await ModSession.create(PATH);
    await session.forward([Array.from({ length: 64 }, (_, i) => i), [1]]);
    await expect(session.step([1, 1])).rejects.toThrow(/a context of 65 tokens \(padding included\)/);
  });
});

describe('compiled', () => {
  it('all-pass ungated reproduces the original at every granularity: prefill and 8 greedy steps, batch 1 and 3, both padding sides', async () => {
    for (const granularity of ['block', 'attention', 'mlp'] as const) {
      const compiled = compileWith(tmp, PATH, 'all-pass', { gated: false, granularity });
      expect(compiled.plan.layers.map((l) => [l.layer, l.part])).toEqual([0, 1, 2].map((l) => [l, granularity]));
      for (const pad of ['left', 'right'] as const) {
        for (const rows of [PROMPTS.b1, PROMPTS.b3]) {
          const [orig, mod] = await Promise.all([ModSession.create(PATH), ModSession.create(compiled.path)]);
          await expectSameRun(orig, mod, rows, pad, 8, 1e-4, `${granularity}, pad ${pad}, batch ${rows.length}`);
        }
      }
    }
  });

  it('the compiled interface: past_sequence_length, and per compacted layer its slot validity and each slot’s sequence index', () => {
    const compiled = compileWith(tmp, PATH, 'all-pass', { gated: false });
    const g = loadModel(compiled.path).graph;
    const names = (vs: readonly Value[]) => vs.map((v) => v.name).filter((n) => /sequence|lengths|valid/.test(n));
    expect(names(g.inputs).sort()).toEqual(['past_sequence_length', ...[0, 1, 2].flatMap((l) => [`past_valid.${l}`, `past_sequence_indices.${l}`])].sort());
    expect(names(g.outputs).sort()).toEqual(
      ['present_sequence_length', ...[0, 1, 2].flatMap((l) => [`present_valid.${l}`, `present_sequence_indices.${l}`])].sort(),
    );
    const io = decoderIo(loadModel(compiled.path));
    expect(io.sequenceLength).toEqual({ past: 'past_sequence_length', present: 'present_sequence_length' });
    expect(io.kv.map((b) => [b.pastPositions, b.presentPositions])).toEqual(
      [0, 1, 2].map((l) => [`past_sequence_indices.${l}`, `present_sequence_indices.${l}`]),
    );
  });

  it.each([
    ['block', 'threshold', true, 'left'],
    ['block', 'topk', false, 'right'],
    ['attention', 'threshold', false, 'right'],
    ['mlp', 'threshold', true, 'left'],
  ] as const)('random routers (%s, %s, gated %s, pad %s) agree with the reference executor, prefill and 6 steps', async (granularity, mode, gated, pad) => {
    const rows = PROMPTS.b3;
    const threshold = mode === 'threshold' ? await splittingThreshold(tmp, PATH, rows, pad, { gated, granularity }) : 0.5;
    const compiled = compileWith(tmp, PATH, 'random', { mode, gated, threshold, capacity: 0.5, granularity });
    const mod = await ModSession.create(compiled.path);
    const ref = await ModReference.create(PATH, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      expect(worstReal(await mod.forward(rows, { pad }), await ref.forward(rows, { pad }), rows, pad), 'prefill').toBeLessThan(1e-4);
      for (let t = 0; t < 6; t++) {
        const next = [t + 1, t + 2, t + 3];
        expect(worstRows(lastPosition(await mod.step(next)), lastPosition(await ref.step(next))), `step ${t}`).toBeLessThan(1e-4);
      }
      expect(mod.layerCacheLengths()).toEqual(ref.layerCacheLengths());
      // Rows that selected different counts leave empty slots until the session compacts.
      mod.compact();
      expect(mod.kvBytes()).toBe(ref.kvBytes());
      const { selected, real } = prefillSelection(ref, rows);
      expect(selected).toBeGreaterThan(0);
      expect(selected).toBeLessThan(real);
    } finally {
      await ref.release();
    }
  });

  it("each compacted slot carries its token's sequence index: present_sequence_indices.l after the prefill are the selected tokens' columns", async () => {
    const rows = PROMPTS.b3;
    const threshold = await splittingThreshold(tmp, PATH, rows, 'left', {});
    const compiled = compileWith(tmp, PATH, 'random', { threshold });
    const mod = await ModSession.create(compiled.path);
    const ref = await ModReference.create(PATH, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      await mod.forward(rows, { pad: 'left' });
      await ref.forward(rows, { pad: 'left' });
      for (const l of [0, 1, 2]) {
        const t = mod.lastOutputs[`present_sequence_indices.${l}`] as ort.Tensor;
        const width = t.dims[1]!;
        const got = [0, 1, 2].map((b) => Array.from((t.data as BigInt64Array).slice(b * width, (b + 1) * width), Number));
        const picks = ref.selections[0]!.get(String(l))!;
        // Left padding: row b's token s sits at sequence index s; the slots after a row's picks are padding.
        picks.forEach((p, b) => expect(got[b]!.slice(0, p.length), `layer ${l} row ${b}`).toEqual(p));
        expect(width).toBe(Math.max(...picks.map((p) => p.length)));
      }
    } finally {
      await ref.release();
    }
  });

  it("gathers the caller's mask, not a rebuilt triangle: a prefix-LM mask (the first 4 tokens see each other) agrees with the reference", async () => {
    const rule: MaskRule = (_b, i, j) => j <= i || j < 4;
    const rows = PROMPTS.b3;
    const threshold = await splittingThreshold(tmp, PATH, rows, 'right', {});
    const compiled = compileWith(tmp, PATH, 'random', { threshold, gated: false });
    const [mod, causalMod] = [await ModSession.create(compiled.path, { maskRule: rule }), await ModSession.create(compiled.path)];
    const ref = await ModReference.create(PATH, compiled.plan, join(tmp, `ref${counter++}`), { maskRule: rule });
    try {
      const got = await mod.forward(rows, { pad: 'right' });
      expect(worstReal(got, await ref.forward(rows, { pad: 'right' }), rows, 'right'), 'prefill').toBeLessThan(1e-4);
      // The rule matters: with the causal mask the same compiled model gives other logits.
      expect(worstReal(got, await causalMod.forward(rows, { pad: 'right' }), rows, 'right')).toBeGreaterThan(1e-3);
      for (let t = 0; t < 4; t++) {
        const next = [t + 4, t + 5, t + 6];
        expect(worstRows(lastPosition(await mod.step(next)), lastPosition(await ref.step(next))), `step ${t}`).toBeLessThan(1e-4);
      }
    } finally {
      await ref.release();
    }
  });

  it("--logits last reads which of the call's tokens are real off the mask's diagonal: each row's last real logits, prefill and steps", async () => {
    const out = join(tmp, 'last', 'model.onnx');
    const res = await runCli('compile', PATH, '-o', out, '-q', '--router-init', 'all-pass', '--ungated', '--logits', 'last');
    expect(res.code, res.stderr).toBe(0);
    for (const pad of ['left', 'right'] as const) {
      const [orig, last] = [await ModSession.create(PATH), await ModSession.create(out)];
      const got = await last.forward(PROMPTS.b3, { pad });
      expect(got.dims).toEqual([3, 1, 256]);
      expect(worstRows(orig.lastReal(await orig.forward(PROMPTS.b3, { pad })), last.lastReal(got)), `prefill, pad ${pad}`).toBeLessThan(1e-4);
      for (const id of [3, 4]) expect(worstRows(lastPosition(await orig.step([id, id, id])), lastPosition(await last.step([id, id, id])))).toBeLessThan(1e-4);
    }
  });

  it('the CLI: verify passes all-pass and random compiles; run, generate, bench, eval and calibrate drive the compiled model', async () => {
    const dir = join(tmp, 'cli');
    const allPass = join(dir, 'all-pass.onnx');
    const random = join(dir, 'random.onnx');
    expect((await runCli('compile', PATH, '-o', allPass, '-q', '--router-init', 'all-pass', '--ungated')).code).toBe(0);
    expect((await runCli('compile', PATH, '-o', random, '-q', '--router-init', 'random')).code).toBe(0);
    for (const [compiled, pad] of [
      [allPass, 'left'],
      [random, 'right'],
    ] as const) {
      const v = await runCli('verify', PATH, compiled, '--steps', '3', '--pad', pad, '--json');
      expect(v.code, v.stderr).toBe(0);
      expect(JSON.parse(v.stdout).checks.map((c: { name: string; passed: boolean }) => [c.name, c.passed])).toEqual([
        ['semantics', true],
        ['anchor', true],
      ]);
    }
    const run = await runCli('run', random, '--ids', '1,2,3;4,5', '--json');
    expect(run.code, run.stderr).toBe(0);
    const gen = await runCli('generate', random, '--ids', '1,2,3;4,5', '--max-new', '4', '--json');
    expect(gen.code, gen.stderr).toBe(0);
    expect(JSON.parse(gen.stdout).ids.map((r: number[]) => r.length)).toEqual([7, 6]);
    const bench = await runCli('bench', PATH, random, '--prompt', '8', '--steps', '2', '--runs', '1', '--warmup', '0', '--threads', '1', '--json');
    expect(bench.code, bench.stderr).toBe(0);
    const data = join(dir, 'data.jsonl');
    writeFileSync(data, ['{"ids": [1, 2, 3, 4, 5, 6, 7, 8]}', '{"ids": [9, 10, 11]}', '{"ids": [12, 13, 14, 15, 16]}'].join('\n') + '\n');
    const ev = await runCli('eval', random, '--data', data, '--json');
    expect(ev.code, ev.stderr).toBe(0);
    const result = JSON.parse(ev.stdout);
    expect(result.computeFraction).toBeLessThan(1);
    expect(Number.isFinite(result.nll)).toBe(true);
    const routers = join(dir, 'routers.safetensors');
    const cal = await runCli('calibrate', PATH, '--data', data, '--target-compute', '0.8', '-o', routers, '-q');
    expect(cal.code, cal.stderr).toBe(0);
    const calibrated = join(dir, 'calibrated.onnx');
    expect((await runCli('compile', PATH, '--routers', routers, '-o', calibrated, '-q')).code).toBe(0);
    const v = await runCli('verify', PATH, calibrated, '--steps', '2');
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });
});
