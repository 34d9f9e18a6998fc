/**
 * Analysis stays linear: a 32-layer Llama-7B-shaped graph (builder forms, weights in a sparse
 * sidecar that is never read) is analysed; the time is logged, not asserted.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { externalReads } from '../compiler/core/ir/tensor.js';
import { writeGenaiModel, writeLlamaModel } from '../fixtures/builder/index.js';
import { tempDir } from './helpers.js';

const LLAMA_7B = { hiddenSize: 4096, numLayers: 32, numHeads: 32, numKvHeads: 32, intermediateSize: 11008, vocabSize: 32000, maxPositions: 4096 };

describe('analysis of a 7B-shaped graph', () => {
  const dir = tempDir('modc-analysis-scale');
  it.each([
    ['llama', writeLlamaModel],
    ['genai', writeGenaiModel],
  ] as const)('%s form: 32 layers, no weight bytes read', (form, write) => {
    const path = join(dir, form, 'model.onnx');
    write(LLAMA_7B, { kind: 'external', path: 'model.onnx.data', sparse: true }, path);
    const model = loadModel(path);
    const reads = externalReads.count;
    const t0 = performance.now();
    const s = analyzeDecoder(model);
    const ms = performance.now() - t0;
    console.log(`analyzeDecoder on a 32-layer 7B-shaped ${form} graph (${model.graph.nodes.length} nodes): ${ms.toFixed(1)} ms`);
    expect(s.layers).toHaveLength(32);
    expect(s).toMatchObject({ hiddenSize: 4096, numHeads: 32, headSize: 128 });
    expect(externalReads.count).toBe(reads);
  });
});
