/**
 * A standard Attention's attn_mask read by what it computes (compiler/analysis/attention.ts
 * causalKeyMask): when it is causality and the keys attention_mask sets, nothing else, a
 * compacted layer takes is_causal=1 and a mask of its own valid keys instead of a rebuilt copy
 * of the model's mask nodes. That the compiled models still compute what the originals do is
 * test/mod.test.ts's and test/oracle.test.ts's, on the same fixtures.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { causalKeyMask } from '../compiler/analysis/attention.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import type { Graph, Node, Value } from '../compiler/core/ir/graph.js';
import { fixture, tempDir } from './helpers.js';
import { ModSession } from '../compiler/runtime/session.js';
import { compileWith, expectSameRun } from './mod-helpers.js';

const tmp = tempDir('modc-causal-key-mask');

/** Each converted layer's Attention node, and the then-branch it runs in. */
function convertedAttention(path: string): { attention: Node; branch: Graph }[] {
  const g = loadModel(path).graph;
  return g.nodes
    .filter((n) => n.opType === 'If' && n.name.startsWith('modc/'))
    .map((n) => {
      const branch = n.subgraphs()[0]!;
      return { attention: branch.nodes.find((x) => x.opType === 'Attention')!, branch };
    });
}

/** The graph inputs `v` is computed from. */
function sources(v: Value | null, seen = new Set<Value>()): string[] {
  if (!v || seen.has(v)) return [];
  seen.add(v);
  const p = v.producer;
  if (!p) return v.initializer ? [] : [v.name];
  return [...new Set(p.inputs.flatMap((x) => sources(x, seen)))];
}

describe("a standard Attention's mask read as causality and attention_mask's keys", () => {
  it.each([
    ['forms-attention23-tiny', 'an additive bias: Where(causal And attention_mask, 0, lowest), is_causal=0'],
    ['forms-attention23-padmask-tiny', 'is_causal=1 and attention_mask expanded over the queries as bool'],
  ])('%s (%s): read on every layer; a compacted layer masks its own keys with is_causal=1', (name) => {
    const original = loadModel(fixture(name));
    const s = analyzeDecoder(original);
    expect(s.layers.map((l) => causalKeyMask(l.attention))).toEqual(s.layers.map(() => true));
    const layers = convertedAttention(compileWith(tmp, fixture(name), 'all-pass', { gated: false }).path);
    expect(layers).toHaveLength(s.layers.length);
    layers.forEach(({ attention, branch }, l) => {
      expect(attention.attrInt('is_causal', 0), `layer ${l}`).toBe(1);
      // Its mask comes from the layer's own keys (past_valid.l and this call's selection), not from attention_mask.
      expect(sources(attention.input(3)), `layer ${l}`).toContain(`past_valid.${l}`);
      expect(
        branch.nodes.filter((n) => n.name.startsWith('/model/attn_mask/')).map((n) => n.name),
        `layer ${l}: no copy of the model's mask nodes`,
      ).toEqual([]);
    });
  });

  it('a mask with anything else (here a strict causal comparison: a query does not see itself) keeps the rebuilt mask, and runs as its original', async () => {
    const model = loadModel(fixture('forms-attention23-tiny'));
    const compare = model.graph.nodes.find((n) => n.opType === 'LessOrEqual' && n.name.startsWith('/model/attn_mask/'))!;
    compare.opType = 'Less';
    const path = join(tmp, 'strict', 'model.onnx');
    saveModel(model, path);
    expect(analyzeDecoder(loadModel(path)).layers.map((l) => causalKeyMask(l.attention))).toEqual([false, false, false]);
    const compiled = compileWith(tmp, path, 'all-pass', { gated: false }).path;
    for (const { attention, branch } of convertedAttention(compiled)) {
      expect(attention.attrInt('is_causal', 0)).toBe(0);
      expect(branch.nodes.some((n) => n.opType === 'Less' && n.name.startsWith('/model/attn_mask/'))).toBe(true);
    }
    // Under the strict mask a row's first token sees no key at all: the compiled model must agree there too.
    const rows = [
      [5, 6, 7, 8, 9],
      [10, 11, 12],
    ];
    await expectSameRun(await ModSession.create(path), await ModSession.create(compiled), rows, 'left', 3, 1e-4, 'strict mask');
  });
});
