/**
 * The library compile(): the same model as `modc compile`, the analysis handed from pass to pass,
 * and a clone that passes can rewrite while the original stays as it was.
 */
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import type { DecoderStructure } from '../compiler/analysis/types.js';
import { cloneModel } from '../compiler/core/io/convert.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { compile } from '../compiler/passes/compile.js';
import { runPipeline, type Pass } from '../compiler/passes/pass-manager.js';
import { fixture, runCli, tempDir } from './helpers.js';

const LLAMA = fixture('llama-tiny');
const tmp = tempDir('modc-compile-lib');
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('compile(model, request)', () => {
  it('writes the same bytes as modc compile for the same request', async () => {
    const model = loadModel(LLAMA);
    const { plan, report, records } = compile(model, { routers: { kind: 'random', seed: 3 }, schedule: 'every-other', mode: 'topk', capacity: 0.5 });
    expect(plan.layers.map((l) => l.layer)).toEqual([1]);
    expect(report.converted).toEqual([{ layer: 1, part: 'block', threshold: 0.5, capacity: 0.5 }]);
    expect(report.notConverted.map((d) => d.layer)).toEqual([0, 2]);
    expect(records.map((r) => r.pass)).toEqual(['record-costs', 'dense-past-length', 'split-fused-boundaries', 'insert-routers', 'route-layers', 'cleanup']);
    const lib = saveModel(model, join(tmp, 'lib', 'model.onnx')).path;
    const cli = join(tmp, 'cli', 'model.onnx');
    const res = await runCli(
      'compile',
      LLAMA,
      '-o',
      cli,
      '--router-init',
      'random',
      '--seed',
      '3',
      '--schedule',
      'every-other',
      '--routing',
      'topk',
      '--capacity',
      '0.5',
    );
    expect(res.code).toBe(0);
    expect(readFileSync(lib).equals(readFileSync(cli))).toBe(true);
  });

  it('puts the outputs it adds right after the logits, ahead of the KV caches', () => {
    const model = loadModel(LLAMA);
    const before = model.graph.outputs.map((v) => v.name);
    compile(model, { routers: { kind: 'all-pass' }, layers: '0,2' });
    const after = model.graph.outputs.map((v) => v.name);
    expect(before[0]).toBe('logits');
    expect(after).toEqual(['logits', 'present_valid.0', 'present_valid.2', ...before.slice(1)]);
  });

  it("takes a plan made already, and the caller's analysis", () => {
    const model = loadModel(LLAMA);
    const structure = analyzeDecoder(model);
    const first = compile(loadModel(LLAMA), { routers: { kind: 'all-pass' }, layers: '0,2' });
    const { report } = compile(model, { plan: first.plan, structure });
    expect(report.converted.map((l) => l.layer)).toEqual([0, 2]);
  });

  it('refuses a routing plan naming a layer the model does not have', () => {
    expect(() => compile(loadModel(LLAMA), { routers: { kind: 'all-pass' }, layers: '7' })).toThrow(/--layers names layer 7, but the model has 3 layers/);
  });
});

describe('the decoder analysis across passes', () => {
  /** A pass that records the structure it is handed, and changes the graph or not. */
  const probe = (name: string, seen: DecoderStructure[], changes: boolean, preserves = false): Pass => ({
    name,
    description: 'test probe',
    ...(preserves ? { preserves: ['structure'] as const } : {}),
    run(_model, _options, ctx) {
      seen.push(ctx.structure());
      return { changed: changes };
    },
  });

  it('is computed once, kept across passes that preserve it or change nothing, and recomputed after one that changes the graph', () => {
    const model = loadModel(LLAMA);
    const given = analyzeDecoder(model);
    const seen: DecoderStructure[] = [];
    const steps = [probe('a', seen, false), probe('b', seen, true, true), probe('c', seen, true), probe('d', seen, false)].map((pass) => ({
      pass,
      options: {},
    }));
    runPipeline(model, steps, { structure: given, verify: false });
    expect(seen[0]).toBe(given);
    expect(seen[1]).toBe(given);
    expect(seen[2]).toBe(given);
    expect(seen[3]).not.toBe(given);
    expect(seen[3]!.layers.length).toBe(given.layers.length);
  });
});

describe('cloneModel', () => {
  it('compiling the clone leaves the original as it was', () => {
    const model = loadModel(fixture('genai-tiny'));
    const before = saveModel(model, join(tmp, 'before', 'model.onnx')).path;
    const clone = cloneModel(model);
    compile(clone, { routers: { kind: 'random', seed: 1 }, granularity: 'attention' });
    const after = saveModel(model, join(tmp, 'after', 'model.onnx')).path;
    expect(readFileSync(after).equals(readFileSync(before))).toBe(true);
    // The clone was compiled: it calls modc ops, the original calls none.
    expect(clone.graph.nodes.filter((n) => n.domain === 'modc').length).toBeGreaterThan(0);
    expect(model.graph.nodes.filter((n) => n.domain === 'modc')).toEqual([]);
  });
});
