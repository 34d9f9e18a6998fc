/**
 * Router weights: the safetensors file of SPEC.md ("Router weights file") and the built-in
 * initialisations. Reading checks every tensor against the model and names the one that does
 * not fit.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { ModcError } from './errors.js';
import { halfToFloat } from './ir/dtype.js';

/** One converted layer's router: s = w . x + b; optional per-layer threshold p. */
export interface LayerRouter {
  layer: number;
  weight: Float32Array;
  bias: number;
  threshold?: number;
}

interface SafetensorsEntry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

const NAME = /^router\.(\d+)\.(weight|bias|threshold)$/;

/** Reads and validates a router file for a model with `numLayers` layers of hidden size `hiddenSize`. */
export function readRouterFile(path: string, model: { hiddenSize: number; numLayers: number }): LayerRouter[] {
  let bytes: Buffer;
  try {
    bytes = readFileSync(path);
  } catch (e) {
    throw new ModcError(`cannot read router file ${path}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`);
  }
  const tensors = parseSafetensors(bytes, path);
  const byLayer = new Map<number, Partial<LayerRouter>>();
  for (const [name, t] of tensors) {
    const m = NAME.exec(name);
    if (!m) throw new ModcError(`router file ${path}: unexpected tensor '${name}' (expected router.{layer}.weight, .bias or .threshold)`);
    const layer = Number(m[1]);
    const kind = m[2] as 'weight' | 'bias' | 'threshold';
    if (layer >= model.numLayers) throw new ModcError(`router file ${path}: tensor '${name}' is for layer ${layer}, but the model has ${model.numLayers} layers (0-${model.numLayers - 1})`);
    const entry = byLayer.get(layer) ?? { layer };
    byLayer.set(layer, entry);
    const shape = `[${t.shape.join(', ')}]`;
    if (kind === 'weight') {
      if (t.shape.length !== 1 || t.shape[0] !== model.hiddenSize) throw new ModcError(`router file ${path}: tensor '${name}' has shape ${shape}, expected [${model.hiddenSize}] (the model's hidden size)`);
      entry.weight = t.values;
    } else {
      const scalar = t.shape.length === 0 || (kind === 'bias' && t.shape.length === 1 && t.shape[0] === 1);
      if (!scalar) throw new ModcError(`router file ${path}: tensor '${name}' has shape ${shape}, expected ${kind === 'bias' ? '[] or [1]' : '[]'}`);
      const v = t.values[0]!;
      if (kind === 'threshold' && !(v >= 0 && v <= 1)) throw new ModcError(`router file ${path}: tensor '${name}' is ${v}, a threshold must be in [0, 1]`);
      entry[kind] = v;
    }
  }
  return [...byLayer.values()].sort((a, b) => a.layer! - b.layer!).map((e) => {
    if (!e.weight) throw new ModcError(`router file ${path}: layer ${e.layer} has no tensor 'router.${e.layer}.weight'`);
    if (e.bias === undefined) throw new ModcError(`router file ${path}: layer ${e.layer} has no tensor 'router.${e.layer}.bias'`);
    return e as LayerRouter;
  });
}

function parseSafetensors(bytes: Buffer, path: string): Map<string, { shape: number[]; values: Float32Array }> {
  if (bytes.length < 8) throw new ModcError(`router file ${path}: too short to be safetensors`);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  if (headerLength <= 0 || 8 + headerLength > bytes.length) throw new ModcError(`router file ${path}: not a safetensors file (header length ${headerLength} does not fit a ${bytes.length}-byte file)`);
  let header: Record<string, SafetensorsEntry | Record<string, string>>;
  try {
    header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8'));
  } catch {
    throw new ModcError(`router file ${path}: not a safetensors file (header is not JSON)`);
  }
  const data = bytes.subarray(8 + headerLength);
  const out = new Map<string, { shape: number[]; values: Float32Array }>();
  for (const [name, raw] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const e = raw as SafetensorsEntry;
    const [begin, end] = e.data_offsets ?? [];
    const count = (e.shape ?? []).reduce((a, b) => a * b, 1);
    const width = e.dtype === 'F32' ? 4 : e.dtype === 'F16' ? 2 : 0;
    if (!width) throw new ModcError(`router file ${path}: tensor '${name}' has dtype ${e.dtype}, expected F32 or F16`);
    if (begin === undefined || end === undefined || end - begin !== count * width || end > data.length) {
      throw new ModcError(`router file ${path}: tensor '${name}' has data offsets [${begin}, ${end}] that do not fit its shape or the file`);
    }
    const slice = data.subarray(begin, end);
    const values = new Float32Array(count);
    for (let i = 0; i < count; i++) values[i] = width === 4 ? slice.readFloatLE(i * 4) : halfToFloat(slice.readUInt16LE(i * 2));
    out.set(name, { shape: e.shape, values });
  }
  return out;
}

/** Writes routers as a safetensors file (F32). */
export function writeRouterFile(path: string, routers: readonly LayerRouter[]): void {
  const entries: [string, number[], Float32Array][] = [];
  for (const r of routers) {
    entries.push([`router.${r.layer}.weight`, [r.weight.length], r.weight]);
    entries.push([`router.${r.layer}.bias`, [], Float32Array.of(r.bias)]);
    if (r.threshold !== undefined) entries.push([`router.${r.layer}.threshold`, [], Float32Array.of(r.threshold)]);
  }
  const header: Record<string, SafetensorsEntry> = {};
  let offset = 0;
  for (const [name, shape, values] of entries) {
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + values.byteLength] };
    offset += values.byteLength;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const buf = Buffer.alloc(8 + json.length + offset);
  buf.writeBigUInt64LE(BigInt(json.length), 0);
  buf.write(json, 8, 'utf8');
  let at = 8 + json.length;
  for (const [, , values] of entries) {
    Buffer.from(values.buffer, values.byteOffset, values.byteLength).copy(buf, at);
    at += values.byteLength;
  }
  writeFileSync(path, buf);
}

/**
 * Every token selected: w = 0 and b = 20, so r = sigmoid(20) rounds to 1 in float32 and a gated
 * layer also reproduces the original (x + 1 * (y - x)).
 */
export function allPassRouters(layers: readonly number[], hiddenSize: number): LayerRouter[] {
  return layers.map((layer) => ({ layer, weight: new Float32Array(hiddenSize), bias: 20 }));
}

/** Seeded random routers: w ~ U(-1, 1) / sqrt(H), b = 0, so about half the tokens score above 0. */
export function randomRouters(layers: readonly number[], hiddenSize: number, seed: number): LayerRouter[] {
  const next = mulberry32(seed);
  const scale = 1 / Math.sqrt(hiddenSize);
  return layers.map((layer) => ({ layer, weight: Float32Array.from({ length: hiddenSize }, () => (next() * 2 - 1) * scale), bias: 0 }));
}

export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
