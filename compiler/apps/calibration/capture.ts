/**
 * Activation capture: the ORIGINAL model with extra graph outputs (added in memory, saved to a
 * temp folder) for each layer's residual input x, the stream h after the attention add, and the
 * residual output (and any other values asked for, such as the MLP's normalised input u). Runs batch by batch; a caller reduces each batch to statistics and drops it,
 * so memory is one batch of activations, whatever the data set's size.
 */
import { join } from 'node:path';
import type { DecoderStructure, LayerInfo } from '../../analysis/types.js';
import { kvCompactionBlocker } from '../../analysis/attention.js';
import { ModcError } from '../../core/errors.js';
import { cloneModel } from '../../core/io/convert.js';
import { saveModel } from '../../core/io/save.js';
import { DataType } from '../../core/ir/dtype.js';
import type { Value } from '../../core/ir/graph.js';
import type { Model } from '../../core/ir/model.js';
import { decoderIo, type DecoderIo } from '../../metadata/decoder-io.js';
import { type EmbeddingSource, TokenEmbedder } from '../../runtime/embeddings.js';
import { createSession, emptyTensor, ort, toFloat32, type SessionOptions } from '../../runtime/ort.js';
import {
  checkUnpadded,
  initialCacheDims,
  initialPositions,
  maskFeed,
  padRows,
  promptPositions,
  sequenceLengthFeeds,
  staticLengthFeeds,
  typed,
  zeroStates,
} from '../../runtime/session.js';

/** Where a layer's routed parts read and write the residual stream, as graph value names. */
export interface LayerPoints {
  layer: number;
  /** Residual input x. */
  x: string;
  /** Stream after the attention add (x + a); null when the layer has no separate attention add. */
  h: string | null;
  /** Residual output. */
  out: string;
  /** Parallel residual (out = x + a(x) + m(x)): the MLP reads x, not h. */
  parallel: boolean;
  /** Nothing can be routed: the layer has state besides its KV cache (route-layers keeps it dense). */
  stateful: boolean;
  /** Only the MLP part can be routed: a sliding window modc cannot move to original positions keeps the KV cache full. */
  mlpOnly: boolean;
}

/** A prompt batch as the model takes it, right-padded; `real` lists the flat [B*S] indices of real tokens. */
export interface Batch {
  rows: number[][];
  width: number;
  real: Int32Array;
  feeds: Record<string, ort.Tensor>;
}

export const STREAM_TYPE: Record<DecoderStructure['dtype'], number> = { float32: DataType.FLOAT, float16: DataType.FLOAT16, bfloat16: DataType.BFLOAT16 };

/** The stream points of each layer of an analysed (boundary-split) decoder. */
export function layerPoints(s: DecoderStructure): LayerPoints[] {
  return s.layers.map((l) => {
    const out = l.residualOut;
    if (!out) throw new ModcError(`layer ${l.index}: its residual output is not a value in the graph, so it cannot be captured`);
    const mlpOnly = kvCompactionBlocker(l.attention) !== null;
    return {
      layer: l.index,
      x: l.residualIn.name,
      h: midStream(l)?.name ?? null,
      out: out.name,
      parallel: isParallel(l),
      stateful: l.state.length > 0,
      mlpOnly,
    };
  });
}

function midStream(l: LayerInfo): Value | null {
  if (l.steps.length !== 2) return null;
  return l.steps[0]!.carried;
}

/** The MLP branch is computed from the layer input, not the stream after the attention add. */
function isParallel(l: LayerInfo): boolean {
  if (l.steps.length !== 2) return false;
  return l.steps[1]!.input === l.residualIn;
}

/**
 * The feeds of one prompt batch, right-padded. A decoder fed `inputs_embeds` gets the token
 * embeddings from `embedder` (the embedding model beside it).
 */
export async function promptBatch(io: DecoderIo, rows: number[][], embedder: TokenEmbedder | null = null): Promise<Batch> {
  checkUnpadded(io, rows);
  const { ids, mask, width } = padRows(rows, 'right');
  const B = rows.length;
  // State besides the KV cache (hybrid models) starts at zero, as in every runner.
  const feeds: Record<string, ort.Tensor> = Object.fromEntries(zeroStates(io, B));
  if (io.inputsEmbeds) {
    if (!embedder) throw new ModcError(`the model takes inputs_embeds: calibration needs the embedding model that genai_config.json beside it names`);
    feeds[io.inputsEmbeds.name] = await embedder.embed(ids, [B, width]);
  } else {
    feeds[io.inputIds.name] = typed(io.inputIds.dtype, ids, [B, width]);
  }
  const maskT = maskFeed(io, mask);
  if (maskT) feeds[io.attentionMask!.name] = maskT;
  Object.assign(feeds, sequenceLengthFeeds(io, mask, width));
  if (io.positionIds) feeds[io.positionIds.name] = typed(io.positionIds.dtype, promptPositions(mask), [B, width]);
  // Static KV caches: zero buffers, and each row's write index and valid keys.
  Object.assign(feeds, staticLengthFeeds(io, mask, width));
  for (const b of io.kv) {
    const dims = initialCacheDims(io, b, B);
    feeds[b.pastKey] = emptyTensor(b.dtype, dims);
    if (b.pastValue) feeds[b.pastValue] = emptyTensor(b.dtype, dims);
    if (b.pastLength) feeds[b.pastLength] = typed('int64', Array(B).fill(0), [B]);
    if (b.pastValid) feeds[b.pastValid] = new ort.Tensor('bool', new Uint8Array(0), [B, 0]);
    if (b.pastPositions) feeds[b.pastPositions] = initialPositions(io, b, B);
  }
  const real: number[] = [];
  mask.forEach((m, b) => m.forEach((v, s) => v && real.push(b * width + s)));
  return { rows, width, real: Int32Array.from(real), feeds };
}

/** Adds `names` as graph outputs of `model` (typed with the stream's element type when undeclared). */
export function exposeValues(model: Model, names: readonly string[], elemType: number): void {
  const g = model.graph;
  const byName = new Map<string, Value>();
  for (const n of g.nodes) for (const v of n.outputs) byName.set(v.name, v);
  for (const v of g.inputs) byName.set(v.name, v);
  for (const name of names) {
    const v = byName.get(name);
    if (!v) throw new ModcError(`cannot expose ${name}: no such value in the main graph`);
    if (g.outputs.includes(v)) continue;
    if (!v.type?.tensor_type?.elem_type) v.type = { tensor_type: { elem_type: elemType } };
    g.outputs.push(v);
  }
}

export class ActivationCapture {
  private constructor(
    private readonly session: ort.InferenceSession,
    readonly io: DecoderIo,
    readonly points: LayerPoints[],
    readonly hiddenSize: number,
    readonly structure: { numLayers: number; hiddenSize: number },
    private readonly embedder: TokenEmbedder | null,
    private readonly names: string[],
  ) {}

  /**
   * Builds the capture model under `workDir` from `split` (a model whose fused layer boundaries
   * are split, analysed as `s`; not changed) and opens it; `embeddings` feeds a decoder that
   * takes inputs_embeds.
   */
  static async create(
    split: Model,
    s: DecoderStructure,
    workDir: string,
    opts: SessionOptions = {},
    embeddings: EmbeddingSource | null = null,
    extra: readonly string[] = [],
  ): Promise<ActivationCapture> {
    const model = cloneModel(split);
    const io = decoderIo(model);
    const points = layerPoints(s);
    const names = [...new Set([...points.flatMap((p) => [p.x, ...(p.h ? [p.h] : []), p.out]), ...extra])];
    exposeValues(model, names, STREAM_TYPE[s.dtype]);
    const path = join(workDir, 'capture.onnx');
    saveModel(model, path);
    const session = await createSession(path, opts);
    const embedder = io.inputsEmbeds && embeddings ? await TokenEmbedder.create(io, embeddings, opts) : null;
    return new ActivationCapture(session, io, points, s.hiddenSize, { numLayers: s.layers.length, hiddenSize: s.hiddenSize }, embedder, names);
  }

  batch(rows: number[][]): Promise<Batch> {
    return promptBatch(this.io, rows, this.embedder);
  }

  /** Runs one batch and returns every captured value (and the extra ones asked for) as float32 [B*S, H] (padding rows included). */
  async run(batch: Batch): Promise<Map<string, Float32Array>> {
    const names = this.names;
    let out: ort.InferenceSession.OnnxValueMapType;
    try {
      out = await this.session.run(batch.feeds, names);
    } catch (e) {
      throw new ModcError(`onnxruntime failed running the capture model: ${(e as Error).message.split('\n')[0]}`);
    }
    return new Map(names.map((n) => [n, toFloat32(out[n] as ort.Tensor)]));
  }

  async release(): Promise<void> {
    await this.embedder?.release();
    await this.session.release();
  }
}
