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
 * A layer routing a sub-layer part (attention and/or MLP) is cut finer: each routed part is a
 * unit from its input (x, or h after the attention add) to its update (a or m), run row by row
 * on the selected tokens like a routed layer (an attention part with its own cache); the update
 * becomes g * u at selected tokens and 0 elsewhere, and the rest of the layer (its residual adds,
 * the unrouted part) runs on every token as in the original. An MLP part with a surrogate (SPEC.md,
 * "MLP routed with a surrogate") gives the tokens it does not select s(u) = (u A) B + c instead of
 * 0, u being the MLP's normalised input (the MLP unit's own value, made an output of the unit and
 * read from a run on every token); an MLP replaced by its surrogate gives every token s(u).
 *
 * A layer routing its KV cache (`kv`, SPEC.md "Key/value routing") runs every token, one at a
 * time per row, against an explicit cache: token t of a row sees the cached entries held for good
 * (one of the first `sinks` tokens, or kept by its router) and those fewer than `window` positions
 * behind it, then is written; after the call the cache drops each entry that has left the window
 * behind the row's last token and is not held. (The layer, or its attention sub-layer when its MLP
 * is routed too, is the unit run per token.)
 *
 * Nothing here uses the modc ops or the compiled graph's rewiring, so the two can only agree if
 * both implement the semantics.
 */
import { join } from 'node:path';
import { extractUnits, layerUnit, type LayerUnit, type RunnableUnit } from '../../analysis/extract.js';
import type { LoadedUnit } from '../../runtime/layer-runner.js';
import { GraphFacts } from '../../analysis/graph-facts.js';
import { subLayersOf, type SubLayer } from '../../analysis/sub-layers.js';
import { mlpInputOf } from '../../analysis/mlp-input.js';
import { kvSequenceAxis, type DecoderStructure, type LayerInfo } from '../../analysis/types.js';
import { ModcError } from '../../core/errors.js';
import { loadModel } from '../../core/io/load.js';
import { floatToHalf } from '../../core/ir/dtype.js';
import { attribute, type Node, Value } from '../../core/ir/graph.js';
import { DataType } from '../../core/ir/dtype.js';
import type { TypeProto } from '../../core/proto/index.js';
import { GQA_ATTENTION_BIAS, kvCompactionBlocker, slotNumbered, staticWindow } from '../../analysis/attention.js';
import { Tensor } from '../../core/ir/tensor.js';
import type { Model } from '../../core/ir/model.js';
import { describeLayerPart, kvPolicyOf, type LayerPlan, type RoutingPlan, type Surrogate } from '../../routing/routing-plan.js';
import { decoderIo, type DecoderIo, type KvBinding, resolvePadSide } from '../../metadata/decoder-io.js';
import { type EmbeddingSource, TokenEmbedder } from '../../runtime/embeddings.js';
import { emptyTensor, ort, toFloat32, type SessionOptions } from '../../runtime/ort.js';
import {
  causalMask,
  checkUnpadded,
  initialCacheDims,
  type Logits,
  maskFeed,
  type MaskRule,
  maskTensor,
  nextPositions,
  padRows,
  promptPositions,
  staticLengthFeeds,
  typed,
  zeroStates,
} from '../../runtime/session.js';
import { splitAndAnalyze } from '../../passes/split-fused-boundaries.js';
import * as kernels from '../../passes/modc-ops/kernels.js';
import { loadUnit, releaseUnits, runUnit } from './units.js';

type Values = Map<string, ort.Tensor>;

/** One converted layer's cache for one row: [1, kvH, L, D] (or [2, 1, H, L, D]) tensors. */
interface RowCache {
  key: ort.Tensor;
  value: ort.Tensor | null;
  length: number;
  /** The original position of each cached token, in cache order. */
  positions: number[];
  /** The sequence index of each cached token (its column in the caller's 4-D mask), in cache order. */
  sequence: number[];
  /** A kv layer: whether each cached token is held for good (a sink, or kept by its router). */
  held: boolean[];
}

/**
 * A converted layer's GroupQueryAttention numbers tokens by cache slot (rotary angles, the
 * sliding window); on the layer's own cache the reference gives it original positions instead:
 * position_ids (input 9) and, for a window w, local_window_size -1 with an attention_bias
 * (input 10) letting a query at p see a key at q iff p - w < q <= p. Fed per row by name.
 */
interface SlotFix {
  positions: string | null;
  /** `slotAxis`: a static cache's sequence axis (the bias then spans the whole buffer); null for a growing cache. */
  window: { size: number; bias: string; dtype: 'float32' | 'float16'; slotAxis: number | null } | null;
}

const LOWEST = { float32: -3.4028234663852886e38, float16: -65504 } as const;

/** A [1|B, S, H] residual tensor as float32 rows, and back in its own dtype. */
function rowsOf(t: ort.Tensor): { data: Float32Array; S: number; H: number } {
  const [, S, H] = t.dims as number[];
  return { data: toFloat32(t), S: S!, H: H! };
}

function asTensor(data: Float32Array, dims: number[], like: ort.Tensor): ort.Tensor {
  if (like.type === 'float16') return new ort.Tensor('float16', Uint16Array.from(data, floatToHalf), dims);
  return new ort.Tensor('float32', data, dims);
}

/** How one layer runs: whole (routed as a block or not at all), or cut at its sub-layer boundary. */
type LayerRun =
  { kind: 'whole'; loaded: LoadedUnit; unit: LayerUnit; plan: LayerPlan | null } | { kind: 'parts'; index: number; pieces: Piece[]; attentionRouted: boolean };

/**
 * A piece of a cut layer: a routed part (run on its selected tokens; `plan` null for an MLP
 * replaced by its surrogate), or the rest (run on every token).
 */
type Piece = { loaded: LoadedUnit; routed: RoutedPiece | null };

/** A routed (or replaced) part: its plan, and its surrogate with the name of u in its unit. */
interface RoutedPiece {
  sub: SubLayer;
  plan: LayerPlan | null;
  surrogate: { weights: Surrogate; u: string } | null;
}

export class ModReference {
  /** Per converted layer (by index), per row. */
  private rowCaches = new Map<number, RowCache[]>();
  /** Full caches of the unconverted layers, by past input name. */
  private fullCaches: Values = new Map();
  private mask: number[][] = [];
  private ids: number[][] = [];
  /** Per call, per converted layer part (`3`, `3 (attention)`): each row's selected positions (for tests and debugging). */
  readonly selections: Map<string, number[][]>[] = [];
  /** Per call, per converted layer part: each row's router scores (before the sigmoid) at its real tokens of the call. */
  readonly scores: Map<string, number[][]>[] = [];
  private callScores = new Map<string, number[][]>();

  /** Layers whose KV cache holds only their selected tokens (routed block or attention part). */
  private readonly compacted: ReadonlySet<number>;
  /** Per compacted GroupQueryAttention layer: how its positions are fed. */
  private slotFixes = new Map<number, SlotFix>();
  /** The caller's 4-D mask of the current call (models that take one). */
  private callMask: ort.Tensor | null = null;
  private maskRule: MaskRule = causalMask;

  private constructor(
    private readonly prefix: LoadedUnit,
    private readonly layers: LayerRun[],
    private readonly suffix: LoadedUnit,
    private readonly io: DecoderIo,
    private readonly routing: RoutingPlan,
    private readonly embedder: TokenEmbedder | null,
  ) {
    this.compacted = new Set(routing.layers.filter((l) => l.part !== 'mlp').map((l) => l.layer));
    if (routing.mode === 'topk' && routing.layers.some((l) => l.part === 'kv'))
      throw new ModcError('key/value routing (kv parts) is threshold-only: the reference runs no top-k kv plan');
  }

  static async create(
    modelPath: string,
    routing: RoutingPlan,
    workDir: string,
    opts: SessionOptions & { embeddings?: EmbeddingSource; maskRule?: MaskRule } = {},
  ): Promise<ModReference> {
    const model = loadModel(modelPath);
    const io = decoderIo(model);
    const cut = [
      ...new Set([
        ...routing.layers.filter((l) => l.part === 'attention' || l.part === 'mlp').map((l) => l.layer),
        ...(routing.replaced ?? []).map((r) => r.layer),
      ]),
    ];
    const structure = splitAndAnalyze(model, { within: cut });
    const stateful = routing.layers.find((l) => structure.layers[l.layer]?.state.length);
    if (stateful)
      throw new ModcError(
        `layer ${stateful.layer} carries state besides the KV cache and is never routed: take the routing plan from the compiled model (routingPlanOf)`,
      );
    const groups = unitGroups(model, structure, routing);
    const units = extractUnits(
      model,
      groups.map((g) => g.group),
    );
    // A part with a surrogate also hands out u, the MLP's normalised input.
    groups.forEach((g, i) => {
      const u = g.routed?.surrogate?.u;
      if (!u || units[i]!.outputs.includes(u)) return;
      const v = units[i]!.model.graph.findValue(u);
      if (!v) throw new ModcError(`reference: the MLP unit of layer ${g.layer} does not compute ${u}`);
      v.type = { tensor_type: { elem_type: v.dtype ?? (structure.dtype === 'float16' ? DataType.FLOAT16 : DataType.FLOAT) } };
      units[i]!.model.graph.outputs.push(v);
      units[i]!.outputs.push(u);
    });
    const compacted = new Set(routing.layers.filter((l) => l.part !== 'mlp').map((l) => l.layer));
    const fixes = new Map<number, SlotFix>();
    units.forEach((u, i) => {
      const layer = structure.layers[groups[i]!.layer];
      const fix = layer && compacted.has(layer.index) ? originalPositionInputs(u, layer, structure.dtype === 'float16') : null;
      if (fix) fixes.set(layer!.index, fix);
    });
    const dir = join(workDir, 'units');
    const loaded: LoadedUnit[] = [];
    for (const u of units) loaded.push(await loadUnit(u, dir, opts));
    const layers: LayerRun[] = [];
    for (const layer of structure.layers) {
      const at = groups.map((g, i) => [g, i] as const).filter(([g]) => g.layer === layer.index);
      const plans = routing.layers.filter((l) => l.layer === layer.index);
      if (at.length === 1) {
        const [[, i]] = at as [[unknown, number]];
        const unit = layerUnit(units[i]!, layer.index, layer.residualIn, layer.residualOut!, layer.kv, layer.sideInputs);
        layers.push({ kind: 'whole', loaded: { ...loaded[i]!, unit }, unit, plan: plans[0] ?? null });
      } else {
        const pieces = at.map(([g, i]) => ({ loaded: loaded[i]!, routed: g.routed }));
        // An MLP replaced by its surrogate keeps the layer's cache whole, as an MLP part does.
        layers.push({ kind: 'parts', index: layer.index, pieces, attentionRouted: plans.some((p) => p.part === 'attention' || p.part === 'kv') });
      }
    }
    const embedder = io.inputsEmbeds ? await TokenEmbedder.create(io, opts.embeddings ?? { kind: 'random', seed: 0 }, opts) : null;
    const ref = new ModReference(loaded[0]!, layers, loaded.at(-1)!, io, routing, embedder);
    ref.slotFixes = fixes;
    if (opts.maskRule) ref.maskRule = opts.maskRule;
    return ref;
  }

  get batch(): number {
    return this.mask.length;
  }

  async forward(rows: number[][], opts: { pad?: 'left' | 'right' } = {}): Promise<Logits> {
    checkUnpadded(this.io, rows);
    const { ids, mask, width } = padRows(rows, resolvePadSide(this.io, opts.pad));
    this.mask = mask;
    this.ids = mask.map((_, b) => ids.slice(b * width, (b + 1) * width));
    this.fullCaches.clear();
    this.rowCaches.clear();
    for (const b of this.io.kv) {
      // Growing caches start empty; a static cache (TensorScatter) is a zero buffer, per row for a converted layer.
      const dims = (B: number) => initialCacheDims(this.io, b, B);
      if (this.compacted.has(b.layer)) {
        this.rowCaches.set(
          b.layer,
          rows.map(() => ({
            key: emptyTensor(b.dtype, dims(1)),
            value: b.pastValue ? emptyTensor(b.dtype, dims(1)) : null,
            length: 0,
            positions: [],
            sequence: [],
            held: [],
          })),
        );
      } else {
        this.fullCaches.set(b.pastKey, emptyTensor(b.dtype, dims(rows.length)));
        if (b.pastValue) this.fullCaches.set(b.pastValue, emptyTensor(b.dtype, dims(rows.length)));
      }
    }
    // State besides the KV cache starts at zero; call() carries it after each call.
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
      // A static cache holds its whole buffer, whatever it holds in it.
      const fixed = b.layout === 'static-BTH' || b.layout === 'static-BHTD' ? initialCacheDims(this.io, b, 1)[b.layout === 'static-BTH' ? 1 : 2]! : null;
      const slots = fixed ?? (this.compacted.has(b.layer) ? Math.max(0, ...lengths[i]!) : this.mask[0]!.length);
      const perToken = 2 * b.numHeads * b.headSize * (b.dtype === 'float16' ? 2 : 4);
      return total + this.batch * slots * perToken;
    }, 0);
  }

  private async call(ids: number[], S: number, positions: number[], pastLength: number): Promise<Logits> {
    const B = this.batch;
    this.callMask = maskFeed(this.io, this.mask, this.maskRule);
    const values = await this.feeds(ids, [B, S], this.mask, positions);
    for (const [name, t] of this.fullCaches) values.set(name, t);
    // The prefix may read a converted layer's past for its length (a static buffer's slots, or a
    // growing cache's past length, as onnxruntime-genai's shared mask does). A converted layer's
    // rows have their own caches, so here it sees what the original model's prefix reads at this
    // call: zeros of the dense shape (a growing cache holds every past slot).
    for (const b of this.io.kv) {
      if (!this.compacted.has(b.layer)) continue;
      const dims = initialCacheDims(this.io, b, B);
      if (!b.layout.startsWith('static')) dims[b.layout === 'combined-2BHTD' ? 3 : 2] = pastLength;
      for (const name of [b.pastKey, b.pastValue]) if (name) values.set(name, emptyTensor(b.dtype, dims));
    }
    await runUnit(this.prefix, values);
    const chosen = new Map<string, number[][]>();
    for (const run of this.layers) {
      if (run.kind === 'whole') {
        if (!run.plan) {
          await runUnit(run.loaded, values);
          this.keepFull(run.unit.index, values);
        } else if (run.plan.part === 'kv') {
          chosen.set(
            describeLayerPart(run.plan),
            await this.kvRouted(run.loaded, run.unit.residualIn, run.unit.residualOut, run.plan, values, S, pastLength, positions),
          );
        } else {
          chosen.set(describeLayerPart(run.plan), await this.routedLayer(run.loaded, run.plan, values, S, pastLength, positions));
        }
        continue;
      }
      for (const piece of run.pieces) {
        if (!piece.routed) await runUnit(piece.loaded, values);
        else if (!piece.routed.plan) await this.replacedPart(piece.loaded, piece.routed, values);
        else if (piece.routed.plan.part === 'kv')
          chosen.set(
            describeLayerPart(piece.routed.plan),
            await this.kvRouted(piece.loaded, piece.routed.sub.input.name, piece.routed.sub.update.name, piece.routed.plan, values, S, pastLength, positions),
          );
        else
          chosen.set(
            describeLayerPart(piece.routed.plan),
            await this.routedPart(piece.loaded, piece.routed.sub, piece.routed.plan, values, S, pastLength, positions, piece.routed.surrogate),
          );
      }
      if (!run.attentionRouted) this.keepFull(run.index, values);
    }
    this.selections.push(chosen);
    this.scores.push(this.callScores);
    this.callScores = new Map();
    await runUnit(this.suffix, values);
    // State besides the KV cache is carried whole, whichever unit wrote it: a layer holding state
    // is never routed (create refuses it), and state the prefix or suffix reads and writes, or
    // that a name numbers for a routed layer, belongs to no layer's carry.
    for (const st of this.io.state) this.fullCaches.set(st.past, values.get(st.present)!);
    const logits = values.get(this.io.logits)!;
    return { data: toFloat32(logits), dims: logits.dims as [number, number, number] };
  }

  /** `callerMask`: the attention_mask to feed instead of the one `mask` gives (a row view of a caller's 4-D mask). */
  private async feeds(ids: number[], dims: [number, number], mask: number[][], positions: number[], callerMask: ort.Tensor | null = null): Promise<Values> {
    const io = this.io;
    const tokens = io.inputsEmbeds
      ? ([io.inputsEmbeds.name, await this.embedder!.embed(ids, dims)] as const)
      : ([io.inputIds.name, typed(io.inputIds.dtype, ids, dims)] as const);
    const values: Values = new Map([tokens]);
    if (io.attentionMask) values.set(io.attentionMask.name, callerMask ?? maskFeed(io, mask, this.maskRule)!);
    if (io.positionIds) values.set(io.positionIds.name, typed(io.positionIds.dtype, positions, dims));
    // Static caches: write index = the row's tokens before this call, valid keys = after it (for a row view: its own cache).
    for (const [name, t] of Object.entries(staticLengthFeeds(io, mask, dims[1]))) values.set(name, t);
    return values;
  }

  private keepFull(layer: number, values: Values): void {
    const b = this.io.kv.find((k) => k.layer === layer);
    if (b) {
      this.fullCaches.set(b.pastKey, values.get(b.presentKey)!);
      if (b.pastValue) this.fullCaches.set(b.pastValue, values.get(b.presentValue!)!);
    }
  }

  /** SPEC.md steps 1-5 for one converted layer; returns each row's selected positions. */
  private async routedLayer(loaded: LoadedUnit, lp: LayerPlan, values: Values, S: number, pastLength: number, positions: number[]): Promise<number[][]> {
    const unit = loaded.unit as LayerUnit;
    const B = this.batch;
    const xT = values.get(unit.residualIn)!;
    const x = rowsOf(xT);
    const H = x.H;
    const { score, selected } = this.select(x.data, [B, S, H], lp, pastLength);
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
      const view = await this.rowView(b, picks, S, positions, pastLength, cache, binding);
      view.set(unit.residualIn, asTensor(xSel, [1, picks.length, H], xT));
      await runUnit(loaded, view);
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
      cache.positions.push(...picks.map((s) => positions[b * S + s]!));
      cache.sequence.push(...picks.map((s) => pastLength + s));
    }
    values.set(unit.residualOut, asTensor(out, xT.dims as number[], xT));
    return chosen;
  }

  /**
   * The values a converted layer reads for one row's selected tokens: the prefix run on the
   * view "this layer's cache + these tokens" (ids, original positions, a mask of ones). A
   * caller's 4-D mask is viewed the same way: its rows and columns at the view's tokens'
   * sequence indices (the cache's, then this call's), so the layer sees exactly the entries
   * the caller gave for those tokens, causal or not.
   */
  private async rowView(b: number, picks: number[], S: number, positions: number[], pastLength: number, cache: RowCache, binding: KvBinding): Promise<Values> {
    const rowIds = this.ids[b]!.slice(this.ids[b]!.length - S);
    const ids = picks.map((s) => rowIds[s]!);
    const pos = picks.map((s) => positions[b * S + s]!);
    const mask = [Array(cache.length + picks.length).fill(1)];
    const caller = this.io.attentionMask?.caller4d ? this.maskView(b, [...cache.sequence, ...picks.map((s) => pastLength + s)]) : null;
    const view = await this.feeds(ids, [1, picks.length], mask, pos, caller);
    // The prefix may read pasts for their length: every past is this layer's own view.
    for (const k of this.io.kv) {
      view.set(k.pastKey, cache.key);
      if (k.pastValue) view.set(k.pastValue, cache.value ?? cache.key);
    }
    // The prefix may read state inputs too (the routed layer itself has none).
    for (const [name, t] of zeroStates(this.io, 1)) view.set(name, t);
    await runUnit(this.prefix, view);
    view.set(binding.pastKey, cache.key);
    if (binding.pastValue && cache.value) view.set(binding.pastValue, cache.value);
    const fix = this.slotFixes.get(binding.layer);
    if (fix?.positions) view.set(fix.positions, typed('int64', pos, [1, pos.length]));
    if (fix?.window) {
      // SPEC step 3 with a window w: a query at original position p sees its keys at p - w < q <= p.
      // A static buffer holds the row's keys in its first slots (this view writes at cache.length); the rest are masked.
      const { size, bias, dtype, slotAxis } = fix.window;
      const keys = [...cache.positions, ...pos];
      const width = slotAxis === null ? keys.length : cache.key.dims[slotAxis]!;
      const data = pos.flatMap((p) => Array.from({ length: width }, (_, k) => (k < keys.length && p - size < keys[k]! && keys[k]! <= p ? 0 : LOWEST[dtype])));
      view.set(
        bias,
        dtype === 'float16'
          ? new ort.Tensor('float16', Uint16Array.from(data, floatToHalf), [1, 1, pos.length, width])
          : new ort.Tensor('float32', Float32Array.from(data), [1, 1, pos.length, width]),
      );
    }
    return view;
  }

  /** Row b of the call's 4-D mask at rows and columns `sequence` (top left of an [1, 1, M, M] mask; 0 elsewhere). */
  private maskView(b: number, sequence: number[]): ort.Tensor {
    const full = this.callMask!;
    const M = full.dims[3]!;
    const n = sequence.length;
    const size = Math.max(n, full.dims[2]!);
    const data = new Uint8Array(size * size);
    const src = full.data as ArrayLike<number | bigint | boolean>;
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) data[i * size + j] = Number(src[(b * full.dims[2]! + sequence[i]!) * M + sequence[j]!]) ? 1 : 0;
    return maskTensor(this.io.attentionMask!.caller4d!.dtype, data, [1, 1, size, size]);
  }

  /** SPEC.md steps 1-2: router scores and the selection of this call's tokens. */
  private select(
    x: Float32Array,
    dims: [number, number, number],
    lp: LayerPlan,
    pastLength: number,
  ): { score: Float32Array; selected: ArrayLike<boolean | number> } {
    const [B, S] = dims;
    const tokenMask = this.mask.flatMap((m) => m.slice(m.length - S));
    const score = kernels.router(x, dims, lp.router.weight, lp.router.bias);
    this.callScores.set(
      describeLayerPart(lp),
      Array.from({ length: B }, (_, b) => [...Array(S).keys()].filter((s) => tokenMask[b * S + s]).map((s) => score[b * S + s]!)),
    );
    const selected =
      this.routing.mode === 'threshold'
        ? kernels.selectThreshold(score, tokenMask, lp.threshold)
        : kernels.selectTopK(score, tokenMask, [B, S], lp.capacity, pastLength);
    return { score, selected };
  }

  /**
   * A routed sub-layer part (SPEC.md, "Sub-layer routing"): per row, the part runs on its
   * selected tokens only (an attention part on its own cache, as a routed layer does); its update
   * becomes g * u at those tokens and 0 elsewhere. Returns each row's selected positions.
   */
  private async routedPart(
    loaded: LoadedUnit,
    sub: SubLayer,
    lp: LayerPlan,
    values: Values,
    S: number,
    pastLength: number,
    positions: number[],
    surrogate: RoutedPiece['surrogate'] = null,
  ): Promise<number[][]> {
    const B = this.batch;
    const xT = values.get(sub.input.name)!;
    const x = rowsOf(xT);
    const H = x.H;
    const { score, selected } = this.select(x.data, [B, S, H], lp, pastLength);
    // Unselected tokens: s(u) with a surrogate, else 0. Selected tokens are overwritten below.
    const update = surrogate ? await this.surrogateUpdate(loaded, xT, surrogate, values) : new Float32Array(B * S * H);
    const chosen: number[][] = [];
    const binding = this.io.kv.find((k) => k.layer === lp.layer)!;
    for (let b = 0; b < B; b++) {
      const picks = [...Array(S).keys()].filter((s) => selected[b * S + s]);
      chosen.push(picks);
      if (picks.length === 0) continue;
      const xSel = new Float32Array(picks.length * H);
      picks.forEach((s, k) => xSel.set(x.data.subarray((b * S + s) * H, (b * S + s + 1) * H), k * H));
      const cache = lp.part === 'attention' ? this.rowCaches.get(lp.layer)![b]! : null;
      // An MLP part reads its input and weights only (route-layers refuses any other).
      const view = cache ? await this.rowView(b, picks, S, positions, pastLength, cache, binding) : new Map<string, ort.Tensor>();
      view.set(sub.input.name, asTensor(xSel, [1, picks.length, H], xT));
      await runUnit(loaded, view);
      const u = toFloat32(view.get(sub.update.name)!);
      picks.forEach((s, k) => {
        const g = this.routing.gated ? kernels.sigmoid(score[b * S + s]!) : 1;
        for (let h = 0; h < H; h++) update[(b * S + s) * H + h] = g * u[k * H + h]!;
      });
      if (cache) {
        cache.key = view.get(binding.presentKey)!;
        if (cache.value) cache.value = view.get(binding.presentValue!)!;
        cache.length += picks.length;
        cache.positions.push(...picks.map((s) => positions[b * S + s]!));
        cache.sequence.push(...picks.map((s) => pastLength + s));
      }
    }
    values.set(sub.update.name, asTensor(update, xT.dims as number[], xT));
    return chosen;
  }

  /**
   * s(u) = (u A) B + c at every token of the call: the MLP unit runs on every token (a view of
   * its own, so the call's values keep what they hold) for u, its normalised input; float64 sums.
   */
  private async surrogateUpdate(loaded: LoadedUnit, xT: ort.Tensor, sur: NonNullable<RoutedPiece['surrogate']>, values: Values): Promise<Float32Array> {
    const view: Values = new Map();
    for (const name of loaded.unit.inputs) view.set(name, values.get(name)!);
    await runUnit(loaded, view);
    const u = toFloat32(view.get(sur.u)!);
    const [B, S, H] = xT.dims as number[];
    const { a, b, bias, rank } = sur.weights;
    const out = new Float32Array(B! * S! * H!);
    const mid = new Float64Array(rank);
    for (let t = 0; t < B! * S!; t++) {
      mid.fill(0);
      for (let i = 0; i < H!; i++) {
        const ui = u[t * H! + i]!;
        for (let k = 0; k < rank; k++) mid[k]! += ui * a[i * rank + k]!;
      }
      for (let j = 0; j < H!; j++) {
        let v = bias[j]!;
        for (let k = 0; k < rank; k++) v += mid[k]! * b[k * H! + j]!;
        out[t * H! + j] = v;
      }
    }
    return out;
  }

  /** An MLP replaced by its surrogate: every token's update is s(u); the MLP itself contributes nothing. */
  private async replacedPart(loaded: LoadedUnit, piece: RoutedPiece, values: Values): Promise<void> {
    const xT = values.get(piece.sub.input.name)!;
    const update = await this.surrogateUpdate(loaded, xT, piece.surrogate!, values);
    values.set(piece.sub.update.name, asTensor(update, xT.dims as number[], xT));
  }

  /**
   * SPEC.md "Key/value routing" for one layer (or its attention sub-layer: `input` -> `output`):
   * every real token runs, one at a time per row, on the entries it may see; its own entry is
   * written after it; then entries behind the row's last token's window that are not held for
   * good leave the cache. Returns each row's kept tokens (the router's choice).
   */
  private async kvRouted(
    loaded: LoadedUnit,
    input: string,
    output: string,
    lp: LayerPlan,
    values: Values,
    S: number,
    pastLength: number,
    positions: number[],
  ): Promise<number[][]> {
    const B = this.batch;
    const { sinks, window } = kvPolicyOf(this.routing);
    const xT = values.get(input)!;
    const x = rowsOf(xT);
    const H = x.H;
    const { selected } = this.select(x.data, [B, S, H], lp, pastLength);
    const out = Float32Array.from(x.data);
    const binding = this.io.kv.find((k) => k.layer === lp.layer)!;
    const seqAxis = binding.layout === 'combined-2BHTD' ? 3 : 2;
    const tokenMask = this.mask.map((m) => m.slice(m.length - S));
    const chosen: number[][] = [];
    for (let b = 0; b < B; b++) {
      const cache = this.rowCaches.get(lp.layer)![b]!;
      const real = [...Array(S).keys()].filter((s) => tokenMask[b]![s]);
      chosen.push(real.filter((s) => selected[b * S + s]));
      for (const s of real) {
        const p = positions[b * S + s]!;
        // The entries token s sees: held for good, or fewer than `window` positions behind it.
        const slots = cache.positions.map((q, j) => j).filter((j) => cache.held[j] || p - cache.positions[j]! < window);
        const view: RowCache = {
          key: sliceSlots(cache.key, seqAxis, slots),
          value: cache.value ? sliceSlots(cache.value, seqAxis, slots) : null,
          length: slots.length,
          positions: slots.map((j) => cache.positions[j]!),
          sequence: slots.map((j) => cache.sequence[j]!),
          held: [],
        };
        const feeds = await this.rowView(b, [s], S, positions, pastLength, view, binding);
        feeds.set(input, asTensor(x.data.slice((b * S + s) * H, (b * S + s + 1) * H), [1, 1, H], xT));
        await runUnit(loaded, feeds);
        out.set(toFloat32(feeds.get(output)!).subarray(0, H), (b * S + s) * H);
        // The token's own entry is the present's last slot.
        const key = feeds.get(binding.presentKey)!;
        const last = [key.dims[seqAxis]! - 1];
        cache.key = concatSlots(cache.key, sliceSlots(key, seqAxis, last), seqAxis);
        if (cache.value) cache.value = concatSlots(cache.value, sliceSlots(feeds.get(binding.presentValue!)!, seqAxis, last), seqAxis);
        cache.positions.push(p);
        cache.sequence.push(pastLength + s);
        cache.held.push(p < sinks || !!selected[b * S + s]);
        cache.length++;
      }
      // After the row's last token at t, the cache keeps held entries and positions t - window + 1 .. t.
      const lastPosition = this.mask[b]!.reduce((a, v) => a + v, 0) - 1;
      const keep = cache.positions.map((q, j) => j).filter((j) => cache.held[j] || cache.positions[j]! > lastPosition - window);
      if (keep.length !== cache.length) {
        cache.key = sliceSlots(cache.key, seqAxis, keep);
        if (cache.value) cache.value = sliceSlots(cache.value, seqAxis, keep);
        cache.positions = keep.map((j) => cache.positions[j]!);
        cache.sequence = keep.map((j) => cache.sequence[j]!);
        cache.held = keep.map((j) => cache.held[j]!);
        cache.length = keep.length;
      }
    }
    values.set(output, asTensor(out, xT.dims as number[], xT));
    return chosen;
  }

  /**
   * Per kv layer (by index), per row: the original positions its cache holds, and which of them
   * are held for good (for tests: SPEC.md's cache rule, entry by entry).
   */
  kvEntries(layer: number): { positions: number[]; held: boolean[] }[] | null {
    if (!this.routing.layers.some((l) => l.layer === layer && l.part === 'kv')) return null;
    return this.rowCaches.get(layer)!.map((c) => ({ positions: [...c.positions], held: [...c.held] }));
  }

  async release(): Promise<void> {
    await this.embedder?.release();
    await releaseUnits([this.prefix, ...this.layers.flatMap((l) => (l.kind === 'whole' ? [l.loaded] : l.pieces.map((p) => p.loaded))), this.suffix]);
  }
}

/**
 * Gives a converted layer's GroupQueryAttention (in its own unit) original positions, as new
 * unit inputs fed per row: rotary angles by com.microsoft RotaryEmbedding on Q and K (do_rotary
 * off: the op would ignore positions in a prefill), and for a window w local_window_size -1 with
 * an attention_bias. Null when the unit holds no such op.
 */
function originalPositionInputs(unit: RunnableUnit, layer: LayerInfo, half: boolean): SlotFix | null {
  const staticFix = staticWindowInput(unit, layer, half);
  if (staticFix) return staticFix;
  const s = slotNumbered(layer.attention);
  const node = s && unit.model.graph.nodes.find((n) => n.opType === 'GroupQueryAttention' && n.domain === 'com.microsoft');
  if (!s || !node || (!s.rotary && s.window === null)) return null;
  const g = unit.model.graph;
  const fix: SlotFix = { positions: null, window: null };
  const input = (name: string, elem: number) => {
    unit.inputs.push(name);
    return g.addInput(new Value(name, { tensor_type: { elem_type: elem } } as TypeProto));
  };
  if (s.rotary) {
    fix.positions = `modc.reference.positions.${layer.index}`;
    const pos = input(fix.positions, DataType.INT64);
    const ins = [...node.inputs];
    const { numHeads, kv } = layer.attention;
    if (!ins[1]) {
      const sizes = [numHeads, kv.numKvHeads, kv.numKvHeads].map((h) => h * kv.headSize);
      const split =
        (unit.model.opsetVersion('') ?? 13) >= 13
          ? g.addNode(
              'Split',
              [ins[0]!, g.addInitializer(new Value('modc.reference.split'), Tensor.fromArray('', [3], BigInt64Array.from(sizes.map(BigInt))))],
              3,
              { before: node, attributes: [attribute('axis', 2)] },
            )
          : g.addNode('Split', [ins[0]!], 3, { before: node, attributes: [attribute('axis', 2), attribute('split', sizes)] });
      [ins[0], ins[1], ins[2]] = split.outputs;
    }
    const rotaryDim = ins[7]!.initializer?.dims[1];
    for (const [i, heads] of [
      [0, numHeads],
      [1, kv.numKvHeads],
    ] as const) {
      const attrs = [attribute('num_heads', heads), attribute('interleaved', node.attrInt('rotary_interleaved', 0) ?? 0)];
      if (typeof rotaryDim === 'number' && rotaryDim * 2 !== kv.headSize) attrs.push(attribute('rotary_embedding_dim', rotaryDim * 2));
      ins[i] = g.addNode('RotaryEmbedding', [ins[i]!, pos, ins[7]!, ins[8]!], 1, { domain: 'com.microsoft', before: node, attributes: attrs }).output(0);
    }
    ins[7] = null;
    ins[8] = null;
    while (ins.length && !ins.at(-1)) ins.pop();
    node.setInputs(ins);
    node.setAttr(attribute('do_rotary', 0));
  }
  if (s.window !== null) {
    const blocked = kvCompactionBlocker(layer.attention);
    if (blocked) throw new ModcError(`reference: layer ${layer.index} cannot be converted: ${blocked}`);
    const [elem, dtype] = half ? [DataType.FLOAT16, 'float16' as const] : [DataType.FLOAT, 'float32' as const];
    fix.window = { size: s.window, bias: `modc.reference.window_bias.${layer.index}`, dtype, slotAxis: null };
    node.setAttr(attribute('local_window_size', -1));
    node.setInput(GQA_ATTENTION_BIAS, input(fix.window.bias, elem));
  }
  return fix;
}

/**
 * A converted static-cache layer whose attn_mask holds a sliding window (compiler/analysis/static-mask.ts):
 * the window counts slots of the original buffer, which are positions there. On the layer's own
 * buffer the reference replaces the mask with a fed bias by original position (causality and
 * validity follow: keys are in order, and nonpad_kv_seqlen bounds the valid slots). Null otherwise.
 */
function staticWindowInput(unit: RunnableUnit, layer: LayerInfo, half: boolean): SlotFix | null {
  const window = staticWindow(layer.attention);
  if (window === null) return null;
  const blocked = kvCompactionBlocker(layer.attention);
  if (blocked) throw new ModcError(`reference: layer ${layer.index} cannot be converted: ${blocked}`);
  const g = unit.model.graph;
  const node = g.nodes.find((n) => n.opType === 'Attention' && (n.domain === '' || n.domain === 'ai.onnx') && n.input(6));
  if (!node) return null;
  const [elem, dtype] = half ? [DataType.FLOAT16, 'float16' as const] : [DataType.FLOAT, 'float32' as const];
  const bias = `modc.reference.window_bias.${layer.index}`;
  unit.inputs.push(bias);
  node.setInput(3, g.addInput(new Value(bias, { tensor_type: { elem_type: elem } } as TypeProto)));
  return { positions: null, window: { size: window, bias, dtype, slotAxis: kvSequenceAxis(layer.kv.layout) } };
}

interface UnitGroup {
  group: { name: string; nodes: readonly Node[] };
  /** The layer the group belongs to (-1: prefix, L: suffix). */
  layer: number;
  routed: RoutedPiece | null;
}

/**
 * The cut of the original model: prefix, each layer whole or (when it routes a sub-layer part)
 * as its routed parts with the rest of the layer between them, suffix.
 */
function unitGroups(model: Model, s: DecoderStructure, routing: RoutingPlan): UnitGroup[] {
  const groups: UnitGroup[] = [{ group: { name: 'prefix', nodes: s.prefixNodes }, layer: -1, routed: null }];
  for (const layer of s.layers) {
    // A kv part alone runs the whole layer per token; with a routed or replaced MLP, its attention sub-layer.
    const all = routing.layers.filter((l) => l.layer === layer.index);
    const replaced = (routing.replaced ?? []).find((r) => r.layer === layer.index);
    const cutsLayer = replaced !== undefined || all.some((l) => l.part === 'attention' || l.part === 'mlp');
    const plans: PartCut[] = cutsLayer
      ? all
          .filter((l) => l.part !== 'block')
          .map((plan) => ({ part: plan.part === 'mlp' ? ('mlp' as const) : ('attention' as const), plan, surrogate: plan.router.surrogate ?? null }))
      : [];
    if (replaced) plans.push({ part: 'mlp', plan: null, surrogate: replaced.surrogate });
    // The cut runs the attention sub-layer before the MLP (a kv part orders after its layer's MLP part).
    plans.sort((a, b) => (a.part === b.part ? 0 : a.part === 'attention' ? -1 : 1));
    if (plans.length === 0) groups.push({ group: { name: `layer.${layer.index}`, nodes: layer.nodes }, layer: layer.index, routed: null });
    else groups.push(...partGroups(model, layer, plans));
  }
  groups.push({ group: { name: 'suffix', nodes: s.suffixNodes }, layer: s.layers.length, routed: null });
  return groups;
}

/**
 * A layer cut at its routed parts: rest_0, part_0, rest_1, part_1, rest_2, where a node of the
 * rest goes after every routed part it depends on (h = x + a comes after the attention part).
 */
/** A part to cut out of a layer: routed (with a plan) or replaced by its surrogate (no plan). */
interface PartCut {
  part: 'attention' | 'mlp';
  plan: LayerPlan | null;
  surrogate: Surrogate | null;
}

function partGroups(model: Model, layer: LayerInfo, plans: readonly PartCut[]): UnitGroup[] {
  const parts = subLayersOf(layer, new Set(model.graph.outputs));
  if ('reason' in parts) throw new ModcError(`reference: layer ${layer.index} has no sub-layer boundary: ${parts.reason}`);
  const facts = new GraphFacts(model.graph);
  const routed = plans.map((cut) => {
    const sub = parts[cut.part];
    const name = describeLayerPart(cut.plan ?? { layer: layer.index, part: cut.part });
    if (sub.blocker) throw new ModcError(`reference: layer ${name} cannot be routed: ${sub.blocker}`);
    let surrogate: RoutedPiece['surrogate'] = null;
    if (cut.surrogate) {
      const u = mlpInputOf(sub);
      if ('reason' in u) throw new ModcError(`reference: layer ${name} cannot take a surrogate: ${u.reason}`);
      surrogate = { weights: cut.surrogate, u: u.value.name };
    }
    // The values crossing the cut become unit inputs, which ONNX Runtime checks strictly: keep
    // only their element type (a model's value_info may declare a shape it only merges leniently).
    for (const v of [sub.input, sub.update]) {
      const elem = v.dtype ?? facts.dtype(v);
      if (elem !== undefined) v.type = { tensor_type: { elem_type: elem } };
    }
    return { sub, plan: cut.plan, surrogate, part: cut.part };
  });
  const regionOf = new Map<Node, number>();
  routed.forEach((r, i) => r.sub.nodes.forEach((n) => regionOf.set(n, i)));
  const level = new Map<Node, number>();
  const rests: Node[][] = routed.map(() => [] as Node[]).concat([[]]);
  for (const n of layer.nodes) {
    if (regionOf.has(n)) continue;
    let l = 0;
    for (const v of n.inputs) {
      const p = v?.producer;
      if (!p) continue;
      const r = regionOf.get(p);
      l = Math.max(l, r !== undefined ? r + 1 : (level.get(p) ?? 0));
    }
    level.set(n, l);
    rests[l]!.push(n);
  }
  // A routed part must not read the rest that follows it.
  routed.forEach((r, i) => {
    for (const n of r.sub.nodes)
      for (const v of n.inputs) {
        const p = v?.producer;
        if (p && (level.get(p) ?? 0) > i)
          throw new ModcError(`reference: layer ${describeLayerPart({ layer: layer.index, part: r.part })} reads ${v}, computed after it`);
      }
  });
  const out: UnitGroup[] = [];
  rests.forEach((nodes, i) => {
    if (nodes.length) out.push({ group: { name: `layer.${layer.index}.rest${i}`, nodes }, layer: layer.index, routed: null });
    const r = routed[i];
    if (r)
      out.push({
        group: { name: `layer.${layer.index}.${r.part}`, nodes: r.sub.nodes },
        layer: layer.index,
        routed: { sub: r.sub, plan: r.plan, surrogate: r.surrogate },
      });
  });
  return out;
}

/** The slots `slots` (in that order) of a cache tensor along its sequence axis. */
function sliceSlots(t: ort.Tensor, seqAxis: number, slots: readonly number[]): ort.Tensor {
  const dims = t.dims as number[];
  const T = dims[seqAxis]!;
  const outer = dims.slice(0, seqAxis).reduce((a, d) => a * d, 1);
  const inner = dims.slice(seqAxis + 1).reduce((a, d) => a * d, 1);
  const src = t.data as Float32Array | Uint16Array;
  const out = new (src.constructor as new (n: number) => Float32Array | Uint16Array)(outer * slots.length * inner);
  for (let o = 0; o < outer; o++) slots.forEach((j, k) => out.set(src.subarray((o * T + j) * inner, (o * T + j + 1) * inner), (o * slots.length + k) * inner));
  const outDims = [...dims];
  outDims[seqAxis] = slots.length;
  return new ort.Tensor(t.type as 'float32' | 'float16', out, outDims);
}

/** a and b joined along the sequence axis. */
function concatSlots(a: ort.Tensor, b: ort.Tensor, seqAxis: number): ort.Tensor {
  const [da, db] = [a.dims as number[], b.dims as number[]];
  const [Ta, Tb] = [da[seqAxis]!, db[seqAxis]!];
  const outer = da.slice(0, seqAxis).reduce((x, d) => x * d, 1);
  const inner = da.slice(seqAxis + 1).reduce((x, d) => x * d, 1);
  const [sa, sb] = [a.data as Float32Array | Uint16Array, b.data as Float32Array | Uint16Array];
  const out = new (sa.constructor as new (n: number) => Float32Array | Uint16Array)(outer * (Ta + Tb) * inner);
  for (let o = 0; o < outer; o++) {
    out.set(sa.subarray(o * Ta * inner, (o + 1) * Ta * inner), o * (Ta + Tb) * inner);
    out.set(sb.subarray(o * Tb * inner, (o + 1) * Tb * inner), (o * (Ta + Tb) + Ta) * inner);
  }
  const dims = [...da];
  dims[seqAxis] = Ta + Tb;
  return new ort.Tensor(a.type as 'float32' | 'float16', out, dims);
}
