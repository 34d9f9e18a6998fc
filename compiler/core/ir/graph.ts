/**
 * The graph IR: Values know their producer and their uses, Nodes hold Values, Graphs own Nodes.
 *
 * Whatever the IR does not interpret (doc strings, metadata, device configurations, value_info
 * details, attribute doc strings) is carried on the objects untouched so that load -> save
 * loses nothing.
 */
import type { AttributeProto, StringStringEntryProto, TypeProto } from '../proto/index.js';
import { AttributeType, has, int64ToNumber } from '../proto/index.js';
import { ModcError, escapeText, quote } from '../errors.js';
import type { Tensor } from './tensor.js';

export type Dim = number | string | null;

export interface Use {
  node: Node;
  index: number;
}

export class Value {
  name: string;
  /** The ONNX type (tensor element type and shape), when known. */
  type: TypeProto | undefined;
  docString: string | undefined;
  metadataProps: StringStringEntryProto[] = [];
  producer: Node | null = null;
  /** Output slot in the producer. */
  producerIndex = -1;
  /** Constant data when this value is an initializer. */
  initializer: Tensor | null = null;
  /** The graph whose scope defines this value (for outer-scope references from subgraphs). */
  graph: Graph | null = null;
  readonly uses = new Set<Use>();

  constructor(name: string, type?: TypeProto) {
    this.name = name;
    this.type = type;
  }

  /** Element type code, or undefined if the value has no tensor type. */
  get dtype(): number | undefined {
    return this.type?.tensor_type?.elem_type ?? this.initializer?.dataType;
  }

  /** Shape with symbolic dims as strings and unknown dims as null; undefined when rank is unknown. */
  get shape(): Dim[] | undefined {
    const s = this.type?.tensor_type?.shape;
    if (s) return s.dim.map((d) => (has(d, 'dim_value') ? int64ToNumber(d.dim_value) : has(d, 'dim_param') ? d.dim_param! : null));
    if (this.initializer) return this.initializer.dims;
    return undefined;
  }

  get isConstant(): boolean {
    return this.initializer !== null;
  }

  /** Nodes that read this value, in no particular order. */
  consumers(): Node[] {
    return [...new Set([...this.uses].map((u) => u.node))];
  }

  /** Rewires every node input and every graph output that reads this value to `other`. */
  replaceAllUsesWith(other: Value): void {
    if (other === this) return;
    for (const use of [...this.uses]) use.node.setInput(use.index, other);
    for (const g of this.graphsUsingAsOutput()) {
      g.outputs = g.outputs.map((v) => (v === this ? other : v));
    }
  }

  private graphsUsingAsOutput(): Graph[] {
    const out: Graph[] = [];
    for (let g: Graph | null = this.graph; g; g = g.parent) if (g.outputs.includes(this)) out.push(g);
    if (this.producer?.graph && this.producer.graph.outputs.includes(this) && !out.includes(this.producer.graph)) out.push(this.producer.graph);
    return out;
  }

  toString(): string {
    return `%${escapeText(this.name)}`;
  }
}

/** An attribute: the proto with subgraphs lifted into IR graphs. */
export interface Attribute {
  proto: AttributeProto;
  graph?: Graph;
  graphs?: Graph[];
}

export class Node {
  opType: string;
  domain: string;
  name: string;
  overload: string | undefined;
  docString: string | undefined;
  metadataProps: StringStringEntryProto[] = [];
  /** Kept verbatim (IR 11 sharding configuration). */
  deviceConfigurations: unknown[] = [];
  readonly attributes = new Map<string, Attribute>();
  graph: Graph | null = null;
  private _inputs: (Value | null)[] = [];
  private _outputs: Value[] = [];
  private _uses: (Use | null)[] = [];

  constructor(opType: string, domain = '', name = '') {
    this.opType = opType;
    this.domain = domain;
    this.name = name;
  }

  get inputs(): readonly (Value | null)[] {
    return this._inputs;
  }

  get outputs(): readonly Value[] {
    return this._outputs;
  }

  /** `domain::op` for diagnostics, with the node name when it has one. */
  describe(): string {
    const op = escapeText(this.domain && this.domain !== 'ai.onnx' ? `${this.domain}::${this.opType}` : this.opType);
    return this.name ? `${op} node ${quote(this.name)}` : `${op} node producing ${this._outputs.map((v) => quote(v.name)).join(', ')}`;
  }

  input(i: number): Value | null {
    return this._inputs[i] ?? null;
  }

  output(i: number): Value {
    const v = this._outputs[i];
    if (!v) throw new ModcError(`${this.describe()} has no output ${i}`);
    return v;
  }

  setInput(index: number, given: Value | null): void {
    // A caller copying slots past the end of another node's inputs passes undefined: an omitted input.
    const value = given ?? null;
    const old = this._uses[index];
    if (old) this._inputs[index]!.uses.delete(old);
    while (this._inputs.length <= index) {
      this._inputs.push(null);
      this._uses.push(null);
    }
    this._inputs[index] = value;
    if (value) {
      const use = { node: this, index };
      value.uses.add(use);
      this._uses[index] = use;
    } else {
      this._uses[index] = null;
    }
  }

  setInputs(values: readonly (Value | null)[]): void {
    this.detachInputs();
    values.forEach((v, i) => this.setInput(i, v));
    this._inputs.length = values.length;
    this._uses.length = values.length;
  }

  /** Drops this node's uses of its inputs (before removal). */
  detachInputs(): void {
    for (let i = 0; i < this._inputs.length; i++) {
      const u = this._uses[i];
      if (u) this._inputs[i]!.uses.delete(u);
    }
    this._inputs = [];
    this._uses = [];
  }

  addOutput(value: Value): Value {
    value.producer = this;
    value.producerIndex = this._outputs.length;
    value.graph = this.graph;
    this._outputs.push(value);
    return value;
  }

  setOutputs(values: Value[]): void {
    this._outputs = [];
    values.forEach((v) => this.addOutput(v));
  }

  attr(name: string): AttributeProto | undefined {
    return this.attributes.get(name)?.proto;
  }

  attrInt(name: string, fallback: number): number;
  attrInt(name: string): number | undefined;
  attrInt(name: string, fallback?: number): number | undefined {
    const a = this.attr(name);
    return a && has(a, 'i') ? int64ToNumber(a.i) : fallback;
  }

  attrFloat(name: string, fallback: number): number;
  attrFloat(name: string): number | undefined;
  attrFloat(name: string, fallback?: number): number | undefined {
    const a = this.attr(name);
    return a && has(a, 'f') ? a.f! : fallback;
  }

  attrInts(name: string): number[] | undefined {
    const a = this.attr(name);
    return a ? a.ints.map(int64ToNumber) : undefined;
  }

  attrString(name: string): string | undefined {
    const a = this.attr(name);
    return a?.s ? Buffer.from(a.s).toString('utf8') : undefined;
  }

  setAttr(proto: AttributeProto, graph?: Graph): void {
    const name = proto.name ?? '';
    if (graph) graph.parent = this.graph;
    this.attributes.set(name, graph ? { proto, graph } : { proto });
  }

  /** Subgraphs held in this node's attributes (If branches, Loop/Scan bodies). */
  subgraphs(): Graph[] {
    const out: Graph[] = [];
    for (const a of this.attributes.values()) {
      if (a.graph) out.push(a.graph);
      if (a.graphs) out.push(...a.graphs);
    }
    return out;
  }

  toString(): string {
    const ins = this._inputs.map((v) => (v ? v.toString() : '""')).join(', ');
    const outs = this._outputs.map((v) => v.toString()).join(', ');
    return `${outs} = ${this.describe()}(${ins})`;
  }
}

/**
 * A graph: an ordered node list with inputs, outputs, initializers and the bookkeeping ONNX
 * keeps beside them. Subgraphs point at their parent so outer-scope values resolve.
 */
export class Graph {
  name: string;
  docString: string | undefined;
  metadataProps: StringStringEntryProto[] = [];
  inputs: Value[] = [];
  outputs: Value[] = [];
  /** Initializers in file order (name -> value). */
  readonly initializers = new Map<string, Value>();
  /** Sparse initializers, kept verbatim. */
  sparseInitializers: unknown[] = [];
  /** quantization_annotation entries, kept verbatim. */
  quantizationAnnotation: unknown[] = [];
  /** Values annotated by value_info, in file order. */
  valueInfo: Value[] = [];
  parent: Graph | null = null;
  private _nodes: Node[] = [];
  private names: Set<string>;

  constructor(name = '', parent: Graph | null = null) {
    this.name = name;
    this.parent = parent;
    this.names = parent ? parent.names : new Set();
  }

  get nodes(): readonly Node[] {
    return this._nodes;
  }

  /** Registers a name as taken (loading uses this; fresh names come from uniqueName). */
  claimName(name: string): void {
    if (name) this.names.add(name);
  }

  /** A value or node name not yet used anywhere in this graph's model scope. */
  uniqueName(base: string): string {
    if (!this.names.has(base)) {
      this.names.add(base);
      return base;
    }
    for (let i = 1; ; i++) {
      const candidate = `${base}_${i}`;
      if (!this.names.has(candidate)) {
        this.names.add(candidate);
        return candidate;
      }
    }
  }

  /** A fresh value with a unique name derived from `base`. */
  newValue(base: string, type?: TypeProto): Value {
    const v = new Value(this.uniqueName(base), type);
    v.graph = this;
    return v;
  }

  addInput(value: Value): Value {
    value.graph = this;
    this.claimName(value.name);
    this.inputs.push(value);
    return value;
  }

  addInitializer(value: Value, tensor: Tensor): Value {
    value.initializer = tensor;
    value.graph = this;
    this.claimName(value.name);
    this.initializers.set(value.name, value);
    return value;
  }

  removeInitializer(value: Value): void {
    this.initializers.delete(value.name);
    value.initializer = null;
  }

  /**
   * Creates a node and places it (at the end unless `before`/`after` is given).
   * `outputs` is a count of fresh outputs or explicit values.
   */
  addNode(
    opType: string,
    inputs: readonly (Value | null)[],
    outputs: number | Value[] = 1,
    opts: { domain?: string; name?: string; before?: Node; after?: Node; attributes?: AttributeProto[] } = {},
  ): Node {
    const node = new Node(opType, opts.domain ?? '', opts.name ? this.uniqueName(opts.name) : '');
    node.graph = this;
    node.setInputs(inputs);
    const outs = typeof outputs === 'number' ? Array.from({ length: outputs }, () => this.newValue(`${opts.name ?? opType.toLowerCase()}_out`)) : outputs;
    node.setOutputs(outs);
    for (const a of opts.attributes ?? []) node.setAttr(a);
    this.insert(node, opts);
    return node;
  }

  /** Places an existing (detached) node. */
  insert(node: Node, where: { before?: Node; after?: Node } = {}): void {
    node.graph = this;
    for (const v of node.outputs) v.graph = this;
    for (const g of node.subgraphs()) g.parent = this;
    if (where.before) this._nodes.splice(this.indexOf(where.before), 0, node);
    else if (where.after) this._nodes.splice(this.indexOf(where.after) + 1, 0, node);
    else this._nodes.push(node);
  }

  indexOf(node: Node): number {
    const i = this._nodes.indexOf(node);
    if (i < 0) throw new ModcError(`${node.describe()} is not in graph ${quote(this.name)}`);
    return i;
  }

  /** Removes a node whose outputs are no longer used (or `force` to drop them anyway). */
  removeNode(node: Node, force = false): void {
    if (!force) {
      for (const v of node.outputs) {
        if (v.uses.size > 0 || this.outputs.includes(v)) throw new ModcError(`cannot remove ${node.describe()}: its output ${quote(v.name)} is still used`);
      }
    }
    node.detachInputs();
    this._nodes.splice(this.indexOf(node), 1);
    node.graph = null;
  }

  /** Replaces the node list wholesale (used by sorting and by loaders). */
  setNodes(nodes: Node[]): void {
    this._nodes = nodes;
    for (const n of nodes) n.graph = this;
  }

  /**
   * Moves `nodes` (keeping this graph's order) to the end of `target`, typically a subgraph of
   * this graph: they keep reading the same values, now from the outer scope.
   */
  moveNodesTo(nodes: ReadonlySet<Node>, target: Graph): void {
    const moving = this._nodes.filter((n) => nodes.has(n));
    this._nodes = this._nodes.filter((n) => !nodes.has(n));
    for (const n of moving) target.insert(n);
  }

  /** Every value defined in this graph's own scope: inputs, initializers, node outputs. */
  *definedValues(): Iterable<Value> {
    yield* this.inputs;
    yield* this.initializers.values();
    for (const n of this._nodes) yield* n.outputs;
  }

  /**
   * Orders nodes so that every producer precedes its consumers; among ready nodes the current
   * order wins, so an already sorted graph is unchanged. Throws on a cycle.
   */
  toposort(): this {
    const nodes = this._nodes;
    const position = new Map(nodes.map((n, i) => [n, i]));
    const pending = new Map<Node, number>();
    const dependents = new Map<Node, Node[]>();
    for (const n of nodes) {
      const deps = new Set<Node>();
      for (const v of externalInputsOf(n)) {
        const p = v.producer;
        if (p && p.graph === this) deps.add(p);
      }
      pending.set(n, deps.size);
      for (const d of deps) {
        const list = dependents.get(d) ?? [];
        list.push(n);
        dependents.set(d, list);
      }
    }
    // A binary heap keyed on original position keeps the sort stable and O(n log n).
    const heap: Node[] = [];
    const less = (a: Node, b: Node) => position.get(a)! < position.get(b)!;
    const push = (n: Node) => {
      heap.push(n);
      for (let i = heap.length - 1; i > 0;) {
        const p = (i - 1) >> 1;
        if (!less(heap[i]!, heap[p]!)) break;
        [heap[i], heap[p]] = [heap[p]!, heap[i]!];
        i = p;
      }
    };
    const pop = (): Node => {
      const top = heap[0]!;
      const last = heap.pop()!;
      if (heap.length > 0) {
        heap[0] = last;
        for (let i = 0; ;) {
          const l = 2 * i + 1;
          const r = l + 1;
          let m = i;
          if (l < heap.length && less(heap[l]!, heap[m]!)) m = l;
          if (r < heap.length && less(heap[r]!, heap[m]!)) m = r;
          if (m === i) break;
          [heap[i], heap[m]] = [heap[m]!, heap[i]!];
          i = m;
        }
      }
      return top;
    };
    for (const n of nodes) if (pending.get(n) === 0) push(n);
    const sorted: Node[] = [];
    while (heap.length) {
      const n = pop();
      sorted.push(n);
      for (const d of dependents.get(n) ?? []) {
        const left = pending.get(d)! - 1;
        pending.set(d, left);
        if (left === 0) push(d);
      }
    }
    if (sorted.length !== nodes.length) {
      throw new ModcError(`graph ${quote(this.name)} has a cycle through ${this.nodeOnCycle(pending).describe()}`);
    }
    this._nodes = sorted;
    return this;
  }

  /**
   * A node on a true cycle, given the nodes a sort could not place (pending > 0): every such
   * node waits on another unplaced node, so walking back through them must revisit one.
   */
  private nodeOnCycle(pending: ReadonlyMap<Node, number>): Node {
    let n = this._nodes.find((x) => pending.get(x)! > 0)!;
    const seen = new Set<Node>();
    while (!seen.has(n)) {
      seen.add(n);
      const p = externalInputsOf(n)
        .map((v) => v.producer)
        .find((x) => x && x.graph === this && pending.get(x)! > 0);
      if (!p) break;
      n = p;
    }
    return n;
  }

  /**
   * Removes nodes that contribute to no graph output (nodes with no outputs are kept: they may
   * have effects), then initializers nobody reads. Returns how many nodes were removed.
   */
  eliminateDeadCode(opts: { keepInitializers?: boolean } = {}): number {
    const live = new Set<Node>();
    const stack: Value[] = [...this.outputs];
    for (const n of this._nodes)
      if (n.outputs.length === 0) {
        live.add(n);
        stack.push(...externalInputsOf(n));
      }
    while (stack.length) {
      const v = stack.pop()!;
      const p = v.producer;
      if (!p || p.graph !== this || live.has(p)) continue;
      live.add(p);
      stack.push(...externalInputsOf(p));
    }
    const dead = this._nodes.filter((n) => !live.has(n));
    for (const n of dead) n.detachInputs();
    this._nodes = this._nodes.filter((n) => live.has(n));
    if (!opts.keepInitializers) {
      const graphInputs = new Set(this.inputs);
      for (const v of [...this.initializers.values()]) {
        if (v.uses.size === 0 && !this.outputs.includes(v) && !graphInputs.has(v)) this.initializers.delete(v.name);
      }
    }
    this.valueInfo = this.valueInfo.filter((v) => v.producer === null || live.has(v.producer));
    return dead.length;
  }

  /**
   * Copies `nodes` (in order) into this graph before `before` (or at the end). Inputs found in
   * `mapping` are replaced; every cloned output is added to `mapping`. Returns the clones.
   */
  cloneNodes(nodes: readonly Node[], mapping: Map<Value, Value>, opts: { before?: Node; suffix?: string } = {}): Node[] {
    const suffix = opts.suffix ?? '_clone';
    return nodes.map((n) => {
      const outs = n.outputs.map((v) => {
        const c = this.newValue(v.name + suffix, v.type);
        mapping.set(v, c);
        return c;
      });
      const clone = this.addNode(
        n.opType,
        n.inputs.map((v) => (v ? (mapping.get(v) ?? v) : null)),
        outs,
        {
          domain: n.domain,
          name: n.name ? n.name + suffix : undefined,
          before: opts.before,
        },
      );
      for (const [, a] of n.attributes) {
        if (a.graphs) throw new ModcError(`cloning ${n.describe()}: nodes with lists of subgraphs cannot be cloned yet`);
        clone.setAttr(a.proto, a.graph && this.cloneSubgraph(a.graph, mapping, suffix));
      }
      clone.overload = n.overload;
      return clone;
    });
  }

  /** A copy of `sub` (a subgraph of a node being cloned) under this graph; outer values it reads are mapped as the node's inputs are. */
  private cloneSubgraph(sub: Graph, mapping: Map<Value, Value>, suffix: string): Graph {
    const g = new Graph(sub.name + suffix, this);
    for (const v of sub.inputs) mapping.set(v, g.addInput(g.newValue(v.name + suffix, v.type)));
    for (const v of sub.initializers.values()) mapping.set(v, g.addInitializer(g.newValue(v.name + suffix), v.initializer!));
    g.cloneNodes(sub.nodes, mapping, { suffix });
    g.outputs = sub.outputs.map((v) => mapping.get(v) ?? v);
    return g;
  }

  /** Looks a value up by name in this graph's scope and then in its parents'. */
  findValue(name: string): Value | undefined {
    for (let g: Graph | null = this as Graph; g; g = g.parent) {
      for (const v of g.definedValues()) if (v.name === name) return v;
    }
    return undefined;
  }

  /** All nodes, including those in subgraphs, depth first. */
  *allNodes(): Iterable<Node> {
    for (const n of this._nodes) {
      yield n;
      for (const g of n.subgraphs()) yield* g.allNodes();
    }
  }
}

/** Whether `v` is computed from `target` (a backward walk over its producers). */
export function dependsOn(v: Value, target: Value): boolean {
  const stack = [v];
  const seen = new Set<Value>();
  while (stack.length) {
    const x = stack.pop()!;
    if (x === target) return true;
    if (seen.has(x)) continue;
    seen.add(x);
    for (const i of x.producer?.inputs ?? []) if (i) stack.push(i);
  }
  return false;
}

/** The values a node reads, including outer-scope values read inside its subgraphs. */
export function externalInputsOf(node: Node): Value[] {
  const out = node.inputs.filter((v): v is Value => v !== null);
  for (const g of node.subgraphs()) {
    const own = new Set(g.definedValues());
    for (const inner of g.allNodes()) {
      for (const v of inner.inputs) if (v && !own.has(v) && v.graph !== g && !isInside(v.graph, g)) out.push(v);
    }
    for (const v of g.outputs) if (!own.has(v) && !isInside(v.graph, g)) out.push(v);
  }
  return out;
}

function isInside(scope: Graph | null, root: Graph): boolean {
  for (let g = scope; g; g = g.parent) if (g === root) return true;
  return false;
}

/** An empty GRAPH attribute named `name` (an If's then_branch, a Loop's body): Node.setAttr attaches the graph. */
export function graphAttribute(name: string): AttributeProto {
  return { name, type: AttributeType.GRAPH, floats: [], ints: [], strings: [], tensors: [], graphs: [], sparse_tensors: [], type_protos: [] } as AttributeProto;
}

/** Builds an AttributeProto from a plain value. */
export function attribute(name: string, value: number | string | number[] | string[] | Tensor, kind?: 'int' | 'float'): AttributeProto {
  const a = { name } as AttributeProto;
  a.floats = [];
  a.ints = [];
  a.strings = [];
  a.tensors = [];
  a.graphs = [];
  a.sparse_tensors = [];
  a.type_protos = [];
  if (typeof value === 'number') {
    if (kind === 'float' || (kind !== 'int' && !Number.isInteger(value))) {
      a.type = AttributeType.FLOAT;
      a.f = value;
    } else {
      a.type = AttributeType.INT;
      a.i = value;
    }
  } else if (typeof value === 'string') {
    a.type = AttributeType.STRING;
    a.s = Buffer.from(value, 'utf8');
  } else if (Array.isArray(value)) {
    if (value.length > 0 && typeof value[0] === 'string') {
      a.type = AttributeType.STRINGS;
      a.strings = (value as string[]).map((s) => Buffer.from(s, 'utf8'));
    } else if (kind === 'float') {
      a.type = AttributeType.FLOATS;
      a.floats = value as number[];
    } else {
      a.type = AttributeType.INTS;
      a.ints = value as number[];
    }
  } else {
    a.type = AttributeType.TENSOR;
    a.t = value.proto;
  }
  return a;
}

/** A tensor type of element type `elem` and these dims (a number is a fixed size, a string a named one). */
export function tensorType(elem: number, dims: readonly (number | string)[]): TypeProto {
  return { tensor_type: { elem_type: elem, shape: { dim: dims.map((d) => (typeof d === 'number' ? { dim_value: d } : { dim_param: d })) } } } as TypeProto;
}

/** A copy of `type` with dim `axis` renamed `name` (types can be shared objects: never edit one in place). */
export function withDim(type: TypeProto | undefined, axis: number, name: string): TypeProto | undefined {
  const t = type?.tensor_type;
  if (!t?.shape) return type;
  return { tensor_type: { elem_type: t.elem_type, shape: { dim: t.shape.dim.map((d, i) => (i === axis ? { dim_param: name } : d)) } } } as TypeProto;
}
