/** `modc compile` with routers, and `modc inspect` on decoders and compiled models, as a user runs them. */
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { writeRouterFile } from '../compiler/routing/router-weights.js';
import { ModSession } from '../compiler/runtime/session.js';
import { ort } from '../compiler/runtime/ort.js';
import { expectOneLineError, ROOT, runCli, FIXTURES, tempDir } from './helpers.js';

const tmp = tempDir('modc-compile');
const LLAMA = join(ROOT, 'fixtures', 'llama-tiny', 'model.onnx');
const GPT2_FUSED = join(FIXTURES, 'forms-fused-gpt2-tiny', 'model.onnx');

describe('modc compile with routers', () => {
  it('prints what it converted and the layers it did not, and --json reports the same', async () => {
    const out = join(tmp, 'eo', 'model.onnx');
    const res = await runCli('compile', LLAMA, '-o', out, '--router-init', 'random', '--schedule', 'every-other', '--json');
    expect(res.code).toBe(0);
    const j = JSON.parse(res.stdout);
    expect(j.routing.converted.map((l: { layer: number }) => l.layer)).toEqual([1]);
    expect(j.routing.notConverted).toEqual([
      { layer: 0, reason: 'not selected' },
      { layer: 2, reason: 'not selected' },
    ]);
    expect(j.routing.opsAdded.Router).toBe(1);
    const text = await runCli(
      'compile',
      LLAMA,
      '-o',
      join(tmp, 'eo2', 'model.onnx'),
      '--router-init',
      'random',
      '--layers',
      '0,2',
      '--routing',
      'topk',
      '--capacity',
      '0.25',
    );
    expect(text.stderr).toMatch(/converted 2 layer\(s\): 0 \(c=0.25\), 2 \(c=0.25\); topk, gated/);
    expect(text.stderr).toMatch(/modc ops added: Router 2, SelectTopK 2/);
    expect(text.stderr).toMatch(/not converted: layer 1: not selected/);
  });

  it('reports layers route-layers could not route, with the reason, and records them in the model', async () => {
    // Without split-fused-boundaries the fused exits of forms-fused-gpt2-tiny cannot be routed.
    const out = join(tmp, 'unsplit', 'model.onnx');
    const res = await runCli('compile', GPT2_FUSED, '-o', out, '--router-init', 'random', '--passes', 'insert-routers,route-layers,cleanup', '--json');
    expect(res.code).toBe(0);
    const j = JSON.parse(res.stdout);
    expect(j.routing.converted).toEqual([]);
    expect(j.routing.notConverted).toHaveLength(5);
    expect(j.routing.notConverted[0]).toEqual({
      layer: 0,
      reason: expect.stringMatching(/SkipLayerNorm_AddBias_1' is not a plain Add \(run split-fused-boundaries first\)/),
    });
    const meta = JSON.parse((await runCli('inspect', out, '--json')).stdout).routing;
    expect(meta.layers).toEqual([]);
    expect(meta.skipped.map((s: { layer: number }) => s.layer)).toEqual([0, 1, 2, 3, 4]);
  });

  it('a router file converts exactly its layers; the compiled model shows its routers in inspect', async () => {
    const routers = join(tmp, 'routers.safetensors');
    writeRouterFile(routers, [{ layer: 2, weight: Float32Array.from({ length: 64 }, (_, i) => Math.sin(i)), bias: 0.1, threshold: 0.4 }]);
    const out = join(tmp, 'file', 'model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--routers', routers, '-q')).code).toBe(0);
    const res = await runCli('inspect', out);
    expect(res.stdout).toMatch(/routing\s+modc threshold, gated; routers on layer 2 \(p=0\.4\)/);
    expect(res.stdout).toMatch(/modc\s+.*Router 1/);
    const j = JSON.parse((await runCli('inspect', out, '--json')).stdout);
    expect(j.routing).toEqual({
      mode: 'threshold',
      gated: true,
      layers: [{ layer: 2, part: 'block', selected: 'modc.selected.2', threshold: expect.closeTo(0.4, 6) }],
    });
    expect(j.functions).toContain('modc::Router');
    expect(j.opsets).toContainEqual({ domain: 'modc', version: 1 });
  });

  it('--inline-ops emits no modc functions and computes the same logits', async () => {
    const withFns = join(tmp, 'fn', 'model.onnx');
    const inline = join(tmp, 'inline', 'model.onnx');
    expect((await runCli('compile', GPT2_FUSED, '-o', withFns, '--router-init', 'random', '--seed', '4', '-q')).code).toBe(0);
    expect((await runCli('compile', GPT2_FUSED, '-o', inline, '--router-init', 'random', '--seed', '4', '--inline-ops', '-q')).code).toBe(0);
    const j = JSON.parse((await runCli('inspect', inline, '--json')).stdout);
    expect(j.functions).toEqual([]);
    expect(j.ops.modc).toBeUndefined();
    expect(j.opsets.map((o: { domain: string }) => o.domain)).not.toContain('modc');
    const rows = [
      [1, 2, 3, 4, 5],
      [6, 7],
    ];
    const [a, b] = await Promise.all([ModSession.create(withFns), ModSession.create(inline)]);
    const [la, lb] = [await a.forward(rows), await b.forward(rows)];
    let worst = 0;
    la.data.forEach((v, i) => (worst = Math.max(worst, Math.abs(v - lb.data[i]!))));
    expect(worst).toBeLessThan(1e-6);
    expect(b.layerCacheLengths()).toEqual(a.layerCacheLengths());
  });

  it('a batch-1 step that no router selects skips the layer: its cache does not grow', async () => {
    // bias -20: every token scores r = sigmoid(-20), below any threshold > 0.
    const routers = join(tmp, 'never.safetensors');
    writeRouterFile(routers, [{ layer: 1, weight: new Float32Array(64), bias: -20 }]);
    const out = join(tmp, 'never', 'model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--routers', routers, '-q')).code).toBe(0);
    const s = await ModSession.create(out);
    await s.forward([[1, 2, 3]]);
    await s.step([4]);
    expect(s.layerCacheLengths()).toEqual([[4], [0], [4]]);

    // ORT's profile lists every kernel that ran: none of layer 1's MatMuls did.
    const prefix = join(tmp, 'profile');
    const session = await ort.InferenceSession.create(out, { enableProfiling: true, profileFilePrefix: prefix });
    const ids = (a: number[]) => new ort.Tensor('int64', BigInt64Array.from(a, BigInt), [1, a.length]);
    const feeds: Record<string, ort.Tensor> = { input_ids: ids([1, 2, 3]), attention_mask: ids([1, 1, 1]), position_ids: ids([0, 1, 2]) };
    for (const name of session.inputNames) {
      if (name.startsWith('past_key_values')) feeds[name] = new ort.Tensor('float32', new Float32Array(0), [1, 2, 0, 16]);
      if (name.startsWith('past_valid')) feeds[name] = new ort.Tensor('bool', new Uint8Array(0), [1, 0]);
    }
    await session.run(feeds);
    session.endProfiling();
    const file = readdirSync(tmp).find((f) => f.startsWith('profile') && f.endsWith('.json'))!;
    const kernels = (JSON.parse(readFileSync(join(tmp, file), 'utf8')) as { cat?: string; name: string }[]).filter((e) => e.cat === 'Node').map((e) => e.name);
    const matmuls = (layer: number) => kernels.filter((k) => k.startsWith(`/layers.${layer}/`) && k.includes('MatMul')).length;
    expect(matmuls(0)).toBeGreaterThan(0);
    expect(matmuls(1)).toBe(0);
    expect(kernels).toContain('modc/layer1/if_selected_kernel_time');
  });
});

describe('modc compile refuses bad routing input with one line', () => {
  const out = () => join(tmp, `bad${Math.random().toString(36).slice(2)}`, 'model.onnx');

  it('a router file that does not fit the model, naming the tensor', async () => {
    const routers = join(tmp, 'wide.safetensors');
    writeRouterFile(routers, [{ layer: 0, weight: new Float32Array(100), bias: 0 }]);
    const o = out();
    expectOneLineError(await runCli('compile', LLAMA, '-o', o, '--routers', routers), 1, /'router\.0\.weight' has shape \[100\], expected \[64\]/);
    expect(existsSync(o)).toBe(false);
    writeRouterFile(routers, [{ layer: 7, weight: new Float32Array(64), bias: 0 }]);
    expectOneLineError(await runCli('compile', LLAMA, '-o', out(), '--routers', routers), 1, /'router\.7\.weight' is for layer 7, but the model has 3 layers/);
    writeFileSync(routers, 'nonsense');
    expectOneLineError(await runCli('compile', LLAMA, '-o', out(), '--routers', routers), 1, /not a safetensors file/);
  });

  it.each([
    [['--layers', '5'], 2, /--layers names layer 5, but the model has 3 layers/],
    [['--layers', ','], 2, /names no layer/],
    [['--threshold', '1.5'], 2, /--threshold must be in \[0, 1\]/],
    [['--routing', 'topk', '--capacity', '0'], 2, /--capacity must be in \(0, 1\]/],
    [['--routing', 'topk', '--capacity', '1.2'], 2, /--capacity must be in \(0, 1\]/],
    [['--routing', 'sideways'], 2, /--routing must be one of threshold, topk/],
    [['--schedule', 'zigzag'], 2, /--schedule must be one of/],
    [['--gated', '--ungated'], 2, /--gated or --ungated, not both/],
  ])('%j', async (flags, code, pattern) => {
    expectOneLineError(await runCli('compile', LLAMA, '-o', out(), '--router-init', 'random', ...(flags as string[])), code as number, pattern as RegExp);
  });

  it('flags that need routers, and no routers at all', async () => {
    expectOneLineError(await runCli('compile', LLAMA, '-o', out(), '--threshold', '0.3'), 2, /--threshold needs routers/);
    expectOneLineError(await runCli('compile', LLAMA, '-o', out(), '--router-init', 'clever'), 2, /--router-init must be all-pass or random/);
    expectOneLineError(await runCli('compile', LLAMA, '-o', out()), 2, /nothing to do: give --routers FILE or --router-init/);
  });

  it('a model that is not a decoder', async () => {
    // A fixture with its graph cut to a single MatMul: no embedding, no residual stream.
    const dir = join(tmp, 'notdec');
    const { Graph, Value } = await import('../compiler/core/ir/graph.js');
    const { Model } = await import('../compiler/core/ir/model.js');
    const { saveModel } = await import('../compiler/core/io/save.js');
    const g = new Graph('g');
    const t = { tensor_type: { elem_type: 1, shape: { dim: [{ dim_value: 2 }] } } };
    const x = g.addInput(new Value('x', t));
    g.outputs = [g.addNode('Relu', [x], [new Value('y', t)]).output(0)];
    const m = new Model(g, 8);
    m.opsetImports = [{ domain: '', version: 17 }];
    saveModel(m, join(dir, 'model.onnx'));
    const res = await runCli('compile', join(dir, 'model.onnx'), '-o', join(dir, 'out.onnx'), '--router-init', 'all-pass');
    expectOneLineError(res, 1, /modc: no residual stream: expected/);
    expect(readdirSync(dir)).toEqual(['model.onnx']);
    const ins = await runCli('inspect', join(dir, 'model.onnx'));
    expectOneLineError(ins, 1, /not a decoder modc can handle: no residual stream/);
    expect(ins.stdout).toMatch(/nodes\s+1/);
  });
});

describe('modc inspect on decoders', () => {
  it('prints the layer table and the global facts; --json has them at the top level', async () => {
    const res = await runCli('inspect', GPT2_FUSED);
    expect(res.stdout).toMatch(/hidden 32, heads 4, kv heads 4, head size 8, float32, positions: absolute/);
    expect(res.stdout).toMatch(/layer 4: Attention, \d+ nodes, %\/transformer\/h\.3\/Add_1_output_0 -> \(fused, no value\)/);
    expect(res.stdout).toMatch(/kv: past_0 -> present_0 \(combined\)/);
    const j = JSON.parse((await runCli('inspect', LLAMA, '--json')).stdout);
    expect(j.hiddenSize).toBe(64);
    expect(j.numHeads).toBe(4);
    expect(j.numKvHeads).toBe(2);
    expect(j.layers).toHaveLength(3);
    expect(j.layers[1]).toMatchObject({
      index: 1,
      attention: 'unfused',
      kv: { key: { input: 'past_key_values.1.key', output: 'present.1.key' }, value: { input: 'past_key_values.1.value', output: 'present.1.value' } },
    });
  });

  it('--explain lists accepted and rejected boundaries', async () => {
    const res = await runCli('inspect', LLAMA, '--explain');
    expect(res.stdout).toMatch(/^explanation$/m);
    expect(res.stdout).toMatch(/^\[accepted\] /m);
  });
});
