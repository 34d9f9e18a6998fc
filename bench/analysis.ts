/**
 * Analysis at scale: build 32-layer Llama-7B-shaped graphs (builder forms, weights in a sparse
 * sidecar that is never read), then time load, analyzeDecoder and the default MoD compile.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/io/load.js';
import { externalReads } from '../compiler/ir/tensor.js';
import { runPipeline } from '../compiler/pass-manager.js';
import { planRouting } from '../compiler/routing-plan.js';
import { writeGenaiModel, writeLlamaModel } from '../fixtures/builder/index.js';
import { modPipeline } from '../passes/index.js';
import { median, table } from './common.js';

export const ANALYSIS_USAGE = `usage: node dist/bench/run.js analysis [--runs N]

Builds 32-layer Llama-7B-shaped graphs (hidden 4096, intermediate 11008, vocab 32000) in the
Llama and GenAI forms with sparse external weights, and prints median times of loading,
analyzeDecoder (first call and warm) and the MoD compile of every other layer, with the weight
bytes read (must be 0).`;

const LLAMA_7B = { hiddenSize: 4096, numLayers: 32, numHeads: 32, numKvHeads: 32, intermediateSize: 11008, vocabSize: 32000, maxPositions: 4096 };

export async function analysisBench(argv: readonly string[]): Promise<void> {
  const at = argv.indexOf('--runs');
  const runs = at >= 0 ? Number(argv[at + 1]) : 5;
  const dir = mkdtempSync(join(tmpdir(), 'modc-bench-analysis-'));
  try {
    const rows: string[][] = [];
    for (const [form, write] of [['llama', writeLlamaModel], ['genai', writeGenaiModel]] as const) {
      const path = join(dir, form, 'model.onnx');
      let t0 = performance.now();
      write(LLAMA_7B, { kind: 'external', path: 'model.onnx.data', sparse: true }, path);
      const buildMs = performance.now() - t0;
      const reads = externalReads.bytes;
      const load: number[] = [];
      const analyse: number[] = [];
      const compile: number[] = [];
      let first = 0;
      let nodes = 0;
      for (let r = 0; r < runs; r++) {
        t0 = performance.now();
        const model = loadModel(path);
        load.push(performance.now() - t0);
        t0 = performance.now();
        const s = analyzeDecoder(model);
        const ms = performance.now() - t0;
        if (r === 0) first = ms;
        analyse.push(ms);
        nodes = model.graph.nodes.length;
        const plan = planRouting({ numLayers: s.layers.length, hiddenSize: s.hiddenSize, routers: { kind: 'random', seed: 1 }, schedule: 'every-other' });
        t0 = performance.now();
        runPipeline(model, modPipeline({ plan }));
        compile.push(performance.now() - t0);
      }
      const f = (v: number) => `${v.toFixed(1)} ms`;
      rows.push([form, String(nodes), f(buildMs), f(median(load)), f(first), f(median(analyse.slice(1).length ? analyse.slice(1) : analyse)), f(median(compile)), String(externalReads.bytes - reads)]);
    }
    console.log(`## Analysis of 32-layer 7B-shaped graphs (median of ${runs} runs)\n`);
    console.log(table(['form', 'nodes', 'build + save', 'load', 'analyse (first)', 'analyse (warm)', 'MoD compile (16 layers)', 'weight bytes read'], rows));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
