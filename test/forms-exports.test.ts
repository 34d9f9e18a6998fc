/**
 * Forms of third-party exports rebuilt with the fixture builder (fixtures/builder), so that
 * `npm test` covers them without the exports themselves (test/interop runs those in place):
 * state outside every layer, a shared prefix reading a layer's cache, a fused embedding sum,
 * a batch-1-only mask, and what `modc verify` says about a model it cannot check.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { decodeModelProto } from '../compiler/core/proto/index.js';
import { buildFormDecoder, writeFormModel } from '../fixtures/builder/forms.js';
import { writeGenaiModel } from '../fixtures/builder/genai.js';
import { expectOneLineError, runCli, tempDir } from './helpers.js';

const tmp = tempDir('modc-forms-exports');
const CONFIG = { hiddenSize: 64, numLayers: 3, numHeads: 4, numKvHeads: 2, intermediateSize: 64, vocabSize: 256, maxPositions: 256 };
const SEED = 20240601;

interface Report {
  passed: boolean;
  checks: { name: string; passed: boolean; maxDiff: number[] }[];
}

/** Compiles `source` with `args` into `tag`, then `modc verify --steps N --json` must pass both checks. */
async function compileAndVerify(source: string, tag: string, args: string[], steps = 3): Promise<Report> {
  const out = join(tmp, tag, 'model.onnx');
  const compiled = await runCli('compile', source, '-o', out, '-q', ...args);
  expect(compiled.stderr).toBe('');
  expect(compiled.code).toBe(0);
  const verified = await runCli('verify', source, out, '--steps', String(steps), '--json');
  expect(verified.stderr).toBe('');
  const report = JSON.parse(verified.stdout) as Report;
  expect(
    report.checks.map((c) => [c.name, c.passed, c.maxDiff.length]),
    verified.stdout,
  ).toEqual([
    ['semantics', true, steps + 1],
    ['anchor', true, steps + 1],
  ]);
  expect(verified.code).toBe(0);
  return report;
}

describe('GroupQueryAttention decoder with state outside every layer, added into the logits', () => {
  const model = writeFormModel(buildFormDecoder(CONFIG, SEED, { attention: 'gqa', suffixState: true }), join(tmp, 'suffix-state', 'model.onnx'));

  it('the state belongs to no layer: the analysis finds none in the layers, the I/O contract carries both tensors', () => {
    const m = loadModel(model);
    expect(analyzeDecoder(m).layers.map((l) => l.state.length)).toEqual([0, 0, 0]);
    expect(decoderIo(m).state.map((s) => s.past)).toEqual(['past_key_values.0.conv_state', 'past_key_values.0.recurrent_state']);
  });

  it('an all-pass ungated compile verifies against the reference, prefill and 3 decode steps', async () => {
    await compileAndVerify(model, 'suffix-state-ap', ['--router-init', 'all-pass', '--ungated']);
  });

  it('a random-router compile verifies against the reference', async () => {
    await compileAndVerify(model, 'suffix-state-random', ['--router-init', 'random']);
  });

  it('the same sum over the logits without the padding mask couples the tokens: no layer is converted, naming the node', async () => {
    const m = buildFormDecoder(CONFIG, SEED, { attention: 'gqa', suffixState: true });
    const sum = m.graph.nodes.find((n) => n.opType === 'ReduceSum' && n.name.startsWith('/model/suffix_state'))!;
    const masked = sum.input(0)!.producer!;
    expect(masked.opType).toBe('Mul');
    sum.setInput(0, masked.input(0)!); // the raw logits, padding rows included
    const path = writeFormModel(m, join(tmp, 'suffix-unmasked', 'model.onnx'));
    const res = await runCli('compile', path, '-o', join(tmp, 'suffix-unmasked-out', 'model.onnx'), '--router-init', 'all-pass');
    expectOneLineError(
      res,
      1,
      /^modc: no layer was converted \(layer 0: the model couples tokens after its last layer: ReduceSum node '\/model\/suffix_state\/ReduceSum' reduces over the token axis/,
    );
  });
});

describe('onnxruntime-genai fp16 Llama whose shared mask reads the past length off past_key_values.0.key (unsorted, external data)', () => {
  const model = join(tmp, 'genai-pastkey', 'model.onnx');
  writeGenaiModel({ ...CONFIG, numKvHeads: CONFIG.numHeads }, { kind: 'random', seed: SEED }, model, { pastLengthFrom: 'cache', unsorted: true });

  it('the fixture is that form: the shared mask reads Shape(past_key_values.0.key), the node list is unsorted, the weights external', () => {
    const proto = decodeModelProto(readFileSync(model));
    const nodes = proto.graph!.node;
    expect(nodes.some((n) => n.op_type === 'Shape' && n.input[0] === 'past_key_values.0.key')).toBe(true);
    const producedAt = new Map(nodes.flatMap((n, i) => n.output.map((o) => [o, i] as const)));
    expect(nodes.some((n, i) => n.input.some((v) => (producedAt.get(v) ?? -1) > i))).toBe(true);
    expect(existsSync(`${model}.data`)).toBe(true);
  });

  it('the dense-past-length pass alone: the mask no longer reads the shape of the cache, and the logits are unchanged', async () => {
    const out = join(tmp, 'genai-pastkey-pass', 'model.onnx');
    const res = await runCli('compile', model, '-o', out, '--passes', 'dense-past-length,cleanup', '--json');
    expect(res.code).toBe(0);
    const shapeOfPast = (path: string) =>
      decodeModelProto(readFileSync(path))
        .graph!.node.filter((n) => n.op_type === 'Shape' && n.input[0] === 'past_key_values.0.key')
        .map((n) => n.output[0]);
    // The mask's read is gone; what is left reads the cache's other dims for the rewrite's Concat.
    expect(shapeOfPast(model)).toHaveLength(1);
    expect(shapeOfPast(out)).not.toContain(shapeOfPast(model)[0]);
    expect(shapeOfPast(out).every((v) => v!.startsWith('modc/dense_past/'))).toBe(true);
    const logits = async (path: string) => JSON.parse((await runCli('run', path, '--ids', '5,6,7;8,9', '--json')).stdout).logits;
    expect(await logits(out)).toEqual(await logits(model));
  });

  it.each([
    ['every layer routed, left padding', [], 'left'],
    ['every layer routed, right padding', [], 'right'],
    ['layer 0 routed alone (layers 1 and 2 read the shared mask at decode), left padding', ['--layers', '0'], 'left'],
    ['layer 0 routed alone, right padding', ['--layers', '0'], 'right'],
  ] as const)('random routers, %s: modc verify passes (prefill and 3 decode steps)', async (_, layers, pad) => {
    const tag = `genai-pastkey-${layers.join('')}`;
    const out = join(tmp, tag, 'model.onnx');
    if (!existsSync(out)) {
      const compiled = await runCli('compile', model, '-o', out, '-q', '--router-init', 'random', ...layers);
      expect(compiled.stderr).toBe('');
    }
    const verified = await runCli('verify', model, out, '--steps', '3', '--pad', pad);
    expect(verified.stderr).toBe('');
    expect(verified.stdout).toMatch(/^PASS semantics: .*\nPASS anchor: /);
    expect(verified.code).toBe(0);
  });

  it('layer 0 routed alone: generate decodes (the dense layers get a mask as wide as their own caches)', async () => {
    const out = join(tmp, 'genai-pastkey-gen', 'model.onnx');
    expect((await runCli('compile', model, '-o', out, '-q', '--router-init', 'random', '--layers', '0')).code).toBe(0);
    const res = await runCli('generate', out, '--ids', '1,2,3,4,5;6,7', '--max-new', '3', '--json');
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    const json = JSON.parse(res.stdout) as { ids: number[][]; cacheLengths: number[][] };
    expect(json.ids.map((r) => r.length)).toEqual([8, 5]);
    // The dense layers cached every token of each row.
    expect(json.cacheLengths.slice(1)).toEqual([
      [8, 5],
      [8, 5],
    ]);
  });
});

describe("mobius's embedding: token and learned position embeddings summed by the first SkipLayerNormalization", () => {
  const gqa = writeFormModel(buildFormDecoder(CONFIG, SEED, { attention: 'gqa', embedding: 'skip-norm' }), join(tmp, 'skipnorm-gqa', 'model.onnx'));
  const standard = writeFormModel(
    buildFormDecoder(CONFIG, SEED, { attention: 'standard', staticCausal: 'padding', embedding: 'skip-norm' }),
    join(tmp, 'skipnorm-standard', 'model.onnx'),
  );

  it("the skip-norm is the embedding's fused boundary: the stream starts at its output 3, layer 0 reads its output 0", () => {
    const s = analyzeDecoder(loadModel(gqa));
    const node = s.embedding.boundary?.node;
    expect(node?.opType).toBe('SkipLayerNormalization');
    expect(s.embedding.output).toBe(node!.outputs[3]);
    expect(s.embedding.positionTable?.name).toBe('model.embed_positions.weight');
    expect(s.layers.map((l) => l.residualIn)).toHaveLength(3);
    expect(s.layers[0]!.residualIn).toBe(node!.outputs[3]);
    expect(s.layers[0]!.entryBoundary?.normed).toBe(node!.outputs[0]);
    expect(s.explain.some((e) => e.subject === 'function com.microsoft::SkipLayerNormalization' && /runs the contrib kernel/.test(e.reason))).toBe(true);
  });

  it('the model-local function of the same name is not what runs: a body that differs changes neither ONNX Runtime nor the analysis', async () => {
    const model = loadModel(gqa);
    const fn = model.findFunction('com.microsoft', 'SkipLayerNormalization')!;
    fn.body.nodes.find((n) => n.opType === 'Add')!.opType = 'Sub';
    const changed = join(tmp, 'skipnorm-shadow', 'model.onnx');
    saveModel(model, changed);
    const logits = async (path: string) => JSON.parse((await runCli('run', path, '--ids', '5,6,7;8,9', '--json')).stdout).logits;
    expect(await logits(changed)).toEqual(await logits(gqa));
    const layers = (path: string) => analyzeDecoder(loadModel(path)).layers.map((l) => [l.residualIn.name, l.nodes.length]);
    expect(layers(changed)).toEqual(layers(gqa));
  });

  it.each([
    ['GroupQueryAttention', 'block'],
    ['GroupQueryAttention', 'attention'],
    ['GroupQueryAttention', 'mlp'],
    ['standard Attention', 'block'],
    ['standard Attention', 'attention'],
    ['standard Attention', 'mlp'],
  ] as const)('%s, %s routing: a random-router compile verifies, and keeps the function', async (form, granularity) => {
    const source = form === 'standard Attention' ? standard : gqa;
    await compileAndVerify(source, `skipnorm-${form.split(' ')[0]}-${granularity}`, ['--router-init', 'random', '--granularity', granularity], 2);
    const compiled = loadModel(join(tmp, `skipnorm-${form.split(' ')[0]}-${granularity}`, 'model.onnx'));
    expect(compiled.findFunction('com.microsoft', 'SkipLayerNormalization')).toBeDefined();
  });

  it('an all-pass ungated compile verifies (prefill and 3 decode steps)', async () => {
    await compileAndVerify(standard, 'skipnorm-ap', ['--router-init', 'all-pass', '--ungated']);
  });
});

describe("mobius's batch-1-only mask (the mask's rows land on the query axis)", () => {
  const model = writeFormModel(
    buildFormDecoder(CONFIG, SEED, { attention: 'standard', staticCausal: 'padding', embedding: 'skip-norm', batchOneMask: true }),
    join(tmp, 'batch-one', 'model.onnx'),
  );
  const data = join(tmp, 'batch-one', 'data.jsonl');
  writeFileSync(
    data,
    [
      [5, 6, 7, 8, 9, 10],
      [11, 12, 13],
      [14, 15, 16, 17, 18],
      [19, 20, 21, 22],
      [23, 24, 25, 26, 27, 28, 29],
    ]
      .map((ids) => JSON.stringify({ ids }))
      .join('\n') + '\n',
  );
  const compiled = join(tmp, 'batch-one-random', 'model.onnx');

  it('is found by dataflow, naming the Unsqueeze that moves the batch; the same model with a [B, 1, S, T] mask is not', () => {
    expect(decoderIo(loadModel(model)).batchOne).toMatch(/^Unsqueeze node '\/model\/attn_mask\/Unsqueeze' moves attention_mask's batch axis to axis 1/);
    expect(decoderIo(loadModel(join(tmp, 'skipnorm-standard', 'model.onnx'))).batchOne).toBeNull();
  });

  it('run and generate take one row, and refuse two in one line (the original and a compiled model)', async () => {
    expect((await compileAndVerify(model, 'batch-one-random', ['--router-init', 'random'])).passed).toBe(true);
    for (const path of [model, compiled]) {
      expect((await runCli('run', path, '--ids', '5,6,7')).code).toBe(0);
      expectOneLineError(await runCli('run', path, '--ids', '5,6,7;8,9'), 1, /this model runs one row at a time \(Unsqueeze node .*\): give one row, not 2/);
      expectOneLineError(await runCli('generate', path, '--ids', '5,6;8,9', '--max-new', '2'), 1, /runs one row at a time/);
    }
  });

  it('verify (default prompt), eval (default batch), calibrate and bench run it one row at a time', async () => {
    const verified = await runCli('verify', model, compiled, '--steps', '2');
    expect(verified.stderr).toBe('');
    expect(verified.code).toBe(0);
    for (const path of [model, compiled]) {
      const evaluated = await runCli('eval', path, '--data', data, '--json');
      expect(evaluated.stderr).toBe('');
      expect(JSON.parse(evaluated.stdout).tokens).toBeGreaterThan(0);
    }
    const routers = join(tmp, 'batch-one', 'routers.safetensors');
    const calibrated = await runCli('calibrate', model, '--data', data, '-o', routers, '--target-compute', '0.8', '--sensitivity-tokens', '16', '-q');
    expect(calibrated.stderr).toBe('');
    expect(calibrated.code).toBe(0);
    const bench = await runCli('bench', model, compiled, '--prompt', '4', '--steps', '1', '--runs', '1', '--warmup', '0', '--json');
    expect(bench.stderr).toBe('');
    expect(bench.code).toBe(0);
    expectOneLineError(await runCli('bench', model, compiled, '--prompt', '4', '--steps', '1', '--runs', '1', '--batch', '2'), 1, /runs one row at a time/);
  });
});
