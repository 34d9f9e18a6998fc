import { describe, expect, it } from 'vitest';
import { DataType, floatToHalf, halfToFloat, lowestFinite } from '../compiler/core/ir/dtype.js';
import { Graph, graphAttribute, Value } from '../compiler/core/ir/graph.js';
import { Model } from '../compiler/core/ir/model.js';
import { Tensor } from '../compiler/core/ir/tensor.js';
import { verifyModel } from '../compiler/core/ir/validate.js';
import { PassRegistry, runPipeline, type Pass } from '../compiler/passes/pass-manager.js';
import { defaultRegistry } from '../compiler/passes/pipeline.js';
import { loadModel } from '../compiler/core/io/load.js';
import { join } from 'node:path';
import { allModels, ROOT } from './helpers.js';

const f32 = { tensor_type: { elem_type: DataType.FLOAT, shape: { dim: [{ dim_param: 'n' }] } } };

/** x -> Relu -> Neg -> y, plus a dead Exp branch. */
function chain() {
  const g = new Graph('chain');
  const x = g.addInput(new Value('x', f32));
  const relu = g.addNode('Relu', [x]);
  const neg = g.addNode('Neg', [relu.output(0)], [new Value('y', f32)]);
  const dead = g.addNode('Exp', [relu.output(0)]);
  g.outputs = [neg.output(0)];
  const model = new Model(g, 8);
  model.opsetImports = [{ domain: '', version: 17 }];
  return { g, x, relu, neg, dead, model };
}

describe('graph IR', () => {
  it('tracks producers and uses, and replaceAllUsesWith rewires every reader', () => {
    const { g, x, relu, neg, dead } = chain();
    expect(relu.output(0).producer).toBe(relu);
    expect(
      relu
        .output(0)
        .consumers()
        .sort((a, b) => a.opType.localeCompare(b.opType)),
    ).toEqual([dead, neg]);
    const sig = g.addNode('Sigmoid', [x], 1, { before: neg });
    relu.output(0).replaceAllUsesWith(sig.output(0));
    expect(neg.input(0)).toBe(sig.output(0));
    expect(dead.input(0)).toBe(sig.output(0));
    expect(relu.output(0).uses.size).toBe(0);
  });

  it('replaceAllUsesWith also redirects graph outputs', () => {
    const { g, x, neg } = chain();
    const abs = g.addNode('Abs', [x]);
    neg.output(0).replaceAllUsesWith(abs.output(0));
    expect(g.outputs).toEqual([abs.output(0)]);
  });

  it('eliminates dead code and unused initializers', () => {
    const { g, model, dead } = chain();
    const w = g.addInitializer(new Value('unused'), Tensor.fromArray('unused', [1], Float32Array.from([1])));
    expect(g.eliminateDeadCode()).toBe(1);
    expect(g.nodes).not.toContain(dead);
    expect(g.initializers.has(w.name)).toBe(false);
    expect(verifyModel(model)).toEqual([]);
  });

  it('sorts topologically, stably, and rejects cycles', () => {
    const { g, relu, neg, dead } = chain();
    g.setNodes([neg, dead, relu]);
    g.toposort();
    expect(g.nodes).toEqual([relu, neg, dead]);
    relu.setInput(0, neg.output(0));
    expect(() => g.toposort()).toThrow(/cycle through Relu/);
    neg.setInput(0, neg.output(0));
    expect(() => g.toposort()).toThrow(/cycle/);
  });

  it('gives unique names and clones nodes with a value mapping', () => {
    const { g, x, relu, neg } = chain();
    expect(g.uniqueName('x')).toBe('x_1');
    const x2 = g.addInput(new Value(g.uniqueName('x2'), f32));
    const mapping = new Map([[x, x2]]);
    const clones = g.cloneNodes([relu, neg], mapping);
    expect(clones.map((n) => n.opType)).toEqual(['Relu', 'Neg']);
    expect(clones[0]!.input(0)).toBe(x2);
    expect(clones[1]!.input(0)).toBe(clones[0]!.output(0));
    expect(mapping.get(neg.output(0))).toBe(clones[1]!.output(0));
    expect(new Set(g.nodes.flatMap((n) => n.outputs.map((v) => v.name))).size).toBe(g.nodes.length);
  });

  it('clones an If with its branches: the copies read the mapped outer values and are new graphs', () => {
    const { g, x } = chain();
    const cond = g.addInput(new Value('cond', { tensor_type: { elem_type: DataType.BOOL, shape: { dim: [] } } }));
    const then = new Graph('then', g);
    const neg = then.addNode('Neg', [x], [then.newValue('neg_out', f32)]);
    then.outputs = [neg.output(0)];
    const otherwise = new Graph('else', g);
    otherwise.outputs = [otherwise.addNode('Identity', [x], [otherwise.newValue('id_out', f32)]).output(0)];
    const node = g.addNode('If', [cond], [g.newValue('if_out', f32)]);
    node.setAttr(graphAttribute('then_branch'), then);
    node.setAttr(graphAttribute('else_branch'), otherwise);
    const x2 = g.addInput(new Value('x2', f32));
    const [clone] = g.cloneNodes([node], new Map([[x, x2]]));
    const [t, e] = ['then_branch', 'else_branch'].map((b) => clone!.attributes.get(b)!.graph!);
    expect([t, e].map((b) => b !== then && b !== otherwise && b.parent === g)).toEqual([true, true]);
    expect([t!.nodes[0]!.input(0), e!.nodes[0]!.input(0)]).toEqual([x2, x2]);
    expect(t!.outputs).toEqual([t!.nodes[0]!.output(0)]);
    // The original branches are untouched.
    expect(then.nodes[0]!.input(0)).toBe(x);
  });

  it('converts half floats both ways', () => {
    // Representable values come back exactly, down to the smallest normal and subnormal halves
    // (an absolute tolerance would pass 6.1e-5 or 1e-7 returned as 0).
    for (const v of [0, 1, -2.5, 65504, 2 ** -14, -(2 ** -24), 1 + 2 ** -10]) expect(halfToFloat(floatToHalf(v)), String(v)).toBe(v);
    // Others round to the nearest half: within half a unit in the last place, relative to the value.
    for (const v of [6.1e-5, 0.1, -3.14159, 1000.3]) {
      const back = halfToFloat(floatToHalf(v));
      expect(Math.abs(back - v) / Math.abs(v), String(v)).toBeLessThanOrEqual(2 ** -11);
    }
    // Below the smallest normal the step is 2^-24: 1e-7 is 1.68 steps, so it becomes 2 steps.
    expect(halfToFloat(floatToHalf(1e-7))).toBe(2 * 2 ** -24);
    expect(floatToHalf(1)).toBe(0x3c00);
    expect(floatToHalf(65536)).toBe(0x7c00);
    expect(Number.isNaN(halfToFloat(floatToHalf(NaN)))).toBe(true);
  });
});

describe('lowest finite values', () => {
  it("are each float type's largest finite magnitude, negated; null for other types", () => {
    // float32 and bfloat16: (2 - 2^-m) * 2^127 with 23 and 7 mantissa bits; float16: (2 - 2^-10) * 2^15.
    expect(lowestFinite(DataType.FLOAT)).toBe(-(2 - 2 ** -23) * 2 ** 127);
    expect(Math.fround(lowestFinite(DataType.FLOAT)!)).toBe(lowestFinite(DataType.FLOAT));
    expect(lowestFinite(DataType.BFLOAT16)).toBe(-(2 - 2 ** -7) * 2 ** 127);
    expect(lowestFinite(DataType.FLOAT16)).toBe(-(2 - 2 ** -10) * 2 ** 15);
    expect(halfToFloat(floatToHalf(lowestFinite(DataType.FLOAT16)!))).toBe(lowestFinite(DataType.FLOAT16));
    expect(lowestFinite(DataType.DOUBLE)).toBe(-Number.MAX_VALUE);
    expect(lowestFinite(DataType.INT64)).toBeNull();
  });
});

describe('verifier', () => {
  it('accepts real models', () => {
    // Every fixture: the verifier's structural rules (arity, opsets, names) hold for real exports.
    for (const { path } of allModels()) expect(verifyModel(loadModel(path)), path).toEqual([]);
  });

  it('names the node that reads a value before its definition', () => {
    const { g, model, relu, neg, dead } = chain();
    g.setNodes([neg, relu, dead]);
    const issues = verifyModel(model);
    expect(issues[0]!.message).toMatch(/Neg node producing 'y' reads %relu_out before it is defined/);
  });

  it('names dangling values and untyped graph outputs', () => {
    const { g, model, neg } = chain();
    neg.setInput(0, new Value('ghost'));
    g.outputs[0]!.type = undefined;
    const messages = verifyModel(model).map((i) => i.message);
    expect(messages).toContain("Neg node producing 'y' reads %ghost, which nothing defines");
    expect(messages).toContain('graph output %y has no type');
  });
});

describe('certain dims', () => {
  /** x + y (each input [?, ?, ?] or as given) into MatMul by a [32, 64] weight. */
  function addThenMatMul(xDims: ({ dim_value: number } | Record<string, never>)[], yDims: ({ dim_value: number } | Record<string, never>)[]) {
    const g = new Graph('g');
    const t = (dim: typeof xDims) => ({ tensor_type: { elem_type: DataType.FLOAT, shape: { dim } } });
    const x = g.addInput(new Value('x', t(xDims)));
    const y = g.addInput(new Value('y', t(yDims)));
    const w = g.addInitializer(new Value('w'), Tensor.fromArray('w', [32, 64], new Float32Array(32 * 64)));
    const sum = g.addNode('Add', [x, y]).output(0);
    const mm = g.addNode('MatMul', [sum, w], [new Value('z', t([{}, {}, { dim_value: 64 }]))]);
    g.outputs = [mm.output(0)];
    const model = new Model(g, 8);
    model.opsetImports = [{ domain: '', version: 17 }];
    return { model, sum };
  }

  it('an unknown dim broadcast against an unknown dim stays unknown: two [?, ?, ?] inputs added feed a [32, 64] weight', async () => {
    const { certainDims } = await import('../compiler/core/ir/ranks.js');
    const { model, sum } = addThenMatMul([{}, {}, {}], [{}, {}, {}]);
    expect(certainDims(model.graph).get(sum)).toEqual([null, null, null]);
    expect(verifyModel(model)).toEqual([]);
  });

  it('a missing leading dim broadcasts as 1, a known dim wins over an unknown one, and a certain mismatch is still refused', async () => {
    const { certainDims } = await import('../compiler/core/ir/ranks.js');
    const known = addThenMatMul([{}, {}, { dim_value: 32 }], [{ dim_value: 32 }]);
    expect(certainDims(known.model.graph).get(known.sum)).toEqual([null, null, 32]);
    expect(verifyModel(known.model)).toEqual([]);
    const wrong = addThenMatMul([{}, {}, {}], [{ dim_value: 16 }]);
    expect(certainDims(wrong.model.graph).get(wrong.sum)).toEqual([null, null, 16]);
    expect(verifyModel(wrong.model).map((i) => i.message)).toContainEqual(
      expect.stringMatching(/multiplies an input whose last dim is 16 by one whose second-to-last dim is 32/),
    );
  });
});

describe('pass manager', () => {
  const breakIt: Pass = {
    name: 'break-it',
    description: 'leaves a dangling input',
    run(model) {
      model.graph.nodes[0]!.setInput(0, new Value('dangling'));
      return { changed: true };
    },
  };

  it('records time and node counts per pass', () => {
    const { model } = chain();
    const records = runPipeline(model, defaultRegistry().parsePipeline('cleanup'));
    expect(records).toHaveLength(1);
    expect(records[0]).toMatchObject({ pass: 'cleanup', nodesBefore: 3, nodesAfter: 2, changed: true });
  });

  it('verifies after each pass and names the pass that broke the IR', () => {
    const { model } = chain();
    const reg = new PassRegistry().register(breakIt);
    expect(() => runPipeline(model, reg.parsePipeline('break-it'))).toThrow(
      /invalid IR after pass break-it: Relu node .* reads %dangling, which nothing defines/,
    );
  });

  it('parses pass options and rejects unknown ones', () => {
    const reg = new PassRegistry().register({ ...breakIt, name: 'opt', options: [{ name: 'p', type: 'number', description: '', default: 0.5 }] });
    expect(reg.parsePipeline('opt{p=0.25}')[0]!.options).toEqual({ p: 0.25 });
    expect(reg.parsePipeline('opt')[0]!.options).toEqual({ p: 0.5 });
    expect(() => reg.parsePipeline('opt{q=1}')).toThrow(/has no option 'q'/);
    expect(() => reg.parsePipeline('opt{p=abc}')).toThrow(/must be a number/);
    expect(reg.parsePipeline('none')).toEqual([]);
  });

  it('lift-constants turns Constant nodes into initializers without changing results', () => {
    const model = loadModel(join(ROOT, 'fixtures', 'gpt2-tiny', 'model.onnx'));
    const constants = model.graph.nodes.filter((n) => n.opType === 'Constant').length;
    const before = model.graph.initializers.size;
    const [rec] = runPipeline(model, defaultRegistry().parsePipeline('lift-constants'));
    expect(rec!.nodesBefore - rec!.nodesAfter).toBe(constants);
    expect(model.graph.initializers.size).toBe(before + constants);
  });
});
