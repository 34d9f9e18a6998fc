/**
 * Writing a model: atomically (temp file + rename), never over the input or one of its data
 * files, with external data kept by reference (same folder), linked or copied (another folder),
 * and new large tensors spilled to a new sidecar when the protobuf would pass 2 GB or the caller
 * asks for it. The output path is checked before anything is written (`checkOutputPath`), and
 * the model is verified, so modc never writes a model that cannot load.
 */
import {
  accessSync,
  closeSync,
  constants,
  copyFileSync,
  existsSync,
  fsyncSync,
  linkSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  type Stats,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { basename, dirname, join, normalize, resolve, sep } from 'node:path';
import { ModcError, quote } from '../errors.js';
import type { Value } from '../ir/graph.js';
import type { Model } from '../ir/model.js';
import { verifyModel } from '../ir/validate.js';
import type { TensorProto } from '../proto/index.js';
import { DataLocation, encodeModelProto } from '../proto/index.js';
import { copyMessage, modelToProto } from './convert.js';

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

/** An fs failure as a one-line ModcError about `path`. */
function fsError(e: unknown, what: string, path: string): ModcError {
  const err = e as NodeJS.ErrnoException;
  const why: Record<string, string> = {
    EACCES: 'permission denied',
    EPERM: 'operation not permitted',
    EROFS: 'read-only file system',
    ENOSPC: 'no space left on the device',
    EISDIR: 'is a directory',
    ENOTDIR: 'a component of the path is not a folder',
    ENOENT: 'no such file or folder',
    EEXIST: 'already exists',
    ENAMETOOLONG: 'name too long',
    EDQUOT: 'disk quota exceeded',
    EMLINK: 'too many links',
    EXDEV: 'on another device',
    ELOOP: 'too many symbolic links',
  };
  const reason = (err.code && why[err.code]) ?? err.code ?? String(err.message ?? e).split('\n')[0];
  return new ModcError(`cannot ${what} ${quote(path)}: ${reason}`);
}

function statOrNull(path: string, follow = true): Stats | null {
  try {
    return follow ? statSync(path) : lstatSync(path);
  } catch {
    return null;
  }
}

/** Files of the model's input whose bytes must survive: the model file and its data files. */
function inputFiles(model: Model): string[] {
  const out: string[] = [];
  if (model.sourcePath) out.push(model.sourcePath);
  for (const v of allInitializers(model)) if (v.initializer?.external) out.push(v.initializer.external.path);
  return [...new Set(out)];
}

/**
 * Refuses an output path that cannot or must not be written, before any work: the input model
 * or one of its data files (by real path, so through symlinks, and by device and inode, so
 * through hard links), an existing directory or non-file, a path under a component that is a
 * file, or a folder modc cannot write in. Missing parent folders are fine (they are created).
 */
export function checkOutputPath(outPath: string, model?: Model): void {
  const out = resolve(outPath);
  const shown = quote(outPath);
  if (outPath === '' || out.includes('\0')) throw new ModcError(`output path ${shown} is not a valid path`);
  if (model) {
    const target = statOrNull(out);
    let realOut: string | null;
    try {
      realOut = realpathSync(out);
    } catch {
      realOut = null;
    }
    for (const f of inputFiles(model)) {
      const st = statOrNull(f);
      const same =
        (realOut !== null &&
          realOut ===
            (() => {
              try {
                return realpathSync(f);
              } catch {
                return resolve(f);
              }
            })()) ||
        (target !== null && st !== null && target.ino === st.ino && target.dev === st.dev) ||
        resolve(f) === out;
      if (same) {
        const what = f === model.sourcePath ? 'the input model' : `an external-data file of the input model (${quote(basename(f))})`;
        throw new ModcError(`refusing to overwrite ${what} with ${shown}; choose another output path`);
      }
    }
  }
  const st = statOrNull(out);
  if (st) {
    if (st.isDirectory()) throw new ModcError(`output path ${shown} is a directory; give a file path like ${quote(join(outPath, 'model.onnx'))}`);
    if (!st.isFile()) throw new ModcError(`output path ${shown} exists and is not a regular file`);
  }
  // The deepest existing ancestor must be a folder we can create entries in.
  let dir = dirname(out);
  while (!statOrNull(dir)) {
    const up = dirname(dir);
    if (up === dir) break;
    dir = up;
  }
  const dst = statOrNull(dir);
  if (dst && !dst.isDirectory()) throw new ModcError(`cannot write ${shown}: ${quote(dir)} is a file, not a folder`);
  try {
    accessSync(dir, constants.W_OK | constants.X_OK);
  } catch (e) {
    throw fsError(e, 'write into folder', dir);
  }
  // access() says yes to root everywhere; a probe file tells the truth (read-only mounts, /proc).
  const probe = join(dir, `.modc-probe.tmp-modc-${process.pid}-${Math.random().toString(36).slice(2, 8)}`);
  try {
    closeSync(openSync(probe, 'wx'));
  } catch (e) {
    throw fsError(e, 'write into folder', dir);
  }
  rmSync(probe, { force: true });
}

/** The lowest IR version that can carry what the model uses. */
export function requiredIrVersion(model: Model): number {
  let need = 3;
  // Local functions: IR 8. Initializers inside subgraphs (captured If branches), or
  // initializers that are not graph inputs: IR 4.
  if (model.functions.length) need = Math.max(need, 8);
  const g = model.graph;
  if ([...g.initializers.values()].some((v) => !g.inputs.includes(v))) need = Math.max(need, 4);
  for (const n of model.graph.allNodes()) for (const sg of n.subgraphs()) if (sg.initializers.size) need = Math.max(need, 4);
  return need;
}

export function saveModel(model: Model, outPath: string, opts: SaveOptions = {}): SaveResult {
  const out = resolve(outPath);
  checkOutputPath(outPath, model);
  const issues = verifyModel(model, { order: false });
  if (issues.length)
    throw new ModcError(
      `not writing ${quote(outPath)}: the model is invalid: ${issues[0]!.message}${issues.length > 1 ? ` (and ${issues.length - 1} more)` : ''}`,
    );
  const outDir = dirname(out);
  try {
    mkdirSync(outDir, { recursive: true });
  } catch (e) {
    throw fsError(e, 'create folder', outDir);
  }
  removeStaleTemporaries(outDir);
  const sameFolder = model.baseDir !== undefined && sameFile(model.baseDir, outDir);
  const created: string[] = [];
  const temps: string[] = [];
  try {
    const externalFiles: SaveResult['externalFiles'] = [];
    const initializers = [...allInitializers(model)];

    // Existing sidecar files: referenced in place, or brought next to the output (under their
    // location normalised, so `sub/../x.data` does not need a `sub/` folder there).
    const locations = new Set<string>();
    const relocated = new Map<string, string>();
    for (const v of initializers) if (v.initializer?.external) locations.add(v.initializer.external.location);
    for (const location of locations) {
      if (sameFolder) {
        externalFiles.push({ location, how: 'referenced' });
        continue;
      }
      const src = initializers.find((v) => v.initializer?.external?.location === location)!.initializer!.external!.path;
      const target = normalize(location).split(sep).join('/');
      if (target !== location) relocated.set(location, target);
      const dest = join(outDir, target);
      if (created.includes(dest)) {
        externalFiles.push({ location: target, how: 'linked' });
        continue;
      }
      try {
        mkdirSync(dirname(dest), { recursive: true });
      } catch (e) {
        throw fsError(e, 'create folder', dirname(dest));
      }
      const tmp = tempName(dest);
      temps.push(tmp);
      let how: 'linked' | 'copied' = 'linked';
      try {
        linkSync(src, tmp);
      } catch {
        try {
          copyFileSync(src, tmp);
        } catch (e) {
          throw fsError(e, 'write', dest);
        }
        how = 'copied';
      }
      rename(tmp, dest);
      created.push(dest);
      externalFiles.push({ location: target, how });
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
        // Never over a file the model still reads, however its location is spelled.
        const inputs = inputFiles(model);
        const taken = (n: string) => locations.has(n) || [...relocated.values()].includes(n) || inputs.some((f) => sameFile(f, join(outDir, n)));
        while (taken(name)) name = `_${name}`;
        const dest = join(outDir, name);
        const tmp = tempName(dest);
        temps.push(tmp);
        writeFile(tmp, dest, (fd) => {
          let offset = 0;
          for (const v of spill) {
            const t = v.initializer!;
            const pad = (ALIGN - (offset % ALIGN)) % ALIGN;
            if (pad) writeSync(fd, new Uint8Array(pad));
            offset += pad;
            const data = t.bytes();
            writeSync(fd, data);
            const proto = {
              ...copyMessage(t.proto),
              name: v.name,
              data_location: DataLocation.EXTERNAL,
              external_data: [
                { key: 'location', value: name },
                { key: 'offset', value: String(offset) },
                { key: 'length', value: String(data.length) },
              ],
            } as unknown as TensorProto;
            delete (proto as Partial<TensorProto>).raw_data;
            spilled.set(v, proto);
            offset += data.length;
          }
        });
        rename(tmp, dest);
        created.push(dest);
        externalFiles.push({ location: name, how: 'written' });
      }
    }

    const proto = modelToProto(model, (v) => {
      const s = spilled.get(v);
      if (s) return s;
      const t = v.initializer!;
      const moved = t.external && relocated.get(t.external.location);
      if (t.proto.name === v.name && !moved) return t.proto;
      const copy = { ...copyMessage(t.proto), name: v.name } as unknown as TensorProto;
      if (moved) copy.external_data = t.proto.external_data.map((e) => (e.key === 'location' ? { ...e, value: moved } : e));
      return copy;
    });
    // Features the rewrite may have introduced (captured initializers in If branches, local
    // functions) need a newer IR version than the input declared.
    const ir = requiredIrVersion(model);
    if (model.irVersion < ir) proto.ir_version = ir;
    const bytes = encodeModelProto(proto);
    if (bytes.length > 2 ** 31 - 1)
      throw new ModcError(`the model's protobuf would be ${bytes.length} bytes, over protobuf's 2 GB limit; save with an externalize threshold`);
    const tmp = tempName(out);
    temps.push(tmp);
    writeFile(tmp, out, (fd) => writeSync(fd, bytes));
    rename(tmp, out);
    return { path: out, bytes: bytes.length, externalFiles };
  } catch (e) {
    for (const t of temps) rmSync(t, { force: true });
    for (const c of created) rmSync(c, { force: true });
    throw e;
  }
}

function writeFile(tmp: string, dest: string, write: (fd: number) => void): void {
  let fd: number;
  try {
    fd = openSync(tmp, 'wx');
  } catch (e) {
    throw fsError(e, 'write', dest);
  }
  try {
    write(fd);
    fsyncSync(fd);
  } catch (e) {
    if (e instanceof ModcError) throw e;
    throw fsError(e, 'write', dest);
  } finally {
    closeSync(fd);
  }
}

function rename(tmp: string, dest: string): void {
  try {
    renameSync(tmp, dest);
    // rename(2) between two links to one file does nothing: a weights file hard-linked here by
    // an earlier save leaves the new link behind.
    if (existsSync(tmp)) unlinkSync(tmp);
  } catch (e) {
    throw fsError(e, 'write', dest);
  }
}

function* allInitializers(model: Model): Iterable<Value> {
  yield* model.graph.initializers.values();
  for (const n of model.graph.allNodes()) for (const g of n.subgraphs()) yield* g.initializers.values();
}

/** Temporaries are `.<name>.tmp-modc-<pid>-<random>`: recognisable, and tied to their writer. */
const TEMP = /^\..+\.tmp-modc-(\d+)-[a-z0-9]+$/;

function tempName(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-modc-${process.pid}-${Math.random().toString(36).slice(2, 8)}`);
}

/**
 * Removes temporaries an earlier, killed save left in `dir`: files named like ours whose
 * writing process is gone. A save still running in another process keeps its files.
 */
export function removeStaleTemporaries(dir: string): string[] {
  let entries: string[];
  try {
    entries = readdirSync(dir);
  } catch {
    return [];
  }
  const removed: string[] = [];
  for (const e of entries) {
    const m = TEMP.exec(e);
    if (!m) continue;
    const pid = Number(m[1]);
    if (pid === process.pid || alive(pid)) continue;
    const path = join(dir, e);
    const st = statOrNull(path, false);
    if (!st?.isFile()) continue;
    try {
      rmSync(path);
      removed.push(path);
    } catch {
      // Not ours to fight over: leave it.
    }
  }
  return removed;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Same file or folder: by real path where it exists, by device and inode, else by resolved path. */
function sameFile(a: string, b: string): boolean {
  const real = (p: string) => {
    try {
      return realpathSync(p);
    } catch {
      return resolve(p);
    }
  };
  if (real(a) === real(b)) return true;
  const sa = statOrNull(a);
  const sb = statOrNull(b);
  return sa !== null && sb !== null && sa.ino === sb.ino && sa.dev === sb.dev;
}
