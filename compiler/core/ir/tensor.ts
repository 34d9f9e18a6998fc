/**
 * Tensor: a constant's metadata plus its bytes, which may live in the model file (inline) or in
 * a sidecar file (ONNX external data). External bytes are read only when someone asks for them.
 */
import { closeSync, openSync, readSync } from 'node:fs';
import type { TensorProto } from '../proto/index.js';
import { create, DataLocation, int64ToNumber } from '../proto/index.js';
import { ModcError, quote } from '../errors.js';
import { byteSize, dataTypeBits, dataTypeName, DataType, type DataTypeCode, halfToFloat } from './dtype.js';

/** Where an external tensor's bytes are: a file already checked to lie inside the model folder. */
export interface ExternalLocation {
  /** The `location` key as written in the model, relative to the model's folder. */
  location: string;
  /** Absolute path of the sidecar file. */
  path: string;
  offset: number;
  length: number;
}

/** Counts external bytes actually read: lets tests prove that loading and analysis stay lazy. */
export const externalReads = { count: 0, bytes: 0 };

export function readExternalBytes(loc: ExternalLocation): Uint8Array {
  let fd: number;
  try {
    fd = openSync(loc.path, 'r');
  } catch {
    throw new ModcError(`missing external data: ${loc.location} (expected at ${loc.path})`);
  }
  try {
    const out = new Uint8Array(loc.length);
    let done = 0;
    while (done < loc.length) {
      const n = readSync(fd, out, done, loc.length - done, loc.offset + done);
      if (n === 0) throw new ModcError(`external data file ${loc.location} is shorter than the model says (needs ${loc.offset + loc.length} bytes)`);
      done += n;
    }
    externalReads.count++;
    externalReads.bytes += loc.length;
    return out;
  } finally {
    closeSync(fd);
  }
}

export type NumericArray =
  Float32Array | Float64Array | Int32Array | BigInt64Array | BigUint64Array | Uint8Array | Int8Array | Uint16Array | Int16Array | Uint32Array;

export class Tensor {
  /**
   * @param proto the TensorProto as loaded or built (for an external tensor, raw_data is absent
   *   and `external` tells where the bytes are).
   */
  constructor(
    readonly proto: TensorProto,
    readonly external?: ExternalLocation,
  ) {}

  get name(): string {
    return this.proto.name ?? '';
  }

  get dataType(): DataTypeCode {
    return this.proto.data_type ?? DataType.UNDEFINED;
  }

  get dims(): number[] {
    return this.proto.dims.map(int64ToNumber);
  }

  get size(): number {
    return this.dims.reduce((a, b) => a * b, 1);
  }

  get isExternal(): boolean {
    return this.external !== undefined;
  }

  /** Bytes of data this tensor holds (raw encoding), without reading them. */
  get byteLength(): number {
    if (this.external) return this.external.length;
    return byteSize(this.dataType, this.size);
  }

  /** The little-endian raw bytes, reading external data on demand. */
  bytes(): Uint8Array {
    if (this.external) return readExternalBytes(this.external);
    const p = this.proto;
    if (p.raw_data && p.raw_data.length > 0) return p.raw_data;
    return typedFieldsToRaw(p);
  }

  /** Decoded values (float16/bfloat16 widened to float32). For small constants: shapes, axes, scalars. */
  toArray(): NumericArray {
    const raw = this.bytes();
    const buf = raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.byteLength);
    switch (this.dataType) {
      case DataType.FLOAT:
        return new Float32Array(buf);
      case DataType.DOUBLE:
        return new Float64Array(buf);
      case DataType.INT32:
        return new Int32Array(buf);
      case DataType.INT64:
        return new BigInt64Array(buf);
      case DataType.UINT64:
        return new BigUint64Array(buf);
      case DataType.UINT8:
      case DataType.BOOL:
        return new Uint8Array(buf);
      case DataType.INT8:
        return new Int8Array(buf);
      case DataType.UINT16:
        return new Uint16Array(buf);
      case DataType.INT16:
        return new Int16Array(buf);
      case DataType.UINT32:
        return new Uint32Array(buf);
      case DataType.FLOAT16: {
        const h = new Uint16Array(buf);
        const out = new Float32Array(h.length);
        for (let i = 0; i < h.length; i++) out[i] = halfToFloat(h[i]!);
        return out;
      }
      case DataType.BFLOAT16: {
        const h = new Uint16Array(buf);
        const out = new Float32Array(h.length);
        const u = new Uint32Array(out.buffer);
        for (let i = 0; i < h.length; i++) u[i] = h[i]! << 16;
        return out;
      }
      default:
        throw new ModcError(`cannot decode tensor ${this.name} of data type ${this.dataType}`);
    }
  }

  /** Values as plain numbers (int64 converted; for shapes and small constants). */
  toNumbers(): number[] {
    return Array.from(this.toArray() as ArrayLike<number | bigint>, (v) => Number(v));
  }

  /** A new in-memory tensor from raw little-endian bytes. */
  static fromBytes(name: string, dataType: DataTypeCode, dims: number[], bytes: Uint8Array): Tensor {
    return new Tensor(create<TensorProto>('TensorProto', { name, data_type: dataType, dims, raw_data: bytes }));
  }

  static fromArray(
    name: string,
    dims: number[],
    data: Float32Array | BigInt64Array | Int32Array | Uint8Array | Uint16Array | Float64Array,
    dataType?: DataTypeCode,
  ): Tensor {
    const dt =
      dataType ??
      (data instanceof Float32Array
        ? DataType.FLOAT
        : data instanceof BigInt64Array
          ? DataType.INT64
          : data instanceof Int32Array
            ? DataType.INT32
            : data instanceof Float64Array
              ? DataType.DOUBLE
              : data instanceof Uint16Array
                ? DataType.FLOAT16
                : DataType.UINT8);
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice();
    return Tensor.fromBytes(name, dt, dims, bytes);
  }

  /** Whether the proto marks its data as external. */
  static protoIsExternal(p: TensorProto): boolean {
    return p.data_location === DataLocation.EXTERNAL;
  }
}

/**
 * Checks a TensorProto read from a file before anything sizes a buffer from it: dims are
 * non-negative integers, the element type is one ONNX defines, and the data present (raw bytes,
 * typed fields or, for external data, the declared length) holds exactly dims' elements.
 * `where` names the tensor for the message (e.g. "initializer 'w'").
 */
export function checkTensorProto(p: TensorProto, where: string): void {
  const dims = p.dims.map(int64ToNumber);
  for (const d of dims) {
    if (!Number.isSafeInteger(d) || d < 0) throw new ModcError(`${where}: dimension ${d} is not a non-negative integer (dims [${dims.join(', ')}])`);
  }
  const size = dims.reduce((a, b) => a * b, 1);
  if (!Number.isSafeInteger(size)) throw new ModcError(`${where}: dims [${dims.join(', ')}] hold more elements than can be addressed`);
  const dt = p.data_type ?? DataType.UNDEFINED;
  if (dt === DataType.STRING) {
    if (p.data_location !== DataLocation.EXTERNAL && p.string_data.length !== size) {
      throw new ModcError(`${where}: dims [${dims.join(', ')}] hold ${size} strings but the tensor has ${p.string_data.length}`);
    }
    return;
  }
  if (dataTypeBits(dt) === 0) throw new ModcError(`${where}: unknown element type ${dt}`);
  const expected = byteSize(dt, size);
  if (p.data_location === DataLocation.EXTERNAL) return; // the loader checks the declared length
  if (p.raw_data && p.raw_data.length > 0) {
    if (p.raw_data.length !== expected) {
      throw new ModcError(`${where}: dims [${dims.join(', ')}] of ${dataTypeName(dt)} need ${expected} bytes but raw_data has ${p.raw_data.length}`);
    }
    return;
  }
  const typed = typedFieldCount(p, dt);
  // Packed sub-byte types store two elements per int32_data entry.
  const want = dataTypeBits(dt) === 4 ? Math.ceil(size / 2) : size;
  if (typed !== want) {
    throw new ModcError(
      `${where}: dims [${dims.join(', ')}] hold ${size} elements of ${dataTypeName(dt)} but the tensor's data has ${typed === 0 && size > 0 ? 'none' : typed}`,
    );
  }
}

/** How many entries the typed field that carries `dt` holds. */
function typedFieldCount(p: TensorProto, dt: DataTypeCode): number {
  switch (dt) {
    case DataType.FLOAT:
    case DataType.COMPLEX64:
      return dt === DataType.COMPLEX64 ? p.float_data.length / 2 : p.float_data.length;
    case DataType.DOUBLE:
      return p.double_data.length;
    case DataType.COMPLEX128:
      return p.double_data.length / 2;
    case DataType.INT64:
      return p.int64_data.length;
    case DataType.UINT64:
    case DataType.UINT32:
      return p.uint64_data.length;
    default:
      return p.int32_data.length;
  }
}

/** The tensor's name, quoted for messages. */
export function tensorLabel(p: TensorProto): string {
  return quote(p.name ?? '');
}

/** Re-encodes the typed repeated fields (float_data, int64_data, ...) as raw little-endian bytes. */
function typedFieldsToRaw(p: TensorProto): Uint8Array {
  const dt = p.data_type ?? 0;
  const n = p.dims.reduce((a: number, d) => a * int64ToNumber(d), 1);
  switch (dt) {
    case DataType.FLOAT:
      return bytesOf(Float32Array.from(p.float_data));
    case DataType.DOUBLE:
      return bytesOf(Float64Array.from(p.double_data));
    case DataType.INT64:
      return bytesOf(BigInt64Array.from(p.int64_data, (v) => BigInt(v.toString())));
    case DataType.UINT64:
      return bytesOf(BigUint64Array.from(p.uint64_data, (v) => BigInt.asUintN(64, BigInt(v.toString()))));
    case DataType.INT32:
      return bytesOf(Int32Array.from(p.int32_data));
    case DataType.UINT8:
    case DataType.BOOL:
      return Uint8Array.from(p.int32_data);
    case DataType.INT8:
      return bytesOf(Int8Array.from(p.int32_data));
    case DataType.UINT16:
    case DataType.FLOAT16:
    case DataType.BFLOAT16:
      return bytesOf(Uint16Array.from(p.int32_data));
    case DataType.INT16:
      return bytesOf(Int16Array.from(p.int32_data));
    case DataType.UINT32:
      return bytesOf(Uint32Array.from(p.uint64_data, (v) => Number(v.toString())));
    default:
      if (n === 0) return new Uint8Array(0);
      throw new ModcError(`tensor ${p.name ?? ''}: cannot read data of type ${dt} from typed fields`);
  }
}

function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}
