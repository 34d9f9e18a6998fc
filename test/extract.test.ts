/**
 * Layer extraction: the prefix, one model per layer and the suffix, chained by value name,
 * reproduce the original model's logits and presents, for a padded batch-2 prefill and a
 * decode step on top of it, for every decoder form.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { extractDecoder, perTokenInputs } from '../compiler/analysis/extract.js';
import { LayerByLayerRunner } from '../compiler/analysis/layer-executor.js';
import { ModcError } from '../compiler/errors.js';
import { loadModel } from '../compiler/io/load.js';
import { assertValid } from '../compiler/ir/verify.js';
import { decoderIo } from '../compiler/runtime/decoder-io.js';
import { createSession } from '../compiler/runtime/ort.js';
import { splitFusedBoundaries } from '../passes/split-fused-boundaries.js';
import { decodeStep, maxAbsDiff, prefill, type Feeds } from './extract-feeds.js';
import { ROOT, FIXTURES, tempDir } from './helpers.js';

const fixture = (name: string) => join(ROOT, 'fixtures', name, 'model.onnx');

/** GroupQueryAttention supports right padding only. */
const MODELS = [
  { name: 'gpt2-tiny', path: fixture('gpt2-tiny'), pad: 'left', tolerance: 1e-5 },
  { name: 'llama-tiny', path: fixture('llama-tiny'), pad: 'left', tolerance: 1e-5 },
  { name: 'neox-tiny', path: fixture('neox-tiny'), pad: 'left', tolerance: 1e-5 },
  { name: 'llama-builder-tiny', path: fixture('llama-builder-tiny'), pad: 'left', tolerance: 1e-5 },
  { name: 'ort-gpt2-fused', path: join(FIXTURES, 'ort-gpt2-fused', 'model.onnx'), pad: 'left', tolerance: 1e-5 },
  { name: 'ort-qwen2-gqa', path: join(FIXTURES, 'ort-qwen2-gqa', 'model.onnx'), pad: 'right', tolerance: 1e-2 },
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
      const first = prefill(io, [[5, 6, 7, 8, 9], [10, 11, 12]], pad);
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
    expect(layer.kv).toEqual({ key: { input: 'past_key_values.1.key', output: 'present.1.key' }, value: { input: 'past_key_values.1.value', output: 'present.1.value' }, layout: 'BHTD' });
    expect(perTokenInputs(layer).map((s) => [s.value.name, s.role, s.sequenceAxis])).toEqual([
      ['/rotary/Unsqueeze_1_output_0', 'rotary-cos', 2],
      ['/rotary/Unsqueeze_2_output_0', 'rotary-sin', 2],
    ]);
    expect(decoder.prefix.outputs).toEqual(expect.arrayContaining(['/embed_tokens/Gather_output_0', '/Where_output_0', '/rotary/Unsqueeze_1_output_0']));
    expect(decoder.suffix.inputs).toEqual(['/layers.2/Add_4_output_0']);
    expect(decoder.suffix.outputs).toEqual(['logits']);
  });

  it('refuse a fused boundary until it is split', () => {
    const model = loadModel(join(FIXTURES, 'ort-qwen2-gqa', 'model.onnx'));
    expect(() => extractDecoder(model, analyzeDecoder(model))).toThrow(ModcError);
    expect(() => extractDecoder(model, analyzeDecoder(model))).toThrow(/^layer 0 cannot be extracted: its boundary is fused into com\.microsoft::SkipLayerNormalization node 'SkipLayerNorm_1'; run split-fused-boundaries first$/);
  });
});

function compare(expected: Feeds, actual: Feeds, tolerance: number): void {
  for (const [name, t] of Object.entries(expected)) {
    expect(actual[name], name).toBeDefined();
    expect(maxAbsDiff(t, actual[name]!), name).toBeLessThan(tolerance);
  }
}
