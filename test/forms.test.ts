/**
 * Decoder forms of real exports (docs/forms.md), one fixture each from fixtures/builder/forms.ts:
 * layers found, compiled (all-pass and routed), and `modc verify` passing on the result.
 */
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { loadModel, modelFromBytes } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { create, decodeModelProto, encodeModelProto, type ModelProto, type NodeProto } from '../compiler/core/proto/index.js';
import { ModSession } from '../compiler/runtime/session.js';
import { worstReal } from '../compiler/apps/verify/verify.js';
import { GraphFacts, weightMatMuls } from '../compiler/analysis/index.js';
import { buildFixtures, FIXTURES_DIR, FORM_FIXTURES, FORMS_CONFIG, TINY_SEED } from '../fixtures/build-fixtures.js';
import { buildFormDecoder, writeFormModel } from '../fixtures/builder/forms.js';
import { expectOneLineError, runCli, tempDir } from './helpers.js';
import { rowByRowNll } from './mod-helpers.js';

const tmp = tempDir('modc-forms');
const fixture = (dir: string) => join(FIXTURES_DIR, dir, 'model.onnx');
const ROWS = [
  [5, 6, 7, 8, 9, 10, 11],
  [12, 13, 14],
  [15, 16, 17, 18, 19],
];

const node = (op: string, input: string[], output: string[]): NodeProto => create<NodeProto>('NodeProto', { op_type: op, input, output, name: `${op}_node` });

/** x -> Abs(b) (downstream of the cycle, listed first), Relu(b) -> a, Neg(a) -> b, Identity(x) -> y. */
function cyclicModel(): Uint8Array {
  const f32 = { tensor_type: { elem_type: 1, shape: { dim: [{ dim_value: 2 }] } } };
  const proto = create<ModelProto>('ModelProto', {
    ir_version: 8,
    opset_import: [{ domain: '', version: 17 }],
    graph: {
      name: 'cyclic',
      node: [node('Abs', ['b'], ['d']), node('Relu', ['b'], ['a']), node('Neg', ['a'], ['b']), node('Identity', ['x'], ['y'])],
      input: [{ name: 'x', type: f32, metadata_props: [] }],
      output: [
        { name: 'y', type: f32, metadata_props: [] },
        { name: 'd', type: f32, metadata_props: [] },
      ],
      initializer: [],
      sparse_initializer: [],
      value_info: [],
      quantization_annotation: [],
      metadata_props: [],
    } as never,
  });
  return encodeModelProto(proto);
}

describe('graphs not in topological order (fixtures/forms-unsorted-tiny)', () => {
  const path = join(FIXTURES_DIR, 'forms-unsorted-tiny', 'unsorted.onnx');

  it('the fixture really is unsorted: some node reads a value a later node computes', () => {
    const nodes = decodeModelProto(readFileSync(path)).graph!.node;
    const producedAt = new Map(nodes.flatMap((n, i) => n.output.map((o) => [o, i] as const)));
    expect(nodes.some((n, i) => n.input.some((v) => (producedAt.get(v) ?? -1) > i))).toBe(true);
  });

  it('loads sorted (stably: a sorted graph keeps its order), keeps every name, and finds the layers', () => {
    const model = loadModel(path);
    const names = decodeModelProto(readFileSync(path))
      .graph!.node.map((n) => n.name)
      .sort();
    expect(model.graph.nodes.map((n) => n.name).sort()).toEqual(names);
    const seen = new Set(model.graph.inputs.concat([...model.graph.initializers.values()]));
    for (const n of model.graph.nodes) {
      for (const v of n.inputs) if (v) expect(seen.has(v) || v.producer === null, `${n.describe()} reads ${v} before it is computed`).toBe(true);
      n.outputs.forEach((o) => seen.add(o));
    }
    const order = model.graph.nodes.map((n) => n.name);
    model.graph.toposort();
    expect(model.graph.nodes.map((n) => n.name)).toEqual(order);
    expect(analyzeDecoder(model).layers).toHaveLength(3);
  });

  it('refuses only a true cycle, naming a node on it, in one line', async () => {
    const file = join(tmp, 'cyclic.onnx');
    writeFileSync(file, cyclicModel());
    expect(() => modelFromBytes(cyclicModel(), file)).toThrow(/: graph 'cyclic' has a cycle through (Relu|Neg) /);
    expectOneLineError(await runCli('inspect', file), 1, /cycle through (Relu|Neg) .*acyclic/);
  });
});

describe('int32 input_ids / attention_mask / position_ids (fixtures/forms-int32-tiny)', () => {
  it('runs like the same model with int64 inputs', async () => {
    const int32 = fixture('forms-int32-tiny');
    expect(
      loadModel(int32)
        .graph.inputs.filter((v) => v.dtype === 6)
        .map((v) => v.name),
    ).toEqual(['input_ids', 'attention_mask', 'position_ids']);
    const [a, b] = [await ModSession.create(int32), await ModSession.create(join(FIXTURES_DIR, 'forms-unsorted-tiny', 'unsorted.onnx'))];
    expect(worstReal(await a.forward(ROWS), await b.forward(ROWS), ROWS, 'left')).toBe(0);
  });
});

describe('GroupQueryAttention takes right padding only (fixtures/forms-gqa-tiny)', () => {
  const gqa = fixture('forms-gqa-tiny');

  it('every runner defaults to right padding: run --json reports it per row', async () => {
    const res = await runCli('run', gqa, '--ids', '1,2,3;4,5', '--json');
    expect(res.code).toBe(0);
    expect(JSON.parse(res.stdout).attentionMask).toEqual([
      [1, 1, 1],
      [1, 1, 0],
    ]);
    const session = await ModSession.create(gqa);
    expect(session.padSide()).toBe('right');
    await session.forward([
      [1, 2, 3],
      [4, 5],
    ]);
    expect(session.attentionMask()).toEqual([
      [1, 1, 1],
      [1, 1, 0],
    ]);
  });

  it('an explicit --pad left is refused with a one-line reason, by every runner and the session', async () => {
    const compiled = join(tmp, 'gqa-random', 'model.onnx');
    expect((await runCli('compile', gqa, '-o', compiled, '-q', '--router-init', 'random')).code).toBe(0);
    const why = /--pad left is not supported for this model: its GroupQueryAttention takes per-row valid lengths \(seqlens_k\)/;
    expectOneLineError(await runCli('run', gqa, '--ids', '1,2,3;4,5', '--pad', 'left'), 2, why);
    expectOneLineError(await runCli('generate', compiled, '--ids', '1,2,3;4,5', '--max-new', '2', '--pad', 'left'), 2, why);
    expectOneLineError(await runCli('verify', gqa, compiled, '--pad', 'left'), 2, why);
    const session = await ModSession.create(gqa);
    await expect(session.forward([[1, 2]], { pad: 'left' })).rejects.toThrow(why);
    expect((await runCli('generate', compiled, '--ids', '1,2,3;4,5', '--max-new', '2', '--pad', 'right')).code).toBe(0);
  });
});

describe('state besides the KV cache: hybrid models (fixtures/forms-hybrid-tiny)', () => {
  const hybrid = fixture('forms-hybrid-tiny');

  it('finds the recurrent layer and its conv/recurrent state; the attention layers have none', () => {
    const s = analyzeDecoder(loadModel(hybrid));
    expect(s.layers.map((l) => l.attention.form)).toEqual(['recurrent', 'unfused', 'unfused']);
    expect(s.layers[0]!.state.map((t) => [t.input.name, t.output.name])).toEqual([
      ['past_key_values.0.conv_state', 'present.0.conv_state'],
      ['past_key_values.0.recurrent_state', 'present.0.recurrent_state'],
    ]);
    expect(s.layers.slice(1).map((l) => l.state)).toEqual([[], []]);
    expect([s.numHeads, s.numKvHeads, s.headSize]).toEqual([4, 2, 8]);
  });

  it('the session feeds zeros at the start and carries present to past: a step equals a prefill of the longer prompt', async () => {
    const session = await ModSession.create(hybrid);
    const prompt = [5, 6, 7, 8, 9];
    const first = await session.forward([prompt]);
    const step = await session.step([10]);
    const full = await session.forward([[...prompt, 10]]);
    const V = full.dims[2];
    const last = full.data.subarray(prompt.length * V, (prompt.length + 1) * V);
    expect(Math.max(...step.data.map((v, i) => Math.abs(v - last[i]!)))).toBeLessThan(1e-4);
    // A new forward starts from zero state again.
    const again = await session.forward([prompt]);
    expect(Math.max(...again.data.map((v, i) => Math.abs(v - first.data[i]!)))).toBe(0);
  });

  it('compile leaves the stateful layer dense (saying why) and routes the others', async () => {
    const out = join(tmp, 'hybrid-json', 'model.onnx');
    const res = await runCli('compile', hybrid, '-o', out, '--router-init', 'random', '--json');
    const report = JSON.parse(res.stdout);
    expect(JSON.stringify(report)).toMatch(/layer 0.*state besides the KV cache/);
    const gen = await runCli('generate', out, '--ids', '1,2,3;4,5', '--max-new', '3', '--json');
    expect(gen.code).toBe(0);
    expect(JSON.parse(gen.stdout).cacheLengths).toHaveLength(2);
  });
});

describe('weight-only quantized models', () => {
  const FORMS = [
    ['nbits', 'MatMulNBits (int4, com.microsoft)'],
    ['qdq', 'DequantizeLinear -> MatMul'],
    ['integer', 'QuantizeLinear -> MatMulInteger'],
  ] as const;

  it.each(FORMS)('%s (%s): the fixture agrees with ONNX Runtime running the dequantized float32 model', async (quant) => {
    const reference = join(tmp, `${quant}-dequantized`, 'model.onnx');
    writeFormModel(buildFormDecoder(FORMS_CONFIG, TINY_SEED, { quant, dequantized: true }), reference);
    const [q, f] = [await ModSession.create(fixture(`forms-${quant}-tiny`)), await ModSession.create(reference)];
    const [lq, lf] = [await q.forward(ROWS), await f.forward(ROWS)];
    expect(worstReal(lq, lf, ROWS, 'left')).toBeLessThan(1e-4);
    for (const id of [3, 4, 5]) {
      const [sq, sf] = [await q.step([id, id, id]), await f.step([id, id, id])];
      expect(Math.max(...sq.data.map((v, i) => Math.abs(v - sf.data[i]!))), `step ${id}`).toBeLessThan(1e-4);
    }
    // The float model of the original (unquantized) weights differs: quantization is real.
    const float = await ModSession.create(fixture('forms-int32-tiny'));
    expect(worstReal(lq, await float.forward(ROWS), ROWS, 'left')).toBeGreaterThan(1e-3);
  });

  it.each(FORMS)('%s: every projection of every layer is found as a weight matmul of the right size', (quant) => {
    const model = loadModel(fixture(`forms-${quant}-tiny`));
    const s = analyzeDecoder(model);
    const facts = new GraphFacts(model.graph);
    const form = { nbits: 'nbits', qdq: 'dequantized', integer: 'integer' }[quant];
    for (const layer of s.layers) {
      const found = weightMatMuls(layer.nodes, facts);
      expect(found.map((w) => [w.form, w.inFeatures, w.outFeatures])).toEqual([
        [form, 32, 32],
        [form, 32, 16],
        [form, 32, 16],
        [form, 32, 32],
        [form, 32, 64],
        [form, 32, 64],
        [form, 64, 32],
      ]);
      for (const w of found)
        expect(layer.sideInputs.find((si) => si.value === w.weight)?.kind ?? 'computed in the layer', `${w.node.describe()}`).toMatch(/weight|computed/);
    }
  });

  it('dynamic activation quantization (DynamicQuantizeLinear) couples the tokens of a call: its layer and the layers before it stay dense, with the reason, and every-token routing reproduces the original', async () => {
    // The integer fixture with layer 1's static QuantizeLinear nodes made dynamic (scale and
    // zero point from the whole activation tensor), as ORT's dynamic quantizer writes them.
    const proto = decodeModelProto(readFileSync(fixture('forms-integer-tiny')));
    let made = 0;
    for (const n of proto.graph!.node) {
      if (n.op_type !== 'QuantizeLinear' || !/layers\.1\//.test(n.name ?? '')) continue;
      n.op_type = 'DynamicQuantizeLinear';
      n.input = [n.input[0]!];
      n.output = [n.output[0]!, `${n.output[0]}_scale`, `${n.output[0]}_zero_point`];
      made++;
    }
    expect(made).toBeGreaterThan(0);
    const path = join(tmp, 'dynamic-quant', 'model.onnx');
    saveModel(modelFromBytes(encodeModelProto(proto), fixture('forms-integer-tiny')), path);
    await ModSession.create(path); // a model ONNX Runtime runs
    const res = await runCli('compile', path, '-o', join(tmp, 'dynamic-quant', 'mod.onnx'), '--router-init', 'random', '--json');
    expect(res.code).toBe(0);
    const routing = JSON.parse(res.stdout).routing;
    // Routing layer 0 would leave the tokens it skips (padding included) unchanged, and layer 1's
    // scale is taken over them all: layers 0 and 1 stay dense.
    const why = /^layer 1 couples tokens: DynamicQuantizeLinear '.*' quantizes its input with one scale taken over all tokens of the call/;
    expect(routing.notConverted).toEqual([
      { layer: 0, reason: expect.stringMatching(why) },
      { layer: 1, reason: expect.stringMatching(why) },
    ]);
    expect(routing.converted.map((l: { layer: number }) => l.layer)).toEqual([2]);
    const allPass = join(tmp, 'dynamic-quant', 'all-pass.onnx');
    expect((await runCli('compile', path, '-o', allPass, '--router-init', 'all-pass', '--ungated', '-q')).code).toBe(0);
    for (const pad of ['left', 'right'] as const) {
      const [a, b] = await Promise.all([ModSession.create(path), ModSession.create(allPass)]);
      expect(worstReal(await a.forward(ROWS, { pad }), await b.forward(ROWS, { pad }), ROWS, pad), pad).toBeLessThan(1e-4);
    }
    const mlp = JSON.parse(
      (await runCli('compile', path, '-o', join(tmp, 'dynamic-quant', 'mlp.onnx'), '--router-init', 'random', '--granularity', 'mlp', '--json')).stdout,
    ).routing;
    expect(JSON.stringify(mlp.notConverted)).toMatch(/"layer":1.*DynamicQuantizeLinear/);
  });
});

describe('decoders fed by inputs_embeds (fixtures/forms-embeds-tiny: decoder, embedding.onnx, genai_config.json)', () => {
  const embeds = fixture('forms-embeds-tiny');
  const same = join(FIXTURES_DIR, 'forms-unsorted-tiny', 'unsorted.onnx'); // the same weights, fed input_ids

  /** Rows of the token table for `ids`: [1, S, H] float32. */
  function tableRows(ids: number[]): Float32Array {
    const table = loadModel(join(FIXTURES_DIR, 'forms-embeds-tiny', 'embedding.onnx'))
      .graph.initializers.get('model.embed_tokens.weight')!
      .initializer!.toArray() as Float32Array;
    const H = FORMS_CONFIG.hiddenSize;
    const out = new Float32Array(ids.length * H);
    ids.forEach((id, i) => out.set(table.subarray(id * H, (id + 1) * H), i * H));
    return out;
  }

  function npy(data: Float32Array, shape: number[]): Buffer {
    let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(', ')}), }`;
    header += ' '.repeat(63 - ((header.length + 10) % 64)) + '\n';
    const head = Buffer.alloc(10);
    head.write('\x93NUMPY', 0, 'latin1');
    head[6] = 1;
    head.writeUInt16LE(header.length, 8);
    return Buffer.concat([head, Buffer.from(header, 'latin1'), Buffer.from(data.buffer, data.byteOffset, data.byteLength)]);
  }

  function safetensors(data: Float32Array, shape: number[]): Buffer {
    const header = Buffer.from(JSON.stringify({ inputs_embeds: { dtype: 'F32', shape, data_offsets: [0, data.byteLength] } }));
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(header.length));
    return Buffer.concat([len, header, Buffer.from(data.buffer, data.byteOffset, data.byteLength)]);
  }

  it('the residual stream starts at the input', () => {
    const s = analyzeDecoder(loadModel(embeds));
    expect(s.embedding.output.name).toBe('inputs_embeds');
    expect(s.layers.map((l) => l.nodes.length)).toEqual([60, 60, 60]);
    expect(s.layers[0]!.residualIn.name).toBe('inputs_embeds');
  });

  it('run uses the embedding model genai_config.json names: the same logits as the decoder fed input_ids', async () => {
    const [a, b] = [await runCli('run', embeds, '--ids', '5,6,7;8,9', '--json'), await runCli('run', same, '--ids', '5,6,7;8,9', '--json')];
    expect(a.stderr).toBe('');
    const [ja, jb] = [JSON.parse(a.stdout), JSON.parse(b.stdout)];
    expect(ja.attentionMask).toEqual([
      [1, 1, 1],
      [0, 1, 1],
    ]);
    expect(ja.attentionMask).toEqual(jb.attentionMask);
    expect(Math.max(...ja.logits.flat(2).map((v: number, i: number) => Math.abs(v - jb.logits.flat(2)[i])))).toBeLessThan(1e-5);
  });

  it('--embeds FILE (.npy or safetensors) is the prompt; generate embeds the new tokens through the embedding model', async () => {
    const ids = [5, 6, 7, 8];
    const want = JSON.parse((await runCli('generate', same, '--ids', ids.join(','), '--max-new', '3', '--logits', '--json')).stdout);
    for (const [ext, bytes] of [
      ['npy', npy(tableRows(ids), [1, 4, 32])],
      ['safetensors', safetensors(tableRows(ids), [4, 32])],
    ] as const) {
      const file = join(tmp, `prompt.${ext}`);
      writeFileSync(file, bytes);
      const run = JSON.parse((await runCli('run', embeds, '--embeds', file, '--json')).stdout);
      expect(run.attentionMask).toEqual([[1, 1, 1, 1]]);
      expect(run.inputIds).toBeNull();
      const gen = await runCli('generate', embeds, '--embeds', file, '--max-new', '3', '--logits', '--json');
      const got = JSON.parse(gen.stdout);
      expect(got.ids).toEqual([want.ids[0].slice(4)]);
      got.steps.forEach((s: { logits: number[][] }, t: number) =>
        expect(Math.max(...s.logits[0]!.map((v, i) => Math.abs(v - want.steps[t].logits[0][i]))), `step ${t}`).toBeLessThan(1e-4),
      );
    }
    expectOneLineError(await runCli('run', embeds, '--embeds', join(tmp, 'nothing.npy')), 1, /cannot read --embeds file .*no such file/);
  });
});

describe('modc eval on the forms', () => {
  it('feeds state and embeddings: the inputs_embeds decoder scores as the same weights fed input_ids; the hybrid model scores as its logits say, row by row', async () => {
    const data = join(tmp, 'eval.jsonl');
    writeFileSync(data, '{"ids": [5, 6, 7, 8, 9, 10]}\n{"ids": [11, 12, 13]}\n');
    const nll = async (path: string) => {
      const res = await runCli('eval', path, '--data', data, '--json');
      expect(res.code, res.stderr).toBe(0);
      return JSON.parse(res.stdout).nll as number;
    };
    expect(Math.abs((await nll(fixture('forms-embeds-tiny'))) - (await nll(join(FIXTURES_DIR, 'forms-unsorted-tiny', 'unsorted.onnx'))))).toBeLessThan(1e-6);
    // The hybrid model (state besides the KV cache) scores as its own logits say, row by row.
    const hybrid = fixture('forms-hybrid-tiny');
    expect(
      Math.abs(
        (await nll(hybrid)) -
          (await rowByRowNll(hybrid, [
            [5, 6, 7, 8, 9, 10],
            [11, 12, 13],
          ])),
      ),
    ).toBeLessThan(1e-5);
  });
});

// Sliding-window attention and attention sinks: test/forms-window.test.ts.

describe('standard ONNX opset-23/24 forms', () => {
  it('RMSNormalization (fixtures/forms-rmsnorm-tiny, opset 23) is a norm like any other: layers found', () => {
    const s = analyzeDecoder(loadModel(fixture('forms-rmsnorm-tiny')));
    expect(s.layers).toHaveLength(3);
    expect(s.layers[0]!.steps[0]!.norm?.node.opType).toBe('RMSNormalization');
  });
  // The opset-23/24 attention forms (Attention, RotaryEmbedding, TensorScatter): test/forms-static.test.ts.
});

describe('checked-in form fixtures', () => {
  it('are byte for byte what build-fixtures.ts writes, and small (< 1 MB each)', () => {
    const root = join(tmp, 'rebuilt');
    buildFixtures(root);
    for (const { dir } of FORM_FIXTURES) {
      const files = readdirSync(join(root, dir)).sort();
      expect(readdirSync(join(FIXTURES_DIR, dir)).sort(), dir).toEqual(files);
      for (const f of files) {
        expect(
          readFileSync(join(root, dir, f)).equals(readFileSync(join(FIXTURES_DIR, dir, f))),
          `${dir}/${f} differs: run npx tsx fixtures/build-fixtures.ts`,
        ).toBe(true);
        expect(statSync(join(FIXTURES_DIR, dir, f)).size).toBeLessThan(1 << 20);
      }
    }
  });
});
