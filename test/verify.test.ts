/** `modc verify`: passes a faithful compile, fails one whose graph and routing disagree. (`modc bench`: test/bench.test.ts) */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { readRoutingMetadata, writeRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import { expectOneLineError, ROOT, runCli, tempDir } from './helpers.js';

const tmp = tempDir('modc-verify');
const LLAMA = join(ROOT, 'fixtures', 'llama-tiny', 'model.onnx');

describe('modc verify', () => {
  it('passes a compiled model: semantics against the reference executor and the anchor', async () => {
    const out = join(tmp, 'ok', 'model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--router-init', 'random', '--routing', 'topk', '-q')).code).toBe(0);
    const res = await runCli('verify', LLAMA, out, '--steps', '4', '--json');
    expect(res.code).toBe(0);
    const report = JSON.parse(res.stdout);
    expect(report.passed).toBe(true);
    expect(report.checks.map((c: { name: string }) => c.name)).toEqual(['semantics', 'anchor']);
    expect(report.checks[0].maxDiff).toHaveLength(5);
  });

  it('fails (exit 1) when the graph does not do what its routing says', async () => {
    const out = join(tmp, 'bad', 'model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--router-init', 'random', '--threshold', '0.5', '-q')).code).toBe(0);
    // Claim a different threshold than the graph applies: the reference executor then selects other tokens.
    const model = loadModel(out);
    const meta = readRoutingMetadata(model)!;
    writeRoutingMetadata(model, { ...meta, layers: meta.layers.map((l) => ({ ...l, threshold: 0.3 })) });
    const tampered = join(tmp, 'bad', 'tampered.onnx');
    saveModel(model, tampered);
    const res = await runCli('verify', LLAMA, tampered, '--steps', '2');
    expect(res.code).toBe(1);
    expect(res.stdout).toMatch(/^FAIL semantics: /m);
    expect(res.stdout).toMatch(/^PASS anchor: /m);
  });

  it('fails when the graph routes another sub-layer than its routing metadata says', async () => {
    const out = join(tmp, 'part', 'model.onnx');
    expect((await runCli('compile', LLAMA, '-o', out, '--router-init', 'random', '--granularity', 'attention', '-q')).code).toBe(0);
    expect((await runCli('verify', LLAMA, out, '--steps', '2')).code).toBe(0);
    // Same routers, claimed for the MLP: the reference then keeps full caches and skips MLPs instead.
    const model = loadModel(out);
    const meta = readRoutingMetadata(model)!;
    writeRoutingMetadata(model, { ...meta, layers: meta.layers.map((l) => ({ ...l, part: 'mlp' })) });
    for (const v of [...model.graph.initializers.values()].filter((i) => i.name.includes('.attn.'))) {
      const tensor = v.initializer!;
      model.graph.removeInitializer(v);
      v.name = v.name.replace('.attn.', '.mlp.');
      model.graph.addInitializer(v, tensor);
    }
    const tampered = join(tmp, 'part', 'tampered.onnx');
    saveModel(model, tampered);
    const res = await runCli('verify', LLAMA, tampered, '--steps', '2', '--json');
    expect(res.code).toBe(1);
    const [semantics, anchor] = JSON.parse(res.stdout).checks;
    expect([semantics.passed, semantics.cacheLengthsMatch, anchor.passed]).toEqual([false, false, true]);
  });

  it('refuses a model modc did not compile', async () => {
    expectOneLineError(await runCli('verify', LLAMA, LLAMA), 1, /no modc routing metadata/);
    expectOneLineError(await runCli('verify', LLAMA), 2, /expected two model paths/);
  });
});
