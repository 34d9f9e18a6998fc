/**
 * Embeddings for decoders fed by `inputs_embeds` instead of `input_ids` (the text decoder of a
 * vision-language model: the token table lives in another model). Token ids become embeddings
 * through one of:
 * - `model`: the embedding model onnxruntime-genai's genai_config.json names beside the decoder
 *   (`model.embedding.filename`, input `input_ids`, output `inputs_embeds`);
 * - `random`: seeded random embeddings, a fixed vector per (seed, token id): enough to compare
 *   two models (verify, bench, tests), meaningless as text.
 * A prompt can also be given as a tensor file (`--embeds FILE`: .npy or .safetensors, [B, S, H] or [S, H]).
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, extname, join } from 'node:path';
import { ModcError, UsageError } from '../core/errors.js';
import { floatToHalf, halfToFloat } from '../core/ir/dtype.js';
import { mulberry32 } from '../core/random.js';
import type { DecoderIo } from '../metadata/decoder-io.js';
import { createSession, ort, type SessionOptions, toFloat32 } from './ort.js';

export type EmbeddingSource = { kind: 'random'; seed: number } | { kind: 'model'; path: string };

/** The embedding model genai_config.json beside `modelPath` names, if that file exists (an absent one is not an error). */
export function genaiEmbeddingModel(modelPath: string): string | null {
  const config = join(dirname(modelPath), 'genai_config.json');
  if (!existsSync(config)) return null;
  let parsed: { model?: { embedding?: { filename?: unknown } } };
  try {
    parsed = JSON.parse(readFileSync(config, 'utf8'));
  } catch (e) {
    throw new ModcError(`${config}: not valid JSON (${(e as Error).message})`);
  }
  const file = parsed.model?.embedding?.filename;
  if (typeof file !== 'string' || file === '') return null;
  const path = join(dirname(modelPath), file);
  return existsSync(path) ? path : null;
}

/** Turns token ids into the decoder's inputs_embeds tensor. */
export class TokenEmbedder {
  private constructor(
    private readonly io: NonNullable<DecoderIo['inputsEmbeds']>,
    private readonly source: EmbeddingSource,
    private readonly session: ort.InferenceSession | null,
  ) {}

  static async create(io: DecoderIo, source: EmbeddingSource, opts: SessionOptions = {}): Promise<TokenEmbedder> {
    if (!io.inputsEmbeds) throw new ModcError('the model takes input_ids, not inputs_embeds');
    const session = source.kind === 'model' ? await createSession(source.path, opts) : null;
    return new TokenEmbedder(io.inputsEmbeds, source, session);
  }

  get hiddenSize(): number {
    return this.io.hiddenSize;
  }

  async embed(ids: readonly number[], dims: [number, number]): Promise<ort.Tensor> {
    const H = this.io.hiddenSize;
    let data: Float32Array;
    if (this.session) {
      const out = await this.session.run({
        input_ids: new ort.Tensor(
          'int64',
          BigInt64Array.from(ids, (v) => BigInt(v)),
          dims,
        ),
      });
      const t = out['inputs_embeds'] ?? out[this.session.outputNames[0]!]!;
      data = toFloat32(t as ort.Tensor);
      if (data.length !== ids.length * H)
        throw new ModcError(
          `embedding model ${(this.source as { path: string }).path} gives ${data.length / ids.length} values per token, the decoder takes ${H}`,
        );
    } else {
      data = new Float32Array(ids.length * H);
      ids.forEach((id, i) => data.set(randomEmbedding((this.source as { seed: number }).seed, id, H), i * H));
    }
    return embedsTensor(data, [dims[0], dims[1], H], this.io.dtype);
  }

  async release(): Promise<void> {
    await this.session?.release();
  }
}

/** The seeded embedding of one token: uniform values with standard deviation 0.5. */
export function randomEmbedding(seed: number, id: number, H: number): Float32Array {
  const next = mulberry32((Math.imul(seed, 0x9e3779b1) ^ Math.imul(id + 1, 0x85ebca6b)) >>> 0);
  return Float32Array.from({ length: H }, () => (next() * 2 - 1) * Math.sqrt(3) * 0.5);
}

export function embedsTensor(data: Float32Array, dims: number[], dtype: 'float32' | 'float16'): ort.Tensor {
  return dtype === 'float16' ? new ort.Tensor('float16', Uint16Array.from(data, floatToHalf), dims) : new ort.Tensor('float32', data, dims);
}

/** A prompt of embeddings from a .npy or .safetensors file (float32 or float16), as [B, S, H]. */
export function readEmbedsFile(path: string, hiddenSize: number): { data: Float32Array; dims: [number, number, number] } {
  let bytes: Buffer;
  try {
    bytes = readFileSync(path);
  } catch (e) {
    throw new ModcError(`cannot read --embeds file ${path}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : (e as Error).message}`);
  }
  const { data, shape } = extname(path) === '.npy' ? readNpy(bytes, path) : readSafetensors(bytes, path);
  const dims = shape.length === 2 ? [1, shape[0]!, shape[1]!] : shape;
  if (dims.length !== 3 || dims[2] !== hiddenSize || dims[0] === 0 || dims[1] === 0) {
    throw new ModcError(`--embeds ${path}: expected a [batch, sequence, ${hiddenSize}] (or [sequence, ${hiddenSize}]) tensor, found [${shape.join(', ')}]`);
  }
  return { data, dims: dims as [number, number, number] };
}

function decode(bytes: Uint8Array, dtype: 'f4' | 'f2', count: number, path: string): Float32Array {
  const width = dtype === 'f4' ? 4 : 2;
  if (bytes.length !== count * width) throw new ModcError(`--embeds ${path}: ${bytes.length} data bytes for ${count} values`);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return Float32Array.from({ length: count }, (_, i) => (dtype === 'f4' ? view.getFloat32(i * 4, true) : halfToFloat(view.getUint16(i * 2, true))));
}

function readNpy(bytes: Buffer, path: string): { data: Float32Array; shape: number[] } {
  if (bytes.length < 10 || bytes.toString('latin1', 0, 6) !== '\x93NUMPY') throw new ModcError(`--embeds ${path}: not a .npy file`);
  const major = bytes[6]!;
  const headerLength = major === 1 ? bytes.readUInt16LE(8) : bytes.readUInt32LE(8);
  const start = major === 1 ? 10 : 12;
  const header = bytes.toString('latin1', start, start + headerLength);
  const descr = /'descr':\s*'([<|=]?)(f4|f2)'/.exec(header);
  if (!descr) throw new ModcError(`--embeds ${path}: only little-endian float32/float16 arrays are read (header ${header.trim()})`);
  if (/'fortran_order':\s*True/.test(header)) throw new ModcError(`--embeds ${path}: Fortran-ordered arrays are not read; save it C-ordered`);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header)?.[1] ?? '';
  const shape = shapeText
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '')
    .map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  return { data: decode(bytes.subarray(start + headerLength), descr[2] as 'f4' | 'f2', count, path), shape };
}

function readSafetensors(bytes: Buffer, path: string): { data: Float32Array; shape: number[] } {
  if (bytes.length < 8) throw new ModcError(`--embeds ${path}: neither .npy nor safetensors`);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  if (headerLength <= 0 || 8 + headerLength > bytes.length) throw new ModcError(`--embeds ${path}: not a safetensors file`);
  let header: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
  try {
    header = JSON.parse(bytes.toString('utf8', 8, 8 + headerLength));
  } catch {
    throw new ModcError(`--embeds ${path}: not a safetensors file (header is not JSON)`);
  }
  const names = Object.keys(header).filter((k) => k !== '__metadata__');
  const name = names.includes('inputs_embeds') ? 'inputs_embeds' : names.length === 1 ? names[0]! : undefined;
  if (!name) throw new ModcError(`--embeds ${path}: expected one tensor, or one named inputs_embeds (found ${names.join(', ') || 'none'})`);
  const t = header[name]!;
  const dtype = t.dtype === 'F32' ? 'f4' : t.dtype === 'F16' ? 'f2' : null;
  if (!dtype) throw new ModcError(`--embeds ${path}: tensor ${name} is ${t.dtype}; F32 or F16 expected`);
  const body = bytes.subarray(8 + headerLength);
  const [a, b] = t.data_offsets;
  return {
    data: decode(
      body.subarray(a, b),
      dtype,
      t.shape.reduce((x, y) => x * y, 1),
      path,
    ),
    shape: t.shape,
  };
}

export interface EmbeddingChoice {
  source: EmbeddingSource;
  /** A prompt given as embeddings (`--embeds FILE`). */
  prompt: { data: Float32Array; dims: [number, number, number] } | null;
}

/**
 * What a runner's `--embeds` flag means for the model at `modelPath`: null for a model fed by
 * input_ids (where the flag is refused). For an inputs_embeds decoder: `random` (seeded
 * embeddings), a .npy/.safetensors prompt file, or, with no flag, the embedding model
 * genai_config.json names beside the decoder; without one, a one-line error says what to give.
 */
export function embeddingChoice(modelPath: string, io: DecoderIo, flag: string | undefined): EmbeddingChoice | null {
  if (!io.inputsEmbeds) {
    if (flag !== undefined) throw new UsageError(`--embeds is for decoders fed by inputs_embeds; ${modelPath} takes input_ids`);
    return null;
  }
  const model = genaiEmbeddingModel(modelPath);
  const tokens: EmbeddingSource = model ? { kind: 'model', path: model } : { kind: 'random', seed: 0 };
  if (flag === 'random') return { source: { kind: 'random', seed: 0 }, prompt: null };
  if (flag !== undefined) return { source: tokens, prompt: readEmbedsFile(flag, io.inputsEmbeds.hiddenSize) };
  if (!model)
    throw new UsageError(
      `${modelPath} takes inputs_embeds: give --embeds FILE (.npy or .safetensors), or --embeds random, or put the embedding model genai_config.json names beside it`,
    );
  return { source: tokens, prompt: null };
}
