/**
 * Seeded mutators for the fuzzer: each takes a decoded ModelProto (and the model's sidecar files)
 * and breaks one thing at the protobuf level: an attribute, a tensor, a name, an opset import,
 * metadata, an external-data location, the graph's structure, or the raw bytes. The IR-level
 * edits (applied after loading) are in `irEdits`.
 *
 * Everything is driven by one `Rng`, so (fixture, seed, case index) reproduces a case exactly.
 */
import type { AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto } from '../../compiler/core/proto/index.js';
import { AttributeType, create, decodeModelProto, encodeModelProto } from '../../compiler/core/proto/index.js';
import type { Model } from '../../compiler/core/ir/model.js';
import { Value } from '../../compiler/core/ir/graph.js';

/** mulberry32: small, fast, good enough for choosing mutations. */
export class Rng {
  private state: number;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  next(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T | undefined {
    return items.length ? items[this.int(items.length)] : undefined;
  }
}

/** Mixes a run seed and a case index into a case seed. */
export function caseSeed(seed: number, index: number): number {
  let h = (seed ^ 0x9e3779b9) >>> 0;
  h = Math.imul(h ^ (index + 0x85ebca6b), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

/** The mutated model: protobuf bytes plus the sidecar files to write beside it (relative paths). */
export interface Mutant {
  bytes: Uint8Array;
  files: Map<string, Uint8Array>;
  /** What was done, one entry per mutation. */
  log: string[];
}

interface Ctx {
  rng: Rng;
  model: ModelProto;
  files: Map<string, Uint8Array>;
  log: string[];
}

// ---------------------------------------------------------------------------------------------
// walking the proto

function graphsOf(g: GraphProto, out: GraphProto[] = []): GraphProto[] {
  out.push(g);
  for (const n of g.node) {
    for (const a of n.attribute) {
      if (a.g) graphsOf(a.g, out);
      for (const sg of a.graphs) graphsOf(sg, out);
    }
  }
  return out;
}

function allGraphs(m: ModelProto): GraphProto[] {
  return m.graph ? graphsOf(m.graph) : [];
}

function allNodes(m: ModelProto): NodeProto[] {
  const out: NodeProto[] = [];
  for (const g of allGraphs(m)) out.push(...g.node);
  for (const f of m.functions) out.push(...f.node);
  return out;
}

function allInitializers(m: ModelProto): TensorProto[] {
  const out: TensorProto[] = [];
  for (const g of allGraphs(m)) out.push(...g.initializer);
  for (const n of allNodes(m))
    for (const a of n.attribute) {
      if (a.t) out.push(a.t);
      out.push(...a.tensors);
    }
  return out;
}

function valueNames(m: ModelProto): string[] {
  const names = new Set<string>();
  for (const g of allGraphs(m)) {
    for (const v of [...g.input, ...g.output, ...g.value_info]) if (v.name) names.add(v.name);
    for (const t of g.initializer) if (t.name) names.add(t.name);
    for (const n of g.node) for (const o of [...n.input, ...n.output]) if (o) names.add(o);
  }
  return [...names];
}

/** Renames a value everywhere it is mentioned (definitions and uses, all graphs). */
function renameEverywhere(m: ModelProto, from: string, to: string): void {
  for (const g of allGraphs(m)) {
    for (const v of [...g.input, ...g.output, ...g.value_info]) if (v.name === from) v.name = to;
    for (const t of g.initializer) if (t.name === from) t.name = to;
    for (const n of g.node) {
      n.input = n.input.map((x) => (x === from ? to : x));
      n.output = n.output.map((x) => (x === from ? to : x));
    }
  }
}

const NASTY_NAMES = [
  'a\nb',
  'x\0y',
  '',
  ' ',
  'name with spaces',
  '\u001b[31mred',
  'tab\there',
  'é✓',
  'line\r\nbreak',
  '../../etc',
  '%',
  "quo'te",
  'x'.repeat(300),
];

function nastyName(rng: Rng, base: string): string {
  const n = rng.pick(NASTY_NAMES)!;
  return rng.chance(0.5) ? base + n : n;
}

// ---------------------------------------------------------------------------------------------
// mutators

type Mutator = (c: Ctx) => boolean;

const HUGE = [2 ** 31 - 1, 2 ** 31, 2 ** 32 + 1, -1, 0, 2 ** 53, 65537];

const attributes: Mutator = ({ rng, model, log }) => {
  const nodes = allNodes(model).filter((n) => n.attribute.length);
  const n = rng.pick(nodes);
  if (!n) return false;
  const a = rng.pick(n.attribute)!;
  const what = rng.int(10);
  const where = `${n.op_type}.${a.name}`;
  switch (what) {
    case 0: // GRAPH with no graph
      a.type = AttributeType.GRAPH;
      delete (a as Partial<AttributeProto>).g;
      log.push(`attr ${where}: type GRAPH, no graph`);
      break;
    case 1:
      a.type = rng.int(16);
      log.push(`attr ${where}: type ${a.type}`);
      break;
    case 2:
      a.i = rng.pick(HUGE)!;
      log.push(`attr ${where}: i=${a.i}`);
      break;
    case 3:
      a.ints = rng.chance(0.5) ? [] : [rng.pick(HUGE)!, rng.int(5) - 2];
      log.push(`attr ${where}: ints=[${a.ints.join(',')}]`);
      break;
    case 4:
      n.attribute.splice(n.attribute.indexOf(a), 1);
      log.push(`attr ${where}: removed`);
      break;
    case 5:
      a.name = nastyName(rng, a.name ?? '');
      log.push(`attr ${where}: renamed`);
      break;
    case 6:
      a.f = rng.pick([NaN, Infinity, -1, 1e30, 0])!;
      log.push(`attr ${where}: f=${a.f}`);
      break;
    case 7:
      a.s = new TextEncoder().encode(rng.pick(['', 'bogus', 'a\nb', '{'])!);
      log.push(`attr ${where}: s set`);
      break;
    case 8: // a graph attribute whose graph loses its outputs or nodes
      if (a.g) {
        if (rng.chance(0.5)) a.g.output = [];
        else a.g.node = a.g.node.slice(0, rng.int(a.g.node.length + 1));
        log.push(`attr ${where}: subgraph cut`);
      } else {
        n.attribute.push({ ...a, name: a.name } as AttributeProto);
        log.push(`attr ${where}: duplicated`);
      }
      break;
    default:
      a.t = create<TensorProto>('TensorProto', { data_type: rng.int(20), dims: [rng.int(4)], raw_data: new Uint8Array(rng.int(9)) });
      a.type = AttributeType.TENSOR;
      log.push(`attr ${where}: tensor`);
  }
  return true;
};

const tensors: Mutator = ({ rng, model, log }) => {
  const t = rng.pick(allInitializers(model));
  if (!t) return false;
  const what = rng.int(8);
  const where = `tensor ${JSON.stringify(t.name ?? '')}`;
  switch (what) {
    case 0: {
      const i = rng.int(t.dims.length + 1);
      const v = rng.pick(HUGE)!;
      if (i < t.dims.length) t.dims[i] = v;
      else t.dims.push(v);
      log.push(`${where}: dims[${i}]=${v}`);
      break;
    }
    case 1:
      t.dims = t.dims.slice(0, Math.max(0, t.dims.length - 1));
      log.push(`${where}: dropped a dim`);
      break;
    case 2:
      t.data_type = rng.pick([0, 1, 7, 10, 16, 8, 13, 2, 23, 99])!;
      log.push(`${where}: data_type=${t.data_type}`);
      break;
    case 3:
      if (t.raw_data?.length) {
        t.raw_data = t.raw_data.slice(0, rng.int(t.raw_data.length));
        log.push(`${where}: raw_data truncated`);
      } else {
        t.float_data = [];
        t.int64_data = [];
        t.int32_data = [];
        log.push(`${where}: typed data cleared`);
      }
      break;
    case 4:
      delete (t as Partial<TensorProto>).raw_data;
      log.push(`${where}: raw_data removed`);
      break;
    case 5:
      t.data_location = 1;
      t.external_data = rng.chance(0.5) ? [] : [create('StringStringEntryProto', { key: 'location', value: 'missing.bin' })];
      log.push(`${where}: marked external`);
      break;
    case 6:
      t.float_data = [1, 2, 3];
      log.push(`${where}: float_data added`);
      break;
    default:
      t.dims = [rng.int(3), rng.int(3), rng.int(3)];
      log.push(`${where}: dims=[${t.dims.join(',')}]`);
  }
  return true;
};

const names: Mutator = ({ rng, model, log }) => {
  const g = model.graph;
  if (!g) return false;
  const what = rng.int(8);
  switch (what) {
    case 0: {
      // a value name with control characters
      const name = rng.pick(valueNames(model));
      if (name === undefined) return false;
      renameEverywhere(model, name, nastyName(rng, name));
      log.push(`renamed value ${JSON.stringify(name)} (nasty)`);
      return true;
    }
    case 1: {
      // a node name
      const n = rng.pick(allNodes(model));
      if (!n) return false;
      n.name = nastyName(rng, n.name ?? '');
      log.push(`renamed node ${JSON.stringify(n.op_type)} (nasty)`);
      return true;
    }
    case 2: {
      // a graph output renamed to an input's name
      const out = rng.pick(g.output);
      const inp = rng.pick(g.input);
      if (!out || !inp) return false;
      const old = out.name ?? '';
      renameEverywhere(model, old, inp.name ?? '');
      log.push(`output ${JSON.stringify(old)} renamed to input ${JSON.stringify(inp.name)}`);
      return true;
    }
    case 3: {
      // two node outputs share a name
      const nodes = g.node.filter((n) => n.output.length);
      const a = rng.pick(nodes);
      const b = rng.pick(nodes);
      if (!a || !b || a === b) return false;
      a.output[0] = b.output[0]!;
      log.push(`node output ${JSON.stringify(b.output[0])} defined twice`);
      return true;
    }
    case 4: {
      // a use renamed to nothing defined
      const n = rng.pick(g.node.filter((x) => x.input.length));
      if (!n) return false;
      const i = rng.int(n.input.length);
      n.input[i] = rng.chance(0.5) ? 'undefined_value' : '';
      log.push(`${n.op_type} input ${i} -> ${JSON.stringify(n.input[i])}`);
      return true;
    }
    case 5: {
      // an initializer renamed to an input's or a node output's name
      const t = rng.pick(g.initializer);
      const other = rng.pick(valueNames(model));
      if (!t || other === undefined) return false;
      t.name = other;
      log.push(`initializer renamed to ${JSON.stringify(other)}`);
      return true;
    }
    case 6: {
      // graph name / input name nasty
      const v = rng.pick([...g.input, ...g.output]);
      if (!v) return false;
      const old = v.name ?? '';
      renameEverywhere(model, old, nastyName(rng, old));
      log.push(`graph I/O ${JSON.stringify(old)} renamed (nasty)`);
      return true;
    }
    default:
      g.name = nastyName(rng, g.name ?? '');
      log.push('graph renamed (nasty)');
      return true;
  }
};

const opsets: Mutator = ({ rng, model, log }) => {
  const what = rng.int(7);
  const dflt = model.opset_import.find((o) => (o.domain ?? '') === '' || o.domain === 'ai.onnx');
  switch (what) {
    case 0:
      model.opset_import = model.opset_import.filter((o) => o !== dflt);
      log.push('default opset import removed');
      break;
    case 1:
      if (!dflt) return false;
      dflt.domain = rng.pick(['ai.onnx', 'ai.onnx.ml', 'onnx', 'bogus'])!;
      log.push(`default opset import renamed to ${dflt.domain}`);
      break;
    case 2:
      if (!dflt) return false;
      dflt.version = rng.pick([1, 6, 9, 11, 12, 13, 17, 18, 21, 23, 24, 25, 99, 0, -1])!;
      log.push(`default opset version ${String(dflt.version)}`);
      break;
    case 3:
      model.ir_version = rng.pick([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 99, 0, -1])!;
      log.push(`ir_version ${String(model.ir_version)}`);
      break;
    case 4:
      model.opset_import.push(create('OperatorSetIdProto', { domain: rng.pick(['', 'modc', 'com.microsoft', 'ai.onnx'])!, version: rng.int(30) }));
      log.push('extra opset import');
      break;
    case 5: {
      // a node's domain respelled
      const n = rng.pick(allNodes(model));
      if (!n) return false;
      n.domain = rng.pick(['ai.onnx', 'com.microsoft', 'modc', 'bogus', ''])!;
      log.push(`node ${n.op_type} domain ${JSON.stringify(n.domain)}`);
      break;
    }
    default:
      model.ir_version = rng.pick([3, 4])!;
      if (rng.chance(0.5)) {
        // IR 3 wants initializers listed as inputs.
        const g = model.graph;
        if (g)
          for (const t of g.initializer)
            if (!g.input.some((v) => v.name === t.name))
              g.input.push(
                create<ValueInfoProto>('ValueInfoProto', {
                  name: t.name,
                  type: { tensor_type: { elem_type: t.data_type, shape: { dim: t.dims.map((d) => ({ dim_value: d })) } } },
                }),
              );
      }
      log.push(`ir_version ${String(model.ir_version)} (old)`);
  }
  return true;
};

const ROUTING_VALUES = [
  '{',
  'not json',
  'null',
  '[]',
  '42',
  '"s"',
  '{"mode":"threshold"}',
  '{"mode":"topk","gated":true,"layers":null}',
  '{"mode":"x","gated":1,"layers":[{"layer":"a"}]}',
  '{"mode":"threshold","gated":false,"layers":[{"layer":0,"threshold":0.5,"capacity":1}],"skipped":[{"layer":"z","reason":null}]}',
  '{"mode":"threshold","gated":false,"layers":[{"layer":1e9,"threshold":0.5,"capacity":1}]}',
  '\u0000',
  '{"a":\n1}',
];

const metadata: Mutator = ({ rng, model, log }) => {
  const what = rng.int(4);
  if (what <= 1) {
    const value = rng.pick(ROUTING_VALUES)!;
    model.metadata_props = [...model.metadata_props.filter((p) => p.key !== 'modc.routing'), create('StringStringEntryProto', { key: 'modc.routing', value })];
    log.push(`modc.routing = ${JSON.stringify(value)}`);
  } else if (what === 2) {
    model.producer_name = nastyName(rng, 'producer');
    model.doc_string = 'doc\nstring';
    log.push('producer/doc nasty');
  } else {
    model.metadata_props.push(create('StringStringEntryProto', { key: nastyName(rng, 'k'), value: nastyName(rng, 'v') }));
    log.push('metadata entry nasty');
  }
  return true;
};

const EXTERNAL_LOCATIONS = [
  'sub/../model.onnx.data',
  'nosuch/../model.onnx.data',
  '../model.onnx.data',
  '/etc/passwd',
  'x\0y',
  '',
  '.',
  'sub',
  'model.onnx',
  'C:\\x.data',
  './model.onnx.data',
  'model.onnx.data/',
  'link.data',
];

const external: Mutator = ({ rng, model, files, log }) => {
  const ext = allInitializers(model).filter((t) => t.data_location === 1);
  if (!ext.length) {
    // Make one tensor external (an initializer, now and then an attribute's): bytes to a sidecar.
    const pool = rng.chance(0.9) ? allGraphs(model).flatMap((g) => g.initializer) : allInitializers(model);
    const t = rng.pick(pool.filter((x) => x.raw_data && x.raw_data.length));
    if (!t) return false;
    files.set('w.bin', t.raw_data!);
    delete (t as Partial<TensorProto>).raw_data;
    t.data_location = 1;
    t.external_data = [create('StringStringEntryProto', { key: 'location', value: 'w.bin' })];
    log.push(`tensor ${JSON.stringify(t.name)} moved to w.bin`);
    if (rng.chance(0.5)) return true;
    ext.push(t);
  }
  const t = rng.pick(ext)!;
  const what = rng.int(5);
  const entry = (key: string) => t.external_data.find((e) => e.key === key);
  const set = (key: string, value: string) => {
    const e = entry(key);
    if (e) e.value = value;
    else t.external_data.push(create('StringStringEntryProto', { key, value }));
  };
  switch (what) {
    case 0:
    case 1: {
      const loc = rng.pick(EXTERNAL_LOCATIONS)!;
      set('location', loc);
      if (loc === 'sub' && rng.chance(0.5)) files.set('sub/keep', new Uint8Array(1));
      log.push(`${JSON.stringify(t.name)} location ${JSON.stringify(loc)}`);
      break;
    }
    case 2:
      set('offset', rng.pick(['-1', '1e30', 'abc', '4095', '99999999', '1.5'])!);
      log.push(`${JSON.stringify(t.name)} offset ${entry('offset')!.value}`);
      break;
    case 3:
      set('length', rng.pick(['-1', '0', '1', 'abc', '99999999999'])!);
      log.push(`${JSON.stringify(t.name)} length ${entry('length')!.value}`);
      break;
    default:
      t.external_data = t.external_data.filter((e) => e.key !== 'location');
      log.push(`${JSON.stringify(t.name)} location removed`);
  }
  return true;
};

const structure: Mutator = ({ rng, model, log }) => {
  const g = rng.pick(allGraphs(model));
  if (!g) return false;
  const what = rng.int(9);
  const n = rng.pick(g.node);
  switch (what) {
    case 0:
      if (!n) return false;
      g.node.splice(g.node.indexOf(n), 1);
      log.push(`node ${n.op_type} removed`);
      break;
    case 1: {
      // a node loses an input (an attention MatMul losing one is the classic)
      const mm = rng.chance(0.5) ? (rng.pick(g.node.filter((x) => x.op_type === 'MatMul')) ?? n) : n;
      if (!mm || !mm.input.length) return false;
      mm.input.splice(rng.int(mm.input.length), 1);
      log.push(`${mm.op_type} lost an input`);
      break;
    }
    case 2:
      if (!n) return false;
      n.output.push(`extra_${rng.int(1000)}`);
      n.input.push(rng.pick(valueNames(model)) ?? '');
      log.push(`${n.op_type} gained an input and output`);
      break;
    case 3:
      if (!g.initializer.length) return false;
      g.initializer.splice(rng.int(g.initializer.length), 1);
      log.push('initializer removed');
      break;
    case 4:
      if (!g.input.length) return false;
      g.input.splice(rng.int(g.input.length), 1);
      log.push('graph input removed');
      break;
    case 5:
      if (!n) return false;
      n.op_type = rng.pick(['Identity', 'Bogus', 'MatMul', 'Add', 'If', 'Loop', 'Softmax', 'Attention', 'Gather', ''])!;
      log.push(`node op -> ${n.op_type}`);
      break;
    case 6: // order shuffled
      for (let i = g.node.length - 1; i > 0; i--) {
        const j = rng.int(i + 1);
        [g.node[i], g.node[j]] = [g.node[j]!, g.node[i]!];
      }
      log.push('nodes shuffled');
      break;
    case 7:
      if (!n) return false;
      g.node.push(create<NodeProto>('NodeProto', { ...n, name: `${n.name ?? ''}_dup` }));
      log.push(`${n.op_type} duplicated`);
      break;
    default:
      if (!g.output.length) return false;
      if (rng.chance(0.5)) g.output.splice(rng.int(g.output.length), 1);
      else delete (g.output[rng.int(g.output.length)] as Partial<ValueInfoProto>).type;
      log.push('graph output removed or untyped');
  }
  return true;
};

const functions: Mutator = ({ rng, model, log }) => {
  const f = rng.pick(model.functions);
  if (!f) {
    // Call a local function that does not exist, or declare a stub one.
    const n = rng.pick(model.graph?.node ?? []);
    if (!n) return false;
    n.domain = 'modc';
    log.push(`node ${n.op_type} moved to domain modc`);
    return true;
  }
  const what = rng.int(5);
  switch (what) {
    case 0:
      f.output = f.output.slice(0, Math.max(0, f.output.length - 1));
      log.push(`function ${f.name}: fewer outputs`);
      break;
    case 1:
      f.input = f.input.slice(0, Math.max(0, f.input.length - 1));
      log.push(`function ${f.name}: fewer inputs`);
      break;
    case 2:
      f.node = f.node.slice(0, rng.int(f.node.length + 1));
      log.push(`function ${f.name}: body cut`);
      break;
    case 3:
      f.opset_import = [];
      log.push(`function ${f.name}: no opset imports`);
      break;
    default:
      f.name = nastyName(rng, f.name ?? '');
      log.push(`function renamed (nasty)`);
  }
  return true;
};

/** Value types: element types, shapes, dims, or a non-tensor type where a tensor is expected. */
const types: Mutator = ({ rng, model, log }) => {
  const g = model.graph;
  if (!g) return false;
  const v = rng.pick([...g.input, ...g.output, ...g.value_info]);
  if (!v) return false;
  const where = `type of ${JSON.stringify(v.name ?? '')}`;
  const what = rng.int(7);
  const tt = v.type?.tensor_type;
  switch (what) {
    case 0:
      if (!tt) return false;
      tt.elem_type = rng.pick([0, 1, 6, 7, 8, 9, 10, 16, 99])!;
      log.push(`${where}: elem_type ${tt.elem_type}`);
      break;
    case 1:
      if (!tt) return false;
      delete (tt as { shape?: unknown }).shape;
      log.push(`${where}: no shape`);
      break;
    case 2:
      if (!tt?.shape?.dim.length) return false;
      tt.shape.dim[rng.int(tt.shape.dim.length)] = rng.chance(0.5) ? { dim_value: rng.pick([0, -1, 2 ** 31 - 1, 1, 3])! } : { dim_param: nastyName(rng, 'd') };
      log.push(`${where}: a dim changed`);
      break;
    case 3:
      if (!tt?.shape) return false;
      tt.shape.dim = rng.chance(0.5) ? [] : [...tt.shape.dim, { dim_value: 1 }];
      log.push(`${where}: rank changed`);
      break;
    case 4:
      v.type = { sequence_type: { elem_type: v.type ?? {} } };
      log.push(`${where}: sequence`);
      break;
    case 5:
      delete (v as { type?: unknown }).type;
      log.push(`${where}: removed`);
      break;
    default:
      v.type = { optional_type: { elem_type: v.type ?? {} } };
      log.push(`${where}: optional`);
  }
  return true;
};

/** Attributes and constants the analysis reads: head counts, axes, perms, shape constants. */
const semantics: Mutator = ({ rng, model, log }) => {
  const nodes = allNodes(model);
  if (rng.chance(0.5)) {
    const n = rng.pick(
      nodes.filter((x) =>
        x.attribute.some((a) =>
          /heads|axis|axes|perm|scale|interleaved|to|split|keepdims|epsilon|rotary|window|softcap|do_rotary|past_present|unidirectional/.test(a.name ?? ''),
        ),
      ),
    );
    if (!n) return false;
    const a = rng.pick(n.attribute)!;
    if (a.ints.length) {
      a.ints = rng.chance(0.5) ? [...a.ints].reverse().map((x, i) => (i === 0 ? rng.pick([-9, 0, 7, 99])! : x)) : a.ints.slice(1);
    } else {
      a.i = rng.pick([0, -1, -9, 1, 3, 99, 2 ** 31 - 1])!;
      a.f = rng.pick([0, -1, NaN, 1e-30])!;
    }
    log.push(`${n.op_type}.${a.name} changed`);
    return true;
  }
  // A small int64 constant (a shape, axes, split sizes): one element changed.
  const small = allInitializers(model).filter(
    (t) => t.data_type === 7 && t.dims.reduce((x: number, d) => x * Number(d), 1) <= 8 && t.dims.reduce((x: number, d) => x * Number(d), 1) > 0,
  );
  const t = rng.pick(small);
  if (!t) return false;
  if (t.raw_data?.length) {
    // An earlier mutation may have cut the bytes short of one int64.
    if (t.raw_data.length < 8) return false;
    const copy = new Uint8Array(t.raw_data);
    const i = rng.int(Math.floor(t.raw_data.length / 8));
    new DataView(copy.buffer).setBigInt64(i * 8, BigInt(rng.pick([0, -1, -2, 1, 7, 2 ** 31 - 1, -(2 ** 40)])!), true);
    t.raw_data = copy;
  } else if (t.int64_data.length) {
    t.int64_data[rng.int(t.int64_data.length)] = rng.pick([0, -1, -2, 1, 7, 2 ** 31 - 1])!;
  } else {
    return false;
  }
  log.push(`int64 constant ${JSON.stringify(t.name ?? '')} changed`);
  return true;
};

/** An unknown field appended to the model message (field 999, varint). Must be carried. */
const unknownField: Mutator = ({ model, log }) => {
  const m = model as unknown as { $unknowns?: Uint8Array[] };
  m.$unknowns = [...(m.$unknowns ?? []), Uint8Array.from([0xb8, 0x3e, 0x07])];
  log.push('unknown field 999 on the model');
  return true;
};

const MUTATORS: [string, Mutator, number][] = [
  ['attributes', attributes, 3],
  ['tensors', tensors, 3],
  ['names', names, 3],
  ['opsets', opsets, 2],
  ['metadata', metadata, 1],
  ['external', external, 2],
  ['structure', structure, 3],
  ['functions', functions, 1],
  ['unknown', unknownField, 1],
  ['types', types, 2],
  ['semantics', semantics, 3],
];
const TOTAL_WEIGHT = MUTATORS.reduce((a, m) => a + m[2], 0);

/** Applies 1-3 protobuf-level mutations (or, 1 in 12, byte-level damage) to a model. */
export function mutate(bytes: Uint8Array, sidecars: Map<string, Uint8Array>, rng: Rng): Mutant {
  const files = new Map(sidecars);
  const log: string[] = [];
  if (rng.chance(1 / 12)) {
    // A copy (Buffer.slice would be a view of the cached seed).
    const out = Uint8Array.prototype.slice.call(bytes, 0, rng.chance(0.3) ? rng.int(bytes.length) : bytes.length);
    const flips = 1 + rng.int(8);
    for (let i = 0; i < flips && out.length; i++) out[rng.int(out.length)] = rng.int(256);
    log.push(`bytes: ${out.length}/${bytes.length} kept, ${flips} flipped`);
    return { bytes: out, files, log };
  }
  const model = decodeModelProto(bytes);
  const ctx: Ctx = { rng, model, files, log };
  const count = 1 + rng.int(3);
  for (let k = 0, tries = 0; k < count && tries < 20; tries++) {
    let w = rng.int(TOTAL_WEIGHT);
    const m = MUTATORS.find((x) => (w -= x[2]) < 0)!;
    if (m[1](ctx)) k++;
  }
  return { bytes: encodeModelProto(model), files, log };
}

/** Library-level edits on the loaded IR: what a buggy pass or API user could do. */
export function irEdit(model: Model, rng: Rng): string | null {
  const g = model.graph;
  const what = rng.int(4);
  if (what === 0) {
    const inits = [...g.initializers.values()].filter((v) => v.uses.size);
    const v = rng.pick(inits);
    if (!v) return null;
    g.removeInitializer(v);
    return `IR: initializer ${JSON.stringify(v.name)} removed while used`;
  }
  if (what === 1) {
    const vals: Value[] = g.nodes.flatMap((n) => [...n.outputs]);
    const a = rng.pick(vals);
    const b = rng.pick(vals);
    if (!a || !b || a === b) return null;
    a.name = b.name;
    return `IR: two values named ${JSON.stringify(b.name)}`;
  }
  if (what === 2) {
    // Structural damage: an input rewired to a value nothing defines, or to a later node's output.
    const n = rng.pick(g.nodes.filter((x) => x.inputs.length));
    if (!n) return null;
    const later = g.nodes.slice(g.nodes.indexOf(n) + 1).flatMap((x) => [...x.outputs]);
    const to = rng.chance(0.5) ? new Value('dangling') : (rng.pick(later) ?? new Value('dangling'));
    n.setInput(rng.int(n.inputs.length), to);
    return `IR: ${n.opType} input rewired to ${to.producer ? 'a later value' : 'an undefined value'}`;
  }
  const n = rng.pick(g.nodes);
  if (!n) return null;
  g.removeNode(n, true);
  return `IR: ${n.opType} node force-removed`;
}
