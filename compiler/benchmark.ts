/**
 * Side-by-side timing of two decoders (an original and its compiled form) on the same prompt:
 * prefill time, per-token decode latency and KV bytes, medians over repeated runs. What
 * `modc bench` prints; the benchmarks under bench/ measure fixed scenarios in depth.
 */
import { mulberry32 } from './routers.js';
import { ModSession } from './runtime/session.js';
import type { ExecutionProvider } from './runtime/ort.js';

export interface BenchOptions {
  promptLength: number;
  batch: number;
  steps: number;
  runs: number;
  warmup: number;
  executionProvider?: ExecutionProvider;
}

export interface BenchRow {
  model: string;
  prefillMs: number;
  decodeMsPerToken: number;
  kvBytes: number;
  cacheLengths: number[][];
}

export function median(xs: readonly number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

async function measure(path: string, prompt: number[][], opts: BenchOptions): Promise<BenchRow> {
  const session = await ModSession.create(path, { executionProvider: opts.executionProvider });
  const prefill: number[] = [];
  const decode: number[] = [];
  for (let run = 0; run < opts.warmup + opts.runs; run++) {
    let t0 = performance.now();
    await session.forward(prompt);
    const tPrefill = performance.now() - t0;
    const steps: number[] = [];
    for (let s = 0; s < opts.steps; s++) {
      t0 = performance.now();
      await session.step(prompt.map((r) => r[s % r.length]!));
      steps.push(performance.now() - t0);
    }
    if (run >= opts.warmup) {
      prefill.push(tPrefill);
      decode.push(...steps);
    }
  }
  return { model: path, prefillMs: median(prefill), decodeMsPerToken: decode.length ? median(decode) : 0, kvBytes: session.kvBytes(), cacheLengths: session.layerCacheLengths() };
}

/** Runs both models, alternating nothing: the original first, then the compiled one. */
export async function benchPair(original: string, compiled: string, vocab: number, opts: BenchOptions): Promise<BenchRow[]> {
  const next = mulberry32(7);
  const prompt = Array.from({ length: opts.batch }, () => Array.from({ length: opts.promptLength }, () => Math.floor(next() * vocab)));
  return [await measure(original, prompt, opts), await measure(compiled, prompt, opts)];
}
