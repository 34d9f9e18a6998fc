/**
 * Layer extraction: the prefix, one model per layer and the suffix, chained by value name,
 * reproduce the original model's logits and presents, for a padded batch-2 prefill and a
 * decode step on top of it, for every decoder form.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { extractDecoder, extractUnits, perTokenInputs } from '../compiler/analysis/extract.js';
import { LayerByLayerRunner } from '../compiler/runtime/layer-runner.js';
import { ModcError } from '../compiler/core/errors.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { assertValid } from '../compiler/core/ir/validate.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { createSession } from '../compiler/runtime/ort.js';
import { splitFusedBoundaries } from '../compiler/passes/split-fused-boundaries.js';
import { decodeStep, maxAbsDiff, prefill, type Feeds } from './extract-feeds.js';
import { ROOT, FIXTURES, tempDir } from './helpers.js';

const fixture = (name: string) => join(ROOT, 'fixtures', name, 'model.onnx');

/** GroupQueryAttention supports right padding only. */
const MODELS = [
  { name: 'gpt2-tiny', path: fixture('gpt2-tiny'), pad: 'left', tolerance: 1e-5 },
  { name: 'llama-tiny', path: fixture('llama-tiny'), pad: 'left', tolerance: 1e-5 },
  { name: 'neox-tiny', path: fixture('neox-tiny'), pad: 'left', tolerance: 1e-5 },
  { name: 'llama-builder-tiny', path: fixture('llama-builder-tiny'), pad: 'left', tolerance: 1e-5 },
  { name: 'forms-fused-gpt2-tiny', path: join(FIXTURES, 'forms-fused-gpt2-tiny', 'model.onnx'), pad: 'left', tolerance: 1e-5 },
  { name: 'forms-gqa-fp16-tiny', path: join(FIXTURES, 'forms-gqa-fp16-tiny', 'model.onnx'), pad: 'right', tolerance: 1e-2 }, // fp16
  { name: 'genai-tiny', path: fixture('genai-tiny'), pad: 'left', tolerance: 1e-2 },
] as const;

function extracted(path: string) {
  const model = loadModel(path);
  splitFusedBoundaries(model, analyzeDecoder(model));
  return { model, decoder: extractDecoder(model, analyzeDecoder(model)) };
}

describe.each(MODELS)('layer-by-layer execution of $name', ({ path, pad, tolerance }) => {
  const dir = tempDir('modc-extract');

  it('chaining prefix, layers and suffix reproduces the original outputs: padded batch-2 prefill, then a decode step', async () => {
    const { model, decoder } = extracted(path);
    for (const u of [decoder.prefix, ...decoder.layers, decoder.suffix]) assertValid(u.model, `unit ${u.name}`);
    const io = decoderIo(model);
    const original = await createSession(path);
    const runner = await LayerByLayerRunner.create(decoder, dir);
    try {
      const first = prefill(
        io,
        [
          [5, 6, 7, 8, 9],
          [10, 11, 12],
        ],
        pad,
      );
      const expected = (await original.run(first.feeds)) as Feeds;
      compare(expected, await runner.run(first.feeds), tolerance);
      const second = decodeStep(io, first, expected, [13, 14]);
      compare((await original.run(second.feeds)) as Feeds, await runner.run(second.feeds), tolerance);
    } finally {
      await runner.release();
    }
  });
});

describe('layer units', () => {
  it('name their residual, KV and per-token inputs (llama-tiny: rotary cos/sin, token axis 2)', () => {
    const { decoder } = extracted(fixture('llama-tiny'));
    const layer = decoder.layers[1]!;
    expect(layer.name).toBe('layer.1');
    expect(layer.inputs[0]).toBe('/layers.0/Add_4_output_0');
    expect(layer.residualOut).toBe('/layers.1/Add_4_output_0');
    expect(layer.outputs).toEqual(expect.arrayContaining(['/layers.1/Add_4_output_0', 'present.1.key', 'present.1.value']));
    expect(layer.kv).toEqual({
      key: { input: 'past_key_values.1.key', output: 'present.1.key' },
      value: { input: 'past_key_values.1.value', output: 'present.1.value' },
      layout: 'BHTD',
    });
    expect(perTokenInputs(layer).map((s) => [s.value.name, s.role, s.sequenceAxis])).toEqual([
      ['/rotary/Unsqueeze_1_output_0', 'rotary-cos', 2],
      ['/rotary/Unsqueeze_2_output_0', 'rotary-sin', 2],
    ]);
    expect(decoder.prefix.outputs).toEqual(expect.arrayContaining(['/embed_tokens/Gather_output_0', '/Where_output_0', '/rotary/Unsqueeze_1_output_0']));
    expect(decoder.suffix.inputs).toEqual(['/layers.2/Add_4_output_0']);
    expect(decoder.suffix.outputs).toEqual(['logits']);
  });

  it('refuse a fused boundary until it is split', () => {
    const model = loadModel(join(FIXTURES, 'forms-gqa-fp16-tiny', 'model.onnx'));
    expect(() => extractDecoder(model, analyzeDecoder(model))).toThrow(ModcError);
    expect(() => extractDecoder(model, analyzeDecoder(model))).toThrow(
      /^layer 0 cannot be extracted: its boundary is fused into com\.microsoft::SkipLayerNormalization node 'SkipLayerNorm_1'; run split-fused-boundaries first$/,
    );
  });
});

describe('units cut anywhere', () => {
  const dir = tempDir('modc-extract-cut');

  /**
   * forms-integer-tiny has no value_info: the cut value Mul(Cast(MatMulInteger(..)), scale[H]) is
   * a [B, S, H] float whose rank only inference can tell. A unit must declare it as rank 3 (or
   * leave the rank unknown), never as the rank of the scale; and a cut after MatMulInteger or
   * QuantizeLinear exchanges int32 and uint8 values, not floats.
   */
  it('declare what a cut value really is, and chain to the original outputs (quantized form, no value_info)', async () => {
    const path = fixture('forms-integer-tiny');
    const model = loadModel(path);
    const nodes = model.graph.nodes;
    const at = (name: string) => nodes.findIndex((n) => n.name === name);
    const cuts = [at('/model/layers.0/self_attn/QuantizeLinear'), at('/model/layers.0/self_attn/q_proj/MatMulInteger'), at('/model/layers.0/self_attn/Mul_8')];
    expect(cuts.every((i) => i >= 0)).toBe(true);
    const bounds = [0, ...cuts.map((i) => i + 1), nodes.length];
    const groups = bounds.slice(1).map((end, i) => ({ name: `part${i}`, nodes: nodes.slice(bounds[i], end) }));
    const units = extractUnits(model, groups);
    const declared = (unit: number, name: string) => {
      const v = units[unit]!.model.graph.inputs.find((x) => x.name === name);
      expect(v, `${name} enters part${unit}`).toBeDefined();
      return { elem: v!.type?.tensor_type?.elem_type, rank: v!.type?.tensor_type?.shape?.dim?.length };
    };
    expect(declared(1, '/model/layers.0/self_attn/QuantizeLinear/output_0')).toEqual({ elem: DataType.UINT8, rank: 3 });
    expect(declared(2, '/model/layers.0/self_attn/q_proj/MatMulInteger/output_0')).toEqual({ elem: DataType.INT32, rank: 3 });
    expect(declared(3, '/model/layers.0/self_attn/Mul_8/output_0')).toEqual({ elem: DataType.FLOAT, rank: 3 });
    // Chained in ORT, the pieces give the original outputs.
    const io = decoderIo(model);
    const { feeds } = prefill(
      io,
      [
        [5, 6, 7, 8, 9],
        [10, 11, 12],
      ],
      'left',
    );
    const expected = (await (await createSession(path)).run(feeds)) as Feeds;
    const values = new Map(Object.entries(feeds));
    for (const u of units) {
      const file = join(dir, u.name, 'model.onnx');
      saveModel(u.model, file);
      const session = await createSession(file);
      const out = (await session.run(Object.fromEntries(u.inputs.map((n) => [n, values.get(n)!])))) as Feeds;
      for (const [n, t] of Object.entries(out)) values.set(n, t);
    }
    for (const [name, t] of Object.entries(expected)) expect(maxAbsDiff(t, values.get(name)!), name).toBe(0);
  });
});

function compare(expected: Feeds, actual: Feeds, tolerance: number): void {
  for (const [name, t] of Object.entries(expected)) {
    expect(actual[name], name).toBeDefined();
    expect(maxAbsDiff(t, actual[name]!), name).toBeLessThan(tolerance);
  }
}
