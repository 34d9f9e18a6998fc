/**
 * ModSession: one API to run a decoder, original or modc-compiled, over a prompt (prefill) and
 * then token by token, keeping the KV caches between calls.
 *
 *   const s = await ModSession.create('model.onnx');
 *   const p = await s.forward([[5, 6, 7], [8, 9]]);   // logits [B, S, V]
 *   const d = await s.step([10, 11]);                 // logits [B, 1, V]
 *
 * Rows of different lengths are padded with token 0 and masked (on the left by default; right,
 * the only side it takes, for GroupQueryAttention); positions
 * count real tokens only (cumsum(mask) - 1, as Hugging Face does), so padding never shifts them.
 */
import { ModcError } from '../core/errors.js';
import { loadModel } from '../core/io/load.js';
import { logitsPositions, type LogitsPositions } from '../metadata/logits-metadata.js';
import { decoderIo, type DecoderIo, type KvBinding, type MaskElement, type PadSide, resolvePadSide, staticCacheDims } from '../metadata/decoder-io.js';
import { type EmbeddingSource, embedsTensor, TokenEmbedder } from './embeddings.js';
import { compactRows, compactTensor, prefixSlots, prefixValid, validCounts, validSlots, worthCompacting } from './kv-compaction.js';
import { createSession, emptyTensor, ort, toFloat32, type SessionOptions } from './ort.js';

export interface Logits {
  /** Row-major [batch, positions, vocab]. */
  data: Float32Array;
  dims: [number, number, number];
}

export interface ForwardOptions {
  pad?: 'left' | 'right';
}

export interface ModSessionOptions extends SessionOptions {
  embeddings?: EmbeddingSource;
  /** A model taking the caller's 4-D attention mask: which keys each query attends (default causal). */
  maskRule?: MaskRule;
}

export interface GenerateOptions {
  maxNewTokens: number;
  /** Feed these ids (one per step, the same for every row) instead of the argmax. */
  force?: number[];
  pad?: 'left' | 'right';
  /** The prompt as embeddings [B, S, H] (inputs_embeds decoders); the prompt ids are then ignored. */
  embeds?: { data: Float32Array; dims: [number, number, number] };
  /** Called after the prefill (0) and after each decode step (1..maxNewTokens). */
  onStep?: (done: number) => void;
}

export interface GenerateResult {
  /** Per row: the prompt (unpadded) followed by the generated tokens. */
  ids: number[][];
  /** After the prefill and after each fed token: the last position's logits per row. */
  steps: Float32Array[][];
}

/** What ModSession.checkpoint() keeps: the state a step() reads, opaque to callers. */
export interface SessionCheckpoint {
  readonly session: object;
  readonly mask: readonly number[][];
  readonly caches: ReadonlyMap<string, ort.Tensor>;
  readonly states: ReadonlyMap<string, ort.Tensor>;
  readonly lengths: ReadonlyMap<number, readonly number[]>;
  readonly valid: ReadonlyMap<number, ort.Tensor>;
  readonly positions: ReadonlyMap<string, ort.Tensor>;
}

/** A copy of the state a step() reads, fresh maps and arrays around the same tensors (a session clears its maps on a new prompt). */
function copyState(s: Omit<SessionCheckpoint, 'session'>) {
  return {
    mask: s.mask.map((m) => [...m]),
    caches: new Map(s.caches),
    states: new Map(s.states),
    lengths: new Map([...s.lengths].map(([l, v]) => [l, [...v]])),
    valid: new Map(s.valid),
    positions: new Map(s.positions),
  };
}

/**
 * Which keys a query may attend in a model that takes the caller's 4-D attention mask, in
 * sequence-index coordinates (every token fed so far, padding included): `query` and `key` are
 * indices below the context length, `row` the batch row. Padding keys are masked whatever it says.
 */
export type MaskRule = (row: number, query: number, key: number) => boolean;

/** The causal rule: a query attends itself and every key before it. */
export const causalMask: MaskRule = (_row, query, key) => key <= query;

/**
 * The attention_mask feed for `mask` (per row, over every token fed so far: 1 real, 0 padding):
 * the 2-D mask itself, or for a model taking the caller's 4-D mask, [B, 1, M, M] with
 * m[b, 0, i, j] = rule(b, i, j) and key j real, for i, j below the context length (0 elsewhere;
 * M the model's size, or the context length when the model leaves it open). A context longer
 * than M is refused.
 */
export function maskFeed(io: DecoderIo, mask: number[][], rule: MaskRule = causalMask): ort.Tensor | null {
  const binding = io.attentionMask;
  if (!binding) return null;
  const B = mask.length;
  const T = mask[0]!.length;
  if (!binding.caller4d) return typed(binding.dtype, mask.flat(), [B, T]);
  const M = binding.caller4d.size ?? T;
  checkMaskContext(io, T);
  const data = new Uint8Array(B * M * M);
  for (let b = 0; b < B; b++) for (let i = 0; i < T; i++) for (let j = 0; j < T; j++) if (mask[b]![j] && rule(b, i, j)) data[(b * M + i) * M + j] = 1;
  return maskTensor(binding.caller4d.dtype, data, [B, 1, M, M]);
}

/** A 0/1 mask in the model's element type. */
export function maskTensor(dtype: MaskElement, data: Uint8Array, dims: number[]): ort.Tensor {
  switch (dtype) {
    case 'bool':
      return new ort.Tensor('bool', data, dims);
    case 'float16':
      return new ort.Tensor(
        'float16',
        Uint16Array.from(data, (v) => (v ? 0x3c00 : 0)),
        dims,
      );
    case 'int32':
      return new ort.Tensor('int32', Int32Array.from(data), dims);
    case 'int64':
      return new ort.Tensor('int64', BigInt64Array.from(data, BigInt), dims);
    default:
      return new ort.Tensor('float32', Float32Array.from(data), dims);
  }
}

/** Refuses a context (every token fed, padding included) longer than the caller's 4-D mask covers. */
export function checkMaskContext(io: DecoderIo, length: number): void {
  const size = io.attentionMask?.caller4d?.size;
  if (size != null && length > size)
    throw new ModcError(
      `a context of ${length} tokens (padding included) is longer than the model's ${size}-position attention mask (${io.attentionMask!.name})`,
    );
}

/** A compiled model's past_sequence_length feed: every row's tokens fed before this call of `S`, padding included. */
export function sequenceLengthFeeds(io: DecoderIo, mask: number[][], S: number): Record<string, ort.Tensor> {
  if (!io.sequenceLength) return {};
  const before = mask[0]!.length - S;
  return { [io.sequenceLength.past]: typed('int64', Array(mask.length).fill(before), [mask.length]) };
}

export function typed(dtype: 'int32' | 'int64', values: number[], dims: number[]): ort.Tensor {
  return dtype === 'int32' ? new ort.Tensor('int32', Int32Array.from(values), dims) : new ort.Tensor('int64', BigInt64Array.from(values, BigInt), dims);
}

/** A prompt's rows padded to one width: flat ids and the per-row mask (1 = real token). */
export function padRows(rows: number[][], side: 'left' | 'right'): { ids: number[]; mask: number[][]; width: number } {
  if (rows.length === 0 || rows.some((r) => r.length === 0)) throw new ModcError('every row needs at least one token');
  const width = Math.max(...rows.map((r) => r.length));
  const ids: number[] = [];
  const mask = rows.map((r) => {
    const pad = Array(width - r.length).fill(0);
    ids.push(...(side === 'left' ? [...pad, ...r] : [...r, ...pad]));
    const m = r.map(() => 1);
    return side === 'left' ? [...pad, ...m] : [...m, ...pad];
  });
  return { ids, mask, width };
}

/** Positions count real tokens only: cumsum(mask) - 1, clipped at 0 (as Hugging Face does). */
export function promptPositions(mask: number[][]): number[] {
  return mask.flatMap((m) => {
    let seen = -1;
    return m.map((v) => Math.max(0, (seen += v)));
  });
}

/** The position of the next token of each row: how many real tokens it has so far. */
export function nextPositions(mask: number[][]): number[] {
  return mask.map((m) => m.reduce((a, v) => a + v, 0));
}

export class ModSession {
  /** Per row: 1 for a real token, 0 for padding, over every token fed so far. */
  private mask: number[][] = [];
  private caches = new Map<string, ort.Tensor>();
  /** State besides the KV cache (hybrid models), by past input name. */
  private states = new Map<string, ort.Tensor>();
  private lengths = new Map<number, number[]>();
  /** Routed layers with per-slot validity (past_valid.l): which slots of the cache hold a token, bool [B, T], by layer. */
  private valid = new Map<number, ort.Tensor>();
  /** Sliding-window layers of a compiled model: the original position of each cache slot, by past input name. */
  private positions = new Map<string, ort.Tensor>();
  /** Every output of the last call, by name: logits, presents, and outputs a tool added (modc eval's selection masks). */
  lastOutputs: ort.InferenceSession.OnnxValueMapType = {};

  /** @param logits 'last': the model gives each row's last real position only ([B, 1, V], `modc compile --logits last`). */
  private constructor(
    readonly session: ort.InferenceSession,
    readonly io: DecoderIo,
    readonly path: string,
    readonly logits: LogitsPositions,
    private readonly embedder: TokenEmbedder | null,
    private readonly maskRule: MaskRule = causalMask,
  ) {}

  /**
   * `embeddings` applies to decoders fed by inputs_embeds: where token ids get their embeddings
   * (default: seeded random embeddings, seed 0, the same in every session and the reference).
   */
  static async create(path: string, opts: ModSessionOptions = {}): Promise<ModSession> {
    const model = loadModel(path);
    const io = decoderIo(model);
    const embedder = io.inputsEmbeds ? await TokenEmbedder.create(io, opts.embeddings ?? { kind: 'random', seed: 0 }, opts) : null;
    return new ModSession(await createSession(path, opts), io, path, logitsPositions(model), embedder, opts.maskRule);
  }

  get batch(): number {
    return this.mask.length;
  }

  /** The padding side a forward with `asked` uses (the model's default when undefined); refuses a side the model cannot take. */
  padSide(asked?: PadSide): PadSide {
    return resolvePadSide(this.io, asked);
  }

  /** Per row, over every token fed so far: 1 for a real token, 0 for padding. */
  attentionMask(): number[][] {
    return this.mask.map((m) => [...m]);
  }

  /** Runs the prompt (past length 0) and keeps the caches. */
  async forward(rows: number[][], opts: ForwardOptions = {}): Promise<Logits> {
    checkUnpadded(this.io, rows);
    const { ids, mask, width } = padRows(rows, this.padSide(opts.pad));
    this.checkVocab(ids);
    this.begin(mask);
    return this.run(ids, [rows.length, width], promptPositions(this.mask));
  }

  /**
   * Runs a prompt given as embeddings [B, S, H] (row-major; every position real) on a decoder fed
   * by inputs_embeds; later steps embed their ids through the session's embedding source.
   */
  async forwardEmbeds(data: Float32Array, dims: [number, number, number]): Promise<Logits> {
    const e = this.io.inputsEmbeds;
    if (!e) throw new ModcError(`${this.path} takes input_ids, not embeddings`);
    const [B, S, H] = dims;
    if (H !== e.hiddenSize || data.length !== B * S * H)
      throw new ModcError(`embeddings [${dims.join(', ')}] do not fit the model's hidden size ${e.hiddenSize}`);
    this.begin(Array.from({ length: B }, () => Array(S).fill(1)));
    return this.run(Array(B * S).fill(0), [B, S], promptPositions(this.mask), embedsTensor(data, dims, e.dtype));
  }

  /**
   * The sequence so far (mask, caches, states), to come back to with restore(): a snapshot of
   * references, not copies, since a call never writes into the tensors it was fed. A checkpoint
   * taken after a prompt lets every later step start from the same context (retries, branches,
   * benchmarks that time one context length over and over).
   */
  checkpoint(): SessionCheckpoint {
    const { mask, caches, states, lengths, valid, positions } = this;
    return { session: this, ...copyState({ mask, caches, states, lengths, valid, positions }) };
  }

  /** Returns to a checkpoint() taken on this ModSession: the next step() continues from there. */
  restore(c: SessionCheckpoint): void {
    if (c.session !== this) throw new ModcError('restore() takes a checkpoint of the same session');
    ({ mask: this.mask, caches: this.caches, states: this.states, lengths: this.lengths, valid: this.valid, positions: this.positions } = copyState(c));
  }

  /** Starts a sequence: the mask, empty caches, zero state. */
  private begin(mask: number[][]): void {
    this.checkContext(mask, 0);
    this.mask = mask;
    this.caches.clear();
    this.lengths.clear();
    this.valid.clear();
    this.positions.clear();
    const B = mask.length;
    for (const b of this.io.kv) {
      const dims = initialCacheDims(this.io, b, B);
      this.caches.set(b.pastKey, emptyTensor(b.dtype, dims));
      if (b.pastValue) this.caches.set(b.pastValue, emptyTensor(b.dtype, dims));
      if (b.pastLength) this.lengths.set(b.layer, Array(B).fill(0));
      if (b.pastValid) this.valid.set(b.layer, new ort.Tensor('bool', new Uint8Array(0), [B, 0]));
      if (b.pastPositions) this.positions.set(b.pastPositions, initialPositions(this.io, b, B));
    }
    this.states = zeroStates(this.io, B);
  }

  /** Feeds one token per row on top of the caches. */
  async step(next: number[]): Promise<Logits> {
    if (this.mask.length === 0) throw new ModcError('step() before forward(): run the prompt first');
    if (next.length !== this.batch) throw new ModcError(`step() got ${next.length} ids for a batch of ${this.batch}`);
    this.checkVocab(next);
    this.checkContext(this.mask, 1);
    const positions = nextPositions(this.mask);
    this.mask = this.mask.map((m) => [...m, 1]);
    return this.run(next, [this.batch, 1], positions);
  }

  /**
   * Feeds the same number of tokens per row on top of the caches: a prompt in chunks (forward()
   * the first, extend() the rest), which keeps a long prompt's attention scores chunk-sized.
   */
  async extend(rows: number[][]): Promise<Logits> {
    if (this.mask.length === 0) throw new ModcError('extend() before forward(): run the first chunk with forward()');
    if (rows.length !== this.batch) throw new ModcError(`extend() got ${rows.length} rows for a batch of ${this.batch}`);
    const n = rows[0]!.length;
    if (n === 0 || rows.some((r) => r.length !== n)) throw new ModcError('extend() needs the same number of tokens, at least one, in every row');
    const ids = rows.flat();
    this.checkVocab(ids);
    this.checkContext(this.mask, n);
    const positions = nextPositions(this.mask).flatMap((p) => Array.from({ length: n }, (_, i) => p + i));
    this.mask = this.mask.map((m) => [...m, ...Array<number>(n).fill(1)]);
    return this.run(ids, [this.batch, n], positions);
  }

  async generate(prompt: number[][], opts: GenerateOptions): Promise<GenerateResult> {
    if (opts.force && opts.force.length !== opts.maxNewTokens) {
      throw new ModcError(`--force has ${opts.force.length} ids but --max-new is ${opts.maxNewTokens}: give one id per new token`);
    }
    const ids = opts.embeds ? Array.from({ length: opts.embeds.dims[0] }, () => [] as number[]) : prompt.map((r) => [...r]);
    const steps: Float32Array[][] = [];
    let logits = opts.embeds ? await this.forwardEmbeds(opts.embeds.data, opts.embeds.dims) : await this.forward(prompt, { pad: opts.pad });
    steps.push(this.lastReal(logits));
    opts.onStep?.(0);
    for (let t = 0; t < opts.maxNewTokens; t++) {
      const next = opts.force ? Array(this.batch).fill(opts.force[t]) : steps.at(-1)!.map(argmax);
      next.forEach((id, b) => ids[b]!.push(id));
      logits = await this.step(next);
      steps.push(lastPosition(logits));
      opts.onStep?.(t + 1);
    }
    return { ids, steps };
  }

  /**
   * Each row's logits at its last real token of the latest call: the one position a
   * `--logits last` model gives, or, from all positions, the last one the mask marks real.
   */
  lastReal(l: Logits): Float32Array[] {
    const [B, S, V] = l.dims;
    return Array.from({ length: B }, (_, b) => {
      const m = this.mask[b]!;
      let t = S - 1;
      while (t > 0 && m[m.length - S + t] === 0) t--;
      return l.data.slice((b * S + t) * V, (b * S + t + 1) * V);
    });
  }

  /**
   * Bytes the KV cache tensors hold now (all layers, padding slots included; a routed layer's
   * slots that hold no token too, until they are compacted).
   */
  kvBytes(): number {
    let total = 0;
    for (const t of this.caches.values()) total += t.dims.reduce((a, b) => a * b, 1) * (t.type === 'float16' ? 2 : 4);
    return total;
  }

  /** Per layer, per row: how many real tokens that layer's cache holds. */
  layerCacheLengths(): number[][] {
    const real = this.mask.map((m) => m.reduce((a, v) => a + v, 0));
    return this.io.kv.map((b) => {
      const valid = this.valid.get(b.layer);
      return valid ? validCounts(valid) : (this.lengths.get(b.layer) ?? real);
    });
  }

  /**
   * Compacts every routed layer's cache now: each row's tokens first, cut to the longest row
   * (kv-compaction.ts). After each call the session compacts a layer on its own once more than a
   * quarter of its slots would go; batch-1 caches never need it.
   */
  compact(): void {
    for (const b of this.io.kv) this.compactLayer(b, true);
  }

  private compactLayer(b: KvBinding, always: boolean): void {
    if (b.layout.startsWith('static')) return;
    const valid = this.valid.get(b.layer);
    const lengths = this.lengths.get(b.layer);
    const counts = valid ? validCounts(valid) : lengths;
    if (!counts) return;
    const combined = b.layout === 'combined-2BHTD';
    const T = this.caches.get(b.pastKey)!.dims[combined ? 3 : 2]!;
    if (Math.max(0, ...counts) === T || (!always && !worthCompacting(counts, T))) return;
    const slots = valid ? validSlots(valid) : prefixSlots(counts);
    for (const name of [b.pastKey, b.pastValue]) if (name) this.caches.set(name, compactTensor(this.caches.get(name)!, slots, combined));
    if (valid) this.valid.set(b.layer, prefixValid(counts));
    if (b.pastPositions) this.positions.set(b.pastPositions, compactRows(this.positions.get(b.pastPositions)!, slots));
  }

  /** Refuses a context (`mask` plus `adding` tokens per row) needing positions the model has no table rows for. */
  private checkContext(mask: number[][], adding: number): void {
    checkMaskContext(this.io, mask[0]!.length + adding);
    const max = this.io.maxPositions;
    const longest = Math.max(...nextPositions(mask)) + adding;
    if (max !== null && longest > max) throw new ModcError(`a context of ${longest} tokens is longer than the model's ${max} positions`);
  }

  private checkVocab(ids: number[]): void {
    const V = this.io.vocabSize;
    const bad = ids.find((id) => !Number.isInteger(id) || id < 0 || (V !== null && id >= V));
    if (bad !== undefined) throw new ModcError(`token id ${bad} is outside the vocabulary${V !== null ? ` (0-${V - 1})` : ''}`);
  }

  private async run(ids: number[], dims: [number, number], positions: number[], embeds?: ort.Tensor): Promise<Logits> {
    const io = this.io;
    const feeds: Record<string, ort.Tensor> = io.inputsEmbeds
      ? { [io.inputsEmbeds.name]: embeds ?? (await this.embedder!.embed(ids, dims)) }
      : { [io.inputIds.name]: typed(io.inputIds.dtype, ids, dims) };
    const mask = maskFeed(io, this.mask, this.maskRule);
    if (mask) feeds[io.attentionMask!.name] = mask;
    Object.assign(feeds, sequenceLengthFeeds(io, this.mask, dims[1]));
    if (io.positionIds) feeds[io.positionIds.name] = typed(io.positionIds.dtype, positions, dims);
    for (const [name, t] of this.caches) feeds[name] = t;
    for (const [name, t] of this.states) feeds[name] = t;
    for (const [name, t] of this.positions) feeds[name] = t;
    for (const b of io.kv) if (b.pastLength) feeds[b.pastLength] = typed('int64', this.lengths.get(b.layer)!, [this.batch]);
    for (const b of io.kv) if (b.pastValid) feeds[b.pastValid] = this.valid.get(b.layer)!;
    Object.assign(feeds, staticLengthFeeds(io, this.mask, dims[1]));
    let out: ort.InferenceSession.OnnxValueMapType;
    try {
      out = await this.session.run(feeds);
    } catch (e) {
      throw new ModcError(`onnxruntime failed running ${this.path}: ${(e as Error).message.split('\n')[0]}`);
    }
    this.lastOutputs = out;
    for (const b of io.kv) this.keepPresent(b, out);
    for (const s of io.state) this.states.set(s.past, out[s.present] as ort.Tensor);
    const logits = out[io.logits] as ort.Tensor;
    const [B, S, V] = logits.dims as [number, number, number];
    return { data: toFloat32(logits), dims: [B, S, V] };
  }

  private keepPresent(b: KvBinding, out: ort.InferenceSession.OnnxValueMapType): void {
    this.caches.set(b.pastKey, out[b.presentKey] as ort.Tensor);
    if (b.pastValue) this.caches.set(b.pastValue, out[b.presentValue!] as ort.Tensor);
    if (b.presentLength) {
      const t = out[b.presentLength] as ort.Tensor;
      this.lengths.set(b.layer, Array.from(t.data as BigInt64Array, Number));
    }
    if (b.presentValid) this.valid.set(b.layer, out[b.presentValid] as ort.Tensor);
    if (b.pastPositions && b.presentPositions) this.positions.set(b.pastPositions, out[b.presentPositions] as ort.Tensor);
    this.compactLayer(b, false);
  }
}

/**
 * A layer's cache before the first call: empty ([.., 0, ..]) for a growing cache; for a static
 * cache (TensorScatter) a zero buffer of the model's length (or `io.staticCacheLength` slots when
 * the model leaves it open, as a compiled layer's own buffer does).
 */
export function initialCacheDims(io: DecoderIo, b: KvBinding, B: number): number[] {
  if (b.layout === 'static-BTH' || b.layout === 'static-BHTD') return staticCacheDims(b, B, b.maxLength ?? io.staticCacheLength!);
  return b.layout === 'combined-2BHTD' ? [2, B, b.numHeads, 0, b.headSize] : [B, b.numHeads, 0, b.headSize];
}

/**
 * A compiled sliding-window layer's positions state before the first call: [B, 0] beside a
 * growing cache; beside a static one, a zero buffer of the cache's slots (written like the cache).
 */
export function initialPositions(io: DecoderIo, b: KvBinding, B: number): ort.Tensor {
  const slots = b.layout === 'static-BTH' || b.layout === 'static-BHTD' ? (b.maxLength ?? io.staticCacheLength!) : 0;
  return typed('int64', Array<number>(B * slots).fill(0), [B, slots]);
}

/**
 * Static caches' length inputs for a call of `S` tokens per row, from the mask over every token fed
 * so far (right padding): write_indices = the row's real tokens before the call, nonpad_kv_seqlen =
 * after it. Refuses a call that would write past a buffer's end.
 */
export function staticLengthFeeds(io: DecoderIo, mask: number[][], S: number): Record<string, ort.Tensor> {
  if (!io.writeIndices && !io.nonpadKvSeqlen) return {};
  const after = mask.map((m) => m.reduce((a, v) => a + v, 0));
  const before = mask.map((m, b) => after[b]! - m.slice(m.length - S).reduce((a, v) => a + v, 0));
  const slots = Math.min(...io.kv.filter((b) => b.layout.startsWith('static')).map((b) => b.maxLength ?? io.staticCacheLength!));
  const need = Math.max(...before) + S;
  if (need > slots) throw new ModcError(`a context of ${need} tokens does not fit the model's static KV cache of ${slots} slots`);
  const feeds: Record<string, ort.Tensor> = {};
  if (io.writeIndices) feeds[io.writeIndices.name] = typed(io.writeIndices.dtype, before, [mask.length]);
  if (io.nonpadKvSeqlen) feeds[io.nonpadKvSeqlen.name] = typed(io.nonpadKvSeqlen.dtype, after, [mask.length]);
  return feeds;
}

/**
 * Refuses more than one row for a model that runs one row per call (DecoderIo.batchOne), and rows
 * of different lengths for a model that cannot mask padding (DecoderIo.unpaddable).
 */
export function checkUnpadded(io: DecoderIo, rows: number[][]): void {
  if (io.batchOne && rows.length > 1) throw new ModcError(`this model runs one row at a time (${io.batchOne}): give one row, not ${rows.length}`);
  if (io.unpaddable && rows.some((r) => r.length !== rows[0]!.length)) {
    throw new ModcError(`rows of different lengths need padding, which this model cannot mask (${io.unpaddable}): give rows of one length`);
  }
}

/** Every state input of the model, zeros for a batch of `B` (the start of a sequence). */
export function zeroStates(io: DecoderIo, B: number): Map<string, ort.Tensor> {
  return new Map(
    io.state.map((s) => [
      s.past,
      emptyTensor(
        s.dtype,
        s.dims.map((d) => (d < 0 ? B : d)),
      ),
    ]),
  );
}

/** The last position's logits of each row. */
export function lastPosition(l: Logits): Float32Array[] {
  const [B, S, V] = l.dims;
  return Array.from({ length: B }, (_, b) => l.data.slice((b * S + S - 1) * V, (b * S + S) * V));
}

export function argmax(v: Float32Array): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i]! > v[best]!) best = i;
  return best;
}
