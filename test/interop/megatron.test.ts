/**
 * A real export read in place: ONNX Runtime's Megatron GPT-2 test model, exported by torch 1.9
 * (../shared/models/ort-gpt2-megatron-4dmask/gpt2_megatron.onnx, opset 12, 1 layer, vocabulary
 * 10): the caller's 4-D float mask [B, 1, 64, 64], a combined cache past_0 [2, B, H, P, D] cut by
 * Split/Squeeze, a fused QKV MatMul + Split, decomposed LayerNorm, no-op Casts between the
 * residual adds. The interop suite refuses to run where ../shared/models is not beside the project.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../../compiler/analysis/analyze.js';
import { ModReference } from '../../compiler/apps/reference/mod-reference.js';
import { loadModel } from '../../compiler/core/io/load.js';
import { lastPosition, ModSession } from '../../compiler/runtime/session.js';
import { ROOT, runCli, tempDir } from '../helpers.js';
import { compileWith, expectSameRun, prefillSelection, splittingThreshold, worstReal, worstRows } from '../mod-helpers.js';

const PATH = join(ROOT, '..', 'shared', 'models', 'ort-gpt2-megatron-4dmask', 'gpt2_megatron.onnx');
const ROWS = [
  [1, 2, 3, 4, 5, 6, 7],
  [8, 9, 1],
  [2, 3, 4, 5, 6],
];

describe('ort-gpt2-megatron-4dmask (../shared/models, read in place)', () => {
  const tmp = tempDir('modc-interop-megatron');

  it('inspect finds its one layer: combined cache past_0 -> present_0, the caller-4d mask, attention and MLP steps', async () => {
    const s = analyzeDecoder(loadModel(PATH));
    expect(s.layers).toHaveLength(1);
    const l = s.layers[0]!;
    expect([l.kv.key.input.name, l.kv.key.output.name, l.kv.layout, l.kv.numKvHeads, l.kv.headSize]).toEqual(['past_0', 'present_0', 'combined-2BHTD', 2, 4]);
    expect(l.steps.map((st) => st.node.name)).toEqual(['Add_107', 'Add_142']);
    expect(l.mlpNodes.length).toBeGreaterThan(0);
    expect(s.mask.form).toBe('caller-4d');
    const res = await runCli('inspect', PATH);
    expect(res.code, res.stderr).toBe(0);
    expect(res.stdout).toMatch(/layer 0: unfused/);
  });

  it('all-pass ungated reproduces it: prefill and 20 greedy steps, batch 1 and 3, both padding sides; verify passes', async () => {
    const compiled = compileWith(tmp, PATH, 'all-pass', { gated: false });
    for (const pad of ['left', 'right'] as const) {
      for (const rows of [ROWS.slice(0, 1), ROWS]) {
        const [orig, mod] = await Promise.all([ModSession.create(PATH), ModSession.create(compiled.path)]);
        await expectSameRun(orig, mod, rows, pad, 20, 1e-4, `pad ${pad}, batch ${rows.length}`);
      }
    }
    const v = await runCli('verify', PATH, compiled.path, '--ids', '1,2,3,4,5;6,7,8;2,9', '--steps', '4');
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });

  it('random routers agree with the reference executor (prefill and 6 steps) and pass verify', async () => {
    const threshold = await splittingThreshold(tmp, PATH, ROWS, 'left', {});
    const compiled = compileWith(tmp, PATH, 'random', { threshold });
    const mod = await ModSession.create(compiled.path);
    const ref = await ModReference.create(PATH, compiled.plan, join(tmp, 'ref'));
    try {
      expect(worstReal(await mod.forward(ROWS), await ref.forward(ROWS), ROWS, 'left')).toBeLessThan(1e-4);
      for (let t = 0; t < 6; t++)
        expect(worstRows(lastPosition(await mod.step([t, 9 - t, 3])), lastPosition(await ref.step([t, 9 - t, 3])))).toBeLessThan(1e-4);
      expect(mod.layerCacheLengths()).toEqual(ref.layerCacheLengths());
      const { selected, real } = prefillSelection(ref, ROWS);
      expect(selected).toBeGreaterThan(0);
      expect(selected).toBeLessThan(real);
    } finally {
      await ref.release();
    }
    const v = await runCli('verify', PATH, compiled.path, '--ids', '1,2,3,4,5;6,7,8;2,9', '--steps', '4');
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });

  it('run, generate, bench, eval and calibrate drive it', async () => {
    const compiled = join(tmp, 'cli', 'random.onnx');
    expect((await runCli('compile', PATH, '-o', compiled, '-q', '--router-init', 'random')).code).toBe(0);
    for (const model of [PATH, compiled]) {
      const run = await runCli('run', model, '--ids', '1,2,3;4,5', '--json');
      expect(run.code, run.stderr).toBe(0);
      expect(JSON.parse(run.stdout).dims).toEqual([2, 3, 10]);
      const gen = await runCli('generate', model, '--ids', '1,2,3;4,5', '--max-new', '5');
      expect(gen.code, gen.stderr).toBe(0);
    }
    const bench = await runCli('bench', PATH, compiled, '--prompt', '8', '--steps', '2', '--runs', '1', '--warmup', '0', '--threads', '1');
    expect(bench.code, bench.stderr).toBe(0);
    const data = join(tmp, 'cli', 'data.jsonl');
    writeFileSync(data, ['{"ids": [1, 2, 3, 4, 5, 6, 7, 8]}', '{"ids": [9, 1, 2]}', '{"ids": [3, 4, 5, 6, 7]}'].join('\n') + '\n');
    for (const model of [PATH, compiled]) {
      const ev = await runCli('eval', model, '--data', data, '--json');
      expect(ev.code, ev.stderr).toBe(0);
      expect(Number.isFinite(JSON.parse(ev.stdout).nll)).toBe(true);
    }
    const cal = await runCli('calibrate', PATH, '--data', data, '--target-compute', '0.8', '-o', join(tmp, 'cli', 'r.safetensors'), '-q');
    expect(cal.code, cal.stderr).toBe(0);
    const long = Array.from({ length: 62 }, (_, i) => i % 10).join(',');
    const refused = await runCli('generate', compiled, '--ids', long, '--max-new', '3');
    expect([refused.code, refused.stderr.trim()]).toEqual([
      1,
      "modc: a context of 65 tokens (padding included) is longer than the model's 64-position attention mask (attention_mask)",
    ]);
  });
});
