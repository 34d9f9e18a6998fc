/**
 * Decoder forms the analysis reads by dataflow rather than by pattern:
 *
 * - a layer with no norm (fixtures/forms-nonorm-tiny: layers 0 and 2 read the stream itself);
 *   a post-norm model (the stream itself passes through the norm) is refused by name;
 * - an MLP that is one com.microsoft MoE / QMoE op (fixtures/forms-moe-tiny): routed as the MLP
 *   part, and costed as the k experts each token runs;
 * - lm_head with a bias;
 * - a model whose only output is hidden states (no vocabulary projection after the final norm):
 *   compile and verify route it; the commands that need logits refuse it in one line.
 */
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { modelCosts, readCosts } from '../compiler/analysis/cost.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { attribute, Value } from '../compiler/core/ir/graph.js';
import { Tensor } from '../compiler/core/ir/tensor.js';
import { ModReference } from '../compiler/apps/reference/mod-reference.js';
import { ModSession } from '../compiler/runtime/session.js';
import { buildFormDecoder, type FormOptions, writeFormModel } from '../fixtures/builder/forms.js';
import { FIXTURES_DIR, FORMS_CONFIG, TINY_SEED } from '../fixtures/build-fixtures.js';
import { allModels, expectOneLineError, runCli, tempDir } from './helpers.js';
import { compileWith, expectSameRun, prefillSelection, PROMPTS, worstReal, worstRows } from './mod-helpers.js';
import { lastPosition } from '../compiler/runtime/session.js';

const tmp = tempDir('modc-dataflow');
const NONORM = join(FIXTURES_DIR, 'forms-nonorm-tiny', 'model.onnx');
const MOE = join(FIXTURES_DIR, 'forms-moe-tiny', 'model.onnx');
const ROWS = PROMPTS.b3;
let counter = 0;

function build(form: FormOptions, name: string): string {
  return writeFormModel(buildFormDecoder(FORMS_CONFIG, TINY_SEED, form), join(tmp, `${name}-${counter++}`, 'model.onnx'));
}

/** All-pass (ungated) reproduces the original, and seeded random routers agree with the reference (prefill and 4 steps), for each granularity. */
async function routesLikeTheReference(path: string, what: string): Promise<void> {
  for (const granularity of ['block', 'attention', 'mlp'] as const) {
    const allPass = compileWith(tmp, path, 'all-pass', { gated: false, granularity });
    expect(
      allPass.plan.layers.map((l) => l.layer),
      `${what} ${granularity}`,
    ).toEqual([0, 1, 2]);
    await expectSameRun(await ModSession.create(path), await ModSession.create(allPass.path), ROWS, 'right', 4, 1e-4, `${what} ${granularity} all-pass`);
    const compiled = compileWith(tmp, path, 'random', { mode: 'threshold', threshold: 0.5, gated: true, granularity });
    const ref = await ModReference.create(path, compiled.plan, join(tmp, `ref${counter++}`));
    try {
      const mod = await ModSession.create(compiled.path);
      expect(
        worstReal(await mod.forward(ROWS, { pad: 'right' }), await ref.forward(ROWS, { pad: 'right' }), ROWS, 'right'),
        `${what} ${granularity}`,
      ).toBeLessThan(1e-4);
      for (let t = 0; t < 4; t++) {
        const next = ROWS.map((_, r) => t + r + 1);
        expect(worstRows(lastPosition(await mod.step(next)), lastPosition(await ref.step(next))), `${what} ${granularity} step ${t}`).toBeLessThan(1e-4);
      }
      const { selected, real } = prefillSelection(ref, ROWS);
      expect(selected).toBeGreaterThan(0);
      expect(selected).toBeLessThan(real);
    } finally {
      await ref.release();
    }
  }
}

async function compileAndVerify(path: string, ...args: string[]): Promise<string> {
  const out = join(tmp, `cli${counter++}`, 'model.onnx');
  const compiled = await runCli('compile', path, '-o', out, '-q', '--router-init', 'random', ...args);
  expect(compiled.code, compiled.stderr).toBe(0);
  const verify = await runCli('verify', path, out, '--json');
  expect(verify.code, verify.stdout + verify.stderr).toBe(0);
  expect(JSON.parse(verify.stdout).passed).toBe(true);
  return out;
}

describe('a layer with no norm', () => {
  it('is found by dataflow: its steps have no norm evidence and read the stream value itself', () => {
    const s = analyzeDecoder(loadModel(NONORM));
    expect(s.layers).toHaveLength(3);
    expect(s.layers.map((l) => l.steps.map((st) => st.norm?.kind ?? null))).toEqual([
      [null, null],
      ['decomposed', 'decomposed'],
      [null, null],
    ]);
    for (const l of s.layers) expect(l.steps.map((st) => st.input)).toEqual([l.residualIn, l.steps[0]!.sum]);
    expect(s.explain.some((e) => e.verdict === 'accepted' && / with no norm$/.test(e.reason))).toBe(true);
  });

  it('routes: all-pass reproduces the original and random routers agree with the reference (block, attention, MLP)', async () => {
    await routesLikeTheReference(NONORM, 'no norm');
  });

  it('modc verify passes on a routed compile', async () => {
    await compileAndVerify(NONORM, '--routing', 'topk');
  });

  it('a post-norm model (the stream itself passes through the norm) is refused in one line, naming the norm', async () => {
    const path = build({ postNorm: true }, 'postnorm');
    expect(() => analyzeDecoder(loadModel(path))).toThrow(
      /^a post-norm residual stream: .* passes through ReduceMean node '\/model\/layers\.0\/input_layernorm\/ReduceMean' before /,
    );
    expectOneLineError(
      await runCli('compile', path, '-o', join(tmp, 'postnorm-out', 'model.onnx'), '--router-init', 'all-pass'),
      1,
      /post-norm residual stream/,
    );
  });
});

describe('an MLP that is one com.microsoft MoE or QMoE op', () => {
  const [H, I, E, K] = [FORMS_CONFIG.hiddenSize, FORMS_CONFIG.intermediateSize, 4, 2];

  it("is the layer's MLP part, costed as the gate plus the k experts a token runs (fc1 + fc2 each)", () => {
    const s = analyzeDecoder(loadModel(MOE));
    // The MLP part: its norm, the gate MatMul, the Reshape of its logits to [B*S, E], the MoE op.
    for (const l of s.layers) expect(l.mlpNodes.map((n) => n.opType).slice(-3)).toEqual(['MatMul', 'Reshape', 'MoE']);
    const costs = modelCosts(s);
    expect(costs.layers.map((c) => c.mlp)).toEqual([0, 1, 2].map(() => H * E + K * (I * H + H * I)));
  });

  it('counts fc3 when there is one, and QMoE weights unpacked (4-bit: two per byte)', () => {
    const model = loadModel(MOE);
    for (const n of model.graph.nodes.filter((x) => x.opType === 'MoE')) {
      const fc3 = model.graph.addInitializer(new Value(model.graph.uniqueName('fc3')), Tensor.fromArray('', [E, I, H], new Float32Array(E * I * H)));
      n.setInputs([...n.inputs, null, fc3]);
    }
    expect(modelCosts(analyzeDecoder(model)).layers[0]!.mlp).toBe(H * E + K * 3 * I * H);
    const q = loadModel(build({ mlp: 'qmoe' }, 'qmoe'));
    expect(modelCosts(analyzeDecoder(q)).layers[0]!.mlp).toBe(H * E + K * 2 * I * H);
    for (const n of q.graph.nodes.filter((x) => x.opType === 'QMoE')) {
      n.setAttr(attribute('expert_weight_bits', 4));
      for (const slot of [2, 5]) {
        const dims = n.input(slot)!.initializer!.dims;
        const half = [dims[0]!, dims[1]!, dims[2]! / 2];
        n.setInput(
          slot,
          q.graph.addInitializer(
            new Value(q.graph.uniqueName('packed')),
            Tensor.fromArray('', half, new Uint8Array(half[0]! * half[1]! * half[2]!), DataType.UINT8),
          ),
        );
      }
    }
    expect(modelCosts(analyzeDecoder(q)).layers[0]!.mlp).toBe(H * E + K * 2 * I * H);
  });

  it("ONNX Runtime 1.29's CPU EP runs it: all-pass reproduces the original and random routers agree with the reference (block, attention, MLP)", async () => {
    await routesLikeTheReference(MOE, 'MoE');
  });

  it('QMoE (8-bit experts) routes too, and a compiled model records the experts in its costs, which eval reads', async () => {
    const path = build({ mlp: 'qmoe' }, 'qmoe');
    const compiled = compileWith(tmp, path, 'all-pass', { gated: false, granularity: 'mlp' });
    await expectSameRun(await ModSession.create(path), await ModSession.create(compiled.path), ROWS, 'right', 4, 1e-4, 'QMoE mlp all-pass');
    expect(readCosts(loadModel(compiled.path))!.layers.map((l) => l.mlp)).toEqual([0, 1, 2].map(() => H * E + K * 2 * I * H));
    // The compute fraction eval reports weighs the MLP by its experts: skipping half the MLP
    // tokens saves about half the experts' MACs, far more than the gate's.
    const routed = await compileAndVerify(path, '--granularity', 'mlp', '--routing', 'topk', '--capacity', '0.5');
    const data = join(tmp, 'qmoe.jsonl');
    writeFileSync(data, '{"ids": [5, 6, 7, 8, 9, 10, 11, 12]}\n{"ids": [13, 14, 15, 16, 17, 18]}\n');
    const res = await runCli('eval', routed, '--data', data, '--json');
    expect(res.code, res.stderr).toBe(0);
    const fraction = JSON.parse(res.stdout).computeFraction as number;
    const c = readCosts(loadModel(routed))!;
    const dense = c.layers.reduce((a, l) => a + l.attention + l.mlp, c.lmHead);
    expect(fraction).toBeLessThan(1 - (0.3 * 3 * (H * E + K * 2 * I * H)) / dense);
  });
});

describe('lm_head with a bias', () => {
  it('compile, verify, --logits last and eval work; the bias is in the logits', async () => {
    const path = build({ lmHeadBias: true }, 'lmbias');
    const plain = build({}, 'plain');
    const [a, b] = [await ModSession.create(path), await ModSession.create(plain)];
    expect(worstReal(await a.forward(ROWS, { pad: 'right' }), await b.forward(ROWS, { pad: 'right' }), ROWS, 'right')).toBeGreaterThan(1e-2);
    expect(analyzeDecoder(loadModel(path)).final.kind).toBe('logits');
    const routed = await compileAndVerify(path);
    const last = await compileAndVerify(path, '--logits', 'last');
    // The last position's logits of each row, bias included, as the full compile gives them.
    const [full, one] = [
      await (await ModSession.create(routed)).forward(ROWS, { pad: 'right' }),
      await (await ModSession.create(last)).forward(ROWS, { pad: 'right' }),
    ];
    const V = FORMS_CONFIG.vocabSize;
    expect(one.dims).toEqual([ROWS.length, 1, V]);
    const lastReal = ROWS.map((r, b) => full.data.subarray((b * full.dims[1] + r.length - 1) * V, (b * full.dims[1] + r.length) * V));
    expect(
      worstRows(
        lastReal,
        ROWS.map((_, b) => one.data.subarray(b * V, (b + 1) * V)),
      ),
    ).toBeLessThan(1e-5);
    const data = join(tmp, 'lmbias.jsonl');
    writeFileSync(data, '{"ids": [5, 6, 7, 8, 9, 10]}\n{"ids": [11, 12, 13]}\n');
    for (const p of [path, routed]) {
      const res = await runCli('eval', p, '--data', data, '--json');
      expect(res.code, res.stderr).toBe(0);
      expect(JSON.parse(res.stdout).nll).toBeGreaterThan(0);
    }
  });
});

describe('a model whose only output is hidden states', () => {
  it("is read as such by dataflow (no vocabulary projection after the final norm); every fixture's output is logits", () => {
    const s = analyzeDecoder(buildFormDecoder(FORMS_CONFIG, TINY_SEED, { output: 'hidden' }));
    expect([s.final.kind, s.final.logits.name]).toEqual(['hidden', 'last_hidden_state']);
    expect(s.explain.some((e) => /holds hidden states: no vocabulary projection follows the stream/.test(e.reason))).toBe(true);
    expect(modelCosts(s).lmHead).toBe(0);
    for (const m of allModels()) {
      let kind: string;
      try {
        kind = analyzeDecoder(loadModel(m.path)).final.kind;
      } catch {
        continue;
      }
      expect(kind, m.name).toBe('logits');
    }
  });

  it('compile and verify route it; generate, eval, run, calibrate and --logits last refuse it in one line', async () => {
    const path = build({ output: 'hidden' }, 'hidden');
    const routed = await compileAndVerify(path);
    expect(loadModel(routed).metadataProps.find((p) => p.key === 'modc.output')?.value).toBe('hidden');
    const data = join(tmp, 'hidden.jsonl');
    writeFileSync(data, '{"ids": [5, 6, 7, 8, 9, 10]}\n{"ids": [11, 12, 13]}\n');
    const why =
      /^modc: (generate|eval|run|calibrate) needs logits, and this model outputs hidden states \(last_hidden_state \[batch, sequence_length, 32\]: no vocabulary projection follows its final norm\)/;
    for (const p of [path, routed]) {
      expectOneLineError(await runCli('generate', p, '--ids', '1,2,3', '--max-new', '2'), 1, why);
      expectOneLineError(await runCli('eval', p, '--data', data), 1, why);
      expectOneLineError(await runCli('run', p, '--ids', '1,2,3'), 1, why);
    }
    expectOneLineError(await runCli('calibrate', path, '--data', data, '--target-compute', '0.7', '-o', join(tmp, 'hidden-routers.safetensors')), 1, why);
    const out = join(tmp, 'hidden-last', 'model.onnx');
    expectOneLineError(await runCli('compile', path, '-o', out, '--router-init', 'random', '--logits', 'last'), 1, /--logits last needs logits/);
    expect(existsSync(out)).toBe(false);
  });
});

describe('hidden states and logits of the same weights', () => {
  it('the logits model is the hidden-state model followed by lm_head: the routed hidden-state compile, projected, equals the routed logits compile', async () => {
    const hidden = build({ output: 'hidden' }, 'hidden-pair');
    const logits = build({}, 'logits-pair');
    const [h, l] = [compileWith(tmp, hidden, 'random', { threshold: 0.5 }), compileWith(tmp, logits, 'random', { threshold: 0.5 })];
    // Append lm_head to the compiled hidden-state model.
    const model = loadModel(h.path);
    const out = model.graph.outputs.find((v) => v.name === 'last_hidden_state')!;
    const weight = loadModel(logits).graph.initializers.get('lm_head.weight')!.initializer!;
    const w = model.graph.addInitializer(new Value('lm_head.weight'), weight);
    const projected = model.graph.addNode('MatMul', [out, w], [model.graph.newValue('logits')]).output(0);
    projected.type = { tensor_type: { elem_type: DataType.FLOAT } };
    model.graph.outputs = [projected, ...model.graph.outputs.filter((v) => v !== out)];
    model.metadataProps = model.metadataProps.filter((p) => p.key !== 'modc.output');
    const path = join(tmp, 'projected', 'model.onnx');
    saveModel(model, path);
    const [a, b] = [await ModSession.create(path), await ModSession.create(l.path)];
    expect(worstReal(await a.forward(ROWS, { pad: 'right' }), await b.forward(ROWS, { pad: 'right' }), ROWS, 'right')).toBeLessThan(1e-4);
  });
});
