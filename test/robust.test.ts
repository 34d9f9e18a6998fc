/**
 * Regressions for each failure class the mutation fuzzer found, each from a minimal
 * reproducer: one mutation of a fixture. A crash here would be a non-ModcError escaping.
 */
import { chmodSync, cpSync, existsSync, linkSync, mkdirSync, readdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ModcError, quote } from '../compiler/core/errors.js';
import { modelToProto } from '../compiler/core/io/convert.js';
import { loadModel, modelFromBytes } from '../compiler/core/io/load.js';
import { checkOutputPath, removeStaleTemporaries, saveModel } from '../compiler/core/io/save.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { Value } from '../compiler/core/ir/graph.js';
import { verifyModel } from '../compiler/core/ir/validate.js';
import type { ModelProto } from '../compiler/core/proto/index.js';
import { AttributeType, decodeModelProto, encodeModelProto, int64ToNumber } from '../compiler/core/proto/index.js';
import { readRoutingMetadata } from '../compiler/metadata/routing-metadata.js';
import { runPipeline } from '../compiler/passes/pass-manager.js';
import { createSession } from '../compiler/runtime/ort.js';
import { ModSession } from '../compiler/runtime/session.js';
import { worstReal } from '../compiler/apps/verify/verify.js';
import { expectOneLineError, runCli, tempDir } from './helpers.js';

const FIX = join(import.meta.dirname, '..', 'fixtures');
const tmp = tempDir('modc-robust');
let counter = 0;

/** Writes a mutated copy of a fixture (sidecars copied) and returns its path. */
function mutant(fixture: string, edit: (m: ModelProto) => void, from = join(FIX, fixture, 'model.onnx')): string {
  const dir = join(tmp, `m${counter++}`);
  cpSync(join(from, '..'), dir, { recursive: true });
  const m = decodeModelProto(readFileSync(from));
  edit(m);
  const path = join(dir, 'model.onnx');
  writeFileSync(path, encodeModelProto(m));
  return path;
}

function refusal(f: () => unknown): ModcError {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(ModcError);
    expect((e as Error).message).not.toMatch(/[\n\r\0]/);
    return e as ModcError;
  }
  throw new Error('expected a refusal');
}

async function compiledLlama(extra: string[] = []): Promise<string> {
  const out = join(tmp, `c${counter++}`, 'model.onnx');
  const res = await runCli('compile', join(FIX, 'llama-tiny', 'model.onnx'), '-o', out, '--router-init', 'random', '-q', ...extra);
  expect(res.stderr).toBe('');
  return out;
}

describe('crashes are refusals naming their cause', () => {
  it('modc.routing metadata that is not JSON, or not the documented shape', () => {
    for (const [value, why] of [
      ['{', /not valid JSON/],
      ['[]', /not a JSON object/],
      ['{"mode":"threshold","gated":true,"layers":[{"layer":"x"}]}', /layer index/],
    ] as const) {
      const path = mutant('llama-tiny', (m) => m.metadata_props.push({ key: 'modc.routing', value }));
      const e = refusal(() => readRoutingMetadata(loadModel(path)));
      expect(e.message).toMatch(why);
    }
  });

  it('an attribute of type GRAPH with no graph', () => {
    const path = mutant('llama-tiny', (m) => {
      const a = m.graph!.node.find((n) => n.attribute.length)!.attribute[0]!;
      a.type = AttributeType.GRAPH;
    });
    expect(refusal(() => loadModel(path)).message).toMatch(/attribute '\w+' has type GRAPH but holds no graph/);
  });

  it('an attention MatMul that lost an input: refused on load, before analysis meets it', async () => {
    const path = mutant('llama-tiny', (m) => {
      const mm = m.graph!.node.find((n) => n.op_type === 'MatMul' && n.input.every((i) => !m.graph!.initializer.some((t) => t.name === i)))!;
      mm.input.pop();
    });
    expect(refusal(() => loadModel(path)).message).toMatch(/MatMul node .* has 1 input; MatMul takes 2/);
    expectOneLineError(await runCli('compile', path, '-o', join(tmp, 'mm', 'out.onnx'), '--router-init', 'random'), 1, /MatMul takes 2/);
  });

  it('an attribute holding a value besides the one its type names (fuzz seed 7, case 10403: Constant.value with i set)', () => {
    const path = mutant('llama-tiny', (m) => {
      const c = m.graph!.node.find((n) => n.op_type === 'Constant')!;
      c.attribute[0]!.i = 2 ** 31;
    });
    expect(refusal(() => loadModel(path)).message).toMatch(/Constant node .* attribute 'value' has type TENSOR but also holds a value in field 'i'/);
  });

  it('a fused op that lost a required input (fuzz seed 7, case 516: SkipSimplifiedLayerNormalization)', () => {
    const path = mutant('genai-tiny', (m) => {
      const skip = m.graph!.node.find((n) => n.op_type === 'SkipSimplifiedLayerNormalization')!;
      skip.input.splice(1, 1);
    });
    expect(refusal(() => loadModel(path)).message).toMatch(/SkipSimplifiedLayerNormalization node '.*' lacks required input 2/);
  });

  it('a tensor whose dims do not match its data (embedding dims[1] = 2^31 - 1)', () => {
    const path = mutant('llama-tiny', (m) => {
      const emb = m.graph!.initializer.find((t) => t.dims.length === 2)!;
      emb.dims[1] = 2 ** 31 - 1;
    });
    expect(refusal(() => loadModel(path)).message).toMatch(/initializer '.*': dims \[\d+, 2147483647\] of float need \d+ bytes but raw_data has \d+/);
  });

  it('dims that are negative or too large to address', () => {
    const neg = mutant('llama-tiny', (m) => void (m.graph!.initializer[0]!.dims[0] = -1));
    expect(refusal(() => loadModel(neg)).message).toMatch(/dimension -1 is not a non-negative integer/);
  });

  it('a call to a local modc function that declares fewer outputs (with --inline-ops)', async () => {
    const compiled = await compiledLlama();
    const path = mutant(
      '',
      (m) => {
        const f = m.functions.find((fn) => fn.output.length > 1)!;
        f.output.pop();
      },
      compiled,
    );
    expect(refusal(() => loadModel(path)).message).toMatch(/expects \d outputs from local function 'modc::\w+', which declares \d/);
    expectOneLineError(await runCli('compile', path, '-o', join(tmp, 'fn', 'out.onnx'), '--passes', 'inline-modc-ops'), 1, /local function/);
  });
});

describe('names with control characters are escaped in every message', () => {
  it('a node name with a newline and a value name with a NUL', async () => {
    const path = mutant('llama-tiny', (m) => {
      const mm = m.graph!.node.find((n) => n.op_type === 'MatMul')!;
      mm.name = 'evil\nname';
      mm.input[1] = 'ghost\0value';
    });
    const e = refusal(() => loadModel(path));
    expect(e.message).toContain("MatMul node 'evil\\nname' reads %ghost\\0value, which nothing defines");
    const res = await runCli('inspect', path);
    expectOneLineError(res, 1, /evil\\nname/);
  });

  it('quote() escapes control characters and line separators', () => {
    expect(quote('a\nb\0c\u2028d\u001b')).toBe("'a\\nb\\0c\\u2028d\\u001b'");
    expect(new ModcError('x\ny').message).toBe('x\\ny');
  });
});

describe('outputs ONNX Runtime would reject', () => {
  it('an IR 3 input: the output declares the IR version its captured If initializers need', async () => {
    const path = mutant('llama-tiny', (m) => {
      m.ir_version = 3;
      const g = m.graph!;
      for (const t of g.initializer) {
        if (!g.input.some((v) => v.name === t.name)) {
          g.input.push({
            name: t.name,
            type: { tensor_type: { elem_type: t.data_type, shape: { dim: t.dims.map((d) => ({ dim_value: d })) } } },
            metadata_props: [],
          });
        }
      }
    });
    await (await createSession(path)).release();
    const out = join(tmp, 'ir3', 'model.onnx');
    const res = await runCli('compile', path, '-o', out, '--router-init', 'random', '-q');
    expect(res.stderr).toBe('');
    expect(int64ToNumber(decodeModelProto(readFileSync(out)).ir_version)).toBeGreaterThanOrEqual(8);
    await (await createSession(out)).release();
  });

  it('a missing or renamed default-domain opset import is refused, not guessed', async () => {
    for (const edit of [
      (m: ModelProto) =>
        void m.opset_import.splice(
          m.opset_import.findIndex((o) => !o.domain),
          1,
        ),
      (m: ModelProto) => void (m.opset_import.find((o) => !o.domain)!.domain = 'bogus'),
    ]) {
      const path = mutant('llama-tiny', edit);
      expect(refusal(() => loadModel(path)).message).toMatch(/imports no ai\.onnx opset/);
    }
  });

  it('a layer node whose domain is spelled ai.onnx', async () => {
    const path = mutant('llama-tiny', (m) => {
      for (const n of m.graph!.node) if (n.op_type === 'MatMul' || n.op_type === 'Softmax') n.domain = 'ai.onnx';
    });
    const out = join(tmp, 'aionnx', 'model.onnx');
    const res = await runCli('compile', path, '-o', out, '--router-init', 'random', '-q');
    expect(res.stderr).toBe('');
    await (await createSession(out)).release();
  });

  it("a graph output named like an input keeps the input's type", () => {
    const path = mutant('llama-tiny', (m) => {
      const input = m.graph!.input[0]!;
      m.graph!.output.push({ name: input.name, type: { tensor_type: { elem_type: 1, shape: { dim: [{ dim_value: 3 }] } } }, metadata_props: [] });
    });
    const model = loadModel(path);
    const input = model.graph.inputs[0]!;
    expect(input.type?.tensor_type?.elem_type).toBe(7);
    const out = join(tmp, 'outname', 'model.onnx');
    saveModel(model, out);
    expect(decodeModelProto(readFileSync(out)).graph!.input[0]!.type!.tensor_type!.elem_type).toBe(7);
  });

  it('a token input declared with another rank than [batch, sequence] (fuzz seed 6, case 585)', async () => {
    const path = mutant('gpt2-tiny', (m) => void m.graph!.input.find((v) => v.name === 'position_ids')!.type!.tensor_type!.shape!.dim.push({ dim_value: 1 }));
    await (await createSession(path)).release(); // ONNX Runtime loads it; the routed output would not load
    expectOneLineError(await runCli('compile', path, '-o', join(tmp, 'rank', 'model.onnx'), '--router-init', 'random'), 1, /input position_ids has rank 3/);
  });

  it('library edits are caught by verification, also with --passes none', () => {
    const dup = loadModel(join(FIX, 'llama-tiny', 'model.onnx'));
    const [a, b] = dup.graph.nodes.filter((n) => n.opType === 'MatMul');
    a!.outputs[0]!.name = b!.outputs[0]!.name;
    runPipeline(dup, []);
    expect(refusal(() => saveModel(dup, join(tmp, 'dup', 'model.onnx'))).message).toMatch(/value name '.*' is defined twice/);
    expect(verifyModel(dup).length).toBeGreaterThan(0);

    const gone = loadModel(join(FIX, 'llama-tiny', 'model.onnx'));
    const w = [...gone.graph.initializers.values()].find((v) => v.uses.size)!;
    gone.graph.removeInitializer(w);
    expect(refusal(() => saveModel(gone, join(tmp, 'gone', 'model.onnx'))).message).toMatch(/which nothing defines/);
    expect(existsSync(join(tmp, 'gone', 'model.onnx'))).toBe(false);
  });

  it('a value renamed to the empty name, which ONNX reads as omitted (fuzz seed 21, case 94495)', () => {
    const m = loadModel(join(FIX, 'forms-gqa-fp16-tiny', 'model.onnx'));
    const skip = m.graph.nodes.find((n) => n.opType === 'SkipLayerNormalization' && n.inputs[0]?.producer)!;
    skip.inputs[0]!.name = '';
    runPipeline(m, []);
    expect(verifyModel(m).map((i) => i.message)).toContainEqual(
      expect.stringMatching(/SkipLayerNormalization node .* input 0 reads a value with the empty name/),
    );
    expect(refusal(() => saveModel(m, join(tmp, 'empty', 'model.onnx'))).message).toMatch(/the model is invalid/);
    expect(existsSync(join(tmp, 'empty', 'model.onnx'))).toBe(false);

    const input = loadModel(join(FIX, 'llama-tiny', 'model.onnx'));
    input.graph.inputs[0]!.name = '';
    expect(
      verifyModel(input)
        .map((i) => i.message)
        .join('\n'),
    ).toMatch(/a graph input has the empty name/);
  });

  it('an input rewired to a value of a rank the op cannot take (fuzz seed 21, case 2850: Gather of a scalar)', async () => {
    const m = loadModel(join(FIX, 'gpt2-tiny', 'model.onnx'));
    const g = m.graph;
    // Gather(Shape(x), Constant scalar) is a scalar; the token embedding's Gather is rewired to read it.
    const scalar = g.nodes.find((n) => n.opType === 'Gather' && n.inputs[0]?.producer?.opType === 'Shape')!.output(0);
    const gather = g.nodes.find((n) => n.opType === 'Gather' && n.inputs[0]?.initializer?.dims.length === 2)!;
    gather.setInput(0, scalar);
    // Found in a graph not sorted again too (fuzz seed 31, cases 16017 and 31173: saved with --passes none).
    g.setNodes([gather, ...g.nodes.filter((n) => n !== gather)]);
    expect(g.indexOf(gather)).toBeLessThan(g.indexOf(scalar.producer!));
    expect(verifyModel(m, { order: false }).map((i) => i.message)).toContainEqual(expect.stringMatching(/reads a scalar as its data/));
    g.toposort();
    expect(verifyModel(m).map((i) => i.message)).toContainEqual(expect.stringMatching(/reads a scalar as its data; it needs rank >= 1/));
    expect(refusal(() => saveModel(m, join(tmp, 'rank', 'model.onnx'))).message).toMatch(/Gather .* reads a scalar/);
    // The check is ONNX Runtime's own: the same model, written without modc's verifier, fails to load there.
    const dir = join(tmp, 'rank-raw');
    cpSync(join(FIX, 'gpt2-tiny'), dir, { recursive: true });
    writeFileSync(join(dir, 'model.onnx'), encodeModelProto(modelToProto(m, (v) => v.initializer!.proto)));
    await expect(createSession(join(dir, 'model.onnx'))).rejects.toThrow(/rank >= 1/);
  });

  it('a hidden size declared as 0 or -1 (fuzz seed 32, case 50720: inputs_embeds [B, S, -1]) is refused by analysis and by planRouting', async () => {
    const { analyzeDecoder } = await import('../compiler/analysis/analyze.js');
    const { planRouting } = await import('../compiler/routing/routing-plan.js');
    for (const h of [0, -1]) {
      const path = mutant('forms-embeds-tiny', (m) => {
        const input = m.graph!.input.find((i) => i.name === 'inputs_embeds')!;
        input.type!.tensor_type!.shape!.dim[2] = { dim_value: h } as never;
      });
      expect(refusal(() => analyzeDecoder(loadModel(path))).message).toMatch(new RegExp(`declares hidden size ${h}; it must be a positive integer`));
      expect(refusal(() => planRouting({ numLayers: 3, hiddenSize: h, routers: { kind: 'all-pass' } })).message).toMatch(
        /hidden size is -?\d: it must be a positive integer/,
      );
    }
  });

  it('a Cast to element type 0 is refused on load (fuzz seed 33, case 22182: compile then wrote a constant of type 0)', () => {
    const path = mutant('llama-tiny', (m) => {
      const cast = m.graph!.node.find((n) => n.op_type === 'Cast')!;
      cast.attribute.find((a) => a.name === 'to')!.i = 0 as never;
    });
    expect(refusal(() => loadModel(path)).message).toMatch(/Cast node '.*' casts to element type 0, which is not a tensor type/);
  });

  it('a cycle that closes through an If branch reading a later value is refused before save (fuzz seed 33, case 28485)', async () => {
    const m = loadModel(await compiledLlama());
    const g = m.graph;
    const ifNode = g.nodes.find((n) => n.opType === 'If')!;
    // The branch reads a value computed from the If's own output: a cycle only through the subgraph.
    const later = g.nodes.find((n) => g.indexOf(n) > g.indexOf(ifNode) && n.inputs.some((v) => v && v.producer === ifNode))!.output(0);
    const branch = ifNode.attributes.get('then_branch')!.graph!;
    const reader = branch.nodes.find((n) => n.inputs.length > 0)!;
    const slot = reader.inputs.findIndex((v) => v !== null);
    reader.setInput(slot, later);
    const issues = verifyModel(m, { order: false }).map((i) => i.message);
    expect(issues).toContainEqual(expect.stringMatching(/has a cycle through .*; ONNX graphs must be acyclic/));
    expect(refusal(() => saveModel(m, join(tmp, 'cycle', 'model.onnx'))).message).toMatch(/cycle/);
  });

  it('a MatMul rewired to an input whose last dim cannot meet its weight (fuzz seed 34, case 91638)', () => {
    const m = loadModel(join(FIX, 'forms-hybrid-tiny', 'model.onnx'));
    const g = m.graph;
    const [gate, up] = ['gate_proj', 'up_proj'].map((p) => g.nodes.find((n) => n.opType === 'MatMul' && n.name.includes(`layers.2/mlp/${p}`))!);
    gate!.setInput(0, up!.output(0)); // [B, S, 64] into a [32, 64] weight
    g.toposort();
    expect(verifyModel(m).map((i) => i.message)).toContainEqual(
      expect.stringMatching(/gate_proj\/MatMul' multiplies an input whose last dim is 64 by one whose second-to-last dim is 32/),
    );
  });

  it('a head count outside int32 (fuzz seed 34, case 90939: kv_num_heads 2^32 + 1) is refused by analysis', async () => {
    const { analyzeDecoder } = await import('../compiler/analysis/analyze.js');
    const path = mutant('forms-gqa-tiny', (m) => {
      for (const n of m.graph!.node) if (n.op_type === 'GroupQueryAttention') n.attribute.find((a) => a.name === 'kv_num_heads')!.i = 4294967297 as never;
    });
    expect(refusal(() => analyzeDecoder(loadModel(path))).message).toMatch(/has kv_num_heads 4294967297; a head count must be in \[1, 2\^31 - 1\]/);
  });

  it('modelFromBytes anchored in a folder that does not exist: a refusal once external data needs it', () => {
    const bytes = readFileSync(join(FIX, 'genai-tiny', 'model.onnx'));
    expect(refusal(() => modelFromBytes(bytes, join(tmp, 'no-such-folder', 'model.onnx'))).message).toMatch(/missing external data: 'model.onnx.data'/);
    // A model without external data needs no folder.
    expect(modelFromBytes(readFileSync(join(FIX, 'llama-tiny', 'model.onnx')), join(tmp, 'no-such-folder', 'model.onnx')).graph.nodes.length).toBeGreaterThan(
      0,
    );
  });

  it('rank and element-type checks refuse only what is certain: every fixture model and a MoD compile pass them', async () => {
    const { rankIssues } = await import('../compiler/core/ir/ranks.js');
    const { elemTypeIssues } = await import('../compiler/core/ir/elem-types.js');
    const models = readdirSync(FIX).flatMap((d) =>
      statSync(join(FIX, d)).isDirectory()
        ? readdirSync(join(FIX, d))
            .filter((f) => f.endsWith('.onnx'))
            .map((f) => join(FIX, d, f))
        : [],
    );
    expect(models.length).toBeGreaterThan(20);
    for (const path of models) {
      const g = loadModel(path).graph;
      expect([path, rankIssues(g), elemTypeIssues(g)]).toEqual([path, [], []]);
    }
    const compiled = loadModel(await compiledLlama()).graph;
    expect([rankIssues(compiled), elemTypeIssues(compiled)]).toEqual([[], []]);
  });

  it('an input rewired to a value of an element type the op cannot take (fuzz seed 32, case 99691: Slice ends of float)', async () => {
    const m = loadModel(join(FIX, 'llama-builder-tiny', 'model.onnx'));
    const g = m.graph;
    const slice = g.nodes.find((n) => n.opType === 'Slice' && n.inputs[2])!;
    const weight = [...g.initializers.values()].find((v) => v.initializer!.dataType === DataType.FLOAT)!;
    slice.setInput(2, weight);
    expect(verifyModel(m).map((i) => i.message)).toContainEqual(expect.stringMatching(/Slice node .* input 2 is float; Slice takes int32 or int64 there/));
    expect(refusal(() => saveModel(m, join(tmp, 'type', 'model.onnx'))).message).toMatch(/input 2 is float/);
    // ONNX Runtime refuses the same model written without the check.
    const dir = join(tmp, 'type-raw');
    cpSync(join(FIX, 'llama-builder-tiny'), dir, { recursive: true });
    writeFileSync(join(dir, 'model.onnx'), encodeModelProto(modelToProto(m, (v) => v.initializer!.proto)));
    await expect(createSession(join(dir, 'model.onnx'))).rejects.toThrow(/Type Error/);
  });
});

describe('compiles that do not keep the meaning (the differential check)', () => {
  /** A norm's ReduceMean in forms-nbits-tiny reducing over `axes` (the mutation: its axes attribute changed). */
  const reduceOver = (name: string, axes: number[]) =>
    mutant('forms-nbits-tiny', (m) => {
      const n = m.graph!.node.find((x) => x.name === name)!;
      n.attribute.find((a) => a.name === 'axes')!.ints = axes;
    });
  const ROWS = [
    [5, 6, 7, 8, 9, 10, 11],
    [12, 13, 14],
    [15, 16, 17, 18, 19],
  ];

  it('a norm reducing over every axis, tokens included (fuzz seed 41, case 1690): every layer up to it stays dense, naming the node', async () => {
    const path = reduceOver('/model/layers.2/post_attention_layernorm/ReduceMean', []);
    const res = await runCli('compile', path, '-o', join(tmp, `c${counter++}`, 'model.onnx'), '--router-init', 'all-pass');
    expectOneLineError(
      res,
      1,
      /^modc: no layer was converted \(layer 0: layer 2 couples tokens: ReduceMean node '\/model\/layers\.2\/post_attention_layernorm\/ReduceMean' reduces over the token axis of .* \(axis 1\), so the selected tokens alone cannot reproduce it; routing it or a layer before it would change what that node reads; layers 1, 2 also stayed dense\)/,
    );
  });

  it('a norm reducing over the tokens in layer 1: layers 0 and 1 stay dense, layer 2 routes, and every-token routing reproduces the original with padding on either side', async () => {
    const path = reduceOver('/model/layers.1/input_layernorm/ReduceMean', [1]);
    const out = join(tmp, `c${counter++}`, 'model.onnx');
    const res = await runCli('compile', path, '-o', out, '--router-init', 'all-pass', '--ungated', '--json');
    expect(res.code, res.stderr).toBe(0);
    const routing = JSON.parse(res.stdout).routing;
    expect(routing.converted.map((l: { layer: number }) => l.layer)).toEqual([2]);
    expect(routing.notConverted.map((l: { layer: number }) => l.layer)).toEqual([0, 1]);
    for (const pad of ['left', 'right'] as const) {
      const [a, b] = await Promise.all([ModSession.create(path), ModSession.create(out)]);
      expect(worstReal(await a.forward(ROWS, { pad }), await b.forward(ROWS, { pad }), ROWS, pad), pad).toBeLessThan(1e-4);
    }
  });
});

describe('data safety', () => {
  function genaiCopy(): string {
    const dir = join(tmp, `g${counter++}`);
    cpSync(join(FIX, 'genai-tiny'), dir, { recursive: true });
    return join(dir, 'model.onnx');
  }

  it("refuses -o onto the input's external-data file, directly, through a symlink and through a hard link", async () => {
    const input = genaiCopy();
    const data = join(input, '..', 'model.onnx.data');
    const before = readFileSync(data);
    symlinkSync(data, join(tmp, `sym${counter}`));
    linkSync(data, join(tmp, `hard${counter}`));
    for (const out of [data, join(tmp, `sym${counter}`), join(tmp, `hard${counter}`)]) {
      const res = await runCli('compile', input, '-o', out, '--passes', 'none');
      expectOneLineError(res, 1, /refusing to overwrite an external-data file of the input model/);
      expect(readFileSync(data).equals(before)).toBe(true);
    }
    counter++;
  });

  it('a new sidecar never replaces a data file the model reads, however its location is spelled', () => {
    const input = genaiCopy();
    const path = mutant(
      '',
      (m) => {
        for (const t of m.graph!.initializer) for (const e of t.external_data) if (e.key === 'location') e.value = './model.onnx.data';
      },
      input,
    );
    const data = join(path, '..', 'model.onnx.data');
    const before = readFileSync(data);
    const model = loadModel(path);
    const res = saveModel(model, join(path, '..', 'out.onnx'), { externalizeThreshold: 16, externalDataName: 'model.onnx.data' });
    expect(readFileSync(data).equals(before)).toBe(true);
    expect(res.externalFiles.find((f) => f.how === 'written')?.location).toBe('_model.onnx.data');
    expect(loadModel(join(path, '..', 'out.onnx')).graph.initializers.size).toBe(model.graph.initializers.size);
  });

  it('refuses unwritable outputs before any work, with one line and exit 1', async () => {
    const input = join(FIX, 'llama-tiny', 'model.onnx');
    const file = join(tmp, 'afile');
    writeFileSync(file, 'x');
    const dir = join(tmp, 'adir');
    mkdirSync(dir, { recursive: true });
    const cases: [string, RegExp][] = [
      [dir, /is a directory/],
      [join(file, 'sub', 'model.onnx'), /is a file, not a folder/],
      ['/proc/modc-test/model.onnx', /cannot write into folder '\/proc'|cannot write/],
      ['/dev/null', /exists and is not a regular file/],
    ];
    if (process.getuid?.() !== 0) {
      const ro = join(tmp, 'readonly');
      mkdirSync(ro);
      chmodSync(ro, 0o555);
      cases.push([join(ro, 'model.onnx'), /permission denied/]);
    }
    for (const [out, why] of cases) {
      const res = await runCli('compile', input, '-o', out, '--router-init', 'random', '--dump-after', '*', '--dump-dir', join(tmp, 'dumps'));
      expectOneLineError(res, 1, why);
      expect(existsSync(join(tmp, 'dumps'))).toBe(false); // no pass ran
    }
    // Missing parent folders are still created.
    const deep = join(tmp, 'new', 'deeper', 'model.onnx');
    expect((await runCli('compile', input, '-o', deep, '--passes', 'none', '-q')).code).toBe(0);
    expect(existsSync(deep)).toBe(true);
  });

  it("checkOutputPath is the library's check too", () => {
    const model = loadModel(join(FIX, 'llama-tiny', 'model.onnx'));
    expect(refusal(() => checkOutputPath(join(FIX, 'llama-tiny', 'model.onnx'), model)).message).toMatch(/refusing to overwrite the input model/);
    expect(refusal(() => saveModel(model, '/dev/null')).message).toMatch(/not a regular file/);
  });

  it('unknown protobuf fields survive --passes none byte for byte, and a full compile where untouched', async () => {
    const add = (o: object, bytes: number[]) => {
      const u = o as { $unknowns?: Uint8Array[] };
      u.$unknowns = [...(u.$unknowns ?? []), Uint8Array.from(bytes)];
    };
    let nodeName = '';
    let tensorName = '';
    const path = mutant('llama-tiny', (m) => {
      add(m, [0xb8, 0x3e, 0x07]);
      add(m.graph!, [0xb8, 0x3e, 0x08]);
      const last = m.graph!.node[m.graph!.node.length - 1]!; // the lm_head end: outside every layer
      nodeName = last.name!;
      add(last, [0xb8, 0x3e, 0x09]);
      const withAttr = m.graph!.node.find((n) => n.attribute.length)!;
      add(withAttr.attribute[0]!, [0xb8, 0x3e, 0x0a]);
      const t = m.graph!.initializer[0]!;
      tensorName = t.name!;
      add(t, [0xb8, 0x3e, 0x0b]);
      add(m.graph!.input[0]!, [0xb8, 0x3e, 0x0c]);
      add(m.graph!.input[0]!.type!, [0xb8, 0x3e, 0x0d]);
      add(m.opset_import[0]!, [0xb8, 0x3e, 0x0e]);
    });
    const round = join(tmp, 'unk', 'round.onnx');
    expect((await runCli('compile', path, '-o', round, '--passes', 'none', '-q')).code).toBe(0);
    expect(readFileSync(round).equals(readFileSync(path))).toBe(true);

    const out = join(tmp, 'unk', 'mod.onnx');
    expect((await runCli('compile', path, '-o', out, '--router-init', 'random', '-q')).code).toBe(0);
    const m = decodeModelProto(readFileSync(out));
    const unknowns = (o: object | undefined) => ((o as { $unknowns?: Uint8Array[] } | undefined)?.$unknowns ?? []).map((b) => Buffer.from(b).toString('hex'));
    expect(unknowns(m)).toEqual(['b83e07']);
    expect(unknowns(m.graph)).toEqual(['b83e08']);
    expect(unknowns(m.graph!.node.find((n) => n.name === nodeName))).toEqual(['b83e09']);
    expect(unknowns(m.graph!.initializer.find((t) => t.name === tensorName))).toEqual(['b83e0b']);
    expect(unknowns(m.graph!.input[0])).toEqual(['b83e0c']);
    expect(unknowns(m.graph!.input[0]!.type)).toEqual(['b83e0d']);
  });

  it('external locations resolve the way the OS opens them', () => {
    const input = genaiCopy();
    const path = mutant(
      '',
      (m) => {
        for (const t of m.graph!.initializer) for (const e of t.external_data) if (e.key === 'location') e.value = 'sub/../model.onnx.data';
      },
      input,
    );
    cpSync(join(input, '..', 'model.onnx.data'), join(path, '..', 'model.onnx.data'));
    expect(refusal(() => loadModel(path)).message).toMatch(/missing external data: 'sub\/\.\.\/model\.onnx\.data'/);
    mkdirSync(join(path, '..', 'sub'));
    const model = loadModel(path);
    // Saved elsewhere, the location is normalised so the output folder needs no sub/.
    const out = join(tmp, 'extout', 'model.onnx');
    saveModel(model, out);
    expect(loadModel(out).graph.initializers.size).toBe(model.graph.initializers.size);
  });

  it("a later save removes the temporaries a killed save left, and keeps a live writer's", () => {
    const dir = join(tmp, 'stale');
    mkdirSync(dir, { recursive: true });
    const dead = join(dir, '.model.onnx.tmp-modc-999999999-abc123');
    const live = join(dir, `.model.onnx.tmp-modc-${process.ppid}-abc123`);
    const other = join(dir, '.notours.tmp');
    for (const f of [dead, live, other]) writeFileSync(f, 'x');
    saveModel(loadModel(join(FIX, 'llama-tiny', 'model.onnx')), join(dir, 'model.onnx'));
    expect(existsSync(dead)).toBe(false);
    expect(existsSync(live)).toBe(true);
    expect(existsSync(other)).toBe(true);
    expect(readdirSync(dir).filter((f) => f.includes('tmp-modc')).length).toBe(1);
    expect(removeStaleTemporaries(dir)).toEqual([]);
  });
});

describe('IR values', () => {
  it('Value.toString escapes its name', () => {
    expect(String(new Value('a\nb'))).toBe('%a\\nb');
  });
});
