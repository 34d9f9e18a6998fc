/**
 * ModelProto <-> IR. Every field is carried: what the IR models is rebuilt from the IR, the rest
 * is copied from the proto the object was loaded from, so an unchanged model saves to the same
 * protobuf content (and, for models written by protobuf's C++ serializer, the same bytes).
 */
import type { AttributeProto, FunctionProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto } from '../proto/index.js';
import { AttributeType, has, int64ToNumber } from '../proto/index.js';
import { ModcError, quote } from '../errors.js';
import { Graph, Node, Value } from '../ir/graph.js';
import { Model, OnnxFunction } from '../ir/model.js';
import { checkTensorProto, Tensor } from '../ir/tensor.js';

/** Builds a Tensor from an initializer proto; external data is resolved by the loader. */
export type TensorFactory = (proto: TensorProto) => Tensor;

const SOURCE = Symbol('modc.source');
type WithSource = { [SOURCE]?: object };

function sourceOf(obj: object): object | undefined {
  return (obj as WithSource)[SOURCE];
}

function remember<T extends object>(obj: T, source: object): T {
  Object.defineProperty(obj, SOURCE, { value: source, enumerable: false, writable: true });
  return obj;
}

/**
 * A shallow copy of a decoded message that keeps its unknown fields: protobufjs holds them in a
 * non-enumerable `$unknowns` (raw bytes, re-emitted by the encoder), which a spread would drop.
 */
export function copyMessage(src: object | undefined): Record<string, unknown> {
  if (!src) return {};
  const out: Record<string, unknown> = { ...(src as Record<string, unknown>) };
  const unknowns = (src as { $unknowns?: Uint8Array[] }).$unknowns;
  if (unknowns?.length) out.$unknowns = unknowns;
  return out;
}

// ---------------------------------------------------------------------------------------------
// proto -> IR

export function modelFromProto(mp: ModelProto, makeTensor: TensorFactory): Model {
  const graph = mp.graph ? graphFromProto(mp.graph, null, makeTensor) : new Graph('');
  const model = new Model(graph, int64ToNumber(mp.ir_version));
  model.source = mp;
  model.opsetImports = [...mp.opset_import];
  if (has(mp, 'producer_name')) model.producerName = mp.producer_name;
  if (has(mp, 'producer_version')) model.producerVersion = mp.producer_version;
  if (has(mp, 'domain')) model.domain = mp.domain;
  if (has(mp, 'model_version')) model.modelVersion = mp.model_version;
  if (has(mp, 'doc_string')) model.docString = mp.doc_string;
  model.metadataProps = [...mp.metadata_props];
  model.trainingInfo = [...mp.training_info];
  model.configuration = [...mp.configuration];
  model.functions = mp.functions.map((fp) => functionFromProto(fp, makeTensor));
  return model;
}

function valueFromInfo(vi: ValueInfoProto, into?: Value): Value {
  const v = into ?? new Value(vi.name ?? '');
  if (has(vi, 'type')) v.type = vi.type;
  if (has(vi, 'doc_string')) v.docString = vi.doc_string;
  if (vi.metadata_props.length) v.metadataProps = [...vi.metadata_props];
  remember(v, vi);
  return v;
}

export function graphFromProto(gp: GraphProto, parent: Graph | null, makeTensor: TensorFactory): Graph {
  const g = new Graph(gp.name ?? '', parent);
  remember(g, gp);
  if (has(gp, 'doc_string')) g.docString = gp.doc_string;
  g.metadataProps = [...gp.metadata_props];
  g.sparseInitializers = [...gp.sparse_initializer];
  g.quantizationAnnotation = [...gp.quantization_annotation];
  const scope = new Map<string, Value>();
  const define = (v: Value) => {
    v.graph = g;
    g.claimName(v.name);
    scope.set(v.name, v);
  };

  for (const vi of gp.input) {
    const v = valueFromInfo(vi);
    define(v);
    g.inputs.push(v);
  }
  for (const tp of gp.initializer) {
    const name = tp.name ?? '';
    checkTensorProto(tp, `initializer ${quote(name)}`);
    const v = scope.get(name) ?? new Value(name);
    g.addInitializer(v, makeTensor(tp));
    define(v);
  }
  // Outputs of every node first, so forward references (unsorted graphs) still resolve.
  const nodes = gp.node.map((np) => {
    // 'ai.onnx' is another spelling of the default domain: one spelling in the IR.
    const n = new Node(np.op_type ?? '', np.domain === 'ai.onnx' ? '' : (np.domain ?? ''), np.name ?? '');
    n.graph = g;
    g.claimName(n.name);
    n.setOutputs(np.output.map((name) => new Value(name)));
    for (const v of n.outputs) if (v.name) define(v);
    return n;
  });
  // Subgraphs below resolve outer names through this graph, so its nodes must be in place.
  g.setNodes(nodes);
  const resolve = (name: string): Value => {
    const local = scope.get(name);
    if (local) return local;
    for (let p = parent; p; p = p.parent) {
      const found = p.findValue(name);
      if (found) return found;
    }
    // A name nobody defines: keep it so the verifier can point at it.
    const dangling = new Value(name);
    scope.set(name, dangling);
    return dangling;
  };
  gp.node.forEach((np, i) => {
    const n = nodes[i]!;
    remember(n, np);
    if (has(np, 'overload')) n.overload = np.overload;
    if (has(np, 'doc_string')) n.docString = np.doc_string;
    n.metadataProps = [...np.metadata_props];
    n.deviceConfigurations = [...np.device_configurations];
    n.setInputs(np.input.map((name) => (name === '' ? null : resolve(name))));
    for (const ap of np.attribute) {
      const name = ap.name ?? '';
      if (n.attributes.has(name)) throw new ModcError(`${n.describe()} has attribute ${quote(name)} twice`);
      n.attributes.set(name, attributeFromProto(ap, n, g, makeTensor));
    }
  });
  for (const vi of gp.value_info) {
    const v = scope.get(vi.name ?? '');
    if (v) {
      valueFromInfo(vi, v);
      g.valueInfo.push(v);
    } else {
      // value_info about a value the graph does not have: carry it anyway.
      const orphan = valueFromInfo(vi);
      orphan.graph = g;
      g.valueInfo.push(orphan);
    }
  }
  g.outputs = gp.output.map((vi) => {
    const v = resolve(vi.name ?? '');
    // A graph output that is a graph input or an initializer passed through: the definition's
    // type is the value's type; the output's own declaration must not overwrite it.
    if ((g.inputs.includes(v) || v.initializer) && v.type) return v;
    const out = valueFromInfo(vi, v);
    remember(out, vi);
    return out;
  });
  return g;
}

function attributeFromProto(ap: AttributeProto, node: Node, owner: Graph, makeTensor: TensorFactory) {
  const where = () => `${node.describe()} attribute ${quote(ap.name ?? '')}`;
  if (ap.type === AttributeType.GRAPH && !ap.g) throw new ModcError(`${where()} has type GRAPH but holds no graph`);
  const stray = strayAttributeField(ap);
  if (stray) {
    const typeName = Object.entries(AttributeType).find(([, v]) => v === ap.type)?.[0] ?? String(ap.type);
    throw new ModcError(`${where()} has type ${typeName} but also holds a value in field '${stray}'`);
  }
  if (ap.g) {
    if (has(ap, 'type') && ap.type !== AttributeType.GRAPH) throw new ModcError(`${where()} holds a graph but its type is ${ap.type}, not GRAPH`);
    return { proto: ap, graph: graphFromProto(ap.g, owner, makeTensor) };
  }
  if (ap.t) checkTensorProto(ap.t, `${where()} tensor`);
  ap.tensors.forEach((t, i) => checkTensorProto(t, `${where()} tensor ${i}`));
  if (ap.t?.data_location === 1 || ap.tensors.some((t) => t.data_location === 1)) {
    throw new ModcError(`${where()}: a tensor attribute stored as external data is not supported (only initializers may use external data)`);
  }
  if (ap.graphs.length) {
    return { proto: ap, graphs: ap.graphs.map((sg) => graphFromProto(sg, owner, makeTensor)) };
  }
  return { proto: ap };
}

/** The data field of each attribute type (AttributeProto.type -> field). */
const ATTRIBUTE_FIELD: Record<number, string> = {
  [AttributeType.FLOAT]: 'f',
  [AttributeType.INT]: 'i',
  [AttributeType.STRING]: 's',
  [AttributeType.TENSOR]: 't',
  [AttributeType.GRAPH]: 'g',
  [AttributeType.SPARSE_TENSOR]: 'sparse_tensor',
  [AttributeType.TYPE_PROTO]: 'tp',
  [AttributeType.FLOATS]: 'floats',
  [AttributeType.INTS]: 'ints',
  [AttributeType.STRINGS]: 'strings',
  [AttributeType.TENSORS]: 'tensors',
  [AttributeType.GRAPHS]: 'graphs',
  [AttributeType.SPARSE_TENSORS]: 'sparse_tensors',
  [AttributeType.TYPE_PROTOS]: 'type_protos',
};

/**
 * A data field set on an attribute besides the one its type names (ONNX Runtime refuses the
 * model: "type field and data field mismatch"), or null.
 */
function strayAttributeField(ap: AttributeProto): string | null {
  if (!has(ap, 'type') || !ap.type) return null;
  const own = ATTRIBUTE_FIELD[ap.type];
  for (const field of Object.values(ATTRIBUTE_FIELD)) {
    if (field === own) continue;
    const value = (ap as unknown as Record<string, unknown>)[field];
    const set = Array.isArray(value) ? value.length > 0 : has(ap, field) && value !== null && value !== undefined;
    if (set) return field;
  }
  return null;
}

function functionFromProto(fp: FunctionProto, makeTensor: TensorFactory): OnnxFunction {
  const body = new Graph(fp.name ?? '');
  const fn = new OnnxFunction(fp.domain ?? '', fp.name ?? '', body);
  fn.source = fp;
  if (has(fp, 'overload')) fn.overload = fp.overload;
  if (has(fp, 'doc_string')) fn.docString = fp.doc_string;
  fn.metadataProps = [...fp.metadata_props];
  fn.attributeNames = [...fp.attribute];
  fn.attributeProtos = [...fp.attribute_proto];
  fn.opsetImports = [...fp.opset_import];
  const asGraph = {
    node: fp.node,
    name: fp.name,
    initializer: [],
    sparse_initializer: [],
    input: fp.input.map((name) => ({ name, metadata_props: [] })),
    output: fp.output.map((name) => ({ name, metadata_props: [] })),
    value_info: fp.value_info,
    quantization_annotation: [],
    metadata_props: [],
  } as unknown as GraphProto;
  const parsed = graphFromProto(asGraph, null, makeTensor);
  body.inputs = parsed.inputs;
  body.outputs = parsed.outputs;
  body.setNodes([...parsed.nodes]);
  body.valueInfo = parsed.valueInfo;
  for (const v of parsed.definedValues()) {
    v.graph = body;
    body.claimName(v.name);
  }
  return fn;
}

// ---------------------------------------------------------------------------------------------
// IR -> proto

/** Copies the loaded proto's own fields (or starts empty) so unmodelled fields survive. */
function base(obj: object): Record<string, unknown> {
  return copyMessage(sourceOf(obj));
}

/** Sets a string field, keeping "present but empty" only when the source had it present. */
function setString(out: Record<string, unknown>, field: string, value: string | undefined, obj: object): void {
  const src = sourceOf(obj) as Record<string, unknown> | undefined;
  if (value === undefined || (value === '' && !(src && has(src, field)))) delete out[field];
  else out[field] = value;
}

export function modelToProto(model: Model, tensorProto: (v: Value) => TensorProto): ModelProto {
  const out = copyMessage(model.source);
  out.ir_version = model.irVersion;
  out.opset_import = model.opsetImports;
  for (const [field, value] of [
    ['producer_name', model.producerName],
    ['producer_version', model.producerVersion],
    ['domain', model.domain],
    ['doc_string', model.docString],
  ] as const) {
    if (value === undefined) delete out[field];
    else out[field] = value;
  }
  if (model.modelVersion === undefined) delete out.model_version;
  else out.model_version = model.modelVersion;
  out.graph = graphToProto(model.graph, tensorProto);
  out.metadata_props = model.metadataProps;
  out.training_info = model.trainingInfo;
  out.functions = model.functions.map((f) => functionToProto(f, tensorProto));
  out.configuration = model.configuration;
  return out as unknown as ModelProto;
}

function valueInfoToProto(v: Value): ValueInfoProto {
  const out = base(v);
  out.name = v.name;
  if (v.type) out.type = v.type;
  else delete out.type;
  setString(out, 'doc_string', v.docString, v);
  out.metadata_props = v.metadataProps;
  return out as unknown as ValueInfoProto;
}

export function graphToProto(g: Graph, tensorProto: (v: Value) => TensorProto): GraphProto {
  const out = base(g);
  out.node = g.nodes.map((n) => nodeToProto(n, tensorProto));
  setString(out, 'name', g.name, g);
  out.initializer = [...g.initializers.values()].map(tensorProto);
  out.sparse_initializer = g.sparseInitializers;
  setString(out, 'doc_string', g.docString, g);
  out.input = g.inputs.map(valueInfoToProto);
  out.output = g.outputs.map(valueInfoToProto);
  out.value_info = g.valueInfo.map(valueInfoToProto);
  out.quantization_annotation = g.quantizationAnnotation;
  out.metadata_props = g.metadataProps;
  return out as unknown as GraphProto;
}

function nodeToProto(n: Node, tensorProto: (v: Value) => TensorProto): NodeProto {
  const out = base(n);
  out.input = n.inputs.map((v) => (v ? v.name : ''));
  out.output = n.outputs.map((v) => v.name);
  setString(out, 'name', n.name, n);
  out.op_type = n.opType;
  setString(out, 'domain', n.domain, n);
  setString(out, 'overload', n.overload, n);
  out.attribute = [...n.attributes.values()].map((a) => {
    if (a.graph) return { ...copyMessage(a.proto), g: graphToProto(a.graph, tensorProto) };
    if (a.graphs) return { ...copyMessage(a.proto), graphs: a.graphs.map((sg) => graphToProto(sg, tensorProto)) };
    return a.proto;
  });
  setString(out, 'doc_string', n.docString, n);
  out.metadata_props = n.metadataProps;
  out.device_configurations = n.deviceConfigurations;
  return out as unknown as NodeProto;
}

function functionToProto(f: OnnxFunction, tensorProto: (v: Value) => TensorProto): FunctionProto {
  const out = copyMessage(f.source);
  out.name = f.name;
  out.domain = f.domain;
  if (f.overload === undefined) delete out.overload;
  else out.overload = f.overload;
  out.input = f.body.inputs.map((v) => v.name);
  out.output = f.body.outputs.map((v) => v.name);
  out.attribute = f.attributeNames;
  out.attribute_proto = f.attributeProtos;
  out.node = f.body.nodes.map((n) => nodeToProto(n, tensorProto));
  if (f.docString === undefined) delete out.doc_string;
  else out.doc_string = f.docString;
  out.opset_import = f.opsetImports;
  out.value_info = f.body.valueInfo.map(valueInfoToProto);
  out.metadata_props = f.metadataProps;
  return out as unknown as FunctionProto;
}

/**
 * A copy of `model` that passes can rewrite while the original stays as it is: the graph, its
 * nodes and values are new; tensors, which no pass changes in place, are shared.
 */
export function cloneModel(model: Model): Model {
  const tensors = new Map<TensorProto, Tensor>();
  const proto = modelToProto(model, (v) => {
    const t = v.initializer!;
    const p = t.proto.name === v.name ? t.proto : ({ ...copyMessage(t.proto), name: v.name } as unknown as TensorProto);
    tensors.set(p, t);
    return p;
  });
  const copy = modelFromProto(proto, (tp) => tensors.get(tp) ?? new Tensor(tp));
  copy.sourcePath = model.sourcePath;
  copy.baseDir = model.baseDir;
  return copy;
}
