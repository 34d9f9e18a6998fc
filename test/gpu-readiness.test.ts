/**
 * `modc inspect`'s GPU readiness report (compiler/apps/gpu/gpu-readiness.ts): the If nodes of a
 * decode step, the host reads, the kernels per converted layer on the selected and skipped
 * paths, and the weights two If levels below their initializer. Expectations are counted by
 * hand: on a small graph built here node by node, and on fixture compiles from the structure
 * route-layers gives a layer (see each case).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { gpuReadiness } from '../compiler/apps/gpu/gpu-readiness.js';
import { loadModel } from '../compiler/core/io/load.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { attribute, Graph, type Value } from '../compiler/core/ir/graph.js';
import { Model } from '../compiler/core/ir/model.js';
import { inlineModcOps } from '../compiler/passes/inline-modc-ops.js';
import { Tensor } from '../compiler/core/ir/tensor.js';
import { AttributeType, type AttributeProto } from '../compiler/core/proto/index.js';
import { tensorType } from '../fixtures/builder/graph-builder.js';
import { FIXTURES, runCli, tempDir } from './helpers.js';

const tmp = tempDir('modc-gpu');

function graphAttr(name: string): AttributeProto {
  return { name, type: AttributeType.GRAPH, floats: [], ints: [], strings: [], tensors: [], graphs: [], sparse_tensors: [], type_protos: [] } as AttributeProto;
}

/**
 * main (every node named modc/layer0/...):
 *   s = ReduceSum(x); c1 = Greater(s, 0); c2 = Equal(s, s)
 *   k = Reshape(Cast(ReduceMax(x)), [1]); TopK(x, k)          <- k from data: a host read
 *   Reshape(x, Shape(x))                                        <- shape from Shape: no host read
 *   y = If(c1) { MatMul(x, W) -> Relu -> If(c2) { MatMul(., W) -> Neg } else { Identity } }
 *              else { Identity(x) }
 * W is a main-graph initializer: the first MatMul is one If level below it, the second two.
 */
function handBuilt(): Model {
  const g = new Graph('main');
  const x = g.addInput(g.newValue('x', tensorType(DataType.FLOAT, [1, 4])));
  const w = g.addInitializer(g.newValue('W'), Tensor.fromArray('W', [4, 4], new Float32Array(16).fill(0.5)));
  const shape1 = g.addInitializer(g.newValue('shape1'), Tensor.fromArray('shape1', [1], BigInt64Array.of(1n)));
  const n = (op: string, inputs: (Value | null)[], name: string, attrs: AttributeProto[] = [], graph = g, outs = 1) =>
    graph.addNode(op, inputs, outs, { name: `modc/layer0/${name}`, attributes: attrs });
  const s = n('ReduceSum', [x], 'sum', [attribute('keepdims', 0)]).output(0);
  const zero = n('Constant', [], 'zero', [attribute('value', Tensor.fromArray('', [], Float32Array.of(0)))]).output(0);
  const c1 = n('Greater', [s, zero], 'greater').output(0);
  const c2 = n('Equal', [s, s], 'equal').output(0);
  const max = n('ReduceMax', [x], 'max', [attribute('keepdims', 0)]).output(0);
  const k = n('Reshape', [n('Cast', [max], 'cast', [attribute('to', DataType.INT64)]).output(0), shape1], 'k').output(0);
  const topk = n('TopK', [x, k], 'topk', [], g, 2);
  const reshaped = n('Reshape', [x, n('Shape', [x], 'shape').output(0)], 'reshape').output(0);

  const then1 = new Graph('then1', g);
  const r = n('Relu', [n('MatMul', [x, w], 'mm1', [], then1).output(0)], 'relu', [], then1).output(0);
  const then2 = new Graph('then2', then1);
  then2.outputs = [n('Neg', [n('MatMul', [r, w], 'mm2', [], then2).output(0)], 'neg', [], then2).output(0)];
  const else2 = new Graph('else2', then1);
  else2.outputs = [n('Identity', [r], 'id2', [], else2).output(0)];
  const if2 = n('If', [c2], 'inner', [], then1);
  if2.setAttr(graphAttr('then_branch'), then2);
  if2.setAttr(graphAttr('else_branch'), else2);
  then1.outputs = [if2.output(0)];
  const else1 = new Graph('else1', g);
  else1.outputs = [n('Identity', [x], 'id1', [], else1).output(0)];
  const if1 = n('If', [c1], 'outer');
  if1.setAttr(graphAttr('then_branch'), then1);
  if1.setAttr(graphAttr('else_branch'), else1);
  g.outputs = [if1.output(0), topk.output(0), reshaped];
  const model = new Model(g, 10);
  model.importOpset('', 17);
  return model;
}

describe('gpu readiness on a graph counted node by node', () => {
  const r = gpuReadiness(handBuilt(), [{ layer: 0, part: 'block' }]);

  it('lists both Ifs with their depth, condition and branch sizes', () => {
    expect(r.decodeStep.ifs).toEqual([
      {
        name: 'modc/layer0/outer',
        depth: 0,
        layer: 0,
        part: 'block',
        condition: { value: 'modc/layer0/greater_out', expression: 'Greater(ReduceSum, 0)', kind: 'any selected' },
        branches: { then: { nodes: 3, ifs: 1 }, else: { nodes: 1, ifs: 0 } },
      },
      {
        name: 'modc/layer0/inner',
        depth: 1,
        layer: 0,
        part: 'block',
        condition: { value: 'modc/layer0/equal_out', expression: 'Equal(ReduceSum, ReduceSum)', kind: 'other' },
        branches: { then: { nodes: 2, ifs: 0 }, else: { nodes: 1, ifs: 0 } },
      },
    ]);
  });

  it('flags the TopK k computed from data and both If conditions, not the Reshape fed by Shape', () => {
    expect(r.decodeStep.hostReads.map((h) => [h.op, h.input, h.why, h.depth])).toEqual([
      ['TopK', 1, 'data-dependent output shape', 0],
      ['If', 0, 'If condition', 0],
      ['If', 0, 'If condition', 1],
    ]);
  });

  it('counts the selected path (then, then) and the skipped path (else)', () => {
    // main: ReduceSum, Greater, Equal, ReduceMax, Cast, Reshape, TopK, Shape, Reshape = 9 kernels
    // selected: + MatMul, Relu, MatMul, Neg; skipped: + Identity
    expect(r.kernelsPerConvertedLayer).toEqual([
      { layer: 0, parts: ['block'], selected: { kernels: 13, ifs: 2, hostReads: 3 }, skipped: { kernels: 10, ifs: 1, hostReads: 2 }, ifs: 2, maxIfDepth: 2 },
    ]);
    expect(r.decodeStep.allSelected).toEqual({ kernels: 13, ifs: 2, hostReads: 3 });
    expect(r.decodeStep.allSkipped).toEqual({ kernels: 10, ifs: 1, hostReads: 2 });
    expect(r.outsideLayers).toEqual({ sharedRouting: 0, model: 0 });
  });

  it('finds the one weight two If levels below its initializer', () => {
    expect(r.weightsBelowOneIfLevel).toEqual({
      uses: 1,
      bytes: 64,
      weights: [{ node: 'modc/layer0/mm2', op: 'MatMul', weight: 'W', bytes: 64, levelsBelow: 2 }],
    });
    expect(r.decodeStep.cudaGraphCapturable).toBe(false);
    expect(r.decodeStep.cudaGraphBlockers).toEqual(['control flow: 2 If nodes', 'data-dependent shapes: 1 host read besides If conditions']);
  });
});

describe('gpu readiness of fixture compiles', () => {
  const compileTo = async (fixture: string, name: string, ...flags: string[]) => {
    const out = join(tmp, name, 'model.onnx');
    const res = await runCli('compile', join(FIXTURES, fixture, 'model.onnx'), '-o', out, '--router-init', 'all-pass', '--ungated', '-q', ...flags);
    expect(res.code, res.stderr).toBe(0);
    return out;
  };
  const report = (path: string) => {
    const model = loadModel(path);
    return gpuReadiness(
      model,
      [0, 1, 2].map((layer) => ({ layer, part: 'block' as const })),
    );
  };

  it('an original decoder: no If, no host read, every non-Constant node one kernel', () => {
    const model = loadModel(join(FIXTURES, 'llama-builder-tiny', 'model.onnx'));
    const r = gpuReadiness(model);
    expect(r.decodeStep.ifs).toEqual([]);
    expect(r.decodeStep.hostReads).toEqual([]);
    expect(r.decodeStep.allSelected.kernels).toBe(model.graph.nodes.filter((n) => n.opType !== 'Constant').length);
    expect(r.kernelsPerConvertedLayer).toEqual([]);
    // The cache grows by Concat: its length is symbolic.
    expect(r.decodeStep.cudaGraphBlockers).toEqual(['growing KV cache: past inputs with a symbolic length, so buffer shapes change every step']);
    expect(r.weightsBelowOneIfLevel.uses).toBe(0);
  });

  it('unfused Llama, block all-pass: one if_selected per layer in the main graph, its one-token Ifs one level down, no weight two levels deep', async () => {
    const r = report(await compileTo('llama-builder-tiny', 'llama-block'));
    const ifs = r.decodeStep.ifs.filter((x) => x.layer === 1);
    expect(ifs.map((x) => [x.name, x.depth, x.condition.kind])).toEqual([
      ['modc/layer1/if_selected', 0, 'any selected'],
      ['modc/layer1/one_token_in', 1, 'one token'],
      ['modc/layer1/one_token_out', 1, 'one token'],
    ]);
    expect(r.decodeStep.ifs).toHaveLength(9);
    // Per layer: the If's condition in the main graph; Compact's TopK K in the entry's and the exit's compaction (not on a one-token step).
    expect(r.decodeStep.hostReads.map((h) => [h.op, h.input, h.depth])).toEqual(
      Array.from({ length: 3 }, () => [
        ['If', 0, 0],
        ['TopK', 1, 2],
        ['TopK', 1, 2],
      ]).flat(),
    );
    for (const l of r.kernelsPerConvertedLayer) {
      expect([l.layer, l.ifs, l.maxIfDepth, l.selected.ifs, l.skipped.ifs]).toEqual([l.layer, 3, 2, 3, 1]);
      // A step reads one value either way: the If's condition (the one-token test is read off shapes).
      expect([l.selected.hostReads, l.skipped.hostReads]).toEqual([1, 1]);
      expect(l.selected.kernels).toBeGreaterThan(l.skipped.kernels);
    }
    // Every weight of the layer is one If level below the main graph, where ORT prepacks it.
    expect(r.weightsBelowOneIfLevel).toEqual({ uses: 0, bytes: 0, weights: [] });
    expect(r.decodeStep.allSelected.kernels).toBe(
      r.kernelsPerConvertedLayer.reduce((a, l) => a + l.selected.kernels, 0) + r.outsideLayers.sharedRouting + r.outsideLayers.model,
    );
  });

  it('top-k: each layer selects in a "one-token step" If whose decode path holds no sort, and costs no more kernels per step than threshold', async () => {
    const topk = report(await compileTo('llama-builder-tiny', 'llama-topk', '--routing', 'topk'));
    const threshold = report(await compileTo('llama-builder-tiny', 'llama-threshold'));
    expect(topk.decodeStep.ifs.map((x) => [x.depth, x.layer, x.condition.kind])).toEqual(
      [0, 1, 2].flatMap((l) => [
        [0, l, 'decode step'],
        [0, l, 'any selected'],
        [1, l, 'one token'],
        [1, l, 'one token'],
      ]),
    );
    const model = loadModel(join(tmp, 'llama-topk', 'model.onnx'));
    inlineModcOps(model);
    const steps = [...model.graph.allNodes()].filter((x) => x.opType === 'If' && x.name.includes('modc_decode_step'));
    expect(steps).toHaveLength(3);
    for (const n of steps) {
      const [step, prompt] = ['then_branch', 'else_branch'].map((b) => n.attributes.get(b)!.graph!.nodes.map((x) => x.opType));
      expect(step).not.toContain('TopK');
      expect(prompt).toContain('TopK');
    }
    for (const [i, l] of topk.kernelsPerConvertedLayer.entries()) {
      const t = threshold.kernelsPerConvertedLayer[i]!;
      // The step's test is threshold's (GreaterOrEqual, And); the difference is the If's
      // condition (Shape, Gather, Equal, Greater, And), the same in every layer (ONNX Runtime computes it once).
      expect(l.selected.kernels - t.selected.kernels).toBeLessThanOrEqual(5);
      expect(l.selected.ifs).toBe(t.selected.ifs + 1);
    }
  });

  it('unfused Llama, attention all-pass: no weight two levels deep', async () => {
    const r = report(await compileTo('llama-builder-tiny', 'llama-attention', '--granularity', 'attention'));
    expect(r.decodeStep.ifs.map((x) => [x.name, x.depth])).toEqual(
      [0, 1, 2].flatMap((l) => [[`modc/layer${l}/attention/if_selected`, 0], ...['in', 'out'].map((s) => [`modc/layer${l}/attention/one_token_${s}`, 1])]),
    );
    expect(r.weightsBelowOneIfLevel.uses).toBe(0);
  });

  it('GroupQueryAttention, block all-pass: one if_selected per layer with its entry and exit one-token Ifs, no deep weight', async () => {
    const r = report(await compileTo('forms-gqa-tiny', 'gqa-block'));
    expect(r.decodeStep.ifs.map((x) => [x.name, x.depth, x.condition.kind])).toEqual(
      [0, 1, 2].flatMap((l) => [
        [`modc/layer${l}/if_selected`, 0, 'any selected'],
        [`modc/layer${l}/one_token_in`, 1, 'one token'],
        [`modc/layer${l}/one_token_out`, 1, 'one token'],
      ]),
    );
    for (const l of r.kernelsPerConvertedLayer) expect([l.selected.hostReads, l.skipped.hostReads, l.selected.ifs, l.skipped.ifs]).toEqual([1, 1, 3, 1]);
    expect(r.weightsBelowOneIfLevel.uses).toBe(0);
  });

  it("GroupQueryAttention: a routed layer's seqlens_k and total_sequence_length come from its own lengths, not from a rebuilt mask", async () => {
    const model = loadModel(await compileTo('forms-gqa-tiny', 'gqa-lengths'));
    const gqa = [...model.graph.allNodes()].filter((n) => n.opType === 'GroupQueryAttention');
    expect(gqa).toHaveLength(3);
    // What a value is computed from: graph inputs, and the shapes of values (a walk stops at a Shape).
    const sources = (v: Value): Set<string> => {
      const out = new Set<string>();
      const walk = (x: Value | null) => {
        if (!x || x.initializer) return;
        const n = x.producer;
        if (!n) out.add(x.name);
        else if (n.opType === 'Shape') out.add(`shape of ${n.input(0)!.name}`);
        else n.inputs.forEach(walk);
      };
      walk(v);
      return out;
    };
    for (const [l, n] of gqa.entries()) {
      const [seqlens, total] = [n.input(5)!, n.input(6)!];
      expect([seqlens, total].map((v) => [v.producer?.opType, v.producer?.attrInt('to')])).toEqual([
        ['Cast', DataType.INT32],
        ['Cast', DataType.INT32],
      ]);
      // seqlens_k = past_lengths.l + K - 1, K the layer's selected slots; total = its cache's slots + K. No attention mask.
      const k = [...sources(seqlens)].filter((x) => x !== `past_lengths.${l}`);
      expect(k).toHaveLength(1);
      expect(k[0]).toMatch(/^shape of /);
      expect(sources(seqlens).has(`past_lengths.${l}`)).toBe(true);
      expect([...sources(total)].sort()).toEqual([k[0], `shape of past_key_values.${l}.key`].sort());
    }
  });

  it.each([
    ['genai-tiny', 3, ['in', 'out']],
    ['forms-gqa-window-tiny', 3, ['in', 'out']],
    ['forms-attention23-tiny', 3, ['in', 'out']],
    ['forms-static-tiny', 3, []],
    ['forms-static-window-tiny', 3, []],
    ['forms-fused-gpt2-tiny', 5, ['in', 'out']],
  ])(
    '%s, block all-pass: one if_selected per layer in the main graph (one-token Ifs: %j), the If condition read on either path',
    async (fixture, layers, oneToken) => {
      const model = loadModel(await compileTo(fixture, `${fixture}-block`));
      const r = gpuReadiness(
        model,
        Array.from({ length: layers }, (_, layer) => ({ layer, part: 'block' as const })),
      );
      expect(r.decodeStep.ifs.map((x) => [x.name, x.depth, x.condition.kind])).toEqual(
        Array.from({ length: layers }, (_, l) => [
          [`modc/layer${l}/if_selected`, 0, 'any selected'],
          ...oneToken.map((s) => [`modc/layer${l}/one_token_${s}`, 1, 'one token']),
        ]).flat(),
      );
      const split = oneToken.length > 0;
      for (const l of r.kernelsPerConvertedLayer)
        expect([l.selected.hostReads, l.skipped.hostReads, l.selected.ifs, l.skipped.ifs, l.maxIfDepth]).toEqual(
          split ? [1, 1, 1 + oneToken.length, 1, 2] : [2, 2, 1, 1, 1],
        );
      // Compact's TopK reads its K on the device: in the main graph, or (split) only in the compacting branches.
      expect(r.decodeStep.hostReads.map((h) => [h.op, h.input, h.depth])).toEqual(
        Array.from({ length: layers }, () =>
          split
            ? [
                ['If', 0, 0],
                ['TopK', 1, 2],
                ['TopK', 1, 2],
              ]
            : [
                ['TopK', 1, 0],
                ['If', 0, 0],
              ],
        ).flat(),
      );
      expect(r.weightsBelowOneIfLevel.uses).toBe(0);
    },
  );

  it('modc inspect prints the section and --json carries gpuReadiness', async () => {
    const path = await compileTo('forms-gqa-tiny', 'gqa-cli');
    const text = await runCli('inspect', path);
    expect(text.code).toBe(0);
    expect(text.stdout).toMatch(/gpu readiness/);
    expect(text.stdout).toMatch(/If nodes\s+9 \(nested 2 deep; 3 on "any token selected", 6 on "one-token call"\)/);
    expect(text.stdout).toMatch(/deep weights\s+none/);
    const json = await runCli('inspect', path, '--json');
    const g = JSON.parse(json.stdout).gpuReadiness;
    expect(g.decodeStep.ifs).toHaveLength(9);
    expect(g.kernelsPerConvertedLayer.map((l: { layer: number }) => l.layer)).toEqual([0, 1, 2]);
    const original = JSON.parse((await runCli('inspect', join(FIXTURES, 'forms-gqa-tiny', 'model.onnx'), '--json')).stdout).gpuReadiness;
    expect(original.decodeStep.ifs).toEqual([]);
  });
});
