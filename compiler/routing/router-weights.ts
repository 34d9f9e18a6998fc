/**
 * Router weights: the safetensors file of SPEC.md ("Router weights file") and the built-in
 * initialisations. Reading checks every tensor against the model and names the one that does
 * not fit.
 *
 * Tensor names: `router.{l}.weight|bias|threshold` routes layer l's whole block,
 * `router.{l}.attn.*` its attention sub-layer, `router.{l}.mlp.*` its MLP sub-layer and
 * `router.{l}.kv.*` which tokens its KV cache keeps (SPEC.md, "Key/value routing").
 * Weights may be F32, F16 or BF16. The header's `__metadata__` may hold, under the key `modc`,
 * a JSON string with the routing the file was made for (mode, gating, per-part capacities) and
 * free-form calibration statistics.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { ModcError } from '../core/errors.js';
import { floatToHalf, halfToFloat } from '../core/ir/dtype.js';
import { mulberry32 } from '../core/random.js';

/**
 * What a router routes: the whole block, one sub-layer (SPEC.md, "Sub-layer routing"), or which
 * tokens the layer keeps as keys and values (`kv`, SPEC.md, "Key/value routing").
 */
export type RoutedPart = 'block' | 'attention' | 'mlp' | 'kv';
export const ROUTED_PARTS: readonly RoutedPart[] = ['block', 'attention', 'mlp', 'kv'];

/** Key/value routing's fixed parts: the first `sinks` tokens and the `window` most recent stay keys. */
export interface KvPolicy {
  sinks: number;
  window: number;
}
export const DEFAULT_KV_POLICY: KvPolicy = { sinks: 4, window: 16 };

/** Why a key/value policy is not usable, or null: sinks an integer >= 0, window an integer >= 1. */
export function kvPolicyProblem(p: { sinks?: unknown; window?: unknown }): string | null {
  if (p.sinks !== undefined && !(Number.isSafeInteger(p.sinks) && (p.sinks as number) >= 0))
    return `sinks must be an integer >= 0, got ${JSON.stringify(p.sinks)}`;
  if (p.window !== undefined && !(Number.isSafeInteger(p.window) && (p.window as number) >= 1))
    return `window must be an integer >= 1 (a token is always visible to itself), got ${JSON.stringify(p.window)}`;
  return null;
}

/**
 * A linear surrogate of an MLP part (SPEC.md, "MLP routed with a surrogate"): a token the part
 * does not run gets s(u) = (u . A) . B + bias instead of no update, u being the MLP's normalised
 * input. Row-major float32: A [H, rank], B [rank, H], bias [H].
 */
export interface Surrogate {
  rank: number;
  a: Float32Array;
  b: Float32Array;
  bias: Float32Array;
}

/** Multiply-accumulates of a surrogate per token it runs on: u . A, then . B. */
export const surrogateMacs = (s: { rank: number }, hiddenSize: number): number => 2 * hiddenSize * s.rank;

/** One converted layer part's router: s = w . x + b; optional per-part threshold p. */
export interface LayerRouter {
  layer: number;
  /** Default 'block'. */
  part?: RoutedPart;
  weight: Float32Array;
  bias: number;
  threshold?: number;
  /** An MLP part only: what a token the part does not run gets instead of no update. */
  surrogate?: Surrogate;
}

/** An MLP part replaced by its surrogate on every token (capacity 0): no router, the MLP never runs. */
export interface ReplacedPart {
  layer: number;
  part: 'mlp';
  surrogate: Surrogate;
}

/** One layer part's entry in the file's `modc` metadata. */
export interface RouterFileLayer {
  layer: number;
  part: RoutedPart;
  /** 0 for a part replaced by its surrogate (no router). */
  capacity?: number;
  threshold?: number;
  /** The part's surrogate, when it has one: its rank and MACs per token it runs on (2 H rank). */
  surrogate?: { rank: number; macs: number };
}

/** The `modc` entry of a router file's `__metadata__` (stored as a JSON string). */
export interface RouterFileMetadata {
  mode?: 'threshold' | 'topk';
  gated?: boolean;
  layers?: RouterFileLayer[];
  /** Key/value routing (`router.{l}.kv.*`): attention sinks and the recent window every kv layer keeps. */
  kv?: Partial<KvPolicy>;
  /** How the routers were made: free-form statistics and recipe. */
  calibration?: unknown;
}

export interface RouterFile {
  routers: LayerRouter[];
  /** MLP parts with a surrogate and no router: replaced by the surrogate on every token. */
  replaced: ReplacedPart[];
  metadata: RouterFileMetadata | null;
}

export type RouterDtype = 'F32' | 'F16' | 'BF16';

interface SafetensorsEntry {
  dtype: string;
  shape: number[];
  data_offsets: [number, number];
}

export const METADATA_KEY = 'modc';
const NAME = /^router\.(\d+)\.(?:(attn|mlp|kv)\.)?(weight|bias|threshold)$/;
const SURROGATE_NAME = /^router\.(\d+)\.(?:(attn|mlp|kv)\.)?surrogate\.(a|b|bias)$/;
const PART_OF_TAG: Record<string, RoutedPart> = { attn: 'attention', mlp: 'mlp', kv: 'kv' };
const TAG_OF_PART: Record<RoutedPart, string> = { block: '', attention: 'attn', mlp: 'mlp', kv: 'kv' };
const WIDTH: Record<string, number> = { F32: 4, F16: 2, BF16: 2 };

/** The tensor name prefix of a layer part's router: `router.3`, `router.3.attn`, `router.3.mlp`, `router.3.kv`. */
export function routerTensorPrefix(layer: number, part: RoutedPart = 'block'): string {
  return part === 'block' ? `router.${layer}` : `router.${layer}.${TAG_OF_PART[part]}`;
}

/** Orders routers by layer, then attention before MLP. */
export function compareParts(a: { layer: number; part?: RoutedPart }, b: { layer: number; part?: RoutedPart }): number {
  return a.layer - b.layer || ROUTED_PARTS.indexOf(a.part ?? 'block') - ROUTED_PARTS.indexOf(b.part ?? 'block');
}

/** Reads and validates a router file for a model with `numLayers` layers of hidden size `hiddenSize`. */
export function readRouterFile(path: string, model: { hiddenSize: number; numLayers: number }): LayerRouter[] {
  return loadRouterFile(path, model).routers;
}

/** Reads a router file: its routers (each with its part) and its `modc` metadata. */
export function loadRouterFile(path: string, model: { hiddenSize: number; numLayers: number }): RouterFile {
  let bytes: Buffer;
  try {
    bytes = readFileSync(path);
  } catch (e) {
    throw new ModcError(`cannot read router file ${path}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`);
  }
  const { tensors, metadata } = parseSafetensors(bytes, path);
  const byPart = new Map<string, Partial<LayerRouter> & { layer: number; part: RoutedPart }>();
  const surrogates = new Map<number, Partial<Record<'a' | 'b' | 'bias', { name: string; shape: number[]; values: Float32Array }>>>();
  const H = model.hiddenSize;
  for (const [name, t] of tensors) {
    const sm = SURROGATE_NAME.exec(name);
    if (sm) {
      const layer = Number(sm[1]);
      if (sm[2] !== 'mlp')
        throw new ModcError(`router file ${path}: tensor '${name}': a surrogate belongs to an MLP part only (router.${layer}.mlp.surrogate.a, .b, .bias)`);
      if (layer >= model.numLayers)
        throw new ModcError(
          `router file ${path}: tensor '${name}' is for layer ${layer}, but the model has ${model.numLayers} layers (0-${model.numLayers - 1})`,
        );
      const bad = t.values.findIndex((v) => !Number.isFinite(v));
      if (bad >= 0) throw new ModcError(`router file ${path}: tensor '${name}' holds ${t.values[bad]} at index ${bad}; surrogate weights must be finite`);
      const entry = surrogates.get(layer) ?? {};
      entry[sm[3] as 'a' | 'b' | 'bias'] = { name, ...t };
      surrogates.set(layer, entry);
      continue;
    }
    const m = NAME.exec(name);
    if (!m)
      throw new ModcError(
        `router file ${path}: unexpected tensor '${name}' (expected router.{layer}.weight, .bias or .threshold, optionally under router.{layer}.attn, router.{layer}.mlp or router.{layer}.kv, or router.{layer}.mlp.surrogate.a, .b, .bias)`,
      );
    const layer = Number(m[1]);
    const part = m[2] ? PART_OF_TAG[m[2]]! : 'block';
    const kind = m[3] as 'weight' | 'bias' | 'threshold';
    if (layer >= model.numLayers)
      throw new ModcError(
        `router file ${path}: tensor '${name}' is for layer ${layer}, but the model has ${model.numLayers} layers (0-${model.numLayers - 1})`,
      );
    const key = routerTensorPrefix(layer, part);
    const entry = byPart.get(key) ?? { layer, part };
    byPart.set(key, entry);
    const shape = `[${t.shape.join(', ')}]`;
    if (kind === 'weight') {
      if (t.shape.length !== 1 || t.shape[0] !== H)
        throw new ModcError(`router file ${path}: tensor '${name}' has shape ${shape}, expected [${H}] (the model's hidden size)`);
      const bad = t.values.findIndex((v) => !Number.isFinite(v));
      if (bad >= 0) throw new ModcError(`router file ${path}: tensor '${name}' holds ${t.values[bad]} at index ${bad}; router weights must be finite`);
      entry.weight = t.values;
    } else {
      const scalar = t.shape.length === 0 || (kind === 'bias' && t.shape.length === 1 && t.shape[0] === 1);
      if (!scalar) throw new ModcError(`router file ${path}: tensor '${name}' has shape ${shape}, expected ${kind === 'bias' ? '[] or [1]' : '[]'}`);
      const v = t.values[0]!;
      if (kind === 'threshold' && !(v >= 0 && v <= 1)) throw new ModcError(`router file ${path}: tensor '${name}' is ${v}, a threshold must be in [0, 1]`);
      if (kind === 'bias' && !Number.isFinite(v)) throw new ModcError(`router file ${path}: tensor '${name}' is ${v}; a bias must be finite`);
      entry[kind] = v;
    }
  }
  const replaced: ReplacedPart[] = [];
  for (const [layer, e] of [...surrogates].sort((a, b) => a[0] - b[0])) {
    const surrogate = checkSurrogate(e, layer, H, path);
    const key = routerTensorPrefix(layer, 'mlp');
    const routed = byPart.get(key);
    if (routed) routed.surrogate = surrogate;
    else replaced.push({ layer, part: 'mlp', surrogate });
  }
  const routers = [...byPart.values()].sort(compareParts).map((e) => {
    const prefix = routerTensorPrefix(e.layer, e.part);
    if (!e.weight) throw new ModcError(`router file ${path}: ${describePart(e.layer, e.part)} has no tensor '${prefix}.weight'`);
    if (e.bias === undefined) throw new ModcError(`router file ${path}: ${describePart(e.layer, e.part)} has no tensor '${prefix}.bias'`);
    return e as LayerRouter;
  });
  const subLayers: { layer: number; part: RoutedPart; tensor: string }[] = routers
    .filter((r) => r.part !== 'block')
    .map((r) => ({ layer: r.layer, part: r.part ?? 'block', tensor: `${routerTensorPrefix(r.layer, r.part)}.weight` }));
  subLayers.push(...replaced.map((r) => ({ layer: r.layer, part: 'mlp' as const, tensor: `${routerTensorPrefix(r.layer, 'mlp')}.surrogate.a` })));
  for (const r of subLayers) {
    if (byPart.has(routerTensorPrefix(r.layer))) {
      throw new ModcError(
        `router file ${path}: tensor '${r.tensor}' routes a ${r.part === 'kv' ? 'KV cache' : 'sub-layer'} of layer ${r.layer}, whose whole block 'router.${r.layer}.weight' already routes; give one or the other`,
      );
    }
    if (r.part === 'kv' && byPart.has(routerTensorPrefix(r.layer, 'attention'))) {
      throw new ModcError(
        `router file ${path}: tensor '${routerTensorPrefix(r.layer, 'kv')}.weight' routes the KV cache of layer ${r.layer}, whose attention 'router.${r.layer}.attn.weight' already routes (and compacts that cache); give one or the other`,
      );
    }
  }
  return { routers, replaced, metadata: metadata ? checkMetadata(metadata, path, model.numLayers) : null };
}

/** A layer's surrogate tensors: all three present, A [H, r], B [r, H], bias [H] with one r >= 1. */
function checkSurrogate(
  e: Partial<Record<'a' | 'b' | 'bias', { name: string; shape: number[]; values: Float32Array }>>,
  layer: number,
  H: number,
  path: string,
): Surrogate {
  const prefix = `${routerTensorPrefix(layer, 'mlp')}.surrogate`;
  for (const k of ['a', 'b', 'bias'] as const)
    if (!e[k]) throw new ModcError(`router file ${path}: the surrogate of layer ${layer} (mlp) has no tensor '${prefix}.${k}'`);
  const { a, b, bias } = e as Required<typeof e>;
  const shape = (t: { shape: number[] }) => `[${t.shape.join(', ')}]`;
  if (a.shape.length !== 2 || a.shape[0] !== H || !(a.shape[1]! >= 1))
    throw new ModcError(`router file ${path}: tensor '${a.name}' has shape ${shape(a)}, expected [${H}, rank] (the model's hidden size, rank >= 1)`);
  const rank = a.shape[1]!;
  if (b.shape.length !== 2 || b.shape[0] !== rank || b.shape[1] !== H)
    throw new ModcError(`router file ${path}: tensor '${b.name}' has shape ${shape(b)}, expected [${rank}, ${H}] (rank from '${a.name}', the hidden size)`);
  if (bias.shape.length !== 1 || bias.shape[0] !== H)
    throw new ModcError(`router file ${path}: tensor '${bias.name}' has shape ${shape(bias)}, expected [${H}] (the model's hidden size)`);
  return { rank, a: a.values, b: b.values, bias: bias.values };
}

function describePart(layer: number, part: RoutedPart): string {
  return part === 'block' ? `layer ${layer}` : `layer ${layer} (${part})`;
}

/** Validates the `modc` metadata entry: one-line errors naming what does not fit. */
function checkMetadata(text: string, path: string, numLayers: number): RouterFileMetadata {
  let meta: unknown;
  try {
    meta = JSON.parse(text);
  } catch {
    throw new ModcError(`router file ${path}: __metadata__ '${METADATA_KEY}' is not JSON`);
  }
  if (typeof meta !== 'object' || meta === null || Array.isArray(meta))
    throw new ModcError(`router file ${path}: __metadata__ '${METADATA_KEY}' must be a JSON object`);
  const m = meta as Record<string, unknown>;
  const bad = (what: string) => new ModcError(`router file ${path}: __metadata__ '${METADATA_KEY}': ${what}`);
  if (m.mode !== undefined && m.mode !== 'threshold' && m.mode !== 'topk') throw bad(`mode must be "threshold" or "topk", got ${JSON.stringify(m.mode)}`);
  if (m.gated !== undefined && typeof m.gated !== 'boolean') throw bad(`gated must be true or false, got ${JSON.stringify(m.gated)}`);
  if (m.layers !== undefined) {
    if (!Array.isArray(m.layers)) throw bad('layers must be a list');
    m.layers.forEach((raw: unknown, i) => {
      const e = (raw ?? {}) as Record<string, unknown>;
      const at = `layers[${i}]`;
      if (!Number.isInteger(e.layer) || (e.layer as number) < 0 || (e.layer as number) >= numLayers)
        throw bad(`${at}.layer must be a layer index 0-${numLayers - 1}, got ${JSON.stringify(e.layer)}`);
      if (e.part === undefined) e.part = 'block';
      if (!ROUTED_PARTS.includes(e.part as RoutedPart)) throw bad(`${at}.part must be block, attention, mlp or kv, got ${JSON.stringify(e.part)}`);
      if (e.capacity !== undefined && !(typeof e.capacity === 'number' && e.capacity >= 0 && e.capacity <= 1))
        throw bad(`${at}.capacity must be in [0, 1], got ${JSON.stringify(e.capacity)}`);
      if (e.threshold !== undefined && !(typeof e.threshold === 'number' && e.threshold >= 0 && e.threshold <= 1))
        throw bad(`${at}.threshold must be in [0, 1], got ${JSON.stringify(e.threshold)}`);
    });
  }
  if (m.kv !== undefined) {
    if (typeof m.kv !== 'object' || m.kv === null || Array.isArray(m.kv)) throw bad(`kv must be an object { sinks, window }, got ${JSON.stringify(m.kv)}`);
    const problem = kvPolicyProblem(m.kv as Record<string, unknown>);
    if (problem) throw bad(`kv.${problem}`);
  }
  return m as RouterFileMetadata;
}

function decode(slice: Buffer, dtype: string, count: number): Float32Array {
  const values = new Float32Array(count);
  if (dtype === 'F32') for (let i = 0; i < count; i++) values[i] = slice.readFloatLE(i * 4);
  else if (dtype === 'F16') for (let i = 0; i < count; i++) values[i] = halfToFloat(slice.readUInt16LE(i * 2));
  else {
    // bfloat16: the upper half of a float32.
    const bits = new Uint32Array(values.buffer);
    for (let i = 0; i < count; i++) bits[i] = slice.readUInt16LE(i * 2) << 16;
  }
  return values;
}

function encode(values: Float32Array, dtype: RouterDtype): Buffer {
  if (dtype === 'F32') return Buffer.from(values.buffer, values.byteOffset, values.byteLength);
  const out = Buffer.alloc(values.length * 2);
  if (dtype === 'F16') values.forEach((v, i) => out.writeUInt16LE(floatToHalf(v), i * 2));
  else {
    const bits = new Uint32Array(Float32Array.from(values).buffer);
    bits.forEach((b, i) => {
      // Round to nearest even; NaN stays NaN.
      const rounded = (b & 0x7fffffff) > 0x7f800000 ? (b >>> 16) | 0x40 : (b + 0x7fff + ((b >>> 16) & 1)) >>> 16;
      out.writeUInt16LE(rounded & 0xffff, i * 2);
    });
  }
  return out;
}

function parseSafetensors(bytes: Buffer, path: string): { tensors: Map<string, { shape: number[]; values: Float32Array }>; metadata: string | null } {
  if (bytes.length < 8) throw new ModcError(`router file ${path}: too short to be safetensors`);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  if (headerLength <= 0 || 8 + headerLength > bytes.length)
    throw new ModcError(`router file ${path}: not a safetensors file (header length ${headerLength} does not fit a ${bytes.length}-byte file)`);
  let header: Record<string, SafetensorsEntry | Record<string, string>>;
  try {
    header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8'));
  } catch {
    throw new ModcError(`router file ${path}: not a safetensors file (header is not JSON)`);
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header))
    throw new ModcError(`router file ${path}: not a safetensors file (header is not a JSON object)`);
  const data = bytes.subarray(8 + headerLength);
  const out = new Map<string, { shape: number[]; values: Float32Array }>();
  let metadata: string | null = null;
  for (const [name, raw] of Object.entries(header)) {
    if (name === '__metadata__') {
      const m = (raw ?? {}) as Record<string, unknown>;
      if (m[METADATA_KEY] !== undefined) {
        if (typeof m[METADATA_KEY] !== 'string')
          throw new ModcError(`router file ${path}: __metadata__ '${METADATA_KEY}' must be a string (safetensors metadata maps strings to strings)`);
        metadata = m[METADATA_KEY] as string;
      }
      continue;
    }
    const e = (raw ?? {}) as SafetensorsEntry;
    const shape = Array.isArray(e.shape) && e.shape.every((d) => Number.isInteger(d) && d >= 0) ? e.shape : null;
    if (!shape) throw new ModcError(`router file ${path}: tensor '${name}' has no valid shape`);
    const [begin, end] = Array.isArray(e.data_offsets) ? e.data_offsets : [];
    const count = shape.reduce((a, b) => a * b, 1);
    const width = WIDTH[e.dtype] ?? 0;
    if (!width) throw new ModcError(`router file ${path}: tensor '${name}' has dtype ${e.dtype}, expected F32, F16 or BF16`);
    if (!Number.isInteger(begin) || !Number.isInteger(end) || begin! < 0 || end! - begin! !== count * width || end! > data.length) {
      throw new ModcError(`router file ${path}: tensor '${name}' has data offsets [${begin}, ${end}] that do not fit its shape or the file`);
    }
    out.set(name, { shape, values: decode(data.subarray(begin, end), e.dtype, count) });
  }
  return { tensors: out, metadata };
}

/**
 * Writes routers as a safetensors file (F32 unless `opts.dtype` says F16 or BF16; thresholds and
 * biases always F32), with `metadata` under `__metadata__.modc`.
 */
export function writeRouterFile(
  path: string,
  routers: readonly LayerRouter[],
  metadata?: RouterFileMetadata,
  opts: { dtype?: RouterDtype; replaced?: readonly ReplacedPart[] } = {},
): void {
  const dtype = opts.dtype ?? 'F32';
  const entries: [string, RouterDtype, number[], Buffer][] = [];
  const surrogate = (prefix: string, s: Surrogate) => {
    const H = s.bias.length;
    entries.push([`${prefix}.surrogate.a`, dtype, [H, s.rank], encode(s.a, dtype)]);
    entries.push([`${prefix}.surrogate.b`, dtype, [s.rank, H], encode(s.b, dtype)]);
    entries.push([`${prefix}.surrogate.bias`, dtype, [H], encode(s.bias, dtype)]);
  };
  const all: (LayerRouter | ReplacedPart)[] = [...routers, ...(opts.replaced ?? [])];
  for (const r of all.sort(compareParts)) {
    const prefix = routerTensorPrefix(r.layer, r.part);
    if ('weight' in r) {
      entries.push([`${prefix}.weight`, dtype, [r.weight.length], encode(r.weight, dtype)]);
      entries.push([`${prefix}.bias`, 'F32', [], encode(Float32Array.of(r.bias), 'F32')]);
      if (r.threshold !== undefined) entries.push([`${prefix}.threshold`, 'F32', [], encode(Float32Array.of(r.threshold), 'F32')]);
    }
    if (r.surrogate) {
      if (r.part !== 'mlp') throw new ModcError(`layer ${r.layer} (${r.part ?? 'block'}): only an MLP part has a surrogate`);
      surrogate(prefix, r.surrogate);
    }
  }
  const header: Record<string, SafetensorsEntry | Record<string, string>> = {};
  if (metadata) header.__metadata__ = { [METADATA_KEY]: JSON.stringify(metadata) };
  let offset = 0;
  for (const [name, dt, shape, bytes] of entries) {
    header[name] = { dtype: dt, shape, data_offsets: [offset, offset + bytes.length] };
    offset += bytes.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const headerBytes = Buffer.from(json, 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(headerBytes.length));
  writeFileSync(path, Buffer.concat([len, headerBytes, ...entries.map((e) => e[3])]));
}

/**
 * Every token selected: w = 0 and b = 20, so r = sigmoid(20) rounds to 1 in float32 and a gated
 * layer also reproduces the original (x + 1 * (y - x)).
 */
export function allPassRouters(layers: readonly number[], hiddenSize: number, part: RoutedPart = 'block'): LayerRouter[] {
  return layers.map((layer) => ({ layer, part, weight: new Float32Array(hiddenSize), bias: 20 }));
}

/**
 * Seeded random routers: w ~ U(-1, 1) / sqrt(H), b = 0. A token scores above 0 when its stream
 * projects positively on w: about half the tokens of a random-weight model, but a trained
 * model's stream shares a large component across tokens, so there the share can be none or all.
 */
export function randomRouters(layers: readonly number[], hiddenSize: number, seed: number, part: RoutedPart = 'block'): LayerRouter[] {
  const next = mulberry32(seed);
  const scale = 1 / Math.sqrt(hiddenSize);
  return layers.map((layer) => ({ layer, part, weight: Float32Array.from({ length: hiddenSize }, () => (next() * 2 - 1) * scale), bias: 0 }));
}
