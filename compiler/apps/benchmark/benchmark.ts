/**
 * Side-by-side timing of decoders (an original and its compiled forms) on the same prompt:
 * prefill time, per-token decode latency and KV bytes. What `modc bench` prints; the benchmarks
 * under bench/ use the same interleaving for their fixed scenarios.
 *
 * The models are interleaved run by run and step by step: every model runs its prefill, then
 * every model runs decode step 1, then step 2, ..., and the model that goes first rotates each
 * time. Load drift and background work then hit every model alike, and each step gives one
 * paired sample: the ratio of two models' times on the same step, taken moments apart. Timing
 * one model after another instead lets a change in machine load between the two look like a
 * speedup (a run under load reported an impossible 0.704x that way).
 */
import { cpus } from 'node:os';
import { mulberry32 } from '../../core/random.js';
import { ModSession } from '../../runtime/session.js';
import type { ExecutionProvider } from '../../runtime/ort.js';

export interface BenchOptions {
  promptLength: number;
  batch: number;
  steps: number;
  runs: number;
  warmup: number;
  executionProvider?: ExecutionProvider;
  /** ORT intra-op threads; 0 or absent: ORT's default (one per physical core). */
  intraOpThreads?: number;
  /** Called before every timed call, outside its timing (the benchmarks collect garbage here). */
  beforeCall?: () => void;
  /** Progress lines (stderr in the CLI). */
  log?: (message: string) => void;
}

export interface Spread {
  min: number;
  median: number;
  max: number;
}

export interface BenchModel {
  model: string;
  /** Median prefill time over the timed runs. */
  prefillMs: number;
  /** Median over every timed decode step of every timed run. */
  decodeMsPerToken: number;
  prefill: Spread;
  decode: Spread;
  /** Raw samples, in run order (decode: run by run, step by step). */
  prefillSamples: number[];
  decodeSamples: number[];
  /** After the last run. */
  kvBytes: number;
  cacheLengths: number[][];
}

/** A model against the first one: time ratios (< 1: faster) and the KV ratio. */
export interface BenchRatio {
  model: string;
  prefill: { ofMedians: number; medianOfPaired: number };
  decode: { ofMedians: number; medianOfPaired: number };
  kvBytes: number;
}

export interface BenchReport {
  settings: {
    promptLength: number;
    batch: number;
    steps: number;
    runs: number;
    warmup: number;
    executionProvider: ExecutionProvider;
    /** The intra-op thread count asked for; 'ORT default' is one per physical core. */
    threads: number | 'ORT default';
    logicalCores: number;
    order: string;
  };
  models: BenchModel[];
  /** models[1..] against models[0]. */
  ratios: BenchRatio[];
}

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

export function spread(xs: readonly number[]): Spread {
  return { min: xs.length ? Math.min(...xs) : NaN, median: median(xs), max: xs.length ? Math.max(...xs) : NaN };
}

/** Median of the per-sample ratios b[i] / a[i] (samples paired by index). */
export function medianOfPaired(a: readonly number[], b: readonly number[]): number {
  return median(b.map((t, i) => t / a[i]!));
}

/** The order the models go in at round r: rotated by r, so each goes first equally often. */
export function rotation(count: number, round: number): number[] {
  return Array.from({ length: count }, (_, i) => (i + round) % count);
}

/**
 * Times `call(model)` for every model, `rounds` times, in rotating order; returns the samples per
 * model (round by round). `timed(round)` says whether a round counts; `firstRound` continues the
 * rotation of an earlier call.
 */
export async function interleaved(
  count: number,
  rounds: number,
  call: (model: number, round: number) => Promise<void>,
  opts: { timed: (round: number) => boolean; beforeCall?: () => void; firstRound?: number },
): Promise<number[][]> {
  const samples = Array.from({ length: count }, () => [] as number[]);
  for (let r = 0; r < rounds; r++) {
    for (const m of rotation(count, (opts.firstRound ?? 0) + r)) {
      opts.beforeCall?.();
      const t0 = performance.now();
      await call(m, r);
      const took = performance.now() - t0;
      if (opts.timed(r)) samples[m]!.push(took);
    }
  }
  return samples;
}

/** A pseudo-random prompt of `batch` rows of `length` ids in [0, vocab). */
export function benchPrompt(batch: number, length: number, vocab: number, seed = 7): number[][] {
  const next = mulberry32(seed);
  return Array.from({ length: batch }, () => Array.from({ length }, () => Math.floor(next() * vocab)));
}

/**
 * Runs every model on the same prompt: per run, the prefills in turn, then each decode step in
 * turn (the ids fed are the prompt's own, the same for every model). Warm-up runs are untimed.
 */
export async function benchModels(paths: readonly string[], vocab: number, opts: BenchOptions): Promise<BenchReport> {
  const threads = opts.intraOpThreads ?? 0;
  const ep = opts.executionProvider ?? 'cpu';
  const sessions: ModSession[] = [];
  for (const p of paths) sessions.push(await ModSession.create(p, { executionProvider: ep, ...(threads > 0 ? { intraOpThreads: threads } : {}) }));
  const prompt = benchPrompt(opts.batch, opts.promptLength, vocab);
  const prefill = paths.map(() => [] as number[]);
  const decode = paths.map(() => [] as number[]);
  try {
    for (let run = 0; run < opts.warmup + opts.runs; run++) {
      const timed = run >= opts.warmup;
      const keep = (into: number[][], got: number[][]) => got.forEach((xs, m) => into[m]!.push(...xs));
      keep(
        prefill,
        await interleaved(paths.length, 1, (m) => sessions[m]!.forward(prompt).then(() => {}), {
          timed: () => timed,
          beforeCall: opts.beforeCall,
          firstRound: run,
        }),
      );
      const steps = await interleaved(paths.length, opts.steps, (m, s) => sessions[m]!.step(prompt.map((r) => r[s % r.length]!)).then(() => {}), {
        timed: () => timed,
        beforeCall: opts.beforeCall,
        firstRound: run * opts.steps,
      });
      keep(decode, steps);
      opts.log?.(
        `${timed ? 'run' : 'warm-up'} ${run + 1}/${opts.warmup + opts.runs}: prefill ${paths.map((_, m) => `${prefill[m]!.at(-1)?.toFixed(0) ?? '-'}`).join(' / ')} ms`,
      );
    }
    const models: BenchModel[] = paths.map((model, m) => ({
      model,
      prefillMs: median(prefill[m]!),
      decodeMsPerToken: decode[m]!.length ? median(decode[m]!) : 0,
      prefill: spread(prefill[m]!),
      decode: spread(decode[m]!),
      prefillSamples: prefill[m]!,
      decodeSamples: decode[m]!,
      kvBytes: sessions[m]!.kvBytes(),
      cacheLengths: sessions[m]!.layerCacheLengths(),
    }));
    const base = models[0]!;
    const ratios: BenchRatio[] = models.slice(1).map((x) => ({
      model: x.model,
      prefill: { ofMedians: x.prefillMs / base.prefillMs, medianOfPaired: medianOfPaired(base.prefillSamples, x.prefillSamples) },
      decode: { ofMedians: x.decodeMsPerToken / base.decodeMsPerToken, medianOfPaired: medianOfPaired(base.decodeSamples, x.decodeSamples) },
      kvBytes: x.kvBytes / base.kvBytes,
    }));
    return {
      settings: {
        promptLength: opts.promptLength,
        batch: opts.batch,
        steps: opts.steps,
        runs: opts.runs,
        warmup: opts.warmup,
        executionProvider: ep,
        threads: threads > 0 ? threads : 'ORT default',
        logicalCores: cpus().length,
        order: "interleaved: per run every prefill in turn, then every model's decode step 1, step 2, ...; the first model rotates each turn",
      },
      models,
      ratios,
    };
  } finally {
    for (const s of sessions) await s.session.release();
  }
}

/** An original and its compiled model, interleaved. */
export async function benchPair(original: string, compiled: string, vocab: number, opts: BenchOptions): Promise<BenchReport> {
  return benchModels([original, compiled], vocab, opts);
}
