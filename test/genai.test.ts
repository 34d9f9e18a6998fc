/**
 * onnxruntime-genai interop: `modc compile` rewrites the genai_config.json beside its input for
 * the output; it says (summary, --json, the file's `modc` section) when the compiled model's
 * per-layer cache lengths leave onnxruntime-genai's contract.
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadModel } from '../compiler/core/io/load.js';
import { expectOneLineError, FIXTURES, fixture, runCli, tempDir } from './helpers.js';

const dir = tempDir('modc-genai');
interface ModcLayer {
  layer: number;
  past_key: string;
  past_value: string | null;
  past_length: string | null;
  present_length: string | null;
  past_valid: string | null;
  present_valid: string | null;
  shape: unknown[];
}
// eslint-disable-next-line @typescript-eslint/no-explicit-any -- genai_config.json is free-form JSON; the tests read the fields they check
type GenaiConfig = { modc: { layers: ModcLayer[]; routing: { layers: { layer: number }[] } } & Record<string, any> } & Record<string, any>;
const config = (folder: string) => JSON.parse(readFileSync(join(folder, 'genai_config.json'), 'utf8')) as GenaiConfig;
const inputNames = (path: string) =>
  loadModel(path)
    .graph.inputs.map((v) => v.name)
    .sort();

describe('modc compile writes genai_config.json beside the output', () => {
  it('a routed model (GQA, fp16): the modc section carries per-layer cache names, lengths and shapes; the summary says genai cannot drive it', async () => {
    const out = join(dir, 'qwen', 'model.onnx');
    const res = await runCli('compile', fixture('forms-gqa-fp16-tiny'), '-o', out, '--router-init', 'random');
    expect(res.code).toBe(0);
    expect(res.stderr).toMatch(
      /genai_config\.json: onnxruntime-genai cannot drive the compiled model: routed layers 0, 1 cache a different number of tokens per row/,
    );
    const original = config(join(FIXTURES, 'forms-gqa-fp16-tiny'));
    const c = config(join(dir, 'qwen'));
    expect(c.model.decoder.filename).toBe('model.onnx');
    expect({ ...c.model, decoder: { ...c.model.decoder, filename: original.model.decoder.filename } }).toEqual(original.model);
    expect(c.modc.genai_loadable).toBe(false);
    expect(c.modc.inputs).toEqual({ past_lengths_names: 'past_lengths.%d' });
    expect(c.modc.layers.map((l: ModcLayer) => [l.past_key, l.past_length, l.present_length])).toEqual([
      ['past_key_values.0.key', 'past_lengths.0', 'present_lengths.0'],
      ['past_key_values.1.key', 'past_lengths.1', 'present_lengths.1'],
    ]);
    // The shapes recorded are the compiled graph's: per-layer past lengths, 2 KV heads of 16.
    const compiled = loadModel(out);
    for (const l of c.modc.layers) expect(l.shape).toEqual(compiled.graph.inputs.find((v) => v.name === l.past_key)!.shape);
    expect(new Set(c.modc.layers.map((l: ModcLayer) => l.shape[2])).size).toBe(2);
    expect(c.modc.layers[0].shape[1]).toBe(original.model.decoder.num_key_value_heads);
    expect(c.modc.routing.layers.map((l) => l.layer)).toEqual([0, 1]);
  });

  it('MLP-only routing keeps the original cache interface: the config differs only in its file name, and says so', async () => {
    const out = join(dir, 'qwen-mlp', 'decoder-mod.onnx');
    const res = await runCli('compile', fixture('forms-gqa-fp16-tiny'), '-o', out, '--router-init', 'random', '--granularity', 'mlp', '--json');
    expect(res.code).toBe(0);
    const report = JSON.parse(res.stdout);
    expect(report.genaiConfig).toMatchObject({ path: join(dir, 'qwen-mlp', 'genai_config.json'), loadable: true, reason: null });
    expect(inputNames(out)).toEqual(inputNames(fixture('forms-gqa-fp16-tiny')));
    const original = config(join(FIXTURES, 'forms-gqa-fp16-tiny'));
    original.model.decoder.filename = 'decoder-mod.onnx';
    expect(config(join(dir, 'qwen-mlp'))).toEqual(original);
  });

  it('the combined-past GPT-2 form: per-layer shapes [2, batch, heads, past_l, head]', async () => {
    const out = join(dir, 'gpt2', 'past.onnx');
    const res = await runCli('compile', fixture('forms-fused-gpt2-tiny'), '-o', out, '--router-init', 'random', '--layers', '1,3');
    expect(res.code).toBe(0);
    const c = config(join(dir, 'gpt2'));
    expect(c.modc.layers.filter((l: ModcLayer) => l.past_valid).map((l: ModcLayer) => l.layer)).toEqual([1, 3]);
    expect(c.modc.layers[0]).toMatchObject({ past_key: 'past_0', past_value: null, past_length: null, past_valid: null });
    expect(c.modc.layers[1]).toMatchObject({ past_valid: 'past_valid.1', present_valid: 'present_valid.1', past_length: null });
    expect(c.modc.inputs).toEqual({ past_valid_names: 'past_valid.%d' });
    expect(c.modc.layers[1].shape.slice(0, 2)).toEqual([2, 'batch_size']);
    expect(res.stderr).toMatch(/routed layers 1, 3 cache/);
  });

  it("an output in the input's folder leaves the input's config alone and says it was not written", async () => {
    const folder = join(dir, 'same');
    mkdirSync(folder, { recursive: true });
    copyFileSync(fixture('forms-gqa-fp16-tiny'), join(folder, 'model.onnx'));
    copyFileSync(join(FIXTURES, 'forms-gqa-fp16-tiny', 'genai_config.json'), join(folder, 'genai_config.json'));
    const before = readFileSync(join(folder, 'genai_config.json'), 'utf8');
    const res = await runCli('compile', join(folder, 'model.onnx'), '-o', join(folder, 'mod.onnx'), '--router-init', 'random');
    expect(res.code).toBe(0);
    expect(res.stderr).toMatch(/genai_config\.json: not written: the output is in the input's folder/);
    expect(readFileSync(join(folder, 'genai_config.json'), 'utf8')).toBe(before);
  });

  it('a genai_config.json that is not JSON fails before any work: one line, exit 1, no output', async () => {
    const folder = join(dir, 'bad');
    mkdirSync(folder, { recursive: true });
    copyFileSync(fixture('forms-gqa-fp16-tiny'), join(folder, 'model.onnx'));
    writeFileSync(join(folder, 'genai_config.json'), '{ "model": ');
    const out = join(dir, 'bad-out', 'model.onnx');
    expectOneLineError(await runCli('compile', join(folder, 'model.onnx'), '-o', out, '--router-init', 'random'), 1, /genai_config\.json is not valid JSON/);
    expect(existsSync(out)).toBe(false);
  });

  it('no genai_config.json beside the input: none beside the output', async () => {
    const out = join(dir, 'llama', 'model.onnx');
    expect((await runCli('compile', fixture('llama-tiny'), '-o', out, '--router-init', 'random', '-q')).code).toBe(0);
    expect(existsSync(join(dir, 'llama', 'genai_config.json'))).toBe(false);
  });
});
