/**
 * Decoder forms of real exports (docs/forms.md), end to end: a routed compile of each form fixture
 * passes `modc verify` (MoD semantics against the reference executor, and the all-pass anchor),
 * with no flags besides the routing. The quick checks of each form are in test/forms.test.ts.
 */
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FIXTURES_DIR } from '../../fixtures/build-fixtures.js';
import { expectOneLineError, runCli, tempDir } from '../helpers.js';

const tmp = tempDir('modc-forms-verify');

/** Compiles with `args`, then `modc verify` must pass (semantics against the reference, and the all-pass anchor). */
async function compileAndVerify(source: string, name: string, ...args: string[]): Promise<string> {
  const out = join(tmp, name, 'model.onnx');
  const compiled = await runCli('compile', source, '-o', out, '-q', ...args);
  expect(compiled.stderr).toBe('');
  expect(compiled.code).toBe(0);
  const verified = await runCli('verify', source, out, '--json');
  const report = JSON.parse(verified.stdout) as { passed: boolean; checks: { name: string; passed: boolean; maxDiff: number[] }[] };
  expect(
    report.checks.map((c) => [c.name, c.passed]),
    verified.stdout,
  ).toEqual([
    ['semantics', true],
    ['anchor', true],
  ]);
  expect(verified.code).toBe(0);
  return out;
}

const fixture = (dir: string, file = 'model.onnx') => join(FIXTURES_DIR, dir, file);

describe('a routed compile of every form passes modc verify', () => {
  it.each([
    ['unsorted graph', fixture('forms-unsorted-tiny', 'unsorted.onnx'), ['--schedule', 'every-other']],
    ['int32 inputs', fixture('forms-int32-tiny'), ['--routing', 'topk']],
    ['GroupQueryAttention (right padding by default)', fixture('forms-gqa-tiny'), []],
    ['hybrid: recurrent layer with state', fixture('forms-hybrid-tiny'), ['--routing', 'topk']],
    ['hybrid, MLP-only routing (the recurrent layer stays dense)', fixture('forms-hybrid-tiny'), ['--granularity', 'mlp']],
    ['MatMulNBits int4', fixture('forms-nbits-tiny'), ['--schedule', 'every-other']],
    ['QDQ int8', fixture('forms-qdq-tiny'), ['--schedule', 'every-other']],
    ['MatMulInteger', fixture('forms-integer-tiny'), ['--routing', 'topk']],
    ['inputs_embeds', fixture('forms-embeds-tiny'), []],
    ['sliding window (windowed layers stay dense)', fixture('forms-gqa-window-tiny'), []],
    ['sliding window, MLP-only routing', fixture('forms-gqa-window-tiny'), ['--granularity', 'mlp']],
    ['RMSNormalization op (opset 23)', fixture('forms-rmsnorm-tiny'), ['--routing', 'topk']],
    ['standard Attention over static caches (TensorScatter, opset 24)', fixture('forms-static-tiny'), ['--routing', 'topk']],
    ['static caches, attention-part routing', fixture('forms-static-tiny'), ['--granularity', 'attention']],
    ["static caches with mobius's sliding-window mask (the window by original position)", fixture('forms-static-window-tiny'), ['--routing', 'topk']],
    ["mobius's static sliding window, attention-part routing", fixture('forms-static-window-tiny'), ['--granularity', 'attention']],
    ['static caches, is_causal=1 without a mask (verify cuts its prompt to one length)', fixture('forms-static-causal-tiny', 'causal.onnx'), []],
    ['standard Attention with past/present (opset 23)', fixture('forms-attention23-tiny'), ['--granularity', 'attention']],
    ['opset-23 Attention, is_causal=1 + padding mask', fixture('forms-attention23-padmask-tiny'), ['--routing', 'topk']],
    ['opset-23 Attention, is_causal=1 without any mask', fixture('forms-attention23-causal-tiny', 'causal.onnx'), []],
    ["Megatron: the caller's 4-D mask, combined caches cut by Split/Squeeze", fixture('forms-megatron-tiny'), ['--routing', 'topk']],
    ['Megatron, attention-part routing', fixture('forms-megatron-tiny'), ['--granularity', 'attention']],
  ] as const)('%s', async (_, path, args) => {
    await compileAndVerify(path, `${path.split('/').at(-2)!}-${args.join('')}`, '--router-init', 'random', ...args);
  });

  it('calibrate on a hybrid model routes no part of the layer with state; its routers compile and pass verify', async () => {
    const data = join(tmp, 'calib.jsonl');
    writeFileSync(data, '{"ids": [5, 6, 7, 8, 9, 10, 11, 12]}\n{"ids": [13, 14, 15, 16]}\n{"ids": [17, 18, 19, 20, 21, 22]}\n');
    const routers = join(tmp, 'hybrid-routers.safetensors');
    const cal = await runCli('calibrate', fixture('forms-hybrid-tiny'), '--data', data, '--target-compute', '0.9', '-o', routers, '-q');
    expect(cal.stderr).toBe('');
    const out = join(tmp, 'hybrid-calibrated', 'model.onnx');
    expect((await runCli('compile', fixture('forms-hybrid-tiny'), '--routers', routers, '-o', out, '-q')).code).toBe(0);
    const meta = JSON.parse((await runCli('inspect', out, '--json')).stdout).routing as { layers: { layer: number; part: string }[] };
    expect(meta.layers.filter((l) => l.layer === 0)).toEqual([]);
    expect((await runCli('verify', fixture('forms-hybrid-tiny'), out)).code).toBe(0);
  });

  it('inputs_embeds with no flags: verify and bench use seeded random embeddings; files genai_config.json names but that are absent are not an error', async () => {
    const dir = join(tmp, 'no-embedding-model');
    const bare = join(dir, 'model.onnx');
    mkdirSync(dir, { recursive: true });
    copyFileSync(fixture('forms-embeds-tiny'), bare);
    copyFileSync(fixture('forms-embeds-tiny', 'genai_config.json'), join(dir, 'genai_config.json'));
    const compiled = await compileAndVerify(bare, 'embeds-bare', '--router-init', 'random', '--routing', 'topk');
    const bench = await runCli('bench', bare, compiled, '--prompt', '6', '--steps', '2', '--runs', '1', '--warmup', '0', '--json');
    expect(bench.code).toBe(0);
    expect(JSON.parse(bench.stdout).models).toHaveLength(2);
    expectOneLineError(await runCli('run', bare, '--ids', '1,2'), 2, /takes inputs_embeds: give --embeds FILE/);
    expect((await runCli('run', bare, '--ids', '1,2', '--embeds', 'random')).code).toBe(0);
  });
});
