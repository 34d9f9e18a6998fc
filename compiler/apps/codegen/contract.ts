/**
 * What a generated session wrapper needs to know about a model: every graph input and output
 * (name, ONNX Runtime element type, symbolic shape), the decoder I/O contract (runtime/decoder-io.ts:
 * ids, mask, positions, per-layer caches and their lengths, extra state), and the routing and
 * logits metadata a compiled model records. Plain data, read from the model only.
 */
import { ModcError } from '../../core/errors.js';
import { DataType, dataTypeName } from '../../core/ir/dtype.js';
import type { Value } from '../../core/ir/graph.js';
import type { Model } from '../../core/ir/model.js';
import { logitsPositions, type LogitsPositions } from '../../metadata/logits-metadata.js';
import { readRoutingMetadata, type RoutingMetadata } from '../../metadata/routing-metadata.js';
import { decoderIo, type DecoderIo } from '../../metadata/decoder-io.js';

/** onnxruntime-node's names for the element types a graph input or output may have. */
const ORT_TYPES: Record<number, string> = {
  [DataType.FLOAT]: 'float32',
  [DataType.FLOAT16]: 'float16',
  [DataType.DOUBLE]: 'float64',
  [DataType.INT8]: 'int8',
  [DataType.UINT8]: 'uint8',
  [DataType.INT16]: 'int16',
  [DataType.UINT16]: 'uint16',
  [DataType.INT32]: 'int32',
  [DataType.UINT32]: 'uint32',
  [DataType.INT64]: 'int64',
  [DataType.UINT64]: 'uint64',
  [DataType.BOOL]: 'bool',
  [DataType.STRING]: 'string',
};

/** A dim: a number when static, a name when symbolic, null when unknown. */
export type TensorDim = number | string | null;

export interface TensorSignature {
  name: string;
  /** onnxruntime-node's element type name ('float32', 'int64', ...). */
  type: string;
  /** null when the graph does not give a rank. */
  shape: TensorDim[] | null;
}

export interface SessionContract {
  /** The model file's base name, for the generated doc comment. */
  source: string;
  inputs: TensorSignature[];
  outputs: TensorSignature[];
  io: DecoderIo;
  routing: RoutingMetadata | null;
  logits: LogitsPositions;
}

function signature(v: Value): TensorSignature {
  const code = v.dtype;
  const type = code === undefined ? undefined : ORT_TYPES[code];
  if (!type)
    throw new ModcError(
      `graph I/O ${JSON.stringify(v.name)} has element type ${code === undefined ? 'unknown' : dataTypeName(code)}, which onnxruntime-node cannot feed`,
    );
  return { name: v.name, type, shape: v.shape ?? null };
}

export function sessionContract(model: Model, source: string): SessionContract {
  const g = model.graph;
  const io = decoderIo(model);
  const fixed = io.kv.find((b) => b.layout === 'static-BTH' || b.layout === 'static-BHTD');
  if (fixed)
    throw new ModcError(`codegen does not support static KV caches yet (${fixed.pastKey} is a TensorScatter buffer): drive this model with ModSession`);
  return {
    source,
    inputs: g.inputs.filter((v) => !g.initializers.has(v.name)).map(signature),
    outputs: g.outputs.map(signature),
    io,
    routing: readRoutingMetadata(model),
    logits: logitsPositions(model),
  };
}
