/**
 * Exact evaluation of routing choices with the real compiled model: the original compiled with
 * a router on every candidate part (threshold-p, p = 0.5, ungated), each router's bias turned
 * into a graph input (an overridable initializer) and each router's score exposed as an output.
 * Feeding a bias of +100 (scores are in standard deviations) makes a part select every token, which ungated reproduces the original
 * layer (SPEC.md's equivalence anchor); feeding -q selects the tokens whose score w.x is at least
 * q. One compile then measures any single part, or any combination, at any capacity.
 */
import { join } from 'node:path';
import { ModcError } from '../../core/errors.js';
import { cloneModel } from '../../core/io/convert.js';
import { saveModel } from '../../core/io/save.js';
import { DataType } from '../../core/ir/dtype.js';

import type { Model } from '../../core/ir/model.js';
import type { RoutingPlan, Surrogate } from '../../routing/routing-plan.js';
import { decoderIo, type DecoderIo } from '../../metadata/decoder-io.js';
import { type EmbeddingSource, TokenEmbedder } from '../../runtime/embeddings.js';
import { createSession, ort, toFloat32, type SessionOptions } from '../../runtime/ort.js';
import { exposeValues, promptBatch, type Batch } from './capture.js';
import { partKey, type PartRef } from './parts.js';
import { compile } from '../../passes/compile.js';
import { routingOf } from '../../passes/mod-common.js';
import { readRoutingMetadata } from '../../metadata/routing-metadata.js';

/** A fitted router for one part: score = w . x + bias; an MLP part may have a surrogate for the tokens it skips. */
export interface PartRouter extends PartRef {
  weight: Float32Array;
  bias: number;
  surrogate?: Surrogate;
}

/** A bias large enough that every token's score is positive: the part runs on every token. */
export const ALL_PASS_BIAS = 100;

export interface EvalResult {
  /** Summed negative log-likelihood (nats) over the predicted tokens. */
  nll: number;
  predicted: number;
  /** Real tokens of the batch. */
  tokens: number;
  /** Per part key: real tokens selected. */
  selected: Map<string, number>;
  /** Per part key, with `scores`: w . x (bias excluded) of every real token, in batch order. */
  scores?: Map<string, Float32Array>;
  /**
   * Per part key, with `values` (an evaluator created with `expose`): the stream the router
   * reads and, for an MLP with a surrogate, u, both [B*S, H]; the selection, [B*S].
   */
  values?: Map<string, { input: Float32Array; u: Float32Array | null; selected: Uint8Array }>;
}

/** Graph values of a routed part an evaluator created with `expose` returns. */
interface PartValues {
  input: string;
  selected: string;
  u: string | null;
}

/** The routing plan of a set of part routers: threshold p = 0.5, ungated, biases as given. */
export function partPlan(routers: readonly PartRouter[], gated = false): RoutingPlan {
  return {
    mode: 'threshold',
    gated,
    layers: routers.map((r) => {
      const router = { layer: r.layer, part: r.part, weight: r.weight, bias: r.bias, ...(r.surrogate ? { surrogate: r.surrogate } : {}) };
      const entry = { layer: r.layer, part: r.part, router, threshold: 0.5, capacity: 1 };
      return entry;
    }),
    unconverted: [],
  };
}

export class RoutedEvaluator {
  private constructor(
    private readonly session: ort.InferenceSession,
    readonly io: DecoderIo,
    /** Per part key: the bias input's name and the score output's name. */
    readonly parts: Map<string, { ref: PartRef; bias: string; score: string }>,
    private readonly embedder: TokenEmbedder | null,
    private readonly exposed: Map<string, PartValues> = new Map(),
  ) {}

  static async create(
    original: Model,
    routers: readonly PartRouter[],
    workDir: string,
    name: string,
    opts: SessionOptions = {},
    embeddings: EmbeddingSource | null = null,
    /** The stream's element type (DataType) to expose each part's input, u and selection; null: none. */
    expose: number | null = null,
  ): Promise<RoutedEvaluator> {
    const model = cloneModel(original);
    compile(model, { plan: partPlan(routers), verify: false });
    const g = model.graph;
    const parts = new Map<string, { ref: PartRef; bias: string; score: string }>();
    const exposed = new Map<string, PartValues>();
    const scores: string[] = [];
    // Each routed part's Router, found from the selection its routing metadata names.
    for (const entry of readRoutingMetadata(model)?.layers ?? []) {
      const selected = g.findValue(entry.selected);
      const router = selected ? routingOf(selected)?.nodes[0] : undefined;
      const bias = router?.input(2);
      if (!router || !bias?.initializer) continue;
      const ref = { layer: entry.layer, part: entry.part };
      // A plain graph input: onnxruntime-node feeds only the inputs it lists, which leave out
      // initializers (overridable or not).
      g.removeInitializer(bias);
      bias.type = { tensor_type: { elem_type: DataType.FLOAT, shape: { dim: [{ dim_value: 1 }] } } };
      if (!g.inputs.includes(bias)) g.inputs.push(bias);
      scores.push(router.outputs[0]!.name);
      parts.set(partKey(ref), { ref, bias: bias.name, score: router.outputs[0]!.name });
      if (expose !== null) exposed.set(partKey(ref), { input: router.input(0)!.name, selected: entry.selected, u: entry.surrogate?.input ?? null });
    }
    const missing = routers.filter((r) => !parts.has(partKey(r)));
    if (missing.length) throw new ModcError(`the compiled model has no router for ${missing.map(partKey).join(', ')} (the compiler could not route it)`);
    exposeValues(model, scores, DataType.FLOAT);
    for (const v of exposed.values()) {
      exposeValues(model, [v.input, ...(v.u ? [v.u] : [])], expose!);
      exposeValues(model, [v.selected], DataType.BOOL);
    }
    const io = decoderIo(model);
    const path = join(workDir, `${name}.onnx`);
    saveModel(model, path);
    const session = await createSession(path, opts);
    const embedder = io.inputsEmbeds && embeddings ? await TokenEmbedder.create(io, embeddings, opts) : null;
    return new RoutedEvaluator(session, io, parts, embedder, exposed);
  }

  batch(rows: number[][]): Promise<Batch> {
    return promptBatch(this.io, rows, this.embedder);
  }

  /**
   * Runs a batch with these biases (parts not listed select every token) and scores it:
   * NLL of each next token at real positions, and how many real tokens each part selected.
   */
  async run(batch: Batch, biases: ReadonlyMap<string, number>, opts: { scores?: boolean; logits?: boolean; values?: boolean } = {}): Promise<EvalResult> {
    const feeds = { ...batch.feeds };
    for (const [key, p] of this.parts) feeds[p.bias] = new ort.Tensor('float32', Float32Array.of(biases.get(key) ?? ALL_PASS_BIAS), [1]);
    const extra = opts.values ? [...new Set([...this.exposed.values()].flatMap((v) => [v.input, v.selected, ...(v.u ? [v.u] : [])]))] : [];
    const fetch = [...new Set([...[...this.parts.values()].map((p) => p.score), ...extra, ...(opts.logits === false ? [] : [this.io.logits])])];
    let out: ort.InferenceSession.OnnxValueMapType;
    try {
      out = await this.session.run(feeds, fetch);
    } catch (e) {
      throw new ModcError(`onnxruntime failed running the calibration model: ${(e as Error).message.split('\n')[0]}`);
    }
    const selected = new Map<string, number>();
    const scores = opts.scores ? new Map<string, Float32Array>() : undefined;
    for (const [key, p] of this.parts) {
      const s = (out[p.score] as ort.Tensor).data as Float32Array;
      const bias = biases.get(key) ?? ALL_PASS_BIAS;
      let count = 0;
      const raw = scores ? new Float32Array(batch.real.length) : null;
      batch.real.forEach((i, k) => {
        if (s[i]! >= 0) count++;
        if (raw) raw[k] = s[i]! - bias;
      });
      selected.set(key, count);
      if (scores && raw) scores.set(key, raw);
    }
    let nll = 0;
    let predicted = 0;
    if (opts.logits !== false) {
      const logits = out[this.io.logits] as ort.Tensor;
      ({ nll, predicted } = nextTokenNll(toFloat32(logits), logits.dims as number[], batch));
    }
    let values: EvalResult['values'];
    if (opts.values) {
      values = new Map();
      for (const [key, v] of this.exposed) {
        const sel = (out[v.selected] as ort.Tensor).data as ArrayLike<number | boolean>;
        values.set(key, {
          input: toFloat32(out[v.input] as ort.Tensor),
          u: v.u ? toFloat32(out[v.u] as ort.Tensor) : null,
          selected: Uint8Array.from({ length: sel.length }, (_, i) => (sel[i] ? 1 : 0)),
        });
      }
    }
    return { nll, predicted, tokens: batch.real.length, selected, ...(scores ? { scores } : {}), ...(values ? { values } : {}) };
  }

  async release(): Promise<void> {
    await this.embedder?.release();
    await this.session.release();
  }
}

/** Summed NLL of each row's token t+1 given its logits at t, over real (right-padded) rows. */
export function nextTokenNll(logits: Float32Array, dims: readonly number[], batch: Batch): { nll: number; predicted: number } {
  const [, S, V] = dims as [number, number, number];
  let nll = 0;
  let predicted = 0;
  batch.rows.forEach((row, b) => {
    for (let t = 0; t + 1 < row.length; t++) {
      const base = (b * S + t) * V;
      let max = -Infinity;
      for (let v = 0; v < V; v++) if (logits[base + v]! > max) max = logits[base + v]!;
      let sum = 0;
      for (let v = 0; v < V; v++) sum += Math.exp(logits[base + v]! - max);
      nll += max + Math.log(sum) - logits[base + row[t + 1]!]!;
      predicted++;
    }
  });
  return { nll, predicted };
}
