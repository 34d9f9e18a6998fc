/**
 * Writing a model: atomically (temp file + rename), never over the input, with external data
 * kept by reference (same folder), linked or copied (another folder), and new large tensors
 * spilled to a new sidecar when the protobuf would pass 2 GB or the caller asks for it.
 */
import { copyFileSync, existsSync, linkSync, mkdirSync, realpathSync, renameSync, rmSync, statSync, writeSync, openSync, closeSync, fsyncSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { ModcError } from '../errors.js';
import type { Value } from '../ir/graph.js';
import type { Model } from '../ir/model.js';
import type { TensorProto } from '../proto/index.js';
import { DataLocation, encodeModelProto } from '../proto/index.js';
import { modelToProto } from './convert.js';

/** Protobuf's hard limit is 2 GiB; stay clear of it. */
const PROTO_LIMIT = 2 ** 31 - 64 * 2 ** 20;
const ALIGN = 4096;

export interface SaveOptions {
  /**
   * Write in-memory tensors of at least this many bytes to a new sidecar file. Default: only
   * when keeping them inline would push the protobuf past 2 GB.
   */
  externalizeThreshold?: number;
  /** File name of the new sidecar, relative to the output folder. Default `<output name>.data`. */
  externalDataName?: string;
}

export interface SaveResult {
  path: string;
  bytes: number;
  /** Sidecar files the output refers to (relative to its folder), and how each got there. */
  externalFiles: { location: string; how: 'referenced' | 'linked' | 'copied' | 'written' }[];
}

export function saveModel(model: Model, outPath: string, opts: SaveOptions = {}): SaveResult {
  const out = resolve(outPath);
  if (model.sourcePath && samePath(model.sourcePath, out)) {
    throw new ModcError(`refusing to overwrite the input model ${outPath}; choose another output path`);
  }
  const outDir = dirname(out);
  mkdirSync(outDir, { recursive: true });
  const sameFolder = model.baseDir !== undefined && samePath(model.baseDir, outDir);
  const created: string[] = [];
  const temps: string[] = [];
  try {
    const externalFiles: SaveResult['externalFiles'] = [];
    const initializers = [...allInitializers(model)];

    // Existing sidecar files: referenced in place, or brought next to the output.
    const locations = new Set<string>();
    for (const v of initializers) if (v.initializer?.external) locations.add(v.initializer.external.location);
    for (const location of locations) {
      if (sameFolder) {
        externalFiles.push({ location, how: 'referenced' });
        continue;
      }
      const src = initializers.find((v) => v.initializer?.external?.location === location)!.initializer!.external!.path;
      const dest = join(outDir, location);
      mkdirSync(dirname(dest), { recursive: true });
      const tmp = tempName(dest);
      temps.push(tmp);
      let how: 'linked' | 'copied' = 'linked';
      try {
        linkSync(src, tmp);
      } catch {
        copyFileSync(src, tmp);
        how = 'copied';
      }
      renameSync(tmp, dest);
      created.push(dest);
      externalFiles.push({ location, how });
    }

    // In-memory tensors: inline, unless too large in total or the caller asked to spill them.
    const inline = initializers.filter((v) => v.initializer && !v.initializer.external);
    const inlineBytes = inline.reduce((a, v) => a + v.initializer!.byteLength, 0);
    let threshold = opts.externalizeThreshold;
    if (threshold === undefined && inlineBytes > PROTO_LIMIT) threshold = 1024;
    const spilled = new Map<Value, TensorProto>();
    if (threshold !== undefined) {
      const spill = inline.filter((v) => v.initializer!.byteLength >= threshold!);
      if (spill.length) {
        let name = opts.externalDataName ?? `${basename(out)}.data`;
        while (locations.has(name)) name = `_${name}`;
        const dest = join(outDir, name);
        const tmp = tempName(dest);
        temps.push(tmp);
        const fd = openSync(tmp, 'w');
        try {
          let offset = 0;
          for (const v of spill) {
            const t = v.initializer!;
            const pad = (ALIGN - (offset % ALIGN)) % ALIGN;
            if (pad) writeSync(fd, new Uint8Array(pad));
            offset += pad;
            const data = t.bytes();
            writeSync(fd, data);
            const proto = { ...t.proto, name: v.name, data_location: DataLocation.EXTERNAL, external_data: [
              { key: 'location', value: name }, { key: 'offset', value: String(offset) }, { key: 'length', value: String(data.length) },
            ] } as TensorProto;
            delete (proto as Partial<TensorProto>).raw_data;
            spilled.set(v, proto);
            offset += data.length;
          }
          fsyncSync(fd);
        } finally {
          closeSync(fd);
        }
        renameSync(tmp, dest);
        created.push(dest);
        externalFiles.push({ location: name, how: 'written' });
      }
    }

    const proto = modelToProto(model, (v) => {
      const s = spilled.get(v);
      if (s) return s;
      const t = v.initializer!;
      return t.proto.name === v.name ? t.proto : ({ ...t.proto, name: v.name } as TensorProto);
    });
    const bytes = encodeModelProto(proto);
    if (bytes.length > 2 ** 31 - 1) throw new ModcError(`the model's protobuf would be ${bytes.length} bytes, over protobuf's 2 GB limit; save with an externalize threshold`);
    const tmp = tempName(out);
    temps.push(tmp);
    const fd = openSync(tmp, 'w');
    try {
      writeSync(fd, bytes);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, out);
    return { path: out, bytes: bytes.length, externalFiles };
  } catch (e) {
    for (const t of temps) rmSync(t, { force: true });
    for (const c of created) rmSync(c, { force: true });
    throw e;
  }
}

function* allInitializers(model: Model): Iterable<Value> {
  yield* model.graph.initializers.values();
  for (const n of model.graph.allNodes()) for (const g of n.subgraphs()) yield* g.initializers.values();
}

function tempName(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${Math.random().toString(36).slice(2, 8)}`);
}

/** Same file or folder: by real path where it exists, else by resolved path. */
function samePath(a: string, b: string): boolean {
  const real = (p: string) => {
    try {
      return realpathSync(p);
    } catch {
      return resolve(p);
    }
  };
  if (real(a) === real(b)) return true;
  if (existsSync(a) && existsSync(b)) {
    const sa = statSync(a);
    const sb = statSync(b);
    return sa.ino === sb.ino && sa.dev === sb.dev;
  }
  return false;
}
