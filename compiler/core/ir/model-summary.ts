/** Model facts for `modc inspect`: versions, I/O, op histogram, parameters. Data only; the CLI formats it. */
import { dataTypeName } from './dtype.js';
import type { Value } from './graph.js';
import type { Model } from './model.js';
import { int64ToNumber } from '../proto/index.js';

export interface TensorSignature {
  name: string;
  dtype: string;
  shape: (number | string | null)[] | null;
}

export interface ModelSummary {
  path: string | null;
  irVersion: number;
  opsets: { domain: string; version: number }[];
  producer: { name: string; version: string };
  inputs: TensorSignature[];
  outputs: TensorSignature[];
  nodes: number;
  /** op histogram: domain ('' = ai.onnx) -> op type -> count, including subgraph nodes. */
  ops: Record<string, Record<string, number>>;
  functions: string[];
  parameters: { tensors: number; elements: number; bytes: number; internalBytes: number; externalBytes: number; externalFiles: string[] };
}

export function signature(v: Value): TensorSignature {
  return { name: v.name, dtype: v.dtype === undefined ? 'unknown' : dataTypeName(v.dtype), shape: v.shape ?? null };
}

export function summarizeModel(model: Model): ModelSummary {
  const g = model.graph;
  const ops: Record<string, Record<string, number>> = {};
  let nodes = 0;
  for (const n of model.allNodes()) {
    nodes++;
    const domain = n.domain === 'ai.onnx' ? '' : n.domain;
    const byOp = (ops[domain] ??= {});
    byOp[n.opType] = (byOp[n.opType] ?? 0) + 1;
  }
  const params = { tensors: 0, elements: 0, bytes: 0, internalBytes: 0, externalBytes: 0, externalFiles: [] as string[] };
  const files = new Set<string>();
  for (const v of g.initializers.values()) {
    const t = v.initializer;
    if (!t) continue; // a library edit left a value without data; the verifier names it
    params.tensors++;
    params.elements += t.size;
    params.bytes += t.byteLength;
    if (t.external) {
      params.externalBytes += t.byteLength;
      files.add(t.external.location);
    } else {
      params.internalBytes += t.byteLength;
    }
  }
  params.externalFiles = [...files];
  return {
    path: model.sourcePath ?? null,
    irVersion: model.irVersion,
    opsets: model.opsetImports.map((o) => ({ domain: o.domain ?? '', version: int64ToNumber(o.version) })),
    producer: { name: model.producerName ?? '', version: model.producerVersion ?? '' },
    inputs: g.inputs.filter((v) => !g.initializers.has(v.name)).map(signature),
    outputs: g.outputs.map(signature),
    nodes,
    ops,
    functions: model.functions.map((f) => f.key),
    parameters: params,
  };
}
