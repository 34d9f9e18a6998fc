/**
 * split-fused-boundaries exposes the residual stream at layer boundaries and changes nothing
 * else: ONNX Runtime gives the split model the original's logits and presents.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { assertValid } from '../compiler/core/ir/validate.js';
import { decoderIo } from '../compiler/metadata/decoder-io.js';
import { createSession } from '../compiler/runtime/ort.js';
import { splitFusedBoundaries } from '../compiler/passes/split-fused-boundaries.js';
import { decodeStep, maxAbsDiff, prefill, type Feeds } from './extract-feeds.js';
import { ROOT, FIXTURES, tempDir } from './helpers.js';

const FUSED = [
  { name: 'forms-fused-gpt2-tiny', path: join(FIXTURES, 'forms-fused-gpt2-tiny', 'model.onnx'), pad: 'left', tolerance: 1e-5 },
  { name: 'forms-gqa-fp16-tiny', path: join(FIXTURES, 'forms-gqa-fp16-tiny', 'model.onnx'), pad: 'right', tolerance: 1e-2 }, // fp16
  { name: 'genai-tiny', path: join(ROOT, 'fixtures', 'genai-tiny', 'model.onnx'), pad: 'left', tolerance: 1e-2 },
] as const;

const fusedOps = (path: string) => loadModel(path).graph.nodes.filter((n) => /^(Skip|Embed)/.test(n.opType)).length;

describe.each(FUSED)('split-fused-boundaries on $name', ({ path, pad, tolerance }) => {
  const dir = tempDir('modc-split');

  it('exposes every layer boundary as an Add, and the split model gives the original outputs (prefill with padding, then decode)', async () => {
    const model = loadModel(path);
    const result = splitFusedBoundaries(model, analyzeDecoder(model));
    expect(result.changed).toBe(true);
    assertValid(model, 'split model');
    const after = analyzeDecoder(model);
    for (const l of after.layers) {
      expect(l.residualOut).not.toBeNull();
      expect(l.entryBoundary).toBeNull();
      expect(l.exitBoundary).toBeNull();
    }
    const splitPath = join(dir, 'split.onnx');
    saveModel(model, splitPath);
    const io = decoderIo(model);
    const [original, split] = await Promise.all([createSession(path), createSession(splitPath)]);
    const first = prefill(
      io,
      [
        [5, 6, 7, 8, 9],
        [10, 11, 12],
      ],
      pad,
    );
    const expected = (await original.run(first.feeds)) as Feeds;
    compare(expected, (await split.run(first.feeds)) as Feeds, tolerance);
    const second = decodeStep(io, first, expected, [13, 14]);
    compare((await original.run(second.feeds)) as Feeds, (await split.run(second.feeds)) as Feeds, tolerance);
  });

  it('splits only the boundaries of the layers asked for', () => {
    const model = loadModel(path);
    const s = analyzeDecoder(model);
    const last = s.layers.length - 1;
    const fusedBefore = fusedOps(path);
    const { notes } = splitFusedBoundaries(model, s, { layers: [last] });
    // The last layer's entry boundary (shared with the layer before) and its exit (the final norm).
    expect(notes).toHaveLength(2);
    expect(model.graph.nodes.filter((n) => /^(Skip|Embed)/.test(n.opType))).toHaveLength(fusedBefore - 2);
    expect(analyzeDecoder(model).layers[last]!.residualOut).not.toBeNull();
  });
});

function compare(expected: Feeds, actual: Feeds, tolerance: number): void {
  for (const [name, t] of Object.entries(expected)) {
    expect(actual[name], name).toBeDefined();
    expect(maxAbsDiff(t, actual[name]!), name).toBeLessThan(tolerance);
  }
}
