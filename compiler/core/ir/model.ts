/** Model and model-local Function: the top of the IR. */
import type { AttributeProto, Int64, OperatorSetIdProto, StringStringEntryProto } from '../proto/index.js';
import { int64ToNumber } from '../proto/index.js';
import { Graph, type Node } from './graph.js';

/** A model-local function (FunctionProto): its body is a Graph whose inputs/outputs are untyped. */
export class OnnxFunction {
  domain: string;
  name: string;
  overload: string | undefined;
  docString: string | undefined;
  metadataProps: StringStringEntryProto[] = [];
  attributeNames: string[] = [];
  attributeProtos: AttributeProto[] = [];
  opsetImports: OperatorSetIdProto[] = [];
  readonly body: Graph;
  /** The proto this was loaded from, so unchanged fields keep their presence on save. */
  source: object | undefined;

  constructor(domain: string, name: string, body?: Graph) {
    this.domain = domain;
    this.name = name;
    this.body = body ?? new Graph(name);
  }

  get key(): string {
    return `${this.domain}::${this.name}${this.overload ? `::${this.overload}` : ''}`;
  }
}

export class Model {
  irVersion: number;
  opsetImports: OperatorSetIdProto[] = [];
  producerName: string | undefined;
  producerVersion: string | undefined;
  domain: string | undefined;
  modelVersion: Int64 | undefined;
  docString: string | undefined;
  metadataProps: StringStringEntryProto[] = [];
  /** training_info and configuration, carried through verbatim. */
  trainingInfo: unknown[] = [];
  configuration: unknown[] = [];
  graph: Graph;
  functions: OnnxFunction[] = [];
  /** The file this model was loaded from and its folder (external data resolves against it). */
  sourcePath: string | undefined;
  baseDir: string | undefined;
  source: object | undefined;

  constructor(graph: Graph, irVersion = 10) {
    this.graph = graph;
    this.irVersion = irVersion;
  }

  /** The opset version imported for a domain ('' and 'ai.onnx' are the same domain). */
  opsetVersion(domain: string): number | undefined {
    const norm = (d: string | undefined) => (d === 'ai.onnx' ? '' : (d ?? ''));
    const entry = this.opsetImports.find((o) => norm(o.domain) === norm(domain));
    return entry ? int64ToNumber(entry.version) : undefined;
  }

  /** Imports a domain at a version if it is not imported yet. */
  importOpset(domain: string, version: number): void {
    if (this.opsetVersion(domain) === undefined) this.opsetImports.push({ domain, version });
  }

  findFunction(domain: string, name: string, overload?: string): OnnxFunction | undefined {
    return this.functions.find((f) => f.domain === domain && f.name === name && (f.overload ?? '') === (overload ?? ''));
  }

  /** Every node of the main graph and its subgraphs. */
  *allNodes(): Iterable<Node> {
    yield* this.graph.allNodes();
  }
}
