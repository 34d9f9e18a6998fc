/**
 * IR verifier: the invariants every pass must leave intact, and the structural rules ONNX Runtime
 * enforces when it loads a model (one definition per name, nothing read that nothing defines,
 * initializers present, node arity, opset imports, calls that fit the local function they call).
 * Each issue names the node (or graph value) at fault, quoted, so a failing pass can be debugged
 * from the message alone.
 */
import { ModcError, quote } from '../errors.js';
import { externalInputsOf, type Graph, type Node, type Value } from './graph.js';
import type { Model, OnnxFunction } from './model.js';
import { DataType } from './dtype.js';
import { elemTypeIssues } from './elem-types.js';
import { rankIssues } from './ranks.js';

export interface VerifyIssue {
  graph: string;
  message: string;
}

export interface VerifyOptions {
  /**
   * Require nodes in topological order (default true). A loaded model may be unsorted (ONNX
   * Runtime sorts it); passes and the pipeline require order.
   */
  order?: boolean;
}

/** A value name in a message. */
const val = (v: Value) => `%${quote(v.name).slice(1, -1)}`;

export function verifyModel(model: Model, opts: VerifyOptions = {}): VerifyIssue[] {
  const issues: VerifyIssue[] = [];
  const ctx: Ctx = { model, functions: new Map(model.functions.map((f) => [functionKey(f.domain, f.name, f.overload), f])), order: opts.order !== false };
  verifyOpsets(model, issues);
  const seen = new Set<string>();
  for (const f of model.functions) {
    const key = functionKey(f.domain, f.name, f.overload);
    if (seen.has(key)) issues.push({ graph: f.name, message: `local function ${quote(f.key)} is defined twice` });
    seen.add(key);
  }
  verifyGraph(model.graph, new Set(), issues, true, ctx);
  for (const f of model.functions) verifyGraph(f.body, new Set(), issues, false, ctx);
  return issues;
}

/** Throws a ModcError carrying the first issue (and how many more there are). */
export function assertValid(model: Model, context = 'model', opts: VerifyOptions = {}): void {
  const issues = verifyModel(model, opts);
  if (issues.length === 0) return;
  const more = issues.length > 1 ? ` (and ${issues.length - 1} more)` : '';
  throw new ModcError(`invalid ${context}: ${issues[0]!.message}${more}`);
}

interface Ctx {
  model: Model;
  functions: Map<string, OnnxFunction>;
  order: boolean;
}

function functionKey(domain: string, name: string, overload: string | undefined): string {
  return `${domain}\u0000${name}\u0000${overload ?? ''}`;
}

function* nodesAndFunctionNodes(model: Model): Iterable<Node> {
  yield* model.graph.allNodes();
  for (const f of model.functions) yield* f.body.allNodes();
}

function verifyOpsets(model: Model, issues: VerifyIssue[]): void {
  const report = (message: string) => issues.push({ graph: model.graph.name, message });
  const seen = new Map<string, number>();
  for (const o of model.opsetImports) {
    const domain = o.domain === 'ai.onnx' ? '' : (o.domain ?? '');
    const version = typeof o.version === 'number' ? o.version : Number(o.version ?? 0);
    if (seen.has(domain) && seen.get(domain) !== version)
      report(`opset ${quote(domain || 'ai.onnx')} is imported twice, at versions ${seen.get(domain)} and ${version}`);
    seen.set(domain, version);
    if (!Number.isSafeInteger(version) || version < 1) report(`opset ${quote(domain || 'ai.onnx')} is imported at version ${String(o.version)}`);
  }
  let usesDefault = false;
  for (const n of nodesAndFunctionNodes(model))
    if (n.domain === '' || n.domain === 'ai.onnx') {
      usesDefault = true;
      break;
    }
  if (usesDefault && !seen.has('')) report('the model uses default-domain (ai.onnx) operators but imports no ai.onnx opset');
}

/**
 * Inputs (min, max) and outputs (min, max) of the default-domain ops the compiler reads or
 * writes. A node outside these bounds cannot load in ONNX Runtime, and analysis must not meet it.
 */
const ARITY: Record<string, [number, number, number, number]> = {
  MatMul: [2, 2, 1, 1],
  Add: [2, 2, 1, 1],
  Sub: [2, 2, 1, 1],
  Mul: [2, 2, 1, 1],
  Div: [2, 2, 1, 1],
  Pow: [2, 2, 1, 1],
  Equal: [2, 2, 1, 1],
  Less: [2, 2, 1, 1],
  Greater: [2, 2, 1, 1],
  And: [2, 2, 1, 1],
  Or: [2, 2, 1, 1],
  Where: [3, 3, 1, 1],
  Gemm: [2, 3, 1, 1],
  Softmax: [1, 1, 1, 1],
  Transpose: [1, 1, 1, 1],
  Reshape: [2, 2, 1, 1],
  Expand: [2, 2, 1, 1],
  Gather: [2, 2, 1, 1],
  GatherElements: [2, 2, 1, 1],
  Concat: [1, Infinity, 1, 1],
  Slice: [1, 5, 1, 1],
  Shape: [1, 1, 1, 1],
  Unsqueeze: [1, 2, 1, 1],
  Squeeze: [1, 2, 1, 1],
  Cast: [1, 1, 1, 1],
  Sqrt: [1, 1, 1, 1],
  Neg: [1, 1, 1, 1],
  Not: [1, 1, 1, 1],
  Sigmoid: [1, 1, 1, 1],
  Tanh: [1, 1, 1, 1],
  Relu: [1, 1, 1, 1],
  Erf: [1, 1, 1, 1],
  Exp: [1, 1, 1, 1],
  Reciprocal: [1, 1, 1, 1],
  Identity: [1, 1, 1, 1],
  ReduceMean: [1, 2, 1, 1],
  ReduceSum: [1, 2, 1, 1],
  ReduceMax: [1, 2, 1, 1],
  CumSum: [2, 2, 1, 1],
  Range: [3, 3, 1, 1],
  Trilu: [1, 2, 1, 1],
  LayerNormalization: [2, 3, 1, 3],
  SimplifiedLayerNormalization: [2, 3, 1, 3],
  RMSNormalization: [2, 2, 1, 1],
  If: [1, 1, 1, Infinity],
  ScatterND: [3, 3, 1, 1],
  ScatterElements: [3, 3, 1, 1],
  TopK: [2, 2, 2, 2],
  NonZero: [1, 1, 1, 1],
  ConstantOfShape: [1, 1, 1, 1],
  Constant: [0, 0, 1, 1],
  Split: [1, 2, 1, Infinity],
  Attention: [3, 7, 1, 4],
  RotaryEmbedding: [3, 4, 1, 1],
  Sin: [1, 1, 1, 1],
  Cos: [1, 1, 1, 1],
};

/** Element type codes a tensor can have (TensorProto.DataType, UNDEFINED excluded). */
const KNOWN_TYPES: ReadonlySet<number> = new Set<number>(Object.values(DataType).filter((t) => t !== DataType.UNDEFINED));

/**
 * Fused com.microsoft ops the analysis reads: input slots (min, max), outputs (min, max), and the
 * slots that must be present (others may be omitted with '').
 */
const MS_ARITY: Record<string, [number, number, number, number, number[]]> = {
  SkipLayerNormalization: [3, 5, 1, 4, [0, 1, 2]],
  SkipSimplifiedLayerNormalization: [3, 4, 1, 4, [0, 1, 2]],
  SimplifiedLayerNormalization: [2, 2, 1, 3, [0, 1]],
  LayerNormalization: [2, 3, 1, 3, [0, 1]],
  EmbedLayerNormalization: [7, 9, 1, 3, [0, 2, 3, 5, 6]],
  Attention: [2, 10, 1, 3, [0, 1]],
  MultiHeadAttention: [1, 12, 1, 4, [0]],
  GroupQueryAttention: [7, 14, 1, 4, [0, 5, 6]],
  RotaryEmbedding: [4, 4, 1, 1, [0, 1, 2, 3]],
  MatMulNBits: [3, 7, 1, 1, [0, 1, 2]],
  FastGelu: [1, 2, 1, 1, [0]],
  BiasGelu: [2, 2, 1, 1, [0, 1]],
};

function verifyArity(n: Node, report: (m: string) => void, ctx: Ctx): void {
  if (n.opType === '') report(`${n.describe()} has no op type`);
  const fn = ctx.functions.get(functionKey(n.domain, n.opType, n.overload));
  if (fn) {
    if (n.inputs.length > fn.body.inputs.length)
      report(`${n.describe()} passes ${n.inputs.length} inputs to local function ${quote(fn.key)}, which declares ${fn.body.inputs.length}`);
    if (n.outputs.length > fn.body.outputs.length)
      report(`${n.describe()} expects ${n.outputs.length} outputs from local function ${quote(fn.key)}, which declares ${fn.body.outputs.length}`);
    return;
  }
  if (n.domain === 'com.microsoft') {
    const m = MS_ARITY[n.opType];
    if (!m) return;
    const [inMin, inMax, outMin, outMax, required] = m;
    const ins = lastPresent(n.inputs);
    const outs = lastPresent(n.outputs.map((v) => (v.name === '' ? null : v)));
    const missing = required.filter((i) => !n.inputs[i]);
    if (missing.length || ins > inMax) {
      report(
        `${n.describe()} ${missing.length ? `lacks required input${missing.length > 1 ? 's' : ''} ${missing.join(', ')}` : `has ${ins} inputs`}; ${n.opType} takes ${inMin} to ${inMax}`,
      );
    }
    if (outs < outMin || outs > outMax) report(`${n.describe()} has ${outs} outputs; ${n.opType} gives ${outMin} to ${outMax}`);
    return;
  }
  if (n.domain !== '') return;
  const a = ARITY[n.opType];
  if (!a) return;
  const ins = lastPresent(n.inputs);
  const outs = lastPresent(n.outputs.map((v) => (v.name === '' ? null : v)));
  const [inMin, inMax, outMin, outMax] = a;
  const required = n.inputs.slice(0, inMin).filter((v) => v !== null).length;
  if (ins < inMin || required < inMin || ins > inMax)
    report(
      `${n.describe()} has ${ins} input${ins === 1 ? '' : 's'}${required < ins ? ` (${ins - required} of the first ${inMin} omitted)` : ''}; ${n.opType} takes ${inMin === inMax ? inMin : `${inMin} to ${inMax === Infinity ? 'any number' : inMax}`}`,
    );
  if (outs < outMin || outs > outMax)
    report(
      `${n.describe()} has ${outs} output${outs === 1 ? '' : 's'}; ${n.opType} gives ${outMin === outMax ? outMin : `${outMin} to ${outMax === Infinity ? 'any number' : outMax}`}`,
    );
  if (n.opType === 'Cast') {
    const to = n.attrInt('to');
    if (to === undefined || !KNOWN_TYPES.has(to))
      report(`${n.describe()} casts to ${to === undefined ? 'no type (attribute to is missing)' : `element type ${to}, which is not a tensor type`}`);
  }
  if (n.opType === 'If') {
    for (const branch of ['then_branch', 'else_branch']) {
      const g = n.attributes.get(branch)?.graph;
      if (!g) report(`${n.describe()} has no ${branch} graph`);
      else if (g.outputs.length !== n.outputs.length) report(`${n.describe()} has ${n.outputs.length} outputs but its ${branch} gives ${g.outputs.length}`);
    }
  }
}

/** A node on a dependency cycle among this graph's nodes (Kahn's algorithm), or null. */
function cycleMember(g: Graph): Node | null {
  const pending = new Map<Node, number>();
  const dependents = new Map<Node, Node[]>();
  for (const n of g.nodes) {
    const deps = new Set<Node>();
    // Subgraphs' reads of this graph's values count: an If whose branch reads a later value waits on it.
    for (const v of externalInputsOf(n)) if (v.producer && v.producer.graph === g) deps.add(v.producer);
    pending.set(n, deps.size);
    for (const d of deps) dependents.set(d, [...(dependents.get(d) ?? []), n]);
  }
  const ready = g.nodes.filter((n) => pending.get(n) === 0);
  let done = 0;
  while (ready.length) {
    const n = ready.pop()!;
    done++;
    for (const d of dependents.get(n) ?? []) {
      const left = pending.get(d)! - 1;
      pending.set(d, left);
      if (left === 0) ready.push(d);
    }
  }
  if (done === g.nodes.length) return null;
  // Every unplaced node waits on another unplaced one: walking back must come round a cycle.
  let n = g.nodes.find((x) => pending.get(x)! > 0)!;
  const seen = new Set<Node>();
  while (!seen.has(n)) {
    seen.add(n);
    const p = externalInputsOf(n)
      .map((v) => v.producer)
      .find((x) => x && x.graph === g && pending.get(x)! > 0);
    if (!p) break;
    n = p;
  }
  return n;
}

function lastPresent(values: readonly (Value | null)[]): number {
  let k = values.length;
  while (k > 0 && values[k - 1] === null) k--;
  return k;
}

function verifyGraph(g: Graph, outer: ReadonlySet<Value>, issues: VerifyIssue[], isMain: boolean, ctx: Ctx): void {
  const report = (message: string) => issues.push({ graph: g.name, message });
  const defined = new Set<Value>();
  const byName = new Map<string, { value: Value; where: string }>();
  const define = (v: Value, where: string) => {
    if (v.name === '') {
      // An omitted optional output; anything that reads it reads "omitted" in ONNX.
      if (!where.startsWith('an output of')) report(`${where} has the empty name, which ONNX reads as an omitted value`);
      return;
    }
    if (defined.has(v)) report(`${where} redefines ${val(v)}`);
    const clash = byName.get(v.name);
    if (clash && clash.value !== v) report(`value name ${quote(v.name)} is defined twice in graph ${quote(g.name)} (${clash.where} and ${where})`);
    byName.set(v.name, { value: v, where });
    defined.add(v);
  };
  for (const v of g.inputs) define(v, 'a graph input');
  const inputSet = new Set(g.inputs);
  for (const [key, v] of g.initializers) {
    if (key !== v.name) report(`initializer ${quote(key)} is registered under another name than its value's (${quote(v.name)})`);
    if (!v.initializer) report(`initializer ${quote(key)} has no data`);
    if (!inputSet.has(v)) define(v, 'an initializer');
  }
  // Values defined anywhere in this graph (for telling "not yet" from "never").
  const producedHere = new Set<Value>();
  for (const n of g.nodes) for (const v of n.outputs) producedHere.add(v);
  const visible = (v: Value) => defined.has(v) || outer.has(v);
  let forward = false;
  for (const n of g.nodes) {
    if (n.graph !== g) report(`${n.describe()} is listed in graph ${quote(g.name)} but points at another graph`);
    verifyArity(n, report, ctx);
    n.inputs.forEach((v, i) => {
      if (!v) return;
      if (v.name === '') report(`${n.describe()} input ${i} reads a value with the empty name, which ONNX reads as an omitted input`);
      if (![...v.uses].some((u) => u.node === n && u.index === i)) report(`${n.describe()} input ${i} (${val(v)}) is missing from that value's use list`);
      if (visible(v)) return;
      if (producedHere.has(v) && v.producer?.graph === g) {
        if (ctx.order) report(`${n.describe()} reads ${val(v)} before it is defined (graph is not in topological order)`);
        forward = true;
        return;
      }
      report(`${n.describe()} reads ${val(v)}, which nothing defines`);
    });
    const subgraphs = n.subgraphs();
    // Built only for nodes with subgraphs: a copy per node made verification quadratic.
    if (subgraphs.length) {
      const inner = new Set([...outer, ...defined, ...(ctx.order ? [] : producedHere)]);
      for (const sg of subgraphs) verifyGraph(sg, inner, issues, false, ctx);
    }
    for (const v of n.outputs) {
      if (v.producer !== n) report(`${n.describe()} lists output ${val(v)} whose producer is another node`);
      define(v, `an output of ${n.describe()}`);
    }
  }
  if (!ctx.order && (forward || g.nodes.some((n) => n.subgraphs().length > 0))) {
    const stuck = cycleMember(g);
    if (stuck) report(`graph ${quote(g.name)} has a cycle through ${stuck.describe()}; ONNX graphs must be acyclic`);
  }
  for (const v of g.outputs) {
    if (!visible(v) && !(!ctx.order && producedHere.has(v))) report(`graph output ${val(v)} is not defined in graph ${quote(g.name)}`);
  }
  const outNames = new Set<string>();
  for (const v of g.outputs) {
    if (v.name === '') report(`graph ${quote(g.name)} has an output with the empty name`);
    if (outNames.has(v.name)) report(`graph ${quote(g.name)} lists output ${val(v)} twice`);
    outNames.add(v.name);
  }
  if (isMain) {
    for (const m of [...rankIssues(g), ...elemTypeIssues(g)]) report(m);
    for (const v of g.inputs) if (!v.type) report(`graph input ${val(v)} has no type`);
    for (const v of g.outputs) if (!v.type) report(`graph output ${val(v)} has no type`);
  }
}
