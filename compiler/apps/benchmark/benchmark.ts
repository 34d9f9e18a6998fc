/**
 * Side-by-side timing of decoders (an original and its compiled forms) on the same prompt:
 * prefill time, per-token decode latency and KV bytes. What `modc bench` prints, and the timing
 * core the benchmarks under bench/ use for their fixed scenarios.
 *
 * The models are interleaved run by run and step by step: every model runs its prefill, then
 * every model runs decode step 1, then step 2, ..., and the model that goes first rotates each
 * time. Load drift and background work then hit every model alike, and each step gives one
 * paired sample: the ratio of two models' times on the same step, taken moments apart. Timing
 * one model after another instead lets a change in machine load between the two look like a
 * speedup (a run under load reported an impossible 0.704x that way).
 *
 * Only the sessions being compared are alive while they are timed (`timeInterleaved` creates
 * them, times them and releases them): every other live session in the process holds its own
 * prepacked weights and threads, and changes what the timed ones cost (docs: "Several models in
 * one process").
 */
import { spawnSync } from 'node:child_process';
import { cpus } from 'node:os';
import { mulberry32 } from '../../core/random.js';
import { ModSession, type SessionCheckpoint } from '../../runtime/session.js';
import type { ExecutionProvider, SessionOptions } from '../../runtime/ort.js';

// --- glibc malloc --------------------------------------------------------------------------------

/**
 * glibc malloc settings every benchmark (and `modc bench`) runs under on Linux: keep freed
 * blocks up to 32 MiB in the heap instead of mmap/munmap-ing them, never trim the heap, and put
 * the heap on transparent huge pages (glibc 2.35 and later; older ones ignore the tunable).
 * Every decode step frees and allocates the whole KV cache and the logits; with glibc's defaults
 * those large blocks go back to the kernel and are faulted in again on the next step (thousands
 * of page faults per step at a 2K context), which buries the model's own time. On 4 KiB pages
 * the session created first runs its steps a few percent slower than one created after it, so
 * a pair's ratio depended on which model loaded first; on huge pages it does not
 * (docs/serving.md, "Several models in one process").
 */
export const MALLOC_ENV = {
  MALLOC_MMAP_THRESHOLD_: '33554432',
  MALLOC_TRIM_THRESHOLD_: '4294967296',
  GLIBC_TUNABLES: 'glibc.malloc.hugetlb=1',
} as const;

/** The malloc settings of this process, as reported: `NAME=value ...` or 'glibc defaults'. */
export function mallocSettings(env: NodeJS.ProcessEnv = process.env): string {
  const set = Object.keys(MALLOC_ENV)
    .filter((k) => env[k] !== undefined)
    .map((k) => `${k}=${env[k]}`);
  return set.length ? set.join(' ') : 'glibc defaults';
}

/**
 * Runs `script` again in a child node process with MALLOC_ENV set (glibc reads it at start-up
 * only; a variable the caller set keeps its value) and returns the child's exit code; null when
 * that is not needed: not Linux, the settings are already there, or `argv` has `--default-malloc`
 * (or asks for help).
 */
export function rerunWithMallocEnv(script: string, argv: readonly string[]): number | null {
  if (process.platform !== 'linux' || argv.includes('--default-malloc') || argv.includes('--help') || argv.includes('-h')) return null;
  if (Object.keys(MALLOC_ENV).every((k) => process.env[k] !== undefined)) return null;
  const child = spawnSync(process.execPath, [...process.execArgv, script, ...argv], { stdio: 'inherit', env: { ...MALLOC_ENV, ...process.env } });
  if (child.error) throw child.error;
  return child.status ?? 1;
}

// --- statistics ----------------------------------------------------------------------------------

export interface Spread {
  min: number;
  median: number;
  max: number;
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

/** The per-sample ratios b[i] / a[i] (samples paired by index). */
export function pairedRatios(a: readonly number[], b: readonly number[]): number[] {
  return b.map((t, i) => t / a[i]!);
}

/** Median of the per-sample ratios b[i] / a[i]. */
export function medianOfPaired(a: readonly number[], b: readonly number[]): number {
  return median(pairedRatios(a, b));
}

// --- interleaving --------------------------------------------------------------------------------

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

/** One timed call: wall time, and the process's CPU time (user + system, every thread) over it. */
export interface CallTime {
  wallMs: number;
  cpuMs: number;
}

/** What `afterCall` sees: which model ran what, and its session (cache lengths, outputs). */
export interface CallEvent {
  model: number;
  round: number;
  /** null for the prefill, else the decode step within the round (0-based). */
  step: number | null;
  timed: boolean;
  session: ModSession;
}

export interface InterleavedPlan {
  /** The prompt, one row per batch row (rows of one length: no padding). */
  prompt: number[][];
  /** Rounds: each is one prefill of every model and then `steps` decode steps of every model. */
  rounds: number;
  /** Leading rounds that are not timed. */
  warmupRounds: number;
  /** Decode steps per round (0: prefill only). */
  steps: number;
  /** Leading decode steps of every round that are not timed (default 0). */
  warmupSteps?: number;
  /** The ids fed at a decode step, one per row (the same for every model). */
  stepIds: (round: number, step: number) => number[];
  /**
   * Every decode step starts from the prefilled caches (ModSession.checkpoint / restore, outside
   * the timing): all steps run at the prompt's context instead of one token longer each.
   */
  rewind?: boolean;
  session: SessionOptions;
  /** Called before every call, outside its timing (the benchmarks collect garbage here). */
  beforeCall?: () => void;
  /** Called after every call, outside its timing. */
  afterCall?: (e: CallEvent) => void;
  /** Called after each round. */
  onRound?: (round: number, prefill: CallTime[]) => void;
}

export interface InterleavedTimes {
  /** Per model: the timed prefills, round by round. */
  prefill: CallTime[][];
  /** Per model: the timed decode steps, round by round and step by step. */
  decode: CallTime[][];
  /** Per model, after the last call. */
  kvBytes: number[];
  cacheLengths: number[][][];
}

/**
 * The timing core: creates a session per path (and no other), then per round every model's
 * prefill in turn and every model's decode step 1, step 2, ... in turn, the first model rotating
 * at every turn; releases the sessions before it returns.
 */
export async function timeInterleaved(paths: readonly string[], plan: InterleavedPlan): Promise<InterleavedTimes> {
  const sessions: ModSession[] = [];
  try {
    for (const p of paths) sessions.push(await ModSession.create(p, plan.session));
    const n = sessions.length;
    const prefill = sessions.map(() => [] as CallTime[]);
    const decode = sessions.map(() => [] as CallTime[]);
    const warmupSteps = plan.warmupSteps ?? 0;
    const prefilled: SessionCheckpoint[] = [];
    let turn = 0;
    const timedCall = async (fn: () => Promise<unknown>): Promise<CallTime> => {
      plan.beforeCall?.();
      const c0 = process.cpuUsage();
      const t0 = performance.now();
      await fn();
      const wallMs = performance.now() - t0;
      const c = process.cpuUsage(c0);
      return { wallMs, cpuMs: (c.user + c.system) / 1000 };
    };
    for (let round = 0; round < plan.rounds; round++) {
      const timedRound = round >= plan.warmupRounds;
      const prefillNow: CallTime[] = [];
      for (const m of rotation(n, turn++)) {
        const t = await timedCall(() => sessions[m]!.forward(plan.prompt));
        prefillNow[m] = t;
        if (plan.rewind) prefilled[m] = sessions[m]!.checkpoint();
        if (timedRound) prefill[m]!.push(t);
        plan.afterCall?.({ model: m, round, step: null, timed: timedRound, session: sessions[m]! });
      }
      for (let step = 0; step < plan.steps; step++) {
        const ids = plan.stepIds(round, step);
        const timed = timedRound && step >= warmupSteps;
        for (const m of rotation(n, turn++)) {
          if (plan.rewind) sessions[m]!.restore(prefilled[m]!);
          const t = await timedCall(() => sessions[m]!.step(ids));
          if (timed) decode[m]!.push(t);
          plan.afterCall?.({ model: m, round, step, timed, session: sessions[m]! });
        }
      }
      plan.onRound?.(round, prefillNow);
    }
    return { prefill, decode, kvBytes: sessions.map((s) => s.kvBytes()), cacheLengths: sessions.map((s) => s.layerCacheLengths()) };
  } finally {
    for (const s of sessions) await s.session.release();
  }
}

/** A pseudo-random prompt of `batch` rows of `length` ids in [0, vocab). */
export function benchPrompt(batch: number, length: number, vocab: number, seed = 7): number[][] {
  const next = mulberry32(seed);
  return Array.from({ length: batch }, () => Array.from({ length }, () => Math.floor(next() * vocab)));
}

// --- modc bench ----------------------------------------------------------------------------------

export interface BenchOptions {
  promptLength: number;
  batch: number;
  steps: number;
  runs: number;
  warmup: number;
  executionProvider?: ExecutionProvider;
  /** ORT intra-op threads; 0 or absent: ORT's default (one per physical core). */
  intraOpThreads?: number;
  /** ORT's idle worker spinning; default off (see SessionOptions.allowSpinning). */
  allowSpinning?: boolean;
  /** Called before every timed call, outside its timing (the benchmarks collect garbage here). */
  beforeCall?: () => void;
  /** Progress lines (stderr in the CLI). */
  log?: (message: string) => void;
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
  /** Process CPU time (user + system, every thread) of the same calls. */
  prefillCpuSamples: number[];
  decodeCpuSamples: number[];
  /** After the last run. */
  kvBytes: number;
  cacheLengths: number[][];
}

/** Compiled / original, one way of pairing. */
export interface RatioStats {
  ofMedians: number;
  medianOfPaired: number;
  /** Min, median and max of the per-run (prefill) or per-step (decode) ratios. */
  paired: Spread;
}

/** A model against the first one: time ratios (< 1: faster) and the KV ratio. */
export interface BenchRatio {
  model: string;
  prefill: RatioStats;
  decode: RatioStats;
  /** The same ratios on process CPU time. */
  cpu: { prefill: RatioStats; decode: RatioStats };
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
    /** 'off' (the default) or 'ORT default'. */
    spinning: 'off' | 'ORT default';
    logicalCores: number;
    /** glibc malloc settings of the process (mallocSettings()). */
    malloc: string;
    /** Sessions alive while timing: the two compared, nothing else. */
    liveSessions: number;
    order: string;
  };
  models: BenchModel[];
  /** models[1..] against models[0]. */
  ratios: BenchRatio[];
}

/** Compiled / original as the ratio of medians and the paired ratios. */
export function ratioStats(base: readonly number[], x: readonly number[]): RatioStats {
  return { ofMedians: median(x) / median(base), medianOfPaired: medianOfPaired(base, x), paired: spread(pairedRatios(base, x)) };
}

/**
 * Runs every model on the same prompt, all sessions alive together: per run, the prefills in
 * turn, then each decode step in turn (the ids fed are the prompt's own, the same for every
 * model). Warm-up runs are untimed. `modc bench` passes two models (benchPair).
 */
export async function benchModels(paths: readonly string[], vocab: number, opts: BenchOptions): Promise<BenchReport> {
  const threads = opts.intraOpThreads ?? 0;
  const ep = opts.executionProvider ?? 'cpu';
  const spinning = opts.allowSpinning ?? false;
  const prompt = benchPrompt(opts.batch, opts.promptLength, vocab);
  const times = await timeInterleaved(paths, {
    prompt,
    rounds: opts.warmup + opts.runs,
    warmupRounds: opts.warmup,
    steps: opts.steps,
    stepIds: (_, s) => prompt.map((r) => r[s % r.length]!),
    session: { executionProvider: ep, ...(threads > 0 ? { intraOpThreads: threads } : {}), allowSpinning: spinning },
    beforeCall: opts.beforeCall,
    onRound: (run, prefill) =>
      opts.log?.(
        `${run >= opts.warmup ? 'run' : 'warm-up'} ${run + 1}/${opts.warmup + opts.runs}: prefill ${prefill.map((t) => t.wallMs.toFixed(0)).join(' / ')} ms`,
      ),
  });
  const wall = (xs: CallTime[]) => xs.map((t) => t.wallMs);
  const cpu = (xs: CallTime[]) => xs.map((t) => t.cpuMs);
  const models: BenchModel[] = paths.map((model, m) => {
    const prefillSamples = wall(times.prefill[m]!);
    const decodeSamples = wall(times.decode[m]!);
    return {
      model,
      prefillMs: median(prefillSamples),
      decodeMsPerToken: decodeSamples.length ? median(decodeSamples) : 0,
      prefill: spread(prefillSamples),
      decode: spread(decodeSamples),
      prefillSamples,
      decodeSamples,
      prefillCpuSamples: cpu(times.prefill[m]!),
      decodeCpuSamples: cpu(times.decode[m]!),
      kvBytes: times.kvBytes[m]!,
      cacheLengths: times.cacheLengths[m]!,
    };
  });
  const base = models[0]!;
  const ratios: BenchRatio[] = models.slice(1).map((x) => ({
    model: x.model,
    prefill: ratioStats(base.prefillSamples, x.prefillSamples),
    decode: ratioStats(base.decodeSamples, x.decodeSamples),
    cpu: { prefill: ratioStats(base.prefillCpuSamples, x.prefillCpuSamples), decode: ratioStats(base.decodeCpuSamples, x.decodeCpuSamples) },
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
      spinning: spinning ? 'ORT default' : 'off',
      logicalCores: cpus().length,
      malloc: mallocSettings(),
      liveSessions: paths.length,
      order: "interleaved: per run every prefill in turn, then every model's decode step 1, step 2, ...; the first model rotates each turn",
    },
    models,
    ratios,
  };
}

/** An original and its compiled model, interleaved, with only their two sessions alive. */
export async function benchPair(original: string, compiled: string, vocab: number, opts: BenchOptions): Promise<BenchReport> {
  return benchModels([original, compiled], vocab, opts);
}
