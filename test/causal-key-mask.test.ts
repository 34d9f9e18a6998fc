/**
 * A standard Attention's attn_mask, and an unfused attention's additive mask, read by what they
 * compute (compiler/analysis/attention.ts causalKeyMask, causalKeyBias): when the mask is
 * causality and the keys attention_mask sets, nothing else, a compacted layer masks its own valid
 * keys (is_causal=1 and a keys mask; for unfused attention a bias made with Trilu) instead of a
 * rebuilt copy of the model's mask nodes. That the compiled models still compute what the
 * originals do is test/mod.test.ts's and test/oracle.test.ts's, on the same fixtures.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { causalKeyBias, causalKeyMask } from '../compiler/analysis/attention.js';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { type Graph, type Node, Value } from '../compiler/core/ir/graph.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { Tensor } from '../compiler/core/ir/tensor.js';
import { fixture, tempDir } from './helpers.js';
import { ModSession } from '../compiler/runtime/session.js';
import { compileWith, expectSameRun } from './mod-helpers.js';

const tmp = tempDir('modc-causal-key-mask');

/** The then-branch each converted layer runs in, in layer order. */
function convertedBranches(path: string): Graph[] {
  return loadModel(path)
    .graph.nodes.filter((n) => n.opType === 'If' && n.name.startsWith('modc/'))
    .map((n) => n.subgraphs()[0]!);
}

/** Each converted layer's Attention node, and the then-branch it runs in. */
function convertedAttention(path: string): { attention: Node; branch: Graph }[] {
  return convertedBranches(path).map((branch) => ({ attention: branch.nodes.find((x) => x.opType === 'Attention')!, branch }));
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
      // Its mask comes from the layer's own keys (past_valid.l and this call's selection), not from
      // attention_mask: expanded over the queries of a compacted call, broadcast for a one-token call.
      const mask = attention.input(3)!;
      expect(mask.producer!.name, `layer ${l}`).toMatch(/\/one_token_in$/);
      const [step, compacted] = (mask.producer!.subgraphs() as Graph[]).map((b) => b.outputs[mask.producer!.outputs.indexOf(mask)]!);
      expect([compacted!.producer!.opType, step!.producer!.opType], `layer ${l}`).toEqual(['Expand', 'Unsqueeze']);
      for (const v of [step!, compacted!]) expect(sources(v), `layer ${l}`).toContain(`past_valid.${l}`);
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

/**
 * Each converted layer's then-branch and the input of its Softmax's mask Add: the bias a
 * compacted call reads, and (`step`) the one a one-token call reads, when the layer has a
 * one-token If for it (its branches: then the one-token bias, else the compacted one).
 */
function convertedBias(path: string): { branch: Graph; bias: Value; step: Value | null }[] {
  return convertedBranches(path).map((branch) => {
    let add = branch.nodes.find((x) => x.opType === 'Softmax')!.input(0)!.producer!;
    while (add.opType === 'Cast') add = add.input(0)!.producer!;
    expect(add.opType).toBe('Add');
    const input = add.inputs.find((v) => v?.producer?.opType === 'Where' || v?.producer?.opType === 'If')!;
    if (input.producer!.opType === 'Where') return { branch, bias: input, step: null };
    const [then, otherwise] = input.producer!.subgraphs() as [Graph, Graph];
    const slot = input.producer!.outputs.indexOf(input);
    return { branch, bias: otherwise.outputs[slot]!, step: then.outputs[slot]! };
  });
}

/** The names of the nodes `v` is computed by. */
function producers(v: Value | null, seen = new Set<Value>()): string[] {
  if (!v || seen.has(v) || !v.producer) return [];
  seen.add(v);
  return [v.producer.name, ...v.producer.inputs.flatMap((x) => producers(x, seen))];
}

describe("an unfused attention's additive mask read as causality and attention_mask's keys", () => {
  it.each(['llama-builder-tiny', 'llama-tiny', 'gpt2-tiny', 'neox-tiny'])(
    '%s: read on every layer; a compacted layer builds the bias from its own keys with Trilu, and runs as its original',
    async (name) => {
      const original = loadModel(fixture(name));
      const s = analyzeDecoder(original);
      const found = s.layers.map((l) => causalKeyBias(l.attention));
      expect(found.every((f) => f !== null)).toBe(true);
      const maskNodes = new Set(producers(found[0]!.add.input(found[0]!.slot)).filter((n) => n !== ''));
      expect(maskNodes.size).toBeGreaterThan(0);
      const compiled = compileWith(tmp, fixture(name), 'all-pass', { gated: false }).path;
      const layers = convertedBias(compiled);
      expect(layers).toHaveLength(s.layers.length);
      layers.forEach(({ branch, bias, step }, l) => {
        expect(bias.producer!.input(0)!.producer!.opType, `layer ${l}`).toBe('Trilu');
        expect(sources(bias), `layer ${l}`).toContain(`past_valid.${l}`);
        // A one-token call's one query reads every valid key: the layer's keys [1, T] as they are, no Trilu.
        expect(step, `layer ${l}: a one-token bias`).not.toBeNull();
        expect([step!.producer!.opType, step!.producer!.input(0)!.producer!.opType], `layer ${l}: Where on the keys`).toEqual(['Where', 'Concat']);
        expect(sources(step), `layer ${l}`).toContain(`past_valid.${l}`);
        const copies = branch.nodes.filter((n) => [...maskNodes].some((m) => n.name.startsWith(m)));
        expect(
          copies.map((n) => n.name),
          `layer ${l}: no copy of the model's mask nodes`,
        ).toEqual([]);
      });
      // Left padding leaves holes in the shorter row's slots; the prompt is causal within the call.
      const rows = [
        [5, 6, 7, 8, 9],
        [10, 11, 12],
      ];
      await expectSameRun(await ModSession.create(fixture(name)), await ModSession.create(compiled), rows, 'left', 3, 1e-4, name);
    },
  );

  // Under a strict mask a row's first token sees no key and averages over every key its layer
  // holds, which a compacted layer holds fewer of: only the structure is compared here.
  it('a mask with anything else (a strict causal comparison) keeps the rebuilt mask', () => {
    const model = loadModel(fixture('llama-builder-tiny'));
    const compare = model.graph.nodes.find((n) => n.opType === 'LessOrEqual' && n.name.startsWith('/model/attn_mask/'))!;
    compare.opType = 'Less';
    const path = join(tmp, 'strict-unfused', 'model.onnx');
    saveModel(model, path);
    const s = analyzeDecoder(loadModel(path));
    expect(s.layers.map((l) => causalKeyBias(l.attention))).toEqual(s.layers.map(() => null));
    const compiled = compileWith(tmp, path, 'all-pass', { gated: false }).path;
    for (const { branch } of convertedBias(compiled)) {
      expect(branch.nodes.some((n) => n.opType === 'Trilu')).toBe(false);
      expect(branch.nodes.some((n) => n.opType === 'Less' && n.name.startsWith('/model/attn_mask/'))).toBe(true);
    }
  });

  it('a second mask on the way to Softmax (a Where on the scores) is not read as the only one', () => {
    const model = loadModel(fixture('llama-builder-tiny'));
    const s = analyzeDecoder(model);
    const { add, slot } = causalKeyBias(s.layers[0]!.attention)!;
    // Put a Where between the mask Add and Softmax: the bias alone no longer says what Softmax sees.
    const g = model.graph;
    const core = s.layers[0]!.attention;
    if (core.form !== 'unfused') throw new Error('expected unfused attention');
    const softmax = core.softmax;
    const cond = g.addInitializer(new Value('extra_cond'), Tensor.fromArray('extra_cond', [], Uint8Array.of(1), DataType.BOOL));
    const where = g.newValue('extra_where');
    g.addNode('Where', [cond, add.output(0), add.input(slot)], [where], { before: softmax });
    softmax.setInput(0, where);
    expect(causalKeyBias(analyzeDecoder(model).layers[0]!.attention)).toBeNull();
  });
});
