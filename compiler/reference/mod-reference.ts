/**
 * The MoD reference executor: SPEC.md implemented directly, as the oracle compiled models are
 * checked against. It runs the ORIGINAL model cut into units (prefix, one ONNX model per layer,
 * suffix) and does routing, selection, gather and scatter itself in TypeScript:
 *
 * - an unconverted layer runs on every token with a full cache, as in the original model;
 * - a converted layer runs row by row (batch 1, no padding) on that row's selected tokens only,
 *   as if they were the whole sequence: its keys are those tokens plus the tokens this layer
 *   selected before (its own cache, in order), its masks and rotary angles come from the
 *   original prefix run on exactly that view (original positions, a mask of ones);
 * - out = x + g * (y - x) for selected tokens (g = sigmoid(score), or 1 ungated), x elsewhere.
 *
 * Nothing here uses the modc ops or the compiled graph's rewiring, so the two can only agree if
 * both implement the semantics.
 */
import { join } from 'node:path';
import { analyzeDecoder } from '../analysis/analyze.js';
import { extractDecoder, type LayerUnit } from '../analysis/extract.js';
import { LayerByLayerRunner, type LoadedUnit } from '../analysis/layer-executor.js';
import { ModcError } from '../errors.js';
import { loadModel } from '../io/load.js';
import { floatToHalf } from '../ir/dtype.js';
import type { LayerPlan, RoutingPlan } from '../routing-plan.js';
import { decoderIo, type DecoderIo, type KvBinding, resolvePadSide } from '../runtime/decoder-io.js';
import { type EmbeddingSource, TokenEmbedder } from '../runtime/embeddings.js';
import { emptyTensor, ort, toFloat32, type SessionOptions } from '../runtime/ort.js';
import { type Logits, nextPositions, padRows, promptPositions, typed, zeroStates } from '../runtime/session.js';
import { splitFusedBoundaries } from '../../passes/split-fused-boundaries.js';
import * as kernels from '../../runtime-ops/reference.js';

type Values = Map<string, ort.Tensor>;

/** One converted layer's cache for one row: [1, kvH, L, D] (or [2, 1, H, L, D]) tensors. */
interface RowCache {
  key: ort.Tensor;
  value: ort.Tensor | null;
  length: number;
}

/** A [1|B, S, H] residual tensor as float32 rows, and back in its own dtype. */
function rowsOf(t: ort.Tensor): { data: Float32Array; S: number; H: number } {
  const [, S, H] = t.dims as number[];
  return { data: toFloat32(t), S: S!, H: H! };
}

function asTensor(data: Float32Array, dims: number[], like: ort.Tensor): ort.Tensor {
  if (like.type === 'float16') return new ort.Tensor('float16', Uint16Array.from(data, floatToHalf), dims);
  return new ort.Tensor('float32', data, dims);
}

export class ModReference {
  /** Per converted layer (by index), per row. */
  private rowCaches = new Map<number, RowCache[]>();
  /** Full caches of the unconverted layers, by past input name. */
  private fullCaches: Values = new Map();
  private mask: number[][] = [];
  private ids: number[][] = [];
  /** Per call, per converted layer: each row's selected positions (for tests and debugging). */
  readonly selections: Map<number, number[][]>[] = [];

  private constructor(
    private readonly runner: LayerByLayerRunner,
    private readonly io: DecoderIo,
    private readonly plan: ReadonlyMap<number, LayerPlan>,
    private readonly routing: RoutingPlan,
    private readonly embedder: TokenEmbedder | null,
  ) {}

  static async create(modelPath: string, routing: RoutingPlan, workDir: string, opts: SessionOptions & { embeddings?: EmbeddingSource } = {}): Promise<ModReference> {
    const model = loadModel(modelPath);
    const io = decoderIo(model);
    splitFusedBoundaries(model, analyzeDecoder(model));
    const structure = analyzeDecoder(model);
    const stateful = routing.layers.find((l) => structure.layers[l.layer]?.state.length);
    if (stateful) throw new ModcError(`layer ${stateful.layer} carries state besides the KV cache and is never routed: take the routing plan from the compiled model (routingPlanOf)`);
    const decoder = extractDecoder(model, structure);
    const runner = await LayerByLayerRunner.create(decoder, join(workDir, 'units'), opts);
    const embedder = io.inputsEmbeds ? await TokenEmbedder.create(io, opts.embeddings ?? { kind: 'random', seed: 0 }, opts) : null;
    return new ModReference(runner, io, new Map(routing.layers.map((l) => [l.layer, l])), routing, embedder);
  }

  get batch(): number {
    return this.mask.length;
  }

  async forward(rows: number[][], opts: { pad?: 'left' | 'right' } = {}): Promise<Logits> {
    const { ids, mask, width } = padRows(rows, resolvePadSide(this.io, opts.pad));
    this.mask = mask;
    this.ids = mask.map((_, b) => ids.slice(b * width, (b + 1) * width));
    this.fullCaches.clear();
    this.rowCaches.clear();
    for (const b of this.io.kv) {
      const dims = (B: number) => (b.layout === 'combined-2BHTD' ? [2, B, b.numHeads, 0, b.headSize] : [B, b.numHeads, 0, b.headSize]);
      if (this.plan.has(b.layer)) {
        this.rowCaches.set(b.layer, rows.map(() => ({ key: emptyTensor(b.dtype, dims(1)), value: b.pastValue ? emptyTensor(b.dtype, dims(1)) : null, length: 0 })));
      } else {
        this.fullCaches.set(b.pastKey, emptyTensor(b.dtype, dims(rows.length)));
        if (b.pastValue) this.fullCaches.set(b.pastValue, emptyTensor(b.dtype, dims(rows.length)));
      }
    }
    // State besides the KV cache: its layers are never routed; keepFull carries it like a cache.
    for (const [name, t] of zeroStates(this.io, rows.length)) this.fullCaches.set(name, t);
    return this.call(ids, width, promptPositions(mask), 0);
  }

  async step(next: number[]): Promise<Logits> {
    if (next.length !== this.batch) throw new ModcError(`step() got ${next.length} ids for a batch of ${this.batch}`);
    const positions = nextPositions(this.mask);
    const past = this.mask[0]!.length;
    this.mask = this.mask.map((m) => [...m, 1]);
    this.ids = this.ids.map((r, b) => [...r, next[b]!]);
    return this.call(next, 1, positions, past);
  }

  /** Per layer, per row: real tokens held by that layer's cache. */
  layerCacheLengths(): number[][] {
    const real = this.mask.map((m) => m.reduce((a, v) => a + v, 0));
    return this.io.kv.map((b) => this.rowCaches.get(b.layer)?.map((c) => c.length) ?? real);
  }

  /**
   * Bytes the compiled model's caches hold for this state: unconverted layers hold every slot
   * (padding included), a converted layer holds its longest row's tokens for every row.
   */
  kvBytes(): number {
    const lengths = this.layerCacheLengths();
    return this.io.kv.reduce((total, b, i) => {
      const slots = this.plan.has(b.layer) ? Math.max(0, ...lengths[i]!) : this.mask[0]!.length;
      const perToken = 2 * b.numHeads * b.headSize * (b.dtype === 'float16' ? 2 : 4);
      return total + this.batch * slots * perToken;
    }, 0);
  }

  private async call(ids: number[], S: number, positions: number[], pastLength: number): Promise<Logits> {
    const B = this.batch;
    const values = await this.feeds(ids, [B, S], this.mask, positions);
    for (const [name, t] of this.fullCaches) values.set(name, t);
    await this.runner.runUnit(this.runner.prefix, values);
    const chosen = new Map<number, number[][]>();
    for (const loaded of this.runner.layers) {
      const unit = loaded.unit as LayerUnit;
      const lp = this.plan.get(unit.index);
      if (!lp) {
        await this.runner.runUnit(loaded, values);
        this.keepFull(unit, values);
        continue;
      }
      chosen.set(unit.index, await this.routedLayer(loaded, lp, values, S, pastLength, positions));
    }
    this.selections.push(chosen);
    await this.runner.runUnit(this.runner.suffix, values);
    const logits = values.get(this.io.logits)!;
    return { data: toFloat32(logits), dims: logits.dims as [number, number, number] };
  }

  private async feeds(ids: number[], dims: [number, number], mask: number[][], positions: number[]): Promise<Values> {
    const io = this.io;
    const tokens = io.inputsEmbeds ? [io.inputsEmbeds.name, await this.embedder!.embed(ids, dims)] as const : [io.inputIds.name, typed(io.inputIds.dtype, ids, dims)] as const;
    const values: Values = new Map([tokens]);
    if (io.attentionMask) values.set(io.attentionMask.name, typed(io.attentionMask.dtype, mask.flat(), [mask.length, mask[0]!.length]));
    if (io.positionIds) values.set(io.positionIds.name, typed(io.positionIds.dtype, positions, dims));
    return values;
  }

  private keepFull(unit: LayerUnit, values: Values): void {
    this.fullCaches.set(unit.kv.key.input, values.get(unit.kv.key.output)!);
    if (unit.kv.layout !== 'combined-2BHTD') this.fullCaches.set(unit.kv.value.input, values.get(unit.kv.value.output)!);
  }

  /** SPEC.md steps 1-5 for one converted layer; returns each row's selected positions. */
  private async routedLayer(loaded: LoadedUnit, lp: LayerPlan, values: Values, S: number, pastLength: number, positions: number[]): Promise<number[][]> {
    const unit = loaded.unit as LayerUnit;
    const B = this.batch;
    const xT = values.get(unit.residualIn)!;
    const x = rowsOf(xT);
    const H = x.H;
    const tokenMask = this.mask.flatMap((m) => m.slice(m.length - S));
    const score = kernels.router(x.data, [B, S, H], lp.router.weight, lp.router.bias);
    const selected = this.routing.mode === 'threshold'
      ? kernels.selectThreshold(score, tokenMask, lp.threshold)
      : kernels.selectTopK(score, tokenMask, [B, S], lp.capacity, pastLength);
    const out = Float32Array.from(x.data);
    const chosen: number[][] = [];
    const binding = this.io.kv.find((k) => k.layer === unit.index)!;
    for (let b = 0; b < B; b++) {
      const picks = [...Array(S).keys()].filter((s) => selected[b * S + s]);
      chosen.push(picks);
      if (picks.length === 0) continue;
      const cache = this.rowCaches.get(unit.index)![b]!;
      const xSel = new Float32Array(picks.length * H);
      picks.forEach((s, k) => xSel.set(x.data.subarray((b * S + s) * H, (b * S + s + 1) * H), k * H));
      const view = await this.rowView(b, picks, S, positions, cache, binding);
      view.set(unit.residualIn, asTensor(xSel, [1, picks.length, H], xT));
      await this.runner.runUnit(loaded, view);
      const y = toFloat32(view.get(unit.residualOut)!);
      picks.forEach((s, k) => {
        const g = this.routing.gated ? kernels.sigmoid(score[b * S + s]!) : 1;
        for (let h = 0; h < H; h++) {
          const xv = x.data[(b * S + s) * H + h]!;
          out[(b * S + s) * H + h] = xv + g * (y[k * H + h]! - xv);
        }
      });
      cache.key = view.get(unit.kv.key.output)!;
      if (cache.value) cache.value = view.get(unit.kv.value.output)!;
      cache.length += picks.length;
    }
    values.set(unit.residualOut, asTensor(out, xT.dims as number[], xT));
    return chosen;
  }

  /**
   * The values a converted layer reads for one row's selected tokens: the prefix run on the
   * view "this layer's cache + these tokens" (ids, original positions, a mask of ones).
   */
  private async rowView(b: number, picks: number[], S: number, positions: number[], cache: RowCache, binding: KvBinding): Promise<Values> {
    const rowIds = this.ids[b]!.slice(this.ids[b]!.length - S);
    const ids = picks.map((s) => rowIds[s]!);
    const pos = picks.map((s) => positions[b * S + s]!);
    const mask = [Array(cache.length + picks.length).fill(1)];
    const view = await this.feeds(ids, [1, picks.length], mask, pos);
    // The prefix may read pasts for their length: every past is this layer's own view.
    for (const k of this.io.kv) {
      view.set(k.pastKey, cache.key);
      if (k.pastValue) view.set(k.pastValue, cache.value ?? cache.key);
    }
    // The prefix may read state inputs too (the routed layer itself has none).
    for (const [name, t] of zeroStates(this.io, 1)) view.set(name, t);
    await this.runner.runUnit(this.runner.prefix, view);
    view.set(binding.pastKey, cache.key);
    if (binding.pastValue && cache.value) view.set(binding.pastValue, cache.value);
    return view;
  }

  async release(): Promise<void> {
    await this.embedder?.release();
    await this.runner.release();
  }
}
