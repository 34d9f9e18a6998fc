/**
 * The CUDA side, checked without a GPU: every node of every compiled model (modc function bodies
 * included, as local functions and inlined; every fixture; threshold and top-k routing, gated and
 * ungated, whole blocks and attention or MLP sub-layers, with all or last-position logits) has a CUDA execution provider kernel at its opset and
 * input/output types, per ONNX Runtime's published kernel table
 * (third_party/onnxruntime/OperatorKernels-CUDA.md). A node without one would run on the CPU, with
 * a device-host copy on each side. Gaps the original model already has (e.g. float32
 * GroupQueryAttention, which ORT implements for float16/bfloat16 only) are reported, not blamed
 * on modc.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { analyzeDecoder } from '../compiler/analysis/analyze.js';
import { DataType, dataTypeName } from '../compiler/core/ir/dtype.js';
import type { Graph, Node, Value } from '../compiler/core/ir/graph.js';
import type { Model, OnnxFunction } from '../compiler/core/ir/model.js';
import { loadModel } from '../compiler/core/io/load.js';
import { runPipeline } from '../compiler/passes/pass-manager.js';
import { planRouting, type RoutedPart, type RoutingMode } from '../compiler/routing/routing-plan.js';
import { modPipeline } from '../compiler/passes/pipeline.js';
import { contractModels, ROOT } from './helpers.js';

// ------------------------------------------------------------------ the kernel table

interface Param {
  name: string;
  type: string;
}
interface Signature {
  inputs: Param[];
  outputs: Param[];
}
interface KernelRow {
  from: number;
  to: number;
  constraints: Map<string, Set<string>>;
}
interface KernelOp {
  signatures: Signature[];
  rows: KernelRow[];
}

/** `*in* A:**T**<br> *out* C:**T**<br><br>or<br><br>...` -> signatures. */
function parseSignatures(cell: string): Signature[] {
  return cell.split('<br><br>or<br><br>').map((alt) => {
    const sig: Signature = { inputs: [], outputs: [] };
    for (const m of alt.matchAll(/\*(in|out)\* ([A-Za-z0-9_.]+):\*\*([^*]+)\*\*/g))
      (m[1] === 'in' ? sig.inputs : sig.outputs).push({ name: m[2]!, type: m[3]! });
    return sig;
  });
}

/** `13+`, `[6, 12]`, `13` -> an inclusive opset range. */
function parseRange(cell: string): [number, number] {
  const plus = /^(\d+)\+$/.exec(cell);
  if (plus) return [Number(plus[1]), Infinity];
  const span = /^\[(\d+), (\d+)\]$/.exec(cell);
  if (span) return [Number(span[1]), Number(span[2])];
  if (/^\d+$/.test(cell)) return [Number(cell), Number(cell)];
  throw new Error(`kernel table: cannot read opset '${cell}'`);
}

/** `**T** = tensor(float), tensor(int64)<br/> **T1** = tensor(bool)` -> T -> {float, int64}. */
function parseConstraints(cell: string): Map<string, Set<string>> {
  const out = new Map<string, Set<string>>();
  for (const part of cell.split('<br/>')) {
    const m = /\*\*([^*]+)\*\* = (.*)$/.exec(part.trim());
    if (m) out.set(m[1]!, new Set([...m[2]!.matchAll(/(?<!seq\()tensor\(([a-z0-9]+)\)/g)].map((t) => t[1]!)));
  }
  return out;
}

function loadKernelTable(path: string): Map<string, KernelOp> {
  const table = new Map<string, KernelOp>();
  let domain = '';
  let current: KernelOp | null = null;
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    const dom = /^\|\*\*Operator Domain:\*\* \*([^*]+)\*/.exec(line);
    if (dom) {
      domain = dom[1] === 'ai.onnx' ? '' : dom[1]!;
      continue;
    }
    const cells = line.split('|');
    if (cells.length !== 6 || !cells[3] || !/^[\d[]/.test(cells[3])) continue;
    const [, name, params, opset, types] = cells as [string, string, string, string, string];
    if (name) {
      current = { signatures: parseSignatures(params), rows: [] };
      table.set(`${domain}:${name}`, current);
    }
    const [from, to] = parseRange(opset);
    current!.rows.push({ from, to, constraints: parseConstraints(types) });
  }
  return table;
}

const TABLE = loadKernelTable(join(ROOT, 'third_party', 'onnxruntime', 'OperatorKernels-CUDA.md'));

// ------------------------------------------------------------------ element types of every value

type Types = Map<Value, number>;

const SAME_AS_FIRST = new Set([
  'Add',
  'Sub',
  'Mul',
  'Div',
  'Pow',
  'Neg',
  'Sqrt',
  'Tanh',
  'Sigmoid',
  'Erf',
  'Cos',
  'Sin',
  'Relu',
  'Ceil',
  'Abs',
  'Exp',
  'Log',
  'MatMulNBits',
  'Identity',
  'Reshape',
  'Transpose',
  'Unsqueeze',
  'Squeeze',
  'Expand',
  'Slice',
  'Gather',
  'GatherElements',
  'GatherND',
  'Concat',
  'Split',
  'Softmax',
  'CumSum',
  'ReduceSum',
  'ReduceMax',
  'ReduceMin',
  'ReduceMean',
  'Max',
  'Min',
  'Tile',
  'ScatterND',
  'ScatterElements',
  'Trilu',
  'MatMul',
  'Gemm',
  'Range',
  'FusedMatMul',
  'FastGelu',
  'Gelu',
  'QuickGelu',
  'RotaryEmbedding',
  'MultiHeadAttention',
  'Attention',
  // com.microsoft MoE / QMoE: the output has the input's type.
  'MoE',
  'QMoE',
]);
const BOOLEAN = new Set(['Equal', 'Less', 'Greater', 'LessOrEqual', 'GreaterOrEqual', 'Not', 'And', 'Or', 'Xor']);
const INT64 = new Set(['Shape', 'Size', 'NonZero', 'ArgMax', 'ArgMin']);

/** Element types of a node's outputs, from its inputs' types and its attributes. */
function outputTypes(n: Node, types: Types, infer: (g: Graph) => void): number[] {
  const t = (i: number) => {
    const v = n.input(i);
    const got = v ? types.get(v) : undefined;
    if (got === undefined) throw new Error(`no element type for input ${i} (${v?.name}) of ${n.describe()}`);
    return got;
  };
  const all = (code: number) => n.outputs.map(() => code);
  const op = n.opType;
  const standard = !n.domain || n.domain === 'ai.onnx';
  if (op === 'Cast') return [n.attrInt('to')!];
  if (op === 'Constant') {
    const a = [...n.attributes.values()][0]!.proto;
    return [a.t ? a.t.data_type! : a.name!.startsWith('value_int') ? DataType.INT64 : DataType.FLOAT];
  }
  if (op === 'ConstantOfShape') return [n.attr('value')?.t?.data_type ?? DataType.FLOAT];
  if (op === 'If') {
    const branch = n.attributes.get('then_branch')!.graph!;
    infer(branch);
    return branch.outputs.map((v) => types.get(v)!);
  }
  if (op === 'Where') return [t(1)];
  if (op === 'DequantizeLinear') return [t(1)];
  if (op === 'QuantizeLinear') return [n.input(2) ? t(2) : n.attrInt('output_dtype', DataType.UINT8)!];
  if (op === 'MatMulInteger') return [DataType.INT32];
  if (op === 'TopK') return [t(0), DataType.INT64];
  if (op === 'LayerNormalization' || op === 'SimplifiedLayerNormalization')
    return n.outputs.map((_, i) => (i === 0 ? t(op === 'SimplifiedLayerNormalization' ? 1 : 0) : DataType.FLOAT));
  if (op === 'SkipLayerNormalization' || op === 'SkipSimplifiedLayerNormalization')
    return n.outputs.map((_, i) => (i === 1 || i === 2 ? DataType.FLOAT : t(0)));
  // ONNX RMSNormalization-23: Y has the scale's type V (stash_type only sets the compute precision).
  if (op === 'RMSNormalization' && standard) return [t(1)];
  // ONNX Attention-23/24: Y and qk_matmul_output are T1 (Q's type), present_key T1, present_value T2 (V's type).
  if (op === 'Attention' && standard) return n.outputs.map((_, i) => (i === 2 ? t(2) : t(0)));
  // ONNX TensorScatter-24: present_cache has past_cache's type.
  if (op === 'TensorScatter' && standard) return [t(0)];
  if (op === 'GroupQueryAttention') return n.outputs.map((_, i) => (i === 1 || i === 2 ? t(3) : t(0)));
  if (op === 'EmbedLayerNormalization') return n.outputs.map((_, i) => (i === 1 ? DataType.INT32 : t(2)));
  if (BOOLEAN.has(op)) return all(DataType.BOOL);
  if (INT64.has(op)) return all(DataType.INT64);
  if (SAME_AS_FIRST.has(op)) return all(t(0));
  throw new Error(`no element-type rule for ${n.domain || 'ai.onnx'}:${op} (${n.describe()})`);
}

// ------------------------------------------------------------------ the check

/** One node instance as the CUDA EP would see it: op, opset, input and output element types. */
interface Instance {
  domain: string;
  op: string;
  opset: number;
  inputs: (string | null)[];
  outputs: string[];
  where: string;
}

const key = (i: Instance) => `${i.domain || 'ai.onnx'}:${i.op}@${i.opset}(${i.inputs.map((t) => t ?? '-').join(',')})->(${i.outputs.join(',')})`;

/** Why the CUDA EP has no kernel for the instance, or null when it has one. */
export function missingKernel(i: Instance): string | null {
  const op = TABLE.get(`${i.domain}:${i.op}`);
  if (!op) return `no CUDA kernel for ${i.domain || 'ai.onnx'}:${i.op} at all`;
  const row = op.rows.find((r) => i.opset >= r.from && i.opset <= r.to);
  if (!row)
    return `no CUDA kernel for ${i.op} at opset ${i.opset} (kernels: ${op.rows.map((r) => (r.to === Infinity ? `${r.from}+` : `[${r.from}, ${r.to}]`)).join(', ')})`;
  const fits = (sig: Signature) => {
    const check = (params: Param[], got: (string | null)[]) =>
      got.every((type, k) => {
        if (type === null) return true;
        const p = params[Math.min(k, params.length - 1)];
        if (!p) return false;
        const concrete = /^tensor\(([a-z0-9]+)\)$/.exec(p.type);
        if (concrete) return concrete[1] === type;
        const allowed = row.constraints.get(p.type);
        return !allowed || allowed.has(type);
      });
    return check(sig.inputs, i.inputs) && check(sig.outputs, i.outputs);
  };
  return op.signatures.some(fits)
    ? null
    : `no CUDA kernel for ${i.op} at opset ${i.opset} with types (${i.inputs.map((t) => t ?? '-').join(', ')}) -> (${i.outputs.join(', ')})`;
}

/**
 * Every kernel-backed node instance of the model: main graph, If branches, and the body of each
 * modc function call with the call's own types. Constant nodes have no kernel: ORT folds them
 * into initializers when it loads the model.
 */
function instances(model: Model): Instance[] {
  const types: Types = new Map();
  for (const v of model.graph.inputs) if (v.dtype !== undefined) types.set(v, v.dtype);
  for (const v of model.graph.initializers.values()) if (v.dtype !== undefined) types.set(v, v.dtype);
  const out: Instance[] = [];
  const opsetOf = (imports: { domain?: string; version?: unknown }[], domain: string) => {
    const e = imports.find((o) => (o.domain === 'ai.onnx' ? '' : (o.domain ?? '')) === domain);
    return e ? Number(e.version) : undefined;
  };
  const walk = (g: Graph, imports: { domain?: string; version?: unknown }[], where: string) => {
    for (const v of g.initializers.values()) if (v.dtype !== undefined) types.set(v, v.dtype);
    for (const n of g.nodes) {
      const domain = n.domain === 'ai.onnx' ? '' : n.domain;
      const fn = model.functions.find((f) => f.domain === domain && f.name === n.opType);
      if (fn) {
        callFunction(fn, n, where);
        continue;
      }
      const outs = outputTypes(n, types, (sg) => walk(sg, imports, `${where} > ${n.name || n.opType}`));
      n.outputs.forEach((v, k) => types.set(v, outs[k]!));
      if (n.opType === 'Constant' && domain === '') continue;
      out.push({
        domain,
        op: n.opType,
        opset: opsetOf(imports, domain) ?? 1,
        where: `${where} > ${n.name || n.opType}`,
        inputs: n.inputs.map((v) => (v ? dataTypeName(types.get(v)!) : null)),
        outputs: outs.map(dataTypeName),
      });
    }
  };
  const callFunction = (fn: OnnxFunction, call: Node, where: string) => {
    fn.body.inputs.forEach((v, k) => {
      const arg = call.input(k);
      if (arg) types.set(v, types.get(arg)!);
    });
    walk(fn.body, fn.opsetImports.length ? fn.opsetImports : model.opsetImports, `${where} > ${fn.domain}.${fn.name}`);
    call.outputs.forEach((v, k) => types.set(v, types.get(fn.body.outputs[k]!)!));
  };
  walk(model.graph, model.opsetImports, 'graph');
  return out;
}

/** The distinct missing kernels of a model: key -> [reason, where (first seen)]. */
function gaps(model: Model): Map<string, [string, string]> {
  const found = new Map<string, [string, string]>();
  for (const i of instances(model)) {
    const why = missingKernel(i);
    if (why && !found.has(key(i))) found.set(key(i), [why, i.where]);
  }
  return found;
}

interface Variant {
  name: string;
  mode: RoutingMode;
  gated: boolean;
  inlineOps: boolean;
  logits: 'all' | 'last';
  granularity?: RoutedPart;
}
const VARIANTS: Variant[] = [
  { name: 'threshold, gated, functions', mode: 'threshold', gated: true, inlineOps: false, logits: 'all' },
  { name: 'threshold, ungated, inlined, last logits', mode: 'threshold', gated: false, inlineOps: true, logits: 'last' },
  { name: 'topk, gated, inlined', mode: 'topk', gated: true, inlineOps: true, logits: 'all' },
  { name: 'topk, ungated, functions, last logits', mode: 'topk', gated: false, inlineOps: false, logits: 'last' },
  { name: 'attention sub-layers, threshold, gated, functions', mode: 'threshold', gated: true, inlineOps: false, logits: 'all', granularity: 'attention' },
  { name: 'mlp sub-layers, topk, gated, inlined', mode: 'topk', gated: true, inlineOps: true, logits: 'all', granularity: 'mlp' },
];

function compiled(path: string, v: Variant): Model {
  const model = loadModel(path);
  const s = analyzeDecoder(model);
  const plan = planRouting({
    numLayers: s.layers.length,
    hiddenSize: s.hiddenSize,
    routers: { kind: 'random', seed: 2 },
    mode: v.mode,
    gated: v.gated,
    granularity: v.granularity,
  });
  runPipeline(model, modPipeline({ plan, inlineOps: v.inlineOps, logits: v.logits }));
  return model;
}

describe('the kernel table', () => {
  it("reads ORT's CUDA rows: opset ranges, signatures and type constraints", () => {
    expect(TABLE.get(':Add')!.rows.map((r) => [r.from, r.to])).toEqual([
      [14, Infinity],
      [13, 13],
      [7, 12],
    ]);
    expect(TABLE.get('com.microsoft:GroupQueryAttention')!.rows[0]!.constraints.get('T')).toEqual(new Set(['bfloat16', 'float16']));
    expect(TABLE.size).toBeGreaterThan(60);
  });

  it('finds the gaps it must: int64 Max before opset 12, float32 GroupQueryAttention, an op with no CUDA kernel', () => {
    const inst = (op: string, opset: number, inputs: (string | null)[], outputs: string[], domain = ''): Instance => ({
      domain,
      op,
      opset,
      inputs,
      outputs,
      where: 'test',
    });
    expect(missingKernel(inst('Max', 11, ['int64', 'int64'], ['int64']))).toMatch(/Max at opset 11 with types/);
    expect(missingKernel(inst('Max', 13, ['int64', 'int64'], ['int64']))).toBeNull();
    expect(missingKernel(inst('Where', 17, ['bool', 'float', 'float'], ['float']))).toBeNull();
    expect(missingKernel(inst('Where', 17, ['bool', 'bool', 'bool'], ['bool']))).toMatch(/no CUDA kernel for Where/);
    expect(missingKernel(inst('CumSum', 11, ['float16', 'int64'], ['float16']))).toMatch(/CumSum at opset 11/);
    expect(
      missingKernel(
        inst('GroupQueryAttention', 1, ['float', 'float', 'float', 'float', 'float', 'int32', 'int32'], ['float', 'float', 'float'], 'com.microsoft'),
      ),
    ).toMatch(/GroupQueryAttention/);
    expect(missingKernel(inst('Einsum', 17, ['float'], ['float']))).toMatch(/at all/);
    // the standard opset-23/24 ops of the forms-attention23-* and forms-static-* fixtures
    expect(missingKernel(inst('Attention', 23, ['float', 'float', 'float', 'bool', 'float', 'float'], ['float', 'float', 'float']))).toBeNull();
    expect(missingKernel(inst('Attention', 24, ['float', 'float', 'float', 'bool', null, null, 'int64'], ['float']))).toBeNull();
    expect(missingKernel(inst('Attention', 24, ['float', 'float', 'float', 'int64'], ['float']))).toMatch(
      /no CUDA kernel for Attention at opset 24 with types/,
    );
    expect(missingKernel(inst('TensorScatter', 24, ['float16', 'float16', 'int64'], ['float16']))).toBeNull();
    expect(missingKernel(inst('TensorScatter', 23, ['float', 'float', 'int64'], ['float']))).toMatch(/TensorScatter at opset 23 \(kernels: 24\+\)/);
    expect(missingKernel(inst('RotaryEmbedding', 23, ['float', 'float', 'float', 'int64'], ['float']))).toBeNull();
    expect(missingKernel(inst('RMSNormalization', 23, ['float', 'float16'], ['float16']))).toBeNull();
  });
});

/**
 * A gap the original model has already: the same key, or the same node rewired by route-layers
 * (a compacted GroupQueryAttention's inputs change: attention_bias, rotary moved out), with the
 * same op, opset and output types.
 */
const opOf = (k: string) => k.replace(/\(.*\)->/, '->');

/**
 * The fixtures' second models (`causal.onnx`: standard Attention with is_causal=1 and no mask),
 * which contractModels() does not list; checked in the slow project only, so each runs once.
 */
const SECOND_MODELS =
  process.env.MODC_TEST_MODELS === 'quick'
    ? []
    : ['forms-static-causal-tiny', 'forms-attention23-causal-tiny'].map((name) => ({
        name: `fixtures/${name}/causal.onnx`,
        path: join(ROOT, 'fixtures', name, 'causal.onnx'),
      }));

describe.each([...contractModels(), ...SECOND_MODELS])('$name', ({ path }) => {
  const original = gaps(loadModel(path));
  const originalOps = new Set([...original.keys()].map(opOf));

  it.each(VARIANTS)('compiled ($name): every node modc adds has a CUDA kernel at its opset and types', (v) => {
    const model = compiled(path, v);
    const all = instances(model);
    expect(all.length).toBeGreaterThan(0);
    const added = [...gaps(model)].filter(([k]) => !original.has(k) && !originalOps.has(opOf(k))).map(([k, [why, where]]) => `${k}: ${why} (at ${where})`);
    expect(added).toEqual([]);
  });
});
