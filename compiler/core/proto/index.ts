/**
 * ONNX protobuf codec: decode and encode ModelProto (and friends) with protobufjs reflection
 * over the full current schema, so no field of IR versions 3 to 11 is dropped.
 *
 * Messages are protobufjs message instances with the ONNX field names (keepCase). int64 fields
 * arrive as `Long` (values like INT64_MAX in Slice ends must survive); use `int64ToNumber` /
 * `int64ToBigInt` to read them and plain numbers or bigints to write them.
 */
import protobuf from 'protobufjs';
import Long from 'long';
import { ONNX_PROTO } from './onnx-schema.js';

export type Int64 = number | Long;

export interface StringStringEntryProto {
  key?: string;
  value?: string;
}
export interface OperatorSetIdProto {
  domain?: string;
  version?: Int64;
}

export interface TensorShapeDimProto {
  dim_value?: Int64;
  dim_param?: string;
  denotation?: string;
  value?: string;
}
export interface TensorShapeProto {
  dim: TensorShapeDimProto[];
}
export interface TypeProto {
  tensor_type?: { elem_type?: number; shape?: TensorShapeProto };
  sequence_type?: { elem_type?: TypeProto };
  map_type?: { key_type?: number; value_type?: TypeProto };
  optional_type?: { elem_type?: TypeProto };
  sparse_tensor_type?: { elem_type?: number; shape?: TensorShapeProto };
  opaque_type?: { domain?: string; name?: string };
  denotation?: string;
  value?: string;
}
export interface ValueInfoProto {
  name?: string;
  type?: TypeProto;
  doc_string?: string;
  metadata_props: StringStringEntryProto[];
}

export interface TensorProto {
  dims: Int64[];
  data_type?: number;
  segment?: { begin?: Int64; end?: Int64 };
  float_data: number[];
  int32_data: number[];
  string_data: Uint8Array[];
  int64_data: Int64[];
  name?: string;
  doc_string?: string;
  raw_data?: Uint8Array;
  external_data: StringStringEntryProto[];
  data_location?: number;
  double_data: number[];
  uint64_data: Int64[];
  metadata_props: StringStringEntryProto[];
}
export interface SparseTensorProto {
  values?: TensorProto;
  indices?: TensorProto;
  dims: Int64[];
}

export interface AttributeProto {
  name?: string;
  ref_attr_name?: string;
  doc_string?: string;
  type?: number;
  f?: number;
  i?: Int64;
  s?: Uint8Array;
  t?: TensorProto;
  g?: GraphProto;
  sparse_tensor?: SparseTensorProto;
  tp?: TypeProto;
  floats: number[];
  ints: Int64[];
  strings: Uint8Array[];
  tensors: TensorProto[];
  graphs: GraphProto[];
  sparse_tensors: SparseTensorProto[];
  type_protos: TypeProto[];
}

export interface NodeProto {
  input: string[];
  output: string[];
  name?: string;
  op_type?: string;
  domain?: string;
  overload?: string;
  attribute: AttributeProto[];
  doc_string?: string;
  metadata_props: StringStringEntryProto[];
  device_configurations: unknown[];
}

export interface GraphProto {
  node: NodeProto[];
  name?: string;
  initializer: TensorProto[];
  sparse_initializer: SparseTensorProto[];
  doc_string?: string;
  input: ValueInfoProto[];
  output: ValueInfoProto[];
  value_info: ValueInfoProto[];
  quantization_annotation: unknown[];
  metadata_props: StringStringEntryProto[];
}

export interface FunctionProto {
  name?: string;
  input: string[];
  output: string[];
  attribute: string[];
  attribute_proto: AttributeProto[];
  node: NodeProto[];
  doc_string?: string;
  opset_import: OperatorSetIdProto[];
  domain?: string;
  overload?: string;
  value_info: ValueInfoProto[];
  metadata_props: StringStringEntryProto[];
}

export interface ModelProto {
  ir_version?: Int64;
  opset_import: OperatorSetIdProto[];
  producer_name?: string;
  producer_version?: string;
  domain?: string;
  model_version?: Int64;
  doc_string?: string;
  graph?: GraphProto;
  metadata_props: StringStringEntryProto[];
  training_info: unknown[];
  functions: FunctionProto[];
  configuration: unknown[];
}

export const AttributeType = {
  UNDEFINED: 0,
  FLOAT: 1,
  INT: 2,
  STRING: 3,
  TENSOR: 4,
  GRAPH: 5,
  FLOATS: 6,
  INTS: 7,
  STRINGS: 8,
  TENSORS: 9,
  GRAPHS: 10,
  SPARSE_TENSOR: 11,
  SPARSE_TENSORS: 12,
  TYPE_PROTO: 13,
  TYPE_PROTOS: 14,
} as const;

export const DataLocation = { DEFAULT: 0, EXTERNAL: 1 } as const;

const root = protobuf.parse(ONNX_PROTO, { keepCase: true }).root;
const types = {
  ModelProto: root.lookupType('onnx.ModelProto'),
  GraphProto: root.lookupType('onnx.GraphProto'),
  NodeProto: root.lookupType('onnx.NodeProto'),
  TensorProto: root.lookupType('onnx.TensorProto'),
  AttributeProto: root.lookupType('onnx.AttributeProto'),
  ValueInfoProto: root.lookupType('onnx.ValueInfoProto'),
  TypeProto: root.lookupType('onnx.TypeProto'),
  FunctionProto: root.lookupType('onnx.FunctionProto'),
  SparseTensorProto: root.lookupType('onnx.SparseTensorProto'),
  StringStringEntryProto: root.lookupType('onnx.StringStringEntryProto'),
  OperatorSetIdProto: root.lookupType('onnx.OperatorSetIdProto'),
};
export type MessageName = keyof typeof types;

/** Thrown when bytes are not a well-formed ONNX protobuf. */
export class ProtoDecodeError extends Error {}

/**
 * A reader that keeps unknown fields: each message gets them, as raw bytes, in a non-enumerable
 * `$unknowns` that the encoder writes back, so fields newer than this schema survive a round trip.
 */
function reader(bytes: Uint8Array): protobuf.Reader {
  const r = protobuf.Reader.create(bytes);
  (r as unknown as { discardUnknown: boolean }).discardUnknown = false;
  return r;
}

export function decodeModelProto(bytes: Uint8Array): ModelProto {
  try {
    return types.ModelProto.decode(reader(bytes)) as unknown as ModelProto;
  } catch (e) {
    const why = e instanceof Error ? e.message : String(e);
    throw new ProtoDecodeError(`not a valid ONNX protobuf (${why})`);
  }
}

export function encodeModelProto(model: ModelProto): Uint8Array {
  return types.ModelProto.encode(model as unknown as protobuf.Message).finish();
}

/** Builds a message of the given type from a plain object (defaults filled, presence kept). */
export function create<T>(name: MessageName, fields: Partial<T>): T {
  return types[name].create(fields as Record<string, unknown>) as unknown as T;
}

export function encodeMessage(name: MessageName, message: unknown): Uint8Array {
  return types[name].encode(message as protobuf.Message).finish();
}

export function decodeMessage<T>(name: MessageName, bytes: Uint8Array): T {
  return types[name].decode(reader(bytes)) as unknown as T;
}

/** A plain-JSON view of a message (int64 as strings, bytes as base64): for deep comparison and dumps. */
export function toPlainObject(name: MessageName, message: unknown): Record<string, unknown> {
  return types[name].toObject(message as protobuf.Message, { longs: String, bytes: String, defaults: false, arrays: false, oneofs: false });
}

/** The inverse of toPlainObject: a message from its plain-JSON view. */
export function fromPlainObject<T>(name: MessageName, plain: Record<string, unknown>): T {
  return types[name].fromObject(plain) as unknown as T;
}

export function int64ToNumber(v: Int64 | undefined | null): number {
  if (v == null) return 0;
  return typeof v === 'number' ? v : v.toNumber();
}

export function int64ToBigInt(v: Int64 | undefined | null): bigint {
  if (v == null) return 0n;
  return typeof v === 'number' ? BigInt(v) : BigInt(v.toString());
}

export function bigIntToInt64(v: bigint): Int64 {
  if (v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(v);
  return Long.fromString(v.toString());
}

/** True when the message has the field set (proto2 presence). */
export function has(message: object, field: string): boolean {
  return Object.prototype.hasOwnProperty.call(message, field);
}
