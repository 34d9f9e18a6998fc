import { readFileSync, writeFileSync, mkdirSync, symlinkSync, rmSync, existsSync, statSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadModel } from '../compiler/core/io/load.js';
import { saveModel } from '../compiler/core/io/save.js';
import { DataType } from '../compiler/core/ir/dtype.js';
import { Graph, Value, attribute } from '../compiler/core/ir/graph.js';
import { Model } from '../compiler/core/ir/model.js';
import { externalReads, Tensor } from '../compiler/core/ir/tensor.js';
import { decodeModelProto, encodeMessage, encodeModelProto, fromPlainObject, toPlainObject } from '../compiler/core/proto/index.js';
import { summarizeModel } from '../compiler/core/ir/model-summary.js';
import { createSession } from '../compiler/runtime/ort.js';
import { allModels, prefillFeeds, runCli, tempDir } from './helpers.js';

const tmp = tempDir('modc-io');

function plain(path: string) {
  return toPlainObject('ModelProto', decodeModelProto(readFileSync(path)));
}

function floatType(dims: (number | string)[]) {
  return { tensor_type: { elem_type: DataType.FLOAT, shape: { dim: dims.map((d) => (typeof d === 'number' ? { dim_value: d } : { dim_param: d })) } } };
}

/** y = x * W + b with W and b initializers: the smallest model with weights. */
function tinyLinear(): Model {
  const g = new Graph('tiny');
  const x = g.addInput(new Value('x', floatType(['batch', 4])));
  const w = g.addInitializer(
    new Value('W'),
    Tensor.fromArray(
      'W',
      [4, 4],
      Float32Array.from({ length: 16 }, (_, i) => i / 16),
    ),
  );
  const b = g.addInitializer(new Value('b'), Tensor.fromArray('b', [4], Float32Array.from([1, 2, 3, 4])));
  const mm = g.addNode('MatMul', [x, w]);
  const y = g.addNode('Add', [mm.output(0), b], [new Value('y', floatType(['batch', 4]))]);
  g.outputs = [y.output(0)];
  const m = new Model(g, 8);
  m.opsetImports = [{ domain: '', version: 17 }];
  return m;
}

describe('round trip: load then save loses nothing', () => {
  for (const { name, path } of allModels()) {
    it(`${name}: same protobuf content and bit-identical ORT outputs`, async () => {
      const out = join(tmp, name.replace('/', '_'), 'model.onnx');
      const res = await runCli('compile', path, '-o', out, '--passes', 'none', '-q');
      expect(res.stderr).toBe('');
      expect(res.code).toBe(0);
      expect(plain(out)).toEqual(plain(path));
      // Byte equality also catches fields our schema might not know (they would vanish from both
      // plain views above): every model here was written by protobuf's C++ serializer, whose
      // field order protobufjs reproduces.
      expect(readFileSync(out).equals(readFileSync(path))).toBe(true);

      const model = loadModel(path);
      const feeds = prefillFeeds(model, 2, 5);
      const [a, b] = await Promise.all([createSession(path), createSession(out)]);
      const [ra, rb] = [await a.run(feeds), await b.run(feeds)];
      for (const k of a.outputNames) {
        expect(rb[k]!.dims).toEqual(ra[k]!.dims);
        expect(Buffer.from((rb[k]!.data as Float32Array).buffer).equals(Buffer.from((ra[k]!.data as Float32Array).buffer))).toBe(true);
      }
    });
  }
});

/** Finds length-delimited field `path` (field numbers) in raw protobuf bytes, independent of any schema. */
function wireFields(bytes: Uint8Array, field: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  let i = 0;
  const varint = () => {
    let v = 0;
    let shift = 0;
    for (;;) {
      const b = bytes[i++]!;
      v += (b & 0x7f) * 2 ** shift;
      shift += 7;
      if (!(b & 0x80)) return v;
    }
  };
  while (i < bytes.length) {
    const key = varint();
    const [num, wt] = [Math.floor(key / 8), key & 7];
    if (wt === 0) varint();
    else if (wt === 1) i += 8;
    else if (wt === 5) i += 4;
    else if (wt === 2) {
      const len = varint();
      if (num === field) out.push(bytes.subarray(i, i + len));
      i += len;
    } else throw new Error(`bad wire type ${wt}`);
  }
  return out;
}

describe('IR 10 and 11 fields survive', () => {
  it('keeps node overload and metadata, local functions, float8/int4 tensors, value_info metadata, configuration', () => {
    const m = tinyLinear();
    m.irVersion = 10;
    const g = m.graph;
    const add = g.nodes[1]!;
    add.overload = 'v2';
    add.metadataProps = [{ key: 'origin', value: 'test' }];
    g.metadataProps = [{ key: 'graph-meta', value: '1' }];
    g.outputs[0]!.metadataProps = [{ key: 'out-meta', value: 'y' }];
    const f8 = g.addInitializer(new Value('f8'), Tensor.fromBytes('f8', DataType.FLOAT8E4M3FN, [4], Uint8Array.from([1, 2, 3, 4])));
    const i4 = g.addInitializer(new Value('i4'), Tensor.fromBytes('i4', DataType.INT4, [4], Uint8Array.from([0x21, 0x43])));
    expect(f8.initializer!.byteLength).toBe(4);
    expect(i4.initializer!.byteLength).toBe(2);
    m.configuration = [{ name: 'mesh', num_devices: 2, device: ['cuda:0', 'cuda:1'] }];
    const fnSrc = join(tmp, 'ir10-src.onnx');
    saveModel(m, fnSrc);

    // Add a model-local function with IR 10 fields by editing the proto through the IR.
    const loaded = loadModel(fnSrc);
    const again = join(tmp, 'ir10-again.onnx');
    saveModel(loaded, again);
    const bytes = readFileSync(again);
    expect(plain(again)).toEqual(plain(fnSrc));

    // Schema-independent checks on the raw bytes: ModelProto.graph = 7, GraphProto.node = 1,
    // NodeProto.overload = 8, NodeProto.metadata_props = 9, GraphProto.metadata_props = 16,
    // ModelProto.configuration = 26, TensorProto.data_type = 2 (varint, checked via decoded value).
    const graph = wireFields(bytes, 7)[0]!;
    const nodes = wireFields(graph, 1);
    expect(Buffer.from(wireFields(nodes[1]!, 8)[0]!).toString()).toBe('v2');
    expect(Buffer.from(wireFields(wireFields(nodes[1]!, 9)[0]!, 1)[0]!).toString()).toBe('origin');
    expect(wireFields(graph, 16)).toHaveLength(1);
    expect(Buffer.from(wireFields(wireFields(bytes, 26)[0]!, 1)[0]!).toString()).toBe('mesh');
    const reloaded = loadModel(again);
    expect(reloaded.graph.initializers.get('f8')!.initializer!.dataType).toBe(DataType.FLOAT8E4M3FN);
    expect(reloaded.graph.initializers.get('i4')!.initializer!.dataType).toBe(DataType.INT4);
    expect(reloaded.graph.outputs[0]!.metadataProps).toEqual([{ key: 'out-meta', value: 'y' }]);
  });

  it('keeps model-local functions with attribute_proto, value_info and overload, and If subgraphs', () => {
    const m = tinyLinear();
    m.irVersion = 10;
    const raw = join(tmp, 'fn-base.onnx');
    saveModel(m, raw);
    // Build the function and subgraph at the proto level so the test does not rely on the IR to create them.
    const proto = decodeModelProto(readFileSync(raw));
    // eslint-disable-next-line @typescript-eslint/no-explicit-any -- a ModelProto as plain JSON, edited field by field
    const obj = toPlainObject('ModelProto', proto) as Record<string, any>;
    obj.functions = [
      {
        name: 'Twice',
        domain: 'test.fn',
        overload: 'o1',
        input: ['a'],
        output: ['b'],
        attribute: ['unused'],
        attribute_proto: [{ name: 'alpha', type: 1, f: 0.5 }],
        node: [{ input: ['a', 'a'], output: ['b'], op_type: 'Add', domain: '' }],
        opset_import: [{ domain: '', version: 17 }],
        value_info: [{ name: 'b', type: floatType([4]), metadata_props: [{ key: 'k', value: 'v' }] }],
        metadata_props: [{ key: 'fn', value: 'meta' }],
      },
    ];
    obj.graph.node.push({
      input: ['y'],
      output: ['z'],
      op_type: 'If',
      attribute: [],
    });
    obj.graph.node[2].input = ['cond'];
    obj.graph.input.push({ name: 'cond', type: { tensor_type: { elem_type: DataType.BOOL, shape: { dim: [] } } } });
    obj.graph.node[2].attribute = ['then_branch', 'else_branch'].map((n, i) => ({
      name: n,
      type: 5,
      g: {
        name: n,
        node: [{ input: ['y'], output: [`${n}_out`], op_type: i ? 'Neg' : 'Identity' }],
        output: [{ name: `${n}_out`, type: floatType(['batch', 4]) }],
      },
    }));
    obj.graph.output.push({ name: 'z', type: floatType(['batch', 4]) });
    const src = join(tmp, 'fn-src.onnx');
    writeFileSync(src, encodeMessage('ModelProto', fromPlainObject('ModelProto', obj)));
    const model = loadModel(src);
    expect(model.functions[0]!.key).toBe('test.fn::Twice::o1');
    const ifNode = model.graph.nodes.find((n) => n.opType === 'If')!;
    expect(ifNode.subgraphs()).toHaveLength(2);
    // The subgraphs read %y from the outer scope through the same Value object.
    expect(ifNode.subgraphs()[0]!.nodes[0]!.input(0)).toBe(model.graph.findValue('y'));
    const out = join(tmp, 'fn-out.onnx');
    saveModel(model, out);
    expect(plain(out)).toEqual(plain(src));
  });
});

describe('external data', () => {
  function externalModel(dir: string): string {
    mkdirSync(dir, { recursive: true });
    const path = join(dir, 'model.onnx');
    saveModel(tinyLinear(), path, { externalizeThreshold: 16 });
    return path;
  }

  it('is read lazily: loading and inspecting reads no weight bytes', () => {
    const path = externalModel(join(tmp, 'lazy'));
    const before = { ...externalReads };
    const model = loadModel(path);
    const s = summarizeModel(model);
    expect(s.parameters.externalBytes).toBe(16 * 4 + 4 * 4);
    expect(externalReads).toEqual(before);
    // Reading on demand works, and is counted.
    expect(model.graph.initializers.get('b')!.initializer!.toNumbers()).toEqual([1, 2, 3, 4]);
    expect(externalReads.count).toBe(before.count + 1);
  });

  it('saving again into a folder that already links the weights leaves no temporary file behind', () => {
    const path = externalModel(join(tmp, 'relink'));
    const model = loadModel(path);
    const out = join(tmp, 'relinked', 'model.onnx');
    saveModel(model, out);
    saveModel(model, out);
    expect(readdirSync(join(tmp, 'relinked')).sort()).toEqual(['model.onnx', 'model.onnx.data']);
  });

  it('keeps the reference when saving into the same folder, links or copies into another', async () => {
    const path = externalModel(join(tmp, 'ref'));
    const model = loadModel(path);
    const same = saveModel(model, join(tmp, 'ref', 'copy.onnx'));
    expect(same.externalFiles).toEqual([{ location: 'model.onnx.data', how: 'referenced' }]);
    const other = saveModel(model, join(tmp, 'elsewhere', 'model.onnx'));
    expect(['linked', 'copied']).toContain(other.externalFiles[0]!.how);
    expect(existsSync(join(tmp, 'elsewhere', 'model.onnx.data'))).toBe(true);
    rmSync(join(tmp, 'ref'), { recursive: true });
    // The other folder is self-contained: it runs with the original folder gone.
    const s = await createSession(join(tmp, 'elsewhere', 'model.onnx'));
    const { float32Tensor } = await import('../compiler/runtime/ort.js');
    const r = await s.run({ x: float32Tensor([1, 0, 0, 0], [1, 4]) });
    expect(Array.from(r.y!.data as Float32Array)).toEqual([1, 2 + 1 / 16, 3 + 2 / 16, 4 + 3 / 16]);
  });

  it('refuses locations that escape the model folder', () => {
    const dir = join(tmp, 'escape');
    const path = externalModel(dir);
    const proto = decodeModelProto(readFileSync(path));
    const withLocation = (location: string, to: string) => {
      for (const t of proto.graph!.initializer) for (const e of t.external_data) if (e.key === 'location') e.value = location;
      writeFileSync(to, encodeModelProto(proto));
    };
    withLocation('../outside.bin', join(dir, 'dotdot.onnx'));
    expect(() => loadModel(join(dir, 'dotdot.onnx'))).toThrow(/'\.\.\/outside\.bin' escapes the model folder/);
    withLocation('/etc/passwd', join(dir, 'abs.onnx'));
    expect(() => loadModel(join(dir, 'abs.onnx'))).toThrow(/absolute path/);
    writeFileSync(join(tmp, 'secret.bin'), new Uint8Array(4096));
    symlinkSync(join(tmp, 'secret.bin'), join(dir, 'link.bin'));
    withLocation('link.bin', join(dir, 'link.onnx'));
    expect(() => loadModel(join(dir, 'link.onnx'))).toThrow(/resolves outside the model folder/);
    withLocation('nope.bin', join(dir, 'missing.onnx'));
    expect(() => loadModel(join(dir, 'missing.onnx'))).toThrow(/missing external data: 'nope\.bin'/);
  });
});

describe('save', () => {
  it('refuses to overwrite the input and leaves no temp files behind', async () => {
    const dir = join(tmp, 'atomic');
    mkdirSync(dir, { recursive: true });
    const path = join(dir, 'm.onnx');
    saveModel(tinyLinear(), path);
    const before = readFileSync(path);
    const model = loadModel(path);
    expect(() => saveModel(model, path)).toThrow(/refusing to overwrite the input model/);
    expect(() => saveModel(model, join(dir, '.', 'm.onnx'))).toThrow(/refusing to overwrite/);
    expect(readFileSync(path).equals(before)).toBe(true);
    expect(readdirSync(dir)).toEqual(['m.onnx']);
    expect(statSync(path).size).toBe(before.length);
  });

  it('spills new tensors to a sidecar above the threshold', () => {
    const path = join(tmp, 'spill', 'm.onnx');
    const res = saveModel(tinyLinear(), path, { externalizeThreshold: 32 });
    expect(res.externalFiles).toEqual([{ location: 'm.onnx.data', how: 'written' }]);
    const model = loadModel(path);
    expect(model.graph.initializers.get('W')!.initializer!.isExternal).toBe(true);
    expect(model.graph.initializers.get('b')!.initializer!.isExternal).toBe(false);
  });
});

describe('attribute builder', () => {
  it('types numbers, lists and strings', () => {
    expect(attribute('a', 3).type).toBe(2);
    expect(attribute('a', 0.5).type).toBe(1);
    expect(attribute('a', 3, 'float').type).toBe(1);
    expect(attribute('a', [1, 2]).type).toBe(7);
    expect(attribute('a', 'x').type).toBe(3);
  });
});
