/**
 * `evaluate`: language-model quality and the compute actually spent, on an original or a
 * modc-compiled model, over sequences of token ids. Each sequence is one prefill (past length
 * 0); sequences run in batches, padded, and are never split here (split them when reading).
 *
 * Metrics (docs/commands.md, "Metrics"; the MAC accounting is compiler/analysis/cost.ts):
 * - nll: mean over every predicted token (each token after the first of a sequence) of
 *   -log softmax(logits at t)[id at t+1], in nats; perplexity = exp(nll).
 * - selectedFraction of a routed (layer, part): tokens that ran it / real tokens.
 * - computeFraction: MACs executed / MACs of the dense original on the same tokens. A kv part's
 *   attention is charged for the (query, key) pairs its visibility rule leaves (kvRowUsage); a
 *   surrogate (SPEC.md, "MLP routed with a surrogate") is charged its MACs on the tokens it ran
 *   on: the real tokens its MLP part did not select, or every real token of an MLP it replaces.
 * - kvFraction: KV-cache elements held for real tokens / the dense original's, after each row's
 *   last token (a kv part: its sinks, kept tokens and window; the cache only grows, so this is
 *   also the peak of a decode).
 */
import { rmSync } from 'node:fs';
import { basename, join } from 'node:path';
import { analyzeDecoder } from '../../analysis/analyze.js';
import { denseUsage, executedMacs, kvElements, kvRowUsage, modelCosts, readCosts, type ModelCosts, type RowUsage } from '../../analysis/cost.js';
import { DEFAULT_KV_POLICY, type KvPolicy } from '../../routing/router-weights.js';
import { ModcError } from '../../core/errors.js';
import { loadModel } from '../../core/io/load.js';
import type { Model } from '../../core/ir/model.js';
import { saveModel } from '../../core/io/save.js';
import { cloneModel } from '../../core/io/convert.js';
import { workFolder } from '../../core/io/work-folder.js';
import { logitsPositions } from '../../metadata/logits-metadata.js';
import { readRoutingMetadata } from '../../metadata/routing-metadata.js';
import { decoderIo, resolvePadSide, type DecoderIo } from '../../metadata/decoder-io.js';
import { genaiEmbeddingModel } from '../../runtime/embeddings.js';
import type { ExecutionProvider, ort } from '../../runtime/ort.js';
import { ModSession } from '../../runtime/session.js';
import { exposeSelections, type Part, type Selection } from './selection.js';

export interface EvalOptions {
  /** Sequences per forward at most (default 8); fewer when the logits would pass ~512 MiB. */
  batchSize?: number;
  /** Padding side (default right where the model supports it, as every attention form does; GroupQueryAttention only it). */
  pad?: 'left' | 'right';
  executionProvider?: ExecutionProvider;
  /** Called before the first batch and after each batch with the sequences done so far. */
  onProgress?: (done: number, total: number) => void;
}

export interface LayerEval {
  layer: number;
  /** The routed part; 'block' with routed false for a layer that runs densely. */
  part: Part;
  routed: boolean;
  /** Tokens that ran the part over real tokens (a kv part: tokens its router kept for good). */
  selectedFraction: number;
  /** An MLP part with a surrogate: its rank, and the fraction of real tokens it ran on (1 - selected; 1 when it replaces the MLP). */
  surrogate?: { rank: number; fraction: number };
  /** A kv part: entries its cache held after each row's last token, over real tokens (sinks and window counted). */
  kvFraction?: number;
}

export interface EvalResult {
  /** Mean negative log-likelihood per predicted token, nats. */
  nll: number;
  perplexity: number;
  /** Predicted tokens (the NLL's denominator): each token after the first of a sequence. */
  tokens: number;
  /** Tokens fed (every token of every sequence). */
  inputTokens: number;
  sequences: number;
  computeFraction: number;
  kvFraction: number;
  /** The MAC totals behind computeFraction. */
  macs: { executed: number; dense: number };
  layers: LayerEval[];
  routing: { mode: 'threshold' | 'topk'; gated: boolean } | null;
  /** The padding side the batches used. */
  pad: 'left' | 'right';
}

/** Budget for one batch's logits, in float32 elements (~512 MiB). */
const LOGITS_BUDGET = 2 ** 27;

/** Scores `model` (a path, or a model loadModel read; it is not changed) on `sequences`. */
export async function evaluate(model: Model | string, sequences: number[][], opts: EvalOptions = {}): Promise<EvalResult> {
  if (sequences.length === 0) throw new ModcError('no sequences to evaluate');
  const requested = opts.batchSize ?? 8;
  if (!Number.isInteger(requested) || requested < 1) throw new ModcError(`batch size must be a positive integer, got ${requested}`);

  if (typeof model === 'string') model = loadModel(model);
  const modelPath = model.sourcePath;
  if (!modelPath) throw new ModcError('evaluate needs a model read from a file (loadModel), to run it');
  const io = decoderIo(model);
  // A model that cannot mask padding (DecoderIo.unpaddable), or runs one row per call
  // (DecoderIo.batchOne), runs one sequence per batch.
  const batchSize = io.unpaddable || io.batchOne ? 1 : requested;
  if (logitsPositions(model) === 'last') {
    throw new ModcError(
      `${modelPath} computes logits for the last position only (compiled with --logits last): eval needs every position's; compile with --logits all`,
    );
  }
  checkSequences(io, sequences);
  const pad = resolvePadSide(io, opts.pad ?? (io.paddingSides.includes('right') ? 'right' : undefined));
  // A decoder fed inputs_embeds needs the real token embeddings: random ones would make the NLL meaningless.
  const embeddingModel = io.inputsEmbeds ? genaiEmbeddingModel(modelPath) : null;
  if (io.inputsEmbeds && !embeddingModel) {
    throw new ModcError(`${modelPath} takes inputs_embeds: eval needs the embedding model that genai_config.json beside it names`);
  }
  const routing = readRoutingMetadata(model);
  let costs: ModelCosts;
  let selections: Selection[] = [];
  let runPath = modelPath;
  let temp: string | null = null;
  if (routing) {
    const recorded = readCosts(model);
    if (!recorded)
      throw new ModcError(`${modelPath} is modc-compiled but has no modc.costs metadata (compiled by an older modc): recompile it to measure its compute`);
    costs = recorded;
    model = cloneModel(model);
    selections = exposeSelections(model, routing);
  } else {
    costs = modelCosts(analyzeDecoder(model));
  }

  let session: ModSession | null = null;
  // Ctrl-C skips `finally`: remove the temp copy first, then let the signal do what it would have.
  const onSignal = (signal: NodeJS.Signals) => {
    if (temp) rmSync(temp, { recursive: true, force: true });
    process.kill(process.pid, signal);
  };
  try {
    if (selections.length) {
      temp = workFolder(model, 'modc-eval');
      process.once('SIGINT', onSignal).once('SIGTERM', onSignal);
      runPath = saveModel(model, join(temp, basename(modelPath))).path;
    }
    const run = (session = await ModSession.create(runPath, {
      executionProvider: opts.executionProvider,
      ...(embeddingModel ? { embeddings: { kind: 'model', path: embeddingModel } } : {}),
    }));
    const surrogates = selections.map((sel) => routing?.layers.find((l) => l.layer === sel.layer && l.part === sel.part)?.surrogate ?? null);
    const acc = new Accumulator(costs, selections, routing?.kv ?? DEFAULT_KV_POLICY, surrogates, routing?.replaced ?? []);
    const order = sequences.map((_, i) => i).sort((a, b) => sequences[b]!.length - sequences[a]!.length);
    let done = 0;
    opts.onProgress?.(0, order.length);
    while (done < order.length) {
      const width = sequences[order[done]!]!.length;
      const fit = Math.max(1, Math.floor(LOGITS_BUDGET / (width * Math.max(1, costs.vocabSize))));
      const rows = order.slice(done, done + Math.min(batchSize, fit)).map((i) => sequences[i]!);
      await runBatch(run, rows, pad, selections, acc);
      done += rows.length;
      opts.onProgress?.(done, order.length);
    }
    return { ...acc.result(sequences.length, routing ? { mode: routing.mode, gated: routing.gated } : null), pad };
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
    await session?.session.release();
    if (temp) rmSync(temp, { recursive: true, force: true });
  }
}

function checkSequences(io: DecoderIo, sequences: number[][]): void {
  const V = io.vocabSize;
  sequences.forEach((s, i) => {
    if (s.length === 0) throw new ModcError(`sequence ${i + 1} is empty`);
    if (io.maxPositions !== null && s.length > io.maxPositions) {
      throw new ModcError(`sequence ${i + 1} has ${s.length} tokens, more than the model's context of ${io.maxPositions}: split it (--max-length)`);
    }
    const bad = s.find((id) => !Number.isInteger(id) || id < 0 || (V !== null && id >= V));
    if (bad !== undefined) throw new ModcError(`sequence ${i + 1}: token id ${bad} is outside the vocabulary${V !== null ? ` (0-${V - 1})` : ''}`);
  });
}

async function runBatch(session: ModSession, rows: number[][], pad: 'left' | 'right', selections: Selection[], acc: Accumulator): Promise<void> {
  const {
    data: logits,
    dims: [, width, V],
  } = await session.forward(rows, { pad });
  const masks = selections.map((s) => (session.lastOutputs[s.output] as ort.Tensor).data as Uint8Array);
  rows.forEach((row, b) => {
    const offset = pad === 'left' ? width - row.length : 0;
    let nll = 0;
    for (let t = 0; t + 1 < row.length; t++) nll += tokenNll(logits, (b * width + offset + t) * V, V, row[t + 1]!);
    const chosen = masks.map((m) => m.subarray(b * width + offset, b * width + offset + row.length));
    acc.addRow(row.length, nll, chosen);
  });
}

/** -log softmax(logits[at .. at+V))[target], in float64. */
function tokenNll(logits: Float32Array, at: number, V: number, target: number): number {
  let max = -Infinity;
  for (let v = 0; v < V; v++) max = Math.max(max, logits[at + v]!);
  let sum = 0;
  for (let v = 0; v < V; v++) sum += Math.exp(logits[at + v]! - max);
  return Math.log(sum) + max - logits[at + target]!;
}

/** Sums over rows: NLL, tokens, tokens selected per routed part, executed and dense MACs and KV. */
class Accumulator {
  private nll = 0;
  private predicted = 0;
  private fed = 0;
  private selected: number[];
  /** Per selection: entries a kv part's cache held after each row (sinks and window counted). */
  private held: number[];
  private macs = { executed: 0, dense: 0 };
  private kv = { held: 0, dense: 0 };

  constructor(
    private readonly costs: ModelCosts,
    private readonly selections: Selection[],
    private readonly policy: KvPolicy,
    /** Per selection: its surrogate (rank and MACs per token it runs on), or null. */
    private readonly surrogates: ({ rank: number; macs: number } | null)[] = [],
    /** MLP parts replaced by their surrogate: no router, the surrogate on every token. */
    private readonly replaced: readonly { layer: number; surrogate: { rank: number; macs: number } }[] = [],
  ) {
    this.selected = selections.map(() => 0);
    this.held = selections.map(() => 0);
  }

  /** `chosen[i]`: selection i's mask over the row's real tokens, in order. */
  addRow(tokens: number, nll: number, chosen: ArrayLike<number>[]): void {
    this.nll += nll;
    this.predicted += tokens - 1;
    this.fed += tokens;
    const selected = chosen.map((m) => {
      let count = 0;
      for (let t = 0; t < tokens; t++) count += m[t] ? 1 : 0;
      return count;
    });
    selected.forEach((s, i) => (this.selected[i]! += s));
    const dense = denseUsage(this.costs, tokens);
    const usage: RowUsage = { tokens, layers: dense.layers.map((l) => ({ ...l })) };
    this.selections.forEach((sel, i) => {
      const u = usage.layers[sel.layer];
      if (!u) throw new ModcError(`modc.routing names layer ${sel.layer}, but modc.costs has ${this.costs.layers.length} layers`);
      if (sel.part === 'kv') {
        // Every token runs the layer; its attention sees, and its cache keeps, what the kv rule leaves.
        const { pairs, held } = kvRowUsage(chosen[i]!, this.policy.sinks, this.policy.window);
        u.pairs = pairs;
        u.kvHeld = held;
        this.held[i]! += held;
      } else {
        if (sel.part !== 'mlp') u.attention = selected[i]!;
        if (sel.part !== 'attention') u.mlp = selected[i]!;
      }
      u.routers += 1;
      const sur = this.surrogates[i];
      if (sur) u.surrogateMacs = (u.surrogateMacs ?? 0) + sur.macs * (tokens - selected[i]!);
    });
    for (const r of this.replaced) {
      const u = usage.layers[r.layer];
      if (!u) throw new ModcError(`modc.routing replaces layer ${r.layer}'s MLP, but modc.costs has ${this.costs.layers.length} layers`);
      u.mlp = 0;
      u.surrogateMacs = (u.surrogateMacs ?? 0) + r.surrogate.macs * tokens;
    }
    this.macs.executed += executedMacs(this.costs, usage);
    this.macs.dense += executedMacs(this.costs, dense);
    this.kv.held += kvElements(this.costs, usage);
    this.kv.dense += kvElements(this.costs, dense);
  }

  result(sequences: number, routing: EvalResult['routing']): Omit<EvalResult, 'pad'> {
    const nll = this.predicted > 0 ? this.nll / this.predicted : NaN;
    const routed = new Set([...this.selections.map((s) => s.layer), ...this.replaced.map((r) => r.layer)]);
    const layers = this.costs.layers.flatMap((c): LayerEval[] =>
      routed.has(c.layer)
        ? [
            ...this.selections.flatMap((s, i): LayerEval[] => {
              if (s.layer !== c.layer) return [];
              const fraction = this.selected[i]! / this.fed;
              const sur = this.surrogates[i];
              return [
                {
                  layer: c.layer,
                  part: s.part,
                  routed: true,
                  selectedFraction: fraction,
                  ...(sur ? { surrogate: { rank: sur.rank, fraction: 1 - fraction } } : {}),
                  ...(s.part === 'kv' ? { kvFraction: this.held[i]! / this.fed } : {}),
                },
              ];
            }),
            ...this.replaced
              .filter((r) => r.layer === c.layer)
              .map((r) => ({ layer: c.layer, part: 'mlp' as const, routed: true, selectedFraction: 0, surrogate: { rank: r.surrogate.rank, fraction: 1 } })),
          ]
        : [{ layer: c.layer, part: 'block' as const, routed: false, selectedFraction: 1 }],
    );
    return {
      nll,
      perplexity: Math.exp(nll),
      tokens: this.predicted,
      inputTokens: this.fed,
      sequences,
      computeFraction: this.macs.executed / this.macs.dense,
      kvFraction: this.kv.dense > 0 ? this.kv.held / this.kv.dense : 1,
      macs: { ...this.macs },
      layers,
      routing,
    };
  }
}
