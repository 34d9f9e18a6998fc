/**
 * Reading a model from disk: the protobuf, then each external-data reference checked (inside the
 * model folder, file present, long enough) without reading its bytes.
 */
import { readFileSync, realpathSync, statSync } from 'node:fs';
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { ModcError, quote } from '../errors.js';
import { byteSize } from '../ir/dtype.js';
import type { Graph } from '../ir/graph.js';
import type { Model } from '../ir/model.js';
import { checkTensorProto, type ExternalLocation, Tensor } from '../ir/tensor.js';
import { verifyModel } from '../ir/validate.js';
import type { TensorProto } from '../proto/index.js';
import { decodeModelProto, int64ToNumber, ProtoDecodeError } from '../proto/index.js';
import { modelFromProto } from './convert.js';

export function loadModel(path: string): Model {
  const abs = resolve(path);
  let bytes: Buffer;
  try {
    const st = statSync(abs);
    if (st.isDirectory()) throw new ModcError(`${path} is a directory, not an ONNX model file`);
    bytes = readFileSync(abs);
  } catch (e) {
    if (e instanceof ModcError) throw e;
    throw new ModcError(`cannot read ${path}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`);
  }
  return modelFromBytes(bytes, abs);
}

/** Decodes a model held in memory; `path` anchors external data and error messages. */
export function modelFromBytes(bytes: Uint8Array, path: string): Model {
  if (bytes.length === 0) throw new ModcError(`${path}: empty file, not an ONNX model`);
  let proto;
  try {
    proto = decodeModelProto(bytes);
  } catch (e) {
    if (e instanceof ProtoDecodeError)
      throw new ModcError(`${path}: corrupt or truncated ONNX protobuf (${e.message.replace(/^not a valid ONNX protobuf \((.*)\)$/, '$1')})`);
    throw e;
  }
  if (!proto.graph || int64ToNumber(proto.ir_version) <= 0) {
    throw new ModcError(`${path}: not an ONNX model (no ${!proto.graph ? 'graph' : 'ir_version'} in the protobuf)`);
  }
  const baseDir = dirname(path);
  const resolver = new ExternalDataResolver(baseDir);
  const model = modelFromProto(proto, (tp) => (tp.data_location === 1 ? new Tensor(tp, resolver.resolve(tp)) : new Tensor(tp)));
  model.sourcePath = path;
  model.baseDir = baseDir;
  sortGraphs(model.graph, path);
  // What ONNX Runtime would refuse to load is refused here, before analysis or a pass meets it.
  const issues = verifyModel(model, { order: false });
  if (issues.length)
    throw new ModcError(`${path}: ${issues[0]!.message}${issues.length > 1 ? ` (and ${issues.length - 1} more problem${issues.length > 2 ? 's' : ''})` : ''}`);
  return model;
}

/**
 * ONNX asks for nodes in topological order, but ONNX Runtime accepts any order and real exports
 * break it (the ONNX Runtime GenAI builder's fp16 Llama). Every graph is sorted stably: a sorted
 * graph keeps its order, names are untouched, and only a true cycle is refused.
 */
function sortGraphs(g: Graph, path: string): void {
  try {
    g.toposort();
  } catch (e) {
    if (e instanceof ModcError) throw new ModcError(`${path}: ${e.message}; ONNX graphs must be acyclic`);
    throw e;
  }
  for (const n of g.nodes) for (const sg of n.subgraphs()) sortGraphs(sg, path);
}

/** Validates external-data references against the model folder; caches per sidecar file. */
class ExternalDataResolver {
  private base: string | undefined;
  private readonly files = new Map<string, { path: string; size: number }>();

  constructor(readonly baseDir: string) {}

  /** The model folder's real path, taken when the first external tensor needs it. */
  private get realBase(): string {
    if (this.base === undefined) {
      try {
        this.base = realpathSync(this.baseDir);
      } catch (e) {
        throw new ModcError(
          `the model has external data, but its folder ${quote(this.baseDir)} cannot be opened (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`,
        );
      }
    }
    return this.base;
  }

  resolve(tp: TensorProto): ExternalLocation {
    const name = quote(tp.name ?? '');
    checkTensorProto(tp, `tensor ${name}`);
    const entries = new Map(tp.external_data.map((e) => [e.key ?? '', e.value ?? '']));
    const location = entries.get('location');
    if (!location) throw new ModcError(`tensor ${name}: external data without a location`);
    const file = this.file(location, name);
    const integer = (key: string, fallback: number) => {
      const text = entries.get(key);
      if (text === undefined) return fallback;
      return /^\d+$/.test(text.trim()) ? Number(text) : NaN;
    };
    const offset = integer('offset', 0);
    const expected = byteSize(
      tp.data_type ?? 0,
      tp.dims.reduce((a: number, d) => a * int64ToNumber(d), 1),
    );
    const length = integer('length', expected);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length)) {
      throw new ModcError(
        `tensor ${name}: bad external data offset/length (${quote(entries.get('offset') ?? '0')}, ${quote(entries.get('length') ?? String(expected))})`,
      );
    }
    if (tp.data_type !== 8 && length !== expected) {
      throw new ModcError(`tensor ${name}: external data length ${length} does not match its dims (${expected} bytes)`);
    }
    if (offset + length > file.size) {
      throw new ModcError(`tensor ${name}: external data file ${quote(location)} is truncated (needs ${offset + length} bytes, has ${file.size})`);
    }
    return { location, path: file.path, offset, length };
  }

  private file(location: string, tensor: string): { path: string; size: number } {
    const cached = this.files.get(location);
    if (cached) return cached;
    const loc = quote(location);
    if (location.includes('\0')) throw new ModcError(`tensor ${tensor}: external data location ${loc} contains a NUL character`);
    if (isAbsolute(location) || /^[a-zA-Z]:[\\/]/.test(location)) {
      throw new ModcError(`tensor ${tensor}: external data location ${loc} is an absolute path; it must be relative to the model folder`);
    }
    const joined = resolve(this.baseDir, location);
    if (!inside(this.baseDir, joined)) {
      throw new ModcError(`tensor ${tensor}: external data location ${loc} escapes the model folder`);
    }
    // Resolved the way the OS (and ONNX Runtime) opens it: component by component, so
    // `sub/../x.data` needs a real `sub/` folder. Node's realpathSync would normalise the text first.
    let real: string;
    try {
      real = realpathSync.native(`${this.baseDir}${sep}${location}`);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      throw new ModcError(
        `missing external data: ${loc} for tensor ${tensor} (${code === 'ENOENT' || code === 'ENOTDIR' ? `no file at ${quote(joined)}` : `cannot open it: ${code ?? (e as Error).message}`})`,
      );
    }
    if (!inside(this.realBase, real)) {
      throw new ModcError(`tensor ${tensor}: external data location ${loc} resolves outside the model folder (through a symlink, to ${quote(real)})`);
    }
    const st = statSync(real);
    if (!st.isFile()) throw new ModcError(`tensor ${tensor}: external data location ${loc} is not a file`);
    const entry = { path: real, size: st.size };
    this.files.set(location, entry);
    return entry;
  }
}

function inside(dir: string, path: string): boolean {
  const rel = relative(dir, path);
  return rel !== '' && !rel.startsWith('..' + sep) && rel !== '..' && !isAbsolute(rel);
}
